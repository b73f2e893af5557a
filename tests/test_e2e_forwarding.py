"""End to end: every LDAPv3 operation passes through ``ldapproxy run`` unchanged.

One private slapd and one proxy (upstream over ldaps) serve the whole module.  Each
comparison runs a real client directly against slapd and then through a proxy listener,
with the same flags, and expects byte-identical output and the same exit status; see
:mod:`support.compare` for which direct path each listener is compared with.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.compare import (
    BIND_RESPONSE,
    CANCEL_OID,
    EXTENDED_RESPONSE,
    INTERMEDIATE_RESPONSE,
    MODES,
    SCOPE_BASE,
    SCOPE_SUB,
    SEARCH_RESULT_DONE,
    SEARCH_RESULT_ENTRY,
    SYNC_REQUEST_OID,
    WHOAMI_OID,
    Outcome,
    Pdu,
    Route,
    Stack,
    abandon,
    assert_same,
    by_message_id,
    control,
    equals,
    extended,
    import_ldap3,
    integer,
    ldif_values,
    message,
    read_tlv,
    running_stack,
    sasl_bind,
    search,
    simple_bind,
    sync_request,
    tlv,
    unbind,
)
from support.net import LOOPBACK
from support.proxy import ProxyProcess, proxy_config
from support.slapd import (
    ADMIN_DN,
    ADMIN_PASSWORD,
    ALICE_DN,
    BOB_DN,
    BULK_USER_COUNT,
    CASE_IGNORE_ORDERING,
    GROUPS_DN,
    PEOPLE_DN,
    SUFFIX,
    USERS,
    VAULT_DN,
    bulk_user_dn,
    bulk_user_password,
    bulk_user_uid,
)

from ldapproxy.pki import CertificateAuthority

ldap3 = import_ldap3()

pytestmark = pytest.mark.slapd

ALICE = ("-D", ALICE_DN, "-w", USERS[ALICE_DN])
BOB = ("-D", BOB_DN, "-w", USERS[BOB_DN])
ADMIN = ("-D", ADMIN_DN, "-w", ADMIN_PASSWORD)
MAX_MESSAGE_ID = 2**31 - 1
UNKNOWN_OID = "1.3.6.1.4.1.99999.42.1"
#: Every person: the 120 bulk users and alice, bob and admin-reader.
PEOPLE = BULK_USER_COUNT + len(USERS)

# ldap3 2.9.1 checks the hostname with ssl.match_hostname(), deprecated since Python 3.7.
ldap3_tls_warning = pytest.mark.filterwarnings("ignore:ssl.match_hostname:DeprecationWarning")


@pytest.fixture(scope="module")
def stack(ca: CertificateAuthority, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A private slapd (writes are fine) with one proxy in front of it, for the module."""
    with running_stack(ca, tmp_path_factory.mktemp("e2e-forwarding")) as running:
        yield running


@pytest.fixture(params=MODES)
def route(request: pytest.FixtureRequest, stack: Stack) -> Route:
    """Each proxy listener in turn (``-ZZ`` on the StartTLS ones)."""
    return stack.route(request.param)


def exists(stack: Stack, dn: str) -> bool:
    """Whether ``dn`` exists, asked directly of slapd as its rootdn."""
    result = stack.direct_tool("ldapsearch", ["-x", *ADMIN, "-s", "base", "-b", dn, "1.1"])
    assert result.returncode in (0, 32), result
    return result.returncode == 0


def read_attribute(stack: Stack, dn: str, attribute: str) -> list[str]:
    """The values of ``attribute`` of ``dn``, read directly from slapd as its rootdn."""
    result = stack.direct_tool(
        "ldapsearch", ["-x", "-LLL", *ADMIN, "-s", "base", "-b", dn, attribute]
    )
    assert result.returncode == 0, result
    return ldif_values(result.stdout, attribute)


# -- ldapsearch: identical output directly and through every listener ---------------------

#: name -> (ldapsearch arguments, expected exit status, lines that must be in the output).
SEARCHES: dict[str, tuple[tuple[str, ...], int, tuple[str, ...]]] = {
    "subtree-filter": (
        (*ALICE, "-b", PEOPLE_DN, "(&(objectClass=posixAccount)(uid=user01*))",
         "uid", "cn", "uidNumber"),
        0, ("# numEntries: 10",),
    ),
    "base-all-and-operational-attributes": (
        (*ALICE, "-s", "base", "-b", BOB_DN, "*", "+"),
        0, ("entryUUID: ", "entryCSN: ", "mail: bob@example.com"),
    ),
    "root-dse": (
        ("-s", "base", "-b", "", "*", "+"),
        0, ("supportedExtension: 1.3.6.1.4.1.4203.1.11.3", "supportedSASLMechanisms: PLAIN"),
    ),
    "one-level-types-only": ((*BOB, "-s", "one", "-A", "-b", SUFFIX), 0, ("ou:",)),
    "no-such-object": ((*ALICE, "-b", f"ou=nowhere,{SUFFIX}"), 32, ("matchedDN: " + SUFFIX,)),
    "size-limit-exceeded": (
        (*ALICE, "-z", "5", "-b", PEOPLE_DN, "(uid=user*)", "uid"),
        4, ("result: 4 Size limit exceeded", "# numEntries: 5"),
    ),
    "as-alice": (
        (*ALICE, "-b", SUFFIX, "(|(uid=alice)(cn=staff)(cn=vault))"),
        0, ("dn: " + ALICE_DN, "# numEntries: 2"),
    ),
    "as-anonymous": (("-b", SUFFIX, "(|(uid=alice)(cn=staff)(cn=vault))"), 32, ()),
    "vault-as-alice": ((*ALICE, "-s", "base", "-b", VAULT_DN), 32, ()),
    "paged-results": (
        (*ALICE, "-b", PEOPLE_DN, "-E", "pr=25/noprompt", "(objectClass=posixAccount)", "1.1"),
        0, ("control: 1.2.840.113556.1.4.319 false ", "pagedresults: cookie=",
            "# with pagedResults control: size=25"),
    ),
    "paged-results-critical": (
        (*ALICE, "-b", PEOPLE_DN, "-E", "!pr=40/noprompt", "(uid=user*)", "uid"),
        0, ("# with pagedResults critical control: size=40", "pagedresults: cookie="),
    ),
    "server-side-sort": (
        (*ALICE, "-b", PEOPLE_DN, "-E", "sss=uidNumber", "(uid=user1*)", "uidNumber"),
        0, ("control: 1.2.840.113556.1.4.474 false MAMKAQA=", "sortResult: (0) Success"),
    ),
    "server-side-sort-reverse-cn": (
        (*ALICE, "-b", PEOPLE_DN, "-E", f"!sss=-cn:{CASE_IGNORE_ORDERING}", "(uid=*e*)", "cn"),
        0, ("sortResult: (0) Success",),
    ),
    "server-side-sort-inappropriate-matching": (
        (*ALICE, "-b", PEOPLE_DN, "-E", "sss=cn", "(uid=alice)", "cn"),
        18, ("result: 18 Inappropriate matching",),
    ),
    # With stdin at EOF, ldapsearch keeps asking for the next VLV window (reusing the
    # contextID) until one starts past the end: exit 76, virtualListViewError.
    "sort-and-vlv": (
        (*ALICE, "-b", PEOPLE_DN, "-E", "sss=uidNumber", "-E", "vlv=2/3:user050",
         "(objectClass=posixAccount)", "uid"),
        76, ("control: 2.16.840.1.113730.3.4.10 false ", "vlvResult: pos="),
    ),
    "sort-and-vlv-by-value": (
        (*ALICE, "-b", PEOPLE_DN, "-E", f"sss=cn:{CASE_IGNORE_ORDERING}",
         "-E", "vlv=2/3:User 050", "(objectClass=posixAccount)", "uid"),
        76, ("dn: " + bulk_user_dn(50), "vlvResult: pos=53 count=123 context=<context>"),
    ),
    "sort-and-vlv-by-offset": (
        (*ALICE, "-b", PEOPLE_DN, "-E", "sss=uidNumber", "-E", "vlv=2/3/50/0",
         "(objectClass=posixAccount)", "uid"),
        76, ("dn: " + bulk_user_dn(47), "vlvResult: pos=50 count=123 context=<context>"),
    ),
    "matched-values": (
        (*ALICE, "-b", PEOPLE_DN, "-E", "!mv=(uid=alice)", "(|(uid=alice)(uid=bob))",
         "uid", "sn"),
        0, ("# with valuesReturnFilter critical control: (uid=alice)", "uid: alice"),
    ),
    "manage-dsa-it": ((*ALICE, "-e", "manageDSAit", "-b", PEOPLE_DN, "(uid=bob)"), 0, ()),
    "manage-dsa-it-critical": ((*ALICE, "-M", "-M", "-b", PEOPLE_DN, "(uid=bob)"), 0, ()),
    "assertion-control-failed": (
        (*ALICE, "-e", "!assert=(uid=bob)", "-s", "base", "-b", ALICE_DN),
        122, ("result: 122 Assertion Failed",),
    ),
    "critical-unknown-control": (
        (*ALICE, "-E", f"!{UNKNOWN_OID}=:x", "-b", PEOPLE_DN, "(uid=alice)", "1.1"),
        12, ("result: 12 Critical extension is unavailable",),
    ),
    "noncritical-unknown-control": (
        (*ALICE, "-E", f"{UNKNOWN_OID}=:x", "-b", PEOPLE_DN, "(uid=alice)", "1.1"),
        0, ("dn: " + ALICE_DN,),
    ),
    "proxied-authorization-denied": (
        (*ALICE, "-e", f"!authzid=dn:{BOB_DN}", "-s", "base", "-b", BOB_DN, "1.1"),
        123, (),
    ),
}  # fmt: skip


@pytest.mark.parametrize("query", SEARCHES)
def test_ldapsearch_output_identical_through_proxy(stack: Stack, route: Route, query: str) -> None:
    """ldapsearch (full output, response controls included) says exactly what it says
    directly to slapd, with and without -ZZ, for every listener."""
    args, expected_status, must_contain = SEARCHES[query]
    direct, proxied = stack.both(route, "ldapsearch", ["-x", *args])
    assert direct.returncode == expected_status, direct
    for line in must_contain:
        assert line in direct.stdout, (line, direct.stdout)
    assert_same(direct, proxied)


def test_ldapsearch_ldif_identical_through_proxy(stack: Stack, route: Route) -> None:
    """The -LLL form of a sorted subtree search is identical as well."""
    args = ["-x", "-LLL", *BOB, "-b", SUFFIX, "-E", "sss=uidNumber", "(uid=*)", "*", "+"]
    direct, proxied = stack.both(route, "ldapsearch", args)
    assert direct.returncode == 0, direct
    assert len(ldif_values(direct.stdout, "dn")) == PEOPLE
    assert_same(direct, proxied)


# -- updates ----------------------------------------------------------------------------


def test_add_modify_modrdn_delete(stack: Stack, route: Route) -> None:
    """ldapadd, ldapmodify (replace, add and delete values), ldapmodrdn and ldapdelete as
    alice through the proxy; each effect is checked directly on slapd."""
    name = f"fw-{route.mode}"
    dn = f"uid={name},{PEOPLE_DN}"
    renamed = f"uid={name}-renamed,{PEOPLE_DN}"
    entry = (
        f"dn: {dn}\nobjectClass: inetOrgPerson\nuid: {name}\ncn: Forwarded {route.mode}\n"
        f"sn: Forwarded\nmail: {name}@example.com\ndescription: created\n"
    )
    added = stack.run(route, "ldapadd", ["-x", *ALICE], input=entry)
    assert added == (0, f'adding new entry "{dn}"\n\n', ""), added
    assert read_attribute(stack, dn, "description") == ["created"]

    change = (
        f"dn: {dn}\nchangetype: modify\n"
        "replace: description\ndescription: replaced\n-\n"
        f"add: mail\nmail: second-{name}@example.com\nmail: third-{name}@example.com\n-\n"
        f"delete: mail\nmail: {name}@example.com\n-\n"
        "add: telephoneNumber\ntelephoneNumber: +1 555 0100\n-\n"
    )
    modified = stack.run(route, "ldapmodify", ["-x", *ALICE], input=change)
    assert modified == (0, f'modifying entry "{dn}"\n\n', ""), modified
    assert read_attribute(stack, dn, "description") == ["replaced"]
    assert sorted(read_attribute(stack, dn, "mail")) == [
        f"second-{name}@example.com",
        f"third-{name}@example.com",
    ]
    assert read_attribute(stack, dn, "telephoneNumber") == ["+1 555 0100"]

    moved = stack.run(route, "ldapmodrdn", ["-x", *ALICE, "-r", dn, f"uid={name}-renamed"])
    assert moved == (0, "", ""), moved
    assert exists(stack, renamed)
    assert not exists(stack, dn)
    assert read_attribute(stack, renamed, "uid") == [f"{name}-renamed"]  # -r: old RDN gone

    deleted = stack.run(route, "ldapdelete", ["-x", *ALICE, renamed])
    assert deleted == (0, "", ""), deleted
    assert not exists(stack, renamed)


#: name -> (tool, arguments, stdin, expected exit status): updates that fail the same way.
FAILING_UPDATES: dict[str, tuple[str, tuple[str, ...], str | None, int]] = {
    "add-existing": ("ldapadd", ALICE, f"dn: {BOB_DN}\nobjectClass: account\nuid: bob\n", 68),
    "add-objectclass-violation": (
        "ldapadd", ALICE, f"dn: uid=nobody,{PEOPLE_DN}\nobjectClass: inetOrgPerson\nuid: x\n", 65,
    ),
    "modify-insufficient-access": (
        "ldapmodify", BOB,
        f"dn: {ALICE_DN}\nchangetype: modify\nreplace: description\ndescription: bob\n", 50,
    ),
    "modify-missing-value": (
        "ldapmodify", ALICE,
        f"dn: {BOB_DN}\nchangetype: modify\ndelete: mail\nmail: nobody@example.com\n", 16,
    ),
    "delete-nonexistent": ("ldapdelete", (*ALICE, f"uid=ghost,{PEOPLE_DN}"), None, 32),
    "delete-non-leaf": ("ldapdelete", (*ADMIN, PEOPLE_DN), None, 66),
    "modrdn-onto-existing": (
        "ldapmodrdn", (*ALICE, BOB_DN, "uid=alice"), None, 68,
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", FAILING_UPDATES)
def test_failing_updates_identical(stack: Stack, route: Route, case: str) -> None:
    """Rejected updates give the same result code and diagnostic as directly."""
    tool, args, stdin, status = FAILING_UPDATES[case]
    kwargs = {} if stdin is None else {"input": stdin}
    direct, proxied = stack.both(route, tool, ["-x", *args], **kwargs)
    assert direct.returncode == status, direct
    assert_same(direct, proxied)


def test_modify_response_controls_identical(stack: Stack, route: Route) -> None:
    """Pre-read and post-read response controls on a modify come back unchanged."""
    dn = bulk_user_dn(100 + MODES.index(route.mode))
    reset = f"dn: {dn}\nchangetype: modify\nreplace: description\ndescription: before\n"
    change = f"dn: {dn}\nchangetype: modify\nreplace: description\ndescription: after\n"
    args = ["-x", *ALICE, "-e", "preread=description", "-e", "!postread=description,uid"]
    outcomes = []
    for direct in (True, False):
        assert stack.direct_tool("ldapmodify", ["-x", *ADMIN], input=reset).returncode == 0
        outcomes.append(stack.run(route, "ldapmodify", args, direct=direct, input=change))
    direct_outcome, proxied = outcomes
    assert direct_outcome.returncode == 0, direct_outcome
    assert "# ==> preread\n" in direct_outcome.stdout
    assert "description: before\n# <== preread" in direct_outcome.stdout
    assert "description: after\n" in direct_outcome.stdout
    assert_same(direct_outcome, proxied)


# -- compare, password modify, WhoAmI, other extended operations -------------------------

COMPARES = {
    "true": ((ALICE_DN, "uid:alice"), 6, "TRUE\n"),
    "false": ((ALICE_DN, "uid:bob"), 5, "FALSE\n"),
    "no-such-attribute": (
        (ALICE_DN, "employeeNumber:1"), 16, "Compare Result: No such attribute (16)\nUNDEFINED\n",
    ),
    "no-such-object": (
        (f"uid=ghost,{PEOPLE_DN}", "uid:ghost"), 32,
        f"Compare Result: No such object (32)\nMatched DN: {PEOPLE_DN}\nUNDEFINED\n",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", COMPARES)
def test_compare(stack: Stack, route: Route, case: str) -> None:
    """ldapcompare: compareTrue exits 6, compareFalse 5, errors as directly."""
    args, status, stdout = COMPARES[case]
    direct, proxied = stack.both(route, "ldapcompare", ["-x", *ALICE, *args])
    assert direct.returncode == status, direct
    assert direct.stdout == stdout
    assert_same(direct, proxied)


def whoami(stack: Stack, route: Route, dn: str, password: str) -> Outcome:
    return stack.run(route, "ldapwhoami", ["-x", "-D", dn, "-w", password])


def test_password_modify_extended_operation(stack: Stack, route: Route) -> None:
    """ldappasswd: alice changes her own password, then binds with the new one; a bulk
    user gets a generated password (in the extended response value) and binds with it."""
    alice_old, alice_new = USERS[ALICE_DN], f"alice-{route.mode}-new"
    number = 90 + MODES.index(route.mode)
    user = bulk_user_dn(number)
    try:
        changed = stack.run(route, "ldappasswd", ["-x", *ALICE, "-a", alice_old, "-s", alice_new])
        assert changed == (0, "", ""), changed
        assert whoami(stack, route, ALICE_DN, alice_new) == (0, f"dn:{ALICE_DN}\n", "")
        assert whoami(stack, route, ALICE_DN, alice_old).returncode == 49

        generated = stack.run(
            route, "ldappasswd", ["-x", "-D", user, "-w", bulk_user_password(number)]
        )
        assert generated.returncode == 0, generated
        (new_password,) = [
            line.removeprefix("New password: ")
            for line in generated.stdout.splitlines()
            if line.startswith("New password: ")
        ]
        assert whoami(stack, route, user, new_password) == (0, f"dn:{user}\n", "")
    finally:
        for dn, password in ((ALICE_DN, alice_old), (user, bulk_user_password(number))):
            restored = stack.direct_tool("ldappasswd", ["-x", *ADMIN, "-s", password, dn])
            assert restored.returncode == 0, restored


#: name -> (tool, arguments, expected exit status, expected stdout or None).
IDENTITY_CASES: dict[str, tuple[str, tuple[str, ...], int, str | None]] = {
    "whoami-bob": ("ldapwhoami", ("-x", *BOB), 0, f"dn:{BOB_DN}\n"),
    "whoami-anonymous": ("ldapwhoami", ("-x",), 0, "anonymous\n"),
    "bind-wrong-password": ("ldapwhoami", ("-x", "-D", BOB_DN, "-w", "not-bobs"), 49, ""),
    "bind-unknown-dn": ("ldapwhoami", ("-x", "-D", f"uid=ghost,{PEOPLE_DN}", "-w", "x"), 49, ""),
    "bind-unauthenticated": ("ldapwhoami", ("-x", "-D", BOB_DN, "-w", ""), 53, None),
    "exop-whoami": ("ldapexop", ("-x", *BOB, "whoami"), 0, f"dn:{BOB_DN}\n"),
    "exop-unknown-oid": ("ldapexop", ("-x", *BOB, UNKNOWN_OID), 1, ""),
    "exop-unknown-oid-with-value": ("ldapexop", ("-x", UNKNOWN_OID + "::AAECAwQ="), 1, ""),
    "exop-cancel-unknown-id": ("ldapexop", ("-x", *BOB, "cancel", "99"), 1, None),
    "exop-refresh-unsupported": ("ldapexop", ("-x", *BOB, "refresh", BOB_DN, "60"), 1, None),
    # SASL binds are forwarded, but the test slapd has no SASL setup that lets any of its
    # users in (the mechanisms other than PLAIN need cleartext secrets, and PLAIN has no
    # authz-regexp to map to an entry), so each fails, the same way directly and through
    # the proxy.  CRAM-MD5 takes two round trips (saslBindInProgress, 14, first); PLAIN,
    # with no security layer, is offered only over TLS, which the proxy's upstream always is.
    "sasl-cram-md5": ("ldapwhoami", ("-Y", "CRAM-MD5", "-U", "alice", "-w", "x"), 49, ""),
    "sasl-plain": ("ldapwhoami", ("-O", "none", "-Y", "PLAIN", "-U", "bob", "-w", "x"), 49, ""),
    "sasl-digest-md5": (
        "ldapwhoami", ("-O", "maxssf=0", "-Y", "DIGEST-MD5", "-U", "bob", "-w", "x"), 49, "",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", IDENTITY_CASES)
def test_binds_and_extended_operations_identical(stack: Stack, route: Route, case: str) -> None:
    """Simple, anonymous and SASL binds, WhoAmI and unknown or refused extended operations
    end exactly as they end directly (result code, diagnostic, response value)."""
    tool, args, status, stdout = IDENTITY_CASES[case]
    direct, proxied = stack.both(route, tool, args)
    assert direct.returncode == status, direct
    if stdout is not None:
        assert direct.stdout == stdout
    assert_same(direct, proxied)


# -- raw sockets: message IDs, controls, SASL, abandon, cancel, unbind --------------------


def exchange(stack: Stack, route: Route, *requests: bytes, direct: bool = False) -> list[Pdu]:
    """Send ``requests`` in one write and collect every response until each request
    has had its final response."""
    ids = _message_ids(b"".join(requests))
    with stack.raw(route, direct=direct) as client:
        client.send(*requests)
        return client.until_final(*ids)


def _message_ids(requests: bytes) -> list[int]:
    ids = []
    pos = 0
    while pos < len(requests):
        _, start, end = read_tlv(requests, pos)
        _, id_start, id_end = read_tlv(requests, start)
        ids.append(int.from_bytes(requests[id_start:id_end], "big"))
        pos = end
    return ids


def test_pipelined_message_ids_preserved(stack: Stack, route: Route) -> None:
    """Three requests with message IDs 7, 1000000 and 2**31-1 in ONE write: every response
    carries its request's ID, and the bytes equal slapd's own answers."""
    requests = (
        message(7, extended(WHOAMI_OID)),
        message(1_000_000, search("", SCOPE_BASE, attributes=["supportedLDAPVersion"])),
        # Not "+": slapd's operational attributes of the root DSE depend on the connection
        # (TLS by StartTLS directly, ldaps from the proxy), so they may differ between paths.
        message(
            MAX_MESSAGE_ID,
            search("", SCOPE_BASE, attributes=["namingContexts", "supportedControl"]),
        ),
    )
    proxied = exchange(stack, route, *requests)
    direct = exchange(stack, route, *requests, direct=True)
    assert {pdu.message_id for pdu in proxied} == {7, 1_000_000, MAX_MESSAGE_ID}
    assert [(p.op, p.result_code) for p in proxied if p.message_id == 7] == [(EXTENDED_RESPONSE, 0)]
    assert [p.op for p in proxied if p.message_id == 1_000_000] == [
        SEARCH_RESULT_ENTRY,
        SEARCH_RESULT_DONE,
    ]
    assert by_message_id(proxied) == by_message_id(direct)


def test_requests_trickled_byte_by_byte(stack: Stack, route: Route) -> None:
    """Requests that arrive one byte per write (a PDU split across many TCP segments, and
    the next PDU starting mid-segment) are forwarded whole and answered as directly."""
    requests = b"".join(
        (
            message(300, simple_bind(BOB_DN, USERS[BOB_DN])),
            message(301, search(PEOPLE_DN, SCOPE_SUB, equals("uid", "alice"), ["*", "+"])),
            message(302, extended(WHOAMI_OID)),
        )
    )
    direct = exchange(stack, route, requests, direct=True)
    with stack.raw(route) as client:
        client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for index in range(len(requests)):
            client.send(requests[index : index + 1])
        proxied = client.until_final(300, 301, 302)
    assert sorted((p.message_id, p.op) for p in proxied if p.final) == [
        (300, BIND_RESPONSE),
        (301, SEARCH_RESULT_DONE),
        (302, EXTENDED_RESPONSE),
    ]
    assert by_message_id(proxied) == by_message_id(direct)


def test_request_controls_preserved(stack: Stack, route: Route) -> None:
    """A critical unknown control gets unavailableCriticalExtension (12) from slapd, a
    non-critical one is ignored, on a search and on an extended operation, as directly."""
    unknown = control(UNKNOWN_OID, critical=True, value=b"\x01\x02")
    ignored = control(UNKNOWN_OID, critical=False, value=b"\x01\x02")
    requests = (
        message(1, simple_bind(ALICE_DN, USERS[ALICE_DN])),
        message(2, search(PEOPLE_DN, SCOPE_SUB, equals("uid", "bob"), ["uid"]), [unknown]),
        message(3, search(PEOPLE_DN, SCOPE_SUB, equals("uid", "bob"), ["uid"]), [ignored]),
        message(4, extended(WHOAMI_OID), [unknown]),
        message(5, extended(WHOAMI_OID), [ignored]),
    )
    proxied = exchange(stack, route, *requests)
    direct = exchange(stack, route, *requests, direct=True)
    finals = {p.message_id: p.result_code for p in proxied if p.final}
    assert finals == {1: 0, 2: 12, 3: 0, 4: 12, 5: 0}
    assert by_message_id(proxied) == by_message_id(direct)


def test_sasl_bind_with_unsupported_mechanism_forwarded(stack: Stack, route: Route) -> None:
    """A SASL BindRequest is forwarded; slapd's authMethodNotSupported (7) and a SASL
    challenge (saslBindInProgress, 14) come back byte for byte."""
    requests = (message(3, sasl_bind("X-NOT-A-MECHANISM", b"whatever")),)
    proxied = exchange(stack, route, *requests)
    direct = exchange(stack, route, *requests, direct=True)
    assert [(p.message_id, p.result_code) for p in proxied] == [(3, 7)]
    assert by_message_id(proxied) == by_message_id(direct)

    challenge = (message(9, sasl_bind("CRAM-MD5")),)
    proxied = exchange(stack, route, *challenge)
    assert [(p.message_id, p.result_code) for p in proxied] == [(9, 14)]


def test_unbind_as_first_request_ends_session(stack: Stack, route: Route) -> None:
    """An Unbind before any other request: the proxy closes the TCP connection."""
    with stack.raw(route) as client:
        client.send(message(2, unbind()))
        got = client.until_closed(2)
        assert got is not None, "the proxy did not close the connection within 2 s of the Unbind"
        assert got == []


def test_unbind_after_a_bind_ends_session(stack: Stack, route: Route) -> None:
    """After a bind (so the session holds an upstream connection) an Unbind still makes
    the proxy close the connection, and a request sent after the Unbind in the same write
    is not answered.  (RFC 4511 §4.3: the server terminates the session; the client need
    not close first.)"""
    with stack.raw(route) as client:
        client.send(message(2, simple_bind(BOB_DN, USERS[BOB_DN])))
        assert [(p.message_id, p.result_code) for p in client.until_final(2)] == [(2, 0)]
        client.send(message(3, unbind()), message(4, extended(WHOAMI_OID)))
        got = client.until_closed(2)
        assert got is not None, "the proxy did not close the connection within 2 s of the Unbind"
        assert got == []


@pytest.mark.parametrize("mode", ["none", "ldaps"])
def test_idle_timeout_closes_session_holding_an_upstream(
    stack: Stack,
    run_proxy: Callable[[Path], ProxyProcess],
    tmp_path: Path,
    ca: CertificateAuthority,
    mode: str,
) -> None:
    """limits.idle_timeout: an idle client that has bound (so its session holds an
    upstream connection) gets a Notice of Disconnection and the connection is closed."""
    config, listeners = proxy_config(
        tmp_path, ca, [stack.slapd.ldaps_url], limits={"idle_timeout": 0.5}
    )
    proxy = run_proxy(config)
    idle = Stack(stack.slapd, proxy, {listener.tls: listener for listener in listeners})
    with idle.raw(idle.route(mode)) as client:
        client.send(message(2, simple_bind(BOB_DN, USERS[BOB_DN])))
        assert [(p.message_id, p.result_code) for p in client.until_final(2)] == [(2, 0)]
        got = client.until_closed(2.5)
        assert got is not None, "still connected 2.5 s after a 0.5 s idle timeout"
        assert [(p.message_id, p.op) for p in got] == [(0, EXTENDED_RESPONSE)]


def test_abandon_leaves_the_connection_usable(stack: Stack, route: Route) -> None:
    """A big search abandoned at once, and a persistent search abandoned after its
    refresh: the next operations on the same connection work, and nothing more arrives
    for the abandoned persistent search."""
    with stack.raw(route) as client:
        client.send(message(1, simple_bind(ALICE_DN, USERS[ALICE_DN])))
        client.until_final(1)

        client.send(
            message(2, search(PEOPLE_DN, SCOPE_SUB, attributes=["*", "+"])),
            message(3, abandon(2)),
            message(4, extended(WHOAMI_OID)),
        )
        got = client.until_final(4)
        assert {p.message_id for p in got} <= {2, 4}
        assert (got[-1].op, got[-1].result_code) == (EXTENDED_RESPONSE, 0)

        # Entries of search 2 that slapd sent before it saw the Abandon may still trickle
        # in below; they are slapd's to send, and the proxy passes them on.
        persistent = control(SYNC_REQUEST_OID, critical=True, value=sync_request(3))
        client.send(message(5, search(GROUPS_DN, SCOPE_SUB, attributes=["cn"]), [persistent]))
        refresh = client.until(5, INTERMEDIATE_RESPONSE)
        assert {p.message_id for p in refresh} <= {2, 5}
        assert [p.op for p in refresh if p.message_id == 5].count(SEARCH_RESULT_ENTRY) == 2
        client.send(message(6, abandon(5)), message(7, extended(WHOAMI_OID)))
        got = client.until_final(7)
        assert [p.message_id for p in got if p.message_id != 2] == [7]

        client.send(message(8, search(ALICE_DN, SCOPE_BASE, attributes=["uid"])))
        got = [p for p in client.until_final(8) if p.message_id != 2]
        assert [(p.op, p.message_id) for p in got] == [
            (SEARCH_RESULT_ENTRY, 8),
            (SEARCH_RESULT_DONE, 8),
        ]
        assert got[-1].result_code == 0
        assert [p for p in client.quiet_for(0.3) if p.message_id != 2] == []


def test_cancel_persistent_search(stack: Stack, route: Route) -> None:
    """The Cancel extended operation (RFC 3909) ends a persistent search: the search gets
    canceled (118), the cancel request success, and the connection goes on."""
    persistent = control(SYNC_REQUEST_OID, critical=True, value=sync_request(3))
    with stack.raw(route) as client:
        client.send(
            message(1, simple_bind(ALICE_DN, USERS[ALICE_DN])),
            message(2, search(GROUPS_DN, SCOPE_SUB, attributes=["cn"]), [persistent]),
        )
        client.until(2, INTERMEDIATE_RESPONSE)
        client.send(message(3, extended(CANCEL_OID, tlv(0x30, integer(2)))))
        got = client.until_final(2, 3)
        assert sorted((p.message_id, p.op, p.result_code) for p in got) == [
            (2, SEARCH_RESULT_DONE, 118),
            (3, EXTENDED_RESPONSE, 0),
        ]
        client.send(message(4, extended(WHOAMI_OID)))
        assert [(p.message_id, p.result_code) for p in client.until_final(4)] == [(4, 0)]


# -- ldap3 --------------------------------------------------------------------------------


@ldap3_tls_warning
def test_ldap3_paged_search_returns_every_bulk_user(stack: Stack, route: Route) -> None:
    """ldap3 binds and its paged_search generator pages through all 120 bulk users."""
    conn = stack.ldap3(route, ALICE_DN, USERS[ALICE_DN])
    try:
        assert conn.bind(), conn.result
        entries = [
            entry
            for entry in conn.extend.standard.paged_search(
                PEOPLE_DN, "(uid=user*)", attributes=["uid"], paged_size=25, generator=True
            )
            if entry["type"] == "searchResEntry"
        ]
        uids = sorted(entry["attributes"]["uid"][0] for entry in entries)
        assert uids == [bulk_user_uid(i) for i in range(1, BULK_USER_COUNT + 1)]
        assert conn.extend.standard.who_am_i() == f"dn:{ALICE_DN}"
    finally:
        conn.unbind()


@ldap3_tls_warning
def test_ldap3_start_tls_on_required_listener(stack: Stack) -> None:
    """ldap3: a bind before StartTLS is refused (confidentialityRequired); after
    start_tls() it binds, searches and asks WhoAmI through the starttls-required listener."""
    route = stack.route("starttls-required")
    tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=str(stack.ca_path))
    server = ldap3.Server(LOOPBACK, port=route.port, tls=tls)
    conn = ldap3.Connection(server, user=BOB_DN, password=USERS[BOB_DN])
    try:
        conn.open()
        assert not conn.bind()
        assert conn.result["result"] == 13, conn.result
        assert conn.start_tls(), conn.result
        assert conn.bind(), conn.result
        assert conn.search(PEOPLE_DN, "(uid=alice)", attributes=["cn", "uidNumber"])
        assert [e.entry_dn for e in conn.entries] == [ALICE_DN]
        assert conn.entries[0].uidNumber.value == 2001
        assert conn.extend.standard.who_am_i() == f"dn:{BOB_DN}"
    finally:
        conn.unbind()


# -- the proxy itself -------------------------------------------------------------------


def test_proxy_survived_without_errors(stack: Stack) -> None:
    """After everything above, the proxy is still running and logged no errors."""
    assert stack.proxy.process is not None
    assert stack.proxy.process.poll() is None, stack.proxy.log_text()
    assert stack.proxy_log_problems() == []
