"""Shared fixtures: a throwaway CA and real OpenLDAP slapd instances on loopback."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.proxy import ProxyProcess
from support.slapd import Slapd, SlapdFactory

from ldapproxy.pki import CertificateAuthority, Issued


@pytest.fixture(scope="session")
def ca() -> CertificateAuthority:
    """The CA that issues every certificate in the session, slapd's included."""
    return CertificateAuthority.generate("ldapproxy test CA")


@pytest.fixture(scope="session")
def slapd(ca: CertificateAuthority, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    """One seeded slapd shared by the whole session (don't stop it or change its data).

    A missing slapd is a failure, not a skip: the suite is meaningless without it.
    """
    server = Slapd(tmp_path_factory.mktemp("slapd"), ca)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fresh_slapd(
    ca: CertificateAuthority, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SlapdFactory]:
    """A factory for extra, private slapd instances; all are stopped at teardown.

    ``fresh_slapd()`` serves the usual certificate; ``fresh_slapd(server_cert=issued)``
    serves *issued* instead (an expired one, one for the wrong hostname, ...). Pass
    ``start=False`` to get an unstarted instance, and ``extra_config="idletimeout 2"`` to
    append lines to the global section of its slapd.conf.
    """
    started: list[Slapd] = []

    def make(
        server_cert: Issued | None = None, *, start: bool = True, extra_config: str = ""
    ) -> Slapd:
        server = Slapd(tmp_path_factory.mktemp("fresh-slapd"), ca, server_cert, extra_config)
        started.append(server)
        if start:
            server.start()
        return server

    try:
        yield make
    finally:
        for server in started:
            server.stop()


@pytest.fixture
def run_proxy() -> Iterator[Callable[[Path], ProxyProcess]]:
    """Start ``ldapproxy run -c FILE`` subprocesses; every one is stopped at teardown."""
    started: list[ProxyProcess] = []

    def start(config_path: Path, expect_ready: bool = True) -> ProxyProcess:
        proxy = ProxyProcess(config_path)
        started.append(proxy)
        return proxy.start(expect_ready=expect_ready)

    try:
        yield start
    finally:
        for proxy in started:
            proxy.stop()
