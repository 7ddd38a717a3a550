"""A response stream callable that forwards bytes live and keeps a copy for the store."""

from __future__ import annotations

import time
from typing import Callable

from rollouttap.store.codings import stream_decoder

# A watched stream's read decodes to this much at most (a real one: ten times its compressed size or so).
WATCH_READ_LIMIT = 16 << 20
# A model's stream decoded for its agent (token ids stripped): a configured server's, trusted further; past it the
# stream is cut (StreamTap.failed), as one that does not decode.
STRIP_READ_LIMIT = 64 << 20


class StreamTap:
    """``flow.response.stream = StreamTap(...)``: sees every TCP read, keeps the raw bytes.

    ``rewrite`` (e.g. stripping injected token ids) turns upstream bytes into client bytes; it may
    hold bytes back and gets ``b""`` at the end to flush them. If it fails (a compressed stream that does
    not decode), ``failed`` says why and nothing more is forwarded: the hook that sees the end kills the
    flow, so the client meets a broken stream instead of a clean, short one.
    """

    __slots__ = ("raw", "first_byte_at", "rewrite", "ended", "failed", "keep", "size", "_last")

    def __init__(self, rewrite: Callable[[bytes], bytes] | None = None, keep: int | None = None) -> None:
        self.raw = bytearray()  # the first ``keep`` bytes (all of them without a limit)
        self.keep = keep
        self.size = 0  # every byte seen
        self.first_byte_at: float | None = None
        self.rewrite = rewrite
        self.ended = False
        self.failed: str | None = None
        self._last = b""  # with ``keep``, the last bytes seen (``raw`` holds the first)

    def __call__(self, data: bytes) -> list[bytes]:
        if data:
            if self.first_byte_at is None:
                self.first_byte_at = time.time()
            self.size += len(data)
            if self.keep is None:
                self.raw += data
            else:
                if len(self.raw) < self.keep:
                    self.raw += data[:self.keep - len(self.raw)]
                self._last = last_bytes(self._last, data)
        else:
            self.ended = True
        if self.failed is not None:
            return []
        try:
            out = self.rewrite(data) if self.rewrite is not None else data
        except Exception as exc:  # zlib's, brotli's, zstd's errors (no common base), or a bug of ours:
            # mitmproxy would log it and end the client's response cleanly, short of what the server sent.
            self.failed = f"{type(exc).__name__}: {exc}"
            return []
        # Never hand mitmproxy an empty chunk: with chunked encoding it would end the response early.
        return [out] if out else []

    @property
    def plain_tail(self) -> bytes | bytearray:
        """The last bytes of the stream as its server meant it: decoded where it came compressed."""
        if isinstance(self.rewrite, DecodedFeed):
            return self.rewrite.tail
        return self._last if self.keep is not None else self.raw[-DecodedFeed.TAIL:]


class DecodedFeed:
    """A stream callable feeding ``then`` the decoded bytes of a compressed stream; ``b""`` ends it, as for
    ``then``. ``tail`` holds the last decoded bytes: whether the stream sent its last event is read there (the
    tap's raw copy is compressed). Without ``then`` it only watches: the stream passes as it came, and bytes that
    do not decode stop the watching, never the stream."""

    __slots__ = ("_decompress", "_flush", "_then", "tail", "_lost")
    TAIL = 64

    def __init__(self, decompress: Callable[[bytes], bytes], flush: Callable[[], bytes],
                 then: Callable[[bytes], bytes] | None) -> None:
        self._decompress, self._flush, self._then = decompress, flush, then
        self.tail = b""
        self._lost = False

    def __call__(self, data: bytes) -> bytes:
        if self._then is None:
            self._watch(data)
            return data
        if data:
            plain = self._decompress(data)
            if not plain:
                return b""  # b"" would tell ``then`` the stream ended
            self.tail = last_bytes(self.tail, plain)
            return self._then(plain)
        rest = self._flush()
        self.tail = last_bytes(self.tail, rest)
        return (self._then(rest) if rest else b"") + self._then(b"")

    def _watch(self, data: bytes) -> None:
        if self._lost:
            return
        try:
            plain = self._decompress(data) if data else self._flush()
        except Exception:  # zlib's, brotli's, zstd's errors: the client's decoder meets them, not ours to say
            self._lost, self.tail = True, b""
            return
        self.tail = last_bytes(self.tail, plain)


def last_bytes(tail: bytes, more: bytes) -> bytes:
    """The last DecodedFeed.TAIL bytes of ``tail`` followed by ``more`` (without copying a long ``more`` whole)."""
    size = DecodedFeed.TAIL
    return more[-size:] if len(more) >= size else (tail + more)[-size:]


def decoded(encoding: str, then: Callable[[bytes], bytes] | None) -> DecodedFeed | None:
    """A DecodedFeed for a ``content-encoding`` stream (gzip, deflate, br, zstd); None for any other coding, or a
    list of them. Each read decodes to a bound (a small stream must not take the proxy's memory): watching alone
    (no ``then``: any host's stream) WATCH_READ_LIMIT, past which the watch stops; else STRIP_READ_LIMIT."""
    decoder = stream_decoder(encoding.strip().lower(), WATCH_READ_LIMIT if then is None else STRIP_READ_LIMIT)
    if decoder is None:
        return None
    decompress, flush = decoder
    return DecodedFeed(decompress, flush, then)
