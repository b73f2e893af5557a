"""``[process] workers = N``: a supervisor and N worker processes sharing the listeners.

Real processes in front of the shared slapd, on loopback: both workers serve; a worker
killed with SIGKILL is replaced while clients keep working; SIGHUP and SIGTERM reach every
worker; /metrics sums the workers' counters and keeps process metrics per worker; and the
configuration errors are one line.  Plus the pure parts (endpoint parsing, aggregation,
log tagging) without processes.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.ldaptools import run_ldap_tool
from support.net import LOOPBACK, free_port
from support.proxy import LDAPPROXY, Listener, ProxyProcess, render_toml
from support.rawldap import RawClient, simple_bind
from support.slapd import ALICE_DN, USERS, Slapd

from ldapproxy import config as configuration
from ldapproxy import worker_metrics, workers
from ldapproxy.messages import result_code
from ldapproxy.pki import CertificateAuthority

ALICE_PASSWORD = USERS[ALICE_DN]
SUPERVISOR_READY = r"ldapproxy \S+ ready: 2 worker\(s\) ready"
STARTED = re.compile(r"worker (\d+) started, pid (\d+)")


# -- helpers ---------------------------------------------------------------------------------


def write_config(
    workdir: Path,
    ca: CertificateAuthority,
    slapd: Slapd,
    workers_count: int = 2,
    metrics: bool = True,
    endpoint: str | None = None,
) -> tuple[Path, dict[str, Listener], int]:
    """A configuration with listeners ``plain`` (none) and ``ldaps``, /metrics on a free
    port and ``[process] workers``; returns its path, the listeners and the metrics port."""
    workdir.mkdir(parents=True, exist_ok=True)
    cert, key = ca.issue("proxy", dns_names=["localhost"], ip_addresses=[LOOPBACK]).write(
        workdir, "proxy"
    )
    ca_path = ca.write_certificate(workdir / "ca.pem")
    listeners = {"plain": Listener("none", "plain"), "ldaps": Listener("ldaps", "ldaps")}
    metrics_port = free_port()
    sections: dict[str, dict[str, object]] = {
        "tls": {"certificate": str(cert), "private_key": str(key)},
        "upstream": {"urls": [slapd.ldaps_url], "ca_file": str(ca_path)},
        "pool": {"min_idle": 1, "max_size": 20},
        "limits": {"drain_timeout": 5},
        "process": {"workers": workers_count},
    }
    if metrics:
        sections["metrics"] = {"endpoint": f"tcp:{metrics_port}:interface={LOOPBACK}"}
    text = render_toml(list(listeners.values()), sections)
    if endpoint is not None:
        text = text.replace(f"'tcp:{listeners['plain'].port}:interface=127.0.0.1'", f"'{endpoint}'")
    path = workdir / "ldapproxy.toml"
    path.write_text(text)
    return path, listeners, metrics_port


def worker_pids(proxy: ProxyProcess) -> dict[int, int]:
    """The latest pid of each worker, from the supervisor's "worker N started" lines."""
    return {int(n): int(pid) for n, pid in STARTED.findall(proxy.log_text())}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def wait_until(predicate: object, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {predicate}")
        time.sleep(0.05)


def bind_once(port: int) -> None:
    """One client connection that binds as alice and closes; the bind must succeed."""
    client = RawClient(port, timeout=5)
    try:
        client.send(simple_bind(1, ALICE_DN, ALICE_PASSWORD))
        response = client.read_frame()
        assert response.op == 0x61, response
        assert result_code(response.data) == 0, response
    finally:
        client.close()


def http_get(port: int, path: str) -> tuple[int, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://{LOOPBACK}:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read().decode()


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    status, text = http_get(port, "/metrics")
    assert status == 200, text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    return sum(
        value
        for (sample_name, sample_labels), value in samples.items()
        if sample_name == name and set(labels.items()) <= sample_labels
    )


@pytest.fixture
def supervised(
    tmp_path: Path, ca: CertificateAuthority, slapd: Slapd
) -> Iterator[tuple[ProxyProcess, dict[str, Listener], int]]:
    """A supervisor with two workers (debug log), ready; stopped (and checked) at teardown."""
    path, listeners, metrics_port = write_config(tmp_path, ca, slapd)
    proxy = ProxyProcess(path, "--log-level", "debug")
    proxy.start(expect_ready=False)
    try:
        proxy.wait_for_log(SUPERVISOR_READY, timeout=20)
        yield proxy, listeners, metrics_port
    finally:
        pids = worker_pids(proxy)
        proxy.stop()
        for pid in pids.values():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


# -- the supervisor in front of slapd -----------------------------------------------------------


@pytest.mark.slapd
def test_workers_share_the_listeners_and_metrics_are_summed(
    supervised: tuple[ProxyProcess, dict[str, Listener], int], slapd: Slapd, tmp_path: Path
) -> None:
    """Two workers both accept clients on the same sockets; ldapwhoami works over ldap://
    and ldaps://; /metrics sums the workers' connection counters exactly and keeps the
    process metrics per worker; /healthz and /readyz answer."""
    proxy, listeners, metrics_port = supervised
    pids = worker_pids(proxy)
    assert sorted(pids) == [1, 2]
    assert proxy.pid not in pids.values()
    plain = listeners["plain"]
    before = total(scrape(metrics_port), "ldapproxy_client_connections_total", listener="plain")

    made = 0
    served_by: set[str] = set()
    while made < 40 or (len(served_by) < 2 and made < 400):
        bind_once(plain.port)
        made += 1
        served_by = set(re.findall(r"worker=(\d) conn=\d+ \S+ connected", proxy.log_text()))
    assert served_by == {"1", "2"}, f"only worker(s) {served_by} served {made} connections"

    env = {**slapd.ldap_env(), "LDAPTLS_CACERT": str(tmp_path / "ca.pem")}
    for url in (plain.url, listeners["ldaps"].url):
        result = run_ldap_tool(
            ["ldapwhoami", "-x", "-H", url, "-D", ALICE_DN, "-w", ALICE_PASSWORD], env
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == f"dn:{ALICE_DN}"

    samples = scrape(metrics_port)
    after = total(samples, "ldapproxy_client_connections_total", listener="plain")
    assert after - before == made + 1
    assert total(samples, "ldapproxy_client_connections_total", listener="ldaps") >= 1
    for worker in ("1", "2", "supervisor"):
        assert total(samples, "process_cpu_seconds_total", worker=worker) > 0
    assert total(samples, "ldapproxy_workers") == 2
    assert total(samples, "ldapproxy_workers_ready") == 2
    assert total(samples, "ldapproxy_upstream_up") == 1  # the minimum, not a sum
    assert http_get(metrics_port, "/healthz") == (200, "ok\n")
    assert http_get(metrics_port, "/readyz") == (200, "ok\n")


@pytest.mark.slapd
def test_a_killed_worker_is_replaced_while_clients_keep_working(
    supervised: tuple[ProxyProcess, dict[str, Listener], int],
) -> None:
    """SIGKILL to one worker: the supervisor logs how it ended and starts another; new
    connections succeed before, during and after."""
    proxy, listeners, metrics_port = supervised
    port = listeners["plain"].port
    victim = worker_pids(proxy)[1]
    bind_once(port)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while True:
        bind_once(port)  # served by worker 2, or queued until a worker accepts it
        replacement = worker_pids(proxy)[1]
        if replacement != victim and re.search(r"worker 1 ready", proxy.log_text()):
            break
        assert time.monotonic() < deadline, proxy.log_text()
        time.sleep(0.05)
    assert re.search(
        rf"worker 1 \(pid {victim}\) exited unexpectedly: killed by SIGKILL; "
        r"restarting it in 1 s",
        proxy.log_text(),
    )
    wait_until(lambda: not alive(victim))
    assert alive(replacement)
    for _ in range(10):
        bind_once(port)
    assert http_get(metrics_port, "/readyz") == (200, "ok\n")
    samples = scrape(metrics_port)
    assert total(samples, "ldapproxy_worker_restarts_total") == 1
    assert {
        w
        for (name, labels), _ in samples.items()
        if name == "process_cpu_seconds_total"
        for key, w in labels
        if key == "worker"
    } == {"1", "2", "supervisor"}


@pytest.mark.slapd
def test_a_hung_worker_does_not_hang_a_scrape(
    supervised: tuple[ProxyProcess, dict[str, Listener], int],
) -> None:
    """A worker stopped with SIGSTOP: /metrics answers after the scrape timeout without
    that worker's page (logged and counted), /readyz says which worker did not answer,
    and clients are served by the other worker meanwhile."""
    proxy, listeners, metrics_port = supervised
    frozen = worker_pids(proxy)[2]
    os.kill(frozen, signal.SIGSTOP)
    try:
        bind_once(listeners["plain"].port)
        began = time.monotonic()
        samples = scrape(metrics_port)
        assert time.monotonic() - began < worker_metrics.SCRAPE_TIMEOUT + 2
        assert total(samples, "process_cpu_seconds_total", worker="1") > 0
        assert total(samples, "process_cpu_seconds_total", worker="2") == 0
        assert total(samples, "ldapproxy_worker_scrape_failures_total") == 1
        proxy.wait_for_log(r"worker 2 metrics left out of this scrape: no answer within 3 s")
        status, body = http_get(metrics_port, "/readyz")
        assert (status, body) == (503, "worker 2 did not answer: no answer within 3 s\n")
    finally:
        os.kill(frozen, signal.SIGCONT)
    assert http_get(metrics_port, "/readyz") == (200, "ok\n")


@pytest.mark.slapd
def test_sighup_and_sigterm_reach_every_worker(
    supervised: tuple[ProxyProcess, dict[str, Listener], int],
) -> None:
    """SIGHUP to the supervisor: each worker reloads.  SIGTERM: each worker drains and
    exits, the supervisor exits 0, and no worker is left."""
    proxy, listeners, _ = supervised
    pids = worker_pids(proxy)
    proxy.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    for index in (1, 2):
        proxy.wait_for_log(rf"worker={index} reload: configuration applied")
    bind_once(listeners["plain"].port)

    # Idle bound clients, on whichever workers accepted them, are told at once.
    clients = []
    for _ in range(6):
        client = RawClient(listeners["plain"].port, timeout=5)
        client.send(simple_bind(1, ALICE_DN, ALICE_PASSWORD))
        assert result_code(client.read_frame().data) == 0
        clients.append(client)
    proxy.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    for client in clients:
        frames = client.read_until_closed()
        client.close()
        assert [frame.op for frame in frames] == [0x78]  # a Notice of Disconnection
    assert proxy.wait_exit(20) == 0
    text = proxy.log_text()
    for index, pid in pids.items():
        assert re.search(rf"worker {index} \(pid {pid}\) stopped: exit status 0", text), text
        assert not alive(pid)
    assert "Traceback" not in text


@pytest.mark.slapd
def test_workers_stop_when_the_supervisor_is_killed(
    supervised: tuple[ProxyProcess, dict[str, Listener], int],
) -> None:
    """A supervisor killed with SIGKILL leaves no worker running unsupervised (each sees
    the end of its stdin pipe and drains); SIGINT sent to a worker alone is ignored."""
    proxy, _, _ = supervised
    pids = worker_pids(proxy)
    os.kill(pids[2], signal.SIGINT)
    time.sleep(0.3)
    assert alive(pids[2])
    proxy.process.kill()  # type: ignore[union-attr]
    proxy.wait_exit()
    for pid in pids.values():
        # Their log went to the supervisor, which is gone: only their end can be seen.
        wait_until(lambda pid=pid: not alive(pid))
    # The supervisor could not remove its directory of metrics sockets.
    for directory in set(re.findall(r"'(/\S+/ldapproxy-workers-[^/]+)/", proxy.log_text())):
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.slapd
def test_the_supervisor_alone_talks_to_systemd(
    tmp_path: Path, ca: CertificateAuthority, slapd: Slapd
) -> None:
    """With NOTIFY_SOCKET, READY=1 comes from the supervisor once both workers are ready,
    RELOADING=1 and READY=1 around a SIGHUP, STOPPING=1 on SIGTERM; no worker sends
    anything (the sender of each datagram is checked with SO_PASSCRED)."""
    short = Path(tempfile.mkdtemp(prefix="lw-"))
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    receiver.bind(str(short / "notify"))
    receiver.settimeout(20)
    path, _, _ = write_config(tmp_path, ca, slapd, metrics=False)
    proxy = ProxyProcess(path, env={"NOTIFY_SOCKET": str(short / "notify")})

    def next_message() -> str:
        data, ancillary, _, _ = receiver.recvmsg(4096, socket.CMSG_SPACE(12))
        senders = [
            struct.unpack("iII", payload[:12])[0]
            for level, kind, payload in ancillary
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS
        ]
        assert senders == [proxy.pid], (senders, data)
        return data.decode()

    try:
        proxy.start(expect_ready=False)
        assert next_message() == "READY=1\nSTATUS=2 worker(s) ready"
        assert len(worker_pids(proxy)) == 2
        proxy.wait_for_log(SUPERVISOR_READY)
        proxy.process.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        assert next_message().startswith("RELOADING=1\nMONOTONIC_USEC=")
        assert next_message() == "READY=1\nSTATUS=reloaded; 2/2 worker(s) ready"
        proxy.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        assert next_message() == "STOPPING=1\nSTATUS=stopping the workers"
        assert proxy.wait_exit(20) == 0
    finally:
        proxy.stop()
        receiver.close()
        shutil.rmtree(short, ignore_errors=True)


# -- configuration errors -----------------------------------------------------------------------


def ldapproxy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [LDAPPROXY, *args], capture_output=True, text=True, timeout=30, check=False
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("count", [0, 65, "2"])
def test_workers_out_of_range_is_one_line(
    tmp_path: Path, ca: CertificateAuthority, slapd: Slapd, count: object
) -> None:
    path, _, _ = write_config(tmp_path, ca, slapd, workers_count=count)  # type: ignore[arg-type]
    for command in ("run", "check"):
        result = ldapproxy(command, "-c", str(path))
        assert_one_line_error(result, str(path), "[process] workers", "expected an integer")


@pytest.mark.parametrize(
    "endpoint", ["unix:/tmp/ldapproxy-test.sock", "unix:/tmp/ldapproxy-test.sock:lockfile=1"]
)
def test_an_endpoint_the_supervisor_cannot_bind_is_one_line(
    tmp_path: Path, ca: CertificateAuthority, slapd: Slapd, endpoint: str
) -> None:
    path, _, _ = write_config(tmp_path, ca, slapd, endpoint=endpoint)
    result = ldapproxy("run", "-c", str(path))
    assert_one_line_error(result, str(path), "[[listener]] 'plain' endpoint")


def test_a_port_in_use_is_one_line(tmp_path: Path, ca: CertificateAuthority, slapd: Slapd) -> None:
    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        port = taken.getsockname()[1]
        path, _, _ = write_config(tmp_path, ca, slapd, endpoint=f"tcp:{port}:interface=127.0.0.1")
        result = ldapproxy("run", "-c", str(path))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "listener 'plain'" in lines[0]
    assert "Address already in use" in lines[0]


def test_workers_default_is_one(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    document = {
        "listener": [{"endpoint": "unix:/tmp/x.sock", "tls": "none"}],
        "upstream": {"urls": ["ldaps://dc1"]},
    }
    assert configuration.parse(document, path).process.workers == 1


# -- the pure parts ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("tcp:389", workers.TCPEndpoint(389)),
        ("tcp:389:interface=127.0.0.1", workers.TCPEndpoint(389, "127.0.0.1")),
        (r"tcp:636:interface=\:\::backlog=100", workers.TCPEndpoint(636, "::", 100)),
        ("tcp:port=10389:backlog=5", workers.TCPEndpoint(10389, "", 5)),
        ("TCP:389:192.0.2.1:7", workers.TCPEndpoint(389, "192.0.2.1", 7)),
        ("tcp6:389", workers.TCPEndpoint(389, "::")),
        (r"tcp6:389:interface=\:\:1", workers.TCPEndpoint(389, "::1")),
    ],
)
def test_parse_tcp_endpoint(text: str, expected: workers.TCPEndpoint) -> None:
    assert workers.parse_tcp_endpoint(text) == expected


@pytest.mark.parametrize(
    "text", ["tcp:", "tcp:x", "tcp:70000", "tcp:389:foo=1", "tcp:389:backlog=0", "ssl:636"]
)
def test_parse_tcp_endpoint_refuses(text: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(text)) + "|not a tcp"):
        workers.parse_tcp_endpoint(text)


def test_bind_tcp_listens() -> None:
    sock = workers.bind_tcp(workers.parse_tcp_endpoint("tcp:0:interface=127.0.0.1"))
    with sock:
        assert sock.getsockopt(1, 30)  # SOL_SOCKET, SO_ACCEPTCONN
        assert sock.getsockname()[0] == "127.0.0.1"


PAGE = """\
# HELP ldapproxy_client_connections_total Client connections accepted.
# TYPE ldapproxy_client_connections_total counter
ldapproxy_client_connections_total{{listener="plain"}} {conns}
# HELP ldapproxy_client_connections Open client connections.
# TYPE ldapproxy_client_connections gauge
ldapproxy_client_connections{{listener="plain",tls="none"}} {open}
# HELP ldapproxy_upstream_up 1 if usable.
# TYPE ldapproxy_upstream_up gauge
ldapproxy_upstream_up{{upstream="ldaps://a:636"}} {up}
# HELP ldapproxy_pool_wait_seconds Wait.
# TYPE ldapproxy_pool_wait_seconds histogram
ldapproxy_pool_wait_seconds_bucket{{le="0.1"}} {conns}
ldapproxy_pool_wait_seconds_bucket{{le="+Inf"}} {conns}
ldapproxy_pool_wait_seconds_count {conns}
ldapproxy_pool_wait_seconds_sum 0.5
# HELP process_cpu_seconds_total CPU.
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total {cpu}
"""


def test_aggregate_sums_and_labels() -> None:
    pages = [
        ("1", PAGE.format(conns=3, open=1, up=1, cpu=0.5)),
        ("2", PAGE.format(conns=4, open=2, up=0, cpu=0.25)),
    ]
    text = worker_metrics.render(worker_metrics.aggregate(pages)).decode()
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    plain = frozenset({("listener", "plain")})
    assert samples["ldapproxy_client_connections_total", plain] == 7
    assert samples["ldapproxy_client_connections", plain | {("tls", "none")}] == 3
    assert samples["ldapproxy_upstream_up", frozenset({("upstream", "ldaps://a:636")})] == 0
    assert samples["ldapproxy_pool_wait_seconds_bucket", frozenset({("le", "+Inf")})] == 7
    assert samples["ldapproxy_pool_wait_seconds_sum", frozenset()] == 1.0
    assert samples["process_cpu_seconds_total", frozenset({("worker", "1")})] == 0.5
    assert samples["process_cpu_seconds_total", frozenset({("worker", "2")})] == 0.25


def test_log_lines_are_tagged() -> None:
    class Config:
        class log:
            format = "text"

    supervisor = object.__new__(workers.Supervisor)
    supervisor.config = Config  # type: ignore[assignment]
    worker = workers.Worker(2)
    line = "2025-01-01T00:00:00Z info ldapproxy.service: reload: configuration applied"
    assert supervisor.tag(worker, line) == (
        "2025-01-01T00:00:00Z info ldapproxy.service: worker=2 reload: configuration applied"
    )
    assert supervisor.tag(worker, "ldapproxy: error: x") == "worker=2 ldapproxy: error: x"
    Config.log.format = "json"
    assert supervisor.tag(worker, '{"message": "m"}') == '{"message": "m", "worker": 2}'


def test_workers_number_sessions_without_collisions() -> None:
    """Worker k of N numbers its sessions k, k + N, k + 2N..., so connection ids in the main
    and audit logs are unique across workers."""
    from support.fakes import FakeSource
    from twisted.internet.address import IPv4Address
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from ldapproxy import client
    from ldapproxy.config import LimitsConfig, ListenerConfig, ListenerTLS

    factory = client.ClientFactory(
        ListenerConfig("ldap", "tcp:389", ListenerTLS.NONE),
        LimitsConfig(1 << 20, 900.0, 10.0, 10.0),
        Clock(),
        FakeSource(),
        None,
    )
    saved = client._session_ids
    try:
        client.number_sessions(2, 3)
        ids = []
        for port in range(3):
            protocol = factory.buildProtocol(IPv4Address("TCP", "192.0.2.1", 40000 + port))
            protocol.makeConnection(StringTransport())
            ids.append(protocol.session.id)
        assert ids == [2, 5, 8]
    finally:
        client._session_ids = saved
