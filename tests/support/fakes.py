"""Test doubles for :class:`ldapproxy.session.Session`, and builders for request PDUs.

:class:`FakeClient` implements :class:`ldapproxy.session.ClientPort` and records every call
in :attr:`FakeClient.events`; :class:`FakeUpstream` stands in for an
:class:`ldapproxy.upstream.UpstreamProtocol`; :class:`FakeSource` is an
:class:`ldapproxy.session.UpstreamSource` whose ``acquire()`` Deferreds the test fires.
:func:`make_session` wires them to a session on a :class:`~twisted.internet.task.Clock`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from ldapproxy import messages as m
from ldapproxy.ber import (
    BOOLEAN,
    ENUMERATED,
    OCTET_STRING,
    SEQUENCE,
    Frame,
    Framer,
    encode_integer,
    encode_message,
    tlv,
)
from ldapproxy.config import LimitsConfig, ListenerConfig, ListenerTLS
from ldapproxy.hooks import Plugin
from ldapproxy.metrics import Metrics
from ldapproxy.plugin_chain import NO_PLUGINS, PluginChain
from ldapproxy.pool import Disposition
from ldapproxy.session import Session
from ldapproxy.upstream import NoUpstreamAvailable, UpstreamError

#: Big enough for anything a test decodes.
_DECODE_LIMIT = 1 << 30


def decode(data: bytes) -> list[Frame]:
    """Split ``data`` into whole LDAPMessages; fails if anything is left over."""
    framer = Framer(_DECODE_LIMIT)
    frames = framer.feed(data)
    assert framer.buffered == 0, f"{framer.buffered} trailing byte(s) after the last PDU"
    return frames


# -- the session's collaborators ---------------------------------------------------------


class FakeClient:
    """A :class:`ldapproxy.session.ClientPort` that records what the session does to it."""

    def __init__(self) -> None:
        self.paused_upstream = False
        #: Every call, in order: ``("write", data)``, ``("start_tls",)``, ``("close",)``...
        self.events: list[tuple[Any, ...]] = []
        self.paused = False
        self.linked: list[Any] = []
        self.unlinked: list[Any] = []

    # ClientPort
    def write(self, data: bytes) -> None:
        assert isinstance(data, bytes)
        self.events.append(("write", data))

    def start_tls(self) -> None:
        self.events.append(("start_tls",))

    def pause_reading(self) -> None:
        self.events.append(("pause",))
        self.paused = True

    def resume_reading(self) -> None:
        self.events.append(("resume",))
        self.paused = False

    def link(self, upstream: Any) -> None:
        self.events.append(("link", upstream))
        self.linked.append(upstream)

    def unlink(self, upstream: Any) -> None:
        self.events.append(("unlink", upstream))
        self.unlinked.append(upstream)

    def upstream_paused(self) -> bool:
        """Whether the client's full send buffer paused the upstream (tests set it)."""
        return self.paused_upstream

    def close(self) -> None:
        self.events.append(("close",))

    def abort(self) -> None:
        self.events.append(("abort",))

    # inspection
    @property
    def written(self) -> bytes:
        """Everything written to the client, concatenated."""
        return b"".join(e[1] for e in self.events if e[0] == "write")

    def frames(self) -> list[Frame]:
        """What was written to the client, decoded into whole PDUs."""
        return decode(self.written)

    def calls(self) -> list[str]:
        """The names of the calls made, in order (``write``, ``close``, ...), leaving out
        ``unlink`` (checked on its own: it must come before any close)."""
        names = [e[0] for e in self.events]
        if "unlink" in names:
            ends = [i for i, name in enumerate(names) if name in ("close", "abort")]
            assert not ends or names.index("unlink") < ends[0], names
        return [name for name in names if name != "unlink"]

    @property
    def closed(self) -> bool:
        return ("close",) in self.events

    @property
    def aborted(self) -> bool:
        return ("abort",) in self.events

    @property
    def start_tls_calls(self) -> int:
        return self.events.count(("start_tls",))


class FakeUpstream:
    """An upstream connection that records what is sent and replies on demand."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.sink: Any = None
        self.closed = False
        #: As on UpstreamProtocol: a previous session's identity may still be on it.
        self.needs_reset = False
        #: For :meth:`ldapproxy.client.ClientProtocol.link`, which couples transports.
        self.transport = StringTransport()

    def attach(self, sink: Any) -> None:
        self.sink = sink

    def send(self, data: bytes) -> None:
        assert isinstance(data, bytes)
        self.sent.append(data)

    def close(self) -> None:
        self.closed = True

    @property
    def received(self) -> bytes:
        """Everything the session sent, concatenated."""
        return b"".join(self.sent)

    def frames(self) -> list[Frame]:
        """What the session sent, decoded into whole PDUs."""
        return decode(self.received)

    def deliver(self, *pdus: bytes) -> None:
        """Hand response PDUs to the attached session, as the real protocol would."""
        assert self.sink is not None, "no session attached"
        self.sink.upstream_frames(decode(b"".join(pdus)))

    def lose(self, reason: str = "connection lost (test)") -> None:
        """The connection broke while attached."""
        assert self.sink is not None, "no session attached"
        self.sink.upstream_lost(reason)


class FakeSource:
    """An upstream source whose acquisitions complete when the test says so."""

    def __init__(self) -> None:
        #: One Deferred per ``acquire()`` call, in order.
        self.requests: list[defer.Deferred[Any]] = []
        #: ``(connection, Deferred)`` per ``reset()`` call.
        self.resets: list[tuple[Any, defer.Deferred[None]]] = []
        self.cancelled: list[defer.Deferred[Any]] = []
        #: ``(connection, disposition)`` per ``release()`` call.
        self.released: list[tuple[Any, Disposition]] = []
        #: If set, ``acquire()`` returns an already-fired Deferred with this connection.
        self.ready: Any = None

    def acquire(self) -> defer.Deferred[Any]:
        if self.ready is not None:
            d: defer.Deferred[Any] = defer.succeed(self.ready)
        else:
            d = defer.Deferred(self.cancelled.append)
        self.requests.append(d)
        return d

    def release(self, connection: Any, disposition: Disposition) -> None:
        self.released.append((connection, disposition))

    def reset(self, connection: Any) -> defer.Deferred[None]:
        """An identity reset the test completes: ``resets[-1].callback(None)``."""
        done: defer.Deferred[None] = defer.Deferred()
        self.resets.append((connection, done))
        return done

    @property
    def acquiring(self) -> bool:
        """Whether an ``acquire()`` is waiting for the test."""
        return bool(self.requests) and not self.requests[-1].called

    def succeed(self, upstream: FakeUpstream | None = None) -> FakeUpstream:
        """Complete the latest acquisition with ``upstream`` (a new one by default)."""
        upstream = upstream if upstream is not None else FakeUpstream()
        self.requests[-1].callback(upstream)
        return upstream

    def fail(self, error: Exception | None = None) -> None:
        """Fail the latest acquisition (with :class:`NoUpstreamAvailable` by default)."""
        if error is None:
            error = no_upstream()
        self.requests[-1].errback(Failure(error))


def no_upstream() -> NoUpstreamAvailable:
    """The error the dialer raises when every URL failed."""
    from ldapproxy.config import UpstreamURL

    url = UpstreamURL("ldaps", "dc1.example.com", 636)
    return NoUpstreamAvailable([UpstreamError(url, "cannot connect: refused")])


def connection_done() -> Failure:
    """The reason Twisted gives for a cleanly closed connection."""
    return Failure(ConnectionDone())


@dataclass
class Harness:
    """A session and its fakes, all driven by one clock."""

    session: Session
    client: FakeClient
    source: FakeSource
    clock: Clock
    upstream: FakeUpstream | None = field(default=None)

    def send(self, *pdus: bytes) -> None:
        """The client sends ``pdus`` in one chunk."""
        self.session.client_data(b"".join(pdus))

    def connect_upstream(self) -> FakeUpstream:
        """Give the session an upstream with nothing outstanding, then forget the traffic.

        A search (message ID maxInt) is sent, the acquisition completed and the search
        answered; the upstream's ``sent`` and the client's ``events`` are then cleared.
        The listener must accept a search in the session's current state.
        """
        self.send(search_request(2**31 - 1, base=b"cn=warmup"))
        upstream = self.source.succeed()
        upstream.deliver(result(2**31 - 1, m.SEARCH_RESULT_DONE))
        upstream.sent.clear()
        self.client.events.clear()
        self.upstream = upstream
        return upstream


def make_session(
    tls: ListenerTLS = ListenerTLS.STARTTLS_OPTIONAL,
    *,
    max_pdu_bytes: int = 1 << 20,
    idle_timeout: float = 900.0,
    tls_handshake_timeout: float = 10.0,
    start: bool = True,
    plugins: Sequence[Plugin] = (),
    plugin_timeout: float = 10.0,
    max_pending_ops: int = 100,
    first_request_timeout: float = 10.0,
    operation_timeout: float = 120.0,
    metrics: Metrics | None = None,
) -> Harness:
    """A started session on a listener with ``tls``, and its fakes.  ``plugins`` get the
    names ``p0``, ``p1``... unless they have one."""
    clock = Clock()
    client = FakeClient()
    source = FakeSource()
    for index, plugin in enumerate(plugins):
        plugin.name = plugin.name or f"p{index}"
    session = Session(
        7,
        ("192.0.2.10", 50000),
        ListenerConfig("test", "tcp:389", tls),
        LimitsConfig(
            max_pdu_bytes,
            idle_timeout,
            tls_handshake_timeout,
            plugin_timeout,
            max_pending_ops=max_pending_ops,
            first_request_timeout=first_request_timeout,
            operation_timeout=operation_timeout,
        ),
        clock,
        source,
        client,
        PluginChain(plugins, clock, plugin_timeout) if plugins else NO_PLUGINS,
        metrics,
    )
    if start:
        session.start()
    return Harness(session, client, source, clock)


# -- request and response PDUs -------------------------------------------------------------

#: Paged results (RFC 2696), critical, page size 100: a realistic control.
PAGED_RESULTS_CONTROL = tlv(
    0xA0,
    tlv(
        SEQUENCE,
        tlv(OCTET_STRING, b"1.2.840.113556.1.4.319")
        + tlv(BOOLEAN, b"\xff")
        + tlv(OCTET_STRING, tlv(SEQUENCE, encode_integer(100) + tlv(OCTET_STRING, b""))),
    ),
)


def search_request(
    message_id: int,
    base: bytes = b"dc=example,dc=com",
    scope: int = 2,
    controls: bytes = b"",
) -> bytes:
    """A SearchRequest for ``(objectClass=*)`` under ``base``."""
    body = (
        tlv(OCTET_STRING, base)
        + encode_integer(scope, ENUMERATED)
        + encode_integer(0, ENUMERATED)
        + encode_integer(0)
        + encode_integer(0)
        + tlv(BOOLEAN, b"\x00")
        + tlv(0x87, b"objectClass")
        + tlv(SEQUENCE, b"")
    )
    return encode_message(message_id, tlv(m.SEARCH_REQUEST, body), controls)


def request(message_id: int, op: int, controls: bytes = b"") -> bytes:
    """A well-formed request of type ``op`` (any other tag gets a small opaque body)."""
    dn = b"cn=someone,dc=example,dc=com"
    if op == m.SEARCH_REQUEST:
        return search_request(message_id, controls=controls)
    if op == m.BIND_REQUEST:
        body = encode_integer(3) + tlv(OCTET_STRING, dn) + tlv(0x80, b"secret")
    elif op == m.MODIFY_REQUEST:
        change = tlv(
            SEQUENCE,
            encode_integer(2, ENUMERATED)
            + tlv(SEQUENCE, tlv(OCTET_STRING, b"description") + tlv(0x31, b"")),
        )
        body = tlv(OCTET_STRING, dn) + tlv(SEQUENCE, change)
    elif op == m.ADD_REQUEST:
        attribute = tlv(
            SEQUENCE, tlv(OCTET_STRING, b"objectClass") + tlv(0x31, tlv(OCTET_STRING, b"top"))
        )
        body = tlv(OCTET_STRING, dn) + tlv(SEQUENCE, attribute)
    elif op == m.DEL_REQUEST:
        body = dn
    elif op == m.MODDN_REQUEST:
        body = tlv(OCTET_STRING, dn) + tlv(OCTET_STRING, b"cn=other") + tlv(BOOLEAN, b"\xff")
    elif op == m.COMPARE_REQUEST:
        ava = tlv(OCTET_STRING, b"cn") + tlv(OCTET_STRING, b"someone")
        body = tlv(OCTET_STRING, dn) + tlv(SEQUENCE, ava)
    elif op == m.EXTENDED_REQUEST:
        body = tlv(0x80, m.WHOAMI_OID)
    elif op == m.UNBIND_REQUEST:
        body = b""
    elif op == m.ABANDON_REQUEST:
        raise ValueError("use abandon_request()")
    else:
        body = b"\x04\x00"
    return encode_message(message_id, tlv(op, body), controls)


def abandon_request(message_id: int, target: int) -> bytes:
    """An AbandonRequest for ``target``."""
    return encode_message(message_id, encode_integer(target, m.ABANDON_REQUEST))


def starttls_request(message_id: int) -> bytes:
    """The StartTLS ExtendedRequest."""
    return m.extended_request(message_id, m.STARTTLS_OID)


def result(message_id: int, op: int, code: int = m.SUCCESS, diagnostic: str = "") -> bytes:
    """A response of type ``op`` carrying an LDAPResult."""
    return m.result_message(message_id, op, code, diagnostic)


def search_entry(message_id: int, dn: bytes = b"cn=entry,dc=example,dc=com") -> bytes:
    """A SearchResultEntry with no attributes."""
    body = tlv(OCTET_STRING, dn) + tlv(SEQUENCE, b"")
    return encode_message(message_id, tlv(m.SEARCH_RESULT_ENTRY, body))


# -- the pool's collaborators ------------------------------------------------------------
#
# :class:`FakeConnector` stands in for ``UpstreamDialer.connect_url``: every ``connect(url)``
# returns a Deferred the test fires with :meth:`FakeConnector.succeed` (a new
# :class:`FakePooledUpstream`) or :meth:`FakeConnector.fail`.  A :class:`FakePooledUpstream`
# has the interface the pool uses (``exchange``, ``attach``, ``close``, ``state``) and
# behaves like the real protocol: ``exchange`` attaches a collector for the answer, so
# :meth:`FakePooledUpstream.deliver` answers it, and :meth:`FakePooledUpstream.lose`
# reports the loss to whatever sink is attached.


class _FakeExchange:
    """What ``UpstreamProtocol.exchange`` attaches: collects one request's responses."""

    def __init__(self, message_id: int, done: defer.Deferred[list[Frame]]) -> None:
        self.message_id = message_id
        self.done = done
        self.frames: list[Frame] = []

    def upstream_frames(self, frames: list[Frame]) -> None:
        from ldapproxy.upstream import ExchangeError

        for frame in frames:
            if self.done.called:
                return
            if frame.message_id != self.message_id:
                self.done.errback(ExchangeError(f"unexpected PDU for ID {frame.message_id}"))
                return
            self.frames.append(frame)
            if frame.op in m.FINAL_RESPONSES:
                self.done.callback(self.frames)

    def upstream_lost(self, reason: str) -> None:
        from ldapproxy.upstream import ExchangeError

        if not self.done.called:
            self.done.errback(ExchangeError(reason))


class FakePooledUpstream:
    """A READY upstream connection as the pool sees it; records exchanges and closes."""

    def __init__(self, url: Any) -> None:
        from ldapproxy.upstream import UpstreamState

        self.url = url
        self.state = UpstreamState.READY
        self.needs_reset = False
        self.sink: Any = None
        #: ``(pdu, message_id)`` per ``exchange()`` call, in order.
        self.exchanges: list[tuple[bytes, int]] = []
        #: Everything written: exchange PDUs and what a session sent.
        self.sent: list[bytes] = []
        self.close_calls = 0
        self.transport = StringTransport()

    def __repr__(self) -> str:
        return f"<FakePooledUpstream {self.url} #{id(self) % 10000}>"

    # the UpstreamProtocol interface
    def attach(self, sink: Any) -> None:
        self.sink = sink

    def exchange(self, pdu: bytes, message_id: int) -> defer.Deferred[list[Frame]]:
        done: defer.Deferred[list[Frame]] = defer.Deferred()
        self.exchanges.append((pdu, message_id))
        self.sent.append(pdu)
        self.attach(_FakeExchange(message_id, done))
        return done

    def send(self, data: bytes) -> None:
        self.sent.append(data)

    def close(self, notify: bool = False) -> None:
        from ldapproxy.upstream import UpstreamState

        self.close_calls += 1
        self.notified_close = notify
        sink, self.sink = self.sink, None
        self.state = UpstreamState.CLOSED
        if notify and sink is not None:
            sink.upstream_lost("closed by the pool")

    # driving and inspection
    @property
    def closed(self) -> bool:
        return self.close_calls > 0

    @property
    def exchanging(self) -> bool:
        """Whether an ``exchange()`` awaits its answer."""
        return isinstance(self.sink, _FakeExchange) and not self.sink.done.called

    def last_exchange(self) -> Frame:
        """The request of the latest ``exchange()``, decoded."""
        assert self.exchanges, "no exchange() was made"
        (frame,) = decode(self.exchanges[-1][0])
        return frame

    def deliver(self, *pdus: bytes) -> None:
        """PDUs arrive from the upstream, to whatever sink is attached."""
        assert self.sink is not None, "nothing attached"
        self.sink.upstream_frames(decode(b"".join(pdus)))

    def answer(self, code: int = m.SUCCESS) -> None:
        """Answer the pending exchange with its final response carrying ``code``."""
        assert self.exchanging, "no exchange() awaits an answer"
        request = self.last_exchange()
        self.deliver(result(request.message_id, m.RESPONSE_FOR_REQUEST[request.op], code))

    def lose(self, reason: str = "connection lost (test)") -> None:
        """The connection breaks: the attached sink hears of it, as from connectionLost."""
        from ldapproxy.upstream import UpstreamState

        sink, self.sink = self.sink, None
        self.state = UpstreamState.CLOSED
        if sink is not None:
            sink.upstream_lost(reason)


@dataclass
class Attempt:
    """One ``connect(url)`` call of the pool."""

    url: Any
    deferred: defer.Deferred[Any]
    at: float
    upstream: FakePooledUpstream | None = None

    @property
    def pending(self) -> bool:
        return not self.deferred.called


class FakeConnector:
    """The pool's ``connect``: each attempt is a Deferred the test fires."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.attempts: list[Attempt] = []

    def connect(self, url: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        self.attempts.append(Attempt(url, d, self.clock.seconds()))
        return d

    def pending(self, url: Any = None) -> list[Attempt]:
        """Attempts not yet fired (to ``url`` only, if given), oldest first."""
        return [a for a in self.attempts if a.pending and (url is None or a.url == url)]

    def count(self, url: Any = None) -> int:
        """Attempts made so far (to ``url`` only, if given)."""
        return sum(1 for a in self.attempts if url is None or a.url == url)

    def succeed(self, url: Any = None) -> FakePooledUpstream:
        """Complete the oldest pending attempt (to ``url``) with a new connection."""
        pending = self.pending(url)
        assert pending, f"no pending connect to {url}"
        attempt = pending[0]
        attempt.upstream = FakePooledUpstream(attempt.url)
        attempt.deferred.callback(attempt.upstream)
        return attempt.upstream

    def succeed_all(self, url: Any = None) -> list[FakePooledUpstream]:
        """Complete every pending attempt (to ``url``), oldest first."""
        return [self.succeed(url) for _ in self.pending(url)]

    def fail(self, url: Any = None, reason: str = "cannot connect: refused") -> None:
        """Fail the oldest pending attempt (to ``url``) as the dialer does."""
        pending = self.pending(url)
        assert pending, f"no pending connect to {url}"
        attempt = pending[0]
        attempt.deferred.errback(UpstreamError(attempt.url, reason))

    @property
    def upstreams(self) -> list[FakePooledUpstream]:
        """Every connection handed to the pool, in order."""
        return [a.upstream for a in self.attempts if a.upstream is not None]


class StubRandom:
    """A ``random.Random`` stand-in: ``uniform()`` returns ``fractions`` in turn (cycling)."""

    def __init__(self, *fractions: float) -> None:
        self._fractions = fractions or (1.0,)
        #: ``(a, b)`` per ``uniform()`` call.
        self.calls: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        value = self._fractions[len(self.calls) % len(self._fractions)]
        self.calls.append((a, b))
        return value


class Outcome:
    """What a Deferred fired with; failures are consumed so none goes unhandled."""

    def __init__(self, d: defer.Deferred[Any]) -> None:
        self.fired = False
        self.value: Any = None
        self.failure: Failure | None = None
        d.addCallbacks(self._ok, self._err)

    def _ok(self, value: Any) -> None:
        self.fired, self.value = True, value

    def _err(self, failure: Failure) -> None:
        self.fired, self.failure = True, failure

    @property
    def pending(self) -> bool:
        return not self.fired

    def result(self) -> Any:
        """The value it succeeded with (fails the test otherwise)."""
        assert self.fired, "still pending"
        assert self.failure is None, f"failed: {self.failure.value!r}"
        return self.value

    def error(self) -> BaseException:
        """The exception it failed with (fails the test otherwise)."""
        assert self.fired, "still pending"
        assert self.failure is not None, f"succeeded with {self.value!r}"
        return self.failure.value


@dataclass
class PoolHarness:
    """A pool, its connector and its clock."""

    pool: Any
    connector: FakeConnector
    clock: Clock
    rng: StubRandom

    def acquire(self) -> Outcome:
        """Call ``pool.acquire()`` and capture the result."""
        return Outcome(self.pool.acquire())

    def stats(self, index: int = 0) -> Any:
        """The stats of upstream number ``index``."""
        return self.pool.stats()[index]

    def counts(self, index: int = 0) -> dict[str, int]:
        """Non-zero connection counts of upstream ``index``, by state name."""
        return {s.value: n for s, n in self.stats(index).connections.items() if n}

    def answer_checks(self, code: int = m.SUCCESS) -> int:
        """Answer every pending exchange on every connection; returns how many."""
        answered = 0
        for upstream in self.connector.upstreams:
            if upstream.exchanging:
                upstream.answer(code)
                answered += 1
        return answered


def make_pool(
    urls: Any,
    strategy: str = "failover",
    *,
    min_idle: int = 1,
    max_size: int = 3,
    acquire_timeout: float = 5.0,
    idle_timeout: float = 300.0,
    max_lifetime: float = 3600.0,
    health_check_interval: float = 30.0,
    check_timeout: float = 4.0,
    rng: StubRandom | None = None,
    start: bool = True,
) -> PoolHarness:
    """A :class:`ldapproxy.pool.Pool` over a :class:`FakeConnector` and a Clock."""
    from ldapproxy.config import PoolConfig
    from ldapproxy.pool import Pool

    clock = Clock()
    connector = FakeConnector(clock)
    rng = rng if rng is not None else StubRandom(1.0)
    config = PoolConfig(
        min_idle, max_size, acquire_timeout, idle_timeout, max_lifetime, health_check_interval
    )
    pool = Pool(urls, config, strategy, connector.connect, clock, check_timeout, rng=rng)  # type: ignore[arg-type]
    if start:
        pool.start()
    return PoolHarness(pool, connector, clock, rng)
