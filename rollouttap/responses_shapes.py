"""vLLM's Responses API (``POST /v1/responses``) answers for a plain (non-harmony) model, from plain values.

Shared by the scripted test upstream (``rollouttap.testing.vllm_responses_api``) and the embedded policy
server (``rollouttap.trainer_hooks.policy_responses``): both describe one generation as a :class:`Generated`
and get the same body and stream events from it.

Followed (vllm-project/vllm): ``vllm/entrypoints/openai/responses/protocol.py`` at 010a69ce
(``ResponsesResponse`` field order, ``from_request``, ``ResponseRawMessageAndToken``, usage details),
``responses/serving.py`` at 0001948b (``responses_full_generator``: status, usage, SimpleContext's
input/output messages only with ``enable_response_messages``; ``responses_stream_generator``: created,
in_progress, the item events, completed with a freshly built final response), ``responses/context.py`` at
00cd9d76 (``SimpleContext``: one raw input message, the prompt text and ids; one raw output message, the
generated text and every generated id), ``responses/streaming_events.py`` (``SimpleStreamingEventProcessor``:
stream item ids are bare hex, function-call ``call_id`` is ``call_<hex>``, events in reasoning -> content ->
tool-call order), ``responses/api_router.py`` at f6e93254 (non-streamed ``model_dump()``; each event as
``event: <type>`` plus ``data: <model_dump_json>``, no ``[DONE]``), the parsers' ``extract_response_outputs``
(reasoning item, message item, ``function_call`` items; ``fc_``/``msg_``/``rs_`` ids, ``call_id`` the tool
parser's id). Ids are 16 hex digits, as vLLM's ``random_uuid`` gives them since early 2026 (PR #34188's
sample output). Output items carry the fields of the openai SDK vLLM pinned then (no ``phase``,
``namespace``, ``caller``).

Left out: harmony (gpt-oss) models, background and the response store (a ``previous_response_id`` gets the 404
vLLM answers without its store), built-in and MCP tools, the fields newer vLLM main adds after ``user``
(``presence_penalty``, ``frequency_penalty``, ``kv_transfer_params``, ``ec_transfer_params``), and per-turn
usage lists beyond SimpleContext's empty ones.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, cast

Body = dict[str, Any]
LOGPROBS_INCLUDE = "message.output_text.logprobs"
# The events that end a Responses stream, each carrying the final response object.
FINAL_EVENTS = ("response.completed", "response.incomplete", "response.failed")

log = logging.getLogger(__name__)


def random_id() -> str:
    """vLLM's ``random_uuid()``: 16 hex digits."""
    return f"{uuid.uuid4().int & ((1 << 64) - 1):016x}"


@dataclass(frozen=True)
class ResponsesMeta:
    """The response id, model, timestamp and context length; ``seed`` makes item ids deterministic."""
    id: str
    model: str
    created: int
    max_model_len: int
    seed: str | None = None

    @classmethod
    def new(cls, model: str, max_model_len: int, *, seed: str | None = None) -> ResponsesMeta:
        """Fresh ids, or ids and timestamp derived from ``seed``."""
        if seed is None:
            return cls(f"resp_{random_id()}", model, int(time.time()), max_model_len)
        return cls(f"resp_{seed[:16]}", model, 1_700_000_000, max_model_len, seed)

    def item_id(self, prefix: str, n: int) -> str:
        """An output item's id (``msg_``, ``rs_``, ``fc_``, ``call_``, or bare for stream items)."""
        if self.seed is None:
            return prefix + random_id()
        return prefix + hashlib.sha256(f"{self.seed}:{prefix}:{n}".encode()).hexdigest()[:16]

    def for_final(self) -> ResponsesMeta:
        """The meta of a stream's final response: vLLM builds its items afresh (new ids)."""
        if self.seed is None:
            return self
        return ResponsesMeta(self.id, self.model, self.created, self.max_model_len, self.seed + ":final")


@dataclass(frozen=True)
class OutputCall:
    """A parsed function call: the tool parser's id, the name, the arguments as a JSON string."""
    call_id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Generated:
    """One finished generation in plain values: what the response body is built from."""
    prompt_text: str
    prompt_ids: list[int]
    text: str  # the generated text the ids cover (markup kept, special tokens not)
    ids: list[int]  # every generated id, eos last when finished
    finish_reason: str
    parsers: bool  # a reasoning or tool parser ran: items by kind; else the whole text is one message
    reasoning: str | None
    content: str | None
    tool_calls: tuple[OutputCall, ...]
    reasoning_tokens: int
    logprobs: list[Body] | None  # the message's output_text.logprobs; None when not asked for


def top_logprobs(request: Body) -> int | None:
    """The logprob alternatives asked for, or None when the request's ``include`` wants no logprobs."""
    if LOGPROBS_INCLUDE not in (request.get("include") or []):
        return None
    return int(request.get("top_logprobs") or 0)


def max_output_tokens(request: Body, room: int) -> int:
    """vLLM's budget: the request's ``max_output_tokens``, never past the context left (``room``)."""
    asked = request.get("max_output_tokens")
    return room if asked is None else min(asked, room)


def text_logprobs(entries: list[Body], *, stream: bool) -> list[Body]:
    """Chat logprob entries (``logprobs.content``) in the Responses shape: ``output_text.logprobs`` (token, bytes,
    logprob), or a stream delta's (token, logprob)."""
    keys = ("token", "logprob") if stream else ("token", "bytes", "logprob")
    return [{**{k: e[k] for k in keys}, "top_logprobs": [{k: t[k] for k in keys} for t in e["top_logprobs"]]}
            for e in entries]


def reasoning_tokens(tokenizer: Any, ids: list[int]) -> int:
    """Generated ids between ``<think>`` and ``</think>`` (what vLLM's reasoning parsers count)."""
    try:
        start, end = tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    except (KeyError, ValueError, TypeError):
        return 0
    if start not in ids:
        return 0
    first = ids.index(start) + 1
    last = ids.index(end, first) if end in ids[first:] else len(ids)
    return last - first


# -- output items --------------------------------------------------------------------------------

def text_part(text: str, logprobs: list[Body] | None) -> Body:
    """An ``output_text`` content part."""
    return {"annotations": [], "text": text, "type": "output_text", "logprobs": logprobs}


def message_item(item_id: str, content: list[Body], status: str) -> Body:
    """An assistant ``message`` output item."""
    return {"id": item_id, "content": content, "role": "assistant", "status": status, "type": "message"}


def reasoning_item(item_id: str, text: str | None, status: str | None) -> Body:
    """A ``reasoning`` output item (``content`` null while streaming it)."""
    content = None if text is None else [{"text": text, "type": "reasoning_text"}]
    return {"id": item_id, "summary": [], "type": "reasoning", "content": content, "encrypted_content": None,
            "status": status}


def call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> Body:
    """A ``function_call`` output item."""
    return {"arguments": arguments, "call_id": call_id, "name": name, "type": "function_call", "id": item_id,
            "status": status}


def output_items(gen: Generated, meta: ResponsesMeta) -> list[Body]:
    """The ``output`` list: reasoning, message and function-call items, as vLLM's parsers build them."""
    if not gen.parsers:  # no parser: the whole text is one message (no content part when empty)
        content = [text_part(gen.text, gen.logprobs)] if gen.text else []
        return [message_item(meta.item_id("msg_", 0), content, "completed")]
    items: list[Body] = []
    if gen.reasoning:
        items.append(reasoning_item(meta.item_id("rs_", 0), gen.reasoning, None))
    if gen.content:
        items.append(message_item(meta.item_id("msg_", 0), [text_part(gen.content, gen.logprobs)], "completed"))
    for i, call in enumerate(gen.tool_calls):
        items.append(call_item(meta.item_id("fc_", i), call.call_id, call.name, call.arguments, "completed"))
    return items


def usage(gen: Generated) -> Body:
    """The response's usage, SimpleContext's empty per-turn lists included."""
    prompt, output = len(gen.prompt_ids), len(gen.ids)
    return {"input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": 0, "input_tokens_per_turn": [], "cached_tokens_per_turn": []},
            "output_tokens": output,
            "output_tokens_details": {"reasoning_tokens": gen.reasoning_tokens if gen.parsers else 0,
                                      "tool_output_tokens": 0, "output_tokens_per_turn": [],
                                      "tool_output_tokens_per_turn": []},
            "total_tokens": prompt + output}


def raw_messages(gen: Generated) -> tuple[list[Body], list[Body]]:
    """SimpleContext's ``input_messages`` and ``output_messages`` (``ResponseRawMessageAndToken``)."""
    inputs = [{"message": gen.prompt_text, "tokens": gen.prompt_ids, "type": "raw_message_tokens"}]
    outputs = [{"message": gen.text, "tokens": gen.ids, "type": "raw_message_tokens"}] if (gen.text or gen.ids) else []
    return inputs, outputs


def _tool(tool: Body) -> Body:
    if tool.get("type") != "function":
        return tool
    return {"name": tool.get("name"), "parameters": tool.get("parameters"), "strict": tool.get("strict"),
            "type": "function", "description": tool.get("description")}


def _reasoning(reasoning: Any) -> Body | None:
    if not isinstance(reasoning, dict):
        return None
    return {"effort": reasoning.get("effort"), "generate_summary": reasoning.get("generate_summary"),
            "summary": reasoning.get("summary")}


def response_body(request: Body, meta: ResponsesMeta, gen: Generated | None, *, max_tokens: int) -> Body:
    """A ``ResponsesResponse`` as vLLM serialises it; ``gen`` None: the in-progress one of response.created."""
    status = "in_progress" if gen is None else ("incomplete" if gen.finish_reason == "length" else "completed")
    inputs, outputs = (None, None)
    if gen is not None and request.get("enable_response_messages"):
        inputs, outputs = raw_messages(gen)
    return {
        "id": meta.id, "created_at": meta.created,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": request.get("instructions"), "metadata": request.get("metadata"), "model": meta.model,
        "object": "response", "output": [] if gen is None else output_items(gen, meta),
        "parallel_tool_calls": request.get("parallel_tool_calls") is not False,
        "temperature": float(request["temperature"]) if request.get("temperature") is not None else 1.0,
        "tool_choice": request.get("tool_choice") or "auto", "tools": [_tool(t) for t in request.get("tools") or []],
        "top_p": float(request["top_p"]) if request.get("top_p") is not None else 1.0,
        "background": bool(request.get("background")), "max_output_tokens": max_tokens,
        "max_tool_calls": request.get("max_tool_calls"), "previous_response_id": request.get("previous_response_id"),
        "prompt": None, "reasoning": _reasoning(request.get("reasoning")),
        "service_tier": request.get("service_tier") or "auto", "status": status, "text": request.get("text"),
        "top_logprobs": top_logprobs(request), "truncation": request.get("truncation") or "disabled",
        "usage": None if gen is None else usage(gen), "user": request.get("user"),
        "input_messages": inputs, "output_messages": outputs,
    }


# -- streamed ------------------------------------------------------------------------------------

def event(kind: str, **fields: Any) -> Body:
    """An event with its fields in the openai SDK model's (alphabetical) order; numbered later."""
    out = dict(sorted({**fields, "sequence_number": -1}.items()))
    out["type"] = kind
    return out


def _done_call_event(arguments: str, item_id: str, index: int, name: str) -> Body:
    # vLLM passes ``name`` to an SDK event without that field: pydantic dumps the extra last.
    out = event("response.function_call_arguments.done", arguments=arguments, item_id=item_id, output_index=index)
    out["name"] = name
    return out


class StreamItems:
    """vLLM's SimpleStreamingEventProcessor: one open output item at a time, closed when the kind changes.

    ``step`` takes one atomic delta: ("reasoning", text), ("content", text), or ("tool", the chat-style
    ``tool_calls`` fragments of one call index)."""

    def __init__(self, meta: ResponsesMeta) -> None:
        self.meta = meta
        self.kind: str | None = None
        self.index = 0  # output_index of the open item
        self.item_id = self.call_id = self.name = self.text = ""
        self.tool_index: int | None = None

    def step(self, kind: str, value: Any, logprobs: list[Body]) -> list[Body]:
        """The events for one atomic delta (``value``: text, or a tool call's fragments)."""
        events: list[Body] = []
        tool_index = value[0]["index"] if kind == "tool" else None
        if kind != self.kind or (kind == "tool" and tool_index != self.tool_index):
            events += self.close()
            events += self._open(kind, value)
        if kind == "tool":
            args = "".join((tc.get("function") or {}).get("arguments") or "" for tc in value)
            if args:
                self.text += args
                events.append(event("response.function_call_arguments.delta", delta=args, item_id=self.item_id,
                                    output_index=self.index))
        elif kind == "reasoning":
            self.text += value
            events.append(event("response.reasoning_text.delta", content_index=0, delta=value,
                                item_id=self.item_id, output_index=self.index))
        else:
            self.text += value
            events.append(event("response.output_text.delta", content_index=0, delta=value, item_id=self.item_id,
                                logprobs=logprobs, output_index=self.index))
        return events

    def _open(self, kind: str, value: Any) -> list[Body]:
        self.kind, self.text, self.item_id = kind, "", self.meta.item_id("", self.index)
        at = {"output_index": self.index}
        if kind == "tool":
            self.tool_index, self.name = value[0]["index"], value[0]["function"].get("name") or ""
            self.call_id = self.meta.item_id("call_", self.index)
            item = call_item(self.item_id, self.call_id, self.name, "", "in_progress")
            return [event("response.output_item.added", item=item, **at)]
        if kind == "reasoning":
            return [event("response.output_item.added", item=reasoning_item(self.item_id, None, "in_progress"), **at),
                    event("response.reasoning_part.added", content_index=0, item_id=self.item_id,
                          part={"text": "", "type": "reasoning_text"}, **at)]
        return [event("response.output_item.added", item=message_item(self.item_id, [], "in_progress"), **at),
                event("response.content_part.added", content_index=0, item_id=self.item_id,
                      part=text_part("", []), **at)]

    def close(self) -> list[Body]:
        """The done events of the open item, if any."""
        kind, text, at = self.kind, self.text, {"output_index": self.index, "item_id": self.item_id}
        if kind is None:
            return []
        self.kind, self.tool_index = None, None
        self.index += 1
        if kind == "tool":
            item = call_item(self.item_id, self.call_id, self.name, text, "completed")
            return [_done_call_event(text, self.item_id, cast(int, at["output_index"]), self.name),
                    event("response.output_item.done", item=item, output_index=at["output_index"])]
        if kind == "reasoning":
            part = {"text": text, "type": "reasoning_text"}
            return [event("response.reasoning_text.done", content_index=0, text=text, **at),
                    event("response.reasoning_part.done", content_index=0, part=part, **at),
                    event("response.output_item.done", item=reasoning_item(self.item_id, text, "completed"),
                          output_index=at["output_index"])]
        part = text_part(text, None)
        return [event("response.output_text.done", content_index=0, logprobs=[], text=text, **at),
                event("response.content_part.done", content_index=0, part=part, **at),
                event("response.output_item.done", item=message_item(self.item_id, [part], "completed"),
                      output_index=at["output_index"])]


def chat_delta_pieces(delta: Body) -> list[tuple[str, Any]]:
    """A chat-style delta's atomic pieces in vLLM's ``split_delta`` order: reasoning, content, calls by index."""
    pieces: list[tuple[str, Any]] = [(k, delta[k]) for k in ("reasoning", "content") if delta.get(k)]
    groups: dict[int, list[Body]] = {}
    for call in delta.get("tool_calls") or []:
        groups.setdefault(call["index"], []).append(call)
    return pieces + [("tool", calls) for calls in groups.values()]


def stream_events(initial: Body, item_events: Iterable[Body], final: Callable[[], Body]) -> Iterator[Body]:
    """created, in_progress, the item events, completed: numbered; ``final()`` is called once the items are out
    (vLLM builds the final response after the stream). A failure while generating ends the stream with an
    ``error`` event instead (the openai SDK's ResponseErrorEvent): the response headers are already out."""
    numbers = itertools.count()

    def numbered(out: Body) -> Body:
        out["sequence_number"] = next(numbers)
        return out
    yield numbered(event("response.created", response=initial))
    yield numbered(event("response.in_progress", response=initial))
    try:
        for out in item_events:
            yield numbered(out)
        completed = event("response.completed", response=final())
    except Exception as exc:  # not GeneratorExit: a client that leaves closes the stream as before
        log.exception("responses stream failed")
        yield numbered(event("error", code="internal_error", message=str(exc), param=None))
        return
    yield numbered(completed)


def sse_event(out: Body) -> bytes:
    """One event as vLLM's ``_convert_stream_to_sse_events`` writes it (compact pydantic JSON)."""
    data = json.dumps(out, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return b"event: " + out["type"].encode() + b"\ndata: " + data + b"\n\n"
