"""Test doubles for :class:`ldapproxy.session.Session`, and builders for request PDUs.

:class:`FakeClient` implements :class:`ldapproxy.session.ClientPort` and records every call
in :attr:`FakeClient.events`; :class:`FakeUpstream` stands in for an
:class:`ldapproxy.upstream.UpstreamProtocol`; :class:`FakeSource` is an
:class:`ldapproxy.session.UpstreamSource` whose ``acquire()`` Deferreds the test fires.
:func:`make_session` wires them to a session on a :class:`~twisted.internet.task.Clock`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from ldapproxy import messages as m
from ldapproxy.ber import (
    BOOLEAN,
    ENUMERATED,
    OCTET_STRING,
    SEQUENCE,
    Frame,
    Framer,
    encode_integer,
    encode_message,
    tlv,
)
from ldapproxy.config import LimitsConfig, ListenerConfig, ListenerTLS
from ldapproxy.pool import Disposition
from ldapproxy.session import Session
from ldapproxy.upstream import NoUpstreamAvailable, UpstreamError

#: Big enough for anything a test decodes.
_DECODE_LIMIT = 1 << 30


def decode(data: bytes) -> list[Frame]:
    """Split ``data`` into whole LDAPMessages; fails if anything is left over."""
    framer = Framer(_DECODE_LIMIT)
    frames = framer.feed(data)
    assert framer.buffered == 0, f"{framer.buffered} trailing byte(s) after the last PDU"
    return frames


# -- the session's collaborators ---------------------------------------------------------


class FakeClient:
    """A :class:`ldapproxy.session.ClientPort` that records what the session does to it."""

    def __init__(self) -> None:
        #: Every call, in order: ``("write", data)``, ``("start_tls",)``, ``("close",)``...
        self.events: list[tuple[Any, ...]] = []
        self.paused = False
        self.linked: list[Any] = []
        self.unlinked: list[Any] = []

    # ClientPort
    def write(self, data: bytes) -> None:
        assert isinstance(data, bytes)
        self.events.append(("write", data))

    def start_tls(self) -> None:
        self.events.append(("start_tls",))

    def pause_reading(self) -> None:
        self.events.append(("pause",))
        self.paused = True

    def resume_reading(self) -> None:
        self.events.append(("resume",))
        self.paused = False

    def link(self, upstream: Any) -> None:
        self.events.append(("link", upstream))
        self.linked.append(upstream)

    def unlink(self, upstream: Any) -> None:
        self.events.append(("unlink", upstream))
        self.unlinked.append(upstream)

    def close(self) -> None:
        self.events.append(("close",))

    def abort(self) -> None:
        self.events.append(("abort",))

    # inspection
    @property
    def written(self) -> bytes:
        """Everything written to the client, concatenated."""
        return b"".join(e[1] for e in self.events if e[0] == "write")

    def frames(self) -> list[Frame]:
        """What was written to the client, decoded into whole PDUs."""
        return decode(self.written)

    def calls(self) -> list[str]:
        """The names of the calls made, in order (``write``, ``close``, ...), leaving out
        ``unlink`` (checked on its own: it must come before any close)."""
        names = [e[0] for e in self.events]
        if "unlink" in names:
            ends = [i for i, name in enumerate(names) if name in ("close", "abort")]
            assert not ends or names.index("unlink") < ends[0], names
        return [name for name in names if name != "unlink"]

    @property
    def closed(self) -> bool:
        return ("close",) in self.events

    @property
    def aborted(self) -> bool:
        return ("abort",) in self.events

    @property
    def start_tls_calls(self) -> int:
        return self.events.count(("start_tls",))


class FakeUpstream:
    """An upstream connection that records what is sent and replies on demand."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.sink: Any = None
        self.closed = False
        #: For :meth:`ldapproxy.client.ClientProtocol.link`, which couples transports.
        self.transport = StringTransport()

    def attach(self, sink: Any) -> None:
        self.sink = sink

    def send(self, data: bytes) -> None:
        assert isinstance(data, bytes)
        self.sent.append(data)

    def close(self) -> None:
        self.closed = True

    @property
    def received(self) -> bytes:
        """Everything the session sent, concatenated."""
        return b"".join(self.sent)

    def frames(self) -> list[Frame]:
        """What the session sent, decoded into whole PDUs."""
        return decode(self.received)

    def deliver(self, *pdus: bytes) -> None:
        """Hand response PDUs to the attached session, as the real protocol would."""
        assert self.sink is not None, "no session attached"
        self.sink.upstream_frames(decode(b"".join(pdus)))

    def lose(self, reason: str = "connection lost (test)") -> None:
        """The connection broke while attached."""
        assert self.sink is not None, "no session attached"
        self.sink.upstream_lost(reason)


class FakeSource:
    """An upstream source whose acquisitions complete when the test says so."""

    def __init__(self) -> None:
        #: One Deferred per ``acquire()`` call, in order.
        self.requests: list[defer.Deferred[Any]] = []
        self.cancelled: list[defer.Deferred[Any]] = []
        #: ``(connection, disposition)`` per ``release()`` call.
        self.released: list[tuple[Any, Disposition]] = []
        #: If set, ``acquire()`` returns an already-fired Deferred with this connection.
        self.ready: Any = None

    def acquire(self) -> defer.Deferred[Any]:
        if self.ready is not None:
            d: defer.Deferred[Any] = defer.succeed(self.ready)
        else:
            d = defer.Deferred(self.cancelled.append)
        self.requests.append(d)
        return d

    def release(self, connection: Any, disposition: Disposition) -> None:
        self.released.append((connection, disposition))

    @property
    def acquiring(self) -> bool:
        """Whether an ``acquire()`` is waiting for the test."""
        return bool(self.requests) and not self.requests[-1].called

    def succeed(self, upstream: FakeUpstream | None = None) -> FakeUpstream:
        """Complete the latest acquisition with ``upstream`` (a new one by default)."""
        upstream = upstream if upstream is not None else FakeUpstream()
        self.requests[-1].callback(upstream)
        return upstream

    def fail(self, error: Exception | None = None) -> None:
        """Fail the latest acquisition (with :class:`NoUpstreamAvailable` by default)."""
        if error is None:
            error = no_upstream()
        self.requests[-1].errback(Failure(error))


def no_upstream() -> NoUpstreamAvailable:
    """The error the dialer raises when every URL failed."""
    from ldapproxy.config import UpstreamURL

    url = UpstreamURL("ldaps", "dc1.example.com", 636)
    return NoUpstreamAvailable([UpstreamError(url, "cannot connect: refused")])


def connection_done() -> Failure:
    """The reason Twisted gives for a cleanly closed connection."""
    return Failure(ConnectionDone())


@dataclass
class Harness:
    """A session and its fakes, all driven by one clock."""

    session: Session
    client: FakeClient
    source: FakeSource
    clock: Clock
    upstream: FakeUpstream | None = field(default=None)

    def send(self, *pdus: bytes) -> None:
        """The client sends ``pdus`` in one chunk."""
        self.session.client_data(b"".join(pdus))

    def connect_upstream(self) -> FakeUpstream:
        """Give the session an upstream with nothing outstanding, then forget the traffic.

        A search (message ID maxInt) is sent, the acquisition completed and the search
        answered; the upstream's ``sent`` and the client's ``events`` are then cleared.
        The listener must accept a search in the session's current state.
        """
        self.send(search_request(2**31 - 1, base=b"cn=warmup"))
        upstream = self.source.succeed()
        upstream.deliver(result(2**31 - 1, m.SEARCH_RESULT_DONE))
        upstream.sent.clear()
        self.client.events.clear()
        self.upstream = upstream
        return upstream


def make_session(
    tls: ListenerTLS = ListenerTLS.STARTTLS_OPTIONAL,
    *,
    max_pdu_bytes: int = 1 << 20,
    idle_timeout: float = 900.0,
    tls_handshake_timeout: float = 10.0,
    start: bool = True,
) -> Harness:
    """A started session on a listener with ``tls``, and its fakes."""
    clock = Clock()
    client = FakeClient()
    source = FakeSource()
    session = Session(
        7,
        "192.0.2.10:50000",
        ListenerConfig("test", "tcp:389", tls),
        LimitsConfig(max_pdu_bytes, idle_timeout, tls_handshake_timeout),
        clock,
        source,
        client,
    )
    if start:
        session.start()
    return Harness(session, client, source, clock)


# -- request and response PDUs -------------------------------------------------------------

#: Paged results (RFC 2696), critical, page size 100: a realistic control.
PAGED_RESULTS_CONTROL = tlv(
    0xA0,
    tlv(
        SEQUENCE,
        tlv(OCTET_STRING, b"1.2.840.113556.1.4.319")
        + tlv(BOOLEAN, b"\xff")
        + tlv(OCTET_STRING, tlv(SEQUENCE, encode_integer(100) + tlv(OCTET_STRING, b""))),
    ),
)


def search_request(
    message_id: int,
    base: bytes = b"dc=example,dc=com",
    scope: int = 2,
    controls: bytes = b"",
) -> bytes:
    """A SearchRequest for ``(objectClass=*)`` under ``base``."""
    body = (
        tlv(OCTET_STRING, base)
        + encode_integer(scope, ENUMERATED)
        + encode_integer(0, ENUMERATED)
        + encode_integer(0)
        + encode_integer(0)
        + tlv(BOOLEAN, b"\x00")
        + tlv(0x87, b"objectClass")
        + tlv(SEQUENCE, b"")
    )
    return encode_message(message_id, tlv(m.SEARCH_REQUEST, body), controls)


def request(message_id: int, op: int, controls: bytes = b"") -> bytes:
    """A well-formed request of type ``op`` (any other tag gets a small opaque body)."""
    dn = b"cn=someone,dc=example,dc=com"
    if op == m.SEARCH_REQUEST:
        return search_request(message_id, controls=controls)
    if op == m.BIND_REQUEST:
        body = encode_integer(3) + tlv(OCTET_STRING, dn) + tlv(0x80, b"secret")
    elif op == m.MODIFY_REQUEST:
        change = tlv(
            SEQUENCE,
            encode_integer(2, ENUMERATED)
            + tlv(SEQUENCE, tlv(OCTET_STRING, b"description") + tlv(0x31, b"")),
        )
        body = tlv(OCTET_STRING, dn) + tlv(SEQUENCE, change)
    elif op == m.ADD_REQUEST:
        attribute = tlv(
            SEQUENCE, tlv(OCTET_STRING, b"objectClass") + tlv(0x31, tlv(OCTET_STRING, b"top"))
        )
        body = tlv(OCTET_STRING, dn) + tlv(SEQUENCE, attribute)
    elif op == m.DEL_REQUEST:
        body = dn
    elif op == m.MODDN_REQUEST:
        body = tlv(OCTET_STRING, dn) + tlv(OCTET_STRING, b"cn=other") + tlv(BOOLEAN, b"\xff")
    elif op == m.COMPARE_REQUEST:
        ava = tlv(OCTET_STRING, b"cn") + tlv(OCTET_STRING, b"someone")
        body = tlv(OCTET_STRING, dn) + tlv(SEQUENCE, ava)
    elif op == m.EXTENDED_REQUEST:
        body = tlv(0x80, m.WHOAMI_OID)
    elif op == m.UNBIND_REQUEST:
        body = b""
    elif op == m.ABANDON_REQUEST:
        raise ValueError("use abandon_request()")
    else:
        body = b"\x04\x00"
    return encode_message(message_id, tlv(op, body), controls)


def abandon_request(message_id: int, target: int) -> bytes:
    """An AbandonRequest for ``target``."""
    return encode_message(message_id, encode_integer(target, m.ABANDON_REQUEST))


def starttls_request(message_id: int) -> bytes:
    """The StartTLS ExtendedRequest."""
    return m.extended_request(message_id, m.STARTTLS_OID)


def result(message_id: int, op: int, code: int = m.SUCCESS, diagnostic: str = "") -> bytes:
    """A response of type ``op`` carrying an LDAPResult."""
    return m.result_message(message_id, op, code, diagnostic)


def search_entry(message_id: int, dn: bytes = b"cn=entry,dc=example,dc=com") -> bytes:
    """A SearchResultEntry with no attributes."""
    body = tlv(OCTET_STRING, dn) + tlv(SEQUENCE, b"")
    return encode_message(message_id, tlv(m.SEARCH_RESULT_ENTRY, body))
