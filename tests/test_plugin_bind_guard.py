"""The bind_guard plugin, through the public hook API: its configuration, the per-address and
per-DN limits, the sliding window, and the memory it keeps."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

import pytest
from twisted.internet.task import Clock

from ldapproxy import testing
from ldapproxy.hooks import ALLOW, OPERATIONS, PluginConfigError, Request, RequestFields, Verdict
from ldapproxy.plugins.bind_guard import BindGuard

ALICE = "uid=alice,ou=people,dc=example,dc=com"
BOB = "uid=bob,ou=people,dc=example,dc=com"

IP_DENIED = Verdict(
    False, 53, "too many failed binds from this address; try again later", "ip_failures"
)
DN_DENIED = Verdict(
    False, 53, "too many failed binds for this account; try again later", "dn_failures"
)


def guard(clock: Clock | None = None, **raw: Any) -> BindGuard:
    """A BindGuard built from ``raw`` the way the proxy builds it, on ``clock``."""
    plugin = BindGuard.from_config(testing.options(raw), testing.context(clock=clock or Clock()))
    assert isinstance(plugin, BindGuard)
    return plugin


def bind(dn: str = ALICE, host: str = "192.0.2.1", mechanism: str = "simple") -> Request:
    """A bind request for ``dn`` from ``host``."""
    fields = RequestFields(dn=dn, mechanism=mechanism)
    return testing.request("bind", fields=fields, client_host=host)


def finish(plugin: BindGuard, request: Request, result: int = 49, local: bool = False) -> None:
    """Report ``request``'s final response with ``result`` (invalidCredentials by default)."""
    plugin.response(testing.response(request, result=result, local=local))


def fail(plugin: BindGuard, dn: str = ALICE, host: str = "192.0.2.1") -> None:
    """One bind for ``dn`` from ``host`` that passes the guard and fails upstream."""
    request = bind(dn, host)
    assert plugin.request(request) == ALLOW
    finish(plugin, request)


def table_sizes(plugin: BindGuard) -> tuple[int, int]:
    """How many addresses and DNs the plugin currently remembers."""
    return len(plugin.by_ip.times), len(plugin.by_dn.times)


# -- configuration ------------------------------------------------------------------------------

KEYS = "max_failures_per_dn, max_failures_per_ip, window"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"max_failures_per_ip": 0}, "max_failures_per_ip = 0: expected an integer of at least 1"),
        (
            {"max_failures_per_ip": -3},
            "max_failures_per_ip = -3: expected an integer of at least 1",
        ),
        (
            {"max_failures_per_ip": "20"},
            "max_failures_per_ip = '20': expected an integer of at least 1",
        ),
        (
            {"max_failures_per_ip": 2.5},
            "max_failures_per_ip = 2.5: expected an integer of at least 1",
        ),
        (
            {"max_failures_per_ip": True},
            "max_failures_per_ip = True: expected an integer of at least 1",
        ),
        ({"max_failures_per_dn": 0}, "max_failures_per_dn = 0: expected an integer of at least 1"),
        (
            {"max_failures_per_dn": [5]},
            "max_failures_per_dn = [5]: expected an integer of at least 1",
        ),
        ({"window": 0}, "window = 0: expected a number of seconds greater than 0"),
        ({"window": -1.5}, "window = -1.5: expected a number of seconds greater than 0"),
        ({"window": "300"}, "window = '300': expected a number of seconds greater than 0"),
        ({"window": "5m"}, "window = '5m': expected a number of seconds greater than 0"),
        ({"window": float("inf")}, "window = inf: expected a number of seconds greater than 0"),
        ({"window": False}, "window = False: expected a number of seconds greater than 0"),
        ({"windw": 300}, f"unknown key 'windw'; expected one of: {KEYS}"),
        ({"max_failures": 3}, f"unknown key 'max_failures'; expected one of: {KEYS}"),
    ],
)
def test_config_errors(raw: dict[str, Any], message: str) -> None:
    """Each invalid value is refused with a message that names the key and the value."""
    with pytest.raises(PluginConfigError) as caught:
        BindGuard.from_config(testing.options(raw), testing.context())
    assert str(caught.value) == message


def test_declares_its_options_and_fields() -> None:
    """The documented defaults are declared, and only bind requests are decoded."""
    assert dict(BindGuard.options) == {
        "max_failures_per_ip": "20",
        "max_failures_per_dn": "5",
        "window": "300",
    }
    assert BindGuard.request_fields == frozenset({"bind"})


def test_entry_point_loads_the_plugin() -> None:
    """``use = "bind_guard"`` resolves to this class through the package's entry point."""
    (point,) = entry_points(group="ldapproxy.plugins", name="bind_guard")
    assert point.load() is BindGuard


def test_defaults() -> None:
    """Without keys: 5 failures lock a DN and 20 lock an address, for 300 seconds."""
    clock = Clock()
    plugin = guard(clock)
    for _ in range(5):
        fail(plugin, ALICE, host="198.51.100.1")
    assert plugin.request(bind(ALICE, host="198.51.100.2")) == DN_DENIED
    for number in range(20):
        fail(plugin, f"uid=user{number},dc=example,dc=com", host="198.51.100.3")
    assert plugin.request(bind(BOB, host="198.51.100.3")) == IP_DENIED
    clock.advance(299.5)
    assert plugin.request(bind(ALICE, host="198.51.100.2")) == DN_DENIED
    clock.advance(0.5)
    assert plugin.request(bind(ALICE, host="198.51.100.2")) == ALLOW
    assert plugin.request(bind(BOB, host="198.51.100.3")) == ALLOW


def test_from_config_has_no_side_effects_and_stop_cancels_the_sweep() -> None:
    """Building schedules nothing; start() schedules the sweep and stop() cancels it."""
    clock = Clock()
    plugin = guard(clock)
    assert clock.getDelayedCalls() == []
    assert plugin.start() is None
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(300)
    assert len(clock.getDelayedCalls()) == 1  # the sweep reschedules itself
    assert plugin.stop() is None
    assert clock.getDelayedCalls() == []


# -- the limits ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failures", "same_ip", "other_ip"),
    [
        (0, ALLOW, ALLOW),
        (1, ALLOW, ALLOW),
        (2, ALLOW, ALLOW),
        (3, IP_DENIED, ALLOW),
        (4, IP_DENIED, ALLOW),
    ],
)
def test_per_ip_limit(failures: int, same_ip: Verdict, other_ip: Verdict) -> None:
    """After max_failures_per_ip failures (any DNs) an address's binds are refused; other
    addresses are not affected."""
    plugin = guard(max_failures_per_ip=3, max_failures_per_dn=100)
    for number in range(failures):
        request = bind(f"uid=user{number},dc=example,dc=com", host="192.0.2.1")
        finish(plugin, request)  # recorded even past the limit: binds already in flight
    assert plugin.request(bind(BOB, host="192.0.2.1")) == same_ip
    assert plugin.request(bind("", host="192.0.2.1")) == same_ip  # anonymous too
    assert plugin.request(bind(BOB, host="192.0.2.2")) == other_ip
    assert plugin.request(bind(BOB, host="2001:db8::1")) == other_ip


@pytest.mark.parametrize(
    ("failing", "probing"),
    [
        ("192.0.2.1", "::ffff:192.0.2.1"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("2001:db8::1", "2001:0db8:0:0:0:0:0:1"),
        ("2001:DB8::A", "2001:db8::a"),
    ],
)
def test_address_spellings_share_a_counter(failing: str, probing: str) -> None:
    """An IPv4-mapped address counts as its IPv4 address, and IPv6 spellings as one."""
    plugin = guard(max_failures_per_ip=2, max_failures_per_dn=100)
    fail(plugin, ALICE, host=failing)
    fail(plugin, BOB, host=probing)
    assert plugin.request(bind("uid=carol,dc=example,dc=com", host=probing)) == IP_DENIED
    assert plugin.request(bind("uid=carol,dc=example,dc=com", host=failing)) == IP_DENIED


@pytest.mark.parametrize(
    ("failures", "same_dn", "other_dn"),
    [
        (0, ALLOW, ALLOW),
        (2, ALLOW, ALLOW),
        (3, DN_DENIED, ALLOW),
        (7, DN_DENIED, ALLOW),
    ],
)
def test_per_dn_limit_across_addresses(failures: int, same_dn: Verdict, other_dn: Verdict) -> None:
    """After max_failures_per_dn failures from any mix of addresses a DN's binds are refused
    from every address; other DNs are not affected."""
    plugin = guard(max_failures_per_ip=100, max_failures_per_dn=3)
    for number in range(failures):
        finish(plugin, bind(ALICE, host=f"192.0.2.{number + 1}"))
    assert plugin.request(bind(ALICE, host="203.0.113.9")) == same_dn
    assert plugin.request(bind(ALICE, host="2001:db8::9")) == same_dn
    assert plugin.request(bind(BOB, host="203.0.113.9")) == other_dn


def test_address_limit_is_reported_before_the_dn_limit() -> None:
    """When both limits are reached, the refusal names the address."""
    plugin = guard(max_failures_per_ip=2, max_failures_per_dn=2)
    fail(plugin)
    fail(plugin)
    assert plugin.request(bind()) == IP_DENIED
    assert plugin.request(bind(host="192.0.2.2")) == DN_DENIED


@pytest.mark.parametrize(
    ("failing", "probing", "same"),
    [
        (ALICE, "UID=Alice,OU=People,DC=Example,DC=Com", True),
        (ALICE, "uid = alice , ou=people,  dc=example,dc=com", True),
        (ALICE, f"  {ALICE}\t", True),
        ("cn=Alice Smith+mail=a@x,dc=x", "cn=alice smith + mail=A@X,dc=x", True),
        (ALICE, "uid=alicia,ou=people,dc=example,dc=com", False),
        (ALICE, "uid=al ice,ou=people,dc=example,dc=com", False),  # inner space is significant
        (ALICE, "uid=alice,ou=people,dc=example", False),
    ],
)
def test_dn_normalisation(failing: str, probing: str, same: bool) -> None:
    """Case and the spaces around separators do not make a DN a different account."""
    plugin = guard(max_failures_per_ip=100, max_failures_per_dn=2)
    fail(plugin, failing, host="192.0.2.1")
    fail(plugin, failing, host="192.0.2.2")
    assert plugin.request(bind(probing, host="192.0.2.3")) == (DN_DENIED if same else ALLOW)


def test_binds_without_a_dn_count_only_for_the_address() -> None:
    """Failed binds with an empty name (anonymous, or SASL) count against the address but
    never make an empty DN a locked account."""
    plugin = guard(max_failures_per_ip=3, max_failures_per_dn=1)
    fail(plugin, "", host="192.0.2.1")
    sasl = bind("", host="192.0.2.1", mechanism="DIGEST-MD5")
    assert plugin.request(sasl) == ALLOW
    finish(plugin, sasl)
    assert plugin.request(bind("", host="192.0.2.2")) == ALLOW
    assert table_sizes(plugin) == (1, 0)
    fail(plugin, "", host="192.0.2.1")
    assert plugin.request(bind("", host="192.0.2.1")) == IP_DENIED


def test_bind_without_fields_counts_only_for_the_address() -> None:
    """A bind whose fields were not decoded is judged and counted by its address alone."""
    plugin = guard(max_failures_per_ip=1)
    request = testing.request("bind", client_host="192.0.2.1")
    assert plugin.request(request) == ALLOW
    finish(plugin, request)
    assert table_sizes(plugin) == (1, 0)
    assert plugin.request(request) == IP_DENIED


@pytest.mark.parametrize(
    ("results", "verdicts"),
    [
        ([0, 0, 0, 0, 0], [ALLOW] * 5),
        ([49, 0, 49, 0], [ALLOW, ALLOW, ALLOW, ALLOW]),
        ([49, 0, 49, 0, 49], [ALLOW, ALLOW, ALLOW, ALLOW, DN_DENIED]),  # successes don't reset
        ([0, 49, 49, 49], [ALLOW, ALLOW, ALLOW, DN_DENIED]),
        # Only invalidCredentials counts: not unwillingToPerform, inappropriateAuthentication,
        # busy, unavailable, noSuchObject, an unreadable result, or saslBindInProgress.
        ([53, 48, 51, 52, 32, -1, 14, 80], [ALLOW] * 8),
    ],
)
def test_results_sequence(results: list[int], verdicts: list[Verdict]) -> None:
    """Binds below the limit are never refused, successes never reset the count, and only
    invalidCredentials counts as a failure."""
    plugin = guard(max_failures_per_ip=100, max_failures_per_dn=3)
    seen = []
    for result in results:
        request = bind(ALICE)
        finish(plugin, request, result=result)
        seen.append(plugin.request(bind(ALICE)))
    assert seen == verdicts


def test_local_responses_do_not_count() -> None:
    """Responses the proxy gave itself (a deny, busy...) are no verdict on the credentials."""
    plugin = guard(max_failures_per_ip=1, max_failures_per_dn=1)
    for _ in range(10):
        plugin.response(testing.response(bind(), result=49, local=True, denied_by="other"))
        plugin.response(testing.response(bind(), result=53, local=True))
    assert plugin.request(bind()) == ALLOW
    assert table_sizes(plugin) == (0, 0)


def test_refused_binds_do_not_count() -> None:
    """A bind the guard refused is answered locally and does not extend the lockout."""
    clock = Clock()
    plugin = guard(clock, max_failures_per_ip=100, max_failures_per_dn=2, window=10)
    fail(plugin)
    fail(plugin)
    for second in range(1, 10):
        clock.advance(1)
        request = bind()
        verdict = plugin.request(request)
        assert verdict == DN_DENIED, second
        plugin.response(
            testing.response(request, result=verdict.code, local=True, denied_by="bind_guard")
        )
    clock.advance(1)
    assert plugin.request(bind()) == ALLOW


@pytest.mark.parametrize("op", [op for op in [*OPERATIONS, "unknown"] if op != "bind"])
def test_other_operations_are_never_refused_or_counted(op: str) -> None:
    """Non-bind requests pass even from a locked address, and their results never count."""
    plugin = guard(max_failures_per_ip=1, max_failures_per_dn=1)
    other = testing.request(op, fields=RequestFields(dn=BOB), client_host="192.0.2.2")
    for _ in range(5):
        finish(plugin, other, result=49)
    assert plugin.request(other) == ALLOW
    assert plugin.request(bind(BOB, host="192.0.2.2")) == ALLOW
    fail(plugin, ALICE, host="192.0.2.1")
    assert plugin.request(testing.request(op, client_host="192.0.2.1")) == ALLOW


# -- the window ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("steps", "verdicts"),
    [
        # Each step advances the clock, records that many failures for the DN, then probes.
        ([(0, 2)], [DN_DENIED]),
        ([(0, 2), (9.5, 0)], [DN_DENIED, DN_DENIED]),
        ([(0, 2), (10, 0)], [DN_DENIED, ALLOW]),  # exactly one window later: both expired
        ([(0, 1), (5, 1), (4.5, 0), (0.5, 0)], [ALLOW, DN_DENIED, DN_DENIED, ALLOW]),
        # Partial expiry: the failure at t=0 ages out, the one at t=5 keeps counting.
        (
            [(0, 1), (5, 1), (5, 0), (0, 1), (4.5, 0), (0.5, 0)],
            [ALLOW, DN_DENIED, ALLOW, DN_DENIED, DN_DENIED, ALLOW],
        ),
    ],
)
def test_window_slides(steps: list[tuple[float, int]], verdicts: list[Verdict]) -> None:
    """A DN is refused while the window holds max_failures_per_dn failures, and allowed
    again as soon as one of them is ``window`` seconds old."""
    clock = Clock()
    plugin = guard(clock, max_failures_per_ip=100, max_failures_per_dn=2, window=10)
    seen = []
    for advance, failures in steps:
        clock.advance(advance)
        for _ in range(failures):
            finish(plugin, bind(ALICE, host="192.0.2.1"))
        seen.append(plugin.request(bind(ALICE, host="192.0.2.2")))
    assert seen == verdicts


def test_partial_expiry_of_an_address() -> None:
    """Failures leave an address's window one at a time, each one window after it happened."""
    clock = Clock()
    plugin = guard(clock, max_failures_per_ip=3, max_failures_per_dn=100, window=60)
    for number in range(3):
        fail(plugin, f"uid=user{number},dc=x", host="192.0.2.1")
        clock.advance(10)  # failures at t=0, 10, 20; now t=30
    assert plugin.request(bind(host="192.0.2.1")) == IP_DENIED
    clock.advance(30)  # t=60: the failure at t=0 expired
    assert plugin.request(bind(host="192.0.2.1")) == ALLOW
    fail(plugin, "uid=user3,dc=x", host="192.0.2.1")  # failures at 10, 20, 60
    assert plugin.request(bind(host="192.0.2.1")) == IP_DENIED
    clock.advance(10)  # t=70: the failure at t=10 expired
    assert plugin.request(bind(host="192.0.2.1")) == ALLOW


# -- memory -------------------------------------------------------------------------------------


def test_memory_is_bounded_per_key() -> None:
    """However many failures a key has, it keeps at most its limit of timestamps."""
    plugin = guard(max_failures_per_ip=4, max_failures_per_dn=2)
    for _ in range(1000):
        finish(plugin, bind(ALICE, host="192.0.2.1"))
    assert [len(times) for times in plugin.by_ip.times.values()] == [4]
    assert [len(times) for times in plugin.by_dn.times.values()] == [2]


def test_lookups_do_not_grow_the_tables() -> None:
    """Binds that pass the guard remember nothing until one of them fails."""
    plugin = guard()
    for number in range(1000):
        request = bind(f"uid=user{number},dc=x", host=f"10.0.{number // 256}.{number % 256}")
        assert plugin.request(request) == ALLOW
        finish(plugin, request, result=0)
    assert table_sizes(plugin) == (0, 0)


def test_memory_is_released_after_the_window() -> None:
    """After an attack with many DNs and addresses, every key is forgotten within two windows
    even if none of them is seen again."""
    clock = Clock()
    plugin = guard(clock, window=60)
    plugin.start()
    clock.advance(1)
    for number in range(5000):
        finish(plugin, bind(f"uid=user{number},dc=x", host=f"10.1.{number // 256}.{number % 256}"))
    assert table_sizes(plugin) == (5000, 5000)
    clock.advance(59)  # the first sweep, at t=60: the failures at t=1 are not expired yet
    assert table_sizes(plugin) == (5000, 5000)
    clock.advance(60)
    assert table_sizes(plugin) == (0, 0)
    plugin.stop()


def test_lookup_drops_an_expired_key() -> None:
    """Looking up a key whose failures all expired forgets it, without waiting for a sweep."""
    clock = Clock()
    plugin = guard(clock, window=10)
    fail(plugin)
    assert table_sizes(plugin) == (1, 1)
    clock.advance(10)
    assert plugin.request(bind()) == ALLOW
    assert table_sizes(plugin) == (0, 0)
