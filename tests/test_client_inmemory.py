"""In-memory integration: ClientFactory + Session + real TLS, with no sockets.

The proxy's client side (:class:`ldapproxy.client.ClientFactory` with a real
:class:`ldapproxy.tls.ServerTLS`) talks to a small LDAP test client over
``twisted.test.iosim``.  iosim's own ``FakeTransport.startTLS`` only simulates a
negotiation (it never runs OpenSSL), so :class:`TLSFakeTransport` below replaces it with
what Twisted's TCP transports do: put a real ``TLSMemoryBIOProtocol`` between the
transport and the protocol.  Its write aggregator runs on the test's Clock, which the
IOPump advances, so TLS records flow without a reactor.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
from support.fakes import (
    FakeSource,
    FakeUpstream,
    result,
    search_entry,
    search_request,
    starttls_request,
)
from support.iotls import LDAPTestClient, TLSFakeTransport
from twisted.internet.address import IPv4Address
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.test.iosim import IOPump, connectedServerAndClient

from ldapproxy import messages as m
from ldapproxy.client import ClientFactory, ClientProtocol
from ldapproxy.config import LimitsConfig, ListenerConfig, ListenerTLS, ServerTLSConfig
from ldapproxy.pki import CertificateAuthority
from ldapproxy.pool import Disposition
from ldapproxy.session import SessionState
from ldapproxy.tls import ServerTLS

HANDSHAKE_TIMEOUT = 10.0
IDLE_TIMEOUT = 900.0


class Connection:
    """One proxied client connection in memory, and everything needed to drive it."""

    def __init__(self, tls: ListenerTLS, server_tls: ServerTLS, ca_pem: bytes) -> None:
        self.clock = Clock()
        self.source = FakeSource()
        self._ca_pem = ca_pem
        factory = ClientFactory(
            ListenerConfig("test", "tcp:0", tls),
            LimitsConfig(1 << 20, IDLE_TIMEOUT, HANDSHAKE_TIMEOUT, 10.0),
            self.clock,
            self.source,
            server_tls,
        )
        peer = IPv4Address("TCP", "192.0.2.20", 40000)
        self.client: LDAPTestClient
        self.server: ClientProtocol
        self.pump: IOPump
        self.client, self.server, self.pump = connectedServerAndClient(
            lambda: factory.buildProtocol(peer),
            LDAPTestClient,
            clientTransportFactory=lambda p: TLSFakeTransport(p, False, self.clock),
            serverTransportFactory=lambda p: TLSFakeTransport(p, True, self.clock),
            greet=False,
            clock=self.clock,
        )

    @property
    def client_transport(self) -> TLSFakeTransport:
        transport = self.client.transport
        assert isinstance(transport, TLSFakeTransport)
        return transport

    def send(self, data: bytes) -> None:
        self.client_transport.write(data)
        self.pump.flush()

    def client_start_tls(self) -> None:
        trust = Certificate.loadPEM(self._ca_pem)
        self.client_transport.startTLS(optionsForClientTLS("localhost", trustRoot=trust))
        self.pump.flush()


@pytest.fixture(scope="module")
def server_config(
    ca: CertificateAuthority, tmp_path_factory: pytest.TempPathFactory
) -> ServerTLSConfig:
    """A [tls] configuration with a certificate for localhost."""
    directory: Path = tmp_path_factory.mktemp("inmemory-tls")
    certificate, key = ca.issue("localhost", dns_names=["localhost"]).write(directory, "server")
    return ServerTLSConfig(certificate, key, "1.2", "")


#: pyOpenSSL's warning when a key is loaded as a PKey object (see the test below).
PKEY_DEPRECATION = "Passing pyOpenSSL PKey objects is deprecated"


@pytest.fixture(scope="module")
def server_tls(server_config: ServerTLSConfig) -> ServerTLS:
    """The proxy's client-facing TLS context."""
    with warnings.catch_warnings():
        # Tolerated here so that the protocol flow is still tested;
        # test_server_tls_builds_without_deprecation_warnings pins the warning itself.
        warnings.filterwarnings("ignore", PKEY_DEPRECATION, DeprecationWarning)
        return ServerTLS(server_config)


def test_server_tls_builds_without_deprecation_warnings(server_config: ServerTLSConfig) -> None:
    """Building the client-facing TLS context uses no deprecated pyOpenSSL API."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ServerTLS(server_config)


def connection(tls: ListenerTLS, server_tls: ServerTLS, ca: CertificateAuthority) -> Connection:
    conn = Connection(tls, server_tls, ca.certificate_pem)
    conn.pump.flush()
    return conn


@pytest.mark.parametrize(
    "tls",
    [ListenerTLS.STARTTLS_OPTIONAL, ListenerTLS.STARTTLS_REQUIRED],
    ids=["optional", "required"],
)
def test_starttls_then_request_reaches_upstream_only_over_tls(
    tls: ListenerTLS, server_tls: ServerTLS, ca: CertificateAuthority
) -> None:
    """StartTLS completes a real handshake; the request then reaches the upstream, encrypted."""
    conn = connection(tls, server_tls, ca)
    conn.send(starttls_request(1))
    (response,) = conn.client.frames
    assert (response.message_id, response.op) == (1, m.EXTENDED_RESPONSE)
    assert m.result_code(response.data) == m.SUCCESS
    assert m.extended_response_name(response.data) == m.STARTTLS_OID
    assert conn.server.session.state is SessionState.HANDSHAKE
    plaintext_so_far = bytes(conn.client_transport.wire)

    conn.client_start_tls()
    assert conn.client.handshake_done
    session = conn.server.session
    assert session.state is SessionState.SECURE
    assert session.tls_version in ("TLSv1.2", "TLSv1.3")
    assert conn.source.requests == []

    search = search_request(2, base=b"ou=secret-base,dc=example,dc=com")
    conn.send(search)
    upstream = conn.source.succeed()
    assert upstream.sent == [search]
    # The search crossed the wire inside TLS records, never as plaintext.
    assert bytes(conn.client_transport.wire).startswith(plaintext_so_far)
    assert b"secret-base" not in conn.client_transport.wire
    assert conn.client_transport.wire[len(plaintext_so_far)] == 0x16  # TLS handshake record

    upstream.deliver(search_entry(2), result(2, m.SEARCH_RESULT_DONE))
    conn.pump.flush()
    assert [(f.message_id, f.op) for f in conn.client.frames[1:]] == [
        (2, m.SEARCH_RESULT_ENTRY),
        (2, m.SEARCH_RESULT_DONE),
    ]
    assert session.outstanding == 0


def test_starttls_required_refuses_a_plaintext_request_over_the_wire(
    server_tls: ServerTLS, ca: CertificateAuthority
) -> None:
    """Before StartTLS a search is answered confidentialityRequired and never forwarded."""
    conn = connection(ListenerTLS.STARTTLS_REQUIRED, server_tls, ca)
    conn.send(search_request(2))
    (response,) = conn.client.frames
    assert (response.message_id, response.op) == (2, m.SEARCH_RESULT_DONE)
    assert m.result_code(response.data) == m.CONFIDENTIALITY_REQUIRED
    assert conn.source.requests == []
    assert conn.client.lost is None


def test_request_injected_behind_starttls_aborts_before_any_tls(
    server_tls: ServerTLS, ca: CertificateAuthority
) -> None:
    """A request in the same write as StartTLS kills the connection with no response."""
    conn = connection(ListenerTLS.STARTTLS_OPTIONAL, server_tls, ca)
    conn.send(starttls_request(1) + search_request(2))
    assert conn.client.frames == []
    assert conn.client.lost is not None
    assert conn.source.requests == []
    assert conn.server.session.state is SessionState.CLOSED


def test_plaintext_request_after_the_starttls_response_never_reaches_the_upstream(
    server_tls: ServerTLS, ca: CertificateAuthority
) -> None:
    """Plaintext sent after StartTLS succeeded is fed to TLS, fails it, and goes nowhere."""
    conn = connection(ListenerTLS.STARTTLS_OPTIONAL, server_tls, ca)
    conn.send(starttls_request(1))
    assert m.result_code(conn.client.frames[0].data) == m.SUCCESS
    conn.send(search_request(2))
    assert conn.client.lost is not None
    assert conn.server.session.state is SessionState.CLOSED
    assert conn.source.requests == []


def test_ldaps_listener_runs_tls_from_the_first_byte(
    server_tls: ServerTLS, ca: CertificateAuthority
) -> None:
    """On an ldaps listener the handshake comes first, then requests are forwarded."""
    conn = Connection(ListenerTLS.LDAPS, server_tls, ca.certificate_pem)
    assert conn.server.session.state is SessionState.HANDSHAKE
    conn.client_start_tls()
    assert conn.client.handshake_done
    assert conn.server.session.state is SessionState.SECURE
    assert conn.client_transport.wire[0] == 0x16  # the first byte is a TLS handshake record
    conn.send(search_request(3))
    upstream = conn.source.succeed()
    assert upstream.sent == [search_request(3)]
    upstream.deliver(result(3, m.SEARCH_RESULT_DONE))
    conn.pump.flush()
    assert [(f.message_id, f.op) for f in conn.client.frames] == [(3, m.SEARCH_RESULT_DONE)]
    # Unbind, then close as clients do: the upstream, with nothing in flight, is released.
    conn.client_transport.write(m.unbind_request(4))
    conn.client_transport.loseConnection()
    conn.pump.flush()
    assert conn.client.lost is not None
    assert conn.server.session.state is SessionState.CLOSED
    assert upstream.sent == [search_request(3)]
    assert conn.source.released == [(upstream, Disposition.REUSE)]


def _upstream_lost(conn: Connection, upstream: FakeUpstream) -> None:
    upstream.lose()


def _idle_timeout(conn: Connection, upstream: FakeUpstream) -> None:
    conn.clock.advance(IDLE_TIMEOUT)


def _protocol_error(conn: Connection, upstream: FakeUpstream) -> None:
    conn.client_transport.write(m.unbind_request(0))


@pytest.mark.parametrize(
    "trigger",
    [_upstream_lost, _idle_timeout, _protocol_error],
    ids=["upstream-lost", "idle-timeout", "protocol-error"],
)
def test_proxy_initiated_close_over_tls_disconnects_the_client(
    trigger: Any, server_tls: ServerTLS, ca: CertificateAuthority
) -> None:
    """When the proxy ends a TLS session holding an upstream, the connection really closes."""
    conn = Connection(ListenerTLS.LDAPS, server_tls, ca.certificate_pem)
    conn.client_start_tls()
    conn.send(search_request(3))
    upstream = conn.source.succeed()
    upstream.deliver(result(3, m.SEARCH_RESULT_DONE))
    conn.pump.flush()
    trigger(conn, upstream)
    conn.pump.flush()
    notice = conn.client.frames[-1]
    assert (notice.message_id, notice.op) == (0, m.EXTENDED_RESPONSE)
    assert m.extended_response_name(notice.data) == m.NOTICE_OF_DISCONNECTION_OID
    # The client has not closed its side; the proxy must not wait for it to.
    assert conn.client.lost is not None
    assert conn.server.session.state is SessionState.CLOSED


def test_ldaps_client_that_never_handshakes_is_dropped(
    server_tls: ServerTLS, ca: CertificateAuthority
) -> None:
    """A connection to an ldaps listener without a TLS handshake is aborted on time."""
    conn = connection(ListenerTLS.LDAPS, server_tls, ca)
    conn.clock.advance(HANDSHAKE_TIMEOUT - 0.5)
    conn.pump.flush()
    assert conn.client.lost is None
    conn.clock.advance(0.5)
    conn.pump.flush()
    assert conn.client.lost is not None
    assert conn.server.session.state is SessionState.CLOSED


def test_proxy_initiated_close_over_tls_without_an_upstream_disconnects_the_client(
    server_tls: ServerTLS, ca: CertificateAuthority
) -> None:
    """A protocol error on a TLS session that never had an upstream closes the connection."""
    conn = Connection(ListenerTLS.LDAPS, server_tls, ca.certificate_pem)
    conn.client_start_tls()
    conn.send(m.unbind_request(0))
    notice = conn.client.frames[-1]
    assert m.result_code(notice.data) == m.PROTOCOL_ERROR
    assert conn.client.lost is not None
    assert conn.server.session.state is SessionState.CLOSED
