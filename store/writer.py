"""The store's writer: a queue and one thread, batched commits, so mitmproxy's event loop never waits on SQLite."""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rollouttap.store.db import connect, transaction
from rollouttap.store.schema import FLOW_COLUMNS

log = logging.getLogger(__name__)

_JSON_COLUMNS = ("request_headers", "response_headers", "meta", "listen")
_FLOW_WRITABLE = frozenset(FLOW_COLUMNS) - {"id"}
BATCH_MAX = 512


@dataclass
class WriterStats:
    queued: int = 0
    committed: int = 0
    failed: int = 0
    batches: int = 0
    max_batch: int = 0


class StoreWriter:
    """Queue flow inserts and updates; one thread commits them in batches, in order."""

    def __init__(self, path: str | Path, *, heartbeat: float = 0.1) -> None:
        self.path = Path(path)
        self.proxy_id: str | None = None  # set once the proxy row exists; enables the watermark
        self.heartbeat = heartbeat
        self.stats = WriterStats()
        self._queue: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._conn = connect(self.path)
        self._thread = threading.Thread(target=self._run, name="rollouttap-store-writer", daemon=True)
        self._closed = False
        self._thread.start()

    # -- producer side: cheap, never blocks -----------------------------------------------------
    def insert_flow(self, columns: dict[str, Any]) -> None:
        """Queue a new flow row (state ``open`` unless columns say otherwise)."""
        self._put(("insert_flow", _check_flow_columns(columns)))

    def update_flow(self, flow_id: str, columns: dict[str, Any]) -> None:
        """Queue changed columns of an existing flow row."""
        self._put(("update_flow", flow_id, _check_flow_columns(columns)))

    def upsert_proxy(self, columns: dict[str, Any]) -> None:
        """Queue the row describing this proxy process."""
        self._put(("upsert_proxy", dict(columns)))

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Wait until everything queued so far is committed; False on timeout."""
        if self._closed:
            return True
        done = threading.Event()
        self._queue.put(("barrier", done))
        return done.wait(timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Commit everything queued, then stop the thread and close the file."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("store writer did not finish within %.0fs; %s events may be uncommitted",
                      timeout, self._queue.qsize())
        else:
            self._conn.close()

    def _put(self, event: tuple[Any, ...]) -> None:
        if self._closed:
            raise RuntimeError("store writer is closed")
        self.stats.queued += 1
        self._queue.put(event)

    # -- consumer side: the writer thread --------------------------------------------------------
    def _run(self) -> None:
        stop = False
        while not stop:
            batch: list[tuple[Any, ...]] = []
            try:
                first = self._queue.get(timeout=self.heartbeat)
            except queue.Empty:
                self._mark_idle()
                continue
            if first is None:
                break
            batch.append(first)
            while len(batch) < BATCH_MAX:
                try:
                    event = self._queue.get_nowait()
                except queue.Empty:
                    break
                if event is None:
                    stop = True
                    break
                batch.append(event)
            self._commit(batch)

    def _commit(self, batch: list[tuple[Any, ...]]) -> None:
        barriers = [e[1] for e in batch if e[0] == "barrier"]
        writes = [e for e in batch if e[0] != "barrier"]
        delay = 0.05
        # FIFO: once this batch is committed, so is everything queued before its last event.
        now = time.time()
        mark = now if self._queue.empty() else None
        while writes:
            try:
                with transaction(self._conn):
                    for event in writes:
                        _apply(self._conn, event)
                    if mark is not None:
                        self._write_mark(mark)
                break
            except sqlite3.OperationalError as exc:
                # Locked or busy beyond busy_timeout: keep the batch and try again; never drop traffic.
                log.error("store write failed (%s); retrying %d events in %.2fs", exc, len(writes), delay)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
            except sqlite3.Error:
                self._commit_one_by_one(writes)
                break
        self.stats.committed += len(writes)
        self.stats.batches += 1
        self.stats.max_batch = max(self.stats.max_batch, len(writes))
        for barrier in barriers:
            barrier.set()

    def _mark_idle(self) -> None:
        """Nothing queued: everything queued before now is committed; tell readers so."""
        if self.proxy_id is None:
            return
        mark = time.time()
        if not self._queue.empty():
            return
        try:
            with transaction(self._conn):
                self._write_mark(mark)
        except sqlite3.Error as exc:  # the watermark only speeds readers up; the next beat retries it
            log.debug("store watermark not written: %s", exc)

    def _write_mark(self, mark: float) -> None:
        if self.proxy_id is not None:
            self._conn.execute("UPDATE proxies SET committed_through = max(coalesce(committed_through, 0), ?) "
                               "WHERE proxy_id = ?", (mark, self.proxy_id))

    def _commit_one_by_one(self, writes: list[tuple[Any, ...]]) -> None:
        for event in writes:
            try:
                with transaction(self._conn):
                    _apply(self._conn, event)
            except sqlite3.Error as exc:
                self.stats.failed += 1
                log.error("store write dropped after error %s: %s", exc, _describe(event))


def _check_flow_columns(columns: dict[str, Any]) -> dict[str, Any]:
    unknown = set(columns) - _FLOW_WRITABLE
    if unknown:
        raise ValueError(f"unknown flow columns: {sorted(unknown)}")
    return dict(columns)


def _encode(column: str, value: Any) -> Any:
    if column in _JSON_COLUMNS and value is not None and not isinstance(value, str):
        return json.dumps(value, separators=(",", ":"))
    return value


def _apply(conn: sqlite3.Connection, event: tuple[Any, ...]) -> None:
    kind = event[0]
    if kind == "insert_flow":
        cols = event[1]
        names = ", ".join(cols)
        marks = ", ".join("?" for _ in cols)
        conn.execute(f"INSERT INTO flows ({names}) VALUES ({marks})",
                     [_encode(k, v) for k, v in cols.items()])
    elif kind == "update_flow":
        flow_id, cols = event[1], event[2]
        if cols:
            sets = ", ".join(f"{k} = ?" for k in cols)
            conn.execute(f"UPDATE flows SET {sets} WHERE flow_id = ?",
                         [_encode(k, v) for k, v in cols.items()] + [flow_id])
    elif kind == "upsert_proxy":
        cols = event[1]
        names = ", ".join(cols)
        marks = ", ".join("?" for _ in cols)
        updates = ", ".join(f"{k} = excluded.{k}" for k in cols if k != "proxy_id")
        conn.execute(f"INSERT INTO proxies ({names}) VALUES ({marks}) "
                     f"ON CONFLICT(proxy_id) DO UPDATE SET {updates}",
                     [_encode(k, v) for k, v in cols.items()])
    else:
        raise ValueError(f"unknown store event {kind!r}")


def _describe(event: tuple[Any, ...]) -> str:
    return f"{event[0]} {event[1] if isinstance(event[1], str) else event[1].get('flow_id', '')}"
