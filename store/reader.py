"""The manager's side of the store: agent registration and reading flows back."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import psutil

from rollouttap.errors import StoreError
from rollouttap.store.db import connect, file_id, is_busy, still_the_file, transaction
from rollouttap.store.nudge import nudge
from rollouttap.store.records import AgentRecord, FlowRecord
from rollouttap.store.schema import FLOW_COLUMNS
from rollouttap.store.redact import hash_token

AGENT_STATUSES = ("registered", "running", "ok", "failed", "timeout", "error")
LIVE_STATUSES = ("registered", "running")  # not ended yet: its token counts, its processes are supervised
_LIVE = "(" + ", ".join(f"'{s}'" for s in LIVE_STATUSES) + ")"  # for SQL: a fixed list, never user input
PRUNE_BATCH = 500  # flows deleted per transaction
LOCKED_WRITE_WAIT_S = 120.0  # in all; each try waits busy_timeout (BUSY_TIMEOUT_MS) itself
LOCKED_WRITE_PAUSE_S = 0.05  # between tries, out of the lock: other threads get their turn

log = logging.getLogger(__name__)


class Store:
    """A store file opened for agents and queries. Thread-safe: one connection behind a lock."""

    def __init__(self, path: str | Path, *, readonly: bool = False, create: bool = True,
                 locked_write_wait_s: float = LOCKED_WRITE_WAIT_S) -> None:
        self.path = Path(path)
        self.locked_write_wait_s = locked_write_wait_s
        self._conn = connect(self.path, readonly=readonly, create=create)
        self._file = file_id(self.path)
        self._lock = threading.RLock()  # re-entered by the reads of a snapshot()
        self._in_snapshot = False  # only the thread holding the lock reads or sets it

    def close(self) -> None:
        with self._lock:  # a write still waiting out another writer's lock then fails on the closed connection
            self._conn.close()

    def detached(self) -> str | None:
        """Why this connection no longer reads and writes the file at its path (deleted, or replaced), if so."""
        if still_the_file(self.path, self._file) is not False:  # None, it cannot tell: taken as the same file
            return None
        return f"the store file {self.path} was deleted or replaced while in use: start again with a store"

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def snapshot(self) -> Iterator[Store]:
        """Every read inside sees the store as of one moment (one read transaction: proxies go on writing), so that
        figures read in several queries add up. Other threads using this Store wait until it ends."""
        with self._lock:
            if self._in_snapshot:  # within one already: the same moment
                yield self
                return
            try:
                self._conn.execute("BEGIN")
            except sqlite3.Error as exc:
                raise StoreError(f"query on {self.path} failed: {exc}") from exc
            self._in_snapshot = True
            try:
                yield self
            finally:
                self._in_snapshot = False
                self._conn.execute("COMMIT")

    def _query(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        try:
            with self._lock:
                return self._conn.execute(sql, tuple(params)).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"query on {self.path} failed: {exc}") from exc

    def _write(self, sql: str, params: Iterable[Any] = ()) -> int:
        # Another process's write transaction outlasting busy_timeout is waited out (up to locked_write_wait_s):
        # an agent's start or end that cannot be recorded would fail an agent that ran well. Each try holds the
        # lock through its own busy wait; other threads get their turn between tries.
        deadline = time.monotonic() + self.locked_write_wait_s
        while True:
            try:
                with self._lock:  # held by a snapshot() for its whole length: only its own thread gets here in one
                    if self._in_snapshot:
                        raise StoreError(f"write to {self.path} inside Store.snapshot(), which only reads")
                    with transaction(self._conn):
                        return self._conn.execute(sql, tuple(params)).rowcount
            except sqlite3.Error as exc:
                if not is_busy(exc) or time.monotonic() > deadline:
                    raise StoreError(f"write to {self.path} failed: {exc}") from exc
                log.warning("store %s is locked by another writer; still waiting to write", self.path)
                time.sleep(LOCKED_WRITE_PAUSE_S)

    # -- agents ----------------------------------------------------------------------------------
    def register_agent(self, agent_id: str, *, token: str | None = None, run_id: str | None = None,
                       meta: dict[str, Any] | None = None) -> None:
        """Create an agent row before its process starts (the proxy checks credentials against it)."""
        self._write(
            "INSERT INTO agents (agent_id, run_id, token_hash, status, created_at, meta) "
            "VALUES (?, ?, ?, 'registered', ?, ?)",
            (agent_id, run_id, hash_token(token) if token else None, time.time(),
             json.dumps(meta or {})))

    def agent_started(self, agent_id: str, pid: int) -> None:
        """Record the agent's root process (pid and its start time, so a reused pid never matches)."""
        try:
            create_time: float | None = psutil.Process(pid).create_time()
        except psutil.Error:
            create_time = None
        self._write("UPDATE agents SET root_pid = ?, root_create_time = ?, status = 'running', "
                    "started_at = ? WHERE agent_id = ?", (pid, create_time, time.time(), agent_id))

    def agent_exited(self, agent_id: str, at: float | None = None) -> None:
        """Record that the agent's processes are gone (``ended_at``, by default now): its token is void from
        now on, while its status stays live until ``agent_ended`` records how it ended (its check can take
        minutes)."""
        self._write("UPDATE agents SET ended_at = ? WHERE agent_id = ? AND ended_at IS NULL",
                    (time.time() if at is None else at, agent_id))

    def agent_ended(self, agent_id: str, status: str, meta: dict[str, Any] | None = None) -> None:
        """Record how the agent ended; meta is merged into the agent's meta. ``ended_at`` keeps the time
        ``agent_exited`` wrote, if it did."""
        if status not in AGENT_STATUSES:
            raise ValueError(f"unknown agent status {status!r}")
        self._write("UPDATE agents SET status = ?, ended_at = COALESCE(ended_at, ?), meta = json_patch(meta, ?) "
                    "WHERE agent_id = ?", (status, time.time(), json.dumps(meta or {}), agent_id))

    def agent(self, agent_id: str) -> AgentRecord | None:
        rows = self._query("SELECT * FROM agents WHERE agent_id = ?", (agent_id,))
        return AgentRecord.from_row(rows[0]) if rows else None

    def agents(self, run_id: str | None = None) -> list[AgentRecord]:
        if run_id is None:
            rows = self._query("SELECT * FROM agents ORDER BY created_at, agent_id")
        else:
            rows = self._query("SELECT * FROM agents WHERE run_id = ? ORDER BY created_at, agent_id",
                               (run_id,))
        return [AgentRecord.from_row(r) for r in rows]

    def live_agents(self) -> list[AgentRecord]:
        """The agents that have not ended (registered or running), through the partial index of those."""
        rows = self._query(f"SELECT * FROM agents WHERE status IN {_LIVE}")
        return [AgentRecord.from_row(r) for r in rows]

    def unregistered_agent_ids(self) -> list[str]:
        """Agents that have flows but no row: named by an environment tag or a header, never registered."""
        rows = self._query("SELECT DISTINCT agent_id FROM flows WHERE agent_id IS NOT NULL "
                           "AND agent_id NOT IN (SELECT agent_id FROM agents) ORDER BY agent_id")
        return [r[0] for r in rows]

    # -- flows -----------------------------------------------------------------------------------
    def flows(self, *, agent_id: str | None = None, state: str | None = None, host: str | None = None,
              port: int | None = None, since: float | None = None, until: float | None = None,
              unattributed: bool = False, run_id: str | None = None, proxy_ids: Sequence[str] | None = None,
              limit: int | None = None) -> list[FlowRecord]:
        """Flows in the order the proxy saw their requests, filtered (``proxy_ids``: recorded by those proxies)."""
        rows = self._select_flows("*", limit, agent_id=agent_id, state=state, host=host, port=port, since=since,
                                  until=until, unattributed=unattributed, run_id=run_id, proxy_ids=proxy_ids)
        return [FlowRecord.from_row(r) for r in rows]

    def _select_flows(self, columns: str, limit: int | None, **filters: Any) -> list[sqlite3.Row]:
        """``columns`` of the filtered flows, in capture order, at most ``limit``."""
        where, params = _flow_filter(**filters)
        sql = f"SELECT {columns} FROM flows{where} ORDER BY id"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return self._query(sql, params)

    def iter_flows(self, *, batch: int = 64, **filters: Any) -> Iterator[FlowRecord]:
        """``flows()`` read ``batch`` at a time (pages by id), those stored when it begins: a store of any size is
        walked with the bodies of one page in memory (an export of a training run's store, say)."""
        where, params = _flow_filter(**filters)
        after = " AND id > ? AND id <= ?" if where else " WHERE id > ? AND id <= ?"
        # The flows there are now: an export of a store that proxies write to ends, at one moment's flows.
        newest, last = self._query("SELECT coalesce(max(id), 0) FROM flows")[0][0], 0
        while True:
            rows = self._query(f"SELECT * FROM flows{where}{after} ORDER BY id LIMIT ?",
                               [*params, last, newest, batch])
            yield from map(FlowRecord.from_row, rows)
            if len(rows) < batch:
                return
            last = rows[-1]["id"]

    def flow_times(self, **filters: Any) -> list[tuple[int, float | None]]:
        """(row id, request time) of the flows ``flows()`` would return, in that order, without their bodies."""
        return [(r[0], r[1]) for r in self._select_flows("id, t_request", None, **filters)]

    def flow_at(self, row_id: int) -> FlowRecord | None:
        """The flow of a row id that ``flow_times`` gave."""
        rows = self._query("SELECT * FROM flows WHERE id = ?", (row_id,))
        return FlowRecord.from_row(rows[0]) if rows else None

    def flow_listing(self, *, limit: int | None = None, **filters: Any) -> list[tuple[FlowRecord, int, int]]:
        """``flows()`` without reading a body: each record (its bodies None) with its bodies' sizes in bytes."""
        listed = []
        for row in self._select_flows(_LISTED_COLUMNS, limit, **filters):
            data = dict(row)
            sizes = (data.pop("request_bytes") or 0, data.pop("response_bytes") or 0)
            listed.append((FlowRecord.from_row({**data, "request_body": None, "response_body": None}), *sizes))
        return listed

    def count_flows(self, *, agent_id: str | None = None, state: str | None = None, host: str | None = None,
                    port: int | None = None, since: float | None = None, until: float | None = None,
                    unattributed: bool = False, run_id: str | None = None,
                    proxy_ids: Sequence[str] | None = None, unowned: bool = False) -> int:
        """How many flows ``flows()`` would return for these filters, without reading them; ``unowned``: the
        flows of no registered agent (unattributed, or named only by a tag or header no agent registered)."""
        where, params = _flow_filter(agent_id=agent_id, state=state, host=host, port=port, since=since, until=until,
                                     unattributed=unattributed, run_id=run_id, proxy_ids=proxy_ids, unowned=unowned)
        return self._query(f"SELECT count(*) FROM flows{where}", params)[0][0]

    def flow(self, flow_id: str) -> FlowRecord | None:
        rows = self._query("SELECT * FROM flows WHERE flow_id = ?", (flow_id,))
        return FlowRecord.from_row(rows[0]) if rows else None

    def open_flow_count(self, agent_id: str) -> int:
        """How many of the agent's flows are still in flight."""
        return self._query("SELECT count(*) FROM flows WHERE agent_id = ? AND state = 'open'",
                           (agent_id,))[0][0]

    def flow_counts(self, agent_id: str | None = None) -> dict[str, int]:
        """Flows by state (plus ``unattributed`` and ``total``), for one agent or the whole store."""
        if agent_id is None:
            rows = self._query("SELECT state, count(*) FROM flows GROUP BY state")
            unattributed = self._query("SELECT count(*) FROM flows WHERE agent_id IS NULL")[0][0]
        else:
            rows = self._query("SELECT state, count(*) FROM flows WHERE agent_id = ? GROUP BY state",
                               (agent_id,))
            unattributed = 0
        counts = {"open": 0, "done": 0, "error": 0}
        counts.update({r[0]: r[1] for r in rows})
        counts["total"] = sum(counts[s] for s in ("open", "done", "error"))
        counts["unattributed"] = unattributed
        return counts

    def mark_open_flows(self, *, agent_id: str, error: str) -> int:
        """End the agent's still-open flows as ``error`` (used when their proxy is gone)."""
        return self._write("UPDATE flows SET state = 'error', error = ?, t_end = ? "
                           "WHERE agent_id = ? AND state = 'open'", (error, time.time(), agent_id))

    # -- proxies ---------------------------------------------------------------------------------
    def proxies(self, *, alive_only: bool = False) -> list[dict[str, Any]]:
        rows = [dict(r) for r in self._query("SELECT * FROM proxies ORDER BY started_at")]
        for row in rows:
            row["listen"] = json.loads(row["listen"] or "[]")
        if alive_only:
            rows = [r for r in rows if r["stopped_at"] is None and _alive(r["pid"], r["create_time"])]
        return rows

    def running_proxies(self) -> list[tuple[int, float | None]]:
        """(pid, create_time) of the proxies that have not recorded their stop (some may have died)."""
        return [(r[0], r[1]) for r in self._query("SELECT pid, create_time FROM proxies WHERE stopped_at IS NULL")]

    def proxy_stopped(self, proxy_id: str) -> bool:
        """Whether the proxy recorded its stop (it may still be closing its store, no longer listening)."""
        rows = self._query("SELECT 1 FROM proxies WHERE proxy_id = ? AND stopped_at IS NOT NULL", (proxy_id,))
        return bool(rows)

    def proxy(self, proxy_id: str) -> dict[str, Any] | None:
        return next((p for p in self.proxies() if p["proxy_id"] == proxy_id), None)

    def wait_committed(self, since: float, timeout: float, poll: float = 0.02, *,
                       agent_id: str | None = None, proxy_ids: Sequence[str] = ()) -> list[dict[str, Any]]:
        """Wait until the live proxies of this store have committed what they queued before ``since``: every one,
        or with ``agent_id`` those that served the agent (``proxy_ids``, and any that recorded a flow of it).

        After an agent ends, its last flow updates may still sit in a proxy's write queue; reading the
        store before they land would miss them. A proxy that is behind is nudged once (``nudge.py``) to
        write its watermark as soon as that is committed; polls start at 1 ms and double up to ``poll``.
        Returns the proxies (pid, proxy_id) that did not catch up within ``timeout``: none when all did.
        """
        deadline = time.monotonic() + timeout
        wait, nudged = min(0.001, poll), False
        while True:
            behind = self._behind(since, agent_id, proxy_ids)
            if not behind:
                return []
            if not nudged:
                for row in behind:
                    nudge(row["pid"])
                nudged = True
            if time.monotonic() > deadline:
                return behind
            time.sleep(wait)
            wait = min(wait * 2, poll)

    def _behind(self, since: float, agent_id: str | None = None, proxy_ids: Sequence[str] = ()) -> list[dict[str, Any]]:
        """The live proxies (pid, proxy_id) that have not marked ``since`` committed yet (of ``agent_id``: see
        ``wait_committed``)."""
        # One small query per poll; only a proxy that is behind is checked for life (a stopped or dead
        # proxy commits nothing more, so it cannot hold readers back).
        sql = ("SELECT pid, create_time, proxy_id FROM proxies WHERE stopped_at IS NULL "
               "AND coalesce(committed_through, -1) < ?")
        args: tuple[Any, ...] = (since,)
        if agent_id is not None:  # a proxy that served other agents alone cannot hold this one's flows
            marks = ", ".join("?" for _ in proxy_ids) or "NULL"
            sql += (f" AND (proxy_id IN ({marks}) OR EXISTS (SELECT 1 FROM flows WHERE flows.agent_id = ? "
                    "AND flows.proxy_id = proxies.proxy_id))")
            args += (*proxy_ids, agent_id)
        return [dict(r) for r in self._query(sql, args) if _alive(r["pid"], r["create_time"])]

    def killed_proxies(self, agent_id: str, given: Sequence[str], before: float) -> list[dict[str, Any]]:
        """The proxies that may have lost rows of ``agent_id``: those it was ``given`` (running when it started)
        or that hold a flow of it, which died without recording their stop (SIGKILL, the OOM killer) before
        committing all they queued before ``before`` (their last watermark is older). Whether any of what they
        lost was the agent's, the store cannot tell."""
        marks = ", ".join("?" for _ in given) or "NULL"
        rows = self._query(f"SELECT pid, create_time, proxy_id FROM proxies WHERE stopped_at IS NULL AND "
                           f"coalesce(committed_through, started_at) < ? AND (proxy_id IN ({marks}) OR EXISTS "
                           "(SELECT 1 FROM flows WHERE flows.agent_id = ? AND flows.proxy_id = proxies.proxy_id))",
                           (before, *given, agent_id))
        return [dict(r) for r in rows if not _alive(r["pid"], r["create_time"])]

    def close_flows_of_dead_proxies(self) -> int:
        """Flows left ``open`` by a proxy process that no longer runs can never finish: end them."""
        holding = {row[0] for row in self._query("SELECT DISTINCT proxy_id FROM flows WHERE state = 'open'")}
        dead = [p["proxy_id"] for p in self.proxies() if p["proxy_id"] in holding
                and not (_alive(p["pid"], p["create_time"]) and p["stopped_at"] is None)]
        changed = 0
        for proxy_id in dead:
            changed += self._write(
                "UPDATE flows SET state = 'error', error = 'proxy process ended before the flow did', "
                "t_end = coalesce(t_end, ?) WHERE proxy_id = ? AND state = 'open'",
                (time.time(), proxy_id))
        return changed

    def prune(self, before: float, *, batch: int = PRUNE_BATCH) -> tuple[int, int]:
        """Delete what ended before ``before``: registered agents that ended then, whole (all their flows, so
        no conversation is cut in two), and other flows (unattributed, or of an agent named by a tag or header
        alone) requested then; never an open flow. (flows, agents) deleted. A page of flows per transaction,
        so the proxies' writers wait for one page, not for the whole prune. The file keeps its size: new
        rows reuse the freed pages (``VACUUM``, while nothing writes, gives them back)."""
        ended_before = f"status NOT IN {_LIVE} AND coalesce(ended_at, created_at) < ?"
        flows = 0
        while True:
            deleted = self._write(
                "DELETE FROM flows WHERE id IN (SELECT id FROM flows WHERE state != 'open' AND ("
                f"agent_id IN (SELECT agent_id FROM agents WHERE {ended_before}) "
                "OR (t_request < ? AND (agent_id IS NULL OR agent_id NOT IN (SELECT agent_id FROM agents)))) "
                "LIMIT ?)", (before, before, batch))
            flows += deleted
            if deleted < batch:
                break
        agents = self._write(f"DELETE FROM agents WHERE {ended_before} AND NOT EXISTS "
                             "(SELECT 1 FROM flows WHERE flows.agent_id = agents.agent_id)", (before,))
        return flows, agents


def _alive(pid: int, create_time: float | None) -> bool:
    try:
        proc = psutil.Process(pid)
        return create_time is None or abs(proc.create_time() - create_time) < 0.01
    except psutil.Error:
        return False


# Every column but the bodies, and the bodies' sizes in bytes (SQLite's length() and typeof() of a blob read no
# overflow page; a body written as text by hand counts characters, so its bytes are counted the slow way).
def _bytes_of(column: str) -> str:
    return f"CASE typeof({column}) WHEN 'text' THEN length(CAST({column} AS BLOB)) ELSE length({column}) END"


_LISTED_COLUMNS = ", ".join(c for c in FLOW_COLUMNS if c not in ("request_body", "response_body")) + \
    f", {_bytes_of('request_body')} AS request_bytes, {_bytes_of('response_body')} AS response_bytes"


def _flow_filter(*, agent_id: str | None = None, state: str | None = None, host: str | None = None,
                 port: int | None = None, since: float | None = None, until: float | None = None,
                 unattributed: bool = False, run_id: str | None = None, proxy_ids: Sequence[str] | None = None,
                 unowned: bool = False) -> tuple[str, list[Any]]:
    """The WHERE clause (with its leading space, or empty) and parameters of a flows query."""
    filters = [("agent_id = ?", agent_id), ("state = ?", state), ("host = ?", host),
               ("port = ?", port), ("t_request >= ?", since), ("t_request < ?", until),
               ("agent_id IN (SELECT agent_id FROM agents WHERE run_id = ?)", run_id)]
    where = [clause for clause, value in filters if value is not None]
    params: list[Any] = [value for _, value in filters if value is not None]
    if unattributed:
        # With a start time, the time index: the agent index would walk every unattributed flow ever kept.
        where.append("+agent_id IS NULL" if since is not None else "agent_id IS NULL")
    if unowned:
        where.append("(+agent_id IS NULL OR agent_id NOT IN (SELECT agent_id FROM agents))")
    if proxy_ids is not None:
        where.append(f"proxy_id IN ({', '.join('?' for _ in proxy_ids)})")
        params.extend(proxy_ids)
    return (" WHERE " + " AND ".join(where) if where else ""), params
