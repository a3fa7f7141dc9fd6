"""TLS off loopback, the client side and the shared vocabulary: a control plane started with
`torchloom run --listen HOST` serves NATS and gRPC on HOST with a certificate of its own private CA
(torchloom/certs.py makes them); a client trusts only that CA (an `ssl.SSLContext` for nats-py) and
can check that a server's certificate verifies against it. Standard library only, so the ranks and
the CLI import no X.509 toolkit. docs/security.md, "Off loopback".
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from torchloom.errors import TorchloomError

TLS_SUBDIR = "tls"  # under the control plane's secrets directory
CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
VERIFY_TIMEOUT_S = 5.0
_PEM_CERT = "-----BEGIN CERTIFICATE-----"


class TlsError(TorchloomError, ValueError):
    """A TLS file that cannot be used, or an address no certificate can name."""


class TlsVerifyError(TorchloomError, ConnectionError):
    """A server's certificate does not verify against the CA the client was given, or the server
    cannot be reached for the check.

    Attributes:
        host: the server's host as the client named it.
        port: its port.
        reason: what failed (OpenSSL's verify message, or the connection error).
        unverified: True when the handshake ran and the certificate did not verify.
    """

    def __init__(self, host: str, port: int, reason: str, *, unverified: bool) -> None:
        super().__init__(f"{host_port(host, port)}: {reason}")
        self.host = host
        self.port = port
        self.reason = reason
        self.unverified = unverified


def ip_of(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """`host` as an IP address (brackets of an IPv6 one dropped), or None for a DNS name."""
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def host_port(host: str, port: int) -> str:
    """`host:port`, an IPv6 address in brackets."""
    ip = ip_of(host)
    return f"[{ip}]:{port}" if ip is not None and ip.version == 6 else f"{host}:{port}"


def check_listen_host(host: str) -> str:
    """Return `host` (an IPv6 address without brackets) when a certificate can name it and this
    machine has it: an IP address or a DNS name that resolves to one of this machine's addresses.

    Raises:
        TlsError: a wildcard (0.0.0.0, ::), a malformed name, or an address this machine does not
            have (it cannot be bound); the message names the host and what is expected.
    """
    ip = ip_of(host)
    expected = "the IP address or DNS name other nodes reach this machine at, e.g. --listen 10.0.0.5"
    if ip is not None:
        if ip.is_unspecified:
            raise TlsError(
                f"--listen {host} rejected: a wildcard address cannot be named in a certificate; pass "
                f"{expected}"
            )
        candidates = [(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, str(ip))]
        host = str(ip)
    else:
        labels = host.rstrip(".").split(".")
        if not host or any(
            not label or len(label) > 63 or not label.replace("-", "").isalnum() for label in labels
        ):
            raise TlsError(f"--listen {host!r} rejected: not an IP address or DNS name; pass {expected}")
        try:
            infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise TlsError(f"--listen {host} rejected: the name does not resolve ({exc.strerror})") from None
        candidates = [(family, str(addr[0])) for family, _, _, _, addr in infos]
    for family, address in candidates:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((address, 0))
            except OSError:
                continue
            return host
    raise TlsError(
        f"--listen {host} rejected: this machine has no address {host} (it cannot bind there); pass "
        f"{expected} (`ip -brief address` lists this machine's)"
    )


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerTls:
    """The files a TLS listener of the control plane uses (each 0600 in a 0700 directory).

    Attributes:
        host: the address the certificate names (its subject alternative name).
        ca_file: the CA certificate (PEM) clients verify the server with; not secret.
        cert_file: the server certificate (PEM), signed by the CA.
        key_file: the server's private key (PEM, PKCS#8).
    """

    host: str
    ca_file: Path
    cert_file: Path
    key_file: Path

    def ca_pem(self) -> str:
        """The CA certificate's PEM text (what a join file carries)."""
        return self.ca_file.read_text()


def client_context(*, ca_file: Path | None = None, ca_pem: str | None = None) -> ssl.SSLContext:
    """An SSL context that trusts only the given CA (not the system's) and checks the host name.

    Raises:
        TlsError: the CA cannot be read or parsed.
    """
    if (ca_file is None) == (ca_pem is None):
        raise ValueError("pass ca_file or ca_pem, exactly one")
    try:
        cadata = ca_pem if ca_pem is not None else Path(ca_file).read_text()  # type: ignore[arg-type]
    except OSError as exc:
        raise TlsError(f"cannot read the CA certificate {ca_file}: {exc.strerror or exc}") from None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        if _PEM_CERT not in cadata:
            raise ssl.SSLError
        ctx.load_verify_locations(cadata=cadata)
    except ssl.SSLError:
        raise TlsError(
            f"{ca_file or 'the CA text'} holds no PEM CA certificate (expected {_PEM_CERT} ...)"
        ) from None
    return ctx


def _read_nats_info(sock: socket.socket) -> None:
    """nats-server greets in plain text (`INFO {...}`) and upgrades to TLS after it."""
    seen = b""
    while not seen.endswith(b"\r\n") and len(seen) < 65536:
        chunk = sock.recv(4096)
        if not chunk:
            break
        seen += chunk
    if not seen.startswith(b"INFO "):
        raise ssl.SSLError(f"no NATS INFO greeting (got {seen[:40]!r})")


def verify_server(
    host: str,
    port: int,
    ca_pem: str,
    *,
    protocol: Literal["nats", "grpc"],
    timeout_s: float = VERIFY_TIMEOUT_S,
) -> None:
    """Connect to `host:port` and complete a TLS handshake that trusts only `ca_pem`, naming `host`.

    Raises:
        TlsVerifyError: the certificate does not verify (`unverified`), or the server cannot be
            reached or does not speak TLS there.
    """
    ctx = client_context(ca_pem=ca_pem)
    if protocol == "grpc":
        ctx.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host.strip("[]"), port), timeout=timeout_s) as sock:
            if protocol == "nats":
                _read_nats_info(sock)
            with ctx.wrap_socket(sock, server_hostname=host.strip("[]")):
                return
    except ssl.SSLCertVerificationError as exc:
        raise TlsVerifyError(host, port, exc.verify_message or str(exc), unverified=True) from None
    except (OSError, ssl.SSLError) as exc:
        raise TlsVerifyError(host, port, str(exc) or type(exc).__name__, unverified=False) from None
