"""The client side of the proxy: a thin Twisted protocol that feeds a :class:`Session`.

This and :mod:`ldapproxy.upstream` are the only modules that hold Twisted transports.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IAddress, IHandshakeListener, IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ldapproxy.config import LimitsConfig, ListenerConfig
from ldapproxy.plugin_chain import NO_PLUGINS, PluginChain
from ldapproxy.session import Session, UpstreamSource
from ldapproxy.tls import ServerTLS
from ldapproxy.upstream import UpstreamProtocol

log = Logger(namespace="ldapproxy.client")

_session_ids = itertools.count(1)


@implementer(IPushProducer)
class ReadControl:
    """Lets one connection's send buffer pause and resume reading on another.

    Registered as the producer of the other side's transport instead of the transport
    itself, because Twisted tells a registered producer to stop when its consumer closes,
    and whether a connection closes is the session's decision, not the transport's.
    """

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self.paused = False

    def pauseProducing(self) -> None:
        self.paused = True
        self._transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        self._transport.resumeProducing()

    def stopProducing(self) -> None:
        pass


@implementer(IHandshakeListener)
class ClientProtocol(Protocol):
    """One accepted client connection; implements :class:`ldapproxy.session.ClientPort`."""

    session: Session
    _upstream_reads: ReadControl | None = None

    def __init__(
        self, make_session: Callable[[ClientProtocol], Session], tls: ServerTLS | None
    ) -> None:
        self._make_session = make_session
        self._tls = tls

    def connectionMade(self) -> None:
        self.session = self._make_session(self)
        log.debug(
            "{prefix} connected to listener {listener}",
            prefix=self.session.prefix,
            listener=self.session.listener.name,
        )
        self.session.start()

    def dataReceived(self, data: bytes) -> None:
        self.session.client_data(data)

    def handshakeCompleted(self) -> None:
        handle = self.transport.getHandle()  # type: ignore[union-attr]
        self.session.tls_established(handle.get_protocol_version_name(), handle.get_cipher_name())

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        session = getattr(self, "session", None)
        if session is not None:
            session.client_lost(reason)

    # -- ClientPort ---------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]

    def start_tls(self) -> None:
        if self._tls is None:
            raise RuntimeError("TLS requested on a listener without a TLS context")
        self.transport.startTLS(self._tls)  # type: ignore[union-attr]

    def pause_reading(self) -> None:
        self.transport.pauseProducing()  # type: ignore[union-attr]

    def resume_reading(self) -> None:
        self.transport.resumeProducing()  # type: ignore[union-attr]

    def link(self, upstream: UpstreamProtocol) -> None:
        # Each side pauses the other's reads while its own send buffer is full, so a slow
        # client stops the upstream read (and vice versa) and memory stays bounded.
        self._upstream_reads = ReadControl(upstream.transport)
        self.transport.registerProducer(self._upstream_reads, True)  # type: ignore[union-attr]
        upstream.transport.registerProducer(ReadControl(self.transport), True)  # type: ignore[union-attr]

    def unlink(self, upstream: UpstreamProtocol) -> None:
        for transport in (self.transport, upstream.transport):
            if transport is not None and getattr(transport, "producer", True) is not None:
                transport.unregisterProducer()  # type: ignore[attr-defined]
        reads, self._upstream_reads = self._upstream_reads, None
        if reads is not None and reads.paused:
            # This client's full send buffer had paused the upstream; the connection is
            # going back to the pool, where the next session must be able to read it.
            reads.resumeProducing()

    def close(self) -> None:
        self.transport.loseConnection()  # type: ignore[union-attr]

    def abort(self) -> None:
        self.transport.abortConnection()  # type: ignore[union-attr]


class ClientFactory(Factory):
    """Builds a client protocol and its session for each connection on one listener."""

    def __init__(
        self,
        listener: ListenerConfig,
        limits: LimitsConfig,
        clock: IReactorTime,
        source: UpstreamSource,
        tls: ServerTLS | None,
        plugins: PluginChain = NO_PLUGINS,
    ) -> None:
        self.listener = listener
        self.limits = limits
        self.clock = clock
        self.source = source
        self.tls = tls
        self.plugins = plugins
        self.noisy = False

    def buildProtocol(self, addr: IAddress | None) -> ClientProtocol:
        peer = (str(getattr(addr, "host", addr)), int(getattr(addr, "port", 0)))

        def make_session(client: ClientProtocol) -> Session:
            return Session(
                next(_session_ids),
                peer,
                self.listener,
                self.limits,
                self.clock,
                self.source,
                client,
                self.plugins,
            )

        return ClientProtocol(make_session, self.tls)
