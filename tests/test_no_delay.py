"""Both sides of the proxy turn Nagle's algorithm off: LDAP is request and response, and a
small response held back for the peer's delayed ACK costs tens of milliseconds (the bench
measured p99 44 ms with one operation at a time before this)."""

from __future__ import annotations

from typing import Any

from support.fakes import FakeSource
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from ldapproxy.client import ClientFactory
from ldapproxy.config import LimitsConfig, ListenerConfig, ListenerTLS, UpstreamURL
from ldapproxy.upstream import UpstreamProtocol


class TCPTransport(StringTransport):
    """A StringTransport that records setTcpNoDelay, as a TCP transport has it."""

    def __init__(self) -> None:
        super().__init__()
        self.no_delay: list[bool] = []

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay.append(enabled)


def test_client_connections_set_tcp_nodelay() -> None:
    """An accepted client connection gets TCP_NODELAY before anything else happens."""
    factory = ClientFactory(
        ListenerConfig("ldap", "tcp:389", ListenerTLS.NONE),
        LimitsConfig(1 << 20, 900.0, 10.0, 10.0),
        Clock(),
        FakeSource(),
        None,
    )
    transport = TCPTransport()
    factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 40000)).makeConnection(transport)
    assert transport.no_delay == [True]


def test_upstream_connections_set_tcp_nodelay() -> None:
    """A connection to the directory gets TCP_NODELAY before StartTLS is sent."""
    verifier: Any = None  # not reached: an ldap:// URL starts with the StartTLS request
    protocol = UpstreamProtocol(UpstreamURL("ldap", "dc1.example.com", 389), verifier, Clock())
    transport = TCPTransport()
    protocol.makeConnection(transport)
    assert transport.no_delay == [True]
    assert transport.value(), "the StartTLS request follows"
