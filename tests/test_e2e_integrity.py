"""End to end: integrity under concurrency, with ``ldapproxy run`` in front of a private slapd.

1. Nothing lost, nothing invented.  Eight raw-socket clients (bound as alice or as the
   rootdn) pipeline adds, replaces and reads of their own entries, and a WhoAmI, through
   the proxy in short sessions, while slapd is restarted three times.  Each client gives
   its requests message IDs from a range of its own, so a response delivered to the
   wrong client is recognisable as such, and records exactly which operations were
   answered ``success``, which were answered with an error, and which were never
   answered (their connection broke).  Afterwards slapd itself (not the proxy) must hold
   every entry whose add succeeded, no entry whose add was answered with an error and no
   entry nobody tried to add; every entry's value must be its last successful write or a
   later write whose outcome the client never learned.
2. Identity isolation.  24 clients (ldap3, and raw sockets for pipelining), each with
   bulk users of its own, run short sessions (bind, rebind, failed bind, anonymous,
   abrupt close, leaving with a Bind or a big search unanswered) through a proxy whose
   pool holds at most three upstream connections, so those connections pass from session
   to session all the time.  A WhoAmI after every operation must name the session's own
   identity (or none, for anonymous sessions), and reads return only its own entry.

The timing-sensitive parts are bounded: every client read has a timeout, the writers run
for a fixed time, and the identity clients run a fixed number of cycles.
"""

from __future__ import annotations

import contextlib
import random
import re
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from support.compare import (
    FINAL_RESPONSES,
    SCOPE_BASE,
    SCOPE_SUB,
    WHOAMI_OID,
    Pdu,
    RawClient,
    extended,
    import_ldap3,
    integer,
    message,
    octets,
    read_tlv,
    search,
    simple_bind,
    tlv,
    unbind,
)
from support.net import LOOPBACK
from support.proxy import Listener, ProxyProcess, proxy_config
from support.slapd import (
    ADMIN_DN,
    ADMIN_PASSWORD,
    ALICE_DN,
    PEOPLE_DN,
    USERS,
    Slapd,
    bulk_user_dn,
    bulk_user_password,
)

from ldapproxy.pki import CertificateAuthority

pytestmark = pytest.mark.slapd

ldap3 = import_ldap3()

BIND_RESPONSE = 0x61
SEARCH_RESULT_ENTRY = 0x64
SEARCH_RESULT_DONE = 0x65
MODIFY_RESPONSE = 0x67
ADD_RESPONSE = 0x69
SEARCH_RESULT_REFERENCE = 0x73
EXTENDED_RESPONSE = 0x78

SUCCESS = 0
NO_SUCH_OBJECT = 32
INVALID_CREDENTIALS = 49
NOTICE_OF_DISCONNECTION_OID = b"1.3.6.1.4.1.1466.20036"

#: Every PDU the proxy may deliver for a request of each kind (the final one last).
RESPONSE_TYPES = {
    "bind": {BIND_RESPONSE},
    "add": {ADD_RESPONSE},
    "modify": {MODIFY_RESPONSE},
    "search": {SEARCH_RESULT_ENTRY, SEARCH_RESULT_REFERENCE, SEARCH_RESULT_DONE},
    "whoami": {EXTENDED_RESPONSE},
}

#: Lines of the proxy's log that must never appear.
LOG_PROBLEMS = re.compile(r"^\S+ (error|critical) |Traceback|Unhandled", re.MULTILINE)


# -- BER helpers (independent of ldapproxy.ber) -------------------------------------------------


def add_request(dn: str, attributes: dict[str, list[str]]) -> bytes:
    """An AddRequest."""
    attribute_list = b"".join(
        tlv(0x30, octets(name) + tlv(0x31, b"".join(octets(v) for v in values)))
        for name, values in attributes.items()
    )
    return tlv(0x68, octets(dn) + tlv(0x30, attribute_list))


def replace_request(dn: str, attribute: str, value: str) -> bytes:
    """A ModifyRequest replacing every value of ``attribute`` with ``value``."""
    change = tlv(0x30, integer(2, 0x0A) + tlv(0x30, octets(attribute) + tlv(0x31, octets(value))))
    return tlv(0x66, octets(dn) + tlv(0x30, change))


def protocol_op(pdu: Pdu) -> tuple[int, int]:
    """``(content_start, content_end)`` of the protocolOp of ``pdu``."""
    raw = pdu.raw
    _, start, _ = read_tlv(raw, 0)
    _, _, id_end = read_tlv(raw, start)
    _, op_start, op_end = read_tlv(raw, id_end)
    return op_start, op_end


def entry_fields(pdu: Pdu) -> tuple[str, dict[str, list[str]]]:
    """``(objectName, {attribute (lower case): values})`` of a SearchResultEntry."""
    raw = pdu.raw
    op_start, _ = protocol_op(pdu)
    _, dn_start, dn_end = read_tlv(raw, op_start)
    _, attrs_start, attrs_end = read_tlv(raw, dn_end)
    attributes: dict[str, list[str]] = {}
    pos = attrs_start
    while pos < attrs_end:
        _, item_start, item_end = read_tlv(raw, pos)
        _, type_start, type_end = read_tlv(raw, item_start)
        _, values_start, values_end = read_tlv(raw, type_end)
        values = []
        value_pos = values_start
        while value_pos < values_end:
            _, s, e = read_tlv(raw, value_pos)
            values.append(raw[s:e].decode("utf-8", "replace"))
            value_pos = e
        attributes[raw[type_start:type_end].decode("utf-8", "replace").lower()] = values
        pos = item_end
    return raw[dn_start:dn_end].decode("utf-8", "replace"), attributes


def extended_name_and_value(pdu: Pdu) -> tuple[bytes | None, bytes | None]:
    """``(responseName, responseValue)`` of an ExtendedResponse."""
    raw = pdu.raw
    op_start, op_end = protocol_op(pdu)
    pos = op_start
    for _ in range(3):  # resultCode, matchedDN, diagnosticMessage
        pos = read_tlv(raw, pos)[2]
    name = value = None
    while pos < op_end:
        tag, value_start, value_end = read_tlv(raw, pos)
        if tag == 0x8A:
            name = raw[value_start:value_end]
        elif tag == 0x8B:
            value = raw[value_start:value_end]
        pos = value_end
    return name, value


def log_problems(proxy: ProxyProcess) -> list[str]:
    """The proxy's log lines at level error or critical, or about unhandled errors."""
    return [line for line in proxy.log_text().splitlines() if LOG_PROBLEMS.search(line)]


def direct_connection(upstream: Slapd) -> Any:
    """An ldap3 connection straight to slapd (not through the proxy), bound as the rootdn."""
    server = ldap3.Server(LOOPBACK, port=upstream.ldap_port, get_info=ldap3.NONE)
    conn = ldap3.Connection(
        server, user=ADMIN_DN, password=ADMIN_PASSWORD, receive_timeout=15, raise_exceptions=True
    )
    conn.bind()
    return conn


# -- 1. nothing lost, nothing invented ------------------------------------------------------------

WRITERS = 8
#: Each writer's message IDs are ``(index + 1) * ID_SPACE + n``: no two writers share one.
ID_SPACE = 10_000_000
RUN_SECONDS = 17.0
RESTART_AT = (3.0, 7.5, 12.0)
#: How long a writer waits for any answer before declaring the proxy hung.
RESPONSE_TIMEOUT = 15.0


@dataclass
class Op:
    """One request a writer sent, and what it learned of its outcome."""

    kind: str  # bind, add, modify, search, whoami
    dn: str  # the entry written or read; for bind and whoami, the identity
    value: str = ""  # the description written by an add or a modify; WhoAmI's answer
    outcome: str = "pending"  # success, error, unknown
    code: int | None = None
    answered_at: float = 0.0


@dataclass
class Writer:
    """One client thread of the first test, with its own DNs and message ID range."""

    index: int
    port: int
    ca_path: Path
    stop: threading.Event
    bind_dn: str
    bind_password: str
    next_id: int = 0
    seq: int = 0
    writes: list[Op] = field(default_factory=list)  # adds and modifies, in send order
    confirmed: list[str] = field(default_factory=list)  # DNs whose add succeeded
    violations: list[str] = field(default_factory=list)
    disconnects: int = 0
    notices: int = 0
    sessions: int = 0

    def __post_init__(self) -> None:
        self.next_id = (self.index + 1) * ID_SPACE
        self.rng = random.Random(self.index)
        self.prefix = f"w{self.index}-"
        self.bind = Op("bind", self.bind_dn)  # the current session's

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def owner_of(self, message_id: int) -> str:
        owner = message_id // ID_SPACE - 1
        if owner == self.index:
            return "this client, but not outstanding"
        if 0 <= owner < WRITERS:
            return f"writer {owner}"
        return "no writer"

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                try:
                    client = RawClient(
                        LOOPBACK, self.port, cafile=self.ca_path, timeout=RESPONSE_TIMEOUT
                    )
                except OSError as error:
                    self.violations.append(f"writer {self.index}: cannot connect: {error!r}")
                    time.sleep(0.2)
                    continue
                self.sessions += 1
                with client:
                    self.session(client)
                if not self.stop.is_set():
                    time.sleep(0.05)
        except BaseException:  # reported by the test, not lost in the thread
            self.violations.append(f"writer {self.index} crashed:\n{traceback.format_exc()}")

    def session(self, client: RawClient) -> None:
        """Bind (every other session with the first batch pipelined behind the Bind, in
        the same write), run a few batches, then leave with an Unbind or by just closing."""
        bind = self.bind = Op("bind", self.bind_dn)
        first = [(bind, simple_bind(self.bind_dn, self.bind_password))]
        if self.sessions % 2:
            first += self.next_batch()
        if not self.exchange(client, first):
            return
        if bind.outcome != "success":
            time.sleep(0.2)  # e.g. unavailable (52) while slapd is down
            return
        for _ in range(self.rng.randint(5, 15)):
            if self.stop.is_set():
                return
            batch = self.next_batch()
            if not self.exchange(client, batch):
                return
            if all(op.outcome != "success" for op, _ in batch):
                time.sleep(0.1)
        if self.rng.random() < 0.5:
            with contextlib.suppress(OSError):
                client.send(message(self.new_id(), unbind()))

    def next_batch(self) -> list[tuple[Op, bytes]]:
        """An add of a new entry, replaces on up to two recently confirmed entries, a read
        of a third and a WhoAmI: never two requests for one DN, whose order slapd would
        not keep."""
        self.seq += 1
        uid = f"{self.prefix}{self.seq:05d}"
        dn = f"uid={uid},{PEOPLE_DN}"
        add = Op("add", dn, f"{uid} v0")
        attributes = {
            "objectClass": ["inetOrgPerson"],
            "uid": [uid],
            "cn": [uid],
            "sn": [f"writer {self.index}"],
            "description": [add.value],
        }
        batch = [(add, add_request(dn, attributes))]
        recent = self.confirmed[-20:]
        targets = self.rng.sample(recent, min(3, len(recent)))
        for target in targets[:2]:
            self.seq += 1
            value = f"{target.split(',')[0].removeprefix('uid=')} m{self.seq}"
            op = Op("modify", target, value)
            batch.append((op, replace_request(target, "description", value)))
        if len(targets) == 3:
            batch.append(
                (Op("search", targets[2]), search(targets[2], SCOPE_BASE, attributes=["uid"]))
            )
        batch.append((Op("whoami", self.bind_dn), extended(WHOAMI_OID)))
        return batch

    def exchange(self, client: RawClient, batch: list[tuple[Op, bytes]]) -> bool:
        """Send ``batch`` in one write and read until every request is answered; False
        if the connection ended first (the unanswered requests' outcome is unknown)."""
        complete = self._exchange(client, batch)
        self.check_identities(batch)
        return complete

    def check_identities(self, batch: list[tuple[Op, bytes]]) -> None:
        """Each WhoAmI answered success names the session's identity: the writer's own
        once its Bind succeeded, none if the Bind was answered with an error."""
        if self.bind.outcome not in ("success", "error"):
            return
        wanted = f"dn:{self.bind_dn}".lower() if self.bind.outcome == "success" else ""
        for op, _ in batch:
            if op.kind == "whoami" and op.outcome == "success" and op.value.lower() != wanted:
                self.violations.append(
                    f"writer {self.index}: Bind as {self.bind_dn} answered {self.bind.code}, "
                    f"then WhoAmI said {op.value!r}"
                )

    def _exchange(self, client: RawClient, batch: list[tuple[Op, bytes]]) -> bool:
        outstanding: dict[int, Op] = {}
        pdus = []
        for op, request in batch:
            message_id = self.new_id()
            outstanding[message_id] = op
            pdus.append(message(message_id, request))
            if op.kind in ("add", "modify"):
                self.writes.append(op)
        try:
            client.send(*pdus)
        except OSError:
            return self.broken(outstanding)
        while outstanding:
            try:
                pdu = client.receive()
            except TimeoutError:
                waiting = {i: op.kind for i, op in outstanding.items()}
                self.violations.append(
                    f"writer {self.index}: no answer within {RESPONSE_TIMEOUT:g} s for {waiting}"
                )
                return self.broken(outstanding)
            except OSError:
                pdu = None
            if pdu is None:
                return self.broken(outstanding)
            self.check(pdu, outstanding)
        return True

    def broken(self, outstanding: dict[int, Op]) -> bool:
        self.disconnects += 1
        for op in outstanding.values():
            op.outcome = "unknown"
        return False

    def check(self, pdu: Pdu, outstanding: dict[int, Op]) -> None:
        """Every PDU must answer a request this client has outstanding, with the right
        type and content about this client's own entries; or be a Notice of
        Disconnection."""
        where = f"writer {self.index}"
        try:
            if pdu.message_id == 0:
                name = extended_name_and_value(pdu)[0] if pdu.op == EXTENDED_RESPONSE else None
                if name != NOTICE_OF_DISCONNECTION_OID:
                    self.violations.append(f"{where}: unexpected unsolicited PDU {pdu.raw.hex()}")
                else:
                    self.notices += 1
                return
            op = outstanding.get(pdu.message_id)
            if op is None:
                self.violations.append(
                    f"{where}: response for message ID {pdu.message_id} (op 0x{pdu.op:02x}), "
                    f"owned by {self.owner_of(pdu.message_id)}: {pdu.raw.hex()}"
                )
                return
            if pdu.op not in RESPONSE_TYPES[op.kind]:
                self.violations.append(
                    f"{where}: op 0x{pdu.op:02x} in answer to its {op.kind} "
                    f"(message ID {pdu.message_id}, {op.dn}): {pdu.raw.hex()}"
                )
                op.outcome = "unknown"
                del outstanding[pdu.message_id]
                return
            if pdu.op == SEARCH_RESULT_ENTRY:
                dn, attributes = entry_fields(pdu)
                if dn.lower() != op.dn.lower() or not all(
                    v.startswith(self.prefix) for v in attributes.get("uid", [])
                ):
                    self.violations.append(
                        f"{where}: read {op.dn} but got the entry {dn} {attributes}"
                    )
            if pdu.op == EXTENDED_RESPONSE:
                op.value = (extended_name_and_value(pdu)[1] or b"").decode("utf-8", "replace")
            if pdu.op in FINAL_RESPONSES:
                op.code = pdu.result_code
                op.outcome = "success" if op.code == SUCCESS else "error"
                op.answered_at = time.monotonic()
                del outstanding[pdu.message_id]
                if op.kind == "add" and op.outcome == "success":
                    self.confirmed.append(op.dn)
        except (ValueError, IndexError) as error:
            self.violations.append(f"{where}: undecodable PDU ({error}): {pdu.raw.hex()}")


def final_value_problems(writes: list[Op], entries: dict[str, list[str]]) -> list[str]:
    """Compare what the writers learned with what slapd holds (``dn -> descriptions``)."""
    problems = []
    by_dn: dict[str, list[Op]] = {}
    for op in writes:
        by_dn.setdefault(op.dn.lower(), []).append(op)
    for dn, ops in by_dn.items():
        add = ops[0]
        assert add.kind == "add", ops
        history = ", ".join(f"{op.kind} {op.value!r} -> {op.outcome}({op.code})" for op in ops)
        if dn not in entries:
            if add.outcome == "success":
                problems.append(f"lost: the add of {dn} was answered success: {history}")
            continue
        if add.outcome == "error":
            problems.append(f"invented: the add of {dn} was answered {add.code}: {history}")
        # The last write answered success (or the add, if its outcome is unknown: then no
        # replace was sent), or any later write whose outcome is unknown.
        successes = [i for i, op in enumerate(ops) if op.outcome == "success"]
        start = successes[-1] if successes else 0
        allowed = {ops[start].value} | {
            op.value for op in ops[start + 1 :] if op.outcome == "unknown"
        }
        values = entries[dn]
        if len(values) != 1 or values[0] not in allowed:
            problems.append(
                f"{dn} has description {values}, expected one of {sorted(allowed)}: {history}"
            )
    for dn in entries:
        if dn not in by_dn:
            problems.append(f"invented: {dn} ({entries[dn]}) exists but no client added it")
    return problems


def test_nothing_lost_nothing_invented_across_upstream_restarts(
    tmp_path: Path, ca: CertificateAuthority, fresh_slapd, run_proxy
) -> None:
    """Eight writers pipelining adds, replaces and reads through the proxy while slapd is
    restarted three times: no successful write is lost, no write answered with an error
    (unavailable while slapd is down, say) is applied, nothing nobody sent is applied,
    and no client ever receives another client's responses or identity."""
    upstream: Slapd = fresh_slapd()
    config, (listener,) = proxy_config(
        tmp_path,
        ca,
        [upstream.ldaps_url],
        listeners=[Listener("none", "plain")],
        upstream={"connect_timeout": 2},
        # Fewer connections than writers, so sessions also wait for each other's.
        pool={"min_idle": 2, "max_size": 6, "acquire_timeout": 1, "health_check_interval": 1},
    )
    proxy = run_proxy(config)
    stop = threading.Event()
    writers = [
        Writer(
            i,
            listener.port,
            upstream.ca_path,
            stop,
            *((ADMIN_DN, ADMIN_PASSWORD) if i % 2 else (ALICE_DN, USERS[ALICE_DN])),
        )
        for i in range(WRITERS)
    ]
    threads = [threading.Thread(target=w.run, name=f"writer-{w.index}") for w in writers]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    restarted_at = []
    try:
        for at in RESTART_AT:
            time.sleep(max(0.0, started + at - time.monotonic()))
            upstream.restart()
            restarted_at.append(time.monotonic())
        time.sleep(max(0.0, started + RUN_SECONDS - time.monotonic()))
    finally:
        stop.set()
        for thread in threads:
            thread.join(RESPONSE_TIMEOUT + 10)
    assert not any(thread.is_alive() for thread in threads), "a writer did not stop"

    violations = [v for w in writers for v in w.violations]
    assert not violations, "\n".join(violations[:20])

    conn = direct_connection(upstream)
    try:
        conn.search(PEOPLE_DN, "(uid=w*)", ldap3.LEVEL, attributes=["description"])
        entries = {
            entry["dn"].lower(): list(entry["attributes"].get("description", []))
            for entry in conn.response
            if entry.get("type") == "searchResEntry"
        }
    finally:
        conn.unbind()

    writes = [op for w in writers for op in w.writes]
    problems = final_value_problems(writes, entries)
    assert not problems, f"{len(problems)} problem(s):\n" + "\n".join(problems[:20])

    # The run really wrote, really lost connections and really recovered.
    counts = {
        outcome: sum(op.outcome == outcome for op in writes)
        for outcome in ("success", "error", "unknown", "pending")
    }
    assert counts["pending"] == 0, counts
    assert sum(op.kind == "add" and op.outcome == "success" for op in writes) >= 200, counts
    assert sum(op.kind == "modify" and op.outcome == "success" for op in writes) >= 200, counts
    assert sum(w.disconnects for w in writers) >= len(RESTART_AT), counts
    for writer in writers:
        recovered = [
            op
            for op in writer.writes
            if op.outcome == "success" and op.answered_at > restarted_at[-1]
        ]
        assert recovered, f"writer {writer.index} wrote nothing after the last restart"
    assert proxy.process is not None
    assert proxy.process.poll() is None, "the proxy exited"
    assert not log_problems(proxy), "\n".join(log_problems(proxy))


# -- 2. identity isolation ----------------------------------------------------------------------

IDENTITY_CLIENTS = 24
CYCLES = 40
POOL_MAX = 3


@dataclass
class IdentityClient:
    """One client thread of the second test: its two bulk users, and what it saw."""

    index: int
    port: int
    ca_path: Path
    mismatches: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    checks: int = 0
    left_in_flight: int = 0  # sessions that left with a request unanswered

    def __post_init__(self) -> None:
        self.users = [
            (bulk_user_dn(2 * self.index + n), bulk_user_password(2 * self.index + n))
            for n in (1, 2)
        ]
        self.where = ""

    # -- ldap3 helpers --

    def connection(self, user: tuple[str, str] | None) -> Any:
        server = ldap3.Server(LOOPBACK, port=self.port, get_info=ldap3.NONE, connect_timeout=10)
        dn, password = user if user else (None, None)
        conn = ldap3.Connection(
            server, user=dn, password=password, receive_timeout=20, raise_exceptions=False
        )
        conn.open()
        return conn

    def expect(self, conn: Any, what: str, ok: object, codes: tuple[int, ...] = (SUCCESS,)) -> None:
        code = conn.result.get("result") if conn.result else None
        if code not in codes:
            self.errors.append(f"{self.where} {what}: {ok!r} {conn.result}")

    def who(self, conn: Any, dn: str | None) -> None:
        """WhoAmI must answer success and name ``dn`` (nothing, for anonymous)."""
        self.checks += 1
        authzid = conn.extend.standard.who_am_i()
        self.expect(conn, "WhoAmI", authzid)
        got = (authzid or "").lower()
        wanted = f"dn:{dn}".lower() if dn else ""
        if got != wanted:
            self.mismatches.append(f"{self.where}: WhoAmI said {got!r}, expected {wanted!r}")

    def read_own(self, conn: Any, dn: str) -> None:
        """A base read of ``dn``: exactly that entry (the session may read itself)."""
        conn.search(dn, "(objectClass=*)", ldap3.BASE, attributes=["uid", "description"])
        self.expect(conn, f"read {dn}", None)
        dns = [e["dn"].lower() for e in conn.response or [] if e.get("type") == "searchResEntry"]
        if dns != [dn.lower()]:
            self.mismatches.append(f"{self.where}: reading {dn} returned {dns}")

    def read_as_anonymous(self, conn: Any, dn: str) -> None:
        """Anonymous may not see ou=people: slapd hides the entry (noSuchObject)."""
        conn.search(dn, "(objectClass=*)", ldap3.BASE, attributes=["uid"])
        self.expect(conn, f"anonymous read {dn}", None, (NO_SUCH_OBJECT,))
        dns = [e["dn"] for e in conn.response or [] if e.get("type") == "searchResEntry"]
        if dns:
            self.mismatches.append(f"{self.where}: anonymous session read {dns}")

    def write_own(self, conn: Any, dn: str, cycle: int) -> None:
        value = f"client {self.index} cycle {cycle}"
        ok = conn.modify(dn, {"description": [(ldap3.MODIFY_REPLACE, [value])]})
        self.expect(conn, f"modify {dn}", ok)
        conn.search(dn, "(objectClass=*)", ldap3.BASE, attributes=["description"])
        self.expect(conn, f"read back {dn}", None)
        values = [
            list(e["attributes"].get("description", []))
            for e in conn.response or []
            if e.get("type") == "searchResEntry"
        ]
        if values != [[value]]:
            self.mismatches.append(f"{self.where}: wrote {value!r} to {dn}, read {values}")

    # -- the sessions --

    def bind_work_unbind(self, cycle: int) -> None:
        dn = self.users[0][0]
        conn = self.connection(self.users[0])
        self.expect(conn, "bind", conn.bind())
        self.who(conn, dn)
        self.read_own(conn, dn)
        self.who(conn, dn)
        self.write_own(conn, dn, cycle)
        self.who(conn, dn)
        conn.unbind()

    def anonymous(self, cycle: int) -> None:
        conn = self.connection(None)
        self.who(conn, None)  # the session's very first request
        self.read_as_anonymous(conn, self.users[0][0])
        self.who(conn, None)
        conn.unbind()

    def anonymous_bind(self, cycle: int) -> None:
        conn = self.connection(None)
        self.expect(conn, "anonymous bind", conn.bind())
        self.who(conn, None)
        self.read_as_anonymous(conn, self.users[1][0])
        self.who(conn, None)
        conn.unbind()

    def rebind(self, cycle: int) -> None:
        (first, _), (second, second_password) = self.users
        conn = self.connection(self.users[0])
        self.expect(conn, "bind", conn.bind())
        self.who(conn, first)
        self.read_own(conn, first)
        self.who(conn, first)
        self.expect(conn, "rebind", conn.rebind(user=second, password=second_password))
        self.who(conn, second)
        self.read_own(conn, second)
        self.who(conn, second)
        conn.unbind()

    def failed_bind(self, cycle: int) -> None:
        dn, password = self.users[1]
        conn = self.connection((dn, "not-the-password"))
        self.expect(conn, "wrong bind", conn.bind(), (INVALID_CREDENTIALS,))
        self.who(conn, None)
        self.read_as_anonymous(conn, dn)
        self.who(conn, None)
        self.expect(conn, "bind", conn.rebind(user=dn, password=password))
        self.who(conn, dn)
        self.read_own(conn, dn)
        self.who(conn, dn)
        conn.unbind()

    def abrupt_close(self, cycle: int) -> None:
        dn, _ = self.users[1]
        conn = self.connection(self.users[1])
        self.expect(conn, "bind", conn.bind())
        self.who(conn, dn)
        self.write_own(conn, dn, cycle)
        self.who(conn, dn)
        conn.strategy.close()  # no Unbind: the TCP connection just ends

    def raw_pipelined(self, cycle: int) -> None:
        """Bind, WhoAmI and a read of the entry in one write, as the session's first
        bytes: the WhoAmI and the read run as this user."""
        dn, password = self.users[cycle % 2]
        with RawClient(LOOPBACK, self.port, cafile=self.ca_path, timeout=20) as client:
            client.send(
                message(1, simple_bind(dn, password)),
                message(2, extended(WHOAMI_OID)),
                message(3, search(dn, SCOPE_BASE, attributes=["uid"])),
            )
            self.raw_results(client.until_final(1, 2, 3), dn, {1, 2, 3})
            client.send(message(4, extended(WHOAMI_OID)))
            self.raw_results(client.until_final(4), dn, {4})
            client.send(message(5, unbind()))

    def leave_bind_in_flight(self, cycle: int) -> None:
        """Bind and WhoAmI, and gone before the answers: the Bind may complete on the
        upstream connection after the client has left."""
        dn, password = self.users[0]
        with RawClient(LOOPBACK, self.port, cafile=self.ca_path, timeout=20) as client:
            client.send(message(1, simple_bind(dn, password)), message(2, extended(WHOAMI_OID)))
        self.left_in_flight += 1

    def leave_search_in_flight(self, cycle: int) -> None:
        """Bind, then a search for every person's every attribute and a WhoAmI, and gone
        without reading their answers, which must reach no other session."""
        dn, password = self.users[1]
        with RawClient(LOOPBACK, self.port, cafile=self.ca_path, timeout=20) as client:
            client.send(message(1, simple_bind(dn, password)))
            self.raw_results(client.until_final(1), dn, {1})
            client.send(message(2, search(PEOPLE_DN, SCOPE_SUB)), message(3, extended(WHOAMI_OID)))
        self.left_in_flight += 1

    def raw_anonymous_pipelined(self, cycle: int) -> None:
        """Two WhoAmIs, a subtree search of ou=people and a read of the client's own entry
        as the session's first bytes, without any bind: all anonymous, nothing found."""
        with RawClient(LOOPBACK, self.port, cafile=self.ca_path, timeout=20) as client:
            client.send(
                message(1, extended(WHOAMI_OID)),
                message(2, search(PEOPLE_DN, SCOPE_SUB, attributes=["uid"])),
                message(3, extended(WHOAMI_OID)),
                message(4, search(self.users[0][0], SCOPE_BASE, attributes=["uid"])),
            )
            self.raw_results(client.until_final(1, 2, 3, 4), None, {1, 2, 3, 4})
            client.send(message(5, unbind()))

    def raw_results(self, pdus: list[Pdu], dn: str | None, sent: set[int]) -> None:
        """Check raw responses: only to requests sent, binds succeed, WhoAmI names ``dn``
        (nothing if None), and searches find ``dn`` only (nothing if None)."""
        foreign = []
        for pdu in pdus:
            if pdu.message_id not in sent:
                self.mismatches.append(
                    f"{self.where}: PDU for ID {pdu.message_id}: {pdu.raw.hex()}"
                )
            elif pdu.op == BIND_RESPONSE:
                if pdu.result_code != SUCCESS:
                    self.errors.append(f"{self.where}: bind answered {pdu.result_code}")
            elif pdu.op == EXTENDED_RESPONSE:
                self.checks += 1
                if pdu.result_code != SUCCESS:
                    self.errors.append(f"{self.where}: WhoAmI answered {pdu.result_code}")
                value = (extended_name_and_value(pdu)[1] or b"").decode().lower()
                wanted = f"dn:{dn}".lower() if dn else ""
                if value != wanted:
                    self.mismatches.append(
                        f"{self.where}: WhoAmI said {value!r}, expected {wanted!r}"
                    )
            elif pdu.op == SEARCH_RESULT_ENTRY:
                entry_dn = entry_fields(pdu)[0]
                if dn is None or entry_dn.lower() != dn.lower():
                    foreign.append(entry_dn)
            elif pdu.op == SEARCH_RESULT_DONE:
                if pdu.result_code not in ((SUCCESS,) if dn else (SUCCESS, NO_SUCH_OBJECT)):
                    self.errors.append(f"{self.where}: search answered {pdu.result_code}")
            else:
                self.mismatches.append(f"{self.where}: unexpected PDU {pdu.raw.hex()}")
        if foreign:
            self.mismatches.append(f"{self.where}: got {len(foreign)} entries: {foreign[:3]}...")

    def run(self) -> None:
        scenarios: list[Callable[[int], None]] = [
            self.bind_work_unbind,
            self.anonymous,
            self.rebind,
            self.raw_pipelined,
            self.failed_bind,
            self.anonymous_bind,
            self.abrupt_close,
            self.raw_anonymous_pipelined,
            self.leave_bind_in_flight,
            self.leave_search_in_flight,
        ]
        for cycle in range(CYCLES):
            scenario = scenarios[(self.index + cycle) % len(scenarios)]
            self.where = f"client {self.index} cycle {cycle} {scenario.__name__}"
            try:
                scenario(cycle)
            except BaseException:  # reported by the test
                self.errors.append(f"{self.where} crashed:\n{traceback.format_exc()}")


def tls_connections_from_proxy(upstream: Slapd) -> int:
    """How many connections slapd accepted on its ldaps port that got as far as TLS."""
    log = upstream.log_text()
    accepted = re.findall(
        rf"conn=(\d+) fd=\d+ ACCEPT from IP={re.escape(LOOPBACK)}:\d+ "
        rf"\(IP={re.escape(LOOPBACK)}:{upstream.ldaps_port}\)",
        log,
    )
    with_tls = set(re.findall(r"conn=(\d+) fd=\d+ TLS established", log))
    return sum(conn in with_tls for conn in accepted)


def test_identity_isolation_with_a_small_pool(
    tmp_path: Path, ca: CertificateAuthority, fresh_slapd, run_proxy
) -> None:
    """24 clients, each with bulk users of its own, run 40 short sessions each through a
    pool of at most 3 upstream connections: every WhoAmI names the session's own
    identity (nothing, when anonymous), every read returns only the session's own entry,
    every request is answered, and the proxy logs no warning or error."""
    upstream: Slapd = fresh_slapd()
    config, (listener,) = proxy_config(
        tmp_path,
        ca,
        [upstream.ldaps_url],
        listeners=[Listener("none", "plain")],
        pool={"min_idle": 2, "max_size": POOL_MAX, "acquire_timeout": 20},
    )
    proxy = run_proxy(config)
    clients = [IdentityClient(i, listener.port, upstream.ca_path) for i in range(IDENTITY_CLIENTS)]
    threads = [threading.Thread(target=c.run, name=f"identity-{c.index}") for c in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads), "a client did not finish"

    mismatches = [line for c in clients for line in c.mismatches]
    assert not mismatches, f"{len(mismatches)} mismatch(es):\n" + "\n".join(mismatches[:20])
    errors = [line for c in clients for line in c.errors]
    assert not errors, f"{len(errors)} error(s):\n" + "\n".join(errors[:20])
    assert sum(c.checks for c in clients) >= IDENTITY_CLIENTS * CYCLES * 2

    # The sessions really shared a few upstream connections: besides the first ones, only
    # those of sessions that left with requests unanswered may have been replaced.
    connections = tls_connections_from_proxy(upstream)
    left_in_flight = sum(c.left_in_flight for c in clients)
    assert 1 <= connections <= POOL_MAX + left_in_flight, (connections, left_in_flight)
    assert connections < IDENTITY_CLIENTS * CYCLES / 4, connections
    assert proxy.process is not None
    assert proxy.process.poll() is None, "the proxy exited"
    warnings = [
        line
        for line in proxy.log_text().splitlines()
        if LOG_PROBLEMS.search(line) or re.match(r"^\S+ warn ", line)
    ]
    assert not warnings, "\n".join(warnings)


# -- the checks themselves ----------------------------------------------------------------------


def test_the_checks_catch_lost_invented_and_crossed_results(tmp_path: Path) -> None:
    """The verdicts above can fail: fed made-up histories, entries and PDUs, they flag a
    lost write, an applied write that was answered with an error, an entry nobody added,
    a response for another client's message ID, a response of the wrong type, and a
    WhoAmI naming someone else."""
    dn = f"uid=w0-00001,{PEOPLE_DN}"
    other = f"uid=w1-00002,{PEOPLE_DN}"

    def history() -> list[Op]:
        return [
            Op("add", dn, "w0-00001 v0", "success", SUCCESS),
            Op("modify", dn, "w0-00001 m2", "success", SUCCESS),
            Op("modify", dn, "w0-00001 m3", "unknown"),
            Op("modify", dn, "w0-00001 m4", "error", 52),
            Op("add", other, "w1-00002 v0", "unknown"),
        ]

    key = dn.lower()
    assert not final_value_problems(history(), {key: ["w0-00001 m2"]})
    assert not final_value_problems(history(), {key: ["w0-00001 m3"]})
    assert not final_value_problems(history(), {key: ["w0-00001 m2"], other: ["w1-00002 v0"]})
    for entries in (
        {},  # the successful add is lost
        {key: ["w0-00001 v0"]},  # the successful replace is lost
        {key: ["w0-00001 m4"]},  # the replace answered unavailable was applied
        {key: ["w0-00001 m2", "w0-00001 m3"]},
        {key: ["w0-00001 m2"], other: ["w1-00002 m9"]},
        {key: ["w0-00001 m2"], f"uid=w2-00003,{PEOPLE_DN}": ["w2-00003 v0"]},  # nobody's
    ):
        assert final_value_problems(history(), entries), entries
    failed_add = [Op("add", dn, "w0-00001 v0", "error", 51)]
    assert final_value_problems(failed_add, {key: ["w0-00001 v0"]})

    writer = Writer(0, 0, tmp_path, threading.Event(), ALICE_DN, "")
    mine, theirs = ID_SPACE + 1, 2 * ID_SPACE + 1
    add_response = tlv(ADD_RESPONSE, integer(SUCCESS, 0x0A) + octets("") + octets(""))
    modify_response = tlv(MODIFY_RESPONSE, integer(SUCCESS, 0x0A) + octets("") + octets(""))

    def whoami_response(authzid: str) -> bytes:
        return tlv(
            EXTENDED_RESPONSE,
            integer(SUCCESS, 0x0A) + octets("") + octets("") + octets(authzid, 0x8B),
        )

    def pdu(message_id: int, op: bytes) -> Pdu:
        return Pdu(message_id, op[0], message(message_id, op))

    writer.bind = Op("bind", ALICE_DN, outcome="success", code=SUCCESS)
    batch = [(Op("add", dn), b""), (Op("whoami", ALICE_DN), b"")]
    outstanding = {mine: batch[0][0], mine + 1: batch[1][0]}
    writer.check(pdu(theirs, add_response), outstanding)
    assert "owned by writer 1" in writer.violations.pop()
    writer.check(pdu(mine, modify_response), outstanding)
    assert "in answer to its add" in writer.violations.pop()
    writer.check(pdu(mine + 1, whoami_response(f"dn:{ADMIN_DN}")), outstanding)
    assert not outstanding
    assert not writer.violations
    writer.check_identities(batch)
    assert "WhoAmI said" in writer.violations.pop()
    batch = [(Op("add", dn), b""), (Op("whoami", ALICE_DN), b"")]
    outstanding = {mine + 2: batch[0][0], mine + 3: batch[1][0]}
    writer.check(pdu(mine + 2, add_response), outstanding)
    writer.check(pdu(mine + 3, whoami_response(f"dn:{ALICE_DN}")), outstanding)
    writer.check_identities(batch)
    assert not writer.violations
    assert not outstanding
    writer.bind = Op("bind", ALICE_DN, outcome="error", code=52)  # then anonymous
    writer.check_identities(batch)
    assert "WhoAmI said" in writer.violations.pop()

    client = IdentityClient(0, 0, tmp_path)
    own = client.users[0][0]
    client.raw_results([pdu(2, whoami_response(f"dn:{own}"))], own, {2})
    assert not client.mismatches
    client.raw_results([pdu(2, whoami_response(f"dn:{bulk_user_dn(99)}"))], own, {2})
    client.raw_results([pdu(2, whoami_response(f"dn:{own}"))], None, {2})
    client.raw_results([pdu(3, whoami_response(f"dn:{own}"))], own, {2})
    assert len(client.mismatches) == 3, client.mismatches
