"""The reaper: a manager killed outright takes its running agents with it (real processes, a real store)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from conftest import running_agents, wait_for
from manager_support import HERE as SUPPORT
from rollouttap.manager.reaper import ABANDONED, ERROR, lines_while, read_watch_list
from rollouttap.store import Store

MANAGER = textwrap.dedent("""
    import os, sys, threading
    from rollouttap.manager import AgentManager, CommandAgent
    store, model_url, confdir, support = sys.argv[1:5]
    m = AgentManager(CommandAgent([sys.executable, support, "{prompt}"]), store=store, timeout=120,
                     model_url=model_url, confdir=confdir).start()
    threading.Thread(target=m.deploy, args=(["hang", "hang"],)).start()
    if sys.argv[5] == "fork" and os.fork() == 0:  # a forked child holds the reaper's pipe open
        os.execvp("sleep", ["sleep", "60"])
    threading.Event().wait()  # killed from outside, never closed
""")


def _lines(*messages) -> list[bytes]:
    return [json.dumps(m).encode() for m in messages]


def test_the_watch_list_is_what_runs_when_the_messages_end():
    running, why, dirs = read_watch_list(iter(_lines({"dir": ["a", "/tmp/a"]}, {"watch": ["a", 10, 5]},
                                                     {"dir": ["b", "/tmp/b"]}, {"watch": ["b", 11, 6]},
                                                     {"dir": ["c", "/tmp/c"]}, {"release": "a"})))
    assert dirs == {"b": "/tmp/b", "c": "/tmp/c"}  # c: its folder made, its process not yet started
    assert running == {"b": (11, 6)} and why == ERROR
    assert read_watch_list(iter(_lines({"watch": ["a", 10, 5]}, {"bye": True})))[1] is None
    assert read_watch_list(iter(_lines({"watch": ["a", 10, 5]}, {"abandoned": True})))[1] == ABANDONED
    assert read_watch_list(iter([b"not json"]))[0] == {}


def test_lines_end_with_the_pipe_or_when_the_manager_is_gone():
    read_end, write_end = os.pipe()
    os.write(write_end, b'{"a": 1}\n{"b"')
    os.write(write_end, b': 2}\npartial')
    os.close(write_end)
    assert list(lines_while(read_end, lambda: True)) == [b'{"a": 1}', b'{"b": 2}']
    os.close(read_end)
    read_end, write_end = os.pipe()  # held open, as by a child the manager forked
    os.write(write_end, b"x\n")
    assert list(lines_while(read_end, lambda: False, poll_s=0.01)) == [b"x"]
    os.close(read_end)
    os.close(write_end)


def test_a_reaper_stopped_before_it_said_ready_exits_quietly(tmp_path):
    # The manager's start failed (a bad proxy URL) and closed the pipes before reading the reaper's READY.
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        main = "from rollouttap.manager.reaper import main; raise SystemExit(main())"
        proc = subprocess.run([sys.executable, "-c", main, str(tmp_path / "runs.db"), str(os.getpid())], stdout=write_end,
                              stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)
    finally:
        os.close(write_end)
    assert (proc.returncode, proc.stderr) == (0, b"")


def _dead(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.parametrize("fork", ["fork", "no-fork"])
def test_agents_of_a_killed_manager_are_killed_and_recorded(tmp_path, confdir, upstream, fork):
    store = tmp_path / "r.db"
    manager = subprocess.Popen([sys.executable, "-c", MANAGER, store, upstream.base_url, confdir, SUPPORT, fork])
    forked: list[int] = []
    try:
        agents = running_agents(store, 2)
        with Store(store) as db:
            roots = [psutil.Process(a.root_pid) for a in agents]
            run_dirs = [Path(root.cwd()).parent for root in roots]  # agents run in RUN_DIR/work
            [proxy] = db.proxies()
            proxy_log = Path(os.readlink(f"/proc/{proxy['pid']}/fd/1"))  # mitmdump's output, the manager's file
            assert proxy_log.name.startswith("rollouttap-proxy-") and proxy_log.stat().st_size == 0
            assert all((d / "stdout.log").exists() for d in run_dirs)
            tree = {p.pid for root in roots for p in [root, *root.children(recursive=True)]}
            forked += [p.pid for p in psutil.Process(manager.pid).children() if p.name() == "sleep"]
            manager.send_signal(signal.SIGKILL)  # no clean-up of its own
            manager.wait(30)
            wait_for(lambda: all(_dead(pid) for pid in tree), timeout=30, what="the agents' processes gone")
            def all_ended():
                agents = db.agents()
                return agents if all(a.status == "error" for a in agents) else None
            ended = wait_for(all_ended, timeout=30, what="the agents recorded")
        assert {a.meta["error"] for a in ended} == {ERROR}
        wait_for(lambda: not any(d.exists() for d in run_dirs), timeout=30, what="the agents' run folders removed")
        # The proxy stops with its manager: its log, empty, goes as the manager's own stop would have removed it.
        wait_for(lambda: not proxy_log.exists(), timeout=30, what="the proxy's empty log removed")
    finally:
        manager.kill()
        manager.wait()
        for pid in forked:
            os.kill(pid, signal.SIGKILL)


def test_an_orphaned_proxys_log_goes_only_if_it_is_its_own_and_empty(tmp_path):
    from rollouttap.addon.master_hooks import discard_if_empty
    log, other = tmp_path / "proxy.log", tmp_path / "other.log"
    other.write_text("")
    with open(log, "wb") as out:
        assert discard_if_empty(str(other), fd=out.fileno()) is False and other.exists()  # not the proxy's output
        out.write(b"x")
        out.flush()
        assert discard_if_empty(str(log), fd=out.fileno()) is False and log.exists()  # something to read
    with open(tmp_path / "empty.log", "wb") as out:
        assert discard_if_empty(str(tmp_path / "empty.log"), fd=out.fileno()) is True
    assert not (tmp_path / "empty.log").exists()
    assert discard_if_empty("", fd=1) is False and discard_if_empty(str(tmp_path / "gone.log"), fd=1) is False


# Starts a proxy, makes it log an error (its store deleted under it, then a request), and dies without stop().
ORPHANING_PARENT = textwrap.dedent("""
    import os, sys, time, requests
    from rollouttap.manager.proxy import ProxyConfig, ProxyProcess
    store, confdir, upstream = sys.argv[1:4]
    proxy = ProxyProcess(ProxyConfig(store=store, confdir=confdir)).start()
    print(proxy.log_path, flush=True)
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(store + suffix):
            os.unlink(store + suffix)
    deadline = time.monotonic() + 20
    while requests.get(upstream, proxies={"http": proxy.url}, timeout=20).status_code != 503:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    os._exit(0)  # no stop(): the proxy is left to notice by itself
""")


def test_an_orphaned_proxy_keeps_a_log_with_an_error_in_it(tmp_path, confdir, upstream):
    # Its stdout is a file: without PYTHONUNBUFFERED the error line waits in a buffer until the proxy exits,
    # so an unflushed size check would read 0 and remove the only record of the error.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    parent = subprocess.run([sys.executable, "-c", ORPHANING_PARENT, str(tmp_path / "s.db"), str(confdir),
                             upstream.base_url + "/models"], capture_output=True, text=True, timeout=60, env=env)
    assert parent.returncode == 0, parent.stderr
    log = Path(parent.stdout.strip())
    proxies = [p for p in psutil.process_iter(["cmdline"]) if f"rollouttap_log_file={log}" in (p.info["cmdline"] or [])]
    psutil.wait_procs(proxies, timeout=30)
    assert "was deleted or replaced" in log.read_text()


COPYING = textwrap.dedent("""
    import sys, threading
    from rollouttap.manager import AgentManager, CommandAgent
    store, model_url, confdir, template = sys.argv[1:5]
    m = AgentManager(CommandAgent(["sleep", "120"]), store=store, timeout=120, parallel=6, model_url=model_url,
                     confdir=confdir, workdir_template=template).start()
    threading.Thread(target=m.deploy, args=([f"p{i}" for i in range(6)],)).start()
    threading.Event().wait()  # killed from outside, never closed
""")


def test_a_manager_killed_while_it_copies_workdirs_leaves_no_run_folder(tmp_path, confdir, upstream):
    # An agent's run folder is the reaper's from the moment it is made, not only once its agent runs: a
    # workdir template (a repository, for a coding agent) can take seconds to copy, six at a time.
    template = tmp_path / "template"
    for i in range(40):
        (template / f"pkg{i}").mkdir(parents=True)
        for j in range(100):
            (template / f"pkg{i}" / f"m{j}.py").write_text(f"X = {i * j}\n")
    runs = tmp_path / "tmp"
    runs.mkdir()
    manager = subprocess.Popen([sys.executable, "-c", COPYING, tmp_path / "r.db", upstream.base_url, confdir, template],
                               env={**os.environ, "TMPDIR": str(runs)})
    try:
        def copying():  # a run folder whose workdir is being copied: no prompt written into it yet
            return [d for d in runs.glob("rollouttap-agent-*") if (d / "work").exists()
                    and not (d / "prompt.txt").exists()]
        mid_copy = wait_for(copying, timeout=60, what="a workdir being copied")
        manager.send_signal(signal.SIGKILL)
        manager.wait(30)
        assert mid_copy
        wait_for(lambda: not any(runs.glob("rollouttap-agent-*")), timeout=30, what="every run folder removed")
    finally:
        manager.kill()
        manager.wait()
