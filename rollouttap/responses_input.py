"""A Responses API request (``POST /v1/responses``) as the chat request vLLM renders for it.

Follows vLLM's ``construct_input_messages`` and ``construct_tool_dicts``
(vllm/entrypoints/openai/responses/utils.py, commit 01ca842d): ``instructions`` becomes a leading system
message, a string ``input`` one user message; in a list, ``function_call`` items become an assistant message's
``tool_calls`` (merged into the assistant message just before, if any), ``function_call_output`` items tool
messages, assistant messages their first text part; other messages pass through, their list content joined
with newlines (vLLM's "string" chat-template content format). Function tools become chat tools
(``{"type": "function", "function": {...}}``); other tool types are not rendered. Pure functions, no I/O.
"""

from __future__ import annotations

from typing import Any

ROLES = ("user", "system", "developer", "assistant")
_TEXT_PARTS = ("input_text", "output_text", "text")


def input_error(request: Any) -> str | None:
    """Why vLLM would refuse this Responses request (a 400), or None."""
    if not isinstance(request, dict):
        return "request body must be a JSON object"
    items = request.get("input")
    if isinstance(items, str):
        return _options_error(request)
    if not isinstance(items, list):
        return "'input' must be a string or a list of input items"
    for i, item in enumerate(items):
        if (problem := _item_error(item)) is not None:
            return f"input[{i}]: {problem}"
    return _options_error(request)


def _item_error(item: Any) -> str | None:
    if not isinstance(item, dict):
        return "an input item must be an object"
    kind = item.get("type", "message")
    if kind == "function_call":
        missing = [k for k in ("call_id", "name", "arguments") if not isinstance(item.get(k), str)]
        return f"function_call needs string {', '.join(missing)}" if missing else None
    if kind == "function_call_output":
        ok = isinstance(item.get("call_id"), str) and isinstance(item.get("output"), (str, list))
        return None if ok else "function_call_output needs 'call_id' and 'output'"
    if kind == "reasoning":
        return None
    if kind != "message":
        return f"unsupported input item type {kind!r}"
    if item.get("role") not in ROLES:
        return f"'role' must be one of {', '.join(ROLES)}"
    content = item.get("content")
    if isinstance(content, str):
        return None
    if not isinstance(content, list) or not all(isinstance(p, dict) for p in content):
        return "'content' must be a string or a list of content parts"
    return None


def _options_error(request: dict[str, Any]) -> str | None:
    top = request.get("top_logprobs")
    if top is not None and (not isinstance(top, int) or isinstance(top, bool) or top < 0):
        return "'top_logprobs' must be a non-negative integer"
    include = request.get("include")
    if include is not None and not (isinstance(include, list) and all(isinstance(i, str) for i in include)):
        return "'include' must be a list of strings"
    limit = request.get("max_output_tokens")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        return "'max_output_tokens' must be a positive integer"
    tools = request.get("tools")
    if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) and "type" in t for t in tools)):
        return "'tools' must be a list of tool objects"
    for tool in tools or []:
        if tool.get("type") == "function" and not isinstance(tool.get("name"), str):
            return "a function tool needs a 'name'"
    instructions = request.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        return "'instructions' must be a string"
    return None


_NO_BACKGROUND = ("This vLLM engine does not support `store=True` and therefore does not support the background "
                  "mode. To enable these features, set the environment variable `VLLM_ENABLE_RESPONSES_API_STORE=1` "
                  "when launching the vLLM server.")


def store_error(request: dict[str, Any]) -> tuple[int, str, str] | None:
    """(status, message, param) of vLLM's answer to a request that needs its response store, which is off unless
    ``VLLM_ENABLE_RESPONSES_API_STORE`` is set: a background request (400), a ``previous_response_id`` (404).
    Checked after the body's validation and the model name, as vLLM does."""
    if request.get("background"):
        return 400, _NO_BACKGROUND, "background"
    if (previous := request.get("previous_response_id")) is not None:
        return 404, f"Response with id '{previous}' not found.", "response_id"
    return None


def part_text(part: Any) -> str:
    """The text of one content part (text-like parts only)."""
    if isinstance(part, dict) and part.get("type", "input_text") in _TEXT_PARTS:
        return str(part.get("text", ""))
    return ""


def _content(content: Any) -> Any:
    if isinstance(content, list):
        return "\n".join(part_text(p) for p in content
                         if isinstance(p, dict) and p.get("type", "input_text") in _TEXT_PARTS)
    return content


def _first_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        first = content[0]
        return str(first.get("text", "")) if isinstance(first, dict) else str(first)
    return ""


def _assistant_for(item: dict[str, Any], prev: dict[str, Any] | None) -> dict[str, Any] | None:
    """The new assistant message an item makes, or None when it merged into ``prev``."""
    kind = item.get("type", "message")
    if kind == "function_call":
        call = {"id": item["call_id"], "function": {"name": item["name"], "arguments": item["arguments"]},
                "type": "function"}
        if prev is not None:
            prev.setdefault("tool_calls", []).append(call)
            return None
        return {"role": "assistant", "tool_calls": [call]}
    if kind == "reasoning":
        texts = item.get("content") or item.get("summary") or []
        reasoning = _first_text(texts)
        if prev is not None and prev.get("reasoning") is None:
            prev["reasoning"] = reasoning
            return None
        return {"role": "assistant", "reasoning": reasoning}
    text = _first_text(item.get("content"))
    if prev is not None and prev.get("content") is None:
        prev["content"] = text
        return None
    return {"role": "assistant", "content": text}


def chat_messages(request: dict[str, Any]) -> list[dict[str, Any]]:
    """The chat messages vLLM renders for a (valid) Responses request."""
    messages: list[dict[str, Any]] = []
    if request.get("instructions"):
        messages.append({"role": "system", "content": request["instructions"]})
    items = request.get("input")
    if isinstance(items, str):
        return [*messages, {"role": "user", "content": items}]
    for item in items or []:
        kind = item.get("type", "message")
        if kind == "function_call_output":
            output = item["output"]
            messages.append({"role": "tool", "content": _content(output), "tool_call_id": item["call_id"]})
        elif kind in ("function_call", "reasoning") or item.get("role") == "assistant":
            prev = messages[-1] if messages and messages[-1].get("role") == "assistant" else None
            if (message := _assistant_for(item, prev)) is not None:
                messages.append(message)
        else:
            messages.append({"role": item["role"], "content": _content(item.get("content"))})
    return messages


def chat_tools(request: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The request's function tools in chat-completions form (what the chat template sees), or None."""
    tools = []
    for tool in request.get("tools") or []:
        if tool.get("type") != "function":
            continue
        function = {"name": tool.get("name"), "description": tool.get("description"),
                    "parameters": tool.get("parameters")}
        function.update({k: v for k, v in tool.items() if k not in ("type", *function)})
        tools.append({"type": "function", "function": function})
    return tools or None


def as_chat_request(request: dict[str, Any]) -> dict[str, Any]:
    """A Responses request as the equivalent chat request (other requests unchanged), for scripts."""
    if "input" not in request or "messages" in request or input_error(request) is not None:
        return request
    chat = {k: v for k, v in request.items() if k not in ("input", "instructions", "tools", "max_output_tokens")}
    chat["messages"] = chat_messages(request)
    if (tools := chat_tools(request)) is not None:
        chat["tools"] = tools
    if request.get("max_output_tokens") is not None:
        chat["max_tokens"] = request["max_output_tokens"]
    return chat
