"""The upstream verifier's decisions, driven directly with the arguments OpenSSL passes."""

from __future__ import annotations

import pytest
from OpenSSL import SSL, crypto

from ldapproxy.pki import CertificateAuthority
from ldapproxy.tls import UpstreamVerifier


def x509(issued_pem: bytes) -> crypto.X509:
    return crypto.load_certificate(crypto.FILETYPE_PEM, issued_pem)


@pytest.fixture(scope="module")
def leaf() -> crypto.X509:
    ca = CertificateAuthority.generate("verifier test CA")
    return x509(
        ca.issue("dc1", dns_names=["dc1.example.test"], ip_addresses=["192.0.2.1"]).certificate_pem
    )


def verifier(name: str) -> UpstreamVerifier:
    return UpstreamVerifier(SSL.Context(SSL.TLS_METHOD), name)


# (expected name, [(depth, ok, errno)], final verdict, failure text or None)
CASES = [
    ("dc1.example.test", [(1, True, 0), (0, True, 0)], True, None),
    ("192.0.2.1", [(1, True, 0), (0, True, 0)], True, None),
    ("dc2.example.test", [(1, True, 0), (0, True, 0)], False, "hostname mismatch"),
    ("192.0.2.9", [(1, True, 0), (0, True, 0)], False, "hostname mismatch"),
    ("dc1.example.test", [(1, False, 19), (0, True, 0)], False, "unknown CA"),
    ("dc1.example.test", [(0, False, 20)], False, "unknown CA"),
    ("dc1.example.test", [(1, True, 0), (0, False, 10)], False, "certificate expired"),
    ("dc1.example.test", [(1, True, 0), (0, False, 9)], False, "not yet valid"),
    ("dc1.example.test", [(1, True, 0), (0, False, 99)], False, "X509 error 99"),
]


@pytest.mark.parametrize(("name", "calls", "verdict", "failure"), CASES)
def test_verifier_verdicts(leaf: crypto.X509, name: str, calls, verdict: bool, failure) -> None:
    """The leaf's verdict accounts for chain errors, expiry and the expected name."""
    v = verifier(name)
    results = [v._verify(None, leaf, errno, depth, ok) for depth, ok, errno in calls]  # type: ignore[arg-type]
    assert results[-1] is verdict
    assert all(results[:-1]), "the walk continues to the leaf so it can be reported"
    assert v.leaf is leaf
    if failure is None:
        assert v.failure is None
    else:
        assert failure in (v.failure or "")


def test_chain_error_is_not_forgotten_by_a_good_leaf(leaf: crypto.X509) -> None:
    """A failure above the leaf makes the leaf fail too, even when its own check passes."""
    v = verifier("dc1.example.test")
    assert v._verify(None, leaf, 19, 1, False) is True  # type: ignore[arg-type]
    assert v._verify(None, leaf, 0, 0, True) is False  # type: ignore[arg-type]
