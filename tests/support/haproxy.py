"""Debian's HAProxy in tests: finding it, reading its configuration files, and asking its
admin socket for server states."""

from __future__ import annotations

import csv
import io
import os
import shutil
import socket
from pathlib import Path


def haproxy_binary() -> str | None:
    """The haproxy executable, on PATH or where Debian installs it."""
    found = shutil.which("haproxy")
    if found is None and os.access("/usr/sbin/haproxy", os.X_OK):
        found = "/usr/sbin/haproxy"
    return found


def haproxy_sections(text: str) -> dict[str, list[list[str]]]:
    """The statements of each section ("global", "backend ldapproxy"...), as word lists."""
    sections: dict[str, list[list[str]]] = {}
    current = None
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if not line[0].isspace():
            current = " ".join(words)
            sections[current] = []
        else:
            assert current is not None, line
            sections[current].append(words)
    return sections


def haproxy_stats(socket_path: Path) -> list[dict[str, str]]:
    """The rows of HAProxy's "show stat" on its admin socket."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(str(socket_path))
        sock.sendall(b"show stat\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return list(csv.DictReader(io.StringIO(data.decode().lstrip("# "))))
