"""``rollouttap flows|show|export|replay|resend|stats``: look at what a store holds, and reproduce runs from it.

Thin commands: the figures come from ``rollouttap.manager.inspect``, exports from ``manager.export``, replays
from ``manager.replay``. Human views use rich; ``--json`` prints plain JSON (one object per line for lists).
"""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text

from rollouttap.errors import ConfigError, NotFoundError, StoreError

StoreOpt = Annotated[Path, typer.Option("--store", help="The store file to read.")]
StoresOpt = Annotated[list[Path], typer.Option("--store", metavar="<path>", help="The store file to read; "
                                                            "repeat it for several (a store per rank or node).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of the human view.")]
JsonLinesOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object per line (one per item) instead "
                                                           "of the human view.")]
ROLE_STYLES = {"system": "magenta", "user": "cyan", "assistant": "green", "tool": "yellow"}


def _console(*, stderr: bool = False) -> Console:
    console = Console(highlight=False, stderr=stderr)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = 160  # piped or captured: rich's 80 columns would squeeze the tables unreadable
    return console


def _print_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, ensure_ascii=False, default=str))


def _open(store: Path) -> Any:
    from rollouttap.store import Store
    if not store.exists():
        raise StoreError(f"no store at {store}")
    return Store(store, readonly=True)


def _distinct(stores: list[Path]) -> list[Path]:
    """The stores given, each once however it was named (counted twice, its figures would double)."""
    return list({path.resolve(): path for path in stores}.values())


def _store_of(agent_id: str, stores: list[Path]) -> Path:
    """The one of ``stores`` that holds the agent (a store per rank: any of them may)."""
    for path in stores:
        with _open(path) as s:
            if s.agent(agent_id) is not None or s.flows(agent_id=agent_id, limit=1):
                return path
    raise NotFoundError(f"no agent {agent_id!r} in {' or '.join(map(str, stores))}")


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}s"


# -- flows ---------------------------------------------------------------------------------------------------------

def flows(
    store: StoresOpt = [Path("runs.db")],  # a list default: nothing mutates it
    agent: Annotated[Optional[str], typer.Option(help="Only this agent's flows.")] = None,
    state: Annotated[Optional[str], typer.Option(help="open, done or error.")] = None,
    host: Annotated[Optional[str], typer.Option(help="Only requests to this host.")] = None,
    since: Annotated[Optional[str], typer.Option(help="Requests at or after (ISO 8601 or unix seconds).")] = None,
    until: Annotated[Optional[str], typer.Option(help="Requests before (ISO 8601 or unix seconds).")] = None,
    unattributed: Annotated[bool, typer.Option(help="Only flows no agent was found for.")] = False,
    run: Annotated[Optional[str], typer.Option(help="Only flows of this run's agents.")] = None,
    limit: Annotated[Optional[int], typer.Option(min=1, help="At most this many flows.")] = None,
    as_json: JsonLinesOpt = False,
) -> None:
    """List captured flows, oldest first (of several stores: each flow with its store).

    Example: rollouttap flows --store runs.db --agent ag-1 --state error
    """
    from rollouttap.manager.inspect import flow_row, parse_when
    if state is not None and state not in ("open", "done", "error"):
        raise ConfigError(f"--state {state!r}: expected open, done or error")
    stores = _distinct(store)
    names = " + ".join(map(str, stores))
    found: list[tuple[Path, Any]] = []
    known_agent = known_run = False
    for path in stores:
        with _open(path) as s:
            found += [(path, f) for f in s.flows(
                agent_id=agent, state=state, host=host, unattributed=unattributed, run_id=run, limit=limit,
                since=parse_when(since) if since else None, until=parse_when(until) if until else None)]
            if agent is not None and not known_agent:
                known_agent = s.agent(agent) is not None or bool(s.flows(agent_id=agent, limit=1))
            if run is not None and not known_run:
                known_run = bool(s.agents(run))
    if not found and agent is not None and not known_agent:
        raise NotFoundError(f"no agent {agent!r} in {names}")
    if not found and run is not None and not known_run:
        raise NotFoundError(f"no run {run!r} in {names}")
    if len(stores) > 1:  # each store's flows come oldest first; together, by the time of their request
        found.sort(key=lambda pf: pf[1].t_request or 0.0)
        found = found[:limit]
    rows = [{**flow_row(f), **({"store": str(path)} if len(stores) > 1 else {})} for path, f in found]
    if as_json:
        for row in rows:
            _print_json(row)
        return
    table = Table(title=f"{len(rows)} flows in {names}")
    columns = ["id", "time", "agent", "attribution", "method", "host", "path", "status", "state", "duration"]
    for name in (["store"] if len(stores) > 1 else []) + columns:
        table.add_column(name, no_wrap=name != "path", overflow="fold")
    table.add_column("bytes (req/resp)", no_wrap=True)
    for r in rows:
        style = {"error": "red", "open": "yellow"}.get(r["state"], "")
        table.add_row(*([escape(r["store"])] if len(stores) > 1 else []),
                      str(r["id"]), (r["time"] or "-")[11:23], r["agent"] or "[dim]-[/]", r["attribution"],
                      r["method"] or "-", escape(r["host"] or "-"), escape(r["path"] or "-"),
                      str(r["status"] or "-"), f"[{style}]{r['state']}[/]" if style else r["state"],
                      _secs(r["duration"]), f"{r['request_bytes']}/{r['response_bytes']}")
    _console().print(table)


# -- show ----------------------------------------------------------------------------------------------------------

def _call_header(call: Any, attempt: int = 0, label: str = "call") -> Text:
    text = Text(f"── {label} {call.index}", style="bold")
    again = ""
    if getattr(call, "is_retry", False):
        again = "retry"
    elif attempt:
        again = f"sample {attempt + 1} of the same request"
    thread = getattr(call, "thread", None)
    bits = [f"thread {thread}" if thread is not None else "", f"{call.path}", str(call.status_code or call.state),
            "stream" if call.stream else "", f"{_secs(call.latency)} (first byte {_secs(call.ttfb)})",
            f"finish {call.finish_reason}" if call.finish_reason else "", again]
    usage = call.usage or {}
    if usage:
        bits.append(f"tokens {usage.get('prompt_tokens', '?')}→{usage.get('completion_tokens', '?')}")
    text.append(" · " + " · ".join(b for b in bits if b), style="dim")
    return text


def _message_lines(message: dict[str, Any]) -> list[Text]:
    from rollouttap.manager.inspect import message_text, tool_call_text
    role = str(message.get("role", "?"))
    label = role + (f" [{message['tool_call_id']}]" if message.get("tool_call_id") else "")
    lines = []
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if reasoning:
        lines.append(Text.assemble((f"  {label} (reasoning) ", "dim"), (str(reasoning), "dim italic")))
    body = message_text(message.get("content"))
    if body or not message.get("tool_calls"):
        lines.append(Text.assemble((f"  {label}: ", ROLE_STYLES.get(role, "")), body))
    for tc in message.get("tool_calls") or []:
        lines.append(Text.assemble((f"  {label} → ", ROLE_STYLES.get(role, "")), (tool_call_text(tc), "bold")))
    return lines


def _print_conversation(console: Console, conv: Any) -> None:
    """Every model call in the order it was sent, then the breaks in continuity."""
    from rollouttap.manager.inspect import conversation_steps
    printers: list[tuple[int, int, Callable[[], None]]] = []

    def add(call: Any, show: Callable[[], None]) -> None:
        printers.append((call.position, len(printers), show))

    for step in conversation_steps(conv.calls):
        add(step.call, lambda step=step: _print_chat_step(console, step))
    for call in conv.completion_calls:
        add(call, lambda call=call: _print_completion_call(console, call))
    attempts: dict[int, int] = {}
    before: Any = None  # the last call of the turn before the current one
    latest: Any = None
    for call in conv.responses_calls:
        if latest is not None and latest.turn != call.turn:
            before = latest
        attempt = attempts[call.turn] = attempts.get(call.turn, -1) + 1
        add(call, lambda call=call, before=before, attempt=attempt:
            _print_responses_call(console, call, before, attempt))
        latest = call
    for _, _, show in sorted(printers, key=lambda p: p[:2]):
        show()
    for item in conv.discontinuities:
        console.print(Text(f"discontinuity: {_describe(item)}", style="yellow"))


def _print_chat_step(console: Console, step: Any) -> None:
    call = step.call
    console.print(_call_header(call, step.attempt))
    if step.starts_thread and step.attempt == 0 and call.thread > 0:
        console.print(Text("  (starts a new thread: all messages shown)", "dim"))
    elif not step.extends and not step.starts_thread:
        console.print(Text("  (does not extend this thread's previous history: all messages shown)", "dim"))
    elif step.continues is not None:
        console.print(Text(f"  (goes on with call {step.continues}'s answer)", "dim"))
    for message in step.new_messages:
        for line in _message_lines(message):
            console.print(line)
    _print_answer(console, call)


def _print_completion_call(console: Console, call: Any) -> None:
    prompt = call.prompt if isinstance(call.prompt, str) else f"<{len(call.prompt or [])} token ids>"
    console.print(Text(f"── completion call {call.index}", "bold"),
                  Text(f"· {call.path} · {call.status_code or call.state} · {_secs(call.latency)}", "dim"))
    console.print(Text.assemble(("  prompt: ", "cyan"), prompt[-400:]))
    console.print(Text.assemble(("  text: ", "green"), call.text or ""))
    if call.error:
        console.print(Text(f"  ✗ {call.error}", style="bold red"))


def _print_responses_call(console: Console, call: Any, previous: Any, attempt: int) -> None:
    """A Responses call: its input items new since the input of the previous turn's call (all of them when it
    does not start with that), then its answer."""
    console.print(_call_header(call, attempt, label="responses call"))
    items = call.messages
    before = previous.messages if previous is not None else []
    if call.previous_response_id:
        console.print(Text(f"  (goes on with response {call.previous_response_id}, stored on the server)", "dim"))
    elif before and items[:len(before)] == before:
        items = items[len(before):]
        console.print(Text(f"  (goes on from responses call {previous.index}: new input shown)", "dim"))
    for item in items:
        console.print(Text.assemble(("  input: ", "cyan"), _input_item_text(item)[-400:]))
    _print_answer(console, call)


def _print_answer(console: Console, call: Any) -> None:
    if call.response is not None:
        for line in _message_lines(call.response.to_message(include_reasoning=True)):
            console.print(line)
    if call.error:
        console.print(Text(f"  ✗ {call.error}", style="bold red"))


def _input_item_text(item: Any) -> str:
    """One Responses ``input`` item in a line: a message's text, a function call or its output."""
    from rollouttap.manager.inspect import message_text
    if not isinstance(item, dict):
        return str(item)
    kind = item.get("type", "message")
    if kind == "message" or "role" in item:
        return f"{item.get('role', '?')}: {message_text(item.get('content'))}"
    if kind == "function_call":
        return f"→ {item.get('name')}({item.get('arguments', '')}) [{item.get('call_id')}]"
    if kind == "function_call_output":
        return f"[{item.get('call_id')}] {item.get('output')}"
    return json.dumps(item)[:400]


def _describe(item: Any) -> str:
    where = f"call {item.call_index}" + (f", message {item.message_index}" if item.message_index is not None else "")
    return f"{where}: {item.kind} ({item.detail})"


def _tokenizer(spec: str | None) -> tuple[Callable[[int], str] | None, int | None]:
    """(decode one id, eos id) from ``--tokenizer``: ``fake`` (the test server's) or a tokenizer.json / dir."""
    if spec is None:
        return None, None
    if spec == "fake":
        from rollouttap.testing.fake_tokenizer import FakeTokenizer
        fake = FakeTokenizer()
        return (lambda i: fake.decode([i])), fake.eos_token_id
    from tokenizers import Tokenizer
    path = Path(spec)
    file = path / "tokenizer.json" if path.is_dir() else path
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as exc:
        raise ConfigError(f"cannot load a tokenizer from {spec}: {exc}") from exc
    eos = None
    config = file.with_name("tokenizer_config.json")
    if config.exists():
        token = json.loads(config.read_text()).get("eos_token")
        eos = tok.token_to_id(token if isinstance(token, str) else (token or {}).get("content", ""))
    return (lambda i: tok.decode([i], skip_special_tokens=False)), eos


def _row_text(prompt: list[int], completion: list[int], mask: list[int], decode: Callable[[int], str] | None,
              *, marks: bool = False) -> Text:
    """The row as text: prompt dim, sampled tokens (mask 1) green, env tokens (mask 0) yellow; ``marks`` also
    brackets sampled runs with ⟦ ⟧ for output without colours."""
    from rollouttap.manager.inspect import mask_runs
    word = decode or (lambda i: f"{i} ")
    text = Text("".join(word(i) for i in prompt), style="dim")
    for start, end, value in mask_runs(mask):
        piece = "".join(word(i) for i in completion[start:end])
        text.append(f"⟦{piece}⟧" if value and marks else piece, style="bold green" if value else "dim yellow")
    return text


def show(
    agent_id: Annotated[str, typer.Argument(help="The agent to show.")],
    store: StoresOpt = [Path("runs.db")],  # a list default: nothing mutates it
    tokens: Annotated[bool, typer.Option(help="Also show the training row (env mask) and its fidelity.")] = False,
    tokenizer: Annotated[Optional[str], typer.Option(
        help="tokenizer.json (or its directory) to decode ids; 'fake' for the scripted test server's.")] = None,
    eos_token_id: Annotated[Optional[int], typer.Option(min=0, help="eos id (default: the tokenizer's).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Show an agent's conversation: roles, tool calls, reasoning, timings, errors; --tokens adds its row.

    Example: rollouttap show ag-1 --store runs.db --tokens --tokenizer ./model
    """
    from rollouttap.manager.conversation import build_conversation, calls_in_order
    from rollouttap.manager.inspect import UNKNOWN_EOS
    from rollouttap.manager.rows import build_row
    with _open(_store_of(agent_id, store)) as s:
        agent = s.agent(agent_id)
        found = s.flows(agent_id=agent_id)
    conv = build_conversation(found)
    calls = calls_in_order(conv, found)
    decode, tok_eos = _tokenizer(tokenizer) if tokens else (None, None)
    eos = eos_token_id if eos_token_id is not None else tok_eos
    row = fidelity = None
    if tokens:
        row, fidelity = build_row(calls, eos_token_id=UNKNOWN_EOS if eos is None else eos)
    if as_json:
        out = {"agent": asdict(agent) if agent else None, "conversation": conv.to_dict()}
        if row is not None and fidelity is not None:
            out.update(row=row.as_dict(), fidelity=fidelity.as_dict())
        _print_json(out)
        return
    console = _console()
    head = f"agent {agent_id}" + (f" · {agent.status} · run {agent.run_id}" if agent else " · not registered")
    console.print(Text(head + f" · {len(calls)} calls · {len(found)} flows", style="bold"))
    _print_conversation(console, conv)
    if row is not None and fidelity is not None:
        plain = console.color_system is None
        legend = ("⟦sampled, mask 1⟧ · env, mask 0" if plain
                  else "dim: prompt · green: sampled, mask 1 · yellow: env, mask 0")
        console.print(Text(f"── training row ({legend})", "bold"))
        console.print(_row_text(row.prompt_ids, row.completion_ids, row.env_mask, decode, marks=plain))
        _print_mapping(console, "fidelity", fidelity.as_dict())


def _print_mapping(console: Console, title: str, data: dict[str, Any]) -> None:
    table = Table("figure", "value", title=title, show_header=False)
    for key, value in data.items():
        table.add_row(key, f"{value:.3f}" if isinstance(value, float) else str(value))
    console.print(table)


# -- export / stats -----------------------------------------------------------------------------------------------

def export(
    out: Annotated[Path, typer.Option("-o", "--out", help="File to write.")],
    store: StoreOpt = Path("runs.db"),
    agent: Annotated[Optional[str], typer.Option(help="Only this agent's flows.")] = None,
    run: Annotated[Optional[str], typer.Option(help="Only this run's flows.")] = None,
    fmt: Annotated[Optional[str], typer.Option("--format", help="mitm (flow file) or har; default from -o.")] = None,
) -> None:
    """Export flows (one agent, one run, or all) to a mitmproxy flow file or HAR.

    Example: rollouttap export --store runs.db --agent ag-1 --format mitm -o ag-1.flows && mitmweb -r ag-1.flows
    """
    from rollouttap.manager.export import export_flows
    if agent is not None or run is not None:
        with _open(store) as s:
            if not s.flows(agent_id=agent, run_id=run, limit=1):
                what = " and ".join(f"{k} {v!r}" for k, v in (("agent", agent), ("run", run)) if v is not None)
                raise NotFoundError(f"no flows of {what} in {store}")
    elif not store.exists():
        raise StoreError(f"no store at {store}")
    result = export_flows(store, out, fmt=fmt, agent_id=agent, run_id=run)
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
        flat[f"{name} p50 / p90 / p99"] = " / ".join(_secs(figures[name][p]) for p in ("p50", "p90", "p99"))
    _print_mapping(console, f"stats of {f'run {run}' if run else names}", flat)
    if figures["fidelity"]:
        fidelity = dict(figures["fidelity"])
        if fidelity["truncated"] is None:
            fidelity["truncated"] = "unknown without --eos-token-id"
        _print_mapping(console, "fidelity", fidelity)


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
        console.print(f"[green]replay matched[/]: {result.answered}/{result.recorded} requests answered from the "
                      f"recording; agent exit {result.exit_code}; {where}")
        return
    console.print(f"[bold red]replay diverged[/] at request #{div['index']}"
                  + (f" (recorded #{div['recorded_index']}: {div['expected']})" if div["expected"] else "")
                  + f": {escape(div['reason'])}")
    if div["diff"]:
        console.print(Syntax(div["diff"], "diff", theme="ansi_dark"), soft_wrap=True)
    timed_out = " (timed out)" if result.timed_out else ""
    console.print(f"{result.answered}/{result.recorded} answered; agent exit {result.exit_code}{timed_out}; {where}")


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
    if as_json:
        for r in results:
            _print_json({k: v for k, v in asdict(r).items() if k != "new_body"})
    else:
        _print_resent(results, agent_id, to)
    if results and all(r.error is not None for r in results):
        raise ConfigError(f"no request got an answer from --to {to}: {results[0].error}")


def _print_resent(results: list[Any], agent_id: str, to: str) -> None:
    table = Table("#", "request", "recorded answer", "new answer", title=f"{agent_id}: recorded vs {to}")
    for r in results:
        new = r.new_answer if r.error is None else f"[red]{escape(r.error)}[/]"
        table.add_row(str(r.index), f"{r.method} {escape(r.path)}",
                      f"[dim]{r.old_status} · {_secs(r.old_latency)}[/]\n{escape(r.old_answer)}",
                      f"[dim]{r.new_status} · {_secs(r.new_latency)}[/]\n{new if r.error else escape(new)}")
    _console().print(table)


def register(app: typer.Typer) -> None:
    """Add the inspection commands to the ``rollouttap`` app."""
    app.command()(flows)
    app.command()(show)
    app.command()(export)
    app.command()(stats)
    app.command()(replay)
    app.command()(resend)
