"""The inspection commands on agents that failed: what they show, count, export and replay of a failure.

The store is made by a real run (mitmdump + capture addon, ScriptedUpstream, agent processes): an agent whose
stream the model server cut off mid-way, one that exits non-zero after an answered call, one that succeeds and
one that never calls the model. Commands run in-process through typer's CliRunner, or as ``python -m
rollouttap.cli`` where the exit status, the one-line message or the process's time zone matter.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from conftest import settled_flows, start_proxy
from rollouttap.cli_inspect import register
from rollouttap.manager.replay import replay_agent
from rollouttap.store import Store, new_token
from rollouttap.testing.fake_tokenizer import FakeTokenizer

# MODE [BASE_URL]: one answered chat call (none for "silent"); "cut" then asks for a stream the model server
# cuts off (urllib raises IncompleteRead: exit 1); "quitter" exits 4 after its answered call (EXIT overrides).
AGENT = r'''
import json, os, sys, urllib.request
mode = sys.argv[1]
base = sys.argv[2] if len(sys.argv) > 2 else os.environ["OPENAI_BASE_URL"]

def post(text, stream=False):
    body = {"model": "policy", "messages": [{"role": "user", "content": text}], "stream": stream}
    req = urllib.request.Request(base + "/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.read()

if mode != "silent":
    post(f"hello from {mode}")
if mode == "cut":
    post("abort this stream", stream=True)
print("done", mode, flush=True)
sys.exit(int(os.environ.get("EXIT", 4 if mode == "quitter" else 0)))
'''

MODES = ("cut", "quitter", "fine", "silent")
EOS = str(FakeTokenizer.eos_token_id)


def cutting_script(request):
    """The scripted model's echo, but a stream asked to abort breaks off after two events."""
    from rollouttap.testing.replies import Reply, default_script, last_user_text
    if "abort" in last_user_text(request):
        return Reply(content="an answer long enough to be cut off " * 8, abort_after_chunks=2)
    return default_script(request)


@dataclass
class Failures:
    store: Path
    script: Path
    upstream: str  # host:port of the model server
    codes: dict[str, int]


def _run(proxy, store: Path, script: Path, base_url: str, mode: str) -> int:
    """Register the agent, run it through the proxy, record how it ended as the manager would."""
    token = new_token()
    with Store(store) as s:
        s.register_agent(mode, token=token, run_id="run-f")
    env = {k: v for k, v in os.environ.items() if k != "ROLLOUTTAP_AGENT_ID"}
    env.update(proxy.env(mode, token))
    proc = subprocess.run([sys.executable, str(script), mode, base_url], env=env, capture_output=True, text=True,
                          timeout=60)
    meta = {"exit_code": proc.returncode}
    if proc.returncode:
        meta["error"] = f"exited with code {proc.returncode}"
    with Store(store) as s:
        s.agent_ended(mode, "ok" if proc.returncode == 0 else "failed", meta)
    if mode != "silent":
        settled_flows(store, agent_id=mode)
    return proc.returncode


@pytest.fixture(scope="module")
def failures(tmp_path_factory, confdir) -> Failures:
    from rollouttap.testing.upstream import ScriptedUpstream
    tmp = tmp_path_factory.mktemp("failures")
    script = tmp / "agent.py"
    script.write_text(AGENT)
    store = tmp / "runs.db"
    with ScriptedUpstream(script=cutting_script) as upstream:
        host = upstream.url.split("://", 1)[1]
        with start_proxy(store, confdir, model_hosts=(host,)) as proxy:
            codes = {mode: _run(proxy, store, script, upstream.base_url, mode) for mode in MODES}
    assert codes == {"cut": 1, "quitter": 4, "fine": 0, "silent": 0}
    with Store(store) as s:
        [cut] = [f for f in s.flows(agent_id="cut") if f.state == "error"]
    assert cut.status_code == 200 and cut.streamed and cut.response_body  # a stream cut mid-way, kept in part
    return Failures(store, script, host, codes)


@pytest.fixture(scope="module")
def cli():
    app = typer.Typer()
    register(app)
    runner = CliRunner(env={"COLUMNS": "250"})

    def invoke(*args, code: int = 0, env: dict[str, str] | None = None):
        result = runner.invoke(app, [str(a) for a in args], env=env)
        assert result.exit_code == code, (result.output, result.exception)
        return result
    return invoke


def _rollouttap(*args, env=None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rollouttap.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=env)


def _command(failures: Failures, mode: str) -> list[str]:
    # The model server is gone: the replay answers from the recording alone (any base URL through the proxy).
    return [sys.executable, str(failures.script), mode, f"http://{failures.upstream}/v1"]


# -- 1. a cut-off stream replays as a failure, and the export says so ------------------------------------------------

def test_a_stream_cut_when_recorded_breaks_off_again_on_replay(failures, confdir, tmp_path):
    result = replay_agent(failures.store, "cut", _command(failures, "cut"), out=tmp_path / "r.db", confdir=confdir,
                          capture_output=True, timeout=60)
    assert result.divergence is None and result.answered == result.recorded == 2, result.stderr
    assert "IncompleteRead" in result.stderr and "done" not in result.stdout
    assert (result.exit_code, result.recorded_exit_code, result.recorded_status) == (1, 1, "failed")


def test_replay_prints_the_recorded_exit_beside_the_replayed_one(failures, cli, confdir, tmp_path):
    out = cli("replay", "quitter", "--store", failures.store, "--out", tmp_path / "r.db", "--confdir", confdir,
              "--", *_command(failures, "quitter"), code=4).output
    assert "replay matched: 1/1 requests answered" in out and "agent exit 4 (recorded: failed, exit 4)" in out
    # The same requests, another ending: the line says so.
    out = cli("replay", "quitter", "--store", failures.store, "--out", tmp_path / "r.db", "--confdir", confdir,
              "--", *_command(failures, "quitter"), env={"EXIT": "0"}).output
    assert "replay matched" in out and "agent exit 0 (recorded: failed, exit 4): the endings differ" in out


def test_har_export_of_a_cut_stream_says_it_ended_in_error_in_standard_places(failures, cli, tmp_path):
    cli("export", "--store", failures.store, "--agent", "cut", "-o", tmp_path / "cut.har")
    entries = json.loads((tmp_path / "cut.har").read_text())["log"]["entries"]
    broken = [e for e in entries if e["_rollouttap"]["state"] == "error"]
    assert len(broken) == 1 and len(entries) == 2
    response = broken[0]["response"]
    assert response["status"] == 200 and response["_error"] == broken[0]["_rollouttap"]["error"]
    assert response["comment"] == f"ended in error: {response['_error']}"
    # Still HAR 1.2: every field a response must have, custom ones prefixed with "_", comment a string.
    required = {"status", "statusText", "httpVersion", "cookies", "headers", "content", "redirectURL", "headersSize",
                "bodySize"}
    assert required <= set(response) and isinstance(response["comment"], str)
    assert all(k in required or k in ("comment",) or k.startswith("_") for k in response)
    ok = [e for e in entries if e["_rollouttap"]["state"] == "done"][0]["response"]
    assert "_error" not in ok and "comment" not in ok


# -- 2. what a failed agent sampled is not counted as trained ---------------------------------------------------------

def test_stats_count_a_failed_agents_tokens_as_sampled_not_trained(failures, cli):
    data = json.loads(cli("stats", "--store", failures.store, "--json", "--eos-token-id", EOS).output)
    own = {mode: json.loads(cli("show", mode, "--store", failures.store, "--json", "--tokens", "--eos-token-id",
                                EOS).output)["fidelity"] for mode in ("cut", "quitter", "fine")}
    assert own["quitter"]["trainable_tokens"] > 0  # its row, as built, trains tokens: TRL would get it masked
    fidelity = data["fidelity"]
    assert fidelity["sampled_tokens"] == sum(f["sampled_tokens"] for f in own.values())
    assert fidelity["trainable_tokens"] == own["fine"]["trainable_tokens"]
    assert fidelity["dropped_tokens"] == fidelity["sampled_tokens"] - fidelity["trainable_tokens"]


def test_run_summary_counts_a_failed_agents_tokens_as_sampled_not_trained(failures, confdir, tmp_path, capsys):
    from rollouttap.cli import main
    from rollouttap.testing.upstream import ScriptedUpstream
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('"fine"\n"quitter"\n')
    out = tmp_path / "results.jsonl"
    with ScriptedUpstream() as upstream:
        code = main(["run", "--agent", f"{shlex.quote(sys.executable)} {shlex.quote(str(failures.script))} {{prompt}}",
                     "--prompts", str(prompts), "--store", str(tmp_path / "runs.db"), "--model-url",
                     upstream.base_url, "--out", str(out), "--confdir", str(confdir), "--eos-token-id", EOS,
                     "--timeout", "60"])
    assert code == 0
    results = {r["prompt"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert results["quitter"]["status"] == "failed" and sum(results["quitter"]["row"]["env_mask"]) > 0
    trained = sum(results["fine"]["row"]["env_mask"])
    sampled = sum(r["fidelity"]["sampled_tokens"] for r in results.values())
    err = capsys.readouterr().err
    assert re.search(rf"trained / sampled tokens\W+{trained} / {sampled} \(", err), err


# -- 3. no eos id: truncation is unknown, not "truncated" --------------------------------------------------------------

def test_show_tokens_without_an_eos_id_says_truncation_is_unknown(failures, cli):
    data = json.loads(cli("show", "fine", "--store", failures.store, "--json", "--tokens").output)
    assert data["row"]["truncated"] is None and data["fidelity"]["truncated"] is None
    known = json.loads(cli("show", "fine", "--store", failures.store, "--json", "--tokens", "--eos-token-id",
                           EOS).output)
    assert known["row"]["truncated"] is False and known["fidelity"]["truncated"] == 0
    out = cli("show", "fine", "--store", failures.store, "--tokens").output
    assert re.search(r"truncated\W+unknown without --eos-token-id", out), out


# -- 4. times without an offset are UTC, as shown ---------------------------------------------------------------------

def test_a_time_pasted_from_the_output_means_utc_in_any_time_zone(failures, cli):
    first = json.loads(cli("flows", "--store", failures.store, "--json", "--limit", "1").output)
    pasted = first["time"].removesuffix("Z")  # as the table shows it: no offset
    env = {**os.environ, "TZ": "America/New_York"}
    proc = _rollouttap("flows", "--store", failures.store, "--json", "--since", pasted, env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[0])["id"] == first["id"]
    proc = _rollouttap("prune", "--store", failures.store, "--before", pasted, env=env)  # deletes nothing before it
    assert proc.returncode == 0 and proc.stdout.startswith("deleted 0 flows and 0 agents"), proc.stdout
    assert "time (UTC)" in cli("flows", "--store", failures.store).output


def test_parse_when_reads_a_time_without_offset_as_utc(monkeypatch):
    from rollouttap.manager.inspect import parse_when
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        assert parse_when("2024-11-29T17:06:40") == parse_when("2024-11-29T17:06:40Z") == 1732900000.0
        assert parse_when("2024-11-29T12:06:40-05:00") == 1732900000.0
    finally:
        monkeypatch.undo()
        time.tzset()


# -- 5. why an agent failed, in the human views ------------------------------------------------------------------------

def test_show_header_says_how_a_failed_agent_ended(failures, cli):
    out = cli("show", "quitter", "--store", failures.store).output
    assert "agent quitter · failed (exit 4) · run run-f · 1 calls" in out and "✗ exited with code 4" in out
    assert "(exit 0)" not in cli("show", "fine", "--store", failures.store).output  # a success says nothing more


def test_show_header_of_an_agent_started_by_hand_names_no_run():
    from types import SimpleNamespace

    from rollouttap.cli_render import show_head
    by_hand = SimpleNamespace(status="running", meta={}, run_id=None)  # as `rollouttap agent start` registers it
    assert show_head("a1", by_hand, 2, 3) == "agent a1 · running · 2 calls · 3 flows"
    assert show_head("a1", SimpleNamespace(status="ok", meta={}, run_id="r1"), 2, 3) == \
        "agent a1 · ok · run r1 · 2 calls · 3 flows"


def test_flows_table_has_an_error_column(failures, cli):
    with Store(failures.store) as s:
        [cut] = [f for f in s.flows(agent_id="cut") if f.state == "error"]
    out = cli("flows", "--store", failures.store, "--agent", "cut").output
    [header] = [line for line in out.splitlines() if "time (UTC)" in line]
    assert header.split()[-2:] == ["error", header.split()[-1]]  # the last column, then the table's border
    [row] = [line for line in out.splitlines() if " error " in line and "HTTP/1" in line]
    assert cut.error[:40] in row


# -- 6. --host HOST:PORT --------------------------------------------------------------------------------------------

def test_flows_host_takes_a_port(failures, cli):
    host, port = failures.upstream.rsplit(":", 1)
    every = json.loads("[" + ",".join(cli("flows", "--store", failures.store, "--json").output.splitlines()) + "]")
    rows = cli("flows", "--store", failures.store, "--json", "--host", failures.upstream).output.splitlines()
    assert len(rows) == len(every) > 0 and rows == cli("flows", "--store", failures.store, "--json", "--host",
                                                        host).output.splitlines()
    assert cli("flows", "--store", failures.store, "--json", "--host", f"{host}:{int(port) + 1}").output == ""
    assert len(cli("flows", "--store", failures.store, "--json", "--host", failures.upstream, "--limit",
                   "2").output.splitlines()) == 2
    cli("flows", "--store", failures.store, "--host", f"{host}:http", code=1)


# -- 7. replay: the right error, the right hint; an agent that never called the model ----------------------------------

def test_replay_of_an_agent_that_made_no_request_runs_it(failures, cli, confdir, tmp_path):
    out = cli("replay", "silent", "--store", failures.store, "--out", tmp_path / "r.db", "--confdir", confdir,
              "--", *_command(failures, "silent")).output
    assert "replay matched: 0/0 requests answered" in out and "agent exit 0 (recorded: ok, exit 0)" in out
    # Had it called the model now, the call would be the divergence.
    result = replay_agent(failures.store, "silent", _command(failures, "fine"), out=tmp_path / "r.db",
                          confdir=confdir, capture_output=True, timeout=60)
    assert result.divergence["index"] == 0 and "holds only 0 requests" in result.divergence["reason"]


def test_replay_into_a_directory_names_the_out_option(failures, confdir, tmp_path):
    proc = _rollouttap("replay", "fine", "--store", failures.store, "--out", tmp_path, "--confdir", confdir, "--",
                       *_command(failures, "fine"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"--out {tmp_path} is a directory" in proc.stderr and "--store" not in proc.stderr


def test_replay_of_an_unknown_agent_is_not_found(failures, confdir, tmp_path):
    from rollouttap.errors import NotFoundError
    with pytest.raises(NotFoundError, match="no agent 'nobody' in"):
        replay_agent(failures.store, "nobody", ["true"], out=tmp_path / "r.db", confdir=confdir)


# -- 8. contradictory flags --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (("--unattributed", "--agent", "fine"), "--unattributed lists flows of no agent: not with --agent or --run"),
    (("--unattributed", "--run", "run-f"), "--unattributed lists flows of no agent"),
    (("--since", "2030-01-02", "--until", "2030-01-01"), "--since 2030-01-02 is not before --until 2030-01-01"),
])
def test_flows_refuses_contradictory_flags(failures, args, message):
    proc = _rollouttap("flows", "--store", failures.store, *args)
    assert proc.returncode == 1 and proc.stderr.startswith(f"rollouttap: {message}"), proc.stderr
    assert len(proc.stderr.splitlines()) == 2 and proc.stdout == ""  # the message and its hint


# -- 9. prune refuses an empty file ------------------------------------------------------------------------------------

def test_prune_refuses_an_empty_file_as_every_command_does(tmp_path):
    empty = tmp_path / "empty.db"
    empty.touch()
    proc = _rollouttap("prune", "--store", empty, "--older-than", "1d")
    assert proc.returncode == 1 and "is empty: not a rollouttap store (yet)" in proc.stderr, proc.stderr
    assert empty.stat().st_size == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["empty.db"]
