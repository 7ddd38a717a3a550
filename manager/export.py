"""Export stored flows to mitmproxy's flow file (``mitmweb -r FILE``) or to HAR.

The conversion itself lives in ``rollouttap.addon.export_flows`` (the addon package is the one place that
imports mitmproxy); it is imported only when an export runs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from rollouttap.errors import ConfigError
from rollouttap.store import FlowRecord, Store

log = logging.getLogger(__name__)

Format = Literal["mitm", "har"]
FORMATS: tuple[Format, ...] = ("mitm", "har")

__all__ = ["FORMATS", "ExportResult", "Format", "export_flows", "format_for", "select_flows"]


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


def select_flows(store: Store, *, agent_id: str | None = None, run_id: str | None = None) -> list[FlowRecord]:
    """One agent's flows, one run's, or (neither given) every flow in the store, in capture order."""
    if agent_id is not None and run_id is not None:
        raise ConfigError("export one agent or one run, not both")
    return store.flows(agent_id=agent_id, run_id=run_id)


def export_flows(store_path: str | Path | Sequence[str | Path], out: str | Path, *, fmt: str | None = None,
                 agent_id: str | None = None, run_id: str | None = None) -> ExportResult:
    """Write the selected flows to ``out`` as a mitmproxy flow file or a HAR file; of several stores (one per
    rank or node), all of theirs in the order of their requests."""
    from rollouttap.addon import export_flows as conv  # imports mitmproxy

    chosen = format_for(out, fmt)
    paths = [store_path] if isinstance(store_path, (str, Path)) else list(store_path)
    flows: list[FlowRecord] = []
    for path in paths:
        with Store(path, readonly=True) as store:
            flows += select_flows(store, agent_id=agent_id, run_id=run_id)
    if len(paths) > 1:
        flows.sort(key=lambda flow: flow.t_request or 0.0)
    count = conv.write_har(flows, out) if chosen == "har" else conv.write_flow_file(flows, out)
    log.debug("exported %d flows to %s (%s)", count, out, chosen)
    return ExportResult(Path(out), chosen, count)
