"""Markdown for bench/RESULTS.md: the header (machine, versions, date, command) and tables."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

PACKAGES = ("mitmproxy", "requests", "urllib3", "httpx", "openai", "aiohttp", "psutil")


@dataclass(frozen=True)
class Section:
    """One benchmark's part of the report."""
    key: str
    title: str
    body: str
    data: dict[str, Any] = field(default_factory=dict)
    status: str = "ok"  # ok | skipped | error


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _curl_version() -> str:
    try:
        return subprocess.run(["curl", "--version"], capture_output=True, text=True,
                              timeout=5).stdout.split("\n")[0].split()[1]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "not found"


def speed_probe(reps: int = 5) -> str:
    """How fast this host is now, to compare runs (a shared VM's speed varies between runs and within one): a
    pure-Python loop, and a bare start of this interpreter (an agent's, a proxy's or a client's start is one)."""
    loop, start = [], []
    for _ in range(reps):
        began = time.perf_counter()
        sum(range(3_000_000))
        loop.append(time.perf_counter() - began)
        began = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True, timeout=60)
        start.append(time.perf_counter() - began)
    return (f"Python loop {statistics.median(loop) * 1e3:.1f} ms, interpreter start "
            f"{statistics.median(start) * 1e3:.1f} ms (medians of {reps})")


def with_end_probe(facts: dict[str, str]) -> dict[str, str]:
    """``facts`` with the speed probe taken at the end of the run beside the one taken at its start."""
    out: dict[str, str] = {}
    for key, value in facts.items():
        out[key] = value
        if key == "host speed at start":
            out["host speed at end"] = speed_probe()
    return out


def machine_facts() -> dict[str, str]:
    """What the figures depend on: CPU, cores, kernel, Python and package versions, load."""
    load = os.getloadavg()
    facts = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": f"{_cpu_model()}, {os.cpu_count()} cores",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load average at start": f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
        "host speed at start": speed_probe(),
        "curl": _curl_version(),
    }
    facts.update({name: _version(name) for name in PACKAGES})
    return facts


def header(command: str, mode: str, facts: dict[str, str], note: str | None) -> str:
    """The top of RESULTS.md."""
    lines = ["# rollouttap benchmarks", "",
             f"Written by `bench/run.py` ({mode} mode). Reproduce with:", "", "```", command, "```", ""]
    if note:
        lines += [f"> **Note:** {note}", ""]
    lines += [table(["", ""], [(k, v) for k, v in facts.items()]), ""]
    lines += ["Figures are medians over repeated runs with the lowest and highest run in brackets: "
              "`median (low–high)`. Latencies are milliseconds per request as the client sees it. "
              "The upstream is `python -m rollouttap.testing.upstream --memo` (a scripted vLLM-shaped server) "
              "in its own process; every proxy and every client runs in its own process too. `--memo`: it "
              "answers a repeated request with the bytes of its first answer, so the rows measure the proxy, "
              "not the fake model (building an answer with token ids and logprobs costs it more CPU than a "
              "proxy's whole path; section 7 gives both figures).", ""]
    return "\n".join(lines)


def document(head: str, sections: Sequence[Section]) -> str:
    """The whole report."""
    parts = [head]
    for section in sections:
        status = "" if section.status == "ok" else f" ({section.status})"
        parts += [f"## {section.title}{status}", "", section.body.strip(), ""]
    return "\n".join(parts)
