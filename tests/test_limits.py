"""limits.max_connections and limits.max_connections_per_ip: ConnectionLimiter on its own,
and through ClientFactory (refused connections get no protocol, so Twisted closes them
before a byte is read or written), also behind the PROXY protocol."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from typing import Any

import pytest
from support.fakes import FakeSource
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from ldapproxy.client import ClientFactory, ClientProtocol
from ldapproxy.config import LimitsConfig, ListenerConfig, ListenerTLS
from ldapproxy.limits import LOG_INTERVAL, ConnectionLimiter
from ldapproxy.metrics import Metrics


def limits(total: int = 3, per_ip: int = 0) -> LimitsConfig:
    return LimitsConfig(
        1 << 20, 900.0, 10.0, 10.0, max_connections=total, max_connections_per_ip=per_ip
    )


def limit_lines(events: list[dict[str, Any]]) -> list[str]:
    return [
        formatEvent(e)
        for e in events
        if e.get("log_namespace") == "ldapproxy.limits" and e["log_level"] is LogLevel.warn
    ]


@pytest.fixture
def logged() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


# -- ConnectionLimiter ----------------------------------------------------------------------


def test_total_connections_are_capped_and_freed() -> None:
    metrics = Metrics()
    limiter = ConnectionLimiter(limits(total=2), Clock(), metrics)
    assert limiter.admit("ldap", ("192.0.2.1", 1))
    assert limiter.admit("ldap", ("192.0.2.1", 2))
    assert not limiter.admit("ldap", ("192.0.2.1", 3))
    assert limiter.open == 2
    limiter.release()
    assert limiter.admit("ldap", ("192.0.2.1", 4))
    assert metrics.limits_exceeded["max_connections"] == 1


def test_per_address_connections_are_capped_per_address() -> None:
    metrics = Metrics()
    limiter = ConnectionLimiter(limits(total=100, per_ip=2), Clock(), metrics)
    assert limiter.admit_address("ldap", ("192.0.2.1", 1))
    assert limiter.admit_address("ldap", ("192.0.2.1", 2))
    assert not limiter.admit_address("ldap", ("192.0.2.1", 3))
    assert limiter.admit_address("ldap", ("192.0.2.2", 1)), "another address"
    limiter.release_address("192.0.2.1")
    assert limiter.admit_address("ldap", ("192.0.2.1", 4))
    assert metrics.limits_exceeded["max_connections_per_ip"] == 1


def test_addresses_that_left_are_forgotten() -> None:
    """No table entry per address that ever connected: memory stays bounded."""
    limiter = ConnectionLimiter(limits(total=100, per_ip=5), Clock(), Metrics())
    for index in range(50):
        host = f"192.0.2.{index}"
        assert limiter.admit_address("ldap", (host, 1))
        limiter.release_address(host)
    assert dict(limiter.by_address) == {}


def test_zero_per_address_counts_nothing() -> None:
    """Off (0): addresses are not counted at all, so nothing is kept per address."""
    limiter = ConnectionLimiter(limits(total=100, per_ip=0), Clock(), Metrics())
    assert not limiter.per_address
    made = factory(limits(total=100, per_ip=0), limiter)
    clients = [connect(made, "192.0.2.1", 40000 + n) for n in range(50)]
    assert all(c is not None and c.session is not None for c in clients)
    assert dict(limiter.by_address) == {}
    assert limiter.open == 50


def test_refusals_are_logged_at_most_every_interval(logged: list[dict[str, Any]]) -> None:
    """A flood of refusals gives one line per interval, naming the setting, its value and
    how many were refused in between; every refusal is counted."""
    clock = Clock()
    metrics = Metrics()
    limiter = ConnectionLimiter(limits(total=1), clock, metrics)
    assert limiter.admit("ldap", ("192.0.2.1", 1))
    for port in range(2, 12):
        assert not limiter.admit("ldap", ("192.0.2.1", port))
        clock.advance(0.1)
    clock.advance(LOG_INTERVAL)
    assert not limiter.admit("ldaps", ("192.0.2.9", 99))
    first, second = limit_lines(logged)
    assert first == (
        "connection from 192.0.2.1:2 on listener ldap refused: 1 client connections open "
        "(limits.max_connections = 1)"
    )
    assert second == (
        "connection from 192.0.2.9:99 on listener ldaps refused: 1 client connections open "
        "(limits.max_connections = 1); 9 more refused since the last such line"
    )
    assert metrics.limits_exceeded["max_connections"] == 11


def test_new_limits_apply_to_new_connections() -> None:
    limiter = ConnectionLimiter(limits(total=1), Clock(), Metrics())
    assert limiter.admit("ldap", ("192.0.2.1", 1))
    assert not limiter.admit("ldap", ("192.0.2.1", 2))
    limiter.configure(limits(total=3))
    assert limiter.admit("ldap", ("192.0.2.1", 3))
    limiter.configure(limits(total=1))
    assert not limiter.admit("ldap", ("192.0.2.1", 4)), "open connections stay"
    assert limiter.open == 2


# -- through ClientFactory ---------------------------------------------------------------


def factory(
    config: LimitsConfig, limiter: ConnectionLimiter | None = None, proxy_protocol: bool = False
) -> ClientFactory:
    trusted = (ipaddress.ip_network("10.0.0.0/24"),) if proxy_protocol else ()
    listener = ListenerConfig("ldap", "tcp:389", ListenerTLS.NONE, proxy_protocol, trusted)
    return ClientFactory(listener, config, Clock(), FakeSource(), None, limiter=limiter)


def connect(made: ClientFactory, host: str, port: int = 40000) -> ClientProtocol | None:
    peer = IPv4Address("TCP", host, port)
    protocol = made.buildProtocol(peer)
    if protocol is not None:
        protocol.makeConnection(StringTransport(peerAddress=peer))
    return protocol


def test_a_connection_past_max_connections_gets_no_protocol() -> None:
    made = factory(limits(total=2))
    first = connect(made, "192.0.2.1")
    assert connect(made, "192.0.2.2") is not None
    assert connect(made, "192.0.2.3") is None
    assert first is not None
    first.connectionLost(Failure(ConnectionDone()))
    assert connect(made, "192.0.2.3") is not None
    assert made.metrics.client_connections_total["ldap"] == 3, "refused ones not counted"


def test_listeners_share_one_limiter() -> None:
    config = limits(total=2)
    shared = ConnectionLimiter(config, Clock(), Metrics())
    plain, other = factory(config, shared), factory(config, shared)
    assert connect(plain, "192.0.2.1") is not None
    assert connect(other, "192.0.2.1") is not None
    assert connect(plain, "192.0.2.1") is None


def test_per_address_limit_aborts_before_the_session() -> None:
    made = factory(limits(total=10, per_ip=1))
    first = connect(made, "192.0.2.1")
    assert first is not None
    assert first.session is not None
    second = connect(made, "192.0.2.1", 40001)
    assert second is not None
    assert second.transport.disconnecting or second.transport.disconnected
    assert getattr(second, "session", None) is None
    assert second.transport.value() == b""
    second.connectionLost(Failure(ConnectionDone()))
    assert made.limiter.open == 1
    assert dict(made.limiter.by_address) == {"192.0.2.1": 1}
    first.connectionLost(Failure(ConnectionDone()))
    assert made.limiter.open == 0
    assert dict(made.limiter.by_address) == {}


def test_per_address_limit_uses_the_proxy_header_address() -> None:
    """Behind HAProxy every connection comes from the balancer: the real client address
    in the PROXY header is what the per-address limit counts."""
    made = factory(limits(total=10, per_ip=1), proxy_protocol=True)
    clients = []
    for index, client in enumerate(["192.0.2.1", "192.0.2.2", "192.0.2.1"]):
        protocol = connect(made, "10.0.0.5", 40000 + index)
        assert protocol is not None
        protocol.dataReceived(f"PROXY TCP4 {client} 10.0.0.20 5555 389\r\n".encode())
        clients.append(protocol)
    assert [getattr(p, "session", None) is not None for p in clients] == [True, True, False]
    assert dict(made.limiter.by_address) == {"192.0.2.1": 1, "192.0.2.2": 1}
