"""The store's writer: a queue and one thread, group commits, so mitmproxy's event loop never waits on SQLite.

Group commit: an event waits ``linger`` seconds (10 ms) before it is committed, and transactions are at
least that far apart; whatever arrives meanwhile is written in one transaction, each flow's insert and
later updates folded into one statement (a flow that ends within the linger is one INSERT). At proxy
speed that is one transaction for several flows instead of one per event, and at an agent's pace one
for each short flow instead of two: a transaction costs far more than the rows in it, and the thread
shares the GIL (and, on a small machine, the core) with mitmproxy's event loop.
"""

from __future__ import annotations

import functools
import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rollouttap.store.db import connect, file_id, still_the_file, transaction
from rollouttap.store.schema import FLOW_COLUMNS
from rollouttap.throttle import Throttle

log = logging.getLogger(__name__)

_JSON_COLUMNS = frozenset(("request_headers", "response_headers", "meta", "listen"))
_FLOW_WRITABLE = frozenset(FLOW_COLUMNS) - {"id"}
BATCH_MAX = 512
LINGER_S = 0.010
# The proxy's exit status when rows it queued never reached the store (a full disk at shutdown, the file gone).
EXIT_UNWRITTEN = 3
MAX_BACKLOG_BYTES = 512 << 20  # queued flow data the writer holds while the store cannot take it (see backlog_bytes)
_EVENT_OVERHEAD = 256  # what an event costs beyond its text and bytes values (a rough guess: only a bound)

Event = tuple[Any, ...]
# A watermark is held back for a request not yet queued this long at most (a lookup queued behind hundreds of others
# would otherwise hold every reader): past it the request may land after the mark. The addon lets go of each one then.
HOLD_MARK_S = 1.0
_CONTROL = frozenset(("barrier", "mark"))  # events that want a commit now, not after a linger
# What one bad event can raise (a constraint, a value JSON cannot encode): it is dropped, alone, and the
# thread goes on; a dead writer thread would silently lose everything after it.
# OverflowError: a value of 2 GiB or more, which Python's sqlite3 will not bind.
_BAD_EVENT = (sqlite3.Error, TypeError, ValueError, OverflowError)
_TOO_BIG = (sqlite3.DataError, OverflowError)


@dataclass
class WriterStats:
    queued: int = 0
    committed: int = 0  # events committed (before folding)
    statements: int = 0  # SQL statements they became
    failed: int = 0
    batches: int = 0  # transactions holding flow or proxy rows
    max_batch: int = 0


class StoreWriter:
    """Queue flow inserts and updates; one thread commits them in batches, in order."""

    def __init__(self, path: str | Path, *, heartbeat: float = 0.1, linger: float = LINGER_S,
                 max_backlog_bytes: int = MAX_BACKLOG_BYTES) -> None:
        self.path = Path(path)
        self.proxy_id: str | None = None  # set once the proxy row exists; enables the watermark
        self.heartbeat = heartbeat
        self.linger = linger
        self.max_backlog_bytes = max_backlog_bytes
        self.failing: str | None = None  # why the last commit failed while the writer retries it, else None
        self.stats = WriterStats()
        # Each counter has one writing thread (the producer, the writer thread): no lock, no lost update.
        self._queued_bytes = 0
        self._done_bytes = 0
        self._queue: queue.SimpleQueue[Event | None] = queue.SimpleQueue()
        self._wake = threading.Event()  # cuts a linger short: someone waits for the commit
        self._last_commit = -float("inf")  # time.monotonic() after the last transaction of rows
        self._idle_wait = heartbeat  # how long the queue may stay empty before the next idle watermark
        self._conn = connect(self.path)
        self._file_id = file_id(self.path)  # connect() made it
        self.detached: str | None = None  # set once the store file was deleted or replaced under the writer
        self._drops_said = Throttle(5.0)
        self._failures_said = Throttle(60.0)  # a failing store retries every 2 s: not a line each time
        # Notes of bodies this writer cut to fit SQLite (flow id -> meta entries; writer thread only): a later meta
        # of the flow, written whole by the addon, must keep them.
        self._cut_notes: dict[str | None, dict[str, Any]] = {}
        # When the oldest request that reached the proxy but is not queued yet (its sender being looked up) arrived,
        # or None: a watermark never passes it (set by the addon, each request for HOLD_MARK_S at most; a float
        # read whole by this thread).
        self.unqueued_since: float | None = None
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

    def nudge(self) -> None:
        """A reader waits for the watermark: mark everything queued before now as soon as it is committed.

        Reentrant (one SimpleQueue.put), so it may run from a signal handler."""
        self._queue.put(("mark", self._held(time.time())))

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Wait until everything queued so far is committed; False on timeout."""
        if self._closed:
            return True
        done = threading.Event()
        self._queue.put(("barrier", done))
        self._wake.set()
        return done.wait(timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Commit everything queued, then stop the thread and close the file."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("rollouttap: the store writer did not finish within %.0fs: %d events not written to %s",
                      timeout, self.unwritten, self.path)
        else:
            self._conn.close()

    @property
    def unwritten(self) -> int:
        """Events queued and not committed (still queued, in the batch being retried, or dropped)."""
        return self.stats.queued - self.stats.committed

    @property
    def backlog_bytes(self) -> int:
        """About how much queued flow data is not committed yet (bodies mostly)."""
        return self._queued_bytes - self._done_bytes

    @property
    def overloaded(self) -> bool:
        """The backlog is over max_backlog_bytes: the store has not taken rows for a while (a full disk, a
        lock held by another process); what is queued stays in memory until it does."""
        return self.backlog_bytes > self.max_backlog_bytes

    def can_hold(self, extra: int = 0) -> bool:
        """Whether a row queued now can still reach the store: the file is there and the backlog is within the
        limit (plus ``extra`` bytes)."""
        return self.detached is None and self.backlog_bytes <= self.max_backlog_bytes + extra

    def _put(self, event: Event) -> None:
        if self._closed:
            raise RuntimeError("store writer is closed")
        self.stats.queued += 1
        self._queued_bytes += _event_size(event)
        self._queue.put(event)

    # -- consumer side: the writer thread --------------------------------------------------------
    def _run(self) -> None:
        stop = False
        while not stop:
            try:
                # After rows, idle watermarks come one linger later, then at doubling intervals up to the
                # heartbeat: a reader waiting for "committed through the moment my agent ended" (an exit
                # tens of ms after its last call) is released within about that delay, not a heartbeat.
                first = self._queue.get(timeout=self._idle_wait)
            except queue.Empty:
                self._mark_idle()
                continue
            if first is None:
                break
            self._linger(first)
            batch = [first]
            stop = self._drain(batch)
            self._commit(batch)

    def _linger(self, first: Event) -> None:
        """Wait ``linger`` after the first event, and keep commits ``linger`` apart: what arrives meanwhile
        joins one transaction. A short flow's insert and its end become one statement."""
        wait = max(self._last_commit + self.linger - time.monotonic(), self.linger)
        if first[0] not in _CONTROL and wait > 0 and self._queue.qsize() < BATCH_MAX:
            self._wake.wait(wait)  # flush() and close() end it early
        self._wake.clear()

    def _drain(self, batch: list[Event]) -> bool:
        """Move queued events into ``batch`` (up to BATCH_MAX); True when close() was among them."""
        while len(batch) < BATCH_MAX:
            try:
                event = self._queue.get_nowait()
            except queue.Empty:
                return False
            if event is None:
                return True
            batch.append(event)
        return False

    def _commit(self, batch: list[Event]) -> None:
        barriers = [e[1] for e in batch if e[0] == "barrier"]
        nudges = [e[1] for e in batch if e[0] == "mark"]
        writes = [e for e in batch if e[0] not in _CONTROL]
        now = self._held(time.time())  # read before the queue is found empty: see batch_mark
        mark = batch_mark(nudges, self._queue.empty(), now)
        if writes:
            self._commit_rows(writes, mark)
        elif mark is not None and nudges:
            self._mark_alone(mark)
        for barrier in barriers:
            barrier.set()

    def _commit_rows(self, writes: list[Event], mark: float | None) -> None:
        statements = fold(writes)
        delay = 0.05
        dropped = 0
        while True:
            self._check_file()  # before every try: a lock may have been waited out while the file was replaced
            if self.detached is not None:  # a replaced file would take the old -wal's frames: write nothing
                self._drop(writes)
                return
            try:
                self._write_all(statements, mark)
                break
            except sqlite3.OperationalError as exc:
                # Locked or busy beyond busy_timeout, or the disk full: keep the batch and try again; never drop
                # traffic (the proxy refuses new requests once the backlog is too large: see overloaded).
                if self._failures_said.due(now=self.failing is None):  # a new failure is said at once
                    log.error("rollouttap: writing to the store %s failed (%s); retrying %d events (and %d queued "
                              "behind them) until it takes them", self.path, exc, len(writes), self._queue.qsize())
                self.failing = str(exc)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)
            except _BAD_EVENT:
                dropped = self._commit_one_by_one(writes)  # the events as queued: only the bad one is lost
                if mark is not None:  # every event before it is committed or dropped for good
                    self._mark_alone(mark)
                break
        self._last_commit = time.monotonic()
        self._idle_wait = self.linger
        self.failing = None
        self._done_bytes += sum(_event_size(event) for event in writes)
        self.stats.committed += len(writes) - dropped  # a dropped event stays unwritten: the exit status says so
        self.stats.statements += len(statements)
        self.stats.batches += 1
        self.stats.max_batch = max(self.stats.max_batch, len(writes))

    def _write_all(self, statements: list[Event], mark: float | None) -> None:
        """One transaction: every folded statement, then the watermark."""
        with transaction(self._conn):
            for event in statements:
                _apply(self._conn, self._with_cut_notes(event) if self._cut_notes else event)
            if mark is not None:
                self._write_mark(mark)

    def _drop(self, writes: list[Event]) -> None:
        self.failing = None  # detached says why now
        self.stats.failed += len(writes)
        self._done_bytes += sum(_event_size(event) for event in writes)
        if writes and self._drops_said.due():
            log.error("rollouttap: %d events not written so far: %s", self.stats.failed, self.detached)

    def _check_file(self) -> None:
        """Is the path still the file this writer writes (a stat, before each transaction and at idle beats)?
        Deleted, rows would go to an unlinked file; replaced (a restored copy), the old -wal would be replayed
        into another file."""
        if self.detached is not None:
            return
        same = still_the_file(self.path, self._file_id)
        if same is None:  # cannot tell (its folder unreadable for a moment): SQLite writes on; ask again later
            log.debug("store file %s not checked now", self.path)
        elif not same:
            self.detached = (f"the store file {self.path} was deleted or replaced while this proxy wrote to it: "
                             "restart the proxy")
            log.error("rollouttap: %s", self.detached)

    def _mark_idle(self) -> None:
        """Nothing queued: everything queued before now is committed; tell readers so."""
        self._check_file()
        if self.detached is not None:
            self._idle_wait = self.heartbeat
            return
        self._idle_wait = min(self._idle_wait * 2, self.heartbeat)
        mark = self._held(time.time())
        if self._queue.empty():
            self._mark_alone(mark)

    def _mark_alone(self, mark: float) -> None:
        if self.proxy_id is None or self.detached is not None:
            return
        try:
            with transaction(self._conn):
                self._write_mark(mark)
        except sqlite3.Error as exc:  # the watermark only speeds readers up; the next beat retries it
            log.debug("store watermark not written: %s", exc)

    def _held(self, moment: float) -> float:
        """``moment``, or the arrival of a request read before it whose row is not queued yet: a mark taken now
        covers no more than that (read as the mark is taken: a row queued after it waits for the next batch)."""
        held = self.unqueued_since
        return held if held is not None and held < moment else moment

    def _write_mark(self, mark: float) -> None:
        mark = self._held(mark)  # again: a request held now, though not then, lowers it (never raises it)
        if self.proxy_id is not None:
            self._conn.execute("UPDATE proxies SET committed_through = max(coalesce(committed_through, 0), ?) "
                               "WHERE proxy_id = ?", (mark, self.proxy_id))

    def _commit_one_by_one(self, writes: list[Event]) -> int:
        """Each event in a transaction of its own; how many could not be written at all (dropped)."""
        dropped = 0
        for event in writes:
            try:
                event = self._with_cut_notes(event) if self._cut_notes else event  # noted by an event before it
                try:
                    self._commit_alone(event)
                except _TOO_BIG:  # as it came, or with its text escaped
                    self._commit_cut(event)
            except _BAD_EVENT as exc:
                dropped += 1
                self.stats.failed += 1
                log.error("store write dropped after error %r: %s", exc, _describe(event))
        return dropped

    def _commit_alone(self, event: Event) -> None:
        try:
            with transaction(self._conn):
                _apply(self._conn, event)
        except UnicodeEncodeError:
            # Text mitmproxy decoded with surrogateescape (a path or header that is not UTF-8): keep the row, with
            # those bytes written as escapes.
            with transaction(self._conn):
                _apply(self._conn, escape_surrogates(event))

    def _commit_cut(self, event: Event) -> None:
        """A flow event with a body over SQLite's length limit (1e9 bytes: a download kept whole; one of 2 GiB
        Python's sqlite3 cannot even bind): its flow's end (state, status, times) must still land, with the first
        part of each body (nothing of them, if the row's stored bodies leave no room) and a note of the cut."""
        limit = self._conn.getlimit(sqlite3.SQLITE_LIMIT_LENGTH)
        last: Exception | None = None
        for share in (limit // BODY_SHARE_OF_LIMIT, 0):
            cut = bodies_cut_to_fit(event, limit, self._meta_of, share)
            if cut is None:  # no body that long: the row's stored ones leave no room for this one, maybe
                continue
            try:
                with transaction(self._conn):
                    _apply(self._conn, escape_surrogates(cut))  # a text column that is not UTF-8 may come too
            except _TOO_BIG as exc:
                last = exc
                continue
            flow_id = _flow_id(cut)
            meta = cut[-1]["meta"]
            self._cut_notes[flow_id] = {**self._cut_notes.get(flow_id, {}), **{
                note: meta[note] for note in _BODY_CUT_NOTES.values() if "store_limit" in meta.get(note, {})}}
            log.error("rollouttap: a body of %s over SQLite's limit of %d bytes: its first %d bytes kept",
                      _describe(event), limit, share)
            return
        raise sqlite3.DataError(f"a value of {_describe(event)} does not fit SQLite's length limit of {limit} bytes, "
                                "its bodies cut or not") from last

    def _with_cut_notes(self, event: Event) -> Event:
        """``event`` with the notes of its flow's bodies cut before added to the meta it writes."""
        cols = event[-1]
        notes = self._cut_notes.get(_flow_id(event))
        if not notes or "meta" not in cols:
            return event
        return (*event[:-1], {**cols, "meta": {**_meta_dict(cols["meta"]), **notes}})

    def _meta_of(self, flow_id: str) -> Any:
        row = self._conn.execute("SELECT meta FROM flows WHERE flow_id = ?", (flow_id,)).fetchone()
        return row[0] if row is not None else None


def _event_size(event: Event) -> int:
    return _EVENT_OVERHEAD + sum(len(v) for v in event[-1].values() if isinstance(v, (bytes, bytearray, str)))


def fold(writes: list[Event]) -> list[Event]:
    """One statement per flow where the events allow it: a flow's later updates join its insert (or
    its first update) in this batch. Applied in one transaction, the result equals the events."""
    out: list[Event] = []
    target: dict[str, int] = {}  # flow_id -> index in ``out`` its next update joins
    for event in writes:
        kind = event[0]
        if kind == "update_flow" and "flow_id" not in event[2]:
            index = target.get(event[1])
            if index is not None:
                out[index][-1].update(event[2])
                continue
            target[event[1]] = len(out)
            out.append(("update_flow", event[1], dict(event[2])))
        elif kind == "insert_flow":
            if event[1].get("flow_id") is not None:
                target[event[1]["flow_id"]] = len(out)
            out.append(("insert_flow", dict(event[1])))
        else:
            if kind == "update_flow":  # renames the row: later updates by either id stand alone
                target.pop(event[1], None)
                target.pop(event[2]["flow_id"], None)
            out.append(event)
    return out


def batch_mark(nudges: list[float], queue_empty: bool, now: float) -> float | None:
    """The watermark a committed batch proves, FIFO: everything queued before ``now`` (read before the
    queue was found empty) when nothing is queued behind it, else everything queued before its latest
    nudge; None when neither holds."""
    return now if queue_empty else max(nudges, default=None)


# What each body keeps of SQLite's length limit when one is over it: a request's and a response's together, and the
# rest of the row, fit.
BODY_SHARE_OF_LIMIT = 4
_BODY_CUT_NOTES = {"request_body": "request_body_cut", "response_body": "body_cut"}


def bodies_cut_to_fit(event: Event, limit: int, meta_of: Callable[[str], Any], share: int) -> Event | None:
    """A flow event with each body over ``share`` bytes cut to that, its meta (the event's, else
    ``meta_of(flow_id)``: the row's) noting each cut as the addon notes its own (``size``, ``kept``) with the
    ``limit``; None when no body is that long."""
    if event[0] not in ("insert_flow", "update_flow"):
        return None
    cols = dict(event[-1])
    sizes = {}
    for column, note in _BODY_CUT_NOTES.items():
        value = cols.get(column)
        if isinstance(value, (bytes, bytearray, str)) and len(value) > share:
            cols[column], sizes[note] = value[:share], len(value)
    if not sizes:
        return None
    meta = _meta_dict(cols["meta"] if "meta" in cols else meta_of(event[1]) if event[0] == "update_flow" else None)
    for note, size in sizes.items():
        was: dict[str, Any] = meta[note] if isinstance(meta.get(note), dict) else {}
        meta[note] = {**was, "size": max(was.get("size") or 0, size), "kept": share, "store_limit": limit}
    cols["meta"] = meta
    return (*event[:-1], cols)


def _flow_id(event: Event) -> str | None:
    """The flow an insert or update event writes (None for other events)."""
    if event[0] == "update_flow":
        return event[1]
    return event[-1].get("flow_id") if event[0] == "insert_flow" else None


def _meta_dict(meta: Any) -> dict[str, Any]:
    """A meta column's value as given in an event (a dict) or as stored (its JSON text), as a new dict."""
    return dict(json.loads(meta) if isinstance(meta, str) else meta or {})


def escape_surrogates(event: Event) -> Event:
    """``event`` with lone surrogates in its text columns written as ``\\udcff`` escapes (SQLite wants UTF-8)."""
    def clean(value: Any) -> Any:
        return value.encode("utf-8", "backslashreplace").decode("utf-8") if isinstance(value, str) else value
    return (*event[:-1], {k: clean(v) for k, v in event[-1].items()})


def _check_flow_columns(columns: dict[str, Any]) -> dict[str, Any]:
    if not _FLOW_WRITABLE.issuperset(columns):
        raise ValueError(f"unknown flow columns: {sorted(set(columns) - _FLOW_WRITABLE)}")
    return dict(columns)


def _encode(column: str, value: Any) -> Any:
    if column in _JSON_COLUMNS and value is not None and not isinstance(value, str):
        return json.dumps(value, separators=(",", ":"))
    return value


@functools.lru_cache(maxsize=256)
def _sql(kind: str, columns: tuple[str, ...]) -> str:
    names = ", ".join(columns)
    marks = ", ".join("?" for _ in columns)
    if kind == "insert_flow":
        return f"INSERT INTO flows ({names}) VALUES ({marks})"
    if kind == "update_flow":
        return "UPDATE flows SET " + ", ".join(f"{k} = ?" for k in columns) + " WHERE flow_id = ?"
    # A proxy's stop rewrites its row (NOT NULL wants a start): its start stays as first written.
    keep_start = ("started_at = CASE WHEN excluded.stopped_at IS NULL THEN excluded.started_at "
                  "ELSE proxies.started_at END")
    updates = ", ".join(keep_start if k == "started_at" else f"{k} = excluded.{k}" for k in columns if k != "proxy_id")
    return f"INSERT INTO proxies ({names}) VALUES ({marks}) ON CONFLICT(proxy_id) DO UPDATE SET {updates}"


def _apply(conn: sqlite3.Connection, event: Event) -> None:
    kind, cols = event[0], event[-1]
    if kind not in ("insert_flow", "update_flow", "upsert_proxy"):
        raise ValueError(f"unknown store event {kind!r}")
    if kind == "update_flow" and not cols:
        return
    params = [_encode(k, v) for k, v in cols.items()]
    if kind == "update_flow":
        params.append(event[1])
    conn.execute(_sql(kind, tuple(cols)), params)


def _describe(event: Event) -> str:
    return f"{event[0]} {event[1] if isinstance(event[1], str) else event[1].get('flow_id', '')}"
