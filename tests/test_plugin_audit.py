"""The audit plugin: record shapes, the schema flag, password hygiene, and the writer thread
with real files, full disks, hung disks and logrotate."""

from __future__ import annotations

import json
import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import pytest
from prometheus_client import CollectorRegistry
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher

from ldapproxy import testing
from ldapproxy.hooks import ALLOW, Plugin, PluginConfigError, RequestFields
from ldapproxy.plugins import audit
from ldapproxy.plugins.audit import Audit, FileSink, is_schema_dn, redact_dn

#: 2026-11-29T07:28:29.123Z, the clock time of every record in the record table.
NOW = 1795937309.123
NOW_TEXT = "2026-11-29T07:28:29.123Z"
SECRET = "S3cret-Pa55word!"
DROPPED = "ldapproxy_audit_records_dropped_total"
WRITE_ERRORS = "ldapproxy_audit_write_errors_total"
QUEUED = "ldapproxy_audit_queue_records"


# -- test doubles -------------------------------------------------------------------------------


class FakeReactor:
    """Stands in for the reactor's ``callFromThread``: calls are queued, and the test runs
    them on its own thread with :meth:`run_until`."""

    def __init__(self) -> None:
        self.calls: queue.SimpleQueue[tuple[Callable[..., Any], tuple[Any, ...]]] = (
            queue.SimpleQueue()
        )

    def callFromThread(self, function: Callable[..., Any], *args: Any) -> None:
        """Queue ``function(*args)`` for the test thread."""
        self.calls.put((function, args))

    def run_until(
        self,
        done: Callable[[], object],
        meanwhile: Callable[[], object] = lambda: None,
        timeout: float = 10.0,
    ) -> None:
        """Run queued calls (and ``meanwhile``) until ``done()`` is true."""
        deadline = time.monotonic() + timeout
        while True:
            meanwhile()
            while True:
                try:
                    function, args = self.calls.get_nowait()
                except queue.Empty:
                    break
                function(*args)
            if done():
                return
            if time.monotonic() > deadline:
                raise AssertionError("timed out waiting for the writer thread")
            try:
                function, args = self.calls.get(timeout=0.01)
            except queue.Empty:
                continue
            function(*args)


class MemorySink:
    """A synchronous sink that keeps the encoded lines."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []

    def put(self, line: bytes) -> None:
        """Keep ``line``."""
        self.lines.append(line)

    def records(self) -> list[dict[str, Any]]:
        """The lines, parsed."""
        return [json.loads(line) for line in self.lines]


class Harness:
    """A file-backed audit plugin on a :class:`Clock`, a fake reactor and a fresh registry."""

    def __init__(self, path: Path | str, **raw: Any) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.reactor = FakeReactor()
        self.registry = CollectorRegistry()
        self.context = testing.context(
            clock=self.clock, reactor=self.reactor, registry=self.registry
        )
        self.path = path
        self.plugin = Audit.from_config(testing.options({"path": str(path), **raw}), self.context)

    def start(self) -> Harness:
        """Start the plugin (opens the file, starts the writer)."""
        self.plugin.start()
        return self

    def stop(self, meanwhile: Callable[[], object] = lambda: None) -> None:
        """Stop the plugin and wait until everything queued is written."""
        results: list[object] = []
        stopped = self.plugin.stop()
        assert isinstance(stopped, defer.Deferred)
        stopped.addBoth(results.append)
        self.reactor.run_until(lambda: results, meanwhile)
        assert results == [None]

    def sample(self, name: str) -> float:
        """The value of the metric sample ``name``."""
        value = self.registry.get_sample_value(name)
        assert value is not None, name
        return float(value)

    def connect(self, id: int = 1) -> None:
        """Send a connect event."""
        assert self.plugin.connection_accepted(testing.connection(id=id)) is ALLOW

    def op(self, count: int = 1) -> None:
        """Send ``count`` search responses."""
        for index in range(count):
            request = testing.request("search", RequestFields(dn="dc=example,dc=com"), index + 1)
            self.plugin.response(testing.response(request))

    def records(self, path: Path | None = None) -> list[dict[str, Any]]:
        """The records in ``path`` (the configured file by default)."""
        text = Path(path or self.path).read_text(encoding="utf-8")
        assert text == "" or text.endswith("\n")
        return [json.loads(line) for line in text.splitlines()]


@pytest.fixture(autouse=True)
def no_leaked_writers() -> Iterator[None]:
    """Every test ends with the writer threads it started gone."""
    before = set(threading.enumerate())
    yield
    assert writers(before) == []


def writers(before: set[threading.Thread]) -> list[threading.Thread]:
    """The audit writer threads alive now that were not in ``before``."""
    return [
        t
        for t in threading.enumerate()
        if t.name.startswith("ldapproxy audit writer") and t not in before
    ]


@pytest.fixture
def logged() -> Iterator[list[dict[str, Any]]]:
    """The Twisted log events emitted during the test."""
    events: list[dict[str, Any]] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(observer)


def audit_lines(events: list[dict[str, Any]], level: LogLevel = LogLevel.error) -> list[str]:
    """The audit plugin's log lines at ``level``, formatted."""
    return [
        formatEvent(event)
        for event in events
        if event.get("log_namespace") == "ldapproxy.plugins.audit"
        and event.get("log_level") == level
    ]


@contextmanager
def full_fifo(tmp_path: Path) -> Iterator[tuple[Path, Callable[[], bytes]]]:
    """A FIFO whose pipe is already full, so a blocking writer hangs until the test reads;
    yields its path and a function that reads what is available."""
    path = tmp_path / "audit.fifo"
    os.mkfifo(path)
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    filler = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    for chunk in (b"\n" * 4096, b"\n"):
        try:
            while True:
                os.write(filler, chunk)
        except BlockingIOError:
            pass

    def drain() -> bytes:
        data = b""
        while True:
            try:
                part = os.read(reader, 65536)
            except BlockingIOError:
                return data
            if not part:
                return data
            data += part

    try:
        # The filler stays open until the writer has opened its end, which keeps the FIFO
        # from reading as end-of-file.
        yield path, drain
    finally:
        os.close(filler)
        os.close(reader)


def memory_plugin() -> tuple[Audit, MemorySink]:
    """An audit plugin on an in-memory sink, at :data:`NOW`."""
    clock = Clock()
    clock.advance(NOW)
    sink = MemorySink()
    return Audit("-", 10, testing.context(clock=clock), sink=sink), sink


# -- distinguished names ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dn", "expected"),
    [
        ("cn=schema,cn=config", True),
        ("cn={0}core,cn=schema,cn=config", True),
        ("olcObjectClasses={1}foo,cn={4}custom,cn=schema,cn=config", True),
        ("CN=Schema,CN=Config", True),
        ("cn = schema , cn= config", True),
        ("  cn=schema,cn=config  ", True),
        (r"cn=sch\65ma,cn=config", True),
        ("2.5.4.3=schema,2.5.4.3=config", True),
        ("cn=Subschema", True),
        ("CN=SUBSCHEMA", True),
        ("cn=schema", True),
        ("CN=Schema,CN=Configuration,DC=example,DC=com", True),
        ("cn=schema, cn=configuration, dc=corp", True),
        ("CN=Person,CN=Schema,CN=Configuration,DC=example,DC=com", True),
        ("CN=Aggregate,CN=Schema,CN=Configuration,DC=ad,DC=example,DC=com", True),
        ("", False),
        ("cn=config", False),
        ("olcDatabase={1}mdb,cn=config", False),
        ("cn=schemaadmin,dc=example,dc=com", False),
        ("ou=schema,dc=x", False),
        ("cn=schema,dc=example,dc=com", False),
        ("cn=subschema,dc=example,dc=com", False),
        ("cn=schema,cn=config,dc=example,dc=com", False),
        ("cn=schema+uid=x,cn=config", False),
        (r"cn=schema\,cn=config,dc=x", False),
        ("CN=Configuration,DC=example,DC=com", False),
        ("CN=Schema,CN=Configuration,O=example", False),
        ("CN=Schema,CN=Configuration", False),
        ("uid=schema,ou=people,dc=example,dc=com", False),
    ],
)
def test_is_schema_dn(dn: str, expected: bool) -> None:
    """Schema entries are recognised whatever their case and spacing, and nothing else is."""
    assert is_schema_dn(dn) is expected


@pytest.mark.parametrize(
    ("dn", "expected"),
    [
        ("uid=alice,dc=example,dc=com", "uid=alice,dc=example,dc=com"),
        (f"userPassword={SECRET},dc=x", "userPassword=***,dc=x"),
        (f"cn=a+ unicodePwd = {SECRET},dc=x", "cn=a+ unicodePwd =***,dc=x"),
        (f"2.5.4.35={SECRET},dc=x", "2.5.4.35=***,dc=x"),
        (r"cn=a\,userPassword=b,dc=x", r"cn=a\,userPassword=b,dc=x"),
        ("", ""),
    ],
)
def test_redact_dn(dn: str, expected: str) -> None:
    """A password attribute's value in an RDN is replaced, and other DNs are left alone."""
    assert redact_dn(dn) == expected


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (0.0, "1970-01-01T00:00:00.000Z"),
        (NOW, NOW_TEXT),
        (1795937309.9996, "2026-11-29T07:28:30.000Z"),
    ],
)
def test_rfc3339(seconds: float, expected: str) -> None:
    """Times are UTC with milliseconds."""
    assert audit.rfc3339(seconds) == expected


# -- records --------------------------------------------------------------------------------

PLAIN = testing.connection(client_host="192.0.2.7", client_port=40001, id=7, listener="ldap")
BOUND = "uid=alice,ou=people,dc=example,dc=com"
TLS = testing.connection(
    client_host="2001:db8::5",
    client_port=40002,
    id=8,
    listener="ldaps",
    tls_version="TLSv1.3",
    tls_cipher="TLS_AES_256_GCM_SHA384",
    bound_dn=BOUND,
)


def req(op: str, fields: RequestFields | None, connection: Any = TLS, msgid: int = 3) -> Any:
    """A request on ``connection``."""
    return testing.request(op, fields, msgid, connection=connection)


def plain(event: str, **tail: Any) -> dict[str, Any]:
    """An expected record on the plain connection."""
    head = {"conn": 7, "client": "192.0.2.7:40001", "listener": "ldap", "tls": None}
    return {"time": NOW_TEXT, "event": event, **head, **tail}


def tls(event: str, **tail: Any) -> dict[str, Any]:
    """An expected record on the TLS connection."""
    head = {"conn": 8, "client": "[2001:db8::5]:40002", "listener": "ldaps", "tls": "TLSv1.3"}
    return {"time": NOW_TEXT, "event": event, **head, **tail}


def tls_op(event: str = "op", **tail: Any) -> dict[str, Any]:
    """An expected operation record on the TLS connection, bound as alice."""
    return tls(event, bound=BOUND, **tail)


RECORD_CASES: list[tuple[str, str, Any, dict[str, Any]]] = [
    ("connect", "connection_accepted", PLAIN, plain("connect")),
    ("starttls", "tls_started", TLS, tls("starttls", cipher="TLS_AES_256_GCM_SHA384")),
    (
        "simple bind",
        "response",
        testing.response(
            req("bind", RequestFields(dn=BOUND, mechanism="simple"), PLAIN, 1), duration=0.0123456
        ),
        plain(
            "op",
            bound=None,
            op="bind",
            msgid=1,
            dn=BOUND,
            mechanism="simple",
            result=0,
            duration_ms=12.346,
        ),
    ),
    (
        "failed sasl bind",
        "response",
        testing.response(req("bind", RequestFields(mechanism="GSSAPI")), result=49),
        tls_op(op="bind", msgid=3, dn="", mechanism="GSSAPI", result=49, duration_ms=1.0),
    ),
    (
        "search",
        "response",
        testing.response(
            req(
                "search",
                RequestFields(
                    dn="ou=people,dc=example,dc=com",
                    scope="sub",
                    filter="(&(uid=bob)(userPassword=***))",
                    attributes=("cn", "mail"),
                    controls=("1.2.840.113556.1.4.319",),
                ),
            ),
            entries=2,
            references=1,
            duration=0.5,
        ),
        tls_op(
            op="search",
            msgid=3,
            dn="ou=people,dc=example,dc=com",
            base="ou=people,dc=example,dc=com",
            scope="sub",
            filter="(&(uid=bob)(userPassword=***))",
            attrs=["cn", "mail"],
            controls=["1.2.840.113556.1.4.319"],
            result=0,
            entries=2,
            references=1,
            duration_ms=500.0,
        ),
    ),
    (
        "compare",
        "response",
        testing.response(
            req("compare", RequestFields(dn=BOUND, attributes=("userPassword",))), result=6
        ),
        tls_op(op="compare", msgid=3, dn=BOUND, attrs=["userPassword"], result=6, duration_ms=1.0),
    ),
    (
        "add",
        "response",
        testing.response(
            req("add", RequestFields(dn="uid=bob,dc=example,dc=com", attributes=("cn", "sn")))
        ),
        tls_op(
            op="add",
            msgid=3,
            dn="uid=bob,dc=example,dc=com",
            attrs=["cn", "sn"],
            result=0,
            duration_ms=1.0,
        ),
    ),
    (
        "add to the OpenLDAP schema",
        "response",
        testing.response(
            req(
                "add",
                RequestFields(
                    dn="cn=custom,cn=schema,cn=config",
                    attributes=("objectClass", "olcAttributeTypes"),
                ),
            )
        ),
        tls_op(
            op="add",
            msgid=3,
            dn="cn=custom,cn=schema,cn=config",
            attrs=["objectClass", "olcAttributeTypes"],
            schema=True,
            result=0,
            duration_ms=1.0,
        ),
    ),
    (
        "modify",
        "response",
        testing.response(req("modify", RequestFields(dn=BOUND, attributes=("userPassword",)))),
        tls_op(op="modify", msgid=3, dn=BOUND, attrs=["userPassword"], result=0, duration_ms=1.0),
    ),
    (
        "modify of the AD schema",
        "response",
        testing.response(
            req(
                "modify",
                RequestFields(
                    dn="CN=Schema, CN=Configuration, DC=corp, DC=example",
                    attributes=("schemaUpdateNow",),
                ),
            ),
            result=50,
        ),
        tls_op(
            op="modify",
            msgid=3,
            dn="CN=Schema, CN=Configuration, DC=corp, DC=example",
            attrs=["schemaUpdateNow"],
            schema=True,
            result=50,
            duration_ms=1.0,
        ),
    ),
    (
        "delete",
        "response",
        testing.response(req("delete", RequestFields(dn="uid=bob,dc=example,dc=com")), result=32),
        tls_op(op="delete", msgid=3, dn="uid=bob,dc=example,dc=com", result=32, duration_ms=1.0),
    ),
    (
        "delete in the schema",
        "response",
        testing.response(req("delete", RequestFields(dn="cn={5}old, cn=schema, cn=config"))),
        tls_op(
            op="delete",
            msgid=3,
            dn="cn={5}old, cn=schema, cn=config",
            schema=True,
            result=0,
            duration_ms=1.0,
        ),
    ),
    (
        "modrdn into the schema",
        "response",
        testing.response(
            req(
                "modrdn",
                RequestFields(
                    dn="cn=x,dc=example,dc=com",
                    new_rdn="cn=y",
                    new_superior="cn=schema,cn=config",
                ),
            )
        ),
        tls_op(
            op="modrdn",
            msgid=3,
            dn="cn=x,dc=example,dc=com",
            new_rdn="cn=y",
            new_superior="cn=schema,cn=config",
            schema=True,
            result=0,
            duration_ms=1.0,
        ),
    ),
    (
        "modrdn without a new superior",
        "response",
        testing.response(req("modrdn", RequestFields(dn="cn=x,dc=example,dc=com", new_rdn="cn=y"))),
        tls_op(
            op="modrdn",
            msgid=3,
            dn="cn=x,dc=example,dc=com",
            new_rdn="cn=y",
            result=0,
            duration_ms=1.0,
        ),
    ),
    (
        "search of the schema is no change",
        "response",
        testing.response(req("search", RequestFields(dn="cn=Subschema", scope="base"))),
        tls_op(
            op="search",
            msgid=3,
            dn="cn=Subschema",
            base="cn=Subschema",
            scope="base",
            attrs=[],
            result=0,
            entries=0,
            references=0,
            duration_ms=1.0,
        ),
    ),
    (
        "extended",
        "response",
        testing.response(req("extended", RequestFields(oid="1.3.6.1.4.1.4203.1.11.3"))),
        tls_op(op="extended", msgid=3, oid="1.3.6.1.4.1.4203.1.11.3", result=0, duration_ms=1.0),
    ),
    (
        "undecoded",
        "response",
        testing.response(req("delete", None), result=-1),
        tls_op(op="delete", msgid=3, result=-1, duration_ms=1.0),
    ),
    (
        "local answer",
        "response",
        testing.response(
            req("bind", RequestFields(dn=BOUND, mechanism="simple"), PLAIN, 2),
            result=13,
            local=True,
        ),
        plain(
            "op",
            bound=None,
            op="bind",
            msgid=2,
            dn=BOUND,
            mechanism="simple",
            result=13,
            duration_ms=1.0,
            local=True,
        ),
    ),
    (
        "request denied by a plugin",
        "response",
        testing.response(
            req("delete", RequestFields(dn="cn=admin,dc=example,dc=com")),
            result=50,
            denied_by="allowlist",
            local=True,
        ),
        tls_op(
            "reject",
            op="delete",
            msgid=3,
            dn="cn=admin,dc=example,dc=com",
            result=50,
            duration_ms=1.0,
            local=True,
            by="allowlist",
        ),
    ),
    (
        "abandon",
        "request",
        req("abandon", RequestFields(abandoned=2), msgid=4),
        tls_op(op="abandon", msgid=4, abandoned=2),
    ),
    ("unbind", "request", req("unbind", RequestFields(), msgid=5), tls_op(op="unbind", msgid=5)),
    (
        "disconnect",
        "disconnected",
        testing.disconnect(TLS, reason="idle timeout", duration=61.5, requests=12),
        tls("disconnect", reason="idle timeout", duration_ms=61500.0, requests=12),
    ),
    (
        "connection refused at accept",
        "disconnected",
        testing.disconnect(
            PLAIN,
            reason="denied by allowlist",
            duration=0.0,
            requests=0,
            denied_by="allowlist",
            deny_reason="network",
        ),
        plain("reject", by="allowlist", reason="network"),
    ),
]


@pytest.mark.parametrize(
    ("hook", "event", "expected"),
    [case[1:] for case in RECORD_CASES],
    ids=[case[0] for case in RECORD_CASES],
)
def test_record(hook: str, event: Any, expected: dict[str, Any]) -> None:
    """Each event gives exactly one record with exactly these fields, in this order."""
    plugin, sink = memory_plugin()
    result = getattr(plugin, hook)(event)
    assert result is (ALLOW if hook in ("connection_accepted", "request") else None)
    assert sink.records() == [expected]
    assert list(sink.records()[0]) == list(expected)
    assert sink.lines[0] == json.dumps(expected, separators=(",", ":")).encode() + b"\n"


@pytest.mark.parametrize("op", ["bind", "search", "compare", "add", "modify", "delete", "modrdn"])
def test_requests_that_get_a_response_are_recorded_only_then(op: str) -> None:
    """The request hook allows without a record; the response hook writes it."""
    plugin, sink = memory_plugin()
    assert plugin.request(req(op, RequestFields(dn="dc=x"))) is ALLOW
    assert sink.lines == []


def test_denied_connection_after_audit_gets_connect_and_reject() -> None:
    """A connection a later plugin refuses at accept gets a connect and a reject record."""
    plugin, sink = memory_plugin()
    plugin.connection_accepted(PLAIN)
    plugin.disconnected(testing.disconnect(PLAIN, denied_by="ratelimit", deny_reason=""))
    assert [(r["event"], r.get("reason")) for r in sink.records()] == [
        ("connect", None),
        ("reject", "client unbind"),
    ]


def test_record_is_one_utf8_line() -> None:
    """Non-ASCII stays readable UTF-8, newlines are escaped, and a lone surrogate is escaped
    instead of failing the record."""
    plugin, sink = memory_plugin()
    dn = "cn=Zoë\nStraße,dc=example,dc=com"
    plugin.response(testing.response(req("delete", RequestFields(dn=dn))))
    plugin.response(testing.response(req("delete", RequestFields(dn="cn=\udcff,dc=x"))))
    assert sink.lines[0].count(b"\n") == 1
    assert "Zoë\\nStraße".encode() in sink.lines[0]
    assert sink.records()[0]["dn"] == dn
    assert b'"dn":"cn=\\udcff,dc=x"' in sink.lines[1]
    assert json.loads(sink.lines[1])["dn"] == "cn=\udcff,dc=x"


def test_a_failing_record_never_denies(logged: list[dict[str, Any]]) -> None:
    """If building a record fails, the decision hooks still allow and the error is logged."""
    plugin, sink = memory_plugin()
    broken = testing.connection(id=object())  # type: ignore[arg-type]
    assert plugin.connection_accepted(broken) is ALLOW
    assert sink.lines == []
    assert any("cannot build the record" in formatEvent(e) for e in logged)


def test_plugin_asks_for_every_operation_fields() -> None:
    """The plugin asks for the decoded fields of every operation."""
    from ldapproxy.hooks import ALL_OPERATIONS

    assert Audit.request_fields == ALL_OPERATIONS


def test_password_never_written(tmp_path: Path) -> None:
    """A password given anywhere the decoder could hand it over never reaches the file."""
    harness = Harness(tmp_path / "audit.jsonl").start()
    plugin = harness.plugin
    bind = req("bind", RequestFields(dn=BOUND, mechanism="simple"), PLAIN)
    plugin.response(testing.response(bind, result=49))
    plugin.response(
        testing.response(req("modify", RequestFields(dn=BOUND, attributes=("userPassword",))))
    )
    plugin.response(
        testing.response(
            req("add", RequestFields(dn="uid=c,dc=x", attributes=("uid", "userPassword")))
        )
    )
    plugin.response(
        testing.response(
            req("search", RequestFields(dn="dc=x", scope="sub", filter="(userPassword=***)"))
        )
    )
    plugin.response(testing.response(req("extended", RequestFields(oid="1.3.6.1.4.1.4203.1.11.1"))))
    plugin.response(
        testing.response(req("compare", RequestFields(dn=BOUND, attributes=("userPassword",))))
    )
    # A password typed where a DN goes (by mistake, or to smuggle it into the logs).
    sneaky = f"userPassword={SECRET},ou=people,dc=example,dc=com"
    plugin.response(testing.response(req("search", RequestFields(dn=sneaky, scope="base"))))
    plugin.response(
        testing.response(
            req(
                "modrdn",
                RequestFields(dn=BOUND, new_rdn=f"unicodePwd={SECRET}", new_superior=sneaky),
            )
        )
    )
    leaky = testing.connection(bound_dn=f"2.5.4.35={SECRET},dc=x")
    plugin.response(testing.response(req("delete", RequestFields(dn=sneaky), leaky)))
    harness.stop()
    text = (tmp_path / "audit.jsonl").read_text(encoding="utf-8")
    assert len(text.splitlines()) == 9
    assert SECRET not in text
    assert "userPassword" in text  # the attribute names are there, only values are not


# -- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({}, "path is required"),
        ({"path": ""}, "path = '': expected a file name"),
        ({"path": 3}, "path = 3: expected a string"),
        ({"path": ["a"]}, "path = ['a']: expected a string"),
        ({"path": "a", "buffer_records": 0}, "buffer_records = 0: expected an integer"),
        ({"path": "a", "buffer_records": -5}, "buffer_records = -5: expected an integer"),
        ({"path": "a", "buffer_records": "10"}, "buffer_records = '10': expected an integer"),
        ({"path": "a", "buffer_records": 1.5}, "buffer_records = 1.5: expected an integer"),
        ({"path": "a", "buffer_records": True}, "buffer_records = True: expected an integer"),
        ({"path": "a", "pth": "b"}, "unknown key 'pth'; expected one of: buffer_records, path"),
    ],
)
def test_config_errors(raw: dict[str, Any], message: str) -> None:
    """Bad tables are refused with a message that names the key."""
    with pytest.raises(PluginConfigError) as caught:
        Audit.from_config(testing.options(raw), testing.context())
    assert str(caught.value).startswith(message)


def test_config_values(tmp_path: Path) -> None:
    """Relative paths resolve against the configuration directory; ``-`` stays ``-``; the
    documented defaults are the ones used."""
    context = testing.context()
    relative = Audit.from_config(testing.options({"path": "log/a.jsonl"}, tmp_path), context)
    assert relative.path == str(tmp_path / "log" / "a.jsonl")
    assert relative.buffer_records == int(Audit.options["buffer_records"]) == 10000
    stdout = Audit.from_config(testing.options({"path": "-", "buffer_records": 1}), context)
    assert (stdout.path, stdout.buffer_records) == ("-", 1)
    assert set(Audit.options) == {"path", "buffer_records"}
    assert Audit.options["path"] == "required"


def test_from_config_has_no_side_effects(tmp_path: Path) -> None:
    """Building the plugin creates no file, no thread and no metric."""
    harness = Harness(tmp_path / "audit.jsonl")
    assert not (tmp_path / "audit.jsonl").exists()
    assert harness.registry.get_sample_value(DROPPED) is None
    # Events before start are ignored rather than failing.
    assert harness.plugin.connection_accepted(PLAIN) is ALLOW
    assert harness.plugin.stop() is None


@pytest.mark.parametrize(
    ("where", "cause"),
    [("directory", "Is a directory"), ("missing/audit.jsonl", "No such file or directory")],
)
def test_start_fails_on_unopenable_path(tmp_path: Path, where: str, cause: str) -> None:
    """start() raises one line naming the key, the path and the OS error."""
    (tmp_path / "directory").mkdir()
    path = tmp_path / where
    harness = Harness(path)
    with pytest.raises(OSError, match="cannot open") as caught:
        harness.start()
    assert f"path = {str(path)!r}" in str(caught.value)
    assert cause in str(caught.value)
    assert "\n" not in str(caught.value)


# -- the file -----------------------------------------------------------------------------------


def test_records_land_in_the_file(tmp_path: Path) -> None:
    """Every record is a JSON line in the file, in order, once stop() has fired."""
    path = tmp_path / "audit.jsonl"
    harness = Harness(path).start()
    assert stat.S_IMODE(path.stat().st_mode) & ~0o640 == 0
    harness.connect(1)
    harness.op(500)
    harness.plugin.disconnected(testing.disconnect(testing.connection(id=1)))
    harness.stop()
    records = harness.records()
    assert [r["event"] for r in records] == ["connect"] + ["op"] * 500 + ["disconnect"]
    assert [r["msgid"] for r in records[1:-1]] == list(range(1, 501))
    assert harness.sample(DROPPED) == 0
    assert harness.sample(WRITE_ERRORS) == 0
    assert harness.sample(QUEUED) == 0


def test_existing_file_is_appended_to(tmp_path: Path) -> None:
    """Starting again appends to what is there."""
    path = tmp_path / "audit.jsonl"
    path.write_text('{"event":"earlier"}\n')
    harness = Harness(path).start()
    harness.connect()
    harness.stop()
    assert [r["event"] for r in harness.records()] == ["earlier", "connect"]


def test_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    """``path = "-"`` writes the records to standard output, and reopen does nothing."""
    harness = Harness("-").start()
    harness.connect()
    harness.plugin.reopen()
    harness.op()
    harness.stop()
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["event"] for line in lines] == ["connect", "op"]


def test_reopen_after_rename(tmp_path: Path) -> None:
    """After logrotate renames the file and sends SIGHUP, new records go to a new file and
    the earlier ones stay in the renamed one."""
    path = tmp_path / "audit.jsonl"
    harness = Harness(path).start()
    harness.connect(1)
    harness.op(3)
    path.rename(tmp_path / "audit.jsonl.1")
    harness.plugin.reopen()
    harness.plugin.reopen()  # a second SIGHUP before the writer got to the first
    harness.connect(2)
    harness.stop()
    old = harness.records(tmp_path / "audit.jsonl.1")
    assert [(r["event"], r["conn"]) for r in old] == [("connect", 1)] + [("op", 1)] * 3
    assert [(r["event"], r["conn"]) for r in harness.records()] == [("connect", 2)]


def test_failed_reopen_keeps_writing_to_the_old_file(
    tmp_path: Path, logged: list[dict[str, Any]]
) -> None:
    """A reopen that fails is logged and counted, records keep going to the file open
    before, and the reopen is retried with the next records."""
    logs = tmp_path / "logs"
    logs.mkdir()
    harness = Harness(logs / "audit.jsonl").start()
    harness.connect(1)
    logs.rename(tmp_path / "old")
    harness.plugin.reopen()
    harness.connect(2)
    harness.reactor.run_until(lambda: audit_lines(logged))
    assert audit_lines(logged) == [
        f"audit plugin: cannot reopen path = {str(logs / 'audit.jsonl')!r}: "
        "[Errno 2] No such file or directory; still writing to the file opened before"
    ]
    assert harness.sample(WRITE_ERRORS) >= 1
    old_file = tmp_path / "old" / "audit.jsonl"
    harness.reactor.run_until(lambda: len(old_file.read_text().splitlines()) == 2)
    logs.mkdir()
    harness.connect(3)
    harness.reactor.run_until(lambda: audit_lines(logged, LogLevel.warn))
    assert audit_lines(logged, LogLevel.warn) == [
        f"audit plugin: reopened path = {str(logs / 'audit.jsonl')!r}"
    ]
    harness.stop()
    assert [r["conn"] for r in harness.records(old_file)] == [1, 2]
    assert [r["conn"] for r in harness.records()] == [3]
    assert harness.sample(DROPPED) == 0


def test_full_disk(logged: list[dict[str, Any]]) -> None:
    """On /dev/full every batch fails: one error line names the key, the path and the cause,
    errors and lost records are counted, and the hooks keep working."""
    harness = Harness("/dev/full").start()
    harness.connect()
    harness.reactor.run_until(lambda: harness.sample(WRITE_ERRORS) >= 1)
    for _ in range(3):
        harness.op(2)
    harness.stop()
    assert audit_lines(logged)[0] == (
        "audit plugin: cannot write path = '/dev/full': [Errno 28] No space left on device; "
        "records are being lost"
    )
    # One error line however many batches failed; the last summary comes from stop().
    assert len(audit_lines(logged)) == 2
    assert audit_lines(logged)[1].startswith("audit plugin: dropped 7 records for path = ")
    assert harness.sample(WRITE_ERRORS) >= 1
    assert harness.sample(DROPPED) == 7


def test_writing_resumes(tmp_path: Path, logged: list[dict[str, Any]]) -> None:
    """Once the file is writable again (here: after a reopen), one line says so."""
    link = tmp_path / "audit.jsonl"
    link.symlink_to("/dev/full")
    harness = Harness(link).start()
    harness.connect(1)
    harness.reactor.run_until(lambda: audit_lines(logged))
    link.unlink()
    harness.plugin.reopen()
    harness.connect(2)
    harness.reactor.run_until(lambda: audit_lines(logged, LogLevel.warn))
    harness.stop()
    assert audit_lines(logged, LogLevel.warn) == [
        f"audit plugin: writing path = {str(link)!r} works again"
    ]
    assert [r["conn"] for r in harness.records()] == [2]
    assert harness.sample(DROPPED) == 1


def test_torn_line_is_ended(tmp_path: Path) -> None:
    """After a write that failed halfway, the next batch starts on a new line."""

    class HalfWrites:
        """Like write(2) on a disk that fills up: a short write, then an error, once."""

        def __init__(self, path: str) -> None:
            self.file = open(path, "ab", buffering=0)  # noqa: SIM115
            self.calls = 0

        def write(self, data: Any) -> int:
            self.calls += 1
            if self.calls == 1:
                return self.file.write(bytes(data[:10]))
            if self.calls == 2:
                raise OSError(28, "No space left on device")
            return self.file.write(data)

        def flush(self) -> None:
            pass

        def close(self) -> None:
            self.file.close()

    clock, reactor = Clock(), FakeReactor()
    path = tmp_path / "audit.jsonl"
    sink = FileSink(str(path), 10, clock, reactor, audit._metrics(None), HalfWrites)  # type: ignore[arg-type]
    sink.open()
    sink.start()
    sink.put(b'{"n":1,"pad":"xxxxxxxx"}\n')
    reactor.run_until(lambda: reactor.calls.empty() and sink.queued == 0, timeout=2)
    sink.put(b'{"n":2}\n')
    results: list[object] = []
    sink.close().addBoth(results.append)
    reactor.run_until(lambda: results)
    assert path.read_bytes() == b'{"n":1,"pa\n{"n":2}\n'


def test_full_queue_drops_without_blocking(tmp_path: Path, logged: list[dict[str, Any]]) -> None:
    """With the writer stuck on a hung file, hooks return at once, records beyond
    ``buffer_records`` are dropped and counted, and the log says so at most every 10 s."""
    with full_fifo(tmp_path) as (fifo, drain):
        harness = Harness(fifo, buffer_records=1).start()
        harness.op(1)
        # The writer takes that record and hangs writing it: the buffer is empty again.
        harness.reactor.run_until(lambda: harness.sample(QUEUED) == 0)
        started = time.monotonic()
        harness.op(100)
        assert time.monotonic() - started < 2.0
        dropped = harness.sample(DROPPED)
        assert dropped == 99
        assert harness.sample(QUEUED) == 1
        assert audit_lines(logged) == [
            f"audit plugin: buffer_records = 1 records are waiting for path = {str(fifo)!r}, "
            "which is too slow or hung; dropping records"
        ]
        harness.clock.advance(9)
        harness.op(10)
        assert len(audit_lines(logged)) == 1
        harness.clock.advance(1)
        assert audit_lines(logged)[1:] == [
            f"audit plugin: dropped 109 records for path = {str(fifo)!r} in the last 10 s"
        ]
        harness.clock.advance(10)  # nothing dropped since: no line, and the episode ends
        assert len(audit_lines(logged)) == 2
        harness.op(5)
        assert len(audit_lines(logged)) == 3  # a new episode is announced at once
        assert harness.sample(DROPPED) == 99 + 10 + 5
        harness.stop(meanwhile=drain)
    assert len(audit_lines(logged)) == 4  # what was dropped since the last line, at stop


def test_stop_gives_up_on_a_hung_disk(tmp_path: Path, logged: list[dict[str, Any]]) -> None:
    """stop() fires after 5 s of clock time even if the writer is stuck, and says so."""
    before = set(threading.enumerate())
    with full_fifo(tmp_path) as (fifo, drain):
        harness = Harness(fifo).start()
        harness.op(3)
        results: list[object] = []
        stopped = harness.plugin.stop()
        assert isinstance(stopped, defer.Deferred)
        stopped.addBoth(results.append)
        harness.clock.advance(4.9)
        assert results == []
        harness.clock.advance(0.1)
        assert results == [None]
        assert audit_lines(logged)[0].startswith(
            f"audit plugin: writing path = {str(fifo)!r} did not finish within 5 s; "
        )
        # Once the disk comes back, the abandoned writer still finishes quietly.
        harness.reactor.run_until(lambda: not writers(before), drain)
        harness.reactor.run_until(lambda: harness.reactor.calls.empty(), timeout=0.2)
    assert len(audit_lines(logged)) == 1


def test_metrics_are_shared_by_instances(tmp_path: Path) -> None:
    """Two audit plugins on one registry both start, and count into the same metrics."""
    first = Harness(tmp_path / "a.jsonl").start()
    second = Audit.from_config(testing.options({"path": str(tmp_path / "b.jsonl")}), first.context)
    second.start()
    first.connect()
    second.connection_accepted(PLAIN)
    first.stop()
    results: list[object] = []
    stopped = second.stop()
    assert isinstance(stopped, defer.Deferred)
    stopped.addBoth(results.append)
    first.reactor.run_until(lambda: results)
    assert first.sample(QUEUED) == 0
    assert len(first.records(tmp_path / "b.jsonl")) == 1


def test_is_a_plugin() -> None:
    """Audit is a Plugin, registered as the ``audit`` entry point."""
    from importlib.metadata import entry_points

    assert issubclass(Audit, Plugin)
    (point,) = [ep for ep in entry_points(group="ldapproxy.plugins") if ep.name == "audit"]
    assert point.load() is Audit
