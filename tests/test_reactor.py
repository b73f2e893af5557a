"""ProxyReactor on real loopback sockets: writes made during a loop pass are sent at its end
without a round trip through epoll, and everything Twisted's write path guarantees still
holds (order, a full socket buffer, producers, closing after a flush, connecting)."""

from __future__ import annotations

import contextlib
import select
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from twisted.internet import protocol
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from zope.interface import implementer

from ldapproxy.reactor import ProxyReactor


class CountingPoller:
    """Wraps the reactor's epoll object and records each registration's event mask."""

    def __init__(self, poller: Any) -> None:
        self._poller = poller
        self.masks: list[int] = []

    def register(self, fd: int, mask: int) -> None:
        self.masks.append(mask)
        self._poller.register(fd, mask)

    def modify(self, fd: int, mask: int) -> None:
        self.masks.append(mask)
        self._poller.modify(fd, mask)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._poller, name)

    @property
    def write_registrations(self) -> int:
        return sum(1 for mask in self.masks if mask & select.EPOLLOUT)


@pytest.fixture
def reactor() -> Iterator[ProxyReactor]:
    built = ProxyReactor()
    built._poller = CountingPoller(built._poller)  # type: ignore[assignment]
    try:
        yield built
    finally:
        for reader in list(built._internalReaders):
            built.removeReader(reader)
            reader.connectionLost(None)
        built.disconnectAll()
        for call in built.getDelayedCalls():
            call.cancel()
        built._poller.close()


def spin(reactor: ProxyReactor, done: Callable[[], bool], passes: int = 2000) -> None:
    """Run loop passes until ``done()`` (fail after ``passes``)."""
    for _ in range(passes):
        if done():
            return
        reactor.iterate(0.01)
    raise AssertionError("the condition was not reached")


class Recorder(protocol.Protocol):
    """Keeps what it receives and whether the connection ended."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.lost = reason


def served(
    reactor: ProxyReactor, make: Callable[[], protocol.Protocol]
) -> tuple[Any, socket.socket]:
    """Listen on 127.0.0.1, connect a blocking socket, return (server protocol, socket)."""
    accepted: list[protocol.Protocol] = []

    def build() -> protocol.Protocol:
        server = make()
        accepted.append(server)
        return server

    port = reactor.listenTCP(0, protocol.Factory.forProtocol(build), interface="127.0.0.1")
    peer = socket.create_connection(("127.0.0.1", port.getHost().port))
    spin(reactor, lambda: bool(accepted) and accepted[0].transport is not None)
    port.stopListening()
    return accepted[0], peer


def receive(reactor: ProxyReactor, peer: socket.socket, size: int) -> bytes:
    peer.setblocking(False)
    data = bytearray()

    def got() -> bool:
        while True:
            try:
                chunk = peer.recv(1 << 20)
            except BlockingIOError:
                return False
            data.extend(chunk)
            if len(data) >= size or not chunk:
                return True

    spin(reactor, got)
    return bytes(data)


def test_writes_of_one_pass_are_sent_together_without_epoll(reactor: ProxyReactor) -> None:
    """Three writes in one pass arrive, in order, and no EPOLLOUT was ever registered."""
    server, peer = served(reactor, protocol.Protocol)
    for part in (b"first ", b"second ", b"third"):
        server.transport.write(part)
    assert reactor.getWriters() == [server.transport], "pending until the end of the pass"
    reactor.iterate(0)
    assert reactor.getWriters() == []
    assert receive(reactor, peer, 18) == b"first second third"
    assert reactor._poller.write_registrations == 0
    peer.close()


def test_a_write_from_a_read_is_sent_in_the_same_pass(reactor: ProxyReactor) -> None:
    """An echo answers within the pass that read the request, still without EPOLLOUT."""

    class Echo(protocol.Protocol):
        def dataReceived(self, data: bytes) -> None:
            self.transport.write(data.upper())

    _, peer = served(reactor, Echo)
    for round_ in range(50):
        peer.sendall(b"ping %d" % round_)
        assert receive(reactor, peer, len(b"ping %d" % round_)) == b"PING %d" % round_
    assert reactor._poller.write_registrations == 0
    peer.close()


def test_a_full_socket_buffer_falls_back_to_epoll(reactor: ProxyReactor) -> None:
    """A peer that does not read: what does not fit waits for EPOLLOUT, nothing is lost."""
    server, peer = served(reactor, protocol.Protocol)
    payload = bytes(range(256)) * 131072  # 32 MiB, more than loopback's socket buffers
    server.transport.write(payload)
    reactor.iterate(0)
    assert reactor.getWriters() == [server.transport]
    assert server.transport.fileno() in reactor._writes, "registered with epoll"
    assert reactor._poller.write_registrations == 1
    assert receive(reactor, peer, len(payload)) == payload
    spin(reactor, lambda: not reactor.getWriters())
    assert server.transport.fileno() not in reactor._writes
    peer.close()


def test_a_streaming_producer_is_paused_and_resumed(reactor: ProxyReactor) -> None:
    """Flow control: the producer is paused while the buffer is full, resumed once sent."""
    events: list[str] = []

    @implementer(IPushProducer)
    class Producer:
        def pauseProducing(self) -> None:
            events.append("pause")

        def resumeProducing(self) -> None:
            events.append("resume")

        def stopProducing(self) -> None:
            events.append("stop")

    server, peer = served(reactor, protocol.Protocol)
    server.transport.registerProducer(Producer(), True)
    payload = b"x" * (32 << 20)
    server.transport.write(payload)
    assert events == ["pause"]
    reactor.iterate(0)
    assert events == ["pause"], "the kernel cannot take 32 MiB at once"
    assert receive(reactor, peer, len(payload)) == payload
    spin(reactor, lambda: events == ["pause", "resume"])
    peer.close()


def test_lose_connection_sends_everything_first(reactor: ProxyReactor) -> None:
    """Bytes written before loseConnection arrive, then EOF, then connectionLost."""
    server, peer = served(reactor, Recorder)
    server.transport.write(b"last words")
    server.transport.loseConnection()
    assert receive(reactor, peer, 1 << 20) == b"last words"
    spin(reactor, lambda: server.lost is not None)
    assert reactor.getWriters() == []
    peer.close()


def test_abort_drops_pending_writes(reactor: ProxyReactor) -> None:
    """abortConnection: the pending write is forgotten and the peer sees a reset or EOF."""
    server, peer = served(reactor, Recorder)
    server.transport.write(b"never sent")
    server.transport.abortConnection()
    spin(reactor, lambda: server.lost is not None)
    assert reactor.getWriters() == []
    with contextlib.suppress(ConnectionResetError):
        assert peer.recv(100) == b""
    peer.close()


def test_outgoing_connections_connect_and_write(reactor: ProxyReactor) -> None:
    """A TCP client (whose connect completion is an epoll write event) works as usual."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = Recorder()

    class Greeter(protocol.Protocol):
        def connectionMade(self) -> None:
            self.transport.write(b"hello")

    factory = protocol.ClientFactory.forProtocol(Greeter)
    reactor.connectTCP("127.0.0.1", listener.getsockname()[1], factory)
    spin(reactor, lambda: select.select([listener], [], [], 0)[0] != [])
    accepted, _ = listener.accept()
    assert receive(reactor, accepted, 5) == b"hello"
    accepted.close()
    listener.close()
    assert client.lost is None


def test_a_write_after_the_peer_left_ends_the_connection(reactor: ProxyReactor) -> None:
    """The send error of an end-of-pass write disconnects that connection only."""
    server, peer = served(reactor, Recorder)
    other, other_peer = served(reactor, Recorder)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    peer.close()  # RST
    spin(reactor, lambda: server.lost is not None or not server.transport.connected, 50)
    if server.lost is None:
        server.transport.write(b"into the void")
        spin(reactor, lambda: server.lost is not None)
    other.transport.write(b"still here")
    assert receive(reactor, other_peer, 10) == b"still here"
    other_peer.close()


def test_an_exception_in_a_handler_disconnects_only_that_connection(
    reactor: ProxyReactor,
) -> None:
    """As in Twisted: a raising dataReceived closes its connection; the loop goes on."""

    class Broken(Recorder):
        def dataReceived(self, data: bytes) -> None:
            raise RuntimeError("broken protocol")

    broken, broken_peer = served(reactor, Broken)
    fine, fine_peer = served(reactor, Recorder)
    broken_peer.sendall(b"boom")
    spin(reactor, lambda: broken.lost is not None)
    fine_peer.sendall(b"ok")
    spin(reactor, lambda: bytes(fine.received) == b"ok")
    assert fine.lost is None
    broken_peer.close()
    fine_peer.close()
