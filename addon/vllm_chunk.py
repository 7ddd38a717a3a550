"""vLLM's streamed chat chunk matched whole: where its token-id fields lie, without parsing it.

tokenids' general path finds the planned keys anywhere, parses the event with their values replaced by
markers and checks that the markers sit where vLLM puts those fields: sound for any JSON, but a dozen
Python calls and a parse per event, and an answer streams one event per token or few. The chunk vLLM
streams (one choice; a delta of text, reasoning or tool-call fragments; its fields in vLLM's order) is
matched here by one pattern over a subset of the JSON grammar, so a match alone fixes where each field
is: its groups are the spans to edit. Any other event does not match and takes the general path. Both
give the same bytes, except for duplicate keys, which JSON leaves undefined and vLLM does not write (the
general path's parse keeps the last one; a delta judged empty there may not be here).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rollouttap.addon.jsonspans import CHAT_LOGPROBS, INTS, NUMBER, STRING

__all__ = ["ChunkFields", "FIELDS", "chat_chunk_fields"]

# A delta's values, nested as deep as vLLM nests them (tool_calls: [{index, id, type, function: {name,
# arguments}}]) and no deeper; each level is JSON, so a match is one.
_SCALAR = rf"(?:null|true|false|{STRING}|{NUMBER})"
_FLAT = rf"\{{(?:{STRING}:{_SCALAR}(?:,{STRING}:{_SCALAR})*+)?\}}"
_ITEM = rf"\{{(?:{STRING}:(?:{_SCALAR}|{_FLAT})(?:,{STRING}:(?:{_SCALAR}|{_FLAT}))*+)?\}}"
_VALUE = rf"(?:{_SCALAR}|\[(?:{_ITEM}(?:,{_ITEM})*+)?\])"
_DELTA = rf"\{{(?:{STRING}:{_VALUE}(?:,{STRING}:{_VALUE})*+)?\}}"
_INT = r"(?:0|[1-9][0-9]*+)"

_CHAT_CHUNK = re.compile(
    rf'\{{"id":{STRING},"object":"chat\.completion\.chunk","created":{_INT},"model":{STRING},'
    rf'"choices":\[\{{"index":{_INT},"delta":(?P<delta>{_DELTA}),'
    rf'"logprobs":(?:null|(?P<logprobs>{CHAT_LOGPROBS})),"finish_reason":(?P<finish>null|{STRING})'
    rf"(?:,\"stop_reason\":(?:null|{STRING}|{_INT}))?"
    rf'(?:,"token_ids":(?:null|(?P<token_ids>{INTS})))?\}}\]'
    # What follows the choices, in vLLM's order: usage (on every chunk with continuous_usage_stats), the
    # fingerprint (on the last chunk), the prompt's ids and text (on the first).
    rf'(?:,"usage":(?:null|{_ITEM}))?(?:,"system_fingerprint":(?:null|{STRING}))?'
    rf'(?:,"prompt_token_ids":(?:null|(?P<prompt_token_ids>{INTS})))?(?:,"prompt_text":(?:null|{STRING}))?\}}'
)
# A delta with nothing in it (vLLM sends such a chunk, when a parser swallowed its text, only to carry the
# token ids or logprobs asked for), as tokenids' general path judges it: every value null or [].
_EMPTY_DELTA = re.compile(rf"\{{(?:{STRING}:(?:null|\[\])(?:,{STRING}:(?:null|\[\]))*+)?\}}")

FIELDS = ("logprobs", "token_ids", "prompt_token_ids")  # in the order they occur in a chunk


@dataclass(frozen=True, slots=True)
class ChunkFields:
    """Where a chunk's non-null token fields lie, and whether its delta is empty (a parser swallowed it)."""
    spans: dict[str, tuple[int, int]]  # field name (of FIELDS) -> span of its value in the text
    empty_delta: bool  # no text and not the last chunk: vLLM sent it for the token ids or logprobs it carries


def chat_chunk_fields(text: str) -> ChunkFields | None:
    """The token fields of a chat chunk in vLLM's shape; None for any other text (use the general path)."""
    match = _CHAT_CHUNK.fullmatch(text)
    if match is None:
        return None
    spans = {name: match.span(name) for name in FIELDS if match.start(name) != -1}
    empty = match["finish"] == "null" and _EMPTY_DELTA.fullmatch(match["delta"]) is not None
    return ChunkFields(spans, empty)
