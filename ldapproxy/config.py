"""The configuration file: one TOML document, validated against a single option table.

Every key the proxy understands is declared once in :data:`OPTIONS`, with its default and
a one-line description; validation, ``docs/configuration.rst`` and
``deploy/ldapproxy.example.toml`` are all checked against that table.  Errors name the
file, the key, the bad value and what was expected.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import math
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(Exception):
    """The configuration is invalid; ``str(error)`` is one line naming file and key."""


class ListenerTLS(enum.Enum):
    """How a listener secures its clients' connections."""

    NONE = "none"
    STARTTLS_OPTIONAL = "starttls-optional"
    STARTTLS_REQUIRED = "starttls-required"
    LDAPS = "ldaps"


@dataclass(frozen=True)
class ListenerConfig:
    """One ``[[listener]]`` table."""

    name: str
    endpoint: str
    tls: ListenerTLS
    #: Whether every connection starts with a PROXY protocol (v1 or v2) header.
    proxy_protocol: bool = False
    #: Peers allowed to send that header (the load balancers).
    trusted_proxies: tuple[IPNetwork, ...] = ()


@dataclass(frozen=True)
class ServerTLSConfig:
    """The ``[tls]`` table: what the proxy presents to its clients."""

    certificate: Path | None
    private_key: Path | None
    min_version: str
    ciphers: str


@dataclass(frozen=True)
class UpstreamURL:
    """One upstream directory address.  ``ldap`` means StartTLS, ``ldaps`` implicit TLS."""

    scheme: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


@dataclass(frozen=True)
class UpstreamConfig:
    """The ``[upstream]`` table."""

    urls: tuple[UpstreamURL, ...]
    ca_file: Path | None
    tls_server_name: str
    client_certificate: Path | None
    client_key: Path | None
    connect_timeout: float
    strategy: str


@dataclass(frozen=True)
class PoolConfig:
    """The ``[pool]`` table: upstream connections kept per upstream URL."""

    min_idle: int
    max_size: int
    acquire_timeout: float
    idle_timeout: float
    max_lifetime: float
    health_check_interval: float
    warm_timeout: float = 10.0


@dataclass(frozen=True)
class LimitsConfig:
    """The ``[limits]`` table."""

    max_pdu_bytes: int
    idle_timeout: float
    tls_handshake_timeout: float
    plugin_timeout: float
    drain_timeout: float = 30.0
    max_connections: int = 10000
    max_connections_per_ip: int = 0
    max_pending_ops: int = 100
    first_request_timeout: float = 10.0
    operation_timeout: float = 120.0


@dataclass(frozen=True)
class MetricsConfig:
    """The ``[metrics]`` table."""

    endpoint: str


@dataclass(frozen=True)
class LogConfig:
    """The ``[log]`` table: the main log on stderr."""

    format: str
    level: str


@dataclass(frozen=True)
class ProcessConfig:
    """The ``[process]`` table: how many worker processes serve the listeners."""

    workers: int = 1


@dataclass(frozen=True)
class PluginSpec:
    """One ``[[plugin]]`` table: which plugin, and its own keys (the plugin validates them,
    see :mod:`ldapproxy.plugin_chain`)."""

    source: Path
    #: Position among the ``[[plugin]]`` tables, from 1, for error messages.
    index: int
    use: str
    options: Mapping[str, Any]


@dataclass(frozen=True)
class Config:
    """A whole, validated configuration."""

    path: Path
    listeners: tuple[ListenerConfig, ...]
    tls: ServerTLSConfig
    upstream: UpstreamConfig
    pool: PoolConfig
    limits: LimitsConfig
    plugins: tuple[PluginSpec, ...] = ()
    metrics: MetricsConfig = MetricsConfig("")
    log: LogConfig = LogConfig("text", "info")
    process: ProcessConfig = ProcessConfig()


# -- the option table --------------------------------------------------------------------

_REQUIRED: Any = object()


@dataclass(frozen=True)
class Option:
    """One configuration key: where it lives, its default, and how its value is checked."""

    section: str
    key: str
    default: Any
    help: str
    parse: Callable[[Any], Any]
    #: Shown in docs instead of the Python default (for values built from a pattern).
    shown_default: str | None = None
    #: Whether a change needs a restart (a reload logs it and keeps the running value).
    restart: bool = False

    @property
    def required(self) -> bool:
        """Whether the key has no default."""
        return self.default is _REQUIRED

    @property
    def dotted(self) -> str:
        """``section.key``, the name used in docs and error messages."""
        return f"{self.section}.{self.key}"


class _Bad(ValueError):
    """A value is unacceptable; the message says what was expected."""


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise _Bad("expected a string")
    return value


def _nonempty_string(value: Any) -> str:
    if not _string(value):
        raise _Bad("expected a non-empty string")
    return str(value)


def _path_or_none(value: Any) -> Path | None:
    text = _string(value)
    return Path(text) if text else None


def _positive_number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Bad("expected a number of seconds")
    if not math.isfinite(value) or value <= 0:
        raise _Bad("expected a number of seconds greater than 0")
    return float(value)


def _count(minimum: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Bad("expected an integer")
        if not minimum <= value <= 100_000:
            raise _Bad(f"expected an integer from {minimum} to 100000")
        return value

    return parse


def _connections(minimum: int) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Bad("expected an integer number of connections")
        if not minimum <= value <= 1_000_000:
            raise _Bad(f"expected an integer from {minimum} to 1000000")
        return value

    return parse


def _seconds_or_off(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Bad("expected a number of seconds (0 turns it off)")
    if not math.isfinite(value) or value < 0:
        raise _Bad("expected a number of seconds, 0 or greater (0 turns it off)")
    return float(value)


def _workers(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Bad("expected an integer number of processes")
    if not 1 <= value <= 64:
        raise _Bad("expected an integer from 1 to 64")
    return value


def _pdu_size(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Bad("expected an integer number of bytes")
    if not 1024 <= value <= 2**31:
        raise _Bad("expected an integer number of bytes between 1024 and 2147483648")
    return value


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in choices:
            raise _Bad("expected one of " + ", ".join(repr(c) for c in choices))
        return str(value)

    return parse


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Bad("expected true or false")
    return value


def _networks(value: Any) -> tuple[IPNetwork, ...]:
    if not isinstance(value, list):
        raise _Bad('expected a list of IPv4 or IPv6 networks, e.g. ["10.0.0.5/32"]')
    networks = []
    for item in value:
        try:
            networks.append(ipaddress.ip_network(_string(item)))
        except ValueError as error:
            raise _Bad(f"{item!r}: expected an IPv4 or IPv6 network ({error})") from None
    return tuple(networks)


def _optional_endpoint(value: Any) -> str:
    return _endpoint(value) if _string(value) else ""


def _listener_tls(value: Any) -> ListenerTLS:
    return ListenerTLS(_choice(*(m.value for m in ListenerTLS))(value))


def _endpoint(value: Any) -> str:
    text = _nonempty_string(value)
    # Parse now (nothing is bound) so a typo fails at startup with the key named.
    from twisted.internet import endpoints

    kind = text.split(":", 1)[0].lower()
    if kind in ("ssl", "tls"):
        raise _Bad(
            f"{kind}: endpoints bypass the proxy's TLS policy; "
            'use a tcp: endpoint with tls = "ldaps"'
        )
    if kind == "systemd":
        # The socket itself is looked up among those systemd passed when listening.
        from ldapproxy.systemd import parse_systemd_endpoint

        try:
            parse_systemd_endpoint(text)
        except ValueError as error:
            raise _Bad(str(error)) from None
        return text
    try:
        endpoints.serverFromString(_UnusedReactor(), text)  # type: ignore[no-untyped-call]
    except Exception as error:
        raise _Bad(
            f"expected a Twisted server endpoint string such as 'tcp:389' ({error})"
        ) from None
    return text


class _UnusedReactor:
    """Stands in for the reactor while an endpoint string is only parsed."""


def _urls(value: Any) -> tuple[UpstreamURL, ...]:
    if not isinstance(value, list) or not value:
        raise _Bad("expected a non-empty list of ldap:// or ldaps:// URLs")
    return tuple(_url(item) for item in value)


def _url(value: Any) -> UpstreamURL:
    text = _string(value)
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as error:
        raise _Bad(f"{text!r} is not a valid URL ({error})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("ldap", "ldaps"):
        raise _Bad(
            f"{text!r}: expected an ldap:// (StartTLS) or ldaps:// URL; "
            "plaintext to the upstream is never used"
        )
    if not parts.hostname:
        raise _Bad(f"{text!r} has no host")
    if parts.username is not None or parts.password is not None:
        raise _Bad(f"{text!r}: expected scheme://host[:port]; credentials don't belong in a URL")
    if port == 0:
        raise _Bad(f"{text!r}: port 0 is not a valid port")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise _Bad(f"{text!r}: expected scheme://host[:port] with no DN or options")
    default_port = 636 if scheme == "ldaps" else 389
    return UpstreamURL(scheme, parts.hostname, port or default_port)


OPTIONS: tuple[Option, ...] = (
    Option(
        "listener",
        "name",
        "",
        "Name shown in logs and metrics; defaults to the listener's position, listener0...",
        _string,
        shown_default='"listener<N>"',
        restart=True,
    ),
    Option(
        "listener",
        "endpoint",
        _REQUIRED,
        "Twisted server endpoint string, e.g. tcp:389 or tcp:3389:interface=127.0.0.1.",
        _endpoint,
        restart=True,
    ),
    Option(
        "listener",
        "tls",
        "starttls-optional",
        "none, starttls-optional, starttls-required or ldaps.",
        _listener_tls,
        restart=True,
    ),
    Option(
        "listener",
        "proxy_protocol",
        False,
        "Expect a PROXY protocol v1 or v2 header from a trusted load balancer first.",
        _boolean,
        restart=True,
    ),
    Option(
        "listener",
        "trusted_proxies",
        [],
        "Networks whose connections may (and must) send the PROXY header.",
        _networks,
        restart=True,
    ),
    Option(
        "tls",
        "certificate",
        "",
        "PEM certificate presented to clients, leaf first, then intermediates.",
        _path_or_none,
    ),
    Option("tls", "private_key", "", "PEM private key of the certificate.", _path_or_none),
    Option(
        "tls",
        "min_version",
        "1.2",
        "Lowest TLS version offered to clients: 1.2 or 1.3.",
        _choice("1.2", "1.3"),
    ),
    Option(
        "tls",
        "ciphers",
        "",
        "OpenSSL cipher string for TLS 1.2; empty means a secure default (ECDHE with AEAD).",
        _string,
    ),
    Option(
        "upstream",
        "urls",
        _REQUIRED,
        "Upstream directories: ldaps:// (implicit TLS) or ldap:// (StartTLS); see strategy.",
        _urls,
        restart=True,
    ),
    Option(
        "upstream",
        "ca_file",
        "",
        "PEM CA bundle; empty means the system trust store.",
        _path_or_none,
    ),
    Option(
        "upstream",
        "tls_server_name",
        "",
        "Name to verify in the upstream certificate (and send as SNI) instead of the URL host.",
        _string,
    ),
    Option(
        "upstream",
        "client_certificate",
        "",
        "PEM client certificate presented to the upstream; empty for none.",
        _path_or_none,
    ),
    Option("upstream", "client_key", "", "Private key of client_certificate.", _path_or_none),
    Option(
        "upstream",
        "connect_timeout",
        5.0,
        "Seconds to connect to an upstream and finish StartTLS and the TLS handshake.",
        _positive_number,
    ),
    Option(
        "upstream",
        "strategy",
        "failover",
        "failover (the first healthy URL, in order) or round-robin (every healthy URL in turn).",
        _choice("failover", "round-robin"),
        restart=True,
    ),
    Option(
        "pool",
        "min_idle",
        4,
        "Warm, idle connections kept ready per upstream URL.",
        _count(0),
        restart=True,
    ),
    Option(
        "pool",
        "max_size",
        200,
        "Most connections per upstream URL (leased, idle and being opened).",
        _count(1),
        restart=True,
    ),
    Option(
        "pool",
        "acquire_timeout",
        5.0,
        "Seconds a new session waits for a free connection before it is answered busy (51).",
        _positive_number,
        restart=True,
    ),
    Option(
        "pool",
        "idle_timeout",
        300,
        "Seconds after which idle connections beyond min_idle are closed.",
        _positive_number,
        restart=True,
    ),
    Option(
        "pool",
        "max_lifetime",
        3600,
        "Seconds after which a connection is replaced (staggered over the last quarter).",
        _positive_number,
        restart=True,
    ),
    Option(
        "pool",
        "health_check_interval",
        30,
        "Seconds between root DSE reads on each idle connection.",
        _positive_number,
        restart=True,
    ),
    Option(
        "pool",
        "warm_timeout",
        10,
        "Seconds startup waits for min_idle connections before reporting ready anyway.",
        _positive_number,
        restart=True,
    ),
    Option(
        "limits",
        "max_pdu_bytes",
        1048576,
        "Largest request PDU a client may send; larger ones close the connection.",
        _pdu_size,
    ),
    Option(
        "limits",
        "idle_timeout",
        900,
        "Seconds without traffic before an idle client is disconnected.",
        _positive_number,
    ),
    Option(
        "limits",
        "tls_handshake_timeout",
        10,
        "Seconds a client has to finish its TLS handshake.",
        _positive_number,
    ),
    Option(
        "limits",
        "plugin_timeout",
        10,
        "Seconds a plugin's decision may take before the connection or request is denied.",
        _positive_number,
    ),
    Option(
        "limits",
        "drain_timeout",
        30,
        "Seconds SIGTERM lets operations in flight finish before clients are disconnected.",
        _positive_number,
    ),
    Option(
        "limits",
        "max_connections",
        10000,
        "Client connections open at once (per worker); more are closed at once.",
        _connections(1),
    ),
    Option(
        "limits",
        "max_connections_per_ip",
        0,
        "Client connections open at once from one address (per worker); 0: no limit.",
        _connections(0),
    ),
    Option(
        "limits",
        "max_pending_ops",
        100,
        "Operations one client may have outstanding; more are answered with busy (51).",
        _count(1),
    ),
    Option(
        "limits",
        "first_request_timeout",
        10,
        "Seconds a new connection has to send its first whole request (TLS included).",
        _positive_number,
    ),
    Option(
        "limits",
        "operation_timeout",
        120,
        "Seconds the directory may stay silent on an operation before the client gets "
        "unavailable (52) and is disconnected; 0: no limit.",
        _seconds_or_off,
    ),
    Option(
        "metrics",
        "endpoint",
        "",
        "Twisted endpoint serving /metrics, /healthz and /readyz; empty disables it.",
        _optional_endpoint,
        restart=True,
    ),
    Option("log", "format", "text", "text or json.", _choice("text", "json"), restart=True),
    Option(
        "log",
        "level",
        "info",
        "Lowest level logged: debug, info, warn or error.",
        _choice("debug", "info", "warn", "error"),
    ),
    Option(
        "process",
        "workers",
        1,
        "Worker processes sharing the listeners, each with its own pool; 1 runs no supervisor.",
        _workers,
        restart=True,
    ),
)

_SECTIONS = (
    "listener",
    "tls",
    "upstream",
    "pool",
    "limits",
    "metrics",
    "log",
    "process",
    "plugin",
)


def load(path: Path) -> Config:
    """Read and validate the configuration file at ``path``.

    :raises ConfigError: the file is missing, unreadable, not TOML, or invalid.
    """
    try:
        with path.open("rb") as stream:
            document = tomllib.load(stream)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None
    return parse(document, path)


def parse(document: Mapping[str, Any], path: Path) -> Config:
    """Validate an already-parsed TOML document that came from ``path``.

    Relative file names in it are taken relative to the directory of ``path``.
    """
    for section in document:
        if section not in _SECTIONS:
            raise ConfigError(
                f"{path}: unknown section [{section}]; expected one of "
                + ", ".join(f"[{s}]" for s in _SECTIONS)
            )
    listeners = _listeners(document.get("listener"), path)
    tls = ServerTLSConfig(**_resolve(_table(document, "tls", path), path))
    upstream = _resolve(_table(document, "upstream", path), path)
    if bool(upstream["client_certificate"]) != bool(upstream["client_key"]):
        raise ConfigError(
            f"{path}: [upstream] client_certificate and client_key must be set together"
        )
    pool = PoolConfig(**_table(document, "pool", path))
    if pool.min_idle > pool.max_size:
        raise ConfigError(
            f"{path}: [pool] min_idle = {pool.min_idle} is larger than max_size = {pool.max_size}"
        )
    limits = LimitsConfig(**_table(document, "limits", path))
    plugins = _plugins(document.get("plugin"), path)
    metrics = MetricsConfig(**_table(document, "metrics", path))
    log = LogConfig(**_table(document, "log", path))
    process = ProcessConfig(**_table(document, "process", path))
    if process.workers > 1:
        from ldapproxy.workers import check_worker_endpoint

        for listener in listeners:
            try:
                check_worker_endpoint(listener.endpoint)
            except ValueError as error:
                raise ConfigError(
                    f"{path}: [[listener]] {listener.name!r} endpoint = "
                    f"{_show(listener.endpoint)}: {error}"
                ) from None
    config = Config(
        path,
        listeners,
        tls,
        UpstreamConfig(**upstream),
        pool,
        limits,
        plugins,
        metrics,
        log,
        process,
    )
    needs_tls = [lc for lc in listeners if lc.tls is not ListenerTLS.NONE]
    if needs_tls and not (tls.certificate and tls.private_key):
        first = needs_tls[0]
        raise ConfigError(
            f"{path}: [tls] certificate and private_key are required by listener "
            f"{first.name!r} (tls = {first.tls.value!r})"
        )
    return config


def _resolve(values: dict[str, Any], path: Path) -> dict[str, Any]:
    """Make the relative file names among ``values`` relative to the config's directory."""
    base = path.parent
    return {
        k: base / v if isinstance(v, Path) and not v.is_absolute() else v for k, v in values.items()
    }


def _table(document: Mapping[str, Any], section: str, path: Path) -> dict[str, Any]:
    raw = document.get(section, {})
    where = f"[{section}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: {where} must be a table")
    return _check_keys(raw, section, where, path)


def _check_keys(raw: Mapping[str, Any], section: str, where: str, path: Path) -> dict[str, Any]:
    options = {o.key: o for o in OPTIONS if o.section == section}
    for key in raw:
        if key not in options:
            raise ConfigError(
                f"{path}: {where} unknown key {key!r}; expected one of " + ", ".join(options)
            )
    values: dict[str, Any] = {}
    for key, option in options.items():
        if key not in raw:
            if option.required:
                raise ConfigError(f"{path}: {where} {key} is required ({option.help})")
            value = option.default
        else:
            value = raw[key]
        try:
            values[key] = option.parse(value)
        except _Bad as error:
            raise ConfigError(f"{path}: {where} {key} = {_show(value)}: {error}") from None
    return values


def _listeners(raw: Any, path: Path) -> tuple[ListenerConfig, ...]:
    if raw is None or raw == []:
        raise ConfigError(f"{path}: at least one [[listener]] is required")
    if not isinstance(raw, list) or not all(isinstance(item, dict) for item in raw):
        raise ConfigError(f"{path}: listener must be an array of tables, written [[listener]]")
    listeners = []
    for index, item in enumerate(raw):
        values = _check_keys(item, "listener", f"[[listener]] #{index + 1}", path)
        values["name"] = values["name"] or f"listener{index}"
        where = f"[[listener]] {values['name']!r}"
        if values["proxy_protocol"] and not values["trusted_proxies"]:
            raise ConfigError(
                f"{path}: {where} proxy_protocol = true needs trusted_proxies: the load "
                "balancers allowed to send the PROXY header"
            )
        if values["trusted_proxies"] and not values["proxy_protocol"]:
            raise ConfigError(f"{path}: {where} trusted_proxies is set but proxy_protocol = false")
        listeners.append(ListenerConfig(**values))
    names = [lc.name for lc in listeners]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"{path}: [[listener]] name = {name!r} is used more than once")
    return tuple(listeners)


def _plugins(raw: Any, path: Path) -> tuple[PluginSpec, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(item, dict) for item in raw):
        raise ConfigError(f"{path}: plugin must be an array of tables, written [[plugin]]")
    specs = []
    for index, item in enumerate(raw, 1):
        use = item.get("use")
        if not isinstance(use, str) or not use:
            shown = "is required" if use is None else f"= {_show(use)}: expected a plugin name"
            raise ConfigError(
                f"{path}: [[plugin]] #{index} use {shown} (a bundled plugin such as "
                "'allowlist', an entry point in group ldapproxy.plugins, or "
                "'package.module:Class')"
            )
        options = {k: v for k, v in item.items() if k != "use"}
        specs.append(PluginSpec(path, index, use, options))
    return tuple(specs)


def _values(config: Config) -> Iterator[tuple[str, Option, Any]]:
    """``(name, option, value)`` for every key of ``config``; listener keys are named
    ``[[listener]] NAME.key``."""
    for option in OPTIONS:
        if option.section == "listener":
            for listener in config.listeners:
                yield (
                    f"[[listener]] {listener.name}.{option.key}",
                    option,
                    getattr(listener, option.key),
                )
        else:
            yield option.dotted, option, getattr(getattr(config, option.section), option.key)


def changes(old: Config, new: Config) -> Iterator[tuple[str, Option, Any, Any]]:
    """``(name, option, old value, new value)`` for every key that differs."""
    before = {name: (option, value) for name, option, value in _values(old)}
    after = {name: (option, value) for name, option, value in _values(new)}
    for name in sorted(before.keys() | after.keys()):
        option, old_value = before.get(name, (None, None))
        new_option, new_value = after.get(name, (None, None))
        if old_value != new_value:
            yield name, option or new_option, old_value, new_value  # type: ignore[misc]


def reloaded(running: Config, new: Config) -> Config:
    """``new``, except for the keys that need a restart, which keep their ``running``
    values."""
    return dataclasses.replace(
        new,
        listeners=running.listeners,
        upstream=dataclasses.replace(
            new.upstream, urls=running.upstream.urls, strategy=running.upstream.strategy
        ),
        pool=running.pool,
        metrics=running.metrics,
        log=dataclasses.replace(new.log, format=running.log.format),
        process=running.process,
    )


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
