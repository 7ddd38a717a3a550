"""Server-sent events parsing (WHATWG rules), incremental and byte-preserving.

Every block of lines ending in a blank line comes back as an :class:`SSEEvent`, including blocks
without data (comments, keep-alives, stray blank lines), so that concatenating the ``raw`` bytes of
all events returned by ``feed`` and ``finish`` gives back exactly the bytes fed: a stream rewriter can
re-emit the events it does not change byte for byte.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

log = logging.getLogger(__name__)

_EOL = re.compile(rb"\r\n|\r|\n")
_BOM = "\ufeff"
DONE = "[DONE]"


@dataclass(frozen=True)
class SSEEvent:
    """One event block. ``data`` joins its ``data:`` lines with "\\n" and is None when it has none;
    ``id``/``event``/``retry`` are the block's own fields (no carry-over between events);
    ``complete`` is False for a trailing block that ended without a blank line."""
    raw: bytes
    data: str | None = None
    event: str | None = None
    id: str | None = None
    retry: int | None = None
    complete: bool = True

    @property
    def is_done(self) -> bool:
        """Whether this is OpenAI's ``data: [DONE]`` terminator."""
        return self.data is not None and self.data.strip() == DONE

    @property
    def eol(self) -> bytes:
        """The line ending this event uses (to write a replacement in the same style)."""
        match = _EOL.search(self.raw)
        return match.group(0) if match else b"\n"

    def json(self) -> Any:
        """The data parsed as JSON (raises ValueError when it is not JSON or absent)."""
        if self.data is None:
            raise ValueError("event has no data")
        return json.loads(self.data)


class _Fields:
    """The fields of the event being assembled."""

    __slots__ = ("data", "event", "id", "retry")

    def __init__(self) -> None:
        self.data: list[str] = []
        self.event: str | None = None
        self.id: str | None = None
        self.retry: int | None = None

    def add_line(self, line: str) -> None:
        if line.startswith(":"):
            return  # comment
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self.data.append(value)
        elif name == "event":
            self.event = value
        elif name == "id":
            if "\0" not in value:
                self.id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry = int(value)

    def build(self, raw: bytes, complete: bool = True) -> SSEEvent:
        data = "\n".join(self.data) if self.data else None
        return SSEEvent(raw, data, self.event, self.id, self.retry, complete)


class SSEParser:
    """Incremental parser: ``feed`` bytes as they arrive (split anywhere), ``finish`` at the end.

    Event boundaries do not depend on how the bytes were split: a CR at the very end of the data fed
    so far waits for the next byte, since an LF after it belongs to the same line ending.
    """

    def __init__(self) -> None:
        self._buf = bytearray()  # starts at the first byte of the event being assembled
        self._pos = 0  # start of the first unprocessed line in _buf
        self._searched = 0  # no line ending before this offset past _pos (long lines fed in pieces)
        self._first_line = True
        self._fields = _Fields()

    def feed(self, data: bytes) -> list[SSEEvent]:
        """Parse more bytes; returns the events they complete."""
        if not data:
            return []
        self._buf += data
        return self._scan(final=False)

    def finish(self) -> list[SSEEvent]:
        """Flush what is left: events still waiting on a CR, then a trailing unterminated event
        (``complete=False``)."""
        events = self._scan(final=True)
        if self._buf:
            tail = bytes(self._buf[self._pos:])
            if tail:
                self._add_line(tail)
            events.append(self._fields.build(bytes(self._buf), complete=False))
            self._buf.clear()
            self._pos = self._searched = 0
            self._fields = _Fields()
        return events

    def _scan(self, final: bool) -> list[SSEEvent]:
        buf, pos, start = self._buf, self._pos, 0
        events: list[SSEEvent] = []
        for match in _EOL.finditer(buf, max(pos, self._searched)):
            if not final and match.end() == len(buf) and match.group() == b"\r":
                break  # maybe the first half of a CRLF: decide when more bytes arrive
            line = bytes(buf[pos:match.start()])
            pos = match.end()
            if line:
                self._add_line(line)
            else:
                events.append(self._fields.build(bytes(buf[start:pos])))
                self._fields = _Fields()
                start = pos
        del buf[:start]
        self._pos = pos - start
        self._searched = max(self._pos, len(buf) - 1)
        return events

    def _add_line(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace")
        if self._first_line:
            self._first_line = False
            text = text.removeprefix(_BOM)
        self._fields.add_line(text)


def parse_sse(data: str | bytes) -> list[SSEEvent]:
    """Every event of a complete SSE body (a trailing unterminated one included)."""
    parser = SSEParser()
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return parser.feed(raw) + parser.finish()


def json_events(source: str | bytes | Iterable[SSEEvent], *, strict: bool = False,
                loads: Callable[[str], Any] = json.loads) -> Iterator[Any]:
    """The JSON payloads of an SSE body's data events, skipping ``[DONE]`` and data-less blocks, each as ``loads``
    reads it.

    Payloads that are not JSON (ValueError from ``loads``) are skipped (logged) unless ``strict``, then ValueError.
    """
    events = parse_sse(source) if isinstance(source, (str, bytes)) else source
    for event in events:
        if event.data is None or event.is_done:
            continue
        try:
            yield loads(event.data)
        except ValueError:
            if strict:
                raise
            log.debug("skipping non-JSON SSE data: %.80r", event.data)


def format_event(data: str, *, event: str | None = None, id: str | None = None, eol: bytes = b"\n") -> bytes:
    """Encode one event (multi-line data becomes several ``data:`` lines)."""
    lines = []
    if event is not None:
        lines.append(f"event: {event}")
    if id is not None:
        lines.append(f"id: {id}")
    lines.extend(f"data: {part}" for part in data.split("\n"))
    sep = eol.decode("ascii")
    return (sep.join(lines) + sep + sep).encode("utf-8")
