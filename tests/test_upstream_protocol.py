"""UpstreamProtocol's delivery of received PDUs to its sink: everything that arrives in one
loop pass (the TLS layer hands over one record at a time) reaches the session as one
batch, in order, and nothing is lost or reordered when the connection closes."""

from __future__ import annotations

from typing import Any

import pytest
from support.fakes import result, search_entry, starttls_request
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from ldapproxy import messages as m
from ldapproxy.ber import Frame
from ldapproxy.config import UpstreamURL
from ldapproxy.upstream import UpstreamProtocol, UpstreamState


class Sink:
    """Records what the connection delivers."""

    def __init__(self) -> None:
        self.batches: list[list[Frame]] = []
        self.events: list[str] = []

    def upstream_frames(self, frames: list[Frame]) -> None:
        self.batches.append(frames)
        self.events.append(f"frames {[frame.message_id for frame in frames]}")

    def upstream_lost(self, reason: str) -> None:
        self.events.append("lost")


class TLSTransport(StringTransport):
    """A StringTransport with the startTLS an upstream connection calls."""

    def __init__(self) -> None:
        super().__init__()
        self.tls_started = False

    def startTLS(self, context: Any) -> None:
        self.tls_started = True


def ready_connection() -> tuple[UpstreamProtocol, Clock, Sink, StringTransport]:
    clock = Clock()
    verifier: Any = None
    protocol = UpstreamProtocol(UpstreamURL("ldaps", "dc1.example.com", 636), verifier, clock)
    transport = TLSTransport()
    protocol.makeConnection(transport)
    protocol.state = UpstreamState.READY  # as after a verified handshake
    sink = Sink()
    protocol.attach(sink)
    return protocol, clock, sink, transport


def test_records_of_one_pass_reach_the_session_as_one_batch() -> None:
    protocol, clock, sink, _ = ready_connection()
    entries = [search_entry(7, b"uid=user%d,dc=example,dc=com" % i) for i in range(3)]
    done = result(7, m.SEARCH_RESULT_DONE)
    for pdu in [*entries, done]:
        protocol.dataReceived(pdu)
    assert sink.batches == [], "nothing before the end of the loop pass"
    clock.advance(0)
    assert len(sink.batches) == 1
    assert [frame.data for frame in sink.batches[0]] == [*entries, done]


def test_a_pdu_split_across_records_is_reassembled() -> None:
    protocol, clock, sink, _ = ready_connection()
    pdu = search_entry(3, b"uid=" + b"x" * 300 + b",dc=example,dc=com")
    protocol.dataReceived(pdu[:5])
    clock.advance(0)
    assert sink.batches == []
    protocol.dataReceived(pdu[5:100])
    protocol.dataReceived(pdu[100:])
    clock.advance(0)
    assert [frame.data for frame in sink.batches[0]] == [pdu]


def test_each_pass_is_its_own_batch() -> None:
    protocol, clock, sink, _ = ready_connection()
    protocol.dataReceived(result(1, m.BIND_RESPONSE))
    clock.advance(0)
    protocol.dataReceived(result(2, m.BIND_RESPONSE))
    clock.advance(0)
    assert sink.events == ["frames [1]", "frames [2]"]


def test_what_arrived_before_the_close_is_delivered_before_the_loss() -> None:
    """A Notice of Disconnection followed by the close: the session sees the notice first."""
    protocol, clock, sink, _ = ready_connection()
    protocol.dataReceived(result(4, m.SEARCH_RESULT_DONE))
    protocol.dataReceived(m.notice_of_disconnection(m.UNAVAILABLE, "going down"))
    protocol.connectionLost(Failure(ConnectionDone()))
    assert sink.events == ["frames [4, 0]", "lost"]
    clock.advance(0)
    assert sink.events == ["frames [4, 0]", "lost"], "delivered exactly once"
    assert clock.getDelayedCalls() == []


def test_a_framing_error_closes_the_connection() -> None:
    protocol, clock, sink, transport = ready_connection()
    protocol.dataReceived(b"\x30\x84\xff\xff\xff\xff")  # a 4 GiB PDU: over the upstream limit
    clock.advance(0)
    assert transport.disconnecting or transport.disconnected
    assert sink.batches == []


@pytest.mark.parametrize("extra", [b"", b"\x30\x03\x02\x01\x05"])
def test_starttls_response_still_checked_for_trailing_bytes(extra: bytes) -> None:
    """ldap:// upstreams: anything after the StartTLS response in the same read (command
    injection from the upstream side) fails the connection instead of being kept."""
    clock = Clock()
    verifier: Any = None
    protocol = UpstreamProtocol(UpstreamURL("ldap", "dc1.example.com", 389), verifier, clock)
    transport = TLSTransport()
    protocol.makeConnection(transport)
    assert transport.value() == starttls_request(1)
    assert protocol.state is UpstreamState.STARTTLS
    protocol.dataReceived(m.extended_response(1, m.SUCCESS, ""))
    protocol.dataReceived(extra)
    clock.advance(0)
    if extra:
        assert not transport.tls_started
        assert transport.disconnecting or transport.disconnected
    else:
        assert transport.tls_started
        assert protocol.state is UpstreamState.HANDSHAKE
