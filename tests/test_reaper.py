"""The reaper: a manager killed outright takes its running agents with it (real processes, a real store)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap

import psutil

from conftest import wait_for
from manager_support import HERE as SUPPORT
from rollouttap.manager.reaper import ERROR, read_watch_list
from rollouttap.store import Store

MANAGER = textwrap.dedent("""
    import sys, threading
    from rollouttap.manager import AgentManager, CommandAgent
    store, model_url, confdir, support = sys.argv[1:5]
    m = AgentManager(CommandAgent([sys.executable, support, "{prompt}"]), store=store, timeout=120,
                     model_url=model_url, confdir=confdir).start()
    threading.Thread(target=m.deploy, args=(["hang", "hang"],)).start()
    threading.Event().wait()  # killed from outside, never closed
""")


def _lines(*messages) -> io.BytesIO:
    return io.BytesIO(b"".join(json.dumps(m).encode() + b"\n" for m in messages))


def test_the_watch_list_is_what_runs_when_the_pipe_ends():
    running, bye = read_watch_list(_lines({"watch": ["a", 10, 5]}, {"watch": ["b", 11, 6]}, {"release": "a"}))
    assert running == {"b": (11, 6)} and not bye
    assert read_watch_list(_lines({"watch": ["a", 10, 5]}, {"bye": True}))[1]
    assert read_watch_list(io.BytesIO(b"not json\n"))[0] == {}


def _dead(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_agents_of_a_killed_manager_are_killed_and_recorded(tmp_path, confdir, upstream):
    store = tmp_path / "r.db"
    manager = subprocess.Popen([sys.executable, "-c", MANAGER, store, upstream.base_url, confdir, SUPPORT])
    try:
        wait_for(store.exists, timeout=60, what="the store")
        with Store(store) as db:
            def both_running():
                agents = db.agents()
                return agents if len(agents) == 2 and all(a.status == "running" for a in agents) else None
            agents = wait_for(both_running, timeout=60, what="two running agents")
            roots = [psutil.Process(a.root_pid) for a in agents]
            tree = {p.pid for root in roots for p in [root, *root.children(recursive=True)]}
            manager.send_signal(signal.SIGKILL)  # no clean-up of its own
            manager.wait(30)
            wait_for(lambda: all(_dead(pid) for pid in tree), timeout=30, what="the agents' processes gone")
            def all_ended():
                agents = db.agents()
                return agents if all(a.status == "error" for a in agents) else None
            ended = wait_for(all_ended, timeout=30, what="the agents recorded")
        assert {a.meta["error"] for a in ended} == {ERROR}
    finally:
        manager.kill()
        manager.wait()
