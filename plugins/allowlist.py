"""The ``allowlist`` plugin: which client networks may connect, on which listeners, and which
operations they may send."""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from ldapproxy.hooks import (
    ALLOW,
    OPERATIONS,
    Connection,
    Plugin,
    PluginConfigError,
    PluginContext,
    PluginOptions,
    Request,
    Verdict,
    deny,
)

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
T = TypeVar("T")

_RULE_KEYS = frozenset({"networks", "operations", "listeners"})


@dataclass(frozen=True, slots=True)
class Rule:
    """One entry of ``rules``: the clients it matches and the operations it lets them send."""

    networks: tuple[Network, ...]
    #: ``None`` when the rule does not restrict operations.
    operations: frozenset[str] | None
    #: ``None`` when the rule applies on every listener.
    listeners: frozenset[str] | None

    def matches(self, addresses: Sequence[Address], listener: str) -> bool:
        """Whether a client at one of ``addresses`` on ``listener`` falls under this rule."""
        if self.listeners is not None and listener not in self.listeners:
            return False
        return any(address in network for network in self.networks for address in addresses)


class Allowlist(Plugin):
    """Accept connections only from listed networks, and optionally limit their operations.

    The first rule that matches the client's address and listener decides, as in a
    firewall; a client no rule matches is disconnected before anything is read.
    """

    options: ClassVar[Mapping[str, str]] = {"rules": "required"}

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = tuple(rules)

    @classmethod
    def from_config(cls, options: PluginOptions, context: PluginContext) -> Allowlist:
        """Read ``rules``; every error names the rule and key, e.g. ``rules[2].networks[0]``."""
        raw = options.value("rules")
        if not isinstance(raw, list) or not raw:
            raise options.error("rules", raw, "expected a non-empty list of tables")
        rules = [_rule(options, f"rules[{index}]", item) for index, item in enumerate(raw)]
        options.finish()
        known = frozenset(context.listeners)
        for index, rule in enumerate(rules):
            # A misspelt listener would make its rule match nothing, silently.
            unknown = sorted((rule.listeners or known) - known) if known else []
            if unknown:
                raise PluginConfigError(
                    f"rules[{index}].listeners: no listener named {unknown[0]!r} "
                    f"(listeners: {', '.join(context.listeners)})"
                )
        return cls(rules)

    def wants(self, hook: str) -> bool:
        """Requests are checked only if some rule restricts operations: else every
        connection that was accepted may send anything, and requests cost nothing."""
        if hook == "request":
            return any(rule.operations is not None for rule in self.rules)
        return True

    def rule_for(self, connection: Connection) -> Rule | None:
        """The first rule that matches ``connection``, or ``None``."""
        addresses = _addresses(connection.client_host)
        for rule in self.rules:
            if rule.matches(addresses, connection.listener):
                return rule
        return None

    def connection_accepted(self, connection: Connection) -> Verdict:
        """Refuse a client that no rule matches."""
        if self.rule_for(connection) is None:
            return deny(message="client address is not allowed", reason="host")
        return ALLOW

    def request(self, request: Request) -> Verdict:
        """Refuse an operation that the connection's rule does not list."""
        # Recomputed per request instead of cached per connection: the address and listener
        # never change during a connection, the lookup is one address parse and a few integer
        # comparisons, and a stateless plugin has no table to leak or to keep in step with
        # disconnected().
        rule = self.rule_for(request.connection)
        if rule is None:
            # Unreachable while connection_accepted() runs first; fail closed regardless.
            return deny(message="client address is not allowed", reason="host")
        if rule.operations is not None and request.op not in rule.operations:
            return deny(
                message=f"operation {request.op} is not allowed from this host",
                reason="operation",
            )
        return ALLOW


@functools.lru_cache(maxsize=4096)
def _addresses(host: str) -> tuple[Address, ...]:
    """The addresses ``host`` stands for: an IPv4-mapped IPv6 address (what a dual-stack
    listener reports for an IPv4 client) is also its IPv4 address, so IPv4 rules match it."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return ()  # not an IP address: no rule can match, so the client is refused
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return (address, address.ipv4_mapped)
    return (address,)


def _rule(options: PluginOptions, path: str, raw: Any) -> Rule:
    """The rule at ``path`` (``rules[N]``)."""
    if not isinstance(raw, Mapping):
        raise options.error(path, raw, "expected a table with networks, operations, listeners")
    unknown = sorted(set(raw) - _RULE_KEYS)
    if unknown:
        expected = ", ".join(sorted(_RULE_KEYS))
        raise PluginConfigError(f"{path}: unknown key {unknown[0]!r}; expected one of: {expected}")
    if "networks" not in raw:
        raise PluginConfigError(f"{path}.networks is required")
    networks = _items(options, f"{path}.networks", raw["networks"], "networks", _network)
    operations = listeners = None
    if "operations" in raw:
        what = "operation names"
        operations = _items(options, f"{path}.operations", raw["operations"], what, _operation)
    if "listeners" in raw:
        what = "listener names"
        listeners = _items(options, f"{path}.listeners", raw["listeners"], what, _listener)
    return Rule(
        networks=tuple(networks),
        operations=None if operations is None else frozenset(operations),
        listeners=None if listeners is None else frozenset(listeners),
    )


def _items(
    options: PluginOptions,
    path: str,
    raw: Any,
    what: str,
    parse: Callable[[PluginOptions, str, Any], T],
) -> list[T]:
    """The items of the list at ``path``, each read by ``parse``.  Empty lists are refused:
    a rule that matches nothing or allows nothing is a mistake, not a policy."""
    if not isinstance(raw, list) or not raw:
        raise options.error(path, raw, f"expected a non-empty list of {what}")
    return [parse(options, f"{path}[{index}]", item) for index, item in enumerate(raw)]


def _network(options: PluginOptions, path: str, raw: Any) -> Network:
    """An IPv4 or IPv6 network; a bare address is a single host."""
    expected = "expected an IPv4 or IPv6 network in CIDR form"
    if not isinstance(raw, str):
        raise options.error(path, raw, expected)
    try:
        return ipaddress.ip_network(raw)
    except ValueError:
        pass
    try:
        # Host bits set ("10.0.0.1/8"): probably a typo for a host or a network, so ask.
        meant = ipaddress.ip_network(raw, strict=False)
    except ValueError:
        raise options.error(path, raw, expected) from None
    raise options.error(path, raw, f"host bits are set; did you mean {str(meant)!r}?")


def _operation(options: PluginOptions, path: str, raw: Any) -> str:
    """One of :data:`OPERATIONS`."""
    if raw not in OPERATIONS:
        raise options.error(path, raw, f"expected one of: {', '.join(OPERATIONS)}")
    return str(raw)


def _listener(options: PluginOptions, path: str, raw: Any) -> str:
    """A listener name (the listeners' ``name`` keys)."""
    if not isinstance(raw, str) or not raw:
        raise options.error(path, raw, "expected a listener name")
    return raw
