"""The allowlist plugin, through the public hook API: its configuration errors, which clients
it accepts, and which operations it lets each of them send."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

import pytest
from twisted.internet.task import Clock

from ldapproxy import testing
from ldapproxy.hooks import ALLOW, OPERATIONS, PluginConfigError, Verdict
from ldapproxy.plugin_chain import PluginChain
from ldapproxy.plugins.allowlist import Allowlist

#: The rules most tests run against: loopback may do anything anywhere, 10.20/16 may read
#: and bind on the plain listener only, and the rest of 10/8 and 2001:db8::/32 may search.
RULES: list[dict[str, Any]] = [
    {"networks": ["127.0.0.0/8", "::1/128"]},
    {
        "networks": ["10.20.0.0/16"],
        "operations": ["bind", "search", "compare", "extended"],
        "listeners": ["ldap"],
    },
    {"networks": ["10.0.0.0/8", "2001:db8::/32"], "operations": ["search"]},
]

READ_ONLY = frozenset({"bind", "search", "compare", "extended"})

HOST_DENIED = Verdict(False, 50, "client address is not allowed", "host")


def allowlist(rules: list[dict[str, Any]] | None = None) -> Allowlist:
    """An Allowlist built from ``rules`` (default :data:`RULES`) the way the proxy builds it."""
    options = testing.options({"rules": RULES if rules is None else rules})
    plugin = Allowlist.from_config(options, testing.context())
    assert isinstance(plugin, Allowlist)
    return plugin


def op_denied(op: str) -> Verdict:
    """The verdict for an operation the connection's rule does not list."""
    return Verdict(False, 50, f"operation {op} is not allowed from this host", "operation")


# -- configuration ------------------------------------------------------------------------------

ALL_OPS = "bind, search, compare, add, modify, delete, modrdn, extended, abandon, unbind"
NET = ["10.0.0.0/8"]


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({}, "rules is required"),
        ({"rules": []}, "rules = []: expected a non-empty list of tables"),
        (
            {"rules": {"networks": NET}},
            "rules = {'networks': ['10.0.0.0/8']}: expected a non-empty list of tables",
        ),
        ({"rules": "10.0.0.0/8"}, "rules = '10.0.0.0/8': expected a non-empty list of tables"),
        (
            {"rules": ["10.0.0.0/8"]},
            "rules[0] = '10.0.0.0/8': expected a table with networks, operations, listeners",
        ),
        ({"rules": [{"networks": NET}, {}]}, "rules[1].networks is required"),
        (
            {"rules": [{"networks": NET, "network": NET}]},
            "rules[0]: unknown key 'network'; expected one of: listeners, networks, operations",
        ),
        (
            {"rules": [{"networks": NET}], "rule": []},
            "unknown key 'rule'; expected one of: rules",
        ),
        (
            {"rules": [{"networks": "10.0.0.0/8"}]},
            "rules[0].networks = '10.0.0.0/8': expected a non-empty list of networks",
        ),
        (
            {"rules": [{"networks": []}]},
            "rules[0].networks = []: expected a non-empty list of networks",
        ),
        (
            {"rules": [{"networks": NET}, {"networks": NET}, {"networks": ["10.0.0.0/33"]}]},
            "rules[2].networks[0] = '10.0.0.0/33': expected an IPv4 or IPv6 network in CIDR form",
        ),
        (
            {"rules": [{"networks": ["::1/128", "example.com"]}]},
            "rules[0].networks[1] = 'example.com': expected an IPv4 or IPv6 network in CIDR form",
        ),
        (
            {"rules": [{"networks": [167772160]}]},
            "rules[0].networks[0] = 167772160: expected an IPv4 or IPv6 network in CIDR form",
        ),
        (
            {"rules": [{"networks": ["2001:db8::/129"]}]},
            "rules[0].networks[0] = '2001:db8::/129': "
            "expected an IPv4 or IPv6 network in CIDR form",
        ),
        (
            {"rules": [{"networks": ["10.0.0.1/8"]}]},
            "rules[0].networks[0] = '10.0.0.1/8': host bits are set; did you mean '10.0.0.0/8'?",
        ),
        (
            {"rules": [{"networks": ["2001:db8::1/32"]}]},
            "rules[0].networks[0] = '2001:db8::1/32': host bits are set; "
            "did you mean '2001:db8::/32'?",
        ),
        (
            {"rules": [{"networks": NET, "operations": "search"}]},
            "rules[0].operations = 'search': expected a non-empty list of operation names",
        ),
        (
            {"rules": [{"networks": NET, "operations": []}]},
            "rules[0].operations = []: expected a non-empty list of operation names",
        ),
        (
            {"rules": [{"networks": NET, "operations": ["bind", "serach"]}]},
            f"rules[0].operations[1] = 'serach': expected one of: {ALL_OPS}",
        ),
        (
            {"rules": [{"networks": NET, "operations": ["BIND"]}]},
            f"rules[0].operations[0] = 'BIND': expected one of: {ALL_OPS}",
        ),
        (
            {"rules": [{"networks": NET, "operations": ["unknown"]}]},
            f"rules[0].operations[0] = 'unknown': expected one of: {ALL_OPS}",
        ),
        (
            {"rules": [{"networks": NET, "listeners": "ldap"}]},
            "rules[0].listeners = 'ldap': expected a non-empty list of listener names",
        ),
        (
            {"rules": [{"networks": NET, "listeners": []}]},
            "rules[0].listeners = []: expected a non-empty list of listener names",
        ),
        (
            {"rules": [{"networks": NET, "listeners": ["ldap", ""]}]},
            "rules[0].listeners[1] = '': expected a listener name",
        ),
        (
            {"rules": [{"networks": NET, "listeners": [636]}]},
            "rules[0].listeners[0] = 636: expected a listener name",
        ),
    ],
)
def test_config_errors(raw: dict[str, Any], message: str) -> None:
    """Each invalid table is refused with a message that names the key path and the value."""
    with pytest.raises(PluginConfigError) as caught:
        Allowlist.from_config(testing.options(raw), testing.context())
    assert str(caught.value) == message


def test_declares_its_options_and_no_fields() -> None:
    """The documented options are exactly ``rules`` (required), and no field is decoded."""
    assert dict(Allowlist.options) == {"rules": "required"}
    assert Allowlist.request_fields == frozenset()


def test_entry_point_loads_the_plugin() -> None:
    """``use = "allowlist"`` resolves to this class through the package's entry point."""
    (point,) = entry_points(group="ldapproxy.plugins", name="allowlist")
    assert point.load() is Allowlist


# -- connections --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "listener", "allowed"),
    [
        ("127.0.0.1", "ldap", True),
        ("127.255.255.254", "ldaps", True),
        ("::1", "ldaps", True),
        ("::ffff:127.0.0.1", "ldap", True),  # IPv4-mapped, from a dual-stack listener
        ("10.20.1.2", "ldap", True),
        ("::ffff:10.20.1.2", "ldap", True),
        ("10.20.1.2", "ldaps", True),  # not rule 1 (listener), but rule 2 (10/8)
        ("10.255.255.255", "ldap", True),
        ("2001:db8::5", "ldap", True),
        ("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", "ldaps", True),
        ("11.0.0.0", "ldap", False),
        ("9.255.255.255", "ldap", False),
        ("192.0.2.1", "ldap", False),
        ("::ffff:192.0.2.1", "ldap", False),
        ("::2", "ldap", False),
        ("2001:db9::1", "ldap", False),
        ("::a14:102", "ldap", False),  # IPv4-compatible, not IPv4-mapped: not 10.20.1.2
        ("fe80::1%eth0", "ldap", False),
        ("not-an-address", "ldap", False),
        ("", "ldap", False),
    ],
)
def test_connection_accepted(host: str, listener: str, allowed: bool) -> None:
    """A client is accepted exactly when some rule's networks and listeners match it."""
    verdict = allowlist().connection_accepted(
        testing.connection(client_host=host, listener=listener)
    )
    assert verdict == (ALLOW if allowed else HOST_DENIED)


@pytest.mark.parametrize(
    ("networks", "host", "allowed"),
    [
        (["192.0.2.7"], "192.0.2.7", True),  # a bare address is a single host
        (["192.0.2.7"], "192.0.2.8", False),
        (["192.0.2.7/32"], "::ffff:192.0.2.7", True),
        (["::ffff:0:0/96"], "::ffff:192.0.2.7", True),  # the IPv6 spelling matches as well
        (["::ffff:0:0/96"], "192.0.2.7", False),
        (["0.0.0.0/0"], "203.0.113.9", True),
        (["0.0.0.0/0"], "2001:db8::1", False),
        (["::/0"], "2001:db8::1", True),
        (["::/0"], "203.0.113.9", False),
        (["fe80::/10"], "fe80::1%eth0", True),  # a zone index does not hide the address
    ],
)
def test_network_forms(networks: list[str], host: str, allowed: bool) -> None:
    """Single hosts, IPv6 spellings of IPv4 and catch-all networks match what they say."""
    verdict = allowlist([{"networks": networks}]).connection_accepted(
        testing.connection(client_host=host)
    )
    assert verdict == (ALLOW if allowed else HOST_DENIED)


@pytest.mark.parametrize(
    ("listener", "allowed"),
    [("ldap", True), ("ldaps", True), ("admin", False), ("LDAP", False)],
)
def test_listener_filtering(listener: str, allowed: bool) -> None:
    """A rule with ``listeners`` matches only connections on those listeners."""
    plugin = allowlist([{"networks": ["0.0.0.0/0"], "listeners": ["ldap", "ldaps"]}])
    verdict = plugin.connection_accepted(testing.connection(listener=listener))
    assert verdict == (ALLOW if allowed else HOST_DENIED)


# -- requests -----------------------------------------------------------------------------------


@pytest.mark.parametrize("op", [*OPERATIONS, "unknown"])
@pytest.mark.parametrize(
    ("host", "listener", "allowed_ops"),
    [
        ("127.0.0.1", "ldap", frozenset([*OPERATIONS, "unknown"])),  # no operations: anything
        ("::1", "ldaps", frozenset([*OPERATIONS, "unknown"])),
        ("10.20.1.2", "ldap", READ_ONLY),
        ("::ffff:10.20.1.2", "ldap", READ_ONLY),
        ("10.20.1.2", "ldaps", frozenset({"search"})),  # rule 1 is for "ldap" only
        ("10.1.2.3", "ldap", frozenset({"search"})),
        ("2001:db8::1", "ldap", frozenset({"search"})),
    ],
)
def test_request_operations(host: str, listener: str, allowed_ops: frozenset[str], op: str) -> None:
    """Each operation is allowed exactly when the connection's rule lists it (or lists none)."""
    request = testing.request(op, client_host=host, listener=listener)
    verdict = allowlist().request(request)
    assert verdict == (ALLOW if op in allowed_ops else op_denied(op))


@pytest.mark.parametrize(
    ("host", "op", "allowed"),
    [
        ("10.1.2.3", "search", True),
        ("10.1.2.3", "bind", False),  # the later, broader rule is never consulted
        ("10.1.2.3", "modify", False),
        ("10.2.0.1", "bind", True),
        ("10.2.0.1", "modify", True),
    ],
)
def test_first_matching_rule_wins(host: str, op: str, allowed: bool) -> None:
    """The first rule that matches decides, even when a later rule would allow more."""
    plugin = allowlist(
        [
            {"networks": ["10.1.0.0/16"], "operations": ["search"]},
            {"networks": ["10.0.0.0/8"]},
        ]
    )
    verdict = plugin.request(testing.request(op, client_host=host))
    assert verdict == (ALLOW if allowed else op_denied(op))


def test_first_match_skips_rules_for_other_listeners() -> None:
    """A rule for another listener does not match, so a later rule decides instead."""
    plugin = allowlist(
        [
            {"networks": ["10.0.0.0/8"], "operations": ["search"], "listeners": ["ldaps"]},
            {"networks": ["10.0.0.0/8"], "operations": ["bind"]},
        ]
    )
    on_ldap = testing.connection(client_host="10.0.0.1", listener="ldap")
    on_ldaps = testing.connection(client_host="10.0.0.1", listener="ldaps")
    assert plugin.request(testing.request("bind", connection=on_ldap)) == ALLOW
    assert plugin.request(testing.request("search", connection=on_ldap)) == op_denied("search")
    assert plugin.request(testing.request("search", connection=on_ldaps)) == ALLOW
    assert plugin.request(testing.request("bind", connection=on_ldaps)) == op_denied("bind")


def test_request_from_unlisted_host_is_denied() -> None:
    """A request on a connection no rule matches is refused too (fail closed)."""
    verdict = allowlist().request(testing.request("search", client_host="192.0.2.1"))
    assert verdict == HOST_DENIED


def test_decisions_do_not_depend_on_connection_history() -> None:
    """The rule is found from the request's own connection view, with no per-connection
    state: after other connections and disconnects, the same request gets the same answer."""
    plugin = allowlist()
    conn = testing.connection(client_host="10.20.1.2", listener="ldap", id=7)
    other = testing.connection(client_host="127.0.0.1", id=7)
    assert plugin.connection_accepted(other) == ALLOW
    plugin.disconnected(testing.disconnect(other))
    assert plugin.request(testing.request("modify", connection=conn)) == op_denied("modify")
    assert plugin.request(testing.request("bind", connection=conn)) == ALLOW
    assert vars(plugin) == {"rules": plugin.rules}


def test_listener_names_are_checked_against_the_configured_listeners() -> None:
    """A rule naming a listener the proxy does not have fails at startup, naming it,
    instead of silently matching nothing."""
    rules = [{"networks": ["10.0.0.0/8"], "listeners": ["ldap", "lpad"]}]
    with pytest.raises(PluginConfigError) as caught:
        Allowlist.from_config(
            testing.options({"rules": rules}), testing.context(listeners=("ldap", "ldaps"))
        )
    assert str(caught.value) == (
        "rules[0].listeners: no listener named 'lpad' (listeners: ldap, ldaps)"
    )
    known = [{"networks": ["10.0.0.0/8"], "listeners": ["ldaps"]}]
    plugin = Allowlist.from_config(
        testing.options({"rules": known}), testing.context(listeners=("ldap", "ldaps"))
    )
    assert plugin.rules[0].listeners == frozenset({"ldaps"})


def test_host_only_rules_want_no_request_hook() -> None:
    """Rules without ``operations`` never deny a request of an accepted connection, so the
    plugin asks not to be called for requests; one restricting rule turns it on."""
    host_only = allowlist([{"networks": ["10.0.0.0/8"]}, {"networks": ["::1/128"]}])
    assert not host_only.wants("request")
    assert host_only.wants("connection_accepted")
    restricting = allowlist(
        [{"networks": ["10.0.0.0/8"]}, {"networks": ["::1/128"], "operations": ["search"]}]
    )
    assert restricting.wants("request")
    assert PluginChain([host_only], Clock(), 1.0).decides_requests is False
    assert PluginChain([restricting], Clock(), 1.0).decides_requests is True
