"""The event loop: Twisted's epoll reactor, sending each loop pass's writes at its end.

Twisted's reactors send data in two steps: ``transport.write`` buffers the bytes and adds
the connection to the poller's write set (an ``epoll_ctl``), the next ``epoll_wait``
reports the socket writable, ``doWrite`` sends, and the connection leaves the write set
again (another ``epoll_ctl``).  A proxy writes after nearly every read, so that is two
system calls and one more loop pass per forwarded batch, for sockets whose send buffer is
almost always empty.

:class:`ProxyReactor` keeps Twisted's batching (every write to a connection during one
pass is joined into one ``send``) and drops the round trip through the poller: a
connected TCP connection that asks to write is remembered, and at the end of the pass
(after the timed calls, where the TLS layer flushes its records) its ``doWrite`` runs at
once.  Only a connection whose socket buffer is full, so that ``doWrite`` could not send
everything, is registered with epoll, as before.  Anything else that writes (a
connecting socket, a pipe) takes Twisted's usual path.

It also dispatches epoll events without ``log.callWithLogger``, the legacy logging
context that Twisted sets up around every read and write (its ``logPrefix`` shows only
in ``twisted.python.log`` messages, which ldapproxy does not use); errors escaping a
handler are still logged and disconnect that connection, as in Twisted.

:func:`install` must run before anything imports ``twisted.internet.reactor``.
"""

from __future__ import annotations

import errno
from typing import Any

from twisted.internet import tcp
from twisted.internet.epollreactor import EPOLLOUT, EPollReactor
from twisted.internet.interfaces import IWriteDescriptor
from twisted.logger import Logger

_log = Logger(namespace="ldapproxy.reactor")


class ProxyReactor(EPollReactor):
    """Epoll reactor whose connection writes are sent at the end of each loop pass."""

    def __init__(self) -> None:
        #: Connections that wrote during this pass, not registered with epoll (ordered).
        self._pending_writers: dict[IWriteDescriptor, None] = {}
        #: The batch being sent by :meth:`_send_pending`.
        self._sending: dict[IWriteDescriptor, None] = {}
        super().__init__()

    # -- write set -----------------------------------------------------------------------

    def addWriter(self, writer: IWriteDescriptor) -> None:
        """Remember a connected TCP connection for the end of the pass; else as Twisted."""
        if writer in self._pending_writers:
            return
        if (
            isinstance(writer, tcp.Connection)
            and writer.connected
            and writer.fileno() not in self._writes
        ):
            self._sending.pop(writer, None)  # wrote again while its batch is being sent
            self._pending_writers[writer] = None
            return
        super().addWriter(writer)

    def removeWriter(self, writer: IWriteDescriptor) -> None:
        """Forget ``writer``: it sent everything, or it is closing."""
        if self._pending_writers.pop(writer, self) is None:
            return
        if self._sending.pop(writer, self) is None:
            return
        super().removeWriter(writer)

    def getWriters(self) -> list[IWriteDescriptor]:
        """Every writer, pending ones included."""
        return list(super().getWriters()) + list(self._pending_writers)

    def removeAll(self) -> list[Any]:
        """Remove every reader and writer (at shutdown)."""
        pending = list(self._pending_writers)
        self._pending_writers.clear()
        removed = list(super().removeAll())
        return removed + [writer for writer in pending if writer not in removed]

    # -- the loop --------------------------------------------------------------------------

    def runUntilCurrent(self) -> None:
        """Run the timed calls, then send what this pass wrote."""
        super().runUntilCurrent()
        # A handful of rounds: sending can resume a producer that writes again.
        rounds = 0
        while self._pending_writers and rounds < 4:
            self._send_pending()
            rounds += 1
        if self._pending_writers:
            writers = list(self._pending_writers)
            self._pending_writers.clear()
            for writer in writers:
                super().addWriter(writer)

    def _send_pending(self) -> None:
        writers, self._pending_writers = self._pending_writers, {}
        self._sending = writers
        try:
            for writer in list(writers):
                if writer not in writers:
                    continue  # closed by an earlier connection's callbacks
                try:
                    self._doReadOrWrite(writer, writer.fileno(), EPOLLOUT)
                except BaseException:
                    _log.failure("while writing to {writer}", writer=writer)
                if writers.pop(writer, self) is None:
                    # The socket's buffer is full: epoll says when it has room.
                    super().addWriter(writer)
        finally:
            self._sending = {}

    def doPoll(self, timeout: float | None) -> None:
        """Wait for events and handle them (as Twisted, without the logging context)."""
        if timeout is None:
            timeout = -1
        try:
            events = self._poller.poll(timeout, len(self._selectables))
        except OSError as error:
            if error.errno == errno.EINTR:
                return
            raise
        selectables = self._selectables
        handle = self._doReadOrWrite
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is not None:
                try:
                    handle(selectable, fd, event)
                except BaseException:
                    _log.failure("while handling an event on {selectable}", selectable=selectable)

    doIteration = doPoll


def install() -> ProxyReactor:
    """Install :class:`ProxyReactor` as the global reactor."""
    from twisted.internet.main import installReactor

    reactor = ProxyReactor()
    installReactor(reactor)
    return reactor
