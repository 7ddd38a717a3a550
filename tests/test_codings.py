"""Content-Encoding undone within a bound (store/codings.py): stored bodies and watched streams that decode to far
more than they weigh (compression bombs) stop at a limit instead of taking the reader's memory."""

from __future__ import annotations

import gzip
import random
import tracemalloc
import zlib
from collections.abc import Callable

import brotli
import pytest
import zstandard

from rollouttap.store.codings import DecodedTooLarge, decode_body, gunzip, stream_decoder


def _deflate_raw(data: bytes) -> bytes:
    zobj = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return zobj.compress(data) + zobj.flush()


PACK: dict[str, Callable[[bytes], bytes]] = {
    "gzip": gzip.compress, "x-gzip": gzip.compress, "deflate": zlib.compress, "deflate-raw": _deflate_raw,
    "br": lambda data: brotli.compress(data, quality=1), "zstd": zstandard.ZstdCompressor(level=1).compress,
    "gzip-members": lambda data: gzip.compress(data[:len(data) // 2]) + gzip.compress(data[len(data) // 2:]),
}
CODINGS = list(PACK)


def _header(coding: str) -> str:
    return {"deflate-raw": "deflate", "gzip-members": "gzip"}.get(coding, coding)


@pytest.mark.parametrize("coding", CODINGS)
def test_a_body_decodes_up_to_its_limit_and_past_it_is_left_as_stored(coding):
    plain = b"data: {}\n\n" * 1000
    packed = PACK[coding](plain)
    assert decode_body(packed, _header(coding), limit=len(plain)) == plain
    assert decode_body(packed, _header(coding), limit=len(plain) - 1) == packed


def test_past_its_limit_the_body_is_left_as_far_as_its_codings_undid_whole():
    plain = bytes(10_000)
    inner = gzip.compress(plain)
    both = brotli.compress(inner)  # Content-Encoding: gzip, br (br applied last, undone first)
    assert decode_body(both, "gzip, br", limit=len(plain)) == plain
    assert decode_body(both, "gzip, br", limit=len(plain) - 1) == inner


@pytest.mark.parametrize("coding", CODINGS)
def test_a_bomb_is_stopped_before_it_is_decoded_whole(coding):
    # 64 MiB of zeros weighs a few KB compressed: the decoder must give up near its limit, not after.
    bomb = PACK[coding](bytes(64 << 20))
    tracemalloc.start()
    try:
        assert decode_body(bomb, _header(coding), limit=1 << 20) == bomb
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 12 << 20, f"{peak >> 20} MiB held"  # the limit, and a zstd slice's 8 MiB overshoot at most


@pytest.mark.parametrize("coding", CODINGS)
def test_a_stream_decoder_bounds_each_read_not_the_stream(coding):
    plain = random.Random(0).randbytes(300_000)  # incompressible: a read decodes to about its own size
    packed = PACK[coding](plain)
    decompress, flush = stream_decoder(_header(coding), limit=100_000)
    with pytest.raises(DecodedTooLarge):
        decompress(packed)
    decompress, flush = stream_decoder(_header(coding), limit=100_000)
    out = b"".join(decompress(packed[i:i + 1000]) for i in range(0, len(packed), 1000)) + flush()
    assert out == plain  # read by read, each within the limit: the whole stream decodes


def test_gunzip_keeps_its_errors_and_its_limit():
    with pytest.raises(ValueError, match="not gzip"):
        gunzip(b"plain text")
    with pytest.raises(DecodedTooLarge):
        gunzip(gzip.compress(bytes(1000)), limit=999)
    assert gunzip(gzip.compress(bytes(1000))[:-8]) == bytes(1000)  # truncated: as much as decodes


def test_a_watched_stream_stops_being_watched_past_the_limit_and_passes_as_it_came():
    from rollouttap.addon.answer_rewrite import sse_finished
    from rollouttap.addon.streamtap import WATCH_READ_LIMIT, StreamTap, decoded
    bomb = PACK["zstd"](bytes(WATCH_READ_LIMIT + (1 << 20)) + b"data: [DONE]\n\n")
    tap = StreamTap(decoded("zstd", None))
    assert tap(bomb) == [bomb] and tap(b"") == [] and tap.failed is None  # the client's to decode, or not
    assert tap.plain_tail == b"" and not sse_finished(tap.plain_tail)  # how it ended is not known
    fine = StreamTap(decoded("zstd", None))
    small = PACK["zstd"](bytes(1 << 20) + b"data: [DONE]\n\n")
    assert fine(small) == [small] and sse_finished(fine.plain_tail)


def test_a_stream_decoded_for_its_client_takes_more_than_a_watch_and_is_cut_past_its_own_limit():
    # A model's stream, decoded because its token ids are stripped: every byte goes on to the agent, so a read
    # past the limit breaks the stream (the client meets a broken one), as bytes that do not decode do.
    from rollouttap.addon.streamtap import STRIP_READ_LIMIT, WATCH_READ_LIMIT, StreamTap, decoded
    plain = bytes(WATCH_READ_LIMIT + 1)
    feed = decoded("zstd", lambda data: data)
    assert feed(PACK["zstd"](plain)) + feed(b"") == plain
    tap = StreamTap(decoded("zstd", lambda data: data))
    assert tap(PACK["zstd"](bytes(STRIP_READ_LIMIT + 1))) == [] and "DecodedTooLarge" in tap.failed


@pytest.mark.parametrize("body, encoding, past", [
    (PACK["zstd"](bytes(2000)), "zstd", True),
    (PACK["zstd"](bytes(1000)), "zstd", False),
    (gzip.compress(brotli.compress(bytes(2000))), "br, gzip", True),  # the inner coding passes it
    (bytes(2000), None, False),
    (b"not gzip", "gzip", False),  # does not decode at all: nothing to bound
])
def test_decodes_past(body, encoding, past):
    from rollouttap.store.codings import decodes_past
    assert decodes_past(body, encoding, limit=1000) is past
