"""AgentManager: real agent processes behind the real proxy, against the scripted vLLM-shaped upstream.

Most agents are `sh -c PROMPT` commands, so one manager runs many kinds of agent; the programs they start
live in manager_support.py. Pure pieces (templates, statuses, environments, /proc parsing) are tables.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from conftest import ctrl_c_as_from_a_terminal, start_proxy, wait_for
from manager_support import HERE as SUPPORT
from rollouttap.errors import AgentSpecError, ConfigError, ProxyError
from rollouttap.manager import AgentManager, CommandAgent, EntryPointAgent, ProxyConfig
from rollouttap.manager.proxy import ProxyProcess, free_port
from rollouttap.manager.agents import LaunchContext, render_argv, template_fields
from rollouttap.addon import sockdiag
from rollouttap.manager import launch
from rollouttap.manager.bypass import model_targets, parse_hex_address, parse_tcp_table, read_tcp_sockets
from rollouttap.manager.launch import (
    ProcRow, agent_environment, descendants, model_env, parse_stat, split_model_url,
)
from rollouttap.manager.proxy_link import ProxyLink
from rollouttap.manager.conversation import Conversation
from rollouttap.manager.results import collect_flows, decide_status, json_safe, with_model_failure
from rollouttap.manager.runner_entry import outcome
from rollouttap.store import Store, StoreWriter
from rollouttap.store.redact import fingerprint
from rollouttap.testing.fake_tokenizer import FakeTokenizer

PY = shlex.quote(sys.executable)


def agent(action: str) -> str:
    """A shell prompt that execs one manager_support action."""
    return f"exec {PY} {shlex.quote(SUPPORT)} {shlex.quote(action)}"


CURL = ("curl -sS --fail -H 'Content-Type: application/json' -d "
        "\"{\\\"model\\\": \\\"p\\\", \\\"messages\\\": [{\\\"role\\\": \\\"user\\\", "
        "\\\"content\\\": \\\"say $ROLLOUTTAP_AGENT_ID\\\"}]}\" \"$OPENAI_BASE_URL/chat/completions\"")

SHELL_AGENT = CommandAgent(["sh", "-c", "{prompt}", "sh", "{prompt_file}", "{workdir}", "{agent_id}"], stdin=True)


# -- pure pieces --------------------------------------------------------------------------------------------
def test_relative_paths_that_exist_only_where_the_spec_was_made_become_absolute(tmp_path):
    origin, workdir = tmp_path / "project", tmp_path / "agent-work"
    (origin / "examples").mkdir(parents=True)
    (origin / "examples" / "agent.py").write_text("")
    (origin / "agent.py").write_text("")
    (origin / "bin").mkdir()
    (origin / "bin" / "python").symlink_to(sys.executable)  # a venv's python: kept a symlink path
    (workdir / "tests").mkdir(parents=True)  # the workdir template's copy of the project
    (origin / "tests").mkdir()
    spec = CommandAgent("bin/python examples/agent.py ./agent.py agent.py missing/x.py tests/ {workdir}/out {prompt}",
                        origin=origin)
    ctx = LaunchContext("a1", "hi", workdir, workdir / "p.txt", workdir / "p.json", workdir / "r.json")
    assert spec.argv(ctx) == [str(origin / "bin" / "python"), str(origin / "examples" / "agent.py"),
                              str(origin / "agent.py"), "agent.py", "missing/x.py", "tests/", f"{workdir}/out", "hi"]


@pytest.mark.parametrize("template, fields", [
    ("{prompt}", {"prompt"}), ("--in={prompt_file} --cwd {workdir}", {"prompt_file", "workdir"}),
    ("id-{agent_id}", {"agent_id"}), ("plain {{braces}}", set()),
])
def test_template_fields(template, fields):
    assert template_fields(template) == fields


def test_a_template_that_never_passes_the_prompt_is_warned_about(caplog):
    with caplog.at_level("WARNING", logger="rollouttap.manager.agents"):
        CommandAgent("python agent.py --fast")
        CommandAgent("python agent.py {prompt_file}")
        CommandAgent("python agent.py", stdin=True)
    assert [r.getMessage().split(" never")[0] for r in caplog.records] == [
        "the agent command python agent.py --fast"]


@pytest.mark.parametrize("template", ["{model}", "{}", "{0}", "{prompt.upper}", "{prompt[0]}", "{prompt"])
def test_bad_templates_are_refused_at_construction(template):
    with pytest.raises(AgentSpecError):
        CommandAgent(["agent", template])


def test_prompt_fills_one_argument_and_message_lists_become_json(tmp_path):
    spec = CommandAgent("agent --task {prompt} --file={prompt_file}")
    messages = [{"role": "user", "content": "a {b} c"}]
    ctx = LaunchContext("ag-1", messages, tmp_path, tmp_path / "p.txt", tmp_path / "p.json", tmp_path / "r")
    argv = spec.argv(ctx)
    assert argv == ["agent", "--task", json.dumps(messages), f"--file={tmp_path / 'p.txt'}"]
    assert render_argv(("x{prompt}y",), {"prompt": "two words"}) == ["xtwo wordsy"]
    assert spec.stdin_bytes(ctx) is None
    assert CommandAgent(["a"], stdin=True).stdin_bytes(ctx) == json.dumps(messages).encode()


@pytest.mark.parametrize("target, message", [
    ("no_such_module_xyz:f", "cannot import"), ("manager_support:missing", "no attribute"),
    ("manager_support:HERE", "not callable"), ("manager_support", "module:function"),
    (lambda p: p, "cannot be imported by name"),
    (functools.partial(print, "x"), "has no name a fresh process could import it by"),
])
def test_entry_points_are_checked_at_construction(target, message):
    with pytest.raises(AgentSpecError, match=message):
        EntryPointAgent(target)


def test_entry_point_from_function_object():
    import manager_support
    spec = EntryPointAgent(manager_support.entry_chat)
    assert spec.target == "manager_support:entry_chat"
    assert spec.extra_env()["ROLLOUTTAP_ENTRY_PATH"] == str(Path(SUPPORT).parent)


@pytest.mark.parametrize("how, code, entry, is_entry, expected", [
    ("exited", 0, None, False, "ok"),
    ("exited", 3, None, False, "failed"),
    ("exited", -9, None, False, "failed"),
    ("timeout", -9, None, False, "timeout"),
    ("cancelled", -9, None, False, "error"),
    ("exited", 0, {"ok": True, "value": 1}, True, "ok"),
    ("exited", 1, {"ok": False, "error": "ValueError: x"}, True, "failed"),
    ("exited", 0, None, True, "failed"),  # the runner wrote nothing
])
def test_decide_status(how, code, entry, is_entry, expected):
    status, error = decide_status(how, code, entry, is_entry_point=is_entry, timeout=5)
    assert status == expected
    assert (error is None) == (expected == "ok")


def test_environment_layers_proxy_last():
    base = {"PATH": "/bin", "NO_PROXY": "localhost,127.0.0.1", "ROLLOUTTAP_AGENT_ID": "outer",
            "OPENAI_API_KEY": "sk-user"}
    proxy = {"HTTP_PROXY": "http://a:t@127.0.0.1:1", "NO_PROXY": "", "no_proxy": "", "ROLLOUTTAP_AGENT_ID": "a"}
    model = model_env("http://127.0.0.1:8000/v1", base)
    env = agent_environment(base, proxy=proxy, model=model, user={"OPENAI_BASE_URL": "http://other/v1",
                                                                  "HTTP_PROXY": "x"}, spec={"K": "v"})
    assert env["NO_PROXY"] == "" and env["HTTP_PROXY"] == proxy["HTTP_PROXY"]
    assert env["ROLLOUTTAP_AGENT_ID"] == "a" and env["PATH"] == "/bin" and env["K"] == "v"
    assert env["OPENAI_BASE_URL"] == "http://other/v1"  # the user's choice beats the default
    assert env["OPENAI_API_BASE"] == "http://127.0.0.1:8000/v1" and env["OPENAI_API_KEY"] == "sk-user"


@pytest.mark.parametrize("url, reverse, expected", [
    ("http://127.0.0.1:8000/v1", None, "http://127.0.0.1:8000/v1"),
    ("http://127.0.0.1:8000/v1/", "http://127.0.0.1:9", "http://127.0.0.1:9/agents/ag-1/tok/v1"),
    ("http://localhost:8000", "http://127.0.0.1:9", "http://127.0.0.1:9/agents/ag-1/tok"),
])
def test_model_env_base_url(url, reverse, expected):
    env = model_env(url, {}, reverse_url=reverse, agent_id="ag-1", token="tok")
    assert env["OPENAI_BASE_URL"] == env["OPENAI_API_BASE"] == expected
    assert env["OPENAI_API_KEY"]


def test_a_placeholder_key_without_a_model_url_only_where_an_endpoint_is_routed_to_the_model():
    # openai SDK agents with a hard-wired api.openai.com routed to the model refuse to start without a key; an
    # agent with no model URL and no route may pick its provider by which keys are set.
    assert model_env(None, {}, routed=True) == {"OPENAI_API_KEY": "sk-rollouttap-local"}
    assert model_env(None, {"OPENAI_API_KEY": "sk-user"}, routed=True) == {}
    assert model_env(None, {}) == {}


def test_agents_of_a_manager_routing_a_hard_wired_endpoint_get_a_placeholder_key(tmp_path, confdir, upstream,
                                                                                 monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    config = ProxyConfig(store=tmp_path / "r.db", confdir=confdir, routes=(f"api.openai.com={upstream.url}",))
    with AgentManager(SHELL_AGENT, store=tmp_path / "r.db", proxy=config, confdir=confdir) as m:
        [result] = m.deploy(['echo "key=${OPENAI_API_KEY:-none}"'])
    assert result.status == "ok" and result.stdout_tail == "key=sk-rollouttap-local\n", result.stderr_tail


@pytest.mark.parametrize("url, expected", [
    ("http://127.0.0.1:8000/v1", ("http://127.0.0.1:8000", "127.0.0.1:8000", "/v1")),
    ("https://models.local/v1/", ("https://models.local:443", "models.local:443", "/v1")),
    ("http://[::1]:81", ("http://[::1]:81", "[::1]:81", "")),
])
def test_split_model_url(url, expected):
    assert split_model_url(url) == expected


@pytest.mark.parametrize("url", ["127.0.0.1:8000", "ftp://x/v1", "http:///v1"])
def test_split_model_url_refuses(url):
    with pytest.raises(ConfigError):
        split_model_url(url)


TCP = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 111 1
   1: 0100007F:C350 0100007F:1F90 01 00000000:00000000 00:00000000 00000000  1000        0 222 1
   2: 0100007F:C351 0100007F:1F90 06 00000000:00000000 00:00000000 00000000  1000        0 0 1
"""
TCP6 = """  sl  local_address                         remote_address                        st tx_queue ...
   0: 0000000000000000FFFF00000100007F:C352 0000000000000000FFFF00000100007F:1F90 02 0 0 0 1000 0 333 1
   1: 00000000000000000000000001000000:C353 00000000000000000000000001000000:1F90 01 0 0 0 1000 0 444 1
"""


def test_parse_tcp_tables():
    v4 = parse_tcp_table(TCP)
    assert [(s.local, s.remote, s.state, s.inode) for s in v4] == [
        (("127.0.0.1", 50000), ("127.0.0.1", 8080), "ESTABLISHED", 222)]  # listen and TIME_WAIT skipped
    v6 = parse_tcp_table(TCP6)
    assert [(s.remote, s.state) for s in v6] == [(("127.0.0.1", 8080), "SYN_SENT"), (("::1", 8080), "ESTABLISHED")]
    assert parse_hex_address("0100007F:0050") == ("127.0.0.1", 80)
    assert ("127.0.0.1", 8080) in model_targets("http://127.0.0.1:8080/v1")


def test_text_tables_are_read_when_sock_diag_is_not_the_source(tmp_path):
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "tcp").write_text(TCP)
    (tmp_path / "net" / "tcp6").write_text(TCP6)
    assert read_tcp_sockets(str(tmp_path)) == parse_tcp_table(TCP) + parse_tcp_table(TCP6)


def _diag(family: int, state: int, local: tuple[str, int], remote: tuple[str, int], inode: int,
          kind: int = sockdiag.SOCK_DIAG_BY_FAMILY, extra: bytes = b"") -> bytes:
    """One netlink message as the kernel sends it (attributes after the fixed part, padded to 4 bytes)."""
    addr = [socket.inet_pton(family, ip).ljust(16, b"\0") for ip in (local[0], remote[0])]
    body = (struct.pack("=BBBB", family, state, 0, 0) + struct.pack("!HH", local[1], remote[1]) + addr[0]
            + addr[1] + bytes(16) + struct.pack("=IIII", 0, 0, 1000, inode) + extra)
    message = struct.pack("=IHHII", 16 + len(body), kind, 2, 1, 0) + body
    return message + bytes(-len(message) % 4)


DONE = struct.pack("=IHHIIi", 20, sockdiag.NLMSG_DONE, 2, 1, 0, 0)
V4 = _diag(socket.AF_INET, 1, ("127.0.0.1", 50000), ("127.0.0.1", 8080), 222, extra=b"\x05\x00\x08\x00\x01")
V6 = _diag(socket.AF_INET6, 2, ("::ffff:127.0.0.1", 50001), ("::1", 8080), 333)
NOOP = struct.pack("=IHHII", 16, 1, 0, 1, 0)


@pytest.mark.parametrize("data, sockets, done", [
    (V4 + V6 + DONE, [(("127.0.0.1", 50000), ("127.0.0.1", 8080), 1, 222),
                      (("::ffff:127.0.0.1", 50001), ("::1", 8080), 2, 333)], True),
    (V4, [(("127.0.0.1", 50000), ("127.0.0.1", 8080), 1, 222)], False),  # the dump goes on in the next datagram
    (NOOP + DONE, [], True),
    (DONE + V4, [], True),
])
def test_sock_diag_replies(data, sockets, done):
    assert sockdiag.parse_dump(data) == (sockets, done)


def test_sock_diag_errors_and_requests():
    with pytest.raises(OSError, match="errno 13"):
        sockdiag.parse_dump(struct.pack("=IHHIIi", 36, sockdiag.NLMSG_ERROR, 0, 1, 0, -13) + bytes(16))
    request = sockdiag.dump_request(socket.AF_INET6, [1, 8], sequence=7)
    length, kind, flags, sequence, _ = struct.unpack_from("=IHHII", request)
    assert (length, kind, sequence) == (len(request), sockdiag.SOCK_DIAG_BY_FAMILY, 7) == (72, 20, 7)
    assert flags == sockdiag.NLM_F_REQUEST | sockdiag.NLM_F_DUMP
    assert struct.unpack_from("=BBBBI", request, 16) == (socket.AF_INET6, socket.IPPROTO_TCP, 0, 0, 0b100000010)


def test_sock_diag_sees_a_live_connection_as_proc_net_tcp_does():
    with socket.create_server(("127.0.0.1", 0)) as server, \
            socket.create_connection(server.getsockname()) as client:
        accepted, _ = server.accept()
        with accepted:
            try:
                found = sockdiag.tcp_sockets([1])
            except OSError as exc:
                pytest.skip(f"no sock_diag here: {exc}")
            inode = os.fstat(client.fileno()).st_ino
            [mine] = [s for s in found if s.inode == inode]
            assert (mine.local, mine.remote, mine.state) == (client.getsockname(), server.getsockname(), 1)
            from_text = {s.inode: s for s in read_tcp_sockets(sock_diag=False)}
            assert {s.inode: s for s in read_tcp_sockets()}[inode] == from_text[inode]


@pytest.mark.parametrize("indexed", [False, True])
def test_descendants_group_members_and_stat_parsing(indexed):
    rows = {p: ProcRow(p, pp, g, sid, 1, "S") for p, pp, g, sid in
            [(10, 1, 10, 10), (11, 10, 10, 10), (12, 11, 12, 10), (13, 1, 13, 13), (14, 13, 10, 13),
             (15, 1, 15, 10)]}  # 15: re-parented to init, still in session 10
    table = launch.ProcTable(rows) if indexed else rows
    assert descendants([10], table) == {10, 11, 12}
    assert descendants([99], table) == set()
    assert launch.group_members(10, table) == {10, 11, 12, 14, 15}
    assert launch.group_members(99, table) == set()
    row = parse_stat(7, b"7 (a (b) c) S 3 7 7 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 12345 0 0")
    assert (row.ppid, row.pgrp, row.session, row.start, row.alive) == (3, 7, 7, 12345, True)


def test_a_reused_root_pid_does_not_name_the_agents_session(tmp_path):
    # Session 10 (root 10 started at tick 5) has members 11 and 12; leftover_tree looks for what is left.
    members = [ProcRow(11, 1, 10, 10, 6, "S"), ProcRow(12, 11, 10, 10, 7, "S")]
    table = launch.ProcTable({r.pid: r for r in members})
    table.proc = str(tmp_path)  # no tags here
    assert launch.leftover_tree("a", 10, 5, table) == {11, 12}  # root gone, pid 10 still reserved
    table[10] = ProcRow(10, 1, 10, 10, 5, "S")
    assert launch.leftover_tree("a", 10, 5, table) == {10, 11, 12}
    reused = launch.ProcTable({10: ProcRow(10, 1, 10, 10, 90, "S"), 11: ProcRow(11, 10, 10, 10, 91, "S")})
    reused.proc = str(tmp_path)  # pid 10 is another session leader now, and 11 its child
    assert launch.leftover_tree("a", 10, 5, reused) == set()


def _fake_process(proc, pid: int, tag: str | None = None) -> None:
    (proc / str(pid)).mkdir(parents=True, exist_ok=True)
    (proc / str(pid) / "stat").write_bytes(f"{pid} (x) S 1 {pid} {pid} 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 {pid}00 0 0".encode())
    (proc / str(pid) / "environ").write_bytes(b"A=1\0" + (f"ROLLOUTTAP_AGENT_ID={tag}\0".encode() if tag else b""))


def test_shared_process_table_rescans_only_for_a_later_moment(tmp_path):
    proc = tmp_path / "proc"
    _fake_process(proc, 10)
    tables = launch.SharedProcessTable(str(proc))
    before = time.monotonic()
    first = tables.after(before)
    assert set(first) == {10}
    _fake_process(proc, 11)
    assert tables.after(before) is first  # that scan began after ``before``: shared
    later = tables.after(time.monotonic())
    assert later is not first and set(later) == {10, 11}


def test_process_table_reads_each_tag_once(tmp_path):
    proc = tmp_path / "proc"
    _fake_process(proc, 10, tag="ag-1")
    table = launch.process_table(str(proc))
    assert table.tag(10) == "ag-1" and table.tag(99) is None
    _fake_process(proc, 10, tag="ag-2")
    assert table.tag(10) == "ag-1"  # this table's answer stands
    assert launch.process_table(str(proc)).tag(10) == "ag-2"


def test_wait_ends_at_exit_deadline_or_stop(tmp_path):
    def start(code: str) -> launch.AgentProcess:
        return launch.spawn("ag-wait", [sys.executable, "-c", code], env=os.environ, cwd=tmp_path, stdin=None,
                            stdout=tmp_path / "out", stderr=tmp_path / "err")
    quick, hang = start("raise SystemExit(3)"), start("import time; time.sleep(60)")
    started = time.monotonic()
    # A long poll does not delay noticing the exit, nor reaching the deadline.
    assert launch.wait(quick, started + 60, threading.Event(), poll=30) == "exited"
    assert quick.popen.returncode == 3
    assert launch.wait(hang, time.monotonic() + 0.2, threading.Event(), poll=30) == "timeout"
    assert time.monotonic() - started < 15
    stop = threading.Event()
    stop.set()
    assert launch.wait(hang, time.monotonic() + 60, stop, poll=0.01) == "cancelled"
    launch.kill_tree(hang)
    assert hang.popen.returncode == -signal.SIGKILL
    assert launch.wait(hang, time.monotonic() + 60, threading.Event()) == "exited"  # already reaped
    assert launch.finish_output(quick) == {} and launch.finish_output(hang) == {}
    assert launch.process_table()[os.getpid()].ppid == os.getppid()


LIVE, REUSED = "live", "reused"  # this process's pid; the same pid with another start time (not that proxy)


@pytest.mark.parametrize("proxies, committed", [
    ([], True),
    ([(LIVE, 150.0, None)], True),
    ([(LIVE, 100.0, None)], True),
    ([(LIVE, 99.0, None)], False),
    ([(LIVE, None, None)], False),  # running, no watermark yet
    ([(LIVE, 50.0, 60.0)], True),  # stopped: it commits nothing more
    ([(REUSED, 50.0, None)], True),  # its process is gone
    ([(LIVE, 150.0, None), (LIVE, 99.0, None)], False),
    ([(LIVE, 150.0, None), (REUSED, None, None)], True),
])
def test_wait_committed_waits_only_for_live_proxies(tmp_path, proxies, committed):
    path = tmp_path / "s.db"
    Store(path).close()  # creates the schema
    mine = psutil.Process().create_time()
    with sqlite3.connect(path) as conn:
        for n, (who, mark, stopped) in enumerate(proxies):
            conn.execute("INSERT INTO proxies (proxy_id, pid, create_time, started_at, stopped_at, "
                         "committed_through) VALUES (?, ?, ?, 1, ?, ?)",
                         (f"p{n}", os.getpid(), mine if who == LIVE else mine - 100, stopped, mark))
    with Store(path) as store:
        assert (store.wait_committed(100.0, timeout=0.05, poll=0.01) == []) is committed


def test_wait_committed_for_an_agent_waits_only_for_its_proxies(tmp_path):
    path = tmp_path / "s.db"
    Store(path).close()
    mine = psutil.Process().create_time()
    with sqlite3.connect(path) as conn:
        for proxy_id in ("given", "served", "other"):  # all three live and behind
            conn.execute("INSERT INTO proxies (proxy_id, pid, create_time, started_at, committed_through) "
                         "VALUES (?, ?, ?, 1, 50)", (proxy_id, os.getpid(), mine))
    with Store(path) as store:
        store.register_agent("a1")
    writer = StoreWriter(path)  # a flow of the agent that the "served" proxy recorded
    writer.insert_flow({"flow_id": "f1", "proxy_id": "served", "agent_id": "a1", "attribution": "header",
                        "t_request": 1.0})
    writer.close()
    with Store(path) as store:
        behind = store.wait_committed(100.0, timeout=0.05, poll=0.01, agent_id="a1", proxy_ids=["given"])
        assert sorted(p["proxy_id"] for p in behind) == ["given", "served"]  # not "other"
        assert len(store.wait_committed(100.0, timeout=0.05, poll=0.01)) == 3  # no agent named: every one
        # settle_flows told which proxies served the agent waits for those; told none, for every one
        from rollouttap.manager.results import settle_flows
        assert "(pid" in settle_flows(store, "a1", 0.05, ended_at=100.0, poll=0.01).uncommitted
        settled = settle_flows(store, "a2", 0.05, ended_at=100.0, poll=0.01, given=["nobody"])
        assert settled.uncommitted is None


def test_proxy_link_env_exempts_only_the_reverse_listener():
    link = ProxyLink("http://127.0.0.1:1", "/ca.pem", "http://127.0.0.1:2", None)
    env = link.env("ag-1", "tok")
    assert link.reverse_url == "http://localhost:2"
    assert env["NO_PROXY"] == env["no_proxy"] == "localhost:2"
    assert env["HTTP_PROXY"] == env["https_proxy"] == "http://ag-1:tok@127.0.0.1:1"
    assert env["SSL_CERT_FILE"] == "/ca.pem" and env["ROLLOUTTAP_AGENT_ID"] == "ag-1"
    assert env["NODE_USE_ENV_PROXY"] == "1"  # Node's fetch ignores HTTP_PROXY without it
    assert ProxyLink("http://127.0.0.1:1", None, None, None).env("a", "t")["NO_PROXY"] == ""


def test_late_reports_are_waited_for_except_by_the_report_itself():
    # cancel() waits for a broken-off deploy's late reports; a progress callback that calls cancel() must not
    # wait for itself (it would until the timeout, and close() would then abandon the agents).
    from rollouttap.manager.deploy_reports import Pending
    pending, seen = Pending(), {}
    pending.add()
    pending.add()

    def report():
        pending.enter()
        try:
            seen["inside"] = pending.wait_none(timeout=5)  # the other report is done by then
        finally:
            pending.done()

    assert pending.wait_none(timeout=0.05) is False
    thread = threading.Thread(target=report)
    thread.start()
    pending.done()  # the other report
    thread.join(30)
    assert seen == {"inside": True} and pending.wait_none(timeout=0) is True


def test_summary_counts_the_commonest_errors():
    from rollouttap.manager.results import AgentResult, summarise
    def result(i, status, error=None):
        return AgentResult(f"a{i}", i, "p", status, error=error)
    results = [result(0, "ok"), result(1, "failed", "exit 1\nTraceback ..."), result(2, "failed", "exit 1\nother"),
               result(3, "error", "cannot start agent: x"), result(4, "timeout", "timed out after 5s"),
               result(5, "failed", "exit 2"), result(6, "failed", "  ")]
    assert summarise(results).top_errors == (("exit 1", 2), ("cannot start agent: x", 1), ("timed out after 5s", 1))
    assert summarise([result(0, "ok", "ignored")]).to_dict()["top_errors"] == []


def _conversation(chat=(), completion=(), responses=()):
    """A Conversation of stand-in calls, each (failed, position among the agent's flows)."""
    def calls(specs):
        return [SimpleNamespace(failed=f, error="boom" if f else None, position=p) for f, p in specs]
    return Conversation(calls(chat), calls(completion), [], 0, calls(responses))


def test_summary_counts_failed_chat_completion_and_responses_calls():
    from rollouttap.manager.results import AgentResult, summarise
    conversation = _conversation(chat=[(True, 1), (False, 2)], completion=[(True, 3)],
                                 responses=[(True, 4), (False, 5)])
    results = [AgentResult("a0", 0, "p", "ok", calls=5, conversation=conversation),
               AgentResult("a1", 1, "p", "error", error="cannot start agent: x")]  # no conversation at all
    assert summarise(results).failed_calls == 3


def test_json_safe():
    assert json_safe({"a": (1, 2.5), 3: {float("nan")}}) == {"a": [1, 2.5], "3": "{nan}"}


def test_runner_outcomes():
    assert outcome("manager_support:entry_async", [{"role": "user"}]) == {"ok": True, "value": {"messages": 1}}
    failed = outcome("manager_support:entry_raise", "x")
    assert not failed["ok"] and failed["error"].startswith("ValueError") and "Traceback" in failed["traceback"]
    assert not outcome("os:getcwd", None)["ok"]  # a TypeError from the call itself is the agent's failure


@pytest.mark.parametrize("setting, message", [
    ({"parallel": 0}, "parallel must be >= 1, got 0"),
    ({"parallel": "4"}, "parallel must be an integer, not '4'"),
    ({"parallel": 2.5}, "parallel must be an integer"),
    ({"timeout": 0}, "timeout must be > 0, got 0"),
    ({"timeout": None}, "timeout must be a number, not None"),
    ({"timeout": float("nan")}, "timeout must be > 0, got nan"),
    ({"grace": -1}, "grace must be >= 0"),
    ({"poll_interval": 0}, "poll_interval must be > 0"),
    ({"proxies": 0}, "proxies must be >= 1"),
    ({"eos_token_id": -3}, "eos_token_id must be >= 0"),
    ({"eos_token_id": True}, "eos_token_id must be an integer"),
    # Python's own waits overflow past ~1e9 s: close() then failed and left the proxy running
    ({"grace": float("inf")}, "grace is too large: inf"),
    ({"poll_interval": 1e10}, "poll_interval is too large"),
    ({"keep_for": float("inf")}, "keep_for is too large"),
    # an int value failed every agent at its start, each with a traceback
    ({"env": {"CUDA_VISIBLE_DEVICES": 0}}, "env: CUDA_VISIBLE_DEVICES=0: values must be strings"),
    ({"env": {"A=B": "1"}}, "env: 'A=B' is not a variable name"),
])
def test_manager_names_the_bad_setting(tmp_path, setting, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        AgentManager(SHELL_AGENT, store=tmp_path / "r.db", **setting)


def test_specs_refuse_bad_environments_and_check_timeouts():
    with pytest.raises(AgentSpecError, match="env: Y=2: values must be strings"):
        CommandAgent(["true"], env={"Y": 2})  # type: ignore[dict-item]
    with pytest.raises(AgentSpecError, match="check_timeout must be a number of seconds above 0"):
        CommandAgent(["true"], check="true", check_timeout=-1)


def test_an_entry_point_whose_module_exits_at_import_is_refused_not_the_end_of_the_caller(tmp_path, monkeypatch):
    (tmp_path / "exits_at_import.py").write_text("import sys\nsys.exit('need CONFIG')\ndef run(p): return p\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(AgentSpecError, match="need CONFIG"):
        EntryPointAgent("exits_at_import:run")


def test_cancel_refuses_a_wait_that_would_overflow(tmp_path):
    with pytest.raises(ConfigError, match="cancel_timeout is too large"):
        AgentManager(SHELL_AGENT, store=tmp_path / "r.db").cancel(timeout=float("inf"))


def test_manager_refuses_bad_settings(tmp_path):
    with pytest.raises(ConfigError, match="model_url"):
        AgentManager(SHELL_AGENT, store=tmp_path / "r.db", base_url_mode=True)
    with pytest.raises(AgentSpecError):
        AgentManager("not a spec", store=tmp_path / "r.db")  # type: ignore[arg-type]
    other = ProxyConfig(store=tmp_path / "other.db")
    with pytest.raises(ConfigError, match="records into"):
        AgentManager(SHELL_AGENT, store=tmp_path / "r.db", proxy=other).start()
    for mine in (ProxyConfig(store=tmp_path / "r.db", confdir=tmp_path / "a"),
                 ProxyConfig(store=tmp_path / "r.db", extra={"confdir": str(tmp_path / "a")})):
        with pytest.raises(ConfigError, match="confdir .* differs"):
            AgentManager(SHELL_AGENT, store=tmp_path / "r.db", proxy=mine, confdir=tmp_path / "b").start()


def test_confdir_reaches_a_proxy_config_given_without_one(tmp_path, upstream):
    # A proxy config for its routes, the CA kept in a node-local folder: the agents trust that folder's CA.
    config = ProxyConfig(store=tmp_path / "r.db")
    with AgentManager(SHELL_AGENT, store=tmp_path / "r.db", proxy=config, confdir=tmp_path / "conf",
                      model_url=upstream.base_url) as m:
        assert m.link.ca_cert == str(tmp_path / "conf" / "mitmproxy-ca-cert.pem")
    assert (tmp_path / "conf" / "mitmproxy-ca.pem").exists()


def test_a_prompt_argument_is_measured_as_rendered():
    # The prompt fits alone, not with the working directory the same argument carries.
    spec = CommandAgent(["echo", "--in={workdir}/{prompt}"])
    spec.check_fits("x" * 130_000, 0)
    with pytest.raises(AgentSpecError, match="command-line argument"):
        spec.check_fits("x" * 130_900, 0)


@pytest.mark.parametrize("prompts, timeout, error, message", [
    ("What is 2 + 2?", None, AgentSpecError, "list of prompts"),  # a str is iterable: one agent per char
    ({"role": "user", "content": "hi"}, None, AgentSpecError, "list of prompts"),
    (["hi"], 0, ConfigError, "timeout"),
    (["hi"], -1, ConfigError, "timeout"),
    ([[]], None, AgentSpecError, "at least one message"),
    ([[{"role": "user"}]], None, AgentSpecError, "a string 'role' and a 'content'"),
    ([[{"role": 5, "content": "hi"}]], None, AgentSpecError, "a string 'role'"),
    ([[{"role": "user", "content": b"hi"}]], None, AgentSpecError, "JSON, UTF-8"),  # failed per agent, later
    (["\ud800"], None, AgentSpecError, "JSON, UTF-8"),  # a lone surrogate: no file or argument can hold it
    # SHELL_AGENT passes {prompt} as an argument: Linux's limit, or a NUL, failed every agent at its start
    (["x" * 200_000], None, AgentSpecError, "more than one command-line argument holds"),
    (["a\0b"], None, AgentSpecError, "NUL"),
    (["hi"], "5", ConfigError, "timeout must be a number"),
    (["hi"], float("nan"), ConfigError, "timeout must be > 0"),
    (["hi"], float("inf"), ConfigError, "timeout is too large"),
    (None, None, AgentSpecError, "list of prompts, not None"),
    (42, None, AgentSpecError, "list of prompts, not 42"),
])
def test_deploy_refuses_bad_arguments_before_starting_anything(tmp_path, prompts, timeout, error, message):
    manager = AgentManager(SHELL_AGENT, store=tmp_path / "r.db")
    with pytest.raises(error, match=message):
        manager.deploy(prompts, timeout=timeout)
    assert manager.links == []  # no proxy was started for it


# -- real agents through the real proxy ----------------------------------------------------------------------
def test_a_token_sent_after_its_agents_processes_ended_is_refused_while_the_result_is_built(
        tmp_path, confdir, upstream):
    import requests
    seen: dict[str, object] = {}

    def check(workdir: Path) -> bool:
        # Runs after the agent's tree is gone and before its end is recorded (a test suite can take minutes):
        # here, a process that outlived the agent sends with its credentials.
        proxy_url, agent_id = (workdir / "creds").read_text().split()
        with Store(tmp_path / "runs.db") as store:
            seen["row"] = store.agent(agent_id)
        seen["status"] = requests.post(upstream.url + "/echo", json={}, proxies={"http": proxy_url},
                                       timeout=10).status_code
        return True
    spec = CommandAgent(["sh", "-c", 'echo "$HTTP_PROXY $ROLLOUTTAP_AGENT_ID" > creds'], check=check)
    with AgentManager(spec, store=tmp_path / "runs.db", model_url=upstream.base_url, confdir=confdir,
                      eos_token_id=FakeTokenizer.eos_token_id) as m:
        [result] = m.deploy(["p"])
    assert result.status == "ok" and result.check_result is True, result
    assert seen["row"].status == "running" and seen["row"].ended_at is not None
    assert seen["status"] == 407  # 200 when the token counted until the result was recorded
    with Store(tmp_path / "runs.db") as store:
        [refused] = wait_for(lambda: store.flows(state="error"), what="the refused flow")
        assert refused.agent_id is None and "processes have ended" in refused.error
        assert store.flows(agent_id=result.agent_id) == [] and result.calls == 0


@pytest.fixture(scope="module")
def manager(tmp_path_factory, confdir, upstream):
    store = tmp_path_factory.mktemp("manager") / "runs.db"
    with AgentManager(SHELL_AGENT, store=store, parallel=16, timeout=60, model_url=upstream.base_url,
                      confdir=confdir, eos_token_id=FakeTokenizer.eos_token_id, poll_interval=0.1) as m:
        yield m


def _flows(manager, agent_id):
    with Store(manager.store_path) as store:
        return store.flows(agent_id=agent_id)


def _said(flow) -> str:
    return flow.request_json()["messages"][0]["content"]


def test_requests_curl_and_zero_call_agents(manager):
    results = manager.deploy([agent("requests @id"), CURL, agent("nothing")])
    assert [r.status for r in results] == ["ok", "ok", "ok"], [r.stderr_tail for r in results]
    assert [r.calls for r in results] == [1, 1, 0]
    for result in results[:2]:
        [flow] = _flows(manager, result.agent_id)
        assert flow.attribution == "credentials" and flow.state == "done"
        assert _said(flow) == f"say {result.agent_id}"
        assert result.agent_id in result.stdout_tail
        assert result.conversation.calls[0].response.content == f"echo: say {result.agent_id}"
        assert result.row is not None and result.fidelity.trainable_tokens > 0
    assert results[2].flows["total"] == 0 and results[2].row is None and results[2].stdout_tail == "no calls\n"


def test_empty_batch(manager):
    assert manager.deploy([]) == []


def test_placeholders_stdin_and_fresh_workdir(manager):
    script = 'cat "$1"; echo; cat; echo; echo "cwd=$(pwd) dir=$2 id=$3"; ls -A | wc -l'
    [result] = manager.deploy([script])
    lines = result.stdout_tail.splitlines()
    assert lines[0] == script and lines[1] == script  # {prompt_file}, then stdin
    cwd, workdir, agent_id = re.match(r"cwd=(\S+) dir=(\S+) id=(\S+)", lines[2]).groups()
    assert cwd == workdir and agent_id == result.agent_id and lines[3].strip() == "0"
    assert not os.path.exists(workdir)  # removed afterwards (keep_workdirs=False)


def test_children_of_a_forking_agent_are_attributed_to_it(manager):
    [result] = manager.deploy([agent("fork 3 @id")])
    assert result.status == "ok" and result.calls == 4
    said = sorted(_said(f) for f in _flows(manager, result.agent_id))
    assert said == sorted([f"say {result.agent_id}"] + [f"say {result.agent_id}-child{i}" for i in range(3)])


def test_an_agent_sending_another_agents_credentials_is_refused(manager, tmp_path):
    # Agents run as one user: the thief reads the victim's HTTP_PROXY (its token) from /proc/PID/environ.
    done = tmp_path / "stolen"
    victim, thief = manager.deploy([agent(f"await {done}"), agent(f"steal {done}")])
    assert thief.status == "ok" and "status 407" in thief.stdout_tail, thief.stderr_tail
    assert _flows(manager, victim.agent_id) == []
    with Store(manager.store_path) as store:
        [refused] = [f for f in store.flows() if f.request_body and b"say stolen" in f.request_body]
    assert refused.agent_id is None and refused.state == "error" and refused.status_code == 407
    assert f"sent by a process of agent {thief.agent_id!r}" in refused.error


def test_the_agent_command_is_recorded_without_its_credentials(tmp_path, confdir, upstream):
    command = CommandAgent(f"{PY} {shlex.quote(SUPPORT)} {{prompt}} --api-key SEKRET-123")
    with AgentManager(command, store=tmp_path / "runs.db", model_url=upstream.base_url, confdir=confdir) as m:
        [result] = m.deploy(["nothing"])
    with Store(tmp_path / "runs.db") as store:
        [row] = store.agents()
    assert result.status == "ok" and "SEKRET-123" not in row.meta["agent"]
    assert row.meta["agent"].endswith("--api-key <redacted sha256:" + fingerprint("SEKRET-123") + ">")


def test_crashing_agent_fails_with_its_traceback(manager):
    [result] = manager.deploy([agent("crash")])
    assert result.status == "failed" and result.exit_code == 1 and result.calls == 0
    assert "RuntimeError: agent exploded on purpose" in result.stderr_tail
    assert "Traceback" in result.stderr_tail and result.error == "exited with code 1"


def test_failed_agent_says_why_its_model_call_failed(manager):
    # A model server nobody listens on: the agent only sees a 502; the proxy knows the cause.
    call = ("curl -s -o /dev/null -H 'content-type: application/json' "
            "-d '{\"model\":\"m\",\"messages\":[]}' http://127.0.0.1:9/v1/chat/completions; exit 3")
    [result] = manager.deploy([call])
    assert result.status == "failed" and result.error.startswith("exited with code 3; its last model call failed: ")
    assert result.error.endswith(result.conversation.calls[-1].error)


@pytest.mark.parametrize("failed, expected", [
    ([], "exited with code 1"),
    ([False, False], "exited with code 1"),
    ([True, False], "exited with code 1"),  # a retry got past it: not the cause
    ([False, True], "exited with code 1; its last model call failed: boom"),
])
@pytest.mark.parametrize("kind", ["chat", "responses"])
def test_failed_agent_error_names_a_failed_last_call_only(failed, expected, kind):
    conversation = _conversation(**{kind: [(f, p) for p, f in enumerate(failed)]})
    assert with_model_failure("failed", "exited with code 1", conversation) == expected
    assert with_model_failure("ok", None, conversation) is None


@pytest.mark.parametrize("ended, expected", [
    (99.0, "timed out; its last model call failed: boom"),  # failed before the kill: maybe why it hung
    (100.5, "timed out; its last model call was still open when its processes were killed (boom)"),
    (None, "timed out; its last model call was still open when its processes were killed (boom)"),
])
def test_a_last_call_cut_off_by_the_kill_is_not_called_a_model_failure(ended, expected):
    call = SimpleNamespace(failed=True, error="boom", position=1, t_request=98.0,
                           latency=None if ended is None else ended - 98.0)
    conversation = Conversation([call], [], [], 0, [])
    assert with_model_failure("timeout", "timed out", conversation, killed_at=100.0) == expected


@pytest.mark.parametrize("argv, expected", [
    (["no-such-agent-command-x"], "cannot start agent: command 'no-such-agent-command-x' not found on PATH ("),
    (["./agent.sh"], "cannot start agent (it runs in a fresh working directory, not here): [Errno 2]"),
])
def test_why_an_agent_could_not_start_names_path_or_workdir(tmp_path, argv, expected):
    from rollouttap.manager.results import start_failure
    with pytest.raises(FileNotFoundError) as raised:
        subprocess.Popen(argv, cwd=tmp_path)
    assert start_failure(raised.value).startswith(expected)


def test_a_command_whose_interpreter_is_missing_is_not_called_missing(tmp_path, monkeypatch):
    from rollouttap.manager.results import start_failure
    script = tmp_path / "my-agent"
    script.write_text("#!/no/such/interpreter\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(FileNotFoundError) as raised:
        subprocess.Popen(["my-agent"])
    assert start_failure(raised.value) == ("cannot start agent: the interpreter on the first line (#!) of "
                                           "'my-agent' was not found")


def test_an_agent_command_missing_from_path_is_reported_in_its_result(tmp_path, confdir, upstream):
    with AgentManager(CommandAgent(["no-such-agent-command-x", "{prompt}"]), store=tmp_path / "s.db",
                      model_url=upstream.base_url, confdir=confdir) as m:
        [result] = m.deploy(["p"])
    assert result.status == "error" and "'no-such-agent-command-x' not found on PATH" in result.error


def test_the_last_model_call_is_the_last_sent_whatever_its_endpoint():
    conversation = _conversation(chat=[(False, 1)], responses=[(True, 2)])
    assert with_model_failure("failed", "exit 1", conversation) == "exit 1; its last model call failed: boom"
    conversation = _conversation(chat=[(False, 3)], responses=[(True, 2)])  # a later chat call answered
    assert with_model_failure("failed", "exit 1", conversation) == "exit 1"


def test_hanging_agent_times_out_and_its_whole_tree_dies(manager):
    started = time.monotonic()
    [result] = manager.deploy([agent("hang")], timeout=2)
    assert result.status == "timeout" and "timed out after 2s" in result.error
    assert time.monotonic() - started < 15
    pids = [int(p) for p in re.findall(r"PID (\d+)", result.stdout_tail)]
    assert len(pids) == 3, result.stdout_tail  # child, orphaned setsid grandchild, root
    assert result.killed_processes >= 2
    for pid in pids:
        try:
            assert psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # dead, waiting for pid 1 to reap it
        except psutil.NoSuchProcess:
            pass
    with Store(manager.store_path) as store:
        assert store.agent(result.agent_id).status == "timeout"


def test_32_agents_in_parallel_every_flow_attributed_to_its_agent(manager):
    since = time.time()
    results = manager.deploy([agent("chat 2 @id")] * 32)
    assert [r.index for r in results] == list(range(32))
    assert all(r.status == "ok" for r in results), [r.stderr_tail for r in results if r.status != "ok"]
    assert len({r.agent_id for r in results}) == 32
    for result in results:
        flows = _flows(manager, result.agent_id)
        assert len(flows) == 2 and result.calls == 2
        assert all(f.state == "done" and _said(f) == f"say {result.agent_id}" for f in flows)
    summary = manager.summary(results, since=since)
    assert summary["unattributed_flows"] == 0 and summary["calls"] == 64 and summary["by_status"]["ok"] == 32


def test_several_proxies_share_the_agents_and_the_store(tmp_path, upstream):
    # A fresh confdir: the first proxy creates the CA, the others start at once and share it.
    with AgentManager(SHELL_AGENT, store=tmp_path / "r.db", parallel=8, timeout=60, proxies=3,
                      model_url=upstream.base_url, confdir=tmp_path / "conf",
                      eos_token_id=FakeTokenizer.eos_token_id, poll_interval=0.1) as m:
        assert len({link.url for link in m.links}) == 3 and m.proxy_url == m.links[0].url
        results = m.deploy([agent("chat 2 @id")] * 9)
        assert all(r.status == "ok" and r.calls == 2 for r in results), [r.stderr_tail for r in results]
        by_proxy: dict[str, set[str]] = {}
        for result in results:
            flows = _flows(m, result.agent_id)
            assert len(flows) == 2 and all(f.state == "done" and _said(f) == f"say {result.agent_id}"
                                           for f in flows)
            assert len({f.proxy_id for f in flows}) == 1  # an agent keeps its proxy
            by_proxy.setdefault(flows[0].proxy_id, set()).add(result.agent_id)
        # The 9th starts when one of the first 8 (3, 3, 2 on the proxies) ends: on a proxy with the fewest running.
        assert sorted(len(a) for a in by_proxy.values()) in ([3, 3, 3], [2, 3, 4])
        assert m.summary(results)["proxy_restarts"] == 0
        # Across deploys too: deploys of one prompt each go to every proxy in turn, not all to the first.
        singles = [m.deploy([agent("chat 1 @id")])[0] for _ in range(6)]
        used = [_flows(m, r.agent_id)[0].proxy_id for r in singles]
        assert sorted(used.count(p) for p in set(used)) == [2, 2, 2]


def test_several_proxies_need_free_ports(tmp_path, upstream):
    for proxy in ("http://127.0.0.1:9", ProxyConfig(store=tmp_path / "r.db", port=18080)):
        with pytest.raises(ConfigError):
            AgentManager(SHELL_AGENT, store=tmp_path / "r.db", proxies=2, proxy=proxy,
                         model_url=upstream.base_url).start()
    with pytest.raises(ConfigError):
        AgentManager(SHELL_AGENT, store=tmp_path / "r.db", proxies=0)


def test_direct_connection_to_the_model_is_reported_as_bypass(manager, upstream):
    direct, proxied = manager.deploy([agent("direct"), agent("chat 1 @id")])
    assert direct.status == "ok" and direct.calls == 0  # the proxy never saw it
    assert direct.bypass_connections and proxied.bypass_connections == ()
    assert direct.bypass_connections[0]["remote"] == upstream.url.split("://")[1]
    assert manager.summary([direct, proxied])["bypass_agents"] == 1


def test_missing_command_is_an_error_not_a_crash(tmp_path, confdir, upstream):
    with AgentManager(CommandAgent(["/nonexistent/agent", "{prompt}"]), store=tmp_path / "r.db",
                      confdir=confdir) as m:
        [result] = m.deploy(["x"])
    assert result.status == "error" and "nonexistent" in result.error


def test_entry_points_run_in_fresh_processes(tmp_path, confdir, upstream):
    spec = EntryPointAgent("manager_support:entry_chat")
    with AgentManager(spec, store=tmp_path / "r.db", model_url=upstream.base_url, confdir=confdir) as m:
        results = m.deploy(["first @id", "second @id"])
        with AgentManager(EntryPointAgent("manager_support:entry_raise"), store=m.store_path,
                          proxy=m.proxy_url) as attached:
            [raised] = attached.deploy(["nope"])
    assert [r.status for r in results] == ["ok", "ok"]
    for result in results:
        assert result.return_value["reply"] == f"echo: say {result.return_value['prompt'].replace('@id', result.agent_id)}"
        assert result.calls == 1
    pids = {r.return_value["pid"] for r in results}
    assert len(pids) == 2 and os.getpid() not in pids
    assert raised.status == "failed" and raised.error == "ValueError: entry point refused 'nope'"
    assert "Traceback" in raised.stderr_tail and raised.return_value is None


def test_proxy_killed_mid_batch_is_restarted_and_capture_goes_on(tmp_path, confdir, upstream):
    store_path = tmp_path / "runs.db"
    with AgentManager(SHELL_AGENT, store=store_path, parallel=2, timeout=60, model_url=upstream.base_url,
                      confdir=confdir) as m:
        first_proxy = m.link.process.proxy_id
        first_pid = m.link.process.proc.pid

        def kill_after_two():
            with Store(store_path) as store:
                wait_for(lambda: sum(a.status == "ok" for a in store.agents(m.run_id)) >= 2, 30, "two agents")
                # Not between a reply and its commit: a proxy SIGKILLed then loses that flow (its agent got
                # the answer, so it never retries), a loss no restart can undo and not what this test is about.
                wait_for(lambda: not store.flows(state="open"), 30, "no reply on its way")
            os.kill(first_pid, signal.SIGKILL)

        killer = threading.Thread(target=kill_after_two)
        killer.start()
        results = m.deploy([agent("retry @id 30")] * 8)
        killer.join()
        assert m.proxy_restarts == 1 and m.link.process.proxy_id != first_proxy
    # An agent it served when killed (parallel=2) is not reported ok: it may have lost rows of theirs.
    overlapped = [r for r in results if r.status != "ok"]
    assert len(overlapped) <= 2 and all(r.status == "error" and "killed while it ran" in (r.error or "")
                                        for r in overlapped), [(r.status, r.error, r.stderr_tail) for r in results]
    with Store(store_path) as store:
        for result in results:
            done = [f for f in store.flows(agent_id=result.agent_id, state="done")]
            assert len(done) == 1 and _said(done[0]) == f"say {result.agent_id}"
        by_proxy = {f.proxy_id for f in store.flows(run_id=m.run_id, state="done")}
        assert first_proxy in by_proxy and len(by_proxy) == 2  # earlier flows kept, later ones captured
        assert store.flows(state="open") == []


def test_an_agent_whose_proxy_was_killed_while_it_ran_is_not_reported_ok(tmp_path, confdir, upstream):
    # SIGKILL (the OOM killer) right after the agent got its answer: the proxy's last rows never reach the
    # store, and the agent, which exits 0, must not pass for a whole conversation.
    answered, go = tmp_path / "answered", tmp_path / "go"
    prompt = (f"{PY} {shlex.quote(SUPPORT)} 'chat 1 @id' && touch {answered} && "
              f"exec {PY} {shlex.quote(SUPPORT)} 'await {go}'")
    with AgentManager(SHELL_AGENT, store=tmp_path / "r.db", timeout=60, model_url=upstream.base_url,
                      confdir=confdir) as m:
        pid = m.link.process.proc.pid

        def kill_after_the_answer():
            wait_for(answered.exists, 30, "the agent's answer")
            os.kill(pid, signal.SIGKILL)
            go.touch()

        killer = threading.Thread(target=kill_after_the_answer)
        killer.start()
        [result] = m.deploy([prompt])
        killer.join()
        [after] = m.deploy([agent("chat 1 @id")])  # on the restarted proxy: nothing of the kill left
    assert result.exit_code == 0 and result.status == "error" and f"pid {pid}) was killed" in result.error
    assert after.status == "ok" and after.error is None


def test_an_agent_running_when_its_proxy_was_killed_is_reported_whatever_the_store_holds_of_it(
        tmp_path, confdir, upstream):
    # Killed before committing (a store that was busy, say), the proxy may have lost a call the agent made and
    # got an answer to, leaving no row of it at all: from the store, that is no different from an agent idle
    # through the kill. Its result says so either way; its call on the restarted proxy is there.
    go = tmp_path / "go"
    prompt = f"while [ ! -e {go} ]; do sleep 0.05; done; " + agent("chat 1 @id")
    with AgentManager(SHELL_AGENT, store=tmp_path / "r.db", timeout=60, model_url=upstream.base_url,
                      confdir=confdir) as m:
        link = m.link
        pid = link.process.proc.pid

        def kill_then_go():
            with Store(tmp_path / "r.db") as store:
                wait_for(lambda: any(a.status == "running" for a in store.agents(m.run_id)), 30, "the agent")
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: link.restarts == 1, 30, "the restart")
            go.touch()

        killer = threading.Thread(target=kill_then_go)
        killer.start()
        [result] = m.deploy([prompt])
        killer.join()
    assert (result.status, result.calls, result.proxy_restarts) == ("error", 1, 1)
    assert f"its proxy (pid {pid}) was killed while it ran" in result.error


def test_a_proxy_killed_while_an_agent_is_prepared_leaves_it_ok(tmp_path, confdir, upstream, monkeypatch):
    # Its workdir is made (a template copied: seconds, maybe) before it is pointed at the proxy: the proxy
    # killed and restarted meanwhile never saw it.
    import rollouttap.manager.manager as manager_module
    prepare = manager_module._prepare
    with AgentManager(SHELL_AGENT, store=tmp_path / "r.db", timeout=60, model_url=upstream.base_url,
                      confdir=confdir) as m:
        link = m.link

        def kill_while_preparing(*args, **kwargs):
            os.kill(link.process.proc.pid, signal.SIGKILL)
            link.process.proc.wait()
            link.revive_if_dead(threading.Event(), m.store)
            return prepare(*args, **kwargs)

        monkeypatch.setattr(manager_module, "_prepare", kill_while_preparing)
        [result] = m.deploy([agent("chat 1 @id")])
    assert (result.status, result.error, result.calls, result.proxy_restarts) == ("ok", None, 1, 1)


def test_a_proxy_killed_and_started_again_by_hand_leaves_the_next_agents_of_an_attached_manager_ok(
        tmp_path, confdir, upstream):
    store_path, port = tmp_path / "r.db", free_port("127.0.0.1")
    old = start_proxy(store_path, confdir, port=port)
    new = None
    try:
        with AgentManager(SHELL_AGENT, store=store_path, proxy=old.url, model_url=upstream.base_url) as m:
            [first] = m.deploy([agent("chat 1 @id")])
            os.kill(old.proc.pid, signal.SIGKILL)
            old.proc.wait()
            new = start_proxy(store_path, confdir, port=port)
            [second] = m.deploy([agent("chat 1 @id")])
        assert first.status == "ok" and (second.status, second.error, second.calls) == ("ok", None, 1)
    finally:
        old.stop()
        if new is not None:
            new.stop()


def test_agents_started_after_the_proxy_died_wait_for_its_restart(tmp_path, confdir, upstream):
    with AgentManager(SHELL_AGENT, store=tmp_path / "r.db", parallel=4, timeout=60, model_url=upstream.base_url,
                      confdir=confdir) as m:
        os.kill(m.link.process.proc.pid, signal.SIGKILL)
        m.link.process.proc.wait()
        results = m.deploy([agent("chat 1 @id")] * 4)  # no retries: a dead port fails them
        assert m.proxy_restarts == 1
    assert [r.status for r in results] == ["ok"] * 4, [r.stderr_tail for r in results]
    assert [r.proxy_restarts for r in results] == [1] * 4


def test_a_proxy_that_recorded_its_stop_is_restarted_before_it_exits(tmp_path, confdir):
    # A proxy someone else sent SIGTERM stops listening, records its stop, then closes its store (seconds, on
    # a slow disk) before it exits: an agent started meanwhile would meet a closed port.
    process = ProxyProcess(ProxyConfig(store=tmp_path / "r.db", confdir=confdir)).start(timeout=60)
    link = ProxyLink(process.url, process.ca_cert, None, process)
    old_id, old_pid = process.proxy_id, process.proc.pid
    try:
        with Store(tmp_path / "r.db") as store:
            link.revive_if_dead(threading.Event(), store)
            assert link.restarts == 0  # running, not stopped: left alone
            with sqlite3.connect(tmp_path / "r.db") as db:  # what its shutdown writes once it stopped listening
                db.execute("UPDATE proxies SET stopped_at = ? WHERE proxy_id = ?", (time.time(), old_id))
            link.revive_if_dead(threading.Event(), store)
            assert link.restarts == 1 and process.proxy_id != old_id and process.proc.pid != old_pid
            assert process.alive() and link.proxy_ids == [old_id, process.proxy_id]
            socket.create_connection(("127.0.0.1", process.port), timeout=5).close()  # the same port, listening
    finally:
        link.close()


def test_a_failed_restart_is_not_retried_by_every_agent_start(tmp_path, confdir):
    process = ProxyProcess(ProxyConfig(store=tmp_path / "r.db", confdir=confdir)).start(timeout=60)
    link = ProxyLink(process.url, process.ca_cert, None, process)
    os.killpg(process.proc.pid, signal.SIGKILL)
    process.proc.wait()
    with socket.create_server(("127.0.0.1", process.port)):  # its port taken: the restart cannot bind it
        link.restart_timeout = 1.0
        link.revive_if_dead(threading.Event())
        started = time.monotonic()
        link.revive_if_dead(threading.Event())  # the next agent start: no second wait
        assert time.monotonic() - started < 0.5 and link.restarts == 0 and not process.alive()
    link.close()


def test_close_cancels_the_running_deploys_and_records_their_agents(tmp_path, confdir, upstream):
    m = AgentManager(SHELL_AGENT, store=tmp_path / "r.db", timeout=60, model_url=upstream.base_url,
                     confdir=confdir).start()
    results: list = []
    workers = [threading.Thread(target=lambda: results.extend(m.deploy([agent("hang")] * 2))) for _ in range(2)]
    for worker in workers:
        worker.start()
    with Store(m.store_path) as store:
        def all_running():
            agents = store.agents(m.run_id)
            return agents if len(agents) == 4 and all(a.status == "running" for a in agents) else None
        agents = wait_for(all_running, 30, "four running agents")
    m.close()
    for worker in workers:
        worker.join(10)
    assert [(r.status, r.error) for r in results] == [("error", "cancelled before it finished")] * 4
    for a in agents:
        assert not psutil.pid_exists(a.root_pid) or psutil.Process(a.root_pid).status() == psutil.STATUS_ZOMBIE
    with Store(m.store_path) as store:
        assert {a.status for a in store.agents(m.run_id)} == {"error"}


def test_a_deploy_that_a_close_overtook_while_it_got_ready_starts_no_agent(tmp_path, confdir, upstream):
    # deploy() prunes a large store before it registers; a close() then saw no deploy to cancel, and its agents
    # ran against a closed store (every result an AssertionError).
    m = AgentManager(SHELL_AGENT, store=tmp_path / "r.db", timeout=60, model_url=upstream.base_url,
                     confdir=confdir).start()
    pruning, go_on = threading.Event(), threading.Event()
    m._prune_ended = lambda: (pruning.set(), go_on.wait(30))  # type: ignore[method-assign]
    raised: list[BaseException] = []

    def deploy():
        try:
            m.deploy([agent("hang")])
        except BaseException as exc:
            raised.append(exc)
    worker = threading.Thread(target=deploy)
    worker.start()
    assert pruning.wait(30)
    closer = threading.Thread(target=m.close)
    closer.start()
    wait_for(lambda: m._closed, 30, "close() begun")
    go_on.set()
    worker.join(30)
    closer.join(30)
    assert len(raised) == 1 and isinstance(raised[0], RuntimeError) and "closed" in str(raised[0])
    with Store(m.store_path) as store:
        assert store.agents(m.run_id) == []
    with m.start():  # a manager closed can be started again, and deploys
        assert [r.status for r in m.deploy([agent("nothing")])] == ["ok"]


def test_a_close_broken_off_still_stops_the_proxy(tmp_path, confdir, upstream):
    m = AgentManager(SHELL_AGENT, store=tmp_path / "r.db", model_url=upstream.base_url, confdir=confdir).start()
    pid = m.link.process.proc.pid

    def interrupted(timeout: float = 60.0) -> bool:
        raise KeyboardInterrupt  # Ctrl-C while close() waited for the running agents
    m.cancel = interrupted  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        m.close()
    assert m.links == [] and (not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)


def test_close_from_a_progress_callback_waits_for_the_batchs_other_agents(tmp_path, confdir, upstream):
    m = AgentManager(SHELL_AGENT, store=tmp_path / "r.db", timeout=60, model_url=upstream.base_url,
                     confdir=confdir).start()
    results = m.deploy([agent("nothing"), agent("hang")], progress=lambda r: r.index == 0 and m.close())
    assert [(r.status, r.error) for r in results] == [("ok", None), ("error", "cancelled before it finished")]
    with Store(tmp_path / "r.db") as store:
        assert sorted(a.status for a in store.agents(m.run_id)) == ["error", "ok"]


def test_two_managers_share_one_store(tmp_path, confdir, upstream):
    store_path = tmp_path / "shared.db"
    Store(store_path).close()  # created up front: two first opens racing on a new file is the store's concern
    out: dict[str, list] = {}
    errors: list[BaseException] = []

    def run(name: str) -> None:
        try:
            with AgentManager(SHELL_AGENT, store=store_path, parallel=2, model_url=upstream.base_url,
                              confdir=confdir, run_id=name) as m:
                out[name] = m.deploy([agent("chat 2 @id")] * 4)
        except BaseException as exc:  # re-raised below, with its traceback
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(name,)) for name in ("left", "right")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    if errors:
        raise errors[0]
    with Store(store_path) as store:
        for name in ("left", "right"):
            assert [r.status for r in out[name]] == ["ok"] * 4
            assert {a.agent_id for a in store.agents(name)} == {r.agent_id for r in out[name]}
            for result in out[name]:
                assert [_said(f) for f in store.flows(agent_id=result.agent_id)] == [f"say {result.agent_id}"] * 2
        assert store.flow_counts()["unattributed"] == 0 and len(store.proxies()) == 2


def test_base_url_mode_captures_clients_that_ignore_proxies(tmp_path, confdir, upstream):
    with AgentManager(SHELL_AGENT, store=tmp_path / "r.db", model_url=upstream.base_url, confdir=confdir,
                      base_url_mode=True) as m:
        results = m.deploy([agent("aiohttp @id"), agent("aiohttp @id trust-env"), agent("chat 1 @id"),
                            agent("requests @id")])
        reverse, forward = m.link.reverse_url, m.proxy_url
    for result in results:
        assert result.status == "ok" and result.calls == 1, result.stderr_tail
        assert result.bypass_connections == ()
        assert [(f.attribution, f.path, _said(f)) for f in _flows(m, result.agent_id)] == [
            ("path", "/v1/chat/completions", f"say {result.agent_id}")]
    assert reverse.startswith("http://localhost:") and reverse.rsplit(":", 1)[1] != forward.rsplit(":", 1)[1]


def test_a_failed_start_leaves_no_store_it_made_and_keeps_one_it_found(tmp_path):
    made = tmp_path / "new.db"
    with pytest.raises(ConfigError, match="the proxy config records into"):
        AgentManager(SHELL_AGENT, store=made, proxy=ProxyConfig(store=tmp_path / "other.db")).start()
    with pytest.raises(ProxyError, match="no running rollouttap proxy"):
        AgentManager(SHELL_AGENT, store=made, proxy="http://127.0.0.1:9").start()
    assert list(tmp_path.iterdir()) == []  # not even its -wal and -shm
    Store(made).close()
    with pytest.raises(ProxyError, match="no running rollouttap proxy"):
        AgentManager(SHELL_AGENT, store=made, proxy="http://127.0.0.1:9").start()
    assert made.exists()  # a store that was there stays, empty or not


def test_a_failed_start_keeps_a_new_store_another_process_opened_meanwhile(tmp_path, confdir, monkeypatch):
    # Another run's proxy starts on the same new path while this start is still starting its own (seconds).
    import requests

    from rollouttap.manager.proxy_link import ProxyLink
    path, other = tmp_path / "shared.db", []

    def open_meanwhile(*_args, **_kwargs):
        other.append(start_proxy(path, confdir))
        raise ProxyError("this start's proxy failed")
    monkeypatch.setattr(ProxyLink, "open", open_meanwhile)
    with pytest.raises(ProxyError, match="this start's proxy failed"):
        AgentManager(SHELL_AGENT, store=path).start()
    with other[0]:
        assert path.exists()  # the other proxy's store: it records on
        requests.get("http://127.0.0.1:9/x", proxies={"http": other[0].url}, headers={"X-Agent-ID": "b1"}, timeout=10)
    with Store(path) as s:
        assert [f.agent_id for f in s.flows()] == ["b1"]


def test_attach_to_a_running_proxy(tmp_path, confdir, upstream):
    store_path = tmp_path / "r.db"
    with pytest.raises(ProxyError, match="no running rollouttap proxy"):
        AgentManager(SHELL_AGENT, store=store_path, proxy="http://127.0.0.1:9").start()
    proc = start_proxy(store_path, confdir)
    try:
        with AgentManager(SHELL_AGENT, store=store_path, proxy=proc.url, model_url=upstream.base_url) as m:
            [result] = m.deploy([agent("chat 1 @id")])
        assert result.status == "ok" and result.calls == 1
        assert proc.alive()  # not ours to stop
    finally:
        proc.stop()


def test_attach_to_a_proxy_by_an_ipv6_url_gives_agents_urls_they_can_parse(tmp_path, confdir, upstream):
    proc = start_proxy(tmp_path / "r.db", confdir, host="::1", reverse_target=upstream.url)
    try:
        for base_url_mode in (False, True):
            with AgentManager(SHELL_AGENT, store=tmp_path / "r.db", proxy=f"http://[::1]:{proc.port}",
                              model_url=upstream.base_url, base_url_mode=base_url_mode) as m:
                [result] = m.deploy([agent("chat 1 @id")])
                assert m.proxy_url == f"http://[::1]:{proc.port}"
                reverse = m.link.reverse_url
            assert result.status == "ok" and result.calls == 1, result.stderr_tail
            assert [f.attribution for f in _flows(m, result.agent_id)] == ["path" if base_url_mode else "credentials"]
            assert (reverse or "").startswith("http://[::1]:") == base_url_mode
    finally:
        proc.stop()


@pytest.mark.parametrize("base_url_mode", [False, True])
def test_agents_reach_a_proxy_on_every_address_at_its_public_host(tmp_path, confdir, upstream, base_url_mode):
    # As agents on another host would: by this host's address, not the "0.0.0.0" it listens on. In base-URL
    # mode, requests and aiohttp send the base URL through HTTP_PROXY all the same: the proxy knows it for its
    # own reverse listener's by that address too (else it looped to itself and was refused).
    address = next((a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                    if a.family == socket.AF_INET and not a.address.startswith("127.")), None)
    if address is None:
        pytest.skip("this host has no non-loopback IPv4 address")
    config = ProxyConfig(store=tmp_path / "r.db", confdir=confdir, host="0.0.0.0", allow_remote=True,
                         public_host=address)
    with AgentManager(SHELL_AGENT, store=tmp_path / "r.db", proxy=config, model_url=upstream.base_url,
                      base_url_mode=base_url_mode) as m:
        assert m.proxy_url.startswith(f"http://{address}:")
        results = m.deploy([agent("chat 1 @id"), agent("requests @id"), agent("aiohttp @id trust-env")])
    for result in results:
        assert result.status == "ok" and result.calls == 1, (result.error, result.stderr_tail)
        [flow] = _flows(m, result.agent_id)
        assert flow.attribution == ("path" if base_url_mode else "credentials")


def test_attach_refuses_a_proxy_on_another_address_with_the_same_port(tmp_path, confdir):
    # Proxy A records into the manager's store; proxy B, same port on another address, records elsewhere.
    ours = start_proxy(tmp_path / "ours.db", confdir)
    theirs = start_proxy(tmp_path / "theirs.db", confdir, host="127.0.0.2", port=ours.port)
    try:
        with pytest.raises(ProxyError, match="no running rollouttap proxy"):
            AgentManager(SHELL_AGENT, store=tmp_path / "ours.db", proxy=f"http://127.0.0.2:{ours.port}").start()
        with AgentManager(SHELL_AGENT, store=tmp_path / "ours.db", proxy=f"http://localhost:{ours.port}") as m:
            assert m.proxy_url == f"http://localhost:{ours.port}"  # a name for the address it listens on
    finally:
        theirs.stop()
        ours.stop()


def test_a_managers_unattributed_flows_are_those_of_its_own_proxies(tmp_path, confdir, upstream):
    # Two managers (or a manager and a hand-run proxy) share a store: each counts what went through its proxies.
    import requests
    store_path = tmp_path / "shared.db"
    other = start_proxy(store_path, confdir)
    try:
        with AgentManager(SHELL_AGENT, store=store_path, model_url=upstream.base_url, confdir=confdir) as m, \
                Store(store_path) as store:
            since = time.time()
            for proxy_url in (other.url, other.url, m.proxy_url):  # this process is no agent: unattributed
                requests.post(upstream.url + "/echo", json={}, proxies={"http": proxy_url}, timeout=10)
            # A name no agent registered, claimed by header (an escaped process that dropped its tag): no result
            # holds its flow either.
            requests.post(upstream.url + "/echo", json={}, headers={"X-Agent-ID": "ghost"},
                          proxies={"http": m.proxy_url}, timeout=10)
            wait_for(lambda: len(store.flows(unattributed=True, since=since, state="done")) == 3, 30, "three flows")
            wait_for(lambda: [f.state for f in store.flows(agent_id="ghost")] == ["done"], 30, "the claimed flow")
            assert m.summary([], since=since)["unattributed_flows"] == 2
    finally:
        other.stop()


def test_an_agent_whose_only_call_broke_off_gets_a_masked_row_with_the_servers_prompt(tmp_path):
    # vLLM sends prompt_token_ids in the first chunk; the stream then broke off (a timeout, a crash).
    first = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m", "prompt_token_ids": [5, 6, 7],
             "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}]}
    writer = StoreWriter(tmp_path / "s.db")
    writer.insert_flow({"flow_id": "f1", "agent_id": "a1", "attribution": "pid", "method": "POST",
                        "host": "127.0.0.1", "path": "/v1/chat/completions", "t_request": time.time(),
                        "request_headers": [["Content-Type", "application/json"]],
                        "request_body": json.dumps({"model": "m", "stream": True,
                                                    "messages": [{"role": "user", "content": "hi"}]}).encode(),
                        "status_code": 200, "streamed": 1,
                        "response_headers": [["Content-Type", "text/event-stream"]],
                        "response_body": f"data: {json.dumps(first)}\n\n".encode(),
                        "meta": {"injected": {"return_token_ids": True}},
                        "state": "error", "error": "client disconnected", "t_end": time.time()})
    writer.close()
    with Store(tmp_path / "s.db") as store:
        collected = collect_flows(store, "a1", eos_token_id=2)
    assert collected.calls == 1 and collected.row is not None
    assert collected.row.prompt_ids == [5, 6, 7] and collected.row.env_mask == [0]


@pytest.mark.parametrize("continues", [True, False], ids=["completion continues the chat", "unrelated prompt"])
def test_an_agent_using_chat_and_completions_gets_both_calls_in_its_row(tmp_path, continues):
    from rollouttap.testing.replies import Reply
    from rollouttap.testing.vllm_format import Options, generate_chat, generate_completion
    from rollouttap.testing.vllm_responses import ResponseMeta, chat_body, completion_body
    tok = FakeTokenizer()
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "return_token_ids": True,
            "logprobs": True, "return_tokens_as_token_ids": True}
    chat_gen = generate_chat(chat, Reply(content="hello"), tok)
    # A token-exact continuation (the chat's tokens, then the environment's) or a prompt of its own.
    prompt = [*chat_gen.prompt_ids, *chat_gen.ids, 7, 9] if continues else [1, 7, 9]
    cmpl = {"model": "m", "prompt": prompt, "return_token_ids": True, "logprobs": 0, "return_tokens_as_token_ids": True}
    cmpl_gen = generate_completion(cmpl, Reply(content="abc"), tok)
    answers = [("/v1/chat/completions", chat, chat_body(chat_gen, ResponseMeta.new("m"), Options.from_request(chat), tok)),
               ("/v1/completions", cmpl, completion_body(cmpl_gen, ResponseMeta.new("m", chat=False),
                                                       Options.from_request(cmpl, chat=False), tok))]
    writer = StoreWriter(tmp_path / "s.db")
    for n, (path, request, answer) in enumerate(answers):
        writer.insert_flow({"flow_id": f"f{n}", "agent_id": "a1", "attribution": "credentials", "method": "POST",
                            "host": "127.0.0.1", "path": path, "t_request": time.time(),
                            "request_headers": [["Content-Type", "application/json"]],
                            "request_body": json.dumps(request).encode(), "status_code": 200,
                            "response_headers": [["Content-Type", "application/json"]],
                            "response_body": json.dumps(answer).encode(), "state": "done", "t_end": time.time()})
    writer.close()
    with Store(tmp_path / "s.db") as store:
        collected = collect_flows(store, "a1", eos_token_id=tok.eos_token_id)
    sampled = len(chat_gen.ids) + len(cmpl_gen.ids)
    assert collected.calls == 2 and collected.tokens["completion"] == sampled
    assert (collected.fidelity.calls, collected.fidelity.sampled_tokens) == (2, sampled)
    # realign's row is the last call's sequence: the chat's tokens are in it only when the completion continues it
    trained = sampled if continues else len(cmpl_gen.ids)
    assert sum(collected.row.env_mask) == collected.fidelity.trainable_tokens == trained
    assert collected.row.completion_ids[-len(cmpl_gen.ids):] == cmpl_gen.ids


TWO_CTRL_C = """
import os, signal, sqlite3, sys, threading, time
import psutil
from rollouttap.manager import AgentManager, CommandAgent
from rollouttap.store import Store

store_path, confdir = sys.argv[1], sys.argv[2]
main = threading.main_thread()


def wait_for(condition, what):
    deadline = time.monotonic() + 60
    while not condition():
        if time.monotonic() > deadline:
            print("timed out waiting for", what, flush=True)
            os._exit(3)
        time.sleep(0.02)


def in_main(name):
    frame = sys._current_frames().get(main.ident)
    while frame is not None:
        if frame.f_code.co_name == name:
            return True
        frame = frame.f_back
    return False


m = AgentManager(CommandAgent(["sleep", "60"]), store=store_path, timeout=60, parallel=2, confdir=confdir).start()
lock = sqlite3.connect(store_path, isolation_level=None, timeout=30, check_same_thread=False)
interrupted, closed = threading.Event(), threading.Event()


def ctrl_c_twice():
    with Store(store_path) as store:
        wait_for(lambda: [a.status for a in store.agents(m.run_id)] == ["running"] * 2, "two running agents")
    # The agents' ends wait for this lock (up to the store's 10 s busy timeout): the deploy cannot finish yet.
    lock.execute("BEGIN IMMEDIATE")
    os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: the agents are killed ...
    wait_for(lambda: in_main("shutdown"), "deploy() waiting for its agents' ends")
    os.kill(os.getpid(), signal.SIGINT)  # ... and the second breaks deploy()'s wait for their ends
    wait_for(interrupted.is_set, "deploy() broken off")
    # The ends stay blocked until close() waits for them (or has returned without waiting).
    wait_for(lambda: in_main("cancel") or closed.is_set(), "close() under way")
    lock.execute("ROLLBACK")


threading.Thread(target=ctrl_c_twice, daemon=True).start()
reported = []


def slow_progress(result):  # a late report still being written when its agent's future is already done
    if interrupted.is_set():
        time.sleep(0.3)
    reported.append(result)


try:
    m.deploy(["a", "b", "c"], progress=slow_progress)  # "c" waits its turn, and never starts
    print("deploy returned", flush=True)
except KeyboardInterrupt:
    interrupted.set()
started = time.monotonic()
m.close()  # waits for the broken-off deploy's agents to be recorded, then stops the proxy and the store
print("close took", round(time.monotonic() - started), "s", flush=True)
closed.set()
print(sorted((r.index, r.status, r.error) for r in reported), flush=True)  # the results deploy() still owed
with Store(store_path) as store:
    agents = store.agents(m.run_id)
    print(sorted(a.status for a in agents), flush=True)
for pid in [a.root_pid for a in agents]:
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, pid
"""


def test_a_deploy_broken_off_by_a_second_ctrl_c_is_recorded_before_close_returns(tmp_path, confdir):
    # Ctrl-C once: deploy() kills its agents and waits for their ends to be recorded. Ctrl-C again breaks
    # that wait; the deploy stays known, so close() waits for those ends before it closes the store.
    proc = subprocess.run([sys.executable, "-c", TWO_CTRL_C, str(tmp_path / "r.db"), str(confdir)],
                          capture_output=True, text=True, timeout=120, preexec_fn=ctrl_c_as_from_a_terminal)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    *_, took, reported, statuses = proc.stdout.splitlines()
    assert statuses == "['error', 'error']", proc.stdout + proc.stderr
    assert reported == str([(0, "error", "cancelled before it finished"), (1, "error", "cancelled before it finished"),
                            (2, "error", "cancelled before it started")]), proc.stdout
    assert int(took.split()[2]) < 20, took  # not grace + 60 s on the future of the agent that never started
    assert "Traceback" not in proc.stderr, proc.stderr


def test_an_agent_whose_flows_the_proxy_could_not_commit_in_time_is_an_error_not_ok(tmp_path, confdir):
    from rollouttap.testing.replies import default_script
    from rollouttap.testing.upstream import ScriptedUpstream
    store = tmp_path / "r.db"
    taken, released = threading.Event(), threading.Event()

    def lock_the_store(request):  # another process's write transaction, taken as the agent's call arrives
        def hold():
            conn = sqlite3.connect(store, isolation_level=None)
            conn.execute("BEGIN IMMEDIATE")
            taken.set()
            time.sleep(2.0)  # longer than the grace period: the proxy cannot commit the call's flow in time
            conn.execute("ROLLBACK")
            conn.close()
            released.set()
        if not taken.is_set():
            threading.Thread(target=hold, daemon=True).start()
            assert taken.wait(10)
        return default_script(request)

    with ScriptedUpstream(lock_the_store) as upstream, \
            AgentManager(SHELL_AGENT, store=store, timeout=60, grace=0.5, model_url=upstream.base_url,
                         confdir=confdir, poll_interval=0.1) as m:
        [result] = m.deploy([agent("chat 1 @id")])
        assert released.wait(10)
        again = m.deploy([agent("chat 1 @id")])[0]  # the lock gone, the next agent is as before
    assert result.exit_code == 0 and result.status == "error"
    assert "had not committed this agent's flows 0.5s after it ended" in result.error
    assert again.status == "ok" and again.calls == 1


def test_a_stalled_proxy_that_served_none_of_the_agents_does_not_hold_them_up(tmp_path, confdir, upstream):
    # Another proxy on the store (another manager's, one run by hand) that stopped writing: no flow of these
    # agents can wait in its queue, so they are neither held for the grace period nor failed.
    store = tmp_path / "r.db"
    with start_proxy(store, confdir) as other:
        os.kill(other.proc.pid, signal.SIGSTOP)
        try:
            with AgentManager(SHELL_AGENT, store=store, timeout=60, grace=3, model_url=upstream.base_url,
                              confdir=confdir, poll_interval=0.1) as m:
                results = m.deploy([agent("chat 1 @id"), agent("chat 1 @id")])
        finally:
            os.kill(other.proc.pid, signal.SIGCONT)
    # (Waiting on it, each would end in error after the grace period: its calls "not committed".)
    assert [r.status for r in results] == ["ok", "ok"] and all(r.calls == 1 for r in results), results


def test_an_agent_whose_end_cannot_be_recorded_keeps_its_own_result(tmp_path, confdir, upstream):
    from concurrent.futures import ThreadPoolExecutor
    store, go = tmp_path / "r.db", tmp_path / "go"
    with AgentManager(SHELL_AGENT, store=store, timeout=60, grace=0.5, model_url=upstream.base_url,
                      confdir=confdir, poll_interval=0.1) as m, ThreadPoolExecutor(1) as pool:
        m.store.locked_write_wait_s = 0.0  # a lock that outlasts the wait: the write fails
        m.store._conn.execute("PRAGMA busy_timeout = 100")
        running = pool.submit(m.deploy, [agent(f"await {go}")])
        with Store(store) as reader:
            wait_for(lambda: [a for a in reader.agents() if a.status == "running"], what="the agent running")
        lock = sqlite3.connect(store, isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")  # another process's write transaction, until the agent has ended
        go.touch()
        [result] = running.result(timeout=60)
        lock.execute("ROLLBACK")
        lock.close()
    assert result.exit_code == 0 and result.duration_s > 0  # what the agent did is still there
    assert "its end could not be recorded in the store" in result.error and "locked" in result.error


def test_agents_are_not_started_once_the_managers_store_file_is_gone(tmp_path, confdir, upstream):
    store = tmp_path / "r.db"
    with AgentManager(SHELL_AGENT, store=store, timeout=60, model_url=upstream.base_url, confdir=confdir,
                      poll_interval=0.1) as m:
        assert m.deploy([agent("chat 1 @id")])[0].status == "ok"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{store}{suffix}").unlink(missing_ok=True)
        started = time.monotonic()
        [result] = m.deploy([agent("chat 1 @id")])
    assert result.status == "error" and "was deleted or replaced" in result.error
    assert time.monotonic() - started < 5  # at once, not after a grace period of waiting for its flows
