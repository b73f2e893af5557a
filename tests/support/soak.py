"""A soak run: mixed client load through ``ldapproxy run`` for a while, with the events an
operator's week brings (SIGHUP reloads, a rotated server certificate, directory restarts)
and clients coming and going, while the proxy's RSS and open file descriptors are sampled.

:func:`soak` runs it and returns a :class:`Report`; ``tests/test_soak.py`` runs it for
60 s in ``make test`` and ``make soak`` for ``SOAK_SECONDS`` (600 by default).

Clients (threads, raw LDAP over loopback):

* ``churn``: connect (half of them with StartTLS), bind as a bulk user, WhoAmI (must be
  that user), search for that user's own entry (must come back), unbind, disconnect;
* ``steady``: one connection that binds once and then searches and checks WhoAmI in a
  loop, reconnecting when the connection is lost (a directory restart ends it);
* ``writer``: modifies its entry's description with a counter, and reads it back.

Every outcome is counted by kind.  *Expected* failures are those a directory restart
causes (a Notice of Disconnection with ``unavailable``, a lost connection, ``unavailable``
or ``busy`` while no upstream is up); *wrong* answers (another identity, a missing entry,
an unexpected result code, a response to a message ID not asked) are counted separately
and must never happen.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import signal
import statistics
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ldapproxy import messages as m
from ldapproxy.ber import OCTET_STRING, Frame, encode_integer, encode_message, tlv
from ldapproxy.pki import CertificateAuthority

from .proxy import Listener, ProxyProcess, proxy_config
from .rawldap import RawClient, extended_value, simple_bind, starttls, whoami
from .slapd import (
    ADMIN_DN,
    ADMIN_PASSWORD,
    PEOPLE_DN,
    Slapd,
    bulk_user_dn,
    bulk_user_password,
    bulk_user_uid,
)


class Wrong(Exception):
    """An answer that must never happen (another identity, a missing entry...)."""


class Lost(Exception):
    """An expected failure while the directory restarts: the connection ended, or the
    proxy answered unavailable/busy."""


@dataclass
class Report:
    """What a soak run saw."""

    seconds: float
    ok: Counter[str] = field(default_factory=Counter)
    expected: Counter[str] = field(default_factory=Counter)
    wrong: list[str] = field(default_factory=list)
    events: Counter[str] = field(default_factory=Counter)
    #: (seconds since start, RSS KiB, open fds) of the proxy, once a second.
    samples: list[tuple[float, int, int]] = field(default_factory=list)
    #: The proxy's open fds before the load and after every client left, and its pool's
    #: upstream connections (each holds one fd) at the same moments.
    fds_idle_before: int = 0
    fds_idle_after: int = 0
    pool_before: int = 0
    pool_after: int = 0
    reloads_logged: int = 0

    def fd_leak(self) -> int:
        """Descriptors held after the load beyond the baseline and the pool's change."""
        return self.fds_idle_after - self.fds_idle_before - (self.pool_after - self.pool_before)

    def rss_growth_kib(self) -> int:
        """Median RSS of the last fifth minus that of the second fifth (after warm-up)."""
        rss = [s[1] for s in self.samples]
        fifth = max(1, len(rss) // 5)
        return int(statistics.median(rss[-fifth:]) - statistics.median(rss[fifth : 2 * fifth]))

    def render(self) -> str:
        rss = [s[1] for s in self.samples]
        fds = [s[2] for s in self.samples]
        lines = [
            f"soak: {self.seconds:.0f} s, {sum(self.ok.values())} operations ok "
            f"({', '.join(f'{k} {v}' for k, v in sorted(self.ok.items()))})",
            f"  expected failures (directory restarts): "
            f"{dict(sorted(self.expected.items())) or 'none'}",
            f"  wrong answers: {len(self.wrong)} {self.wrong[:5]}",
            f"  events: {dict(sorted(self.events.items()))}, reloads logged {self.reloads_logged}",
            f"  RSS KiB: first {rss[0] if rss else 0}, min {min(rss, default=0)}, max "
            f"{max(rss, default=0)}, last {rss[-1] if rss else 0}; growth after warm-up "
            f"{self.rss_growth_kib() if rss else 0}",
            f"  fds: idle before {self.fds_idle_before} (pool {self.pool_before}), max under "
            f"load {max(fds, default=0)}, idle after {self.fds_idle_after} (pool "
            f"{self.pool_after})",
        ]
        return "\n".join(lines)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def pool_connections(proxy: ProxyProcess) -> int:
    """The upstream connections the proxy's pool holds, from its /metrics page."""
    endpoint = proxy.settings["metrics"]["endpoint"]
    port = int(endpoint.split(":")[1])
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
        text = page.read().decode()
    return round(
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("ldapproxy_upstream_connections{")
        )
    )


def _search_uid(message_id: int, uid: str) -> bytes:
    """A subtree search under ou=people for (uid=UID), attribute uid."""
    body = (
        tlv(OCTET_STRING, PEOPLE_DN.encode())
        + encode_integer(2, 0x0A)
        + encode_integer(0, 0x0A)
        + encode_integer(0)
        + encode_integer(10)
        + tlv(0x01, b"\x00")
        + tlv(0xA3, tlv(OCTET_STRING, b"uid") + tlv(OCTET_STRING, uid.encode()))
        + tlv(0x30, tlv(OCTET_STRING, b"description"))
    )
    return encode_message(message_id, tlv(m.SEARCH_REQUEST, body))


def _modify_description(message_id: int, *, dn: str, value: str) -> bytes:
    change = tlv(
        0x30,
        encode_integer(2, 0x0A)  # replace
        + tlv(
            0x30, tlv(OCTET_STRING, b"description") + tlv(0x31, tlv(OCTET_STRING, value.encode()))
        ),
    )
    body = tlv(OCTET_STRING, dn.encode()) + tlv(0x30, change)
    return encode_message(message_id, tlv(m.MODIFY_REQUEST, body))


class _Client:
    """One raw LDAP connection with checked request/response exchanges."""

    def __init__(self, port: int, ca_path: Path | None) -> None:
        try:
            self.raw = RawClient(port, timeout=15)
        except OSError as error:
            raise Lost(f"connect: {error}") from None
        self.next_id = 1
        if ca_path is not None:
            self.exchange(starttls, m.EXTENDED_RESPONSE)
            try:
                self.raw.start_tls(ca_path)
            except OSError as error:
                raise Lost(f"tls: {error}") from None

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def exchange(self, pdu_for: Callable[[int], bytes], final: int) -> list[Frame]:
        """Send the request ``pdu_for(message_id)``; its responses up to ``final``."""
        message_id = self._id()
        pdu = pdu_for(message_id)
        try:
            self.raw.send(pdu)
            frames = []
            while True:
                frame = self.raw.read_frame()
                if frame.message_id == 0:
                    raise Lost(f"notice {m.result_code(frame.data)}")
                if frame.message_id != message_id:
                    raise Wrong(f"response for message ID {frame.message_id}, asked {message_id}")
                frames.append(frame)
                if frame.op == final:
                    code = m.result_code(frame.data)
                    if code in (m.UNAVAILABLE, m.BUSY):
                        raise Lost(f"result {m.result_name(code)}")
                    if code != m.SUCCESS:
                        raise Wrong(f"result {m.result_name(code)} for op 0x{frame.op:02x}")
                    return frames
                if frame.op not in (m.SEARCH_RESULT_ENTRY, m.SEARCH_RESULT_REFERENCE):
                    raise Wrong(f"unexpected op 0x{frame.op:02x}")
        except (ConnectionError, OSError) as error:
            raise Lost(f"connection: {type(error).__name__}") from None

    def bind(self, dn: str, password: str) -> None:
        self.exchange(lambda i: simple_bind(i, dn, password), m.BIND_RESPONSE)

    def who(self) -> bytes:
        (frame,) = self.exchange(whoami, m.EXTENDED_RESPONSE)
        return extended_value(frame.data) or b""

    def search(self, uid: str) -> list[Frame]:
        return self.exchange(lambda i: _search_uid(i, uid), m.SEARCH_RESULT_DONE)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.raw.send(m.unbind_request(self._id()))
        self.raw.close()


def soak(
    ca: CertificateAuthority,
    directory: Slapd,
    workdir: Path,
    seconds: float,
    churn_clients: int = 6,
) -> Report:
    """Run the soak against ``directory`` (restarted during the run) for ``seconds``."""
    report = Report(seconds)
    lock = threading.Lock()
    stop = threading.Event()
    config, (plain, ldap) = proxy_config(
        workdir,
        ca,
        [directory.ldaps_url],
        listeners=[Listener("none", "plain"), Listener("starttls-optional", "ldap")],
        pool={"min_idle": 2, "max_size": 8, "health_check_interval": 2},
        upstream={"connect_timeout": 2},
        plugins=[{"use": "audit", "path": str(workdir / "audit.jsonl")}],
        metrics=True,
    )
    ca_path = workdir / "ca.pem"
    proxy = ProxyProcess(config).start()

    def record(kind: str, action: Callable[[], None]) -> None:
        try:
            action()
        except Lost as error:
            with lock:
                report.expected[f"{kind}: {error}"] += 1
            time.sleep(0.05)
        except Wrong as error:
            with lock:
                report.wrong.append(f"{kind}: {error}")
        else:
            with lock:
                report.ok[kind] += 1

    def session(user: int, tls: Path | None) -> None:
        dn, uid = bulk_user_dn(user), bulk_user_uid(user)
        client = _Client((ldap if tls else plain).port, tls)
        try:
            client.bind(dn, bulk_user_password(user))
            if client.who() != f"dn:{dn}".encode():
                raise Wrong(f"WhoAmI is not {dn}")
            if len(client.search(uid)) != 2:
                raise Wrong(f"{uid}'s entry missing")
        finally:
            client.close()

    def churn(index: int) -> None:
        rng = random.Random(index)
        while not stop.is_set():
            user = rng.randint(1, 120)
            record("churn", functools.partial(session, user, ca_path if index % 2 else None))

    def connected(user: int) -> None:
        dn, uid = bulk_user_dn(user), bulk_user_uid(user)
        client = _Client(plain.port, None)
        try:
            client.bind(dn, bulk_user_password(user))
            while not stop.is_set():
                if client.who() != f"dn:{dn}".encode():
                    raise Wrong(f"WhoAmI is not {dn}")
                if len(client.search(uid)) != 2:
                    raise Wrong(f"{uid}'s entry missing")
                with lock:
                    report.ok["steady"] += 1
        finally:
            client.close()

    def steady(index: int) -> None:
        while not stop.is_set():
            record("steady-connection", functools.partial(connected, 100 + index))

    written = [0]

    def write() -> None:
        dn, uid = bulk_user_dn(120), bulk_user_uid(120)
        client = _Client(plain.port, None)
        try:
            client.bind(ADMIN_DN, ADMIN_PASSWORD)
            while not stop.is_set():
                written[0] += 1
                value = f"soak {written[0]}"
                client.exchange(
                    functools.partial(_modify_description, dn=dn, value=value), m.MODIFY_RESPONSE
                )
                entry = client.search(uid)[0]
                if value.encode() not in entry.data:
                    raise Wrong(f"{value!r} not read back")
                with lock:
                    report.ok["write"] += 1
        finally:
            client.close()

    def writer() -> None:
        while not stop.is_set():
            record("writer-connection", write)

    def sample(started: float) -> None:
        while not stop.wait(1.0):
            try:
                point = (time.monotonic() - started, rss_kib(proxy.pid), fd_count(proxy.pid))
            except OSError:
                return
            with lock:
                report.samples.append(point)

    def rotate_certificate(serial: int) -> None:
        issued = ca.issue(f"proxy-{serial}", dns_names=["localhost"], ip_addresses=["127.0.0.1"])
        cert, key = issued.write(workdir / f"rotated-{serial}", "proxy")
        text = config.read_text()
        start = text.index("certificate = ")
        end = text.index("\n", text.index("private_key = "))
        text = text[:start] + f'certificate = "{cert}"\nprivate_key = "{key}"' + text[end:]
        config.write_text(text)
        os.kill(proxy.pid, signal.SIGHUP)

    try:
        time.sleep(0.5)
        report.fds_idle_before = fd_count(proxy.pid)
        report.pool_before = pool_connections(proxy)
        started = time.monotonic()
        threads = [threading.Thread(target=sample, args=(started,), daemon=True)]
        threads += [
            threading.Thread(target=churn, args=(i,), daemon=True) for i in range(churn_clients)
        ]
        threads += [threading.Thread(target=steady, args=(i,), daemon=True) for i in range(2)]
        threads.append(threading.Thread(target=writer, daemon=True))
        for thread in threads:
            thread.start()
        # The operator's events, spread over the run: a reload every ~10 s, a certificate
        # rotation every ~20 s, a directory restart every ~25 s.
        step, serial = 0, 0
        while time.monotonic() - started < seconds:
            time.sleep(min(5.0, max(0.0, seconds - (time.monotonic() - started))))
            step += 1
            if time.monotonic() - started >= seconds - 2:
                break
            if step % 5 == 0:
                directory.restart()
                report.events["directory restart"] += 1
            elif step % 4 == 0:
                serial += 1
                rotate_certificate(serial)
                report.events["certificate rotation"] += 1
            elif step % 2 == 0:
                os.kill(proxy.pid, signal.SIGHUP)
                report.events["reload"] += 1
        stop.set()
        for thread in threads:
            thread.join(30)
        # Every client left: the proxy's descriptors go back to where they were, give or
        # take the pool's upstream connections (it may hold more idle ones than before).
        deadline = time.monotonic() + 10
        while True:
            report.pool_after = pool_connections(proxy)
            report.fds_idle_after = fd_count(proxy.pid)
            if report.fd_leak() <= 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        report.reloads_logged = proxy.log_text().count("reload: configuration applied")
        report.seconds = time.monotonic() - started
    finally:
        stop.set()
        proxy.stop()
    return report
