"""A tiny byte-level tokenizer with the Hugging Face interface, for tests that must not load a model.

Ids: special tokens ``<|im_start|>``=1, ``<|im_end|>``=2 (eos), ``<tool_call>``=3, ``</tool_call>``=4,
``<think>``=5, ``</think>``=6; every other byte ``b`` is ``b + 10``. Chat rendering is ChatML in the
Qwen2.5/hermes style and prefix-preserving: rendering ``messages[:k]`` is a prefix of rendering
``messages[:k+1]``, and an assistant message renders exactly as :func:`assistant_text` generates it,
so a prompt plus its completion ids is a token prefix of the next turn's prompt.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterable, Sequence

SPECIAL_TOKENS: dict[str, int] = {
    "<|im_start|>": 1, "<|im_end|>": 2, "<tool_call>": 3, "</tool_call>": 4, "<think>": 5, "</think>": 6,
}
BYTE_OFFSET = 10
_ID_TO_SPECIAL = {v: k for k, v in SPECIAL_TOKENS.items()}
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(s) for s in SPECIAL_TOKENS) + ")")

TOOLS_PREAMBLE = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_POSTAMBLE = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)


def arguments_text(arguments: Any) -> str:
    """A tool call's arguments as the model writes them: a JSON string is kept verbatim."""
    if isinstance(arguments, str):
        return arguments
    return json.dumps(arguments, ensure_ascii=False)


def tool_call_text(name: str, arguments: Any) -> str:
    """One hermes-style tool call body (without the surrounding tags)."""
    return '{"name": ' + json.dumps(name, ensure_ascii=False) + ', "arguments": ' + arguments_text(arguments) + "}"


def assistant_text(content: str | None, reasoning: str | None = None,
                   tool_calls: Sequence[tuple[str, Any]] = ()) -> str:
    """The text a hermes-style model generates for a reply (reasoning, content, tool calls), no eos."""
    parts: list[str] = []
    if reasoning:
        parts.append(f"<think>\n{reasoning}\n</think>\n\n")
    if content:
        parts.append(content)
    for i, (name, arguments) in enumerate(tool_calls):
        sep = "\n" if (content or i > 0) else ""
        parts.append(f"{sep}<tool_call>\n{tool_call_text(name, arguments)}\n</tool_call>")
    return "".join(parts)


def content_text(content: Any) -> str:
    """Message content as text: None is empty, a list of parts is the concatenation of its text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    return str(content)


def _message_tool_calls(message: dict[str, Any]) -> list[tuple[str, Any]]:
    calls = []
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        calls.append((function.get("name", ""), function.get("arguments", "{}")))
    return calls


def _render_message(message: dict[str, Any]) -> str:
    role = message.get("role", "user")
    if role == "assistant":
        reasoning = message.get("reasoning_content") or message.get("reasoning")
        body = assistant_text(content_text(message.get("content")) or None, reasoning,
                              _message_tool_calls(message))
        return f"<|im_start|>assistant\n{body}<|im_end|>\n"
    if role == "tool":
        # One user turn per tool result (not grouped) keeps the rendering prefix-preserving.
        text = content_text(message.get("content"))
        return f"<|im_start|>user\n<tool_response>\n{text}\n</tool_response><|im_end|>\n"
    return f"<|im_start|>{role}\n{content_text(message.get('content'))}<|im_end|>\n"


def _tools_block(tools: Iterable[dict[str, Any]]) -> str:
    lines = "".join("\n" + json.dumps(tool, ensure_ascii=False) for tool in tools)
    return TOOLS_PREAMBLE + lines + TOOLS_POSTAMBLE


def render_chat(messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None,
                add_generation_prompt: bool = False) -> str:
    """ChatML rendering of messages (tools go into the system message, as Qwen2.5 does)."""
    messages = list(messages)
    out: list[str] = []
    if tools:
        if messages and messages[0].get("role") == "system":
            system = content_text(messages[0].get("content"))
            messages = messages[1:]
            out.append(f"<|im_start|>system\n{system}\n\n{_tools_block(tools)}<|im_end|>\n")
        else:
            out.append(f"<|im_start|>system\n{_tools_block(tools)}<|im_end|>\n")
    out.extend(_render_message(m) for m in messages)
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


class FakeTokenizer:
    """Byte-level tokenizer with the subset of the Hugging Face tokenizer interface rollouttap uses."""

    eos_token = "<|im_end|>"
    eos_token_id = SPECIAL_TOKENS["<|im_end|>"]
    pad_token = "<|pad|>"
    pad_token_id = 0
    bos_token_id = None
    vocab_size = 256 + BYTE_OFFSET
    name_or_path = "rollouttap-fake-tokenizer"

    def __len__(self) -> int:
        return self.vocab_size

    def apply_chat_template(self, conversation: Sequence[dict[str, Any]], tools: Any = None,
                            add_generation_prompt: bool = False, tokenize: bool = True,
                            **_kwargs: Any) -> str | list[int]:
        """Render messages as ChatML; ids when ``tokenize`` (the HF default), else text."""
        text = render_chat(conversation, tools, add_generation_prompt)
        return self.encode(text) if tokenize else text

    def encode(self, text: str, add_special_tokens: bool = False, **_kwargs: Any) -> list[int]:
        """Text to ids; special-token strings map to their ids."""
        ids: list[int] = []
        for piece in _SPECIAL_RE.split(text):
            special = SPECIAL_TOKENS.get(piece)
            if special is not None:
                ids.append(special)
            elif piece:
                ids.extend(b + BYTE_OFFSET for b in piece.encode("utf-8"))
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False, **_kwargs: Any) -> str:
        """Ids to text; an incomplete UTF-8 sequence decodes to U+FFFD, as HF tokenizers do."""
        out: list[str] = []
        pending = bytearray()
        for i in ids:
            if BYTE_OFFSET <= i < BYTE_OFFSET + 256:
                pending.append(i - BYTE_OFFSET)
                continue
            if pending:
                out.append(pending.decode("utf-8", "replace"))
                pending.clear()
            special = _ID_TO_SPECIAL.get(i)
            if special is not None and not skip_special_tokens:
                out.append(special)
        if pending:
            out.append(pending.decode("utf-8", "replace"))
        return "".join(out)

    def convert_ids_to_tokens(self, ids: int | Iterable[int]) -> str | list[str]:
        """Token strings: special names, printable ASCII bytes as themselves, others as ``<0xNN>``."""
        if isinstance(ids, int):
            return self._token(ids)
        return [self._token(i) for i in ids]

    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | list[int]:
        """Inverse of :meth:`convert_ids_to_tokens` for the tokens it produces."""
        if isinstance(tokens, str):
            return self._id(tokens)
        return [self._id(t) for t in tokens]

    @staticmethod
    def _token(i: int) -> str:
        if i in _ID_TO_SPECIAL:
            return _ID_TO_SPECIAL[i]
        if BYTE_OFFSET <= i < BYTE_OFFSET + 256:
            b = i - BYTE_OFFSET
            return chr(b) if 32 <= b < 127 else f"<0x{b:02X}>"
        return "<unk>"

    @staticmethod
    def _id(token: str) -> int:
        if token in SPECIAL_TOKENS:
            return SPECIAL_TOKENS[token]
        if len(token) == 1 and 32 <= ord(token) < 127:
            return ord(token) + BYTE_OFFSET
        match = re.fullmatch(r"<0x([0-9A-F]{2})>", token)
        return int(match.group(1), 16) + BYTE_OFFSET if match else 0
