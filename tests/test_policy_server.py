"""The embedded policy server: vLLM's shapes over a live tiny model, and its pure parts."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
openai = pytest.importorskip("openai")
import requests  # noqa: E402

from rollouttap.trainer_hooks.generation import (  # noqa: E402
    SamplingParams, TextTracker, sample_token,
)
from rollouttap.trainer_hooks.hermes import (  # noqa: E402
    ParsedToolCall, parse_assistant_text, streamable_parts,
)
from rollouttap.trainer_hooks.openai_params import BadRequest, sampling_from_body  # noqa: E402
from rollouttap.trainer_hooks.policy_api import GONE_CHECK_EVERY, ApiConfig, ClientGone, PolicyAPI  # noqa: E402
from rollouttap.trainer_hooks.policy_server import PolicyServer, peer_closed  # noqa: E402
from rollouttap.trainer_hooks.tiny_model import build_tiny_model  # noqa: E402

USER = [{"role": "user", "content": "What is 2 + 2?"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    return model, tok


@pytest.fixture(scope="module")
def server(tiny):
    model, tok = tiny
    with PolicyServer(model, tok, max_new_tokens=12) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0) as c:
        yield c


def post(server, path, body):
    return requests.post(server.url + path, json=body, timeout=30)


def chat(client, messages=USER, **kwargs):
    kwargs.setdefault("temperature", 0)
    kwargs.setdefault("max_tokens", 10)
    return client.chat.completions.create(model="policy", messages=messages, **kwargs)


def prompt_ids(tok, messages=USER, tools=None):
    return tok.apply_chat_template(messages, tools=tools, add_generation_prompt=True, return_dict=False)


def forward_logprobs(model, prompt, completion):
    """log p(completion[j] | prefix) from one teacher-forced forward pass."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0].float()
    rows = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
    return [float(rows[j, t]) for j, t in enumerate(completion)]


def full_text(message) -> str:
    """The completion text a chat message stands for (reasoning and content, no tool calls here)."""
    reasoning = (message.model_extra or {}).get("reasoning_content")
    head = f"<think>{reasoning}</think>" if reasoning is not None else ""
    return head + (message.content or "")


def strip_eos(ids, tok):
    return ids[:-1] if ids and ids[-1] == tok.eos_token_id else ids


# ------------------------------------------------------------------- plain endpoints

def test_health_and_models(server):
    assert requests.get(server.url + "/health", timeout=5).status_code == 200
    models = requests.get(server.base_url + "/models", timeout=5).json()
    assert models["data"][0]["id"] == "policy" and models["data"][0]["max_model_len"] == 2048


def test_tokenize_and_detokenize(server, tiny):
    _, tok = tiny
    chat_ids = post(server, "/tokenize", {"messages": USER, "tools": TOOLS}).json()
    assert chat_ids["tokens"] == prompt_ids(tok, tools=TOOLS)
    assert chat_ids["count"] == len(chat_ids["tokens"]) and chat_ids["max_model_len"] == 2048
    text = post(server, "/tokenize", {"prompt": "Hello <tool_call>"}).json()
    assert text["tokens"] == tok.encode("Hello <tool_call>")
    assert post(server, "/detokenize", {"tokens": text["tokens"]}).json() == {"prompt": "Hello <tool_call>"}


# -------------------------------------------------------------------- chat, one shot

def test_chat_ids_text_and_logprobs_agree(client, tiny):
    model, tok = tiny
    r = chat(client, logprobs=True, top_logprobs=3, extra_body={"return_token_ids": True})
    choice = r.choices[0]
    assert r.prompt_token_ids == prompt_ids(tok)
    ids = choice.token_ids
    assert tok.decode(strip_eos(ids, tok), skip_special_tokens=True) == full_text(choice.message)
    assert r.usage.prompt_tokens == len(r.prompt_token_ids) and r.usage.completion_tokens == len(ids)
    assert choice.finish_reason == ("stop" if ids[-1] == tok.eos_token_id else "length")
    entries = choice.logprobs.content
    assert [e.token for e in entries] == [tok.decode([t]) for t in ids]
    assert [e.logprob for e in entries] == pytest.approx(
        forward_logprobs(model, r.prompt_token_ids, ids), abs=1e-4)
    for entry in entries:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert entry.logprob == pytest.approx(tops[0])  # greedy picks the best
        assert bytes(entry.bytes) == entry.token.encode()


def test_stream_equals_one_shot_at_temperature_zero(client):
    extra = {"return_token_ids": True}
    whole = chat(client, logprobs=True, extra_body=extra)
    chunks = list(chat(client, logprobs=True, extra_body=extra, stream=True,
                       stream_options={"include_usage": True}))
    assert chunks[0].prompt_token_ids == whole.prompt_token_ids
    assert chunks[0].choices[0].delta.role == "assistant"
    body = [c for c in chunks if c.choices]
    assert sum((getattr(c.choices[0], "token_ids", None) or [] for c in body), []) == whole.choices[0].token_ids
    assert "".join(c.choices[0].delta.content or "" for c in body) == whole.choices[0].message.content
    streamed_lp = [e.logprob for c in body if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert streamed_lp == [e.logprob for e in whole.choices[0].logprobs.content]
    assert body[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_tokens_as_token_ids(server):
    r = post(server, "/v1/chat/completions", {
        "messages": USER, "max_tokens": 4, "temperature": 0, "logprobs": True, "top_logprobs": 1,
        "return_tokens_as_token_ids": True, "return_token_ids": True}).json()
    entries = r["choices"][0]["logprobs"]["content"]
    assert [e["token"] for e in entries] == [f"token_id:{t}" for t in r["choices"][0]["token_ids"]]
    assert entries[0]["top_logprobs"][0]["token"].startswith("token_id:")


def test_eos_ends_with_stop_and_stays_out_of_the_text(client, tiny):
    _, tok = tiny
    r = chat(client, logit_bias={str(tok.eos_token_id): 100}, extra_body={"return_token_ids": True})
    choice = r.choices[0]
    assert choice.token_ids == [tok.eos_token_id]
    assert choice.finish_reason == "stop" and choice.message.content == ""


def test_seed_makes_sampling_repeatable(client):
    def sample(seed):
        r = chat(client, temperature=1.0, seed=seed, max_tokens=8, extra_body={"return_token_ids": True})
        return r.choices[0].token_ids

    assert sample(7) == sample(7)
    assert len({tuple(sample(s)) for s in (1, 2, 3)}) > 1


@pytest.mark.parametrize("body, fragment", [
    ({"messages": USER, "n": 2}, "n=1"),
    ({"messages": USER, "max_tokens": 5000}, "maximum context length"),
    ({"messages": USER, "top_logprobs": 2}, "logprobs"),
    ({"messages": []}, "messages"),
    ({"messages": USER, "temperature": "hot"}, "temperature"),
    ({"messages": USER, "logit_bias": {"999999": 1}}, "vocabulary"),
])
def test_bad_requests_get_openai_errors(server, body, fragment):
    r = post(server, "/v1/chat/completions", body)
    assert r.status_code == 400
    error = r.json()["error"]
    assert fragment in error["message"] and error["code"] == 400 and error["type"] == "BadRequestError"


def test_sdk_raises_on_bad_requests_and_unknown_routes(client, server):
    with pytest.raises(openai.BadRequestError):
        chat(client, n=2)
    assert requests.post(server.base_url + "/nowhere", json={}, timeout=5).status_code == 404
    raw = requests.post(server.base_url + "/chat/completions", data=b"{not json", timeout=5)
    assert raw.status_code == 400 and "JSON" in raw.json()["error"]["message"]


# --------------------------------------------------------------------------- completions

def test_completion_of_token_ids_continues_the_chat_exactly(server, tiny):
    _, tok = tiny
    ids = prompt_ids(tok)
    chat_r = post(server, "/v1/chat/completions", {
        "messages": USER, "max_tokens": 8, "temperature": 0, "return_token_ids": True}).json()
    comp = post(server, "/v1/completions", {
        "prompt": ids, "max_tokens": 8, "temperature": 0, "return_token_ids": True}).json()
    choice = comp["choices"][0]
    assert choice["prompt_token_ids"] == ids
    assert choice["token_ids"] == chat_r["choices"][0]["token_ids"]
    assert choice["text"] == tok.decode(strip_eos(choice["token_ids"], tok), skip_special_tokens=True)


def test_completion_logprobs_format_and_stream(server, client, tiny):
    model, tok = tiny
    body = {"prompt": "The quick brown", "max_tokens": 6, "temperature": 0, "logprobs": 2,
            "return_token_ids": True}
    whole = post(server, "/v1/completions", body).json()["choices"][0]
    lp = whole["logprobs"]
    assert lp["tokens"] == [tok.decode([t]) for t in whole["token_ids"]]
    assert lp["token_logprobs"] == pytest.approx(
        forward_logprobs(model, whole["prompt_token_ids"], whole["token_ids"]), abs=1e-4)
    assert all(len(top) in (2, 3) and tok_ in top for top, tok_ in zip(lp["top_logprobs"], lp["tokens"]))
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
    stream = client.completions.create(
        model="policy", prompt="The quick brown", max_tokens=6, temperature=0, logprobs=2, stream=True,
        extra_body={"return_token_ids": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == whole["text"]
    assert sum((c.choices[0].token_ids for c in chunks), []) == whole["token_ids"]
    assert chunks[0].choices[0].prompt_token_ids == whole["prompt_token_ids"]
    assert sum((c.choices[0].logprobs.text_offset for c in chunks), []) == lp["text_offset"]


def test_stop_string_cuts_text_but_keeps_the_tokens(server):
    base = {"prompt": "What is", "max_tokens": 12, "temperature": 0, "return_token_ids": True}
    free = post(server, "/v1/completions", base).json()["choices"][0]
    text = free["text"]
    stop = text[3:7]  # likely spans a token boundary
    assert len(stop) == 4 and text.find(stop) == 3
    cut = post(server, "/v1/completions", dict(base, stop=[stop])).json()["choices"][0]
    assert cut["text"] == text[:3]
    assert (cut["finish_reason"], cut["stop_reason"]) == ("stop", stop)
    assert cut["token_ids"] == free["token_ids"][: len(cut["token_ids"])]
    lines = post(server, "/v1/completions", dict(base, stop=[stop], stream=True)).text.split("\n\n")
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert "".join(e["choices"][0]["text"] for e in events) == text[:3]
    assert lines[-2] == "data: [DONE]"
    kept = dict(base, stop=[stop], include_stop_str_in_output=True)
    assert post(server, "/v1/completions", kept).json()["choices"][0]["text"] == text[:7]
    lines = post(server, "/v1/completions", dict(kept, stream=True)).text.split("\n\n")
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert "".join(e["choices"][0]["text"] for e in events) == text[:7]


def test_an_unknown_model_name_is_refused_as_vllm_does(server, client):
    with pytest.raises(openai.NotFoundError, match="The model `gpt-4o` does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=USER, max_tokens=2)
    for path, body in [("/v1/completions", {"prompt": "Hi", "max_tokens": 2}),
                       ("/tokenize", {"prompt": "Hi"}), ("/detokenize", {"tokens": [5]})]:
        refused = post(server, path, dict(body, model="other"))
        assert refused.status_code == 404 and refused.json()["error"]["type"] == "NotFoundError"
        assert post(server, path, body).status_code == 200  # no model named: the served one


def test_batch_of_prompts_gives_one_choice_each(server):
    r = post(server, "/v1/completions", {"prompt": ["Hi", [5, 6, 7]], "max_tokens": 3, "temperature": 0})
    assert [c["index"] for c in r.json()["choices"]] == [0, 1]
    assert r.json()["usage"]["completion_tokens"] == 6


# ------------------------------------------------------------------ live model semantics

def test_serves_in_place_weight_changes_and_restores_train_mode(server, tiny):
    model, _ = tiny
    body = {"messages": USER, "max_tokens": 5, "temperature": 0, "return_token_ids": True}
    before = post(server, "/v1/chat/completions", body).json()["choices"][0]["token_ids"]
    model.train()
    model.model.layers[0].eval()  # a deliberately frozen part must stay as it was
    try:
        with torch.no_grad():
            model.model.norm.weight.neg_()  # logits flip sign: argmax becomes argmin
        after = post(server, "/v1/chat/completions", body).json()["choices"][0]["token_ids"]
        assert model.training and not model.model.layers[0].training and model.model.layers[1].training
    finally:
        with torch.no_grad():
            model.model.norm.weight.neg_()
        model.eval()
    assert after != before
    assert post(server, "/v1/chat/completions", body).json()["choices"][0]["token_ids"] == before


def test_concurrent_requests_each_get_their_own_answer(server):
    prompts = [f"Count to {i}." for i in range(6)]

    def ask(prompt, stream=False):
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 6,
                "temperature": 0, "return_token_ids": True, "stream": stream}
        r = post(server, "/v1/chat/completions", body)
        if not stream:
            return r.json()["choices"][0]["token_ids"]
        events = [json.loads(x[6:]) for x in r.text.split("\n\n") if x.startswith("data: {")]
        return sum((e["choices"][0].get("token_ids") or [] for e in events), [])

    expected = [ask(p) for p in prompts]
    with ThreadPoolExecutor(max_workers=6) as pool:
        got = list(pool.map(ask, prompts * 2, [False] * 6 + [True] * 6))
    assert got == expected * 2


def test_holding_the_lock_pauses_generation(server):
    done = threading.Event()
    body = {"messages": USER, "max_tokens": 2, "temperature": 0}
    with server.lock:
        threading.Thread(target=lambda: (post(server, "/v1/chat/completions", body), done.set()),
                         daemon=True).start()
        assert not done.wait(timeout=0.3)
    assert done.wait(timeout=20)


def test_the_server_keeps_serving_after_an_abandoned_stream(server):
    body = {"messages": USER, "max_tokens": 12, "temperature": 0, "stream": True}
    with requests.post(server.url + "/v1/chat/completions", json=body, stream=True, timeout=10) as r:
        next(r.iter_lines())
    done = threading.Event()
    threading.Thread(target=lambda: (post(server, "/v1/chat/completions", dict(body, stream=False)),
                                     done.set()), daemon=True).start()
    assert done.wait(timeout=20)


def test_a_non_streamed_request_stops_generating_when_its_client_leaves(tiny):
    model, tok = tiny
    lock = threading.Lock()
    api = PolicyAPI(model, tok, ApiConfig(), lock)
    polls = []

    def gone() -> bool:
        polls.append(1)
        return len(polls) >= 3  # checked once the lock is taken, then every few tokens: it leaves after the second
    with pytest.raises(ClientGone, match=f"after {2 * GONE_CHECK_EVERY} tokens"):
        api.chat({"messages": USER, "max_tokens": 500, "temperature": 1.0, "seed": 1, "ignore_eos": True}, gone)
    assert not lock.locked()  # the next request is served at once


def test_peer_closed_sees_a_closed_connection_but_not_a_pipelined_request():
    import socket
    ours, theirs = socket.socketpair()
    with ours, theirs:
        assert not peer_closed(ours)
        theirs.sendall(b"GET /health HTTP/1.1\r\n\r\n")  # the client's next request: still there
        assert not peer_closed(ours)
        ours.recv(100)
        theirs.shutdown(socket.SHUT_WR)
        assert peer_closed(ours)


def test_a_chunked_request_body_is_read(server):
    body = json.dumps({"messages": USER, "max_tokens": 2, "temperature": 0}).encode()
    r = requests.post(server.url + "/v1/chat/completions", data=iter([body[:10], body[10:]]), timeout=30,
                      headers={"Content-Type": "application/json"})  # a generator: sent chunked
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"


def test_processed_logprobs_follow_the_temperature(tiny):
    model, tok = tiny
    api = PolicyAPI(model, tok, ApiConfig(logprobs_mode="processed_logprobs"), threading.Lock())
    r = api.chat({"messages": USER, "max_tokens": 4, "temperature": 0.5, "seed": 3, "logprobs": True,
                  "return_token_ids": True})
    ids, prompt = r["choices"][0]["token_ids"], r["prompt_token_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1].float()
    expected = [float(torch.log_softmax(logits[j] / 0.5, -1)[t]) for j, t in enumerate(ids)]
    assert [e["logprob"] for e in r["choices"][0]["logprobs"]["content"]] == pytest.approx(expected, abs=1e-4)


# -------------------------------------------------------------- tool calls end to end

class ForcedModel(torch.nn.Module):
    """Wraps the tiny model and makes it emit a scripted token sequence (then eos)."""

    def __init__(self, inner, script):
        super().__init__()
        self.inner, self.script, self.step = inner, list(script), 0
        self.config, self.generation_config = inner.config, inner.generation_config

    def forward(self, input_ids, **kwargs):
        out = self.inner(input_ids=input_ids, **kwargs)
        self.step = 0 if input_ids.shape[1] > 1 else self.step + 1
        if self.step < len(self.script):
            out.logits[0, -1, self.script[self.step]] += 1000.0
        return out


SCRIPTED = ('<think>Weather needed.</think>Let me check.<tool_call>\n'
            '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>')


@pytest.fixture(scope="module")
def scripted_client(tiny):
    model, tok = tiny
    forced = ForcedModel(model, tok.encode(SCRIPTED) + [tok.eos_token_id])
    with PolicyServer(forced, tok, max_new_tokens=64) as srv, \
            openai.OpenAI(base_url=srv.base_url, api_key="x", max_retries=0) as c:
        yield c


def test_tool_calls_one_shot(scripted_client):
    r = chat(scripted_client, tools=TOOLS, max_tokens=64)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    assert choice.message.model_extra["reasoning_content"] == "Weather needed."
    calls = choice.message.tool_calls
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]
    assert all(c.type == "function" and c.id.startswith("chatcmpl-tool-") for c in calls)


def test_tool_calls_streamed(scripted_client):
    chunks = list(chat(scripted_client, tools=TOOLS, max_tokens=64, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == "Let me check."
    assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == "Weather needed."
    calls = [tc for d in deltas for tc in d.tool_calls or []]
    assert [(tc.index, tc.function.name) for tc in calls] == [(0, "get_weather"), (1, "get_weather")]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_without_tools_the_markup_stays_text(scripted_client):
    r = chat(scripted_client, max_tokens=64)
    assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
    assert r.choices[0].message.content.startswith("Let me check.<tool_call>\n{")


# ----------------------------------------------------------------- pure parts, tables

CALL = '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
F = ParsedToolCall("f", '{"x": 1}')


@pytest.mark.parametrize("text, content, reasoning, calls", [
    ("plain", "plain", None, ()),
    ("", None, None, ()),
    (CALL, None, None, (F,)),
    ("Hi " + CALL, "Hi ", None, (F,)),
    (CALL + "\n" + CALL, None, None, (F, F)),
    (CALL + " trailing", " trailing", None, (F,)),
    ("<tool_call>\nnot json\n</tool_call>", "<tool_call>\nnot json\n</tool_call>", None, ()),
    ('<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', None, ()),
    ('<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>', None, None, (F,)),
    ('<tool_call>{"name": "f", "parameters": {"x": 1}}</tool_call>', None, None, (F,)),
    ("<think>r</think>answer", "answer", "r", ()),
    ("<think>r</think>" + CALL, None, "r", (F,)),
    ("<think>unfinished", None, "unfinished", ()),
    ("x<think>r</think>", "x<think>r</think>", None, ()),
    ('<tool_call>{"name": "g", "arguments": {"é": "ü"}}</tool_call>', None, None,
     (ParsedToolCall("g", '{"é": "ü"}'),)),
])
def test_parse_assistant_text(text, content, reasoning, calls):
    parsed = parse_assistant_text(text)
    assert (parsed.content, parsed.reasoning, parsed.tool_calls) == (content, reasoning, calls)


def test_without_tools_calls_are_not_parsed():
    assert parse_assistant_text("a" + CALL, tools=False).content == "a" + CALL


@pytest.mark.parametrize("text", [
    "plain text", "Hi " + CALL + " bye", "<think>r</think>answer " + CALL,
    "<think>never closed", "<thinking is not a tag", "<tool_call>\nbad\n</tool_call> after",
])
@pytest.mark.parametrize("tools", [True, False])
def test_streamed_parts_are_prefixes_of_the_final_parse(text, tools):
    final = parse_assistant_text(text, tools=tools)
    for cut in range(len(text) + 1):
        reasoning, content = streamable_parts(text[:cut], tools=tools)
        assert (final.reasoning or "").startswith(reasoning)
        assert (final.content or "").startswith(content)


def params(**kw):
    return SamplingParams(max_tokens=4, **kw)


@pytest.mark.parametrize("kw, allowed", [
    ({"temperature": 0}, {3}),
    ({"temperature": 1.0, "top_k": 2}, {3, 2}),
    ({"temperature": 1.0, "top_p": 0.5}, {3}),
    ({"temperature": 0, "logit_bias": ((0, 100.0),)}, {0}),
])
def test_sample_token_respects_the_filters(kw, allowed):
    logits = torch.tensor([0.0, 1.0, 2.0, 4.0])
    gen = torch.Generator().manual_seed(0)
    picked = {sample_token(logits, params(**kw), gen).token_id for _ in range(30)}
    assert picked <= allowed and picked


def test_raw_and_processed_logprobs():
    logits = torch.tensor([0.0, 1.0, 2.0, 4.0])
    gen = torch.Generator().manual_seed(0)
    p = params(temperature=0, num_logprobs=2)
    raw = sample_token(logits, p, gen, "raw_logprobs")
    assert raw.logprob == pytest.approx(float(torch.log_softmax(logits, -1)[3]))
    assert [t for t, _ in raw.top] == [3, 2]
    hot = sample_token(logits, params(temperature=2.0, top_k=1), gen, "processed_logprobs")
    assert hot.token_id == 3 and hot.logprob == pytest.approx(0.0)


class CharTokenizer:
    """One character per token id (ord), so tests can choose the token boundaries."""

    def decode(self, ids, **_):
        return "".join(chr(i) for i in ids)


@pytest.mark.parametrize("text, stop, keep, released, hit", [
    ("hello world", ("lo w",), False, "hel", "lo w"),
    ("hello world", ("lo w",), True, "hello w", "lo w"),
    ("hello world", ("xyz",), False, "hello world", None),
    ("hello world", ("o", "ll"), False, "he", "ll"),
    ("hello world", ("o", "ll"), True, "hell", "ll"),
])
def test_text_tracker_cuts_at_stop_strings(text, stop, keep, released, hit):
    tracker = TextTracker(CharTokenizer(), stop, keep_stop=keep)
    out, found = "", None
    for n in range(1, len(text) + 1):
        piece, found = tracker.update([ord(c) for c in text[:n]], final=n == len(text))
        out += piece
        assert released.startswith(out)
        if found:
            break
    assert (out, found) == (released, hit)


def test_text_tracker_waits_for_whole_characters():
    tracker = TextTracker(CharTokenizer(), ())
    assert tracker.update([ord("a"), 0xFFFD], final=False) == ("a", None)
    assert tracker.update([ord("a"), ord("é")], final=False) == ("é", None)


@pytest.mark.parametrize("body, message", [
    ({"max_completion_tokens": 0}, "at least 1"),
    ({"top_p": 0}, "top_p"),
    ({"stop": [1]}, "stop"),
    ({"seed": 1.5}, "seed"),
    ({"stop_token_ids": ["a"]}, "stop_token_ids"),
])
def test_sampling_from_body_rejects(body, message):
    with pytest.raises(BadRequest, match=message):
        sampling_from_body(body, chat=True, prompt_len=5, max_model_len=100, default_max_tokens=10,
                           vocab_size=50)


def test_sampling_defaults():
    chat_p = sampling_from_body({}, chat=True, prompt_len=95, max_model_len=100, default_max_tokens=10,
                                vocab_size=50)
    comp_p = sampling_from_body({"logprobs": 0}, chat=False, prompt_len=5, max_model_len=100,
                                default_max_tokens=10, vocab_size=50)
    assert (chat_p.max_tokens, chat_p.temperature, chat_p.num_logprobs) == (5, 1.0, None)
    assert (comp_p.max_tokens, comp_p.num_logprobs) == (16, 0)


@pytest.mark.parametrize("spelling", ["as served", "localhost"])
def test_agent_rollout_returns_only_once_no_generation_runs_or_waits(tiny, spelling):
    # Agents killed at their timeout mid-call: deploy() returns while the server goes on generating (it sees a
    # client gone only between tokens), another call queued for its turn, the trainer's own model in eval mode
    # while it generates. TRL trains right after.
    from types import SimpleNamespace

    from rollouttap.trainer_hooks.rollout import agent_rollout
    model, tok = tiny
    forward = model.forward

    class Slow(torch.nn.Module):  # the live model, 50 ms a token (a larger model on CPU)
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, *args, **kwargs):
            threading.Event().wait(0.05)
            return forward(*args, **kwargs)

        def __getattr__(self, name):
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(model, name)

    served = Slow()
    served.train()
    body = {"model": "policy", "messages": USER, "max_tokens": 10, "ignore_eos": True}
    with PolicyServer(served, tok, max_new_tokens=20) as srv:
        calls = [threading.Thread(target=post, args=(srv, "/v1/chat/completions", body)) for _ in range(2)]

        def deploy(prompts):  # the agents are done; one call of theirs generates, another waits for its turn
            for call in calls:
                call.start()
            while not (srv.lock.locked() and srv.api._in_flight == 2):
                threading.Event().wait(0.005)
            return []

        url = srv.base_url if spelling == "as served" else srv.base_url.replace("127.0.0.1", "localhost")
        manager = SimpleNamespace(model_url=url, eos_token_id=2, deploy=deploy)
        agent_rollout(manager, eos_token_id=2, check_policy=False, temperature_check="off")([], SimpleNamespace())
        assert served.training and srv.api._in_flight == 0 and not srv.lock.locked()
        for call in calls:
            call.join(30)


def test_a_request_whose_client_left_while_it_waited_for_its_turn_generates_nothing(tiny):
    from rollouttap.trainer_hooks.generation import SamplingParams as Params
    model, tok = tiny
    with PolicyServer(model, tok, max_new_tokens=4) as srv:
        stream = srv.api.locked_stream(tok.encode("hi"), Params(max_tokens=4), gone=lambda: True)
        with pytest.raises(ClientGone, match="before its request's turn"):
            next(stream)
        assert not srv.lock.locked()


def test_sampling_fields_the_server_does_not_honour_are_logged_once_each(caplog):
    # vLLM would honour them: an agent relying on min_tokens or response_format samples otherwise here.
    import logging

    from rollouttap.trainer_hooks import openai_params
    openai_params._said.clear()

    def read(body):
        sampling_from_body(body, chat=True, prompt_len=5, max_model_len=100, default_max_tokens=10, vocab_size=50)
    with caplog.at_level(logging.WARNING, logger="rollouttap.trainer_hooks.openai_params"):
        read({"presence_penalty": 0, "response_format": {"type": "text"}, "min_p": 0.0})  # as good as unset
        assert not caplog.records
        read({"min_tokens": 6, "repetition_penalty": 1.5})
        read({"min_tokens": 3, "response_format": {"type": "json_object"}})
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and "min_tokens, repetition_penalty" in said[0] and "response_format" in said[1]
    assert "min_tokens" not in said[1]
