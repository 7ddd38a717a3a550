"""The inspection commands on a real store: flows, show, export, stats, resend, replay.

The store is made by a real run (mitmdump + capture addon, ScriptedUpstream, agent processes). Most commands run
in-process through typer's CliRunner on an app holding just these commands; ``python -m rollouttap.cli`` runs
where the exit status and the error messages of the real entry point matter.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time

import pytest
import typer
from typer.testing import CliRunner

from rollouttap.addon.export_flows import read_flow_file
from rollouttap.cli import debug_first
from rollouttap.cli_inspect import register
from rollouttap.cli_render import row_text
from rollouttap.manager.inspect import (
    conversation_steps, flow_row, latency_summary, mask_runs, message_text, parse_when, percentile, tool_call_text,
)
from rollouttap.store import Store
from test_replay import extra_traffic, record


@pytest.fixture(scope="module")
def recording(tmp_path_factory, confdir):
    return record(tmp_path_factory.mktemp("cli"), confdir, {"plain": False, "streamer": True}, extra=extra_traffic)


@pytest.fixture(scope="module")
def cli():
    app = typer.Typer()
    register(app)
    runner = CliRunner(env={"COLUMNS": "200"})

    def invoke(*args: str, code: int = 0, **kwargs):
        result = runner.invoke(app, [str(a) for a in args], **kwargs)
        assert result.exit_code == code, (result.output, result.exception)
        return result
    return invoke


def _lines(output: str) -> list[dict]:
    return [json.loads(line) for line in output.splitlines() if line.strip()]


def _rollouttap(*args, env=None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rollouttap.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120, env=env)


# -- flows ---------------------------------------------------------------------------------------------------------

def test_flows_json_lists_every_flow_in_order(recording, cli):
    rows = _lines(cli("flows", "--store", recording.store, "--json").output)
    with Store(recording.store) as s:
        stored = s.flows()
    assert [r["flow_id"] for r in rows] == [f.flow_id for f in stored]
    assert {r["agent"] for r in rows} == {"plain", "streamer", "broken", "completer", None}
    first = rows[0]
    assert first["method"] == "POST" and first["path"] == "/v1/chat/completions" and first["status"] == 200
    assert first["duration"] > 0 and first["response_bytes"] > 0 and first["time"].endswith("Z")


@pytest.mark.parametrize("args, expected", [
    (["--agent", "plain"], {"plain"}),
    (["--state", "error"], {"broken"}),
    (["--unattributed"], {None}),
    (["--host", "nowhere.example"], set()),
    (["--since", "2099-01-01T00:00:00"], set()),
    (["--until", "1000000000"], set()),
])
def test_flows_filters(recording, cli, args, expected):
    rows = _lines(cli("flows", "--store", recording.store, "--json", *args).output)
    assert {r["agent"] for r in rows} == expected


def test_flows_run_and_limit(recording, cli):
    rows = _lines(cli("flows", "--store", recording.store, "--json", "--run", recording.run_id, "--limit", "4").output)
    assert len(rows) == 4 and {r["agent"] for r in rows} == {"plain", "streamer"}


def test_flows_table(recording, cli):
    out = cli("flows", "--store", recording.store, "--agent", "streamer").output
    assert "3 flows in" in out and out.count("/v1/chat/completions") == 3 and "credentials" in out


def test_flows_table_draws_the_first_rows_and_says_how_many_more_match(recording, cli, tmp_path, monkeypatch):
    import sqlite3

    import rollouttap.cli_inspect
    monkeypatch.setattr(rollouttap.cli_inspect, "TABLE_ROWS", 2)  # a store of 100k flows drew for minutes
    every = _lines(cli("flows", "--store", recording.store, "--json").output)  # --json is never cut
    assert len(every) > 4
    out = cli("flows", "--store", recording.store).output
    assert f"the first 2 of {len(every)} flows in" in out and out.count("/v1/") == 2
    assert f"{len(every) - 2} more flows match" in out and f"--limit {len(every)}" in out
    out = cli("flows", "--store", recording.store, "--limit", "4").output  # what it is told, whole
    assert "4 flows in" in out and "the first" not in out and "more flows match" not in out
    streamer = cli("flows", "--store", recording.store, "--agent", "streamer").output  # the filter counts
    assert "the first 2 of 3 flows in" in streamer and "1 more flows match" in streamer
    copy = tmp_path / "rank-1.db"
    with sqlite3.connect(recording.store) as src, sqlite3.connect(copy) as dst:
        src.backup(dst)
    both = cli("flows", "--store", recording.store, "--store", copy, "--agent", "streamer").output
    assert "the first 2 of 6 flows in" in both and "4 more flows match" in both


@pytest.mark.parametrize("option", ["--agent", "--run"])
def test_flows_of_an_unknown_agent_or_run_is_an_error(recording, cli, option):
    from rollouttap.errors import NotFoundError
    result = cli("flows", "--store", recording.store, option, "nosuch", code=1)
    assert isinstance(result.exception, NotFoundError) and "'nosuch'" in str(result.exception)


def test_flows_refuses_a_bad_state(recording, cli):
    from rollouttap.errors import ConfigError
    result = cli("flows", "--store", recording.store, "--state", "weird", code=1)
    assert isinstance(result.exception, ConfigError)


# -- show ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("agent", ["plain", "streamer"])
def test_show_reads_like_a_conversation(recording, cli, agent):
    out = cli("show", agent, "--store", recording.store).output
    assert f"agent {agent} · ok · run {recording.run_id} · 3 calls" in out
    for expected in ("── call 0", "── call 2", "system: You are terse.", "user: what is 2+3?",
                     'assistant → calc({"expression": "2+3"})', "tool [", "assistant: The answer is 5.",
                     "(reasoning) Thinking about: what is 2+3?", "user: say bye", "first byte", "finish tool_calls"):
        assert expected in out, expected
    assert out.count("user: what is 2+3?") == 1  # later calls show only what they add


def test_show_json_and_tokens(recording, cli):
    data = json.loads(cli("show", "plain", "--store", recording.store, "--json", "--tokens",
                          "--tokenizer", "fake").output)
    assert data["agent"]["agent_id"] == "plain" and data["conversation"]["summary"]["calls"] == 3
    row, fidelity = data["row"], data["fidelity"]
    assert set(row["env_mask"]) == {0, 1} and len(row["env_mask"]) == len(row["completion_ids"])
    assert fidelity["calls_used"] == 3 and fidelity["trainable_tokens"] == sum(row["env_mask"])
    assert row["completion_ids"][-1] == 2 and row["truncated"] is False  # the fake tokenizer's eos
    for given in (["--tokenizer", "fake"], ["--eos-token-id", "2"]):  # given for the row: it is shown
        assert json.loads(cli("show", "plain", "--store", recording.store, "--json", *given).output)["row"] == row
    assert "row" not in json.loads(cli("show", "plain", "--store", recording.store, "--json").output)


def test_show_tokens_decodes_and_marks_the_sampled_tokens(recording, cli):
    out = cli("show", "plain", "--store", recording.store, "--tokens", "--tokenizer", "fake").output
    assert "── training row" in out and "⟦" in out and "echo: say bye<|im_end|>⟧" in out
    assert "trainable_tokens" in out and "coverage" in out
    ids_only = cli("show", "plain", "--store", recording.store, "--tokens").output
    assert "⟦" in ids_only and "<|im_end|>" not in ids_only.split("── training row")[1]


def test_row_text_styles_sampled_and_env_tokens():
    text = row_text([1, 2], [3, 4, 5, 6], [1, 1, 0, 1], lambda i: f"<{i}>")
    assert text.plain == "<1><2><3><4><5><6>"
    styles = [(text.plain[s.start:s.end], str(s.style)) for s in text.spans]
    assert styles == [("<3><4>", "bold green"), ("<5>", "dim yellow"), ("<6>", "bold green")]


def test_show_completion_calls_and_failed_calls(recording, cli):
    out = cli("show", "completer", "--store", recording.store).output
    assert "── completion call 0" in out and "prompt: once upon a time" in out
    assert "text:  echo: once upon a time" in out
    out = cli("show", "broken", "--store", recording.store).output
    assert "user: hello?" in out and "✗ " in out and "not registered" in out


def test_show_tokens_of_an_agent_that_calls_completions(recording, cli):
    data = json.loads(cli("show", "completer", "--store", recording.store, "--json", "--tokens",
                          "--tokenizer", "fake").output)
    assert data["fidelity"]["calls"] == 1 and data["fidelity"]["trainable_tokens"] > 0  # the row deploy() builds
    assert sum(data["row"]["env_mask"]) == data["fidelity"]["trainable_tokens"]


def test_show_unknown_agent(recording, cli):
    result = cli("show", "nobody", "--store", recording.store, code=1)
    assert "no agent 'nobody'" in str(result.exception)


# -- export / stats ------------------------------------------------------------------------------------------------

def test_export_command_writes_a_readable_flow_file_and_har(recording, cli, tmp_path):
    out = cli("export", "--store", recording.store, "--agent", "streamer", "--format", "mitm",
              "-o", tmp_path / "s.flows").output
    assert "wrote 3 flows" in out
    assert [f.metadata["rollouttap"]["agent_id"] for f in read_flow_file(tmp_path / "s.flows")] == ["streamer"] * 3
    cli("export", "--store", recording.store, "--run", recording.run_id, "-o", tmp_path / "r.har")
    assert len(json.loads((tmp_path / "r.har").read_text())["log"]["entries"]) == 6


def test_stats_json(recording, cli):
    data = json.loads(cli("stats", "--store", recording.store, "--json", "--eos-token-id", "2").output)
    # The manager's two agents, and two captured by a header only: 'broken' (its one call failed: no row) and
    # 'completer' (a /completions call with token ids: a row, as deploy() would build it).
    assert data["agents"] == 4 and data["agents_by_status"] == {"ok": 2, "unregistered": 2}
    assert data["calls"] == 8 and data["failed_calls"] == 1 and data["unattributed_flows"] >= 1
    with Store(recording.store) as s:  # a whole store's flows: every one, the unattributed too
        assert (data["flows"], data["flow_errors"]) == (len(s.flows()), len(s.flows(state="error")))
    assert data["flows"] == 8 + data["unattributed_flows"]
    assert data["usage"]["completion_tokens"] > 0
    assert data["usage"]["total_tokens"] == data["usage"]["prompt_tokens"] + data["usage"]["completion_tokens"]
    lat = data["latency"]
    assert lat["count"] == 8 and 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]
    assert data["fidelity"]["rows"] == 3 and data["fidelity"]["truncated"] == 0


def test_stats_of_a_run_and_the_table(recording, cli):
    data = json.loads(cli("stats", "--store", recording.store, "--run", recording.run_id, "--json").output)
    assert data["run_id"] == recording.run_id and data["agents"] == 2 and data["unattributed_flows"] is not None
    assert data["fidelity"]["truncated"] is None  # no eos id: every row would read as cut
    out = cli("stats", "--store", recording.store).output
    assert "agents by status" in out and "ok 2" in out and "latency p50 / p90 / p99" in out and "coverage" in out
    assert "unknown without --eos-token-id" in out
    cli("stats", "--store", recording.store, "--run", "no-such-run", code=1)


def test_stats_of_several_stores_add_up(recording, cli, tmp_path, monkeypatch):
    # A store per rank: read together, every count is the sum of the stores' (here: two copies of one store).
    import sqlite3
    monkeypatch.chdir(tmp_path)
    for name in ("rank-0.db", "rank-1.db"):
        with sqlite3.connect(recording.store) as src, sqlite3.connect(name) as dst:
            src.backup(dst)
    one = json.loads(cli("stats", "--store", "rank-0.db", "--json", "--eos-token-id", "2").output)
    both = json.loads(cli("stats", "--store", "rank-0.db", "--store", "rank-1.db", "--json", "--eos-token-id",
                          "2").output)
    for key in ("agents", "flows", "calls", "failed_calls", "flow_errors", "unattributed_flows", "discontinuities"):
        assert both[key] == 2 * one[key], key
    assert both["agents_by_status"] == {k: 2 * v for k, v in one["agents_by_status"].items()}
    assert both["latency"]["count"] == 2 * one["latency"]["count"] and both["fidelity"]["rows"] == 6
    assert "stats of rank-0.db + rank-1.db" in cli("stats", "--store", "rank-0.db", "--store", "rank-1.db").output
    again = json.loads(cli("stats", "--store", "rank-0.db", "--store", "./rank-0.db", "--json", "--eos-token-id",
                           "2").output)
    assert again == one  # one store named twice counts once
    os.link("rank-0.db", "hard-0.db")
    linked = json.loads(cli("stats", "--store", "rank-0.db", "--store", "hard-0.db", "--json", "--eos-token-id",
                            "2").output)
    assert linked == one  # a hard link to it too
    cli("stats", "--store", "rank-0.db", "--store", "missing.db", code=1)
    # An agent id both stores hold: shown in part from either, so it is refused, naming both.
    result = cli("show", "plain", "--store", "rank-0.db", "--store", "rank-1.db", code=1)
    assert "is in rank-0.db and rank-1.db" in str(result.exception)
    assert "plain" in cli("show", "plain", "--store", "rank-0.db", "--store", "hard-0.db").output  # one store
    assert "plain" in cli("show", "plain", "--store", "rank-0.db", "--store", "missing.db").output  # never written
    cli("show", "plain", "--store", "missing.db", code=1)


# -- resend / replay -----------------------------------------------------------------------------------------------

def test_resend_shows_old_and_new_answers(recording, cli):
    from rollouttap.testing.upstream import ScriptedUpstream
    with ScriptedUpstream(script="echo") as other:
        rows = _lines(cli("resend", "plain", "--store", recording.store, "--to", other.base_url, "--json",
                          "--header", "Authorization: Bearer sk-new").output)
        table = cli("resend", "streamer", "--store", recording.store, "--to", other.url).output
        sent = other.requests
    assert [r["new_status"] for r in rows] == [200, 200, 200] and all(r["error"] is None for r in rows)
    assert rows[0]["old_answer"] == '→ calc({"expression": "2+3"})' and rows[0]["new_answer"] == "echo: what is 2+3?"
    assert rows[1]["old_answer"] == "The answer is 5." and rows[2]["new_answer"] == "echo: say bye"
    with Store(recording.store) as s:
        recorded_bodies = [f.request_body for f in s.flows(agent_id="plain")]
    assert [r.body for r in sent[:3]] == recorded_bodies  # as the agent sent them: no token-id fields added
    assert sent[0].header("authorization") == "Bearer sk-new"
    assert "recorded answer" in table and "new answer" in table and "echo: say bye" in table


def test_resend_does_not_send_a_request_body_kept_only_in_part(recording):
    from dataclasses import replace

    from rollouttap.manager.replay import resend_requests
    from rollouttap.testing.upstream import ScriptedUpstream
    with Store(recording.store) as s:
        first, *rest = s.flows(agent_id="plain")
    cut = replace(first, meta={**first.meta, "request_body_cut": {"size": 5000, "kept": 100}})
    with ScriptedUpstream(script="echo") as other:
        rows = resend_requests([cut, *rest], other.base_url)
        sent = len(other.requests)
    assert rows[0].new_status is None and "kept only in part (100 of 5000 bytes)" in rows[0].error
    assert [r.new_status for r in rows[1:]] == [200, 200] and sent == 2


def test_resend_of_an_agent_without_model_requests_says_so(recording, cli, tmp_path):
    import sqlite3

    from rollouttap.errors import NotFoundError
    copy = tmp_path / "copy.db"
    with sqlite3.connect(recording.store) as src, sqlite3.connect(copy) as dst:
        src.backup(dst)
        dst.execute("UPDATE flows SET method = 'GET', path = '/health' WHERE agent_id = 'plain'")  # no model call
    result = cli("resend", "plain", "--store", copy, "--to", "http://127.0.0.1:9", code=1)
    assert isinstance(result.exception, NotFoundError) and "made no model request to resend" in str(result.exception)


def test_resend_to_a_dead_server_reports_errors_and_fails(recording, cli):
    from rollouttap.errors import ConfigError
    from rollouttap.manager.proxy import free_port
    result = cli("resend", "plain", "--store", recording.store, "--to", f"http://127.0.0.1:{free_port()}",
                 "--json", "--timeout", "5", code=1)
    rows = _lines(result.stdout)
    assert len(rows) == 3 and all(r["new_status"] is None and "ConnectionError" in r["error"] for r in rows)
    assert isinstance(result.exception, ConfigError) and "no request got an answer" in str(result.exception)


def test_replay_command_matches(recording, cli, confdir, tmp_path):
    out = cli("replay", "plain", "--store", recording.store, "--out", tmp_path / "r.db", "--confdir", confdir,
              "--json", "--", *recording.commands["plain"]).stdout
    data = json.loads(out)  # the whole of stdout: the agent's own output is inside, not before it
    assert data["divergence"] is None and data["exit_code"] == 0 and data["answered"] == 3
    assert data["stdout"].strip()


def test_replay_command_reports_divergence_and_exits_non_zero(recording, confdir, tmp_path):
    env = {**os.environ, "CHANGE_AT": "2"}
    proc = _rollouttap("replay", "plain", "--store", recording.store, "--out", tmp_path / "r.db",
                       "--confdir", confdir, "--", *recording.commands["plain"], env=env)
    assert proc.returncode == 1, proc.stderr
    assert "replay diverged at request #2 (recorded #2: POST /v1/chat/completions): request body differs" in proc.stderr
    assert '+      "content": "say goodbye",' in proc.stderr
    assert proc.stdout.splitlines()[-1] == "2 ERR 599"  # the agent's own output passes through


def test_entry_point_maps_errors_to_one_line(tmp_path):
    proc = _rollouttap("flows", "--store", tmp_path / "missing.db")
    assert proc.returncode == 1 and "rollouttap: no store at" in proc.stderr and "Traceback" not in proc.stderr


def test_python_dash_m_rollouttap_is_the_command_and_tells_its_version():
    import rollouttap
    proc = subprocess.run([sys.executable, "-m", "rollouttap", "--version"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout == f"rollouttap {rollouttap.__version__}\n", proc.stderr


def test_an_error_line_gets_a_next_step_only_where_its_message_lacks_one():
    from rollouttap.cli import hint_for
    from rollouttap.errors import ProxyError, StoreError
    assert "log" in hint_for(ProxyError("mitmdump exited with 1 (log /tmp/p.log):\n..."))
    assert hint_for(ProxyError("no running rollouttap proxy at http://h:1 records into x.db; start one")) == ""
    assert "--store" in hint_for(StoreError("no store at x.db"))


def test_debug_after_the_command_shows_the_traceback(tmp_path):
    proc = _rollouttap("flows", "--store", tmp_path / "missing.db", "--debug")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "no store at" in proc.stderr


@pytest.mark.parametrize("argv, expected", [
    (["flows", "--debug"], ["--debug", "flows"]),
    (["--debug", "flows"], ["--debug", "flows"]),
    (["replay", "X", "--", "agent", "--debug"], ["replay", "X", "--", "agent", "--debug"]),
    (["replay", "--debug", "X", "--", "a", "--debug"], ["--debug", "replay", "X", "--", "a", "--debug"]),
])
def test_debug_first_moves_only_our_own_flag(argv, expected):
    assert debug_first(argv) == expected


def test_entry_point_maps_os_errors_to_one_line(recording, tmp_path):
    proc = _rollouttap("export", "--store", recording.store, "-o", tmp_path / "no" / "such" / "dir" / "x.har")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("rollouttap: No such file or directory: ") and "x.har" in proc.stderr


@pytest.mark.parametrize("args, message", [
    (("resend", "nobody", "--to", "http://127.0.0.1:9/v1"), "no agent 'nobody' in"),
    (("export", "--agent", "nobody", "-o", "OUT"), "no flows of"),
    (("export", "--run", "no-run", "-o", "OUT"), "no flows of"),
])
def test_commands_refuse_an_agent_or_run_with_no_flows(recording, cli, tmp_path, args, message):
    out = tmp_path / "x.har"
    result = cli(*[str(out) if a == "OUT" else a for a in args], "--store", recording.store, code=1)
    assert message in str(result.exception) and not out.exists()


def test_export_checks_its_options_before_reading_the_stores(recording, cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("export", "--store", recording.store, "--agent", "nobody", "--run", "no-run", "-o", "x.har", code=1)
    assert "one agent or one run, not both" in str(result.exception)
    result = cli("export", "--store", recording.store, "-o", "-", code=1)
    assert "not stdout" in str(result.exception) and list(tmp_path.iterdir()) == []


def test_a_damaged_row_is_a_one_line_error_naming_it_and_leaves_no_export(recording, tmp_path):
    from contextlib import closing
    damaged, out = tmp_path / "damaged.db", tmp_path / "out" / "all.flows"
    out.parent.mkdir()
    with closing(sqlite3.connect(recording.store)) as src, closing(sqlite3.connect(damaged)) as dst:
        src.backup(dst)
        row = dst.execute("SELECT max(id) FROM flows").fetchone()[0]  # the last: an export writes the others first
        dst.execute("UPDATE flows SET meta = '{\"injected\": {' WHERE id = ?", (row,))  # a bit flip's truncation
        dst.commit()
    for args in (("flows",), ("export", "-o", out)):
        proc = _rollouttap(*args, "--store", damaged)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.startswith(f"rollouttap: flow row {row} of the store is damaged: its meta column")
    assert list(out.parent.iterdir()) == []  # no export that reads as whole, no temporary file


def test_a_body_written_as_text_by_hand_reads_as_its_bytes_and_a_number_as_a_damaged_row(recording, tmp_path):
    from contextlib import closing
    edited = tmp_path / "edited.db"
    with closing(sqlite3.connect(recording.store)) as src, closing(sqlite3.connect(edited)) as dst:
        src.backup(dst)
        row = dst.execute("SELECT max(id) FROM flows").fetchone()[0]
        dst.execute("UPDATE flows SET response_body = 'plain text body é—', response_headers = '[]' WHERE id = ?",
                    (row,))
        dst.commit()
    with Store(edited, readonly=True) as store:
        [flow] = [f for f in store.flows() if f.response_body == "plain text body é—".encode()]
        sizes = {listed.flow_id: size for listed, _, size in store.flow_listing()}
    assert flow.response_text() == "plain text body é—"
    assert sizes[flow.flow_id] == len("plain text body é—".encode())  # bytes, not characters
    for args in (("flows",), ("export", "-o", str(tmp_path / "all.har"))):
        proc = _rollouttap(*args, "--store", edited)
        assert proc.returncode == 0, proc.stderr
    with closing(sqlite3.connect(edited)) as db:
        db.execute("UPDATE flows SET response_body = 42 WHERE id = ?", (row,))
        db.commit()
    proc = _rollouttap("export", "-o", str(tmp_path / "again.har"), "--store", edited)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"rollouttap: flow row {row} of the store is damaged: its response_body column")


@pytest.mark.parametrize("args", [("flows", "--json"), ("flows",), ("--help",)])
def test_output_into_a_closed_pipe_exits_141_quietly(recording, args):
    # `rollouttap flows --json | head -1`: the reader is gone before the writer's next line.
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([sys.executable, "-m", "rollouttap.cli", *args, *(["--store", str(recording.store)]
                              if args[0] == "flows" else [])], stdout=write, stderr=subprocess.PIPE, text=True,
                              timeout=120)
    finally:
        os.close(write)
    assert (proc.returncode, proc.stderr) == (141, "")


def test_flows_of_several_stores_come_in_time_order_with_their_store(recording, cli, tmp_path):
    import sqlite3
    copy = tmp_path / "rank-1.db"
    with sqlite3.connect(recording.store) as src, sqlite3.connect(copy) as dst:
        src.backup(dst)
    one = _lines(cli("flows", "--store", recording.store, "--json").output)
    both = _lines(cli("flows", "--store", recording.store, "--store", copy, "--json").output)
    assert len(both) == 2 * len(one) and {r["store"] for r in both} == {str(recording.store), str(copy)}
    assert [r["time"] for r in both] == sorted(r["time"] for r in both)
    assert len(_lines(cli("flows", "--store", recording.store, "--store", copy, "--json", "--limit", "3").output)) == 3
    assert "store" not in one[0]  # one store: the rows as before
    cli("flows", "--store", recording.store, "--store", copy, "--agent", "nobody", code=1)
    assert "rank-1.db" in cli("flows", "--store", recording.store, "--store", copy).output


def test_export_of_several_stores_writes_all_their_flows_in_order(recording, cli, tmp_path):
    import sqlite3
    copy, empty = tmp_path / "rank-1.db", tmp_path / "rank-2.db"
    with sqlite3.connect(recording.store) as src, sqlite3.connect(copy) as dst:
        src.backup(dst)
    Store(empty).close()
    cli("export", "--store", recording.store, "-o", tmp_path / "one.har")
    cli("export", "--store", recording.store, "--store", copy, "-o", tmp_path / "both.har")
    one = json.loads((tmp_path / "one.har").read_text())["log"]["entries"]
    both = json.loads((tmp_path / "both.har").read_text())["log"]["entries"]
    assert len(both) == 2 * len(one)
    assert [e["startedDateTime"] for e in both] == sorted(e["startedDateTime"] for e in both)
    cli("export", "--store", empty, "--store", recording.store, "--agent", "plain", "-o", tmp_path / "plain.har")
    assert len(json.loads((tmp_path / "plain.har").read_text())["log"]["entries"]) == 3
    result = cli("export", "--store", empty, "--store", copy, "--agent", "nobody", "-o", tmp_path / "x.har", code=1)
    assert f"no flows of agent 'nobody' in {empty} or {copy}" in str(result.exception)


def test_an_agent_is_found_in_whichever_store_holds_it(recording, cli, tmp_path):
    # A store per rank: show, resend and replay take several and read the agent from the one that has it.
    empty = tmp_path / "rank-1.db"
    Store(empty).close()
    shown = json.loads(cli("show", "plain", "--store", empty, "--store", recording.store, "--json").output)
    assert shown["agent"]["agent_id"] == "plain" and shown["conversation"]["calls"]
    result = cli("show", "nobody", "--store", empty, "--store", recording.store, code=1)
    assert f"no agent 'nobody' in {empty} or {recording.store}" in str(result.exception)
    from rollouttap.testing.upstream import ScriptedUpstream
    with ScriptedUpstream(script="echo") as other:
        rows = _lines(cli("resend", "plain", "--store", empty, "--store", recording.store, "--to", other.base_url,
                          "--json").output)
    assert len(rows) == 3 and all(r["new_status"] == 200 for r in rows)


# -- pure helpers --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("1732900000", 1732900000.0),
    ("1732900000.5", 1732900000.5),
    ("2024-11-29T17:06:40Z", 1732900000.0),
    ("2024-11-29T18:06:40+01:00", 1732900000.0),
])
def test_parse_when(text, expected):
    assert parse_when(text) == expected


def test_parse_when_refuses_nonsense():
    from rollouttap.errors import ConfigError
    with pytest.raises(ConfigError, match="ISO 8601"):
        parse_when("yesterday")
    for text in ("nan", "inf", "-inf", "1e400"):  # a filter on them would match nothing, in silence
        with pytest.raises(ConfigError, match="is not a time"):
            parse_when(text)


@pytest.mark.parametrize("text, expected", [
    ("h", ("h", None)), ("h:80", ("h", 80)), ("[::1]:80", ("::1", 80)), ("[::1]", ("::1", None)),
    ("::1", ("::1", None)), ("[::1", None), ("[::1]x", None), ("h:x", None),
])
def test_host_port(text, expected):
    from rollouttap.errors import ConfigError
    from rollouttap.manager.inspect import host_port
    if expected is None:
        with pytest.raises(ConfigError, match="is not HOST"):
            host_port(text)
    else:
        assert host_port(text) == expected


@pytest.mark.parametrize("values, q, expected", [
    ([], 50, None), ([3.0], 99, 3.0), ([1.0, 2.0, 3.0, 4.0], 50, 2.5), ([1.0, 2.0, 3.0, 4.0], 100, 4.0),
    ([4.0, 1.0, 3.0, 2.0], 0, 1.0), (list(map(float, range(101))), 90, 90.0),
])
def test_percentile(values, q, expected):
    assert percentile(values, q) == expected


def test_latency_summary_skips_unknown():
    assert latency_summary([None, 1.0, 3.0]) == {"count": 2, "p50": 2.0, "p90": 2.8, "p99": 2.98, "max": 3.0}


@pytest.mark.parametrize("mask, runs", [
    ([], []), ([1], [(0, 1, 1)]), ([0, 0, 1, 1, 0], [(0, 2, 0), (2, 4, 1), (4, 5, 0)]),
])
def test_mask_runs(mask, runs):
    assert mask_runs(mask) == runs


@pytest.mark.parametrize("content, text", [
    (None, ""), ("hi", "hi"), ([{"type": "text", "text": "a"}, {"type": "image_url"}, {"type": "text", "text": "b"}],
                               "a[image_url]b"),
])
def test_message_text(content, text):
    assert message_text(content) == text


@pytest.mark.parametrize("arguments, text", [('{"x": 1}', 'f({"x": 1})'), ({"x": 1}, 'f({"x": 1})')])
def test_tool_call_text(arguments, text):
    assert tool_call_text({"function": {"name": "f", "arguments": arguments}}) == text


def test_conversation_steps_show_each_call_what_it_adds(recording):
    from rollouttap.manager.conversation import build_conversation
    with Store(recording.store) as s:
        conv = build_conversation(s.flows(agent_id="plain"))
    steps = conversation_steps(conv.calls)
    assert [s.first_new for s in steps] == [0, 3, 5] and [s.extends for s in steps] == [False, True, True]
    assert [m["role"] for m in steps[1].new_messages] == ["tool"]
    assert steps[2].new_messages == [{"role": "user", "content": "say bye"}]


@pytest.mark.parametrize("kept", [0, 1])
def test_conversation_steps_after_a_second_sample_continue_the_answer_kept(kept):
    from types import SimpleNamespace

    def call(messages, reply, turn, thread=0):
        answer = {"role": "assistant", "content": reply}
        return SimpleNamespace(messages=messages, thread=thread, turn=turn,
                               response=SimpleNamespace(to_message=lambda: answer))
    user = {"role": "user", "content": "hi"}
    samples = ["one", "two"]
    calls = [call([user], samples[0], 0), call([user], samples[1], 0),
             call([user, {"role": "assistant", "content": samples[kept]}, {"role": "user", "content": "go on"}],
                  "done", 1),
             call([{"role": "user", "content": "a helper's task"}], "ok", 2, thread=1)]
    for number, each in enumerate(calls):
        each.index = 10 + number
    steps = conversation_steps(calls)
    assert [s.attempt for s in steps] == [0, 1, 0, 0] and [s.extends for s in steps] == [False, False, True, False]
    assert steps[2].new_messages == [{"role": "user", "content": "go on"}]
    assert [s.starts_thread for s in steps] == [True, True, False, True]
    assert steps[2].continues == 10 + kept and [s.continues for s in steps[:2] + steps[3:]] == [None] * 3


def test_conversation_steps_after_a_retry_name_no_answer_to_choose_from():
    from types import SimpleNamespace
    user = {"role": "user", "content": "hi"}
    answer = {"role": "assistant", "content": "one"}
    failed = SimpleNamespace(messages=[user], thread=0, turn=0, index=0, response=None)
    retried = SimpleNamespace(messages=[user], thread=0, turn=0, index=1,
                              response=SimpleNamespace(to_message=lambda: answer))
    nxt = SimpleNamespace(messages=[user, answer, {"role": "user", "content": "go on"}], thread=0, turn=1, index=2,
                          response=None)
    steps = conversation_steps([failed, retried, nxt])
    assert steps[2].extends and steps[2].continues is None  # one answer only: nothing to say which


def test_flow_row_of_an_error_flow(recording):
    with Store(recording.store) as s:
        [broken] = s.flows(agent_id="broken")
    row = flow_row(broken)
    assert row["state"] == "error" and row["error"] and row["agent"] == "broken"


def test_tokenizer_option_loads_a_tokenizer_json_and_its_eos(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from rollouttap.cli_render import load_tokenizer
    from rollouttap.errors import ConfigError
    tok = Tokenizer(models.WordLevel({"hello": 0, "world": 1, "<eos>": 2, "[UNK]": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<eos>"}}))
    for spec in (tmp_path, tmp_path / "tokenizer.json"):
        decode, eos = load_tokenizer(str(spec))
        assert eos == 2 and decode(1) == "world"
    assert load_tokenizer(None) == (None, None)
    assert load_tokenizer("fake")[1] == 2
    with pytest.raises(ConfigError, match="cannot load a tokenizer"):
        load_tokenizer(str(tmp_path / "missing.json"))


def test_usage_totals_fall_back_to_token_ids_for_calls_without_usage():
    from types import SimpleNamespace

    from rollouttap.manager.inspect import usage_totals
    calls = [SimpleNamespace(usage={"prompt_tokens": 7, "completion_tokens": 3}, prompt_token_ids=[1] * 7,
                             completion_token_ids=[2] * 3),
             SimpleNamespace(usage=None, prompt_token_ids=[1] * 5, completion_token_ids=[2] * 2)]  # streamed
    assert usage_totals(calls) == {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}


def test_prune_deletes_old_flows_of_a_store_and_says_how_many(recording, cli, tmp_path):
    import sqlite3
    copy = tmp_path / "pruned.db"
    with sqlite3.connect(recording.store) as src, sqlite3.connect(copy) as dst:
        src.backup(dst)
    with Store(copy) as store:
        total, kept = len(store.flows()), len(store.flows(state="open"))
    assert "give --older-than or --before" in str(cli("prune", "--store", copy, code=1).exception)
    cli("prune", "--store", copy, "--older-than", "1x", code=1)
    assert cli("prune", "--store", copy, "--older-than", "1d").output.startswith("deleted 0 flows and 0 agents")
    out = cli("prune", "--store", copy, "--before", str(time.time() + 60)).output
    assert out.startswith(f"deleted {total - kept} flows and ") and total > kept
    with Store(copy) as store:
        assert len(store.flows()) == kept and store.agents() == []  # every agent ended with its flows
