"""End-to-end tests of the demo directory with OpenLDAP's own command-line tools.

The directory runs in a subprocess (``python -m ldapproxy.directory``) so that the
Twisted reactor never runs inside pytest, and is queried with the real
``ldapwhoami``/``ldapsearch``/``ldapadd`` over ``ldaps://``, verifying its
certificate against the ``ca.pem`` it wrote.

The expected entries are spelled out here rather than imported: importing
``ldapproxy.directory`` is not needed to test it, and the test then doubles as a
specification of the seeded tree.
"""

from __future__ import annotations

import os
import select
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ldapproxy.pki import CertificateAuthority

SUFFIX = "dc=example,dc=com"
ALICE = f"uid=alice,ou=people,{SUFFIX}"
BOB = f"uid=bob,ou=people,{SUFFIX}"
CAROL = f"uid=carol,ou=people,{SUFFIX}"
USERS = {ALICE: "alice", BOB: "bob", CAROL: "carol"}
WHOAMI_OID = "1.3.6.1.4.1.4203.1.11.3"

STARTUP_TIMEOUT = 30.0
TOOL_TIMEOUT = 30.0

pytestmark = pytest.mark.skipif(
    shutil.which("ldapwhoami") is None or shutil.which("ldapsearch") is None,
    reason="needs ldap-utils (ldapwhoami, ldapsearch)",
)


@dataclass(frozen=True)
class Running:
    url: str
    workdir: Path
    env: dict[str, str]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _client_env(home: Path, ca_path: Path) -> dict[str, str]:
    # LDAPNOINIT=1 would be the obvious way to keep ~/.ldaprc and ./ldaprc out of the
    # picture, but libldap then ignores *all* LDAP* environment variables, including
    # LDAPTLS_CACERT.  Instead: drop inherited LDAP* settings, point HOME at an empty
    # directory and run the tools from there; the environment overrides ldap.conf.
    env = {key: value for key, value in os.environ.items() if not key.startswith("LDAP")}
    env.update(HOME=str(home), LDAPTLS_CACERT=str(ca_path), LDAPTLS_REQCERT="demand")
    return env


def _wait_for_ready(proc: subprocess.Popen[str], log: Path) -> int:
    assert proc.stdout is not None
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while (remaining := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([proc.stdout], [], [], remaining)
        if not readable:
            break
        line = proc.stdout.readline()
        if not line:
            pytest.fail(f"directory exited early ({proc.wait()}):\n{log.read_text()}")
        if line.startswith("ready "):
            return int(line.split()[1])
    pytest.fail(f"directory not ready after {STARTUP_TIMEOUT}s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def directory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    base = tmp_path_factory.mktemp("directory")
    workdir = base / "work"
    home = base / "home"
    home.mkdir()
    log = base / "directory.log"
    port = _free_port()
    with (
        log.open("w") as stderr,
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ldapproxy.directory",
                "--port",
                str(port),
                "--workdir",
                str(workdir),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        ) as proc,
    ):
        try:
            assert _wait_for_ready(proc, log) == port
            yield Running(
                url=f"ldaps://127.0.0.1:{port}",
                workdir=workdir,
                env=_client_env(home, workdir / "ca.pem"),
            )
        finally:
            proc.terminate()
            proc.wait(timeout=STARTUP_TIMEOUT)


def _run(
    directory: Running, *argv: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    tool, *args = argv
    return subprocess.run(
        [tool, "-x", "-H", directory.url, *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=directory.env if env is None else env,
        cwd=directory.env["HOME"],
        timeout=TOOL_TIMEOUT,
        check=False,
    )


def _dns(ldif: str) -> set[str]:
    return {line.removeprefix("dn: ") for line in ldif.splitlines() if line.startswith("dn: ")}


def test_writes_ca_certificate(directory: Running) -> None:
    """The directory writes the PEM certificate of its throwaway CA to <workdir>/ca.pem."""
    assert (directory.workdir / "ca.pem").read_text().startswith("-----BEGIN CERTIFICATE-----")


@pytest.mark.parametrize(("dn", "password"), sorted(USERS.items()))
def test_whoami_reports_bound_dn(directory: Running, dn: str, password: str) -> None:
    """After a simple bind with the seeded password, Who am I? answers dn:<bind DN>."""
    result = _run(directory, "ldapwhoami", "-D", dn, "-w", password)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"dn:{dn}"
    assert result.stderr == ""


def test_whoami_anonymous(directory: Running) -> None:
    """Without a bind, Who am I? answers with the empty authzId (ldapwhoami: "anonymous")."""
    result = _run(directory, "ldapwhoami")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "anonymous"


def test_wrong_password_is_invalid_credentials(directory: Running) -> None:
    """A bind with the wrong password fails with invalidCredentials (49)."""
    result = _run(directory, "ldapwhoami", "-D", ALICE, "-w", "bob")
    assert result.returncode == 49, result.stderr
    assert "Invalid credentials" in result.stderr


def test_unknown_user_is_invalid_credentials(directory: Running) -> None:
    """A bind as a DN that does not exist fails with invalidCredentials, not noSuchObject."""
    result = _run(directory, "ldapwhoami", "-D", f"uid=mallory,ou=people,{SUFFIX}", "-w", "x")
    assert result.returncode == 49, result.stderr


def test_search_people(directory: Running) -> None:
    """An anonymous subtree search of ou=people returns alice, bob and carol as inetOrgPersons."""
    result = _run(
        directory, "ldapsearch", "-LLL", "-b", f"ou=people,{SUFFIX}", "(objectClass=inetOrgPerson)"
    )
    assert result.returncode == 0, result.stderr
    assert _dns(result.stdout) == set(USERS)
    for uid in ("alice", "bob", "carol"):
        assert f"mail: {uid}@example.com" in result.stdout
    assert "cn: " in result.stdout
    assert "sn: " in result.stdout


def test_search_never_returns_passwords(directory: Running) -> None:
    """userPassword is left out of search results, even when asked for by name."""
    result = _run(directory, "ldapsearch", "-LLL", "-b", SUFFIX, "(uid=bob)", "*", "userPassword")
    assert result.returncode == 0, result.stderr
    assert _dns(result.stdout) == {BOB}
    assert "userpassword" not in result.stdout.lower()


def test_groups(directory: Running) -> None:
    """cn=staff (alice, bob) and cn=admins (alice) are groupOfNames under ou=groups."""
    groups = f"ou=groups,{SUFFIX}"
    alice = _run(directory, "ldapsearch", "-LLL", "-b", groups, f"(member={ALICE})", "cn")
    bob = _run(directory, "ldapsearch", "-LLL", "-b", groups, f"(member={BOB})", "cn")
    carol = _run(directory, "ldapsearch", "-LLL", "-b", groups, f"(member={CAROL})", "cn")
    assert _dns(alice.stdout) == {f"cn=staff,{groups}", f"cn=admins,{groups}"}
    assert _dns(bob.stdout) == {f"cn=staff,{groups}"}
    assert _dns(carol.stdout) == set()
    kinds = _run(directory, "ldapsearch", "-LLL", "-b", groups, "(objectClass=groupOfNames)", "cn")
    assert len(_dns(kinds.stdout)) == 2


def test_root_dse_advertises_whoami(directory: Running) -> None:
    """The root DSE names dc=example,dc=com and lists the Who am I? extended operation."""
    result = _run(directory, "ldapsearch", "-LLL", "-b", "", "-s", "base")
    assert result.returncode == 0, result.stderr
    assert f"namingContexts: {SUFFIX}" in result.stdout
    assert f"supportedExtension: {WHOAMI_OID}" in result.stdout


def test_anonymous_write_is_refused(directory: Running) -> None:
    """An anonymous add is refused with insufficientAccessRights (50)."""
    ldif = f"dn: uid=dave,ou=people,{SUFFIX}\nobjectClass: inetOrgPerson\nuid: dave\ncn: D\nsn: D\n"
    result = _run(directory, "ldapadd", stdin=ldif)
    assert result.returncode == 50, result.stderr
    search = _run(directory, "ldapsearch", "-LLL", "-b", SUFFIX, "(uid=dave)")
    assert _dns(search.stdout) == set()


def test_certificate_is_checked(directory: Running, tmp_path: Path) -> None:
    """A client that trusts a different CA refuses the directory's certificate."""
    other_ca = CertificateAuthority.generate("some other CA").write_certificate(
        tmp_path / "other-ca.pem"
    )
    env = dict(directory.env, LDAPTLS_CACERT=str(other_ca))
    result = _run(directory, "ldapwhoami", env=env)
    assert result.returncode == 255, result.stderr
    assert "Can't contact LDAP server" in result.stderr
