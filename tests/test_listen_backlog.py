"""The listen-backlog addon, in a real mitmdump: a stopped proxy's kernel queue holds a burst of connects.

How it is observed: the proxy is frozen with SIGSTOP, so nothing accepts; the kernel still completes
handshakes into the listening socket's accept queue until it holds ``backlog + 1`` connections, then drops
further SYNs (those clients would retry after 1 s, then 3 s). Counting the connects that complete tells the
backlog the proxy really listens with.
"""

from __future__ import annotations

import errno
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from rollouttap.addon import listen_backlog
from rollouttap.addon.listen_backlog import listening_sockets, set_backlog
from rollouttap.manager.proxy import ProxyConfig, ProxyProcess

MITMDUMP = [sys.executable, "-c", "from mitmproxy.tools.main import mitmdump; mitmdump()"]
BURST = 250  # well over asyncio's default backlog of 100
ASYNCIO_DEFAULT = 100

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="accept-queue overflow behaviour is Linux's")


def completed_connects(port: int, n: int, wait: float = 1.0) -> int:
    """Start ``n`` non-blocking connects; how many complete within ``wait`` seconds."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.setblocking(False)
            code = s.connect_ex(("127.0.0.1", port))
            assert code in (0, errno.EINPROGRESS), os.strerror(code)
        done: set[int] = set()
        deadline = time.monotonic() + wait
        while len(done) < n and (left := deadline - time.monotonic()) > 0:
            pending = [s for s in socks if s.fileno() not in done]
            _, writable, _ = select.select([], pending, [], left)
            for s in writable:
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                    done.add(s.fileno())
        return len(done)
    finally:
        for s in socks:
            s.close()


@contextmanager
def frozen(pid: int) -> Iterator[None]:
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def _wait_ready(proc: subprocess.Popen, tuned: bool, timeout: float = 60) -> int:
    """The port, once mitmdump listens (and, when ``tuned``, once the addon says it raised the backlog)."""
    assert proc.stdout is not None
    seen, port, ready = [], None, not tuned
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if match := re.search(r"proxy listening at 127\.0\.0\.1:(\d+)", line):
            port = int(match.group(1))
        ready = ready or "rollouttap: listen backlog" in line
        if port is not None and ready:
            return port
    raise AssertionError("mitmdump did not get ready:\n" + "".join(seen)[-2000:])


@contextmanager
def mitmdump_with_addon(tmp_path, backlog: int | None) -> Iterator[tuple[int, int]]:
    args = [*MITMDUMP, "--listen-host", "127.0.0.1", "--listen-port", "0", "-s", listen_backlog.__file__,
            "--set", f"confdir={tmp_path}", "--set", "termlog_verbosity=info", "--set", "flow_detail=0"]
    if backlog is not None:
        args += ["--set", f"rollouttap_listen_backlog={backlog}"]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        yield proc.pid, _wait_ready(proc, tuned=backlog != 0)
    finally:
        proc.kill()
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def test_addon_lets_a_burst_of_connects_queue_up(tmp_path):
    with mitmdump_with_addon(tmp_path, None) as (pid, port):
        with frozen(pid):
            assert completed_connects(port, BURST) == BURST


def test_backlog_zero_leaves_mitmproxys_default(tmp_path):
    # The control: the same burst overflows asyncio's queue of 100 when the addon stands aside.
    with mitmdump_with_addon(tmp_path, 0) as (pid, port):
        with frozen(pid):
            assert completed_connects(port, BURST) <= ASYNCIO_DEFAULT + 1


def test_rollouttap_proxy_loads_it(tmp_path):
    proxy = ProxyProcess(ProxyConfig(store=tmp_path / "s.db", confdir=tmp_path / "conf"))
    proxy.start(timeout=60)
    try:
        assert proxy.proc is not None
        with frozen(proxy.proc.pid):
            assert completed_connects(proxy.port, BURST) == BURST
    finally:
        proxy.stop()


def test_set_backlog_on_a_plain_listener():
    with socket.create_server(("127.0.0.1", 0), backlog=2) as server:
        port = server.getsockname()[1]
        assert completed_connects(port, 20, wait=0.5) <= 3
        set_backlog(server, 64)
        assert completed_connects(port, 20) == 20  # accepted by the kernel, not by us: the queue grew
        assert server.fileno() >= 0  # the original stays open


class _Server:
    def __init__(self, sockets):
        self.sockets = sockets


class _Instance:
    def __init__(self, servers):
        self._servers = servers


def test_listening_sockets_takes_tcp_servers_only():
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        found = listening_sockets([_Instance([_Server([tcp, udp])]), _Instance([]), object()])
        assert found == [tcp]
    finally:
        tcp.close()
        udp.close()
