"""Shared fixtures: a real mitmdump with the addon, a scripted vLLM-shaped upstream, process helpers.

The model server in these tests is rollouttap.testing.upstream.ScriptedUpstream: a scripted server that
speaks vLLM's OpenAI-compatible JSON (return_token_ids, logprobs, SSE), not a real model.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from rollouttap.manager.proxy import ProxyConfig, ProxyProcess
from rollouttap.store import Store

TESTS = Path(__file__).parent
CLIENTS = TESTS / "agent_clients.py"


@pytest.fixture(scope="session")
def confdir(tmp_path_factory) -> Path:
    """One mitmproxy CA for the whole session (generating it takes a moment)."""
    return tmp_path_factory.mktemp("mitmproxy-conf")


@pytest.fixture(scope="module")
def upstream():
    from rollouttap.testing.upstream import ScriptedUpstream
    with ScriptedUpstream() as server:
        yield server


def start_proxy(store: Path, confdir: Path, **kwargs) -> ProxyProcess:
    return ProxyProcess(ProxyConfig(store=store, confdir=confdir, **kwargs)).start()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory, confdir, upstream):
    """A real mitmdump + addon recording into its own store; the upstream is a model host."""
    store = tmp_path_factory.mktemp("store") / "runs.db"
    host = upstream.url.split("://", 1)[1]
    with start_proxy(store, confdir, model_hosts=(host,)) as proc:
        yield proc


def agent_env(proxy: ProxyProcess, agent_id: str | None = None, token: str | None = None,
              tag: str | None = None, **extra: str) -> dict[str, str]:
    """The caller's environment plus the proxy's variables; ``tag`` sets ROLLOUTTAP_AGENT_ID alone."""
    env = {k: v for k, v in os.environ.items() if k != "ROLLOUTTAP_AGENT_ID"}
    env.update(proxy.env(agent_id, token))
    if agent_id is None or token is None:
        env.pop("ROLLOUTTAP_AGENT_ID", None)
    if tag is not None:
        env["ROLLOUTTAP_AGENT_ID"] = tag
    env.update(extra)
    return env


def run_client(client: str, base_url: str, env: dict[str, str], *args: str) -> list[str]:
    out = subprocess.run([sys.executable, str(CLIENTS), client, base_url, *args], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.splitlines()


def ctrl_c_as_from_a_terminal() -> None:
    """``preexec_fn`` for a program a test sends SIGINT as a user's Ctrl-C: SIGINT at its default, whatever the test
    run inherited (a job a script starts in the background has it ignored, and Python then raises no
    KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for(condition: Callable[[], object], timeout: float = 10.0, what: str = "condition"):
    """Poll until condition() is truthy; the value is returned. No fixed sleeps in tests."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def running_agents(store_path: Path, count: int, timeout: float = 60.0) -> list:
    """The store's agents once it holds ``count`` of them, all running (started by another process)."""
    wait_for(store_path.exists, timeout=timeout, what="the store")
    with Store(store_path) as store:
        def all_running():
            agents = store.agents()
            return agents if len(agents) == count and all(a.status == "running" for a in agents) else None
        return wait_for(all_running, timeout=timeout, what=f"{count} running agents")


def settled_flows(store_path: Path, timeout: float = 10.0, **filters):
    """Flows matching filters once none of them is open any more."""
    with Store(store_path) as store:
        def ready():
            flows = store.flows(**filters)
            return flows if flows and all(f.state != "open" for f in flows) else None
        return wait_for(ready, timeout, f"settled flows {filters}")


LISTENING_RE = re.compile(r"proxy listening at 127\.0\.0\.1:(\d+)")


def output_lines(proc: subprocess.Popen) -> queue.Queue:
    """A process's text output, line by line, read by a thread (None once it ends)."""
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)
    threading.Thread(target=pump, daemon=True).start()
    return lines


def wait_line(lines: queue.Queue, pattern: re.Pattern, timeout: float) -> re.Match:
    """The first line of ``output_lines`` matching ``pattern``; fails with the output seen so far."""
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            break
        seen.append(line)
        if match := pattern.search(line):
            return match
    raise AssertionError(f"no line matching {pattern.pattern!r} in mitmdump's output:\n{''.join(seen)[-3000:]}")
