"""Content-Encoding undone, within a bound: bodies read back from the store, and streams the proxy watches.

A small compressed body can decode to a huge one (a "bomb": 1 MB of gzip holds 1 GB of zeros, brotli and zstd
go further). Agents run code a policy wrote and call hosts it chose; what they send or fetch is stored as it
crossed the wire and decoded later, by the manager building a conversation or by the proxy watching how a stream
ends. So every decoder here stops at a limit and raises ``DecodedTooLarge`` instead of taking the process's
memory.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable

log = logging.getLogger(__name__)

# A stored body read back: far above any real one (a request of many images is tens of MB, an answer with top-20
# logprobs of 32k tokens about 40 MB). Reaching it holds about twice as much for a moment (the pieces, then joined).
DECODED_BODY_LIMIT = 256 << 20
# A zstd stream is fed this much at a time where a limit holds (its decoder takes none): one of its blocks of at
# most 4 bytes may decode to 128 KiB, so a slice overshoots a limit by 8 MiB at most before it is checked.
_ZSTD_SLICE = 256

Decoder = tuple[Callable[[bytes], bytes], Callable[[], bytes]]


class DecodedTooLarge(ValueError):
    """A body, or one piece of a stream, that decodes past its limit."""


def decode_body(body: bytes | None, encoding: str | None, limit: int = DECODED_BODY_LIMIT) -> bytes:
    """Undo Content-Encoding; bodies are stored exactly as they crossed the wire. A truncated body gives what of
    it decodes; one that does not decode, or decodes past ``limit``, is returned as far as its codings undid."""
    undone, too_large = _undo_codings(body, encoding, limit)
    if too_large is not None:
        log.warning("rollouttap: a %d-byte body %s: left as stored", len(undone), too_large)
    return undone


def decodes_past(body: bytes | None, encoding: str | None, limit: int = DECODED_BODY_LIMIT) -> bool:
    """Whether undoing the body's codings would pass ``limit`` (a reader that cannot bound its own decoding, such
    as mitmproxy's, must then be given the body as stored)."""
    return _undo_codings(body, encoding, limit)[1] is not None


def _undo_codings(body: bytes | None, encoding: str | None, limit: int) -> tuple[bytes, DecodedTooLarge | None]:
    """The body as far as its codings (last applied, first undone) undo, and what stopped it past ``limit``."""
    if not body:
        return b"", None
    for enc in reversed([e.strip().lower() for e in (encoding or "").split(",") if e.strip()]):
        try:
            body = _decode_one(body, enc, limit)
        except DecodedTooLarge as exc:
            return body, DecodedTooLarge(f"{enc}-coded, {exc}")
        except Exception:  # zlib's, brotli's, zstd's errors (no common base): not that coding after all
            return body, None
    return body, None


def gunzip(body: bytes, limit: int = DECODED_BODY_LIMIT) -> bytes:
    """A whole gzip body as clients read it (``GzipMembers``), as much of a truncated one as decodes; ValueError
    when it does not start as gzip (DecodedTooLarge past ``limit``)."""
    members = GzipMembers(limit)
    try:
        return members.decompress(body) + members.flush()
    except zlib.error as exc:
        raise ValueError(f"not gzip: {exc}") from exc


def stream_decoder(encoding: str, limit: int | None = None) -> Decoder | None:
    """(decompress, flush) for a ``content-encoding`` stream (gzip, deflate, br, zstd), each call's output at
    most ``limit`` bytes (None: unbounded); None for any other coding."""
    if encoding in ("gzip", "x-gzip"):
        return GzipMembers(limit).decoder()
    if encoding == "deflate":
        return Deflate(limit).decoder()
    if encoding == "br":
        return _brotli(limit)
    if encoding == "zstd":
        return _zstd(limit)
    return None


def _decode_one(body: bytes, enc: str, limit: int) -> bytes:
    if enc == "identity":
        return body
    if enc in ("gzip", "x-gzip"):
        return gunzip(body, limit)
    if (decoder := stream_decoder(enc, limit)) is None:
        return gunzip(body, limit) if body[:2] == b"\x1f\x8b" else body
    decompress, flush = decoder
    out = decompress(body)
    rest = flush()
    _check(len(out) + len(rest), limit)
    return out + rest if rest else out


def _check(size: int, limit: int | None) -> None:
    if limit is not None and size > limit:
        raise DecodedTooLarge(f"decodes past {limit >> 20} MiB" if limit >= 1 << 20 else f"decodes past {limit} B")


class GzipMembers:
    """gzip as clients read it (urllib3, browsers): one member after another (a server may compress each write as
    one), fed in pieces; once a member has ended, bytes that do not start another are ignored. zlib.error when
    the stream does not start as gzip (or zlib); DecodedTooLarge when one piece decodes past ``limit``."""

    def __init__(self, limit: int | None = None) -> None:
        self._z = zlib.decompressobj(32 + zlib.MAX_WBITS)  # 32+: a gzip or a zlib header, as mitmproxy reads it
        self._ended_one = False  # a whole member was read: an error after it is trailing garbage
        self._trailing = False  # such garbage came: the rest is ignored
        self._limit = limit

    def decoder(self) -> Decoder:
        return self.decompress, self.flush

    def decompress(self, data: bytes) -> bytes:
        out: list[bytes] = []
        size = 0
        while data and not self._trailing:
            try:
                # zlib stops at max_length (0: none): one byte past the limit says the piece is too large.
                part = self._z.decompress(data, 0 if self._limit is None else self._limit - size + 1)
            except zlib.error:
                if not self._ended_one:
                    raise
                self._trailing = True
                break
            size += len(part)
            _check(size, self._limit)
            out.append(part)
            if not self._z.eof:
                break
            data, self._ended_one = self._z.unused_data, True
            self._z = zlib.decompressobj(32 + zlib.MAX_WBITS)
        return b"".join(out)

    def flush(self) -> bytes:
        if self._trailing:
            return b""
        try:
            return self._z.flush()
        except zlib.error:
            if not self._ended_one:
                raise
            return b""


class Deflate:
    """"deflate" as servers send it: zlib-wrapped (RFC 9110) or raw, told apart by the first bytes, as
    mitmproxy's own decoder (and every browser) does for a whole body."""

    def __init__(self, limit: int | None = None) -> None:
        self._z = zlib.decompressobj(zlib.MAX_WBITS)
        self._first: bytes | None = b""  # until the two bytes of a zlib header are in, nothing tells the two apart
        self._limit = limit

    def decoder(self) -> Decoder:
        return self.decompress, self.flush

    def decompress(self, data: bytes) -> bytes:
        if self._first is None:
            return self._inflate(data)
        self._first += data
        if len(self._first) < 2:
            return b""
        data, self._first = self._first, None
        try:
            return self._inflate(data)
        except zlib.error:  # no zlib header: raw deflate
            self._z = zlib.decompressobj(-zlib.MAX_WBITS)
            return self._inflate(data)

    def flush(self) -> bytes:
        if self._first:  # a whole stream of one byte: not zlib (its header alone is two)
            self._z = zlib.decompressobj(-zlib.MAX_WBITS)
            return self._inflate(self._first) + self._z.flush()
        return self._z.flush()

    def _inflate(self, data: bytes) -> bytes:
        out = self._z.decompress(data, 0 if self._limit is None else self._limit + 1)
        _check(len(out), self._limit)
        return out


def _brotli(limit: int | None) -> Decoder:
    import brotli  # mitmproxy's own dependency

    bobj = brotli.Decompressor()
    if limit is None:
        return bobj.process, lambda: b""

    def process(data: bytes) -> bytes:
        # It stops once its output reaches the limit (one block past it at most), the rest of the input unread.
        out = bobj.process(data, output_buffer_limit=limit + 1)
        _check(len(out), limit)
        return out
    return process, lambda: b""


def _zstd(limit: int | None) -> Decoder:
    import zstandard  # mitmproxy's own dependency

    # A stream compressed a frame per event (or per flush) is several frames: read across them, as clients do.
    zst = zstandard.ZstdDecompressor().decompressobj(read_across_frames=True)
    if limit is None:
        return zst.decompress, zst.flush

    def decompress(data: bytes) -> bytes:
        out: list[bytes] = []
        size = 0
        view = memoryview(data)
        for start in range(0, len(view), _ZSTD_SLICE):
            part = zst.decompress(view[start:start + _ZSTD_SLICE])
            size += len(part)
            _check(size, limit)
            out.append(part)
        return b"".join(out)
    return decompress, zst.flush
