"""Ask a vLLM server for token ids and logprobs, and hide them again from the agent.

Pure functions over bytes and dicts; the addon wires them into its hooks.

What the agent sees. vLLM serialises non-streamed responses with every field present
(``JSONResponse(content=response.model_dump())``), so a field that was not requested reads
``null``; streamed chunks use ``model_dump_json(exclude_unset=True)``, but vLLM passes
``prompt_token_ids``, ``token_ids`` and ``logprobs`` explicitly (``None`` when not requested),
so they read ``null`` too. Stripping therefore replaces an injected value with ``null`` in
place, by editing the bytes: every other byte (float spellings, escapes, whitespace) is the
server's own, and the result equals what vLLM sends without the injected fields, byte for
byte. If a field name also occurs deeper than where vLLM puts it, the edit falls back to
re-serialising the parsed JSON (same meaning, compact separators, not byte-identical), except in a
streamed chunk of vLLM's shape, whose fields one whole-chunk match places (``vllm_chunk``).

Chunks that exist only because of the injection are dropped: when a tool or reasoning
parser swallows text, vLLM still sends an empty-delta chunk that carries the token ids or logprobs
asked for (``return_token_ids`` since ~0.11, logprobs too since 2026), and nothing otherwise. Such a
chunk is dropped when all it carries is what we injected; one carrying logprobs the agent asked for
is forwarded with the ids nulled, as newer vLLM sends it (older vLLM skipped it, logprobs and all).

The request side (what is asked for, and why) is ``injection.py``; this module strips the answers. A
stream's usage-only chunk that the proxy asked for (``"choices":[]``, before ``[DONE]``) is dropped too.

The Responses API (``/v1/responses``) has no ``return_token_ids``: vLLM's extra field
``enable_response_messages`` makes it add ``input_messages`` (the rendered prompt and its ids) and
``output_messages`` (the generated text and ids), both ``null`` otherwise, at the top level of the
response object, which a stream carries inside its ``response.completed`` event. Those two are nulled
again; logprobs are not asked for there (vLLM gives them only for the message text, not for every sampled
id). A background request is left alone (its answer comes later, through a GET the proxy does not read).
"""

from __future__ import annotations

import functools
import json
import logging
import re
from dataclasses import dataclass
from typing import Any

from rollouttap.addon.injection import (
    USAGE_OPTIONS, Endpoint, Injection, dumps_json as _dumps, endpoint_for_path, is_model_request, plan_injection,
)
from rollouttap.addon.jsonspans import key_pattern, splice_nulls, value_spans, with_markers
from rollouttap.addon.vllm_chunk import FIELD_GROUPS, FIELDS, delta_is_empty, fields_present, match_chat_event

log = logging.getLogger(__name__)

__all__ = [  # the request side lives in injection.py; its names are re-exported here
    "USAGE_OPTIONS",
    "Endpoint",
    "Injection",
    "StreamStripper",
    "endpoint_for_path",
    "is_model_request",
    "plan_injection",
    "strip_response_json",
]


# ---------------------------------------------------------------------------- responses


@dataclass(frozen=True, slots=True)
class _StripPlan:
    top_keys: tuple[str, ...]
    choice_keys: tuple[str, ...]
    nested: str | None  # a key whose object holds top_keys too (a Responses stream event's "response")
    key_pattern: re.Pattern[str]
    markers: tuple[bytes, ...]  # cheap substring test: no marker, nothing to strip
    chunk_fields: frozenset[str]  # vllm_chunk.FIELDS to null in a streamed chat chunk of vLLM's shape
    drop_usage: bool = False  # drop a stream's usage-only chunk: it is there because we asked for it
    chunk_groups: tuple[int, ...] = ()  # chunk_fields as vllm_chunk's match groups, in the order they occur

    def may_touch(self, raw: bytes) -> bool:
        return any(marker in raw for marker in self.markers)


@functools.lru_cache(maxsize=16)
def _strip_plan(ids: bool, logprobs: bool, endpoint: Endpoint, usage: bool = False) -> _StripPlan | None:
    if not ids and not logprobs and not usage:
        return None
    if endpoint == "responses":
        top = ("input_messages", "output_messages")
        return _StripPlan(top_keys=top, choice_keys=(), nested="response", key_pattern=key_pattern(top),
                          markers=(b'_messages"',), chunk_fields=frozenset())
    choice_keys = (("token_ids", "prompt_token_ids") if ids else ()) + (
        ("logprobs",) if logprobs else ()
    )
    markers = ((b'token_ids"',) if ids else ()) + ((b'"logprobs"',) if logprobs else ()) + (
        (_USAGE_MARKER,) if usage else ()
    )
    chunk_fields = frozenset(
        (("logprobs",) if logprobs else ()) + (("token_ids", "prompt_token_ids") if ids else ())
    ) if endpoint == "chat" else frozenset()
    return _StripPlan(
        top_keys=("prompt_token_ids",) if ids else (),
        choice_keys=choice_keys,
        nested=None,
        key_pattern=key_pattern(choice_keys),
        markers=markers,
        chunk_fields=chunk_fields,
        drop_usage=usage,
        chunk_groups=tuple(FIELD_GROUPS[name] for name in FIELDS if name in chunk_fields),
    )


def _plan_for(injection: Injection) -> _StripPlan | None:
    return _strip_plan(injection.strips_token_ids, injection.strips_logprobs, injection.endpoint,
                       injection.drops_usage)


class _Drop:
    """_strip_json's answer for an event the agent must not see at all."""


_DROP = _Drop()


def strip_response_json(body: bytes, injection: Injection) -> bytes:
    """Hide injected fields from a non-streamed response; other bodies come back unchanged."""
    plan = _plan_for(injection)
    if plan is None or not plan.may_touch(body):
        return body
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return body
    new = _strip_json(text, plan, allow_drop=False)
    return new.encode("utf-8") if isinstance(new, str) else body


def _strip_json(text: str, plan: _StripPlan, *, allow_drop: bool) -> str | _Drop | None:
    """``text`` with the planned fields nulled; None if nothing changes (or not JSON), _DROP to drop it.

    One pass: find the planned keys' values in the text, then parse the document with each value
    replaced by a marker (small: the token ids and logprobs are most of a response) and check that
    the markers are exactly the planned fields.
    """
    try:
        spans = value_spans(text, plan.key_pattern)
        reduced = with_markers(text, spans)
    except (ValueError, RecursionError):
        return None
    if reduced is not None:
        doc, marks = reduced
        if not isinstance(doc, dict):
            return None
        if _marks_are_the_fields(doc, plan, marks):
            if not marks:
                return None
            if allow_drop and _only_for_us(doc, plan):
                return _DROP
            return splice_nulls(text, spans)
    try:  # unusual documents (a planned key deeper than vLLM puts it): decide on the whole parse
        return _strip_parsed(text, json.loads(text), plan, allow_drop=allow_drop)
    except (ValueError, RecursionError):
        return None


def _strip_parsed(text: str, doc: Any, plan: _StripPlan, *, allow_drop: bool) -> str | _Drop | None:
    if not isinstance(doc, dict):
        return None
    expected = _count_fields(doc, plan)
    if expected == 0:
        return None
    if allow_drop and _only_for_us(doc, plan):
        return _DROP
    spans = value_spans(text, plan.key_pattern)
    if len(spans) != expected:
        # A field name also occurs deeper than vLLM puts it: edit the parsed document.
        log.debug("token-id fields found %d times, expected %d", len(spans), expected)
        _null_fields(doc, plan)
        return _dumps(doc)
    return splice_nulls(text, spans)


def _marks_are_the_fields(doc: dict[str, Any], plan: _StripPlan, marks: frozenset[int]) -> bool:
    """Every non-null planned field holds a marker, and every marker sits in one."""
    seen = set()
    for holder, keys in _holders(doc, plan):
        for key in keys:
            value = holder.get(key)
            if value is None:
                continue
            if type(value) is not int or value not in marks:
                return False
            seen.add(value)
    return len(seen) == len(marks)


def _holders(doc: dict[str, Any], plan: _StripPlan) -> list[tuple[dict[str, Any], tuple[str, ...]]]:
    """The objects where vLLM puts the planned fields, each with its keys."""
    holders = [(doc, plan.top_keys)]
    inner = doc.get(plan.nested) if plan.nested is not None else None
    if isinstance(inner, dict):
        holders.append((inner, plan.top_keys))
    return holders + [(choice, plan.choice_keys) for choice in _choices(doc)]


def _choices(doc: dict[str, Any]) -> list[dict[str, Any]]:
    choices = doc.get("choices")
    if not isinstance(choices, list):
        return []
    return [choice for choice in choices if isinstance(choice, dict)]


def _count_fields(doc: dict[str, Any], plan: _StripPlan) -> int:
    return sum(holder.get(key) is not None for holder, keys in _holders(doc, plan) for key in keys)


def _null_fields(doc: dict[str, Any], plan: _StripPlan) -> None:
    for holder, keys in _holders(doc, plan):
        for key in keys:
            if holder.get(key) is not None:
                holder[key] = None


_SWALLOW_FIELDS = frozenset(("logprobs", "token_ids"))  # what a parser-swallowed chunk may carry


def _only_for_us(doc: dict[str, Any], plan: _StripPlan) -> bool:
    """True for a chunk vLLM sends only because of what we injected: a parser swallowed its text, and it
    carries token ids or logprobs that the agent did not ask for (``swallowed_only_for_us``)."""
    choices = doc.get("choices")
    if not isinstance(choices, list) or not choices:
        return False
    for choice in choices:
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if not isinstance(delta, dict) or choice.get("finish_reason") is not None:
            return False
        if any(value is not None and value != [] for value in delta.values()):
            return False
        carried = frozenset(key for key in _SWALLOW_FIELDS if choice.get(key) is not None)
        if not swallowed_only_for_us(carried, plan.chunk_fields):
            return False
    return True


def swallowed_only_for_us(carried: frozenset[str] | set[str], stripped: frozenset[str]) -> bool:
    """Whether an empty-delta chunk carrying ``carried`` (of _SWALLOW_FIELDS) exists only for fields we strip
    (the plan's ``chunk_fields``, empty but for chat): vLLM sends one for either field, so with neither it
    sent it itself, and with one the agent asked for (not stripped) the agent would have got it too."""
    return bool(carried) and carried <= stripped


# ---------------------------------------------------------------------------- SSE streams

_EVENT_END = re.compile(rb"\n\r?\n")
# Longer events are vLLM's first chunk of a long prompt, which carries the prompt's ids: the general path checks an id
# list by string methods (jsonspans), faster than vllm_chunk's pattern, which steps through every id (a first chunk
# of 100,000 six-digit ids: 1.9 against 3.1 ms). Not one that is not ASCII: see feed.
LONG_EVENT = 1 << 16


class StreamStripper:
    """Rewrites an SSE response for the agent, one TCP read at a time.

    Events end at a blank line (``\\n\\n`` or ``\\r\\n\\r\\n``; lone-CR line endings are not
    split). Events needing no change are forwarded byte-identical; an incomplete trailing
    event is held until it completes or ``feed(b"")`` ends the stream.
    """

    def __init__(self, injection: Injection) -> None:
        self._plan = _plan_for(injection)
        # An incomplete event's reads, joined once it completes: vLLM's first chunk carries the whole prompt's
        # ids (megabytes for a long context, in 64 KiB reads), and joining at every read would be quadratic.
        self._held: list[bytes] = []
        self._tail = b""  # the held bytes' last two: a terminator (at most 3 bytes) may begin in them

    def feed(self, chunk: bytes) -> bytes:
        """Bytes to forward now; ``b""`` marks the end of the stream and flushes what is held."""
        plan = self._plan
        if plan is None:
            return chunk
        if not chunk:
            rest = b"".join(self._held)
            self._held, self._tail = [], b""
            return _rewrite_event(rest, plan) if rest else b""
        if self._held:
            seam = self._tail + chunk
            if _EVENT_END.search(seam) is None:  # the held event goes on
                self._held.append(chunk)
                self._tail = seam[-2:]
                return b""
            start = sum(map(len, self._held)) - len(self._tail)
            buf = b"".join((*self._held, chunk))
        else:
            start, buf = 0, chunk
        out: list[bytes] = []
        pos = 0
        while True:
            # Where a long event may begin, find its end first: one over LONG_EVENT takes the general path, unless
            # it is not ASCII (the general path leaves an event that is not UTF-8 as it came, ids and all).
            long = len(buf) - pos > LONG_EVENT
            end = _EVENT_END.search(buf, max(pos, start)) if long else None
            raw = buf[pos : end.end()] if end is not None and end.start() - pos > LONG_EVENT else None
            if plan.chunk_groups and (not long or end is not None) and (raw is None or not raw.isascii()) and \
                    (chat := match_chat_event(buf, pos)) is not None:
                _strip_chat_event(buf, pos, chat, plan, out)
                pos = chat.end()
                continue
            if not long:
                end = _EVENT_END.search(buf, max(pos, start))
            if end is None:
                break
            out.append(_rewrite_event(raw if raw is not None else buf[pos : end.end()], plan))
            pos = end.end()
        rest = buf[pos:]
        self._held, self._tail = ([rest], rest[-2:]) if rest else ([], b"")
        return b"".join(out)


def _strip_chat_event(buf: bytes, pos: int, chat: re.Match[bytes], plan: _StripPlan, out: list[bytes]) -> None:
    """Append the event ``chat`` matched (vllm_chunk) to ``out`` as the agent must see it: its planned fields
    nulled, or nothing when the chunk exists only because of them. Slices of ``buf``: nothing decoded or parsed."""
    first = len(out)
    done = pos
    for group in plan.chunk_groups:
        begin, end = chat.span(group)
        if begin != -1:
            out += (buf[done:begin], b"null")
            done = end
    if len(out) > first and delta_is_empty(chat) and swallowed_only_for_us(
            fields_present(chat) & _SWALLOW_FIELDS, plan.chunk_fields):
        del out[first:]
        return
    out.append(buf[done : chat.end()])


def _rewrite_event(raw: bytes, plan: _StripPlan) -> bytes:
    """One SSE event (terminator included) as the agent must see it."""
    if not plan.may_touch(raw):
        return raw
    span = _data_span(raw)
    if span is None:
        return raw
    start, end = span
    try:
        text = raw[start:end].decode("utf-8")
    except UnicodeDecodeError:
        return raw
    new = _strip_event_json(text, plan)
    if new is None:
        return raw
    if isinstance(new, _Drop):
        return b""
    return raw[:start] + new.encode("utf-8") + raw[end:]


def _strip_event_json(text: str, plan: _StripPlan) -> str | _Drop | None:
    """_strip_json for an event's data that is not a chat chunk of vLLM's shape (StreamStripper.feed takes those
    in one match); its usage-only chunk is dropped."""
    if plan.drop_usage and _is_usage_chunk(text):
        return _DROP
    return _strip_json(text, plan, allow_drop=True)


# vLLM's last chunk when usage is asked for, after the one that carries the finish reason, before ``[DONE]``
# (pydantic, exclude_none): ``{"id":…,"object":…,"created":…,"model":…,"choices":[],"usage":{…}}``. Found by
# its key, then parsed: another server may space its JSON (``"choices": []``). A "usage" inside a string is
# escaped (``\"usage\"``), so the marker only meets the key.
_USAGE_MARKER = b'"usage"'
_USAGE_TEXT = _USAGE_MARKER.decode()


def _is_usage_chunk(text: str) -> bool:
    """Whether an event's data is a stream's usage-only chunk: no choices, a usage object."""
    if _USAGE_TEXT not in text:
        return False
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        return False
    return isinstance(doc, dict) and doc.get("choices") == [] and isinstance(doc.get("usage"), dict)


def _data_span(raw: bytes) -> tuple[int, int] | None:
    """Where the value of the event's only ``data:`` line lies; None unless exactly one."""
    if raw.startswith(b"data:"):
        start = 0
    else:
        start = raw.find(b"\ndata:") + 1
        if start == 0:
            return None
    end = raw.find(b"\n", start)
    if end == -1:
        end = len(raw)
    elif raw.find(b"\ndata:", end) != -1:
        return None  # vLLM sends one data line per event; leave anything else alone
    start += 6 if raw.startswith(b" ", start + 5) else 5
    if end > start and raw[end - 1] == 0x0D:
        end -= 1
    return start, end
