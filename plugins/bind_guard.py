"""The ``bind_guard`` plugin: refuse binds from addresses and for accounts with too many recent
failed binds."""

from __future__ import annotations

import ipaddress
import re
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

from ldapproxy.hooks import (
    ALLOW,
    UNWILLING_TO_PERFORM,
    Plugin,
    PluginContext,
    PluginOptions,
    Request,
    Response,
    Verdict,
    deny,
)

if TYPE_CHECKING:  # the types of PluginContext.clock and of what its callLater returns
    from twisted.internet.interfaces import IDelayedCall, IReactorTime

#: invalidCredentials: the only result that counts as a failed bind.
INVALID_CREDENTIALS = 49

_AROUND_SEPARATORS = re.compile(r"\s*([,=+])\s*")


def normalise_dn(dn: str) -> str:
    """``dn`` lower-cased, without the spaces around ``,``, ``=`` and ``+``.

    Directories match the usual naming attributes (``uid``, ``cn``, ``dc``...) ignoring
    case and ignore those spaces, so ``UID=Alice, dc=example`` names the same account as
    ``uid=alice,dc=example``; without this, each spelling would get its own allowance.
    """
    return _AROUND_SEPARATORS.sub(r"\1", dn.strip()).lower()


def normalise_address(host: str) -> str:
    """``host`` with an IPv4-mapped IPv6 address (``::ffff:192.0.2.1``, as reported by a
    dual-stack listener) written as the IPv4 address, so both count as one client."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


class Failures:
    """Timestamps of recent failures per key, in a sliding window.

    A key keeps at most ``limit`` timestamps (more are never needed to tell whether the
    limit is reached) and is dropped once they all expired, so memory is bounded by the
    number of keys that failed within the last window or two (see :meth:`sweep`).
    """

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self.times: dict[str, deque[float]] = {}

    def add(self, key: str, now: float) -> None:
        """Record a failure of ``key`` at ``now``."""
        self.times.setdefault(key, deque(maxlen=self.limit)).append(now)

    def reached(self, key: str, now: float) -> bool:
        """Whether ``key`` failed at least ``limit`` times within the window before ``now``."""
        times = self.times.get(key)  # never insert here: lookups must not grow the table
        if times is None:
            return False
        self._expire(key, times, now)
        return len(times) >= self.limit

    def sweep(self, now: float) -> None:
        """Drop every expired timestamp, and the keys left without any."""
        for key, times in list(self.times.items()):
            self._expire(key, times, now)

    def _expire(self, key: str, times: deque[float], now: float) -> None:
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self.times[key]


class BindGuard(Plugin):
    """Count failed binds per client address and per bind DN; refuse further binds from an
    address or for a DN that reached its limit within the window.

    Successful binds neither reset nor are refused below the limit; see the documentation
    for why.
    """

    options: ClassVar[Mapping[str, str]] = {
        "max_failures_per_ip": "20",
        "max_failures_per_dn": "5",
        "window": "300",
    }
    request_fields: ClassVar[frozenset[str]] = frozenset({"bind"})

    def __init__(self, clock: IReactorTime, per_ip: int, per_dn: int, window: float) -> None:
        self.clock = clock
        self.window = window
        self.by_ip = Failures(per_ip, window)
        self.by_dn = Failures(per_dn, window)
        self._sweep_call: IDelayedCall | None = None

    @classmethod
    def from_config(cls, options: PluginOptions, context: PluginContext) -> BindGuard:
        """Read the limits and the window."""
        per_ip = options.integer("max_failures_per_ip", 20, minimum=1)
        per_dn = options.integer("max_failures_per_dn", 5, minimum=1)
        window = options.seconds("window", 300)
        options.finish()
        return cls(context.clock, per_ip, per_dn, window)

    def start(self) -> None:
        """Start the periodic sweep that forgets addresses and DNs whose failures expired."""
        self._schedule_sweep()

    def stop(self) -> None:
        """Cancel the sweep."""
        if self._sweep_call is not None and self._sweep_call.active():
            self._sweep_call.cancel()
        self._sweep_call = None

    def request(self, request: Request) -> Verdict:
        """Refuse a bind from an address, or for a DN, over its limit."""
        if request.op != "bind":
            return ALLOW
        now = self.clock.seconds()
        if self.by_ip.reached(normalise_address(request.connection.client_host), now):
            return deny(
                UNWILLING_TO_PERFORM,
                "too many failed binds from this address; try again later",
                reason="ip_failures",
            )
        dn = _bind_dn(request)
        if dn and self.by_dn.reached(dn, now):
            return deny(
                UNWILLING_TO_PERFORM,
                "too many failed binds for this account; try again later",
                reason="dn_failures",
            )
        return ALLOW

    def response(self, response: Response) -> None:
        """Count a bind the upstream refused with invalidCredentials."""
        request = response.request
        # A local response (this plugin's own deny, a busy upstream...) is no verdict on
        # the credentials, so it does not count.
        if request.op != "bind" or response.local or response.result != INVALID_CREDENTIALS:
            return
        now = self.clock.seconds()
        # Counted per address even without a DN: a SASL bind carries its identity in the
        # credentials, and guessing through SASL must not escape the address limit.
        self.by_ip.add(normalise_address(request.connection.client_host), now)
        dn = _bind_dn(request)
        if dn:
            self.by_dn.add(dn, now)

    def _schedule_sweep(self) -> None:
        # Once per window (but not more than once a second, for absurdly short windows): a
        # key is forgotten at most one interval after its last failure expired.
        self._sweep_call = self.clock.callLater(max(self.window, 1.0), self._sweep)

    def _sweep(self) -> None:
        # Keys are otherwise dropped only when looked up again; an attacker trying many
        # DNs once each never looks them up, so they must be swept.
        now = self.clock.seconds()
        self.by_ip.sweep(now)
        self.by_dn.sweep(now)
        self._schedule_sweep()


def _bind_dn(request: Request) -> str:
    """The normalised bind DN of ``request``; ``""`` for an anonymous bind (or a SASL bind
    without a name)."""
    return normalise_dn(request.fields.dn) if request.fields is not None else ""
