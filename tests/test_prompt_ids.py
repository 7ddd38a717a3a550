"""Tests for rollouttap.manager.prompt_ids: an agent's answers decoded with each prompt's ids read past the last one's.

The reader must give what ``json.loads`` gives (and the ids ``chat_stream`` makes of them) for every text, whatever
its shape; the answers come as vLLM writes them (compact JSON, the prompt's ids at the top level), and shapes it
does not write are mixed in.
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

import rollouttap.manager.conversation as conversation
from rollouttap.manager import prompt_ids
from rollouttap.manager.prompt_ids import PromptIdsReader
from rollouttap.store.records import FlowRecord


def answer(ids: Any, *, content: str = "ok", compact: bool = True, **extra: Any) -> str:
    doc = {"id": "chatcmpl-1", "object": "chat.completion", "model": "policy",
           "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop",
                        "token_ids": [7, 2]}],
           "usage": {"prompt_tokens": len(ids) if isinstance(ids, list) else 0, "completion_tokens": 2},
           "prompt_token_ids": ids, **extra}
    return json.dumps(doc, separators=(",", ":") if compact else None)


def odd_texts(ids: list[int]) -> list[str]:
    """Answers that must be decoded the plain way (or raise as json.loads raises)."""
    listed = ",".join(map(str, ids))
    plain = answer(ids)
    return [
        answer(ids, compact=False),  # whitespace
        plain.replace('"prompt_token_ids":[', '"prompt_token_ids":[0' if ids else '"prompt_token_ids":[01,'),
        plain[:-1] + ',"prompt\\u005ftoken_ids":[9]}',  # the key twice: the escaped one, later, wins
        plain.replace('"content":"ok"', '"content":"ok","prompt_token_ids":[3]'),  # nested as well
        plain.replace(f"[{listed}]", f'[{listed}{"," if ids else ""}"x"]'),  # not a list of integers
        plain.replace(f"[{listed}]", f"[{listed}{',' if ids else ''}1.5]"),
        plain.replace(f"[{listed}]", f"[{listed},]"),  # not JSON
        plain[:-1],  # not JSON
        plain.replace('"model":"policy"', '"model":7391820465'),  # a number like the reader's marker
        answer(None),
        answer(ids).replace('"prompt_token_ids"', '"prompt_ids"'),
    ]


def check(reader: PromptIdsReader, text: str) -> list[int] | None:
    """The reader's answer for ``text`` is json.loads's (or it raises as json.loads does); returns its ids."""
    try:
        expected = json.loads(text)
    except ValueError:
        with pytest.raises(ValueError):
            reader.loads(text)
        return None
    before = reader._ids
    doc, ids = reader.loads(text)
    assert doc == expected
    if ids is not None:
        assert doc["prompt_token_ids"] is ids and ids == [int(v) for v in expected["prompt_token_ids"]]
        assert type(ids) is list and all(type(v) is int for v in ids) and ids is not before  # a list of its own
        shared, base = reader.shares  # type: ignore[misc]
        assert shared is ids
        if base is not None:  # read past the list before: holds its int objects
            assert base is before and all(a is b for a, b in zip(ids, base)) and len(ids) >= len(base)
    return ids


def test_the_reader_answers_what_json_does_on_every_shape() -> None:
    rng = random.Random(5)
    for _ in range(300):
        reader = PromptIdsReader()
        ids: list[int] = []
        for _ in range(rng.randrange(1, 8)):
            step = rng.random()
            if step < 0.5:  # the next prompt resends this one
                ids = ids + [rng.randrange(0, 151_000) for _ in range(rng.randrange(1, 40))]
            elif step < 0.6:  # a retry: the same prompt
                pass
            elif step < 0.75:  # another thread, or a shorter prompt
                ids = [rng.randrange(0, 151_000) for _ in range(rng.randrange(0, 30))]
            elif step < 0.85 and ids:  # the last id grows digits: a text prefix that is not a list prefix
                ids = ids[:-1] + [ids[-1] * rng.choice((10, 100)) + 3] + ids[-1:] * rng.randrange(2)
            texts = [answer(ids)] if rng.random() < 0.8 else [rng.choice(odd_texts(ids)), answer(ids)]
            for text in texts:
                check(reader, text)


@pytest.mark.parametrize(("last", "text"), [
    ([], "[,5]"), ([1, 2], "[1,2,]"), ([1, 2], "[1,2,,3]"), ([1, 2], "[1,2,03]"), ([1, 2], "[1,2,3,]"),
    ([1, 2], "[1,2 ,3]"), ([1, 2], "[1,2,3"), ([12], "[1245]"), ([12], "[12]"), ([12], "[12,0]"), ([], "[]"),
])
def test_a_list_that_begins_like_the_last_one_is_read_only_as_json_reads_it(last: list[int], text: str) -> None:
    reader = PromptIdsReader()
    assert check(reader, answer(last)) == last
    check(reader, answer(last).replace(json.dumps(last, separators=(",", ":")), text))


def test_a_prompt_that_resends_the_last_one_is_decoded_past_it(monkeypatch: pytest.MonkeyPatch) -> None:
    decoded: list[int] = []
    loads = json.loads
    monkeypatch.setattr(prompt_ids.json, "loads", lambda text: decoded.append(len(text)) or loads(text))
    reader = PromptIdsReader()
    first = list(range(1000, 21_000))
    longer = first + [5, 77, 151_000]
    for ids, text, most in ((first, answer(first), None), (longer, answer(longer, content="more"), 1_000),
                            (longer, answer(longer), 1_000)):  # the first list whole; then past it; a retry
        decoded.clear()
        doc, got = reader.loads(text)
        assert got == ids and doc == loads(text)
        assert max(decoded) > 100_000 if most is None else max(decoded) < most  # nothing of the list before


def _flow(n: int, body: str, *, stream: bool = False) -> FlowRecord:
    request = {"model": "policy", "messages": [{"role": "user", "content": f"call {n}"}], "stream": stream}
    return FlowRecord(
        id=n, flow_id=f"flow-{n}", proxy_id="p", agent_id="a", pid=1, client_conn_id="c", client_addr="127.0.0.1:1",
        attribution="token", method="POST", url="http://model/v1/chat/completions", scheme="http", host="model",
        port=80, path="/v1/chat/completions", request_headers=[("content-type", "application/json")],
        request_body=json.dumps(request).encode(), status_code=200,
        response_headers=[("content-type", "text/event-stream" if stream else "application/json")],
        response_body=body.encode(), streamed=stream, state="done", error=None, t_request=float(n),
        t_response_headers=None, t_first_byte=None, t_end=n + 0.5)


def _stream(ids: list[int]) -> str:
    head = {"id": "c", "object": "chat.completion.chunk", "model": "policy",
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None}], "prompt_token_ids": ids}
    last = {"id": "c", "object": "chat.completion.chunk", "model": "policy",
            "choices": [{"index": 0, "delta": {"content": "ok"}, "logprobs": None, "finish_reason": "stop",
                         "token_ids": [7, 2]}]}
    usage = {"id": "c", "object": "chat.completion.chunk", "model": "policy", "choices": [],
             "usage": {"prompt_tokens": len(ids), "completion_tokens": 2}}
    return "".join(f"data: {json.dumps(c, separators=(',', ':'))}\n\n" for c in (head, last, usage)) + \
        "data: [DONE]\n\n"


def test_a_conversation_reads_as_it_did_and_holds_each_id_once(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = random.Random(3)
    ids = [rng.randrange(300, 151_000) for _ in range(4_000)]
    flows = []
    for n in range(12):  # prompts that grow, a retry, a sub-agent's own thread, streamed and not
        prompt = ids[:300 * (n + 1)] if n not in (5, 9) else ids[1_000:1_200]
        if n == 7:
            prompt = ids[:300 * n]
        flows.append(_flow(n, _stream(prompt) if n % 3 == 2 else answer(prompt), stream=n % 3 == 2))
    built = conversation.build_conversation(flows)

    class Plain:
        shares = None

        @staticmethod
        def loads(text: str) -> tuple[Any, None]:
            return json.loads(text), None

    monkeypatch.setattr(conversation, "PromptIdsReader", Plain)
    assert conversation.build_conversation(flows) == built  # every field of every call
    calls = built.calls
    assert [len(c.prompt_token_ids or ()) for c in calls] == [300, 600, 900, 1200, 1500, 200, 2100, 2100, 2700,
                                                             200, 3300, 3600]
    for before, after in zip(calls, calls[1:]):  # a prompt that resends the one before holds its int objects
        a, b = before.prompt_token_ids or [], after.prompt_token_ids or []
        if b[:len(a)] == a:
            assert all(x is y for x, y in zip(a, b))
