"""One pass through mitmproxy's layers per read of a chunked body, not one per chunk.

Why: mitmproxy reads a chunked body with h11's ``ChunkedReader``, which yields each chunk as its own
``Data``; every one then travels mitmproxy's layers apart (a ``ResponseData`` event, the stream callable,
the client side's chunk framing, a ``SendData``). A model server streams one SSE event per chunk, and when
a read brings many of them (a server under load, a busy proxy) that is tens of microseconds of Python per
event. ``CoalescingChunkedReader`` hands mitmproxy every chunk one read completed as one ``Data``: the
same bytes in the same order, re-framed as one chunk for the client. A body that arrives one chunk per
read (a model generating at its own pace) is unchanged.

Whole chunks at the front of the buffer are cut out by one pattern over h11's buffer (``_whole_chunks``),
not by h11's reader one call each (2.5 µs a chunk: a line search, a header regex, a ``Data``, two extracts),
starting where h11's reader stands: between chunks, inside one (a read that ended mid-chunk: its rest is taken
if it is all there with its CRLF) or before a chunk's CRLF. Anything else (a chunk not whole yet, an
extension, the last chunk and its trailers, a malformed chunk) is left to h11's reader, which the scan leaves
between chunks, as it would have been.

The reader is mitmproxy's choice inside ``mitmproxy.proxy.layers.http._http1.make_body_reader``, a
module-level function its HTTP/1 layers call for every message body: ``install`` wraps it, ``uninstall``
puts it back.
"""

import re
from collections.abc import Callable
from typing import Any, Protocol

import h11

try:  # private modules: a mitmproxy or h11 that moved them just goes without coalescing
    from h11._readers import ChunkedReader
    from mitmproxy.proxy.layers.http import _http1
except ImportError:  # pragma: no cover - depends on the installed versions
    ChunkedReader = None  # type: ignore[assignment, misc]
    _http1 = None  # type: ignore[assignment]

# A chunk header as h11 reads it (1 to 20 hex digits), without an extension or whitespace: those go to h11.
_CHUNK_HEADER = re.compile(rb"([0-9A-Fa-f]{1,20})\r\n")
# What the scan reads of h11's reader and buffer (private): without them, every chunk goes through h11.
_SCANNABLE = ChunkedReader is not None and {"_bytes_in_chunk", "_bytes_to_discard", "_reading_trailer"} <= set(
    vars(ChunkedReader()))


class ChunkCount(Protocol):
    """Where coalescing counts the chunks it joined to the one before."""
    chunks_joined: int


class CoalescingChunkedReader:
    """h11's ``ChunkedReader``, returning every chunk a read completed as one ``Data``.

    Called again after a ``Data`` it returns what stopped the run: the message's end, or the protocol error
    that came after good chunks (raised only once those are through, as without coalescing).
    """

    __slots__ = ("_reader", "_next", "_count")

    def __init__(self, reader: Any, count: ChunkCount) -> None:
        self._reader = reader
        self._next: Any = None  # an EndOfMessage or a ProtocolError that ended the last run
        self._count = count

    def __call__(self, buf: Any) -> Any:
        if self._next is not None:
            return self._take_next()
        parts = self._scan(buf)
        event = None
        if not parts:
            event = self._reader(buf)
            if type(event) is not h11.Data:
                return event
            parts = [event.data]
        try:
            while True:
                parts += self._scan(buf)
                more = self._reader(buf)
                if type(more) is not h11.Data:
                    break
                parts.append(more.data)
        except h11.ProtocolError as exc:
            more = exc
        self._next = more
        if len(parts) == 1 and event is not None:
            return event
        self._count.chunks_joined += len(parts) - 1
        return h11.Data(data=b"".join(parts))

    def _scan(self, buf: Any) -> list[Any]:
        """The whole chunks at the front of ``buf`` (the rest of the one h11's reader is inside, then whole
        ones), taken out of it, with the reader moved past them as its own calls would have moved it."""
        reader = self._reader
        if not _SCANNABLE or reader._reading_trailer:
            return []
        data = buf._data
        spans: list[tuple[int, int]] = []
        pos = 0
        if reader._bytes_in_chunk:  # a read ended inside this chunk: its rest, if here whole with its CRLF
            pos = reader._bytes_in_chunk
            if not data.startswith(b"\r\n", pos):
                return []
            spans.append((0, pos))
            pos += 2
        elif reader._bytes_to_discard:  # h11 returned a chunk's data and has yet to take its CRLF
            if not data.startswith(reader._bytes_to_discard):
                return []
            pos = len(reader._bytes_to_discard)
        end = _whole_chunks(data, pos, spans)
        if not end:
            return []
        reader._bytes_in_chunk, reader._bytes_to_discard = 0, b""
        taken = memoryview(buf.maybe_extract_at_most(end))
        return [taken[start:stop] for start, stop in spans]

    def read_eof(self) -> Any:
        if self._next is not None:
            return self._take_next()
        return self._reader.read_eof()

    def _take_next(self) -> Any:
        event, self._next = self._next, None
        if isinstance(event, BaseException):
            raise event
        return event


def _whole_chunks(data: bytearray, pos: int, spans: list[tuple[int, int]]) -> int:
    """Add to ``spans`` where the data of each whole chunk from ``pos`` on lies; where the last of them ends
    (its CRLF included). Stops at the last chunk (size 0), at a chunk not whole yet and at anything that is
    not a plain chunk: h11's reader takes it from there."""
    header = _CHUNK_HEADER.match
    while (found := header(data, pos)) is not None:
        size = int(found[1], 16)
        start = found.end()
        stop = start + size
        if not size or not data.startswith(b"\r\n", stop):
            break
        spans.append((start, stop))
        pos = stop + 2
    return pos


def install(count: ChunkCount) -> bool:
    """Make mitmproxy's HTTP/1 layers read chunked bodies through ``CoalescingChunkedReader``.

    False when this mitmproxy has no such reader choice to wrap (nothing changed). Installing twice keeps one
    wrapper (the latest ``count``): the wrap is the process's, so two tuning addons in one proxy share it, and
    the first to stop ends it.
    """
    if _http1 is None or ChunkedReader is None or not callable(getattr(_http1, "make_body_reader", None)):
        return False
    original: Callable[[int | None], Any] = getattr(_http1.make_body_reader, "wrapped", _http1.make_body_reader)

    def make_body_reader(expected_size: int | None) -> Any:
        reader = original(expected_size)
        return CoalescingChunkedReader(reader, count) if type(reader) is ChunkedReader else reader
    make_body_reader.wrapped = original  # type: ignore[attr-defined]
    _http1.make_body_reader = make_body_reader
    return True


def uninstall() -> None:
    """Put mitmproxy's own reader choice back (bodies already being read keep their reader)."""
    if _http1 is not None:
        _http1.make_body_reader = getattr(_http1.make_body_reader, "wrapped", _http1.make_body_reader)


def installed() -> bool:
    """Whether chunked bodies are read through ``CoalescingChunkedReader`` now."""
    return _http1 is not None and hasattr(_http1.make_body_reader, "wrapped")
