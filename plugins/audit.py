"""The ``audit`` plugin: a JSON line per connect, StartTLS, operation and disconnect."""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import os
import re
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO, ClassVar, Final, Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ldapproxy.hooks import (
    ALL_OPERATIONS,
    ALLOW,
    PASSWORD_ATTRIBUTES,
    Connection,
    Disconnect,
    Plugin,
    PluginContext,
    PluginOptions,
    Request,
    Response,
    Verdict,
)

__all__ = ["Audit", "FileSink", "Sink", "encode", "is_schema_dn", "redact_dn"]

log = Logger(namespace="ldapproxy.plugins.audit")

#: ``path`` value that means standard output.
STDOUT: Final = "-"
#: The most a summary of dropped records is repeated, in seconds of clock time.
DROP_SUMMARY_INTERVAL: Final = 10.0
#: How long the writer lets records gather before writing them, in seconds.
BATCH_INTERVAL: Final = 0.02
#: How long :meth:`Audit.stop` waits for the writer to flush, in seconds of clock time.
STOP_TIMEOUT: Final = 5.0
#: Mode of a newly created audit file (before the umask): the proxy's group may read it.
FILE_MODE: Final = 0o640


# -- distinguished names ------------------------------------------------------------------------

# Attribute types that mean ``cn`` and ``dc``, so that an OID-spelled DN is still recognised.
_TYPE_ALIASES: Final = {
    "2.5.4.3": "cn",
    "commonname": "cn",
    "0.9.2342.19200300.100.1.25": "dc",
    "domaincomponent": "dc",
}
_ESCAPE: Final = re.compile(r"\\([0-9a-fA-F]{2}|.)", re.DOTALL)


def _split_dn(dn: str) -> list[str]:
    """``dn`` cut at its unescaped ``,`` and ``+``: attribute-value texts at even indexes,
    the separators at odd ones, so ``"".join()`` gives ``dn`` back."""
    parts: list[str] = []
    start = index = 0
    while index < len(dn):
        char = dn[index]
        if char == "\\":
            index += 2  # an escaped character (or the first of a hex pair) is never a separator
            continue
        if char in ",+":
            parts += [dn[start:index], char]
            start = index + 1
        index += 1
    parts.append(dn[start:])
    return parts


def _unescape(value: str) -> str:
    # One hex pair is taken as one character: exact for the ASCII names compared here.
    return _ESCAPE.sub(lambda m: chr(int(m[1], 16)) if len(m[1]) == 2 else m[1], value)


def _normal_rdns(dn: str) -> list[str]:
    """The RDNs of ``dn`` as lower-case ``type=value`` strings, spaces around ``=`` and the
    separators removed, escapes resolved and ``+``-joined attribute-value pairs sorted."""
    parts = _split_dn(dn.strip())
    rdns: list[list[str]] = [[]]
    for index, text in enumerate(parts):
        if index % 2:
            if text == ",":
                rdns.append([])
            continue
        kind, _, value = text.partition("=")
        kind = kind.strip().lower()
        rdns[-1].append(f"{_TYPE_ALIASES.get(kind, kind)}={_unescape(value.strip()).lower()}")
    return ["+".join(sorted(avas)) for avas in rdns if avas != ["="]]


def is_schema_dn(dn: str) -> bool:
    """Whether ``dn`` is a schema entry or below one: OpenLDAP's ``cn=schema,cn=config``,
    a subschema subentry (``cn=Subschema``, ``cn=schema``) or Active Directory's
    ``CN=Schema,CN=Configuration,DC=...``.  Case and spaces around ``=`` and ``,`` do not
    matter."""
    rdns = _normal_rdns(dn)
    if rdns in (["cn=subschema"], ["cn=schema"]):
        return True
    if rdns[-2:] == ["cn=schema", "cn=config"]:
        return True
    # AD: the schema naming context is CN=Schema,CN=Configuration,<forest root domain>.
    for index in range(len(rdns) - 2):
        if rdns[index : index + 2] == ["cn=schema", "cn=configuration"]:
            return all(rdn.startswith("dc=") for rdn in rdns[index + 2 :])
    return False


#: Any password attribute name anywhere in a string: the cheap pre-check of redact_dn.
_PASSWORD_NAME: Final = re.compile(
    "|".join(re.escape(name) for name in sorted(PASSWORD_ATTRIBUTES)), re.IGNORECASE
)


def redact_dn(dn: str) -> str:
    """``dn`` with the value of any password attribute (an RDN like ``userPassword=...``)
    replaced with ``***``; any other DN comes back unchanged."""
    if _PASSWORD_NAME.search(dn) is None:
        return dn  # the usual case, without splitting the DN
    parts = _split_dn(dn)
    redacted = False
    for index in range(0, len(parts), 2):
        kind, equals, _ = parts[index].partition("=")
        if equals and kind.strip().lower() in PASSWORD_ATTRIBUTES:
            parts[index] = f"{kind}=***"
            redacted = True
    return "".join(parts) if redacted else dn


# -- records: pure functions of an event and the time ------------------------------------------

# The operations whose request names an entry (``dn`` in the record), and those that change
# one (which get the ``schema`` flag).
_TARGETED: Final = frozenset({"bind", "search", "compare", "add", "modify", "delete", "modrdn"})
_CHANGES: Final = frozenset({"add", "modify", "delete", "modrdn"})


def rfc3339(seconds: float) -> str:
    """``seconds`` since the epoch as an RFC 3339 UTC time with milliseconds."""
    millis = round(seconds * 1000)
    return f"{_whole_second(millis // 1000)}.{millis % 1000:03d}Z"


@functools.lru_cache(maxsize=4)
def _whole_second(second: int) -> str:
    # Records come thousands a second: format each second once.
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def _head(event: str, connection: Connection, now: float) -> dict[str, Any]:
    return {
        "time": rfc3339(now),
        "event": event,
        "conn": connection.id,
        "client": connection.client,
        "listener": connection.listener,
        "tls": connection.tls_version,
    }


def connect_record(connection: Connection, now: float) -> dict[str, Any]:
    """The ``connect`` record of a connection just accepted."""
    return _head("connect", connection, now)


def starttls_record(connection: Connection, now: float) -> dict[str, Any]:
    """The ``starttls`` record of a connection whose TLS handshake completed."""
    record = _head("starttls", connection, now)
    record["cipher"] = connection.tls_cipher
    return record


def _operation(record: dict[str, Any], request: Request) -> dict[str, Any]:
    """Add what ``request`` says to ``record``: names and DNs, never a value."""
    bound = request.connection.bound_dn
    record["bound"] = None if bound is None else redact_dn(bound)
    record["op"] = request.op
    record["msgid"] = request.message_id
    fields = request.fields
    if fields is None:
        return record
    op = request.op
    if op in _TARGETED:
        record["dn"] = redact_dn(fields.dn)
    if op == "bind":
        _put(record, "mechanism", fields.mechanism)
    elif op == "search":
        record["base"] = record["dn"]
        _put(record, "scope", fields.scope)
        # Already redacted by the decoder: password attribute values read "***".
        _put(record, "filter", fields.filter)
        record["attrs"] = list(fields.attributes)
    elif op in ("compare", "add", "modify"):
        record["attrs"] = list(fields.attributes)
    elif op == "modrdn":
        _put(record, "new_rdn", fields.new_rdn and redact_dn(fields.new_rdn))
        _put(record, "new_superior", fields.new_superior and redact_dn(fields.new_superior))
    elif op == "extended":
        _put(record, "oid", fields.oid)
    elif op == "abandon":
        _put(record, "abandoned", fields.abandoned)
    if op in _CHANGES and (
        is_schema_dn(fields.dn) or (fields.new_superior and is_schema_dn(fields.new_superior))
    ):
        record["schema"] = True
    if fields.controls:
        record["controls"] = list(fields.controls)
    return record


def _put(record: dict[str, Any], key: str, value: object) -> None:
    if value is not None:
        record[key] = value


def request_record(request: Request, now: float) -> dict[str, Any]:
    """The ``op`` record of an Abandon or Unbind, which get no response: no ``result``."""
    return _operation(_head("op", request.connection, now), request)


def response_record(response: Response, now: float) -> dict[str, Any]:
    """The ``op`` record of a request that got its final response, or the ``reject`` record
    if a plugin denied it."""
    request = response.request
    event = "op" if response.denied_by is None else "reject"
    record = _operation(_head(event, request.connection, now), request)
    record["result"] = response.result
    if request.op == "search":
        record["entries"] = response.entries
        record["references"] = response.references
    record["duration_ms"] = round(response.duration * 1000, 3)
    if response.local:
        record["local"] = True
    if response.denied_by is not None:
        record["by"] = response.denied_by
    return record


def disconnect_record(disconnect: Disconnect, now: float) -> dict[str, Any]:
    """The ``disconnect`` record, or the ``reject`` record of a connection that a plugin
    refused at accept (whose ``connect`` was never recorded if that plugin came first)."""
    if disconnect.denied_by is not None:
        record = _head("reject", disconnect.connection, now)
        record["by"] = disconnect.denied_by
        record["reason"] = disconnect.deny_reason or disconnect.reason
        return record
    record = _head("disconnect", disconnect.connection, now)
    record["reason"] = disconnect.reason
    record["duration_ms"] = round(disconnect.duration * 1000, 3)
    record["requests"] = disconnect.requests
    return record


#: Built once: json.dumps with options builds an encoder per call.
_JSON: Final = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def encode(record: dict[str, Any]) -> bytes:
    """``record`` as one compact JSON line.  A string that is not valid Unicode (a lone
    surrogate) is written as its ``\\u`` escape rather than failing the record."""
    text = _JSON.encode(record)
    return (text + "\n").encode("utf-8", "backslashreplace")


# -- sinks ------------------------------------------------------------------------------------


class Sink(Protocol):
    """Where encoded records go.  ``put`` runs on the reactor thread and must not block."""

    def put(self, line: bytes) -> None:
        """Take one encoded record (a JSON line)."""


class _Metrics:
    """The plugin's Prometheus metrics on one registry, shared by every audit instance that
    uses it (a registry refuses a second metric of the same name)."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.dropped = Counter(
            "ldapproxy_audit_records_dropped_total",
            "Audit records lost: the buffer was full or their batch could not be written.",
            registry=registry,
        )
        self.write_errors = Counter(
            "ldapproxy_audit_write_errors_total",
            "Failed writes (or reopens) of the audit file.",
            registry=registry,
        )
        self.queue = Gauge(
            "ldapproxy_audit_queue_records",
            "Audit records waiting for the writer thread.",
            registry=registry,
        )
        # A tuple, replaced whole, so that a scrape never iterates a changing set.
        self.sinks: tuple[FileSink, ...] = ()
        self.queue.set_function(lambda: sum(sink.queued for sink in self.sinks))


_METRICS: weakref.WeakKeyDictionary[CollectorRegistry, _Metrics] = weakref.WeakKeyDictionary()


def _metrics(registry: CollectorRegistry | None) -> _Metrics:
    if registry is None:
        return _Metrics(None)
    if registry not in _METRICS:
        _METRICS[registry] = _Metrics(registry)
    return _METRICS[registry]


# A queue item asking the writer to reopen the file before the records queued after it.
_REOPEN: Final = object()


def _open_append(path: str) -> BinaryIO:
    # Unbuffered: a failed write leaves nothing in a buffer to be written (twice) later.
    return open(path, "ab", buffering=0, opener=lambda name, flags: os.open(name, flags, FILE_MODE))


class FileSink:
    """Appends encoded records to a file (or standard output) from a writer thread.

    Lifecycle: :meth:`open` opens the file (on the reactor thread; errors are raised),
    :meth:`start` starts the writer, :meth:`put` and :meth:`reopen` queue work for it, and
    :meth:`close` lets it write what is queued, close the file and end.

    The reactor thread only appends to a bounded queue: when it is full, the record is
    dropped and counted, so that a slow or hung disk costs memory up to ``capacity`` records
    and never blocks the proxy.  The writer thread takes everything queued as one batch,
    writes it and reports failures back through ``reactor.callFromThread``.
    """

    def __init__(
        self,
        path: str,
        capacity: int,
        clock: IReactorTime,
        reactor: Any,
        metrics: _Metrics,
        open_file: Callable[[str], BinaryIO] = _open_append,
    ) -> None:
        self.path = path
        self._capacity = capacity
        self._clock = clock
        self._reactor = reactor
        self._metrics = metrics
        self._open_file = open_file
        # A deque and a condition rather than a queue.Queue: the reopen marker and the stop
        # request must get through even when the records fill the queue.
        self._cond = threading.Condition()
        self._items: collections.deque[object] = collections.deque()
        #: Records queued (the reopen marker is not counted), for the capacity and the gauge.
        self.queued = 0
        self._reopen_queued = False
        self._closing = False
        self._file: BinaryIO | None = None
        self._thread: threading.Thread | None = None
        self._stopped: defer.Deferred[None] | None = None
        # -- reactor thread only --
        self._losses = _Losses(path, clock, metrics.dropped)
        #: action ("write", "reopen") -> the failure logged, until that action works again
        self._reported: dict[str, str] = {}
        # -- writer thread only --
        self._reopen_wanted = False
        self._failing: set[str] = set()  # the actions whose last attempt failed
        self._torn = False  # a failed write left a partial line in the file

    # -- reactor thread --

    def open(self) -> None:
        """Open the file for appending, creating it (mode 0640).

        :raises OSError: with a message naming ``path`` and the cause.
        """
        if self.path == STDOUT:
            self._file = sys.stdout.buffer
            return
        try:
            self._file = self._open_file(self.path)
        except OSError as error:
            raise OSError(f"cannot open path = {self.path!r}: {_describe(error)}") from None

    def start(self) -> None:
        """Start the writer thread."""
        self._metrics.sinks += (self,)
        self._thread = threading.Thread(
            target=self._run, name=f"ldapproxy audit writer ({self.path})", daemon=True
        )
        self._thread.start()

    def put(self, line: bytes) -> None:
        """Queue ``line`` for the writer, or drop it if the queue is full."""
        with self._cond:
            if self._closing:
                return
            full = self.queued >= self._capacity
            if not full:
                self._items.append(line)
                self.queued += 1
                if self.queued == 1:
                    # Only the first record of a batch wakes the writer (see _run).
                    self._cond.notify()
        if full:
            self._losses.drop(
                1,
                "audit plugin: buffer_records = {capacity} records are waiting for "
                "path = {path!r}, which is too slow or hung; dropping records",
                capacity=self._capacity,
            )

    def reopen(self) -> None:
        """Have the writer reopen the file after the records queued so far (for logrotate)."""
        if self.path == STDOUT:
            return
        with self._cond:
            if self._closing or self._reopen_queued:
                return
            self._items.append(_REOPEN)
            self._reopen_queued = True
            self._cond.notify()

    def close(self) -> defer.Deferred[None]:
        """Write what is queued, close the file and end the writer; the Deferred fires when
        done, or after :data:`STOP_TIMEOUT` seconds if the disk hangs (records still queued
        are then lost, and the writer thread is abandoned: it is a daemon)."""
        stopped: defer.Deferred[None] = defer.Deferred()
        self._stopped = stopped
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is None:
            self._finished()
        stopped.addTimeout(STOP_TIMEOUT, self._clock)
        stopped.addErrback(self._hung)
        stopped.addBoth(self._closed)
        return stopped

    def _finished(self) -> None:
        # Called from the writer's last statement: the join is immediate.
        if self._thread is not None:
            self._thread.join(1.0)
        elif self._file is not None and self.path != STDOUT:
            self._file.close()  # opened but never started
        if self._stopped is not None and not self._stopped.called:
            self._stopped.callback(None)

    def _hung(self, failure: Failure) -> Failure | None:
        if not isinstance(failure.value, defer.TimeoutError):
            return failure
        log.error(
            "audit plugin: writing path = {path!r} did not finish within {timeout:g} s; "
            "{count} queued records are lost",
            path=self.path,
            timeout=STOP_TIMEOUT,
            count=self.queued,
        )
        return None

    def _closed(self, result: object) -> object:
        self._metrics.sinks = tuple(sink for sink in self._metrics.sinks if sink is not self)
        self._losses.close()
        return result

    def _write_failed(self, action: str, reason: str, lost: int) -> None:
        self._metrics.write_errors.inc()
        if self._reported.get(action) != reason:  # once per cause, not once per batch
            self._reported[action] = reason
            consequence = (
                "still writing to the file opened before"
                if action == "reopen"
                else "records are being lost"
            )
            log.error(
                "audit plugin: cannot {action} path = {path!r}: {reason}; {consequence}",
                action=action,
                path=self.path,
                reason=reason,
                consequence=consequence,
            )
        if lost:
            self._losses.drop(lost)

    def _write_resumed(self, action: str) -> None:
        if self._reported.pop(action, None) is not None:
            message = {
                "write": "audit plugin: writing path = {path!r} works again",
                "reopen": "audit plugin: reopened path = {path!r}",
            }[action]
            log.warn(message, path=self.path)

    # -- writer thread --

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._items and not self._closing:
                        self._cond.wait()
                if not self._closing:
                    # Let the records of the next moments gather, so that a busy proxy pays
                    # for one write and one thread switch per batch, not per record.
                    time.sleep(BATCH_INTERVAL)
                with self._cond:
                    if not self._items:
                        break  # closing, and everything is written
                    items = list(self._items)
                    self._items.clear()
                    self.queued = 0
                    self._reopen_queued = False
                self._write_items(items)
        finally:
            if self._file is not None and self.path != STDOUT:
                try:
                    self._file.close()
                except OSError as error:
                    self._report("write", error, 0)
            self._reactor.callFromThread(self._finished)

    def _write_items(self, items: list[object]) -> None:
        lines: list[bytes] = []
        for item in items:
            if isinstance(item, bytes):
                lines.append(item)
            else:  # _REOPEN: the records before it still go to the file open now
                self._write_lines(lines)
                lines = []
                self._reopen_wanted = True
        self._write_lines(lines)

    def _write_lines(self, lines: list[bytes]) -> None:
        if self._reopen_wanted:
            self._try_reopen()
        if not lines:
            return
        data = b"".join(lines)
        if self._torn:
            data = b"\n" + data  # end the partial line, so that the next lines parse
        view = memoryview(data)
        written = 0
        try:
            assert self._file is not None
            while written < len(data):
                written += self._file.write(view[written:]) or 0
            self._file.flush()
        except Exception as error:  # OSError mostly; anything else must not kill the writer
            if written > 0 and data[written - 1] != ord("\n"):
                self._torn = True
            self._report("write", error, len(lines))
            return
        self._torn = False
        self._resumed("write")

    def _try_reopen(self) -> None:
        # The new file is opened before the old one is closed: if it cannot be, records keep
        # going to the old one (the rotated file) rather than being lost, and the reopen is
        # tried again before each batch.
        try:
            new = self._open_file(self.path)
        except Exception as error:
            self._report("reopen", error, 0)
            return
        old, self._file = self._file, new
        self._reopen_wanted = False
        self._torn = False
        if old is not None:
            with contextlib.suppress(OSError):  # its records are written (or reported) already
                old.close()
        self._resumed("reopen")

    def _report(self, action: str, error: Exception, lost: int) -> None:
        self._failing.add(action)
        self._reactor.callFromThread(self._write_failed, action, _describe(error), lost)

    def _resumed(self, action: str) -> None:
        if action in self._failing:
            self._failing.discard(action)
            self._reactor.callFromThread(self._write_resumed, action)


def _describe(error: Exception) -> str:
    """An exception as ``[Errno 28] No space left on device``, without the file name."""
    if isinstance(error, OSError) and error.errno is not None and error.strerror:
        return f"[Errno {error.errno}] {error.strerror}"
    return str(error) or type(error).__name__


class _Losses:
    """Counts dropped records and says so in the main log: the first drop of an episode at
    once (unless the caller said why already), then at most one summary every
    :data:`DROP_SUMMARY_INTERVAL` seconds of clock time while records keep being lost, so
    that a full disk does not flood the log.  Reactor thread only."""

    def __init__(self, path: str, clock: IReactorTime, counter: Counter) -> None:
        self._path = path
        self._clock = clock
        self._counter = counter
        self._pending = 0
        self._timer: IDelayedCall | None = None
        self._since = 0.0  # when the drops that _pending counts began
        self._closed = False

    def drop(self, count: int, announce: str | None = None, **fields: object) -> None:
        """Count ``count`` lost records; log ``announce`` if this starts an episode."""
        self._counter.inc(count)
        self._pending += count
        if self._timer is None and not self._closed:
            self._since = self._clock.seconds()
            if announce is not None:
                log.error(announce, path=self._path, **fields)
            self._timer = self._clock.callLater(DROP_SUMMARY_INTERVAL, self._summary)

    def _summary(self) -> None:
        self._timer = None
        if self._pending:
            self._say()
            self._timer = self._clock.callLater(DROP_SUMMARY_INTERVAL, self._summary)

    def _say(self) -> None:
        log.error(
            "audit plugin: dropped {count} records for path = {path!r} in the last {elapsed:.0f} s",
            count=self._pending,
            path=self._path,
            elapsed=self._clock.seconds() - self._since,
        )
        self._pending = 0
        self._since = self._clock.seconds()

    def close(self) -> None:
        """Stop summarising; say what was dropped since the last summary."""
        self._closed = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._pending:
            self._say()


# -- the plugin ---------------------------------------------------------------------------------


class Audit(Plugin):
    """Writes an audit trail: a JSON line for every connect, StartTLS, operation and
    disconnect.

    Lifecycle: :meth:`from_config` reads ``path`` and ``buffer_records``; :meth:`start`
    opens the file (a startup error names the path) and starts the writer thread; the hooks
    build each record on the reactor thread and queue it; :meth:`reopen` (SIGHUP) has the
    writer reopen the file after the records queued so far; :meth:`stop` writes what is
    queued and closes the file, giving up after :data:`STOP_TIMEOUT` seconds.

    The decision hooks always allow: an audit problem is logged and counted, never a reason
    to refuse service.
    """

    options: ClassVar[Mapping[str, str]] = {"path": "required", "buffer_records": "10000"}
    request_fields: ClassVar[frozenset[str]] = ALL_OPERATIONS

    def __init__(
        self, path: str, buffer_records: int, context: PluginContext, sink: Sink | None = None
    ) -> None:
        """``sink`` replaces the file (tests): :meth:`start` and :meth:`stop` then do nothing."""
        self.path = path
        self.buffer_records = buffer_records
        self._context = context
        self._clock = context.clock
        self._sink: Sink | None = sink
        self._file: FileSink | None = None

    @classmethod
    def from_config(cls, options: PluginOptions, context: PluginContext) -> Audit:
        """Read ``path`` (``"-"`` for standard output) and ``buffer_records``."""
        path = options.string("path")
        if path != STDOUT:
            path = str(options.path("path"))
        buffer_records = options.integer("buffer_records", 10000, minimum=1)
        options.finish()
        return cls(path, buffer_records, context)

    def start(self) -> None:
        """Open the file and start the writer thread."""
        if self._sink is not None:
            return
        sink = FileSink(
            self.path,
            self.buffer_records,
            self._clock,
            self._context.reactor,
            _metrics(self._context.registry),
        )
        sink.open()
        sink.start()
        self._sink = self._file = sink

    def reopen(self) -> None:
        """SIGHUP: records queued from now on go to a newly opened ``path``."""
        if self._file is not None:
            self._file.reopen()

    def stop(self) -> defer.Deferred[None] | None:
        """Write what is queued and close the file."""
        if self._file is None:
            return None
        sink, self._file = self._file, None
        return sink.close()

    def _emit(self, build: Callable[[Any, float], dict[str, Any]], event: Any) -> None:
        if self._sink is None:
            return  # not started, or stopped
        try:
            line = encode(build(event, self._clock.seconds()))
        except Exception:
            # A bug here must not deny (the decision hooks fail closed) nor stop auditing.
            log.failure("audit plugin: cannot build the record of {event!r}", event=event)
            return
        self._sink.put(line)

    def connection_accepted(self, connection: Connection) -> Verdict:
        """Record ``connect``; allow."""
        self._emit(connect_record, connection)
        return ALLOW

    def request(self, request: Request) -> Verdict:
        """Record Abandon and Unbind, which get no response; allow."""
        if request.op in ("abandon", "unbind"):
            self._emit(request_record, request)
        return ALLOW

    def tls_started(self, connection: Connection) -> None:
        """Record ``starttls``."""
        self._emit(starttls_record, connection)

    def response(self, response: Response) -> None:
        """Record ``op`` (or ``reject`` for a request a plugin denied)."""
        self._emit(response_record, response)

    def disconnected(self, disconnect: Disconnect) -> None:
        """Record ``disconnect`` (or ``reject`` for a connection refused at accept)."""
        self._emit(disconnect_record, disconnect)
