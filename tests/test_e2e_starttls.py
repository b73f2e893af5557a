"""End to end: StartTLS and starttls-required behaviour of a running proxy, with real clients
and a raw socket where the exact bytes matter."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support.ldaptools import run_ldap_tool
from support.proxy import Listener, ProxyProcess, proxy_config
from support.rawldap import RawClient, extended_value, simple_bind, starttls, whoami
from support.slapd import ALICE_DN, USERS, Slapd

from ldapproxy import messages as m
from ldapproxy.pki import CertificateAuthority


@pytest.fixture(scope="module")
def proxy(
    ca: CertificateAuthority, slapd: Slapd, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ProxyProcess, dict[str, Listener]]]:
    """One proxy with a listener of every TLS mode in front of the shared slapd."""
    config, listeners = proxy_config(tmp_path_factory.mktemp("proxy"), ca, [slapd.ldaps_url])
    process = ProxyProcess(config).start()
    try:
        yield process, {listener.tls: listener for listener in listeners}
    finally:
        process.stop()


@pytest.fixture(scope="module")
def proxy_ca(proxy: tuple[ProxyProcess, dict[str, Listener]]) -> Path:
    """The CA certificate clients use to verify the proxy."""
    return proxy[0].config_path.parent / "ca.pem"


def result_of(client: RawClient) -> tuple[int, int, int]:
    """(message ID, op tag, resultCode) of the next PDU."""
    frame = client.read_frame()
    return frame.message_id, frame.op, m.result_code(frame.data)


def test_starttls_then_bind_over_tls(proxy, proxy_ca: Path) -> None:
    """StartTLS succeeds in plaintext with the StartTLS responseName, then LDAP runs over TLS."""
    _, listeners = proxy
    with RawClient(listeners["starttls-optional"].port) as client:
        client.send(starttls(1))
        frame = client.read_frame()
        assert (frame.message_id, frame.op, m.result_code(frame.data)) == (
            1,
            m.EXTENDED_RESPONSE,
            m.SUCCESS,
        )
        assert m.extended_response_name(frame.data) == m.STARTTLS_OID
        client.start_tls(proxy_ca)
        client.send(simple_bind(2, ALICE_DN, USERS[ALICE_DN]) + whoami(3))
        assert result_of(client) == (2, m.BIND_RESPONSE, m.SUCCESS)
        frame = client.read_frame()
        assert extended_value(frame.data) == f"dn:{ALICE_DN}".encode()


def test_starttls_injection_is_never_executed(proxy, slapd: Slapd) -> None:
    """A request sent right after StartTLS, in the same packet, is never executed; it closes."""
    process, listeners = proxy
    marker = "uid=injected-marker,ou=people,dc=example,dc=com"
    with RawClient(listeners["starttls-optional"].port) as client:
        client.send(starttls(1) + simple_bind(2, marker, "x"))
        frames = client.read_until_closed()
    assert frames == [], "no StartTLS response and no bind response may be sent"
    process.wait_for_log(r"conn=\d+ \S+ closing: \d+ byte\(s\) sent after StartTLS")
    assert marker not in slapd.log_text(), "the injected bind reached the upstream"


def test_double_starttls_is_operations_error(proxy, proxy_ca: Path) -> None:
    """A second StartTLS inside TLS gets operationsError and the session continues."""
    _, listeners = proxy
    with RawClient(listeners["starttls-optional"].port) as client:
        client.send(starttls(1))
        assert result_of(client) == (1, m.EXTENDED_RESPONSE, m.SUCCESS)
        client.start_tls(proxy_ca)
        client.send(starttls(2))
        assert result_of(client) == (2, m.EXTENDED_RESPONSE, m.OPERATIONS_ERROR)
        client.send(whoami(3))
        assert result_of(client) == (3, m.EXTENDED_RESPONSE, m.SUCCESS)


def test_starttls_on_ldaps_listener_is_operations_error(proxy, proxy_ca: Path) -> None:
    """StartTLS on an LDAPS connection gets operationsError."""
    _, listeners = proxy
    with RawClient(listeners["ldaps"].port) as client:
        client.start_tls(proxy_ca)
        client.send(starttls(1))
        assert result_of(client) == (1, m.EXTENDED_RESPONSE, m.OPERATIONS_ERROR)


def test_starttls_on_plain_listener_is_refused(proxy) -> None:
    """A `none` listener answers StartTLS with unavailable and keeps serving in plaintext."""
    _, listeners = proxy
    with RawClient(listeners["none"].port) as client:
        client.send(starttls(1))
        assert result_of(client) == (1, m.EXTENDED_RESPONSE, m.UNAVAILABLE)
        client.send(whoami(2))
        assert result_of(client) == (2, m.EXTENDED_RESPONSE, m.SUCCESS)


def test_starttls_with_outstanding_operation_is_operations_error(proxy) -> None:
    """StartTLS while a search is still running gets operationsError."""
    _, listeners = proxy
    from support.rawldap import subtree_search

    with RawClient(listeners["starttls-optional"].port) as client:
        client.send(simple_bind(1, ALICE_DN, USERS[ALICE_DN]))
        assert result_of(client) == (1, m.BIND_RESPONSE, m.SUCCESS)
        client.send(subtree_search(2, "dc=example,dc=com") + starttls(3))
        responses = {}
        while 2 not in responses or 3 not in responses:
            frame = client.read_frame()
            if frame.op in m.FINAL_RESPONSES:
                responses[frame.message_id] = (frame.op, m.result_code(frame.data))
        assert responses[3] == (m.EXTENDED_RESPONSE, m.OPERATIONS_ERROR)
        assert responses[2] == (m.SEARCH_RESULT_DONE, m.SUCCESS)


@pytest.mark.parametrize(
    ("args", "exit_code"),
    [
        (["ldapwhoami", "-x", "-D", ALICE_DN, "-w", USERS[ALICE_DN]], 13),
        (["ldapsearch", "-x", "-b", "dc=example,dc=com", "uid=alice"], 13),
        (["ldapcompare", "-x", ALICE_DN, "uid:alice"], 13),
        (["ldapdelete", "-x", "uid=nobody,dc=example,dc=com"], 13),
    ],
)
def test_starttls_required_refuses_plaintext_requests(proxy, slapd: Slapd, args, exit_code) -> None:
    """Before StartTLS, a starttls-required listener answers confidentialityRequired (13)."""
    _, listeners = proxy
    url = listeners["starttls-required"].url
    result = run_ldap_tool([args[0], "-H", url, *args[1:]], slapd.ldap_env())
    assert result.returncode == exit_code, result.stderr
    assert "Confidentiality required" in result.stdout + result.stderr
    assert "StartTLS is required on this listener" in result.stdout + result.stderr


def test_starttls_required_answers_anonymous_bind_locally(proxy, slapd: Slapd) -> None:
    """An anonymous bind before TLS succeeds without reaching the upstream; WhoAmI is refused."""
    _, listeners = proxy
    with RawClient(listeners["starttls-required"].port) as client:
        client.send(simple_bind(1, "", ""))
        assert result_of(client) == (1, m.BIND_RESPONSE, m.SUCCESS)
        client.send(whoami(2))
        assert result_of(client) == (2, m.EXTENDED_RESPONSE, m.CONFIDENTIALITY_REQUIRED)


def test_starttls_required_allows_root_dse_read(proxy, slapd: Slapd) -> None:
    """A base-scope root DSE read passes in plaintext on a starttls-required listener."""
    _, listeners = proxy
    url = listeners["starttls-required"].url
    result = run_ldap_tool(
        ["ldapsearch", "-x", "-LLL", "-H", url, "-s", "base", "-b", "", "namingContexts"],
        slapd.ldap_env(),
    )
    assert result.returncode == 0, result.stderr
    assert "namingContexts: dc=example,dc=com" in result.stdout


def test_starttls_required_refused_request_typed_response(proxy) -> None:
    """Each refused request gets its own response type, with the same message ID."""
    _, listeners = proxy
    with RawClient(listeners["starttls-required"].port) as client:
        client.send(simple_bind(5, ALICE_DN, USERS[ALICE_DN]) + whoami(6))
        assert result_of(client) == (5, m.BIND_RESPONSE, m.CONFIDENTIALITY_REQUIRED)
        assert result_of(client) == (6, m.EXTENDED_RESPONSE, m.CONFIDENTIALITY_REQUIRED)


def test_starttls_required_with_starttls_works(proxy, slapd: Slapd) -> None:
    """With -ZZ, the starttls-required listener serves normally."""
    _, listeners = proxy
    result = run_ldap_tool(
        [
            "ldapwhoami",
            "-x",
            "-ZZ",
            "-H",
            listeners["starttls-required"].url,
            "-D",
            ALICE_DN,
            "-w",
            USERS[ALICE_DN],
        ],
        {**slapd.ldap_env(), "LDAPTLS_CACERT": str(proxy[0].config_path.parent / "ca.pem")},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"dn:{ALICE_DN}"


def test_plaintext_bytes_after_starttls_fail_the_handshake(proxy, proxy_ca: Path) -> None:
    """Plain LDAP sent after a successful StartTLS response is treated as a bad handshake."""
    process, listeners = proxy
    with RawClient(listeners["starttls-optional"].port) as client:
        client.send(starttls(1))
        assert result_of(client) == (1, m.EXTENDED_RESPONSE, m.SUCCESS)
        client.send(whoami(2))
        assert client.is_closed()
    process.wait_for_log(r"TLS handshake failed")
