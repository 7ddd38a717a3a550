"""Attribution on the event loop: ``PidAttributor.resolve_cached`` answers a process that reconnects from what
earlier lookups cached, exactly as ``resolve`` does, and hands everything else to a thread (None) instead of
reading what can block. Real processes, sockets and store; the finder and ancestry cache also on a fake /proc."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import pytest

from rollouttap.addon.attribution import AgentDirectory, PidAttributor
from rollouttap.addon.procfs import KNOWN_LINKS_BUDGET, AncestryCache, NotCached, SocketOwnerFinder
from rollouttap.store import Store, new_token

from test_attribution import FakeProc  # the fake /proc of the finder tests


@pytest.fixture
def fake_proc(tmp_path):
    return FakeProc(tmp_path / "proc")


class Reconnecting:
    """A child process that opens a new connection to ``server`` whenever asked (closing the one before), as an
    agent that makes a connection per call does."""

    def __init__(self, server: socket.socket, env: dict[str, str] | None = None) -> None:
        self.server = server
        self.proc = subprocess.Popen([sys.executable, "-c", (
            "import socket, sys\n"
            "s = None\n"
            "for line in sys.stdin:\n"
            "    if s is not None: s.close()\n"
            f"    s = socket.create_connection({server.getsockname()!r})\n"
            "    print(s.getsockname()[1], flush=True)\n")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def connect(self) -> tuple[socket.socket, tuple[str, int], tuple[str, int]]:
        """The accepted end of a new connection, its peer and its local address."""
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        self.proc.stdout.readline()
        accepted, peer = self.server.accept()
        return accepted, peer, accepted.getsockname()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(10)


@contextmanager
def reconnecting(env: dict[str, str] | None = None):
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(30)
        client = Reconnecting(server, env)
        try:
            yield client
        finally:
            client.close()


def _as_tuple(result):
    return (result.pid, result.agent_id, result.detail, result.roots, result.tags, result.proxy, result.unfound)


@pytest.mark.parametrize("case", ["under no root", "registered agent", "tag of an agent the store lacks"])
def test_a_process_that_reconnects_is_answered_from_the_cache_as_a_lookup_would(tmp_path, case):
    path = tmp_path / "s.db"
    env = dict(os.environ)
    if case != "under no root":
        env["ROLLOUTTAP_AGENT_ID"] = "a1" if case == "registered agent" else "nobody"
    directory = AgentDirectory(str(path), max_age=3600.0)
    try:
        with reconnecting(env) as client:
            if case == "registered agent":
                with Store(path) as store:
                    store.register_agent("a1", token=new_token())
                    store.agent_started("a1", client.proc.pid)
            directory.refresh()
            pids = PidAttributor(directory)
            first, peer, sock = client.connect()
            with first:
                assert pids.resolve_cached(peer, sock) is None  # nothing known of the process yet
                looked_up = pids.resolve(peer, sock)
            pids.connection_closed(looked_up.pid)
            answers = []
            for _ in range(5):
                accepted, peer, sock = client.connect()
                with accepted:
                    answers.append(pids.resolve_cached(peer, sock))
                    again = pids.resolve(peer, sock)  # the same connection, looked up the long way
                pids.connection_closed(looked_up.pid)
    finally:
        directory.close()
    assert looked_up.pid == client.proc.pid
    if case == "tag of an agent the store lacks":
        # A hand-run tag names its agent, after a store read (an ended agent's must not): never on the event loop.
        assert answers == [None] * 5 and looked_up.agent_id == "nobody"
        return
    assert looked_up.agent_id == ("a1" if case == "registered agent" else None)
    assert [_as_tuple(a) for a in answers] == [_as_tuple(looked_up)] * 5 == [_as_tuple(again)] * 5


def test_a_lookup_on_the_event_loop_never_waits_for_the_store_nor_reads_a_stale_directory(tmp_path):
    # A pool thread may hold the directory's lock for as long as SQLite waits on a busy store: the event loop's
    # lookup must not take it. And once the live agents are due to be read again, it leaves that to a thread.
    directory = AgentDirectory(str(tmp_path / "s.db"), max_age=3600.0)
    try:
        with reconnecting() as client:
            directory.refresh()
            pids = PidAttributor(directory)
            accepted, peer, sock = client.connect()
            with accepted:
                looked_up = pids.resolve(peer, sock)
            pids.connection_closed(looked_up.pid)
            held, release = threading.Event(), threading.Event()

            def hold_the_lock():
                with directory._lock:
                    held.set()
                    release.wait(30)

            holder = threading.Thread(target=hold_the_lock)
            holder.start()
            try:
                held.wait(10)
                accepted, peer, sock = client.connect()
                with accepted:
                    started = time.monotonic()
                    fresh = pids.resolve_cached(peer, sock)
                    directory._loaded_at -= 3600.0  # as if read an hour ago
                    stale = pids.resolve_cached(peer, sock)
                    waited = time.monotonic() - started
            finally:
                release.set()
                holder.join(10)
    finally:
        directory.close()
    assert fresh is not None and fresh.pid == client.proc.pid
    assert stale is None and waited < 5


def test_the_ancestry_cache_reads_no_environ_for_the_event_loop(fake_proc):
    fake_proc.process(10, tag="A")
    fake_proc.process(20, ppid=10)
    cache = AncestryCache(str(fake_proc.root), max_age=3600)
    with pytest.raises(NotCached):
        cache.chain(20, cached=True)  # its tag would need its environ: it may block
    chain = cache.chain(20)
    assert cache.chain(20, cached=True) == chain
    fake_proc.process(30, ppid=20)  # a new child: its own environ is unread
    with pytest.raises(NotCached):
        cache.chain(30, cached=True)


def test_the_finder_finds_a_reconnecting_owner_within_its_budget_and_nothing_else(fake_proc):
    for pid in range(2, 12):
        fake_proc.process(pid, sockets=[1000 + pid])
    fake_proc.process(12, sockets=range(2000, 2000 + KNOWN_LINKS_BUDGET + 1))  # more sockets than the budget
    fake_proc.last_pid(12)
    finder = SocketOwnerFinder(str(fake_proc.root))
    assert finder.find_known(1005) is None  # no lookup yet: nothing known, no process read
    assert finder.find(1005) == 5 and finder.find(2000) == 12
    finder.closed(5)
    fake_proc.process(5, sockets=[3005])  # it reconnects on the freed fd
    assert finder.find_known(3005) == 5
    fake_proc.process(11, sockets=[4011])  # a process no lookup found: left to the full one
    assert finder.find_known(4011) is None
    finder.closed(12)  # the one with too many sockets comes first now: past the budget, it ends the search
    fake_proc.process(5, sockets=[5005])
    assert finder.find_known(5005) is None
    assert finder.find(5005) == 5
