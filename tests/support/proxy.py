"""``ldapproxy run -c FILE`` as a subprocess, the way users run it.

:class:`ProxyProcess` writes a TOML configuration, starts the console script, waits for
its "ready" log line and stops it by PID.  :func:`proxy_config` builds the usual
configuration in front of a :class:`support.slapd.Slapd`.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ldapproxy.pki import CertificateAuthority

from .net import free_port

LDAPPROXY = str(Path(sys.executable).with_name("ldapproxy"))


@dataclass
class Listener:
    """One listener of a proxy under test, on its own free loopback port."""

    tls: str
    name: str
    port: int = field(default_factory=free_port)
    #: More keys of the [[listener]] table, e.g. proxy_protocol.
    options: dict[str, object] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """The URL a client uses: ldaps:// for ldaps listeners, else ldap://."""
        scheme = "ldaps" if self.tls == "ldaps" else "ldap"
        return f"{scheme}://127.0.0.1:{self.port}"


def toml_value(value: object) -> str:
    """A TOML literal for strings, numbers, booleans, and lists and inline tables of those."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    text = str(value)
    if "'" not in text and "\n" not in text:
        return f"'{text}'"
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_toml(
    listeners: list[Listener],
    sections: dict[str, dict[str, object]],
    plugins: list[dict[str, object]] | None = None,
) -> str:
    """A configuration file with the given listeners, tables and ``[[plugin]]`` tables."""
    lines = []
    for listener in listeners:
        lines += [
            "[[listener]]",
            f"name = {toml_value(listener.name)}",
            f"endpoint = 'tcp:{listener.port}:interface=127.0.0.1'",
            f"tls = {toml_value(listener.tls)}",
            *(f"{key} = {toml_value(value)}" for key, value in listener.options.items()),
            "",
        ]
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
        lines.append("")
    for plugin in plugins or []:
        lines.append("[[plugin]]")
        lines += [f"{key} = {toml_value(value)}" for key, value in plugin.items()]
        lines.append("")
    return "\n".join(lines)


def proxy_config(
    workdir: Path,
    ca: CertificateAuthority,
    upstream_urls: list[str],
    listeners: list[Listener] | None = None,
    upstream: dict[str, object] | None = None,
    limits: dict[str, object] | None = None,
    tls: dict[str, object] | None = None,
    pool: dict[str, object] | None = None,
    plugins: list[dict[str, object]] | None = None,
    metrics: bool = False,
) -> tuple[Path, list[Listener]]:
    """Write a configuration with one listener per TLS mode (unless given) and a
    certificate for the proxy from ``ca``; return its path and the listeners.  With
    ``metrics``, ``[metrics]`` serves on a free loopback port."""
    if listeners is None:
        listeners = [
            Listener("none", "plain"),
            Listener("starttls-optional", "ldap"),
            Listener("starttls-required", "strict"),
            Listener("ldaps", "ldaps"),
        ]
    workdir.mkdir(parents=True, exist_ok=True)
    cert, key = ca.issue("proxy", dns_names=["localhost"], ip_addresses=["127.0.0.1"]).write(
        workdir, "proxy"
    )
    ca_path = ca.write_certificate(workdir / "ca.pem")
    sections: dict[str, dict[str, object]] = {
        "tls": {"certificate": str(cert), "private_key": str(key), **(tls or {})},
        "upstream": {"urls": upstream_urls, "ca_file": str(ca_path), **(upstream or {})},
    }
    if pool:
        sections["pool"] = pool
    if limits:
        sections["limits"] = limits
    if metrics:
        sections["metrics"] = {"endpoint": f"tcp:{free_port()}:interface=127.0.0.1"}
    path = workdir / "ldapproxy.toml"
    path.write_text(render_toml(listeners, sections, plugins))
    return path, listeners


class ProxyProcess:
    """One ``ldapproxy run -c FILE`` subprocess; its stderr (the main log) goes to a file.

    Every started proxy is kept in :attr:`started`, and a proxy with ``[metrics]`` saves
    its ``/metrics`` page beside its log when stopped (:attr:`metrics_path`): the suite's
    last test scans all of them for secrets (``tests/test_zz_secrets.py``).
    """

    #: Every proxy started in this test session, in order.
    started: ClassVar[list[ProxyProcess]] = []

    def __init__(self, config_path: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.config_path = config_path
        self.args = args
        self.env = env or {}
        self.log_path = config_path.with_suffix(".log")
        #: The last /metrics page, saved by :meth:`stop` when [metrics] is configured.
        self.metrics_path = config_path.with_suffix(".metrics.txt")
        self.process: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 15, expect_ready: bool = True) -> ProxyProcess:
        """Start the proxy; wait for its ready line (or its exit, if not ``expect_ready``)."""
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [LDAPPROXY, "run", "-c", str(self.config_path), *self.args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env={**os.environ, "PYTHONWARNINGS": "error::ResourceWarning", **self.env},
            )
        ProxyProcess.started.append(self)
        if expect_ready:
            self.wait_for_log(r"ldapproxy \S+ ready", timeout)
        return self

    def wait_for_log(self, pattern: str, timeout: float = 10, since: int = 0) -> re.Match[str]:
        """Wait until a log line matches ``pattern`` (in the log after its first ``since``
        characters); fail if the proxy exits first."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            match = regex.search(self.log_text()[since:])
            if match:
                return match
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(
                    f"ldapproxy exited ({self.process.returncode}) before logging "
                    f"{pattern!r}:\n{self.log_text()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"no log line matching {pattern!r}:\n{self.log_text()}")
            time.sleep(0.05)

    def wait_exit(self, timeout: float = 15) -> int:
        """Wait for the process to exit by itself; return its exit status."""
        assert self.process is not None
        self.returncode = self.process.wait(timeout)
        return self.returncode

    def stop(self) -> int | None:
        """SIGTERM by PID, then SIGKILL if it lingers; return the exit status."""
        if self.process is None or self.returncode is not None:
            return self.returncode
        if self.process.poll() is None:
            self._save_metrics()
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.returncode = self.process.returncode
        return self.returncode

    @property
    def settings(self) -> dict[str, Any]:
        """The proxy's configuration file, parsed."""
        with self.config_path.open("rb") as file:
            return tomllib.load(file)

    def audit_paths(self) -> list[Path]:
        """The files the proxy's audit plugins write."""
        plugins = self.settings.get("plugin", [])
        return [Path(p["path"]) for p in plugins if p.get("use") == "audit" and "path" in p]

    def _save_metrics(self) -> None:
        endpoint = str(self.settings.get("metrics", {}).get("endpoint", ""))
        port = re.match(r"tcp:(\d+)", endpoint)
        if port is None:
            return
        try:
            url = f"http://127.0.0.1:{port.group(1)}/metrics"
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with opener.open(url, timeout=5) as page:
                self.metrics_path.write_bytes(page.read())
        except OSError:
            pass  # a proxy that is not serving: nothing to save

    def log_text(self) -> str:
        """Everything the proxy logged so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
