"""Raising the soft open-file limit to the hard one: the addon, in a real mitmdump started under a low soft limit,
serves more agent connections at once than that limit would let it hold, and AgentManager starts more agents at
once than their pipes and files would fit in it."""

from __future__ import annotations

import os
import re
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from conftest import LISTENING_RE, output_lines, wait_line
from rollouttap.addon import fd_limit
from rollouttap.manager.proxy import ProxyConfig, ProxyProcess

MITMDUMP = [sys.executable, "-c", "from mitmproxy.tools.main import mitmdump; mitmdump()"]
LOW = 128  # the soft limit the proxy is started with
CONNECTIONS = 150  # agent connections held open at once: with their upstream ones, well past LOW

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="/proc/PID/limits is Linux's")


def _hard() -> int:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return hard if hard != resource.RLIM_INFINITY else 1 << 20


def _low_soft_limit() -> None:  # runs in the child before exec
    resource.setrlimit(resource.RLIMIT_NOFILE, (LOW, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))


def soft_limit_of(pid: int) -> int:
    with open(f"/proc/{pid}/limits") as f:
        line = next(line for line in f if line.startswith("Max open files"))
    return int(line.split()[3])


# mitmdump exits if an error is logged before its startup ends, which runs on past "listening": the control's
# first refused accept (EMFILE) in that window stopped it (seen once in CI). The storm waits for this line.
STARTED = "test: mitmdump is past its startup check"
STARTED_RE = re.compile(re.escape(STARTED))
_STARTED_ADDON = f"""
import asyncio, logging
from mitmproxy import ctx

class Started:
    async def running(self):
        self.task = asyncio.create_task(self.announce())

    async def announce(self):
        check = ctx.master.addons.get("errorcheck")
        while check.logger in logging.getLogger().handlers:  # it uninstalls its handler once startup is over
            await asyncio.sleep(0.01)
        print({STARTED!r}, flush=True)

addons = [Started()]
"""


@contextmanager
def low_limit_mitmdump(tmp_path, addon: bool) -> Iterator[tuple[int, int]]:
    started = tmp_path / "started.py"
    started.write_text(_STARTED_ADDON)
    args = [*MITMDUMP, "--listen-host", "127.0.0.1", "--listen-port", "0", "--set", f"confdir={tmp_path}",
            "--set", "flow_detail=0", "-s", str(started), *(["-s", fd_limit.__file__] if addon else [])]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, preexec_fn=_low_soft_limit)
    try:
        lines = output_lines(proc)  # read on by a thread: the storm's log lines never fill the pipe
        port = int(wait_line(lines, LISTENING_RE, 60).group(1))
        wait_line(lines, STARTED_RE, 60)
        yield proc.pid, port
    finally:
        proc.kill()
        proc.wait()


def reached_upstream(port: int, upstream: socket.socket, n: int, wait: float = 10.0) -> int:
    """Hold ``n`` agent connections to the proxy open, each with a request to ``upstream`` (which never answers, so
    the proxy keeps both sides open): how many of those requests reach it within ``wait`` seconds."""
    upstream_port = upstream.getsockname()[1]
    request = f"GET http://127.0.0.1:{upstream_port}/ HTTP/1.1\r\nHost: 127.0.0.1:{upstream_port}\r\n\r\n".encode()
    agents = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
    arrived: list[socket.socket] = []
    try:
        for agent in agents:
            agent.sendall(request)
        deadline = time.monotonic() + wait
        while len(arrived) < n and (left := deadline - time.monotonic()) > 0:
            upstream.settimeout(left)
            try:
                arrived.append(upstream.accept()[0])
            except TimeoutError:
                break
        return len(arrived)
    finally:
        for s in agents + arrived:
            s.close()


@pytest.fixture
def upstream() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0), backlog=1024) as server:
        yield server


def test_the_addon_raises_the_soft_limit_and_serves_past_it(tmp_path, upstream):
    if _hard() < 4 * CONNECTIONS:
        pytest.skip("the hard open-file limit is too low to tell")
    with low_limit_mitmdump(tmp_path, addon=True) as (pid, port):
        assert soft_limit_of(pid) == _hard()
        assert reached_upstream(port, upstream, CONNECTIONS) == CONNECTIONS


def test_without_it_the_low_limit_stands_and_requests_wait(tmp_path, upstream):
    # The control: the same connections overrun the soft limit the proxy was started with.
    with low_limit_mitmdump(tmp_path, addon=False) as (pid, port):
        assert soft_limit_of(pid) == LOW
        assert reached_upstream(port, upstream, CONNECTIONS, wait=3.0) < CONNECTIONS


def test_the_rollouttap_proxy_loads_it(tmp_path):
    proxy = ProxyProcess(ProxyConfig(store=tmp_path / "s.db", confdir=tmp_path / "conf"))
    proxy.start(timeout=60)
    try:
        assert proxy.proc is not None and soft_limit_of(proxy.proc.pid) == _hard()
    finally:
        proxy.stop()


_DEPLOY = """
import resource, sys, tempfile
from collections import Counter
from pathlib import Path
resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
import rollouttap.manager.manager as manager
from rollouttap.manager.agents import CommandAgent
if sys.argv[1] == "off":
    manager.raise_fd_limit = lambda: (64, 64)
work = Path(tempfile.mkdtemp())
agent = CommandAgent(["sh", "-c", "sleep 0.5; echo {prompt}"])
with manager.AgentManager(agent, store=work / "s.db", parallel=40, confdir=work / "conf") as m:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    statuses = Counter(r.status for r in m.deploy([f"p{i}" for i in range(40)], timeout=60))
print(soft, statuses["ok"], flush=True)
"""


@pytest.mark.parametrize("raised", [True, False])
def test_agent_manager_runs_more_agents_at_once_than_a_low_soft_limit_allows(raised, tmp_path):
    if _hard() < 1024:
        pytest.skip("the hard open-file limit is too low to tell")
    # TMPDIR: the control's starved agents leave run folders that no rmtree could open.
    out = subprocess.run([sys.executable, "-c", _DEPLOY, "on" if raised else "off"], capture_output=True, text=True,
                         timeout=180, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    soft, ok = map(int, out.stdout.split()[-2:])
    if raised:
        assert (soft, ok) == (_hard(), 40), out.stderr[-2000:]
    else:  # the control: 40 agents' pipes and files overrun a soft limit of 64
        assert soft == 64 and ok < 40


_REMOVE = """
import os, resource, sys
from pathlib import Path
from rollouttap.manager.launch import remove_run_dir
run_dir = Path(sys.argv[1])
for depth in range(6):  # rmtree holds one descriptor per level it descends
    run_dir.joinpath(*["d"] * depth).mkdir(parents=True, exist_ok=True)
if sys.argv[2] == "starved":
    resource.setrlimit(resource.RLIMIT_NOFILE, (32, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    held = []
    try:
        while True:
            held.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        pass
    os.close(held.pop())  # one left: rmtree opens the top, then fails a level down
print(remove_run_dir(run_dir), run_dir.exists(), flush=True)
"""


@pytest.mark.parametrize("starved", [True, False])
def test_a_run_folder_that_cannot_be_removed_is_reported_not_silently_left(tmp_path, starved):
    out = subprocess.run([sys.executable, "-c", _REMOVE, str(tmp_path / "run"), "starved" if starved else "ok"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    if starved:
        assert out.stdout.split() == ["False", "True"]
        assert "could not remove the run folder" in out.stderr
    else:  # the control: the same folder goes, quietly
        assert out.stdout.split() == ["True", "False"] and out.stderr == ""
