"""Unit tests of ldapproxy.plugin_chain and the [[plugin]] tables of ldapproxy.config: how
plugins are found, built, started, counted and stopped."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from twisted.internet import defer
from twisted.internet.task import Clock

from ldapproxy import config, testing
from ldapproxy.config import ConfigError, PluginSpec
from ldapproxy.hooks import ALLOW, Plugin, PluginContext, PluginOptions, Request, Verdict, deny
from ldapproxy.metrics import Metrics
from ldapproxy.plugin_chain import PluginChain, PluginStartError, load_plugins, resolve

MINIMAL = """
[[listener]]
endpoint = 'tcp:389'
tls = "none"
[upstream]
urls = ["ldaps://dc1.example.com"]
"""


class Limited(Plugin):
    """A plugin with one integer key, ``limit``, for the loading tests."""

    options = {"limit": "3"}

    def __init__(self, limit: int) -> None:
        self.limit = limit

    @classmethod
    def from_config(cls, options: PluginOptions, context: PluginContext) -> Limited:
        limit = options.integer("limit", 3, minimum=1)
        options.finish()
        return cls(limit)


class NotAPlugin:
    """Something importable that is not a plugin."""


def parse(text: str, path: Path = Path("/etc/ldapproxy/ldapproxy.toml")) -> config.Config:
    import tomllib

    return config.parse(tomllib.loads(MINIMAL + text), path)


def spec(use: str, **options: Any) -> PluginSpec:
    return PluginSpec(Path("/etc/ldapproxy.toml"), 1, use, options)


# -- configuration ------------------------------------------------------------------------------


def test_plugin_tables_keep_order_and_their_own_keys() -> None:
    """[[plugin]] tables are kept in order with ``use`` split from the plugin's keys."""
    loaded = parse(
        '[[plugin]]\nuse = "audit"\npath = "-"\n[[plugin]]\nuse = "bind_guard"\nwindow = 60\n'
    )
    assert [(p.index, p.use, dict(p.options)) for p in loaded.plugins] == [
        (1, "audit", {"path": "-"}),
        (2, "bind_guard", {"window": 60}),
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[plugin]\nuse = 'audit'\n", "plugin must be an array of tables, written [[plugin]]"),
        ("[[plugin]]\npath = '-'\n", "[[plugin]] #1 use is required"),
        ("[[plugin]]\nuse = 3\n", "[[plugin]] #1 use = 3: expected a plugin name"),
        ("[[plugin]]\nuse = ''\n", "[[plugin]] #1 use = '': expected a plugin name"),
    ],
)
def test_bad_plugin_tables_are_config_errors(text: str, message: str) -> None:
    """A [[plugin]] table without a usable ``use`` fails with the table named."""
    with pytest.raises(ConfigError) as caught:
        parse(text)
    assert message in str(caught.value)
    assert str(caught.value).startswith("/etc/ldapproxy/ldapproxy.toml: ")


# -- finding and building plugins ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["allowlist", "audit", "bind_guard"])
def test_bundled_plugins_are_entry_points(name: str) -> None:
    """Each bundled plugin is found by its entry point name, like third-party ones."""
    cls = resolve(name)
    assert issubclass(cls, Plugin)
    assert cls.__module__ == f"ldapproxy.plugins.{name}"


def test_module_class_names_are_imported() -> None:
    """``package.module:Class`` imports the class."""
    assert resolve(f"{__name__}:Limited") is Limited


@pytest.mark.parametrize(
    ("use", "message"),
    [
        ("allowlst", "no plugin named 'allowlst' (installed: allowlist, audit, bind_guard"),
        ("no_such_module_xyz:Thing", "cannot import 'no_such_module_xyz:Thing'"),
        (f"{__name__}:Missing", f"cannot import '{__name__}:Missing'"),
        (f"{__name__}:NotAPlugin", "is not a subclass of ldapproxy.hooks.Plugin"),
    ],
)
def test_unknown_plugins_are_named(use: str, message: str) -> None:
    """A name that does not resolve to a plugin class says why."""
    with pytest.raises(LookupError) as caught:
        resolve(use)
    assert message in str(caught.value)


def test_load_plugins_names_the_table_and_the_key() -> None:
    """A bad key of a plugin fails with the file, table number, plugin and key."""
    bad = PluginSpec(Path("/etc/p.toml"), 2, f"{__name__}:Limited", {"limit": 0})
    with pytest.raises(ConfigError) as caught:
        load_plugins([bad], testing.context())
    assert str(caught.value) == (
        f"/etc/p.toml: [[plugin]] #2 (use = '{__name__}:Limited'): "
        "limit = 0: expected an integer of at least 1"
    )
    typo = PluginSpec(Path("/etc/p.toml"), 1, f"{__name__}:Limited", {"limt": 4})
    with pytest.raises(ConfigError, match="unknown key 'limt'; expected one of: limit"):
        load_plugins([typo], testing.context())


def test_load_plugins_builds_in_order_and_names_them() -> None:
    """Plugins are built in table order, each named by its ``use`` value."""
    use = f"{__name__}:Limited"
    plugins = load_plugins([spec(use, limit=5), spec("bind_guard")], testing.context())
    assert [p.name for p in plugins] == [use, "bind_guard"]
    assert isinstance(plugins[0], Limited)
    assert plugins[0].limit == 5


def test_plugins_on_the_python_path_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The documented example plugin loads as ``module:Class`` from PYTHONPATH."""
    examples = Path(__file__).resolve().parent.parent / "docs" / "examples"
    monkeypatch.syspath_prepend(str(examples))
    monkeypatch.delitem(sys.modules, "bind_blocklist", raising=False)
    [plugin] = load_plugins(
        [spec("bind_blocklist:BindBlocklist", dns=["cn=admin,dc=example,dc=com"])],
        testing.context(),
    )
    verdict = plugin.request(
        testing.request("bind", fields_of(dn="CN=Admin, DC=example, DC=com", mechanism="simple"))
    )
    assert (verdict.allowed, verdict.code) == (False, 53)
    other = plugin.request(testing.request("bind", fields_of(dn="uid=alice", mechanism="simple")))
    assert other == ALLOW


def fields_of(**values: Any) -> Any:
    from ldapproxy.hooks import RequestFields

    return RequestFields(**values)


# -- the chain ----------------------------------------------------------------------------------


class Starting(Plugin):
    """Records start/reopen/stop calls; ``fail`` makes start raise."""

    def __init__(self, fail: str = "") -> None:
        self.fail = fail
        self.calls: list[str] = []

    def start(self) -> None:
        self.calls.append("start")
        if self.fail:
            raise OSError(self.fail)

    def reopen(self) -> None:
        self.calls.append("reopen")

    def stop(self) -> defer.Deferred[None]:
        self.calls.append("stop")
        return defer.fail(RuntimeError("stop failed"))


def test_start_failure_names_the_plugin() -> None:
    """A plugin whose start raises stops startup with its name and the error."""
    good, bad = Starting(), Starting("cannot open path = '/nope'")
    good.name, bad.name = "first", "second"
    failure = failure_of(PluginChain([good, bad], Clock(), 1.0).start())
    assert isinstance(failure, PluginStartError)
    assert str(failure) == "plugin 'second': cannot open path = '/nope'"
    assert good.calls == ["start"]


def failure_of(d: defer.Deferred[Any]) -> BaseException:
    failures: list[Any] = []
    d.addErrback(failures.append)
    assert failures, "expected the Deferred to fail"
    return failures[0].value  # type: ignore[no-any-return]


def test_reopen_and_stop_reach_every_plugin() -> None:
    """SIGHUP's reopen and shutdown's stop reach every plugin; a failing stop is logged,
    not raised."""
    plugins = [Starting(), Starting()]
    chain = PluginChain(plugins, Clock(), 1.0)
    chain.reopen()
    done: list[Any] = []
    chain.stop().addBoth(done.append)
    assert done == [[None, None]]
    assert [p.calls for p in plugins] == [["reopen", "stop"], ["reopen", "stop"]]


class Denier(Plugin):
    def request(self, request: Request) -> Verdict:
        return deny(50, "no", "operation") if request.op == "modify" else ALLOW


def test_denials_are_counted_by_plugin_and_reason() -> None:
    """Every deny is counted in ldapproxy_plugin_denials_total{plugin,reason}."""
    registry = CollectorRegistry()
    metrics = Metrics()
    metrics.register(registry)
    plugin = Denier()
    plugin.name = "allowlist"
    chain = PluginChain([plugin], Clock(), 1.0, metrics)
    for op in ("modify", "search", "modify"):
        chain.request(testing.request(op))
    labels = {"plugin": "allowlist", "reason": "operation"}
    assert registry.get_sample_value("ldapproxy_plugin_denials_total", labels) == 2


def test_late_denials_are_counted_too() -> None:
    """A deny that arrives through a Deferred is counted when it arrives."""
    registry = CollectorRegistry()
    pending: defer.Deferred[Verdict] = defer.Deferred()

    class Slow(Plugin):
        def request(self, request: Request) -> defer.Deferred[Verdict]:
            return pending

    plugin = Slow()
    plugin.name = "slow"
    metrics = Metrics()
    metrics.register(registry)
    PluginChain([plugin], Clock(), 1.0, metrics).request(testing.request("search"))
    labels = {"plugin": "slow", "reason": "late"}
    assert registry.get_sample_value("ldapproxy_plugin_denials_total", labels) is None
    pending.callback(deny(50, "no", "late"))
    assert registry.get_sample_value("ldapproxy_plugin_denials_total", labels) == 1


def test_only_overridden_hooks_are_called() -> None:
    """A chain knows which plugins implement which hook: one without request or response
    hooks does not make sessions track operations or decode fields."""

    class OnlyGoodbye(Plugin):
        def disconnected(self, disconnect: Any) -> None:
            pass

    chain = PluginChain([OnlyGoodbye()], Clock(), 1.0)
    assert chain.active
    assert not chain.tracks_operations
    assert not chain.decides_connections
    assert chain.fields_for == frozenset()
    both = PluginChain([Denier(), resolve("bind_guard")(Clock(), 1, 1, 1.0)], Clock(), 1.0)
    assert both.decides_requests
    assert both.fields_for == frozenset({"bind"})


def test_hooks_a_plugin_does_not_want_are_not_called() -> None:
    """``wants(hook)`` False: the overridden hook is left out of the chain, so sessions do
    no per-request work for it; the plugin's other hooks still run."""
    calls: list[str] = []

    class HostOnly(Plugin):
        def wants(self, hook: str) -> bool:
            return hook != "request"

        def connection_accepted(self, connection: Any) -> Verdict:
            calls.append("accepted")
            return ALLOW

        def request(self, request: Request) -> Verdict:
            calls.append("request")
            return deny(50, "never asked", "test")

    chain = PluginChain([HostOnly()], Clock(), 1.0)
    assert chain.decides_connections
    assert not chain.decides_requests
    assert not chain.tracks_operations
    decision = chain.connection_accepted(testing.connection())
    assert not isinstance(decision, defer.Deferred)
    assert decision.allowed
    assert calls == ["accepted"]
