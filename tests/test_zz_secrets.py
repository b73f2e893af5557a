"""The suite's last file (pytest runs files in name order): what every proxy of the whole
test session wrote must hold no password, and its metrics no client data.

Every :class:`support.proxy.ProxyProcess` started in the session is recorded; each one's
main log (its workers' included), the audit logs its configuration names, and the
``/metrics`` page it served when stopped are scanned for every password the tests use.
This file also makes its own traffic first (binds with right and wrong passwords, a
password change by ldapmodify and by ldappasswd, a search filtering on userPassword,
through a proxy with the audit plugin and metrics), so that it checks something real
when run alone too.  And a host the allowlist refuses never gets a byte parsed.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

from support.ldaptools import run_ldap_tool
from support.proxy import Listener, ProxyProcess, proxy_config
from support.slapd import (
    ADMIN_PASSWORD,
    ALICE_DN,
    BOB_DN,
    BULK_USER_COUNT,
    PEOPLE_DN,
    USERS,
    SlapdFactory,
    bulk_user_dn,
    bulk_user_password,
)

from ldapproxy.pki import CertificateAuthority

#: Passwords used by this file's own traffic.
NEW_PASSWORD, NEWER_PASSWORD, WRONG_PASSWORD = "Zz-Fresh-4417", "Zz-Newer-9321", "zz-wrong-pw"

#: Every distinctive password the suite sends through a proxy (short generic ones such as
#: "x" would match by chance and are left out).
SECRETS = sorted(
    {
        *USERS.values(),
        ADMIN_PASSWORD,
        *(bulk_user_password(i) for i in range(1, BULK_USER_COUNT + 1)),
        NEW_PASSWORD,
        NEWER_PASSWORD,
        WRONG_PASSWORD,
        # Other tests' own passwords.
        "Fresh-Pw-4417",
        "Newer-Pw-9321",
        "wrong-password",
        "not-bobs-password",
    }
)

#: Labels whose values are configuration (upstream URLs, certificate subjects), not
#: client data; every other label value must look like a fixed word.
CONFIGURED_LABELS = {"upstream", "subject"}
WORD = re.compile(r"[A-Za-z0-9_.+-]*")


def make_traffic(ca: CertificateAuthority, fresh_slapd: SlapdFactory, workdir: Path) -> None:
    """Passwords right and wrong, changed two ways, and searched for, through a proxy that
    audits everything and serves metrics."""
    directory = fresh_slapd()
    config, (listener,) = proxy_config(
        workdir,
        ca,
        [directory.ldaps_url],
        listeners=[Listener("starttls-optional", "ldap")],
        plugins=[{"use": "audit", "path": str(workdir / "audit.jsonl")}],
        metrics=True,
    )
    process = ProxyProcess(config).start()
    env = directory.ldap_env()
    url = listener.url

    def tool(*args: str, input: str | None = None) -> int:
        return run_ldap_tool([args[0], "-x", "-ZZ", "-H", url, *args[1:]], env, input).returncode

    try:
        assert tool("ldapwhoami", "-D", BOB_DN, "-w", USERS[BOB_DN]) == 0
        assert tool("ldapwhoami", "-D", BOB_DN, "-w", WRONG_PASSWORD) == 49
        change = (
            f"dn: {ALICE_DN}\nchangetype: modify\nreplace: userPassword\n"
            f"userPassword: {NEW_PASSWORD}\n"
        )
        assert tool("ldapmodify", "-D", ALICE_DN, "-w", USERS[ALICE_DN], input=change) == 0
        password_change = ("-a", NEW_PASSWORD, "-s", NEWER_PASSWORD)
        assert tool("ldappasswd", "-D", ALICE_DN, "-w", NEW_PASSWORD, *password_change) == 0
        for i in (1, 2, 3):
            dn, password = bulk_user_dn(i), bulk_user_password(i)
            assert tool("ldapsearch", "-D", dn, "-w", password, "-b", PEOPLE_DN, "uid=none") == 0
        filter_on_password = f"(userPassword={NEWER_PASSWORD})"
        search = ("-b", PEOPLE_DN, filter_on_password)
        assert tool("ldapsearch", "-D", ALICE_DN, "-w", NEWER_PASSWORD, *search) == 0
    finally:
        process.stop()


def outputs() -> list[tuple[Path, str]]:
    """Every log, audit log and metrics page the session's proxies wrote."""
    found = []
    for process in ProxyProcess.started:
        paths = [process.log_path, process.metrics_path, *process.audit_paths()]
        for path in paths:
            # Regular files only: some tests point the audit log at /dev/full or a FIFO.
            if path.is_file():
                found.append((path, path.read_text(errors="replace")))
    return found


def test_no_password_anywhere_the_proxies_wrote(
    ca: CertificateAuthority, fresh_slapd: SlapdFactory, tmp_path: Path
) -> None:
    make_traffic(ca, fresh_slapd, tmp_path / "traffic")
    written = outputs()
    kinds = {path.suffix for path, _ in written}
    assert {".log", ".txt", ".jsonl"} <= kinds, kinds  # logs, metrics pages, audit logs
    own = [text for path, text in written if path.is_relative_to(tmp_path)]
    assert any('"op":"extended"' in text for text in own), "the audit log saw ldappasswd"
    assert any('"op":"modify"' in text for text in own), "and the userPassword change"
    leaks = [(str(path), secret) for path, text in written for secret in SECRETS if secret in text]
    assert leaks == [], f"{len(leaks)} password(s) found in {len(written)} files: {leaks[:10]}"


def test_metric_labels_carry_no_client_data(
    ca: CertificateAuthority, fresh_slapd: SlapdFactory, tmp_path: Path
) -> None:
    """No DN, address or filter in any label of any metrics page the session saved:
    label values are fixed words, except upstream URLs and certificate subjects, which
    are configuration."""
    pages = [(path, text) for path, text in outputs() if path.suffix == ".txt"]
    if not any(path.is_relative_to(tmp_path) for path, _ in pages):
        make_traffic(ca, fresh_slapd, tmp_path / "traffic")
        pages = [(path, text) for path, text in outputs() if path.suffix == ".txt"]
    assert pages
    bad = []
    for path, text in pages:
        for line in text.splitlines():
            if line.startswith("#") or "{" not in line:
                continue
            labels = line[line.index("{") + 1 : line.rindex("}")]
            for name, value in re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', labels):
                if name in CONFIGURED_LABELS:
                    if "uid=" in value.lower():
                        bad.append((str(path), name, value))
                elif not WORD.fullmatch(value):
                    bad.append((str(path), name, value))
    assert bad == [], bad[:10]


def test_a_refused_host_never_gets_a_byte_parsed(
    ca: CertificateAuthority, fresh_slapd: SlapdFactory, tmp_path: Path
) -> None:
    """The allowlist refuses 127.0.0.1: what it sends (garbage, then a bind with a
    password) is never read: no reply, no protocol error, no byte counted, no password
    in any output."""
    directory = fresh_slapd()
    config, (listener,) = proxy_config(
        tmp_path,
        ca,
        [directory.ldaps_url],
        listeners=[Listener("none", "plain")],
        plugins=[{"use": "allowlist", "rules": [{"networks": ["192.0.2.0/24"]}]}],
        metrics=True,
    )
    process = ProxyProcess(config).start()
    try:
        for payload in (b"GET / HTTP/1.0\r\n\r\n", bind_request(BOB_DN, USERS[BOB_DN])):
            with socket.create_connection(("127.0.0.1", listener.port), timeout=5) as client:
                try:
                    client.sendall(payload)
                    received = client.recv(100)
                except ConnectionResetError:
                    received = b""
                assert received == b""
        process.wait_for_log(r"connection refused by plugin allowlist \(host\)")
    finally:
        process.stop()
    log = process.log_text()
    assert "protocol error" not in log
    page = process.metrics_path.read_text()
    # Both connections were accepted (and counted), and not one byte of theirs was read.
    assert 'ldapproxy_client_connections_total{listener="plain"} 2.0' in page
    assert not re.search(r'^ldapproxy_bytes_total\{direction="in"\} [1-9]', page, re.M), page
    assert USERS[BOB_DN] not in log + page


def bind_request(dn: str, password: str) -> bytes:
    from ldapproxy.ber import OCTET_STRING, encode_integer, encode_message, tlv

    body = encode_integer(3) + tlv(OCTET_STRING, dn.encode()) + tlv(0x80, password.encode())
    return encode_message(1, tlv(0x60, body))
