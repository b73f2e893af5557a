"""Coverage-guided fuzzing (atheris, libFuzzer) of the code that reads untrusted bytes.

Usage::

    python fuzz/atheris_targets.py TARGET [libFuzzer options]

with TARGET one of :data:`TARGETS`; ``make fuzz`` runs each for ``FUZZ_SECONDS``, and
``tests/test_atheris.py`` runs each for a few thousand inputs in ``make test``.  A target
fails (libFuzzer reports a crash and exits non-zero) on any exception other than the one
its code documents for bad input, or on a broken invariant.  The Hypothesis properties in
``tests/test_fuzz.py`` cover the same code with structured inputs; this finds what
coverage feedback finds.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Callable

import atheris

with atheris.instrument_imports(include=["ldapproxy"]):
    from ldapproxy import messages
    from ldapproxy.ber import BerError, Framer, FramingError
    from ldapproxy.fields import decode_fields
    from ldapproxy.proxy_protocol import ProxyHeaderParser, ProxyProtocolError

#: The framer's limit in the target: small, so that "too large" is reachable.
MAX_PDU = 4096

#: Every decoder in ldapproxy.messages that reads a PDU.
DECODERS: list[Callable[[bytes], object]] = [
    function
    for name, function in inspect.getmembers(messages, inspect.isfunction)
    if function.__module__ == messages.__name__
    and list(inspect.signature(function).parameters)[:1] == ["pdu"]
    and len(inspect.signature(function).parameters) == 1
]

#: Operation tags to decode fields as: every request, and an unknown one.
FIELD_OPS = [*sorted(messages.REQUEST_NAMES), 0x7F]


def _chunks(data: atheris.FuzzedDataProvider) -> list[bytes]:
    """The rest of the input cut into chunks of fuzzer-chosen sizes."""
    chunks = []
    while data.remaining_bytes():
        size = data.ConsumeIntInRange(1, 512)
        chunks.append(data.ConsumeBytes(size))
    return chunks


def framer(raw: bytes) -> None:
    """Any chunking: only FramingError; frames are the stream's own bytes; bounded buffer."""
    data = atheris.FuzzedDataProvider(raw)
    framing = Framer(MAX_PDU)
    seen = b""
    out = b""
    for chunk in _chunks(data):
        seen += chunk
        try:
            frames = framing.feed(chunk)
        except FramingError:
            return
        for frame in frames:
            if frame.message_id < 0 or len(frame.data) > MAX_PDU:
                raise AssertionError(f"bad frame {frame!r}")
            out += frame.data
        if framing.buffered >= MAX_PDU:
            raise AssertionError(f"{framing.buffered} bytes buffered")
        if out + seen[len(seen) - framing.buffered :] != seen:
            raise AssertionError("frames are not the stream")


def decoders(raw: bytes) -> None:
    """Every PDU decoder, and the field decoder for every operation: only BerError."""
    data = atheris.FuzzedDataProvider(raw)
    op = FIELD_OPS[data.ConsumeIntInRange(0, len(FIELD_OPS) - 1)]
    pdu = data.ConsumeBytes(data.remaining_bytes())
    for decode in DECODERS:
        with contextlib.suppress(BerError):
            decode(pdu)
    with contextlib.suppress(BerError):
        decode_fields(op, pdu)


def proxy_protocol(raw: bytes) -> None:
    """Any chunking: only ProxyProtocolError, and the buffer stays within the spec."""
    data = atheris.FuzzedDataProvider(raw)
    parser = ProxyHeaderParser(max_v2_length=256)
    for chunk in _chunks(data):
        try:
            header = parser.feed(chunk)
        except ProxyProtocolError:
            return
        if header is not None:
            if header.source is not None and not 0 <= header.source[1] <= 65535:
                raise AssertionError(f"bad source {header.source!r}")
            return


TARGETS: dict[str, Callable[[bytes], None]] = {
    "framer": framer,
    "decoders": decoders,
    "proxy_protocol": proxy_protocol,
}


def main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[1] not in TARGETS:
        sys.exit(f"usage: {argv[0]} {{{','.join(TARGETS)}}} [libFuzzer options]")
    target = TARGETS[argv[1]]
    atheris.Setup([argv[0], *argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
