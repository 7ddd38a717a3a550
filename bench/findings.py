"""Where the time goes: small live measurements behind each finding of the profile, and what is mitmproxy's floor.

Each figure here is measured on this machine in this run (a second or two in all); the text says which
file and function it concerns and what would change it.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import time
import uuid
from collections.abc import Callable
from typing import Any

import h11
import psutil
import requests
from h11._readers import ChunkedReader
from h11._receivebuffer import ReceiveBuffer

from clients import chat_body
from context import Context, progress
from procs import Upstream
from report import Section, table
from rollouttap.addon import tokenids
from rollouttap.addon.chunk_coalescing import CoalescingChunkedReader
from rollouttap.addon.procfs import ancestry, read_file
from rollouttap.addon.sockdiag import inode_netlink
from rollouttap.store import StoreWriter
from stats import fmt

TITLE = "7. Findings: where the time goes"


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
    body = json.dumps(chat_body(False)).encode()
    injection = tokenids.plan_injection("/v1/chat/completions", body, "application/json")
    assert injection is not None
    url = upstream_url + "/v1/chat/completions"
    headers = {"Content-Type": "application/json"}
    streamed = tokenids.plan_injection("/v1/chat/completions", json.dumps(chat_body(True)).encode(),
                                       "application/json")
    assert streamed is not None
    with requests.Session() as session:
        session.trust_env = False
        plain = session.post(url, data=body, headers=headers, timeout=30).content
        full = session.post(url, data=injection.new_body, headers=headers, timeout=30).content
        sse = session.post(url, data=streamed.new_body, headers=headers, timeout=30).content

    def strip_stream() -> None:
        stripper = tokenids.StreamStripper(streamed)
        stripper.feed(sse)
        stripper.feed(b"")
    return {"plain_bytes": len(plain), "injected_bytes": len(full),
            "stream_events": sse.count(b"data:"), "strip_stream_ms": per_call_ms(strip_stream, n),
            "strip_ms": per_call_ms(lambda: tokenids.strip_response_json(full, injection), n),
            "json_loads_ms": per_call_ms(lambda: json.loads(full), n),
            "plan_ms": per_call_ms(lambda: tokenids.plan_injection("/v1/chat/completions", body,
                                                                   "application/json"), n)}


CHUNKS = 208  # one token per SSE event, as vLLM streams: the answer of section 2b


class _Joined:
    chunks_joined = 0


def chunk_read_costs(n: int) -> dict[str, float]:
    """µs per chunk to read a chunked SSE body of CHUNKS one-token events (vLLM's chat chunk shape), in one read
    and in reads of 1,000 bytes, with h11's reader alone and through the coalescing reader's scan."""
    event = (b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"policy",'
             b'"choices":[{"index":0,"delta":{"content":"ab"},"logprobs":null,"finish_reason":null}]}\n\n')
    body = b"".join(b"%x\r\n%s\r\n" % (len(event), event) for _ in range(CHUNKS)) + b"0\r\n\r\n"
    out: dict[str, float] = {}
    for reads, step in (("one", len(body)), ("1k", 1000)):
        pieces = [body[i:i + step] for i in range(0, len(body), step)]
        coalescing = lambda: CoalescingChunkedReader(ChunkedReader(), _Joined())  # noqa: E731
        for name, make in (("h11", ChunkedReader), ("scan", coalescing)):
            def read(make: Callable[[], Any] = make, pieces: list[bytes] = pieces) -> None:
                reader, buf = make(), ReceiveBuffer()
                for piece in pieces:
                    buf += piece
                    while (got := reader(buf)) is not None and type(got) is not h11.EndOfMessage:
                        pass
            out[f"{name}_{reads}_us"] = per_call_ms(read, n) * 1000 / CHUNKS
    return out


def upstream_answer_cpu(n: int) -> dict[str, float]:
    """The scripted upstream's CPU per answer (ms), plain and with injected token ids + logprobs, building each
    answer and answering from memory (``--memo``, what the other sections use)."""
    plain = json.dumps(chat_body(False)).encode()
    injection = tokenids.plan_injection("/v1/chat/completions", plain, "application/json")
    assert injection is not None
    out: dict[str, float] = {}
    for memo in (False, True):
        with Upstream(memo=memo) as upstream, requests.Session() as session:
            session.trust_env = False
            proc = psutil.Process(upstream.pid)
            for name, body in (("plain", plain), ("token_ids", injection.new_body)):
                def call() -> None:
                    session.post(upstream.url + "/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"}, timeout=30).raise_for_status()
                call()
                before = sum(proc.cpu_times()[:2])
                for _ in range(n):
                    call()
                out[f"{name}_{'memo' if memo else 'built'}_ms"] = (sum(proc.cpu_times()[:2]) - before) / n * 1000
    return out


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


def new_process_proc_reads(n: int) -> dict[str, float]:
    """What attribution reads of a process it has never seen (stat, environ, its fd directory), the first
    time and again right after: the first touch of a new process's /proc entries is the kernel's cost."""
    first: list[float] = []
    again: list[float] = []

    def reads(pid: int) -> float:
        t0 = time.perf_counter_ns()
        read_file(f"/proc/{pid}/stat")
        read_file(f"/proc/{pid}/environ")
        os.listdir(f"/proc/{pid}/fd")
        return (time.perf_counter_ns() - t0) / 1e6

    for _ in range(n):
        proc = subprocess.Popen(["sleep", "30"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
        try:
            while b"sleep" not in (read_file(f"/proc/{proc.pid}/cmdline") or b""):
                time.sleep(0.001)  # exec'd: its environ is the one attribution would read
            time.sleep(0.01)  # as when a connection arrives: not the very moment of exec
            first.append(reads(proc.pid))
            again.append(reads(proc.pid))
        finally:
            proc.kill()
            proc.wait()
    return {"first_ms": statistics.median(first), "again_ms": statistics.median(again)}


def run(ctx: Context) -> Section:
    n = 50 if ctx.plan.smoke else 500
    fast, _ = ctx.shared.upstreams()
    progress("findings: micro-measurements")
    tok = token_id_costs(fast.url, n)
    upstream_cpu = upstream_answer_cpu(n)
    wr = writer_transactions(ctx.workdir / "findings-writer.db", 40 if ctx.plan.smoke else 300)
    att = attribution_parts(n)
    att.update(new_process_proc_reads(5 if ctx.plan.smoke else 40))
    quick = quickack_cost_us(n * 10)
    chunks = chunk_read_costs(max(n // 10, 5))
    data = {"token_ids": tok, "upstream_cpu": upstream_cpu, "writer": wr, "attribution": att, "quickack_us": quick,
            "chunk_read": chunks}
    return Section("findings", TITLE, render(data), data)


def render(d: dict[str, Any]) -> str:
    tok, wr, att, up = d["token_ids"], d["writer"], d["attribution"], d["upstream_cpu"]
    rows = [
        ("TCP_QUICKACK re-armed after a read (`addon/tcp_tuning.py`)", f"{fmt(d['quickack_us'], 2)} µs per read"),
        (f"reading a chunked body of {CHUNKS} one-token SSE events, µs per chunk: h11's reader → the coalescing "
         "reader's scan (`addon/chunk_coalescing.py`)",
         f"in one read {fmt(d['chunk_read']['h11_one_us'], 2)} → {fmt(d['chunk_read']['scan_one_us'], 2)}; "
         f"in reads of 1,000 bytes {fmt(d['chunk_read']['h11_1k_us'], 2)} → {fmt(d['chunk_read']['scan_1k_us'], 2)}"),
        ("chat response, plain → with injected token ids + logprobs",
         f"{tok['plain_bytes']:,} → {tok['injected_bytes']:,} bytes"),
        ("`tokenids.strip_response_json` on that response", f"{fmt(tok['strip_ms'], 3)} ms"),
        ("one `json.loads` of that response", f"{fmt(tok['json_loads_ms'], 3)} ms"),
        ("`tokenids.plan_injection` on the request", f"{fmt(tok['plan_ms'], 3)} ms"),
        (f"`tokenids.StreamStripper` on the streamed answer, {tok['stream_events']} events in one read",
         f"{fmt(tok['strip_stream_ms'], 3)} ms ({fmt(tok['strip_stream_ms'] * 1000 / tok['stream_events'], 1)} µs "
         "per event)"),
        ("scripted upstream's CPU per answer, plain → token ids + logprobs: building it",
         f"{fmt(up['plain_built_ms'], 2)} → {fmt(up['token_ids_built_ms'], 2)} ms"),
        ("the same from memory (`--memo`, the other sections' upstream)",
         f"{fmt(up['plain_memo_ms'], 2)} → {fmt(up['token_ids_memo_ms'], 2)} ms"),
        ("store writer: SQLite transactions per flow at agent pace",
         f"{fmt(wr['transactions_per_flow'], 2)} (for {wr['events_per_flow']} queued events)"),
        ("netlink inode lookup (`sockdiag.inode_netlink`), warm", f"{fmt(att['inode_ms'], 3)} ms"),
        (f"`os.listdir('/proc')` with {att['processes']} processes", f"{fmt(att['listdir_proc_ms'], 3)} ms"),
        (f"`procfs.ancestry` of a process {att['ancestry_depth']} levels deep", f"{fmt(att['ancestry_ms'], 3)} ms"),
        ("a new process's stat, environ and fd directory: first read → read again",
         f"{fmt(att['first_ms'], 3)} → {fmt(att['again_ms'], 3)} ms"),
    ]
    return table(["what", "measured"], rows) + "\n\n" + NOTES


NOTES = """\
How these were found: py-spy (`py-spy record -f raw -p PID`) and `python -m cProfile` around mitmdump
under thousands of keep-alive curl requests, bare vs capture vs capture + token ids; per-thread CPU from
`/proc/PID/task/*/stat`; the proxy's own CPU counters (section 1c); the CPU of every party during the
concurrency burst (section 1b). What they mean, and what would change them:

- **mitmproxy's floor, and how rollouttap lowers it (`addon/fastdump.py`).** Stock mitmdump spends the
  CPU of section 1c per request (1.15–1.45 ms keep-alive, 3–5 ms when every request opens a new connection,
  on this machine). About half of that was not HTTP work: (1) `AddonManager.trigger_event` walks all ~35
  built-in addons for every hook (a context manager and a generator each, then the same again for the
  `update` hook after each flow hook); (2) under a plain `python`, mitmproxy type-checks every message
  object it builds (`MessageData.__post_init__`, `if __debug__`) and wraps each layer handler in an
  event-type check; (3) the root logger is at DEBUG, so six records per connection ("client connect",
  "server disconnect", ...) are formatted and sent as `add_log` events through every addon, then dropped
  by the terminal's verbosity. rollouttap starts mitmdump as `python -O -m rollouttap.addon.fastdump`:
  the same master, addons and options, with each hook's callables looked up once per addon set (same
  order, same error handling: a test compares both dispatches over mitmdump's own addon set), `-O`, and
  the root logger at the terminal's level. Bare mitmdump started that way needs about half the CPU per
  keep-alive request and ~40 % less per new connection (the "bare fastdump" rows; 0.43–0.6× across this
  machine's full runs, whose speed varies); what is left is
  mitmproxy's sans-io HTTP layers and a task per hook. Of the 23 calls of mitmproxy's own hooks every request
  still made, 18 return at once while their feature is off (header and body rules, map_local, a block list,
  a save file, sticky cookies, ...: they were a tenth of a capture proxy's GIL time in py-spy `--gil`); they
  are left out of the plans while the options keep them off (`fastdump.IDLE_WHEN`, re-read on every option
  change). A/B, two proxies started from the two versions, 10 interleaved rounds of curl calls: capture +
  tuning 1.13 → 1.03 ms of CPU per keep-alive request (p50 1.24 → 1.11 ms), 2.75 → 2.67 per new connection;
  bare fastdump + tuning 0.72 → 0.70 (16 rounds). Also, the hooks' arguments are read by field names looked
  up once per hook class (mitmproxy's `Hook.args` asks `dataclasses.fields` on every call).
  `ProxyConfig(launcher="mitmdump")` keeps the stock entry point. The "≤ 2 ms over direct for every
  client" goal still sits at or below this floor for new connections. Section 1c's "answering from
  memory" row is the floor under all of it: mitmproxy's client side alone (accept, parse, hooks, answer),
  with no server connection opened or used.
  Tried and dropped: pooling upstream connections across client connections. mitmproxy ties each server
  connection to one client connection, so an agent that opens a connection per call (urllib, curl) makes
  the proxy open one upstream too. A prototype addon that sent model requests itself over pooled
  keep-alive connections (asyncio streams, mitmproxy's own HTTP/1 parser) and answered in the `request`
  hook cut the proxy's CPU per curl request (~3.2 → ~2.7 ms on new connections, ~1.15 → ~0.87 ms
  keep-alive) but not latency (urllib new-connection and `requests` keep-alive p50 no better, 3 × 300
  requests), and an answer set in the `request` hook cannot stream, so SSE would still take mitmproxy's
  path. Not worth replacing mitmproxy's upstream side (errors, TLS, upstream modes) for that.
- **Concurrency on 2 cores.** Section 1b's CPU columns: a direct burst of 32 async openai-SDK clients
  already keeps both cores busy (the SDK itself spends 1.1–1.4 ms CPU per call, the upstream ~0.2 ms). A
  proxy adds its own CPU per call on the same cores, so calls/s through any proxy is bounded by cores /
  (direct CPU + proxy CPU per call): "≥ 0.8× direct" would need a proxy spending at most a quarter of
  direct's CPU per call (0.3–0.4 ms). On a node with spare cores the ceiling is one proxy's event loop (the
  last column of 1c); `AgentManager(proxies=N)` gives each of N proxies a share of the agents
  (section 4).
- **The openai SDK's streamed rows.** The synchronous `OpenAI` client stops reading a stream at
  `data: [DONE]` and closes the response before the chunked body's terminator, so httpx cannot reuse
  the connection: every streamed call opens a new one, direct or through any proxy (checked on
  httpx's pool: no connection survives 20 streamed calls either way). Its "keep-alive, SSE" row is in
  fact a new connection per call. `AsyncOpenAI` drains the body and keeps its connection.
- **Nagle/delayed ACK (cured).** `requests`/urllib3 enable Nagle on proxy connections and write a POST's
  headers and body apart; the proxy's kernel delays the ACK of the headers (a keep-alive connection that
  has exchanged data is in "pingpong" mode), so every keep-alive POST waited ~40 ms. `addon/tcp_tuning.py`
  re-arms TCP_QUICKACK after every read on client and server sockets (the kernel clears it), which sends
  the pending ACK at once. Section 1 shows `requests` keep-alive POSTs with and without it.
- **Streamed bursts: one pass per read (`addon/chunk_coalescing.py`).** mitmproxy reads a chunked body
  with h11's `ChunkedReader`, which yields each chunk apart, and passes each through its layers on its own
  (a `ResponseData` event, the stream callable, the client side's chunk framing, a `SendData` that its
  connection handler writes at once). When a read brings many SSE events (the scripted upstream writes an
  answer's 54 events back to back; a loaded model server or a busy proxy does the same), that was 54 passes
  and 54 `send`s to the client (strace: 58 `sendto` per answer, 3 `recvfrom`). The tuning addon wraps the
  reader mitmproxy picks for a chunked body (`_http1.make_body_reader`) so that every chunk one read
  completed comes out as one `Data`: the same bytes in the same order, re-framed for the client as one
  chunk, in one write; a protocol error after good chunks still comes after them. The `chunks not
  coalesced` rows of sections 1 and 2b (`rollouttap_coalesce_chunks=false`) are the A/B in every run. A
  paced stream (a chunk per read, as while a model generates) is unchanged, as it should be: coalescing pays
  off when the proxy falls behind the server, which is when its CPU matters. Superseded: joining the
  `SendData` of one event into few writes (`addon/send_merging.py`, 2026-12-01, in git history) spared
  the sends but not the passes; with coalescing it found nothing left to join (0 in the real-mitmdump
  burst test, and no change in 3 × 200 `requests` keep-alive streamed calls A/B), so it was removed.
  Then h11's reader itself: called once per chunk (a line search, a header pattern, a `Data`, two
  extracts) it cost 2.5 µs a chunk in a hot loop, a tenth of the proxy's GIL time under curl's streamed
  new-connection calls (py-spy `--gil`). The whole chunks at the front of h11's buffer are now cut out by one
  pattern over it (0.5–0.7 µs a chunk), from where h11's reader stands (between chunks, inside one a read
  ended in, or before a chunk's CRLF), anything else left to h11's reader between chunks, as it would have
  been. Tests: every cut of bodies with extensions, whitespace, upper-case hex, data that looks like chunks,
  footers and last chunks right and wrong, trailers, the next message behind the body, and 300 seeded random
  bodies, read as h11 reads them, leftover bytes included (a review's differential check: 0 differences in
  5,682 splits); reads cut every 64 to 1,000 bytes need at most 3 calls of h11's reader each. A/B through the
  proxy, two proxies started from the two versions and 8 interleaved rounds of 60 back-to-back 208-chunk
  answers (scratch script, not kept): bare fastdump + tuning 9.6 → 8.0 µs of proxy CPU per chunk, capture +
  tuning 13.6 → 11.2 (a slow spell of this host; 8.4 → 7.2 and 11.2 → 9.6 an hour before, with the scan
  only between chunks).
- **Listen backlog (fixed).** mitmproxy listens with asyncio's default backlog of 100: with 256 agents
  connecting at once, the rest of the SYNs were dropped and those clients retried after 1–3 s.
  `addon/listen_backlog.py` re-listens mitmproxy's sockets with 4096 (capped by `net.core.somaxconn`).
- **Store writer (`store/writer.py`).** Group commits: every event waits 10 ms (the linger) and commits
  are at least that far apart, each flow's insert and updates folded into one statement. Under load that
  is one transaction for many flows; at an agent's pace (a request every few ms on new connections) a
  short flow is one INSERT in one transaction. Until this session the first event after a quiet spell
  was committed at once, so such a flow took two transactions: writer-thread CPU per flow at curl's
  new-connection pace fell from ~0.43 to ~0.2 ms when it began to wait too (per-thread CPU), and the event
  loop's own CPU fell with it (fewer wake-ups and GIL hand-offs). The price: a new flow reaches readers
  up to 10 ms later. What a flow costs the writer at that pace is about twice its cost in a hot loop, and
  not in our Python: standalone, the same inserts (a ~14 KB streamed answer, 3 flows a transaction) cost
  90 µs of CPU a flow back to back and 150–160 µs with a 12 ms sleep between transactions (SQLite's work
  on caches the sleep left cold; a timed wait costs ~30 µs of CPU on this VM besides). A 50 ms linger
  (a scratch switch, not kept) cut the writer's CPU per curl new-connection streamed call from 0.23–0.36
  to 0.13–0.19 ms (per-thread CPU, 2 × 2 interleaved runs) and showed nothing in p50 beyond this host's
  noise; it would also hold five times as many events in memory before they are safe in the file, so the
  linger stays at 10 ms.
- **deploy()'s tail (`store/nudge.py`).** Once an agent has exited, the manager waits for the proxy's
  commit watermark ("everything queued before this moment is committed") before reading its flows. When
  idle the writer writes that mark at doubling intervals (10 ms up to 100 ms), and an agent exits tens of
  ms after its last call, so the last agent's results waited 60–90 ms for the next mark. A waiting reader
  now sends the proxy SIGURG and the writer marks at once: section 5's "after last exit" fell from
  ~0.08 s to a few ms.
- **Our hooks (`addon/capture.py`).** Per keep-alive request rollouttap's proxy spends ~0.2–0.5 ms
  more than bare fastdump (section 1c; it varies between full runs): ~0.1 ms in our hook functions
  (py-spy), ~0.1 ms in the writer thread, the rest GIL hand-offs between the two threads (an inference,
  not measured directly). As a ratio this is larger than before fastdump (1.2–1.45× a base that
  halved), in absolute terms smaller. Moving the writer into
  its own process would trade the hand-offs for serialising every event.
- **Token ids (`addon/tokenids.py`, `addon/jsonspans.py`).** With `return_token_ids` + `logprobs` the
  model's answer grows about 30× (per-token logprob objects) and the proxy carries it. Building that answer
  costs the scripted upstream several times a plain answer's CPU (the table above): a cost of the model
  server, whoever asks for the ids, so every other section's upstream answers a repeated request from
  memory (`--memo`). Runs before that change built every answer, and their token-id rows held the fake
  model's work (section 1b's upstream column: 0.92 vs 0.22 ms CPU per call, full run of 2026-11-30 02:29).
  Stripping edits the bytes in place (the
  `jsonspans.FAST_VALUE` pattern skips a whole compact logprobs value without building objects; only
  unusual spellings fall back to `json` parsing). A streamed answer is one SSE event per token or few,
  and checking each event the general way (find the fields, parse the event with markers in their place)
  cost ~20 µs per event in a hot loop: a chat chunk of vLLM's shape is now matched whole by one pattern
  (`addon/vllm_chunk.py`), which also says where its fields are (~12 µs per event with the rest of the
  path; in three A/B runs of a 53-event token-id stream over keep-alive, 5.3–6.2 → 4.2–4.6 ms of proxy
  CPU per answer). That match now runs on the bytes as read, SSE framing included, so its end is the
  event's and the event is forwarded as slices of the read: no copy of it to match, no decoding, no search for its
  data line, no re-encoding (a 54-event answer in a hot loop: 343 → 185 µs, of which the pattern is 113).
  Through the proxy, A/B in 3 interleaved rounds of curl keep-alive streamed calls (a scratch script that
  swapped the two versions between rounds, not kept): 4 tokens per event, p50 2.35 → 2.15 ms and proxy
  CPU 2.26 → 2.04 ms per answer; one token per event as vLLM streams (208 events), 3.70 → 3.10 ms and
  3.72 → 3.12 ms, about 3 µs less per event. A non-streamed answer's logprobs are checked by FAST_VALUE,
  whose walk over them is most of stripping's cost (~0.10 of the ~0.14 ms in the table above, hot loop;
  variants of the pattern, without INTS' lookahead or with looser strings, were no faster); guessing their
  end from the field that follows them halves that, but would null bytes that are not JSON, so it was not
  done. `rollouttap_logprobs=false` asks for token ids only, for training without importance-sampling
  correction (the "no logprobs" rows).
- **Long conversations (section 1d).** With token ids, vLLM's answer carries the prompt's ids, so a call
  with a context of 100,000 tokens brings back a list of 100,000 numbers, which the proxy checks before
  nulling it for the agent, and the store keeps (section 1d's stored KB per call). The check was the INTS
  pattern, which steps through every id (2.3 ms for 100,000 ids of 2–3 digits); it is now
  `jsonspans.id_list_end`: the list's characters by one `str.translate`, then two searches for an empty or
  zero-led item, 1.0 ms, with the pattern's answers (a property test over 20,000 random lists compares
  them), and the search for marker-like numbers looks at the text kept around the nulled lists only (over
  a whole 369 KB answer it took 0.23 ms). `strip_response_json` on that answer: 2.66 → 1.25 ms. A/B (8
  interleaved rounds of 60 `requests.Session` posts of a 100,000-character prompt, a scratch script): proxy
  CPU 6.67 → 5.25 ms per call, p50 6.83 → 5.44 ms. Checking the characters alone (0.2 ms) would hide a
  malformed list rather than forward the body untouched: not taken. A stream's first chunk carries the same
  list: an ASCII event over 64 KiB (`tokenids.LONG_EVENT`) now takes the general path, which checks it so,
  instead of vllm_chunk's pattern (100,000 six-digit ids: 3.1 → 1.9 ms; A/B as above, streamed: proxy CPU
  8.83 → 7.42 ms per call, p50 8.55 → 7.35 ms). Per thread, with 100,000-character prompts over keep-alive
  (/proc per-thread CPU, a scratch script): the event loop 3.6 ms and the store writer 1.35 ms per call
  with token ids, against 1.27 and 0.48 with capture alone; stripping is 1.3–1.4 ms of the loop's, parsing
  the request to add the fields ~0.27 ms. The manager decodes every call's answer: with each prompt's ids
  decoded whole, that was most of the ~0.3 s a 50-call agent's conversation and row cost. Its answers are
  now read by `manager/prompt_ids.py`: where a prompt's id list begins with the text of the one read before
  (an agent's next prompt resends it), only the ids past it are decoded (`build_conversation` of 50 answers
  growing to 100,000 ids: 0.29–0.31 → 0.046–0.051 s, the same calls). Decoded, an id past 256 is an int
  object of its own in every call's list: a call whose prompt resends the one before holds that one's
  objects (`conversation.share_prompt_prefix`, and the reader, which builds it so), so 50 calls growing to
  100,000 ids of a real vocabulary hold ~24 MB instead of 93.1 (section 1d's last table). A conversation's
  calls resend it whole, so a store grows with the square of an agent's turns: `AgentManager(keep_for=...)`,
  `rollouttap prune` (README, "The store").
- **Attribution (`addon/procfs.py`, `addon/sockdiag.py`).** A pool thread started at `client_connected`,
  before the request arrives, holding the GIL for its Python parts; one netlink socket per thread; new
  processes are found by probing pids just below `ns_last_pid`; sockets seen while searching are
  remembered; ancestors' tags are cached by pid + start time. A process that connected before is answered
  on the event loop instead, from what earlier lookups cached (`PidAttributor.resolve_cached`, section 3's
  "reconnecting" row: the netlink answer, taken only if the kernel queued it already; the owner among the
  socket fds of processes that reconnect, 8 fd links at most; its stat file; tags, registered roots and
  whether it is another proxy as read within the last second). It reads no store row, no environ or
  cmdline (the kernel takes the process's memory lock for those, which another task may hold long) and
  takes no lock a pool thread holds while it reads the store; whatever needs more goes to the thread. The
  hand-off was dearer than the lookup: A/B on urllib new connections through capture + tuning (an
  environment switch in a scratch copy, not kept; 20 rounds × 50 requests, interleaved with bare fastdump
  and with capture without pid attribution): p50 2.41 → 2.17 ms, p25 2.26 → 1.90, proxy CPU 2.25 → 1.91 ms
  per request (bare fastdump 1.76 ms / 1.52 ms CPU; no pid attribution 2.07 / 1.84). It is not tried while
  lookups run on the threads: every read on the loop gives up the GIL, which the loop then waits to get
  back from them. Tried at all times, it cost section 4's 64 agents (hand-tagged, so the cache never
  answers) ~1 ms of loop time per connection and a seventh of their calls/s (`--only scale`, each run 3 ×
  64 agents: 298 and 296 calls/s against 346 with every lookup on a thread; with the rule, 363 and 358
  against 363 and 338). Sockets read through a thread's id (a thread started lately is probed as a new
  pid: aiohttp's resolver threads) are remembered as its process's, where the loop looks: before that,
  aiohttp's new connections never hit the cache (0 of 200 in a scratch count; 187 of 200 after, the rest
  due a re-read of the live agents). What is left: a process
  older than the others, seen for the first time and not under a registered agent, costs a scan of every
  fd table (section 3, "old agent"); a managed agent's processes are new ones, found among the newest
  pids. The first connection of a new process is where the 0.1 ms goal is missed, and not by our reads' number (about a
  dozen syscalls: the socket's inode, the newest pids, the owner's fd links, its stat and environ): the
  first read of a new process's /proc entries makes the kernel build them, several times the cost of the
  same reads again (the table above), and section 3's "new processes" row also meets a machine that idled
  while the process started (its first syscalls after a wake-up are slower still). Two kinds of syscall were
  more than needed: the netlink query made 5 (Python polls before every send and receive of a socket with a
  timeout), now 2 on a non-blocking socket; and the event loop's lookup of a process that reconnects read its
  stat file by open, read and close, now by one `pread` of a file kept open (`procfs.StatFiles`: bound to the
  process, ESRCH once it is reaped). In a proxy instrumented per call under urllib's new connections (a
  scratch script): the netlink query 37 → 25 µs p50, the cached chain 27 → 20 µs p50 and 137 → 39 µs p90,
  `resolve_cached` 178–185 → 147–150 µs mean (its p50, ~120 µs, within noise): in a busy proxy each of these
  reads costs several times what section 3's hot loop shows (~40 µs for the whole lookup there). A
  known process's next connection is found among remembered sockets (section 3, "resolve warm").
  Under deploy() the pid lookups met a cost none of section 3's rows has: a batch of agents started together.
  The newest pids are then mostly the manager's threads (a pool thread and two output readers per agent), and
  /proc serves a thread's id as its process's, so the search for new processes read the manager's whole fd table
  (~3 descriptors per running agent) once per thread: in a proxy instrumented per lookup (a scratch
  `sitecustomize`), 32 agents of 16 at once cost 194 ms of lookup CPU and 29,932 fd links, and with 128 agents at
  once on this 2-core VM 1 to 6 per batch had a call refused (503: its sender's check took over the 10 s). Now a
  lookup reads a table of 16 or more descriptors once, with its process's task list, whose threads it then skips
  (`procfs.GROUP_CHECK_MIN`); it reads the registered roots that have not yet held a connection before the newest
  pids, oldest first (agents started together connect about in that order; `ROOT_PROBES`, `ROOT_MISSES`); a
  connection whose request has come while its lookup was still queued has the tree of the agent its token names
  read first (the answer is checked as any other); and quick lookups leave tables over 256 descriptors (the
  manager's, above ~80 agents) to the full one. The same 32 agents: 24 ms and 913 links. `--only deploy`, A/B in
  3 interleaved rounds (a slow spell of this host: the 16 agents directly 1.31-1.57 s): deploy() 1.07-1.13x
  direct against 1.14-1.17x, proxy CPU 0.14-0.18 against 0.20-0.24 s per batch; section 5's row of 128 agents at
  once (added with this): 0 of 768 agents failed in two runs, 1.13x and 1.15x, proxy CPU 1.65 and 1.71 s, against
  1 of 384, 1.17x and 2.92 s before. Two more causes, in the same instrumented proxy at 128 agents at once: the
  manager records an agent's root pid as it gets to it, so many first connections came before the proxy's live
  agents held it; and the young list (64) lost an agent to the hundreds of pids handed out before it connected.
  A quick lookup that fails now reads the live agents again and tries the roots registered since, and the young
  list keeps 512 pids (still probing at most 64 new ones a lookup): full lookups on the scan thread 34-40 -> 14 of
  ~260, the slowest lookup 7.5-9.8 -> 7.7 s. At 256 agents at once (a scratch run) lookups still wait seconds:
  the proxy gets its share of 2 cores among 256 starting interpreters, and lookups queue on its 4 lookup threads:
  instrumented, 2.4 s p50 and up to 12 s from connection to answer, of which running took 0.5 s p90 and at most
  5.5 s, and 10 of 512 agents had a call refused past the 10 s. The 10 s now count only while the lookup runs on
  a thread (60 s in all, queued or running): the same instrumented run, 0 of 512 refused.
  Tried and dropped: uvloop under mitmproxy (0.23, with an eager task factory it accepts): 6 % less CPU for bare
  fastdump and 2 % for capture per keep-alive request (httpx, 8 interleaved rounds), and it calls a protocol's
  `data_received` as bound at connection, past the tuning addon's QUICKACK wrap: not worth a dependency.
  Tried and dropped: sending a request upstream before its pid lookup ends (filling the agent in before
  the response goes back). On this 2-core machine urllib's new-connection p50 over direct got worse,
  ~1.9 → ~2.5 ms: the lookup thread and the event loop then compete for the GIL, while a request that
  waits leaves the loop idle and the lookup runs alone.
"""
