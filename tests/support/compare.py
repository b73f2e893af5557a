"""Helpers for the end-to-end forwarding tests: one slapd with one proxy in front of it,
running the same client directly and through the proxy, and a tiny raw-socket LDAP client.

The proxy's connection to slapd is always TLS, so the direct run a proxied run is compared
with is always a TLS-protected one with the *same client flags*:

* ``none`` listener, no flags: compared with ``ldaps://`` straight to slapd;
* ``starttls-optional`` and ``starttls-required``, ``-ZZ``: with ``ldap://`` + ``-ZZ``;
* ``ldaps`` listener, no flags: with ``ldaps://``.

Same flags means the same message IDs on the wire (``-ZZ`` spends message ID 1 on StartTLS,
and ldapsearch prints ``search: <message ID>``), and TLS on the direct leg means slapd
answers as it answers the proxy (over plain LDAP it hides the SASL mechanisms PLAIN and
LOGIN, for instance).

The raw client deliberately does not use :mod:`ldapproxy.ber`: the code under test should
not also build the test's requests or check its answers.
"""

from __future__ import annotations

import base64
import contextlib
import re
import socket
import ssl
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from ldapproxy.pki import CertificateAuthority

from .ldaptools import run_ldap_tool
from .net import LOOPBACK
from .proxy import Listener, ProxyProcess, proxy_config
from .slapd import Slapd

# -- a slapd with a proxy in front of it ----------------------------------------------------

MODES = ("none", "starttls-optional", "starttls-required", "ldaps")


@dataclass(frozen=True)
class Route:
    """One proxy listener, how clients use it, and the direct path it is compared with."""

    mode: str
    url: str
    port: int
    flags: tuple[str, ...]
    direct_url: str
    direct_port: int

    @property
    def implicit_tls(self) -> bool:
        """Whether a client starts TLS as soon as it connects (ldaps)."""
        return self.url.startswith("ldaps://")


class Outcome(NamedTuple):
    """What an ldap-utils command did: exit status, stdout and stderr (normalised)."""

    returncode: int
    stdout: str
    stderr: str


#: slapd's sssvlv answer while it still holds sort state for a reused connection slot.
_SORT_BUSY = "text: Other sort requests already in progress"


@dataclass
class Stack:
    """A running slapd and a running ``ldapproxy run`` with one listener per TLS mode."""

    slapd: Slapd
    proxy: ProxyProcess
    listeners: dict[str, Listener]

    @property
    def env(self) -> dict[str, str]:
        return self.slapd.ldap_env()

    @property
    def ca_path(self) -> Path:
        return self.slapd.ca_path

    def route(self, mode: str) -> Route:
        listener = self.listeners[mode]
        if mode.startswith("starttls"):
            flags: tuple[str, ...] = ("-ZZ",)
            direct_url, direct_port = self.slapd.ldap_url, self.slapd.ldap_port
        else:
            flags = ()
            direct_url, direct_port = self.slapd.ldaps_url, self.slapd.ldaps_port
        return Route(mode, listener.url, listener.port, flags, direct_url, direct_port)

    def run(
        self, route: Route, tool: str, args: Sequence[str], *, direct: bool = False, **kwargs: str
    ) -> Outcome:
        """Run ``tool`` with ``args`` through ``route`` (or directly, as its reference)."""
        url = route.direct_url if direct else route.url
        result = run_ldap_tool([tool, *route.flags, "-H", url, *args], self.env, **kwargs)
        return Outcome(result.returncode, normalise(result.stdout), result.stderr)

    def both(
        self, route: Route, tool: str, args: Sequence[str], **kwargs: str
    ) -> tuple[Outcome, Outcome]:
        """``(direct, proxied)`` outcomes of the same command; direct runs first.

        slapd's sssvlv overlay keeps sort state per connection slot and frees it only when
        it has processed an earlier connection's close, so a sort request on a new
        connection can get ``busy`` ("Other sort requests already in progress") from slapd
        itself, on either path.  That pair, and only that, is run again.
        """
        for attempt in range(5):
            direct = self.run(route, tool, args, direct=True, **kwargs)
            proxied = self.run(route, tool, args, **kwargs)
            if not any(_SORT_BUSY in outcome.stdout for outcome in (direct, proxied)):
                break
            time.sleep(0.25 * 2**attempt)
        return direct, proxied

    def direct_tool(self, tool: str, args: Sequence[str], **kwargs: str) -> Outcome:
        """Run ``tool`` straight against slapd over ldaps (for setup and verification)."""
        result = run_ldap_tool([tool, "-H", self.slapd.ldaps_url, *args], self.env, **kwargs)
        return Outcome(result.returncode, result.stdout, result.stderr)

    def raw(self, route: Route, *, direct: bool = False, timeout: float = 5.0) -> RawClient:
        """A raw LDAP connection through ``route`` (or directly, as its reference); on the
        StartTLS routes the client starts TLS first, with message ID 1."""
        url = route.direct_url if direct else route.url
        port = route.direct_port if direct else route.port
        client = RawClient(
            LOOPBACK,
            port,
            cafile=self.ca_path,
            implicit_tls=url.startswith("ldaps://"),
            timeout=timeout,
        )
        if route.flags:
            try:
                client.start_tls(1)
            except BaseException:
                client.close()
                raise
        return client

    def ldap3(self, route: Route, dn: str, password: str, *, direct: bool = False) -> Any:
        """An opened (not bound) ``ldap3.Connection`` through ``route`` or directly: over
        TLS from the start for ldaps, with ``start_tls()`` where ldap-utils use ``-ZZ``."""
        ldap3 = import_ldap3()
        url = route.direct_url if direct else route.url
        port = route.direct_port if direct else route.port
        tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=str(self.ca_path))
        server = ldap3.Server(LOOPBACK, port=port, use_ssl=url.startswith("ldaps://"), tls=tls)
        conn = ldap3.Connection(server, user=dn, password=password)
        conn.open()
        if route.flags and not conn.start_tls():
            conn.unbind()
            raise ConnectionError(f"ldap3 start_tls failed: {conn.result}")
        return conn

    def proxy_log_problems(self) -> list[str]:
        """Lines of the proxy's log at level error or critical, or about unhandled errors."""
        bad = re.compile(r"^\S+ (error|critical) |Traceback|Unhandled")
        return [line for line in self.proxy.log_text().splitlines() if bad.search(line)]


def import_ldap3() -> Any:
    """The ldap3 module, imported without tripping ``filterwarnings = error``."""
    with warnings.catch_warnings():
        # ldap3 2.9.1 imports tagMap/typeMap, which pyasn1 >= 0.6 deprecates on access.
        warnings.simplefilter("ignore", DeprecationWarning)
        import ldap3
    return ldap3


@contextlib.contextmanager
def running_stack(
    ca: CertificateAuthority,
    workdir: Path,
    *,
    upstream: str = "ldaps",
) -> Iterator[Stack]:
    """Start a fresh slapd and a proxy in front of it (upstream over ``ldaps`` or
    ``starttls``); stop both, by PID, when the block ends."""
    slapd = Slapd(workdir / "slapd", ca)
    slapd.start()
    try:
        upstream_url = slapd.ldaps_url if upstream == "ldaps" else slapd.ldap_url
        config, listeners = proxy_config(workdir / "proxy", ca, [upstream_url])
        proxy = ProxyProcess(config)
        try:
            proxy.start()
            yield Stack(slapd, proxy, {listener.tls: listener for listener in listeners})
        finally:
            proxy.stop()
    finally:
        slapd.stop()


# -- ldapsearch output -----------------------------------------------------------------

VLV_RESPONSE_OID = "2.16.840.1.113730.3.4.10"
_VLV_CONTROL = re.compile(rf"^(control: {re.escape(VLV_RESPONSE_OID)} \w+ )(\S+)$", re.MULTILINE)
_VLV_CONTEXT = re.compile(r"^(vlvResult: .*context=)(\S+)", re.MULTILINE)


def normalise(output: str) -> str:
    """Mask the one volatile part of ldapsearch output: slapd's VLV contextID.

    slapd's sssvlv makes the contextID from a memory address, so it differs between any
    two connections, direct or not.  Everything else in the response control (target
    position, content count, result) stays and is compared.
    """

    def mask_control(match: re.Match[str]) -> str:
        return match.group(1) + _mask_vlv_context(match.group(2))

    output = _VLV_CONTROL.sub(mask_control, output)
    return _VLV_CONTEXT.sub(lambda match: match.group(1) + "<context>", output)


def _mask_vlv_context(b64: str) -> str:
    try:
        value = base64.b64decode(b64, validate=True)
        tag, start, end = read_tlv(value, 0)
        if tag != 0x30:
            return b64
        pos = start
        kept = b""
        for _ in range(3):  # targetPosition, contentCount, virtualListViewResult
            _, _, element_end = read_tlv(value, pos)
            kept += value[pos:element_end]
            pos = element_end
        if pos < end:  # contextID
            kept += tlv(0x04, b"<context>")
        return base64.b64encode(tlv(0x30, kept)).decode("ascii")
    except (ValueError, IndexError):
        return b64


def ldif_values(output: str, attribute: str) -> list[str]:
    """The values of ``attribute`` in (unwrapped) LDIF output."""
    unwrapped = output.replace("\n ", "")
    pattern = rf"^{re.escape(attribute)}: (.*)$"
    return re.findall(pattern, unwrapped, flags=re.MULTILINE | re.IGNORECASE)


# -- BER, just enough to speak LDAP on a raw socket -----------------------------------------

SEARCH_REQUEST = 0x63
SEARCH_RESULT_ENTRY = 0x64
SEARCH_RESULT_DONE = 0x65
SEARCH_RESULT_REFERENCE = 0x73
BIND_RESPONSE = 0x61
EXTENDED_RESPONSE = 0x78
INTERMEDIATE_RESPONSE = 0x79
FINAL_RESPONSES = frozenset({0x61, 0x65, 0x67, 0x69, 0x6B, 0x6D, 0x6F, 0x78})

WHOAMI_OID = "1.3.6.1.4.1.4203.1.11.3"
CANCEL_OID = "1.3.6.1.1.8"
STARTTLS_OID = "1.3.6.1.4.1.1466.20037"
SYNC_REQUEST_OID = "1.3.6.1.4.1.4203.1.9.1.1"
PAGED_RESULTS_OID = "1.2.840.113556.1.4.319"

SCOPE_BASE, SCOPE_ONE, SCOPE_SUB = 0, 1, 2


def _length(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(body),)) + body


def tlv(tag: int, content: bytes) -> bytes:
    """One BER element with a one-octet tag."""
    return bytes((tag,)) + _length(len(content)) + content


def integer(value: int, tag: int = 0x02) -> bytes:
    """A minimal two's-complement INTEGER (or ENUMERATED with ``tag=0x0A``)."""
    size = max(1, (value.bit_length() + 8) // 8)
    return tlv(tag, value.to_bytes(size, "big", signed=True))


def octets(value: str | bytes, tag: int = 0x04) -> bytes:
    """An OCTET STRING (or an implicitly tagged one)."""
    return tlv(tag, value.encode() if isinstance(value, str) else value)


def read_tlv(data: bytes, pos: int) -> tuple[int, int, int]:
    """``(tag, content_start, content_end)`` of the element at ``data[pos:]``."""
    tag = data[pos]
    first = data[pos + 1]
    if first < 0x80:
        start, length = pos + 2, first
    else:
        count = first & 0x7F
        start = pos + 2 + count
        length = int.from_bytes(data[pos + 2 : start], "big")
    end = start + length
    if end > len(data):
        raise ValueError("truncated BER element")
    return tag, start, end


def control(oid: str, critical: bool = False, value: bytes | None = None) -> bytes:
    """An LDAP Control."""
    body = octets(oid)
    if critical:
        body += tlv(0x01, b"\xff")
    if value is not None:
        body += octets(value)
    return tlv(0x30, body)


def message(message_id: int, op: bytes, controls: Sequence[bytes] = ()) -> bytes:
    """An LDAPMessage around an encoded protocolOp."""
    body = integer(message_id) + op
    if controls:
        body += tlv(0xA0, b"".join(controls))
    return tlv(0x30, body)


def simple_bind(dn: str = "", password: str = "") -> bytes:
    return tlv(0x60, integer(3) + octets(dn) + octets(password, 0x80))


def sasl_bind(mechanism: str, credentials: bytes | None = None, dn: str = "") -> bytes:
    sasl = octets(mechanism)
    if credentials is not None:
        sasl += octets(credentials)
    return tlv(0x60, integer(3) + octets(dn) + tlv(0xA3, sasl))


def present(attribute: str) -> bytes:
    """The filter ``(attribute=*)``."""
    return octets(attribute, 0x87)


def equals(attribute: str, value: str) -> bytes:
    """The filter ``(attribute=value)``."""
    return tlv(0xA3, octets(attribute) + octets(value))


def search(
    base: str,
    scope: int = SCOPE_BASE,
    filter: bytes | None = None,
    attributes: Sequence[str] = (),
    size_limit: int = 0,
) -> bytes:
    body = (
        octets(base)
        + integer(scope, 0x0A)
        + integer(0, 0x0A)  # derefAliases: never
        + integer(size_limit)
        + integer(0)  # timeLimit
        + tlv(0x01, b"\x00")  # typesOnly: FALSE
        + (present("objectClass") if filter is None else filter)
        + tlv(0x30, b"".join(octets(a) for a in attributes))
    )
    return tlv(SEARCH_REQUEST, body)


def extended(oid: str, value: bytes | None = None) -> bytes:
    body = octets(oid, 0x80)
    if value is not None:
        body += octets(value, 0x81)
    return tlv(0x77, body)


def abandon(message_id: int) -> bytes:
    return integer(message_id, 0x50)


def unbind() -> bytes:
    return tlv(0x42, b"")


def sync_request(mode: int) -> bytes:
    """The Sync Request control value: refreshOnly (1) or refreshAndPersist (3)."""
    return tlv(0x30, integer(mode, 0x0A))


class Pdu(NamedTuple):
    """One response LDAPMessage as received: message ID, protocolOp tag and raw bytes."""

    message_id: int
    op: int
    raw: bytes

    @property
    def result_code(self) -> int:
        """The resultCode of a response that carries an LDAPResult."""
        _, start, _ = read_tlv(self.raw, 0)
        _, _, id_end = read_tlv(self.raw, start)
        _, op_start, _ = read_tlv(self.raw, id_end)
        tag, value_start, value_end = read_tlv(self.raw, op_start)
        if tag != 0x0A:
            raise ValueError(f"op 0x{self.op:02x} carries no LDAPResult")
        return int.from_bytes(self.raw[value_start:value_end], "big", signed=True)

    @property
    def final(self) -> bool:
        return self.op in FINAL_RESPONSES


class RawClient:
    """A blocking LDAP client on a bare (or implicitly TLS-wrapped) TCP socket."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        cafile: Path,
        implicit_tls: bool = False,
        timeout: float = 5.0,
    ) -> None:
        self.host = host
        self.timeout = timeout
        self._context = ssl.create_default_context(cafile=str(cafile))
        self.sock: socket.socket = socket.create_connection((host, port), timeout=timeout)
        self._buffer = b""
        if implicit_tls:
            self._wrap()

    def _wrap(self) -> None:
        try:
            self.sock = self._context.wrap_socket(self.sock, server_hostname=self.host)
        except BaseException:
            self.sock.close()
            raise

    def start_tls(self, message_id: int) -> None:
        """StartTLS (RFC 4511 §4.14) with ``message_id``; the handshake verifies the
        server's certificate."""
        self.send(message(message_id, extended(STARTTLS_OID)))
        response = self.receive()
        if response is None or response.message_id != message_id or response.result_code:
            raise ConnectionError(f"StartTLS failed: {response}")
        self._wrap()

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, *messages: bytes) -> None:
        """Write ``messages`` to the socket in one ``sendall``."""
        self.sock.sendall(b"".join(messages))

    def _pdu_length(self) -> int | None:
        buf = self._buffer
        if len(buf) < 2:
            return None
        first = buf[1]
        if first < 0x80:
            return 2 + first
        count = first & 0x7F
        if len(buf) < 2 + count:
            return None
        return 2 + count + int.from_bytes(buf[2 : 2 + count], "big")

    def receive(self, timeout: float | None = None) -> Pdu | None:
        """The next whole response PDU; ``None`` if the server closed the connection.

        Raises :class:`TimeoutError` if nothing complete arrives within ``timeout``.
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            size = self._pdu_length()
            if size is not None and len(self._buffer) >= size:
                raw, self._buffer = self._buffer[:size], self._buffer[size:]
                _, start, _ = read_tlv(raw, 0)
                _, id_start, id_end = read_tlv(raw, start)
                message_id = int.from_bytes(raw[id_start:id_end], "big", signed=True)
                return Pdu(message_id, raw[id_end], raw)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no complete LDAP message within the timeout")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise TimeoutError("no complete LDAP message within the timeout") from None
            except (ConnectionResetError, ssl.SSLEOFError):
                chunk = b""
            if not chunk:
                if self._buffer:
                    raise ConnectionError("connection closed in the middle of a message")
                return None
            self._buffer += chunk

    def until_final(self, *message_ids: int, timeout: float | None = None) -> list[Pdu]:
        """Every PDU received until each of ``message_ids`` has had its final response."""
        waiting = set(message_ids)
        received = []
        while waiting:
            pdu = self.receive(timeout)
            if pdu is None:
                raise ConnectionError(f"connection closed while waiting for {sorted(waiting)}")
            received.append(pdu)
            if pdu.final:
                waiting.discard(pdu.message_id)
        return received

    def until(self, message_id: int, op: int, timeout: float | None = None) -> list[Pdu]:
        """Every PDU received up to and including one for ``message_id`` with tag ``op``."""
        received = []
        while True:
            pdu = self.receive(timeout)
            if pdu is None:
                raise ConnectionError(f"connection closed while waiting for {message_id}")
            received.append(pdu)
            if pdu.message_id == message_id and pdu.op == op:
                return received

    def until_closed(self, timeout: float) -> list[Pdu] | None:
        """Every PDU received before the server closed the connection, or ``None`` if it
        is still open after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        received = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                pdu = self.receive(remaining)
            except TimeoutError:
                return None
            if pdu is None:
                return received
            received.append(pdu)

    def quiet_for(self, seconds: float) -> list[Pdu]:
        """Every PDU that arrives within ``seconds`` (normally none); EOF ends it early."""
        deadline = time.monotonic() + seconds
        received = []
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                pdu = self.receive(remaining)
            except TimeoutError:
                break
            if pdu is None:
                break
            received.append(pdu)
        return received


def assert_same(direct: Outcome, proxied: Outcome) -> None:
    """Exit status, stdout and stderr are identical through the proxy and directly."""
    assert proxied.returncode == direct.returncode, (direct, proxied)
    assert proxied.stdout == direct.stdout
    assert proxied.stderr == direct.stderr


def by_message_id(pdus: list[Pdu]) -> dict[int, list[bytes]]:
    """Raw responses grouped by message ID, in arrival order within each operation."""
    grouped: dict[int, list[bytes]] = {}
    for pdu in pdus:
        grouped.setdefault(pdu.message_id, []).append(pdu.raw)
    return grouped
