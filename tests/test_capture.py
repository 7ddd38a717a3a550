"""The addon inside a real mitmdump: attribution, capture, streaming, redaction, routes, errors.

Real processes throughout: mitmdump with the addon, agent processes using real HTTP clients, and
ScriptedUpstream (a scripted server speaking vLLM's JSON) as the model server.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from mitmproxy import http
from mitmproxy.test import tflow

from conftest import CLIENTS, agent_env, run_client, settled_flows, start_proxy, wait_for
from rollouttap.addon import flowcols
from rollouttap.manager.proxy_link import ProxyLink
from rollouttap.store import Store, decode_body, new_token


def _new_agent(proxy, **meta) -> tuple[str, str]:
    agent_id, token = "ag-" + uuid.uuid4().hex[:12], new_token()
    with Store(proxy.config.store) as store:
        store.register_agent(agent_id, token=token, meta=meta)
    return agent_id, token


def _chat_flows(store_path, agent_id):
    flows = settled_flows(store_path, agent_id=agent_id)
    return [f for f in flows if f.path.endswith("/chat/completions")]


@pytest.mark.parametrize("client", ["requests", "openai", "urllib", "curl", "aiohttp"])
@pytest.mark.parametrize("stream", [False, True])
def test_each_client_is_captured_and_attributed_by_pid(proxy, upstream, client, stream):
    agent_id = "tag-" + uuid.uuid4().hex[:10]
    env = agent_env(proxy, tag=agent_id)
    replies = run_client(client, upstream.base_url, env, "--marker", agent_id,
                         *(["--stream"] if stream else []))
    assert agent_id in replies[0]
    [flow] = _chat_flows(proxy.config.store, agent_id)
    assert flow.attribution == "pid" and flow.state == "done" and flow.status_code == 200
    assert flow.pid is not None and flow.streamed is stream
    if stream:
        assert "data: [DONE]" in flow.response_text() and flow.t_first_byte is not None
    else:
        assert agent_id in flow.response_json()["choices"][0]["message"]["content"]
    assert flow.request_json()["messages"][0]["content"] == f"say {agent_id}"
    assert flow.t_request <= flow.t_response_headers <= flow.t_end


def test_grandchild_of_tagged_agent_is_attributed(proxy, upstream):
    agent_id = "tag-" + uuid.uuid4().hex[:10]
    env = agent_env(proxy, tag=agent_id)
    # agent (shell) -> child (shell) -> grandchild (python client)
    inner = f"{sys.executable} {CLIENTS} urllib {upstream.base_url} --marker gc"
    out = subprocess.run(["sh", "-c", f"sh -c '{inner}'"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    [flow] = _chat_flows(proxy.config.store, agent_id)
    assert flow.attribution == "pid"
    assert flow.pid not in (os.getpid(), None)


def test_credentials_attribute_and_never_reach_upstream(proxy, upstream):
    agent_id, token = _new_agent(proxy)
    env = agent_env(proxy, agent_id, token)
    env.pop("ROLLOUTTAP_AGENT_ID")  # credentials alone
    out = subprocess.run([sys.executable, "-c", (
        "import requests,sys,json\n"
        f"r=requests.post({upstream.url + '/echo?key=AIza-q-secret&q=London&appid=owm-q-secret'!r}, "
        "json={'x': 1}, headers={'Authorization': 'Bearer sk-live-secret', 'x-goog-api-key': 'AIza-h-secret', "
        "'X-Honeycomb-Team': 'hc-h-secret'})\n"
        "print(r.text)\n")], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    echoed = json.loads(out.stdout)
    sent = {k.lower(): v for k, v in echoed["headers"].items()}
    assert "proxy-authorization" not in sent
    assert sent["authorization"] == "Bearer sk-live-secret"  # the agent's own key goes through
    [flow] = settled_flows(proxy.config.store, agent_id=agent_id)
    assert flow.attribution == "credentials" and flow.state == "done"
    stored = dict((k.lower(), v) for k, v in flow.request_headers)
    assert "sk-live-secret" not in json.dumps(flow.request_headers)
    assert stored["authorization"].startswith("Bearer <redacted sha256:")
    with Store(proxy.config.store) as store:  # nothing in the file holds the key in clear
        raw = store._query("SELECT request_headers, request_body, url, path FROM flows WHERE agent_id = ?",
                           (agent_id,))
    # any vendor's header or ?key=, and keys under names with no credential word (OpenWeatherMap's, Honeycomb's)
    for secret in ("sk-live-secret", "AIza-h-secret", "AIza-q-secret", "owm-q-secret", "hc-h-secret"):
        assert all(secret not in str(tuple(r)) for r in raw)


@pytest.mark.parametrize("stream", [False, True])
def test_mitmproxys_own_launcher_captures_the_same(tmp_path, confdir, upstream, stream):
    # Every other test here runs the default launcher (addon/fastdump.py); this one runs plain mitmdump.
    host = upstream.url.split("://", 1)[1]
    with start_proxy(tmp_path / "runs.db", confdir, model_hosts=(host,), launcher="mitmdump") as proxy:
        assert "rollouttap.addon.fastdump" not in proxy.proc.args
        agent_id = "tag-" + uuid.uuid4().hex[:10]
        run_client("openai", upstream.base_url, agent_env(proxy, tag=agent_id), "--marker", agent_id,
                   *(["--stream"] if stream else []))
        [flow] = _chat_flows(proxy.config.store, agent_id)
    assert flow.attribution == "pid" and flow.state == "done" and flow.streamed is stream
    assert flow.meta["injected"]["return_token_ids"] is True  # token ids asked for, recorded
    assert "prompt_token_ids" in flow.response_text()


def test_fallback_pid_lookup_only_for_requests_without_credentials(tmp_path, confdir, upstream):
    host = upstream.url.split("://", 1)[1]
    with start_proxy(tmp_path / "runs.db", confdir, model_hosts=(host,), pid_lookup="fallback") as proxy:
        agent_id, token = _new_agent(proxy)
        creds_env = agent_env(proxy, agent_id, token)
        creds_env.pop("ROLLOUTTAP_AGENT_ID")
        tagged = "tag-" + uuid.uuid4().hex[:10]
        for env in (creds_env, agent_env(proxy, tag=tagged)):
            run_client("requests", upstream.base_url, env, "--marker", "x")
        [by_creds] = _chat_flows(proxy.config.store, agent_id)
        [by_pid] = _chat_flows(proxy.config.store, tagged)
    assert by_creds.attribution == "credentials" and by_creds.pid is None  # no lookup was made
    assert by_pid.attribution == "pid" and by_pid.pid not in (None, os.getpid())


def test_wrong_token_is_refused_and_recorded(proxy, upstream):
    agent_id, _ = _new_agent(proxy)
    env = agent_env(proxy, agent_id, "not-the-token")
    env.pop("ROLLOUTTAP_AGENT_ID")
    proxies = {"http": env["HTTP_PROXY"]}
    resp = requests.post(upstream.url + "/echo", json={"refused": agent_id}, proxies=proxies, timeout=10)
    assert resp.status_code == 407
    with Store(proxy.config.store) as store:
        flows = wait_for(lambda: [f for f in store.flows(state="error")
                                  if agent_id in (f.meta.get("attribution_detail") or "")], what="refusal")
    assert flows[0].attribution == "rejected" and flows[0].agent_id is None
    assert "wrong token" in flows[0].error
    # What reached the proxy is kept, the refused request's body too, and the answer the client got.
    assert flows[0].request_json() == {"refused": agent_id} and flows[0].status_code == 407
    assert b"proxy credentials refused" in flows[0].response_body
    assert "Proxy-Authenticate" in dict(flows[0].response_headers)  # redacted: an auth… name


@pytest.mark.parametrize("headers, body", [
    ({}, False), ({"content-length": "0"}, False), ({"content-length": "12"}, True),
    ({"transfer-encoding": "chunked"}, True), ({"content-length": "x"}, True),
])
def test_may_have_body(headers, body):
    from rollouttap.addon.capture import may_have_body
    req = _request()
    req.headers.clear()
    req.headers.update(headers)
    assert may_have_body(req) == body


def test_an_ended_agents_token_is_refused(proxy, upstream):
    agent_id, token = _new_agent(proxy)
    env = agent_env(proxy, agent_id, token)
    proxies = {"http": env["HTTP_PROXY"]}
    assert requests.post(upstream.url + "/echo", json={}, proxies=proxies, timeout=10).status_code == 200
    with Store(proxy.config.store) as store:
        store.agent_ended(agent_id, "ok")
    # Its row is re-read within a second: then a process that outlived it can no longer add to it.
    wait_for(lambda: requests.post(upstream.url + "/echo", json={}, proxies=proxies, timeout=10).status_code == 407,
             what="the token refused")
    with Store(proxy.config.store) as store:
        refused = wait_for(lambda: [f for f in store.flows(state="error")
                                    if agent_id in (f.meta.get("attribution_detail") or "")], what="refusal")
    assert "the agent has ended (ok)" in refused[0].error and refused[0].agent_id is None


def test_an_ended_agents_token_is_refused_at_its_first_request_a_second_later(proxy, upstream):
    # A process that outlived its agent sends one request after an idle gap: refused, not served once first.
    agent_id, token = _new_agent(proxy)
    proxies = {"http": agent_env(proxy, agent_id, token)["HTTP_PROXY"]}
    assert requests.post(upstream.url + "/echo", json={}, proxies=proxies, timeout=10).status_code == 200
    with Store(proxy.config.store) as store:
        store.agent_ended(agent_id, "ok")
    time.sleep(1.1)  # the scenario, not a synchronisation: the idle gap the proxy's cached row outlives
    assert requests.post(upstream.url + "/echo", json={}, proxies=proxies, timeout=10).status_code == 407


def test_header_attribution_and_header_removed(proxy, upstream):
    resp = requests.post(upstream.url + "/echo", json={}, headers={"X-Agent-ID": "hdr-agent"},
                         proxies={"http": proxy.url}, timeout=10)
    assert resp.status_code == 200
    assert "x-agent-id" not in {k.lower() for k in resp.json()["headers"]}
    [flow] = settled_flows(proxy.config.store, agent_id="hdr-agent")
    assert flow.attribution == "header"


def test_header_cannot_claim_a_registered_agent(proxy, upstream):
    victim, _ = _new_agent(proxy)
    marker = uuid.uuid4().hex
    resp = requests.post(upstream.url + "/echo", json={"m": marker}, headers={"X-Agent-ID": victim},
                         proxies={"http": proxy.url}, timeout=10)
    assert resp.status_code == 200  # recorded, not blocked: only the claim is refused
    with Store(proxy.config.store) as store:
        [flow] = wait_for(lambda: [f for f in store.flows(unattributed=True)
                                   if f.state == "done" and marker in f.request_text()], what="flow")
        assert store.flows(agent_id=victim) == []
    assert flow.attribution == "none" and "registered agent" in flow.meta["attribution_detail"]


def test_an_undecodable_header_claim_is_refused_and_the_flow_kept(proxy, upstream):
    marker = uuid.uuid4().hex
    resp = requests.post(upstream.url + "/echo", json={"m": marker}, headers={"X-Agent-ID": b"bad\xff\xfeid"},
                         proxies={"http": proxy.url}, timeout=10)
    assert resp.status_code == 200
    with Store(proxy.config.store) as store:
        [flow] = wait_for(lambda: [f for f in store.flows(unattributed=True)
                                   if f.state == "done" and marker in f.request_text()], what="flow")
    assert flow.attribution == "none" and "not a printable name" in flow.meta["attribution_detail"]


THIEF = """
import sys, requests
sys.stdin.readline()  # registered as an agent's root by now
print(requests.post(sys.argv[1], json={}, timeout=10).status_code, flush=True)
"""


def test_credentials_sent_from_another_agents_tree_are_refused(proxy, upstream):
    victim, token = _new_agent(proxy)
    thief, _ = _new_agent(proxy)
    # The thief read the victim's proxy URL (agents run as one user: /proc/PID/environ is readable).
    env = agent_env(proxy, victim, token, tag=thief)
    proc = subprocess.Popen([sys.executable, "-c", THIEF, upstream.url + "/echo"], env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    with Store(proxy.config.store) as store:
        store.agent_started(thief, proc.pid)
    out, err = proc.communicate("go\n", timeout=60)
    assert out.strip() == "407", err
    with Store(proxy.config.store) as store:
        [flow] = wait_for(lambda: [f for f in store.flows(state="error")
                                   if victim in (f.meta.get("attribution_detail") or "")], what="refusal")
        assert store.flows(agent_id=victim) == []
    assert flow.attribution == "rejected" and thief in flow.error and flow.pid == proc.pid


def test_credentials_from_a_process_under_no_registered_root_are_accepted(proxy, upstream):
    # An escaped daemon or a hand-run client, untagged or tagged as the agent: its token speaks for it.
    code = f"import requests; print(requests.post({upstream.url + '/echo'!r}, json={{}}, timeout=10).status_code)"
    for tag in (None, "own"):
        agent_id, token = _new_agent(proxy)
        env = agent_env(proxy, agent_id, token, tag=agent_id if tag else None)
        if tag is None:
            env.pop("ROLLOUTTAP_AGENT_ID")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
        assert out.stdout.strip() == "200", out.stderr
        [flow] = settled_flows(proxy.config.store, agent_id=agent_id)
        assert flow.attribution == "credentials"


def test_credentials_from_a_process_tagged_as_an_agent_this_store_does_not_know_are_refused(proxy, upstream):
    # A store per rank registers only its agents: a process of another store's agent (its tag) stole this token.
    agent_id, token = _new_agent(proxy)
    env = agent_env(proxy, agent_id, token, tag="ag-of-another-store")
    code = f"import requests; print(requests.post({upstream.url + '/echo'!r}, json={{}}, timeout=10).status_code)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "407", out.stderr
    with Store(proxy.config.store) as store:
        assert store.flows(agent_id=agent_id) == []


def test_unattributed_flow_is_kept(proxy, upstream):
    marker = uuid.uuid4().hex
    resp = requests.post(upstream.url + "/echo", json={"m": marker}, proxies={"http": proxy.url},
                         timeout=10)
    assert resp.status_code == 200
    with Store(proxy.config.store) as store:
        flows = wait_for(lambda: [f for f in store.flows(unattributed=True)
                                  if f.state == "done" and marker in f.request_text()], what="flow")
    assert flows[0].attribution == "none" and flows[0].agent_id is None
    assert flows[0].meta.get("attribution_detail")


def test_two_agents_interleaving_on_keep_alive_are_never_mixed(proxy, upstream):
    agents = ["ka-" + uuid.uuid4().hex[:8] for _ in range(2)]
    procs = [subprocess.Popen([sys.executable, str(CLIENTS), "requests", upstream.base_url,
                               "--marker", a, "--calls", "15"], env=agent_env(proxy, tag=a),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for a in agents]
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    for agent in agents:
        flows = _chat_flows(proxy.config.store, agent)
        assert len(flows) == 15
        assert all(f.request_json()["messages"][0]["content"] == f"say {agent}" for f in flows)
        assert len({f.client_conn_id for f in flows}) == 1  # really one keep-alive connection


class _GateHandler(BaseHTTPRequestHandler):
    """Sends the first SSE event, then waits for the test to open the gate before finishing."""
    gate = threading.Event()
    protocol_version = "HTTP/1.1"

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if self.path.endswith("/done-first"):  # [DONE] sent, end of message held back
            self._chunk(b'data: {"n": 1}\n\ndata: [DONE]\n\n')
            self.gate.wait(20)
        else:
            self._chunk(b'data: {"n": 1}\n\n')
            self.gate.wait(20)
            self._chunk(b'data: {"n": 2}\n\ndata: [DONE]\n\n')
        self.wfile.write(b"0\r\n\r\n")

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def log_message(self, *args):
        pass


@pytest.fixture
def gate_server():
    _GateHandler.gate = threading.Event()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _GateHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, _GateHandler.gate
    _GateHandler.gate.set()
    server.shutdown()
    server.server_close()


def test_stream_reaches_client_before_upstream_finishes_and_reader_sees_open_then_done(
        proxy, gate_server):
    server, gate = gate_server
    agent = "gate-" + uuid.uuid4().hex[:8]
    url = f"http://127.0.0.1:{server.server_address[1]}/v1/chat/completions"
    resp = requests.post(url, json={}, headers={"X-Agent-ID": agent}, proxies={"http": proxy.url},
                         stream=True, timeout=20)
    lines = resp.iter_lines()
    assert next(lines) == b'data: {"n": 1}'  # arrived while the upstream is still held at the gate
    with Store(proxy.config.store) as store:
        [flow] = wait_for(lambda: store.flows(agent_id=agent), what="open flow")
        assert flow.state == "open"
        # a streamed response's status and headers are readable while it still streams
        [flow] = wait_for(lambda: [f for f in store.flows(agent_id=agent) if f.status_code == 200],
                          what="response headers of the open stream")
        assert flow.state == "open" and flow.streamed
        assert flow.response_header("content-type") == "text/event-stream"
        gate.set()
        rest = [line for line in lines if line]
        assert rest == [b'data: {"n": 2}', b"data: [DONE]"]
        [flow] = settled_flows(proxy.config.store, agent_id=agent)
    assert flow.state == "done" and flow.streamed
    assert flow.response_text() == 'data: {"n": 1}\n\ndata: {"n": 2}\n\ndata: [DONE]\n\n'
    assert flow.t_first_byte < flow.t_end


def test_killed_client_flow_ends_in_error(proxy, gate_server):
    server, gate = gate_server
    agent = "kill-" + uuid.uuid4().hex[:8]
    url = f"http://127.0.0.1:{server.server_address[1]}/v1/chat/completions"
    child = subprocess.Popen([sys.executable, "-c", (
        "import requests,sys\n"
        f"r=requests.post({url!r}, json={{}}, proxies={{'http': {proxy.url!r}}}, stream=True)\n"
        "next(r.iter_lines()); print('got first', flush=True); sys.stdin.readline()\n")],
        env=agent_env(proxy, tag=agent), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "got first"
    child.send_signal(signal.SIGKILL)
    child.wait(5)
    [flow] = settled_flows(proxy.config.store, agent_id=agent)
    assert flow.state == "error" and flow.error
    assert b'"n": 1' in flow.response_body  # what arrived before the kill is kept


def test_proxy_stopped_mid_stream_keeps_what_the_agent_received(tmp_path, confdir, gate_server):
    server, gate = gate_server
    url = f"http://127.0.0.1:{server.server_address[1]}/v1/chat/completions"
    with start_proxy(tmp_path / "s.db", confdir) as proc:
        resp = requests.post(url, json={}, headers={"X-Agent-ID": "cut"}, proxies={"http": proc.url},
                             stream=True, timeout=20)
        assert next(resp.iter_lines()) == b'data: {"n": 1}'
        proc.stop()  # SIGINT, while the upstream still holds the rest of the stream
    resp.close()
    with Store(tmp_path / "s.db") as store:
        [flow] = store.flows(agent_id="cut")
    # mitmproxy may close the client first ("Client disconnected.") or leave the flow to the addon's done()
    assert flow.state == "error" and flow.error
    assert flow.response_text() == 'data: {"n": 1}\n\n' and flow.t_first_byte is not None


def test_a_stream_in_flight_when_the_proxy_stops_is_recorded_whole_and_new_requests_get_503(
        tmp_path, confdir, gate_server):
    server, gate = gate_server
    url = f"http://127.0.0.1:{server.server_address[1]}/v1/chat/completions"
    with start_proxy(tmp_path / "s.db", confdir) as proc:
        resp = requests.post(url, json={}, headers={"X-Agent-ID": "drain"}, proxies={"http": proc.url},
                             stream=True, timeout=20)
        lines = resp.iter_lines()
        assert next(lines) == b'data: {"n": 1}'
        proc.proc.send_signal(signal.SIGINT)  # mitmdump shuts down while the upstream still holds the rest
        late = wait_for(lambda: _status_or_none(url, proc.url), what="a request refused while shutting down")
        gate.set()
        assert [line for line in lines if line] == [b'data: {"n": 2}', b"data: [DONE]"]
        proc.stop()
    assert late == 503
    with Store(tmp_path / "s.db") as store:
        [flow] = store.flows(agent_id="drain")
        refused = [f for f in store.flows() if f.status_code == 503]
    assert flow.state == "done" and flow.response_text().endswith("data: [DONE]\n\n")
    assert refused and all(f.state == "error" and "shutting down" in f.error for f in refused)
    assert {f.agent_id for f in refused} == {"late"}  # the agent's own call: its views and replay have it


@pytest.mark.parametrize("how", ["stopped", "ended by itself"])
def test_a_proxy_that_could_not_write_what_it_queued_says_so_when_it_stops(tmp_path, confdir, gate_server, how):
    server, gate = gate_server
    url = f"http://127.0.0.1:{server.server_address[1]}/v1/chat/completions"
    store, har = tmp_path / "s.db", tmp_path / "dump.har"
    with start_proxy(store, confdir, extra={"hardump": str(har)}) as proc:
        resp = requests.post(url, json={}, headers={"X-Agent-ID": "lost"}, proxies={"http": proc.url},
                             stream=True, timeout=20)
        lines = resp.iter_lines()
        assert next(lines) == b'data: {"n": 1}'
        with Store(store) as reader:
            wait_for(lambda: reader.flows(agent_id="lost"), what="the open flow committed")
        for suffix in ("", "-wal", "-shm"):
            Path(f"{store}{suffix}").unlink()
        wait_for(lambda: requests.get(url, proxies={"http": proc.url}, timeout=5).status_code == 503,
                 what="the proxy noticing its store is gone")
        gate.set()  # the stream ends: its end has nowhere to go
        assert [line for line in lines if line][-1] == b"data: [DONE]"
        if how == "ended by itself":  # SIGINT from someone else: stop() finds it gone
            proc.proc.send_signal(signal.SIGINT)
            assert proc.proc.wait(60) == 3
        stopped_clean = proc.stop()
        log = proc.log_tail()
    assert stopped_clean is False
    assert "store events were never written" in log and "was deleted or replaced" in log
    assert har.exists()  # mitmproxy's own done hooks after ours still ran (the exit status comes after them)


def test_once_its_store_closes_a_stopping_proxy_refuses_connections_so_every_503_it_sent_is_recorded(
        tmp_path, confdir, upstream):
    store = tmp_path / "s.db"
    with start_proxy(store, confdir) as proc:
        lock = sqlite3.connect(store, isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")  # the writer's last commits wait: the proxy stays in its final phase
        proc.proc.send_signal(signal.SIGTERM)
        statuses: list[int] = []

        def refused_or_answered() -> bool:
            try:
                statuses.append(requests.get(upstream.url + "/echo", headers={"X-Agent-ID": "late"},
                                             proxies={"http": proc.url}, timeout=5).status_code)
            except requests.ConnectionError:
                return True
            return False
        wait_for(refused_or_answered, what="new connections refused while the store closes")
        lock.execute("ROLLBACK")
        lock.close()
        proc.stop()
    with Store(store) as reader:
        rows = [f for f in reader.flows(agent_id="late") if f.status_code == 503]
    # A request that came before the proxy had handled its SIGTERM (delivered asynchronously) is served as usual.
    assert set(statuses) <= {200, 503}
    assert len(rows) == statuses.count(503)  # every refusal the clients saw is in the store


@pytest.mark.parametrize("body", [None, b"u" * 1_000_000])
def test_a_request_on_an_open_connection_after_the_store_closed_is_not_answered_503_unrecorded(
        tmp_path, confdir, upstream, body):
    # Its listeners closed, the proxy still holds the connections clients kept open: a request on one of them can no
    # longer be recorded, so it gets no answer (its connection closes) rather than a 503 the store lacks.
    store = tmp_path / "s.db"
    with start_proxy(store, confdir) as proc, requests.Session() as kept:
        kept.proxies = {"http": proc.url}
        assert kept.get(upstream.url + "/echo", headers={"X-Agent-ID": "kept"}, timeout=5).status_code == 200
        lock = sqlite3.connect(store, isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")  # the writer's last commits wait: the proxy stays in its final phase
        proc.proc.send_signal(signal.SIGTERM)

        def refused() -> bool:
            try:
                requests.get(upstream.url + "/echo", proxies={"http": proc.url}, timeout=5)
            except requests.ConnectionError:
                return True
            return False
        wait_for(refused, what="new connections refused while the store closes")
        try:  # a body on its way too: its connection closes at once, not once the proxy has exited
            status = kept.request("GET" if body is None else "POST", upstream.url + "/echo", data=body,
                                  headers={"X-Agent-ID": "kept"}, timeout=5).status_code
        except requests.ConnectionError:
            status = None
        lock.execute("ROLLBACK")
        lock.close()
        proc.stop()
        log = proc.log_tail()
    with Store(store) as reader:
        rows = reader.flows(agent_id="kept")
    assert status is None, f"answered {status} while its store was closed"
    assert [r.status_code for r in rows] == [200]
    assert "closed its connection unanswered" in log


def _status_or_none(url: str, proxy_url: str) -> int | None:
    try:  # a GET: sent on before the proxy sees the signal, the gate server answers it at once (501)
        status = requests.get(url, headers={"X-Agent-ID": "late"}, proxies={"http": proxy_url}, timeout=5).status_code
    except requests.ConnectionError:
        return None
    return status if status == 503 else None


def _taddons():
    """mitmproxy's test context module and its proxyserver addon (mitmproxy 12.2's flowfilter, imported by its
    addons, calls names pyparsing 3.3 deprecates)."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from mitmproxy.addons.proxyserver import Proxyserver
        from mitmproxy.test import taddons
    return taddons, Proxyserver


@contextmanager
def _tap_in_test_context(store: Path):
    """The addon under mitmproxy's test context, recording into ``store``: hooks driven without sockets."""
    from rollouttap.addon.capture import RolloutTap
    taddons, Proxyserver = _taddons()
    addon = RolloutTap()
    with taddons.context(Proxyserver(), addon) as tctx:
        tctx.configure(addon, rollouttap_store=str(store))
        yield addon, tctx


@pytest.mark.parametrize("left", [True, False])
def test_a_connect_whose_client_left_while_it_was_looked_up_ends_at_once(tmp_path, left):
    # mitmproxy then calls neither http_connected nor http_connect_error: the row stayed open until the proxy stopped.
    async def connect(addon):
        await addon.running()
        flow = tflow.tflow(req=_request(method="CONNECT", url="http://example.com:443/",
                                        headers={"Host": "example.com:443", "X-Agent-ID": "cc"},
                                        authority="example.com:443", path=""))
        flow.client_conn.timestamp_end = time.time() if left else None
        await addon.http_connect(flow)
        return addon._live.get(flow.id)

    with _tap_in_test_context(tmp_path / "s.db") as (addon, tctx):
        tctx.configure(addon, rollouttap_pid_lookup="fallback")
        live = asyncio.run(connect(addon))
        assert (live is None) == left  # else open until mitmproxy says how the tunnel went
        addon.drain_s = 0.05
        asyncio.run(addon.done())
    with Store(tmp_path / "s.db") as store:
        [row] = store.flows()
    assert row.method == "CONNECT" and row.state == "error"
    assert row.error == ("client disconnected before the tunnel opened" if left else
                         "proxy shut down before the flow ended")


def test_flows_still_live_when_the_proxy_stops_keep_their_streamed_bytes(tmp_path):
    from rollouttap.addon.attribution import Attribution
    from rollouttap.addon.streamtap import StreamTap
    with _tap_in_test_context(tmp_path / "s.db") as (addon, _):
        addon.drain_s = 0.05  # the flow never ends by itself here
        asyncio.run(addon.running())
        flow = tflow.tflow()
        addon._record_new(flow, Attribution("live", "header"))
        tap = StreamTap()
        addon._live[flow.id].tap = tap
        tap(b'data: {"n": 1}\n\n')  # what the agent already has
        asyncio.run(addon.done())
    with Store(tmp_path / "s.db") as store:
        [row] = store.flows(agent_id="live")
    assert row.state == "error" and "shut down" in row.error
    assert row.response_text() == 'data: {"n": 1}\n\n' and row.t_first_byte is not None


@pytest.mark.parametrize("finished", [False, True])
def test_a_flow_cut_off_at_shutdown_is_cut_off_for_its_client_too(tmp_path, finished):
    # Its row says it ended in error: what comes after (the rest of its stream, its end) must not reach its client
    # as an answer it got, while the writer closes and mitmproxy still serves.
    from rollouttap.addon.attribution import Attribution
    from rollouttap.addon.streamtap import StreamTap
    with _tap_in_test_context(tmp_path / "s.db") as (addon, _):
        addon.drain_s = 0.05
        asyncio.run(addon.running())
        flow = tflow.tflow(resp=True)
        addon._record_new(flow, Attribution("cut", "header"))
        tap = StreamTap()
        addon._live[flow.id].tap = tap
        tap(b'data: {"n": 1}\n\n' + (b"data: [DONE]\n\n" if finished else b""))
        asyncio.run(addon.done())
        more = tap(b'data: {"n": 2}\n\n')
        addon.response(flow)
    with Store(tmp_path / "s.db") as store:
        [row] = store.flows(agent_id="cut")
    if finished:  # the client already has its whole answer: nothing to take back
        assert row.state == "done" and more == [b'data: {"n": 2}\n\n'] and flow.error is None
    else:
        assert row.state == "error" and more == [] and flow.error is not None and flow.error.msg == flow.error.KILLED_MESSAGE


def test_a_tunnel_cut_off_at_shutdown_is_not_opened_for_its_client(tmp_path):
    # mitmproxy checks no kill after http_connected: the 200 would reach the client of a row that says cut off.
    from rollouttap.addon.attribution import Attribution
    with _tap_in_test_context(tmp_path / "s.db") as (addon, _):
        addon.drain_s = 0.05
        asyncio.run(addon.running())
        flow = tflow.tflow(req=_request(method="CONNECT", url="http://example.com:443/",
                                        headers={"Host": "example.com:443"}, authority="example.com:443", path=""))
        addon._record_new(flow, Attribution("tunnel", "header"))
        asyncio.run(addon.done())  # the server still being connected
        addon.http_connected(flow)
    assert flow.error is not None and flow.error.msg == flow.error.KILLED_MESSAGE
    with Store(tmp_path / "s.db") as store:
        [row] = store.flows(agent_id="tunnel")
    assert row.state == "error" and "shut down" in row.error


def test_a_request_refused_407_whose_body_came_after_shutdown_is_not_sent_on(tmp_path):
    # Refused when its headers came, it waits for its body to be answered 407; retired meanwhile, it was then sent
    # upstream unchecked (its hooks found no live flow).
    from rollouttap.addon.attribution import Attribution

    async def rejected(flow, to_own_reverse=False):
        return Attribution("a1", "rejected", None, "bad token")

    async def body_after_shutdown(addon):
        await addon.running()
        addon.who.attribute = rejected
        flow = tflow.tflow(req=_request(method="POST", url="http://example.com/up", headers={"Content-Length": "10"}))
        await addon.requestheaders(flow)
        await addon.done()  # the drain ends with the flow still waiting for its body
        addon.request(flow)
        return flow

    with _tap_in_test_context(tmp_path / "s.db") as (addon, _):
        addon.drain_s = 0.05
        flow = asyncio.run(body_after_shutdown(addon))
    assert flow.response is None and flow.error is not None and flow.error.msg == flow.error.KILLED_MESSAGE
    with Store(tmp_path / "s.db") as store:
        [row] = store.flows()
    assert row.state == "error" and "shut down" in row.error


@pytest.mark.parametrize("stopping", [False, True])
def test_a_body_too_large_to_hold_is_recorded_as_its_senders_and_closed_never_answered(tmp_path, stopping):
    # Its sender is looked up for its row (its reading paused meanwhile: mitmproxy would read the body on, into
    # memory), then its connection closes. While the proxy stops too: its row says why, never "503".
    from rollouttap.addon.attribution import Attribution

    async def lookup(flow, to_own_reverse=False):
        return Attribution("big", "header")

    async def send(addon):
        await addon.running()
        addon.who.attribute = lookup
        flow = tflow.tflow(req=_request(method="POST", url="http://example.com/v1/chat/completions"))
        flow.request.headers["Content-Length"] = str(2 << 20)  # announced; its body is still on its way
        await addon.requestheaders(flow)
        return flow

    with _tap_in_test_context(tmp_path / "s.db") as (addon, tctx):
        tctx.configure(addon, rollouttap_held_body_max_mb=1)
        addon._stopping = stopping
        flow = asyncio.run(send(addon))
        asyncio.run(addon.done())
    assert flow.response is None and flow.error is not None and flow.error.msg == flow.error.KILLED_MESSAGE
    with Store(tmp_path / "s.db") as store:
        [row] = store.flows(agent_id="big")
    assert row.state == "error" and "over rollouttap_held_body_max_mb (1 MiB)" in row.error


def test_a_request_whose_lookup_ends_after_the_drain_is_refused_and_recorded_not_sent_on(tmp_path):
    # Counted by the drain, but its lookup outlasted it: admitted then, it was recorded as cut off by the shutdown
    # and sent upstream all the same, its client getting an answer the store lacked.
    from rollouttap.addon.attribution import Attribution

    async def slow_lookup(flow, to_own_reverse=False):
        await asyncio.sleep(0.3)
        return Attribution("slow", "header")

    async def stop_during_lookup(addon):
        await addon.running()
        addon.who.attribute = slow_lookup
        flow = tflow.tflow(req=_request(headers={"X-Agent-ID": "slow"}))
        request = asyncio.create_task(addon.requestheaders(flow))
        await asyncio.sleep(0.01)  # it arrived before the stop signal
        addon._late_admits += 1  # and another one after it, still being looked up: the store stays open for it
        closing = asyncio.create_task(addon.done())
        await request
        addon._late_admits -= 1
        await closing
        return flow

    with _tap_in_test_context(tmp_path / "s.db") as (addon, _):
        addon.drain_s = 0.1
        flow = asyncio.run(stop_during_lookup(addon))
    assert flow.response is not None and flow.response.status_code == 503
    with Store(tmp_path / "s.db") as store:
        [row] = store.flows(agent_id="slow")
    assert row.status_code == 503 and "shutting down" in row.error


def test_a_request_still_being_attributed_when_the_proxy_stops_is_recorded(tmp_path):
    from rollouttap.addon.attribution import Attribution

    async def slow_attribute(flow, to_own_reverse=False):  # a pid lookup in the pool, as in eager mode
        await asyncio.sleep(0.2)
        return Attribution("late", "header")

    async def stop_while_attributing(addon):
        await addon.running()
        addon.who.attribute = slow_attribute
        flow = tflow.tflow()
        hook = asyncio.create_task(addon.requestheaders(flow))
        await asyncio.sleep(0.01)  # the request arrived just before the signal
        await addon.done()
        await hook
        return flow

    with _tap_in_test_context(tmp_path / "s.db") as (addon, _):
        addon.drain_s = 0.5  # the flow never ends by itself here
        flow = asyncio.run(stop_while_attributing(addon))
    with Store(tmp_path / "s.db") as store:
        [row] = store.flows(agent_id="late")
    assert row.flow_id == flow.id and row.state == "error" and "shut down" in row.error


@pytest.mark.parametrize("scheme", ["https", "http"])
def test_another_apis_agents_path_is_left_alone(tmp_path, scheme):
    # Only our reverse listener's paths carry tokens: through the regular proxy (plain HTTP, or inside a tunnel
    # whose CONNECT named no agent) /agents/... belongs to the API it is sent to.
    from rollouttap.addon.attribution import Attribution
    with _tap_in_test_context(tmp_path / "s.db") as (addon, _):
        flow = tflow.tflow()
        flow.request.scheme, flow.request.host, flow.request.port = scheme, "api.example.com", 443
        flow.request.path = "/agents/asst_1/threads/run"  # not our reverse listener's /agents/ID/TOKEN/
        if scheme == "https":
            addon.who.tunnel_opened(flow.client_conn.id, Attribution(None, "none", None, "no agent named"))
        who = asyncio.run(addon.who.attribute(flow))
        asyncio.run(addon.done())
    assert who.method == "none" and flow.request.path == "/agents/asst_1/threads/run"


def test_a_lookup_cancelled_with_the_pool_at_shutdown_refuses_the_request_instead_of_failing_the_hook(tmp_path):
    async def lookup_cancelled(flow, to_own_reverse=False):
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        loop.call_soon(future.cancel)  # as the pool's shutdown(cancel_futures=True) cancels a queued lookup
        return await future

    async def late_request(addon):
        await addon.running()
        addon.who.attribute = lookup_cancelled
        addon._stopping = True  # a request after the stop signal, its lookup queued behind the pool's shutdown
        flow = tflow.tflow()
        await addon.requestheaders(flow)
        return flow

    with _tap_in_test_context(tmp_path / "s.db") as (addon, _):
        flow = asyncio.run(late_request(addon))
        asyncio.run(addon.done())
    assert flow.response is not None and flow.response.status_code == 503


def test_a_late_request_still_looked_up_when_the_listeners_close_is_recorded_before_the_store_closes(tmp_path):
    # It came on a connection opened before the stop signal; its 503 must be in the store, so the store waits for it.
    async def stop_while_one_is_looked_up(addon):
        await addon.running()
        looked_up = asyncio.Event()
        real = addon.who.attribute

        async def slow_lookup(flow, to_own_reverse=False):
            await asyncio.sleep(0.3)  # past the drain, which does not wait for late requests
            looked_up.set()
            return await real(flow, to_own_reverse=to_own_reverse)

        addon.who.attribute = slow_lookup
        addon._stopping = True  # the stop signal came (done() sets this first, then drains)
        flow = tflow.tflow(req=_request(headers={"X-Agent-ID": "late"}))
        request = asyncio.create_task(addon.requestheaders(flow))
        await asyncio.sleep(0)  # it is being looked up
        await addon.done()
        assert looked_up.is_set()
        await request
        return flow

    with _tap_in_test_context(tmp_path / "s.db") as (addon, tctx):
        tctx.configure(addon, rollouttap_pid_lookup="fallback")
        flow = asyncio.run(stop_while_one_is_looked_up(addon))
    assert flow.response is not None and flow.response.status_code == 503
    with Store(tmp_path / "s.db") as store:
        [row] = store.flows(agent_id="late")
    assert row.status_code == 503 and "shutting down" in row.error


def _credentialed_request(tmp_path, agent_id: str, lookup: Callable[[], asyncio.Future]) -> http.HTTPFlow:
    """A request with ``agent_id``'s proxy credentials through the addon's hooks, its connection's pid lookup
    being ``lookup()`` (made on the running loop); the flow as answered."""
    async def run(addon, flow):
        await addon.running()
        addon.who.credential_check_wait = 0.05
        addon.who._conn_pid[flow.client_conn.id] = lookup()
        await addon.requestheaders(flow)
        addon.request(flow)

    token = new_token()
    flow = tflow.tflow()
    flow.request.headers["Proxy-Authorization"] = "Basic " + base64.b64encode(f"{agent_id}:{token}".encode()).decode()
    with _tap_in_test_context(tmp_path / "s.db") as (addon, _):
        with Store(tmp_path / "s.db") as store:
            store.register_agent(agent_id, token=token)
        asyncio.run(run(addon, flow))
        asyncio.run(addon.done())
    return flow


def test_a_token_whose_senders_lookup_does_not_finish_in_time_is_refused_503_not_let_through(tmp_path):
    # An agent can slow lookups at will (processes holding many descriptors): a token that passed unchecked
    # then would speak for whoever sent it.
    flow = _credentialed_request(tmp_path, "ag-slow", lambda: asyncio.get_running_loop().create_future())
    assert flow.response is not None and flow.response.status_code == 503 and flow.response.headers["Retry-After"]
    with Store(tmp_path / "s.db") as store:
        [row] = store.flows(state="error")
        assert store.flows(agent_id="ag-slow") == []
    assert row.attribution == "rejected" and "could not be checked" in row.error


def test_a_token_sent_on_a_socket_no_process_held_when_looked_up_is_refused(tmp_path):
    # Parked in flight over a unix socket while the lookup ran, then taken back to send another agent's token.
    from rollouttap.addon.attribution import PidResult

    def parked() -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        future.set_result(PidResult(None, None, "socket owner not found", unfound=True))
        return future

    flow = _credentialed_request(tmp_path, "ag-parked", parked)
    assert flow.response is not None and flow.response.status_code == 407
    with Store(tmp_path / "s.db") as store:
        assert store.flows(agent_id="ag-parked") == []


def test_a_token_sent_by_a_process_nested_past_the_ancestry_read_is_refused(tmp_path):
    from rollouttap.addon.attribution import PidResult

    def deep() -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        future.set_result(PidResult(4321, None, "its process is nested 64 or more levels deep", untraced=True))
        return future

    flow = _credentialed_request(tmp_path, "ag-deep", deep)
    assert flow.response is not None and flow.response.status_code == 407
    with Store(tmp_path / "s.db") as store:
        assert store.flows(agent_id="ag-deep") == []
        [row] = store.flows(state="error")
    assert row.attribution == "rejected" and "64 or more levels deep" in row.error


def test_the_watermark_stays_below_a_request_whose_sender_is_still_looked_up(tmp_path):
    # A request its agent sent just before it exited: its row comes once its lookup ends, and a reader waiting
    # for "everything before the agent ended" must not be told that was all.
    from rollouttap.addon.attribution import PidResult

    def committed() -> float:
        assert addon.writer.flush()
        with Store(tmp_path / "s.db") as store:
            [proxy] = store.proxies()
        return proxy["committed_through"] or 0.0

    async def run(flow):
        await addon.running()
        lookup = asyncio.get_running_loop().create_future()
        addon.who._conn_pid[flow.client_conn.id] = lookup
        hook = asyncio.create_task(addon.requestheaders(flow))
        await asyncio.sleep(0.05)  # the hook waits for the lookup
        arrived = addon.writer.unqueued_since
        assert arrived is not None and arrived <= time.time()
        addon.writer.nudge()
        assert committed() <= arrived  # the mark stopped at the request's arrival
        lookup.set_result(PidResult(None, None, "its process exited"))
        await hook
        await asyncio.sleep(0)  # the row is queued; the hold goes after it
        assert addon.writer.unqueued_since is None
        addon.writer.nudge()
        assert committed() > arrived
        with Store(tmp_path / "s.db") as store:
            assert store.flow(flow.id) is not None

    with _tap_in_test_context(tmp_path / "s.db") as (addon, _):
        asyncio.run(run(tflow.tflow()))
        addon.drain_s = 0.0  # the flow is never answered here
        asyncio.run(addon.done())


def test_each_request_holds_the_watermark_for_its_own_second_at_most(tmp_path, monkeypatch):
    # One lookup stuck (queued behind hundreds, say) lets go of the watermark after the bound; a request that came
    # after it still holds it for its own.
    from rollouttap.addon import capture
    monkeypatch.setattr(capture, "HOLD_MARK_S", 1.0)

    async def run():
        await addon.running()
        flows = [tflow.tflow(), tflow.tflow()]
        for flow in flows:
            addon.who._conn_pid[flow.client_conn.id] = asyncio.get_running_loop().create_future()
        hooks = [asyncio.create_task(addon.requestheaders(flows[0]))]
        await asyncio.sleep(0.01)
        first = addon.writer.unqueued_since
        await asyncio.sleep(0.5)
        hooks.append(asyncio.create_task(addon.requestheaders(flows[1])))
        await asyncio.sleep(0.01)
        second = addon._arrivals[max(addon._arrivals)]
        assert addon.writer.unqueued_since == first < second
        while addon.writer.unqueued_since == first:  # until the first one's bound passes ...
            await asyncio.sleep(0.01)
        assert addon.writer.unqueued_since == second  # ... which is not the second one's (half a second later)
        while addon.writer.unqueued_since is not None:
            await asyncio.sleep(0.01)
        for hook in hooks:
            hook.cancel()

    with _tap_in_test_context(tmp_path / "s.db") as (addon, _):
        asyncio.run(run())
        addon.drain_s = 0.0
        asyncio.run(addon.done())


def test_a_flow_that_ends_after_a_reader_gave_up_on_it_is_done_without_that_error(tmp_path):
    from rollouttap.addon.attribution import Attribution
    with _tap_in_test_context(tmp_path / "s.db") as (addon, _):
        asyncio.run(addon.running())
        flow = tflow.tflow(resp=True)
        addon._record_new(flow, Attribution("slow", "header"))
        assert addon.writer.flush()
        with Store(tmp_path / "s.db") as store:  # the manager's settle_flows, after its grace period
            store.mark_open_flows(agent_id="slow", error="still open 10s after the agent ended")
        addon.response(flow)  # the answer lands after all (the store was locked meanwhile, say)
        asyncio.run(addon.done())
    with Store(tmp_path / "s.db") as store:
        [row] = store.flows(agent_id="slow")
    assert row.state == "done" and row.error is None


def test_a_client_on_another_host_must_present_credentials(tmp_path):
    # With rollouttap_allow_remote the proxy is reachable from other hosts: nothing but credentials can name
    # a remote client's agent, and serving it anonymously would relay it to this host's loopback services.
    with _tap_in_test_context(tmp_path / "s.db") as (addon, tctx):
        def attribute(peer: str, claim: str | None = None):
            flow = tflow.tflow()
            flow.client_conn.peername = (peer, 40000)
            if claim is not None:
                flow.request.headers["X-Agent-ID"] = claim
            return asyncio.run(addon.who.attribute(flow))
        remote = attribute("203.0.113.9")
        assert remote.method == "rejected" and "another host" in remote.detail
        assert attribute("127.0.0.1").method != "rejected"  # a local client: its process can name its agent
        tctx.configure(addon, rollouttap_remote_anonymous=True)
        assert attribute("203.0.113.9").method == "none"
        # Served anonymously, it stays unattributed: its header would add to any tokenless agent's calls.
        claimed = attribute("203.0.113.9", claim="agent-1")
        assert (claimed.agent_id, claimed.method) == (None, "none") and "another host" in claimed.detail
        assert attribute("127.0.0.1", claim="agent-1").agent_id == "agent-1"  # this host's hand-run agents may
        asyncio.run(addon.done())


def test_stream_closed_by_client_after_done_is_complete(proxy, gate_server):
    server, gate = gate_server
    agent = "done-" + uuid.uuid4().hex[:8]
    url = f"http://127.0.0.1:{server.server_address[1]}/v1/done-first"
    with requests.post(url, json={}, headers={"X-Agent-ID": agent}, proxies={"http": proxy.url},
                       stream=True, timeout=20) as resp:
        lines = resp.iter_lines()
        assert next(lines) == b'data: {"n": 1}'
        assert next(line for line in lines if line) == b"data: [DONE]"
    # like the openai SDK, the client closed after [DONE]; the upstream still holds its end of message
    [flow] = settled_flows(proxy.config.store, agent_id=agent)
    gate.set()
    assert flow.state == "done" and "closed_after_done" in flow.meta
    assert flow.response_text() == 'data: {"n": 1}\n\ndata: [DONE]\n\n'


def test_https_through_route_with_ca_bundle(tmp_path, confdir, upstream):
    store = tmp_path / "runs.db"
    host = upstream.url.split("://", 1)[1]
    with start_proxy(store, confdir, routes=(f"api.openai.com={upstream.url}",)) as proc:
        agent = "route-" + uuid.uuid4().hex[:8]
        env = agent_env(proc, tag=agent)
        replies = run_client("openai", "https://api.openai.com/v1", env, "--marker", agent)
        assert agent in replies[0]
        [flow] = _chat_flows(store, agent)
        assert flow.host == "127.0.0.1" and flow.port == int(host.rsplit(":", 1)[1])
        assert flow.meta["routed_from"].startswith("https://api.openai.com/")
        assert flow.attribution == "pid"


def test_an_ipv6_model_server_is_named_in_brackets_through_the_reverse_listener_and_a_route(tmp_path, confdir):
    # mitmproxy's reverse mode and its host setter (routes) wrote "Host: ::1:PORT", stored as the flow's host; a
    # route from a bracketed IPv6 source never matched. The route's source is never connected to: it is routed.
    from rollouttap.manager.inspect import host_port
    from rollouttap.testing.upstream import ScriptedUpstream
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    with ScriptedUpstream(host="::1") as model:
        target = f"http://[::1]:{model.port}"
        with start_proxy(tmp_path / "runs.db", confdir, reverse_target=target,
                         routes=(f"[2001:db8::9]:80={target}",)) as proxy, requests.Session() as session:
            session.trust_env = False
            answers = [session.post(proxy.reverse_url + "/v1/chat/completions", json=body,
                                    headers={"X-Agent-ID": "v6-reverse"}, timeout=20),
                       session.post("http://[2001:db8::9]/v1/chat/completions", json=body,
                                    headers={"X-Agent-ID": "v6-route"}, proxies={"http": proxy.url}, timeout=20)]
            assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
            assert [r.header("host") for r in model.requests] == [f"[::1]:{model.port}"] * 2
            flows = {a: settled_flows(proxy.config.store, agent_id=a)[0] for a in ("v6-reverse", "v6-route")}
        assert all((f.host, f.port, f.url) == ("::1", model.port, f"{target}/v1/chat/completions")
                   for f in flows.values()), [(f.host, f.url) for f in flows.values()]
        assert flows["v6-route"].meta["routed_from"] == "http://[2001:db8::9]/v1/chat/completions"
        assert all("return_token_ids" in f.meta.get("injected", {}) for f in flows.values())  # model hosts both
        with Store(tmp_path / "runs.db") as store:  # as `rollouttap flows --host [::1]:PORT` looks them up
            assert len(store.flows(host=host_port(f"[::1]:{model.port}")[0])) == 2


def test_a_client_speaking_another_http_version_is_exported_with_it(tmp_path, confdir, upstream):
    from rollouttap.addon.export_flows import read_flow_file
    from rollouttap.manager.export import export_flows
    with start_proxy(tmp_path / "runs.db", confdir) as proxy:
        agent = "v10-" + uuid.uuid4().hex[:8]
        out = subprocess.run(["curl", "-sS", "--http1.0", "-x", proxy.url, "-H", f"X-Agent-ID: {agent}",
                              upstream.base_url + "/models"], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        [flow] = settled_flows(proxy.config.store, agent_id=agent)
        assert flow.meta["http_version"] == "HTTP/1.0"
        export_flows(proxy.config.store, tmp_path / "v10.flows", agent_id=agent)
    [exported] = read_flow_file(tmp_path / "v10.flows")
    assert exported.request.http_version == exported.response.http_version == "HTTP/1.0"


SEND_WITH = """
import sys, urllib.error, urllib.request
sys.stdin.readline()  # sent once the test has registered this process as an agent's root
opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": sys.argv[1]}))
try:
    print(opener.open(sys.argv[2], timeout=30).status)
except urllib.error.HTTPError as exc:
    print(exc.code)
"""


def test_a_token_from_a_just_started_untagged_agent_of_another_is_refused(tmp_path, confdir, upstream):
    # The proxy's cache of registered roots is up to a second old: a process under a root registered since
    # (that dropped its own tag) must not pass with another agent's token in that second.
    with start_proxy(tmp_path / "runs.db", confdir) as proxy:
        (victim, token), (thief, _) = _new_agent(proxy), _new_agent(proxy)
        creds = proxy.url.replace("http://", f"http://{victim}:{token}@")
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and k != "ROLLOUTTAP_AGENT_ID"}
        warm = subprocess.run([sys.executable, "-c", SEND_WITH, creds, upstream.base_url + "/models"], input="\n",
                              env=env, capture_output=True, text=True, timeout=60)
        assert warm.stdout.strip() == "200"  # from under no registered root: the token alone speaks
        client = subprocess.Popen([sys.executable, "-c", SEND_WITH, creds, upstream.base_url + "/models"],
                                  env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        with Store(proxy.config.store) as store:
            store.agent_started(thief, client.pid)  # the thief's root, registered after the cache was read
        out, _ = client.communicate("\n", timeout=60)
    assert out.strip() == "407"


def test_a_token_sent_by_a_process_that_escaped_another_agents_tree_with_its_tag_is_refused(
        tmp_path, confdir, upstream):
    # A double-forked process leaves its agent's tree but keeps its environment, the agent's tag included.
    root = subprocess.Popen(["sleep", "60"])  # the thief's registered root: not the escaped process's ancestor
    try:
        with start_proxy(tmp_path / "runs.db", confdir) as proxy:
            (victim, token), (thief, _) = _new_agent(proxy), _new_agent(proxy)
            with Store(proxy.config.store) as store:
                store.agent_started(thief, root.pid)
            creds = proxy.url.replace("http://", f"http://{victim}:{token}@")
            env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
            sent = [subprocess.run([sys.executable, "-c", SEND_WITH, creds, upstream.base_url + "/models"],
                                   input="\n", env={**env, **tag}, capture_output=True, text=True, timeout=60)
                    for tag in ({"ROLLOUTTAP_AGENT_ID": thief}, {"ROLLOUTTAP_AGENT_ID": victim}, {})]
    finally:
        root.kill()
        root.wait()
    # The thief's tag gives it away; the victim's own daemon, or a process with no tag, passes on the token.
    assert [s.stdout.strip() for s in sent] == ["407", "200", "200"]


def test_an_ended_agents_open_tunnel_is_refused_too(tmp_path, confdir, upstream):
    with start_proxy(tmp_path / "runs.db", confdir, routes=(f"api.openai.com={upstream.url}",)) as proxy:
        agent_id, token = _new_agent(proxy)
        env = agent_env(proxy, agent_id, token)
        with requests.Session() as session:  # one CONNECT, then requests inside that tunnel
            session.trust_env = False
            session.proxies, session.verify = {"https": env["HTTPS_PROXY"]}, env["REQUESTS_CA_BUNDLE"]
            url = "https://api.openai.com/echo"
            assert session.post(url, json={}, timeout=10).status_code == 200
            with Store(proxy.config.store) as store:
                store.agent_ended(agent_id, "ok")
            wait_for(lambda: session.post(url, json={}, timeout=10).status_code == 407, what="the tunnel refused")
        with Store(proxy.config.store) as store:
            assert len([f for f in store.flows() if f.method == "CONNECT"]) == 1  # the same tunnel throughout


def test_git_over_https_trusts_the_proxy_with_the_agents_environment(tmp_path, confdir, upstream):
    # An SWE agent's `git fetch` through the proxy: git's libcurl reads GIT_SSL_CAINFO, not CURL_CA_BUNDLE.
    # git sends proxy credentials only when challenged (http.proxyAuthMethod anyauth): the tag of a hand-run
    # agent names it.
    with start_proxy(tmp_path / "runs.db", confdir, routes=(f"github.com={upstream.url}",)) as proxy:
        agent_id = "git-" + uuid.uuid4().hex[:8]
        env = {**agent_env(proxy, tag=agent_id), "GIT_TERMINAL_PROMPT": "0", "HOME": str(tmp_path)}
        out = subprocess.run(["git", "ls-remote", "https://github.com/acme/tools.git"], env=env,
                             capture_output=True, text=True, timeout=60)
        assert "certificate" not in out.stderr, out.stderr
        with Store(proxy.config.store) as store:
            flows = wait_for(lambda: [f for f in store.flows(agent_id=agent_id)
                                      if f.method == "GET" and f.state != "open"],  # opened before its answer
                             what="git's GET, answered")
        assert flows[0].path.startswith("/acme/tools.git/info/refs") and flows[0].status_code == 404


@pytest.fixture(scope="module")
def base_url_proxy(tmp_path_factory, confdir, upstream):
    """A proxy with a reverse listener in front of the model, as AgentManager(base_url_mode=True) starts it."""
    store = tmp_path_factory.mktemp("base-url") / "runs.db"
    host = upstream.url.split("://", 1)[1]
    with start_proxy(store, confdir, model_hosts=(host,), reverse_target=upstream.url) as proc:
        yield proc


def _base_url_agent(proc) -> tuple[str, str, str, dict[str, str]]:
    """(agent_id, token, base URL, environment) of an agent as a base-URL-mode manager launches it."""
    agent_id, token = _new_agent(proc)
    link = ProxyLink(proc.url, proc.ca_cert, proc.reverse_url, None)
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env.update(link.env(agent_id, token))
    return agent_id, token, f"{link.reverse_url}/agents/{agent_id}/{token}/v1", env


@pytest.mark.parametrize("client, stream", [("aiohttp", False), ("aiohttp", True), ("curl", False),
                                            ("requests", False)])
def test_base_url_reaches_the_model_whichever_listener_the_client_picks(base_url_proxy, upstream, client,
                                                                        stream):
    # aiohttp (trust_env) matches NO_PROXY by host only and curl ignores its ports: both send the base URL
    # to the regular listener in absolute form, which mitmproxy alone would refuse to forward to itself.
    # requests honours NO_PROXY=localhost:PORT and goes to the reverse listener.
    agent_id, token, base, env = _base_url_agent(base_url_proxy)
    replies = run_client(client, base, env, "--marker", agent_id, *(["--stream"] if stream else []))
    assert agent_id in replies[0]
    [flow] = _chat_flows(base_url_proxy.config.store, agent_id)
    assert flow.attribution == "path" and flow.state == "done" and flow.status_code == 200
    assert (flow.host, flow.port, flow.path) == ("127.0.0.1", upstream.port, "/v1/chat/completions")
    assert flow.meta["injected"]["return_token_ids"] is True
    assert token not in json.dumps([flow.url, flow.meta, flow.request_headers])
    # Through the regular listener, the URL the client asked for is kept (without the agent path).
    assert flow.meta.get("routed_from") == (None if client == "requests" else
                                            base.replace(f"/agents/{agent_id}/{token}", "") + "/chat/completions")


def test_base_url_through_the_regular_listener_without_credentials(base_url_proxy, upstream):
    agent_id, token, base, _ = _base_url_agent(base_url_proxy)
    resp = requests.post(base + "/chat/completions", json={"model": "p", "messages": [
        {"role": "user", "content": f"say {agent_id}"}]}, proxies={"http": base_url_proxy.url}, timeout=10)
    assert resp.status_code == 200 and agent_id in resp.json()["choices"][0]["message"]["content"]
    [flow] = _chat_flows(base_url_proxy.config.store, agent_id)
    assert (flow.attribution, flow.port, flow.path) == ("path", upstream.port, "/v1/chat/completions")


def test_a_base_url_path_token_sent_elsewhere_is_not_stored_in_clear(base_url_proxy):
    # Credentials, and a base URL naming the reverse listener by an address the proxy does not take for
    # its own (another name of this host): forwarded as addressed, recorded with the path as asked.
    agent_id, token = _new_agent(base_url_proxy)
    port = int(base_url_proxy.reverse_url.rsplit(":", 1)[1])
    creds = base_url_proxy.url.replace("http://", f"http://{agent_id}:{token}@")
    url = f"http://127.0.0.2:{port}/agents/{agent_id}/{token}/v1/models?api_key=k-{token}"
    requests.get(url, proxies={"http": creds}, timeout=10)
    with Store(base_url_proxy.config.store) as store:
        [flow] = wait_for(lambda: [f for f in store.flows(agent_id=agent_id) if f.state != "open"], what="flow")
    assert token not in json.dumps([flow.url, flow.path, flow.meta, flow.request_headers, flow.error])
    from rollouttap.store.redact import redacted_query_value
    assert flow.path.split("?")[0] == f"/agents/{agent_id}/{redacted_query_value(token)}/v1/models"


def _looped_chat(via: str, reverse_url: str, creds: tuple[str, str], victim: str, token: str) -> int:
    """Through ``via`` (a proxy's regular listener), a chat call to a reverse listener named as 127.1 (an
    address no proxy takes for its own), its path carrying ``victim``'s token: the listener's client is a proxy."""
    port = int(reverse_url.rsplit(":", 1)[1])
    proxy_url = via.replace("http://", f"http://{creds[0]}:{creds[1]}@")
    resp = requests.post(f"http://127.1:{port}/agents/{victim}/{token}/v1/chat/completions",
                         json={"model": "p", "messages": [{"role": "user", "content": "hi"}]},
                         proxies={"http": proxy_url}, timeout=10)
    return resp.status_code


def _refused_loop(store_path: Path, looper_pid: int, victim: str):
    """The looped request the reverse listener's proxy refused (sent by ``looper_pid``), none kept as ``victim``'s."""
    with Store(store_path) as store:
        [inner] = wait_for(lambda: [f for f in store.flows(state="error") if f.pid == looper_pid],
                           what="the looped request")
        assert store.flows(agent_id=victim) == []
    return inner


def test_a_stolen_base_url_token_looped_through_the_proxy_itself_is_refused(base_url_proxy):
    # The loop's inner connection comes from the proxy's own process, under no agent's root: the token of the
    # agent named in the path must not pass for whoever sent the outer request.
    sender, sender_token = _new_agent(base_url_proxy)
    victim, victim_token = _new_agent(base_url_proxy)
    assert _looped_chat(base_url_proxy.url, base_url_proxy.reverse_url, (sender, sender_token), victim,
                        victim_token) == 407
    inner = _refused_loop(base_url_proxy.config.store, base_url_proxy.proc.pid, victim)
    assert inner.attribution == "rejected" and "looped back" in inner.error


@pytest.mark.parametrize("store", ["same", "another"])
def test_a_stolen_base_url_token_looped_through_another_proxy_is_refused(base_url_proxy, confdir, tmp_path, store):
    # On the same store as AgentManager(proxies=2) runs them; on another as a store per rank does (the sender is
    # an agent of the proxy it goes through).
    victim, victim_token = _new_agent(base_url_proxy)
    with start_proxy(base_url_proxy.config.store if store == "same" else tmp_path / "other.db", confdir) as other:
        sender, sender_token = _new_agent(other)
        assert _looped_chat(other.url, base_url_proxy.reverse_url, (sender, sender_token), victim,
                            victim_token) == 407
        inner = _refused_loop(base_url_proxy.config.store, other.proc.pid, victim)
    assert inner.attribution == "rejected" and "looped back" in inner.error


def test_a_proxy_of_another_store_run_by_an_agent_speaks_for_that_agent(base_url_proxy, confdir, tmp_path,
                                                                         monkeypatch):
    # A nested manager: an agent (here the victim itself, by its tag) runs its own proxy and points its agents'
    # model URL at its own base URL: the outer proxy serves them as that agent.
    agent, token = _new_agent(base_url_proxy)
    monkeypatch.setenv("ROLLOUTTAP_AGENT_ID", agent)  # the inner proxy runs under the agent's tag
    with start_proxy(tmp_path / "inner.db", confdir) as inner:
        monkeypatch.delenv("ROLLOUTTAP_AGENT_ID")
        sender, sender_token = _new_agent(inner)
        assert _looped_chat(inner.url, base_url_proxy.reverse_url, (sender, sender_token), agent, token) == 200
        inner_pid = inner.proc.pid
    [flow] = _chat_flows(base_url_proxy.config.store, agent)
    assert flow.attribution == "path" and flow.pid == inner_pid


TOKEN = "Ab3_dEf-GhIjKlMnOpQrStUv"  # as new_token() makes them: 24 URL-safe characters


@pytest.mark.parametrize("target, expected", [
    (f"/agents/a1/{TOKEN}/v1/x", "/agents/a1/R/v1/x"),
    (f"http://h:1/agents/a1/{TOKEN}/v1/x?y=1", "http://h:1/agents/a1/R/v1/x?y=1"),
    (f"https://h/agents/a1/{TOKEN}", "https://h/agents/a1/R"),
    (f"/agents/a1/{TOKEN}?q", "/agents/a1/R?q"),
    ("/agents/123/messages", "/agents/123/messages"),  # another API's path: no token there
    ("/agents/asst_1/5f8d0d55b54764421b7156c9", "/agents/asst_1/5f8d0d55b54764421b7156c9"),  # an ObjectId
    (f"/agents/a1/{TOKEN}x/v1", f"/agents/a1/{TOKEN}x/v1"),
    (f"/v1/agents/a1/{TOKEN}", "/v1/agents/a1/R"),  # a base URL's path anywhere, behind a prefix too
    ("/agents/a1/redacted-sha256-0123456789ab/v1", "/agents/a1/redacted-sha256-0123456789ab/v1"),  # as stored
    ("/agents/a1", "/agents/a1"), ("/agents//x", "/agents//x"), ("http://h", "http://h"), ("", ""),
])
def test_hide_agent_tokens(target, expected):
    from rollouttap.store.redact import hide_agent_tokens, redacted_query_value
    assert hide_agent_tokens(target) == expected.replace("/R", "/" + redacted_query_value(TOKEN))


@pytest.mark.parametrize("text, kept", [
    (f"/x?proxy=http://ag-1:{TOKEN}@127.0.0.1:8080/", "/x?proxy=http://ag-1:R@127.0.0.1:8080/"),  # its HTTP_PROXY
    (f"/x?p=http%3A%2F%2Fag-1%3A{TOKEN}%40127.0.0.1%3A8080&y=1", "/x?p=http%3A%2F%2Fag-1%3AR%40127.0.0.1%3A8080&y=1"),
    (f"via http://ag-1:{TOKEN}@10.0.0.5:8080", "via http://ag-1:R@10.0.0.5:8080"),  # a header's value
    ("http://user@h/x", "http://user@h/x"), ("mailto:a@b.c", "mailto:a@b.c"), ("http://h:80/x@y", "http://h:80/x@y"),
    # a URL with a port, then another parameter holding an address: no password there
    *((t, t) for t in ("/o?redirect_uri=http://localhost:8080/cb&login_hint=me@x.org",)),
    ("env=prod,origin=http://localhost:8080,user=a@x.org", "env=prod,origin=http://localhost:8080,user=a@x.org"),
    ("url=http://h:8080&e=a@b.com", "url=http://h:8080&e=a@b.com"),
])
def test_hide_agent_tokens_hides_proxy_url_passwords(text, kept):
    from rollouttap.store.redact import hide_agent_tokens, redacted_query_value
    assert hide_agent_tokens(text) == kept.replace(":R", ":" + redacted_query_value(TOKEN)).replace(
        "%3AR", "%3A" + redacted_query_value(TOKEN))


GH = "ghp_A1b2C3d4E5f6G7h8I9j0K1l2m3N4o5P6q7"  # a GitHub token's shape


@pytest.mark.parametrize("text, kept", [
    (f"/x?repo=https://{GH}@github.com/o/r.git", "/x?repo=https://R@github.com/o/r.git"),  # a token as the user
    (f"/x?repo=https%3A%2F%2F{GH}%40github.com%2Fo", "/x?repo=https%3A%2F%2FR%40github.com%2Fo"),
    (f"clone https://{GH}@github.com/o/r and go", "clone https://R@github.com/o/r and go"),  # a header's value
    ("https://x-access-token@github.com/o", "https://x-access-token@github.com/o"),  # a name, not a token
    ("ssh://git@github.com/o/r", "ssh://git@github.com/o/r"), ("mailto:someone.with.a.long.name@x.org",) * 2,
    (f"https://{GH}:@github.com/o", "https://R:@github.com/o"),  # an empty password: the user is the token
])
def test_hide_agent_tokens_hides_a_token_given_as_a_urls_user(text, kept):
    from rollouttap.store.redact import hide_agent_tokens, redacted_query_value
    assert hide_agent_tokens(text) == kept.replace("://R", "://" + redacted_query_value(GH)).replace(
        "%2FR%40", "%2F" + redacted_query_value(GH) + "%40")
    assert hide_agent_tokens(hide_agent_tokens(text)) == hide_agent_tokens(text)  # a stored value stays


@pytest.mark.parametrize("text", [f"https://{GH}:x-oauth-basic@github.com/o/r",  # GitHub's documented form
                                  f"/x?r=https%3A%2F%2F{GH}%3Ax-oauth-basic%40github.com"])
def test_a_token_as_a_urls_user_with_a_password_is_hidden_with_it(text):
    from rollouttap.store.redact import hide_agent_tokens
    out = hide_agent_tokens(text)
    assert GH not in out and "x-oauth-basic" not in out and "github.com" in out
    assert hide_agent_tokens(out) == out


def test_a_token_as_a_urls_user_is_hidden_in_any_header():
    from rollouttap.store.redact import redact_headers
    headers = [("Referer", f"https://{GH}@github.com/o"), ("X-Repo", f"https://{GH}@github.com/o")]
    assert not [v for _, v in redact_headers(headers) if GH in v]


def test_hide_agent_tokens_leaves_a_long_value_of_near_misses_as_it_is():
    # The id part once ran across "%2F" lazily: 100 KB of these took seconds on the proxy's event loop (the
    # time is bench's business; here the bounded id must still find a token behind them).
    from rollouttap.store.redact import hide_agent_tokens, redacted_query_value
    noise = "%2Fagents%2Fx" * 8000
    assert hide_agent_tokens(noise) == noise
    assert hide_agent_tokens(noise + f"%2Fagents%2Fa1%2F{TOKEN}") == \
        noise + f"%2Fagents%2Fa1%2F{redacted_query_value(TOKEN)}"


@pytest.mark.parametrize("target, expected", [
    (f"http://h/x?callback=http://127.0.0.1:9/agents/a1/{TOKEN}/v1",
     "http://h/x?callback=http://127.0.0.1:9/agents/a1/R/v1"),
    (f"/x?cb=http%3A%2F%2Fh%2Fagents%2Fa1%2F{TOKEN}%2Fv1", "/x?cb=http%3A%2F%2Fh%2Fagents%2Fa1%2FR%2Fv1"),
    (f"/x?cb=http%3a%2f%2fh%2fagents%2fa1%2f{TOKEN}", "/x?cb=http%3a%2f%2fh%2fagents%2fa1%2fR"),
    ("/x?cb=/agents/asst_1/5f8d0d55b54764421b7156c9", "/x?cb=/agents/asst_1/5f8d0d55b54764421b7156c9"),
])
def test_an_agent_base_url_inside_a_query_value_is_stored_without_its_token(target, expected):
    # The url column kept it in clear (only a path that starts with /agents/ was looked at).
    from rollouttap.store.redact import redacted_query_value
    assert flowcols.stored_target(target) == expected.replace("/R", "/" + redacted_query_value(TOKEN)).replace(
        "%2FR", "%2F" + redacted_query_value(TOKEN)).replace("%2fR", "%2f" + redacted_query_value(TOKEN))


@pytest.mark.parametrize("path", [
    f"/agents/a1/{TOKEN}/v1/chat/completions", "/api;session=S1/v1/chat/completions?key=K2&alt=sse",
    "/x;jsessionid=J;v=1", "/v1/chat/completions", f"/v1/x?callback=http://h/agents/a1/{TOKEN}/v1",
])
def test_replay_matches_a_live_path_to_its_stored_form(path):
    # The store keeps a path with its secrets redacted; a replayed agent sends them in clear (or other keys).
    from rollouttap.addon.replay_book import _keyless
    stored = flowcols.stored_target(path)
    assert _keyless(stored) == _keyless(path) and _keyless(stored) == _keyless(stored.replace("S1", "S9"))
    assert ("/v1/chat/completions" in stored) == ("/v1/chat/completions" in path)  # the path goes on after them


def test_proxy_refuses_non_loopback_listen_by_default(tmp_path, confdir):
    from rollouttap.errors import ConfigError, ProxyError
    with pytest.raises(ConfigError, match="allow_remote"):  # the config says so before mitmdump starts ...
        start_proxy(tmp_path / "runs.db", confdir, host="0.0.0.0")
    with pytest.raises(ProxyError, match="rollouttap_allow_remote"):  # ... and the addon under plain mitmdump
        start_proxy(tmp_path / "runs.db", confdir, host="0.0.0.0", allow_remote=True,
                    extra={"rollouttap_allow_remote": "false"})


def test_a_proxy_on_every_ipv6_and_ipv4_address_starts_with_its_reverse_listener(tmp_path, confdir, upstream):
    # "::" listens on every address: the reverse listener's port was picked with an IPv4 socket, which cannot
    # bind "::" (socket.gaierror at start). Both stacks are served: asyncio binds "::" IPv6-only, so IPv4
    # clients, 127.0.0.1 included, were refused.
    with start_proxy(tmp_path / "runs.db", confdir, host="::", allow_remote=True,
                     reverse_target=upstream.url) as proc, requests.Session() as session:
        assert proc.reverse_url is not None and proc.alive()
        session.trust_env = False
        port, reverse_port = proc.port, int(proc.reverse_url.rsplit(":", 1)[1])
        for host in ("127.0.0.1", "[::1]", "[::]"):
            assert session.get(upstream.url + "/v1/models", proxies={"http": f"http://{host}:{port}"},
                               headers={"X-Agent-ID": "dual"}, timeout=10).status_code == 200, host
            assert session.get(f"http://{host}:{reverse_port}/v1/models", headers={"X-Agent-ID": "dual"},
                               timeout=10).status_code == 200, host
        assert proc.url == f"http://127.0.0.1:{port}"  # agents are given an address to connect to, not "::"


@pytest.mark.parametrize("host, remote, listen_host", [
    ("::", "true", ""),  # mitmproxy's every address, IPv4 and IPv6
    ("::", "false", "::"),  # the addon refuses it, as it does 0.0.0.0
    ("0.0.0.0", "true", "0.0.0.0"), ("::1", "true", "::1"), ("127.0.0.1", "false", "127.0.0.1"),
])
def test_mitmproxy_is_told_to_listen_on_both_stacks_for_every_ipv6_address(tmp_path, host, remote, listen_host):
    from rollouttap.manager.proxy import ProxyConfig
    config = ProxyConfig(store=tmp_path / "s.db", host=host, allow_remote=True,
                         extra={"rollouttap_allow_remote": remote})
    argv = config.argv("p")
    assert argv[argv.index("--listen-host") + 1] == listen_host


@pytest.mark.parametrize("launcher", ["fastdump", "mitmdump"])
def test_a_proxy_started_in_a_folder_with_a_module_named_like_a_stdlib_one_runs(tmp_path, confdir, monkeypatch,
                                                                               launcher):
    # An agent's project folder, say: under `python -m`/`-c` its files would come before the standard library's.
    work = tmp_path / "project"
    work.mkdir()
    for name in ("concurrent.py", "http.py", "json.py"):
        (work / name).write_text("raise SystemExit('shadowed: ' + __file__)\n")
    monkeypatch.chdir(work)
    with start_proxy(tmp_path / "s.db", confdir, launcher=launcher) as proxy:  # its CA made by a process too
        assert proxy.alive()
    from rollouttap.manager.reaper import Reaper
    reaper = Reaper.start(tmp_path / "s.db")  # AgentManager's guard process
    try:
        assert reaper.wait_ready()
    finally:
        reaper.stop()


def test_plain_mitmdump_with_the_addon_listens_on_loopback_only(tmp_path, confdir):
    # mitmdump binds its listeners (on every interface by default) before a -s script's options apply.
    import psutil
    from rollouttap.addon.loopback import is_loopback
    from rollouttap.manager.proxy import free_port
    store, port = tmp_path / "runs.db", free_port()
    entry = Path(flowcols.__file__).with_name("entry.py")
    proc = subprocess.Popen([str(Path(sys.executable).with_name("mitmdump")), "-s", str(entry), "-p", str(port),
                             "--set", f"rollouttap_store={store}", "--set", f"confdir={confdir}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with Store(store) as s:  # the proxy row is written once the listeners are final
            [row] = wait_for(lambda: s.proxies() if store.exists() else None, 30, "the proxy's row")
        listening = [c.laddr.ip for c in psutil.net_connections("tcp")
                     if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
        assert listening and all(is_loopback(ip) for ip in listening), listening
        assert [(l["host"], l["port"]) for l in row["listen"]] == [("127.0.0.1", port)]
    finally:
        proc.terminate()
        out = proc.communicate(timeout=15)[0]
    assert "binding on 127.0.0.1 instead" in out


@pytest.mark.parametrize("mode, refused", [
    ("regular@:18555", True),  # an empty host: mitmproxy listens on every address
    ("regular@0.0.0.0:18555", True), ("regular@[::]:18555", True), ("reverse:http://h:80@10.1.2.3:9", True),
    ("regular@127.0.0.1:18555", False), ("regular@18555", False),  # a port alone: on listen_host, loopback
    ("regular", False), ("reverse:http://example.com:80@127.0.0.1:9", False),
])
def test_a_mode_that_would_listen_beyond_loopback_is_refused(mode, refused):
    from types import SimpleNamespace

    from mitmproxy import exceptions

    from rollouttap.addon.capture_options import loopback_only
    opts = SimpleNamespace(rollouttap_allow_remote=False, listen_host="127.0.0.1", mode=[mode])
    if refused:
        with pytest.raises(exceptions.OptionsError, match="non-loopback"):
            loopback_only(opts)
    else:
        loopback_only(opts)


@pytest.mark.parametrize("field, value, message", [
    ("model_hosts", ("http://127.0.0.1:8000",), "HOST\\[:PORT\\]"),
    ("model_hosts", ("not a host:abc",), "HOST\\[:PORT\\]"),
    ("model_hosts", ("",), "HOST\\[:PORT\\]"),
    ("routes", ("garbage",), "HOST\\[:PORT\\]=BASE_URL"),
    ("host", "10.1.2.3", "allow_remote"),
    ("pid_lookup", "Eager", "'eager' or 'fallback'"),  # a typo would turn the token-owner check off
    ("port", 70000, "not 0-65535"),
    ("reverse_port", -1, "not 0-65535"),
    ("host", "nosuch.invalid", "neither localhost nor a loopback address"),
])
def test_proxy_config_refuses_bad_values_before_starting(tmp_path, field, value, message):
    from rollouttap.errors import ConfigError
    from rollouttap.manager.proxy import ProxyConfig
    with pytest.raises(ConfigError, match=message):
        ProxyConfig(store=tmp_path / "s.db", **{field: value})


@pytest.mark.parametrize("setting, message", [
    ("rollouttap_token_ids=maybe", 'Failed to parse option rollouttap_token_ids: boolean must be "true"'),
    ("rollouttap_tcp_quickack=False", "Failed to parse option rollouttap_tcp_quickack"),  # another addon's
    ("rollouttap_parent_pid=abc", "rollouttap_parent_pid: not an integer: abc"),
    ("rollouttap_pid_lookup=sometimes", "rollouttap_pid_lookup must be one of eager, fallback, not 'sometimes'"),
    ("rollouttap_model_hosts=http://127.0.0.1:9/v1", "'http://127.0.0.1:9/v1' is not HOST[:PORT]"),
    ("rollouttap_token_id=false", "unknown option rollouttap_token_id: no loaded addon declares it"),  # a typo
])
def test_plain_mitmdump_exits_on_a_bad_rollouttap_setting(tmp_path, confdir, setting, message):
    # mitmproxy drops a script whose --set value does not parse and runs on, recording nothing.
    entry = Path(flowcols.__file__).with_name("entry.py")
    proc = subprocess.run([str(Path(sys.executable).with_name("mitmdump")), "-s", str(entry), "-p", "0",
                           "--set", f"rollouttap_store={tmp_path / 'runs.db'}", "--set", f"confdir={confdir}",
                           "--set", setting], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and message in proc.stdout + proc.stderr


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.0.0.2", True), ("LOCALHOST", True), ("::1", True), ("[::1]", True),
    ("0:0:0:0:0:0:0:1", True), ("::ffff:127.0.0.1", True), ("0.0.0.0", False), ("10.1.2.3", False), ("::", False),
    ("example.com", False),
])
def test_one_loopback_rule_for_the_addon_and_the_config(host, loopback):
    from rollouttap.addon.loopback import is_loopback
    assert is_loopback(host) == loopback


@pytest.mark.parametrize("host, every", [("0.0.0.0", True), ("::", True), ("[::]", True), ("", True),
                                         ("127.0.0.1", False), ("192.0.2.2", False), ("localhost", False)])
def test_which_listen_hosts_mean_every_address(host, every):
    from rollouttap.addon.loopback import is_any_address
    assert is_any_address(host) == every


@pytest.mark.parametrize("text, ok", [
    ("127.0.0.1:8000", True), ("localhost", True), ("[::1]:8000", True), ("::1", True), ("::1:8000", True),
    ("vllm_0.local:80", True), (" h:1 ", True), ("[fe80::1%eth0]:80", True),
    ("http://h:1", False), ("h:1/v1", False), ("not a host:abc", False), ("", False), ("a:b:c", False),
    ("host:99999", False), ("u@h", False),
])
def test_model_host_values(text, ok):
    from rollouttap.addon.loopback import is_host_port
    assert is_host_port(text) == ok


@pytest.mark.parametrize("hosts", [("127.0.0.1:8000", "localhost", "[::1]:8000", "::1", "vllm-0.cluster.local:80")])
def test_proxy_config_takes_model_hosts_as_the_addon_does(tmp_path, hosts):
    from rollouttap.manager.proxy import ProxyConfig
    assert ProxyConfig(store=tmp_path / "s.db", model_hosts=hosts).model_hosts == hosts


def test_proxy_without_store_option_fails_clearly(tmp_path, confdir):
    from rollouttap.manager.proxy import addon_script
    out = subprocess.run([sys.executable, "-c", "from mitmproxy.tools.main import mitmdump; mitmdump()",
                          "-s", str(addon_script()), "--set", f"confdir={confdir}",
                          "--listen-port", "0"], capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert "rollouttap_store" in out.stdout + out.stderr


def test_stopping_the_proxy_commits_everything(tmp_path, confdir, upstream):
    store = tmp_path / "runs.db"
    proc = start_proxy(store, confdir)
    agent = "stop-" + uuid.uuid4().hex[:8]
    run_client("requests", upstream.base_url, agent_env(proc, tag=agent), "--calls", "20")
    proc.stop()
    with Store(store) as s:
        flows = s.flows(agent_id=agent)
        assert len(flows) == 20 and all(f.state == "done" for f in flows)
        [row] = s.proxies()
        assert row["stopped_at"] is not None


def _catches(pid: int, signum: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        caught = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    return bool(caught & (1 << (signum - 1)))


def test_running_proxy_answers_store_nudges(proxy):
    # Readers nudge a proxy to write its watermark now (store/nudge.py); the addon handles the signal.
    # The handler is what this checks (SigCgt); the mark after it would also come with the 0.1 s heartbeat,
    # so that half only shows the signal does the proxy no harm. test_store covers the writer's answer.
    from rollouttap.store.nudge import NUDGE_SIGNAL
    assert _catches(proxy.proc.pid, NUDGE_SIGNAL)
    before = time.time()
    os.kill(proxy.proc.pid, NUDGE_SIGNAL)
    with Store(proxy.config.store) as store:
        wait_for(lambda: (store.proxies()[0]["committed_through"] or 0) >= before, what="a watermark")
    assert proxy.proc.poll() is None


def test_a_store_changed_at_run_time_gets_the_proxy_row_and_the_old_one_stops(tmp_path):
    taddons, Proxyserver = _taddons()
    from mitmproxy import hooks

    from rollouttap.addon.capture import RolloutTap
    addon = RolloutTap()
    first, second = tmp_path / "a.db", tmp_path / "b.db"
    with taddons.context(Proxyserver()) as tctx:
        tctx.master.addons.register(addon)  # loaded, not configured with every option (no store yet)

        def set_store(path) -> None:
            tctx.options.update(rollouttap_store=str(path))
            tctx.master.addons.invoke_addon_sync(addon, hooks.ConfigureHook({"rollouttap_store"}))
        set_store(first)
        asyncio.run(addon.running())
        from rollouttap.addon.attribution import Attribution
        from rollouttap.addon.streamtap import StreamTap
        flow = tflow.tflow(resp=True)
        addon._record_new(flow, Attribution("on", "header"))
        addon._live[flow.id].tap = tap = StreamTap()
        set_store(second)
        # Its row in the old store ends as cut off, but the proxy goes on: so does the flow, for its client.
        assert tap(b"data: more\n\n") == [b"data: more\n\n"]
        addon.response(flow)
        assert flow.error is None
        with Store(first) as old_store:  # the old writer was closed: all it had is committed
            [old] = old_store.proxies()
        assert old["stopped_at"] is not None  # readers of the old store stop waiting for this proxy
        assert addon.writer.flush()
        with Store(second) as new_store:
            [new] = new_store.proxies()
        assert new["proxy_id"] == old["proxy_id"] and new["stopped_at"] is None
        asyncio.run(addon.done())


def _one_shot_server(answer: Callable[[socket.socket, bytes], None]) -> tuple[socket.socket, threading.Thread]:
    """Accepts one connection, reads up to the end of the request head, and lets ``answer`` reply."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = server.accept()
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            answer(conn, data)
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return server, thread


def _whole_request(conn: socket.socket, data: bytes) -> tuple[bytes, bytes]:
    """(head, body) of a request whose head is in ``data``, reading the rest of its Content-Length body."""
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += conn.recv(65536)
    return head, body


def _truncating_server() -> tuple[socket.socket, threading.Thread]:
    """Answers one request with headers promising 100 bytes, sends 10 and closes."""
    return _one_shot_server(lambda conn, _data: conn.sendall(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Seen: yes\r\n"
        b"Content-Length: 100\r\n\r\n{\"partial\""))


def test_response_broken_after_its_headers_keeps_status_and_headers(proxy):
    server, thread = _truncating_server()
    agent = "trunc-" + uuid.uuid4().hex[:8]
    url = f"http://127.0.0.1:{server.getsockname()[1]}/v1/models"
    with server:
        # Not a model host: the body goes to the client live, so it meets the broken answer as it would directly.
        with pytest.raises(requests.exceptions.ChunkedEncodingError, match="IncompleteRead"):
            requests.get(url, headers={"X-Agent-ID": agent}, proxies={"http": proxy.url}, timeout=20)
        thread.join(10)
    [flow] = settled_flows(proxy.config.store, agent_id=agent)
    assert flow.state == "error" and flow.error
    assert flow.status_code == 200 and flow.response_header("x-seen") == "yes"
    assert flow.t_response_headers is not None and not flow.streamed
    assert flow.response_body == b'{"partial"'  # what arrived is kept


def _request(**kw) -> http.Request:
    req = http.Request.make(kw.pop("method", "GET"), kw.pop("url", "http://example.com/"), b"",
                            kw.pop("headers", {}))
    for key, value in kw.items():
        setattr(req, key, value)
    return req


@pytest.mark.parametrize("make", [
    lambda: _request(url="http://127.0.0.1:8000/v1/chat/completions"),
    lambda: _request(url="http://127.0.0.1:8000/x", headers={"Host": "api.openai.com"}),
    lambda: _request(url="https://10.0.0.1/x", headers={"Host": "api.openai.com:8443"}),
    lambda: _request(url="https://10.0.0.1/x", headers={"Host": "API.OpenAI.com:443"}),
    lambda: _request(url="http://127.0.0.1/x", headers={"Host": "xn--bcher-kva.example"}),
    lambda: _request(url="http://127.0.0.1/x", headers={"Host": "bad host:99999"}),
    lambda: _request(method="OPTIONS", url="http://example.com:8080/", headers={"Host": "example.com:8080"},
                     path="*"),
    lambda: _request(method="CONNECT", url="http://example.com:443/", headers={"Host": "example.com:443"},
                     authority="example.com:443", path=""),
    lambda: _request(url="http://127.0.0.1:8000/x", http_version="HTTP/2.0", authority="h2.example:8000"),
    lambda: _request(url="http://127.0.0.1:8000/x", headers={"Host": "a.example"}, scheme="ftp"),
])
def test_pretty_where_matches_mitmproxy(make):
    req = make()
    assert flowcols.pretty_where(req) == (req.pretty_url, req.pretty_host)
    assert flowcols.pretty_where(req) == (req.pretty_url, req.pretty_host)  # cached parse, same answer


@pytest.mark.parametrize("regular", [False, True])
def test_an_ipv6_target_is_stored_in_brackets_in_its_url(regular):
    # mitmproxy's URLs leave them out: "http://::1:9000/x" names no port.
    req = _request(url="http://[::1]:9000/x?q=1")
    req.headers["Host"] = "[::1]:9000"  # after the URL: mitmproxy's setter writes it without brackets
    assert flowcols.pretty_where(req, regular) == ("http://[::1]:9000/x?q=1", "::1")
    connect = _request(method="CONNECT", url="http://[::1]:443/", authority="[::1]:443", path="")
    from rollouttap.addon.attribution import Attribution
    assert flowcols.opened(tflow.tflow(req=connect), "p", Attribution(None, "none"))["url"] == "[::1]:443"


@pytest.mark.parametrize("target, http_version, host", [
    ("http://[::1]:8000/v1", "HTTP/1.1", "[::1]:8000"), ("http://[::1]/v1", "HTTP/1.1", "[::1]"),
    ("https://[2001:db8::1]:8443/v1", "HTTP/2.0", "[2001:db8::1]:8443"),
    ("http://127.0.0.1:8000/v1", "HTTP/1.1", "127.0.0.1:8000"),
])
def test_a_request_routed_to_an_ipv6_address_names_it_in_brackets(target, http_version, host):
    # mitmproxy's host setter writes "Host: ::1:8000", which servers refuse or read as another host.
    from rollouttap.addon.capture import readdress
    from rollouttap.addon.routes import parse_route
    req = _request(url="https://api.openai.com/chat/completions", headers={"Host": "api.openai.com"},
                   http_version=http_version)
    if http_version == "HTTP/2.0":
        req.authority = "api.openai.com"
    assert readdress(req, parse_route(f"api.openai.com={target}")) == "https://api.openai.com/chat/completions"
    assert req.host_header == host and req.headers["Host"] == host
    assert flowcols.pretty_where(req)[1] == req.host


@pytest.mark.parametrize("header, fixed", [
    ("::1:8000", "[::1]:8000"),  # as mitmproxy's reverse mode writes it for reverse:http://[::1]:8000
    ("[::1]:8000", "[::1]:8000"), ("localhost:7001", "localhost:7001"),  # keep_host_header: the client's own
])
def test_an_ipv6_host_header_written_without_brackets_gets_them(header, fixed):
    req = _request(url="http://[::1]:8000/v1/models")
    req.headers["Host"] = header
    flowcols.bracket_ipv6_host(req)
    assert req.headers["Host"] == fixed
    ipv4 = _request(url="http://127.0.0.1:8000/v1/models", headers={"Host": "127.0.0.1:8000"})
    flowcols.bracket_ipv6_host(ipv4)
    assert ipv4.headers["Host"] == "127.0.0.1:8000"


@pytest.mark.parametrize("change", [
    lambda req: None,
    lambda req: req.headers.__setitem__("X-New", "1"),
    lambda req: req.headers.pop("Host"),
    lambda req: setattr(req, "host", "10.1.1.1"),
    lambda req: setattr(req, "port", 9999),
    lambda req: setattr(req, "path", "/v2/x"),
    lambda req: setattr(req, "scheme", "https"),
    lambda req: setattr(req, "http_version", "HTTP/2.0"),
])
def test_request_sent_leaves_out_only_columns_that_cannot_have_changed(change):
    flow = tflow.tflow()
    flow.request.headers["Host"] = "api.example:8000"
    key, before = flowcols.request_key(flow.request), flowcols.request_sent(flow)
    change(flow.request)
    full = flowcols.request_sent(flow)
    short = flowcols.request_sent(flow, key)
    if flowcols.request_key(flow.request) == key:
        assert full == before  # the key really covers every input of the columns left out
        assert short == {"request_body": flow.request.raw_content} and set(full) > set(short)
    else:
        assert short == full
    assert {k: v for k, v in full.items() if k in short} == short


def _gzip_model_server(answer: dict) -> tuple[socket.socket, threading.Thread, list[bytes]]:
    """A model host that gzips its one answer whatever the request asks (a gateway might)."""
    import gzip
    heads: list[bytes] = []

    def reply(conn: socket.socket, data: bytes) -> None:
        heads.append(_whole_request(conn, data)[0])
        packed = gzip.compress(json.dumps(answer).encode())
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
                     b"Content-Length: " + str(len(packed)).encode() + b"\r\n\r\n" + packed)
    return (*_one_shot_server(reply), heads)


def test_injected_fields_are_hidden_from_a_compressed_answer_too(tmp_path, confdir):
    answer = {"id": "c1", "object": "chat.completion", "model": "m", "prompt_token_ids": [1, 2, 3],
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "logprobs": None,
                           "finish_reason": "stop", "token_ids": [7, 8]}]}
    server, thread, heads = _gzip_model_server(answer)
    host = f"127.0.0.1:{server.getsockname()[1]}"
    with server, start_proxy(tmp_path / "s.db", confdir, model_hosts=(host,), logprobs=False) as proxy:
        resp = requests.post(f"http://{host}/v1/chat/completions", json={"model": "m", "messages": []},
                             headers={"X-Agent-ID": "gz", "Accept-Encoding": "gzip"},
                             proxies={"http": proxy.url}, timeout=20)
        thread.join(10)
        [flow] = settled_flows(proxy.config.store, agent_id="gz")
    assert b"accept-encoding: identity" in heads[0].lower()  # asked not to compress ...
    got = resp.json()  # ... and stripped all the same when the answer came compressed
    assert got["prompt_token_ids"] is None and got["choices"][0]["token_ids"] is None
    assert got["choices"][0]["message"]["content"] == "hi"
    assert json.loads(flow.response_text())["choices"][0]["token_ids"] == [7, 8]  # the store keeps them



def test_a_json_answer_gzipped_in_several_members_is_stripped_whole():
    # mitmproxy's decoder reads the first member: the JSON looked cut, and the agent got the token ids.
    import gzip

    from mitmproxy import http

    from rollouttap.addon import tokenids
    from rollouttap.addon.answer_rewrite import strip_json_answer
    answer = json.dumps({"id": "c1", "prompt_token_ids": [1, 2], "choices": [
        {"index": 0, "message": {"content": "hi"}, "token_ids": [7, 8]}]}).encode()
    resp = http.Response.make(200, b"", {"content-type": "application/json", "content-encoding": "gzip"})
    resp.raw_content = gzip.compress(answer[:20]) + gzip.compress(answer[20:])
    strip_json_answer(resp, tokenids.plan_injection("/v1/chat/completions", b'{"messages":[]}', None,
                                                    logprobs=False))
    got = json.loads(gzip.decompress(resp.raw_content))
    assert got["prompt_token_ids"] is None and got["choices"][0]["token_ids"] is None
    assert decode_body(gzip.compress(b"ab") + gzip.compress(b"cd"), "gzip") == b"abcd"  # readers see it whole


_CHUNK = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
          "choices": [{"index": 0, "delta": {"content": "hi"}, "logprobs": None, "finish_reason": None,
                       "token_ids": [7, 8]}]}
_SSE = f"data: {json.dumps(_CHUNK, separators=(',', ':'))}\n\ndata: [DONE]\n\n".encode()


def _pack(coding: str, plain: bytes) -> bytes:
    import gzip
    import zlib

    import brotli
    if coding == "deflate-raw":  # what many servers send as "deflate": no zlib header
        zobj = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        return zobj.compress(plain) + zobj.flush()
    return {"identity": bytes, "gzip": gzip.compress, "br": brotli.compress, "deflate": zlib.compress}[coding](plain)


def _stream_once(tmp_path, confdir, body: bytes, coding: str, framing: str, agent: str, query: str = "",
                 log: list[str] | None = None):
    """One streamed chat call through the proxy to a server that sends ``body`` as it is told; the client's
    response (unread) and the flow (and the proxy's log, into ``log``)."""
    def reply(conn: socket.socket, data: bytes) -> None:
        _whole_request(conn, data)
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        if coding != "identity":
            head += b"Content-Encoding: " + coding.removesuffix("-raw").encode() + b"\r\n"
        if framing == "length":
            conn.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
            return
        conn.sendall(head + b"Transfer-Encoding: chunked\r\n\r\n")
        for piece in (body[:7], body[7:]):  # a compressed stream split anywhere
            conn.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        conn.sendall(b"0\r\n\r\n")
    server, thread = _one_shot_server(reply)
    host = f"127.0.0.1:{server.getsockname()[1]}"
    with server, start_proxy(tmp_path / "s.db", confdir, model_hosts=(host,), logprobs=False) as proxy:
        resp = requests.post(f"http://{host}/v1/chat/completions{query}", headers={"X-Agent-ID": agent}, timeout=20,
                             json={"model": "m", "stream": True, "messages": []}, proxies={"http": proxy.url},
                             stream=True)
        try:
            content: bytes | Exception = resp.raw.read()
        except Exception as exc:  # a broken answer, as the client meets it
            content = exc
        thread.join(10)
        [flow] = settled_flows(proxy.config.store, agent_id=agent)
        if log is not None:
            log.append(proxy.log_path.read_text())
    return resp, content, flow


@pytest.mark.parametrize("coding, framing", [("gzip", "chunked"), ("br", "chunked"), ("deflate", "chunked"),
                                             ("deflate-raw", "chunked"), ("gzip", "length"),
                                             ("identity", "length")])
def test_injected_fields_are_hidden_from_a_compressed_or_sized_stream_too(tmp_path, confdir, coding, framing):
    resp, content, flow = _stream_once(tmp_path, confdir, _pack(coding, _SSE), coding, framing, "gzs")
    assert "content-encoding" not in resp.headers  # the agent gets it plain, as its client would read it
    # A Content-Length would no longer fit the body: the client would wait for bytes that never come.
    assert "content-length" not in resp.headers
    assert content == _SSE.replace(b'"token_ids":[7,8]', b'"token_ids":null')
    assert flow.state == "done" and flow.meta.get("decoded_stream") == (None if coding == "identity"
                                                                       else coding.removesuffix("-raw"))
    assert '"token_ids":[7,8]' in flow.response_text()  # the store keeps the server's bytes, ids and all


@pytest.mark.parametrize("coding, token_ids", [("identity", True), ("gzip", True), ("gzip", False)])
def test_a_compressed_stream_the_client_closed_after_its_done_is_complete(tmp_path, confdir, coding, token_ids):
    # Whether [DONE] came is read in the stream as the server meant it: decoded where it came compressed.
    import zlib
    gate = threading.Event()

    def reply(conn: socket.socket, data: bytes) -> None:
        _whole_request(conn, data)
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
        body = _SSE
        if coding == "gzip":
            zobj = zlib.compressobj(wbits=31)
            body, head = zobj.compress(_SSE) + zobj.flush(zlib.Z_SYNC_FLUSH), head + b"Content-Encoding: gzip\r\n"
        conn.sendall(head + b"\r\n" + b"%x\r\n%s\r\n" % (len(body), body))
        gate.wait(20)  # the end of the message held back: the client closes first

    server, thread = _one_shot_server(reply)
    host = f"127.0.0.1:{server.getsockname()[1]}"
    with server, start_proxy(tmp_path / "s.db", confdir, model_hosts=(host,), logprobs=False,
                             token_ids=token_ids) as proxy:
        with requests.post(f"http://{host}/v1/chat/completions", headers={"X-Agent-ID": "gzd"}, timeout=20,
                           json={"model": "m", "stream": True, "messages": []}, proxies={"http": proxy.url},
                           stream=True) as resp:
            assert next(line for line in resp.iter_lines() if line.startswith(b"data: [DONE]"))
        [flow] = settled_flows(proxy.config.store, agent_id="gzd")
        gate.set()
        thread.join(10)
    assert flow.state == "done" and "closed_after_done" in flow.meta, (flow.state, flow.error)


def test_the_tap_of_a_body_kept_in_part_still_sees_how_the_stream_ended():
    from rollouttap.addon.answer_rewrite import sse_finished
    from rollouttap.addon.streamtap import StreamTap
    tap = StreamTap(keep=100)
    for piece in (b"data: " + b"x" * 200 + b"\n\n", b"data: [DO", b"NE]\n\n"):
        tap(piece)
    assert len(tap.raw) == 100 and not sse_finished(tap.raw) and sse_finished(tap.plain_tail)



@pytest.mark.parametrize("keep", [None, 100])
def test_a_compressed_stream_passed_on_as_it_came_is_watched_for_how_it_ended(keep):
    import zlib

    from rollouttap.addon.answer_rewrite import sse_finished
    from rollouttap.addon.streamtap import StreamTap, decoded
    zobj = zlib.compressobj(wbits=31)
    body = zobj.compress(b"data: " + b"x" * 200 + b"\n\ndata: [DONE]\n\n") + zobj.flush()
    tap = StreamTap(decoded("gzip", None), keep)
    assert [out for piece in (body[:9], body[9:]) for out in tap(piece)] == [body[:9], body[9:]]  # as it came
    assert sse_finished(tap.plain_tail) and not sse_finished(tap.raw)
    broken = StreamTap(decoded("gzip", None), keep)
    assert broken(b"not gzip at all") == [b"not gzip at all"] and broken.failed is None  # the client's to judge
    assert broken.plain_tail == b""


def _peak_rss_mb(pid: int) -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1)) >> 10


def test_a_compression_bomb_streamed_through_the_proxy_does_not_take_its_memory(tmp_path, confdir):
    # Any host's compressed stream is watched for how it ends: 1 GiB of zstd-packed zeros (32 KB on the wire) must
    # not be decoded whole in the proxy, which every agent's calls go through.
    import zstandard
    packer = zstandard.ZstdCompressor(level=1).compressobj()
    zeros = bytes(1 << 20)
    bomb = b"".join(packer.compress(zeros) for _ in range(1024)) + packer.flush()

    def reply(conn: socket.socket, data: bytes) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Encoding: zstd\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(bomb) + bomb)
    server, thread = _one_shot_server(reply)
    host = f"127.0.0.1:{server.getsockname()[1]}"
    with server, start_proxy(tmp_path / "s.db", confdir) as proxy:
        before = _peak_rss_mb(proxy.proc.pid)
        with requests.get(f"http://{host}/events", headers={"X-Agent-ID": "bomb"}, proxies={"http": proxy.url},
                          stream=True, timeout=20) as resp:
            assert resp.raw.read(decode_content=False) == bomb  # passed on as it came: the client's to decode
        thread.join(10)
        [flow] = settled_flows(proxy.config.store, agent_id="bomb")
        peak = _peak_rss_mb(proxy.proc.pid)
    assert flow.state == "done" and flow.response_body == bomb
    assert peak - before < 256, f"the proxy grew from {before} MB to {peak} MB"


def test_a_compressed_stream_that_does_not_decode_reaches_the_agent_broken_and_is_recorded_as_an_error(
        tmp_path, confdir):
    broken = _pack("gzip", _SSE)
    broken = broken[:10] + bytes(b ^ 0xFF for b in broken[10:30]) + broken[30:]
    log: list[str] = []
    resp, content, flow = _stream_once(tmp_path, confdir, broken, "gzip", "chunked", "bad-gz", "?key=SEKRIT-Q1", log)
    assert isinstance(content, Exception)  # not a clean, empty 200 the agent would take for an answer
    assert flow.state == "error" and "could not rewrite this stream" in flow.error
    assert "rewrite_failed" in flow.meta  # readers never take it for an answer the client closed after reading
    assert flow.response_body == broken  # what the server sent is kept
    assert "could not rewrite this stream" in log[0] and "SEKRIT-Q1" not in log[0]  # the log names it redacted


@pytest.mark.parametrize("coding", ["gzip", "x-gzip", "deflate", "br", "zstd", " GZIP ", "deflate-raw"])
def test_decoded_feeds_the_plain_stream_in_pieces_and_ends_it(coding):
    import gzip
    import zlib

    import brotli
    import zstandard

    from rollouttap.addon.streamtap import decoded
    plain = b"data: 1\n\n" * 50
    name = coding.strip().lower()
    packed = {"gzip": gzip.compress, "x-gzip": gzip.compress, "deflate": zlib.compress, "br": brotli.compress,
              "zstd": zstandard.ZstdCompressor().compress, "deflate-raw": lambda b: _pack("deflate-raw", b),
              }[name](plain)
    for step in (1, 5):  # one byte at a time too: a raw deflate stream's first byte may look like zlib's
        seen: list[bytes] = []
        feed = decoded(coding.removesuffix("-raw"), lambda data: seen.append(data) or data)
        out = b"".join(feed(packed[i:i + step]) for i in range(0, len(packed), step)) + feed(b"")
        assert out == plain and seen.index(b"") == len(seen) - 1  # the end reaches ``then`` once, last


@pytest.mark.parametrize("coding", ["gzip", "zstd"])
def test_decoded_reads_a_stream_compressed_event_by_event(coding):
    # A member (gzip) or a frame (zstd) per event, as a server that compresses each write sends it: every one is
    # read, as the agent's client would read them, however the reads cut them.
    import gzip

    import zstandard

    from rollouttap.addon.streamtap import decoded
    events = [b"data: %d\n\n" % i for i in range(20)] + [b"data: [DONE]\n\n"]
    pack = gzip.compress if coding == "gzip" else zstandard.ZstdCompressor().compress
    packed = b"".join(pack(event) for event in events)
    for step in (1, 7, len(packed)):
        feed = decoded(coding, lambda data: data)
        out = b"".join(feed(packed[i:i + step]) for i in range(0, len(packed), step)) + feed(b"")
        assert out == b"".join(events)


def test_decoded_gzip_ignores_what_follows_a_whole_member_that_is_not_one():
    import gzip

    from rollouttap.addon.streamtap import decoded
    member, more = gzip.compress(b"data: 1\n\n"), gzip.compress(b"data: 2\n\n")
    for reads in ([member + b"\0\0garbage", b"more"], [member + b"\x1f", b"\0\0junk"],  # however the reads cut it
                  [member + more[:5], b"\0" * 20]):
        feed = decoded("gzip", lambda data: data)
        assert b"".join(map(feed, reads)) + feed(b"") == b"data: 1\n\n", reads
    with pytest.raises(Exception):  # not gzip from the start: the stream is broken, as its client would find
        decoded("gzip", lambda data: data)(b"not gzip at all")


@pytest.mark.parametrize("coding", ["compress", "gzip, br", "identity"])
def test_decoded_refuses_codings_it_cannot_undo(coding):
    from rollouttap.addon.streamtap import decoded
    assert decoded(coding, lambda data: data) is None


@pytest.mark.parametrize("http", ["--http1.1", "--http2"])
def test_a_header_names_the_agent_of_a_request_inside_an_https_tunnel(tmp_path, confdir, upstream, http):
    # curl from an untagged process: its CONNECT names no agent; the X-Agent-ID of each request inside does.
    with start_proxy(tmp_path / "runs.db", confdir, routes=(f"api.openai.com={upstream.url}",)) as proxy:
        agent = "hdr-tls-" + uuid.uuid4().hex[:8]
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and k != "ROLLOUTTAP_AGENT_ID"}
        out = subprocess.run(["curl", "-sS", "--fail", http, "-x", proxy.url, "--cacert",
                              str(confdir / "mitmproxy-ca-cert.pem"), "-H", f"X-Agent-ID: {agent}",
                              "-H", "Content-Type: application/json", "-d", "{}",
                              "https://api.openai.com/echo"], env=env, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        [flow] = settled_flows(proxy.config.store, agent_id=agent)
    assert (flow.attribution, flow.method) == ("header", "POST")
    assert flow.meta.get("http_version", "HTTP/1.1") == ("HTTP/2.0" if http == "--http2" else "HTTP/1.1")
    assert "x-agent-id" not in json.loads(out.stdout).get("headers", {})  # taken off before the upstream


def _connect_rows(store: Path) -> list:
    with Store(store) as reader:
        return [f for f in reader.flows() if f.method == "CONNECT"]


def test_a_tunnel_the_proxy_could_not_open_is_an_error_not_done(tmp_path, confdir):
    # connection_strategy=eager (stock mitmdump's): the server is connected at CONNECT time, and a 502 answered
    # if it cannot be. The row said done, 200.
    dead = socket.create_server(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    with start_proxy(tmp_path / "runs.db", confdir, extra={"connection_strategy": "eager"}) as proxy:
        out = subprocess.run(["curl", "-sS", "-x", proxy.url, f"https://127.0.0.1:{port}/"], env=env,
                             capture_output=True, text=True, timeout=30)
        assert out.returncode != 0 and "502" in out.stderr
        wait_for(lambda: [f.state for f in _connect_rows(proxy.config.store)] == ["error"], what="the CONNECT ended")
        [row] = _connect_rows(proxy.config.store)
    assert row.status_code == 502 and row.error


def test_a_tunnel_whose_tls_handshake_the_agent_broke_off_says_so(tmp_path, confdir, upstream):
    # An agent that does not trust the proxy's CA: nothing of the tunnel reaches the store after its CONNECT.
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and "CA_BUNDLE" not in k
           and "SSL_CERT" not in k}
    with start_proxy(tmp_path / "runs.db", confdir, routes=(f"api.openai.com={upstream.url}",)) as proxy:
        out = subprocess.run(["curl", "-sS", "-x", proxy.url, "https://api.openai.com/echo"], env=env,
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 60, out.stderr  # the certificate was not trusted
        wait_for(lambda: [f.state for f in _connect_rows(proxy.config.store)] == ["error"], what="the row updated")
        [row] = _connect_rows(proxy.config.store)
    assert row.status_code == 200 and row.error.startswith("the TLS handshake with the client failed")


def test_requests_are_refused_while_the_store_holds_too_much_unwritten_and_taken_again_after(
        tmp_path, confdir, upstream):
    store = tmp_path / "s.db"
    with start_proxy(store, confdir, extra={"rollouttap_store_backlog_mb": "1"}) as proxy:
        lock = sqlite3.connect(store, isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")  # another process's write transaction: the proxy's writer waits
        body = {"pad": "x" * 300_000}
        statuses = [requests.post(upstream.url + "/echo", json=body, headers={"X-Agent-ID": "full"},
                                  proxies={"http": proxy.url}, timeout=20).status_code for _ in range(8)]
        refused = requests.post(upstream.url + "/echo", json={}, proxies={"http": proxy.url}, timeout=20)
        assert "the store is not taking rows" in proxy.log_tail()  # kept by mitmdump -q: an error, said once
        lock.execute("ROLLBACK")
        wait_for(lambda: requests.post(upstream.url + "/echo", json={}, headers={"X-Agent-ID": "after"},
                                       proxies={"http": proxy.url}, timeout=20).status_code == 200,
                 what="requests served again once the store takes rows")
        lock.close()
        with Store(store) as reader:  # the queued flows land once the writer's retry gets the lock
            wait_for(lambda: len(reader.flows(agent_id="full")) == len(statuses), what="every flow")
        flows = settled_flows(store, agent_id="full")
    assert statuses[:2] == [200] * 2 and statuses[-1] == 503  # ~1 MiB of bodies queued, then refused
    assert refused.status_code == 503 and "the store is not taking rows" in refused.text
    served = [f for f in flows if f.state == "done"]
    assert len(served) == statuses.count(200) and all(f.status_code == 200 for f in served)  # none lost
    refusals = [f for f in flows if f.state == "error"]  # the agent's own calls: its views and replay have them
    assert len(refusals) == statuses.count(503)
    assert all(f.status_code == 503 and "the store is not taking rows" in f.error for f in refusals)


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_store_file_deleted_or_replaced_under_the_proxy_gets_requests_refused_saying_so(
        tmp_path, confdir, upstream, how):
    store = tmp_path / "s.db"
    with start_proxy(store, confdir) as proxy:
        assert requests.get(upstream.base_url + "/models", proxies={"http": proxy.url}, timeout=20).ok
        if how == "deleted":
            for suffix in ("", "-wal", "-shm"):
                Path(f"{store}{suffix}").unlink(missing_ok=True)
        else:  # another store moved over it (a restored copy), its -wal and -shm left as they are
            Store(tmp_path / "other.db").close()
            os.replace(tmp_path / "other.db", store)
        refused = wait_for(lambda: (r := requests.get(upstream.base_url + "/models", proxies={"http": proxy.url},
                                                      timeout=20)).status_code == 503 and r.text, what="a refusal")
        log = proxy.log_tail()
    assert "was deleted or replaced while this proxy wrote to it" in refused and "restart" in refused
    assert "was deleted or replaced" in log


def test_a_proxy_request_is_stored_where_its_url_sent_it_whatever_its_host_header(proxy, upstream):
    target = upstream.url.split("://", 1)[1]
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=20) as client:
        client.sendall(f"GET {upstream.url}/echo HTTP/1.1\r\nHost: elsewhere.invalid:9\r\nX-Agent-ID: abs-form\r\n"
                       "Connection: close\r\n\r\n".encode())
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
    [flow] = settled_flows(proxy.config.store, agent_id="abs-form")
    assert answer.startswith(b"HTTP/1.1 200")
    assert (flow.url, f"{flow.host}:{flow.port}") == (f"{upstream.url}/echo", target)
    assert ("Host", "elsewhere.invalid:9") in flow.request_headers  # as the client sent it


@pytest.mark.parametrize("tls, url, host", [
    (False, "http://127.0.0.1:8000/v1/x", "127.0.0.1"),  # a proxy request: where its URL sent it
    (True, "http://api.example.com:8443/v1/x", "api.example.com"),  # in a TLS tunnel: its Host header's authority
])
def test_the_stored_url_of_a_regular_proxy_request(tls, url, host):
    flow = tflow.tflow()
    flow.client_conn.timestamp_tls_setup = 1.0 if tls else None
    flow.request.host, flow.request.port, flow.request.path = "127.0.0.1", 8000, "/v1/x"
    flow.request.headers["host"] = "api.example.com:8443"
    from rollouttap.addon.attribution import Attribution
    cols = flowcols.opened(flow, "p", Attribution(None, "none"))
    assert (cols["url"], cols["host"], cols["port"]) == (url, host, 8000)


_WS_AGENT = """
import asyncio, sys
import aiohttp

async def main(url):
    async with aiohttp.ClientSession(trust_env=True) as session:  # HTTP_PROXY, as the manager sets it
        async with session.ws_connect(url) as ws:
            await ws.send_str("hello")
            print((await ws.receive()).data, flush=True)
            await ws.send_bytes(b"\\x00\\xffbin")
            print((await ws.receive()).data.hex(), flush=True)
            sys.stdin.readline()  # held open until the test has looked at the row

asyncio.run(main(sys.argv[1]))
"""


def _echoed_both(agent: subprocess.Popen) -> None:
    """The WebSocket agent got both echoes (a text and a binary message) through the proxy."""
    assert agent.stdout.readline().strip() == "echo:hello"
    assert agent.stdout.readline().strip() == b"echo:\x00\xffbin".hex()


@contextmanager
def _websocket_echo_server():
    from aiohttp import WSMsgType, web

    async def echo(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await ws.send_str("echo:" + msg.data)
            elif msg.type == WSMsgType.BINARY:
                await ws.send_bytes(b"echo:" + msg.data)
        return ws

    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_get("/ws", echo)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = site._server.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{port}/ws"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_a_websockets_messages_are_kept_in_its_row_which_stays_open_while_it_is(proxy):
    agent_id, token = _new_agent(proxy)
    with _websocket_echo_server() as url:
        agent = subprocess.Popen([sys.executable, "-c", _WS_AGENT, url], env=agent_env(proxy, agent_id, token),
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            _echoed_both(agent)
            with Store(proxy.config.store) as store:  # the upgrade is seen while the connection lasts
                [live] = wait_for(lambda: store.flows(agent_id=agent_id) or None, what="the upgrade's row")
            assert (live.state, live.status_code) == ("open", 101)
            agent.communicate("\n", timeout=30)
        finally:
            agent.kill()
    [flow] = settled_flows(proxy.config.store, agent_id=agent_id)
    assert (flow.state, flow.status_code, flow.attribution) == ("done", 101, "credentials")
    lines = [json.loads(line) for line in flow.response_body.decode().splitlines()]
    assert [(m["from"], m.get("text") or base64.b64decode(m["base64"])) for m in lines] == [
        ("client", "hello"), ("server", "echo:hello"), ("client", b"\x00\xffbin"), ("server", b"echo:\x00\xffbin")]
    assert flow.meta["websocket"] == {"messages": 4, "kept": 4, "closed_by_client": True, "close_code": 1000}
    assert flow.t_end >= lines[-1]["t"]


def test_websocket_frames_kept_are_a_prefix_of_whole_messages_within_the_limit():
    from types import SimpleNamespace

    from rollouttap.addon.websocket_log import frames_jsonl
    messages = [SimpleNamespace(from_client=i % 2 == 0, is_text=i != 2, content=c, timestamp=float(i), dropped=i == 1)
                for i, c in enumerate([b"a" * 10, "\u00e9".encode(), b"\xff", b"b" * 100, b"c"])]
    body, meta = frames_jsonl(messages, 10_000)
    lines = [json.loads(line) for line in body.splitlines()]
    assert [line.get("text") or line.get("base64") for line in lines] == ["a" * 10, "\u00e9", "/w==", "b" * 100, "c"]
    assert lines[1]["dropped"] is True and "dropped" not in lines[0] and meta == {"messages": 5, "kept": 5}
    cut = body.index(b"b" * 100)
    small, meta = frames_jsonl(messages, cut + 50)  # the fourth does not fit; the small fifth would: no gap
    assert small == body[:body.rindex(b"\n", 0, cut) + 1] and meta == {"messages": 5, "kept": 3}
    assert frames_jsonl([SimpleNamespace(from_client=True, is_text=True, content=b"x" * 100, timestamp=0.0,
                                         dropped=False)], 50) == (b"", {"messages": 1, "kept": 0})


def _upgraded(addon, agent: str):
    """A WebSocket flow of ``agent`` recorded by the addon, past its 101 (mitmproxy's test flow: no sockets)."""
    from rollouttap.addon.attribution import Attribution
    from mitmproxy.websocket import WebSocketMessage
    flow = tflow.twebsocketflow()
    flow.websocket.messages.clear()  # the test flow comes with three
    addon._record_new(flow, Attribution(agent, "header"))
    addon.responseheaders(flow)
    addon.response(flow)
    flow.websocket.messages.append(WebSocketMessage(1, True, b"hi", time.time()))
    addon.websocket_message(flow)
    return flow, WebSocketMessage


def test_a_websocket_ended_at_shutdown_relays_nothing_more_and_a_broken_one_is_an_error(tmp_path):
    with _tap_in_test_context(tmp_path / "s.db") as (addon, _):
        addon.drain_s = 0.05
        asyncio.run(addon.running())
        broken, _ = _upgraded(addon, "broken")
        broken.websocket.close_code = 1006  # no close frame: the agent was killed
        asyncio.run(addon.websocket_end(broken))
        open_one, WebSocketMessage = _upgraded(addon, "open")
        assert not open_one.websocket.messages[-1].dropped
        asyncio.run(addon.done())
        open_one.websocket.messages.append(WebSocketMessage(1, False, b"late", time.time()))
        addon.websocket_message(open_one)  # the connection outlives the store by a moment
        assert open_one.websocket.messages[-1].dropped
    with Store(tmp_path / "s.db") as store:
        [broken_row], [open_row] = store.flows(agent_id="broken"), store.flows(agent_id="open")
    assert (broken_row.state, broken_row.status_code) == ("error", 101) and "1006" in broken_row.error
    assert open_row.state == "error" and "shut down" in open_row.error
    assert json.loads(open_row.response_body)["text"] == "hi" and open_row.meta["websocket"]["messages"] == 1


def test_a_websocket_open_when_the_proxy_stops_keeps_the_frames_it_relayed(tmp_path, confdir):
    with _websocket_echo_server() as url, start_proxy(tmp_path / "runs.db", confdir) as proxy:
        agent_id, token = _new_agent(proxy)
        agent = subprocess.Popen([sys.executable, "-c", _WS_AGENT, url], env=agent_env(proxy, agent_id, token),
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            _echoed_both(agent)
            assert proxy.stop()  # the agent still holds its WebSocket open
        finally:
            agent.kill()
            agent.wait()
    with Store(tmp_path / "runs.db") as store:
        [flow] = store.flows(agent_id=agent_id)
    assert (flow.state, flow.status_code, flow.error) == ("error", 101, "proxy shut down before the flow ended")
    assert len(flow.response_body.splitlines()) == 4 and flow.meta["websocket"]["messages"] == 4
