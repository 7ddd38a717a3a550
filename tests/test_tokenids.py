"""Tests for rollouttap.addon.tokenids: injecting token-id fields and hiding them again.

The upstream bytes are written by hand in vLLM's own shapes (compact pydantic JSON, fields in
model order); the agent-side expectations are what vLLM sends when the fields are not asked
for, so the tests check byte equality with that, not just with our own one-shot output.
"""

from __future__ import annotations

import gzip
import json
from typing import Any

import pytest

from rollouttap.addon.jsonspans import FAST_VALUE
from rollouttap.addon.tokenids import (
    Injection,
    StreamStripper,
    endpoint_for_path,
    is_model_request,
    plan_injection,
    strip_response_json,
)

ALL = {"return_token_ids": True, "logprobs": True, "return_tokens_as_token_ids": True}
IDS_ONLY = {"return_token_ids": True}
ASK_USAGE = {"stream_options": {"include_usage": True}}


def injection(added: dict[str, Any], endpoint: str = "chat", stream: bool = True) -> Injection:
    return Injection(added=added, new_body=b"{}", stream=stream, endpoint=endpoint)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ requests

CHAT = "/v1/chat/completions"
MSGS = '"messages":[{"role":"user","content":"Wie spät ist es? \\u00e9 ü"}]'


@pytest.mark.parametrize(
    ("path", "body", "added"),
    [
        (CHAT, '{"model":"m",' + MSGS + "}", ALL),
        (CHAT, '{"model":"m",' + MSGS + ',"stream":true}', {**ALL, **ASK_USAGE}),
        (CHAT, '{"model":"m",' + MSGS + ',"stream":true,"logprobs":true}', {**IDS_ONLY, **ASK_USAGE}),
        ("/v1/completions", '{"prompt":"Hi","stream":true}',
         {"return_token_ids": True, "logprobs": 0, "return_tokens_as_token_ids": True, **ASK_USAGE}),  # fmt: skip
        # stream_options the agent set stays as sent: vLLM defaults include_usage to true, continuous usage stats
        # would put usage on every chunk, and false (or null) is the agent's choice (that call goes unchecked).
        (CHAT, '{"model":"m",' + MSGS + ',"stream":true,"stream_options":{}}', ALL),
        (CHAT, '{"model":"m",' + MSGS + ',"stream":true,"stream_options":{"include_usage":false}}', ALL),
        (CHAT, '{"model":"m",' + MSGS + ',"stream":true,"stream_options":{"include_usage":true}}', ALL),
        (CHAT, '{"model":"m",' + MSGS + ',"stream":true,"stream_options":{"continuous_usage_stats":true}}', ALL),
        (CHAT, '{"model":"m",' + MSGS + ',"stream":false}', ALL),  # vLLM refuses stream_options without a stream
        (CHAT, '{"model":"m",' + MSGS + ',"logprobs":true}', IDS_ONLY),
        (CHAT, '{"model":"m",' + MSGS + ',"logprobs":false}', IDS_ONLY),
        (CHAT, '{"model":"m",' + MSGS + ',"top_logprobs":3}', IDS_ONLY),
        (CHAT, '{"model":"m",' + MSGS + ',"return_token_ids":true}',
         {"logprobs": True, "return_tokens_as_token_ids": True}),  # fmt: skip
        # an agent that asks for the ids itself: its stream is asked for its usage all the same (rows train them)
        (CHAT, '{"model":"m",' + MSGS + ',"stream":true,"return_token_ids":true,"logprobs":true}', ASK_USAGE),
        (CHAT, '{"model":"m",' + MSGS + ',"stream":"true"}', {**ALL, **ASK_USAGE}),  # vLLM reads it as true
        (CHAT, '{"model":"m",' + MSGS + ',"return_tokens_as_token_ids":false}',
         {"return_token_ids": True, "logprobs": True}),  # fmt: skip
        ("/v1/completions", '{"model":"m","prompt":"Hi"}',
         {"return_token_ids": True, "logprobs": 0, "return_tokens_as_token_ids": True}),  # fmt: skip
        ("/v1/completions", '{"model":"m","prompt":[1,2,3],"logprobs":2}', IDS_ONLY),
        ("/agents/a1/run7/v1/chat/completions?x=1", '{"model":"m",' + MSGS + "}", ALL),
        (CHAT, '{\n  "model": "m",\n  "messages": []\n}\n', ALL),
        (CHAT, "{}", ALL),
    ],
)
def test_plan_injection_appends_fields_and_keeps_agent_bytes(
    path: str, body: str, added: dict[str, Any]
) -> None:
    raw = body.encode()
    plan = plan_injection(path, raw, "application/json")
    assert plan is not None
    assert plan.added == added
    assert json.loads(plan.new_body) == {**json.loads(raw), **added}
    end = len(raw.rstrip()) - 1
    assert plan.new_body.startswith(raw[:end]) and plan.new_body.endswith(raw[end:])
    assert plan.stream == ('"stream":true' in body or '"stream":"true"' in body)
    assert plan.endpoint == ("chat" if "/chat/" in path else "completions")


@pytest.mark.parametrize(
    ("body", "upstream_logprobs"),
    [
        ('{"messages":[]}', True),
        ('{"messages":[],"logprobs":true}', True),
        ('{"messages":[],"logprobs":false}', False),
        ('{"messages":[],"top_logprobs":2}', False),
    ],
)
def test_upstream_logprobs_records_whether_the_row_gets_logprobs(
    body: str, upstream_logprobs: bool
) -> None:
    plan = plan_injection(CHAT, body.encode(), None)
    assert plan is not None and plan.upstream_logprobs is upstream_logprobs


@pytest.mark.parametrize(
    ("path", "body", "added", "upstream_logprobs"),
    [
        (CHAT, '{"messages":[]}', {"return_token_ids": True}, False),
        (CHAT, '{"messages":[],"logprobs":true}', {"return_token_ids": True}, True),
        ("/v1/completions", '{"prompt":"Hi"}', {"return_token_ids": True}, False),
        ("/v1/completions", '{"prompt":"Hi","logprobs":1}', {"return_token_ids": True}, True),
        (CHAT, '{"messages":[],"return_token_ids":true}', None, False),
    ],
)
def test_logprobs_off_asks_for_token_ids_only(
    path: str, body: str, added: dict[str, Any] | None, upstream_logprobs: bool
) -> None:
    plan = plan_injection(path, body.encode(), None, logprobs=False)
    if added is None:
        assert plan is None
        return
    assert plan is not None and plan.added == added
    assert plan.upstream_logprobs is upstream_logprobs
    assert json.loads(plan.new_body) == {**json.loads(body), **added}


def test_explicit_nulls_are_replaced_in_place() -> None:
    raw = '{"model":"m","logprobs":null,"messages":[{"role":"user","content":"é"}]}'.encode()
    plan = plan_injection(CHAT, raw, "application/json; charset=utf-8")
    assert plan is not None and plan.added == ALL
    assert plan.new_body == (
        '{"model":"m","logprobs":true,"messages":[{"role":"user","content":"é"}],'
        '"return_token_ids":true,"return_tokens_as_token_ids":true}'
    ).encode()


def test_an_explicit_null_top_logprobs_is_set_to_zero_with_the_logprobs_asked_for() -> None:
    # vLLM samples with logprobs=top_logprobs when logprobs is true: a null there would ask for none at all.
    raw = b'{"model":"m","messages":[],"top_logprobs":null}'
    plan = plan_injection(CHAT, raw, None)
    assert plan is not None and plan.added == {**ALL, "top_logprobs": 0} and plan.strips_logprobs
    assert json.loads(plan.new_body)["top_logprobs"] == 0
    assert plan_injection(CHAT, b'{"messages":[]}', None).added == ALL  # unset: vLLM's default is 0 already
    assert plan_injection(CHAT, raw, None, logprobs=False).added == IDS_ONLY


def test_nothing_is_added_to_a_request_that_is_no_stream_and_asks_for_the_ids_itself() -> None:
    body = '{"model":"m",' + MSGS + ',"stream":"false","return_token_ids":true,"logprobs":true}'
    assert plan_injection(CHAT, body.encode(), "application/json") is None


def test_a_null_stream_options_is_replaced_by_the_usage_request() -> None:
    raw = b'{"messages":[],"stream":true,"stream_options":null}'
    plan = plan_injection(CHAT, raw, None)
    assert plan is not None and plan.added == {**ALL, **ASK_USAGE} and plan.drops_usage
    assert json.loads(plan.new_body)["stream_options"] == {"include_usage": True}


def test_usage_off_redoes_an_injection_recorded_without_it() -> None:
    plan = plan_injection(CHAT, b'{"messages":[],"stream":true}', None, usage=False)
    assert plan is not None and plan.added == ALL and not plan.drops_usage


def test_the_usage_request_is_appended_compact() -> None:
    plan = plan_injection(CHAT, b'{"messages":[],"stream":true}', None, logprobs=False)
    assert plan is not None
    assert plan.new_body == (b'{"messages":[],"stream":true,"return_token_ids":true,'
                             b'"stream_options":{"include_usage":true}}')


@pytest.mark.parametrize(
    ("path", "body", "content_type", "encoding"),
    [
        ("/v1/models", b'{"model":"m"}', "application/json", None),
        ("/v1/embeddings", b'{"input":"x"}', "application/json", None),
        ("/v1/responses", b'{"input":"x","background":true}', "application/json", None),
        ("/v1/responses", b'{"input":"x","enable_response_messages":false}', "application/json", None),
        (CHAT, b"not json", "application/json", None),
        (CHAT, b'[{"messages":[]}]', "application/json", None),
        (CHAT, b'"text"', "application/json", None),
        (CHAT, b"", "application/json", None),
        (CHAT, b'\xff{"messages":[]}', "application/json", None),
        (CHAT, gzip.compress(b'{"messages":[]}'), "application/json", None),
        (CHAT, b'{"messages":[]}', "application/json", "gzip"),
        (CHAT, b'{"messages":[]}', "text/plain", None),
        (CHAT, b'{"messages":[],"logprobs":true,"return_token_ids":true}', None, None),
        ("/v1/completions", b'{"prompt":"Hi","echo":true}', "application/json", None),
    ],
)
def test_plan_injection_leaves_other_requests_alone(
    path: str, body: bytes, content_type: str | None, encoding: str | None
) -> None:
    assert plan_injection(path, body, content_type, content_encoding=encoding) is None


@pytest.mark.parametrize(
    ("path", "endpoint"),
    [
        ("/v1/chat/completions", "chat"),
        ("/v1/chat/completions/", "chat"),
        ("/x/y/v1/chat/completions?api-version=1", "chat"),
        ("/v1/completions", "completions"),
        ("/completions", "completions"),
        ("/v1/chat/completionsx", None),
        ("/v1/models", None),
        ("/v1/completions/render", None),
        ("/v1/responses", "responses"),
        ("/v1/responses/resp_1/cancel", None),
    ],
)
def test_endpoint_for_path(path: str, endpoint: str | None) -> None:
    assert endpoint_for_path(path) == endpoint


HOSTS = frozenset({"127.0.0.1:8000", "localhost", "vllm.internal", "[::1]:8001"})


@pytest.mark.parametrize(
    ("host", "port", "path", "method", "expected"),
    [
        ("127.0.0.1", 8000, "/v1/chat/completions", "POST", True),
        ("127.0.0.1", 8001, "/v1/chat/completions", "POST", False),
        ("localhost", 9999, "/v1/completions", "POST", True),
        ("LOCALHOST", 80, "/v1/completions", "post", True),
        ("vllm.internal", 443, "/agents/a/b/v1/chat/completions", "POST", True),
        ("::1", 8001, "/v1/chat/completions", "POST", True),
        ("127.0.0.1", 8000, "/v1/chat/completions", "GET", False),
        ("127.0.0.1", 8000, "/v1/models", "POST", False),
        ("127.0.0.1", 8000, "/v1/responses", "POST", True),
        ("127.0.0.1", 8000, "/v1/responses/resp_1", "GET", False),
        ("api.openai.com", 443, "/v1/chat/completions", "POST", False),
    ],
)
def test_is_model_request(host: str, port: int, path: str, method: str, expected: bool) -> None:
    assert is_model_request(host, port, path, HOSTS, method=method) is expected


# ------------------------------------------------------------------------------ vLLM shapes

HEAD = '"id":"chatcmpl-7f3a","object":"chat.completion.chunk","created":1764400000,"model":"Qwen/Qwen3-0.6B"'
PROMPT_IDS = "[151644,872,198,3838,594,279,9104,304,12095,30,151645,198,151644,77091,198]"


def lp(token_id: int, logprob: str) -> str:
    """One logprobs.content entry as vLLM writes it with return_tokens_as_token_ids."""
    token = f"token_id:{token_id}"
    raw = ",".join(str(b) for b in token.encode())
    return f'{{"token":"{token}","logprob":{logprob},"bytes":[{raw}],"top_logprobs":[]}}'


def chunk(choice: str, tail: str = "") -> str:
    return "{" + HEAD + ',"choices":[' + choice + "]" + tail + "}"


def choice(delta: str, logprobs: str, ids: str, finish: str = "null", stop: str = "") -> str:
    stop_field = f',"stop_reason":{stop}' if stop else ""
    return (
        f'{{"index":0,"delta":{delta},"logprobs":{logprobs},"finish_reason":{finish}'
        f'{stop_field},"token_ids":{ids}}}'
    )


def lps(*entries: str) -> str:
    return '{"content":[' + ",".join(entries) + "]}"


# (upstream event data, what the agent sees, or None when vLLM would not send the event)
TOOL_STREAM: list[tuple[str, str | None]] = [
    (
        chunk('{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}',
              ',"prompt_token_ids":' + PROMPT_IDS),
        chunk('{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}',
              ',"prompt_token_ids":null'),
    ),  # fmt: skip
    (
        chunk(choice('{"content":"I\'ll"}', lps(lp(40, "-0.31326"), lp(3278, "-1.1920928955078125e-7")), "[40,3278]")),
        chunk(choice('{"content":"I\'ll"}', "null", "null")),
    ),  # fmt: skip
    (
        chunk(choice('{"content":" check \\"ü\\"."}', lps(lp(1779, "-0.002")), "[1779]")),
        chunk(choice('{"content":" check \\"ü\\"."}', "null", "null")),
    ),
    (  # the tool parser swallows <tool_call>: sent only because return_token_ids was asked for
        chunk(choice("{}", lps(lp(151657, "0.0")), "[151657]")),
        None,
    ),
    (
        chunk(choice('{"tool_calls":[{"id":"chatcmpl-tool-4c1e","type":"function","index":0,'
                     '"function":{"name":"get_weather"}}]}', lps(lp(515, "-0.5")), "[515]")),
        chunk(choice('{"tool_calls":[{"id":"chatcmpl-tool-4c1e","type":"function","index":0,'
                     '"function":{"name":"get_weather"}}]}', "null", "null")),
    ),  # fmt: skip
    (
        chunk(choice('{"tool_calls":[{"index":0,"function":{"arguments":"{\\"city\\": \\""}}]}',
                     lps(lp(5212, "-0.1"), lp(788, "-0.2")), "[5212,788]")),
        chunk(choice('{"tool_calls":[{"index":0,"function":{"arguments":"{\\"city\\": \\""}}]}',
                     "null", "null")),
    ),  # fmt: skip
    (
        chunk(choice('{"tool_calls":[{"index":0,"function":{"arguments":"Paris"}}]}',
                     lps(lp(59604, "-9999.0")), "[59604]")),
        chunk(choice('{"tool_calls":[{"index":0,"function":{"arguments":"Paris"}}]}', "null", "null")),
    ),  # fmt: skip
    (
        chunk(choice('{"tool_calls":[{"index":0,"function":{"arguments":"\\"}"}}]}',
                     lps(lp(9207, "-0.01"), lp(151658, "-0.0001"), lp(151645, "0.0")),
                     "[9207,151658,151645]", finish='"tool_calls"', stop="null")),
        chunk(choice('{"tool_calls":[{"index":0,"function":{"arguments":"\\"}"}}]}', "null", "null",
                     finish='"tool_calls"', stop="null")),
    ),  # fmt: skip
    (
        "{" + HEAD + ',"choices":[],"usage":{"prompt_tokens":15,"total_tokens":25,"completion_tokens":10}}',
        "{" + HEAD + ',"choices":[],"usage":{"prompt_tokens":15,"total_tokens":25,"completion_tokens":10}}',
    ),  # fmt: skip
    ("[DONE]", "[DONE]"),
]


def sse(events: list[str | None], sep: str = "\n\n") -> bytes:
    return "".join(f"data: {e}{sep}" for e in events if e is not None).encode()


UPSTREAM = sse([up for up, _ in TOOL_STREAM])
AGENT = sse([agent for _, agent in TOOL_STREAM])


def run(stripper: StreamStripper, reads: list[bytes]) -> bytes:
    return b"".join(stripper.feed(read) for read in reads) + stripper.feed(b"")


def test_fixture_is_valid_json() -> None:
    for up, agent in TOOL_STREAM:
        if up != "[DONE]":
            assert json.loads(up) and (agent is None or json.loads(agent))


def test_stream_equals_what_vllm_sends_without_the_fields() -> None:
    assert run(StreamStripper(injection(ALL)), [UPSTREAM]) == AGENT


def test_stream_split_at_every_byte_boundary() -> None:
    for cut in range(1, len(UPSTREAM)):
        out = run(StreamStripper(injection(ALL)), [UPSTREAM[:cut], UPSTREAM[cut:]])
        assert out == AGENT, cut


@pytest.mark.parametrize("size", [1, 2, 3, 7, 64, 1400])
def test_stream_in_small_reads(size: int) -> None:
    reads = [UPSTREAM[i : i + size] for i in range(0, len(UPSTREAM), size)]
    assert run(StreamStripper(injection(ALL)), reads) == AGENT


def test_a_long_prompts_first_event_in_many_reads_is_stripped_whole() -> None:
    # vLLM's first chunk carries every prompt id: megabytes for a long context, arriving in 64 KiB reads.
    ids = "[" + ",".join(str(100000 + i % 50000) for i in range(150_000)) + "]"
    first = chunk('{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}',
                  ',"prompt_token_ids":' + ids)
    upstream, agent = sse([first] + [up for up, _ in TOOL_STREAM]), sse([first.replace(ids, "null")] + [
        a for _, a in TOOL_STREAM])
    for size in (65536, 4093):
        stripper = StreamStripper(injection(ALL))
        outs = [stripper.feed(upstream[i : i + size]) for i in range(0, len(upstream), size)]
        assert b"".join(outs) + stripper.feed(b"") == agent
        assert outs[0] == b"" and outs[len(first) // size - 1] == b""  # held until the event's blank line


def test_stream_with_crlf_line_endings() -> None:
    upstream = sse([up for up, _ in TOOL_STREAM], "\r\n\r\n")
    agent = sse([agent for _, agent in TOOL_STREAM], "\r\n\r\n")
    for cut in range(1, len(upstream), 5):
        assert run(StreamStripper(injection(ALL)), [upstream[:cut], upstream[cut:]]) == agent


def test_complete_events_are_forwarded_at_once_and_partial_ones_held() -> None:
    stripper = StreamStripper(injection(ALL))
    first = sse([TOOL_STREAM[0][0]])
    second = sse([TOOL_STREAM[1][0]])
    assert stripper.feed(first + second[:40]) == sse([TOOL_STREAM[0][1]])
    assert stripper.feed(second[40:]) == sse([TOOL_STREAM[1][1]])
    assert stripper.feed(b"") == b""


@pytest.mark.parametrize(
    ("tail_up", "tail_agent"),
    [
        (b"data: [DONE]", b"data: [DONE]"),
        (b"data: [DONE]\n", b"data: [DONE]\n"),
        (("data: " + TOOL_STREAM[2][0]).encode(), ("data: " + str(TOOL_STREAM[2][1])).encode()),
        (("data: " + TOOL_STREAM[2][0] + "\r\n").encode(), ("data: " + str(TOOL_STREAM[2][1]) + "\r\n").encode()),
    ],
)  # fmt: skip
def test_final_event_without_blank_line_is_flushed(tail_up: bytes, tail_agent: bytes) -> None:
    head = sse([TOOL_STREAM[1][0]])
    stripper = StreamStripper(injection(ALL))
    out = stripper.feed(head + tail_up)
    assert out == sse([TOOL_STREAM[1][1]])
    assert stripper.feed(b"") == tail_agent


@pytest.mark.parametrize(
    "event",
    [
        b": ping\n\n",
        b"data: [DONE]\n\n",
        b"data:not json token_ids\"\n\n",
        b'data: {"error":{"message":"bad","type":"BadRequestError","code":400}}\n\n',
        b'data: {"object":"error","message":"x token_ids\\" y","code":400}\n\n',
        b"event: x\ndata: {\"a\":1}\ndata: {\"token_ids\":[1]}\n\n",
        ('data: {"choices":[{"index":0,"delta":{"content":"é"},"logprobs":null,'
         '"finish_reason":null,"token_ids":null}]}\n\n').encode(),  # fmt: skip
        b"\n\n",
    ],
)
def test_events_needing_no_change_are_byte_identical(event: bytes) -> None:
    assert run(StreamStripper(injection(ALL)), [event]) == event


def test_other_sse_fields_around_the_data_line_are_kept() -> None:
    up = f"id: 7\r\nevent: message\r\ndata:{TOOL_STREAM[1][0]}\r\n\r\n".encode()
    agent = f"id: 7\r\nevent: message\r\ndata:{TOOL_STREAM[1][1]}\r\n\r\n".encode()
    assert run(StreamStripper(injection(ALL)), [up]) == agent


def test_agent_requested_logprobs_stay_byte_identical() -> None:
    # The agent asked for logprobs (with normal token strings); we added return_token_ids only.
    entry = '{"token":"I","logprob":-1.1920928955078125e-7,"bytes":[73],"top_logprobs":[]}'
    swallowed = chunk(choice("{}", lps(entry), "[151657]"))
    content = chunk(choice('{"content":"I"}', lps(entry), "[40]"))
    up = sse([swallowed, content])
    # Without return_token_ids vLLM (2026 on) still sends a swallowed chunk for the logprobs asked for.
    agent = sse([chunk(choice("{}", lps(entry), "null")), chunk(choice('{"content":"I"}', lps(entry), "null"))])
    assert run(StreamStripper(injection(IDS_ONLY)), [up]) == agent


def test_swallowed_chunk_carrying_only_injected_logprobs_is_dropped() -> None:
    # The agent turned return_token_ids off itself; we added logprobs, and newer vLLM sends the swallowed
    # chunk for them alone. The agent would not have got it.
    entry = '{"token":"token_id:151657","logprob":-0.5,"bytes":[],"top_logprobs":[]}'
    swallowed = chunk(choice("{}", lps(entry), "null"))
    content = chunk(choice('{"content":"I"}', lps(entry.replace("151657", "40")), "null"))
    added = {"logprobs": True, "return_tokens_as_token_ids": True}
    agent = sse([chunk(choice('{"content":"I"}', "null", "null"))])
    assert run(StreamStripper(injection(added)), [sse([swallowed, content])]) == agent


def test_agent_requested_token_ids_are_kept() -> None:
    added = {"logprobs": True, "return_tokens_as_token_ids": True}
    up = sse([TOOL_STREAM[1][0], TOOL_STREAM[3][0]])
    agent = sse([
        chunk(choice('{"content":"I\'ll"}', "null", "[40,3278]")),
        chunk(choice("{}", "null", "[151657]")),  # kept: vLLM sends it for return_token_ids
    ])  # fmt: skip
    assert run(StreamStripper(injection(added)), [up]) == agent


USAGE_CHUNK = "{" + HEAD + ',"choices":[],"usage":{"prompt_tokens":15,"total_tokens":25,"completion_tokens":10}}'


@pytest.mark.parametrize("added", [{**ALL, **ASK_USAGE}, {**IDS_ONLY, **ASK_USAGE}])
def test_the_usage_chunk_we_asked_for_is_dropped(added: dict[str, Any]) -> None:
    # vLLM sends it after the finish chunk when stream_options.include_usage is set: the agent set no
    # stream_options, so without our injection it would have got none.
    up = sse([TOOL_STREAM[1][0], USAGE_CHUNK, "[DONE]"])
    agent = sse([TOOL_STREAM[1][1] if "logprobs" in added else chunk(choice('{"content":"I\'ll"}',
                 lps(lp(40, "-0.31326"), lp(3278, "-1.1920928955078125e-7")), "null")), "[DONE]"])
    for size in (1, 5, len(up)):
        reads = [up[i:i + size] for i in range(0, len(up), size)]
        assert run(StreamStripper(injection(added)), reads) == agent


def test_a_spaced_usage_chunk_we_asked_for_is_dropped_too() -> None:
    # Not vLLM's compact JSON (another server, Python's json.dumps): an agent reading chunk.choices[0] would crash.
    spaced = json.dumps(json.loads(USAGE_CHUNK))
    up = sse([TOOL_STREAM[1][0], spaced, "[DONE]"])
    assert run(StreamStripper(injection({**ALL, **ASK_USAGE})), [up]) == sse([TOOL_STREAM[1][1], "[DONE]"])


def test_only_the_usage_chunk_is_dropped_for_an_agent_that_asked_for_the_ids_itself() -> None:
    up = sse([TOOL_STREAM[1][0], USAGE_CHUNK, "[DONE]"])
    assert run(StreamStripper(injection(ASK_USAGE)), [up]) == sse([TOOL_STREAM[1][0], "[DONE]"])


def test_a_usage_chunk_the_agent_asked_for_is_kept() -> None:
    up = sse([USAGE_CHUNK, "[DONE]"])
    assert run(StreamStripper(injection(ALL)), [up]) == up


def test_completions_usage_chunk_we_asked_for_is_dropped() -> None:
    added = {"return_token_ids": True, "logprobs": 0, "return_tokens_as_token_ids": True, **ASK_USAGE}
    usage = "{" + CMPL_HEAD + ',"choices":[],"usage":{"prompt_tokens":3,"total_tokens":4,"completion_tokens":1}}'
    last = "{" + CMPL_HEAD + ',"choices":[' + cmpl_choice("Hi", "null", "null", "null", '"stop"') + '],"usage":null}'
    up = sse([last, usage, "[DONE]"])
    assert run(StreamStripper(injection(added, endpoint="completions")), [up]) == sse([last, "[DONE]"])


def test_nothing_to_strip_passes_reads_through_unbuffered() -> None:
    stripper = StreamStripper(injection({"return_tokens_as_token_ids": True}))
    assert stripper.feed(UPSTREAM[:10]) == UPSTREAM[:10]
    assert stripper.feed(b"") == b""


def test_empty_delta_chunk_vllm_sends_itself_is_kept() -> None:
    # An empty delta with no ids or logprobs is not ours to drop.
    event = chunk('{"index":0,"delta":{},"logprobs":null,"finish_reason":null}', ',"prompt_token_ids":[1,2]')
    agent = chunk('{"index":0,"delta":{},"logprobs":null,"finish_reason":null}', ',"prompt_token_ids":null')
    assert run(StreamStripper(injection(ALL)), [sse([event])]) == sse([agent])


@pytest.mark.parametrize("sep", ["\n\n", "\r\n\r\n"])
def test_field_name_nested_elsewhere_falls_back_to_reserialising(sep: str) -> None:
    up = chunk(choice('{"content":"x"}', "null", "[5]"), ',"kv_transfer_params":{"token_ids":[9]}')
    out = run(StreamStripper(injection(ALL)), [sse([up], sep)])
    assert out.startswith(b"data: ") and out.endswith(sep.encode())
    assert out.count(b"\r") == sep.count("\r")
    expected = json.loads(up)
    expected["choices"][0]["token_ids"] = None
    assert json.loads(out[6:]) == expected


# ------------------------------------------------------------------------ /v1/completions

CMPL_HEAD = '"id":"cmpl-91b2","object":"text_completion","created":1764400000,"model":"Qwen/Qwen3-0.6B"'
CMPL_LP = '{"text_offset":[0],"token_logprobs":[-0.5],"tokens":["token_id:9707"],"top_logprobs":[{"token_id:9707":-0.5}]}'


def cmpl_choice(text: str, logprobs: str, prompt_ids: str | None, ids: str, finish: str = "null") -> str:
    prompt_field = f',"prompt_token_ids":{prompt_ids}' if prompt_ids is not None else ""
    return (
        f'{{"index":0,"text":"{text}","logprobs":{logprobs},"finish_reason":{finish},'
        f'"stop_reason":null{prompt_field},"token_ids":{ids}}}'
    )


def test_completions_stream_hides_choice_level_prompt_ids() -> None:
    added = {"return_token_ids": True, "logprobs": 0, "return_tokens_as_token_ids": True}
    up = sse([
        "{" + CMPL_HEAD + ',"choices":[' + cmpl_choice("Hello", CMPL_LP, "[1,2,3]", "[9707]") + "]}",
        "{" + CMPL_HEAD + ',"choices":[' + cmpl_choice("", CMPL_LP, None, "[151643]", '"stop"') + "]}",
        "[DONE]",
    ])  # fmt: skip
    agent = sse([
        "{" + CMPL_HEAD + ',"choices":[' + cmpl_choice("Hello", "null", "null", "null") + "]}",
        # completions has no parser: vLLM sends empty-text chunks, so none is dropped
        "{" + CMPL_HEAD + ',"choices":[' + cmpl_choice("", "null", None, "null", '"stop"') + "]}",
        "[DONE]",
    ])  # fmt: skip
    stripper = StreamStripper(injection(added, endpoint="completions"))
    assert run(stripper, [up[:33], up[33:]]) == agent


def test_completions_response_json() -> None:
    added = {"return_token_ids": True, "logprobs": 0, "return_tokens_as_token_ids": True}
    usage = ',"usage":{"prompt_tokens":3,"total_tokens":4,"completion_tokens":1,"prompt_tokens_details":null}'
    body = ("{" + CMPL_HEAD + ',"choices":[' + cmpl_choice("Hello", CMPL_LP, "[1,2,3]", "[9707]", '"length"')
            + ',' + cmpl_choice("Hey", CMPL_LP, "[1,2,3]", "[13]", '"length"').replace('"index":0', '"index":1')
            + '],"service_tier":null,"system_fingerprint":null' + usage + ',"kv_transfer_params":null}')  # fmt: skip
    agent = ("{" + CMPL_HEAD + ',"choices":[' + cmpl_choice("Hello", "null", "null", "null", '"length"')
             + ',' + cmpl_choice("Hey", "null", "null", "null", '"length"').replace('"index":0', '"index":1')
             + '],"service_tier":null,"system_fingerprint":null' + usage + ',"kv_transfer_params":null}')  # fmt: skip
    out = strip_response_json(body.encode(), injection(added, endpoint="completions", stream=False))
    assert out == agent.encode()


# ------------------------------------------------------------------- chat, non-streamed

TOOL_MESSAGE = (
    '{"role":"assistant","content":null,"refusal":null,"annotations":null,"audio":null,'
    '"function_call":null,"tool_calls":[{"id":"chatcmpl-tool-4c1e","type":"function",'
    '"function":{"name":"get_weather","arguments":"{\\"city\\": \\"Paris\\"}"}}],'
    '"reasoning_content":null}'
)
USAGE = '"usage":{"prompt_tokens":15,"total_tokens":25,"completion_tokens":10,"prompt_tokens_details":null}'


def chat_response(logprobs: str, ids: str, prompt_ids: str) -> bytes:
    return (
        '{"id":"chatcmpl-7f3a","object":"chat.completion","created":1764400000,'
        '"model":"Qwen/Qwen3-0.6B","choices":[{"index":0,"message":' + TOOL_MESSAGE + ","
        f'"logprobs":{logprobs},"finish_reason":"tool_calls","stop_reason":null,"token_ids":{ids}}}],'
        '"service_tier":null,"system_fingerprint":null,' + USAGE + ',"prompt_logprobs":null,'
        f'"prompt_token_ids":{prompt_ids},"kv_transfer_params":null}}'
    ).encode()


FULL_LPS = lps(lp(151657, "0.0"), lp(515, "-0.5"), lp(151658, "-1.2e-5"))
AGENT_LPS = '{"content":[{"token":"<tool_call>","logprob":0.0,"bytes":[60],"top_logprobs":[]}]}'


@pytest.mark.parametrize(
    ("added", "upstream", "agent"),
    [
        (ALL, chat_response(FULL_LPS, "[151657,515,151658]", PROMPT_IDS),
         chat_response("null", "null", "null")),
        (IDS_ONLY, chat_response(AGENT_LPS, "[151657,515,151658]", PROMPT_IDS),
         chat_response(AGENT_LPS, "null", "null")),
        ({"logprobs": True}, chat_response(FULL_LPS, "[1]", "[2]"), chat_response("null", "[1]", "[2]")),
        (ALL, chat_response("null", "null", "null"), chat_response("null", "null", "null")),
    ],
)  # fmt: skip
def test_chat_response_json(added: dict[str, Any], upstream: bytes, agent: bytes) -> None:
    assert strip_response_json(upstream, injection(added, stream=False)) == agent


def test_response_whitespace_is_kept() -> None:
    upstream = json.dumps(json.loads(chat_response(FULL_LPS, "[1, 2]", PROMPT_IDS)), indent=2).encode()
    expected = json.dumps(json.loads(chat_response("null", "null", "null")), indent=2).encode()
    assert strip_response_json(upstream, injection(ALL, stream=False)) == expected


@pytest.mark.parametrize(
    "body",
    [
        b'{"error":{"message":"bad token_ids\\"","type":"BadRequestError","param":null,"code":400}}',
        b'{"object":"error","message":"x","type":"BadRequestError","param":null,"code":400}',
        b"Internal Server Error",
        b'["token_ids"]',
        gzip.compress(chat_response(FULL_LPS, "[1]", "[2]")),
        b"",
    ],
)
def test_other_response_bodies_are_unchanged(body: bytes) -> None:
    assert strip_response_json(body, injection(ALL, stream=False)) is body


# ------------------------------------------------------- skipping values without decoding them

TRICKY_LPS = lps(
    '{"token":"\\"]},","logprob":-1.1920928955078125e-7,"bytes":[34,93,125,44],"top_logprobs":['
    '{"token":"\\\\u00e9","logprob":-2.5E+3,"bytes":null}]}',
    '{"token":"é[","logprob":0,"bytes":[195,169,91],"top_logprobs":null}',
)


@pytest.mark.parametrize(
    "value",
    [
        "[]", "[0]", "[1,20,300]", '{"content":null}', '{"content":[]}', FULL_LPS, TRICKY_LPS, CMPL_LP,
        '{"text_offset":[],"token_logprobs":[null,-0.5],"tokens":["a","\\n"],"top_logprobs":[null,{}]}',
    ],
)  # fmt: skip
def test_fast_value_match_ends_where_json_decoding_does(value: str) -> None:
    text = '{"k":' + value + ',"x":1}'
    match = FAST_VALUE.match(text, 5)
    assert match is not None  # the shapes vLLM sends are skipped without decoding
    assert match.end() == json.JSONDecoder().raw_decode(text, 5)[1]


@pytest.mark.parametrize(
    "value",
    [
        "[01]", "[1,,2]", "[1,]", "[,1]", "[1 ,2]", "[-1]",
        '{"content":[{"token":"a\x01","logprob":0,"bytes":null,"top_logprobs":[]}]}',
        '{"content":[{"token":"a\\x","logprob":0,"bytes":null,"top_logprobs":[]}]}',
        '{"content":[{"token":"a","logprob":01,"bytes":null,"top_logprobs":[]}]}',
        '{"content":[{"token":"a","logprob":1.,"bytes":null,"top_logprobs":[]}]}',
        '{"content":[{"token":"a","logprob":NaN,"bytes":null,"top_logprobs":[]}]}',
        '{"content":[{"token":"a","logprob":-Infinity,"bytes":null,"top_logprobs":[]}]}',
        '{"content":[{"logprob":0,"token":"a","bytes":null,"top_logprobs":[]}]}',
        '{"content":[{"token":"a","logprob":0,"bytes":null,"top_logprobs":[]}],"refusal":null}',
    ],
)  # fmt: skip
def test_fast_value_match_leaves_anything_else_to_the_decoder(value: str) -> None:
    assert FAST_VALUE.match(value) is None


@pytest.mark.parametrize(
    ("upstream", "agent"),
    [
        (chat_response(TRICKY_LPS, "[1]", "[2]"), chat_response("null", "null", "null")),
        # decoded the slow way (Python's json accepts NaN), same bytes
        (chat_response(lps(lp(5, "NaN")), "[1]", "[2]"), chat_response("null", "null", "null")),
        (chat_response(FULL_LPS, "[1]", "[2]").replace(b'"Paris', b'"7391820465 Paris'),
         chat_response("null", "null", "null").replace(b'"Paris', b'"7391820465 Paris')),
    ],
)  # fmt: skip
def test_unusual_values_are_still_stripped_byte_exact(upstream: bytes, agent: bytes) -> None:
    assert strip_response_json(upstream, injection(ALL, stream=False)) == agent


def test_an_escaped_key_name_falls_back_to_reserialising() -> None:
    upstream = chat_response(FULL_LPS, "[1]", "[2]").replace(b'"token_ids":[1]', b'"token\\u005fids":[1]')
    expected = json.loads(upstream)
    expected["choices"][0]["logprobs"] = None
    expected["choices"][0]["token_ids"] = None
    expected["prompt_token_ids"] = None
    out = strip_response_json(upstream, injection(ALL, stream=False))
    assert json.loads(out) == expected and b"token_ids" in out and b"\\u005f" not in out


@pytest.mark.parametrize(
    "body",
    [
        chat_response(FULL_LPS, "[1,,2]", "[2]"),  # not JSON inside a value
        chat_response(FULL_LPS, "[1]", "[2]")[:-1],  # not JSON around them
        chat_response(FULL_LPS.replace('"logprob":-0.5', '"logprob":--0.5'), "[1]", "[2]"),
    ],
)
def test_bodies_that_are_not_json_are_forwarded_untouched(body: bytes) -> None:
    assert strip_response_json(body, injection(ALL, stream=False)) is body


# ------------------------------------------------------------------------------ Responses API
# vLLM's ResponsesResponse (model_dump: every field, in model order); input_messages/output_messages
# are null unless the request set enable_response_messages.

def responses_body(messages: bool) -> str:
    raw_in = '[{"message":"<|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\n","tokens":[1,872,198,2],' \
             '"type":"raw_message_tokens"}]'
    raw_out = '[{"message":"Hel\\"lo","tokens":[9,10,11,151645],"type":"raw_message_tokens"}]'
    return ('{"id":"resp_9c1","created_at":1764400000,"incomplete_details":null,"instructions":null,'
            '"metadata":null,"model":"m","object":"response","output":[{"id":"msg_1","content":[{"annotations":[],'
            '"text":"Hel\\"lo","type":"output_text","logprobs":null}],"role":"assistant","status":"completed",'
            '"type":"message"}],"parallel_tool_calls":true,"temperature":1.0,"tool_choice":"auto","tools":[],'
            '"top_p":1.0,"background":false,"max_output_tokens":100,"max_tool_calls":null,'
            '"previous_response_id":null,"prompt":null,"reasoning":null,"service_tier":"auto",'
            '"status":"completed","text":null,"top_logprobs":null,"truncation":"disabled","usage":null,'
            '"user":null,"input_messages":' + (raw_in if messages else "null") + ',"output_messages":'
            + (raw_out if messages else "null") + "}")


def test_responses_requests_ask_for_the_raw_messages() -> None:
    raw = b'{"model":"m","input":[{"role":"user","content":"hi"}],"stream":true}'
    plan = plan_injection("/v1/responses", raw, "application/json")
    assert plan is not None and plan.endpoint == "responses" and plan.stream
    assert plan.added == {"enable_response_messages": True} and plan.strips_token_ids
    assert plan.new_body == raw[:-1] + b',"enable_response_messages":true}'
    assert plan_injection("/v1/responses", raw, None, logprobs=False) == plan  # logprobs are never asked for


def test_responses_answer_reads_as_without_the_raw_messages() -> None:
    plan = plan_injection("/v1/responses", b'{"input":"hi"}', None)
    assert plan is not None
    assert strip_response_json(responses_body(True).encode(), plan) == responses_body(False).encode()
    # the agent set it itself: nothing to hide
    assert strip_response_json(responses_body(True).encode(), injection({}, "responses")) == \
        responses_body(True).encode()


def test_responses_stream_nulls_the_messages_of_the_completed_event_only() -> None:
    plan = plan_injection("/v1/responses", b'{"input":"hi","stream":true}', None)
    assert plan is not None

    def event(kind: str, body: str) -> bytes:
        return f'event: {kind}\ndata: {{"response":{body},"sequence_number":7,"type":"{kind}"}}\n\n'.encode()

    delta = b'event: response.output_text.delta\ndata: {"content_index":0,"delta":"_messages\\"","item_id":"msg_1",' \
            b'"logprobs":[],"output_index":0,"sequence_number":3,"type":"response.output_text.delta"}\n\n'
    upstream = event("response.created", responses_body(False)) + delta + event("response.completed", responses_body(True))
    expected = event("response.created", responses_body(False)) + delta + event("response.completed", responses_body(False))
    for size in (1, 7, 100, len(upstream)):
        stripper = StreamStripper(plan)
        out = b"".join(stripper.feed(upstream[i:i + size]) for i in range(0, len(upstream), size)) + stripper.feed(b"")
        assert out == expected, size


def test_responses_field_names_inside_tool_schemas_are_left_alone() -> None:
    plan = plan_injection("/v1/responses", b'{"input":"hi"}', None)
    assert plan is not None
    tool = '[{"type":"function","name":"f","parameters":{"properties":{"output_messages":{"type":"string"}}}}]'
    body = responses_body(True).replace('"tools":[]', f'"tools":{tool}')
    doc = json.loads(strip_response_json(body.encode(), plan))
    assert doc["input_messages"] is None and doc["output_messages"] is None
    assert doc["tools"] == json.loads(tool)
