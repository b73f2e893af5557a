"""Unit tests for ldapproxy.ber: the LDAPMessage framer, the encoder and the TLV reader."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ldapproxy import messages as m
from ldapproxy.ber import (
    ENUMERATED,
    INTEGER,
    MAX_MESSAGE_ID,
    OCTET_STRING,
    BerError,
    Frame,
    Framer,
    FramingError,
    PDUTooLarge,
    encode_integer,
    encode_length,
    encode_message,
    read_integer,
    read_tlv,
    tlv,
)

LIMIT = 1 << 20

#: A small search (short-form length) and a bind with a body that needs two length octets.
SEARCH = m.root_dse_search(5, (b"namingContexts",))
BIG_BIND = encode_message(
    MAX_MESSAGE_ID, tlv(m.BIND_REQUEST, encode_integer(3) + tlv(OCTET_STRING, b"x" * 300))
)
UNBIND = m.unbind_request(9)
#: A search with a one-octet long-form length (0x81), shorter than BIG_BIND.
MEDIUM_SEARCH = m.root_dse_search(6, tuple(b"attribute%d" % i for i in range(12)))


def test_single_pdu_is_returned_with_its_routing_fields() -> None:
    """One whole PDU comes back as one frame with its message ID, op tag and exact bytes."""
    framer = Framer(LIMIT)
    assert framer.feed(SEARCH) == [Frame(5, m.SEARCH_REQUEST, SEARCH)]
    assert framer.buffered == 0


def test_many_pdus_in_one_feed_come_back_in_order() -> None:
    """Several PDUs in one chunk are all returned, in stream order."""
    framer = Framer(LIMIT)
    frames = framer.feed(SEARCH + BIG_BIND + UNBIND + SEARCH)
    assert [(f.message_id, f.op, f.data) for f in frames] == [
        (5, m.SEARCH_REQUEST, SEARCH),
        (MAX_MESSAGE_ID, m.BIND_REQUEST, BIG_BIND),
        (9, m.UNBIND_REQUEST, UNBIND),
        (5, m.SEARCH_REQUEST, SEARCH),
    ]
    assert framer.buffered == 0


@pytest.mark.parametrize(
    "pdu",
    [SEARCH, MEDIUM_SEARCH, BIG_BIND, UNBIND],
    ids=["short-form", "long-form-81", "long-form-82", "unbind"],
)
def test_pdu_split_at_every_byte_boundary(pdu: bytes) -> None:
    """A PDU split in two anywhere is returned once, when its last byte arrives."""
    for cut in range(1, len(pdu)):
        framer = Framer(LIMIT)
        assert framer.feed(pdu[:cut]) == []
        assert framer.buffered == cut
        frames = framer.feed(pdu[cut:])
        assert [f.data for f in frames] == [pdu], cut
        assert framer.buffered == 0


def test_pdu_fed_one_byte_at_a_time() -> None:
    """A byte-at-a-time trickle yields each PDU exactly when it is complete."""
    stream = BIG_BIND + SEARCH
    framer = Framer(LIMIT)
    completed = []
    for index in range(len(stream)):
        for frame in framer.feed(stream[index : index + 1]):
            completed.append((index + 1, frame.data))
    assert completed == [(len(BIG_BIND), BIG_BIND), (len(stream), SEARCH)]
    assert framer.buffered == 0


def test_completed_pdu_then_partial_header_then_rest() -> None:
    """A partial header left after a complete PDU is finished correctly by later feeds."""
    # Regression for the "bytes needed" bookkeeping: the size needed for the first PDU
    # must not linger and hold back a shorter second one.
    assert len(MEDIUM_SEARCH) < len(BIG_BIND)
    assert MEDIUM_SEARCH[1] == 0x81
    framer = Framer(LIMIT)
    assert framer.feed(BIG_BIND[:100]) == []
    # The rest of the first PDU plus only the first two header octets of the next one.
    frames = framer.feed(BIG_BIND[100:] + MEDIUM_SEARCH[:2])
    assert [f.data for f in frames] == [BIG_BIND]
    assert framer.buffered == 2
    # The length octet completes the header; the body is still missing.
    assert framer.feed(MEDIUM_SEARCH[2:3]) == []
    assert framer.feed(MEDIUM_SEARCH[3:]) == [Frame(6, m.SEARCH_REQUEST, MEDIUM_SEARCH)]
    assert framer.buffered == 0
    # And again with the header split differently, followed by a short PDU.
    assert framer.feed(BIG_BIND[:-1]) == []
    assert [f.data for f in framer.feed(BIG_BIND[-1:] + MEDIUM_SEARCH[:1])] == [BIG_BIND]
    frames = framer.feed(MEDIUM_SEARCH[1:] + UNBIND)
    assert [f.data for f in frames] == [MEDIUM_SEARCH, UNBIND]
    assert framer.buffered == 0


def test_completed_pdu_then_partial_body_then_rest() -> None:
    """A buffered PDU whose needed size is known completes exactly at its last byte."""
    framer = Framer(LIMIT)
    assert framer.feed(SEARCH + BIG_BIND[:50]) == [Frame(5, m.SEARCH_REQUEST, SEARCH)]
    assert framer.feed(BIG_BIND[50:-1]) == []
    assert framer.buffered == len(BIG_BIND) - 1
    assert framer.feed(BIG_BIND[-1:] + SEARCH[:1]) == [
        Frame(MAX_MESSAGE_ID, m.BIND_REQUEST, BIG_BIND)
    ]
    assert framer.buffered == 1
    assert framer.feed(SEARCH[1:]) == [Frame(5, m.SEARCH_REQUEST, SEARCH)]


# -- the property: any stream of valid PDUs, chunked anyhow, frames back exactly ------------

_OP_TAGS = sorted(m.REQUEST_NAMES) + sorted(m.RESPONSE_TAGS)


@st.composite
def _bodies(draw: st.DrawFn) -> bytes:
    """Op bodies from empty to beyond 65535 bytes, so every length form is used."""
    size = draw(
        st.one_of(
            st.integers(0, 140),
            st.integers(200, 300),
            st.integers(65530, 65800),
        )
    )
    fill = draw(st.binary(min_size=1, max_size=8))
    return (fill * (size // len(fill) + 1))[:size]


@st.composite
def _messages(draw: st.DrawFn) -> tuple[int, int, bytes]:
    message_id = draw(st.integers(1, MAX_MESSAGE_ID))
    op = draw(st.sampled_from(_OP_TAGS))
    body = draw(_bodies())
    controls = draw(st.sampled_from([b"", tlv(0xA0, tlv(0x30, tlv(OCTET_STRING, b"1.2.3")))]))
    return message_id, op, encode_message(message_id, tlv(op, body), controls)


@settings(max_examples=60, deadline=None)
@given(messages=st.lists(_messages(), min_size=1, max_size=6), data=st.data())
def test_any_chunking_of_valid_pdus_frames_back_exactly(
    messages: list[tuple[int, int, bytes]], data: st.DataObject
) -> None:
    """Valid PDUs, concatenated and split into arbitrary chunks, come back whole and in order."""
    stream = b"".join(pdu for _, _, pdu in messages)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=40).map(sorted), label="cuts")
    bounds = [0, *cuts, len(stream)]
    framer = Framer(LIMIT)
    frames: list[Frame] = []
    for start, end in itertools.pairwise(bounds):
        frames += framer.feed(stream[start:end])
    assert frames == [Frame(mid, op, pdu) for mid, op, pdu in messages]
    assert framer.buffered == 0


# -- the size limit ---------------------------------------------------------------------


def test_oversized_pdu_is_rejected_from_its_header_alone() -> None:
    """A header announcing more than max_pdu_bytes raises before any of the body arrives."""
    framer = Framer(1024)
    header = b"\x30\x82" + (1024 - 4 + 1).to_bytes(2, "big")  # total 1025 bytes
    with pytest.raises(PDUTooLarge) as caught:
        framer.feed(header)
    assert (caught.value.size, caught.value.limit) == (1025, 1024)
    assert "1025" in str(caught.value)
    assert "1024" in str(caught.value)


def test_pdu_of_exactly_max_pdu_bytes_is_accepted() -> None:
    """A PDU whose header plus body is exactly max_pdu_bytes passes."""

    def bind(size: int) -> bytes:
        body = encode_integer(3) + tlv(OCTET_STRING, b"") + tlv(0x80, b"p" * size)
        return encode_message(1, tlv(m.BIND_REQUEST, body))

    pdu = next(p for p in map(bind, range(900, 1100)) if len(p) == 1024)
    assert len(pdu) == 1024
    assert Framer(1024).feed(pdu) == [Frame(1, m.BIND_REQUEST, pdu)]
    with pytest.raises(PDUTooLarge):
        Framer(1023).feed(pdu[:4])


def test_oversized_pdu_split_inside_its_header_is_rejected_when_the_header_completes() -> None:
    """The limit applies as soon as the long-form length octets are all in, across feeds."""
    framer = Framer(1024)
    assert framer.feed(b"\x30\x84\x00") == []
    with pytest.raises(PDUTooLarge):
        framer.feed(b"\x01\x00\x00")


def test_oversized_pdu_after_a_good_one_in_the_same_chunk_is_rejected() -> None:
    """An oversized header after a valid PDU raises rather than buffering the body."""
    with pytest.raises(PDUTooLarge):
        Framer(1024).feed(SEARCH + b"\x30\x83\x10\x00\x00")


# -- malformed streams --------------------------------------------------------------------

MALFORMED = [
    pytest.param(b"\x31\x05\x02\x01\x01\x42\x00", "SEQUENCE", id="wrong-outer-tag"),
    pytest.param(b"\x04\x00", "SEQUENCE", id="octet-string-outer"),
    pytest.param(b"\x30\x80\x02\x01\x01\x42\x00\x00\x00", "indefinite", id="indefinite-length"),
    pytest.param(b"\x30\x85\x00\x00\x00\x00\x07", "exceeds", id="five-length-octets"),
    pytest.param(b"\x30\x05\x04\x01\x01\x42\x00", "messageID", id="missing-message-id"),
    pytest.param(b"\x30\x03\x02\x01\x01", "messageID", id="message-id-only"),
    pytest.param(b"\x30\x05\x02\x00\x42\x00\x00", "messageID", id="message-id-length-0"),
    pytest.param(
        b"\x30\x09\x02\x05\x00\x80\x00\x00\x00\x42\x00", "messageID", id="message-id-length-5"
    ),
    pytest.param(
        b"\x30\x0a\x02\x81\x01\x01\x42\x00\x00\x00\x00\x00", "messageID", id="message-id-long-form"
    ),
    pytest.param(b"\x30\x05\x02\x01\xff\x42\x00", "negative", id="negative-message-id"),
    pytest.param(b"\x30\x08\x02\x04\x80\x00\x00\x00\x42\x00", "negative", id="negative-4-octets"),
    pytest.param(b"\x30\x06\x02\x04\x00\x00\x00\x01", "messageID", id="message-id-overruns"),
]


@pytest.mark.parametrize(("stream", "words"), MALFORMED)
def test_malformed_stream_raises_framing_error(stream: bytes, words: str) -> None:
    """Each malformed envelope raises FramingError with a message naming the problem."""
    with pytest.raises(FramingError, match=words):
        Framer(LIMIT).feed(stream)


def test_largest_message_id_is_accepted_and_one_more_is_not() -> None:
    """Message ID 2**31-1 (maxInt) frames; 2**31 needs five octets and is refused."""
    good = encode_message(MAX_MESSAGE_ID, bytes((m.UNBIND_REQUEST, 0)))
    assert Framer(LIMIT).feed(good)[0].message_id == MAX_MESSAGE_ID
    bad = encode_message(MAX_MESSAGE_ID + 1, bytes((m.UNBIND_REQUEST, 0)))
    with pytest.raises(FramingError):
        Framer(LIMIT).feed(bad)


def test_malformed_pdu_after_a_good_one_raises() -> None:
    """A bad envelope is detected even when preceded by a valid PDU in the same chunk."""
    with pytest.raises(FramingError):
        Framer(LIMIT).feed(SEARCH + b"\x30\x05\x02\x01\xff\x42\x00")


# -- encoder and reader ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "octets"),
    [
        (0, b"\x00"),
        (127, b"\x7f"),
        (128, b"\x81\x80"),
        (255, b"\x81\xff"),
        (256, b"\x82\x01\x00"),
        (65535, b"\x82\xff\xff"),
        (65536, b"\x83\x01\x00\x00"),
        (2**32 - 1, b"\x84\xff\xff\xff\xff"),
    ],
)
def test_encode_length_uses_the_shortest_definite_form(length: int, octets: bytes) -> None:
    """Lengths below 128 take one octet; longer ones the fewest long-form octets."""
    assert encode_length(length) == octets


@given(st.integers(0, 2**32 - 1))
def test_encode_length_round_trips_through_read_tlv(length: int) -> None:
    """read_tlv recovers every length encode_length writes (up to four length octets)."""
    header = bytes((OCTET_STRING,)) + encode_length(length)
    # read_tlv only reads the header from the buffer; the container end bounds the value.
    assert read_tlv(header, 0, len(header) + length) == (
        OCTET_STRING,
        len(header),
        len(header) + length,
    )


@given(st.integers(-(2**63), 2**63 - 1), st.sampled_from([INTEGER, ENUMERATED]))
def test_encode_integer_round_trips_through_read_integer(value: int, tag: int) -> None:
    """read_integer recovers every 64-bit value encode_integer writes, with the tag kept."""
    encoded = encode_integer(value, tag)
    got_tag, start, end = read_tlv(encoded, 0, len(encoded))
    assert got_tag == tag
    assert end == len(encoded)
    assert read_integer(encoded, start, end) == value


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0, b"\x02\x01\x00"),
        (1, b"\x02\x01\x01"),
        (127, b"\x02\x01\x7f"),
        (128, b"\x02\x02\x00\x80"),
        (256, b"\x02\x02\x01\x00"),
        (MAX_MESSAGE_ID, b"\x02\x04\x7f\xff\xff\xff"),
        (-1, b"\x02\x01\xff"),
        (-127, b"\x02\x01\x81"),
        (-129, b"\x02\x02\xff\x7f"),
        # X.690 8.3.2: the first nine bits of an INTEGER's content are never all ones.
        (-128, b"\x02\x01\x80"),
        (-32768, b"\x02\x02\x80\x00"),
        (-(2**63), b"\x02\x08\x80" + bytes(7)),
    ],
)
def test_encode_integer_is_minimal_twos_complement(value: int, encoded: bytes) -> None:
    """encode_integer writes the shortest two's-complement content that X.690 allows."""
    assert encode_integer(value) == encoded


def test_encode_message_wraps_id_op_and_controls() -> None:
    """encode_message is SEQUENCE { messageID, protocolOp, controls } with exact lengths."""
    op = bytes((m.UNBIND_REQUEST, 0))
    controls = tlv(0xA0, b"")
    assert encode_message(300, op, controls) == b"\x30\x08\x02\x02\x01\x2c\x42\x00\xa0\x00"


READ_TLV_ERRORS = [
    pytest.param(b"", 0, 0, "truncated", id="empty"),
    pytest.param(b"\x04", 0, 1, "truncated", id="tag-only"),
    pytest.param(b"\x1f\x01\x00", 0, 3, "multi-octet", id="multi-octet-tag"),
    pytest.param(b"\x04\x80\x00\x00", 0, 4, "length", id="indefinite"),
    pytest.param(b"\x04\x85\x00\x00\x00\x00\x00", 0, 7, "length", id="five-length-octets"),
    pytest.param(b"\x04\x82\x01", 0, 3, "truncated length", id="truncated-long-length"),
    pytest.param(b"\x04\x03ab", 0, 4, "overruns", id="short-form-overrun"),
    pytest.param(b"\x04\x81\x80" + b"a" * 127, 0, 130, "overruns", id="long-form-overrun"),
    # The element fits the buffer but not its container (end), which is what counts.
    pytest.param(b"\x04\x03abc", 0, 4, "overruns", id="overruns-container-not-buffer"),
    pytest.param(b"\x30\x05\x04\x03abc", 2, 6, "overruns", id="inner-overruns-outer"),
    pytest.param(b"\x04\x00", 2, 2, "truncated", id="at-end"),
]


@pytest.mark.parametrize(("buf", "pos", "end", "words"), READ_TLV_ERRORS)
def test_read_tlv_rejects_truncated_and_overrunning_elements(
    buf: bytes, pos: int, end: int, words: str
) -> None:
    """read_tlv raises BerError instead of reading past its container or the data."""
    with pytest.raises(BerError, match=words):
        read_tlv(buf, pos, end)


def test_read_tlv_reads_an_element_inside_a_container() -> None:
    """read_tlv returns the tag and value bounds of an element at an offset."""
    buf = b"\x30\x07\x04\x03abc\x01\x00"
    assert read_tlv(buf, 0, len(buf)) == (0x30, 2, 9)
    assert read_tlv(buf, 2, 9) == (OCTET_STRING, 4, 7)
    assert read_tlv(buf, 7, 9) == (0x01, 9, 9)


@pytest.mark.parametrize("content", [b"", b"\x01" * 9], ids=["empty", "nine-octets"])
def test_read_integer_rejects_unsupported_sizes(content: bytes) -> None:
    """read_integer accepts 1 to 8 content octets only."""
    with pytest.raises(BerError):
        read_integer(content, 0, len(content))
