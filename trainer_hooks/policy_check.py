"""Whether the agents sample from the model TRL trains: the generation settings of a GRPOConfig against the
model server the AgentManager's agents call.

With ``rollout_func`` TRL generates nothing itself; with ``use_vllm`` it still pushes the new weights into its
vLLM after each step. The agents must call that same server, or they sample from weights that never change
and the run trains off-policy without a sign of it: TRL 1.16's default ``vllm_mode="colocate"`` keeps vLLM
inside the trainer process, where no agent can reach it, and a server-mode URL that is not the agents'
``model_url`` updates a server they do not call.
"""

from __future__ import annotations

import socket
from typing import Any
from urllib.parse import urlsplit

import psutil

from rollouttap.addon.loopback import is_any_address, is_loopback, resolve_host
from rollouttap.errors import ConfigError
from rollouttap.manager.bypass import normalise_ip


def check_generation(args: Any, model_url: str | None) -> str | None:
    """Raise ConfigError when the agents cannot sample from the weights TRL updates (colocated vLLM); a
    warning's text when they seem to call another server than the one TRL syncs; else None."""
    if not getattr(args, "use_vllm", False):
        return None  # the trainer's own model: served to the agents by PolicyServer, or by the user's choice
    mode = getattr(args, "vllm_mode", None)
    if mode == "colocate":
        raise ConfigError(
            "GRPOConfig(use_vllm=True) runs vLLM in colocate mode (TRL's default) inside each trainer process: "
            "agents, in processes of their own, cannot call it, yet TRL loads it and syncs every step's weights "
            "into it, and unless model_url is a PolicyServer the agents sample from a model that is not trained. "
            "Use vllm_mode='server' with vllm_server_base_url at the server AgentManager(model_url=...) names "
            "(`trl vllm-serve`), or use_vllm=False with PolicyServer; agent_rollout(..., check_policy=False) skips "
            "this check")
    if mode != "server" or not model_url:
        return None
    synced = args.vllm_server_base_url or f"http://{args.vllm_server_host}:{args.vllm_server_port}"
    if same_server(synced, model_url) is False:
        return (f"TRL syncs weights into the vLLM server at {synced}, but the agents call {model_url}: unless both "
                "reach the same server, agents sample from weights that are not trained")
    return None


def same_server(a: str, b: str) -> bool | None:
    """Whether two URLs name one server (port and address); None when a name does not resolve."""
    pa, pb = urlsplit(a), urlsplit(b)
    if _port(pa.scheme, pa.port) != _port(pb.scheme, pb.port):
        return False
    addresses_a, addresses_b = _addresses(pa.hostname or ""), _addresses(pb.hostname or "")
    if addresses_a is None or addresses_b is None:
        return None
    return bool(addresses_a & addresses_b)


def _port(scheme: str, port: int | None) -> int:
    return port if port is not None else (443 if scheme == "https" else 80)


def _addresses(host: str) -> set[str] | None:
    """The addresses ``host`` stands for, this host's own named as one ("this host"); None if unresolved."""
    found = resolve_host(host or "localhost")
    if not found:
        return None
    own = _own_addresses()
    return {"this host" if _is_this_host(address, own) else address for address in found}


def _is_this_host(address: str, own: set[str]) -> bool:
    ip = normalise_ip(address)  # IPv4-mapped as IPv4, a link-local address's interface dropped
    return is_loopback(ip) or is_any_address(ip) or ip in own  # 0.0.0.0 (TRL's default host): here


def _own_addresses() -> set[str]:
    """Every address of this host's interfaces (a node's vLLM URL may name it by any of them)."""
    return {a.address.split("%", 1)[0] for addrs in psutil.net_if_addrs().values() for a in addrs
            if a.family in (socket.AF_INET, socket.AF_INET6)}
