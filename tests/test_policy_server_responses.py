"""The embedded policy server's POST /v1/responses: vLLM's Responses API over a live tiny model, and an agent on
it through the real proxy, whose Responses calls carry token ids."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
openai = pytest.importorskip("openai")
import requests  # noqa: E402

from conftest import agent_env, settled_flows, start_proxy  # noqa: E402
from rollouttap.manager.conversation import build_conversation  # noqa: E402
from rollouttap.responses_input import chat_messages, chat_tools  # noqa: E402
from rollouttap.testing.replies import Reply, fixed  # noqa: E402
from rollouttap.testing.upstream import ScriptedUpstream  # noqa: E402
from rollouttap.trainer_hooks.policy_api import normalise_messages  # noqa: E402
from rollouttap.trainer_hooks.policy_server import PolicyServer  # noqa: E402
from rollouttap.trainer_hooks.tiny_model import build_tiny_model  # noqa: E402
from test_upstream_responses_api import sse_events  # noqa: E402

TESTS = Path(__file__).parent
LOGPROBS = "message.output_text.logprobs"
TOOL = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
LOOP = [
    {"role": "user", "content": "Weather in Paris?"},
    {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
    {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
]
SCRIPTED = ('<think>Weather needed.</think>Let me check.<tool_call>\n'
            '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>')


@pytest.fixture(scope="module")
def tiny():
    path = build_tiny_model()
    return transformers.AutoModelForCausalLM.from_pretrained(path), transformers.AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def server(tiny):
    with PolicyServer(*tiny, max_new_tokens=12) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0) as c:
        yield c


def post(server, body):
    return requests.post(server.base_url + "/responses", json=body, timeout=30)


def template_ids(tok, request):
    """What the tokenizer's chat template gives for the messages vLLM converts a Responses request into."""
    text = tok.apply_chat_template(normalise_messages(chat_messages(request)), tools=chat_tools(request),
                                   add_generation_prompt=True, tokenize=False)
    return text, tok.encode(text, add_special_tokens=False)


def without_ids(body: dict) -> dict:
    """A response with its fresh ids and timestamp blanked (they differ between two answers)."""
    body = json.loads(json.dumps(body))
    body["id"] = body["created_at"] = None
    for item in body["output"]:
        item["id"] = None
        if item["type"] == "function_call":
            item["call_id"] = None
    return body


# ----------------------------------------------------------------------- token ids

def test_raw_messages_are_the_template_rendering_and_the_generated_ids(server, tiny):
    _, tok = tiny
    request = {"model": "policy", "instructions": "Be brief.", "input": LOOP, "tools": [TOOL], "temperature": 0,
               "enable_response_messages": True}
    body = post(server, request).json()
    text, ids = template_ids(tok, request)
    assert body["input_messages"] == [{"message": text, "tokens": ids, "type": "raw_message_tokens"}]
    [out] = body["output_messages"]
    generated = out["tokens"]
    finished = body["status"] == "completed"
    assert finished == (generated[-1] == tok.eos_token_id)
    assert tok.decode(generated[:-1] if finished else generated, skip_special_tokens=True) == out["message"]
    assert body["usage"]["input_tokens"] == len(ids) and body["usage"]["output_tokens"] == len(generated)
    assert body["usage"]["total_tokens"] == len(ids) + len(generated)
    assert ids == requests.post(server.url + "/tokenize", json={"messages": chat_messages(request),
                                                                "tools": chat_tools(request)}, timeout=10).json()["tokens"]


def test_without_the_flag_the_raw_messages_are_null(server):
    body = post(server, {"input": "Hi", "max_output_tokens": 3}).json()
    assert body["input_messages"] is None and body["output_messages"] is None
    assert body["usage"]["output_tokens"] <= 3


def test_the_sdk_reads_a_response_and_max_output_tokens_makes_it_incomplete(client, tiny):
    _, tok = tiny
    r = client.responses.create(model="policy", input="What is 2 + 2?", temperature=0, max_output_tokens=2,
                                extra_body={"enable_response_messages": True})
    [out] = r.model_extra["output_messages"]
    if out["tokens"][-1] == tok.eos_token_id:
        assert r.status == "completed"
    else:
        assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
        assert len(out["tokens"]) == 2 and r.max_output_tokens == 2
    assert r.output_text == out["message"] and r.object == "response" and r.model == "policy"
    assert r.temperature == 0 and r.top_p == 1.0


def test_the_body_has_vllms_fields_in_the_scripted_upstreams_order(server):
    mine = post(server, {"input": "Hi", "tools": [TOOL], "enable_response_messages": True}).json()
    with ScriptedUpstream(script=fixed([Reply(content="Hi")])) as up:
        theirs = requests.post(up.base_url + "/responses", json={"model": "m", "input": "Hi", "tools": [TOOL],
                                                                 "enable_response_messages": True}, timeout=10).json()
    assert list(mine) == list(theirs)
    assert mine["tools"] == theirs["tools"] and list(mine["usage"]) == list(theirs["usage"])


# ----------------------------------------------------------------------- streaming

def test_the_stream_completes_with_the_non_streamed_answer(server, client, tiny):
    _, tok = tiny
    request = {"model": "policy", "input": LOOP, "tools": [TOOL], "temperature": 0, "max_output_tokens": 6,
               "enable_response_messages": True}
    whole = post(server, request).json()
    answer = requests.post(server.base_url + "/responses", json={**request, "stream": True}, timeout=30)
    assert answer.headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(answer.text)
    assert [e["sequence_number"] for _, e in events] == list(range(len(events)))
    assert all(name == e["type"] for name, e in events)
    names = [name for name, _ in events]
    assert names[:2] == ["response.created", "response.in_progress"] and names[-1] == "response.completed"
    assert events[0][1]["response"]["status"] == "in_progress" and events[0][1]["response"]["output_messages"] is None
    final = events[-1][1]["response"]
    assert without_ids(final) == without_ids(whole)
    deltas = "".join(e["delta"] for name, e in events if name == "response.output_text.delta")
    assert deltas == "".join(p["text"] for i in final["output"] if i["type"] == "message" for p in i["content"])
    # the SDK parses the same stream
    sdk = list(client.responses.create(stream=True, **{k: v for k, v in request.items() if k != "enable_response_messages"},
                                       extra_body={"enable_response_messages": True}))
    assert sdk[-1].type == "response.completed"
    assert sdk[-1].response.model_extra["output_messages"] == final["output_messages"]


def test_logprobs_when_included(server):
    request = {"input": "Hi", "temperature": 0, "max_output_tokens": 4, "include": ["message.output_text.logprobs"],
               "top_logprobs": 2}
    body = post(server, request).json()
    texts = [p for i in body["output"] if i["type"] == "message" for p in i["content"]]
    if texts:
        entries = texts[0]["logprobs"]
        assert len(entries) == body["usage"]["output_tokens"]
        assert all(len(e["top_logprobs"]) == 2 and e["logprob"] == pytest.approx(e["top_logprobs"][0]["logprob"])
                   for e in entries)
    assert body["top_logprobs"] == 2
    events = sse_events(post(server, {**request, "stream": True}).text)
    for name, event in events:
        if name == "response.output_text.delta":
            assert [set(e) for e in event["logprobs"]] == [{"token", "logprob", "top_logprobs"}]


def test_a_client_leaving_a_stream_frees_the_server(server):
    with requests.post(server.base_url + "/responses", json={"input": "Hi", "stream": True, "max_output_tokens": 12},
                       stream=True, timeout=30) as answer:
        next(answer.iter_content(64))
    assert post(server, {"input": "Hi", "max_output_tokens": 2}).status_code == 200


# ----------------------------------------------------------------------- errors

@pytest.mark.parametrize("body, fragment", [
    ({"model": "policy"}, "'input' must be"),
    ({"input": [{"type": "web_search_call"}]}, "unsupported input item type"),
    ({"input": "Hi", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "Hi", "temperature": -1}, "temperature"),
    ({"input": "Hi", "instructions": 3}, "instructions"),
    ({"input": "Hi", "include": [LOGPROBS], "top_logprobs": "x"}, "top_logprobs"),
    ({"input": "Hi", "include": LOGPROBS}, "'include' must be a list"),
    ({"input": "Hi", "background": True}, "does not support the background mode"),  # no response store
])
def test_invalid_requests_get_400(server, body, fragment):
    answer = post(server, body)
    assert answer.status_code == 400 and fragment in answer.json()["error"]["message"]


def test_another_model_and_a_previous_response_get_vllms_404s(server, client):
    answer = post(server, {"model": "gpt-4o", "input": "Hi"})
    assert answer.status_code == 404 and "gpt-4o" in answer.json()["error"]["message"]
    answer = post(server, {"input": "Hi", "previous_response_id": "resp_123"})
    assert answer.status_code == 404
    assert answer.json() == {"error": {"message": "Response with id 'resp_123' not found.",
                                       "type": "invalid_request_error", "param": "response_id", "code": 404}}
    assert post(server, {"input": 5, "previous_response_id": "resp_123"}).status_code == 400  # validated first
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="policy", input="Hi", previous_response_id="resp_123")
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="policy", input="Hi", max_output_tokens=0)


class FailingModel(torch.nn.Module):
    """Wraps the tiny model and fails at the third generated token."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.step = inner, 0
        self.config, self.generation_config = inner.config, inner.generation_config

    def forward(self, input_ids, **kwargs):
        self.step = 0 if input_ids.shape[1] > 1 else self.step + 1
        if self.step >= 3:
            raise RuntimeError("the GPU fell off")
        return self.inner(input_ids=input_ids, **kwargs)


def test_a_failure_mid_stream_ends_it_with_the_sdks_error_event(tiny):
    from openai.types.responses import ResponseErrorEvent
    model, tok = tiny
    with PolicyServer(FailingModel(model), tok, max_new_tokens=20) as broken:
        text = post(broken, {"input": "Hi", "stream": True, "temperature": 0}).text
    events = sse_events(text)
    name, last = events[-1]
    assert name == "error" and "the GPU fell off" in last["message"]
    ResponseErrorEvent.model_validate(last)
    assert last["sequence_number"] == events[-2][1]["sequence_number"] + 1
    assert list(last) == ["code", "message", "param", "sequence_number", "type"]  # pydantic's order


# ----------------------------------------------------------------------- tool calls

class ForcedModel(torch.nn.Module):
    """Wraps the tiny model and makes it emit a scripted token sequence (then eos); ``script_for`` picks the
    script from the prompt's ids."""

    def __init__(self, inner, script_for):
        super().__init__()
        self.inner, self.script_for, self.script, self.step = inner, script_for, [], 0
        self.config, self.generation_config = inner.config, inner.generation_config

    def forward(self, input_ids, **kwargs):
        out = self.inner(input_ids=input_ids, **kwargs)
        if input_ids.shape[1] > 1:
            self.script, self.step = self.script_for(input_ids[0].tolist()), 0
        else:
            self.step += 1
        if self.step < len(self.script):
            out.logits[0, -1, self.script[self.step]] += 1000.0
        return out


@pytest.fixture(scope="module")
def scripted(tiny):
    model, tok = tiny
    forced = ForcedModel(model, lambda _prompt: tok.encode(SCRIPTED) + [tok.eos_token_id])
    with PolicyServer(forced, tok, max_new_tokens=96) as srv:
        yield srv


def test_a_hermes_tool_call_becomes_function_call_items(scripted, tiny):
    _, tok = tiny
    request = {"input": "Weather?", "tools": [TOOL], "enable_response_messages": True}
    body = post(scripted, request).json()
    assert [i["type"] for i in body["output"]] == ["reasoning", "message", "function_call", "function_call"]
    reasoning, message, *calls = body["output"]
    assert reasoning["content"] == [{"text": "Weather needed.", "type": "reasoning_text"}]
    assert reasoning["id"].startswith("rs_") and message["id"].startswith("msg_")
    assert message["content"][0]["text"] == "Let me check."
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]
    assert all(c["id"].startswith("fc_") and c["status"] == "completed" for c in calls)
    assert body["status"] == "completed"
    assert body["output_messages"][0]["tokens"] == tok.encode(SCRIPTED) + [tok.eos_token_id]
    assert body["output_messages"][0]["message"] == SCRIPTED
    assert body["usage"]["output_tokens_details"]["reasoning_tokens"] == len(tok.encode("Weather needed."))


def test_streamed_tool_calls_and_the_sdk(scripted):
    with openai.OpenAI(base_url=scripted.base_url, api_key="x", max_retries=0) as c:
        events = list(c.responses.create(model="policy", input="Weather?", tools=[TOOL], stream=True))
        whole = c.responses.create(model="policy", input="Weather?", tools=[TOOL])
    kinds = [e.type for e in events]
    assert kinds.index("response.reasoning_text.delta") < kinds.index("response.output_text.delta") \
        < kinds.index("response.function_call_arguments.delta")
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert [json.loads(e.arguments) for e in done] == [{"city": "Paris"}, {"city": "Rome"}]
    final = events[-1].response
    assert [i.type for i in final.output] == [i.type for i in whole.output]
    assert final.output_text == whole.output_text == "Let me check."


def test_with_tool_choice_none_the_markup_stays_text(scripted):
    body = post(scripted, {"input": "Weather?", "tools": [TOOL], "tool_choice": "none"}).json()
    assert [i["type"] for i in body["output"]] == ["reasoning", "message"]
    assert body["output"][1]["content"][0]["text"].startswith("Let me check.<tool_call>\n{")


# ----------------------------------------------------------------------- through the proxy

def test_a_responses_agent_through_the_proxy_gets_token_ids(tiny, tmp_path, confdir):
    model, tok = tiny
    call = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2 + 2"}}\n</tool_call>'

    def script_for(prompt):  # call the calculator, then answer once its result is in the prompt
        seen = "<tool_response>" in tok.decode(prompt)
        return tok.encode("It is 4." if seen else call) + [tok.eos_token_id]

    with PolicyServer(ForcedModel(model, script_for), tok, max_new_tokens=64) as srv:
        host = srv.url.split("://", 1)[1]
        with start_proxy(tmp_path / "runs.db", confdir, model_hosts=(host,)) as proxy:
            for stream in (False, True):
                agent = "resp-" + uuid.uuid4().hex[:10]
                out = subprocess.run(
                    [sys.executable, str(TESTS / "agent_tool_loop.py"), srv.base_url, "What is 2 + 2?",
                     "--responses", *(["--stream"] if stream else [])],
                    env=agent_env(proxy, tag=agent), capture_output=True, text=True, timeout=60)
                assert out.returncode == 0, out.stderr
                assert out.stdout.strip() == "It is 4."
                conversation = build_conversation(settled_flows(proxy.config.store, agent_id=agent))
                calls = conversation.responses_calls
                assert len(calls) == 2 and all(c.stream is stream for c in calls)
                for c in calls:
                    request = {"input": c.input, "tools": c.tools}
                    assert c.prompt_token_ids == template_ids(tok, request)[1]
                assert calls[0].completion_token_ids == tok.encode(call) + [tok.eos_token_id]
                assert calls[1].completion_token_ids == tok.encode("It is 4.") + [tok.eos_token_id]
                assert calls[0].finish_reason == "tool_calls" and calls[1].finish_reason == "stop"
