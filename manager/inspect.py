"""Plain-data helpers behind ``rollouttap flows|show|stats``: flow rows, conversation steps, figures.

Everything here returns dicts, lists and strings; the CLI turns them into tables and colours.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any

from rollouttap.errors import ConfigError
from rollouttap.manager.conversation import build_conversation, calls_in_order, normalize_message
from rollouttap.manager.fidelity import Fidelity, batch_fidelity
from rollouttap.manager.results import FAILED_STATUSES, token_counts
from rollouttap.manager.rows import build_row
from rollouttap.store import AgentRecord, FlowRecord, Store

UNKNOWN_EOS = -1  # rows need an eos id only to flag truncation; without one every row reads as truncated

__all__ = [
    "Step", "UNKNOWN_EOS", "agent_stats", "answer_text", "conversation_steps", "flow_row", "host_port", "iso_time",
    "latency_summary", "mask_runs", "message_text", "parse_when", "percentile", "short_line", "store_stats",
    "tool_call_text", "untrained", "usage_totals",
]


def parse_when(text: str) -> float:
    """Unix seconds from ``1732900000[.5]`` or ISO 8601 (``2026-11-29T16:00:00``: UTC unless it says, as every
    time rollouttap shows is, so a time pasted from its output means what it meant there)."""
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds):  # nan or inf: every comparison false, a filter that drops all in silence
            raise ConfigError(f"{text!r} is not a time")
        return seconds
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError as exc:
        raise ConfigError(f"{text!r} is neither unix seconds nor an ISO 8601 time") from exc
    return (when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)).timestamp()


def host_port(text: str) -> tuple[str, int | None]:
    """``HOST``, ``HOST:PORT`` or ``[IPv6]:PORT`` as (host, port or None); a bare IPv6 address is a host."""
    if text.startswith("["):
        host, closed, rest = text[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")):
            raise ConfigError(f"--host {text!r} is not HOST[:PORT] ([IPv6]:PORT for an IPv6 address)")
        port = rest.removeprefix(":")
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        return text, None
    if not port:
        return host, None
    if not port.isdigit():
        raise ConfigError(f"--host {text!r} is not HOST[:PORT]")
    return host, int(port)


def short_line(text: object, limit: int) -> str:
    """The first line of a message, cut to ``limit`` characters (a table cell, a header)."""
    lines = str(text or "").strip().splitlines()
    line = lines[0] if lines else ""
    return line if len(line) <= limit else line[:limit - 1] + "…"


_AGE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)")
_AGE_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_age(text: str, option: str | None = None) -> float:
    """Seconds from an age such as ``90``, ``30m``, ``6h`` or ``2d``; ``option`` names the flag in the error."""
    match = _AGE.fullmatch(text.strip().lower())
    if match is None:
        raise ConfigError(f"{option + ': ' if option else ''}{text!r} is not an age such as 90, 30m, 6h or 2d")
    return float(match[1]) * _AGE_UNITS[match[2]]


def iso_time(ts: float | None) -> str | None:
    """UTC ISO time with milliseconds, or None."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def flow_row(flow: FlowRecord, request_bytes: int | None = None, response_bytes: int | None = None) -> dict[str, Any]:
    """One line of ``rollouttap flows`` (body sizes as given, for a record read without its bodies)."""
    duration = flow.t_end - flow.t_request if flow.t_end is not None and flow.t_request is not None else None
    if request_bytes is None:
        request_bytes = len(flow.request_body or b"")
    if response_bytes is None:
        response_bytes = len(flow.response_body or b"")
    return {
        "id": flow.id, "time": iso_time(flow.t_request), "agent": flow.agent_id, "attribution": flow.attribution,
        "method": flow.method, "host": flow.host, "path": flow.path, "status": flow.status_code,
        "state": flow.state, "duration": duration, "request_bytes": request_bytes,
        "response_bytes": response_bytes, "streamed": flow.streamed, "error": flow.error,
        "flow_id": flow.flow_id,
    }


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation between ranks; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_summary(values: Iterable[float | None]) -> dict[str, float | int | None]:
    """count, p50, p90, p99 and max of the known values (seconds)."""
    known = [v for v in values if v is not None]
    return {"count": len(known), "p50": percentile(known, 50), "p90": percentile(known, 90),
            "p99": percentile(known, 99), "max": max(known) if known else None}


# -- conversation text -------------------------------------------------------------------------------------------

def message_text(content: Any) -> str:
    """A message's content as text (lists of parts joined; images and the like named)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") in ("text", "input_text", "output_text"):
                parts.append(str(part.get("text", "")))
            elif isinstance(part, dict):
                parts.append(f"[{part.get('type', 'part')}]")
            else:
                parts.append(str(part))
        return "".join(parts)
    return json.dumps(content, ensure_ascii=False)


def tool_call_text(tool_call: dict[str, Any]) -> str:
    """``name(arguments)`` of an OpenAI tool call."""
    function = tool_call.get("function") or {}
    args = function.get("arguments")
    if not isinstance(args, str):
        args = json.dumps(args, ensure_ascii=False)
    return f"{function.get('name', '?')}({args})"


def answer_text(call: Any) -> str:
    """A call's answer in one string: content, then tool calls; the error when it failed."""
    if getattr(call, "error", None) and getattr(call, "failed", False):
        return f"error: {call.error}"
    response = getattr(call, "response", None)
    if response is None:
        return getattr(call, "text", None) or ""
    lines = [response.content] if response.content else []
    lines += [f"→ {tool_call_text(tc)}" for tc in response.tool_calls]
    return "\n".join(lines)


@dataclass(frozen=True)
class Step:
    """What one chat call adds to the conversation: the request messages new since its thread's previous turn
    (all of them when it starts a thread or does not extend it), and the call itself."""
    call: Any
    new_messages: list[dict[str, Any]]
    first_new: int  # index in call.messages of the first new message
    extends: bool  # the call's messages start with its thread's previous history (as continuity compares them)
    attempt: int = 0  # 0 for a turn's first call; a retry or a second sample of the same request counts on
    starts_thread: bool = False  # the first call of its thread
    continues: int | None = None  # the call whose answer it goes on with, when its previous turn had several


History = tuple[int, list[Any]]  # (position of a call in the calls shown, its messages and answer)


def conversation_steps(calls: Sequence[Any]) -> list[Step]:
    """One Step per chat call, in order (calls need ``messages``, ``thread``, ``turn`` and ``response``). A turn's
    calls are compared with what its thread held before the turn, where each answered call of the previous turn
    is a history it may continue (an agent that sampled twice goes on with either answer)."""
    before: dict[int, list[History]] = {}  # thread -> the histories a call of its latest turn may extend
    latest: dict[int, tuple[Any, list[History]]] = {}  # thread -> (its latest turn, that turn's histories)
    attempts: dict[Any, int] = {}
    steps = []
    for position, call in enumerate(calls):
        turn, made = latest.get(call.thread, (None, []))
        if turn != call.turn:
            before[call.thread], made = made, []
            latest[call.thread] = (call.turn, made)
        current = [normalize_message(m) for m in call.messages]
        prior = before[call.thread]
        match = max(((len(h), at) for at, h in prior if current[:len(h)] == h), default=None)
        first, source = match if match is not None else (0, None)
        continues = None
        if source is not None and calls[source].response is not None \
                and sum(calls[at].response is not None for at, _ in prior) > 1:
            continues = calls[source].index  # which of several answers it goes on with
        attempt = attempts[call.turn] = attempts.get(call.turn, -1) + 1
        steps.append(Step(call, list(call.messages[first:]), first, match is not None, attempt,
                          starts_thread=not prior, continues=continues))
        if call.response is not None or not made:
            answer = [normalize_message(call.response.to_message())] if call.response is not None else []
            made.append((position, current + answer))
    return steps


def mask_runs(mask: Sequence[int]) -> list[tuple[int, int, int]]:
    """Runs of equal env-mask values as (start, end, value)."""
    runs: list[tuple[int, int, int]] = []
    for i, value in enumerate(mask):
        if runs and runs[-1][2] == value and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1, value)
        else:
            runs.append((i, i + 1, value))
    return runs


# -- stats ---------------------------------------------------------------------------------------------------------

def usage_totals(calls: Iterable[Any]) -> dict[str, int]:
    """prompt/completion/total tokens over the calls: the server's usage, else the token ids' lengths (a
    streamed call has usage only if the agent asked for it)."""
    counts = token_counts(calls)
    return {"prompt_tokens": counts["prompt"], "completion_tokens": counts["completion"],
            "total_tokens": counts["prompt"] + counts["completion"]}


def agent_stats(flows: Sequence[FlowRecord], *, eos_token_id: int = UNKNOWN_EOS) -> dict[str, Any]:
    """Calls, tokens, latencies, errors and row fidelity of one agent's flows."""
    conv = build_conversation(flows)
    calls = calls_in_order(conv, flows)
    fidelity = None
    if calls:
        _, report = build_row(calls, eos_token_id=eos_token_id)
        fidelity = report.as_dict()
    return {"flows": len(flows), "calls": len(calls), "failed_calls": sum(bool(c.failed) for c in calls),
            "errors": sum(f.state == "error" for f in flows), "usage": usage_totals(calls),
            "latencies": [c.latency for c in calls if c.latency is not None],
            "ttfb": [c.ttfb for c in calls if c.ttfb is not None],
            "discontinuities": len(conv.discontinuities), "fidelity": fidelity}


def untrained(stats: dict[str, Any]) -> dict[str, Any]:
    """An agent's figures with its row counted as TRL gets it when the agent did not succeed: nothing trained."""
    fidelity = stats["fidelity"]
    if not fidelity:
        return stats
    report = Fidelity(**{k: v for k, v in fidelity.items() if k != "coverage"})
    report = replace(report, trainable_tokens=0, dropped_tokens=report.sampled_tokens)
    return {**stats, "fidelity": report.as_dict()}


def store_stats(stores: Store | Sequence[Store], *, run_id: str | None = None,
                eos_token_id: int = UNKNOWN_EOS) -> dict[str, Any]:
    """The figures of ``rollouttap stats``: per store or per run, of one store or several together (a store per
    rank or node of a multi-GPU run)."""
    parts = [_store_part(store, run_id, eos_token_id) for store in ([stores] if isinstance(stores, Store) else stores)]
    agents = [a for part in parts for a in part.agents]
    per_agent = [s for part in parts for s in part.per_agent]
    unregistered = sum(part.unregistered for part in parts)
    latencies = [v for s in per_agent for v in s["latencies"]]
    ttfb = [v for s in per_agent for v in s["ttfb"]]
    usage = Counter[str]()
    for stats in per_agent:
        usage.update(stats["usage"])
    reports = [Fidelity(**{k: v for k, v in s["fidelity"].items() if k != "coverage"}) for s in per_agent
               if s["fidelity"]]
    known = [part.unattributed for part in parts if part.unattributed is not None]
    return {
        "run_id": run_id,
        "agents": len(per_agent),
        "agents_by_status": dict(Counter([a.status for a in agents] + ["unregistered"] * unregistered)),
        "flows": sum(part.flows for part in parts),
        "calls": sum(s["calls"] for s in per_agent),
        "failed_calls": sum(s["failed_calls"] for s in per_agent),
        "flow_errors": sum(part.flow_errors for part in parts),
        "unattributed_flows": sum(known) if known else None,
        "usage": {k: usage.get(k, 0) for k in ("prompt_tokens", "completion_tokens", "total_tokens")},
        "latency": latency_summary(latencies),
        "ttfb": latency_summary(ttfb),
        "discontinuities": sum(s["discontinuities"] for s in per_agent),
        "fidelity": _fidelity_figures(reports, eos_known=eos_token_id != UNKNOWN_EOS),
        "eos_token_id": None if eos_token_id == UNKNOWN_EOS else eos_token_id,
    }


@dataclass(frozen=True)
class _StorePart:
    """What one store adds to ``store_stats``."""
    agents: list[AgentRecord]
    unregistered: int
    per_agent: list[dict[str, Any]]
    flows: int
    flow_errors: int
    unattributed: int | None  # None: a run without agents in this store, whose time span is unknown


def _store_part(store: Store, run_id: str | None, eos_token_id: int) -> _StorePart:
    with store.snapshot():  # its queries' figures must add up while proxies write
        return _read_part(store, run_id, eos_token_id)


def _read_part(store: Store, run_id: str | None, eos_token_id: int) -> _StorePart:
    agents = store.agents(run_id)
    # A whole store also counts agents captured by hand (a tag or a header): they have flows, not rows.
    unregistered = store.unregistered_agent_ids() if run_id is None else []
    per_agent = [agent_stats(store.flows(agent_id=a.agent_id), eos_token_id=eos_token_id) for a in agents]
    per_agent = [untrained(stats) if a.status in FAILED_STATUSES else stats for a, stats in zip(agents, per_agent)]
    # Captured by hand, they have no status to judge: their rows count as built.
    per_agent += [agent_stats(store.flows(agent_id=agent_id), eos_token_id=eos_token_id) for agent_id in unregistered]
    flows = sum(s["flows"] for s in per_agent)
    flow_errors = sum(s["errors"] for s in per_agent)
    unattributed: int | None = None
    if run_id is None:  # every flow of the store, unattributed ones (503 refusals, say) included
        counts = store.flow_counts()
        unattributed, flows, flow_errors = counts["unattributed"], counts["total"], counts["error"]
    elif agents:  # a run's unattributed flows: those seen while its agents existed
        start = min(a.created_at for a in agents)
        ends = [a.ended_at for a in agents]
        end = max(e for e in ends if e is not None) if all(e is not None for e in ends) else None
        unattributed = store.count_flows(unattributed=True, since=start, until=None if end is None else end + 1e-6)
    return _StorePart(agents, len(unregistered), per_agent, flows, flow_errors, unattributed)


def _fidelity_figures(reports: list[Fidelity], *, eos_known: bool) -> dict[str, Any] | None:
    """The batch's fidelity counts; truncation is None without an eos id (every row would read as cut)."""
    if not reports:
        return None
    figures = batch_fidelity(reports).as_dict()
    if not eos_known:
        figures["truncated"] = None
    return figures
