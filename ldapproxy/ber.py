"""LDAP message framing: split a byte stream into BER PDUs, reading only the routing fields.

The framer is sans-IO: feed it bytes as they arrive, get back whole PDUs with their
message ID and protocolOp tag, and forward the original bytes untouched.  It enforces the
size limit on the length header, before any of a PDU's body is buffered, and it never
re-scans a partial PDU (so a slow trickle of a large PDU costs linear time).

The small encoder and TLV reader at the bottom serve the few messages the proxy builds or
inspects itself (see :mod:`ldapproxy.messages`).
"""

from __future__ import annotations

from typing import NamedTuple

SEQUENCE = 0x30
INTEGER = 0x02
OCTET_STRING = 0x04
ENUMERATED = 0x0A
BOOLEAN = 0x01

#: RFC 4511 §4.1.1: MessageID ::= INTEGER (0 .. maxInt), maxInt = 2**31 - 1.
MAX_MESSAGE_ID = 2**31 - 1

# Four length octets describe up to 4 GiB, far beyond any sane limit; more is hostile.
_MAX_LENGTH_OCTETS = 4


class FramingError(Exception):
    """The byte stream is not a sequence of well-formed LDAPMessage PDUs.

    ``str(error)`` is a short description that is safe to show an LDAP client.
    """


class PDUTooLarge(FramingError):
    """A PDU's length header announces more than the configured maximum."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"PDU of {size} bytes exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class Frame(NamedTuple):
    """One whole LDAPMessage: its message ID, protocolOp tag byte and original bytes."""

    message_id: int
    op: int
    data: bytes


class Framer:
    """Splits one direction of an LDAP byte stream into :class:`Frame` objects.

    After a :class:`FramingError` the stream is unusable and the framer must be discarded.
    """

    __slots__ = ("_buffer", "_need", "max_pdu_bytes")

    def __init__(self, max_pdu_bytes: int) -> None:
        self.max_pdu_bytes = max_pdu_bytes
        self._buffer = bytearray()
        # Bytes needed before the next PDU can be complete; avoids re-parsing a header
        # for every chunk of a large PDU.
        self._need = 0

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as part of a frame."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Frame]:
        """Add ``data`` to the stream and return every PDU that is now complete.

        :raises FramingError: the stream is malformed or a PDU is too large.
        """
        buf = self._buffer
        if buf:
            buf += data
            if len(buf) < self._need:
                return []
        else:
            # Nothing buffered: parse straight from the received bytes (the common case).
            buf = data  # type: ignore[assignment]
        frames: list[Frame] = []
        pos = 0
        end = len(buf)
        limit = self.max_pdu_bytes
        self._need = 0
        while end - pos >= 2:
            if buf[pos] != SEQUENCE:
                raise FramingError(f"expected an LDAPMessage SEQUENCE, got tag 0x{buf[pos]:02x}")
            first = buf[pos + 1]
            if first < 0x80:
                header = 2
                length = first
            elif first == 0x80:
                raise FramingError("indefinite-length encoding is not allowed in LDAP")
            else:
                count = first & 0x7F
                if count > _MAX_LENGTH_OCTETS:
                    raise PDUTooLarge(2 ** (8 * count), limit)
                header = 2 + count
                if end - pos < header:
                    break
                length = int.from_bytes(buf[pos + 2 : pos + header], "big")
            total = header + length
            if total > limit:
                raise PDUTooLarge(total, limit)
            if end - pos < total:
                self._need = total
                break
            frames.append(_parse_envelope(buf, pos, header, total))
            pos += total
        if buf is data:
            if pos < end:
                self._buffer = bytearray(data[pos:])
        elif pos:
            del buf[:pos]
        return frames


def _parse_envelope(buf: bytes | bytearray, pos: int, header: int, total: int) -> Frame:
    """Read the message ID and protocolOp tag of the PDU at ``buf[pos:pos + total]``."""
    p = pos + header
    end = pos + total
    if end - p < 5 or buf[p] != INTEGER:
        raise FramingError("LDAPMessage does not start with a messageID INTEGER")
    id_len = buf[p + 1]
    if not 1 <= id_len <= 4 or p + 2 + id_len >= end:
        raise FramingError("malformed messageID")
    message_id = int.from_bytes(buf[p + 2 : p + 2 + id_len], "big", signed=True)
    if message_id < 0:
        raise FramingError("negative messageID")
    op = buf[p + 2 + id_len]
    return Frame(message_id, op, bytes(buf[pos:end]))


# -- encoding ----------------------------------------------------------------------------


def encode_length(length: int) -> bytes:
    """Definite-form BER length octets for ``length``."""
    if length < 0x80:
        return bytes((length,))
    body = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(body),)) + body


def tlv(tag: int, value: bytes) -> bytes:
    """One BER element with a single-octet ``tag``."""
    return bytes((tag,)) + encode_length(len(value)) + value


def encode_integer(value: int, tag: int = INTEGER) -> bytes:
    """A BER INTEGER (or ENUMERATED, with ``tag``), minimal two's complement."""
    size = (value + (value < 0)).bit_length() // 8 + 1
    return tlv(tag, value.to_bytes(size, "big", signed=True))


def encode_message(message_id: int, op: bytes, controls: bytes = b"") -> bytes:
    """An LDAPMessage envelope around an encoded protocolOp (and optional controls)."""
    return tlv(SEQUENCE, encode_integer(message_id) + op + controls)


# -- decoding the few fields the proxy acts on ---------------------------------------------


class BerError(ValueError):
    """An element inside a PDU is truncated or malformed."""


def read_tlv(buf: bytes, pos: int, end: int) -> tuple[int, int, int]:
    """Read the element at ``buf[pos:end]``: return ``(tag, value_start, value_end)``.

    Only single-octet tags and definite lengths are accepted, as LDAP requires.
    """
    if end - pos < 2:
        raise BerError("truncated element")
    tag = buf[pos]
    if tag & 0x1F == 0x1F:
        raise BerError("multi-octet tags are not used by LDAP")
    first = buf[pos + 1]
    if first < 0x80:
        start = pos + 2
        length = first
    elif first == 0x80 or first & 0x7F > _MAX_LENGTH_OCTETS:
        raise BerError("unsupported length encoding")
    else:
        start = pos + 2 + (first & 0x7F)
        if start > end:
            raise BerError("truncated length")
        length = int.from_bytes(buf[pos + 2 : start], "big")
    if start + length > end:
        raise BerError("element overruns its container")
    return tag, start, start + length


def read_integer(buf: bytes, start: int, end: int) -> int:
    """Decode the content octets of an INTEGER or ENUMERATED."""
    if not 1 <= end - start <= 8:
        raise BerError("INTEGER of unsupported size")
    return int.from_bytes(buf[start:end], "big", signed=True)
