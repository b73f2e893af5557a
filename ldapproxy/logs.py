"""The main log: one line per event on stderr, for journald and for people, as text or
as JSON (``log.format``), from ``log.level`` up."""

from __future__ import annotations

import json
import time
from typing import IO, Any

from twisted.logger import (
    FilteringLogObserver,
    ILogFilterPredicate,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    PredicateResult,
    formatEvent,
    globalLogBeginner,
)
from zope.interface import implementer


@implementer(ILogObserver)
class LineObserver:
    """Writes each event as ``TIME LEVEL NAMESPACE: MESSAGE`` on one line."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def __call__(self, event: dict[str, Any]) -> None:
        text = formatEvent(event)
        failure = event.get("log_failure")
        if failure is not None:
            text = f"{text}: {failure.type.__name__}: {failure.getErrorMessage()}"
        text = text.replace("\n", " | ")
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(event.get("log_time", time.time())))
        level = event.get("log_level", LogLevel.info).name
        namespace = event.get("log_namespace", "-")
        self._stream.write(f"{stamp}Z {level} {namespace}: {text}\n")
        self._stream.flush()


@implementer(ILogObserver)
class JSONLineObserver:
    """Writes each event as one JSON object per line: ``time``, ``level``, ``logger``,
    ``message``, and ``error`` when the event carries a failure."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def __call__(self, event: dict[str, Any]) -> None:
        when = event.get("log_time", time.time())
        record: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when))
            + f".{int(when * 1000) % 1000:03d}Z",
            "level": event.get("log_level", LogLevel.info).name,
            "logger": event.get("log_namespace", "-"),
            "message": formatEvent(event),
        }
        failure = event.get("log_failure")
        if failure is not None:
            record["error"] = f"{failure.type.__name__}: {failure.getErrorMessage()}"
        self._stream.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        self._stream.flush()


@implementer(ILogFilterPredicate)
def _quiet_libraries(event: dict[str, Any]) -> Any:
    """Drop other libraries' chatter ("Starting factory ...") below warn."""
    if event.get("log_level", LogLevel.info) >= LogLevel.warn:
        return PredicateResult.maybe
    if str(event.get("log_namespace", "")).startswith("ldapproxy"):
        return PredicateResult.maybe
    return PredicateResult.no


def start_logging(
    stream: IO[str], level: LogLevel = LogLevel.info, format: str = "text"
) -> LogLevelFilterPredicate:
    """Send Twisted's global log to ``stream`` as ``format`` (text or json), dropping
    events below ``level``; the returned predicate changes the level later (reload)."""
    predicate = LogLevelFilterPredicate(defaultLogLevel=level)
    writer = JSONLineObserver(stream) if format == "json" else LineObserver(stream)
    observer = FilteringLogObserver(writer, [predicate, _quiet_libraries])
    globalLogBeginner.beginLoggingTo([observer], discardBuffer=True, redirectStandardIO=False)
    return predicate
