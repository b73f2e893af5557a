"""What a session says about its upstream connection when it gives it back (Disposition),
the busy/unavailable answers when none can be had, and the control decoders behind them."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.fakes import (
    FakeClient,
    Harness,
    PoolHarness,
    abandon_request,
    connection_done,
    make_pool,
    make_session,
    request,
    result,
    search_entry,
    search_request,
)

from ldapproxy import messages as m
from ldapproxy.ber import (
    BOOLEAN,
    ENUMERATED,
    OCTET_STRING,
    SEQUENCE,
    BerError,
    encode_integer,
    encode_message,
    tlv,
)
from ldapproxy.config import LimitsConfig, ListenerConfig, ListenerTLS, UpstreamURL
from ldapproxy.pool import Disposition, PoolBusy
from ldapproxy.session import Session, SessionState

# -- PDU builders ----------------------------------------------------------------------------

MANAGE_DSA_IT = b"2.16.840.1.113730.3.4.2"
ASSERTION = b"1.3.6.1.1.12"
PROXIED_AUTH = b"2.16.840.1.113730.3.4.18"
SERVER_SIDE_SORT = b"1.2.840.113556.1.4.473"
VLV = b"2.16.840.1.113730.3.4.9"
UNKNOWN_CONTROL = b"1.3.6.1.4.1.99999.1"
PAGED = m.PAGED_RESULTS_OID
TXN_START = b"1.3.6.1.1.21.1"


def control(oid: bytes, critical: bool | None = None, value: bytes | None = None) -> bytes:
    """One Control SEQUENCE: controlType, optional criticality, optional controlValue."""
    body = tlv(OCTET_STRING, oid)
    if critical is not None:
        body += tlv(BOOLEAN, b"\xff" if critical else b"\x00")
    if value is not None:
        body += tlv(OCTET_STRING, value)
    return tlv(SEQUENCE, body)


def controls(*items: bytes) -> bytes:
    """The ``[0] Controls`` element of an LDAPMessage."""
    return tlv(0xA0, b"".join(items))


def paged(cookie: bytes, size: int = 100, critical: bool | None = None) -> bytes:
    """A paged-results control (RFC 2696) with ``cookie``."""
    value = tlv(SEQUENCE, encode_integer(size) + tlv(OCTET_STRING, cookie))
    return control(PAGED, critical, value)


def ldap_result(code: int = m.SUCCESS) -> bytes:
    """The LDAPResult fields: resultCode, matchedDN, diagnosticMessage."""
    return encode_integer(code, ENUMERATED) + tlv(OCTET_STRING, b"") + tlv(OCTET_STRING, b"")


def search_done(message_id: int, ctrls: bytes = b"", code: int = m.SUCCESS) -> bytes:
    """A SearchResultDone, with response controls if given."""
    return encode_message(message_id, tlv(m.SEARCH_RESULT_DONE, ldap_result(code)), ctrls)


def extended(message_id: int, oid: bytes, value: bytes | None = None) -> bytes:
    """An ExtendedRequest."""
    return m.extended_request(message_id, oid, value)


def extended_done(message_id: int, code: int = m.SUCCESS) -> bytes:
    """An ExtendedResponse without a name."""
    return m.extended_response(message_id, code, "")


def paged_search(message_id: int, cookie: bytes = b"") -> bytes:
    """A subtree search asking for pages of 100."""
    return search_request(message_id, controls=controls(paged(cookie, critical=True)))


# -- disposition decision table ---------------------------------------------------------------

#: A scenario is a list of steps after the session holds an idle upstream: ("c", pdu) is
#: a client request, ("u", pdu) an upstream response.  The session then disconnects.
Step = tuple[str, bytes]


def run(steps: Sequence[Step]) -> tuple[Harness, Disposition]:
    """Play ``steps``, disconnect the client, and return the one disposition released."""
    h = make_session()
    upstream = h.connect_upstream()
    for who, pdu in steps:
        if who == "c":
            h.send(pdu)
        else:
            upstream.deliver(pdu)
    assert not h.client.closed, "the scenario itself must not end the session"
    h.session.client_lost(connection_done())
    ((connection, disposition),) = h.source.released
    assert connection is upstream
    return h, disposition


REUSE, RESET, CLOSE = Disposition.REUSE, Disposition.RESET, Disposition.CLOSE

SEARCH = [("c", search_request(1)), ("u", search_entry(1) + result(1, m.SEARCH_RESULT_DONE))]
BIND_OK = [("c", request(1, m.BIND_REQUEST)), ("u", result(1, m.BIND_RESPONSE))]

SCENARIOS = [
    # reads and writes without a bind leave the connection anonymous
    pytest.param(SEARCH, REUSE, id="search-only"),
    pytest.param(
        [
            ("c", request(2, m.COMPARE_REQUEST)),
            ("u", result(2, m.COMPARE_RESPONSE, 6)),
            ("c", request(3, m.MODIFY_REQUEST)),
            ("u", result(3, m.MODIFY_RESPONSE, 50)),
            ("c", request(4, m.ADD_REQUEST)),
            ("c", request(5, m.DEL_REQUEST)),
            ("c", request(6, m.MODDN_REQUEST)),
            ("u", result(4, m.ADD_RESPONSE) + result(5, m.DEL_RESPONSE)),
            ("u", result(6, m.MODDN_RESPONSE)),
        ],
        REUSE,
        id="compare-modify-add-delete-modrdn",
    ),
    pytest.param([], REUSE, id="nothing-after-connecting"),
    # binds
    pytest.param(BIND_OK, RESET, id="bind-success"),
    pytest.param(
        [("c", request(1, m.BIND_REQUEST)), ("u", result(1, m.BIND_RESPONSE, 49))],
        RESET,
        id="bind-failed",
    ),
    pytest.param(
        [
            *BIND_OK,
            ("c", request(2, m.BIND_REQUEST)),
            ("u", result(2, m.BIND_RESPONSE, 49)),
            *SEARCH,
        ],
        RESET,
        id="two-binds-then-search",
    ),
    pytest.param([("c", request(1, m.BIND_REQUEST))], CLOSE, id="bind-outstanding"),
    pytest.param(
        [("c", request(1, m.BIND_REQUEST)), ("u", result(1, m.BIND_RESPONSE, 14))],
        CLOSE,
        id="sasl-bind-in-progress",
    ),
    pytest.param(
        [
            ("c", request(1, m.BIND_REQUEST)),
            ("u", result(1, m.BIND_RESPONSE, 14)),
            ("c", request(2, m.BIND_REQUEST)),
            ("u", result(2, m.BIND_RESPONSE)),
        ],
        RESET,
        id="sasl-bind-completed",
    ),
    pytest.param(
        [
            *BIND_OK,
            ("c", request(2, m.BIND_REQUEST)),
            ("u", result(2, m.BIND_RESPONSE, 14)),
        ],
        CLOSE,
        id="sasl-in-progress-after-a-simple-bind",
    ),
    # outstanding and abandoned operations
    pytest.param([("c", search_request(1))], CLOSE, id="search-outstanding"),
    pytest.param(
        [("c", search_request(1)), ("u", search_entry(1))], CLOSE, id="search-entries-only"
    ),
    pytest.param([("c", search_request(1)), ("c", abandon_request(2, 1))], CLOSE, id="abandoned"),
    # extended operations
    pytest.param([("c", extended(1, m.WHOAMI_OID)), ("u", extended_done(1))], REUSE, id="whoami"),
    pytest.param(
        [("c", extended(1, m.PASSWORD_MODIFY_OID, tlv(SEQUENCE, b""))), ("u", extended_done(1))],
        REUSE,
        id="password-modify",
    ),
    pytest.param(
        [*BIND_OK, ("c", extended(2, m.PASSWORD_MODIFY_OID)), ("u", extended_done(2))],
        RESET,
        id="bind-then-password-modify",
    ),
    pytest.param(
        [
            ("c", search_request(1)),
            ("c", extended(2, m.CANCEL_OID, tlv(SEQUENCE, encode_integer(1)))),
            ("u", result(1, m.SEARCH_RESULT_DONE, 118) + extended_done(2)),
        ],
        REUSE,
        id="cancel",
    ),
    pytest.param(
        [("c", extended(1, TXN_START)), ("u", extended_done(1))],
        CLOSE,
        id="unknown-extended-oid",
    ),
    pytest.param(
        [("c", request(1, 0x71)), ("u", extended_done(1, m.PROTOCOL_ERROR))],
        CLOSE,
        id="unknown-request-tag",
    ),
    # request controls
    *(
        pytest.param(
            [
                ("c", search_request(1, controls=controls(control(oid, True)))),
                ("u", result(1, m.SEARCH_RESULT_DONE)),
            ],
            REUSE,
            id=f"control-{name}",
        )
        for name, oid in [
            ("manageDsaIT", MANAGE_DSA_IT),
            ("assertion", ASSERTION),
            ("proxied-auth", PROXIED_AUTH),
        ]
    ),
    pytest.param(
        [
            ("c", request(1, m.MODIFY_REQUEST, controls(control(ASSERTION, True, b"\x87\x02cn")))),
            ("c", request(2, m.DEL_REQUEST, controls(control(MANAGE_DSA_IT)))),
            ("u", result(1, m.MODIFY_RESPONSE) + result(2, m.DEL_RESPONSE)),
        ],
        REUSE,
        id="stateless-controls-on-updates",
    ),
    *(
        pytest.param(
            [
                ("c", search_request(1, controls=controls(control(oid, False)))),
                ("u", result(1, m.SEARCH_RESULT_DONE)),
            ],
            CLOSE,
            id=f"control-{name}",
        )
        for name, oid in [
            ("server-side-sort", SERVER_SIDE_SORT),
            ("vlv", VLV),
            ("unknown", UNKNOWN_CONTROL),
        ]
    ),
    pytest.param(
        [
            ("c", search_request(1, controls=controls(control(MANAGE_DSA_IT), control(VLV)))),
            ("u", result(1, m.SEARCH_RESULT_DONE)),
        ],
        CLOSE,
        id="stateful-control-after-a-stateless-one",
    ),
    pytest.param(
        [
            ("c", request(1, m.BIND_REQUEST, controls(control(UNKNOWN_CONTROL)))),
            ("u", result(1, m.BIND_RESPONSE)),
        ],
        CLOSE,
        id="unknown-control-on-a-bind",
    ),
    # paged results
    pytest.param(
        [("c", paged_search(1)), ("u", search_done(1, controls(paged(b"next"))))],
        CLOSE,
        id="paged-more-pages-left",
    ),
    pytest.param(
        [("c", paged_search(1)), ("u", search_done(1, controls(paged(b""))))],
        REUSE,
        id="paged-single-page",
    ),
    pytest.param(
        [
            ("c", paged_search(1)),
            ("u", search_entry(1) + search_done(1, controls(paged(b"next")))),
            ("c", paged_search(2, b"next")),
            ("u", search_entry(2) + search_done(2, controls(paged(b"")))),
        ],
        REUSE,
        id="paged-last-page-read",
    ),
    pytest.param(
        [
            ("c", paged_search(1)),
            ("u", search_done(1, controls(paged(b"")))),
            ("c", paged_search(2)),
            ("u", search_done(2, controls(paged(b"more")))),
        ],
        CLOSE,
        id="paged-second-search-left-open",
    ),
    pytest.param(
        [("c", paged_search(1)), ("u", search_done(1))],
        REUSE,
        id="paged-answer-without-control",
    ),
    pytest.param(
        [
            ("c", paged_search(1)),
            ("u", search_done(1, controls(control(PAGED, False, tlv(SEQUENCE, b"\x02\x01"))))),
        ],
        CLOSE,
        id="paged-answer-malformed",
    ),
    # malformed request controls: the upstream judges them, the connection is not reused
    *(
        pytest.param(
            [("c", search_request(1, controls=ctrls)), ("u", result(1, m.SEARCH_RESULT_DONE))],
            CLOSE,
            id=f"malformed-controls-{name}",
        )
        for name, ctrls in [
            ("wrong-tag", tlv(0xA1, control(MANAGE_DSA_IT))),
            ("no-control-type", controls(tlv(SEQUENCE, tlv(BOOLEAN, b"\xff")))),
            ("empty-control", controls(tlv(SEQUENCE, b""))),
            ("overrunning-control", tlv(0xA0, b"\x30\x20" + tlv(OCTET_STRING, MANAGE_DSA_IT))),
        ]
    ),
]


@pytest.mark.parametrize(("steps", "expected"), SCENARIOS)
def test_disposition_at_release(steps: list[Step], expected: Disposition) -> None:
    """The session releases its upstream with the disposition its history calls for."""
    _, disposition = run(steps)
    assert disposition is expected


def test_reused_id_of_an_abandoned_search_keeps_the_connection_unreusable() -> None:
    """After an abandoned search's ID is reused, one final answer does not prove both ended.

    The upstream may have finished search 1 before the Abandon reached it, so two
    SearchResultDone for ID 1 can arrive; after the first, the second may still come, and
    a reused connection would deliver it to the next session (which likely uses ID 1 too).
    """
    _, disposition = run(
        [
            ("c", search_request(1)),
            ("c", abandon_request(2, 1)),
            ("c", search_request(1, base=b"dc=other")),
            ("u", result(1, m.SEARCH_RESULT_DONE)),
        ]
    )
    assert disposition is Disposition.CLOSE


def test_unfinished_paged_search_is_not_forgotten_when_another_one_finishes() -> None:
    """A paged search left with a cookie keeps the connection unreusable, whatever ends later.

    Search 1 stops after its first page (the server keeps its continuation); search 2 then
    reads all its pages.  The last page of search 1 was never read.
    """
    _, disposition = run(
        [
            ("c", paged_search(1)),
            ("u", search_done(1, controls(paged(b"open")))),
            ("c", paged_search(2)),
            ("u", search_done(2, controls(paged(b"")))),
        ]
    )
    assert disposition is Disposition.CLOSE


def test_upstream_lost_releases_with_close() -> None:
    """A broken upstream is released with CLOSE, whatever ran on it."""
    h = make_session()
    upstream = h.connect_upstream()
    upstream.lose()
    assert h.source.released == [(upstream, Disposition.CLOSE)]


def test_disposition_is_given_once_at_unbind() -> None:
    """Unbind releases the bound connection for RESET, exactly once."""
    h = make_session()
    upstream = h.connect_upstream()
    h.send(request(1, m.BIND_REQUEST))
    upstream.deliver(result(1, m.BIND_RESPONSE))
    h.send(m.unbind_request(2))
    h.session.client_lost(connection_done())
    assert h.source.released == [(upstream, Disposition.RESET)]


# -- acquire failures --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "code"),
    [
        pytest.param(PoolBusy("pool.acquire_timeout = 5 s (pool.max_size = 2)"), m.BUSY, id="busy"),
        pytest.param(None, m.UNAVAILABLE, id="no-upstream"),
    ],
)
def test_acquire_failure_answers_each_pending_request_and_keeps_the_session(
    error: Exception | None, code: int
) -> None:
    """Each pending request gets its own response type with busy (51) or unavailable (52)."""
    h = make_session()
    h.send(search_request(1), request(2, m.BIND_REQUEST), request(3, m.MODIFY_REQUEST))
    h.send(abandon_request(4, 1), extended(5, m.WHOAMI_OID), request(6, m.COMPARE_REQUEST))
    assert h.client.paused
    h.source.fail(error)
    frames = h.client.frames()
    assert [(f.message_id, f.op) for f in frames] == [
        (1, m.SEARCH_RESULT_DONE),
        (2, m.BIND_RESPONSE),
        (3, m.MODIFY_RESPONSE),
        (5, m.EXTENDED_RESPONSE),
        (6, m.COMPARE_RESPONSE),
    ]
    assert [m.result_code(f.data) for f in frames] == [code] * 5
    assert h.session.state is SessionState.PLAINTEXT
    assert not h.client.closed
    assert not h.client.paused
    assert h.session.outstanding == 0
    assert h.source.released == []
    h.send(search_request(7))
    assert len(h.source.requests) == 2, "the next request tries again"


# -- with the real pool --------------------------------------------------------------------------

URL = UpstreamURL("ldaps", "dc1.example.com", 636)


def pooled_session(p: PoolHarness, session_id: int) -> tuple[Session, FakeClient]:
    """A started session whose upstreams come from the pool in ``p``."""
    client = FakeClient()
    session = Session(
        session_id,
        f"192.0.2.{session_id}:50000",
        ListenerConfig("test", "tcp:389", ListenerTLS.STARTTLS_OPTIONAL),
        LimitsConfig(1 << 20, 900.0, 10.0),
        p.clock,
        p.pool,
        client,
    )
    session.start()
    return session, client


def test_next_session_runs_only_after_the_reset_bind_succeeded() -> None:
    """A bound session's connection is reset before another session's request reaches it."""
    p = make_pool([URL], min_idle=1, max_size=1, health_check_interval=10_000)
    conn = p.connector.succeed(URL)
    first, first_client = pooled_session(p, 1)
    bind = request(1, m.BIND_REQUEST)
    first.client_data(bind)
    assert conn.sent == [bind]
    conn.deliver(result(1, m.BIND_RESPONSE))
    assert [f.op for f in first_client.frames()] == [m.BIND_RESPONSE]
    first.client_lost(connection_done())

    second, second_client = pooled_session(p, 2)
    second.client_data(search_request(1))
    assert second_client.paused, "waiting for the reset"
    assert conn.sent == [bind, m.anonymous_bind_request(conn.exchanges[-1][1])]
    conn.answer(m.SUCCESS)
    assert conn.sent[-1] == search_request(1)
    assert not second_client.paused
    conn.deliver(result(1, m.SEARCH_RESULT_DONE))
    assert [f.op for f in second_client.frames()] == [m.SEARCH_RESULT_DONE]
    second.client_lost(connection_done())
    assert p.counts() == {"idle": 1}
    assert len(conn.exchanges) == 1, "REUSE: no second reset"


def test_session_gets_busy_when_the_pool_is_exhausted() -> None:
    """With every connection leased, a new session's request is answered busy after the timeout."""
    p = make_pool([URL], min_idle=1, max_size=1, acquire_timeout=2.0)
    p.connector.succeed(URL)
    holder, _ = pooled_session(p, 1)
    holder.client_data(search_request(1))
    waiting, client = pooled_session(p, 2)
    waiting.client_data(request(1, m.ADD_REQUEST))
    p.clock.advance(2.0)
    (frame,) = client.frames()
    assert (frame.message_id, frame.op, m.result_code(frame.data)) == (1, m.ADD_RESPONSE, m.BUSY)
    assert not client.closed
    assert waiting.state is SessionState.PLAINTEXT


def test_session_closed_while_waiting_leaves_no_waiter_behind() -> None:
    """A client that disconnects while waiting for a connection does not take one later."""
    p = make_pool([URL], min_idle=1, max_size=1)
    conn = p.connector.succeed(URL)
    holder, _ = pooled_session(p, 1)
    holder.client_data(search_request(1))
    conn.deliver(result(1, m.SEARCH_RESULT_DONE))
    gone, _ = pooled_session(p, 2)
    gone.client_data(search_request(1))
    gone.client_lost(connection_done())
    holder.client_lost(connection_done())
    assert p.counts() == {"idle": 1}, "back in the pool, not handed to the departed session"


# -- the decoders: request_control_oids and paged_results_cookie ---------------------------

SEARCH_OP = tlv(m.SEARCH_REQUEST, b"\x04\x00")
DONE_OP = tlv(m.SEARCH_RESULT_DONE, ldap_result())

CONTROL_OIDS = [
    pytest.param(encode_message(1, SEARCH_OP), [], id="no-controls"),
    pytest.param(encode_message(1, SEARCH_OP, controls()), [], id="empty-controls"),
    pytest.param(
        encode_message(1, SEARCH_OP, controls(control(MANAGE_DSA_IT))),
        [MANAGE_DSA_IT],
        id="oid-only",
    ),
    pytest.param(
        encode_message(1, SEARCH_OP, controls(control(SERVER_SIDE_SORT, True, b"\x30\x00"))),
        [SERVER_SIDE_SORT],
        id="critical-with-value",
    ),
    pytest.param(
        encode_message(2**31 - 1, SEARCH_OP, controls(paged(b"x"), control(VLV, False))),
        [PAGED, VLV],
        id="two-in-order",
    ),
    pytest.param(m.unbind_request(3), [], id="unbind"),
    pytest.param(
        encode_message(1, tlv(m.DEL_REQUEST, b"cn=x"), controls(control(b""))), [b""], id="empty"
    ),
]


@pytest.mark.parametrize(("pdu", "expected"), CONTROL_OIDS)
def test_request_control_oids(pdu: bytes, expected: list[bytes]) -> None:
    """request_control_oids lists every controlType, in order."""
    assert m.request_control_oids(pdu) == expected


PAGED_COOKIES = [
    pytest.param(encode_message(1, DONE_OP), None, id="no-controls"),
    pytest.param(encode_message(1, DONE_OP, controls()), None, id="empty-controls"),
    pytest.param(
        encode_message(1, DONE_OP, controls(control(SERVER_SIDE_SORT, False, b"\x30\x00"))),
        None,
        id="other-control",
    ),
    pytest.param(encode_message(1, DONE_OP, controls(paged(b"abc"))), b"abc", id="cookie"),
    pytest.param(encode_message(1, DONE_OP, controls(paged(b""))), b"", id="empty-cookie"),
    pytest.param(
        encode_message(1, DONE_OP, controls(paged(b"\x00" * 200, size=0, critical=False))),
        b"\x00" * 200,
        id="long-cookie-with-criticality",
    ),
    pytest.param(
        encode_message(1, DONE_OP, controls(control(VLV, False, b"\x30\x00"), paged(b"k"))),
        b"k",
        id="after-another-control",
    ),
    pytest.param(
        encode_message(1, DONE_OP, controls(control(PAGED, False))), None, id="without-value"
    ),
]


@pytest.mark.parametrize(("pdu", "expected"), PAGED_COOKIES)
def test_paged_results_cookie(pdu: bytes, expected: bytes | None) -> None:
    """paged_results_cookie finds the cookie of the paged-results control, if any."""
    assert m.paged_results_cookie(pdu) == expected


MALFORMED_REQUESTS = [
    pytest.param(encode_message(1, SEARCH_OP, tlv(0xA1, control(VLV))), id="controls-wrong-tag"),
    pytest.param(
        encode_message(1, SEARCH_OP, controls(tlv(SEQUENCE, tlv(BOOLEAN, b"\xff")))),
        id="control-without-type",
    ),
    pytest.param(encode_message(1, SEARCH_OP, controls(tlv(SEQUENCE, b""))), id="empty-control"),
    pytest.param(
        encode_message(1, SEARCH_OP, tlv(0xA0, b"\x30\x05\x04\x03ab")), id="control-overruns"
    ),
    pytest.param(encode_message(1, SEARCH_OP, tlv(0xA0, b"\x30\x04\x04\x09ab")), id="oid-overruns"),
    pytest.param(encode_message(1, SEARCH_OP, tlv(0xA0, b"\x30\x82\x00")), id="truncated-length"),
    pytest.param(b"\x30\x03\x02\x01\x01", id="no-protocol-op"),
]


@pytest.mark.parametrize("pdu", MALFORMED_REQUESTS)
def test_request_control_oids_rejects_malformed_controls(pdu: bytes) -> None:
    """Malformed controls raise BerError (so the session marks the connection unreusable)."""
    with pytest.raises(BerError):
        m.request_control_oids(pdu)


MALFORMED_RESPONSES = [
    pytest.param(
        encode_message(1, DONE_OP, controls(control(PAGED, False, tlv(SEQUENCE, b"")))),
        id="value-without-size",
    ),
    pytest.param(
        encode_message(
            1, DONE_OP, controls(control(PAGED, False, tlv(SEQUENCE, encode_integer(5))))
        ),
        id="value-without-cookie",
    ),
    pytest.param(
        encode_message(1, DONE_OP, controls(control(PAGED, False, b"\x30\x05\x02\x01\x00"))),
        id="value-overruns",
    ),
    pytest.param(
        encode_message(1, DONE_OP, tlv(0xA0, b"\x30\x10" + tlv(OCTET_STRING, PAGED))),
        id="control-overruns",
    ),
]


@pytest.mark.parametrize("pdu", MALFORMED_RESPONSES)
def test_paged_results_cookie_rejects_malformed_controls(pdu: bytes) -> None:
    """A malformed paged-results response control raises BerError."""
    with pytest.raises(BerError):
        m.paged_results_cookie(pdu)


TRUNCATABLE = [
    pytest.param(
        m.request_control_oids,
        encode_message(7, SEARCH_OP, controls(control(MANAGE_DSA_IT, True), paged(b"c"))),
        id="request_control_oids",
    ),
    pytest.param(
        m.paged_results_cookie,
        encode_message(7, DONE_OP, controls(control(VLV), paged(b"cookie"))),
        id="paged_results_cookie",
    ),
]


@pytest.mark.parametrize(("decode_fn", "pdu"), TRUNCATABLE)
def test_truncated_pdus_raise_ber_error(decode_fn: Callable[[bytes], object], pdu: bytes) -> None:
    """Every proper prefix of a PDU with controls raises BerError, nothing else."""
    decode_fn(pdu)  # the whole PDU is fine
    for cut in range(len(pdu)):
        with pytest.raises(BerError):
            decode_fn(pdu[:cut])


@settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(data=st.binary(max_size=64), flip=st.integers(min_value=0, max_value=200))
def test_decoders_raise_only_ber_error_on_garbage(data: bytes, flip: int) -> None:
    """On arbitrary or corrupted bytes the decoders return a value or raise BerError only."""
    base = encode_message(5, DONE_OP, controls(control(VLV), paged(b"cookie")))
    corrupted = bytearray(base)
    corrupted[flip % len(base)] ^= 0xFF
    for candidate in (data, bytes(corrupted), base[: flip % len(base)] + data):
        for decode_fn in (m.request_control_oids, m.paged_results_cookie):
            with contextlib.suppress(BerError):
                decode_fn(candidate)


def sasl_bind(message_id: int, mechanism: bytes = b"DIGEST-MD5") -> bytes:
    """A BindRequest with SASL authentication (``sasl [3]``)."""
    body = encode_integer(3) + tlv(OCTET_STRING, b"") + tlv(0xA3, tlv(OCTET_STRING, mechanism))
    return encode_message(message_id, tlv(m.BIND_REQUEST, body))


def test_completed_sasl_bind_closes_instead_of_resetting() -> None:
    """A connection that ran a SASL bind is closed: a negotiated security layer would make
    the plain reset bind unusable."""
    _, disposition = run([("c", sasl_bind(1)), ("u", result(1, m.BIND_RESPONSE))])
    assert disposition is Disposition.CLOSE


def test_bogus_continuation_does_not_close_another_open_paged_search() -> None:
    """Only presenting a page's own cookie ends its continuation; an error answer to a
    stranger cookie leaves the first search's continuation counted as open."""
    _, disposition = run(
        [
            ("c", paged_search(1)),
            ("u", search_done(1, controls(paged(b"first")))),
            ("c", paged_search(2, cookie=b"bogus")),
            ("u", search_done(2, code=53)),
        ]
    )
    assert disposition is Disposition.CLOSE


def test_paged_search_read_to_the_end_is_reusable() -> None:
    """Presenting each page's cookie until the last page leaves nothing open."""
    _, disposition = run(
        [
            ("c", paged_search(1)),
            ("u", search_done(1, controls(paged(b"p2")))),
            ("c", paged_search(2, cookie=b"p2")),
            ("u", search_done(2, controls(paged(b"p3")))),
            ("c", paged_search(3, cookie=b"p3")),
            ("u", search_done(3, controls(paged(b"")))),
        ]
    )
    assert disposition is Disposition.REUSE
