"""``rollouttap run``: one agent per prompt behind the capture proxy; results as JSON lines, a summary table."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import IO, Annotated, Any, Optional

import typer

from rollouttap.errors import ConfigError
from rollouttap.paths import open_private


def register(app: typer.Typer) -> None:
    """Add the ``run`` command to the rollouttap CLI."""
    app.command("run")(run)


def read_prompts(lines: list[str], source: str = "prompts") -> list[Any]:
    """Prompts from JSON lines: a string, a message list, or an object with ``prompt`` (or ``messages``)."""
    prompts: list[Any] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as exc:
            raise ConfigError(f"{source} line {number} is not JSON: {exc}") from exc
        if isinstance(item, dict):
            item = item.get("prompt", item.get("messages"))
        if not (isinstance(item, str) or (isinstance(item, list) and all(isinstance(m, dict) for m in item))):
            raise ConfigError(f"{source} line {number}: expected a JSON string, a message list, "
                              'or {"prompt": ...}')
        prompts.append(item)
    if not prompts:
        raise ConfigError(f"{source} holds no prompt: one JSON value per line")
    return prompts


def read_prompts_file(path: Path) -> list[Any]:
    """The prompts of a JSON-lines file (a byte-order mark, which some editors write, is not part of it)."""
    return read_prompts(path.read_text(encoding="utf-8-sig").splitlines(), str(path))


def parse_env(pairs: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` options as a dict."""
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--env {pair!r} is not KEY=VALUE")
        env[key] = value
    return env


def run(
    prompts: Annotated[Path, typer.Option(help="JSON lines: each a string, a message list or {\"prompt\": ...}.",
                                          exists=True, dir_okay=False)],
    agent: Annotated[Optional[str], typer.Option(
        help="Command template; {prompt}, {prompt_file}, {workdir}, {agent_id} are filled per agent "
             "(a message-list prompt is passed as JSON).")] = None,
    entry: Annotated[Optional[str], typer.Option(help="Python entry point module:function(prompt).")] = None,
    stdin: Annotated[bool, typer.Option(help="Also give the prompt to --agent on stdin.")] = False,
    parallel: Annotated[int, typer.Option(min=1, help="Agents running at once.")] = 16,
    timeout: Annotated[float, typer.Option(min=0.001, help="Seconds before an agent's tree is killed.")] = 600.0,
    store: Annotated[Path, typer.Option(help="SQLite store every flow is recorded into.")] = Path("runs.db"),
    model_url: Annotated[Optional[str], typer.Option(
        help="The model server's OpenAI base URL, e.g. http://127.0.0.1:8000/v1.")] = None,
    proxy: Annotated[Optional[str], typer.Option(
        help="Attach to a running `rollouttap proxy` at this URL instead of starting one.")] = None,
    proxies: Annotated[int, typer.Option(
        min=1, help="Proxies to start, agents spread over them (one event loop each; for many agents).")] = 1,
    out: Annotated[Optional[Path], typer.Option(
        help="Write results here (JSON lines, each with its run_id); default stdout.")] = None,
    base_url_mode: Annotated[bool, typer.Option(
        help="Give agents a per-agent base URL through a reverse listener (clients ignoring HTTP_PROXY).")]
        = False,
    workdir_template: Annotated[Optional[Path], typer.Option(
        help="Directory copied into each agent's fresh workdir.", exists=True, file_okay=False)] = None,
    check: Annotated[Optional[str], typer.Option(help="Shell command run in each workdir afterwards.")] = None,
    env: Annotated[Optional[list[str]], typer.Option(help="KEY=VALUE for every agent (repeatable).")] = None,
    grace: Annotated[float, typer.Option(min=0, help="Seconds to wait for an agent's flows to close.")] = 10.0,
    confdir: Annotated[Optional[Path], typer.Option(help="mitmproxy config dir (its CA).")] = None,
    keep_workdirs: Annotated[bool, typer.Option(help="Keep each agent's workdir.")] = False,
    eos_token_id: Annotated[Optional[int], typer.Option(
        min=0, help="The policy tokenizer's eos id: each result then carries its training row (token ids, mask, "
             "logprobs) and fidelity.")] = None,
    keep_for: Annotated[Optional[str], typer.Option(
        help="First delete from the store what ended longer ago than this (90, 30m, 6h, 2d), as "
             "`rollouttap prune --older-than` does.")] = None,
) -> None:
    """Run one fresh agent per prompt behind the capture proxy; write one result per prompt.

    Example: rollouttap run --agent 'python agent.py {prompt}' --prompts prompts.jsonl
    --model-url http://127.0.0.1:8000/v1 --parallel 16 --timeout 600 --out results.jsonl

    Agents that fail or time out are reported, not fatal: the exit code is 0 unless the run itself fails.
    """
    from rollouttap.manager import AgentManager, CommandAgent, EntryPointAgent
    from rollouttap.manager.inspect import parse_age
    if (agent is None) == (entry is None):
        raise ConfigError("give exactly one of --agent and --entry")
    items = read_prompts_file(prompts)
    if entry is not None and "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` would: --entry names modules beside the user
    spec = (CommandAgent(agent, stdin=stdin, check=check) if agent is not None
            else EntryPointAgent(entry, check=check))  # type: ignore[arg-type]
    started_at, started = time.time(), time.monotonic()
    keep = None if keep_for is None else parse_age(keep_for, "--keep-for")
    manager = AgentManager(spec, store=store, parallel=parallel, timeout=timeout, proxy=proxy, model_url=model_url,
                           env=parse_env(env or []), base_url_mode=base_url_mode, workdir_template=workdir_template,
                           grace=grace, confdir=confdir, keep_workdirs=keep_workdirs, proxies=proxies,
                           eos_token_id=eos_token_id, keep_for=keep)
    sink: IO[str] = open_private(out, "w", encoding="utf-8") if out is not None else _stdout()
    # SIGTERM (a job scheduler, `timeout`, torchrun) ends the run as Ctrl-C does: running agents are killed
    # and recorded, the proxy commits. Its default would leave the agents running unsupervised.
    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    results: list[Any] = []  # as they come: an interrupted run still reports every prompt
    summary: dict[str, Any] | None = None
    interrupted = False
    try:
        with manager:
            try:
                _deploy_with_progress(manager, items, sink, results)
            except KeyboardInterrupt:
                interrupted = True
                # A second Ctrl-C broke deploy() off before every agent was killed and reported: wait for
                # them, their lines still come (a third Ctrl-C ends the wait).
                manager.cancel()
            summary = manager.summary(results, since=started_at)
    except KeyboardInterrupt:  # a later Ctrl-C: while waiting for the agents, or while the proxy shut down
        interrupted = True
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        if out is not None:
            sink.close()
    if summary is None:  # the store is closed by now: the manager sums the results alone
        summary = manager.summary(results)
    summary["wall_seconds"] = round(time.monotonic() - started, 3)
    _print_summary(summary, manager.run_id, store, interrupted=interrupted)
    if interrupted:
        raise KeyboardInterrupt  # exit status 130, as for any interrupted command


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _stdout() -> IO[str]:
    return sys.stdout


def _deploy_with_progress(manager: Any, items: list[Any], sink: IO[str], results: list[Any]) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    counts = {"ok": 0, "failed": 0, "timeout": 0, "error": 0}
    with Progress(TextColumn("agents"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                  TimeElapsedColumn(), console=Console(stderr=True), transient=False) as progress:
        task = progress.add_task("", total=len(items))

        def done(result: Any) -> None:
            # Results go out as they finish (an interrupted deploy reports its killed and never started
            # agents too), so an interrupted run keeps what it has.
            results.append(result)
            sink.write(json.dumps({**result.to_dict(), "run_id": manager.run_id}) + "\n")  # what --run takes
            sink.flush()
            counts[result.status] += 1
            progress.update(task, advance=1, description=" ".join(f"{k} {v}" for k, v in counts.items() if v))
        manager.deploy(items, progress=done)


def _print_summary(summary: dict[str, Any], run_id: str, store: Path, *, interrupted: bool = False) -> None:
    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"run {run_id}" + (" (interrupted)" if interrupted else ""), show_header=False)
    table.add_column("", style="bold")
    table.add_column("", justify="right")
    by_status = summary["by_status"]
    for status in ("ok", "failed", "timeout", "error"):
        table.add_row(status, str(by_status.get(status, 0)))
    table.add_row("model calls (failed: HTTP errors, cut off)", f"{summary['calls']} ({summary['failed_calls']})")
    if summary["sampled_tokens"]:  # rows were built (an eos id was given)
        trained, sampled = summary["trainable_tokens"], summary["sampled_tokens"]
        table.add_row("trained / sampled tokens", f"{trained} / {sampled} ({trained / sampled:.0%})")
    table.add_row("tokens (prompt / completion)", f"{summary['prompt_tokens']} / {summary['completion_tokens']}")
    table.add_row("time (wall / agents)", f"{summary['wall_seconds']:.1f}s / {summary['agent_seconds']:.1f}s")
    table.add_row("unattributed flows", str(summary.get("unattributed_flows", 0)))
    table.add_row("incomplete flows", str(summary["incomplete_flows"]))
    table.add_row("bypassing agents (direct connections)",
                  f"{summary['bypass_agents']} ({summary['bypass_connections']})")
    table.add_row("proxy restarts", str(summary["proxy_restarts"]))
    console = Console(stderr=True)
    console.print(table)
    for error, count in summary.get("top_errors", []):  # why agents failed, when they all fail alike
        console.print(f"{count} × {error[:200]}", markup=False, highlight=False)
    console.print(f"store: {store}")
