"""A response stream callable that forwards bytes live and keeps a copy for the store."""

from __future__ import annotations

import time
import zlib
from typing import Callable


class StreamTap:
    """``flow.response.stream = StreamTap(...)``: sees every TCP read, keeps the raw bytes.

    ``rewrite`` (e.g. stripping injected token ids) turns upstream bytes into client bytes; it may
    hold bytes back and gets ``b""`` at the end to flush them.
    """

    __slots__ = ("raw", "first_byte_at", "rewrite", "ended")

    def __init__(self, rewrite: Callable[[bytes], bytes] | None = None) -> None:
        self.raw = bytearray()
        self.first_byte_at: float | None = None
        self.rewrite = rewrite
        self.ended = False

    def __call__(self, data: bytes) -> list[bytes]:
        if data:
            if self.first_byte_at is None:
                self.first_byte_at = time.time()
            self.raw += data
        else:
            self.ended = True
        out = self.rewrite(data) if self.rewrite is not None else data
        # Never hand mitmproxy an empty chunk: with chunked encoding it would end the response early.
        return [out] if out else []


def decoded(encoding: str, then: Callable[[bytes], bytes]) -> Callable[[bytes], bytes] | None:
    """A stream callable feeding ``then`` the decoded bytes of a ``content-encoding`` stream (gzip, deflate,
    br, zstd); ``b""`` ends it, as for ``then``. None for any other coding, or a list of them."""
    decoder = _decoder(encoding.strip().lower())
    if decoder is None:
        return None
    decompress, flush = decoder

    def feed(data: bytes) -> bytes:
        if data:
            plain = decompress(data)
            return then(plain) if plain else b""  # b"" would tell ``then`` the stream ended
        rest = flush()
        return (then(rest) if rest else b"") + then(b"")
    return feed


def _decoder(encoding: str) -> tuple[Callable[[bytes], bytes], Callable[[], bytes]] | None:
    if encoding in ("gzip", "x-gzip", "deflate"):
        # gzip, or zlib-wrapped deflate (what servers send as "deflate"): wbits 32+ detects either header
        zobj = zlib.decompressobj(32 + zlib.MAX_WBITS)
        return zobj.decompress, zobj.flush
    if encoding == "br":
        import brotli  # mitmproxy's own dependency
        bobj = brotli.Decompressor()
        return bobj.process, lambda: b""
    if encoding == "zstd":
        import zstandard  # mitmproxy's own dependency
        zst = zstandard.ZstdDecompressor().decompressobj()
        return zst.decompress, zst.flush
    return None
