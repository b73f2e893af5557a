"""End to end: long-lived and multi-response operations through ``ldapproxy run``.

Content synchronisation (refreshOnly, and refreshAndPersist kept open while the directory
changes), paged results driven by hand with cookies, intermediate responses, referrals and
search continuation references.  One private slapd and one proxy serve the module; here
the proxy reaches slapd over ``ldap://`` with StartTLS (the other module uses ldaps).
"""

from __future__ import annotations

import queue
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest
from support.compare import (
    CANCEL_OID,
    INTERMEDIATE_RESPONSE,
    MODES,
    PAGED_RESULTS_OID,
    SCOPE_SUB,
    SEARCH_RESULT_DONE,
    SEARCH_RESULT_ENTRY,
    SEARCH_RESULT_REFERENCE,
    SYNC_REQUEST_OID,
    Route,
    Stack,
    assert_same,
    by_message_id,
    control,
    equals,
    extended,
    integer,
    message,
    running_stack,
    search,
    simple_bind,
    sync_request,
    tlv,
)
from support.slapd import (
    ADMIN_DN,
    ADMIN_PASSWORD,
    ALICE_DN,
    BULK_USER_COUNT,
    GROUPS_DN,
    PEOPLE_DN,
    SUFFIX,
    USERS,
)

from ldapproxy.pki import CertificateAuthority

pytestmark = pytest.mark.slapd

ALICE = ("-D", ALICE_DN, "-w", USERS[ALICE_DN])
ADMIN = ("-D", ADMIN_DN, "-w", ADMIN_PASSWORD)
PEOPLE = BULK_USER_COUNT + len(USERS)

REMOTE_DN = f"ou=remote,{SUFFIX}"
REMOTE_URL = f"ldap://elsewhere.example.com/{REMOTE_DN}"
SYNC_STATE_OID = "1.3.6.1.4.1.4203.1.9.1.2"

# ldap3 2.9.1 checks the hostname with ssl.match_hostname(), deprecated since Python 3.7.
ldap3_tls_warning = pytest.mark.filterwarnings("ignore:ssl.match_hostname:DeprecationWarning")


@pytest.fixture(scope="module")
def stack(ca: CertificateAuthority, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A private slapd holding a referral object, with one proxy (StartTLS upstream)."""
    workdir = tmp_path_factory.mktemp("e2e-controls")
    with running_stack(ca, workdir, upstream="starttls") as running:
        referral = (
            f"dn: {REMOTE_DN}\nobjectClass: referral\nobjectClass: extensibleObject\n"
            f"ou: remote\nref: {REMOTE_URL}\n"
        )
        added = running.direct_tool("ldapadd", ["-x", *ADMIN, "-M"], input=referral)
        assert added.returncode == 0, added
        yield running


@pytest.fixture(params=MODES)
def route(request: pytest.FixtureRequest, stack: Stack) -> Route:
    """Each proxy listener in turn (``-ZZ`` on the StartTLS ones)."""
    return stack.route(request.param)


# -- content synchronisation (RFC 4533) ----------------------------------------------------


class Persistent:
    """A ``ldapsearch -E !sync=rp`` subprocess whose output (stdout and stderr) is
    collected line by line by a reader thread."""

    def __init__(self, stack: Stack, route: Route, *, direct: bool = False) -> None:
        url = route.direct_url if direct else route.url
        argv = [
            shutil.which("ldapsearch") or "ldapsearch", "-x", *route.flags, "-H", url, *ALICE,
            "-b", GROUPS_DN, "-E", "!sync=rp", "(objectClass=*)", "cn", "member",
        ]  # fmt: skip
        self.process = subprocess.Popen(
            argv,
            env=stack.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float = 5.0, after: int = 0) -> str:
        """Everything printed so far, once a line matching ``pattern`` has appeared (among
        the lines after the first ``after``)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while not any(regex.search(line) for line in self.lines[after:]):
            try:
                line = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                line = None
            if line is None:
                raise AssertionError(
                    f"no line matching {pattern!r} after {timeout:g} s "
                    f"(exit status {self.process.poll()}):\n{''.join(self.lines)}"
                )
            self.lines.append(line)
        return "".join(self.lines)

    def stop(self) -> None:
        """Terminate ldapsearch by its PID and collect it."""
        if self.process.poll() is None:
            self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._reader.join(5)
        if self.process.stdout is not None:
            self.process.stdout.close()


REFRESH_DONE = r"^# refresh done, switching to persist stage"


def test_persistent_search_receives_new_entries(stack: Stack, route: Route) -> None:
    """``ldapsearch -E sync=rp`` through the proxy: the refresh phase prints exactly what
    it prints directly (entries with their SyncState controls, then the syncInfo
    intermediate response); an entry added directly on slapd afterwards reaches the
    persistent search through the proxy within seconds."""
    direct = Persistent(stack, route, direct=True)
    try:
        direct_refresh = direct.wait_for(REFRESH_DONE)
    finally:
        direct.stop()

    proxied = Persistent(stack, route)
    try:
        refresh = proxied.wait_for(REFRESH_DONE)
        assert refresh == direct_refresh
        assert "# SyncState control, UUID" in refresh
        assert "# SyncInfo Received: refresh delete" in refresh

        dn = f"cn=persist-{route.mode},{GROUPS_DN}"
        entry = (
            f"dn: {dn}\nobjectClass: groupOfNames\ncn: persist-{route.mode}\nmember: {ALICE_DN}\n"
        )
        added = stack.direct_tool("ldapadd", ["-x", *ADMIN], input=entry)
        assert added.returncode == 0, added
        seen = len(proxied.lines)
        output = proxied.wait_for(r"^# SyncState control, UUID \S+ add", after=seen)
        after = output[len(refresh) :]
        assert f"\ndn: {dn}\ncontrol: {SYNC_STATE_OID} false " in after, after
        assert proxied.process.poll() is None  # still persisting
    finally:
        proxied.stop()


def test_sync_refresh_only_identical(stack: Stack, route: Route) -> None:
    """``-E !sync=ro`` (refreshOnly): identical output, SyncDone control and cookie
    included; then a refresh from that cookie is identical too."""
    args = ["-x", *ALICE, "-b", GROUPS_DN, "-E", "!sync=ro", "(objectClass=*)", "cn"]
    direct, proxied = stack.both(route, "ldapsearch", args)
    assert direct.returncode == 0, direct
    assert "# SyncDone control refreshDeletes=1" in direct.stdout
    assert_same(direct, proxied)

    (cookie,) = re.findall(r"^# cookie: (\S+)$", direct.stdout, re.MULTILINE)
    args = ["-x", *ALICE, "-b", GROUPS_DN, "-E", f"!sync=ro/{cookie}", "(objectClass=*)", "cn"]
    direct, proxied = stack.both(route, "ldapsearch", args)
    assert direct.returncode == 0, direct
    assert_same(direct, proxied)


def test_sync_intermediate_response_bytes_identical(stack: Stack, route: Route) -> None:
    """On a raw connection, the refresh phase of a refreshAndPersist search (entries with
    SyncState controls, then the syncInfo IntermediateResponse) is byte-identical through
    the proxy; a Cancel then ends it with canceled (118)."""
    persist = control(SYNC_REQUEST_OID, critical=True, value=sync_request(3))
    requests = (
        message(2, simple_bind(ALICE_DN, USERS[ALICE_DN])),
        message(3, search(GROUPS_DN, SCOPE_SUB, attributes=["cn"]), [persist]),
    )
    refreshes = []
    for direct in (True, False):
        with stack.raw(route, direct=direct) as client:
            client.send(*requests)
            refresh = client.until(3, INTERMEDIATE_RESPONSE)
            refreshes.append(refresh)
            client.send(message(4, extended(CANCEL_OID, tlv(0x30, integer(3)))))
            finals = {(p.message_id, p.result_code) for p in client.until_final(3, 4) if p.final}
            assert finals == {(3, 118), (4, 0)}
    direct_refresh, proxied_refresh = refreshes
    ops = [p.op for p in proxied_refresh if p.message_id == 3]
    assert ops[-1] == INTERMEDIATE_RESPONSE
    assert SEARCH_RESULT_ENTRY in ops
    assert by_message_id(proxied_refresh) == by_message_id(direct_refresh)


# -- paged results by hand ----------------------------------------------------------------


def paged_cookies(stack: Stack, route: Route, *, direct: bool) -> tuple[list[bytes], list[str]]:
    """Page through every person 10 at a time with the paged results control on one
    ldap3 connection, passing each cookie back; return the cookies and the DNs."""
    conn = stack.ldap3(route, ALICE_DN, USERS[ALICE_DN], direct=direct)
    try:
        assert conn.bind(), conn.result
        cookies: list[bytes] = []
        dns: list[str] = []
        cookie: bytes | None = None
        while True:
            assert conn.search(
                PEOPLE_DN,
                "(objectClass=inetOrgPerson)",
                attributes=["uid"],
                paged_size=10,
                paged_cookie=cookie,
            ), conn.result
            dns += [entry["dn"] for entry in conn.response if entry["type"] == "searchResEntry"]
            cookie = conn.result["controls"][PAGED_RESULTS_OID]["value"]["cookie"]
            cookies.append(cookie)
            if not cookie:
                return cookies, dns
            assert len(cookies) < 100, "paging does not end"
    finally:
        conn.unbind()


@ldap3_tls_warning
def test_ldap3_paged_results_cookies(stack: Stack, route: Route) -> None:
    """ldap3 with the paged results control through the proxy: a cookie comes back with
    every page, is accepted for the next page on the same connection, the last page's is
    empty, and the cookies equal slapd's direct answers."""
    cookies, dns = paged_cookies(stack, route, direct=False)
    assert len(dns) == len(set(dns)) == PEOPLE
    assert len(cookies) == -(-PEOPLE // 10)
    assert all(cookies[:-1])
    assert cookies[-1] == b""
    assert (cookies, dns) == paged_cookies(stack, route, direct=True)


# -- referrals and search continuation references ------------------------------------------

#: name -> (tool, arguments, stdin, expected exit status, lines that must be in stdout).
REFERRALS: dict[str, tuple[str, tuple[str, ...], str | None, int, tuple[str, ...]]] = {
    "search-reference": (
        "ldapsearch", (*ALICE, "-b", SUFFIX, "(objectClass=organizationalUnit)", "ou"), None,
        0, ("# search reference", f"ref: {REMOTE_URL}??sub", "# numReferences: 1"),
    ),
    "referral-at-base": (
        "ldapsearch", (*ALICE, "-s", "base", "-b", REMOTE_DN), None,
        10, ("result: 10 Referral", f"ref: {REMOTE_URL}??base"),
    ),
    "referral-below": (
        "ldapsearch", (*ALICE, "-b", f"cn=deeper,{REMOTE_DN}"), None,
        10, ("result: 10 Referral", f"matchedDN: {REMOTE_DN}"),
    ),
    "manage-dsa-it": (
        "ldapsearch", (*ALICE, "-M", "-s", "base", "-b", REMOTE_DN, "ref"), None,
        0, (f"ref: {REMOTE_URL}",),
    ),
    "compare-referral": ("ldapcompare", (*ALICE, REMOTE_DN, "ou:remote"), None, 10, ()),
    "add-below-referral": (
        "ldapadd", ADMIN, f"dn: cn=x,{REMOTE_DN}\nobjectClass: organizationalRole\ncn: x\n",
        10, (),
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", REFERRALS)
def test_referrals_identical(stack: Stack, route: Route, case: str) -> None:
    """A referral object: SearchResultReference in a subtree search, referral (10)
    results for operations at or below it, the object itself with manageDSAit."""
    tool, args, stdin, status, must_contain = REFERRALS[case]
    kwargs = {} if stdin is None else {"input": stdin}
    direct, proxied = stack.both(route, tool, ["-x", *args], **kwargs)
    assert direct.returncode == status, direct
    for line in must_contain:
        assert line in direct.stdout, (line, direct.stdout)
    assert_same(direct, proxied)


def test_search_reference_bytes_identical(stack: Stack, route: Route) -> None:
    """On a raw connection the SearchResultReference PDU is byte-identical."""
    requests = (
        message(2, simple_bind(ALICE_DN, USERS[ALICE_DN])),
        message(3, search(SUFFIX, SCOPE_SUB, equals("objectClass", "referral"), ["1.1"])),
    )
    results = []
    for direct in (True, False):
        with stack.raw(route, direct=direct) as client:
            client.send(*requests)
            results.append(client.until_final(2, 3))
    direct_pdus, proxied = results
    assert [(p.message_id, p.op) for p in proxied if p.message_id == 3] == [
        (3, SEARCH_RESULT_REFERENCE),
        (3, SEARCH_RESULT_DONE),
    ]
    (reference,) = [p for p in proxied if p.op == SEARCH_RESULT_REFERENCE]
    assert REMOTE_URL.encode() in reference.raw
    assert by_message_id(proxied) == by_message_id(direct_pdus)


# -- the proxy itself -------------------------------------------------------------------


def test_proxy_survived_without_errors(stack: Stack) -> None:
    """After everything above, the proxy is still running and logged no errors."""
    assert stack.proxy.process is not None
    assert stack.proxy.process.poll() is None, stack.proxy.log_text()
    assert stack.proxy_log_problems() == []
