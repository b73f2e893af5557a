"""In memory: the client side of a ``proxy_protocol = true`` listener.

A :class:`ldapproxy.client.ClientFactory` builds protocols on a listener that trusts the
balancers of 10.0.0.0/24; they are driven with a ``StringTransport`` (plain listeners) or
over ``twisted.test.iosim`` with real OpenSSL on both sides (ldaps, where the PROXY header
and the client's TLS ClientHello arrive in one chunk), on a ``Clock``.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.fakes import FakeSource, result, search_entry, search_request
from support.iotls import LDAPTestClient, TLSFakeTransport
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.protocol import connectionDone
from twisted.internet.ssl import Certificate, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogEvent, LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.test.iosim import IOPump, connectedServerAndClient

from ldapproxy import messages as m
from ldapproxy.client import ClientFactory, ClientProtocol
from ldapproxy.config import LimitsConfig, ListenerConfig, ListenerTLS, ServerTLSConfig
from ldapproxy.hooks import ALLOW, Connection, Plugin, Verdict, deny
from ldapproxy.pki import CertificateAuthority
from ldapproxy.plugin_chain import NO_PLUGINS, PluginChain
from ldapproxy.proxy_protocol import V2_SIGNATURE
from ldapproxy.session import SessionState
from ldapproxy.tls import ServerTLS

HANDSHAKE_TIMEOUT = 5.0
TRUSTED = (ipaddress.ip_network("10.0.0.0/24"),)
#: The load balancer, as the proxy's listener sees it.
BALANCER = ("10.0.0.5", 40000)
#: What a client that bypasses the balancer sends first: an anonymous bind.
LDAP_BIND = bytes.fromhex("300c020101600702010304008000")


# -- PROXY headers --------------------------------------------------------------------------


def v1(src: str, dst: str, sport: int, dport: int) -> bytes:
    """A PROXY v1 line for TCP over IPv4 or IPv6."""
    proto = "TCP6" if ":" in src else "TCP4"
    return f"PROXY {proto} {src} {dst} {sport} {dport}\r\n".encode()


def v2(src: str, dst: str, sport: int, dport: int, tlvs: bytes = b"") -> bytes:
    """A PROXY v2 PROXY-command header for TCP over IPv4 or IPv6."""
    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    fam = 0x11 if a.version == 4 else 0x21
    body = a.packed + b.packed + struct.pack("!HH", sport, dport) + tlvs
    return V2_SIGNATURE + struct.pack("!BBH", 0x21, fam, len(body)) + body


def v2_local() -> bytes:
    """A PROXY v2 LOCAL header, as HAProxy sends on its own health checks."""
    return V2_SIGNATURE + struct.pack("!BBH", 0x20, 0x00, 0)


# -- the plain-transport harness ------------------------------------------------------------


class RecordingTransport(StringTransport):
    """A StringTransport that tells an abort from a close."""

    aborted = False

    def abortConnection(self) -> None:
        self.aborted = True
        super().abortConnection()


class AsyncAccept(Plugin):
    """Decides on connections later, when the test fires the Deferred; records them."""

    name = "async_accept"

    def __init__(self) -> None:
        self.connections: list[Connection] = []
        self.pending: list[defer.Deferred[Verdict]] = []

    def connection_accepted(self, connection: Connection) -> defer.Deferred[Verdict]:
        self.connections.append(connection)
        self.pending.append(defer.Deferred())
        return self.pending[-1]


class Recorder(Plugin):
    """Allows every connection at once and records it."""

    name = "recorder"

    def __init__(self) -> None:
        self.connections: list[Connection] = []

    def connection_accepted(self, connection: Connection) -> Verdict:
        self.connections.append(connection)
        return ALLOW


class Harness:
    """A ClientFactory on a PROXY protocol listener, a fake upstream source and a clock."""

    def __init__(
        self,
        tls: ListenerTLS = ListenerTLS.STARTTLS_OPTIONAL,
        server_tls: ServerTLS | None = None,
        plugins: list[Plugin] | None = None,
    ) -> None:
        self.clock = Clock()
        self.source = FakeSource()
        self.listener = ListenerConfig("lb", "tcp:389", tls, True, TRUSTED)
        chain = PluginChain(plugins, self.clock, 10.0) if plugins else NO_PLUGINS
        self.factory = ClientFactory(
            self.listener,
            LimitsConfig(1 << 20, 900.0, HANDSHAKE_TIMEOUT, 10.0),
            self.clock,
            self.source,
            server_tls,
            chain,
        )

    def connect(
        self, host: str = BALANCER[0], port: int = BALANCER[1]
    ) -> tuple[ClientProtocol, RecordingTransport]:
        """A connection accepted from ``host``:``port``."""
        kind = IPv6Address if ":" in host else IPv4Address
        peer = kind("TCP", host, port)
        protocol = self.factory.buildProtocol(peer)
        transport = RecordingTransport(peerAddress=peer)
        protocol.makeConnection(transport)
        return protocol, transport


def session_of(protocol: ClientProtocol) -> Any:
    """The protocol's session, or None before it started."""
    return getattr(protocol, "session", None)


@pytest.fixture
def logged() -> Iterator[list[LogEvent]]:
    """The log events emitted during the test."""
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def warnings_of(events: list[LogEvent]) -> list[str]:
    """The ldapproxy.client warnings, formatted."""
    return [
        formatEvent(e)
        for e in events
        if e.get("log_namespace") == "ldapproxy.client" and e.get("log_level") is LogLevel.warn
    ]


# -- who may send a header ------------------------------------------------------------------


@pytest.mark.parametrize(
    "host", ["10.0.1.5", "192.0.2.5", "2001:db8::5", "::ffff:10.0.1.5"], ids=str
)
def test_untrusted_peer_is_aborted_before_anything(logged: list[LogEvent], host: str) -> None:
    """A peer outside trusted_proxies is aborted at accept: nothing written, no session,
    no plugin asked, no timer left, and a warning naming the peer and the listener."""
    recorder = Recorder()
    harness = Harness(plugins=[recorder])
    protocol, transport = harness.connect(host)
    assert transport.aborted
    assert transport.value() == b""
    assert session_of(protocol) is None
    assert harness.factory.sessions == set()
    assert recorder.connections == []
    assert harness.clock.getDelayedCalls() == []
    (warning,) = warnings_of(logged)
    assert "connection refused on listener lb" in warning
    assert host in warning
    assert "trusted_proxies" in warning
    protocol.connectionLost(Failure(connectionDone))
    assert harness.source.requests == []


def test_ipv4_mapped_peer_of_a_dual_stack_listener_is_trusted() -> None:
    """A dual-stack listener reports the balancer as ::ffff:10.0.0.5; the 10.0.0.0/24 rule
    trusts it, and its LOCAL header gives the session the plain IPv4 address."""
    harness = Harness()
    protocol, transport = harness.connect("::ffff:10.0.0.5", 40001)
    assert not transport.aborted
    protocol.dataReceived(v2_local())
    assert not transport.aborted
    assert session_of(protocol).peer == "10.0.0.5:40001"


# -- the header -----------------------------------------------------------------------------


def test_v1_header_source_becomes_the_session_peer() -> None:
    """After a v1 header from a trusted balancer, the session's peer is the header's
    source address and port, and plugins see that address."""
    recorder = Recorder()
    harness = Harness(plugins=[recorder])
    protocol, transport = harness.connect()
    assert session_of(protocol) is None
    protocol.dataReceived(v1("192.0.2.77", "10.0.0.20", 51234, 389))
    session = protocol.session
    assert session.peer == "192.0.2.77:51234"
    assert (session.client_host, session.client_port) == ("192.0.2.77", 51234)
    assert harness.factory.sessions == {session}
    (connection,) = recorder.connections
    assert (connection.client_host, connection.client_port) == ("192.0.2.77", 51234)
    assert not transport.aborted
    assert transport.value() == b""


def test_v2_header_and_ldap_bytes_in_one_chunk() -> None:
    """LDAP bytes that arrive in the same chunk as a v2 header (with TLVs) reach the
    session: the search is forwarded upstream and its answer comes back."""
    harness = Harness()
    protocol, transport = harness.connect()
    search = search_request(2, base=b"ou=people,dc=example,dc=com")
    alpn = b"\x01" + struct.pack("!H", 4) + b"ldap"
    protocol.dataReceived(v2("198.51.100.9", "10.0.0.20", 6000, 389, alpn) + search)
    assert protocol.session.peer == "198.51.100.9:6000"
    upstream = harness.source.succeed()
    assert upstream.sent == [search]
    upstream.deliver(search_entry(2), result(2, m.SEARCH_RESULT_DONE))
    assert transport.value() == search_entry(2) + result(2, m.SEARCH_RESULT_DONE)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_header_split_over_many_chunks(version: str) -> None:
    """A header arriving one byte at a time starts the session only when complete; the
    LDAP bytes that follow, also byte by byte, are forwarded whole."""
    harness = Harness()
    protocol, _ = harness.connect()
    header = (v1 if version == "v1" else v2)("203.0.113.4", "10.0.0.20", 7000, 389)
    search = search_request(3)
    data = header + search
    for index in range(len(header) - 1):
        protocol.dataReceived(data[index : index + 1])
        assert session_of(protocol) is None, index
    protocol.dataReceived(data[len(header) - 1 : len(header) + 1])  # header end + 1 byte
    assert protocol.session.peer == "203.0.113.4:7000"
    assert harness.source.requests == []
    for index in range(len(header) + 1, len(data)):
        protocol.dataReceived(data[index : index + 1])
    assert harness.source.succeed().sent == [search]


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (LDAP_BIND, "no PROXY protocol signature"),
        (b"PROXY TCP4 192.0.2.1 10.0.0.20 99999 389\r\n", "source port"),
        (b"PROXY TCP4 192.0.2.1\r\n", "needs 4 fields"),
        (V2_SIGNATURE + b"\x21\x12\x00\x0c" + bytes(12), "UDP"),
        (V2_SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12), "version nibble"),
    ],
    ids=["ldap-bind", "bad-port", "short-v1", "v2-udp", "v2-version"],
)
def test_bad_header_aborts_with_a_warning_naming_the_listener(
    logged: list[LogEvent], data: bytes, reason: str
) -> None:
    """A malformed header (or a client that bypasses the balancer and speaks LDAP at
    once) aborts the connection without a session or a byte written, and the warning
    names the balancer, the listener and the reason."""
    harness = Harness()
    protocol, transport = harness.connect()
    protocol.dataReceived(data)
    assert transport.aborted
    assert transport.value() == b""
    assert session_of(protocol) is None
    assert harness.clock.getDelayedCalls() == []
    (warning,) = warnings_of(logged)
    assert "10.0.0.5:40000: closing on listener lb: bad PROXY header" in warning
    assert reason in warning
    protocol.connectionLost(Failure(connectionDone))
    assert harness.factory.sessions == set()


def test_no_header_within_the_timeout_aborts(logged: list[LogEvent]) -> None:
    """A balancer that sends only part of a header is aborted at limits.tls_handshake_timeout,
    not before, with a warning naming the listener and the limit."""
    harness = Harness()
    protocol, transport = harness.connect()
    protocol.dataReceived(b"PROXY TCP4 192.0.2.1 ")
    harness.clock.advance(HANDSHAKE_TIMEOUT - 0.01)
    assert not transport.aborted
    harness.clock.advance(0.01)
    assert transport.aborted
    assert session_of(protocol) is None
    assert transport.value() == b""
    (warning,) = warnings_of(logged)
    assert "closing on listener lb: no PROXY header within 5 s" in warning
    assert "limits.tls_handshake_timeout" in warning


def test_complete_header_cancels_the_timeout() -> None:
    """Once the header is complete the header timer is gone: the session lives past the
    timeout."""
    harness = Harness()
    protocol, transport = harness.connect()
    protocol.dataReceived(v1("192.0.2.1", "10.0.0.20", 1000, 389))
    # Past the header timeout, before limits.first_request_timeout (10 s).
    harness.clock.advance(HANDSHAKE_TIMEOUT * 1.5)
    assert not transport.aborted
    assert not transport.disconnecting
    assert protocol.session.state is SessionState.PLAINTEXT


def test_connection_lost_before_the_header_cancels_the_timer() -> None:
    """A balancer that disconnects before the header leaves no timer and no session."""
    harness = Harness()
    protocol, _ = harness.connect()
    protocol.dataReceived(V2_SIGNATURE[:5])
    protocol.connectionLost(Failure(connectionDone))
    assert harness.clock.getDelayedCalls() == []
    assert session_of(protocol) is None
    assert harness.factory.sessions == set()


@pytest.mark.parametrize(
    "header",
    [v2_local(), b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff:f::1 ffff:f::2 1 2\r\n"],
    ids=["v2-local", "v1-unknown", "v1-unknown-with-addresses"],
)
def test_local_or_unknown_header_keeps_the_balancer_address(header: bytes) -> None:
    """A LOCAL (v2) or UNKNOWN (v1) header gives the session the balancer's own address,
    and the LDAP bytes after it are served."""
    harness = Harness()
    protocol, _ = harness.connect()
    protocol.dataReceived(header + search_request(2))
    assert protocol.session.peer == "10.0.0.5:40000"
    assert harness.source.succeed().sent == [search_request(2)]


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_ipv4_mapped_source_is_written_as_ipv4(version: str) -> None:
    """A header naming the client as ::ffff:192.0.2.7 gives the session 192.0.2.7, the
    address IPv4 allowlist rules and logs expect."""
    harness = Harness()
    protocol, _ = harness.connect()
    header = (v1 if version == "v1" else v2)("::ffff:192.0.2.7", "::ffff:10.0.0.20", 1234, 389)
    protocol.dataReceived(header)
    assert protocol.session.peer == "192.0.2.7:1234"
    assert protocol.session.client_host == "192.0.2.7"


def test_ipv6_source_is_bracketed_in_the_peer() -> None:
    """An IPv6 client address from the header is kept, written [ip]:port in the peer."""
    harness = Harness()
    protocol, _ = harness.connect()
    protocol.dataReceived(v2("2001:db8::7", "2001:db8::1", 4321, 389))
    assert protocol.session.client_host == "2001:db8::7"
    assert protocol.session.peer == "[2001:db8::7]:4321"


# -- bytes after the header while a plugin decides ------------------------------------------


def test_bytes_after_the_header_wait_for_a_pending_verdict() -> None:
    """With a connection verdict pending, a request that came with the header is held;
    once the plugin allows, it is forwarded (once)."""
    plugin = AsyncAccept()
    harness = Harness(plugins=[plugin])
    protocol, transport = harness.connect()
    protocol.dataReceived(v1("192.0.2.8", "10.0.0.20", 2000, 389) + search_request(2))
    (connection,) = plugin.connections
    assert connection.client_host == "192.0.2.8"
    assert transport.producerState == "paused"
    assert harness.source.requests == []
    plugin.pending[0].callback(ALLOW)
    upstream = harness.source.succeed()
    assert upstream.sent == [search_request(2)]
    assert len(harness.source.requests) == 1
    assert transport.producerState == "producing"


def test_bytes_after_the_header_are_dropped_when_the_verdict_denies() -> None:
    """A request that came with the header of a denied client never reaches the upstream,
    and the connection is closed without a byte written."""
    plugin = AsyncAccept()
    harness = Harness(plugins=[plugin])
    protocol, transport = harness.connect()
    protocol.dataReceived(v1("192.0.2.9", "10.0.0.20", 2000, 389) + search_request(2))
    plugin.pending[0].callback(deny(reason="host"))
    assert transport.disconnecting
    assert transport.value() == b""
    assert harness.source.requests == []


# -- ldaps: the ClientHello in the chunk of the header ---------------------------------------


@pytest.fixture(scope="module")
def server_tls(ca: CertificateAuthority, tmp_path_factory: pytest.TempPathFactory) -> ServerTLS:
    """The proxy's client-facing TLS context, with a certificate for localhost."""
    directory: Path = tmp_path_factory.mktemp("proxy-protocol-tls")
    certificate, key = ca.issue("localhost", dns_names=["localhost"]).write(directory, "server")
    return ServerTLS(ServerTLSConfig(certificate, key, "1.2", ""))


class LdapsThroughBalancer:
    """A TLS client behind a balancer, connected in memory to an ldaps PROXY listener."""

    def __init__(
        self, server_tls: ServerTLS, ca: CertificateAuthority, plugins: list[Plugin] | None = None
    ) -> None:
        self.harness = Harness(ListenerTLS.LDAPS, server_tls, plugins)
        self._ca_pem = ca.certificate_pem
        peer = IPv4Address("TCP", *BALANCER)
        self.clock = self.harness.clock
        self.client: LDAPTestClient
        self.server: ClientProtocol
        self.pump: IOPump
        self.client, self.server, self.pump = connectedServerAndClient(
            lambda: self.harness.factory.buildProtocol(peer),
            LDAPTestClient,
            clientTransportFactory=lambda p: TLSFakeTransport(p, False, self.clock),
            serverTransportFactory=lambda p: TLSFakeTransport(p, True, self.clock),
            greet=False,
            clock=self.clock,
        )
        #: Every chunk the server protocol itself was handed.
        self.chunks: list[bytes] = []
        received = self.server.dataReceived

        def record(data: bytes) -> None:
            self.chunks.append(data)
            received(data)

        self.server.dataReceived = record  # type: ignore[method-assign]

    @property
    def client_transport(self) -> TLSFakeTransport:
        transport = self.client.transport
        assert isinstance(transport, TLSFakeTransport)
        return transport

    def header_and_client_hello(self, header: bytes) -> None:
        """The balancer's header, then at once the client's ClientHello; one pump
        delivers both in a single chunk."""
        self.client_transport.raw_write(header)
        trust = Certificate.loadPEM(self._ca_pem)
        self.client_transport.startTLS(optionsForClientTLS("localhost", trustRoot=trust))
        self.pump.flush()

    def send(self, data: bytes) -> None:
        self.client_transport.write(data)
        self.pump.flush()


def _handshake_and_search(conn: LdapsThroughBalancer, header: bytes) -> None:
    assert conn.client.handshake_done
    session = conn.server.session
    assert session.state is SessionState.SECURE
    assert session.tls_version in ("TLSv1.2", "TLSv1.3")
    # The first chunk held the whole header and the start of the TLS handshake.
    first = conn.chunks[0]
    assert first.startswith(header)
    assert first[len(header)] == 0x16  # a TLS handshake record
    search = search_request(2)
    conn.send(search)
    upstream = conn.harness.source.succeed()
    assert upstream.sent == [search]
    upstream.deliver(result(2, m.SEARCH_RESULT_DONE))
    conn.pump.flush()
    assert [(f.message_id, f.op) for f in conn.client.frames] == [(2, m.SEARCH_RESULT_DONE)]


def test_ldaps_client_hello_in_the_header_chunk_reaches_tls(
    server_tls: ServerTLS, ca: CertificateAuthority
) -> None:
    """On an ldaps listener, a ClientHello in the same chunk as the PROXY header goes to
    the TLS layer: the real handshake completes and a search then works, from the
    header's client address."""
    conn = LdapsThroughBalancer(server_tls, ca)
    header = v2("192.0.2.44", "10.0.0.20", 5555, 636)
    conn.header_and_client_hello(header)
    assert conn.server.session.peer == "192.0.2.44:5555"
    _handshake_and_search(conn, header)


def test_ldaps_client_hello_waits_for_a_pending_verdict(
    server_tls: ServerTLS, ca: CertificateAuthority
) -> None:
    """With a connection plugin that decides later, the ClientHello that came with the
    header waits for the verdict and then goes to the TLS layer, not the LDAP parser."""
    plugin = AsyncAccept()
    conn = LdapsThroughBalancer(server_tls, ca, [plugin])
    header = v1("192.0.2.45", "10.0.0.20", 5556, 636)
    conn.header_and_client_hello(header)
    (connection,) = plugin.connections
    assert connection.client_host == "192.0.2.45"
    assert not conn.client.handshake_done
    assert conn.client.lost is None
    plugin.pending[0].callback(ALLOW)
    conn.pump.flush()
    assert conn.client.lost is None, conn.client.lost
    _handshake_and_search(conn, header)
