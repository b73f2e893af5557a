"""Scanning a TLS server with sslyze, the TLS scanner of the conformance tests.

sslyze lives in a venv of its own (``make test`` installs it into ``.venv-scan``; it pins a
cryptography older than the one pyOpenSSL needs), so it is run as a subprocess: the
executable comes from ``$SSLYZE``, by default ``.venv-scan/bin/sslyze``.  A missing
scanner raises :class:`ScannerMissing`, never a skip.

:class:`SslyzeScan` starts one scan that writes its results as JSON (``--json_out``);
:meth:`SslyzeScan.report` waits for it and returns a :class:`ScanReport` over that JSON,
which has the shape of sslyze 6's ``ServerScanResult``.

:class:`StartTLSFront` exists because sslyze's ``--starttls ldap`` recognises a
successful StartTLS response only by comparing bytes with the responses of a few known
servers: it rejects a StartTLS response that carries the (optional, RFC 4511 4.14.2)
responseName, which is what ldapproxy sends.  The front relays each connection to the
proxy: it forwards sslyze's StartTLS request unchanged, reads the proxy's response, and
if that is a success hands sslyze the same success without the responseName; after that
it copies bytes both ways untouched, so everything sslyze measures (the TLS handshake,
the certificate, renegotiation) is the proxy's own.  A refusal is passed on verbatim.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import threading
from pathlib import Path
from typing import Any

from ldapproxy import messages as m
from ldapproxy.ber import Framer

SSLYZE_VERSION = "6.3.1"
DEFAULT_SSLYZE = Path(__file__).resolve().parents[2] / ".venv-scan" / "bin" / "sslyze"

#: The scan commands the conformance tests read.
SCAN_COMMANDS = (
    "--sslv2",
    "--sslv3",
    "--tlsv1",
    "--tlsv1_1",
    "--tlsv1_2",
    "--tlsv1_3",
    "--compression",
    "--reneg",
    "--certinfo",
)


class ScannerMissing(AssertionError):
    """The sslyze executable is not there: a test failure, with what to do about it."""


class ScanError(AssertionError):
    """sslyze did not produce a usable result; ``str(error)`` says what it reported."""


def sslyze_executable() -> Path:
    """The sslyze to run: ``$SSLYZE``, else ``.venv-scan/bin/sslyze`` of this checkout."""
    configured = os.environ.get("SSLYZE")
    path = Path(configured) if configured else DEFAULT_SSLYZE
    if not (path.is_file() and os.access(path, os.X_OK)):
        origin = "$SSLYZE" if configured else "the default (SSLYZE is not set)"
        raise ScannerMissing(
            f"the TLS scanner sslyze is not installed: no executable at {path} ({origin}). "
            f"`make test` installs sslyze {SSLYZE_VERSION} into .venv-scan; or set SSLYZE "
            f"to an sslyze {SSLYZE_VERSION} executable."
        )
    return path


class ScanReport:
    """The results sslyze wrote for one server (one ``ServerScanResult`` in its JSON)."""

    def __init__(self, document: dict[str, Any], target: str) -> None:
        self.target = target
        #: The sslyze version that wrote the document.
        self.sslyze_version: str = document.get("sslyze_version", "?")
        results = document.get("server_scan_results") or []
        if len(results) != 1:
            raise ScanError(f"{target}: expected one server in sslyze's JSON, got {len(results)}")
        server = results[0]
        if server.get("connectivity_status") != "COMPLETED":
            raise ScanError(
                f"{target}: sslyze could not connect ({server.get('connectivity_status')}):\n"
                f"{server.get('connectivity_error_trace')}"
            )
        if server.get("scan_status") != "COMPLETED":
            raise ScanError(f"{target}: sslyze scan status {server.get('scan_status')}")
        self._results: dict[str, Any] = server["scan_result"]

    def command(self, name: str) -> dict[str, Any]:
        """The ``result`` of scan command ``name`` (e.g. ``tls_1_2_cipher_suites``);
        :class:`ScanError` if sslyze did not complete it."""
        attempt = self._results.get(name)
        if attempt is None:
            raise ScanError(f"{self.target}: sslyze has no {name!r} result")
        if attempt.get("status") != "COMPLETED" or attempt.get("result") is None:
            raise ScanError(
                f"{self.target}: sslyze's {name} scan did not complete "
                f"({attempt.get('status')}: {attempt.get('error_reason')}):\n"
                f"{attempt.get('error_trace')}"
            )
        result: dict[str, Any] = attempt["result"]
        return result

    def accepted_suites(self, version: str) -> list[dict[str, Any]]:
        """The accepted cipher suites for ``version`` (``ssl_2_0``, ``tls_1_2``...): each
        ``{"cipher_suite": {"name", "openssl_name", "key_size", "is_anonymous"},
        "ephemeral_key": {...} or None}``."""
        suites: list[dict[str, Any]] = self.command(f"{version}_cipher_suites")[
            "accepted_cipher_suites"
        ]
        return suites

    def rejected_suites(self, version: str) -> list[dict[str, Any]]:
        """The cipher suites sslyze offered for ``version`` and the server refused."""
        suites: list[dict[str, Any]] = self.command(f"{version}_cipher_suites")[
            "rejected_cipher_suites"
        ]
        return suites


class SslyzeScan:
    """One sslyze run against ``host:port``, started at construction."""

    def __init__(
        self,
        host: str,
        port: int,
        json_path: Path,
        ca_file: Path,
        starttls: str | None = None,
    ) -> None:
        self.target = f"{host}:{port}" + (f" (--starttls {starttls})" if starttls else "")
        self.json_path = json_path
        argv = [
            str(sslyze_executable()),
            "--quiet",
            f"--json_out={json_path}",
            # Only the scans below: no Mozilla profile check (a verdict we do not use).
            "--mozilla_config=disable",
            *SCAN_COMMANDS,
            f"--certinfo_ca_file={ca_file}",
        ]
        if starttls:
            argv.append(f"--starttls={starttls}")
        argv.append(f"{host}:{port}")
        self.argv = argv
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def report(self, timeout: float = 120) -> ScanReport:
        """Wait for the scan and return its results; :class:`ScanError` if it failed."""
        try:
            stdout, stderr = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            stdout, stderr = self.process.communicate()
            raise ScanError(
                f"{self.target}: sslyze still running after {timeout:g} s: {stderr[-2000:]}"
            ) from None
        if self.process.returncode != 0:
            raise ScanError(
                f"{self.target}: {' '.join(self.argv)} exited with status "
                f"{self.process.returncode}:\n{stdout[-3000:]}{stderr[-3000:]}"
            )
        try:
            document = json.loads(self.json_path.read_text())
        except (OSError, ValueError) as error:
            raise ScanError(
                f"{self.target}: no readable JSON from sslyze in {self.json_path}: {error}\n"
                f"{stderr[-3000:]}"
            ) from None
        return ScanReport(document, self.target)

    def kill(self) -> None:
        """Stop the scan if it is still running (cleanup after an error elsewhere)."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.communicate()


class StartTLSFront:
    """A loopback relay in front of a StartTLS listener that sslyze's LDAP StartTLS accepts.

    Use as a context manager; connect to :attr:`port`.  :attr:`answers` collects the
    ``(resultCode, responseName)`` of every StartTLS response the proxy sent.
    """

    def __init__(self, target_port: int, host: str = "127.0.0.1", timeout: float = 30) -> None:
        self.host = host
        self.target_port = target_port
        self.timeout = timeout
        self.answers: list[tuple[int, bytes | None]] = []
        #: Connections on which the StartTLS exchange itself went wrong, and why.
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._listener = socket.create_server((host, 0))
        self._listener.settimeout(0.1)
        self.port: int = self._listener.getsockname()[1]
        self._threads: list[threading.Thread] = []
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)

    def __enter__(self) -> StartTLSFront:
        self._acceptor.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop accepting, end every relayed connection and wait for the threads."""
        self._stop.set()
        if self._acceptor.is_alive():
            self._acceptor.join(5)
        self._listener.close()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(5)

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(client,), daemon=True)
            with self._lock:
                self._threads.append(thread)
            thread.start()

    def _note_failure(self, why: str) -> None:
        with self._lock:
            self.failures.append(why)

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        try:
            client.settimeout(self.timeout)
            request = self._read_pdu(client)
            if request is None:
                return  # sslyze opened and closed a connection without a request
            upstream = socket.create_connection((self.host, self.target_port), self.timeout)
            upstream.sendall(request)
            response = self._read_pdu(upstream)
            if response is None:
                self._note_failure("the proxy closed the connection without a StartTLS response")
                return
            code = m.result_code(response)
            with self._lock:
                self.answers.append((code, m.extended_response_name(response)))
            if code != m.SUCCESS:
                client.sendall(response)
                return
            message_id = Framer(len(response)).feed(response)[0].message_id
            client.sendall(m.extended_response(message_id, m.SUCCESS, ""))
            self._pipe(client, upstream)
        except Exception as error:  # a relay thread must never raise
            self._note_failure(f"{type(error).__name__}: {error}")
        finally:
            client.close()
            if upstream is not None:
                upstream.close()

    def _read_pdu(self, sock: socket.socket) -> bytes | None:
        """One whole LDAPMessage, nothing after it (sslyze and the proxy both wait for
        the other side before going on); None on EOF before any byte."""
        framer = Framer(1 << 16)
        received = b""
        while True:
            data = sock.recv(65536)
            if not data:
                if received:
                    raise ConnectionError(f"EOF inside an LDAP message: {received!r}")
                return None
            received += data
            frames = framer.feed(data)
            if frames:
                if len(frames) > 1 or framer.buffered:
                    raise ValueError(f"more than one LDAP message before TLS: {received!r}")
                return bytes(frames[0].data)

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        """Copy bytes both ways until both sides are done (half-closes are passed on)."""
        peer = {a: b, b: a}
        reading = [a, b]
        try:
            while reading and not self._stop.is_set():
                ready, _, _ = select.select(reading, [], [], 0.1)
                for sock in ready:
                    data = sock.recv(65536)
                    if data:
                        peer[sock].sendall(data)
                    else:
                        reading.remove(sock)
                        peer[sock].shutdown(socket.SHUT_WR)
        except OSError:
            pass  # a reset from either side ends the relay, as it would the connection
