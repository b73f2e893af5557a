"""The daemon's side of systemd: sd_notify readiness/watchdog messages and socket activation.

Everything here is plain Python and Twisted; nothing links against libsystemd.  The
environment and the clock/reactor are always passed in, so tests can use a dict and
:class:`twisted.internet.task.Clock`.

Notifications (``Type=notify`` / ``Type=notify-reload``)
    :class:`Notifier` sends sd_notify datagrams to ``$NOTIFY_SOCKET`` (a filesystem path,
    or an abstract socket written with a leading ``@``).  Without ``NOTIFY_SOCKET`` it is
    a no-op.  Sending never raises into the caller: the socket is non-blocking, a full
    queue drops the message and a failure (the socket is gone) is logged once, in the
    ``ldapproxy.systemd`` namespace; later problems of the same kind are quiet.  Values
    have CR, LF and NUL replaced by spaces, so a status text cannot inject a field.
    After a reload the daemon must send ``READY=1`` again (:meth:`Notifier.ready`).

Watchdog (``WatchdogSec=``)
    :meth:`Notifier.start_watchdog` pings ``WATCHDOG=1`` every ``WATCHDOG_USEC / 2`` from
    a :class:`~twisted.internet.task.LoopingCall` on the injected clock.  The ping runs
    on the reactor thread on purpose: it proves the reactor is still turning.

Socket activation (``ListenStream=`` in a ``.socket`` unit)
    :func:`inherited_sockets` implements ``sd_listen_fds_with_names`` over a given
    environment; :func:`clear_listen_environment` removes the variables so children do
    not inherit them.  A listener's configured endpoint ``systemd:name=NAME`` (the
    socket's ``FileDescriptorName=``) or ``systemd:index=N`` is read by
    :func:`parse_systemd_endpoint` and resolved by :func:`select_fds`;
    :func:`adopt_listening_socket` hands the fd to the reactor.

    Two Twisted pitfalls this module avoids, and callers must keep in mind:

    * Twisted's own ``systemd:`` endpoint string needs ``LISTEN_FDNAMES`` set: without it
      ``systemd:domain=INET:index=0`` fails with ``IndexError``.
    * Importing :mod:`twisted.internet.endpoints` (which :mod:`ldapproxy.upstream` and
      :mod:`ldapproxy.service` do) deletes ``LISTEN_PID`` and ``LISTEN_FDS`` from
      ``os.environ`` as a side effect when ``LISTEN_PID`` is this process.  Read the
      environment with :func:`inherited_sockets` (or copy it) before that import.  This
      module does not import :mod:`twisted.internet.endpoints`.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import time
from collections.abc import Mapping, MutableMapping

from twisted.internet.interfaces import IListeningPort, IReactorSocket, IReactorTime
from twisted.internet.protocol import ServerFactory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger(namespace="ldapproxy.systemd")

#: The first file descriptor systemd passes (``SD_LISTEN_FDS_START``).
LISTEN_FDS_START = 3

#: The name sd_listen_fds_with_names gives a socket when ``LISTEN_FDNAMES`` is absent.
UNKNOWN_NAME = "unknown"

#: The variables :func:`clear_listen_environment` removes.
LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")

# A sanity bound on LISTEN_FDS, far above any real socket unit.
_MAX_LISTEN_FDS = 65536

# ASCII digits only: int() alone would also accept " 1", "+1", "1_0" and non-ASCII digits.
_DECIMAL = re.compile(r"[0-9]+")

# CR, LF and NUL would end or split a field; each becomes a space.
_UNSAFE = str.maketrans({"\n": " ", "\r": " ", "\0": " "})


def _sanitise(value: str) -> str:
    return value.translate(_UNSAFE)


class Notifier:
    """Sends sd_notify messages to systemd; a no-op when there is no ``NOTIFY_SOCKET``.

    Build one with :meth:`from_environment`.  Every sending method returns whether the
    datagram was handed to the kernel; none of them raises.
    """

    def __init__(
        self,
        clock: IReactorTime,
        address: bytes | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """Send to ``address`` (an AF_UNIX address; ``None`` for a no-op notifier).

        ``env`` supplies ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` for :meth:`start_watchdog`.
        """
        self._clock = clock
        self._address = address
        env = env or {}
        self._env = {key: env[key] for key in ("WATCHDOG_USEC", "WATCHDOG_PID") if key in env}
        self._socket: socket.socket | None = None
        self._watchdog: LoopingCall | None = None
        self._failure_logged = False
        self._full_logged = False
        if address is not None:
            try:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            except OSError as error:
                log.warn(
                    "cannot create a socket for systemd notifications: {error}",
                    error=error.strerror or error,
                )
                self._address = None
            else:
                sock.setblocking(False)
                self._socket = sock

    @classmethod
    def from_environment(cls, env: Mapping[str, str], clock: IReactorTime) -> Notifier:
        """A notifier for ``env["NOTIFY_SOCKET"]``; a no-op one if that is unset or empty.

        An address that is neither an absolute path nor ``@abstract`` (systemd's newer
        ``vsock:`` form, say) is logged and also gives a no-op notifier.
        """
        text = env.get("NOTIFY_SOCKET", "")
        address: bytes | None = None
        if text.startswith("@") and len(text) > 1:
            address = b"\0" + text[1:].encode("utf-8", "surrogateescape")
        elif text.startswith("/"):
            address = os.fsencode(text)
        elif text:
            log.warn(
                "NOTIFY_SOCKET={address!r} is not a path or an @abstract socket;"
                " systemd notifications are disabled",
                address=text,
            )
        return cls(clock, address, env)

    @property
    def enabled(self) -> bool:
        """Whether messages are actually sent (``NOTIFY_SOCKET`` was usable, not closed)."""
        return self._socket is not None

    def ready(self, status: str) -> bool:
        """Tell systemd that start-up (or a reload) is complete: ``READY=1`` and a status."""
        return self._send(f"READY=1\nSTATUS={_sanitise(status)}")

    def status(self, text: str) -> bool:
        """Set the one-line status ``systemctl status`` shows."""
        return self._send(f"STATUS={_sanitise(text)}")

    def reloading(self, status: str | None = None) -> bool:
        """Announce a reload: ``RELOADING=1`` with ``MONOTONIC_USEC`` (for notify-reload).

        systemd 253+ (``Type=notify-reload``) needs ``MONOTONIC_USEC``, the current
        ``CLOCK_MONOTONIC`` in microseconds; older systemd and ``Type=notify`` ignore it.
        Send :meth:`ready` when the reload is done.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        message = f"RELOADING=1\nMONOTONIC_USEC={usec}"
        if status is not None:
            message += f"\nSTATUS={_sanitise(status)}"
        return self._send(message)

    def stopping(self, status: str) -> bool:
        """Tell systemd that shutdown has begun: ``STOPPING=1`` and a status."""
        return self._send(f"STOPPING=1\nSTATUS={_sanitise(status)}")

    def watchdog(self) -> bool:
        """Send one watchdog keep-alive ping, ``WATCHDOG=1``."""
        return self._send("WATCHDOG=1")

    def watchdog_interval(self) -> float | None:
        """Seconds between pings (half of ``WATCHDOG_USEC``), or None if no watchdog applies.

        None when ``WATCHDOG_USEC`` is unset, or ``WATCHDOG_PID`` names another process.
        Raises :class:`ValueError` for malformed values.
        """
        return watchdog_interval(self._env, os.getpid())

    def start_watchdog(self) -> bool:
        """Ping ``WATCHDOG=1`` now and every ``WATCHDOG_USEC / 2``; return whether it runs.

        Does nothing (returns False) without a watchdog for this process or without a
        notification socket; calling it again while running changes nothing.  Raises
        :class:`ValueError` if ``WATCHDOG_USEC`` or ``WATCHDOG_PID`` is malformed.
        """
        interval = self.watchdog_interval()
        if interval is None or not self.enabled:
            return False
        if self._watchdog is not None and self._watchdog.running:
            return True
        loop = LoopingCall(self.watchdog)
        loop.clock = self._clock
        self._watchdog = loop
        loop.start(interval, now=True).addErrback(self._watchdog_failed)
        return True

    def stop_watchdog(self) -> None:
        """Stop the watchdog pings, if they are running."""
        loop, self._watchdog = self._watchdog, None
        if loop is not None and loop.running:
            loop.stop()

    def close(self) -> None:
        """Stop the watchdog and close the socket; later sends are silent no-ops."""
        self.stop_watchdog()
        sock, self._socket = self._socket, None
        if sock is not None:
            sock.close()

    def _watchdog_failed(self, failure: Failure) -> None:
        # watchdog() does not raise, so this is a bug; systemd will notice the silence.
        log.failure("systemd watchdog pings stopped", failure)

    def _send(self, message: str) -> bool:
        if self._socket is None or self._address is None:
            return False
        data = message.encode("utf-8", "replace")
        try:
            self._socket.sendto(data, self._address)
        except BlockingIOError:
            if not self._full_logged:
                self._full_logged = True
                log.warn(
                    "systemd notification socket {address} is full; dropped a notification"
                    " (later drops are not logged)",
                    address=_describe_address(self._address),
                )
            return False
        except OSError as error:
            if not self._failure_logged:
                self._failure_logged = True
                log.warn(
                    "cannot notify systemd at {address}: {error} (later failures are not logged)",
                    address=_describe_address(self._address),
                    error=error.strerror or error,
                )
            return False
        return True


def _describe_address(address: bytes) -> str:
    if address.startswith(b"\0"):
        return "@" + address[1:].decode("utf-8", "replace")
    return os.fsdecode(address)


def watchdog_interval(env: Mapping[str, str], pid: int) -> float | None:
    """Half of ``WATCHDOG_USEC`` in seconds, as ``sd_watchdog_enabled`` would allow it.

    None when ``WATCHDOG_USEC`` is unset or ``WATCHDOG_PID`` is set to another pid than
    ``pid``.  Raises :class:`ValueError` for a value that is not a positive integer.
    """
    usec_text = env.get("WATCHDOG_USEC")
    if usec_text is None:
        return None
    if not _DECIMAL.fullmatch(usec_text) or int(usec_text) == 0:
        raise ValueError(f"WATCHDOG_USEC={usec_text!r} is not a positive number of microseconds")
    pid_text = env.get("WATCHDOG_PID")
    if pid_text is not None:
        if not _DECIMAL.fullmatch(pid_text):
            raise ValueError(f"WATCHDOG_PID={pid_text!r} is not a process ID")
        if int(pid_text) != pid:
            return None
    return int(usec_text) / 2 / 1_000_000


def inherited_sockets(env: Mapping[str, str], pid: int) -> dict[str, list[int]]:
    """The sockets systemd passed to process ``pid``: name -> fds, as sd_listen_fds does.

    Empty unless ``LISTEN_PID`` is ``pid`` and ``LISTEN_FDS`` is set.  The fds are
    ``3 .. 3 + LISTEN_FDS - 1``; ``LISTEN_FDNAMES`` (colon-separated) names them, and
    without it (or for an empty name) each is called ``"unknown"``.  Several fds can
    share a name, so the values are lists, in fd order.  Raises :class:`ValueError` for
    malformed values, or a name count that does not match ``LISTEN_FDS``.
    """
    pid_text = env.get("LISTEN_PID")
    if pid_text is None:
        return {}
    if not _DECIMAL.fullmatch(pid_text):
        raise ValueError(f"LISTEN_PID={pid_text!r} is not a process ID")
    if int(pid_text) != pid:
        return {}
    count_text = env.get("LISTEN_FDS")
    if count_text is None:
        return {}
    if not _DECIMAL.fullmatch(count_text):
        raise ValueError(f"LISTEN_FDS={count_text!r} is not a non-negative integer")
    count = int(count_text)
    if count > _MAX_LISTEN_FDS:
        raise ValueError(f"LISTEN_FDS={count_text!r} is implausibly large")
    names_text = env.get("LISTEN_FDNAMES")
    if names_text is None:
        names = [UNKNOWN_NAME] * count
    else:
        names = names_text.split(":") if names_text or count else []
        if len(names) != count:
            raise ValueError(
                f"LISTEN_FDNAMES={names_text!r} names {len(names)} socket(s) but LISTEN_FDS={count}"
            )
    sockets: dict[str, list[int]] = {}
    for offset, name in enumerate(names):
        sockets.setdefault(name or UNKNOWN_NAME, []).append(LISTEN_FDS_START + offset)
    return sockets


def clear_listen_environment(environ: MutableMapping[str, str]) -> None:
    """Remove ``LISTEN_PID``, ``LISTEN_FDS`` and ``LISTEN_FDNAMES`` (so children don't see them)."""
    for key in LISTEN_VARIABLES:
        environ.pop(key, None)


def _name(value: int) -> str:
    return getattr(value, "name", str(value))


def _listening_stream_family(fd: int) -> socket.AddressFamily:
    """The family of ``fd`` if it is a listening AF_INET/AF_INET6 stream socket."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as error:
        if error.errno == errno.EBADF:
            raise ValueError(f"fd {fd} is not an open file descriptor") from error
        if error.errno == errno.ENOTSOCK:
            raise ValueError(f"fd {fd} is not a socket") from error
        raise ValueError(f"fd {fd} cannot be inspected: {error.strerror or error}") from error
    try:
        family, kind = sock.family, sock.type
        accepting = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    finally:
        sock.detach()  # the fd is not ours to close here
    if family not in (socket.AF_INET, socket.AF_INET6):
        raise ValueError(
            f"fd {fd} is an {_name(family)} socket; only AF_INET and AF_INET6 stream"
            " sockets can be adopted"
        )
    if kind != socket.SOCK_STREAM:
        raise ValueError(
            f"fd {fd} is an {_name(family)} {_name(kind)} socket, not SOCK_STREAM"
            " (use ListenStream= in the socket unit)"
        )
    if not accepting:
        raise ValueError(
            f"fd {fd} is an {_name(family)} stream socket that is not listening"
            " (a connection passed with Accept=yes? the socket unit needs Accept=no)"
        )
    return family


def adopt_listening_socket(
    reactor: IReactorSocket, fd: int, factory: ServerFactory
) -> IListeningPort:
    """Serve ``factory`` on the inherited listening socket ``fd``, via ``adoptStreamPort``.

    Only listening AF_INET/AF_INET6 stream sockets are accepted; anything else raises
    :class:`ValueError` naming the fd and what it is, and leaves ``fd`` open.  The fd is
    made non-blocking, as ``adoptStreamPort`` requires.  The reactor's port works on its
    own (close-on-exec) duplicate, and its documentation leaves the original to the
    caller, so on success this function closes ``fd`` (which also keeps it from leaking
    into child processes).  If ``adoptStreamPort`` raises, ``fd`` is left open.
    """
    family = _listening_stream_family(fd)
    os.set_blocking(fd, False)
    port = reactor.adoptStreamPort(fd, family, factory)
    os.close(fd)
    return port


def is_systemd_endpoint(text: str) -> bool:
    """Whether a configured endpoint string is a ``systemd:`` one."""
    return text.startswith("systemd:")


def parse_systemd_endpoint(text: str) -> tuple[str, str]:
    """Read ``systemd:name=NAME`` or ``systemd:index=N`` into ``("name", NAME)``/``("index", N)``.

    Twisted's own form ``systemd:domain=INET:index=0`` is accepted too; ``domain`` is
    ignored (the family is read from the socket itself).  Anything else raises
    :class:`ValueError`: another prefix, no selector, both selectors, unknown or repeated
    keys, an empty name or an index that is not a non-negative integer.
    """
    usage = "expected 'systemd:name=NAME' or 'systemd:index=N'"
    prefix, colon, rest = text.partition(":")
    if prefix != "systemd" or not colon:
        raise ValueError(f"{text!r} is not a systemd endpoint; {usage}")
    if not rest:
        raise ValueError(f"{text!r} names no socket; {usage}")
    fields: dict[str, str] = {}
    for part in rest.split(":"):
        key, equals, value = part.partition("=")
        if not equals:
            raise ValueError(f"{text!r}: {part!r} is not key=value; {usage}")
        if key not in ("name", "index", "domain"):
            raise ValueError(f"{text!r}: unknown key {key!r}; {usage}")
        if key in fields:
            raise ValueError(f"{text!r}: {key!r} is given twice")
        fields[key] = value
    if "name" in fields and "index" in fields:
        raise ValueError(f"{text!r} gives both name and index; use one")
    if "name" in fields:
        if not fields["name"]:
            raise ValueError(f"{text!r} has an empty name; {usage}")
        return ("name", fields["name"])
    if "index" in fields:
        if not _DECIMAL.fullmatch(fields["index"]):
            raise ValueError(f"{text!r}: index must be a non-negative integer")
        return ("index", str(int(fields["index"])))
    raise ValueError(f"{text!r} names no socket; {usage}")


def _describe_sockets(sockets: Mapping[str, list[int]]) -> str:
    if not any(sockets.values()):
        return (
            "systemd passed no sockets to this process"
            " (is it started by its .socket unit, with LISTEN_PID/LISTEN_FDS for this pid?)"
        )
    listed = ", ".join(
        f"{name!r} (fd{'s' if len(fds) > 1 else ''} {', '.join(map(str, fds))})"
        for name, fds in sockets.items()
        if fds
    )
    return f"systemd passed: {listed}"


def select_fds(sockets: Mapping[str, list[int]], kind: str, value: str) -> int:
    """The fd a listener uses, from :func:`inherited_sockets` and :func:`parse_systemd_endpoint`.

    ``("name", NAME)`` needs exactly one fd of that name; ``("index", N)`` takes the N-th
    fd overall, in fd order.  Raises :class:`ValueError` saying what is available.
    """
    if kind == "name":
        fds = sockets.get(value, [])
        if len(fds) == 1:
            return fds[0]
        if not fds:
            raise ValueError(f"no socket named {value!r}; {_describe_sockets(sockets)}")
        raise ValueError(
            f"{len(fds)} sockets are named {value!r} (fds {', '.join(map(str, fds))});"
            " give each its own FileDescriptorName= or select with systemd:index=N"
        )
    if kind == "index":
        if not _DECIMAL.fullmatch(value):
            raise ValueError(f"socket index {value!r} is not a non-negative integer")
        index = int(value)
        ordered = sorted(fd for fds in sockets.values() for fd in fds)
        if index >= len(ordered):
            raise ValueError(f"no socket with index {index}; {_describe_sockets(sockets)}")
        return ordered[index]
    raise ValueError(f"unknown socket selector {kind!r} (expected 'name' or 'index')")
