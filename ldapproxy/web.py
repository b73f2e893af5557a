"""The HTTP side of the proxy: ``/metrics`` for Prometheus, and ``/healthz`` and
``/readyz`` for load balancers and service managers, as a small twisted.web site.

The metrics page renders this proxy's own registry (not the global one) on the reactor
thread: ``prometheus_client.twisted.MetricsResource`` would use a thread pool and the
global reactor.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from twisted.web.resource import Resource
from twisted.web.server import Request, Site


class _MetricsPage(Resource):
    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self._registry = registry

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(self._registry)


class _Check(Resource):
    """200 and ``ok`` while ``problem()`` returns None, else 503 and the problem."""

    isLeaf = True

    def __init__(self, problem: Callable[[], str | None]) -> None:
        super().__init__()
        self._problem = problem

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        problem = self._problem()
        if problem is None:
            return b"ok\n"
        request.setResponseCode(503)
        return f"{problem}\n".encode()


def site(registry: CollectorRegistry, not_ready: Callable[[], str | None]) -> Site:
    """The site served on ``metrics.endpoint``.

    ``/healthz`` answers 200 while the process serves HTTP at all; ``/readyz`` answers
    200 only while ``not_ready()`` returns None, else 503 with its short reason.
    """
    root = Resource()
    root.putChild(b"metrics", _MetricsPage(registry))
    root.putChild(b"healthz", _Check(lambda: None))
    root.putChild(b"readyz", _Check(not_ready))
    result = Site(root)
    result.noisy = False
    result.displayTracebacks = False
    return result
