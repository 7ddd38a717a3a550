"""Which calls continue which: client retries and turns, the threads of message history an agent's chat calls make
(a sub-agent or a parallel call starts its own), and every break in a thread's continuity (messages dropped or
rewritten)."""

from __future__ import annotations

import json
from typing import Any, Sequence

from rollouttap.manager.calls import ChatCall, Discontinuity, ResponsesCall, history_of_call
from rollouttap.manager.head_index import HeadIndex

__all__ = ["Message", "assign_threads", "classify_break", "find_retries", "normalize_message"]

Message = tuple[str, str, tuple[tuple[str, str], ...]]


def _content_key(content: Any) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) and p.get("type", "text") == "text"
                       else json.dumps(p, sort_keys=True) for p in content)
    return json.dumps(content, sort_keys=True)


def _canonical_arguments(arguments: Any) -> str:
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return arguments.strip()
    return json.dumps(arguments, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def normalize_message(message: dict[str, Any]) -> Message:
    """What continuity compares: role, content (None == "", text parts joined) and tool calls (name and
    canonical JSON arguments). Ids, names, reasoning and other extra fields are ignored."""
    calls = tuple(((tc.get("function") or {}).get("name") or "",
                   _canonical_arguments((tc.get("function") or {}).get("arguments")))
                  for tc in message.get("tool_calls") or [] if isinstance(tc, dict))
    return (str(message.get("role")), _content_key(message.get("content")), calls)


def _request_key(call: ChatCall | ResponsesCall) -> str:
    request = [call.messages, call.tools, call.params, call.stream]
    if isinstance(call, ResponsesCall):
        request = ["responses", call.previous_response_id, *request]
    return json.dumps(request, sort_keys=True, default=str)


def find_retries(calls: Sequence[ChatCall | ResponsesCall]) -> tuple[list[bool], list[int]]:
    """Per call: whether it is a client retry, and its turn. A retry repeats a failed call's request or carries
    x-stainless-retry-count > 0; it shares its original's turn, as does a repeat of the answered call just before
    it (an agent sampling the same request again, which may keep either answer: not a retry)."""
    retries: list[bool] = []
    turns: list[int] = []
    last_seen: dict[str, int] = {}
    new_turn = 0  # turns only ever repeat an earlier one or take the next number: no max() over all of them
    for i, call in enumerate(calls):
        key = _request_key(call)
        prev = last_seen.get(key)
        retried = call.retry_count > 0 or (prev is not None and calls[prev].failed)
        # A retry count with no failed attempt of this request to hand (they never reached the proxy) makes
        # a turn of its own, not a repeat of an answered request further back.
        repeat = prev is not None and (prev == i - 1 or calls[prev].failed)
        retries.append(retried)
        if repeat and prev is not None:
            turns.append(turns[prev])
        else:
            turns.append(new_turn)
            new_turn += 1
        last_seen[key] = i
    return retries, turns


def _common_prefix(a: Sequence[Message], b: Sequence[Message]) -> int:
    k = 0
    while k < len(a) and k < len(b) and a[k] == b[k]:
        k += 1
    return k


def _expected(call: ChatCall) -> list[Message]:
    return [normalize_message(m) for m in history_of_call(call)]


def _resumes_at(expected: Sequence[Message], current: Sequence[Message], k: int) -> int | None:
    """Where in ``expected`` the message after the shared prefix reappears (history cut in the middle)."""
    if k >= len(current):
        return None
    return next((j for j in range(k + 1, len(expected)) if expected[j] == current[k]), None)


def classify_break(expected: Sequence[Message], current: Sequence[Message], k: int,
                   has_reply: bool) -> tuple[str, str]:
    """(kind, detail) of a call whose messages share only ``k`` leading messages with ``expected``."""
    if k == len(current):
        return "truncated", f"resends only {k} of the previous context's {len(expected)} messages"
    later = _resumes_at(expected, current, k)
    if later is not None:
        return "truncated", f"messages {k}..{later - 1} of the previous context were dropped"
    if has_reply and k == len(expected) - 1:
        return "rewritten", f"the assistant reply at message {k} differs from what the model returned"
    return "rewritten", f"message {k} ({current[k][0]}) differs from the previous context"


def _leading_system(messages: Sequence[Message]) -> int:
    n = 0
    while n < len(messages) and messages[n][0] in ("system", "developer"):
        n += 1
    return n


Head = tuple[int, int]  # (thread, index of the call whose history a next turn may continue)


def _pick_thread(current: list[Message], heads: list[tuple[Head, list[Message]]]) -> tuple[Head | None, int]:
    """The head ``current`` continues and the shared prefix length; None for a new thread.
    An exact extension wins (the longest); else the longest shared prefix that goes beyond the system
    prompt or resumes further down the thread's history (a cut in the middle)."""
    exact = [(len(exp), head) for head, exp in heads if _common_prefix(exp, current) == len(exp)]
    if exact:
        length, head = max(exact)
        return head, length
    partial = []
    for head, exp in heads:
        k = _common_prefix(exp, current)
        if k > _leading_system(current) or (k and _resumes_at(exp, current, k) is not None):
            partial.append((k, head))
    if partial:
        k, head = max(partial)
        return head, k
    return None, 0


def assign_threads(calls: Sequence[ChatCall], turns: Sequence[int]) -> tuple[list[int], list[Discontinuity]]:
    """Per call its thread, and every break in continuity, checking each turn's last attempt against the
    answered attempts of each thread's latest turn (an agent that sampled a request twice keeps either answer)."""
    attempts: dict[int, list[int]] = {}
    for i, turn in enumerate(turns):
        attempts.setdefault(turn, []).append(i)
    thread_of_turn: dict[int, int] = {}
    heads: HeadIndex[Message] = HeadIndex()  # per thread, the calls of its latest turn a next turn may continue
    breaks: list[Discontinuity] = []
    for turn in sorted(attempts):
        i = attempts[turn][-1]
        at = attempts[turn][0]  # a break shows at the turn's first call
        current = [normalize_message(m) for m in calls[i].messages]
        head, k = _pick_thread(current, heads.candidates(current, _leading_system(current)))
        if head is None:
            thread = len(heads.threads)
            if heads.threads:
                breaks.append(Discontinuity(at, "new_thread", "shares no conversation with earlier calls",
                                            0, thread))
        else:
            thread, c = head
            expected = heads.expected[head]
            if k < len(expected):
                kind, detail = classify_break(expected, current, k, calls[c].response is not None)
                breaks.append(Discontinuity(at, kind, detail, k, thread))
        kept = [c for c in attempts[turn][:-1] if calls[c].response is not None]
        mine = current + [normalize_message(calls[i].response.to_message())] if calls[i].response else current
        heads.set_heads(thread, [((thread, c), _expected(calls[c])) for c in kept] + [((thread, i), mine)])
        thread_of_turn[turn] = thread
    return [thread_of_turn[t] for t in turns], breaks
