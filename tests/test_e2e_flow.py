"""End to end: flow control.  A client that reads slowly pauses the upstream read, so the
proxy never buffers a whole result set; and a TLS client that never finishes its
handshake is dropped after limits.tls_handshake_timeout."""

from __future__ import annotations

import base64
import os
import time
from pathlib import Path

from support.ldaptools import run_ldap_tool
from support.proxy import Listener, proxy_config
from support.rawldap import RawClient, simple_bind, subtree_search
from support.slapd import ADMIN_DN, ADMIN_PASSWORD, SUFFIX

from ldapproxy import messages as m
from ldapproxy.pki import CertificateAuthority

BLOBS = 40
BLOB_BYTES = 1024 * 1024


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def blob_ldif() -> str:
    entries = [f"dn: ou=blobs,{SUFFIX}\nobjectClass: organizationalUnit\nou: blobs\n"]
    for i in range(BLOBS):
        photo = base64.b64encode(os.urandom(BLOB_BYTES)).decode()
        entries.append(
            f"dn: uid=blob{i},ou=blobs,{SUFFIX}\nobjectClass: inetOrgPerson\nuid: blob{i}\n"
            f"cn: blob {i}\nsn: blob\njpegPhoto:: {photo}\n"
        )
    return "\n".join(entries)


def test_slow_reader_does_not_make_the_proxy_buffer_the_result(
    tmp_path: Path, ca: CertificateAuthority, fresh_slapd, run_proxy
) -> None:
    """While a client reads nothing, a 40 MiB result grows the proxy's memory by far less
    than its size; once the client reads, every entry arrives."""
    upstream = fresh_slapd()
    added = run_ldap_tool(
        ["ldapadd", "-x", "-H", upstream.ldap_url, "-D", ADMIN_DN, "-w", ADMIN_PASSWORD],
        upstream.ldap_env(),
        input=blob_ldif(),
        timeout=120,
    )
    assert added.returncode == 0, added.stderr
    config, (listener,) = proxy_config(
        tmp_path, ca, [upstream.ldaps_url], listeners=[Listener("none", "plain")]
    )
    proxy = run_proxy(config)
    # A small receive window, so the result must wait in the proxy or the upstream.
    with RawClient(listener.port, receive_buffer=32 * 1024) as client:
        client.send(simple_bind(1, ADMIN_DN, ADMIN_PASSWORD))
        assert m.result_code(client.read_frame().data) == m.SUCCESS
        baseline = rss_bytes(proxy.pid)
        client.send(subtree_search(2, f"ou=blobs,{SUFFIX}"))
        peak = baseline
        for _ in range(30):
            time.sleep(0.1)
            peak = max(peak, rss_bytes(proxy.pid))
        growth = peak - baseline
        assert growth < 12 * 1024 * 1024, f"proxy grew by {growth / 2**20:.1f} MiB"
        entries = 0
        while True:
            frame = client.read_frame()
            if frame.op == m.SEARCH_RESULT_ENTRY:
                entries += 1
            elif frame.op == m.SEARCH_RESULT_DONE:
                assert m.result_code(frame.data) == m.SUCCESS
                break
        assert entries == BLOBS + 1  # the blobs and their ou


def test_unfinished_tls_handshake_is_dropped(
    tmp_path: Path, ca: CertificateAuthority, slapd, run_proxy
) -> None:
    """An LDAPS client that sends nothing is disconnected after tls_handshake_timeout."""
    config, (listener,) = proxy_config(
        tmp_path,
        ca,
        [slapd.ldaps_url],
        listeners=[Listener("ldaps", "ldaps")],
        limits={"tls_handshake_timeout": 0.5},
    )
    proxy = run_proxy(config)
    started = time.monotonic()
    with RawClient(listener.port) as client:
        assert client.is_closed(timeout=5)
    assert time.monotonic() - started < 4
    proxy.wait_for_log(r"TLS handshake not finished within limits.tls_handshake_timeout = 0.5 s")


def test_idle_client_is_disconnected_with_notice(
    tmp_path: Path, ca: CertificateAuthority, slapd, run_proxy
) -> None:
    """A client idle for limits.idle_timeout gets a Notice of Disconnection and is closed."""
    config, (listener,) = proxy_config(
        tmp_path,
        ca,
        [slapd.ldaps_url],
        listeners=[Listener("none", "plain")],
        limits={"idle_timeout": 0.5},
    )
    proxy = run_proxy(config)
    with RawClient(listener.port) as client:
        frames = client.read_until_closed()
    assert len(frames) == 1
    assert frames[0].message_id == 0
    assert m.extended_response_name(frames[0].data) == m.NOTICE_OF_DISCONNECTION_OID
    proxy.wait_for_log(r"closing: idle for \d+ s \(limits.idle_timeout = 0.5\)")
