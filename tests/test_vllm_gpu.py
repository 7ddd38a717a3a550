"""The same capture against a real vLLM OpenAI server: only where a CUDA GPU and vllm are present."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
import uuid

import pytest
import requests

from conftest import TESTS, agent_env, settled_flows, start_proxy


def _gpu_reason() -> str | None:
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed (scripts/bootstrap.sh test,train,vllm on a GPU machine)"
    import torch
    if not torch.cuda.is_available():
        return "no CUDA GPU on this machine"
    return None


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_gpu_reason() is not None, reason=str(_gpu_reason()))]


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    from rollouttap.trainer_hooks.tiny_model import build_tiny_model
    model = build_tiny_model()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path_factory.mktemp("vllm") / "vllm.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
                             "--served-model-name", "policy", "--host", "127.0.0.1", "--port", str(port),
                             "--enforce-eager", "--gpu-memory-utilization", "0.2", "--max-model-len", "2048",
                             "--enable-auto-tool-choice", "--tool-call-parser", "hermes"],
                            stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if requests.get(url + "/health", timeout=2).ok:
                break
        except requests.ConnectionError:
            pass
        assert proc.poll() is None, open(log.name).read()[-3000:]
        time.sleep(1)
    yield url
    proc.terminate()
    proc.wait(60)


def test_agent_through_proxy_gets_exact_ids_from_vllm(tmp_path, confdir, vllm_server):
    from rollouttap.manager.conversation import build_conversation
    from rollouttap.manager.rows import build_row
    with start_proxy(tmp_path / "r.db", confdir, model_hosts=(vllm_server.split("://")[1],)) as proxy:
        agent = "vllm-" + uuid.uuid4().hex[:8]
        out = subprocess.run([sys.executable, str(TESTS / "agent_clients.py"), "openai", vllm_server + "/v1",
                              "--stream", "--calls", "2"], env=agent_env(proxy, tag=agent),
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        calls = build_conversation(settled_flows(proxy.config.store, agent_id=agent)).calls
    assert len(calls) == 2 and all(c.prompt_token_ids and c.completion_token_ids for c in calls)
    from rollouttap.trainer_hooks.tiny_model import build_tokenizer
    row, fidelity = build_row(calls, eos_token_id=build_tokenizer().eos_token_id)
    assert fidelity.calls_without_ids == 0 and fidelity.trainable_tokens > 0
