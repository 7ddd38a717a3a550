"""Attribution: the pure decisions (tables) and the Linux lookups on real sockets and processes."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys

import pytest

from rollouttap.addon.attribution import (
    check_token, decide_from_ancestry, is_local_peer, parse_basic_credentials, split_agent_path,
)
from rollouttap.addon.procfs import ProcInfo, SocketOwnerFinder, ancestry, parse_agent_tag, parse_stat
from rollouttap.addon.routes import RouteError, find_route, parse_route, parse_routes
from rollouttap.addon.sockdiag import build_request, inode_netlink, inode_procfs, normalize_ip
from rollouttap.store import AgentRecord, hash_token


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


def _agent(agent_id: str, token: str | None) -> AgentRecord:
    return AgentRecord(agent_id, None, None, None, hash_token(token) if token else None, "running",
                       0.0, None, None, {})


@pytest.mark.parametrize("agent, token, problem", [
    (_agent("a", "t"), "t", None),
    (_agent("a", "t"), "x", "wrong token"),
    (_agent("a", None), "t", "wrong token"),
    (None, "t", "unknown agent"),
])
def test_check_token(agent, token, problem):
    assert check_token(agent, token) == problem


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


def test_socket_owner_found_in_another_process():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    child = subprocess.Popen([sys.executable, "-c", (
        "import socket,sys\n"
        f"s=socket.create_connection(('127.0.0.1', {server.getsockname()[1]}))\n"
        "print(s.getsockname()[1], flush=True); sys.stdin.readline()\n")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        port = int(child.stdout.readline())
        accepted, _ = server.accept()
        inode = inode_netlink(("127.0.0.1", port), server.getsockname())
        finder = SocketOwnerFinder()
        assert finder.find(inode) == child.pid
        assert finder.find(inode) == child.pid and finder.scanned_last == 1  # remembered owner first
        chain = ancestry(child.pid)
        assert [p.pid for p in chain[:2]] == [child.pid, os.getpid()]
        accepted.close()
    finally:
        child.stdin.close()
        child.wait(5)
        server.close()


def test_socket_of_exited_process_is_not_found():
    assert inode_netlink(("127.0.0.1", 1), ("127.0.0.1", 2)) is None


@pytest.mark.parametrize("spec, host, port, target", [
    ("api.openai.com=http://127.0.0.1:8000", "api.openai.com", 443, ("http", "127.0.0.1", 8000, "/v1/x")),
    ("api.openai.com:443=https://m.local/pre/", "api.openai.com", 443, ("https", "m.local", 443, "/pre/v1/x")),
])
def test_routes(spec, host, port, target):
    route = parse_route(spec)
    assert find_route((route,), host, port).target("/v1/x") == target
    assert find_route((route,), "other.host", port) is None


@pytest.mark.parametrize("spec", ["nohost", "=http://x", "h=ftp://x", "h:abc=http://x", "h="])
def test_bad_routes_are_refused(spec):
    with pytest.raises(RouteError):
        parse_routes([spec])


def test_route_with_port_only_matches_that_port():
    route = parse_route("h:8443=http://127.0.0.1:1")
    assert find_route((route,), "h", 443) is None and find_route((route,), "H", 8443) is route
