"""The store on a real SQLite file: schema, version check, writer thread, reader, redaction."""

from __future__ import annotations

import hashlib
import os
import random
import shlex
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from conftest import wait_for
from rollouttap.errors import StoreError, StoreVersionError
from rollouttap.store import (
    SCHEMA_VERSION, Store, StoreWriter, connect, hash_token, map_secret_query, new_token, redact_headers,
    redact_query, token_matches, transaction,
)
from rollouttap.store.records import decode_body
from rollouttap.store.redact import fingerprint, is_secret_name, redact_value, redacted_query_value
from rollouttap.store.writer import _apply, batch_mark, fold


def test_new_store_has_schema_wal_and_busy_timeout(tmp_path):
    conn = connect(tmp_path / "s.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 1000
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"agents", "flows", "proxies"} <= tables


def test_newer_schema_version_is_refused_clearly(tmp_path):
    path = tmp_path / "s.db"
    connect(path).execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreVersionError, match="schema version"):
        connect(path)


def test_foreign_sqlite_file_is_refused(tmp_path):
    path = tmp_path / "other.db"
    sqlite3.connect(path).execute("CREATE TABLE x (a)")
    with pytest.raises(StoreVersionError, match="not a rollouttap store"):
        Store(path)


def test_a_new_store_and_its_log_are_readable_by_their_owner_only(tmp_path):
    path = tmp_path / "runs.db"
    writer = StoreWriter(path)
    writer.insert_flow(_flow("f1"))
    writer.flush()
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    writer.close()
    assert modes == {"runs.db": 0o600, "runs.db-wal": 0o600, "runs.db-shm": 0o600}


def test_an_existing_store_keeps_its_mode(tmp_path):
    path = tmp_path / "runs.db"
    Store(path).close()
    path.chmod(0o640)  # the owner chose to share it with the group
    Store(path).close()
    assert path.stat().st_mode & 0o777 == 0o640


def test_the_log_a_long_reader_let_grow_is_cut_back_once_it_is_done(tmp_path):
    from rollouttap.store.db import WAL_SIZE_LIMIT
    path, wal = tmp_path / "s.db", tmp_path / "s.db-wal"
    writer = connect(path)
    writer.execute("CREATE TABLE filler (b BLOB)")
    reader = sqlite3.connect(path)  # a notebook's connection left inside a read transaction
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM agents").fetchall()
    chunk = WAL_SIZE_LIMIT // 16
    for _ in range(20):
        writer.execute("INSERT INTO filler VALUES (?)", (os.urandom(chunk),))
    assert wal.stat().st_size > WAL_SIZE_LIMIT  # no checkpoint can reset the log past the reader's snapshot
    reader.execute("COMMIT")
    reader.close()
    for _ in range(2):
        writer.execute("INSERT INTO filler VALUES (?)", (os.urandom(chunk),))
    assert wal.stat().st_size <= WAL_SIZE_LIMIT
    writer.close()


@pytest.mark.parametrize("readonly", [False, True])
def test_a_directory_is_no_store(tmp_path, readonly):
    with pytest.raises(StoreError, match="is a directory: give a file path in it"):
        Store(tmp_path, readonly=readonly)


def test_a_full_disk_raises_its_own_error_and_the_connection_stays_usable(tmp_path):
    conn = sqlite3.connect(tmp_path / "full.db", isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE t (b BLOB)")
    conn.execute("PRAGMA cache_size = 10")  # spilled pages hit the limit mid-transaction: SQLite rolls back itself
    conn.execute(f"PRAGMA max_page_count = {conn.execute('PRAGMA page_count').fetchone()[0] + 50}")
    with pytest.raises(sqlite3.OperationalError, match="full"):
        with transaction(conn):
            for _ in range(200):
                conn.execute("INSERT INTO t VALUES (?)", (os.urandom(4000),))
    with transaction(conn):  # space again: the next transaction begins and commits
        conn.execute("INSERT INTO t VALUES (x'00')")
    assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 1


def test_a_store_that_cannot_be_created_is_a_store_error_naming_it(tmp_path):
    (tmp_path / "a-file").write_text("")
    for path in (tmp_path / "a-file" / "runs.db", tmp_path / "a-file" / "sub" / "runs.db"):
        with pytest.raises(StoreError, match=f"cannot create store {path}: "):
            Store(path)
        with pytest.raises(StoreError, match="cannot create store"):
            StoreWriter(path)


def test_an_older_store_gets_the_live_agents_index_and_stays_readable_read_only(tmp_path):
    path = tmp_path / "runs.db"
    with Store(path) as store:
        store.register_agent("a1")
    old = sqlite3.connect(path)  # as a store written before the index existed
    old.execute("DROP INDEX agents_live")
    old.close()
    with Store(path, readonly=True) as store:  # the same schema version: no writable open needed
        assert [a.agent_id for a in store.live_agents()] == ["a1"]
    Store(path).close()
    check = sqlite3.connect(path)
    assert check.execute("SELECT name FROM sqlite_master WHERE name = 'agents_live'").fetchall() == [("agents_live",)]
    assert check.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
    check.close()


def test_an_older_store_opens_while_another_process_writes(tmp_path):
    path = tmp_path / "runs.db"
    Store(path).close()
    old = sqlite3.connect(path)  # a store written before the live-agents index existed
    old.execute("DROP INDEX agents_live")
    old.close()
    hold = ("import sqlite3, sys\nc = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "c.execute('BEGIN IMMEDIATE')\nprint('held', flush=True)\nsys.stdin.read()\n")
    # A write transaction under way in another process (the proxy's writer, another manager).
    writer = subprocess.Popen([sys.executable, "-c", hold, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert writer.stdout.readline() == "held\n"
        started = time.monotonic()
        with Store(path) as store:  # the index waits for a later open: it is only a speed-up
            assert store.live_agents() == []
        assert time.monotonic() - started < 5  # the busy timeout is 10 s
    finally:
        writer.communicate("", timeout=30)
    Store(path).close()
    check = sqlite3.connect(path)
    assert check.execute("SELECT count(*) FROM sqlite_master WHERE name = 'agents_live'").fetchone()[0] == 1
    check.close()


def test_an_agent_write_waits_out_a_lock_held_past_the_busy_timeout(tmp_path):
    path = tmp_path / "runs.db"
    hold = ("import sqlite3, sys, time\nc = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "c.execute('BEGIN IMMEDIATE')\nprint('held', flush=True)\ntime.sleep(1.0)\nc.execute('ROLLBACK')\n")
    with Store(path) as store:
        store._conn.execute("PRAGMA busy_timeout = 100")  # stands for the 10 s a longer lock outlasts
        writer = subprocess.Popen([sys.executable, "-c", hold, str(path)], stdout=subprocess.PIPE, text=True)
        assert writer.stdout.readline() == "held\n"
        store.register_agent("a1")  # waits for the other writer
        writer.wait(30)
        assert [a.agent_id for a in store.agents()] == ["a1"]
        store.locked_write_wait_s = 0.0  # a lock that outlasts the wait: a clear error
        writer = subprocess.Popen([sys.executable, "-c", hold, str(path)], stdout=subprocess.PIPE, text=True)
        assert writer.stdout.readline() == "held\n"
        with pytest.raises(StoreError, match="locked"):
            store.register_agent("a2")
        writer.wait(30)


def test_a_writable_open_that_must_not_create_refuses_a_missing_file(tmp_path):
    with pytest.raises(StoreError, match="no store at"):
        Store(tmp_path / "typo.db", create=False)
    assert not (tmp_path / "typo.db").exists()
    Store(tmp_path / "runs.db").close()
    with Store(tmp_path / "runs.db", create=False) as store:  # an existing one opens as usual, writable
        store.register_agent("a1")


def test_readonly_open_of_missing_file_fails(tmp_path):
    with pytest.raises(StoreError):
        Store(tmp_path / "missing.db", readonly=True)


@pytest.mark.parametrize("folder", ["hash#1", "q?x", "pct%41", "with space"])
def test_readonly_open_of_a_path_with_uri_characters(tmp_path, monkeypatch, folder):
    monkeypatch.chdir(tmp_path)  # a misread URI would create its stray file here
    path = tmp_path / folder / "runs.db"
    with Store(path) as store:
        store.register_agent("a1")
    with Store(path, readonly=True) as store:
        assert [a.agent_id for a in store.agents()] == ["a1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder]


READ_ON_A_READONLY_MOUNT = """
import sys
from rollouttap.errors import StoreError
from rollouttap.store import Store
try:
    with Store(sys.argv[1], readonly=True) as store:
        print("agents", *[a.agent_id for a in store.agents()])
except StoreError as exc:
    print("error", exc)
"""


def _read_on_a_readonly_mount(folder, tmp_path) -> str:
    """The store in ``folder`` read through a read-only bind mount of it, in a mount namespace of its own."""
    if os.geteuid() != 0 or subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs root and mount namespaces (unshare -m) for a read-only mount")
    mnt = tmp_path / "ro"
    mnt.mkdir()
    script = tmp_path / "read.py"
    script.write_text(READ_ON_A_READONLY_MOUNT)
    shell = 'mount --bind -o ro "$1" "$2" && exec "$3" "$4" "$2/runs.db"'
    proc = subprocess.run(["unshare", "-m", "sh", "-c", shell, "sh", str(folder), str(mnt), sys.executable,
                           str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_readonly_open_on_a_readonly_filesystem(tmp_path):
    folder = tmp_path / "runs"
    with Store(folder / "runs.db") as store:
        store.register_agent("a1")
    assert not (folder / "runs.db-wal").exists()  # a clean close leaves every commit in the main file
    assert _read_on_a_readonly_mount(folder, tmp_path) == "agents a1"


def test_readonly_filesystem_with_a_live_writer_reads_its_log(tmp_path):
    folder = tmp_path / "runs"
    with Store(folder / "runs.db") as store, Store(folder / "runs.db") as writing:
        store.register_agent("a1")
        writing.register_agent("a2")  # in the -wal file, which immutable reading would miss
        assert _read_on_a_readonly_mount(folder, tmp_path) == "agents a1 a2"


def test_readonly_filesystem_with_a_log_but_no_shm_file_is_a_clear_error(tmp_path):
    folder, copy = tmp_path / "runs", tmp_path / "copy"
    copy.mkdir()
    with Store(folder / "runs.db") as store:
        store.register_agent("a1")
        for name in ("runs.db", "runs.db-wal"):  # copied while in use, without the -shm file
            (copy / name).write_bytes((folder / name).read_bytes())
    out = _read_on_a_readonly_mount(copy, tmp_path)
    assert out.startswith("error") and "copy the store and its -wal file" in out


def _flow(flow_id: str, agent: str | None = "a1", **extra):
    cols = {"flow_id": flow_id, "agent_id": agent, "attribution": "pid" if agent else "none",
            "method": "POST", "host": "127.0.0.1", "path": "/v1/chat/completions",
            "request_headers": [["Content-Type", "application/json"]], "t_request": time.time()}
    cols.update(extra)
    return cols


def test_counting_recent_unattributed_flows_reads_only_recent_ones(tmp_path):
    path = tmp_path / "s.db"
    writer = StoreWriter(path)
    now = time.time()
    for i in range(30):  # unattributed long ago, then a few recent ones of two proxies
        writer.insert_flow(_flow(f"old{i}", agent=None, t_request=now - 3600 + i))
    for i in range(6):
        writer.insert_flow(_flow(f"new{i}", agent=None if i % 3 else "a1", t_request=now + i, proxy_id=f"p{i % 2}"))
    writer.close()
    with Store(path) as store:
        assert store.count_flows(unattributed=True) == 34
        assert store.count_flows(unattributed=True, since=now) == 4 == len(store.flows(unattributed=True, since=now))
        assert store.count_flows(unattributed=True, since=now, until=now + 3, proxy_ids=["p1"]) == 1
        from rollouttap.store.reader import _flow_filter  # the query count_flows runs, as the planner sees it
        where, params = _flow_filter(since=now, unattributed=True)
        plan = " ".join(r[3] for r in store._query(f"EXPLAIN QUERY PLAN SELECT count(*) FROM flows{where}", params))
    assert "flows_time" in plan


def test_reader_sees_open_then_done(tmp_path):
    path = tmp_path / "s.db"
    writer = StoreWriter(path)
    store = Store(path)
    writer.insert_flow(_flow("f1"))
    assert writer.flush()
    assert store.open_flow_count("a1") == 1
    assert store.flows(agent_id="a1")[0].state == "open"
    writer.update_flow("f1", {"state": "done", "status_code": 200, "response_body": b'{"ok":1}',
                              "response_headers": [["content-type", "application/json"]]})
    writer.close()
    flow = store.flows(agent_id="a1")[0]
    assert (flow.state, flow.status_code, flow.response_json()) == ("done", 200, {"ok": 1})
    assert store.open_flow_count("a1") == 0


def test_writer_keeps_order_and_batches(tmp_path):
    path = tmp_path / "s.db"
    writer = StoreWriter(path)
    for i in range(2000):
        writer.insert_flow(_flow(f"f{i}", agent=f"a{i % 3}"))
    writer.close()
    assert writer.stats.committed == 2000 and writer.stats.failed == 0
    assert writer.stats.batches < 2000  # batched, not one commit per row
    ids = [f.flow_id for f in Store(path).flows(agent_id="a1")]
    assert ids == [f"f{i}" for i in range(2000) if i % 3 == 1]


def test_writer_rejects_unknown_columns(tmp_path):
    writer = StoreWriter(tmp_path / "s.db")
    with pytest.raises(ValueError, match="unknown flow columns"):
        writer.insert_flow({"flow_id": "x", "attribution": "none", "bogus": 1})
    writer.close()


def test_writer_waits_out_a_lock_held_by_another_process(tmp_path):
    path = tmp_path / "s.db"
    Store(path).close()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sqlite3,sys,time\n"
        f"c=sqlite3.connect({str(path)!r}, isolation_level=None)\n"
        "c.execute('BEGIN IMMEDIATE'); print('locked', flush=True); sys.stdin.readline()\n"
        "c.execute('COMMIT')\n")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    writer = StoreWriter(path)
    writer.insert_flow(_flow("held"))
    assert not writer.flush(timeout=0.3)  # cannot commit while the other process holds the lock
    holder.stdin.write("\n")
    holder.stdin.flush()
    holder.wait(10)
    assert writer.flush(timeout=15)
    writer.close()
    assert Store(path).flow("held") is not None


def test_agents_registration_and_end(tmp_path):
    store = Store(tmp_path / "s.db")
    token = new_token()
    store.register_agent("a1", token=token, run_id="r1", meta={"prompt": "hi"})
    store.agent_started("a1", os.getpid())
    store.agent_ended("a1", "ok", meta={"exit_code": 0})
    agent = store.agent("a1")
    assert agent.status == "ok" and agent.root_pid == os.getpid() and agent.run_id == "r1"
    assert agent.root_create_time is not None
    assert agent.meta == {"prompt": "hi", "exit_code": 0}
    assert token not in agent.token_hash and token_matches(token, agent.token_hash)
    assert not token_matches(token + "x", agent.token_hash)
    assert [a.agent_id for a in store.agents(run_id="r1")] == ["a1"]
    with pytest.raises(ValueError):
        store.agent_ended("a1", "bogus")


def test_an_agents_processes_end_before_its_status_and_keep_their_time(tmp_path):
    store = Store(tmp_path / "s.db")
    store.register_agent("a1", token=new_token())
    store.agent_started("a1", os.getpid())
    store.agent_exited("a1", at=123.0)
    exited = store.agent("a1")
    assert exited.status == "running" and exited.ended_at is not None  # its result is being built
    assert [a.agent_id for a in store.live_agents()] == ["a1"]
    store.agent_exited("a1")  # a second call keeps the first time
    store.agent_ended("a1", "ok")
    assert store.agent("a1").ended_at == exited.ended_at == 123.0 and store.agent("a1").status == "ok"
    store.register_agent("a2", token=new_token())
    store.agent_ended("a2", "error")  # never started: its end is when it is recorded
    assert store.agent("a2").ended_at is not None


def test_flow_counts_and_unattributed(tmp_path):
    path = tmp_path / "s.db"
    writer = StoreWriter(path)
    writer.insert_flow(_flow("f1"))
    writer.insert_flow(_flow("f2", agent=None))
    writer.update_flow("f2", {"state": "error", "error": "boom"})
    writer.close()
    counts = Store(path).flow_counts()
    assert counts == {"open": 1, "done": 0, "error": 1, "total": 2, "unattributed": 1}
    assert [f.flow_id for f in Store(path).flows(unattributed=True)] == ["f2"]


def test_flows_are_read_a_page_at_a_time_or_listed_without_their_bodies(tmp_path):
    path = tmp_path / "s.db"
    writer = StoreWriter(path)
    for i in range(7):
        writer.insert_flow(_flow(f"f{i}", agent="a1" if i % 2 else "a2", request_body=b"x" * i,
                                 t_request=100.0 - i))
    writer.update_flow("f3", {"response_body": b"answer", "state": "done"})
    writer.close()
    with Store(path) as store:
        everything = store.flows()
        assert list(store.iter_flows(batch=2)) == everything  # pages of 2, the last one short
        assert list(store.iter_flows(batch=3, agent_id="a1")) == store.flows(agent_id="a1")
        assert list(store.iter_flows(batch=7)) == everything and list(store.iter_flows(agent_id="x")) == []
        assert store.flow_times(agent_id="a1") == [(f.id, f.t_request) for f in store.flows(agent_id="a1")]
        assert store.flow_at(everything[3].id) == everything[3] and store.flow_at(10_000) is None
        listed = store.flow_listing(limit=5)
        assert [(f.flow_id, req, resp) for f, req, resp in listed] == [
            (f.flow_id, len(f.request_body or b""), len(f.response_body or b"")) for f in everything[:5]]
        assert all(f.request_body is None and f.response_body is None for f, _, _ in listed)
        assert listed[3][0] == replace(everything[3], request_body=None, response_body=None)


def test_prune_deletes_agents_that_ended_before_the_cutoff_whole_and_never_a_running_agents_flows(tmp_path):
    path = tmp_path / "s.db"
    with Store(path) as store:
        for agent_id in ("ended", "live", "straddling"):
            store.register_agent(agent_id, token=new_token())
        store.agent_exited("ended", at=150.0)
        store.agent_ended("ended", "ok")
        store.agent_exited("straddling", at=450.0)  # ran across the cutoff: kept whole
        store.agent_ended("straddling", "ok")
    writer = StoreWriter(path)
    for i in range(7):
        writer.insert_flow(_flow(f"old{i}", agent="ended", t_request=100.0 + i, state="done"))
    writer.insert_flow(_flow("old-open", agent=None, t_request=100.0))  # still in flight: kept
    writer.insert_flow(_flow("old-stray", agent=None, t_request=100.0, state="error"))
    writer.insert_flow(_flow("old-tagged", agent="tag-only", t_request=100.0, state="done"))  # no agent row
    writer.insert_flow(_flow("new-tagged", agent="tag-only", t_request=300.0, state="done"))
    writer.insert_flow(_flow("old-live", agent="live", t_request=100.0, state="done"))  # its agent runs: kept
    writer.insert_flow(_flow("early", agent="straddling", t_request=100.0, state="done"))
    writer.insert_flow(_flow("late", agent="straddling", t_request=400.0, state="done"))
    writer.close()
    with Store(path) as store:
        assert store.prune(200.0, batch=3) == (9, 1)  # 7 + the stray + old-tagged; "ended" left with none
        assert {f.flow_id for f in store.flows()} == {"old-open", "new-tagged", "old-live", "early", "late"}
        assert store.agent("ended") is None and store.agent("straddling") and store.agent("live")
        assert store.prune(200.0) == (0, 0)
        assert store.prune(500.0) == (3, 1)  # now the straddling agent ended before: all of it
        assert {f.flow_id for f in store.flows()} == {"old-open", "old-live"}


def test_a_pruned_store_reuses_its_space(tmp_path):
    path = tmp_path / "s.db"
    body = os.urandom(50_000)

    def write(prefix: str, t: float) -> None:
        writer = StoreWriter(path)
        for i in range(60):
            writer.insert_flow(_flow(f"{prefix}{i}", agent=None, t_request=t, state="done", response_body=body))
        writer.close()
    write("a", 100.0)
    size = path.stat().st_size
    with Store(path) as store:
        assert store.prune(200.0) == (60, 0)
    write("b", 300.0)
    assert path.stat().st_size < size * 1.1  # the new flows went into the pages the old ones left


def test_flows_of_dead_proxy_are_closed(tmp_path):
    path = tmp_path / "s.db"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    writer = StoreWriter(path)
    writer.upsert_proxy({"proxy_id": "p1", "pid": dead.pid, "create_time": 1.0, "started_at": 1.0})
    writer.insert_flow(_flow("f1", proxy_id="p1"))
    writer.close()
    store = Store(path)
    assert store.close_flows_of_dead_proxies() == 1
    flow = store.flow("f1")
    assert flow.state == "error" and "proxy process ended" in flow.error


def test_a_proxy_row_keeps_its_start_when_rewritten(tmp_path):
    writer = StoreWriter(tmp_path / "s.db")
    writer.upsert_proxy({"proxy_id": "p1", "pid": 7, "started_at": 1.0, "stopped_at": None})
    writer.upsert_proxy({"proxy_id": "p1", "pid": 7, "started_at": 5.0, "stopped_at": 5.0})
    writer.flush()
    row = Store(tmp_path / "s.db").proxy("p1")
    assert (row["started_at"], row["stopped_at"]) == (1.0, 5.0)
    writer.upsert_proxy({"proxy_id": "p1", "pid": 8, "started_at": 9.0, "stopped_at": None})  # announced again
    writer.close()
    row = Store(tmp_path / "s.db").proxy("p1")
    assert (row["started_at"], row["stopped_at"]) == (9.0, None)


@pytest.mark.parametrize("value, expected_prefix", [
    ("Bearer sk-secret-123", "Bearer <redacted sha256:"),
    ("Basic dXNlcjpwYXNz", "Basic <redacted sha256:"),
    ("sk-raw-key", "<redacted sha256:"),
])
def test_redact_value_keeps_scheme_hides_secret(value, expected_prefix):
    out = redact_value(value)
    assert out.startswith(expected_prefix)
    assert value.split()[-1] not in out
    assert redact_value(value) == out  # stable fingerprint


def test_redact_headers_only_secret_ones():
    headers = [("Authorization", "Bearer k1"), ("X-Api-Key", "k2"), ("api-key", "k3"),
               ("Cookie", "s=1"), ("Set-Cookie", "s=2"), ("Proxy-Authorization", "Basic eA=="),
               ("x-goog-api-key", "k4"), ("X-Auth-Token", "k5"), ("x-amz-security-token", "k6"),
               ("Content-Type", "application/json")]
    out = dict(redact_headers(headers))
    assert out["Content-Type"] == "application/json"
    for key in ("Authorization", "X-Api-Key", "api-key", "Cookie", "Set-Cookie", "Proxy-Authorization",
                "x-goog-api-key", "X-Auth-Token", "x-amz-security-token"):
        assert "redacted" in out[key]
    assert out["Authorization"] != dict(redact_headers([("Authorization", "Bearer k9")]))["Authorization"]


@pytest.mark.parametrize("value, kept, hidden", [
    # OpenAI's Realtime API from a browser; Kubernetes' exec over WebSocket: a key in the subprotocol list
    ("realtime, openai-insecure-api-key.sk-proj-a1b2c3, openai-beta.realtime-v1",
     "realtime, openai-insecure-api-key.<redacted sha256:", "sk-proj-a1b2c3"),
    ("base64url.bearer.authorization.k8s.io.ZXlKaGJH, base64.channel.k8s.io", "base64url.bearer.", "ZXlKaGJH"),
    ("chat, superchat", "chat, superchat", None),
    ("openai-insecure-api-key", "openai-insecure-api-key", None),  # a name alone carries nothing
    ("token, dg-Key-9f8e7d", "token, <redacted sha256:", "dg-Key-9f8e7d"),  # Deepgram's: the key as the next item
    ("access_token, eyJhbGciOi.eyJzdWIi.c2ln", "access_token, <redacted sha256:", "eyJhbGciOi"),
])
def test_redact_headers_hides_credentials_in_websocket_subprotocols(value, kept, hidden):
    (_, out), = redact_headers([("Sec-WebSocket-Protocol", value)])
    assert out.startswith(kept) and (hidden is None or hidden not in out) and (out == value) == (hidden is None)
    assert out.endswith(", base64.channel.k8s.io") or "k8s" not in value  # the list's other items stay
    assert redact_headers([("Sec-WebSocket-Protocol", out)]) == [("Sec-WebSocket-Protocol", out)]  # stored, it stays


def test_redacting_a_long_subprotocol_list_takes_linear_time():
    # Every dotted prefix of an item was joined and checked: 40 KB took two minutes on the proxy's event loop.
    value = "a." * 50_000 + "openai-insecure-api-key.sk-tail9"
    (_, out), = redact_headers([("Sec-WebSocket-Protocol", value)])
    assert "sk-tail9" not in out and out.startswith("a.a.a.")


@pytest.mark.parametrize("name, value, hidden", [
    ("Referer", "http://h/cb?state=1&access_token=AT1", "AT1"),
    ("Location", "https://h/next?state=1&client_secret=CS2#f", "CS2"),
    ("Location", "https://app.example/cb?code=AC1x2&state=st9", "AC1x2"),  # an OAuth redirect: state stays
    ("Location", "https://app.example/cb#code=AC3y4", "AC3y4"),
    ("Content-Location", "/x?api_key=AK3", "AK3"),
    ("Link", '<https://a/x?page_token=PT4&per=2>; rel="next", <https://a/x?page=1>; rel="prev"', "PT4"),
    ("Refresh", "5; url=/x?key=K5", "K5"),
    ("Refresh", "0;url=https://x/cb?access_token=K6", "K6"),
    ("Location", "https://x/cb;v=1?access_token=K7", "K7"),
    ("Location", "https://x/cb?next=/a?token=K8", "K8"),
    ("Location", "https://x/cb#access_token=K9", "K9"),  # an OAuth implicit-flow redirect
    ("Referer", "https://bob:PW10@h.example/x?y=1", "PW10"),  # a URL's own password
    ("Referer", "http://127.0.0.1:9/agents/ag-1/Ab3_dEf-GhIjKlMnOpQrStUv/v1/chat", "Ab3_dEf-GhIjKlMnOpQrStUv"),
    ("X-Forwarded-Url", "http://h/agents/ag-1/Ab3_dEf-GhIjKlMnOpQrStUv", "Ab3_dEf-GhIjKlMnOpQrStUv"),
    ("Location", "http://u:p%40ss@h/", "p%40ss"),
    # Any header may carry a URL (a gateway's original URL) or parameters.
    ("X-Original-URL", "/v1/chat?api_key=OU11", "OU11"),
    ("X-Forwarded-Uri", "/v1/chat?alt=sse&key=FU12", "FU12"),
    ("X-Custom", "mode=a; token=CT13", "CT13"),
    ("X-Custom", 'mode=a; token="CT 14"', '"CT 14"'),  # a quoted string, blanks and all
    ("Forwarded", 'for=192.0.2.1;secret="S15"', '"S15"'),
    ("X-Custom", "token=CT16", "CT16"), ("X-Custom", "mode=a, token=CT17", "CT17"),  # first, or a list's item
    ("Location", "https://app/cb?scope=a,b&access_token=K18,x", "K18,x"),  # a URL's value may hold commas
    ("X-Original-URL", "/cb?x=1;code=OC19", "OC19"),  # an OAuth code in a URL, parameters parted at ;
    ("X-Original-URL", "/cb#x=1;code=OC20", "OC20"),  # ... or in its fragment
])
def test_secret_query_values_in_url_valued_headers_are_redacted(name, value, hidden):
    [(_, out)] = redact_headers([(name, value)])
    assert out == value.replace(hidden, redacted_query_value(hidden))  # the rest of the value as it was


@pytest.mark.parametrize("name, value", [
    ("Content-Type", "multipart/form-data; boundary=----x123"), ("Accept", "text/html;q=0.9,*/*;q=0.8"),
    ("Content-Disposition", 'attachment; filename="a.txt"'), ("X-Forwarded-Uri", "/v1/chat?alt=sse&n=2"),
    ("X-Error", "quota; code=429"), ("X-Status", "code=429, retry=2"),  # "code" is an OAuth code in URLs only
])
def test_header_parameters_that_name_no_secret_stay(name, value):
    assert redact_headers([(name, value)]) == [(name, value)]


@pytest.mark.parametrize("argv, secrets", [
    (["curl", "-H", "Authorization: Bearer ZZSEC600", "http://x/"], ["ZZSEC600"]),
    (["sh", "-c", "OPENAI_API_KEY=sk-abcdef python agent.py --api-key K12345 '{prompt}'"], ["sk-abcdef", "K12345"]),
    (["python", "a.py", "--token=TTT1TT", "--url", "https://u:PW99PW@h/x?key=QK1QK1&a=1"],
     ["TTT1TT", "PW99PW", "QK1QK1"]),
    (["python", "a.py", "--header=X-Api-Key: AK77AK", "{prompt}"], ["AK77AK"]),
    (["python", "examples/openai_agent.py", "{prompt}"], []),
    (["x", "--max-tokens", "100", "--key-file", "k.pem", "--model", "policy"], []),
    (["sh", "-c", "echo 'unbalanced"], []),
    (["sh", "-c", "export OPENAI_API_KEY=sk-abc123; python a.py"], ["sk-abc123"]),
    (["sh", "-c", "export API_KEY=wJal+bPx#RfiCY:EX@AMPLE; curl -u alice:hunter2pass http://h/"],
     ["wJal+bPx#RfiCY:EX@AMPLE", "hunter2pass"]),  # whole, though + # : @ are in them
    (["curl", "-u", "user:pw-9f3k2", "http://x/"], ["pw-9f3k2"]),
    (["curl", "--user=user:pw-7h2k9", "--proxy-user=p:pxy-4k2j8", "http://x/"], ["pw-7h2k9", "pxy-4k2j8"]),
    (["python", "a.py", "--pass-through", "{prompt}"], []),  # a placeholder is no secret
    (["python", "a.py", "--callback", "https://app/cb?code=AC77AC&state=st9"], ["AC77AC"]),
    (["python", "a.py", "--code", "print(1234567)"], []),  # a program, not an OAuth code
    (["git", "clone", "https://ghp_A1b2C3d4E5f6G7h8I9j0K1l2@github.com/o/r"], ["ghp_A1b2C3d4E5f6G7h8I9j0K1l2"]),
    (["git", "clone", "https://x-access-token@github.com/o/r"], []),  # a short name is a name
    (["tool", "https://h/?repo=https://ghp_B1b2C3d4E5f6G7h8I9j0K1l2@github.com/o"], ["ghp_B1b2C3d4E5f6G7h8I9j0K1l2"]),
    (["tool", "https://h/?r=https%3A%2F%2Fghp_C1b2C3d4E5f6G7h8I9j0K1l2%40github.com"], ["ghp_C1b2C3d4E5f6G7h8I9j0K1l2"]),
    (["tool", "https://alice12@host/?next=https://ghp_D1b2C3d4E5f6G7h8I9j0K1l2@github.com/o"],
     ["ghp_D1b2C3d4E5f6G7h8I9j0K1l2"]),  # the token, not the outer URL's short user
    (["curl", "http://[abc@x/", "-H", "Authorization: Bearer sk-v6zzz"], ["sk-v6zzz"]),  # urllib cannot split it
])
def test_redact_command_hides_the_credentials_a_command_line_carries(argv, secrets):
    from rollouttap.store.redact import redact_command
    command = shlex.join(argv)
    out = redact_command(command)
    assert not [s for s in secrets if s in out] and out.count("<redacted sha256:") == len(secrets)
    assert out.replace("; python", "") != out or "; python" not in command  # shell punctuation is kept
    assert (out == command) == (not secrets)
    assert shlex.split(out)[0] == argv[0]


def test_token_hash_is_not_the_token():
    token = new_token()
    assert hash_token(token) != token and token not in hash_token(token)


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "br", "zstd", None])
def test_decode_body(encoding):
    import gzip
    import zlib

    import brotli
    import zstandard
    raw = b'{"hello": "world"}' * 10
    encoded = {"gzip": gzip.compress, "deflate": zlib.compress, "br": brotli.compress,
               "zstd": zstandard.ZstdCompressor().compress, None: lambda b: b}[encoding](raw)
    assert decode_body(encoded, encoding) == raw


def test_writer_watermark_tells_readers_what_is_committed(tmp_path):
    path = tmp_path / "s.db"
    writer = StoreWriter(path, heartbeat=0.05)
    writer.upsert_proxy({"proxy_id": "p1", "pid": os.getpid(), "create_time": None, "started_at": 1.0})
    writer.proxy_id = "p1"
    assert writer.flush()  # the proxy row exists before anything is waited for
    store = Store(path)
    writer.insert_flow(_flow("w1"))
    queued_before = time.time()
    assert store.wait_committed(queued_before, timeout=10) == []
    assert store.flow("w1") is not None  # committed by the time the watermark passed
    writer.close()
    # a live proxy that never writes again holds readers back only up to the timeout
    assert store.wait_committed(time.time() + 60, timeout=0.1)


def test_the_watermark_waits_for_a_request_not_queued_yet_and_never_goes_past_its_batch(tmp_path):
    path = tmp_path / "s.db"
    writer = StoreWriter(path, heartbeat=60)
    writer.upsert_proxy({"proxy_id": "p1", "pid": os.getpid(), "create_time": None, "started_at": 1.0})
    writer.proxy_id = "p1"
    assert writer.flush()
    with Store(path) as store:
        def mark() -> float:
            writer.nudge()
            assert writer.flush()
            return store.proxies()[0]["committed_through"]
        writer.unqueued_since = arrived = time.time()  # a request whose row is not queued yet
        assert mark() == arrived
        # One that arrived after the batch's own mark (while it was written, or retried on a locked store): the
        # batch proves nothing past its mark, so the hold must not raise it.
        writer.unqueued_since = time.time() + 3600
        before = time.time()
        assert before - 1 < mark() <= time.time()
        writer.unqueued_since = None
        assert store.wait_committed(time.time(), timeout=10) == []
    writer.close()


def test_a_request_held_when_a_batch_took_its_mark_keeps_it_below_its_arrival(tmp_path):
    # The request is queued, and its hold let go, while the batch is written (the store locked by another process):
    # the batch's mark was taken while it was held, and covers nothing past its arrival, though none is held now.
    path = tmp_path / "s.db"
    writer = StoreWriter(path, heartbeat=60, linger=0.2)
    writer.upsert_proxy({"proxy_id": "p1", "pid": os.getpid(), "create_time": None, "started_at": 1.0})
    writer.proxy_id = "p1"
    assert writer.flush()
    locker = sqlite3.connect(path, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")
    writer.unqueued_since = arrived = time.time()  # held: its sender is being looked up
    writer.insert_flow(_flow("other"))
    time.sleep(0.5)  # the batch of "other" took its mark and waits for the lock
    writer.insert_flow(_flow("held"))
    writer.unqueued_since = None
    locker.execute("ROLLBACK")
    locker.close()
    deadline, seen = time.monotonic() + 10, []
    with Store(path) as store:
        while time.monotonic() < deadline:
            mark = store.proxies()[0]["committed_through"] or 0.0
            committed = store.flow("held") is not None
            seen.append((mark, committed))
            if committed:
                break
    assert seen[-1][1] and all(committed or mark <= arrived for mark, committed in seen), seen
    writer.close()


def test_watermark_follows_a_write_without_waiting_for_the_heartbeat(tmp_path):
    # The manager waits for "committed through the moment the agent ended", a moment after the agent's
    # last row: the writer marks that soon after its last rows, not one heartbeat (here 60 s) later.
    path = tmp_path / "s.db"
    writer = StoreWriter(path, heartbeat=60)
    writer.upsert_proxy({"proxy_id": "p1", "pid": os.getpid(), "create_time": None, "started_at": 1.0})
    writer.proxy_id = "p1"
    with Store(path) as store:
        for name, exit_after in (("a", 0.0), ("b", 0.0), ("c", 0.05)):
            writer.insert_flow(_flow(name))
            assert writer.flush()
            time.sleep(exit_after)  # the scenario, not a synchronisation: the agent exits a little later
            agent_ended = time.time()
            assert store.wait_committed(agent_ended, timeout=10) == []
    writer.close()


def _proxy_row(path, proxy_id: str, pid: int, create_time: float | None) -> None:
    Store(path).close()  # creates the schema
    with sqlite3.connect(path) as conn:
        conn.execute("INSERT INTO proxies (proxy_id, pid, create_time, started_at) VALUES (?, ?, ?, 1)",
                     (proxy_id, pid, create_time))


def test_a_nudge_marks_what_was_queued_before_it(tmp_path):
    # No rows through this writer (a commit of rows would mark by itself) and a 60 s heartbeat: without
    # the nudge no watermark for a minute; a flush alone writes none.
    path = tmp_path / "s.db"
    _proxy_row(path, "p1", os.getpid(), None)
    writer = StoreWriter(path, heartbeat=60)
    writer.proxy_id = "p1"
    before = time.time()
    writer.nudge()
    assert writer.flush()
    with Store(path) as store:
        assert store.proxy("p1")["committed_through"] >= before
    writer.close()


@pytest.mark.parametrize("nudges, queue_empty, expected", [
    ([], True, 5.0),  # nothing behind the batch: all queued before now is in it or earlier
    ([1.0], True, 5.0),
    ([1.0, 3.0], False, 3.0),  # events wait behind it: only what came before its latest nudge
    ([], False, None),  # events wait behind it and no nudge: it proves no moment
])
def test_batch_mark(nudges, queue_empty, expected):
    assert batch_mark(nudges, queue_empty, 5.0) == expected


def test_a_bad_event_does_not_lose_the_nudges_mark(tmp_path):
    path = tmp_path / "s.db"
    _proxy_row(path, "p1", os.getpid(), None)
    writer = StoreWriter(path, heartbeat=60)
    writer.proxy_id = "p1"
    writer.insert_flow(_flow("ok1"))
    writer.update_flow("ok1", {"meta": {"x": object()}})  # cannot be encoded: dropped alone
    before = time.time()
    writer.nudge()
    assert writer.flush()
    with Store(path) as store:
        assert store.flow("ok1") is not None
        assert store.proxy("p1")["committed_through"] >= before
    assert writer.stats.failed == 1
    writer.close()


def _writer_with_length_limit(path, limit: int) -> StoreWriter:
    """A writer whose connection refuses values over ``limit`` bytes (SQLite's own limit is 1e9: a download kept
    whole reaches it), as SQLITE_TOOBIG."""
    writer = StoreWriter(path, heartbeat=60)
    writer._conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, limit)
    return writer


def _flow_written(writer: StoreWriter, path, flow_id: str):
    """The row of ``flow_id`` once everything queued is committed, nothing left unwritten; the writer closed."""
    assert writer.flush()
    with Store(path) as store:
        flow = store.flow(flow_id)
    assert writer.unwritten == 0
    writer.close()
    return flow


@pytest.mark.parametrize("answer_size, meta_in_event, apart", [(60_000, True, False), (60_000, False, False),
                                                                (100, True, False), (100, True, True)])
def test_a_body_over_sqlites_length_limit_keeps_its_first_part_and_the_flow_still_ends(tmp_path, answer_size,
                                                                                      meta_in_event, apart):
    path = tmp_path / "s.db"
    writer = _writer_with_length_limit(path, 40_000)
    writer.insert_flow(_flow("big", meta={"model_host": True}, request_body=b"q" * 50_000))
    if apart:  # the end comes in a later transaction than the cut
        assert writer.flush()
    end = {"state": "done", "status_code": 200, "t_end": time.time(), "response_body": b"r" * answer_size}
    # The addon's end writes the flow's whole meta (its own notes, e.g. of a body it kept only part of).
    writer.update_flow("big", {**end, "meta": {"body_cut": {"size": 90_000, "kept": answer_size}}} if meta_in_event
                       else end)
    writer.insert_flow(_flow("small"))
    assert writer.flush()
    with Store(path) as store:
        big = store.flow("big")
        assert (big.state, big.status_code, big.t_end) == ("done", 200, end["t_end"])
        assert big.request_body == b"q" * 10_000 and big.response_body == b"r" * min(answer_size, 10_000)
        assert big.meta["request_body_cut"] == {"size": 50_000, "kept": 10_000, "store_limit": 40_000}
        cut_answer = {"size": 90_000 if meta_in_event else 60_000, "kept": 10_000, "store_limit": 40_000}
        assert big.meta["body_cut"] == (cut_answer if answer_size > 10_000 else {"size": 90_000, "kept": 100})
        assert big.meta.get("model_host") is (None if meta_in_event else True)  # the row's meta, or the event's
        assert store.flow("small") is not None
    assert writer.unwritten == 0 and writer.stats.failed == 0
    writer.close()


@pytest.mark.parametrize("answer_size", [9_000, 15_000])
def test_an_answer_with_no_room_left_by_the_stored_upload_still_ends_its_flow(tmp_path, answer_size):
    # The length limit holds for the whole row too: an upload kept whole under it leaves the answer less room.
    path = tmp_path / "s.db"
    writer = _writer_with_length_limit(path, 40_000)
    writer.insert_flow(_flow("up", request_body=b"q" * 32_000))
    assert writer.flush()
    writer.update_flow("up", {"state": "done", "status_code": 200, "response_body": b"r" * answer_size, "meta": {}})
    flow = _flow_written(writer, path, "up")
    assert (flow.state, len(flow.request_body), flow.response_body) == ("done", 32_000, b"")
    assert flow.meta["body_cut"] == {"size": answer_size, "kept": 0, "store_limit": 40_000}


def test_a_body_of_2_gib_which_sqlite3_cannot_bind_is_cut_too_and_the_writer_goes_on(tmp_path):
    path = tmp_path / "s.db"
    writer = _writer_with_length_limit(path, 40_000)
    writer.insert_flow(_flow("before"))
    writer.insert_flow(_flow("big"))
    writer.update_flow("big", {"state": "done", "status_code": 200, "response_body": bytes(2**31 + 10)})  # calloc'd
    writer.insert_flow(_flow("after"))
    assert writer.flush(timeout=30)
    with Store(path) as store:
        assert {f.flow_id for f in store.flows()} == {"before", "big", "after"}
        big = store.flow("big")
        assert (big.state, len(big.response_body)) == ("done", 10_000)
        assert big.meta["body_cut"]["size"] == 2**31 + 10
    assert writer.unwritten == 0
    writer.close()


@pytest.mark.parametrize("order", ["text first", "body first"])
def test_a_body_over_the_limit_beside_text_that_is_not_utf8_still_ends_its_flow(tmp_path, order):
    # Each failure alone had its way out; together, the event was dropped.
    path = tmp_path / "s.db"
    writer = _writer_with_length_limit(path, 40_000)
    writer.insert_flow(_flow("both"))
    assert writer.flush()
    text, body = {"path": "/v1/\udcff"}, {"response_body": b"r" * 60_000}
    writer.update_flow("both", {"state": "done", **(text | body if order == "text first" else body | text)})
    flow = _flow_written(writer, path, "both")
    assert (flow.state, flow.path, len(flow.response_body)) == ("done", "/v1/\\udcff", 10_000)


def test_an_event_that_cannot_be_written_at_all_is_counted_unwritten(tmp_path):
    # The proxy's exit status comes from ``unwritten``: a dropped event must not pass for written.
    path = tmp_path / "s.db"
    writer = _writer_with_length_limit(path, 40_000)
    writer.insert_flow(_flow("f1"))
    writer.update_flow("f1", {"error": "e" * 50_000})  # not a body: nothing to cut
    writer.insert_flow(_flow("f2"))
    assert writer.flush()
    with Store(path) as store:
        assert store.flow("f1").error is None and store.flow("f2") is not None
    assert (writer.unwritten, writer.stats.failed) == (1, 1)
    writer.close()


NUDGED_WRITER = """
import signal, sys, time
from rollouttap.store import StoreWriter
from rollouttap.store.nudge import NUDGE_SIGNAL
writer = StoreWriter(sys.argv[1], heartbeat=60)
writer.proxy_id = "p1"
signal.signal(NUDGE_SIGNAL, lambda *_: writer.nudge())  # a plain handler: nudge() must be reentrant
print("ready", flush=True)
sys.stdin.read()
writer.close()
"""


def test_a_waiting_reader_nudges_the_proxy_process(tmp_path):
    # The writer lives in another process with a 60 s heartbeat: only the reader's nudge gets its
    # watermark written before the wait's timeout.
    import psutil
    path = tmp_path / "s.db"
    Store(path).close()
    child = subprocess.Popen([sys.executable, "-c", NUDGED_WRITER, str(path)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        _proxy_row(path, "p1", child.pid, psutil.Process(child.pid).create_time())
        ended = time.time()
        with Store(path) as store:
            assert store.wait_committed(ended, timeout=30) == []
            assert store.proxy("p1")["committed_through"] >= ended
    finally:
        child.communicate("", timeout=30)
    assert child.returncode == 0


def test_nudging_a_process_without_a_handler_does_no_harm():
    from rollouttap.store.nudge import nudge
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    assert nudge(child.pid)
    child.communicate(b"", timeout=30)
    assert child.returncode == 0  # SIGURG is ignored by default: a proxy not listening yet lives on
    assert not nudge(child.pid)  # reaped: nothing to signal


def test_migration_from_version_1_adds_the_watermark(tmp_path):
    from rollouttap.store.schema import MIGRATIONS
    path = tmp_path / "v1.db"
    conn = sqlite3.connect(path)
    conn.executescript(MIGRATIONS[1] + "; PRAGMA user_version = 1;")
    conn.close()
    Store(path).close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert "committed_through" in {r[1] for r in conn.execute("PRAGMA table_info(proxies)")}


# -- group commit: folding a batch's events into fewer statements ------------------------------------
def _ins(flow_id, /, **cols):
    return ("insert_flow", {"flow_id": flow_id, "attribution": "pid", **cols})


def _upd(flow_id, /, **cols):
    return ("update_flow", flow_id, cols)


_PROXY = ("upsert_proxy", {"proxy_id": "p1", "pid": 1, "started_at": 1.0})


@pytest.mark.parametrize("events, folded", [
    # a whole flow in one batch becomes one INSERT, later values win
    ([_ins("a", state="open"), _upd("a", request_body=b"q"), _upd("a", status_code=200),
      _upd("a", state="done", status_code=201)],
     [_ins("a", state="done", request_body=b"q", status_code=201)]),
    # interleaved flows keep their insert order
    ([_ins("a"), _ins("b"), _upd("b", status_code=1), _upd("a", status_code=2)],
     [_ins("a", status_code=2), _ins("b", status_code=1)]),
    # updates of a flow inserted in an earlier batch become one UPDATE
    ([_upd("a", status_code=200), _PROXY, _upd("a", state="done")],
     [_upd("a", status_code=200, state="done"), _PROXY]),
    # an update that renames a row stands alone, and nothing later joins what came before it
    ([_ins("a"), _upd("a", flow_id="b"), _upd("a", state="done"), _upd("b", state="error")],
     [_ins("a"), _upd("a", flow_id="b"), _upd("a", state="done"), _upd("b", state="error")]),
    # a second insert of one flow id (it will fail) takes the later updates, as applying in order would
    ([_ins("a", status_code=1), _ins("a", status_code=2), _upd("a", state="done")],
     [_ins("a", status_code=1), _ins("a", status_code=2, state="done")]),
    ([], []),
])
def test_fold_table(events, folded):
    before = repr(events)
    assert fold(events) == folded
    assert repr(events) == before  # the queued events stay as queued (the fallback replays them)


def _rows(conn):
    return [tuple(r) for r in conn.execute(
        "SELECT flow_id, state, status_code, request_body, meta FROM flows ORDER BY id")]


def test_fold_equals_applying_each_event_in_order(tmp_path):
    rng = random.Random(7)
    for case in range(60):
        events, inserted = [], set()
        for _ in range(rng.randint(1, 14)):
            flow_id = rng.choice("abc")
            if flow_id not in inserted and rng.random() < 0.5:
                inserted.add(flow_id)
                events.append(_ins(flow_id, state=rng.choice(["open", "done"])))
            else:  # an update before its insert changes nothing, folded or not
                cols = rng.choice([{"status_code": rng.randint(1, 9)}, {"state": "error"},
                                   {"meta": {"n": rng.randint(1, 9)}}, {"request_body": b"x"}])
                events.append(_upd(flow_id, **cols))
        one, folded = connect(tmp_path / f"one-{case}.db"), connect(tmp_path / f"folded-{case}.db")
        for event in events:
            with transaction(one):
                _apply(one, event)
        with transaction(folded):
            for event in fold(events):
                _apply(folded, event)
        assert _rows(folded) == _rows(one), events
        one.close()
        folded.close()


def test_events_queued_together_are_one_transaction_with_one_statement_per_flow(tmp_path):
    path = tmp_path / "s.db"
    Store(path).close()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # the writer blocks on its first batch ...
    writer = StoreWriter(path, linger=30.0)
    writer.insert_flow(_flow("g0"))
    deadline = time.monotonic() + 10
    while writer._queue.qsize() and time.monotonic() < deadline:
        time.sleep(0.005)
    for flow_id in ("g1", "g2"):  # ... while both flows queue up
        writer.insert_flow(_flow(flow_id))
        writer.update_flow(flow_id, {"request_body": b"{}"})
        writer.update_flow(flow_id, {"status_code": 200, "response_headers": [["a", "b"]]})
        writer.update_flow(flow_id, {"state": "done", "response_body": b"ok"})
    holder.execute("COMMIT")
    assert writer.flush(timeout=10)
    assert writer.stats.committed == 9 and writer.stats.statements == 3 and writer.stats.batches <= 2
    writer.close()
    flow = Store(path).flow("g2")
    assert (flow.state, flow.status_code, flow.request_body, flow.response_body) == ("done", 200, b"{}", b"ok")
    assert flow.response_headers == [("a", "b")]


def test_events_wait_a_linger_together_and_a_flush_ends_the_wait(tmp_path):
    path = tmp_path / "s.db"
    writer = StoreWriter(path, linger=30.0)
    store = Store(path)
    writer.insert_flow(_flow("l1"))
    writer.update_flow("l1", {"status_code": 200})
    writer.insert_flow(_flow("l2"))
    # the first event waits a linger too, and the rest join it (a reader polling a while sees none)
    assert not wait_until(lambda: store.flow("l1") or store.flow("l2"), 0.3)
    started = time.monotonic()
    assert writer.flush(timeout=10)
    assert time.monotonic() - started < 10
    assert store.flow("l1").status_code == 200 and store.flow("l2") is not None
    # one transaction; l1's insert and update folded into one statement
    assert (writer.stats.batches, writer.stats.committed, writer.stats.statements) == (1, 3, 2)
    writer.close()


def test_an_event_is_committed_one_linger_after_it_arrives(tmp_path):
    path = tmp_path / "s.db"
    writer = StoreWriter(path, linger=0.5)
    store = Store(path)
    writer.insert_flow(_flow("q1"))
    assert not wait_until(lambda: store.flow("q1"), 0.1)  # not before the linger
    assert wait_until(lambda: store.flow("q1"), 10)  # then without anyone flushing
    writer.close()


def wait_until(condition, timeout):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            return value
        time.sleep(0.01)
    return value


def test_one_bad_event_in_a_folded_batch_loses_only_itself(tmp_path):
    writer = StoreWriter(tmp_path / "s.db", linger=5.0)
    writer.insert_flow(_flow("ok1"))
    writer.update_flow("ok1", {"state": "bogus"})  # violates the state CHECK constraint
    writer.update_flow("ok1", {"status_code": 200})
    writer.insert_flow(_flow("ok2", state="done"))
    assert writer.flush(timeout=10)
    writer.close()
    assert writer.stats.failed == 1
    store = Store(tmp_path / "s.db")
    first = store.flow("ok1")
    assert (first.state, first.status_code) == ("open", 200)
    assert store.flow("ok2").state == "done"


def test_close_during_a_linger_commits_everything_at_once(tmp_path):
    writer = StoreWriter(tmp_path / "s.db", linger=30.0)
    writer.insert_flow(_flow("c1"))
    assert writer.flush(timeout=10)
    writer.update_flow("c1", {"state": "done"})  # lingers
    started = time.monotonic()
    writer.close(timeout=10)
    assert time.monotonic() - started < 5.0
    assert Store(tmp_path / "s.db").flow("c1").state == "done"


def test_an_event_json_cannot_encode_is_dropped_alone_and_the_writer_goes_on(tmp_path):
    writer = StoreWriter(tmp_path / "s.db")
    writer.insert_flow(_flow("j1"))
    writer.update_flow("j1", {"meta": {"bad": object()}})
    writer.update_flow("j1", {"state": "done"})
    assert writer.flush(timeout=10)
    writer.insert_flow(_flow("j2"))
    writer.close()
    assert writer.stats.failed == 1
    store = Store(tmp_path / "s.db")
    assert store.flow("j1").state == "done" and store.flow("j2") is not None


def test_text_with_undecodable_bytes_is_kept_with_escapes(tmp_path):
    # mitmproxy decodes a non-UTF-8 path or header with surrogateescape; SQLite only takes UTF-8.
    writer = StoreWriter(tmp_path / "s.db")
    writer.insert_flow({**_flow("u1"), "path": "/v1/chat/completions?q=\udcff", "agent_id": "\udcff\udcfe"})
    writer.insert_flow(_flow("u2"))
    writer.close()
    assert writer.stats.failed == 0
    store = Store(tmp_path / "s.db")
    kept = store.flow("u1")
    assert kept.path == "/v1/chat/completions?q=\\udcff" and kept.agent_id == "\\udcff\\udcfe"
    assert store.flow("u2") is not None


@pytest.mark.parametrize("target, kept, hidden", [
    ("/v1/models", "/v1/models", None),
    ("/v1beta/models/m:generate?key=AIzaSECRET&alt=sse", "&alt=sse", "AIzaSECRET"),
    ("http://h:1/x?access_token=s3cr%2Ft#frag", "#frag", "s3cr"),
    ("/x?api_key=abc&user=bob", "user=bob", "abc"),
    ("/x?q=key&limit=5", "/x?q=key&limit=5", None),  # a value named "key" is not a key
    ("/x?token", "/x?token", None),  # no value to hide
    ("/q3;jsessionid=S3SS;v=1?x=1", ";v=1?x=1", "S3SS"),  # a path parameter
    ("/api;session=S5SS/v1/chat/completions", "/v1/chat/completions", "S5SS"),  # the path goes on after it
    ("/a;b/c?q=1", "/a;b/c?q=1", None),
    ("/x?pass=hunter2&k=v", "&k=v", "hunter2"),
    ("/x?x=1;api_key=SEKRIT", "/x?x=1;api_key=", "SEKRIT"),  # parameters parted at ; as many servers read them
    ("/x?q=a;b&c=d", "/x?q=a;b&c=d", None),
    ("/cb?code=AC5z6&state=st9", "/cb?code=redacted-sha256-", "AC5z6"),  # OAuth codes, by the whole name
    ("/token?grant_type=authorization_code&device_code=DC7w8", "?grant_type=authorization_code&", "DC7w8"),
    ("/x?deviceCode=DC9v0", "/x?deviceCode=", "DC9v0"),
    ("/x?authorization_code=AZ1u2", "/x?authorization_code=", "AZ1u2"),
    ("/x?zipcode=90210&country_code=US&status_code=404&error_code=E1&code_challenge=CH",
     "/x?zipcode=90210&country_code=US&status_code=404&error_code=E1&code_challenge=CH", None),
    # A URL in a query value (a fetch or redirect service), as written or percent-encoded
    ("/fetch?url=https://x/y?api_key=NK1&alt=1", "/fetch?url=https://x/y?api_key=", "NK1"),
    ("/fetch?url=https%3A%2F%2Fx%2Fy%3Fapi_key%3DNK2%26a%3D1&n=2", "/fetch?url=https%3A%2F%2Fx%2Fy%3Fapi_key%3D", "NK2"),
    ("/fetch?url=https%3A%2F%2Fx%2Fy%3Fa%3D1&n=2", "/fetch?url=https%3A%2F%2Fx%2Fy%3Fa%3D1&n=2", None),
])
def test_redact_query_hides_values_of_secret_parameters(target, kept, hidden):
    out = redact_query(target)
    assert kept in out
    if hidden is None:
        assert out == target
    else:
        assert hidden not in out and "redacted-sha256-" in out and " " not in out  # still a valid target


def test_fingerprints_are_keyed_by_the_machine(tmp_path, monkeypatch):
    from rollouttap.store import redact
    monkeypatch.setenv("ROLLOUTTAP_CACHE", str(tmp_path))
    redact._machine_key.cache_clear()
    try:
        code = "123456"  # a one-time code: its bare sha256 is one guess away
        assert fingerprint(code) == fingerprint(code) != hashlib.sha256(code.encode()).hexdigest()[:12]
        key = tmp_path / "fingerprint.key"
        assert len(key.read_bytes()) == 32 and key.stat().st_mode & 0o777 == 0o600
        first = fingerprint(code)
        redact._machine_key.cache_clear()
        assert fingerprint(code) == first  # the key is kept: every process fingerprints alike
        (tmp_path / "file").write_text("not a directory")
        monkeypatch.setenv("ROLLOUTTAP_CACHE", str(tmp_path / "file" / "cache"))  # nowhere to keep a key
        redact._machine_key.cache_clear()
        own = fingerprint(code)  # a key of this process's own: still no bare hash, and no error
        assert own not in (first, hashlib.sha256(code.encode()).hexdigest()[:12]) and fingerprint(code) == own
    finally:
        redact._machine_key.cache_clear()


@pytest.mark.parametrize("name, secret", [
    ("Authorization", True), ("Proxy-Authorization", True), ("x-goog-api-key", True), ("X-Auth-Token", True),
    ("x-amz-security-token", True), ("Set-Cookie", True), ("apiKey", True), ("access_token", True),
    ("X-Session-Id", True), ("api-key", True), ("x-csrftoken", True),
    ("authtoken", True), ("HFToken", True), ("OpenAIKey", True), ("Authentication", True), ("Cookie2", True),
    ("Ocp-Apim-Subscription-Key", True), ("X-Amz-Credential", True), ("X-Amz-Signature", True),
    ("pwd", True), ("JSESSIONID", True), ("x-otp", True), ("passphrase", True), ("pass", True), ("X-Oauth", True),
    ("X-Pat", True), ("passcode", True), ("passthrough", False), ("path", False), ("patch", False),
    ("max_tokens", False), ("x-ratelimit-remaining-tokens", False), ("author", False), ("keyword", False),
    ("Content-Type", False), ("x-stainless-retry-count", False), ("Keep-Alive", False), ("authority", False),
    ("api-version", False), ("X-Amz-Date", False), ("anthropic-version", False),
    ("PHPSESSID", True), ("connect.sid", True), ("sid", True), ("side", False), ("x-request-id", False),
    ("X-Api-Keys", True), ("X-Cookies", True), ("passwords", True), ("x-secrets", True), ("num_tokens", False),
    ("pw", True), ("x-pw", True), ("pwa", False),
    # Header names are case-insensitive: an odd casing is the same header to the server.
    ("AuthoriZation", True), ("X-Api-KeY", True), ("COOKIE", True), ("Authorisation", True), ("KeY", True),
    ("MaxTokens", False), ("authored_at", False),
    # Keys whose names hold no credential word, named whole.
    ("appid", True), ("APPID", True), ("app_id", True), ("app-id", True), ("ak", True), ("X-Honeycomb-Team", True),
    ("X-JFrog-Art-Api", True), ("appids", False), ("x-app-id-hint", False), ("akey", True), ("break", False),
])
def test_secret_names_go_by_words_and_word_endings(name, secret):
    assert is_secret_name(name) == secret


@pytest.mark.parametrize("name, secret", [
    ("code", True), ("Code", True), ("device_code", True), ("deviceCode", True), ("device-code", True),
    ("auth_code", True), ("authorization_code", True), ("access_token", True), ("code_verifier", True),
    ("user_code", True),
    ("zipcode", False), ("country_code", False), ("status_code", False), ("error_code", False),
    ("code_challenge", False), ("codec", False), ("state", False),
])
def test_url_parameters_take_oauth_code_names_whole(name, secret):
    from rollouttap.store.redact import is_secret_param
    assert is_secret_param(name) == secret
    assert not is_secret_name("code")  # a header or command option named so is no OAuth code


@pytest.mark.parametrize("target, expected", [
    ("/x?key=abc&alt=sse", "/x?alt=sse"),
    ("/x?key=abc", "/x"),
    ("/x?alt=sse#f", "/x?alt=sse#f"),
    ("/x?a=1;key=abc&b=2", "/x?a=1&b=2"),
])
def test_map_secret_query_can_drop_secret_parameters(target, expected):
    assert map_secret_query(target, lambda _value: None) == expected


@pytest.mark.parametrize("value", ["Bearer sk-1", "sk-raw", "Basic dXNlcjpwYXNz"])
def test_is_redacted_knows_redact_values_output(value):
    from rollouttap.store import is_redacted
    assert is_redacted(redact_value(value)) and not is_redacted(value)


def test_the_writers_backlog_grows_while_the_store_is_locked_and_drains_after(tmp_path):
    path = tmp_path / "s.db"
    writer = StoreWriter(path, max_backlog_bytes=100_000)
    writer._conn.execute("PRAGMA busy_timeout = 50")  # fail fast: the retry loop is what is under test
    lock = sqlite3.connect(path, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    for i in range(3):
        writer.insert_flow({**_flow(f"f{i}"), "response_body": b"x" * 60_000})
    wait_for(lambda: writer.failing, what="the writer's failed commit")
    assert "locked" in writer.failing and writer.backlog_bytes > 180_000 and writer.overloaded
    lock.execute("ROLLBACK")
    assert writer.flush()
    assert writer.failing is None and writer.backlog_bytes == 0 and not writer.overloaded
    writer.close()
    with Store(path) as store:
        assert len(store.flows()) == 3


def test_a_writer_whose_file_was_replaced_writes_nothing_more(tmp_path):
    path = tmp_path / "s.db"
    writer = StoreWriter(path)
    writer.insert_flow(_flow("before"))
    assert writer.flush() and writer.detached is None
    Store(tmp_path / "other.db").close()
    os.replace(tmp_path / "other.db", path)  # a restored copy moved over it; the old -wal stays beside it
    wal = path.with_name(path.name + "-wal")
    size = wal.stat().st_size
    writer.insert_flow(_flow("after"))
    assert writer.flush()
    assert writer.detached and "was deleted or replaced" in writer.detached
    assert writer.stats.failed == 1 and writer.backlog_bytes == 0
    assert wal.stat().st_size == size  # not one frame more for the new file to take
    writer.close()


def test_a_file_replaced_while_the_writer_waits_out_a_lock_gets_nothing_either(tmp_path):
    path = tmp_path / "s.db"
    writer = StoreWriter(path)
    writer._conn.execute("PRAGMA busy_timeout = 50")  # fail fast: the retry loop is what is under test
    lock = sqlite3.connect(path, isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    writer.insert_flow(_flow("after"))
    wait_for(lambda: writer.failing, what="the writer retrying a locked commit")
    wal = path.with_name(path.name + "-wal")
    size = wal.stat().st_size
    Store(tmp_path / "other.db").close()
    os.replace(tmp_path / "other.db", path)
    lock.execute("ROLLBACK")
    lock.close()
    assert writer.flush()
    assert writer.detached and writer.stats.failed == 1 and writer.failing is None
    assert wal.stat().st_size == size
    writer.close()


def test_a_store_file_that_cannot_be_looked_at_for_a_moment_is_not_taken_as_gone(tmp_path):
    path = tmp_path / "s.db"
    writer = StoreWriter(path)

    class Unreadable(type(path)):  # its folder unreadable for a moment (a non-root user's EACCES)
        def stat(self, **kwargs):
            raise PermissionError(13, "Permission denied", str(self))

    writer.path = Unreadable(path)
    writer.insert_flow(_flow("while"))
    assert writer.flush() and writer.detached is None
    writer.path = path
    writer.close()
    with Store(path) as store:
        assert [f.flow_id for f in store.flows()] == ["while"]


def test_a_store_knows_when_its_file_was_deleted_or_replaced(tmp_path):
    path = tmp_path / "runs.db"
    with Store(path) as store:
        assert store.detached() is None
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        assert "was deleted or replaced" in store.detached()
        Store(path).close()  # a new store at the same path is another file
        assert "was deleted or replaced" in store.detached()


def test_a_throttle_says_a_thing_once_per_interval_or_when_told_to():
    from rollouttap.throttle import Throttle
    throttle = Throttle(60.0)
    assert [throttle.due(), throttle.due(), throttle.due(now=True), throttle.due()] == [True, False, True, False]
    assert Throttle(0.0).due() and all(Throttle(0.0).due() for _ in range(3))


def test_a_read_only_open_upgrades_a_store_an_older_rollouttap_wrote(tmp_path):
    # The inspecting commands open stores read-only: a version-1 store was refused with advice no command took.
    from rollouttap.store.schema import MIGRATIONS
    path = tmp_path / "v1.db"
    conn = sqlite3.connect(path)
    conn.executescript(MIGRATIONS[1] + "; PRAGMA user_version = 1;")
    conn.execute("INSERT INTO flows (flow_id, attribution, state) VALUES ('old', 'pid', 'done')")
    conn.commit()
    conn.close()
    with Store(path, readonly=True) as store:
        assert [f.flow_id for f in store.flows()] == ["old"]
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_read_only_open_of_an_older_store_it_cannot_upgrade_says_what_to_do(tmp_path):
    from rollouttap.store.schema import MIGRATIONS
    folder = tmp_path / "runs"
    folder.mkdir()
    conn = sqlite3.connect(folder / "runs.db")
    conn.executescript(MIGRATIONS[1] + "; PRAGMA user_version = 1;")
    conn.close()
    out = _read_on_a_readonly_mount(folder, tmp_path)
    assert out.startswith("error") and "older rollouttap (store schema 1" in out and "copy it where you" in out


def test_an_empty_file_is_not_taken_for_a_store_to_migrate(tmp_path):
    path = tmp_path / "empty.db"
    path.touch()
    with pytest.raises(StoreError, match="is empty: not a rollouttap store"):
        Store(path, readonly=True)


def test_reads_in_a_snapshot_see_one_moment_while_another_connection_writes(tmp_path):
    import sqlite3
    path = tmp_path / "s.db"
    with Store(path) as store:
        other = sqlite3.connect(path, isolation_level=None)
        insert = "INSERT INTO flows (flow_id, attribution, state) VALUES (?, 'none', 'done')"
        other.execute(insert, ("f1",))
        with store.snapshot():
            before = store.flow_counts()["total"]
            other.execute(insert, ("f2",))  # a proxy writing meanwhile
            assert store.flow_counts()["total"] == before == 1
        assert store.flow_counts()["total"] == 2
        other.close()


def test_a_snapshot_nests_and_refuses_writes_saying_so(tmp_path):
    with Store(tmp_path / "s.db") as store:
        with store.snapshot():
            with store.snapshot():  # the same moment
                assert store.flow_counts()["total"] == 0
            with pytest.raises(StoreError, match=r"inside Store.snapshot\(\), which only reads"):
                store.register_agent("a1", token="t", run_id="r")
        store.register_agent("a1", token="t", run_id="r")  # after it, as before
        assert store.agent("a1") is not None
