"""Throwaway X.509 authorities for the demo and the test suite.

Nothing here is meant for production trust: a :class:`CertificateAuthority` lives in
memory, signs a handful of leaf certificates and is thrown away with the process.
All keys are ECDSA P-256 and all signatures SHA-256, which both OpenSSL and GnuTLS
(Debian's slapd) accept.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CertificateAuthority", "Issued"]

_CA_VALIDITY = timedelta(days=365)
_DEFAULT_BACKDATE = timedelta(hours=1)
_DEFAULT_LIFETIME = timedelta(days=30)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


_PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _key_pem(key: _PrivateKey) -> bytes:
    return key.private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )


def _write_private(path: Path, data: bytes) -> None:
    """Write *data* to *path* so that it is never readable by anyone but the owner."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        # O_CREAT's mode only applies to new files; tighten a pre-existing one too.
        os.fchmod(handle.fileno(), 0o600)
        handle.write(data)


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, both PEM."""

    certificate_pem: bytes
    private_key_pem: bytes

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        """Write ``stem.pem`` and ``stem.key`` (mode 0600) into *directory*.

        Returns ``(certificate_path, key_path)``.
        """
        directory.mkdir(parents=True, exist_ok=True)
        cert_path = directory / f"{stem}.pem"
        key_path = directory / f"{stem}.key"
        cert_path.write_bytes(self.certificate_pem)
        _write_private(key_path, self.private_key_pem)
        return cert_path, key_path


class CertificateAuthority:
    """A self-signed root that issues server and client leaf certificates."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate) -> None:
        self._key = key
        self._certificate = certificate

    @classmethod
    def generate(cls, common_name: str = "ldapproxy throwaway CA") -> CertificateAuthority:
        """Create a fresh root CA with a new key, valid from an hour ago for a year."""
        key = _new_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = datetime.now(UTC)
        public_key = key.public_key()
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _DEFAULT_BACKDATE)
            .not_valid_after(now + _CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
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
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        return cls(key, certificate)

    @property
    def certificate(self) -> x509.Certificate:
        """The CA certificate as a :mod:`cryptography` object."""
        return self._certificate

    @property
    def certificate_pem(self) -> bytes:
        """The CA certificate, PEM-encoded: what clients should trust."""
        return self._certificate.public_bytes(serialization.Encoding.PEM)

    def write_certificate(self, path: Path) -> Path:
        """Write the CA certificate (PEM) to *path* and return *path*."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.certificate_pem)
        return path

    def issue(
        self,
        common_name: str,
        *,
        dns_names: Sequence[str] = (),
        ip_addresses: Sequence[str] = (),
        not_before: datetime | None = None,
        not_after: datetime | None = None,
        server: bool = True,
        client: bool = False,
        key_type: str = "ec",
    ) -> Issued:
        """Sign a new leaf certificate with a fresh key.

        *dns_names* and *ip_addresses* become the subjectAltName. The default validity
        is from an hour ago until 30 days from now; pass *not_after* in the past for an
        expired certificate. *server* and *client* select the extendedKeyUsage.
        *key_type* is ``"ec"`` (ECDSA P-256, the default) or ``"rsa"`` (RSA-2048).
        """
        if not (server or client):
            raise ValueError("a leaf certificate needs server and/or client usage")
        now = datetime.now(UTC)
        end = not_after if not_after is not None else now + _DEFAULT_LIFETIME
        if not_before is not None:
            start = not_before
        else:
            # An expired certificate (not_after in the past) still needs start < end.
            start = min(now - _DEFAULT_BACKDATE, end - _DEFAULT_LIFETIME)
        if start >= end:
            raise ValueError("not_before must be earlier than not_after")

        usages = []
        if server:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        if client:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)

        alt_names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
        alt_names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]

        if key_type == "ec":
            key: _PrivateKey = _new_key()
        elif key_type == "rsa":
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        else:
            raise ValueError(f"key_type must be 'ec' or 'rsa', not {key_type!r}")
        public_key = key.public_key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self._certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=key_type == "rsa",
                    data_encipherment=False,
                    key_agreement=key_type == "ec",
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        if alt_names:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        certificate = builder.sign(self._key, hashes.SHA256())
        return Issued(
            certificate_pem=certificate.public_bytes(serialization.Encoding.PEM),
            private_key_pem=_key_pem(key),
        )
