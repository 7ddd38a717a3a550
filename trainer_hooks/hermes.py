"""Split generated assistant text into reasoning, content and hermes-style tool calls."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_TOOL_BLOCK = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


@dataclass(frozen=True)
class ParsedToolCall:
    """One tool call: the function name and its arguments as a JSON string."""

    name: str
    arguments: str


@dataclass(frozen=True)
class ParsedAssistant:
    """What an assistant completion means: reasoning, visible content, tool calls."""

    content: str | None
    reasoning: str | None
    tool_calls: tuple[ParsedToolCall, ...]


def parse_assistant_text(text: str, *, tools: bool = True) -> ParsedAssistant:
    """Parse a completion's text the way the chat template renders it back, character for character."""
    reasoning, rest = split_reasoning(text)
    content, calls = split_tool_calls(rest) if tools else (rest, ())
    return ParsedAssistant(content=content or None, reasoning=reasoning, tool_calls=calls)


def split_reasoning(text: str) -> tuple[str | None, str]:
    """(reasoning, rest) when text opens with <think>, else (None, text); unclosed: all reasoning."""
    # Only a block at the very start counts: the template puts it there, so a round trip is exact.
    if not text.startswith(THINK_OPEN):
        return None, text
    inner, _, rest = text[len(THINK_OPEN):].partition(THINK_CLOSE)
    return inner, rest


def split_tool_calls(text: str) -> tuple[str, tuple[ParsedToolCall, ...]]:
    """(content, calls): valid <tool_call> blocks become calls, everything else stays content."""
    pieces: list[str] = []
    calls: list[ParsedToolCall] = []
    cursor = 0
    for match in _TOOL_BLOCK.finditer(text):
        call = parse_tool_call_json(match.group(1))
        if call is None:
            continue  # an invalid block is left in the text around it
        between = text[cursor:match.start()]
        # Whitespace between calls is the template's separator, not content.
        if not calls or between.strip():
            pieces.append(between)
        calls.append(call)
        cursor = match.end()
    tail = text[cursor:]
    if not calls or tail.strip():
        pieces.append(tail)
    return "".join(pieces), tuple(calls)


def parse_tool_call_json(block: str) -> ParsedToolCall | None:
    """The call in one block's body ({"name": ..., "arguments": {...}}), or None if it is not one."""
    try:
        obj = json.loads(block)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):
        # Some models emit the arguments already encoded; keep them when they are JSON.
        try:
            args = json.loads(args)
        except ValueError:
            return None
    return ParsedToolCall(name=obj["name"], arguments=json.dumps(args, ensure_ascii=False))


def streamable_parts(text: str, *, tools: bool) -> tuple[str, str]:
    """(reasoning, content) of a partial completion that the final parse can only extend."""
    if text.startswith(THINK_OPEN):
        inner, closed, rest = text[len(THINK_OPEN):].partition(THINK_CLOSE)
        if not closed:
            return _without_partial_tag(inner, THINK_CLOSE), ""
    elif THINK_OPEN.startswith(text):
        return "", ""  # may still become a <think> opening
    else:
        inner, rest = "", text
    if not tools:
        return inner, rest
    start = rest.find("<tool_call>")
    content = rest[:start] if start >= 0 else _without_partial_tag(rest, "<tool_call>")
    return inner, content


def _without_partial_tag(text: str, tag: str) -> str:
    """text less any tail that could be the start of tag (a tokenizer may split a tag)."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:size]):
            return text[:-size]
    return text
