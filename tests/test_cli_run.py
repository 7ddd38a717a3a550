"""``rollouttap run``: prompts.jsonl in, results.jsonl and a summary table out (real proxy and agents)."""

from __future__ import annotations

import json
import re
import shlex
import signal
import sqlite3
import subprocess
import sys
import time

from pathlib import Path

import psutil

import pytest

from rollouttap.store import Store

from conftest import running_agents
from manager_support import HERE as SUPPORT
from rollouttap.cli import main
from rollouttap.cli_run import parse_env, read_prompts, read_prompts_file
from rollouttap.errors import ConfigError
from rollouttap.testing.fake_tokenizer import FakeTokenizer


@pytest.mark.parametrize("lines, expected", [
    (['"hello"', "", '{"prompt": "x", "id": 3}'], ["hello", "x"]),
    (['[{"role": "user", "content": "hi"}]'], [[{"role": "user", "content": "hi"}]]),
    (['{"messages": [{"role": "user", "content": "hi"}]}'], [[{"role": "user", "content": "hi"}]]),
])
def test_read_prompts(lines, expected):
    assert read_prompts(lines) == expected


@pytest.mark.parametrize("line", ["not json", "3", '{"other": 1}', "[1, 2]"])
def test_read_prompts_refuses_with_line_number(line):
    with pytest.raises(ConfigError, match="line 2"):
        read_prompts(['"ok"', line])


@pytest.mark.parametrize("lines", [[], ["", "  "]])
def test_read_prompts_refuses_a_file_without_prompts(lines):
    with pytest.raises(ConfigError, match="no prompt"):
        read_prompts(lines, "empty.jsonl")


def test_a_prompts_file_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('"first"\n"second"\n', encoding="utf-8-sig")
    assert read_prompts_file(path) == ["first", "second"]


def test_parse_env():
    assert parse_env(["A=1", "B=x=y"]) == {"A": "1", "B": "x=y"}
    with pytest.raises(ConfigError):
        parse_env(["nope"])


def test_run_writes_results_and_prints_a_summary(tmp_path, confdir, upstream, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('"chat 1 @id"\n{"prompt": "crash"}\n"chat 2 @id"\n')
    out, store = tmp_path / "results.jsonl", tmp_path / "runs.db"
    command = f"{shlex.quote(sys.executable)} {shlex.quote(SUPPORT)} {{prompt}}"
    code = main(["run", "--agent", command, "--prompts", str(prompts), "--parallel", "3", "--timeout", "60",
                 "--store", str(store), "--model-url", upstream.base_url, "--out", str(out),
                 "--confdir", str(confdir), "--env", "EXTRA=1", "--proxies", "3",
                 "--eos-token-id", str(FakeTokenizer.eos_token_id)])
    assert code == 0  # a failed agent is reported, not fatal
    assert out.stat().st_mode & 0o777 == store.stat().st_mode & 0o777 == 0o600  # prompts, bodies: owner only
    results = sorted((json.loads(line) for line in out.read_text().splitlines()), key=lambda r: r["index"])
    assert [r["status"] for r in results] == ["ok", "failed", "ok"]
    assert [r["calls"] for r in results] == [1, 0, 2]
    assert results[0]["conversation"]["calls"][0]["messages"][0]["content"] == f"say {results[0]['agent_id']}"
    assert "RuntimeError" in results[1]["stderr_tail"]
    row = results[0]["row"]  # the upstream's token ids, made into a training row
    assert row["completion_ids"][-1] == FakeTokenizer.eos_token_id and 1 in row["env_mask"]
    with Store(store) as db:  # agents take the proxies in turn: 0 and 2 used different ones
        [run_id] = {r["run_id"] for r in results}  # what `flows --run` and `stats --run` take
        assert {a.agent_id for a in db.agents(run_id)} == {r["agent_id"] for r in results}
        assert len({f.proxy_id for r in (results[0], results[2]) for f in db.flows(agent_id=r["agent_id"])}) == 2
    err = capsys.readouterr().err
    for label in ("ok", "failed", "timeout", "model calls", "tokens", "unattributed flows", "bypassing agents"):
        assert label in err
    assert "3/3" in err
    trained = sum(sum(r["row"]["env_mask"]) for r in results if r["row"])
    assert re.search(rf"trained / sampled tokens\W+{trained} / {trained} \(100%\)", err), err
    assert re.search(r"cut off\)\W+3 \(0\)", err), err
    failed = results[1]["error"].splitlines()[0]
    assert f"1 × {failed}" in " ".join(err.split())  # why an agent failed, under the table


def _start_hanging_run(tmp_path, confdir, upstream) -> tuple[subprocess.Popen[str], Path, Path]:
    """`rollouttap run` of three agents that hang, two at a time (the third waits its turn): (process, store,
    --out file)."""
    prompts, store, out = tmp_path / "p.jsonl", tmp_path / "runs.db", tmp_path / "results.jsonl"
    prompts.write_text('"hang"\n' * 3)
    command = f"{shlex.quote(sys.executable)} {shlex.quote(SUPPORT)} {{prompt}}"
    run = subprocess.Popen([sys.executable, "-m", "rollouttap.cli", "run", "--agent", command, "--prompts", prompts,
                            "--timeout", "120", "--store", store, "--model-url", upstream.base_url, "--parallel", "2",
                            "--out", out, "--confdir", confdir], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True)
    return run, store, out


def _signals_while_the_agents_cannot_end(run: subprocess.Popen[str], store: Path, signals: int) -> str:
    """Send the run ``signals`` SIGTERMs, a second apart, while the killed agents' ends wait for a write lock
    held here (so each signal lands while the run waits for them); its stderr once it has exited with 130."""
    lock = sqlite3.connect(store, isolation_level=None, timeout=30)
    try:
        running_agents(store, 2)
        lock.execute("BEGIN IMMEDIATE")
        for _ in range(signals):
            run.send_signal(signal.SIGTERM)
            time.sleep(1)  # not a synchronisation: each window stays open while the lock is held
        lock.execute("ROLLBACK")
        assert run.wait(60) == 130
        return run.stderr.read()
    finally:
        lock.close()
        run.kill()
        run.stderr.close()


def test_a_run_broken_off_by_a_second_signal_still_reports_every_prompt(tmp_path, confdir, upstream):
    run, store, out = _start_hanging_run(tmp_path, confdir, upstream)
    stderr = _signals_while_the_agents_cannot_end(run, store, 2)  # the second breaks deploy()'s wait
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted((r["index"], r["error"]) for r in lines) == [
        (0, "cancelled before it finished"), (1, "cancelled before it finished"), (2, "cancelled before it started")
    ], stderr
    assert "(interrupted)" in stderr


@pytest.mark.parametrize("args", [
    [],  # neither --agent nor --entry
    ["--agent", "x {prompt}", "--entry", "m:f"],
])
def test_run_usage_errors_exit_non_zero(tmp_path, args, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('"x"\n')
    assert main(["run", "--prompts", str(prompts), "--store", str(tmp_path / "r.db"), *args]) != 0
    assert "exactly one of --agent and --entry" in capsys.readouterr().err


def test_a_third_signal_while_it_waits_for_the_agents_still_prints_the_summary(tmp_path, confdir, upstream):
    run, store, out = _start_hanging_run(tmp_path, confdir, upstream)
    # deploy() waits for the killed agents, then cancel() does: the third signal breaks that wait
    stderr = _signals_while_the_agents_cannot_end(run, store, 3)
    assert "(interrupted)" in stderr and "model calls" in stderr, stderr
    assert len(out.read_text().splitlines()) == 3  # the agents' lines came as close() waited for them


@pytest.mark.parametrize("argv, option", [
    (["flows", "--limit", "0"], "--limit"),
    (["replay", "x", "--timeout", "-1", "--", "true"], "--timeout"),
    (["resend", "x", "--to", "http://127.0.0.1:9", "--timeout", "0"], "--timeout"),
    (["demo", "--steps", "0"], "--steps"),
    (["demo", "--prompts", "0"], "--prompts"),
    (["run", "--agent", "x {prompt}", "--prompts", "p.jsonl", "--eos-token-id", "-3"], "--eos-token-id"),
    (["stats", "--eos-token-id", "-1"], "--eos-token-id"),
])
def test_numbers_out_of_range_are_usage_errors(tmp_path, capsys, argv, option):
    command, rest = argv[0], [str(tmp_path / a) if a == "p.jsonl" else a for a in argv[1:]]
    (tmp_path / "p.jsonl").write_text('"hi"\n')
    store = [] if command == "demo" else ["--store", str(tmp_path / "runs.db")]
    assert main([command, *store, *rest]) == 2  # refused before anything runs
    assert f"Invalid value for '{option}'" in capsys.readouterr().err


def test_run_keep_for_deletes_what_earlier_runs_left_before_it_starts(tmp_path, confdir, upstream, capsys):
    prompts, store = tmp_path / "p.jsonl", tmp_path / "r.db"
    prompts.write_text('"chat 1 @id"\n')
    common = ["run", "--agent", f"{shlex.quote(sys.executable)} {shlex.quote(SUPPORT)} {{prompt}}",
              "--prompts", str(prompts), "--store", str(store), "--model-url", upstream.base_url,
              "--confdir", str(confdir)]
    ids, kept = [], []
    for keep in ([], ["--keep-for", "1d"], ["--keep-for", "0"]):  # the last deletes both earlier runs' agents
        out = tmp_path / f"out{len(ids)}.jsonl"
        assert main([*common, *keep, "--out", str(out)]) == 0
        ids.append(json.loads(out.read_text())["agent_id"])
        with Store(store) as s:
            kept.append([a.agent_id for a in s.agents()])
    assert kept == [ids[:1], ids[:2], ids[2:]]
    assert main([*common, "--keep-for", "6 hours"]) == 1
    assert "--keep-for: '6 hours' is not an age such as 90, 30m, 6h or 2d" in capsys.readouterr().err


def test_run_bad_template_is_a_one_line_error(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('"x"\n')
    assert main(["run", "--agent", "agent {task}", "--prompts", str(prompts),
                 "--store", str(tmp_path / "r.db")]) == 1
    err = capsys.readouterr().err
    assert "unknown placeholder {task}" in err and "next:" in err


def test_run_entry_point_results_on_stdout(tmp_path, confdir, upstream, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('"hi @id"\n')
    code = main(["run", "--entry", "manager_support:entry_chat", "--prompts", str(prompts), "--store",
                 str(tmp_path / "runs.db"), "--model-url", upstream.base_url, "--confdir", str(confdir)])
    assert code == 0
    [line] = capsys.readouterr().out.splitlines()
    result = json.loads(line)
    assert result["status"] == "ok" and result["return_value"]["reply"] == f"echo: say hi {result['agent_id']}"


def test_sigterm_ends_a_run_as_ctrl_c_does(tmp_path, confdir, upstream):
    run, store, out = _start_hanging_run(tmp_path, confdir, upstream)
    try:
        agents = running_agents(store, 2)
        run.send_signal(signal.SIGTERM)
        assert run.wait(60) == 130  # the Ctrl-C path (the reaper would also end the agents, differently)
        stderr = run.stderr.read()
    finally:
        run.kill()
        run.stderr.close()
    # Every prompt has its result line, and the summary table is printed, marked as interrupted.
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted((r["index"], r["status"], r["error"]) for r in lines) == [
        (0, "error", "cancelled before it finished"), (1, "error", "cancelled before it finished"),
        (2, "error", "cancelled before it started")]
    assert "(interrupted)" in stderr and "error" in stderr
    alive = [a.root_pid for a in agents if psutil.pid_exists(a.root_pid)
             and psutil.Process(a.root_pid).status() != psutil.STATUS_ZOMBIE]
    assert alive == []
    with Store(store) as db:
        assert [(a.status, a.meta["error"]) for a in db.agents()] == [("error", "cancelled before it finished")] * 2
        assert db.proxies()[0]["stopped_at"] is not None
