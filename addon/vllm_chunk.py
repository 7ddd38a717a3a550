"""vLLM's streamed chat chunk matched whole, SSE framing included: where its token-id fields lie, unparsed.

tokenids' general path finds the planned keys anywhere, parses the event with their values replaced by
markers and checks that the markers sit where vLLM puts those fields: sound for any JSON, but a dozen
Python calls and a parse per event, and an answer streams one event per token or few. The event vLLM
streams (``data: `` and one chunk: one choice; a delta of text, reasoning or tool-call fragments; its fields
in vLLM's order; then a blank line) is matched here on the bytes as read, by one pattern over a subset of
the JSON grammar, so a match alone fixes where each field is: its groups are the spans to edit, and its end
is the event's. Any other event does not match and takes the general path, as does an ASCII first chunk over
``tokenids.LONG_EVENT`` bytes (a long prompt's ids, which the general path checks faster). Both give the
same bytes, except for duplicate keys, which JSON leaves undefined and vLLM does not write (the general path's
parse keeps the last one; a delta judged empty there may not be here), and for text that is not UTF-8, which
vLLM does not send either: the general path cannot decode it and leaves the event alone, this match nulls its
fields all the same (bytes of 0x80 and up pass as string content), so the ids never reach the agent.
"""

from __future__ import annotations

import re

from rollouttap.addon.jsonspans import CHAT_LOGPROBS, INTS, NUMBER, STRING

__all__ = ["FIELDS", "FIELD_GROUPS", "delta_is_empty", "fields_present", "match_chat_event"]

# A delta's values, nested as deep as vLLM nests them (tool_calls: [{index, id, type, function: {name,
# arguments}}]) and no deeper; each level is JSON, so a match is one.
_SCALAR = rf"(?:null|true|false|{STRING}|{NUMBER})"
_FLAT = rf"\{{(?:{STRING}:{_SCALAR}(?:,{STRING}:{_SCALAR})*+)?\}}"
_ITEM = rf"\{{(?:{STRING}:(?:{_SCALAR}|{_FLAT})(?:,{STRING}:(?:{_SCALAR}|{_FLAT}))*+)?\}}"
_VALUE = rf"(?:{_SCALAR}|\[(?:{_ITEM}(?:,{_ITEM})*+)?\])"
_DELTA = rf"\{{(?:{STRING}:{_VALUE}(?:,{STRING}:{_VALUE})*+)?\}}"
_INT = r"(?:0|[1-9][0-9]*+)"

_CHAT_CHUNK = (
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
# Bytes, not text: the patterns are ASCII and their strings take any byte but '"', '\' and controls, so
# UTF-8 text passes as it is, and an event is matched in place in the read, neither copied out nor decoded. The
# chunk holds no newline (no whitespace, none raw in a string), so the first blank line after it, which
# ends the event, is where the match ends.
_CHAT_EVENT = re.compile(rb"data: ?" + _CHAT_CHUNK.encode() + rb"\r?\n\r?\n")
# A delta with nothing in it (vLLM sends such a chunk, when a parser swallowed its text, only to carry the
# token ids or logprobs asked for), as tokenids' general path judges it: every value null or [].
_EMPTY_DELTA = re.compile(rf"\{{(?:{STRING}:(?:null|\[\])(?:,{STRING}:(?:null|\[\]))*+)?\}}".encode())

FIELDS = ("logprobs", "token_ids", "prompt_token_ids")  # in the order they occur in a chunk
FIELD_GROUPS = {name: _CHAT_EVENT.groupindex[name] for name in FIELDS}  # group numbers: no name lookup per event
_FINISH_GROUP, _DELTA_GROUP = _CHAT_EVENT.groupindex["finish"], _CHAT_EVENT.groupindex["delta"]

match_chat_event = _CHAT_EVENT.match
"""``match_chat_event(buf, pos)``: the event at ``buf[pos:]`` if it is one data line holding a chat chunk of
vLLM's shape, and its blank line; None for any other event, or one not yet whole (use the general path)."""


def fields_present(match: re.Match[bytes]) -> frozenset[str]:
    """The non-null token fields (of FIELDS) of a matched event."""
    return frozenset(name for name, group in FIELD_GROUPS.items() if match.start(group) != -1)


def delta_is_empty(match: re.Match[bytes]) -> bool:
    """No text and not the last chunk: vLLM sent it for the token ids or logprobs it carries."""
    return match.group(_FINISH_GROUP) == b"null" and _EMPTY_DELTA.fullmatch(match.group(_DELTA_GROUP)) is not None
