"""A small fake LDAPS directory for tests of what the proxy does with a misbehaving upstream.

:class:`FakeUpstream` is a threaded TLS server on ``127.0.0.1`` (an ephemeral port, so it
never races another test for a port) with a certificate from the test CA.  It answers LDAP
well enough for the proxy's pool: an anonymous (or any simple) Bind gets ``success``, the
pool's health checks and probes (a base-scope search of the root DSE) get a
SearchResultDone ``success``, WhoAmI gets ``success`` with ``dn:cn=fake``, other searches
get one entry for their base and ``success``, Unbind closes the connection.

Searches whose base DN is one of the "trigger" DNs below are answered with a broken
response instead, and the connection is then left open (so that only the proxy's own
detection of the broken PDU can end the client's wait):

* :data:`GARBAGE_BASE`: bytes that are not BER at all (an HTTP response line).
* :data:`BAD_ENVELOPE_BASE`: a well-framed SEQUENCE whose content is not an LDAPMessage
  (no messageID INTEGER).
* :data:`OVERSIZED_BASE`: a SEQUENCE header announcing one byte more than
  ``ldapproxy.upstream.UPSTREAM_MAX_PDU_BYTES``, followed by a few bytes of "body".

It is always stopped through :meth:`FakeUpstream.stop` (or as a context manager), which
closes the listening socket and every connection and joins every thread.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ldapproxy import messages as m
from ldapproxy.ber import (
    ENUMERATED,
    OCTET_STRING,
    SEQUENCE,
    BerError,
    Frame,
    Framer,
    FramingError,
    encode_integer,
    encode_message,
    read_tlv,
    tlv,
)
from ldapproxy.pki import CertificateAuthority
from ldapproxy.upstream import UPSTREAM_MAX_PDU_BYTES

from .net import LOOPBACK

GARBAGE_BASE = "cn=send-garbage"
BAD_ENVELOPE_BASE = "cn=send-bad-envelope"
OVERSIZED_BASE = "cn=send-oversized"

#: What the broken responses consist of (sent through TLS, as one write each).
GARBAGE_BYTES = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"
BAD_ENVELOPE_BYTES = tlv(SEQUENCE, tlv(OCTET_STRING, b"not a message ID"))
OVERSIZED_BYTES = (
    bytes((SEQUENCE, 0x84)) + (UPSTREAM_MAX_PDU_BYTES + 1).to_bytes(4, "big") + b"\x02\x01\x02"
)

FAKE_DN = "cn=fake"

#: How long one connection may take for its TLS handshake.
_HANDSHAKE_TIMEOUT = 5.0
#: How often blocked threads look at the stop flag.
_POLL = 0.1


@dataclass(frozen=True)
class Request:
    """One request the fake received: its connection number, message ID, op and base DN
    (searches only)."""

    connection: int
    message_id: int
    op: int
    base: str | None = None


def _search_base(pdu: bytes) -> str | None:
    """The baseObject of a SearchRequest PDU."""
    try:
        _, start, end = read_tlv(pdu, 0, len(pdu))
        _, _, pos = read_tlv(pdu, start, end)  # messageID
        tag, op_start, op_end = read_tlv(pdu, pos, end)
        if tag != m.SEARCH_REQUEST:
            return None
        base_tag, base_start, base_end = read_tlv(pdu, op_start, op_end)
    except BerError:
        return None
    if base_tag != OCTET_STRING:
        return None
    return pdu[base_start:base_end].decode("utf-8", "replace")


def _success(message_id: int, response_op: int) -> bytes:
    return m.result_message(message_id, response_op, m.SUCCESS, "")


def _whoami_response(message_id: int) -> bytes:
    body = (
        encode_integer(m.SUCCESS, ENUMERATED)
        + tlv(OCTET_STRING, b"")
        + tlv(OCTET_STRING, b"")
        + tlv(0x8B, f"dn:{FAKE_DN}".encode())
    )
    return encode_message(message_id, tlv(m.EXTENDED_RESPONSE, body))


def _entry(message_id: int, dn: str) -> bytes:
    attributes = tlv(SEQUENCE, tlv(SEQUENCE, tlv(OCTET_STRING, b"cn") + tlv(0x31, b"")))
    return encode_message(
        message_id, tlv(m.SEARCH_RESULT_ENTRY, tlv(OCTET_STRING, dn.encode()) + attributes)
    )


class FakeUpstream:
    """A threaded fake LDAPS server on loopback; see the module docstring."""

    def __init__(self, ca: CertificateAuthority, workdir: Path) -> None:
        cert, key = ca.issue("localhost", dns_names=["localhost"], ip_addresses=[LOOPBACK]).write(
            workdir, "fakeupstream"
        )
        self._context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._context.load_cert_chain(cert, key)
        self._listener: socket.socket | None = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._accepted = 0
        self.port = 0
        #: Every request received, in order (all connections).
        self.requests: list[Request] = []
        #: Connections that completed the TLS handshake.
        self.handshakes = 0
        #: The numbers of the connections that ended (closed or reset by the peer, or
        #: stopped), as in :attr:`Request.connection`.
        self.closed: set[int] = set()
        #: Unexpected errors in the server threads (for assertions and debugging).
        self.errors: list[str] = []

    @property
    def url(self) -> str:
        return f"ldaps://{LOOPBACK}:{self.port}"

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> FakeUpstream:
        listener = socket.create_server((LOOPBACK, 0))
        listener.settimeout(_POLL)
        self._listener = listener
        self.port = listener.getsockname()[1]
        self._spawn(self._accept_loop, "fakeupstream-accept")
        return self

    def stop(self) -> None:
        """Close everything and join every thread (they notice within 0.1 s).  Idempotent."""
        self._stopping.set()
        deadline = time.monotonic() + 10
        while True:
            with self._lock:
                alive = [thread for thread in self._threads if thread.is_alive()]
            if not alive:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"fake upstream threads did not stop: {alive}")
            alive[0].join(timeout=max(0.0, deadline - time.monotonic()))
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def __enter__(self) -> FakeUpstream:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def requests_for(self, base: str) -> list[Request]:
        """The searches received with baseObject ``base``."""
        with self._lock:
            return [r for r in self.requests if r.base == base]

    # -- internals ---------------------------------------------------------------------

    def _spawn(self, target: Callable[..., None], name: str, *args: object) -> None:
        thread = threading.Thread(target=target, name=name, args=args, daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._stopping.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError as error:
                if not self._stopping.is_set():
                    self.errors.append(f"accept: {error}")
                return
            with self._lock:
                self._accepted += 1
                number = self._accepted
            self._spawn(self._serve, f"fakeupstream-conn-{number}", conn, number)

    def _serve(self, raw: socket.socket, number: int) -> None:
        conn: ssl.SSLSocket | None = None
        try:
            raw.settimeout(_POLL)
            conn = self._context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
            if not self._handshake(conn):
                return
            with self._lock:
                self.handshakes += 1
            self._converse(conn, number)
        except Exception as error:  # a thread must not raise into pytest
            self.errors.append(f"connection {number}: {type(error).__name__}: {error}")
        finally:
            with self._lock:
                self.closed.add(number)
            (conn or raw).close()

    def _handshake(self, conn: ssl.SSLSocket) -> bool:
        """Complete the server side of the TLS handshake; False if it failed, took longer
        than ``_HANDSHAKE_TIMEOUT`` or the server is stopping."""
        deadline = time.monotonic() + _HANDSHAKE_TIMEOUT
        while not self._stopping.is_set() and time.monotonic() < deadline:
            try:
                conn.do_handshake()
            except TimeoutError:
                continue
            except (OSError, ssl.SSLError):
                return False  # a port check, or a peer that gave up
            return True
        return False

    def _converse(self, conn: ssl.SSLSocket, number: int) -> None:
        framer = Framer(1 << 24)
        while not self._stopping.is_set():
            try:
                data = conn.recv(65536)
            except TimeoutError:
                continue
            except (OSError, ssl.SSLError):
                return  # reset or aborted by the proxy
            if not data:
                return
            try:
                frames = framer.feed(data)
            except FramingError as error:
                self.errors.append(f"connection {number}: bad request stream: {error}")
                return
            for frame in frames:
                if not self._answer(conn, number, frame):
                    return

    def _answer(self, conn: ssl.SSLSocket, number: int, frame: Frame) -> bool:
        """Answer one request; False to end the conversation (Unbind)."""
        base = _search_base(frame.data) if frame.op == m.SEARCH_REQUEST else None
        with self._lock:
            self.requests.append(Request(number, frame.message_id, frame.op, base))
        mid = frame.message_id
        if frame.op == m.UNBIND_REQUEST:
            return False
        if frame.op == m.ABANDON_REQUEST:
            return True
        if frame.op == m.BIND_REQUEST:
            conn.sendall(_success(mid, m.BIND_RESPONSE))
        elif frame.op == m.SEARCH_REQUEST:
            if base == GARBAGE_BASE:
                conn.sendall(GARBAGE_BYTES)
            elif base == BAD_ENVELOPE_BASE:
                conn.sendall(BAD_ENVELOPE_BYTES)
            elif base == OVERSIZED_BASE:
                conn.sendall(OVERSIZED_BYTES)
            elif base:
                conn.sendall(_entry(mid, base) + _success(mid, m.SEARCH_RESULT_DONE))
            else:
                conn.sendall(_success(mid, m.SEARCH_RESULT_DONE))
        elif frame.op == m.EXTENDED_REQUEST and m.extended_request_name(frame.data) == (
            m.WHOAMI_OID
        ):
            conn.sendall(_whoami_response(mid))
        else:
            reply = m.error_for_request(mid, frame.op, m.UNWILLING_TO_PERFORM, "fake upstream")
            if reply is not None:
                conn.sendall(reply)
        return True
