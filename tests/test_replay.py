"""Offline replay: a recorded multi-turn agent re-run against its recorded answers, with the model server gone.

Real processes: ScriptedUpstream as the model, mitmdump with the capture addon to record, then mitmdump with the
capture and replay addons (and no upstream at all) to replay. The matching logic is tested as pure tables.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import pytest
import requests

from conftest import settled_flows, start_proxy, wait_for
from rollouttap.addon.replay import DIVERGED_STATUS, agent_view, feed_stream, recorded_response
from rollouttap.addon.replay_book import (
    Recorded, ReplayBook, capture_injected, mismatch, recorded_requests, request_diff,
)
from rollouttap.manager.proxy import ProxyProcess, free_port
from rollouttap.manager.replay import model_hosts_of, replay_agent, target_url
from rollouttap.store import Store, decode_body, new_token

# A three-turn tool-using agent: call 0 asks (the model calls the calculator), call 1 sends the tool result,
# call 2 asks for a goodbye. CHANGE_AT=k alters the new user text of call k; CALLS=n stops after n calls.
# Prints one line per call: index, status, a hash of the raw body it received, and the reply it read.
AGENT = r'''
import hashlib, json, os, sys, urllib.error, urllib.request
base, stream = sys.argv[1], "--stream" in sys.argv
change_at, calls = int(os.environ.get("CHANGE_AT", "-1")), int(os.environ.get("CALLS", "3"))
tools = [{"type": "function", "function": {"name": "calc", "description": "evaluate arithmetic",
          "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                         "required": ["expression"]}}}]
messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "what is 2+3?"}]

def post(body):
    req = urllib.request.Request(base + "/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": "Bearer sk-agent"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()

def reply_of(raw):
    if not stream:
        return json.loads(raw)["choices"][0]["message"]
    content, calls_by_index = "", {}
    for line in raw.decode().splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        for choice in json.loads(line[6:]).get("choices", []):
            delta = choice.get("delta") or {}
            content += delta.get("content") or ""
            for tc in delta.get("tool_calls") or []:
                slot = calls_by_index.setdefault(tc["index"], {"id": None, "type": "function",
                                                               "function": {"name": "", "arguments": ""}})
                slot["id"] = tc.get("id") or slot["id"]
                fn = tc.get("function") or {}
                slot["function"]["name"] += fn.get("name") or ""
                slot["function"]["arguments"] += fn.get("arguments") or ""
    message = {"role": "assistant", "content": content or None}
    if calls_by_index:
        message["tool_calls"] = [calls_by_index[i] for i in sorted(calls_by_index)]
    return message

failed = False
for i in range(calls):
    if i == 2:
        messages.append({"role": "user", "content": "say goodbye" if change_at == 2 else "say bye"})
    if i == change_at and i != 2:
        messages[-1] = {**messages[-1], "content": str(messages[-1]["content"]) + " (changed)"}
    body = {"model": "policy", "messages": messages, "stream": stream, "tools": tools}
    if i == 2:
        body["tool_choice"] = "none"
    status, raw = post(body)
    if status != 200:
        print(i, "ERR", status, flush=True)
        failed = True
        continue
    message = reply_of(raw)
    print(i, status, hashlib.sha256(raw).hexdigest()[:16], json.dumps(message, sort_keys=True), flush=True)
    messages.append({k: v for k, v in message.items() if k in ("role", "content", "tool_calls")})
    for tc in message.get("tool_calls") or []:
        result = str(eval(json.loads(tc["function"]["arguments"])["expression"]))
        messages.append({"role": "tool", "tool_call_id": tc["id"], "content": result})
sys.exit(3 if failed else 0)
'''


@dataclass
class Recording:
    """A store made by a real run: agents with their commands and what each printed."""
    store: Path
    base_url: str
    upstream_host: str
    commands: dict[str, list[str]] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    run_id: str = ""


def agent_command(script: Path, base_url: str, *, stream: bool = False) -> list[str]:
    return [sys.executable, str(script), base_url] + (["--stream"] if stream else [])


def run_agent(proxy, store: Path, agent_id: str, command: list[str], run_id: str, **env: str) -> str:
    """Register the agent, run it through the proxy with credentials, record how it ended; its stdout."""
    import subprocess
    token = new_token()
    with Store(store) as s:
        s.register_agent(agent_id, token=token, run_id=run_id, meta={"prompt": "what is 2+3?"})
    full_env = {k: v for k, v in os.environ.items() if k != "ROLLOUTTAP_AGENT_ID"}
    full_env.update(proxy.env(agent_id, token), **env)
    proc = subprocess.run(command, env=full_env, capture_output=True, text=True, timeout=60)
    with Store(store) as s:
        s.agent_ended(agent_id, "ok" if proc.returncode == 0 else "failed", {"exit_code": proc.returncode})
    assert proc.returncode == 0, proc.stderr
    settled_flows(store, agent_id=agent_id)
    return proc.stdout


def record(tmp: Path, confdir: Path, agents: dict[str, bool],
           extra: Callable[[ProxyProcess, Recording], None] | None = None, **proxy_options: Any) -> Recording:
    """Record each agent (name -> streamed?) through a real proxy and ScriptedUpstream, then stop both;
    ``extra`` runs while both are up."""
    from rollouttap.testing.upstream import ScriptedUpstream
    script = tmp / "agent.py"
    script.write_text(AGENT)
    with ScriptedUpstream(script="reasoning") as upstream:
        host = upstream.url.split("://", 1)[1]
        rec = Recording(tmp / "runs.db", upstream.base_url, host, run_id="run-" + uuid.uuid4().hex[:6])
        with start_proxy(rec.store, confdir, model_hosts=(host,), **proxy_options) as proxy:
            for name, stream in agents.items():
                rec.commands[name] = agent_command(script, upstream.base_url, stream=stream)
                rec.outputs[name] = run_agent(proxy, rec.store, name, rec.commands[name], rec.run_id)
            if extra is not None:
                extra(proxy, rec)
    return rec


def extra_traffic(proxy, rec: Recording) -> None:
    """A chat call to a refused upstream (agent 'broken'), a /completions call (agent 'completer'), and an
    unattributed request."""
    dead = f"http://127.0.0.1:{free_port()}/v1/chat/completions"
    resp = requests.post(dead, json={"model": "m", "messages": [{"role": "user", "content": "hello?"}]},
                         headers={"X-Agent-ID": "broken"}, proxies={"http": proxy.url}, timeout=10)
    assert resp.status_code == 502
    resp = requests.post(rec.base_url + "/completions", json={"model": "m", "prompt": "once upon a time"},
                         headers={"X-Agent-ID": "completer"}, proxies={"http": proxy.url}, timeout=10)
    assert resp.status_code == 200
    settled_flows(rec.store, agent_id="completer")
    requests.get(rec.base_url.removesuffix("/v1") + "/health", proxies={"http": proxy.url}, timeout=10)
    settled_flows(rec.store, agent_id="broken")
    with Store(rec.store) as s:
        wait_for(lambda: [f for f in s.flows(unattributed=True) if f.state == "done"], what="unattributed flow")


@pytest.fixture(scope="module")
def recording(tmp_path_factory, confdir) -> Recording:
    return record(tmp_path_factory.mktemp("recorded"), confdir, {"plain": False, "streamer": True})


# -- real replays --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("agent", ["plain", "streamer"])
def test_replay_reproduces_outputs_offline_and_is_itself_captured(recording, confdir, tmp_path, agent):
    out = tmp_path / "replay.db"
    result = replay_agent(recording.store, agent, recording.commands[agent], out=out, confdir=confdir,
                          capture_output=True, timeout=60)
    assert result.divergence is None and result.exit_code == 0, (result.stderr, result.divergence)
    assert result.ok and result.answered == result.recorded == result.requests == 3
    # Byte-identical bodies: the hashes the agent printed match the recorded run's.
    assert result.stdout == recording.outputs[agent]
    assert "The answer is 5." in result.stdout
    replayed = settled_flows(out, agent_id=result.replay_agent_id)
    with Store(recording.store) as s:
        original = s.flows(agent_id=agent)
    assert [f.request_json()["messages"] for f in replayed] == [f.request_json()["messages"] for f in original]
    # The replay proxy asked for token ids again, so the replay store holds the recorded ids and streams.
    assert all(f.attribution == "credentials" and f.meta.get("injected") for f in replayed)
    assert [f.response_body for f in replayed] == [f.response_body for f in original]
    with Store(out) as s:
        entry = s.agent(result.replay_agent_id)
    assert entry.status == "ok" and entry.meta["replay_of"] == agent and entry.meta["unreplayable"] == []


def test_a_recording_made_without_logprobs_replays(tmp_path, confdir):
    # Its proxy asked for token ids alone: the replay's asks the same, and what it adds is never the agent's.
    rec = record(tmp_path, confdir, {"plain": False, "streamer": True}, logprobs=False)
    for agent in ("plain", "streamer"):
        result = replay_agent(rec.store, agent, rec.commands[agent], out=tmp_path / f"{agent}.db", confdir=confdir,
                              capture_output=True, timeout=60)
        assert result.ok and result.answered == 3, (result.stderr, result.divergence)
        assert result.stdout == rec.outputs[agent]
        replayed = settled_flows(tmp_path / f"{agent}.db", agent_id=result.replay_agent_id)
        assert all("logprobs" not in f.meta["injected"] for f in replayed)


def test_the_agents_own_fields_are_compared_whatever_the_proxy_injects():
    # The replay compares what the agent sent (capture keeps it for the replay before adding its fields): a field
    # the agent now sends itself is a change, even one the proxy would add, and an explicit null it sent stays null.
    entry = _rec(0, {"model": "m", "top_logprobs": None}, injected={"return_token_ids": True})
    assert mismatch(entry, "POST", "/v1/chat/completions", b'{"model": "m", "top_logprobs": null}') is None
    for own in (b'{"model": "m", "top_logprobs": null, "return_token_ids": 1}',
                b'{"model": "m", "top_logprobs": 0}'):
        assert mismatch(entry, "POST", "/v1/chat/completions", own) == "request body differs"


@pytest.mark.parametrize("agent", ["plain", "streamer"])
def test_replay_without_token_id_injection_strips_the_recorded_ids_itself(recording, confdir, tmp_path, agent):
    out = tmp_path / "replay.db"
    result = replay_agent(recording.store, agent, recording.commands[agent], out=out, confdir=confdir,
                          model_hosts=(), capture_output=True, timeout=60)
    assert result.ok, (result.stderr, result.divergence)
    assert result.stdout == recording.outputs[agent]  # the agent never sees the ids the proxy asked for
    replayed = settled_flows(out, agent_id=result.replay_agent_id)
    assert not any(f.meta.get("injected") for f in replayed)
    assert all(b"prompt_token_ids" in f.response_body and b'"prompt_token_ids":[' not in f.response_body
               for f in replayed)


def test_https_agent_recorded_through_a_route_replays_without_network(tmp_path, confdir):
    """The openai SDK streaming to https://api.openai.com (routed to the scripted model when recorded); the
    replay has neither the route nor the model: the proxy's CA and the recording answer everything."""
    from rollouttap.testing.upstream import ScriptedUpstream
    store = tmp_path / "runs.db"
    command = [sys.executable, str(Path(__file__).with_name("agent_clients.py")), "openai",
               "https://api.openai.com/v1", "--marker", "zebra", "--calls", "2", "--stream"]
    with ScriptedUpstream() as upstream:
        with start_proxy(store, confdir, routes=(f"api.openai.com={upstream.url}",)) as proxy:
            recorded = run_agent(proxy, store, "oa", command, "run-https")
    result = replay_agent(store, "oa", command, out=tmp_path / "r.db", confdir=confdir, capture_output=True,
                          timeout=60)
    assert result.ok and result.answered == 2, (result.stderr, result.divergence)
    assert result.stdout == recorded == "echo: say zebra\necho: say zebra\n"
    posts = [f for f in settled_flows(tmp_path / "r.db", agent_id=result.replay_agent_id) if f.method == "POST"]
    assert [f.url for f in posts] == ["https://api.openai.com/v1/chat/completions"] * 2


@pytest.mark.parametrize("stream", [False, True])
def test_a_responses_agent_on_a_hard_wired_https_endpoint_records_ids_and_replays(tmp_path, confdir, stream):
    """The openai SDK's client.responses (the Agents SDK's default) to https://api.openai.com, routed to the
    scripted model when recorded: its calls carry token ids, and the replay answers them offline."""
    from rollouttap.manager.conversation import build_conversation
    from rollouttap.testing.upstream import ScriptedUpstream
    store = tmp_path / "runs.db"
    command = [sys.executable, str(Path(__file__).with_name("agent_tool_loop.py")), "https://api.openai.com/v1",
               "What is 3 + 4?", "--responses", *(["--stream"] if stream else [])]
    with ScriptedUpstream() as upstream:
        with start_proxy(store, confdir, routes=(f"api.openai.com={upstream.url}",)) as proxy:
            recorded = run_agent(proxy, store, "ra", command, "run-resp")
    assert recorded.strip() == "The answer is 7."
    calls = build_conversation(settled_flows(store, agent_id="ra")).responses_calls
    assert len(calls) == 2 and all(c.prompt_token_ids and c.completion_token_ids for c in calls)
    result = replay_agent(store, "ra", command, out=tmp_path / "r.db", confdir=confdir, capture_output=True,
                          timeout=60)
    assert result.ok and result.answered == 2 and result.divergence is None, (result.stderr, result.divergence)
    assert result.stdout == recorded


def test_changed_agent_diverges_at_the_changed_call_with_a_diff(recording, confdir, tmp_path):
    env = {**os.environ, "CHANGE_AT": "2"}
    result = replay_agent(recording.store, "plain", recording.commands["plain"], out=tmp_path / "r.db",
                          confdir=confdir, env=env, capture_output=True, timeout=60)
    div = result.divergence
    assert div is not None and not result.ok
    assert div["index"] == 2 and div["recorded_index"] == 2 and div["reason"] == "request body differs"
    assert '-      "content": "say bye",' in div["diff"] and '+      "content": "say goodbye",' in div["diff"]
    assert "return_token_ids" not in div["diff"]  # the proxy's own fields are not a difference
    lines = result.stdout.splitlines()
    assert lines[:2] == recording.outputs["plain"].splitlines()[:2]
    assert lines[2] == f"2 ERR {DIVERGED_STATUS}" and result.exit_code == 3
    with Store(tmp_path / "r.db") as s:
        assert s.agent(result.replay_agent_id).status == "failed"


def test_requests_after_a_divergence_are_refused(recording, confdir, tmp_path):
    env = {**os.environ, "CHANGE_AT": "0"}
    result = replay_agent(recording.store, "plain", recording.commands["plain"], out=tmp_path / "r.db",
                          confdir=confdir, env=env, capture_output=True, timeout=60)
    assert result.divergence["index"] == 0 and result.answered == 0
    assert result.stdout.splitlines() == [f"{i} ERR {DIVERGED_STATUS}" for i in range(3)]
    flows = settled_flows(tmp_path / "r.db", agent_id=result.replay_agent_id)
    assert [f.status_code for f in flows] == [DIVERGED_STATUS] * 3


def test_agent_stopping_early_is_a_divergence(recording, confdir, tmp_path):
    env = {**os.environ, "CALLS": "2"}
    result = replay_agent(recording.store, "plain", recording.commands["plain"], out=tmp_path / "r.db",
                          confdir=confdir, env=env, capture_output=True, timeout=60)
    assert result.exit_code == 0 and result.answered == 2
    assert result.divergence["index"] == 2 and result.divergence["recorded_index"] == 2
    assert "stopped after 2 requests" in result.divergence["reason"]


def test_a_timed_out_replay_ends_though_its_children_hold_the_captured_pipes(recording, confdir, tmp_path):
    started = time.monotonic()
    result = replay_agent(recording.store, "plain", ["sh", "-c", "sleep 60 & sleep 60"], out=tmp_path / "r.db",
                          confdir=confdir, timeout=1, capture_output=True)
    assert result.timed_out and time.monotonic() - started < 30


def test_replay_refuses_its_own_store_and_unknown_agents(recording, tmp_path):
    from rollouttap.errors import ConfigError, NotFoundError
    with pytest.raises(ConfigError, match="another store"):
        replay_agent(recording.store, "plain", ["true"], out=recording.store)
    link = tmp_path / "same.db"
    os.link(recording.store, link)
    with pytest.raises(ConfigError, match="another store"):  # a hard link to it
        replay_agent(recording.store, "plain", ["true"], out=link)
    for side in ("-wal", "-shm", "-journal"):  # SQLite deletes these when it checkpoints: the replay would be lost
        with pytest.raises(ConfigError, match="SQLite keeps beside a store"):
            replay_agent(recording.store, "plain", ["true"], out=tmp_path / f"other.db{side}")
    with pytest.raises(NotFoundError, match="no agent 'nobody' in"):  # as resend says it: not an option's fault
        replay_agent(recording.store, "nobody", ["true"], out=tmp_path / "r.db")


def test_replay_records_its_command_line_redacted_as_run_does(recording, confdir, tmp_path):
    secret = "sk-REPLAYSECRET0123456789"
    command = ["env", f"OPENAI_API_KEY={secret}", *recording.commands["plain"]]
    out = tmp_path / "r.db"
    result = replay_agent(recording.store, "plain", command, out=out, confdir=confdir, capture_output=True,
                          timeout=60)
    assert result.ok, (result.stderr, result.divergence)
    with Store(out) as s:
        recorded = s.agent(result.replay_agent_id).meta["command"]
    assert secret not in recorded and "OPENAI_API_KEY=<redacted sha256:" in recorded
    assert recorded.endswith(recording.commands["plain"][-1])  # the rest of the command line stays readable
    written = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("r.db"))
    assert secret.encode() not in written


def test_an_agent_that_reads_its_base_url_from_the_environment_gets_the_recorded_one(recording, confdir, tmp_path):
    # As AgentManager gives it to its agents (OPENAI_BASE_URL): the replay gives the recorded server's.
    command = ["sh", "-c", 'exec "$0" "$1" "$OPENAI_BASE_URL"', *recording.commands["plain"][:2]]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "ROLLOUTTAP_"))}
    result = replay_agent(recording.store, "plain", command, out=tmp_path / "r.db", confdir=confdir, env=env,
                          capture_output=True, timeout=60)
    assert result.ok and result.stdout == recording.outputs["plain"], (result.stderr, result.divergence)


def test_replay_model_env_fills_only_what_the_environment_lacks(recording):
    from rollouttap.manager.replay import replay_model_env
    with Store(recording.store) as s:
        flows = s.flows(agent_id="plain")
    given = replay_model_env(flows, {})
    assert given["OPENAI_BASE_URL"] == given["OPENAI_API_BASE"] == recording.base_url and given["OPENAI_API_KEY"]
    assert "OPENAI_API_KEY" not in replay_model_env(flows, {"OPENAI_API_KEY": "sk-mine"})
    assert replay_model_env(flows, {"OPENAI_BASE_URL": "http://elsewhere/v1"}) == {}  # the caller's stays
    assert replay_model_env([f for f in flows if f.path == "/health"], {}) == {}  # no model call: nothing
    from dataclasses import replace as with_fields
    # Base-URL mode: the flow holds the server's URL, as the reverse listener sent the call on.
    assert replay_model_env([with_fields(f, attribution="path") for f in flows], {}) == given
    # A hard-wired endpoint a route sent on: the agent had no base URL, and gets none.
    routed = [with_fields(f, meta={**f.meta, "routed_from": "https://api.openai.com/v1/chat/completions"})
              for f in flows]
    assert replay_model_env(routed, {}) == {}


def test_model_hosts_come_from_the_recording(recording):
    with Store(recording.store) as s:
        assert model_hosts_of(s.flows(agent_id="plain")) == (recording.upstream_host,)


# -- pure tables ---------------------------------------------------------------------------------------------------

def _rec(index: int, body: dict | bytes, *, path: str = "/v1/chat/completions", method: str = "POST",
         injected: dict | None = None, t: tuple[float, float] | None = None) -> Recorded:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    start, end = t or (float(index), float(index) + 0.5)
    return Recorded(index, f"f{index}", method, (path,), raw, [("content-type", "application/json")],
                    injected or {}, 200, [("content-type", "application/json")], b"{}", None, start, end)


INJ = {"return_token_ids": True, "logprobs": True}


@pytest.mark.parametrize("method, path, body, expected", [
    ("POST", "/v1/chat/completions", {"m": [1], "return_token_ids": True, "logprobs": True},
     "request body differs"),  # the agent's own fields: the proxy's are never in the body compared
    ("post", "/v1/chat/completions", {"m": [1]}, None),
    ("POST", "/v1/completions", {"m": [1]}, "expected POST /v1/chat/completions, got POST /v1/completions"),
    ("GET", "/v1/chat/completions", {"m": [1]}, "expected POST /v1/chat/completions, got GET /v1/chat/completions"),
    ("POST", "/v1/chat/completions", {"m": [2]}, "request body differs"),
])
def test_mismatch(method, path, body, expected):
    entry = _rec(0, {"m": [1]}, injected=INJ)
    assert mismatch(entry, method, path, json.dumps(body, indent=1).encode()) == expected


@pytest.mark.parametrize("injected, answer, expected", [
    # recorded by a proxy with logprobs off: only the token ids were asked for, and are hidden again
    ({"return_token_ids": True},
     {"id": "c", "prompt_token_ids": [1, 2], "choices": [{"index": 0, "token_ids": [3], "logprobs": None}]},
     {"id": "c", "prompt_token_ids": None, "choices": [{"index": 0, "token_ids": None, "logprobs": None}]}),
    ({"return_token_ids": True, "logprobs": True, "return_tokens_as_token_ids": True},
     {"id": "c", "prompt_token_ids": [1], "choices": [{"index": 0, "token_ids": [3], "logprobs": {"content": []}}]},
     {"id": "c", "prompt_token_ids": None, "choices": [{"index": 0, "token_ids": None, "logprobs": None}]}),
])
def test_agent_view_strips_what_the_recording_proxy_injected(injected, answer, expected):
    entry = replace(_rec(0, {"messages": []}, injected=injected),
                    response_body=json.dumps(answer, separators=(",", ":")).encode())
    assert json.loads(agent_view(entry)) == expected


def test_agent_view_strips_a_stream_recorded_before_the_proxy_asked_streams_for_their_usage():
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [{"index": 0, "delta": {"content": "hi"}, "logprobs": None, "finish_reason": None,
                          "token_ids": [3]}]}
    sse = f"data: {json.dumps(chunk, separators=(',', ':'))}\n\ndata: [DONE]\n\n".encode()
    entry = replace(_rec(0, {"messages": [], "stream": True}, injected={"return_token_ids": True}),
                    response_headers=[("content-type", "text/event-stream")], response_body=sse)
    assert agent_view(entry) == sse.replace(b'"token_ids":[3]', b'"token_ids":null')


def test_a_compressed_recorded_answer_is_stripped_as_capture_stripped_it_live():
    import gzip

    from rollouttap.addon.replay import as_the_agent_saw
    answer = {"id": "c", "prompt_token_ids": [1, 2], "choices": [{"index": 0, "token_ids": [3], "logprobs": None}]}
    entry = replace(_rec(0, {"messages": []}, injected={"return_token_ids": True}),
                    response_headers=[("content-type", "application/json"), ("content-encoding", "gzip")],
                    response_body=gzip.compress(json.dumps(answer).encode()))
    resp = recorded_response(entry, entry.response_body)
    as_the_agent_saw(entry, resp)  # re-encoded, as capture's strip re-encoded it live
    assert resp.headers["content-encoding"] == "gzip" and int(resp.headers["content-length"]) == len(resp.raw_content)
    assert json.loads(gzip.decompress(resp.raw_content)) == {
        "id": "c", "prompt_token_ids": None, "choices": [{"index": 0, "token_ids": None, "logprobs": None}]}
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [{"index": 0, "delta": {"content": "hi"}, "logprobs": None, "finish_reason": None,
                          "token_ids": [3]}]}
    sse = f"data: {json.dumps(chunk, separators=(',', ':'))}\n\ndata: [DONE]\n\n".encode()
    stream = replace(_rec(0, {"messages": [], "stream": True}, injected={"return_token_ids": True}),
                     response_headers=[("content-type", "text/event-stream"), ("content-encoding", "gzip")],
                     response_body=gzip.compress(sse))
    resp = recorded_response(stream, stream.response_body)
    as_the_agent_saw(stream, resp)  # decoded, as capture passed it on live: plain, no content-encoding
    assert "content-encoding" not in resp.headers and "transfer-encoding" not in resp.headers
    assert resp.raw_content == sse.replace(b'"token_ids":[3]', b'"token_ids":null')
    assert int(resp.headers["content-length"]) == len(resp.raw_content)


@pytest.mark.parametrize("recorded", [
    "/v1beta/models/m:generateContent?key=redacted-sha256-0123456789ab&alt=sse",
    "/v1beta/models/m:generateContent?key=<redacted sha256:0123456789ab>&alt=sse",  # stores from before
])
def test_a_secret_query_value_matches_whatever_key_the_replay_uses(recorded):
    entry = _rec(0, {"m": [1]}, path=recorded)
    assert mismatch(entry, "POST", "/v1beta/models/m:generateContent?key=DUMMY&alt=sse", b'{"m": [1]}') is None
    assert mismatch(entry, "POST", "/v1beta/models/m:generateContent?key=DUMMY&alt=json", b'{"m": [1]}') \
        is not None


@pytest.mark.parametrize("live", [
    {"stream": 1, "temperature": 1, "max_tokens": 0}, {"stream": True, "temperature": 1.0, "max_tokens": 0},
    {"stream": True, "temperature": 1, "max_tokens": False}, {"stream": True, "temperature": 1, "max_tokens": [0]},
])
def test_mismatch_tells_json_types_apart(live):
    entry = _rec(0, {"stream": True, "temperature": 1, "max_tokens": 0})
    assert mismatch(entry, "POST", "/v1/chat/completions", json.dumps(live).encode()) == "request body differs"
    same = {"stream": True, "temperature": 1, "max_tokens": 0}
    assert mismatch(entry, "POST", "/v1/chat/completions", json.dumps(same).encode()) is None
    nan = _rec(0, b'{"x": NaN}')
    assert mismatch(nan, "POST", "/v1/chat/completions", b'{"x": NaN}') is None


def test_mismatch_compares_non_json_bodies_as_bytes():
    entry = _rec(0, b"plain text", path="/upload")
    assert mismatch(entry, "POST", "/upload", b"plain text") is None
    assert mismatch(entry, "POST", "/upload", b"other text") == "request body differs"


@pytest.mark.parametrize("sequence, divergence_at, answered", [
    ([0, 1, 2], None, 3),
    ([0, 2], 1, 1),  # skipping a request is a divergence, not a match further on
    ([0, 1, 2, 2], 3, 3),  # one more than recorded
    ([9], 0, 0),
])
def test_book_in_order(sequence, divergence_at, answered):
    book = ReplayBook([_rec(i, {"n": i}) for i in range(3)])
    for n in sequence:
        book.take("POST", "/v1/chat/completions", json.dumps({"n": n}).encode())
    assert book.answered == answered
    assert (book.divergence.index if book.divergence else None) == divergence_at


def test_book_accepts_requests_the_recording_made_concurrently_in_any_order():
    # 1 and 2 were in flight together with 0 in the recording; 3 started after 0 ended.
    entries = [_rec(0, {"n": 0}, t=(0.0, 1.0)), _rec(1, {"n": 1}, t=(0.1, 0.9)), _rec(2, {"n": 2}, t=(0.2, 1.2)),
               _rec(3, {"n": 3}, t=(2.0, 3.0))]
    book = ReplayBook(entries)
    for n in (2, 0, 1, 3):
        assert book.take("POST", "/v1/chat/completions", json.dumps({"n": n}).encode()) is entries[n]
    assert book.final_divergence() is None
    early = ReplayBook(entries)
    assert early.take("POST", "/v1/chat/completions", b'{"n": 3}') is None  # not concurrent with #0
    assert early.divergence.recorded_index == 0


def test_book_reports_the_first_divergence_and_counts_the_rest():
    book = ReplayBook([_rec(i, {"n": i}) for i in range(3)])
    book.take("POST", "/v1/chat/completions", b'{"n": 0}')
    book.take("POST", "/v1/chat/completions", b'{"n": 7}')
    book.take("POST", "/v1/chat/completions", b'{"n": 2}')  # would match, but the replay already diverged
    report = book.report("ag", "done")
    assert report["divergence"]["index"] == 1 and report["after_divergence"] == 1 and report["answered"] == 1
    assert '-  "n": 1' in report["divergence"]["diff"] and '+  "n": 7' in report["divergence"]["diff"]


def test_a_request_past_the_recording_shows_what_the_agent_sent():
    book = ReplayBook([_rec(0, {"n": 0}, injected=INJ)])
    book.take("POST", "/v1/chat/completions", b'{"n": 0}')
    book.take("POST", "/v1/chat/completions", b'{"n": 1}')
    diff = book.report("ag", "done")["divergence"]["diff"]
    assert "recorded (nothing left)" in diff and '+  "n": 1' in diff


def test_final_divergence_names_the_first_request_never_made():
    book = ReplayBook([_rec(i, {"n": i}) for i in range(3)])
    book.take("POST", "/v1/chat/completions", b'{"n": 0}')
    div = book.final_divergence()
    assert div.index == 1 and div.recorded_index == 1 and "stopped after 1 requests" in div.reason
    assert book.report("ag", "diverged")["divergence"] is None  # only the final report counts missing calls


def test_request_diff_when_the_recording_ran_out():
    diff = request_diff(None, "POST", "/x", b'{"a": 1}')
    assert "+POST /x" in diff and '+  "a": 1' in diff


@pytest.mark.parametrize("live, expected", [
    (b'{"m": 1, "return_token_ids": true, "logprobs": true}', True),
    (b'{"m": 1, "return_token_ids": true}', False),
    (b'not json', False),
])
def test_capture_injected(live, expected):
    assert capture_injected(_rec(0, {"m": 1}, injected=INJ), live) is expected


def test_recorded_requests_skip_tunnels_and_keep_the_routed_path(recording):
    from dataclasses import replace
    with Store(recording.store) as s:
        flows = s.flows(agent_id="plain")
    tunnel = replace(flows[0], method="CONNECT", flow_id="t")
    routed = replace(flows[0], flow_id="r", meta={"routed_from": "https://api.openai.com/v1/chat/completions?x=1"})
    entries = recorded_requests([tunnel, routed])
    assert [e.flow_id for e in entries] == ["r"]
    assert entries[0].paths == ("/v1/chat/completions", "/v1/chat/completions?x=1")


def test_feed_stream_passes_the_body_through_the_stream_callable():
    from mitmproxy import http
    seen = []

    def stream(data: bytes) -> list[bytes]:
        seen.append(data)
        return [data.upper()] if data else [b"!"]
    resp = http.Response.make(200, b"data: x\n\n", {"content-type": "text/event-stream"})
    resp.stream = stream
    feed_stream(resp)
    assert seen == [b"data: x\n\n", b""] and resp.raw_content == b"DATA: X\n\n!"
    assert resp.headers["content-length"] == str(len(b"DATA: X\n\n!")) and not resp.stream


@pytest.mark.parametrize("base, path, expected", [
    ("http://h:1", "/v1/chat/completions", "http://h:1/v1/chat/completions"),
    ("http://h:1/v1", "/v1/chat/completions", "http://h:1/v1/chat/completions"),
    ("http://h:1/v1/", "/v1/chat/completions", "http://h:1/v1/chat/completions"),
    ("https://h/api", "/v1/chat/completions", "https://h/api/v1/chat/completions"),
])
def test_target_url(base, path, expected):
    assert target_url(base, path) == expected


@pytest.mark.parametrize("divergence, exit_code, status", [
    (None, 0, 0), (None, 3, 3), ({"index": 1}, 0, 1), ({"index": 1}, 3, 1), (None, -9, 137), (None, None, 0),
])
def test_exit_status(divergence, exit_code, status):
    from rollouttap.manager.replay import ReplayResult
    result = ReplayResult("a", "a.r", "r", Path("x.db"), exit_code, 3, 3, 3, divergence)
    assert result.exit_status == status


def test_a_recorded_body_kept_only_in_part_is_answered_as_unreplayable_not_short(recording):
    with Store(recording.store) as s:
        flow = s.flows(agent_id="plain")[0]
    cut = replace(flow, meta={**flow.meta, "body_cut": {"size": 300 << 20, "kept": 100}},
                  response_body=(flow.response_body or b"")[:100])
    [entry] = recorded_requests([cut])
    resp = recorded_response(entry, entry.response_body)
    assert resp.status_code == 502 and b"kept only in part (100 of 314572800 bytes)" in resp.content


@pytest.mark.parametrize("change, says", [
    ({"state": "open", "t_end": None}, "still in flight when the recording was read"),
    ({"state": "error", "status_code": None, "error": "client disconnected before the response completed"},
     "hung up before it was answered"),
    ({"state": "error", "status_code": None, "error": "Client disconnected."}, "hung up before it was answered"),
    ({"state": "error", "status_code": None, "error": "stream reset by client (CANCEL)"}, "hung up"),
    ({"meta_body_cut": {"size": 2 << 30, "kept": 100, "store_limit": 1_000_000_000}}, "over SQLite's limit"),
])
def test_an_answer_the_agent_got_that_the_recording_cannot_give_back_is_counted(recording, change, says):
    with Store(recording.store) as s:
        flows = s.flows(agent_id="plain")
    cut = change.pop("meta_body_cut", None)
    first = replace(flows[0], **change, meta={**flows[0].meta, **({"body_cut": cut} if cut else {})})
    entries = recorded_requests([first, *flows[1:]])
    assert entries[0].status_code is None and says in entries[0].unreplayable and entries[1].unreplayable is None
    resp = recorded_response(entries[0], entries[0].response_body)
    assert resp.status_code == 502 and says.encode() in resp.content  # never a short or empty "whole" answer
    book = ReplayBook(entries)
    for flow in flows:
        assert book.take(flow.method, flow.path, decode_body(flow.request_body, None)) is not None
    report = book.report("plain", "done")
    assert report["divergence"] is None and report["unreplayable"] == [0]


def test_a_recorded_answer_is_given_back_without_its_redacted_headers():
    entry = replace(_rec(0, {"messages": []}), response_headers=[
        ("content-type", "application/json"), ("Set-Cookie", "<redacted sha256:0123456789ab>"), ("x-kept", "1")])
    resp = recorded_response(entry, b"{}")
    assert "set-cookie" not in resp.headers and resp.headers["x-kept"] == "1"


def test_a_call_the_agent_hung_up_on_is_recorded_as_one_the_replay_cannot_give_back(tmp_path, confdir):
    # Recorded through a real proxy: the error is mitmproxy's own words, whatever they are.
    import socket
    import threading
    with socket.create_server(("127.0.0.1", 0)) as server:
        held = []
        threading.Thread(target=lambda: held.append(server.accept()), daemon=True).start()  # never answers
        url = f"http://127.0.0.1:{server.getsockname()[1]}/v1/chat/completions"
        with start_proxy(tmp_path / "s.db", confdir) as proxy:
            with pytest.raises(requests.Timeout):
                requests.post(url, json={"model": "m", "messages": []}, headers={"X-Agent-ID": "gone"},
                              proxies={"http": proxy.url}, timeout=1)
            [flow] = settled_flows(tmp_path / "s.db", agent_id="gone")
    [entry] = recorded_requests([flow])
    assert flow.state == "error" and flow.status_code is None
    assert entry.unreplayable is not None and "hung up" in entry.unreplayable, flow.error


def test_a_replay_that_could_not_give_every_answer_back_is_not_ok():
    from rollouttap.manager.replay import ReplayResult
    result = ReplayResult("a", "a.r", "r", Path("x.db"), 0, 3, 3, 3, None, unreplayable=(1,))
    assert not result.ok and result.exit_status == 0
    assert replace(result, unreplayable=()).ok


def test_a_request_body_kept_only_in_part_matches_a_replayed_body_of_its_size_and_first_part(recording):
    with Store(recording.store) as s:
        flow = s.flows(agent_id="plain")[0]
    whole = b"upload " * 1000
    cut = replace(flow, request_body=whole[:100], request_headers=[("content-type", "application/octet-stream")],
                  meta={**flow.meta, "request_body_cut": {"size": len(whole), "kept": 100}})
    [entry] = recorded_requests([cut])
    path = entry.paths[0]
    assert mismatch(entry, entry.method, path, whole, whole) is None
    assert mismatch(entry, entry.method, path, whole + b"x", whole + b"x") is not None  # longer
    assert mismatch(entry, entry.method, path, b"X" + whole[1:], b"X" + whole[1:]) is not None  # other start
    unended = replace(cut, meta={**flow.meta, "request_body_cut": {"size": None, "kept": 100, "ended": False}})
    [entry] = recorded_requests([unended])  # a chunked upload answered before it ended: its size is unknown
    assert mismatch(entry, entry.method, path, whole + b"x", whole + b"x") is None
    assert mismatch(entry, entry.method, path, b"X" + whole[1:], b"X" + whole[1:]) is not None


def _recorded_then_replayed(tmp_path, confdir, agent: str, script: str, answer: tuple[int, bytes],
                            **proxy_kwargs: Any) -> tuple[str, Any, list[bytes]]:
    """Run ``script`` (a URL of a local server as its argv[1]) as ``agent`` through a proxy, then replay it: what
    it printed, the replay's result, and the bodies the server got (it answers every POST with ``answer``)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    seen: list[bytes] = []

    class Sink(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            seen.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(answer[0])
            self.send_header("Content-Length", str(len(answer[1])))
            self.end_headers()
            self.wfile.write(answer[1])

        def log_message(self, *args: object) -> None:
            pass

    (tmp_path / "agent.py").write_text(script)
    with ThreadingHTTPServer(("127.0.0.1", 0), Sink) as sink:
        threading.Thread(target=sink.serve_forever, daemon=True).start()
        command = [sys.executable, str(tmp_path / "agent.py"), f"http://127.0.0.1:{sink.server_port}/files"]
        store = tmp_path / "runs.db"
        with start_proxy(store, confdir, **proxy_kwargs) as proxy:
            recorded = run_agent(proxy, store, agent, command, f"run-{agent}")
        result = replay_agent(store, agent, command, out=tmp_path / "r.db", confdir=confdir, capture_output=True,
                              timeout=60)
        sink.shutdown()
    return recorded, result, seen


def test_a_replayed_upload_is_answered_from_the_recording_never_sent_on(tmp_path, confdir):
    """Capture streams an upload's body upstream as it arrives; under replay it must be held and answered."""
    recorded, result, seen = _recorded_then_replayed(
        tmp_path, confdir, "up", "import sys, urllib.request\n"
        "req = urllib.request.Request(sys.argv[1], data=b'z' * 3_000_000)\n"
        "with urllib.request.urlopen(req, timeout=30) as resp:\n"
        "    print(resp.status, resp.read().decode())\n", (201, b"uploaded"), extra={"rollouttap_body_keep_mb": "1"})
    assert recorded == "201 uploaded\n" and len(seen) == 1  # the recording's upload only
    assert result.ok and result.stdout == recorded, (result.stderr, result.divergence)


def test_a_request_body_in_two_codings_replays_against_its_recording(tmp_path, confdir):
    # Both sides are decoded alike (every coding of the list): mitmproxy's own decoding undoes one coding only, and
    # the body the agent sent again never matched the recorded one.
    recorded, result, _ = _recorded_then_replayed(
        tmp_path, confdir, "coded", "import brotli, gzip, json, sys, urllib.request\n"
        "body = brotli.compress(gzip.compress(json.dumps({'q': 'x' * 100}).encode(), mtime=0))\n"
        "req = urllib.request.Request(sys.argv[1], data=body, headers={\n"
        "    'Content-Type': 'application/json', 'Content-Encoding': 'gzip, br'})\n"
        "with urllib.request.urlopen(req, timeout=30) as resp:\n"
        "    print(resp.status, resp.read().decode())\n", (200, b"ok"))
    assert recorded == "200 ok\n"
    assert result.ok and result.stdout == recorded, (result.stderr, result.divergence)


def test_a_recorded_stream_that_decodes_past_one_reads_bound_is_stripped_read_by_read():
    # Live, each read of a compressed stream decodes within a bound; the recorded body is fed the same way, not
    # whole (a long answer with logprobs, compressed, decodes past one read's bound).
    import gzip

    from rollouttap.addon.replay import as_the_agent_saw
    from rollouttap.addon.streamtap import STRIP_READ_LIMIT
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [{"index": 0, "delta": {"content": "x" * (STRIP_READ_LIMIT + 1)}, "logprobs": None,
                          "finish_reason": None, "token_ids": [3]}]}
    sse = f"data: {json.dumps(chunk, separators=(',', ':'))}\n\ndata: [DONE]\n\n".encode()
    stream = replace(_rec(0, {"messages": [], "stream": True}, injected={"return_token_ids": True}),
                     response_headers=[("content-type", "text/event-stream"), ("content-encoding", "gzip")],
                     response_body=gzip.compress(sse, compresslevel=1))
    resp = recorded_response(stream, stream.response_body)
    as_the_agent_saw(stream, resp)
    assert "content-encoding" not in resp.headers
    assert resp.raw_content == sse.replace(b'"token_ids":[3]', b'"token_ids":null')
