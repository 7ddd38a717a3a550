"""Rebuild an agent's conversation from its captured flows, and report where it does not hold together.

``build_conversation(store.flows(agent_id=...))`` turns each ``POST …/chat/completions`` flow into a
:class:`ChatCall` (``…/completions`` into a :class:`CompletionCall`, a Responses API ``…/responses`` into a
:class:`ResponsesCall`), marks client retries, groups the
calls into threads (a sub-agent or a parallel call starts its own) and lists every
:class:`Discontinuity`: a call whose messages do not extend its thread's previous messages plus reply.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Sequence

from rollouttap.addon.injection import endpoint_for_path  # pure: no mitmproxy
from rollouttap.manager.calls import (
    ChatCall, CompletionCall, Discontinuity, ModelCall, ResponseMessage, ResponsesCall, history_of_call,
)
from rollouttap.manager.chat_stream import (
    ChatResult, ids_from_logprob_tokens, ids_problem, parse_chat_body, reassemble_chat_stream,
)
from rollouttap.manager.continuity import assign_threads, classify_break, find_retries, normalize_message
from rollouttap.manager.prompt_ids import PromptIdsReader
from rollouttap.manager.responses_api import parse_responses_body, reassemble_responses_stream
from rollouttap.store.records import FlowRecord

log = logging.getLogger(__name__)

RETRY_HEADER = "x-stainless-retry-count"
_NOT_PARAMS = frozenset({"messages", "tools", "prompt", "stream", "stream_options", "input", "instructions"})

__all__ = [
    "ChatCall", "CompletionCall", "Conversation", "Discontinuity", "ResponseMessage", "ResponsesCall",
    "assign_threads", "build_conversation", "call_from_flow", "chat_call_from_flow", "classify_break",
    "completion_call_from_flow", "find_retries", "flow_kind", "normalize_message", "responses_call_from_flow",
]


@dataclass(frozen=True)
class Conversation:
    calls: list[ChatCall]
    completion_calls: list[CompletionCall]
    discontinuities: list[Discontinuity]
    other_flows: int
    responses_calls: list[ResponsesCall] = field(default_factory=list)

    @property
    def model_calls(self) -> list[ModelCall]:
        """Every chat, /completions and Responses call, in the order they were sent."""
        return sorted([*self.calls, *self.completion_calls, *self.responses_calls], key=lambda c: c.position)

    @property
    def history(self) -> list[dict[str, Any]]:
        """The last chat or Responses call's request messages plus its reply (a Responses call's input items as
        it sent them)."""
        last = next((c for c in reversed(self.model_calls) if not isinstance(c, CompletionCall)), None)
        return self.history_of_call(last) if last is not None else []

    @staticmethod
    def history_of_call(call: ChatCall | ResponsesCall) -> list[dict[str, Any]]:
        """A call's request messages plus its reply (when it got one)."""
        return history_of_call(call)

    @property
    def turns(self) -> list[ChatCall | ResponsesCall]:
        """One chat or Responses call per turn: the last attempt of each request."""
        last: dict[int, ChatCall | ResponsesCall] = {}
        for call in sorted([*self.calls, *self.responses_calls], key=lambda c: c.position):
            last[call.turn] = call
        return [last[t] for t in sorted(last)]

    @property
    def failed_calls(self) -> list[ModelCall]:
        """Model calls of any endpoint without an answer."""
        return [c for c in self.model_calls if c.failed]

    @property
    def thread_count(self) -> int:
        return len({c.thread for c in self.calls})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data (calls, discontinuities, history and summary counts)."""
        return {
            "calls": [asdict(c) for c in self.calls],
            "completion_calls": [asdict(c) for c in self.completion_calls],
            "responses_calls": [asdict(c) for c in self.responses_calls],
            "discontinuities": [asdict(d) for d in self.discontinuities],
            "history": self.history,
            "other_flows": self.other_flows,
            "summary": {"calls": len(self.calls), "completion_calls": len(self.completion_calls),
                        "responses_calls": len(self.responses_calls), "turns": len(self.turns),
                        "threads": self.thread_count,  # of chat calls: their messages make threads
                        "retries": sum(c.is_retry for c in [*self.calls, *self.responses_calls]),
                        "failed": len(self.failed_calls), "discontinuities": len(self.discontinuities)},
        }


_KINDS = {"chat": "chat", "completions": "completion", "responses": "responses"}  # endpoint -> flow kind


def flow_kind(flow: FlowRecord) -> str:
    """``chat``, ``completion``, ``responses`` or ``other``, from the method and path (as the proxy tells the
    endpoints it asks for token ids)."""
    if (flow.method or "").upper() != "POST":
        return "other"
    return _KINDS.get(endpoint_for_path(flow.path or "") or "", "other")


def _retry_count(flow: FlowRecord) -> int:
    try:
        return int(flow.request_header(RETRY_HEADER) or 0)
    except ValueError:
        return 0


def _result_of(flow: FlowRecord, stream: bool, responses: bool = False,
               reader: PromptIdsReader | None = None) -> ChatResult | None:
    text = flow.response_text()
    if not text.strip():
        return None
    content_type = (flow.response_header("content-type") or "").lower()
    if "text/event-stream" in content_type or (stream and text.lstrip().startswith(("data:", ":", "event:"))):
        return reassemble_responses_stream(text) if responses else reassemble_chat_stream(text, reader)
    try:
        if responses:
            return parse_responses_body(json.loads(text))
        body, prompt_ids = reader.loads(text) if reader is not None else (json.loads(text), None)
        return parse_chat_body(body, prompt_ids=prompt_ids)
    except ValueError:
        return ChatResult(error={"message": f"response body is not JSON: {text[:80]!r}"})


def _state(flow: FlowRecord, result: ChatResult | None) -> str:
    """The flow's state, except that a stream closed after its answer's ``finish_reason`` (a client that stops
    reading there, before ``[DONE]``) is done: the agent had the whole answer, as the addon records a stream
    closed after ``[DONE]``. Not where the proxy itself broke the stream off (``rewrite_failed``)."""
    if (flow.state == "error" and result is not None and result.streamed and result.finish_reason is not None
            and result.error is None and flow.status_code == 200 and "rewrite_failed" not in flow.meta):
        return "done"
    return flow.state


def _failure(flow: FlowRecord, state: str, result: ChatResult | None) -> str | None:
    """Why the call did not yield a usable answer, or None."""
    if state == "error":
        return flow.error or "flow ended in error"
    if flow.status_code is not None and flow.status_code >= 400:
        message = (result.error or {}).get("message") if result else None
        return f"HTTP {flow.status_code}" + (f": {message}" if message else "")
    if result is not None and result.error is not None:
        return str(result.error.get("message") or result.error)
    if state == "done" and (result is None or (result.streamed and result.finish_reason is None)):
        return "response ended without an answer"
    return None


def _elapsed(start: float | None, end: float | None) -> float | None:
    return end - start if start is not None and end is not None else None


def _common_fields(flow: FlowRecord, index: int, request: dict[str, Any], responses: bool = False,
                   reader: PromptIdsReader | None = None) -> tuple[dict[str, Any], ChatResult | None]:
    stream = bool(request.get("stream"))
    result = _result_of(flow, stream, responses, reader)
    state = _state(flow, result)
    error = _failure(flow, state, result)
    r = result or ChatResult()
    ids = r.completion_token_ids if r.completion_token_ids is not None else ids_from_logprob_tokens(r.logprob_tokens)
    prompt_ids, logprobs = r.prompt_token_ids, r.completion_logprobs
    # Responses calls check their ids against their usage themselves (responses_api.response_token_ids).
    problem = ids_problem(r, chat=flow_kind(flow) == "chat") if not responses and ids is not None else None
    if problem is not None:  # ids with holes would train a sequence the model never produced: read as none
        log.debug("flow %s: token ids set aside: %s", flow.flow_id, problem)
        prompt_ids = ids = logprobs = None
    return dict(
        index=index, flow_id=flow.flow_id, url=flow.url, path=flow.path, model=request.get("model"),
        params={k: v for k, v in request.items() if k not in _NOT_PARAMS}, stream=stream,
        finish_reason=r.finish_reason, usage=r.usage, status_code=flow.status_code, state=state,
        error=error, failed=error is not None and state != "open",
        latency=_elapsed(flow.t_request, flow.t_end), ttfb=_elapsed(flow.t_request, flow.t_first_byte),
        t_request=flow.t_request, response_id=r.id, prompt_token_ids=prompt_ids,
        completion_token_ids=ids, completion_logprobs=logprobs, retry_count=_retry_count(flow), ids_problem=problem,
    ), result


def chat_call_from_flow(flow: FlowRecord, index: int = 0, reader: PromptIdsReader | None = None) -> ChatCall | None:
    """The chat call a flow holds, or None when its request is not a chat request. ``reader``: the one that read the
    agent's answers before this one (their prompt ids are not decoded again)."""
    request = flow.request_json()
    if not isinstance(request, dict) or not isinstance(request.get("messages"), list):
        return None
    common, result = _common_fields(flow, index, request, reader=reader)
    return ChatCall(**common, messages=request["messages"], tools=request.get("tools"), response=_reply(result))


def _reply(result: ChatResult | None) -> ResponseMessage | None:
    if result is None or (result.content is None and not result.tool_calls and result.reasoning is None):
        return None
    return ResponseMessage(result.role or "assistant", result.content, result.reasoning,
                           [dict(tc) for tc in result.tool_calls])


def responses_call_from_flow(flow: FlowRecord, index: int = 0) -> ResponsesCall | None:
    """The Responses API call a flow holds, or None when its request has no ``input``."""
    request = flow.request_json()
    if not isinstance(request, dict) or "input" not in request:
        return None
    common, result = _common_fields(flow, index, request, responses=True)
    instructions, previous = request.get("instructions"), request.get("previous_response_id")
    return ResponsesCall(**common, input=request.get("input"),
                         instructions=instructions if isinstance(instructions, str) else None,
                         tools=request.get("tools"), response=_reply(result),
                         previous_response_id=previous if isinstance(previous, str) else None)


def completion_call_from_flow(flow: FlowRecord, index: int = 0) -> CompletionCall | None:
    """The /completions call a flow holds, or None when its request has no prompt."""
    request = flow.request_json()
    if not isinstance(request, dict) or "prompt" not in request:
        return None
    common, result = _common_fields(flow, index, request)
    return CompletionCall(**common, prompt=request.get("prompt"), text=result.content if result else None)


def call_from_flow(flow: FlowRecord, index: int = 0) -> ModelCall | None:
    """The model call a flow holds, whichever endpoint it went to; None for any other flow."""
    kind = flow_kind(flow)
    if kind == "chat":
        return chat_call_from_flow(flow, index)
    if kind == "completion":
        return completion_call_from_flow(flow, index)
    if kind == "responses":
        return responses_call_from_flow(flow, index)
    return None


def build_conversation(flows: Sequence[FlowRecord]) -> Conversation:
    """Rebuild the conversation of one agent from its flows (in capture order)."""
    chats: list[ChatCall] = []
    completions: list[CompletionCall] = []
    responses: list[ResponsesCall] = []
    sent: list[ChatCall | ResponsesCall] = []  # chat and Responses calls in capture order
    other = 0
    previous: list[int] | None = None  # the prompt ids of the call before
    reader = PromptIdsReader()
    for position, flow in enumerate(flows):
        kind = flow_kind(flow)
        call: ModelCall | None = None
        if kind == "chat":
            call = chat_call_from_flow(flow, len(chats), reader)
            if call is not None:
                chats.append(replace(call, position=position))
                sent.append(chats[-1])
        elif kind == "completion":
            call = completion_call_from_flow(flow, len(completions))
            if call is not None:
                completions.append(replace(call, position=position))
        elif kind == "responses":
            call = responses_call_from_flow(flow, len(responses))
            if call is not None:
                responses.append(replace(call, position=position))
                sent.append(responses[-1])
        if call is None:
            if kind != "other":
                log.debug("flow %s on %s has no %s request body; counted as other", flow.flow_id, flow.path, kind)
            other += 1
        elif reader.shares is not None and reader.shares[0] is call.prompt_token_ids and reader.shares[1] is previous:
            previous = call.prompt_token_ids  # read as the ids of the call before plus its own: shared already
        else:
            previous = share_prompt_prefix(call.prompt_token_ids, previous)
    # One numbering of turns for chat and Responses calls: rows group the attempts at one request by turn.
    retries, turns = find_retries(sent)
    of = {c.position: (retries[i], turns[i]) for i, c in enumerate(sent)}
    chat_turns = [of[c.position][1] for c in chats]
    threads, discontinuities = assign_threads(chats, chat_turns)
    calls = [replace(c, is_retry=of[c.position][0], turn=chat_turns[i], thread=threads[i])
             for i, c in enumerate(chats)]
    responses = [replace(c, is_retry=of[c.position][0], turn=of[c.position][1]) for c in responses]
    return Conversation(calls, completions, discontinuities, other, responses)


def share_prompt_prefix(ids: list[int] | None, previous: list[int] | None) -> list[int] | None:
    """Make ``ids`` hold the very int objects of ``previous`` where it starts with it (an agent's next prompt
    resends the last one), so that a conversation's ids are kept once, not once per call that resends them: a
    token id past 256 is an object of its own (~28 bytes) in every list JSON decoding makes. Each call keeps its own
    list and values; ``previous`` for the call after."""
    if ids is None:
        return previous
    if previous and len(previous) <= len(ids) and ids[:len(previous)] == previous:
        ids[:len(previous)] = previous
    return ids


def calls_in_order(conversation: Conversation, flows: Sequence[FlowRecord]) -> list[ModelCall]:
    """The chat, /completions and Responses calls of ``build_conversation(flows)`` in the order the agent made
    them: an agent may use several, and each samples tokens its training row holds. A chat or Responses call's
    retries follow it directly, ahead of calls made meanwhile: rows read a retry as replacing the call just before
    it."""
    order = {flow.flow_id: i for i, flow in enumerate(flows)}
    first: dict[int, int] = {}  # turn -> capture position of its first attempt
    keyed: list[tuple[tuple[int, int], ModelCall]] = []
    for call in (*conversation.calls, *conversation.responses_calls):  # one numbering of turns
        at = order[call.flow_id]
        keyed.append(((first.setdefault(call.turn, at), at), call))
    keyed += [((order[c.flow_id], order[c.flow_id]), c) for c in conversation.completion_calls]
    return [call for _, call in sorted(keyed, key=lambda item: item[0])]
