"""TLS off loopback (torchloom/certs.py, torchloom/tls.py): the control plane's private CA and its server
certificate (the subject alternative name of the host, validity, key files 0600 in a 0700 directory,
kept across restarts and issued again when the host changes or the end nears), and the client side
that trusts only that CA. Handshakes run in memory (ssl.MemoryBIO): no sockets."""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from torchloom import certs, tls
from torchloom.app.controlplane_config import ControlPlaneConfig
from torchloom.credentials import ClientAuth
from torchloom.nats_server import EmbeddedNats


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _handshake(server: tls.ServerTls, client: ssl.SSLContext, hostname: str) -> None:
    """A TLS handshake between `client` (naming `hostname`) and a server presenting `server`'s
    certificate, through memory buffers; raises what the client raises."""
    srv_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    srv_ctx.load_cert_chain(server.cert_file, server.key_file)
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    c = client.wrap_bio(c_in, c_out, server_hostname=hostname)
    s = srv_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(10):
        for name, side, out, peer_in in (("c", c, c_out, s_in), ("s", s, s_out, c_in)):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLError:
                    if name == "c":
                        raise
                    done[name] = True  # the server side fails once the client aborted: the client says why
            peer_in.write(out.read())
        if done["c"]:
            return
    raise AssertionError("handshake did not finish")


def test_the_ca_and_server_certificate_are_private_files_naming_the_host(tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    made = certs.ensure_server_tls(tmp_path / "secrets" / "tls", "127.0.0.2")
    assert _mode(made.ca_file.parent) == 0o700
    for path in (made.ca_file, made.cert_file, made.key_file, made.ca_file.parent / tls.CA_KEY):
        assert _mode(path) == 0o600, path
    ca, server = _cert(made.ca_file), _cert(made.cert_file)
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.IPAddress(ipaddress.ip_address("127.0.0.2"))]  # an IP SAN, not a DNS one
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert list(server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH
    ]
    # Valid from a few minutes ago (a clock a little behind) for a year; the CA for ten.
    for cert, days in ((server, 365), (ca, 3650)):
        assert now - dt.timedelta(minutes=6) < cert.not_valid_before_utc <= now
        assert abs(cert.not_valid_after_utc - (now + dt.timedelta(days=days))) < dt.timedelta(minutes=1)
    dns = certs.ensure_server_tls(tmp_path / "other", "node-a.example")
    san = _cert(dns.cert_file).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.DNSName("node-a.example")]


def test_a_client_trusts_only_that_ca_and_only_for_that_host(tmp_path: Path) -> None:
    made = certs.ensure_server_tls(tmp_path / "a", "127.0.0.2")
    _handshake(made, tls.client_context(ca_file=made.ca_file), "127.0.0.2")
    _handshake(made, tls.client_context(ca_pem=made.ca_pem()), "127.0.0.2")
    with pytest.raises(ssl.SSLCertVerificationError, match="IP address mismatch"):
        _handshake(made, tls.client_context(ca_file=made.ca_file), "127.0.0.3")
    other = certs.ensure_server_tls(tmp_path / "b", "127.0.0.2")
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        _handshake(made, tls.client_context(ca_file=other.ca_file), "127.0.0.2")
    with pytest.raises(ssl.SSLCertVerificationError):  # the system's CAs do not know it either
        _handshake(made, ssl.create_default_context(), "127.0.0.2")


def test_the_ca_is_kept_and_the_server_certificate_issued_again_when_needed(tmp_path: Path) -> None:
    directory = tmp_path / "tls"
    first = certs.ensure_server_tls(directory, "127.0.0.2")
    ca, server = first.ca_file.read_bytes(), first.cert_file.read_bytes()
    again = certs.ensure_server_tls(directory, "127.0.0.2")  # a restarted control plane
    assert (again.ca_file.read_bytes(), again.cert_file.read_bytes()) == (ca, server)
    moved = certs.ensure_server_tls(directory, "127.0.0.3")  # another host: same CA, new certificate
    assert moved.ca_file.read_bytes() == ca and moved.cert_file.read_bytes() != server
    _handshake(moved, tls.client_context(ca_pem=first.ca_pem()), "127.0.0.3")  # joined nodes still verify
    renewed = moved.cert_file.read_bytes()
    late = _cert(moved.cert_file).not_valid_after_utc - dt.timedelta(days=10)
    certs.ensure_server_tls(directory, "127.0.0.3", now=late)  # near its end: issued again
    assert moved.cert_file.read_bytes() != renewed and moved.ca_file.read_bytes() == ca


def test_key_files_open_to_others_or_not_keys_are_refused(tmp_path: Path) -> None:
    made = certs.ensure_server_tls(tmp_path / "tls", "127.0.0.2")
    server_cert = made.cert_file.read_bytes()
    os.chmod(made.key_file, 0o644)  # the server's key is replaced (a new one, 0600), the CA's refused
    certs.ensure_server_tls(made.ca_file.parent, "127.0.0.2")
    assert _mode(made.key_file) == 0o600 and made.cert_file.read_bytes() != server_cert
    ca_key = made.ca_file.parent / tls.CA_KEY
    os.chmod(ca_key, 0o644)
    with pytest.raises(tls.TlsError, match=r"has mode 0644: .*chmod 600"):
        certs.ensure_server_tls(made.ca_file.parent, "127.0.0.2")
    os.chmod(ca_key, 0o600)
    ca_key.write_text("not a key\n")
    with pytest.raises(tls.TlsError, match=r"is not a PEM EC private key: remove .* to make a new CA"):
        certs.ensure_server_tls(made.ca_file.parent, "127.0.0.2")


def test_client_context_refuses_what_is_no_certificate(tmp_path: Path) -> None:
    with pytest.raises(tls.TlsError, match="holds no PEM CA certificate"):
        tls.client_context(ca_pem="hello")
    with pytest.raises(tls.TlsError, match="cannot read the CA certificate"):
        tls.client_context(ca_file=tmp_path / "missing.pem")
    with pytest.raises(ValueError, match="exactly one"):
        tls.client_context()


def test_a_client_given_the_ca_speaks_tls_to_nats(tmp_path: Path) -> None:
    made = certs.ensure_server_tls(tmp_path / "tls", "127.0.0.2")
    options = ClientAuth(tls_ca_file=made.ca_file).nats_options()
    assert isinstance(options["tls"], ssl.SSLContext) and options["tls"].check_hostname
    assert "tls" not in ClientAuth().nats_options()


def test_the_embedded_server_listens_on_the_host_over_tls_and_keeps_the_websocket_on_loopback(
    tmp_path: Path,
) -> None:
    made = certs.ensure_server_tls(tmp_path / "tls", "127.0.0.2")
    server = EmbeddedNats(tmp_path / "run", tls=made, port=4333)
    text = server._render_config()
    assert 'listen: "127.0.0.2:4333"' in text
    assert f'tls {{ cert_file: "{made.cert_file}", key_file: "{made.key_file}", timeout: 5 }}' in text
    assert 'websocket { listen: "127.0.0.1:' in text
    assert server.url == "tls://127.0.0.2:4333"
    assert EmbeddedNats(tmp_path / "plain", port=4333).url == "nats://127.0.0.1:4333"
    assert "tls {" not in EmbeddedNats(tmp_path / "plain", port=4333)._render_config()
    v6 = tls.ServerTls(host="::1", ca_file=made.ca_file, cert_file=made.cert_file, key_file=made.key_file)
    assert EmbeddedNats(tmp_path / "v6", tls=v6, port=4333).url == "tls://[::1]:4333"


def test_the_control_plane_serves_grpc_where_it_listens(tmp_path: Path) -> None:
    config = ControlPlaneConfig(home=tmp_path, listen_host="127.0.0.2", grpc_addr="127.0.0.2:0")
    assert config.listen_host == "127.0.0.2"
    with pytest.raises(ValueError, match=r"weaver serves there too: expected 127.0.0.2:0"):
        ControlPlaneConfig(home=tmp_path, listen_host="127.0.0.2")  # gRPC left on 127.0.0.1
    with pytest.raises(ValueError, match="listen_host is for the embedded server"):
        ControlPlaneConfig(
            home=tmp_path, listen_host="127.0.0.2", grpc_addr="127.0.0.2:0", nats_url="nats://x:4222"
        )
