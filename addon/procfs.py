"""Linux /proc readers for attribution: who owns a socket inode, a process's parent and its agent tag."""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass

AGENT_ENV = "ROLLOUTTAP_AGENT_ID"
_AGENT_ENV_PREFIX = (AGENT_ENV + "=").encode()


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    start_ticks: int  # field 22 of /proc/<pid>/stat: tells a reused pid apart
    agent_tag: str | None


def read_proc(pid: int, proc: str = "/proc") -> ProcInfo | None:
    """Parent, start time and ROLLOUTTAP_AGENT_ID tag of one process; None if it is gone."""
    try:
        with open(f"{proc}/{pid}/stat", "rb") as fh:
            stat = fh.read()
        with open(f"{proc}/{pid}/environ", "rb") as fh:
            environ = fh.read()
    except OSError:
        return None
    return ProcInfo(pid, *parse_stat(stat), parse_agent_tag(environ))


def parse_stat(stat: bytes) -> tuple[int, int]:
    """(ppid, start_ticks) from /proc/<pid>/stat; the command name may hold spaces and parentheses."""
    fields = stat[stat.rindex(b")") + 2:].split()
    return int(fields[1]), int(fields[19])


def parse_agent_tag(environ: bytes) -> str | None:
    """The ROLLOUTTAP_AGENT_ID value in a NUL-separated exec-time environment."""
    for entry in environ.split(b"\0"):
        if entry.startswith(_AGENT_ENV_PREFIX):
            value = entry[len(_AGENT_ENV_PREFIX):].decode("utf-8", "replace")
            return value or None
    return None


def ancestry(pid: int, proc: str = "/proc", limit: int = 64) -> list[ProcInfo]:
    """The process and its ancestors, nearest first, up to (not including) pid 0."""
    chain: list[ProcInfo] = []
    while pid > 0 and len(chain) < limit:
        info = read_proc(pid, proc)
        if info is None:
            break
        chain.append(info)
        pid = info.ppid
    return chain


class SocketOwnerFinder:
    """Finds the process holding a socket inode, trying recent owners first, then newest pids first.

    A full scan of every /proc/<pid>/fd costs milliseconds with many processes; agents open many
    connections from the same few processes, and a new agent process has one of the highest pids.
    """

    def __init__(self, proc: str = "/proc", remember: int = 64) -> None:
        self.proc = proc
        self._recent: OrderedDict[int, None] = OrderedDict()
        self._remember = remember
        self.scanned_last = 0

    def find(self, inode: int) -> int | None:
        target = f"socket:[{inode}]"
        self.scanned_last = 0
        for pid in list(reversed(self._recent)):
            if self._holds(pid, target):
                self._recent.move_to_end(pid)
                return pid
        for pid in self._all_pids_newest_first():
            if pid not in self._recent and self._holds(pid, target):
                self._note(pid)
                return pid
        return None

    def _note(self, pid: int) -> None:
        self._recent[pid] = None
        if len(self._recent) > self._remember:
            self._recent.popitem(last=False)

    def _holds(self, pid: int, target: str) -> bool:
        self.scanned_last += 1
        fd_dir = f"{self.proc}/{pid}/fd"
        try:
            names = os.listdir(fd_dir)
        except OSError:
            self._recent.pop(pid, None)
            return False
        for name in names:
            try:
                if os.readlink(f"{fd_dir}/{name}") == target:
                    return True
            except OSError:
                continue
        return False

    def _all_pids_newest_first(self) -> list[int]:
        pids = [int(n) for n in os.listdir(self.proc) if n.isdigit()]
        pids.sort(reverse=True)
        return pids
