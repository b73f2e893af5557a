"""End to end, the scale-out setup of deploy/haproxy/haproxy.cfg on loopback: Debian's
HAProxy in front of two ``ldapproxy run`` processes (PROXY protocol listeners) in front of
slapd.  The allowlist and the audit log see the real client address, and killing one
ldapproxy loses no new session.

Clients get distinct addresses by binding their socket to 127.0.0.2 or 127.0.0.3 (Linux
routes all of 127.0.0.0/8 to the loopback interface); HAProxy itself connects to the
instances, and runs its health checks, from 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from support.haproxy import haproxy_binary, haproxy_sections, haproxy_stats
from support.net import free_port
from support.proxy import Listener, ProxyProcess, proxy_config
from support.rawldap import simple_bind, subtree_search
from support.slapd import ALICE_DN, USERS, Slapd

from ldapproxy import messages as m
from ldapproxy.ber import Frame, Framer
from ldapproxy.pki import CertificateAuthority

ROOT = Path(__file__).resolve().parent.parent
HAPROXY_CFG = ROOT / "deploy" / "haproxy" / "haproxy.cfg"

#: The real client (its rule allows every operation) and a host no rule matches.
CLIENT = "127.0.0.2"
STRANGER = "127.0.0.3"
#: HAProxy's own address as the instances see it: its health checks come from here.
BALANCER = "127.0.0.1"

BEHIND_HAPROXY: dict[str, object] = {"proxy_protocol": True, "trusted_proxies": ["127.0.0.1/32"]}
ALLOWLIST: dict[str, object] = {
    "use": "allowlist",
    "rules": [
        {"networks": [f"{CLIENT}/32"]},
        # HAProxy's ldap-check (a LOCAL header, so HAProxy's own address): anonymous bind.
        {"networks": [f"{BALANCER}/32"], "operations": ["bind", "unbind"]},
    ],
}
#: Two instances; the shipped file's third server is dropped.
INSTANCES = ("ldapproxy1", "ldapproxy2")
#: The shipped "default-server inter 10s" would take 30 s to mark a dead instance down;
#: the test checks every 500 ms instead (fall 3, rise 2 are kept).
CHECK_INTERVAL = "500ms"
#: What the shipped file must keep for the scale-out guarantees tested here.
REQUIRED_SERVER_OPTIONS = ("check", "send-proxy-v2", "check-send-proxy")


pytestmark = pytest.mark.skipif(
    haproxy_binary() is None, reason="haproxy is not installed (apt-get install haproxy)"
)


def derive_haproxy_config(
    front_ports: dict[str, int], instance_ports: dict[str, dict[str, int]], stats: Path
) -> str:
    """deploy/haproxy/haproxy.cfg on loopback: frontends on ``front_ports`` (by shipped
    port, "389" and "636"), the servers of :data:`INSTANCES` pointing at
    ``instance_ports[name][shipped port]``, an admin stats socket, a short check interval;
    everything else (send-proxy-v2, check-send-proxy, ldap-check, redispatch, retries,
    timeouts) as shipped."""
    lines = ["global", f"    stats socket {stats} mode 600 level admin"]
    for name, statements in haproxy_sections(HAPROXY_CFG.read_text()).items():
        if name == "global":
            continue  # syslog, maxconn: not for a test
        lines.append(name)
        for words in statements:
            if words[0] == "bind":
                port = words[1].rsplit(":", 1)[1]
                words = ["bind", f"127.0.0.1:{front_ports[port]}"]
            elif words[0] == "server":
                if words[1] not in INSTANCES:
                    continue
                port = words[2].rsplit(":", 1)[1]
                address = f"127.0.0.1:{instance_ports[words[1]][port]}"
                words = ["server", words[1], address, *words[3:]]
            elif words[:2] == ["default-server", "inter"]:
                words = ["default-server", "inter", CHECK_INTERVAL, *words[3:]]
            lines.append("    " + " ".join(words))
    return "\n".join(lines) + "\n"


# -- a small LDAP client with a chosen source address ----------------------------------------


class SourceClient:
    """A blocking LDAP connection from ``source`` (a loopback address) to 127.0.0.1:port,
    optionally in TLS from the first byte (ldaps)."""

    def __init__(
        self, port: int, source: str, ca_path: Path | None = None, timeout: float = 15
    ) -> None:
        sock = socket.socket()
        sock.settimeout(timeout)
        try:
            sock.bind((source, 0))
            sock.connect(("127.0.0.1", port))
            if ca_path is not None:
                context = ssl.create_default_context(cafile=str(ca_path))
                sock = context.wrap_socket(sock, server_hostname="localhost")
        except BaseException:
            sock.close()
            raise
        self.sock: socket.socket = sock
        self.local = sock.getsockname()
        self._framer = Framer(2**24)
        self._frames: list[Frame] = []

    def read_frame(self) -> Frame:
        """The next whole PDU; ConnectionError if the peer closed first."""
        while not self._frames:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("connection closed by the peer")
            self._frames.extend(self._framer.feed(data))
        return self._frames.pop(0)

    def received_before_close(self) -> bytes:
        """Everything that arrives until the peer closes (EOF or reset)."""
        received = b""
        try:
            while chunk := self.sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
        return received

    def close(self) -> None:
        self.sock.close()


@dataclass
class Outcome:
    """What one session (connect, bind, search, unbind) got."""

    bind: int
    search: int
    entries: int
    local: tuple[str, int]
    #: The SearchResultDone PDU, diagnostic message included.
    done: bytes


def ldap_session(port: int, source: str, ca_path: Path | None = None) -> Outcome:
    """Connect from ``source``, bind as alice, search her entry, unbind."""
    client = SourceClient(port, source, ca_path)
    try:
        client.sock.sendall(simple_bind(1, ALICE_DN, USERS[ALICE_DN]))
        bind = client.read_frame()
        assert (bind.message_id, bind.op) == (1, m.BIND_RESPONSE), bind
        client.sock.sendall(subtree_search(2, ALICE_DN))
        entries = 0
        while True:
            frame = client.read_frame()
            assert frame.message_id == 2, frame
            if frame.op == m.SEARCH_RESULT_ENTRY:
                entries += 1
            elif frame.op == m.SEARCH_RESULT_DONE:
                break
        client.sock.sendall(m.unbind_request(3))
        return Outcome(
            m.result_code(bind.data), m.result_code(frame.data), entries, client.local, frame.data
        )
    finally:
        client.close()


# -- the cluster ------------------------------------------------------------------------------


@dataclass
class Cluster:
    """HAProxy in front of two ldapproxy instances in front of slapd."""

    workdir: Path
    ca: CertificateAuthority
    slapd: Slapd
    front: dict[str, int] = field(default_factory=lambda: {"389": free_port(), "636": free_port()})
    proxies: dict[str, ProxyProcess] = field(default_factory=dict)
    audits: dict[str, Path] = field(default_factory=dict)
    haproxy: subprocess.Popen[bytes] | None = None

    @property
    def stats(self) -> Path:
        return self.workdir / "haproxy.sock"

    @property
    def haproxy_log(self) -> Path:
        return self.workdir / "haproxy.log"

    @property
    def ca_path(self) -> Path:
        """The CA that issued the instances' certificate (each wrote the same file)."""
        return self.workdir / INSTANCES[0] / "ca.pem"

    def start(self) -> Cluster:
        ports = {}
        for name in INSTANCES:
            audit = self.workdir / f"audit-{name}.jsonl"
            config, listeners = proxy_config(
                self.workdir / name,
                self.ca,
                [self.slapd.ldaps_url],
                listeners=[
                    Listener("starttls-optional", "ldap", options=BEHIND_HAPROXY),
                    Listener("ldaps", "ldaps", options=BEHIND_HAPROXY),
                ],
                plugins=[ALLOWLIST, {"use": "audit", "path": str(audit)}],
            )
            proxy = ProxyProcess(config)
            self.proxies[name] = proxy
            self.audits[name] = audit
            proxy.start()
            ports[name] = {"389": listeners[0].port, "636": listeners[1].port}
        derived = self.workdir / "haproxy.cfg"
        derived.write_text(derive_haproxy_config(self.front, ports, self.stats))
        binary = haproxy_binary()
        assert binary is not None
        with self.haproxy_log.open("wb") as log:
            self.haproxy = subprocess.Popen(
                [binary, "-db", "-f", str(derived)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        self.wait_for_servers(lambda row: row["status"] == "UP" and row["check_status"] == "L7OK")
        return self

    def servers(self) -> list[dict[str, str]]:
        """The stats rows of the instances' servers (one per backend and instance)."""
        try:
            rows = haproxy_stats(self.stats)
        except OSError:  # not listening yet
            return []
        return [row for row in rows if row["svname"] in INSTANCES]

    def wait_for_servers(self, condition: Any, names: tuple[str, ...] = INSTANCES) -> None:
        """Poll the stats socket until every server row of ``names`` meets ``condition``."""
        deadline = time.monotonic() + 20
        while True:
            assert self.haproxy is not None
            assert self.haproxy.poll() is None, self.haproxy_log.read_text()
            rows = [row for row in self.servers() if row["svname"] in names]
            if len(rows) == 2 * len(names) and all(condition(row) for row in rows):
                return
            assert time.monotonic() < deadline, (rows, self.haproxy_log.read_text())
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop HAProxy and every instance still running, by PID."""
        if self.haproxy is not None:
            self.haproxy.terminate()
            try:
                self.haproxy.wait(10)
            except subprocess.TimeoutExpired:
                self.haproxy.kill()
                self.haproxy.wait()
        for proxy in self.proxies.values():
            proxy.stop()

    def logs(self) -> str:
        return "\n".join(proxy.log_text() for proxy in self.proxies.values())

    def wait_for_log(self, pattern: str, timeout: float = 10) -> str:
        """The first line of any instance's log matching ``pattern`` (waiting for it)."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.logs())
            if match:
                return match[0]
            assert time.monotonic() < deadline, f"no log line matching {pattern!r}:\n{self.logs()}"
            time.sleep(0.05)

    def audit_records(self, name: str) -> list[dict[str, Any]]:
        path = self.audits[name]
        text = path.read_text() if path.exists() else ""
        return [json.loads(line) for line in text.splitlines()]

    def wait_for_audit(self, until: Any, timeout: float = 10) -> dict[str, list[dict[str, Any]]]:
        """Every instance's audit records, once ``until(records by instance)`` holds."""
        deadline = time.monotonic() + timeout
        while True:
            records = {name: self.audit_records(name) for name in INSTANCES}
            if until(records):
                return records
            assert time.monotonic() < deadline, records
            time.sleep(0.05)


def disconnected(client: str) -> Any:
    """A condition for :meth:`Cluster.wait_for_audit`: the connection from ``client``
    (``ip:port``) has its disconnect record on some instance."""

    def done(records: dict[str, list[dict[str, Any]]]) -> bool:
        return any(
            r["event"] == "disconnect" and r["client"] == client
            for rs in records.values()
            for r in rs
        )

    return done


def sessions_of(records: list[dict[str, Any]], source: str) -> dict[int, list[dict[str, Any]]]:
    """The audit records of the connections from ``source``, by connection id."""
    by_conn: dict[int, list[dict[str, Any]]] = {}
    for record in records:
        if record["client"].startswith(f"{source}:"):
            by_conn.setdefault(record["conn"], []).append(record)
    return by_conn


@pytest.fixture(scope="module")
def cluster(
    ca: CertificateAuthority, slapd: Slapd, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """A running cluster shared by the tests that leave it intact."""
    running = Cluster(tmp_path_factory.mktemp("haproxy-cluster"), ca, slapd)
    try:
        yield running.start()
    finally:
        running.stop()


def test_derived_config_keeps_the_shipped_balancing_options(tmp_path: Path) -> None:
    """The loopback configuration keeps what the scale-out relies on from the shipped
    file: PROXY v2 on connections and checks, the LDAP check, retries and redispatch."""
    text = derive_haproxy_config(
        {"389": 1389, "636": 1636},
        {"ldapproxy1": {"389": 2389, "636": 2636}, "ldapproxy2": {"389": 3389, "636": 3636}},
        tmp_path / "stats.sock",
    )
    sections = haproxy_sections(text)
    assert ["option", "redispatch"] in sections["defaults"]
    (default_server,) = [words for words in sections["defaults"] if words[0] == "default-server"]
    assert default_server[1:3] == ["inter", CHECK_INTERVAL]
    assert "fall" in default_server
    (retries,) = [words for words in sections["defaults"] if words[0] == "retries"]
    assert int(retries[1]) >= 1
    backends = [name for name in sections if name.startswith("backend ")]
    assert len(backends) == 2
    for backend in backends:
        statements = sections[backend]
        assert ["option", "ldap-check"] in statements
        servers = [words for words in statements if words[0] == "server"]
        assert [words[1] for words in servers] == list(INSTANCES)
        for words in servers:
            assert words[2].startswith("127.0.0.1:")
            for option in REQUIRED_SERVER_OPTIONS:
                assert option in words[3:], (backend, words)
    binary = haproxy_binary()
    assert binary is not None
    checked = subprocess.run(
        [binary, "-c", "-f", "/dev/stdin"], input=text, capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_allowlist_and_audit_see_the_real_client_address(cluster: Cluster) -> None:
    """A client at 127.0.0.2 binds and searches through HAProxy (the rule for its address
    allows searches, HAProxy's own does not), and the audit log records 127.0.0.2 with
    the client's own source port."""
    outcome = ldap_session(cluster.front["389"], CLIENT)
    assert outcome.local[0] == CLIENT
    assert (outcome.bind, outcome.search, outcome.entries) == (m.SUCCESS, m.SUCCESS, 1)
    client = f"{CLIENT}:{outcome.local[1]}"
    records = cluster.wait_for_audit(disconnected(client))
    (name,) = [name for name, rs in records.items() if any(r["client"] == client for r in rs)]
    mine = [r for r in records[name] if r["client"] == client]
    assert [(r["event"], r.get("op")) for r in mine] == [
        ("connect", None),
        ("op", "bind"),
        ("op", "search"),
        ("op", "unbind"),
        ("disconnect", None),
    ]
    assert mine[0]["listener"] == "ldap"
    assert (mine[1]["dn"], mine[1]["result"]) == (ALICE_DN, 0)
    assert (mine[2]["result"], mine[2]["entries"]) == (0, 1)
    assert not re.search(rf"{re.escape(client)} .*denied by plugin allowlist", cluster.logs())
    # HAProxy's health checks (LOCAL headers) are attributed to its own address instead.
    checks = [r for rs in records.values() for r in rs if r["client"].startswith(f"{BALANCER}:")]
    assert ("op", "bind") in {(r["event"], r.get("op")) for r in checks}


def test_balancer_address_is_limited_to_its_rule(cluster: Cluster) -> None:
    """A client at 127.0.0.1 (the balancer's address) is held to the bind-only rule: its
    bind works and its search is refused by the allowlist, so the rules really are
    applied to the address from the PROXY header."""
    outcome = ldap_session(cluster.front["389"], BALANCER)
    assert outcome.bind == m.SUCCESS
    assert outcome.search == 50  # insufficientAccessRights
    assert b"operation search is not allowed from this host" in outcome.done
    assert outcome.entries == 0
    cluster.wait_for_log(
        rf"conn=\d+ {re.escape(BALANCER)}:{outcome.local[1]} search \(message ID 2\) "
        r"denied by plugin allowlist"
    )


def test_client_outside_every_rule_is_refused(cluster: Cluster) -> None:
    """A client at 127.0.0.3, which no rule matches, gets not one byte back and the
    instance logs the allowlist's refusal for 127.0.0.3."""
    client = SourceClient(cluster.front["389"], STRANGER, timeout=10)
    try:
        client.sock.sendall(simple_bind(1, ALICE_DN, USERS[ALICE_DN]))
        assert client.received_before_close() == b""
        port = client.local[1]
    finally:
        client.close()
    cluster.wait_for_log(
        rf"conn=\d+ {re.escape(STRANGER)}:{port} connection refused by plugin allowlist"
    )


def test_ldaps_through_haproxy_is_terminated_by_ldapproxy(cluster: Cluster) -> None:
    """Through the 636 frontend the client's TLS (PROXY header, then the ClientHello)
    reaches an instance, which terminates it with its own certificate; the session
    works and is recorded with the client's address and TLS version."""
    outcome = ldap_session(cluster.front["636"], CLIENT, cluster.ca_path)
    assert (outcome.bind, outcome.search, outcome.entries) == (m.SUCCESS, m.SUCCESS, 1)
    client = f"{CLIENT}:{outcome.local[1]}"
    records = cluster.wait_for_audit(disconnected(client))
    mine = [r for rs in records.values() for r in rs if r["client"] == client]
    assert [(r["event"], r.get("op")) for r in mine] == [
        ("connect", None),
        ("starttls", None),  # the audit plugin's record of TLS coming up, ldaps included
        ("op", "bind"),
        ("op", "search"),
        ("op", "unbind"),
        ("disconnect", None),
    ]
    assert mine[0]["listener"] == "ldaps"
    assert mine[1]["tls"] in ("TLSv1.2", "TLSv1.3")
    assert mine[3]["tls"] == mine[1]["tls"]


# -- failover -------------------------------------------------------------------------------


@dataclass
class Attempt:
    """One session of the load loop."""

    started: float
    ended: float
    error: str | None


class Load:
    """Threads that run new sessions through HAProxy back to back until stopped."""

    def __init__(self, port: int, workers: int = 4) -> None:
        self.port = port
        self.attempts: list[Attempt] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(workers)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            error = None
            try:
                outcome = ldap_session(self.port, CLIENT)
                if (outcome.bind, outcome.search, outcome.entries) != (0, 0, 1):
                    error = f"unexpected results {outcome}"
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
            with self._lock:
                self.attempts.append(Attempt(started, time.monotonic(), error))

    def finished(self, after: float = 0.0) -> list[Attempt]:
        """The sessions that started after ``after`` and are over."""
        with self._lock:
            return [a for a in self.attempts if a.started > after]

    def wait(self, count: int, after: float = 0.0, timeout: float = 90) -> None:
        """Until ``count`` sessions started after ``after`` are over."""
        deadline = time.monotonic() + timeout
        while len(self.finished(after)) < count:
            assert time.monotonic() < deadline, self.finished(after)
            time.sleep(0.02)


def test_killing_an_instance_loses_no_new_session(
    ca: CertificateAuthority, slapd: Slapd, tmp_path: Path
) -> None:
    """While new sessions (connect, bind, search, unbind) run back to back through HAProxy,
    one ldapproxy is killed with SIGKILL: every session started after the kill succeeds,
    on the other instance, and HAProxy marks the dead one down."""
    cluster = Cluster(tmp_path, ca, slapd)
    try:
        cluster.start()
        victim, survivor = INSTANCES
        with Load(cluster.front["389"]) as load:
            load.wait(40)
            # Both instances were serving the loop: the kill hits live traffic.
            cluster.wait_for_audit(
                lambda records: all(sessions_of(records[name], CLIENT) for name in INSTANCES)
            )
            process = cluster.proxies[victim]
            kill_sent = time.monotonic()
            os.kill(process.pid, signal.SIGKILL)
            assert process.process is not None
            assert process.process.wait(10) == -signal.SIGKILL
            killed = time.monotonic()
            load.wait(50, after=killed)
        # Sessions in flight at the kill may fail; those over before it may not.
        before = [a for a in load.attempts if a.ended < kill_sent]
        after = load.finished(killed)
        assert len(after) >= 50
        assert [a.error for a in before if a.error] == []
        assert [a.error for a in after if a.error] == [], (
            f"{sum(a.error is not None for a in after)} of {len(after)} new sessions failed"
        )
        cluster.wait_for_servers(lambda row: row["status"] == "DOWN", names=(victim,))
        # The new sessions all went to the survivor.
        cluster.wait_for_audit(
            lambda records: len(sessions_of(records[survivor], CLIENT)) >= len(after)
        )
    finally:
        cluster.stop()
