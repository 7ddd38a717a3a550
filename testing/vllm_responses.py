"""Response bodies and stream chunks in vLLM's exact JSON shapes (see vllm_format for the null rules)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from rollouttap.testing.vllm_format import (
    Generation, Options, char_offsets, chat_logprobs, completion_logprobs, new_id, usage,
)


@dataclass(frozen=True)
class ResponseMeta:
    id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def new(cls, model: str, *, chat: bool = True) -> ResponseMeta:
        """Fresh response id (``chatcmpl-…`` or ``cmpl-…``) and timestamp."""
        return cls(new_id("chatcmpl" if chat else "cmpl"), model)


def _chat_content(gen: Generation) -> str | None:
    # vLLM's hermes parser gives None when only tool calls were generated; plain text may be "".
    return gen.content if gen.tool_calls else (gen.content or "")


def chat_body(gen: Generation, meta: ResponseMeta, opts: Options, tokenizer: Any) -> dict[str, Any]:
    """A non-streamed ``chat.completion`` body (pydantic ``model_dump()``: unset fields are null)."""
    message: dict[str, Any] = {
        "role": "assistant", "content": _chat_content(gen), "refusal": None, "annotations": None,
        "audio": None, "function_call": None,
        "tool_calls": [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                       for c in gen.tool_calls],
        opts.reasoning_field: gen.reasoning,
    }
    choice: dict[str, Any] = {
        "index": 0, "message": message,
        "logprobs": chat_logprobs(tokenizer, gen.ids, 0, opts) if opts.logprobs else None,
        "finish_reason": gen.finish_reason, "stop_reason": None,
    }
    if not opts.omit_token_fields:
        choice["token_ids"] = gen.ids if opts.token_ids else None
    body: dict[str, Any] = {
        "id": meta.id, "object": "chat.completion", "created": meta.created, "model": meta.model,
        "choices": [choice], "service_tier": None, "system_fingerprint": None, "usage": usage(gen),
        "prompt_logprobs": None,
    }
    if not opts.omit_token_fields:
        body["prompt_token_ids"] = gen.prompt_ids if opts.token_ids else None
    body["kv_transfer_params"] = None
    return body


def chunk_ranges(gen: Generation, tokenizer: Any, tokens_per_chunk: int) -> Iterator[tuple[int, int, int, int]]:
    """(token start, token end, char start, char end) per chunk; chars never run backwards."""
    step, n = max(1, tokens_per_chunk), len(gen.ids)
    starts = list(range(0, n, step))
    ends = [min(start + step, n) for start in starts]
    inner = char_offsets(tokenizer, gen.text, gen.ids, ends[:-1])
    offset = 0
    for start, end, upto in zip(starts, ends, [*inner, gen.visible]):
        upto = min(max(offset, upto), gen.visible)
        yield start, end, offset, upto
        offset = upto


def chat_delta(gen: Generation, lo: int, hi: int, headers_sent: set[int], opts: Options) -> dict[str, Any]:
    """Route generated characters ``[lo, hi)`` the way vLLM's tool and reasoning parsers do."""
    content, reasoning, calls = [], [], {}  # type: list[str], list[str], dict[int, dict[str, Any]]
    for span in gen.spans:
        if span.kind == "tool_head":
            if span.end <= hi and span.index not in headers_sent:
                headers_sent.add(span.index)
                call = gen.calls_in_text[span.index]
                calls[span.index] = {"id": call.id, "type": "function", "index": span.index,
                                     "function": {"name": call.name}}
            continue
        a, b = max(span.start, lo), min(span.end, hi)
        if a >= b:
            continue
        piece = gen.text[a:b]
        if span.kind == "content":
            content.append(piece)
        elif span.kind == "reasoning":
            reasoning.append(piece)
        elif span.kind == "tool_args":
            frag = calls.setdefault(span.index, {"index": span.index, "function": {}})
            frag["function"]["arguments"] = frag["function"].get("arguments", "") + piece
    delta: dict[str, Any] = {}
    if content:
        delta["content"] = "".join(content)
    if reasoning:
        delta[opts.reasoning_field] = "".join(reasoning)
    if calls:
        delta["tool_calls"] = [calls[i] for i in sorted(calls)]
    return delta


def chat_chunks(gen: Generation, meta: ResponseMeta, opts: Options, tokenizer: Any, *,
                tokens_per_chunk: int = 4, parsers: bool = True) -> Iterator[dict[str, Any]]:
    """The ``chat.completion.chunk`` objects of a streamed answer, in order (without ``[DONE]``).

    ``parsers``: whether vLLM would run a tool/reasoning parser (tools offered, or reasoning):
    then chunks whose text a parser swallows are skipped unless token ids or logprobs were asked for, as
    vLLM does (logprobs since 2026; older vLLM skipped them unless token ids were asked for), and always with
    ``opts.skip_swallowed`` (vLLM before PR #29074 dropped them, ids and all).
    """
    head = {"id": meta.id, "object": "chat.completion.chunk", "created": meta.created, "model": meta.model}
    first: dict[str, Any] = {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                  "logprobs": None, "finish_reason": None}]}
    if not opts.omit_token_fields:
        first["prompt_token_ids"] = gen.prompt_ids if opts.token_ids else None
    yield first
    headers_sent: set[int] = set()
    ranges = list(chunk_ranges(gen, tokenizer, tokens_per_chunk)) or [(0, 0, 0, 0)]
    for start, end, lo, hi in ranges:
        last = end == len(gen.ids)
        delta = chat_delta(gen, lo, hi, headers_sent, opts)
        if not delta and not parsers:
            delta = {"content": ""}
        if not delta and not last and (opts.skip_swallowed or (not opts.token_ids and not opts.logprobs)):
            continue
        choice: dict[str, Any] = {
            "index": 0, "delta": delta,
            "logprobs": chat_logprobs(tokenizer, gen.ids[start:end], start, opts) if opts.logprobs else None,
            "finish_reason": gen.finish_reason if last else None,
        }
        if last:
            choice["stop_reason"] = None
        if not opts.omit_token_fields:
            choice["token_ids"] = gen.ids[start:end] if opts.token_ids else None
        yield {**head, "choices": [choice]}
    if opts.include_usage:
        yield {**head, "choices": [], "usage": usage(gen, with_details=False)}


def completion_body(gen: Generation, meta: ResponseMeta, opts: Options, tokenizer: Any) -> dict[str, Any]:
    """A non-streamed ``text_completion`` body."""
    choice: dict[str, Any] = {
        "index": 0, "text": gen.content or "",
        "logprobs": completion_logprobs(tokenizer, gen.ids, 0, 0, opts) if opts.logprobs else None,
        "finish_reason": gen.finish_reason, "stop_reason": None,
    }
    if not opts.omit_token_fields:
        choice["token_ids"] = gen.ids if opts.token_ids else None
    choice["prompt_logprobs"] = None
    if not opts.omit_token_fields:
        choice["prompt_token_ids"] = gen.prompt_ids if opts.token_ids else None
    return {"id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model,
            "choices": [choice], "service_tier": None, "system_fingerprint": None, "usage": usage(gen),
            "kv_transfer_params": None}


def completion_chunks(gen: Generation, meta: ResponseMeta, opts: Options, tokenizer: Any, *,
                      tokens_per_chunk: int = 4) -> Iterator[dict[str, Any]]:
    """The chunks of a streamed /v1/completions answer (vLLM dumps every field of these)."""
    head = {"id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model}
    ranges = list(chunk_ranges(gen, tokenizer, tokens_per_chunk)) or [(0, 0, 0, 0)]
    for start, end, lo, hi in ranges:
        last = end == len(gen.ids)
        choice: dict[str, Any] = {
            "index": 0, "text": gen.text[lo:hi],
            "logprobs": completion_logprobs(tokenizer, gen.ids[start:end], start, lo, opts) if opts.logprobs else None,
            "finish_reason": gen.finish_reason if last else None, "stop_reason": None,
        }
        if not opts.omit_token_fields:
            choice["token_ids"] = gen.ids[start:end] if opts.token_ids else None
            choice["prompt_token_ids"] = gen.prompt_ids if (opts.token_ids and start == 0) else None
        yield {**head, "choices": [choice], "usage": None}
    if opts.include_usage:
        yield {**head, "choices": [], "usage": usage(gen, with_details=False)}
