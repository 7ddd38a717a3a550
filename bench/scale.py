"""Benchmark 4: many concurrent agent processes through one proxy (or two): lost or unattributed flows, RSS, store, calls/s.

Each agent is a tagged Python process (``ROLLOUTTAP_AGENT_ID``) making ``scale_calls`` chat calls with
urllib (a new connection per call, so every call also pays attribution). All agents start together.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from context import Context, progress
from procs import PY, TOKENS_TUNED, CaptureProxy, proxy_environ
from report import Section, table
from rollouttap.store import Store
from stats import fmt, spread

TITLE = "4. Scale: concurrent agent processes"
GOAL_RSS_MB = 300
_AGENT_CODE = """
import json, sys, urllib.request
url, calls, me = sys.argv[1], int(sys.argv[2]), sys.argv[3]
opener = urllib.request.build_opener()
print("READY", flush=True)
sys.stdin.readline()
ok = 0
for i in range(calls):
    body = json.dumps({"model": "policy", "messages": [{"role": "user", "content": f"{me} call {i}"}]}).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with opener.open(req, timeout=60) as resp:
            resp.read()
            ok += 1
    except Exception as exc:
        print("ERR", repr(exc), file=sys.stderr, flush=True)
print("DONE", ok, flush=True)
"""


class PeakRss(threading.Thread):
    """Samples a process's RSS every 20 ms until stopped; keeps the peak."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.peak = self.proc.memory_info().rss
        self.start_rss = self.peak
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(0.02):
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return

    def stop(self) -> None:
        self._halt.set()
        self.join(5)


def start_agents(count: int, calls: int, url: str, proxy_urls: list[str]) -> list[subprocess.Popen]:
    """Agent i goes through proxy i mod len(proxy_urls), as AgentManager(proxies=N) hands them out."""
    agents = []
    for i in range(count):
        env = {**proxy_environ(proxy_urls[i % len(proxy_urls)]), "ROLLOUTTAP_AGENT_ID": f"scale-{i}"}
        agents.append(subprocess.Popen([PY, "-c", _AGENT_CODE, url, str(calls), f"scale-{i}"], env=env,
                                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True))
    return agents


def wait_agents(agents: list[subprocess.Popen], deadline: float) -> tuple[int, int, dict[str, int]]:
    """(calls that succeeded, agents that failed or ran out of time, client errors by kind); kills
    stragglers at the deadline."""
    ok, failed, errors = 0, 0, {}
    for agent in agents:
        try:
            out, err = agent.communicate(timeout=max(0.1, deadline - time.monotonic()))
            done = [line for line in out.splitlines() if line.startswith("DONE ")]
            ok += int(done[0].split()[1]) if done else 0
            failed += agent.returncode != 0 or not done
            for line in err.splitlines():
                if line.startswith("ERR "):
                    kind = line[4:124]
                    errors[kind] = errors.get(kind, 0) + 1
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.communicate()
            failed += 1
    return ok, failed, errors


def store_bytes(path: Path) -> int:
    return sum(os.path.getsize(p) for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")) if p.exists())


def settle(path: Path, expected: int, timeout: float) -> dict[str, int]:
    """Flow counts once every flow is closed (or the timeout passes)."""
    deadline = time.monotonic() + timeout
    with Store(path) as store:
        while True:
            counts = store.flow_counts()
            if (counts["open"] == 0 and counts["total"] >= expected) or time.monotonic() > deadline:
                return counts
            time.sleep(0.1)


def one_run(ctx: Context, agents_n: int, rep: int, proxies_n: int = 1) -> dict[str, Any]:
    fast, _ = ctx.shared.upstreams()
    workdir = ctx.workdir / f"scale-{agents_n}-{proxies_n}-{rep}"
    workdir.mkdir(parents=True)
    confdir = ctx.workdir / "mitmproxy-conf-scale"
    # Same variant, same workdir: every proxy records into the same store, as AgentManager(proxies=N) does.
    proxies = [CaptureProxy(TOKENS_TUNED, workdir, confdir, (fast.hostport,)) for _ in range(proxies_n)]
    store = proxies[0].store
    calls = ctx.plan.scale_calls
    try:
        for proxy in proxies:
            proxy.start()
        rsss = [PeakRss(p.pid) for p in proxies]
        agents = start_agents(agents_n, calls, fast.url + "/v1/chat/completions", [p.url for p in proxies])
        try:
            for agent in agents:  # every interpreter is up before the clock starts
                assert agent.stdout is not None
                if agent.stdout.readline().strip() != "READY":
                    raise RuntimeError("a scale agent did not start")
            for rss in rsss:
                rss.start()
            started = time.monotonic()
            for agent in agents:
                agent.stdin.write("go\n")  # type: ignore[union-attr]
                agent.stdin.flush()  # type: ignore[union-attr]
            ok, failed, client_errors = wait_agents(agents, started + ctx.plan.scale_budget_s)
            wall = time.monotonic() - started
        finally:
            for agent in agents:
                if agent.poll() is None:
                    agent.kill()
                    agent.wait()
        counts = settle(store, agents_n * calls, 30)
        for rss in rsss:
            rss.stop()
        per_agent, flow_errors = _per_agent_done(store)
    finally:
        for proxy in proxies:  # a proxy that never started stops as a no-op
            proxy.stop()
    expected = agents_n * calls
    short = sum(max(0, calls - per_agent.get(f"scale-{i}", 0)) for i in range(agents_n))
    return {"agents": agents_n, "calls_ok": ok, "agents_failed": failed, "seconds": wall,
            "per_s": ok / wall if wall > 0 else float("nan"), "flows": counts,
            "lost": expected - counts["done"], "short_agents_calls": short,
            "unattributed": counts["unattributed"], "proxies": proxies_n,
            "rss_start_mb": max(r.start_rss for r in rsss) / 2**20,
            "rss_peak_mb": max(r.peak for r in rsss) / 2**20, "store_mb": store_bytes(store) / 2**20,
            "client_errors": client_errors, "flow_errors": flow_errors}


def _per_agent_done(path: Path) -> tuple[dict[str, int], dict[str, int]]:
    """Done flows per agent, and flows in error by message."""
    with Store(path) as store:
        flows = store.flows(state="done")
        failed = store.flows(state="error")
    out: dict[str, int] = {}
    for flow in flows:
        if flow.agent_id:
            out[flow.agent_id] = out.get(flow.agent_id, 0) + 1
    errors: dict[str, int] = {}
    for flow in failed:
        errors[str(flow.error)[:120]] = errors.get(str(flow.error)[:120], 0) + 1
    return out, errors


def run(ctx: Context) -> Section:
    runs: dict[tuple[int, int], list[dict[str, Any]]] = {}
    sizes = [(n, 1) for n in ctx.plan.scale_agents] + [(max(ctx.plan.scale_agents), 2)]
    for agents_n, proxies_n in sizes:
        runs[agents_n, proxies_n] = []
        for rep in range(ctx.plan.repeats):
            progress(f"scale: {agents_n} agents, {proxies_n} proxies, run {rep + 1}/{ctx.plan.repeats}")
            runs[agents_n, proxies_n].append(one_run(ctx, agents_n, rep, proxies_n))
    rows = []
    bad = False
    for (agents_n, proxies_n), reps in runs.items():
        lost = sum(r["lost"] + r["short_agents_calls"] for r in reps)
        unattributed = sum(r["unattributed"] for r in reps)
        peak = spread([r["rss_peak_mb"] for r in reps])
        bad |= lost > 0 or unattributed > 0 or any(r["agents_failed"] for r in reps)
        rows.append((agents_n, proxies_n, agents_n * ctx.plan.scale_calls, spread([r["per_s"] for r in reps]).fmt(0),
                     lost, unattributed, sum(r["agents_failed"] for r in reps),
                     fmt(spread([r["rss_start_mb"] for r in reps]).median, 0), peak.fmt(0),
                     "yes" if peak.median <= GOAL_RSS_MB else "**no**",
                     spread([r["store_mb"] for r in reps]).fmt(1)))
    problems = [f"- {agents_n} agents, {proxies_n} proxies: {where} error ×{n}: `{text}`"
                for (agents_n, proxies_n), reps in runs.items()
                for r in reps for where in ("client", "flow") for text, n in r[f"{where}_errors"].items()]
    body = (f"Agents are tagged processes calling the upstream through mitmdump + rollouttap (token ids and "
            f"tuning on) with urllib: {ctx.plan.scale_calls} calls each, a new connection per call, all released "
            f"at once; {ctx.plan.repeats} runs. With 2 proxies, agent i goes through proxy i mod 2, both "
            "recording into one store (as `AgentManager(proxies=2)`); RSS columns are the larger proxy's. "
            "lost = calls without a `done` flow of their agent (must be 0); unattributed must be 0.\n\n"
            + table(["agents", "proxies", "calls", "calls/s", "lost", "unattributed", "agents failed", "proxy RSS idle MB",
                     "proxy RSS peak MB", f"peak ≤ {GOAL_RSS_MB} MB", "store MB"], rows)
            + ("\n\nErrors:\n\n" + "\n".join(problems[:20]) if problems else ""))
    return Section("scale", TITLE, body, {"runs": {f"{a}x{p}": v for (a, p), v in runs.items()}},
                   "error" if bad else "ok")
