"""Token ids checked against the usage the server reports: vLLM before PR #29074 (merged 2025-11-20; pyproject
allows vLLM from 0.10.2) sent no stream chunk for text a tool or reasoning parser swallowed, its token ids and
logprobs with it, so the ids a stream carries have holes that no length check sees. The proxy asks a stream for its
usage (``stream_options.include_usage``) and hides the usage chunk from an agent that did not ask; the manager
sets aside ids that do not add up to the usage's token counts. Pure tables first, then the real proxy against the
scripted upstream in its old-vLLM mode (``skip_swallowed``)."""

from __future__ import annotations

import json
import uuid

import pytest
import requests

from conftest import settled_flows, start_proxy
from rollouttap.manager.chat_stream import ChatResult, ids_problem, parse_chat_body, reassemble_chat_stream
from rollouttap.manager.conversation import build_conversation, chat_call_from_flow
from rollouttap.manager.rows import build_row, build_rows
from rollouttap.testing.fake_tokenizer import FakeTokenizer
from rollouttap.testing.replies import Reply, ToolCall
from rollouttap.testing.upstream import ScriptedUpstream
from rollouttap.testing.vllm_format import SSE_DONE, Options, generate_chat, sse
from rollouttap.testing.vllm_responses import ResponseMeta, chat_body, chat_chunks
from rollouttap.trainer_hooks.tiny_model import build_tokenizer
from test_conversation import make_flow
from test_token_exact import _run_agent, _tool, two_tool_calls

TOK = FakeTokenizer()
CALC = {"type": "function", "function": {"name": "calculator", "parameters": {
    "type": "object", "properties": {"expression": {"type": "string"}}}}}
TOOL_REPLY = Reply(content="Let me compute.", tool_calls=[ToolCall("calculator", {"expression": "1 + 1"})])


# -- the check, as a table ------------------------------------------------------------------------------------------

def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "total_tokens": prompt + completion, "completion_tokens": completion}


@pytest.mark.parametrize(("result", "chat", "problem"), [
    (ChatResult(usage=usage(3, 5), prompt_token_ids=[1, 2, 3], tokens_carried=5), True, None),
    (ChatResult(usage=usage(3, 5), prompt_token_ids=[1, 2, 3], tokens_carried=3), True,
     "the usage counts 5 completion tokens, the answer carries 3"),
    (ChatResult(usage=usage(3, 5), prompt_token_ids=[1, 2, 3], tokens_carried=6), True,
     "the usage counts 5 completion tokens, the answer carries 6"),
    (ChatResult(usage=usage(4, 5), prompt_token_ids=[1, 2, 3], tokens_carried=5), True,
     "the usage counts 4 prompt tokens, the answer carries 3 prompt ids"),
    # /completions may send several prompts, which its usage counts together: no prompt check there
    (ChatResult(usage=usage(6, 5), prompt_token_ids=[1, 2, 3], tokens_carried=5), False, None),
    (ChatResult(usage=None, prompt_token_ids=[1, 2, 3], tokens_carried=3), True, None),  # a server without usage
    (ChatResult(usage={"prompt_tokens": 3}, prompt_token_ids=[1, 2, 3], tokens_carried=3), True, None),
    (ChatResult(usage=usage(3, 5), prompt_token_ids=None, tokens_carried=None), True, None),  # nothing to check
    (ChatResult(usage={**usage(3, 5), "completion_tokens": None}, tokens_carried=3), True, None),
])
def test_ids_problem(result, chat, problem):
    assert ids_problem(result, chat=chat) == problem


def answer(request: dict, reply: Reply, *, skip_swallowed: bool = False, k: int = 1) -> tuple[bytes, list[int]]:
    """The scripted upstream's bytes for ``request`` (vLLM < PR #29074 with ``skip_swallowed``), and the ids sampled."""
    gen = generate_chat(request, reply, TOK)
    opts = Options.from_request(request, skip_swallowed=skip_swallowed)
    meta = ResponseMeta.new("m")
    if not request.get("stream"):
        return json.dumps(chat_body(gen, meta, opts, TOK)).encode(), gen.ids
    chunks = chat_chunks(gen, meta, opts, TOK, tokens_per_chunk=k, parsers=True)
    return b"".join(sse(c) for c in chunks) + SSE_DONE, gen.ids


ASKED = {"model": "m", "messages": [{"role": "user", "content": "1 + 1?"}], "tools": [CALC], "stream": True,
         "return_token_ids": True, "logprobs": True, "stream_options": {"include_usage": True}}


@pytest.mark.parametrize("skip_swallowed", [False, True], ids=["new vLLM", "vLLM < #29074"])
def test_a_stream_missing_swallowed_chunks_has_its_ids_set_aside(skip_swallowed):
    body, sampled = answer(ASKED, TOOL_REPLY, skip_swallowed=skip_swallowed)
    result = reassemble_chat_stream(body)
    assert result.usage["completion_tokens"] == len(sampled)
    # old vLLM: ids and logprobs equally short, so nothing else notices
    assert (result.completion_token_ids == sampled) is not skip_swallowed
    assert len(result.completion_logprobs) == len(result.completion_token_ids)
    call = chat_call_from_flow(make_flow(ASKED, body))
    if skip_swallowed:
        assert call.ids_problem == f"the usage counts {len(sampled)} completion tokens, the answer carries " \
                                   f"{len(result.completion_token_ids)}"
        assert (call.prompt_token_ids, call.completion_token_ids, call.completion_logprobs) == (None, None, None)
    else:
        assert call.ids_problem is None and call.completion_token_ids == sampled
    row, fidelity = build_row([call], eos_token_id=TOK.eos_token_id)
    assert (fidelity.calls_without_ids, fidelity.ids_set_aside) == ((1, 1) if skip_swallowed else (0, 0))
    assert fidelity.trainable_tokens == (0 if skip_swallowed else len(sampled))
    if skip_swallowed:  # a caller's tokenizer fallback rebuilds it, flagged inexact, as for a server without ids
        rebuilt = build_rows([call], eos_token_id=TOK.eos_token_id, tokenize=lambda c: ([1, 2], [3, TOK.eos_token_id]))
        assert rebuilt.fidelity.inexact_calls == 1 and rebuilt.fidelity.ids_set_aside == 1


def test_a_non_streamed_answer_whose_ids_disagree_with_its_usage_is_set_aside():
    request = {**ASKED, "stream": False}
    request.pop("stream_options")
    body, sampled = answer(request, TOOL_REPLY)
    doc = json.loads(body)
    assert chat_call_from_flow(make_flow(request, body)).completion_token_ids == sampled
    doc["usage"]["completion_tokens"] += 1
    call = chat_call_from_flow(make_flow(request, json.dumps(doc).encode()))
    assert call.completion_token_ids is None and "completion tokens" in call.ids_problem


def test_usage_counts_the_ids_of_every_choice():
    # n=2: vLLM's usage counts both choices' tokens; rows read choice 0 only, the check counts them all.
    request = {**ASKED, "stream": False}
    body, sampled = answer(request, TOOL_REPLY)
    doc = json.loads(body)
    doc["choices"].append({**doc["choices"][0], "index": 1})
    doc["usage"]["completion_tokens"] = 2 * len(sampled)
    assert parse_chat_body(doc).tokens_carried == 2 * len(sampled)
    assert chat_call_from_flow(make_flow(request, json.dumps(doc).encode())).completion_token_ids == sampled


# -- through the real proxy -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer("prefix")


def script(request: dict) -> Reply:
    return Reply(content="Four.") if "prompt" in request else two_tool_calls(request)


@pytest.fixture(scope="module", params=[False, True], ids=["new vLLM", "vLLM < #29074"])
def served(request, tmp_path_factory, confdir, tokenizer):
    """(upstream, proxy, old): the scripted upstream (in its old-vLLM mode or not) behind a real proxy."""
    with ScriptedUpstream(script, tokenizer=tokenizer, deterministic=True,
                          skip_swallowed=request.param) as upstream, \
            start_proxy(tmp_path_factory.mktemp("usage") / "runs.db", confdir,
                        model_hosts=(upstream.url.split("://")[1],)) as proxy:
        yield upstream, proxy, request.param


def test_an_old_vllm_stream_is_flagged_and_not_trained_as_exact(served, tokenizer):
    upstream, proxy, old = served
    agent = _run_agent(proxy, upstream, stream=True)  # the openai SDK, which reads no usage chunk it did not ask for
    flows = settled_flows(proxy.config.store, agent_id=agent)
    assert all(f.meta["injected"]["stream_options"] == {"include_usage": True} for f in flows)
    assert all('"choices":[],"usage":' in f.response_text() for f in flows)  # the store keeps the server's bytes
    calls = build_conversation(flows).calls
    assert len(calls) == 3 and all(c.usage["completion_tokens"] > 0 for c in calls)
    tooling = calls[:2]  # the parser swallows their tool-call markup; the last call answers in plain text
    row, fidelity = build_row(calls, eos_token_id=tokenizer.eos_token_id)
    if old:
        assert all(c.completion_token_ids is None and "completion tokens" in c.ids_problem for c in tooling)
        assert (fidelity.calls_without_ids, fidelity.ids_set_aside) == (2, 2)
        assert fidelity.trainable_tokens == len(calls[2].completion_token_ids)
    else:
        assert all(c.ids_problem is None and len(c.completion_token_ids) == c.usage["completion_tokens"]
                   for c in calls)
        assert (fidelity.calls_without_ids, fidelity.ids_set_aside, fidelity.coverage) == (0, 0, 1.0)


@pytest.mark.parametrize(("path", "agent_asked"), [
    ("/chat/completions", {}),
    ("/chat/completions", {"logprobs": True}),  # the proxy adds return_token_ids only
    ("/chat/completions", {"stream_options": None}),
    ("/completions", {}),
])
def test_the_agent_does_not_see_the_usage_chunk_the_proxy_asked_for(served, path, agent_asked):
    upstream, proxy, _ = served
    text = f"What is 2 + 2? {uuid.uuid4().hex}"
    body = {"model": "policy", "stream": True, **agent_asked,
            **({"prompt": text} if path == "/completions" else
               {"tools": [_tool()], "messages": [{"role": "user", "content": text}]})}
    agent = f"usage-{uuid.uuid4().hex[:8]}"
    direct = requests.post(upstream.base_url + path, json=body, timeout=10)
    proxied = requests.post(upstream.base_url + path, json=body, timeout=10,
                            proxies={"http": proxy.url}, headers={"X-Agent-ID": agent})
    assert proxied.content == direct.content and b'"choices":[]' not in direct.content
    [flow] = settled_flows(proxy.config.store, agent_id=agent)
    assert flow.meta["injected"]["stream_options"] == {"include_usage": True}
    assert '"choices":[],"usage":' in flow.response_text()


@pytest.mark.parametrize("stream_options", [
    {"include_usage": True},
    {},  # vLLM's default: include_usage true
    {"include_usage": False},  # the agent declined usage: its call goes unchecked
])
def test_stream_options_the_agent_set_are_left_as_sent(served, stream_options):
    upstream, proxy, old = served
    body = {"model": "policy", "stream": True, "stream_options": stream_options, "tools": [_tool()],
            "messages": [{"role": "user", "content": f"What is 2 + 2? {uuid.uuid4().hex}"}]}
    agent = f"usage-{uuid.uuid4().hex[:8]}"
    direct = requests.post(upstream.base_url + "/chat/completions", json=body, timeout=10)
    proxied = requests.post(upstream.base_url + "/chat/completions", json=body, timeout=10,
                            proxies={"http": proxy.url}, headers={"X-Agent-ID": agent})
    assert proxied.content == direct.content
    asked = stream_options.get("include_usage", True)
    assert (b'"choices":[],"usage":' in direct.content) is asked
    [flow] = settled_flows(proxy.config.store, agent_id=agent)
    assert "stream_options" not in flow.meta["injected"] and json.loads(flow.request_text()) == body
    call = build_conversation([flow]).calls[0]
    # The check runs wherever the stream carries usage: an old vLLM's ids with holes are set aside.
    assert (call.ids_problem is not None) is (old and asked)
    assert (call.completion_token_ids is None) is (old and asked)
