"""Smoke tests for the slapd test fixture, talking to slapd directly with real clients."""

from __future__ import annotations

import re
import ssl
import warnings
from datetime import UTC, datetime, timedelta

import pytest
from support.ldaptools import run_ldap_tool
from support.net import LOOPBACK
from support.slapd import (
    ADMIN_READER_DN,
    ALICE_DN,
    BOB_DN,
    BULK_USER_COUNT,
    CASE_IGNORE_ORDERING,
    USERS,
    VAULT_SECRET,
    Slapd,
    SlapdFactory,
    bulk_user_dn,
    bulk_user_password,
)

from ldapproxy.pki import CertificateAuthority

with warnings.catch_warnings():
    # ldap3 2.9.1 imports tagMap/typeMap, which pyasn1 >= 0.6 deprecates on access.
    warnings.simplefilter("ignore", DeprecationWarning)
    import ldap3

pytestmark = pytest.mark.slapd

SSS_OID = "1.2.840.113556.1.4.473"
VLV_OID = "2.16.840.1.113730.3.4.9"
PAGED_OID = "1.2.840.113556.1.4.319"
SYNC_OID = "1.3.6.1.4.1.4203.1.9.1.1"


def _whoami(url: str, env: dict[str, str], dn: str, password: str, *extra: str) -> str:
    result = run_ldap_tool(["ldapwhoami", "-x", *extra, "-H", url, "-D", dn, "-w", password], env)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def _values(ldif: str, attribute: str) -> list[str]:
    return re.findall(rf"^{attribute}: (.*)$", ldif, flags=re.MULTILINE | re.IGNORECASE)


def test_simple_bind_over_plain_ldap(slapd: Slapd) -> None:
    """ldapwhoami with alice's password over ldap:// reports alice's DN."""
    assert _whoami(slapd.ldap_url, slapd.ldap_env(), ALICE_DN, USERS[ALICE_DN]) == f"dn:{ALICE_DN}"


def test_wrong_password_is_rejected_and_logged(slapd: Slapd) -> None:
    """A bad password gets invalidCredentials (49) and slapd logs the failed bind."""
    before = slapd.log_text().count("err=49")
    result = run_ldap_tool(
        ["ldapwhoami", "-x", "-H", slapd.ldap_url, "-D", BOB_DN, "-w", "not-bobs-password"],
        slapd.ldap_env(),
    )
    assert result.returncode == 49, result.stderr
    assert slapd.log_text().count("err=49") == before + 1


def test_starttls_with_demanded_certificate(slapd: Slapd) -> None:
    """-ZZ (StartTLS, must succeed) works against the CA-issued, GnuTLS-served EC cert."""
    whoami = _whoami(slapd.ldap_url, slapd.ldap_env(), BOB_DN, USERS[BOB_DN], "-ZZ")
    assert whoami == f"dn:{BOB_DN}"


def test_ldaps_with_ca_from_environment(slapd: Slapd) -> None:
    """ldaps:// verifies the server certificate against LDAPTLS_CACERT and binds."""
    dn = bulk_user_dn(7)
    assert _whoami(slapd.ldaps_url, slapd.ldap_env(), dn, bulk_user_password(7)) == f"dn:{dn}"


def test_ldaps_refuses_a_server_from_another_ca(
    slapd: Slapd, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """With only a stranger CA trusted, the ldaps handshake fails: verification is on."""
    stranger = CertificateAuthority.generate("stranger CA")
    env = slapd.ldap_env()
    env["LDAPTLS_CACERT"] = str(stranger.write_certificate(tmp_path_factory.mktemp("x") / "ca.pem"))
    result = run_ldap_tool(["ldapwhoami", "-x", "-H", slapd.ldaps_url], env)
    assert result.returncode != 0
    assert "Can't contact LDAP server" in result.stderr


def test_root_dse_is_public_and_advertises_controls(slapd: Slapd) -> None:
    """Anonymous can read the root DSE, which lists sort, VLV, paging and sync controls."""
    result = run_ldap_tool(
        ["ldapsearch", "-x", "-LLL", "-H", slapd.ldap_url, "-s", "base", "-b", "",
         "supportedControl", "namingContexts"],
        slapd.ldap_env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert _values(result.stdout, "namingContexts") == [slapd.suffix]
    controls = set(_values(result.stdout, "supportedControl"))
    assert {SSS_OID, VLV_OID, PAGED_OID, SYNC_OID} <= controls


def test_vault_is_readable_only_by_admin_reader(slapd: Slapd) -> None:
    """cn=vault's description is hidden from anonymous, alice and bob but shown to admin-reader."""
    env = slapd.ldap_env()
    base = ["ldapsearch", "-x", "-LLL", "-H", slapd.ldap_url, "-b", slapd.vault_dn, "-s", "base"]

    anonymous = run_ldap_tool([*base, "description"], env)
    assert VAULT_SECRET not in anonymous.stdout
    assert anonymous.returncode == 32, anonymous.stderr  # noSuchObject: not even disclosed

    for dn in (ALICE_DN, BOB_DN):
        denied = run_ldap_tool([*base, "-D", dn, "-w", USERS[dn], "description"], env)
        assert VAULT_SECRET not in denied.stdout
        assert denied.returncode == 32, denied.stderr

    reader = run_ldap_tool(
        [*base, "-D", ADMIN_READER_DN, "-w", USERS[ADMIN_READER_DN], "description"], env
    )
    assert reader.returncode == 0, reader.stderr
    assert _values(reader.stdout, "description") == [VAULT_SECRET]


def test_anonymous_cannot_search_people(slapd: Slapd) -> None:
    """Anonymous searches below the suffix return nothing (but anonymous bind itself works)."""
    result = run_ldap_tool(
        ["ldapsearch", "-x", "-LLL", "-H", slapd.ldap_url, "-b", slapd.suffix, "(uid=alice)"],
        slapd.ldap_env(),
    )
    assert "uid=alice" not in result.stdout
    assert result.returncode == 32, result.stderr


def test_paged_results_return_every_user(slapd: Slapd) -> None:
    """A paged search (10 per page) over ou=people returns all bulk and named users."""
    result = run_ldap_tool(
        ["ldapsearch", "-x", "-H", slapd.ldap_url, "-D", ALICE_DN, "-w", USERS[ALICE_DN],
         "-b", slapd.people_dn, "-E", "!pr=10/noprompt", "(objectClass=inetOrgPerson)", "1.1"],
        slapd.ldap_env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    dns = _values(result.stdout, "dn")
    assert len(dns) == BULK_USER_COUNT + len(USERS)
    assert {bulk_user_dn(1), bulk_user_dn(BULK_USER_COUNT), *USERS} <= set(dns)
    pages = re.findall(r"^pagedresults: cookie=", result.stdout, flags=re.MULTILINE)
    assert len(pages) == -(-len(dns) // 10)


def _sorted_search(slapd: Slapd, sort: str, attribute: str) -> list[str]:
    result = run_ldap_tool(
        ["ldapsearch", "-x", "-LLL", "-H", slapd.ldap_url, "-D", BOB_DN, "-w", USERS[BOB_DN],
         "-b", slapd.people_dn, "-E", sort, "(objectClass=inetOrgPerson)", attribute],
        slapd.ldap_env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    values = _values(result.stdout, attribute)
    assert len(values) == BULK_USER_COUNT + len(USERS)
    return values


def test_server_side_sort_on_cn_with_ordering_rule(slapd: Slapd) -> None:
    """A critical reverse sort on cn (naming its ordering rule) comes back in descending order."""
    names = _sorted_search(slapd, f"!sss=-cn:{CASE_IGNORE_ORDERING}", "cn")
    assert names == sorted(names, key=str.lower, reverse=True)
    assert names[0] == f"User {BULK_USER_COUNT:03d}"


def test_server_side_sort_on_uid_number(slapd: Slapd) -> None:
    """sss=uidNumber needs no explicit ordering rule and sorts numerically."""
    numbers = [int(n) for n in _sorted_search(slapd, "sss=uidNumber", "uidNumber")]
    assert numbers == sorted(numbers)
    assert numbers[:3] == [2001, 2002, 2003]


def test_plain_sort_on_cn_is_refused_by_stock_schema(slapd: Slapd) -> None:
    """cn has no ORDERING rule in core.schema, so slapd answers sss=cn with error 18."""
    result = run_ldap_tool(
        ["ldapsearch", "-x", "-LLL", "-H", slapd.ldap_url, "-D", BOB_DN, "-w", USERS[BOB_DN],
         "-b", slapd.people_dn, "-E", "sss=cn", "(uid=alice)", "cn"],
        slapd.ldap_env(),
    )  # fmt: skip
    assert result.returncode == 18, result.stderr


def test_sync_refresh_only_is_supported(slapd: Slapd) -> None:
    """syncprov answers a critical refreshOnly sync search (content sync is loaded)."""
    result = run_ldap_tool(
        ["ldapsearch", "-x", "-LLL", "-H", slapd.ldap_url, "-D", ALICE_DN, "-w", USERS[ALICE_DN],
         "-b", slapd.groups_dn, "-E", "!sync=ro", "(cn=staff)", "member"],
        slapd.ldap_env(),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert set(_values(result.stdout, "member")) == {ALICE_DN, BOB_DN}


# ldap3 2.9.1 checks the hostname with ssl.match_hostname(), deprecated since Python 3.7.
@pytest.mark.filterwarnings("ignore:ssl.match_hostname:DeprecationWarning")
def test_ldap3_binds_over_verified_ldaps(slapd: Slapd) -> None:
    """ldap3 binds as alice over ldaps:// with certificate verification against our CA."""
    tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=str(slapd.ca_path))
    server = ldap3.Server(LOOPBACK, port=slapd.ldaps_port, use_ssl=True, tls=tls)
    conn = ldap3.Connection(server, user=ALICE_DN, password=USERS[ALICE_DN])
    try:
        assert conn.bind(), conn.result
        assert conn.extend.standard.who_am_i() == f"dn:{ALICE_DN}"
    finally:
        conn.unbind()


def test_fresh_slapd_serves_a_custom_certificate_and_survives_restart(
    fresh_slapd: SlapdFactory, ca: CertificateAuthority
) -> None:
    """An extra slapd can serve an expired certificate; restart keeps its ports and data."""
    expired = ca.issue(
        "localhost",
        dns_names=["localhost"],
        ip_addresses=[LOOPBACK],
        not_after=datetime.now(UTC) - timedelta(days=1),
    )
    server = fresh_slapd(server_cert=expired)
    env = server.ldap_env()
    rejected = run_ldap_tool(["ldapwhoami", "-x", "-H", server.ldaps_url], env)
    assert rejected.returncode != 0
    plain = _whoami(server.ldap_url, env, ALICE_DN, USERS[ALICE_DN])

    modify = f"dn: {ALICE_DN}\nchangetype: modify\nreplace: description\ndescription: renamed\n"
    changed = run_ldap_tool(
        ["ldapmodify", "-x", "-H", server.ldap_url, "-D", ALICE_DN, "-w", USERS[ALICE_DN]],
        env,
        input=modify,
    )
    assert changed.returncode == 0, changed.stderr

    ports, first_pid = (server.ldap_port, server.ldaps_port), server.pid
    server.restart()
    assert (server.ldap_port, server.ldaps_port) == ports
    assert server.pid not in (None, first_pid)
    assert _whoami(server.ldap_url, env, ALICE_DN, USERS[ALICE_DN]) == plain
    after = run_ldap_tool(
        ["ldapsearch", "-x", "-LLL", "-H", server.ldap_url, "-D", BOB_DN, "-w", USERS[BOB_DN],
         "-b", ALICE_DN, "-s", "base", "description"],
        env,
    )  # fmt: skip
    assert _values(after.stdout, "description") == ["renamed"]

    server.stop()
    assert server.pid is None
    server.stop()  # idempotent
