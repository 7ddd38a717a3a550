"""Pure builders for vLLM-shaped OpenAI responses: what the scripted upstream sends, byte for byte.

The shapes follow vLLM 0.10.2+ (the versions with ``return_token_ids``), ``reasoning_content``
spelling by default (newer vLLM spells it ``reasoning``: ``reasoning_field``), and newer vLLM's rule for
parser-swallowed stream chunks (sent when token ids or logprobs were asked for). Not modelled: newer
fields vLLM adds only on request or by server flags (``prompt_text``, ``metrics``, continuous usage).
Non-streamed bodies are pydantic ``model_dump()`` output, so every field of the response models is present,
unset ones as ``null``: a request without ``return_token_ids`` gets ``"prompt_token_ids": null`` (top level)
and ``"token_ids": null`` (per choice), one without ``logprobs`` gets ``"logprobs": null``. Chat stream chunks are ``model_dump_json(exclude_unset=True)``:
the first chunk carries ``"prompt_token_ids"`` (a list, or ``null`` when not requested), every later
choice ``"logprobs"`` and ``"token_ids"`` (lists or ``null``), the final one also ``"stop_reason"``;
the usage chunk drops nulls. Completions stream chunks dump every field. ``ignore_token_ids`` mimics a
server without the feature (vLLM < 0.10.2): no ``token_ids``/``prompt_token_ids`` keys at all and
``logprobs`` always ``null``. ``skip_swallowed`` mimics vLLM before PR #29074 (merged 2025-11-20): a
stream chunk whose text a tool or reasoning parser swallowed is not sent at all, its token ids and logprobs
with it, so the ids a stream carries fall short of its usage's ``completion_tokens``.
"""

from __future__ import annotations

import json
import uuid
import weakref
import zlib
from dataclasses import dataclass
from typing import Any, Iterable

from rollouttap.testing.fake_tokenizer import arguments_text, tool_call_text
from rollouttap.testing.replies import Reply


@dataclass(frozen=True)
class Span:
    """Characters ``[start, end)`` of the generated text and what they are (how a parser routes them)."""
    start: int
    end: int
    kind: str  # markup | reasoning | content | tool_head | tool_args | tool_tail
    index: int = 0


@dataclass(frozen=True)
class GeneratedToolCall:
    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Generation:
    """One generated completion: the ids sent (cut at max_tokens; eos last when finished) and the parse."""
    prompt_ids: list[int]
    ids: list[int]
    text: str
    visible: int  # characters of ``text`` the ids cover
    spans: tuple[Span, ...]
    content: str | None
    reasoning: str | None
    tool_calls: tuple[GeneratedToolCall, ...]  # the parsed ones (complete within the ids)
    finish_reason: str
    calls_in_text: tuple[GeneratedToolCall, ...] = ()  # every call in ``text``, indexed like spans


@dataclass(frozen=True)
class Options:
    """What the request asked for, resolved against the server's settings."""
    token_ids: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    tokens_as_ids: bool = False
    include_usage: bool = False
    reasoning_field: str = "reasoning_content"
    omit_token_fields: bool = False  # ignore_token_ids: no token_ids/prompt_token_ids keys at all
    skip_swallowed: bool = False  # vLLM < PR #29074: a chunk whose text a parser swallowed is never sent

    @classmethod
    def from_request(cls, request: dict[str, Any], *, ignore_token_ids: bool = False,
                     reasoning_field: str = "reasoning_content", chat: bool = True,
                     skip_swallowed: bool = False) -> Options:
        """Resolve the options of one request."""
        stream_options = request.get("stream_options")
        logprobs = request.get("logprobs")
        wants_logprobs = bool(logprobs) if chat else logprobs is not None
        top = int(request.get("top_logprobs") or 0) if chat else int(logprobs or 0)
        return cls(
            token_ids=bool(request.get("return_token_ids")) and not ignore_token_ids,
            logprobs=wants_logprobs and not ignore_token_ids, top_logprobs=top,
            tokens_as_ids=bool(request.get("return_tokens_as_token_ids")),
            # vLLM's StreamOptions defaults include_usage to true: an object without it asks for usage.
            include_usage=bool(request.get("stream")) and isinstance(stream_options, dict)
            and bool(stream_options.get("include_usage", True)),
            reasoning_field=reasoning_field, omit_token_fields=ignore_token_ids, skip_swallowed=skip_swallowed)


def token_logprob(position: int, token_id: int) -> float:
    """The scripted model's deterministic logprob for sampling ``token_id`` at completion ``position``."""
    h = zlib.crc32(b"%d:%d" % (position, token_id))
    return -round((h % 100_000) / 20_000 + 0.001, 6)


def new_id(prefix: str) -> str:
    """A response or tool-call id in vLLM's format."""
    return f"{prefix}-{uuid.uuid4().hex}"


def dumps(obj: Any) -> bytes:
    """JSON as FastAPI/pydantic write it: compact, UTF-8, non-ASCII kept."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def sse(obj: Any) -> bytes:
    """One SSE event carrying ``obj`` as JSON."""
    return b"data: " + dumps(obj) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


# -- generation ----------------------------------------------------------------------------------

def _segments(reply: Reply, calls: list[GeneratedToolCall]) -> list[tuple[str, str, int]]:
    segments: list[tuple[str, str, int]] = []
    if reply.reasoning:
        segments += [("<think>\n", "markup", 0), (reply.reasoning, "reasoning", 0), ("\n</think>\n\n", "markup", 0)]
    if reply.content:
        segments.append((reply.content, "content", 0))
    for i, call in enumerate(calls):
        sep = "\n" if (reply.content or i > 0) else ""
        head = tool_call_text(call.name, "")  # '{"name": "x", "arguments": }'
        segments += [(f"{sep}<tool_call>\n", "markup", i), (head[:-1], "tool_head", i),
                     (call.arguments, "tool_args", i), ("}\n</tool_call>", "tool_tail", i)]
    return segments


def _layout(segments: list[tuple[str, str, int]]) -> tuple[str, tuple[Span, ...]]:
    spans, pos = [], 0
    for text, kind, index in segments:
        spans.append(Span(pos, pos + len(text), kind, index))
        pos += len(text)
    return "".join(t for t, _, _ in segments), tuple(spans)


def _max_tokens(request: dict[str, Any]) -> int | None:
    value = request.get("max_completion_tokens") or request.get("max_tokens")
    return int(value) if value is not None else None


def char_offset(tokenizer: Any, text: str, ids: list[int]) -> int:
    """How many characters of ``text`` the ids decode to (an incomplete UTF-8 tail does not count)."""
    decoded = tokenizer.decode(ids).rstrip("\ufffd")
    n = min(len(decoded), len(text))
    return n if text.startswith(decoded[:n]) else len(_common_prefix(text, decoded))


def char_offsets(tokenizer: Any, text: str, ids: list[int], ends: Iterable[int]) -> list[int]:
    """:func:`char_offset` of ``ids[:end]`` for ascending ``ends``, decoding only the new tokens plus a few
    before them as context (as vLLM's incremental detokenizer does), since decoding a suffix alone can
    differ (SentencePiece drops a leading space)."""
    out: list[int] = []
    base_token = base_char = 0  # ids[:base_token] decode to exactly text[:base_char]
    for end in ends:
        context = max(0, base_token - 5)
        head = tokenizer.decode(ids[context:base_token])
        whole = tokenizer.decode(ids[context:end])
        piece = whole[len(head):]
        complete = piece.rstrip("\ufffd")
        if whole.startswith(head) and text.startswith(complete, base_char):
            offset = base_char + len(complete)
            if len(complete) == len(piece):
                base_token, base_char = end, offset
        else:
            offset = char_offset(tokenizer, text, ids[:end])
        out.append(min(offset, len(text)))
    return out


def _common_prefix(a: str, b: str) -> str:
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    return a[:i]


def _finish(request: dict[str, Any], reply: Reply, tokenizer: Any, prompt_ids: list[int],
            segments: list[tuple[str, str, int]], calls: list[GeneratedToolCall]) -> Generation:
    text, spans = _layout(segments)
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    finish = reply.finish_reason or ("tool_calls" if calls else "stop")
    if finish != "length":
        ids.append(tokenizer.eos_token_id)
    limit = _max_tokens(request)
    visible = len(text)
    if limit is not None and len(ids) > limit:
        ids, finish = ids[:limit], "length"
    if finish == "length":
        visible = char_offset(tokenizer, text, ids)
    # A tool call cut before its closing tag is not parsed (vLLM's hermes parser needs the tag too).
    ends = {s.index: s.end for s in spans if s.kind == "tool_tail"}
    kept = tuple(c for i, c in enumerate(calls) if ends[i] <= visible)
    if finish == "tool_calls" and not kept:
        finish = "length"
    return Generation(prompt_ids, ids, text, visible, spans, _text_of("content", text, spans, visible),
                      _text_of("reasoning", text, spans, visible), kept, finish, tuple(calls))


def _text_of(kind: str, text: str, spans: tuple[Span, ...], visible: int) -> str | None:
    parts = [text[s.start:min(s.end, visible)] for s in spans if s.kind == kind and s.start < visible]
    return "".join(parts) if parts else None


def generate_chat(request: dict[str, Any], reply: Reply, tokenizer: Any) -> Generation:
    """The completion a hermes-style model produces for ``reply``, tokenized, with its prompt ids."""
    kwargs = dict(request.get("chat_template_kwargs") or {})
    prompt = tokenizer.apply_chat_template(request.get("messages") or [], tools=request.get("tools") or None,
                                           add_generation_prompt=True, tokenize=False, **kwargs)
    prompt_ids = list(tokenizer.encode(prompt, add_special_tokens=False))
    calls = [GeneratedToolCall(new_id("chatcmpl-tool"), c.name, arguments_text(c.arguments))
             for c in reply.tool_calls]
    return _finish(request, reply, tokenizer, prompt_ids, _segments(reply, calls), calls)


def generate_completion(request: dict[str, Any], reply: Reply, tokenizer: Any) -> Generation:
    """A plain-text completion of ``prompt`` (a string or a list of token ids)."""
    prompt = request.get("prompt")
    prompt_ids = list(prompt) if isinstance(prompt, list) else list(tokenizer.encode(prompt or "", add_special_tokens=True))
    text_reply = Reply(content=reply.content or "", finish_reason=reply.finish_reason)
    return _finish(request, text_reply, tokenizer, prompt_ids, [(text_reply.content or "", "content", 0)], [])


# -- shared pieces -------------------------------------------------------------------------------

def usage(gen: Generation, *, with_details: bool = True) -> dict[str, Any]:
    """vLLM's UsageInfo (``prompt_tokens_details`` only in non-streamed bodies)."""
    body: dict[str, Any] = {"prompt_tokens": len(gen.prompt_ids), "total_tokens": len(gen.prompt_ids) + len(gen.ids),
                            "completion_tokens": len(gen.ids)}
    if with_details:
        body["prompt_tokens_details"] = None
    return body


_TOKEN_STRINGS: weakref.WeakKeyDictionary[Any, dict[int, str]] = weakref.WeakKeyDictionary()


def _token_str(tokenizer: Any, token_id: int, as_ids: bool) -> str:
    if as_ids:
        return f"token_id:{token_id}"
    try:
        cache = _TOKEN_STRINGS.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable
        return tokenizer.decode([token_id])
    token = cache.get(token_id)
    if token is None:
        token = cache[token_id] = tokenizer.decode([token_id])
    return token


def chat_logprobs(tokenizer: Any, ids: list[int], start: int, opts: Options) -> dict[str, Any]:
    """``choices[i].logprobs`` for completion tokens ``ids`` beginning at position ``start``."""
    content = []
    for j, token_id in enumerate(ids, start):
        token = _token_str(tokenizer, token_id, opts.tokens_as_ids)
        lp = token_logprob(j, token_id)
        entry = {"token": token, "logprob": lp, "bytes": list(token.encode("utf-8")), "top_logprobs": []}
        for rank in range(opts.top_logprobs):
            alt = token_id if rank == 0 else token_id + rank
            alt_token = _token_str(tokenizer, alt, opts.tokens_as_ids)
            entry["top_logprobs"].append({"token": alt_token, "logprob": lp if rank == 0 else lp - rank,
                                          "bytes": list(alt_token.encode("utf-8"))})
        content.append(entry)
    return {"content": content}


def completion_logprobs(tokenizer: Any, ids: list[int], start: int, text_start: int, opts: Options) -> dict[str, Any]:
    """``choices[i].logprobs`` of /v1/completions (the legacy parallel-lists format)."""
    tokens = [_token_str(tokenizer, t, opts.tokens_as_ids) for t in ids]
    lps = [token_logprob(j, t) for j, t in enumerate(ids, start)]
    offsets, pos = [], text_start
    for token in tokens:
        offsets.append(pos)
        pos += len(token)
    return {"text_offset": offsets, "token_logprobs": lps, "tokens": tokens,
            "top_logprobs": [{tok: lp} for tok, lp in zip(tokens, lps)]}


def error_body(status: int, message: str, kind: str | None = None, param: str | None = None) -> dict[str, Any]:
    """vLLM's ErrorResponse (``kind``: its type, else vLLM's name for the status)."""
    kind = kind or {400: "BadRequestError", 404: "NotFoundError", 429: "TooManyRequestsError"}.get(
        status, "InternalServerError")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}
