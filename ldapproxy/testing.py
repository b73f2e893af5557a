"""Builders of hook events, for testing plugins without a proxy.

A plugin's tests build the events its hooks receive with these functions and call the
hooks directly::

    from ldapproxy import testing

    plugin = MyPlugin.from_config(testing.options({"limit": 3}), testing.context())
    verdict = plugin.request(testing.request("search", client_host="192.0.2.7"))
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.task import Clock

from ldapproxy.hooks import (
    Connection,
    Disconnect,
    PluginContext,
    PluginOptions,
    Request,
    RequestFields,
    Response,
)


def connection(
    client_host: str = "192.0.2.1",
    client_port: int = 50000,
    listener: str = "ldap",
    tls_version: str | None = None,
    tls_cipher: str | None = None,
    bound_dn: str | None = None,
    id: int = 1,
    started: float = 0.0,
) -> Connection:
    """A :class:`Connection` view with plausible defaults."""
    return Connection(
        id=id,
        client_host=client_host,
        client_port=client_port,
        listener=listener,
        tls_version=tls_version,
        tls_cipher=tls_cipher,
        bound_dn=bound_dn,
        started=started,
    )


def request(
    op: str,
    fields: RequestFields | None = None,
    message_id: int = 1,
    received: float = 0.0,
    **connection_args: Any,
) -> Request:
    """A :class:`Request` for ``op`` on a :func:`connection` built from ``connection_args``
    (or ``connection=`` itself)."""
    conn = connection_args.pop("connection", None) or connection(**connection_args)
    return Request(conn, message_id, op, fields, received)


def response(
    request: Request,
    result: int = 0,
    entries: int = 0,
    references: int = 0,
    duration: float = 0.001,
    denied_by: str | None = None,
    local: bool = False,
) -> Response:
    """The final :class:`Response` to ``request``."""
    return Response(request, result, entries, references, duration, denied_by, local)


def disconnect(
    connection: Connection,
    reason: str = "client unbind",
    duration: float = 1.0,
    requests: int = 1,
    denied_by: str | None = None,
    deny_reason: str = "",
) -> Disconnect:
    """The :class:`Disconnect` of ``connection``."""
    return Disconnect(connection, reason, duration, requests, denied_by, deny_reason)


def options(raw: dict[str, Any], config_dir: Path | None = None) -> PluginOptions:
    """The :class:`PluginOptions` of a ``[[plugin]]`` table (without its ``use`` key)."""
    return PluginOptions(raw, config_dir or Path.cwd())


def context(
    clock: Clock | None = None,
    reactor: Any = None,
    registry: Any = None,
    listeners: tuple[str, ...] = (),
) -> PluginContext:
    """A :class:`PluginContext` on a fresh :class:`Clock` and Prometheus registry, for a
    proxy with ``listeners`` (names; empty means not checked)."""
    from prometheus_client import CollectorRegistry

    clock = clock or Clock()
    return PluginContext(
        clock=clock,
        reactor=reactor if reactor is not None else clock,
        registry=registry if registry is not None else CollectorRegistry(),
        config_dir=Path.cwd(),
        listeners=listeners,
    )
