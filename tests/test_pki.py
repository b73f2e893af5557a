"""Unit tests for the throwaway certificate authority in ldapproxy.pki."""

from __future__ import annotations

import ipaddress
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from OpenSSL import crypto

from ldapproxy.pki import CertificateAuthority, Issued


@pytest.fixture(scope="module")
def authority() -> CertificateAuthority:
    return CertificateAuthority.generate()


@pytest.fixture(scope="module")
def server_cert(authority: CertificateAuthority) -> Issued:
    return authority.issue("localhost", dns_names=["localhost"], ip_addresses=["127.0.0.1", "::1"])


def _verifier(authority: CertificateAuthority, when: datetime | None = None) -> PolicyBuilder:
    store = Store([x509.load_pem_x509_certificate(authority.certificate_pem)])
    return PolicyBuilder().store(store).time(when or datetime.now(UTC))


def test_server_certificate_verifies_against_ca_for_its_names(
    authority: CertificateAuthority, server_cert: Issued
) -> None:
    """A server certificate chains to its CA and validates for its DNS name and IP address."""
    leaf = x509.load_pem_x509_certificate(server_cert.certificate_pem)
    builder = _verifier(authority)
    chain = builder.build_server_verifier(x509.DNSName("localhost")).verify(leaf, [])
    assert len(chain) == 2
    ip_name = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
    builder.build_server_verifier(ip_name).verify(leaf, [])


def test_server_certificate_is_rejected_for_another_hostname(
    authority: CertificateAuthority, server_cert: Issued
) -> None:
    """Verification fails when the requested hostname is not among the SANs."""
    leaf = x509.load_pem_x509_certificate(server_cert.certificate_pem)
    verifier = _verifier(authority).build_server_verifier(x509.DNSName("ldap.example.org"))
    with pytest.raises(VerificationError):
        verifier.verify(leaf, [])


def test_certificate_from_another_ca_is_rejected_by_pyopenssl_store(
    authority: CertificateAuthority, server_cert: Issued
) -> None:
    """pyOpenSSL's X509Store accepts our CA's leaf but refuses one signed by a stranger."""
    store = crypto.X509Store()
    store.add_cert(crypto.load_certificate(crypto.FILETYPE_PEM, authority.certificate_pem))
    ours = crypto.load_certificate(crypto.FILETYPE_PEM, server_cert.certificate_pem)
    crypto.X509StoreContext(store, ours).verify_certificate()

    stranger = CertificateAuthority.generate("some other CA").issue("localhost")
    theirs = crypto.load_certificate(crypto.FILETYPE_PEM, stranger.certificate_pem)
    with pytest.raises(crypto.X509StoreContextError):
        crypto.X509StoreContext(store, theirs).verify_certificate()


def test_leaf_carries_requested_sans_and_usages(server_cert: Issued) -> None:
    """The leaf has the requested SANs, is not a CA, and is marked for server auth only."""
    leaf = x509.load_pem_x509_certificate(server_cert.certificate_pem)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    key = load_pem_private_key(server_cert.private_key_pem, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp256r1"


def test_client_certificate_has_client_auth_usage(authority: CertificateAuthority) -> None:
    """Asking for a client-only certificate yields clientAuth and no serverAuth."""
    issued = authority.issue("alice", server=False, client=True)
    leaf = x509.load_pem_x509_certificate(issued.certificate_pem)
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]


def test_default_validity_is_an_hour_ago_to_thirty_days(server_cert: Issued) -> None:
    """Without explicit dates a leaf is valid from about an hour ago for about 30 days."""
    leaf = x509.load_pem_x509_certificate(server_cert.certificate_pem)
    now = datetime.now(UTC)
    assert timedelta(minutes=55) < now - leaf.not_valid_before_utc < timedelta(minutes=65)
    assert timedelta(days=29) < leaf.not_valid_after_utc - now < timedelta(days=31)


def test_expired_certificate_is_really_expired(authority: CertificateAuthority) -> None:
    """A leaf issued with not_after in the past has expired and fails verification."""
    now = datetime.now(UTC)
    issued = authority.issue(
        "localhost", dns_names=["localhost"], not_after=now - timedelta(days=1)
    )
    leaf = x509.load_pem_x509_certificate(issued.certificate_pem)
    assert leaf.not_valid_before_utc < leaf.not_valid_after_utc < now
    verifier = _verifier(authority, now).build_server_verifier(x509.DNSName("localhost"))
    with pytest.raises(VerificationError):
        verifier.verify(leaf, [])


def test_write_creates_cert_and_owner_only_key(server_cert: Issued, tmp_path: Path) -> None:
    """Issued.write stores stem.pem and stem.key, the key with mode 0600."""
    cert_path, key_path = server_cert.write(tmp_path / "tls", "server")
    assert cert_path == tmp_path / "tls" / "server.pem"
    assert key_path == tmp_path / "tls" / "server.key"
    assert cert_path.read_bytes() == server_cert.certificate_pem
    assert key_path.read_bytes() == server_cert.private_key_pem
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600


def test_write_certificate_round_trips(authority: CertificateAuthority, tmp_path: Path) -> None:
    """The CA certificate written to disk is a self-signed CA with keyCertSign usage."""
    path = authority.write_certificate(tmp_path / "ca.pem")
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    assert cert.issuer == cert.subject
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign


def test_rsa_leaf_has_a_2048_bit_key_and_verifies(authority: CertificateAuthority) -> None:
    """key_type="rsa" issues an RSA-2048 leaf that still verifies against the CA."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    issued = authority.issue("rsa", dns_names=["rsa.example.test"], key_type="rsa")
    key = load_pem_private_key(issued.private_key_pem, password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    assert key.key_size == 2048
    store = crypto.X509Store()
    store.add_cert(crypto.load_certificate(crypto.FILETYPE_PEM, authority.certificate_pem))
    leaf = crypto.load_certificate(crypto.FILETYPE_PEM, issued.certificate_pem)
    crypto.X509StoreContext(store, leaf).verify_certificate()
    with pytest.raises(ValueError, match="key_type"):
        authority.issue("dsa", key_type="dsa")
