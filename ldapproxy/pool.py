"""The upstream pool: verified TLS connections to each upstream URL, established ahead of
demand, leased one per client session, reset before reuse, health-checked while idle,
failed over, and recycled.

What a session gives back decides what happens to the connection (:class:`Disposition`):

* ``REUSE``: nothing is in flight and no Bind ran, so the connection is still anonymous;
  it goes straight back to ``IDLE``.
* ``RESET``: nothing is in flight but a Bind ran.  The connection goes back to ``IDLE``
  marked ``needs_reset``.  The next session replaces the identity before any of its
  requests runs: with its own simple Bind, sent alone, if that succeeds (RFC 4511 §4.2.1),
  else through :meth:`Pool.reset`, an anonymous simple Bind (RFC 4513 §5.1.1) that must
  succeed first.  So no session ever runs under the identity a previous session bound.
* ``CLOSE``: an operation is outstanding or abandoned (its results may still come), a SASL
  bind is in progress, the session used an operation or control whose connection state the proxy
  cannot reset, or the connection broke.  It is closed and replaced.

Each connection is in exactly one :class:`ConnectionState`; :meth:`Pool.stats` reports
them by these names.  Each upstream URL is ``UNKNOWN`` until its first connection attempt
ends, then ``UP`` or ``DOWN`` (:class:`UpstreamStatus`).  A ``DOWN`` upstream gets no new
sessions, and is probed with exponential backoff until a probe (a connection with
verified TLS and a root DSE read) succeeds.
"""

from __future__ import annotations

import enum
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ldapproxy import messages as m
from ldapproxy.ber import BerError, Frame
from ldapproxy.config import PoolConfig, UpstreamURL
from ldapproxy.metrics import Metrics
from ldapproxy.upstream import (
    ExchangeError,
    NoUpstreamAvailable,
    UpstreamError,
    UpstreamProtocol,
    UpstreamState,
)

log = Logger(namespace="ldapproxy.pool")

# The pool's own requests (health checks, probes, identity resets) run only when nothing
# else is in flight on the connection: idle ones, or a leased one whose session sends
# nothing until the reset is answered (and is closed, not reused, if it leaves before).
# So any message ID is free.
_CONTROL_MESSAGE_ID = 1

# Probes of a DOWN upstream: 1 s, 2 s, 4 s, ... up to this many seconds apart.
_MAX_BACKOFF = 60.0


class ConnectionState(enum.Enum):
    """Where one pooled upstream connection is in its life."""

    CONNECTING = "connecting"
    IDLE = "idle"
    CHECKING = "checking"
    RESETTING = "resetting"
    ACTIVE = "active"


#: States in which a session holds the connection.
_LEASED = frozenset({ConnectionState.ACTIVE, ConnectionState.RESETTING})


class UpstreamStatus(enum.Enum):
    """What the pool believes about one upstream URL."""

    UNKNOWN = "unknown"
    UP = "up"
    DOWN = "down"


class Disposition(enum.Enum):
    """What a session says about the connection it gives back (see the module docstring)."""

    REUSE = "reuse"
    RESET = "reset"
    CLOSE = "close"


class PoolBusy(Exception):
    """No upstream connection became free within ``pool.acquire_timeout``."""


@dataclass(frozen=True)
class UpstreamStats:
    """A snapshot of one upstream for metrics and logs, taken from the pool's own state."""

    url: str
    status: UpstreamStatus
    connections: dict[ConnectionState, int]


@dataclass(eq=False)
class _Connection:
    protocol: UpstreamProtocol
    state: ConnectionState
    expires: float
    idle_since: float = 0.0
    #: When the last health check started.
    checked: float = 0.0


@dataclass(eq=False)
class _Upstream:
    url: UpstreamURL
    status: UpstreamStatus = UpstreamStatus.UNKNOWN
    reason: str = ""
    connections: list[_Connection] = field(default_factory=list)
    failures: int = 0
    probe: IDelayedCall | None = None
    #: Connection attempts in flight (not yet a _Connection: nothing to lease).
    connecting: int = 0

    @property
    def size(self) -> int:
        return len(self.connections) + self.connecting

    def count(self, state: ConnectionState) -> int:
        return sum(1 for c in self.connections if c.state is state)

    def spare(self) -> int:
        """Connections that are or will soon be IDLE (for min_idle)."""
        return self.connecting + sum(1 for c in self.connections if c.state not in _LEASED)


class _IdleSink:
    """Watches a connection that no session holds: anything it says, or its loss, ends it."""

    def __init__(self, pool: Pool, connection: _Connection) -> None:
        self._pool = pool
        self._connection = connection

    def upstream_frames(self, frames: list[Frame]) -> None:
        self._pool._discard(self._connection, "unsolicited PDU on an idle connection")

    def upstream_lost(self, reason: str) -> None:
        self._pool._discard(self._connection, reason)


class Pool:
    """Upstream connections for all sessions; implements ``UpstreamSource``.

    ``connect`` opens one verified connection to a URL (``UpstreamDialer.connect_url``);
    ``clock`` and ``rng`` are injected so tests control time and jitter.
    """

    def __init__(
        self,
        urls: Sequence[UpstreamURL],
        config: PoolConfig,
        strategy: str,
        connect: Callable[[UpstreamURL], defer.Deferred[UpstreamProtocol]],
        clock: IReactorTime,
        check_timeout: float,
        rng: random.Random | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._upstreams = [_Upstream(url) for url in urls]
        self._config = config
        self._strategy = strategy
        self._connect = connect
        self._clock = clock
        self._check_timeout = check_timeout
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not security
        self._metrics = metrics or Metrics()
        self._waiters: deque[defer.Deferred[UpstreamProtocol]] = deque()
        self._cursor = 0
        self._running = False
        self._maintenance = task.LoopingCall(self._maintain)
        self._maintenance.clock = clock

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Warm every upstream up to ``pool.min_idle`` and start the periodic checks."""
        self._running = True
        for upstream in self._upstreams:
            self._replenish(upstream)
        self._maintenance.start(self._config.health_check_interval, now=False)

    def stop(self) -> None:
        """Close every connection and fail every waiting session."""
        self._running = False
        if self._maintenance.running:
            self._maintenance.stop()
        for upstream in self._upstreams:
            if upstream.probe is not None and upstream.probe.active():
                upstream.probe.cancel()
            for connection in list(upstream.connections):
                self._remove(upstream, connection)
                # A session holding the connection hears of its loss and tells its client.
                connection.protocol.close(notify=connection.state in _LEASED)
        while self._waiters:
            self._waiters.popleft().errback(NoUpstreamAvailable([]))

    def renew(self, connect: Callable[[UpstreamURL], defer.Deferred[UpstreamProtocol]]) -> None:
        """Open new connections with ``connect`` from now on (a reload changed the upstream
        TLS settings), and replace the existing ones gradually: each expires at a random
        point within the next health check interval, so that the directory does not see
        every connection reopen at once.  Leased ones are replaced when released."""
        self._connect = connect
        now = self._clock.seconds()
        spread = self._config.health_check_interval
        for upstream in self._upstreams:
            for connection in upstream.connections:
                connection.expires = min(connection.expires, now + self._rng.uniform(0, spread))

    @property
    def warm(self) -> bool:
        """Whether every upstream's first connection attempts have ended (up or down)."""
        return all(u.status is not UpstreamStatus.UNKNOWN for u in self._upstreams)

    def stats(self) -> list[UpstreamStats]:
        """The state of every upstream, read now (nothing is counted incrementally)."""
        result = []
        for upstream in self._upstreams:
            counts = {state: upstream.count(state) for state in ConnectionState}
            counts[ConnectionState.CONNECTING] += upstream.connecting
            result.append(UpstreamStats(str(upstream.url), upstream.status, counts))
        return result

    # -- leasing -----------------------------------------------------------------------

    def acquire(self) -> defer.Deferred[UpstreamProtocol]:
        """A READY connection for one session, leased until :meth:`release`.

        It is anonymous unless ``needs_reset`` is set, in which case the session must
        replace the identity before its first request (see the module docstring).

        Fails with :class:`NoUpstreamAvailable` when every upstream is down, and with
        :class:`PoolBusy` when none frees up within ``pool.acquire_timeout``.
        """
        candidates = self._candidates(turn=True)
        if not candidates:
            return defer.fail(NoUpstreamAvailable([_down_error(u) for u in self._upstreams]))
        for upstream in candidates:
            connection = self._take_idle(upstream)
            if connection is not None:
                self._replenish(upstream)
                self._metrics.pool_wait.observe(0.0)
                return defer.succeed(connection.protocol)
        waiter: defer.Deferred[UpstreamProtocol] = defer.Deferred(self._waiters.remove)
        timer = self._clock.callLater(self._config.acquire_timeout, self._expire, waiter)
        started = self._clock.seconds()

        def settled(result: Any) -> Any:
            if timer.active():
                timer.cancel()
            self._metrics.pool_wait.observe(self._clock.seconds() - started)
            return result

        waiter.addBoth(settled)
        self._waiters.append(waiter)
        self._grow()
        return waiter

    def release(self, protocol: UpstreamProtocol, disposition: Disposition) -> None:
        """A session is done with ``protocol``; see :class:`Disposition`."""
        found = self._find(protocol)
        if found is None:
            protocol.close()
            return
        upstream, connection = found
        if (
            disposition is Disposition.CLOSE
            or protocol.state is not UpstreamState.READY
            or upstream.status is UpstreamStatus.DOWN
            or self._clock.seconds() >= connection.expires
            or not self._running
        ):
            self._discard(connection, None)
        elif disposition is Disposition.RESET:
            # The bound identity stays until the next session replaces it with a simple
            # Bind of its own that succeeds, or has reset() send the anonymous Bind before
            # anything else (see Session._acquired).
            protocol.needs_reset = True
            self._idle(upstream, connection)
        else:
            self._idle(upstream, connection)

    # -- internals ---------------------------------------------------------------------

    def _candidates(self, turn: bool = False) -> list[_Upstream]:
        """Upstreams new sessions may use, in the order the strategy prefers them.

        ``turn`` moves round-robin on to the next upstream (once per acquire).
        """
        usable = [u for u in self._upstreams if u.status is not UpstreamStatus.DOWN]
        if self._strategy == "failover" or not usable:
            # Failover: only the first upstream that is not DOWN serves sessions; the
            # others keep their warm connections for when it fails.
            return usable[:1]
        start = self._cursor % len(usable)
        if turn:
            self._cursor += 1
        return usable[start:] + usable[:start]

    def _take_idle(self, upstream: _Upstream) -> _Connection | None:
        for connection in reversed(upstream.connections):
            if connection.state is ConnectionState.IDLE:
                connection.state = ConnectionState.ACTIVE
                return connection
        return None

    def _serve_waiters(self) -> None:
        """Give waiting sessions idle connections (after the candidates changed)."""
        for upstream in self._candidates():
            while self._waiters:
                connection = self._take_idle(upstream)
                if connection is None:
                    break
                self._waiters.popleft().callback(connection.protocol)
            self._replenish(upstream)

    def _grow(self) -> None:
        """Start enough connection attempts for the sessions that are waiting."""
        candidates = self._candidates()
        # Attempts to DOWN upstreams (probes) will not serve sessions: don't count them.
        missing = len(self._waiters) - sum(u.connecting for u in candidates)
        for upstream in candidates:
            while missing > 0 and upstream.size < self._config.max_size:
                self._open(upstream)
                missing -= 1

    def _replenish(self, upstream: _Upstream) -> None:
        """Keep ``pool.min_idle`` spare connections on an upstream that is not DOWN."""
        # _open can fail synchronously and mark the upstream DOWN: test on every turn.
        while (
            self._running
            and upstream.status is not UpstreamStatus.DOWN
            and upstream.spare() < self._config.min_idle
            and upstream.size < self._config.max_size
        ):
            self._open(upstream)

    def _open(self, upstream: _Upstream) -> None:
        upstream.connecting += 1
        self._connect(upstream.url).addCallbacks(
            self._opened, self._open_failed, callbackArgs=(upstream,), errbackArgs=(upstream,)
        )

    def _opened(self, protocol: UpstreamProtocol, upstream: _Upstream) -> None:
        upstream.connecting -= 1
        if not self._running or upstream.status is UpstreamStatus.DOWN:
            # A DOWN upstream comes back only through a probe (which also reads the
            # root DSE), not through an attempt that was already under way.
            protocol.close()
            self._schedule_probe(upstream, 1.0)
            return
        lifetime = self._config.max_lifetime * self._rng.uniform(0.75, 1.0)
        connection = _Connection(
            protocol, ConnectionState.CONNECTING, self._clock.seconds() + lifetime
        )
        upstream.connections.append(connection)
        self._mark_up(upstream)
        self._idle(upstream, connection)

    def _open_failed(self, failure: Failure, upstream: _Upstream) -> None:
        upstream.connecting -= 1
        self._metrics.count_connect_error(str(upstream.url), _error_kind(failure))
        self._mark_down(upstream, _reason(failure))
        self._serve_waiters()
        self._grow()
        if not self._candidates():
            self._fail_waiters()

    def _idle(self, upstream: _Upstream, connection: _Connection, fresh: bool = True) -> None:
        """``connection`` is anonymous and free: give it to a waiting session, or keep it.

        ``fresh`` is False after a health check, which does not count as use.
        """
        connection.protocol.attach(_IdleSink(self, connection))
        while self._waiters and upstream in self._candidates():
            waiter = self._waiters.popleft()
            connection.state = ConnectionState.ACTIVE
            waiter.callback(connection.protocol)
            return
        connection.state = ConnectionState.IDLE
        if fresh:
            connection.idle_since = self._clock.seconds()

    def reset(self, protocol: UpstreamProtocol) -> defer.Deferred[None]:
        """Make a leased connection anonymous again: send an anonymous simple Bind (RFC 4513
        §5.1.1) and fire once the directory answered ``success``.

        Fails with :class:`ExchangeError` otherwise; the session then gives the connection
        back with ``CLOSE``.  The session's sink must be attached again afterwards.
        """
        found = self._find(protocol)
        if found is None or found[1].state is not ConnectionState.ACTIVE:
            return defer.fail(ExchangeError("the connection is not leased from the pool"))
        _, connection = found
        connection.state = ConnectionState.RESETTING
        bind = m.anonymous_bind_request(_CONTROL_MESSAGE_ID)

        def settled(result: Any) -> Any:
            if connection.state is ConnectionState.RESETTING:
                connection.state = ConnectionState.ACTIVE
            return result

        def anonymous(_: None) -> None:
            protocol.needs_reset = False

        return (
            self._ask(protocol, bind, m.BIND_RESPONSE, "identity reset")
            .addBoth(settled)
            .addCallback(anonymous)
        )

    def _check(self, upstream: _Upstream, connection: _Connection) -> None:
        connection.state = ConnectionState.CHECKING
        search = m.root_dse_search(_CONTROL_MESSAGE_ID, (b"1.1",))

        def passed(_: None) -> None:
            if connection in upstream.connections:
                self._idle(upstream, connection, fresh=False)

        def failed(failure: Failure) -> None:
            self._discard(connection, failure.getErrorMessage())

        self._ask(connection.protocol, search, m.SEARCH_RESULT_DONE, "health check").addCallbacks(
            passed, failed
        )

    def _ask(
        self, protocol: UpstreamProtocol, pdu: bytes, final_op: int, what: str
    ) -> defer.Deferred[None]:
        """Send one of the pool's own requests (a reset, a health check or a probe) and
        fire once its final response is ``final_op`` with ``success``.

        Fails with :class:`ExchangeError` ("<what> refused: ..." or "<what> failed: ...")
        on any other answer, a lost connection, or no answer within ``check_timeout``.
        """
        done = protocol.exchange(pdu, _CONTROL_MESSAGE_ID)
        done.addTimeout(self._check_timeout, self._clock)

        def failed(failure: Failure) -> list[Frame]:
            if isinstance(failure.value, defer.TimeoutError | defer.CancelledError):
                why = f"no answer within {self._check_timeout:g} s"
            else:
                why = _reason(failure)
            raise ExchangeError(f"{what} failed: {why}")

        def answered(frames: list[Frame]) -> None:
            final = frames[-1]
            try:
                code = m.result_code(final.data)
            except BerError:
                code = -1
            if final.op != final_op or code != m.SUCCESS:
                raise ExchangeError(f"{what} refused: {m.result_name(code)} ({code})")

        # Errors of the exchange itself first, then the answer's own verdict.
        return done.addErrback(failed).addCallback(answered)

    def _discard(self, connection: _Connection, reason: str | None) -> None:
        """Close ``connection`` and replace it if needed; ``reason`` says why, if unplanned."""
        found = self._find(connection.protocol)
        if found is None:
            return
        upstream, _ = found
        self._remove(upstream, connection)
        if reason is not None:
            log.info(
                "upstream {url}: connection closed: {reason}", url=str(upstream.url), reason=reason
            )
        connection.protocol.close()
        self._replenish(upstream)
        self._grow()

    def _remove(self, upstream: _Upstream, connection: _Connection) -> None:
        if connection in upstream.connections:
            upstream.connections.remove(connection)

    def _find(self, protocol: UpstreamProtocol) -> tuple[_Upstream, _Connection] | None:
        for upstream in self._upstreams:
            for connection in upstream.connections:
                if connection.protocol is protocol:
                    return upstream, connection
        return None

    def _expire(self, waiter: defer.Deferred[UpstreamProtocol]) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)
            waiter.errback(
                PoolBusy(
                    f"no upstream connection free within pool.acquire_timeout = "
                    f"{self._config.acquire_timeout:g} s (pool.max_size = {self._config.max_size})"
                )
            )

    def _fail_waiters(self) -> None:
        errors = [_down_error(u) for u in self._upstreams]
        while self._waiters:
            self._waiters.popleft().errback(NoUpstreamAvailable(errors))

    # -- health --------------------------------------------------------------------------

    def _mark_up(self, upstream: _Upstream) -> None:
        if upstream.status is not UpstreamStatus.UP:
            if upstream.status is UpstreamStatus.DOWN:
                log.info("upstream {url} is up again", url=str(upstream.url))
            upstream.status = UpstreamStatus.UP
            upstream.reason = ""
            upstream.failures = 0
            if upstream.probe is not None and upstream.probe.active():
                upstream.probe.cancel()
            upstream.probe = None
            self._replenish(upstream)

    def _mark_down(self, upstream: _Upstream, reason: str, probe: bool = False) -> None:
        """Record a failed connection attempt, health check or probe of ``upstream``."""
        if probe:
            upstream.failures += 1
        if upstream.status is not UpstreamStatus.DOWN:
            log.warn("upstream {url} is down: {reason}", url=str(upstream.url), reason=reason)
            upstream.status = UpstreamStatus.DOWN
            upstream.reason = reason
            upstream.failures = 0
            # Idle connections to it are suspect; sessions holding one keep it.
            for connection in list(upstream.connections):
                if connection.state not in _LEASED:
                    self._remove(upstream, connection)
                    connection.protocol.close()
        self._schedule_probe(upstream, min(_MAX_BACKOFF, 2.0**upstream.failures))

    def _schedule_probe(self, upstream: _Upstream, delay: float) -> None:
        if self._running and (upstream.probe is None or not upstream.probe.active()):
            upstream.probe = self._clock.callLater(delay, self._probe, upstream)

    def _probe(self, upstream: _Upstream) -> None:
        upstream.probe = None
        if not self._running or upstream.status is not UpstreamStatus.DOWN:
            return
        if upstream.connecting:
            # An attempt from before it went down is still under way; look again soon.
            self._schedule_probe(upstream, 1.0)
        else:
            upstream.connecting += 1
            self._connect(upstream.url).addCallbacks(
                self._probed, self._probe_failed, callbackArgs=(upstream,), errbackArgs=(upstream,)
            )

    def _probe_failed(self, failure: Failure, upstream: _Upstream) -> None:
        upstream.connecting -= 1
        self._metrics.count_connect_error(str(upstream.url), _error_kind(failure))
        self._mark_down(upstream, _reason(failure), probe=True)

    def _probed(self, protocol: UpstreamProtocol, upstream: _Upstream) -> None:
        """A probe connected with verified TLS; it counts as UP once it reads the root DSE."""
        search = m.root_dse_search(_CONTROL_MESSAGE_ID, (b"1.1",))

        def passed(_: None) -> None:
            self._mark_up(upstream)
            self._opened(protocol, upstream)

        def failed(failure: Failure) -> None:
            upstream.connecting -= 1
            protocol.close()
            self._mark_down(upstream, failure.getErrorMessage(), probe=True)

        self._ask(protocol, search, m.SEARCH_RESULT_DONE, "health check").addCallbacks(
            passed, failed
        )

    def _maintain(self) -> None:
        """Every ``pool.health_check_interval``: check idle connections, retire old ones."""
        now = self._clock.seconds()
        for upstream in self._upstreams:
            idle = [c for c in upstream.connections if c.state is ConnectionState.IDLE]
            spare = len(idle)
            for connection in idle:
                if now >= connection.expires or (
                    spare > self._config.min_idle
                    and now - connection.idle_since >= self._config.idle_timeout
                ):
                    self._discard(connection, None)
                    spare -= 1
                elif now - max(connection.idle_since, connection.checked) >= (
                    0.9 * self._config.health_check_interval  # ticks fire a little late
                ):
                    connection.checked = now
                    self._check(upstream, connection)
            self._replenish(upstream)


def _error_kind(failure: Failure) -> str:
    """A bounded label for a failed connection attempt: connect, timeout, starttls,
    certificate or tls."""
    error = failure.value
    text = str(error).lower()
    if "timed out" in text or "timeout" in text:
        return "timeout"
    if not isinstance(error, UpstreamError) or not error.reachable:
        return "connect"
    if "starttls" in text:
        return "starttls"
    if error.certificate is not None and "certificate" in text:
        return "certificate"
    return "tls"


def _reason(failure: Failure) -> str:
    if isinstance(failure.value, UpstreamError):
        return failure.value.reason
    return failure.getErrorMessage() or type(failure.value).__name__


def _down_error(upstream: _Upstream) -> UpstreamError:
    return UpstreamError(upstream.url, upstream.reason or upstream.status.value)
