"""Assembles the proxy from a configuration: TLS contexts, the upstream pool and the
listeners, as one Twisted service."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from prometheus_client import CollectorRegistry
from twisted.application.service import MultiService
from twisted.internet import defer, endpoints
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from ldapproxy.client import ClientFactory
from ldapproxy.config import Config, ListenerTLS
from ldapproxy.hooks import PluginContext
from ldapproxy.plugin_chain import PluginChain, load_plugins
from ldapproxy.pool import Pool
from ldapproxy.tls import ServerTLS, UpstreamTLS
from ldapproxy.upstream import UpstreamDialer

log = Logger(namespace="ldapproxy.service")


class ListenError(Exception):
    """A listener could not start; ``str(error)`` names it, its endpoint and the cause."""


class ProxyService(MultiService):
    """The whole proxy for one configuration.

    Building it loads every certificate and key and validates every plugin's table, so a
    bad file fails before anything listens (:class:`ldapproxy.tls.TLSSetupError`,
    :class:`ldapproxy.config.ConfigError`).  :meth:`listen` then starts the plugins and
    binds every listener, failing with :class:`ListenError` or
    :class:`ldapproxy.plugin_chain.PluginStartError` if any cannot.
    """

    def __init__(self, config: Config, reactor: Any) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.config = config
        self._reactor = reactor
        #: The Prometheus registry of this proxy; plugins register their metrics here.
        self.registry = CollectorRegistry()
        context = PluginContext(
            reactor,
            reactor,
            self.registry,
            config.path.parent,
            tuple(listener.name for listener in config.listeners),
        )
        self.plugins = PluginChain(
            load_plugins(config.plugins, context),
            reactor,
            config.limits.plugin_timeout,
            self.registry,
        )
        needs_tls = any(lc.tls is not ListenerTLS.NONE for lc in config.listeners)
        self.server_tls = ServerTLS(config.tls) if needs_tls else None
        self.upstream_tls = UpstreamTLS(config.upstream)
        self.dialer = UpstreamDialer(reactor, reactor, config.upstream, self.upstream_tls)
        self.pool = Pool(
            config.upstream.urls,
            config.pool,
            config.upstream.strategy,
            self.dialer.connect_url,
            reactor,
            check_timeout=config.upstream.connect_timeout,
        )
        self.ports: dict[str, IListeningPort] = {}

    @defer.inlineCallbacks
    def listen(self) -> Generator[defer.Deferred[Any], Any, None]:
        """Start the plugins, then bind every listener, in order; on any failure, close
        those already bound."""
        yield self.plugins.start()
        for listener in self.config.listeners:
            factory = ClientFactory(
                listener,
                self.config.limits,
                self._reactor,
                self.pool,
                self.server_tls,
                self.plugins,
            )
            try:
                endpoint = endpoints.serverFromString(self._reactor, listener.endpoint)  # type: ignore[no-untyped-call]
                port = yield endpoint.listen(factory)
            except Exception as error:
                yield self.close_listeners()
                cause = getattr(error, "socketError", None) or error
                detail = getattr(cause, "strerror", None) or str(cause) or type(cause).__name__
                raise ListenError(
                    f"listener {listener.name!r} (endpoint = {listener.endpoint!r}): "
                    f"cannot listen: {detail}"
                ) from None
            self.ports[listener.name] = port
            address = port.getHost()
            log.info(
                "listener {name} on {host}:{port} (tls = {tls})",
                name=listener.name,
                host=getattr(address, "host", address),
                port=getattr(address, "port", ""),
                tls=listener.tls.value,
            )

    def close_listeners(self) -> defer.Deferred[Any]:
        """Stop accepting new clients."""
        ports, self.ports = list(self.ports.values()), {}
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports])

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.pool.start()

    def stopService(self) -> defer.Deferred[Any]:
        super().stopService()  # type: ignore[no-untyped-call]
        closed = self.close_listeners()
        self.pool.stop()
        return closed.addCallback(lambda _: self.plugins.stop())

    def reopen(self) -> None:
        """SIGHUP: reopen the files plugins write (the audit log, after logrotate)."""
        log.info("SIGHUP: reopening plugin files")
        self.plugins.reopen()
