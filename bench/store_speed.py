"""Benchmark 6: the store: flows committed per second by the writer thread; reader queries on a big store."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from context import Context, progress
from report import Section, table
from rollouttap.store import Store, StoreWriter, connect, transaction
from rollouttap.store.reader import PRUNE_BATCH
from rollouttap.store.schema import FLOW_COLUMNS
from stats import percentile, spread

TITLE = "6. Store: writer throughput and reader queries"
AGENTS_PER_RUN = 100
FLOWS_PER_AGENT = 100
REQUEST_BODY = json.dumps({"model": "policy", "messages": [{"role": "user", "content": "x" * 600}],
                           "return_token_ids": True, "logprobs": True}).encode()
RESPONSE_BODY = json.dumps({"choices": [{"message": {"content": "y" * 400}, "token_ids": list(range(400))}],
                            "prompt_token_ids": list(range(300))}).encode()
HEADERS = [("host", "127.0.0.1:8000"), ("content-type", "application/json"), ("user-agent", "bench"),
           ("authorization", "Bearer sk-…redacted")]


def flow_columns(flow_id: str, agent_id: str, t: float, state: str = "done") -> dict[str, Any]:
    """A realistic finished chat flow: ~1 KB request, ~3 KB response, headers both ways."""
    return {"flow_id": flow_id, "proxy_id": "bench", "agent_id": agent_id, "pid": 4242, "client_conn_id": flow_id,
            "client_addr": "127.0.0.1:50000", "attribution": "pid", "method": "POST",
            "url": "http://127.0.0.1:8000/v1/chat/completions", "scheme": "http", "host": "127.0.0.1",
            "port": 8000, "path": "/v1/chat/completions", "request_headers": HEADERS,
            "request_body": REQUEST_BODY, "status_code": 200, "response_headers": HEADERS,
            "response_body": RESPONSE_BODY, "streamed": 0, "state": state, "t_request": t,
            "t_response_headers": t + 0.01, "t_first_byte": t + 0.01, "t_end": t + 0.02, "meta": {}}


def writer_run(path: Path, flows: int) -> dict[str, float]:
    """Write ``flows`` flows as the addon does (insert, request update, end update); time enqueue and commit."""
    writer = StoreWriter(path)
    enqueue = 0.0
    started = time.perf_counter()
    for i in range(flows):
        cols = flow_columns(uuid.uuid4().hex, f"agent-{i % 64}", time.time(), state="open")
        t0 = time.perf_counter()
        writer.insert_flow({k: cols[k] for k in ("flow_id", "proxy_id", "agent_id", "pid", "attribution",
                                                  "method", "url", "host", "port", "path", "request_headers",
                                                  "t_request", "state")})
        writer.update_flow(cols["flow_id"], {"request_body": cols["request_body"],
                                             "request_headers": cols["request_headers"]})
        writer.update_flow(cols["flow_id"], {"response_body": cols["response_body"], "status_code": 200,
                                             "response_headers": cols["response_headers"], "state": "done",
                                             "t_end": time.time()})
        enqueue += time.perf_counter() - t0
    if not writer.flush(timeout=600):
        raise RuntimeError("store writer did not catch up within 600 s")
    elapsed = time.perf_counter() - started
    writer.close()
    return {"flows_per_s": flows / elapsed, "enqueue_us": enqueue / flows * 1e6}


def build_store(path: Path, flows: int) -> None:
    """A store of ``flows`` flows over many agents and runs, written directly (setup, not measured)."""
    agents = max(1, flows // FLOWS_PER_AGENT)
    conn = connect(path)
    names = [c for c in FLOW_COLUMNS if c != "id"]
    sql = f"INSERT INTO flows ({', '.join(names)}) VALUES ({', '.join('?' for _ in names)})"
    t0 = time.time() - flows
    with transaction(conn):
        conn.executemany("INSERT INTO agents (agent_id, run_id, status, created_at) VALUES (?, ?, 'ok', ?)",
                         [(f"agent-{a}", f"run-{a // AGENTS_PER_RUN}", t0) for a in range(agents)])
        rows = []
        for i in range(flows):
            cols = flow_columns(f"flow-{i}", f"agent-{i % agents}", t0 + i, "open" if i % 1000 == 0 else "done")
            rows.append([json.dumps(v) if isinstance(v, (list, dict)) else v for v in (cols.get(n) for n in names)])
            if len(rows) >= 5000:
                conn.executemany(sql, rows)
                rows = []
        conn.executemany(sql, rows)
    conn.close()


def queries(store: Store, flows: int) -> dict[str, Callable[[], Any]]:
    """The reader calls the manager makes, on the agent, run and time range in the middle of the store."""
    agents = max(1, flows // FLOWS_PER_AGENT)
    agent, run = f"agent-{agents // 2}", f"run-{agents // 2 // AGENTS_PER_RUN}"
    t_mid = time.time() - flows / 2
    return {
        f"flows(agent_id=…) ({min(flows, FLOWS_PER_AGENT)} flows)": lambda: store.flows(agent_id=agent),
        "open_flow_count(agent)": lambda: store.open_flow_count(agent),
        "flow_counts(agent)": lambda: store.flow_counts(agent),
        "flow(flow_id)": lambda: store.flow(f"flow-{flows // 2}"),
        "flows(state='open')": lambda: store.flows(state="open"),
        "flows(since, until) (1,000 flows)": lambda: store.flows(since=t_mid, until=t_mid + 1000),
        "flow_counts() (whole store)": lambda: store.flow_counts(),
        f"flows(run_id=…) ({min(flows, AGENTS_PER_RUN * FLOWS_PER_AGENT):,} flows)": lambda: store.flows(run_id=run),
    }


def time_queries(path: Path, flows: int, reps: int) -> dict[str, float]:
    """p50 ms of each query."""
    out = {}
    with Store(path) as store:
        for name, query in queries(store, flows).items():
            query()  # warm the page cache and the statement cache
            samples = []
            for _ in range(reps):
                t0 = time.perf_counter()
                query()
                samples.append((time.perf_counter() - t0) * 1000)
            out[name] = percentile(samples, 50)
    return out


def time_prune(path: Path) -> dict[str, float]:
    """Seconds ``Store.prune`` takes to delete every ended agent of the store, with its flows (what a first
    ``keep_for`` prune meets after a long run without one); what it deleted."""
    with Store(path) as store:
        began = time.perf_counter()
        flows, agents = store.prune(time.time())
        return {"seconds": time.perf_counter() - began, "flows": flows, "agents": agents}


def run(ctx: Context) -> Section:
    plan = ctx.plan
    writes, reads = [], []
    big = ctx.workdir / "store-read.db"
    progress(f"store: building a {plan.store_read_flows:,}-flow store")
    build_store(big, plan.store_read_flows)
    size_mb = sum(p.stat().st_size for p in big.parent.glob(big.name + "*")) / 2**20
    for rep in range(plan.repeats):
        progress(f"store: run {rep + 1}/{plan.repeats}")
        writes.append(writer_run(ctx.workdir / f"store-write-{rep}.db", plan.store_write_flows))
        reads.append(time_queries(big, plan.store_read_flows, 5 if plan.name == "smoke" else 20))
    write_rows = [("flows committed per second", spread([w["flows_per_s"] for w in writes]).fmt(0)),
                  ("enqueue cost per flow on the event loop, µs", spread([w["enqueue_us"] for w in writes]).fmt(1))]
    read_rows = [(name, spread([r[name] for r in reads]).fmt(3)) for name in reads[0]]
    progress("store: pruning it")
    pruned = time_prune(big)  # last: it empties the store the queries read
    body = (f"Writer: {plan.store_write_flows:,} flows, each written as the addon does (insert at request headers, "
            "update with the request body, update with the ~3 KB response at the end), then `flush()`; "
            f"{plan.repeats} runs.\n\n" + table(["writer", "value"], write_rows)
            + f"\n\nReader: a store of {plan.store_read_flows:,} flows ({size_mb:.0f} MB, {FLOWS_PER_AGENT} flows per "
            f"agent, {AGENTS_PER_RUN} agents per run), p50 ms per call.\n\n"
            + table(["query", "p50 ms"], read_rows)
            + f"\n\nThen `Store.prune` of everything that ended (once): {pruned['flows']:,} flows of "
            f"{pruned['agents']:,} agents deleted in {pruned['seconds']:.1f} s, {PRUNE_BATCH} flows per transaction.")
    return Section("store", TITLE, body, {"writes": writes, "reads": reads, "store_mb": size_mb, "prune": pruned})
