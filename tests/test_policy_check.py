"""The agents must sample from the model TRL trains: GRPOConfig's generation settings against the manager's
model_url (real GRPOConfig objects; TRL itself needs vLLM installed to build a trainer with use_vllm)."""

from __future__ import annotations

import logging
import socket
import warnings
from types import SimpleNamespace

import psutil
import pytest

pytest.importorskip("trl")

from trl import GRPOConfig  # noqa: E402

from rollouttap.errors import ConfigError  # noqa: E402
from rollouttap.trainer_hooks.policy_check import check_generation, same_server  # noqa: E402
from rollouttap.trainer_hooks.rollout import agent_rollout  # noqa: E402


def _config(tmp_path, **kwargs) -> GRPOConfig:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to="none",
                          gradient_checkpointing=False, **kwargs)


def test_colocated_vllm_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="colocate mode .* vllm_mode='server'"):
        check_generation(_config(tmp_path, use_vllm=True), "http://127.0.0.1:8000/v1")


@pytest.mark.parametrize("server, model_url, warned", [
    ({"vllm_server_base_url": "http://127.0.0.1:8000"}, "http://127.0.0.1:8000/v1", False),
    ({"vllm_server_base_url": "http://localhost:8000"}, "http://127.0.0.1:8000/v1", False),
    ({}, "http://127.0.0.1:8000/v1", False),  # TRL's defaults: 0.0.0.0:8000, this host
    ({}, f"http://{socket.gethostname()}:8000/v1", False),  # this host by its name
    ({"vllm_server_base_url": "http://127.0.0.1:8000"}, "http://127.0.0.1:8001/v1", True),
    ({"vllm_server_port": 9000}, "http://127.0.0.1:8000/v1", True),
])
def test_server_mode_warns_when_the_agents_call_another_server(tmp_path, server, model_url, warned):
    warning = check_generation(_config(tmp_path, use_vllm=True, vllm_mode="server", **server), model_url)
    assert (warning is not None) == warned
    if warned:
        assert "agents sample from weights that are not trained" in warning


def _interface_address() -> str | None:
    """An IPv4 address of this host's own other than loopback (a node's address as other nodes reach it)."""
    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return a.address
    return None


def test_this_host_is_one_server_by_any_of_its_addresses():
    address = _interface_address()
    if address is None:
        pytest.skip("this host has no interface address but loopback")
    assert same_server("http://0.0.0.0:8000", f"http://{address}:8000/v1") is True
    assert same_server(f"http://{address}:8000", "http://127.0.0.1:8000/v1") is True
    assert same_server("http://[::ffff:127.0.0.1]:8000", "http://localhost:8000/v1") is True
    assert same_server(f"http://{address}:8000", "http://127.0.0.1:8001/v1") is False
    assert same_server("http://192.0.2.123:8000", "http://127.0.0.1:8000/v1") is False  # TEST-NET: not here


def test_without_vllm_nothing_is_checked(tmp_path):
    assert check_generation(_config(tmp_path), "http://127.0.0.1:1/v1") is None


def test_an_unresolvable_name_is_not_judged():
    assert same_server("http://no-such-host.invalid:8000", "http://127.0.0.1:8000/v1") is None
    assert same_server("http://no-such-host.invalid:8000", "http://127.0.0.1:8001/v1") is False  # the port tells


def test_agent_rollout_refuses_colocated_vllm_before_any_agent_runs(tmp_path):
    deployed = []
    manager = SimpleNamespace(model_url="http://127.0.0.1:8000/v1", eos_token_id=2, deploy=deployed.append)
    trainer = SimpleNamespace(args=_config(tmp_path, use_vllm=True))
    with pytest.raises(ConfigError, match="colocate"):
        agent_rollout(manager)(["hi"], trainer)
    assert deployed == []


def test_agent_rollout_logs_the_server_mismatch(tmp_path, caplog):
    manager = SimpleNamespace(model_url="http://127.0.0.1:8001/v1", eos_token_id=2, deploy=lambda prompts: [])
    trainer = SimpleNamespace(args=_config(tmp_path, use_vllm=True, vllm_mode="server",
                                           vllm_server_base_url="http://127.0.0.1:8000"))
    with caplog.at_level(logging.WARNING, logger="rollouttap.trainer_hooks.rollout"):
        rollout = agent_rollout(manager, eos_token_id=2)
        rollout([], trainer)
        rollout([], trainer)
    assert sum("agents call http://127.0.0.1:8001/v1" in r.message for r in caplog.records) == 1  # once


def test_only_the_main_process_warns(tmp_path, caplog):
    # TRL syncs weights into the server named on the main process: other nodes name it by another address.
    manager = SimpleNamespace(model_url="http://127.0.0.1:8001/v1", eos_token_id=2, deploy=lambda prompts: [])
    trainer = SimpleNamespace(args=_config(tmp_path, use_vllm=True, vllm_mode="server",
                                           vllm_server_base_url="http://127.0.0.1:8000"),
                              accelerator=SimpleNamespace(is_main_process=False, num_processes=1))
    with caplog.at_level(logging.WARNING, logger="rollouttap.trainer_hooks.rollout"):
        agent_rollout(manager, eos_token_id=2)([], trainer)
    assert not caplog.records


def test_the_check_can_be_skipped(tmp_path):
    deployed = []
    manager = SimpleNamespace(model_url="http://127.0.0.1:8000/v1", eos_token_id=2,
                              deploy=lambda prompts: deployed.append(prompts) or [])
    colocated = SimpleNamespace(args=_config(tmp_path, use_vllm=True))
    agent_rollout(manager, eos_token_id=2, check_policy=False)([], colocated)
    assert deployed == [[]]
