"""Agent Lightning's gateway (agentlightning 1.0 ``agl-server``: its LLM proxy and store) as its users run it, for
bench/peer_proxies.py.

Run with bench/.peers-venv's python: ``agl_proxy.py PORT UPSTREAM_URL``. It serves Agent Lightning's own app
(``create_app``) with its default proxy settings (train mode: it asks the model server for token ids and
logprobs and records each call as an event of the rollout; it refuses streamed requests), under an API key,
then registers the upstream as its model server and creates one rollout through its own API (what a trainer
registers), under attempt "0" as its controllers name a first attempt. One setting differs from ``agl-server``:
uvicorn's access log is off (``log_level="warning"``), which saves it formatting and writing a line per call: in
its favour.
Prints ``READY <path prefix>`` (the rollout the clients call under) once it answers; on SIGTERM or SIGINT,
``SPANS <n>`` (the events it recorded for that rollout), then stops.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import httpx
import uvicorn
from agentlightning.server.app import create_app
from agentlightning.server.store import _events  # its in-memory store: what it recorded per rollout and attempt

MODEL = "policy"
KEY = "sk-bench"  # the bench's openai clients send it


async def main(port: int, upstream: str) -> None:
    config = {"host": "127.0.0.1", "port": port, "key": KEY,
              "default_proxy": {"model_name": MODEL, "include_log_probs": True, "include_routed_experts": False,
                                "train": {"temperature": 1}, "val": {"temperature": 0.7}}}
    server = uvicorn.Server(uvicorn.Config(create_app(config), host="127.0.0.1", port=port, workers=1,
                                           timeout_keep_alive=120, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    while not server.started:
        if serving.done():
            serving.result()  # raises why it did not start, if it raised
            raise RuntimeError("Agent Lightning's server stopped before it started (see its log above)")
        await asyncio.sleep(0.05)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    api = f"http://127.0.0.1:{port}/api"
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {KEY}"}, trust_env=False) as client:
        (await client.post(f"{api}/models", json=[{"model": MODEL, "endpoint": upstream + "/v1"}])).raise_for_status()
        made = await client.post(f"{api}/rollouts", json=[{"input": {"prompt": "bench"}}])
        made.raise_for_status()
        rollout_id = made.json()[0]["rollout_id"]
        print(f"READY /proxy/rollout/{rollout_id}/attempt/0/mode/train/openai", flush=True)
        await stop.wait()
    print(f"SPANS {sum(len(events) for events in _events.get(rollout_id, {}).values())}", flush=True)
    server.should_exit = True
    await serving


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
