"""The attribution half of the capture addon: per client connection its process lookup and its CONNECT
credentials, per request the agent it belongs to. The decisions are attribution.py's pure functions; this
holds the state between hooks and keeps every blocking read off the event loop (pool threads).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar, cast

from mitmproxy import ctx, http
from mitmproxy.connection import Client
from mitmproxy.proxy.mode_specs import ReverseMode

from rollouttap.addon.attribution import (
    AGENT_HEADER, AgentDirectory, Attribution, PidAttributor, PidResult, check_token, credentials_conflict,
    decide_header_claim, ended, parse_basic_credentials, split_agent_path,
)
from rollouttap.store import AgentRecord

log = logging.getLogger(__name__)
T = TypeVar("T")

PROXY_AUTH = "Proxy-Authorization"
# How long a credentialed request's connection lookup may run on the pool threads (usually well under 30 ms) before
# the request is refused, 503, never let through unchecked: an agent can slow lookups at will (processes holding many
# descriptors), and a token that passed unchecked would let it speak as another agent. Time the lookup sits queued
# behind other connections' is not counted (hundreds of agents connecting at once on a few cores queue theirs for
# seconds), but a request waits CREDENTIAL_CHECK_CAP_S at most in all, queued or running.
CREDENTIAL_CHECK_WAIT_S = 10.0
CREDENTIAL_CHECK_CAP_S = 60.0


class LookupClock:
    """How long a connection's lookup has run on pool threads, over its steps (time queued for one not counted)."""

    __slots__ = ("ran", "running_since")

    def __init__(self, running_since: float | None = None) -> None:
        self.ran = 0.0  # in the steps that have ended
        self.running_since = running_since  # time.monotonic() the running step began; None while none runs

    def run(self, step: Callable[[], T]) -> T:
        """``step()`` on the calling (pool) thread, timed as running."""
        began = self.running_since = time.monotonic()
        try:
            return step()
        finally:
            self.running_since = None  # cleared first: a reader between the two lines counts too little for a
            self.ran += time.monotonic() - began  # moment (and waits on), never too much

    def used(self, now: float) -> float:
        since = self.running_since
        return self.ran + (now - since if since is not None else 0.0)


class _CheckTimedOut(Exception):
    """A token's sender check gave up waiting for its lookup (the lookup's own TimeoutError is not this)."""


class FlowAttribution:
    """Who each flow belongs to. ``open(store)`` before the first request; hooks call the rest."""

    def __init__(self, pool: ThreadPoolExecutor, scan_pool: ThreadPoolExecutor) -> None:
        self.directory: AgentDirectory | None = None
        self.pids: PidAttributor | None = None
        self._pool = pool
        # Lookups that must read every process's fd table wait here, one at a time, not on ``pool``: a client that
        # hides its socket (or makes processes with many descriptors) slows those alone, not every agent's lookup.
        self._scan_pool = scan_pool
        self._conn_pid: dict[str, asyncio.Future[PidResult]] = {}
        self._clocks: dict[str, LookupClock] = {}  # of the lookups begun on the pools, per connection
        self._conn_creds: dict[str, Attribution] = {}  # a CONNECT's attribution, for its tunnel's requests
        # The agent a connection's request claims to be (its token), for its lookup if still queued when it came:
        # that agent's processes are read first. Only an order: the owner found is checked as any other.
        self._claims: dict[str, str] = {}
        self._on_threads = 0  # lookups queued or running on the pools
        self.credential_check_wait = CREDENTIAL_CHECK_WAIT_S
        self.credential_check_cap = CREDENTIAL_CHECK_CAP_S

    def open(self, store_path: str) -> None:
        """Read agents from this store (StoreError if it cannot be opened)."""
        directory = AgentDirectory(store_path)
        self.close()
        self.directory, self.pids = directory, PidAttributor(directory)

    def close(self) -> None:
        if self.directory is not None:
            self.directory.close()

    def tunnel_opened(self, conn_id: str, who: Attribution) -> None:
        self._conn_creds[conn_id] = who

    def connection_closed(self, client: Client) -> None:
        future = self._conn_pid.pop(client.id, None)
        if future is not None and future.done() and not future.cancelled() and future.exception() is None:
            pid = future.result().pid
            if pid is not None and self.pids is not None:
                self.pids.connection_closed(pid)
        self._conn_creds.pop(client.id, None)
        self._claims.pop(client.id, None)
        self._clocks.pop(client.id, None)

    def start_pid_lookup(self, client: Client) -> None:
        """Look up the process behind a client connection (once per connection): at once when what earlier
        lookups cached answers it (a process that reconnects), else begun on a pool thread."""
        if self.pids is None or not ctx.options.rollouttap_pid_attribution:
            return
        if client.id not in self._conn_pid and client.peername and client.sockname:
            peer = cast(tuple[str, int], tuple(client.peername[:2]))  # IPv6 addresses have 4 fields
            sock = cast(tuple[str, int], tuple(client.sockname[:2]))
            # A few µs of reads that cannot block, against a thread hand-off that costs the proxy ~0.2 ms of CPU and
            # its client ~0.2 ms per new connection (bench section 7). Not while lookups run on the pools: each read
            # gives up the GIL, which the loop then waits to get back from them (under 64 agents connecting at
            # once, ~1 ms per try, and their calls/s fell by a seventh).
            known = self.pids.resolve_cached(peer, sock) if not self._on_threads else None
            if known is not None:
                future: asyncio.Future[PidResult] = asyncio.get_running_loop().create_future()
                future.set_result(known)
            else:
                clock = self._clocks[client.id] = LookupClock()
                future = asyncio.ensure_future(self._lookup(self.pids, peer, sock, clock,
                                                            functools.partial(self._claims.get, client.id)))
                self._on_threads += 1  # from now, not from when the task first runs: the next connection may
                future.add_done_callback(self._lookup_ended)  # come in the same turn of the loop
            self._conn_pid[client.id] = future

    def _claim(self, client: Client, agent_id: str) -> None:
        """Note the agent a request on ``client``'s connection claims to be, for the connection's lookup while
        that has not finished (one is begun if none is there: the last one failed)."""
        self.start_pid_lookup(client)
        future = self._conn_pid.get(client.id)
        if future is not None and not future.done():
            self._claims[client.id] = agent_id
            future.add_done_callback(lambda _: self._claims.pop(client.id, None))

    def _lookup_ended(self, _: asyncio.Future[PidResult]) -> None:
        self._on_threads -= 1

    async def _lookup(self, pids: PidAttributor, peer: tuple[str, int], sock: tuple[str, int], clock: LookupClock,
                      claim: Callable[[], str | None] | None = None) -> PidResult:
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(
            self._pool, clock.run, functools.partial(pids.resolve, peer, sock, everywhere=False, claim=claim))
        if result is None:
            try:
                result = await loop.run_in_executor(self._scan_pool, clock.run,
                                                    functools.partial(pids.resolve, peer, sock, claim=claim))
            except RuntimeError as exc:  # the pools were shut down meanwhile: the proxy is stopping
                raise asyncio.CancelledError("the proxy is shutting down") from exc
        assert result is not None
        return result

    async def attribute(self, flow: http.HTTPFlow, to_own_reverse: bool = False) -> Attribution:
        """Which agent a request belongs to: credentials, then a CONNECT's, a base-URL path token, the
        source process, an X-Agent-ID header, else none (see README, Attribution)."""
        headers = flow.request.headers
        claimed = headers.pop(AGENT_HEADER, None)
        creds = parse_basic_credentials(headers.pop(PROXY_AUTH, None))
        tunnel = self._conn_creds.get(flow.client_conn.id)  # credentials given on the CONNECT
        # A path token is our reverse listener's: elsewhere (a regular proxy request, inside a tunnel) /agents/...
        # is some other API's path.
        on_reverse = isinstance(flow.client_conn.proxy_mode, ReverseMode)
        path_names_agent = to_own_reverse or (on_reverse and creds is None and tunnel is None)  # before the reset
        in_path = split_agent_path(flow.request.path) if path_names_agent else None
        if tunnel is not None and tunnel.agent_id is None:
            tunnel = None  # a CONNECT that named no agent: each request inside is looked up (process, header)
        if to_own_reverse and in_path is not None:
            # Addressed to our reverse listener, where its path names the agent: the proxy credentials only
            # brought it here (its client sent the base URL through HTTP_PROXY).
            creds = tunnel = None
        has_token = creds is not None or in_path is not None  # a token will speak for the agent
        needs_pid = not has_token and tunnel is None  # nothing but its process (or a header) names the agent
        remote = needs_pid and not self._on_this_host(flow.client_conn)
        if remote and not ctx.options.rollouttap_remote_anonymous:
            return Attribution(None, "rejected", None, "a client on another host must present proxy credentials")
        if needs_pid:
            self.start_pid_lookup(flow.client_conn)  # fallback mode: nothing else names the agent
        # Eager: a token is checked against the process that sends it, with the lookup begun at connect
        # (usually done by now; bounded, so a stuck /proc read cannot hold the request: it is then refused, 503).
        check_token_owner = has_token and ctx.options.rollouttap_pid_lookup == "eager"
        if check_token_owner:
            self._claim(flow.client_conn, creds[0] if creds is not None else in_path[0])  # type: ignore[index]
        pid_result = await self._pid_result(flow.client_conn.id, wait=needs_pid or check_token_owner,
                                            timeout=self.credential_check_wait if check_token_owner else None)
        pid = pid_result.pid if pid_result else None
        if (refused := _refused_whatever_it_carries(pid_result)) is not None:
            return refused
        if creds is not None:
            return await self._verified(creds[0], creds[1], "credentials", pid_result)
        if tunnel is not None:
            if tunnel.method == "credentials" and tunnel.agent_id is not None:
                agent = await self._agent(tunnel.agent_id)  # a tunnel's requests outlive no agent either
                problem = ended(agent) if agent is not None else None
                if problem is not None:
                    return Attribution(None, "rejected", pid, f"agent {tunnel.agent_id!r}: {problem}")
            return Attribution(tunnel.agent_id, tunnel.method, pid, tunnel.detail)
        if in_path is not None:
            agent_id, token, rest = in_path
            flow.request.path = rest
            return await self._verified(agent_id, token, "path", pid_result)
        if pid_result is not None and pid_result.agent_id is not None:
            return Attribution(pid_result.agent_id, "pid", pid, pid_result.detail)
        if claimed and remote:  # served anonymously: a header from another host would add to any agent's calls
            return Attribution(None, "none", pid, f"{AGENT_HEADER} header of a client on another host not taken")
        if claimed:
            agent_id, detail = decide_header_claim(claimed, await self._agent(claimed))
            return Attribution(agent_id, "header" if agent_id else "none", pid, detail)
        detail = pid_result.detail if pid_result else "pid attribution off"
        return Attribution(None, "none", pid, detail)

    def _on_this_host(self, client: Client) -> bool:
        if not client.peername or self.pids is None:
            return True  # no address to judge (a unix socket, a test flow): nothing to refuse it for
        return self.pids.on_this_host(client.peername[0])

    async def _pid_result(self, conn_id: str, wait: bool, timeout: float | None = None) -> PidResult | None:
        future = self._conn_pid.get(conn_id)
        if future is None or (not wait and not future.done()):
            return None
        try:
            if timeout is None or future.done():
                return await future
            return await self._checked_in_time(future, self._clocks.get(conn_id), timeout)
        except _CheckTimedOut as exc:
            log.warning("rollouttap: pid lookup %s; request refused (503)", exc)
            return PidResult(None, None, f"its sender could not be checked: its lookup {exc}", unchecked=True)
        except Exception as exc:  # a failed lookup must not lose the flow
            log.warning("rollouttap: pid attribution failed: %r", exc)
            if timeout is not None:  # a token's sender check: never passed unchecked (refused, 503, to be retried)
                if self._conn_pid.get(conn_id) is future:  # the next request on this connection looks up anew
                    del self._conn_pid[conn_id]
                    self._clocks.pop(conn_id, None)
                return PidResult(None, None, f"its sender could not be checked: lookup failed: {exc!r}",
                                 unchecked=True)
            return PidResult(None, None, f"lookup failed: {exc!r}")

    async def _checked_in_time(self, future: asyncio.Future[PidResult], clock: LookupClock | None,
                               timeout: float) -> PidResult:
        """The lookup's answer, once it has run ``timeout`` on the pool threads at most (its steps together; time
        queued for a thread not counted) and ``credential_check_cap`` has not passed; else _CheckTimedOut."""
        now = time.monotonic()
        give_up = now + self.credential_check_cap
        if clock is None:  # begun elsewhere (no pool steps to time): running from now
            clock = LookupClock(now)
        while not future.done():
            left = timeout - clock.used(now)
            if left <= 0:
                raise _CheckTimedOut(f"ran over {timeout:g}s")
            if now >= give_up:
                raise _CheckTimedOut(f"did not finish within {self.credential_check_cap:g}s, queued or running")
            try:  # wakes when the lookup would have run out of time if it ran all along: then looks again
                return await asyncio.wait_for(asyncio.shield(future), min(left, give_up - now))  # shared: not cancelled
            except TimeoutError:
                now = time.monotonic()  # (the lookup's own TimeoutError, if it raised one, ends the loop: done)
        return future.result()

    async def _agent(self, agent_id: str) -> AgentRecord | None:
        directory = self.directory
        assert directory is not None
        if not agent_id.isprintable():  # undecodable header or path bytes name no agent (nor can SQLite bind them)
            return None
        agent = directory.cached(agent_id)  # a row read within the last second: no thread hop
        if agent is None or (ended(agent) is None and directory.age(agent_id) > directory.max_age):
            # Unknown, or read over a second ago while it ran: read it before it vouches for this request (an
            # ended agent's token is void), on a pool thread. One read a second per busy agent.
            agent = await asyncio.get_running_loop().run_in_executor(self._pool, directory.lookup, agent_id)
        return agent

    async def _verified(self, agent_id: str, token: str, method: str, pid_result: PidResult | None
                        ) -> Attribution:
        pid = pid_result.pid if pid_result else None
        if pid_result is not None and pid_result.unfound:
            return Attribution(None, "rejected", None, "no process the proxy can read held the connection's socket "
                                                       "when it was looked up (one passed in flight, or a process "
                                                       "whose descriptors cannot be read): its sender cannot be "
                                                       "checked")
        if pid_result is not None and pid_result.untraced:
            return Attribution(None, "rejected", pid, f"credentials of agent {agent_id!r}: {pid_result.detail}")
        conflict = credentials_conflict(agent_id, pid_result.roots, pid_result.tags) if pid_result else None
        if conflict is not None:
            return Attribution(None, "rejected", pid, conflict)
        problem = check_token(await self._agent(agent_id), token)
        if problem is not None:
            return Attribution(None, "rejected", pid, f"agent {agent_id!r}: {problem}")
        return Attribution(agent_id, method, pid, None)  # type: ignore[arg-type]


def _refused_whatever_it_carries(result: PidResult | None) -> Attribution | None:
    """A request sent by a rollouttap proxy (a loop through a listener), or whose lookup did not finish in time
    (503, to be retried), is refused before anything it carries is looked at."""
    if result is not None and result.proxy:
        return Attribution(None, "rejected", result.pid, result.detail)
    if result is not None and result.unchecked:
        return Attribution(None, "rejected", None, result.detail, retry=True)
    return None
