"""Reading Responses API calls (``POST …/responses``) into conversations and training rows.

The answers are written by hand in vLLM's shape (``ResponsesResponse``: every field, unset ones null,
``input_messages``/``output_messages`` as ``raw_message_tokens`` items when ``enable_response_messages`` was
set; a stream's final object in its ``response.completed`` event).
"""

from __future__ import annotations

import io
import json
from typing import Any

from rollouttap.addon.answer_rewrite import sse_finished
from rollouttap.manager.conversation import build_conversation, calls_in_order, flow_kind
from rollouttap.manager.responses_api import parse_responses_body, reassemble_responses_stream
from rollouttap.manager.rows import build_rows
from rollouttap.store.records import FlowRecord

EOS = 151645


def raw(tokens: list[int], text: str = "x") -> list[dict[str, Any]]:
    return [{"message": text, "tokens": tokens, "type": "raw_message_tokens"}]


def response(output: list[dict[str, Any]], prompt_ids: list[int] | None, ids: list[int] | None, *,
             status: str = "completed", reason: str | None = None) -> dict[str, Any]:
    return {"id": "resp_1", "created_at": 1764400000,
            "incomplete_details": {"reason": reason} if reason else None, "instructions": None, "metadata": None,
            "model": "m", "object": "response", "output": output, "parallel_tool_calls": True,
            "temperature": 1.0, "tool_choice": "auto", "tools": [], "top_p": 1.0, "background": False,
            "max_output_tokens": 100, "max_tool_calls": None, "previous_response_id": None, "prompt": None,
            "reasoning": None, "service_tier": "auto", "status": status, "text": None, "top_logprobs": None,
            "truncation": "disabled",
            "usage": {"input_tokens": len(prompt_ids or ()), "input_tokens_details": {"cached_tokens": 0},
                      "output_tokens": len(ids or ()), "output_tokens_details": {"reasoning_tokens": 0},
                      "total_tokens": len(prompt_ids or ()) + len(ids or ())},
            "user": None, "input_messages": raw(prompt_ids) if prompt_ids is not None else None,
            "output_messages": raw(ids) if ids is not None else None}


def message(text: str) -> dict[str, Any]:
    return {"id": "msg_1", "content": [{"annotations": [], "text": text, "type": "output_text", "logprobs": None}],
            "role": "assistant", "status": "completed", "type": "message"}


def function_call(name: str, arguments: str, call_id: str = "call_1") -> dict[str, Any]:
    return {"arguments": arguments, "call_id": call_id, "name": name, "type": "function_call", "id": "fc_1",
            "status": "completed"}


def stream_of(final: dict[str, Any], *, completed: bool = True) -> bytes:
    events = [("response.created", {"response": {**final, "status": "in_progress", "output": [],
                                                 "input_messages": None, "output_messages": None}}),
              ("response.output_text.delta", {"content_index": 0, "delta": "Hel", "item_id": "msg_1",
                                              "logprobs": [], "output_index": 0})]
    if completed:
        events.append(("response.completed", {"response": final}))
    return b"".join(f"event: {kind}\ndata: {compact({**data, 'sequence_number': n, 'type': kind})}\n\n".encode()
                    for n, (kind, data) in enumerate(events))


def compact(doc: Any) -> str:
    """JSON as pydantic's model_dump_json writes it."""
    return json.dumps(doc, separators=(",", ":"))


def flow(n: int, request: dict[str, Any], body: bytes, *, path: str = "/v1/responses", status: int = 200,
         state: str = "done", retry: int = 0) -> FlowRecord:
    streamed = body.startswith(b"event:")
    return FlowRecord(
        id=n, flow_id=f"flow-{n}", proxy_id="p", agent_id="a", pid=1, client_conn_id="c", client_addr="127.0.0.1:1",
        attribution="token", method="POST", url=f"http://model{path}", scheme="http", host="model", port=80,
        path=path, request_headers=[("content-type", "application/json"), ("x-stainless-retry-count", str(retry))],
        request_body=json.dumps(request).encode(),
        status_code=status, response_headers=[("content-type", "text/event-stream" if streamed else "application/json")],
        response_body=body, streamed=streamed, state=state, error=None, t_request=100.0 + n,
        t_response_headers=100.01 + n, t_first_byte=100.02 + n, t_end=100.5 + n)


def test_a_response_reads_as_a_chat_reply_with_its_token_ids() -> None:
    result = parse_responses_body(response([message("Hello")], [1, 2, 3], [7, 8, EOS]))
    assert (result.content, result.finish_reason, result.tool_calls) == ("Hello", "stop", [])
    assert (result.prompt_token_ids, result.completion_token_ids) == ([1, 2, 3], [7, 8, EOS])
    assert result.usage is not None and (result.usage["prompt_tokens"], result.usage["completion_tokens"]) == (3, 3)

    tools = parse_responses_body(response([function_call("calc", '{"x": 1}')], [1], [5, EOS]))
    assert tools.finish_reason == "tool_calls" and tools.content is None
    assert tools.tool_calls == [{"id": "call_1", "type": "function",
                                 "function": {"name": "calc", "arguments": '{"x": 1}'}}]

    cut = parse_responses_body(response([message("Hel")], [1], [5], status="incomplete", reason="max_output_tokens"))
    assert cut.finish_reason == "length"


def test_messages_written_as_json_strings_are_read_too() -> None:
    # vLLM versions whose field serializer fell back to model_dump_json wrote each item as a string in streams
    body = response([message("a")], [1, 2], [3, EOS])
    body["input_messages"] = [json.dumps(body["input_messages"][0])]
    body["output_messages"] = [compact(body["output_messages"][0])]
    result = reassemble_responses_stream(stream_of(body))
    assert (result.prompt_token_ids, result.completion_token_ids) == ([1, 2], [3, EOS])


def test_an_older_vllm_stream_with_one_output_item_per_delta_is_joined() -> None:
    # vLLM before PR #34188 appended an output item per streamed delta (as JSON strings in the stream)
    ids = [10, 11, 12, 13, 14, EOS]
    final = response([message("Hello there")], [1, 2, 3], ids)
    final["input_messages"] = [compact(final["input_messages"][0])]
    final["output_messages"] = [compact(raw(part, text)[0])
                                for text, part in (("Hel", ids[:2]), ("lo th", ids[2:4]), ("ere", ids[4:]))]
    result = reassemble_responses_stream(stream_of(final))
    assert (result.prompt_token_ids, result.completion_token_ids) == ([1, 2, 3], ids)


def test_harmony_messages_are_not_token_ids() -> None:
    # gpt-oss models: vLLM puts harmony messages in the two fields
    body = response([message("a")], [1], [2])
    body["input_messages"] = [{"author": {"role": "user"}, "content": [{"type": "text", "text": "hi"}]}]
    body["output_messages"] = [{"author": {"role": "assistant"}, "channel": "final", "content": []}]
    assert parse_responses_body(body).completion_token_ids is None
    body["output_messages"] = ["not json", 3]
    assert parse_responses_body(body).completion_token_ids is None


def test_no_ids_without_messages_or_with_several_model_turns() -> None:
    assert parse_responses_body(response([message("a")], None, None)).completion_token_ids is None
    body = response([message("a")], [1, 2], [3])
    body["output_messages"] = raw([3]) + raw([1, 2, 3, 9]) + raw([4])  # built-in tools ran a second turn
    result = parse_responses_body(body)
    assert result.prompt_token_ids is None and result.completion_token_ids is None


def test_a_stream_is_read_from_its_completed_event() -> None:
    final = response([message("Hello")], [1, 2], [7, EOS])
    result = reassemble_responses_stream(stream_of(final))
    assert result.streamed and result.chunks == 3
    assert (result.content, result.prompt_token_ids, result.completion_token_ids) == ("Hello", [1, 2], [7, EOS])
    cut_off = reassemble_responses_stream(stream_of(final, completed=False))
    assert cut_off.finish_reason is None and cut_off.completion_token_ids is None


def test_responses_calls_chain_into_one_row_with_the_tool_output_masked() -> None:
    tool_turn = response([function_call("calc", '{"x": 1}')], [1, 2, 3], [10, 11, EOS])
    answer = response([message("2")], [1, 2, 3, 10, 11, EOS, 20, 21], [30, EOS])
    first = {"model": "m", "input": [{"role": "user", "content": "x?"}], "stream": True}
    second = {"model": "m", "input": [*first["input"], function_call("calc", '{"x": 1}'),
                                      {"type": "function_call_output", "call_id": "call_1", "output": "2"}]}
    flows = [flow(0, first, stream_of(tool_turn)), flow(1, second, json.dumps(answer).encode()),
             flow(2, {"model": "m"}, b"{}", path="/v1/models")]
    assert [flow_kind(f) for f in flows] == ["responses", "responses", "other"]
    conversation = build_conversation(flows)
    assert len(conversation.responses_calls) == 2 and conversation.other_flows == 1
    assert conversation.responses_calls[0].response is not None
    assert conversation.responses_calls[0].response.tool_calls[0]["function"]["name"] == "calc"
    result = build_rows(calls_in_order(conversation, flows), eos_token_id=EOS)
    (row,) = result.rows
    assert row.prompt_ids == [1, 2, 3]
    assert row.completion_ids == [10, 11, EOS, 20, 21, 30, EOS]
    assert row.env_mask == [1, 1, 1, 0, 0, 1, 1]
    assert row.logprobs is None and result.fidelity.missing_logprobs == 5


def test_a_failed_responses_call_is_counted_as_failed() -> None:
    error = {"error": {"message": "bad input", "type": "BadRequestError", "param": None, "code": 400}}
    conversation = build_conversation([flow(0, {"model": "m", "input": "x"}, json.dumps(error).encode(), status=400)])
    (call,) = conversation.responses_calls
    assert call.failed and call.error == "HTTP 400: bad input"


def test_a_responses_stream_is_finished_at_its_final_event() -> None:
    # A client that closes once it has the final event leaves a complete flow, as after chat's [DONE].
    final = response([message("Hello")], [1, 2], [7, EOS])
    assert sse_finished(stream_of(final))
    assert not sse_finished(stream_of(final, completed=False))
    assert sse_finished(b'data: {"n":1}\n\ndata: [DONE]\n\n')
    assert sse_finished(b'data: {"n":1}\n\ndata:[DONE]\n\n')  # no space: servers other than vLLM


def test_a_retried_responses_call_is_one_turn_and_its_failure_is_skipped() -> None:
    request = {"model": "m", "input": "x?"}
    error = json.dumps({"error": {"message": "overloaded", "type": "ServiceUnavailable", "code": 503}}).encode()
    answer = json.dumps(response([message("4")], [1, 2], [5, EOS])).encode()
    flows = [flow(0, request, error, status=503), flow(1, request, answer, retry=1)]
    conversation = build_conversation(flows)
    assert [(c.is_retry, c.turn) for c in conversation.responses_calls] == [(False, 0), (True, 0)]
    assert conversation.to_dict()["summary"]["retries"] == 1
    result = build_rows(calls_in_order(conversation, flows), eos_token_id=EOS, policy="strict")
    assert result.fidelity.retries_skipped == 1 and result.rows[0].completion_ids == [5, EOS]


def test_an_agent_sampling_a_responses_request_twice_trains_on_the_answer_it_kept() -> None:
    request = {"model": "m", "input": "x?"}
    first, second = response([message("a")], [1, 2], [5, EOS]), response([message("b")], [1, 2], [6, EOS])
    follow = response([message("c")], [1, 2, 6, EOS, 9], [7, EOS])  # goes on with the second sample
    flows = [flow(0, request, json.dumps(first).encode()), flow(1, request, json.dumps(second).encode()),
             flow(2, {"model": "m", "input": ["x?", "b", "go on"]}, json.dumps(follow).encode())]
    conversation = build_conversation(flows)
    assert [c.turn for c in conversation.responses_calls] == [0, 0, 1]
    (row,) = build_rows(calls_in_order(conversation, flows), eos_token_id=EOS, policy="strict").rows
    assert row.completion_ids == [6, EOS, 9, 7, EOS] and row.env_mask == [1, 1, 0, 1, 1]


def test_chat_and_responses_calls_share_one_numbering_of_turns() -> None:
    chat_request = {"model": "m", "messages": [{"role": "user", "content": "x?"}]}
    chat_answer = {"id": "c", "object": "chat.completion", "choices": [{"index": 0, "message": {
        "role": "assistant", "content": "a"}, "finish_reason": "stop", "token_ids": [5, EOS]}],
        "prompt_token_ids": [1, 2]}
    flows = [flow(0, chat_request, json.dumps(chat_answer).encode(), path="/v1/chat/completions"),
             flow(1, {"model": "m", "input": "y?"}, json.dumps(response([message("b")], [1, 2, 5, EOS, 3],
                                                                        [6, EOS])).encode())]
    conversation = build_conversation(flows)
    assert {conversation.calls[0].turn, conversation.responses_calls[0].turn} == {0, 1}
    assert conversation.history[-1] == {"role": "assistant", "content": "b"}
    assert conversation.history[0] == {"role": "user", "content": "y?"}
    (row,) = build_rows(calls_in_order(conversation, flows), eos_token_id=EOS, policy="strict").rows
    assert row.completion_ids == [5, EOS, 3, 6, EOS]


def test_a_responses_retry_follows_its_failed_attempt_ahead_of_a_call_made_meanwhile() -> None:
    request = {"model": "m", "input": "x?"}
    error = json.dumps({"error": {"message": "overloaded", "code": 503}}).encode()
    chat = {"model": "m", "messages": [{"role": "user", "content": "side question"}]}
    flows = [flow(0, request, error, status=503), flow(1, chat, b"", path="/v1/chat/completions", status=500),
             flow(2, request, json.dumps(response([message("4")], [1, 2], [5, EOS])).encode(), retry=1)]
    conversation = build_conversation(flows)
    assert [c.flow_id for c in calls_in_order(conversation, flows)] == ["flow-0", "flow-2", "flow-1"]
    assert conversation.model_calls[-1].flow_id == "flow-2" and len(conversation.failed_calls) == 2


def test_an_empty_answer_is_an_answer_and_an_error_is_not() -> None:
    empty = parse_responses_body(response([], [1, 2], [EOS]))
    assert (empty.content, empty.finish_reason) == ("", "stop")
    error = parse_responses_body({"error": {"message": "bad", "type": "BadRequestError", "code": 400}})
    assert error.content is None and error.error is not None


def show_text(flows: list[FlowRecord]) -> str:
    from rich.console import Console

    from rollouttap.cli_render import print_conversation
    console = Console(file=io.StringIO(), width=200)
    print_conversation(console, build_conversation(flows))
    return console.file.getvalue()


def test_show_labels_a_retry_and_a_second_sample_with_the_input_of_their_turn() -> None:
    request = {"model": "m", "input": [{"role": "user", "content": "2+2?"}]}
    error = json.dumps({"error": {"message": "overloaded", "code": 503}}).encode()
    answer = json.dumps(response([message("4")], [1, 2], [5, EOS])).encode()
    out = show_text([flow(0, request, error, status=503), flow(1, request, answer, retry=1),
                     flow(2, request, answer)])
    heads = [line for line in out.splitlines() if line.startswith("── ")]
    assert "retry" in heads[1] and "sample 3 of the same request" in heads[2]  # counted as chat counts them
    assert out.count("input: user: 2+2?") == 3 and "goes on from" not in out
