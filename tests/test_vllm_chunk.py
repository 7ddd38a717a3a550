"""Tests for rollouttap.addon.vllm_chunk: the whole-event match that strips streamed token fields in one step.

The chunks come from the scripted upstream's builders (vLLM's exact chunk shapes: text, reasoning, tool-call
fragments, parser-swallowed chunks, the final chunk with stop_reason, the usage chunk). For each, the stream
stripper (which takes the one match) must give what tokenids' general path gives (it compares private helpers on
purpose: the two paths are the subject), and must take the chunks vLLM streams, or the speed-up is gone unnoticed.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from rollouttap.addon import tokenids
from rollouttap.addon.vllm_chunk import FIELD_GROUPS, delta_is_empty, fields_present, match_chat_event
from rollouttap.testing.fake_tokenizer import FakeTokenizer
from rollouttap.testing.replies import Reply, ToolCall
from rollouttap.testing.vllm_format import Options, dumps, generate_chat
from rollouttap.testing.vllm_responses import ResponseMeta, chat_chunks

TOK = FakeTokenizer()
CALC = {"type": "function", "function": {"name": "calculator", "parameters": {
    "type": "object", "properties": {"expression": {"type": "string"}}}}}
USER = {"role": "user", "content": "What is 2 + 3 * 4? Answer \"exactly\" ü."}
REPLIES = {
    "text": Reply(content='It is 14 — "fourteen" ü\n'),
    "tool call": Reply(content="Let me check.", tool_calls=[ToolCall("calculator", {"expression": "2 + 3 * 4"})]),
    "reasoning": Reply(content="14", reasoning="Multiply first: 3 * 4 = 12."),
    "tool call only": Reply(tool_calls=[ToolCall("calculator", {"expression": "1/0"})]),
}
ALL = {"return_token_ids": True, "logprobs": True, "return_tokens_as_token_ids": True}
ASKED = {  # what the agent asked for itself, then what rollouttap added (tokenids.plan_injection's rules)
    "nothing": ({}, ALL),
    "logprobs": ({"logprobs": True, "top_logprobs": 2}, {"return_token_ids": True}),
    "token ids": ({"return_token_ids": True}, {"logprobs": True, "return_tokens_as_token_ids": True}),
    "ids only": ({}, {"return_token_ids": True}),
    "ids refused": ({"return_token_ids": False}, {"logprobs": True, "return_tokens_as_token_ids": True}),
    "usage": ({"stream_options": {"include_usage": True}}, ALL),
}


def upstream_chunks(reply: Reply, asked: dict[str, Any], added: dict[str, Any], k: int,
                    reasoning_field: str = "reasoning_content") -> list[str]:
    request = {"model": "m", "messages": [USER], "stream": True, "tools": [CALC], **asked, **added}
    gen = generate_chat(request, reply, TOK)
    opts = Options.from_request(request, reasoning_field=reasoning_field)
    chunks = chat_chunks(gen, ResponseMeta.new("m"), opts, TOK, tokens_per_chunk=k)
    return [dumps(chunk).decode() for chunk in chunks]


def injection(added: dict[str, Any]) -> tokenids.Injection:
    return tokenids.Injection(added=added, new_body=b"{}", stream=True, endpoint="chat")


def plan(added: dict[str, Any]) -> Any:
    return tokenids._plan_for(injection(added))


def event(text: str, sep: str = "\n\n", data: str = "data: ") -> bytes:
    return f"{data}{text}{sep}".encode()


def one_match(text: str) -> re.Match[bytes] | None:
    return match_chat_event(event(text), 0)


def stripped(text: str, added: dict[str, Any], sep: str = "\n\n", data: str = "data: ") -> bytes:
    """What the stream stripper forwards for the event (the one match where it applies)."""
    stripper = tokenids.StreamStripper(injection(added))
    return stripper.feed(event(text, sep, data)) + stripper.feed(b"")


def general(text: str, added: dict[str, Any], sep: str = "\n\n", data: str = "data: ") -> bytes:
    """The same event through tokenids' general path: parse with markers, check, splice."""
    out = tokenids._strip_event_json(text, plan(added))
    if isinstance(out, tokenids._Drop):
        return b""
    return event(text if out is None else out, sep, data)


@pytest.mark.parametrize("reasoning_field", ["reasoning_content", "reasoning"])  # older, newer vLLM
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("asked", ASKED)
@pytest.mark.parametrize("reply", REPLIES)
def test_one_match_strips_as_the_general_path_does(reply: str, asked: str, k: int, reasoning_field: str) -> None:
    agent_asked, added = ASKED[asked]
    for text in upstream_chunks(REPLIES[reply], agent_asked, added, k, reasoning_field):
        assert stripped(text, added) == general(text, added), text
        if json.loads(text)["choices"]:  # the usage chunk has none; every other chunk takes the one match
            assert one_match(text) is not None, text


def test_the_chunks_cover_what_the_one_match_must_handle() -> None:
    # A guard on the table above: it holds swallowed chunks (dropped), tool-call fragments, reasoning,
    # a final chunk with stop_reason, and the first chunk's prompt ids.
    texts = [t for reply in REPLIES.values() for t in upstream_chunks(reply, {}, ALL, 1)]
    matched = [(t, m) for t, m in zip(texts, map(one_match, texts)) if m is not None]
    swallowed = [t for t, m in matched if delta_is_empty(m)]
    assert swallowed and stripped(swallowed[0], ALL) == b""
    assert any('"tool_calls"' in t and '"arguments"' in t for t in texts)
    assert any('"reasoning_content"' in t for t in texts)
    assert any('"stop_reason"' in t for t in texts)
    assert sum("prompt_token_ids" in fields_present(m) for _, m in matched) == len(REPLIES)


HEAD = '{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":['
CHOICE = '{"index":0,"delta":%s,"logprobs":null,"finish_reason":null,"token_ids":[5]}'


USAGE = ('"usage":{"prompt_tokens":12,"total_tokens":15,"completion_tokens":3,'
         '"completion_tokens_details":{"reasoning_tokens":2}}')
LOGPROBS = '{"content":[{"token":"token_id:5","logprob":-0.5,"bytes":[],"top_logprobs":[]}]}'
TAILS = {  # what newer vLLM puts after the choices, on some chunks
    "continuous usage": "," + USAGE,
    "fingerprint on the last chunk": ',"system_fingerprint":"fp_7"',
    "first chunk's prompt text": ',"prompt_token_ids":[1,2],"prompt_text":"<|im_start|>user\\nhi"',
    "all of them": "," + USAGE + ',"system_fingerprint":null,"prompt_token_ids":[1,2],"prompt_text":null',
}


@pytest.mark.parametrize("delta", ['{"content":"a"}', "{}"])
@pytest.mark.parametrize("tail", TAILS)
def test_newer_fields_after_the_choices_take_the_one_match(tail: str, delta: str) -> None:
    text = HEAD + CHOICE.replace('"logprobs":null', '"logprobs":' + LOGPROBS) % delta + "]" + TAILS[tail] + "}"
    json.loads(text)
    assert one_match(text) is not None
    for added in (ALL, {"return_token_ids": True}):
        assert stripped(text, added) == general(text, added) != event(text)


@pytest.mark.parametrize("text", [
    HEAD + CHOICE % '{"content":"a"}' + "," + CHOICE % '{"content":"b"}' + "]}",  # two choices
    HEAD + CHOICE % '{"content":"a"}' + '],"service_tier":null}',  # a field vLLM does not put there
    HEAD + CHOICE % '{"content":"a"}' + '],"prompt_token_ids":[1],"usage":null}',  # out of vLLM's order
    HEAD + CHOICE % '{"content":"a"}' + '],"prompt_token_ids":[1],"x":1}',
    HEAD + '{"delta":{"content":"a"},"index":0,"logprobs":null,"finish_reason":null,"token_ids":[5]}]}',  # order
    HEAD + CHOICE % '{"tool_calls":[{"function":{"arguments":{"deep":[1]}}}]}' + "]}",  # deeper than vLLM nests
    HEAD + CHOICE % '{"content":"a"}' + "]} ",  # trailing bytes
    HEAD + CHOICE % '{"content":"a\\x"}' + "]}",  # not JSON
    HEAD.replace('"created":1', '"created":01') + CHOICE % "{}" + "]}",
])  # fmt: skip
def test_other_shapes_are_left_to_the_general_path(text: str) -> None:
    assert one_match(text) is None
    assert stripped(text, ALL) == general(text, ALL)


@pytest.mark.parametrize(("data", "sep"), [("data: ", "\n\n"), ("data:", "\n\n"), ("data: ", "\r\n\r\n"),
                                           ("data: ", "\n\r\n")])
def test_the_framings_sse_allows_take_the_one_match(data: str, sep: str) -> None:
    text = HEAD + CHOICE % '{"content":"a"}' + "]}"
    raw = event(text, sep, data)
    match = match_chat_event(raw + event(text, sep, data), 0)  # another event behind it: the match ends at its own
    assert match is not None and match.end() == len(raw)
    assert stripped(text, ALL, sep, data) == general(text, ALL, sep, data) == event(
        text.replace('"token_ids":[5]', '"token_ids":null'), sep, data)


@pytest.mark.parametrize("framing", ["id: 7\ndata: %s\n\n", "data: %s\nid: 7\n\n", "data: %s\n\n"])
def test_an_event_is_matched_whole_or_not_at_all(framing: str) -> None:
    text = HEAD + CHOICE % '{"content":"a"}' + "]}"
    raw = (framing % text).encode()
    whole = framing == "data: %s\n\n"
    assert (match_chat_event(raw, 0) is not None) == whole
    for cut in (len(raw) - 1, len(raw) - 2):  # not yet whole: no match, and nothing forwarded before the end
        assert match_chat_event(raw[:cut], 0) is None
        assert tokenids.StreamStripper(injection(ALL)).feed(raw[:cut]) == b""
    stripper = tokenids.StreamStripper(injection(ALL))
    assert stripper.feed(raw) + stripper.feed(b"") == raw.replace(b'"token_ids":[5]', b'"token_ids":null')


@pytest.mark.parametrize("cuts", [(), (40,), (1, 2, 3), (7, 700, 701, 1500)])  # events held across reads too
def test_a_stream_of_vllm_chunks_never_takes_the_general_path(monkeypatch: pytest.MonkeyPatch,
                                                              cuts: tuple[int, ...]) -> None:
    texts = [t for reply in REPLIES.values() for t in upstream_chunks(reply, {}, ALL, 1)]
    taken: list[bytes] = []
    general_path = tokenids._rewrite_event
    monkeypatch.setattr(tokenids, "_rewrite_event", lambda raw, plan: taken.append(raw) or general_path(raw, plan))
    stream = b"".join(map(event, texts + ["[DONE]"]))
    stripper = tokenids.StreamStripper(injection(ALL))
    bounds = (0, *cuts, len(stream))
    out = b"".join(stripper.feed(stream[a:b]) for a, b in zip(bounds, bounds[1:])) + stripper.feed(b"")
    assert taken == [event("[DONE]")]
    assert out.count(b"data: ") == len(texts) + 1 - sum(delta_is_empty(m) for m in map(one_match, texts) if m)
    assert b"token_ids\":[" not in out and b'"logprobs":{' not in out


def test_text_that_is_not_utf8_does_not_keep_the_ids() -> None:
    # vLLM sends UTF-8; were a byte amiss, the general path could not read the event and would pass it on whole
    raw = event(HEAD + CHOICE % '{"content":"a"}' + "]}").replace(b'"a"', b'"a\xff"')
    with pytest.raises(UnicodeDecodeError):
        raw.decode()
    stripper = tokenids.StreamStripper(injection(ALL))
    assert stripper.feed(raw) + stripper.feed(b"") == raw.replace(b'"token_ids":[5]', b'"token_ids":null')


def test_a_field_name_inside_the_delta_is_not_taken_for_the_choices() -> None:
    text = HEAD + CHOICE % '{"tool_calls":[{"index":0,"token_ids":7,"function":{"logprobs":"x"}}]}' + "]}"
    match = one_match(text)
    assert match is not None and match.group(FIELD_GROUPS["token_ids"]) == b"[5]"
    out = json.loads(stripped(text, ALL).removeprefix(b"data: "))
    # the general path re-serialises this one (the name occurs twice); both mean the same document
    assert out == json.loads(general(text, ALL).removeprefix(b"data: "))
    assert out["choices"][0]["delta"]["tool_calls"][0]["token_ids"] == 7
    assert out["choices"][0]["token_ids"] is None


def _long_first_chunk(ids: int) -> str:
    first = json.loads(upstream_chunks(REPLIES["text"], {}, ALL, 1)[0])
    first["prompt_token_ids"] = [(i * 7919) % 151_000 for i in range(ids)]  # a long prompt's ids, of up to 6 digits
    return dumps(first).decode()


@pytest.mark.parametrize("cuts", [(), (65_536,), (1, 70_000, 130_000)])  # as read: in 64 KiB reads, or others
def test_a_long_first_chunk_takes_the_general_path_with_the_same_bytes(monkeypatch: pytest.MonkeyPatch,
                                                                       cuts: tuple[int, ...]) -> None:
    texts = [_long_first_chunk(30_000), *upstream_chunks(REPLIES["text"], {}, ALL, 1)[1:]]
    stream = b"".join(map(event, texts + ["[DONE]"]))
    assert len(event(texts[0])) > tokenids.LONG_EVENT >= max(len(event(t)) for t in texts[1:])
    bounds = (0, *cuts, len(stream))

    def strip_all() -> tuple[bytes, list[bytes]]:
        taken: list[bytes] = []
        general_path = tokenids._rewrite_event
        monkeypatch.setattr(tokenids, "_rewrite_event", lambda raw, plan: taken.append(raw) or general_path(raw, plan))
        stripper = tokenids.StreamStripper(injection(ALL))
        out = b"".join(stripper.feed(stream[a:b]) for a, b in zip(bounds, bounds[1:])) + stripper.feed(b"")
        monkeypatch.setattr(tokenids, "_rewrite_event", general_path)
        return out, taken

    out, taken = strip_all()
    assert taken == [event(texts[0]), event("[DONE]")]  # the long chunk went the general way, the rest matched
    assert out.startswith(general(texts[0], ALL)) and b'"prompt_token_ids":null' in out
    monkeypatch.setattr(tokenids, "LONG_EVENT", len(stream))  # every event tried by the one match
    one, taken = strip_all()
    assert one == out and taken == [event("[DONE]")]


def test_a_long_first_chunk_that_is_not_utf8_does_not_keep_the_ids() -> None:
    raw = event(_long_first_chunk(30_000)).replace(b'"content":""', b'"content":"\xff"')
    assert len(raw) > tokenids.LONG_EVENT
    stripper = tokenids.StreamStripper(injection(ALL))
    out = stripper.feed(raw) + stripper.feed(b"")
    assert b'"prompt_token_ids":null' in out and len(out) < 1_000  # the one match nulls it, as for a short one
