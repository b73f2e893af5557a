"""End to end: a running proxy under a storm of fuzzed clients stays up, bounded and correct.

``ldapproxy run`` serves two plaintext listeners on 127.0.0.1 (``none`` and
``starttls-optional``) in front of the session's slapd, with short limits.  For
``FUZZ_SECONDS``, ``FUZZ_THREADS`` threads open connections and send requests built from
valid ones (binds, searches with filters, extended operations, writes outside the
directory's suffix...) mutated with byte flips, truncation, corrupted lengths, huge
length headers, random garbage, slow trickles and partial PDUs, and read whatever comes
back.  Meanwhile ``GOOD_THREADS`` threads loop: connect, simple bind as a test user,
WhoAmI, a base search of their own entry, Unbind; every answer must be right.

Afterwards: the proxy process is alive and serves a fresh client; its RSS grew by less
than ``RSS_GROWTH_BOUND``; every fuzz connection that the client left open was closed by
the proxy within its timeouts; everything the proxy sent a fuzz client was whole PDUs for
message IDs that client used (or Notices of Disconnection); and the proxy logged no
unhandled error.

The payloads come from ``random.Random`` seeded with ``SEED`` and the thread number, so a
failing connection can be rebuilt (its thread, number and payload are in the message).
No fuzz client ever has a valid password, so nothing can change the shared directory.
"""

from __future__ import annotations

import random
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from support.fakes import PAGED_RESULTS_CONTROL, abandon_request, request
from support.mutations import HOSTILE_LENGTHS, INTERESTING_BYTES, ava, length_fields
from support.proxy import Listener, ProxyProcess, proxy_config
from support.rawldap import RawClient, extended_value, simple_bind, starttls, whoami
from support.slapd import ADMIN_READER_DN, ALICE_DN, BOB_DN, SUFFIX, USERS, Slapd

from ldapproxy import messages as m
from ldapproxy.ber import (
    BOOLEAN,
    ENUMERATED,
    OCTET_STRING,
    SEQUENCE,
    Frame,
    Framer,
    FramingError,
    encode_integer,
    encode_length,
    encode_message,
    read_tlv,
    tlv,
)
from ldapproxy.pki import CertificateAuthority

pytestmark = pytest.mark.slapd

#: Seeds every fuzz thread's random.Random (with the thread's number).
SEED = 20240517
FUZZ_THREADS = 16
GOOD_THREADS = 4
#: How long the fuzz threads open new connections.
FUZZ_SECONDS = 7.0
#: And at most this many connections each.
MAX_CONNECTIONS_PER_THREAD = 80
#: Connections a fuzz thread leaves open (reading them later) before it waits for the
#: oldest to be closed by the proxy.
LINGERING_PER_THREAD = 4

MAX_PDU_BYTES = 65536
LIMITS: dict[str, object] = {
    "max_pdu_bytes": MAX_PDU_BYTES,
    "first_request_timeout": 2,
    "idle_timeout": 3,
    "operation_timeout": 5,
    "tls_handshake_timeout": 2,
}
#: pool.acquire_timeout (the default): how long a session may wait for a connection.
ACQUIRE_TIMEOUT = 5
#: The longest a session may stay open after its client's last byte: a request waiting
#: for the pool (acquire_timeout), then idle_timeout; the other limits are shorter
#: (first_request_timeout, tls_handshake_timeout) or end in idle_timeout too (an operation
#: the directory answers).  Plus slack for a loaded two-CPU machine.
CLOSE_WITHIN = ACQUIRE_TIMEOUT + 3 + 5.0

#: The proxy's RSS may grow by less than this from after the warm-up to after the run.
#: What it legitimately needs depends on how many sessions are open at once, not on how
#: many came and went: at most FUZZ_THREADS * (LINGERING_PER_THREAD + 1) + GOOD_THREADS
#: = 84, each holding at most one partial PDU (max_pdu_bytes = 64 KiB, refused from its
#: length header) plus its protocol state and its leased upstream connection's TLS
#: buffers (tens of KiB): under 84 * 128 KiB = 10.5 MiB, which CPython's allocator may
#: keep after the peak, plus a few MiB for the pool connections opened for the burst.
#: 50 MiB leaves room for allocator fragmentation, yet is exceeded by what the test is
#: after: state never freed of about 3 KiB per connection over the run's ~15,000
#: connections (good clients' included), or input buffered beyond what the limits allow.
RSS_GROWTH_BOUND = 50 * 1024 * 1024

GOOD_USERS = [ALICE_DN, BOB_DN, ADMIN_READER_DN, ALICE_DN]
#: Not a password of anyone: fuzz clients never authenticate, so they can write nothing.
WRONG_PASSWORD = "not-the-password-of-anyone"
ELSEWHERE = b"cn=fuzz,dc=invalid"


# -- requests ------------------------------------------------------------------------------------


FILTER = tlv(
    0xA0,
    ava(0xA3, b"objectClass", b"person")
    + tlv(0xA1, ava(0xA5, b"uidNumber", b"2001") + tlv(0xA2, tlv(0x87, b"mail")))
    + tlv(0xA4, tlv(OCTET_STRING, b"cn") + tlv(SEQUENCE, tlv(0x80, b"Al") + tlv(0x82, b"e")))
    + tlv(0xA9, tlv(0x82, b"cn") + tlv(0x83, b"Alice") + tlv(0x84, b"\x00")),
)


def search(
    message_id: int, base: bytes, scope: int, filter_element: bytes, controls: bytes = b""
) -> bytes:
    """A SearchRequest for ``cn`` and ``mail``."""
    body = (
        tlv(OCTET_STRING, base)
        + encode_integer(scope, ENUMERATED)
        + encode_integer(0, ENUMERATED)
        + encode_integer(20)
        + encode_integer(5)
        + tlv(BOOLEAN, b"\x00")
        + filter_element
        + tlv(SEQUENCE, tlv(OCTET_STRING, b"cn") + tlv(OCTET_STRING, b"mail"))
    )
    return encode_message(message_id, tlv(m.SEARCH_REQUEST, body), controls)


def base_search(message_id: int, dn: str) -> bytes:
    """A base-scope search of ``dn`` for ``(objectClass=*)``."""
    return search(message_id, dn.encode(), 0, tlv(0x87, b"objectClass"))


def elsewhere(op: int) -> Callable[[int], bytes]:
    """A write request aimed outside the directory's suffix."""

    def build(message_id: int) -> bytes:
        if op == m.DEL_REQUEST:
            return encode_message(message_id, tlv(op, ELSEWHERE))
        if op == m.COMPARE_REQUEST:
            body = tlv(OCTET_STRING, ELSEWHERE) + tlv(
                SEQUENCE, tlv(OCTET_STRING, b"cn") + tlv(OCTET_STRING, b"x")
            )
        else:  # modify
            change = tlv(
                SEQUENCE,
                encode_integer(2, ENUMERATED)
                + tlv(
                    SEQUENCE, tlv(OCTET_STRING, b"description") + tlv(0x31, tlv(OCTET_STRING, b"x"))
                ),
            )
            body = tlv(OCTET_STRING, ELSEWHERE) + tlv(SEQUENCE, change)
        return encode_message(message_id, tlv(op, body))

    return build


#: Requests fuzz clients start from.  None carries a valid password.
REQUESTS: list[Callable[[int], bytes]] = [
    lambda i: simple_bind(i, ALICE_DN, WRONG_PASSWORD),
    lambda i: simple_bind(i, "uid=nobody,dc=invalid", WRONG_PASSWORD),
    m.anonymous_bind_request,
    lambda i: encode_message(
        i,
        tlv(
            m.BIND_REQUEST,
            encode_integer(3)
            + tlv(OCTET_STRING, b"")
            + tlv(
                0xA3,
                tlv(OCTET_STRING, b"PLAIN")
                + tlv(OCTET_STRING, b"\x00bob\x00" + WRONG_PASSWORD.encode()),
            ),
        ),
    ),
    lambda i: search(i, SUFFIX.encode(), 2, FILTER),
    lambda i: search(i, SUFFIX.encode(), 2, tlv(0x87, b"objectClass"), PAGED_RESULTS_CONTROL),
    lambda i: search(i, b"", 0, tlv(0x87, b"objectClass")),
    lambda i: m.root_dse_search(i, (b"*", b"+")),
    whoami,
    starttls,
    lambda i: m.extended_request(i, m.CANCEL_OID, tlv(SEQUENCE, encode_integer(max(1, i - 1)))),
    lambda i: m.extended_request(i, b"1.3.6.1.4.1.99999.7", b"\x00\xff"),
    lambda i: abandon_request(i, max(1, i - 1)),
    elsewhere(m.DEL_REQUEST),
    elsewhere(m.COMPARE_REQUEST),
    elsewhere(m.MODIFY_REQUEST),
    lambda i: request(i, m.UNBIND_REQUEST),
]


def mutate(rng: random.Random, data: bytes) -> bytes:
    """``data`` with one to four byte flips, overwrites, insertions, deletions,
    duplications, truncations or corrupted lengths."""
    buf = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 3, 4))):
        if not buf:
            break
        pos = rng.randrange(len(buf))
        kind = rng.choice(
            ("flip", "set", "insert", "delete", "truncate", "duplicate", "length", "length")
        )
        if kind == "flip":
            buf[pos] ^= 1 << rng.randrange(8)
        elif kind == "set":
            buf[pos] = rng.choice(INTERESTING_BYTES) if rng.random() < 0.5 else rng.randrange(256)
        elif kind == "insert":
            buf[pos:pos] = rng.randbytes(rng.randint(1, 8))
        elif kind == "delete":
            del buf[pos : pos + rng.randint(1, 8)]
        elif kind == "truncate":
            del buf[pos:]
        elif kind == "duplicate":
            buf[pos:pos] = buf[pos : pos + rng.randint(1, 16)]
        else:
            fields = length_fields(bytes(buf))
            if fields:
                start, end = rng.choice(fields)
                first = buf[start]
                old = first if first < 0x80 else int.from_bytes(buf[start + 1 : end], "big")
                if rng.random() < 0.5:
                    buf[start:end] = rng.choice(HOSTILE_LENGTHS)
                else:
                    buf[start:end] = encode_length(max(0, old + rng.randint(-3, 3)))
    return bytes(buf)


@dataclass
class Plan:
    """What one fuzz connection sends: ``pieces``, with ``pause`` seconds between them."""

    kind: str
    pieces: list[bytes]
    pause: float = 0.0
    #: Whether the client closes its side right after sending instead of waiting.
    client_closes: bool = False

    @property
    def payload(self) -> bytes:
        return b"".join(self.pieces)


def plan(rng: random.Random) -> Plan:
    """A random fuzz connection."""
    kind = rng.choice(
        (
            "requests",
            "requests",
            "requests",
            "garbage",
            "huge-length",
            "partial",
            "trickle",
            "mixed",
        )
    )
    first_id = rng.choice((1, 1, 2, 127, 128, 255, 256, 2**31 - 1))
    requests = [
        rng.choice(REQUESTS)(first_id + n if first_id + n < 2**31 else n + 1)
        for n in range(rng.randint(1, 5))
    ]
    if kind == "requests":
        pieces = [mutate(rng, pdu) if rng.random() < 0.6 else pdu for pdu in requests]
    elif kind == "garbage":
        pieces = [rng.randbytes(rng.randint(1, 2000))]
    elif kind == "huge-length":
        count = rng.randint(1, 8)
        pieces = [
            b"\x30"
            + bytes((0x80 | count,))
            + rng.randbytes(count)
            + rng.randbytes(rng.randint(0, 64))
        ]
    elif kind == "partial":
        pdu = b"".join(requests)
        pieces = [pdu[: rng.randrange(1, len(pdu))]]
    elif kind == "trickle":
        pdu = mutate(rng, b"".join(requests)) if rng.random() < 0.5 else b"".join(requests)
        size = rng.randint(1, 7)
        pieces = [pdu[i : i + size] for i in range(0, len(pdu), size)][:40]
        return Plan(kind, pieces, pause=rng.uniform(0.001, 0.02), client_closes=rng.random() < 0.2)
    else:
        pieces = [
            b"".join(requests)
            + mutate(rng, rng.choice(REQUESTS)(9))
            + rng.randbytes(rng.randint(0, 40))
        ]
    return Plan(kind, pieces, client_closes=rng.random() < 0.2)


# -- fuzz clients --------------------------------------------------------------------------------


@dataclass
class Connection:
    """One fuzz connection and what happened to it."""

    thread: int
    number: int
    plan: Plan
    sock: socket.socket
    started: float
    last_sent: float = 0.0
    received: bytearray = field(default_factory=bytearray)
    #: "eof" or "reset" (closed by the proxy), "client" (closed by us), "hung", None (open).
    outcome: str | None = None

    def describe(self) -> str:
        return (
            f"thread {self.thread} connection {self.number} ({self.plan.kind}, seed {SEED}): "
            f"sent {self.plan.payload[:80].hex()}{'...' if len(self.plan.payload) > 80 else ''}, "
            f"got {bytes(self.received[:80]).hex()}"
        )

    def read_until(self, deadline: float) -> bool:
        """Read what the proxy sends until it closes the connection (True) or ``deadline``."""
        while self.outcome is None:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.sock.settimeout(min(left, 0.5))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:  # reset by the proxy (an aborted connection)
                self.outcome = "reset"
                break
            if not data:
                self.outcome = "eof"
                break
            self.received += data
        self.sock.close()
        return True


def fuzz_thread(index: int, ports: list[int], stop_at: float, done: list[Connection]) -> None:
    """Open fuzz connections until ``stop_at``; wait until the proxy closed every one."""
    rng = random.Random(f"{SEED}-{index}")
    lingering: list[Connection] = []
    for number in range(MAX_CONNECTIONS_PER_THREAD):
        if time.monotonic() >= stop_at:
            break
        connection = Connection(index, number, plan(rng), socket.socket(), time.monotonic())
        port = ports[rng.randrange(len(ports))]
        connection.sock.settimeout(5)
        connection.sock.connect(("127.0.0.1", port))
        done.append(connection)
        try:
            for piece in connection.plan.pieces:
                connection.sock.sendall(piece)
                connection.last_sent = time.monotonic()
                if connection.plan.pause:
                    time.sleep(connection.plan.pause)
        except OSError:  # the proxy closed it already (garbage is refused at once)
            connection.last_sent = time.monotonic()
        if connection.plan.client_closes:
            connection.sock.close()
            connection.outcome = "client"
            continue
        # Read a little now; if it stays open, come back to it later.
        if not connection.read_until(time.monotonic() + rng.uniform(0.05, 0.3)):
            lingering.append(connection)
        while len(lingering) > LINGERING_PER_THREAD:
            finish(lingering.pop(0))
    for connection in lingering:
        finish(connection)


def finish(connection: Connection) -> None:
    """Wait until the proxy closes ``connection``; it is "hung" if it does not in time."""
    if not connection.read_until(connection.last_sent + CLOSE_WITHIN):
        connection.outcome = "hung"
        connection.sock.close()


# -- well-behaved clients ------------------------------------------------------------------------


class Wrong(Exception):
    """A well-behaved client got a wrong answer."""


def expect(condition: bool, what: str) -> None:
    if not condition:
        raise Wrong(what)


def entry_dn(frame: Frame) -> bytes:
    """The objectName of a SearchResultEntry."""
    _, start, end = read_tlv(frame.data, 0, len(frame.data))
    _, _, id_end = read_tlv(frame.data, start, end)
    _, op_start, op_end = read_tlv(frame.data, id_end, end)
    _, dn_start, dn_end = read_tlv(frame.data, op_start, op_end)
    return frame.data[dn_start:dn_end]


def good_round(port: int, dn: str) -> None:
    """Bind as ``dn``, WhoAmI, read the own entry, Unbind: every answer must be right."""
    with RawClient(port, timeout=10) as client:
        client.send(simple_bind(1, dn, USERS[dn]))
        frame = client.read_frame()
        expect((frame.message_id, frame.op) == (1, m.BIND_RESPONSE), f"bind answered {frame}")
        expect(m.result_code(frame.data) == m.SUCCESS, f"bind: {m.result_code(frame.data)}")
        client.send(whoami(2))
        frame = client.read_frame()
        expect((frame.message_id, frame.op) == (2, m.EXTENDED_RESPONSE), f"whoami answered {frame}")
        expect(m.result_code(frame.data) == m.SUCCESS, f"whoami: {m.result_code(frame.data)}")
        identity = extended_value(frame.data)
        expect(identity == f"dn:{dn}".encode(), f"whoami says {identity!r}")
        client.send(base_search(3, dn))
        entries = []
        while True:
            frame = client.read_frame()
            expect(frame.message_id == 3, f"search answered {frame}")
            if frame.op != m.SEARCH_RESULT_ENTRY:
                break
            entries.append(entry_dn(frame))
        expect(frame.op == m.SEARCH_RESULT_DONE, f"search ended with {frame}")
        expect(m.result_code(frame.data) == m.SUCCESS, f"search: {m.result_code(frame.data)}")
        expect(entries == [dn.encode()], f"search found {entries}")
        client.send(m.unbind_request(4))
        expect(client.is_closed(timeout=5), "not closed after Unbind")


def good_thread(
    index: int, port: int, stop: threading.Event, rounds: Counter[int], errors: list[str]
) -> None:
    dn = GOOD_USERS[index % len(GOOD_USERS)]
    while not stop.is_set():
        try:
            good_round(port, dn)
        except Exception as error:  # every failure of a well-behaved client is a finding
            errors.append(f"{dn}: {type(error).__name__}: {error}")
        else:
            rounds[index] += 1


#: /proc/net/tcp states of a socket the proxy has not closed: ESTABLISHED, CLOSE_WAIT.
OPEN_STATES = {"01": "ESTABLISHED", "08": "CLOSE_WAIT"}


def open_accepted_sockets(ports: list[int]) -> list[str]:
    """The accepted sockets on ``ports`` (the proxy's side of client connections) that are
    still open: ``"local remote STATE"``.  Listening sockets are left out."""
    found = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state = fields[1], fields[2], fields[3]
        if int(local.split(":")[1], 16) in ports and state in OPEN_STATES:
            found.append(f"{local} {remote} {OPEN_STATES[state]}")
    return found


def rss_bytes(pid: int) -> int:
    """VmRSS of process ``pid``."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB$", status, re.MULTILINE)
    assert match, status
    return int(match.group(1)) * 1024


# -- the test ------------------------------------------------------------------------------------


@pytest.fixture
def proxy(
    ca: CertificateAuthority, slapd: Slapd, tmp_path: Path
) -> Iterator[tuple[ProxyProcess, list[Listener]]]:
    """A proxy with short limits on two plaintext listeners; stopped by PID afterwards."""
    config, listeners = proxy_config(
        tmp_path,
        ca,
        [slapd.ldaps_url],
        listeners=[Listener("none", "plain"), Listener("starttls-optional", "ldap")],
        limits=LIMITS,
    )
    process = ProxyProcess(config).start()
    try:
        yield process, listeners
    finally:
        process.stop()


def test_fuzzed_clients_do_not_disturb_the_proxy(
    proxy: tuple[ProxyProcess, list[Listener]],
) -> None:
    """Fuzz clients and well-behaved clients at once (see the module docstring): the
    well-behaved ones see no error, the proxy survives with bounded memory, closes every
    fuzz connection within its limits, answers only with whole PDUs for the asking client,
    and logs no unhandled error."""
    process, listeners = proxy
    plain = listeners[0].port
    ports = [listener.port for listener in listeners]
    for index in range(8):  # warm up: the pool, imports, first allocations
        good_round(plain, GOOD_USERS[index % len(GOOD_USERS)])
    rss_before = rss_bytes(process.pid)

    connections: list[Connection] = []
    rounds: Counter[int] = Counter()
    good_errors: list[str] = []
    thread_errors: list[str] = []
    stop = threading.Event()

    def guarded(target: Callable[..., None], *args: object) -> Callable[[], None]:
        def run() -> None:
            try:
                target(*args)
            except Exception as error:
                thread_errors.append(
                    f"{target.__name__}{args[:1]}: {type(error).__name__}: {error}"
                )

        return run

    started = time.monotonic()
    good = [
        threading.Thread(target=guarded(good_thread, i, plain, stop, rounds, good_errors))
        for i in range(GOOD_THREADS)
    ]
    fuzz = [
        threading.Thread(target=guarded(fuzz_thread, i, ports, started + FUZZ_SECONDS, connections))
        for i in range(FUZZ_THREADS)
    ]
    for thread in good + fuzz:
        thread.start()
    for thread in fuzz:
        thread.join(FUZZ_SECONDS + CLOSE_WITHIN + 10)
    stop.set()
    for thread in good:
        thread.join(15)
    elapsed = time.monotonic() - started
    assert not any(thread.is_alive() for thread in good + fuzz), "a client thread hangs"
    assert thread_errors == []

    # The proxy is alive, bounded, and serves a fresh client.
    assert process.process is not None
    assert process.process.poll() is None, f"the proxy died:\n{process.log_text()[-3000:]}"
    rss_after = rss_bytes(process.pid)
    good_round(plain, ALICE_DN)

    # The well-behaved clients saw no error, all along.
    assert good_errors == [], good_errors[:5]
    assert sum(rounds.values()) >= 4 * GOOD_THREADS, rounds
    assert all(rounds[i] > 0 for i in range(GOOD_THREADS)), rounds

    # Every fuzz connection was closed by the proxy within its limits (or by the client).
    outcomes = Counter(connection.outcome for connection in connections)
    hung = [c.describe() for c in connections if c.outcome not in ("eof", "reset", "client")]
    assert hung == [], hung[:5]

    # And the proxy holds none of them open: not one it forgot to close after its client
    # left (CLOSE_WAIT), nor one it never closed (ESTABLISHED).
    deadline = time.monotonic() + 5
    while open_accepted_sockets(ports) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert open_accepted_sockets(ports) == []

    # The proxy sent fuzz clients whole PDUs, for message IDs they used, or notices.
    notices = 0
    answered = 0
    for connection in connections:
        framer = Framer(1 << 30)
        try:
            frames = framer.feed(bytes(connection.received))
        except FramingError as error:
            pytest.fail(f"the proxy sent a malformed stream ({error}): {connection.describe()}")
        if connection.outcome == "eof":  # a reset may cut what was in flight
            assert framer.buffered == 0, f"a partial PDU before EOF: {connection.describe()}"
        sent_ids = ids_before_error(connection.plan.payload)
        for frame in frames:
            assert frame.op in m.RESPONSE_TAGS, connection.describe()
            if frame.message_id == 0:
                assert m.extended_response_name(frame.data) == m.NOTICE_OF_DISCONNECTION_OID
                notices += 1
            else:
                assert frame.message_id in sent_ids, f"cross-talk: {connection.describe()}"
                answered += 1

    log = process.log_text()
    assert not re.search(r"Traceback|Unhandled|^\S+ (error|critical) ", log, re.MULTILINE), [
        line
        for line in log.splitlines()
        if re.search(r"Traceback|Unhandled| (error|critical) ", line)
    ][:5]
    protocol_errors = len(re.findall(r"closing: protocol error", log))
    # The proxy's own account of the sessions its timeouts ended.
    timeouts = {
        limit: len(re.findall(pattern, log))
        for limit, pattern in {
            "first_request": r"closing: no whole request within limits\.first_request_timeout",
            "idle": r"closing: idle for \d+ s \(limits\.idle_timeout",
            "handshake": r"closing: TLS handshake not finished within limits\.tls_handshake",
        }.items()
    }

    summary = (
        f"{len(connections)} fuzz connections in {elapsed:.1f} s, outcomes {dict(outcomes)} "
        f"(timeouts logged: {timeouts}), "
        f"{notices} notices, {answered} other answers, {protocol_errors} protocol errors logged; "
        f"good rounds {dict(rounds)}; RSS {rss_before / 2**20:.1f} -> {rss_after / 2**20:.1f} MiB"
    )
    print(summary)
    # The fuzzing reached both the proxy's own checks and the directory.
    assert protocol_errors > 0, summary
    assert notices > 0, summary
    assert answered > 0, summary
    assert timeouts["first_request"] > 0, summary
    assert timeouts["idle"] > 0, summary
    assert rss_after - rss_before < RSS_GROWTH_BOUND, summary


def ids_before_error(data: bytes) -> set[int]:
    """The message IDs of the PDUs the proxy could frame before ``data`` turned bad."""
    framer = Framer(MAX_PDU_BYTES)
    ids = set()
    for index in range(len(data)):
        try:
            frames = framer.feed(data[index : index + 1])
        except FramingError:
            break
        ids.update(frame.message_id for frame in frames)
    return ids
