"""``make bench``: direct slapd against ldapproxy, side by side, in one run.

Starts its own slapd (mdb, ``ldap://`` and ``ldaps://`` on free 127.0.0.1 ports, an ECDSA
P-256 certificate from :class:`ldapproxy.pki.CertificateAuthority`, ``BENCH_USERS`` users)
and one ``ldapproxy run`` in front of it (a plain listener and a ``starttls-optional``
listener, pooled LDAPS upstream), then runs ``bench/build/loadgen`` against each target in
alternation, round after round, and prints one table of ratios.  Every process it starts
is stopped by its PID at the end, also on errors and Ctrl-C.  See bench/README.rst.

Knobs (environment): BENCH_USERS=10000 BENCH_SECONDS=4 BENCH_WARMUP=1 BENCH_ROUNDS=2
BENCH_CONNS=8 BENCH_DEPTH=4 BENCH_SCENARIOS="short search bind" BENCH_SLAPD_THREADS=8
BENCH_POOL_MIN_IDLE=16 BENCH_KEY=ec (the upstream certificate: ec = ECDSA P-256, rsa = RSA-2048).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import hashlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ldapproxy import __version__
from ldapproxy.pki import CertificateAuthority

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
LOOPBACK = "127.0.0.1"
SUFFIX = "dc=example,dc=com"
PEOPLE = f"ou=people,{SUFFIX}"
#: User k has the password PASSWORD_PREFIX + str(k) (loadgen -p).
PASSWORD_PREFIX = "pass"  # noqa: S105 - throwaway test users
SCHEMA_DIR = Path("/etc/ldap/schema")
MODULE_PATH = Path("/usr/lib/ldap")
HZ = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1

#: Targets per scenario, in the order they are tabled.  "short" gets all four.
SHORT_TARGETS = ("ldap", "ldaps", "proxy", "proxy-starttls")
PERSISTENT_TARGETS = ("ldap", "proxy")
TARGET_HELP = {
    "ldap": "direct ldap:// to slapd (plaintext: the limit of this machine)",
    "ldaps": "direct ldaps:// to slapd (a TLS handshake per connection)",
    "proxy": "plain clients -> ldapproxy (tls none) -> pooled ldaps:// upstream",
    "proxy-starttls": "StartTLS clients (-Z) -> ldapproxy (starttls-optional) -> pooled ldaps://",
}


# -- settings --------------------------------------------------------------------------


def _env_number(
    name: str, default: float, kind: Callable[[str], Any] = int, zero_ok: bool = False
) -> Any:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise SystemExit(f"bench: {name}={raw!r} is not a number") from None
    if value < 0 or (value == 0 and not zero_ok):
        raise SystemExit(f"bench: {name} must be {'at least' if zero_ok else 'greater than'} 0")
    return value


def _key_type() -> str:
    value = os.environ.get("BENCH_KEY", "ec")
    if value not in ("ec", "rsa"):
        raise SystemExit(f"bench: BENCH_KEY={value!r}: use ec (ECDSA P-256) or rsa (RSA-2048)")
    return value


def _plugins() -> bool:
    value = os.environ.get("BENCH_PLUGINS", "none")
    if value not in ("none", "all"):
        raise SystemExit(f"bench: BENCH_PLUGINS={value!r}: use none or all")
    return value == "all"


@dataclass(frozen=True)
class Settings:
    users: int
    seconds: float
    warmup: float
    rounds: int
    conns: int
    depth: int
    scenarios: tuple[str, ...]
    slapd_threads: int
    pool_min_idle: int
    key_type: str
    plugins: bool = False

    @classmethod
    def from_env(cls) -> Settings:
        scenarios = tuple(os.environ.get("BENCH_SCENARIOS", "short search bind").split())
        unknown = set(scenarios) - {"short", "search", "bind"}
        if unknown or not scenarios:
            raise SystemExit(
                f"bench: BENCH_SCENARIOS: unknown {sorted(unknown)}; use short search bind"
            )
        return cls(
            users=_env_number("BENCH_USERS", 10000),
            seconds=_env_number("BENCH_SECONDS", 4.0, float),
            warmup=_env_number("BENCH_WARMUP", 1.0, float, zero_ok=True),
            rounds=_env_number("BENCH_ROUNDS", 2),
            conns=_env_number("BENCH_CONNS", 8),
            depth=_env_number("BENCH_DEPTH", 4),
            scenarios=scenarios,
            slapd_threads=_env_number("BENCH_SLAPD_THREADS", 8),
            key_type=_key_type(),
            pool_min_idle=_env_number("BENCH_POOL_MIN_IDLE", 16),
            plugins=_plugins(),
        )

    @property
    def pool_max_size(self) -> int:
        return max(64, 2 * self.conns, self.pool_min_idle)


# -- processes -------------------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the harness itself dies (e.g. SIGKILL)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Child:
    """A process the bench started; stopped by its PID, SIGTERM then SIGKILL."""

    def __init__(self, name: str, argv: list[str], log: Path, **popen: Any) -> None:
        self.name = name
        self.log = log
        self._files = []
        if "stdout" not in popen:
            self._files.append(log.open("ab"))
            popen["stdout"] = self._files[-1]
            popen.setdefault("stderr", subprocess.STDOUT)
        if "stderr" not in popen:
            self._files.append(log.open("ab"))
            popen["stderr"] = self._files[-1]
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches the harness, which stops us in order
            preexec_fn=_die_with_parent,  # the harness has no threads
            **popen,
        )
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(timeout)
        for stream in (self.popen.stdout, self.popen.stderr, *self._files):
            if stream is not None:
                stream.close()


def free_ports(count: int) -> list[int]:
    """*count* distinct loopback ports that were free a moment ago."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((LOOPBACK, 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def wait_for_ports(child: Child, ports: list[int], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    for port in ports:
        while True:
            if not child.alive():
                raise RuntimeError(f"{child.name} exited during startup; see {child.log}")
            with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), 0.2):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{child.name} not listening on {port}; see {child.log}")
            time.sleep(0.05)


def cpu_ticks(pid: int) -> tuple[int, int]:
    """(utime, stime) of a process (all its threads), in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def machine_ticks() -> tuple[int, int, int]:
    """(busy, total, irq + softirq) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # without guest time, which is counted in user already
    return total - idle, total, values[5] + values[6]


def all_process_ticks() -> dict[int, int]:
    """utime + stime of every process now, by PID (to name what else used the CPU)."""
    ticks = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            ticks[int(entry.name)] = sum(cpu_ticks(int(entry.name)))
    return ticks


def describe_process(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return f"pid {pid} (gone)"
    text = raw.replace(b"\0", b" ").decode(errors="replace").strip() or f"[pid {pid}]"
    return f"{pid} {text[:70]}"


# -- slapd -----------------------------------------------------------------------------


def ssha(password: str) -> str:
    salt = os.urandom(8)
    digest = hashlib.sha1(password.encode() + salt, usedforsecurity=False).digest()
    return "{SSHA}" + base64.b64encode(digest + salt).decode("ascii")


def people_ldif(users: int) -> Iterator[str]:
    yield (
        f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: Example\n"
    )
    yield f"dn: {PEOPLE}\nobjectClass: organizationalUnit\nou: people\n"
    for k in range(1, users + 1):
        yield (
            f"dn: uid=user{k},{PEOPLE}\nobjectClass: inetOrgPerson\nuid: user{k}\n"
            f"cn: User {k}\nsn: User{k}\ngivenName: Bench\nmail: user{k}@example.com\n"
            f"employeeNumber: {k}\nuserPassword: {ssha(PASSWORD_PREFIX + str(k))}\n"
        )


def slapd_conf(workdir: Path, cert: Path, key: Path, ca: Path, threads: int) -> str:
    includes = "\n".join(
        f"include {SCHEMA_DIR / name}.schema" for name in ("core", "cosine", "inetorgperson")
    )
    return f"""\
# generated by bench/run.py
{includes}
modulepath {MODULE_PATH}
moduleload back_mdb
pidfile {workdir / "slapd.pid"}
argsfile {workdir / "slapd.args"}
loglevel 0
threads {threads}
sizelimit unlimited
TLSCACertificateFile {ca}
TLSCertificateFile {cert}
TLSCertificateKeyFile {key}
TLSVerifyClient never

database mdb
suffix "{SUFFIX}"
directory {workdir / "db"}
maxsize 1073741824
index objectClass eq
index uid eq

# The root DSE (read by the proxy's pool health checks) and the schema are public.
access to dn.base="" by * read
access to dn.base="cn=Subschema" by * read
access to attrs=userPassword
    by self write
    by anonymous auth
    by * none
access to dn.subtree="{PEOPLE}"
    by users read
    by * none
access to *
    by users read
    by * none
"""


def find_sbin(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/sbin")
    if not found:
        raise SystemExit(f"bench: {name} not found: install Debian's slapd (make system-deps)")
    return found


def start_slapd(
    workdir: Path, ca: CertificateAuthority, settings: Settings
) -> tuple[Child, int, int]:
    tls_dir = workdir / "tls"
    cert, key = ca.issue(
        "localhost", dns_names=["localhost"], ip_addresses=[LOOPBACK], key_type=settings.key_type
    ).write(tls_dir, "slapd")
    conf = workdir / "slapd.conf"
    conf.write_text(slapd_conf(workdir, cert, key, tls_dir / "ca.pem", settings.slapd_threads))
    (workdir / "db").mkdir(mode=0o700)
    ldif = workdir / "people.ldif"
    started = time.monotonic()
    with ldif.open("w") as f:
        f.writelines(entry + "\n" for entry in people_ldif(settings.users))
    result = subprocess.run(
        [find_sbin("slapadd"), "-q", "-f", str(conf), "-l", str(ldif)],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    if result.returncode != 0:
        raise RuntimeError(f"slapadd failed ({result.returncode}): {result.stderr.strip()}")
    print(
        f"bench: loaded {settings.users} users into slapd in {time.monotonic() - started:.1f} s",
        file=sys.stderr,
    )
    port, tls_port = free_ports(2)
    urls = f"ldap://{LOOPBACK}:{port}/ ldaps://{LOOPBACK}:{tls_port}/"
    child = Child(
        "slapd", [find_sbin("slapd"), "-f", str(conf), "-h", urls, "-d", "0"], workdir / "slapd.log"
    )
    return child, port, tls_port


# -- ldapproxy -------------------------------------------------------------------------


def proxy_toml(
    workdir: Path, plain_port: int, stls_port: int, upstream_port: int, settings: Settings
) -> str:
    tls_dir = workdir / "tls"
    return f"""\
# generated by bench/run.py
[[listener]]
name = "plain"
endpoint = 'tcp:{plain_port}:interface={LOOPBACK}'
tls = "none"

[[listener]]
name = "starttls"
endpoint = 'tcp:{stls_port}:interface={LOOPBACK}'
tls = "starttls-optional"

[tls]
certificate = "{tls_dir / "proxy.pem"}"
private_key = "{tls_dir / "proxy.key"}"

[upstream]
urls = ["ldaps://{LOOPBACK}:{upstream_port}"]
ca_file = "{tls_dir / "ca.pem"}"

[pool]
min_idle = {settings.pool_min_idle}
max_size = {settings.pool_max_size}
""" + (_PLUGINS.format(audit=workdir / "audit.jsonl") if settings.plugins else "")


#: BENCH_PLUGINS=all: every bundled plugin, as an operator would run them.
_PLUGINS = """
[[plugin]]
use = "allowlist"
rules = [{{ networks = ["127.0.0.0/8"] }}]

[[plugin]]
use = "bind_guard"
max_failures_per_ip = 1000000

[[plugin]]
use = "audit"
path = "{audit}"
"""


def start_proxy(
    workdir: Path, ca: CertificateAuthority, upstream_port: int, settings: Settings
) -> tuple[Child, int, int]:
    ca.issue("ldapproxy bench", dns_names=["localhost"], ip_addresses=[LOOPBACK]).write(
        workdir / "tls", "proxy"
    )
    plain_port, stls_port = free_ports(2)
    config = workdir / "ldapproxy.toml"
    config.write_text(proxy_toml(workdir, plain_port, stls_port, upstream_port, settings))
    executable = Path(sys.executable).parent / "ldapproxy"
    if executable.exists():
        argv = [str(executable)]
    else:
        argv = [
            sys.executable,
            "-c",
            "import sys; from ldapproxy.cli import main; main(sys.argv[1:])",
        ]
    child = Child("ldapproxy", [*argv, "run", "-c", str(config)], workdir / "ldapproxy.log")
    return child, plain_port, stls_port


# -- load generator runs ---------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str
    url: str
    starttls: bool = False
    via_proxy: bool = False


@dataclass
class Cell:
    """One loadgen run: one scenario against one target in one round."""

    scenario: str
    target: str
    round: int
    ops: int = 0
    ops_per_s: float = 0.0
    errors: int = 0
    first_error: str = ""
    p50_us: float = 0.0
    p90_us: float = 0.0
    p99_us: float = 0.0
    window_s: float = 0.0
    loadgen_cpu_s: float = 0.0
    slapd_cpu_s: float = 0.0
    proxy_cpu_s: float = 0.0
    #: The part of proxy_cpu_s spent in the kernel (stime: syscalls, loopback TCP).
    proxy_sys_s: float = 0.0
    machine_busy_cores: float = 0.0
    #: Interrupt and softirq time of the whole machine (loopback networking, mostly).
    irq_cores: float = 0.0
    #: [["PID command", cores], ...]: the busiest other processes in the window.
    other_processes: list[Any] = field(default_factory=list)
    loadgen_saturated: bool = False
    complete: bool = True
    exit_status: int = 0
    raw: dict[str, Any] = field(default_factory=dict)

    def cores(self, cpu_s: float) -> float:
        return cpu_s / self.window_s if self.window_s > 0 else 0.0

    @property
    def other_cores(self) -> float:
        own = self.loadgen_cpu_s + self.slapd_cpu_s + self.proxy_cpu_s
        return max(0.0, self.machine_busy_cores - self.cores(own))


def loadgen_args(scenario: str, settings: Settings) -> list[str]:
    args = ["-c", str(settings.conns)]
    if scenario == "search":
        args += ["-d", str(settings.depth)]
    if scenario == "short":
        args += ["-S", "sub"]
    return args


class Bench:
    def __init__(
        self,
        loadgen: Path,
        settings: Settings,
        ca_file: Path,
        slapd: Child,
        proxy: Child,
        workdir: Path,
    ) -> None:
        self.loadgen = loadgen
        self.settings = settings
        self.ca_file = ca_file
        self.slapd = slapd
        self.proxy = proxy
        self.workdir = workdir
        self.running: Child | None = None
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("LDAP")}
        self.env["LDAPNOINIT"] = "1"  # no ldap.conf, no ~/.ldaprc: only our options

    def command(
        self, scenario: str, target: Target, seconds: float, warmup: float, conns: int | None = None
    ) -> list[str]:
        argv = [
            str(self.loadgen),
            scenario,
            "-H",
            target.url,
            "-t",
            f"{seconds:g}",
            "-w",
            f"{warmup:g}",
            "-n",
            str(self.settings.users),
            "-b",
            PEOPLE,
            "-p",
            PASSWORD_PREFIX,
            "-C",
            str(self.ca_file),
            "-l",
            target.name,
            *loadgen_args(scenario, self.settings),
        ]
        if conns is not None:
            argv[argv.index("-c") + 1] = str(conns)
        if target.starttls:
            argv.append("-Z")
        return argv

    def sample(self) -> dict[str, Any]:
        busy, total, irq = machine_ticks()
        return {
            "t": time.monotonic(),
            "slapd": cpu_ticks(self.slapd.pid),
            "proxy": cpu_ticks(self.proxy.pid),
            "busy": busy,
            "total": total,
            "irq": irq,
            "all": all_process_ticks(),
        }

    def others(self, start: dict[str, Any], end: dict[str, Any], mine: set[int]) -> list[Any]:
        """The other processes that used at least 0.05 cores in the window, busiest first."""
        window = end["t"] - start["t"]
        used = [
            (ticks - start["all"].get(pid, ticks), pid)
            for pid, ticks in end["all"].items()
            if pid not in mine and pid in start["all"]
        ]
        return [
            [describe_process(pid), round(delta / HZ / window, 2)]
            for delta, pid in sorted(used, reverse=True)[:3]
            if delta / HZ / window >= 0.05
        ]

    def run(
        self,
        scenario: str,
        target: Target,
        round_: int,
        seconds: float,
        warmup: float,
        conns: int | None = None,
    ) -> Cell:
        for child in (self.slapd, self.proxy):
            if not child.alive():
                raise RuntimeError(
                    f"{child.name} exited (status {child.popen.returncode}); see {child.log}"
                )
        cell = Cell(scenario, target.name, round_)
        err_log = self.workdir / f"loadgen-{scenario}-{target.name}-{round_}.err"
        child = Child(
            "loadgen",
            self.command(scenario, target, seconds, warmup, conns),
            err_log,
            stdout=subprocess.PIPE,
            env=self.env,
            text=True,
        )
        self.running = child
        start = end = None
        result: dict[str, Any] | None = None
        try:
            assert child.popen.stdout is not None
            for line in child.popen.stdout:
                if line.startswith("#window-start"):
                    start = self.sample()
                elif line.startswith("#window-end"):
                    end = self.sample()
                elif line.startswith("{"):
                    result = json.loads(line)
            cell.exit_status = child.popen.wait(timeout=seconds + warmup + 60)
        finally:
            child.stop()
            self.running = None
        if result is None or start is None or end is None:
            text = err_log.read_text(errors="replace").strip()
            raise RuntimeError(f"loadgen gave no result (status {cell.exit_status}): {text}")
        cell.raw = result
        cell.ops = int(result["ops"])
        cell.ops_per_s = float(result["ops_per_s"])
        cell.errors = int(result["errors"])
        cell.first_error = result.get("first_error", "")
        cell.complete = bool(result.get("complete", True))
        cell.p50_us = float(result["lat_us"]["p50"])
        cell.p90_us = float(result["lat_us"]["p90"])
        cell.p99_us = float(result["lat_us"]["p99"])
        cell.window_s = end["t"] - start["t"]
        cell.loadgen_cpu_s = float(result["cpu_s"])
        cell.slapd_cpu_s = (sum(end["slapd"]) - sum(start["slapd"])) / HZ
        cell.proxy_cpu_s = (sum(end["proxy"]) - sum(start["proxy"])) / HZ
        cell.proxy_sys_s = (end["proxy"][1] - start["proxy"][1]) / HZ
        jiffies = max(1, end["total"] - start["total"])
        cell.machine_busy_cores = NCPU * (end["busy"] - start["busy"]) / jiffies
        cell.irq_cores = NCPU * (end["irq"] - start["irq"]) / jiffies
        cell.other_processes = self.others(
            start, end, {self.slapd.pid, self.proxy.pid, child.pid, os.getpid()}
        )
        threads = conns if conns is not None else self.settings.conns
        cell.loadgen_saturated = cell.cores(cell.loadgen_cpu_s) > 0.9 * min(threads, NCPU)
        return cell


# -- report ----------------------------------------------------------------------------


@dataclass
class Row:
    scenario: str
    target: str
    rounds: int
    ops_per_s: float
    ops_per_s_min: float
    ops_per_s_max: float
    vs_ldap: float | None
    vs_ldaps: float | None
    p50_us: float
    p99_us: float
    errors: int
    proxy_cpu_s_per_1k: float | None
    proxy_sys_share: float | None
    cores: dict[str, float]
    loadgen_saturated_rounds: int


def paired_ratio(cells: list[Cell], reference: list[Cell]) -> float | None:
    """Median over rounds of (this target / reference), each round's cells side by side."""
    by_round = {c.round: c.ops_per_s for c in reference}
    ratios = [c.ops_per_s / by_round[c.round] for c in cells if by_round.get(c.round)]
    return statistics.median(ratios) if ratios else None


def summarize(cells: list[Cell], targets: dict[str, Target]) -> list[Row]:
    rows = []
    scenarios = list(dict.fromkeys(c.scenario for c in cells))
    for scenario in scenarios:
        mine = [c for c in cells if c.scenario == scenario]
        names = list(dict.fromkeys(c.target for c in mine))
        groups = {name: [c for c in mine if c.target == name] for name in names}
        for name in names:
            group = groups[name]
            rate = [c.ops_per_s for c in group]
            ops = sum(c.ops for c in group)
            proxy_cpu = sum(c.proxy_cpu_s for c in group)
            proxy_sys = sum(c.proxy_sys_s for c in group)
            via_proxy = targets[name].via_proxy
            rows.append(
                Row(
                    scenario=scenario,
                    target=name,
                    rounds=len(group),
                    ops_per_s=statistics.median(rate),
                    ops_per_s_min=min(rate),
                    ops_per_s_max=max(rate),
                    vs_ldap=paired_ratio(group, groups.get("ldap", [])),
                    vs_ldaps=paired_ratio(group, groups["ldaps"]) if "ldaps" in groups else None,
                    p50_us=statistics.median(c.p50_us for c in group),
                    p99_us=statistics.median(c.p99_us for c in group),
                    errors=sum(c.errors for c in group),
                    proxy_cpu_s_per_1k=1000 * proxy_cpu / ops if via_proxy and ops else None,
                    proxy_sys_share=proxy_sys / proxy_cpu if via_proxy and proxy_cpu else None,
                    cores={
                        "loadgen": statistics.median(c.cores(c.loadgen_cpu_s) for c in group),
                        "slapd": statistics.median(c.cores(c.slapd_cpu_s) for c in group),
                        "proxy": statistics.median(c.cores(c.proxy_cpu_s) for c in group),
                        "other": statistics.median(c.other_cores for c in group),
                        "machine": statistics.median(c.machine_busy_cores for c in group),
                    },
                    loadgen_saturated_rounds=sum(c.loadgen_saturated for c in group),
                )
            )
    return rows


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def render(rows: list[Row]) -> str:
    header = [
        "scenario",
        "target",
        "ops/s",
        "vs ldap",
        "vs ldaps",
        "p50 us",
        "p99 us",
        "errors",
        "proxy CPU s/1k ops",
        "cores loadgen/slapd/proxy/other",
    ]
    lines = [header]
    for r in rows:
        c = r.cores
        lines.append(
            [
                r.scenario,
                r.target,
                f"{r.ops_per_s:,.0f}",
                _ratio(r.vs_ldap),
                _ratio(r.vs_ldaps),
                f"{r.p50_us:,.0f}",
                f"{r.p99_us:,.0f}",
                str(r.errors),
                "-"
                if r.proxy_cpu_s_per_1k is None
                else f"{r.proxy_cpu_s_per_1k:.3f} ({100 * (r.proxy_sys_share or 0):.0f}% sys)",
                f"{c['loadgen']:.2f}/{c['slapd']:.2f}/{c['proxy']:.2f}/{c['other']:.2f}",
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    numeric = {2, 3, 4, 5, 6, 7, 8}
    out = []
    for n, line in enumerate(lines):
        cells = [
            text.rjust(widths[i]) if i in numeric and n else text.ljust(widths[i])
            for i, text in enumerate(line)
        ]
        out.append("  ".join(cells).rstrip())
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def notes(rows: list[Row], cells: list[Cell], settings: Settings) -> list[str]:
    lines = []
    for r in rows:
        if r.loadgen_saturated_rounds:
            lines.append(
                f"WARNING: {r.scenario}/{r.target}: the load generator used more than 90% of the "
                f"{min(settings.conns, NCPU)} core(s) it can use in {r.loadgen_saturated_rounds} "
                f"of {r.rounds} round(s): it may have been the bottleneck"
            )
        if r.errors:
            first = next(
                c.first_error
                for c in cells
                if c.scenario == r.scenario and c.target == r.target and c.errors
            )
            lines.append(f"ERRORS: {r.scenario}/{r.target}: {r.errors} error(s), first: {first}")
        if r.cores["proxy"] >= 0.8:
            lines.append(
                f"note: {r.scenario}/{r.target}: the proxy used {r.cores['proxy']:.2f} cores; it "
                "is one Python thread, so it was (nearly) the bottleneck"
            )
        elif r.cores["machine"] >= 0.9 * NCPU:
            heaviest = max(("loadgen", "slapd", "proxy", "other"), key=lambda k: r.cores[k])
            lines.append(
                f"note: {r.scenario}/{r.target}: the machine was {r.cores['machine']:.2f}/{NCPU} "
                f"cores busy (CPU-bound; the largest share: {heaviest} "
                f"{r.cores[heaviest]:.2f})"
            )
    busiest: dict[str, list[float]] = {}
    for cell in cells:
        for what, cores in cell.other_processes:
            busiest.setdefault(what, []).append(cores)
    if busiest:
        top = sorted(busiest.items(), key=lambda kv: -sum(kv[1]))[:3]
        listed = "; ".join(
            f"{what} (in {len(v)}/{len(cells)} cells, up to {max(v):.2f} cores)" for what, v in top
        )
        lines.append(f"other processes busy during the run: {listed}")
    if cells:
        irq = statistics.median(c.irq_cores for c in cells)
        lines.append(f"interrupts + softirq (loopback TCP, counted in 'other'): {irq:.2f} cores")
    short = {r.target: r for r in rows if r.scenario == "short"}
    if "proxy" in short and "ldaps" in short and short["proxy"].vs_ldaps is not None:
        ratio = short["proxy"].vs_ldaps
        verdict = "meets" if ratio >= 5 else "MISSES"
        lines.append(
            f"short sessions via the proxy (plain clients) = {ratio:.2f}x direct ldaps: "
            f"{verdict} the >= 5x target of the pool"
        )
    return lines


# -- main ------------------------------------------------------------------------------


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loadgen", type=Path, default=BENCH_DIR / "build" / "loadgen")
    parser.add_argument("--results", type=Path, default=BENCH_DIR / "results")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    if not os.access(args.loadgen, os.X_OK):
        raise SystemExit(f"bench: {args.loadgen} missing: build it with `make bench`")
    signal.signal(signal.SIGTERM, _interrupt)

    workdir = Path(tempfile.mkdtemp(prefix="ldapproxy-bench-"))
    children: list[Child] = []
    bench: Bench | None = None
    succeeded = False
    try:
        ca = CertificateAuthority.generate("ldapproxy bench CA")
        ca_file = ca.write_certificate(workdir / "tls" / "ca.pem")
        slapd, port, tls_port = start_slapd(workdir, ca, settings)
        children.append(slapd)
        wait_for_ports(slapd, [port, tls_port])
        proxy, plain_port, stls_port = start_proxy(workdir, ca, tls_port, settings)
        children.append(proxy)
        wait_for_ports(proxy, [plain_port, stls_port])
        targets = {
            "ldap": Target("ldap", f"ldap://{LOOPBACK}:{port}"),
            "ldaps": Target("ldaps", f"ldaps://{LOOPBACK}:{tls_port}"),
            "proxy": Target("proxy", f"ldap://{LOOPBACK}:{plain_port}", via_proxy=True),
            "proxy-starttls": Target(
                "proxy-starttls", f"ldap://{LOOPBACK}:{stls_port}", starttls=True, via_proxy=True
            ),
        }
        bench = Bench(args.loadgen, settings, ca_file, slapd, proxy, workdir)

        # Smoke test: every target answers a whole short session with no error.
        for target in targets.values():
            cell = bench.run("short", target, 0, seconds=0.5, warmup=0.2, conns=1)
            if cell.errors or not cell.ops:
                raise RuntimeError(
                    f"smoke test against {target.name} ({target.url}) failed: "
                    f"{cell.ops} ops, {cell.errors} errors: {cell.first_error}"
                )

        plan = [
            (scenario, SHORT_TARGETS if scenario == "short" else PERSISTENT_TARGETS)
            for scenario in settings.scenarios
        ]
        total = sum(len(t) for _, t in plan) * settings.rounds
        print(
            f"bench: {total} cells of {settings.warmup:g}+{settings.seconds:g} s, "
            f"{settings.conns} connections, {settings.users} users, {NCPU} CPUs, "
            f"upstream certificate {'RSA-2048' if settings.key_type == 'rsa' else 'ECDSA P-256'}",
            file=sys.stderr,
        )
        cells: list[Cell] = []
        for scenario, names in plan:
            for round_ in range(1, settings.rounds + 1):
                shift = (round_ - 1) % len(names)
                for name in names[shift:] + names[:shift]:  # rotate the order every round
                    cell = bench.run(
                        scenario, targets[name], round_, settings.seconds, settings.warmup
                    )
                    cells.append(cell)
                    print(
                        f"  {scenario:6s} r{round_} {name:15s} {cell.ops_per_s:10,.0f} ops/s "
                        f"err={cell.errors} p50={cell.p50_us:,.0f}us p99={cell.p99_us:,.0f}us "
                        f"cores lg/slapd/proxy={cell.cores(cell.loadgen_cpu_s):.2f}/"
                        f"{cell.cores(cell.slapd_cpu_s):.2f}/{cell.cores(cell.proxy_cpu_s):.2f}",
                        file=sys.stderr,
                    )

        rows = summarize(cells, targets)
        print()
        print(
            f"ldapproxy {__version__} bench: median of {settings.rounds} rounds of "
            f"{settings.seconds:g} s per cell, {settings.conns} connections "
            f"(search depth {settings.depth}), {settings.users} users, {NCPU} CPUs"
        )
        print(render(rows))
        print()
        for name in SHORT_TARGETS:
            print(f"  {name:15s} {TARGET_HELP[name]}")
        print(
            "  ratios: median over rounds of target/reference measured in the same round; "
            "cores: CPU seconds per second in the measured window"
        )
        for line in notes(rows, cells, settings):
            print(line)

        args.results.mkdir(parents=True, exist_ok=True)
        out = args.results / f"{time.strftime('%Y%m%dT%H%M%S')}.json"
        out.write_text(
            json.dumps(
                {
                    "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "host": {
                        "cpus": NCPU,
                        "platform": platform.platform(),
                        "python": platform.python_version(),
                    },
                    "ldapproxy_version": __version__,
                    "settings": asdict(settings),
                    "targets": {k: asdict(v) for k, v in targets.items()},
                    "summary": [asdict(r) for r in rows],
                    "cells": [asdict(c) for c in cells],
                },
                indent=1,
            )
            + "\n"
        )
        print(f"results: {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
        succeeded = True
        return 0
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as error:
        print(f"bench: error: {error}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if bench is not None and bench.running is not None:
            bench.running.stop()
        for child in reversed(children):
            child.stop()
        if succeeded and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"bench: work directory and logs kept in {workdir}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
