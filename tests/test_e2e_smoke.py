"""End to end: real ldap-utils clients through ``ldapproxy run`` to a real slapd."""

from __future__ import annotations

from pathlib import Path

from support.ldaptools import run_ldap_tool
from support.proxy import proxy_config
from support.slapd import ALICE_DN, USERS, Slapd

from ldapproxy.pki import CertificateAuthority


def test_whoami_through_every_listener_mode(
    tmp_path: Path, ca: CertificateAuthority, slapd: Slapd, run_proxy
) -> None:
    """A simple bind and WhoAmI work through plain, StartTLS and LDAPS listeners."""
    config, listeners = proxy_config(tmp_path, ca, [slapd.ldaps_url])
    run_proxy(config)
    env = slapd.ldap_env()
    for listener in listeners:
        flags = ["-ZZ"] if listener.tls.startswith("starttls") else []
        result = run_ldap_tool(
            ["ldapwhoami", "-x", *flags, "-H", listener.url, "-D", ALICE_DN, "-w", USERS[ALICE_DN]],
            env,
        )
        assert result.returncode == 0, (listener, result.stderr)
        assert result.stdout.strip() == f"dn:{ALICE_DN}"
