"""The private CA and server certificate of a control plane listening off loopback (`torchloom run
--listen HOST`): made with `cryptography` (no openssl command), kept under the control plane's
secrets directory (0700; every file 0600), and reused across its restarts so nodes that joined keep
verifying it. The client side is torchloom/tls.py.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from torchloom.private_files import private_dir, read_private, write_private
from torchloom.tls import CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY, ServerTls, TlsError, ip_of

# The CA signs only this home's server certificates; it lives as long as the nodes that joined may
# keep its certificate (a new CA means every node needs a new join file).
CA_VALIDITY = dt.timedelta(days=3650)
SERVER_VALIDITY = dt.timedelta(days=365)
RENEW_BEFORE = dt.timedelta(days=30)  # a certificate closer than this to its end is issued again
BACKDATE = dt.timedelta(minutes=5)  # another node's clock a little behind still accepts a fresh one


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def _cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def load_ca_pem(pem: str | bytes, *, what: str = "CA certificate") -> x509.Certificate:
    """Parse a PEM CA certificate (basic constraints CA:true).

    Raises:
        TlsError: it is not one; the message names `what`.
    """
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        cert = x509.load_pem_x509_certificate(data)
        ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except (ValueError, x509.ExtensionNotFound):
        ca = False
    if not ca:
        raise TlsError(f"{what} is not a PEM X.509 CA certificate (-----BEGIN CERTIFICATE-----, CA:true)")
    return cert


def _key_usage(**allowed: bool) -> x509.KeyUsage:
    """A key usage extension allowing exactly the usages named (every other one off)."""
    names = (
        *("digital_signature", "content_commitment", "key_encipherment", "data_encipherment"),
        *("key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"),
    )
    return x509.KeyUsage(**{name: allowed.get(name, False) for name in names})


def _new_ca(now: dt.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    serial = x509.random_serial_number()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "torchloom"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"torchloom control plane CA {serial:x}"[:64]),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _san(host: str) -> x509.GeneralName:
    ip = ip_of(host)
    return x509.IPAddress(ip) if ip is not None else x509.DNSName(host)


def _new_server(
    host: str, ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate, now: dt.datetime
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host[:64])]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(min(now + SERVER_VALIDITY, ca.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName([_san(host)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _read_key(path: Path) -> ec.EllipticCurvePrivateKey:
    text = read_private(path, "TLS private key", error=TlsError)
    try:
        key = serialization.load_pem_private_key(text.encode(), password=None)
    except ValueError:
        key = None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise TlsError(
            f"TLS private key {path} is not a PEM EC private key: remove {path.parent} to make a new CA "
            "(nodes that joined then need a new join file)"
        )
    return key


def _fresh(cert: x509.Certificate, now: dt.datetime) -> bool:
    return cert.not_valid_before_utc <= now and now + RENEW_BEFORE < cert.not_valid_after_utc


def _load_ca(directory: Path, now: dt.datetime) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None:
    cert_file, key_file = directory / CA_CERT, directory / CA_KEY
    if not cert_file.exists() or not key_file.exists():
        return None
    key = _read_key(key_file)
    cert = load_ca_pem(
        read_private(cert_file, "CA certificate", error=TlsError), what=f"CA certificate {cert_file}"
    )
    if cert.public_key() != key.public_key():
        raise TlsError(
            f"CA certificate {cert_file} is not of the key {key_file}: remove {directory} to make a new CA "
            "(nodes that joined then need a new join file)"
        )
    return (key, cert) if _fresh(cert, now) else None


def _server_ok(directory: Path, host: str, ca: x509.Certificate, now: dt.datetime) -> bool:
    """Whether the server certificate there names `host`, is signed by `ca` and is not near its end."""
    cert_file, key_file = directory / SERVER_CERT, directory / SERVER_KEY
    if not cert_file.exists() or not key_file.exists():
        return False
    try:
        cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        cert.verify_directly_issued_by(ca)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        key = _read_key(key_file)  # one that is not a key, or open to others, is simply replaced
    except (ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):  # TlsError is a ValueError
        return False
    return list(names) == [_san(host)] and _fresh(cert, now) and cert.public_key() == key.public_key()


def ensure_server_tls(directory: Path, host: str, *, now: dt.datetime | None = None) -> ServerTls:
    """The CA and a server certificate for `host` under `directory` (0700; every file 0600), made when
    missing: the CA once per control plane home (kept, so nodes that joined keep verifying a restarted
    control plane), the server certificate again when it names another host, is not the CA's, or
    ends within RENEW_BEFORE.

    Raises:
        TlsError: a key or CA file there is not usable (the message says what to remove).
    """
    current = now or _now()
    private_dir(directory)
    loaded = _load_ca(directory, current)
    if loaded is None:
        ca_key, ca = _new_ca(current)
        write_private(directory / CA_KEY, _key_pem(ca_key))
        write_private(directory / CA_CERT, _cert_pem(ca))
    else:
        ca_key, ca = loaded
    if not _server_ok(directory, host, ca, current):
        key, cert = _new_server(host, ca_key, ca, current)
        write_private(directory / SERVER_KEY, _key_pem(key))
        write_private(directory / SERVER_CERT, _cert_pem(cert))
    return ServerTls(
        host=host,
        ca_file=directory / CA_CERT,
        cert_file=directory / SERVER_CERT,
        key_file=directory / SERVER_KEY,
    )
