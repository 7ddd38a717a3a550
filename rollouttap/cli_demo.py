"""``rollouttap demo``: the README's main job."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer

AGENT = """
import json, os, urllib.request
base = os.environ["OPENAI_BASE_URL"]
for turn in range(2):
    body = {"model": "policy", "messages": [{"role": "user", "content": f"hello #{turn}"}]}
    req = urllib.request.Request(base + "/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    print(json.load(urllib.request.urlopen(req))["choices"][0]["message"]["content"])
"""


def demo(store: Annotated[Optional[Path], typer.Option(help="Store file (default: a temp dir).")] = None,
         ) -> None:
    """Start the proxy and a scripted model server, run a sample agent through it, show what was captured."""
    from rollouttap.manager.proxy import ProxyConfig, ProxyProcess
    from rollouttap.store import Store
    from rollouttap.testing.upstream import ScriptedUpstream
    store = store or Path(tempfile.mkdtemp(prefix="rollouttap-demo-")) / "runs.db"
    with ScriptedUpstream() as upstream:
        host = upstream.url.split("://", 1)[1]
        with ProxyProcess(ProxyConfig(store=store, model_hosts=(host,))) as proxy:
            env = {**__import__("os").environ, **proxy.env(),
                   "ROLLOUTTAP_AGENT_ID": "demo-agent", "OPENAI_BASE_URL": upstream.base_url}
            subprocess.run([sys.executable, "-c", AGENT], env=env, check=True)
    with Store(store) as s:
        for flow in s.flows(agent_id="demo-agent"):
            body = flow.response_json() or {}
            typer.echo(json.dumps({"agent": flow.agent_id, "by": flow.attribution, "path": flow.path,
                                   "state": flow.state,
                                   "prompt_token_ids": len(body.get("prompt_token_ids") or [])}))
    typer.echo(f"store: {store}", err=True)


def register(app: typer.Typer) -> None:
    app.command()(demo)
