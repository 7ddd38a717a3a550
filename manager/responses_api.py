"""Read an OpenAI Responses API answer (``POST …/responses``) as vLLM sends it, into a :class:`ChatResult`.

vLLM has no ``return_token_ids`` there; with ``enable_response_messages`` (the proxy adds it) its response
object carries ``input_messages`` (the rendered prompt and its ids) and ``output_messages`` (what the model
generated and its ids) as ``raw_message_tokens`` items. One model turn gives one input item and one output
item; vLLM before 2026-02 (PR #34188) gave a stream one output item per delta, whose ids joined are the answer's.
A request that ran several turns on the server (built-in tools) also lists its later prompts among the output
items: their ids joined are more than the usage's output tokens, and the call is read as one without ids (those
prompts are not the agent's). gpt-oss (harmony) models put harmony messages there, not ids: calls without ids
too. Items may be JSON strings (vLLM versions whose serializer fell back to ``model_dump_json`` in streams).
A stream carries the final response object in its last ``response.completed``
(or ``response.incomplete`` / ``response.failed``) event; a stream that ended before that has no answer.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from rollouttap.manager.chat_stream import ChatResult, error_of
from rollouttap.responses_shapes import FINAL_EVENTS
from rollouttap.store.sse import parse_sse

__all__ = ["parse_responses_body", "reassemble_responses_stream", "response_token_ids"]



def response_token_ids(body: dict[str, Any]) -> tuple[list[int], list[int]] | None:
    """(prompt ids, completion ids) from a response object's raw messages; None when it has none to trust."""
    inputs, outputs = _raw_items(body.get("input_messages")), _raw_items(body.get("output_messages"))
    if inputs is None or outputs is None or len(inputs) != 1 or not outputs:
        return None
    completion = [t for tokens in outputs for t in tokens]
    if len(outputs) > 1:
        usage = body.get("usage")
        generated = usage.get("output_tokens") if isinstance(usage, dict) else None
        if generated != len(completion):
            return None  # later server-side prompts among them, or no way to tell
    return inputs[0], completion


def _raw_items(value: Any) -> list[list[int]] | None:
    """The token ids of each ``raw_message_tokens`` item of a list; None unless every item is one."""
    if not isinstance(value, list):
        return None
    out = []
    for item in value:
        if isinstance(item, str):
            try:
                item = json.loads(item)
            except ValueError:
                return None
        if not isinstance(item, dict) or item.get("type", "raw_message_tokens") != "raw_message_tokens":
            return None
        tokens = item.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
            return None
        out.append(list(tokens))
    return out


def parse_responses_body(body: Any, *, streamed: bool = False, chunks: int = 0) -> ChatResult:
    """A non-streamed response object (or a stream's final one), read as a chat reply: output text parts are
    the content, function calls the tool calls, the status the finish reason, usage in chat's keys too."""
    if not isinstance(body, dict):
        return ChatResult(error={"message": "response body is not a JSON object"}, streamed=streamed)
    error = error_of(body)
    text: list[str] = []
    reasoning: list[str] = []
    calls: list[dict[str, Any]] = []
    role = None
    for item in body.get("output") or []:
        if not isinstance(item, dict):
            continue
        kind = item.get("type")
        if kind == "message":
            role = item.get("role") or role
            text += [part.get("text") or "" for part in item.get("content") or []
                     if isinstance(part, dict) and part.get("type") == "output_text"]
        elif kind == "reasoning":
            reasoning += [part.get("text") or "" for part in item.get("content") or [] if isinstance(part, dict)]
        elif kind == "function_call":
            calls.append({"id": item.get("call_id"), "type": "function",
                          "function": {"name": item.get("name"), "arguments": item.get("arguments") or ""}})
    ids = response_token_ids(body)
    return ChatResult(
        id=body.get("id"), model=body.get("model"), created=body.get("created_at"), role=role or "assistant",
        content="".join(text) if text or (not calls and error is None) else None,
        reasoning="".join(reasoning) if reasoning else None,
        tool_calls=calls, finish_reason=_finish_reason(body.get("status"), body.get("incomplete_details"), calls),
        usage=_chat_usage(body.get("usage")), prompt_token_ids=ids[0] if ids else None,
        completion_token_ids=ids[1] if ids else None, streamed=streamed,
        chunks=chunks, error=error)


def _chat_usage(usage: Any) -> dict[str, Any] | None:
    """Chat's usage keys for a response's (input/output tokens), the server's own kept beside them."""
    if not isinstance(usage, dict):
        return None
    return {"prompt_tokens": usage.get("input_tokens"), "completion_tokens": usage.get("output_tokens"),
            "total_tokens": usage.get("total_tokens"), **usage}


def _finish_reason(status: Any, incomplete: Any, calls: list[dict[str, Any]]) -> str | None:
    """Chat's finish_reason for a response's status (rows and the CLI speak chat)."""
    if status == "completed":
        return "tool_calls" if calls else "stop"
    if status == "incomplete":
        reason = incomplete.get("reason") if isinstance(incomplete, dict) else None
        return "length" if reason in (None, "max_output_tokens") else str(reason)
    return None


def reassemble_responses_stream(sse: str | bytes) -> ChatResult:
    """The answer of a Responses stream: its final response object; an ``error`` event is the error."""
    final: Any = None
    error: dict[str, Any] | None = None
    count = 0
    for event in parse_sse(sse):
        if event.data is None or event.is_done:
            continue
        try:
            doc = event.json()
        except ValueError:
            continue
        count += 1
        kind = doc.get("type") if isinstance(doc, dict) else None
        if kind in FINAL_EVENTS:
            final = doc.get("response")
        elif kind == "error":
            error = {k: v for k, v in doc.items() if k != "type"}
    if final is None:
        return ChatResult(streamed=True, chunks=count, error=error)
    result = parse_responses_body(final, streamed=True, chunks=count)
    if error is not None and result.error is None:
        return replace(result, error=error)
    return result
