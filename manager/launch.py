"""Starting one agent process and ending its whole tree.

An agent runs in a fresh session (so its process group is its own), in its own directory, with the proxy's
environment. Its tree is every process descending from it, in its process group or session, or carrying
its ``ROLLOUTTAP_AGENT_ID`` tag: a grandchild that called setsid and was orphaned still carries the tag.
Processes are named by (pid, start time), so a reused pid is never mistaken for a member.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import secrets
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from rollouttap.addon.loopback import url_host  # pure, no mitmproxy
from rollouttap.addon.procfs import AGENT_ENV, parse_agent_tag, read_file  # pure /proc reading, no mitmproxy
from rollouttap.errors import ConfigError
from rollouttap.manager.output import CappedOutput

log = logging.getLogger(__name__)

_DEAD_STATES = frozenset("ZX")  # zombies wait for a reaper (pid 1 may never reap them) but run nothing


@dataclass(frozen=True)
class ProcRow:
    """One line of the process table: fields of /proc/<pid>/stat."""
    pid: int
    ppid: int
    pgrp: int
    session: int
    start: int  # start time in clock ticks since boot
    state: str

    @property
    def alive(self) -> bool:
        return self.state not in _DEAD_STATES


def parse_stat(pid: int, stat: bytes) -> ProcRow:
    """A ProcRow from /proc/<pid>/stat; the command name may hold spaces and parentheses."""
    fields = stat[stat.rindex(b")") + 2:].split()
    return ProcRow(pid, int(fields[1]), int(fields[2]), int(fields[3]), int(fields[19]),
                   fields[0].decode())


class ProcTable(dict[int, ProcRow]):
    """A process table (pid -> row) that builds its parent and group indexes once, however many agents
    read it: the monitor hands one table to every running agent each tick."""

    proc = "/proc"  # where its tags are read

    @functools.cached_property
    def children(self) -> dict[int, list[int]]:
        children: dict[int, list[int]] = {}
        for row in self.values():
            children.setdefault(row.ppid, []).append(row.pid)
        return children

    @functools.cached_property
    def _tags(self) -> dict[int, str | None]:
        return {}

    def tag(self, pid: int) -> str | None:
        """``env_tag(pid)``, read once per table: every agent's clean-up asks about the same processes."""
        tags = self._tags
        if pid not in tags:
            tags[pid] = env_tag(pid, self.proc)
        return tags[pid]

    @functools.cached_property
    def grouped(self) -> dict[int, set[int]]:
        """pid -> the processes whose process group or session it names."""
        grouped: dict[int, set[int]] = {}
        for row in self.values():
            grouped.setdefault(row.pgrp, set()).add(row.pid)
            grouped.setdefault(row.session, set()).add(row.pid)
        return grouped


def process_table(proc: str = "/proc") -> ProcTable:
    """Every process of this pid namespace now."""
    table = ProcTable()
    table.proc = proc
    for name in os.listdir(proc):
        if not name.isdigit():
            continue
        try:
            table[int(name)] = parse_stat(int(name), read_file(f"{proc}/{name}/stat") or b"")
        except (ValueError, IndexError):
            continue  # exited meanwhile
    return table


def descendants(roots: Iterable[int], table: Mapping[int, ProcRow]) -> set[int]:
    """The roots present in the table and every process below them."""
    children = table.children if isinstance(table, ProcTable) else ProcTable(table).children
    found: set[int] = set()
    stack = [r for r in roots if r in table]
    while stack:
        pid = stack.pop()
        if pid in found:
            continue
        found.add(pid)
        stack.extend(children.get(pid, ()))
    return found


def group_members(pid: int, table: Mapping[int, ProcRow]) -> set[int]:
    """Processes whose process group or session is ``pid`` (they keep naming it after it exits)."""
    grouped = table.grouped if isinstance(table, ProcTable) else ProcTable(table).grouped
    return set(grouped.get(pid, ()))


def env_tag(pid: int, proc: str = "/proc") -> str | None:
    """The ROLLOUTTAP_AGENT_ID a process was started with (its exec-time environment)."""
    environ = read_file(f"{proc}/{pid}/environ")
    return parse_agent_tag(environ) if environ else None


class SharedProcessTable:
    """``process_table()`` scans shared by the threads that need one at about the same time.

    ``after(moment)`` answers the latest scan if it began at ``moment`` (time.monotonic()) or later, else
    scans anew; a thread that waited for another's scan takes it when that scan began after its moment.
    When a batch of agents ends together, their clean-ups share scans (and each scan's tag reads).
    """

    def __init__(self, proc: str = "/proc") -> None:
        self.proc = proc
        self._lock = threading.Lock()
        self._table = ProcTable()
        self._began = -float("inf")

    def after(self, moment: float) -> ProcTable:
        with self._lock:
            if self._began < moment:
                began = time.monotonic()
                self._table, self._began = process_table(self.proc), began
            return self._table


@dataclass
class AgentProcess:
    """A started agent: its root process and every member of its tree seen so far."""
    agent_id: str
    popen: subprocess.Popen[bytes]
    started: float  # time.monotonic() at spawn
    members: dict[int, int] = field(default_factory=dict)  # pid -> start ticks
    lock: threading.Lock = field(default_factory=threading.Lock)
    outputs: dict[str, CappedOutput] = field(default_factory=dict)  # stdout, stderr

    @property
    def pid(self) -> int:
        return self.popen.pid

    def observe(self, table: Mapping[int, ProcRow]) -> set[int]:
        """Add the tree's current members from a process table; returns the live ones."""
        with self.lock:
            known = {p for p, start in self.members.items() if p in table and table[p].start == start}
            # Group and session ids keep the root's pid after it exits; they still name its tree (the pid
            # stays reserved while they do), unless another process holds that pid: then they are its.
            found = descendants(known, table) | _groups_of(self.pid, self.members.get(self.pid), table)
            for pid in found:
                self.members[pid] = table[pid].start
            return {p for p in found if table[p].alive}

    def collect(self, table: Mapping[int, ProcRow], *, by_tag: bool = True) -> set[int]:
        """Live members, plus live processes carrying this agent's tag (orphans that left the tree)."""
        live = self.observe(table)
        if by_tag:
            me = _self_and_ancestors(table)
            born = self.members.get(self.pid, 0)  # a process older than the agent cannot be its descendant
            for row in table.values():
                if row.alive and row.start >= born and row.pid not in live and row.pid not in me \
                        and _tag_of(table, row.pid) == self.agent_id:
                    with self.lock:
                        self.members.setdefault(row.pid, row.start)
                    live.add(row.pid)
        return live


def make_workdir(parent: Path, template: Path | None) -> Path:
    """A fresh working directory under ``parent``; a copy of ``template`` when given."""
    workdir = parent / "work"
    if template is None:
        workdir.mkdir()
    else:
        shutil.copytree(template, workdir, symlinks=True)
    return workdir


def new_run_dir(claim: Callable[[Path], object] = lambda _path: None, prefix: str = "rollouttap-agent-") -> Path:
    """A new private folder in the temp dir, as ``mkdtemp`` makes one. ``claim`` hears its path before it
    exists: a process killed in between leaves no folder that its reaper was not told of."""
    parent = Path(tempfile.gettempdir())
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(6)}"
        claim(path)
        try:
            path.mkdir(mode=0o700)
            return path
        except FileExistsError:  # another's: claimed again under a new name, so its owner's stays its own
            continue
    raise FileExistsError(f"no new {prefix}* folder could be made in {parent}")


def remove_run_dir(run_dir: Path | str) -> bool:
    """Remove an agent's run folder; a warning, not an error, for what stays (out of file descriptors, say)."""
    failed: list[str] = []
    shutil.rmtree(run_dir, onexc=lambda _fn, path, exc: failed.append(f"{path}: {exc}"))
    if failed and Path(run_dir).exists():
        log.warning("could not remove the run folder %s (%d failures; first: %s)", run_dir, len(failed), failed[0])
        return False
    return True


def spawn(agent_id: str, argv: list[str], *, env: Mapping[str, str], cwd: Path, stdin: Path | None,
          stdout: Path, stderr: Path) -> AgentProcess:
    """Start the agent in a new session; stdin from a file or /dev/null. Its stdout and stderr go through
    pipes into ``stdout`` and ``stderr``, their middle cut past ``OUTPUT_KEEP_BYTES`` (``finish_output``)."""
    outputs: dict[str, CappedOutput] = {}
    try:
        outputs["stdout"] = CappedOutput(stdout)
        outputs["stderr"] = CappedOutput(stderr)
        with open(stdin, "rb") if stdin is not None else open(os.devnull, "rb") as inp:
            popen = subprocess.Popen(argv, stdin=inp, stdout=outputs["stdout"].write_fd,
                                     stderr=outputs["stderr"].write_fd, cwd=cwd, env=dict(env),
                                     start_new_session=True, close_fds=True)
    except BaseException:
        for output in outputs.values():
            output.finish(0)
        raise
    for output in outputs.values():
        output.close_write_end()
    agent = AgentProcess(agent_id, popen, time.monotonic(), outputs=outputs)
    start = _start_of(popen.pid)
    if start is not None:  # the forked child exists now; its start time does not change at exec
        agent.members[popen.pid] = start
    return agent


def finish_output(agent: AgentProcess, timeout: float = 2.0) -> dict[str, int]:
    """Write what is kept of the agent's stdout and stderr (call it once its tree is dead); the streams whose
    middle was cut, with how many bytes."""
    cut = {name: output.finish(timeout) for name, output in agent.outputs.items()}
    for name, output in agent.outputs.items():
        if output.write_error is not None:
            log.warning("agent %s: its %s could not be kept in %s: %s", agent.agent_id, name, output.path,
                        output.write_error)
    return {name: dropped for name, dropped in cut.items() if dropped}


def wait(agent: AgentProcess, deadline: float, stop: threading.Event, poll: float = 0.25) -> str:
    """Wait for the root process: ``exited``, ``timeout`` at the deadline, or ``cancelled``.

    The process's exit wakes the wait at once (through a pidfd); ``stop`` is checked every ``poll`` seconds
    (cancelling is rare, and each wake-up of every waiting thread costs the busy manager CPU).
    """
    if agent.popen.returncode is not None:
        return "exited"  # already reaped: its pid may name another process by now
    fd = pidfd_of(agent.pid)
    try:
        exit_poll = None
        if fd is not None:
            exit_poll = select.poll()  # not select(): a busy manager's fds may pass FD_SETSIZE
            exit_poll.register(fd, select.POLLIN)
        while True:
            if _exited(agent.popen, exit_poll, max(0.0, min(poll, deadline - time.monotonic()))):
                return "exited"
            if stop.is_set():
                return "cancelled"
            if time.monotonic() >= deadline:
                return "timeout"
    finally:
        if fd is not None:
            os.close(fd)


def pidfd_of(pid: int) -> int | None:
    """A pidfd of the process (readable once it exits); None where pidfds are missing or it is reaped."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # no pidfds here, or the process is already reaped
        return None


def _exited(popen: subprocess.Popen[bytes], exit_poll: select.poll | None, timeout: float) -> bool:
    """Whether the process exited (and is reaped) within ``timeout`` seconds."""
    if exit_poll is None:
        # Popen.wait with a timeout polls (up to 50 ms apart); only where pidfds are missing.
        try:
            popen.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False
    if not exit_poll.poll(timeout * 1000):
        return False
    popen.wait()  # the pidfd is readable once the process has exited: this only reaps it
    return True


def _tag_of(table: Mapping[int, ProcRow], pid: int) -> str | None:
    return table.tag(pid) if isinstance(table, ProcTable) else env_tag(pid)


def leftover_tree(agent_id: str, root: int, root_start: int, table: ProcTable) -> set[int]:
    """The live processes of an agent nobody supervises any more (its manager died): the root if it is still
    that process, its descendants, its process group and session, and processes carrying its tag; none older
    than the root, never this process or its ancestors."""
    roots = {root} if root in table and table[root].start == root_start else set()
    found = descendants(roots, table) | _groups_of(root, root_start, table)
    found |= {row.pid for row in table.values() if row.start >= root_start and _tag_of(table, row.pid) == agent_id}
    me = _self_and_ancestors(table)
    return {p for p in found if table[p].alive and table[p].start >= root_start and p not in me}


def _groups_of(root: int, root_start: int | None, table: Mapping[int, ProcRow]) -> set[int]:
    """The members of the root's process group and session, if ``root`` still names them (when its start
    time could not be read at spawn, as if it did)."""
    holder = table.get(root)
    if holder is not None and root_start is not None and holder.start != root_start:
        return set()  # the root is gone and its pid reused: a group of that id is another process's
    return group_members(root, table)


def kill_exactly(starts: Mapping[int, int], settle: float = 3.0) -> tuple[set[int], list[int]]:
    """SIGKILL each process (pid -> start ticks) that is still that process; (killed, survivors after
    ``settle`` seconds)."""
    killed = {pid for pid, start in starts.items() if _signal(pid, start, signal.SIGKILL)}
    return killed, _wait_gone(starts, starts, settle)


def kill_tree(agent: AgentProcess, *, rounds: int = 10, settle: float = 3.0,
              tables: SharedProcessTable | None = None) -> tuple[int, list[int]]:
    """SIGKILL every process of the agent's tree until none is left.

    Returns (how many processes were killed, survivors). Repeated because a member may fork between a scan
    and its kill; each new child is still a descendant, a group or session member, or tagged.
    """
    killed: set[int] = set()
    survivors: list[int] = []
    tables = tables or SharedProcessTable()
    moment = time.monotonic()  # a scan begun from now on sees what is left of the tree
    for _ in range(rounds):
        table = tables.after(moment)
        victims = agent.collect(table)
        if not victims:
            survivors = []
            break
        done, survivors = kill_exactly({p: table[p].start for p in victims}, settle)
        killed |= done
        moment = time.monotonic()
    _reap(agent)
    return len(killed - {agent.pid}), survivors


def _signal(pid: int, start: int, sig: int) -> bool:
    """Signal exactly the process (pid, start): through a pidfd opened and checked first when possible."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        fd = None
    try:
        if _start_of(pid) != start:
            return False
        if fd is not None:
            signal.pidfd_send_signal(fd, sig)
        else:
            os.kill(pid, sig)
        return True
    except (ProcessLookupError, PermissionError, OSError):
        return False
    finally:
        if fd is not None:
            os.close(fd)


def _start_of(pid: int) -> int | None:
    try:
        return parse_stat(pid, read_file(f"/proc/{pid}/stat") or b"").start
    except (ValueError, IndexError):
        return None


def _alive(pid: int, start: int) -> bool:
    try:
        row = parse_stat(pid, read_file(f"/proc/{pid}/stat") or b"")
    except (ValueError, IndexError):
        return False
    return row.start == start and row.alive


def _wait_gone(pids: Iterable[int], starts: Mapping[int, int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    left = sorted(pids)
    while left:
        left = [p for p in left if _alive(p, starts[p])]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.005)
    return left


def _reap(agent: AgentProcess) -> None:
    try:
        agent.popen.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _self_and_ancestors(table: Mapping[int, ProcRow]) -> set[int]:
    """This process and its ancestors: never victims, even if they carry the tag (a nested manager)."""
    found, pid = set(), os.getpid()
    while pid in table and pid not in found:
        found.add(pid)
        pid = table[pid].ppid
    return found


def tail(path: Path, chars: int = 4000) -> str:
    """The last ``chars`` characters of a text file (decoded leniently); empty if missing."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - chars * 4))
            data = fh.read()
    except OSError:
        return ""
    return data.decode("utf-8", "replace")[-chars:]


def signal_name(returncode: int | None) -> str | None:
    """``SIGKILL`` for a returncode of -9, None for a normal exit."""
    if returncode is None or returncode >= 0:
        return None
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from a file, or None when it is missing or not a JSON object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# -- the agent's environment ----------------------------------------------------------------------------
def split_model_url(url: str) -> tuple[str, str, str]:
    """(root URL, ``host:port``, path) of a model server base URL; ConfigError when it is not one."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"model URL {url!r} is not an http(s) URL")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = url_host(parts.hostname)
    return f"{parts.scheme}://{host}:{port}", f"{host}:{port}", parts.path.rstrip("/")


def model_env(model_url: str | None, base_env: Mapping[str, str], *, reverse_url: str | None = None,
              agent_id: str = "", token: str = "", routed: bool = False) -> dict[str, str]:
    """OPENAI_BASE_URL/OPENAI_API_BASE for the agent (through the reverse listener in base-URL mode).

    A placeholder OPENAI_API_KEY is added when none is set: SDKs refuse to start without one, and a local
    model server does not check it. Without a model URL only where the proxy ``routed`` a hard-wired endpoint
    (api.openai.com, say) to the model: elsewhere a key's presence may choose the agent's provider.
    """
    placeholder = {} if base_env.get("OPENAI_API_KEY") else {"OPENAI_API_KEY": "sk-rollouttap-local"}
    if model_url is None:
        return placeholder if routed else {}
    base = model_url.rstrip("/")
    if reverse_url is not None:
        path = split_model_url(model_url)[2]
        base = f"{reverse_url}/agents/{quote(agent_id, safe='')}/{quote(token, safe='')}{path}"
    return {"OPENAI_BASE_URL": base, "OPENAI_API_BASE": base, **placeholder}


def agent_environment(base: Mapping[str, str], *, proxy: Mapping[str, str], model: Mapping[str, str],
                      user: Mapping[str, str], spec: Mapping[str, str]) -> dict[str, str]:
    """The agent's environment: the caller's, model defaults, the user's and the spec's, then the proxy's.

    The proxy's variables come last: an agent must reach the model through its own proxy with its own
    credentials, and an inherited NO_PROXY must not exempt the model server.
    """
    env = {k: v for k, v in base.items() if k != AGENT_ENV}
    for layer in (model, user, spec, proxy):
        env.update(layer)
    return env
