"""Token-exact rows end to end: a real tool-calling agent through the real proxy, the scripted vLLM-shaped
upstream rendering prompts with the project's real tiny tokenizer and chat template. Chat completions first,
then the Responses API (the upstream's ``/v1/responses`` speaks vLLM's JSON and stream events,
``enable_response_messages`` included)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid

import pytest
import requests

import typer
from typer.testing import CliRunner

from conftest import TESTS, agent_env, settled_flows, start_proxy
from rollouttap.cli_inspect import register
from rollouttap.manager import AgentManager, CommandAgent
from rollouttap.manager.conversation import build_conversation, calls_in_order
from rollouttap.manager.rows import build_row, build_rows
from rollouttap.testing.replies import Reply, ToolCall, with_reasoning
from rollouttap.responses_input import as_chat_request
from rollouttap.testing.upstream import ScriptedUpstream
from rollouttap.trainer_hooks.tiny_model import build_tokenizer

AGENT = TESTS / "agent_tool_loop.py"


def two_tool_calls(request):
    """Calculator twice (two turns), then the answer: three model calls per agent (a Responses request read as
    the chat messages vLLM renders it from)."""
    messages = as_chat_request(request)["messages"]
    tool_results = [m for m in messages if m["role"] == "tool"]
    if len(tool_results) < 2:
        expr = "3 + 4" if not tool_results else f"{tool_results[-1]['content']} * 2"
        return Reply(tool_calls=(ToolCall("calculator", {"expression": expr}),))
    return Reply(content=f"The answer is {tool_results[-1]['content']}.")


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("prefix")


@pytest.fixture(scope="module")
def token_upstream(tokenizer):
    with ScriptedUpstream(two_tool_calls, tokenizer=tokenizer, deterministic=True) as server:
        yield server


@pytest.fixture(scope="module")
def token_proxy(tmp_path_factory, confdir, token_upstream):
    store = tmp_path_factory.mktemp("tok") / "runs.db"
    with start_proxy(store, confdir, model_hosts=(token_upstream.url.split("://")[1],)) as proc:
        yield proc


def _run_agent(proxy, upstream, stream: bool, *, responses: bool = False) -> str:
    agent = "tok-" + uuid.uuid4().hex[:10]
    out = subprocess.run([sys.executable, str(AGENT), upstream.base_url, "What is 3 + 4, doubled?",
                          *(["--stream"] if stream else []), *(["--responses"] if responses else [])],
                         env=agent_env(proxy, tag=agent),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "The answer is 14."
    return agent


@pytest.mark.parametrize("stream", [False, True])
def test_multi_turn_tool_agent_row_is_token_exact(token_proxy, token_upstream, tokenizer, stream):
    agent = _run_agent(token_proxy, token_upstream, stream)
    flows = settled_flows(token_proxy.config.store, agent_id=agent)
    conversation = build_conversation(flows)
    calls = conversation.calls
    assert len(calls) == 3 and not conversation.discontinuities
    assert all(c.prompt_token_ids and c.completion_token_ids and c.completion_logprobs for c in calls)
    row, fidelity = build_row(calls, eos_token_id=tokenizer.eos_token_id)
    last = calls[-1]
    # The row is exactly the last call's prompt and completion as the server tokenised them ...
    assert row.prompt_ids + row.completion_ids == last.prompt_token_ids + last.completion_token_ids
    # ... which decodes to the conversation rendered by the chat template, plus the final answer.
    rendered = tokenizer.apply_chat_template(last.messages, tools=last.tools, add_generation_prompt=True,
                                             tokenize=False)
    assert tokenizer.decode(row.prompt_ids + row.completion_ids) == \
        rendered + "The answer is 14." + tokenizer.eos_token
    # Every mask-1 token and its logprob is what the server sent, in order; nothing else is mask 1.
    sampled = [(t, lp) for c in calls for t, lp in zip(c.completion_token_ids, c.completion_logprobs)]
    trained = [(t, lp) for t, m, lp in zip(row.completion_ids, row.env_mask, row.logprobs) if m == 1]
    assert trained == sampled
    assert fidelity.clean_joins == 2 and fidelity.coverage == 1.0 and not row.truncated
    # The tool results are in the env-masked part.
    env_text = tokenizer.decode([t for t, m in zip(row.completion_ids, row.env_mask) if m == 0])
    assert "<tool_response>\n7\n</tool_response>" in env_text and "14" in env_text


@pytest.mark.parametrize("agent_asked", [
    {},
    {"logprobs": True},  # the proxy adds return_token_ids only
    {"return_token_ids": False},  # the proxy adds logprobs only
])
@pytest.mark.parametrize("stream", [False, True])
def test_agent_sees_exactly_what_a_direct_call_returns(token_proxy, token_upstream, stream, agent_asked):
    body = {"model": "policy", "stream": stream, "tools": [json.loads(json.dumps(_tool()))],
            "messages": [{"role": "user", "content": f"What is 2 + 2? {uuid.uuid4().hex}"}], **agent_asked}
    agent = f"bytes-{uuid.uuid4().hex[:8]}"  # its own: the module's proxy and store serve both params
    direct = requests.post(token_upstream.base_url + "/chat/completions", json=body, timeout=10)
    proxied = requests.post(token_upstream.base_url + "/chat/completions", json=body, timeout=10,
                            proxies={"http": token_proxy.url}, headers={"X-Agent-ID": agent})
    assert proxied.content == direct.content
    for key in ("prompt_token_ids", "token_ids"):
        assert f'"{key}":null' in direct.text or key not in direct.text
    swallowed = re.compile(r'"delta":\{\},"logprobs":[^\n]*"finish_reason":null')
    if stream:  # the parser swallows the tool call's markup: vLLM sends those chunks for what was asked only
        assert bool(swallowed.search(direct.text)) == ("logprobs" in agent_asked)
    # ... while the store keeps what the agent did not ask for.
    [flow] = settled_flows(token_proxy.config.store, agent_id=agent)
    ids = "return_token_ids" not in agent_asked
    assert ("return_token_ids" in flow.meta["injected"]) == ids and ('"token_ids":[' in flow.response_text()) == ids
    if stream:
        assert swallowed.search(flow.response_text())  # and for what the proxy asked
    assert json.loads(flow.request_text()) == body  # stored as the agent sent it


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_off_gives_token_exact_rows_without_logprobs(tmp_path, confdir, token_upstream, tokenizer,
                                                              stream):
    host = token_upstream.url.split("://")[1]
    with start_proxy(tmp_path / "runs.db", confdir, model_hosts=(host,), logprobs=False) as proxy:
        agent = _run_agent(proxy, token_upstream, stream)
        body = {"model": "policy", "stream": stream,
                "messages": [{"role": "user", "content": f"What is 2 + 2? {uuid.uuid4().hex}"}]}
        direct = requests.post(token_upstream.base_url + "/chat/completions", json=body, timeout=10)
        proxied = requests.post(token_upstream.base_url + "/chat/completions", json=body, timeout=10,
                                proxies={"http": proxy.url}, headers={"X-Agent-ID": "bytes"})
        assert proxied.content == direct.content
        flows = settled_flows(proxy.config.store, agent_id=agent)
    usage = ', "stream_options": {"include_usage": true}' if stream else ""  # a stream is asked for its usage
    assert {json.dumps(f.meta["injected"]) for f in flows} == {'{"return_token_ids": true%s}' % usage}
    assert all('"top_logprobs"' not in f.response_text() for f in flows)  # the upstream sent none
    calls = build_conversation(flows).calls
    assert len(calls) == 3 and all(c.completion_token_ids and c.completion_logprobs is None for c in calls)
    row, fidelity = build_row(calls, eos_token_id=tokenizer.eos_token_id)
    assert row.logprobs is None and fidelity.coverage == 1.0
    assert row.prompt_ids + row.completion_ids == calls[-1].prompt_token_ids + calls[-1].completion_token_ids


def _tool():
    from agent_tool_loop import TOOL
    return TOOL


def test_reasoning_dropped_by_template_is_realigned_or_forked(tmp_path, confdir):
    tokenizer = build_tokenizer("reasoning_dropping")
    script = with_reasoning(two_tool_calls, reasoning="Let me think.")
    with ScriptedUpstream(script, tokenizer=tokenizer) as upstream, \
            start_proxy(tmp_path / "r.db", confdir, model_hosts=(upstream.url.split("://")[1],)) as proxy:
        agent = _run_agent(proxy, upstream, stream=True)
        calls = build_conversation(settled_flows(proxy.config.store, agent_id=agent)).calls
    row, fidelity = build_row(calls, eos_token_id=tokenizer.eos_token_id)
    assert fidelity.realigned_joins == 2 and fidelity.clean_joins == 0
    assert fidelity.dropped_tokens > 0 and fidelity.coverage < 1.0
    # mask-1 tokens are still exact copies of sampled tokens, with their logprobs
    sampled = {(t, lp) for c in calls for t, lp in zip(c.completion_token_ids, c.completion_logprobs)}
    assert all((t, lp) in sampled for t, m, lp in zip(row.completion_ids, row.env_mask, row.logprobs) if m)
    assert tokenizer.decode(row.prompt_ids + row.completion_ids).endswith("The answer is 14.<|im_end|>")
    forked = build_rows(calls, eos_token_id=tokenizer.eos_token_id, policy="fork")
    assert len(forked.rows) == 3 and forked.fidelity.dropped_tokens == 0


def test_server_ignoring_token_ids_is_flagged_not_silent(tmp_path, confdir, tokenizer):
    with ScriptedUpstream(two_tool_calls, tokenizer=tokenizer, ignore_token_ids=True) as upstream, \
            start_proxy(tmp_path / "r.db", confdir, model_hosts=(upstream.url.split("://")[1],)) as proxy:
        agent = _run_agent(proxy, upstream, stream=False)
        calls = build_conversation(settled_flows(proxy.config.store, agent_id=agent)).calls
    row, fidelity = build_row(calls, eos_token_id=tokenizer.eos_token_id)
    assert fidelity.calls_without_ids == 3 and fidelity.trainable_tokens == 0

    def retokenize(call):  # the caller's fallback: the policy's tokenizer, flagged inexact
        prompt = tokenizer.apply_chat_template(call.messages, tools=call.tools, add_generation_prompt=True,
                                               tokenize=False)
        reply = tokenizer.apply_chat_template(call.messages + [call.response.to_message()],
                                              tools=call.tools, tokenize=False)[len(prompt):]
        return tokenizer.encode(prompt, add_special_tokens=False), tokenizer.encode(reply.rstrip("\n"),
                                                                                    add_special_tokens=False)
    row, fidelity = build_row(calls, eos_token_id=tokenizer.eos_token_id, tokenize=retokenize)
    assert fidelity.inexact_calls == 3 and fidelity.trainable_tokens > 0 and row.logprobs is None


def _flows_of_sdk_agent(tmp_path, confdir, tokenizer, script, body: str, *, max_retries: int) -> list:
    """The settled flows of an agent running ``body`` (Python, with ``c`` an openai client for the upstream)
    through a proxy in front of a ScriptedUpstream answering with ``script``."""
    with ScriptedUpstream(script, tokenizer=tokenizer) as upstream, \
            start_proxy(tmp_path / "r.db", confdir, model_hosts=(upstream.url.split("://")[1],)) as proxy:
        agent = "sdk-" + uuid.uuid4().hex[:8]
        code = ("import openai\n"
                f"c=openai.OpenAI(base_url={upstream.base_url!r}, api_key='k', max_retries={max_retries})\n" + body)
        out = subprocess.run([sys.executable, "-c", code], env=agent_env(proxy, tag=agent), capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return settled_flows(proxy.config.store, agent_id=agent)


def test_client_retry_is_recognised_and_not_a_separate_turn(tmp_path, confdir, tokenizer):
    from rollouttap.testing.replies import failing
    flows = _flows_of_sdk_agent(tmp_path, confdir, tokenizer, failing(1, then=two_tool_calls), (
        "m=c.chat.completions.create(model='p', messages=[{'role':'user','content':'hi'}])\n"
        "print(m.choices[0].message.tool_calls[0].function.name)\n"), max_retries=2)
    calls = build_conversation(flows).calls
    assert [c.status_code for c in calls] == [500, 200]
    assert calls[1].is_retry and calls[1].retry_count == 1
    row, fidelity = build_row(calls, eos_token_id=tokenizer.eos_token_id)
    assert fidelity.retries_skipped == 1 and fidelity.calls_used == 1
    assert row.completion_ids == calls[1].completion_token_ids


@pytest.mark.parametrize("kept", [0, 1])
def test_an_agent_sampling_a_request_twice_is_trained_on_the_answer_it_kept(tmp_path, confdir, tokenizer, kept):
    # Best-of-2 against an n=1 server: the same request twice, then the agent goes on with one answer.
    answers = iter(["Sample one.", "Sample two."])

    def script(request):
        return Reply(content=next(answers, "Done."))

    flows = _flows_of_sdk_agent(tmp_path, confdir, tokenizer, script, (
        "m=[{'role':'user','content':'hi'}]\n"
        "a=[c.chat.completions.create(model='p', messages=m).choices[0].message.content for _ in range(2)]\n"
        f"m+=[{{'role':'assistant','content':a[{kept}]}}, {{'role':'user','content':'go on'}}]\n"
        "print(c.chat.completions.create(model='p', messages=m).choices[0].message.content)\n"), max_retries=0)
    conversation = build_conversation(flows)
    calls = conversation.calls
    assert [c.turn for c in calls] == [0, 0, 1] and not conversation.discontinuities
    row, fidelity = build_row(calls, eos_token_id=tokenizer.eos_token_id)
    sampled = [(t, lp) for c in (calls[kept], calls[2]) for t, lp in zip(c.completion_token_ids, c.completion_logprobs)]
    trained = [(t, lp) for t, m, lp in zip(row.completion_ids, row.env_mask, row.logprobs) if m == 1]
    assert trained == sampled and fidelity.coverage == 1.0 and fidelity.retries_skipped == 1
    assert row.prompt_ids == calls[kept].prompt_token_ids


# -- the Responses API ----------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_responses_tool_agent_row_is_token_exact(token_proxy, token_upstream, tokenizer, stream):
    agent = _run_agent(token_proxy, token_upstream, stream, responses=True)
    flows = settled_flows(token_proxy.config.store, agent_id=agent)
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
def test_responses_agent_sees_exactly_what_a_direct_call_returns(token_proxy, token_upstream, stream):
    body = {"model": "policy", "stream": stream, "instructions": "Be brief.",
            "input": [{"role": "user", "content": [{"type": "input_text", "text": f"Hi {uuid.uuid4().hex}"}]}]}
    agent = f"rbytes-{uuid.uuid4().hex[:8]}"
    direct = requests.post(token_upstream.base_url + "/responses", json=body, timeout=10)
    proxied = requests.post(token_upstream.base_url + "/responses", json=body, timeout=10,
                            proxies={"http": token_proxy.url}, headers={"X-Agent-ID": agent})
    assert direct.status_code == 200 and proxied.content == direct.content
    assert '"input_messages":null' in direct.text and '"output_messages":null' in direct.text
    [flow] = settled_flows(token_proxy.config.store, agent_id=agent)
    assert '"raw_message_tokens"' in flow.response_text()  # the store keeps what the agent did not ask for
    assert json.loads(flow.request_text()) == body
    (call,) = build_conversation([flow]).responses_calls
    assert call.prompt_token_ids and call.completion_token_ids and call.instructions == "Be brief."


def test_show_prints_a_responses_agents_calls_in_order_with_their_new_input(token_proxy, token_upstream):
    agent = _run_agent(token_proxy, token_upstream, stream=True, responses=True)
    settled_flows(token_proxy.config.store, agent_id=agent)
    app = typer.Typer()
    register(app)
    result = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["show", agent, "--store", str(token_proxy.config.store)])
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
    with ScriptedUpstream(two_tool_calls, tokenizer=tokenizer) as up:
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
