"""What plugins see of one client session: its :class:`~ldapproxy.hooks.Connection` view,
and each request from arrival to final response, as hook events.

The session (:mod:`ldapproxy.session`) decides; this module only describes.  It keeps the
state the views need (TLS, the bound DN, the operations in flight with their entry counts)
and hands finished events to the :class:`~ldapproxy.plugin_chain.PluginChain`.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime

from ldapproxy import messages as m
from ldapproxy.ber import Frame
from ldapproxy.fields import decode_fields
from ldapproxy.hooks import Connection, Disconnect, Request, Response
from ldapproxy.plugin_chain import Decision, PluginChain


class _Operation:
    """A request that plugins saw, until its final response."""

    __slots__ = ("entries", "references", "request")

    def __init__(self, request: Request) -> None:
        self.request = request
        self.entries = 0
        self.references = 0


class SessionEvents:
    """The hook events of one session, from accept to disconnect."""

    def __init__(
        self,
        chain: PluginChain,
        session_id: int,
        peer: tuple[str, int],
        listener: str,
        clock: IReactorTime,
    ) -> None:
        self.chain = chain
        self._id = session_id
        self._host, self._port = peer
        self._listener = listener
        self._clock = clock
        self._started = clock.seconds()
        self._tls: tuple[str | None, str | None] = (None, None)
        #: The DN of the last successful simple bind (see hooks.Connection.bound_dn).
        self.bound_dn: str | None = None
        #: The plugin decision that refused the connection at accept, if one did.
        self.denied: Decision | None = None
        self._view: Connection | None = None
        self._ops: dict[int, _Operation] = {}

    @property
    def in_flight(self) -> bool:
        """Whether any operation plugins saw still awaits its final response."""
        return bool(self._ops)

    def connection(self) -> Connection:
        """The current view of the connection, rebuilt only when something changed."""
        view = self._view
        if view is None:
            view = self._view = Connection(
                self._id,
                self._host,
                self._port,
                self._listener,
                *self._tls,
                self.bound_dn,
                self._started,
            )
        return view

    def tls_started(self, version: str, cipher: str | None) -> None:
        """The client's TLS is up: tell the plugins."""
        self._tls = (version, cipher)
        self._view = None
        self.chain.tls_started(self.connection())

    def request(self, frame: Frame) -> Request:
        """The view of the request in ``frame``, remembered until its final response.

        :raises ldapproxy.ber.BerError: a plugin asked for the fields of this operation
            and they cannot be decoded.
        """
        message_id, op, pdu = frame
        name = m.REQUEST_NAMES.get(op, "unknown")
        fields = None
        # Binds are always decoded: the bound DN is part of the connection view.
        if name in self.chain.fields_for or op == m.BIND_REQUEST:
            fields = decode_fields(op, pdu)
        request = Request(self.connection(), message_id, name, fields, self._clock.seconds())
        if op in m.RESPONSE_FOR_REQUEST and (self.chain.observes_responses or op == m.BIND_REQUEST):
            self._ops[message_id] = _Operation(request)
        return request

    def returned(self, message_id: int, op: int) -> None:
        """An entry or continuation reference of a search arrived."""
        operation = self._ops.get(message_id)
        if operation is not None:
            if op == m.SEARCH_RESULT_ENTRY:
                operation.entries += 1
            elif op == m.SEARCH_RESULT_REFERENCE:
                operation.references += 1

    def done(
        self, message_id: int, code: int, *, local: bool = False, denied_by: str | None = None
    ) -> None:
        """Operation ``message_id`` got its final response, with result ``code``."""
        operation = self._ops.pop(message_id, None)
        if operation is None:
            return
        request = operation.request
        if request.op == "bind":
            self._bound_as(request, code)
        if not self.chain.observes_responses:
            return
        self.chain.response(
            Response(
                request,
                code,
                operation.entries,
                operation.references,
                self._clock.seconds() - request.received,
                denied_by,
                local,
            )
        )

    def disconnected(self, reason: str, requests: int) -> None:
        """The connection ended."""
        denied = self.denied
        self.chain.disconnected(
            Disconnect(
                self.connection(),
                reason,
                self._clock.seconds() - self._started,
                requests,
                denied.plugin if denied else None,
                denied.verdict.reason if denied else "",
            )
        )

    def _bound_as(self, request: Request, code: int) -> None:
        fields = request.fields
        if code == m.SUCCESS and fields is not None and fields.mechanism == "simple":
            bound: str | None = fields.dn
        elif code == m.SASL_BIND_IN_PROGRESS:
            return
        else:
            bound = None  # a failed bind leaves the connection anonymous (RFC 4513 §5.1.1)
        if bound != self.bound_dn:
            self.bound_dn = bound
            self._view = None
