"""Attribution on the event loop: ``PidAttributor.resolve_cached`` answers a process that reconnects from what
earlier lookups cached, exactly as ``resolve`` does, and hands everything else to a thread (None) instead of
reading what can block. Real processes, sockets and store; the finder and ancestry cache also on a fake /proc."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import pytest

from rollouttap.addon import attribution
from rollouttap.addon.attribution import AgentDirectory, PidAttributor, PidResult
from rollouttap.addon.procfs import KNOWN_LINKS_BUDGET, AncestryCache, NotCached, SocketOwnerFinder
from rollouttap.store import Store, new_token

from test_attribution import FakeProc  # the fake /proc of the finder tests


@pytest.fixture
def fake_proc(tmp_path):
    return FakeProc(tmp_path / "proc")


class Reconnecting:
    """A child process that opens a new connection to ``server`` whenever asked (closing the one before), as an
    agent that makes a connection per call does."""

    def __init__(self, server: socket.socket, env: dict[str, str] | None = None, args: tuple[str, ...] = ()) -> None:
        self.server = server
        self.proc = subprocess.Popen([sys.executable, "-c", (
            "import socket, sys\n"
            "s = None\n"
            "for line in sys.stdin:\n"
            "    if s is not None: s.close()\n"
            f"    s = socket.create_connection({server.getsockname()!r})\n"
            "    print(s.getsockname()[1], flush=True)\n"), *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def connect(self) -> tuple[socket.socket, tuple[str, int], tuple[str, int]]:
        """The accepted end of a new connection, its peer and its local address."""
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        self.proc.stdout.readline()
        accepted, peer = self.server.accept()
        return accepted, peer, accepted.getsockname()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(10)


@contextmanager
def reconnecting(env: dict[str, str] | None = None, args: tuple[str, ...] = ()):
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(30)
        client = Reconnecting(server, env, args)
        try:
            yield client
        finally:
            client.close()


def _as_tuple(result):
    return (result.pid, result.agent_id, result.detail, result.roots, result.tags, result.proxy, result.unfound)


def _stable(pids: PidAttributor, monkeypatch) -> PidAttributor:
    """No cache expires during the test (a slow machine would otherwise send a lookup to a thread)."""
    monkeypatch.setattr(attribution, "TAG_REFRESH_S", 3600.0)
    pids.ancestry.max_age = 3600.0
    return pids


def _known(directory: AgentDirectory, client: Reconnecting, monkeypatch) -> PidAttributor:
    """An attributor that has looked up one connection of ``client`` the full way, which has closed since."""
    directory.refresh()
    pids = _stable(PidAttributor(directory), monkeypatch)
    accepted, peer, sock = client.connect()
    with accepted:
        looked_up = pids.resolve(peer, sock)
    pids.connection_closed(looked_up.pid)
    return pids


CASES = ["under no root", "registered agent", "tag of an agent the store lacks", "another rollouttap proxy"]


@pytest.mark.parametrize("case", CASES)
def test_a_process_that_reconnects_is_answered_from_the_cache_as_a_lookup_would(tmp_path, monkeypatch, case):
    path = tmp_path / "s.db"
    env = dict(os.environ)
    if case in ("registered agent", "tag of an agent the store lacks"):
        env["ROLLOUTTAP_AGENT_ID"] = "a1" if case == "registered agent" else "nobody"
    args = ("--set", "rollouttap_store=/elsewhere.db") if case == "another rollouttap proxy" else ()
    directory = AgentDirectory(str(path), max_age=3600.0)
    try:
        with reconnecting(env, args) as client:
            if case == "registered agent":
                with Store(path) as store:
                    store.register_agent("a1", token=new_token())
                    store.agent_started("a1", client.proc.pid)
            directory.refresh()
            pids = _stable(PidAttributor(directory), monkeypatch)
            first, peer, sock = client.connect()
            with first:
                assert pids.resolve_cached(peer, sock) is None  # nothing known of the process yet
                looked_up = pids.resolve(peer, sock)
            pids.connection_closed(looked_up.pid)
            answers = []
            for _ in range(5):
                accepted, peer, sock = client.connect()
                with accepted:
                    answers.append(pids.resolve_cached(peer, sock))
                    again = pids.resolve(peer, sock)  # the same connection, looked up the long way
                pids.connection_closed(looked_up.pid)
    finally:
        directory.close()
    assert looked_up.pid == client.proc.pid
    if case == "tag of an agent the store lacks":
        # A hand-run tag names its agent, after a store read (an ended agent's must not): never on the event loop.
        assert answers == [None] * 5 and looked_up.agent_id == "nobody"
        return
    assert looked_up.agent_id == ("a1" if case == "registered agent" else None)
    assert looked_up.proxy == (case == "another rollouttap proxy")  # a loop through its listener: refused
    assert [_as_tuple(a) for a in answers] == [_as_tuple(looked_up)] * 5 == [_as_tuple(again)] * 5


def test_what_a_process_under_no_root_said_lately_is_not_taken_once_stale(tmp_path, monkeypatch):
    # Whether a process is another proxy (its command line) is cached as long as its tag: a lookup on the event
    # loop past that leaves it to a thread, which reads it again.
    directory = AgentDirectory(str(tmp_path / "s.db"), max_age=3600.0)
    try:
        with reconnecting() as client:
            pids = _known(directory, client, monkeypatch)
            accepted, peer, sock = client.connect()
            with accepted:
                fresh = pids.resolve_cached(peer, sock)
                pids.ancestry._cmdlines = {k: (at - 7200.0, v) for k, (at, v) in pids.ancestry._cmdlines.items()}
                stale = pids.resolve_cached(peer, sock)
    finally:
        directory.close()
    assert fresh is not None and fresh.pid == client.proc.pid and stale is None


def test_a_lookup_on_the_event_loop_never_waits_for_the_store_nor_reads_a_stale_directory(tmp_path, monkeypatch):
    # A pool thread may hold the directory's lock for as long as SQLite waits on a busy store: the event loop's
    # lookup must not take it. And once the live agents are due to be read again, it leaves that to a thread.
    directory = AgentDirectory(str(tmp_path / "s.db"), max_age=3600.0)
    try:
        with reconnecting() as client:
            pids = _known(directory, client, monkeypatch)
            held, release = threading.Event(), threading.Event()

            def hold_the_lock():
                with directory._lock:
                    held.set()
                    release.wait(30)

            holder = threading.Thread(target=hold_the_lock)
            holder.start()
            try:
                held.wait(10)
                accepted, peer, sock = client.connect()
                with accepted:
                    started = time.monotonic()
                    fresh = pids.resolve_cached(peer, sock)
                    directory._loaded_at -= 3600.0  # as if read an hour ago
                    stale = pids.resolve_cached(peer, sock)
                    waited = time.monotonic() - started
            finally:
                release.set()
                holder.join(10)
    finally:
        directory.close()
    assert fresh is not None and fresh.pid == client.proc.pid
    assert stale is None and waited < 5


def test_the_ancestry_cache_reads_no_environ_for_the_event_loop(fake_proc):
    fake_proc.process(10, tag="A")
    fake_proc.process(20, ppid=10)
    cache = AncestryCache(str(fake_proc.root), max_age=3600)
    with pytest.raises(NotCached):
        cache.chain(20, cached=True)  # its tag would need its environ: it may block
    chain = cache.chain(20)
    assert cache.chain(20, cached=True) == chain
    fake_proc.process(30, ppid=20)  # a new child: its own environ is unread
    with pytest.raises(NotCached):
        cache.chain(30, cached=True)


def test_the_finder_finds_a_reconnecting_owner_within_its_budget_and_nothing_else(fake_proc):
    for pid in range(2, 12):
        fake_proc.process(pid, sockets=[1000 + pid])
    fake_proc.process(12, sockets=range(2000, 2000 + KNOWN_LINKS_BUDGET + 1))  # more sockets than the budget
    fake_proc.last_pid(12)
    finder = SocketOwnerFinder(str(fake_proc.root))
    assert finder.find_known(1005) is None  # no lookup yet: nothing known, no process read
    assert finder.find(1005) == 5 and finder.find(2000) == 12
    finder.closed(5)
    fake_proc.process(5, sockets=[3005])  # it reconnects on the freed fd
    assert finder.find_known(3005) == 5
    fake_proc.process(11, sockets=[4011])  # a process no lookup found: left to the full one
    assert finder.find_known(4011) is None
    finder.closed(12)  # the one with too many sockets comes first now: past the budget, it ends the search
    fake_proc.process(5, sockets=[5005])
    assert finder.find_known(5005) is None
    assert finder.find(5005) == 5


def test_the_finder_leaves_a_socket_seen_in_a_process_no_lookup_found_to_the_full_lookup(fake_proc):
    for pid in range(2, 8):
        fake_proc.process(pid, sockets=[1000 + pid])
    fake_proc.last_pid(7)
    finder = SocketOwnerFinder(str(fake_proc.root))
    assert finder.find(1002) == 2  # reads 7 ... 2: 1007 ... 1003 seen on the way, in processes not found yet
    assert finder.find_known(1004) is None  # 4 may be a thread's id: only find maps it
    assert finder.find(1004) == 4 and finder.scanned_last == 1  # the hint is still there
    finder.closed(4)
    fake_proc.process(4, sockets=[2004])
    assert finder.find_known(2004) == 4


@pytest.mark.parametrize("budget, found", [(4, None), (5, 4)])
def test_the_finders_budget_spans_every_process_it_tries(fake_proc, budget, found):
    for pid in (2, 3, 4):
        fake_proc.process(pid, sockets=[1000 + pid, 1100 + pid])  # two sockets each
    fake_proc.last_pid(4)
    finder = SocketOwnerFinder(str(fake_proc.root))
    for pid in (4, 2, 3):
        assert finder.find(1100 + pid) == pid
    # Known socket fds: 3 and 4 both of theirs, 2 only the one found. 4 replaced a socket and is tried last (3 and
    # 2 are more recent owners): 2 + 1 links before its 2.
    assert {pid: len(fds) for pid, fds in finder._socket_fds.items()} == {2: 1, 3: 2, 4: 2}
    fake_proc.process(4, sockets=[1004, 3004])
    assert finder.find_known(3004, budget=budget) == found


class _CachedOrWaiting:
    """Stands in for PidAttributor: a cached answer as told (None: a thread's work), full lookups that wait."""

    def __init__(self) -> None:
        self.cached: PidResult | None = PidResult(7, "a1", "registered root")
        self.asked_cached = 0
        self.release = threading.Event()

    def resolve_cached(self, peer, sock):
        self.asked_cached += 1
        return self.cached

    def resolve(self, peer, sock, *, everywhere: bool = True, claim=None):
        self.release.wait(30)
        return PidResult(7, "a1", "registered root")


def test_while_lookups_run_on_threads_new_ones_are_not_tried_on_the_event_loop():
    # Each read on the loop gives up the GIL, which busy lookup threads then hold: under many agents connecting at
    # once, trying the cache first cost ~1 ms per connection and a seventh of the calls/s (bench section 4).
    from concurrent.futures import ThreadPoolExecutor

    from mitmproxy.test import tflow

    from rollouttap.addon.capture import RolloutTap
    from rollouttap.addon.flow_attribution import FlowAttribution
    from test_capture import _taddons

    taddons, proxyserver = _taddons()
    pool, scan_pool = ThreadPoolExecutor(1), ThreadPoolExecutor(1)
    lookups = _CachedOrWaiting()
    who = FlowAttribution(pool, scan_pool)
    who.pids = lookups  # type: ignore[assignment]

    async def connections():
        first, second, third = (tflow.tclient_conn() for _ in range(3))
        who.start_pid_lookup(first)  # answered from the cache, at once
        lookups.cached = None
        who.start_pid_lookup(second)  # the cache cannot: a thread looks it up (and waits, here)
        lookups.cached = PidResult(7, "a1", "registered root")
        who.start_pid_lookup(third)  # in the same turn of the loop, before that lookup's task ran: to the threads
        at_once = [who._conn_pid[c.id].done() for c in (first, second, third)]
        lookups.release.set()
        answers = [await who._conn_pid[c.id] for c in (first, second, third)]
        return at_once, answers

    try:
        with taddons.context(proxyserver(), RolloutTap()):
            at_once, answers = asyncio.run(connections())
    finally:
        lookups.release.set()
        pool.shutdown()
        scan_pool.shutdown()
    assert at_once == [True, False, False] and lookups.asked_cached == 2
    assert answers == [PidResult(7, "a1", "registered root")] * 3 and who._on_threads == 0


class _ClaimSeen:
    """Stands in for PidAttributor: lookups wait for ``release``, then note which agent the connection claimed."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.claims: list[str | None] = []

    def on_this_host(self, peer_ip):
        return True

    def resolve_cached(self, peer, sock):
        return None

    def resolve(self, peer, sock, *, everywhere: bool = True, claim=None):
        self.release.wait(30)
        self.claims.append(claim() if claim is not None else None)
        return PidResult(7, None, "under no registered root")

    def connection_closed(self, pid):
        pass


class _Failing(_ClaimSeen):
    def resolve(self, peer, sock, *, everywhere: bool = True, claim=None):
        raise RuntimeError("a lookup that broke")


class _FailsOnce(_ClaimSeen):
    def resolve(self, peer, sock, *, everywhere: bool = True, claim=None):
        self.claims.append(claim() if claim is not None else None)
        if len(self.claims) == 1:
            raise RuntimeError("a lookup that broke")
        return PidResult(7, None, "under no registered root")


class _NoAgents:
    max_age = 1.0

    def cached(self, agent_id):
        return None

    def age(self, agent_id):
        return 0.0

    def lookup(self, agent_id):
        return None


def _attributed(lookups: _ClaimSeen, scenario):
    """What ``scenario(who)`` (a coroutine function) returns, run against a FlowAttribution whose lookups are
    ``lookups`` and whose store knows no agent, under mitmproxy's test context (default options: eager checks)."""
    from concurrent.futures import ThreadPoolExecutor

    from rollouttap.addon.capture import RolloutTap
    from rollouttap.addon.flow_attribution import FlowAttribution
    from test_capture import _taddons

    taddons, proxyserver = _taddons()
    pool, scan_pool = ThreadPoolExecutor(1), ThreadPoolExecutor(1)
    who = FlowAttribution(pool, scan_pool)
    who.pids, who.directory = lookups, _NoAgents()  # type: ignore[assignment]
    try:
        with taddons.context(proxyserver(), RolloutTap()):
            return asyncio.run(scenario(who))
    finally:
        lookups.release.set()
        pool.shutdown()
        scan_pool.shutdown()


def _with_token(flow):
    import base64
    flow.request.headers["Proxy-Authorization"] = "Basic " + base64.b64encode(b"agent-7:secret").decode()
    return flow


def test_a_lookup_still_queued_when_its_request_comes_reads_the_claimed_agent_first():
    # A batch of agents connecting at once queues their lookups; the request that comes meanwhile names its agent
    # (its proxy credentials), whose processes the lookup then reads first. The answer is still the lookup's.
    from mitmproxy.test import tflow
    lookups = _ClaimSeen()

    async def one_request(who):
        flow = _with_token(tflow.tflow())
        who.start_pid_lookup(flow.client_conn)  # at connect: queued behind the batch's others (held, here)
        attributed = asyncio.ensure_future(who.attribute(flow))
        await asyncio.sleep(0.05)  # the request has come and waits for its sender's check
        lookups.release.set()
        answer = await attributed
        who.connection_closed(flow.client_conn)
        return answer, who._claims

    who_said, claims_left = _attributed(lookups, one_request)
    assert lookups.claims == ["agent-7"]
    assert who_said.agent_id is None and who_said.pid == 7  # no such agent: refused as before, by its check
    assert claims_left == {}  # forgotten with its connection


@pytest.mark.parametrize("credentials", [True, False])
def test_a_token_whose_senders_lookup_failed_is_refused_for_now_not_passed(credentials):
    # A lookup that raised checked nothing: a token then would speak for its agent unchecked (503, retried, as a
    # lookup that took too long). Without a token the flow is recorded, attributed to nobody, as before.
    from mitmproxy.test import tflow

    async def one_request(who):
        flow = _with_token(tflow.tflow()) if credentials else tflow.tflow()
        who.start_pid_lookup(flow.client_conn)
        return await who.attribute(flow)

    who_said = _attributed(_Failing(), one_request)
    assert who_said.agent_id is None
    if credentials:
        assert (who_said.method, who_said.retry) == ("rejected", True)
        assert who_said.detail.startswith("its sender could not be checked: lookup failed")
    else:
        assert who_said.method == "none" and who_said.detail.startswith("lookup failed")


def test_after_a_failed_lookup_the_next_request_on_the_connection_is_looked_up_anew():
    # An HTTP/2 connection (or a client that retries on the same one) must not keep getting 503 for one failure.
    from mitmproxy.test import tflow
    lookups = _FailsOnce()

    async def two_requests(who):
        first = _with_token(tflow.tflow())
        second = _with_token(tflow.tflow(client_conn=first.client_conn))
        who.start_pid_lookup(first.client_conn)
        return await who.attribute(first), await who.attribute(second)

    answers = _attributed(lookups, two_requests)
    assert answers[0].retry and answers[0].detail.startswith("its sender could not be checked: lookup failed")
    assert not answers[1].retry and answers[1].pid == 7  # checked this time (no such agent: refused for that)
    assert len(lookups.claims) == 2 and lookups.claims[1] == "agent-7"


class _Quick(_ClaimSeen):
    def resolve(self, peer, sock, *, everywhere: bool = True, claim=None):
        return PidResult(7, None, "under no registered root")


def _request_queued_behind(lookups: _ClaimSeen, busy_s: float, wait_s: float, cap_s: float):
    """The attribution of a credentialed request whose connection's lookup waits ``busy_s`` for the (one-thread)
    pool, taken by another connection's lookup, under a wait of ``wait_s`` and a cap of ``cap_s``."""
    from mitmproxy.test import tflow

    async def one_request(who):
        who.credential_check_wait, who.credential_check_cap = wait_s, cap_s
        who._pool.submit(time.sleep, busy_s)  # another connection's lookup, running (slowed by a busy host)
        flow = _with_token(tflow.tflow())
        who.start_pid_lookup(flow.client_conn)
        answer = await who.attribute(flow)
        who.connection_closed(flow.client_conn)
        return answer, who._clocks

    return _attributed(lookups, one_request)


def test_a_lookup_queued_behind_others_longer_than_the_wait_still_checks_its_request():
    # Hundreds of agents connecting at once on a few cores queue their lookups for seconds: the time a lookup
    # waits for a thread is not its own, and counting it refused their calls (503) though each lookup was quick.
    who_said, clocks_left = _request_queued_behind(_Quick(), busy_s=1.0, wait_s=0.3, cap_s=30)
    assert not who_said.retry and who_said.pid == 7  # checked (no such agent: refused for that, as before)
    assert clocks_left == {}  # forgotten with its connection


def test_a_lookup_queued_past_the_cap_refuses_its_request_for_now():
    who_said, _ = _request_queued_behind(_Quick(), busy_s=1.0, wait_s=0.1, cap_s=0.3)
    assert who_said.retry and who_said.detail == "its sender could not be checked: its lookup did not finish " \
                                                 "within 0.3s, queued or running"


def test_a_lookup_that_runs_over_the_wait_refuses_its_request_for_now():
    # Running, not queued: an agent can slow its own lookups at will (processes holding many descriptors).
    who_said, _ = _request_queued_behind(_ClaimSeen(), busy_s=0.0, wait_s=0.1, cap_s=30)
    assert who_said.retry and who_said.detail == "its sender could not be checked: its lookup ran over 0.1s"


class _TwoSlowSteps(_ClaimSeen):
    """A quick step that finds nothing, then a full scan, each taking ``step_s``."""

    def __init__(self, step_s: float) -> None:
        super().__init__()
        self.step_s = step_s

    def resolve(self, peer, sock, *, everywhere: bool = True, claim=None):
        time.sleep(self.step_s)
        return PidResult(7, None, "under no registered root") if everywhere else None


def test_a_lookups_steps_share_one_wait_its_request_is_refused_when_together_they_run_over():
    # Per step, an agent that slows its own lookups would get the wait twice over (quick lookup, then full scan).
    who_said, _ = _request_queued_behind(_TwoSlowSteps(0.3), busy_s=0.0, wait_s=0.45, cap_s=30)
    assert who_said.retry and who_said.detail == "its sender could not be checked: its lookup ran over 0.45s"


class _TimesOut(_ClaimSeen):
    def resolve(self, peer, sock, *, everywhere: bool = True, claim=None):
        raise TimeoutError("a read that timed out")


def test_a_lookup_that_raised_timeout_error_itself_failed_it_did_not_run_out_of_time():
    # Told apart from the check's own deadline: as any failed lookup, dropped, so the connection's next request
    # looks up anew (and the wait does not go round until the cap).
    who_said, _ = _request_queued_behind(_TimesOut(), busy_s=0.0, wait_s=0.1, cap_s=0.5)
    assert who_said.retry and who_said.detail.startswith("its sender could not be checked: lookup failed: "
                                                         "TimeoutError")


def test_sockets_found_through_a_thread_are_known_as_its_processs(fake_proc):
    # A thread started lately has one of the newest ids, so the search for new processes reads the (shared) fd
    # table through it; a process that reconnects is then looked for under its own id.
    fake_proc.process(7, sockets=[1007])
    fake_proc.process(8, sockets=[1007], tgid=7)  # a thread of 7: the same descriptors
    fake_proc.last_pid(8)
    finder = SocketOwnerFinder(str(fake_proc.root))
    assert finder.find(1007) == 7
    finder.closed(7)
    for pid in (7, 8):  # it reconnects on the freed fd
        fake_proc.process(pid, sockets=[2007], tgid=7)
    assert finder.find_known(2007) == 7
