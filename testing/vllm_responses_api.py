"""vLLM's Responses API (``POST /v1/responses``) answers for a simple (non-harmony) model, byte for byte.

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
(``presence_penalty``, ``frequency_penalty``,
``kv_transfer_params``, ``ec_transfer_params``), and per-turn usage lists beyond SimpleContext's empty ones.
"""

from __future__ import annotations

import hashlib
import itertools
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterator

from rollouttap.testing.replies import Reply
from rollouttap.testing.responses_input import chat_messages, chat_tools
from rollouttap.testing.vllm_format import Generation, Options, chat_logprobs, dumps, generate_chat
from rollouttap.testing.vllm_responses import chat_delta, chunk_ranges

LOGPROBS_INCLUDE = "message.output_text.logprobs"
_ROUTING = Options(reasoning_field="reasoning")  # how chat_delta names the reasoning part


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


def sse_event(event: dict[str, Any]) -> bytes:
    """One event as vLLM's ``_convert_stream_to_sse_events`` writes it."""
    return b"event: " + event["type"].encode() + b"\ndata: " + dumps(event) + b"\n\n"


# -- non-streamed --------------------------------------------------------------------------------

def _top_logprobs(request: dict[str, Any]) -> int | None:
    if LOGPROBS_INCLUDE not in (request.get("include") or []):
        return None
    return int(request.get("top_logprobs") or 0)


def _text_logprobs(tokenizer: Any, ids: list[int], start: int, top: int, *, stream: bool) -> list[dict[str, Any]]:
    """``output_text.logprobs`` (token, bytes, logprob) or, streamed, the delta's (token, logprob)."""
    entries = chat_logprobs(tokenizer, ids, start, Options(logprobs=True, top_logprobs=top))["content"]
    if stream:
        return [{"token": e["token"], "logprob": e["logprob"],
                 "top_logprobs": [{"token": t["token"], "logprob": t["logprob"]} for t in e["top_logprobs"]]}
                for e in entries]
    return [{"token": e["token"], "bytes": e["bytes"], "logprob": e["logprob"],
             "top_logprobs": [{"token": t["token"], "bytes": t["bytes"], "logprob": t["logprob"]}
                              for t in e["top_logprobs"]]}
            for e in entries]


def _text_part(text: str, logprobs: list[dict[str, Any]] | None) -> dict[str, Any]:
    return {"annotations": [], "text": text, "type": "output_text", "logprobs": logprobs}


def _message_item(item_id: str, content: list[dict[str, Any]], status: str) -> dict[str, Any]:
    return {"id": item_id, "content": content, "role": "assistant", "status": status, "type": "message"}


def _reasoning_item(item_id: str, text: str | None, status: str | None) -> dict[str, Any]:
    content = None if text is None else [{"text": text, "type": "reasoning_text"}]
    return {"id": item_id, "summary": [], "type": "reasoning", "content": content, "encrypted_content": None,
            "status": status}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {"arguments": arguments, "call_id": call_id, "name": name, "type": "function_call", "id": item_id,
            "status": status}


def output_items(turn: ResponsesTurn, meta: ResponsesMeta, tokenizer: Any) -> list[dict[str, Any]]:
    """The ``output`` list: reasoning, message and function-call items, as vLLM's parsers build them."""
    gen, top = turn.gen, _top_logprobs(turn.request)
    logprobs = None if top is None else _text_logprobs(tokenizer, gen.ids, 0, top, stream=False)
    if not turn.parsers:  # no parser: the whole text is one message (no content part when empty)
        text = gen.text[:gen.visible]
        return [_message_item(meta.item_id("msg_", 0), [_text_part(text, logprobs)] if text else [], "completed")]
    items: list[dict[str, Any]] = []
    if gen.reasoning:
        items.append(_reasoning_item(meta.item_id("rs_", 0), gen.reasoning, None))
    if gen.content:
        items.append(_message_item(meta.item_id("msg_", 0), [_text_part(gen.content, logprobs)], "completed"))
    for i, call in enumerate(gen.tool_calls):
        items.append(_call_item(meta.item_id("fc_", i), call.id, call.name, call.arguments, "completed"))
    return items


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


def _usage(turn: ResponsesTurn, tokenizer: Any) -> dict[str, Any]:
    prompt, output = len(turn.gen.prompt_ids), len(turn.gen.ids)
    thinking = reasoning_tokens(tokenizer, turn.gen.ids) if turn.parsers else 0
    return {"input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": 0, "input_tokens_per_turn": [], "cached_tokens_per_turn": []},
            "output_tokens": output,
            "output_tokens_details": {"reasoning_tokens": thinking, "tool_output_tokens": 0,
                                      "output_tokens_per_turn": [], "tool_output_tokens_per_turn": []},
            "total_tokens": prompt + output}


def raw_messages(turn: ResponsesTurn) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """SimpleContext's ``input_messages`` and ``output_messages`` (``ResponseRawMessageAndToken``)."""
    gen = turn.gen
    inputs = [{"message": turn.prompt_text, "tokens": gen.prompt_ids, "type": "raw_message_tokens"}]
    text = gen.text[:gen.visible]
    outputs = [{"message": text, "tokens": gen.ids, "type": "raw_message_tokens"}] if (text or gen.ids) else []
    return inputs, outputs


def _tool(tool: dict[str, Any]) -> dict[str, Any]:
    if tool.get("type") != "function":
        return tool
    return {"name": tool.get("name"), "parameters": tool.get("parameters"), "strict": tool.get("strict"),
            "type": "function", "description": tool.get("description")}


def _reasoning(reasoning: Any) -> dict[str, Any] | None:
    if not isinstance(reasoning, dict):
        return None
    return {"effort": reasoning.get("effort"), "generate_summary": reasoning.get("generate_summary"),
            "summary": reasoning.get("summary")}


def response_body(turn: ResponsesTurn, meta: ResponsesMeta, tokenizer: Any, *,
                  in_progress: bool = False) -> dict[str, Any]:
    """A ``ResponsesResponse`` as vLLM serialises it; ``in_progress``: the one in response.created."""
    req, gen = turn.request, turn.gen
    status = "in_progress" if in_progress else ("incomplete" if gen.finish_reason == "length" else "completed")
    room = meta.max_model_len - len(gen.prompt_ids)
    asked = req.get("max_output_tokens")
    inputs, outputs = raw_messages(turn) if (req.get("enable_response_messages") and not in_progress) else (None, None)
    return {
        "id": meta.id, "created_at": meta.created,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": req.get("instructions"), "metadata": req.get("metadata"), "model": meta.model,
        "object": "response", "output": [] if in_progress else output_items(turn, meta, tokenizer),
        "parallel_tool_calls": req.get("parallel_tool_calls") is not False,
        "temperature": float(req["temperature"]) if req.get("temperature") is not None else 1.0,
        "tool_choice": req.get("tool_choice") or "auto", "tools": [_tool(t) for t in req.get("tools") or []],
        "top_p": float(req["top_p"]) if req.get("top_p") is not None else 1.0,
        "background": bool(req.get("background")), "max_output_tokens": room if asked is None else min(asked, room),
        "max_tool_calls": req.get("max_tool_calls"), "previous_response_id": req.get("previous_response_id"),
        "prompt": None, "reasoning": _reasoning(req.get("reasoning")),
        "service_tier": req.get("service_tier") or "auto", "status": status, "text": req.get("text"),
        "top_logprobs": _top_logprobs(req), "truncation": req.get("truncation") or "disabled",
        "usage": None if in_progress else _usage(turn, tokenizer), "user": req.get("user"),
        "input_messages": inputs, "output_messages": outputs,
    }


# -- streamed ------------------------------------------------------------------------------------

def _event(kind: str, **fields: Any) -> dict[str, Any]:
    """An event with its fields in the openai SDK model's (alphabetical) order; numbered later."""
    event = dict(sorted({**fields, "sequence_number": -1}.items()))
    event["type"] = kind
    return event


def _done_call_event(arguments: str, item_id: str, index: int, name: str) -> dict[str, Any]:
    # vLLM passes ``name`` to an SDK event without that field: pydantic dumps the extra last.
    event = _event("response.function_call_arguments.done", arguments=arguments, item_id=item_id,
                   output_index=index)
    event["name"] = name
    return event


class _StreamItems:
    """vLLM's SimpleStreamingEventProcessor: one open output item at a time, closed when the kind changes."""

    def __init__(self, meta: ResponsesMeta) -> None:
        self.meta = meta
        self.kind: str | None = None
        self.index = 0  # output_index of the open item
        self.item_id = self.call_id = self.name = self.text = ""
        self.tool_index: int | None = None

    def step(self, kind: str, value: Any, logprobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The events for one atomic delta (``value``: text, or a tool call's fragments)."""
        events: list[dict[str, Any]] = []
        tool_index = value[0]["index"] if kind == "tool" else None
        if kind != self.kind or (kind == "tool" and tool_index != self.tool_index):
            events += self.close()
            events += self._open(kind, value)
        if kind == "tool":
            args = "".join((tc.get("function") or {}).get("arguments") or "" for tc in value)
            if args:
                self.text += args
                events.append(_event("response.function_call_arguments.delta", delta=args, item_id=self.item_id,
                                     output_index=self.index))
        elif kind == "reasoning":
            self.text += value
            events.append(_event("response.reasoning_text.delta", content_index=0, delta=value,
                                 item_id=self.item_id, output_index=self.index))
        else:
            self.text += value
            events.append(_event("response.output_text.delta", content_index=0, delta=value, item_id=self.item_id,
                                 logprobs=logprobs, output_index=self.index))
        return events

    def _open(self, kind: str, value: Any) -> list[dict[str, Any]]:
        self.kind, self.text, self.item_id = kind, "", self.meta.item_id("", self.index)
        at = {"output_index": self.index}
        if kind == "tool":
            self.tool_index, self.name = value[0]["index"], value[0]["function"].get("name") or ""
            self.call_id = self.meta.item_id("call_", self.index)
            item = _call_item(self.item_id, self.call_id, self.name, "", "in_progress")
            return [_event("response.output_item.added", item=item, **at)]
        if kind == "reasoning":
            return [_event("response.output_item.added", item=_reasoning_item(self.item_id, None, "in_progress"), **at),
                    _event("response.reasoning_part.added", content_index=0, item_id=self.item_id,
                           part={"text": "", "type": "reasoning_text"}, **at)]
        return [_event("response.output_item.added", item=_message_item(self.item_id, [], "in_progress"), **at),
                _event("response.content_part.added", content_index=0, item_id=self.item_id,
                       part=_text_part("", []), **at)]

    def close(self) -> list[dict[str, Any]]:
        """The done events of the open item, if any."""
        kind, text, at = self.kind, self.text, {"output_index": self.index, "item_id": self.item_id}
        if kind is None:
            return []
        self.kind, self.tool_index = None, None
        self.index += 1
        if kind == "tool":
            item = _call_item(self.item_id, self.call_id, self.name, text, "completed")
            return [_done_call_event(text, self.item_id, at["output_index"], self.name),
                    _event("response.output_item.done", item=item, output_index=at["output_index"])]
        if kind == "reasoning":
            part = {"text": text, "type": "reasoning_text"}
            return [_event("response.reasoning_text.done", content_index=0, text=text, **at),
                    _event("response.reasoning_part.done", content_index=0, part=part, **at),
                    _event("response.output_item.done", item=_reasoning_item(self.item_id, text, "completed"),
                           output_index=at["output_index"])]
        part = _text_part(text, None)
        return [_event("response.output_text.done", content_index=0, logprobs=[], text=text, **at),
                _event("response.content_part.done", content_index=0, part=part, **at),
                _event("response.output_item.done", item=_message_item(self.item_id, [part], "completed"),
                       output_index=at["output_index"])]


def _pieces(turn: ResponsesTurn, lo: int, hi: int, headers_sent: set[int]) -> list[tuple[str, Any]]:
    """One chunk's atomic deltas in vLLM's ``split_delta`` order: reasoning, content, tool calls by index."""
    if not turn.parsers:
        text = turn.gen.text[lo:hi]
        return [("content", text)] if text else []
    delta = chat_delta(turn.gen, lo, hi, headers_sent, _ROUTING)
    pieces: list[tuple[str, Any]] = [(k, delta[k]) for k in ("reasoning", "content") if delta.get(k)]
    groups: dict[int, list[dict[str, Any]]] = {}
    for call in delta.get("tool_calls") or []:
        groups.setdefault(call["index"], []).append(call)
    return pieces + [("tool", calls) for calls in groups.values()]


def _item_events(turn: ResponsesTurn, meta: ResponsesMeta, tokenizer: Any,
                 tokens_per_chunk: int) -> Iterator[dict[str, Any]]:
    top = _top_logprobs(turn.request)
    items, headers_sent = _StreamItems(meta), set()  # type: _StreamItems, set[int]
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
    final_meta = meta if meta.seed is None else ResponsesMeta(meta.id, meta.model, meta.created, meta.max_model_len,
                                                               meta.seed + ":final")
    events = itertools.chain(
        [_event("response.created", response=initial), _event("response.in_progress", response=initial)],
        _item_events(turn, meta, tokenizer, tokens_per_chunk),
        [_event("response.completed", response=None)])
    for number, event in enumerate(events):
        event["sequence_number"] = number
        if event["type"] == "response.completed":  # built only now, as vLLM builds it after the stream
            event["response"] = response_body(turn, final_meta, tokenizer)
        yield event
