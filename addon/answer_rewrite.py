"""Answers as the agent must see them: injected token-id fields hidden from a JSON answer or a stream (decoding
what a server compressed although asked not to), and whether a stream reached its terminal event.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from mitmproxy import http

from rollouttap.addon import tokenids
from rollouttap.addon.streamtap import decoded
from rollouttap.responses_shapes import FINAL_EVENTS
from rollouttap.store.codings import gunzip

log = logging.getLogger(__name__)


def stream_rewrite(resp: http.Response, injection: tokenids.Injection | None,
                   meta: dict[str, Any]) -> Callable[[bytes], bytes] | None:
    """What turns the server's stream into the agent's: token ids stripped, after decoding it if the server
    compressed it although asked not to (the agent then gets it plain, as its client would have read it)."""
    encoding = resp.headers.get("content-encoding", "").strip().lower()
    if injection is None:  # passed on as it came; watched, if compressed, for how it ends (see StreamTap)
        return decoded(encoding, None) if encoding not in ("", "identity") else None
    strip = tokenids.StreamStripper(injection).feed
    if encoding in ("", "identity"):
        rewrite = strip
    else:
        if (rewrite := decoded(encoding, strip)) is None:
            log.warning("rollouttap: cannot decode a %s stream; its token ids reach the agent", encoding)
            return None
        del resp.headers["content-encoding"]
        meta["decoded_stream"] = encoding
    # Stripping shortens the body: a server's Content-Length would leave the client waiting for bytes that
    # never come (vLLM sends chunks, other servers may not).
    if resp.headers.pop("content-length", None) is not None or encoding not in ("", "identity"):
        resp.headers["transfer-encoding"] = "chunked"
    return rewrite


def strip_json_answer(resp: http.Response, injection: tokenids.Injection) -> None:
    """Hide injected fields from a non-streamed answer, decoding (and re-encoding) it if the server
    compressed it all the same."""
    try:
        coding = resp.headers.get("content-encoding", "").strip().lower()
        plain = gunzip(resp.raw_content or b"") if coding in ("gzip", "x-gzip") else resp.get_content()
    except ValueError as exc:  # an unknown or broken content-encoding: leave the answer as it came
        log.warning("rollouttap: cannot decode a %s answer to hide token ids: %s",
                    resp.headers.get("content-encoding"), exc)
        return
    if plain:
        stripped = tokenids.strip_response_json(plain, injection)
        if stripped is not plain:
            resp.content = stripped


# How an OpenAI-style stream ends: chat and /completions with ``data: [DONE]``, the Responses API with its final
# response event (pydantic writes the event's ``type`` last).
_STREAM_ENDS = (b"data: [DONE]", b"data:[DONE]", *(b'"type":"%s"}' % kind.encode() for kind in FINAL_EVENTS))


def sse_finished(raw: bytes | bytearray) -> bool:
    """Whether an OpenAI-style event stream has sent its terminal event."""
    return bytes(raw[-64:]).rstrip().endswith(_STREAM_ENDS)
