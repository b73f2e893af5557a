"""The ``ldapproxy`` command: ``run``, ``check`` and ``demo``."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.logger import LogLevel
from twisted.python.failure import Failure

from ldapproxy import __version__

#: Names accepted by ``run --log-level``, lowest first.
LOG_LEVELS = ("debug", "info", "warn", "error")


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the console script."""
    parser = argparse.ArgumentParser(prog="ldapproxy", description="TLS-terminating LDAP proxy")
    parser.add_argument("--version", action="version", version=f"ldapproxy {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the proxy in the foreground")
    run.add_argument("-c", "--config", required=True, type=Path, help="configuration file (TOML)")
    run.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default=None,
        help="lowest level logged, overriding log.level (debug adds a line per connection)",
    )
    # A worker started by the supervisor ([process] workers > 1); not for people.
    run.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    run.add_argument("--listeners", default="{}", help=argparse.SUPPRESS)
    run.add_argument("--metrics-socket", default=None, help=argparse.SUPPRESS)
    check = commands.add_parser("check", help="validate the configuration without serving")
    check.add_argument("-c", "--config", required=True, type=Path, help="configuration file (TOML)")
    check.add_argument(
        "--connect", action="store_true", help="also connect to every upstream and verify its TLS"
    )
    demo = commands.add_parser("demo", help="run the proxy in front of an embedded directory")
    demo.add_argument("--port", type=int, default=3389, help="plain/StartTLS port (default 3389)")
    demo.add_argument("--ldaps-port", type=int, default=3636, help="LDAPS port (default 3636)")
    args = parser.parse_args(argv)
    from ldapproxy.reactor import install

    install()  # before anything imports twisted.internet.reactor
    if args.command == "run" and args.worker is not None:
        from ldapproxy.workers import run_worker

        sys.exit(
            run_worker(
                args.config, args.log_level, args.worker, args.listeners, args.metrics_socket
            )
        )
    if args.command == "run":
        sys.exit(_run(args.config, args.log_level))
    if args.command == "check":
        sys.exit(_check(args.config, args.connect))
    from ldapproxy.demo import run_demo

    sys.exit(run_demo(args.port, args.ldaps_port))


def fail(message: str) -> int:
    """Print one line on stderr, the way every startup error is reported; return 2."""
    sys.stderr.write(f"ldapproxy: error: {message}\n")
    return 2


def _load(path: Path) -> Any:
    """Load the config and build the service; returns the service or an exit code."""
    # Sockets passed by systemd (socket activation) are read before anything imports
    # twisted.internet.endpoints, which removes LISTEN_FDS from the environment.
    from ldapproxy.systemd import clear_listen_environment, inherited_sockets

    try:
        inherited = inherited_sockets(os.environ, os.getpid())
    except ValueError as error:
        return fail(f"socket activation: {error}")
    clear_listen_environment(os.environ)
    from ldapproxy.config import ConfigError, load
    from ldapproxy.service import ProxyService
    from ldapproxy.tls import TLSSetupError

    try:
        config = load(path)
    except ConfigError as error:
        return fail(str(error))
    from twisted.internet import reactor

    try:
        return ProxyService(config, reactor, inherited)
    except TLSSetupError as error:
        return fail(f"{path}: {error}")
    except ConfigError as error:
        return fail(str(error))


def _run(path: Path, log_level: str | None = None) -> int:
    service = _load(path)
    if isinstance(service, int):
        return service
    if service.config.process.workers > 1:
        from ldapproxy.workers import supervise

        # This service only validated the configuration; each worker builds its own.
        return supervise(service.config, service.inherited, log_level)
    log = service.config.log
    return serve(lambda: defer.succeed(service), log_level, log.format, log.level)


def serve(
    build: Callable[[], defer.Deferred[Any]],
    log_level: str | None = None,
    log_format: str = "text",
    config_level: str = "info",
    notifier: Any = None,
) -> int:
    """Run the reactor: ``build()`` gives the proxy service, whose listeners are bound.

    Tells systemd (if it started the proxy) when it is ready, reloading and stopping;
    SIGHUP reloads the configuration, SIGTERM drains and stops.  Returns the exit status:
    0 after a signal stops the proxy, 1 or 2 if startup failed (with one line on stderr,
    no traceback).  ``notifier`` replaces the systemd notifier (a worker's reports to
    its supervisor, :class:`ldapproxy.workers.WorkerNotifier`).
    """
    from twisted.internet import reactor
    from twisted.logger import Logger

    from ldapproxy.logs import start_logging
    from ldapproxy.service import ListenError
    from ldapproxy.systemd import Notifier

    log = Logger(namespace="ldapproxy.service")
    exit_code = 0
    if notifier is None:
        notifier = Notifier.from_environment(os.environ, reactor)
    predicate = start_logging(
        sys.stderr, LogLevel.levelWithName(log_level or config_level), log_format
    )

    def started() -> defer.Deferred[Any]:
        d = build()

        def listen(service: Any) -> Any:
            reactor.addSystemEventTrigger("before", "shutdown", stopping, service)
            signal.signal(
                signal.SIGHUP,
                lambda *_: reactor.callFromThread(reload, service),  # type: ignore[attr-defined]
            )
            return service.listen().addCallback(lambda _: service)

        def ready(service: Any) -> defer.Deferred[Any]:
            service.startService()
            log.info("ldapproxy {version} listening", version=__version__)
            warmed: defer.Deferred[Any] = service.warmed()
            return warmed.addCallback(lambda status: announce(service, status))

        def announce(service: Any, status: str) -> None:
            log.info("ldapproxy {version} ready: {status}", version=__version__, status=status)
            notifier.ready(status)
            notifier.start_watchdog()

        def failed(failure: Failure) -> None:
            nonlocal exit_code
            exit_code = 1 if isinstance(failure.value, ListenError) else 2
            fail(str(failure.value) or repr(failure.value))
            reactor.stop()

        return d.addCallback(listen).addCallbacks(ready, failed)

    def reload(service: Any) -> None:
        notifier.reloading("reloading the configuration")

        def done(applied: bool) -> None:
            if applied and log_level is None:
                predicate.defaultLogLevel = LogLevel.levelWithName(service.config.log.level)
                predicate.clearLogLevels()
            notifier.ready("reload applied" if applied else "reload failed; old configuration")

        service.reload().addCallback(done)

    def stopping(service: Any) -> Any:
        notifier.stopping("draining client sessions")
        notifier.stop_watchdog()
        return service.stopService()

    reactor.callWhenRunning(started)
    reactor.run()
    notifier.close()
    return exit_code


def _check(path: Path, connect: bool) -> int:
    service = _load(path)
    if isinstance(service, int):
        return service
    config = service.config
    print(
        f"{path}: configuration OK: {len(config.listeners)} listener(s), "
        f"{len(config.upstream.urls)} upstream URL(s)"
    )
    if not connect:
        return 0
    from twisted.internet import task

    from ldapproxy.check import check_upstreams

    result: list[bool] = []

    def go(_reactor: Any) -> Any:
        return check_upstreams(config, service.dialer, sys.stdout).addCallback(result.append)

    try:
        task.react(go)
    except SystemExit as stop:
        if stop.code:
            return int(stop.code)
    return 0 if result and result[0] else 1


if __name__ == "__main__":  # workers are started as ``python -m ldapproxy.cli``
    main()
