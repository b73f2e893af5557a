"""Unit tests for ldapproxy.metrics: the histogram, the counters, the scrape-time collector
as Prometheus parses it, and what a session counts into it."""

from __future__ import annotations

import math
from typing import Any

import pytest
from OpenSSL import SSL
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from support.fakes import (
    FakeClient,
    FakeSource,
    request,
    result,
    search_request,
    starttls_request,
)
from twisted.internet.address import IPv4Address
from twisted.internet.main import CONNECTION_DONE, CONNECTION_LOST
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from ldapproxy import messages as m
from ldapproxy.client import ClientFactory
from ldapproxy.config import LimitsConfig, ListenerConfig, ListenerTLS
from ldapproxy.metrics import (
    OPERATION_BUCKETS,
    POOL_WAIT_BUCKETS,
    Histogram,
    Metrics,
    Sources,
    handshake_failure_reason,
)
from ldapproxy.pool import PoolBusy
from ldapproxy.session import Session, SessionState

#: The metrics the issue lists, by type (histograms also have _bucket, _sum and _count).
#: The two audit counters come from the audit plugin, on the same registry.
CORE_GAUGES = {
    "ldapproxy_client_connections",
    "ldapproxy_upstream_up",
    "ldapproxy_upstream_connections",
    "ldapproxy_tls_certificate_expiry_timestamp_seconds",
}
CORE_COUNTERS = {
    "ldapproxy_client_connections_total",
    "ldapproxy_operations_total",
    "ldapproxy_starttls_total",
    "ldapproxy_tls_handshake_failures_total",
    "ldapproxy_upstream_connect_errors_total",
    "ldapproxy_bytes_total",
    "ldapproxy_plugin_denials_total",
    "ldapproxy_config_reloads_total",
    "ldapproxy_limits_exceeded_total",
}
AUDIT_COUNTERS = {
    "ldapproxy_audit_records_dropped_total",
    "ldapproxy_audit_write_errors_total",
}
HISTOGRAMS = {"ldapproxy_operation_duration_seconds", "ldapproxy_pool_wait_seconds"}

HANDSHAKE_TIMEOUT = 10.0


def scrape(metrics: Metrics, registry: CollectorRegistry | None = None) -> list[Any]:
    """The metric families a Prometheus scrape of ``metrics`` parses into."""
    if registry is None:
        registry = CollectorRegistry()
        metrics.register(registry)
    text = generate_latest(registry).decode()
    return list(text_string_to_metric_families(text))


def exposed_names(families: list[Any]) -> dict[str, str]:
    """Exposition name -> type: ``name_total`` for counters, the family name otherwise."""
    names = {}
    for family in families:
        name = f"{family.name}_total" if family.type == "counter" else family.name
        assert name not in names, f"{name} exported twice"
        names[name] = family.type
    return names


def samples(families: list[Any], name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample called ``name``, keyed by its sorted labels."""
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in families
        for sample in family.samples
        if sample.name == name
    }


def value(families: list[Any], name: str, **labels: str) -> float | None:
    """The value of the sample ``name`` with exactly ``labels``, or None if absent."""
    return samples(families, name).get(tuple(sorted(labels.items())))


# -- Histogram ------------------------------------------------------------------------------


def test_histogram_counts_a_value_on_a_bound_in_that_bucket() -> None:
    """A value equal to a bound counts in that bound's bucket (Prometheus ``le``), one just
    above it in the next, and the output is cumulative and ends with +Inf."""
    histogram = Histogram((1.0, 2.0, 5.0))
    for observed in (0.5, 1.0, 1.0000001, 2.0, 5.0, 5.5, 100.0):
        histogram.observe(observed)
    assert histogram.counts == [2, 2, 1, 2]
    assert histogram.buckets() == [("1.0", 2.0), ("2.0", 4.0), ("5.0", 5.0), ("+Inf", 7.0)]
    assert histogram.total == pytest.approx(0.5 + 1.0 + 1.0000001 + 2.0 + 5.0 + 5.5 + 100.0)


def test_empty_histogram_has_zero_buckets_and_sum() -> None:
    """A histogram with no observation exports every bucket, +Inf included, as zero."""
    histogram = Histogram(POOL_WAIT_BUCKETS)
    buckets = histogram.buckets()
    assert [le for le, _ in buckets] == [*map(str, POOL_WAIT_BUCKETS), "+Inf"]
    assert all(count == 0.0 for _, count in buckets)
    assert histogram.total == 0.0


def test_histogram_bounds_are_sorted_and_below_infinity() -> None:
    """The proxy's bucket bounds are strictly increasing and finite (bisect needs sorted
    bounds; +Inf is implied)."""
    for bounds in (OPERATION_BUCKETS, POOL_WAIT_BUCKETS):
        assert list(bounds) == sorted(set(bounds))
        assert all(math.isfinite(bound) and bound > 0 for bound in bounds)


def test_histogram_exposition_matches_prometheus_semantics() -> None:
    """Scraped, a duration exactly on a bucket bound is in that ``le`` bucket and all
    larger ones; _count equals the +Inf bucket and _sum the total."""
    metrics = Metrics()
    metrics.count_operation(m.SEARCH_REQUEST, m.SUCCESS, 0.005)
    metrics.count_operation(m.SEARCH_REQUEST, m.SUCCESS, 0.0051)
    metrics.count_operation(m.SEARCH_REQUEST, m.SUCCESS, 31.0)
    families = scrape(metrics)
    bucket = "ldapproxy_operation_duration_seconds_bucket"
    assert value(families, bucket, op="search", le="0.0025") == 0
    assert value(families, bucket, op="search", le="0.005") == 1
    assert value(families, bucket, op="search", le="0.01") == 2
    assert value(families, bucket, op="search", le="30.0") == 2
    assert value(families, bucket, op="search", le="+Inf") == 3
    assert value(families, "ldapproxy_operation_duration_seconds_count", op="search") == 3
    total = value(families, "ldapproxy_operation_duration_seconds_sum", op="search")
    assert total == pytest.approx(31.0101)


# -- the counters and their exposition -----------------------------------------------------


def test_every_issue_metric_is_exported_with_its_type() -> None:
    """A fresh registry with the proxy's and the audit plugin's metrics exports every metric
    of the issue's list with its type, the open-connections gauge and the accepted-
    connections counter side by side."""
    from ldapproxy.plugins.audit import _metrics as audit_metrics

    registry = CollectorRegistry()
    metrics = Metrics()
    metrics.register(registry)
    audit_metrics(registry)
    names = exposed_names(scrape(metrics, registry))
    for name in CORE_GAUGES:
        assert names.get(name) == "gauge", name
    for name in CORE_COUNTERS | AUDIT_COUNTERS:
        assert names.get(name) == "counter", name
    for name in HISTOGRAMS:
        assert names.get(name) == "histogram", name
    assert names["ldapproxy_client_connections"] == "gauge"
    assert names["ldapproxy_client_connections_total"] == "counter"
    ours = {name for name in names if not name.startswith("ldapproxy_audit_")}
    assert ours == CORE_GAUGES | CORE_COUNTERS | HISTOGRAMS


def test_reload_outcomes_are_exported_from_the_start() -> None:
    """Before any reload both outcomes are exported as 0 (so increase() sees the first
    failure); count_reload then moves only its own outcome."""
    metrics = Metrics()
    registry = CollectorRegistry()
    metrics.register(registry)
    families = scrape(metrics, registry)
    assert value(families, "ldapproxy_config_reloads_total", outcome="failure") == 0
    assert value(families, "ldapproxy_config_reloads_total", outcome="success") == 0
    metrics.count_reload("failure")
    families = scrape(metrics, registry)
    assert value(families, "ldapproxy_config_reloads_total", outcome="failure") == 1
    assert value(families, "ldapproxy_config_reloads_total", outcome="success") == 0


def test_count_methods_reach_their_series() -> None:
    """Each count_* method increments exactly the series it names, with its labels."""
    metrics = Metrics()
    metrics.count_client("ldap")
    metrics.count_client("ldap")
    metrics.count_client("ldaps")
    metrics.count_operation(m.BIND_REQUEST, 49, 0.01)
    metrics.count_operation(m.SEARCH_REQUEST, m.SUCCESS, 0.02)
    metrics.count_starttls("ldap", "success")
    metrics.count_handshake_failure("ldaps", "timeout")
    metrics.count_connect_error("ldaps://dc1.example.com:636", "refused")
    metrics.count_denial("allowlist", "host")
    metrics.count_denial("allowlist", "host")
    metrics.pool_wait.observe(0.003)
    metrics.bytes["in"] += 10
    metrics.bytes["out"] += 25
    families = scrape(metrics)
    assert samples(families, "ldapproxy_client_connections_total") == {
        (("listener", "ldap"),): 2,
        (("listener", "ldaps"),): 1,
    }
    assert samples(families, "ldapproxy_operations_total") == {
        (("op", "bind"), ("result", "invalidCredentials")): 1,
        (("op", "search"), ("result", "success")): 1,
    }
    assert samples(families, "ldapproxy_starttls_total") == {
        (("listener", "ldap"), ("outcome", "success")): 1
    }
    assert samples(families, "ldapproxy_tls_handshake_failures_total") == {
        (("listener", "ldaps"), ("reason", "timeout")): 1
    }
    assert samples(families, "ldapproxy_upstream_connect_errors_total") == {
        (("reason", "refused"), ("upstream", "ldaps://dc1.example.com:636")): 1
    }
    assert samples(families, "ldapproxy_plugin_denials_total") == {
        (("plugin", "allowlist"), ("reason", "host")): 2
    }
    assert samples(families, "ldapproxy_bytes_total") == {
        (("direction", "in"),): 10,
        (("direction", "out"),): 25,
    }
    assert value(families, "ldapproxy_pool_wait_seconds_bucket", le="0.001") == 0
    assert value(families, "ldapproxy_pool_wait_seconds_bucket", le="0.005") == 1
    assert value(families, "ldapproxy_pool_wait_seconds_count") == 1


def test_gauges_are_read_from_the_sources_at_scrape_time() -> None:
    """The gauges show what the sources return when scraped: changing the sources' state
    between two scrapes changes the values, with nothing counted in between."""
    state: dict[str, Any] = {
        "sessions": [("ldap", "none"), ("ldap", "none"), ("ldaps", "TLSv1.3")],
        "up": [("ldaps://dc1:636", True), ("ldaps://dc2:636", False)],
        "pooled": [("ldaps://dc1:636", "idle", 2), ("ldaps://dc1:636", "leased", 1)],
        "certs": [("served", "CN=proxy", 1900000000.0)],
    }
    metrics = Metrics()
    metrics.sources = Sources(
        client_connections=lambda: list(state["sessions"]),
        upstream_up=lambda: list(state["up"]),
        upstream_connections=lambda: list(state["pooled"]),
        certificates=lambda: list(state["certs"]),
    )
    registry = CollectorRegistry()
    metrics.register(registry)
    first = scrape(metrics, registry)
    assert samples(first, "ldapproxy_client_connections") == {
        (("listener", "ldap"), ("tls", "none")): 2,
        (("listener", "ldaps"), ("tls", "TLSv1.3")): 1,
    }
    assert value(first, "ldapproxy_upstream_up", upstream="ldaps://dc1:636") == 1
    assert value(first, "ldapproxy_upstream_up", upstream="ldaps://dc2:636") == 0
    assert value(first, "ldapproxy_upstream_connections", upstream="ldaps://dc1:636", state="idle")
    expiry = "ldapproxy_tls_certificate_expiry_timestamp_seconds"
    assert value(first, expiry, role="served", subject="CN=proxy") == 1900000000.0

    state["sessions"] = [("ldaps", "TLSv1.2")]
    state["up"] = [("ldaps://dc1:636", False), ("ldaps://dc2:636", True)]
    state["pooled"] = [("ldaps://dc1:636", "idle", 0)]
    state["certs"] = [("served", "CN=proxy", 1950000000.0)]
    second = scrape(metrics, registry)
    assert samples(second, "ldapproxy_client_connections") == {
        (("listener", "ldaps"), ("tls", "TLSv1.2")): 1
    }
    assert value(second, "ldapproxy_upstream_up", upstream="ldaps://dc1:636") == 0
    assert value(second, "ldapproxy_upstream_up", upstream="ldaps://dc2:636") == 1
    assert samples(second, "ldapproxy_upstream_connections") == {
        (("state", "idle"), ("upstream", "ldaps://dc1:636")): 0
    }
    assert value(second, expiry, role="served", subject="CN=proxy") == 1950000000.0


def test_default_sources_export_empty_gauges() -> None:
    """Without sources (a Metrics not wired to a service) the gauges have no samples and
    the scrape still succeeds."""
    families = scrape(Metrics())
    for name in CORE_GAUGES:
        assert samples(families, name) == {}, name


def test_operation_and_result_labels_are_bounded() -> None:
    """Operation labels come from the fixed set of request names (any other tag is
    "unknown") and result labels from the RFC names (any other code is "other")."""
    metrics = Metrics()
    for tag in (*m.REQUEST_NAMES, 0x55, 0x7F, 0x00):
        for code in (0, 32, 49, 4242, -1):
            metrics.count_operation(tag, code, 0.0)
    ops = {op for op, _ in metrics.operations}
    assert ops == {*m.REQUEST_NAMES.values(), "unknown"}
    results = {result for _, result in metrics.operations}
    assert results == {"success", "noSuchObject", "invalidCredentials", "other"}
    assert set(metrics.durations) == ops
    families = scrape(metrics)
    unknown = value(families, "ldapproxy_operations_total", op="unknown", result="other")
    assert unknown == 3 * 2  # three unknown tags, two unknown codes


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        ("TLS handshake timeout", "timeout"),
        ("User timeout caused connection failure.", "timeout"),
        ("operation timed out", "timeout"),
        ("[('SSL routines', '', 'unsupported protocol')]", "protocol_version"),
        ("[('SSL routines', '', 'version too low')]", "protocol_version"),
        ("[('SSL routines', '', 'no shared cipher')]", "no_shared_cipher"),
        ("[('SSL routines', '', 'tlsv1 alert unknown ca')]", "client_rejected_certificate"),
        ("[('SSL routines', '', 'sslv3 alert bad certificate')]", "client_rejected_certificate"),
        (
            "[('SSL routines', '', 'sslv3 alert certificate unknown')]",
            "client_rejected_certificate",
        ),
        ("[('SSL routines', '', 'http request')]", "not_tls"),
        # What OpenSSL says when a plain LDAP client sends its bind to an ldaps listener.
        ("[('SSL routines', '', 'wrong version number')]", "not_tls"),
        ("Connection was closed cleanly.", "closed"),
        # Twisted's CONNECTION_LOST: also what a TLS layer reports for an EOF mid-handshake.
        (
            "Connection to the other side was lost in a non-clean fashion: Connection lost.",
            "closed",
        ),
        ("ConnectionDone", "closed"),
        ("ConnectionLost", "closed"),
        ("[('SSL routines', '', 'something new')]", "other"),
        ("", "other"),
    ],
)
def test_handshake_failure_reason(error: str, reason: str) -> None:
    """handshake_failure_reason maps error texts to a small fixed set of reason words."""
    assert handshake_failure_reason(error) == reason


def test_handshake_failure_reason_for_real_openssl_errors() -> None:
    """The reason words for the errors OpenSSL really raises: plain LDAP or HTTP sent to a
    TLS server is not_tls, and the errors of a closed connection are closed."""
    ldap_bind = bytes.fromhex("300c020101600702010304008000")
    for client_bytes, reason in ((ldap_bind, "not_tls"), (b"GET / HTTP/1.1\r\n\r\n", "not_tls")):
        server = SSL.Connection(SSL.Context(SSL.TLS_METHOD), None)
        server.set_accept_state()
        server.bio_write(client_bytes)
        with pytest.raises(SSL.Error) as raised:
            server.do_handshake()
        assert handshake_failure_reason(str(raised.value)) == reason, raised.value
    for lost in (CONNECTION_DONE, CONNECTION_LOST):
        assert handshake_failure_reason(str(lost)) == "closed", lost


# -- what a session counts -----------------------------------------------------------------


class Counted:
    """A session built as :func:`support.fakes.make_session` builds it, with a Metrics."""

    def __init__(self, tls: ListenerTLS, start: bool = True) -> None:
        self.clock = Clock()
        self.client = FakeClient()
        self.source = FakeSource()
        self.metrics = Metrics()
        self.session = Session(
            7,
            ("192.0.2.10", 50000),
            ListenerConfig("test", "tcp:389", tls),
            LimitsConfig(1 << 20, 900.0, HANDSHAKE_TIMEOUT, 10.0),
            self.clock,
            self.source,
            self.client,
            metrics=self.metrics,
        )
        if start:
            self.session.start()

    def send(self, *pdus: bytes) -> None:
        self.session.client_data(b"".join(pdus))


def test_session_counts_a_forwarded_search_with_its_duration() -> None:
    """A search answered by the upstream counts search/success once, with the time from
    its arrival to the final response in the duration histogram."""
    counted = Counted(ListenerTLS.NONE)
    counted.send(search_request(2))
    upstream = counted.source.succeed()
    counted.clock.advance(0.3)
    upstream.deliver(result(2, m.SEARCH_RESULT_DONE))
    assert counted.metrics.operations == {("search", "success"): 1}
    histogram = counted.metrics.durations["search"]
    assert histogram.total == pytest.approx(0.3)
    assert dict(histogram.buckets())["0.25"] == 0
    assert dict(histogram.buckets())["0.5"] == 1


def test_session_counts_the_upstream_result_name() -> None:
    """An upstream error result is counted under its own name, not as success."""
    counted = Counted(ListenerTLS.NONE)
    counted.send(request(2, m.BIND_REQUEST))
    upstream = counted.source.succeed()
    upstream.deliver(result(2, m.BIND_RESPONSE, 49))
    assert counted.metrics.operations == {("bind", "invalidCredentials"): 1}


def test_session_counts_busy_when_the_pool_is_exhausted() -> None:
    """A request answered busy because the pool had no free connection counts as busy."""
    counted = Counted(ListenerTLS.NONE)
    counted.send(search_request(2))
    counted.source.fail(PoolBusy("no connection within 5 s"))
    (reply,) = counted.client.frames()
    assert m.result_code(reply.data) == m.BUSY
    assert counted.metrics.operations == {("search", "busy"): 1}


def test_session_counts_starttls_unavailable_on_a_plain_listener() -> None:
    """StartTLS on a listener with tls = none counts starttls outcome unavailable."""
    counted = Counted(ListenerTLS.NONE)
    counted.send(starttls_request(1))
    (reply,) = counted.client.frames()
    assert m.result_code(reply.data) == m.UNAVAILABLE
    assert counted.metrics.starttls == {("test", "unavailable"): 1}
    assert counted.metrics.handshake_failures == {}


def test_session_counts_starttls_success_and_refused() -> None:
    """A StartTLS whose handshake completes counts success; a second one is refused."""
    counted = Counted(ListenerTLS.STARTTLS_OPTIONAL)
    counted.send(starttls_request(1))
    counted.session.tls_established("TLSv1.3")
    counted.send(starttls_request(2))
    assert counted.metrics.starttls == {("test", "success"): 1, ("test", "refused"): 1}


def test_session_counts_an_ldaps_handshake_timeout() -> None:
    """An ldaps client that never completes its handshake counts a handshake failure
    with reason timeout, at the timeout and not before, and no StartTLS outcome."""
    counted = Counted(ListenerTLS.LDAPS)
    assert counted.session.state is SessionState.HANDSHAKE
    counted.clock.advance(HANDSHAKE_TIMEOUT - 0.1)
    assert counted.metrics.handshake_failures == {}
    counted.clock.advance(0.1)
    assert counted.metrics.handshake_failures == {("test", "timeout"): 1}
    assert counted.metrics.starttls == {}
    assert counted.client.aborted


def test_session_counts_a_starttls_handshake_timeout_as_starttls_failure() -> None:
    """A StartTLS whose handshake times out counts both a handshake failure (timeout)
    and the StartTLS outcome failure."""
    counted = Counted(ListenerTLS.STARTTLS_OPTIONAL)
    counted.send(starttls_request(1))
    counted.clock.advance(HANDSHAKE_TIMEOUT)
    assert counted.metrics.handshake_failures == {("test", "timeout"): 1}
    assert counted.metrics.starttls == {("test", "failure"): 1}


def test_session_counts_a_plaintext_client_on_ldaps_as_not_tls() -> None:
    """A handshake that fails because the client spoke plain LDAP to the ldaps listener
    (OpenSSL's "wrong version number") is counted with reason not_tls."""
    counted = Counted(ListenerTLS.LDAPS)
    error = SSL.Error([("SSL routines", "", "wrong version number")])
    counted.session.client_lost(Failure(error))
    assert counted.metrics.handshake_failures == {("test", "not_tls"): 1}


# -- what the client side counts -------------------------------------------------------------


def test_client_factory_counts_connections_and_bytes() -> None:
    """Each accepted connection counts for its listener; bytes from and to the client are
    counted in and out."""
    metrics = Metrics()
    source = FakeSource()
    factory = ClientFactory(
        ListenerConfig("plain", "tcp:389", ListenerTLS.NONE),
        LimitsConfig(1 << 20, 900.0, HANDSHAKE_TIMEOUT, 10.0),
        Clock(),
        source,
        None,
        metrics=metrics,
    )
    protocol = factory.buildProtocol(IPv4Address("TCP", "192.0.2.5", 40000))
    transport = StringTransport()
    protocol.makeConnection(transport)
    factory.buildProtocol(IPv4Address("TCP", "192.0.2.6", 40001))
    search = search_request(2)
    protocol.dataReceived(search)
    upstream = source.succeed()
    answer = result(2, m.SEARCH_RESULT_DONE)
    upstream.deliver(answer)
    assert transport.value() == answer
    assert metrics.client_connections_total == {"plain": 2}
    assert metrics.bytes == {"in": len(search), "out": len(answer)}
    assert metrics.operations == {("search", "success"): 1}
