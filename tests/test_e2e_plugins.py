"""End to end: the bundled plugins and the documented example plugin in a running
``ldapproxy run``, with real slapd and real ldap-utils clients."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support.ldaptools import run_ldap_tool
from support.proxy import LDAPPROXY, Listener, ProxyProcess, proxy_config
from support.slapd import ADMIN_DN, ADMIN_PASSWORD, ALICE_DN, BOB_DN, USERS, Slapd

from ldapproxy.pki import CertificateAuthority

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "docs" / "examples"
PEOPLE = "ou=people,dc=example,dc=com"


def start_proxy(
    workdir: Path,
    ca: CertificateAuthority,
    slapd: Slapd,
    plugins: list[dict[str, object]],
    listeners: list[Listener] | None = None,
    env: dict[str, str] | None = None,
) -> tuple[ProxyProcess, dict[str, Listener]]:
    """A running proxy in front of ``slapd`` with ``plugins``; the caller stops it."""
    config, listeners = proxy_config(
        workdir,
        ca,
        [slapd.ldaps_url],
        listeners=listeners or [Listener("starttls-optional", "ldap"), Listener("ldaps", "ldaps")],
        plugins=plugins,
    )
    process = ProxyProcess(config, env=env).start()
    return process, {listener.name: listener for listener in listeners}


@pytest.fixture
def proxy_with(tmp_path: Path, ca: CertificateAuthority, slapd: Slapd) -> Any:
    """``proxy_with(plugins, ...)`` starts a proxy in front of the shared slapd; all are
    stopped at teardown."""
    started: list[ProxyProcess] = []

    def start(plugins: list[dict[str, object]], **kwargs: Any) -> tuple[ProxyProcess, Any]:
        process, listeners = start_proxy(
            tmp_path / f"proxy{len(started)}", ca, kwargs.pop("upstream", slapd), plugins, **kwargs
        )
        started.append(process)
        return process, listeners

    yield start
    for process in started:
        process.stop()


def ldap(slapd: Slapd, tool: str, url: str, *args: str, input: str | None = None) -> Any:
    """Run ``tool -x -H url args`` with the test CA trusted."""
    return run_ldap_tool([tool, "-x", "-H", url, *args], slapd.ldap_env(), input=input)


def read_until_closed(port: int, timeout: float = 5.0) -> bytes:
    """Connect to ``port`` without sending anything; return what arrives before EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        received = b""
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                return received
            received += chunk


def slapd_binds(slapd: Slapd, dn: str, since: int) -> int:
    """How many binds as ``dn`` slapd logged after log offset ``since``."""
    return slapd.log_text()[since:].count(f'BIND dn="{dn}" method=128')


# -- allowlist ----------------------------------------------------------------------------------


def test_denied_host_is_closed_before_any_byte(proxy_with: Any, slapd: Slapd) -> None:
    """A host outside every rule, or on a listener its rule does not name, is closed at
    accept with not one byte sent, not even a TLS handshake; allowed ones work."""
    process, listeners = proxy_with(
        [
            {
                "use": "allowlist",
                "rules": [
                    {"networks": ["192.0.2.0/24"]},
                    {"networks": ["127.0.0.0/8"], "listeners": ["ldaps"]},
                ],
            }
        ]
    )
    assert read_until_closed(listeners["ldap"].port) == b""
    process.wait_for_log(r"conn=\d+ 127\.0\.0\.1:\d+ connection refused by plugin allowlist")
    refused = ldap(slapd, "ldapwhoami", listeners["ldap"].url)
    assert refused.returncode != 0
    assert "Can't contact LDAP server (-1)" in refused.stderr
    allowed = ldap(
        slapd, "ldapwhoami", listeners["ldaps"].url, "-D", ALICE_DN, "-w", USERS[ALICE_DN]
    )
    assert allowed.returncode == 0, allowed.stderr
    assert allowed.stdout.strip() == f"dn:{ALICE_DN}"


def test_read_only_rule_rejects_a_real_ldapmodify(proxy_with: Any, slapd: Slapd) -> None:
    """A rule without ``modify`` makes ldapmodify fail with insufficientAccessRights; slapd
    never sees the modify and the entry is unchanged, while searches still work."""
    _, listeners = proxy_with(
        [
            {
                "use": "allowlist",
                "rules": [
                    {
                        "networks": ["127.0.0.0/8", "::1/128"],
                        "operations": ["bind", "search", "compare", "extended", "unbind"],
                    }
                ],
            }
        ]
    )
    url = listeners["ldap"].url
    offset = len(slapd.log_text())
    change = f"dn: {ALICE_DN}\nchangetype: modify\nreplace: description\ndescription: pwned\n"
    modify = ldap(slapd, "ldapmodify", url, "-D", ALICE_DN, "-w", USERS[ALICE_DN], input=change)
    assert modify.returncode == 50, (modify.returncode, modify.stderr)
    assert "operation modify is not allowed from this host" in modify.stderr
    assert f'MOD dn="{ALICE_DN}"' not in slapd.log_text()[offset:]
    direct = ldap(
        slapd, "ldapsearch", slapd.ldaps_url, "-D", ADMIN_DN, "-w", ADMIN_PASSWORD, "-LLL",
        "-b", ALICE_DN, "-s", "base", "description",
    )  # fmt: skip
    assert "pwned" not in direct.stdout
    assert "description: alice's entry" in direct.stdout
    search = ldap(
        slapd, "ldapsearch", url, "-D", ALICE_DN, "-w", USERS[ALICE_DN], "-LLL",
        "-b", ALICE_DN, "-s", "base", "cn",
    )  # fmt: skip
    assert search.returncode == 0
    assert "cn: Alice Liddell" in search.stdout


# -- audit --------------------------------------------------------------------------------------


def audit_records(
    path: Path, timeout: float = 5.0, until: Callable[[list[dict[str, Any]]], bool] | None = None
) -> list[dict[str, Any]]:
    """The records in the audit log at ``path``, waiting until ``until(records)`` holds."""
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text() if path.exists() else ""
        records = [json.loads(line) for line in text.splitlines()]
        if until is None or until(records) or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


def disconnects(count: int) -> Callable[[list[dict[str, Any]]], bool]:
    return lambda records: sum(r["event"] == "disconnect" for r in records) >= count


def test_audit_records_a_real_ldapsearch_and_never_a_password(
    tmp_path: Path, ca: CertificateAuthority, fresh_slapd: Any
) -> None:
    """An ldapsearch with a bind is recorded as connect, bind, search (with its filter,
    attributes and entry count) and disconnect; a password change by ldapmodify and by
    ldappasswd leaves no password in the audit log or the main log."""
    upstream = fresh_slapd()
    audit = tmp_path / "audit.jsonl"
    process, listeners = start_proxy(
        tmp_path / "proxy", ca, upstream, [{"use": "audit", "path": str(audit)}]
    )
    try:
        url = listeners["ldap"].url
        old, new, newer = USERS[ALICE_DN], "Fresh-Pw-4417", "Newer-Pw-9321"
        search = ldap(
            upstream,
            "ldapsearch",
            url,
            "-ZZ",
            "-D",
            ALICE_DN,
            "-w",
            old,
            "-LLL",
            "-b",
            PEOPLE,
            "(&(objectClass=person)(uid=alice))",
            "cn",
            "mail",
        )
        assert search.returncode == 0, search.stderr
        change = f"dn: {ALICE_DN}\nchangetype: modify\nreplace: userPassword\nuserPassword: {new}\n"
        modify = ldap(upstream, "ldapmodify", url, "-D", ALICE_DN, "-w", old, input=change)
        assert modify.returncode == 0, modify.stderr
        passwd = ldap(
            upstream, "ldappasswd", url, "-D", ALICE_DN, "-w", new, "-a", new, "-s", newer
        )
        assert passwd.returncode == 0, passwd.stderr
        records = audit_records(audit, until=disconnects(3))
    finally:
        process.stop()
    first = [r for r in records if r["conn"] == records[0]["conn"]]
    events = [(r["event"], r.get("op")) for r in first]
    assert events == [
        ("connect", None),
        ("starttls", None),
        ("op", "bind"),
        ("op", "search"),
        ("op", "unbind"),
        ("disconnect", None),
    ]
    connect, starttls, bind, search_record, _, gone = first
    assert connect["listener"] == "ldap"
    assert connect["tls"] is None
    assert connect["client"].startswith("127.0.0.1:")
    assert starttls["tls"] in ("TLSv1.2", "TLSv1.3")
    assert (bind["op"], bind["dn"], bind["result"]) == ("bind", ALICE_DN, 0)
    assert search_record["op"] == "search"
    assert search_record["base"] == PEOPLE
    assert search_record["scope"] == "sub"
    assert search_record["filter"] == "(&(objectClass=person)(uid=alice))"
    assert search_record["attrs"] == ["cn", "mail"]
    assert search_record["entries"] == 1
    assert search_record["result"] == 0
    assert search_record["duration_ms"] >= 0
    assert gone["reason"] == "client unbind"
    modify_record = next(r for r in records if r.get("op") == "modify")
    assert modify_record["attrs"] == ["userPassword"]
    assert modify_record["dn"] == ALICE_DN
    exop = next(r for r in records if r.get("op") == "extended")
    assert exop["oid"] == "1.3.6.1.4.1.4203.1.11.1"
    everything = audit.read_text() + process.log_text()
    for secret in (old, new, newer):
        assert secret not in everything


def test_audit_log_is_reopened_on_sighup(proxy_with: Any, slapd: Slapd, tmp_path: Path) -> None:
    """After logrotate moves the audit log, SIGHUP makes the proxy write to a new file at
    the configured path; the moved file keeps the earlier records."""
    audit = tmp_path / "audit.jsonl"
    process, listeners = proxy_with([{"use": "audit", "path": str(audit)}])
    url = listeners["ldap"].url
    assert ldap(slapd, "ldapwhoami", url).returncode == 0
    audit_records(audit, until=disconnects(1))
    rotated = tmp_path / "audit.jsonl.1"
    audit.rename(rotated)
    os.kill(process.pid, signal.SIGHUP)
    process.wait_for_log("reload: configuration applied")
    assert ldap(slapd, "ldapwhoami", url).returncode == 0
    after = audit_records(audit, until=disconnects(1))
    before = audit_records(rotated)
    whoami = ["connect", "bind", "extended", "unbind", "disconnect"]
    assert [r.get("op", r["event"]) for r in before] == whoami
    assert [r.get("op", r["event"]) for r in after] == whoami
    assert after[0]["conn"] != before[0]["conn"]


def test_unwritable_audit_log_is_reported_and_serving_goes_on(
    proxy_with: Any, slapd: Slapd
) -> None:
    """When the audit log cannot be written (here /dev/full), the main log says so naming
    the path, and clients are served as before."""
    process, listeners = proxy_with([{"use": "audit", "path": "/dev/full"}])
    for _ in range(2):
        whoami = ldap(
            slapd, "ldapwhoami", listeners["ldap"].url, "-D", ALICE_DN, "-w", USERS[ALICE_DN]
        )
        assert whoami.returncode == 0, whoami.stderr
    process.wait_for_log(r"/dev/full.*No space left on device")


def test_audit_log_that_cannot_be_opened_stops_startup(
    tmp_path: Path, ca: CertificateAuthority, slapd: Slapd
) -> None:
    """An audit path in a missing directory fails startup with one line naming it."""
    missing = tmp_path / "no-such-dir" / "audit.jsonl"
    config, _ = proxy_config(
        tmp_path, ca, [slapd.ldaps_url], plugins=[{"use": "audit", "path": str(missing)}]
    )
    process = ProxyProcess(config).start(expect_ready=False)
    assert process.wait_exit() == 2
    lines = process.log_text().strip().splitlines()
    assert len(lines) == 1, lines
    assert str(missing) in lines[0], lines


# -- bind_guard ---------------------------------------------------------------------------------


def test_bind_guard_stops_the_next_wrong_password_before_slapd(
    proxy_with: Any, slapd: Slapd
) -> None:
    """After max_failures_per_dn wrong passwords, further binds for that DN are refused
    with unwillingToPerform and never reach slapd (its log shows exactly N binds); other
    accounts are unaffected."""
    _, listeners = proxy_with(
        [{"use": "bind_guard", "max_failures_per_dn": 3, "max_failures_per_ip": 50}]
    )
    url = listeners["ldap"].url
    offset = len(slapd.log_text())
    for _ in range(3):
        failed = ldap(slapd, "ldapwhoami", url, "-D", ALICE_DN, "-w", "wrong-password")
        assert failed.returncode == 49, failed.stderr
    for password in ("wrong-password", USERS[ALICE_DN]):
        refused = ldap(slapd, "ldapwhoami", url, "-D", ALICE_DN, "-w", password)
        assert refused.returncode == 53, refused.stderr
        assert "too many failed binds" in refused.stderr
    assert slapd_binds(slapd, ALICE_DN, offset) == 3
    other = ldap(slapd, "ldapwhoami", url, "-D", BOB_DN, "-w", USERS[BOB_DN])
    assert other.returncode == 0
    assert other.stdout.strip() == f"dn:{BOB_DN}"


# -- the example plugin of docs/plugins.rst, and broken plugins ---------------------------------


def test_documented_example_plugin_runs(proxy_with: Any, slapd: Slapd) -> None:
    """The bind_blocklist example from docs/plugins.rst, loaded as module:Class, refuses a
    bind as a listed DN and lets others through."""
    process, listeners = proxy_with(
        [{"use": "bind_blocklist:BindBlocklist", "dns": [ADMIN_DN.upper().replace(",", ", ")]}],
        env={"PYTHONPATH": str(EXAMPLES)},
    )
    url = listeners["ldap"].url
    blocked = ldap(slapd, "ldapwhoami", url, "-D", ADMIN_DN, "-w", ADMIN_PASSWORD)
    assert blocked.returncode == 53, blocked.stderr
    assert "this account may not bind through this proxy" in blocked.stderr
    process.wait_for_log(r"bind \(message ID 1\) denied by plugin bind_blocklist:BindBlocklist")
    alice = ldap(slapd, "ldapwhoami", url, "-D", ALICE_DN, "-w", USERS[ALICE_DN])
    assert alice.returncode == 0, alice.stderr


BROKEN_PLUGIN = """
from ldapproxy.hooks import Plugin

class BrokenDecision(Plugin):
    def request(self, request):
        raise RuntimeError("decision bug")

class BrokenObserver(Plugin):
    def response(self, response):
        raise RuntimeError("observer bug")
"""


@pytest.mark.parametrize(("plugin", "code"), [("BrokenDecision", 53), ("BrokenObserver", 0)])
def test_broken_plugins_fail_closed_or_are_skipped(
    proxy_with: Any, slapd: Slapd, tmp_path: Path, plugin: str, code: int
) -> None:
    """A decision hook that raises denies (fail closed); an observation hook that raises
    is logged and the client is served."""
    (tmp_path / "broken_plugin.py").write_text(BROKEN_PLUGIN)
    process, listeners = proxy_with(
        [{"use": f"broken_plugin:{plugin}"}], env={"PYTHONPATH": str(tmp_path)}
    )
    whoami = ldap(slapd, "ldapwhoami", listeners["ldap"].url, "-D", ALICE_DN, "-w", USERS[ALICE_DN])
    assert whoami.returncode == code, whoami.stderr
    process.wait_for_log("bug")


@pytest.mark.parametrize(
    ("plugin", "message"),
    [
        (
            {"use": "allowlst"},
            "no plugin named 'allowlst' (installed: allowlist, audit, bind_guard",
        ),
        ({"use": "allowlist", "rules": [{"networks": ["10.0.0.0/33"]}]}, "rules[0].networks[0]"),
        ({"use": "bind_guard", "window": 0}, "window = 0"),
        ({"use": "audit", "path": "x", "buffer": 5}, "unknown key 'buffer'"),
        ({"use": "bind_blocklist:BindBlocklist"}, "dns is required"),
        ({"use": "no_such_module:Plugin"}, "cannot import 'no_such_module:Plugin'"),
    ],
)
def test_bad_plugin_configuration_fails_startup_in_one_line(
    tmp_path: Path, ca: CertificateAuthority, slapd: Slapd, plugin: dict[str, object], message: str
) -> None:
    """An unknown plugin or a bad plugin key stops ``ldapproxy run`` and ``ldapproxy check``
    with one line naming the [[plugin]] table and the key."""
    config, _ = proxy_config(tmp_path, ca, [slapd.ldaps_url], plugins=[plugin])
    env = {**os.environ, "PYTHONPATH": str(EXAMPLES)}
    for command in ("run", "check"):
        done = subprocess.run(
            [LDAPPROXY, command, "-c", str(config)],
            capture_output=True,
            text=True,
            env=env,
            timeout=30,
            check=False,
        )
        assert done.returncode == 2, done
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, lines
        assert "[[plugin]] #1" in lines[0], lines[0]
        assert message in lines[0], lines[0]


def test_sighup_applies_new_allowlist_rules_to_new_connections(
    proxy_with: Any, slapd: Slapd
) -> None:
    """Editing the allowlist rules and sending SIGHUP applies them to connections accepted
    afterwards: a read-only rule starts refusing modifies, with no restart."""
    everything = {"use": "allowlist", "rules": [{"networks": ["127.0.0.0/8"]}]}
    process, listeners = proxy_with([everything])
    url = listeners["ldap"].url
    change = f"dn: {ALICE_DN}\nchangetype: modify\nreplace: description\ndescription: reload\n"
    read_only = {
        "use": "allowlist",
        "rules": [{"networks": ["127.0.0.0/8"], "operations": ["bind", "search", "unbind"]}],
    }
    text = process.config_path.read_text()
    process.config_path.write_text(
        text.replace("rules = [{ networks = ['127.0.0.0/8'] }]", "rules = []")
    )
    # First a broken edit (empty rules): refused, the running rules stay.
    os.kill(process.pid, signal.SIGHUP)
    process.wait_for_log(r"reload failed, the running configuration stays in force: .*rules")
    whoami = ldap(slapd, "ldapwhoami", url, "-D", ALICE_DN, "-w", USERS[ALICE_DN])
    assert whoami.returncode == 0, whoami.stderr
    from support.proxy import toml_value

    process.config_path.write_text(
        text.replace(
            "rules = [{ networks = ['127.0.0.0/8'] }]", f"rules = {toml_value(read_only['rules'])}"
        )
    )
    os.kill(process.pid, signal.SIGHUP)
    process.wait_for_log("reload: configuration applied")
    modify = ldap(slapd, "ldapmodify", url, "-D", ALICE_DN, "-w", USERS[ALICE_DN], input=change)
    assert modify.returncode == 50, (modify.returncode, modify.stderr)
    assert "operation modify is not allowed from this host" in modify.stderr


def test_sighup_with_a_plugin_that_cannot_start_keeps_the_running_one(
    proxy_with: Any, slapd: Slapd, tmp_path: Path
) -> None:
    """A reload whose audit log cannot be opened is refused with one line naming the path;
    the running audit log keeps recording."""
    audit = tmp_path / "audit.jsonl"
    process, listeners = proxy_with([{"use": "audit", "path": str(audit)}])
    url = listeners["ldap"].url
    missing = tmp_path / "no-such-dir" / "audit.jsonl"
    text = process.config_path.read_text()
    process.config_path.write_text(text.replace(str(audit), str(missing)))
    os.kill(process.pid, signal.SIGHUP)
    line = process.wait_for_log(r"reload failed, the running configuration stays in force: .*")
    assert str(missing) in line.group(0)
    assert ldap(slapd, "ldapwhoami", url).returncode == 0
    records = audit_records(audit, until=disconnects(1))
    assert [r.get("op", r["event"]) for r in records][-1] == "disconnect"
