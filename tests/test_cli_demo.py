"""The README's main job, as a user runs it: ``rollouttap demo`` trains and reports what it captured."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.timeout(1200)  # the first run builds the warm-started tiny model (about a minute)
def test_demo_trains_on_agent_rollouts_and_loses_no_flow(tmp_path):
    store = tmp_path / "runs.db"
    out = subprocess.run([sys.executable, "-m", "rollouttap.cli", "demo", "--steps", "1", "--prompts", "4",
                          "--store", str(store), "--json"], capture_output=True, text=True, timeout=1100,
                         env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "TMPDIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)  # stdout is the result alone (the trainer logs to stderr)
    assert summary["steps"] == 1 and len(summary["rewards"]) == 1
    assert sum(summary["agents"].values()) == 8  # 2 prompts x 4 generations
    assert summary["calls"] >= 8 and summary["trainable_tokens"] > 0
    flows = summary["flows"]
    assert flows["total"] == summary["calls"] and flows["open"] == 0 and flows["unattributed"] == 0
    assert store.exists()
    assert not list(tmp_path.glob("rollouttap-demo-trainer-*"))  # the trainer's output folder goes with the demo


@pytest.mark.parametrize("env, expected", [
    ({"RANK": "1", "WORLD_SIZE": "2"}, (1, 2)),  # torchrun --nproc_per_node 2: each rank's summary says which
    ({"RANK": "0", "WORLD_SIZE": "1"}, None), ({}, None), ({"RANK": "x", "WORLD_SIZE": "2"}, None),
])
def test_demo_summary_names_its_rank_under_torchrun(monkeypatch, env, expected):
    from rollouttap.cli_demo import _rank, summary_title
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert _rank() == expected
    title = summary_title("agents", _rank())
    assert title == ("rollouttap demo (agents generation, rank 1 of 2)" if expected else
                     "rollouttap demo (agents generation)")
