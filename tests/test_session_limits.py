"""The per-session limits, driven through fakes and a Clock: limits.max_pending_ops,
limits.first_request_timeout and limits.operation_timeout."""

from __future__ import annotations

from typing import Any

import pytest
from support.fakes import (
    abandon_request,
    make_session,
    request,
    result,
    search_entry,
    search_request,
)
from twisted.logger import LogLevel, globalLogPublisher

from ldapproxy import messages as m
from ldapproxy.ber import BOOLEAN, OCTET_STRING, SEQUENCE, Frame, read_tlv, tlv
from ldapproxy.config import ListenerTLS
from ldapproxy.metrics import Metrics
from ldapproxy.pool import Disposition
from ldapproxy.session import SessionState

OPERATION_TIMEOUT = 120.0


def control(oid: bytes, value: bytes | None = None) -> bytes:
    """A Controls element [0] holding one critical control."""
    body = tlv(OCTET_STRING, oid) + tlv(BOOLEAN, b"\xff")
    if value is not None:
        body += tlv(OCTET_STRING, value)
    return tlv(0xA0, tlv(SEQUENCE, body))


#: Persistent search (changeTypes all, changesOnly, returnECs).
PERSISTENT_SEARCH = control(
    b"2.16.840.1.113730.3.4.3", tlv(SEQUENCE, b"\x02\x01\x0f\x01\x01\xff\x01\x01\xff")
)
#: RFC 4533 sync request, refreshAndPersist.
SYNC_REQUEST = control(b"1.3.6.1.4.1.4203.1.9.1.1", tlv(SEQUENCE, b"\x0a\x01\x03"))


def answers(frames: list[Frame]) -> list[tuple[int, int, int]]:
    return [(f.message_id, f.op, m.result_code(f.data)) for f in frames]


def diagnostic(frame: Frame) -> str:
    """The diagnosticMessage of the LDAPResult in a response."""
    data = frame.data
    _, start, end = read_tlv(data, 0, len(data))  # LDAPMessage
    _, _, after_id = read_tlv(data, start, end)  # messageID
    _, start, end = read_tlv(data, after_id, end)  # the response
    _, _, after_code = read_tlv(data, start, end)  # resultCode
    _, _, after_dn = read_tlv(data, after_code, end)  # matchedDN
    _, start, stop = read_tlv(data, after_dn, end)  # diagnosticMessage
    return data[start:stop].decode()


@pytest.fixture
def logged() -> Any:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def lines(events: list[dict[str, Any]], namespace: str = "ldapproxy.session") -> list[str]:
    from twisted.logger import formatEvent

    return [
        formatEvent(e)
        for e in events
        if e.get("log_namespace") == namespace and e["log_level"] >= LogLevel.info
    ]


# -- limits.max_pending_ops -------------------------------------------------------------------


def test_requests_past_max_pending_ops_are_answered_busy(logged: Any) -> None:
    metrics = Metrics()
    h = make_session(max_pending_ops=2, metrics=metrics)
    upstream = h.connect_upstream()
    h.send(search_request(2), search_request(3), search_request(4), request(5, m.DEL_REQUEST))
    assert [f.message_id for f in upstream.frames()] == [2, 3]
    busy = h.client.frames()
    assert answers(busy) == [(4, m.SEARCH_RESULT_DONE, m.BUSY), (5, m.DEL_RESPONSE, m.BUSY)]
    assert diagnostic(busy[0]) == "too many operations outstanding (limits.max_pending_ops = 2)"
    assert metrics.limits_exceeded["max_pending_ops"] == 2
    assert metrics.operations["search", "busy"] == 1
    # One log line per session, naming the setting and its value.
    (line,) = [text for text in lines(logged) if "max_pending_ops" in text]
    assert "limits.max_pending_ops = 2" in line
    assert "search (message ID 4) answered busy" in line
    # The session goes on: once an answer arrives there is room again.
    upstream.deliver(result(2, m.SEARCH_RESULT_DONE))
    h.send(search_request(6))
    assert [f.message_id for f in upstream.frames()] == [2, 3, 6]
    assert h.session.state is SessionState.PLAINTEXT


def test_abandon_and_unbind_pass_at_the_limit() -> None:
    h = make_session(max_pending_ops=1)
    upstream = h.connect_upstream()
    h.send(search_request(2), abandon_request(3, 2))
    assert [(f.message_id, f.op) for f in upstream.frames()] == [
        (2, m.SEARCH_REQUEST),
        (3, m.ABANDON_REQUEST),
    ]
    h.send(m.unbind_request(4))
    assert h.client.calls() == ["close"]


def test_abandoned_operations_do_not_count() -> None:
    """An abandoned search may never be answered: it must not hold a slot forever."""
    h = make_session(max_pending_ops=1)
    upstream = h.connect_upstream()
    h.send(search_request(2), abandon_request(3, 2), search_request(4))
    assert [f.message_id for f in upstream.frames()] == [2, 3, 4]
    assert h.client.frames() == []


def test_the_limit_is_per_session() -> None:
    one = make_session(max_pending_ops=1)
    other = make_session(max_pending_ops=1)
    first = one.connect_upstream()
    second = other.connect_upstream()
    one.send(search_request(2), search_request(3))
    other.send(search_request(2))
    assert answers(one.client.frames()) == [(3, m.SEARCH_RESULT_DONE, m.BUSY)]
    assert [f.message_id for f in first.frames()] == [2]
    assert [f.message_id for f in second.frames()] == [2]
    assert other.client.frames() == []


# -- limits.first_request_timeout ------------------------------------------------------------


def test_a_silent_connection_is_closed_after_first_request_timeout(logged: Any) -> None:
    metrics = Metrics()
    h = make_session(first_request_timeout=5.0, metrics=metrics)
    h.clock.advance(4.999)
    assert h.client.calls() == []
    h.clock.advance(0.001)
    (notice,) = h.client.frames()
    assert (notice.message_id, m.result_code(notice.data)) == (0, m.UNAVAILABLE)
    assert m.extended_response_name(notice.data) == m.NOTICE_OF_DISCONNECTION_OID
    assert h.client.calls() == ["write", "close"]
    assert metrics.limits_exceeded["first_request_timeout"] == 1
    assert any("limits.first_request_timeout = 5 s" in text for text in lines(logged))


def test_a_request_trickled_byte_by_byte_is_cut_off() -> None:
    """Slowloris: bytes keep coming, but no whole request within the limit."""
    h = make_session(first_request_timeout=5.0)
    pdu = search_request(1)
    for index in range(len(pdu) - 1):
        h.send(pdu[index : index + 1])
        h.clock.advance(0.1)
    assert h.client.calls() == ["write", "close"]
    assert h.source.requests == []


def test_a_whole_first_request_stops_the_clock() -> None:
    h = make_session(first_request_timeout=5.0)
    h.clock.advance(4)
    h.send(search_request(1))
    h.source.succeed().deliver(result(1, m.SEARCH_RESULT_DONE))
    h.clock.advance(60)
    assert h.client.calls() == ["pause", "link", "resume", "write"]
    assert h.session.state is SessionState.PLAINTEXT


def test_an_ldaps_handshake_counts_against_the_first_request_timeout() -> None:
    """The clock starts at accept: a TLS handshake that never ends is aborted, no notice."""
    h = make_session(ListenerTLS.LDAPS, tls_handshake_timeout=60, first_request_timeout=5)
    h.clock.advance(5)
    assert h.client.calls() == ["start_tls", "abort"]


# -- limits.operation_timeout ------------------------------------------------------------------


def test_a_silent_upstream_times_out_every_outstanding_operation(logged: Any) -> None:
    metrics = Metrics()
    h = make_session(metrics=metrics)
    upstream = h.connect_upstream()
    h.send(search_request(2))
    h.clock.advance(30)
    h.send(request(3, m.MODIFY_REQUEST), abandon_request(4, 2))
    h.send(search_request(5))
    # Search 2 was abandoned (it may never be answered): the clock runs from 30 s, when
    # the operations still waiting were sent.
    h.clock.advance(OPERATION_TIMEOUT - 0.001)
    assert h.client.calls() == []
    h.clock.advance(0.001)
    *replies, notice = h.client.frames()
    # The abandoned search gets nothing; the others get unavailable, then the notice.
    assert answers(replies) == [
        (3, m.MODIFY_RESPONSE, m.UNAVAILABLE),
        (5, m.SEARCH_RESULT_DONE, m.UNAVAILABLE),
    ]
    expected = "the directory did not answer within limits.operation_timeout = 120 s"
    assert diagnostic(replies[0]) == expected
    assert (notice.message_id, m.result_code(notice.data)) == (0, m.UNAVAILABLE)
    assert h.client.calls()[-1] == "close"
    # The hung connection is closed, never handed to another session.
    assert h.source.released == [(upstream, Disposition.CLOSE)]
    assert metrics.limits_exceeded["operation_timeout"] == 1
    assert metrics.operations["modify", "unavailable"] == 1
    (line,) = [text for text in lines(logged) if "operation_timeout" in text]
    assert "did not answer modify (message ID 3)" in line
    assert "2 operation(s) answered unavailable" in line


@pytest.mark.parametrize("first_request_timeout", [10.0, 0.5])
def test_a_short_operation_timeout_fires_on_time(first_request_timeout: float) -> None:
    """Shorter than the other timeouts (a test setting, or an impatient operator): the
    session's one timer still checks in time, for the first request and later ones."""
    h = make_session(first_request_timeout=first_request_timeout, operation_timeout=1.0)
    h.connect_upstream()
    h.clock.advance(0.25)
    h.send(search_request(2))
    h.clock.advance(0.999)
    assert h.session.state is SessionState.PLAINTEXT
    h.clock.advance(0.001)
    assert h.session.state is SessionState.CLOSING
    assert answers(h.client.frames()[:1]) == [(2, m.SEARCH_RESULT_DONE, m.UNAVAILABLE)]


def test_a_search_that_keeps_returning_entries_is_not_cut_short() -> None:
    h = make_session()
    upstream = h.connect_upstream()
    h.send(search_request(2))
    for _ in range(10):
        h.clock.advance(OPERATION_TIMEOUT - 1)
        upstream.deliver(search_entry(2))
    assert h.session.state is SessionState.PLAINTEXT
    h.clock.advance(OPERATION_TIMEOUT - 0.001)
    assert h.session.state is SessionState.PLAINTEXT
    h.clock.advance(0.001)
    assert h.session.state is SessionState.CLOSING


def test_answered_operations_do_not_time_out() -> None:
    """Once answered, nothing is timed but idleness: one timer, and the session ends at
    its idle deadline, not before."""
    h = make_session(idle_timeout=10_000)
    upstream = h.connect_upstream()
    h.send(search_request(2))
    upstream.deliver(result(2, m.SEARCH_RESULT_DONE))
    h.clock.advance(OPERATION_TIMEOUT * 5)
    assert h.session.state is SessionState.PLAINTEXT
    assert len(h.clock.getDelayedCalls()) == 1
    h.clock.pump([OPERATION_TIMEOUT] * int(10_000 // OPERATION_TIMEOUT - 5))
    h.clock.advance(10_000 - h.clock.seconds() - 0.001)
    assert h.session.state is SessionState.PLAINTEXT
    h.clock.advance(0.001)
    assert h.session.state is SessionState.CLOSING
    assert h.clock.getDelayedCalls() == []


@pytest.mark.parametrize(
    "controls",
    [pytest.param(PERSISTENT_SEARCH, id="psearch"), pytest.param(SYNC_REQUEST, id="sync")],
)
def test_persistent_search_and_sync_are_exempt(controls: bytes) -> None:
    h = make_session(idle_timeout=100_000)
    upstream = h.connect_upstream()
    h.send(search_request(2, controls=controls))
    h.clock.advance(OPERATION_TIMEOUT * 20)
    assert h.session.state is SessionState.PLAINTEXT
    # An ordinary operation next to it is still timed.
    h.send(search_request(3))
    h.clock.advance(OPERATION_TIMEOUT)
    assert h.session.state is SessionState.CLOSING
    assert answers(h.client.frames()[:-1]) == [
        (2, m.SEARCH_RESULT_DONE, m.UNAVAILABLE),
        (3, m.SEARCH_RESULT_DONE, m.UNAVAILABLE),
    ]
    assert upstream.frames()[0].message_id == 2


def test_a_client_that_does_not_read_is_not_the_upstream_s_silence() -> None:
    """While the client's full send buffer pauses the upstream reads, nothing times out."""
    h = make_session(idle_timeout=100_000)
    h.connect_upstream()
    h.send(search_request(2))
    h.client.paused_upstream = True
    h.clock.advance(OPERATION_TIMEOUT * 5)
    assert h.session.state is SessionState.PLAINTEXT
    h.client.paused_upstream = False
    h.clock.advance(OPERATION_TIMEOUT)
    assert h.session.state is SessionState.CLOSING


def test_requests_waiting_for_an_upstream_are_not_timed_by_it() -> None:
    """The pool's acquire_timeout governs the wait for a connection."""
    h = make_session(idle_timeout=100_000)
    h.send(search_request(1))
    assert h.source.acquiring
    h.clock.advance(OPERATION_TIMEOUT * 3)
    assert h.session.state is SessionState.PLAINTEXT
    upstream = h.source.succeed()
    assert [f.message_id for f in upstream.frames()] == [1]


def test_zero_turns_the_operation_timeout_off() -> None:
    h = make_session(idle_timeout=100_000, operation_timeout=0)
    h.connect_upstream()
    h.send(search_request(2))
    h.clock.advance(OPERATION_TIMEOUT * 100)
    assert h.session.state is SessionState.PLAINTEXT
    (timer,) = h.clock.getDelayedCalls()
    assert timer.getTime() > OPERATION_TIMEOUT * 100, "only the idle period's check is left"
