"""The JSON shapes of vLLM's OpenAI-compatible responses, built from plain data."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from .generation import TokenChoice
from .hermes import ParsedToolCall

TokenNamer = Callable[[int], str]


def new_id(prefix: str) -> str:
    """A fresh response or tool-call id in vLLM's style (prefix-hex)."""
    return f"{prefix}-{uuid.uuid4().hex}"


def error_body(
    message: str, status: int, kind: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """OpenAI's error object (``kind``: the type, else vLLM's name for the status)."""
    kind = kind or {400: "BadRequestError", 404: "NotFoundError"}.get(status, "InternalServerError")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """The usage block of responses and of the last stream chunk."""
    return {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
        "prompt_tokens_details": None,
    }


def token_label(token_id: int, namer: TokenNamer, as_ids: bool) -> str:
    """How a token is named in logprobs: its text, or "token_id:N" (return_tokens_as_token_ids)."""
    return f"token_id:{token_id}" if as_ids else namer(token_id)


def chat_logprobs(
    choices: Sequence[TokenChoice], namer: TokenNamer, as_ids: bool
) -> dict[str, Any]:
    """choices[i].logprobs of a chat response: one content entry per generated token."""
    return {"content": [_chat_entry(c, namer, as_ids) for c in choices]}


def _chat_entry(choice: TokenChoice, namer: TokenNamer, as_ids: bool) -> dict[str, Any]:
    entry = _chat_logprob(choice.token_id, choice.logprob, namer, as_ids)
    entry["top_logprobs"] = [_chat_logprob(i, lp, namer, as_ids) for i, lp in choice.top]
    return entry


def _chat_logprob(token_id: int, logprob: float, namer: TokenNamer, as_ids: bool) -> dict[str, Any]:
    label = token_label(token_id, namer, as_ids)
    return {"token": label, "logprob": logprob, "bytes": list(label.encode("utf-8", "replace"))}


def completion_logprobs(
    choices: Sequence[TokenChoice],
    namer: TokenNamer,
    as_ids: bool,
    *,
    first_offset: int = 0,
    with_top: bool = True,
) -> dict[str, Any]:
    """choices[i].logprobs of a completions response (tokens, token_logprobs, top, offsets)."""
    tokens = [token_label(c.token_id, namer, as_ids) for c in choices]
    offsets: list[int] = []
    offset = first_offset
    for choice in choices:
        offsets.append(offset)
        offset += len(namer(choice.token_id))
    return {
        "text_offset": offsets,
        "token_logprobs": [c.logprob for c in choices],
        "tokens": tokens,
        "top_logprobs": [_completion_top(c, namer, as_ids) if with_top else None for c in choices],
    }


def _completion_top(choice: TokenChoice, namer: TokenNamer, as_ids: bool) -> dict[str, float]:
    """vLLM lists the sampled token first, then the top alternatives."""
    top = {token_label(choice.token_id, namer, as_ids): choice.logprob}
    for token_id, logprob in choice.top:
        top.setdefault(token_label(token_id, namer, as_ids), logprob)
    return top


def tool_call_objects(calls: Sequence[ParsedToolCall], ids: Sequence[str]) -> list[dict[str, Any]]:
    """message.tool_calls of a chat response."""
    return [
        {"id": cid, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for c, cid in zip(calls, ids, strict=True)
    ]


def tool_call_deltas(calls: Sequence[ParsedToolCall], ids: Sequence[str]) -> list[dict[str, Any]]:
    """delta.tool_calls of a stream chunk: one whole fragment per call."""
    return [dict(obj, index=i) for i, obj in enumerate(tool_call_objects(calls, ids))]


def assistant_message(
    content: str | None, reasoning: str | None, tool_calls: list[dict[str, Any]]
) -> dict[str, Any]:
    """choices[i].message; reasoning goes in both vLLM spellings (reasoning_content, reasoning)."""
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
        message["reasoning"] = reasoning
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


def chat_response(
    *, rid: str, model: str, choice: dict[str, Any], prompt_ids: list[int] | None,
    prompt_tokens: int, completion_tokens: int,
) -> dict[str, Any]:
    """A whole /v1/chat/completions response around one finished choice."""
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage(prompt_tokens, completion_tokens),
        "prompt_logprobs": None,
        "prompt_token_ids": prompt_ids,
        "kv_transfer_params": None,
    }


def chat_chunk(rid: str, model: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """One chat.completion.chunk (extra: prompt_token_ids on the first, usage on the last)."""
    chunk = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }
    chunk.update(extra)
    return chunk


def completion_response(
    *, rid: str, model: str, choices: list[dict[str, Any]], prompt_tokens: int,
    completion_tokens: int,
) -> dict[str, Any]:
    """A whole /v1/completions response."""
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens),
        "kv_transfer_params": None,
    }


def completion_chunk(rid: str, model: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """One streamed text_completion chunk."""
    chunk = {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }
    chunk.update(extra)
    return chunk


def models_list(model: str, max_model_len: int) -> dict[str, Any]:
    """GET /v1/models."""
    return {
        "object": "list",
        "data": [{
            "id": model,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "rollouttap",
            "root": model,
            "parent": None,
            "max_model_len": max_model_len,
            "permission": [],
        }],
    }
