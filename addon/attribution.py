"""Which agent a flow belongs to: credentials, then the source process, then a header, else none.

The pure functions here decide; procfs/sockdiag gather the facts; the addon calls them once per
client connection: on the event loop when what earlier lookups cached answers it (``resolve_cached``), else
on a pool thread.
"""

from __future__ import annotations

import base64
import binascii
import functools
import ipaddress
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Literal, Mapping
from urllib.parse import unquote

import psutil

from rollouttap.addon.procfs import ANCESTRY_DEPTH, AncestryCache, NotCached, ProcInfo, SocketOwnerFinder, cut_short
from rollouttap.addon.sockdiag import owner_netlink, socket_owner
from rollouttap.store import LIVE_STATUSES, AgentRecord, Store, token_matches

log = logging.getLogger(__name__)

Method = Literal["credentials", "path", "pid", "header", "none", "rejected"]
AGENT_HEADER = "X-Agent-ID"
PATH_PREFIX = "/agents/"
MAX_CACHED = 4096  # agent rows a directory keeps beyond the live ones
TAG_REFRESH_S = 0.05  # re-read registered roots at most this often for agents started since the last read


@dataclass(frozen=True)
class Attribution:
    agent_id: str | None
    method: Method
    pid: int | None = None
    detail: str | None = None
    retry: bool = False  # rejected for now (503), not for what the request carries (407)


PID_LOOKUPS = ("eager", "fallback")  # when the proxy looks up a connection's process (rollouttap_pid_lookup)


@dataclass(frozen=True)
class PidResult:
    """What the socket's owner and its ancestors say about the connection."""
    pid: int | None
    agent_id: str | None
    detail: str | None = None
    roots: tuple[str, ...] = ()  # agents whose registered root process is among the ancestors
    tags: tuple[str, ...] = ()  # every agent the ancestors' tags name, registered here or not, nearest first
    proxy: bool = False  # the owner is a rollouttap proxy: a request it sent looped back through a listener
    unchecked: bool = False  # the lookup did not finish in time: nothing is known of the sender
    # A socket of this proxy's own user that no process held when looked up: one whose process exited, or one
    # parked in flight (passed over a unix socket) to dodge the lookup. Either way its token is not checked.
    unfound: bool = False
    # Its ancestors go further up than the proxy reads (ANCESTRY_DEPTH): the agent whose tree it is in is not
    # known, so no tag speaks for it and no token passes (a process nested deep under one agent's root would
    # otherwise speak with another's token).
    untraced: bool = False


# -- pure decisions ----------------------------------------------------------------------------
def parse_basic_credentials(header: str | None) -> tuple[str, str] | None:
    """(user, password) from a ``Basic`` Proxy-Authorization value, or None."""
    if not header:
        return None
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic" or not encoded:
        return None
    try:
        user, sep, password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None
    if not sep or not user:
        return None
    # Clients percent-decode userinfo before encoding it, but some send it as written.
    return unquote(user), unquote(password)


def split_agent_path(path: str) -> tuple[str, str, str] | None:
    """``/agents/<id>/<token>/v1/x`` -> (id, token, ``/v1/x``); None for any other path."""
    if not path.startswith(PATH_PREFIX):
        return None
    parts = path[len(PATH_PREFIX):].split("/", 2)
    if len(parts) < 2 or not parts[0] or not parts[1]:
        return None
    rest = "/" + parts[2] if len(parts) == 3 else "/"
    return unquote(parts[0]), unquote(parts[1]), rest


def check_token(agent: AgentRecord | None, token: str) -> str | None:
    """None when the token proves the agent, else why not. An ended agent's token is void: its result is
    built, and a process that escaped its tree must not add to it."""
    if agent is None:
        return "not registered"
    if not token_matches(token, agent.token_hash):
        return "wrong token"
    return ended(agent)


def ended(agent: AgentRecord) -> str | None:
    """Why an agent's credentials no longer count (its run is over), or None while it runs. Its processes
    end (``ended_at``) before its status does: the manager builds its result in between."""
    if agent.status not in LIVE_STATUSES:
        return f"the agent has ended ({agent.status})"
    return None if agent.ended_at is None else "the agent's processes have ended"


def claimed_root(agent: AgentRecord) -> int | None:
    """The agent's registered root pid while it counts for attribution: None once the agent or its processes
    have ended (its result being built, it claims no process any more), or when it has no root."""
    return agent.root_pid if ended(agent) is None else None


def decide_header_claim(claimed: str, agent: AgentRecord | None) -> tuple[str | None, str]:
    """(agent_id, detail) for an ``X-Agent-ID`` claim, the one method that proves nothing.

    A name that a registered agent owns (it has a token) is refused: that agent attributes by its
    credentials or its process, so a header naming it comes from someone else. Names that are not
    printable text (undecodable header bytes) are refused too."""
    if not claimed.isprintable():
        return None, f"{AGENT_HEADER} header is not a printable name"
    if agent is not None and agent.token_hash is not None:
        return None, (f"{AGENT_HEADER} header names registered agent {claimed!r}, which attributes by its "
                      "credentials or its process only")
    return claimed, f"{AGENT_HEADER} header"


def credentials_conflict(agent_id: str, roots: tuple[str, ...], tags: tuple[str, ...] = ()) -> str | None:
    """Why credentials of ``agent_id`` are refused from a process under the registered roots of ``roots``
    (agents run as one user: a token can be read from another agent's environment); None when the process
    is under ``agent_id``'s own root (nested agents included). Under no registered root (an escaped daemon, a
    hand-run client) the token speaks for the process, unless the process still carries the tag of another
    registered agent (``tags``): a process that left its agent's tree by a double fork keeps its environment
    unless it drops it, so this stops the plain escape, not a deliberate one (a tag is the process's own)."""
    if agent_id in roots or (not roots and (not tags or agent_id in tags)):
        return None
    if roots:
        return f"credentials of agent {agent_id!r} sent by a process of agent {roots[0]!r}"
    return f"credentials of agent {agent_id!r} sent by a process tagged as agent {tags[0]!r}"


def decide_from_ancestry(chain: list[ProcInfo], roots: dict[int, tuple[float | None, str]],
                         known_roots: Mapping[str, int | None],
                         create_time: Callable[[ProcInfo], float]) -> tuple[str | None, str | None]:
    """(agent_id, detail) from a socket owner's ancestry, nearest first.

    ``roots`` maps a registered root pid to (create_time, agent_id); ``known_roots`` maps an agent to
    its registered root pid (None: registered with a token and no process, so its credentials alone speak
    for it). The outermost match wins, so an agent cannot re-tag its own children as another agent; a tag
    naming an agent whose registered root is not an ancestor is refused, as is one naming an agent of
    credentials alone (any process may carry any tag). A root pid only matches a process with the recorded
    start time, so a reused pid never does.
    """
    registered = registered_in_chain(chain, roots, create_time)
    if registered:
        return registered[-1], "registered root"
    tags = [p.agent_tag for p in chain if p.agent_tag]
    if not tags:
        return None, "no agent tag in the process ancestry"
    agent_id = tags[-1]
    if agent_id in known_roots:
        root_pid = known_roots[agent_id]
        if root_pid is None:
            return None, f"tag {agent_id!r} names an agent that its proxy credentials alone attribute"
        return None, f"tag {agent_id!r} but its root pid {root_pid} is not an ancestor"
    return agent_id, "environment tag"


def registered_in_chain(chain: list[ProcInfo], roots: dict[int, tuple[float | None, str]],
                        create_time: Callable[[ProcInfo], float]) -> list[str]:
    """The agents whose registered root (pid and start time) is in ``chain``, nearest first."""
    return [roots[p.pid][1] for p in chain if p.pid in roots and _same_start(roots[p.pid][0], create_time(p))]


def _same_start(recorded: float | None, actual: float) -> bool:
    return recorded is not None and abs(recorded - actual) < 0.01


def local_ips(addresses: Iterable[str]) -> frozenset[str]:
    """This host's interface addresses as peers' are compared with them: without an IPv6 zone (psutil lists a
    link-local address as ``fe80::1%eth0``, a peer's comes without it), IPv4-mapped ones as IPv4."""
    return frozenset(str(_plain_ip(a)) for a in addresses)


def host_addresses() -> frozenset[str]:
    """This host's interface addresses (``local_ips``)."""
    return local_ips(a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                     if a.family.name in ("AF_INET", "AF_INET6"))


def _plain_ip(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


@functools.lru_cache(maxsize=1024)
def is_local_peer(ip: str, local_ips: frozenset[str]) -> bool:
    """Only a peer on this host (and in this namespace) can be looked up in /proc."""
    addr = _plain_ip(ip)
    return addr.is_loopback or str(addr) in local_ips


# -- gathering facts (blocking: call from a worker thread) -------------------------------------
class AgentDirectory:
    """The agents that have not ended, cached and re-read when older than ``max_age`` seconds; any other
    agent is read by its key when asked for. Neither the reads nor the cache grow with the number of agents
    the store ever held (a long training run registers hundreds of thousands)."""

    def __init__(self, store_path: str, max_age: float = 1.0) -> None:
        self._store = Store(store_path)
        self._lock = threading.Lock()  # the store connection, and refresh()
        self._cache_lock = threading.Lock()  # the caches' changes from pool threads (reads need none)
        self._agents: dict[str, AgentRecord] = {}  # the live agents of the last refresh, and rows looked up since
        self._read_at: dict[str, float] = {}  # when each cached row was read (time.monotonic())
        self._ended: dict[str, AgentRecord] = {}  # ended agents' rows (final: they never change), the latest few
        self._roots: tuple[dict[int, tuple[float | None, str]], dict[str, int]] = ({}, {})
        self._proxies: dict[int, float | None] = {}  # the store's running proxies: pid -> create_time
        self._loaded_at = 0.0
        self.max_age = max_age

    def close(self) -> None:
        self._store.close()

    def cached(self, agent_id: str) -> AgentRecord | None:
        """The agent if it is in the cache, however old: no I/O, safe on the event loop (``lookup`` may read
        the store; ``age`` says when to read it again)."""
        return self._agents.get(agent_id)

    def age(self, agent_id: str) -> float:
        """Seconds since the cached row was read (infinite when none was)."""
        return time.monotonic() - self._read_at.get(agent_id, -float("inf"))

    def lookup(self, agent_id: str) -> AgentRecord | None:
        """The agent's row read now, kept in the cache (a just registered agent is seen; an ended one too,
        until the next refresh, or until the cache holds MAX_CACHED rows: where no pid lookup refreshes it)."""
        agent = self.read(agent_id)
        if agent is not None:
            self._cache(agent)
        return agent

    def _cache(self, agent: AgentRecord, read_at: float | None = None) -> None:
        with self._cache_lock:
            if len(self._agents) >= MAX_CACHED:
                self._drop_ended()
            self._agents[agent.agent_id] = agent
            self._read_at[agent.agent_id] = time.monotonic() if read_at is None else read_at

    def _drop_ended(self) -> None:
        live = {k: a for k, a in self._agents.items() if a.status in LIVE_STATUSES}
        self._agents, self._read_at = live, {k: self._read_at[k] for k in live if k in self._read_at}

    def other(self, agent_id: str) -> AgentRecord | None:
        """The row of an agent that is not among the live ones cached (a tag naming an ended or unknown agent):
        an ended agent's from a small cache, any other read now."""
        agent = self._ended.get(agent_id)
        if agent is not None:
            return agent
        agent = self.read(agent_id)
        if agent is not None and agent.status not in LIVE_STATUSES:
            with self._cache_lock:
                if len(self._ended) >= MAX_CACHED:
                    self._ended.pop(next(iter(self._ended)))
                self._ended[agent_id] = agent
        return agent

    def read(self, agent_id: str) -> AgentRecord | None:
        """The agent's row as stored now (no cache)."""
        with self._lock:
            return self._store.agent(agent_id)

    def refresh(self, if_older_than: float = 0.0, *, cached: bool = False) -> None:
        """Read the live agents and running proxies again if the last read is ``if_older_than`` seconds old.
        ``cached``: read nothing (NotCached when a read is due), nor wait for a thread that reads."""
        if cached:
            if time.monotonic() - self._loaded_at >= if_older_than:
                raise NotCached("the live agents")
            return
        with self._lock:
            if time.monotonic() - self._loaded_at < if_older_than:
                return
            agents = {a.agent_id: a for a in self._store.live_agents()}
            by_pid: dict[int, tuple[float | None, str]] = {}
            by_agent: dict[str, int] = {}
            for agent in agents.values():
                if (root := claimed_root(agent)) is not None:
                    by_agent[agent.agent_id] = root
                    by_pid[root] = (agent.root_create_time, agent.agent_id)
            self._proxies = dict(self._store.running_proxies())
            now = time.monotonic()
            with self._cache_lock:
                self._agents, self._read_at = agents, dict.fromkeys(agents, now)
            self._roots, self._loaded_at = (by_pid, by_agent), now

    def learn(self, agent: AgentRecord, read_at: float) -> None:
        """Add a live agent whose row was read at ``read_at`` (time.monotonic(), taken before the read) to the
        cached roots, so its next lookups need not read it again before the next refresh replaces them all.
        Nothing is added once a refresh has read the store since: it knows better (the agent may have ended)."""
        if (root := claimed_root(agent)) is None:
            return
        with self._lock:
            by_pid, by_agent = self._roots
            if self._loaded_at >= read_at or root in by_pid or agent.agent_id in by_agent:
                return
            # Copies, swapped in whole: lookups on other threads hold the old pair and read it unlocked.
            self._roots = ({**by_pid, root: (agent.root_create_time, agent.agent_id)},
                           {**by_agent, agent.agent_id: root})
            self._cache(agent, read_at)  # under _lock, as in refresh: no refresh can come between

    def roots(self, *, cached: bool = False) -> tuple[dict[int, tuple[float | None, str]], dict[str, int]]:
        """The live agents' registered roots as (pid -> (create_time, agent), agent -> pid), refreshed if
        stale (``cached``: NotCached then)."""
        self.refresh(if_older_than=self.max_age, cached=cached)
        return self._roots

    def proxies(self) -> dict[int, float | None]:
        """The store's running proxies as pid -> create_time, as of the last refresh."""
        return self._proxies


class PidAttributor:
    """Source socket -> owning pid -> agent, with the lookups that make it fast."""

    def __init__(self, directory: AgentDirectory) -> None:
        self.directory = directory
        self.finder = SocketOwnerFinder()
        self.ancestry = AncestryCache()
        self._boot_time = psutil.boot_time()
        self._clock_ticks = os.sysconf("SC_CLK_TCK")
        self._local_ips = host_addresses()
        self._own_pid = os.getpid()  # a syscall each time (glibc no longer caches it), on every lookup

    def on_this_host(self, peer_ip: str) -> bool:
        """Whether a client at ``peer_ip`` runs on this host (so its process can be looked up)."""
        return is_local_peer(peer_ip, self._local_ips)

    def resolve(self, peer: tuple[str, int], sock: tuple[str, int], *, everywhere: bool = True,
                claim: Callable[[], str | None] | None = None) -> PidResult | None:
        """Attribute a client connection by its source process (blocking, ~0.05 ms typical). Without
        ``everywhere``, None when the socket's holder is not where it usually is (see SocketOwnerFinder.find):
        the caller reads every process then, apart from the lookups that find theirs at once. ``claim`` says
        which agent the connection's request claims to be, once it has come: that agent's processes are read
        first (a lookup queued behind a batch's others), the answer is the same."""
        return self._resolve(peer, sock, everywhere=everywhere, cached=False, claim=claim)

    def resolve_cached(self, peer: tuple[str, int], sock: tuple[str, int]) -> PidResult | None:
        """What ``resolve`` answers, from what earlier lookups left: the live agents and ancestors' tags read
        lately, the owner among the processes that reconnect. It reads a netlink answer, a few fd links and stat
        files and nothing that can block (a store row, a process's environ), so the event loop may call it: a
        thread hand-off costs more than this. None when it would need more (the caller hands it to a thread)."""
        try:
            return self._resolve(peer, sock, everywhere=False, cached=True)
        except NotCached:
            return None
        except Exception as exc:  # noqa: BLE001 - the lookup on a thread then answers, or says what failed
            log.warning("rollouttap: a cached pid lookup failed (%r); looking it up on a thread", exc)
            return None

    def _resolve(self, peer: tuple[str, int], sock: tuple[str, int], *, everywhere: bool, cached: bool,
                 claim: Callable[[], str | None] | None = None) -> PidResult | None:
        if not self.on_this_host(peer[0]):
            return PidResult(None, None, "client is not on this host")
        try:
            # /proc/net/tcp, socket_owner's fallback when netlink fails, lists every socket: not for the event loop
            src, dst = (peer[0], peer[1]), (sock[0], sock[1])
            found = owner_netlink(src, dst, wait=False) if cached else socket_owner(src, dst)
        except (OSError, ValueError) as exc:
            if cached:
                raise NotCached("the socket's inode") from exc
            return PidResult(None, None, f"socket lookup failed: {exc}")
        if found is None:
            return PidResult(None, None, "no such socket in this namespace (container, or exited)")
        roots, known = self.directory.roots(cached=cached)
        claimed = claim() if claim is not None else None
        if claimed is not None and claimed not in known:  # registered since the live agents were read, maybe
            roots, known = self._roots_read_again()
        pid = self.finder.find_known(found.inode) if cached else self.finder.find(
            found.inode, roots, everywhere=everywhere, first=known.get(claimed) if claimed is not None else None)
        if pid is None and not cached and not everywhere:
            # Not where it usually is: maybe under an agent registered since the live agents were read (a batch
            # starting). Its root, read again, costs less than reading every process on the scan thread.
            read_before = roots
            roots, known = self._roots_read_again()
            if roots is not read_before:
                pid = self.finder.find_among_roots(found.inode, roots)
        if pid is None and cached:
            raise NotCached("the socket's owner")
        if pid is None and not everywhere:
            return None
        if pid is None:
            # Another user's processes cannot be read (and cannot read this user's agents' tokens either).
            return PidResult(None, None, "socket owner not found (exited, or another namespace)",
                             unfound=found.uid == os.getuid())
        chain = self.ancestry.chain(pid, cached=cached)
        if cut_short(chain):
            return PidResult(pid, None, f"its process is nested {ANCESTRY_DEPTH} or more levels deep: the agent it "
                                        "runs under is not known", untraced=True)
        others, fresh = self._tag_roots(chain, roots, known, cached)
        if fresh:  # a tag names a live agent registered since the cache was read: its row, just read, counts now
            roots = {**roots, **fresh}
        # Under no root the cache knows: read the live agents again (cheap, at most every TAG_REFRESH_S), or a
        # root registered since the last read (an agent that dropped its tag) goes unseen for a second.
        registered = registered_in_chain(chain, roots, self._create_time)
        if not registered:
            roots, known = self._roots_read_again(cached=cached)
            registered = registered_in_chain(chain, roots, self._create_time)
        # Every tag, registered here or not: a store per rank or node registers only its own agents, and a
        # process of another store's agent must not speak with a token of this one's.
        tags = tuple(dict.fromkeys(p.agent_tag for p in chain if p.agent_tag))
        if chain and not registered and self._looped(chain[0], tags, cached):
            # A proxy forwarded a request to one of these listeners (e.g. a base URL naming the reverse listener
            # as 127.1): its token must not pass for the proxy's own.
            return PidResult(pid, None, "sent by a rollouttap proxy: a request looped back through its listener",
                             proxy=True)
        named = {**known, **others} if others else known
        agent_id, detail = decide_from_ancestry(chain, roots, named, self._create_time)
        return PidResult(pid, agent_id, detail, tuple(registered), tags)

    def _roots_read_again(self, *, cached: bool = False) -> tuple[dict[int, tuple[float | None, str]], dict[str, int]]:
        """The live agents' roots (as ``AgentDirectory.roots``), read again unless read within TAG_REFRESH_S
        (``cached``: NotCached then)."""
        self.directory.refresh(if_older_than=TAG_REFRESH_S, cached=cached)
        return self.directory.roots(cached=cached)

    def _tag_roots(self, chain: list[ProcInfo], roots: dict[int, tuple[float | None, str]], known: dict[str, int],
                   cached: bool = False) -> tuple[dict[str, int | None], dict[int, tuple[float | None, str]]]:
        """The registered roots of agents that tags in ``chain`` name outside the live ones cached (ended
        agents, whose tags still must not attribute; None for an agent its credentials alone attribute), and
        the roots among them of agents that are live after all, as ``roots`` holds them: registered and started
        since the cache was read (a deploy() agent's first connection can come within TAG_REFRESH_S of the
        last read). Hand-run tags that name no registered agent cost one indexed read each (NotCached when
        ``cached``)."""
        others: dict[str, int | None] = {}
        fresh: dict[int, tuple[float | None, str]] = {}
        for tag in {p.agent_tag for p in chain if p.agent_tag and p.agent_tag not in known}:
            if cached:
                raise NotCached(f"the row of agent {tag!r}")
            read_at = time.monotonic()
            agent = self.directory.other(tag)
            if agent is not None and agent.root_pid is not None:
                others[tag] = agent.root_pid
                if claimed_root(agent) is not None and agent.root_pid not in roots:
                    fresh[agent.root_pid] = (agent.root_create_time, agent.agent_id)
                    self.directory.learn(agent, read_at)
            elif agent is not None and agent.credentials_only:
                others[tag] = None  # run by hand with credentials (`rollouttap agent start`): no tag speaks for it
        return others, fresh

    def connection_closed(self, pid: int) -> None:
        """A client connection of ``pid`` ended (its next one is likely close behind)."""
        self.finder.closed(pid)

    def _looped(self, owner: ProcInfo, tags: tuple[str, ...], cached: bool = False) -> bool:
        """Whether ``owner`` is this proxy, another on its store, or another store's proxy that no agent's tag
        speaks for (every rollouttap proxy is started with its store option; one a nested manager runs carries
        its agent's tag, and speaks for that agent alone)."""
        if owner.pid == self._own_pid:
            return True
        proxies = self.directory.proxies()
        if owner.pid in proxies and _same_start(proxies[owner.pid], self._create_time(owner)):
            return True
        if tags:  # its /proc/PID/cmdline (a read per connection of a process under no root) would not change it
            return False
        return self.ancestry.cmdline_has(owner, b"rollouttap_store=", cached=cached)

    def _create_time(self, info: ProcInfo) -> float:
        # psutil's own formula, so it equals the create_time the manager recorded with psutil.
        return info.start_ticks / self._clock_ticks + self._boot_time
