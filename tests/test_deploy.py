"""The deployment files under deploy/: systemd units, Prometheus rules and scrape
configuration, the Grafana dashboard and the HAProxy configuration.

Each file is checked by the tool that consumes it where that tool is installed
(systemd-analyze, promtool, haproxy), by parsing it otherwise, and the parts that meet
ldapproxy (socket activation, HAProxy's LDAP health check) against a real proxy.
"""

from __future__ import annotations

import ctypes.util
import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.haproxy import haproxy_binary, haproxy_sections, haproxy_stats
from support.ldaptools import run_ldap_tool
from support.net import free_port
from support.proxy import LDAPPROXY, Listener, ProxyProcess, proxy_config
from support.slapd import ALICE_DN, USERS, Slapd

from ldapproxy.config import OPTIONS, load, parse
from ldapproxy.pki import CertificateAuthority

# The metric names ldapproxy exports.  This must match the list in the issue that asked
# for deploy/ (and so ldapproxy/metrics.py, against which it is to be cross-checked):
# every expression in deploy/prometheus/ and deploy/grafana/ may use only these, the
# _bucket, _sum and _count series of the histograms, and Prometheus's own "up".
GAUGES = (
    "ldapproxy_upstream_up",
    "ldapproxy_tls_certificate_expiry_timestamp_seconds",
    "ldapproxy_client_connections",
    "ldapproxy_upstream_connections",
)
COUNTERS = (
    "ldapproxy_operations_total",
    "ldapproxy_config_reloads_total",
    "ldapproxy_client_connections_total",
    "ldapproxy_starttls_total",
    "ldapproxy_tls_handshake_failures_total",
    "ldapproxy_upstream_connect_errors_total",
    "ldapproxy_plugin_denials_total",
    "ldapproxy_limits_exceeded_total",
    "ldapproxy_bytes_total",
    "ldapproxy_audit_records_dropped_total",
    "ldapproxy_audit_write_errors_total",
)
HISTOGRAMS = (
    "ldapproxy_pool_wait_seconds",
    "ldapproxy_operation_duration_seconds",
)
KNOWN_SERIES = frozenset(
    GAUGES
    + COUNTERS
    + tuple(f"{name}{suffix}" for name in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count"))
    + ("up",)
)

ROOT = Path(__file__).resolve().parent.parent
SYSTEMD = ROOT / "deploy" / "systemd"
PROMETHEUS = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"
HAPROXY = ROOT / "deploy" / "haproxy"

SERVICE = SYSTEMD / "ldapproxy.service"
SOCKETS = sorted(SYSTEMD.glob("*.socket"))
DROPIN = SYSTEMD / "ldapproxy.service.d" / "socket-activation.conf"
SOCKET_CONFIG = SYSTEMD / "ldapproxy-socket.toml"
ALERTS = PROMETHEUS / "ldapproxy-alerts.yml"
DASHBOARD = GRAFANA / "ldapproxy-dashboard.json"
HAPROXY_CFG = HAPROXY / "haproxy.cfg"

#: Where the unit expects the console script (a virtualenv in /opt/ldapproxy).
INSTALLED_LDAPPROXY = "/opt/ldapproxy/bin/ldapproxy"

#: Settings of the service unit that sandbox or restrict it; every one must be set.
HARDENING = (
    "User",
    "Group",
    "UMask",
    "AmbientCapabilities",
    "CapabilityBoundingSet",
    "NoNewPrivileges",
    "ProtectSystem",
    "ProtectHome",
    "PrivateTmp",
    "PrivateDevices",
    "ProtectKernelTunables",
    "ProtectKernelModules",
    "ProtectKernelLogs",
    "ProtectControlGroups",
    "ProtectClock",
    "ProtectHostname",
    "RestrictAddressFamilies",
    "RestrictNamespaces",
    "RestrictRealtime",
    "RestrictSUIDSGID",
    "LockPersonality",
    "MemoryDenyWriteExecute",
    "SystemCallFilter",
    "SystemCallArchitectures",
)

#: Output of `systemd-analyze verify` that is not about our units' correctness.  None is
#: known on systemd 252 (Debian 12): the units are verified with ExecStart= pointing at
#: this venv's ldapproxy, and verify does not look up User=/Group= accounts.
HARMLESS_VERIFY_OUTPUT: tuple[str, ...] = ()


def option_default(section: str, key: str) -> Any:
    """The built-in default of ``[section] key`` as ldapproxy declares it."""
    for option in OPTIONS:
        if (option.section, option.key) == (section, key):
            return option.default
    raise AssertionError(f"ldapproxy has no option [{section}] {key}")


# -- systemd ------------------------------------------------------------------------------


def parse_unit(path: Path) -> list[tuple[str, str, str]]:
    """Every ``(section, key, value)`` assignment of a unit file, in order; a line that is
    neither blank, a comment, a section header nor ``Key=value`` is an error."""
    entries = []
    section = ""
    for number, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", ";")):
            continue
        if re.fullmatch(r"\[[A-Za-z]+\]", stripped):
            section = stripped[1:-1]
            continue
        match = re.fullmatch(r"([A-Z][A-Za-z0-9]*)=(.*)", stripped)
        if match is None or not section:
            raise AssertionError(f"{path.name}:{number}: not a unit file line: {line!r}")
        entries.append((section, match[1], match[2]))
    return entries


def unit_values(path: Path, section: str, key: str) -> list[str]:
    """The values assigned to ``key`` in ``[section]``, in order."""
    return [v for s, k, v in parse_unit(path) if (s, k) == (section, key)]


def unit_value(path: Path, section: str, key: str) -> str:
    """The one value of ``key`` in ``[section]``."""
    values = unit_values(path, section, key)
    assert len(values) == 1, f"{path.name}: [{section}] {key}= set {len(values)} times"
    return values[0]


def header_comment(path: Path) -> str:
    """The comment lines at the top of a file, before its first non-comment line."""
    lines = []
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            lines.append(line.lstrip("#"))
        elif line.strip():
            break
    return "\n".join(lines)


def seconds(value: str) -> float:
    """A systemd time span such as ``45``, ``45s``, ``2min`` or ``1min 30s`` in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value)
    assert parts, value
    return sum(float(number) * units[unit] for number, unit in parts)


def stage_units(tmp_path: Path, socket_activated: bool) -> Path:
    """Copy the units (and, if ``socket_activated``, the drop-in) to a directory of their
    own, with ExecStart= pointing at this venv's ldapproxy so that it exists."""
    target = tmp_path / ("socket-activated" if socket_activated else "standalone")
    target.mkdir()
    for unit in [SERVICE, *SOCKETS]:
        shutil.copy(unit, target)
    if socket_activated:
        shutil.copytree(DROPIN.parent, target / DROPIN.parent.name)
    service = target / SERVICE.name
    text = service.read_text()
    assert text.count(f"ExecStart={INSTALLED_LDAPPROXY} ") == 1
    service.write_text(text.replace(f"ExecStart={INSTALLED_LDAPPROXY} ", f"ExecStart={LDAPPROXY} "))
    return target


def test_unit_files_parse() -> None:
    """Every unit file and drop-in consists only of sections and Key=value lines."""
    files = [SERVICE, *SOCKETS, DROPIN]
    assert len(SOCKETS) == 2
    for path in files:
        assert parse_unit(path), path


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
@pytest.mark.parametrize("socket_activated", [False, True], ids=["standalone", "socket-activated"])
def test_systemd_analyze_verify(tmp_path: Path, socket_activated: bool) -> None:
    """`systemd-analyze verify` accepts the units, with and without the socket drop-in."""
    units = stage_units(tmp_path, socket_activated)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *(p.name for p in [SERVICE, *SOCKETS])],
        cwd=units,
        capture_output=True,
        text=True,
        check=False,
    )
    output = (result.stdout + result.stderr).splitlines()
    relevant = [
        line
        for line in output
        if ("ldapproxy" in line or str(units) in line)
        and not any(re.search(pattern, line) for pattern in HARMLESS_VERIFY_OUTPUT)
    ]
    assert result.returncode == 0, output
    assert relevant == []


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
@pytest.mark.parametrize("socket_activated", [False, True], ids=["standalone", "socket-activated"])
def test_systemd_security_exposure(tmp_path: Path, socket_activated: bool) -> None:
    """`systemd-analyze security` rates the service's exposure 2.0 ("OK") or better."""
    units = stage_units(tmp_path, socket_activated)
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--threshold=20", SERVICE.name],
        cwd=units,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Overall exposure level for ldapproxy.service" in result.stdout


def test_service_unit_required_settings() -> None:
    """The service is a notify-type, watchdogged, unprivileged and sandboxed unit."""
    assert unit_value(SERVICE, "Service", "Type") == "notify"
    assert unit_value(SERVICE, "Service", "NotifyAccess") == "main"
    exec_start = unit_value(SERVICE, "Service", "ExecStart").split()
    assert exec_start == [INSTALLED_LDAPPROXY, "run", "-c", "/etc/ldapproxy/ldapproxy.toml"]
    assert unit_value(SERVICE, "Service", "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert unit_value(SERVICE, "Service", "KillMode") == "mixed"
    assert unit_value(SERVICE, "Service", "Restart") == "on-failure"
    assert unit_value(SERVICE, "Service", "AmbientCapabilities") == "CAP_NET_BIND_SERVICE"
    assert unit_value(SERVICE, "Service", "CapabilityBoundingSet") == "CAP_NET_BIND_SERVICE"
    assert unit_value(SERVICE, "Service", "ProtectSystem") == "strict"
    for key in (
        "NoNewPrivileges",
        "PrivateTmp",
        "ProtectHome",
        "PrivateDevices",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "ProtectKernelLogs",
        "ProtectControlGroups",
        "ProtectClock",
        "ProtectHostname",
        "RestrictNamespaces",
        "RestrictRealtime",
        "RestrictSUIDSGID",
        "LockPersonality",
    ):
        assert unit_value(SERVICE, "Service", key) == "yes", key
    assert unit_value(SERVICE, "Service", "RestrictAddressFamilies").split() == [
        "AF_UNIX",
        "AF_INET",
        "AF_INET6",
    ]
    assert unit_values(SERVICE, "Service", "SystemCallFilter")[0] == "@system-service"
    assert unit_value(SERVICE, "Service", "SystemCallArchitectures") == "native"
    assert unit_value(SERVICE, "Service", "UMask") == "0027"
    assert unit_value(SERVICE, "Service", "LogsDirectory") == "ldapproxy"
    user = unit_value(SERVICE, "Service", "User")
    assert user not in ("", "root", "0")
    assert unit_values(SERVICE, "Service", "DynamicUser") in ([], ["no"])
    for key in HARDENING:
        assert unit_values(SERVICE, "Service", key), f"{key}= is not set"
    assert unit_values(SERVICE, "Install", "Also") == []


def test_service_timeouts_fit_proxy_defaults() -> None:
    """Stop, start and watchdog timeouts leave room for ldapproxy's drain and warm-up."""
    drain = option_default("limits", "drain_timeout")
    warm = option_default("pool", "warm_timeout")
    assert seconds(unit_value(SERVICE, "Service", "TimeoutStopSec")) > drain + 5
    assert seconds(unit_value(SERVICE, "Service", "TimeoutStartSec")) > warm + 5
    assert seconds(unit_value(SERVICE, "Service", "WatchdogSec")) == 30
    socket_config = load(SOCKET_CONFIG)
    stop = seconds(unit_value(SERVICE, "Service", "TimeoutStopSec"))
    assert socket_config.limits.drain_timeout < stop


def test_service_header_explains_every_setting() -> None:
    """The service's header comment names every setting of its [Service] section."""
    header = header_comment(SERVICE)
    keys = {key for section, key, _ in parse_unit(SERVICE) if section == "Service"}
    assert set(HARDENING) <= keys
    missing = sorted(key for key in keys if f"{key}=" not in header)
    assert missing == [], f"not explained in the header comment: {missing}"
    for topic in ("KillMode=mixed", "MemoryDenyWriteExecute=no", "DynamicUser", "Also="):
        assert topic in header, topic


# Run in a child process: load the seccomp rules systemd 252 installs for
# MemoryDenyWriteExecute=yes (src/shared/seccomp-util.c), then try what pyOpenSSL does
# for every TLS connection the proxy verifies (a cffi ffi.callback).
MDWE_PROBE = r"""
import ctypes, json, mmap
lib = ctypes.CDLL("libseccomp.so.2")
class Cmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("a", ctypes.c_uint64), ("b", ctypes.c_uint64)]
lib.seccomp_init.restype = ctypes.c_void_p
lib.seccomp_init.argtypes = [ctypes.c_uint32]
lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
lib.seccomp_rule_add_array.argtypes = [
    ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(Cmp)]
lib.seccomp_load.argtypes = [ctypes.c_void_p]
ctypes.CDLL(None).prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
ctx = lib.seccomp_init(0x7FFF0000)  # allow everything else
PROT_WRITE, PROT_EXEC, SHM_EXEC, MASKED_EQ, EPERM = 2, 4, 0o100000, 7, 0x00050001
for name, arg, mask in (("mmap", 2, PROT_WRITE | PROT_EXEC), ("mprotect", 2, PROT_EXEC),
                        ("pkey_mprotect", 2, PROT_EXEC), ("shmat", 2, SHM_EXEC)):
    rule = (Cmp * 1)(Cmp(arg, MASKED_EQ, mask, mask))
    number = lib.seccomp_syscall_resolve_name(name.encode())
    assert lib.seccomp_rule_add_array(ctx, EPERM, number, 1, rule) == 0, name
assert lib.seccomp_load(ctx) == 0
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    refused = False
except OSError:
    refused = True
from OpenSSL import SSL
try:
    SSL.Context(SSL.TLS_METHOD).set_verify(SSL.VERIFY_PEER, lambda *args: True)
    callbacks = True
except MemoryError:
    callbacks = False
print(json.dumps({"refused": refused, "callbacks": callbacks}))
"""


def test_memory_deny_write_execute_only_if_tls_callbacks_survive() -> None:
    """MemoryDenyWriteExecute= is only enabled if pyOpenSSL callbacks work under it."""
    if ctypes.util.find_library("seccomp") is None:
        pytest.skip("libseccomp is not installed")
    result = subprocess.run(
        [sys.executable, "-c", MDWE_PROBE], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    probe = json.loads(result.stdout)
    assert probe["refused"], "the simulated MemoryDenyWriteExecute= did not take effect"
    enabled = unit_value(SERVICE, "Service", "MemoryDenyWriteExecute") == "yes"
    assert probe["callbacks"] or not enabled, (
        "MemoryDenyWriteExecute=yes breaks pyOpenSSL's callbacks (every upstream TLS "
        "connection): set it to no"
    )


def socket_units() -> dict[str, Path]:
    """The socket units by the FileDescriptorName= they give their socket."""
    return {unit_value(path, "Socket", "FileDescriptorName"): path for path in SOCKETS}


def test_socket_units_name_one_listener_each() -> None:
    """Each socket unit binds one port under its own name and activates the service."""
    units = socket_units()
    assert sorted(units) == ["ldap", "ldaps"]
    ports = {}
    for name, path in units.items():
        (listen,) = unit_values(path, "Socket", "ListenStream")
        ports[name] = int(listen.rsplit(":", 1)[-1])
        assert unit_value(path, "Socket", "Service") == SERVICE.name
        assert unit_value(path, "Install", "WantedBy") == "sockets.target"
    assert ports == {"ldap": 389, "ldaps": 636}
    assert unit_value(DROPIN, "Service", "Sockets").split() == sorted(p.name for p in SOCKETS)
    assert unit_value(DROPIN, "Service", "AmbientCapabilities") == ""
    assert unit_value(DROPIN, "Service", "CapabilityBoundingSet") == ""


def systemd_endpoint(endpoint: str) -> dict[str, str]:
    """The parameters of a ``systemd:key=value:...`` endpoint string."""
    kind, *parameters = endpoint.split(":")
    assert kind == "systemd", endpoint
    return dict(parameter.split("=", 1) for parameter in parameters)


def test_socket_activation_config_matches_units() -> None:
    """ldapproxy-socket.toml loads, and adopts each socket unit's socket by its name."""
    config = load(SOCKET_CONFIG)
    units = socket_units()
    adopted = {}
    for listener in config.listeners:
        parameters = systemd_endpoint(listener.endpoint)
        assert set(parameters) == {"name"}, listener.endpoint
        adopted[parameters["name"]] = listener
        unit = units[parameters["name"]]
        listen = unit_value(unit, "Socket", "ListenStream")
        if listen.startswith("["):
            assert unit_value(unit, "Socket", "BindIPv6Only") == "both"
    assert sorted(adopted) == sorted(units)
    assert adopted["ldap"].tls.value.startswith("starttls")
    assert adopted["ldaps"].tls.value == "ldaps"


# Puts the inherited sockets at descriptors 3, 4... and sets LISTEN_PID to the process
# that then becomes ldapproxy (exec keeps the PID), as systemd does.
SOCKET_ACTIVATION_SHIM = r"""
import fcntl, os, sys
fds = [int(fd) for fd in os.environ.pop("DEPLOY_TEST_FDS").split(",")]
copies = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in fds]
targets = range(3, 3 + len(fds))
for target, copy in zip(targets, copies):
    os.dup2(copy, target)
for fd in set(copies + fds) - set(targets):
    os.close(fd)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS=str(len(fds)))
os.execv(sys.argv[1], sys.argv[1:])
"""


def test_socket_activation_end_to_end(
    tmp_path: Path, ca: CertificateAuthority, slapd: Slapd
) -> None:
    """ldapproxy serves StartTLS and LDAPS clients on sockets handed over the way the
    socket units do, using the listener endpoints of ldapproxy-socket.toml."""
    deployed = tomllib.loads(SOCKET_CONFIG.read_text())["listener"]
    names = list(socket_units())
    by_name = {table["name"]: table for table in deployed}
    listeners = [Listener(by_name[name]["tls"], name) for name in names]
    config, _ = proxy_config(tmp_path, ca, [slapd.ldaps_url], listeners=listeners)
    text = config.read_text()
    sockets = []
    for listener in listeners:
        tcp = f"endpoint = 'tcp:{listener.port}:interface=127.0.0.1'"
        assert text.count(tcp) == 1
        text = text.replace(tcp, f"endpoint = '{by_name[listener.name]['endpoint']}'")
        # Like ListenStream=[::]:PORT with BindIPv6Only=both, on loopback only.
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("::ffff:127.0.0.1", listener.port))
        sock.listen(64)
        sockets.append(sock)
    config.write_text(text)
    proxy = ProxyProcess(config)
    command = [sys.executable, "-c", SOCKET_ACTIVATION_SHIM, LDAPPROXY, "run", "-c", str(config)]
    credentials = ["-D", ALICE_DN, "-w", USERS[ALICE_DN]]
    try:
        with proxy.log_path.open("wb") as log:
            proxy.process = subprocess.Popen(
                [*command, "--log-level", "debug"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                pass_fds=[sock.fileno() for sock in sockets],
                env={
                    **os.environ,
                    "PYTHONWARNINGS": "error::ResourceWarning",
                    "LISTEN_FDNAMES": ":".join(names),
                    "DEPLOY_TEST_FDS": ",".join(str(sock.fileno()) for sock in sockets),
                },
            )
        for sock in sockets:
            sock.close()
        proxy.wait_for_log(r"ldapproxy \S+ ready", 15)
        env = slapd.ldap_env()
        for listener in listeners:
            flags = ["-ZZ"] if listener.tls.startswith("starttls") else []
            result = run_ldap_tool(
                ["ldapwhoami", "-x", *flags, "-H", listener.url, *credentials], env
            )
            assert result.returncode == 0, (listener, result.stderr, proxy.log_text())
            assert result.stdout.strip() == f"dn:{ALICE_DN}"
        # A domain= that does not match the socket's family garbles every address
        # (e.g. "::6bfc:614f:acc0:9905%3842477632"), and so the allowlist's decisions.
        logged = proxy.log_text()
        address = r"\[?(?:::ffff:)?127\.0\.0\.1\]?"
        for listener in listeners:
            assert re.search(rf"listener {listener.name} on {address}:{listener.port}\b", logged)
            assert re.search(rf"{address}:\d+ connected to listener {listener.name}\b", logged)
    finally:
        for sock in sockets:
            sock.close()
        status = proxy.stop()
    assert status == 0, proxy.log_text()


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="needs systemd-sysusers")
def test_sysusers_creates_the_service_account(tmp_path: Path) -> None:
    """The sysusers.d file is valid and creates the account that User= names."""
    (tmp_path / "etc").mkdir()
    result = subprocess.run(
        [
            "systemd-sysusers",
            f"--root={tmp_path}",
            "--dry-run",
            str(SYSTEMD / "ldapproxy.sysusers.conf"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    user = unit_value(SERVICE, "Service", "User")
    assert f"Creating user '{user}'" in output
    assert f"Creating group '{unit_value(SERVICE, 'Service', 'Group')}'" in output


# -- Prometheus ---------------------------------------------------------------------------

PROMQL_KEYWORDS = {
    *("and", "or", "unless", "offset", "bool", "inf", "nan"),
    *("by", "without", "on", "ignoring", "group_left", "group_right"),
}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, labels or keywords)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])([A-Za-z_:][\w:]*)(\s*\()?", text):
        if match[2] is None and match[1].lower() not in PROMQL_KEYWORDS:
            names.add(match[1])
    return names


def test_metric_name_extraction() -> None:
    """metric_names() finds the selected series and nothing else in a PromQL expression."""
    expr = (
        'histogram_quantile(0.99, sum by (instance, le) (rate(a_bucket{job="x",le!="1"}'
        "[$__rate_interval] offset 5m))) > 4 * on (instance) group_left b unless c"
    )
    assert metric_names(expr) == {"a_bucket", "b", "c"}
    assert metric_names("time() + 14 * 86400 < up") == {"up"}


def alert_rules() -> list[dict[str, Any]]:
    """Every rule of every group in ldapproxy-alerts.yml."""
    document = yaml.safe_load(ALERTS.read_text())
    assert isinstance(document, dict)
    assert set(document) == {"groups"}
    rules = []
    for group in document["groups"]:
        assert group["name"], group
        assert group["rules"], group
        rules += group["rules"]
    return rules


def test_alert_rules_structure() -> None:
    """Every alerting rule has a name, an expression, a duration, a severity and a
    summary and description."""
    rules = alert_rules()
    names = [rule.get("alert") for rule in rules]
    assert len(names) == len(set(names))
    for rule in rules:
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, rule
        assert re.fullmatch(r"Ldapproxy[A-Z]\w+", rule["alert"]), rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule
        assert rule["labels"]["severity"] in ("warning", "critical"), rule
        assert rule["annotations"]["summary"].strip(), rule
        assert rule["annotations"]["description"].strip(), rule


def test_alert_rules_use_known_metrics() -> None:
    """Every alert expression selects ldapproxy's own metrics (or up) and nothing else."""
    for rule in alert_rules():
        names = metric_names(rule["expr"])
        assert names, rule["expr"]
        assert names <= KNOWN_SERIES, (rule["alert"], names - KNOWN_SERIES)
        assert 'job="ldapproxy"' in rule["expr"], rule["alert"]


def test_required_alerts_present() -> None:
    """The alerts the issue asks for exist and watch the right series."""
    rules = {rule["alert"]: rule for rule in alert_rules()}

    def expr(name: str) -> str:
        return re.sub(r"\s+", " ", rules[name]["expr"])

    assert metric_names(expr("LdapproxyInstanceDown")) == {"up"}
    assert "== 0" in expr("LdapproxyInstanceDown")
    assert metric_names(expr("LdapproxyUpstreamDown")) == {"ldapproxy_upstream_up"}
    assert rules["LdapproxyUpstreamDown"]["for"] == "1m"
    assert metric_names(expr("LdapproxyAllUpstreamsDown")) == {"ldapproxy_upstream_up"}
    assert rules["LdapproxyAllUpstreamsDown"]["labels"]["severity"] == "critical"
    assert "< time() + 14 * 86400" in expr("LdapproxyCertificateExpiringSoon")
    bind = expr("LdapproxyBindFailureSpike")
    assert 'op="bind",result="invalidCredentials"' in bind
    assert "[5m]" in bind
    assert "offset" in bind
    assert 'result="busy"' in expr("LdapproxyPoolExhausted")
    assert "ldapproxy_pool_wait_seconds_bucket" in expr("LdapproxyPoolWaitHigh")
    reload_ = expr("LdapproxyConfigReloadFailed")
    assert 'outcome="failure"' in reload_
    assert "[15m]" in reload_
    assert "> 0" in reload_
    assert metric_names(expr("LdapproxyAuditRecordsLost")) == {
        "ldapproxy_audit_records_dropped_total",
        "ldapproxy_audit_write_errors_total",
    }
    # The pool alert's threshold must stay below the default pool.acquire_timeout.
    threshold = float(expr("LdapproxyPoolWaitHigh").rsplit(">", 1)[1])
    assert threshold < option_default("pool", "acquire_timeout")


@pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool (Debian: prometheus)")
def test_promtool_checks_rules_config_and_rule_tests() -> None:
    """promtool accepts the rules and the scrape configuration and passes the rule tests."""
    for command in (
        ["promtool", "check", "rules", ALERTS.name],
        ["promtool", "check", "config", "prometheus.yml"],
        ["promtool", "test", "rules", "ldapproxy-alerts.test.yml"],
    ):
        result = subprocess.run(
            command, cwd=PROMETHEUS, capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, (command, result.stdout + result.stderr)


def test_scrape_config() -> None:
    """prometheus.yml scrapes ldapproxy instances on port 9389 as job ldapproxy and loads
    the alerting rules."""
    document = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert [PROMETHEUS / path for path in document["rule_files"]] == [ALERTS]
    (job,) = [job for job in document["scrape_configs"] if job["job_name"] == "ldapproxy"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    assert len(targets) >= 2
    assert all(target.endswith(":9389") for target in targets), targets


# -- Grafana ------------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    """The dashboard, parsed."""
    document = json.loads(DASHBOARD.read_text())
    assert isinstance(document, dict)
    return document


def dashboard_panels() -> list[dict[str, Any]]:
    """Every panel that is not a row, including panels inside collapsed rows."""
    panels = []
    for panel in dashboard()["panels"]:
        panels += panel.get("panels", [])
        if panel["type"] != "row":
            panels.append(panel)
    return panels


def dashboard_exprs() -> list[str]:
    """Every PromQL expression of every panel."""
    return [target["expr"] for panel in dashboard_panels() for target in panel["targets"]]


def test_dashboard_structure() -> None:
    """The dashboard is importable JSON with a data source variable, an instance variable,
    and panels that do not overlap."""
    document = dashboard()
    assert document["schemaVersion"] >= 36
    assert document["uid"]
    assert document["title"]
    variables = {var["name"]: var for var in document["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["type"] == "query"
    for var in variables.values():
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            (selector,) = re.fullmatch(r"label_values\((.+), *\w+\)", query).groups()
            assert metric_names(selector) <= KNOWN_SERIES, query
    ids = [panel["id"] for panel in document["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in document["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        area = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
    for panel in dashboard_panels():
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert 'instance=~"$instance"' in target["expr"], (panel["title"], target["expr"])


def test_dashboard_uses_known_metrics() -> None:
    """Every dashboard query selects ldapproxy's own metrics and nothing else."""
    for expr in dashboard_exprs():
        names = metric_names(expr)
        assert names, expr
        assert names <= KNOWN_SERIES, (expr, names - KNOWN_SERIES)


def test_dashboard_has_required_panels() -> None:
    """The dashboard shows every metric the issue lists a panel for."""
    used = set().union(*(metric_names(expr) for expr in dashboard_exprs()))
    required = {
        "ldapproxy_client_connections",
        "ldapproxy_operations_total",
        "ldapproxy_operation_duration_seconds_bucket",
        "ldapproxy_upstream_up",
        "ldapproxy_upstream_connections",
        "ldapproxy_pool_wait_seconds_bucket",
        "ldapproxy_starttls_total",
        "ldapproxy_tls_handshake_failures_total",
        "ldapproxy_plugin_denials_total",
        "ldapproxy_bytes_total",
        "ldapproxy_tls_certificate_expiry_timestamp_seconds",
        "ldapproxy_config_reloads_total",
    }
    assert required <= used, required - used
    latency = [e for e in dashboard_exprs() if "ldapproxy_operation_duration_seconds" in e]
    assert any(e.startswith("histogram_quantile(0.5,") and "by (op, le)" in e for e in latency)
    assert any(e.startswith("histogram_quantile(0.99,") and "by (op, le)" in e for e in latency)
    by_op = [e for e in dashboard_exprs() if "ldapproxy_operations_total" in e]
    assert any("by (op, result)" in e for e in by_op)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="needs promtool (Debian: prometheus)")
def test_dashboard_queries_parse_with_promtool(tmp_path: Path) -> None:
    """promtool parses every dashboard query, with Grafana's variables filled in."""
    rules = [
        {
            "record": f"dashboard:query_{number}",
            "expr": expr.replace("$__rate_interval", "1m")
            .replace("$instance", ".*")
            .replace("$job", "ldapproxy"),
        }
        for number, expr in enumerate(dashboard_exprs())
    ]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


# -- HAProxy ------------------------------------------------------------------------------


def haproxy_duration(value: str) -> float:
    """An HAProxy time such as ``30m`` or ``5s`` (default milliseconds) in seconds."""
    number, unit = re.fullmatch(r"(\d+)(us|ms|s|m|h|d)?", value).groups()
    factor = {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600, "d": 86400, None: 1e-3}
    return int(number) * factor[unit]


@pytest.mark.skipif(
    haproxy_binary() is None, reason="haproxy is not installed (apt-get install haproxy)"
)
def test_haproxy_config_is_valid() -> None:
    """`haproxy -c` accepts haproxy.cfg."""
    result = subprocess.run(
        [haproxy_binary(), "-c", "-f", str(HAPROXY_CFG)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_haproxy_backends_send_proxy_and_check_ldap() -> None:
    """Both ports are balanced by least connections to servers that get a PROXY v2
    header, also on their LDAP health checks, with timeouts longer than the proxy's."""
    sections = haproxy_sections(HAPROXY_CFG.read_text())
    defaults = {
        words[0] if words[0] != "timeout" else " ".join(words[:2]): words
        for words in sections["defaults"]
    }
    assert defaults["mode"] == ["mode", "tcp"]
    idle = option_default("limits", "idle_timeout")
    for side in ("timeout client", "timeout server"):
        assert haproxy_duration(defaults[side][2]) >= 1800, side
        assert haproxy_duration(defaults[side][2]) > idle, side
    ports = {}
    for name, statements in sections.items():
        if name.startswith("frontend "):
            (port,) = {words[1].rsplit(":", 1)[1] for words in statements if words[0] == "bind"}
            (backend,) = [words[1] for words in statements if words[0] == "default_backend"]
            ports[backend] = port
    assert sorted(ports.values()) == ["389", "636"]
    for backend, port in ports.items():
        statements = sections[f"backend {backend}"]
        assert ["balance", "leastconn"] in statements, backend
        assert ["option", "ldap-check"] in statements, backend
        servers = [words for words in statements if words[0] == "server"]
        assert len(servers) >= 2, backend
        for server in servers:
            assert server[2].endswith(f":{port}"), server
            for option in ("check", "send-proxy-v2", "check-send-proxy"):
                assert option in server[3:], (backend, server, option)


def test_haproxy_listener_snippet_loads() -> None:
    """The ldapproxy listeners quoted in haproxy.cfg's header are a valid configuration
    that expects the PROXY header from HAProxy only."""
    snippet = "\n".join(
        line[6:] for line in HAPROXY_CFG.read_text().splitlines() if line.startswith("#     ")
    )
    document = tomllib.loads(snippet)
    document["tls"] = {"certificate": "proxy.pem", "private_key": "proxy.key"}
    document["upstream"] = {"urls": ["ldaps://dc1.example.com"]}
    config = parse(document, HAPROXY_CFG)
    assert [listener.name for listener in config.listeners] == ["ldap", "ldaps"]
    servers = {
        ipaddress.ip_address(address)
        for address in re.findall(r"server \S+ ([\d.]+):", HAPROXY_CFG.read_text())
    }
    assert servers
    for listener in config.listeners:
        assert listener.proxy_protocol
        assert listener.trusted_proxies
        for network in listener.trusted_proxies:
            assert not any(server in network for server in servers), network


#: Dropped from the server lines in test_haproxy_health_checks_pass_against_real_proxy
#: while ldapproxy does not read PROXY headers yet; empty this once it does, so that the
#: test covers HAProxy's PROXY v2 headers (LOCAL ones on health checks) as well.
NOT_YET_SUPPORTED_SERVER_OPTIONS: tuple[str, ...] = ()

#: The listener keys of an ldapproxy behind the HAProxy of these tests, on loopback.
BEHIND_HAPROXY: dict[str, object] = {"proxy_protocol": True, "trusted_proxies": ["127.0.0.1/32"]}


@pytest.fixture
def haproxy_process() -> Iterator[list[subprocess.Popen[bytes]]]:
    """HAProxy processes started by a test; each is stopped at teardown."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for process in started:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.mark.skipif(
    haproxy_binary() is None, reason="haproxy is not installed (apt-get install haproxy)"
)
def test_haproxy_health_checks_pass_against_real_proxy(
    tmp_path: Path, ca: CertificateAuthority, slapd: Slapd, run_proxy, haproxy_process
) -> None:
    """HAProxy's ldap-check (plain, and inside TLS on 636) marks a real ldapproxy up, and
    clients reach it through both frontends with their TLS passed through."""
    config, listeners = proxy_config(
        tmp_path,
        ca,
        [slapd.ldaps_url],
        listeners=[
            Listener("starttls-optional", "ldap", options=BEHIND_HAPROXY),
            Listener("ldaps", "ldaps", options=BEHIND_HAPROXY),
        ],
    )
    run_proxy(config)
    proxy_ports = {"389": listeners[0].port, "636": listeners[1].port}
    front_ports = {"389": free_port(), "636": free_port()}
    stats = tmp_path / "haproxy.sock"
    sections = haproxy_sections(HAPROXY_CFG.read_text())
    lines = ["global", f"    stats socket {stats} mode 600 level admin"]
    for name, statements in sections.items():
        if name == "global":
            continue
        lines.append(name)
        for words in statements:
            if words[0] == "bind":
                port = words[1].rsplit(":", 1)[1]
                words = ["bind", f"127.0.0.1:{front_ports[port]}"]
            elif words[0] == "server":
                port = words[2].rsplit(":", 1)[1]
                if words[1] != "ldapproxy1":
                    continue
                words = [
                    "server",
                    words[1],
                    f"127.0.0.1:{proxy_ports[port]}",
                    *(w for w in words[3:] if w not in NOT_YET_SUPPORTED_SERVER_OPTIONS),
                ]
            elif words[:2] == ["default-server", "inter"]:
                words = ["default-server", "inter", "200ms", *words[3:]]
            lines.append("    " + " ".join(words))
    derived = tmp_path / "haproxy.cfg"
    derived.write_text("\n".join(lines) + "\n")
    output = tmp_path / "haproxy.log"
    with output.open("wb") as log:
        process = subprocess.Popen(
            [haproxy_binary(), "-db", "-f", str(derived)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    haproxy_process.append(process)
    deadline = time.monotonic() + 15
    while True:
        assert process.poll() is None, output.read_text()
        try:
            rows = [row for row in haproxy_stats(stats) if row["svname"] == "ldapproxy1"]
        except OSError:  # not listening yet
            rows = []
        if len(rows) == 2 and all(row["check_status"] == "L7OK" for row in rows):
            break
        assert time.monotonic() < deadline, (rows, output.read_text())
        time.sleep(0.1)
    assert all(row["status"] == "UP" for row in rows), rows
    env = slapd.ldap_env()
    for url, flags in (
        (f"ldap://127.0.0.1:{front_ports['389']}", ["-ZZ"]),
        (f"ldaps://127.0.0.1:{front_ports['636']}", []),
    ):
        credentials = ["-D", ALICE_DN, "-w", USERS[ALICE_DN]]
        result = run_ldap_tool(["ldapwhoami", "-x", *flags, "-H", url, *credentials], env)
        assert result.returncode == 0, (url, result.stderr)
        assert result.stdout.strip() == f"dn:{ALICE_DN}"
