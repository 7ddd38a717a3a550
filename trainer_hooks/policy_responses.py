"""POST /v1/responses over the policy model: vLLM's Responses API for a plain model (no HTTP here).

A request becomes the chat request vLLM renders for it (``rollouttap.responses_input``), runs through the
chat route's generation and parsers, and is answered with the shared builders of
``rollouttap.responses_shapes`` (the same ones the scripted test upstream uses). The server behaves as vLLM
started with a reasoning parser (``<think>`` at the start is always split off, as the chat route does) and
the hermes tool parser when function tools are offered.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from rollouttap.responses_input import chat_messages, chat_tools, input_error, store_error
from rollouttap.responses_shapes import (
    Generated, OutputCall, ResponsesMeta, StreamItems, chat_delta_pieces, reasoning_tokens, response_body,
    stream_events, text_logprobs, top_logprobs,
)

from .generation import Delta, SamplingParams
from .hermes import parse_assistant_text
from .openai_params import BadRequest
from .openai_shapes import chat_logprobs, new_id
from .policy_api import Gone, PolicyAPI, StreamSplitter

Body = dict[str, Any]
# Sampling extras beyond the OpenAI fields (vLLM-style), passed to the chat sampler as they are.
_EXTRA_SAMPLING = ("seed", "top_k")


class NamedEvents:
    """A Responses stream: each event goes out as ``event: <type>`` plus ``data:``, with no ``[DONE]``."""

    def __init__(self, events: Iterator[Body]) -> None:
        self._events = events

    def __iter__(self) -> Iterator[Body]:
        return self._events

    def close(self) -> None:
        """Stop generating (releases the generation lock when the client left early)."""
        close = getattr(self._events, "close", None)
        if close is not None:
            close()


@dataclass(frozen=True)
class _Turn:
    request: Body
    prompt_text: str
    prompt_ids: list[int]
    params: SamplingParams
    parse_tools: bool
    top: int | None  # logprob alternatives asked for; None: no logprobs
    meta: ResponsesMeta


def chat_body(request: Body) -> Body:
    """The chat request whose generation answers a (valid) Responses request; max_tokens is set later."""
    top = top_logprobs(request)
    body: Body = {"messages": chat_messages(request), "tools": chat_tools(request),
                  "tool_choice": request.get("tool_choice"), "temperature": request.get("temperature"),
                  "top_p": request.get("top_p"), "logprobs": top is not None, "top_logprobs": top or None}
    body.update({k: request[k] for k in _EXTRA_SAMPLING if request.get(k) is not None})
    return body


class ResponsesRoute:
    """The /v1/responses endpoint over a PolicyAPI: one generation per request, no store."""

    def __init__(self, api: PolicyAPI) -> None:
        self.api = api

    def __call__(self, request: Body, gone: Gone | None = None) -> Body | NamedEvents:
        """A response object, or its events when ``stream`` is set; BadRequest for vLLM's 4xx answers."""
        turn = self._turn(request)
        if request.get("stream"):
            return NamedEvents(self._stream(turn))
        deltas = self.api.run_to_end(turn.prompt_ids, turn.params, gone)
        return response_body(request, turn.meta, self._generated(turn, deltas), max_tokens=turn.params.max_tokens)

    def _turn(self, request: Body) -> _Turn:
        # vLLM's order: the body's validation (400), the model (404), then what needs the store (400, 404).
        if (problem := input_error(request)) is not None:
            raise BadRequest(problem)
        self.api.check_model(request)
        if (refused := store_error(request)) is not None:  # no response store here, as vLLM by default
            status, message, param = refused
            raise BadRequest(message, status, error_type="invalid_request_error", param=param)
        chat = chat_body(request)
        prompt_text, prompt_ids = self.api.render_prompt(chat)
        asked, room = request.get("max_output_tokens"), self.api.max_model_len - len(prompt_ids)
        if asked is not None:
            chat["max_tokens"] = max(1, min(asked, room))  # vLLM clamps to the context; room < 1 is refused below
        params = self.api.sampling(chat, chat=True, prompt_len=len(prompt_ids))
        parse_tools = bool(chat["tools"]) and request.get("tool_choice") != "none"
        meta = ResponsesMeta.new(self.api.config.model_name, self.api.max_model_len)
        return _Turn(request, prompt_text, prompt_ids, params, parse_tools, top_logprobs(request), meta)

    def _generated(self, turn: _Turn, deltas: list[Delta]) -> Generated:
        text = "".join(d.text for d in deltas)
        ids = [d.choice.token_id for d in deltas]
        parsed = parse_assistant_text(text, tools=turn.parse_tools)
        calls = tuple(OutputCall(new_id("chatcmpl-tool"), c.name, c.arguments) for c in parsed.tool_calls)
        logprobs = None
        if turn.top is not None:
            logprobs = text_logprobs(self._chat_logprobs(deltas), stream=False)
        return Generated(
            prompt_text=turn.prompt_text, prompt_ids=turn.prompt_ids, text=text, ids=ids,
            finish_reason=deltas[-1].finish_reason or "stop", parsers=True, reasoning=parsed.reasoning,
            content=parsed.content, tool_calls=calls, reasoning_tokens=reasoning_tokens(self.api.tokenizer, ids),
            logprobs=logprobs)

    def _chat_logprobs(self, deltas: list[Delta]) -> list[Body]:
        return chat_logprobs([d.choice for d in deltas], self.api.token_name, False)["content"]

    def _stream(self, turn: _Turn) -> Iterator[Body]:
        deltas: list[Delta] = []
        initial = response_body(turn.request, turn.meta, None, max_tokens=turn.params.max_tokens)

        def final() -> Body:
            gen = self._generated(turn, deltas)
            return response_body(turn.request, turn.meta.for_final(), gen, max_tokens=turn.params.max_tokens)

        # closing: a client that leaves mid-stream must release the generation lock now.
        with contextlib.closing(self._item_events(turn, deltas)) as items:
            yield from stream_events(initial, items, final)

    def _item_events(self, turn: _Turn, deltas: list[Delta]) -> Iterator[Body]:
        """The item events, token by token; ``deltas`` collects the generation for the final response."""
        splitter, items = StreamSplitter(turn.parse_tools), StreamItems(turn.meta)
        with contextlib.closing(self.api.locked_stream(turn.prompt_ids, turn.params)) as stream:
            for delta in stream:
                deltas.append(delta)
                payload, _ = splitter.push(delta.text, final=delta.finish_reason is not None)
                logprobs = [] if turn.top is None else text_logprobs(self._chat_logprobs([delta]), stream=True)
                for kind, value in chat_delta_pieces(payload):
                    yield from items.step(kind, value, logprobs if kind == "content" else [])
        yield from items.close()
