"""Export stored flows to mitmproxy's flow file (``mitmweb -r FILE``) or to HAR.

The conversion itself lives in ``rollouttap.addon.export_flows`` (the addon package is the one place that
imports mitmproxy); it is imported only when an export runs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rollouttap.errors import ConfigError
from rollouttap.store import FlowRecord, Store

log = logging.getLogger(__name__)

Format = Literal["mitm", "har"]
FORMATS: tuple[Format, ...] = ("mitm", "har")

__all__ = ["FORMATS", "ExportResult", "Format", "check_export", "export_flows", "format_for", "select_flows"]

SQLITE_MAGIC = b"SQLite format 3\0"  # the first 16 bytes of every SQLite database file
# Files SQLite keeps beside a database: writing over one corrupts the store as surely as writing over it.
SIDE_FILES = ("-wal", "-shm", "-journal")


@dataclass(frozen=True)
class ExportResult:
    path: Path
    format: Format
    flows: int


def format_for(path: str | Path, fmt: str | None = None) -> Format:
    """The export format: as given, else from the file name (``.har`` is HAR, anything else a flow file)."""
    if fmt is None:
        return "har" if str(path).lower().endswith((".har", ".json")) else "mitm"
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return fmt  # type: ignore[return-value]


def select_flows(store: Store, *, agent_id: str | None = None, run_id: str | None = None) -> Iterator[FlowRecord]:
    """One agent's flows, one run's, or (neither given) every flow in the store, in capture order, read a
    page at a time."""
    _check_selection(agent_id, run_id)
    return store.iter_flows(batch=4, agent_id=agent_id, run_id=run_id)  # a few flows, bodies and all, at once


def export_flows(store_path: str | Path | Sequence[str | Path], out: str | Path, *, fmt: str | None = None,
                 agent_id: str | None = None, run_id: str | None = None) -> ExportResult:
    """Write the selected flows to ``out`` as a mitmproxy flow file or a HAR file; of several stores (one per
    rank or node), all of theirs in the order of their requests. Flows are read and written one by one."""
    from rollouttap.addon import export_flows as conv  # imports mitmproxy

    chosen = format_for(out, fmt)
    paths = [store_path] if isinstance(store_path, (str, Path)) else list(store_path)
    check_export(paths, out, agent_id=agent_id, run_id=run_id)  # before any file is opened
    with ExitStack() as stack:
        stores = [stack.enter_context(Store(path, readonly=True)) for path in paths]
        flows = _in_request_order(stores, agent_id, run_id) if len(stores) > 1 else \
            select_flows(stores[0], agent_id=agent_id, run_id=run_id)
        count = conv.write_har(flows, out) if chosen == "har" else conv.write_flow_file(flows, out)
    log.debug("exported %d flows to %s (%s)", count, out, chosen)
    return ExportResult(Path(out), chosen, count)


def _in_request_order(stores: list[Store], agent_id: str | None, run_id: str | None) -> Iterator[FlowRecord]:
    """The stores' selected flows by request time (ties: store, then capture order), fetched one at a time."""
    keys = sorted((t or 0.0, i, row_id) for i, store in enumerate(stores)
                  for row_id, t in store.flow_times(agent_id=agent_id, run_id=run_id))
    for _, i, row_id in keys:
        flow = stores[i].flow_at(row_id)
        if flow is not None:  # pruned since its time was read
            yield flow


def check_export(store_paths: Sequence[str | Path], out: str | Path, *, agent_id: str | None = None,
                 run_id: str | None = None) -> None:
    """Refuse an export that cannot work or would destroy data: an agent and a run at once, an output that is
    one of the stores read (or a file SQLite keeps beside one), an existing SQLite database, a directory, or
    ``-`` (an export is written whole to a file, then moved into place)."""
    _check_selection(agent_id, run_id)
    target = Path(out)
    if str(out) == "-":
        raise ConfigError("export writes a file, not stdout: give a file name, e.g. -o flows.har")
    resolved = target.resolve()
    for store in map(Path, store_paths):
        own = store.resolve()
        if resolved in {own, *(own.with_name(own.name + side) for side in SIDE_FILES)} or same_file(target, store):
            raise ConfigError(f"{out} is the store {store} (or a file SQLite keeps beside it): writing the export "
                              f"there would destroy the store; give another output file")
    if target.is_dir():
        raise ConfigError(f"{out} is a directory: give a file name in it, e.g. {target / 'flows.har'}")
    if _is_sqlite(target):
        raise ConfigError(f"{out} is a SQLite database (a store?): an export does not overwrite one; give another "
                          f"output file, or delete that one first")


def same_file(a: Path, b: Path) -> bool:
    """Whether two existing paths name one file (a hard link escapes ``resolve``)."""
    try:
        return a.samefile(b)
    except OSError:
        return False


def _is_sqlite(path: Path) -> bool:
    if not path.is_file():  # reading /dev/stdout (a pipe's read end) or a FIFO would wait for ever
        return False
    try:
        with open(path, "rb") as fo:
            return fo.read(len(SQLITE_MAGIC)) == SQLITE_MAGIC
    except OSError:  # not there (the usual case), or unreadable: writing it says why
        return False


def _check_selection(agent_id: str | None, run_id: str | None) -> None:
    if agent_id is not None and run_id is not None:
        raise ConfigError("export one agent or one run, not both")
