"""The daemon's own certificate authority: TLS for the agent channel and the TCP control API.

On first start the daemon creates a CA (an EC P-256 key that never leaves <state_dir>/tls, mode
600) and issues itself a server certificate for the names agents and clients dial. Agents are
given the CA certificate at bootstrap and trust nothing else (the CA is pinned), so neither a
network attacker nor a public CA can stand in for the daemon. The server certificate is issued
again when the names change or when it is within RENEW_BEFORE of expiry; the CA lasts ten years.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cloudtaskd.errors import CloudtaskError

CA_VALIDITY = dt.timedelta(days=3650)
SERVER_VALIDITY = dt.timedelta(days=397)
RENEW_BEFORE = dt.timedelta(days=30)
# Certificates are valid from this long before they are made: a machine whose clock is behind (a VM
# booted before its NTP sync, a clock stepped back) must still accept them, and agents keep working
# under such a clock. Nothing is given away: the key did not exist before.
BACKDATE = dt.timedelta(days=1)
# Names the server certificate always carries: agents of the local provider dial these.
ALWAYS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True, slots=True)
class TlsFiles:
    ca_cert: Path  # what agents and clients pin
    cert: Path  # the daemon's server certificate (chain: itself, then the CA)
    key: Path

    def server_context(self) -> ssl.SSLContext:
        return server_context(self.cert, self.key)


# asyncio's TLS layer (3.11+) gives every connection a zero-filled 256 KiB read buffer: 500 MiB
# resident for 2,000 agents (benchmarks/scale.py). Agent frames are small; 32 KiB per read costs
# a few more reads for a rare multi-MiB frame, and nothing else (the buffer is only what one
# recv_into may fill; TLS records are at most 16 KiB).
SSL_READ_BUFFER_BYTES = 32 * 1024


def _trim_ssl_read_buffer() -> None:
    from asyncio import sslproto

    proto = getattr(sslproto, "SSLProtocol", None)
    if proto is not None and getattr(proto, "max_size", 0) > SSL_READ_BUFFER_BYTES:
        proto.max_size = SSL_READ_BUFFER_BYTES


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    _trim_ssl_read_buffer()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


def ensure(tls_dir: Path, names: Iterable[str], *, label: str = "") -> TlsFiles:
    """The CA and a current server certificate for `names` (plus ALWAYS), created as needed."""
    tls_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    files = TlsFiles(tls_dir / "ca.pem", tls_dir / "server.pem", tls_dir / "server.key")
    ca_key_path = tls_dir / "ca.key"
    if ca_key_path.exists() != files.ca_cert.exists():
        # Half a CA: making a new one would silently cut off every agent that pinned the old.
        present, missing = (ca_key_path, files.ca_cert) if ca_key_path.exists() else (files.ca_cert, ca_key_path)
        raise CloudtaskError(f"{missing} is missing but {present} exists: restore it, or delete {tls_dir} to make"
                             " a new CA (agents of running instances then no longer trust the daemon)")
    if not ca_key_path.exists():
        _new_ca(ca_key_path, files.ca_cert, label)
    ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_cert = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    wanted = _sans(names)
    if not _current(files.cert, ca_cert, wanted):
        _issue(files, ca_key, ca_cert, wanted)
    return files


def ca_fingerprint(ca_cert: Path) -> str:
    """The SHA-256 of the CA certificate's DER, in hex: what tells one CA from another (replicas
    must share one, core/pg/shared_identity.py). The same as `openssl x509 -in ca.pem -outform DER | sha256sum`."""
    cert = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    return cert.fingerprint(hashes.SHA256()).hex()


def _sans(names: Iterable[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    seen: set[str] = set()
    for name in (*ALWAYS, *names):
        name = name.strip().strip("[]")
        if not name or name in ("0.0.0.0", "::") or name in seen:
            continue  # a wildcard listen address is not a name anyone dials
        seen.add(name)
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_private(path: Path, data: bytes) -> None:
    """Written to a temporary file created mode 600, then renamed: never readable by others."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.unlink(missing_ok=True)  # a leftover would keep its own mode
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _new_ca(key_path: Path, cert_path: Path, label: str) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"cloudtask CA {label}".strip())])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE).not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    try:
        _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    except BaseException:
        # No agent can trust a CA whose certificate was never written: take the key back, or every
        # later start would refuse the half CA (a full disk at the first start left one).
        key_path.unlink(missing_ok=True)
        cert_path.with_suffix(cert_path.suffix + ".tmp").unlink(missing_ok=True)
        raise


def _current(cert_path: Path, ca_cert: x509.Certificate, wanted: list[x509.GeneralName]) -> bool:
    """The server certificate exists, was issued by this CA, has these names and is not near expiry."""
    try:
        cert = x509.load_pem_x509_certificates(cert_path.read_bytes())[0]
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return False
    if cert.issuer != ca_cert.subject or cert.not_valid_after_utc - RENEW_BEFORE < _now():
        return False
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (InvalidSignature, ValueError, TypeError):  # a CA made again since
        return False
    return {str(n.value) for n in sans} == {str(n.value) for n in wanted}


def _issue(files: TlsFiles, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate,
           sans: list[x509.GeneralName]) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "cloudtaskd")]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE).not_valid_after(now + SERVER_VALIDITY)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(files.key, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    pem = cert.public_bytes(serialization.Encoding.PEM) + ca_cert.public_bytes(serialization.Encoding.PEM)
    _write_public(files.cert, pem)
