"""Benchmark 5: ``AgentManager.deploy()`` end to end for N agents vs the same agents run directly.

The agent is a small program (requests.Session, like the seed's agents) making a few chat calls to
``$OPENAI_BASE_URL``. Direct: the same programs started together, no proxy, no manager.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

from attribution_cost import sleepers
from context import Context, progress
from procs import PY, Variant, capture_config, cpu_seconds, proxy_environ
from report import Section, table
from stats import fmt, ratio, spread

TITLE = "5. deploy() end to end vs running the agents directly"
GOAL = 1.05
DEPLOYED = Variant("deploy()", "capture", tuning=True, token_ids=True)
DEPLOYED_UNTUNED = Variant("deploy(), no tuning", "capture", tuning=False, token_ids=True)
AGENT = """
import os, sys, requests
base, calls = os.environ["OPENAI_BASE_URL"].rstrip("/"), int(os.environ["BENCH_CALLS"])
messages = [{"role": "user", "content": sys.argv[1]}]
with requests.Session() as session:
    for _ in range(calls):
        reply = session.post(base + "/chat/completions", json={"model": "policy", "messages": messages},
                             headers={"Authorization": "Bearer " + os.environ.get("OPENAI_API_KEY", "x")},
                             timeout=60)
        reply.raise_for_status()
        messages.append(reply.json()["choices"][0]["message"])
        messages.append({"role": "user", "content": "go on"})
print(len(messages))
"""


def prompts(n: int) -> list[str]:
    return [f"agent {i}: summarise the quick brown fox" for i in range(n)]


def run_direct(script: Path, n: int, calls: int, base_url: str, timeout: float) -> dict[str, Any]:
    """All agents at once, no proxy; wall time until the last exits."""
    env = {**proxy_environ(None), "OPENAI_BASE_URL": base_url, "BENCH_CALLS": str(calls)}
    cpu = os.times()
    started = time.monotonic()
    procs = [subprocess.Popen([PY, str(script), p], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE) for p in prompts(n)]
    failed = 0
    for proc in procs:
        try:
            proc.communicate(timeout=max(0.1, started + timeout - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        failed += proc.returncode != 0
    seconds = time.monotonic() - started
    return {"seconds": seconds, "failed": failed, "calls": (n - failed) * calls,
            "cpu_agents": _cpu(os.times(), cpu, children=True)}


def run_deploy(manager: Any, n: int, calls: int, timeout: float) -> dict[str, Any]:
    proxy_pid = manager.link.process.proc.pid
    cpu, proxy_cpu = os.times(), cpu_seconds(proxy_pid)
    wall = time.time()
    started = time.monotonic()
    results = manager.deploy(prompts(n), timeout=timeout)
    seconds = time.monotonic() - started
    failed = sum(r.status != "ok" for r in results)
    now = os.times()
    return {"seconds": seconds, "failed": failed, "calls": sum(r.calls for r in results),
            "cpu_agents": _cpu(now, cpu, children=True), "cpu_manager": _cpu(now, cpu, children=False),
            "cpu_proxy": cpu_seconds(proxy_pid) - proxy_cpu, **phases(manager, results, wall, seconds),
            "errors": [f"{r.status}: {r.error or r.stderr_tail[-300:]}" for r in results if r.status != "ok"][:3]}


def _cpu(now: Any, before: Any, *, children: bool) -> float:
    """CPU seconds (user + system) of this process, or of its reaped children (the agents)."""
    if children:
        return now.children_user + now.children_system - before.children_user - before.children_system
    return now.user + now.system - before.user - before.system


def phases(manager: Any, results: list[Any], wall: float, seconds: float) -> dict[str, float]:
    """When the last agent was launched and when the last one's tree was gone (from the store's agent rows:
    start time + duration), and what deploy() took after that (settling flows, building results)."""
    rows = {a.agent_id: a for a in manager.store.agents(run_id=manager.run_id)}
    spans = [(rows[r.agent_id].started_at, r.duration_s) for r in results
             if r.agent_id in rows and rows[r.agent_id].started_at is not None]
    if not spans:
        return {}
    last_exit = max(start + duration for start, duration in spans) - wall
    return {"launched": max(start for start, _ in spans) - wall, "last_exit": last_exit,
            "after_exit": seconds - last_exit}


def start_manager(ctx: Context, variant: Variant, script: Path, base_url: str, parallel: int | None = None) -> Any:
    from rollouttap.manager.agents import CommandAgent
    from rollouttap.manager.manager import AgentManager
    parallel = parallel or ctx.plan.deploy_agents
    store = ctx.workdir / f"deploy-{'tuned' if variant.tuning else 'untuned'}-{parallel}.db"
    config = capture_config(variant, store, ctx.workdir / "mitmproxy-conf-deploy", ())
    agent = CommandAgent([PY, str(script), "{prompt}"], env={"BENCH_CALLS": str(ctx.plan.deploy_calls)})
    return AgentManager(agent, store=store, parallel=parallel, proxy=config, model_url=base_url,
                        confdir=ctx.workdir / "mitmproxy-conf-deploy").start()


def run(ctx: Context) -> Section:
    plan = ctx.plan
    fast, _ = ctx.shared.upstreams()
    base_url = fast.url + "/v1"
    script = ctx.workdir / "deploy_agent.py"
    script.write_text(AGENT)
    timeout = 120.0
    variants = (DEPLOYED,) if plan.smoke else (DEPLOYED, DEPLOYED_UNTUNED)
    managers = {v.name: start_manager(ctx, v, script, base_url) for v in variants}
    runs: dict[str, list[dict[str, Any]]] = {"direct": [], **{name: [] for name in managers}}
    busy = f", {plan.deploy_busy:,} idle processes on the host"
    batch = f", {plan.deploy_batch} agents at once"
    try:
        for rep in range(plan.repeats):
            progress(f"deploy: run {rep + 1}/{plan.repeats}")
            runs["direct"].append(run_direct(script, plan.deploy_agents, plan.deploy_calls, base_url, timeout))
            for name, manager in managers.items():
                runs[name].append(run_deploy(manager, plan.deploy_agents, plan.deploy_calls, timeout))
        if plan.deploy_busy:
            # Process-table scans (the manager's monitor and clean-up) grow with the host's processes.
            with sleepers(plan.deploy_busy):
                for rep in range(plan.repeats):
                    progress(f"deploy: busy host, run {rep + 1}/{plan.repeats}")
                    runs.setdefault("direct" + busy, []).append(
                        run_direct(script, plan.deploy_agents, plan.deploy_calls, base_url, timeout))
                    runs.setdefault(DEPLOYED.name + busy, []).append(
                        run_deploy(managers[DEPLOYED.name], plan.deploy_agents, plan.deploy_calls, timeout))
        if plan.deploy_batch:
            # A batch far over the cores: the proxy's lookups (each agent's first connection is checked against
            # its token) compete with the agents' start-up for CPU, and queue behind each other.
            managers[batch] = start_manager(ctx, DEPLOYED, script, base_url, parallel=plan.deploy_batch)
            for rep in range(plan.repeats):
                progress(f"deploy: {plan.deploy_batch} agents at once, run {rep + 1}/{plan.repeats}")
                runs.setdefault("direct" + batch, []).append(
                    run_direct(script, plan.deploy_batch, plan.deploy_calls, base_url, timeout))
                result = run_deploy(managers[batch], plan.deploy_batch, plan.deploy_calls, timeout)
                for phase in ("launched", "last_exit", "after_exit"):  # a start the starved manager wrote late
                    result.pop(phase, None)
                runs.setdefault(DEPLOYED.name + batch, []).append(result)
    finally:
        for manager in managers.values():
            manager.close()
    rows, bad = [], False
    for name, reps in runs.items():
        seconds = spread([r["seconds"] for r in reps])
        base = next((f"direct{suffix}" for suffix in (busy, batch) if name.endswith(suffix)), "direct")  # same load
        share = ratio(seconds.median, spread([r["seconds"] for r in runs[base]]).median)
        failed = sum(r["failed"] for r in reps)
        bad |= failed > 0
        rows.append((name, seconds.fmt(3), fmt(share), "" if name.startswith("direct") else
                     ("yes" if share <= GOAL else "**no**"), failed))
    errors = [e for reps in runs.values() for r in reps for e in r.get("errors", [])]
    body = (f"{plan.deploy_agents} agents (each a fresh `python` process, {plan.deploy_calls} chat calls with a "
            f"`requests.Session`), all at once; {plan.repeats} runs. `deploy()` includes registering, launching, "
            "supervising, settling flows and building conversations; its proxy (token ids on) is started "
            "beforehand and not timed. Tuning: see section 1. The busy-host rows run the same with "
            f"{plan.deploy_busy:,} idle processes added (each row against direct on the same host): the "
            "manager's process-table scans read every process on the host."
            + (f" The large-batch rows run {plan.deploy_batch} such agents at once (its own manager, "
               f"parallel={plan.deploy_batch}; against the same batch run directly): far more than the cores, so "
               "the proxy's checks of each agent's first connection compete with the agents' start-up for CPU, "
               "and a check whose lookup runs over 10 s (or waits 60 s in all) refuses its request (503): those "
               "agents fail. Their phases are "
               "left out: the manager, as starved, writes an agent's start time late."
               if plan.deploy_batch else "") + "\n\n"
            + table(["how", "wall s", "× direct", f"≤ {GOAL}× direct", "agents failed"], rows)
            + "\n\n" + breakdown(runs)
            + ("\n\nErrors:\n\n" + "\n".join(f"- {e}" for e in errors) if errors else ""))
    return Section("deploy", TITLE, body, {"runs": runs}, "error" if bad else "ok")



def breakdown(runs: dict[str, list[dict[str, Any]]]) -> str:
    """Where the time goes (medians): phases of deploy() and the CPU of agents, proxy and manager."""
    def med(reps: list[dict[str, Any]], key: str) -> str:
        values = [r[key] for r in reps if key in r]
        return fmt(spread(values).median, 3) if values else ""
    rows = [(name, med(reps, "launched"), med(reps, "last_exit"), med(reps, "after_exit"), med(reps, "cpu_agents"),
             med(reps, "cpu_proxy"), med(reps, "cpu_manager")) for name, reps in runs.items()]
    cores = os.cpu_count() or 1
    return ("Where the time goes (medians, seconds). Phases from the store's agent rows: last agent launched, "
            "last agent's tree gone, then deploy()'s own tail (settling flows — waiting for the proxy's commit "
            f"watermark — and building results). CPU: agents (reaped children), proxy, manager; on {cores} "
            "cores the agents saturate, so extra CPU becomes wall time at about 1/cores.\n\n"
            + table(["how", "last launched", "last exit", "after last exit", "CPU agents", "CPU proxy",
                     "CPU manager"], rows))
