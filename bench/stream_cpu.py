"""Benchmark 2b: proxy CPU per streamed chunk, one token per chunk as vLLM streams.

A streamed answer of ~200 one-token chunks through each proxy, the proxy's CPU divided by the chunks it
carried (each answer's own costs, such as its rows and token-id injection, are spread over them). Two
paces: back to back (the upstream writes every chunk at once, so the proxy reads several per wake-up) and
paced (each chunk on its own read and wake-up, as while a model generates). The upstream's own CPU per
chunk sits beside it; how much it grows from back to back to paced is what a wake-up costs here.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import ExitStack

import requests

from clients import MESSAGE, chat_body
from context import Context, progress
from procs import (
    BARE_FAST_STREAM, BARE_FAST_STREAM_UNCOALESCED, CAPTURE_TUNED, CAPTURE_UNCOALESCED, TOKENS_TUNED,
    TOKENS_UNCOALESCED, ProxyStack, Upstream,
)
from proxy_cpu import curl_cpu
from report import Section, table
from stats import fmt, ratio, spread

TITLE = "2b. Streaming: proxy CPU per chunk"
VARIANTS = (BARE_FAST_STREAM, BARE_FAST_STREAM_UNCOALESCED, CAPTURE_TUNED, CAPTURE_UNCOALESCED, TOKENS_TUNED,
            TOKENS_UNCOALESCED)
PACED_S = 0.002
# (name, delay between chunks, answers per run): back to back an answer takes milliseconds, so more of them let
# the CPU counters (10 ms ticks) resolve a few µs per chunk; paced, each takes ~0.4 s.
PACES = (("back to back", 0.0, 60), (f"paced {PACED_S * 1000:g} ms", PACED_S, 10))


def chunks_per_answer(upstream: Upstream) -> int:
    """SSE events in one answer, as the agent asks for it (``data:`` lines, ``[DONE]`` included)."""
    reply = requests.post(upstream.url + "/v1/chat/completions", json=chat_body(True, MESSAGE), timeout=30)
    reply.raise_for_status()
    return reply.content.count(b"data:")


def one(ctx: Context, upstream: Upstream, url: str, pid: int, answers: int, per_answer: int) -> tuple[float, float]:
    """(proxy, upstream) CPU µs per chunk while one curl streams ``answers`` answers on one connection."""
    cell = {"proxy": url, "keepalive": True, "stream": True, "message": MESSAGE, "n": answers,
            "warmup": 0, "budget_s": ctx.plan.cell_budget_s * 2}
    done, (proxy_used, upstream_used) = curl_cpu(ctx, upstream.url, cell, (pid, upstream.pid))
    chunks = done * per_answer
    return proxy_used / chunks * 1e6, upstream_used / chunks * 1e6


def run(ctx: Context) -> Section:
    plan = ctx.plan
    variants = (TOKENS_TUNED,) if plan.smoke else VARIANTS
    answers = {name: 2 if plan.smoke else count for name, _, count in PACES}
    runs: dict[str, list[tuple[float, float]]] = defaultdict(list)
    with ExitStack() as stack:
        upstreams = {name: stack.enter_context(Upstream(delay, tokens_per_chunk=1)) for name, delay, _ in PACES}
        progress("stream cpu: starting proxies")
        proxies = stack.enter_context(ProxyStack(variants, ctx.workdir / "stream-cpu",
                                                 tuple(u.hostport for u in upstreams.values())))
        per_answer = {name: chunks_per_answer(u) for name, u in upstreams.items()}
        for rep in range(plan.repeats):
            progress(f"stream cpu: run {rep + 1}/{plan.repeats}")
            for name, upstream in upstreams.items():
                for v in variants:
                    proxy = proxies.proxies[v.name]
                    runs[f"{name}|{v.name}"].append(one(ctx, upstream, proxy.url, proxy.pid, answers[name],
                                                        per_answer[name]))
    rows = []
    for name, _, _ in PACES:
        for v in variants:
            reps = runs[f"{name}|{v.name}"]
            proxy_us, upstream_us = spread([r[0] for r in reps]), spread([r[1] for r in reps])
            rows.append((name, v.name, proxy_us.fmt(1), upstream_us.fmt(1), fmt(ratio(1e6, proxy_us.median), 0)))
    chunks = ", ".join(f"{n} {name}" for name, n in per_answer.items())
    counts = " and ".join(f"{answers[name]} {name}" for name in per_answer)
    body = (f"One token per SSE chunk ({chunks} chunks per answer); curl streams {counts} answers on one "
            f"keep-alive connection per run, {plan.repeats} runs; CPU (user + system) of the proxy and of the "
            "upstream from their own counters, divided by the chunks (each answer's own costs, such as its rows and "
            "token-id injection, are spread over its chunks). Back to back: the upstream writes every chunk "
            "at once and the proxy reads several per wake-up. Paced: one chunk every "
            f"{PACED_S * 1000:g} ms, each its own read and wake-up, as while a model generates; the upstream "
            "column's growth from back to back to paced is what a wake-up costs a process on this machine. "
            "`chunks not coalesced`: with `rollouttap_coalesce_chunks=false`, each chunk of the answer passes "
            "mitmproxy's layers and goes to the client apart, as by itself (with it on, the chunks one read brought "
            "pass as one, in one write). "
            "The last column is the ceiling one proxy core puts on streamed chunks per second.\n\n"
            + table(["pace", "variant", "proxy CPU µs / chunk", "upstream CPU µs / chunk",
                     "≈ max chunks/s per proxy core"], rows))
    return Section("stream_cpu", TITLE, body, {"runs": dict(runs), "chunks_per_answer": per_answer})
