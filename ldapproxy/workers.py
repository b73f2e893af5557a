"""``[process] workers = N``: N worker processes sharing the listening sockets, under a
supervisor.

With ``workers = 1`` (the default) none of this runs: ``ldapproxy run`` is the proxy.
With more, ``ldapproxy run`` becomes the *supervisor*:

* it binds every listener's socket itself (``tcp:`` endpoints; ``systemd:`` ones are
  taken from the sockets systemd passed), before any worker exists, and keeps them open
  for the whole run, so a worker's crash loses no queued connection and its replacement
  inherits the same sockets;
* it starts N workers, ``python -m ldapproxy.cli run -c FILE --worker N ...`` (hidden
  options), passing the sockets as file descriptors 4, 5... (named by listener in
  ``--listeners``), a status pipe on fd 3 (``READY``/``RELOADING``/``STOPPING`` lines:
  :class:`WorkerNotifier` stands in for the systemd notifier) and a pipe on stdin whose
  end-of-file tells a worker that its supervisor is gone.  Each worker is a complete
  :class:`WorkerService` (its own pool, plugins, TLS contexts) that adopts the inherited
  sockets instead of binding;
* it relays each worker's log (stderr) line by line, tagged ``worker=N`` (a field in
  JSON logs); workers' stdout (the audit plugin's ``path = "-"``) is the supervisor's;
* it restarts a worker that exits unexpectedly, after 1 s, doubling to at most 30 s
  while the worker keeps dying within 10 s of its start; a worker that fails before
  the first time every worker was ready stops the whole start (exit status 1);
* it forwards SIGHUP (reload) to every ready worker and SIGTERM/SIGINT (drain) to every
  worker, waits up to ``limits.drain_timeout`` + 15 s for them (then SIGKILL), and
  exits 0; it tells systemd READY=1 once every worker is ready, and RELOADING=1/READY=1
  around a reload;
* it serves ``[metrics] endpoint`` itself: each worker serves its own page on a unix
  socket in a private directory, and a scrape of the supervisor fetches them all (each
  bounded in time and size) and sums identical samples
  (:mod:`ldapproxy.worker_metrics`); ``/readyz`` is 200 only when every worker's is.

The supervisor never reads client traffic.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge
from prometheus_client import generate_latest as _generate_latest
from prometheus_client.process_collector import ProcessCollector
from twisted.internet import defer
from twisted.internet.error import ProcessDone, ProcessTerminated, ReactorNotRunning
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource

from ldapproxy import __version__
from ldapproxy.config import Config
from ldapproxy.systemd import (
    adopt_listening_socket,
    is_systemd_endpoint,
    parse_systemd_endpoint,
    select_fds,
)
from ldapproxy.worker_metrics import aggregate, fetch, render

log = Logger(namespace="ldapproxy.workers")

#: Most workers ``[process] workers`` allows.
MAX_WORKERS = 64
#: The worker's fd for status lines to the supervisor; listeners follow it.
STATUS_FD = 3
FIRST_LISTENER_FD = 4
#: Restart backoff: first delay, cap, and how long a worker must live to reset it.
RESTART_DELAY = 1.0
MAX_RESTART_DELAY = 30.0
STABLE_AFTER = 10.0
#: Longest worker log line relayed whole; longer ones are cut into pieces.
MAX_LOG_LINE = 64 * 1024
#: Past ``limits.drain_timeout``, how long the supervisor waits before SIGKILL.
STOP_MARGIN = 15.0
#: Environment variables a worker must not see (the supervisor talks to systemd).
_SUPERVISOR_ONLY = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
_TEXT_LOG_LINE = re.compile(r"(\S+Z \w+ \S+: )(.*)", re.DOTALL)


# -- the listening sockets ---------------------------------------------------------------


@dataclass(frozen=True)
class TCPEndpoint:
    """A ``tcp:`` server endpoint string, as far as the supervisor binds it itself."""

    port: int
    interface: str = ""
    backlog: int = 50


def _split_endpoint(text: str) -> list[str]:
    """Split at unescaped colons, removing the backslash escapes (as Twisted does)."""
    parts, current, chars = [], [], iter(text)
    for char in chars:
        if char == "\\":
            current.append(next(chars, ""))
        elif char == ":":
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return parts


def parse_tcp_endpoint(text: str) -> TCPEndpoint:
    """Read ``tcp:PORT[:interface=ADDR][:backlog=N]`` (Twisted's syntax, positional or
    keyword arguments) or the same with ``tcp6:`` (whose interface defaults to ``::``);
    :class:`ValueError` for anything else."""
    kind, *arguments = _split_endpoint(text)
    if kind.lower() not in ("tcp", "tcp6"):
        raise ValueError(f"{text!r} is not a tcp: endpoint")
    names = ["port", "interface", "backlog"]
    values: dict[str, str] = {}
    keywords = False
    for position, argument in enumerate(arguments):
        key, equals, value = argument.partition("=")
        keywords = keywords or bool(equals)
        if not equals:
            if position >= len(names) or keywords:
                raise ValueError(f"{text!r}: unexpected argument {argument!r}")
            key, value = names[position], argument
        if key not in names:
            raise ValueError(f"{text!r}: unknown key {key!r} (expected port, interface, backlog)")
        if key in values:
            raise ValueError(f"{text!r}: {key!r} is given twice")
        values[key] = value
    if "port" not in values:
        raise ValueError(f"{text!r} names no port")
    try:
        port, backlog = int(values["port"]), int(values.get("backlog", "50"))
    except ValueError:
        raise ValueError(f"{text!r}: port and backlog must be integers") from None
    if not 0 <= port <= 65535 or backlog < 1:
        raise ValueError(f"{text!r}: port must be 0 to 65535 and backlog at least 1")
    default = "::" if kind.lower() == "tcp6" else ""
    return TCPEndpoint(port, values.get("interface", default), backlog)


def check_worker_endpoint(text: str) -> None:
    """Whether the supervisor can bind ``text`` for its workers: :class:`ValueError`
    saying why not."""
    if is_systemd_endpoint(text):
        return
    if text.split(":", 1)[0].lower() not in ("tcp", "tcp6"):
        raise ValueError(
            "with [process] workers > 1 every listener needs a tcp:, tcp6: or systemd: endpoint "
            "(the supervisor binds it and shares it with the workers)"
        )
    parse_tcp_endpoint(text)


def bind_tcp(endpoint: TCPEndpoint) -> socket.socket:
    """A listening socket for ``endpoint``, bound as Twisted's ``listenTCP`` would."""
    family = socket.AF_INET6 if ":" in endpoint.interface else socket.AF_INET
    host = endpoint.interface or "0.0.0.0"
    address = socket.getaddrinfo(
        host, endpoint.port, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
    )[0][4]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(endpoint.backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def bind_listeners(config: Config, inherited: Mapping[str, list[int]]) -> dict[str, socket.socket]:
    """Every listener's listening socket, by listener name; on failure close those made
    and raise :class:`ldapproxy.service.ListenError` (one line, like the proxy's own)."""
    from ldapproxy.service import ListenError

    sockets: dict[str, socket.socket] = {}
    for listener in config.listeners:
        try:
            if is_systemd_endpoint(listener.endpoint):
                fd = select_fds(inherited, *parse_systemd_endpoint(listener.endpoint))
                sockets[listener.name] = socket.socket(fileno=fd)
            else:
                sockets[listener.name] = bind_tcp(parse_tcp_endpoint(listener.endpoint))
        except (OSError, ValueError) as error:
            for sock in sockets.values():
                sock.close()
            detail = getattr(error, "strerror", None) or str(error)
            raise ListenError(
                f"listener {listener.name!r} (endpoint = {listener.endpoint!r}): "
                f"cannot listen: {detail}"
            ) from None
    return sockets


# -- the worker side ---------------------------------------------------------------------


class WorkerNotifier:
    """The worker's stand-in for :class:`ldapproxy.systemd.Notifier`: the same calls,
    written as lines on the status pipe to the supervisor.  Never raises."""

    def __init__(self, fd: int = STATUS_FD) -> None:
        self._fd: int | None = fd

    @property
    def enabled(self) -> bool:
        return self._fd is not None

    def _send(self, line: str) -> bool:
        if self._fd is None:
            return False
        try:
            os.write(self._fd, (line.replace("\n", " ") + "\n").encode("utf-8", "replace"))
        except OSError:
            return False
        return True

    def ready(self, status: str) -> bool:
        return self._send(f"READY {status}")

    def status(self, text: str) -> bool:
        return self._send(f"STATUS {text}")

    def reloading(self, status: str | None = None) -> bool:
        return self._send("RELOADING")

    def stopping(self, status: str) -> bool:
        return self._send("STOPPING")

    def start_watchdog(self) -> bool:
        """No watchdog here: the supervisor pings systemd's, a worker's is its pipe."""
        return False

    def stop_watchdog(self) -> None:
        """Nothing to stop (see :meth:`start_watchdog`)."""

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def make_worker_service(
    config: Config, reactor: Any, listener_fds: Mapping[str, int], metrics_socket: str | None
) -> Any:
    """A :class:`ldapproxy.service.ProxyService` that adopts the supervisor's sockets
    (``listener_fds``: listener name -> fd) and serves its metrics on ``metrics_socket``.

    Raises :class:`ValueError` when the configuration's listeners are not the ones the
    supervisor bound (the file was edited since the supervisor started).
    """
    from twisted.internet.endpoints import UNIXServerEndpoint

    from ldapproxy.service import ListenError, ProxyService

    names = [listener.name for listener in config.listeners]
    if names != list(listener_fds):
        raise ValueError(
            f"{config.path}: the listeners are now {names}, the supervisor's are "
            f"{list(listener_fds)}; listeners take a restart of the whole service"
        )
    by_endpoint = {lc.endpoint: listener_fds[lc.name] for lc in config.listeners}

    class WorkerService(ProxyService):
        def _bind(self, what: str, endpoint: str, factory: Any) -> defer.Deferred[Any]:
            try:
                if what == "[metrics]" and metrics_socket is not None:
                    server = UNIXServerEndpoint(  # type: ignore[no-untyped-call]
                        self._reactor, metrics_socket, mode=0o600
                    )
                    return defer.ensureDeferred(_listen(server, factory))
                if endpoint in by_endpoint:
                    port = adopt_listening_socket(self._reactor, by_endpoint[endpoint], factory)
                    return defer.succeed(port)
            except Exception as error:
                self.close_listeners()
                return defer.fail(
                    ListenError(f"{what} (endpoint = {endpoint!r}): cannot listen: {error}")
                )
            return super()._bind(what, endpoint, factory)

    return WorkerService(config, reactor)


async def _listen(server: Any, factory: Any) -> IListeningPort:
    port: IListeningPort = await server.listen(factory)
    return port


class _ParentWatch:
    """Reads the worker's stdin, a pipe from the supervisor: end-of-file (or the hang-up
    the reactor reports as a lost connection) means the supervisor is gone, and the
    worker stops (draining) rather than run unsupervised."""

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._stopping = False
        reactor.addSystemEventTrigger("before", "shutdown", self._shutdown)

    def _shutdown(self) -> None:
        self._stopping = True

    def fileno(self) -> int:
        return 0

    def logPrefix(self) -> str:
        return "supervisor"

    def doRead(self) -> Any:
        try:
            data = os.read(0, 4096)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if not data:
            from twisted.internet.error import ConnectionDone

            return ConnectionDone()  # the reactor removes this reader: connectionLost
        return None

    def connectionLost(self, reason: Failure) -> None:
        if self._stopping:
            return  # the reactor is shutting down and disconnects everything
        self._stopping = True
        log.warn("the supervisor is gone; this worker stops")
        with contextlib.suppress(ReactorNotRunning):
            self._reactor.stop()


def worker_started(reactor: Any) -> None:
    """In a worker, once the reactor runs: ignore SIGINT (a terminal's Ctrl-C reaches the
    supervisor, which stops the workers) and watch the supervisor through stdin."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.set_blocking(0, False)
    reactor.addReader(_ParentWatch(reactor))


# -- the supervisor ----------------------------------------------------------------------


@dataclass
class Worker:
    """One worker slot, 1..N; its process changes on every restart."""

    index: int
    process: Any = None
    pid: int | None = None
    ready: bool = False
    reloading: bool = False
    started_at: float = 0.0
    delay: float = RESTART_DELAY
    restart_call: Any = None
    ended: defer.Deferred[None] | None = None
    relay: bytearray = field(default_factory=bytearray)
    status: bytearray = field(default_factory=bytearray)

    @property
    def socket_name(self) -> str:
        return f"worker-{self.index}.sock"


class _WorkerProtocol(ProcessProtocol):
    def __init__(self, supervisor: Supervisor, worker: Worker) -> None:
        self._supervisor = supervisor
        self._worker = worker

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == 2:
            self._supervisor.relay(self._worker, data)
        elif childFD == STATUS_FD:
            self._supervisor.status_data(self._worker, data)

    def processEnded(self, reason: Failure) -> None:
        self._supervisor.ended(self._worker, reason)


def describe_exit(reason: Failure) -> str:
    """``exit status N`` or ``killed by SIGNAME`` for a process's end."""
    value = reason.value
    if isinstance(value, ProcessTerminated) and value.signal is not None:
        try:
            return f"killed by {signal.Signals(value.signal).name}"
        except ValueError:
            return f"killed by signal {value.signal}"
    if isinstance(value, ProcessDone | ProcessTerminated):
        return f"exit status {value.exitCode}"
    return str(value)


class Supervisor:
    """Starts, watches, signals and scrapes the workers; see the module docstring."""

    def __init__(
        self,
        config: Config,
        sockets: Mapping[str, socket.socket],
        reactor: Any,
        notifier: Any,
        worker_args: Sequence[str] = (),
        write_line: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self._sockets = dict(sockets)
        self._reactor = reactor
        self._notifier = notifier
        self._worker_args = list(worker_args)
        self._write = write_line or _write_stderr
        self.workers = [Worker(index) for index in range(1, config.process.workers + 1)]
        self.directory = tempfile.mkdtemp(prefix="ldapproxy-workers-")
        self.exit_code = 0
        self.started = False
        self.stopping = False
        self._reload_pending = False
        self.metrics_port: IListeningPort | None = None
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        Gauge(
            "ldapproxy_workers",
            "Worker processes configured ([process] workers).",
            registry=self.registry,
        ).set_function(lambda: len(self.workers))
        Gauge(
            "ldapproxy_workers_ready",
            "Worker processes running and ready.",
            registry=self.registry,
        ).set_function(lambda: sum(w.ready for w in self.workers))
        self.restarts = Counter(
            "ldapproxy_worker_restarts",
            "Workers restarted after an unexpected exit.",
            registry=self.registry,
        )
        self.scrape_failures = Counter(
            "ldapproxy_worker_scrape_failures",
            "Worker metric pages that could not be read in time (left out of the scrape).",
            registry=self.registry,
        )

    # -- starting and restarting ---------------------------------------------------------

    def start(self) -> None:
        for worker in self.workers:
            self.spawn(worker)

    def _socket_path(self, worker: Worker) -> str:
        return os.path.join(self.directory, worker.socket_name)

    def spawn(self, worker: Worker) -> None:
        worker.restart_call = None
        worker.ready = worker.reloading = False
        worker.relay.clear()
        worker.status.clear()
        metrics_socket = self._socket_path(worker)
        if os.path.exists(metrics_socket):
            os.unlink(metrics_socket)
        child_fds: dict[int, Any] = {0: "w", 1: 1, 2: "r", STATUS_FD: "r"}
        fds: dict[str, int] = {}
        for offset, (name, sock) in enumerate(self._sockets.items()):
            child_fds[FIRST_LISTENER_FD + offset] = sock.fileno()
            fds[name] = FIRST_LISTENER_FD + offset
        args = [
            sys.executable, "-m", "ldapproxy.cli", "run",
            "-c", str(self.config.path),
            "--worker", str(worker.index),
            "--listeners", json.dumps(fds),
            *self._worker_args,
        ]  # fmt: skip
        if self.config.metrics.endpoint:
            args += ["--metrics-socket", metrics_socket]
        env = {k: v for k, v in os.environ.items() if k not in _SUPERVISOR_ONLY}
        worker.ended = defer.Deferred()
        worker.started_at = self._reactor.seconds()
        worker.process = self._reactor.spawnProcess(
            _WorkerProtocol(self, worker), sys.executable, args, env, childFDs=child_fds
        )
        worker.pid = worker.process.pid
        log.info("worker {index} started, pid {pid}", index=worker.index, pid=worker.pid)

    def ended(self, worker: Worker, reason: Failure) -> None:
        self._flush_relay(worker)
        how = describe_exit(reason)
        pid, worker.pid, worker.process = worker.pid, None, None
        worker.ready = worker.reloading = False
        ended, worker.ended = worker.ended, None
        if self.stopping:
            log.info(
                "worker {index} (pid {pid}) stopped: {how}", index=worker.index, pid=pid, how=how
            )
        elif not self.started:
            log.error(
                "worker {index} (pid {pid}) failed to start: {how}; stopping",
                index=worker.index,
                pid=pid,
                how=how,
            )
            code = getattr(reason.value, "exitCode", None)
            self.exit_code = code if code in (1, 2) else 1
            self._reactor.callLater(0, self._stop_reactor)
        else:
            if self._reactor.seconds() - worker.started_at >= STABLE_AFTER:
                worker.delay = RESTART_DELAY
            delay = worker.delay
            worker.delay = min(delay * 2, MAX_RESTART_DELAY)
            log.warn(
                "worker {index} (pid {pid}) exited unexpectedly: {how};"
                " restarting it in {delay:g} s",
                index=worker.index,
                pid=pid,
                how=how,
                delay=delay,
            )
            self.restarts.inc()
            worker.restart_call = self._reactor.callLater(delay, self.spawn, worker)
            self._update_status()
        if ended is not None:
            ended.callback(None)
        if self._reload_pending and not any(w.reloading for w in self.workers):
            self._reload_done()

    def _stop_reactor(self) -> None:
        if self._reactor.running:
            self._reactor.stop()

    # -- what the workers say ------------------------------------------------------------

    def relay(self, worker: Worker, data: bytes) -> None:
        worker.relay += data
        while True:
            end = worker.relay.find(b"\n")
            if end < 0:
                if len(worker.relay) > MAX_LOG_LINE:
                    line = bytes(worker.relay[:MAX_LOG_LINE])
                    del worker.relay[:MAX_LOG_LINE]
                    self._write(self.tag(worker, line.decode("utf-8", "replace")))
                    continue
                return
            line = bytes(worker.relay[:end])
            del worker.relay[: end + 1]
            self._write(self.tag(worker, line.decode("utf-8", "replace")))

    def _flush_relay(self, worker: Worker) -> None:
        if worker.relay:
            self._write(self.tag(worker, bytes(worker.relay).decode("utf-8", "replace")))
            worker.relay.clear()

    def tag(self, worker: Worker, line: str) -> str:
        """A worker's log line, marked with its worker number."""
        if self.config.log.format == "json" and line.startswith("{"):
            # Not JSON after all (a traceback line, say): tagged as text below.
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    record["worker"] = worker.index
                    return json.dumps(record, ensure_ascii=False)
        match = _TEXT_LOG_LINE.fullmatch(line)
        if match:
            return f"{match.group(1)}worker={worker.index} {match.group(2)}"
        return f"worker={worker.index} {line}"

    def status_data(self, worker: Worker, data: bytes) -> None:
        worker.status += data
        if len(worker.status) > MAX_LOG_LINE:
            worker.status.clear()
        while b"\n" in worker.status:
            line, _, rest = bytes(worker.status).partition(b"\n")
            worker.status[:] = rest
            word, _, text = line.decode("utf-8", "replace").partition(" ")
            if word == "READY":
                self._worker_ready(worker, text)
            elif word == "RELOADING":
                worker.reloading = True

    def _worker_ready(self, worker: Worker, status: str) -> None:
        worker.ready = True
        if worker.reloading:
            worker.reloading = False
            if self._reload_pending and not any(w.reloading for w in self.workers):
                self._reload_done()
            return
        if not self.started and all(w.ready for w in self.workers):
            self.started = True
            status_line = f"{len(self.workers)} worker(s) ready"
            log.info("ldapproxy {version} ready: {status}", version=__version__, status=status_line)
            self._notifier.ready(status_line)
            self._notifier.start_watchdog()
        elif self.started:
            log.info("worker {index} ready: {status}", index=worker.index, status=status)
            self._update_status()

    def _update_status(self) -> None:
        ready = sum(w.ready for w in self.workers)
        self._notifier.status(f"{ready}/{len(self.workers)} worker(s) ready")

    # -- signals -------------------------------------------------------------------------

    def reload(self) -> None:
        """SIGHUP: forward it to every ready worker (one still starting reads the file
        anyway; one that has not installed its handler yet would die of it)."""
        if self.stopping:
            return
        targets = [w for w in self.workers if w.ready and w.process is not None]
        log.info("reload: forwarding SIGHUP to {count} worker(s)", count=len(targets))
        self._notifier.reloading("reloading the configuration in every worker")
        self._reload_pending = True
        for worker in targets:
            worker.reloading = True
            self._signal(worker, "HUP")
        if not targets:
            self._reload_done()

    def _reload_done(self) -> None:
        self._reload_pending = False
        ready = sum(w.ready for w in self.workers)
        self._notifier.ready(f"reloaded; {ready}/{len(self.workers)} worker(s) ready")

    def _signal(self, worker: Worker, name: str) -> None:
        if worker.process is None:
            return
        try:
            worker.process.signalProcess(name)
        except Exception as error:  # ProcessExitedAlready, OSError
            log.debug("cannot signal worker {index}: {error}", index=worker.index, error=error)

    def stop(self) -> defer.Deferred[None]:
        """SIGTERM/SIGINT: forward SIGTERM to every worker, wait for them to drain (SIGKILL
        after ``limits.drain_timeout`` + :data:`STOP_MARGIN`), and clean up."""
        self.stopping = True
        self._notifier.stopping("stopping the workers")
        self._notifier.stop_watchdog()
        for sock in self._sockets.values():
            sock.close()  # the workers' copies stay open until they have drained
        waiting = []
        for worker in self.workers:
            if worker.restart_call is not None and worker.restart_call.active():
                worker.restart_call.cancel()
            if worker.process is not None and worker.ended is not None:
                waiting.append(worker.ended)
                self._signal(worker, "TERM")
        if waiting:
            log.info("stopping {count} worker(s)", count=len(waiting))
        deadline = self.config.limits.drain_timeout + STOP_MARGIN

        def kill() -> None:
            for worker in self.workers:
                if worker.process is not None:
                    log.warn(
                        "worker {index} (pid {pid}) did not stop in {deadline:g} s; killing it",
                        index=worker.index,
                        pid=worker.pid,
                        deadline=deadline,
                    )
                    self._signal(worker, "KILL")

        killer = self._reactor.callLater(deadline, kill)
        done = defer.gatherResults(waiting)

        @defer.inlineCallbacks
        def finish(_: Any) -> Any:
            if killer.active():
                killer.cancel()
            if self.metrics_port is not None:
                yield defer.maybeDeferred(self.metrics_port.stopListening)
            shutil.rmtree(self.directory, ignore_errors=True)

        return done.addCallback(finish)

    # -- the metrics site ----------------------------------------------------------------

    def _running(self) -> list[Worker]:
        return [w for w in self.workers if w.process is not None and w.ready]

    @defer.inlineCallbacks
    def metrics_page(self) -> Any:
        """The aggregated page: every worker's metrics, and the supervisor's own."""
        workers = self._running()
        results = yield defer.DeferredList(
            [fetch(self._reactor, self._socket_path(w), "/metrics") for w in workers],
            consumeErrors=True,
        )
        pages = []
        for worker, (ok, result) in zip(workers, results, strict=True):
            if ok and result[0] == 200:
                pages.append((str(worker.index), result[1].decode("utf-8", "replace")))
            else:
                self.scrape_failures.inc()
                why = result.getErrorMessage() if not ok else f"HTTP {result[0]}"
                log.warn(
                    "worker {index} metrics left out of this scrape: {why}",
                    index=worker.index,
                    why=why,
                )
        # The supervisor's own page last, so that it counts this scrape's failures.
        own = ("supervisor", _generate_latest(self.registry).decode())
        try:
            return render(aggregate([own, *pages]))
        except ValueError as error:  # a page that does not parse
            log.error("cannot aggregate the workers' metrics: {error}", error=error)
            return render(aggregate([own]))

    @defer.inlineCallbacks
    def not_ready(self) -> Any:
        """Why the service should not get new clients, or None: every worker must be
        running and answer 200 on its own ``/readyz``."""
        if self.stopping:
            return "shutting down"
        for worker in self.workers:
            if worker.process is None or not worker.ready:
                return f"worker {worker.index} is not running"
        results = yield defer.DeferredList(
            [fetch(self._reactor, self._socket_path(w), "/readyz") for w in self.workers],
            consumeErrors=True,
        )
        for worker, (ok, result) in zip(self.workers, results, strict=True):
            if not ok:
                return f"worker {worker.index} did not answer: {result.getErrorMessage()}"
            status, body = result
            if status != 200:
                return f"worker {worker.index}: {body.decode('utf-8', 'replace').strip()}"
        return None

    def site(self) -> Any:
        from twisted.web.server import Site

        root = Resource()  # type: ignore[no-untyped-call]
        root.putChild(b"metrics", _AsyncPage(self.metrics_page, CONTENT_TYPE_LATEST))
        root.putChild(b"healthz", _AsyncPage(lambda: defer.succeed(b"ok\n")))
        root.putChild(b"readyz", _AsyncPage(self.not_ready, check=True))
        result = Site(root)  # type: ignore[no-untyped-call]
        result.noisy = False
        result.displayTracebacks = False
        return result


class _AsyncPage(Resource):
    """A page whose body comes from a Deferred; with ``check``, the Deferred gives a
    problem (503 and the text) or None (200 ``ok``)."""

    isLeaf = True

    def __init__(
        self,
        produce: Callable[[], defer.Deferred[Any]],
        content_type: str = "text/plain; charset=utf-8",
        check: bool = False,
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self._produce = produce
        self._content_type = content_type
        self._check = check

    def render_GET(self, request: Any) -> Any:
        from twisted.web.server import NOT_DONE_YET

        finished: list[bool] = []
        request.notifyFinish().addBoth(finished.append)

        def write(result: Any) -> None:
            if finished:
                return
            request.setHeader(b"content-type", self._content_type.encode())
            if self._check:
                request.setHeader(b"cache-control", b"no-store")
                if result is None:
                    body = b"ok\n"
                else:
                    request.setResponseCode(503)
                    body = f"{result}\n".encode()
            else:
                body = result
            request.write(body)
            request.finish()

        def failed(failure: Failure) -> None:
            log.failure("supervisor page failed", failure)
            if not finished:
                request.setResponseCode(500)
                request.finish()

        self._produce().addCallback(write).addErrback(failed)
        return NOT_DONE_YET


def _write_stderr(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


# -- running -----------------------------------------------------------------------------


def supervise(config: Config, inherited: Mapping[str, list[int]], log_level: str | None) -> int:
    """``ldapproxy run`` with ``[process] workers > 1``; returns the exit status."""
    from twisted.internet import reactor
    from twisted.internet.endpoints import serverFromString
    from twisted.logger import LogLevel

    from ldapproxy.cli import fail
    from ldapproxy.logs import start_logging
    from ldapproxy.service import ListenError
    from ldapproxy.systemd import Notifier

    try:
        sockets = bind_listeners(config, inherited)
    except ListenError as error:
        fail(str(error))
        return 1
    notifier = Notifier.from_environment(os.environ, reactor)
    predicate = start_logging(
        sys.stderr, LogLevel.levelWithName(log_level or config.log.level), config.log.format
    )
    worker_args = ["--log-level", log_level] if log_level else []
    supervisor = Supervisor(config, sockets, reactor, notifier, worker_args)

    def started() -> defer.Deferred[Any]:
        async def go() -> None:
            if config.metrics.endpoint:
                try:
                    server = serverFromString(reactor, config.metrics.endpoint)  # type: ignore[no-untyped-call]
                    supervisor.metrics_port = await server.listen(supervisor.site())
                except Exception as error:
                    cause = getattr(error, "socketError", None) or error
                    detail = getattr(cause, "strerror", None) or str(cause)
                    supervisor.exit_code = 1
                    fail(
                        f"[metrics] (endpoint = {config.metrics.endpoint!r}): "
                        f"cannot listen: {detail}"
                    )
                    reactor.stop()
                    return
            log.info(
                "ldapproxy {version} supervising {count} workers",
                version=__version__,
                count=len(supervisor.workers),
            )
            supervisor.start()

        return defer.ensureDeferred(go())

    def reload() -> None:
        from ldapproxy.config import ConfigError, load

        try:
            new = load(config.path)
        except ConfigError:
            pass  # every worker logs it
        else:
            if log_level is None:
                predicate.defaultLogLevel = LogLevel.levelWithName(new.log.level)
            supervisor.config = _with_limits(supervisor.config, new)
        supervisor.reload()

    reactor.addSystemEventTrigger("before", "shutdown", supervisor.stop)
    signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(reload))  # type: ignore[attr-defined]
    reactor.callWhenRunning(started)
    start = time.monotonic()
    reactor.run()
    notifier.close()
    shutil.rmtree(supervisor.directory, ignore_errors=True)
    log.debug("supervisor ran {seconds:.1f} s", seconds=time.monotonic() - start)
    return supervisor.exit_code


def _with_limits(running: Config, new: Config) -> Config:
    """The supervisor's configuration after a reload: only ``[limits]`` and ``[log]
    level`` matter to it (the shutdown deadline and its own log)."""
    import dataclasses

    return dataclasses.replace(
        running, limits=new.limits, log=dataclasses.replace(running.log, level=new.log.level)
    )


def run_worker(
    path: Path,
    log_level: str | None,
    index: int,
    listeners_json: str,
    metrics_socket: str | None,
) -> int:
    """``ldapproxy run --worker N ...``: one worker, started by the supervisor."""
    from ldapproxy.cli import fail, serve
    from ldapproxy.client import number_sessions
    from ldapproxy.config import ConfigError, load
    from ldapproxy.tls import TLSSetupError

    try:
        fds = json.loads(listeners_json)
        if not isinstance(fds, dict) or not all(isinstance(v, int) for v in fds.values()):
            raise ValueError("expected an object of listener name: fd")
    except ValueError as error:
        return fail(f"worker {index}: bad --listeners: {error}")
    from twisted.internet import reactor

    try:
        config = load(path)
        number_sessions(index, config.process.workers)
        service = make_worker_service(config, reactor, fds, metrics_socket)
    except (ConfigError, TLSSetupError, ValueError) as error:
        return fail(str(error))
    reactor.callWhenRunning(worker_started, reactor)
    return serve(
        lambda: defer.succeed(service),
        log_level,
        config.log.format,
        config.log.level,
        notifier=WorkerNotifier(),
    )
