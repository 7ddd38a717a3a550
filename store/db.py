"""Opening a store file: pragmas, schema creation and the version check."""

from __future__ import annotations

import os
import sqlite3
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterator

from rollouttap.errors import StoreError, StoreVersionError
from rollouttap.paths import create_private
from rollouttap.store.local_fs import check_local
from rollouttap.store.schema import INDEXES, MIGRATIONS, SCHEMA_VERSION

BUSY_TIMEOUT_MS = 10_000
INDEX_LOCK_WAIT_MS = 200
WAL_SIZE_LIMIT = 64 << 20


def connect(path: str | Path, *, readonly: bool = False, create: bool = True) -> sqlite3.Connection:
    """Open (and create, unless not ``create``, or migrate) the store at ``path``; raise StoreVersionError on a
    foreign version.

    A read-only open of a store an older rollouttap wrote upgrades it first (with one writable open: the
    migrations only add), so that the inspecting commands read every store this version can."""
    try:
        return _connect(Path(path), readonly=readonly, create=create)
    except _OlderStore as old:
        try:
            _connect(old.path, readonly=False).close()
        except StoreError as exc:
            why = ("another process is writing it now: read it once that one has stopped (this version upgrades "
                   "it then)") if "locked" in str(exc) else \
                f"could not be upgraded here ({exc}): copy it where you can write and open it there once"
            raise StoreVersionError(f"{old.path} was written by an older rollouttap (store schema {old.version}, "
                                    f"this one reads {SCHEMA_VERSION}) and {why}") from exc
        return _connect(old.path, readonly=readonly)


class _OlderStore(Exception):
    """A read-only open met a store of an older schema version: it must be upgraded by a writable one."""

    def __init__(self, path: Path, version: int) -> None:
        super().__init__(f"{path}: store schema {version}")
        self.path, self.version = path, version


def _connect(path: Path, *, readonly: bool, create: bool = True) -> sqlite3.Connection:
    if path.is_dir():
        raise StoreError(f"store {path} is a directory: give a file path in it, e.g. {path / 'runs.db'}")
    if (readonly or not create) and not path.exists():  # a mistyped path is not made into an empty store
        raise StoreError(f"no store at {path}")
    if not readonly:  # a reader of a copied store may be anywhere; writers must share one host's locks
        check_local(path)
    try:
        if readonly:
            conn = _open_readonly(path)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            create_private(path)  # SQLite gives the -wal and -shm files the same mode
            conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if not readonly:
            _enable_wal(conn)
            # WAL + NORMAL survives a crash of the writing process; only power loss can drop the last commits.
            conn.execute("PRAGMA synchronous = NORMAL")
            # A reader that holds a transaction for hours (a notebook, an sqlite3 shell) stops checkpoints from
            # resetting the log, which grows meanwhile; once it can reset again, cut it back to this size.
            conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
        try:
            _check_version(conn, path, migrate=not readonly)
        except _OlderStore:
            conn.close()
            raise
        if not readonly:
            _add_missing_indexes(conn)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open store {path}: {exc}") from exc
    except OSError as exc:  # its folder cannot be made, or the file created (a read-only or special filesystem)
        raise StoreError(f"cannot {'open' if readonly else 'create'} store {path}: {exc.strerror or exc}") from exc
    return conn


def _open_readonly(path: Path) -> sqlite3.Connection:
    # A URI, so the path is escaped: a raw '#', '?' or '%' in it would end the path (and drop mode=ro).
    uri = path.resolve().as_uri() + "?mode=ro"
    conn = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
    try:
        conn.execute("PRAGMA user_version").fetchone()
        return conn
    except sqlite3.OperationalError:
        conn.close()
        # A WAL store needs its -shm file beside it even to read, which a read-only folder (a read-only mount,
        # another user's folder) cannot hold. With no -wal file no connection is open on the store and every
        # commit is in the main file, so reading it as immutable (no locks, no -shm) sees all of it.
        if os.access(path.parent, os.W_OK):
            raise
        if Path(f"{path}-wal").exists():
            raise StoreError(f"cannot open store {path}: its folder is read-only and it has a write-ahead log "
                             "(-wal file) that SQLite cannot read there; copy the store and its -wal file to a "
                             "writable folder") from None
    return sqlite3.connect(uri + "&immutable=1", uri=True, check_same_thread=False, isolation_level=None)


def _add_missing_indexes(conn: sqlite3.Connection) -> None:
    """Create the indexes an older store lacks. Only a speed-up: while another process writes (the proxy,
    another manager), the open goes on without it and a later writable open adds it."""
    have = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    missing = [statement for name, statement in INDEXES.items() if name not in have]
    if not missing:
        return
    conn.execute(f"PRAGMA busy_timeout = {INDEX_LOCK_WAIT_MS}")
    try:
        for statement in missing:
            conn.execute(statement)
    except sqlite3.OperationalError as exc:
        if "locked" not in str(exc):
            raise
    finally:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")


def _enable_wal(conn: sqlite3.Connection, attempts: int = 50) -> None:
    # Two processes creating the same new file can both race for the lock switching it to WAL;
    # busy_timeout does not cover that switch, so retry it for a bounded while.
    for attempt in range(attempts):
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == attempts - 1:
                raise
            time.sleep(0.02 * (attempt + 1))


def _check_version(conn: sqlite3.Connection, path: Path, *, migrate: bool) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise StoreVersionError(
            f"{path} has store schema version {version}, this rollouttap reads version {SCHEMA_VERSION}: "
            "upgrade rollouttap or use another store file")
    if version == SCHEMA_VERSION:
        return
    if version == 0 and _has_foreign_tables(conn):
        raise StoreVersionError(f"{path} is an SQLite file but not a rollouttap store")
    if not migrate:
        if version == 0:  # no tables: an empty file (or an SQLite file nothing was written to)
            raise StoreError(f"{path} is empty: not a rollouttap store (yet)")
        raise _OlderStore(path, version)
    with transaction(conn):
        # Re-read inside the write lock: another process may have migrated meanwhile.
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        for number in range(version + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[number].split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number}")


def _has_foreign_tables(conn: sqlite3.Connection) -> bool:
    row = conn.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()
    return row[0] > 0


FileId = tuple[int, int]  # (device, inode)


def file_id(path: Path) -> FileId:
    """The file ``path`` names now."""
    st = path.stat()
    return st.st_dev, st.st_ino


def still_the_file(path: Path, opened: FileId) -> bool | None:
    """Whether ``path`` still names the file opened as ``opened``: False once it was deleted or replaced (a
    connection would go on with the unlinked file, or replay its -wal into another), None when that cannot be
    told (its folder unreadable for a moment)."""
    try:
        return file_id(path) == opened
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError:
        return None


def is_busy(exc: sqlite3.Error) -> bool:
    """SQLITE_BUSY, or one of its extended codes (BUSY_RECOVERY, BUSY_SNAPSHOT, ...): another connection's lock."""
    return (getattr(exc, "sqlite_errorcode", 0) & 0xFF) == sqlite3.SQLITE_BUSY


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception (the exception raised is the first one)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        # SQLite may have rolled back already (a full disk, SQLITE_FULL): a ROLLBACK would then fail and hide
        # the cause; a COMMIT that failed busy leaves the transaction open, and the next BEGIN would fail.
        if conn.in_transaction:
            with suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        raise
