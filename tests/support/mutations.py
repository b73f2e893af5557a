"""What the fuzz tests (``test_fuzz.py`` in process, ``test_e2e_fuzz.py`` on the network)
build hostile PDUs from: filter items, byte values and length octets no sane encoder
writes, and where a PDU's length octets are."""

from __future__ import annotations

from ldapproxy.ber import OCTET_STRING, BerError, read_tlv, tlv

#: Byte values that make lengths long, huge or indefinite, tags odd and integers extreme.
INTERESTING_BYTES = (
    0x00, 0x01, 0x02, 0x04, 0x0A, 0x1F, 0x30, 0x7F, 0x80, 0x81, 0x84, 0x85, 0xA0, 0xFF,
)  # fmt: skip

#: Length octets no sane encoder writes: indefinite, over-long, 4 GiB, more than 4 octets.
HOSTILE_LENGTHS = (
    b"\x00",
    b"\x7f",
    b"\x80",
    b"\x81\x00",
    b"\x81\xff",
    b"\x82\xff\xff",
    b"\x83\xff\xff\xff",
    b"\x84\xff\xff\xff\xff",
    b"\x84\x7f\xff\xff\xff",
    b"\x84\x00\x00\x00\x01",
    b"\x85\x01\x00\x00\x00\x00",
    b"\x89" + b"\xff" * 9,
    b"\xff",
)


def ava(tag: int, attribute: bytes, value: bytes) -> bytes:
    """An AttributeValueAssertion filter item (equality, >=, <=, ~= by ``tag``)."""
    return tlv(tag, tlv(OCTET_STRING, attribute) + tlv(OCTET_STRING, value))


def length_fields(buf: bytes) -> list[tuple[int, int]]:
    """``(start, end)`` of the length octets of every element a TLV walk of ``buf`` finds,
    descending into constructed elements; malformed parts are skipped."""
    found = []
    stack = [(0, len(buf))]
    while stack:
        pos, end = stack.pop()
        while pos < end:
            try:
                tag, start, stop = read_tlv(buf, pos, end)
            except BerError:
                break
            found.append((pos + 1, start))
            if tag & 0x20:
                stack.append((start, stop))
            pos = stop
    return found
