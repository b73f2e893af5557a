"""The client session: what the proxy does with each PDU a client sends, and with each PDU
the upstream sends back.

A session is plain Python.  It talks to its client through :class:`ClientPort` (the
client protocol implements it over a Twisted transport) and gets its upstream connection
from an :class:`UpstreamSource` (the pool, :mod:`ldapproxy.pool`), so all the policy below
is testable without sockets.

Client states (:class:`SessionState`)::

    PLAINTEXT --StartTLS accepted--> HANDSHAKE --handshake done--> SECURE
    (an ldaps listener starts in HANDSHAKE)
    any state --unbind, error, timeout, upstream lost--> CLOSING --> CLOSED

Rules, in the order they are applied to each client PDU:

* Message ID 0 is reserved for unsolicited notifications, a protocolOp tag must be a
  request (RFC 4511 §4.1.1), and a message ID may not be reused while its operation is
  outstanding: any of these is a protocol error (Notice of Disconnection, then close).
* StartTLS is answered by the proxy itself (RFC 4511 §4.14): ``unavailable`` on a
  ``none`` listener, ``operationsError`` when TLS is already active or operations are
  outstanding, else success in plaintext followed by the handshake.  Bytes that arrive
  after the StartTLS request and before the handshake are never executed; the connection
  is closed (the STARTTLS command-injection class, CVE-2011-0411).
* On ``starttls-required`` listeners, before TLS only Abandon, Unbind and a base-scope read
  of the root DSE pass; an anonymous simple bind is answered with success locally (the
  session is anonymous anyway, and tools bind before reading the root DSE); every other
  request gets its own response type with ``confidentialityRequired``.
* Plugins (:mod:`ldapproxy.hooks`) decide on each remaining request, in order: while a
  verdict is pending, later requests wait and the client is not read.  A denied request
  is answered with the verdict's result code and never reaches the upstream.
* Unbind ends the session; it is not forwarded.
* A request beyond ``limits.max_pending_ops`` outstanding operations is answered ``busy``.
* Everything else is forwarded unchanged, and its message ID recorded as outstanding until
  its final response.  Responses for message IDs that are not outstanding are dropped;
  unsolicited notifications (message ID 0) pass through.

Timers: ``limits.first_request_timeout`` from the start until the first whole request,
``limits.tls_handshake_timeout`` for each handshake, ``limits.idle_timeout`` while nothing
is outstanding, and ``limits.operation_timeout`` while the upstream is silent on a sent
operation (persistent search and sync excepted): then every outstanding operation is
answered ``unavailable`` and the session ends, its hung upstream connection closed.
"""

from __future__ import annotations

import enum
from typing import Any, Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ldapproxy import messages as m
from ldapproxy.ber import BerError, Frame, Framer, FramingError, PDUTooLarge
from ldapproxy.config import LimitsConfig, ListenerConfig, ListenerTLS
from ldapproxy.metrics import Metrics, handshake_failure_reason
from ldapproxy.plugin_chain import NO_PLUGINS, Decision, PluginChain
from ldapproxy.pool import Disposition, PoolBusy
from ldapproxy.session_events import SessionEvents
from ldapproxy.upstream import NoUpstreamAvailable, UpstreamProtocol

log = Logger(namespace="ldapproxy.session")


class SessionState(enum.Enum):
    """Lifecycle of one client session (see the module docstring)."""

    PLAINTEXT = "plaintext"
    HANDSHAKE = "handshake"
    SECURE = "secure"
    CLOSING = "closing"
    CLOSED = "closed"


class ClientPort(Protocol):
    """What a session needs from its client connection."""

    def write(self, data: bytes) -> None:
        """Send bytes to the client."""

    def start_tls(self) -> None:
        """Start the server side of a TLS handshake on the connection."""

    def pause_reading(self) -> None:
        """Stop delivering client bytes until :meth:`resume_reading`."""

    def resume_reading(self) -> None:
        """Deliver client bytes again."""

    def link(self, upstream: UpstreamProtocol) -> None:
        """Couple flow control with ``upstream`` in both directions."""

    def unlink(self, upstream: UpstreamProtocol) -> None:
        """Undo :meth:`link` before the upstream connection is released."""

    def upstream_paused(self) -> bool:
        """Whether the client's full send buffer has paused reading from the upstream."""

    def close(self) -> None:
        """Flush what was written, then close."""

    def abort(self) -> None:
        """Close at once, discarding unwritten data."""


class UpstreamSource(Protocol):
    """Where sessions obtain upstream connections, and give them back."""

    def acquire(self) -> defer.Deferred[UpstreamProtocol]:
        """A READY upstream connection for one session."""

    def release(self, connection: UpstreamProtocol, disposition: Disposition) -> None:
        """The session is done with ``connection``; ``disposition`` says if it can be reused."""

    def reset(self, connection: UpstreamProtocol) -> defer.Deferred[None]:
        """Make a leased connection that ``needs_reset`` anonymous (fires on success)."""


_SHUTTING_DOWN = "the proxy is shutting down"

#: Where sessions built without a Metrics (in tests) count.
_UNCOUNTED = Metrics()

_PLAINTEXT_ALLOWED = frozenset({m.ABANDON_REQUEST, m.UNBIND_REQUEST})

# _holding while the proxy's own anonymous Bind is in flight (message IDs are >= 0).
_RESETTING = -1

#: Extended operations that leave no state on the connection beyond their own answer, so a
#: connection that ran them can be reused.  Any other one makes the connection unreusable
#: (e.g. transactions, RFC 5805): the proxy cannot reset what it does not know.
_STATELESS_EXTENDED = frozenset(
    {
        m.WHOAMI_OID,
        m.PASSWORD_MODIFY_OID,
        m.CANCEL_OID,
        m.REFRESH_OID,
    }
)

#: Request controls that leave no state on the connection.  Any other control (server-side
#: sort and VLV keep per-connection sort state in slapd, for instance) makes the connection
#: unreusable.  Paged results are tracked separately: reusable once the last page is read.
_STATELESS_CONTROLS = frozenset(
    {
        b"2.16.840.1.113730.3.4.2",  # ManageDsaIT (RFC 3296)
        b"2.16.840.1.113730.3.4.18",  # proxied authorization v2 (RFC 4370), per operation
        b"1.3.6.1.1.12",  # assertion (RFC 4528)
        b"1.2.826.0.1.3344810.2.3",  # matched values (RFC 3876)
        b"1.3.6.1.1.13.1",  # pre-read (RFC 4527)
        b"1.3.6.1.1.13.2",  # post-read (RFC 4527)
        b"1.3.6.1.4.1.4203.1.10.1",  # subentries (RFC 3672)
        b"1.3.6.1.4.1.4203.666.5.12",  # relax rules
        b"1.3.6.1.4.1.4203.1.10.2",  # no-op
        b"1.3.6.1.4.1.4203.666.5.2",  # OpenLDAP noop
        b"1.2.840.113556.1.4.1413",  # AD permissive modify
        b"1.2.840.113556.1.4.805",  # AD tree delete
        b"1.2.840.113556.1.4.417",  # AD show deleted
        b"1.2.840.113556.1.4.2064",  # AD show recycled
        b"1.2.840.113556.1.4.801",  # AD security descriptor flags
        b"1.2.840.113556.1.4.1339",  # AD domain scope
        b"1.2.840.113556.1.4.1340",  # AD search options
        b"1.2.840.113556.1.4.529",  # AD extended DN
        b"1.2.840.113556.1.4.619",  # AD lazy commit
        b"1.2.840.113556.1.4.1504",  # AD attribute scoped query
        b"1.2.840.113556.1.4.2239",  # AD policy hints
        b"1.3.6.1.4.1.42.2.27.8.5.1",  # password policy request (draft-behera)
        b"2.16.840.1.113730.3.4.15",  # authorization identity request (RFC 3829)
    }
)


#: Request controls of operations that wait for changes by design, exempt from
#: limits.operation_timeout: persistent search, and the sync operation (syncrepl).
_UNTIMED_CONTROLS = frozenset(
    {
        b"2.16.840.1.113730.3.4.3",  # persistent search (draft-ietf-ldapext-psearch)
        b"1.3.6.1.4.1.4203.1.9.1.1",  # sync request (RFC 4533)
    }
)


class Session:
    """One client connection, from accept to close, and the upstream it uses."""

    def __init__(
        self,
        session_id: int,
        peer: tuple[str, int],
        listener: ListenerConfig,
        limits: LimitsConfig,
        clock: IReactorTime,
        source: UpstreamSource,
        client: ClientPort,
        plugins: PluginChain = NO_PLUGINS,
        metrics: Metrics | None = None,
    ) -> None:
        self.id = session_id
        self.client_host, self.client_port = peer
        #: ``ip:port`` (``[ip]:port`` for IPv6), as in log lines.
        self.peer = format_peer(peer)
        self.listener = listener
        self.state = SessionState.PLAINTEXT
        #: TLS protocol version name once the client's TLS is up, e.g. "TLSv1.3".
        self.tls_version: str | None = None
        self._plugins = plugins
        self._events = SessionEvents(plugins, session_id, peer, listener.name, clock)
        self._metrics = metrics or _UNCOUNTED
        #: Whether a StartTLS handshake is under way (its outcome is counted).
        self._starttls_pending = False
        #: Set by :meth:`drain`: the proxy is stopping.
        self._draining = False
        #: Requests framed while a plugin's verdict is pending, in order; else None.
        self._waiting: list[Frame] | None = None
        #: Why client reads are paused: "upstream" (waiting for one), "verdict".
        self._holds: set[str] = set()
        self._limits = limits
        self._clock = clock
        self._source = source
        self._client = client
        self._framer = Framer(limits.max_pdu_bytes)
        #: message ID -> (request tag, arrival time), for every operation awaiting its
        #: final response.
        self._outstanding: dict[int, tuple[int, float]] = {}
        self._abandoned: set[int] = set()
        self._upstream: UpstreamProtocol | None = None
        self._acquiring: defer.Deferred[UpstreamProtocol] | None = None
        self._pending: list[Frame] = []
        #: While the leased connection's previous identity is being replaced, nothing but
        #: the replacing request may be sent: the message ID of the client's simple Bind
        #: that replaces it, _RESETTING during the proxy's own anonymous Bind, else None.
        self._holding: int | None = None
        self._notice_forwarded = False
        # What the leased connection has seen, for its Disposition at release.
        self._bound = False
        self._stateful = False
        self._sasl_in_progress = False
        #: Paged searches in flight: message ID -> the cookie the request carried.
        self._paged: dict[int, bytes] = {}
        #: Cookies of paged searches whose next page was not asked for (server state).
        self._paged_open: set[bytes] = set()
        self._close_reason: str | None = None
        self._last_activity = self._started = clock.seconds()
        self._requests = 0
        #: The one timer of the session's deadlines (:meth:`_check_deadlines`).
        self._timer: IDelayedCall | None = None
        self._handshake_timer: IDelayedCall | None = None
        #: When the upstream last sent anything to this session.
        self._upstream_seen = self._started
        #: Message IDs exempt from limits.operation_timeout (persistent search, sync).
        self._untimed: set[int] = set()
        #: Whether a request was answered busy for limits.max_pending_ops (logged once).
        self._pending_limit_logged = False

    @property
    def prefix(self) -> str:
        """``conn=ID peer``: the start of every log line about this session."""
        return f"conn={self.id} {self.peer}"

    @property
    def _ending(self) -> bool:
        return self.state is SessionState.CLOSING or self.state is SessionState.CLOSED

    @property
    def outstanding(self) -> int:
        """How many operations await their final response (abandoned ones excluded)."""
        return len(self._outstanding) - len(self._abandoned)

    # -- client events ---------------------------------------------------------------------

    def start(self) -> None:
        """The client connection is established; nothing has been read yet."""
        # Never later than the period of _check_deadlines, which relies on it.
        limits = self._limits
        first = min(limits.first_request_timeout, limits.idle_timeout)
        if limits.operation_timeout:
            first = min(first, limits.operation_timeout)
        self._timer = self._clock.callLater(first, self._check_deadlines)
        if self._plugins.decides_connections:
            decision = _now_or_later(self._plugins.connection_accepted(self._events.connection()))
            if isinstance(decision, defer.Deferred):
                self._hold_reading("verdict")
                decision.addCallback(self._accept_decided)
                return
            self._accept_decided(decision)
            return
        self._serve()

    def _accept_decided(self, decision: Decision) -> None:
        if self._ending:
            return  # the client left while plugins were deciding
        if not decision.allowed:
            self._events.denied = decision
            log.info(
                "{prefix} connection refused by plugin {plugin} ({reason}) on listener {listener}",
                prefix=self.prefix,
                plugin=decision.plugin,
                reason=decision.verdict.reason,
                listener=self.listener.name,
            )
            # Nothing is written: a refused host learns nothing, not even that it is LDAP.
            self._close(f"denied by {decision.plugin}", notice=None)
            return
        self._release_reading("verdict")
        self._serve()

    def _serve(self) -> None:
        if self.listener.tls is ListenerTLS.LDAPS:
            self._begin_tls()

    def client_data(self, data: bytes) -> None:
        """Bytes arrived from the client."""
        if self.state is SessionState.CLOSING or self.state is SessionState.CLOSED:
            return
        self._last_activity = self._clock.seconds()
        try:
            frames = self._framer.feed(data)
        except PDUTooLarge as error:
            self._violation(
                "request too large",
                f"PDU of {error.size} bytes exceeds limits.max_pdu_bytes = {error.limit}",
            )
            return
        except FramingError as error:
            self._violation("malformed LDAP message", f"framing error: {error}")
            return
        self._requests += len(frames)
        if self._waiting is not None:
            self._waiting.extend(frames)  # behind a request whose verdict is pending
            return
        self._process(frames)

    def _process(self, frames: list[Frame]) -> None:
        """Apply the rules of the module docstring to ``frames``, in order."""
        forward: list[Frame] = []
        plugins = self._plugins
        for index, frame in enumerate(frames):
            message_id, op, pdu = frame
            oid = None
            if message_id == 0 or op not in m.REQUEST_NAMES:
                # RFC 4511 §4.1.1: a protocolOp tag that is not a request (a response, or
                # no LDAP operation at all) is a protocol error; it never reaches the
                # upstream, whose connection it could break.
                what = "a response" if op in m.RESPONSE_TAGS else "not an LDAP request"
                if message_id == 0:
                    what = "message ID 0"
                self._violation(
                    "malformed LDAP message",
                    f"message ID {message_id} with op 0x{op:02x} ({what})",
                )
                return
            if op == m.EXTENDED_REQUEST:
                try:
                    oid = m.extended_request_name(pdu)
                except BerError as error:
                    self._violation("malformed LDAP message", f"bad ExtendedRequest: {error}")
                    return
                if oid == m.STARTTLS_OID:
                    self._forward(forward)
                    trailing = self._framer.buffered + sum(len(f.data) for f in frames[index + 1 :])
                    self._starttls(message_id, trailing)
                    return
            if message_id in self._outstanding and message_id not in self._abandoned:
                self._violation(
                    "message ID in use",
                    f"message ID {message_id} reused while its operation is outstanding",
                )
                return
            request = None
            if plugins.tracks_operations:
                try:
                    request = self._events.request(frame)
                except BerError as error:
                    name = m.REQUEST_NAMES.get(op, "unknown")
                    self._violation(
                        "malformed LDAP message", f"undecodable {name} request: {error}"
                    )
                    return
            if self._refused_before_tls(frame):
                if self._ending:
                    return
                continue
            if request is not None and plugins.decides_requests:
                decision = _now_or_later(plugins.request(request))
                if isinstance(decision, defer.Deferred):
                    # Later requests wait for this verdict, unread beyond what arrived.
                    self._forward(forward)
                    self._waiting = frames[index + 1 :]
                    self._hold_reading("verdict")
                    decision.addCallback(self._request_decided, frame, request.received)
                    return
                if not decision.allowed:
                    self._deny(frame, decision, request.received)
                    if self._ending:
                        return
                    continue
            if not self._admit(frame, oid, forward):
                return
        self._forward(forward)

    def _admit(self, frame: Frame, oid: bytes | None, forward: list[Frame]) -> bool:
        """Queue ``frame`` for the upstream (or end the session for Unbind); False once
        the session is ending."""
        message_id, op, pdu = frame
        if op == m.UNBIND_REQUEST:
            self._forward(forward)
            forward.clear()
            self._close("client unbind", notice=None)
            return False
        if op == m.ABANDON_REQUEST:
            try:
                target = m.abandon_target(pdu)
            except BerError as error:
                self._violation("malformed LDAP message", f"bad AbandonRequest: {error}")
                return False
            if target in self._outstanding:
                self._abandoned.add(target)
                forward.append(frame)
            return True
        if self._draining:
            # The proxy is stopping: requests in flight finish, new ones are refused.
            reply = m.error_for_request(message_id, op, m.UNAVAILABLE, _SHUTTING_DOWN)
            if reply is not None:
                self._client.write(reply)
                self._metrics.count_operation(op, m.UNAVAILABLE, 0.0)
                self._events.done(message_id, m.UNAVAILABLE, local=True)
            return True
        if len(self._outstanding) - len(self._abandoned) >= self._limits.max_pending_ops:
            self._too_many(message_id, op)
            return True
        if message_id in self._outstanding:
            # Reusing an abandoned operation's message ID (a live one was refused above).
            self._abandoned.discard(message_id)
            # The abandoned operation's results may still arrive under this ID, after
            # the new one's: never hand this connection to another session.
            self._stateful = True
        self._outstanding[message_id] = (op, self._clock.seconds())
        if op == m.BIND_REQUEST:
            self._bound = True
            # A SASL bind may negotiate a security layer the proxy cannot speak,
            # so the reset bind could not be sent: such a connection is not reused.
            self._stateful |= _is_sasl(pdu)
        elif op == m.EXTENDED_REQUEST:
            self._stateful |= oid not in _STATELESS_EXTENDED
        self._note_controls(message_id, pdu)
        forward.append(frame)
        return True

    def _too_many(self, message_id: int, op: int) -> None:
        """Answer a request past limits.max_pending_ops with busy; the session goes on."""
        limit = self._limits.max_pending_ops
        if not self._pending_limit_logged:
            self._pending_limit_logged = True
            log.info(
                "{prefix} {op} (message ID {id}) answered busy: {count} operations "
                "outstanding (limits.max_pending_ops = {limit}); further ones are not logged",
                prefix=self.prefix,
                op=m.REQUEST_NAMES.get(op, f"op 0x{op:02x}"),
                id=message_id,
                count=self.outstanding,
                limit=limit,
            )
        self._metrics.count_limit("max_pending_ops")
        reply = m.error_for_request(
            message_id,
            op,
            m.BUSY,
            f"too many operations outstanding (limits.max_pending_ops = {limit})",
        )
        if reply is not None:
            self._client.write(reply)
            self._metrics.count_operation(op, m.BUSY, 0.0)
        self._events.done(message_id, m.BUSY, local=True)

    # -- plugins -----------------------------------------------------------------------

    def _request_decided(self, decision: Decision, frame: Frame, received: float) -> None:
        if self._ending:
            return
        waiting, self._waiting = self._waiting or [], None
        if decision.allowed:
            forward: list[Frame] = []
            oid = m.extended_request_name(frame.data) if frame.op == m.EXTENDED_REQUEST else None
            if not self._admit(frame, oid, forward):
                return
            self._forward(forward)
        else:
            self._deny(frame, decision, received)
            if self._ending:
                return
        self._process(waiting)
        if self._waiting is None and not self._ending:
            self._release_reading("verdict")

    def _deny(self, frame: Frame, decision: Decision, received: float) -> None:
        message_id, op, _ = frame
        verdict = decision.verdict
        log.info(
            "{prefix} {op} (message ID {id}) denied by plugin {plugin} ({reason}): {message}",
            prefix=self.prefix,
            op=m.REQUEST_NAMES.get(op, f"op 0x{op:02x}"),
            id=message_id,
            plugin=decision.plugin,
            reason=verdict.reason,
            message=verdict.message,
        )
        if op == m.UNBIND_REQUEST:
            self._close("client unbind", notice=None)  # the client is leaving regardless
            return
        reply = m.error_for_request(message_id, op, verdict.code, verdict.message)
        if reply is not None:
            self._client.write(reply)
            self._metrics.count_operation(op, verdict.code, self._clock.seconds() - received)
        self._events.done(message_id, verdict.code, local=True, denied_by=decision.plugin)

    def tls_established(self, version: str, cipher: str | None = None) -> None:
        """The client's TLS handshake completed."""
        if self._handshake_timer is not None and self._handshake_timer.active():
            self._handshake_timer.cancel()
        self._handshake_timer = None
        if self.state is SessionState.HANDSHAKE:
            self.state = SessionState.SECURE
            self.tls_version = version
            log.debug("{prefix} TLS established ({version})", prefix=self.prefix, version=version)
            if self._starttls_pending:
                self._starttls_pending = False
                self._metrics.count_starttls(self.listener.name, "success")
            if self._plugins.active:
                self._events.tls_started(version, cipher)

    def client_lost(self, reason: Failure) -> None:
        """The client connection is closed (by either side)."""
        previous, self.state = self.state, SessionState.CLOSED
        if previous is SessionState.HANDSHAKE:
            error = _brief(reason)
            log.warn("{prefix} TLS handshake failed: {error}", prefix=self.prefix, error=error)
            self._handshake_failed(handshake_failure_reason(error))
        # One line per session, at its end.  Debug level: at thousands of sessions a second
        # it costs a tenth of the proxy's CPU; the audit log is the place for such records.
        log.debug(
            "{prefix} closed ({why}) on listener {listener} after {seconds:.3f} s, "
            "{requests} request(s){tls}",
            prefix=self.prefix,
            why=self._close_reason or "client disconnected",
            listener=self.listener.name,
            seconds=self._clock.seconds() - self._started,
            requests=self._requests,
            tls=f", {self.tls_version}" if self.tls_version else "",
        )
        self._cancel_timers()
        self._waiting = None
        if self._acquiring is not None:
            self._acquiring.cancel()
        self._release_upstream()
        if self._plugins.active and previous is not SessionState.CLOSED:
            self._events.disconnected(self._close_reason or "client disconnected", self._requests)

    def drain(self) -> None:
        """The proxy is stopping: let operations in flight finish, refuse new ones with
        ``unavailable``, and close with a Notice of Disconnection once none is left."""
        if self._ending:
            return
        self._draining = True
        if not self._outstanding and not self._pending and self._waiting is None:
            self._close("shutdown", notice=(m.UNAVAILABLE, _SHUTTING_DOWN))

    def shutdown(self) -> None:
        """The drain time is over: Notice of Disconnection, and close."""
        self._close("shutdown", notice=(m.UNAVAILABLE, _SHUTTING_DOWN))

    # -- upstream events (UpstreamSink) ------------------------------------------------

    def upstream_frames(self, frames: list[Frame]) -> None:
        """Responses arrived from the upstream; pass on those that belong to this client."""
        if self.state is SessionState.CLOSED:
            return
        self._last_activity = self._upstream_seen = self._clock.seconds()
        replaced: bool | None = None
        out = []
        outstanding = self._outstanding
        events = self._events
        for frame in frames:
            message_id = frame.message_id
            if message_id in outstanding:
                if frame.op in m.FINAL_RESPONSES:
                    op, started = outstanding.pop(message_id)
                    self._abandoned.discard(message_id)
                    code = _result(frame)
                    self._metrics.count_operation(op, code, self._last_activity - started)
                    if frame.op == m.BIND_RESPONSE:
                        self._sasl_in_progress = code == m.SASL_BIND_IN_PROGRESS
                    if message_id == self._holding:
                        # Only a successful BindResponse proves the identity was replaced.
                        replaced = code == m.SUCCESS
                    elif message_id in self._paged:
                        self._paged_done(self._paged.pop(message_id), frame)
                    if events.in_flight:
                        events.done(message_id, code)
                elif events.in_flight:
                    events.returned(message_id, frame.op)
                out.append(frame.data)
            elif message_id == 0:
                if frame.op == m.EXTENDED_RESPONSE and _is_notice(frame.data):
                    self._notice_forwarded = True
                out.append(frame.data)
            else:
                log.debug(
                    "{prefix} dropped upstream response for message ID {id}, not outstanding",
                    prefix=self.prefix,
                    id=message_id,
                )
        if out:
            self._client.write(b"".join(out))
        if self._draining and not self._outstanding and not self._pending:
            self._close("shutdown", notice=(m.UNAVAILABLE, _SHUTTING_DOWN))
            return
        if replaced is not None and self._upstream is not None:
            if replaced:
                self._upstream.needs_reset = False
                self._send_pending()
            else:
                # Don't trust what a failed Bind left behind: reset before going on.
                self._reset_identity(self._upstream)

    def upstream_lost(self, reason: str) -> None:
        """The upstream connection broke while this session held it."""
        upstream, self._upstream = self._upstream, None
        if upstream is not None:
            # Every acquired connection is released exactly once, broken ones included.
            self._client.unlink(upstream)
            self._source.release(upstream, Disposition.CLOSE)
        if self.state is SessionState.CLOSING or self.state is SessionState.CLOSED:
            return
        log.warn("{prefix} upstream connection lost: {reason}", prefix=self.prefix, reason=reason)
        notice = (
            None
            if self._notice_forwarded
            else (m.UNAVAILABLE, "upstream directory connection lost")
        )
        self._close("upstream lost", notice=notice)

    # -- forwarding --------------------------------------------------------------------

    def _forward(self, frames: list[Frame]) -> None:
        if not frames:
            return
        if self._upstream is not None and self._holding is None:
            if len(frames) == 1:
                self._upstream.send(frames[0].data)
            else:
                self._upstream.send(b"".join(f.data for f in frames))
            return
        self._pending.extend(frames)
        if self._acquiring is None and self._upstream is None:
            acquiring = self._source.acquire()
            self._acquiring = acquiring
            acquiring.addCallbacks(self._acquired, self._acquire_failed)
            if self._acquiring is acquiring:
                # Still waiting (the pool had nothing idle): read no more meanwhile.
                self._hold_reading("upstream")

    def _acquired(self, upstream: UpstreamProtocol) -> None:
        self._acquiring = None
        if self.state is SessionState.CLOSING or self.state is SessionState.CLOSED:
            self._source.release(upstream, Disposition.REUSE)
            return
        self._upstream = upstream
        self._client.link(upstream)
        if upstream.needs_reset:
            first = self._pending[0] if self._pending else None
            if first is not None and first.op == m.BIND_REQUEST and _is_simple_bind(first.data):
                # The client's own Bind replaces the previous identity (RFC 4511 §4.2.1)
                # if it succeeds; until its answer nothing else is sent.
                self._holding = first.message_id
                upstream.attach(self)
                del self._pending[0]
                upstream.send(first.data)
                self._resume()
                return
            self._reset_identity(upstream)
            return
        upstream.attach(self)
        self._send_pending()

    def _send_pending(self) -> None:
        self._holding = None
        pending, self._pending = self._pending, []
        self._forward(pending)
        self._resume()

    def _reset_identity(self, upstream: UpstreamProtocol) -> None:
        """Have the pool make ``upstream`` anonymous before anything of ours is sent."""
        self._holding = _RESETTING
        self._source.reset(upstream).addCallbacks(
            self._identity_reset,
            self._reset_failed,
            callbackArgs=(upstream,),
            errbackArgs=(upstream,),
        )

    def _identity_reset(self, _: None, upstream: UpstreamProtocol) -> None:
        if self._upstream is upstream:
            upstream.attach(self)
            self._send_pending()

    def _reset_failed(self, failure: Failure, upstream: UpstreamProtocol) -> None:
        if self._upstream is not upstream:
            return  # the session or the connection ended meanwhile
        log.warn(
            "{prefix} upstream identity reset failed: {error}",
            prefix=self.prefix,
            error=failure.getErrorMessage(),
        )
        self._upstream = None
        self._holding = None
        self._client.unlink(upstream)
        self._source.release(upstream, Disposition.CLOSE)
        self._fail_pending(m.UNAVAILABLE, "no upstream directory is available")

    def _resume(self) -> None:
        self._release_reading("upstream")

    def _hold_reading(self, why: str) -> None:
        if not self._holds:
            self._client.pause_reading()
        self._holds.add(why)

    def _release_reading(self, why: str) -> None:
        if why in self._holds:
            self._holds.discard(why)
            if not self._holds:
                self._client.resume_reading()

    def _acquire_failed(self, failure: Failure) -> None:
        self._acquiring = None
        if isinstance(failure.value, defer.CancelledError) or self._ending:
            # Closing already (a protocol error while waiting, say): its Notice of
            # Disconnection was the last thing the client may get (RFC 4511 §4.4.1).
            return
        pending = self._pending
        if isinstance(failure.value, PoolBusy):
            code, diagnostic = m.BUSY, "all upstream connections are busy; try again"
            log.warn(
                "{prefix} {count} request(s) answered busy: {error}",
                prefix=self.prefix,
                count=len(pending),
                error=failure.value,
            )
        elif isinstance(failure.value, NoUpstreamAvailable):
            code, diagnostic = m.UNAVAILABLE, "no upstream directory is available"
            # Each upstream's failure was logged by the pool; this line is about the client.
            log.warn(
                "{prefix} no upstream available: {count} request(s) answered unavailable",
                prefix=self.prefix,
                count=len(pending),
            )
        else:
            code, diagnostic = m.UNAVAILABLE, "no upstream directory is available"
            log.failure(
                "{prefix} obtaining an upstream connection failed", failure, prefix=self.prefix
            )
        self._fail_pending(code, diagnostic)

    def _fail_pending(self, code: int, diagnostic: str) -> None:
        """Answer every request waiting for an upstream with ``code``."""
        pending, self._pending = self._pending, []
        replies = []
        now = self._clock.seconds()
        for message_id, op, _ in pending:
            _, started = self._outstanding.pop(message_id, (op, now))
            self._abandoned.discard(message_id)
            reply = m.error_for_request(message_id, op, code, diagnostic)
            if reply is not None:
                replies.append(reply)
                self._metrics.count_operation(op, code, now - started)
        if replies:
            self._client.write(b"".join(replies))
        if self._events.in_flight:
            for message_id, _, _ in pending:
                self._events.done(message_id, code, local=True)
        self._resume()

    def _release_upstream(self) -> None:
        upstream, self._upstream = self._upstream, None
        if upstream is not None:
            self._client.unlink(upstream)
            self._source.release(upstream, self._disposition())

    def _note_controls(self, message_id: int, pdu: bytes) -> None:
        """Note request controls that leave state on the upstream connection."""
        try:
            oids = m.request_control_oids(pdu)
        except BerError:
            self._stateful = True  # the upstream will judge it; don't reuse the connection
            return
        for oid in oids:
            if oid == m.PAGED_RESULTS_OID:
                try:
                    self._paged[message_id] = m.paged_results_cookie(pdu) or b""
                except BerError:
                    self._stateful = True
            elif oid not in _STATELESS_CONTROLS:
                self._stateful = True
                if oid in _UNTIMED_CONTROLS:
                    self._untimed.add(message_id)

    def _paged_done(self, request_cookie: bytes, frame: Frame) -> None:
        """Track the paged searches left open on the server (RFC 2696 cookies): a page's
        cookie is open until a request presents it; an unreadable one never closes."""
        self._paged_open.discard(request_cookie)
        try:
            cookie = m.paged_results_cookie(frame.data)
        except BerError:
            self._stateful = True
            return
        if cookie:
            self._paged_open.add(cookie)

    def _disposition(self) -> Disposition:
        """Whether the next session may use this session's upstream connection, and how."""
        if (
            self._outstanding
            or self._stateful
            or self._sasl_in_progress
            or self._paged_open
            or self._holding is not None  # an identity change is still in flight
        ):
            return Disposition.CLOSE  # results may still come, or state we cannot reset
        if self._bound:
            return Disposition.RESET  # a Bind ran: back to anonymous before reuse
        return Disposition.REUSE

    # -- local answers -----------------------------------------------------------------

    def _refused_before_tls(self, frame: Frame) -> bool:
        if (
            self.listener.tls is not ListenerTLS.STARTTLS_REQUIRED
            or self.state is SessionState.SECURE
        ):
            return False
        message_id, op, pdu = frame
        if op in _PLAINTEXT_ALLOWED:
            return False
        try:
            if op == m.SEARCH_REQUEST and m.is_root_dse_read(pdu):
                return False
            if op == m.BIND_REQUEST and m.is_anonymous_bind(pdu):
                # Tools bind anonymously before reading the root DSE.  The session is
                # anonymous already (nothing else can have passed before TLS), so the
                # bind is answered here and never reaches the upstream.
                self._client.write(m.result_message(message_id, m.BIND_RESPONSE, m.SUCCESS, ""))
                self._metrics.count_operation(op, m.SUCCESS, 0.0)
                self._events.done(message_id, m.SUCCESS, local=True)
                return True
        except BerError:
            pass
        reply = m.error_for_request(
            message_id, op, m.CONFIDENTIALITY_REQUIRED, "StartTLS is required on this listener"
        )
        if reply is None:
            self._close(
                "request before StartTLS",
                notice=(m.CONFIDENTIALITY_REQUIRED, "StartTLS is required on this listener"),
            )
        else:
            self._client.write(reply)
            self._metrics.count_operation(op, m.CONFIDENTIALITY_REQUIRED, 0.0)
            self._events.done(message_id, m.CONFIDENTIALITY_REQUIRED, local=True)
        return True

    def _starttls(self, message_id: int, trailing: int) -> None:
        if trailing:
            log.warn(
                "{prefix} closing: {count} byte(s) sent after StartTLS before the TLS handshake "
                "(STARTTLS command injection)",
                prefix=self.prefix,
                count=trailing,
            )
            self._close("StartTLS injection", notice=None, abort=True)
            self._metrics.count_starttls(self.listener.name, "refused")
            return
        if self.listener.tls is ListenerTLS.NONE:
            self._reply_extended(
                message_id, m.UNAVAILABLE, "StartTLS is not offered on this listener"
            )
            self._metrics.count_starttls(self.listener.name, "unavailable")
        elif self.state is not SessionState.PLAINTEXT:
            self._reply_extended(message_id, m.OPERATIONS_ERROR, "TLS is already established")
            self._metrics.count_starttls(self.listener.name, "refused")
        elif self.outstanding:
            self._reply_extended(
                message_id, m.OPERATIONS_ERROR, "StartTLS while operations are outstanding"
            )
            self._metrics.count_starttls(self.listener.name, "refused")
        else:
            self._client.write(m.extended_response(message_id, m.SUCCESS, "", m.STARTTLS_OID))
            self._starttls_pending = True
            self._begin_tls()

    def _reply_extended(self, message_id: int, code: int, diagnostic: str) -> None:
        self._client.write(m.extended_response(message_id, code, diagnostic))

    def _begin_tls(self) -> None:
        self.state = SessionState.HANDSHAKE
        self._client.start_tls()
        self._handshake_timer = self._clock.callLater(
            self._limits.tls_handshake_timeout, self._handshake_timed_out
        )

    # -- ending ------------------------------------------------------------------------

    def _violation(self, diagnostic: str, detail: str) -> None:
        log.warn("{prefix} closing: protocol error: {detail}", prefix=self.prefix, detail=detail)
        self._close("protocol error", notice=(m.PROTOCOL_ERROR, diagnostic))

    def _handshake_timed_out(self) -> None:
        self._handshake_timer = None
        if self.state is SessionState.HANDSHAKE:
            log.warn(
                "{prefix} closing: TLS handshake not finished within "
                "limits.tls_handshake_timeout = {timeout:g} s",
                prefix=self.prefix,
                timeout=self._limits.tls_handshake_timeout,
            )
            self._handshake_failed("timeout")
            self._close("handshake timeout", notice=None, abort=True)

    def _handshake_failed(self, reason: str) -> None:
        self._metrics.count_handshake_failure(self.listener.name, reason)
        if self._starttls_pending:
            self._starttls_pending = False
            self._metrics.count_starttls(self.listener.name, "failure")

    # -- deadlines ------------------------------------------------------------------------

    def _check_deadlines(self) -> None:
        """The session's one timer: limits.first_request_timeout until the first whole
        request, limits.operation_timeout while the upstream is silent on a sent operation,
        limits.idle_timeout while nothing is outstanding.

        Each deadline is computed from timestamps when the timer fires, and the timer is
        set again for the earliest one, but never further than the shorter of the idle and
        operation timeouts: so an operation sent in between is still checked before its
        deadline, and no event has to move the timer (one timer per session, set once per
        period, instead of one per request).
        """
        self._timer = None
        if self._ending:
            return
        limits = self._limits
        now = self._clock.seconds()
        period = limits.idle_timeout
        upcoming = []
        if not self._requests:
            deadline = self._started + limits.first_request_timeout
            if now >= deadline:
                self._first_request_expired()
                return
            upcoming.append(deadline)
        if limits.operation_timeout:
            period = min(period, limits.operation_timeout)
            silence_ends = self._operation_deadline()
            if silence_ends is not None:
                if now >= silence_ends:
                    self._operation_timed_out(*self._oldest_operation())
                    return
                upcoming.append(silence_ends)
        if not (self.outstanding or self._acquiring is not None or self._waiting is not None):
            deadline = self._last_activity + limits.idle_timeout
            if now >= deadline:
                log.info(
                    "{prefix} closing: idle for {idle:.0f} s (limits.idle_timeout = {timeout:g})",
                    prefix=self.prefix,
                    idle=now - self._last_activity,
                    timeout=limits.idle_timeout,
                )
                self._close("idle timeout", notice=(m.UNAVAILABLE, "idle timeout"))
                return
            upcoming.append(deadline)
        wake = min(upcoming, default=now + period)
        self._timer = self._clock.callLater(min(wake - now, period), self._check_deadlines)

    def _timed_operations(self) -> list[tuple[float, int, int]]:
        """``(sent, message ID, op)`` of the operations limits.operation_timeout applies
        to: sent upstream, not abandoned, not a persistent search or sync."""
        unsent = {frame.message_id for frame in self._pending}
        self._untimed &= self._outstanding.keys()
        exempt = self._abandoned | self._untimed | unsent
        return [
            (started, message_id, op)
            for message_id, (op, started) in self._outstanding.items()
            if message_id not in exempt
        ]

    def _operation_deadline(self) -> float | None:
        """When the upstream's silence on the oldest timed operation runs out, if any."""
        if not self._outstanding:
            return None
        if self._upstream is None or self._client.upstream_paused():
            # Waiting for a connection (the pool's acquire_timeout applies), or the client
            # does not read, so the proxy does not read the upstream: not its silence.
            return None
        timed = self._timed_operations()
        if not timed:
            return None
        started, _, _ = min(timed)
        return max(started, self._upstream_seen) + self._limits.operation_timeout

    def _oldest_operation(self) -> tuple[int, int]:
        _, message_id, op = min(self._timed_operations())
        return message_id, op

    def _first_request_expired(self) -> None:
        timeout = self._limits.first_request_timeout
        self._metrics.count_limit("first_request_timeout")
        if self.state is SessionState.HANDSHAKE:
            log.warn(
                "{prefix} closing: TLS handshake not finished within "
                "limits.first_request_timeout = {timeout:g} s",
                prefix=self.prefix,
                timeout=timeout,
            )
            self._handshake_failed("timeout")
            self._close("first request timeout", notice=None, abort=True)
            return
        log.info(
            "{prefix} closing: no whole request within limits.first_request_timeout = "
            "{timeout:g} s ({count} byte(s) received)",
            prefix=self.prefix,
            timeout=timeout,
            count=self._framer.buffered,
        )
        self._close("first request timeout", notice=(m.UNAVAILABLE, "first request timeout"))

    def _operation_timed_out(self, message_id: int, op: int) -> None:
        """The upstream connection is hung: answer every outstanding operation with
        unavailable, drop the connection (never reused) and disconnect the client, whose
        identity lived on it."""
        timeout = self._limits.operation_timeout
        diagnostic = f"the directory did not answer within limits.operation_timeout = {timeout:g} s"
        answered = [
            (mid, request_op, started)
            for mid, (request_op, started) in self._outstanding.items()
            if mid not in self._abandoned
        ]
        log.warn(
            "{prefix} closing: the directory did not answer {op} (message ID {id}) within "
            "limits.operation_timeout = {timeout:g} s; {count} operation(s) answered "
            "unavailable",
            prefix=self.prefix,
            op=m.REQUEST_NAMES.get(op, f"op 0x{op:02x}"),
            id=message_id,
            timeout=timeout,
            count=len(answered),
        )
        self._metrics.count_limit("operation_timeout")
        now = self._clock.seconds()
        replies = []
        for mid, request_op, started in answered:
            reply = m.error_for_request(mid, request_op, m.UNAVAILABLE, diagnostic)
            if reply is not None:
                replies.append(reply)
                self._metrics.count_operation(request_op, m.UNAVAILABLE, now - started)
            if self._events.in_flight:
                self._events.done(mid, m.UNAVAILABLE, local=True)
        if replies:
            self._client.write(b"".join(replies))
        self._outstanding.clear()
        self._abandoned.clear()
        self._pending.clear()
        self._stateful = True  # hung: never handed to another session
        self._close("operation timeout", notice=(m.UNAVAILABLE, diagnostic))

    def _close(self, why: str, notice: tuple[int, str] | None, abort: bool = False) -> None:
        if self.state is SessionState.CLOSING or self.state is SessionState.CLOSED:
            return
        self.state = SessionState.CLOSING
        self._close_reason = why
        self._cancel_timers()
        # Done with the upstream.  This also unlinks flow control: Twisted's TLS layer
        # does not close a connection while a producer is registered on it.
        self._release_upstream()
        if notice is not None:
            self._client.write(m.notice_of_disconnection(*notice))
        if abort:
            self._client.abort()
        else:
            self._client.close()

    def _cancel_timers(self) -> None:
        for timer in (self._timer, self._handshake_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._timer = self._handshake_timer = None


def format_peer(peer: tuple[str, int]) -> str:
    """``ip:port``, or ``[ip]:port`` for IPv6: how log lines name a peer."""
    host, port = peer
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _now_or_later(
    decision: Decision | defer.Deferred[Decision],
) -> Decision | defer.Deferred[Decision]:
    """The decision itself if it is already known (also from a fired Deferred), so that
    plugins answering with ``defer.succeed()`` don't nest a stack frame per request."""
    if not isinstance(decision, defer.Deferred):
        return decision
    known: list[Decision] = []
    decision.addCallback(known.append)
    if known:
        return known[0]
    return decision.addCallback(lambda _: known[0])


def _result(frame: Frame) -> int:
    try:
        return m.result_code(frame.data)
    except BerError:
        return -1


def _is_simple_bind(pdu: bytes) -> bool:
    try:
        return m.is_simple_bind(pdu)
    except BerError:
        return False


def _is_sasl(pdu: bytes) -> bool:
    try:
        return m.is_sasl_bind(pdu)
    except BerError:
        return True


def _is_notice(pdu: bytes) -> bool:
    try:
        return m.extended_response_name(pdu) == m.NOTICE_OF_DISCONNECTION_OID
    except BerError:
        return False


def _brief(reason: Failure) -> str:
    value: Any = reason.value
    text = str(value) or type(value).__name__
    return text
