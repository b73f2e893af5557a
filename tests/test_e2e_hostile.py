"""End to end: hostile or broken clients are closed, alone, with a protocol error."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from support.proxy import Listener, ProxyProcess, proxy_config
from support.rawldap import RawClient, simple_bind, whoami
from support.slapd import ALICE_DN, USERS, Slapd

from ldapproxy import messages as m
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
