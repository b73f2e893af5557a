"""``ldapproxy check --connect``: connect to every upstream URL and report what was found."""

from __future__ import annotations

from collections.abc import Generator
from typing import IO, Any

from twisted.internet import defer

from ldapproxy.config import Config
from ldapproxy.tls import PeerCertificate
from ldapproxy.upstream import UpstreamDialer, UpstreamError


@defer.inlineCallbacks
def check_upstreams(
    config: Config, dialer: UpstreamDialer, out: IO[str]
) -> Generator[defer.Deferred[Any], Any, bool]:
    """Connect to each upstream URL over the production TLS path; print one report per URL.

    Returns whether every URL was reachable with a verified certificate.
    """
    all_good = True
    for url in config.upstream.urls:
        out.write(f"{url}\n")
        try:
            connection = yield dialer.connect_url(url)
        except UpstreamError as error:
            all_good = False
            out.write(f"  reachable: {'yes' if error.reachable else 'no'}\n")
            _certificate(error.certificate, out)
            out.write(f"  verification: FAILED: {error.reason}\n")
            continue
        out.write("  reachable: yes\n")
        out.write(f"  tls: {connection.tls_version} {connection.cipher}\n")
        _certificate(connection.peer_certificate, out)
        name = config.upstream.tls_server_name or url.host
        out.write(f"  verification: OK (chain trusted, certificate valid for {name!r})\n")
        connection.close()
    return all_good


def _certificate(cert: PeerCertificate | None, out: IO[str]) -> None:
    if cert is not None:
        out.write(f"  subject: {cert.subject}\n")
        out.write(f"  issuer: {cert.issuer}\n")
        out.write(f"  sans: {', '.join(cert.sans) or '(none)'}\n")
        out.write(f"  expires: {cert.not_after.isoformat()}\n")
