"""PROXY protocol header parsing: who the load balancer says the client is.

A load balancer in front of the proxy (HAProxy, an AWS NLB, ...) can prefix each TCP
connection with a PROXY protocol header, version 1 (one text line) or version 2 (binary),
as specified in https://www.haproxy.org/download/2.6/doc/proxy-protocol.txt.  The parser
is sans-IO: feed it the first bytes of a connection until it returns a `ProxyHeader`, then
hand `ProxyHeaderParser.rest` (the start of the real protocol) on.

The bytes come from the network before anything is authenticated, so the parser is
strict and bounded: it rejects input as soon as it cannot be the start of a header (an
LDAP client that connects directly fails on its first byte), a v1 line may not exceed the
spec's 107 bytes, a v2 header may not declare more than ``max_v2_length`` bytes, and only
TCP over IPv4 or IPv6 is accepted, since nothing else can carry LDAP to us.
"""

from __future__ import annotations

import ipaddress
import re
import struct
from dataclasses import dataclass

#: The spec's worst case, "PROXY UNKNOWN" with two full IPv6 addresses, CRLF included.
V1_MAX_LENGTH = 107
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: Room for IPv6 addresses plus a generous set of TLVs (TLS details, AWS/Azure IDs).
DEFAULT_MAX_V2_LENGTH = 4096

_V1_PREFIX = b"PROXY "
_V2_FIXED = len(V2_SIGNATURE) + 4  # signature, ver_cmd, fam, 2-byte length
# fam byte -> (IP version, size of the address block): TCP over IPv4 and over IPv6.
_V2_ADDRESSES = {0x11: (4, 12), 0x21: (6, 36)}
# A v1 line is printable ASCII; checking as bytes arrive fails binary junk without waiting.
_V1_TEXT = re.compile(rb"[\x20-\x7e]*")
# Decimal without sign or leading zeros: ASCII digits only, never "+1", "01" or " 1".
_PORT = re.compile(r"0|[1-9][0-9]{0,4}")


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """What the load balancer says about the client connection."""

    #: The client's (host, port); None for LOCAL / UNKNOWN: then use the real peer address.
    source: tuple[str, int] | None
    #: The address the client connected to, as (host, port); None when source is None.
    destination: tuple[str, int] | None


class ProxyProtocolError(Exception):
    """The header is malformed; str() says how (never echoes more than a few bytes of input)."""


def _snip(data: bytes | bytearray | str) -> str:
    """A short repr of untrusted input for an error message."""
    head = bytes(data[:8]) if isinstance(data, bytearray) else data[:8]
    return repr(head) + ("..." if len(data) > 8 else "")


class ProxyHeaderParser:
    """Reads one PROXY header (v1 or v2) from the start of a connection.

    `feed` returns None while more bytes are needed and the `ProxyHeader` once the header is
    complete; `rest` then holds the bytes that followed it, which must be passed on.  Any
    malformed input raises `ProxyProtocolError`.  The parser is single-use: feeding it after
    it has returned a header or raised is a programming error (RuntimeError).
    """

    def __init__(self, *, max_v2_length: int = DEFAULT_MAX_V2_LENGTH) -> None:
        if max_v2_length < 0:
            raise ValueError("max_v2_length must not be negative")
        self._max_v2_length = max_v2_length
        self._buffer = bytearray()
        self._finished = False
        self._rest = b""

    @property
    def rest(self) -> bytes:
        """The bytes after the header (empty until the header is complete)."""
        return self._rest

    def feed(self, data: bytes) -> ProxyHeader | None:
        """Add bytes; return the header once complete, None while more are needed."""
        if self._finished:
            raise RuntimeError("ProxyHeaderParser is single-use and has already finished")
        self._buffer += data
        try:
            result = self._parse()
        except ProxyProtocolError:
            self._finished = True
            self._buffer.clear()
            raise
        if result is None:
            return None
        header, end = result
        self._rest = bytes(self._buffer[end:])
        self._finished = True
        self._buffer.clear()
        return header

    def _parse(self) -> tuple[ProxyHeader, int] | None:
        buf = self._buffer
        # Both signatures are decided by their own prefix, so compare only what has arrived.
        if V2_SIGNATURE.startswith(bytes(buf[: len(V2_SIGNATURE)])):
            return self._parse_v2() if len(buf) > len(V2_SIGNATURE) else None
        if _V1_PREFIX.startswith(bytes(buf[: len(_V1_PREFIX)])):
            return self._parse_v1()
        raise ProxyProtocolError(f"no PROXY protocol signature: input starts {_snip(buf[:4])}")

    def _parse_v1(self) -> tuple[ProxyHeader, int] | None:
        buf = self._buffer
        end = buf.find(b"\r\n", 0, V1_MAX_LENGTH)
        # An unfinished line may end in the CR of its CRLF.
        text = buf[:V1_MAX_LENGTH].removesuffix(b"\r") if end < 0 else buf[:end]
        if not _V1_TEXT.fullmatch(text):
            raise ProxyProtocolError("v1 header contains a byte that is not printable ASCII")
        if end < 0:
            if len(buf) >= V1_MAX_LENGTH:
                raise ProxyProtocolError(f"v1 header has no CRLF within {V1_MAX_LENGTH} bytes")
            return None
        fields = buf[:end].decode("ascii").split(" ")
        proto = fields[1]
        # The spec says to ignore whatever follows UNKNOWN; the receiver uses the real peer.
        if proto == "UNKNOWN":
            return ProxyHeader(None, None), end + 2
        if proto not in ("TCP4", "TCP6"):
            raise ProxyProtocolError(f"v1 protocol {_snip(proto)} is not TCP4, TCP6 or UNKNOWN")
        if len(fields) != 6:
            raise ProxyProtocolError(
                f"v1 {proto} header needs 4 fields after the protocol, separated by single spaces"
            )
        version = 4 if proto == "TCP4" else 6
        source = (_v1_host(fields[2], version, "source"), _v1_port(fields[4], "source"))
        dest = (_v1_host(fields[3], version, "destination"), _v1_port(fields[5], "destination"))
        return ProxyHeader(source, dest), end + 2

    def _parse_v2(self) -> tuple[ProxyHeader, int] | None:
        buf = self._buffer
        # Check each fixed byte as soon as it arrives, so junk fails before the length.
        ver_cmd = buf[12]
        if ver_cmd >> 4 != 2:
            raise ProxyProtocolError(f"v2 version nibble is {ver_cmd >> 4}, expected 2")
        command = ver_cmd & 0x0F
        if command not in (0, 1):
            raise ProxyProtocolError(f"v2 command nibble is {command}, expected LOCAL or PROXY")
        local = command == 0
        # LOCAL (health checks from the balancer itself) carries no meaningful addresses.
        if not local and len(buf) > 13 and buf[13] not in _V2_ADDRESSES:
            raise ProxyProtocolError(_v2_family_error(buf[13]))
        if len(buf) < _V2_FIXED:
            return None
        (length,) = struct.unpack_from("!H", buf, 14)
        if length > self._max_v2_length:
            raise ProxyProtocolError(
                f"v2 header declares {length} bytes, more than the limit of {self._max_v2_length}"
            )
        version, size = (0, 0) if local else _V2_ADDRESSES[buf[13]]
        if length < size:
            raise ProxyProtocolError(f"v2 length {length} is too short for IPv{version} addresses")
        total = _V2_FIXED + length
        if len(buf) < total:
            return None
        if local:
            return ProxyHeader(None, None), total
        # TLVs are skipped, but must tile the rest exactly: otherwise the header is corrupt.
        pos = _V2_FIXED + size
        while pos < total:
            if pos + 3 > total:
                raise ProxyProtocolError("v2 TLV header overruns the declared length")
            (tlv_length,) = struct.unpack_from("!H", buf, pos + 1)
            pos += 3 + tlv_length
            if pos > total:
                raise ProxyProtocolError("v2 TLV value overruns the declared length")
        ip = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
        n = size // 2 - 2
        src, dst, sport, dport = struct.unpack_from(f"!{n}s{n}sHH", buf, _V2_FIXED)
        return ProxyHeader((str(ip(src)), sport), (str(ip(dst)), dport)), total


def _v1_host(text: str, version: int, role: str) -> str:
    try:
        # A scope ("%eth0") names an interface on the balancer, not the client: refuse it.
        if "%" in text:
            raise ValueError(text)
        ip = ipaddress.IPv4Address(text) if version == 4 else ipaddress.IPv6Address(text)
    except ValueError:
        raise ProxyProtocolError(
            f"v1 TCP{version} {role} address {_snip(text)} is not an IPv{version} address"
        ) from None
    return str(ip)


def _v1_port(text: str, role: str) -> int:
    if not _PORT.fullmatch(text) or int(text) > 65535:
        raise ProxyProtocolError(f"v1 {role} port {_snip(text)} is not a number in 0..65535")
    return int(text)


def _v2_family_error(fam: int) -> str:
    if fam >> 4 == 3:
        return "v2 UNIX socket addresses are not supported"
    if fam & 0x0F == 2:
        return "v2 UDP (DGRAM) connections are not supported"
    return f"v2 family/protocol byte 0x{fam:02x} is not supported (only TCP over IPv4/IPv6)"
