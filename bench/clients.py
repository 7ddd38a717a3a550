"""Client worker: times chat calls with one HTTP client, in its own process (no shared GIL).

Reads a JSON job on stdin, prints one JSON line of results. Jobs:
  {"kind": "cells", "client": "requests", "url": UPSTREAM, "cells": [{"proxy": URL|null, "keepalive": bool,
   "stream": bool, "n": int, "warmup": int, "budget_s": float}, ...]}
  {"kind": "concurrent", "url": UPSTREAM, "proxy": URL|null, "clients": 32, "seconds": 5, "max_calls": N}
  A job's or cell's optional "model" names the model the openai clients ask for (default "policy"): a proxy
  that routes by model name (LiteLLM) reaches either upstream that way.
    prints READY, waits for a line GO on stdin, then runs; answers calls, errors, t_start, t_end and
    cpu_s (the worker's own CPU seconds over the burst).
Proxies are given the way agents get them: HTTP_PROXY / http_proxy in the environment.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any
from collections.abc import Callable

CLIENTS = ("requests", "openai", "aiohttp", "urllib", "curl")
MESSAGE = "Summarise this for me: " + "the quick brown fox jumps over the lazy dog " * 4
STREAM_MESSAGE = "say hi"
_PROXY_VARS = ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def chat_body(stream: bool, message: str = MESSAGE) -> dict[str, Any]:
    return {"model": "policy", "stream": stream, "messages": [{"role": "user", "content": message}]}


def set_proxy(proxy: str | None) -> None:
    """Point this worker's environment at a proxy (or at none); clients built afterwards follow it."""
    for name in _PROXY_VARS:
        os.environ.pop(name, None)
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = ""
    if proxy:
        os.environ["HTTP_PROXY"] = os.environ["http_proxy"] = proxy


Call = Callable[[], "float | None"]  # one request; returns seconds to the first body byte when streamed


def requests_client(url: str, keepalive: bool, stream: bool, message: str) -> tuple[Call, Callable[[], None]]:
    import requests
    session = requests.Session() if keepalive else None
    target, body = url + "/v1/chat/completions", chat_body(stream, message)

    def call() -> float | None:
        t0 = time.perf_counter()
        with (session or requests).post(target, json=body, stream=stream, timeout=30) as resp:
            resp.raise_for_status()
            if not stream:
                _ = resp.content  # reads the whole body
                return None
            first = None
            for _ in resp.iter_content(None):
                first = first if first is not None else time.perf_counter() - t0
            return first
    return call, (session.close if session else lambda: None)


def openai_client(url: str, keepalive: bool, stream: bool, message: str,
                  model: str = "policy") -> tuple[Call, Callable[[], None]]:
    import httpx
    import openai
    http = None if keepalive else httpx.Client(limits=httpx.Limits(max_keepalive_connections=0))
    client = openai.OpenAI(base_url=url + "/v1", api_key="sk-bench", max_retries=0, http_client=http)
    messages = chat_body(False, message)["messages"]

    def call() -> float | None:
        t0 = time.perf_counter()
        if not stream:
            client.chat.completions.create(model=model, messages=messages)
            return None
        first = None
        for _ in client.chat.completions.create(model=model, messages=messages, stream=True):
            first = first if first is not None else time.perf_counter() - t0
        return first
    return call, client.close


def aiohttp_client(url: str, keepalive: bool, stream: bool, message: str) -> tuple[Call, Callable[[], None]]:
    import aiohttp
    loop = asyncio.new_event_loop()
    target, body = url + "/v1/chat/completions", chat_body(stream, message)

    async def open_session() -> aiohttp.ClientSession:
        return aiohttp.ClientSession(trust_env=True, connector=aiohttp.TCPConnector(force_close=not keepalive))
    session = loop.run_until_complete(open_session())

    async def one() -> float | None:
        t0 = time.perf_counter()
        async with session.post(target, json=body) as resp:
            resp.raise_for_status()
            if not stream:
                await resp.read()
                return None
            first = None
            async for _ in resp.content.iter_any():
                first = first if first is not None else time.perf_counter() - t0
            return first

    def close() -> None:
        loop.run_until_complete(session.close())
        loop.close()
    return (lambda: loop.run_until_complete(one())), close


def urllib_client(url: str, keepalive: bool, stream: bool, message: str) -> tuple[Call, Callable[[], None]]:
    import urllib.request
    if keepalive:
        raise NotImplementedError("urllib opens a new connection for every request")
    opener = urllib.request.build_opener()  # reads the proxy variables now
    data = json.dumps(chat_body(stream, message)).encode()

    def call() -> float | None:
        t0 = time.perf_counter()
        req = urllib.request.Request(url + "/v1/chat/completions", data=data,
                                     headers={"Content-Type": "application/json"})
        with opener.open(req, timeout=30) as resp:
            if not stream:
                resp.read()
                return None
            first = None
            while resp.read1(65536):
                first = first if first is not None else time.perf_counter() - t0
            return first
    return call, lambda: None


FACTORIES = {"requests": requests_client, "openai": openai_client, "aiohttp": aiohttp_client,
             "urllib": urllib_client}


def time_python_cell(client: str, url: str, cell: dict[str, Any]) -> dict[str, Any]:
    """Latencies (ms) of ``n`` calls after ``warmup`` untimed ones, stopping at the time budget."""
    set_proxy(cell.get("proxy"))
    message = cell.get("message") or MESSAGE
    factory = FACTORIES[client]
    if "model" in cell:
        factory = functools.partial(openai_client, model=cell["model"]) if client == "openai" else None
    if factory is None:
        raise NotImplementedError(f"{client} asks for model 'policy' only")
    call, close = factory(url, cell["keepalive"], cell["stream"], message)
    lat, ttfb = [], []
    try:
        for _ in range(cell.get("warmup", 0)):
            call()
        deadline = time.monotonic() + cell.get("budget_s", 60.0)
        start = time.perf_counter()
        for _ in range(cell["n"]):
            t0 = time.perf_counter()
            first = call()
            lat.append((time.perf_counter() - t0) * 1000)
            if first is not None:
                ttfb.append(first * 1000)
            if time.monotonic() > deadline:
                break
        wall = time.perf_counter() - start
    finally:
        close()
    return {"lat_ms": lat, "ttfb_ms": ttfb, "wall_s": wall}


def _curl_args(url: str, body_file: str, stream: bool) -> list[str]:
    args = ["-sS", "--fail", "-o", "/dev/null", "-w", "%{time_total} %{time_starttransfer}\\n",
            "-H", "Content-Type: application/json", "--data-binary", f"@{body_file}"]
    return args + (["-N"] if stream else []) + [url + "/v1/chat/completions"]


def _parse_curl(out: str) -> list[tuple[float, float]]:
    return [(float(a) * 1000, float(b) * 1000) for a, b in (line.split() for line in out.split("\n") if line)]


def time_curl_cell(url: str, cell: dict[str, Any]) -> dict[str, Any]:
    """curl times itself (``%{time_total}``), so process start-up is not counted."""
    set_proxy(cell.get("proxy"))
    env = dict(os.environ)
    stream, n, warmup = cell["stream"], cell["n"], cell.get("warmup", 0)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(chat_body(stream, cell.get("message") or MESSAGE), fh)
    try:
        start = time.perf_counter()
        if cell["keepalive"]:  # one curl, every transfer on the same connection
            args = ["curl"]
            for i in range(warmup + n):
                args += (["--next"] if i else []) + _curl_args(url, fh.name, stream)
            out = subprocess.run(args, env=env, capture_output=True, text=True, check=True,
                                 timeout=cell.get("budget_s", 60.0) + 30).stdout
            rows = _parse_curl(out)[warmup:]
        else:
            rows = []
            deadline = time.monotonic() + cell.get("budget_s", 60.0)
            for i in range(warmup + n):
                out = subprocess.run(["curl", *_curl_args(url, fh.name, stream)], env=env,
                                     capture_output=True, text=True, check=True, timeout=30).stdout
                if i >= warmup:
                    rows += _parse_curl(out)
                if time.monotonic() > deadline:
                    break
        wall = time.perf_counter() - start
    finally:
        os.unlink(fh.name)
    return {"lat_ms": [r[0] for r in rows], "ttfb_ms": [r[1] for r in rows] if stream else [],
            "wall_s": wall, "self_timed": True}


def run_cells(job: dict[str, Any]) -> dict[str, Any]:
    out = []
    for cell in job["cells"]:
        try:
            if job["client"] == "curl":
                result = time_curl_cell(job["url"], cell)
            else:
                result = time_python_cell(job["client"], job["url"], cell)
        except NotImplementedError as exc:
            result = {"skipped": str(exc)}
        except Exception as exc:  # one failing cell must not hide the others
            result = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        out.append({**cell, **result})
    return {"cells": out}


async def _concurrent(job: dict[str, Any]) -> dict[str, Any]:
    import openai
    set_proxy(job.get("proxy"))
    clients = [openai.AsyncOpenAI(base_url=job["url"] + "/v1", api_key="sk-bench", max_retries=0)
               for _ in range(job["clients"])]
    messages, model = chat_body(False)["messages"], job.get("model", "policy")
    for client in clients:  # connect before the clock starts
        await client.chat.completions.create(model=model, messages=messages)
    print("READY", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    calls, errors, budget = 0, 0, job.get("max_calls", 10**9)
    cpu_start = time.process_time()
    t_start = time.time()
    deadline = time.monotonic() + job["seconds"]

    async def loop(client: Any) -> None:
        nonlocal calls, errors
        while time.monotonic() < deadline and calls + errors < budget:
            try:
                await client.chat.completions.create(model=model, messages=messages)
                calls += 1
            except Exception:
                errors += 1
    await asyncio.gather(*(loop(c) for c in clients))
    t_end = time.time()
    cpu = time.process_time() - cpu_start
    for client in clients:
        await client.close()
    return {"calls": calls, "errors": errors, "t_start": t_start, "t_end": t_end, "cpu_s": cpu}


def main() -> int:
    job = json.loads(sys.stdin.readline())
    result = asyncio.run(_concurrent(job)) if job["kind"] == "concurrent" else run_cells(job)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
