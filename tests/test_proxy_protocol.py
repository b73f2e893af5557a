"""Unit tests for ldapproxy.proxy_protocol: the sans-IO PROXY protocol v1/v2 header parser."""

from __future__ import annotations

import ipaddress
import itertools
import re
import struct
from collections.abc import Callable
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ldapproxy.proxy_protocol import (
    DEFAULT_MAX_V2_LENGTH,
    V1_MAX_LENGTH,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyHeaderParser,
    ProxyProtocolError,
)

#: An LDAP bind request (anonymous, v3): what a client sends when it bypasses the balancer.
LDAP_BIND = bytes.fromhex("300c020101600702010304008000")
LOCAL = ProxyHeader(None, None)
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def v2(
    fam: int = 0x11,
    addresses: bytes = b"",
    tlvs: bytes = b"",
    *,
    ver_cmd: int = 0x21,
    length: int | None = None,
) -> bytes:
    """A v2 header; `length` defaults to the true length of addresses plus TLVs."""
    body = addresses + tlvs
    return (
        V2_SIGNATURE
        + struct.pack("!BBH", ver_cmd, fam, len(body) if length is None else length)
        + body
    )


def ipv4(src: str, dst: str, sport: int, dport: int) -> bytes:
    """The v2 address block for TCP over IPv4."""
    a, b = ipaddress.IPv4Address(src), ipaddress.IPv4Address(dst)
    return struct.pack("!4s4sHH", a.packed, b.packed, sport, dport)


def ipv6(src: str, dst: str, sport: int, dport: int) -> bytes:
    """The v2 address block for TCP over IPv6."""
    a, b = ipaddress.IPv6Address(src), ipaddress.IPv6Address(dst)
    return struct.pack("!16s16sHH", a.packed, b.packed, sport, dport)


def tlv(kind: int, value: bytes) -> bytes:
    """One v2 TLV."""
    return struct.pack("!BH", kind, len(value)) + value


def parse(data: bytes, **kwargs: int) -> tuple[ProxyHeader | None, bytes]:
    """Feed `data` in one go to a fresh parser; return its result and rest."""
    parser = ProxyHeaderParser(**kwargs)
    header = parser.feed(data)
    return header, parser.rest


WORST_V1 = b"PROXY UNKNOWN " + b" ".join([b"ffff:" * 7 + b"ffff"] * 2) + b" 65535 65535\r\n"

VALID_V1 = [
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1111 2222\r\n", (("1.2.3.4", 1111), ("5.6.7.8", 2222))),
    (
        b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n",
        (("0.0.0.0", 0), ("255.255.255.255", 65535)),
    ),
    (
        b"PROXY TCP6 2001:db8:0:0:0:0:0:1 ::1 389 636\r\n",
        (("2001:db8::1", 389), ("::1", 636)),
    ),
    (b"PROXY TCP6 FE80::A ::2 1 2\r\n", (("fe80::a", 1), ("::2", 2))),
    (
        b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 0:0::0 65535 65535\r\n",
        (("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535), ("::", 65535)),
    ),
    (b"PROXY UNKNOWN\r\n", None),
    (b"PROXY UNKNOWN 1.2.3.4 5.6.7.8 1 2\r\n", None),
    (b"PROXY UNKNOWN anything at all, ignored\r\n", None),
    (WORST_V1, None),
]

SSL_TLV = tlv(0x20, b"\x01" + b"\x00\x00\x00\x00" + tlv(0x21, b"TLSv1.3") + tlv(0x22, b"cn"))
VALID_V2 = [
    (v2(0x11, ipv4("1.2.3.4", "5.6.7.8", 1111, 2222)), (("1.2.3.4", 1111), ("5.6.7.8", 2222))),
    (
        v2(0x21, ipv6("2001:db8::1", "2001:db8:0:0:0:0:0:2", 0, 65535)),
        (("2001:db8::1", 0), ("2001:db8::2", 65535)),
    ),
    (
        v2(0x11, ipv4("10.0.0.1", "10.0.0.2", 50000, 636), tlv(0x01, b"ldap") + tlv(0x04, b"")),
        (("10.0.0.1", 50000), ("10.0.0.2", 636)),
    ),
    (
        v2(0x21, ipv6("::1", "::2", 7, 8), tlv(0x02, b"ldap.example.com") + SSL_TLV),
        (("::1", 7), ("::2", 8)),
    ),
    (v2(0x00, ver_cmd=0x20), None),
    # LOCAL ignores whatever family and address block the balancer put there.
    (v2(0x11, ipv4("1.2.3.4", "5.6.7.8", 1, 2), ver_cmd=0x20), None),
    (v2(0x31, b"\xff" * 216, ver_cmd=0x20), None),
]

VALID = [
    pytest.param(raw, ProxyHeader(*addrs) if addrs else LOCAL, id=repr(raw[-40:]))
    for raw, addrs in VALID_V1 + VALID_V2
]


@pytest.mark.parametrize(("raw", "expected"), VALID)
def test_valid_header_in_one_feed(raw: bytes, expected: ProxyHeader) -> None:
    """A whole valid header parses to the expected addresses and leaves nothing over."""
    assert parse(raw) == (expected, b"")


@pytest.mark.parametrize(("raw", "expected"), VALID)
def test_every_proper_prefix_waits_for_more(raw: bytes, expected: ProxyHeader) -> None:
    """No prefix of a valid header is an error or a result: the parser asks for more bytes."""
    for end in range(len(raw)):
        parser = ProxyHeaderParser()
        assert parser.feed(raw[:end]) is None
        assert parser.rest == b""
        assert parser.feed(raw[end:]) == expected


@pytest.mark.parametrize(("raw", "expected"), VALID)
def test_rest_holds_the_bytes_after_the_header(raw: bytes, expected: ProxyHeader) -> None:
    """The first bytes of the real protocol, fed with the header, end up in `rest` intact."""
    trailer = LDAP_BIND + b"\r\n\r\n\x00\r\nQUIT\nPROXY "
    assert parse(raw + trailer) == (expected, trailer)


def test_v1_line_of_exactly_107_bytes_is_accepted() -> None:
    """The spec's worst-case line is exactly the limit, CRLF included, and still parses."""
    assert len(WORST_V1) == V1_MAX_LENGTH
    assert parse(WORST_V1 + b"x") == (LOCAL, b"x")


def test_ipv4_mapped_ipv6_stays_ipv6() -> None:
    """An IPv4-mapped IPv6 client is reported as an IPv6 address, not unmapped to IPv4."""
    v1_header, _ = parse(b"PROXY TCP6 ::ffff:1.2.3.4 ::1 1 2\r\n")
    v2_header, _ = parse(v2(0x21, ipv6("::ffff:1.2.3.4", "::1", 1, 2)))
    assert v1_header == v2_header
    assert v1_header is not None
    assert v1_header.source is not None
    host = ipaddress.ip_address(v1_header.source[0])
    assert isinstance(host, ipaddress.IPv6Address)
    assert host.ipv4_mapped == ipaddress.IPv4Address("1.2.3.4")


# Hypothesis: random valid headers of both versions, with the header they must parse to.
_ports = st.integers(0, 65535)
_tlvs = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=4)


@st.composite
def _headers(draw: st.DrawFn) -> tuple[bytes, ProxyHeader]:
    """A valid v1 or v2 header and the ProxyHeader it encodes."""
    ip_version: Literal[4, 6] = draw(st.sampled_from([4, 6]))
    src, dst = draw(st.ip_addresses(v=ip_version)), draw(st.ip_addresses(v=ip_version))
    sport, dport = draw(_ports), draw(_ports)
    expected = ProxyHeader((str(src), sport), (str(dst), dport))
    kind = draw(st.sampled_from(["v1", "v1-unknown", "v2", "v2-local"]))
    if kind == "v1":
        # Senders may write IPv6 uncompressed or in upper case; the result is always compressed.
        spellings: list[Callable[[IPAddress], str]] = [
            str,
            lambda a: a.exploded,
            lambda a: str(a).upper(),
        ]
        spell = draw(st.sampled_from(spellings))
        text = f"PROXY TCP{ip_version} {spell(src)} {spell(dst)} {sport} {dport}\r\n"
        return text.encode(), expected
    if kind == "v1-unknown":
        return f"PROXY UNKNOWN {src} {dst} {sport} {dport}\r\n".encode(), LOCAL
    block = (ipv4 if ip_version == 4 else ipv6)(str(src), str(dst), sport, dport)
    tlvs = b"".join(tlv(k, v) for k, v in draw(_tlvs))
    if kind == "v2-local":
        return v2(0x00, block + tlvs, ver_cmd=0x20), LOCAL
    return v2(0x11 if ip_version == 4 else 0x21, block, tlvs), expected


@settings(max_examples=300, deadline=None)
@given(
    case=_headers(),
    trailer=st.binary(max_size=64),
    cuts=st.lists(st.integers(0, 400), max_size=8),
)
def test_any_chunking_gives_the_same_header_and_rest(
    case: tuple[bytes, ProxyHeader], trailer: bytes, cuts: list[int]
) -> None:
    """However the stream is split, the header appears with the chunk that completes it and
    the bytes after it are exactly the trailer."""
    raw, expected = case
    assert parse(raw + trailer) == (expected, trailer)
    stream = raw + trailer
    bounds = sorted({0, len(stream), *(c for c in cuts if c < len(stream))})
    parser = ProxyHeaderParser()
    for start, end in itertools.pairwise(bounds):
        result = parser.feed(stream[start:end])
        if end < len(raw):
            assert result is None
        else:
            assert result == expected
            assert parser.rest + stream[end:] == trailer
            return
    pytest.fail("the header never completed")


# Each malformed input with a fragment of the message it must raise.
MALFORMED = {
    "ldap-client-direct": (LDAP_BIND, "no PROXY protocol signature: input starts b'0\\x0c"),
    "http": (b"GET / HTTP/1.1\r\n\r\n", "no PROXY protocol signature"),
    "lowercase-proxy": (b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "no PROXY protocol signature"),
    "proxy-tab": (b"PROXY\tTCP4", "no PROXY protocol signature"),
    "v1-too-long": (b"PROXY UNKNOWN " + b"1" * 200 + b"\r\n", "no CRLF within 107 bytes"),
    "v1-108-bytes": (WORST_V1[:-2] + b"5\r\n", "no CRLF within 107 bytes"),
    "v1-bare-lf": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "not printable ASCII"),
    "v1-cr-cr-lf": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n", "not printable ASCII"),
    "v1-non-ascii": (b"PROXY TCP4 1.2.3.4 5.6.7.8 \xd9\xa1 2\r\n", "not printable ASCII"),
    "v1-udp": (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "v1 protocol 'UDP4' is not TCP4"),
    "v1-unknown-suffix": (b"PROXY UNKNOWN6\r\n", "v1 protocol 'UNKNOWN6' is not"),
    "v1-no-protocol": (b"PROXY \r\n", "v1 protocol '' is not TCP4"),
    "v1-missing-port": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "needs 4 fields"),
    "v1-extra-field": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "needs 4 fields"),
    "v1-double-space": (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "needs 4 fields"),
    "v1-trailing-space": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "needs 4 fields"),
    "v1-bad-ip": (b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n", "source address '1.2.3.2"),
    "v1-short-ip": (b"PROXY TCP4 1.2.3.4 5.6.7 1 2\r\n", "destination address '5.6.7'"),
    "v1-leading-zero-ip": (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "is not an IPv4 address"),
    "v1-tcp4-with-ipv6": (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "TCP4 source address '::1' is not"),
    "v1-tcp6-with-ipv4": (b"PROXY TCP6 ::1 5.6.7.8 1 2\r\n", "is not an IPv6 address"),
    "v1-ipv6-scope": (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "is not an IPv6 address"),
    "v1-port-70000": (b"PROXY TCP4 1.2.3.4 5.6.7.8 70000 2\r\n", "source port '70000' is not"),
    "v1-port-plus": (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", "source port '+1'"),
    "v1-port-leading-zero": (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 02\r\n", "destination port '02'"),
    "v1-port-negative": (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "source port '-1'"),
    "v1-port-hex": (b"PROXY TCP4 1.2.3.4 5.6.7.8 0x1 2\r\n", "source port '0x1'"),
    "v2-bad-signature": (V2_SIGNATURE[:-1] + b"\x00\x21\x11\x00\x00", "no PROXY protocol"),
    "v2-version-1": (v2(0x11, ipv4("1.2.3.4", "5.6.7.8", 1, 2), ver_cmd=0x11), "nibble is 1"),
    "v2-version-3": (v2(0x11, ipv4("1.2.3.4", "5.6.7.8", 1, 2), ver_cmd=0x31), "nibble is 3"),
    "v2-command-2": (v2(0x11, ipv4("1.2.3.4", "5.6.7.8", 1, 2), ver_cmd=0x22), "command nibble"),
    "v2-udp4": (v2(0x12, ipv4("1.2.3.4", "5.6.7.8", 1, 2)), "UDP (DGRAM) connections are not"),
    "v2-udp6": (v2(0x22, ipv6("::1", "::2", 1, 2)), "UDP (DGRAM)"),
    "v2-unix": (v2(0x31, b"\x00" * 216), "UNIX socket addresses are not supported"),
    "v2-unix-dgram": (v2(0x32, b"\x00" * 216), "UNIX socket"),
    "v2-unspec-proxy": (v2(0x00), "byte 0x00 is not supported"),
    "v2-unknown-family": (v2(0x41, b"\x00" * 12), "byte 0x41 is not supported"),
    "v2-over-cap": (v2(0x11, ipv4("1.2.3.4", "5.6.7.8", 1, 2), length=4097), "limit of 4096"),
    "v2-local-over-cap": (v2(0x00, ver_cmd=0x20, length=0xFFFF), "declares 65535 bytes"),
    "v2-short-ipv4": (v2(0x11, b"\x00" * 8), "v2 length 8 is too short for IPv4"),
    "v2-short-ipv6": (v2(0x21, ipv4("1.2.3.4", "5.6.7.8", 1, 2)), "12 is too short for IPv6"),
    "v2-tlv-value-overrun": (
        v2(0x11, ipv4("1.2.3.4", "5.6.7.8", 1, 2), tlv(0x01, b"ldap")[:-1]),
        "TLV value overruns",
    ),
    "v2-tlv-header-overrun": (
        v2(0x11, ipv4("1.2.3.4", "5.6.7.8", 1, 2), b"\x01\x00"),
        "TLV header",
    ),
}


@pytest.mark.parametrize(("raw", "fragment"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_input_is_rejected_with_a_reason(raw: bytes, fragment: str) -> None:
    """Each malformed input raises ProxyProtocolError whose message says what is wrong."""
    with pytest.raises(ProxyProtocolError, match=re.escape(fragment)):
        parse(raw + LDAP_BIND)


@pytest.mark.parametrize(
    "first_bytes",
    [
        pytest.param(b"\x30", id="ldap"),
        pytest.param(b"G", id="http"),
        pytest.param(b"\x16\x03\x01", id="tls-client-hello"),
        pytest.param(b"PROXY\r", id="v1-no-space"),
        pytest.param(b"PROXY TCP4 \x00", id="v1-binary"),
        pytest.param(V2_SIGNATURE[:5] + b"\x30", id="v2-signature-diverges"),
        pytest.param(V2_SIGNATURE + b"\x11", id="v2-version"),
        pytest.param(V2_SIGNATURE + b"\x21\x12", id="v2-udp"),
    ],
)
def test_impossible_start_fails_at_once(first_bytes: bytes) -> None:
    """As soon as the first bytes can't begin a header, feed raises instead of waiting."""
    with pytest.raises(ProxyProtocolError):
        ProxyHeaderParser().feed(first_bytes)


def test_v1_without_crlf_fails_on_the_107th_byte() -> None:
    """A v1 line is buffered up to 106 bytes, and the 107th byte without CRLF is an error."""
    parser = ProxyHeaderParser()
    line = b"PROXY UNKNOWN " + b"a" * 200
    for i in range(V1_MAX_LENGTH - 1):
        assert parser.feed(line[i : i + 1]) is None
    with pytest.raises(ProxyProtocolError, match="no CRLF within 107 bytes"):
        parser.feed(line[V1_MAX_LENGTH - 1 : V1_MAX_LENGTH])


def test_v2_over_cap_fails_before_the_body_arrives() -> None:
    """An oversized v2 length is refused from the fixed 16 bytes alone, before buffering more."""
    parser = ProxyHeaderParser()
    with pytest.raises(ProxyProtocolError, match="declares 4097 bytes"):
        parser.feed(v2(length=DEFAULT_MAX_V2_LENGTH + 1))


def test_v2_length_at_the_cap_is_accepted() -> None:
    """A v2 header declaring exactly max_v2_length bytes (padded with a NOOP TLV) parses."""
    block = ipv4("1.2.3.4", "5.6.7.8", 1, 2)
    raw = v2(0x11, block, tlv(0x04, bytes(DEFAULT_MAX_V2_LENGTH - len(block) - 3)))
    assert len(raw) == 16 + DEFAULT_MAX_V2_LENGTH
    assert parse(raw) == (ProxyHeader(("1.2.3.4", 1), ("5.6.7.8", 2)), b"")


def test_max_v2_length_is_configurable() -> None:
    """A smaller max_v2_length admits bare addresses but refuses the same header with a TLV."""
    block = ipv4("1.2.3.4", "5.6.7.8", 1, 2)
    assert parse(v2(0x11, block), max_v2_length=12)[0] is not None
    with pytest.raises(ProxyProtocolError, match="limit of 12"):
        parse(v2(0x11, block, tlv(0x04, b"")), max_v2_length=12)
    with pytest.raises(ValueError, match="negative"):
        ProxyHeaderParser(max_v2_length=-1)


def test_error_messages_do_not_echo_much_input() -> None:
    """A long hostile field appears in the message only as a short prefix."""
    evil = b"1" * 60
    with pytest.raises(ProxyProtocolError) as info:
        parse(b"PROXY TCP4 " + evil + b" 5.6.7.8 1 2\r\n")
    assert "1" * 9 not in str(info.value)
    assert len(str(info.value)) < 80


def test_feeding_after_completion_is_a_programming_error() -> None:
    """Once the header is returned, later bytes belong to the real protocol, not the parser."""
    parser = ProxyHeaderParser()
    assert parser.feed(b"PROXY UNKNOWN\r\nab") == LOCAL
    with pytest.raises(RuntimeError, match="already finished"):
        parser.feed(b"cd")
    assert parser.rest == b"ab"


def test_feeding_after_an_error_is_a_programming_error() -> None:
    """A parser that rejected its input stays rejected instead of resynchronising."""
    parser = ProxyHeaderParser()
    with pytest.raises(ProxyProtocolError):
        parser.feed(LDAP_BIND)
    with pytest.raises(RuntimeError):
        parser.feed(b"PROXY UNKNOWN\r\n")


@pytest.mark.parametrize(
    "raw",
    [pytest.param(raw, id=repr(raw[-40:])) for raw, addrs in VALID_V1 if addrs]
    + [pytest.param(raw, id=f"v2-{i}") for i, (raw, addrs) in enumerate(VALID_V2) if addrs],
)
def test_agrees_with_twisted(raw: bytes) -> None:
    """Twisted's own parsers read the same addresses and ports from each TCP header."""
    from twisted.protocols.haproxy._v1parser import V1Parser
    from twisted.protocols.haproxy._v2parser import V2Parser

    info = V1Parser.parse(raw[:-2]) if raw.startswith(b"PROXY") else V2Parser.parse(raw)
    ours, _ = parse(raw)
    assert ours is not None
    theirs = [
        (str(ipaddress.ip_address(a.host)), a.port)  # type: ignore[union-attr]
        for a in (info.source, info.destination)
    ]
    assert [ours.source, ours.destination] == theirs
