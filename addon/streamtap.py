"""A response stream callable that forwards bytes live and keeps a copy for the store."""

from __future__ import annotations

import time
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
