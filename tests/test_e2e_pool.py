"""End to end: the upstream connection pool, with ``ldapproxy run`` in front of real slapd
processes and real clients (raw sockets, ldapwhoami, ldapsearch).

* Identity isolation: with ``pool.max_size = 1`` the next session *must* get the previous
  session's upstream connection (or a replacement); whatever the previous client did
  before it left, the next one is anonymous and cannot read ``cn=vault``.
* Reuse, exhaustion (busy), failover and recovery, round-robin, connections dropped by the
  server while idle, ``max_lifetime`` recycling, and every upstream down at start.

slapd's ``-d stats`` log is the witness: ``conn=N fd=F ACCEPT from IP=... (IP=127.0.0.1:PORT)``
for each TCP connection (only the proxy gets as far as TLS on the ldaps port), and
``conn=N op=K BIND dn="..."`` for each bind.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from support.compare import (
    PAGED_RESULTS_OID,
    SCOPE_BASE,
    SCOPE_SUB,
    WHOAMI_OID,
    Pdu,
    RawClient,
    abandon,
    control,
    extended,
    integer,
    message,
    octets,
    read_tlv,
    sasl_bind,
    search,
    simple_bind,
    tlv,
    unbind,
)
from support.ldaptools import run_ldap_tool
from support.net import LOOPBACK
from support.proxy import Listener, proxy_config
from support.slapd import (
    ADMIN_READER_DN,
    ALICE_DN,
    BOB_DN,
    SUFFIX,
    USERS,
    VAULT_DN,
    VAULT_SECRET,
    Slapd,
)

from ldapproxy.pki import CertificateAuthority

pytestmark = pytest.mark.slapd

READER_PASSWORD = USERS[ADMIN_READER_DN]
NOTICE_OF_DISCONNECTION_OID = b"1.3.6.1.4.1.1466.20036"

BIND_RESPONSE = 0x61
SEARCH_RESULT_ENTRY = 0x64
SEARCH_RESULT_DONE = 0x65
EXTENDED_RESPONSE = 0x78

SUCCESS = 0
INVALID_CREDENTIALS = 49
SASL_BIND_IN_PROGRESS = 14
NO_SUCH_OBJECT = 32
BUSY = 51
UNAVAILABLE = 52

#: Small, fast pool settings; each test overrides what it is about.
FAST_POOL: dict[str, object] = {
    "acquire_timeout": 1,
    "health_check_interval": 30,
}


# -- helpers ---------------------------------------------------------------------------------


def eventually(
    check: Callable[[], object], timeout: float, interval: float = 0.05, what: str = ""
) -> object:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout:g} s: {what or check}")
        time.sleep(interval)


def accept_lines(upstream: Slapd, since: int = 0) -> list[str]:
    """slapd's ACCEPT lines, since ``since``, for the proxy's connections: those to the
    ldaps port that got as far as TLS (slapd's readiness check opens and closes a bare TCP
    connection to that port too)."""
    lines = []
    # Connection numbers start again at each start of slapd (its log is appended to).
    for run in upstream.log_text()[since:].split("slapd starting"):
        accepted = re.finditer(
            rf"conn=(\d+) fd=\d+ ACCEPT from IP={re.escape(LOOPBACK)}:\d+ "
            rf"\(IP={re.escape(LOOPBACK)}:{upstream.ldaps_port}\)",
            run,
        )
        with_tls = set(re.findall(r"conn=(\d+) fd=\d+ TLS established", run))
        lines += [match.group(0) for match in accepted if match.group(1) in with_tls]
    return lines


def binds_as(upstream: Slapd, dn: str, since: int = 0) -> list[str]:
    """The connection numbers of slapd's ``BIND dn="<dn>"`` requests since ``since``."""
    pattern = re.compile(rf'conn=(\d+) op=\d+ BIND dn="{re.escape(dn)}" method=128')
    return pattern.findall(upstream.log_text()[since:])


def wait_warm(upstream: Slapd, count: int = 1) -> None:
    """Wait until the proxy's pool has opened ``count`` TLS connections to ``upstream``."""
    eventually(
        lambda: len(accept_lines(upstream)) >= count,
        5,
        what=f"{count} pool connection(s) to {upstream.ldaps_url}",
    )


def tool(
    name: str, url: str, env: dict[str, str], *args: str, dn: str | None = None
) -> tuple[int, str, str]:
    """Run an ldap-utils client with simple auth (anonymous without ``dn``)."""
    argv = [name, "-x", "-H", url, "-o", "nettimeout=5"]
    if dn is not None:
        argv += ["-D", dn, "-w", USERS[dn]]
    result = run_ldap_tool([*argv, *args], env, timeout=15)
    return result.returncode, result.stdout, result.stderr


def whoami_as(url: str, env: dict[str, str], dn: str = ALICE_DN) -> tuple[int, str, str]:
    return tool("ldapwhoami", url, env, dn=dn)


def extended_fields(pdu: Pdu) -> tuple[int, bytes | None, bytes | None]:
    """``(resultCode, responseName, responseValue)`` of an ExtendedResponse."""
    raw = pdu.raw
    _, start, _ = read_tlv(raw, 0)
    _, _, id_end = read_tlv(raw, start)
    tag, op_start, op_end = read_tlv(raw, id_end)
    assert tag == EXTENDED_RESPONSE, f"not an ExtendedResponse: {pdu}"
    _, code_start, pos = read_tlv(raw, op_start)
    code = int.from_bytes(raw[code_start:pos], "big")
    for _ in range(2):  # matchedDN, diagnosticMessage
        pos = read_tlv(raw, pos)[2]
    name = value = None
    while pos < op_end:
        tag, value_start, value_end = read_tlv(raw, pos)
        if tag == 0x8A:
            name = raw[value_start:value_end]
        elif tag == 0x8B:
            value = raw[value_start:value_end]
        pos = value_end
    return code, name, value


def connect(listener: Listener, ca_path: Path, timeout: float = 5) -> RawClient:
    """A raw client on a proxy listener (TLS at once on an ldaps listener)."""
    return RawClient(
        LOOPBACK,
        listener.port,
        cafile=ca_path,
        implicit_tls=listener.tls == "ldaps",
        timeout=timeout,
    )


def bind(client: RawClient, message_id: int, dn: str, password: str) -> int:
    client.send(message(message_id, simple_bind(dn, password)))
    (response,) = client.until_final(message_id)
    assert response.op == BIND_RESPONSE, response
    return response.result_code


def read_vault(client: RawClient, message_id: int) -> list[Pdu]:
    """A base search of cn=vault for its description; every PDU up to the final one."""
    client.send(message(message_id, search(VAULT_DN, SCOPE_BASE, attributes=["description"])))
    return client.until_final(message_id)


def assert_sees_secret(pdus: list[Pdu]) -> None:
    """Sanity check for client A: admin-reader really can read the secret."""
    assert any(VAULT_SECRET.encode() in p.raw for p in pdus if p.op == SEARCH_RESULT_ENTRY), pdus
    assert pdus[-1].result_code == SUCCESS


def paged_control(size: int, cookie: bytes = b"") -> bytes:
    return control(PAGED_RESULTS_OID, value=tlv(0x30, integer(size) + octets(cookie)))


# -- 1. identity isolation -------------------------------------------------------------------
#
# Each ordering is what client A (bound as admin-reader, the only user who may read
# cn=vault) does before it leaves.  The socket is closed by the caller afterwards.


def a_binds_searches_unbinds(client: RawClient) -> None:
    assert bind(client, 1, ADMIN_READER_DN, READER_PASSWORD) == SUCCESS
    assert_sees_secret(read_vault(client, 2))
    client.send(message(3, unbind()))


def a_disconnects_without_unbind(client: RawClient) -> None:
    assert bind(client, 1, ADMIN_READER_DN, READER_PASSWORD) == SUCCESS
    assert_sees_secret(read_vault(client, 2))


def a_last_bind_failed(client: RawClient) -> None:
    assert bind(client, 1, ADMIN_READER_DN, READER_PASSWORD) == SUCCESS
    assert_sees_secret(read_vault(client, 2))
    assert bind(client, 3, ADMIN_READER_DN, "wrong-password") == INVALID_CREDENTIALS


def a_second_successful_bind(client: RawClient) -> None:
    assert bind(client, 1, ALICE_DN, USERS[ALICE_DN]) == SUCCESS
    assert bind(client, 2, ADMIN_READER_DN, READER_PASSWORD) == SUCCESS
    assert_sees_secret(read_vault(client, 3))


def a_abandons_a_search(client: RawClient) -> None:
    assert bind(client, 1, ADMIN_READER_DN, READER_PASSWORD) == SUCCESS
    client.send(message(2, search(SUFFIX, SCOPE_SUB)))
    first = client.receive()
    assert first is not None
    assert first.message_id == 2, first
    client.send(message(3, abandon(2)))


def a_leaves_mid_operation(client: RawClient) -> None:
    assert bind(client, 1, ADMIN_READER_DN, READER_PASSWORD) == SUCCESS
    # Big searches (every entry, every attribute, cn=vault's description included),
    # and gone without reading a byte of them.
    client.send(*(message(i, search(SUFFIX, SCOPE_SUB)) for i in range(2, 7)))


def a_leaves_sasl_bind_in_progress(client: RawClient) -> None:
    assert bind(client, 1, ADMIN_READER_DN, READER_PASSWORD) == SUCCESS
    assert_sees_secret(read_vault(client, 2))
    client.send(message(3, sasl_bind("CRAM-MD5")))
    (challenge,) = client.until_final(3)
    assert challenge.result_code == SASL_BIND_IN_PROGRESS, challenge


def a_stops_after_first_page(client: RawClient) -> None:
    assert bind(client, 1, ADMIN_READER_DN, READER_PASSWORD) == SUCCESS
    client.send(message(2, search(SUFFIX, SCOPE_SUB), [paged_control(10)]))
    page = client.until_final(2)
    assert sum(p.op == SEARCH_RESULT_ENTRY for p in page) == 10
    assert page[-1].result_code == SUCCESS


def a_leaves_bind_in_flight(client: RawClient) -> None:
    assert bind(client, 1, ALICE_DN, USERS[ALICE_DN]) == SUCCESS
    # Gone before the answer: the bind may complete on the upstream after A has left.
    client.send(message(2, simple_bind(ADMIN_READER_DN, READER_PASSWORD)))


def a_pipelines_bind_and_unbind(client: RawClient) -> None:
    # Bind, search and Unbind in one write: the Unbind arrives while the bind is outstanding
    # (or before the session has even been given an upstream connection).
    client.send(
        message(1, simple_bind(ADMIN_READER_DN, READER_PASSWORD)),
        message(2, search(VAULT_DN, SCOPE_BASE, attributes=["description"])),
        message(3, unbind()),
    )


def a_whoami_then_disconnects(client: RawClient) -> None:
    assert bind(client, 1, ADMIN_READER_DN, READER_PASSWORD) == SUCCESS
    client.send(message(2, extended(WHOAMI_OID)))
    (response,) = client.until_final(2)
    assert extended_fields(response)[2] == f"dn:{ADMIN_READER_DN}".encode()


ORDERINGS: dict[str, Callable[[RawClient], None]] = {
    "a-unbind": a_binds_searches_unbinds,
    "b-tcp-close": a_disconnects_without_unbind,
    "c-last-bind-failed": a_last_bind_failed,
    "d-second-bind": a_second_successful_bind,
    "e-abandon": a_abandons_a_search,
    "f-mid-operation": a_leaves_mid_operation,
    "g-sasl-in-progress": a_leaves_sasl_bind_in_progress,
    "h-paged-first-page": a_stops_after_first_page,
    "i-whoami": a_whoami_then_disconnects,
    "j-bind-in-flight": a_leaves_bind_in_flight,
    "k-pipelined-unbind": a_pipelines_bind_and_unbind,
}

#: Orderings after which nothing is in flight: the connection must be reset and reused.
REUSED = {"a-unbind", "b-tcp-close", "c-last-bind-failed", "d-second-bind", "i-whoami"}
#: Orderings after which the pool documents that the connection is closed and replaced.
REPLACED = {"g-sasl-in-progress", "h-paged-first-page"}
# e, f, j and k race with slapd (the search or bind may be complete before the abandon or
# the close arrives), so either outcome is fine there; only the identity matters.


def check_anonymous_pdus(pdus: list[Pdu], sent: set[int]) -> None:
    """Nothing client A could see reaches client B."""
    for pdu in pdus:
        assert VAULT_SECRET.encode() not in pdu.raw, f"B received the secret: {pdu}"
        assert ADMIN_READER_DN.encode() not in pdu.raw, f"B received A's identity: {pdu}"
        assert pdu.message_id in sent, f"B received a PDU for a request it never sent: {pdu}"
        assert pdu.op != SEARCH_RESULT_ENTRY, f"an anonymous search returned an entry: {pdu}"


def b_raw_whoami_first(listener: Listener, ca_path: Path, env: dict[str, str]) -> str:
    """Client B, no bind at all: WhoAmI is its very first PDU, then the reads."""
    with connect(listener, ca_path) as client:
        client.send(message(1, extended(WHOAMI_OID)))
        (who,) = client.until_final(1)
        client.send(message(2, search(VAULT_DN, SCOPE_BASE, attributes=["description"])))
        vault = client.until_final(2)
        client.send(message(3, search(SUFFIX, SCOPE_SUB)))
        tree = client.until_final(3)
        stray = client.quiet_for(0.2)
    code, _, value = extended_fields(who)
    assert (code, value or b"") == (SUCCESS, b""), f"B is not anonymous: {value!r}"
    assert vault[-1].result_code in (SUCCESS, NO_SUCH_OBJECT), vault
    check_anonymous_pdus([who, *vault, *tree, *stray], {1, 2, 3})
    return r'SRCH base="dc=example,dc=com" scope=2'


def b_raw_search_first(listener: Listener, ca_path: Path, env: dict[str, str]) -> str:
    """Client B, no bind at all: the cn=vault read is its very first PDU."""
    with connect(listener, ca_path) as client:
        client.send(message(2, search(VAULT_DN, SCOPE_BASE, attributes=["description"])))
        vault = client.until_final(2)
        client.send(message(3, search(SUFFIX, SCOPE_SUB)))
        tree = client.until_final(3)
        client.send(message(4, extended(WHOAMI_OID)))
        (who,) = client.until_final(4)
        stray = client.quiet_for(0.2)
    code, _, value = extended_fields(who)
    assert (code, value or b"") == (SUCCESS, b""), f"B is not anonymous: {value!r}"
    check_anonymous_pdus([*vault, *tree, who, *stray], {2, 3, 4})
    return r"WHOAMI"


def b_ldapwhoami(listener: Listener, ca_path: Path, env: dict[str, str]) -> str:
    """Client B: ``ldapwhoami -x`` with no DN (an anonymous bind, then WhoAmI)."""
    code, out, err = tool("ldapwhoami", listener.url, env)
    assert code == 0, err
    assert out.strip() == "anonymous"
    return r"WHOAMI"


def b_ldapsearch(listener: Listener, ca_path: Path, env: dict[str, str]) -> str:
    """Client B: ``ldapsearch -x`` with no DN for cn=vault's description."""
    code, out, err = tool(
        "ldapsearch", listener.url, env, "-LLL", "-b", VAULT_DN, "-s", "base", "description"
    )
    assert code in (SUCCESS, NO_SUCH_OBJECT), err
    assert VAULT_SECRET not in out
    assert "description" not in out
    return rf'SRCH base="{re.escape(VAULT_DN)}"'


def b_raw_failed_bind_first(listener: Listener, ca_path: Path, env: dict[str, str]) -> str:
    """Client B's first PDU is a Bind that fails (A's DN, wrong password), with WhoAmI and
    the cn=vault read pipelined behind it in the same write: they must run anonymous."""
    with connect(listener, ca_path) as client:
        client.send(
            message(1, simple_bind(ADMIN_READER_DN, "not-the-password"))
            + message(2, extended(WHOAMI_OID))
            + message(3, search(VAULT_DN, SCOPE_BASE, attributes=["description"]))
        )
        # slapd may answer the pipelined requests in any order.
        pdus = client.until_final(1, 2, 3)
        stray = client.quiet_for(0.2)
    (bound,) = [p for p in pdus if p.message_id == 1]
    (who,) = [p for p in pdus if p.message_id == 2]
    vault = [p for p in pdus if p.message_id == 3]
    assert bound.result_code == INVALID_CREDENTIALS, bound
    code, _, value = extended_fields(who)
    assert (code, value or b"") == (SUCCESS, b""), f"B is not anonymous: {value!r}"
    check_anonymous_pdus([bound, who, *vault, *stray], {1, 2, 3})
    return r'SRCH base="cn=vault'


def b_raw_binds_as_alice_first(listener: Listener, ca_path: Path, env: dict[str, str]) -> str:
    """Client B's first PDU is its own successful Bind (alice), WhoAmI pipelined behind it:
    B is alice, never A, and still cannot read cn=vault."""
    with connect(listener, ca_path) as client:
        client.send(
            message(1, simple_bind(ALICE_DN, USERS[ALICE_DN]))
            + message(2, extended(WHOAMI_OID))
            + message(3, search(VAULT_DN, SCOPE_BASE, attributes=["description"]))
        )
        # slapd may answer the pipelined requests in any order.
        pdus = client.until_final(1, 2, 3)
    (bound,) = [p for p in pdus if p.message_id == 1]
    (who,) = [p for p in pdus if p.message_id == 2]
    vault = [p for p in pdus if p.message_id == 3]
    assert bound.result_code == SUCCESS, bound
    assert extended_fields(who)[2] == f"dn:{ALICE_DN}".encode()
    assert all(VAULT_SECRET.encode() not in p.raw for p in vault)
    return r'SRCH base="cn=vault'


CLIENTS_B = (
    b_raw_whoami_first,
    b_raw_search_first,
    b_raw_failed_bind_first,
    b_raw_binds_as_alice_first,
    b_ldapwhoami,
    b_ldapsearch,
)
#: B clients that never bind successfully before their first request: on A's connection
#: the proxy must send its own anonymous Bind first.
RESET_BY_PROXY = {"b_raw_whoami_first", "b_raw_search_first", "b_raw_failed_bind_first"}


def connections_used(upstream: Slapd, mark: int, last_op_of_b: str) -> tuple[str, str | None, str]:
    """slapd's log since ``mark`` (once B's last operation is in it), the connection number
    of A's first bind (None if it never reached slapd: in k the Unbind can end the session
    first) and that of B's last operation."""
    pattern = re.compile(rf"conn=(\d+) op=\d+ {last_op_of_b}")
    eventually(
        lambda: pattern.search(upstream.log_text()[mark:]), 5, what=f"{last_op_of_b} in the log"
    )
    log = upstream.log_text()[mark:]
    a_conn = re.search(r'conn=(\d+) op=\d+ BIND dn="uid=', log)
    b_conn = pattern.findall(log)[-1]
    return log, a_conn.group(1) if a_conn else None, b_conn


@pytest.mark.parametrize("listener_tls", ["none", "ldaps"])
@pytest.mark.parametrize("ordering", list(ORDERINGS))
def test_next_session_is_anonymous(
    ordering: str,
    listener_tls: str,
    tmp_path: Path,
    ca: CertificateAuthority,
    fresh_slapd,
    run_proxy,
) -> None:
    """With one pooled connection, whatever client A did before leaving, client B (who
    never binds, or binds anonymously) is anonymous and cannot read cn=vault -- whether B
    gets A's connection after a reset or a replacement."""
    upstream: Slapd = fresh_slapd()
    config, (listener,) = proxy_config(
        tmp_path,
        ca,
        [upstream.ldaps_url],
        listeners=[Listener(listener_tls, "clients")],
        pool={**FAST_POOL, "min_idle": 1, "max_size": 1, "acquire_timeout": 3},
    )
    proxy = run_proxy(config)
    wait_warm(upstream)
    env = upstream.ldap_env()
    for client_b in CLIENTS_B:
        mark = len(upstream.log_text())
        with connect(listener, upstream.ca_path) as client_a:
            ORDERINGS[ordering](client_a)
        last_op_of_b = client_b(listener, upstream.ca_path, env)

        log, a_conn, b_conn = connections_used(upstream, mark, last_op_of_b)
        what = f"{ordering}, then {client_b.__name__}"
        if ordering in REUSED:
            assert a_conn is not None, f"{what}: A's bind is not in slapd's log\n{log}"
            assert b_conn == a_conn, f"{what}: B did not reuse A's connection\n{log}"
            assert not accept_lines(upstream, mark), f"{what}: a new upstream connection\n{log}"
            if client_b.__name__ in RESET_BY_PROXY:
                # B never binds, so the anonymous bind on A's connection is the pool's reset.
                reset = rf'conn={a_conn} op=\d+ BIND dn="" method=128'
                assert re.search(reset, log), f"{what}: no identity reset\n{log}"
        elif ordering in REPLACED:
            assert a_conn is not None, f"{what}: A's bind is not in slapd's log\n{log}"
            assert b_conn != a_conn, f"{what}: A's connection was reused\n{log}"
    assert proxy.process is not None
    assert proxy.process.poll() is None


# -- 1b. a client that leaves with answers still queued for it --------------------------------


def tcp_queues(*ports: int) -> dict[tuple[int, int], tuple[int, int]]:
    """``(local port, remote port) -> (send queue, receive queue)`` in bytes for the
    established loopback TCP sockets with one of ``ports`` at either end."""
    queues = {}
    ss = shutil.which("ss")
    if ss is not None:  # fast: the kernel filters (a busy machine has many TIME-WAITs)
        ends = " or ".join(f"sport = :{p} or dport = :{p}" for p in ports)
        listing = subprocess.run(
            [ss, "-tnH", "state", "established", f"( {ends} )"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for line in listing.splitlines():
            rx, tx, local, remote = line.split()[:4]
            queues[int(local.rsplit(":", 1)[1]), int(remote.rsplit(":", 1)[1])] = (int(tx), int(rx))
        return queues
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            if fields[3] != "01":  # TCP_ESTABLISHED
                continue
            local = int(fields[1].rsplit(":", 1)[1], 16)
            remote = int(fields[2].rsplit(":", 1)[1], 16)
            if local in ports or remote in ports:
                tx, rx = (int(n, 16) for n in fields[4].split(":"))
                queues[local, remote] = (tx, rx)
    return queues


def schema_read(attribute: str) -> Callable[[int], bytes]:
    """A base search of cn=Subschema for one attribute: public, and big."""
    return lambda message_id: message(
        message_id, search("cn=Subschema", SCOPE_BASE, attributes=[attribute])
    )


def fill_until_paused(listener: Listener, upstream: Slapd, sizes: dict[str, int]) -> str:
    """Ask for schema reads without reading the answers, one at a time, until the proxy
    holds more than 64 KiB for this client in its own send buffer (Twisted's limit, where it
    stops reading from the upstream) *and* has read every answer from the upstream, so no
    operation is outstanding.  Then leave (TCP close).  Returns what happened: "paused",
    "overshoot" (the proxy stopped reading with an answer half read) or "never" (the proxy
    buffered 8 MB without pausing)."""
    big, small = schema_read("attributeTypes"), schema_read("matchingRules")
    log_mark = len(upstream.log_text())
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        client.settimeout(5)
        client.connect((LOOPBACK, listener.port))
        port = client.getsockname()[1]
        answered = 0  # bytes of answers slapd has sent for this client

        def settled(requests: int) -> tuple[int, int] | None:
            """Once slapd has answered every request and the queues stand still:
            (bytes the proxy holds for the client, bytes it has not read from slapd)."""
            deadline = time.monotonic() + 1
            while upstream.log_text()[log_mark:].count("SEARCH RESULT tag=101") < requests:
                if time.monotonic() > deadline:
                    return None  # slapd cannot send: the proxy stopped reading mid-answer
                time.sleep(0.002)
            previous = None
            while time.monotonic() < deadline:
                queues = tcp_queues(listener.port, upstream.ldaps_port)
                if queues == previous and queues.get((port, listener.port), (0, 0))[0] == 0:
                    in_kernel = queues.get((listener.port, port), (0, 0))[0]
                    in_kernel += queues.get((port, listener.port), (0, 0))[1]
                    unread = [
                        rx for (_, far), (_, rx) in queues.items() if far == upstream.ldaps_port
                    ]
                    return answered - in_kernel, max(unread, default=0)
                previous = queues
                time.sleep(0.005)
            return None

        fine = False
        requests = 0
        while answered < 8_000_000:
            request, size = (small, sizes["small"]) if fine else (big, sizes["big"])
            requests += 1
            client.sendall(request(requests))
            answered += size
            state = settled(requests)
            if state is None or state[1]:
                return "overshoot"
            if state[0] > 65536:
                return "paused"
            # Once the kernel buffers are full, go on in small steps.
            fine = fine or state[0] > 512
        return "never"
    finally:
        client.close()


def test_client_leaving_with_unread_results_does_not_stall_the_next_session(
    tmp_path: Path, ca: CertificateAuthority, fresh_slapd, run_proxy
) -> None:
    """An anonymous client asks for a lot, reads none of it, and leaves after every answer
    has reached the proxy but while the proxy still buffers more than 64 KiB for it -- so
    the proxy has paused reading from the upstream (flow control) and nothing is
    outstanding: the connection goes back to the pool as reusable.  The next session on
    that connection must work; it must not inherit a connection nobody reads from."""
    upstream: Slapd = fresh_slapd()
    config, (listener,) = proxy_config(
        tmp_path,
        ca,
        [upstream.ldaps_url],
        listeners=[Listener("none", "plain")],
        pool={**FAST_POOL, "min_idle": 1, "max_size": 1, "acquire_timeout": 3},
    )
    run_proxy(config)
    wait_warm(upstream)
    sizes = {}
    with connect(listener, upstream.ca_path) as reader:
        for key, attribute, message_id in (
            ("big", "attributeTypes", 1),
            ("small", "matchingRules", 2),
        ):
            reader.send(schema_read(attribute)(message_id))
            sizes[key] = sum(len(p.raw) for p in reader.until_final(message_id))
    assert sizes["big"] < 60000, sizes
    assert sizes["small"] < 8000, sizes

    for _ in range(3):
        opened = len(accept_lines(upstream))
        outcome = fill_until_paused(listener, upstream, sizes)
        if outcome != "overshoot":
            break
        # The proxy closed that connection (an answer was outstanding); try again on the
        # replacement.
        wait_warm(upstream, opened + 1)
    with connect(listener, upstream.ca_path, timeout=3) as client_b:
        client_b.send(message(1, extended(WHOAMI_OID)))
        try:
            (who,) = client_b.until_final(1)
        except TimeoutError:
            pytest.fail(
                f"after the previous client left ({outcome}), the next session's WhoAmI got no "
                "answer within 3 s: its upstream connection is no longer read from"
            )
    assert extended_fields(who)[0] == SUCCESS


# -- 2. reuse ----------------------------------------------------------------------------------


def test_sequential_sessions_reuse_pooled_connections(
    tmp_path: Path, ca: CertificateAuthority, fresh_slapd, run_proxy
) -> None:
    """20 short sessions (bind, search, unbind) ride on the two warm connections: slapd
    accepts at most a few TLS connections from the proxy, not 20."""
    upstream: Slapd = fresh_slapd()
    config, (listener,) = proxy_config(
        tmp_path,
        ca,
        [upstream.ldaps_url],
        listeners=[Listener("none", "plain")],
        pool={**FAST_POOL, "min_idle": 2},
    )
    run_proxy(config)
    wait_warm(upstream, 2)
    env = upstream.ldap_env()
    for _ in range(20):
        code, out, err = tool(
            "ldapsearch", listener.url, env, "-LLL", "-b", ALICE_DN, "-s", "base", "uid",
            dn=ALICE_DN,
        )  # fmt: skip
        assert code == 0, err
        assert "uid: alice" in out
    eventually(lambda: len(binds_as(upstream, ALICE_DN)) == 20, 5, what="20 binds in slapd's log")
    accepted = accept_lines(upstream)
    assert len(accepted) <= 3, "\n".join(accepted)
    assert len(set(binds_as(upstream, ALICE_DN))) <= 3


# -- 3. exhaustion ---------------------------------------------------------------------------


def test_exhausted_pool_answers_busy_then_recovers(
    tmp_path: Path, ca: CertificateAuthority, fresh_slapd, run_proxy
) -> None:
    """max_size = 1: while one client holds the only connection, another's bind is answered
    busy (51) with a diagnostic after acquire_timeout; once the holder leaves, it works."""
    upstream: Slapd = fresh_slapd()
    config, (listener,) = proxy_config(
        tmp_path,
        ca,
        [upstream.ldaps_url],
        listeners=[Listener("none", "plain")],
        pool={**FAST_POOL, "min_idle": 1, "max_size": 1, "acquire_timeout": 0.5},
    )
    proxy = run_proxy(config)
    wait_warm(upstream)
    env = upstream.ldap_env()
    with (
        connect(listener, upstream.ca_path) as holder,
        connect(listener, upstream.ca_path) as other,
    ):
        assert bind(holder, 1, ALICE_DN, USERS[ALICE_DN]) == SUCCESS

        started = time.monotonic()
        other.send(message(1, simple_bind(BOB_DN, USERS[BOB_DN])))
        (busy,) = other.until_final(1, timeout=3)
        elapsed = time.monotonic() - started
        assert (busy.op, busy.result_code) == (BIND_RESPONSE, BUSY), busy
        assert b"busy" in busy.raw, "the busy answer should carry a diagnostic"
        assert 0.4 <= elapsed < 1.5, elapsed

        started = time.monotonic()
        code, _, err = whoami_as(listener.url, env, BOB_DN)
        assert code == BUSY, err
        assert "busy" in err
        assert time.monotonic() - started < 1.5

        holder.send(message(2, unbind()))
        assert holder.until_closed(3) is not None
        # The client that was answered busy may simply try again on the same session.
        assert bind(other, 2, BOB_DN, USERS[BOB_DN]) == SUCCESS
    code, out, err = whoami_as(listener.url, env, ALICE_DN)
    assert code == 0, err
    assert out.strip() == f"dn:{ALICE_DN}"
    proxy.wait_for_log(r"answered busy")


# -- 4. failover and recovery ----------------------------------------------------------------


def test_failover_and_recovery(
    tmp_path: Path, ca: CertificateAuthority, fresh_slapd, run_proxy
) -> None:
    """strategy = failover with [A, B]: sessions use A; when A dies, sessions holding it get
    a Notice of Disconnection, new ones succeed on B, and the proxy says once that A is
    down; when A is back, the proxy says so by itself and sessions use A again."""
    first: Slapd = fresh_slapd()
    second: Slapd = fresh_slapd()
    config, (listener,) = proxy_config(
        tmp_path,
        ca,
        [first.ldaps_url, second.ldaps_url],
        listeners=[Listener("none", "plain")],
        upstream={"strategy": "failover", "connect_timeout": 1},
        pool={**FAST_POOL, "min_idle": 2, "health_check_interval": 0.5},
    )
    proxy = run_proxy(config)
    wait_warm(first, 2)
    wait_warm(second, 2)
    env = first.ldap_env()
    down_line = rf"upstream {re.escape(first.ldaps_url)} is down"

    for _ in range(3):
        code, out, err = whoami_as(listener.url, env)
        assert (code, out.strip()) == (0, f"dn:{ALICE_DN}"), err
    assert len(binds_as(first, ALICE_DN)) == 3
    assert binds_as(second, ALICE_DN) == []

    with connect(listener, first.ca_path) as holder:
        assert bind(holder, 1, BOB_DN, USERS[BOB_DN]) == SUCCESS
        assert len(binds_as(first, BOB_DN)) == 1
        second_mark = len(second.log_text())
        first.stop()
        died = time.monotonic()
        rest = holder.until_closed(5)
    assert rest is not None, "the session on the dead upstream was left open"
    notices = [p for p in rest if p.message_id == 0]
    assert len(notices) == 1, rest
    code, name, _ = extended_fields(notices[0])
    assert (name, code) == (NOTICE_OF_DISCONNECTION_OID, UNAVAILABLE)

    # New sessions go to B; the first may take a moment.
    while True:
        code, out, err = whoami_as(listener.url, env)
        if code == 0 or time.monotonic() - died > 5:
            break
        time.sleep(0.2)
    assert (code, out.strip()) == (0, f"dn:{ALICE_DN}"), f"no failover within 5 s: {err}"
    for _ in range(3):
        code, out, err = whoami_as(listener.url, env)
        assert code == 0, err
    assert len(binds_as(second, ALICE_DN, second_mark)) == 4
    proxy.wait_for_log(down_line)
    assert len(re.findall(down_line, proxy.log_text())) == 1, proxy.log_text()

    # Recovery: A comes back on the same ports; the proxy's probes find it.
    first_mark = len(first.log_text())
    first.start()
    proxy.wait_for_log(rf"upstream {re.escape(first.ldaps_url)} is up again", timeout=8)
    second_mark = len(second.log_text())
    for _ in range(3):
        code, out, err = whoami_as(listener.url, env)
        assert code == 0, err
    assert len(binds_as(first, ALICE_DN, first_mark)) == 3
    assert binds_as(second, ALICE_DN, second_mark) == []
    assert len(re.findall(down_line, proxy.log_text())) == 1, proxy.log_text()


# -- 5. round-robin --------------------------------------------------------------------------


def test_round_robin_spreads_sessions(
    tmp_path: Path, ca: CertificateAuthority, fresh_slapd, run_proxy
) -> None:
    """strategy = round-robin: ten sessions are spread over both upstreams."""
    first: Slapd = fresh_slapd()
    second: Slapd = fresh_slapd()
    config, (listener,) = proxy_config(
        tmp_path,
        ca,
        [first.ldaps_url, second.ldaps_url],
        listeners=[Listener("none", "plain")],
        upstream={"strategy": "round-robin"},
        pool={**FAST_POOL, "min_idle": 2},
    )
    run_proxy(config)
    wait_warm(first, 2)
    wait_warm(second, 2)
    env = first.ldap_env()
    for _ in range(10):
        code, out, err = whoami_as(listener.url, env)
        assert (code, out.strip()) == (0, f"dn:{ALICE_DN}"), err
    on_first, on_second = len(binds_as(first, ALICE_DN)), len(binds_as(second, ALICE_DN))
    assert on_first + on_second == 10
    assert min(on_first, on_second) >= 3, (on_first, on_second)


# -- 6. connections dropped by the server while idle -----------------------------------------


def test_connections_closed_by_server_while_idle_are_replaced(
    tmp_path: Path, ca: CertificateAuthority, fresh_slapd, run_proxy
) -> None:
    """slapd closes connections idle for 2 s (like AD's MaxConnIdleTime).  The health checks
    here run every 3 s, so slapd does close the pooled connections; the proxy notices,
    replaces them, and a new client session works without any error."""
    upstream: Slapd = fresh_slapd(extra_config="idletimeout 2")
    config, (listener,) = proxy_config(
        tmp_path,
        ca,
        [upstream.ldaps_url],
        listeners=[Listener("none", "plain")],
        pool={**FAST_POOL, "min_idle": 2, "health_check_interval": 3},
    )
    proxy = run_proxy(config)
    wait_warm(upstream, 2)
    closed = rf"upstream {re.escape(upstream.ldaps_url)}: connection closed"
    eventually(
        lambda: len(re.findall(closed, proxy.log_text())) >= 2,
        6,
        what="the proxy noticing slapd closing both idle connections",
    )
    assert "closed (idletimeout)" in upstream.log_text()
    wait_warm(upstream, 4)
    env = upstream.ldap_env()
    for _ in range(3):
        code, out, err = whoami_as(listener.url, env)
        assert (code, out.strip()) == (0, f"dn:{ALICE_DN}"), err
    assert "upstream connection lost" not in proxy.log_text()


def test_health_checks_keep_idle_connections_open(
    tmp_path: Path, ca: CertificateAuthority, fresh_slapd, run_proxy
) -> None:
    """With health checks (every 0.5 s) well within slapd's idletimeout (2 s), the pooled
    connections never look idle to slapd: none is dropped, and after 4 s a new session
    still works on one of the two original connections."""
    upstream: Slapd = fresh_slapd(extra_config="idletimeout 2")
    config, (listener,) = proxy_config(
        tmp_path,
        ca,
        [upstream.ldaps_url],
        listeners=[Listener("none", "plain")],
        pool={**FAST_POOL, "min_idle": 2, "health_check_interval": 0.5},
    )
    proxy = run_proxy(config)
    wait_warm(upstream, 2)
    time.sleep(4)
    code, out, err = whoami_as(listener.url, upstream.ldap_env())
    assert (code, out.strip()) == (0, f"dn:{ALICE_DN}"), err
    assert "closed (idletimeout)" not in upstream.log_text()
    # The two warm connections, plus the spare opened when the session leased one of them
    # (opened in the background: slapd may log its ACCEPT after the whoami finished).
    eventually(
        lambda: len(accept_lines(upstream)) >= 3, 5, what="slapd accepting the spare connection"
    )
    assert len(accept_lines(upstream)) == 3
    assert "connection closed" not in proxy.log_text()


# -- 7. max_lifetime -------------------------------------------------------------------------


def test_max_lifetime_recycles_connections(
    tmp_path: Path, ca: CertificateAuthority, fresh_slapd, run_proxy
) -> None:
    """pool.max_lifetime = 1.5 s: over 4 s slapd sees the proxy open new connections to
    replace old ones, and every session in that time succeeds."""
    upstream: Slapd = fresh_slapd()
    config, (listener,) = proxy_config(
        tmp_path,
        ca,
        [upstream.ldaps_url],
        listeners=[Listener("none", "plain")],
        pool={**FAST_POOL, "min_idle": 2, "max_lifetime": 1.5, "health_check_interval": 0.5},
    )
    run_proxy(config)
    wait_warm(upstream, 2)
    env = upstream.ldap_env()
    sessions = 0
    deadline = time.monotonic() + 4
    while time.monotonic() < deadline:
        code, out, err = whoami_as(listener.url, env)
        assert (code, out.strip()) == (0, f"dn:{ALICE_DN}"), err
        sessions += 1
        time.sleep(0.1)
    assert sessions >= 10
    accepted = accept_lines(upstream)
    assert len(accepted) >= 5, "\n".join(accepted)
    # Served by several generations of connections, not one.
    assert len(set(binds_as(upstream, ALICE_DN))) >= 3


# -- 8. every upstream down at start ---------------------------------------------------------


@pytest.mark.parametrize("min_idle", [1, None], ids=["min_idle-1", "min_idle-default"])
def test_all_upstreams_down_at_start_then_recovery(
    min_idle: int | None,
    tmp_path: Path,
    ca: CertificateAuthority,
    fresh_slapd,
    run_proxy,
) -> None:
    """With its only upstream down, the proxy starts anyway and answers unavailable (52)
    at once; when slapd starts on that URL, the proxy's probes find it by themselves and a
    later client succeeds.  Probes back off 1 s, 2 s, 4 s, ... (pool.py), so a slapd that
    starts between the first probe (1 s after the failure) and the second (3 s after) is
    found within about 3 s -- whatever pool.min_idle is."""
    upstream: Slapd = fresh_slapd(start=False)
    pool = {**FAST_POOL, "health_check_interval": 0.5}
    if min_idle is not None:
        pool["min_idle"] = min_idle
    config, (listener,) = proxy_config(
        tmp_path,
        ca,
        [upstream.ldaps_url],
        listeners=[Listener("none", "plain")],
        upstream={"connect_timeout": 1},
        pool=pool,
    )
    proxy = run_proxy(config)
    down = rf"upstream {re.escape(upstream.ldaps_url)} is down"
    proxy.wait_for_log(down)
    went_down = time.monotonic()

    with connect(listener, ca.write_certificate(tmp_path / "ca-client.pem")) as client:
        client.send(message(1, simple_bind(ALICE_DN, USERS[ALICE_DN])))
        (response,) = client.until_final(1, timeout=3)
    assert (response.op, response.result_code) == (BIND_RESPONSE, UNAVAILABLE), response
    assert b"no upstream directory is available" in response.raw
    assert time.monotonic() - went_down < 2
    assert proxy.process is not None
    assert proxy.process.poll() is None, "the proxy exited"

    # Start slapd after the first probe (1 s after the failure) and well before the second
    # (documented: 2 s later, so 3 s after the failure).
    time.sleep(max(0.0, went_down + 1.4 - time.monotonic()))
    upstream.start()
    assert time.monotonic() - went_down < 2.5, "slapd took too long to start for this test"
    proxy.wait_for_log(rf"upstream {re.escape(upstream.ldaps_url)} is up again", timeout=4)
    code, out, err = whoami_as(listener.url, upstream.ldap_env())
    assert (code, out.strip()) == (0, f"dn:{ALICE_DN}"), err
    assert len(re.findall(down, proxy.log_text())) == 1, proxy.log_text()
