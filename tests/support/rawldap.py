"""A minimal raw-socket LDAP client for tests that must control every byte on the wire."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

from ldapproxy import messages as m
from ldapproxy.ber import OCTET_STRING, Frame, Framer, encode_integer, encode_message, tlv


def simple_bind(message_id: int, dn: str, password: str) -> bytes:
    """A BindRequest (LDAPv3, simple authentication)."""
    body = encode_integer(3) + tlv(OCTET_STRING, dn.encode()) + tlv(0x80, password.encode())
    return encode_message(message_id, tlv(m.BIND_REQUEST, body))


def whoami(message_id: int) -> bytes:
    """A WhoAmI extended request (RFC 4532)."""
    return m.extended_request(message_id, m.WHOAMI_OID)


def starttls(message_id: int) -> bytes:
    """A StartTLS extended request."""
    return m.extended_request(message_id, m.STARTTLS_OID)


def subtree_search(message_id: int, base: str, controls: bytes = b"") -> bytes:
    """A subtree search with filter (objectClass=*) returning all user attributes;
    ``controls`` is the encoded [0] Controls element, if any."""
    body = (
        tlv(OCTET_STRING, base.encode())
        + encode_integer(2, 0x0A)
        + encode_integer(0, 0x0A)
        + encode_integer(0)
        + encode_integer(0)
        + tlv(0x01, b"\x00")
        + tlv(0x87, b"objectClass")
        + tlv(0x30, b"")
    )
    return encode_message(message_id, tlv(m.SEARCH_REQUEST, body), controls)


def extended_value(pdu: bytes) -> bytes | None:
    """The responseValue [11] of an ExtendedResponse, if present."""
    from ldapproxy.ber import read_tlv

    _, start, end = read_tlv(pdu, 0, len(pdu))
    _, _, pos = read_tlv(pdu, start, end)
    _, op_start, op_end = read_tlv(pdu, pos, end)
    pos = op_start
    for _ in range(3):
        pos = read_tlv(pdu, pos, op_end)[2]
    while pos < op_end:
        tag, value_start, value_end = read_tlv(pdu, pos, op_end)
        if tag == 0x8B:
            return pdu[value_start:value_end]
        pos = value_end
    return None


class RawClient:
    """A blocking LDAP connection that sends raw bytes and reads whole PDUs."""

    def __init__(self, port: int, timeout: float = 10, receive_buffer: int | None = None) -> None:
        sock = socket.socket()
        if receive_buffer is not None:
            # Set before connecting, so the TCP window is negotiated small.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.settimeout(timeout)
        sock.connect(("127.0.0.1", port))
        self.sock: socket.socket | ssl.SSLSocket = sock
        self._framer = Framer(2**30)
        self._frames: list[Frame] = []

    def send(self, data: bytes) -> None:
        """Write bytes exactly as given."""
        self.sock.sendall(data)

    def start_tls(self, ca_path: Path) -> None:
        """Wrap the connection in TLS (after a successful StartTLS), verifying the proxy."""
        context = ssl.create_default_context(cafile=str(ca_path))
        context.check_hostname = False
        self.sock = context.wrap_socket(self.sock)

    def read_frame(self) -> Frame:
        """The next whole PDU; raises ConnectionError if the peer closed first."""
        while not self._frames:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("connection closed by the proxy")
            self._frames.extend(self._framer.feed(data))
        return self._frames.pop(0)

    def read_until_closed(self, limit: int = 1000) -> list[Frame]:
        """Every PDU until the peer closes the connection."""
        frames = []
        try:
            for _ in range(limit):
                frames.append(self.read_frame())
        except (ConnectionError, OSError):
            pass
        return frames

    def is_closed(self, timeout: float = 5) -> bool:
        """Whether the peer closes the connection (EOF or reset) within ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
                self._frames.extend(self._framer.feed(data))
        except (ConnectionResetError, ssl.SSLError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        """Close the socket."""
        self.sock.close()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
