"""What the proxy counts for Prometheus: cheap counters updated on the reactor thread, and
a collector that turns them, and the live state of sessions, pool and certificates, into
metric families when Prometheus scrapes.

Counting is plain Python (a dict increment per event, a bisect per observed duration)
rather than ``prometheus_client`` metric objects, which take a lock per update: the proxy
counts on every operation, and scrapes are rare.  Gauges (connections, upstream state,
certificate expiry) are read from their owners at scrape time, so they cannot drift.

Label values always come from small fixed sets (operation and result names, listener
names, upstream URLs, state names, reason words): never a DN, an address or a filter.
"""

from __future__ import annotations

import bisect
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from ldapproxy import messages as m

#: Fine enough to see sub-millisecond proxying, wide enough for slow searches.
OPERATION_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
#: The ``limit`` label of ``ldapproxy_limits_exceeded_total``: the ``[limits]`` keys whose
#: excess the proxy counts.
LIMITS = (
    "max_connections",
    "max_connections_per_ip",
    "max_pending_ops",
    "first_request_timeout",
    "operation_timeout",
)
POOL_WAIT_BUCKETS = (0.0001, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    """Observations counted into fixed buckets (upper bounds, ``+Inf`` implied)."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        """Count one observation."""
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative ``(le, count)`` pairs, as the exposition format wants them."""
        cumulative, running = [], 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            cumulative.append((bound, float(running)))
        return cumulative


@dataclass(frozen=True)
class Sources:
    """Where the scrape-time gauges come from; each returns its current samples."""

    #: ``(listener, tls)`` of every open client connection.
    client_connections: Callable[[], Iterable[tuple[str, str]]] = tuple
    #: ``(upstream, up)`` per upstream URL.
    upstream_up: Callable[[], Iterable[tuple[str, bool]]] = tuple
    #: ``(upstream, state, count)`` per URL and connection state.
    upstream_connections: Callable[[], Iterable[tuple[str, str, int]]] = tuple
    #: ``(role, subject, not_after)`` of the served and the upstream certificates.
    certificates: Callable[[], Iterable[tuple[str, str, float]]] = tuple


class Metrics:
    """Every counter the proxy keeps, and the collector that exports them.

    One instance per proxy process; sessions, the pool and the service call the
    ``count_*`` and ``observe_*`` methods.  :meth:`register` adds it to a registry.
    """

    def __init__(self) -> None:
        self.sources = Sources()
        self.client_connections_total: Tally[str] = Tally()
        self.operations: Tally[tuple[str, str]] = Tally()
        self.durations: dict[str, Histogram] = {}
        self.starttls: Tally[tuple[str, str]] = Tally()
        self.handshake_failures: Tally[tuple[str, str]] = Tally()
        self.connect_errors: Tally[tuple[str, str]] = Tally()
        self.pool_wait = Histogram(POOL_WAIT_BUCKETS)
        self.bytes: Tally[str] = Tally()
        # Both outcomes exist from the start, so that increase() sees the first failure.
        self.reloads: Tally[str] = Tally({"success": 0, "failure": 0})
        self.denials: Tally[tuple[str, str]] = Tally()
        # Every limit exists from the start, so that increase() sees the first hit.
        self.limits_exceeded: Tally[str] = Tally(dict.fromkeys(LIMITS, 0))

    def register(self, registry: CollectorRegistry) -> None:
        """Export through ``registry``."""
        registry.register(_Collector(self))

    # -- counting (reactor thread) --

    def count_client(self, listener: str) -> None:
        """A client connection was accepted on ``listener``."""
        self.client_connections_total[listener] += 1

    def count_operation(self, request_op: int, code: int, seconds: float) -> None:
        """A request of type ``request_op`` got its final response ``code``."""
        op = m.REQUEST_NAMES.get(request_op, "unknown")
        self.operations[op, m.result_name(code)] += 1
        histogram = self.durations.get(op)
        if histogram is None:
            histogram = self.durations[op] = Histogram(OPERATION_BUCKETS)
        histogram.observe(seconds)

    def count_starttls(self, listener: str, outcome: str) -> None:
        """A StartTLS request ended with ``outcome``: success, failure (the handshake
        failed), unavailable (not offered) or refused (TLS already on, operations in
        flight)."""
        self.starttls[listener, outcome] += 1

    def count_handshake_failure(self, listener: str, reason: str) -> None:
        """A client TLS handshake failed (``reason`` from :func:`handshake_failure_reason`)."""
        self.handshake_failures[listener, reason] += 1

    def count_connect_error(self, upstream: str, reason: str) -> None:
        """A connection attempt to ``upstream`` failed."""
        self.connect_errors[upstream, reason] += 1

    def count_denial(self, plugin: str, reason: str) -> None:
        """A plugin denied a connection or a request, with its verdict's reason word."""
        self.denials[plugin, reason] += 1

    def count_limit(self, limit: str) -> None:
        """A client hit ``limits.<limit>`` (one of :data:`LIMITS`)."""
        self.limits_exceeded[limit] += 1

    def count_reload(self, outcome: str) -> None:
        """A configuration reload ended with ``outcome`` (success or failure)."""
        self.reloads[outcome] += 1


def handshake_failure_reason(error: str) -> str:
    """A bounded label for a client handshake failure, from its error text."""
    text = error.lower()
    for needle, reason in (
        ("timeout", "timeout"),
        ("timed out", "timeout"),
        ("unsupported protocol", "protocol_version"),
        # Before "wrong version": OpenSSL's error for plain LDAP sent to a TLS listener.
        ("wrong version number", "not_tls"),
        ("wrong version", "protocol_version"),
        ("version too low", "protocol_version"),
        ("no shared cipher", "no_shared_cipher"),
        ("unknown ca", "client_rejected_certificate"),
        ("bad certificate", "client_rejected_certificate"),
        ("certificate unknown", "client_rejected_certificate"),
        ("http request", "not_tls"),
        ("connection was closed", "closed"),
        ("connection lost", "closed"),
        ("connectiondone", "closed"),
        ("connectionlost", "closed"),
    ):
        if needle in text:
            return reason
    return "other"


class _Collector:
    """Turns :class:`Metrics` into metric families at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        mx = self._metrics
        sources = mx.sources
        connections = GaugeMetricFamily(
            "ldapproxy_client_connections",
            "Open client connections.",
            labels=["listener", "tls"],
        )
        for (listener, tls), count in Tally(sources.client_connections()).items():
            connections.add_metric([listener, tls], count)
        yield connections
        yield _counter(
            "ldapproxy_client_connections",
            "Client connections accepted.",
            ["listener"],
            {(k,): v for k, v in mx.client_connections_total.items()},
        )
        yield _counter(
            "ldapproxy_operations",
            "Operations by final result (the LDAP result name).",
            ["op", "result"],
            dict(mx.operations),
        )
        durations = HistogramMetricFamily(
            "ldapproxy_operation_duration_seconds",
            "Seconds from a request's arrival to its final response.",
            labels=["op"],
        )
        for op, histogram in sorted(mx.durations.items()):
            durations.add_metric([op], histogram.buckets(), histogram.total)
        yield durations
        yield _counter(
            "ldapproxy_starttls",
            "StartTLS requests by outcome.",
            ["listener", "outcome"],
            dict(mx.starttls),
        )
        yield _counter(
            "ldapproxy_tls_handshake_failures",
            "Client TLS handshakes that failed, by reason.",
            ["listener", "reason"],
            dict(mx.handshake_failures),
        )
        up = GaugeMetricFamily(
            "ldapproxy_upstream_up", "1 if the upstream URL is usable, else 0.", labels=["upstream"]
        )
        for upstream, is_up in sources.upstream_up():
            up.add_metric([upstream], 1.0 if is_up else 0.0)
        yield up
        pooled = GaugeMetricFamily(
            "ldapproxy_upstream_connections",
            "Upstream connections by pool state.",
            labels=["upstream", "state"],
        )
        for upstream, state, count in sources.upstream_connections():
            pooled.add_metric([upstream, state], count)
        yield pooled
        yield _counter(
            "ldapproxy_upstream_connect_errors",
            "Failed upstream connection attempts, by reason.",
            ["upstream", "reason"],
            dict(mx.connect_errors),
        )
        wait = HistogramMetricFamily(
            "ldapproxy_pool_wait_seconds", "Seconds sessions waited for an upstream connection."
        )
        wait.add_metric([], mx.pool_wait.buckets(), mx.pool_wait.total)
        yield wait
        yield _counter(
            "ldapproxy_bytes",
            "Bytes received from (in) and sent to (out) clients.",
            ["direction"],
            {(k,): v for k, v in mx.bytes.items()},
        )
        expiry = GaugeMetricFamily(
            "ldapproxy_tls_certificate_expiry_timestamp_seconds",
            "notAfter of the served certificate and of the upstream certificates seen.",
            labels=["role", "subject"],
        )
        for role, subject, not_after in sources.certificates():
            expiry.add_metric([role, subject], not_after)
        yield expiry
        yield _counter(
            "ldapproxy_plugin_denials",
            "Connections and requests denied by plugins, by plugin and verdict reason.",
            ["plugin", "reason"],
            dict(mx.denials),
        )
        yield _counter(
            "ldapproxy_limits_exceeded",
            "Clients that hit a [limits] key: connections refused (max_connections, "
            "max_connections_per_ip), requests answered busy (max_pending_ops), sessions "
            "closed (first_request_timeout, operation_timeout).",
            ["limit"],
            {(k,): v for k, v in mx.limits_exceeded.items()},
        )
        yield _counter(
            "ldapproxy_config_reloads",
            "Configuration reloads (SIGHUP) by outcome.",
            ["outcome"],
            {(k,): v for k, v in mx.reloads.items()},
        )


def _counter(
    name: str, documentation: str, labels: list[str], values: dict[Any, int]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric(list(key), value)
    return family
