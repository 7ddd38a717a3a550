"""Linux /proc readers for attribution: who owns a socket inode, a process's parent and its agent tag."""

from __future__ import annotations

import functools
import os
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass

AGENT_ENV = "ROLLOUTTAP_AGENT_ID"
_AGENT_ENV_PREFIX = (AGENT_ENV + "=").encode()
_CHUNK = 65536


class NotCached(Exception):
    """A lookup made for the event loop would have to read what can block: a process's environ or cmdline (the
    kernel takes that process's memory lock, which it may hold for long), a store row or many fd tables."""


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    start_ticks: int  # field 22 of /proc/<pid>/stat: tells a reused pid apart
    agent_tag: str | None


def read_file(path: str) -> bytes | None:
    """The whole file, or None if it cannot be read (a process that is gone). os.open: a third of open()'s cost."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        first = os.read(fd, _CHUNK)
        if len(first) < _CHUNK:
            # /proc answers a file that fits in one read (stat, status, environ): no second read to
            # see the end. A read of a regular file is only short at its end.
            return first
        chunks = [first]
        while chunk := os.read(fd, _CHUNK):
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


def read_proc(pid: int, proc: str = "/proc") -> ProcInfo | None:
    """Parent, start time and ROLLOUTTAP_AGENT_ID tag of one process; None if it is gone."""
    stat = read_file(f"{proc}/{pid}/stat")
    environ = read_file(f"{proc}/{pid}/environ") if stat else None
    if not stat or environ is None:
        return None
    return ProcInfo(pid, *parse_stat(stat), parse_agent_tag(environ))


def parse_stat(stat: bytes) -> tuple[int, int]:
    """(ppid, start_ticks) from /proc/<pid>/stat; the command name may hold spaces and parentheses."""
    fields = stat[stat.rindex(b")") + 2:].split()
    return int(fields[1]), int(fields[19])


def parse_agent_tag(environ: bytes) -> str | None:
    """The ROLLOUTTAP_AGENT_ID value in a NUL-separated exec-time environment (its first entry)."""
    if environ.startswith(_AGENT_ENV_PREFIX):
        start = len(_AGENT_ENV_PREFIX)
    else:
        start = environ.find(b"\0" + _AGENT_ENV_PREFIX)
        if start == -1:
            return None
        start += 1 + len(_AGENT_ENV_PREFIX)
    end = environ.find(b"\0", start)
    value = environ[start:end if end != -1 else len(environ)].decode("utf-8", "replace")
    return value or None


# How far up a process's ancestors are read. A chain this long whose last process has a parent was cut there: its
# sender is not known (``cut_short``).
ANCESTRY_DEPTH = 64


def cut_short(chain: list[ProcInfo], limit: int = ANCESTRY_DEPTH) -> bool:
    """Whether ``chain`` stopped at the depth limit with ancestors above it unread."""
    return len(chain) >= limit and chain[-1].ppid > 0


def ancestry(pid: int, proc: str = "/proc", limit: int = ANCESTRY_DEPTH) -> list[ProcInfo]:
    """The process and its ancestors, nearest first, up to (not including) pid 0."""
    chain: list[ProcInfo] = []
    while pid > 0 and len(chain) < limit:
        info = read_proc(pid, proc)
        if info is None:
            break
        chain.append(info)
        pid = info.ppid
    return chain


# Stat files that lookups on the event loop keep open (see StatFiles): a descriptor per process that reconnects.
KEPT_STAT_FILES = 64


class StatFiles:
    """``/proc/<pid>/stat`` of the processes read lately, kept open and read again with one ``pread`` instead of an
    open, a read and a close (in a proxy under new connections, the cached lookup's chain took 27 µs at the median
    and 137 at p90 reading by path, 20 and 39 so). An open stat file stays bound to the process it was opened
    for: once that process is reaped it answers ESRCH, and the pid, reused or not, is opened afresh. For procfs
    alone: a deleted regular file (a test's fake tree) stays readable through an open descriptor."""

    def __init__(self, proc: str = "/proc", size: int = KEPT_STAT_FILES) -> None:
        self.proc = proc
        self.size = size
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._lock = threading.Lock()  # no descriptor is closed while another thread reads it
        weakref.finalize(self, _close_all, self._fds)

    def read(self, pid: int) -> bytes | None:
        """The process's stat line, or None if it is gone."""
        with self._lock:
            fd = self._fds.get(pid)
            if fd is not None:
                try:
                    if data := os.pread(fd, _CHUNK, 0):
                        self._fds.move_to_end(pid)
                        return data
                except OSError:
                    pass
                del self._fds[pid]
                os.close(fd)
            try:
                fd = os.open(f"{self.proc}/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return None
            try:
                data = os.pread(fd, _CHUNK, 0)
            except OSError:
                os.close(fd)
                return None
            self._fds[pid] = fd
            if len(self._fds) > self.size:
                os.close(self._fds.popitem(last=False)[1])
            return data or None

    def close(self) -> None:
        with self._lock:
            _close_all(self._fds)


def _close_all(fds: dict[int, int]) -> None:
    for fd in fds.values():
        os.close(fd)
    fds.clear()


class AncestryCache:
    """``ancestry`` for attribution, cached for ``max_age`` seconds: each process's agent tag (by pid
    and start time), a socket owner's whole chain as long as the owner keeps its start time and parent,
    and the chain above every process read (by pid). Agents open many connections from the same
    processes, and new ones start under the same manager and shells every time: a new process costs its
    own stat and environ, the rest of its chain comes from its parent's entry.

    Within ``max_age`` an exec with another environment, or an ancestor further up re-parented, goes
    unnoticed, as a new registration does in ``AgentDirectory`` (the same one second). A reused parent pid
    does not: the parent's stat is read again before its cached chain is taken (same start time and parent:
    the same process, under the same ancestors, as a process is re-parented the moment its parent exits). A
    cached chain is as old as its oldest part: reusing one never makes it fresher.
    """

    def __init__(self, proc: str = "/proc", size: int = 4096, max_age: float = 1.0) -> None:
        self.proc = proc
        self.max_age = max_age
        self._tags: dict[tuple[int, int], tuple[float, str | None]] = {}
        self._chains: dict[tuple[int, int], tuple[float, list[ProcInfo]]] = {}
        self._above: dict[int, tuple[float, list[ProcInfo]]] = {}  # pid -> (read at, its chain)
        self._cmdlines: dict[tuple[int, int, bytes], tuple[float, bool]] = {}  # (pid, start, needle) -> (at, held)
        self._size = size
        # Lookups on the event loop read the same few processes' stat files over and over (processes that reconnect).
        self._stat_files = StatFiles(proc) if proc == "/proc" else None

    def chain(self, pid: int, limit: int = ANCESTRY_DEPTH, *, cached: bool = False) -> list[ProcInfo]:
        """What ``ancestry(pid)`` answers (or answered less than ``max_age`` ago). ``cached``: stat files alone
        are read, NotCached when a process's tag is not in the cache."""
        now = time.monotonic()
        owner = self._read(pid, now, cached)
        if owner is None:
            return []
        key = (pid, owner.start_ticks)
        kept = self._chains.get(key)
        if kept is not None and now - kept[0] < self.max_age and kept[1][0] == owner:
            return list(kept[1])
        chain, read_at = [owner], now
        read = 0  # how many of the chain's processes this call read itself (0: all of them)
        parent = owner.ppid
        while parent > 0 and len(chain) < limit:
            above = self._above.get(parent)  # one lookup: another thread may clear the cache meanwhile
            if above is not None and now - above[0] < self.max_age and self._unchanged(above[1][0]):
                read = len(chain)
                chain.extend(above[1][:limit - len(chain)])
                read_at = above[0]
                break
            info = self._read(parent, now, cached)
            if info is None:
                break
            chain.append(info)
            parent = info.ppid
        self._remember(self._chains, key, (read_at, chain))
        if cut_short(chain, limit):  # its tails lack what lies above the cut: taken for whole, they would hide it
            return list(chain)
        for i in range(read or len(chain)):  # the entries above those keep their own age
            self._remember(self._above, chain[i].pid, (read_at, chain[i:]))
        return list(chain)

    def _unchanged(self, info: ProcInfo) -> bool:
        """Whether ``info.pid`` still names the process ``info`` was read from, under the same parent."""
        stat = self._stat_files.read(info.pid) if self._stat_files is not None else \
            read_file(f"{self.proc}/{info.pid}/stat")
        return stat is not None and bool(stat) and parse_stat(stat) == (info.ppid, info.start_ticks)

    def _read(self, pid: int, now: float, cached: bool = False) -> ProcInfo | None:
        if cached and self._stat_files is not None:
            stat = self._stat_files.read(pid)
        else:
            stat = read_file(f"{self.proc}/{pid}/stat")
        if not stat:
            return None
        ppid, start = parse_stat(stat)
        key = (pid, start)
        known = self._tags.get(key)  # one lookup: another thread may clear the cache meanwhile
        if known is not None and now - known[0] < self.max_age:
            return ProcInfo(pid, ppid, start, known[1])
        if cached:
            raise NotCached(f"the tag of pid {pid}")
        environ = read_file(f"{self.proc}/{pid}/environ")
        if environ is None:
            return None
        tag = parse_agent_tag(environ)
        self._remember(self._tags, key, (now, tag))
        return ProcInfo(pid, ppid, start, tag)

    def cmdline_has(self, info: ProcInfo, needle: bytes, *, cached: bool = False) -> bool:
        """Whether the process's command line holds ``needle``, read now; ``cached``: as read less than ``max_age``
        ago (only an exec changes it, and its tag goes as stale), NotCached when it was not."""
        key = (info.pid, info.start_ticks, needle)
        now = time.monotonic()
        if cached:
            seen = self._cmdlines.get(key)  # one lookup: another thread may clear the cache meanwhile
            if seen is None or now - seen[0] >= self.max_age:
                raise NotCached(f"the command line of pid {info.pid}")
            return seen[1]
        cmdline = read_file(f"{self.proc}/{info.pid}/cmdline")
        held = cmdline is not None and needle in cmdline
        self._remember(self._cmdlines, key, (now, held))
        return held

    def _remember(self, cache: dict, key: object, value: object) -> None:
        if len(cache) >= self._size:
            cache.clear()  # crude, but bounded; it refills within a few lookups
        cache[key] = value


# Descriptors a quick lookup reads of one process at most (an agent holds tens): beyond it, only the full lookup,
# on a thread of its own, reads the table (one process holding 19,000 cost ~0.1 s). Over a few hundred it is the
# launcher's (AgentManager: ~3 per running agent), read in every lookup of a batch's first connections otherwise.
QUICK_FD_LIMIT = 256
# Known socket fds of one process a lookup reads at most (a process that reconnects: one link per socket it held).
SOCKET_FDS_LIMIT = 1024
# A table of at least this many descriptors is read once per lookup, however many of its process's threads the
# lookup probes (a thread's /proc entry serves its process's fd table): one read of the group's task list marks
# them all. Below it, reading the table again costs about what listing the threads would.
GROUP_CHECK_MIN = 16
# Registered roots never yet found holding a connection, oldest first, that a lookup reads before the newest pids
# (the rest of them right after those): agents started together connect about in the order they started, and other
# pids (their launcher's threads, this proxy's) come between them. A root read first in ROOT_MISSES lookups that
# were not its own (one whose children connect, say) is left to the rest of the search from then on.
ROOT_PROBES = 8
ROOT_MISSES = 4
# Pids handed out since the last lookup that it probes at most, newest first (one stat each; there are more only
# when lookups are far apart, and a process then started connects later than its first lookup would have come).
NEW_PIDS_PROBED = 64
# Fd links a lookup on the event loop reads at most (``find_known``): a few microseconds each, and wasted for a
# process's first connection (a thread finds that one).
KNOWN_LINKS_BUDGET = 8


class SocketOwnerFinder:
    """Finds the process holding a socket inode without reading every process's fd table when it can.

    A process holds the socket if one of its fd links reads ``socket:[inode]``: the only proof, and
    each link costs a syscall. So the search tries, in this order: where the socket was already seen
    while looking for another one (many agents connecting at once); the socket fds of processes whose
    connection just closed (``closed``) or that owned a recent one (a client that reconnects reuses the
    freed fd); processes started since the last lookup (pids are handed out in order: probed down from
    ``ns_last_pid``), after the registered roots none of whose connections was found yet (a batch of agents
    started together); the socket fds of every process read before; then whole fd tables: recent owners,
    processes found lately, descendants of the given roots (registered agents), and every process,
    newest first.
    """

    def __init__(self, proc: str = "/proc", remember: int = 64, young: int = 512, seen: int = 65536) -> None:
        self.proc = proc
        self._recent: OrderedDict[int, None] = OrderedDict()
        self._remember = remember
        self._closed: OrderedDict[int, None] = OrderedDict()
        self._young: deque[int] = deque(maxlen=young)
        self._high = 0  # highest pid handed out at the last lookup
        self._socket_fds: dict[int, tuple[str, ...]] = {}  # pid -> its fds that held sockets when read
        self._seen: OrderedDict[str, tuple[int, str]] = OrderedDict()  # socket link -> (pid, fd)
        self._seen_max = seen
        self._root_tries: dict[tuple[int, object], int] = {}  # root -> lookups it missed first; -1: it held one
        self._roots_read: object = None  # the roots _due_roots was made from
        self._due_roots: list[tuple[int, object]] = []  # those still read first, oldest first
        self._lock = threading.Lock()  # resolve() runs on several pool threads
        self.scanned_last = 0

    def find(self, inode: int, roots: Iterable[int] = (), *, everywhere: bool = True,
             first: int | None = None) -> int | None:
        """The pid of a process holding ``socket:[inode]``, or None; without ``everywhere`` only where it is
        likely (never the whole fd tables of agents' trees and of every process: the costly part). ``first``: a
        process whose tree is read before the rest (the root of the agent the connection claims to be)."""
        target = f"socket:[{inode}]"
        self.scanned_last = 0
        if not isinstance(roots, Collection):  # read more than once below
            roots = tuple(roots)
        read: set[int] = set()  # fd tables read whole in this lookup
        pid = self._where_seen(target)
        if pid is None:
            pid = self._search(target, self._quick_candidates(), self._holds_socket_fds, set())
        # A quick lookup leaves processes with very many descriptors to the full one: their tables cost the most.
        holds = functools.partial(self._holds, limit=None if everywhere else QUICK_FD_LIMIT, read=read)
        if pid is None and first is not None and first > 0:
            pid = self._search(target, self._tree(first), holds, read)
            if pid is not None:
                self._root_served(first, roots)
        if pid is None:
            pid = self._search_roots(target, roots, holds, read, first=True)
        if pid is None:
            pid = self._search(target, self._new_pids(), holds, read)
        if pid is None:
            pid = self._search_roots(target, roots, holds, read, first=False)
        if pid is None:
            pid = self._search(target, self._quick_candidates(skip=read), self._holds_socket_fds, set())
        if pid is None:
            pid = self._search(target, self._candidates(roots, everywhere), holds, read)
        return self._owner(pid, target)

    def find_among_roots(self, inode: int, roots: Mapping[int, object]) -> int | None:
        """``find`` among the registered roots alone that have not yet held a looked-up socket (those of agents
        registered since the caller last read them, say): whole tables of up to QUICK_FD_LIMIT descriptors."""
        target = f"socket:[{inode}]"
        self.scanned_last = 0
        read: set[int] = set()
        holds = functools.partial(self._holds, limit=QUICK_FD_LIMIT, read=read)
        return self._owner(self._search_roots(target, roots, holds, read, first=False), target)

    def _owner(self, pid: int | None, target: str) -> int | None:
        """The process of the pid found holding ``target`` (a thread's id maps to it), noted as a recent owner."""
        if pid is None:
            return None
        owner = self._process_of(pid)
        if owner != pid:
            self._adopt(pid, owner)
        self._note(owner, target)
        return owner

    def find_known(self, inode: int, budget: int = KNOWN_LINKS_BUDGET) -> int | None:
        """``find`` among what earlier lookups left alone (a socket seen while searching, the socket fds of
        processes whose connection closed or that owned a recent one), reading at most ``budget`` fd links and
        no other file: a process that reconnects, for a caller that must not wait. None when not found so."""
        target = f"socket:[{inode}]"
        pid = self._where_seen(target, found_before=True)
        if pid is None:
            for candidate in self._quick_candidates():
                with self._lock:
                    links = len(self._socket_fds.get(candidate, ()))
                if links > budget:
                    break
                if self._holds_socket_fds(candidate, target, limit=budget):
                    pid = candidate
                    break
                budget -= links
        with self._lock:
            known = pid in self._recent  # else maybe a thread's id, which only its status file maps to the process
        if pid is None or not known:
            return None
        self._note(pid, target)
        return pid

    def closed(self, pid: int) -> None:
        """A connection of ``pid`` ended: its next one is likely the next to look up."""
        with self._lock:
            self._closed[pid] = None
            self._closed.move_to_end(pid)
            if len(self._closed) > self._remember:
                self._closed.popitem(last=False)

    @staticmethod
    def _search(target: str, pids: Iterable[int], holds: Callable[[int, str], bool],
                tried: set[int]) -> int | None:
        for pid in pids:
            if pid not in tried:
                tried.add(pid)
                if holds(pid, target):
                    return pid
        return None

    def _search_roots(self, target: str, roots: Iterable[int], holds: Callable[[int, str], bool],
                      tried: set[int], first: bool) -> int | None:
        """The registered roots (a Mapping's keys, each named with its value) that have not yet held a looked-up
        socket nor missed ROOT_MISSES times, oldest (lowest pid) first: the first ROOT_PROBES of them (``first``,
        each miss counted), else the rest (a miss there does not count: a batch's later roots wait their turn)."""
        with self._lock:
            if roots is not self._roots_read:  # the directory's mapping changes only when it reads the store
                keys = [(pid, roots[pid]) if isinstance(roots, Mapping) else (pid, None) for pid in roots]
                keys.sort(key=lambda key: key[0])
                live = set(keys)  # forget roots no longer registered
                self._root_tries = tries = {key: n for key, n in self._root_tries.items() if key in live}
                self._due_roots = [key for key in keys if key[0] > 0 and 0 <= tries.get(key, 0) < ROOT_MISSES]
                self._roots_read = roots
            due = self._due_roots[:ROOT_PROBES] if first else list(self._due_roots)  # (those read first: tried)
        for key in due:
            if key[0] in tried:
                continue
            tried.add(key[0])
            found = holds(key[0], target)
            if found or first:
                self._mark_root(key, found)
            if found:
                return key[0]
        return None

    def _mark_root(self, key: tuple[int, object], found: bool) -> None:
        """Count a root's miss, or that it held a looked-up socket (for good: a miss counted after it, by a lookup
        that read it meanwhile, does not undo that); one found or missed ROOT_MISSES times is no longer due."""
        with self._lock:
            before = self._root_tries.get(key, 0)
            if before < 0:
                return
            count = self._root_tries[key] = -1 if found else before + 1
            if (count < 0 or count >= ROOT_MISSES) and key in self._due_roots:
                self._due_roots.remove(key)

    def _tree(self, root: int) -> Iterator[int]:
        """The root, then its descendants newest first (read only if the root does not hold it)."""
        yield root
        yield from self._descendants([root])

    def _root_served(self, pid: int, roots: Iterable[int]) -> None:
        """A lookup found its socket in the tree of root ``pid``: it is not read first any more."""
        if isinstance(roots, Mapping) and pid in roots:
            self._mark_root((pid, roots[pid]), found=True)

    def _quick_candidates(self, skip: set[int] | None = None) -> list[int]:
        """Closed and recent owners; with ``skip``, every other process whose socket fds are known."""
        with self._lock:
            first = [*reversed(self._closed), *reversed(self._recent)]
            if skip is None:
                return first
            return sorted(set(self._socket_fds) - set(first) - skip, reverse=True)

    def _candidates(self, roots: Iterable[int], everywhere: bool = True) -> Iterator[int]:
        with self._lock:
            first = [*reversed(self._closed), *reversed(self._recent)]
            young = sorted(set(self._young), reverse=True)
        yield from first
        yield from young
        if everywhere:
            yield from self._descendants(roots)
            yield from self._all_pids_newest_first()

    def _note(self, pid: int, target: str) -> None:
        with self._lock:
            self._recent[pid] = None
            self._recent.move_to_end(pid)
            if len(self._recent) > self._remember:
                self._recent.popitem(last=False)
            self._closed.pop(pid, None)
            self._seen.pop(target, None)  # found: nobody looks it up again

    def _adopt(self, tid: int, pid: int) -> None:
        """The sockets read through a thread's id (a thread started lately is probed as a new pid) are its
        process's: kept there, where ``find_known`` looks when the process reconnects."""
        with self._lock:
            fds = self._socket_fds.pop(tid, ())
            if fds:
                self._socket_fds[pid] = tuple(dict.fromkeys(fds + self._socket_fds.get(pid, ())))

    def _forget(self, pid: int) -> None:
        with self._lock:
            self._recent.pop(pid, None)
            self._closed.pop(pid, None)
            self._socket_fds.pop(pid, None)

    def _where_seen(self, target: str, found_before: bool = False) -> int | None:
        """The process the socket was seen in, if it still holds it; ``found_before``: only a process a lookup
        found (the rest stay for ``find``, which maps a thread to its process)."""
        with self._lock:
            where = self._seen.get(target)
            if where is None or (found_before and where[0] not in self._recent):
                return None
            del self._seen[target]
        if self._link(where[0], where[1]) == target:
            self.scanned_last += 1
            return where[0]
        return None

    def _link(self, pid: int, fd: str, dir_fd: int | None = None) -> str | None:
        try:
            if dir_fd is not None:
                return os.readlink(fd, dir_fd=dir_fd)
            return os.readlink(f"{self.proc}/{pid}/fd/{fd}")
        except OSError:
            return None

    def _remember_sockets(self, pid: int, links: list[tuple[str, str]], complete: bool) -> None:
        """Note the socket links read from ``pid``: all of its sockets when ``complete``, else some."""
        with self._lock:
            for fd, link in links:
                self._seen[link] = (pid, fd)
                self._seen.move_to_end(link)
            while len(self._seen) > self._seen_max:
                self._seen.popitem(last=False)
            fds = tuple(fd for fd, _ in links)
            if not complete:
                fds = tuple(dict.fromkeys(fds + self._socket_fds.get(pid, ())))
            if fds:
                self._socket_fds[pid] = fds
            else:
                self._socket_fds.pop(pid, None)

    def _holds_socket_fds(self, pid: int, target: str, limit: int = SOCKET_FDS_LIMIT) -> bool:
        """Whether one of the fds that held sockets when ``pid`` was last read holds ``target`` now (not read
        when they are over ``limit``)."""
        with self._lock:
            fds = self._socket_fds.get(pid, ())
        if len(fds) > limit:  # a process holding thousands (this proxy: its clients'): the full lookup's
            return False
        self.scanned_last += 1
        links: list[tuple[str, str]] = []
        for fd in fds:  # highest first, as read: a process's newest socket usually has its highest fd
            if (link := self._link(pid, fd)) is not None:
                links.append((fd, link))
                if link == target:
                    break
        if fds and not links and not os.path.exists(f"{self.proc}/{pid}"):
            self._forget(pid)
            return False
        sockets = [(fd, link) for fd, link in links if link.startswith("socket:[")]
        self._remember_sockets(pid, sockets, complete=False)
        return bool(sockets) and sockets[-1][1] == target

    def _holds(self, pid: int, target: str, limit: int | None = None, read: set[int] | None = None) -> bool:
        """Whether ``pid`` holds ``target``; notes the sockets of its fd table read on the way. With ``limit``, a
        table of more descriptors is not read (False). With ``read`` (the pids whose table this lookup has read), a
        large table adds its process's threads there: the lookup does not read it again through one of them."""
        self.scanned_last += 1
        try:
            # Links read relative to the open fd directory: a quarter cheaper than by full path.
            dir_fd = os.open(f"{self.proc}/{pid}/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            self._forget(pid)
            return False
        sockets: list[tuple[str, str]] = []
        found = False
        try:
            # Linux 6.2 on gives a process's open descriptors as its fd directory's size (older ones, 0): no need
            # to list 19,000 entries to learn there are too many.
            if limit is not None and os.fstat(dir_fd).st_size > limit:
                return False
            fds = os.listdir(dir_fd)
            if limit is not None and len(fds) > limit:
                return False
            if read is not None and len(fds) >= GROUP_CHECK_MIN:
                read.update(self._threads_of(pid))
            # Highest fds first: a process's newest socket usually has its highest fd.
            for fd in sorted(fds, key=int, reverse=True):
                link = self._link(pid, fd, dir_fd)
                if link is not None and link.startswith("socket:["):
                    sockets.append((fd, link))
                    if link == target:
                        found = True
                        break
        except OSError:
            pass
        finally:
            os.close(dir_fd)
        self._remember_sockets(pid, sockets, complete=not found)
        return found

    def _threads_of(self, pid: int) -> list[int]:
        """Every thread of ``pid``'s process (a thread's id lists its whole group), the process's own id among them."""
        try:
            return [int(tid) for tid in os.listdir(f"{self.proc}/{pid}/task")]
        except OSError:
            return []

    def _process_of(self, pid: int) -> int:
        """The thread-group id: a probed pid may be a thread, which /proc serves but does not list."""
        with self._lock:
            if pid in self._recent:  # found as a process before
                return pid
        status = read_file(f"{self.proc}/{pid}/status")
        if status:
            for line in status.splitlines():
                if line.startswith(b"Tgid:"):
                    return int(line.split()[1])
        return pid

    def _new_pids(self) -> Iterator[int]:
        """Pids handed out since the last lookup (NEW_PIDS_PROBED at most), newest first; each joins the young list,
        probed or not (a lookup that stops early leaves the rest for later). The list holds more (``young``): under
        a batch, an agent may connect hundreds of pids after it started."""
        last_text = read_file(f"{self.proc}/sys/kernel/ns_last_pid")
        if not last_text:
            return
        last = int(last_text)
        with self._lock:
            low = self._high if self._high <= last else 0  # 0: first lookup, or the pid counter wrapped
            self._high = last
        bottom = max(low, last - min(NEW_PIDS_PROBED, self._young.maxlen or 0))
        pid = last
        probed: list[int] = []
        try:
            while pid > bottom:
                if os.path.exists(f"{self.proc}/{pid}"):
                    probed.append(pid)
                    yield pid
                pid -= 1
        finally:
            # In ascending order, above every pid it holds (unless the counter wrapped): the list drops its lowest,
            # not a batch's newest, when the next batch comes.
            with self._lock:
                self._young.extend([*range(bottom + 1, pid), *reversed(probed)])

    def _descendants(self, roots: Iterable[int]) -> list[int]:
        """Every live descendant of the roots (and the roots), newest first."""
        seen: set[int] = set()
        todo = [r for r in roots if r > 0]
        while todo:
            pid = todo.pop()
            if pid in seen:
                continue
            seen.add(pid)
            todo.extend(self._children(pid))
        return sorted(seen, reverse=True)

    def _children(self, pid: int) -> list[int]:
        try:
            tids = os.listdir(f"{self.proc}/{pid}/task")
        except OSError:
            return []
        children: list[int] = []
        for tid in tids:
            text = read_file(f"{self.proc}/{pid}/task/{tid}/children")
            if text:
                children.extend(int(c) for c in text.split())
        return children

    def _all_pids_newest_first(self) -> list[int]:
        pids = [int(n) for n in os.listdir(self.proc) if n.isdigit()]
        pids.sort(reverse=True)
        return pids
