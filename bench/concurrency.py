"""Concurrency row: N concurrent async openai-SDK clients, calls/s through each proxy vs direct (goal ≥ 0.8×).

Beside the rate, the CPU each party burns per call (client workers, upstream, proxy), read from their own
counters over the burst: when client + upstream + proxy CPU per call times the rate reaches the machine's
cores, no proxy can go faster here, and the table says so.
"""

from __future__ import annotations

import json
import subprocess
from collections import defaultdict
from typing import Any

import psutil

from context import WORKER, Context, progress
from procs import BARE, BARE_FAST_TUNED, CAPTURE_TUNED, DIRECT, IDS_ONLY_TUNED, PY, TOKENS_TUNED, cpu_seconds
from report import Section, table
from stats import fmt, ratio, spread

TITLE = "1b. Concurrency: async openai SDK clients"
VARIANTS = (DIRECT, BARE, BARE_FAST_TUNED, CAPTURE_TUNED, TOKENS_TUNED, IDS_ONLY_TUNED)
GOAL = 0.8
PARTIES = ("clients", "upstream", "proxy")
CORES = psutil.cpu_count() or 1


def burst(ctx: Context, proxy: str | None, proxy_pid: int | None = None, *, url: str | None = None,
          model: str | None = None) -> dict[str, Any]:
    """Run the clients, spread over worker processes, from one common start; calls/s over the union window,
    and the CPU seconds clients, upstream and proxy spent from GO to the end. ``url`` (default: the fast
    upstream) and ``model``: what the clients call, for a proxy that clients use as their base URL."""
    plan, (fast, _) = ctx.plan, ctx.shared.upstreams()
    per_proc = max(1, plan.concurrency_clients // plan.concurrency_procs)
    job = {"kind": "concurrent", "url": url or fast.url, "proxy": proxy, "clients": per_proc,
           "seconds": plan.concurrency_seconds, "max_calls": int(plan.concurrency_seconds * 5000),
           **({"model": model} if model else {})}
    procs = [subprocess.Popen([PY, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(plan.concurrency_procs)]
    try:
        for proc in procs:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.write(json.dumps(job) + "\n")
            proc.stdin.flush()
        for proc in procs:  # every client connected and warm
            line = proc.stdout.readline()  # type: ignore[union-attr]
            if line.strip() != "READY":
                raise RuntimeError(f"concurrency worker did not get ready: {line!r}")
        servers = {"upstream": [fast.pid], "proxy": [proxy_pid] if proxy_pid else []}
        before = {k: sum(cpu_seconds(pid) for pid in pids) for k, pids in servers.items()}
        for proc in procs:
            proc.stdin.write("GO\n")  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]
        answers = [json.loads(proc.communicate(timeout=plan.concurrency_seconds + 60)[0].strip().splitlines()[-1])
                   for proc in procs]
        cpu = {k: sum(cpu_seconds(pid) for pid in pids) - before[k] for k, pids in servers.items()}
        cpu["clients"] = sum(a["cpu_s"] for a in answers)  # each worker's own process time, GO to end
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    calls = sum(a["calls"] for a in answers)
    window = max(a["t_end"] for a in answers) - min(a["t_start"] for a in answers)
    return {"calls": calls, "errors": sum(a["errors"] for a in answers), "seconds": window,
            "per_s": calls / window if window > 0 else float("nan"),
            "cpu_ms_per_call": {k: v / calls * 1000 if calls else float("nan") for k, v in cpu.items()}}


def run(ctx: Context) -> Section:
    proxies = ctx.shared.proxies()
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    variants = ctx.shared.pick(VARIANTS)
    for rep in range(ctx.plan.repeats):
        for variant in variants:
            progress(f"concurrency: repeat {rep + 1}/{ctx.plan.repeats}, {variant.name}")
            pid = proxies.proxies[variant.name].pid if variant.proxy is not None else None
            runs[variant.name].append(burst(ctx, proxies.url(variant), pid))
    direct = spread([r["per_s"] for r in runs[DIRECT.name]]).median
    rows = []
    for variant in variants:
        per_s = spread([r["per_s"] for r in runs[variant.name]])
        share = ratio(per_s.median, direct)
        errors = sum(r["errors"] for r in runs[variant.name])
        cpu = {k: spread([r["cpu_ms_per_call"][k] for r in runs[variant.name]]).median for k in PARTIES}
        busy = sum(cpu.values()) * per_s.median / 1000
        rows.append((variant.name, per_s.fmt(0), fmt(share), "" if variant is DIRECT else
                     ("yes" if share >= GOAL else "**no**"), errors,
                     *(fmt(cpu[k], 2) if k != "proxy" or variant.proxy else "" for k in PARTIES),
                     fmt(sum(cpu.values()), 2), f"{busy:.2f} of {CORES}"))
    plan = ctx.plan
    body = (f"{plan.concurrency_clients} `AsyncOpenAI` clients (each its own connection pool) in "
            f"{plan.concurrency_procs} worker process(es), calling non-streamed chat completions as fast as they "
            f"can for {plan.concurrency_seconds:g} s from a common start; {plan.repeats} runs. CPU columns: "
            f"milliseconds of CPU per call spent by the client workers, the upstream and the proxy over the burst "
            f"(medians); `cores busy` = their sum × calls/s: at the machine's {CORES} cores, every party is "
            f"waiting for a core and the rate can only grow by spending less CPU per call.\n\n"
            + table(["variant", "calls/s", "× direct", f"≥ {GOAL}× direct", "errors", "clients CPU ms/call",
                     "upstream CPU ms/call", "proxy CPU ms/call", "total CPU ms/call", "cores busy"], rows))
    failed = any(r["errors"] for rs in runs.values() for r in rs)
    return Section("concurrency", TITLE, body, {"runs": dict(runs)}, "error" if failed else "ok")

