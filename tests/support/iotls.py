"""In-memory connections with real TLS: an iosim transport whose ``startTLS`` puts a real
``TLSMemoryBIOProtocol`` in front of the protocol, as Twisted's TCP transports do, and a
small LDAP client that collects what the proxy sends."""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport
from zope.interface import implementer

from ldapproxy.ber import Frame, Framer


class _Wire:
    """The byte pipe under a TLS layer: writes bypass TLS and go onto the iosim stream."""

    def __init__(self, transport: TLSFakeTransport) -> None:
        self._transport = transport

    def write(self, data: bytes) -> None:
        self._transport.raw_write(data)

    def writeSequence(self, data: list[bytes]) -> None:
        self._transport.raw_write(b"".join(data))

    def loseConnection(self) -> None:
        FakeTransport.loseConnection(self._transport)

    def abortConnection(self) -> None:
        FakeTransport.abortConnection(self._transport)

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        FakeTransport.registerProducer(self._transport, producer, streaming)

    def unregisterProducer(self) -> None:
        FakeTransport.unregisterProducer(self._transport)

    def getPeer(self) -> Any:
        return self._transport.getPeer()

    def getHost(self) -> Any:
        return self._transport.getHost()


class TLSFakeTransport(FakeTransport):
    """An iosim transport whose ``startTLS`` runs real OpenSSL, like a TCP transport's."""

    def __init__(self, protocol: Any, isServer: bool, clock: Clock, **kwargs: Any) -> None:
        super().__init__(protocol, isServer, **kwargs)
        self._clock = clock
        self.tls_protocol: TLSMemoryBIOProtocol | None = None
        #: Every byte this side put on the wire, plaintext or TLS records.
        self.wire = bytearray()

    def raw_write(self, data: bytes) -> None:
        if not self.disconnecting:
            self.wire += data
        FakeTransport.write(self, data)

    def startTLS(self, contextFactory: Any, beNormal: bool = True) -> None:
        assert beNormal
        factory = TLSMemoryBIOFactory(contextFactory, not self.isServer, None, clock=self._clock)
        tls = factory.protocol(factory, self.protocol, False)
        self.tls_protocol = tls
        self.protocol = tls  # received bytes now go through TLS first
        self.getHandle = tls.getHandle
        tls.makeConnection(_Wire(self))

    def write(self, data: bytes) -> None:
        if self.tls_protocol is not None:
            self.tls_protocol.write(data)
        else:
            self.raw_write(data)

    def writeSequence(self, data: list[bytes]) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        if self.tls_protocol is not None:
            self.tls_protocol.loseConnection()
        else:
            super().loseConnection()

    def abortConnection(self) -> None:
        if self.tls_protocol is not None:
            self.tls_protocol.abortConnection()
        else:
            super().abortConnection()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self.tls_protocol is not None:
            self.tls_protocol.registerProducer(producer, streaming)
        else:
            super().registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        if self.tls_protocol is not None:
            self.tls_protocol.unregisterProducer()
        else:
            super().unregisterProducer()


@implementer(IHandshakeListener)
class LDAPTestClient(Protocol):
    """Collects the LDAP messages the proxy sends and notes TLS and disconnection."""

    def __init__(self) -> None:
        self._framer = Framer(1 << 24)
        self.frames: list[Frame] = []
        self.handshake_done = False
        self.lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.frames += self._framer.feed(data)

    def handshakeCompleted(self) -> None:
        self.handshake_done = True

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = reason
