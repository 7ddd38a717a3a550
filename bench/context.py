"""What every benchmark gets: the sizes of this run (smoke or full), a work folder and shared processes."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from procs import (
    BARE, BARE_STREAM, DIRECT, FLOOR, IDS_ONLY_TUNED, LATENCY_VARIANTS, PY, TOKENS_TUNED, ProxyStack, Upstream, Variant,
)

BENCH = Path(__file__).parent
WORKER = BENCH / "clients.py"


@dataclass(frozen=True)
class Plan:
    """Sizes of one run; every loop in the benchmarks is bounded by these counts and budgets."""
    name: str
    repeats: int
    requests: int  # timed requests per latency cell
    warmup: int
    cell_budget_s: float  # a latency cell stops early after this long
    stream_requests: int
    chunk_delay: float  # seconds between SSE chunks in the streaming benchmark
    concurrency_clients: int
    concurrency_procs: int
    concurrency_seconds: float
    attribution_procs: tuple[int, ...]
    attribution_conns: int
    scale_agents: tuple[int, ...]
    scale_calls: int
    scale_budget_s: float
    deploy_agents: int
    deploy_calls: int
    deploy_busy: int  # idle processes on the host for deploy's busy-host rows (0: none)
    deploy_batch: int  # agents at once in deploy's large-batch rows (0: none)
    store_write_flows: int
    store_read_flows: int
    clients: tuple[str, ...] = ("requests", "openai", "aiohttp", "urllib", "curl")

    @property
    def smoke(self) -> bool:
        """Smoke runs also trim the variants compared, so that the whole run takes seconds."""
        return self.name == "smoke"


SMOKE = Plan("smoke", repeats=1, requests=3, warmup=1, cell_budget_s=5, stream_requests=2, chunk_delay=0.01,
             concurrency_clients=4, concurrency_procs=1, concurrency_seconds=0.3,
             attribution_procs=(10,), attribution_conns=5, scale_agents=(4,), scale_calls=3,
             scale_budget_s=60, deploy_agents=2, deploy_calls=2, deploy_busy=20, deploy_batch=0, store_write_flows=500,
             store_read_flows=2000)
FULL = Plan("full", repeats=3, requests=100, warmup=10, cell_budget_s=20, stream_requests=20, chunk_delay=0.02,
            concurrency_clients=32, concurrency_procs=2, concurrency_seconds=5.0,
            attribution_procs=(10, 100, 1000), attribution_conns=50, scale_agents=(64, 256),
            scale_calls=20, scale_budget_s=300, deploy_agents=16, deploy_calls=5,
            deploy_busy=1000, deploy_batch=128, store_write_flows=20000, store_read_flows=100000)


def progress(message: str) -> None:
    """Progress on stderr; results go to the report."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class Shared:
    """Processes several benchmarks use, started on first use: upstreams and the latency proxies."""

    def __init__(self, plan: Plan, workdir: Path) -> None:
        self.plan = plan
        self.workdir = workdir
        self._stack = ExitStack()
        self._fast: Upstream | None = None
        self._paced: Upstream | None = None
        self._proxies: ProxyStack | None = None

    def upstreams(self) -> tuple[Upstream, Upstream]:
        """(fast upstream, upstream pacing SSE chunks ``chunk_delay`` apart)."""
        if self._fast is None:
            self._fast = self._stack.enter_context(Upstream())
            self._paced = self._stack.enter_context(Upstream(self.plan.chunk_delay))
        assert self._paced is not None
        return self._fast, self._paced

    def variants(self) -> tuple[Variant, ...]:
        """The variants compared in this run (a smoke run starts only three proxies)."""
        if self.plan.smoke:
            return (DIRECT, BARE, TOKENS_TUNED, FLOOR)
        return (*LATENCY_VARIANTS, BARE_STREAM, IDS_ONLY_TUNED, FLOOR)

    def pick(self, wanted: tuple[Variant, ...]) -> tuple[Variant, ...]:
        """Those of ``wanted`` that this run compares."""
        have = self.variants()
        return tuple(v for v in wanted if v in have)

    def proxies(self) -> ProxyStack:
        """Every variant's proxy (latency variants, bare mitmdump streaming, the floor); model hosts: both
        upstreams."""
        if self._proxies is None:
            fast, paced = self.upstreams()
            progress("starting proxies")
            stack = ProxyStack(self.variants(), self.workdir / "proxies",
                               (fast.hostport, paced.hostport))
            stack.workdir.mkdir(parents=True, exist_ok=True)
            self._proxies = self._stack.enter_context(stack)
        return self._proxies

    def close(self) -> None:
        self._stack.close()


@dataclass
class Context:
    plan: Plan
    workdir: Path
    shared: Shared


def run_job(job: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one client-worker job in its own process and return its JSON answer."""
    out = subprocess.run([PY, str(WORKER)], input=json.dumps(job) + "\n", capture_output=True, text=True,
                         timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"client worker failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
