"""Unit tests for ldapproxy.session: the per-client policy, driven through fakes and a Clock."""

from __future__ import annotations

import pytest
from support.fakes import (
    PAGED_RESULTS_CONTROL,
    FakeUpstream,
    Harness,
    abandon_request,
    connection_done,
    make_session,
    request,
    result,
    search_entry,
    search_request,
    starttls_request,
)

from ldapproxy import messages as m
from ldapproxy.ber import Frame, encode_integer, encode_message, tlv
from ldapproxy.config import ListenerTLS
from ldapproxy.pool import Disposition, PoolBusy
from ldapproxy.session import SessionState

IDLE = 900.0
HANDSHAKE = 10.0

#: Every request type that has a response, other than StartTLS.
ANSWERABLE = [
    pytest.param(m.BIND_REQUEST, id="bind"),
    pytest.param(m.SEARCH_REQUEST, id="search"),
    pytest.param(m.MODIFY_REQUEST, id="modify"),
    pytest.param(m.ADD_REQUEST, id="add"),
    pytest.param(m.DEL_REQUEST, id="delete"),
    pytest.param(m.MODDN_REQUEST, id="modrdn"),
    pytest.param(m.COMPARE_REQUEST, id="compare"),
    pytest.param(m.EXTENDED_REQUEST, id="extended-whoami"),
]


def assert_notice(frame: Frame, code: int) -> None:
    """``frame`` is a Notice of Disconnection with result ``code``."""
    assert (frame.message_id, frame.op) == (0, m.EXTENDED_RESPONSE)
    assert m.extended_response_name(frame.data) == m.NOTICE_OF_DISCONNECTION_OID
    assert m.result_code(frame.data) == code


def assert_response(frame: Frame, message_id: int, op: int, code: int) -> None:
    """``frame`` answers ``message_id`` with a response of type ``op`` and ``code``."""
    assert (frame.message_id, frame.op) == (message_id, op)
    assert m.result_code(frame.data) == code


def start_tls(h: Harness, message_id: int = 1) -> None:
    """Run a successful StartTLS and handshake, then forget the client's events."""
    h.send(starttls_request(message_id))
    assert h.session.state is SessionState.HANDSHAKE
    h.session.tls_established("TLSv1.3")
    assert h.session.state is SessionState.SECURE
    h.client.events.clear()


# -- forwarding ----------------------------------------------------------------------------


def test_request_is_forwarded_byte_for_byte_once_an_upstream_is_acquired() -> None:
    """A search with controls reaches the upstream unchanged, after one acquire()."""
    h = make_session()
    pdu = search_request(3, controls=PAGED_RESULTS_CONTROL)
    h.send(pdu)
    assert len(h.source.requests) == 1
    assert h.client.paused
    assert h.session.outstanding == 1
    upstream = h.source.succeed()
    assert upstream.sent == [pdu]
    assert upstream.sink is h.session
    assert not h.client.paused
    assert h.client.calls() == ["pause", "link", "resume"]
    assert h.client.linked == [upstream]
    assert len(h.source.requests) == 1


def test_requests_queued_during_acquire_are_forwarded_in_order() -> None:
    """PDUs arriving while the upstream is being acquired all go out, in order, after it."""
    h = make_session()
    pdus = [search_request(1), request(2, m.MODIFY_REQUEST), request(3, m.COMPARE_REQUEST)]
    pdus.append(abandon_request(4, 1))
    h.send(pdus[0])
    h.send(pdus[1], pdus[2])
    h.send(pdus[3])
    assert len(h.source.requests) == 1
    upstream = h.source.succeed()
    assert upstream.received == b"".join(pdus)


def test_later_requests_use_the_held_upstream() -> None:
    """Once an upstream is held, requests are sent straight to it without acquiring again."""
    h = make_session()
    upstream = h.connect_upstream()
    requests_before = len(h.source.requests)
    h.send(request(5, m.BIND_REQUEST), search_request(6))
    assert upstream.received == request(5, m.BIND_REQUEST) + search_request(6)
    assert len(h.source.requests) == requests_before
    assert h.client.calls() == []


def test_already_available_upstream_is_used_immediately() -> None:
    """An acquire() that has already fired forwards at once, without pausing the client."""
    h = make_session()
    h.source.ready = FakeUpstream()
    h.send(search_request(3))
    assert h.source.ready.sent == [search_request(3)]
    assert h.client.calls() == ["link"]


# -- responses -----------------------------------------------------------------------------


def test_responses_for_an_outstanding_operation_reach_the_client() -> None:
    """Entries, references and the final response go to the client; the final one ends it."""
    h = make_session()
    h.send(search_request(3))
    upstream = h.source.succeed()
    reference = encode_message(3, tlv(m.SEARCH_RESULT_REFERENCE, tlv(0x04, b"ldap://x/")))
    upstream.deliver(search_entry(3), reference, search_entry(3, b"cn=b"))
    assert h.session.outstanding == 1
    upstream.deliver(result(3, m.SEARCH_RESULT_DONE))
    assert h.session.outstanding == 0
    assert h.client.written == (
        search_entry(3) + reference + search_entry(3, b"cn=b") + result(3, m.SEARCH_RESULT_DONE)
    )


def test_intermediate_response_does_not_end_an_extended_operation() -> None:
    """An IntermediateResponse is passed on and the operation stays outstanding."""
    h = make_session()
    upstream = h.connect_upstream()
    h.send(request(4, m.EXTENDED_REQUEST))
    intermediate = encode_message(4, tlv(m.INTERMEDIATE_RESPONSE, b""))
    upstream.deliver(intermediate)
    assert h.session.outstanding == 1
    upstream.deliver(m.extended_response(4, m.SUCCESS, ""))
    assert h.session.outstanding == 0
    assert h.client.written == intermediate + m.extended_response(4, m.SUCCESS, "")


def test_response_for_an_unknown_message_id_is_dropped() -> None:
    """Responses for message IDs that are not outstanding never reach the client."""
    h = make_session()
    upstream = h.connect_upstream()
    h.send(search_request(3))
    upstream.deliver(result(99, m.BIND_RESPONSE), search_entry(4))
    assert h.client.written == b""
    upstream.deliver(result(3, m.SEARCH_RESULT_DONE))
    # A late duplicate of the final response is not outstanding any more either.
    upstream.deliver(result(3, m.SEARCH_RESULT_DONE))
    assert h.client.written == result(3, m.SEARCH_RESULT_DONE)


def test_unsolicited_notification_passes_through() -> None:
    """A message-ID-0 notification from the upstream is given to the client unchanged."""
    h = make_session()
    upstream = h.connect_upstream()
    other = m.extended_response(0, m.SUCCESS, "", b"1.2.3.4")
    upstream.deliver(other)
    assert h.client.written == other
    assert not h.client.closed


def test_completed_message_id_may_be_used_again() -> None:
    """Once its final response is in, a message ID is free for a new request."""
    h = make_session()
    upstream = h.connect_upstream()
    h.send(search_request(3))
    upstream.deliver(result(3, m.SEARCH_RESULT_DONE))
    h.send(request(3, m.DEL_REQUEST))
    assert upstream.received == search_request(3) + request(3, m.DEL_REQUEST)
    assert not h.client.closed


# -- starttls-required ---------------------------------------------------------------------


@pytest.mark.parametrize("op", ANSWERABLE)
def test_starttls_required_refuses_each_request_before_tls(op: int) -> None:
    """Before TLS each request gets its own response type with confidentialityRequired."""
    h = make_session(ListenerTLS.STARTTLS_REQUIRED)
    h.send(request(8, op, controls=PAGED_RESULTS_CONTROL))
    (frame,) = h.client.frames()
    assert_response(frame, 8, m.RESPONSE_FOR_REQUEST[op], m.CONFIDENTIALITY_REQUIRED)
    assert h.source.requests == []
    assert h.session.outstanding == 0
    assert not h.client.closed
    assert h.session.state is SessionState.PLAINTEXT


def test_starttls_required_answers_several_refused_requests_in_one_chunk() -> None:
    """Each refused request in a chunk gets its own response, in order."""
    h = make_session(ListenerTLS.STARTTLS_REQUIRED)
    h.send(request(1, m.BIND_REQUEST), search_request(2), request(3, m.DEL_REQUEST))
    assert [(f.message_id, f.op) for f in h.client.frames()] == [
        (1, m.BIND_RESPONSE),
        (2, m.SEARCH_RESULT_DONE),
        (3, m.DEL_RESPONSE),
    ]
    assert h.source.requests == []


def test_starttls_required_lets_a_root_dse_read_through() -> None:
    """A base-scope read of the root DSE is forwarded before TLS."""
    h = make_session(ListenerTLS.STARTTLS_REQUIRED)
    pdu = m.root_dse_search(2, (b"supportedExtension",))
    h.send(pdu)
    upstream = h.source.succeed()
    assert upstream.sent == [pdu]
    assert h.client.written == b""


def test_starttls_required_lets_abandon_through() -> None:
    """An Abandon of an outstanding root DSE read is forwarded before TLS."""
    h = make_session(ListenerTLS.STARTTLS_REQUIRED)
    h.send(m.root_dse_search(2))
    upstream = h.source.succeed()
    h.send(abandon_request(3, 2))
    assert upstream.received == m.root_dse_search(2) + abandon_request(3, 2)
    assert h.client.written == b""


def test_starttls_required_answers_an_anonymous_bind_itself() -> None:
    """An anonymous simple bind before TLS succeeds locally and is never forwarded."""
    h = make_session(ListenerTLS.STARTTLS_REQUIRED)
    anonymous = encode_message(
        2, tlv(m.BIND_REQUEST, encode_integer(3) + tlv(0x04, b"") + tlv(0x80, b""))
    )
    h.send(anonymous)
    (frame,) = h.client.frames()
    assert_response(frame, 2, m.BIND_RESPONSE, m.SUCCESS)
    assert h.source.requests == []
    assert h.session.outstanding == 0


@pytest.mark.parametrize(
    ("name", "password"),
    [(b"cn=admin,dc=example,dc=com", b"secret"), (b"cn=admin,dc=example,dc=com", b""), (b"", b"x")],
    ids=["simple", "unauthenticated", "empty-name-with-password"],
)
def test_starttls_required_refuses_a_non_anonymous_bind(name: bytes, password: bytes) -> None:
    """A bind with a name or a password before TLS is refused with confidentialityRequired."""
    h = make_session(ListenerTLS.STARTTLS_REQUIRED)
    bind = encode_message(
        2, tlv(m.BIND_REQUEST, encode_integer(3) + tlv(0x04, name) + tlv(0x80, password))
    )
    h.send(bind)
    (frame,) = h.client.frames()
    assert_response(frame, 2, m.BIND_RESPONSE, m.CONFIDENTIALITY_REQUIRED)
    assert h.source.requests == []


def test_starttls_required_lets_unbind_end_the_session() -> None:
    """An Unbind before TLS closes the session like anywhere else, without a response."""
    h = make_session(ListenerTLS.STARTTLS_REQUIRED)
    h.send(m.unbind_request(2))
    assert h.client.calls() == ["close"]
    assert h.source.requests == []


@pytest.mark.parametrize("tls", list(ListenerTLS), ids=lambda t: t.value)
@pytest.mark.parametrize("op", [0x7F, 0x5E, 0x71, 0x45], ids=hex)
def test_an_unknown_operation_is_a_protocol_error(tls: ListenerTLS, op: int) -> None:
    """A protocolOp tag that is no LDAP request (RFC 4511 §4.1.1) gets a protocolError
    Notice of Disconnection and close, on every listener, and never reaches the upstream."""
    h = make_session(tls)
    if tls is ListenerTLS.LDAPS:
        h.session.tls_established("TLSv1.3")
        h.client.events.clear()
    h.send(request(4, op))
    (frame,) = h.client.frames()
    assert_notice(frame, m.PROTOCOL_ERROR)
    assert h.client.calls() == ["write", "close"]
    assert h.source.requests == []


def test_an_unknown_operation_leaves_the_upstream_connection_reusable() -> None:
    """It never reached the upstream, so the connection goes back to the pool as it was."""
    h = make_session()
    upstream = h.connect_upstream()
    h.send(search_request(2))
    upstream.deliver(result(2, m.SEARCH_RESULT_DONE))
    h.send(request(3, 0x71))
    assert [f.message_id for f in upstream.frames()] == [2]
    assert h.source.released == [(upstream, Disposition.REUSE)]


def test_the_rest_of_a_chunk_after_a_protocol_error_is_ignored() -> None:
    """After the unknown-op disconnect nothing else in that chunk is answered or forwarded."""
    h = make_session(ListenerTLS.STARTTLS_REQUIRED)
    h.send(request(4, 0x7F), m.root_dse_search(5), request(6, m.BIND_REQUEST))
    assert h.client.calls() == ["write", "close"]
    assert_notice(h.client.frames()[0], m.PROTOCOL_ERROR)
    assert h.source.requests == []


def test_starttls_required_refuses_requests_during_the_handshake() -> None:
    """Between the StartTLS response and the end of the handshake requests are refused."""
    h = make_session(ListenerTLS.STARTTLS_REQUIRED)
    h.send(starttls_request(1))
    h.client.events.clear()
    h.send(request(2, m.BIND_REQUEST))
    (frame,) = h.client.frames()
    assert_response(frame, 2, m.BIND_RESPONSE, m.CONFIDENTIALITY_REQUIRED)
    assert h.source.requests == []


@pytest.mark.parametrize("op", ANSWERABLE)
def test_starttls_required_forwards_every_request_after_tls(op: int) -> None:
    """Once TLS is established every request is forwarded."""
    h = make_session(ListenerTLS.STARTTLS_REQUIRED)
    start_tls(h)
    pdu = request(8, op)
    h.send(pdu)
    assert h.source.succeed().sent == [pdu]
    assert h.client.written == b""


@pytest.mark.parametrize(
    "tls", [ListenerTLS.STARTTLS_OPTIONAL, ListenerTLS.NONE], ids=["optional", "none"]
)
def test_other_listeners_forward_requests_in_plaintext(tls: ListenerTLS) -> None:
    """Listeners that do not require TLS forward a bind without it."""
    h = make_session(tls)
    h.send(request(2, m.BIND_REQUEST))
    assert h.source.succeed().sent == [request(2, m.BIND_REQUEST)]


# -- StartTLS ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tls",
    [ListenerTLS.STARTTLS_OPTIONAL, ListenerTLS.STARTTLS_REQUIRED],
    ids=["optional", "required"],
)
def test_starttls_is_answered_then_the_handshake_starts(tls: ListenerTLS) -> None:
    """StartTLS gets success with the StartTLS responseName, then start_tls() is called."""
    h = make_session(tls)
    h.send(starttls_request(1))
    assert h.client.calls() == ["write", "start_tls"]
    (frame,) = h.client.frames()
    assert_response(frame, 1, m.EXTENDED_RESPONSE, m.SUCCESS)
    assert m.extended_response_name(frame.data) == m.STARTTLS_OID
    assert h.session.state is SessionState.HANDSHAKE
    assert h.source.requests == []
    h.session.tls_established("TLSv1.2")
    assert h.session.state is SessionState.SECURE
    assert h.session.tls_version == "TLSv1.2"


def test_starttls_on_a_plaintext_listener_is_unavailable() -> None:
    """A `none` listener answers StartTLS with unavailable and stays usable in plaintext."""
    h = make_session(ListenerTLS.NONE)
    h.send(starttls_request(1))
    (frame,) = h.client.frames()
    assert_response(frame, 1, m.EXTENDED_RESPONSE, m.UNAVAILABLE)
    assert h.client.start_tls_calls == 0
    assert h.session.state is SessionState.PLAINTEXT
    h.send(search_request(2))
    assert h.source.succeed().sent == [search_request(2)]


def test_starttls_when_already_secure_is_an_operations_error() -> None:
    """A second StartTLS after a completed one gets operationsError and no new handshake."""
    h = make_session(ListenerTLS.STARTTLS_OPTIONAL)
    start_tls(h)
    h.send(starttls_request(2))
    (frame,) = h.client.frames()
    assert_response(frame, 2, m.EXTENDED_RESPONSE, m.OPERATIONS_ERROR)
    assert h.client.start_tls_calls == 0
    assert h.session.state is SessionState.SECURE


def test_starttls_on_an_ldaps_listener_is_an_operations_error() -> None:
    """StartTLS inside an ldaps connection gets operationsError."""
    h = make_session(ListenerTLS.LDAPS)
    assert h.client.start_tls_calls == 1
    h.session.tls_established("TLSv1.3")
    h.send(starttls_request(1))
    (frame,) = h.client.frames()
    assert_response(frame, 1, m.EXTENDED_RESPONSE, m.OPERATIONS_ERROR)
    assert h.client.start_tls_calls == 1


def test_starttls_with_an_operation_outstanding_is_an_operations_error() -> None:
    """StartTLS while a forwarded operation awaits its response gets operationsError."""
    h = make_session()
    upstream = h.connect_upstream()
    h.send(search_request(2))
    h.send(starttls_request(3))
    (frame,) = h.client.frames()
    assert_response(frame, 3, m.EXTENDED_RESPONSE, m.OPERATIONS_ERROR)
    assert h.client.start_tls_calls == 0
    assert h.session.state is SessionState.PLAINTEXT
    assert upstream.received == search_request(2)


def test_starttls_pipelined_behind_a_request_is_an_operations_error() -> None:
    """A request earlier in the same chunk is forwarded and StartTLS refused."""
    h = make_session()
    h.send(search_request(2), starttls_request(3))
    (frame,) = h.client.frames()
    assert_response(frame, 3, m.EXTENDED_RESPONSE, m.OPERATIONS_ERROR)
    assert h.client.start_tls_calls == 0
    assert h.source.succeed().sent == [search_request(2)]


def test_bytes_after_starttls_in_the_same_chunk_abort_the_connection() -> None:
    """A PDU sent behind StartTLS is never executed: abort, no response (CVE-2011-0411)."""
    h = make_session(ListenerTLS.STARTTLS_REQUIRED)
    h.send(starttls_request(1), request(2, m.BIND_REQUEST))
    assert h.client.calls() == ["abort"]
    assert h.source.requests == []
    assert h.session.state is SessionState.CLOSING


def test_partial_pdu_after_starttls_aborts_the_connection() -> None:
    """Even a partial PDU buffered behind StartTLS aborts the connection."""
    h = make_session()
    h.send(starttls_request(1) + search_request(2)[:5])
    assert h.client.calls() == ["abort"]
    h.send(search_request(2)[5:])
    assert h.client.calls() == ["abort"]
    assert h.source.requests == []


def test_single_byte_after_starttls_aborts_the_connection() -> None:
    """One stray byte behind StartTLS is enough to abort."""
    h = make_session()
    h.send(starttls_request(1) + b"\x30")
    assert h.client.calls() == ["abort"]


# -- protocol errors -----------------------------------------------------------------------

VIOLATIONS = [
    pytest.param([], request(0, m.SEARCH_REQUEST), id="message-id-0"),
    pytest.param([], m.unbind_request(0), id="unbind-with-message-id-0"),
    pytest.param([], result(5, m.BIND_RESPONSE), id="bind-response-from-client"),
    pytest.param([], search_entry(5), id="search-entry-from-client"),
    pytest.param([], encode_message(5, tlv(m.INTERMEDIATE_RESPONSE, b"")), id="intermediate"),
    pytest.param([search_request(3)], search_request(3), id="reused-outstanding-id"),
    pytest.param([], search_request(3) + request(3, m.DEL_REQUEST), id="reused-in-one-chunk"),
    pytest.param([], b"\x31\x05\x02\x01\x01\x42\x00", id="framing-wrong-tag"),
    pytest.param([], b"\x30\x80", id="framing-indefinite-length"),
    pytest.param([], b"\x30\x05\x02\x01\xff\x42\x00", id="framing-negative-id"),
    pytest.param([], b"\x30\x82\x04\x00", id="too-large-header-only"),
    pytest.param([], encode_message(5, tlv(0x77, tlv(0x81, b"v"))), id="extended-without-name"),
    pytest.param([], encode_message(5, bytes((m.ABANDON_REQUEST, 0))), id="abandon-empty"),
    pytest.param([], search_request(3) + request(0, m.MODIFY_REQUEST), id="valid-then-invalid"),
]


@pytest.mark.parametrize(("setup", "offending"), VIOLATIONS)
def test_protocol_error_sends_a_notice_and_closes(setup: list[bytes], offending: bytes) -> None:
    """A protocol violation gets a protocolError Notice of Disconnection, then close."""
    h = make_session(max_pdu_bytes=1024)
    upstream = None
    if setup:
        h.send(*setup)
        upstream = h.source.succeed()
        upstream.sent.clear()
        h.client.events.clear()
    acquisitions = len(h.source.requests)
    h.send(offending)
    (frame,) = h.client.frames()
    assert_notice(frame, m.PROTOCOL_ERROR)
    assert h.client.calls() == ["write", "close"]
    assert len(h.source.requests) == acquisitions
    if upstream is not None:
        assert upstream.sent == []
    assert h.session.state is SessionState.CLOSING
    # Nothing more is read from a closing session.
    h.send(search_request(9))
    assert h.client.calls() == ["write", "close"]
    assert len(h.source.requests) == acquisitions


def test_oversized_pdu_is_refused_before_its_body_arrives() -> None:
    """limits.max_pdu_bytes applies to the header: the session closes on it alone."""
    h = make_session(max_pdu_bytes=1024)
    h.send(b"\x30\x84\x7f\xff\xff\xff")
    assert_notice(h.client.frames()[0], m.PROTOCOL_ERROR)
    assert h.client.closed


def test_pdu_of_exactly_max_pdu_bytes_is_forwarded() -> None:
    """A request of exactly limits.max_pdu_bytes is accepted."""
    h = make_session(max_pdu_bytes=1024)
    pdu = next(
        p for p in (search_request(2, base=b"x" * n) for n in range(900, 1100)) if len(p) == 1024
    )
    h.send(pdu)
    assert h.source.succeed().sent == [pdu]
    assert not h.client.closed


def test_reusing_an_abandoned_message_id_is_allowed() -> None:
    """After abandoning an operation its message ID may be used for a new request."""
    h = make_session()
    upstream = h.connect_upstream()
    h.send(search_request(3))
    h.send(abandon_request(4, 3))
    h.send(search_request(3, base=b"ou=other"))
    assert upstream.received == (
        search_request(3) + abandon_request(4, 3) + search_request(3, base=b"ou=other")
    )
    assert not h.client.closed
    assert h.session.outstanding == 1


# -- unbind --------------------------------------------------------------------------------


def test_unbind_closes_and_releases_a_clean_upstream() -> None:
    """Unbind is not forwarded; the client is closed and the upstream released clean."""
    h = make_session()
    upstream = h.connect_upstream()
    h.send(m.unbind_request(5))
    assert upstream.sent == []
    assert h.client.calls() == ["close"]
    assert h.client.unlinked == [upstream]
    assert h.source.released == [(upstream, Disposition.REUSE)]
    h.session.client_lost(connection_done())
    assert h.source.released == [(upstream, Disposition.REUSE)], "released exactly once"
    assert h.session.state is SessionState.CLOSED


def test_unbind_with_an_operation_outstanding_releases_unclean() -> None:
    """An upstream with an operation still in flight is released to be closed."""
    h = make_session()
    upstream = h.connect_upstream()
    h.send(search_request(2), m.unbind_request(3))
    assert upstream.sent == [search_request(2)]
    assert h.client.calls() == ["close"]
    h.session.client_lost(connection_done())
    assert h.source.released == [(upstream, Disposition.CLOSE)]


def test_unbind_without_an_upstream_acquires_nothing() -> None:
    """An Unbind as the first request closes without ever acquiring an upstream."""
    h = make_session()
    h.send(m.unbind_request(1))
    h.session.client_lost(connection_done())
    assert h.source.requests == []
    assert h.source.released == []


def test_upstream_acquired_after_close_is_released_unused() -> None:
    """An upstream that arrives after the client unbound is released at once, clean."""
    h = make_session()
    h.send(search_request(2))
    h.send(m.unbind_request(3))
    upstream = h.source.succeed()
    assert upstream.sent == []
    assert upstream.sink is None
    assert h.source.released == [(upstream, Disposition.REUSE)]


# -- abandon -------------------------------------------------------------------------------


def test_abandon_of_an_outstanding_operation_is_forwarded() -> None:
    """An Abandon naming an outstanding operation goes to the upstream."""
    h = make_session()
    upstream = h.connect_upstream()
    h.send(search_request(2))
    h.send(abandon_request(3, 2))
    assert upstream.received == search_request(2) + abandon_request(3, 2)
    assert h.client.written == b""


def test_abandon_of_an_unknown_operation_is_dropped() -> None:
    """An Abandon naming nothing outstanding is neither forwarded nor answered."""
    h = make_session()
    upstream = h.connect_upstream()
    h.send(abandon_request(3, 2))
    assert upstream.sent == []
    assert h.client.written == b""
    assert not h.client.closed


def test_abandon_of_an_unknown_operation_does_not_acquire() -> None:
    """Without an upstream, an Abandon of nothing does not open one."""
    h = make_session()
    h.send(abandon_request(3, 2))
    assert h.source.requests == []


# -- acquire failure -----------------------------------------------------------------------


def test_no_upstream_fails_each_pending_request_with_unavailable() -> None:
    """Each queued request gets its own response type with unavailable; abandon gets none."""
    h = make_session()
    h.send(search_request(1), request(2, m.MODIFY_REQUEST))
    h.send(abandon_request(3, 1), request(4, m.EXTENDED_REQUEST), request(5, m.BIND_REQUEST))
    h.source.fail()
    frames = h.client.frames()
    assert [(f.message_id, f.op) for f in frames] == [
        (1, m.SEARCH_RESULT_DONE),
        (2, m.MODIFY_RESPONSE),
        (4, m.EXTENDED_RESPONSE),
        (5, m.BIND_RESPONSE),
    ]
    assert {m.result_code(f.data) for f in frames} == {m.UNAVAILABLE}
    assert h.session.outstanding == 0
    assert not h.client.paused
    assert not h.client.closed
    assert h.session.state is SessionState.PLAINTEXT


def test_unexpected_acquire_error_also_answers_unavailable() -> None:
    """Any acquisition failure, not only NoUpstreamAvailable, fails the requests cleanly."""
    h = make_session()
    h.send(request(1, m.ADD_REQUEST))
    h.source.fail(RuntimeError("bug in the pool"))
    (frame,) = h.client.frames()
    assert_response(frame, 1, m.ADD_RESPONSE, m.UNAVAILABLE)
    assert not h.client.paused


def test_request_after_a_failed_acquire_acquires_again() -> None:
    """The session stays open after no upstream was available and tries again later."""
    h = make_session()
    h.send(search_request(1))
    h.source.fail()
    h.client.events.clear()
    h.send(search_request(1))
    assert len(h.source.requests) == 2
    upstream = h.source.succeed()
    assert upstream.sent == [search_request(1)]


def test_message_id_of_an_abandoned_failed_request_is_not_left_marked_abandoned() -> None:
    """After acquire fails, an ID abandoned while pending is an ordinary ID again."""
    h = make_session()
    h.send(search_request(1), abandon_request(2, 1))
    h.source.fail()
    h.client.events.clear()
    h.send(search_request(1))
    upstream = h.source.succeed()
    assert upstream.sent == [search_request(1)]
    # Message 1 is outstanding and was never abandoned this time: reuse is a violation.
    h.send(request(1, m.DEL_REQUEST))
    assert upstream.sent == [search_request(1)]
    assert_notice(h.client.frames()[0], m.PROTOCOL_ERROR)
    assert h.client.closed


# -- upstream lost -------------------------------------------------------------------------


def test_upstream_lost_sends_unavailable_notice_and_closes() -> None:
    """Losing the upstream disconnects the client with an unavailable notice."""
    h = make_session()
    upstream = h.connect_upstream()
    h.send(search_request(2))
    upstream.lose()
    (frame,) = h.client.frames()
    assert_notice(frame, m.UNAVAILABLE)
    assert h.client.calls() == ["write", "close"]
    h.session.client_lost(connection_done())
    # Released exactly once, unclean, so a pool discards it instead of reusing it.
    assert h.source.released == [(upstream, Disposition.CLOSE)]


def test_upstream_notice_is_not_followed_by_a_second_one() -> None:
    """When the upstream's own Notice of Disconnection was forwarded, no second is sent."""
    h = make_session()
    upstream = h.connect_upstream()
    theirs = m.notice_of_disconnection(m.UNAVAILABLE, "server shutting down")
    upstream.deliver(theirs)
    upstream.lose()
    assert h.client.written == theirs
    assert h.client.calls() == ["write", "close"]


def test_proxy_initiated_close_releases_the_upstream_first() -> None:
    """Closing the client unlinks flow control and releases the upstream before the close."""
    h = make_session()
    upstream = h.connect_upstream()
    h.send(m.unbind_request(9))
    names = [e[0] for e in h.client.events]
    assert names[-2:] == ["unlink", "close"]
    assert h.source.released == [(upstream, Disposition.REUSE)]


def test_upstream_lost_after_the_client_closed_writes_nothing() -> None:
    """An upstream that drops while the session is closing adds nothing."""
    h = make_session()
    upstream = h.connect_upstream()
    h.send(m.unbind_request(9))
    upstream.lose()
    assert h.client.calls() == ["close"]


# -- timeouts ------------------------------------------------------------------------------


def test_idle_session_is_disconnected_after_the_idle_timeout() -> None:
    """With no traffic for limits.idle_timeout the client gets a notice and is closed."""
    h = make_session(idle_timeout=IDLE)
    upstream = h.connect_upstream()
    h.send(search_request(2))
    upstream.deliver(result(2, m.SEARCH_RESULT_DONE))
    h.client.events.clear()
    h.clock.advance(IDLE - 0.001)
    assert h.client.calls() == []
    h.clock.advance(0.001)
    (frame,) = h.client.frames()
    assert_notice(frame, m.UNAVAILABLE)
    assert h.client.calls() == ["write", "close"]
    assert h.session.state is SessionState.CLOSING


def test_client_traffic_resets_the_idle_timer() -> None:
    """A request restarts the idle countdown from its arrival."""
    h = make_session(idle_timeout=IDLE)
    upstream = h.connect_upstream()
    h.clock.advance(600)
    h.send(search_request(2))
    upstream.deliver(result(2, m.SEARCH_RESULT_DONE))
    h.client.events.clear()
    h.clock.advance(IDLE - 0.001)
    assert h.client.calls() == []
    h.clock.advance(0.001)
    assert h.client.calls() == ["write", "close"]


def test_outstanding_operation_prevents_the_idle_timeout() -> None:
    """A long-running operation keeps the session open (operation_timeout off here)."""
    h = make_session(idle_timeout=IDLE, operation_timeout=0)
    upstream = h.connect_upstream()
    h.send(search_request(2))
    h.clock.pump([IDLE] * 10)
    assert h.client.calls() == []
    upstream.deliver(result(2, m.SEARCH_RESULT_DONE))
    h.client.events.clear()
    h.clock.advance(IDLE)
    assert h.client.calls() == ["write", "close"]


def test_pending_acquire_prevents_the_idle_timeout() -> None:
    """While an upstream is being acquired the session is not idle."""
    h = make_session(idle_timeout=IDLE)
    h.send(search_request(2))
    h.clock.pump([IDLE] * 3)
    assert not h.client.closed


def test_final_response_counts_as_traffic_for_the_idle_timeout() -> None:
    """A client that just received its result is not idle, however long it waited for it."""
    h = make_session(idle_timeout=IDLE)
    upstream = h.connect_upstream()
    h.send(search_request(2))
    h.clock.advance(IDLE - 1)
    upstream.deliver(result(2, m.SEARCH_RESULT_DONE))
    h.client.events.clear()
    h.clock.advance(1)
    assert h.client.calls() == []


def test_abandoned_operation_does_not_keep_the_session_alive() -> None:
    """An abandoned operation, which may never be answered, does not block the idle timeout."""
    h = make_session(idle_timeout=IDLE)
    upstream = h.connect_upstream()
    h.send(search_request(2))  # a persistent search, say
    h.send(abandon_request(3, 2))  # the upstream sends nothing more for it (RFC 4511 4.11)
    assert upstream.received == search_request(2) + abandon_request(3, 2)
    h.clock.pump([IDLE] * 3)
    assert h.client.calls() == ["write", "close"]


def test_ldaps_handshake_that_does_not_finish_is_aborted() -> None:
    """An ldaps client that does not complete TLS in tls_handshake_timeout is aborted."""
    h = make_session(ListenerTLS.LDAPS, tls_handshake_timeout=HANDSHAKE)
    assert h.client.calls() == ["start_tls"]
    assert h.session.state is SessionState.HANDSHAKE
    h.clock.advance(HANDSHAKE - 0.001)
    assert h.client.calls() == ["start_tls"]
    h.clock.advance(0.001)
    assert h.client.calls() == ["start_tls", "abort"]


def test_ldaps_handshake_that_finishes_in_time_is_kept() -> None:
    """A completed handshake cancels the handshake timer and the session becomes SECURE."""
    h = make_session(
        ListenerTLS.LDAPS, tls_handshake_timeout=HANDSHAKE, first_request_timeout=HANDSHAKE * 4
    )
    h.clock.advance(HANDSHAKE - 1)
    h.session.tls_established("TLSv1.3")
    # The handshake timer is gone; the session's deadline timer (first request) is left.
    times = sorted(c.getTime() for c in h.clock.getDelayedCalls())
    assert times == [HANDSHAKE * 4]
    h.clock.advance(HANDSHAKE * 2)
    assert h.client.calls() == ["start_tls"]
    assert h.session.state is SessionState.SECURE
    assert h.session.tls_version == "TLSv1.3"


def test_starttls_handshake_that_does_not_finish_is_aborted() -> None:
    """After a StartTLS success the handshake must also finish in tls_handshake_timeout."""
    h = make_session(tls_handshake_timeout=HANDSHAKE)
    h.send(starttls_request(1))
    h.clock.advance(HANDSHAKE)
    assert h.client.calls() == ["write", "start_tls", "abort"]


# -- client lost ---------------------------------------------------------------------------


def test_client_lost_cancels_a_pending_acquire() -> None:
    """A client that goes away while an upstream is being acquired cancels the acquire."""
    h = make_session()
    h.send(search_request(2))
    pending = h.source.requests[0]
    h.session.client_lost(connection_done())
    assert h.source.cancelled == [pending]
    assert h.source.released == []
    assert h.client.written == b""
    assert h.session.state is SessionState.CLOSED
    assert h.clock.getDelayedCalls() == []


@pytest.mark.parametrize(
    ("outstanding", "clean"), [(False, Disposition.REUSE), (True, Disposition.CLOSE)]
)
def test_client_lost_releases_the_upstream(outstanding: bool, clean: Disposition) -> None:
    """A vanished client releases its upstream, clean only if nothing was in flight."""
    h = make_session()
    upstream = h.connect_upstream()
    if outstanding:
        h.send(search_request(2))
    h.session.client_lost(connection_done())
    assert h.client.unlinked == [upstream]
    assert h.source.released == [(upstream, clean)]
    assert h.clock.getDelayedCalls() == []
    # Nothing more goes either way once the client is gone.
    h.session.client_data(search_request(3))
    assert upstream.sent == ([search_request(2)] if outstanding else [])
    if outstanding:
        upstream.deliver(result(2, m.SEARCH_RESULT_DONE))
    assert h.client.written == b""


@pytest.mark.parametrize("failure", ["no-upstream", "busy"])
def test_nothing_is_written_after_closing_while_waiting_for_an_upstream(failure: str) -> None:
    """A session that closes (here for a protocol error) while its requests wait for the
    pool writes nothing once the pool fails: the notice is the last PDU (RFC 4511 §4.4.1).
    Found by tests/test_fuzz.py."""
    h = make_session()
    h.send(request(1, m.BIND_REQUEST))
    assert h.source.acquiring
    h.send(b"\x00" * 8)  # the TLS layer may deliver what it decrypted while reads pause
    assert h.client.calls() == ["pause", "write", "close"]
    h.source.fail(None if failure == "no-upstream" else PoolBusy("all connections busy"))
    assert h.client.calls() == ["pause", "write", "close"]
    assert_notice(h.client.frames()[0], m.PROTOCOL_ERROR)
