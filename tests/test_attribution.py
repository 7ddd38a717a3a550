"""Attribution: the pure decisions (tables) and the Linux lookups on real sockets and processes."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import struct
import subprocess
import sys
import threading
import time

import psutil
import pytest

from rollouttap.addon import attribution
from rollouttap.addon.attribution import (
    AgentDirectory, PidAttributor, PidResult, check_token, credentials_conflict, decide_from_ancestry,
    decide_header_claim, is_local_peer, local_ips, parse_basic_credentials, split_agent_path,
)
from rollouttap.addon.procfs import (
    ANCESTRY_DEPTH, AncestryCache, NotCached, ProcInfo, SocketOwnerFinder, StatFiles, ancestry, cut_short,
    parse_agent_tag, parse_stat, read_file,
)
from rollouttap.addon.routes import RouteError, find_route, own_reverse_routes, parse_route, parse_routes
from rollouttap.addon import sockdiag
from rollouttap.addon.sockdiag import (
    build_request, inode_netlink, inode_procfs, normalize_ip, owner_netlink, parse_response,
)
from rollouttap.store import AgentRecord, Store, hash_token, new_token


@pytest.mark.parametrize("size", [0, 10, 65535, 65536, 65537, 200_000])
def test_read_file_reads_files_of_any_size_whole(tmp_path, size):
    path = tmp_path / "f"
    data = bytes(i % 251 for i in range(size))
    path.write_bytes(data)
    assert read_file(str(path)) == data


def test_read_file_reads_proc_files_whole_and_none_when_gone(tmp_path):
    status = read_file(f"/proc/{os.getpid()}/status")
    assert status.startswith(b"Name:") and b"\nTgid:\t" in status and status.endswith(b"\n")
    with open(f"/proc/{os.getpid()}/environ", "rb") as f:
        assert read_file(f"/proc/{os.getpid()}/environ") == f.read()
    assert read_file(str(tmp_path / "missing")) is None


def _basic(text: str) -> str:
    return "Basic " + base64.b64encode(text.encode()).decode()


@pytest.mark.parametrize("header, expected", [
    (_basic("agent1:tok"), ("agent1", "tok")),
    (_basic("agent1:to:k"), ("agent1", "to:k")),
    (_basic("ag%2F1:t%40k"), ("ag/1", "t@k")),
    ("basic " + base64.b64encode(b"a:b").decode(), ("a", "b")),
    (_basic("nocolon"), None),
    (_basic(":tok"), None),
    ("Bearer abc", None),
    ("Basic !!!notbase64", None),
    ("", None),
    (None, None),
])
def test_parse_basic_credentials(header, expected):
    assert parse_basic_credentials(header) == expected


@pytest.mark.parametrize("path, expected", [
    ("/agents/a1/tok/v1/chat/completions", ("a1", "tok", "/v1/chat/completions")),
    ("/agents/a1/tok", ("a1", "tok", "/")),
    ("/agents/a1/tok/", ("a1", "tok", "/")),
    ("/agents/a1", None),
    ("/agents//tok/v1", None),
    ("/v1/chat/completions", None),
])
def test_split_agent_path(path, expected):
    assert split_agent_path(path) == expected


def _agent(agent_id: str, token: str | None, status: str = "running", ended_at: float | None = None) -> AgentRecord:
    return AgentRecord(agent_id, None, None, None, hash_token(token) if token else None, status,
                       0.0, None, ended_at, {})


@pytest.mark.parametrize("agent, token, problem", [
    (_agent("a", "t"), "t", None),
    (_agent("a", "t", "registered"), "t", None),
    (_agent("a", "t"), "x", "wrong token"),
    (_agent("a", None), "t", "wrong token"),
    (None, "t", "not registered"),
    (_agent("a", "t", "ok"), "t", "the agent has ended (ok)"),
    (_agent("a", "t", "timeout"), "t", "the agent has ended (timeout)"),
    (_agent("a", "t", "running", ended_at=1.0), "t", "the agent's processes have ended"),  # result being built
    (_agent("a", "t", "ok", ended_at=1.0), "t", "the agent has ended (ok)"),
])
def test_check_token(agent, token, problem):
    assert check_token(agent, token) == problem


def test_the_agent_directory_caches_a_row_and_its_age(tmp_path):
    with Store(tmp_path / "s.db") as store:
        store.register_agent("a", token=new_token())
        directory = AgentDirectory(str(tmp_path / "s.db"), max_age=0.05)
        assert directory.cached("a") is None and directory.age("a") == float("inf")
        assert directory.lookup("a").status == "registered" and directory.age("a") < 1
        store.agent_ended("a", "ok")
        assert directory.cached("a").status == "registered"  # the cache does no I/O
        assert directory.lookup("a").status == "ok" and directory.cached("a").status == "ok"
        directory.close()


def test_the_agent_directory_reads_only_the_agents_that_have_not_ended(tmp_path):
    path = tmp_path / "s.db"
    with Store(path) as store:
        for i in range(50):
            store.register_agent(f"done-{i}", token=new_token())
            store.agent_started(f"done-{i}", os.getpid())
            store.agent_ended(f"done-{i}", "ok")
        store.register_agent("live", token=new_token())
        store.agent_started("live", os.getpid())
        plan = " ".join(r[3] for r in store._query(
            "EXPLAIN QUERY PLAN SELECT * FROM agents WHERE status IN ('registered', 'running')"))
    assert "agents_live" in plan  # a long run's ended agents are never scanned
    directory = AgentDirectory(str(path))
    try:
        assert directory.roots() == ({os.getpid(): (pytest.approx(_me().create_time()), "live")}, {"live": os.getpid()})
        assert directory.cached("live") is not None and directory.cached("done-0") is None
        assert directory.lookup("done-1").status == "ok" and directory.other("done-2").status == "ok"
        directory.refresh()
        assert directory.cached("done-1") is None  # an ended agent's row leaves the cache at the next refresh
        with Store(path) as store:
            store.agent_exited("live")  # its processes are gone, its result is being built
        directory.refresh()
        assert directory.roots() == ({}, {})  # it claims no process any more, as its token counts no more
    finally:
        directory.close()


def _me():
    import psutil
    return psutil.Process()


def test_a_tag_of_an_ended_agent_from_outside_its_tree_is_refused(tmp_path):
    # The ended agent is not in the directory's live cache: its row is read by key, and its root still counts.
    path = tmp_path / "s.db"
    root = subprocess.Popen(["sleep", "60"])  # the ended agent's root: a sibling of the client, not its ancestor
    with Store(path) as store:
        store.register_agent("gone", token=new_token())
        store.agent_started("gone", root.pid)
        store.agent_ended("gone", "ok")
    directory = AgentDirectory(str(path))
    env = {**os.environ, "ROLLOUTTAP_AGENT_ID": "gone"}
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = subprocess.Popen([sys.executable, "-c", (
            "import socket, sys, time\n"
            f"s = socket.create_connection({server.getsockname()!r})\n"
            "sys.stdin.read()\n")], env=env, stdin=subprocess.PIPE, start_new_session=True)
        try:
            accepted, peer = server.accept()
            with accepted:
                result = PidAttributor(directory).resolve(peer, accepted.getsockname())
        finally:
            client.communicate(b"", timeout=30)
            root.kill()
            root.wait()
            directory.close()
    assert result.pid == client.pid and result.agent_id is None
    assert result.detail == f"tag 'gone' but its root pid {root.pid} is not an ancestor"


@contextlib.contextmanager
def _registered_after_read(tmp_path, agent_id: str):
    """A client process connected to a server of ours, and registered as ``agent_id``'s root only after a directory
    read the live agents: (the directory, the client, our end of its connection, its address)."""
    path = tmp_path / "s.db"
    directory = AgentDirectory(str(path), max_age=3600.0)
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(30)
        client = subprocess.Popen([sys.executable, "-c", (
            "import socket, sys\n"
            f"s = socket.create_connection({server.getsockname()!r})\n"
            "sys.stdin.read()\n")], stdin=subprocess.PIPE, start_new_session=True)
        try:
            accepted, peer = server.accept()
            directory.refresh()  # read before the agent's root is recorded
            with Store(path) as store:
                store.register_agent(agent_id, token=new_token())
                store.agent_started(agent_id, client.pid)
            with accepted:
                yield directory, client, accepted, peer
        finally:
            client.communicate(b"", timeout=30)
            directory.close()


def test_a_lookup_reads_the_store_again_for_a_claimed_agent_registered_since_it_was_read(tmp_path, monkeypatch):
    # A batch's agents register while lookups run: the agent a request claims is often newer than the live agents
    # read; its root, read again then, is where the lookup looks first.
    monkeypatch.setattr(attribution, "TAG_REFRESH_S", 0.0)
    firsts: list[int | None] = []

    class Spy(SocketOwnerFinder):
        def find(self, inode, roots=(), *, everywhere=True, first=None):
            firsts.append(first)
            return super().find(inode, roots, everywhere=everywhere, first=first)

    with _registered_after_read(tmp_path, "claimed") as (directory, client, accepted, peer):
        attributor = PidAttributor(directory)
        attributor.finder = Spy()
        result = attributor.resolve(peer, accepted.getsockname(), claim=lambda: "claimed")
        unclaimed = attributor.resolve(peer, accepted.getsockname(), claim=lambda: "nobody")
    assert firsts == [client.pid, None]
    assert result.pid == unclaimed.pid == client.pid and result.agent_id == "claimed"


def test_a_quick_lookup_that_fails_reads_agents_registered_since_and_their_roots(tmp_path, monkeypatch):
    # A batch of agents starting: the manager records an agent's root pid as it gets to it, so a connection can come
    # before the proxy's live agents hold it. Read again, the root is where the lookup looks, not every process.
    monkeypatch.setattr(attribution, "TAG_REFRESH_S", 0.0)
    with _registered_after_read(tmp_path, "late") as (directory, client, accepted, peer):
        attributor = PidAttributor(directory)
        attributor.finder = SocketOwnerFinder(young=0)  # no new pids probed: only the roots lead to it
        result = attributor.resolve(peer, accepted.getsockname(), everywhere=False)
    assert result is not None and (result.pid, result.agent_id) == (client.pid, "late")


def test_a_process_probed_as_new_before_it_connects_is_still_found_quickly_hundreds_of_pids_later():
    # Under a batch, hundreds of pids (agents, their launcher's threads) are handed out between an agent's start
    # and its first connection: the young list must still hold it, or the lookup waits for the full one.
    code = ("import socket, sys\n"
            "sys.stdin.readline()\n"
            "s = socket.create_connection(('127.0.0.1', int(sys.argv[1])))\n"
            "print(s.getsockname()[1], flush=True); sys.stdin.readline()\n")
    with socket.create_server(("127.0.0.1", 0)) as server, \
            socket.create_connection(server.getsockname()) as mine:
        server.settimeout(30)
        agent = subprocess.Popen([sys.executable, "-c", code, str(server.getsockname()[1])],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            finder = SocketOwnerFinder()
            finder.find(os.fstat(mine.fileno()).st_ino, everywhere=False)  # an earlier lookup: probes the agent
            threads = subprocess.Popen([sys.executable, "-c", (  # more live pids than the young list held before
                "import sys, threading\n"
                "done = threading.Event()\n"
                "[threading.Thread(target=done.wait).start() for _ in range(150)]\n"
                "print('ready', flush=True); sys.stdin.readline(); done.set()\n")],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert threads.stdout.readline().strip() == "ready"
            finder.find(os.fstat(mine.fileno()).st_ino, everywhere=False)  # a lookup meanwhile: probes them
            agent.stdin.write("connect\n")
            agent.stdin.flush()
            port = int(agent.stdout.readline())
            accepted, _ = server.accept()
            with accepted:
                assert finder.find(inode_netlink(("127.0.0.1", port), server.getsockname()),
                                   everywhere=False) == agent.pid
            threads.stdin.close()
            threads.wait(5)
        finally:
            agent.stdin.close()
            agent.wait(5)


@pytest.mark.parametrize("case", ["own root", "root elsewhere", "processes ended"])
def test_an_agent_registered_since_the_directory_was_read_counts_its_root_at_once(tmp_path, monkeypatch, case):
    # deploy() registers an agent, starts it, and its first connection can come before the proxy reads the live
    # agents again (at most every TAG_REFRESH_S; its cache is a second old). The tag's row, read for the lookup,
    # names the root: it must count then, not refuse the agent's own process as "not under its root"; a process
    # elsewhere that carries the tag, or the tag of an agent whose processes have ended, must still be refused.
    monkeypatch.setattr(attribution, "TAG_REFRESH_S", 3600.0)  # no re-read of its own during the test
    path = tmp_path / "s.db"
    directory = AgentDirectory(str(path), max_age=3600.0)
    env = {**os.environ, "ROLLOUTTAP_AGENT_ID": "fresh"}
    elsewhere = subprocess.Popen(["sleep", "60"])  # a root that is not the client's ancestor
    with socket.create_server(("127.0.0.1", 0)) as server:
        server.settimeout(30)
        client = subprocess.Popen([sys.executable, "-c", (
            "import socket, sys\n"
            f"s = socket.create_connection({server.getsockname()!r})\n"
            "sys.stdin.read()\n")], env=env, stdin=subprocess.PIPE, start_new_session=True)
        root = elsewhere if case == "root elsewhere" else client
        try:
            accepted, peer = server.accept()
            directory.refresh()  # read before the agent is registered
            with Store(path) as store:
                store.register_agent("fresh", token=new_token())
                store.agent_started("fresh", root.pid)
                if case == "processes ended":
                    store.agent_exited("fresh")
            with accepted:
                result = PidAttributor(directory).resolve(peer, accepted.getsockname())
            learnt = directory.roots()
            created = psutil.Process(root.pid).create_time()
        finally:
            client.communicate(b"", timeout=30)
            elsewhere.kill()
            elsewhere.wait()
            directory.close()
    assert result.pid == client.pid
    if case == "own root":
        assert (result.agent_id, result.detail, result.roots) == ("fresh", "registered root", ("fresh",))
    else:
        assert (result.agent_id, result.detail, result.roots) == (
            None, f"tag 'fresh' but its root pid {root.pid} is not an ancestor", ())
    # A live agent's root, learnt from the row read for the lookup: the next lookups need not read it again.
    # An agent whose processes have ended claims none (as a refresh would leave it out).
    assert learnt == (({}, {}) if case == "processes ended" else
                      ({root.pid: (pytest.approx(created), "fresh")}, {"fresh": root.pid}))


def test_the_directory_learns_no_row_read_before_its_last_refresh(tmp_path):
    # A lookup read the agent's row, then a refresh saw it end: the refresh knows better, the row is not learnt.
    path = tmp_path / "s.db"
    with Store(path) as store:
        store.register_agent("a", token=new_token())
        store.agent_started("a", os.getpid())
    directory = AgentDirectory(str(path))
    try:
        read_at = time.monotonic()
        row = directory.read("a")
        with Store(path) as store:
            store.agent_exited("a")
        directory.refresh()
        directory.learn(row, read_at)
        assert directory.roots() == ({}, {}) and directory.cached("a").ended_at is not None  # the refresh's row
        directory.learn(row, time.monotonic())  # as if read after the refresh: learnt
        assert directory.roots()[1] == {"a": os.getpid()} and directory.cached("a") == row
    finally:
        directory.close()


def test_a_socket_of_this_user_that_no_process_holds_is_unfound(tmp_path):
    # Parked in flight (passed over a unix socket, its sender's copy closed): the lookup finds no holder, and a
    # token sent on it later could not be checked against its sender.
    import array
    directory = AgentDirectory(str(tmp_path / "s.db"))
    with socket.create_server(("127.0.0.1", 0)) as server, socket.create_connection(server.getsockname()) as client:
        accepted, peer = server.accept()
        parked, keep = socket.socketpair()
        with accepted, parked, keep:
            keep.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [client.fileno()]))])
            client.close()
            result = PidAttributor(directory).resolve(peer, accepted.getsockname())
    directory.close()
    assert result.pid is None and result.unfound


_NESTED = """
import os, socket, sys
for _ in range(int(sys.argv[2])):  # each level a child of the one before, waited for
    if os.fork():
        os.wait()
        os._exit(0)
with socket.create_connection(("127.0.0.1", int(sys.argv[1]))) as sock:
    sock.recv(1)
"""


@pytest.mark.parametrize("depth", [3, ANCESTRY_DEPTH + 5])
def test_a_process_nested_deeper_than_the_ancestry_is_read_is_untraced(tmp_path, depth):
    # Nested past the depth read, a process under one agent's root would be under none: its token (another
    # agent's) would pass, its tag speak for it. Its sender is unknown instead.
    directory = AgentDirectory(str(tmp_path / "s.db"))
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = subprocess.Popen([sys.executable, "-c", _NESTED, str(server.getsockname()[1]), str(depth)],
                                  env={**os.environ, "ROLLOUTTAP_AGENT_ID": "deep"})
        try:
            server.settimeout(60)
            accepted, peer = server.accept()
            with accepted:
                result = PidAttributor(directory).resolve(peer, accepted.getsockname())
        finally:
            client.kill()
            client.wait()
            directory.close()
    assert result.pid is not None and result.pid != client.pid
    if depth < ANCESTRY_DEPTH:
        assert (result.agent_id, result.untraced) == ("deep", False)
    else:
        assert (result.agent_id, result.untraced) == (None, True) and "levels deep" in result.detail


def _chain(*specs):
    """Nearest first: (pid, tag) pairs; start ticks = pid * 10 for the table."""
    return [ProcInfo(pid, 0, pid * 10, tag) for pid, tag in specs]


def _ctime(info):
    return float(info.start_ticks)


@pytest.mark.parametrize("chain, roots, known, expected", [
    # grandchild of a tagged agent
    (_chain((30, "A"), (20, "A"), (10, "A"), (1, None)), {}, {}, "A"),
    # registered root matches with the right start time
    (_chain((30, None), (20, None), (1, None)), {20: (200.0, "B")}, {"B": 20}, "B"),
    # a reused pid (another start time) never matches
    (_chain((30, None), (20, None), (1, None)), {20: (999.0, "B")}, {"B": 20}, None),
    # an agent re-tagging its child as another agent: the outermost (registered) one wins
    (_chain((30, "B"), (20, "A"), (1, None)), {20: (200.0, "A")}, {"A": 20, "B": 50}, "A"),
    # a tag naming an agent whose registered root is elsewhere is refused
    (_chain((30, "B"), (1, None)), {}, {"B": 50}, None),
    # nested tags, no registry: the outermost tag wins
    (_chain((30, "B"), (20, "A"), (1, None)), {}, {}, "A"),
    # nothing at all
    (_chain((30, None), (1, None)), {}, {}, None),
    # a tag naming an agent of credentials alone (`rollouttap agent start`: a token, no process): any process
    # may carry any tag
    (_chain((30, "H"), (1, None)), {}, {"H": None}, None),
])
def test_decide_from_ancestry(chain, roots, known, expected):
    agent_id, detail = decide_from_ancestry(chain, roots, known, _ctime)
    assert agent_id == expected
    assert detail


@pytest.mark.parametrize("ip, local", [
    ("127.0.0.1", True), ("127.8.9.1", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("10.1.2.3", False), ("192.0.2.7", True),
])
def test_is_local_peer(ip, local):
    assert is_local_peer(ip, frozenset({"192.0.2.7"})) is local


@pytest.mark.parametrize("ip, local", [
    ("fe80::fc:ff:fe00:1", True), ("fe80::fc:ff:fe00:1%eth0", True), ("fe80::2", False), ("192.0.2.7", True),
])
def test_a_link_local_interface_address_listed_with_its_zone_is_this_host(ip, local):
    # psutil lists fe80::…%eth0; a peer on it comes as fe80::… (a sender on this host taken for a remote one
    # skipped the check of its token).
    ips = local_ips(["fe80::fc:ff:fe00:1%eth0", "::ffff:192.0.2.7"])
    assert is_local_peer(ip, ips) is local


@pytest.mark.parametrize("stat, expected", [
    (b"42 (python3) S 7 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 12345 0 0", (7, 12345)),
    (b"42 (we ird) name)) S 8 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 999 0 0", (8, 999)),
])
def test_parse_stat(stat, expected):
    assert parse_stat(stat) == expected


@pytest.mark.parametrize("environ, tag", [
    (b"PATH=/bin\0ROLLOUTTAP_AGENT_ID=abc\0HOME=/", "abc"),
    (b"PATH=/bin\0XROLLOUTTAP_AGENT_ID=abc\0", None),
    (b"ROLLOUTTAP_AGENT_ID=\0", None),
    (b"", None),
    (b"ROLLOUTTAP_AGENT_ID=first\0ROLLOUTTAP_AGENT_ID=second\0", "first"),
    (b"A=1\0ROLLOUTTAP_AGENT_ID=last", "last"),
    (b"A=ROLLOUTTAP_AGENT_ID=x\0", None),
])
def test_parse_agent_tag(environ, tag):
    assert parse_agent_tag(environ) == tag


@pytest.mark.parametrize("ip, family, packed_len", [
    ("127.0.0.1", socket.AF_INET, 4), ("::ffff:127.0.0.1", socket.AF_INET, 4), ("::1", socket.AF_INET6, 16),
])
def test_normalize_ip(ip, family, packed_len):
    fam, packed = normalize_ip(ip)
    assert fam == family and len(packed) == packed_len


def test_netlink_request_is_well_formed():
    msg = build_request(("127.0.0.1", 5000), ("127.0.0.1", 8080))
    assert len(msg) == int.from_bytes(msg[:4], "little") == 16 + 8 + 48


def _connected_pair(family=socket.AF_INET, host="127.0.0.1"):
    server = socket.socket(family, socket.SOCK_STREAM)
    server.bind((host, 0))
    server.listen()
    client = socket.socket(family, socket.SOCK_STREAM)
    client.connect(server.getsockname()[:2])
    accepted, _ = server.accept()
    return server, client, accepted


@pytest.mark.parametrize("family, host", [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")])
def test_socket_inode_by_netlink_and_procfs_agree(family, host):
    try:
        server, client, accepted = _connected_pair(family, host)
    except OSError:
        pytest.skip(f"no {host} on this machine")
    with server, client, accepted:
        src, dst = client.getsockname()[:2], client.getpeername()[:2]
        expected = os.fstat(client.fileno()).st_ino
        assert inode_netlink(src, dst) == expected
        assert inode_procfs(src, dst) == expected
        # the accepted (server-side) socket is another inode
        assert inode_netlink(dst, src) == os.fstat(accepted.fileno()).st_ino != expected


def test_an_ipv6_client_connected_to_an_ipv4_listener_is_found_by_netlink_and_procfs():
    # The proxy sees the peer as 127.0.0.1; the kernel lists the client's socket in tcp6, v4-mapped.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    client = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    client.connect(("::ffff:127.0.0.1", server.getsockname()[1]))
    accepted, peer = server.accept()
    with server, client, accepted:
        expected = os.fstat(client.fileno()).st_ino
        assert inode_netlink(peer[:2], accepted.getsockname()[:2]) == expected
        assert inode_procfs(peer[:2], accepted.getsockname()[:2]) == expected


@contextlib.contextmanager
def _child_connected(server: socket.socket, setup: str = "", holding: str = ""):
    """A child process connected to ``server`` (``setup`` runs before it connects, ``holding`` after), alive until
    the block ends: (its pid, the inode of its socket)."""
    child = subprocess.Popen([sys.executable, "-c", (
        f"import os, resource, socket, sys\n{setup}"
        f"s = socket.create_connection({server.getsockname()!r})\n{holding}"
        "print(s.getsockname()[1], flush=True); sys.stdin.readline()\n")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        port = int(child.stdout.readline())
        accepted, _ = server.accept()
        with accepted:
            yield child.pid, inode_netlink(("127.0.0.1", port), server.getsockname())
    finally:
        child.stdin.close()
        child.wait(5)


def test_socket_owner_found_in_another_process():
    with socket.create_server(("127.0.0.1", 0)) as server, _child_connected(server) as (pid, inode):
        finder = SocketOwnerFinder()
        assert finder.find(inode) == pid
        assert finder.find(inode) == pid and finder.scanned_last == 1  # remembered owner first
        chain = ancestry(pid)
        assert [p.pid for p in chain[:2]] == [pid, os.getpid()]


def test_a_quick_lookup_leaves_the_reading_of_every_fd_table_to_the_full_one():
    # young=0: no pid counts as new, so only the scan of every process finds this (old) test process.
    with socket.create_server(("127.0.0.1", 0)) as server, socket.create_connection(server.getsockname()) as client:
        accepted, _ = server.accept()
        with accepted:
            inode = os.fstat(client.fileno()).st_ino
            finder = SocketOwnerFinder(young=0)
            assert finder.find(inode, everywhere=False) is None
            assert finder.find(inode) == os.getpid()
            assert finder.find(inode, everywhere=False) == os.getpid()  # a recent owner now: tried first


def test_a_quick_lookup_does_not_read_a_process_holding_very_many_descriptors():
    # Reading 19,000 links of one process takes ~0.1 s: only the full lookup, on its own thread, does.
    import resource
    from rollouttap.addon.procfs import QUICK_FD_LIMIT
    many = QUICK_FD_LIMIT + 100
    if resource.getrlimit(resource.RLIMIT_NOFILE)[1] < many + 50:
        pytest.skip("the descriptor limit is too low to hold that many")
    setup = ("hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]\n"
             "resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))\n")
    with socket.create_server(("127.0.0.1", 0)) as server, \
            _child_connected(server, setup, f"held = [os.dup(s.fileno()) for _ in range({many})]\n") as (pid, inode):
        finder = SocketOwnerFinder()  # the child is new to it
        assert finder.find(inode, everywhere=False) is None
        assert finder.find(inode) == pid


class _TablesRead(SocketOwnerFinder):
    """A finder that records whose whole fd table each lookup reads (``tables``: the pids, in order)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tables: list[int] = []

    def _holds(self, pid, target, limit=None, read=None):
        self.tables.append(pid)
        return super()._holds(pid, target, limit, read)


def test_a_lookup_reads_the_table_of_a_process_with_many_threads_once():
    # An older process holds the socket; a newer one holds many descriptors and threads. Each thread's id is a
    # newer pid than the owner's, and /proc serves the process's fd table under each: one read must do.
    code = ("import os, sys, threading\n"
            "pipes = [os.pipe() for _ in range(20)]\n"
            "done = threading.Event()\n"
            "threads = [threading.Thread(target=done.wait) for _ in range(8)]\n"
            "[t.start() for t in threads]\n"
            "print(' '.join(str(t.native_id) for t in threads), flush=True); sys.stdin.readline(); done.set()\n")
    with socket.create_server(("127.0.0.1", 0)) as server, _child_connected(server) as (owner, inode):
        threaded = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    text=True)
        try:
            tids = {threaded.pid, *map(int, threaded.stdout.readline().split())}
            finder = _TablesRead(young=4096)  # the owner among the new pids however many others a busy host starts
            assert finder.find(inode, everywhere=False) == owner
            assert len(tids) == 9 and owner not in tids
            assert sum(pid in tids for pid in finder.tables) == 1, finder.tables
        finally:
            threaded.stdin.close()
            threaded.wait(5)


def test_a_lookup_reads_a_small_table_again_rather_than_list_its_threads(fake_proc):
    # Below GROUP_CHECK_MIN descriptors a thread's table costs about what its task list would: no list is read.
    from rollouttap.addon.procfs import GROUP_CHECK_MIN
    fake_proc.process(12, sockets=[1012])
    fake_proc.process(30, sockets=range(2000, 2000 + GROUP_CHECK_MIN), children=())
    for tid in range(31, 34):  # threads of 30: their /proc entries serve its table and task list
        (fake_proc.root / "30" / "task" / str(tid)).mkdir()
        os.symlink("30", fake_proc.root / str(tid))
    fake_proc.last_pid(33)
    finder = _TablesRead(str(fake_proc.root), young=8)
    assert finder.find(1012) == 12
    assert finder.tables == [33, 12]  # 33's table named 30..33: none of them read again
    fake_proc.process(40, sockets=range(3000, 3000 + GROUP_CHECK_MIN - 2))  # one descriptor less with /dev/null
    for tid in range(41, 43):
        (fake_proc.root / "40" / "task" / str(tid)).mkdir()
        os.symlink("40", fake_proc.root / str(tid))
    fake_proc.last_pid(42)
    finder.tables.clear()
    assert finder.find(1012) == 12
    assert finder.tables == []  # found among a recent owner's socket fds: no whole table read
    fake_proc.process(13, sockets=[1013])
    finder.tables.clear()
    assert finder.find(1013) == 13
    assert finder.tables[:3] == [42, 41, 40]  # small: each thread's id read as it came


def test_a_lookup_tries_registered_roots_oldest_first_until_each_held_a_connection(fake_proc):
    from rollouttap.addon.procfs import ROOT_MISSES
    for pid in range(10, 20):  # ten agents started together...
        fake_proc.process(pid, sockets=[1000 + pid])
    for pid in range(40, 60):  # ...then other processes and threads (their launcher's, the proxy's)
        fake_proc.process(pid, sockets=[2000 + pid])
    fake_proc.last_pid(59)
    roots = {pid: (pid * 10.0, f"agent-{pid}") for pid in range(10, 20)}
    finder = _TablesRead(str(fake_proc.root))  # (a fake fd directory's size is no descriptor count: full lookups)
    assert finder.find(1010, roots) == 10
    assert finder.tables == [10]  # the oldest root first, not the newest pids
    for pid in range(12, 12 + ROOT_MISSES):  # 11 never connects itself (its children would)
        finder.tables.clear()
        assert finder.find(1000 + pid, roots) == pid
        assert finder.tables == [11, pid]  # 10 held one already
    finder.tables.clear()
    assert finder.find(1000 + 12 + ROOT_MISSES, roots) == 12 + ROOT_MISSES
    assert finder.tables == [12 + ROOT_MISSES]  # 11 missed ROOT_MISSES times: left to the rest of the search
    finder.tables.clear()
    roots = dict(roots)  # read again from the store: what each root did still counts
    assert finder.find(2059, roots) == 59  # not a root's: the due roots, then the newest pid
    assert finder.tables == [pid for pid in range(13 + ROOT_MISSES, 20)] + [59]


def test_a_lookup_reads_the_tree_of_the_agent_its_request_claims_first(fake_proc):
    for pid in range(10, 20):
        fake_proc.process(pid, sockets=[1000 + pid])
    fake_proc.process(10, children=[30])  # the oldest root's child connects
    fake_proc.process(30, ppid=10, sockets=[2030])
    fake_proc.last_pid(30)
    roots = {pid: (None, f"agent-{pid}") for pid in range(10, 20)}
    finder = _TablesRead(str(fake_proc.root))
    assert finder.find(2030, roots, first=10) == 30
    assert finder.tables == [10, 30]  # the claimed root, then its descendants: no other root, no newest pid
    finder.tables.clear()
    assert finder.find(1011, roots) == 11
    assert finder.tables == [11]  # 10's tree held one: 10 is no longer read first
    finder.tables.clear()
    assert finder.find(1012, roots, first=19) == 12  # a claim its tree does not bear out: the search goes on
    assert finder.tables[:2] == [19, 12]


def test_a_root_found_by_another_lookup_meanwhile_is_not_counted_back_as_a_miss(fake_proc):
    # Lookups run on several threads: one reads root 10 and misses while another finds one of 10's sockets.
    for pid in (10, 11):
        fake_proc.process(pid, sockets=[1000 + pid])
    fake_proc.last_pid(11)
    roots = {10: (None, "agent-10"), 11: (None, "agent-11")}

    class Meanwhile(_TablesRead):
        def _holds(self, pid, target, limit=None, read=None):
            if pid == 10:
                self._root_served(10, roots)  # the other thread's lookup ends first
            return super()._holds(pid, target, limit, read)

    finder = Meanwhile(str(fake_proc.root))
    assert finder.find(1011, roots) == 11
    assert finder.tables == [10, 11]
    assert finder._root_tries[(10, roots[10])] == -1  # held one: never read first again
    finder.tables.clear()
    fake_proc.process(12, sockets=[1012])
    fake_proc.last_pid(12)
    assert finder.find(1012, roots) == 12 and finder.tables == [12]


def test_a_process_holding_hundreds_of_sockets_is_found_again_by_a_quick_lookup(fake_proc):
    # Over QUICK_FD_LIMIT descriptors a quick lookup does not read its whole table, but the socket fds it held when
    # last read are few reads each: a pool of 300 connections that reconnects is found without the full lookup.
    from rollouttap.addon.procfs import QUICK_FD_LIMIT
    fake_proc.process(5, sockets=range(3000, 3000 + QUICK_FD_LIMIT + 44))
    fake_proc.last_pid(5)
    finder = SocketOwnerFinder(str(fake_proc.root))
    assert finder.find(3000) == 5  # the full lookup (a fake fd directory's size is no descriptor count)
    finder.closed(5)
    os.unlink(fake_proc.root / "5" / "fd" / "3")
    os.symlink("socket:[9999]", fake_proc.root / "5" / "fd" / "3")  # it reconnects on the freed fd
    assert finder.find(9999, everywhere=False) == 5


def test_a_lookup_reads_root_probes_registered_roots_before_the_newest_pids_and_the_rest_after(fake_proc):
    from rollouttap.addon.procfs import ROOT_PROBES
    batch = range(10, 10 + 2 * ROOT_PROBES)
    for pid in batch:
        fake_proc.process(pid, sockets=[1000 + pid])
    for pid in range(50, 53):
        fake_proc.process(pid, sockets=[2000 + pid])
    fake_proc.last_pid(52)
    roots = {pid: (None, f"agent-{pid}") for pid in batch}
    finder = _TablesRead(str(fake_proc.root), young=2)
    assert finder.find(2052, roots) == 52
    assert finder.tables == [*batch[:ROOT_PROBES], 52]
    fake_proc.process(53, sockets=[2053])
    fake_proc.process(54, sockets=[2054])
    fake_proc.last_pid(54)
    later = batch[ROOT_PROBES + 2]
    finder.tables.clear()
    assert finder.find(1000 + later, roots) == later
    assert finder.tables == [*batch[:ROOT_PROBES], 54, 53, *batch[ROOT_PROBES:ROOT_PROBES + 3]]


def test_only_a_registered_roots_first_reads_count_as_its_misses(fake_proc):
    from rollouttap.addon.procfs import ROOT_MISSES, ROOT_PROBES
    batch = range(10, 10 + 2 * ROOT_PROBES)
    for pid in batch:
        fake_proc.process(pid, sockets=[1000 + pid])
    fake_proc.last_pid(batch[-1])
    roots = {pid: (None, f"agent-{pid}") for pid in batch}
    finder = _TablesRead(str(fake_proc.root), young=0)  # no new pids probed: the roots lead to each owner
    behind = batch[ROOT_PROBES]
    for n in range(ROOT_MISSES):  # the last roots connect first: every read of the first ROOT_PROBES is a miss
        os.symlink(f"socket:[{4000 + batch[-1 - n]}]", fake_proc.root / str(batch[-1 - n]) / "fd" / "9")
        finder.tables.clear()
        assert finder.find(4000 + batch[-1 - n], roots) == batch[-1 - n]
        assert finder.tables == [*batch[:ROOT_PROBES], *range(behind, batch[-1 - n] + 1)]
    os.symlink(f"socket:[{4000 + behind}]", fake_proc.root / str(behind) / "fd" / "9")  # it connects, at a new fd
    finder.tables.clear()
    assert finder.find(4000 + behind, roots) == behind
    # The first ROOT_PROBES missed ROOT_MISSES times: left to the rest of the search. ``behind`` was read as often,
    # after the newest pids: no misses of its own, so it is read first now.
    assert finder.tables == [behind]


class _Lookups:
    """Stands in for PidAttributor.resolve: quick answers as told, full ones record that they ran."""

    def __init__(self, quick: PidResult | None) -> None:
        self.quick, self.full = quick, 0

    def resolve(self, peer, sock, *, everywhere: bool = True, claim=None):
        if everywhere:
            self.full += 1
            return PidResult(4242, "found-by-scan")
        return self.quick


@pytest.mark.parametrize("quick", [None, PidResult(7, "found-at-once")])
def test_a_lookup_that_must_read_every_process_waits_on_its_own_thread_not_the_others(quick):
    # A client that hides its socket (or starts processes with many descriptors) makes full scans slow: they
    # queue on one thread of their own, and a lookup found at once never waits behind them.
    from concurrent.futures import ThreadPoolExecutor
    from rollouttap.addon.flow_attribution import FlowAttribution, LookupClock
    scan_pool, pool = ThreadPoolExecutor(1), ThreadPoolExecutor(2)
    busy = threading.Event()
    scan_pool.submit(busy.wait, 30)  # a slow scan holds the scan thread
    lookups = _Lookups(quick)
    who = FlowAttribution(pool, scan_pool)

    async def lookup():
        task = asyncio.ensure_future(who._lookup(lookups, ("127.0.0.1", 1), ("127.0.0.1", 2), LookupClock()))
        done, _ = await asyncio.wait([task], timeout=2)
        busy.set()  # the slow scan ends
        return await task, bool(done)

    try:
        result, at_once = asyncio.run(lookup())
    finally:
        busy.set()
        pool.shutdown()
        scan_pool.shutdown()
    assert at_once == (quick is not None)
    assert result == (quick or PidResult(4242, "found-by-scan")) and lookups.full == (quick is None)


def test_a_full_lookup_asked_for_after_the_pools_shut_down_is_cancelled_not_an_error():
    # The proxy stops while a quick lookup runs: its full lookup can no longer be scheduled.
    from concurrent.futures import ThreadPoolExecutor
    from rollouttap.addon.flow_attribution import FlowAttribution, LookupClock
    pool, scan_pool = ThreadPoolExecutor(1), ThreadPoolExecutor(1)
    scan_pool.shutdown()
    who = FlowAttribution(pool, scan_pool)

    async def lookup():
        return await who._lookup(_Lookups(None), ("127.0.0.1", 1), ("127.0.0.1", 2), LookupClock())

    try:
        with pytest.raises(asyncio.CancelledError):
            asyncio.run(lookup())
    finally:
        pool.shutdown()


def test_socket_of_exited_process_is_not_found():
    assert inode_netlink(("127.0.0.1", 1), ("127.0.0.1", 2)) is None


@pytest.mark.parametrize("spec, host, port, target", [
    ("api.openai.com=http://127.0.0.1:8000", "api.openai.com", 443, ("http", "127.0.0.1", 8000, "/v1/x")),
    ("api.openai.com:443=https://m.local/pre/", "api.openai.com", 443, ("https", "m.local", 443, "/pre/v1/x")),
    # An IPv6 source as in a URL, with or without a port; mitmproxy gives its host without brackets.
    ("[2001:db8::9]:80=http://127.0.0.1:8000", "2001:db8::9", 80, ("http", "127.0.0.1", 8000, "/v1/x")),
    ("[2001:DB8::9]=http://127.0.0.1:8000", "2001:db8:0::9", 8080, ("http", "127.0.0.1", 8000, "/v1/x")),
    ("2001:db8::8=http://[::1]:8000/v1", "2001:DB8::8", 443, ("http", "::1", 8000, "/v1/v1/x")),
    ("::1=http://127.0.0.1:8000", "::1", 80, ("http", "127.0.0.1", 8000, "/v1/x")),
])
def test_routes(spec, host, port, target):
    route = parse_route(spec)
    assert find_route((route,), host, port).target("/v1/x") == target
    assert find_route((route,), "other.host", port) is None


def test_an_ipv6_route_with_a_port_matches_only_that_port():
    route = parse_route("[2001:db8::9]:8443=http://127.0.0.1:1")
    assert find_route((route,), "2001:db8::9", 443) is None and find_route((route,), "2001:db8::9", 8443) is route


@pytest.mark.parametrize("spec", ["nohost", "=http://x", "h=ftp://x", "h:abc=http://x", "h=", "h:0=http://x",
                                  "h:65536=http://x", "a:b:c=http://x", "[2001:db8::9=http://x",
                                  "[2001:db8::9]80=http://x", "[2001:db8::9]:=http://x", "[h]:80=http://x",
                                  "[2001:db8::9]:x=http://x", "2001:db8::9:80=http://x"])
def test_bad_routes_are_refused(spec):
    with pytest.raises(RouteError):
        parse_routes([spec])


def test_a_bare_ipv6_route_ending_in_what_could_be_a_port_is_refused_with_both_readings():
    with pytest.raises(RouteError, match=r"ambiguous: write \[::1:8000\] for that address, "
                                         r"or \[::1\]:8000 for port 8000"):
        parse_route("::1:8000=http://127.0.0.1:1")


def test_route_with_port_only_matches_that_port():
    route = parse_route("h:8443=http://127.0.0.1:1")
    assert find_route((route,), "h", 443) is None and find_route((route,), "H", 8443) is route


@pytest.mark.parametrize("host, port, target", [
    ("localhost", 7001, ("http", "127.0.0.1", 8000, "/v1/x")),  # how agents are given the base URL
    ("127.0.0.1", 7001, ("http", "127.0.0.1", 8000, "/v1/x")),
    ("::1", 7001, ("http", "127.0.0.1", 8000, "/v1/x")),
    ("LOCALHOST", 7001, ("http", "127.0.0.1", 8000, "/v1/x")),
    ("127.0.0.2", 7002, ("https", "m.local", 443, "/v1/x")),  # a listener on another loopback address
    ("localhost", 7002, ("https", "m.local", 443, "/v1/x")),
    ("localhost", 7000, None),  # the regular listener is no reverse one
    ("127.0.0.1", 8000, None),  # the model server itself
    ("example.com", 7001, None),
    ("localhost", 7003, None),  # a reverse listener for TCP, not HTTP
    ("10.0.0.5", 7004, ("http", "127.0.0.1", 8000, "/v1/x")),  # on every address: named by this host's address
    ("10.0.0.5", 7001, None),  # a listener on loopback only is not reached by that address
    ("10.0.0.6", 7004, None),  # another host's
])
def test_requests_to_our_own_reverse_listeners_go_to_their_targets(host, port, target):
    routes = own_reverse_routes((("127.0.0.1", 7001, "http", "127.0.0.1", 8000),
                                 ("127.0.0.2", 7002, "https", "m.local", 443),
                                 ("127.0.0.1", 7003, "tcp", "127.0.0.1", 9000),
                                 ("0.0.0.0", 7004, "http", "127.0.0.1", 8000)), here=("10.0.0.5", "127.0.0.1"))
    route = find_route(routes, host, port)
    assert (route.target("/v1/x") if route else None) == target


# -- the owner search and the ancestry cache on a fake /proc (deterministic order and counts) ----------
class FakeProc:
    """A /proc tree with just what procfs reads: stat, environ, status, fd links, children, ns_last_pid."""

    def __init__(self, root):
        self.root = root
        (root / "sys" / "kernel").mkdir(parents=True)
        self.last_pid(1)

    def last_pid(self, pid):
        (self.root / "sys" / "kernel" / "ns_last_pid").write_text(f"{pid}\n")

    def process(self, pid, ppid=1, start=None, tag=None, sockets=(), tgid=None, children=()):
        d = self.root / str(pid)
        (d / "fd").mkdir(parents=True, exist_ok=True)
        (d / "task" / str(pid)).mkdir(parents=True, exist_ok=True)
        self.stat(pid, ppid, start if start is not None else pid * 10)
        env = b"PATH=/bin\0" + (f"ROLLOUTTAP_AGENT_ID={tag}\0".encode() if tag else b"")
        (d / "environ").write_bytes(env)
        (d / "status").write_text(f"Name:\tx\nTgid:\t{tgid or pid}\nPid:\t{pid}\n")
        for fd, target in [(0, "/dev/null")] + [(n, f"socket:[{i}]") for n, i in enumerate(sockets, start=3)]:
            link = d / "fd" / str(fd)
            link.unlink(missing_ok=True)
            os.symlink(target, link)
        (d / "task" / str(pid) / "children").write_text(" ".join(map(str, children)))

    def stat(self, pid, ppid, start):
        fields = ["S", str(ppid)] + ["0"] * 17 + [str(start), "0", "0"]
        (self.root / str(pid) / "stat").write_text(f"{pid} (fake proc) " + " ".join(fields) + "\n")

    def gone(self, pid):
        import shutil
        shutil.rmtree(self.root / str(pid))


@pytest.fixture
def fake_proc(tmp_path):
    return FakeProc(tmp_path / "proc")


def test_finder_full_scan_finds_an_old_unknown_process(fake_proc):
    for pid in range(2, 40):
        fake_proc.process(pid, sockets=[1000 + pid])
    fake_proc.last_pid(39)
    finder = SocketOwnerFinder(str(fake_proc.root), young=4)
    assert finder.find(1005) == 5
    assert finder.find(999) is None


def test_finder_probes_new_pids_without_listing_proc(fake_proc):
    for pid in range(2, 40):
        fake_proc.process(pid, sockets=[1000 + pid])
    fake_proc.last_pid(39)
    finder = SocketOwnerFinder(str(fake_proc.root))
    assert finder.find(1030) == 30  # first lookup: probes down from ns_last_pid
    fake_proc.process(41, sockets=[2041])
    fake_proc.process(42, sockets=[2042])
    fake_proc.last_pid(43)  # 43 already exited
    assert finder.find(2041) == 41 and finder.scanned_last == 3  # recent owner 30, then 42, 41
    assert finder.find(2042) == 42 and finder.scanned_last == 1  # seen while looking for 2041


def test_finder_tries_closed_connections_owner_first(fake_proc):
    for pid in range(2, 12):
        fake_proc.process(pid, sockets=[1000 + pid])
    fake_proc.last_pid(11)
    finder = SocketOwnerFinder(str(fake_proc.root))
    for pid in (9, 5, 7):
        assert finder.find(1000 + pid) == pid
    finder.closed(5)
    fake_proc.process(5, sockets=[3005])  # it reconnects: the new socket takes the freed fd
    assert finder.find(3005) == 5 and finder.scanned_last == 1
    os.symlink("socket:[4005]", fake_proc.root / "5" / "fd" / "9")  # a socket at a new fd number
    assert finder.find(4005) == 5  # the known socket fds do not have it: its whole fd table does


@pytest.mark.parametrize("given", [list, iter])  # an iterator of roots is read more than once too
def test_finder_searches_descendants_of_roots_before_everything(fake_proc, given):
    for pid in range(2, 60):
        fake_proc.process(pid, sockets=[1000 + pid])
    fake_proc.process(20, children=[25])
    fake_proc.process(25, ppid=20, children=[31])
    fake_proc.process(31, ppid=25, sockets=[4031])
    fake_proc.last_pid(59)
    finder = SocketOwnerFinder(str(fake_proc.root), young=2)
    assert finder.find(4031, roots=given([20])) == 31
    # The root itself (none of its connections found yet), the two newest pids, then the deepest descendant first.
    assert finder.scanned_last == 1 + 2 + 1
    assert finder.find(1058) == 58 and finder.scanned_last == 1  # its socket was seen on the way


def test_finder_maps_a_thread_to_its_process_and_forgets_the_gone(fake_proc):
    fake_proc.process(7, sockets=[1007])
    fake_proc.process(8, sockets=[1007], tgid=7)  # /proc serves a thread's id but does not list it
    fake_proc.last_pid(8)
    finder = SocketOwnerFinder(str(fake_proc.root))
    assert finder.find(1007) == 7
    fake_proc.gone(7)
    fake_proc.gone(8)
    assert finder.find(1007) is None


def _fds_open() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_stat_files_read_a_live_process_again_and_let_go_of_a_reaped_one():
    procs = [subprocess.Popen(["sleep", "60"]) for _ in range(3)]
    before = _fds_open()
    files = StatFiles(size=2)
    try:
        first = files.read(procs[0].pid)
        assert first is not None and parse_stat(first) == parse_stat(read_file(f"/proc/{procs[0].pid}/stat"))
        assert len(_fds_open() - before) == 1  # kept open
        assert files.read(procs[0].pid) == first  # read again through it (sleep's stat does not change)
        assert len(_fds_open() - before) == 1
        for proc in procs[1:]:
            assert parse_stat(files.read(proc.pid))[0] == os.getpid()
        assert len(_fds_open() - before) == 2  # at most size kept: the oldest is closed
        procs[2].kill()
        procs[2].wait()  # reaped: its kept file answers ESRCH, and its pid names no process
        assert files.read(procs[2].pid) is None
        assert len(_fds_open() - before) == 1
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        files.close()
    assert _fds_open() == before
    del files  # a cache dropped without close() closes its files too
    again = StatFiles()
    assert again.read(os.getpid()) is not None and len(_fds_open() - before) == 1
    del again
    assert _fds_open() == before


def test_cached_ancestry_reads_kept_stat_files_and_sees_a_process_end():
    proc = subprocess.Popen(["sleep", "60"], env={**os.environ, "ROLLOUTTAP_AGENT_ID": "kept"})
    cache = AncestryCache()
    try:
        full = cache.chain(proc.pid)
        assert full[0].agent_tag == "kept" and full[1].pid == os.getpid()
        assert proc.pid not in cache._stat_files._fds  # a lookup on a thread reads it the plain way
        assert cache.chain(proc.pid, cached=True) == full  # the owner's stat read again, and kept open
        assert cache.chain(proc.pid, cached=True) == full
        assert proc.pid in cache._stat_files._fds
        with pytest.raises(NotCached):  # its environ is not read on the event loop
            AncestryCache().chain(proc.pid, cached=True)
    finally:
        proc.kill()
        proc.wait()
    assert cache.chain(proc.pid, cached=True) == []
    assert proc.pid not in cache._stat_files._fds


def test_ancestry_cache_matches_ancestry_and_follows_pid_reuse(fake_proc):
    fake_proc.process(10, tag="A")
    fake_proc.process(20, ppid=10)
    fake_proc.process(30, ppid=20, tag="B")
    proc = str(fake_proc.root)
    cache = AncestryCache(proc, max_age=3600)
    assert cache.chain(30) == ancestry(30, proc) == [
        ProcInfo(30, 20, 300, "B"), ProcInfo(20, 10, 200, None), ProcInfo(10, 1, 100, "A")]
    fake_proc.process(30, ppid=20, start=999, tag="C")  # pid 30 reused by another process
    assert [p.agent_tag for p in cache.chain(30)] == ["C", None, "A"]
    fake_proc.stat(30, 10, 999)  # its parent exited: re-parented
    assert [p.pid for p in cache.chain(30)] == [30, 10]
    assert cache.chain(99) == ancestry(99, proc) == []


def test_ancestry_cache_sees_a_parent_pid_reused_by_another_agent(fake_proc):
    fake_proc.process(10, tag="B")  # another agent's root
    fake_proc.process(20, ppid=10)  # its worker, whose chain the cache keeps
    fake_proc.process(30, ppid=20)
    fake_proc.process(11, tag="A")
    proc = str(fake_proc.root)
    cache = AncestryCache(proc, max_age=3600)
    assert [p.agent_tag for p in cache.chain(30)] == [None, None, "B"]
    fake_proc.gone(30)
    fake_proc.process(20, ppid=11, start=999)  # the worker exited, and its pid went to a process of agent A
    fake_proc.process(31, ppid=20)
    assert cache.chain(31) == ancestry(31, proc) == [
        ProcInfo(31, 20, 310, None), ProcInfo(20, 11, 999, None), ProcInfo(11, 1, 110, "A")]
    fake_proc.process(32, ppid=20)  # the new process's chain is taken from the cache again
    fake_proc.gone(11)
    assert [p.pid for p in cache.chain(32)] == [32, 20, 11]


def test_ancestry_cache_keeps_no_tail_of_a_chain_cut_at_the_depth_read(fake_proc):
    # A chain cut at the limit: its tails end below a process never read. Taken for whole chains, they would
    # hide the root above the cut from a process started beside them (here: under level 60).
    depth = ANCESTRY_DEPTH + 8
    fake_proc.process(100, tag="A")  # a registered root, say
    for level in range(1, depth):
        fake_proc.process(100 + level, ppid=100 + level - 1)
    proc = str(fake_proc.root)
    cache = AncestryCache(proc, max_age=3600)
    deepest = cache.chain(100 + depth - 1)
    assert len(deepest) == ANCESTRY_DEPTH and cut_short(deepest)
    fake_proc.process(999, ppid=160)
    beside = cache.chain(999)
    assert beside == ancestry(999, proc) and beside[-1].pid == 100 and not cut_short(beside)


def test_ancestry_cache_rereads_ancestors_after_max_age(fake_proc):
    fake_proc.process(10, tag="A")
    fake_proc.process(20, ppid=10)
    fake_proc.process(30, ppid=20)
    proc = str(fake_proc.root)
    stale, fresh = AncestryCache(proc, max_age=3600), AncestryCache(proc, max_age=0)
    assert stale.chain(30) == fresh.chain(30)
    fake_proc.stat(20, 1, 200)  # an ancestor further up was re-parented
    (fake_proc.root / "30" / "environ").write_bytes(b"ROLLOUTTAP_AGENT_ID=C\0")  # and the owner exec'd
    assert [(p.pid, p.agent_tag) for p in stale.chain(30)] == [(30, None), (20, None), (10, "A")]
    assert [(p.pid, p.agent_tag) for p in fresh.chain(30)] == [(30, "C"), (20, None)]
    assert fresh.chain(30) == ancestry(30, proc)


def test_ancestry_cache_a_new_child_reads_only_itself(fake_proc):
    fake_proc.process(10, tag="A")
    fake_proc.process(20, ppid=10)
    fake_proc.process(30, ppid=20)
    proc = str(fake_proc.root)
    cache = AncestryCache(proc, max_age=3600)
    assert [p.pid for p in cache.chain(30)] == [30, 20, 10]
    fake_proc.gone(10)  # were the ancestors read again, the chain would end at 20
    fake_proc.process(31, ppid=20, tag="B")  # a new process under the same parent
    assert cache.chain(31) == [ProcInfo(31, 20, 310, "B"), ProcInfo(20, 10, 200, None),
                               ProcInfo(10, 1, 100, "A")]
    fake_proc.process(32, ppid=31)  # and one under that: its parent's entry came from the one before
    assert [p.pid for p in cache.chain(32)] == [32, 31, 20, 10]


def test_ancestry_cache_reused_parts_keep_their_age(fake_proc):
    fake_proc.process(10, tag="A")
    fake_proc.process(20, ppid=10)
    fake_proc.process(30, ppid=20)
    cache = AncestryCache(str(fake_proc.root), max_age=0.2)
    cache.chain(30)
    (fake_proc.root / "10" / "environ").write_bytes(b"ROLLOUTTAP_AGENT_ID=Z\0")  # an exec, later
    child, deadline = 40, time.monotonic() + 10
    while True:  # new children keep reusing their parent's entry ...
        fake_proc.process(child, ppid=20)
        top = cache.chain(child)[-1]
        if top.agent_tag == "Z" or time.monotonic() > deadline:
            break
        child += 1
        time.sleep(0.02)
    assert top.agent_tag == "Z"  # ... yet it expires max_age after it was read, not after its last use


def test_netlink_answers_match_their_requests_on_a_reused_socket():
    with socket.create_server(("127.0.0.1", 0)) as server:
        clients = [socket.create_connection(server.getsockname()) for _ in range(8)]
        try:
            for client in clients * 2:
                src, dst = client.getsockname()[:2], client.getpeername()[:2]
                assert inode_netlink(src, dst) == os.fstat(client.fileno()).st_ino
        finally:
            for client in clients:
                client.close()


def test_netlink_answer_without_waiting_and_past_a_late_reply():
    with socket.create_server(("127.0.0.1", 0)) as server, socket.create_connection(server.getsockname()) as client:
        src, dst = client.getsockname()[:2], client.getpeername()[:2]
        inode = os.fstat(client.fileno()).st_ino
        for _ in range(3):  # the kernel answers within send(): the lookup for the event loop never waits
            assert owner_netlink(src, dst, wait=False).inode == inode
        # A request that gave up before its answer came: the next lookup reads past that answer to its own.
        sockdiag._local.netlink.sock.send(build_request(src, dst, seq=7))
        assert owner_netlink(src, dst, wait=False).inode == inode
        assert owner_netlink(src, dst).inode == inode
        with pytest.raises(BlockingIOError):
            sockdiag._local.netlink.sock.recv(8192)  # nothing left behind


def test_a_wait_for_a_netlink_answer_works_on_any_descriptor():
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    high = 2000
    if hard != resource.RLIM_INFINITY and hard <= high:
        pytest.skip(f"descriptors are limited to {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, high + 1), hard))
    a, b = socket.socketpair()
    try:
        os.dup2(a.fileno(), high)  # past select()'s 1,024, where a proxy's descriptors run
        high_sock = socket.socket(fileno=high)
        try:
            assert not sockdiag._readable(high_sock, 0.05)
            b.send(b"x")
            assert sockdiag._readable(high_sock, 1.0)
        finally:
            high_sock.close()
    finally:
        a.close()
        b.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_netlink_answer_to_another_request_is_refused():
    answer = struct.pack("=IHHII", 16, 2, 0, 41, 0)
    with pytest.raises(LookupError):
        parse_response(answer, seq=42)
    assert parse_response(answer, seq=41) is None and parse_response(answer) is None


def test_socket_owner_found_among_descendants_of_a_root_process():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    code = (f"import socket,sys; s=socket.create_connection(('127.0.0.1', {server.getsockname()[1]})); "
            "print(s.getsockname()[1], flush=True); sys.stdin.readline()")
    root = subprocess.Popen(["sh", "-c", f'"{sys.executable}" -c "{code}"; true'],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        port = int(root.stdout.readline())
        accepted, _ = server.accept()
        inode = inode_netlink(("127.0.0.1", port), server.getsockname())
        finder = SocketOwnerFinder(young=0)  # no probing of new pids: the roots must lead to it
        owner = finder.find(inode, roots=[root.pid])
        assert owner is not None and owner != root.pid
        assert ancestry(owner)[1].pid == root.pid
        # The root itself (none of its connections found yet), then its newest descendant, before any other process.
        assert finder.scanned_last == 2
        accepted.close()
    finally:
        root.stdin.close()
        root.wait(5)
        server.close()


def test_finder_checks_a_socket_seen_before_where_it_is_now(fake_proc):
    for pid in range(2, 8):
        fake_proc.process(pid, sockets=[1000 + pid])
    fake_proc.last_pid(7)
    finder = SocketOwnerFinder(str(fake_proc.root))
    assert finder.find(1007) == 7  # reads 7 only: 1006 and below are not seen yet
    assert finder.find(1002) == 2  # reads the rest: 1006 ... 1003 seen on the way
    fake_proc.process(5, sockets=[2005])  # 1005 went away from process 5 ...
    fake_proc.process(6, sockets=[1006, 1005])  # ... and process 6 holds it now
    assert finder.find(1005) == 6
    assert finder.find(1004) == 4


def _record(agent_id: str, token_hash: str | None) -> AgentRecord:
    return AgentRecord(agent_id, None, None, None, token_hash, "running", 0.0, None, None)


@pytest.mark.parametrize("claimed, agent, expected", [
    ("free-name", None, "free-name"),
    ("hand-run", _record("hand-run", None), "hand-run"),  # registered without a token: nothing to prove
    ("agent-b", _record("agent-b", hash_token("t")), None),  # owned: it attributes by token or process
    ("\udcff\udcfe", None, None),  # undecodable header bytes
    ("two\nlines", None, None),
])
def test_header_claims_never_name_an_agent_that_proves_itself(claimed, agent, expected):
    agent_id, detail = decide_header_claim(claimed, agent)
    assert agent_id == expected
    assert detail == "X-Agent-ID header" if expected is not None else "X-Agent-ID header " in detail


@pytest.mark.parametrize("creds, roots, tags, refused", [
    ("agent-a", (), (), False),  # under no registered root: unknown, remote, escaped, or hand-run
    ("agent-a", ("agent-a",), (), False),
    ("agent-a", ("agent-a", "outer"), (), False),  # a nested agent, under its own root and its parent's
    ("agent-a", ("agent-b",), (), True),  # agent-b's process sends agent-a's token
    ("agent-a", ("agent-b", "agent-c"), (), True),
    ("agent-a", (), ("agent-b",), True),  # escaped from agent-b's tree, still carrying its tag
    ("agent-a", (), ("agent-a",), False),  # agent-a's own escaped daemon
    ("agent-a", ("agent-a",), ("agent-b",), False),  # under its own root, whatever tag it was given
])
def test_credentials_must_come_from_under_their_agents_root(creds, roots, tags, refused):
    problem = credentials_conflict(creds, roots, tags)
    assert (problem is not None) == refused
    if refused:
        assert "agent-a" in problem and (roots or tags)[0] in problem  # the nearest: the process's own agent
