"""vLLM's Responses API (``POST /v1/responses``) answers of the scripted upstream, byte for byte.

The shapes, and the vLLM sources they follow, are in :mod:`rollouttap.responses_shapes` (shared with the
embedded policy server); this module turns a scripted :class:`Generation` into them: the chat route's
generation of the converted request, its logprobs, and its stream chunking (``tokens_per_chunk``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

from rollouttap.responses_input import chat_messages, chat_tools
from rollouttap.responses_shapes import (
    Generated, OutputCall, ResponsesMeta, StreamItems, chat_delta_pieces, max_output_tokens, reasoning_tokens,
    sse_event, stream_events, text_logprobs, top_logprobs,
)
from rollouttap.responses_shapes import response_body as _response_body
from rollouttap.testing.replies import Reply
from rollouttap.testing.vllm_format import Generation, Options, chat_logprobs, generate_chat
from rollouttap.testing.vllm_responses import chat_delta, chunk_ranges

__all__ = ["ResponsesMeta", "ResponsesTurn", "response_body", "response_events", "responses_turn", "sse_event"]

_ROUTING = Options(reasoning_field="reasoning")  # how chat_delta names the reasoning part


@dataclass(frozen=True)
class ResponsesTurn:
    """What one Responses request generated: the request as sent, the prompt text, the generation."""
    request: dict[str, Any]
    prompt_text: str
    gen: Generation
    parsers: bool  # whether vLLM would run a tool/reasoning parser (tools offered, or reasoning)


def responses_turn(request: dict[str, Any], reply: Reply, tokenizer: Any) -> ResponsesTurn:
    """Render the request's messages with the chat template and generate ``reply`` as the chat route does."""
    chat = {"messages": chat_messages(request), "tools": chat_tools(request),
            "max_tokens": request.get("max_output_tokens")}
    gen = generate_chat(chat, reply, tokenizer)
    prompt = tokenizer.apply_chat_template(chat["messages"], tools=chat["tools"], add_generation_prompt=True,
                                           tokenize=False)
    return ResponsesTurn(request, prompt, gen, bool(chat["tools"]) or bool(reply.reasoning))


def _text_logprobs(tokenizer: Any, ids: list[int], start: int, top: int, *, stream: bool) -> list[dict[str, Any]]:
    """``output_text.logprobs`` of the scripted ids (the chat route's logprobs, in the Responses shape)."""
    entries = chat_logprobs(tokenizer, ids, start, Options(logprobs=True, top_logprobs=top))["content"]
    return text_logprobs(entries, stream=stream)


def _generated(turn: ResponsesTurn, tokenizer: Any) -> Generated:
    gen, top = turn.gen, top_logprobs(turn.request)
    return Generated(
        prompt_text=turn.prompt_text, prompt_ids=gen.prompt_ids, text=gen.text[:gen.visible], ids=gen.ids,
        finish_reason=gen.finish_reason, parsers=turn.parsers, reasoning=gen.reasoning, content=gen.content,
        tool_calls=tuple(OutputCall(c.id, c.name, c.arguments) for c in gen.tool_calls),
        reasoning_tokens=reasoning_tokens(tokenizer, gen.ids),
        logprobs=None if top is None else _text_logprobs(tokenizer, gen.ids, 0, top, stream=False))


def response_body(turn: ResponsesTurn, meta: ResponsesMeta, tokenizer: Any, *,
                  in_progress: bool = False) -> dict[str, Any]:
    """A ``ResponsesResponse`` as vLLM serialises it; ``in_progress``: the one in response.created."""
    budget = max_output_tokens(turn.request, meta.max_model_len - len(turn.gen.prompt_ids))
    gen = None if in_progress else _generated(turn, tokenizer)
    return _response_body(turn.request, meta, gen, max_tokens=budget)


def _pieces(turn: ResponsesTurn, lo: int, hi: int, headers_sent: set[int]) -> list[tuple[str, Any]]:
    """One chunk's atomic deltas in vLLM's ``split_delta`` order: reasoning, content, tool calls by index."""
    if not turn.parsers:
        text = turn.gen.text[lo:hi]
        return [("content", text)] if text else []
    return chat_delta_pieces(chat_delta(turn.gen, lo, hi, headers_sent, _ROUTING))


def _item_events(turn: ResponsesTurn, meta: ResponsesMeta, tokenizer: Any,
                 tokens_per_chunk: int) -> Iterator[dict[str, Any]]:
    top = top_logprobs(turn.request)
    items, headers_sent = StreamItems(meta), set()  # type: StreamItems, set[int]
    for start, end, lo, hi in chunk_ranges(turn.gen, tokenizer, tokens_per_chunk):
        pieces = _pieces(turn, lo, hi, headers_sent)
        if not pieces:
            continue
        ids = turn.gen.ids[start:end]
        logprobs = [] if top is None else _text_logprobs(tokenizer, ids, start, top, stream=True)
        for kind, value in pieces:
            yield from items.step(kind, value, logprobs if kind == "content" else [])
    yield from items.close()


def response_events(turn: ResponsesTurn, meta: ResponsesMeta, tokenizer: Any, *,
                    tokens_per_chunk: int = 4) -> Iterator[dict[str, Any]]:
    """The events of a streamed answer, numbered; the last, response.completed, carries the final response."""
    initial = response_body(turn, meta, tokenizer, in_progress=True)
    return stream_events(initial, _item_events(turn, meta, tokenizer, tokens_per_chunk),
                         lambda: response_body(turn, meta.for_final(), tokenizer))
