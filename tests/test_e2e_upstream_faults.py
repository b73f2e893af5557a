"""End to end: upstream faults while clients are being served, with ``ldapproxy run`` in front
of real slapd processes that the tests kill (SIGKILL), stop (SIGSTOP/SIGCONT) and start
again, and of a fake LDAPS upstream that answers with broken PDUs.

Every test bounds every wait: the point is that no client is ever left hanging.

* The directory dies with an operation in flight (search, bind, modify; raw clients and
  ldap-utils): the client gets a Notice of Disconnection (unavailable) and is closed.
  "In flight" is made deterministic: slapd is stopped with SIGSTOP, the request is sent,
  and slapd is killed only once the request sits unread in the receive queue of one of
  slapd's already-open TCP connections (``/proc/net/tcp``).
* The directory hangs (SIGSTOP), with a second one configured: the session on it gets
  unavailable from ``limits.operation_timeout``, the health checks mark it down, and new
  sessions are served by the other directory.
* Every directory is down: requests are answered unavailable at once; when one directory
  comes back, the proxy finds it by itself.
* The directory sends garbage or a PDU announced larger than the upstream limit: the
  client gets a Notice of Disconnection, the proxy logs the protocol error and goes on
  serving.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.fakeupstream import (
    BAD_ENVELOPE_BASE,
    FAKE_DN,
    GARBAGE_BASE,
    OVERSIZED_BASE,
    FakeUpstream,
)
from support.net import LOOPBACK, free_port
from support.proxy import Listener, ProxyProcess, proxy_config
from support.rawldap import RawClient, extended_value, simple_bind, subtree_search, whoami
from support.slapd import ALICE_DN, PEOPLE_DN, USERS, Slapd, SlapdFactory, all_threads_stopped

from ldapproxy import messages as m
from ldapproxy.ber import (
    ENUMERATED,
    OCTET_STRING,
    SEQUENCE,
    Frame,
    encode_integer,
    encode_message,
    tlv,
)
from ldapproxy.pki import CertificateAuthority
from ldapproxy.upstream import UPSTREAM_MAX_PDU_BYTES

pytestmark = pytest.mark.slapd

#: How long a client may wait for its answer (or its disconnection) after a fault.
CLIENT_BOUND = 5.0
#: How long the tests wait for their own set-up steps (a request reaching the stopped
#: slapd, a bind logged): generous, since it is not a property of the proxy.
SETUP_BOUND = 20.0

ALICE_PASSWORD = USERS[ALICE_DN]
NEW_DESCRIPTION = "written while the directory died"
MODIFY_LDIF = f"""dn: {ALICE_DN}
changetype: modify
replace: description
description: {NEW_DESCRIPTION}
"""
#: What ldap-utils report when the Notice of Disconnection (unavailable) arrives while they
#: wait for their operation.  libldap reads the notice and makes ldap_result() return -1
#: with the notice's result code as the error (result.c).  ldapsearch prints the notice
#: itself; ldapmodify prints the error; ldapwhoami, still binding, prints ldap_result()'s
#: own -1 and exits 254 (its ``-d 1`` trace shows it did read ``res_errno: 52``).
TOOL_OUTCOME = {
    "bind": (254, "ldap_result: Can't contact LDAP server (-1)"),
    "search": (m.UNAVAILABLE, "text: upstream directory connection lost"),
    "modify": (m.UNAVAILABLE, "ldap_result: Server is unavailable (52)"),
}
UPSTREAM_LOST = r"conn=\d+ 127\.0\.0\.1:\d+ upstream connection lost: "


# -- helpers ---------------------------------------------------------------------------------


def eventually(check: Callable[[], object], timeout: float, what: str) -> object:
    """Poll ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() >= deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        time.sleep(0.02)


def plain_listener() -> list[Listener]:
    return [Listener("none", "plain")]


def tool_env() -> dict[str, str]:
    """ldap-utils against the proxy's plain listener: no ldap.conf, no ~/.ldaprc."""
    return {**os.environ, "LDAPNOINIT": "1"}


def rx_queues(port: int) -> dict[int, int]:
    """For every established IPv4 TCP connection whose local port is ``port`` (a slapd
    listener): the peer's port -> bytes received but not yet read by the owner."""
    queues = {}
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            local, remote, state, queue = fields[1], fields[2], fields[3], fields[4]
            if state == "01" and int(local.rsplit(":", 1)[1], 16) == port:
                queues[int(remote.rsplit(":", 1)[1], 16)] = int(queue.split(":")[1], 16)
    return queues


def wait_in_flight(upstream: Slapd, connections: set[int]) -> None:
    """Wait until a request sits unread at the (stopped) slapd, on one of ``connections``
    (peer ports of connections that were open, and fully read, before it was sent).
    Connections opened later are left out: their TLS ClientHello would count too."""
    eventually(
        lambda: any(rx_queues(upstream.ldaps_port).get(p, 0) > 0 for p in connections),
        SETUP_BOUND,
        "the request reaching the stopped slapd",
    )


def established(upstream: Slapd) -> set[int]:
    connections = set(rx_queues(upstream.ldaps_port))
    assert connections, "the proxy has no connection open to slapd"
    return connections


@contextmanager
def stopped(upstream: Slapd) -> Iterator[None]:
    """slapd stopped with SIGSTOP for the duration; SIGCONT whatever happens (unless it
    was killed meanwhile)."""
    assert upstream.pid is not None
    pid = upstream.pid
    os.kill(pid, signal.SIGSTOP)
    # kill() returns before every thread has stopped: wait until all of them have, so
    # that nothing sent from now on is processed.
    eventually(lambda: all_threads_stopped(pid), SETUP_BOUND, f"slapd {pid} stopped")
    try:
        yield
    finally:
        if upstream.running:
            os.kill(pid, signal.SIGCONT)


def kill(upstream: Slapd) -> None:
    """SIGKILL slapd by its PID and wait until it is gone."""
    assert upstream.pid is not None
    os.kill(upstream.pid, signal.SIGKILL)
    eventually(lambda: not upstream.running, 5, f"slapd {upstream.pid} dying")


def frames_until_closed(client: RawClient, timeout: float = CLIENT_BOUND) -> list[Frame]:
    """Every PDU until the proxy closes the connection; fail if it is still open after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    frames: list[Frame] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"connection still open after {timeout:g} s; got {frames}")
        client.sock.settimeout(left)
        try:
            frames.append(client.read_frame())
        except ConnectionError:  # EOF or reset
            return frames
        except TimeoutError:
            raise AssertionError(
                f"connection still open after {timeout:g} s; got {frames}"
            ) from None


def is_notice(frame: Frame, code: int) -> bool:
    return (
        frame.message_id == 0
        and frame.op == m.EXTENDED_RESPONSE
        and m.extended_response_name(frame.data) == m.NOTICE_OF_DISCONNECTION_OID
        and m.result_code(frame.data) == code
    )


def answer(client: RawClient, message_id: int, timeout: float = CLIENT_BOUND) -> Frame:
    """The final response to ``message_id`` (skipping search entries), within ``timeout``."""
    client.sock.settimeout(timeout)
    while True:
        frame = client.read_frame()
        if frame.message_id == message_id and frame.op in m.FINAL_RESPONSES:
            return frame


def modify_description(message_id: int, dn: str, value: str) -> bytes:
    """A ModifyRequest replacing ``description`` of ``dn`` with ``value``."""
    change = tlv(
        SEQUENCE,
        encode_integer(2, ENUMERATED)  # replace
        + tlv(
            SEQUENCE,
            tlv(OCTET_STRING, b"description") + tlv(0x31, tlv(OCTET_STRING, value.encode())),
        ),
    )
    body = tlv(OCTET_STRING, dn.encode()) + tlv(SEQUENCE, change)
    return encode_message(message_id, tlv(m.MODIFY_REQUEST, body))


def accepted_tls(upstream: Slapd) -> int:
    """How many TLS connections slapd accepted on its ldaps port (since its last start)."""
    run = upstream.log_text().split("slapd starting")[-1]
    accepted = set(
        re.findall(rf"conn=(\d+) fd=\d+ ACCEPT from IP=\S+ \(IP=\S+:{upstream.ldaps_port}\)", run)
    )
    return len(accepted & set(re.findall(r"conn=(\d+) fd=\d+ TLS established", run)))


def wait_warm(upstream: Slapd, count: int) -> None:
    eventually(
        lambda: accepted_tls(upstream) >= count,
        5,
        f"{count} pool connection(s) to {upstream.ldaps_url}",
    )


def binds_as(upstream: Slapd, dn: str, since: int = 0) -> int:
    """How many binds as ``dn`` slapd answered with success (in its log from ``since``)."""
    text = upstream.log_text()[since:]
    binds = re.findall(rf'(conn=\d+ op=\d+) BIND dn="{re.escape(dn)}" method=128', text)
    ok = set(re.findall(r"(conn=\d+ op=\d+) RESULT tag=97 err=0 ", text))
    return len([b for b in binds if b in ok])


def whoami_tool(listener: Listener, dn: str = ALICE_DN) -> subprocess.CompletedProcess[str]:
    """ldapwhoami through the proxy, bounded in time (TimeoutExpired fails the test)."""
    return subprocess.run(
        ["ldapwhoami", "-x", "-H", listener.url, "-D", dn, "-w", USERS[dn]],
        capture_output=True,
        text=True,
        timeout=CLIENT_BOUND,
        env=tool_env(),
        check=False,
    )


def http_get(port: int, path: str) -> str:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://{LOOPBACK}:{port}{path}", timeout=5) as response:
        assert response.status == 200
        return response.read().decode()


def upstream_up(port: int) -> dict[str, float]:
    """``ldapproxy_upstream_up`` from /metrics, by upstream URL."""
    values = {}
    for family in text_string_to_metric_families(http_get(port, "/metrics")):
        for sample in family.samples:
            if sample.name == "ldapproxy_upstream_up":
                values[sample.labels["upstream"]] = sample.value
    return values


def with_metrics(config: Path) -> int:
    """Add a [metrics] endpoint on a free loopback port to ``config``; return the port."""
    port = free_port()
    config.write_text(
        config.read_text() + f"\n[metrics]\nendpoint = 'tcp:{port}:interface={LOOPBACK}'\n"
    )
    return port


def alive(proxy: ProxyProcess) -> bool:
    return proxy.process is not None and proxy.process.poll() is None


# -- 1. the directory dies with an operation in flight ---------------------------------------


def _raw_in_flight(op: str, upstream: Slapd, listener: Listener) -> tuple[list[Frame], float]:
    """Send ``op`` on a raw client while slapd is stopped, kill slapd once the request is
    queued at it; return what the client got until closed, and how long that took."""
    with RawClient(listener.port, timeout=CLIENT_BOUND) as client:
        if op != "bind":
            client.send(simple_bind(1, ALICE_DN, ALICE_PASSWORD))
            assert m.result_code(answer(client, 1).data) == m.SUCCESS
        request = {
            "bind": simple_bind(2, ALICE_DN, ALICE_PASSWORD),
            "search": subtree_search(2, PEOPLE_DN),
            "modify": modify_description(2, ALICE_DN, NEW_DESCRIPTION),
        }[op]
        with stopped(upstream):
            connections = established(upstream)
            client.send(request)
            wait_in_flight(upstream, connections)
            kill(upstream)
            killed = time.monotonic()
            frames = frames_until_closed(client)
    return frames, time.monotonic() - killed


def _tool_in_flight(
    op: str, upstream: Slapd, listener: Listener, workdir: Path
) -> tuple[int, str, float]:
    """The same with ldapwhoami (bind), ldapsearch (search, filters read from stdin) or
    ldapmodify (LDIF read from stdin).  For search and modify the tool binds as alice
    first, while slapd runs; slapd is stopped before the tool gets its stdin, so the
    operation is what is in flight.  Returns the exit status, the tool's output and how
    long it took to exit after slapd was killed."""
    base = ["-x", "-H", listener.url, "-D", ALICE_DN, "-w", ALICE_PASSWORD]
    argv = {
        "bind": ["ldapwhoami", *base],
        "search": ["ldapsearch", *base, "-b", PEOPLE_DN, "-f", "-", "(uid=%s)"],
        "modify": ["ldapmodify", *base],
    }[op]
    stdin_text = {"bind": "", "search": "alice\n", "modify": MODIFY_LDIF}[op]
    output = workdir / f"{op}.out"
    with ExitStack() as stack:
        out = stack.enter_context(output.open("w"))
        if op == "bind":
            stack.enter_context(stopped(upstream))
            connections = established(upstream)
        tool = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=out, stderr=out, text=True, env=tool_env()
        )
        stack.callback(_reap, tool)
        if op != "bind":
            # slapd logs a RESULT after sending it: the tool has its bind answer and waits
            # for its stdin, which it gets only once slapd is stopped.
            eventually(lambda: binds_as(upstream, ALICE_DN) >= 1, SETUP_BOUND, "alice's bind")
            stack.enter_context(stopped(upstream))
            connections = established(upstream)
        assert tool.stdin is not None
        tool.stdin.write(stdin_text)
        tool.stdin.close()
        wait_in_flight(upstream, connections)
        assert tool.poll() is None, "the tool finished before slapd was killed"
        kill(upstream)
        killed = time.monotonic()
        code = tool.wait(timeout=CLIENT_BOUND)
        took = time.monotonic() - killed
    return code, output.read_text(), took


def _reap(process: subprocess.Popen[str]) -> None:
    """Kill ``process`` by its PID if it still runs, and wait for it."""
    if process.poll() is None:
        process.kill()
    process.wait()
    if process.stdin is not None and not process.stdin.closed:
        process.stdin.close()


@pytest.mark.parametrize("client", ["raw", "tool"])
@pytest.mark.parametrize("op", ["search", "bind", "modify"])
def test_directory_dies_with_operation_in_flight(
    op: str,
    client: str,
    tmp_path: Path,
    ca: CertificateAuthority,
    fresh_slapd: SlapdFactory,
    run_proxy,
) -> None:
    """slapd is killed while the client's search, bind or modify waits in its receive
    queue: the client gets a Notice of Disconnection with unavailable (52) and nothing
    else, its connection is closed within CLIENT_BOUND seconds, the proxy logs the lost
    upstream connection, and keeps running."""
    upstream = fresh_slapd()
    config, (listener,) = proxy_config(
        tmp_path / "proxy",
        ca,
        [upstream.ldaps_url],
        listeners=plain_listener(),
        upstream={"connect_timeout": 1},
        pool={"min_idle": 2},
    )
    proxy = run_proxy(config)
    wait_warm(upstream, 2)
    if client == "raw":
        frames, took = _raw_in_flight(op, upstream, listener)
        assert len(frames) == 1, frames
        assert is_notice(frames[0], m.UNAVAILABLE), frames
        assert b"upstream directory connection lost" in frames[0].data
    else:
        code, output, took = _tool_in_flight(op, upstream, listener, tmp_path)
        expected_code, expected_text = TOOL_OUTCOME[op]
        assert code == expected_code, (code, output)
        assert expected_text in output, output
    assert took < CLIENT_BOUND
    proxy.wait_for_log(UPSTREAM_LOST, timeout=CLIENT_BOUND)
    assert alive(proxy)


# -- 2. the directory hangs (SIGSTOP), a second one is configured ----------------------------


def test_hung_directory_is_marked_down_and_sessions_fail_over(
    tmp_path: Path, ca: CertificateAuthority, fresh_slapd: SlapdFactory, run_proxy
) -> None:
    """strategy = failover with [A, B]; A is stopped with SIGSTOP.  The session holding a
    connection to A gets unavailable (52) from limits.operation_timeout and a Notice of
    Disconnection; the health checks find A silent and mark it down (log line and
    ldapproxy_upstream_up); every new client is answered within CLIENT_BOUND seconds
    meanwhile, and once A is down, new sessions are served by B at once."""
    first = fresh_slapd()
    second = fresh_slapd()
    config, (listener,) = proxy_config(
        tmp_path / "proxy",
        ca,
        [first.ldaps_url, second.ldaps_url],
        listeners=plain_listener(),
        upstream={"strategy": "failover", "connect_timeout": 1},
        pool={"min_idle": 2, "health_check_interval": 0.5, "acquire_timeout": 3},
        limits={"operation_timeout": 1},
    )
    metrics_port = with_metrics(config)
    proxy = run_proxy(config)
    wait_warm(first, 2)
    wait_warm(second, 2)
    eventually(
        lambda: upstream_up(metrics_port) == {first.ldaps_url: 1.0, second.ldaps_url: 1.0},
        2,
        "ldapproxy_upstream_up showing both up",
    )
    result = whoami_tool(listener)
    assert (result.returncode, result.stdout.strip()) == (0, f"dn:{ALICE_DN}"), result
    assert (binds_as(first, ALICE_DN), binds_as(second, ALICE_DN)) == (1, 0)
    down_line = rf"upstream {re.escape(first.ldaps_url)} is down: "

    with RawClient(listener.port, timeout=CLIENT_BOUND) as holder:
        holder.send(simple_bind(1, ALICE_DN, ALICE_PASSWORD))
        assert m.result_code(answer(holder, 1).data) == m.SUCCESS
        assert binds_as(first, ALICE_DN) == 2
        with stopped(first):
            hung = time.monotonic()
            holder.send(subtree_search(2, PEOPLE_DN))
            frames = frames_until_closed(holder)
            assert time.monotonic() - hung < CLIENT_BOUND
            assert [f.message_id for f in frames] == [2, 0], frames
            assert frames[0].op == m.SEARCH_RESULT_DONE
            assert m.result_code(frames[0].data) == m.UNAVAILABLE
            assert b"limits.operation_timeout = 1 s" in frames[0].data
            assert is_notice(frames[1], m.UNAVAILABLE)

            # New clients, until one is served by B: none waits longer than CLIENT_BOUND
            # (whoami_tool's timeout), each is answered either success or unavailable.
            attempts = []
            while True:
                started = time.monotonic()
                result = whoami_tool(listener)
                attempts.append((result.returncode, round(time.monotonic() - started, 2)))
                assert result.returncode in (0, m.UNAVAILABLE), (result, attempts)
                if result.returncode == 0:
                    break
                assert time.monotonic() - hung < 10, f"no failover within 10 s: {attempts}"
            assert result.stdout.strip() == f"dn:{ALICE_DN}"

            # The health checks (every 0.5 s, answered within connect_timeout = 1 s) and
            # the replacement connection (TLS handshake not answered) mark A down.
            proxy.wait_for_log(down_line, timeout=8)
            assert time.monotonic() - hung < 8
            assert re.search(
                rf"upstream {re.escape(first.ldaps_url)}: connection closed: health check "
                r"failed: no answer within 1 s",
                proxy.log_text(),
            ), proxy.log_text()
            eventually(
                lambda: upstream_up(metrics_port) == {first.ldaps_url: 0.0, second.ldaps_url: 1.0},
                2,
                "ldapproxy_upstream_up showing A down and B up",
            )
            # From now on every new session goes straight to B.
            on_second = binds_as(second, ALICE_DN)
            for _ in range(3):
                started = time.monotonic()
                result = whoami_tool(listener)
                assert (result.returncode, result.stdout.strip()) == (0, f"dn:{ALICE_DN}"), result
                assert time.monotonic() - started < 2
            eventually(
                lambda: binds_as(second, ALICE_DN) == on_second + 3, 2, "B logging the binds"
            )
            assert re.search(
                r"closing: the directory did not answer search \(message ID 2\) within "
                r"limits\.operation_timeout = 1 s",
                proxy.log_text(),
            ), proxy.log_text()
    assert len(re.findall(down_line, proxy.log_text())) == 1, proxy.log_text()
    assert alive(proxy)


# -- 3. every directory down, then one comes back --------------------------------------------


def test_all_directories_killed_then_one_restarted(
    tmp_path: Path, ca: CertificateAuthority, fresh_slapd: SlapdFactory, run_proxy
) -> None:
    """Both directories are killed: a client connected right then is answered (unavailable
    or a Notice of Disconnection) within CLIENT_BOUND seconds; once both are marked down,
    requests are answered unavailable (52) at once and the client stays connected.  When
    slapd A starts again on the same ports, the proxy finds it by itself (no restart, same
    process) and new clients are served."""
    first = fresh_slapd()
    second = fresh_slapd()
    config, (listener,) = proxy_config(
        tmp_path / "proxy",
        ca,
        [first.ldaps_url, second.ldaps_url],
        listeners=plain_listener(),
        upstream={"strategy": "round-robin", "connect_timeout": 1},
        pool={"min_idle": 1, "health_check_interval": 0.5, "acquire_timeout": 2},
    )
    proxy = run_proxy(config)
    wait_warm(first, 1)
    wait_warm(second, 1)
    result = whoami_tool(listener)
    assert (result.returncode, result.stdout.strip()) == (0, f"dn:{ALICE_DN}"), result

    with RawClient(listener.port, timeout=CLIENT_BOUND) as early:
        kill(first)
        kill(second)
        killed = time.monotonic()
        early.send(simple_bind(1, ALICE_DN, ALICE_PASSWORD))
        early.sock.settimeout(CLIENT_BOUND)
        frame = early.read_frame()
        assert time.monotonic() - killed < CLIENT_BOUND
        # Before the pool noticed: a dead pooled connection (Notice of Disconnection);
        # after: no upstream (a BindResponse).  Either way, unavailable.
        assert frame.message_id in (0, 1), frame
        assert m.result_code(frame.data) == m.UNAVAILABLE, frame

    for upstream in (first, second):
        proxy.wait_for_log(rf"upstream {re.escape(upstream.ldaps_url)} is down: ", timeout=3)
    with RawClient(listener.port, timeout=CLIENT_BOUND) as client:
        for message_id, request in (
            (1, simple_bind(1, ALICE_DN, ALICE_PASSWORD)),
            (2, subtree_search(2, PEOPLE_DN)),
        ):
            started = time.monotonic()
            client.send(request)
            frame = client.read_frame()
            assert time.monotonic() - started < 1
            assert frame.message_id == message_id, frame
            assert m.result_code(frame.data) == m.UNAVAILABLE, frame
            assert b"no upstream directory is available" in frame.data
    started = time.monotonic()
    result = whoami_tool(listener)
    assert result.returncode == m.UNAVAILABLE, result
    assert "no upstream directory is available" in result.stderr
    assert time.monotonic() - started < 3
    proxy.wait_for_log(r"no upstream available: 1 request\(s\) answered unavailable")

    # A comes back on the same ports.  Probes of a down URL back off (1 s, 2 s, 4 s, ...):
    # the proxy notices within a few seconds, by itself.
    mark = len(first.log_text())
    first.start()
    restarted = time.monotonic()
    proxy.wait_for_log(rf"upstream {re.escape(first.ldaps_url)} is up again", timeout=15)
    while True:
        result = whoami_tool(listener)
        if result.returncode == 0:
            break
        assert result.returncode == m.UNAVAILABLE, result
        assert time.monotonic() - restarted < 15, "the proxy did not recover"
        time.sleep(0.1)
    assert result.stdout.strip() == f"dn:{ALICE_DN}"
    eventually(lambda: binds_as(first, ALICE_DN, mark) == 1, 2, "the restarted slapd serving alice")
    assert alive(proxy)
    assert f"upstream {second.ldaps_url} is up again" not in proxy.log_text()


# -- 4. the directory sends garbage or an oversized PDU --------------------------------------


@pytest.fixture
def fake_upstream(ca: CertificateAuthority, tmp_path: Path) -> Iterator[FakeUpstream]:
    with FakeUpstream(ca, tmp_path / "fake") as fake:
        yield fake
    assert fake.errors == []


def fake_whoami(client: RawClient, message_id: int) -> None:
    """A WhoAmI through the proxy, answered by the fake upstream."""
    client.send(whoami(message_id))
    frame = answer(client, message_id)
    assert m.result_code(frame.data) == m.SUCCESS, frame
    assert extended_value(frame.data) == f"dn:{FAKE_DN}".encode()


@pytest.mark.parametrize(
    ("base", "error"),
    [
        (GARBAGE_BASE, r"expected an LDAPMessage SEQUENCE, got tag 0x48"),
        (BAD_ENVELOPE_BASE, r"LDAPMessage does not start with a messageID INTEGER"),
        (
            OVERSIZED_BASE,
            # The header (6 bytes) and the body it announces (one byte over the limit).
            rf"PDU of {6 + UPSTREAM_MAX_PDU_BYTES + 1} bytes exceeds the limit of "
            rf"{UPSTREAM_MAX_PDU_BYTES} bytes",
        ),
    ],
    ids=["not-ber", "bad-envelope", "oversized"],
)
def test_broken_pdu_from_directory(
    base: str,
    error: str,
    tmp_path: Path,
    ca: CertificateAuthority,
    fake_upstream: FakeUpstream,
    run_proxy,
) -> None:
    """The directory answers a search with bytes that are not LDAP, or with a PDU whose
    header announces more than the 256 MiB upstream limit (and leaves the connection
    open): the client gets a Notice of Disconnection (unavailable) within CLIENT_BOUND
    seconds and is closed, the proxy logs the protocol error and closes that upstream
    connection, and goes on serving the session next door and new ones."""
    config, (listener,) = proxy_config(
        tmp_path / "proxy",
        ca,
        [fake_upstream.url],
        listeners=plain_listener(),
        upstream={"connect_timeout": 1},
        pool={"min_idle": 2, "health_check_interval": 0.5},
    )
    proxy = run_proxy(config)
    eventually(lambda: fake_upstream.handshakes >= 2, 5, "the pool's connections to the fake")
    # The pool's health checks (root DSE reads) pass: the fake answers them properly.
    eventually(
        lambda: len(fake_upstream.requests_for("")) >= 2, 5, "health checks reaching the fake"
    )

    with (
        RawClient(listener.port, timeout=CLIENT_BOUND) as neighbour,
        RawClient(listener.port, timeout=CLIENT_BOUND) as victim,
    ):
        fake_whoami(neighbour, 1)
        fake_whoami(victim, 1)
        sent = time.monotonic()
        victim.send(subtree_search(2, base))
        frames = frames_until_closed(victim)
        assert time.monotonic() - sent < CLIENT_BOUND
        (trigger,) = fake_upstream.requests_for(base)
        assert len(frames) == 1, frames
        assert is_notice(frames[0], m.UNAVAILABLE), frames
        proxy.wait_for_log(UPSTREAM_LOST + r"protocol error from upstream: " + error)
        # The other session, on its own upstream connection, is not affected.
        fake_whoami(neighbour, 2)
    # New sessions are served; the broken connection was closed (not returned to the pool).
    for _ in range(3):
        with RawClient(listener.port, timeout=CLIENT_BOUND) as client:
            fake_whoami(client, 1)
            client.send(subtree_search(2, "cn=some entry"))
            frame = answer(client, 2)
            assert (frame.op, m.result_code(frame.data)) == (m.SEARCH_RESULT_DONE, m.SUCCESS)
    eventually(
        lambda: trigger.connection in fake_upstream.closed, 5, "the broken connection closed"
    )
    assert alive(proxy)
    assert " is down" not in proxy.log_text()
