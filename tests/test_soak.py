"""The soak, short: a minute of mixed load with reloads, a certificate rotation and
directory restarts (``tests/support/soak.py``; ``make soak`` runs it for SOAK_SECONDS,
600 by default, and prints the same report)."""

from __future__ import annotations

import os
from pathlib import Path

from support.slapd import SlapdFactory
from support.soak import soak

from ldapproxy.pki import CertificateAuthority

SECONDS = float(os.environ.get("SOAK_SECONDS", "60"))


def test_soak(ca: CertificateAuthority, fresh_slapd: SlapdFactory, tmp_path: Path) -> None:
    report = soak(ca, fresh_slapd(), tmp_path, SECONDS)
    print()
    print(report.render())
    # Never a wrong answer: identity, entries, result codes, message IDs.
    assert report.wrong == []
    # Load ran throughout, and every kind of client got work done.
    assert report.ok["churn"] >= SECONDS * 5, report.ok
    assert report.ok["steady"] >= SECONDS * 5, report.ok
    assert report.ok["write"] >= SECONDS, report.ok
    # The operator's events happened, and every SIGHUP was applied.
    assert report.events["directory restart"] >= 1
    assert report.events["certificate rotation"] >= 1
    sighups = report.events["reload"] + report.events["certificate rotation"]
    assert report.reloads_logged == sighups
    # Expected failures (unavailable, notices, lost connections: directory restarts) stay
    # a small share of the work.
    assert sum(report.expected.values()) * 10 < sum(report.ok.values()), report.render()
    # No memory growth trend after warm-up, and no descriptor leak.
    assert report.rss_growth_kib() < 8 * 1024, report.render()
    assert report.fd_leak() <= 0, report.render()
