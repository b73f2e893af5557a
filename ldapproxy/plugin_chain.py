"""Loading plugins from the configuration, and calling their hooks in order.

:func:`load_plugins` turns the ``[[plugin]]`` tables into plugin instances (resolving
``use`` and validating each table); :class:`PluginChain` calls the hooks that each plugin
overrides, applies the fail-closed rules of :mod:`ldapproxy.hooks`, and logs what plugins
do wrong with the plugin's name.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, TypeVar

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ldapproxy.config import ConfigError, PluginSpec
from ldapproxy.hooks import (
    Connection,
    Disconnect,
    Plugin,
    PluginConfigError,
    PluginContext,
    PluginOptions,
    Request,
    Response,
    Verdict,
)
from ldapproxy.metrics import Metrics

log = Logger(namespace="ldapproxy.plugins")

#: The entry-point group of plugins, the bundled ones included.
ENTRY_POINT_GROUP = "ldapproxy.plugins"

#: resultCode for a request denied because a plugin failed (fail closed).
_FAILED_CLOSED = Verdict(False, 53, "request refused by policy", "plugin_error")


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of a decision hook: the verdict, and the plugin that denied, if any."""

    verdict: Verdict
    plugin: str | None = None

    @property
    def allowed(self) -> bool:
        """Whether every plugin allowed."""
        return self.verdict.allowed


ALLOWED = Decision(Verdict(True))


# -- loading ---------------------------------------------------------------------------------


def resolve(use: str) -> type[Plugin]:
    """The plugin class named by ``use``: an entry point in :data:`ENTRY_POINT_GROUP` (the
    bundled plugins are registered there too) or ``package.module:Class``.

    :raises LookupError: nothing by that name; the message lists what is available.
    """
    if ":" in use:
        module_name, _, attribute = use.partition(":")
        try:
            found: Any = importlib.import_module(module_name)
            for part in attribute.split("."):
                found = getattr(found, part)
        except (ImportError, AttributeError) as error:
            raise LookupError(f"cannot import {use!r}: {error}") from None
    else:
        points = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
        if use not in points:
            known = ", ".join(sorted(points)) or "none"
            raise LookupError(
                f"no plugin named {use!r} (installed: {known}; or give 'package.module:Class')"
            )
        try:
            found = points[use].load()
        except Exception as error:
            raise LookupError(f"plugin {use!r} failed to import: {error}") from None
    if not (isinstance(found, type) and issubclass(found, Plugin)):
        raise LookupError(f"{use!r} is not a subclass of ldapproxy.hooks.Plugin")
    return found


def load_plugins(specs: Sequence[PluginSpec], context: PluginContext) -> list[Plugin]:
    """Build every configured plugin, in order, validating its table.

    :raises ConfigError: an unknown plugin or a bad key; the message names the file, the
        ``[[plugin]]`` table and the key.
    """
    plugins = []
    for spec in specs:
        where = f"{spec.source}: [[plugin]] #{spec.index} (use = {spec.use!r})"
        try:
            cls = resolve(spec.use)
        except LookupError as error:
            raise ConfigError(f"{where}: {error}") from None
        try:
            plugin = cls.from_config(PluginOptions(spec.options, context.config_dir), context)
        except PluginConfigError as error:
            raise ConfigError(f"{where}: {error}") from None
        plugin.name = spec.use
        plugins.append(plugin)
    return plugins


# -- dispatch --------------------------------------------------------------------------------


def _uses(plugin: Plugin, hook: str) -> bool:
    """Whether ``plugin`` overrides ``hook`` and, configured as it is, wants it called."""
    return getattr(type(plugin), hook) is not getattr(Plugin, hook) and plugin.wants(hook)


E = TypeVar("E", Connection, Request)


class PluginChain:
    """The configured plugins, called hook by hook in configuration order.

    Only the plugins that override a hook (and want it: :meth:`Plugin.wants`) are called
    for it, so a proxy without plugins (or without request hooks) does no per-request
    work here.
    """

    def __init__(
        self,
        plugins: Sequence[Plugin],
        clock: IReactorTime,
        timeout: float,
        metrics: Metrics | None = None,
    ) -> None:
        self.plugins = tuple(plugins)
        self._clock = clock
        self._timeout = timeout
        self._metrics = metrics

        def having(hook: str) -> tuple[Plugin, ...]:
            return tuple(p for p in self.plugins if _uses(p, hook))

        self._accept = having("connection_accepted")
        self._request = having("request")
        self._tls = having("tls_started")
        self._response = having("response")
        self._disconnect = having("disconnected")
        #: Whether sessions must build events at all.
        self.active = bool(self.plugins)
        #: Whether sessions must track each operation (for request or response hooks).
        self.tracks_operations = bool(self._request or self._response)
        #: Whether any plugin decides on requests.
        self.decides_requests = bool(self._request)
        #: Whether any plugin observes responses (else only binds are followed to their
        #: response, for the bound DN).
        self.observes_responses = bool(self._response)
        #: Whether any plugin decides on connections.
        self.decides_connections = bool(self._accept)
        #: The operation names whose fields some plugin asked for.
        self.fields_for: frozenset[str] = frozenset().union(
            *(p.request_fields for p in self.plugins)
        )

    # -- lifecycle --

    def start(self) -> defer.Deferred[Any]:
        """Start every plugin, in order; fails with the first plugin's error."""

        @defer.inlineCallbacks
        def go() -> Any:
            for plugin in self.plugins:
                try:
                    yield plugin.start()
                except Exception as error:
                    raise PluginStartError(f"plugin {plugin.name!r}: {error}") from None

        return go()

    def stop(self) -> defer.Deferred[Any]:
        """Stop every plugin; failures are logged."""
        results = []
        for plugin in self.plugins:
            results.append(
                defer.maybeDeferred(plugin.stop).addErrback(
                    self._observation_failed, plugin, "stop", "-"
                )
            )
        return defer.gatherResults(results)

    def reopen(self) -> None:
        """SIGHUP: let every plugin reopen its files."""
        for plugin in self.plugins:
            try:
                plugin.reopen()
            except Exception:
                log.failure("plugin {plugin}: reopen failed", plugin=plugin.name)

    # -- decision hooks --

    def connection_accepted(self, connection: Connection) -> Decision | defer.Deferred[Decision]:
        """Ask each plugin whether ``connection`` may go on."""
        return self._counted(
            self._decide(self._accept, 0, "connection_accepted", connection, _prefix(connection))
        )

    def request(self, request: Request) -> Decision | defer.Deferred[Decision]:
        """Ask each plugin whether ``request`` may be forwarded."""
        return self._counted(
            self._decide(self._request, 0, "request", request, _prefix(request.connection))
        )

    def _counted(
        self, decision: Decision | defer.Deferred[Decision]
    ) -> Decision | defer.Deferred[Decision]:
        if self._metrics is None:
            return decision
        if isinstance(decision, defer.Deferred):
            return decision.addCallback(self._count)
        return self._count(decision)

    def _count(self, decision: Decision) -> Decision:
        if not decision.allowed and self._metrics is not None:
            self._metrics.count_denial(decision.plugin or "", decision.verdict.reason)
        return decision

    def _decide(
        self, plugins: tuple[Plugin, ...], start: int, hook: str, event: E, prefix: str
    ) -> Decision | defer.Deferred[Decision]:
        for index in range(start, len(plugins)):
            plugin = plugins[index]
            try:
                result = getattr(plugin, hook)(event)
            except Exception:
                log.failure(
                    "{prefix} plugin {plugin}: {hook} hook raised; denying (fail closed)",
                    prefix=prefix,
                    plugin=plugin.name,
                    hook=hook,
                )
                return Decision(_FAILED_CLOSED, plugin.name)
            if isinstance(result, defer.Deferred):
                return self._decide_later(result, plugins, index, hook, event, prefix)
            decision = self._judge(result, plugin, hook, prefix)
            if not decision.allowed:
                return decision
        return ALLOWED

    def _decide_later(
        self,
        pending: defer.Deferred[Verdict],
        plugins: tuple[Plugin, ...],
        index: int,
        hook: str,
        event: E,
        prefix: str,
    ) -> defer.Deferred[Decision]:
        plugin = plugins[index]
        pending.addTimeout(self._timeout, self._clock)

        def decided(result: Any) -> Decision | defer.Deferred[Decision]:
            decision = self._judge(result, plugin, hook, prefix)
            if not decision.allowed:
                return decision
            return self._decide(plugins, index + 1, hook, event, prefix)

        def failed(failure: Failure) -> Decision:
            if isinstance(failure.value, defer.TimeoutError):
                log.warn(
                    "{prefix} plugin {plugin}: {hook} hook did not decide within "
                    "limits.plugin_timeout = {timeout:g} s; denying (fail closed)",
                    prefix=prefix,
                    plugin=plugin.name,
                    hook=hook,
                    timeout=self._timeout,
                )
            else:
                log.failure(
                    "{prefix} plugin {plugin}: {hook} hook failed; denying (fail closed)",
                    failure,
                    prefix=prefix,
                    plugin=plugin.name,
                    hook=hook,
                )
            return Decision(_FAILED_CLOSED, plugin.name)

        return pending.addCallbacks(decided, failed)

    def _judge(self, result: Any, plugin: Plugin, hook: str, prefix: str) -> Decision:
        if isinstance(result, Verdict):
            return ALLOWED if result.allowed else Decision(result, plugin.name)
        log.error(
            "{prefix} plugin {plugin}: {hook} hook returned {result!r}, not a Verdict; "
            "denying (fail closed)",
            prefix=prefix,
            plugin=plugin.name,
            hook=hook,
            result=result,
        )
        return Decision(_FAILED_CLOSED, plugin.name)

    # -- observation hooks --

    def tls_started(self, connection: Connection) -> None:
        """Tell every plugin that ``connection`` has TLS."""
        self._observe(self._tls, "tls_started", connection, connection)

    def response(self, response: Response) -> None:
        """Tell every plugin that a request got its final response."""
        self._observe(self._response, "response", response, response.request.connection)

    def disconnected(self, disconnect: Disconnect) -> None:
        """Tell every plugin that a connection ended."""
        self._observe(self._disconnect, "disconnected", disconnect, disconnect.connection)

    def _observe(
        self, plugins: tuple[Plugin, ...], hook: str, event: Any, connection: Connection
    ) -> None:
        for plugin in plugins:
            method: Callable[[Any], Any] = getattr(plugin, hook)
            try:
                result = method(event)
            except Exception:
                log.failure(
                    "{prefix} plugin {plugin}: {hook} hook raised; skipped",
                    prefix=_prefix(connection),
                    plugin=plugin.name,
                    hook=hook,
                )
                continue
            if isinstance(result, defer.Deferred):
                result.addErrback(self._observation_failed, plugin, hook, _prefix(connection))

    def _observation_failed(self, failure: Failure, plugin: Plugin, hook: str, prefix: str) -> None:
        log.failure(
            "{prefix} plugin {plugin}: {hook} hook failed; skipped",
            failure,
            prefix=prefix,
            plugin=plugin.name,
            hook=hook,
        )


class PluginStartError(Exception):
    """A plugin could not start; ``str(error)`` names the plugin and the cause."""


def _prefix(connection: Connection) -> str:
    return f"conn={connection.id} {connection.client}"


#: The chain of a proxy without plugins.
NO_PLUGINS = PluginChain((), clock=None, timeout=1.0)  # type: ignore[arg-type]
