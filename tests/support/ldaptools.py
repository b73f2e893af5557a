"""Run OpenLDAP's command-line clients (ldapsearch, ldapwhoami, ...) from tests."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping, Sequence


def _resolve(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise FileNotFoundError(
            f"{tool!r} not found on PATH: install Debian's ldap-utils (make system-deps)"
        )
    return path


def run_ldap_tool(
    args: Sequence[str],
    env: Mapping[str, str],
    input: str | None = None,
    timeout: float = 30,
) -> subprocess.CompletedProcess[str]:
    """Run an ldap-utils command such as ``["ldapsearch", "-x", ...]`` and capture its output.

    Output is text. The exit status is *not* checked: callers assert on ``returncode``
    (ldapsearch uses distinct codes, e.g. 49 for invalid credentials). A command that
    outlives *timeout* seconds is killed and raises :class:`subprocess.TimeoutExpired`.
    """
    if not args:
        raise ValueError("run_ldap_tool needs at least the tool name")
    argv = [_resolve(args[0]), *args[1:]]
    return subprocess.run(
        argv,
        env=dict(env),
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=None if input is not None else subprocess.DEVNULL,
    )
