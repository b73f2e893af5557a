"""The client side of the proxy: a thin Twisted protocol that feeds a :class:`Session`.

This and :mod:`ldapproxy.upstream` are the only modules that hold Twisted transports.
"""

from __future__ import annotations

import ipaddress
import itertools
from collections import Counter as Tally
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import (
    IAddress,
    IDelayedCall,
    IHandshakeListener,
    IPushProducer,
    IReactorTime,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ldapproxy.config import LimitsConfig, ListenerConfig, ListenerTLS
from ldapproxy.limits import ConnectionLimiter
from ldapproxy.metrics import Metrics
from ldapproxy.plugin_chain import NO_PLUGINS, PluginChain
from ldapproxy.proxy_protocol import ProxyHeaderParser, ProxyProtocolError
from ldapproxy.session import Session, UpstreamSource, format_peer
from ldapproxy.tls import ServerTLS
from ldapproxy.upstream import UpstreamProtocol, no_delay

log = Logger(namespace="ldapproxy.client")

_session_ids = itertools.count(1)


def number_sessions(first: int, step: int) -> None:
    """Number this process's sessions ``first``, ``first + step``...: with N workers, worker
    ``k`` (from 1) uses ``k, k + N, k + 2N...``, so connection ids are unique across the
    workers, in the main log and in the audit log alike."""
    global _session_ids
    _session_ids = itertools.count(first, step)


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
        self,
        make_session: Callable[[ClientProtocol, tuple[str, int]], Session],
        peer: tuple[str, int],
        tls: ServerTLS | None,
        sessions: set[Session],
        traffic: Tally[str],
        proxy_header: _ProxyHeaderReader | None = None,
        limiter: ConnectionLimiter | None = None,
    ) -> None:
        self._make_session = make_session
        self._peer = peer
        self._tls = tls
        self._sessions = sessions
        self._traffic = traffic
        #: On proxy_protocol listeners, until the PROXY header has been read.
        self._proxy_header = proxy_header
        #: Bytes that came with the PROXY header, not yet delivered (see _deliver_unread).
        self._unread = b""
        self._reading_paused = False
        #: Counts this connection (admitted by the factory); None in unit tests.
        self._limiter = limiter
        #: The client address counted against limits.max_connections_per_ip, once known.
        self._counted_address: str | None = None

    def connectionMade(self) -> None:
        no_delay(self.transport)
        if self._proxy_header is not None:
            if not self._proxy_header.trusted(self._peer):
                self.transport.abortConnection()  # type: ignore[union-attr]
                return
            self._proxy_header.start(self)
            return
        self._begin(self._peer)

    def _begin(self, peer: tuple[str, int]) -> None:
        """The client (at ``peer``) is known: its session starts, within the per-address
        connection limit."""
        limiter = self._limiter
        if limiter is not None and limiter.per_address:
            if not limiter.admit_address(self._listener_name(), peer):
                self.transport.abortConnection()  # type: ignore[union-attr]
                return
            self._counted_address = peer[0]
        self.session = self._make_session(self, peer)
        self._sessions.add(self.session)
        log.debug(
            "{prefix} connected to listener {listener}",
            prefix=self.session.prefix,
            listener=self.session.listener.name,
        )
        self.session.start()

    def dataReceived(self, data: bytes) -> None:
        self._traffic["in"] += len(data)
        reader = self._proxy_header
        if reader is not None:
            found = reader.feed(self, data)
            if found is None:
                return
            self._proxy_header = None
            peer, self._unread = found
            self._begin(peer)
            self._deliver_unread()
            return
        self.session.client_data(data)

    def _deliver_unread(self) -> None:
        """Hand on the bytes that arrived with the PROXY header, as if just read: to the
        TLS layer once the session started TLS (an ldaps ClientHello), else to the
        session, but not while the session keeps reading paused (a pending verdict)."""
        if not self._unread or self._reading_paused:
            return
        layer = getattr(self.transport, "protocol", self)
        session = getattr(self, "session", None)
        if layer is self and session is not None and session.listener.tls is ListenerTLS.LDAPS:
            # An ldaps ClientHello, before TLS started (a verdict was pending): never for
            # the LDAP parser; start_tls() hands it to the TLS layer it puts in place.
            return
        data, self._unread = self._unread, b""
        if layer is not self:
            layer.dataReceived(data)  # the TLS layer that startTLS put in front of us
        elif session is not None:
            session.client_data(data)

    def handshakeCompleted(self) -> None:
        handle = self.transport.getHandle()  # type: ignore[union-attr]
        self.session.tls_established(handle.get_protocol_version_name(), handle.get_cipher_name())

    def _listener_name(self) -> str:
        factory = getattr(self, "factory", None)
        return factory.listener.name if isinstance(factory, ClientFactory) else "?"

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._limiter is not None:
            self._limiter.release()
            if self._counted_address is not None:
                self._limiter.release_address(self._counted_address)
            self._limiter = None
        if self._proxy_header is not None:
            self._proxy_header.stop()
        session = getattr(self, "session", None)
        if session is not None:
            self._sessions.discard(session)
            session.client_lost(reason)

    # -- ClientPort ---------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        self._traffic["out"] += len(data)
        self.transport.write(data)  # type: ignore[union-attr]

    def start_tls(self) -> None:
        if self._tls is None:
            raise RuntimeError("TLS requested on a listener without a TLS context")
        self.transport.startTLS(self._tls)  # type: ignore[union-attr]
        self._deliver_unread()

    def pause_reading(self) -> None:
        self._reading_paused = True
        self.transport.pauseProducing()  # type: ignore[union-attr]

    def resume_reading(self) -> None:
        self._reading_paused = False
        self.transport.resumeProducing()  # type: ignore[union-attr]
        self._deliver_unread()

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

    def upstream_paused(self) -> bool:
        reads = self._upstream_reads
        return reads is not None and reads.paused

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
        metrics: Metrics | None = None,
        sessions: set[Session] | None = None,
        limiter: ConnectionLimiter | None = None,
    ) -> None:
        self.listener = listener
        self.limits = limits
        self.clock = clock
        self.source = source
        self.tls = tls
        self.plugins = plugins
        self.metrics = metrics or Metrics()
        #: The open sessions (shared by every listener's factory, for the metrics).
        self.sessions: set[Session] = set() if sessions is None else sessions
        #: Shared by every listener's factory: the connection limits.
        self.limiter = limiter or ConnectionLimiter(limits, clock, self.metrics)
        self.noisy = False

    def buildProtocol(self, addr: IAddress | None) -> ClientProtocol | None:
        peer = (str(getattr(addr, "host", addr)), int(getattr(addr, "port", 0)))
        if not self.limiter.admit(self.listener.name, peer):
            return None  # Twisted closes the socket before reading or writing a byte
        self.metrics.count_client(self.listener.name)

        def make_session(client: ClientProtocol, peer: tuple[str, int]) -> Session:
            return Session(
                next(_session_ids),
                peer,
                self.listener,
                self.limits,
                self.clock,
                self.source,
                client,
                self.plugins,
                self.metrics,
            )

        reader = (
            _ProxyHeaderReader(self.listener, self.clock, self.limits.tls_handshake_timeout)
            if self.listener.proxy_protocol
            else None
        )
        protocol = ClientProtocol(
            make_session, peer, self.tls, self.sessions, self.metrics.bytes, reader, self.limiter
        )
        protocol.factory = self
        return protocol


class _ProxyHeaderReader:
    """The PROXY protocol header at the start of a connection on a ``proxy_protocol``
    listener: only from ``trusted_proxies``, read within the handshake timeout, and the
    client address it names replaces the load balancer's."""

    def __init__(self, listener: ListenerConfig, clock: IReactorTime, timeout: float) -> None:
        self._listener = listener
        self._clock = clock
        self._timeout = timeout
        self._parser = ProxyHeaderParser()
        self._timer: IDelayedCall | None = None
        self._peer = ("", 0)

    def trusted(self, peer: tuple[str, int]) -> bool:
        """Whether ``peer`` may send the header; logs the refusal when not."""
        self._peer = peer
        try:
            address = ipaddress.ip_address(peer[0])
        except ValueError:
            address = None
        if address is not None:
            # A dual-stack listener reports IPv4 balancers as IPv4-mapped IPv6 addresses.
            mapped = getattr(address, "ipv4_mapped", None)
            candidates = (address,) if mapped is None else (address, mapped)
            if any(a in n for a in candidates for n in self._listener.trusted_proxies):
                return True
        log.warn(
            "{peer}: connection refused on listener {listener}: not among its "
            "trusted_proxies (proxy_protocol = true)",
            peer=format_peer(peer),
            listener=self._listener.name,
        )
        return False

    def start(self, client: ClientProtocol) -> None:
        self._timer = self._clock.callLater(self._timeout, self._expired, client)

    def stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def feed(self, client: ClientProtocol, data: bytes) -> tuple[tuple[str, int], bytes] | None:
        """The client address and the bytes after the header, once it is complete."""
        try:
            header = self._parser.feed(data)
        except ProxyProtocolError as error:
            self._refuse(client, f"bad PROXY header: {error}")
            return None
        if header is None:
            return None
        self.stop()
        source = header.source or self._peer  # LOCAL: the balancer's own health check
        return (_plain_host(source[0]), source[1]), self._parser.rest

    def _expired(self, client: ClientProtocol) -> None:
        self._timer = None
        self._refuse(
            client,
            f"no PROXY header within {self._timeout:g} s (limits.tls_handshake_timeout)",
        )

    def _refuse(self, client: ClientProtocol, why: str) -> None:
        self.stop()
        log.warn(
            "{peer}: closing on listener {listener}: {why}",
            peer=format_peer(self._peer),
            listener=self._listener.name,
            why=why,
        )
        client.abort()


def _plain_host(host: str) -> str:
    """An IPv4-mapped IPv6 address written as the IPv4 address it carries."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)
