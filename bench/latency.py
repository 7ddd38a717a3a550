"""Benchmark 1: latency each proxy adds per request, for every common client, keep-alive or not, streamed or not."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from context import Context, progress, run_job
from procs import BARE, CAPTURE_TUNED, DIRECT, LATENCY_VARIANTS, TOKENS_TUNED, Variant, base_of
from report import Section, table
from stats import fmt, ratio, spread, summarize

TITLE = "1. Latency per request"
HEADLINE_CLIENT = ("openai", True, False)
GOAL_OVER_DIRECT_MS = 2.0
GOAL_RATIO = 1.2


def cell_key(client: str, keepalive: bool, stream: bool, variant: Variant) -> str:
    return f"{client}|{'keep-alive' if keepalive else 'new conn'}|{'stream' if stream else 'plain'}|{variant.name}"


def cells_for(client: str, ctx: Context, urls: dict[str, str | None]) -> list[dict[str, Any]]:
    """Every (connection, streamed, variant) cell of one client, variants interleaved."""
    plan = ctx.plan
    cells = []
    for keepalive in (True, False):
        if keepalive and client == "urllib":
            continue  # urllib has no keep-alive
        for stream in (False, True):
            for variant in ctx.shared.pick(LATENCY_VARIANTS):
                cells.append({"variant": variant.name, "proxy": urls[variant.name], "keepalive": keepalive,
                              "stream": stream, "n": plan.requests, "warmup": plan.warmup,
                              "budget_s": plan.cell_budget_s})
    return cells


def measure(ctx: Context) -> dict[str, list[dict[str, Any]]]:
    """Per cell key, one summary per repeat (errors kept as such)."""
    proxies = ctx.shared.proxies()
    fast, _ = ctx.shared.upstreams()
    urls = {v.name: proxies.url(v) for v in ctx.shared.pick(LATENCY_VARIANTS)}
    by_name = {v.name: v for v in LATENCY_VARIANTS}
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for rep in range(ctx.plan.repeats):
        for client in ctx.plan.clients:
            progress(f"latency: repeat {rep + 1}/{ctx.plan.repeats}, {client}")
            cells = cells_for(client, ctx, urls)
            timeout = len(cells) * (ctx.plan.cell_budget_s + 15) + 60
            answer = run_job({"kind": "cells", "client": client, "url": fast.url, "cells": cells}, timeout)
            for cell in answer["cells"]:
                key = cell_key(client, cell["keepalive"], cell["stream"], by_name[cell["variant"]])
                runs[key].append(_summary(cell))
    return dict(runs)


def _summary(cell: dict[str, Any]) -> dict[str, Any]:
    if "error" in cell or "skipped" in cell:
        return {"error": cell.get("error") or cell.get("skipped")}
    s = summarize(cell["lat_ms"], cell["wall_s"])
    return {"n": s.n, "p50": s.p50, "p99": s.p99, "per_s": s.per_s}


def figure(runs: dict[str, list[dict[str, Any]]], key: str, name: str = "p50"):
    """The spread of one figure of a cell over its repeats."""
    return spread([r[name] for r in runs.get(key, []) if name in r])


def errors_of(runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    return sorted({f"{k}: {r['error']}" for k, rs in runs.items() for r in rs if "error" in r})


def headline(runs: dict[str, list[dict[str, Any]]], variants: tuple[Variant, ...]) -> str:
    client, keepalive, stream = HEADLINE_CLIENT
    key = lambda v: cell_key(client, keepalive, stream, v)  # noqa: E731
    direct = figure(runs, key(DIRECT)).median
    stock = figure(runs, key(BARE)).median if BARE in variants else float("nan")
    rows = []
    for v in variants:
        p50 = figure(runs, key(v))
        base = base_of(v, variants)
        vs_base = ratio(p50.median, figure(runs, key(base)).median) if base else float("nan")
        rows.append((v.name, p50.fmt(), figure(runs, key(v), "p99").fmt(), figure(runs, key(v), "per_s").fmt(0),
                     fmt(p50.median - direct, 2), f"{fmt(vs_base)} × {base.name}" if base else "",
                     fmt(ratio(p50.median, stock)) if v.proxy else ""))
    return table(["variant", "p50 ms", "p99 ms", "req/s", "p50 over direct",
                  "p50 ratio to the same launcher's bare (goal ≤ 1.2)", "p50 ratio to bare mitmdump"], rows)


def cure_table(runs: dict[str, list[dict[str, Any]]], variants: tuple[Variant, ...]) -> str:
    """requests.Session keep-alive POSTs, the case Nagle + delayed ACK hit, with and without the tuning."""
    rows = []
    for stream in (False, True):
        direct = figure(runs, cell_key("requests", True, stream, DIRECT)).median
        for v in variants:
            p50 = figure(runs, cell_key("requests", True, stream, v))
            rows.append(("SSE" if stream else "JSON", v.name, p50.fmt(), fmt(p50.median - direct)))
    return table(["response", "variant", "p50 ms", "p50 over direct"], rows)


def client_table(runs: dict[str, list[dict[str, Any]]], clients: tuple[str, ...], name: str,
                 variants: tuple[Variant, ...]) -> str:
    shipped = [v for v in (CAPTURE_TUNED, TOKENS_TUNED) if v in variants]
    rows = []
    for client in clients:
        for keepalive in (True, False):
            for stream in (False, True):
                keys = [cell_key(client, keepalive, stream, v) for v in variants]
                if keys[0] not in runs:
                    continue
                cells = [figure(runs, k, name) for k in keys]
                direct = cells[0].median
                over = [figure(runs, cell_key(client, keepalive, stream, v), name).median - direct for v in shipped]
                verdict = "yes" if over and max(over) <= GOAL_OVER_DIRECT_MS else "**no**"
                rows.append((client, "keep-alive" if keepalive else "new conn", "SSE" if stream else "JSON",
                             *[c.fmt() for c in cells], *[fmt(o) for o in over],
                             verdict if name == "p50" else ""))
    headers = ["client", "connection", "response", *[v.name for v in variants],
               *[f"Δ {v.name}" for v in shipped], "≤ 2 ms over direct"]
    return table(headers, rows)


def run(ctx: Context) -> Section:
    runs = measure(ctx)
    errors = errors_of(runs)
    variants = ctx.shared.pick(LATENCY_VARIANTS)
    body = [
        f"{ctx.plan.requests} timed requests per cell after {ctx.plan.warmup} untimed, {ctx.plan.repeats} runs; "
        "POST /v1/chat/completions with a ~200-character user message, upstream answers at once. "
        "`bare mitmdump` = mitmproxy's own mitmdump with no addon; `fastdump` = the same mitmdump started "
        "the way rollouttap starts it (`python -O -m rollouttap.addon.fastdump`: hooks go only to the addons "
        "that have them, no per-message type checks); `capture` = rollouttap's proxy (fastdump + the addon) "
        "with `rollouttap_token_ids=false`; `stock mitmdump` = the addon under mitmproxy's own mitmdump "
        "(`mitmdump -s addon/entry.py`); `token ids` = capture + token-id injection and stripping; "
        "`tuning` = addon/tcp_tuning.py (TCP_QUICKACK re-armed after every read; the chunks of a streamed answer "
        "that one read brought pass mitmproxy's layers as one, in one write to the client); `chunks not coalesced` "
        "= tuning with `rollouttap_coalesce_chunks=false` (each chunk of a streamed answer passes mitmproxy's layers "
        "and goes to the client apart, as by itself). "
        "curl rows are timed by curl itself (`%{time_total}`), the rest in the client process.",
        "",
        "### Headline: openai SDK, keep-alive, non-streamed", "", headline(runs, variants), "",
        "### The Nagle / delayed-ACK cure: `requests.Session` keep-alive POSTs", "",
        "urllib3 turns Nagle on for proxy connections and writes headers and body apart; without tuning the "
        "proxy's delayed ACK holds each body ~40 ms.", "", cure_table(runs, variants), "",
        "### Every client: p50 ms", "",
        "Δ columns: p50 over direct of rollouttap as shipped (with tuning); the goal is ≤ 2 ms for every "
        "client.", "",
        client_table(runs, ctx.plan.clients, "p50", variants), "",
        "### Every client: p99 ms", "", client_table(runs, ctx.plan.clients, "p99", variants),
    ]
    if errors:
        body += ["", "Errors:", "", *[f"- {e}" for e in errors]]
    return Section("latency", TITLE, "\n".join(body), {"runs": runs}, "error" if errors else "ok")
