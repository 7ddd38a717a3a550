"""Rebuilding conversations from captured flows: stream reassembly, call parsing, retries, continuity."""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest

from rollouttap.manager.chat_stream import (
    ids_from_logprob_tokens, parse_chat_body, reassemble_chat_chunks, reassemble_chat_stream,
)
from rollouttap.manager.conversation import (
    ResponseMessage, build_conversation, chat_call_from_flow, flow_kind, normalize_message,
)
from rollouttap.store.records import FlowRecord
from rollouttap.testing.fake_tokenizer import FakeTokenizer
from rollouttap.testing.replies import Reply, ToolCall, default_script
from rollouttap.testing.vllm_format import SSE_DONE, Options, generate_chat, generate_completion, sse, token_logprob
from rollouttap.testing.vllm_responses import ResponseMeta, chat_body, chat_chunks, completion_body

TOK = FakeTokenizer()
CALC = {"type": "function", "function": {"name": "calculator", "parameters": {
    "type": "object", "properties": {"expression": {"type": "string"}}}}}
SYSTEM = {"role": "system", "content": "You are an agent."}
USER = {"role": "user", "content": "What is 2 + 3 * 4?"}
_ids = itertools.count()


def vllm_answer(request: dict, reply: Reply | None = None, *, k: int = 3) -> tuple[bytes, dict]:
    """The upstream's exact answer to ``request`` (SSE when it streams) and the generation facts."""
    reply = reply or default_script(request)
    gen = generate_chat(request, reply, TOK)
    opts = Options.from_request(request)
    meta = ResponseMeta.new("m")
    if request.get("stream"):
        parsers = bool(request.get("tools")) or bool(reply.reasoning)
        chunks = chat_chunks(gen, meta, opts, TOK, tokens_per_chunk=k, parsers=parsers)
        body = b"".join(sse(c) for c in chunks) + SSE_DONE
    else:
        body = json.dumps(chat_body(gen, meta, opts, TOK)).encode()
    calls = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
             for c in gen.tool_calls]
    return body, {"gen": gen, "tool_calls": calls}


def make_flow(request: dict | bytes, response: bytes = b"", *, path: str = "/v1/chat/completions",
              method: str = "POST", status: int | None = 200, state: str = "done", error: str | None = None,
              headers: list[tuple[str, str]] | None = None, t0: float = 100.0) -> FlowRecord:
    body = request if isinstance(request, bytes) else json.dumps(request).encode()
    streamed = response.startswith(b"data:")
    content_type = "text/event-stream; charset=utf-8" if streamed else "application/json"
    n = next(_ids)
    return FlowRecord(
        id=n, flow_id=f"flow-{n}", proxy_id="p", agent_id="a", pid=1, client_conn_id="c", client_addr="127.0.0.1:1",
        attribution="token", method=method, url=f"http://model{path}", scheme="http", host="model", port=80,
        path=path, request_headers=[("content-type", "application/json"), *(headers or [])], request_body=body,
        status_code=status, response_headers=[("content-type", content_type)] if response else [],
        response_body=response or None, streamed=streamed, state=state, error=error, t_request=t0,
        t_response_headers=t0 + 0.01, t_first_byte=t0 + 0.02, t_end=t0 + 0.5)


def turn(messages: list, *, stream: bool = False, reply: Reply | None = None, **extra) -> tuple[FlowRecord, dict]:
    request = {"model": "m", "messages": messages, "tools": [CALC], "stream": stream, **extra}
    body, facts = vllm_answer(request, reply)
    return make_flow(request, body), facts


def assistant(facts: dict, content: str | None = None) -> dict:
    message = {"role": "assistant", "content": content}
    if facts["tool_calls"]:
        message["tool_calls"] = facts["tool_calls"]
    return message


# -- stream reassembly -----------------------------------------------------------------------------

@pytest.mark.parametrize("reply", [
    Reply(content="Plain answer."),
    Reply(content="", reasoning="Think first."),
    Reply(content="Let me compute.", reasoning="hmm", tool_calls=[ToolCall("calculator", {"expression": "1 + 1"}),
                                                                 ToolCall("calculator", {"expression": "2 * 2"})]),
    Reply(tool_calls=[ToolCall("calculator", {"expression": "€ 😀"})]),
], ids=["content", "reasoning", "content+reasoning+2 tools", "unicode args"])
@pytest.mark.parametrize("k", [1, 4])
def test_streamed_and_non_streamed_answers_read_back_the_same(reply, k):
    request = {"messages": [USER], "tools": [CALC], "return_token_ids": True, "logprobs": True,
               "stream_options": {"include_usage": True}}
    plain, facts = vllm_answer(request, reply)
    streamed, _ = vllm_answer({**request, "stream": True}, reply, k=k)
    a, b = parse_chat_body(json.loads(plain)), reassemble_chat_stream(streamed)
    for field in ("reasoning", "finish_reason", "prompt_token_ids", "completion_token_ids", "completion_logprobs"):
        assert getattr(a, field) == getattr(b, field), field
    assert (a.content or "") == (b.content or "")
    assert [tc["function"] for tc in a.tool_calls] == [tc["function"] for tc in b.tool_calls]
    assert all(tc["id"] and tc["type"] == "function" for tc in b.tool_calls)
    assert b.completion_token_ids == facts["gen"].ids and b.done and not a.streamed and b.streamed
    assert b.usage["completion_tokens"] == len(facts["gen"].ids)
    assert b.completion_logprobs == [token_logprob(j, t) for j, t in enumerate(b.completion_token_ids)]


def test_tool_fragments_merge_by_index():
    chunks = [
        {"id": "x", "model": "m", "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 1, "id": "b", "type": "function", "function": {"name": "g"}}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "a", "function": {"name": "f", "arguments": "{\"x\""}}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}},
                                                            {"index": 1, "function": {"arguments": "{}"}}]}}]},
        {"choices": [{"index": 1, "delta": {"content": "other choice"}}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
    ]
    result = reassemble_chat_chunks(chunks)
    assert result.tool_calls == [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}},
        {"id": "b", "type": "function", "function": {"name": "g", "arguments": "{}"}}]
    assert (result.content, result.finish_reason, result.id, result.chunks) == ("", "tool_calls", "x", 6)


@pytest.mark.parametrize("sse_text,expected", [
    ('data: {"choices":[{"index":0,"delta":{"reasoning":"a"}}]}\n\n'
     'data: {"choices":[{"index":0,"delta":{"reasoning":"b","reasoning_content":"b"}}]}\n\n', {"reasoning": "ab"}),
    ('data: {"choices":[{"index":0,"delta":{"content":"par"}}]}\n\n', {"content": "par", "done": False, "finish_reason": None}),
    ('data: {"error":{"message":"boom","code":500}}\n\ndata: [DONE]\n\n', {"error": {"message": "boom", "code": 500}, "done": True}),
    ('data: {"choices":[{"index":0,"text":"he","token_ids":[1]}]}\n\n'
     'data: {"choices":[{"index":0,"text":"y","token_ids":[2],"finish_reason":"stop"}]}\n\n', {"content": "hey", "completion_token_ids": [1, 2]}),
    (": keep-alive\n\ndata: not json\n\n", {"content": None, "chunks": 0}),
], ids=["reasoning spelling", "cut short", "error event", "completions text", "junk"])
def test_stream_edge_cases(sse_text, expected):
    result = reassemble_chat_stream(sse_text)
    assert {k: getattr(result, k) for k in expected} == expected


@pytest.mark.parametrize("tokens,expected", [
    (["token_id:5", "token_id:17"], [5, 17]), (["token_id:5", "a"], None), ([], []), (None, None)])
def test_ids_from_logprob_tokens(tokens, expected):
    assert ids_from_logprob_tokens(tokens) == expected


def test_non_streamed_error_body():
    assert parse_chat_body({"error": {"message": "bad", "code": 400}}).error == {"message": "bad", "code": 400}
    assert parse_chat_body("nope").error is not None


# -- calls -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,path,kind", [
    ("POST", "/v1/chat/completions", "chat"), ("POST", "/openai/v1/chat/completions?x=1", "chat"),
    ("POST", "/v1/completions", "completion"), ("GET", "/v1/chat/completions", "other"), ("POST", "/echo", "other"),
])
def test_flow_kind(method, path, kind):
    assert flow_kind(make_flow({}, path=path, method=method)) == kind


@pytest.mark.parametrize("stream", [False, True])
def test_chat_call_fields(stream):
    request = {"model": "m", "messages": [USER], "tools": [CALC], "temperature": 0.7, "max_tokens": 256,
               "stream": stream, "stream_options": {"include_usage": True}, "return_token_ids": True, "logprobs": True}
    body, facts = vllm_answer(request)
    call = chat_call_from_flow(make_flow(request, body, headers=[("X-Stainless-Retry-Count", "0")]), 3)
    gen = facts["gen"]
    assert (call.index, call.stream, call.model, call.failed, call.error) == (3, stream, "m", False, None)
    assert call.params == {"model": "m", "temperature": 0.7, "max_tokens": 256, "return_token_ids": True, "logprobs": True}
    assert call.messages == [USER] and call.tools == [CALC]
    assert call.response.tool_calls[0]["function"] == {"name": "calculator", "arguments": '{"expression": "2 + 3 * 4"}'}
    assert call.finish_reason == "tool_calls" and call.usage["prompt_tokens"] == len(gen.prompt_ids)
    assert (call.prompt_token_ids, call.completion_token_ids) == (gen.prompt_ids, gen.ids)
    assert len(call.completion_logprobs) == len(gen.ids)
    assert call.latency == pytest.approx(0.5) and call.ttfb == pytest.approx(0.02) and call.retry_count == 0


def test_token_ids_recovered_from_logprob_tokens():
    request = {"messages": [USER], "logprobs": True, "return_tokens_as_token_ids": True}
    body, facts = vllm_answer(request)
    assert chat_call_from_flow(make_flow(request, body)).completion_token_ids == facts["gen"].ids


@pytest.mark.parametrize("status,state,error,body,expected", [
    (500, "done", None, b'{"error":{"message":"boom"}}', "HTTP 500: boom"),
    (None, "error", "connection reset", b"", "connection reset"),
    (200, "done", None, b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n', "response ended without an answer"),
    (200, "done", None, b"", "response ended without an answer"),
])
def test_failed_calls_say_why(status, state, error, body, expected):
    call = chat_call_from_flow(make_flow({"messages": [USER], "stream": body.startswith(b"data")}, body,
                                         status=status, state=state, error=error))
    assert call.failed and call.error == expected


def test_open_flow_is_partial_not_failed():
    call = chat_call_from_flow(make_flow({"messages": [USER], "stream": True},
                                         b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}\n\n', state="open"))
    assert not call.failed and call.response.content == "x"


# -- conversations ---------------------------------------------------------------------------------

def agent_loop(stream: bool):
    """user -> tool call -> tool result -> answer, as a client builds it."""
    first, facts = turn([SYSTEM, USER], stream=stream, return_token_ids=True)
    messages = [SYSTEM, USER, assistant(facts), {"role": "tool", "tool_call_id": "x", "content": "14"}]
    second, _ = turn(messages, stream=stream, return_token_ids=True)
    return [first, second], messages


@pytest.mark.parametrize("stream", [False, True])
def test_agent_loop_is_continuous(stream):
    flows, messages = agent_loop(stream)
    models = make_flow(b"", path="/v1/models", method="GET")
    conv = build_conversation([models, *flows])
    assert conv.discontinuities == [] and conv.other_flows == 1
    assert [c.turn for c in conv.calls] == [0, 1] and [c.thread for c in conv.calls] == [0, 0]
    assert conv.history == messages + [{"role": "assistant", "content": "The answer is 14."}]
    first, second = conv.calls
    assert second.prompt_token_ids[:len(first.prompt_token_ids) + len(first.completion_token_ids)] == \
        first.prompt_token_ids + first.completion_token_ids
    json.dumps(conv.to_dict())
    assert conv.to_dict()["summary"] == {"calls": 2, "completion_calls": 0, "responses_calls": 0, "turns": 2,
                                         "threads": 1, "retries": 0, "failed": 0, "discontinuities": 0}


def test_normalisation_ignores_null_content_and_argument_whitespace():
    flows, messages = agent_loop(False)
    edited = json.loads(flows[1].request_body)
    call = edited["messages"][2]
    call["content"] = ""
    call["tool_calls"][0]["function"]["arguments"] = '{ "expression" :"2 + 3 * 4" }'
    call["tool_calls"][0]["id"] = "renamed"
    conv = build_conversation([flows[0], make_flow(edited, flows[1].response_body)])
    assert conv.discontinuities == []


@pytest.mark.parametrize("a,b,same", [
    ({"role": "user", "content": None}, {"role": "user", "content": ""}, True),
    ({"role": "user", "content": "hi"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}, True),
    ({"role": "user", "content": "hi"}, {"role": "user", "content": "hi "}, False),
    ({"role": "user", "content": "hi"}, {"role": "system", "content": "hi"}, False),
    ({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": '{"a":1,"b":2}'}}]},
     {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": '{"b": 2, "a": 1}'}}]}, True),
    ({"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": '{"a":1}'}}]},
     {"role": "assistant", "tool_calls": [{"function": {"name": "g", "arguments": '{"a":1}'}}]}, False),
])
def test_normalize_message(a, b, same):
    assert (normalize_message(a) == normalize_message(b)) is same


def test_retries_share_a_turn_and_do_not_break_continuity():
    flows, messages = agent_loop(False)
    request = json.loads(flows[1].request_body)
    failed = make_flow(request, b'{"error":{"message":"overloaded"}}', status=503)
    retried = make_flow(request, flows[1].response_body, headers=[("x-stainless-retry-count", "1")])
    conv = build_conversation([flows[0], failed, retried])
    assert [c.is_retry for c in conv.calls] == [False, False, True]
    assert [c.turn for c in conv.calls] == [0, 1, 1] and [c.failed for c in conv.calls] == [False, True, False]
    assert conv.turns == [conv.calls[0], conv.calls[2]] and conv.discontinuities == []
    assert conv.failed_calls == [conv.calls[1]]


def test_retry_header_without_a_seen_original_is_its_own_turn():
    flows, _ = agent_loop(False)
    retried = make_flow(json.loads(flows[1].request_body), flows[1].response_body, headers=[("x-stainless-retry-count", "2")])
    conv = build_conversation([flows[0], retried])
    assert conv.calls[1].is_retry and [c.turn for c in conv.calls] == [0, 1] and conv.discontinuities == []


def test_truncated_history_is_reported():
    flows, messages = agent_loop(False)
    final = [*messages, {"role": "assistant", "content": "The answer is 14."}, {"role": "user", "content": "And 5 * 5?"}]
    dropped = [final[0], *final[3:]]  # the client cut the first user turn and the tool call
    third, _ = turn(dropped)
    conv = build_conversation([*flows, third])
    (brk,) = conv.discontinuities
    assert (brk.call_index, brk.kind, brk.message_index, brk.thread) == (2, "truncated", 1, 0)
    assert "1..2" in brk.detail


def test_rewritten_reply_is_reported():
    first, facts = turn([USER])
    edited_reply = {"role": "assistant", "content": "I will not use tools."}
    second, _ = turn([USER, edited_reply, {"role": "user", "content": "ok"}])
    (brk,) = build_conversation([first, second]).discontinuities
    assert (brk.kind, brk.message_index) == ("rewritten", 1) and "assistant reply" in brk.detail


def test_resample_of_the_same_request_after_success_is_the_same_turn_but_not_a_retry():
    first, _ = turn([USER])
    again, _ = turn([USER])
    conv = build_conversation([first, again])
    assert [c.is_retry for c in conv.calls] == [False, False] and [c.turn for c in conv.calls] == [0, 0]
    assert conv.discontinuities == []


@pytest.mark.parametrize("kept", [0, 1])
def test_an_agent_that_samples_twice_may_continue_either_answer(kept):
    # n=1 servers: best-of-2 is the same request sent twice; the agent goes on with one of the answers.
    samples = [turn([USER], reply=Reply(content=text)) for text in ("Sample one.", "Sample two.")]
    chosen = {"role": "assistant", "content": ("Sample one.", "Sample two.")[kept]}
    nxt, _ = turn([USER, chosen, {"role": "user", "content": "go on"}])
    conv = build_conversation([samples[0][0], samples[1][0], nxt])
    assert [c.turn for c in conv.calls] == [0, 0, 1] and conv.thread_count == 1
    assert conv.discontinuities == []
    helper, _ = turn([{"role": "user", "content": "a helper's task"}])
    conv = build_conversation([helper, samples[0][0], samples[1][0], nxt])
    [(at, kind)] = [(d.call_index, d.kind) for d in conv.discontinuities]
    assert (at, kind) == (1, "new_thread")  # where the thread began, not its second sample


@pytest.mark.parametrize("sub_system", [{"role": "system", "content": "You are a researcher."}, SYSTEM],
                         ids=["own system prompt", "same system prompt"])
def test_sub_agent_thread_and_return_to_the_main_thread(sub_system):
    main1, facts = turn([SYSTEM, USER])
    sub1, sub_facts = turn([sub_system, {"role": "user", "content": "Look up 2 + 3"}])
    main2, _ = turn([SYSTEM, USER, assistant(facts), {"role": "tool", "content": "14"}])
    sub2, _ = turn([sub_system, {"role": "user", "content": "Look up 2 + 3"},
                    assistant(sub_facts), {"role": "tool", "content": "5"}])
    conv = build_conversation([main1, sub1, main2, sub2])
    assert [c.thread for c in conv.calls] == [0, 1, 0, 1] and conv.thread_count == 2
    (brk,) = conv.discontinuities
    assert (brk.call_index, brk.kind, brk.thread) == (1, "new_thread", 1)


def test_completion_calls_and_unparseable_flows():
    request = {"model": "m", "prompt": [1, 2, 3], "return_token_ids": True}
    gen = generate_completion(request, Reply(content="abc"), TOK)
    body = json.dumps(completion_body(gen, ResponseMeta.new("m", chat=False), Options.from_request(request, chat=False), TOK))
    junk = make_flow(b"not json")
    conv = build_conversation([make_flow(request, body.encode(), path="/v1/completions"), junk])
    (call,) = conv.completion_calls
    assert (call.prompt, call.text, call.prompt_token_ids, call.completion_token_ids) == ([1, 2, 3], "abc", [1, 2, 3], gen.ids)
    assert conv.calls == [] and conv.other_flows == 1 and conv.history == []


def test_response_message_to_message():
    message = ResponseMessage("assistant", None, "why", [{"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}}])
    assert message.to_message() == {"role": "assistant", "content": None, "tool_calls": message.tool_calls}
    assert message.to_message(include_reasoning=True)["reasoning_content"] == "why"


def _completion_flow(prompt: list[int]) -> FlowRecord:
    request = {"model": "m", "prompt": prompt, "return_token_ids": True}
    gen = generate_completion(request, Reply(content="abc"), TOK)
    body = completion_body(gen, ResponseMeta.new("m", chat=False), Options.from_request(request, chat=False), TOK)
    return make_flow(request, json.dumps(body).encode(), path="/v1/completions")


def test_chat_and_completion_calls_in_the_order_the_agent_made_them():
    from rollouttap.manager.conversation import calls_in_order
    from rollouttap.manager.inspect import agent_stats
    first, _ = turn([SYSTEM, USER])
    last, _ = turn([SYSTEM, {"role": "user", "content": "And 5 * 5?"}])
    flows = [first, _completion_flow([1, 2, 3]), last]
    calls = calls_in_order(build_conversation(flows), flows)
    assert [(type(c).__name__, c.flow_id) for c in calls] == [
        ("ChatCall", first.flow_id), ("CompletionCall", flows[1].flow_id), ("ChatCall", last.flow_id)]
    assert agent_stats(flows, eos_token_id=TOK.eos_token_id)["fidelity"]["calls"] == 3


@pytest.mark.parametrize("between", ["completion", "chat"])
def test_a_retry_follows_its_original_and_replaces_only_it(between):
    # Chat A fails, another call is made, then A is sent again: the retry replaces A, never the call between.
    from rollouttap.manager.conversation import calls_in_order
    from rollouttap.manager.rows import build_row
    request = {"model": "m", "messages": [SYSTEM, USER], "tools": [CALC]}
    body, _ = vllm_answer({**request, "return_token_ids": True})
    failed = make_flow(request, b'{"error":{"message":"overloaded"}}', status=503)
    other = _completion_flow([1, 2, 3]) if between == "completion" else \
        turn([SYSTEM, {"role": "user", "content": "And 5 * 5?"}], return_token_ids=True)[0]
    retried = make_flow(request, body, headers=[("x-stainless-retry-count", "1")])
    flows = [failed, other, retried]
    calls = calls_in_order(build_conversation(flows), flows)
    assert [c.flow_id for c in calls] == [failed.flow_id, retried.flow_id, other.flow_id]
    _, fidelity = build_row(calls, eos_token_id=TOK.eos_token_id)
    assert (fidelity.calls, fidelity.retries_skipped, fidelity.calls_used) == (3, 1, 2)
    assert fidelity.sampled_tokens == sum(len(c.completion_token_ids) for c in calls[1:])


def test_an_answer_whose_stream_broke_off_with_an_error_event_is_not_trained():
    # 200 and [DONE], but vLLM sent an error event mid-stream (a tool parser that failed): the agent never got that
    # answer whole and asked again another way. Its partial tokens must not be trained as a sampled answer.
    from rollouttap.manager.conversation import calls_in_order
    from rollouttap.manager.rows import build_rows
    request = {"model": "m", "messages": [SYSTEM, USER], "tools": [CALC], "stream": True, "return_token_ids": True,
               "logprobs": True, "stream_options": {"include_usage": True}}
    body, facts = vllm_answer(request)
    answered = make_flow(request, body)
    history = [SYSTEM, USER, assistant(facts), {"role": "tool", "tool_call_id": "x", "content": "14"}]
    broken_request = {**request, "messages": history}
    full, _ = vllm_answer(broken_request, Reply(content="The answer is fourteen, as computed."), k=2)
    events = full[:-len(SSE_DONE)].split(b"\n\n")
    error = b'data: {"error":{"message":"tool parser failed","type":"InternalServerError","code":500}}'
    broken = make_flow(broken_request, b"\n\n".join(events[:len(events) // 2] + [error]) + b"\n\n" + SSE_DONE)
    again_request = {**request, "messages": history + [{"role": "user", "content": "Please answer."}]}
    again = make_flow(again_request, vllm_answer(again_request, Reply(content="14."))[0])
    flows = [answered, broken, again]
    calls = calls_in_order(build_conversation(flows), flows)
    assert calls[1].failed and calls[1].completion_token_ids  # its partial ids came back
    for policy in ("realign", "fork"):
        result = build_rows(calls, eos_token_id=TOK.eos_token_id, policy=policy)
        assert (result.fidelity.failed_calls, result.fidelity.calls_used, len(result.rows)) == (1, 2, 1), policy
        (row,) = result.rows
        trained = [t for t, m in zip(row.completion_ids, row.env_mask) if m]
        assert trained == calls[0].completion_token_ids + calls[2].completion_token_ids, policy


def test_a_retry_whose_first_attempts_never_arrived_replaces_nothing():
    # The client retried a request whose earlier attempts never reached the proxy: a call of its own.
    from rollouttap.manager.conversation import calls_in_order
    from rollouttap.manager.rows import build_row
    first, _ = turn([SYSTEM, USER], return_token_ids=True)
    request = {"model": "m", "messages": [SYSTEM, {"role": "user", "content": "And 5 * 5?"}], "tools": [CALC]}
    body, _ = vllm_answer({**request, "return_token_ids": True})
    retried = make_flow(request, body, headers=[("x-stainless-retry-count", "2")])
    flows = [first, retried]
    calls = calls_in_order(build_conversation(flows), flows)
    assert [c.is_retry for c in calls] == [False, True] and calls[0].turn != calls[1].turn
    _, fidelity = build_row(calls, eos_token_id=TOK.eos_token_id)
    assert (fidelity.calls_used, fidelity.retries_skipped) == (2, 0)


def test_a_retry_of_a_request_answered_turns_ago_is_a_turn_of_its_own():
    # The same question asked again later (a loop) whose first attempt of this time never reached the proxy:
    # the earlier, answered asking is not what it retries, and its answer stays in the row.
    from rollouttap.manager.conversation import calls_in_order
    from rollouttap.manager.rows import build_row
    first, _ = turn([SYSTEM, USER], return_token_ids=True)
    other, _ = turn([SYSTEM, {"role": "user", "content": "And 5 * 5?"}], return_token_ids=True)
    again = make_flow(json.loads(first.request_body), first.response_body, headers=[("x-stainless-retry-count", "1")])
    flows = [first, other, again]
    conversation = build_conversation(flows)
    assert [c.turn for c in conversation.calls] == [0, 1, 2]
    assert [c.flow_id for c in calls_in_order(conversation, flows)] == [f.flow_id for f in flows]
    _, fidelity = build_row(calls_in_order(conversation, flows), eos_token_id=TOK.eos_token_id)
    assert (fidelity.calls_used, fidelity.retries_skipped) == (3, 0)


@pytest.mark.parametrize("cut, meta, answered", [
    ("before [DONE]", {}, True),  # the client stopped reading at the finish_reason chunk
    ("before [DONE]", {"rewrite_failed": "error: Error -3 while decompressing data"}, False),  # the proxy cut it
    ("mid-answer", {}, False),
])
def test_a_stream_closed_after_its_finish_reason_is_an_answered_call(cut, meta, answered):
    request = {"model": "m", "messages": [USER], "stream": True, "return_token_ids": True}
    body, facts = vllm_answer(request, Reply(content="A whole answer in several chunks."), k=1)
    assert body.endswith(SSE_DONE)
    events = body[:-len(SSE_DONE)].split(b"\n\n")
    kept = events if cut == "before [DONE]" else events[:len(events) // 2]
    flow = make_flow(request, b"\n\n".join(kept), state="error", error="Client disconnected.")
    call = chat_call_from_flow(dataclasses.replace(flow, meta=meta))
    assert call is not None and call.failed is not answered and (call.state == "done") is answered
    assert call.error == (None if answered else "Client disconnected.")
    if answered:
        assert call.completion_token_ids == facts["gen"].ids and call.finish_reason == "stop"


def _ids_flow(prompt_ids: list[int]) -> FlowRecord:
    """A non-streamed chat call whose answer carries ``prompt_ids`` as vLLM does (top-level prompt_token_ids)."""
    answer = {"id": "c", "object": "chat.completion", "model": "m", "prompt_token_ids": prompt_ids,
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop",
                           "token_ids": [7000, 2]}]}
    return make_flow({"model": "m", "messages": [USER]}, json.dumps(answer).encode())


def test_a_conversations_prompt_ids_are_held_once_not_once_per_call():
    # Ids past 256: JSON decoding makes an int object per occurrence (smaller ones are Python's shared ints).
    base = list(range(100_000, 100_300))
    prompts = [base, base + [7000, 2, 100_500], [5000, *base], [5000, *base, 7000, 2]]
    calls = build_conversation([_ids_flow(p) for p in prompts]).calls
    assert [c.prompt_token_ids for c in calls] == prompts  # the values are the answers' own
    held = [c.prompt_token_ids for c in calls]
    assert all(a is b for a, b in zip(held[0], held[1]))  # the second resends the first: the first's objects
    assert all(a is b for a, b in zip(held[2], held[3]))  # and so on after a prompt that starts anew
