"""End to end: upstream TLS verification, failover in URL order, and upstream failures,
with ``ldapproxy run`` in front of real slapd instances."""

from __future__ import annotations

import datetime
import re
from pathlib import Path

import pytest
from support.ldaptools import run_ldap_tool
from support.net import free_port
from support.proxy import Listener, proxy_config
from support.rawldap import RawClient, simple_bind, subtree_search, whoami
from support.slapd import ADMIN_DN, ADMIN_PASSWORD, ALICE_DN, USERS, Slapd

from ldapproxy import messages as m
from ldapproxy.ber import OCTET_STRING, encode_integer, tlv
from ldapproxy.pki import CertificateAuthority

SYNC_REQUEST_OID = b"1.3.6.1.4.1.4203.1.9.1.1"


def plain_listener() -> list[Listener]:
    return [Listener("none", "plain")]


def whoami_alice(listener: Listener, env: dict[str, str]):
    return run_ldap_tool(
        ["ldapwhoami", "-x", "-H", listener.url, "-D", ALICE_DN, "-w", USERS[ALICE_DN]], env
    )


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("wrong-ca", r"unknown CA"),
        ("wrong-hostname", r"hostname mismatch"),
        ("expired", r"certificate expired"),
    ],
)
def test_unverifiable_upstream_is_never_used(
    case: str,
    reason: str,
    tmp_path: Path,
    ca: CertificateAuthority,
    fresh_slapd,
    run_proxy,
) -> None:
    """An upstream whose certificate fails verification gets no client bytes; the client gets
    unavailable (52) and the log names the URL and the reason."""
    if case == "wrong-ca":
        server_cert = CertificateAuthority.generate("some other CA").issue(
            "localhost", dns_names=["localhost"], ip_addresses=["127.0.0.1"]
        )
    elif case == "wrong-hostname":
        server_cert = ca.issue("dc9.example.test", dns_names=["dc9.example.test"])
    else:
        server_cert = ca.issue(
            "localhost",
            dns_names=["localhost"],
            ip_addresses=["127.0.0.1"],
            not_after=now() - datetime.timedelta(days=1),
        )
    upstream: Slapd = fresh_slapd(server_cert=server_cert)
    config, (listener,) = proxy_config(
        tmp_path, ca, [upstream.ldaps_url], listeners=plain_listener()
    )
    seen_before = len(upstream.log_text())
    proxy = run_proxy(config)
    result = whoami_alice(listener, upstream.ldap_env())
    assert result.returncode == 52, result
    assert "no upstream directory is available" in result.stderr
    proxy.wait_for_log(re.escape(upstream.ldaps_url) + r".*" + reason)
    upstream_saw = upstream.log_text()[seen_before:]
    # Only the connections accepted from now on are the proxy's: the log of the fixture's
    # own readiness check (an earlier connection) may still be arriving.
    proxy_conns = set(re.findall(r"conn=(\d+) fd=\d+ ACCEPT", upstream_saw))
    assert proxy_conns, "the proxy should have tried this upstream"
    operations = [
        line
        for line in upstream_saw.splitlines()
        if " op=" in line and re.search(r"conn=(\d+) ", line).group(1) in proxy_conns  # type: ignore[union-attr]
    ]
    assert operations == [], f"an LDAP operation reached the upstream:\n{upstream_saw}"


def test_tls_server_name_verifies_a_different_name(
    tmp_path: Path, ca: CertificateAuthority, fresh_slapd, run_proxy
) -> None:
    """tls_server_name lets the proxy dial an IP and verify the directory's DNS name."""
    upstream = fresh_slapd(server_cert=ca.issue("dc9.example.test", dns_names=["dc9.example.test"]))
    config, (listener,) = proxy_config(
        tmp_path,
        ca,
        [upstream.ldaps_url],
        listeners=plain_listener(),
        upstream={"tls_server_name": "dc9.example.test"},
    )
    run_proxy(config)
    result = whoami_alice(listener, upstream.ldap_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"dn:{ALICE_DN}"


def test_starttls_upstream_url(
    tmp_path: Path, ca: CertificateAuthority, slapd: Slapd, run_proxy
) -> None:
    """An ldap:// upstream URL is used only after a verified StartTLS."""
    config, (listener,) = proxy_config(tmp_path, ca, [slapd.ldap_url], listeners=plain_listener())
    run_proxy(config)
    result = whoami_alice(listener, slapd.ldap_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"dn:{ALICE_DN}"


def test_urls_are_tried_in_order(
    tmp_path: Path, ca: CertificateAuthority, slapd: Slapd, run_proxy
) -> None:
    """When the first URL refuses connections, the next one serves the client."""
    dead = f"ldaps://127.0.0.1:{free_port()}"
    config, (listener,) = proxy_config(
        tmp_path, ca, [dead, slapd.ldaps_url], listeners=plain_listener()
    )
    proxy = run_proxy(config)
    result = whoami_alice(listener, slapd.ldap_env())
    assert result.returncode == 0, result.stderr
    proxy.wait_for_log(r"upstream " + re.escape(dead) + r" is down: cannot connect")


def test_no_upstream_reachable_answers_unavailable_and_keeps_session(
    tmp_path: Path, ca: CertificateAuthority, run_proxy
) -> None:
    """With every upstream down, each request gets unavailable (52) and the session stays open."""
    dead = f"ldaps://127.0.0.1:{free_port()}"
    config, (listener,) = proxy_config(tmp_path, ca, [dead], listeners=plain_listener())
    run_proxy(config)
    with RawClient(listener.port) as client:
        client.send(simple_bind(1, ALICE_DN, USERS[ALICE_DN]))
        frame = client.read_frame()
        assert (frame.message_id, frame.op) == (1, m.BIND_RESPONSE)
        assert m.result_code(frame.data) == m.UNAVAILABLE
        client.send(whoami(2))
        frame = client.read_frame()
        assert (frame.message_id, m.result_code(frame.data)) == (2, m.UNAVAILABLE)


def persistent_search(message_id: int, base: str) -> bytes:
    """A subtree search with the syncrepl refreshAndPersist control (RFC 4533)."""
    control = tlv(
        0x30,
        tlv(OCTET_STRING, SYNC_REQUEST_OID)
        + tlv(0x01, b"\xff")
        + tlv(OCTET_STRING, tlv(0x30, encode_integer(3, 0x0A))),
    )
    return subtree_search(message_id, base, tlv(0xA0, control))


def test_upstream_dying_mid_search_sends_notice(
    tmp_path: Path, ca: CertificateAuthority, fresh_slapd, run_proxy
) -> None:
    """When the upstream dies during a persistent search, the client gets a Notice of
    Disconnection (unavailable) and the connection closes; it is never left hanging."""
    upstream = fresh_slapd()
    config, (listener,) = proxy_config(
        tmp_path, ca, [upstream.ldaps_url], listeners=plain_listener()
    )
    proxy = run_proxy(config)
    with RawClient(listener.port) as client:
        client.send(simple_bind(1, ADMIN_DN, ADMIN_PASSWORD))
        assert m.result_code(client.read_frame().data) == m.SUCCESS
        client.send(persistent_search(2, "dc=example,dc=com"))
        entries = 0
        while entries < 100:
            frame = client.read_frame()
            assert frame.message_id == 2
            entries += frame.op == m.SEARCH_RESULT_ENTRY
        upstream.stop()
        rest = client.read_until_closed()
    notices = [f for f in rest if f.message_id == 0]
    assert len(notices) == 1, rest
    assert m.extended_response_name(notices[0].data) == m.NOTICE_OF_DISCONNECTION_OID
    assert m.result_code(notices[0].data) == m.UNAVAILABLE
    proxy.wait_for_log(r"conn=\d+ 127\.0\.0\.1:\d+ upstream connection lost")
