"""The plugin API: the events plugins see, the verdicts they return, and how a plugin is
configured.  Everything here is public and documented in ``docs/plugins.rst``.

A plugin is a subclass of :class:`Plugin` that overrides the hooks it needs.  It sees
frozen metadata views (:class:`Connection`, :class:`Request`, :class:`Response`,
:class:`Disconnect`), never a transport, a PDU or a credential.

Guarantees, per accepted client connection:

* :meth:`Plugin.connection_accepted` runs before any byte is read from the client (and,
  on an ``ldaps`` listener, before the TLS handshake).
* :meth:`Plugin.tls_started` runs once the client's TLS handshake has completed.
* :meth:`Plugin.request` runs for each request after framing and before it is forwarded,
  in the order the client sent them: while a verdict is pending, later requests wait.
  StartTLS is answered by the proxy itself and is reported by ``tls_started`` instead.
* :meth:`Plugin.response` runs once for each request that gets a final response, from the
  upstream or from the proxy (a deny, busy, unavailable...).
* :meth:`Plugin.disconnected` runs exactly once, also for connections that a plugin
  refused at accept.

Decision hooks (``connection_accepted`` and ``request``) return :data:`ALLOW` or
:func:`deny`, or a Deferred that fires with one.  Plugins run in configuration order; the
first deny wins, and later plugins are not asked.  A decision hook that raises, returns
something else, fails its Deferred or does not decide within ``limits.plugin_timeout``
denies (fail closed).  An observation hook that raises is logged and skipped.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from ldapproxy.fields import PASSWORD_ATTRIBUTES, RequestFields

__all__ = [
    "ALLOW",
    "ALL_OPERATIONS",
    "INSUFFICIENT_ACCESS_RIGHTS",
    "OPERATIONS",
    "PASSWORD_ATTRIBUTES",
    "UNWILLING_TO_PERFORM",
    "Connection",
    "Disconnect",
    "Plugin",
    "PluginConfigError",
    "PluginContext",
    "PluginOptions",
    "Request",
    "RequestFields",
    "Response",
    "Verdict",
    "deny",
]

#: The operation names a :class:`Request` can carry, as in ``ldapproxy.messages``.
OPERATIONS: tuple[str, ...] = (
    "bind",
    "search",
    "compare",
    "add",
    "modify",
    "delete",
    "modrdn",
    "extended",
    "abandon",
    "unbind",
)

#: Ask for decoded fields on every operation (see :attr:`Plugin.request_fields`).
ALL_OPERATIONS: frozenset[str] = frozenset(OPERATIONS)

# -- verdicts -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Verdict:
    """A decision hook's answer.

    ``code`` and ``message`` are the LDAP result code and diagnostic the client gets for a
    denied request; ``reason`` is a short fixed word for logs and metrics labels (never a
    DN or an address: it must come from a small set).
    """

    allowed: bool
    code: int = 0
    message: str = ""
    reason: str = ""


#: Let the connection or request through (to the next plugin, then the upstream).
ALLOW = Verdict(True)

#: insufficientAccessRights (RFC 4511 Appendix A), the usual code for a policy deny.
INSUFFICIENT_ACCESS_RIGHTS = 50
#: unwillingToPerform, for refusals that are not about access rights.
UNWILLING_TO_PERFORM = 53


def deny(
    code: int = INSUFFICIENT_ACCESS_RIGHTS,
    message: str = "denied by policy",
    reason: str = "policy",
) -> Verdict:
    """Refuse: the client gets ``code`` with ``message``; nothing reaches the upstream."""
    if not 1 <= code <= 0x7FFFFFFF or code == 14:
        # 0 is success, and saslBindInProgress is not an answer a proxy can give.
        raise ValueError(f"deny() needs an LDAP error result code, not {code}")
    return Verdict(False, code, message, reason or "policy")


# -- metadata views -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Connection:
    """One client connection as of the event that carries it."""

    #: The connection id, as in log lines (``conn=ID``).
    id: int
    #: The client's IP address (IPv4 or IPv6, without brackets) and port.
    client_host: str
    client_port: int
    #: The ``name`` of the listener that accepted it.
    listener: str
    #: The TLS protocol version (``"TLSv1.3"``) and cipher once TLS is up, else ``None``.
    tls_version: str | None
    tls_cipher: str | None
    #: The DN of the last successful simple bind; ``""`` after an anonymous bind, ``None``
    #: before any bind succeeded (or after a SASL bind, whose identity the proxy does not
    #: see).
    bound_dn: str | None
    #: The clock time the connection was accepted, in seconds since the epoch.
    started: float

    @property
    def client(self) -> str:
        """``ip:port``, or ``[ip]:port`` for IPv6."""
        if ":" in self.client_host:
            return f"[{self.client_host}]:{self.client_port}"
        return f"{self.client_host}:{self.client_port}"


@dataclass(frozen=True, slots=True)
class Request:
    """One request from a client, after framing and before forwarding."""

    connection: Connection
    message_id: int
    #: One of :data:`OPERATIONS`, or ``"unknown"`` for a tag the proxy does not know.
    op: str
    #: Decoded fields, when a plugin asked for this operation's (see
    #: :attr:`Plugin.request_fields`); else ``None``.
    fields: RequestFields | None
    #: The clock time the request arrived.
    received: float


@dataclass(frozen=True, slots=True)
class Response:
    """The final response of one request."""

    request: Request
    #: The LDAP result code (0 success, 49 invalidCredentials...); -1 if unreadable.
    result: int
    #: For a search: how many entries and continuation references were returned.
    entries: int
    references: int
    #: Seconds from the request's arrival to its final response.
    duration: float
    #: The name of the plugin whose deny produced this response, else ``None``.
    denied_by: str | None = None
    #: Whether the proxy answered itself (a deny, busy, unavailable, confidentialityRequired)
    #: rather than the upstream.
    local: bool = False


@dataclass(frozen=True, slots=True)
class Disconnect:
    """The end of a client connection."""

    connection: Connection
    #: Why it ended, e.g. ``"client unbind"``, ``"client disconnected"``, ``"idle timeout"``,
    #: ``"denied by allowlist"``.
    reason: str
    #: Seconds since the connection was accepted.
    duration: float
    #: How many requests the client sent.
    requests: int
    #: The plugin that refused the connection at accept, else ``None``.
    denied_by: str | None = None
    #: That plugin's verdict ``reason``, else ``""``.
    deny_reason: str = ""


# -- plugins ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PluginContext:
    """What the proxy gives a plugin when it is built."""

    #: The reactor's clock (a ``twisted.internet.task.Clock`` in tests).
    clock: IReactorTime
    #: The reactor, for plugins that need threads or files (``callFromThread``...).
    reactor: Any
    #: The Prometheus registry the proxy serves; plugins add their own metrics to it.
    registry: Any
    #: The directory of the configuration file, against which relative paths resolve.
    config_dir: Path
    #: The names of the configured listeners, for plugins whose keys name them.
    listeners: tuple[str, ...] = ()


class PluginConfigError(Exception):
    """A plugin's configuration is invalid; ``str(error)`` names the key and the value."""


_REQUIRED: Any = object()


@dataclass
class PluginOptions:
    """The keys of one ``[[plugin]]`` table, read with validation.

    Each getter names the key in its error; :meth:`finish` rejects keys nobody read.
    """

    raw: Mapping[str, Any]
    config_dir: Path
    _read: set[str] = field(default_factory=set)

    def error(self, key: str, value: Any, expected: str) -> PluginConfigError:
        """The error for ``key = value``, saying what was ``expected``."""
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        return PluginConfigError(f"{key} = {shown}: {expected}")

    def value(self, key: str, default: Any = _REQUIRED) -> Any:
        """The raw TOML value of ``key``, or ``default`` (required if none is given)."""
        self._read.add(key)
        if key in self.raw:
            return self.raw[key]
        if default is _REQUIRED:
            raise PluginConfigError(f"{key} is required")
        return default

    def string(self, key: str, default: Any = _REQUIRED) -> str:
        """A string value."""
        value = self.value(key, default)
        if not isinstance(value, str):
            raise self.error(key, value, "expected a string")
        return value

    def integer(self, key: str, default: Any = _REQUIRED, minimum: int = 0) -> int:
        """An integer of at least ``minimum``."""
        value = self.value(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.error(key, value, f"expected an integer of at least {minimum}")
        return value

    def seconds(self, key: str, default: Any = _REQUIRED) -> float:
        """A number of seconds greater than 0."""
        value = self.value(key, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or value <= 0
        ):
            raise self.error(key, value, "expected a number of seconds greater than 0")
        return float(value)

    def path(self, key: str, default: Any = _REQUIRED) -> Path:
        """A file name, relative to the configuration file's directory unless absolute."""
        text = self.string(key, default)
        if not text:
            raise self.error(key, text, "expected a file name")
        path = Path(text)
        return path if path.is_absolute() else self.config_dir / path

    def finish(self) -> None:
        """Fail on every key that was not read: typos must not pass silently."""
        unknown = sorted(set(self.raw) - self._read)
        if unknown:
            expected = ", ".join(sorted(self._read)) or "none"
            raise PluginConfigError(f"unknown key {unknown[0]!r}; expected one of: {expected}")


class Plugin:
    """Base class of plugins: every hook does nothing and allows.

    Lifecycle: :meth:`from_config` validates the plugin's table and builds it without side
    effects (``ldapproxy check`` uses it too); :meth:`start` acquires resources before the
    proxy listens; the hooks run while it serves; :meth:`reopen` runs on SIGHUP;
    :meth:`stop` runs at shutdown.
    """

    #: Set by the proxy: the ``use`` value the plugin was loaded by, used in log lines.
    name: str = ""

    #: The keys of the plugin's table with the default shown in the documentation.
    options: ClassVar[Mapping[str, str]] = {}

    #: The operations (names from :data:`OPERATIONS`) whose :attr:`Request.fields` this
    #: plugin reads.  The proxy decodes a request only when some plugin asked for its
    #: operation, so the fast path stays undecoded.
    request_fields: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def from_config(cls, options: PluginOptions, context: PluginContext) -> Plugin:
        """Build the plugin from its table; raise :class:`PluginConfigError` on a bad key."""
        options.finish()
        return cls()

    def wants(self, hook: str) -> bool:
        """Whether this instance needs ``hook`` (a hook name), asked once after
        :meth:`from_config`.

        Only hooks the class overrides are asked about.  A plugin whose configuration makes
        an overridden hook a no-op (an allowlist whose rules restrict no operation never
        denies a request) returns False for it, and the proxy then does no per-request
        work for it.
        """
        return True

    def start(self) -> defer.Deferred[None] | None:
        """Acquire resources (open files...); an exception stops startup with its message."""
        return None

    def reopen(self) -> None:
        """SIGHUP: reopen files (after logrotate moved them)."""

    def stop(self) -> defer.Deferred[None] | None:
        """Shutdown: flush and release resources."""
        return None

    # -- decision hooks --

    def connection_accepted(self, connection: Connection) -> Verdict | defer.Deferred[Verdict]:
        """A client connected; nothing has been read yet.  A deny closes the connection."""
        return ALLOW

    def request(self, request: Request) -> Verdict | defer.Deferred[Verdict]:
        """A request arrived.  A deny answers it with the verdict's code and message (Abandon
        and Unbind have no response: a denied Abandon is dropped, and an Unbind still ends
        the connection)."""
        return ALLOW

    # -- observation hooks --

    def tls_started(self, connection: Connection) -> None:
        """The client's TLS handshake completed (ldaps, or after StartTLS)."""

    def response(self, response: Response) -> None:
        """A request got its final response."""

    def disconnected(self, disconnect: Disconnect) -> None:
        """The client connection ended."""
