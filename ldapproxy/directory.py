"""An in-memory LDAPS directory for `ldapproxy demo`: ldaptor's server, seeded with a few users.

This is the *upstream* side of the demo: a small directory that speaks LDAP over TLS
from the first byte (``ldaps://``), with a certificate signed by a throwaway CA that
is generated at start and written to ``<workdir>/ca.pem`` for clients and the proxy
to trust.  It is deliberately tiny and not meant to hold real data:

* the tree lives in memory and is rebuilt on every start;
* anyone may bind anonymously and search everything (``userPassword`` is never
  returned);
* writes are refused unless the connection is bound as one of the users;
* besides what ldaptor offers, the server answers the "Who am I?" extended
  operation (RFC 4532), so ``ldapwhoami`` works against it.

Connect to ``ldaps://127.0.0.1:<port>``.  The certificate also names ``localhost``,
but OpenLDAP's client library checks ``ldaps://localhost`` against the machine's
host name instead, so its tools only accept the IP address form.

Run it on its own with ``python -m ldapproxy.directory --port N --workdir D``; it
prints ``ready <port>`` once it is listening and runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from OpenSSL import SSL
from twisted.internet.defer import Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import (
    IListeningPort,
    IOpenSSLServerConnectionCreator,
    IReactorTCP,
    IReactorTime,
)
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from zope.interface import implementer

from ldapproxy.pki import CertificateAuthority

# ldaptor 21.2 still calls pyparsing's camelCase API and passlib imports the
# ``crypt`` module, so importing it emits a burst of DeprecationWarnings; silence
# them here so this module stays importable under ``-W error`` (pytest's
# filterwarnings=error).  This only affects the first import of these modules.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    from ldaptor import interfaces as ldap_interfaces
    from ldaptor.entry import sshaDigest
    from ldaptor.inmemory import ReadOnlyInMemoryLDAPEntry
    from ldaptor.protocols import pureldap
    from ldaptor.protocols.ldap import ldaperrors
    from ldaptor.protocols.ldap.ldapserver import LDAPServer

__all__ = [
    "DEMO_SUFFIX",
    "DEMO_USERS",
    "WHOAMI_OID",
    "DemoDirectory",
    "DemoLDAPServer",
    "build_tree",
    "start_demo_directory",
]

DEMO_SUFFIX = "dc=example,dc=com"
"""The naming context of the demo directory."""

_PEOPLE = f"ou=people,{DEMO_SUFFIX}"
_GROUPS = f"ou=groups,{DEMO_SUFFIX}"

# uid -> (cn, sn); each user's password is their uid.
_PEOPLE_SEED: dict[str, tuple[str, str]] = {
    "alice": ("Alice Archer", "Archer"),
    "bob": ("Bob Baker", "Baker"),
    "carol": ("Carol Carter", "Carter"),
}

# cn -> member uids
_GROUPS_SEED: dict[str, tuple[str, ...]] = {
    "staff": ("alice", "bob"),
    "admins": ("alice",),
}

DEMO_USERS: dict[str, str] = {f"uid={uid},{_PEOPLE}": uid for uid in _PEOPLE_SEED}
"""Bind DN -> password for every demo user."""

WHOAMI_OID = b"1.3.6.1.4.1.4203.1.11.3"
"""The "Who am I?" extended operation, RFC 4532."""

_PASSWORD_MODIFY_OID = b"1.3.6.1.4.1.4203.1.11.1"
_HIDDEN_ATTRIBUTES = frozenset({"userpassword"})


def _user_dn(uid: str) -> str:
    return f"uid={uid},{_PEOPLE}"


def build_tree() -> Any:
    """Build the seeded DIT and return its root ``ReadOnlyInMemoryLDAPEntry``.

    Despite the class name, ldaptor's in-memory entries are writable through
    ``LDAPServer``; :class:`DemoLDAPServer` is what keeps anonymous clients out.
    Passwords are stored as ``{SSHA}`` with a random salt, which ldaptor's bind
    verifies (it also accepts plain text, but there is no reason to store that).
    """
    root = ReadOnlyInMemoryLDAPEntry(
        dn=DEMO_SUFFIX,
        attributes={
            "objectClass": ["top", "dcObject", "organization"],
            "dc": ["example"],
            "o": ["Example Corp"],
        },
    )
    people = root.addChild(
        "ou=people", {"objectClass": ["top", "organizationalUnit"], "ou": ["people"]}
    )
    groups = root.addChild(
        "ou=groups", {"objectClass": ["top", "organizationalUnit"], "ou": ["groups"]}
    )
    for uid, (cn, sn) in _PEOPLE_SEED.items():
        password = DEMO_USERS[_user_dn(uid)]
        people.addChild(
            f"uid={uid}",
            {
                "objectClass": ["top", "person", "organizationalPerson", "inetOrgPerson"],
                "uid": [uid],
                "cn": [cn],
                "sn": [sn],
                "mail": [f"{uid}@example.com"],
                "userPassword": [sshaDigest(password.encode("utf-8"), os.urandom(8))],
            },
        )
    for cn, members in _GROUPS_SEED.items():
        groups.addChild(
            f"cn={cn}",
            {
                "objectClass": ["top", "groupOfNames"],
                "cn": [cn],
                "member": [_user_dn(uid) for uid in members],
            },
        )
    return root


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _without_matched_dn(response: Any) -> Any:
    if isinstance(response, pureldap.LDAPBindResponse) and response.resultCode == 0:
        return pureldap.LDAPBindResponse(resultCode=ldaperrors.Success.resultCode)
    return response


def _is_root_dse_request(request: Any) -> bool:
    """Whether a search asks for the root DSE: base "", scope base, (objectClass=*)."""
    return (
        _text(request.baseObject) == ""
        and request.scope == pureldap.LDAP_SCOPE_baseObject
        and isinstance(request.filter, pureldap.LDAPFilter_present)
        and _text(request.filter.value).lower() == "objectclass"
    )


class DemoLDAPServer(LDAPServer):  # type: ignore[misc]  # ldaptor is untyped
    """ldaptor's ``LDAPServer`` with Who am I?, read-only anonymous access and no hashes.

    Differences from the stock server:

    * a failed bind leaves the connection anonymous (ldaptor keeps the previous
      identity, RFC 4511 section 4.2.1 says it must not), and a successful one has
      an empty matchedDN (ldaptor fills in the DN, which makes OpenLDAP's tools
      print a spurious "ldap_bind: Success (0)" diagnostic);
    * add, delete, modify and modify-DN need a bound user (insufficientAccessRights
      otherwise);
    * ``userPassword`` is stripped from search results;
    * the root DSE also advertises the Who am I? extended operation.
    """

    def handle_LDAPBindRequest(
        self, request: Any, controls: Any, reply: Callable[[Any], None]
    ) -> Any:
        self.boundUser = None
        bound: Deferred[Any] = maybeDeferred(
            super().handle_LDAPBindRequest, request, controls, reply
        )
        return bound.addCallback(_without_matched_dn)

    def extendedRequest_WhoAmI(self, data: object, reply: Callable[[Any], None]) -> Any:
        """Answer RFC 4532: ``dn:<bound DN>``, or an empty authzId when anonymous."""
        if data is not None:
            raise ldaperrors.LDAPProtocolError(b"Who am I? takes no request value")
        if self.boundUser is None:
            authz_id = b""
        else:
            authz_id = b"dn:" + self.boundUser.dn.getText().encode("utf-8")
        return pureldap.LDAPExtendedResponse(
            resultCode=ldaperrors.Success.resultCode, response=authz_id
        )

    # LDAPServer.handle_LDAPExtendedRequest finds handlers by this attribute; the
    # request has no value, so the handler gets ``None`` and no BER decoder is needed.
    extendedRequest_WhoAmI.oid = WHOAMI_OID  # type: ignore[attr-defined]

    def getRootDSE(self, request: Any, reply: Callable[[Any], None]) -> Any:
        root = ldap_interfaces.IConnectedLDAPEntry(self.factory)
        reply(
            pureldap.LDAPSearchResultEntry(
                objectName="",
                attributes=[
                    ("supportedLDAPVersion", ["3"]),
                    ("namingContexts", [root.dn.getText()]),
                    ("supportedExtension", [_PASSWORD_MODIFY_OID, WHOAMI_OID]),
                ],
            )
        )
        return pureldap.LDAPSearchResultDone(resultCode=ldaperrors.Success.resultCode)

    def handle_LDAPSearchRequest(
        self, request: Any, controls: Any, reply: Callable[[Any], None]
    ) -> Any:
        if _is_root_dse_request(request):
            # ldaptor only recognises the filter spelled exactly "(objectClass=*)",
            # while ldapsearch sends "(objectclass=*)" and gets noSuchObject.
            self.checkControls(controls)
            return self.getRootDSE(request, reply)

        def without_secrets(response: Any) -> None:
            if isinstance(response, pureldap.LDAPSearchResultEntry):
                response = pureldap.LDAPSearchResultEntry(
                    objectName=response.objectName,
                    attributes=[
                        (name, values)
                        for name, values in response.attributes
                        if _text(name).lower() not in _HIDDEN_ATTRIBUTES
                    ],
                )
            reply(response)

        return super().handle_LDAPSearchRequest(request, controls, without_secrets)

    def _require_bound(self) -> None:
        if self.boundUser is None:
            raise ldaperrors.LDAPInsufficientAccessRights(
                b"the demo directory only accepts writes from bound users"
            )

    def handle_LDAPAddRequest(self, request: Any, controls: Any, reply: Any) -> Any:
        self._require_bound()
        return super().handle_LDAPAddRequest(request, controls, reply)

    def handle_LDAPDelRequest(self, request: Any, controls: Any, reply: Any) -> Any:
        self._require_bound()
        return super().handle_LDAPDelRequest(request, controls, reply)

    def handle_LDAPModifyRequest(self, request: Any, controls: Any, reply: Any) -> Any:
        self._require_bound()
        return super().handle_LDAPModifyRequest(request, controls, reply)

    def handle_LDAPModifyDNRequest(self, request: Any, controls: Any, reply: Any) -> Any:
        self._require_bound()
        return super().handle_LDAPModifyDNRequest(request, controls, reply)


class _DirectoryFactory(ServerFactory):
    """Builds :class:`DemoLDAPServer` protocols that all serve the same tree."""

    noisy = False

    def __init__(self, root: Any) -> None:
        self.root = root

    def buildProtocol(self, addr: object) -> Protocol:
        server: Protocol = DemoLDAPServer()
        server.factory = self
        return server

    def __conform__(self, interface: object) -> Any:
        # ldaptor finds the tree with ``IConnectedLDAPEntry(self.factory)``; answering
        # the adaptation here avoids registering a process-wide adapter.
        if interface is ldap_interfaces.IConnectedLDAPEntry:
            return self.root
        return None


@implementer(IOpenSSLServerConnectionCreator)
class _ServerTLS:
    """One pyOpenSSL server context (TLS 1.2 or later) shared by every connection."""

    def __init__(self, certificate_path: Path, key_path: Path) -> None:
        context = SSL.Context(SSL.TLS_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        context.set_options(SSL.OP_NO_COMPRESSION)
        context.use_certificate_chain_file(str(certificate_path))
        context.use_privatekey_file(str(key_path))
        context.check_privatekey()
        self._context = context

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        return SSL.Connection(self._context, None)


@dataclass(frozen=True)
class DemoDirectory:
    """A running demo directory: where it listens and which CA its certificate chains to."""

    port: int
    """The TCP port on 127.0.0.1 serving ``ldaps://``."""
    ca_path: Path
    """``<workdir>/ca.pem``: the throwaway CA that signed the directory's certificate."""
    workdir: Path
    """Where ``ca.pem`` and the directory's own certificate and key were written."""
    _listening: IListeningPort = field(repr=False, compare=False)

    def stop(self) -> Deferred[None]:
        """Stop listening; connections already open are left to finish on their own."""
        stopped = self._listening.stopListening()
        return succeed(None) if stopped is None else stopped


def start_demo_directory(
    reactor: IReactorTCP, workdir: Path, port: int = 0
) -> Deferred[DemoDirectory]:
    """Seed the demo tree and serve it over LDAPS on ``127.0.0.1:port``.

    *reactor* must provide ``IReactorTCP`` and ``IReactorTime``.  *port* 0 picks any
    free port; the result's :attr:`DemoDirectory.port` is the one actually bound.
    A fresh CA is generated on every call: its certificate goes to
    ``<workdir>/ca.pem`` and the directory's certificate (for ``localhost`` and
    ``127.0.0.1``) and key to ``<workdir>/directory.pem`` and ``directory.key``.
    """
    clock = IReactorTime(reactor)
    workdir.mkdir(parents=True, exist_ok=True)
    authority = CertificateAuthority.generate("ldapproxy demo directory CA")
    ca_path = authority.write_certificate(workdir / "ca.pem")
    issued = authority.issue("localhost", dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    certificate_path, key_path = issued.write(workdir, "directory")

    factory = TLSMemoryBIOFactory(
        _ServerTLS(certificate_path, key_path),
        False,
        _DirectoryFactory(build_tree()),
        clock=clock,
    )
    try:
        # IReactorTCP.listenTCP is annotated with ServerFactory, but Twisted's own
        # TLSMemoryBIOFactory is a WrappingFactory (a ClientFactory); it works fine.
        listening = reactor.listenTCP(port, factory, interface="127.0.0.1")  # type: ignore[arg-type]
    except Exception:
        return fail()
    return succeed(
        DemoDirectory(
            port=listening.getHost().port,  # type: ignore[attr-defined]
            ca_path=ca_path,
            workdir=workdir,
            _listening=listening,
        )
    )


def _parse_args(argv: Iterable[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ldapproxy.directory",
        description="Serve the ldapproxy demo directory over LDAPS on 127.0.0.1.",
    )
    parser.add_argument("--port", type=int, default=0, help="TCP port (default: any free)")
    parser.add_argument(
        "--workdir", type=Path, required=True, help="where to write ca.pem and the server key"
    )
    return parser.parse_args(list(argv))


def main(argv: Iterable[str] | None = None) -> int:
    """Run the directory with the global reactor until it is stopped (SIGTERM, SIGINT)."""
    from twisted.internet import reactor as global_reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    args = _parse_args(sys.argv[1:] if argv is None else argv)
    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stderr)], redirectStandardIO=False)
    reactor: Any = global_reactor
    failures: list[BaseException] = []

    def ready(directory: DemoDirectory) -> None:
        print(f"ready {directory.port}", flush=True)

    def failed(reason: Any) -> None:
        failures.append(reason.value)
        print(f"failed: {reason.getErrorMessage()}", file=sys.stderr, flush=True)
        reactor.stop()

    def start() -> None:
        start_demo_directory(reactor, args.workdir, args.port).addCallbacks(ready, failed)

    reactor.callWhenRunning(start)
    reactor.run()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
