"""What one agent run produced, and the batch summary over many."""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from rollouttap.manager.conversation import build_conversation, calls_in_order
from rollouttap.manager.rows import build_row
from rollouttap.store import Store

log = logging.getLogger(__name__)

Status = Literal["ok", "failed", "timeout", "error"]
STATUSES: tuple[Status, ...] = ("ok", "failed", "timeout", "error")
# Ended without success: agent_rollout gives TRL such an agent's row fully masked (safe_row).
FAILED_STATUSES: tuple[Status, ...] = tuple(s for s in STATUSES if s != "ok")


@dataclass(frozen=True)
class AgentResult:
    """One agent's outcome: how it ended, what it returned, and its conversation with the model.

    status: ``ok`` (exit 0), ``failed`` (non-zero exit, signal, or the entry point raised), ``timeout``
    (killed at the deadline) or ``error`` (the manager could not run it). ``calls`` counts model calls;
    ``flows`` counts every captured flow by state; ``incomplete_flows`` are flow ids still open when the
    grace period ran out; ``bypass_connections`` are direct connections to the model server (not captured).
    ``row``/``fidelity`` are set when the calls carry token ids and the manager knows the eos token id.
    ``output_cut`` names the streams (``stdout``, ``stderr``) too long to keep whole, with the bytes cut from
    their middle (see ``rollouttap.manager.output``).
    """
    agent_id: str
    index: int
    prompt: Any
    status: Status
    exit_code: int | None = None
    duration_s: float = 0.0
    stdout_tail: str = ""
    stderr_tail: str = ""
    error: str | None = None
    return_value: Any = None
    calls: int = 0
    flows: Mapping[str, int] = field(default_factory=dict)
    incomplete_flows: tuple[str, ...] = ()
    bypass_connections: tuple[Mapping[str, Any], ...] = ()
    workdir: str | None = None
    check_result: Any = None
    check_error: str | None = None
    conversation: Any = None
    row: Any = None
    fidelity: Any = None
    tokens: Mapping[str, int] = field(default_factory=dict)
    killed_processes: int = 0
    proxy_restarts: int = 0
    output_cut: Mapping[str, int] = field(default_factory=dict)  # "stdout"/"stderr" -> bytes cut from its middle

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict (the conversation, row and fidelity as their own dicts)."""
        return {
            "agent_id": self.agent_id, "index": self.index, "prompt": json_safe(self.prompt),
            "status": self.status, "exit_code": self.exit_code, "duration_s": round(self.duration_s, 3),
            "stdout_tail": self.stdout_tail, "stderr_tail": self.stderr_tail, "error": self.error,
            "return_value": json_safe(self.return_value), "calls": self.calls, "flows": dict(self.flows),
            "incomplete_flows": list(self.incomplete_flows),
            "bypass_connections": [dict(c) for c in self.bypass_connections],
            "workdir": self.workdir, "check_result": json_safe(self.check_result),
            "check_error": self.check_error, "conversation": json_safe(self.conversation),
            "row": json_safe(self.row), "fidelity": json_safe(self.fidelity), "tokens": dict(self.tokens),
            "killed_processes": self.killed_processes, "proxy_restarts": self.proxy_restarts,
            "output_cut": dict(self.output_cut),
        }


def decide_status(outcome: str, exit_code: int | None, entry: Mapping[str, Any] | None,
                  *, is_entry_point: bool, timeout: float) -> tuple[Status, str | None]:
    """(status, error text) from how waiting ended, the exit code and an entry point's result file."""
    if outcome == "timeout":
        return "timeout", f"timed out after {timeout:g}s; its process tree was killed"
    if outcome == "cancelled":
        return "error", "cancelled before it finished"
    if entry is not None and not entry.get("ok"):
        return "failed", str(entry.get("error") or "entry point failed")
    if exit_code is not None and exit_code < 0:
        return "failed", f"killed by signal {-exit_code}"
    if exit_code != 0:
        return "failed", f"exited with code {exit_code}"
    if is_entry_point and entry is None:
        return "failed", "the entry point runner wrote no result"
    return "ok", None


def start_failure(exc: Exception) -> str:
    """Why an agent's process could not start: a bare command name that is not on PATH, or anything else
    (a relative path, say, looked up in the agent's own fresh working directory)."""
    if isinstance(exc, FileNotFoundError) and isinstance(missing := exc.filename, str) and "/" not in missing:
        if shutil.which(missing) is not None:  # found: what is missing is its script's interpreter (#! line)
            return f"cannot start agent: the interpreter on the first line (#!) of {missing!r} was not found"
        return f"cannot start agent: command {missing!r} not found on PATH ({exc.strerror})"
    return f"cannot start agent (it runs in a fresh working directory, not here): {exc}"


def join_errors(*parts: str | None) -> str | None:
    """The parts that say something, joined with "; "."""
    return "; ".join(p for p in parts if p) or None


def with_uncommitted(status: Status, error: str | None, uncommitted: str | None) -> tuple[Status, str | None]:
    """Never "ok" on flows that may be missing: an ok agent becomes an error saying why, others keep theirs."""
    if uncommitted is None:
        return status, error
    return ("error" if status == "ok" else status), join_errors(error, uncommitted)


def with_model_failure(status: Status, error: str | None, conversation: Any,
                       killed_at: float | None = None) -> str | None:
    """A failed agent's error plus why its last model call failed, if it did: an agent often fails because
    that call did (a model server nobody listens on), and says so only in its own stderr. An earlier
    failure that a retry got past is not the cause, and a call still open at ``killed_at`` (when the
    manager began killing the agent's processes: a timeout, say) failed because of that kill."""
    calls = getattr(conversation, "model_calls", None) if status != "ok" else None
    if not calls or not calls[-1].failed:
        return error
    last = calls[-1]
    if killed_at is not None and _open_at(last, killed_at):
        return join_errors(error, f"its last model call was still open when its processes were killed ({last.error})")
    return join_errors(error, f"its last model call failed: {last.error}")


def _open_at(call: Any, moment: float) -> bool:
    """Whether a call had not ended by ``moment`` (one never ended, or ended by settling, had not)."""
    return call.t_request is None or call.latency is None or call.t_request + call.latency >= moment


def json_safe(value: Any) -> Any:
    """The value if JSON can hold it, recursively; anything else as its repr."""
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    as_dict = _as_dict(value)
    if as_dict is not value:
        return json_safe(as_dict)
    try:
        json.dumps(value)
        return value
    except (TypeError, ValueError):
        return repr(value)


def _as_dict(value: Any) -> Any:
    for name in ("to_dict", "as_dict"):
        method = getattr(value, name, None)
        if callable(method):
            return method()
    return value


TOP_ERRORS = 3


@dataclass(frozen=True)
class Summary:
    """Counts over a batch of results, for the CLI's table and logs."""
    agents: int = 0
    by_status: Mapping[str, int] = field(default_factory=dict)
    calls: int = 0
    failed_calls: int = 0  # model calls without an answer (HTTP errors, cut off), retried or not
    sampled_tokens: int = 0  # over the agents that have a row (fidelity): what the model sampled
    trainable_tokens: int = 0  # ... and what their rows train: an agent that did not succeed trains nothing
    prompt_tokens: int = 0
    completion_tokens: int = 0
    agent_seconds: float = 0.0
    incomplete_flows: int = 0
    bypass_agents: int = 0
    bypass_connections: int = 0
    top_errors: tuple[tuple[str, int], ...] = ()  # the commonest first lines of failed agents' errors, counted

    def to_dict(self) -> dict[str, Any]:
        return {"agents": self.agents, "by_status": dict(self.by_status), "calls": self.calls,
                "failed_calls": self.failed_calls, "sampled_tokens": self.sampled_tokens,
                "trainable_tokens": self.trainable_tokens,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "agent_seconds": round(self.agent_seconds, 3), "incomplete_flows": self.incomplete_flows,
                "bypass_agents": self.bypass_agents, "bypass_connections": self.bypass_connections,
                "top_errors": [list(pair) for pair in self.top_errors]}


def summarise(results: Iterable[AgentResult]) -> Summary:
    """Sum a batch of results."""
    items = list(results)
    by_status: dict[str, int] = {s: sum(r.status == s for r in items) for s in STATUSES}
    return Summary(
        agents=len(items), by_status=by_status, calls=sum(r.calls for r in items),
        failed_calls=sum(_failed_calls(r.conversation) for r in items),
        sampled_tokens=sum(r.fidelity.sampled_tokens for r in items if r.fidelity is not None),
        # As agent_rollout gives rows to TRL: a failed or timed-out agent's row is fully masked (safe_row).
        trainable_tokens=sum(r.fidelity.trainable_tokens for r in items if r.fidelity is not None and r.ok),
        prompt_tokens=sum(int(r.tokens.get("prompt", 0)) for r in items),
        completion_tokens=sum(int(r.tokens.get("completion", 0)) for r in items),
        agent_seconds=sum(r.duration_s for r in items),
        incomplete_flows=sum(len(r.incomplete_flows) for r in items),
        bypass_agents=sum(bool(r.bypass_connections) for r in items),
        bypass_connections=sum(len(r.bypass_connections) for r in items),
        top_errors=tuple(Counter(r.error.strip().splitlines()[0] for r in items
                                 if r.status != "ok" and r.error and r.error.strip()).most_common(TOP_ERRORS)),
    )


def _failed_calls(conversation: Any) -> int:
    """Model calls (chat, /completions, Responses) without an answer."""
    return 0 if conversation is None else len(conversation.failed_calls)


# -- collecting an agent's flows from the store ------------------------------------------------------------
@dataclass(frozen=True)
class Collected:
    """What the store holds of one finished agent, rebuilt."""
    counts: Mapping[str, int]
    calls: int
    conversation: Any
    row: Any = None
    fidelity: Any = None
    tokens: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Settled:
    """How an ended agent's flows stand once settled."""
    incomplete: tuple[str, ...]  # still open after the grace period (now ended as incomplete)
    uncommitted: str | None = None  # why its flows may be missing: a proxy had not committed them in time


def settle_flows(store: Store, agent_id: str, grace: float, ended_at: float | None = None,
                 poll: float = 0.01, *, given: Sequence[str] = ()) -> Settled:
    """Wait (at most ``grace`` seconds) until none of the agent's flows is open; end the rest.

    First the proxies that served it (those it was ``given``, and any that recorded a flow of it) must have
    committed everything they queued before the agent ended (``ended_at``), so no flow of the agent is still in a
    write queue; a proxy that served other agents alone is not waited for. The proxy closes a flow when its response ends or
    its client goes away, so once the agent's processes are gone its flows close within moments; one still
    open after the grace period never will. A proxy the agent was ``given`` or that served it, killed before
    it had committed what it queued before ``ended_at``, lost that: flows may be missing.
    """
    deadline = time.monotonic() + grace
    uncommitted = None
    # Without ``given`` (who served it is unknown), every proxy of the store is waited for.
    behind = store.wait_committed(ended_at, timeout=grace, poll=poll, agent_id=agent_id if given else None,
                                  proxy_ids=given) if ended_at is not None else []
    if behind:
        uncommitted = (f"its proxy (pid {behind[0]['pid']}, {behind[0]['proxy_id']}) had not committed this agent's "
                       f"flows {grace:g}s after it ended (is another process holding the store locked, its disk full, "
                       "or the proxy stopped?): its calls and row may be incomplete")
        log.warning("agent %s: %s", agent_id, uncommitted)
    elif ended_at is not None and (killed := store.killed_proxies(agent_id, given, ended_at)):
        uncommitted = (f"its proxy (pid {killed[0]['pid']}) was killed while it ran, before committing all it had "
                       "queued: its calls and row may be incomplete")
        log.warning("agent %s: %s", agent_id, uncommitted)
    while store.open_flow_count(agent_id) and time.monotonic() < deadline:
        time.sleep(poll)
    left = tuple(f.flow_id for f in store.flows(agent_id=agent_id, state="open"))
    if left:
        store.mark_open_flows(agent_id=agent_id, error=f"still open {grace:g}s after the agent ended")
        log.warning("agent %s: %d flows still open after %.1fs, marked incomplete", agent_id, len(left), grace)
    return Settled(left, uncommitted)


def collect_flows(store: Store, agent_id: str, *, eos_token_id: int | None) -> Collected:
    """Counts, conversation, tokens and (with token ids and an eos id) the training row of one agent."""
    flows = store.flows(agent_id=agent_id)
    counts = {"open": 0, "done": 0, "error": 0}
    for flow in flows:
        counts[flow.state] = counts.get(flow.state, 0) + 1
    counts["total"] = len(flows)
    try:
        conversation = build_conversation(flows)
    except Exception:  # the flows stay in the store; the agent's result still stands
        log.exception("agent %s: rebuilding its conversation failed", agent_id)
        return Collected(counts, 0, None)
    calls = calls_in_order(conversation, flows)
    row = fidelity = None
    prompts = [c.prompt_token_ids for c in calls if getattr(c, "prompt_token_ids", None)]
    if eos_token_id is not None and prompts:
        try:
            # No usable call (say the only one broke off mid-stream): a row that teaches nothing, with the
            # prompt the server rendered (its first chunk carries it) rather than a bare [eos].
            row, fidelity = build_row(calls, eos_token_id=eos_token_id, fallback_prompt_ids=prompts[0])
        except Exception:  # a row that cannot be built is reported, the agent's result still stands
            log.exception("agent %s: building its training row failed", agent_id)
    return Collected(counts, len(calls), conversation,
                     row, fidelity, token_counts(calls))


def token_counts(calls: Iterable[Any]) -> dict[str, int]:
    """Prompt and completion tokens over calls: the server's usage, else the token ids' lengths."""
    prompt = completion = 0
    for call in calls:
        usage = getattr(call, "usage", None) or {}
        ids_p, ids_c = getattr(call, "prompt_token_ids", None), getattr(call, "completion_token_ids", None)
        used_p, used_c = usage.get("prompt_tokens"), usage.get("completion_tokens")
        prompt += used_p if isinstance(used_p, int) and used_p else len(ids_p or ())
        completion += used_c if isinstance(used_c, int) and used_c else len(ids_c or ())
    return {"prompt": prompt, "completion": completion}
