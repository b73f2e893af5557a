"""End to end: running the proxy in production, with ``ldapproxy run -c FILE`` in front of
a real slapd and real clients.

* ``/metrics``, ``/healthz`` and ``/readyz`` on ``metrics.endpoint`` after real traffic;
* SIGTERM: listeners close, idle clients get a Notice of Disconnection at once, operations
  in flight finish (or end with a notice after ``limits.drain_timeout``), requests sent
  during the drain are answered ``unavailable``, and the exit status is 0;
* SIGHUP: a certificate rotated under load with no failed operation, a broken
  configuration that leaves the running one in force, and keys that take a restart;
* systemd notifications (READY, WATCHDOG, RELOADING, STOPPING) on a real datagram socket;
* the main log as JSON, at ``log.level``, and ``--log-level`` overriding it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families
from support import compare
from support.ldaptools import run_ldap_tool
from support.net import LOOPBACK, free_port, wait_for_port
from support.proxy import Listener, ProxyProcess, render_toml
from support.rawldap import RawClient, simple_bind, subtree_search, whoami
from support.slapd import ALICE_DN, BULK_USER_COUNT, PEOPLE_DN, SUFFIX, USERS, Slapd

from ldapproxy import messages as m
from ldapproxy.ber import OCTET_STRING, Frame, encode_integer, tlv
from ldapproxy.pki import CertificateAuthority, Issued

pytestmark = pytest.mark.slapd

ALICE_PASSWORD = USERS[ALICE_DN]
SYNC_REQUEST_OID = b"1.3.6.1.4.1.4203.1.9.1.1"
INTERMEDIATE_RESPONSE = 0x79
INVALID_CREDENTIALS = 49
DEBUG_CONN = r" debug ldapproxy\.\S+: conn=\d+ 127\.0\.0\.1:\d+"
CONNECTED_DEBUG = rf"{DEBUG_CONN} connected to listener plain"
IPV4 = re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}\b")

#: ProxyProcess turns ResourceWarnings into errors, to catch leaks.  Twisted keeps one file
#: open on purpose (``twisted.internet.tcp._reservedFD``, /dev/null, the descriptor it
#: frees to accept and close connections when out of file descriptors) and never closes
#: it, so every proxy prints "Exception ignored ... unclosed file <... name='/dev/null'
#: ...>" as the interpreter exits.  Tests that read every line of the log ignore that one
#: warning; any other leak is still an error.
TWISTED_RESERVED_FD = {
    "PYTHONWARNINGS": "error::ResourceWarning,"
    "ignore:unclosed file <_io.TextIOWrapper name='/dev/null':ResourceWarning"
}

#: A small pool, so that each proxy opens few connections to the shared slapd.
SMALL_POOL: dict[str, object] = {"min_idle": 1, "max_size": 20}


# -- a proxy under test --------------------------------------------------------------------


@dataclass
class Setup:
    """A proxy's configuration file, which a test may rewrite before a SIGHUP."""

    path: Path
    listeners: dict[str, Listener]
    sections: dict[str, dict[str, object]]
    cert: Path
    key: Path
    ca_path: Path
    metrics_port: int
    plugins: list[dict[str, object]]

    def write(self) -> Path:
        """(Re)write the configuration file from ``listeners``, ``sections`` and ``plugins``."""
        self.path.write_text(
            render_toml(list(self.listeners.values()), self.sections, self.plugins)
        )
        return self.path

    def url(self, listener: str) -> str:
        return self.listeners[listener].url

    def port(self, listener: str) -> int:
        return self.listeners[listener].port


def make_setup(
    workdir: Path,
    ca: CertificateAuthority,
    upstream_urls: list[str],
    cn: str = "proxy",
    plugins: list[dict[str, object]] | None = None,
    **sections: dict[str, object],
) -> Setup:
    """A configuration with listeners ``plain`` (none), ``ldap`` (starttls-optional) and
    ``ldaps``, a certificate named ``cn`` from ``ca``, /metrics on a free port and
    ``sections`` merged over the defaults."""
    workdir.mkdir(parents=True, exist_ok=True)
    cert, key = issue(ca, cn).write(workdir, "proxy")
    ca_path = ca.write_certificate(workdir / "ca.pem")
    metrics_port = free_port()
    defaults: dict[str, dict[str, object]] = {
        "tls": {"certificate": str(cert), "private_key": str(key)},
        "upstream": {"urls": upstream_urls, "ca_file": str(ca_path)},
        "pool": dict(SMALL_POOL),
        "metrics": {"endpoint": f"tcp:{metrics_port}:interface={LOOPBACK}"},
    }
    for name, values in sections.items():
        defaults[name] = {**defaults.get(name, {}), **values}
    listeners = {
        name: Listener(tls, name)
        for name, tls in (("plain", "none"), ("ldap", "starttls-optional"), ("ldaps", "ldaps"))
    }
    setup = Setup(
        workdir / "ldapproxy.toml",
        listeners,
        defaults,
        cert,
        key,
        ca_path,
        metrics_port,
        plugins or [],
    )
    setup.write()
    return setup


def issue(ca: CertificateAuthority, cn: str) -> Issued:
    """A server certificate for the proxy, valid for 127.0.0.1 and localhost."""
    return ca.issue(cn, dns_names=["localhost"], ip_addresses=[LOOPBACK])


@pytest.fixture
def proxies() -> Iterator[list[ProxyProcess]]:
    """Proxies a test starts itself (with arguments or environment); all stopped at the end."""
    started: list[ProxyProcess] = []
    try:
        yield started
    finally:
        for proxy in started:
            proxy.stop()


def start(
    proxies: list[ProxyProcess],
    config: Path,
    *args: str,
    env: dict[str, str] | None = None,
    expect_ready: bool = True,
) -> ProxyProcess:
    proxy = ProxyProcess(config, *args, env=env)
    proxies.append(proxy)
    return proxy.start(expect_ready=expect_ready)


# -- clients ---------------------------------------------------------------------------------


def ldapwhoami(
    url: str, env: dict[str, str], *flags: str, password: str = ALICE_PASSWORD
) -> tuple[int, str]:
    """``ldapwhoami`` as alice; returns the exit status and what it printed."""
    result = run_ldap_tool(
        [
            "ldapwhoami",
            "-x",
            *flags,
            "-H",
            url,
            "-D",
            ALICE_DN,
            "-w",
            password,
            "-o",
            "nettimeout=5",
        ],
        env,
        timeout=20,
    )
    return result.returncode, result.stdout + result.stderr


def http_get(port: int, path: str) -> tuple[int, str, str]:
    """GET ``http://127.0.0.1:port/path`` (never through an HTTP proxy): status, content
    type and body."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://{LOOPBACK}:{port}{path}", timeout=5) as response:
            return response.status, response.headers["content-type"], response.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers["content-type"], error.read().decode()


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> tuple[Samples, list[dict[str, str]]]:
    """Every sample of ``/metrics``, keyed by name and labels, and every label set."""
    status, content_type, text = http_get(port, "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain")
    samples: Samples = {}
    labels = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name, frozenset(sample.labels.items())] = sample.value
            labels.append(sample.labels)
    return samples, labels


def sample(samples: Samples, name: str, **labels: str) -> float:
    """The value of the one sample ``name`` whose labels include ``labels``."""
    found = [
        value
        for (sample_name, sample_labels), value in samples.items()
        if sample_name == name and set(labels.items()) <= sample_labels
    ]
    assert len(found) == 1, (name, labels, [k for k in samples if k[0] == name])
    return found[0]


def label_values(samples: Samples, name: str, label: str) -> list[str]:
    return [
        dict(sample_labels)[label]
        for sample_name, sample_labels in samples
        if sample_name == name and label in dict(sample_labels)
    ]


def served_certificate(port: int, ca_path: Path, starttls: bool = False) -> x509.Certificate:
    """The certificate a new TLS handshake with the proxy presents (verified against the CA
    for 127.0.0.1)."""
    with compare.RawClient(LOOPBACK, port, cafile=ca_path, implicit_tls=not starttls) as client:
        if starttls:
            client.start_tls(1)
        return peer_certificate(client)


def peer_certificate(client: compare.RawClient) -> x509.Certificate:
    assert isinstance(client.sock, ssl.SSLSocket)
    der = client.sock.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def common_name(certificate: x509.Certificate) -> str:
    (attribute,) = certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(attribute.value)


def pem_certificate(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def is_notice(frame: Frame) -> bool:
    """Whether ``frame`` is a Notice of Disconnection (message ID 0, RFC 4511 §4.4.1)."""
    return (
        frame.message_id == 0
        and frame.op == m.EXTENDED_RESPONSE
        and m.extended_response_name(frame.data) == m.NOTICE_OF_DISCONNECTION_OID
    )


def persistent_search(message_id: int, base: str) -> bytes:
    """A subtree search with the syncrepl refreshAndPersist control (RFC 4533): it never
    ends by itself."""
    control = tlv(
        0x30,
        tlv(OCTET_STRING, SYNC_REQUEST_OID)
        + tlv(0x01, b"\xff")
        + tlv(OCTET_STRING, tlv(0x30, encode_integer(3, 0x0A))),
    )
    return subtree_search(message_id, base, tlv(0xA0, control))


def wait_for_count(proxy: ProxyProcess, pattern: str, count: int, timeout: float = 10) -> list[str]:
    """Wait until ``count`` log lines match ``pattern``; return them."""
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in proxy.log_text().splitlines() if regex.search(line)]
        if len(lines) >= count:
            return lines
        assert time.monotonic() < deadline, f"not {count} x {pattern!r}:\n{proxy.log_text()}"
        time.sleep(0.05)


# -- /metrics, /healthz, /readyz -------------------------------------------------------------


@pytest.fixture(scope="module")
def metered(
    ca: CertificateAuthority, slapd: Slapd, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Setup, ProxyProcess]]:
    """One proxy with /metrics in front of the shared slapd, for the read-only tests."""
    setup = make_setup(tmp_path_factory.mktemp("metered"), ca, [slapd.ldaps_url])
    proxy = ProxyProcess(setup.path).start()
    try:
        yield setup, proxy
    finally:
        proxy.stop()


def test_metrics_after_real_traffic(metered: tuple[Setup, ProxyProcess], slapd: Slapd) -> None:
    """After real binds, searches, a StartTLS session and a wrong password, /metrics has
    the connection, operation, StartTLS, upstream, pool, byte, certificate, reload and
    process metrics, and no label carries a DN or a client address."""
    setup, _ = metered
    env = slapd.ldap_env()
    assert ldapwhoami(setup.url("ldap"), env, "-ZZ")[0] == 0
    searched = run_ldap_tool(
        ["ldapsearch", "-x", "-LLL", "-H", setup.url("ldaps"), "-D", ALICE_DN, "-w",
         ALICE_PASSWORD, "-b", PEOPLE_DN, "-s", "one", "uid"],
        env,
    )  # fmt: skip
    assert searched.returncode == 0, searched.stderr
    assert len(re.findall(r"^uid: ", searched.stdout, re.MULTILINE)) >= BULK_USER_COUNT
    assert ldapwhoami(setup.url("plain"), env, password="wrong")[0] == INVALID_CREDENTIALS

    samples, labels = scrape(setup.metrics_port)

    for listener in ("plain", "ldap", "ldaps"):
        assert sample(samples, "ldapproxy_client_connections_total", listener=listener) >= 1
    assert sample(samples, "ldapproxy_operations_total", op="bind", result="success") >= 2
    assert sample(samples, "ldapproxy_operations_total", op="search", result="success") >= 1
    assert sample(samples, "ldapproxy_operations_total", op="extended", result="success") >= 1
    assert (
        sample(samples, "ldapproxy_operations_total", op="bind", result="invalidCredentials") >= 1
    )
    # A sub-millisecond bucket exists, and every bind is counted in +Inf.
    bucket = "ldapproxy_operation_duration_seconds_bucket"
    assert sample(samples, bucket, op="bind", le="0.0001") >= 0
    binds = sample(samples, bucket, op="bind", le="+Inf")
    assert binds == sample(samples, "ldapproxy_operation_duration_seconds_count", op="bind") >= 3
    assert sample(samples, "ldapproxy_starttls_total", listener="ldap", outcome="success") >= 1

    upstream = slapd.ldaps_url
    assert sample(samples, "ldapproxy_upstream_up", upstream=upstream) == 1.0
    assert sample(samples, "ldapproxy_upstream_connections", upstream=upstream, state="idle") >= 0
    assert sample(samples, "ldapproxy_pool_wait_seconds_bucket", le="+Inf") >= 3
    assert sample(samples, "ldapproxy_pool_wait_seconds_count") >= 3
    assert sample(samples, "ldapproxy_bytes_total", direction="in") > 0
    assert sample(samples, "ldapproxy_bytes_total", direction="out") > 0

    expiry = "ldapproxy_tls_certificate_expiry_timestamp_seconds"
    served = pem_certificate(setup.cert)
    assert sample(samples, expiry, role="server") == served.not_valid_after_utc.timestamp()
    assert label_values(samples, expiry, "subject") == ["CN=proxy", "CN=localhost"]
    directory = x509.load_pem_x509_certificate(slapd.server_cert.certificate_pem)
    assert sample(samples, expiry, role="upstream") == directory.not_valid_after_utc.timestamp()

    assert sample(samples, "ldapproxy_config_reloads_total", outcome="failure") == 0.0
    assert sample(samples, "ldapproxy_config_reloads_total", outcome="success") == 0.0
    assert sample(samples, "process_cpu_seconds_total") > 0

    # Label values come from fixed sets: no DN, no client address.  Only the configured
    # upstream URL names an address, and only a certificate subject is written name=value.
    for label_set in labels:
        for name, value in label_set.items():
            assert "dc=" not in value.lower(), label_set
            assert "alice" not in value.lower(), label_set
            if name != "upstream":
                assert not IPV4.search(value), label_set
            if name != "subject":
                assert "=" not in value, label_set


def test_health_and_readiness(metered: tuple[Setup, ProxyProcess]) -> None:
    """/healthz answers 200 ok, and /readyz 200 ok while the upstream is up."""
    setup, _ = metered
    assert http_get(setup.metrics_port, "/healthz") == (200, "text/plain; charset=utf-8", "ok\n")
    assert http_get(setup.metrics_port, "/readyz") == (200, "text/plain; charset=utf-8", "ok\n")
    assert http_get(setup.metrics_port, "/nothing-here")[0] == 404


def test_readyz_without_a_live_upstream(
    tmp_path: Path, ca: CertificateAuthority, slapd: Slapd, proxies: list[ProxyProcess]
) -> None:
    """With its only upstream a port nobody listens on, the proxy is healthy but not ready:
    /readyz answers 503 "no upstream is up" and ldapproxy_upstream_up is 0."""
    dead = f"ldaps://{LOOPBACK}:{free_port()}"
    setup = make_setup(tmp_path, ca, [dead])
    proxy = start(proxies, setup.path)
    proxy.wait_for_log(rf"upstream {re.escape(dead)} is down")
    assert http_get(setup.metrics_port, "/healthz")[:2] == (200, "text/plain; charset=utf-8")
    status, _, body = http_get(setup.metrics_port, "/readyz")
    assert (status, body) == (503, "no upstream is up\n")
    samples, _ = scrape(setup.metrics_port)
    assert sample(samples, "ldapproxy_upstream_up", upstream=dead) == 0.0
    assert sample(samples, "ldapproxy_upstream_connect_errors_total", upstream=dead) >= 1


# -- SIGTERM ---------------------------------------------------------------------------------


def test_sigterm_drains_then_exits_zero(
    tmp_path: Path, ca: CertificateAuthority, slapd: Slapd, proxies: list[ProxyProcess]
) -> None:
    """On SIGTERM an idle client gets a Notice of Disconnection at once and new connections
    are refused; a search in flight gets its whole result (or a notice, never a silent cut),
    a never-ending one gets a notice after limits.drain_timeout, a request sent meanwhile
    gets unavailable, and the exit status is 0."""
    setup = make_setup(tmp_path, ca, [slapd.ldaps_url], limits={"drain_timeout": 3})
    proxy = start(proxies, setup.path)
    port = setup.port("plain")
    with (
        RawClient(port) as idle,
        RawClient(port) as persisting,
        RawClient(port, receive_buffer=4096) as bulk,
    ):
        for client in (idle, persisting, bulk):
            client.send(simple_bind(1, ALICE_DN, ALICE_PASSWORD))
            assert m.result_code(client.read_frame().data) == m.SUCCESS
        # The persistent search is in its persist phase: it is outstanding until cancelled.
        persisting.send(persistent_search(2, PEOPLE_DN))
        while True:
            frame = persisting.read_frame()
            assert frame.message_id == 2
            if frame.op == INTERMEDIATE_RESPONSE:
                break
        # The bulk search is sent, and nothing of its result read yet.
        bulk.send(subtree_search(2, SUFFIX))

        os.kill(proxy.pid, signal.SIGTERM)

        # At once: the other clients are still being served afterwards.
        frames = idle.read_until_closed()
        assert len(frames) == 1, frames
        assert is_notice(frames[0])
        assert m.result_code(frames[0].data) == m.UNAVAILABLE
        # The listeners closed before the drain began.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((LOOPBACK, port), timeout=5).close()
        # The metrics site stays up during the drain, and says why the proxy is not ready.
        assert http_get(setup.metrics_port, "/readyz")[::2] == (503, "shutting down\n")

        persisting.send(whoami(3))
        refused = persisting.read_frame()
        assert (refused.message_id, refused.op) == (3, m.EXTENDED_RESPONSE)
        assert m.result_code(refused.data) == m.UNAVAILABLE

        received = bulk.read_until_closed(limit=10_000)
        assert received, "the bulk search got nothing"
        assert is_notice(received[-1]), received[-3:]
        results = [f for f in received[:-1] if f.op == m.SEARCH_RESULT_DONE]
        if results:  # it completed within the drain time: every entry arrived
            assert [m.result_code(f.data) for f in results] == [m.SUCCESS]
            entries = sum(f.op == m.SEARCH_RESULT_ENTRY for f in received)
            assert entries >= BULK_USER_COUNT + len(USERS) + 3
        assert all(f.message_id == 2 for f in received[:-1])

        rest = persisting.read_until_closed()
        assert rest, "the persistent search was cut without a notice"
        assert is_notice(rest[-1])
        assert m.result_code(rest[-1].data) == m.UNAVAILABLE
        assert all(f.message_id == 2 for f in rest[:-1])
    assert proxy.wait_exit() == 0
    proxy.wait_for_log(r"draining [23] client session\(s\) for up to 3 s \(limits.drain_timeout\)")


# -- SIGHUP ----------------------------------------------------------------------------------


class ClientLoop(threading.Thread):
    """Runs ``ldapwhoami`` as alice again and again until stopped, recording each outcome."""

    def __init__(self, url: str, env: dict[str, str], *flags: str) -> None:
        super().__init__(daemon=True)
        self.url, self.env, self.flags = url, env, flags
        self.outcomes: list[tuple[int, str]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.outcomes.append(ldapwhoami(self.url, self.env, *self.flags))
            except Exception as error:  # a hung client is a failed operation too
                self.outcomes.append((-1, repr(error)))

    def wait_for(self, count: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while len(self.outcomes) < count:
            assert self.is_alive(), self.outcomes
            assert time.monotonic() < deadline, self.outcomes
            time.sleep(0.02)

    def finish(self) -> list[tuple[int, str]]:
        self.stopping.set()
        self.join(30)
        assert not self.is_alive()
        return self.outcomes


def test_sighup_rotates_the_certificate_under_load(
    tmp_path: Path, ca: CertificateAuthority, slapd: Slapd, proxies: list[ProxyProcess]
) -> None:
    """Certificate files replaced in place and a SIGHUP: while ldapwhoami runs in a loop
    over LDAPS and StartTLS, no operation fails; new handshakes present the new
    certificate, and a connection opened before the reload keeps working."""
    setup = make_setup(tmp_path, ca, [slapd.ldaps_url])
    proxy = start(proxies, setup.path)
    old = pem_certificate(setup.cert)
    env = slapd.ldap_env()
    loops = [ClientLoop(setup.url("ldaps"), env), ClientLoop(setup.url("ldap"), env, "-ZZ")]
    with compare.RawClient(
        LOOPBACK, setup.port("ldaps"), cafile=setup.ca_path, implicit_tls=True
    ) as before:
        before.send(compare.message(1, compare.simple_bind(ALICE_DN, ALICE_PASSWORD)))
        assert before.until_final(1)[-1].result_code == m.SUCCESS
        for loop in loops:
            loop.start()
        try:
            for loop in loops:
                loop.wait_for(3)
            issue(ca, "proxy-rotated").write(tmp_path, "proxy")  # the same two files
            new = pem_certificate(setup.cert)
            os.kill(proxy.pid, signal.SIGHUP)
            proxy.wait_for_log(r"reload: configuration applied from ")
            counts = [len(loop.outcomes) for loop in loops]
            for loop, count in zip(loops, counts, strict=True):
                loop.wait_for(count + 3)
        finally:
            outcomes = [loop.finish() for loop in loops]
        for outcome in outcomes:
            assert [o for o in outcome if o[0] != 0] == []
            assert {o[1].strip() for o in outcome} == {f"dn:{ALICE_DN}"}

        before.send(compare.message(2, compare.extended(compare.WHOAMI_OID)))
        (answer,) = before.until_final(2)
        assert answer.result_code == m.SUCCESS
        assert peer_certificate(before) == old

    assert new.serial_number != old.serial_number
    for starttls in (False, True):
        port = setup.port("ldap" if starttls else "ldaps")
        presented = served_certificate(port, setup.ca_path, starttls=starttls)
        assert presented == new
        assert common_name(presented) == "proxy-rotated"
    samples, _ = scrape(setup.metrics_port)
    expiry = "ldapproxy_tls_certificate_expiry_timestamp_seconds"
    assert label_values(samples, expiry, "subject")[0] == "CN=proxy-rotated"
    assert sample(samples, "ldapproxy_config_reloads_total", outcome="success") == 1.0
    assert "reload failed" not in proxy.log_text()


def invalid_toml(setup: Setup) -> None:
    setup.path.write_text("[[listener]\nname = 'plain'\n")


def unknown_key(setup: Setup) -> None:
    setup.sections.setdefault("limits", {})["bogus"] = 1
    setup.write()


def missing_certificate(setup: Setup) -> None:
    setup.sections["tls"]["certificate"] = f"{setup.cert}.missing"
    setup.write()


@pytest.mark.parametrize(
    ("break_config", "problem"),
    [
        (invalid_toml, r"ldapproxy\.toml: not valid TOML: "),
        (unknown_key, r"\[limits\] unknown key 'bogus'"),
        (
            missing_certificate,
            r"\[tls\] certificate = '\S+\.pem\.missing': cannot read: No such file or directory",
        ),
    ],
    ids=["invalid-toml", "unknown-key", "missing-certificate"],
)
def test_sighup_with_a_broken_config_keeps_the_running_one(
    break_config: Callable[[Setup], None],
    problem: str,
    tmp_path: Path,
    ca: CertificateAuthority,
    slapd: Slapd,
    proxies: list[ProxyProcess],
) -> None:
    """A SIGHUP with a broken configuration (and a new certificate already in place) logs
    one error naming the problem, counts one failed reload, and keeps serving with the
    old certificate; a second SIGHUP after the fix applies the new one."""
    setup = make_setup(tmp_path, ca, [slapd.ldaps_url])
    proxy = start(proxies, setup.path)
    old = pem_certificate(setup.cert)
    good = setup.path.read_text()
    issue(ca, "proxy-next").write(tmp_path, "proxy")
    break_config(setup)
    os.kill(proxy.pid, signal.SIGHUP)
    (line,) = wait_for_count(proxy, r"reload failed", 1)
    assert re.search(rf"reload failed, the running configuration stays in force: .*{problem}", line)
    assert " error ldapproxy.service: " in line

    env = slapd.ldap_env()
    assert ldapwhoami(setup.url("ldaps"), env) == (0, f"dn:{ALICE_DN}\n")
    assert served_certificate(setup.port("ldaps"), setup.ca_path) == old
    samples, _ = scrape(setup.metrics_port)
    assert sample(samples, "ldapproxy_config_reloads_total", outcome="failure") == 1.0
    assert sample(samples, "ldapproxy_config_reloads_total", outcome="success") == 0.0

    setup.path.write_text(good)
    os.kill(proxy.pid, signal.SIGHUP)
    proxy.wait_for_log(r"reload: configuration applied")
    assert common_name(served_certificate(setup.port("ldaps"), setup.ca_path)) == "proxy-next"
    assert len(wait_for_count(proxy, r"reload failed", 1)) == 1


def test_sighup_with_a_restart_only_change(
    tmp_path: Path, ca: CertificateAuthority, slapd: Slapd, proxies: list[ProxyProcess]
) -> None:
    """A reload that changes pool.max_size warns that the key takes a restart and keeps the
    running value (a second session still waits for the only connection), while the
    log.level change in the same file is applied."""
    setup = make_setup(
        tmp_path,
        ca,
        [slapd.ldaps_url],
        pool={"min_idle": 1, "max_size": 1, "acquire_timeout": 0.5},
    )
    proxy = start(proxies, setup.path)
    setup.sections["pool"]["max_size"] = 5
    setup.sections["log"] = {"level": "debug"}
    setup.write()
    os.kill(proxy.pid, signal.SIGHUP)
    proxy.wait_for_log(r"reload: configuration applied")
    (warning,) = wait_for_count(proxy, r"takes a restart", 1)
    assert " warn ldapproxy.service: " in warning
    assert "reload: pool.max_size changed from 1 to 5; this takes a restart" in warning
    assert "takes a restart" not in proxy.log_text().replace(warning, "")

    port = setup.port("plain")
    with RawClient(port) as holder, RawClient(port) as waiter:
        holder.send(simple_bind(1, ALICE_DN, ALICE_PASSWORD))
        assert m.result_code(holder.read_frame().data) == m.SUCCESS
        waiter.send(simple_bind(1, ALICE_DN, ALICE_PASSWORD))
        answer = waiter.read_frame()
        assert (answer.message_id, m.result_code(answer.data)) == (1, m.BUSY)
    # log.level = debug is in force: connections are logged now.
    proxy.wait_for_log(CONNECTED_DEBUG)


# -- systemd ---------------------------------------------------------------------------------


#: A plugin whose start() takes half a second.  Plugins start before the listeners bind,
#: so with it a READY=1 sent too early would come while nothing listens yet.
SLOW_START_PLUGIN = """
from twisted.internet import task

from ldapproxy.hooks import Plugin


class SlowStart(Plugin):
    @classmethod
    def from_config(cls, options, context):
        options.finish()
        plugin = cls()
        plugin.clock = context.clock
        return plugin

    def start(self):
        return task.deferLater(self.clock, 0.5, lambda: None)
"""


class NotifySocket:
    """The AF_UNIX datagram socket systemd would listen on for sd_notify messages."""

    def __init__(self, path: Path) -> None:
        assert len(os.fsencode(path)) < 100, path
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.received: list[str] = []

    def next(self, timeout: float) -> str | None:
        """The next datagram, or None if none arrives within ``timeout``."""
        self.sock.settimeout(timeout)
        try:
            message = self.sock.recv(4096).decode()
        except TimeoutError:
            return None
        self.received.append(message)
        return message

    def wait_for(self, field: str, timeout: float = 15) -> tuple[str, list[str]]:
        """The first message with ``field`` (e.g. ``READY=1``) and the ones before it."""
        deadline = time.monotonic() + timeout
        skipped = []
        while (remaining := deadline - time.monotonic()) > 0:
            message = self.next(remaining)
            if message is not None and field in message.split("\n"):
                return message, skipped
            if message is not None:
                skipped.append(message)
        raise AssertionError(f"no {field} within {timeout} s; got {self.received}")

    def close(self) -> None:
        self.sock.close()


def test_systemd_notifications(
    tmp_path: Path,
    ca: CertificateAuthority,
    slapd: Slapd,
    proxies: list[ProxyProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With NOTIFY_SOCKET and WATCHDOG_USEC set, the proxy sends READY=1 (with a status)
    only once its listeners accept connections, WATCHDOG=1 pings, RELOADING=1 and READY=1
    around a SIGHUP, and STOPPING=1 on SIGTERM; it exits with status 0."""
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "slow_start.py").write_text(SLOW_START_PLUGIN)
    setup = make_setup(tmp_path, ca, [slapd.ldaps_url], plugins=[{"use": "slow_start:SlowStart"}])
    notify = NotifySocket(tmp_path / "notify")
    try:
        env = {
            "NOTIFY_SOCKET": str(notify.path),
            "WATCHDOG_USEC": "1000000",
            "PYTHONPATH": os.pathsep.join(
                filter(None, [str(plugins), os.environ.get("PYTHONPATH")])
            ),
        }
        proxy = start(proxies, setup.path, env=env, expect_ready=False)
        ready, before = notify.wait_for("READY=1")
        for listener in setup.listeners.values():  # at once: no waiting, no retry
            socket.create_connection((LOOPBACK, listener.port), timeout=5).close()
        assert before == []
        assert re.fullmatch(
            r"READY=1\nSTATUS=3 listener\(s\), 1/1 upstream\(s\) up, \d+ client session\(s\)",
            ready,
        )
        proxy.wait_for_log(r"ldapproxy \S+ ready: 3 listener\(s\)")

        pings = []
        deadline = time.monotonic() + 3
        while len(pings) < 2 and (remaining := deadline - time.monotonic()) > 0:
            message = notify.next(remaining)
            if message is not None:
                pings.append(message)
        assert pings == ["WATCHDOG=1", "WATCHDOG=1"]

        os.kill(proxy.pid, signal.SIGHUP)
        reloading, _ = notify.wait_for("RELOADING=1")
        assert re.fullmatch(
            r"RELOADING=1\nMONOTONIC_USEC=\d+\nSTATUS=reloading the configuration", reloading
        )
        ready, between = notify.wait_for("READY=1")
        assert set(between) <= {"WATCHDOG=1"}
        assert ready == "READY=1\nSTATUS=reload applied"

        os.kill(proxy.pid, signal.SIGTERM)
        stopping, between = notify.wait_for("STOPPING=1")
        assert set(between) <= {"WATCHDOG=1"}
        assert stopping == "STOPPING=1\nSTATUS=draining client sessions"
        assert proxy.wait_exit() == 0
    finally:
        notify.close()


# -- logging ---------------------------------------------------------------------------------


def provoke_warning(port: int) -> None:
    """Send a byte stream that is not LDAP, which the proxy logs as a warning."""
    with RawClient(port) as client:
        client.send(b"\x04\x00")
        frames = client.read_until_closed()
    assert len(frames) == 1
    assert is_notice(frames[0])


def test_json_log(
    tmp_path: Path, ca: CertificateAuthority, slapd: Slapd, proxies: list[ProxyProcess]
) -> None:
    """With log.format = "json", every line the proxy writes on stderr, from start to exit,
    is one JSON object with time, level, logger and message."""
    setup = make_setup(tmp_path, ca, [slapd.ldaps_url], log={"format": "json"})
    proxy = start(proxies, setup.path, env=TWISTED_RESERVED_FD)
    provoke_warning(setup.port("plain"))
    proxy.wait_for_log(r"closing: protocol error")
    assert proxy.stop() == 0
    lines = proxy.log_text().splitlines()
    assert len(lines) >= 5
    records = [json.loads(line) for line in lines]
    for record in records:
        assert isinstance(record, dict)
        assert {"time", "level", "logger", "message"} <= record.keys(), record
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["time"]), record
        assert record["level"] in ("debug", "info", "warn", "error", "critical"), record
    listening = f"listener plain on 127.0.0.1:{setup.port('plain')} (tls = none)"
    assert {"level": "info", "logger": "ldapproxy.service", "message": listening} in [
        {k: r[k] for k in ("level", "logger", "message")} for r in records
    ]
    assert any(r["level"] == "warn" and "protocol error" in r["message"] for r in records)


def test_log_level_warn_hides_info(
    tmp_path: Path, ca: CertificateAuthority, slapd: Slapd, proxies: list[ProxyProcess]
) -> None:
    """With log.level = "warn" the proxy logs warnings but no info lines (not even its
    listeners or its readiness)."""
    setup = make_setup(tmp_path, ca, [slapd.ldaps_url], log={"level": "warn"})
    proxy = start(proxies, setup.path, env=TWISTED_RESERVED_FD, expect_ready=False)
    wait_for_port(LOOPBACK, setup.metrics_port)  # bound after every listener
    assert ldapwhoami(setup.url("plain"), slapd.ldap_env())[0] == 0
    provoke_warning(setup.port("plain"))
    proxy.wait_for_log(r" warn ldapproxy\.\S+: conn=\d+ 127\.0\.0\.1:\d+ closing: protocol error")
    assert proxy.stop() == 0
    lines = proxy.log_text().splitlines()
    levels = {line.split(" ", 2)[1] for line in lines}
    assert levels == {"warn"}, lines
    assert not any("listener plain on" in line for line in lines)


def test_log_level_option_overrides_the_config(
    tmp_path: Path, ca: CertificateAuthority, slapd: Slapd, proxies: list[ProxyProcess]
) -> None:
    """``--log-level debug`` on the command line wins over log.level = "warn": info lines
    and the per-connection debug lines are logged."""
    setup = make_setup(tmp_path, ca, [slapd.ldaps_url], log={"level": "warn"})
    proxy = start(proxies, setup.path, "--log-level", "debug")
    proxy.wait_for_log(
        rf" info ldapproxy\.service: listener plain on 127\.0\.0\.1:{setup.port('plain')} "
    )
    assert ldapwhoami(setup.url("plain"), slapd.ldap_env())[0] == 0
    proxy.wait_for_log(CONNECTED_DEBUG)
    proxy.wait_for_log(rf"{DEBUG_CONN} closed \(client unbind\)")
