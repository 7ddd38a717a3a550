"""Token-exact rows for Responses API agents, end to end: the openai SDK's ``client.responses`` through the real
proxy, in front of the scripted vLLM-shaped upstream (its ``/v1/responses`` speaks vLLM's JSON and stream events,
``enable_response_messages`` included), rendering prompts with the project's real tiny tokenizer."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid

import pytest
import requests
import typer
from typer.testing import CliRunner

from conftest import TESTS, agent_env, settled_flows, start_proxy
from rollouttap.cli_inspect import register
from rollouttap.manager.conversation import build_conversation, calls_in_order
from rollouttap.manager.rows import build_rows
from rollouttap.testing.replies import Reply
from rollouttap.testing.responses_input import as_chat_request
from rollouttap.testing.upstream import ScriptedUpstream
from rollouttap.trainer_hooks.tiny_model import build_tokenizer
from test_token_exact import two_tool_calls

AGENT = TESTS / "agent_responses_loop.py"


def two_tool_calls_responses(request):
    """test_token_exact's calculator-twice script, for the request as the chat messages vLLM renders it from."""
    return two_tool_calls(as_chat_request(request))


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("prefix")


@pytest.fixture(scope="module")
def upstream(tokenizer):
    with ScriptedUpstream(two_tool_calls_responses, tokenizer=tokenizer, deterministic=True) as server:
        yield server


@pytest.fixture(scope="module")
def proxy(tmp_path_factory, confdir, upstream):
    store = tmp_path_factory.mktemp("resp") / "runs.db"
    with start_proxy(store, confdir, model_hosts=(upstream.url.split("://")[1],)) as proc:
        yield proc


@pytest.mark.parametrize("stream", [False, True])
def test_responses_tool_agent_row_is_token_exact(proxy, upstream, tokenizer, stream):
    agent = _run_agent(proxy, upstream, stream)
    flows = settled_flows(proxy.config.store, agent_id=agent)
    assert all(f.meta["injected"] == {"enable_response_messages": True} for f in flows)
    conversation = build_conversation(flows)
    calls = conversation.responses_calls
    assert len(calls) == 3 and not conversation.calls and conversation.other_flows == 0
    assert all(c.prompt_token_ids and c.completion_token_ids and not c.failed for c in calls)
    assert [c.finish_reason for c in calls] == ["tool_calls", "tool_calls", "stop"]
    result = build_rows(calls_in_order(conversation, flows), eos_token_id=tokenizer.eos_token_id)
    (row,) = result.rows
    last = calls[-1]
    # The row is the last call's prompt and completion as the server tokenised them ...
    assert row.prompt_ids + row.completion_ids == last.prompt_token_ids + last.completion_token_ids
    # ... which decodes to the input rendered by the chat template, plus the final answer.
    chat = as_chat_request(json.loads(flows[-1].request_text()))
    rendered = tokenizer.apply_chat_template(chat["messages"], tools=chat["tools"], add_generation_prompt=True,
                                             tokenize=False)
    assert tokenizer.decode(row.prompt_ids + row.completion_ids) == \
        rendered + "The answer is 14." + tokenizer.eos_token
    # Every sampled token is mask 1, in order, and nothing else; the tool results are mask 0.
    assert [t for t, m in zip(row.completion_ids, row.env_mask) if m] == \
        [t for c in calls for t in c.completion_token_ids]
    env_text = tokenizer.decode([t for t, m in zip(row.completion_ids, row.env_mask) if m == 0])
    assert "<tool_response>\n7\n</tool_response>" in env_text and "14" in env_text
    fidelity = result.fidelity
    assert fidelity.clean_joins == 2 and fidelity.coverage == 1.0 and row.logprobs is None


@pytest.mark.parametrize("stream", [False, True])
def test_responses_agent_sees_exactly_what_a_direct_call_returns(proxy, upstream, stream):
    body = {"model": "policy", "stream": stream, "instructions": "Be brief.",
            "input": [{"role": "user", "content": [{"type": "input_text", "text": f"Hi {uuid.uuid4().hex}"}]}]}
    agent = f"rbytes-{uuid.uuid4().hex[:8]}"
    direct = requests.post(upstream.base_url + "/responses", json=body, timeout=10)
    proxied = requests.post(upstream.base_url + "/responses", json=body, timeout=10,
                            proxies={"http": proxy.url}, headers={"X-Agent-ID": agent})
    assert direct.status_code == 200 and proxied.content == direct.content
    assert '"input_messages":null' in direct.text and '"output_messages":null' in direct.text
    [flow] = settled_flows(proxy.config.store, agent_id=agent)
    assert '"raw_message_tokens"' in flow.response_text()  # the store keeps what the agent did not ask for
    assert json.loads(flow.request_text()) == body
    (call,) = build_conversation([flow]).responses_calls
    assert call.prompt_token_ids and call.completion_token_ids and call.instructions == "Be brief."


def _run_agent(proxy, upstream, stream: bool) -> str:
    agent = "resp-" + uuid.uuid4().hex[:10]
    out = subprocess.run([sys.executable, str(AGENT), upstream.base_url, "What is 3 + 4, doubled?",
                          *(["--stream"] if stream else [])], env=agent_env(proxy, tag=agent),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "The answer is 14."
    return agent


def test_show_prints_a_responses_agents_calls_in_order_with_their_new_input(proxy, upstream):
    agent = _run_agent(proxy, upstream, stream=True)
    settled_flows(proxy.config.store, agent_id=agent)
    app = typer.Typer()
    register(app)
    result = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["show", agent, "--store", str(proxy.config.store)])
    assert result.exit_code == 0, result.output
    out = result.output
    heads = [line for line in out.splitlines() if line.startswith("── ")]
    assert [h.split(" · ")[0] for h in heads] == [f"── responses call {i}" for i in range(3)]
    assert all("stream" in h for h in heads) and "finish tool_calls" in heads[0] and "finish stop" in heads[2]
    assert out.count("user: What is 3 + 4, doubled?") == 1  # later calls show only their new input
    assert out.count("(goes on from responses call") == 2
    assert '→ calculator({"expression": "3 + 4"})' in out and "] 7" in out and "The answer is 14." in out


def test_a_failed_responses_call_reaches_the_store_and_the_conversation(tmp_path, confdir, tokenizer):
    with ScriptedUpstream(lambda request: Reply(status=503, error_message="overloaded"), tokenizer=tokenizer) as up, \
            start_proxy(tmp_path / "r.db", confdir, model_hosts=(up.url.split("://")[1],)) as proxy:
        agent = "rfail-" + uuid.uuid4().hex[:8]
        answer = requests.post(up.base_url + "/responses", json={"model": "p", "input": "hi"}, timeout=10,
                               proxies={"http": proxy.url}, headers={"X-Agent-ID": agent})
        assert answer.status_code == 503
        (call,) = build_conversation(settled_flows(proxy.config.store, agent_id=agent)).responses_calls
    assert call.failed and call.error is not None and "overloaded" in call.error



def test_a_previous_response_id_the_server_does_not_keep_is_a_failed_call_named_in_the_error(tmp_path, confdir,
                                                                                            tokenizer):
    # vLLM keeps no responses by default (VLLM_ENABLE_RESPONSES_API_STORE): an agent relying on
    # previous_response_id fails, and its result says why.
    from rollouttap.manager import AgentManager, CommandAgent
    with ScriptedUpstream(two_tool_calls_responses, tokenizer=tokenizer) as up:
        code = ("import openai, os; c = openai.OpenAI(max_retries=0, api_key='k', base_url=os.environ['BASE']); "
                "r = c.responses.create(model='p', input='What is 3 + 4?', tools=[" + json.dumps(
                    {"type": "function", "name": "calculator", "parameters": {"type": "object"}}) + "]); "
                "c.responses.create(model='p', previous_response_id=r.id, input=[{'type': 'function_call_output', "
                "'call_id': r.output[0].call_id, 'output': '7'}])")
        agent = CommandAgent([sys.executable, "-c", code.replace("{", "{{").replace("}", "}}")],
                             env={"BASE": up.base_url})
        with AgentManager(agent, store=tmp_path / "runs.db", model_url=up.base_url, confdir=confdir,
                          eos_token_id=tokenizer.eos_token_id) as manager:
            (result,) = manager.deploy(["go"])
    assert result.status == "failed"
    assert "its last model call failed: HTTP 404: Response with id" in result.error
    assert result.conversation.to_dict()["summary"]["responses_calls"] == 2
