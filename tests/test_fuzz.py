"""Property tests over untrusted input, in process: what clients and upstream directories
may send must never raise anything but the documented errors, never buffer without bound,
and never reach the other side other than as whole, byte-identical PDUs.

Covered, from both sides of the proxy:

* :class:`ldapproxy.ber.Framer`: any bytes in any chunking;
* every decoder of :mod:`ldapproxy.messages` that reads a PDU, and
  :func:`ldapproxy.fields.decode_fields`: random, generated and mutated PDUs, nesting
  10,000 deep and hostile lengths;
* :class:`ldapproxy.proxy_protocol.ProxyHeaderParser`: random and mutated v1/v2 headers;
* :class:`ldapproxy.session.Session`: random and mutated client streams, and random and
  mutated upstream responses delivered through a real
  :class:`ldapproxy.upstream.UpstreamProtocol`;
* :class:`ldapproxy.upstream.UpstreamProtocol` on its own, READY and during StartTLS.

Mutations are byte flips, overwrites, insertions, deletions, duplications, truncation
and rewritten BER length octets (hostile, huge and off-by-one) of real PDUs built with the
builders of :mod:`support.fakes`, and structural edits (elements deleted, duplicated,
replaced, retagged, emptied or grafted, lengths re-encoded) that reach the decoders' inner
checks.

The bug these properties found is kept as explicit examples: see WRITE_AFTER_CLOSE.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import ipaddress
import itertools
import struct
import types
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from support.fakes import (
    PAGED_RESULTS_CONTROL,
    FakeUpstream,
    abandon_request,
    connection_done,
    make_session,
    request,
    result,
    search_entry,
    search_request,
    starttls_request,
)
from support.mutations import HOSTILE_LENGTHS, INTERESTING_BYTES, ava, length_fields
from twisted.internet import defer
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from ldapproxy import messages as m
from ldapproxy.ber import (
    BOOLEAN,
    ENUMERATED,
    OCTET_STRING,
    SEQUENCE,
    BerError,
    Frame,
    Framer,
    FramingError,
    encode_integer,
    encode_length,
    encode_message,
    read_tlv,
    tlv,
)
from ldapproxy.config import ListenerTLS, UpstreamURL
from ldapproxy.fields import MAX_FILTER_DEPTH, RequestFields, decode_fields
from ldapproxy.hooks import ALLOW, OPERATIONS, Plugin, Request, Response, Verdict
from ldapproxy.proxy_protocol import (
    DEFAULT_MAX_V2_LENGTH,
    V1_MAX_LENGTH,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderParser,
    ProxyProtocolError,
)
from ldapproxy.session import SessionState
from ldapproxy.upstream import UPSTREAM_MAX_PDU_BYTES, UpstreamProtocol, UpstreamState

#: The largest PDU header: tag, 0x84 and four length octets.
MAX_HEADER = 6

# -- a corpus of real PDUs ---------------------------------------------------------------------


#: Every filter choice, nested, with a password attribute and non-UTF-8 bytes.
FILTER = tlv(
    0xA0,
    ava(0xA3, b"uid", b"bob")
    + tlv(
        0xA1,
        ava(0xA5, b"uidNumber", b"1000")
        + ava(0xA6, b"uidNumber", b"2000")
        + ava(0xA8, b"sn", b"x"),
    )
    + tlv(0xA2, tlv(0x87, b"mail"))
    + tlv(
        0xA4,
        tlv(OCTET_STRING, b"cn")
        + tlv(SEQUENCE, tlv(0x80, b"a") + tlv(0x81, b"l") + tlv(0x82, b"e")),
    )
    + tlv(
        0xA9,
        tlv(0x81, b"2.5.13.5") + tlv(0x82, b"cn") + tlv(0x83, b"Al\xffce") + tlv(0x84, b"\xff"),
    )
    + ava(0xA3, b"userPassword", b"secret"),
)

#: ManageDsaIT, and an assertion control with criticality and a value.
CONTROLS = tlv(
    0xA0,
    tlv(SEQUENCE, tlv(OCTET_STRING, b"2.16.840.1.113730.3.4.2"))
    + tlv(
        SEQUENCE,
        tlv(OCTET_STRING, b"1.3.6.1.1.12") + tlv(BOOLEAN, b"\xff") + tlv(OCTET_STRING, FILTER),
    ),
)


def filtered_search(message_id: int, filter_element: bytes = FILTER) -> bytes:
    """A subtree SearchRequest with ``filter_element``, limits and two attributes."""
    body = (
        tlv(OCTET_STRING, b"ou=people,dc=example,dc=com")
        + encode_integer(2, ENUMERATED)
        + encode_integer(0, ENUMERATED)
        + encode_integer(10)
        + encode_integer(30)
        + tlv(BOOLEAN, b"\x00")
        + filter_element
        + tlv(SEQUENCE, tlv(OCTET_STRING, b"cn") + tlv(OCTET_STRING, b"mail"))
    )
    return encode_message(message_id, tlv(m.SEARCH_REQUEST, body))


def sasl_bind(message_id: int) -> bytes:
    """A SASL PLAIN BindRequest with credentials."""
    body = (
        encode_integer(3)
        + tlv(OCTET_STRING, b"")
        + tlv(0xA3, tlv(OCTET_STRING, b"PLAIN") + tlv(OCTET_STRING, b"\x00bob\x00pw"))
    )
    return encode_message(message_id, tlv(m.BIND_REQUEST, body))


def password_modify(message_id: int) -> bytes:
    """A Password Modify ExtendedRequest with a value."""
    value = tlv(SEQUENCE, tlv(0x80, b"uid=bob,ou=people,dc=example,dc=com") + tlv(0x82, b"new"))
    return m.extended_request(message_id, m.PASSWORD_MODIFY_OID, value)


#: Requests a well-behaved client may send in any order with unique message IDs: a session
#: forwards every one of them.
CLEAN_REQUESTS: dict[str, Callable[[int], bytes]] = {
    "bind": lambda i: request(i, m.BIND_REQUEST),
    "sasl-bind": sasl_bind,
    "anonymous-bind": m.anonymous_bind_request,
    "search": search_request,
    "search-filter": filtered_search,
    "search-paged": lambda i: search_request(i, controls=PAGED_RESULTS_CONTROL),
    "root-dse": lambda i: m.root_dse_search(i, (b"supportedControl",)),
    "modify": lambda i: request(i, m.MODIFY_REQUEST),
    "add": lambda i: request(i, m.ADD_REQUEST),
    "delete-controls": lambda i: request(i, m.DEL_REQUEST, controls=CONTROLS),
    "modrdn": lambda i: request(i, m.MODDN_REQUEST),
    "compare": lambda i: request(i, m.COMPARE_REQUEST),
    "whoami": lambda i: request(i, m.EXTENDED_REQUEST),
    "password-modify": password_modify,
}

#: Requests a session does not simply forward: Abandon (only for an outstanding operation),
#: StartTLS (answered by the proxy), Unbind (ends the session), and a protocolOp that is no
#: LDAP operation (a protocol error).
SPECIAL_REQUESTS: dict[str, Callable[[int], bytes]] = {
    "abandon": lambda i: abandon_request(i, max(1, i - 1)),
    "starttls": starttls_request,
    "unbind": m.unbind_request,
    "unknown-op": lambda i: request(i, 0x75),  # no LDAP operation: a protocol error
}

ALL_REQUESTS = {**CLEAN_REQUESTS, **SPECIAL_REQUESTS}


def ldap_result(code: int, diagnostic: bytes = b"") -> bytes:
    """The LDAPResult fields: resultCode, matchedDN, diagnosticMessage."""
    return encode_integer(code, ENUMERATED) + tlv(OCTET_STRING, b"") + tlv(OCTET_STRING, diagnostic)


def paged_done(message_id: int, cookie: bytes) -> bytes:
    """A SearchResultDone carrying the paged-results control with ``cookie``."""
    value = tlv(SEQUENCE, encode_integer(0) + tlv(OCTET_STRING, cookie))
    control = tlv(SEQUENCE, tlv(OCTET_STRING, m.PAGED_RESULTS_OID) + tlv(OCTET_STRING, value))
    return encode_message(message_id, tlv(m.SEARCH_RESULT_DONE, ldap_result(0)), tlv(0xA0, control))


def entry_with_attributes(message_id: int) -> bytes:
    """A SearchResultEntry with two attributes."""
    attributes = tlv(
        SEQUENCE, tlv(OCTET_STRING, b"cn") + tlv(0x31, tlv(OCTET_STRING, b"Bob"))
    ) + tlv(SEQUENCE, tlv(OCTET_STRING, b"mail") + tlv(0x31, b""))
    body = tlv(OCTET_STRING, b"uid=bob,ou=people,dc=example,dc=com") + tlv(SEQUENCE, attributes)
    return encode_message(message_id, tlv(m.SEARCH_RESULT_ENTRY, body))


RESPONSES: dict[str, Callable[[int], bytes]] = {
    "bind-ok": lambda i: result(i, m.BIND_RESPONSE),
    "bind-fail": lambda i: result(i, m.BIND_RESPONSE, 49, "invalid credentials"),
    "sasl-in-progress": lambda i: encode_message(
        i, tlv(m.BIND_RESPONSE, ldap_result(m.SASL_BIND_IN_PROGRESS) + tlv(0x87, b"challenge"))
    ),
    "entry": search_entry,
    "entry-attributes": entry_with_attributes,
    "reference": lambda i: encode_message(
        i, tlv(m.SEARCH_RESULT_REFERENCE, tlv(OCTET_STRING, b"ldap://other/dc=example,dc=com"))
    ),
    "done": lambda i: result(i, m.SEARCH_RESULT_DONE),
    "done-paged": lambda i: paged_done(i, b"cookie-1"),
    "done-paged-last": lambda i: paged_done(i, b""),
    "modify": lambda i: result(i, m.MODIFY_RESPONSE, 50, "insufficient access"),
    "add": lambda i: result(i, m.ADD_RESPONSE),
    "delete": lambda i: result(i, m.DEL_RESPONSE, 32),
    "moddn": lambda i: result(i, m.MODDN_RESPONSE),
    "compare": lambda i: result(i, m.COMPARE_RESPONSE, 6),
    "extended": lambda i: encode_message(
        i, tlv(m.EXTENDED_RESPONSE, ldap_result(0) + tlv(0x8B, b"dn:uid=bob,dc=example,dc=com"))
    ),
    "extended-named": lambda i: m.extended_response(i, 0, "", m.STARTTLS_OID),
    "intermediate": lambda i: encode_message(
        i, tlv(m.INTERMEDIATE_RESPONSE, tlv(0x80, b"1.3.6.1.4.1.4203.1.9.1.4") + tlv(0x81, b"v"))
    ),
    "notice": lambda _: m.notice_of_disconnection(m.UNAVAILABLE, "going down"),
}

#: One of each PDU, at a few message IDs (the decoders' corpus).
CORPUS: list[bytes] = [
    build(message_id)
    for build in [*ALL_REQUESTS.values(), *RESPONSES.values()]
    for message_id in (1, 300, 2**31 - 1)
] + [filtered_search(7, tlv(0xA2, tlv(0xA2, tlv(0xA0, b"")))), search_request(5, b"", 0)]

# -- mutations -----------------------------------------------------------------------------------

_bytes = st.one_of(st.sampled_from(INTERESTING_BYTES), st.integers(0, 255))


def mutate(draw: st.DrawFn, data: bytes, max_edits: int = 4) -> bytes:
    """``data`` with 1 to ``max_edits`` random edits."""
    buf = bytearray(data)
    edits = draw(st.one_of(st.just(1), st.integers(1, max_edits)), label="edits")
    for _ in range(edits):
        if not buf:
            buf += draw(st.binary(min_size=1, max_size=8))
            continue
        kind = draw(
            st.sampled_from(["flip", "set", "insert", "delete", "truncate", "duplicate", "length"]),
            label="kind",
        )
        pos = draw(st.integers(0, len(buf) - 1), label="position")
        if kind == "flip":
            buf[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            buf[pos] = draw(_bytes)
        elif kind == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete":
            del buf[pos : pos + draw(st.integers(1, 8))]
        elif kind == "truncate":
            del buf[pos:]
        elif kind == "duplicate":
            buf[pos:pos] = buf[pos : pos + draw(st.integers(1, 16))]
        else:
            fields = length_fields(bytes(buf))
            if not fields:
                continue
            start, end = draw(st.sampled_from(fields), label="length field")
            first = buf[start]
            old = first if first < 0x80 else int.from_bytes(buf[start + 1 : end], "big")
            buf[start:end] = draw(
                st.one_of(
                    st.sampled_from(HOSTILE_LENGTHS),
                    st.integers(-3, 3).map(lambda d, old=old: encode_length(max(0, old + d))),
                    st.just(bytes((0x82,)) + old.to_bytes(2, "big"))
                    if old < 65536
                    else st.nothing(),
                ),
                label="length",
            )
    return bytes(buf)


def content_of(pdu: bytes) -> bytes:
    """The content octets of a (valid) PDU's envelope."""
    return pdu[read_tlv(pdu, 0, len(pdu))[1] :]


def envelope_of(pdu: bytes) -> tuple[int, int]:
    """``(message ID, protocolOp tag)`` of a valid PDU, read independently of the framer."""
    _, start, end = read_tlv(pdu, 0, len(pdu))
    _, id_start, id_end = read_tlv(pdu, start, end)
    return int.from_bytes(pdu[id_start:id_end], "big", signed=True), pdu[id_end]


@st.composite
def mutated_pdus(draw: st.DrawFn) -> bytes:
    """A corpus PDU, mutated as a whole, inside its envelope (fixed up, so that the
    mutation reaches the inner decoders), or restructured."""
    pdu = draw(st.sampled_from(CORPUS), label="pdu")
    how = draw(st.sampled_from(["bytes", "fix envelope", "tree", "tree"]), label="how")
    if how == "tree":
        return draw(restructured_pdus(pdu))
    if how == "fix envelope":
        return tlv(SEQUENCE, mutate(draw, content_of(pdu)))
    return mutate(draw, pdu)


#: Tags of every protocolOp, and of elements inside them.
OP_TAGS = sorted({*m.REQUEST_NAMES, *m.RESPONSE_TAGS})
_tags = st.one_of(
    st.sampled_from(
        [0x01, 0x02, 0x04, 0x0A, 0x30, 0x31, *range(0x80, 0x8C), *range(0xA0, 0xAA), *OP_TAGS]
    ),
    st.integers(0, 255),
)
_elements = st.recursive(
    st.builds(
        tlv, _tags, st.one_of(st.binary(max_size=12), st.sampled_from([b"", b"\x00", b"\x03"]))
    ),
    lambda children: st.builds(
        lambda tag, parts: tlv(tag, b"".join(parts)), _tags, st.lists(children, max_size=4)
    ),
    max_leaves=12,
)
_message_ids = st.one_of(
    st.integers(0, 8), st.integers(0, 2**31 - 1), st.integers(-3, -1), st.just(2**31)
)


@st.composite
def generated_pdus(draw: st.DrawFn) -> bytes:
    """An LDAPMessage envelope around a random protocolOp built of random elements, and
    random controls: random bytes that get past the envelope checks."""
    op = draw(st.sampled_from(OP_TAGS) | st.integers(0, 255), label="op")
    body = b"".join(draw(st.lists(_elements, max_size=5), label="body"))
    if op in (m.ABANDON_REQUEST, m.UNBIND_REQUEST) and draw(st.booleans()):
        body = draw(st.binary(max_size=9))  # primitive operations
    controls = draw(
        st.one_of(
            st.just(b""),
            _elements,
            st.lists(_elements, max_size=3).map(lambda parts: tlv(0xA0, b"".join(parts))),
        ),
        label="controls",
    )
    return encode_message(draw(_message_ids, label="message ID"), tlv(op, body), controls)


def parse_tree(buf: bytes) -> list[list[Any]]:
    """A (valid) BER buffer as ``[tag, content]`` nodes; content is the list of child nodes
    for constructed elements that parse, else the raw bytes."""
    nodes: list[list[Any]] = []
    pos = 0
    while pos < len(buf):
        tag, start, stop = read_tlv(buf, pos, len(buf))
        value: Any = buf[start:stop]
        if tag & 0x20:
            with contextlib.suppress(BerError):
                value = parse_tree(value)
        nodes.append([tag, value])
        pos = stop
    return nodes


def serialize(nodes: list[list[Any]]) -> bytes:
    """The BER encoding of ``nodes``, every length recomputed."""
    return b"".join(
        tlv(tag, serialize(value) if isinstance(value, list) else value) for tag, value in nodes
    )


def tree_slots(nodes: list[list[Any]]) -> list[tuple[list[list[Any]], int]]:
    """``(siblings, index)`` of every node of a tree, depth first."""
    slots = []
    stack = [nodes]
    while stack:
        siblings = stack.pop()
        for index, (_, value) in enumerate(siblings):
            slots.append((siblings, index))
            if isinstance(value, list):
                stack.append(value)
    return slots


#: INTEGER and ENUMERATED contents at the edges: scopes, versions, limits, message IDs.
EDGE_NUMBERS = [
    encode_integer(n)[2:]
    for n in (-(2**63), -(2**31) - 1, -1, 0, 1, 2, 3, 4, 5, 127, 128, 255, 256, 2**31 - 1, 2**31)
] + [b"", b"\x00" * 9, b"\x7f" + b"\xff" * 8]
_numbers = st.sampled_from(EDGE_NUMBERS)

_contents = st.one_of(
    st.sampled_from([b"", b"\x00", b"\x01", b"\xff", b"\x80\x00\x00\x00", b"\x7f" * 9]),
    st.binary(max_size=10),
)


@st.composite
def restructured_pdus(draw: st.DrawFn, pdu: bytes | None = None) -> bytes:
    """A corpus PDU (or ``pdu``) with elements deleted, duplicated, replaced, inserted,
    retagged, emptied, given edge-case numbers or grafted from another PDU, every length
    then re-encoded: PDUs that are well-formed BER but not what RFC 4511 says, reaching
    the decoders' inner checks."""
    if pdu is None:
        pdu = draw(st.sampled_from(CORPUS), label="pdu")
    tree = parse_tree(pdu)
    for _ in range(draw(st.integers(1, 3), label="edits")):
        slots = tree_slots(tree)
        siblings, index = slots[draw(st.integers(0, len(slots) - 1), label="element")]
        action = draw(
            st.sampled_from(
                ["delete", "duplicate", "replace", "insert", "retag", "content", "number", "graft"]
            ),
            label="action",
        )
        if action == "delete":
            del siblings[index]
        elif action == "duplicate":
            siblings.insert(index, copy.deepcopy(siblings[index]))
        elif action in ("replace", "insert"):
            node = [draw(_tags), draw(_contents)]
            if action == "replace":
                siblings[index] = node
            else:
                siblings.insert(index, node)
        elif action == "retag":
            siblings[index][0] = draw(_tags)
        elif action == "content":
            siblings[index][1] = draw(_contents)
        elif action == "number":
            numbers = [slot for slot in slots if slot[0][slot[1]][0] in (0x02, 0x0A)]
            if numbers:
                siblings, index = numbers[draw(st.integers(0, len(numbers) - 1))]
                siblings[index][1] = draw(_numbers)
        else:
            donor = tree_slots(parse_tree(draw(st.sampled_from(CORPUS))))
            donor_siblings, donor_index = donor[draw(st.integers(0, len(donor) - 1))]
            siblings[index] = donor_siblings[donor_index]
        if not tree:
            tree.append([SEQUENCE, []])
    return serialize(tree)


# -- helpers -------------------------------------------------------------------------------------


def record(text: str) -> None:
    """A Hypothesis event (see --hypothesis-show-statistics), also outside of a test."""
    with contextlib.suppress(InvalidArgument):
        event(text)


def whole_pdus(data: bytes) -> list[Frame]:
    """``data`` split into PDUs; fails unless it is nothing but whole, well-formed PDUs."""
    framer = Framer(1 << 30)
    try:
        frames = framer.feed(data)
    except FramingError as error:
        pytest.fail(f"not a sequence of LDAP PDUs ({error}): {data[:64]!r}")
    assert framer.buffered == 0, f"{framer.buffered} trailing byte(s) after the last PDU"
    return frames


def reference_frames(
    stream: bytes, limit: int
) -> tuple[list[tuple[int, Frame]], tuple[int, type[Exception], str] | None]:
    """Frame ``stream`` one byte at a time: ``([(end offset, frame)...], error)`` where
    ``error`` is ``(index of the byte that revealed it, type, message)`` or None."""
    framer = Framer(limit)
    frames: list[tuple[int, Frame]] = []
    for index in range(len(stream)):
        try:
            found = framer.feed(stream[index : index + 1])
        except FramingError as error:
            return frames, (index, type(error), str(error))
        frames.extend((index + 1, frame) for frame in found)
    return frames, None


def chunked(stream: bytes, cuts: list[int]) -> list[bytes]:
    """``stream`` split at ``cuts`` (taken modulo its length + 1; empty chunks kept)."""
    bounds = sorted(c % (len(stream) + 1) for c in cuts)
    edges = [0, *bounds, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(edges)]


def is_subsequence(items: list[bytes], sequence: list[bytes]) -> bool:
    """Whether ``items`` appear in ``sequence`` in order (not necessarily adjacent)."""
    remaining = iter(sequence)
    return all(any(item == candidate for candidate in remaining) for item in items)


def is_notice(frame: Frame) -> bool:
    """Whether ``frame`` is a Notice of Disconnection (judged as the session does)."""
    if frame.message_id != 0 or frame.op != m.EXTENDED_RESPONSE:
        return False
    try:
        return m.extended_response_name(frame.data) == m.NOTICE_OF_DISCONNECTION_OID
    except BerError:
        return False


def is_starttls(frame: Frame) -> bool:
    """Whether ``frame`` is a StartTLS request (judged as the session does)."""
    if frame.op != m.EXTENDED_REQUEST:
        return False
    try:
        return m.extended_request_name(frame.data) == m.STARTTLS_OID
    except BerError:
        return False


def notice_code(frame: Frame) -> int | None:
    """The resultCode of a Notice of Disconnection, None for any other PDU."""
    if not is_notice(frame):
        return None
    try:
        return m.result_code(frame.data)
    except BerError:
        return None


@contextlib.contextmanager
def no_logged_failures() -> Iterator[None]:
    """Fail if anything logs a failure (a traceback) meanwhile: an exception that a
    Deferred or Twisted caught instead of letting it escape."""
    failures: list[LogEvent] = []

    def observe(event: LogEvent) -> None:
        if event.get("log_failure") is not None or event.get("isError"):
            failures.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        yield
    finally:
        globalLogPublisher.removeObserver(observe)
    if failures:
        failure = failures[0].get("log_failure")
        pytest.fail(failure.getTraceback() if failure is not None else formatEvent(failures[0]))


def assert_no_failed_deferreds(deferreds: list[defer.Deferred[Any]]) -> None:
    """None of ``deferreds`` holds a failure: no callback of the session raised."""
    failures: list[Failure] = []
    for d in deferreds:
        d.addErrback(failures.append)
    assert not failures, failures[0].getTraceback()


class AllFields(Plugin):
    """Asks for the fields of every operation, decides every request and observes every
    response: the session's plugin path, decode_fields included, on every PDU."""

    request_fields = frozenset(OPERATIONS)

    def __init__(self) -> None:
        self.seen: list[Request] = []
        self.responses: list[Response] = []

    def request(self, request: Request) -> Verdict:
        self.seen.append(request)
        return ALLOW

    def response(self, response: Response) -> None:
        self.responses.append(response)


class TLSTransport(StringTransport):
    """A StringTransport with the startTLS an upstream connection calls."""

    def __init__(self) -> None:
        super().__init__()
        self.tls_started = False

    def startTLS(self, context: Any) -> None:
        self.tls_started = True


def upstream_connection(
    clock: Clock, state: UpstreamState
) -> tuple[UpstreamProtocol, TLSTransport]:
    """A real UpstreamProtocol on a StringTransport, in ``state`` (READY or STARTTLS)."""
    scheme = "ldap" if state is UpstreamState.STARTTLS else "ldaps"
    verifier: Any = types.SimpleNamespace(failure=None, leaf=None)
    protocol = UpstreamProtocol(UpstreamURL(scheme, "dc1.example.com", 636), verifier, clock)
    # A connection lost before READY fails this Deferred; the pool would consume that.
    protocol.ready.addErrback(lambda _: None)
    transport = TLSTransport()
    protocol.makeConnection(transport)
    if state is UpstreamState.READY:
        protocol.state = UpstreamState.READY  # as after a verified handshake
    assert protocol.state is state
    return protocol, transport


# -- the framer ----------------------------------------------------------------------------------

FRAMER_LIMITS = [8, 64, 300, 1024, 1 << 20, UPSTREAM_MAX_PDU_BYTES]


@st.composite
def framer_streams(draw: st.DrawFn) -> tuple[list[bytes], bytes]:
    """``(valid PDUs, stream)``: the stream starts with those PDUs, then anything."""
    valid = draw(st.lists(st.sampled_from(CORPUS) | generated_pdus(), max_size=5), label="valid")
    valid = [pdu for pdu in valid if whole_pdus_or_none(pdu)]
    tail = draw(
        st.one_of(
            st.binary(max_size=200),
            mutated_pdus(),
            generated_pdus(),
            st.builds(
                lambda n, rest: b"\x30" + bytes((0x80 | n,)) + rest,
                st.integers(0, 127),
                st.binary(max_size=10),
            ),
            st.just(b""),
        ),
        label="tail",
    )
    return valid, b"".join(valid) + tail


def whole_pdus_or_none(pdu: bytes) -> bool:
    """Whether ``pdu`` is one PDU the framer accepts (generated ones may have ID < 0)."""
    try:
        frames = Framer(1 << 30).feed(pdu)
    except FramingError:
        return False
    return len(frames) == 1


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    case=framer_streams(),
    limit=st.sampled_from(FRAMER_LIMITS),
    cuts=st.lists(st.integers(0, 10_000), max_size=30),
)
def test_framer_any_bytes_any_chunking(
    case: tuple[list[bytes], bytes], limit: int, cuts: list[int]
) -> None:
    """Any stream, in any chunking: only FramingError (PDUTooLarge included) is raised, by
    the chunk holding the byte that reveals it, with the same message; the frames are the
    same as fed one byte at a time, byte-identical and contiguous; valid PDUs at the start
    come back unchanged; and the framer never buffers as much as max_pdu_bytes (or, for a
    partial header, 6 bytes)."""
    valid, stream = case
    expected, error = reference_frames(stream, limit)

    # One byte at a time: the frames tile the stream from its start, and the PDUs known to
    # be valid (up to the first one over the limit) come back first, byte-identical.
    tiled = expected[-1][0] if expected else 0
    assert b"".join(frame.data for _, frame in expected) == stream[:tiled]
    fitting = list(itertools.takewhile(lambda pdu: len(pdu) <= limit, valid))
    assert [frame.data for _, frame in expected[: len(fitting)]] == fitting
    for (_, frame), pdu in zip(expected, fitting, strict=False):
        assert (frame.message_id, frame.op) == envelope_of(pdu)

    framer = Framer(limit)
    got: list[Frame] = []
    offset = 0
    raised: FramingError | None = None
    for chunk in chunked(stream, cuts):
        try:
            frames = framer.feed(chunk)
        except FramingError as caught:
            raised = caught
            break
        got.extend(frames)
        offset += len(chunk)
        assert framer.buffered < max(limit, MAX_HEADER), "buffered more than one PDU's worth"
        assert framer.buffered == offset - sum(len(frame.data) for frame in got)
    if raised is None:
        assert error is None, f"byte-wise feeding raised {error}, chunked did not"
        assert got == [frame for _, frame in expected]
    else:
        assert error is not None, f"chunked feeding raised {raised!r}, byte-wise did not"
        index, kind, message = error
        assert offset <= index < offset + len(chunk), "raised by the wrong chunk"
        assert (type(raised), str(raised)) == (kind, message)
        assert got == [frame for end, frame in expected if end <= offset]


# -- the PDU decoders -----------------------------------------------------------------------------


def pdu_decoders() -> dict[str, Callable[[bytes], Any]]:
    """Every function of ldapproxy.messages that reads a PDU (first parameter ``pdu``)."""
    found = {}
    for name, function in inspect.getmembers(m, inspect.isfunction):
        if function.__module__ != m.__name__:
            continue
        parameters = list(inspect.signature(function).parameters)
        if parameters[:1] == ["pdu"]:
            found[name] = function
    return found


DECODERS = pdu_decoders()

#: What each decoder returns, when it does not raise BerError.
RESULT_TYPES: dict[str, Callable[[Any], bool]] = {
    "extended_request_name": lambda v: isinstance(v, bytes),
    "extended_response_name": lambda v: v is None or isinstance(v, bytes),
    "result_code": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "is_root_dse_read": lambda v: isinstance(v, bool),
    "is_anonymous_bind": lambda v: isinstance(v, bool),
    "request_control_oids": lambda v: isinstance(v, list) and all(isinstance(o, bytes) for o in v),
    "paged_results_cookie": lambda v: v is None or isinstance(v, bytes),
    "is_simple_bind": lambda v: isinstance(v, bool),
    "is_sasl_bind": lambda v: isinstance(v, bool),
    "abandon_target": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "_protocol_op": lambda v: isinstance(v, tuple) and len(v) == 3,
}

#: decode_fields is asked with each operation the proxy knows, and with unknown ones.
FIELD_OPS = [*m.REQUEST_NAMES, 0x75, 0x61]


def test_every_pdu_decoder_is_covered() -> None:
    """The decoders found are those the session and the upstream side use (a decoder that
    is added later is fuzzed automatically; its result type should be added above)."""
    assert set(RESULT_TYPES) <= set(DECODERS), set(RESULT_TYPES) - set(DECODERS)


def decode_everything(pdu: bytes) -> None:
    """Run every decoder on ``pdu``: each returns a value of its type or raises BerError."""
    for name, decoder in DECODERS.items():
        try:
            value = decoder(pdu)
        except BerError:
            continue
        record(f"{name} returned")
        assert RESULT_TYPES.get(name, lambda _: True)(value), (name, value)
        if isinstance(value, bytes):
            assert value in pdu, (name, value)
        if isinstance(value, list):
            assert all(oid in pdu for oid in value), (name, value)
    for op in FIELD_OPS:
        try:
            fields = decode_fields(op, pdu)
        except BerError:
            continue
        record(f"decode_fields {m.REQUEST_NAMES.get(op, 'other')} returned")
        assert isinstance(fields, RequestFields)
        assert pdu[0] == SEQUENCE


def test_corpus_is_valid() -> None:
    """Every corpus PDU frames as one PDU, and the requests decode to fields."""
    for pdu in CORPUS:
        (frame,) = whole_pdus(pdu)
        if frame.op in m.REQUEST_NAMES:
            assert isinstance(decode_fields(frame.op, pdu), RequestFields)
        decode_everything(pdu)
    assert m.request_control_oids(request(1, m.DEL_REQUEST, controls=CONTROLS)) == [
        b"2.16.840.1.113730.3.4.2",
        b"1.3.6.1.1.12",
    ]
    assert m.paged_results_cookie(paged_done(1, b"c")) == b"c"


@settings(max_examples=600, deadline=None)
@given(pdu=st.one_of(st.binary(max_size=120), generated_pdus()))
def test_decoders_on_random_and_generated_pdus(pdu: bytes) -> None:
    """Random bytes, and random elements in a valid envelope: BerError or a value."""
    decode_everything(pdu)


@settings(max_examples=1500, deadline=None)
@given(pdu=mutated_pdus())
def test_decoders_on_mutated_pdus(pdu: bytes) -> None:
    """Real PDUs with bytes flipped, inserted, deleted, duplicated, truncated or lengths
    rewritten: BerError or a value."""
    decode_everything(pdu)


def test_decoders_on_every_hostile_length() -> None:
    """Each length field of each corpus PDU replaced with each hostile length (envelope
    fixed up and not): BerError or a value, never IndexError or OverflowError."""
    for pdu in CORPUS:
        content = content_of(pdu)
        for start, end in length_fields(content):
            for length in HOSTILE_LENGTHS:
                mutated = content[:start] + length + content[end:]
                decode_everything(tlv(SEQUENCE, mutated))
                decode_everything(pdu[: len(pdu) - len(content)] + mutated)
        for start, end in length_fields(pdu)[:1]:
            for length in HOSTILE_LENGTHS:
                decode_everything(pdu[:start] + length + pdu[end:])


def single_structural_edits(pdu: bytes) -> Iterator[bytes]:
    """``pdu`` with one element deleted, emptied, zeroed or duplicated, or one INTEGER or
    ENUMERATED given each edge-case value; every length re-encoded."""
    for position, (original, at) in enumerate(tree_slots(parse_tree(pdu))):
        edits: list[Callable[[list[list[Any]], int], None]] = [
            lambda siblings, index: siblings.__delitem__(index),
            lambda siblings, index: siblings[index].__setitem__(1, b""),
            lambda siblings, index: siblings[index].__setitem__(1, b"\x00"),
            lambda siblings, index: siblings.insert(index, copy.deepcopy(siblings[index])),
        ]
        if original[at][0] in (0x02, 0x0A, m.ABANDON_REQUEST):
            edits += [
                lambda siblings, index, n=number: siblings[index].__setitem__(1, n)
                for number in EDGE_NUMBERS
            ]
        for edit in edits:
            tree = parse_tree(pdu)
            siblings, index = tree_slots(tree)[position]
            edit(siblings, index)
            yield serialize(tree)


def test_decoders_on_every_single_structural_edit() -> None:
    """Each element of each corpus PDU deleted, emptied, zeroed or duplicated, and each
    INTEGER, ENUMERATED and abandoned message ID set to each edge value (an out-of-range
    scope, a negative version, a nine-octet integer...): BerError or a value."""
    edited = 0
    for pdu in CORPUS:
        for variant in single_structural_edits(pdu):
            decode_everything(variant)
            edited += 1
    assert edited > 5_000


def nested(tags: list[int], inner: bytes) -> bytes:
    """``inner`` wrapped in one element per tag, the first tag outermost; built without
    quadratic copying."""
    headers = []
    size = len(inner)
    for tag in reversed(tags):
        header = bytes((tag,)) + encode_length(size)
        headers.append(header)
        size += len(header)
    return b"".join(reversed(headers)) + inner


@pytest.mark.parametrize(
    "tags",
    [
        pytest.param([0xA2] * 10_000, id="not"),
        pytest.param([0xA0] * 10_000, id="and"),
        pytest.param([0xA1] * 10_000, id="or"),
        pytest.param([0xA0, 0xA1, 0xA2] * 3_334, id="mixed"),
    ],
)
def test_filter_nested_10000_deep_is_ber_error(tags: list[int]) -> None:
    """A filter nested 10,000 deep raises BerError (not RecursionError); so does every
    depth past the limit, and every decoder survives it."""
    pdu = filtered_search(3, nested(tags, tlv(0x87, b"cn")))
    assert len(pdu) > 30_000
    with pytest.raises(BerError, match="nested"):
        decode_fields(m.SEARCH_REQUEST, pdu)
    decode_everything(pdu)
    (frame,) = whole_pdus(pdu)
    assert frame.op == m.SEARCH_REQUEST
    # The limit itself still decodes; one level more is refused.
    within = filtered_search(3, nested(tags[:MAX_FILTER_DEPTH], tlv(0x87, b"cn")))
    beyond = filtered_search(3, nested(tags[: MAX_FILTER_DEPTH + 1], tlv(0x87, b"cn")))
    assert decode_fields(m.SEARCH_REQUEST, within).filter is not None
    with pytest.raises(BerError, match="nested"):
        decode_fields(m.SEARCH_REQUEST, beyond)


def test_constructed_elements_nested_10000_deep_everywhere() -> None:
    """10,000 nested constructed elements in every position a decoder reads (the op,
    controls, a control, an attribute list, a substring, a bind's SASL part)."""
    deep = nested([0x30] * 10_000, b"")
    pdus = [
        encode_message(1, tlv(m.SEARCH_REQUEST, deep)),
        encode_message(
            1,
            tlv(
                m.BIND_REQUEST,
                encode_integer(3) + tlv(OCTET_STRING, b"") + nested([0xA3] * 10_000, b""),
            ),
        ),
        encode_message(1, tlv(m.DEL_REQUEST, b"cn=x"), nested([0xA0] * 10_000, b"")),
        encode_message(1, tlv(m.DEL_REQUEST, b"cn=x"), tlv(0xA0, deep)),
        encode_message(
            1,
            tlv(m.SEARCH_RESULT_DONE, ldap_result(0)),
            tlv(
                0xA0,
                tlv(SEQUENCE, tlv(OCTET_STRING, m.PAGED_RESULTS_OID) + tlv(OCTET_STRING, deep)),
            ),
        ),
        encode_message(1, tlv(m.ADD_REQUEST, tlv(OCTET_STRING, b"cn=x") + deep)),
        filtered_search(
            1,
            tlv(
                0xA4, tlv(OCTET_STRING, b"cn") + tlv(SEQUENCE, nested([0x80] + [0x30] * 9_999, b""))
            ),
        ),
        nested([0x30] * 10_000, b""),
    ]
    for pdu in pdus:
        decode_everything(pdu)
    with pytest.raises(BerError):
        decode_fields(m.SEARCH_REQUEST, pdus[0])


# -- the PROXY protocol header parser -------------------------------------------------------------

V2_FIXED = len(V2_SIGNATURE) + 4


def v2_header(fam: int, block: bytes, tlvs: bytes = b"", ver_cmd: int = 0x21) -> bytes:
    """A v2 header around an address block and TLVs."""
    body = block + tlvs
    return V2_SIGNATURE + struct.pack("!BBH", ver_cmd, fam, len(body)) + body


@st.composite
def proxy_headers(draw: st.DrawFn) -> bytes:
    """A valid v1 or v2 header (TCP4, TCP6, UNKNOWN, LOCAL, with TLVs)."""
    version = draw(st.sampled_from([4, 6]))
    src, dst = draw(st.ip_addresses(v=version)), draw(st.ip_addresses(v=version))
    sport, dport = draw(st.integers(0, 65535)), draw(st.integers(0, 65535))
    kind = draw(st.sampled_from(["v1", "v1-unknown", "v2", "v2-local"]))
    if kind == "v1":
        return f"PROXY TCP{version} {src} {dst} {sport} {dport}\r\n".encode()
    if kind == "v1-unknown":
        return b"PROXY UNKNOWN\r\n"
    n = 4 if version == 4 else 16
    block = struct.pack(f"!{n}s{n}sHH", src.packed, dst.packed, sport, dport)
    tlvs = b"".join(
        struct.pack("!BH", kind_, len(value)) + value
        for kind_, value in draw(
            st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=20)), max_size=3)
        )
    )
    if kind == "v2-local":
        return v2_header(0x00, block + tlvs, ver_cmd=0x20)
    return v2_header(0x11 if version == 4 else 0x21, block, tlvs)


#: Fields of a v1 line: protocols, addresses and ports, valid and not.
_v1_tokens = st.one_of(
    st.sampled_from(["TCP4", "TCP6", "UNKNOWN", "UDP4", "tcp4", "TCP", ""]),
    st.ip_addresses().map(str),
    st.ip_addresses(v=6).map(lambda a: a.exploded.upper()),
    st.integers(0, 70000).map(str),
    st.sampled_from(
        [
            "01",
            "+1",
            "-1",
            " 1",
            "1 ",
            "0x10",
            "1e3",
            "\u0663",
            "65536",
            "99999999999",
            "fe80::1%eth0",
            "1.2.3",
            "::ffff:1.2.3.4",
            "1.2.3.04",
        ]
    ),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12),
    st.text(max_size=4),
)


@st.composite
def proxy_streams(draw: st.DrawFn) -> bytes:
    """Random bytes, valid headers, and valid headers mutated (v2 lengths rewritten too),
    each followed by anything."""
    kind = draw(
        st.sampled_from(
            [
                "random",
                "valid",
                "mutated",
                "v2-length",
                "prefix",
                "v1-tokens",
                "v1-fields",
                "long-v1",
            ]
        )
    )
    if kind == "random":
        return draw(st.binary(max_size=300))
    if kind == "v1-tokens":
        tokens = draw(st.lists(_v1_tokens, max_size=7))
        separator = draw(st.sampled_from([" ", " ", "  ", "\t"]))
        end = draw(st.sampled_from(["\r\n", "\r\n", "\n", "\r", ""]))
        return ("PROXY " + separator.join(tokens) + end).encode("utf-8") + draw(
            st.binary(max_size=20)
        )
    if kind == "v1-fields":
        # A TCP4/TCP6 line whose four fields are each valid or, now and then, hostile.
        version = draw(st.sampled_from([4, 6]))
        valid = [
            st.ip_addresses(v=version).map(str),
            st.ip_addresses(v=version).map(str),
            st.integers(0, 65535).map(str),
            st.integers(0, 65535).map(str),
        ]
        fields = [draw(st.one_of(field, field, _v1_tokens)) for field in valid]
        line = f"PROXY TCP{version} {' '.join(fields)}\r\n"
        return line.encode("utf-8") + draw(st.binary(max_size=20))
    if kind == "long-v1":
        text = draw(
            st.text(
                st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=90, max_size=220
            )
        )
        return b"PROXY " + text.encode() + draw(st.sampled_from([b"\r\n", b""]))
    header = draw(proxy_headers())
    if kind == "mutated":
        header = mutate(draw, header)
    elif kind == "v2-length" and header.startswith(V2_SIGNATURE):
        length = draw(
            st.one_of(
                st.integers(0, 65535), st.sampled_from([0, 11, 12, 35, 36, 4096, 4097, 65535])
            )
        )
        header = header[:14] + struct.pack("!H", length) + header[16:]
    elif kind == "prefix":
        header = header[: draw(st.integers(0, len(header)))]
    return header + draw(st.binary(max_size=40))


def run_parser(chunks: list[bytes], max_v2_length: int) -> tuple[str, ProxyHeader | None, bytes]:
    """Feed ``chunks``: ``("header", header, rest + what followed)``, ``("error", None, b"")``
    or ``("incomplete", None, b"")``, checking the buffer bound after every chunk."""
    parser = ProxyHeaderParser(max_v2_length=max_v2_length)
    for index, chunk in enumerate(chunks):
        message = None
        try:
            header = parser.feed(chunk)
        except ProxyProtocolError as error:
            message = str(error)
        if message is not None:
            # The message says how, never echoing more than a few bytes of input.
            assert len(message) <= 160, message
            return "error", None, b""
        if header is not None:
            return "header", header, parser.rest + b"".join(chunks[index + 1 :])
        # The private buffer is the only place the parser holds bytes.
        buffered = bytes(parser._buffer)
        if V2_SIGNATURE.startswith(buffered[: len(V2_SIGNATURE)]) and buffered:
            assert len(buffered) < V2_FIXED + max_v2_length
        else:
            assert len(buffered) < V1_MAX_LENGTH
    return "incomplete", None, b""


@settings(max_examples=600, deadline=None)
@given(
    stream=proxy_streams(),
    cuts=st.lists(st.integers(0, 1000), max_size=12),
    max_v2_length=st.sampled_from([0, 12, 36, 100, DEFAULT_MAX_V2_LENGTH]),
)
def test_proxy_header_parser_on_random_and_mutated_headers(
    stream: bytes, cuts: list[int], max_v2_length: int
) -> None:
    """Only ProxyProtocolError is raised; the parser never holds more than a v1 line
    (107 bytes) or a v2 header of ``max_v2_length``; chunking changes nothing; and a
    header it returns holds real addresses and ports."""
    whole = run_parser([stream], max_v2_length)
    pieces = run_parser(chunked(stream, cuts), max_v2_length)
    assert pieces == whole
    kind, header, rest = whole
    if kind == "header":
        assert header is not None
        assert stream.endswith(rest)
        assert len(stream) - len(rest) <= max(V1_MAX_LENGTH, V2_FIXED + max_v2_length)
        assert (header.source is None) == (header.destination is None)
        for address in (header.source, header.destination):
            if address is not None:
                host, port = address
                assert str(ipaddress.ip_address(host)) == host
                assert 0 <= port <= 65535


# -- the session, client side ---------------------------------------------------------------------

CLIENT_MAX_PDU = 1024


@st.composite
def client_streams(draw: st.DrawFn) -> tuple[bytes, bool]:
    """``(stream, clean)``: ``clean`` streams are valid requests with unique message IDs
    and no Abandon, StartTLS or Unbind, which a session forwards in full."""
    kind = draw(
        st.sampled_from(
            ["random", "generated", "clean", "mutated", "restructured", "valid-then-random"]
        )
    )
    if kind == "random":
        return draw(st.binary(max_size=300)), False
    if kind == "generated":
        return b"".join(draw(st.lists(generated_pdus(), min_size=1, max_size=6))), False
    if kind == "clean":
        names = draw(st.lists(st.sampled_from(sorted(CLEAN_REQUESTS)), min_size=1, max_size=10))
        first = draw(st.integers(1, 2**31 - 11))
        return b"".join(CLEAN_REQUESTS[name](first + i) for i, name in enumerate(names)), True
    names = draw(st.lists(st.sampled_from(sorted(ALL_REQUESTS)), min_size=1, max_size=8))
    ids = draw(st.lists(st.integers(1, 6), min_size=len(names), max_size=len(names)))
    pdus = [ALL_REQUESTS[name](i) for name, i in zip(names, ids, strict=True)]
    if kind == "restructured":
        index = draw(st.integers(0, len(pdus) - 1))
        pdus[index] = draw(restructured_pdus(pdus[index]))
        return b"".join(pdus), False
    stream = b"".join(pdus)
    if kind == "mutated":
        return mutate(draw, stream, max_edits=draw(st.integers(1, 6))), False
    return stream + draw(st.binary(min_size=1, max_size=60)), False


_client_cases = {
    "case": client_streams(),
    "cuts": st.lists(st.integers(0, 10_000), max_size=12),
    "tls": st.sampled_from(
        [ListenerTLS.NONE, ListenerTLS.STARTTLS_OPTIONAL, ListenerTLS.STARTTLS_REQUIRED]
    ),
    "mode": st.sampled_from(["ready", "late", "fail", "needs-reset"]),
    "with_plugin": st.booleans(),
    "read_while_paused": st.booleans(),
}

#: A bug found by the property below, and fixed: a session that closed while it waited for
#: an upstream connection (close() after a Notice of Disconnection, or abort()) still
#: answered its queued requests when that acquisition failed afterwards
#: (Session._acquire_failed did not check that the session was ending), so the client was
#: written a response (unavailable) after the Notice of Disconnection and after close().
#: Minimal example 1: an anonymous Bind (ID 1) waits for the pool; while reads are paused
#: (the TLS layer delivers what it already decrypted) an Abandon reusing ID 1 arrives, a
#: protocol error; then the pool fails (NoUpstreamAvailable, or PoolBusy after
#: pool.acquire_timeout) and the BindResponse follows the notice.
WRITE_AFTER_CLOSE = {
    "case": (
        b"0\x0c\x02\x01\x01`\x07\x02\x01\x03\x04\x00\x80\x000\x06\x02\x01\x01P\x01\x01",
        False,
    ),
    "cuts": [14],
    "tls": ListenerTLS.NONE,
    "mode": "fail",
    "with_plugin": False,
    "read_while_paused": True,
}
#: Minimal example 2, in one read: an AddRequest, then a StartTLS with one byte after it
#: (the STARTTLS injection check aborts the connection); the Add was already queued for
#: the pool, and its AddResponse (unavailable) is written after abort().
WRITE_AFTER_ABORT = {
    "case": (
        b"0;\x02\x01\x01h6\x04\x1ccn=someone,dc=example,dc=com0\x160\x14\x04\x0bobjectClass1"
        b"\x05\x04\x03top0\x1d\x02\x01\x01w\x18\x80\x161.3.6.1.4.1.1466.20037\x00",
        False,
    ),
    "cuts": [],
    "tls": ListenerTLS.NONE,
    "mode": "fail",
    "with_plugin": False,
    "read_while_paused": False,
}


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@example(**WRITE_AFTER_CLOSE)
@example(**WRITE_AFTER_ABORT)
@given(**_client_cases)
def test_session_survives_any_client_stream(
    case: tuple[bytes, bool],
    cuts: list[int],
    tls: ListenerTLS,
    mode: str,
    with_plugin: bool,
    read_while_paused: bool,
) -> None:
    """Random, generated and mutated client streams in any chunking: nothing escapes
    client_data; the session stays open, or closes once with a protocolError Notice of
    Disconnection (or for an Unbind, a StartTLS injection, a request before StartTLS);
    every framing error closes it; the upstream receives only whole PDUs byte-identical to
    the client's, in order; the client only whole PDUs; after the timeouts every session
    is closed, its upstream released once and no timer left; once closed (after its
    Notice of Disconnection, if any) it writes nothing more, whatever the pool does later.

    ``mode`` is how upstream connections come: at once, later (once the session paused
    reading for one), never (acquisition fails) or needing an identity reset first.  With
    ``read_while_paused`` bytes keep coming while the session paused reading, as the TLS
    layer delivers every record it already decrypted."""
    check_client_session(case, cuts, tls, mode, with_plugin, read_while_paused)


def check_client_session(
    case: tuple[bytes, bool],
    cuts: list[int],
    tls: ListenerTLS,
    mode: str,
    with_plugin: bool,
    read_while_paused: bool,
) -> None:
    """The body of the test above."""
    stream, clean = case
    plugin = AllFields()
    h = make_session(tls, max_pdu_bytes=CLIENT_MAX_PDU, plugins=[plugin] if with_plugin else [])
    handed: list[FakeUpstream] = []
    if mode in ("ready", "needs-reset"):
        h.source.ready = FakeUpstream()
        h.source.ready.needs_reset = mode == "needs-reset"

    def upstream_progress() -> None:
        """The pool completes what the session waits for."""
        while h.source.acquiring:
            if mode == "fail":
                h.source.fail()
            else:
                handed.append(h.source.succeed())
        for _, reset in h.source.resets:
            if not reset.called:
                reset.callback(None)

    with no_logged_failures():
        fed = 0
        for chunk in chunked(stream, cuts):
            if h.session.state in (SessionState.CLOSING, SessionState.CLOSED):
                break  # the transport reads no more
            if h.client.start_tls_calls:
                break  # what follows would be TLS records, not LDAP
            if h.client.paused and not read_while_paused:
                upstream_progress()
            h.session.client_data(chunk)
            fed += len(chunk)
        upstream_progress()
        if mode in ("ready", "needs-reset"):
            handed += [h.source.ready] * len(h.source.requests)

        expected, error = reference_frames(stream[:fed], CLIENT_MAX_PDU)
        inputs = [frame for _, frame in expected]
        ending = h.session.state in (SessionState.CLOSING, SessionState.CLOSED)
        sent = [frame for upstream in dict.fromkeys(handed) for frame in upstream.frames()]
        replies = h.client.frames()
        calls = h.client.calls()  # also checks that unlink comes before any close
        ends = [call for call in calls if call in ("close", "abort")]

        record(f"session {'ended' if ending else 'open'}, {len(sent)} forwarded")
        # The upstream gets client PDUs, unchanged and in order, and never one the proxy
        # must answer or drop itself.
        assert is_subsequence([f.data for f in sent], [f.data for f in inputs])
        for frame in sent:
            assert frame.message_id != 0
            assert frame.op in m.REQUEST_NAMES
            assert frame.op != m.UNBIND_REQUEST
            assert not is_starttls(frame)
            if tls is ListenerTLS.STARTTLS_REQUIRED:  # TLS is never established here
                assert frame.op == m.ABANDON_REQUEST or m.is_root_dse_read(frame.data)

        # The client gets answers to its own message IDs, and notices.
        client_ids = {frame.message_id for frame in inputs}
        for frame in replies:
            assert frame.op in m.RESPONSE_TAGS
            assert frame.message_id in client_ids or is_notice(frame)

        if error is not None:
            assert ending, f"a framing error ({error[2]}) left the session open"
        if not ending:
            assert ends == []
        else:
            assert len(ends) == 1, calls
            events = h.client.events
            closed_at = next(i for i, e in enumerate(events) if e[0] in ("close", "abort"))
            late = [e[1] for e in events[closed_at:] if e[0] == "write"]
            assert late == [], f"wrote after closing: {calls}"
            before_close = whole_pdus(b"".join(e[1] for e in events[:closed_at] if e[0] == "write"))
            last = before_close[-1] if before_close else None
            if last is not None and is_notice(last):
                allowed = {m.PROTOCOL_ERROR}
                if tls is ListenerTLS.STARTTLS_REQUIRED:
                    allowed.add(m.CONFIDENTIALITY_REQUIRED)
                assert notice_code(last) in allowed
                assert events[closed_at - 1 : closed_at + 1] == [("write", last.data), ("close",)]
            elif ends == ["close"]:
                assert m.UNBIND_REQUEST in {frame.op for frame in inputs}, "closed silently"
            else:
                assert any(is_starttls(frame) for frame in inputs), "aborted without a StartTLS"

        if clean and tls is not ListenerTLS.STARTTLS_REQUIRED:
            assert not ending
            if mode in ("ready", "late"):
                assert [f.data for f in sent] == [f.data for f in inputs]
                assert replies == []
            elif mode == "needs-reset":
                assert [f.data for f in sent] == [f.data for f in inputs][: len(sent)]
                assert replies == []
            else:
                answered = [
                    (f.message_id, m.RESPONSE_FOR_REQUEST[f.op], m.UNAVAILABLE)
                    for f in inputs
                    if f.op in m.RESPONSE_FOR_REQUEST
                ]
                assert [(f.message_id, f.op, m.result_code(f.data)) for f in replies] == answered
        if with_plugin and not ending and tls is not ListenerTLS.STARTTLS_REQUIRED:
            # Every request reached the plugin, except StartTLS, which the proxy answers.
            decided = [f.message_id for f in inputs if not is_starttls(f)]
            assert [r.message_id for r in plugin.seen] == decided

        if ending:
            assert h.clock.getDelayedCalls() == [], "a closed session left timers running"
        # Every session ends by its timeouts, releasing its upstream exactly once.
        for _ in range(100):
            if h.session.state is SessionState.CLOSING:
                break
            pending = h.clock.getDelayedCalls()
            assert pending, "an open session without a timer: nothing would ever end it"
            h.clock.advance(max(0.0, min(c.getTime() for c in pending) - h.clock.seconds()))
        assert h.session.state is SessionState.CLOSING
        assert h.clock.getDelayedCalls() == [], "a closed session left timers running"
        assert len([c for c in h.client.calls() if c in ("close", "abort")]) == 1
        h.session.client_lost(connection_done())
        assert h.clock.getDelayedCalls() == []
        released = Counter(id(connection) for connection, _ in h.source.released)
        assert released == Counter(id(upstream) for upstream in handed)
        h.client.frames()
        assert_no_failed_deferreds(h.source.requests + [d for _, d in h.source.resets])


# -- the session, upstream side -------------------------------------------------------------------

#: Requests outstanding when the upstream's responses arrive.
UPSTREAM_REQUESTS = {
    1: search_request(1),
    2: search_request(2, controls=PAGED_RESULTS_CONTROL),
    3: request(3, m.BIND_REQUEST),
    4: request(4, m.EXTENDED_REQUEST),
    5: request(5, m.COMPARE_REQUEST),
    6: filtered_search(6),
    7: sasl_bind(7),
}
_response_ids = st.sampled_from([*UPSTREAM_REQUESTS, 0, 8, 99, 2**31 - 1])


@st.composite
def upstream_streams(draw: st.DrawFn) -> bytes:
    """Responses to the outstanding requests (and others), valid, mutated or random."""
    kind = draw(
        st.sampled_from(
            ["valid", "mutated", "restructured", "random", "generated", "valid-then-random"]
        )
    )
    if kind == "random":
        return draw(st.binary(max_size=300))
    if kind == "generated":
        return b"".join(draw(st.lists(generated_pdus(), min_size=1, max_size=6)))
    responses = draw(
        st.lists(st.tuples(st.sampled_from(sorted(RESPONSES)), _response_ids), max_size=12)
    )
    pdus = [RESPONSES[name](i) for name, i in responses]
    if kind == "restructured" and pdus:
        index = draw(st.integers(0, len(pdus) - 1))
        pdus[index] = draw(restructured_pdus(pdus[index]))
    stream = b"".join(pdus)
    if kind == "mutated":
        return mutate(draw, stream or b"\x30", max_edits=draw(st.integers(1, 6)))
    if kind == "valid-then-random":
        return stream + draw(st.binary(min_size=1, max_size=40))
    return stream


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    stream=upstream_streams(),
    cuts=st.lists(st.integers(0, 10_000), max_size=12),
    passes=st.lists(st.booleans(), max_size=13),
    bind_first=st.booleans(),
    needs_reset=st.booleans(),
    with_plugin=st.booleans(),
    lose_at_end=st.booleans(),
)
def test_session_survives_any_upstream_stream(
    stream: bytes,
    cuts: list[int],
    passes: list[bool],
    bind_first: bool,
    needs_reset: bool,
    with_plugin: bool,
    lose_at_end: bool,
) -> None:
    """Random, generated and mutated responses from the upstream, through a real
    UpstreamProtocol, to a session with operations outstanding: nothing escapes; the
    client receives whole PDUs only, each one the upstream sent (in order, for a message
    ID still outstanding or 0) or the proxy's own notice; a framing error from the
    upstream aborts the connection and ends the session with one notice (none if the
    upstream's own notice got through), and nothing else ends it."""
    plugin = AllFields()
    h = make_session(ListenerTLS.NONE, plugins=[plugin] if with_plugin else [])
    protocol, transport = upstream_connection(h.clock, UpstreamState.READY)
    protocol.needs_reset = needs_reset
    h.source.ready = protocol
    order = sorted(UPSTREAM_REQUESTS, key=lambda i: (i != 3, i) if bind_first else (0, i))

    def pool_resets() -> None:
        """The pool completes identity resets (its own anonymous Bind succeeded)."""
        for _, reset in h.source.resets:
            if not reset.called:
                reset.callback(None)

    with no_logged_failures():
        h.send(*(UPSTREAM_REQUESTS[i] for i in order))
        assert h.session.outstanding == len(UPSTREAM_REQUESTS)
        pool_resets()
        h.client.events.clear()
        delivered = 0
        for index, chunk in enumerate(chunked(stream, cuts)):
            if transport.disconnected or h.session.state is not SessionState.PLAINTEXT:
                break  # an aborted connection reads no more; a released one is the pool's
            protocol.dataReceived(chunk)
            delivered += len(chunk)
            if index < len(passes) and passes[index]:
                h.clock.advance(0)  # the end of a reactor pass: delivery
                pool_resets()
        h.clock.advance(0)
        lost = transport.disconnected or lose_at_end
        if lost:
            protocol.connectionLost(Failure(ConnectionLost()))
        pool_resets()

        expected, error = reference_frames(stream[:delivered], UPSTREAM_MAX_PDU_BYTES)
        upstream_pdus = [frame.data for _, frame in expected]
        replies = h.client.frames()
        calls = h.client.calls()  # also checks that unlink comes before any close

        from_upstream = [f for f in replies if f.data in upstream_pdus]
        own = [f for f in replies if f.data not in upstream_pdus]
        record(f"{'lost' if lost else 'open'}, {min(len(from_upstream), 3)}+ passed to the client")
        assert is_subsequence([f.data for f in from_upstream], upstream_pdus)
        finished: set[int] = set()
        for frame in from_upstream:
            assert frame.message_id in UPSTREAM_REQUESTS or frame.message_id == 0
            assert frame.message_id not in finished, "a response after the final one"
            if frame.op in m.FINAL_RESPONSES and frame.message_id != 0:
                finished.add(frame.message_id)
        for frame in own:
            assert notice_code(frame) == m.UNAVAILABLE, frame

        assert transport.disconnected == (error is not None), "aborted iff framing failed"
        if lost:
            assert h.session.state is SessionState.CLOSING
            upstream_notice = any(is_notice(f) for f in from_upstream)
            assert len(own) == (0 if upstream_notice else 1), "one notice of disconnection"
            assert calls[-1] == "close"
            assert [connection for connection, _ in h.source.released] == [protocol]
        else:
            assert h.session.state is SessionState.PLAINTEXT
            assert own == []
            assert "close" not in calls
        if with_plugin:
            assert len(plugin.seen) == len(UPSTREAM_REQUESTS)
        assert_no_failed_deferreds(h.source.requests + [d for _, d in h.source.resets])


# -- the upstream connection on its own -----------------------------------------------------------


class Sink:
    """Records what an UpstreamProtocol delivers."""

    def __init__(self) -> None:
        self.frames: list[Frame] = []
        self.lost: list[str] = []

    def upstream_frames(self, frames: list[Frame]) -> None:
        assert not self.lost, "frames after the loss"
        self.frames.extend(frames)

    def upstream_lost(self, reason: str) -> None:
        self.lost.append(reason)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    stream=upstream_streams(),
    cuts=st.lists(st.integers(0, 10_000), max_size=12),
    passes=st.lists(st.booleans(), max_size=13),
    state=st.sampled_from([UpstreamState.READY, UpstreamState.STARTTLS]),
    lose_at_end=st.booleans(),
)
def test_upstream_protocol_survives_any_bytes(
    stream: bytes,
    cuts: list[int],
    passes: list[bool],
    state: UpstreamState,
    lose_at_end: bool,
) -> None:
    """Any bytes through dataReceived, delivered on clock.advance(0): nothing raises.
    READY: a framing error aborts the connection and nothing else does, and the sink gets
    exactly the PDUs framed, byte-identical and in order (then the loss).  STARTTLS: TLS
    starts only for a lone successful ExtendedResponse to message ID 1 with nothing after
    it; anything else that arrives aborts the connection."""
    clock = Clock()
    protocol, transport = upstream_connection(clock, state)
    sink = Sink()
    protocol.attach(sink)
    with no_logged_failures():
        delivered = 0
        for index, chunk in enumerate(chunked(stream, cuts)):
            if transport.disconnected or transport.tls_started:
                break  # aborted: no more reads; TLS started: the bytes are TLS records
            protocol.dataReceived(chunk)
            delivered += len(chunk)
            if index < len(passes) and passes[index]:
                clock.advance(0)
        clock.advance(0)
        if lose_at_end:
            protocol.connectionLost(Failure(ConnectionLost()))
            assert protocol.state is UpstreamState.CLOSED
        assert clock.getDelayedCalls() == []

    expected, error = reference_frames(stream[:delivered], UPSTREAM_MAX_PDU_BYTES)
    frames = [frame for _, frame in expected]
    if state is UpstreamState.READY:
        assert transport.disconnected == (error is not None), "aborted iff framing failed"
        assert sink.frames == frames[: len(sink.frames)]
        if error is None:
            assert sink.frames == frames
        assert len(sink.lost) == (1 if lose_at_end else 0)
        return
    assert sink.frames == []
    assert not sink.lost
    if error is not None or (frames and not transport.tls_started):
        assert transport.disconnected
    if not frames and error is None:
        assert not transport.disconnected
        assert not transport.tls_started
    lone_success = (
        error is None
        and len(frames) == 1
        and frames[0].data == stream[:delivered]
        and (frames[0].message_id, frames[0].op) == (1, m.EXTENDED_RESPONSE)
        and _result_or_none(frames[0]) == m.SUCCESS
    )
    assert transport.tls_started == lone_success
    if lose_at_end:
        assert protocol.ready.called


def _result_or_none(frame: Frame) -> int | None:
    try:
        return m.result_code(frame.data)
    except BerError:
        return None
