"""How ``rollouttap show``, ``flows``, ``stats`` and ``replay`` draw: a conversation call by call, a training row by
mask, a table of figures or flows (rich text; the commands themselves are in cli_inspect)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from rollouttap.errors import ConfigError
from rollouttap.extras import require

ERROR_CHARS = 80  # of a flow's error in the flows table: its first line, enough to tell failures apart
ROLE_STYLES = {"system": "magenta", "user": "cyan", "assistant": "green", "tool": "yellow"}


def secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}s"


def _call_header(call: Any, attempt: int = 0, label: str = "call") -> Text:
    text = Text(f"── {label} {call.index}", style="bold")
    again = ""
    if getattr(call, "is_retry", False):
        again = "retry"
    elif attempt:
        again = f"sample {attempt + 1} of the same request"
    thread = getattr(call, "thread", None)
    bits = [f"thread {thread}" if thread is not None else "", f"{call.path}", str(call.status_code or call.state),
            "stream" if call.stream else "", f"{secs(call.latency)} (first byte {secs(call.ttfb)})",
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


def print_conversation(console: Console, conv: Any) -> None:
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
                  Text(f"· {call.path} · {call.status_code or call.state} · {secs(call.latency)}", "dim"))
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


def load_tokenizer(spec: str | None) -> tuple[Callable[[int], str] | None, int | None]:
    """(decode one id, eos id) from ``--tokenizer``: ``fake`` (the test server's) or a tokenizer.json / dir."""
    if spec is None:
        return None, None
    if spec == "fake":
        from rollouttap.testing.fake_tokenizer import FakeTokenizer
        fake = FakeTokenizer()
        return (lambda i: fake.decode([i])), fake.eos_token_id
    require("--tokenizer PATH", "tokenizers")
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


def row_text(prompt: list[int], completion: list[int], mask: list[int], decode: Callable[[int], str] | None,
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


def print_mapping(console: Console, title: str, data: dict[str, Any]) -> None:
    table = Table("figure", "value", title=title, show_header=False)
    for key, value in data.items():
        table.add_row(key, f"{value:.3f}" if isinstance(value, float) else str(value))
    console.print(table)


def print_fidelity(console: Console, title: str, fidelity: dict[str, Any]) -> None:
    """A fidelity report; truncation unknown (no eos id) is said so, not left blank."""
    shown = dict(fidelity)
    if shown["truncated"] is None:
        shown["truncated"] = "unknown without --eos-token-id"
    print_mapping(console, title, shown)


def flows_table(rows: list[dict[str, Any]], names: str, *, several: bool, matching: int) -> Table:
    """The human view of ``flows`` (``matching``: how many flows matched, of which ``rows`` are the first): times
    as stored, in UTC (what --since/--until read), and why a flow failed."""
    from rollouttap.manager.inspect import short_line  # the manager only when a command draws (a fast --help)
    shown = f"{len(rows):,}" if len(rows) == matching else f"the first {len(rows):,} of {matching:,}"
    table = Table(title=f"{shown} flows in {names}")
    columns = ["id", "time (UTC)", "agent", "attribution", "method", "host", "path", "status", "state", "duration"]
    for name in (["store"] if several else []) + columns:
        table.add_column(name, no_wrap=name != "path", overflow="fold")
    table.add_column("bytes (req/resp)", no_wrap=True)
    table.add_column("error", no_wrap=True, overflow="ellipsis")  # one line: `show ID` and --json have it whole
    for r in rows:
        style = {"error": "red", "open": "yellow"}.get(r["state"], "")
        table.add_row(*([escape(r["store"])] if several else []),
                      str(r["id"]), (r["time"] or "-")[11:23], r["agent"] or "[dim]-[/]", r["attribution"],
                      r["method"] or "-", escape(r["host"] or "-"), escape(r["path"] or "-"),
                      str(r["status"] or "-"), f"[{style}]{r['state']}[/]" if style else r["state"],
                      secs(r["duration"]), f"{r['request_bytes']}/{r['response_bytes']}",
                      f"[red]{escape(short_line(r['error'], ERROR_CHARS))}[/]" if r["error"] else "")
    return table


def show_head(agent_id: str, agent: Any, calls: int, flows: int) -> str:
    """``show``'s first line: the agent, how it ended (its exit code when it did not succeed), its counts."""
    if agent is None:
        return f"agent {agent_id} · not registered · {calls} calls · {flows} flows"
    from rollouttap.manager.results import FAILED_STATUSES  # loaded by show already
    ended = agent.status
    code = agent.meta.get("exit_code")
    if agent.status in FAILED_STATUSES and code is not None:
        ended += f" (exit {code})"
    run = f" · run {agent.run_id}" if agent.run_id else ""  # an agent started by hand (`agent start`) has none
    return f"agent {agent_id} · {ended}{run} · {calls} calls · {flows} flows"


def replay_exits(result: Any) -> str:
    """The replayed agent's exit beside the recorded one's: requests that matched do not make the same ending."""
    replayed = f"agent exit {result.exit_code}" + (" (timed out)" if result.timed_out else "")
    if result.recorded_status is None:
        return f"{replayed} (recorded: not registered, exit unknown)"
    recorded = f"exit {result.recorded_exit_code}" if result.recorded_exit_code is not None else "exit unknown"
    text = f"{replayed} (recorded: {result.recorded_status}, {recorded})"
    same = result.recorded_exit_code is None or result.recorded_exit_code == result.exit_code
    return text if same else f"[yellow]{text}: the endings differ[/]"
