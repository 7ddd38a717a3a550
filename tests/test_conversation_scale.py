"""Threads and chains at scale: the indexed assign_threads/_chains give the straightforward algorithms' results
(kept here as references) on seeded random agents, and compare each turn only with a few heads."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from typing import Any

import pytest

from rollouttap.manager import rows
from rollouttap.manager.conversation import (
    ChatCall, Discontinuity, ResponseMessage, assign_threads, classify_break, find_retries, normalize_message,
)

# -- references: the algorithms as they were before indexing, compared with every head (chain) in turn -------------

Message = tuple[str, str, tuple[tuple[str, str], ...]]


def ref_find_retries(calls: Sequence[ChatCall]) -> tuple[list[bool], list[int]]:
    retries: list[bool] = []
    turns: list[int] = []
    last_seen: dict[str, int] = {}
    for i, call in enumerate(calls):
        key = json.dumps([call.messages, call.tools, call.params, call.stream], sort_keys=True, default=str)
        prev = last_seen.get(key)
        retries.append(call.retry_count > 0 or (prev is not None and calls[prev].failed))
        repeat = prev is not None and (prev == i - 1 or calls[prev].failed)
        turns.append(turns[prev] if repeat and prev is not None else (max(turns) + 1 if turns else 0))
        last_seen[key] = i
    return retries, turns


def _prefix(a: Sequence[Message], b: Sequence[Message]) -> int:
    k = 0
    while k < len(a) and k < len(b) and a[k] == b[k]:
        k += 1
    return k


def _expected(call: ChatCall) -> list[Message]:
    reply = [call.response.to_message()] if call.response else []
    return [normalize_message(m) for m in [*call.messages, *reply]]


def _resumes(expected: Sequence[Message], current: Sequence[Message], k: int) -> bool:
    return k < len(current) and any(expected[j] == current[k] for j in range(k + 1, len(expected)))


def _leading_system(messages: Sequence[Message]) -> int:
    n = 0
    while n < len(messages) and messages[n][0] in ("system", "developer"):
        n += 1
    return n


def _ref_pick(current: list[Message], heads: list[tuple[tuple[int, int], list[Message]]]):
    exact = [(len(exp), head) for head, exp in heads if _prefix(exp, current) == len(exp)]
    if exact:
        length, head = max(exact)
        return head, length
    partial = [(k, head) for head, exp in heads
               if (k := _prefix(exp, current)) > _leading_system(current) or (k and _resumes(exp, current, k))]
    if partial:
        k, head = max(partial)
        return head, k
    return None, 0


def ref_assign_threads(calls: Sequence[ChatCall], turns: Sequence[int]) -> tuple[list[int], list[Discontinuity]]:
    attempts: dict[int, list[int]] = {}
    for i, turn in enumerate(turns):
        attempts.setdefault(turn, []).append(i)
    thread_of_turn: dict[int, int] = {}
    heads: dict[int, list[int]] = {}
    breaks: list[Discontinuity] = []
    for turn in sorted(attempts):
        i, at = attempts[turn][-1], attempts[turn][0]
        current = [normalize_message(m) for m in calls[i].messages]
        head, k = _ref_pick(current, [((t, c), _expected(calls[c])) for t, cs in heads.items() for c in cs])
        if head is None:
            thread = len(heads)
            if heads:
                breaks.append(Discontinuity(at, "new_thread", "shares no conversation with earlier calls", 0, thread))
        else:
            thread, c = head
            expected = _expected(calls[c])
            if k < len(expected):
                kind, detail = classify_break(expected, current, k, calls[c].response is not None)
                breaks.append(Discontinuity(at, kind, detail, k, thread))
        heads[thread] = [c for c in attempts[turn][:-1] if calls[c].response is not None] + [i]
        thread_of_turn[turn] = thread
    return [thread_of_turn[t] for t in turns], breaks


def ref_chains(used: list[Any], *, strict: bool) -> list[list[int]]:
    chains: list[list[int]] = []
    for position, call in enumerate(used):
        target, target_length = None, -1
        for number, chain in enumerate(chains):
            last = used[chain[-1]]
            extends = call.prompt[:len(last.prompt) + len(last.completion)] == last.prompt + last.completion
            if last.length >= target_length and extends:
                target, target_length = number, last.length
        if target is not None:
            chains[target].append(position)
        elif chains and strict:
            raise rows.TokenDriftError("drift")
        else:
            chains.append([position])
    return chains


# -- seeded random agents ------------------------------------------------------------------------------------------

SYSTEMS = [{"role": "system", "content": "You are an agent."}, {"role": "system", "content": "You summarise."}]


def chat(index: int, messages: list[dict[str, Any]], reply: dict[str, Any] | None, *, failed: bool = False,
         retry_count: int = 0) -> ChatCall:
    response = None if reply is None else ResponseMessage("assistant", reply.get("content"),
                                                          tool_calls=reply.get("tool_calls", []))
    return ChatCall(
        index=index, flow_id=f"f{index}", url=None, path=None, model="m", params={}, stream=False,
        finish_reason=None if failed else "stop", usage=None, status_code=500 if failed else 200, state="done",
        error="HTTP 500" if failed else None, failed=failed, latency=None, ttfb=None, t_request=None,
        response_id=None, prompt_token_ids=None, completion_token_ids=None, completion_logprobs=None,
        retry_count=retry_count, position=index, messages=messages, response=response)


class Agent:
    """Sends chat calls the way agents do: threads that grow, retries, second samples, forks, cuts, rewrites."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.calls: list[ChatCall] = []
        self.histories: list[list[dict[str, Any]]] = []
        self.vocabulary = [f"w{i}" for i in range(6)]  # few words: unrelated messages often collide

    def text(self) -> str:
        return " ".join(self.rng.choices(self.vocabulary, k=self.rng.randint(1, 2)))

    def reply(self) -> dict[str, Any]:
        if self.rng.random() < 0.3:
            arguments = json.dumps({"x": self.rng.randint(0, 3)})
            return {"role": "assistant", "content": None,
                    "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}]}
        return {"role": "assistant", "content": self.text()}

    def send(self, messages: list[dict[str, Any]], *, fail: bool = False, retry_count: int = 0) -> dict | None:
        reply = None if fail else self.reply()
        self.calls.append(chat(len(self.calls), messages, reply, failed=fail, retry_count=retry_count))
        return reply

    def start(self, system: bool) -> None:
        messages = ([self.rng.choice(SYSTEMS)] if system else []) + [{"role": "user", "content": self.text()}]
        self.turn(len(self.histories), messages)
        self.histories.append([])

    def turn(self, thread: int, request: list[dict[str, Any]]) -> None:
        roll = self.rng.random()
        if roll < 0.08:  # a failed attempt, then the client's retry
            self.send(request, fail=True)
            reply = self.send(request, retry_count=self.rng.randint(0, 1))
        elif roll < 0.14:  # a second sample of the same request; the agent goes on with either
            first, second = self.send(request), self.send(request)
            reply = self.rng.choice([first, second])
        elif roll < 0.17:  # an unanswered call the agent goes past
            reply = self.send(request, fail=True)
        else:
            reply = self.send(request)
        history = request + ([reply] if reply else [])
        if thread < len(self.histories):
            self.histories[thread] = history
        else:
            self.histories.append(history)

    def step(self, threads: int, system: bool) -> None:
        if len(self.histories) < threads:
            self.start(system)
            return
        thread = self.rng.randrange(len(self.histories))
        history = list(self.histories[thread])
        roll = self.rng.random()
        if roll < 0.06 and len(history) > 3:  # a cut in the middle: keep the opening message and the recent part
            history = history[:1] + history[1 + self.rng.randint(1, 2):]
        elif roll < 0.10 and history:  # a rewritten message
            at = self.rng.randrange(len(history))
            history[at] = {**history[at], "content": self.text()}
        elif roll < 0.14 and len(history) > 1:  # a fork from an earlier point, as a thread of its own
            history = history[:self.rng.randrange(1, len(history))]
            thread = len(self.histories)
        elif roll < 0.16:  # a request that sends nothing
            history = []
        elif roll < 0.18:  # the agent sends its reply as a list of text parts: the same message
            history = [{**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m.get("content"), str)
                       else m for m in history]
        elif roll < 0.21:  # an empty request, answered or not, that no thread goes on from
            self.send([], fail=self.rng.random() < 0.5)
            return
        message = {"role": self.rng.choice(["user", "tool"]), "content": self.text()}
        self.turn(thread, history + [message])


def agent_calls(kind: str, seed: int, n: int) -> list[ChatCall]:
    agent = Agent(seed)
    threads, system = {"independent": (n, False), "independent_system": (n, True), "long": (1, True),
                       "interleaved": (4, True), "many": (12, False)}[kind]
    while len(agent.calls) < n:
        if kind.startswith("independent"):
            agent.start(system)
        else:
            agent.step(threads, system)
    return agent.calls


KINDS = ["independent", "independent_system", "long", "interleaved", "many"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("seed", range(12))
def test_threads_and_breaks_match_the_reference(kind: str, seed: int) -> None:
    calls = agent_calls(kind, seed, 60)
    retries, turns = find_retries(calls)
    assert (retries, turns) == ref_find_retries(calls)
    assert assign_threads(calls, turns) == ref_assign_threads(calls, turns)


def test_random_agents_reach_every_kind_of_break() -> None:
    """The equivalence above is only as good as the cases it meets: every rule must be exercised."""
    kinds = set()
    for kind in KINDS:
        for seed in range(12):
            calls = agent_calls(kind, seed, 60)
            _, breaks = assign_threads(calls, find_retries(calls)[1])
            kinds |= {(b.kind, b.detail.split(" ")[0]) for b in breaks}
    assert {("new_thread", "shares"), ("rewritten", "message"), ("rewritten", "the"), ("truncated", "messages"),
            ("truncated", "resends")} <= kinds


class Counted(dict):
    """A message that counts how often continuity normalises it (normalize_message reads its role once)."""

    reads = 0

    def get(self, key: str, default: Any = None) -> Any:
        if key == "role":
            Counted.reads += 1
        return super().get(key, default)


@pytest.mark.parametrize("kind", KINDS)
def test_each_message_is_normalised_a_bounded_number_of_times(kind: str) -> None:
    calls = [chat(c.index, [Counted(m) for m in c.messages], None if c.response is None else c.response.to_message(),
                  failed=c.failed, retry_count=c.retry_count) for c in agent_calls(kind, 1, 400)]
    turns = find_retries(calls)[1]
    Counted.reads = 0
    assign_threads(calls, turns)
    # a turn's own messages once, and again for an earlier attempt kept beside it; never once per head
    assert Counted.reads <= 2 * sum(len(c.messages) for c in calls)


# -- token chains ---------------------------------------------------------------------------------------------------

def used(index: int, prompt: list[Any], completion: list[Any]) -> rows._Used:
    return rows._Used(index, prompt, completion, None, "stop")  # chaining is internal: its input type, directly


def token_calls(kind: str, seed: int, n: int) -> list[rows._Used]:
    rng = random.Random(seed)
    template = [7, 7, 1]  # a chat template's opening, shared by unrelated calls

    def tokens(k: int) -> list[int]:
        return rng.choices(range(3), k=k)  # a small vocabulary: sequences often share a prefix, or are equal

    ends: list[list[int]] = []
    out: list[rows._Used] = []
    while len(out) < n:
        roll = rng.random()
        if kind == "independent" or not ends or (roll < 0.15 and len(ends) < {"long": 1, "few": 4}.get(kind, n)):
            prompt = template + tokens(rng.randint(0, 3))
        elif roll < 0.25:  # another sample of a chain's last request, or the same sequence again
            prompt = list(rng.choice(out).prompt)
        elif roll < 0.32:  # a prompt that re-rendered an earlier turn
            prompt = rng.choice(ends)[:rng.randint(0, 4)] + tokens(2)
        elif roll < 0.36:
            prompt = []
        else:
            prompt = rng.choice(ends) + tokens(rng.randint(0, 2))
        completion = tokens(rng.randint(0, 2))
        out.append(used(len(out), prompt, completion))
        ends.append(prompt + completion)
    return out


@pytest.mark.parametrize("kind", ["independent", "long", "few", "many"])
@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("strict", [False, True])
def test_chains_match_the_reference(kind: str, seed: int, strict: bool) -> None:
    calls = token_calls(kind, seed, 80)
    try:
        expected: list[list[int]] | str = ref_chains(calls, strict=strict)
    except rows.TokenDriftError:
        expected = "drift"
    try:
        got: list[list[int]] | str = rows._chains(calls, strict=strict)
    except rows.TokenDriftError:
        got = "drift"
    assert got == expected


@pytest.mark.parametrize("calls", [
    [used(0, [1, "a"], [2]), used(1, [1, "a", 2, 3], [4]), used(2, [1, 5], [6]), used(3, [1, "b"], [])],
    [used(0, [1, None], [2]), used(1, [1, 2], [3]), used(2, [1, None, 2], [])],
], ids=["strings", "none"])
def test_token_ids_that_do_not_sort_still_chain(calls: list[rows._Used]) -> None:
    assert rows._chains(calls, strict=False) == ref_chains(calls, strict=False)
