"""Reading one OpenAI-compatible answer back: a streamed (SSE) or non-streamed chat/completions body
becomes a :class:`ChatResult`, including vLLM's token ids and logprobs when they were returned.

Only choice 0 is read (agents ask for one choice; ``n > 1`` answers keep their other choices unread).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from rollouttap.manager.prompt_ids import PromptIdsReader
from rollouttap.store.sse import json_events, parse_sse

_TOKEN_ID_RE = re.compile(r"token_id:(-?\d+)")


@dataclass(frozen=True)
class ChatResult:
    """The reassembled answer. ``content`` holds ``text`` for /completions answers."""
    id: str | None = None
    model: str | None = None
    created: int | None = None
    role: str | None = None
    content: str | None = None
    reasoning: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    prompt_token_ids: list[int] | None = None
    completion_token_ids: list[int] | None = None
    completion_logprobs: list[float] | None = None
    logprob_tokens: list[str] | None = None
    streamed: bool = False
    chunks: int = 0
    done: bool = False  # a stream ended with data: [DONE]
    error: dict[str, Any] | None = None  # an error object the server sent instead of (or inside) the answer
    # Completion tokens the answer carries over all its choices (ids, else logprob entries): what the usage's
    # completion_tokens counts. None when no choice carries either.
    tokens_carried: int | None = None


def ids_from_logprob_tokens(tokens: Iterable[str] | None) -> list[int] | None:
    """Token ids spelled ``token_id:123`` (vLLM's return_tokens_as_token_ids); None unless all are."""
    if tokens is None:
        return None
    ids = []
    for token in tokens:
        match = _TOKEN_ID_RE.fullmatch(token)
        if match is None:
            return None
        ids.append(int(match.group(1)))
    return ids


def _reasoning_of(message: dict[str, Any]) -> str | None:
    # vLLM spelled it reasoning_content, newer versions spell it reasoning; some send both, equal.
    value = message.get("reasoning_content")
    return value if value is not None else message.get("reasoning")


def _logprob_lists(logprobs: Any) -> tuple[list[float], list[str]] | None:
    """(logprobs, tokens) from a chat (``content[]``) or completions (parallel lists) logprobs object."""
    if not isinstance(logprobs, dict):
        return None
    if isinstance(logprobs.get("content"), list):
        entries = logprobs["content"]
        return [e.get("logprob") for e in entries], [e.get("token", "") for e in entries]
    if isinstance(logprobs.get("token_logprobs"), list):
        return list(logprobs["token_logprobs"]), list(logprobs.get("tokens") or [])
    return None


def error_of(body: dict[str, Any]) -> dict[str, Any] | None:
    """The error object a server sent in a body (``{"error": {...}}``, or vLLM's ``"object": "error"``)."""
    if isinstance(body.get("error"), dict):
        return body["error"]
    if body.get("object") == "error":
        return {k: v for k, v in body.items() if k != "object"}
    return None


def _tokens_of(choice: Any) -> int | None:
    """How many completion tokens one choice (or a stream chunk's choice) carries ids or logprobs for."""
    if not isinstance(choice, dict):
        return None
    if isinstance(choice.get("token_ids"), list):
        return len(choice["token_ids"])
    lists = _logprob_lists(choice.get("logprobs"))
    return len(lists[0]) if lists is not None else None


def _tokens_carried(choices: Iterable[Any]) -> int | None:
    counts = [n for choice in choices if (n := _tokens_of(choice)) is not None]
    return sum(counts) if counts else None


def ids_problem(result: ChatResult, *, chat: bool = True) -> str | None:
    """Why an answer's token ids are not the whole sequence the server sampled, or None (also when it sent no
    usage). vLLM before PR #29074 (merged 2025-11-20) sent no stream chunk for text a tool or reasoning parser
    swallowed, its ids and logprobs with it: the ids left add up to fewer tokens than the usage counts, and
    joined they make a sequence the model never produced. The prompt is checked for chat only: a /completions
    call may send several prompts, and its usage counts them all."""
    usage = result.usage if isinstance(result.usage, dict) else {}
    generated, carried = usage.get("completion_tokens"), result.tokens_carried
    if type(generated) is int and carried is not None and generated != carried:
        return f"the usage counts {generated} completion tokens, the answer carries {carried}"
    prompt, ids = usage.get("prompt_tokens"), result.prompt_token_ids
    if chat and type(prompt) is int and ids is not None and prompt != len(ids):
        return f"the usage counts {prompt} prompt tokens, the answer carries {len(ids)} prompt ids"
    return None


def _int_list(value: Any) -> list[int] | None:
    return [int(v) for v in value] if isinstance(value, list) else None


def parse_chat_body(body: Any, *, prompt_ids: list[int] | None = None) -> ChatResult:
    """A non-streamed chat.completion or text_completion body; ``prompt_ids``: its top-level prompt ids, decoded
    already (``prompt_ids.PromptIdsReader``)."""
    if not isinstance(body, dict):
        return ChatResult(error={"message": "response body is not a JSON object"})
    error = error_of(body)
    choices = body.get("choices") or []
    choice = next((c for c in choices if c.get("index", 0) == 0), choices[0] if choices else {})
    message = choice.get("message") or {}
    lists = _logprob_lists(choice.get("logprobs"))
    content = message.get("content") if "message" in choice else choice.get("text")
    return ChatResult(
        id=body.get("id"), model=body.get("model"), created=body.get("created"),
        role=message.get("role") if message else None, content=content, reasoning=_reasoning_of(message),
        tool_calls=[_tool_call(tc) for tc in message.get("tool_calls") or []],
        finish_reason=choice.get("finish_reason"), usage=body.get("usage"),
        prompt_token_ids=prompt_ids if prompt_ids is not None else _int_list(
            body.get("prompt_token_ids", choice.get("prompt_token_ids"))),
        completion_token_ids=_int_list(choice.get("token_ids")),
        completion_logprobs=lists[0] if lists else None, logprob_tokens=lists[1] if lists else None,
        error=error, tokens_carried=_tokens_carried(choices))


def _tool_call(tc: dict[str, Any]) -> dict[str, Any]:
    function = tc.get("function") or {}
    return {"id": tc.get("id"), "type": tc.get("type") or "function",
            "function": {"name": function.get("name"), "arguments": function.get("arguments") or ""}}


class StreamAccumulator:
    """Merges chat.completion.chunk (or text_completion) objects for choice 0, in arrival order."""

    def __init__(self) -> None:
        self.meta: dict[str, Any] = {}
        self.role: str | None = None
        self.content: list[str] | None = None
        self.reasoning: list[str] | None = None
        self.calls: dict[int, dict[str, Any]] = {}
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.prompt_ids: list[int] | None = None
        self.ids: list[int] | None = None
        self.logprobs: list[float] | None = None
        self.tokens: list[str] | None = None
        self.chunks = 0
        self.error: dict[str, Any] | None = None
        self.carried: int | None = None  # completion tokens carried, every choice's

    def add(self, chunk: Any, prompt_ids: list[int] | None = None) -> None:
        """Merge one parsed chunk; ``prompt_ids``: its top-level prompt ids, decoded already."""
        if not isinstance(chunk, dict):
            return
        self.chunks += 1
        self.error = error_of(chunk) or self.error
        for key in ("id", "model", "created"):
            if chunk.get(key) is not None:
                self.meta.setdefault(key, chunk[key])
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        if self.prompt_ids is None and chunk.get("prompt_token_ids") is not None:
            self.prompt_ids = prompt_ids if prompt_ids is not None else _int_list(chunk["prompt_token_ids"])
        for choice in chunk.get("choices") or []:
            if (carried := _tokens_of(choice)) is not None:
                self.carried = (self.carried or 0) + carried
            if choice.get("index", 0) == 0:
                self._add_choice(choice)

    def _add_choice(self, choice: dict[str, Any]) -> None:
        if self.prompt_ids is None and choice.get("prompt_token_ids") is not None:
            self.prompt_ids = _int_list(choice["prompt_token_ids"])
        delta = choice.get("delta") or {}
        self.role = self.role or delta.get("role")
        text = delta.get("content") if "delta" in choice else choice.get("text")
        if text is not None:
            self.content = (self.content or []) + [text]
        reasoning = _reasoning_of(delta)
        if reasoning is not None:
            self.reasoning = (self.reasoning or []) + [reasoning]
        for frag in delta.get("tool_calls") or []:
            self._add_tool_fragment(frag)
        if choice.get("finish_reason") is not None:
            self.finish_reason = choice["finish_reason"]
        if isinstance(choice.get("token_ids"), list):
            self.ids = (self.ids or []) + _int_list(choice["token_ids"])  # type: ignore[operator]
        lists = _logprob_lists(choice.get("logprobs"))
        if lists is not None:
            self.logprobs = (self.logprobs or []) + lists[0]
            self.tokens = (self.tokens or []) + lists[1]

    def _add_tool_fragment(self, frag: dict[str, Any]) -> None:
        index = frag.get("index", len(self.calls))
        call = self.calls.setdefault(index, {"id": None, "type": "function",
                                             "function": {"name": None, "arguments": ""}})
        call["id"] = call["id"] or frag.get("id")
        call["type"] = frag.get("type") or call["type"]
        function = frag.get("function") or {}
        call["function"]["name"] = call["function"]["name"] or function.get("name")
        call["function"]["arguments"] += function.get("arguments") or ""

    def result(self, *, done: bool = False) -> ChatResult:
        """The answer as merged so far."""
        return ChatResult(
            id=self.meta.get("id"), model=self.meta.get("model"), created=self.meta.get("created"),
            role=self.role, content="".join(self.content) if self.content is not None else None,
            reasoning="".join(self.reasoning) if self.reasoning is not None else None,
            tool_calls=[self.calls[i] for i in sorted(self.calls)], finish_reason=self.finish_reason,
            usage=self.usage, prompt_token_ids=self.prompt_ids, completion_token_ids=self.ids,
            completion_logprobs=self.logprobs, logprob_tokens=self.tokens, streamed=True,
            chunks=self.chunks, done=done, error=self.error, tokens_carried=self.carried)


def reassemble_chat_chunks(chunks: Iterable[Any], *, done: bool = False) -> ChatResult:
    """Merge parsed chunk objects (choice 0)."""
    acc = StreamAccumulator()
    for chunk in chunks:
        acc.add(chunk)
    return acc.result(done=done)


def reassemble_chat_stream(sse: str | bytes, reader: PromptIdsReader | None = None) -> ChatResult:
    """Reassemble a captured SSE body (chat or completions): content, reasoning, tool calls merged by
    index (id and name from their first fragment, arguments concatenated), finish_reason, usage,
    token ids and logprobs. ``reader`` decodes the chunks (the prompt ids past those of its last answer)."""
    events = parse_sse(sse)
    done = any(e.is_done for e in events)
    if reader is None:
        return reassemble_chat_chunks(json_events(events), done=done)
    acc = StreamAccumulator()
    for chunk, prompt_ids in json_events(events, loads=reader.loads):
        acc.add(chunk, prompt_ids)
    return acc.result(done=done)
