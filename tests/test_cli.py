"""The ``ldapproxy`` command as users run it: startup errors, ``check``, ``demo``, ``--version``."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from support.ldaptools import run_ldap_tool
from support.net import free_port
from support.proxy import LDAPPROXY, Listener, ProxyProcess, proxy_config
from support.slapd import Slapd

from ldapproxy import __version__
from ldapproxy.pki import CertificateAuthority


def ldapproxy(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [LDAPPROXY, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """A startup error: non-zero exit, exactly one stderr line, no traceback."""
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_version() -> None:
    """--version prints the package version."""
    result = ldapproxy("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"ldapproxy {__version__}"


@pytest.mark.parametrize("command", ["run", "check"])
def test_bad_config_is_one_line_naming_file_key_and_value(tmp_path: Path, command: str) -> None:
    """A bad value fails with one line naming the file, the key, the value and what is expected."""
    config = tmp_path / "bad.toml"
    config.write_text(
        "[[listener]]\nendpoint = 'tcp:3389'\ntls = 'ssl'\n[upstream]\nurls = ['ldaps://dc1']\n"
    )
    result = ldapproxy(command, "-c", str(config))
    assert result.returncode == 2
    assert_one_line_error(result, str(config), "tls", "'ssl'", "expected one of")


def test_missing_config_file(tmp_path: Path) -> None:
    """A missing configuration file is one clear line."""
    result = ldapproxy("run", "-c", str(tmp_path / "nope.toml"))
    assert_one_line_error(result, "nope.toml", "no such configuration file")


def test_port_in_use(tmp_path: Path, ca: CertificateAuthority, slapd: Slapd) -> None:
    """A listener whose port is taken stops startup with one line naming the listener."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config, _ = proxy_config(
            tmp_path, ca, [slapd.ldaps_url], listeners=[Listener("none", "busy", port)]
        )
        result = ldapproxy("run", "-c", str(config))
    assert result.returncode == 1
    assert_one_line_error(result, "listener 'busy'", f"tcp:{port}", "Address already in use")


def test_unreadable_certificate(tmp_path: Path, ca: CertificateAuthority, slapd: Slapd) -> None:
    """A certificate file that cannot be read is one line naming the setting and path."""
    missing = tmp_path / "missing.pem"
    config, _ = proxy_config(tmp_path, ca, [slapd.ldaps_url], tls={"certificate": str(missing)})
    result = ldapproxy("run", "-c", str(config))
    assert_one_line_error(result, "[tls] certificate", str(missing), "cannot read")


def test_key_not_matching_certificate(
    tmp_path: Path, ca: CertificateAuthority, slapd: Slapd
) -> None:
    """A private key that belongs to another certificate is refused at startup."""
    _, other_key = ca.issue("other").write(tmp_path, "other")
    config, _ = proxy_config(tmp_path, ca, [slapd.ldaps_url], tls={"private_key": str(other_key)})
    result = ldapproxy("run", "-c", str(config))
    assert_one_line_error(result, "[tls] private_key", str(other_key), "does not match")


def test_check_without_connect(tmp_path: Path, ca: CertificateAuthority, slapd: Slapd) -> None:
    """check validates the configuration and exits 0 without contacting upstreams."""
    config, _ = proxy_config(tmp_path, ca, [f"ldaps://127.0.0.1:{free_port()}"])
    result = ldapproxy("check", "-c", str(config))
    assert result.returncode == 0, result.stderr
    assert "configuration OK" in result.stdout


def test_check_connect_reports_each_upstream(
    tmp_path: Path, ca: CertificateAuthority, slapd: Slapd
) -> None:
    """check --connect prints TLS version, subject, issuer, SANs, expiry and the verdict."""
    config, _ = proxy_config(tmp_path, ca, [slapd.ldaps_url, slapd.ldap_url])
    result = ldapproxy("check", "-c", str(config), "--connect")
    assert result.returncode == 0, result.stdout + result.stderr
    for url in (slapd.ldaps_url, slapd.ldap_url):
        block = result.stdout.split(url + "\n", 1)[1]
        assert "reachable: yes" in block
        assert re.search(r"tls: TLSv1\.[23] ", block)
        assert "subject: CN=localhost" in block
        assert "issuer: CN=ldapproxy test CA" in block
        assert "sans: DNS:localhost, IP:127.0.0.1" in block
        assert re.search(r"expires: \d{4}-\d\d-\d\dT", block)
        assert "verification: OK" in block


def test_check_connect_fails_on_bad_upstreams(
    tmp_path: Path, ca: CertificateAuthority, slapd: Slapd
) -> None:
    """check --connect exits non-zero and says why for an untrusted and an unreachable URL."""
    dead = f"ldaps://127.0.0.1:{free_port()}"
    foreign = CertificateAuthority.generate("foreign CA")
    config, _ = proxy_config(tmp_path, ca, [slapd.ldaps_url, dead])
    # Trust a CA that did not sign slapd's certificate.
    foreign.write_certificate(tmp_path / "ca.pem")
    result = ldapproxy("check", "-c", str(config), "--connect")
    assert result.returncode == 1
    good, bad = result.stdout.split(slapd.ldaps_url + "\n", 1)[1].split(dead + "\n", 1)
    assert "reachable: yes" in good
    assert "subject: CN=localhost" in good, "the certificate is shown even when untrusted"
    assert "verification: FAILED: unknown CA" in good
    assert "reachable: no" in bad
    assert "verification: FAILED: cannot connect" in bad


def test_sigterm_exits_zero(tmp_path: Path, ca: CertificateAuthority, slapd: Slapd) -> None:
    """The foreground daemon exits 0 on SIGTERM."""
    config, _ = proxy_config(tmp_path, ca, [slapd.ldaps_url])
    proxy = ProxyProcess(config).start()
    assert proxy.stop() == 0


def test_demo_answers_ldapwhoami_zz(tmp_path: Path) -> None:
    """`ldapproxy demo` serves the embedded directory through the proxy; -ZZ works."""
    port, ldaps_port = free_port(), free_port()
    log = (tmp_path / "demo.out").open("w+")
    process = subprocess.Popen(
        [LDAPPROXY, "demo", "--port", str(port), "--ldaps-port", str(ldaps_port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while "Press Ctrl-C" not in (text := (tmp_path / "demo.out").read_text()):
            assert process.poll() is None, text
            assert time.monotonic() < deadline, text
            time.sleep(0.05)
        ca_path = re.search(r"LDAPTLS_CACERT=(\S+)", text).group(1)
        command = re.search(r"(ldapwhoami -x -ZZ .*)", text).group(1)
        assert f"ldap://127.0.0.1:{port}" in command
        dn = re.search(r"-D '([^']+)'", command).group(1)
        password = re.search(r"-w (\S+)", command).group(1)
        env = {
            **os.environ,
            "HOME": str(tmp_path),
            "LDAPTLS_CACERT": ca_path,
            "LDAPTLS_REQCERT": "demand",
        }
        for url, flags in (
            (f"ldap://127.0.0.1:{port}", ["-ZZ"]),
            (f"ldaps://127.0.0.1:{ldaps_port}", []),
        ):
            result = run_ldap_tool(
                ["ldapwhoami", "-x", *flags, "-H", url, "-D", dn, "-w", password], env
            )
            assert result.returncode == 0, result.stderr
            assert result.stdout.strip() == f"dn:{dn}"
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(10)
        log.close()
    assert process.returncode == 0


@pytest.mark.parametrize("level", ["info", "debug"])
def test_log_level_debug_adds_a_line_per_connection(
    tmp_path: Path, ca: CertificateAuthority, slapd: Slapd, level: str
) -> None:
    """--log-level debug logs each client connection's start and end; info does not."""
    config, listeners = proxy_config(
        tmp_path, ca, [slapd.ldaps_url], listeners=[Listener("none", "plain")]
    )
    proxy = ProxyProcess(config, "--log-level", level).start()
    try:
        result = run_ldap_tool(["ldapwhoami", "-x", "-H", listeners[0].url], slapd.ldap_env())
        assert result.returncode == 0, result.stderr
        if level == "debug":
            proxy.wait_for_log(r"conn=\d+ 127\.0\.0\.1:\d+ connected to listener plain")
            proxy.wait_for_log(
                r"conn=\d+ 127\.0\.0\.1:\d+ closed \(client unbind\) on listener plain"
            )
    finally:
        assert proxy.stop() == 0
    if level == "info":
        assert "connected to listener" not in proxy.log_text()
        assert "closed (client unbind)" not in proxy.log_text()


def test_unknown_log_level_is_refused() -> None:
    """An unknown --log-level is a usage error."""
    result = ldapproxy("run", "-c", "x.toml", "--log-level", "chatty")
    assert result.returncode == 2
    assert "--log-level" in result.stderr
