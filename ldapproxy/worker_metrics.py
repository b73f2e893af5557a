"""Combining the metrics of ``[process] workers``: each worker's page is fetched over its
unix socket (bounded in time and size) and identical samples are summed into one page.

The supervisor (:mod:`ldapproxy.workers`) serves the result on ``[metrics] endpoint``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client import generate_latest as _generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

#: How long one scrape of one worker's page may take, and its largest size.
SCRAPE_TIMEOUT = 3.0
MAX_PAGE_BYTES = 16 * 1024 * 1024
#: Samples combined with min() rather than summed across workers.
_MIN_SAMPLES = frozenset(
    {"ldapproxy_upstream_up", "ldapproxy_tls_certificate_expiry_timestamp_seconds"}
)
#: Per-process metrics: kept per worker (a ``worker`` label), never summed.
_PER_PROCESS = ("process_", "python_")


def aggregate(pages: Iterable[tuple[str, str]]) -> list[Metric]:
    """Combine Prometheus text pages, ``(worker, text)`` pairs, into one set of families.

    Samples with the same name and labels are summed (counters, histogram buckets, sums
    and counts, and gauges such as open connections); ``*_created`` timestamps and the
    gauges in :data:`_MIN_SAMPLES` (upstream up, certificate expiry) take the minimum;
    ``process_*`` and ``python_*`` families keep each page's samples with a ``worker``
    label instead.
    """
    families: dict[tuple[str, str], Metric] = {}
    values: dict[tuple[str, str], dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for worker, text in pages:
        for family in text_string_to_metric_families(text):
            key = (family.name, family.type)
            if key not in families:
                families[key] = Metric(family.name, family.documentation, family.type)
                values[key] = {}
            per_process = family.name.startswith(_PER_PROCESS)
            samples = values[key]
            for sample in family.samples:
                labels = dict(sample.labels)
                if per_process:
                    labels["worker"] = worker
                sample_key = (sample.name, tuple(sorted(labels.items())))
                if sample_key not in samples:
                    samples[sample_key] = sample.value
                elif sample.name.endswith("_created") or sample.name in _MIN_SAMPLES:
                    samples[sample_key] = min(samples[sample_key], sample.value)
                else:
                    samples[sample_key] += sample.value
    result = []
    for key, metric in families.items():
        for (name, label_pairs), value in values[key].items():
            metric.add_sample(name, dict(label_pairs), value)
        result.append(metric)
    return result


class _Families:
    """A collector yielding fixed metric families (for rendering :func:`aggregate`)."""

    def __init__(self, families: Sequence[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return iter(self._families)


def render(families: Sequence[Metric]) -> bytes:
    """The Prometheus text page of ``families``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    page: bytes = _generate_latest(registry)
    return page


class _HTTPFetch(Protocol):
    """A one-shot ``GET PATH HTTP/1.0`` over a unix socket, bounded in size."""

    def __init__(self, path: str) -> None:
        self._path = path
        self._data = bytearray()
        self._too_big = False
        self.done: defer.Deferred[tuple[int, bytes]] = defer.Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(f"GET {self._path} HTTP/1.0\r\nHost: worker\r\n\r\n".encode())

    def dataReceived(self, data: bytes) -> None:
        self._data += data
        if len(self._data) > MAX_PAGE_BYTES and not self._too_big:
            self._too_big = True
            assert self.transport is not None
            self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self.done.called:
            return
        head, separator, body = bytes(self._data).partition(b"\r\n\r\n")
        status = head.split(b" ", 2)
        if self._too_big or not separator or len(status) < 2 or not status[1].isdigit():
            self.done.errback(ValueError("no complete HTTP response"))
        else:
            self.done.callback((int(status[1]), body))


def fetch(reactor: Any, socket_path: str, path: str) -> defer.Deferred[tuple[int, bytes]]:
    """``(status, body)`` of ``GET path`` from a worker's unix socket, or a failure after
    :data:`SCRAPE_TIMEOUT` seconds or for a page over :data:`MAX_PAGE_BYTES`."""
    from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol

    protocol = _HTTPFetch(path)
    endpoint = UNIXClientEndpoint(reactor, socket_path, timeout=SCRAPE_TIMEOUT)  # type: ignore[no-untyped-call]
    connecting = connectProtocol(endpoint, protocol)  # type: ignore[no-untyped-call]

    def give_up() -> None:
        if protocol.done.called:
            return
        connecting.cancel()
        if protocol.transport is not None:
            protocol.transport.abortConnection()  # type: ignore[attr-defined]
        if not protocol.done.called:
            protocol.done.errback(TimeoutError(f"no answer within {SCRAPE_TIMEOUT:g} s"))

    timer = reactor.callLater(SCRAPE_TIMEOUT, give_up)

    def connect_failed(failure: Failure) -> None:
        if not protocol.done.called:
            protocol.done.errback(failure)

    connecting.addErrback(connect_failed)

    def finished(result: Any) -> Any:
        if timer.active():
            timer.cancel()
        return result

    return protocol.done.addBoth(finished)
