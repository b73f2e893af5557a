"""End to end: hostile or broken clients are closed, alone, with a protocol error."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support.proxy import Listener, ProxyProcess, proxy_config
from support.rawldap import RawClient, simple_bind, whoami
from support.slapd import ALICE_DN, SUFFIX, USERS, Slapd

from ldapproxy import messages as m
from ldapproxy.ber import OCTET_STRING, SEQUENCE, encode_integer, encode_message, tlv
from ldapproxy.pki import CertificateAuthority


@pytest.fixture(scope="module")
def proxy(
    ca: CertificateAuthority, slapd: Slapd, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ProxyProcess, Listener]]:
    """A proxy with one plain listener and the default limits."""
    config, (listener,) = proxy_config(
        tmp_path_factory.mktemp("proxy"),
        ca,
        [slapd.ldaps_url],
        listeners=[Listener("none", "plain")],
    )
    process = ProxyProcess(config).start()
    try:
        yield process, listener
    finally:
        process.stop()


def assert_protocol_error_notice(frames) -> None:
    """Exactly one PDU came back: a Notice of Disconnection with protocolError."""
    assert len(frames) == 1, frames
    (notice,) = frames
    assert notice.message_id == 0
    assert m.extended_response_name(notice.data) == m.NOTICE_OF_DISCONNECTION_OID
    assert m.result_code(notice.data) == m.PROTOCOL_ERROR


BAD_INPUT = {
    "not-ber": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "indefinite-length": b"\x30\x80\x02\x01\x01\x42\x00\x00\x00",
    "negative-message-id": b"\x30\x05\x02\x01\xff\x42\x00",
    "message-id-zero": b"\x30\x05\x02\x01\x00\x42\x00",
    "response-tag-from-client": b"\x30\x0c\x02\x01\x01\x61\x07\x0a\x01\x00\x04\x00\x04\x00",
    "no-message-id": b"\x30\x03\x42\x01\x00",
    # RFC 4511 §4.1.1: a protocolOp that is no LDAP request, answered by the proxy itself.
    "unknown-protocol-op": b"\x30\x05\x02\x01\x01\x5e\x00",
    "multi-octet-op-tag": b"\x30\x06\x02\x01\x01\x7f\x01\x00",
}


@pytest.mark.parametrize("name", sorted(BAD_INPUT))
def test_malformed_pdu_gets_protocol_error_notice_and_close(proxy, name: str) -> None:
    """Malformed input gets a protocolError Notice of Disconnection, a close and a log line."""
    process, listener = proxy
    with RawClient(listener.port) as client:
        port = client.sock.getsockname()[1]
        client.send(BAD_INPUT[name])
        assert_protocol_error_notice(client.read_until_closed())
    process.wait_for_log(rf"conn=\d+ 127\.0\.0\.1:{port} closing: protocol error")


def test_oversized_pdu_is_refused_from_its_header(proxy) -> None:
    """A length header above limits.max_pdu_bytes closes the client before the body is sent."""
    process, listener = proxy
    with RawClient(listener.port) as client:
        port = client.sock.getsockname()[1]
        # 16 MiB announced, only the header sent: the proxy must not wait for the body.
        client.send(b"\x30\x84\x01\x00\x00\x00\x02\x01\x01")
        assert_protocol_error_notice(client.read_until_closed())
    process.wait_for_log(
        rf"conn=\d+ 127\.0\.0\.1:{port} closing: protocol error: PDU of 16777222 bytes "
        r"exceeds limits.max_pdu_bytes = 1048576"
    )


def test_bad_client_does_not_disturb_others(proxy) -> None:
    """A well-behaved client keeps working while another is closed for garbage."""
    _, listener = proxy
    with RawClient(listener.port) as good:
        good.send(simple_bind(1, ALICE_DN, USERS[ALICE_DN]))
        assert m.result_code(good.read_frame().data) == m.SUCCESS
        with RawClient(listener.port) as bad:
            bad.send(b"\x00" * 64)
            assert_protocol_error_notice(bad.read_until_closed())
        good.send(whoami(2))
        frame = good.read_frame()
        assert (frame.message_id, m.result_code(frame.data)) == (2, m.SUCCESS)


def test_reused_outstanding_message_id_is_protocol_error(proxy) -> None:
    """Two requests with the same message ID in flight close the connection."""
    _, listener = proxy
    with RawClient(listener.port) as client:
        client.send(whoami(4) + whoami(4))
        frames = client.read_until_closed()
    notices = [f for f in frames if f.message_id == 0]
    assert len(notices) == 1
    assert m.result_code(notices[0].data) == m.PROTOCOL_ERROR


#: RFC 4511 invalidDNSyntax.
INVALID_DN_SYNTAX = 34


def bind_with_dn(message_id: int, dn: bytes) -> bytes:
    """A simple BindRequest for ``dn`` with a dummy password."""
    body = encode_integer(3) + tlv(OCTET_STRING, dn) + tlv(0x80, b"password")
    return encode_message(message_id, tlv(m.BIND_REQUEST, body))


def nested_filter_search(message_id: int, depth: int) -> bytes:
    """A subtree search whose filter is ``depth`` and-filters around (objectClass=*)."""
    nested = tlv(0x87, b"objectClass")
    for _ in range(depth):
        nested = tlv(0xA0, nested)
    body = (
        tlv(OCTET_STRING, SUFFIX.encode())
        + b"\x0a\x01\x02\x0a\x01\x00\x02\x01\x00\x02\x01\x00\x01\x01\x00"
        + nested
        + tlv(SEQUENCE, b"")
    )
    return encode_message(message_id, tlv(m.SEARCH_REQUEST, body))


def test_bind_with_a_dn_past_max_pdu_bytes_is_refused_from_its_header(proxy) -> None:
    """A 2 MiB bind DN: protocolError notice and close, one log line naming the limit."""
    process, listener = proxy
    with RawClient(listener.port) as client:
        port = client.sock.getsockname()[1]
        pdu = bind_with_dn(1, b"cn=" + b"x" * (2 << 20) + b"," + SUFFIX.encode())
        # The first 64 kB only: the proxy must decide from the length header, and more
        # bytes sent after its close would make the kernel reset the connection.
        client.send(pdu[:65536])
        assert_protocol_error_notice(client.read_until_closed())
    process.wait_for_log(
        rf"conn=\d+ 127\.0\.0\.1:{port} closing: protocol error: PDU of \d+ bytes "
        r"exceeds limits.max_pdu_bytes = 1048576"
    )


def test_bind_with_a_huge_dn_under_the_limit_is_answered_by_the_directory(proxy) -> None:
    """A 200 kB DN is forwarded unchanged; the directory refuses it (invalidDNSyntax) and
    the session goes on."""
    _, listener = proxy
    with RawClient(listener.port) as client:
        client.send(bind_with_dn(1, b"cn=" + b"x" * 200_000 + b"," + SUFFIX.encode()))
        frame = client.read_frame()
        assert (frame.message_id, frame.op) == (1, m.BIND_RESPONSE)
        assert m.result_code(frame.data) == INVALID_DN_SYNTAX
        client.send(whoami(2))
        assert m.result_code(client.read_frame().data) == m.SUCCESS


def test_a_filter_nested_10000_deep_is_refused(proxy) -> None:
    """Without plugins the proxy forwards it unread; slapd refuses it with its own
    protocolError notice, which the client gets, and the proxy logs the lost connection."""
    process, listener = proxy
    with RawClient(listener.port) as client:
        port = client.sock.getsockname()[1]
        client.send(nested_filter_search(1, 10_000))
        assert_protocol_error_notice(client.read_until_closed())
    process.wait_for_log(rf"conn=\d+ 127\.0\.0\.1:{port} upstream connection lost")


@pytest.fixture(scope="module")
def audited(
    ca: CertificateAuthority, slapd: Slapd, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ProxyProcess, Listener]]:
    """A proxy with the audit plugin, which makes it decode every request's fields."""
    workdir = tmp_path_factory.mktemp("audited")
    config, (listener,) = proxy_config(
        workdir,
        ca,
        [slapd.ldaps_url],
        listeners=[Listener("none", "plain")],
        plugins=[{"use": "audit", "path": str(workdir / "audit.jsonl")}],
    )
    process = ProxyProcess(config).start()
    try:
        yield process, listener
    finally:
        process.stop()


def test_a_filter_nested_10000_deep_is_refused_by_the_field_decoder(audited) -> None:
    """With a plugin that reads search fields, the proxy's bounded decoder refuses it
    itself: protocolError notice, close, one log line, nothing sent to the directory."""
    process, listener = audited
    with RawClient(listener.port) as client:
        port = client.sock.getsockname()[1]
        client.send(nested_filter_search(1, 10_000))
        assert_protocol_error_notice(client.read_until_closed())
    process.wait_for_log(
        rf"conn=\d+ 127\.0\.0\.1:{port} closing: protocol error: undecodable search "
        r"request: filter nested more than 64 deep"
    )
