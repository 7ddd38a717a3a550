"""``rollouttap flows|show|export|replay|resend|stats``: look at what a store holds, and reproduce runs from it.

Thin commands: the figures come from ``rollouttap.manager.inspect``, exports from ``manager.export``, replays
from ``manager.replay``; human views are drawn by ``cli_render`` (rich), ``--json`` prints plain JSON (one object
per line for lists).
"""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from rollouttap.cli_render import (
    flows_table, load_tokenizer, print_conversation, print_fidelity, print_mapping, replay_exits, row_text, secs,
    show_head,
)
from rollouttap.errors import ConfigError, NotFoundError

StoresOpt = Annotated[list[Path], typer.Option("--store", metavar="<path>", help="The store file to read; "
                                                            "repeat it for several (a store per rank or node).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of the human view.")]
JsonLinesOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object per line (one per item) instead "
                                                           "of the human view.")]
TABLE_ROWS = 1000  # the most flows `flows` draws as a table unless --limit says otherwise


def _console(*, stderr: bool = False) -> Console:
    console = Console(highlight=False, stderr=stderr)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = 160  # piped or captured: rich's 80 columns would squeeze the tables unreadable
    return console


def _print_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, ensure_ascii=False, default=str))


def _open(store: Path, *, readonly: bool = True) -> Any:
    from rollouttap.store import Store
    return Store(store, readonly=readonly, create=False)


def _distinct(stores: list[Path]) -> list[Path]:
    """The stores given, each once however it was named, a hard link included (counted twice, its figures would
    double)."""
    seen: dict[Any, Path] = {}
    for path in stores:
        try:
            stat = path.stat()
            key: Any = (stat.st_dev, stat.st_ino)
        except OSError:  # missing: opening it says so
            key = path.resolve()
        seen.setdefault(key, path)
    return list(seen.values())


def _store_of(agent_id: str, stores: list[Path]) -> Path:
    """The one of ``stores`` that holds the agent (a store per rank: any of them may); an id that more than one
    holds (a hand-run tag used on two nodes) is refused, rather than shown in part."""
    holding, missing = [], []
    for path in _distinct(stores):
        if not path.exists():  # a rank that never wrote: another may hold the agent (one that fails to read: an error)
            missing.append(path)
            continue
        with _open(path) as s:
            if s.agent(agent_id) is not None or s.flows(agent_id=agent_id, limit=1):
                holding.append(path)
    if not holding and missing:
        _open(missing[0])  # says there is no store there
    if not holding:
        raise NotFoundError(f"no agent {agent_id!r} in {' or '.join(map(str, stores))}")
    if len(holding) > 1:
        raise ConfigError(f"agent {agent_id!r} is in {' and '.join(map(str, holding))}: name the one --store to read")
    return holding[0]


# -- flows ---------------------------------------------------------------------------------------------------------

def flows(
    store: StoresOpt = [Path("runs.db")],  # a list default: nothing mutates it
    agent: Annotated[Optional[str], typer.Option(help="Only this agent's flows.")] = None,
    state: Annotated[Optional[str], typer.Option(help="open, done or error.")] = None,
    host: Annotated[Optional[str], typer.Option(help="Only requests to this HOST[:PORT].")] = None,
    since: Annotated[Optional[str], typer.Option(help="Requests at or after (ISO 8601, UTC unless it gives an "
                                                      "offset; or unix seconds).")] = None,
    until: Annotated[Optional[str], typer.Option(help="Requests before (ISO 8601, UTC unless it gives an offset; "
                                                      "or unix seconds).")] = None,
    unattributed: Annotated[bool, typer.Option(help="Only flows no agent was found for.")] = False,
    run: Annotated[Optional[str], typer.Option(help="Only flows of this run's agents.")] = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="At most this many flows (the table: 1,000 unless "
                                                            "told; --json: all).")] = None,
    as_json: JsonLinesOpt = False,
) -> None:
    """List captured flows, oldest first (of several stores: each flow with its store).

    Example: rollouttap flows --store runs.db --agent ag-1 --state error
    """
    from rollouttap.manager.inspect import flow_row, host_port, parse_when
    if state is not None and state not in ("open", "done", "error"):
        raise ConfigError(f"--state {state!r}: expected open, done or error")
    if unattributed and (agent is not None or run is not None):
        raise ConfigError("--unattributed lists flows of no agent: not with --agent or --run")
    start, end = parse_when(since) if since else None, parse_when(until) if until else None
    if start is not None and end is not None and start >= end:
        raise ConfigError(f"--since {since} is not before --until {until}: no flow could match")
    host_name, port = host_port(host) if host is not None else (None, None)
    stores = _distinct(store)
    names = " + ".join(map(str, stores))
    filters = dict(agent_id=agent, state=state, host=host_name, port=port, unattributed=unattributed, run_id=run,
                   since=start, until=end)
    # The table draws ~1 ms a row (a 100k-flow store took minutes): past TABLE_ROWS it says how many more match.
    capped = limit is None and not as_json
    wanted = TABLE_ROWS + 1 if capped else limit
    found: list[tuple[Path, Any]] = []
    matching = 0  # how many flows match in all, where the table is capped
    known_agent = known_run = False
    for path in stores:
        with _open(path) as s:  # flows without their bodies: a listing of a store of any size stays small
            listing = s.flow_listing(limit=wanted, **filters)
            found += [(path, listed) for listed in listing]
            if capped:
                matching += len(listing) if len(listing) < TABLE_ROWS + 1 else s.count_flows(**filters)
            if agent is not None and not known_agent:
                known_agent = s.agent(agent) is not None or bool(s.flows(agent_id=agent, limit=1))
            if run is not None and not known_run:
                known_run = bool(s.agents(run))
    if not found and agent is not None and not known_agent:
        raise NotFoundError(f"no agent {agent!r} in {names}")
    if not found and run is not None and not known_run:
        raise NotFoundError(f"no run {run!r} in {names}")
    if len(stores) > 1:  # each store's flows come oldest first; together, by the time of their request
        found.sort(key=lambda pf: pf[1][0].t_request or 0.0)
    found = found[:TABLE_ROWS if capped else limit]
    rows = [{**flow_row(*listed), **({"store": str(path)} if len(stores) > 1 else {})} for path, listed in found]
    if as_json:
        for row in rows:
            _print_json(row)
        return
    console = _console()
    console.print(flows_table(rows, names, several=len(stores) > 1, matching=matching if capped else len(rows)))
    if len(rows) < matching:
        console.print(f"{matching - len(rows):,} more flows match: narrow them (--agent, --state, --host, --since, "
                      f"--until), or list them all with --json or --limit {matching}.")


def show(
    agent_id: Annotated[str, typer.Argument(help="The agent to show.")],
    store: StoresOpt = [Path("runs.db")],  # a list default: nothing mutates it
    tokens: Annotated[bool, typer.Option(help="Also show the training row (env mask) and its fidelity.")] = False,
    tokenizer: Annotated[Optional[str], typer.Option(
        help="tokenizer.json (or its directory) to decode ids; 'fake' for the scripted test server's "
             "(implies --tokens).")] = None,
    eos_token_id: Annotated[Optional[int], typer.Option(
        min=0, help="eos id (default: the tokenizer's; implies --tokens).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Show an agent's conversation: roles, tool calls, reasoning, timings, errors; --tokens adds its row.

    Example: rollouttap show ag-1 --store runs.db --tokens --tokenizer ./model
    """
    from rollouttap.manager.conversation import build_conversation, calls_in_order
    from rollouttap.manager.inspect import UNKNOWN_EOS, short_line
    from rollouttap.manager.results import FAILED_STATUSES
    from rollouttap.manager.rows import build_row
    with _open(_store_of(agent_id, store)) as s:
        agent = s.agent(agent_id)
        found = s.flows(agent_id=agent_id)
    conv = build_conversation(found)
    calls = calls_in_order(conv, found)
    tokens = tokens or tokenizer is not None or eos_token_id is not None  # given only to be used by the row
    decode, tok_eos = load_tokenizer(tokenizer) if tokens else (None, None)
    eos = eos_token_id if eos_token_id is not None else tok_eos
    row = fidelity = None
    if tokens:
        built, report = build_row(calls, eos_token_id=UNKNOWN_EOS if eos is None else eos)
        row, fidelity = built.as_dict(), report.as_dict()
        if eos is None:  # as stats says it: without an eos id every row would read as cut
            row["truncated"] = fidelity["truncated"] = None
    if as_json:
        out = {"agent": asdict(agent) if agent else None, "conversation": conv.to_dict()}
        if row is not None and fidelity is not None:
            out.update(row=row, fidelity=fidelity)
        _print_json(out)
        return
    console = _console()
    console.print(Text(show_head(agent_id, agent, len(calls), len(found)), style="bold"))
    if agent is not None and agent.status in FAILED_STATUSES:
        why = short_line(agent.meta.get("error"), 300) or "no error recorded"
        console.print(Text(f"  ✗ {why}", style="bold red"))
    print_conversation(console, conv)
    if row is not None and fidelity is not None:
        plain = console.color_system is None
        legend = ("⟦sampled, mask 1⟧ · env, mask 0" if plain
                  else "dim: prompt · green: sampled, mask 1 · yellow: env, mask 0")
        console.print(Text(f"── training row ({legend})", "bold"))
        console.print(row_text(row["prompt_ids"], row["completion_ids"], row["env_mask"], decode, marks=plain))
        print_fidelity(console, "fidelity", fidelity)


# -- export / stats -----------------------------------------------------------------------------------------------

def export(
    out: Annotated[Path, typer.Option("-o", "--out", help="File to write.")],
    store: StoresOpt = [Path("runs.db")],  # a list default: nothing mutates it
    agent: Annotated[Optional[str], typer.Option(help="Only this agent's flows.")] = None,
    run: Annotated[Optional[str], typer.Option(help="Only this run's flows.")] = None,
    fmt: Annotated[Optional[str], typer.Option("--format", help="mitm (flow file) or har; default from -o.")] = None,
) -> None:
    """Export flows (one agent, one run, or all; of one store or several) to a mitmproxy flow file or HAR.

    Example: rollouttap export --store runs.db --agent ag-1 --format mitm -o ag-1.flows && mitmweb -r ag-1.flows
    """
    from rollouttap.manager.export import check_export, export_flows
    stores = _distinct(store)
    check_export(stores, out, agent_id=agent, run_id=run)  # what is asked for can work, before any store is read
    selected = False
    for path in stores:
        with _open(path) as s:
            selected = selected or bool(s.flows(agent_id=agent, run_id=run, limit=1))
    if not selected and (agent is not None or run is not None):
        what = " and ".join(f"{k} {v!r}" for k, v in (("agent", agent), ("run", run)) if v is not None)
        raise NotFoundError(f"no flows of {what} in {' or '.join(map(str, stores))}")
    result = export_flows(stores, out, fmt=fmt, agent_id=agent, run_id=run)
    typer.echo(f"wrote {result.flows} flows to {result.path} ({result.format})")


def stats(
    store: StoresOpt = [Path("runs.db")],  # a list default: nothing mutates it
    run: Annotated[Optional[str], typer.Option(help="Only this run.")] = None,
    eos_token_id: Annotated[Optional[int], typer.Option(min=0, help="eos id, for the truncation count.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Agents by status, calls, tokens, latency percentiles, unattributed flows, errors, fidelity.

    Example: rollouttap stats --store runs.db --run run-1
             rollouttap stats --store runs-0.db --store runs-1.db
    """
    from rollouttap.manager.inspect import UNKNOWN_EOS, store_stats
    store = _distinct(store)
    with ExitStack() as stack:
        opened = [stack.enter_context(_open(path)) for path in store]
        figures = store_stats(opened, run_id=run, eos_token_id=UNKNOWN_EOS if eos_token_id is None else eos_token_id)
    names = " + ".join(map(str, store))
    if run is not None and not figures["agents"]:
        raise NotFoundError(f"no agents of run {run!r} in {names}")
    if as_json:
        _print_json(figures)
        return
    console = _console()
    flat: dict[str, Any] = {
        "agents": figures["agents"],
        "agents by status": ", ".join(f"{k} {v}" for k, v in figures["agents_by_status"].items()) or "-",
        "flows": figures["flows"], "flow errors": figures["flow_errors"],
        "unattributed flows": figures["unattributed_flows"],
        "model calls": figures["calls"], "failed calls": figures["failed_calls"],
        "discontinuities": figures["discontinuities"],
    }
    flat.update({f"tokens: {k.removesuffix('_tokens')}": v for k, v in figures["usage"].items()})
    for name in ("latency", "ttfb"):
        flat[f"{name} p50 / p90 / p99"] = " / ".join(secs(figures[name][p]) for p in ("p50", "p90", "p99"))
    print_mapping(console, f"stats of {f'run {run}' if run else names}", flat)
    if figures["fidelity"]:
        print_fidelity(console, "fidelity (a failed agent's row trains nothing)", figures["fidelity"])


# -- replay / resend ----------------------------------------------------------------------------------------------

def replay(
    agent_id: Annotated[str, typer.Argument(help="The recorded agent to replay.")],
    command: Annotated[list[str], typer.Argument(help="The agent command, after --.")],
    store: StoresOpt = [Path("runs.db")],  # a list default: nothing mutates it
    out: Annotated[Optional[Path], typer.Option(help="Store the replayed run is recorded into.")] = None,
    model_host: Annotated[Optional[list[str]], typer.Option(help="HOST:PORT asked for token ids "
                                                            "(default: as recorded).")] = None,
    route: Annotated[Optional[list[str]], typer.Option(help="HOST[:PORT]=BASE_URL, as in the recorded run.")] = None,
    confdir: Annotated[Optional[Path], typer.Option(help="mitmproxy config dir (its CA).")] = None,
    timeout: Annotated[float, typer.Option(min=0.001, help="Seconds the agent may run.")] = 600.0,
    as_json: JsonOpt = False,
) -> None:
    """Re-run an agent offline: the proxy answers its requests from the recording, in order.

    Reports the first request that differs from the recording (with a diff); that request and all later ones
    get HTTP 599. Exit status 1 on divergence, else the agent's.

    Example: rollouttap replay ag-1 --store runs.db --out replay.db -- python agent.py "the prompt"
    """
    from rollouttap.manager.replay import replay_agent
    # With --json stdout holds the JSON alone: the agent's own output is captured into it.
    result = replay_agent(_store_of(agent_id, store), agent_id, command, out=out, confdir=confdir,
                          model_hosts=model_host, routes=route or (), timeout=timeout, capture_output=as_json)
    if as_json:
        _print_json(asdict(result))
    else:
        _print_replay(result)
    if result.exit_status:
        raise SystemExit(result.exit_status)


def _print_replay(result: Any) -> None:
    console = _console(stderr=True)
    console.soft_wrap = True  # paths, reasons and diff lines stay whole
    where = f"recorded into {result.store} as {result.replay_agent_id}"
    div = result.divergence
    if div is None:
        lost = result.unreplayable
        console.print((f"[green]replay matched[/]: {result.answered}/{result.recorded} requests answered from the "
                       "recording" if not lost else
                       f"[yellow]replay matched, but {len(lost)} answer(s) could not be given back[/] (requests "
                       f"#{', #'.join(map(str, lost))}, answered 502; the replay store's flows say why): "
                       f"{result.answered}/{result.recorded} requests made") + f"; {replay_exits(result)}; {where}")
        return
    console.print(f"[bold red]replay diverged[/] at request #{div['index']}"
                  + (f" (recorded #{div['recorded_index']}: {div['expected']})" if div["expected"] else "")
                  + f": {escape(div['reason'])}")
    if div["diff"]:
        console.print(Syntax(div["diff"], "diff", theme="ansi_dark"), soft_wrap=True)
    console.print(f"{result.answered}/{result.recorded} answered; {replay_exits(result)}; {where}")


def resend(
    agent_id: Annotated[str, typer.Argument(help="The agent whose model requests to send again.")],
    to: Annotated[str, typer.Option(help="Base URL of the server to ask, e.g. http://127.0.0.1:8000/v1.")],
    store: StoresOpt = [Path("runs.db")],  # a list default: nothing mutates it
    header: Annotated[Optional[list[str]], typer.Option(help="'Name: value' to add (the recorded keys are "
                                                        "redacted), e.g. 'Authorization: Bearer KEY'.")] = None,
    timeout: Annotated[float, typer.Option(min=0.001, help="Seconds per request.")] = 120.0,
    as_json: JsonLinesOpt = False,
) -> None:
    """Send an agent's recorded model requests, as it sent them, to another server; show old vs new answers.

    Example: rollouttap resend ag-1 --store runs.db --to http://127.0.0.1:8001/v1
    """
    from rollouttap.manager.replay import resend_requests
    extra = {}
    for item in header or []:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise ConfigError(f"--header {item!r} is not 'Name: value'")
        extra[name.strip()] = value.strip()
    path = _store_of(agent_id, store)
    with _open(path) as s:
        found = s.flows(agent_id=agent_id)
    if not found:
        raise NotFoundError(f"no flows of agent {agent_id!r} in {path}")
    results = resend_requests(found, to, headers=extra, timeout=timeout)
    if not results:  # an empty table said nothing
        raise NotFoundError(f"agent {agent_id!r} made no model request to resend: its {len(found)} flows in {path} "
                            f"are not model calls with a body")
    if as_json:
        for r in results:
            _print_json({k: v for k, v in asdict(r).items() if k != "new_body"})
    else:
        _print_resent(results, agent_id, to)
    sent = [r for r in results if not (r.error or "").startswith("not sent")]
    if results and not sent:
        raise ConfigError(f"no request was sent: {results[0].error}")
    if sent and all(r.error is not None for r in sent):
        raise ConfigError(f"no request got an answer from --to {to}: {sent[0].error}")


def _print_resent(results: list[Any], agent_id: str, to: str) -> None:
    table = Table("#", "request", "recorded answer", "new answer", title=f"{agent_id}: recorded vs {to}")
    for r in results:
        new = r.new_answer if r.error is None else f"[red]{escape(r.error)}[/]"
        table.add_row(str(r.index), f"{r.method} {escape(r.path)}",
                      f"[dim]{r.old_status} · {secs(r.old_latency)}[/]\n{escape(r.old_answer)}",
                      f"[dim]{r.new_status} · {secs(r.new_latency)}[/]\n{new if r.error else escape(new)}")
    _console().print(table)


def prune(
    store: Annotated[Path, typer.Option(help="The store file to prune.")] = Path("runs.db"),
    older_than: Annotated[Optional[str], typer.Option(help="Age of what goes: 90, 30m, 6h, 2d.")] = None,
    before: Annotated[Optional[str], typer.Option(help="Or a time: unix seconds or ISO 8601 (UTC unless it gives "
                                                       "an offset).")] = None,
) -> None:
    """Delete the agents that ended before a time, whole, and other flows requested before it (never an open
    flow nor a running agent's): a store that a long training run writes to stops growing. Its file keeps its
    size: new flows reuse the space.

    Example: rollouttap prune --store runs.db --older-than 6h
    """
    import time

    from rollouttap.manager.inspect import parse_age, parse_when
    if (older_than is None) == (before is None):
        raise ConfigError("give --older-than or --before (one of them)")
    cutoff = time.time() - parse_age(older_than, "--older-than") if older_than is not None else parse_when(before or "")
    with _open(store):  # refused as every reading command refuses it (an empty file, another database)
        pass
    with _open(store, readonly=False) as s:
        flows_deleted, agents_deleted = s.prune(cutoff)
    typer.echo(f"deleted {flows_deleted} flows and {agents_deleted} agents from {store}")


def register(app: typer.Typer) -> None:
    """Add the inspection commands to the ``rollouttap`` app."""
    app.command()(flows)
    app.command()(show)
    app.command()(export)
    app.command()(stats)
    app.command()(replay)
    app.command()(resend)
    app.command()(prune)
