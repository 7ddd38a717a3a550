"""The calls an agent made, as read from its flows: chat completions, legacy /completions and Responses API calls,
the reply each got, and where a call stops extending its thread's history."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["ChatCall", "CompletionCall", "Discontinuity", "ModelCall", "ResponseMessage", "ResponsesCall",
           "history_of_call"]


@dataclass(frozen=True)
class Discontinuity:
    """Where call ``call_index`` stops extending its thread's history: ``truncated`` (messages dropped),
    ``rewritten`` (a message changed) or ``new_thread`` (an unrelated sub-agent or parallel call).
    ``message_index``: the first message that differs."""
    call_index: int
    kind: str
    detail: str
    message_index: int | None = None
    thread: int | None = None


@dataclass(frozen=True)
class ResponseMessage:
    """The assistant message a call returned."""
    role: str
    content: str | None
    reasoning: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    def to_message(self, *, include_reasoning: bool = False) -> dict[str, Any]:
        """The message as a client appends it to its history (OpenAI format)."""
        message: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            message["tool_calls"] = self.tool_calls
        if include_reasoning and self.reasoning is not None:
            message["reasoning_content"] = self.reasoning
        return message


@dataclass(frozen=True)
class _CallBase:
    index: int
    flow_id: str
    url: str | None
    path: str | None
    model: str | None
    params: dict[str, Any]
    stream: bool
    finish_reason: str | None
    usage: dict[str, Any] | None
    status_code: int | None
    state: str
    error: str | None
    failed: bool
    latency: float | None
    ttfb: float | None
    t_request: float | None
    response_id: str | None
    prompt_token_ids: list[int] | None
    completion_token_ids: list[int] | None
    completion_logprobs: list[float] | None
    retry_count: int
    position: int = 0  # where its flow is among the agent's flows (capture order)
    # Why the server's token ids were set aside (the call then reads as one without ids), e.g. fewer than its
    # usage counts: chat_stream.ids_problem.
    ids_problem: str | None = None


@dataclass(frozen=True)
class ChatCall(_CallBase):
    """One chat-completions call. ``turn`` counts distinct requests (a retry shares its original's),
    ``thread`` numbers the independent message histories seen in this agent's calls."""
    messages: list[dict[str, Any]] = field(default_factory=list)
    tools: list[dict[str, Any]] | None = None
    response: ResponseMessage | None = None
    is_retry: bool = False
    turn: int = 0
    thread: int = 0


@dataclass(frozen=True)
class CompletionCall(_CallBase):
    """One legacy /completions call (prompt text or token ids)."""
    prompt: str | list[int] | None = None
    text: str | None = None


@dataclass(frozen=True)
class ResponsesCall(_CallBase):
    """One Responses API call (``input`` items or text, optional ``instructions``); its answer is read as a
    chat reply. Token ids come from vLLM's ``input_messages``/``output_messages`` (``responses_api``)."""
    input: str | list[Any] | None = None
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    response: ResponseMessage | None = None
    previous_response_id: str | None = None  # the rest of its input is the server's stored conversation
    is_retry: bool = False
    turn: int = 0

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The request as the agent sent it, in messages: instructions (as a system message), then the input
        items (a text input as one user message)."""
        items = self.input if isinstance(self.input, list) else [{"role": "user", "content": self.input or ""}]
        return ([{"role": "system", "content": self.instructions}] if self.instructions else []) + list(items)


ModelCall = ChatCall | CompletionCall | ResponsesCall


def history_of_call(call: ChatCall | ResponsesCall) -> list[dict[str, Any]]:
    """A call's request messages plus its reply (when it got one)."""
    return list(call.messages) + ([call.response.to_message()] if call.response else [])
