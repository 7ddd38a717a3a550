"""Peers: LiteLLM's proxy and Agent Lightning's gateway beside rollouttap, on the same upstreams with the same clients.

The peers run unmodified from their own virtualenv (bench/peers/install.sh makes bench/.peers-venv; their
dependencies never enter rollouttap's). They are reverse proxies: a client takes one as its base URL, where
rollouttap's agents keep the model server's URL and get the proxy from HTTP_PROXY. Measured in full runs where
the virtualenv exists; otherwise (a smoke run, CI) the section measures rollouttap's rows alone and says so.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from clients import STREAM_MESSAGE
from concurrency import burst
from context import BENCH, Context, progress, run_job
from procs import BARE, CAPTURE_TUNED, DIRECT, TOKENS_TUNED
from report import Section, table
from rollouttap.manager.proxy import free_port
from stats import fmt, percentile, ratio, spread

TITLE = "1e. Peers: LiteLLM and Agent Lightning on the same upstream"
PEERS_VENV = BENCH / ".peers-venv"
MASTER_KEY = "sk-bench"  # LiteLLM 1.108 will not start without one; the bench's openai clients send it
FAST_MODEL, PACED_MODEL = "policy", "policy-paced"  # the peers route by model name to the fast or paced upstream
OURS = (DIRECT, BARE, CAPTURE_TUNED, TOKENS_TUNED)
LITELLM, AGENT_LIGHTNING = "LiteLLM proxy", "Agent Lightning gateway"
SHOWN = {CAPTURE_TUNED.name: "rollouttap, capture + tuning",
         TOKENS_TUNED.name: "rollouttap, capture + token ids + tuning"}
RECORDS = {
    DIRECT.name: "",
    BARE.name: "nothing",
    CAPTURE_TUNED.name: "every request and response, whole, in SQLite; the agent by its process",
    TOKENS_TUNED.name: "every request and response in SQLite, with exact token ids and logprobs (hidden from "
                       "the agent)",
    LITELLM: "nothing (no database configured): a router",
    AGENT_LIGHTNING: "each call as an event of its rollout, in memory, with token ids and logprobs (passed on to "
                     "the agent too); the rollout by URL path",
}


@dataclass
class Peer:
    """One peer proxy process; clients call ``base`` (its URL and any path prefix it routes by)."""
    name: str
    args: list[str]
    log: Path
    port: int
    ready_line: str | None = None  # a line it prints on stdout when ready, with its path prefix after it
    streams: bool = True  # False: it refuses streamed requests (the streamed cells record the refusal)
    proc: subprocess.Popen[bytes] | None = None
    prefix: str = ""
    env: dict[str, str] = field(default_factory=dict)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.prefix}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 120.0) -> None:
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(self.args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         env={**os.environ, **self.env}, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self._tail()}")
            if self._ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f}s: {self._tail()}")

    def _ready(self) -> bool:
        if self.ready_line is not None:
            for line in self.log.read_text(errors="replace").splitlines():
                if line.startswith(self.ready_line + " "):
                    self.prefix = line.split(" ", 1)[1].strip()
                    return True
            return False
        try:
            return requests.get(f"http://127.0.0.1:{self.port}/health/liveliness", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def _tail(self) -> str:
        return self.log.read_text(errors="replace")[-1500:] if self.log.exists() else ""

    def stop(self) -> None:
        """SIGINT to its process group (it says what it recorded as it stops), then SIGKILL to whatever of the
        group is left: it may have started helpers of its own."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGINT)
                self.proc.wait(15.0)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()

    def recorded(self) -> int | None:
        """The calls Agent Lightning said it recorded (printed as it stopped); None for another peer."""
        for line in self.log.read_text(errors="replace").splitlines():
            if line.startswith("SPANS "):
                return int(line.split()[1])
        return None


def peers_installed() -> bool:
    """Whether bench/peers/install.sh made the peers' virtualenv and both peers import there."""
    python = PEERS_VENV / "bin" / "python"
    if not python.exists() or not (PEERS_VENV / "bin" / "litellm").exists():
        return False
    check = subprocess.run([str(python), "-c", "import litellm.proxy.proxy_server, agentlightning.server.app"],
                           env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}, capture_output=True,
                           timeout=120)
    return check.returncode == 0


def litellm_config(path: Path, fast: str, paced: str) -> Path:
    """LiteLLM's proxy config: one model name per upstream, through its vLLM provider."""
    lines = ["model_list:"]
    for name, url in ((FAST_MODEL, fast), (PACED_MODEL, paced)):
        lines += [f"  - model_name: {name}", "    litellm_params:", "      model: hosted_vllm/policy",
                  f"      api_base: {url}/v1", f"      api_key: {MASTER_KEY}"]
    path.write_text("\n".join(lines) + "\n")
    return path


@contextmanager
def peers(ctx: Context, failed: dict[str, str]) -> Iterator[list[Peer]]:
    """The peers that started (one after the other: each takes seconds to import), stopped on the way out; one
    that does not start is left out, with why in ``failed``."""
    fast, paced = ctx.shared.upstreams()
    work = ctx.workdir / "peers"
    work.mkdir(parents=True, exist_ok=True)
    # No network here: LiteLLM would fetch its model price list from GitHub at every start (and retry).
    env = {"LITELLM_MASTER_KEY": MASTER_KEY, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    config = litellm_config(work / "litellm.yaml", fast.url, paced.url)
    port = free_port()
    made = [Peer(LITELLM, [str(PEERS_VENV / "bin" / "litellm"), "--config", str(config), "--host", "127.0.0.1",
                           "--port", str(port)], work / "litellm.log", port, env=env)]
    port = free_port()
    made.append(Peer(AGENT_LIGHTNING, [str(PEERS_VENV / "bin" / "python"), str(BENCH / "peers" / "agl_proxy.py"),
                                       str(port), fast.url],
                     work / "agent-lightning.log", port, ready_line="READY", streams=False, env=env))
    started: list[Peer] = []
    with ExitStack() as stack:
        for peer in made:
            progress(f"peers: starting {peer.name}")
            stack.callback(peer.stop)
            try:
                peer.start()
            except RuntimeError as exc:
                failed[peer.name] = str(exc)[-600:]
                continue
            started.append(peer)
        yield started


def measure_once(ctx: Context, runs: dict[str, list[dict[str, Any]]], started: list[Peer]) -> None:
    """One round of every row: keep-alive latency, streamed first byte, then the 32-client burst."""
    plan, proxies = ctx.plan, ctx.shared.proxies()
    fast, paced = ctx.shared.upstreams()
    # (name, base URL, proxy URL, model, pid of the proxy process)
    targets: list[tuple[str, str, str | None, str | None, int | None]] = [
        (v.name, "", proxies.url(v), None, proxies.proxies[v.name].pid if v.proxy else None)
        for v in ctx.shared.pick(OURS)]
    targets += [(p.name, p.base, None, FAST_MODEL, p.pid) for p in started]
    refusing = {p.name for p in started if not p.streams}
    for name, base, proxy, model, pid in targets:
        progress(f"peers: {name}")
        row: dict[str, Any] = {}
        for stream, url, routed in ((False, base or fast.url, model), (True, base or paced.url,
                                                                       model and PACED_MODEL)):
            cell = {"proxy": proxy, "keepalive": True, "stream": stream, "budget_s": plan.cell_budget_s,
                    **({"message": STREAM_MESSAGE, "n": plan.stream_requests, "warmup": 1} if stream
                       else {"n": plan.requests, "warmup": plan.warmup}),
                    **({"model": routed} if routed else {})}
            try:
                answer = run_job({"kind": "cells", "client": "openai", "url": url, "cells": [cell]},
                                 plan.cell_budget_s + 90)["cells"][0]
            except (RuntimeError, ValueError, subprocess.SubprocessError) as exc:  # the worker itself failed
                answer = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            if "error" in answer and stream and name in refusing and "Error code: 400" in answer["error"]:
                row["stream_refused"] = answer["error"]  # its documented 400: not a failure of the run
            elif "error" in answer:
                row.setdefault("errors", []).append(answer["error"])
            elif stream:
                row["ttfb"], row["stream_total"] = percentile(answer["ttfb_ms"], 50), percentile(answer["lat_ms"], 50)
            else:
                row["p50"], row["p99"] = percentile(answer["lat_ms"], 50), percentile(answer["lat_ms"], 99)
        try:
            got = burst(ctx, proxy, pid, url=base or None, model=model)
        except (RuntimeError, ValueError, subprocess.SubprocessError) as exc:  # one peer's failure: the rest stand
            row.setdefault("errors", []).append(f"burst: {exc}"[:300])
        else:
            row["per_s"], row["burst_errors"] = got["per_s"], got["errors"]
            row["proxy_cpu_ms"] = got["cpu_ms_per_call"]["proxy"] if pid else None
        runs[name].append(row)


def run(ctx: Context) -> Section:
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    measured_peers = not ctx.plan.smoke and peers_installed()
    recorded: dict[str, int | None] = {}
    failed: dict[str, str] = {}
    with ExitStack() as stack:
        started = stack.enter_context(peers(ctx, failed)) if measured_peers else []
        for rep in range(ctx.plan.repeats):
            progress(f"peers: repeat {rep + 1}/{ctx.plan.repeats}")
            measure_once(ctx, runs, started)
        stack.close()  # stop the peers: Agent Lightning says what it recorded as it stops
        recorded = {p.name: p.recorded() for p in started}
    body = render(ctx, runs, measured_peers, recorded)
    if failed:
        body += "\n\nPeers that did not start:\n\n" + "\n".join(
            f"- {name}: `{why.strip().splitlines()[-1] if why.strip() else why}`" for name, why in failed.items())
    errors = failed or any(r.get("errors") or r.get("burst_errors") for rs in runs.values() for r in rs)
    return Section("peers", TITLE, body, {"runs": dict(runs), "recorded": recorded, "failed": failed},
                   "error" if errors else "ok")


def render(ctx: Context, runs: dict[str, list[dict[str, Any]]], measured_peers: bool,
           recorded: dict[str, int | None]) -> str:
    plan = ctx.plan
    direct_p50 = spread([r.get("p50", float("nan")) for r in runs[DIRECT.name]]).median
    direct_rate = spread([r.get("per_s", float("nan")) for r in runs[DIRECT.name]]).median
    rows = []
    for name, reps in runs.items():
        fig = {key: spread([r[key] for r in reps if r.get(key) is not None])
               for key in ("p50", "p99", "ttfb", "stream_total", "per_s", "proxy_cpu_ms")}
        is_direct = name == DIRECT.name
        refused = any(r.get("stream_refused") for r in reps)
        rows.append((SHOWN.get(name, name), fig["p50"].fmt(), fig["p99"].fmt(),
                     "" if is_direct else fmt(fig["p50"].median - direct_p50),
                     "refused" if refused else fig["ttfb"].fmt(), "refused" if refused else fig["stream_total"].fmt(),
                     fig["per_s"].fmt(0), fmt(ratio(fig["per_s"].median, direct_rate)),
                     "" if is_direct else fig["proxy_cpu_ms"].fmt(), RECORDS.get(name, "")))
    text = (f"The openai SDK against each: {plan.requests} keep-alive non-streamed calls (p50, p99); "
            f"{plan.stream_requests} streamed answers of a few chunks {plan.chunk_delay * 1000:g} ms apart "
            "(first parsed chunk and total, p50); and section 1b's burst of "
            f"{plan.concurrency_clients} `AsyncOpenAI` clients for {plan.concurrency_seconds:g} s (calls/s, and the "
            f"proxy process's CPU per call); {plan.repeats} runs, rows interleaved. Same upstreams as sections 1 "
            "and 2. rollouttap and bare mitmdump are HTTP proxies (`HTTP_PROXY`); the peers are base URLs.")
    if measured_peers:
        text += (f" LiteLLM {_peer_version('litellm')}: `litellm --config` with the two upstreams as `hosted_vllm` "
                 "models and a master key (this version refuses to start without one), one worker, as its docs "
                 f"start it. Agent Lightning {_peer_version('agentlightning')}: its gateway (the app `agl-server` "
                 "serves) with its default proxy settings (train mode: it asks the model server for token ids and "
                 "logprobs, records each call as an event of the rollout and passes the answer on, re-encoded), an "
                 "API key, its in-memory store; the model server registered and a rollout created through its own "
                 "API (`bench/peers/agl_proxy.py`), clients calling under that rollout; uvicorn's access log off "
                 "(`agl-server` leaves it on: in its favour). It refuses streamed requests (400 \"Streaming "
                 "responses are not supported\").")
    text += "\n\n"
    text += table(["proxy", "p50 ms", "p99 ms", "p50 over direct", "streamed first chunk ms", "streamed total ms",
                   f"{plan.concurrency_clients} clients calls/s", "× direct", "proxy CPU ms/call", "records"], rows)
    if not measured_peers:
        why = "a smoke run" if plan.smoke else "bench/.peers-venv is missing: run `bench/peers/install.sh` first"
        text += f"\n\nThe peers were not measured in this run ({why}); only rollouttap's rows were."
    elif recorded.get(AGENT_LIGHTNING) is not None:
        text += (f"\n\nAgent Lightning recorded {recorded[AGENT_LIGHTNING]} calls for the rollout the clients called "
                 "under (all runs together).")
    errors = [f"- {name}: {e}" for name, reps in runs.items() for r in reps for e in r.get("errors", [])]
    errors += [f"- {name}: {r['burst_errors']} failed calls in the burst" for name, reps in runs.items()
               for r in reps if r.get("burst_errors")]
    return text + ("\n\nErrors:\n\n" + "\n".join(errors) if errors else "")


def _peer_version(package: str) -> str:
    dist = next(PEERS_VENV.glob(f"lib/python3*/site-packages/{package}-*.dist-info"), None)
    return dist.name[len(package) + 1:-len(".dist-info")] if dist else "(not installed)"
