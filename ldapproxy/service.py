"""Assembles the proxy from a configuration: TLS contexts, the upstream pool, the plugins,
the listeners and the metrics site, as one Twisted service; and changes it at run time
(reload on SIGHUP, drain on SIGTERM).

Lifecycle::

    built --listen()--> listening --startService()--> serving
    serving --reload()--> serving (new TLS contexts, plugins, limits for new sessions)
    serving --stopService()--> draining --all sessions gone or limits.drain_timeout--> stopped
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from twisted.application.service import MultiService
from twisted.internet import defer, endpoints, task
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger

from ldapproxy import config as configuration
from ldapproxy.client import ClientFactory
from ldapproxy.config import Config, ListenerTLS
from ldapproxy.hooks import PluginContext
from ldapproxy.limits import ConnectionLimiter
from ldapproxy.metrics import Metrics, Sources
from ldapproxy.plugin_chain import PluginChain, load_plugins
from ldapproxy.pool import Pool, UpstreamStatus
from ldapproxy.session import Session
from ldapproxy.systemd import (
    adopt_listening_socket,
    is_systemd_endpoint,
    parse_systemd_endpoint,
    select_fds,
)
from ldapproxy.tls import ServerTLS, UpstreamTLS
from ldapproxy.upstream import UpstreamDialer

log = Logger(namespace="ldapproxy.service")


class ListenError(Exception):
    """A listener could not start; ``str(error)`` names it, its endpoint and the cause."""


class _PluginMetrics:
    """Forwards scrapes to the registry of the plugins in force, which a reload replaces
    (so a reloaded plugin can register its metrics again)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()

    def collect(self) -> Iterator[Metric]:
        return iter(self.registry.collect())


class ProxyService(MultiService):
    """The whole proxy for one configuration file.

    Building it loads every certificate and key and validates every plugin's table, so a
    bad file fails before anything listens (:class:`ldapproxy.tls.TLSSetupError`,
    :class:`ldapproxy.config.ConfigError`).  :meth:`listen` then starts the plugins and
    binds every listener and the metrics site, failing with :class:`ListenError` or
    :class:`ldapproxy.plugin_chain.PluginStartError` if any cannot.
    """

    def __init__(
        self, config: Config, reactor: Any, inherited: dict[str, list[int]] | None = None
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.config = config
        self._reactor = reactor
        #: Listening sockets passed by systemd (socket activation): name -> fds.
        self.inherited = inherited or {}
        #: The Prometheus registry this proxy serves.
        self.registry = CollectorRegistry()
        self.metrics = Metrics()
        self.metrics.register(self.registry)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self._plugin_metrics = _PluginMetrics()
        self.registry.register(self._plugin_metrics)
        #: Every open client session, on every listener.
        self.sessions: set[Session] = set()
        self.plugins = self._load_plugins(config, self._plugin_metrics.registry)
        self.server_tls = _server_tls(config)
        self.upstream_tls = UpstreamTLS(config.upstream)
        self.dialer = UpstreamDialer(reactor, reactor, config.upstream, self.upstream_tls)
        self.pool = Pool(
            config.upstream.urls,
            config.pool,
            config.upstream.strategy,
            self.dialer.connect_url,
            reactor,
            check_timeout=config.upstream.connect_timeout,
            metrics=self.metrics,
        )
        self.metrics.sources = Sources(
            client_connections=lambda: [
                (s.listener.name, s.tls_version or "none") for s in self.sessions
            ],
            upstream_up=lambda: [(u.url, u.status is UpstreamStatus.UP) for u in self.pool.stats()],
            upstream_connections=lambda: [
                (u.url, state.value, count)
                for u in self.pool.stats()
                for state, count in u.connections.items()
            ],
            certificates=self._certificates,
        )
        #: The connection limits, shared by every listener.
        self.limiter = ConnectionLimiter(config.limits, reactor, self.metrics)
        self.factories: dict[str, ClientFactory] = {}
        self.ports: dict[str, IListeningPort] = {}
        self.metrics_port: IListeningPort | None = None
        self.draining = False

    def _load_plugins(self, config: Config, registry: CollectorRegistry) -> PluginChain:
        context = PluginContext(
            self._reactor,
            self._reactor,
            registry,
            config.path.parent,
            tuple(listener.name for listener in config.listeners),
        )
        plugins = load_plugins(config.plugins, context)
        return PluginChain(plugins, self._reactor, config.limits.plugin_timeout, self.metrics)

    def _certificates(self) -> list[tuple[str, str, float]]:
        found = []
        if self.server_tls is not None:
            found.append(("server", *self.server_tls.expiry))
        found += [("upstream", subject, when) for subject, when in self.upstream_tls.seen.items()]
        return found

    # -- starting ------------------------------------------------------------------------

    @defer.inlineCallbacks
    def listen(self) -> Generator[defer.Deferred[Any], Any, None]:
        """Start the plugins, then bind every listener and the metrics site, in order; on
        any failure, close those already bound."""
        yield self.plugins.start()
        for listener in self.config.listeners:
            factory = ClientFactory(
                listener,
                self.config.limits,
                self._reactor,
                self.pool,
                self.server_tls,
                self.plugins,
                self.metrics,
                self.sessions,
                self.limiter,
            )
            port = yield self._bind(f"listener {listener.name!r}", listener.endpoint, factory)
            self.factories[listener.name] = factory
            self.ports[listener.name] = port
            address = port.getHost()
            log.info(
                "listener {name} on {host}:{port} (tls = {tls})",
                name=listener.name,
                host=getattr(address, "host", address),
                port=getattr(address, "port", ""),
                tls=listener.tls.value,
            )
        if self.config.metrics.endpoint:
            from ldapproxy.web import site

            self.metrics_port = yield self._bind(
                "[metrics]", self.config.metrics.endpoint, site(self.registry, self.not_ready)
            )
            address = self.metrics_port.getHost()
            log.info(
                "metrics on http://{host}:{port}/metrics",
                host=getattr(address, "host", address),
                port=getattr(address, "port", ""),
            )

    @defer.inlineCallbacks
    def _bind(self, what: str, endpoint: str, factory: Any) -> Generator[Any, Any, Any]:
        try:
            if is_systemd_endpoint(endpoint):
                kind, value = parse_systemd_endpoint(endpoint)
                fd = select_fds(self.inherited, kind, value)
                return adopt_listening_socket(self._reactor, fd, factory)
            server = endpoints.serverFromString(self._reactor, endpoint)  # type: ignore[no-untyped-call]
            port = yield server.listen(factory)
        except Exception as error:
            yield self.close_listeners()
            cause = getattr(error, "socketError", None) or error
            detail = getattr(cause, "strerror", None) or str(cause) or type(cause).__name__
            raise ListenError(
                f"{what} (endpoint = {endpoint!r}): cannot listen: {detail}"
            ) from None
        return port

    def close_listeners(self) -> defer.Deferred[Any]:
        """Stop accepting new clients (the metrics site stays up until the end)."""
        ports, self.ports = list(self.ports.values()), {}
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports])

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.pool.start()

    def warmed(self) -> defer.Deferred[str]:
        """Fires, with a status line, once every upstream's first connections have been
        tried (up or down) or after pool.warm_timeout, whichever comes first."""
        deadline = self._reactor.seconds() + self.config.pool.warm_timeout
        done: defer.Deferred[str] = defer.Deferred()

        def look() -> None:
            if self.pool.warm or self._reactor.seconds() >= deadline:
                loop.stop()
                done.callback(self.status())

        loop = task.LoopingCall(look)
        loop.clock = self._reactor
        loop.start(0.05, now=True)
        return done

    def status(self) -> str:
        """One line for systemd's STATUS: listeners, upstreams up, sessions."""
        stats = self.pool.stats()
        up = sum(u.status is UpstreamStatus.UP for u in stats)
        return (
            f"{len(self.ports)} listener(s), {up}/{len(stats)} upstream(s) up, "
            f"{len(self.sessions)} client session(s)"
        )

    def not_ready(self) -> str | None:
        """Why the proxy should not get new clients now, or None (``/readyz``)."""
        if self.draining:
            return "shutting down"
        missing = [lc.name for lc in self.config.listeners if lc.name not in self.ports]
        if missing:
            return f"listener {missing[0]} is not listening"
        if not any(u.status is UpstreamStatus.UP for u in self.pool.stats()):
            return "no upstream is up"
        return None

    # -- reloading -----------------------------------------------------------------------

    def reload(self) -> defer.Deferred[bool]:
        """SIGHUP: read the configuration file and the certificates again and apply them,
        or keep everything as it is if anything is wrong.  Fires with whether it applied."""
        path = self.config.path
        try:
            new = configuration.load(path)
            for option, old_value, new_value in _restart_only_changes(self.config, new):
                log.warn(
                    "reload: {key} changed from {old!r} to {new!r}; this takes a restart, "
                    "the running value stays in force",
                    key=option,
                    old=old_value,
                    new=new_value,
                )
            server_tls = _server_tls(new)
            upstream_tls = UpstreamTLS(new.upstream)
            plugin_registry = CollectorRegistry()
            plugins = self._load_plugins(new, plugin_registry)
        except Exception as error:
            # ConfigError and TLSSetupError name the key; anything else (a plugin's bug in
            # from_config) is reported the same way: a reload never takes the proxy down.
            self.metrics.count_reload("failure")
            log.error(
                "reload failed, the running configuration stays in force: {error}", error=error
            )
            return defer.succeed(False)
        return plugins.start().addCallbacks(
            self._plugins_started,
            self._plugins_failed,
            callbackArgs=(new, server_tls, upstream_tls, plugins, plugin_registry),
            errbackArgs=(plugins,),
        )

    def _plugins_started(
        self,
        _: Any,
        new: Config,
        server_tls: ServerTLS | None,
        upstream_tls: UpstreamTLS,
        plugins: PluginChain,
        plugin_registry: CollectorRegistry,
    ) -> bool:
        old_plugins, old_sessions = self.plugins, set(self.sessions)
        self.plugins = plugins
        self._plugin_metrics.registry = plugin_registry
        self.server_tls = server_tls if server_tls is not None else self.server_tls
        self.upstream_tls = upstream_tls
        self.dialer = UpstreamDialer(self._reactor, self._reactor, new.upstream, upstream_tls)
        self.pool.renew(self.dialer.connect_url)
        for factory in self.factories.values():
            factory.tls = self.server_tls
            factory.plugins = plugins
            factory.limits = new.limits
        self.limiter.configure(new.limits)
        # Keys that need a restart keep their running values.
        self.config = configuration.reloaded(self.config, new)
        # Files the old plugins still write for the sessions they serve (the audit log
        # after logrotate) are reopened too.
        old_plugins.reopen()
        self._retire(old_plugins, old_sessions)
        self.metrics.count_reload("success")
        log.info("reload: configuration applied from {path}", path=str(new.path))
        return True

    def _plugins_failed(self, failure: Any, plugins: PluginChain) -> bool:
        plugins.stop()  # those that did start (an audit log opened...) are released
        self.metrics.count_reload("failure")
        log.error(
            "reload failed, the running configuration stays in force: {error}",
            error=failure.getErrorMessage(),
        )
        return False

    def _retire(self, chain: PluginChain, users: set[Session]) -> None:
        """Stop ``chain`` once the sessions that were using it have all ended."""

        def check() -> None:
            if not users & self.sessions:
                loop.stop()
                chain.stop()

        loop = task.LoopingCall(check)
        loop.clock = self._reactor
        loop.start(1.0, now=True)

    # -- stopping ------------------------------------------------------------------------

    @defer.inlineCallbacks
    def stopService(self) -> Generator[defer.Deferred[Any], Any, None]:
        """Stop accepting, let operations in flight finish (up to limits.drain_timeout),
        tell the remaining clients with a Notice of Disconnection, then close the pool and
        the plugins."""
        super().stopService()  # type: ignore[no-untyped-call]
        self.draining = True
        yield self.close_listeners()
        timeout = self.config.limits.drain_timeout
        if self.sessions:
            log.info(
                "draining {count} client session(s) for up to {timeout:g} s (limits.drain_timeout)",
                count=len(self.sessions),
                timeout=timeout,
            )
            for session in list(self.sessions):
                session.drain()
            deadline = self._reactor.seconds() + timeout
            while self.sessions and self._reactor.seconds() < deadline:
                yield task.deferLater(self._reactor, 0.05, lambda: None)
            for session in list(self.sessions):
                session.shutdown()
            # Let the notices go out and the connections close.
            closing = self._reactor.seconds() + 2.0
            while self.sessions and self._reactor.seconds() < closing:
                yield task.deferLater(self._reactor, 0.05, lambda: None)
        self.pool.stop()
        yield self.plugins.stop()
        if self.metrics_port is not None:
            yield defer.maybeDeferred(self.metrics_port.stopListening)


def _server_tls(config: Config) -> ServerTLS | None:
    needs_tls = any(lc.tls is not ListenerTLS.NONE for lc in config.listeners)
    return ServerTLS(config.tls) if needs_tls else None


def _restart_only_changes(old: Config, new: Config) -> Iterator[tuple[str, Any, Any]]:
    """``(key, old, new)`` for each changed key that a reload cannot apply."""
    for name, option, old_value, new_value in configuration.changes(old, new):
        if option.restart:
            yield name, old_value, new_value
