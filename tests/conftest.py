"""Shared fixtures: a real mitmdump with the addon, a scripted vLLM-shaped upstream, process helpers.

The model server in these tests is rollouttap.testing.upstream.ScriptedUpstream: a scripted server that
speaks vLLM's OpenAI-compatible JSON (return_token_ids, logprobs, SSE), not a real model.
"""

from __future__ import annotations

import os
import subprocess
import sys
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


def settled_flows(store_path: Path, timeout: float = 10.0, **filters):
    """Flows matching filters once none of them is open any more."""
    with Store(store_path) as store:
        def ready():
            flows = store.flows(**filters)
            return flows if flows and all(f.state != "open" for f in flows) else None
        return wait_for(ready, timeout, f"settled flows {filters}")
