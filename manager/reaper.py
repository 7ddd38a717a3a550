"""The agents' last guard: a small process that kills them if the manager that runs them dies.

A manager killed outright (SIGKILL, SIGTERM's default, a crash) runs no clean-up, and its agents, each in
a session of its own, would run on unsupervised. So ``AgentManager`` starts this process (in a session of its
own too) and tells it over a pipe which agents run (root pid and start time) and which have ended. The pipe
closing without a goodbye means the manager is gone: every agent still running is killed (its tree:
descendants, group, session, tag) and recorded in the store as ended in error.

Run as ``python -m rollouttap.manager.reaper STORE`` with the pipe on stdin; ``Reaper`` does that.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

from rollouttap.manager.launch import kill_exactly, leftover_tree, process_table

log = logging.getLogger(__name__)

ERROR = "the manager process exited while the agent ran; its processes were killed"


class Reaper:
    """The manager's side of the pipe. Every method is safe to call after the reaper is gone."""

    def __init__(self, proc: subprocess.Popen[bytes] | None) -> None:
        self._proc = proc
        self._lock = threading.Lock()

    @classmethod
    def start(cls, store: Path) -> Reaper:
        try:
            proc = subprocess.Popen([sys.executable, "-m", "rollouttap.manager.reaper", str(store)],
                                    stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            log.warning("no reaper (agents may outlive a manager that is killed): %s", exc)
            proc = None
        return cls(proc)

    def watch(self, agent_id: str, pid: int, start: int | None) -> None:
        """The agent runs: kill it if the manager dies."""
        if start is not None:
            self._send({"watch": [agent_id, pid, start]})

    def release(self, agent_id: str) -> None:
        """The agent has ended and is recorded."""
        self._send({"release": agent_id})

    def stop(self) -> None:
        """The manager closes normally: the reaper leaves without killing anything."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            self._write(proc.stdin, {"bye": True})
            proc.stdin.close()  # type: ignore[union-attr]
        except OSError:
            pass
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _send(self, message: dict) -> None:
        proc = self._proc
        if proc is None:
            return
        with self._lock:
            try:
                self._write(proc.stdin, message)
            except (OSError, ValueError):  # the reaper died (or stop() closed the pipe): nothing to guard with
                pass

    @staticmethod
    def _write(pipe: IO[bytes] | None, message: dict) -> None:
        assert pipe is not None
        pipe.write(json.dumps(message).encode() + b"\n")
        pipe.flush()


def read_watch_list(lines: IO[bytes]) -> tuple[dict[str, tuple[int, int]], bool]:
    """(agents running when the pipe ended, whether the manager said goodbye) from the manager's messages."""
    running: dict[str, tuple[int, int]] = {}
    for line in lines:
        try:
            message = json.loads(line)
        except ValueError:
            continue
        if "bye" in message:
            return running, True
        if "watch" in message:
            agent_id, pid, start = message["watch"]
            running[agent_id] = (int(pid), int(start))
        elif "release" in message:
            running.pop(message["release"], None)
    return running, False


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


def record_ends(store_path: str, agent_ids: list[str]) -> None:
    from rollouttap.store import Store
    with Store(store_path) as store:
        for agent_id in agent_ids:
            agent = store.agent(agent_id)
            if agent is not None and agent.status in ("registered", "running"):
                store.agent_ended(agent_id, "error", {"error": ERROR})


def main(argv: list[str] | None = None) -> int:
    store_path = (argv if argv is not None else sys.argv[1:])[0]
    running, goodbye = read_watch_list(sys.stdin.buffer)
    if goodbye or not running:
        return 0
    reap(running)
    record_ends(store_path, list(running))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
