"""End to end, ``ldapproxy run`` in front of a real slapd: the [limits] that protect the
proxy and its clients from one another (max_connections, max_pending_ops,
first_request_timeout) and from a hung directory (operation_timeout, with slapd stopped
by SIGSTOP)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.proxy import Listener, ProxyProcess, proxy_config
from support.rawldap import RawClient, whoami
from support.slapd import Slapd, SlapdFactory, all_threads_stopped

from ldapproxy import messages as m
from ldapproxy.ber import Frame
from ldapproxy.pki import CertificateAuthority


def is_notice(frame: Frame, code: int) -> bool:
    return (
        frame.message_id == 0
        and m.extended_response_name(frame.data) == m.NOTICE_OF_DISCONNECTION_OID
        and m.result_code(frame.data) == code
    )


def served(client: RawClient, message_id: int = 1) -> bool:
    """Whether a WhoAmI on ``client`` gets its answer (the connection is being served)."""
    client.send(whoami(message_id))
    frame = client.read_frame()
    return frame.message_id == message_id and m.result_code(frame.data) == m.SUCCESS


@pytest.fixture(scope="module")
def capped(
    ca: CertificateAuthority, slapd: Slapd, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ProxyProcess, Listener]]:
    """A proxy that holds at most 4 client connections."""
    config, (listener,) = proxy_config(
        tmp_path_factory.mktemp("capped"),
        ca,
        [slapd.ldaps_url],
        listeners=[Listener("none", "plain")],
        limits={"max_connections": 4},
    )
    process = ProxyProcess(config).start()
    try:
        yield process, listener
    finally:
        process.stop()


def test_connections_past_max_connections_are_closed_at_once(capped) -> None:
    process, listener = capped
    clients = [RawClient(listener.port) for _ in range(4)]
    try:
        assert all(served(client) for client in clients)
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", listener.port), timeout=5) as refused:
                # Closed before a byte was read or written: EOF, nothing sent.
                assert refused.recv(100) == b""
        # The clients that were in keep working.
        assert served(clients[0], 2)
        process.wait_for_log(
            r"connection from 127\.0\.0\.1:\d+ on listener plain refused: 4 client "
            r"connections open \(limits\.max_connections = 4\)"
        )
        # A freed slot is taken again.
        clients.pop().close()
        deadline = time.monotonic() + 5
        while True:
            replacement = RawClient(listener.port)
            try:
                if served(replacement):
                    clients.append(replacement)
                    break
            except ConnectionError:
                replacement.close()
            assert time.monotonic() < deadline, "the closed connection's slot was not freed"
            time.sleep(0.05)
    finally:
        for client in clients:
            client.close()
    # One line for the burst of three refusals (rate-limited).
    assert process.log_text().count("limits.max_connections = 4") == 1


@pytest.fixture(scope="module")
def strict(
    ca: CertificateAuthority, slapd: Slapd, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[ProxyProcess, list[Listener]]]:
    """A proxy with 10 outstanding operations per client and 1.5 s for the first request."""
    config, listeners = proxy_config(
        tmp_path_factory.mktemp("strict"),
        ca,
        [slapd.ldaps_url],
        listeners=[Listener("none", "plain"), Listener("ldaps", "ldaps")],
        limits={"max_pending_ops": 10, "first_request_timeout": 1.5},
    )
    process = ProxyProcess(config).start()
    try:
        yield process, listeners
    finally:
        process.stop()


def test_pipelined_requests_past_max_pending_ops_get_busy(strict) -> None:
    process, (plain, _) = strict
    with RawClient(plain.port) as client, RawClient(plain.port) as neighbour:
        port = client.sock.getsockname()[1]
        client.send(b"".join(whoami(n) for n in range(1, 31)))  # one segment
        answers = {}
        while len(answers) < 30:
            frame = client.read_frame()
            answers[frame.message_id] = m.result_code(frame.data)
        assert sorted(n for n, code in answers.items() if code == m.SUCCESS) == list(range(1, 11))
        assert sorted(n for n, code in answers.items() if code == m.BUSY) == list(range(11, 31))
        # The session goes on, and the other client never noticed.
        assert served(client, 31)
        assert served(neighbour)
    process.wait_for_log(
        rf"conn=\d+ 127\.0\.0\.1:{port} extended \(message ID 11\) answered busy: 10 "
        r"operations outstanding \(limits\.max_pending_ops = 10\)"
    )


def test_a_silent_connection_is_closed_after_first_request_timeout(strict) -> None:
    process, (plain, _) = strict
    with RawClient(plain.port) as silent:
        port = silent.sock.getsockname()[1]
        started = time.monotonic()
        frames = silent.read_until_closed()
        waited = time.monotonic() - started
    assert 1.0 < waited < 5, waited
    assert len(frames) == 1
    assert is_notice(frames[0], m.UNAVAILABLE)
    process.wait_for_log(
        rf"conn=\d+ 127\.0\.0\.1:{port} closing: no whole request within "
        r"limits\.first_request_timeout = 1\.5 s"
    )


def test_a_slowloris_request_is_cut_off(strict) -> None:
    """Bytes trickle in, never a whole request: closed like a silent connection."""
    _, (plain, _) = strict
    pdu = whoami(1)
    with RawClient(plain.port) as slow:
        started = time.monotonic()
        closed = False
        for byte in pdu[:-1]:
            try:
                slow.send(bytes([byte]))
            except OSError:
                closed = True
                break
            time.sleep(0.2)
        frames = slow.read_until_closed()
        assert closed or frames
        assert time.monotonic() - started < 5
    assert not any(f.message_id == 1 for f in frames)


def test_an_ldaps_connection_without_a_handshake_is_dropped(strict) -> None:
    _, (_, ldaps) = strict
    with socket.create_connection(("127.0.0.1", ldaps.port), timeout=5) as silent:
        started = time.monotonic()
        try:
            received = silent.recv(100)
        except ConnectionResetError:
            received = b""  # aborted: a reset instead of a FIN
        assert received == b"", "no TLS, so no notice: just the close"
        assert 1.0 < time.monotonic() - started < 5


def test_a_hung_directory_times_out_and_the_proxy_recovers(
    ca: CertificateAuthority, fresh_slapd: SlapdFactory, tmp_path: Path
) -> None:
    """slapd stopped with SIGSTOP: a request gets unavailable (52) with a diagnostic that
    names limits.operation_timeout, then a Notice of Disconnection, from ldapwhoami and a
    raw client alike; once slapd runs again, new clients are served."""
    directory = fresh_slapd()
    config, (listener,) = proxy_config(
        tmp_path / "proxy",
        ca,
        [directory.ldaps_url],
        listeners=[Listener("none", "plain")],
        limits={"operation_timeout": 1},
        pool={"min_idle": 2},
    )
    process = ProxyProcess(config).start()
    assert directory.pid is not None
    try:
        with RawClient(listener.port) as before:
            assert served(before)
            os.kill(directory.pid, signal.SIGSTOP)
            # Delivered asynchronously: wait until no slapd thread can still answer.
            deadline = time.monotonic() + 10
            while not all_threads_stopped(directory.pid):
                assert time.monotonic() < deadline, "slapd did not stop"
                time.sleep(0.01)
            try:
                started = time.monotonic()
                before.send(whoami(2))
                frames = before.read_until_closed()
                assert time.monotonic() - started < 5
                answer, notice = frames
                assert (answer.message_id, m.result_code(answer.data)) == (2, m.UNAVAILABLE)
                assert b"limits.operation_timeout = 1 s" in answer.data
                assert is_notice(notice, m.UNAVAILABLE)
                # A real client: ldapwhoami reports the same result code.
                tool = subprocess.run(
                    ["ldapwhoami", "-x", "-H", listener.url],
                    capture_output=True,
                    text=True,
                    timeout=20,
                    env={**os.environ, "LDAPNOINIT": "1"},
                )
                assert tool.returncode == m.UNAVAILABLE, tool
                assert "limits.operation_timeout = 1 s" in tool.stderr
            finally:
                os.kill(directory.pid, signal.SIGCONT)
        process.wait_for_log(
            r"closing: the directory did not answer extended \(message ID 2\) within "
            r"limits\.operation_timeout = 1 s"
        )
        # slapd answers again: new sessions are served (hung connections were dropped).
        deadline = time.monotonic() + 10
        while True:
            with RawClient(listener.port) as after:
                try:
                    if served(after):
                        break
                except ConnectionError:
                    pass
            assert time.monotonic() < deadline, "the proxy did not recover"
            time.sleep(0.2)
    finally:
        process.stop()
