"""Agent Lightning's LLM proxy (agentlightning 0.3 ``LLMProxy``) as its users start it, for bench/peer_proxies.py.

Run with bench/.peers-venv's python: ``agl_proxy.py PORT NAME=UPSTREAM_URL ...`` (one model name per upstream).
Its default middlewares (rollout/attempt routing, stream conversion) and callbacks (token ids, OpenTelemetry
spans into its store) stay on: that is what it records a rollout with. The store is its in-memory one, behind
its thread-safe wrapper (the proxy serves from a thread of this process). Prints ``READY <path prefix>`` (the
rollout and attempt the clients call under) once it answers; on SIGTERM or SIGINT, ``SPANS <n>`` (what it
recorded for that attempt), then stops.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from agentlightning.llm_proxy import LLMProxy
from agentlightning.store.memory import InMemoryLightningStore
from agentlightning.store.threading import LightningStoreThreaded
from agentlightning.utils.server_launcher import PythonServerLauncherArgs


async def main(port: int, models: dict[str, str]) -> None:
    store = LightningStoreThreaded(InMemoryLightningStore())
    attempted = await store.start_rollout(input={"prompt": "bench"})
    model_list = [{"model_name": name, "litellm_params": {"model": "hosted_vllm/policy", "api_base": url + "/v1",
                                                          "api_key": "sk-bench"}} for name, url in models.items()]
    # Its default health check (/health) needs the master key that LiteLLM 1.108 insists on; /health/liveliness
    # does not. Everything else is LLMProxy's default.
    launcher = PythonServerLauncherArgs(port=port, host="127.0.0.1", launch_mode="thread",
                                        healthcheck_url="/health/liveliness", startup_timeout=60.0)
    proxy = LLMProxy(store=store, model_list=model_list, launcher_args=launcher)  # type: ignore[arg-type]
    await proxy.start()
    print(f"READY /rollout/{attempted.rollout_id}/attempt/{attempted.attempt.attempt_id}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    spans = await store.query_spans(attempted.rollout_id)
    print(f"SPANS {len(spans)}", flush=True)
    await proxy.stop()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), dict(arg.split("=", 1) for arg in sys.argv[2:])))
