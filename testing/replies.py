"""Scripts for the scripted upstream: pure functions from a request body to the reply the "model" gives.

A script is any callable ``(request_json) -> Reply``. Scripts see the request exactly as the client
sent it (chat: ``messages``/``tools``; completions: ``prompt``; responses: ``input``/``instructions``/``tools``,
which the scripts here read through :func:`as_chat_request`). Compose them as ordinary functions.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

from rollouttap.testing.fake_tokenizer import content_text
from rollouttap.responses_input import as_chat_request

ECHO_LIMIT = 200


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Reply:
    """What the model answers. ``status`` != 200 makes the upstream answer with an HTTP error instead;
    ``abort_after_chunks`` makes a streamed answer drop the connection after that many SSE events."""

    content: str | None = None
    tool_calls: Sequence[ToolCall] = ()
    reasoning: str | None = None
    finish_reason: str | None = None  # None: "tool_calls" when there are tool calls, else "stop"
    status: int = 200
    error_message: str | None = None
    abort_after_chunks: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "tool_calls", tuple(self.tool_calls))


Script = Callable[[dict[str, Any]], Reply]

_EXPRESSION_RUN_RE = re.compile(r"[\d.()+\-*/%^\s]+")
_BINARY_OP_RE = re.compile(r"[\d)]\s*[-+*/%^]\s*[-\d(]")


def find_expression(text: str) -> str | None:
    """The first arithmetic expression in ``text`` (needs a binary operator), stripped; else None."""
    for match in _EXPRESSION_RUN_RE.finditer(text):
        expr = _balance(match.group(0).strip().rstrip(".").strip())
        if _BINARY_OP_RE.search(expr):
            return expr
    return None


def _balance(expr: str) -> str:
    """Drop parentheses the surrounding prose opened or closed."""
    while expr.endswith(")") and expr.count(")") > expr.count("("):
        expr = expr[:-1].rstrip()
    while expr.startswith("(") and expr.count("(") > expr.count(")"):
        expr = expr[1:].lstrip()
    return expr


def last_message(request: dict[str, Any]) -> dict[str, Any]:
    """The request's last chat message, or an empty dict."""
    messages = as_chat_request(request).get("messages") or []
    return messages[-1] if messages and isinstance(messages[-1], dict) else {}


def last_user_text(request: dict[str, Any]) -> str:
    """The text of the last user message (chat, responses) or the prompt (completions)."""
    request = as_chat_request(request)
    for message in reversed(request.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            return content_text(message.get("content"))
    prompt = request.get("prompt")
    return prompt if isinstance(prompt, str) else ""


def tool_arguments(tool: dict[str, Any], text: str) -> dict[str, Any]:
    """Arguments for ``tool`` derived from the user text: an arithmetic expression for a calculator,
    else the text for the first string parameter (a number for a numeric one)."""
    function = tool.get("function") or {}
    params = function.get("parameters") or {}
    properties: dict[str, Any] = params.get("properties") or {}
    expression = find_expression(text)
    if expression is not None and ("expression" in properties or "calc" in function.get("name", "")):
        return {"expression": expression}
    names = list(params.get("required") or []) + [p for p in properties if p not in (params.get("required") or [])]
    if not names:
        return {}
    name = names[0]
    kind = (properties.get(name) or {}).get("type")
    if kind in ("number", "integer"):
        number = re.search(r"-?\d+(?:\.\d+)?", text)
        value: Any = float(number.group(0)) if number else 0
        return {name: int(value) if kind == "integer" else value}
    return {name: text}


def default_script(request: dict[str, Any]) -> Reply:
    """User turn with tools: call the first tool; after a tool result: "The answer is <result>.";
    otherwise echo the last user text."""
    request = as_chat_request(request)
    if "messages" not in request:
        return Reply(content=_echo_prompt(request.get("prompt")))
    last = last_message(request)
    tools = request.get("tools") or []
    if last.get("role") == "tool":
        return Reply(content=f"The answer is {content_text(last.get('content'))}.")
    if last.get("role") == "user" and tools and request.get("tool_choice") != "none":
        tool = tools[0]
        name = (tool.get("function") or {}).get("name", "tool")
        return Reply(tool_calls=(ToolCall(name, tool_arguments(tool, last_user_text(request))),))
    return echo_script(request)


def echo_script(request: dict[str, Any]) -> Reply:
    """Reply "echo: <last user text>" (truncated), never calling tools."""
    request = as_chat_request(request)
    if "messages" not in request:
        return Reply(content=_echo_prompt(request.get("prompt")))
    return Reply(content="echo: " + last_user_text(request)[:ECHO_LIMIT])


def _echo_prompt(prompt: Any) -> str:
    if isinstance(prompt, str):
        return " echo: " + prompt[-40:]
    return f" echo: <{len(prompt or [])} tokens>"


def fixed(replies: Sequence[Reply | str], *, cycle: bool = False) -> Script:
    """Answer with ``replies`` in order (strings are content); then repeat the last one, or cycle."""
    if not replies:
        raise ValueError("fixed() needs at least one reply")
    items = [Reply(content=r) if isinstance(r, str) else r for r in replies]
    source: Iterator[Reply] = itertools.cycle(items) if cycle else itertools.chain(items, itertools.repeat(items[-1]))

    def script(_request: dict[str, Any]) -> Reply:
        return next(source)
    return script


def with_reasoning(script: Script, reasoning: str | Callable[[dict[str, Any]], str] | None = None) -> Script:
    """Wrap ``script`` so every successful reply carries reasoning (default "Thinking about: <text>")."""
    def wrapped(request: dict[str, Any]) -> Reply:
        reply = script(request)
        if reply.status != 200:
            return reply
        if reasoning is None:
            text = "Thinking about: " + last_user_text(request)[:80]
        else:
            text = reasoning(request) if callable(reasoning) else reasoning
        return Reply(content=reply.content, tool_calls=reply.tool_calls, reasoning=text,
                     finish_reason=reply.finish_reason, abort_after_chunks=reply.abort_after_chunks)
    return wrapped


def failing(times: int, *, status: int = 500, then: Script = default_script,
            message: str = "scripted failure") -> Script:
    """Fail the first ``times`` requests with HTTP ``status``, then answer with ``then``."""
    counter = itertools.count()

    def script(request: dict[str, Any]) -> Reply:
        if next(counter) < times:
            return Reply(status=status, error_message=message)
        return then(request)
    return script


SCRIPTS: dict[str, Callable[[], Script]] = {
    "default": lambda: default_script,
    "echo": lambda: echo_script,
    "reasoning": lambda: with_reasoning(default_script),
    "flaky": lambda: failing(1),
}


def named_script(name: str) -> Script:
    """A script by name (``default``, ``echo``, ``reasoning``, ``flaky``)."""
    try:
        return SCRIPTS[name]()
    except KeyError:
        raise ValueError(f"unknown script {name!r}; known: {', '.join(sorted(SCRIPTS))}") from None
