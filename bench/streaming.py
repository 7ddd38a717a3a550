"""Benchmark 2: a streamed (SSE) chat answer: time to first byte and total time, direct vs through each proxy."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from clients import STREAM_MESSAGE
from context import Context, progress, run_job
from procs import BARE, BARE_STREAM, CAPTURE_TUNED, DIRECT, TOKENS_TUNED
from report import Section, table
from stats import fmt, percentile, spread

TITLE = "2. Streaming: first byte and total time"
VARIANTS = (DIRECT, BARE, BARE_STREAM, CAPTURE_TUNED, TOKENS_TUNED)
CLIENTS = ("openai", "requests", "curl")
GOAL_MS = 5.0


def run(ctx: Context) -> Section:
    plan = ctx.plan
    proxies = ctx.shared.proxies()
    _, paced = ctx.shared.upstreams()
    runs: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    errors = []
    clients = ("requests",) if plan.smoke else CLIENTS
    variants = ctx.shared.pick(VARIANTS)
    for rep in range(plan.repeats):
        for client in clients:
            progress(f"streaming: repeat {rep + 1}/{plan.repeats}, {client}")
            cells = [{"variant": v.name, "proxy": proxies.url(v), "keepalive": True, "stream": True,
                      "message": STREAM_MESSAGE, "n": plan.stream_requests, "warmup": 1,
                      "budget_s": plan.cell_budget_s} for v in variants]
            answer = run_job({"kind": "cells", "client": client, "url": paced.url, "cells": cells},
                             len(cells) * (plan.cell_budget_s + 15) + 60)
            for cell in answer["cells"]:
                if "error" in cell:
                    errors.append(f"{client} {cell['variant']}: {cell['error']}")
                    continue
                runs[(client, cell["variant"])].append(
                    {"ttfb": percentile(cell["ttfb_ms"], 50), "total": percentile(cell["lat_ms"], 50)})
    rows = []
    for client in clients:
        direct = spread([r["ttfb"] for r in runs[(client, DIRECT.name)]]).median
        for v in variants:
            ttfb = spread([r["ttfb"] for r in runs[(client, v.name)]])
            total = spread([r["total"] for r in runs[(client, v.name)]])
            over = ttfb.median - direct
            verdict = "" if v is DIRECT else ("yes" if over <= GOAL_MS else "**no**")
            rows.append((client, v.name, ttfb.fmt(), total.fmt(), fmt(over), verdict))
    body = [f"A streamed chat answer of a few SSE chunks, {plan.chunk_delay * 1000:g} ms apart, over a keep-alive "
            f"connection; {plan.stream_requests} requests per cell, {plan.repeats} runs; p50 per run. First byte = "
            "first body bytes (openai: first parsed chunk; curl: `%{time_starttransfer}`, i.e. response "
            "headers). Bare mitmdump buffers SSE unless `stream_large_bodies` is set; rollouttap streams itself.",
            "", table(["client", "variant", "first byte p50 ms", "total p50 ms", "first byte over direct",
                       f"≤ direct + {GOAL_MS:g} ms"], rows)]
    if errors:
        body += ["", "Errors:", "", *[f"- {e}" for e in errors]]
    data = {f"{c}|{v}": rs for (c, v), rs in runs.items()}
    return Section("streaming", TITLE, "\n".join(body), {"runs": data}, "error" if errors else "ok")

