"""Find and replace values in JSON text by their character spans.

Byte-exact editing of JSON text: rather than parsing a document and serialising it again, the
values to change are located as ``(start, end)`` spans and replaced in place, so every other
byte (float spellings, escapes, whitespace, key order) stays the server's own. Nothing here
knows what is being hidden or why; ``tokenids`` decides that.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

__all__ = ["CHAT_LOGPROBS", "FAST_VALUE", "INTS", "NUMBER", "STRING", "id_list_end", "key_pattern", "splice_nulls",
           "value_spans", "with_markers"]

# Values vLLM puts under the planned keys, matched at C speed instead of parsed: token-id lists
# and compact per-token logprobs (chat and completions shapes). Every pattern is a subset of JSON,
# so a match ends exactly where the value does (a third of the cost of decoding it; possessive
# quantifiers: the grammar never needs to backtrack); any other value is decoded.
STRING = r'"[^"\\\x00-\x1f]*+(?:\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4})[^"\\\x00-\x1f]*+)*+"'
NUMBER = r"-?(?:0|[1-9][0-9]*+)(?:\.[0-9]++)?(?:[eE][+-]?[0-9]++)?"
INTS = r"\[(?:(?!0[0-9])[0-9]++(?:,(?!0[0-9])[0-9]++)*+)?\]"
_BYTES = rf'"bytes":(?:null|{INTS})'
_TOP = rf'\{{"token":{STRING},"logprob":{NUMBER},{_BYTES}\}}'
_ENTRY = rf'\{{"token":{STRING},"logprob":{NUMBER},{_BYTES},"top_logprobs":(?:null|\[(?:{_TOP}(?:,{_TOP})*+)?\])\}}'
CHAT_LOGPROBS = rf'\{{"content":(?:null|\[(?:{_ENTRY}(?:,{_ENTRY})*+)?\])\}}'
_TOP_MAP = rf"(?:null|\{{(?:{STRING}:{NUMBER}(?:,{STRING}:{NUMBER})*+)?\}})"
_CMPL_LOGPROBS = (
    rf'\{{"text_offset":{INTS},"token_logprobs":\[(?:(?:{NUMBER}|null)(?:,(?:{NUMBER}|null))*+)?\],'
    rf'"tokens":\[(?:{STRING}(?:,{STRING})*+)?\],"top_logprobs":\[(?:{_TOP_MAP}(?:,{_TOP_MAP})*+)?\]\}}'
)
FAST_VALUE = re.compile(f"{INTS}|{CHAT_LOGPROBS}|{_CMPL_LOGPROBS}")
# A list of token ids (what INTS matches) is checked faster by string methods than by the pattern, which steps
# through every id: 1.0 against 2.3 ms over the 100,000 ids of a long prompt (``id_list_end``).
_ID_LIST_CHARS = str.maketrans("", "", "0123456789,")  # deleted: nothing may be left
_LEADING_ZERO = re.compile(",0[0-9]")
_LIST_OPENERS = frozenset("0123456789]")  # what follows the "[" of a list INTS may match
_DECODER = json.JSONDecoder()
# Spans are replaced by distinct numbers with this prefix to check where they sit in the document.
_MARK_BASE = 7391820465_000000
_MARK_PREFIX = "7391820465"


def key_pattern(names: Iterable[str]) -> re.Pattern[str]:
    """A pattern matching an object key among ``names`` up to the start of its value."""
    alternatives = "|".join(re.escape(name) for name in sorted(set(names), key=len, reverse=True))
    # A key always follows "{" or "," (plus whitespace); inside a JSON string that
    # sequence cannot occur, since the quote would have to be escaped.
    return re.compile(r'[{,]\s*"(?:' + alternatives + r')"\s*:\s*')


def value_spans(text: str, key_pattern: re.Pattern[str]) -> list[tuple[int, int]]:
    """(start, end) of every non-null value after a ``key_pattern`` match; ValueError if not JSON."""
    spans = []
    pos = 0
    while (match := key_pattern.search(text, pos)) is not None:
        start = match.end()
        if text.startswith("null", start):
            pos = start + 4
            continue
        end = id_list_end(text, start)
        if end == -1:
            fast = FAST_VALUE.match(text, start)
            end = fast.end() if fast is not None else _DECODER.raw_decode(text, start)[1]
        spans.append((start, end))
        pos = end  # skip over the value: a key-like sequence inside it is not a key
    return spans


def id_list_end(text: str, start: int) -> int:
    """Where INTS's match at ``start`` (0 or more) ends, or -1 where it does not match: a compact list of integers
    without leading zeros ends at its first "]". A value whose "[" is followed by anything but a digit or "]" is
    not read further."""
    if not text.startswith("[", start) or text[start + 1:start + 2] not in _LIST_OPENERS:
        return -1
    close = text.find("]", start)
    if close == -1:
        return -1
    ids = text[start + 1:close]
    if ids and (ids.translate(_ID_LIST_CHARS) or ids[-1] == "," or ",," in ids or
                (ids[0] == "0" and ids[1:2].isdigit()) or _LEADING_ZERO.search(ids)):
        return -1
    return close + 1


def splice_nulls(text: str, spans: list[tuple[int, int]]) -> str:
    """``text`` with each span (in order, not overlapping) replaced by ``null``."""
    parts: list[str] = []
    pos = 0
    for start, end in spans:
        parts += (text[pos:start], "null")
        pos = end
    parts.append(text[pos:])
    return "".join(parts)


def with_markers(text: str, spans: list[tuple[int, int]]) -> tuple[Any, frozenset[int]] | None:
    """The document parsed with span k as the number -(_MARK_BASE + k), and those numbers.

    None if the text outside the spans already holds such numbers. Raises ValueError when it is not JSON."""
    if not spans:
        return json.loads(text), frozenset()
    parts: list[str] = []
    pos = 0
    for k, (start, end) in enumerate(spans):
        parts += (text[pos:start], f"-{_MARK_BASE + k}")
        pos = end
    parts.append(text[pos:])
    # Only the text kept around the spans can hold a number like a marker (the spans are most of a long answer,
    # and a search through 350 KB of ids costs 0.2 ms).
    if any(_MARK_PREFIX in part for part in parts[::2]):
        return None
    return json.loads("".join(parts)), frozenset(-(_MARK_BASE + k) for k in range(len(spans)))
