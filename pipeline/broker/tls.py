"""TLS material for the secure local broker: a private CA and the certificates it signs.

Generated once per broker directory with the ``cryptography`` package (no ``keytool`` or
``openssl`` run), as PEM files that both sides read directly: the broker through Kafka's PEM
key- and truststores (``ssl.keystore.type=PEM``), Python clients through :mod:`ssl`.

Every certificate is for ``localhost`` and ``127.0.0.1`` (the only addresses a local broker
listens on), so clients verify hostnames as they would against a real cluster.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CertificateFiles", "ensure_ca", "issue"]

_VALID_DAYS = 825


@dataclass(frozen=True, slots=True)
class CertificateFiles:
    """A certificate (chain, PEM) and its unencrypted private key (PEM, mode 0600)."""

    cert: Path
    key: Path
    ca: Path

    @property
    def keystore(self) -> Path:
        """Key and chain in one file: Kafka's PEM keystore."""
        return self.cert.with_suffix(".keystore.pem")


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def ensure_ca(directory: Path, name: str = "pipeline local CA") -> Path:
    """The CA certificate in ``directory`` (``ca.pem``), created on first call."""
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "ca.pem", directory / "ca.key"
    if cert_path.exists() and key_path.exists():
        return cert_path
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=_VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    _write_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path


def issue(directory: Path, common_name: str, *, ca_dir: Path) -> CertificateFiles:
    """A certificate for ``common_name`` (server and client use) signed by the CA in ``ca_dir``.

    Written as ``<common_name>.pem`` / ``.key`` / ``.keystore.pem`` in ``directory``; an existing
    one is kept.
    """
    ca_cert_path = ensure_ca(ca_dir)
    files = CertificateFiles(
        cert=directory / f"{common_name}.pem", key=directory / f"{common_name}.key", ca=ca_cert_path
    )
    if files.cert.exists() and files.key.exists() and files.keystore.exists():
        return files
    ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise TypeError(f"unexpected CA key type in {ca_dir}")
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    san = x509.SubjectAlternativeName(
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=_VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(san, critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    _write_key(files.key, key)
    chain = cert.public_bytes(serialization.Encoding.PEM) + ca_cert_path.read_bytes()
    files.cert.write_bytes(chain)
    _write_key(files.keystore, key)
    with files.keystore.open("ab") as f:
        f.write(chain)
    return files
