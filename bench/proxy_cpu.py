"""Proxy CPU time per request: what each proxy variant itself spends, read from its own CPU counters.

Latency on a busy machine is noisy; the CPU a proxy process burns per request is much less so, and it is
what limits a proxy's throughput (one event loop: about 1 / CPU-per-request requests per second).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from context import Context, progress, run_job
from procs import (
    BARE, BARE_FAST_TUNED, BARE_TUNED, CAPTURE_STOCK_TUNED, CAPTURE_TUNED, FLOOR, IDS_ONLY_TUNED, TOKENS_TUNED,
    base_of, cpu_seconds,
)
from report import Section, table
from stats import fmt, ratio, spread

TITLE = "1c. Proxy CPU per request"
VARIANTS = (BARE, BARE_TUNED, BARE_FAST_TUNED, FLOOR, CAPTURE_STOCK_TUNED, CAPTURE_TUNED, TOKENS_TUNED, IDS_ONLY_TUNED)
GOAL_RATIO = 1.2


def curl_cpu(ctx: Context, upstream_url: str, cell: dict[str, Any], pids: tuple[int, ...]) -> tuple[int, list[float]]:
    """Run one curl cell (curl: no Python client in the way); (requests done, CPU seconds each of
    ``pids`` used meanwhile, from its own counters)."""
    before = [cpu_seconds(pid) for pid in pids]
    answer = run_job({"kind": "cells", "client": "curl", "url": upstream_url, "cells": [cell]},
                     ctx.plan.cell_budget_s * 2 + 60)
    used = [cpu_seconds(pid) - b for pid, b in zip(pids, before)]
    done = len(answer["cells"][0].get("lat_ms", []))
    if done == 0:
        raise RuntimeError(f"no request went through: {answer['cells'][0]}")
    return done, used


def one(ctx: Context, url: str, pid: int, keepalive: bool) -> float:
    """Proxy CPU milliseconds per request over one curl run."""
    fast, _ = ctx.shared.upstreams()
    n = ctx.plan.requests * (2 if keepalive else 1)
    cell = {"proxy": url, "keepalive": keepalive, "stream": False, "n": n, "warmup": 0,
            "budget_s": ctx.plan.cell_budget_s * 2}
    done, (used,) = curl_cpu(ctx, fast.url, cell, (pid,))
    return used / done * 1000


def run(ctx: Context) -> Section:
    proxies = ctx.shared.proxies()
    variants = ctx.shared.pick(VARIANTS)
    runs: dict[str, list[float]] = defaultdict(list)
    for rep in range(ctx.plan.repeats):
        progress(f"proxy cpu: run {rep + 1}/{ctx.plan.repeats}")
        for keepalive in (True, False):
            for v in variants:
                proxy = proxies.proxies[v.name]
                runs[f"{v.name}|{keepalive}"].append(one(ctx, proxy.url, proxy.pid, keepalive))
    rows = []
    for keepalive in (True, False):
        def median(v) -> float:
            return spread(runs[f"{v.name}|{keepalive}"]).median if v in variants else float("nan")
        for v in variants:
            cpu = spread(runs[f"{v.name}|{keepalive}"])
            base = base_of(v, variants)
            share = ratio(cpu.median, median(base)) if base else float("nan")
            rows.append(("keep-alive" if keepalive else "new conn", v.name, cpu.fmt(3),
                         f"{fmt(share)} × {base.name}" if base else "",
                         fmt(ratio(cpu.median, median(BARE))) if v is not BARE else "",
                         fmt(ratio(1000, cpu.median), 0)))
    body = (f"CPU (user + system) of the proxy process per non-streamed request, from its own counters, while one "
            f"curl sends {ctx.plan.requests * 2} keep-alive requests (or {ctx.plan.requests} on new connections); "
            f"{ctx.plan.repeats} runs. The last column is the ceiling this puts on one proxy's throughput. "
            f"`{FLOOR.name}` is mitmproxy's client side alone, the floor under every row: "
            "`bench/answer_cache.py` answers each request after the first itself, so no server connection "
            "is opened or used (what bare fastdump spends beyond it is its upstream side).\n\n"
            + table(["connection", "variant", "CPU ms / request",
                     f"ratio to the same launcher's bare (goal ≤ {GOAL_RATIO})", "ratio to bare mitmdump",
                     "≈ max req/s"], rows))
    return Section("cpu", TITLE, body, {"runs": dict(runs)})
