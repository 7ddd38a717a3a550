"""The benchmark runner's smoke mode: every benchmark runs end to end and reports. No timing is asserted."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

RUNNER = Path(__file__).parent.parent / "bench" / "run.py"


def _benchmarks() -> dict[str, str]:
    out = subprocess.run([sys.executable, str(RUNNER), "--list"], capture_output=True, text=True, timeout=60,
                         check=True)
    return dict(line.split("\t", 1) for line in out.stdout.splitlines())


@pytest.mark.slow
def test_smoke_run_writes_every_section(tmp_path):
    expected = _benchmarks()
    assert {"latency", "concurrency", "cpu", "peers", "streaming", "attribution", "scale", "deploy", "store",
            "findings"} <= set(expected)
    out = tmp_path / "RESULTS.md"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, str(RUNNER), "--smoke", "--out", str(out)], capture_output=True,
                         text=True, timeout=600, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-4000:] + (out.read_text()[-4000:] if out.exists() else "")
    text = out.read_text()
    assert "bench/run.py --smoke" in text and "| mitmproxy |" in text
    probes = re.findall(r"\| host speed at (start|end) \| Python loop ([\d.]+) ms, interpreter start ([\d.]+) ms", text)
    assert [p[0] for p in probes] == ["start", "end"] and all(float(n) > 0 for p in probes for n in p[1:])
    for title in expected.values():
        assert f"## {title}\n" in text, title  # a failed or skipped one would carry "(error)"
    results = json.loads(out.with_suffix(".json").read_text())
    assert set(results["sections"]) == set(expected)
    assert all(s["status"] == "ok" for s in results["sections"].values())
    # Correctness figures the smoke run does check: no flow lost or unattributed, every lookup right.
    for runs in results["sections"]["scale"]["data"]["runs"].values():
        for one in runs:
            assert one["lost"] == 0 and one["unattributed"] == 0 and one["agents_failed"] == 0
    for runs in results["sections"]["attribution"]["data"]["runs"].values():
        for one in runs:
            assert all(one[who]["wrong"] == 0 for who in ("new agent", "old agent",
                                                           "new processes, running attributor",
                                                           "new processes of a registered agent, running attributor",
                                                           "a registered agent's process reconnecting, running "
                                                           "attributor"))
            # A reconnecting process of a live agent is answered on the event loop (but once its caches are a
            # second old: a slow machine may see that)
            reconnecting = one["a registered agent's process reconnecting, running attributor"]
            assert reconnecting["to_thread"] < reconnecting["connections"]


def test_floor_proxy_answers_from_memory_after_the_first_request(tmp_path, monkeypatch):
    """Section 1c's floor row is only a floor if no upstream answers: bench/answer_cache.py must answer."""
    import requests

    monkeypatch.syspath_prepend(str(RUNNER.parent))
    from answer_cache import HEADER
    from procs import FLOOR, BareProxy, Upstream

    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    with Upstream() as upstream:
        proxy = BareProxy(FLOOR, tmp_path / "conf").start()
        try:
            with requests.Session() as session:
                session.trust_env = False
                answers = [session.post(upstream.url + "/v1/chat/completions", json=body, timeout=30,
                                        proxies={"http": proxy.url}) for _ in range(3)]
        finally:
            proxy.stop()
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert [a.headers.get(HEADER) for a in answers] == [None, "1", "1"]
    assert answers[1].content == answers[2].content == answers[0].content


@pytest.mark.parametrize("smoke, only, committed", [(False, "", True), (True, "", False), (False, "latency", False),
                                                    (True, "store", False)])
def test_only_a_full_run_of_every_section_replaces_the_committed_results(smoke, only, committed):
    sys.path.insert(0, str(RUNNER.parent))
    try:
        import run
    finally:
        sys.path.remove(str(RUNNER.parent))
    out = run.default_out(smoke, only)
    assert (out == RUNNER.with_name("RESULTS.md")) is committed and out.name.startswith("RESULTS")
