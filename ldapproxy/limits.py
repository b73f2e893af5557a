"""Connection limits: how many clients may be connected at once, in all and per address.

:class:`ConnectionLimiter` is plain Python, shared by every listener of the process.  A
connection is counted from accept (:meth:`ConnectionLimiter.admit`) and, once its client
address is known (after the PROXY header on ``proxy_protocol`` listeners), per address
(:meth:`ConnectionLimiter.admit_address`); each admission is undone exactly once when
the connection closes.  A refused connection is closed before a byte is read or written.

Refusals come in floods (a scanner, a misbehaving client farm), so they are logged at
most once per :data:`LOG_INTERVAL` seconds per limit, with the number refused since the
previous line; every refusal is counted in ``ldapproxy_limits_exceeded_total``.
"""

from __future__ import annotations

from collections import Counter

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ldapproxy.config import LimitsConfig
from ldapproxy.metrics import Metrics
from ldapproxy.session import format_peer

log = Logger(namespace="ldapproxy.limits")

#: Seconds between two log lines about refusals of the same limit.
LOG_INTERVAL = 10.0


class ConnectionLimiter:
    """Counts open client connections and refuses those past ``limits.max_connections``
    and ``limits.max_connections_per_ip``."""

    def __init__(self, limits: LimitsConfig, clock: IReactorTime, metrics: Metrics) -> None:
        self.limits = limits
        self._clock = clock
        self._metrics = metrics
        #: Connections accepted and not yet closed.
        self.open = 0
        #: Per client address, connections whose address was admitted and not yet closed.
        self.by_address: Counter[str] = Counter()
        #: Per limit: when it was last logged, and how many refusals since.
        self._logged: dict[str, float] = {}
        self._unlogged: Counter[str] = Counter()

    def configure(self, limits: LimitsConfig) -> None:
        """New limits (a reload): they apply to connections accepted from now on."""
        self.limits = limits

    def admit(self, listener: str, peer: tuple[str, int]) -> bool:
        """A connection was accepted from ``peer``: count it, or refuse it (False)."""
        if self.open >= self.limits.max_connections:
            self._refused(
                "max_connections",
                self.limits.max_connections,
                f"connection from {format_peer(peer)} on listener {listener} refused: "
                f"{self.open} client connections open",
            )
            return False
        self.open += 1
        return True

    @property
    def per_address(self) -> bool:
        """Whether connections are counted per address (``max_connections_per_ip`` set)."""
        return self.limits.max_connections_per_ip > 0

    def release(self) -> None:
        """An admitted connection closed."""
        self.open -= 1

    def admit_address(self, listener: str, peer: tuple[str, int]) -> bool:
        """The client of an admitted connection is at ``peer``: count its address, or
        refuse it (False).  Only while :attr:`per_address`: a limit set by a reload counts
        the connections accepted from then on."""
        host = peer[0]
        limit = self.limits.max_connections_per_ip
        if self.by_address[host] >= limit:
            self._refused(
                "max_connections_per_ip",
                limit,
                f"connection from {format_peer(peer)} on listener {listener} refused: "
                f"{self.by_address[host]} connections open from {host}",
            )
            return False
        self.by_address[host] += 1
        return True

    def release_address(self, host: str) -> None:
        """A connection whose address was admitted closed."""
        left = self.by_address[host] - 1
        if left > 0:
            self.by_address[host] = left
        else:
            del self.by_address[host]  # no entry per address that ever connected

    def _refused(self, limit: str, value: int, what: str) -> None:
        self._metrics.count_limit(limit)
        now = self._clock.seconds()
        last = self._logged.get(limit)
        if last is not None and now - last < LOG_INTERVAL:
            self._unlogged[limit] += 1
            return
        self._logged[limit] = now
        more = self._unlogged.pop(limit, 0)
        log.warn(
            "{what} (limits.{limit} = {value}){more}",
            what=what,
            limit=limit,
            value=value,
            more=f"; {more} more refused since the last such line" if more else "",
        )
