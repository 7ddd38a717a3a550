"""Agent programs and entry points for the manager tests. Standard library only at import time: every agent
is a fresh interpreter, and the cheaper it starts the more of them two cores run at once.

As a command: ``python manager_support.py "ACTION ARGS..."`` (one argument, split like a shell would), e.g.
``chat 2 @id`` (two model calls whose user message says the marker; ``@id`` is the agent's id),
``fork 3 @id``, ``crash``, ``hang``, ``nothing``, ``retry @id 30``, ``direct``, ``aiohttp @id``,
``aiohttp @id trust-env``, ``requests @id``. The model's base URL comes from OPENAI_BASE_URL, as the manager sets it.
"""

from __future__ import annotations

import http.client
import json
import os
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

HERE = os.path.abspath(__file__)


def _marker(text: str) -> str:
    return text.replace("@id", os.environ.get("ROLLOUTTAP_AGENT_ID", "no-agent-id"))


def _body(marker: str) -> bytes:
    return json.dumps({"model": "policy", "messages": [{"role": "user", "content": f"say {marker}"}]}).encode()


def _reply(raw: bytes) -> str:
    return json.loads(raw)["choices"][0]["message"]["content"] or ""


def call_urllib(marker: str) -> str:
    """One chat call with urllib, through whatever proxy the environment names."""
    req = urllib.request.Request(os.environ["OPENAI_BASE_URL"] + "/chat/completions", data=_body(marker),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return _reply(resp.read())


def chat(calls: str, marker: str) -> None:
    for _ in range(int(calls)):
        print(call_urllib(_marker(marker)), flush=True)


def fork(children: str, marker: str) -> None:
    """Children (separate processes) call the model too; then the parent does."""
    procs = [subprocess.Popen([sys.executable, HERE, f"chat 1 {marker}-child{i}"]) for i in range(int(children))]
    codes = [p.wait(60) for p in procs]
    if any(codes):
        sys.exit(f"a child failed: {codes}")
    chat("1", marker)


def crash() -> None:
    raise RuntimeError("agent exploded on purpose")


def _say_line(text: str) -> None:
    # One write() per line: three processes share this stdout, and print() may split a line.
    os.write(1, (text + "\n").encode())


def hang() -> None:
    """A child, and an orphaned grandchild in its own session (double fork + setsid); then wait forever."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    _say_line(f"PID {child.pid}")
    middle = os.fork()
    if middle == 0:
        os.setsid()
        if os.fork() == 0:
            _say_line(f"PID {os.getpid()} setsid")
            time.sleep(600)
        os._exit(0)
    os.waitpid(middle, 0)
    _say_line(f"PID {os.getpid()} root")
    time.sleep(600)


def retry(marker: str, seconds: str) -> None:
    """One call, retried on connection errors (the proxy may be restarting) until the deadline."""
    deadline = time.monotonic() + float(seconds)
    while True:
        try:
            print(call_urllib(_marker(marker)), flush=True)
            return
        except (urllib.error.URLError, ConnectionError, http.client.HTTPException) as exc:
            if time.monotonic() > deadline:
                raise
            print("retrying after", exc, file=sys.stderr, flush=True)
            time.sleep(0.1)


def direct(hold: str = "1.5") -> None:
    """Talk to the model server directly, ignoring the proxy, and keep the connection open a while."""
    url = urlsplit(os.environ["OPENAI_BASE_URL"])
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    conn.request("POST", url.path + "/chat/completions", body=_body("direct"),
                 headers={"Content-Type": "application/json"})
    print(_reply(conn.getresponse().read()), flush=True)
    time.sleep(float(hold))
    conn.close()


def aiohttp_call(marker: str, trust_env: str = "no") -> None:
    """aiohttp without trust_env ignores HTTP_PROXY, so only base-URL mode captures it; with ``trust-env`` it
    sends the base URL through HTTP_PROXY all the same (it matches NO_PROXY=localhost:PORT by host only)."""
    import asyncio

    import aiohttp

    async def go() -> str:
        async with aiohttp.ClientSession(trust_env=trust_env == "trust-env") as session:
            async with session.post(os.environ["OPENAI_BASE_URL"] + "/chat/completions",
                                    data=_body(_marker(marker)),
                                    headers={"Content-Type": "application/json"}) as resp:
                resp.raise_for_status()
                return _reply(await resp.read())
    print(asyncio.run(go()), flush=True)


def requests_call(marker: str) -> None:
    import requests
    with requests.Session() as session:
        resp = session.post(os.environ["OPENAI_BASE_URL"] + "/chat/completions", data=_body(_marker(marker)),
                            headers={"Content-Type": "application/json"}, timeout=30)
        resp.raise_for_status()
        print(_reply(resp.content), flush=True)


def _other_agents_proxy(mine: str) -> str | None:
    """HTTP_PROXY (with its credentials) from the environment of another agent of this proxy, read as any
    process of the same user can read it."""
    own = os.environ["HTTP_PROXY"].rpartition("@")[2].encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        except OSError:
            continue
        tag, proxy = env.get(b"ROLLOUTTAP_AGENT_ID"), env.get(b"HTTP_PROXY")
        if tag and proxy and tag.decode() != mine and proxy.rpartition(b"@")[2] == own:
            return proxy.decode()
    return None


def steal(done: str) -> None:
    """Call the model with another live agent's proxy credentials; print the status; then touch ``done``."""
    mine, deadline = os.environ["ROLLOUTTAP_AGENT_ID"], time.monotonic() + 30
    while (stolen := _other_agents_proxy(mine)) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": stolen}))
        req = urllib.request.Request(os.environ["OPENAI_BASE_URL"] + "/chat/completions", data=_body("stolen"),
                                     headers={"Content-Type": "application/json"})
        with opener.open(req, timeout=30) as resp:
            print("status", resp.status, flush=True)
    except urllib.error.HTTPError as exc:
        print("status", exc.code, flush=True)
    finally:
        open(done, "w").close()


def await_file(path: str) -> None:
    """Stay alive (no calls) until ``path`` exists, at most 30 s."""
    deadline = time.monotonic() + 30
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)


ACTIONS = {"chat": chat, "fork": fork, "crash": crash, "hang": hang, "nothing": lambda: print("no calls"),
           "retry": retry, "direct": direct, "aiohttp": aiohttp_call, "requests": requests_call, "steal": steal,
           "await": await_file}


# -- entry points (run by rollouttap.manager.runner_entry in a fresh interpreter) ---------------------------
def entry_chat(prompt: str) -> dict:
    """Call the model once with the prompt's marker; return the reply and this process's pid."""
    return {"reply": call_urllib(_marker(prompt)), "pid": os.getpid(), "prompt": prompt}


def entry_raise(prompt: str) -> None:
    raise ValueError(f"entry point refused {prompt!r}")


async def entry_async(prompt: list) -> dict:
    return {"messages": len(prompt)}


def main(argv: list[str]) -> None:
    action, *args = shlex.split(argv[0])
    ACTIONS[action](*args)


if __name__ == "__main__":
    main(sys.argv[1:])
