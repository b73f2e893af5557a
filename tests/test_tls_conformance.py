"""The TLS a client meets at the proxy, as measured by a real TLS scanner.

Promised (README, docs/configuration.rst ``[tls]``, ldapproxy/tls.py), on ``ldaps``
listeners and after StartTLS alike, with the default ``[tls]`` settings:

* SSL 2, SSL 3, TLS 1.0 and TLS 1.1 are refused; TLS 1.2 and TLS 1.3 are accepted;
* every TLS 1.2 cipher suite accepted is an AEAD (AES-GCM or ChaCha20-Poly1305) with a
  key of at least 128 bits; nothing with RC4, 3DES, DES, NULL, EXPORT or anonymous key
  exchange;
* every TLS 1.2 cipher suite accepted is forward-secret (ECDHE or DHE key exchange);
* no TLS compression;
* no client-initiated renegotiation (so none of the insecure kind);
* the certificate served is the configured one, and it verifies against the CA that
  issued it for 127.0.0.1 and localhost;
* a client that offers only TLS 1.0 gets a protocol_version alert, the proxy logs one
  line about that handshake, and it goes on serving other clients.

How it is checked: one proxy (``ldapproxy run`` as a subprocess) in front of the
session's slapd, with an ``ldaps`` and a ``starttls-optional`` listener on loopback.
sslyze (``$SSLYZE``, by default ``.venv-scan/bin/sslyze``; ``make test`` installs it)
scans each listener once per module, both scans running at the same time, and each
promise is one test over its JSON results, for both listeners.  The StartTLS listener
is scanned with ``--starttls ldap`` through :class:`support.tlsscan.StartTLSFront`,
because sslyze only accepts StartTLS responses that match known bytes and ldapproxy's
carries the optional responseName (see that module).  The certificate is also verified
independently with ``cryptography``'s X.509 verifier against the ``ca`` fixture.  The
TLS 1.0 client is Python's ``ssl`` module; the follow-up client is ``ldapwhoami``.

A missing sslyze fails the scan tests with a message saying how to install it; it is
never a skip.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import tomllib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store
from support.ldaptools import run_ldap_tool
from support.proxy import Listener, ProxyProcess, proxy_config
from support.rawldap import RawClient, starttls
from support.slapd import ALICE_DN, USERS, Slapd
from support.tlsscan import (
    ScanError,
    ScanReport,
    SslyzeScan,
    StartTLSFront,
    sslyze_executable,
)

from ldapproxy import messages as m
from ldapproxy.metrics import handshake_failure_reason
from ldapproxy.pki import CertificateAuthority

pytestmark = pytest.mark.slapd

#: Test parameter -> the ``tls`` mode of the proxy listener it scans.
LISTENERS = {"ldaps": "ldaps", "starttls": "starttls-optional"}

REFUSED_VERSIONS = ("ssl_2_0", "ssl_3_0", "tls_1_0", "tls_1_1")
ACCEPTED_VERSIONS = ("tls_1_2", "tls_1_3")

#: Substrings of IANA suite names that mark a weak TLS 1.2 suite.
WEAK_MARKERS = ("RC4", "3DES", "DES_CBC", "NULL", "EXPORT", "_anon_")
AEAD_MARKERS = ("_GCM_", "_CHACHA20_POLY1305_")
FORWARD_SECRET_PREFIXES = ("TLS_ECDHE_", "TLS_DHE_")


@dataclass
class Proxy:
    process: ProxyProcess
    listeners: dict[str, Listener]
    ca_file: Path
    certificate: Path


@pytest.fixture(scope="module")
def proxy(
    ca: CertificateAuthority, slapd: Slapd, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Proxy]:
    """One proxy, default [tls] settings, with an ldaps and a starttls-optional listener."""
    config, listeners = proxy_config(
        tmp_path_factory.mktemp("tls-conformance"),
        ca,
        [slapd.ldaps_url],
        listeners=[Listener("ldaps", "ldaps"), Listener("starttls-optional", "ldap")],
    )
    tls = tomllib.loads(config.read_text())["tls"]
    process = ProxyProcess(config).start()
    try:
        yield Proxy(
            process,
            {listener.tls: listener for listener in listeners},
            config.parent / "ca.pem",
            Path(tls["certificate"]),
        )
    finally:
        process.stop()


class Scans:
    """The sslyze report of each listener, or why there is none."""

    def __init__(self) -> None:
        self._outcomes: dict[str, ScanReport | AssertionError] = {}

    def record(self, name: str, outcome: ScanReport | AssertionError) -> None:
        self._outcomes[name] = outcome

    def __getitem__(self, name: str) -> ScanReport:
        """The report for listener ``name``; a missing scanner or a failed scan fails
        the calling test (not its setup) with sslyze's own message."""
        outcome = self._outcomes[name]
        if isinstance(outcome, AssertionError):
            raise outcome
        return outcome


@pytest.fixture(scope="module")
def scans(proxy: Proxy, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scans]:
    """Both listeners scanned once, concurrently."""
    outdir = tmp_path_factory.mktemp("sslyze")
    result = Scans()
    try:
        sslyze_executable()
    except AssertionError as missing:
        for name in LISTENERS:
            result.record(name, missing)
        yield result
        return
    ldaps = proxy.listeners["ldaps"]
    with StartTLSFront(proxy.listeners["starttls-optional"].port) as front:
        running = {
            "ldaps": SslyzeScan("127.0.0.1", ldaps.port, outdir / "ldaps.json", proxy.ca_file),
            "starttls": SslyzeScan(
                "127.0.0.1", front.port, outdir / "starttls.json", proxy.ca_file, "ldap"
            ),
        }
        try:
            for name, scan in running.items():
                try:
                    result.record(name, scan.report())
                except ScanError as error:
                    result.record(name, error)
        finally:
            for scan in running.values():
                scan.kill()
    refused = [answer for answer in front.answers if answer[0] != m.SUCCESS]
    if not front.answers or refused or front.failures:
        result.record(
            "starttls",
            ScanError(
                f"StartTLS through the relay: {len(front.answers)} answer(s) from the "
                f"proxy, refusals (resultCode, responseName): {refused[:5]}, "
                f"relay failures: {front.failures[:5]}"
            ),
        )
    yield result


def accepted(report: ScanReport, version: str) -> list[str]:
    return [suite["cipher_suite"]["name"] for suite in report.accepted_suites(version)]


def test_scanner_version(scans: Scans) -> None:
    """The JSON read below has the layout of sslyze 6 (the Makefile installs 6.3.1)."""
    for name in LISTENERS:
        assert scans[name].sslyze_version.split(".")[0] == "6", scans[name].sslyze_version


@pytest.mark.parametrize("listener", LISTENERS)
def test_old_protocol_versions_are_refused(scans: Scans, listener: str) -> None:
    """SSL 2, SSL 3, TLS 1.0 and TLS 1.1: sslyze offered suites, none was accepted."""
    report = scans[listener]
    for version in REFUSED_VERSIONS:
        assert accepted(report, version) == [], f"{version} accepted on {listener}"
        assert report.command(f"{version}_cipher_suites")["is_tls_version_supported"] is False
        assert report.rejected_suites(version), f"sslyze offered no {version} suite at all"


@pytest.mark.parametrize("listener", LISTENERS)
def test_tls_1_2_and_1_3_are_accepted(scans: Scans, listener: str) -> None:
    """TLS 1.2 and TLS 1.3 each have at least one accepted suite."""
    report = scans[listener]
    for version in ACCEPTED_VERSIONS:
        assert report.command(f"{version}_cipher_suites")["is_tls_version_supported"] is True
        assert accepted(report, version), f"no {version} suite accepted on {listener}"


@pytest.mark.parametrize("listener", LISTENERS)
def test_no_weak_tls_1_2_cipher_suites(scans: Scans, listener: str) -> None:
    """Every accepted TLS 1.2 suite is AEAD, at least 128-bit, not anonymous, not legacy."""
    suites = [suite["cipher_suite"] for suite in scans[listener].accepted_suites("tls_1_2")]
    assert suites, "no TLS 1.2 suite accepted: nothing to check"
    weak = [
        suite["name"]
        for suite in suites
        if suite["is_anonymous"]
        or suite["key_size"] < 128
        or not any(marker in suite["name"] for marker in AEAD_MARKERS)
        or any(marker in suite["name"] for marker in WEAK_MARKERS)
    ]
    assert weak == [], f"weak TLS 1.2 suites accepted on {listener}: {weak}"


@pytest.mark.parametrize("listener", LISTENERS)
def test_tls_1_2_forward_secrecy(scans: Scans, listener: str) -> None:
    """Every accepted TLS 1.2 suite uses an ephemeral (EC)DH key exchange."""
    suites = scans[listener].accepted_suites("tls_1_2")
    assert suites, "no TLS 1.2 suite accepted: nothing to check"
    static = [
        suite["cipher_suite"]["name"]
        for suite in suites
        if not suite["cipher_suite"]["name"].startswith(FORWARD_SECRET_PREFIXES)
        or (suite.get("ephemeral_key") or {}).get("type_name") not in ("ECDH", "DH")
    ]
    assert static == [], f"TLS 1.2 suites without forward secrecy on {listener}: {static}"


@pytest.mark.parametrize("listener", LISTENERS)
def test_no_tls_compression(scans: Scans, listener: str) -> None:
    assert scans[listener].command("tls_compression")["supports_compression"] is False


@pytest.mark.parametrize("listener", LISTENERS)
def test_no_client_initiated_renegotiation(scans: Scans, listener: str) -> None:
    """Renegotiation is disabled: sslyze's client-initiated renegotiations all fail, so no
    insecure renegotiation (and no renegotiation DoS) is possible."""
    result = scans[listener].command("session_renegotiation")
    assert result["client_renegotiations_success_count"] == 0, result
    assert result["is_vulnerable_to_client_renegotiation_dos"] is False, result


@pytest.mark.parametrize("listener", LISTENERS)
def test_certificate_chain(
    scans: Scans, proxy: Proxy, ca: CertificateAuthority, listener: str
) -> None:
    """The configured certificate is served, in order, and verifies against the test CA
    for 127.0.0.1 and localhost (by sslyze with the CA file, and by cryptography)."""
    info = scans[listener].command("certificate_info")
    deployments = info["certificate_deployments"]
    assert deployments, "sslyze saw no certificate"
    configured = x509.load_pem_x509_certificate(proxy.certificate.read_bytes())
    for deployment in deployments:
        chain = [
            x509.load_pem_x509_certificate(cert["as_pem"].encode())
            for cert in deployment["received_certificate_chain"]
        ]
        assert chain, "empty certificate chain"
        assert chain[0] == configured, f"served {chain[0].subject}, configured {configured}"
        assert deployment["received_chain_has_valid_order"] is True

        by_sslyze = [
            validation
            for validation in deployment["path_validation_results"]
            if validation["trust_store"]["path"] == str(proxy.ca_file)
        ]
        assert len(by_sslyze) == 1, "sslyze did not validate against the test CA file"
        assert by_sslyze[0]["was_validation_successful"] is True, by_sslyze[0]

        sans = deployment["received_certificate_chain"][0]["subject_alternative_name"]
        assert "127.0.0.1" in sans["ip_addresses"], sans
        assert "localhost" in sans["dns_names"], sans

        for name in (x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")):
            verifier = (
                PolicyBuilder()
                .store(Store([ca.certificate]))
                .time(datetime.datetime.now(datetime.UTC))
                .build_server_verifier(name)
            )
            verified = verifier.verify(chain[0], chain[1:])  # raises if it does not verify
            assert verified[-1] == ca.certificate


def tls10_only_context(ca_file: Path) -> ssl.SSLContext:
    """A client that offers TLS 1.0 and nothing else (OpenSSL 3 needs security level 0
    for its TLS 1.0 suites)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(str(ca_file))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSVersion.TLSv1 is deprecated
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


@pytest.mark.parametrize("listener", LISTENERS)
def test_tls_1_0_client_is_refused_cleanly(proxy: Proxy, slapd: Slapd, listener: str) -> None:
    """A TLS 1.0-only client gets a protocol_version alert; the proxy logs one line for
    it and goes on serving a normal TLS client on the same listener."""
    target = proxy.listeners[LISTENERS[listener]]
    log_offset = len(proxy.process.log_text())
    with RawClient(target.port) as client:
        client_port = client.sock.getsockname()[1]
        if listener == "starttls":
            client.send(starttls(1))
            frame = client.read_frame()
            assert (frame.op, m.result_code(frame.data)) == (m.EXTENDED_RESPONSE, m.SUCCESS)
        with pytest.raises(ssl.SSLError) as refused:
            client.sock = tls10_only_context(proxy.ca_file).wrap_socket(
                client.sock, server_hostname="127.0.0.1"
            )
    # The proxy's alert, not a client-side failure to offer TLS 1.0 at all.
    assert refused.value.reason == "TLSV1_ALERT_PROTOCOL_VERSION", refused.value

    # Only lines logged since this client connected: the scans before it used many
    # client ports, and one of them may have been this one.
    ours = rf"conn=\d+ 127\.0\.0\.1:{client_port} TLS handshake failed: (?P<error>.*)"
    error = proxy.process.wait_for_log(ours, since=log_offset).group("error")
    assert handshake_failure_reason(error) == "protocol_version", error

    args = ["ldapwhoami", "-x", "-H", target.url, "-D", ALICE_DN, "-w", USERS[ALICE_DN]]
    if listener == "starttls":
        args.insert(2, "-ZZ")
    result = run_ldap_tool(args, {**slapd.ldap_env(), "LDAPTLS_CACERT": str(proxy.ca_file)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"dn:{ALICE_DN}"
    assert proxy.process.process is not None
    assert proxy.process.process.poll() is None, "the proxy exited"

    new_lines = proxy.process.log_text()[log_offset:].splitlines()
    about_client = [line for line in new_lines if f" 127.0.0.1:{client_port} " in line]
    assert len(about_client) == 1, about_client
