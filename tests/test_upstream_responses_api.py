"""The scripted upstream's /v1/responses: vLLM's Responses API shapes, over real HTTP and through the openai SDK."""

from __future__ import annotations

import json

import openai
import pytest
import requests

from rollouttap.testing.fake_tokenizer import FakeTokenizer, render_chat
from rollouttap.testing.replies import Reply, fixed, with_reasoning, default_script
from rollouttap.responses_input import chat_messages, chat_tools, input_error
from rollouttap.testing.upstream import ScriptedUpstream

TOK = FakeTokenizer()
CALC = {"type": "function", "name": "calculator", "description": "Evaluate arithmetic.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]}}
TOOL_LOOP = [
    {"role": "user", "content": "What is 6*7?"},
    {"type": "function_call", "call_id": "call_1", "name": "calculator", "arguments": '{"expression": "6*7"}'},
    {"type": "function_call_output", "call_id": "call_1", "output": "42"},
]


@pytest.fixture(scope="module")
def up():
    with ScriptedUpstream(tokens_per_chunk=3) as server:
        yield server


def post(up: ScriptedUpstream, **body) -> requests.Response:
    return requests.post(up.base_url + "/responses", json={"model": "m", **body}, timeout=10)


def sse_events(text: str) -> list[tuple[str, dict]]:
    """(event name, data) of every SSE event; asserts each data line is JSON (no [DONE])."""
    out = []
    for block in text.strip().split("\n\n"):
        name_line, data_line = block.split("\n")
        assert name_line.startswith("event: ") and data_line.startswith("data: ")
        out.append((name_line[len("event: "):], json.loads(data_line[len("data: "):])))
    return out


def expected_prompt(request: dict) -> list[int]:
    text = render_chat(chat_messages(request), chat_tools(request), add_generation_prompt=True)
    return TOK.encode(text)


@pytest.mark.parametrize("request_json, messages", [
    ({"input": "hi"}, [{"role": "user", "content": "hi"}]),
    ({"input": "hi", "instructions": "Be brief."},
     [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]),
    ({"input": [{"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "a"},
                                                                      {"type": "input_text", "text": "b"}]}]},
     [{"role": "developer", "content": "a\nb"}]),
    ({"input": [{"role": "assistant", "content": [{"type": "output_text", "text": "ok"}]}, *TOOL_LOOP[1:]]},
     [{"role": "assistant", "content": "ok", "tool_calls": [
         {"id": "call_1", "function": {"name": "calculator", "arguments": '{"expression": "6*7"}'}, "type": "function"}]},
      {"role": "tool", "content": "42", "tool_call_id": "call_1"}]),
    ({"input": TOOL_LOOP},
     [{"role": "user", "content": "What is 6*7?"},
      {"role": "assistant", "tool_calls": [
          {"id": "call_1", "function": {"name": "calculator", "arguments": '{"expression": "6*7"}'}, "type": "function"}]},
      {"role": "tool", "content": "42", "tool_call_id": "call_1"}]),
])
def test_input_becomes_chat_messages_as_vllm_builds_them(request_json, messages):
    assert input_error(request_json) is None
    assert chat_messages(request_json) == messages


@pytest.mark.parametrize("request_json", [
    {}, {"input": 3}, {"input": [3]}, {"input": [{"role": "robot", "content": "x"}]},
    {"input": [{"type": "function_call", "name": "f"}]}, {"input": "x", "max_output_tokens": 0},
    {"input": "x", "tools": [{"type": "function"}]},
])
def test_invalid_input_gets_a_400(up, request_json):
    answer = requests.post(up.base_url + "/responses", json=request_json, timeout=10)
    assert answer.status_code == 400
    assert answer.json()["error"]["type"] == "BadRequestError"


def test_non_streamed_carries_exact_prompt_and_generated_ids(up):
    request = {"input": "hello", "instructions": "Be brief.", "enable_response_messages": True}
    body = post(up, **request).json()
    assert list(body)[-3:] == ["user", "input_messages", "output_messages"]
    assert body["object"] == "response" and body["status"] == "completed" and body["id"].startswith("resp_")
    (raw_in,) = body["input_messages"]
    assert raw_in == {"message": TOK.decode(raw_in["tokens"]), "tokens": expected_prompt(request),
                      "type": "raw_message_tokens"}
    (raw_out,) = body["output_messages"]
    assert raw_out["tokens"] == TOK.encode("echo: hello") + [TOK.eos_token_id]
    assert raw_out["message"] == "echo: hello"
    (item,) = body["output"]
    assert item["type"] == "message" and item["id"].startswith("msg_")
    assert item["content"] == [{"annotations": [], "text": "echo: hello", "type": "output_text", "logprobs": None}]
    assert body["usage"]["input_tokens"] == len(raw_in["tokens"])
    assert body["usage"]["output_tokens"] == len(raw_out["tokens"])


def test_raw_messages_are_null_unless_asked_for(up):
    body = post(up, input="hello").json()
    assert body["input_messages"] is None and body["output_messages"] is None
    streamed = sse_events(post(up, input="hello", stream=True).text)
    assert streamed[-1][1]["response"]["input_messages"] is None
    assert streamed[-1][1]["response"]["output_messages"] is None


def test_stream_events_and_completed_response_match_the_non_streamed_one(up):
    request = {"input": [{"role": "user", "content": "a longer question"}], "enable_response_messages": True}
    whole = post(up, **request).json()
    events = sse_events(post(up, stream=True, **request).text)
    names = [name for name, _ in events]
    assert names[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert names[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert set(names[4:-4]) == {"response.output_text.delta"}
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    assert all(data["type"] == name for name, data in events)
    assert "".join(d["delta"] for n, d in events if n == "response.output_text.delta") == "echo: a longer question"
    assert events[0][1]["response"]["status"] == "in_progress" and events[0][1]["response"]["usage"] is None
    final = events[-1][1]["response"]
    assert final["input_messages"] == whole["input_messages"]
    assert final["output_messages"] == whole["output_messages"]
    assert final["usage"] == whole["usage"]


def test_tool_calls_come_back_as_function_call_items(up):
    body = post(up, input="What is 6*7?", tools=[CALC], enable_response_messages=True).json()
    (call,) = body["output"]
    assert list(call) == ["arguments", "call_id", "name", "type", "id", "status"]
    assert call["type"] == "function_call" and call["name"] == "calculator" and call["id"].startswith("fc_")
    assert json.loads(call["arguments"]) == {"expression": "6*7"}
    assert body["input_messages"][0]["tokens"] == expected_prompt({"input": "What is 6*7?", "tools": [CALC]})
    assert TOK.decode(body["output_messages"][0]["tokens"]).startswith("<tool_call>")
    events = sse_events(post(up, input="What is 6*7?", tools=[CALC], stream=True).text)
    names = [name for name, _ in events]
    assert "response.function_call_arguments.delta" in names
    done = next(d for n, d in events if n == "response.function_call_arguments.done")
    assert json.loads(done["arguments"]) == {"expression": "6*7"} and done["name"] == "calculator"


def test_reasoning_and_cut_output():
    script = with_reasoning(fixed([Reply(content="A long enough answer.")]), "Let me think.")
    with ScriptedUpstream(script) as up:
        body = post(up, input="q", tools=[CALC]).json()
        reasoning, message = body["output"]
        assert reasoning["type"] == "reasoning" and reasoning["content"] == [{"text": "Let me think.",
                                                                             "type": "reasoning_text"}]
        assert message["content"][0]["text"] == "A long enough answer."
        assert body["usage"]["output_tokens_details"]["reasoning_tokens"] == len(TOK.encode("\nLet me think.\n"))
        cut = post(up, input="q", max_output_tokens=5).json()
        assert cut["status"] == "incomplete" and cut["incomplete_details"] == {"reason": "max_output_tokens"}
        assert cut["max_output_tokens"] == 5 and cut["usage"]["output_tokens"] == 5
        names = [n for n, _ in sse_events(post(up, input="q", tools=[CALC], stream=True).text)]
        assert names.index("response.reasoning_text.delta") < names.index("response.output_text.delta")


def test_openai_sdk_parses_plain_and_streamed_answers(up):
    client = openai.OpenAI(base_url=up.base_url, api_key="x", max_retries=0)
    answer = client.responses.create(model="m", input="hello", extra_body={"enable_response_messages": True})
    assert answer.output_text == "echo: hello"
    assert answer.model_extra["output_messages"][0]["tokens"][-1] == TOK.eos_token_id
    called = client.responses.create(model="m", input="What is 6*7?", tools=[CALC])
    assert called.output[0].type == "function_call" and called.output[0].name == "calculator"
    stream = client.responses.create(model="m", input="hello", stream=True,
                                     extra_body={"enable_response_messages": True})
    events = list(stream)
    assert events[-1].type == "response.completed"
    assert events[-1].response.output_text == "echo: hello"
    assert events[-1].response.model_extra["input_messages"] == answer.model_extra["input_messages"]


def test_abort_after_chunks_drops_the_stream():
    with ScriptedUpstream(fixed([Reply(content="x" * 40, abort_after_chunks=3)])) as up:
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            post(up, input="q", stream=True).content


def test_deterministic_and_memo_answers_repeat():
    with ScriptedUpstream(default_script, deterministic=True, memo=True) as up:
        first, second = post(up, input="hi").content, post(up, input="hi").content
        assert first == second
        assert post(up, input="hi", stream=True).content == post(up, input="hi", stream=True).content


def test_a_previous_response_id_gets_vllms_404_once_the_body_is_valid(up):
    # vLLM validates the request first, then finds no stored response (its store is off by default)
    assert post(up, input=5, previous_response_id="resp_1").status_code == 400
    answer = post(up, input="hi", previous_response_id="resp_1")
    assert answer.status_code == 404
    assert answer.json() == {"error": {"message": "Response with id 'resp_1' not found.",
                                       "type": "invalid_request_error", "param": "response_id", "code": 404}}


def test_a_background_request_gets_vllms_400_without_a_store(up):
    answer = post(up, input="hi", background=True)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["param"] == "background" and "VLLM_ENABLE_RESPONSES_API_STORE=1" in error["message"]
