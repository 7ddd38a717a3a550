"""The agents' last guard: a small process that kills them if the manager that runs them dies.

A manager killed outright (SIGKILL, SIGTERM's default, a crash) runs no clean-up, and its agents, each in
a session of its own, would run on unsupervised. So ``AgentManager`` starts this process (in a session of its
own too) and tells it over a pipe which agents run (root pid and start time) and which have ended. The
manager gone (the pipe closing without a goodbye, or the reaper's parent changing: a child the manager
forked may hold the pipe open) means every agent still running is killed (its tree: descendants, group,
session, tag), recorded in the store as ended in error, and every run folder the manager had not yet removed (an
agent's, from the moment it is made: copying a workdir template can take a while) removed as it would have.
"""

from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from rollouttap.manager.launch import kill_exactly, leftover_tree, process_table, remove_run_dir

log = logging.getLogger(__name__)

ERROR = "the manager process exited while the agent ran; its processes were killed"
ABANDONED = "the manager closed before the agent could be ended; its processes were killed"
READY = b"ready\n"
# Not `-m`: the package imports this module first, and runpy would warn (an error under -W error).
_MAIN = "from rollouttap.manager.reaper import main; raise SystemExit(main())"


class Reaper:
    """The manager's side of the pipe. Every method is safe to call after the reaper is gone."""

    def __init__(self, proc: subprocess.Popen[bytes] | None) -> None:
        self._proc = proc
        self._lock = threading.Lock()
        self._warned = False

    @classmethod
    def start(cls, store: Path) -> Reaper:
        """Start the reaper; ``wait_ready`` then confirms it runs."""
        try:
            proc = subprocess.Popen([sys.executable, "-P", "-c", _MAIN, str(store), str(os.getpid())],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)
        except (OSError, TypeError) as exc:  # TypeError: no sys.executable (an embedded interpreter)
            log.warning("no reaper: agents may outlive a manager that is killed (%s)", exc)
            proc = None
        return cls(proc)

    def wait_ready(self, timeout: float = 30.0) -> bool:
        """Whether the reaper started; a warning (not an error: the agents still run) when it did not."""
        proc = self._proc
        if proc is None:
            return False
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        if ready and proc.stdout.readline() == READY:
            return True
        log.warning("the reaper did not start (exit code %s): agents may outlive a manager that is killed",
                    proc.poll())
        proc.kill()
        self._close(wait=5.0)
        return False

    def claim(self, agent_id: str, run_dir: Path) -> None:
        """The agent's run folder (prompt, logs, workdir) is about to be made: remove it if the manager dies."""
        self._send({"dir": [agent_id, str(run_dir)]})

    def watch(self, agent_id: str, pid: int, start: int | None) -> None:
        """The agent runs: kill it if the manager dies."""
        if start is not None:
            self._send({"watch": [agent_id, pid, start]})

    def release(self, agent_id: str) -> None:
        """The agent has ended and is recorded (its run folder removed, unless kept)."""
        self._send({"release": agent_id})

    def stop(self) -> None:
        """The manager closes normally: the reaper leaves without killing anything."""
        self._send({"bye": True})
        self._close(wait=10.0)

    def abandon(self) -> None:
        """Leave the reaper to kill and record whatever of the agents still runs (the manager gives up on
        them: close() could not end them in time)."""
        self._send({"abandoned": True})
        self._close(wait=0.0)

    def _close(self, wait: float) -> None:
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is None:
            return
        for pipe in (proc.stdin, proc.stdout):
            try:
                if pipe is not None:
                    pipe.close()
            except OSError:
                pass
        if wait:
            try:
                proc.wait(wait)
            except subprocess.TimeoutExpired:
                log.warning("the reaper did not leave; killed")
                proc.kill()
                proc.wait()

    def _send(self, message: dict[str, Any]) -> None:
        with self._lock:
            proc = self._proc
            if proc is None or proc.stdin is None:
                return
            try:
                proc.stdin.write(json.dumps(message).encode() + b"\n")
                proc.stdin.flush()
            except (OSError, ValueError) as exc:
                if not self._warned:
                    self._warned = True
                    log.warning("the reaper is gone (%s): agents may outlive a manager that is killed", exc)


def read_watch_list(messages: Iterator[bytes]) -> tuple[dict[str, tuple[int, int]], str | None, dict[str, str]]:
    """(agents running when the messages ended, why they are to be reaped: None after the manager's
    goodbye, ABANDONED when it gave up on them, else ERROR; the run folders of unreleased agents, to remove)."""
    running: dict[str, tuple[int, int]] = {}
    dirs: dict[str, str] = {}
    why = ERROR
    for line in messages:
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if "bye" in message:
            return running, None, dirs
        if "abandoned" in message:
            why = ABANDONED
        if "dir" in message:
            agent_id, run_dir = message["dir"]
            dirs[agent_id] = run_dir
        elif "watch" in message:
            agent_id, pid, start = message["watch"]
            running[agent_id] = (int(pid), int(start))
        elif "release" in message:
            running.pop(message["release"], None)
            dirs.pop(message["release"], None)
    return running, why, dirs


def lines_while(fd: int, alive: Callable[[], bool], poll_s: float = 0.5) -> Iterator[bytes]:
    """The lines read from ``fd`` until its end, or until ``alive()`` turns false."""
    pending = b""
    while True:
        ready, _, _ = select.select([fd], [], [], poll_s)
        if not ready:
            if not alive():
                return
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            return
        *lines, pending = (pending + chunk).split(b"\n")
        yield from lines


def reap(running: dict[str, tuple[int, int]], rounds: int = 5) -> int:
    """Kill what is left of each agent's tree (a member may fork between a scan and its kill: rescan)."""
    killed: set[int] = set()
    for _ in range(rounds):
        table = process_table()
        victims = {pid: table[pid].start for agent_id, (root, start) in running.items()
                   for pid in leftover_tree(agent_id, root, start, table)}
        if not victims:
            break
        done, _ = kill_exactly(victims)
        killed |= done
    return len(killed)


def record_ends(store_path: str, agent_ids: list[str], why: str) -> None:
    from rollouttap.store import LIVE_STATUSES, Store
    with Store(store_path) as store:
        for agent_id in agent_ids:
            agent = store.agent(agent_id)
            if agent is not None and agent.status in LIVE_STATUSES:
                store.agent_ended(agent_id, "error", {"error": why})


def main(argv: list[str] | None = None) -> int:
    store_path, manager_pid = (argv if argv is not None else sys.argv[1:])[:2]
    try:
        os.write(sys.stdout.fileno(), READY)
    except BrokenPipeError:  # the manager stopped us before it read this (its start failed): nothing to watch
        return 0

    def manager_alive() -> bool:
        return os.getppid() == int(manager_pid)  # re-parented once it died

    running, why, dirs = read_watch_list(lines_while(sys.stdin.fileno(), manager_alive))
    if why is None:
        return 0
    try:
        if running:
            reap(running)
            record_ends(store_path, list(running), why)
    finally:
        for run_dir in dirs.values():  # what the manager's own clean-up would have removed
            remove_run_dir(run_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
