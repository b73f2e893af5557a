"""A real OpenLDAP slapd for the integration tests, run the way an operator would.

Each :class:`Slapd` owns a work directory holding a ``slapd.conf``, an mdb database
seeded with :func:`seed_ldif` through ``slapadd``, a TLS certificate and key, and the
slapd log. slapd runs in the foreground (``-d stats``) as a child of the test process,
listening on ``ldap://`` (StartTLS available) and ``ldaps://`` on free loopback ports,
and is always stopped by its PID.

The directory tree::

    dc=example,dc=com
    |- cn=admin            rootdn (not an entry), password ADMIN_PASSWORD
    |- cn=vault            description: the-vault-secret (admin-reader and rootdn only)
    |- ou=people           inetOrgPerson + posixAccount; uidNumber in brackets
    |  |- uid=alice        [2001] may write anything under ou=people
    |  |- uid=bob          [2002]
    |  |- uid=admin-reader [2003] the only user who can read cn=vault
    |  `- uid=user001 .. uid=user120   [10001 .. 10120], cn "User 001" ..
    `- ou=groups
       `- cn=staff         groupOfNames: alice, bob

Debian's slapd is built against GnuTLS; it loads the PKCS#8 ECDSA P-256 keys produced
by :mod:`ldapproxy.pki` without complaint.
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from ldapproxy.pki import CertificateAuthority, Issued

from .ldaptools import run_ldap_tool
from .net import LOOPBACK, free_port, port_is_open

SUFFIX = "dc=example,dc=com"
PEOPLE_DN = f"ou=people,{SUFFIX}"
GROUPS_DN = f"ou=groups,{SUFFIX}"
STAFF_DN = f"cn=staff,{GROUPS_DN}"
VAULT_DN = f"cn=vault,{SUFFIX}"
VAULT_SECRET = "the-vault-secret"
ADMIN_DN = f"cn=admin,{SUFFIX}"
ADMIN_PASSWORD = "admin-secret-123"

ALICE_DN = f"uid=alice,{PEOPLE_DN}"
BOB_DN = f"uid=bob,{PEOPLE_DN}"
ADMIN_READER_DN = f"uid=admin-reader,{PEOPLE_DN}"

#: DN -> password for the named users (the bulk users are in :func:`bulk_user_dn`).
USERS: dict[str, str] = {
    ALICE_DN: "alice-pw-1",
    BOB_DN: "bob-pw-2",
    ADMIN_READER_DN: "reader-pw-3",
}

BULK_USER_COUNT = 120
USERS_GID = 1000

#: cn (like uid, sn, mail) has no ORDERING rule in OpenLDAP's core schema, so slapd's
#: sssvlv rejects a plain ``sss=cn`` with inappropriateMatching (18), critical or not.
#: Name the ordering rule in the sort key (``-E sss=cn:2.5.13.3``) or sort on
#: ``uidNumber`` (integerOrderingMatch): every person is also a posixAccount.
CASE_IGNORE_ORDERING = "2.5.13.3"

MODULE_PATH = Path("/usr/lib/ldap")
SCHEMA_DIR = Path("/etc/ldap/schema")
SCHEMAS = ("core", "cosine", "inetorgperson", "nis")
MODULES = ("back_mdb", "sssvlv", "syncprov")


def all_threads_stopped(pid: int) -> bool:
    """Whether every thread of process ``pid`` is in the stopped state (T)."""
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/stat") as stat:
                state = stat.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            continue  # a thread that exited meanwhile
        if state not in ("T", "t"):
            return False
    return True


def bulk_user_uid(i: int) -> str:
    """The uid of bulk user *i* (1-based): ``user001`` .. ``user120``."""
    if not 1 <= i <= BULK_USER_COUNT:
        raise ValueError(f"bulk users are numbered 1..{BULK_USER_COUNT}, not {i}")
    return f"user{i:03d}"


def bulk_user_dn(i: int) -> str:
    """The DN of bulk user *i* (1-based), e.g. ``uid=user001,ou=people,dc=example,dc=com``."""
    return f"uid={bulk_user_uid(i)},{PEOPLE_DN}"


def bulk_user_password(i: int) -> str:
    """The password of bulk user *i*, e.g. ``user001-pw``."""
    return f"{bulk_user_uid(i)}-pw"


def ssha(password: str, salt: bytes | None = None) -> str:
    """Hash *password* as slapd's ``{SSHA}`` scheme (what slappasswd emits by default)."""
    salt = os.urandom(8) if salt is None else salt
    digest = hashlib.sha1(password.encode() + salt).digest()  # noqa: S324 - it's the {SSHA} format
    return "{SSHA}" + base64.b64encode(digest + salt).decode("ascii")


def _person(
    uid: str, number: int, cn: str, sn: str, password: str, description: str | None = None
) -> str:
    lines = [
        f"dn: uid={uid},{PEOPLE_DN}",
        "objectClass: inetOrgPerson",
        "objectClass: posixAccount",
        f"uid: {uid}",
        f"cn: {cn}",
        f"sn: {sn}",
        f"mail: {uid}@example.com",
        f"uidNumber: {number}",
        f"gidNumber: {USERS_GID}",
        f"homeDirectory: /home/{uid}",
        f"userPassword: {ssha(password)}",
    ]
    if description is not None:
        lines.append(f"description: {description}")
    return "\n".join(lines)


def seed_ldif() -> str:
    """The LDIF that every fresh slapd starts with."""
    entries = [
        f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\n"
        "o: Example Corp",
        f"dn: {PEOPLE_DN}\nobjectClass: organizationalUnit\nou: people",
        f"dn: {GROUPS_DN}\nobjectClass: organizationalUnit\nou: groups",
        f"dn: {VAULT_DN}\nobjectClass: organizationalRole\ncn: vault\ndescription: {VAULT_SECRET}",
        _person("alice", 2001, "Alice Liddell", "Liddell", USERS[ALICE_DN], "alice's entry"),
        _person("bob", 2002, "Bob Builder", "Builder", USERS[BOB_DN], "bob's entry"),
        _person("admin-reader", 2003, "Admin Reader", "Reader", USERS[ADMIN_READER_DN]),
    ]
    entries += [
        _person(bulk_user_uid(i), 10000 + i, f"User {i:03d}", f"User{i:03d}", bulk_user_password(i))
        for i in range(1, BULK_USER_COUNT + 1)
    ]
    entries.append(
        f"dn: {STAFF_DN}\nobjectClass: groupOfNames\ncn: staff\n"
        f"member: {ALICE_DN}\nmember: {BOB_DN}"
    )
    return "\n\n".join(entries) + "\n"


def _find_sbin(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/sbin")
    if found is None:
        raise FileNotFoundError(
            f"{name} not found (looked on PATH and in /usr/sbin): the integration tests need "
            "a real OpenLDAP server; install Debian's slapd and ldap-utils (make system-deps)"
        )
    return found


class SlapdError(RuntimeError):
    """slapd could not be configured, seeded or started."""


class Slapd:
    """One OpenLDAP slapd process with its own config, database, certificate and ports."""

    suffix = SUFFIX
    admin_dn = ADMIN_DN
    admin_password = ADMIN_PASSWORD
    people_dn = PEOPLE_DN
    groups_dn = GROUPS_DN
    vault_dn = VAULT_DN

    def __init__(
        self,
        workdir: Path,
        ca: CertificateAuthority,
        server_cert: Issued | None = None,
        extra_config: str = "",
    ) -> None:
        self.workdir = workdir
        self.ca = ca
        #: Appended to the global section of slapd.conf, e.g. ``"idletimeout 2"``.
        self.extra_config = extra_config
        self.server_cert = server_cert or ca.issue(
            "localhost", dns_names=["localhost"], ip_addresses=[LOOPBACK]
        )
        self.ldap_port = free_port()
        self.ldaps_port = free_port()
        while self.ldaps_port == self.ldap_port:
            self.ldaps_port = free_port()
        self.pid: int | None = None
        self._process: subprocess.Popen[bytes] | None = None

        self.conf_path = workdir / "slapd.conf"
        self.data_dir = workdir / "data"
        self.tls_dir = workdir / "tls"
        self.ca_path = self.tls_dir / "ca.pem"
        self.log_path = workdir / "slapd.log"
        self.seed_path = workdir / "seed.ldif"
        self._client_home = workdir / "client-home"

    # -- addresses -------------------------------------------------------------------

    @property
    def ldap_url(self) -> str:
        return f"ldap://{LOOPBACK}:{self.ldap_port}"

    @property
    def ldaps_url(self) -> str:
        return f"ldaps://{LOOPBACK}:{self.ldaps_port}"

    @property
    def listen_urls(self) -> str:
        """The ``-h`` argument: both listeners, loopback only."""
        return f"{self.ldap_url}/ {self.ldaps_url}/"

    # -- client side -----------------------------------------------------------------

    def ldap_env(self) -> dict[str, str]:
        """Environment for ldap-utils: trust only our CA, demand a valid certificate.

        ``LDAPNOINIT`` cannot be used for isolation: libldap then ignores the
        ``LDAPTLS_*`` variables as well. Instead every inherited ``LDAP*`` variable is
        dropped, ``HOME`` points at an empty directory (no ``~/.ldaprc``) and the TLS
        settings are given as variables, which override /etc/ldap/ldap.conf.

        Use the ``127.0.0.1`` URLs: libldap replaces the name ``localhost`` by the
        machine's hostname before checking the certificate, so ``ldaps://localhost``
        fails verification against a ``DNS:localhost`` certificate.
        """
        env = {k: v for k, v in os.environ.items() if not k.startswith("LDAP")}
        self._client_home.mkdir(parents=True, exist_ok=True)
        env.update(
            HOME=str(self._client_home),
            LDAPTLS_CACERT=str(self.ca_path),
            LDAPTLS_REQCERT="demand",
            LDAPTLS_CACERTDIR=str(self._client_home),
        )
        return env

    # -- lifecycle -------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 15) -> None:
        """Start slapd (seeding the database on first start) and wait until it answers."""
        if self.running:
            return
        if not self.conf_path.exists():
            self._prepare()
        slapd = _find_sbin("slapd")
        with self.log_path.open("ab") as log:
            process = subprocess.Popen(
                [slapd, "-f", str(self.conf_path), "-h", self.listen_urls, "-d", "stats"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._process = process
        self.pid = process.pid
        try:
            self._wait_until_ready(timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """SIGTERM slapd by its PID, wait, SIGKILL if it lingers. Idempotent."""
        process = self._process
        if process is None:
            return
        try:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.kill(process.pid, signal.SIGKILL)
                    process.wait(timeout=10)
        finally:
            self._process = None
            self.pid = None

    def restart(self) -> None:
        """Stop and start again: same ports, same data, same certificate."""
        self.stop()
        self.start()

    def __enter__(self) -> Slapd:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def log_text(self) -> str:
        """Everything slapd has logged so far (``stats`` level: connections, binds, results)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def __repr__(self) -> str:
        return f"<Slapd pid={self.pid} {self.ldap_url} {self.ldaps_url} in {self.workdir}>"

    # -- internals -------------------------------------------------------------------

    def _prepare(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(mode=0o700, exist_ok=True)
        self.tls_dir.mkdir(mode=0o700, exist_ok=True)
        self.ca.write_certificate(self.ca_path)
        cert_path, key_path = self.server_cert.write(self.tls_dir, "server")
        self.conf_path.write_text(self._config(cert_path, key_path))
        self.seed_path.write_text(seed_ldif())
        slapadd = _find_sbin("slapadd")
        result = subprocess.run(
            [slapadd, "-q", "-f", str(self.conf_path), "-l", str(self.seed_path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            self.conf_path.unlink()  # so the next start() tries again from scratch
            raise SlapdError(
                f"slapadd failed with exit status {result.returncode}:\n"
                f"{result.stdout}{result.stderr}"
            )

    def _config(self, cert_path: Path, key_path: Path) -> str:
        includes = "\n".join(f"include {SCHEMA_DIR / name}.schema" for name in SCHEMAS)
        modules = "\n".join(f"moduleload {name}" for name in MODULES)
        reader = ADMIN_READER_DN
        return f"""\
# Generated by tests/support/slapd.py
{includes}

modulepath {MODULE_PATH}
{modules}

pidfile {self.workdir / "slapd.pid"}
argsfile {self.workdir / "slapd.args"}
loglevel stats
sizelimit unlimited

TLSCACertificateFile {self.ca_path}
TLSCertificateFile {cert_path}
TLSCertificateKeyFile {key_path}
TLSVerifyClient never
{self.extra_config}

database mdb
suffix "{SUFFIX}"
rootdn "{ADMIN_DN}"
rootpw {ssha(ADMIN_PASSWORD)}
directory {self.data_dir}
maxsize 104857600
sizelimit unlimited
index objectClass eq
index uid,cn,mail eq
index uidNumber eq
index entryCSN,entryUUID eq

overlay syncprov
syncprov-checkpoint 100 10

overlay sssvlv
# Sort and VLV state is freed only when slapd has processed its connection's close; the
# default limit on it (half the threads, shared by all connections) is too tight for a
# suite that sorts on many short connections in a row.
sssvlv-max 1000

# The root DSE and the schema are public.
access to dn.base="" by * read
access to dn.base="cn=Subschema" by * read

access to attrs=userPassword
    by self write
    by anonymous auth
    by * none

access to dn.base="{VAULT_DN}"
    by dn.exact="{reader}" read
    by * none

access to dn.subtree="{PEOPLE_DN}"
    by dn.exact="{ALICE_DN}" write
    by self write
    by users read
    by * none

access to *
    by users read
    by * none
"""

    def _wait_until_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        env = self.ldap_env()
        last = "slapd never opened its ports"
        while True:
            process = self._process
            if process is None or process.poll() is not None:
                code = None if process is None else process.returncode
                raise SlapdError(
                    f"slapd exited with status {code} during startup; log:\n{self.log_text()}"
                )
            if port_is_open(LOOPBACK, self.ldap_port) and port_is_open(LOOPBACK, self.ldaps_port):
                result = run_ldap_tool(
                    ["ldapwhoami", "-x", "-H", self.ldap_url, "-o", "nettimeout=2"],
                    env,
                    timeout=5,
                )
                if result.returncode == 0:
                    return
                last = f"ldapwhoami said ({result.returncode}): {result.stderr.strip()}"
            if time.monotonic() >= deadline:
                raise SlapdError(
                    f"slapd (pid {process.pid}) not answering after {timeout:g}s: {last}\n"
                    f"log:\n{self.log_text()}"
                )
            time.sleep(0.05)


#: The type of the ``fresh_slapd`` fixture: ``fresh_slapd(server_cert=None, *, start=True)``.
SlapdFactory = Callable[..., Slapd]
