"""Benchmark 1d: long conversations. A coding agent resends its whole conversation at every call, so a call's
request (and, with token ids, its answer: the prompt's ids come back) grows with the context.

Per request: one keep-alive ``requests.Session`` client posts a prompt of about N tokens through each proxy; the
proxy's CPU per request (its own counters), the client's p50 and the bytes one call adds to the store. Per
agent: one agent process makes a run of calls whose conversation grows to about the largest N, through
``AgentManager`` with token ids on, then what the manager spends turning its flows into its conversation and
training row (``results.collect_flows``, what ``deploy()`` does for each agent once it ended). The scripted
upstream's tokenizer gives ids below 266, which Python shares (up to 256): the memory a conversation holds is
measured apart, on answers in vLLM's shape whose ids are drawn from a 151,000-token vocabulary.
"""

from __future__ import annotations

import gc
import json
import random
import sqlite3
import time
import tracemalloc
from collections import defaultdict
from contextlib import ExitStack, closing
from pathlib import Path
from typing import Any

from context import Context, progress, run_job
from procs import BARE_FAST_TUNED, CAPTURE_TUNED, PY, TOKENS_TUNED, CaptureProxy, ProxyStack, Upstream, capture_config
from procs import cpu_seconds
from report import Section, table
from stats import fmt, percentile, spread

TITLE = "1d. Long conversations: cost per request and per agent as the context grows"
VARIANTS = (BARE_FAST_TUNED, CAPTURE_TUNED, TOKENS_TUNED)
EOS_ID = 2  # the scripted upstream's tokenizer (testing/fake_tokenizer.py): <|im_end|>
LINE = "    total = compute(values[{i}]) + offset  # a line of the file the agent read\n"
AGENT = """
import json, os, sys, urllib.request
turns, tool_chars = int(sys.argv[1]), int(sys.argv[2])
url = os.environ["OPENAI_BASE_URL"].rstrip("/") + "/chat/completions"
messages = [{"role": "system", "content": "You fix bugs."}, {"role": "user", "content": sys.argv[3]}]
for turn in range(turns):
    body = json.dumps({"model": "policy", "messages": messages, "max_tokens": 32}).encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as reply:
        messages.append(json.loads(reply.read())["choices"][0]["message"])
    tool = "".join(f"    x = compute(y) + {turn * 1000 + i}\\n" for i in range(tool_chars // 28))
    messages.append({"role": "user", "content": f"tool output {turn}:\\n" + tool})
"""


def context_text(tokens: int) -> str:
    """About ``tokens`` characters of code: the scripted upstream's tokenizer makes a token of every byte."""
    lines, size, i = [], 0, 0
    while size < tokens:
        line = LINE.format(i=i)
        lines.append(line)
        size += len(line)
        i += 1
    return "".join(lines)[:tokens]


def stored_bytes(store: Path, timeout: float = 10.0) -> float:
    """Bytes of the newest done flow's request and response bodies (what one call adds to the store)."""
    deadline = time.monotonic() + timeout
    with closing(sqlite3.connect(f"file:{store}?mode=ro", uri=True)) as conn:
        while True:
            row = conn.execute("SELECT length(request_body) + length(response_body) FROM flows WHERE state = 'done' "
                               "ORDER BY id DESC LIMIT 1").fetchone()
            if row is not None or time.monotonic() > deadline:
                return float(row[0]) if row is not None and row[0] is not None else float("nan")
            time.sleep(0.05)


def per_request(ctx: Context, upstream: Upstream, proxy: Any, message: str, n: int) -> dict[str, float]:
    """Client p50, proxy CPU ms per request and stored KB per call over ``n`` keep-alive posts."""
    cell = {"proxy": proxy.url, "keepalive": True, "stream": False, "message": message, "n": 2, "warmup": 0,
            "budget_s": ctx.plan.cell_budget_s * 2}
    run_job({"kind": "cells", "client": "requests", "url": upstream.url, "cells": [cell]}, 300)  # warm: memo
    before = cpu_seconds(proxy.pid)
    answer = run_job({"kind": "cells", "client": "requests", "url": upstream.url, "cells": [{**cell, "n": n}]}, 600)
    used = cpu_seconds(proxy.pid) - before
    lat = answer["cells"][0].get("lat_ms") or []
    if not lat:
        raise RuntimeError(f"no request went through: {answer['cells'][0]}")
    stored = stored_bytes(proxy.store) / 1024 if isinstance(proxy, CaptureProxy) else float("nan")
    return {"p50": percentile(lat, 50), "cpu_ms": used / len(lat) * 1000, "stored_kb": stored}


def per_agent(ctx: Context, upstream: Upstream, turns: int, tool_chars: int) -> dict[str, Any]:
    """One agent of ``turns`` calls through AgentManager (token ids on): its deploy() and, again, its results."""
    from rollouttap.manager.agents import CommandAgent
    from rollouttap.manager.manager import AgentManager
    from rollouttap.manager.results import collect_flows
    script = ctx.workdir / "long_agent.py"
    script.write_text(AGENT)
    store = ctx.workdir / "long-agent.db"
    config = capture_config(TOKENS_TUNED, store, ctx.workdir / "mitmproxy-conf-long", ())
    agent = CommandAgent([PY, str(script), str(turns), str(tool_chars), "{prompt}"])
    with AgentManager(agent, store=store, proxy=config, model_url=upstream.url + "/v1", eos_token_id=EOS_ID,
                      confdir=ctx.workdir / "mitmproxy-conf-long") as manager:
        started = time.monotonic()
        (result,) = manager.deploy(["fix the failing test"], timeout=600)
        wall = time.monotonic() - started
        if result.status != "ok" or result.row is None:
            raise RuntimeError(f"the long agent failed: {result.status}: {result.error} {result.stderr_tail[-500:]}")
        builds = []
        for _ in range(ctx.plan.repeats):  # this thread's CPU: the manager's own threads run meanwhile
            began = time.thread_time()
            collect_flows(manager.store, result.agent_id, eos_token_id=EOS_ID)
            builds.append(time.thread_time() - began)
        flows = manager.store.flows(agent_id=result.agent_id)
        stored = sum(len(f.request_body or b"") + len(f.response_body or b"") for f in flows)
    return {"calls": result.calls, "prompt_tokens": len(result.row.prompt_ids) + len(result.row.completion_ids),
            "deploy_s": wall, "build_s": builds, "stored_mb": stored / 1e6}


def _answer_flow(n: int, prompt_ids: list[int]) -> Any:
    """A done, non-streamed chat flow whose answer carries ``prompt_ids`` as vLLM's does (compact JSON)."""
    from rollouttap.store.records import FlowRecord
    answer = {"id": f"chatcmpl-{n}", "object": "chat.completion", "model": "policy", "prompt_token_ids": prompt_ids,
              "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop",
                           "token_ids": [prompt_ids[-1], EOS_ID]}],
              "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": 2}}
    request = {"model": "policy", "messages": [{"role": "user", "content": f"call {n}"}]}
    return FlowRecord(
        id=n, flow_id=f"flow-{n}", proxy_id="p", agent_id="a", pid=1, client_conn_id="c", client_addr="127.0.0.1:1",
        attribution="token", method="POST", url="http://model/v1/chat/completions", scheme="http", host="model",
        port=80, path="/v1/chat/completions", request_headers=[("content-type", "application/json")],
        request_body=json.dumps(request).encode(), status_code=200,
        response_headers=[("content-type", "application/json")], response_body=json.dumps(answer, separators=(",", ":")).encode(),
        streamed=False, state="done", error=None, t_request=float(n), t_response_headers=None, t_first_byte=None,
        t_end=n + 0.5)


def conversation_memory(calls: int, tokens: int, repeats: int) -> dict[str, Any]:
    """``build_conversation`` over ``calls`` answers whose prompts grow to ``tokens`` ids of a 151,000-token
    vocabulary: CPU seconds (each run) and the memory the conversation holds."""
    from rollouttap.manager.conversation import build_conversation
    vocab = random.Random(0)
    ids = [vocab.randrange(300, 151_000) for _ in range(tokens)]
    flows = [_answer_flow(k, ids[:tokens * (k + 1) // calls]) for k in range(calls)]
    seconds = []
    for _ in range(repeats):
        began = time.thread_time()
        build_conversation(flows)
        seconds.append(time.thread_time() - began)
    gc.collect()
    tracemalloc.start()
    try:
        conversation = build_conversation(flows)
        gc.collect()
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(conversation.calls) == calls
    return {"build_s": seconds, "held_mb": held / 1e6}


def run(ctx: Context) -> Section:
    plan = ctx.plan
    variants = (TOKENS_TUNED,) if plan.smoke else VARIANTS
    sizes = (1_000,) if plan.smoke else (1_000, 10_000, 100_000)
    # Enough requests per cell for the proxy's CPU counters (10 ms ticks) to resolve a request's cost to ~5 %.
    n = 3 if plan.smoke else 200
    runs: dict[str, list[dict[str, float]]] = defaultdict(list)
    with ExitStack() as stack:
        upstream = stack.enter_context(Upstream())
        progress("long context: starting proxies")
        proxies = stack.enter_context(ProxyStack(variants, ctx.workdir / "long-context", (upstream.hostport,)))
        messages = {tokens: context_text(tokens) for tokens in sizes}
        for rep in range(plan.repeats):
            progress(f"long context: run {rep + 1}/{plan.repeats}")
            for tokens in sizes:
                for v in variants:
                    runs[f"{tokens}|{v.name}"].append(
                        per_request(ctx, upstream, proxies.proxies[v.name], messages[tokens], n))
        progress("long context: one long agent")
        turns, tool_chars = (3, 500) if plan.smoke else (50, sizes[-1] // 50)
        agent = per_agent(ctx, upstream, turns, tool_chars)
    memory = conversation_memory(turns, sizes[-1], plan.repeats)
    rows = []
    for tokens in sizes:
        for v in variants:
            cells = runs[f"{tokens}|{v.name}"]
            figure = {key: spread([c[key] for c in cells]) for key in ("p50", "cpu_ms", "stored_kb")}
            rows.append((f"{tokens:,}", v.name, figure["p50"].fmt(2), figure["cpu_ms"].fmt(2),
                         figure["stored_kb"].fmt(0) if v.proxy == "capture" else ""))
    build = spread(agent["build_s"])
    body = (f"Per request: a prompt of about N tokens (N characters of code in one user message: the scripted "
            f"upstream's tokenizer makes a token of every byte, so its token ids come back as a list of N numbers of "
            f"2–3 digits; for the same N a real tokenizer's request is ~4× larger, at ~4 characters per token, and "
            f"its id list ~1.7× longer, in ids of up to 6 digits), {n} keep-alive `requests` posts per cell "
            f"after 2 untimed, "
            f"{plan.repeats} runs; proxy CPU from its own counters. `stored KB per call`: the request and response "
            f"bodies one call adds to the store (with token ids the answer carries the prompt's ids).\n\n"
            + table(["prompt tokens", "variant", "p50 ms", "proxy CPU ms / request", "stored KB per call"], rows)
            + f"\n\nPer agent: one agent process (urllib) makes {agent['calls']} calls through `AgentManager` "
            f"(token ids on), each adding a tool output to its conversation, which ends at "
            f"{agent['prompt_tokens']:,} tokens. Its calls resend the conversation so far, so the store holds the "
            f"sum of every call's context, not the last one.\n\n"
            + table(["calls", "final context, tokens", "deploy() wall s", "stored MB",
                     "building its conversation and row, CPU s"],
                    [(agent["calls"], f"{agent['prompt_tokens']:,}", fmt(agent["deploy_s"]),
                      fmt(agent["stored_mb"], 1), build.fmt(3))])
            + f"\n\nWhat a conversation holds in memory: {turns} answers in vLLM's shape (non-streamed) whose prompt "
            f"ids grow to {sizes[-1]:,}, drawn from a 151,000-token vocabulary (Python shares only the ints up to "
            f"256: every other id decoded is an object of its own), read by `build_conversation` (each call keeps "
            f"its prompt ids; a call that resends the one before holds that one's int objects).\n\n"
            + table(["calls", "final prompt ids", "building it, CPU s", "held MB"],
                    [(turns, f"{sizes[-1]:,}", spread(memory["build_s"]).fmt(3), fmt(memory["held_mb"], 1))]))
    return Section("long_context", TITLE, body, {"runs": dict(runs), "agent": agent, "memory": memory})
