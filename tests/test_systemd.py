"""Tests for ldapproxy.systemd: sd_notify, the watchdog and socket activation, without systemd."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from twisted.internet.protocol import ServerFactory
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher

from ldapproxy import systemd
from ldapproxy.systemd import (
    Notifier,
    adopt_listening_socket,
    clear_listen_environment,
    inherited_sockets,
    parse_systemd_endpoint,
    select_fds,
)

# ---------------------------------------------------------------------------- fixtures


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A fresh directory with a short path (AF_UNIX paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="sd-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def receiver(short_dir: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound AF_UNIX datagram socket standing in for systemd, and its NOTIFY_SOCKET value."""
    path = short_dir / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5)
    try:
        yield sock, str(path)
    finally:
        sock.close()


@pytest.fixture
def notifiers() -> Iterator[Callable[..., Notifier]]:
    """Build notifiers with Notifier.from_environment and close them all at teardown."""
    made: list[Notifier] = []

    def make(env: dict[str, str], clock: Clock | None = None) -> Notifier:
        notifier = Notifier.from_environment(env, clock or Clock())
        made.append(notifier)
        return notifier

    yield make
    for notifier in made:
        notifier.close()


@pytest.fixture
def log_events() -> Iterator[list[dict[str, Any]]]:
    """Events logged in the ldapproxy.systemd namespace while the test runs."""
    events: list[dict[str, Any]] = []

    def observer(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "ldapproxy.systemd":
            events.append(event)

    globalLogPublisher.addObserver(cast(ILogObserver, observer))
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(cast(ILogObserver, observer))


def drain(sock: socket.socket) -> list[bytes]:
    """Every datagram already queued on ``sock``, without waiting for more."""
    datagrams = []
    sock.setblocking(False)
    try:
        while True:
            datagrams.append(sock.recv(4096))
    except BlockingIOError:
        return datagrams
    finally:
        sock.settimeout(5)


# ---------------------------------------------------------------------------- Notifier


def test_notifier_sends_exact_datagrams(
    receiver: tuple[socket.socket, str], notifiers: Callable[..., Notifier]
) -> None:
    """Each method sends exactly the sd_notify datagram systemd expects to a path socket."""
    sock, path = receiver
    notifier = notifiers({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready("serving 2 listeners")
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving 2 listeners"
    assert notifier.status("reconnecting upstream")
    assert sock.recv(4096) == b"STATUS=reconnecting upstream"
    assert notifier.stopping("shutting down")
    assert sock.recv(4096) == b"STOPPING=1\nSTATUS=shutting down"
    assert notifier.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"


def test_notifier_reloading_carries_monotonic_usec(
    receiver: tuple[socket.socket, str], notifiers: Callable[..., Notifier]
) -> None:
    """reloading() sends RELOADING=1 and MONOTONIC_USEC read from CLOCK_MONOTONIC."""
    sock, path = receiver
    notifier = notifiers({"NOTIFY_SOCKET": path})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = sock.recv(4096).decode().split("\n")
    assert first == "RELOADING=1"
    key, _, value = second.partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after
    notifier.reloading("reloading configuration")
    assert sock.recv(4096).decode().split("\n")[2] == "STATUS=reloading configuration"


def test_notifier_abstract_socket(notifiers: Callable[..., Notifier]) -> None:
    """An '@name' NOTIFY_SOCKET reaches the abstract socket named with a leading NUL."""
    name = f"ldapproxy-test-{os.getpid()}-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        notifier = notifiers({"NOTIFY_SOCKET": "@" + name})
        assert notifier.ready("up")
        assert sock.recv(4096) == b"READY=1\nSTATUS=up"


@pytest.mark.parametrize(
    ("status", "sent"),
    [
        ("two\nlines", b"STATUS=two lines"),
        ("crlf\r\nWATCHDOG=1", b"STATUS=crlf  WATCHDOG=1"),
        ("nul\0byte", b"STATUS=nul byte"),
        ("caf\u00e9", "STATUS=caf\u00e9".encode()),
    ],
)
def test_notifier_sanitises_values(
    receiver: tuple[socket.socket, str],
    notifiers: Callable[..., Notifier],
    status: str,
    sent: bytes,
) -> None:
    """Newlines (and CR/NUL) in a status become spaces, so no field can be injected."""
    sock, path = receiver
    notifiers({"NOTIFY_SOCKET": path}).status(status)
    assert sock.recv(4096) == sent


def test_notifier_without_notify_socket_is_a_noop(
    notifiers: Callable[..., Notifier], log_events: list[dict[str, Any]]
) -> None:
    """Without NOTIFY_SOCKET every method quietly does nothing."""
    notifier = notifiers({"WATCHDOG_USEC": "2000000"})
    assert not notifier.enabled
    assert not notifier.ready("x")
    assert not notifier.status("x")
    assert not notifier.reloading()
    assert not notifier.stopping("x")
    assert not notifier.watchdog()
    assert not notifier.start_watchdog()
    assert log_events == []


def test_notifier_rejects_unusable_address(
    notifiers: Callable[..., Notifier], log_events: list[dict[str, Any]]
) -> None:
    """A NOTIFY_SOCKET that is neither a path nor '@name' is logged and disables sending."""
    notifier = notifiers({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.enabled
    assert not notifier.ready("x")
    assert len(log_events) == 1
    assert "vsock:2:1234" in formatEvent(log_events[0])


def test_notifier_socket_gone_logs_once(
    receiver: tuple[socket.socket, str],
    notifiers: Callable[..., Notifier],
    log_events: list[dict[str, Any]],
) -> None:
    """Sending to a removed socket does not raise, and the failure is logged only once."""
    sock, path = receiver
    notifier = notifiers({"NOTIFY_SOCKET": path})
    sock.close()
    os.unlink(path)
    assert not notifier.ready("up")
    assert not notifier.status("still up")
    assert not notifier.watchdog()
    assert len(log_events) == 1
    text = formatEvent(log_events[0])
    assert path in text
    assert "not logged" in text


def test_notifier_full_queue_drops_without_blocking(
    receiver: tuple[socket.socket, str],
    notifiers: Callable[..., Notifier],
    log_events: list[dict[str, Any]],
) -> None:
    """When systemd's queue is full a message is dropped (logged once), and sending resumes."""
    sock, path = receiver
    # Should the notifier's socket be blocking, a send times out instead of hanging the test.
    default_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(2)
    try:
        notifier = notifiers({"NOTIFY_SOCKET": path})
    finally:
        socket.setdefaulttimeout(default_timeout)
    for count in range(100_000):
        if not notifier.status(f"message {count}"):
            break
    else:
        pytest.fail("the receiver queue never filled up")
    assert not notifier.status("dropped too")
    assert len(log_events) == 1
    assert "full" in formatEvent(log_events[0])
    assert len(drain(sock)) == count
    assert notifier.status("after draining")
    assert sock.recv(4096) == b"STATUS=after draining"
    assert len(log_events) == 1


def test_notifier_close_stops_sending(
    receiver: tuple[socket.socket, str],
    notifiers: Callable[..., Notifier],
    log_events: list[dict[str, Any]],
) -> None:
    """After close() sends are silent no-ops and close() may be called again."""
    sock, path = receiver
    notifier = notifiers({"NOTIFY_SOCKET": path})
    notifier.close()
    assert not notifier.enabled
    assert not notifier.ready("x")
    notifier.close()
    assert drain(sock) == []
    assert log_events == []


# ---------------------------------------------------------------------------- watchdog


def test_watchdog_pings_every_half_interval(
    receiver: tuple[socket.socket, str], notifiers: Callable[..., Notifier]
) -> None:
    """With WATCHDOG_USEC=2s the watchdog pings at once and then once per clock second."""
    sock, path = receiver
    clock = Clock()
    notifier = notifiers({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"}, clock)
    assert notifier.watchdog_interval() == 1.0
    assert notifier.start_watchdog()
    assert drain(sock) == [b"WATCHDOG=1"]
    clock.advance(0.5)
    assert drain(sock) == []
    for _ in range(3):
        clock.advance(0.5)
        assert drain(sock) == [b"WATCHDOG=1"]
        clock.advance(0.5)
        assert drain(sock) == []
    assert notifier.start_watchdog()  # already running: no second loop
    clock.advance(1)
    assert drain(sock) == [b"WATCHDOG=1"]


def test_watchdog_stop(
    receiver: tuple[socket.socket, str], notifiers: Callable[..., Notifier]
) -> None:
    """stop_watchdog() stops the pings and leaves no delayed call on the clock."""
    sock, path = receiver
    clock = Clock()
    notifier = notifiers({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"}, clock)
    assert notifier.start_watchdog()
    clock.advance(1)
    assert len(drain(sock)) == 2
    notifier.stop_watchdog()
    assert clock.getDelayedCalls() == []
    clock.advance(10)
    assert drain(sock) == []
    notifier.stop_watchdog()


def test_watchdog_stopped_by_close(
    receiver: tuple[socket.socket, str], notifiers: Callable[..., Notifier]
) -> None:
    """close() also stops the watchdog."""
    sock, path = receiver
    clock = Clock()
    notifier = notifiers({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000"}, clock)
    notifier.start_watchdog()
    assert drain(sock) == [b"WATCHDOG=1"]
    notifier.close()
    assert clock.getDelayedCalls() == []
    clock.advance(10)
    assert drain(sock) == []


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "2000000"}, 1.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
    ],
)
def test_watchdog_interval_table(extra: dict[str, str], expected: float | None) -> None:
    """watchdog_interval is half WATCHDOG_USEC, or None when absent or for another pid."""
    assert systemd.watchdog_interval(extra, os.getpid()) == expected


def test_watchdog_for_another_pid_does_not_ping(
    receiver: tuple[socket.socket, str], notifiers: Callable[..., Notifier]
) -> None:
    """A WATCHDOG_PID naming another process means no watchdog pings at all."""
    sock, path = receiver
    clock = Clock()
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}
    if os.getpid() == 1:
        env["WATCHDOG_PID"] = "2"
    notifier = notifiers(env, clock)
    assert not notifier.start_watchdog()
    clock.advance(5)
    assert drain(sock) == []
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize(
    "extra",
    [
        {"WATCHDOG_USEC": "0"},
        {"WATCHDOG_USEC": "-5"},
        {"WATCHDOG_USEC": "2s"},
        {"WATCHDOG_USEC": ""},
        {"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "me"},
    ],
)
def test_watchdog_malformed_values(
    receiver: tuple[socket.socket, str], notifiers: Callable[..., Notifier], extra: dict[str, str]
) -> None:
    """Malformed WATCHDOG_USEC or WATCHDOG_PID raise ValueError when the watchdog starts."""
    _, path = receiver
    notifier = notifiers({"NOTIFY_SOCKET": path, **extra})
    with pytest.raises(ValueError, match="WATCHDOG_"):
        notifier.start_watchdog()


# ---------------------------------------------------------------------------- inherited_sockets

PID = 4242


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, {}),
        ({"LISTEN_PID": "4243", "LISTEN_FDS": "1"}, {}),
        ({"LISTEN_PID": str(PID)}, {}),
        ({"LISTEN_FDS": "2"}, {}),
        ({"LISTEN_PID": str(PID), "LISTEN_FDS": "0"}, {}),
        ({"LISTEN_PID": str(PID), "LISTEN_FDS": "0", "LISTEN_FDNAMES": ""}, {}),
        ({"LISTEN_PID": str(PID), "LISTEN_FDS": "1"}, {"unknown": [3]}),
        ({"LISTEN_PID": str(PID), "LISTEN_FDS": "2"}, {"unknown": [3, 4]}),
        (
            {"LISTEN_PID": str(PID), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "ldap:ldaps"},
            {"ldap": [3], "ldaps": [4]},
        ),
        (
            {"LISTEN_PID": str(PID), "LISTEN_FDS": "3", "LISTEN_FDNAMES": "ldap:ldaps:ldap"},
            {"ldap": [3, 5], "ldaps": [4]},
        ),
        (
            {"LISTEN_PID": str(PID), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "ldap:"},
            {"ldap": [3], "unknown": [4]},
        ),
        ({"LISTEN_PID": "4243", "LISTEN_FDS": "x"}, {}),
    ],
)
def test_inherited_sockets_table(env: dict[str, str], expected: dict[str, list[int]]) -> None:
    """inherited_sockets follows sd_listen_fds_with_names for well-formed environments."""
    assert inherited_sockets(env, PID) == expected


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LISTEN_PID": "self", "LISTEN_FDS": "1"}, "LISTEN_PID='self'"),
        ({"LISTEN_PID": "", "LISTEN_FDS": "1"}, "LISTEN_PID=''"),
        ({"LISTEN_PID": str(PID), "LISTEN_FDS": "one"}, "LISTEN_FDS='one'"),
        ({"LISTEN_PID": str(PID), "LISTEN_FDS": "-1"}, "LISTEN_FDS='-1'"),
        ({"LISTEN_PID": str(PID), "LISTEN_FDS": " 1"}, "LISTEN_FDS=' 1'"),
        ({"LISTEN_PID": str(PID), "LISTEN_FDS": ""}, "LISTEN_FDS=''"),
        ({"LISTEN_PID": str(PID), "LISTEN_FDS": "99999999"}, "implausibly large"),
        (
            {"LISTEN_PID": str(PID), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "ldap"},
            "names 1 socket.* but LISTEN_FDS=2",
        ),
        (
            {"LISTEN_PID": str(PID), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "a:b"},
            "names 2 socket.* but LISTEN_FDS=1",
        ),
        (
            {"LISTEN_PID": str(PID), "LISTEN_FDS": "2", "LISTEN_FDNAMES": ""},
            "names 1 socket.* but LISTEN_FDS=2",
        ),
    ],
)
def test_inherited_sockets_malformed(env: dict[str, str], message: str) -> None:
    """Malformed LISTEN_* values raise ValueError naming the offending variable."""
    with pytest.raises(ValueError, match=message):
        inherited_sockets(env, PID)


def test_clear_listen_environment() -> None:
    """clear_listen_environment removes the three LISTEN_* variables and nothing else."""
    environ = {
        "LISTEN_PID": "1",
        "LISTEN_FDS": "1",
        "LISTEN_FDNAMES": "ldap",
        "NOTIFY_SOCKET": "/run/systemd/notify",
        "PATH": "/bin",
    }
    clear_listen_environment(environ)
    assert environ == {"NOTIFY_SOCKET": "/run/systemd/notify", "PATH": "/bin"}
    clear_listen_environment(environ)  # absent keys are fine
    assert environ == {"NOTIFY_SOCKET": "/run/systemd/notify", "PATH": "/bin"}


# ---------------------------------------------------------------------------- endpoints


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("systemd:name=ldap", ("name", "ldap")),
        ("systemd:index=0", ("index", "0")),
        ("systemd:index=12", ("index", "12")),
        ("systemd:index=007", ("index", "7")),
        ("systemd:domain=INET:index=0", ("index", "0")),
        ("systemd:domain=INET6:name=ldaps", ("name", "ldaps")),
        ("systemd:name=ldap:domain=INET", ("name", "ldap")),
    ],
)
def test_parse_systemd_endpoint(text: str, expected: tuple[str, str]) -> None:
    """Valid systemd endpoint strings give the selector kind and value."""
    assert parse_systemd_endpoint(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("systemd:", "names no socket"),
        ("systemd", "not a systemd endpoint"),
        ("tcp:389", "not a systemd endpoint"),
        ("Systemd:name=ldap", "not a systemd endpoint"),
        ("systemd:domain=INET", "names no socket"),
        ("systemd:name=ldap:index=0", "both name and index"),
        ("systemd:port=389", "unknown key 'port'"),
        ("systemd:INET:index=0", "'INET' is not key=value"),
        ("systemd:name=", "empty name"),
        ("systemd:index=", "non-negative integer"),
        ("systemd:index=-1", "non-negative integer"),
        ("systemd:index=one", "non-negative integer"),
        ("systemd:name=a:name=b", "'name' is given twice"),
        ("systemd:name=ldap:", "'' is not key=value"),
    ],
)
def test_parse_systemd_endpoint_rejects(text: str, message: str) -> None:
    """Malformed systemd endpoint strings raise ValueError with a specific message."""
    with pytest.raises(ValueError, match=message):
        parse_systemd_endpoint(text)


def test_is_systemd_endpoint() -> None:
    """is_systemd_endpoint tells systemd endpoints from ordinary Twisted ones."""
    assert systemd.is_systemd_endpoint("systemd:name=ldap")
    assert not systemd.is_systemd_endpoint("tcp:389")


SOCKETS = {"ldap": [3], "ldaps": [4], "unknown": [5, 6]}


@pytest.mark.parametrize(
    ("sockets", "kind", "value", "expected"),
    [
        (SOCKETS, "name", "ldap", 3),
        (SOCKETS, "name", "ldaps", 4),
        (SOCKETS, "index", "0", 3),
        (SOCKETS, "index", "3", 6),
        ({"b": [4], "a": [3]}, "index", "0", 3),
        ({"x": [3, 5], "y": [4]}, "index", "1", 4),
        ({"unknown": [3]}, "name", "unknown", 3),
    ],
)
def test_select_fds(sockets: dict[str, list[int]], kind: str, value: str, expected: int) -> None:
    """select_fds picks one fd by unique name, or the n-th fd in fd order."""
    assert select_fds(sockets, kind, value) == expected


@pytest.mark.parametrize(
    ("sockets", "kind", "value", "message"),
    [
        (SOCKETS, "name", "http", r"no socket named 'http'.*'ldap' \(fd 3\)"),
        (SOCKETS, "name", "unknown", r"2 sockets are named 'unknown' \(fds 5, 6\)"),
        (SOCKETS, "index", "4", r"no socket with index 4.*'unknown' \(fds 5, 6\)"),
        ({}, "name", "ldap", "systemd passed no sockets"),
        ({}, "index", "0", "systemd passed no sockets"),
        (SOCKETS, "index", "x", "not a non-negative integer"),
        (SOCKETS, "port", "389", "unknown socket selector 'port'"),
    ],
)
def test_select_fds_errors(
    sockets: dict[str, list[int]], kind: str, value: str, message: str
) -> None:
    """select_fds raises ValueError describing what systemd did pass."""
    with pytest.raises(ValueError, match=message):
        select_fds(sockets, kind, value)


# ---------------------------------------------------------------------------- adoption


class FakeReactor:
    """Records adoptStreamPort calls instead of listening."""

    def __init__(self) -> None:
        self.adopted: list[tuple[int, int, object, bool]] = []

    def adoptStreamPort(self, fd: int, family: int, factory: object) -> str:
        """Record the call, and whether the fd was non-blocking at that moment."""
        self.adopted.append((fd, family, factory, not os.get_blocking(fd)))
        return "port"


def fd_is_open(fd: int) -> bool:
    """Whether ``fd`` is an open file descriptor in this process."""
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.mark.parametrize(
    ("family", "host"), [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")]
)
def test_adopt_listening_socket(family: socket.AddressFamily, host: str) -> None:
    """A listening TCP socket is adopted with its detected family; our fd copy is closed."""
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError:
        pytest.skip(f"{family.name} is not available here")
    with sock:
        try:
            sock.bind((host, 0))
        except OSError:
            pytest.skip(f"cannot bind {host}")
        sock.listen()
        fd = os.dup(sock.fileno())
        reactor = FakeReactor()
        factory = ServerFactory()
        port: object = adopt_listening_socket(reactor, fd, factory)  # type: ignore[arg-type]
        assert port == "port"
        assert reactor.adopted == [(fd, family, factory, True)]
        assert not fd_is_open(fd)  # the adopter closed the fd it was given
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)  # original intact


def make_tcp_unlistened() -> socket.socket:
    """A bound TCP socket that is not listening."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


def make_udp() -> socket.socket:
    """A bound UDP socket."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def make_unix_listening() -> socket.socket:
    """A listening AF_UNIX stream socket in the abstract namespace."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(b"\0ldapproxy-test-" + uuid.uuid4().hex.encode())
    sock.listen()
    return sock


def make_tcp_connected() -> socket.socket:
    """One end of a connected TCP pair (as Accept=yes would pass)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    client.close()
    return server


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (make_tcp_unlistened, r"AF_INET stream socket that is not listening"),
        (make_tcp_connected, r"not listening .*Accept=yes"),
        (make_udp, r"AF_INET SOCK_DGRAM socket, not SOCK_STREAM"),
        (make_unix_listening, r"is an AF_UNIX socket"),
    ],
)
def test_adopt_refuses_other_sockets(make: Callable[[], socket.socket], message: str) -> None:
    """Non-listening, datagram and UNIX sockets are refused, and the fd is left open."""
    with make() as sock:
        reactor = FakeReactor()
        fd = sock.fileno()
        blocking = os.get_blocking(fd)
        with pytest.raises(ValueError, match=rf"^fd {fd} .*{message}"):
            adopt_listening_socket(reactor, fd, ServerFactory())  # type: ignore[arg-type]
        assert reactor.adopted == []
        assert fd_is_open(fd)
        assert sock.fileno() == fd
        assert os.get_blocking(fd) == blocking  # untouched when refused
        sock.getsockname()  # still a working socket


def test_adopt_refuses_non_sockets(tmp_path: Path) -> None:
    """A regular file and a closed fd are refused with a clear message."""
    reactor = FakeReactor()
    with (tmp_path / "file").open("w") as handle:
        with pytest.raises(ValueError, match=rf"fd {handle.fileno()} is not a socket"):
            adopt_listening_socket(reactor, handle.fileno(), ServerFactory())  # type: ignore[arg-type]
        assert fd_is_open(handle.fileno())
    read_end, write_end = os.pipe()
    os.close(read_end)
    os.close(write_end)
    with pytest.raises(ValueError, match=rf"fd {read_end} is not an open file descriptor"):
        adopt_listening_socket(reactor, read_end, ServerFactory())  # type: ignore[arg-type]
    assert reactor.adopted == []


CHILD = textwrap.dedent(
    """
    import os, socket, sys

    from twisted.internet import protocol, reactor

    from ldapproxy import systemd

    sockets = systemd.inherited_sockets(os.environ, os.getpid())
    systemd.clear_listen_environment(os.environ)
    fd = systemd.select_fds(sockets, *systemd.parse_systemd_endpoint(sys.argv[1]))


    class Hello(protocol.Protocol):
        def connectionMade(self):
            self.transport.write(b"hello")
            self.transport.loseConnection()

        def connectionLost(self, reason):
            reactor.stop()


    port = systemd.adopt_listening_socket(reactor, fd, protocol.ServerFactory.forProtocol(Hello))
    try:
        os.fstat(fd)
        closed = False
    except OSError:
        closed = True
    print(
        sockets,
        fd,
        "closed" if closed else "open",
        sorted(k for k in os.environ if k.startswith("LISTEN_")),
        port.getHost().port,
        flush=True,
    )
    reactor.run()
    print("done", flush=True)
    """
)


@pytest.mark.parametrize("endpoint", ["systemd:name=ldap", "systemd:domain=INET:index=0"])
def test_socket_activation_end_to_end(tmp_path: Path, endpoint: str) -> None:
    """A child process with the real reactor adopts fd 3 from LISTEN_FDS and serves on it."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
    env.update(LISTEN_FDS="1", LISTEN_FDNAMES="ldap")
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        # stdin carries the socket; the shell moves it to fd 3 and LISTEN_PID is its own
        # pid, which exec hands on to Python.
        command = 'export LISTEN_PID=$$; exec "$0" "$1" "$2" 3<&0 0</dev/null'
        child = subprocess.Popen(
            ["sh", "-c", command, sys.executable, str(script), endpoint],
            stdin=listener.fileno(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=30) as client:
                received = b""
                while chunk := client.recv(1024):
                    received += chunk
            out, err = child.communicate(timeout=30)
        finally:
            if child.poll() is None:
                os.kill(child.pid, signal.SIGKILL)
                child.wait()
    assert received == b"hello", err.decode()
    assert child.returncode == 0, err.decode()
    assert out.decode().splitlines() == [f"{{'ldap': [3]}} 3 closed [] {port}", "done"]


def test_importing_module_keeps_listen_environment() -> None:
    """Importing ldapproxy.systemd leaves out twisted.internet.endpoints, which eats LISTEN_*."""
    code = "import sys, ldapproxy.systemd; print('twisted.internet.endpoints' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "False"
