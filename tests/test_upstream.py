"""The scripted vLLM-shaped upstream: fake tokenizer, scripts, exact JSON shapes, and the real server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import httpx
import openai
import pytest

from rollouttap.store.sse import json_events, parse_sse
from rollouttap.testing.fake_tokenizer import FakeTokenizer, assistant_text, render_chat
from rollouttap.testing.replies import (
    Reply, ToolCall, default_script, echo_script, failing, find_expression, fixed, with_reasoning,
)
from rollouttap.testing.upstream import ScriptedUpstream
from rollouttap.testing.vllm_format import (
    Options, char_offset, char_offsets, generate_chat, generate_completion, token_logprob,
)
from rollouttap.testing.vllm_responses import ResponseMeta, chat_body, chat_chunks, completion_body, completion_chunks

TOK = FakeTokenizer()
CALC = {"type": "function", "function": {"name": "calculator", "description": "Evaluate arithmetic",
                                         "parameters": {"type": "object", "required": ["expression"],
                                                        "properties": {"expression": {"type": "string"}}}}}
USER = {"role": "user", "content": "What is 2 + 3 * 4?"}


def chat_request(**extra):
    return {"model": "m", "messages": [USER], "tools": [CALC], **extra}


# -- fake tokenizer ------------------------------------------------------------------------------

def test_fake_tokenizer_round_trips_text_and_special_tokens():
    text = "<|im_start|>user\nhé €<|im_end|>\n<think>\nx\n</think>"
    ids = TOK.encode(text)
    assert ids[0] == 1 and 2 in ids and 5 in ids and 6 in ids
    assert TOK.decode(ids) == text
    assert TOK.decode(ids, skip_special_tokens=True) == "user\nhé €\n\nx\n"
    assert TOK.convert_tokens_to_ids(TOK.convert_ids_to_tokens(ids)) == ids


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    USER,
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "calculator", "arguments": '{"expression": "2 + 3 * 4"}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "14"},
    {"role": "assistant", "content": "The answer is 14.", "reasoning_content": "easy"},
    {"role": "user", "content": [{"type": "text", "text": "thanks"}]},
]


@pytest.mark.parametrize("tools", [None, [CALC]])
def test_chat_rendering_is_prefix_preserving(tools):
    for k in range(1, len(CONVERSATION)):
        shorter = render_chat(CONVERSATION[:k], tools)
        assert render_chat(CONVERSATION[:k + 1], tools).startswith(shorter)
        assert render_chat(CONVERSATION[:k], tools, add_generation_prompt=True).startswith(shorter)


def test_assistant_message_renders_as_the_model_generates_it():
    text = assistant_text("hi", "think", [("calculator", {"expression": "1+1"})])
    rendered = render_chat([{"role": "assistant", "content": "hi", "reasoning_content": "think",
                             "tool_calls": [{"function": {"name": "calculator", "arguments": '{"expression": "1+1"}'}}]}])
    assert rendered == f"<|im_start|>assistant\n{text}<|im_end|>\n"


# -- scripts -------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("What is 2 + 3 * 4?", "2 + 3 * 4"), ("Compute (1+2)*3.", "(1+2)*3"), ("(what is 2+3)", "2+3"),
    ("-5 - -3 please", "-5 - -3"), ("3.5/7", "3.5/7"), ("no math here", None), ("the year 2024", None),
])
def test_find_expression(text, expected):
    assert find_expression(text) == expected


SEARCH = {"type": "function", "function": {"name": "search", "parameters": {
    "type": "object", "properties": {"query": {"type": "string"}, "limit": {"type": "integer"}}}}}


@pytest.mark.parametrize("request_json,expected", [
    (chat_request(), Reply(tool_calls=[ToolCall("calculator", {"expression": "2 + 3 * 4"})])),
    ({"messages": [{"role": "user", "content": "find cats"}], "tools": [SEARCH]},
     Reply(tool_calls=[ToolCall("search", {"query": "find cats"})])),
    ({"messages": [USER, {"role": "tool", "content": "14"}], "tools": [CALC]}, Reply(content="The answer is 14.")),
    ({"messages": [USER]}, Reply(content="echo: What is 2 + 3 * 4?")),
    ({"messages": [USER], "tools": [CALC], "tool_choice": "none"}, Reply(content="echo: What is 2 + 3 * 4?")),
    ({"prompt": "Hello"}, Reply(content=" echo: Hello")),
])
def test_default_script(request_json, expected):
    assert default_script(request_json) == expected


def test_composed_scripts():
    script = fixed(["one", Reply(content="two")])
    assert [script({}).content for _ in range(3)] == ["one", "two", "two"]
    flaky = failing(2, status=503)
    assert [flaky({"messages": [USER]}).status for _ in range(3)] == [503, 503, 200]
    assert with_reasoning(echo_script, "hmm")({"messages": [USER]}).reasoning == "hmm"


# -- JSON shapes (pure builders) -------------------------------------------------------------------

def _body(req, reply=None, ignore=False):
    gen = generate_chat(req, reply or default_script(req), TOK)
    return chat_body(gen, ResponseMeta.new("m"), Options.from_request(req, ignore_token_ids=ignore), TOK), gen


def _chunks(req, reply=None, ignore=False, k=4):
    reply = reply or default_script(req)
    gen = generate_chat(req, reply, TOK)
    opts = Options.from_request(req, ignore_token_ids=ignore)
    parsers = bool(req.get("tools")) or bool(reply.reasoning)
    return list(chat_chunks(gen, ResponseMeta.new("m"), opts, TOK, tokens_per_chunk=k, parsers=parsers)), gen


@pytest.mark.parametrize("extra,ignore,prompt_ids,token_ids,logprobs", [
    ({}, False, "null", "null", "null"),
    ({"return_token_ids": True}, False, "list", "list", "null"),
    ({"logprobs": True}, False, "null", "null", "dict"),
    ({"return_token_ids": True, "logprobs": True}, True, "absent", "absent", "null"),
])
def test_non_streamed_fields_null_or_absent_like_vllm(extra, ignore, prompt_ids, token_ids, logprobs):
    body, _ = _body(chat_request(**extra), ignore=ignore)
    choice = body["choices"][0]

    def kind(obj, key):
        return "absent" if key not in obj else "null" if obj[key] is None else type(obj[key]).__name__
    assert (kind(body, "prompt_token_ids"), kind(choice, "token_ids"), kind(choice, "logprobs")) == (prompt_ids, token_ids, logprobs)
    assert list(choice["message"]) == ["role", "content", "refusal", "annotations", "audio", "function_call",
                                       "tool_calls", "reasoning_content"]


def test_non_streamed_tool_call_and_token_ids():
    body, gen = _body(chat_request(return_token_ids=True, logprobs=True, top_logprobs=2))
    choice = body["choices"][0]
    (call,) = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "calculator", "arguments": '{"expression": "2 + 3 * 4"}'}
    assert call["id"].startswith("chatcmpl-tool-") and choice["message"]["content"] is None
    assert choice["finish_reason"] == "tool_calls"
    assert body["prompt_token_ids"] == TOK.encode(render_chat([USER], [CALC], add_generation_prompt=True))
    assert choice["token_ids"][-1] == TOK.eos_token_id
    assert TOK.decode(choice["token_ids"][:-1]) == assistant_text(None, None, [("calculator", {"expression": "2 + 3 * 4"})])
    entries = choice["logprobs"]["content"]
    assert [e["logprob"] for e in entries] == [token_logprob(j, t) for j, t in enumerate(choice["token_ids"])]
    assert all(len(e["top_logprobs"]) == 2 and e["logprob"] < 0 for e in entries)
    assert body["usage"] == {"prompt_tokens": len(gen.prompt_ids), "total_tokens": len(gen.prompt_ids) + len(gen.ids),
                             "completion_tokens": len(gen.ids), "prompt_tokens_details": None}


def test_stream_chunks_token_ids_and_tool_call_fragments():
    chunks, gen = _chunks(chat_request(return_token_ids=True, stream=True, stream_options={"include_usage": True}))
    first, *middle, usage = chunks
    assert first["prompt_token_ids"] == gen.prompt_ids and first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "token_ids" not in first["choices"][0]
    assert all("prompt_token_ids" not in c for c in middle)
    assert [t for c in middle for t in c["choices"][0]["token_ids"]] == gen.ids
    assert any(c["choices"][0]["delta"] == {} for c in middle)  # swallowed markup still carries its ids
    frags = [tc for c in middle for tc in c["choices"][0]["delta"].get("tool_calls", [])]
    assert len(frags) >= 2 and frags[0]["id"] == gen.tool_calls[0].id and frags[0]["function"]["name"] == "calculator"
    assert all(set(f) == {"index", "function"} for f in frags[1:])
    assert "".join(f["function"].get("arguments", "") for f in frags) == '{"expression": "2 + 3 * 4"}'
    assert middle[-1]["choices"][0]["finish_reason"] == "tool_calls" and "stop_reason" in middle[-1]["choices"][0]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == len(gen.ids)


def test_stream_without_token_ids_skips_swallowed_chunks_and_keeps_nulls():
    chunks, _ = _chunks(chat_request(stream=True))
    assert chunks[0]["prompt_token_ids"] is None
    assert all(c["choices"][0]["token_ids"] is None and c["choices"][0]["logprobs"] is None for c in chunks[1:])
    assert all(c["choices"][0]["delta"] for c in chunks[1:-1])
    assert "usage" not in chunks[-1]
    ignored, _ = _chunks(chat_request(stream=True, return_token_ids=True), ignore=True)
    assert all("prompt_token_ids" not in c and "token_ids" not in c["choices"][0] for c in ignored)


def test_stream_reasoning_and_content_deltas():
    reply = Reply(content="Hi there", reasoning="Let me think")
    chunks, _ = _chunks({"messages": [USER], "stream": True, "logprobs": True, "return_tokens_as_token_ids": True},
                        reply, k=3)
    deltas = [c["choices"][0]["delta"] for c in chunks[1:]]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "Let me think"
    assert "".join(d.get("content", "") for d in deltas) == "Hi there"
    tokens = [e["token"] for c in chunks[1:] for e in c["choices"][0]["logprobs"]["content"]]
    assert tokens[0] == "token_id:5" and all(t.startswith("token_id:") for t in tokens)


def test_max_tokens_cuts_the_reply_without_eos():
    body, gen = _body({"messages": [USER], "max_tokens": 5, "return_token_ids": True})
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length" and len(choice["token_ids"]) == 5
    assert TOK.eos_token_id not in choice["token_ids"] and choice["message"]["content"] == "echo:"
    cut_call, _ = _body(chat_request(max_tokens=10, return_token_ids=True))
    assert cut_call["choices"][0]["message"]["tool_calls"] == [] and cut_call["choices"][0]["finish_reason"] == "length"


def test_next_prompt_extends_previous_prompt_and_completion():
    first_req = chat_request(return_token_ids=True)
    body, gen = _body(first_req)
    reply_message = {k: body["choices"][0]["message"][k] for k in ("role", "content", "tool_calls")}
    second_req = {**first_req, "messages": [USER, reply_message, {"role": "tool", "content": "14"}]}
    second, second_gen = _body(second_req)
    assert second_gen.prompt_ids[:len(gen.prompt_ids) + len(gen.ids)] == gen.prompt_ids + gen.ids
    assert second["choices"][0]["message"]["content"] == "The answer is 14."


@pytest.mark.parametrize("prompt", ["Hello", [82, 111, 118]])
def test_completions_shapes(prompt):
    req = {"prompt": prompt, "return_token_ids": True, "logprobs": 1, "stream": True}
    gen = generate_completion(req, default_script(req), TOK)
    opts = Options.from_request(req, chat=False)
    body = completion_body(gen, ResponseMeta.new("m", chat=False), opts, TOK)
    assert body["choices"][0]["prompt_token_ids"] == (prompt if isinstance(prompt, list) else TOK.encode(prompt))
    chunks = list(completion_chunks(gen, ResponseMeta.new("m", chat=False), opts, TOK))
    assert "".join(c["choices"][0]["text"] for c in chunks) == body["choices"][0]["text"]
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == body["choices"][0]["token_ids"]
    assert chunks[0]["choices"][0]["prompt_token_ids"] == body["choices"][0]["prompt_token_ids"]
    assert [lp for c in chunks for lp in c["choices"][0]["logprobs"]["token_logprobs"]] == body["choices"][0]["logprobs"]["token_logprobs"]


# -- the server ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server():
    with ScriptedUpstream(chunk_delay=0.0) as up:
        yield up


def test_openai_sdk_agent_loop(server):
    client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
    messages = [USER]
    first = client.chat.completions.create(model="m", messages=messages, tools=[CALC],
                                           extra_body={"return_token_ids": True})
    call = first.choices[0].message.tool_calls[0]
    assert json.loads(call.function.arguments) == {"expression": "2 + 3 * 4"}
    assert first.model_extra["prompt_token_ids"] and first.choices[0].model_extra["token_ids"][-1] == 2
    messages += [first.choices[0].message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "14"}]
    with client.chat.completions.stream(model="m", messages=messages, tools=[CALC]) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.content == "The answer is 14."
    bodies = [r.json for r in server.requests if r.path == "/v1/chat/completions"][-2:]
    assert bodies[0]["return_token_ids"] is True and bodies[1]["stream"] is True


def test_streamed_tool_call_reassembled_by_the_sdk(server):
    client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
    with client.chat.completions.stream(model="m", messages=[USER], tools=[CALC]) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.tool_calls[0].function.arguments == '{"expression": "2 + 3 * 4"}'
    assert final.choices[0].finish_reason == "tool_calls"


def test_first_chunk_arrives_before_the_stream_ends():
    with ScriptedUpstream(chunk_delay=0.03, tokens_per_chunk=8) as up:
        with httpx.Client() as client, client.stream(
                "POST", up.base_url + "/chat/completions", json={"messages": [USER], "stream": True}) as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            arrivals = [(time.monotonic(), part) for part in resp.iter_raw()]
    assert arrivals[-1][0] - arrivals[0][0] > 0.1
    assert list(json_events(arrivals[0][1]))  # the first read already holds a whole event
    body = b"".join(p for _, p in arrivals)
    assert parse_sse(body)[-1].is_done


def test_keep_alive_reuses_the_connection(server):
    with httpx.Client() as client:
        peers = {tuple(client.post(server.url + "/echo", content=b"x").json()["peer"]) for _ in range(5)}
    assert len(peers) == 1


def test_echo_reports_headers_and_body(server):
    reply = httpx.post(server.url + "/echo?q=1", json={"a": 1}, headers={"X-Test": "yes"}).json()
    assert reply["json"] == {"a": 1} and reply["headers"]["x-test"] == "yes" and reply["query"] == "q=1"
    assert ["X-Test", "yes"] in reply["raw_headers"]


def test_utility_routes(server):
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.base_url + "/models").json()["data"][0]["id"] == "scripted-model"
    tokens = httpx.post(server.url + "/tokenize", json={"prompt": "hi"}).json()
    assert tokens["tokens"] == TOK.encode("hi") and tokens["count"] == 2
    chat_tokens = httpx.post(server.url + "/tokenize", json={"messages": [USER]}).json()["tokens"]
    assert chat_tokens == TOK.encode(render_chat([USER], add_generation_prompt=True))
    assert httpx.post(server.url + "/detokenize", json={"tokens": tokens["tokens"]}).json() == {"prompt": "hi"}
    assert httpx.get(server.url + "/slow", params={"seconds": "0.01"}).json() == {"slept": 0.01}
    assert httpx.post(server.base_url + "/chat/completions", content=b"not json").status_code == 400


def test_scripted_errors_and_aborted_streams():
    script = fixed([Reply(status=500, error_message="boom"), Reply(content="long enough reply", abort_after_chunks=2)])
    with ScriptedUpstream(script=script) as up:
        failed = httpx.post(up.base_url + "/chat/completions", json={"messages": [USER]})
        assert failed.status_code == 500 and failed.json()["error"]["message"] == "boom"
        received = b""
        with pytest.raises(httpx.RemoteProtocolError):
            with httpx.stream("POST", up.base_url + "/chat/completions", json={"messages": [USER], "stream": True}) as resp:
                for part in resp.iter_raw():
                    received += part
        assert len(parse_sse(received)) == 2 and b"[DONE]" not in received


def test_a_broken_script_answers_500():
    def broken(request):
        raise RuntimeError("bug in the script")
    with ScriptedUpstream(script=broken) as up:
        reply = httpx.post(up.base_url + "/chat/completions", json={"messages": [USER]})
    assert reply.status_code == 500 and "bug in the script" in reply.json()["error"]["message"]


def test_ignore_token_ids_server():
    with ScriptedUpstream(ignore_token_ids=True) as up:
        body = httpx.post(up.base_url + "/chat/completions",
                          json={"messages": [USER], "return_token_ids": True, "logprobs": True}).json()
    assert "prompt_token_ids" not in body and "token_ids" not in body["choices"][0]
    assert body["choices"][0]["logprobs"] is None


def test_many_concurrent_streams(server):
    async def one(client, i):
        async with client.stream("POST", server.base_url + "/chat/completions",
                                 json={"messages": [{"role": "user", "content": f"n{i}"}], "stream": True}) as resp:
            body = b"".join([part async for part in resp.aiter_raw()])
        return "".join(c["choices"][0]["delta"].get("content", "") for c in json_events(body) if c["choices"])

    async def main():
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(limits=limits, timeout=30) as client:
            return await asyncio.gather(*(one(client, i) for i in range(200)))
    assert asyncio.run(main()) == [f"echo: n{i}" for i in range(200)]


@pytest.mark.parametrize("stream", [False, True])
def test_memo_answers_a_repeated_request_with_its_first_bytes(stream):
    def ask(up, content):
        body = {"messages": [{"role": "user", "content": content}], "stream": stream, "logprobs": True,
                "return_token_ids": True}
        return httpx.post(up.base_url + "/chat/completions", json=body).content

    with ScriptedUpstream(memo=True, chunk_delay=0.001) as up, ScriptedUpstream() as plain:
        first = ask(up, "a")
        assert ask(up, "a") == first and ask(up, "b") != first
        assert len(up.requests) == 3  # a remembered answer still records its request
        assert ask(plain, "a") != ask(plain, "a")  # ids and timestamps differ without memo
    if stream:
        assert parse_sse(first)[-1].is_done and len(parse_sse(first)) > 3


def test_subprocess_mode_prints_its_url_and_serves():
    proc = subprocess.Popen([sys.executable, "-m", "rollouttap.testing.upstream", "--port", "0", "--script", "echo"],
                            stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("LISTENING http://127.0.0.1:")
        url = line.split()[1]
        body = httpx.post(url + "/v1/chat/completions", json={"messages": [USER], "tools": [CALC]}).json()
        assert body["choices"][0]["message"]["content"] == "echo: What is 2 + 3 * 4?"
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
        proc.stdout.close()


class _LeadingSpaceTokenizer(FakeTokenizer):
    """Decodes like SentencePiece: a leading space of the decoded text is dropped."""

    def decode(self, ids, skip_special_tokens=False, **kwargs):
        return super().decode(ids, skip_special_tokens).removeprefix(" ")


@pytest.mark.parametrize("tokenizer", [TOK, _LeadingSpaceTokenizer()], ids=["bytes", "leading-space"])
@pytest.mark.parametrize("text", ["héllo € 😀 done", "a b  c", ""])
def test_incremental_char_offsets_match_full_decodes(tokenizer, text):
    ids = tokenizer.encode(text)
    ends = list(range(1, len(ids) + 1))
    assert char_offsets(tokenizer, text, ids, ends) == [char_offset(tokenizer, text, ids[:e]) for e in ends]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_multibyte_text_streams_whole_characters(k):
    reply = Reply(content="héllo € 😀")
    chunks, gen = _chunks({"messages": [USER], "stream": True, "return_token_ids": True}, reply, k=k)
    pieces = [c["choices"][0]["delta"].get("content", "") for c in chunks[1:]]
    assert "".join(pieces) == "héllo € 😀" and "\ufffd" not in "".join(pieces)
    assert [t for c in chunks[1:] for t in c["choices"][0]["token_ids"]] == gen.ids
