"""``make bench``: direct slapd against ldapproxy, side by side, in one run.

Starts its own slapd (mdb, ``ldap://`` and ``ldaps://`` on free 127.0.0.1 ports, an ECDSA
P-256 certificate from :class:`ldapproxy.pki.CertificateAuthority`, ``BENCH_USERS`` users)
and one ``ldapproxy run`` in front of it (a plain listener and a ``starttls-optional``
listener, pooled LDAPS upstream), then runs each scenario against each target in
alternation, round after round: ``bench/build/loadgen`` for the throughput and latency
scenarios, this script itself for the memory ones (``idle``, ``slowclient``).  It prints one
table of ratios, one of memory, and the performance targets with PASS/MISS.  Every process
it starts is stopped by its PID at the end, also on errors and Ctrl-C.  See bench/README.rst.

Knobs (environment): BENCH_USERS=10000 BENCH_SECONDS=3 BENCH_WARMUP=0.5 BENCH_ROUNDS=2
BENCH_CONNS=8 BENCH_DEPTH=4
BENCH_SCENARIOS="short search bind latency idle bigsearch slowclient" BENCH_SLAPD_THREADS=8
BENCH_POOL_MIN_IDLE=16 BENCH_KEY=ec (the upstream certificate: ec = ECDSA P-256, rsa = RSA-2048)
BENCH_PLUGINS=none BENCH_IDLE_CONNS=10000 BENCH_SLOW_CHUNK=65536 BENCH_SLOW_INTERVAL=0.05
BENCH_SLOW_SEARCHES (default: enough searches for every user for 50 MB of answers).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ctypes
import dataclasses
import errno
import hashlib
import json
import os
import platform
import resource
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

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
#: "search" also runs against a second proxy with two workers, to show how throughput
#: grows from one worker to two in the same run.
SEARCH_TARGETS = ("ldap", "proxy", "proxy-2w")
#: The workers of the "proxy-2w" target.
SCALED_WORKERS = 2

#: Every scenario, in the default order.  ``idle`` runs before the big-result scenarios so
#: that the buffers they free in the proxy do not hide the memory idle sessions take.
SCENARIOS = ("short", "search", "bind", "latency", "idle", "bigsearch", "slowclient")
#: The loadgen mode of each scenario it runs; the others are run by this script.
LOADGEN_MODE = {
    "short": "short",
    "search": "search",
    "bind": "bind",
    "latency": "search",
    "bigsearch": "bigsearch",
}
MEMORY_SCENARIOS = ("idle", "slowclient")
#: slowclient sends enough searches for every user to get at least this many bytes back by
#: default: more than the 32 MiB target plus what the kernel's socket buffers can hold
#: (net.ipv4.tcp_wmem's maximum, 4 MiB by default, and the client's receive buffer) plus
#: what is read in the slow phase, so a proxy that buffered without bound would miss it.
SLOW_RESULT_BYTES = 50_000_000
#: The size of one user's SearchResultEntry with the attributes people_ldif gives it,
#: approximately (userPassword is not readable).
ENTRY_BYTES = 220
#: The slowclient target: the proxy's peak RSS growth, in MiB.
SLOW_LIMIT_MIB = 32
TARGET_HELP = {
    "ldap": "direct ldap:// to slapd (plaintext: the limit of this machine)",
    "ldaps": "direct ldaps:// to slapd (a TLS handshake per connection)",
    "proxy": "plain clients -> ldapproxy (tls none) -> pooled ldaps:// upstream",
    "proxy-starttls": "StartTLS clients (-Z) -> ldapproxy (starttls-optional) -> pooled ldaps://",
    "proxy-2w": f"as proxy, a second instance with [process] workers = {SCALED_WORKERS}",
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


def _scenarios() -> tuple[str, ...]:
    raw = os.environ.get("BENCH_SCENARIOS", "").split()
    if not raw or raw == ["all"]:
        return SCENARIOS
    unknown = sorted(set(raw) - set(SCENARIOS))
    if unknown:
        raise SystemExit(f"bench: BENCH_SCENARIOS: unknown {unknown}; use {' '.join(SCENARIOS)}")
    return tuple(dict.fromkeys(raw))


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
    #: BENCH_WORKERS: ``[process] workers`` of the proxy (1: no supervisor).
    workers: int = 1
    #: idle: how many client connections are held open at once.
    idle_conns: int = 10000
    #: slowclient: read at most slow_chunk bytes every slow_interval seconds.
    slow_chunk: int = 65536
    slow_interval: float = 0.05
    #: slowclient: how many searches for every user it sends at once (pipelined).
    slow_searches: int = 1

    @classmethod
    def from_env(cls) -> Settings:
        users = _env_number("BENCH_USERS", 10000)
        return cls(
            users=users,
            seconds=_env_number("BENCH_SECONDS", 3.0, float),
            warmup=_env_number("BENCH_WARMUP", 0.5, float, zero_ok=True),
            rounds=_env_number("BENCH_ROUNDS", 2),
            conns=_env_number("BENCH_CONNS", 8),
            depth=_env_number("BENCH_DEPTH", 4),
            scenarios=_scenarios(),
            slapd_threads=_env_number("BENCH_SLAPD_THREADS", 8),
            key_type=_key_type(),
            pool_min_idle=_env_number("BENCH_POOL_MIN_IDLE", 16),
            plugins=_plugins(),
            workers=_env_number("BENCH_WORKERS", 1),
            idle_conns=_env_number("BENCH_IDLE_CONNS", 10000),
            slow_chunk=_env_number("BENCH_SLOW_CHUNK", 65536),
            slow_interval=_env_number("BENCH_SLOW_INTERVAL", 0.05, float),
            slow_searches=_env_number(
                "BENCH_SLOW_SEARCHES", -(-SLOW_RESULT_BYTES // (users * ENTRY_BYTES))
            ),
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


def family(pid: int) -> set[int]:
    """A process and all its live descendants (the proxy's workers)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    members, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, ppid in parents.items():
            if ppid == parent and child not in members:
                members.add(child)
                frontier.append(child)
    return members


def tree_ticks(pid: int) -> tuple[int, int]:
    """(utime, stime) of a process and all its live descendants (the proxy's workers)."""
    user = system = 0
    for member in family(pid):
        try:
            u, s = cpu_ticks(member)
        except OSError:
            continue
        user, system = user + u, system + s
    return user, system


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


def rss_kib(pid: int) -> int:
    """The resident set size of a process (VmRSS of /proc/PID/status), in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def accepted_connections(pid: int, port: int) -> int:
    """How many established TCP connections to local *port* process *pid* holds an fd of:
    the connections it has accepted (not those still waiting in its listen queue)."""
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    for name in os.listdir(fd_dir):
        with contextlib.suppress(OSError):
            link = os.readlink(f"{fd_dir}/{name}")
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    wanted = f":{port:04X}"
    count = 0
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            fields = line.split(None, 10)
            # sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode
            if fields[3] == "01" and fields[1].endswith(wanted) and fields[9] in inodes:
                count += 1
    return count


def wait_quiet(pid: int, timeout: float = 3.0, step: float = 0.1) -> None:
    """Wait (at most *timeout*) until a process used no CPU for *step* seconds."""
    deadline = time.monotonic() + timeout
    last = sum(cpu_ticks(pid))
    while time.monotonic() < deadline:
        time.sleep(step)
        now = sum(cpu_ticks(pid))
        if now == last:
            return
        last = now


def raise_open_files(needed: int) -> int:
    """Raise RLIMIT_NOFILE to *needed* for this process and the children it starts later
    (root may raise the hard limit too); the soft limit in force afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, max(hard, needed)))
    except (ValueError, OSError):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


# -- a minimal LDAP client for the memory scenarios ---------------------------------------


def _ber(tag: int, content: bytes) -> bytes:
    size = len(content)
    if size < 0x80:
        return bytes((tag, size)) + content
    raw = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes((tag, 0x80 | len(raw))) + raw + content


def _ber_int(value: int, tag: int = 0x02) -> bytes:
    return _ber(tag, value.to_bytes(value.bit_length() // 8 + 1, "big", signed=True))


def _ldap_message(message_id: int, op: bytes) -> bytes:
    return _ber(0x30, _ber_int(message_id) + op)


def simple_bind_request(message_id: int, dn: str, password: str) -> bytes:
    body = _ber_int(3) + _ber(0x04, dn.encode()) + _ber(0x80, password.encode())
    return _ldap_message(message_id, _ber(0x60, body))


def search_request(message_id: int, base: str, attribute: str, value: str) -> bytes:
    """A subtree search (attribute=value) for all user attributes, no limits."""
    body = (
        _ber(0x04, base.encode())
        + _ber_int(2, 0x0A)  # wholeSubtree
        + _ber_int(0, 0x0A)  # neverDerefAliases
        + _ber_int(0)  # sizeLimit
        + _ber_int(0)  # timeLimit
        + _ber(0x01, b"\x00")  # typesOnly FALSE
        + _ber(0xA3, _ber(0x04, attribute.encode()) + _ber(0x04, value.encode()))
        + _ber(0x30, b"")  # all user attributes
    )
    return _ldap_message(message_id, _ber(0x63, body))


def anonymous_bind(sock: socket.socket, timeout: float = 5.0) -> str | None:
    """Do an anonymous simple bind on a connected socket: None if it succeeded, else why."""
    sock.settimeout(timeout)
    buf = bytearray()
    try:
        sock.sendall(simple_bind_request(1, "", ""))
        while True:
            data = sock.recv(4096)
            if not data:
                return "connection closed"
            buf += data
            for _, op, code in split_messages(buf):
                return None if (op, code) == (BIND_RESPONSE, 0) else f"op 0x{op:02x} code {code}"
    except (OSError, ValueError) as error:
        return repr(error)


UNBIND_REQUEST = _ldap_message(0x7FFFFFFF, b"\x42\x00")
SEARCH_RESULT_ENTRY, SEARCH_RESULT_DONE, BIND_RESPONSE = 0x64, 0x65, 0x61


def _tl(buf: bytes | bytearray, pos: int) -> tuple[int, int, int] | None:
    """(tag, length, start of content) of the TLV at *pos*, or None if incomplete."""
    if len(buf) < pos + 2:
        return None
    tag, first = buf[pos], buf[pos + 1]
    if first < 0x80:
        return tag, first, pos + 2
    count = first & 0x7F
    if len(buf) < pos + 2 + count:
        return None
    return tag, int.from_bytes(buf[pos + 2 : pos + 2 + count], "big"), pos + 2 + count


def split_messages(buf: bytearray) -> list[tuple[int, int, int]]:
    """Remove the complete LDAP messages at the start of *buf*: [(message ID, protocolOp
    tag, result code or -1)], the result code read for BindResponse and SearchResultDone.
    ValueError if a complete message is malformed."""
    out = []
    pos = 0
    while True:
        outer = _tl(buf, pos)
        if outer is None or outer[2] + outer[1] > len(buf):
            break
        _, length, start = outer
        end = start + length
        msgid = _tl(buf, start)
        op = _tl(buf, msgid[2] + msgid[1]) if msgid else None
        if msgid is None or op is None or op[2] > end:
            raise ValueError(f"malformed LDAP message at offset {pos}")
        message_id = int.from_bytes(buf[msgid[2] : msgid[2] + msgid[1]], "big")
        code = -1
        if op[0] in (BIND_RESPONSE, SEARCH_RESULT_DONE):
            result = _tl(buf, op[2])
            if result is None or result[0] != 0x0A or result[2] + result[1] > end:
                raise ValueError(f"malformed LDAP result at offset {pos}")
            code = int.from_bytes(buf[result[2] : result[2] + result[1]], "big")
        out.append((message_id, op[0], code))
        pos = end
    del buf[:pos]
    return out


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

[process]
workers = {settings.workers}

[limits]
# idle holds BENCH_IDLE_CONNS connections that send nothing until RSS is read.
max_connections = {settings.idle_conns + 1000}
first_request_timeout = 600
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
    ca.write_certificate(workdir / "tls" / "ca.pem")  # the upstream's CA, in its [upstream]
    plain_port, stls_port = free_ports(2)
    config = workdir / "ldapproxy.toml"
    config.write_text(proxy_toml(workdir, plain_port, stls_port, upstream_port, settings))
    return launch_proxy(config), plain_port, stls_port


def launch_proxy(config: Path) -> Child:
    """``ldapproxy run`` with *config*, its output appended to ldapproxy.log beside it."""
    executable = Path(sys.executable).parent / "ldapproxy"
    if executable.exists():
        argv = [str(executable)]
    else:
        argv = [
            sys.executable,
            "-c",
            "import sys; from ldapproxy.cli import main; main(sys.argv[1:])",
        ]
    return Child("ldapproxy", [*argv, "run", "-c", str(config)], config.parent / "ldapproxy.log")


# -- load generator runs ---------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str
    url: str
    starttls: bool = False
    via_proxy: bool = False
    #: The proxy instance behind the target: "proxy", or "proxy-2w" (the two workers).
    instance: str = "proxy"


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
    #: Threads (= connections) of the load generator: the cores it could use at most.
    loadgen_threads: int = 0
    #: Bytes of LDAP responses the load generator received in the window (persistent
    #: connections only), per second in mb_per_s (1 MB = 10^6 bytes).
    rx_bytes: int = 0
    mb_per_s: float = 0.0
    complete: bool = True
    exit_status: int = 0
    #: idle, slowclient: the process whose memory was measured (slapd or ldapproxy).
    measured_process: str = ""
    #: idle: connections held open at once; slowclient: 1.
    connections: int = 0
    #: VmRSS in KiB: before; with every connection open (idle) or the peak (slowclient).
    rss_before_kib: int = 0
    rss_after_kib: int = 0
    rss_growth_kib: int = 0
    rss_per_conn_kib: float | None = None
    #: slowclient: the bytes and entries of the results read (slow_bytes of them in the
    #: slow phase), and the RSS samples taken.
    result_bytes: int = 0
    slow_bytes: int = 0
    entries: int = 0
    rss_samples: int = 0
    raw: dict[str, Any] = field(default_factory=dict)

    def cores(self, cpu_s: float) -> float:
        return cpu_s / self.window_s if self.window_s > 0 else 0.0

    @property
    def other_cores(self) -> float:
        own = self.loadgen_cpu_s + self.slapd_cpu_s + self.proxy_cpu_s
        return max(0.0, self.machine_busy_cores - self.cores(own))


def loadgen_args(scenario: str, settings: Settings) -> list[str]:
    if scenario == "latency":  # one connection, one search outstanding
        return ["-c", "1", "-d", "1"]
    if scenario == "bigsearch":  # one connection, one search for every user at a time
        return ["-c", "1", "-d", "1", "-T", "30"]
    args = ["-c", str(settings.conns)]
    if scenario == "search":
        args += ["-d", str(settings.depth)]
    if scenario == "short":
        args += ["-S", "sub"]
    return args


#: idle: at most this many connections opened and not yet accepted (the proxy listens with
#: Twisted's default backlog of 50; beyond it the kernel drops handshakes, to retry in 1 s).
IDLE_IN_FLIGHT = 40


class Bench:
    def __init__(
        self,
        loadgen: Path,
        settings: Settings,
        ca_file: Path,
        slapd: Child,
        proxy: Child,
        workdir: Path,
        proxy_ports: list[int],
        children: list[Child],
        scaled: Child | None = None,
    ) -> None:
        self.loadgen = loadgen
        self.settings = settings
        self.ca_file = ca_file
        self.slapd = slapd
        self.proxy = proxy
        #: The second proxy instance, with SCALED_WORKERS workers (when "search" runs).
        self.scaled = scaled
        self.workdir = workdir
        self.proxy_ports = proxy_ports
        #: Every process started, to stop at the end (fresh proxies are added).
        self.children = children
        self.running: Child | None = None
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("LDAP")}
        self.env["LDAPNOINIT"] = "1"  # no ldap.conf, no ~/.ldaprc: only our options

    def command(
        self, scenario: str, target: Target, seconds: float, warmup: float, conns: int | None = None
    ) -> list[str]:
        argv = [
            str(self.loadgen),
            LOADGEN_MODE[scenario],
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
            "proxy": tree_ticks(self.proxy.pid),
            "proxy-2w": tree_ticks(self.scaled.pid) if self.scaled else (0, 0),
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
        self._check_alive()
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
        instance = target.instance
        cell.proxy_cpu_s = (sum(end[instance]) - sum(start[instance])) / HZ
        cell.proxy_sys_s = (end[instance][1] - start[instance][1]) / HZ
        jiffies = max(1, end["total"] - start["total"])
        cell.machine_busy_cores = NCPU * (end["busy"] - start["busy"]) / jiffies
        cell.irq_cores = NCPU * (end["irq"] - start["irq"]) / jiffies
        mine = {self.slapd.pid, child.pid, os.getpid()} | family(self.proxy.pid)
        if self.scaled is not None:
            mine |= family(self.scaled.pid)
        cell.other_processes = self.others(start, end, mine)
        cell.rx_bytes = int(result.get("rx_bytes", 0))
        cell.mb_per_s = cell.rx_bytes / seconds / 1e6
        cell.loadgen_threads = int(result.get("conns", 1))
        cell.loadgen_saturated = cell.cores(cell.loadgen_cpu_s) > 0.9 * min(
            cell.loadgen_threads, NCPU
        )
        return cell

    # -- the memory scenarios, run by this script ----------------------------------------

    def _check_alive(self) -> None:
        for child in (self.slapd, self.proxy, *([self.scaled] if self.scaled else [])):
            if not child.alive():
                raise RuntimeError(
                    f"{child.name} exited (status {child.popen.returncode}); see {child.log}"
                )

    def fresh_proxy(self) -> None:
        """Replace the proxy with a new process (same configuration and ports), started
        and quiet: memory that earlier cells made it allocate and free cannot hide growth."""
        self.proxy.stop()
        self.proxy = launch_proxy(self.workdir / "ldapproxy.toml")
        self.children.append(self.proxy)
        wait_for_ports(self.proxy, self.proxy_ports)
        wait_quiet(self.proxy.pid)

    def _measured(self, target: Target) -> tuple[Child, tuple[str, int]]:
        split = urlsplit(target.url)
        if split.hostname is None or split.port is None:
            raise RuntimeError(f"no host and port in {target.url}")
        return (self.proxy if target.via_proxy else self.slapd), (split.hostname, split.port)

    def _fill_cpu(self, cell: Cell, start: dict[str, Any], end: dict[str, Any]) -> None:
        cell.window_s = end["t"] - start["t"]
        cell.slapd_cpu_s = (sum(end["slapd"]) - sum(start["slapd"])) / HZ
        cell.proxy_cpu_s = (sum(end["proxy"]) - sum(start["proxy"])) / HZ
        cell.proxy_sys_s = (end["proxy"][1] - start["proxy"][1]) / HZ
        jiffies = max(1, end["total"] - start["total"])
        cell.machine_busy_cores = NCPU * (end["busy"] - start["busy"]) / jiffies
        cell.irq_cores = NCPU * (end["irq"] - start["irq"]) / jiffies

    def run_idle(self, target: Target, round_: int) -> Cell:
        """Open ``idle_conns`` connections to *target* that send nothing, wait until its
        process has accepted every one, and read that process's RSS before and after."""
        self._check_alive()
        process, address = self._measured(target)
        pid, count = process.pid, self.settings.idle_conns
        cell = Cell("idle", target.name, round_, measured_process=process.name, connections=count)
        wait_quiet(pid)
        base_fds = fd_count(pid)
        base_accepted = accepted_connections(pid, address[1])  # other clients of the port
        cell.rss_before_kib = rss_kib(pid)
        socks: list[socket.socket] = []
        start = self.sample()
        try:
            deadline = time.monotonic() + 60
            while len(socks) < count and not cell.first_error:
                room = IDLE_IN_FLIGHT - (len(socks) - (fd_count(pid) - base_fds))
                room = min(room, count - len(socks))
                if room <= 0:
                    if time.monotonic() > deadline:
                        cell.first_error = f"{process.name} stopped accepting connections"
                    time.sleep(0.0005)
                    continue
                for _ in range(room):
                    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    socks.append(sock)
                    sock.setblocking(False)
                    # close with a RST: no TIME_WAIT left behind for 10,000 ports
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    code = sock.connect_ex(address)
                    if code not in (0, errno.EINPROGRESS):
                        cell.first_error = f"connect: {os.strerror(code)}"
                        break
            deadline = time.monotonic() + (30 if not cell.first_error else 0)
            while (accepted := accepted_connections(pid, address[1]) - base_accepted) < count:
                if time.monotonic() > deadline:
                    cell.first_error = cell.first_error or (
                        f"{process.name} accepted {accepted} of {count} connections"
                    )
                    break
                time.sleep(0.05)
            cell.errors = max(0, count - accepted)
            end = self.sample()
            wait_quiet(pid)
            cell.rss_after_kib = rss_kib(pid)
            # each connection still open on both sides: nothing to read, no EOF, no error
            poller = select.epoll()
            try:
                for sock in socks:
                    poller.register(sock, select.EPOLLIN | select.EPOLLRDHUP)
                broken = poller.poll(0, len(socks))
            finally:
                poller.close()
            if broken:
                cell.errors = min(count, cell.errors + len(broken))
                cell.first_error = cell.first_error or (
                    f"{len(broken)} idle connection(s) were closed or written to by {process.name}"
                )
            elif not cell.errors:
                # and served: an anonymous bind on the first, two middle and the last one
                for index in sorted({0, count // 3, 2 * count // 3, count - 1}):
                    problem = anonymous_bind(socks[index])
                    if problem:
                        cell.errors += 1
                        cell.first_error = cell.first_error or (
                            f"idle connection {index + 1}: anonymous bind: {problem}"
                        )
        finally:
            for sock in socks:
                sock.close()
        cell.ops = count - cell.errors
        cell.rss_growth_kib = cell.rss_after_kib - cell.rss_before_kib
        cell.rss_per_conn_kib = cell.rss_growth_kib / count
        self._fill_cpu(cell, start, end)
        # let the process see every connection go before the next cell
        deadline = time.monotonic() + 30
        while fd_count(pid) > base_fds + 8 and time.monotonic() < deadline:
            time.sleep(0.05)
        return cell

    def run_slowclient(self, target: Target, round_: int) -> Cell:
        """Bind, send ``slow_searches`` searches for every user at once, read the answers
        slowly for ``seconds`` (at most ``slow_chunk`` bytes every ``slow_interval``
        seconds, with a receive buffer of ``slow_chunk`` bytes), then read the rest as fast
        as it comes, checking that every search returned every user.  The RSS of the
        process behind *target* is sampled every 20 ms throughout; the growth is the peak
        minus the RSS just before the searches were sent."""
        self._check_alive()
        settings = self.settings
        process, address = self._measured(target)
        pid = process.pid
        cell = Cell("slowclient", target.name, round_, measured_process=process.name)
        cell.connections = 1
        buf = bytearray()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, settings.slow_chunk)
            sock.settimeout(10)
            sock.connect(address)
            sock.sendall(simple_bind_request(1, f"uid=user1,{PEOPLE}", PASSWORD_PREFIX + "1"))
            messages: list[tuple[int, int, int]] = []
            while not messages:
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("closed before the BindResponse")
                buf += data
                messages = split_messages(buf)
            if messages[0][1:] != (BIND_RESPONSE, 0):
                raise ConnectionError(f"bind failed: {messages[0]}")
            wait_quiet(pid)
            cell.rss_before_kib = peak = rss_kib(pid)
            samples = 1
            expected = settings.slow_searches * settings.users
            start = self.sample()
            sock.sendall(
                b"".join(
                    search_request(2 + i, PEOPLE, "objectClass", "inetOrgPerson")
                    for i in range(settings.slow_searches)
                )
            )
            sock.setblocking(False)
            t0 = time.monotonic()
            slow_until = t0 + settings.seconds
            deadline = slow_until + 60 + expected / 10000
            next_read = t0 + settings.slow_interval
            next_sample = t0 + 0.02
            done = 0
            while done < settings.slow_searches:
                now = time.monotonic()
                if now > deadline:
                    raise TimeoutError(f"result not read after {now - t0:.0f} s")
                if now >= next_sample:
                    peak = max(peak, rss_kib(pid))
                    samples += 1
                    next_sample = max(next_sample + 0.02, now)
                slow = now < slow_until
                if slow and now < next_read:
                    time.sleep(max(0.0, min(next_read, next_sample) - now))
                    continue
                if slow:
                    next_read += settings.slow_interval
                limit = settings.slow_chunk if slow else 1 << 20
                got = 0
                while got < limit:
                    try:
                        data = sock.recv(min(limit - got, 1 << 20))
                    except BlockingIOError:
                        break
                    if not data:
                        raise ConnectionError(f"{process.name} closed the connection")
                    got += len(data)
                    buf += data
                cell.result_bytes += got
                if slow:
                    cell.slow_bytes += got
                elif not got:
                    select.select([sock], [], [], max(0.0, next_sample - time.monotonic()))
                for _, op, code in split_messages(buf):
                    if op == SEARCH_RESULT_ENTRY:
                        cell.entries += 1
                    elif op == SEARCH_RESULT_DONE:
                        done += 1
                        if code != 0:
                            raise ConnectionError(f"search failed: result code {code}")
            end = self.sample()
            peak = max(peak, rss_kib(pid))
            cell.rss_samples = samples + 1
            self._fill_cpu(cell, start, end)
            if cell.entries != expected:
                cell.errors += 1
                cell.first_error = f"{cell.entries} entries instead of {expected}"
            else:
                cell.ops = settings.slow_searches
            cell.rss_after_kib = peak
            cell.rss_growth_kib = peak - cell.rss_before_kib
            with contextlib.suppress(OSError):
                sock.send(UNBIND_REQUEST)
        except (OSError, ValueError) as error:
            cell.errors += 1
            cell.first_error = f"slow client: {error!r}"
        finally:
            sock.close()
        cell.mb_per_s = cell.result_bytes / cell.window_s / 1e6 if cell.window_s else 0.0
        return cell


# -- report ----------------------------------------------------------------------------


@dataclass
class Row:
    """A throughput or latency scenario (loadgen) against one target, over the rounds."""

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
    loadgen_threads: int = 0
    #: Bytes of LDAP responses received per second, in MB (10^6 bytes), and vs direct ldap.
    mb_per_s: float = 0.0
    mb_vs_ldap: float | None = None
    #: The proxy's CPU time per op (per session for short), in µs.
    proxy_cpu_us_per_op: float | None = None
    #: This target's p50 minus direct ldap's p50 of the same round, median over rounds.
    added_p50_us: float | None = None


@dataclass
class MemoryRow:
    """A memory scenario (idle, slowclient) against one target, over the rounds."""

    scenario: str
    target: str
    process: str
    rounds: int
    connections: int
    rss_before_kib: float
    #: The worst (largest) over the rounds: see bench/README.rst.
    rss_growth_kib: int
    rss_per_conn_kib: float | None
    result_bytes: int
    slow_bytes: int
    entries: int
    errors: int
    first_error: str


def paired_ratio(
    cells: list[Cell], reference: list[Cell], key: Callable[[Cell], float] = lambda c: c.ops_per_s
) -> float | None:
    """Median over rounds of (this target / reference), each round's cells side by side."""
    by_round = {c.round: key(c) for c in reference}
    ratios = [key(c) / by_round[c.round] for c in cells if by_round.get(c.round)]
    return statistics.median(ratios) if ratios else None


def paired_difference(cells: list[Cell], reference: list[Cell]) -> float | None:
    """Median over rounds of (this target's p50 - the reference's p50), round by round."""
    by_round = {c.round: c.p50_us for c in reference if c.ops}
    diffs = [c.p50_us - by_round[c.round] for c in cells if c.ops and c.round in by_round]
    return statistics.median(diffs) if diffs else None


def summarize(cells: list[Cell], targets: dict[str, Target]) -> list[Row]:
    rows = []
    scenarios = list(dict.fromkeys(c.scenario for c in cells if c.scenario in LOADGEN_MODE))
    for scenario in scenarios:
        mine = [c for c in cells if c.scenario == scenario]
        names = list(dict.fromkeys(c.target for c in mine))
        groups = {name: [c for c in mine if c.target == name] for name in names}
        reference = groups.get("ldap", [])
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
                    vs_ldap=paired_ratio(group, reference),
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
                    loadgen_threads=max(c.loadgen_threads for c in group),
                    mb_per_s=statistics.median(c.mb_per_s for c in group),
                    mb_vs_ldap=paired_ratio(group, reference, lambda c: c.mb_per_s),
                    proxy_cpu_us_per_op=1e6 * proxy_cpu / ops if via_proxy and ops else None,
                    added_p50_us=paired_difference(group, reference),
                )
            )
    return rows


def summarize_memory(cells: list[Cell]) -> list[MemoryRow]:
    rows = []
    for scenario in MEMORY_SCENARIOS:
        mine = [c for c in cells if c.scenario == scenario]
        for name in dict.fromkeys(c.target for c in mine):
            group = [c for c in mine if c.target == name]
            worst = max(group, key=lambda c: c.rss_growth_kib)
            rows.append(
                MemoryRow(
                    scenario=scenario,
                    target=name,
                    process=group[0].measured_process,
                    rounds=len(group),
                    connections=group[0].connections,
                    rss_before_kib=statistics.median(c.rss_before_kib for c in group),
                    rss_growth_kib=worst.rss_growth_kib,
                    rss_per_conn_kib=worst.rss_per_conn_kib,
                    result_bytes=max(c.result_bytes for c in group),
                    slow_bytes=max(c.slow_bytes for c in group),
                    entries=max(c.entries for c in group),
                    errors=sum(c.errors for c in group),
                    first_error=next((c.first_error for c in group if c.first_error), ""),
                )
            )
    return rows


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _micros(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.1f}"


def _table(lines: list[list[str]], numeric: set[int]) -> str:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
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


def render(rows: list[Row]) -> str:
    header = [
        "scenario",
        "target",
        "ops/s",
        "vs ldap",
        "vs ldaps",
        "MB/s",
        "p50 us",
        "p99 us",
        "errors",
        "proxy CPU us/op",
        "cores loadgen/slapd/proxy/other",
    ]
    lines = [header]
    for r in rows:
        c = r.cores
        sys_share = f"{100 * (r.proxy_sys_share or 0):.0f}% sys"
        mb = "-"
        if r.scenario == "bigsearch":
            mb = f"{r.mb_per_s:.1f}" + (f" ({r.mb_vs_ldap:.2f}x)" if r.mb_vs_ldap else "")
        lines.append(
            [
                r.scenario,
                r.target,
                f"{r.ops_per_s:,.0f}" if r.ops_per_s >= 100 else f"{r.ops_per_s:.1f}",
                _ratio(r.vs_ldap),
                _ratio(r.vs_ldaps),
                mb,
                f"{r.p50_us:,.0f}",
                f"{r.p99_us:,.0f}",
                str(r.errors),
                "-"
                if r.proxy_cpu_us_per_op is None
                else f"{_micros(r.proxy_cpu_us_per_op)} ({sys_share})",
                f"{c['loadgen']:.2f}/{c['slapd']:.2f}/{c['proxy']:.2f}/{c['other']:.2f}",
            ]
        )
    return _table(lines, {2, 3, 4, 5, 6, 7, 8, 9})


def render_memory(rows: list[MemoryRow]) -> str:
    header = [
        "scenario",
        "target",
        "process",
        "load",
        "RSS before MiB",
        "growth MiB",
        "per conn KiB",
        "errors",
    ]
    lines = [header]
    for r in rows:
        if r.scenario == "idle":
            load = f"{r.connections:,} idle connections"
        else:
            load = (
                f"{r.result_bytes / 1e6:.1f} MB, {r.entries:,} entries "
                f"({r.slow_bytes / 1e6:.1f} MB slowly)"
            )
        lines.append(
            [
                r.scenario,
                r.target,
                r.process,
                load,
                f"{r.rss_before_kib / 1024:.1f}",
                f"{r.rss_growth_kib / 1024:+.1f}",
                "-" if r.rss_per_conn_kib is None else f"{r.rss_per_conn_kib:.1f}",
                str(r.errors),
            ]
        )
    return _table(lines, {4, 5, 6, 7})


@dataclass(frozen=True)
class Goal:
    """A performance target: the value of one row against a limit."""

    what: str
    scenario: str
    value: Callable[[Any], float | None]
    limit: float
    at_least: bool
    unit: str
    #: The row the value is read from (the proxy's, with plain clients).
    target: str = "proxy"


GOALS = (
    Goal("short sessions/s, proxy vs direct ldaps", "short", lambda r: r.vs_ldaps, 6, True, "x"),
    Goal("search ops/s, proxy vs direct ldap", "search", lambda r: r.vs_ldap, 0.6, True, "x"),
    Goal("bind ops/s, proxy vs direct ldap", "bind", lambda r: r.vs_ldap, 0.6, True, "x"),
    Goal(
        "bigsearch MB/s, proxy vs direct ldap", "bigsearch", lambda r: r.mb_vs_ldap, 0.7, True, "x"
    ),
    Goal(
        "proxy CPU per forwarded search op",
        "search",
        lambda r: r.proxy_cpu_us_per_op,
        25,
        False,
        " us",
    ),
    Goal(
        "added p50 latency (1 conn, 1 op), proxy - ldap",
        "latency",
        lambda r: r.added_p50_us,
        150,
        False,
        " us",
    ),
    Goal(
        "proxy RSS per idle client connection",
        "idle",
        lambda r: r.rss_per_conn_kib,
        40,
        False,
        " KiB",
    ),
    Goal(
        "proxy peak RSS growth, slow reader of {result}",
        "slowclient",
        lambda r: r.rss_growth_kib / 1024,
        SLOW_LIMIT_MIB,
        False,
        " MiB",
    ),
)


def evaluate_goals(
    rows: list[Row], memory: list[MemoryRow], settings: Settings
) -> list[dict[str, Any]]:
    """Each goal whose scenario ran: what, measured, limit, verdict (PASS, MISS, or ERRORS
    when the scenario's cells had errors)."""
    out = []
    all_rows: list[Any] = [*rows, *memory]
    searches = settings.slow_searches
    result = (
        f"{searches} x {settings.users:,}-entry results"
        if searches > 1
        else f"a {settings.users:,}-entry result"
    )
    for goal in GOALS:
        row = next(
            (r for r in all_rows if (r.scenario, r.target) == (goal.scenario, goal.target)), None
        )
        if row is None:
            continue
        value = goal.value(row)
        errors = sum(r.errors for r in all_rows if r.scenario == goal.scenario)
        if value is None:
            verdict = "n/a"
        elif errors:
            verdict = "ERRORS"
        elif goal.scenario == "slowclient" and slow_result_too_small(row, settings):
            verdict = "INCONCLUSIVE"
        else:
            verdict = (
                "PASS"
                if (value >= goal.limit if goal.at_least else value <= goal.limit)
                else "MISS"
            )
        out.append(
            {
                "what": goal.what.format(result=result),
                "scenario": goal.scenario,
                "measured": value,
                "limit": goal.limit,
                "at_least": goal.at_least,
                "unit": goal.unit.strip(),
                "verdict": verdict,
            }
        )
    return out


def render_goals(goals: list[dict[str, Any]]) -> str:
    lines = [["performance target", "measured", "target", "verdict"]]
    for g in goals:
        unit = g["unit"] if g["unit"] == "x" else " " + g["unit"]
        value = g["measured"]
        if value is None:
            measured = "-"
        elif g["unit"] == "x":
            measured = f"{value:.2f}x"
        else:
            measured = f"{value:,.1f}{unit}"
        limit = f"{g['limit']:g}{unit}"
        lines.append(
            [g["what"], measured, f"{'>=' if g['at_least'] else '<='} {limit}", g["verdict"]]
        )
    return _table(lines, {1, 2})


def slow_result_too_small(row: MemoryRow, settings: Settings) -> bool:
    """Whether a slowclient result was too small for the growth to tell a proxy with flow
    control from one that buffers everything: what was not read slowly, less what the
    kernel's socket buffers hold, is under the limit."""
    kernel = kernel_send_buffer_max() + 2 * settings.slow_chunk
    return row.result_bytes - row.slow_bytes - kernel < SLOW_LIMIT_MIB * 1024 * 1024


def kernel_send_buffer_max() -> int:
    """The most a TCP socket's send buffer autotunes to (net.ipv4.tcp_wmem's maximum)."""
    try:
        return int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, IndexError, ValueError):
        return 4 * 1024 * 1024


def notes(
    rows: list[Row], memory: list[MemoryRow], cells: list[Cell], settings: Settings
) -> list[str]:
    lines = []
    for r in rows:
        if r.loadgen_saturated_rounds:
            lines.append(
                f"WARNING: {r.scenario}/{r.target}: the load generator used more than 90% of the "
                f"{min(r.loadgen_threads, NCPU)} core(s) it can use in "
                f"{r.loadgen_saturated_rounds} of {r.rounds} round(s): it may have been the "
                "bottleneck"
            )
        if r.errors:
            first = next(
                c.first_error
                for c in cells
                if c.scenario == r.scenario and c.target == r.target and c.errors
            )
            lines.append(f"ERRORS: {r.scenario}/{r.target}: {r.errors} error(s), first: {first}")
        if r.scenario == "latency" and r.p99_us >= 20000 and r.p99_us > 20 * r.p50_us:
            lines.append(
                f"note: latency/{r.target}: p99 {r.p99_us / 1000:.0f} ms against p50 "
                f"{r.p50_us:,.0f} us: some operations stall for tens of ms, which looks like a "
                "delayed ACK that a small write waits for under Nagle's algorithm (a socket "
                "without TCP_NODELAY)"
            )
        if r.target == "proxy-2w":
            pass  # two processes: reported with the worker scaling below
        elif r.cores["proxy"] >= 0.8:
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
    one = next((r for r in rows if r.scenario == "search" and r.target == "proxy"), None)
    two = next((r for r in rows if r.scenario == "search" and r.target == "proxy-2w"), None)
    if one is not None and two is not None and one.ops_per_s:
        lines.append(
            f"workers: search through {SCALED_WORKERS} workers {two.ops_per_s:,.0f} ops/s = "
            f"{two.ops_per_s / one.ops_per_s:.2f}x one worker's {one.ops_per_s:,.0f} (the "
            f"workers used {two.cores['proxy']:.2f} cores, the machine "
            f"{two.cores['machine']:.2f}/{NCPU}): more workers help while the proxy host "
            "has idle cores"
        )
    for m in memory:
        if (
            m.scenario == "slowclient"
            and m.target == "proxy"
            and slow_result_too_small(m, settings)
        ):
            unread = m.result_bytes - m.slow_bytes
            kernel = kernel_send_buffer_max() + 2 * settings.slow_chunk
            lines.append(
                f"WARNING: slowclient/{m.target}: only {unread / 1e6:.1f} MB were not read in "
                f"the slow phase, and the kernel's socket buffers can hold {kernel / 1e6:.1f} "
                f"MB of them: even a proxy that buffered the whole result would stay under "
                f"{SLOW_LIMIT_MIB} MiB, so the target is INCONCLUSIVE; raise BENCH_SLOW_SEARCHES"
            )
        if m.errors:
            lines.append(
                f"ERRORS: {m.scenario}/{m.target}: {m.errors} error(s), first: {m.first_error}"
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
    timed = [c for c in cells if c.scenario in LOADGEN_MODE]
    if timed:
        irq = statistics.median(c.irq_cores for c in timed)
        lines.append(f"interrupts + softirq (loopback TCP, counted in 'other'): {irq:.2f} cores")
    return lines


# -- main ------------------------------------------------------------------------------


def run_cell(bench: Bench, scenario: str, target: Target, round_: int, settings: Settings) -> Cell:
    if scenario in MEMORY_SCENARIOS and target.via_proxy:
        bench.fresh_proxy()
    if scenario == "idle":
        return bench.run_idle(target, round_)
    if scenario == "slowclient":
        return bench.run_slowclient(target, round_)
    return bench.run(scenario, target, round_, settings.seconds, settings.warmup)


def progress(cell: Cell) -> str:
    """One line per cell, on stderr while the bench runs."""
    head = f"{cell.scenario:10s} r{cell.round} {cell.target:15s}"
    if cell.scenario == "idle":
        return (
            f"{head} {cell.connections:,} connections: {cell.measured_process} RSS "
            f"{cell.rss_before_kib / 1024:.1f} -> {cell.rss_after_kib / 1024:.1f} MiB = "
            f"{cell.rss_per_conn_kib or 0:.1f} KiB/conn err={cell.errors} "
            f"(opened in {cell.window_s:.1f} s)"
        )
    if cell.scenario == "slowclient":
        return (
            f"{head} {cell.result_bytes / 1e6:.1f} MB in {cell.window_s:.1f} s: "
            f"{cell.measured_process} RSS {cell.rss_before_kib / 1024:.1f} MiB, peak "
            f"{cell.rss_growth_kib / 1024:+.1f} MiB ({cell.rss_samples} samples) err={cell.errors}"
        )
    mb = f" {cell.mb_per_s:.1f} MB/s" if cell.scenario == "bigsearch" else ""
    return (
        f"{head} {cell.ops_per_s:10,.0f} ops/s{mb} "
        f"err={cell.errors} p50={cell.p50_us:,.0f}us p99={cell.p99_us:,.0f}us "
        f"cores lg/slapd/proxy={cell.cores(cell.loadgen_cpu_s):.2f}/"
        f"{cell.cores(cell.slapd_cpu_s):.2f}/{cell.cores(cell.proxy_cpu_s):.2f}"
    )


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
    if "idle" in settings.scenarios:
        # this script holds the client ends, slapd or the proxy (which inherit the limit)
        # the server ends, plus their other files
        limit = raise_open_files(settings.idle_conns + 4096)
        if limit < settings.idle_conns + 1024:
            print(
                f"bench: RLIMIT_NOFILE is {limit}: idle holds {limit - 1024} connections, not "
                f"{settings.idle_conns}",
                file=sys.stderr,
            )
            settings = dataclasses.replace(settings, idle_conns=max(1, limit - 1024))
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
        scaled = None
        if "search" in settings.scenarios:
            scaled_dir = workdir / "proxy-2w"
            scaled_dir.mkdir()
            scaled, scaled_port, scaled_stls = start_proxy(
                scaled_dir, ca, tls_port, dataclasses.replace(settings, workers=SCALED_WORKERS)
            )
            children.append(scaled)
            wait_for_ports(scaled, [scaled_port, scaled_stls])
        targets = {
            "ldap": Target("ldap", f"ldap://{LOOPBACK}:{port}"),
            "ldaps": Target("ldaps", f"ldaps://{LOOPBACK}:{tls_port}"),
            "proxy": Target("proxy", f"ldap://{LOOPBACK}:{plain_port}", via_proxy=True),
            "proxy-starttls": Target(
                "proxy-starttls", f"ldap://{LOOPBACK}:{stls_port}", starttls=True, via_proxy=True
            ),
        }
        if scaled is not None:
            targets["proxy-2w"] = Target(
                "proxy-2w", f"ldap://{LOOPBACK}:{scaled_port}", via_proxy=True, instance="proxy-2w"
            )
        bench = Bench(
            args.loadgen,
            settings,
            ca_file,
            slapd,
            proxy,
            workdir,
            [plain_port, stls_port],
            children,
            scaled,
        )

        # Smoke test: every target answers a whole short session with no error.
        for target in targets.values():
            cell = bench.run("short", target, 0, seconds=0.5, warmup=0.2, conns=1)
            if cell.errors or not cell.ops:
                raise RuntimeError(
                    f"smoke test against {target.name} ({target.url}) failed: "
                    f"{cell.ops} ops, {cell.errors} errors: {cell.first_error}"
                )

        per_scenario = {"short": SHORT_TARGETS, "search": SEARCH_TARGETS}
        plan = [
            (scenario, per_scenario.get(scenario, PERSISTENT_TARGETS))
            for scenario in settings.scenarios
        ]
        total = sum(len(t) for _, t in plan) * settings.rounds
        print(
            f"bench: {total} cells ({settings.warmup:g}+{settings.seconds:g} s for loadgen), "
            f"{settings.conns} connections, {settings.users} users, {NCPU} CPUs, "
            f"upstream certificate {'RSA-2048' if settings.key_type == 'rsa' else 'ECDSA P-256'}"
            f", plugins {'all' if settings.plugins else 'none'}",
            file=sys.stderr,
        )
        started = time.monotonic()
        cells: list[Cell] = []
        for scenario, names in plan:
            for round_ in range(1, settings.rounds + 1):
                shift = (round_ - 1) % len(names)
                for name in names[shift:] + names[:shift]:  # rotate the order every round
                    cells.append(run_cell(bench, scenario, targets[name], round_, settings))
                    print(f"  {progress(cells[-1])}", file=sys.stderr)

        rows = summarize(cells, targets)
        memory = summarize_memory(cells)
        goals = evaluate_goals(rows, memory, settings)
        print()
        print(
            f"ldapproxy {__version__} bench: median of {settings.rounds} rounds of "
            f"{settings.seconds:g} s per cell, {settings.conns} connections "
            f"(search depth {settings.depth}), {settings.users} users, {NCPU} CPUs, "
            f"plugins {'all' if settings.plugins else 'none'}"
        )
        if rows:
            print(render(rows))
            print()
            for name in (*SHORT_TARGETS, *([] if scaled is None else ["proxy-2w"])):
                print(f"  {name:15s} {TARGET_HELP[name]}")
            print(
                "  ratios: median over rounds of target/reference measured in the same round; "
                "cores: CPU seconds per second in the measured window; MB/s: bytes of LDAP "
                "responses received (10^6 B/s); latency: 1 connection, 1 search outstanding; "
                "bigsearch: 1 connection, 1 search for every user at a time"
            )
        if memory:
            print()
            print(render_memory(memory))
            print()
            print(
                "  VmRSS of the process behind the target (a freshly started proxy); growth "
                "and per conn: the worst round.  idle: connections opened and accepted, "
                "nothing sent until RSS was read; slowclient: "
                f"{settings.slow_searches} searches for every user sent at once, "
                f"{settings.slow_chunk // 1024} KiB read every "
                f"{1000 * settings.slow_interval:g} ms for {settings.seconds:g} s, then the "
                "rest as it comes; growth = peak (sampled every 20 ms) minus before"
            )
        print()
        for line in notes(rows, memory, cells, settings):
            print(line)
        if goals:
            print()
            print(render_goals(goals))
        print(f"bench: the cells took {time.monotonic() - started:.0f} s", file=sys.stderr)

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
                    "memory": [asdict(r) for r in memory],
                    "goals": goals,
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
