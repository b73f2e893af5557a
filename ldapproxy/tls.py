"""TLS policy: the context the proxy serves to clients, and verified upstream connections.

Contexts are built with pyOpenSSL directly, so the policy is explicit: TLS 1.2 or later,
forward-secret AEAD ciphers for TLS 1.2, no compression, no renegotiation.  A context is
never mutated once built; a reload builds a new one.

Upstream connections are verified against the configured CA (or the system store) and
the expected host name (with service-identity).  A failed verification is kept as a short
reason (expired, unknown CA, hostname mismatch...) for the one log line that reports it.
"""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from service_identity import CertificateError, VerificationError
from service_identity.hazmat import DNS_ID, IPAddress_ID, verify_service_identity
from service_identity.pyopenssl import extract_patterns
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.protocols.tls import TLSMemoryBIOProtocol
from zope.interface import implementer

from ldapproxy.config import ServerTLSConfig, UpstreamConfig

#: Secure default for TLS 1.2 (TLS 1.3 suites are fixed by OpenSSL and all strong).
DEFAULT_CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)

_MIN_VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}

_OPTIONS = (
    SSL.OP_NO_COMPRESSION
    | getattr(SSL, "OP_NO_RENEGOTIATION", 0)
    | SSL.OP_CIPHER_SERVER_PREFERENCE
    | SSL.OP_NO_SSLv2
    | SSL.OP_NO_SSLv3
    | SSL.OP_NO_TLSv1
    | SSL.OP_NO_TLSv1_1
)


class TLSSetupError(Exception):
    """A certificate, key or CA file cannot be used; ``str(error)`` is one line."""


def _base_context(min_version: str, ciphers: str) -> SSL.Context:
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(_MIN_VERSIONS[min_version])
    context.set_options(_OPTIONS)
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    try:
        context.set_cipher_list((ciphers or DEFAULT_CIPHERS).encode("ascii"))
    except (SSL.Error, UnicodeEncodeError):
        raise TLSSetupError(
            f"[tls] ciphers = {ciphers!r}: no usable cipher in that OpenSSL cipher string"
        ) from None
    return context


def _load_pair(
    context: SSL.Context, certificate: Path, key: Path, cert_setting: str, key_setting: str
) -> None:
    """Load a certificate chain and its key into ``context``; errors name the setting."""
    contents = {}
    for setting, path in ((cert_setting, certificate), (key_setting, key)):
        try:
            contents[setting] = path.read_bytes()
        except OSError as error:
            raise TLSSetupError(f"{setting} = '{path}': cannot read: {error.strerror}") from None
    try:
        context.use_certificate_chain_file(str(certificate))
    except SSL.Error:
        raise TLSSetupError(
            f"{cert_setting} = '{certificate}': not a PEM certificate chain"
        ) from None
    try:
        private_key = serialization.load_pem_private_key(contents[key_setting], password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise TLSSetupError(
            f"{key_setting} = '{key}': not a PEM private key (or it is encrypted)"
        ) from None
    try:
        # pyOpenSSL 26 takes cryptography keys (its PKey is deprecated); the stubs lag.
        context.use_privatekey(private_key)  # type: ignore[arg-type]
        context.check_privatekey()
    except SSL.Error:
        raise TLSSetupError(
            f"{key_setting} = '{key}' does not match {cert_setting} = '{certificate}'"
        ) from None


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """The TLS context the proxy presents to clients on ldaps and StartTLS listeners."""

    def __init__(self, config: ServerTLSConfig) -> None:
        if config.certificate is None or config.private_key is None:
            raise TLSSetupError("[tls] certificate and private_key are required")
        context = _base_context(config.min_version, config.ciphers)
        _load_pair(
            context,
            config.certificate,
            config.private_key,
            "[tls] certificate",
            "[tls] private_key",
        )
        context.set_session_id(b"ldapproxy")
        self._context = context
        self.certificate = crypto.load_certificate(
            crypto.FILETYPE_PEM, config.certificate.read_bytes()
        )
        summary = PeerCertificate.from_x509(self.certificate)
        #: ``(subject, notAfter as a timestamp)`` of the served certificate, for metrics.
        self.expiry = (summary.subject, summary.not_after.timestamp())

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        return SSL.Connection(self._context, None)


@dataclass(frozen=True)
class PeerCertificate:
    """What ``check --connect`` and the logs say about an upstream's certificate."""

    subject: str
    issuer: str
    sans: tuple[str, ...]
    not_after: datetime.datetime

    @classmethod
    def from_x509(cls, cert: crypto.X509) -> PeerCertificate:
        """Summarise a pyOpenSSL certificate."""
        c = cert.to_cryptography()
        from cryptography import x509

        try:
            san = c.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            sans = tuple(
                [f"DNS:{n}" for n in san.get_values_for_type(x509.DNSName)]
                + [f"IP:{n}" for n in san.get_values_for_type(x509.IPAddress)]
            )
        except x509.ExtensionNotFound:
            sans = ()
        return cls(
            c.subject.rfc4514_string(), c.issuer.rfc4514_string(), sans, c.not_valid_after_utc
        )


# OpenSSL X509_V_ERR_* codes worth naming in an operator's log.
_VERIFY_REASONS = {
    2: "unknown CA (unable to get issuer certificate)",
    9: "certificate not yet valid",
    10: "certificate expired",
    18: "unknown CA (self-signed certificate)",
    19: "unknown CA (self-signed certificate in chain)",
    20: "unknown CA (unable to get local issuer certificate)",
    21: "unknown CA (unable to verify the first certificate)",
    23: "certificate revoked",
    26: "certificate not valid for TLS server use",
}


class UpstreamTLS:
    """Verified client-side TLS for connections to the upstream directories.

    One context is shared by all connections; :meth:`creator` makes the per-connection
    object that Twisted's TLS layer uses, which also records why verification failed.
    """

    def __init__(self, config: UpstreamConfig) -> None:
        context = _base_context("1.2", "")
        if config.ca_file is not None:
            try:
                config.ca_file.read_bytes()
                context.load_verify_locations(str(config.ca_file))
            except OSError as error:
                raise TLSSetupError(
                    f"[upstream] ca_file = '{config.ca_file}': cannot read: {error.strerror}"
                ) from None
            except SSL.Error:
                raise TLSSetupError(
                    f"[upstream] ca_file = '{config.ca_file}': no PEM certificates in it"
                ) from None
        else:
            context.set_default_verify_paths()
        if config.client_certificate is not None and config.client_key is not None:
            _load_pair(
                context,
                config.client_certificate,
                config.client_key,
                "[upstream] client_certificate",
                "[upstream] client_key",
            )
        self._context = context
        self._server_name = config.tls_server_name
        #: subject -> notAfter (a timestamp) of every upstream leaf certificate seen, for
        #: the certificate expiry metric.  As many entries as the upstreams have subjects.
        self.seen: dict[str, float] = {}

    def creator(self, host: str) -> UpstreamVerifier:
        """A connection creator that verifies the upstream at ``host``."""
        return UpstreamVerifier(self._context, self._server_name or host, self._saw)

    def _saw(self, cert: crypto.X509) -> None:
        summary = PeerCertificate.from_x509(cert)
        self.seen[summary.subject] = summary.not_after.timestamp()


@implementer(IOpenSSLClientConnectionCreator)
class UpstreamVerifier:
    """Creates one upstream TLS connection and remembers its verification verdict."""

    def __init__(
        self,
        context: SSL.Context,
        expected_name: str,
        on_leaf: Callable[[crypto.X509], None] | None = None,
    ) -> None:
        self._context = context
        self.expected_name = expected_name
        self._on_leaf = on_leaf
        try:
            ipaddress.ip_address(expected_name)
        except ValueError:
            self._is_ip = False
            self._service_id: DNS_ID | IPAddress_ID = DNS_ID(expected_name)
        else:
            self._is_ip = True
            self._service_id = IPAddress_ID(expected_name)
        #: Why verification failed, or None while it has not.
        self.failure: str | None = None
        #: The upstream's leaf certificate, once seen (also when verification fails).
        self.leaf: crypto.X509 | None = None

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        if not self._is_ip:
            connection.set_tlsext_host_name(self.expected_name.encode("idna"))
        connection.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, self._verify)
        return connection

    def _verify(
        self, connection: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: Any
    ) -> bool:
        # Exceptions raised in an OpenSSL callback get lost; this must not raise.
        if depth == 0:
            self.leaf = cert
            if self._on_leaf is not None:
                try:
                    self._on_leaf(cert)
                except Exception:  # only for metrics: never a reason to fail the handshake
                    self._on_leaf = None
        if not ok and self.failure is None:
            self.failure = _VERIFY_REASONS.get(
                errno, f"certificate verification failed (X509 error {errno})"
            )
        if depth != 0:
            # Walk on to the leaf even past a failure, so the leaf is seen and reported;
            # the verdict is given at depth 0 (and checked again when the handshake ends).
            return True
        if self.failure is not None:
            return False
        try:
            verify_service_identity(extract_patterns(cert), [self._service_id], [])
        except (VerificationError, CertificateError):
            self.failure = (
                f"hostname mismatch: certificate is not valid for {self.expected_name!r} "
                f"(it names {_names_in(cert)})"
            )
            return False
        except Exception as error:
            self.failure = f"certificate check failed: {error}"
            return False
        return True


def _names_in(cert: crypto.X509) -> str:
    """The subjectAltNames of ``cert`` for a log line; never raises."""
    try:
        return ", ".join(PeerCertificate.from_x509(cert).sans) or "no subjectAltName"
    except Exception:
        return "unreadable subjectAltName"
