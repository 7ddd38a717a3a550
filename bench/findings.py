"""Where the time goes: small live measurements behind each finding of the profile, and what is mitmproxy's floor.

Each figure here is measured on this machine in this run (a second or two in all); the text says which
file and function it concerns and what would change it.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

import requests

from context import Context, progress
from report import Section, table
from rollouttap.addon import tokenids
from rollouttap.addon.procfs import ancestry
from rollouttap.addon.sockdiag import inode_netlink
from rollouttap.store import StoreWriter
from stats import fmt

TITLE = "7. Findings: where the time goes"
MESSAGE = "Summarise this for me: " + "the quick brown fox jumps over the lazy dog " * 4


def per_call_ms(fn: Callable[[], Any], n: int) -> float:
    """Mean milliseconds of ``n`` calls after one untimed call."""
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1000


def quickack_cost_us(n: int) -> float:
    """What re-arming TCP_QUICKACK after a read costs (one setsockopt)."""
    with socket.create_server(("127.0.0.1", 0)) as server, socket.create_connection(server.getsockname()):
        conn, _ = server.accept()
        with conn:
            quickack = getattr(socket, "TCP_QUICKACK", None)
            if quickack is None:
                return float("nan")
            return per_call_ms(lambda: conn.setsockopt(socket.IPPROTO_TCP, quickack, 1), n) * 1000


def token_id_costs(upstream_url: str, n: int) -> dict[str, float]:
    """Response size with and without injected token ids/logprobs, and the cost of stripping them."""
    body = json.dumps({"model": "policy", "messages": [{"role": "user", "content": MESSAGE}]}).encode()
    injection = tokenids.plan_injection("/v1/chat/completions", body, "application/json")
    assert injection is not None
    url = upstream_url + "/v1/chat/completions"
    headers = {"Content-Type": "application/json"}
    with requests.Session() as session:
        session.trust_env = False
        plain = session.post(url, data=body, headers=headers, timeout=30).content
        full = session.post(url, data=injection.new_body, headers=headers, timeout=30).content
    return {"plain_bytes": len(plain), "injected_bytes": len(full),
            "strip_ms": per_call_ms(lambda: tokenids.strip_response_json(full, injection), n),
            "json_loads_ms": per_call_ms(lambda: json.loads(full), n),
            "plan_ms": per_call_ms(lambda: tokenids.plan_injection("/v1/chat/completions", body,
                                                                   "application/json"), n)}


def writer_transactions(path: Any, flows: int) -> dict[str, float]:
    """Transactions per flow when flows arrive at agent pace (the addon's four writer events per flow)."""
    writer = StoreWriter(path)
    for _ in range(flows):
        flow_id = uuid.uuid4().hex
        writer.insert_flow({"flow_id": flow_id, "attribution": "pid", "state": "open", "t_request": time.time()})
        for cols in ({"request_body": b"x" * 600}, {"status_code": 200}, {"state": "done", "t_end": time.time()}):
            time.sleep(0.0003)  # hooks of one flow are a fraction of a millisecond apart
            writer.update_flow(flow_id, cols)
        time.sleep(0.001)
    writer.flush()
    batches = writer.stats.batches
    writer.close()
    return {"events_per_flow": 4, "transactions_per_flow": batches / flows}


def attribution_parts(n: int) -> dict[str, float]:
    """The parts of one attribution, on a live loopback connection of this process."""
    with socket.create_server(("127.0.0.1", 0)) as server, socket.create_connection(server.getsockname()):
        conn, _ = server.accept()
        with conn:
            peer, sock = conn.getpeername()[:2], conn.getsockname()[:2]
            return {"inode_ms": per_call_ms(lambda: inode_netlink(peer, sock), n),
                    "listdir_proc_ms": per_call_ms(lambda: os.listdir("/proc"), n),
                    "processes": len([p for p in os.listdir("/proc") if p.isdigit()]),
                    "ancestry_ms": per_call_ms(lambda: ancestry(os.getpid()), n),
                    "ancestry_depth": len(ancestry(os.getpid()))}


def run(ctx: Context) -> Section:
    n = 50 if ctx.plan.smoke else 500
    fast, _ = ctx.shared.upstreams()
    progress("findings: micro-measurements")
    tok = token_id_costs(fast.url, n)
    wr = writer_transactions(ctx.workdir / "findings-writer.db", 40 if ctx.plan.smoke else 300)
    att = attribution_parts(n)
    quick = quickack_cost_us(n * 10)
    data = {"token_ids": tok, "writer": wr, "attribution": att, "quickack_us": quick}
    return Section("findings", TITLE, render(data), data)


def render(d: dict[str, Any]) -> str:
    tok, wr, att = d["token_ids"], d["writer"], d["attribution"]
    rows = [
        ("TCP_QUICKACK re-armed after a read (`addon/tcp_tuning.py`)", f"{fmt(d['quickack_us'], 2)} µs per read"),
        ("chat response, plain → with injected token ids + logprobs",
         f"{tok['plain_bytes']:,} → {tok['injected_bytes']:,} bytes"),
        ("`tokenids.strip_response_json` on that response", f"{fmt(tok['strip_ms'], 3)} ms"),
        ("one `json.loads` of that response", f"{fmt(tok['json_loads_ms'], 3)} ms"),
        ("`tokenids.plan_injection` on the request", f"{fmt(tok['plan_ms'], 3)} ms"),
        ("store writer: SQLite transactions per flow at agent pace",
         f"{fmt(wr['transactions_per_flow'], 2)} (for {wr['events_per_flow']} queued events)"),
        ("netlink inode lookup (`sockdiag.inode_netlink`), warm", f"{fmt(att['inode_ms'], 3)} ms"),
        (f"`os.listdir('/proc')` with {att['processes']} processes", f"{fmt(att['listdir_proc_ms'], 3)} ms"),
        (f"`procfs.ancestry` of a process {att['ancestry_depth']} levels deep", f"{fmt(att['ancestry_ms'], 3)} ms"),
    ]
    return table(["what", "measured"], rows) + "\n\n" + NOTES


NOTES = """\
How these were found: `python -m cProfile` around mitmdump (`-s addon/entry.py -s addon/tcp_tuning.py`)
under 2,000 keep-alive curl requests, bare vs capture vs capture + token ids, plus the proxy's own CPU
counters (section 1c). What they mean, and what would change them:

- **mitmproxy's floor.** Bare mitmdump spends the CPU shown in section 1c per request (about 1 ms on a
  quiet core; more on a shared one) in its sans-io HTTP layers and in dispatching every event to its ~35
  built-in addons (`addonmanager.trigger_event` / `invoke_addon`: ~290 addon calls per request).
  One event loop, one core: that is the ceiling on requests/s, the "≥ 0.8× direct" concurrency goal and
  the "≤ 2 ms over direct" goal on this machine, whatever the addon does. Running several proxies (one
  per group of agents) is the way past it.
- **Nagle/delayed ACK (cured).** `requests`/urllib3 enable Nagle on proxy connections and write a POST's
  headers and body apart; the proxy's kernel delays the ACK of the headers (a keep-alive connection that
  has exchanged data is in "pingpong" mode), so every keep-alive POST waits ~40 ms. `addon/tcp_tuning.py`
  re-arms TCP_QUICKACK after every read on client and server sockets (the kernel clears it), which sends
  the pending ACK at once. Section 1 shows `requests` keep-alive POSTs with and without it.
- **Store writer (`store/writer.py`, `StoreWriter._run`).** It commits as soon as one event is queued, so
  at agent pace each flow costs about as many SQLite transactions as it queues events (see the table),
  on a thread that shares the GIL and the core with mitmproxy's loop. Group commit would cut it: after
  the first event keep collecting for a few ms (`queue.get(timeout=...)` until ~5 ms or BATCH_MAX), and
  merge consecutive `update_flow` events of one flow into one UPDATE.
- **Writer events per flow (`addon/capture.py`).** Four per flow (insert at `requestheaders`, update at
  `request`, at `responseheaders`, at the end). For a non-streamed response the `responseheaders` columns
  can ride with the final update (the `response` hook follows at once).
- **Token ids (`addon/tokenids.py`).** With `return_token_ids` + `logprobs` the model's answer grows about
  30× (per-token logprob objects); the upstream builds and the proxy carries it, and
  `strip_response_json` parses it twice (`json.loads`, then `_DECODER.raw_decode` over the `logprobs`
  value in `_value_spans`). Skipping the logprobs value without building objects (or reusing the parsed
  document's knowledge of where it ends), and letting users switch logprobs off when they train without
  importance sampling (`use_vllm=False`), would take most of section 1's token-id overhead away.
- **Attribution (`addon/procfs.py`, `addon/sockdiag.py`).** Off the event loop (a thread started at
  `client_connected`), but it holds the GIL for its Python parts. Per new connection: the netlink query
  opens a fresh netlink socket each time (`inode_netlink`; keep one per worker thread); the owner search
  lists all of /proc (`SocketOwnerFinder._all_pids_newest_first`, grows with the process count) and,
  for a process older than the others, reads the fd table of every newer process first (section 3, "old
  agent"); `ancestry` opens two files per ancestor up to pid 1 on every new connection (cache ancestors'
  `ProcInfo` by pid + start time: a new agent's parents are the same manager/shell every time). Probing
  `/proc/<pid>` for pids just above the highest seen (pids are handed out in order) would find a new
  agent without listing /proc.
"""
