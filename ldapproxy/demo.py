"""``ldapproxy demo``: the real proxy in front of an embedded, throwaway LDAPS directory.

Nothing here is special-cased: the demo writes an ordinary configuration file and runs
it through the same loader, service and listeners as ``ldapproxy run``.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from twisted.internet import defer

from ldapproxy.cli import serve
from ldapproxy.config import load
from ldapproxy.pki import CertificateAuthority

_CONFIG = """\
# Written by `ldapproxy demo`; an ordinary ldapproxy configuration.
[[listener]]
name = "ldap"
endpoint = 'tcp:{port}:interface=127.0.0.1'
tls = "starttls-optional"

[[listener]]
name = "ldaps"
endpoint = 'tcp:{ldaps_port}:interface=127.0.0.1'
tls = "ldaps"

[tls]
certificate = "{certificate}"
private_key = "{private_key}"

[upstream]
urls = ["ldaps://127.0.0.1:{upstream_port}"]
ca_file = "{upstream_ca}"
"""


def run_demo(port: int, ldaps_port: int) -> int:
    """Start the embedded directory and the proxy; run until interrupted."""
    workdir = Path(tempfile.mkdtemp(prefix="ldapproxy-demo-"))
    try:
        return serve(lambda: _build(workdir, port, ldaps_port))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@defer.inlineCallbacks
def _build(workdir: Path, port: int, ldaps_port: int) -> Any:
    from twisted.internet import reactor

    from ldapproxy.directory import DEMO_USERS, start_demo_directory
    from ldapproxy.service import ProxyService

    directory = yield start_demo_directory(reactor, workdir / "upstream")
    authority = CertificateAuthority.generate("ldapproxy demo CA")
    ca_path = authority.write_certificate(workdir / "ca.pem")
    issued = authority.issue("localhost", dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    certificate, private_key = issued.write(workdir, "proxy")
    config_path = workdir / "ldapproxy.toml"
    config_path.write_text(
        _CONFIG.format(
            port=port,
            ldaps_port=ldaps_port,
            certificate=certificate,
            private_key=private_key,
            upstream_port=directory.port,
            upstream_ca=directory.ca_path,
        )
    )
    service = ProxyService(load(config_path), reactor)
    dn, password = next(iter(DEMO_USERS.items()))
    banner = _banner(port, ldaps_port, ca_path, dn, password, directory.port)
    # Printed once the reactor has bound the listeners (the next turn of the loop).
    reactor.callLater(0, _print, banner)
    return service


def _print(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _banner(port: int, ldaps_port: int, ca: Path, dn: str, password: str, upstream: int) -> str:
    env = f"LDAPTLS_CACERT={ca}"
    return f"""
ldapproxy demo: the proxy listens on 127.0.0.1:{port} (plain or StartTLS) and
127.0.0.1:{ldaps_port} (LDAPS), in front of an embedded directory on
ldaps://127.0.0.1:{upstream}.  Try, in another terminal:

  ldapwhoami -x -H ldap://127.0.0.1:{port} -D '{dn}' -w {password}
  {env} ldapwhoami -x -ZZ -H ldap://127.0.0.1:{port} -D '{dn}' -w {password}
  {env} ldapwhoami -x -H ldaps://127.0.0.1:{ldaps_port} -D '{dn}' -w {password}
  ldapsearch -x -H ldap://127.0.0.1:{port} -b dc=example,dc=com '(objectClass=person)' cn mail

Users: alice, bob and carol under ou=people,dc=example,dc=com, password = uid.
Press Ctrl-C to stop.
"""
