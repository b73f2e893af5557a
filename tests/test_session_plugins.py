"""Unit tests of the hook dispatch in ldapproxy.session and ldapproxy.plugin_chain: when each
hook runs, what it sees, and how verdicts (also late, failed or missing ones) are applied."""

from __future__ import annotations

from typing import Any

import pytest
from support.fakes import (
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
from twisted.internet import defer
from twisted.logger import LogEvent, globalLogPublisher

from ldapproxy import fields as fields_module
from ldapproxy import messages as m
from ldapproxy.config import ListenerTLS
from ldapproxy.hooks import (
    ALLOW,
    Connection,
    Disconnect,
    Plugin,
    Request,
    Response,
    Verdict,
    deny,
)
from ldapproxy.session import SessionState


class Recorder(Plugin):
    """Records every hook call as ``(hook, event)``; decisions come from ``verdicts``."""

    def __init__(self, name: str = "", **verdicts: Any) -> None:
        self.name = name
        self.calls: list[tuple[str, Any]] = []
        self.verdicts = verdicts

    def _verdict(self, hook: str, event: Any) -> Any:
        self.calls.append((hook, event))
        verdict = self.verdicts.get(hook, ALLOW)
        return verdict(event) if callable(verdict) else verdict

    def connection_accepted(self, connection: Connection) -> Any:
        return self._verdict("connection_accepted", connection)

    def request(self, request: Request) -> Any:
        return self._verdict("request", request)

    def tls_started(self, connection: Connection) -> None:
        self.calls.append(("tls_started", connection))

    def response(self, response: Response) -> None:
        self.calls.append(("response", response))

    def disconnected(self, disconnect: Disconnect) -> None:
        self.calls.append(("disconnected", disconnect))

    def hooks(self) -> list[str]:
        return [hook for hook, _ in self.calls]

    def events(self, hook: str) -> list[Any]:
        return [event for name, event in self.calls if name == hook]


class SearchFields(Recorder):
    """A recorder that asks for the decoded fields of searches."""

    request_fields = frozenset({"search"})


@pytest.fixture
def logged() -> Any:
    """The log events emitted during the test."""
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def log_text(events: list[LogEvent]) -> str:
    from twisted.logger import formatEvent

    return "\n".join(formatEvent(e) for e in events)


def responses(h: Harness) -> list[tuple[int, int, int]]:
    """``(message ID, op, result code)`` of every response the client got."""
    return [(f.message_id, f.op, m.result_code(f.data)) for f in h.client.frames()]


# -- accept -------------------------------------------------------------------------------------


def test_accept_hook_runs_before_anything_and_sees_the_client() -> None:
    """The accept hook runs when the session starts and sees the client's address and
    listener, with no TLS and no bound DN yet."""
    plugin = Recorder()
    h = make_session(plugins=[plugin])
    [connection] = plugin.events("connection_accepted")
    assert (connection.client_host, connection.client_port) == ("192.0.2.10", 50000)
    assert (connection.client, connection.listener, connection.id) == (
        "192.0.2.10:50000",
        "test",
        7,
    )
    assert (connection.tls_version, connection.bound_dn) == (None, None)
    assert h.client.events == []


def test_denied_connection_is_closed_without_a_byte_and_reported_once() -> None:
    """A denied connection is closed with nothing written and no TLS started, later plugins
    are not asked, and every plugin's disconnect hook says who denied it."""
    first = Recorder("first", connection_accepted=deny(reason="host"))
    second = Recorder("second")
    h = make_session(ListenerTLS.LDAPS, plugins=[first, second])
    assert h.client.calls() == ["close"]
    assert h.client.start_tls_calls == 0
    assert second.events("connection_accepted") == []
    h.session.client_lost(connection_done())
    for plugin in (first, second):
        [gone] = plugin.events("disconnected")
        assert (gone.denied_by, gone.deny_reason, gone.reason) == (
            "first",
            "host",
            "denied by first",
        )


def test_slow_accept_verdict_keeps_the_client_unread_until_allowed() -> None:
    """While the accept verdict is pending the client is not read and the ldaps handshake
    does not start; once allowed, reading resumes and the handshake starts."""
    pending: defer.Deferred[Verdict] = defer.Deferred()
    plugin = Recorder(connection_accepted=pending)
    h = make_session(ListenerTLS.LDAPS, plugins=[plugin])
    assert h.client.calls() == ["pause"]
    pending.callback(ALLOW)
    assert h.client.calls() == ["pause", "resume", "start_tls"]


def test_accept_verdict_that_never_comes_denies_after_the_plugin_timeout() -> None:
    """An accept hook whose Deferred does not fire within limits.plugin_timeout denies."""
    plugin = Recorder(connection_accepted=defer.Deferred())
    h = make_session(plugins=[plugin], plugin_timeout=3.0)
    h.clock.advance(2.9)
    assert not h.client.closed
    h.clock.advance(0.2)
    assert h.client.closed
    assert h.client.written == b""


# -- requests -----------------------------------------------------------------------------------


def test_denied_request_is_answered_locally_and_never_forwarded() -> None:
    """A denied modify gets the verdict's code and message, reaches no upstream, and the
    response hook reports it as local and denied by that plugin."""
    plugin = Recorder(
        "guard",
        request=lambda r: deny(50, "read-only here") if r.op == "modify" else ALLOW,
    )
    h = make_session(plugins=[plugin])
    h.send(request(2, m.MODIFY_REQUEST))
    [frame] = h.client.frames()
    assert (frame.message_id, frame.op, m.result_code(frame.data)) == (2, m.MODIFY_RESPONSE, 50)
    assert b"read-only here" in frame.data
    assert h.source.requests == []
    [answer] = plugin.events("response")
    assert (answer.result, answer.local, answer.denied_by, answer.request.op) == (
        50,
        True,
        "guard",
        "modify",
    )


@pytest.mark.parametrize(
    ("pdu", "op"),
    [
        (request(2, m.BIND_REQUEST), m.BIND_RESPONSE),
        (request(2, m.SEARCH_REQUEST), m.SEARCH_RESULT_DONE),
        (request(2, m.ADD_REQUEST), m.ADD_RESPONSE),
        (request(2, m.DEL_REQUEST), m.DEL_RESPONSE),
        (request(2, m.MODDN_REQUEST), m.MODDN_RESPONSE),
        (request(2, m.COMPARE_REQUEST), m.COMPARE_RESPONSE),
        (request(2, m.EXTENDED_REQUEST), m.EXTENDED_RESPONSE),
    ],
)
def test_each_denied_operation_gets_its_own_response_type(pdu: bytes, op: int) -> None:
    """A denied request is answered with the response type that matches it."""
    h = make_session(plugins=[Recorder(request=deny(53, "no"))])
    h.send(pdu)
    assert responses(h) == [(2, op, 53)]


def test_first_deny_wins_and_later_plugins_are_not_asked(logged: Any) -> None:
    """Plugins decide in order; after a deny the next plugin is not called, and the log
    line names the plugin that denied."""
    first = Recorder("first", request=deny(50, "nope", reason="operation"))
    second = Recorder("second")
    h = make_session(plugins=[first, second])
    h.send(request(2, m.SEARCH_REQUEST))
    assert second.events("request") == []
    assert "search (message ID 2) denied by plugin first (operation): nope" in log_text(logged)
    assert responses(h) == [(2, m.SEARCH_RESULT_DONE, 50)]


def test_allowed_requests_are_forwarded_unchanged() -> None:
    """When every plugin allows, the request bytes reach the upstream unchanged."""
    h = make_session(plugins=[Recorder(), Recorder()])
    pdu = request(2, m.SEARCH_REQUEST)
    h.send(pdu)
    upstream = h.source.succeed()
    assert upstream.received == pdu


def test_request_hook_that_raises_denies_fail_closed(logged: Any) -> None:
    """A request hook that raises denies with unwillingToPerform, and the log names the
    plugin and the exception."""

    def broken(_: Request) -> Verdict:
        raise RuntimeError("rules table corrupt")

    h = make_session(plugins=[Recorder("buggy", request=broken)])
    h.send(request(2, m.SEARCH_REQUEST))
    assert responses(h) == [(2, m.SEARCH_RESULT_DONE, 53)]
    assert h.source.requests == []
    text = log_text(logged)
    assert "plugin buggy: request hook raised; denying (fail closed)" in text
    assert "rules table corrupt" in "".join(str(e.get("log_failure")) for e in logged)


def test_request_hook_returning_something_else_denies() -> None:
    """A request hook that returns something other than a Verdict denies."""
    h = make_session(plugins=[Recorder(request=True)])
    h.send(request(2, m.SEARCH_REQUEST))
    assert responses(h) == [(2, m.SEARCH_RESULT_DONE, 53)]


def test_request_hook_with_a_failed_deferred_denies() -> None:
    """A request hook whose Deferred fails denies."""
    h = make_session(plugins=[Recorder(request=lambda _: defer.fail(ValueError("x")))])
    h.send(request(2, m.SEARCH_REQUEST))
    assert responses(h) == [(2, m.SEARCH_RESULT_DONE, 53)]


def test_pending_verdict_holds_later_requests_in_order() -> None:
    """While a verdict is pending the client is not read and later requests wait; once it
    comes, they are forwarded in the order the client sent them."""
    verdicts: list[defer.Deferred[Verdict]] = []

    def slow(r: Request) -> Any:
        if r.message_id == 2:
            verdicts.append(defer.Deferred())
            return verdicts[-1]
        return ALLOW

    h = make_session(plugins=[Recorder(request=slow)])
    first, second, third = (request(n, m.SEARCH_REQUEST) for n in (2, 3, 4))
    h.send(first, second)
    assert h.client.paused
    h.send(third)  # already in flight when reading paused
    assert h.source.requests == []
    verdicts[0].callback(ALLOW)
    upstream = h.source.succeed()
    assert [f.message_id for f in upstream.frames()] == [2, 3, 4]
    assert not h.client.paused


def test_pending_deny_answers_and_lets_the_rest_through() -> None:
    """A late deny answers its request, and the requests behind it still go on."""
    pending: defer.Deferred[Verdict] = defer.Deferred()
    plugin = Recorder(request=lambda r: pending if r.message_id == 2 else ALLOW)
    h = make_session(plugins=[plugin])
    h.send(request(2, m.DEL_REQUEST), request(3, m.SEARCH_REQUEST))
    pending.callback(deny(50, "no deletes"))
    assert responses(h) == [(2, m.DEL_RESPONSE, 50)]
    upstream = h.source.succeed()
    assert [f.message_id for f in upstream.frames()] == [3]


def test_request_verdict_times_out_and_denies() -> None:
    """A request verdict that does not come within limits.plugin_timeout denies."""
    h = make_session(plugins=[Recorder(request=lambda _: defer.Deferred())], plugin_timeout=2.0)
    h.send(request(2, m.SEARCH_REQUEST))
    h.clock.advance(2.5)
    assert responses(h) == [(2, m.SEARCH_RESULT_DONE, 53)]
    assert not h.client.paused


def test_already_fired_deferreds_do_not_nest_per_request() -> None:
    """Hooks answering with already-fired Deferreds handle thousands of pipelined requests
    without growing the stack."""
    h = make_session(
        plugins=[Recorder(request=lambda _: defer.succeed(ALLOW))], max_pending_ops=5000
    )
    h.send(*(request(n, m.SEARCH_REQUEST) for n in range(1, 3001)))
    upstream = h.source.succeed()
    assert len(upstream.frames()) == 3000


def test_client_leaving_during_a_pending_verdict_is_harmless() -> None:
    """A verdict that arrives after the client left changes nothing and sends nothing."""
    pending: defer.Deferred[Verdict] = defer.Deferred()
    plugin = Recorder(request=pending)
    h = make_session(plugins=[plugin])
    h.send(request(2, m.SEARCH_REQUEST))
    h.session.client_lost(connection_done())
    pending.callback(ALLOW)
    assert h.source.requests == []
    assert len(plugin.events("disconnected")) == 1


def test_denied_abandon_is_dropped_and_denied_unbind_still_closes() -> None:
    """Abandon and Unbind have no response: a denied Abandon is dropped, and a denied
    Unbind still ends the session."""
    plugin = Recorder(request=lambda r: deny() if r.op in ("abandon", "unbind") else ALLOW)
    h = make_session(plugins=[plugin])
    h.send(request(2, m.SEARCH_REQUEST))
    upstream = h.source.succeed()
    h.send(abandon_request(3, 2))
    assert [f.message_id for f in upstream.frames()] == [2]
    h.send(request(4, m.UNBIND_REQUEST))
    assert h.client.closed
    assert h.client.written == b""


def test_starttls_is_not_a_request_event_and_tls_started_reports_it() -> None:
    """StartTLS is answered by the proxy and not shown to the request hook; the TLS hook
    then sees the version and cipher."""
    plugin = Recorder()
    h = make_session(plugins=[plugin])
    h.send(starttls_request(1))
    h.session.tls_established("TLSv1.3", "TLS_AES_256_GCM_SHA384")
    assert plugin.events("request") == []
    [connection] = plugin.events("tls_started")
    assert (connection.tls_version, connection.tls_cipher) == (
        "TLSv1.3",
        "TLS_AES_256_GCM_SHA384",
    )
    h.send(request(2, m.SEARCH_REQUEST))
    [seen] = plugin.events("request")
    assert seen.connection.tls_version == "TLSv1.3"


# -- responses and fields -----------------------------------------------------------------------


def test_response_event_counts_entries_and_measures_duration() -> None:
    """The response hook gets the result code, the entries and references returned and the
    time from request to final response."""
    plugin = Recorder()
    h = make_session(plugins=[plugin])
    h.send(search_request(2))
    upstream = h.source.succeed()
    h.clock.advance(0.25)
    reference = tlv_reference(2)
    upstream.deliver(search_entry(2), search_entry(2), reference, result(2, m.SEARCH_RESULT_DONE))
    [answer] = plugin.events("response")
    assert (answer.result, answer.entries, answer.references, answer.local) == (0, 2, 1, False)
    assert answer.duration == pytest.approx(0.25)
    assert answer.request.message_id == 2


def tlv_reference(message_id: int) -> bytes:
    from ldapproxy.ber import OCTET_STRING, encode_message, tlv

    return encode_message(
        message_id, tlv(m.SEARCH_RESULT_REFERENCE, tlv(OCTET_STRING, b"ldap://other/"))
    )


def test_bound_dn_follows_bind_results() -> None:
    """After a successful simple bind the connection view carries the bind DN; after a
    failed one it is None again."""
    plugin = Recorder()
    h = make_session(plugins=[plugin])
    h.send(request(2, m.BIND_REQUEST))
    upstream = h.source.succeed()
    upstream.deliver(result(2, m.BIND_RESPONSE))
    h.send(request(3, m.SEARCH_REQUEST))
    assert plugin.events("request")[-1].connection.bound_dn == "cn=someone,dc=example,dc=com"
    h.send(request(4, m.BIND_REQUEST))
    upstream.deliver(result(4, m.BIND_RESPONSE, 49))
    h.send(request(5, m.SEARCH_REQUEST))
    assert plugin.events("request")[-1].connection.bound_dn is None


def test_bind_password_is_in_no_event() -> None:
    """The bind password appears in no event any plugin sees."""
    plugin = Recorder()
    h = make_session(plugins=[plugin])
    h.send(request(2, m.BIND_REQUEST))  # password b"secret"
    h.source.succeed().deliver(result(2, m.BIND_RESPONSE))
    h.session.client_lost(connection_done())
    assert "secret" not in repr(plugin.calls)


def test_fields_are_decoded_only_for_operations_a_plugin_asked_for() -> None:
    """A plugin that asked for search fields gets them; a modify stays undecoded."""
    plugin = SearchFields()
    h = make_session(plugins=[plugin])
    h.send(search_request(2, base=b"ou=people,dc=example,dc=com"), request(3, m.MODIFY_REQUEST))
    search, modify = plugin.events("request")
    assert search.fields is not None
    assert (search.fields.dn, search.fields.scope) == ("ou=people,dc=example,dc=com", "sub")
    assert modify.fields is None


def test_without_plugins_nothing_is_decoded(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no plugins the fast path never calls the field decoder."""

    def refuse(*_: Any) -> None:
        raise AssertionError("decode_fields called on the fast path")

    monkeypatch.setattr(fields_module, "decode_fields", refuse)
    monkeypatch.setattr("ldapproxy.session_events.decode_fields", refuse)
    h = make_session()
    h.send(search_request(2), request(3, m.BIND_REQUEST))
    assert len(h.source.succeed().frames()) == 2


def test_plugins_without_request_hooks_leave_requests_undecoded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A plugin with only a disconnect hook costs nothing per request: nothing is decoded."""

    class Goodbye(Plugin):
        def disconnected(self, disconnect: Disconnect) -> None:
            pass

    monkeypatch.setattr("ldapproxy.session_events.decode_fields", pytest.fail)
    h = make_session(plugins=[Goodbye()])
    h.send(search_request(2))
    assert len(h.source.succeed().frames()) == 1


def test_undecodable_request_a_plugin_needs_is_a_protocol_error() -> None:
    """A search a plugin asked to see but that cannot be decoded ends the session with a
    protocolError notice instead of passing unchecked."""
    from ldapproxy.ber import OCTET_STRING, encode_message, tlv

    h = make_session(plugins=[SearchFields()])
    broken = encode_message(2, tlv(m.SEARCH_REQUEST, tlv(OCTET_STRING, b"dc=x")))
    h.send(broken)
    [notice] = h.client.frames()
    assert (notice.message_id, m.result_code(notice.data)) == (0, m.PROTOCOL_ERROR)
    assert h.client.closed
    assert h.source.requests == []


def test_local_answers_are_response_events() -> None:
    """Requests the proxy answers itself (no upstream available) still produce response
    events, marked local."""
    plugin = Recorder()
    h = make_session(plugins=[plugin])
    h.send(request(2, m.SEARCH_REQUEST))
    h.source.fail()
    [answer] = plugin.events("response")
    assert (answer.result, answer.local, answer.denied_by) == (m.UNAVAILABLE, True, None)


def test_refused_before_starttls_is_a_local_response_event() -> None:
    """On a starttls-required listener the refusal of a request before TLS is reported to
    the response hook with confidentialityRequired."""
    plugin = Recorder()
    h = make_session(ListenerTLS.STARTTLS_REQUIRED, plugins=[plugin])
    h.send(request(2, m.SEARCH_REQUEST))
    [answer] = plugin.events("response")
    assert (answer.result, answer.local) == (m.CONFIDENTIALITY_REQUIRED, True)


# -- observation hooks and disconnect ---------------------------------------------------------


def test_failing_observation_hook_is_logged_and_skipped(logged: Any) -> None:
    """An observation hook that raises is logged with the plugin's name; later plugins
    still see the event and the session goes on."""

    class Broken(Plugin):
        def response(self, response: Response) -> None:
            raise RuntimeError("disk on fire")

    broken, after = Broken(), Recorder()
    broken.name = "broken"
    h = make_session(plugins=[broken, after])
    h.send(request(2, m.SEARCH_REQUEST))
    upstream = h.source.succeed()
    upstream.deliver(result(2, m.SEARCH_RESULT_DONE))
    h.send(request(3, m.SEARCH_REQUEST))
    upstream.deliver(result(3, m.SEARCH_RESULT_DONE))
    assert [r.request.message_id for r in after.events("response")] == [2, 3]
    assert responses(h) == [(2, m.SEARCH_RESULT_DONE, 0), (3, m.SEARCH_RESULT_DONE, 0)]
    assert "plugin broken: response hook raised; skipped" in log_text(logged)


@pytest.mark.parametrize(
    ("ending", "reason"),
    [
        ("unbind", "client unbind"),
        ("drop", "client disconnected"),
        ("idle", "idle timeout"),
        ("garbage", "protocol error"),
    ],
)
def test_disconnect_hook_runs_exactly_once(ending: str, reason: str) -> None:
    """However the session ends, each plugin's disconnect hook runs exactly once, with the
    reason and the number of requests."""
    plugin = Recorder()
    h = make_session(plugins=[plugin], idle_timeout=5.0)
    h.send(request(2, m.SEARCH_REQUEST))
    h.source.succeed().deliver(result(2, m.SEARCH_RESULT_DONE))
    if ending == "unbind":
        h.send(request(3, m.UNBIND_REQUEST))
    elif ending == "idle":
        h.clock.advance(6.0)
    elif ending == "garbage":
        h.send(b"\x30\x03\x02\x01\x00")
    h.session.client_lost(connection_done())
    h.session.client_lost(connection_done())
    [gone] = plugin.events("disconnected")
    assert gone.reason == reason
    assert gone.requests == (2 if ending == "unbind" else 1)  # garbage is no request
    assert gone.denied_by is None
    assert h.session.state is SessionState.CLOSED


def test_request_only_plugins_still_see_the_bound_dn() -> None:
    """A plugin with a request hook and no response hook (no Response events are built for
    it) still sees the DN of the last successful bind in its connection view."""

    class RequestsOnly(Plugin):
        def __init__(self) -> None:
            self.seen: list[Request] = []

        def request(self, request: Request) -> Verdict:
            self.seen.append(request)
            return ALLOW

    plugin = RequestsOnly()
    h = make_session(plugins=[plugin])
    h.send(request(2, m.BIND_REQUEST))
    upstream = h.source.succeed()
    upstream.deliver(result(2, m.BIND_RESPONSE))
    h.send(search_request(3))
    upstream.deliver(search_entry(3), result(3, m.SEARCH_RESULT_DONE))
    h.send(search_request(4))
    assert plugin.seen[-1].connection.bound_dn == "cn=someone,dc=example,dc=com"
    assert h.session._events.in_flight is False, "nothing is kept for unobserved searches"
