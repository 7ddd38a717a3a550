"""Benchmark 3: what attributing one new connection costs with 10 / 100 / 1,000 extra live processes.

The extra processes are ``sleep 600`` (killed at the end, and gone by themselves after ten minutes).
An "agent" process opens connections to a listener in this process; each accepted connection is then
attributed as the proxy does (``PidAttributor.resolve``), and the naive way (``psutil.net_connections``)
is timed beside it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from collections.abc import Iterator

import psutil

from context import Context, progress
from procs import PY
from report import Section, table
from rollouttap.addon.attribution import AgentDirectory, PidAttributor
from rollouttap.addon.procfs import SocketOwnerFinder, ancestry
from rollouttap.addon.sockdiag import socket_inode
from rollouttap.store import Store
from stats import percentile, spread

TITLE = "3. Attribution cost per new connection"
GOAL_MS = 0.1
AGENT_ID = "bench-agent"
NEW_PROCESSES = "new processes, running attributor"
NEW_REGISTERED = "new processes of a registered agent, running attributor"
RECONNECTING = "a registered agent's process reconnecting, running attributor"
WHO = ("new agent", "old agent", NEW_PROCESSES, NEW_REGISTERED, RECONNECTING)
_AGENT_CODE = """
import socket, sys
conns = [socket.create_connection(("127.0.0.1", int(sys.argv[1]))) for _ in range(int(sys.argv[2]))]
print("OK", flush=True)
sys.stdin.read()
"""
# A registered agent's root, as deploy() launches one: it starts a child (that opens one connection) per line
# it reads, reports the child's pid, and ends the child at the next line.
_ROOT_CODE = """
import subprocess, sys
for line in sys.stdin:
    child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2], "1"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    print(child.pid, child.stdout.readline().strip(), flush=True)
    sys.stdin.readline()
    child.kill()
    child.wait()
"""

# An agent that opens a new connection per call (urllib, curl): a new connection, the one before closed, per line.
_RECONNECT_CODE = """
import socket, sys
conn = None
for line in sys.stdin:
    if conn is not None:
        conn.close()
    conn = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
    print("OK", flush=True)
"""


@contextmanager
def sleepers(count: int) -> Iterator[list[subprocess.Popen]]:
    """``count`` idle processes; each one is killed (by its own pid) on the way out."""
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(count):
            procs.append(subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        yield procs
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


@contextmanager
def agent(listener: socket.socket, conns: int) -> Iterator[tuple[subprocess.Popen, list[socket.socket]]]:
    """A tagged process holding ``conns`` connections to ``listener``; yields it and our accepted ends."""
    env = {**os.environ, "ROLLOUTTAP_AGENT_ID": AGENT_ID}
    proc = subprocess.Popen([PY, "-c", _AGENT_CODE, str(listener.getsockname()[1]), str(conns)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    accepted: list[socket.socket] = []
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "OK":
            raise RuntimeError("attribution agent did not connect")
        listener.settimeout(10)
        accepted = [listener.accept()[0] for _ in range(conns)]
        yield proc, accepted
    finally:
        for conn in accepted:
            conn.close()
        proc.kill()
        proc.wait()


def once(fn: Callable[..., Any], *args: Any) -> tuple[float, Any]:
    """(milliseconds, result) of one call."""
    t0 = time.perf_counter_ns()
    result = fn(*args)
    return (time.perf_counter_ns() - t0) / 1e6, result


def naive_pid(peer: tuple[str, int]) -> int | None:
    """The psutil way: list every TCP connection of every process and find the client's address."""
    for conn in psutil.net_connections(kind="tcp"):
        if conn.laddr and (conn.laddr.ip, conn.laddr.port) == peer:
            return conn.pid
    return None


def measure_agent(attributor: PidAttributor, accepted: list[socket.socket], expect_pid: int,
                  naive_reps: int) -> dict[str, Any]:
    """Per-connection costs for one agent's connections; checks every lookup found the agent."""
    rows: dict[str, list[float]] = {"inode": [], "find": [], "ancestry": [], "resolve cold": [], "resolve warm": [],
                                    "psutil": []}
    wrong: dict[str, int] = {}
    psutil_missed = 0
    for i, conn in enumerate(accepted):
        peer, sock = conn.getpeername()[:2], conn.getsockname()[:2]
        t, inode = once(socket_inode, peer, sock)
        rows["inode"].append(t)
        t, pid = once(SocketOwnerFinder().find, inode)
        rows["find"].append(t)
        rows["ancestry"].append(once(ancestry, expect_pid)[0])
        attributor.finder = SocketOwnerFinder()  # a process it has never seen
        t, cold = once(attributor.resolve, peer, sock)
        rows["resolve cold"].append(t)
        t, warm = once(attributor.resolve, peer, sock)
        rows["resolve warm"].append(t)
        if i < naive_reps:
            t, naive = once(naive_pid, peer)
            rows["psutil"].append(t)
            psutil_missed += naive != expect_pid  # psutil's own race with the process table, not ours
        _count(wrong, "find", pid != expect_pid)
        _count(wrong, f"resolve cold: {cold.detail}", cold.agent_id != AGENT_ID)
        _count(wrong, f"resolve warm: {warm.detail}", warm.agent_id != AGENT_ID)
    return {"ms": rows, "wrong": sum(wrong.values()), "wrong_by": wrong, "psutil_missed": psutil_missed}


@contextmanager
def registered(args: list[str], store: Path, agent_id: str) -> Iterator[subprocess.Popen[str]]:
    """``python -c *args`` with the agent's tag, registered as its root (pid and start time) as deploy() registers
    one; killed, and its agent ended, on the way out."""
    env = {**os.environ, "ROLLOUTTAP_AGENT_ID": agent_id}
    proc = subprocess.Popen([PY, "-c", *args], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    registry = Store(str(store))
    try:
        registry.register_agent(agent_id)
        registry.agent_started(agent_id, proc.pid)
        yield proc
    finally:
        proc.kill()
        proc.wait()
        registry.agent_ended(agent_id, "ok")
        registry.close()


def measure_new_processes(attributor: PidAttributor, listener: socket.socket, n: int) -> dict[str, Any]:
    """An attributor that has served lookups before meets the first connection of ``n`` processes started one
    after another (each a new pid under the same parents), tagged by hand (no registered agent)."""
    ms: list[float] = []
    wrong_by: dict[str, int] = {}
    for _ in range(n):
        with agent(listener, 1) as (proc, [conn]):
            t, found = once(attributor.resolve, conn.getpeername()[:2], conn.getsockname()[:2])
            ms.append(t)
            _count(wrong_by, f"resolve: {found.detail}", found.pid != proc.pid or found.agent_id != AGENT_ID)
    return _new_result(ms, wrong_by)


def measure_registered(attributor: PidAttributor, listener: socket.socket, n: int, store: Path,
                       agent_id: str) -> dict[str, Any]:
    """The same for ``n`` children of a registered agent's root, as deploy() runs agents: the root is registered
    with its pid and start time, its children carry its tag."""
    ms: list[float] = []
    wrong_by: dict[str, int] = {}
    with registered([_ROOT_CODE, _AGENT_CODE, str(listener.getsockname()[1])], store, agent_id) as root:
        assert root.stdin is not None and root.stdout is not None
        listener.settimeout(10)
        for _ in range(n):
            root.stdin.write("go\n")
            root.stdin.flush()
            answer = root.stdout.readline().split()  # "" when the root died; "PID" alone if its child failed
            if len(answer) != 2 or answer[1] != "OK":
                _count(wrong_by, f"the registered agent's child did not connect: {answer!r}", True)
                break
            pid = answer[0]
            conn = listener.accept()[0]
            with conn:
                t, found = once(attributor.resolve, conn.getpeername()[:2], conn.getsockname()[:2])
            ms.append(t)
            if found.pid != int(pid) or found.agent_id != agent_id:
                _count(wrong_by, f"resolve: {found.detail}", True)
            root.stdin.write("done\n")
            root.stdin.flush()
    return _new_result(ms, wrong_by)


def measure_reconnecting(attributor: PidAttributor, listener: socket.socket, n: int, store: Path,
                         agent_id: str) -> dict[str, Any]:
    """A registered agent's process that opens a new connection per call, as the proxy meets it: each new
    connection looked up on the event loop from what earlier lookups cached (``resolve_cached``), or by
    ``resolve`` when that needs more (a thread's work in the proxy: counted); every answer checked against
    ``resolve``'s of the same connection."""
    ms: dict[str, list[float]] = {"resolve cached": []}
    wrong_by: dict[str, int] = {}
    to_thread = 0
    with registered([_RECONNECT_CODE, str(listener.getsockname()[1])], store, agent_id) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        listener.settimeout(10)
        for i in range(n + 1):  # the first connection is the process's first: looked up the full way
            proc.stdin.write("go\n")
            proc.stdin.flush()
            if proc.stdout.readline().strip() != "OK":
                _count(wrong_by, "the agent did not connect", True)
                break
            with listener.accept()[0] as conn:
                peer, sock = conn.getpeername()[:2], conn.getsockname()[:2]
                t, found = once(attributor.resolve_cached, peer, sock)
                if i and found is not None:
                    ms["resolve cached"].append(t)
                if found is None:
                    to_thread += bool(i)
                    found = attributor.resolve(peer, sock)
                again = attributor.resolve(peer, sock)
            _count(wrong_by, f"resolve: {found.detail}", found.pid != proc.pid or found.agent_id != agent_id)
            _count(wrong_by, "resolve_cached answered otherwise than resolve", again != found)
            attributor.connection_closed(proc.pid)  # as the proxy does when a client connection ends
    return {"ms": ms, "wrong": sum(wrong_by.values()), "wrong_by": wrong_by, "psutil_missed": 0,
            "to_thread": to_thread, "connections": n}


def _new_result(ms: list[float], wrong_by: dict[str, int]) -> dict[str, Any]:
    return {"ms": {"resolve cold": ms}, "wrong": sum(wrong_by.values()), "wrong_by": wrong_by, "psutil_missed": 0}


def _count(counts: dict[str, int], name: str, missed: bool) -> None:
    if missed:
        counts[name] = counts.get(name, 0) + 1


def one_size(ctx: Context, extra: int, directory: AgentDirectory, store: Path, rep: int) -> dict[str, Any]:
    """Old agent (started before the extra processes: lowest pid) and new agent (started after)."""
    conns = ctx.plan.attribution_conns
    naive_reps = max(1, min(conns, 10))
    with socket.create_server(("127.0.0.1", 0), backlog=conns * 2 + 8) as listener:
        with agent(listener, conns) as (old, old_accepted), sleepers(extra):
            with agent(listener, conns) as (new, new_accepted):
                attributor = PidAttributor(directory)
                processes = len(psutil.pids())
                result = {"processes": processes,
                          "new agent": measure_agent(attributor, new_accepted, new.pid, naive_reps),
                          "old agent": measure_agent(attributor, old_accepted, old.pid, naive_reps)}
            result[NEW_PROCESSES] = measure_new_processes(attributor, listener, max(2, conns // 2))
            result[NEW_REGISTERED] = measure_registered(attributor, listener, max(2, conns // 2), store,
                                                        f"bench-registered-{extra}-{rep}")
            result[RECONNECTING] = measure_reconnecting(attributor, listener, conns, store,
                                                        f"bench-reconnecting-{extra}-{rep}")
            return result


def run(ctx: Context) -> Section:
    store = ctx.workdir / "attribution.db"
    directory = AgentDirectory(str(store))
    runs: dict[int, list[dict[str, Any]]] = {}
    try:
        for extra in ctx.plan.attribution_procs:
            runs[extra] = []
            for rep in range(ctx.plan.repeats):
                progress(f"attribution: {extra} extra processes, run {rep + 1}/{ctx.plan.repeats}")
                runs[extra].append(one_size(ctx, extra, directory, store, rep))
    finally:
        directory.close()
    return Section("attribution", TITLE, render(ctx, runs), {"runs": _jsonable(runs)},
                   "error" if any(r[a]["wrong"] for rs in runs.values() for r in rs
                                  for a in WHO) else "ok")


def render(ctx: Context, runs: dict[int, list[dict[str, Any]]]) -> str:
    rows, misses = [], []
    for extra, reps in runs.items():
        for who in WHO:
            cells = []
            for name in ("inode", "find", "ancestry", "resolve cold", "resolve warm", "resolve cached", "psutil"):
                got = [percentile(r[who]["ms"][name], 50) for r in reps if r[who]["ms"].get(name)]
                cells.append(spread(got).fmt(3) if got else "")
            # What a new connection costs: the first of a process the full way, a reconnecting one's on the loop
            first = "resolve cold" if who != RECONNECTING else "resolve cached"
            cost = [percentile(r[who]["ms"][first], 50) for r in reps if r[who]["ms"].get(first)]
            judged = ("yes" if spread(cost).median <= GOAL_MS else "**no**") if cost else ""
            on_loop = (f"{sum(r[who]['connections'] - r[who]['to_thread'] for r in reps)} of "
                       f"{sum(r[who]['connections'] for r in reps)}" if who == RECONNECTING else "")
            rows.append((extra, reps[0]["processes"], who, *cells, on_loop, judged,
                         sum(r[who]["wrong"] for r in reps), sum(r[who]["psutil_missed"] for r in reps)))
            misses += [f"- {extra} extra, {who}: {k} ×{n}" for r in reps for k, n in r[who]["wrong_by"].items()]
    return (f"Per new connection, p50 ms over {ctx.plan.attribution_conns} connections, {ctx.plan.repeats} runs. "
            "`inode`: netlink sock_diag 4-tuple → inode; `find`: `SocketOwnerFinder.find` (fresh, no memory) → "
            "pid; `ancestry`: reading the owner's and its ancestors' stat and environ (`procfs.ancestry`); "
            "`resolve cold`: `PidAttributor.resolve` (inode, owner, ancestry, tag) with a fresh finder, "
            "i.e. the first connection of a process never seen; `resolve warm`: the same process again "
            "(finder remembers recent owners); `psutil`: `psutil.net_connections()` scanned for the client "
            "address. New agent = started after the extra processes (highest pid); old agent = before "
            "(the owner search meets every newer process first). `new processes, running attributor`: one "
            "attributor that has served lookups before and the first connection of each of "
            f"{max(2, ctx.plan.attribution_conns // 2)} processes started one after another (its `resolve cold` "
            "column), tagged by hand: no agent registered, so each lookup also reads the store for what the tag "
            "names (an ended agent's tag must not attribute) and re-reads the live agents (at most every 50 ms). "
            "`new processes of a registered agent`: the same for children of a root registered as deploy() "
            "registers an agent's (pid and start time; the children carry its tag). `a registered agent's "
            "process reconnecting`: one such process opening a new connection per call (the one before closed, "
            f"as urllib or curl do), {ctx.plan.attribution_conns} after its first: `resolve cached` is the proxy's "
            "lookup on its event loop from what earlier lookups cached (`PidAttributor.resolve_cached`: the "
            "netlink answer, the owner among the sockets of processes that reconnect, its stat file; no store "
            "row, environ or lock), `on the event loop` how many it answered (the rest need a store read, e.g. "
            "once the live agents are a second old, and go to a thread in the proxy); a thread hand-off costs "
            "more than this lookup (section 7). "
            "`wrong` counts rollouttap lookups that missed the agent, or a cached answer that differs from the "
            "full lookup's (must be 0). The goal column judges `resolve cold`, and `resolve cached` where a "
            "process reconnects.\n\n"
            + table(["extra procs", "procs on host", "agent", "inode", "find", "ancestry", "resolve cold",
                     "resolve warm", "resolve cached", "psutil", "on the event loop", f"≤ {GOAL_MS} ms", "wrong",
                     "psutil missed"], rows)
            + ("\n\nMissed lookups:\n\n" + "\n".join(misses) if misses else ""))


def _jsonable(runs: dict[int, list[dict[str, Any]]]) -> dict[str, Any]:
    return {str(k): [{"processes": r["processes"],
                      **{who: {"wrong": r[who]["wrong"], "wrong_by": r[who]["wrong_by"],
                               "psutil_missed": r[who]["psutil_missed"], "to_thread": r[who].get("to_thread"),
                               "connections": r[who].get("connections"),
                               "p50": {n: percentile(v, 50) for n, v in r[who]["ms"].items() if v}}
                         for who in WHO}} for r in v] for k, v in runs.items()}

