"""Token-exact training rows from one agent's model calls: never re-tokenised, every trained token as sampled.

Vocabulary. A call's *sequence* is its prompt ids followed by its completion ids, exactly as the server reported
them. A call *extends* a chain when the chain's latest sequence is a prefix of the call's prompt ids; the tokens the
prompt adds after it are environment tokens (tool results, user turns, template glue): env_mask 0, logprob 0.0.
A chain's row is its last call's sequence, split after its first call's prompt (a *clean* chain).

Exact-context rule. A sampled token is trained (env_mask 1, with the server's logprob) at position p of a row's
sequence F only if F[:p + 1] equals the sampling call's sequence up to that token: its whole left context is what
the model was conditioned on, so the server's logprob is the logprob of that very token in that very context. The
same tokens found elsewhere (shifted by a truncated history, or after reasoning the template dropped) are context.

Chaining. Usable calls are taken in order; each extends the chain whose latest sequence is the longest prefix of its
prompt (the later chain on ties), or else starts a new chain: a *break* (the chat template re-rendered earlier
turns, e.g. dropped earlier <think> reasoning; history was truncated or summarised; a sub-agent runs its own
thread). What a break does is the policy:

* "realign" (default): always one row (none without usable calls). F is the last usable call's sequence: what the
  model saw and produced at the end. The row trains every call's sampled tokens that keep their exact context in F:
  completions of calls whose sequence F still starts with, and the leading part of a completion that was
  re-rendered only from some token on. Every other sampled token (e.g. reasoning the template dropped, or a whole
  earlier thread when the agent ends in a sub-agent's own thread) is counted in dropped_tokens. The row's prompt is
  the earliest call's prompt that F starts with (a side call made before the thread F ends in does not count; the
  last call's prompt at the latest), cut before the first trained token. Without breaks this is exactly the clean
  chain's row.
* "fork": one row per chain, N breaks give N + 1 rows; every sampled token is trained in exactly one row.
* "strict": a break raises TokenDriftError.

Retries. ``is_retry`` marks a client's retry of the call just before it (x-stainless-retry-count, or a repeat of a
failed call): by retrying, the client discarded that attempt. Calls that carry their request's ``turn`` (ChatCall)
form a run with the attempts at the same turn, which also holds an agent's second sample of an answered request
(servers with n=1): it may keep either answer. Of the answers kept, those later calls continue are used (two
sub-agents that sent one request at once each go on with their own), else the last.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol

from rollouttap.errors import RolloutTapError
from rollouttap.manager.fidelity import Fidelity
from rollouttap.manager.prefix_index import PrefixIndex

logger = logging.getLogger(__name__)

Policy = Literal["realign", "fork", "strict"]
POLICIES: tuple[Policy, ...] = ("realign", "fork", "strict")
# Given the caller's own call object, returns (prompt ids, completion ids) made with the policy's tokenizer.
Tokenize = Callable[[Any], tuple[Sequence[int], Sequence[int]]]

_CHUNK = 4096  # slice-compare this many tokens at once: C-speed prefix checks without a Python loop per token


class TokenDriftError(RolloutTapError):
    """A call's prompt does not extend the previous call's tokens and the policy is "strict"."""


class CallLike(Protocol):
    """What rows need from a model call (conversation.ChatCall has these and more)."""

    @property
    def prompt_token_ids(self) -> Sequence[int] | None: ...
    @property
    def completion_token_ids(self) -> Sequence[int] | None: ...
    @property
    def completion_logprobs(self) -> Sequence[float] | None: ...
    @property
    def finish_reason(self) -> str | None: ...
    @property
    def is_retry(self) -> bool: ...
    @property
    def state(self) -> str: ...
    @property
    def status_code(self) -> int | None: ...


@dataclass(frozen=True)
class TokenCall:
    """The token fields of one model call, in the order the agent made it."""

    prompt_token_ids: list[int] | None = None
    completion_token_ids: list[int] | None = None
    completion_logprobs: list[float] | None = None
    finish_reason: str | None = None
    is_retry: bool = False
    state: str = "done"
    status_code: int | None = 200
    turn: int | None = None  # the request's turn where the caller knows it (ChatCall): a retry keeps its original's
    ids_problem: str | None = None  # why the server's ids were set aside (ChatCall), the call read as without ids
    # An answer that came back 200 but broke off (ChatCall: an error event in its stream, no finish_reason): its
    # tokens are not the answer the agent got, and never trained.
    failed: bool = False


def as_token_call(call: object) -> TokenCall:
    """Copy the token fields of any call-like object into a TokenCall (absent attributes take its defaults)."""
    default = TokenCall()

    def ids(name: str) -> list[Any] | None:
        value = getattr(call, name, None)
        return None if value is None else list(value)  # tuples never compare equal to lists

    return TokenCall(
        prompt_token_ids=ids("prompt_token_ids"),
        completion_token_ids=ids("completion_token_ids"),
        completion_logprobs=ids("completion_logprobs"),
        finish_reason=getattr(call, "finish_reason", default.finish_reason),
        is_retry=bool(getattr(call, "is_retry", default.is_retry)),
        state=getattr(call, "state", default.state),
        status_code=getattr(call, "status_code", default.status_code),
        turn=getattr(call, "turn", default.turn),
        ids_problem=getattr(call, "ids_problem", default.ids_problem),
        failed=bool(getattr(call, "failed", default.failed)),
    )


@dataclass(frozen=True)
class TrainingRow:
    """One training row: env_mask 1 marks sampled tokens; logprobs is None when one of them has no server logprob."""

    prompt_ids: list[int]
    completion_ids: list[int]
    env_mask: list[int]
    logprobs: list[float] | None
    truncated: bool

    def as_dict(self) -> dict[str, Any]:
        """Fresh lists, ready for a rollout dict."""
        return {
            "prompt_ids": list(self.prompt_ids),
            "completion_ids": list(self.completion_ids),
            "env_mask": list(self.env_mask),
            "logprobs": None if self.logprobs is None else list(self.logprobs),
            "truncated": self.truncated,
        }


@dataclass(frozen=True)
class RowsResult:
    """One agent's rows (for realign and strict: one, or none without usable calls) and their fidelity report."""

    rows: list[TrainingRow]
    fidelity: Fidelity


@dataclass(frozen=True)
class _Used:
    index: int  # position in the caller's list, for messages
    prompt: list[int]
    completion: list[int]
    logprobs: list[float] | None
    finish_reason: str | None
    logprobs_set_aside: bool = False  # the server sent logprobs, not one per completion id

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.completion)


@dataclass(frozen=True)
class _Selection:
    used: list[_Used]
    without_ids: int
    ids_set_aside: int
    inexact: int
    retries_skipped: int
    failed: int


def empty_row(eos_token_id: int, prompt_ids: Sequence[int] | None = None) -> TrainingRow:
    """A row that teaches nothing: completion [eos] with env_mask [0]; the prompt defaults to [eos]."""
    prompt = list(prompt_ids) if prompt_ids else [eos_token_id]
    return TrainingRow(prompt, [eos_token_id], [0], [0.0], truncated=False)


def build_rows(
    calls: Iterable[CallLike],
    *,
    eos_token_id: int,
    policy: Policy = "realign",
    tokenize: Tokenize | None = None,
) -> RowsResult:
    """Rows and fidelity report for one agent's calls, in the order it made them (see the module docstring)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown row policy {policy!r}; expected one of {', '.join(POLICIES)}")
    originals = list(calls)
    chosen = _select(originals, tokenize)
    used = chosen.used
    chains = _chains(used, strict=policy == "strict")
    if policy == "fork" or len(chains) <= 1:
        built = [_chain_row(used, chain, eos_token_id) for chain in chains]
    else:
        built = [_realign_row(used, eos_token_id)]
    rows = [row for row, _ in built]
    sampled = sum(len(u.completion) for u in used)
    trainable = sum(sum(row.env_mask) for row in rows)
    breaks = max(len(chains) - 1, 0)
    fidelity = Fidelity(
        calls=len(originals),
        calls_used=len(used),
        sampled_tokens=sampled,
        trainable_tokens=trainable,
        dropped_tokens=sampled - trainable,
        clean_joins=len(used) - len(chains),
        realigned_joins=breaks if policy == "realign" else 0,
        forked_joins=breaks if policy == "fork" else 0,
        calls_without_ids=chosen.without_ids,
        ids_set_aside=chosen.ids_set_aside,
        inexact_calls=chosen.inexact,
        retries_skipped=chosen.retries_skipped,
        failed_calls=chosen.failed,
        truncated=sum(row.truncated for row in rows),
        missing_logprobs=sum(missing for _, missing in built),
        logprobs_set_aside=sum(u.logprobs_set_aside for u in used),
        rows=len(rows),
    )
    if breaks or chosen.inexact:
        logger.debug("rows built with %d breaks (%s): %s", breaks, policy, fidelity.as_dict())
    return RowsResult(rows, fidelity)


def build_row(
    calls: Iterable[CallLike],
    *,
    eos_token_id: int,
    policy: Literal["realign", "strict"] = "realign",
    tokenize: Tokenize | None = None,
    fallback_prompt_ids: Sequence[int] | None = None,
) -> tuple[TrainingRow, Fidelity]:
    """Exactly one row: build_rows' row, or empty_row(eos_token_id, fallback_prompt_ids) when no call was usable."""
    if policy not in ("realign", "strict"):
        raise ValueError(f"build_row makes one row; policy {policy!r} needs build_rows")
    result = build_rows(calls, eos_token_id=eos_token_id, policy=policy, tokenize=tokenize)
    if result.rows:
        return result.rows[0], result.fidelity
    return empty_row(eos_token_id, fallback_prompt_ids), replace(result.fidelity, empty_rows=1)


# --- choosing the calls -------------------------------------------------------------------------------------------


def _select(originals: list[Any], tokenize: Tokenize | None) -> _Selection:
    calls = [as_token_call(call) for call in originals]
    runs = _retry_runs(calls)
    answered = [_kept_attempts(calls, run) for run in runs]
    # Every answered attempt is looked at (each run's by its own _continued), so each is built once, up front.
    made = {index: _usable(index, calls[index], originals[index], tokenize) for kept in answered for index in kept}
    later = PrefixIndex([call for call in made.values() if call is not None])
    used: list[_Used] = []
    without_ids = set_aside = inexact = retries = failed = 0
    for number, run in enumerate(runs):
        if not answered[number]:
            retries += len(run) - 1
            failed += 1
            continue
        kept = _continued(answered[number], made, later)
        retries += len(run) - len(kept)
        for index in kept:
            call = calls[index]
            if call.prompt_token_ids is None or call.completion_token_ids is None:
                without_ids += 1
                set_aside += call.ids_problem is not None
                inexact += tokenize is not None
            chosen = made[index]
            if chosen is not None:
                used.append(chosen)
    return _Selection(used, without_ids, set_aside, inexact, retries, failed)


def _continued(attempts: list[int], made: dict[int, _Used | None], later: PrefixIndex[_Used]) -> list[int]:
    """Of a run's answered attempts, those later calls of the same thread continue. A client retry leaves one
    answered attempt; an agent that resends a request to sample again (n=1 servers) keeps either answer, and what
    it sends next says which; two sub-agents that sent the same request at once each go on with their own, and
    both are kept (one of identical answers). When the first later call that starts with the attempts' prompt
    continues none of those with tokens, it went on with one without (the last of them); a template that
    re-rendered the kept answer looks the same and gets that guess too. With no such call, the last attempt."""
    known = [(index, call) for index in attempts if (call := made[index]) is not None]
    if len(attempts) == 1 or not known:
        return attempts[-1:]
    opening = known[0][1].prompt
    # Only a later call that starts with the opening counts: another thread's (a sub-agent's) says nothing here.
    first = later.first(opening, after=attempts[-1])
    if first is None:
        return attempts[-1:]
    if not any(_extends(first.prompt, call) for _, call in known):
        unknown = [index for index in attempts if made[index] is None]
        return (unknown or attempts)[-1:]
    continued: dict[tuple[int, ...], int] = {}  # by sequence: a second identical answer is not a second sample
    for index, call in known:
        if _followed(call, opening, attempts[-1], later):
            continued.setdefault(tuple(call.prompt) + tuple(call.completion), index)
    return list(continued.values())


def _followed(call: _Used, opening: list[int], after: int, later: PrefixIndex[_Used]) -> bool:
    """Whether a call after ``after`` that starts with ``opening`` extends ``call``: its prompt starts with both,
    so with the longer of the two, which starts with the shorter."""
    sequence = call.prompt + call.completion
    longer, shorter = (sequence, opening) if len(sequence) >= len(opening) else (opening, sequence)
    return longer[:len(shorter)] == shorter and later.first(longer, after=after) is not None


def _retry_runs(calls: list[TokenCall]) -> list[list[int]]:
    runs: list[list[int]] = []
    for index, call in enumerate(calls):
        # With turns known, a run is the attempts at one request: retries and second samples (a retry whose first
        # attempts never reached the proxy has a turn of its own, and is a call of its own); without, a retry
        # joins the call before it.
        if runs and (calls[runs[-1][-1]].turn == call.turn if call.turn is not None else call.is_retry):
            runs[-1].append(index)
        else:
            runs.append([index])
    return runs


def _kept_attempts(calls: list[TokenCall], run: list[int]) -> list[int]:
    """The run's answered attempts whose answer the client kept: a retry after one discarded it."""
    return [index for at, index in enumerate(run)
            if _answered(calls[index]) and not (at + 1 < len(run) and calls[run[at + 1]].is_retry)]


def _answered(call: TokenCall) -> bool:
    return call.state == "done" and (call.status_code is None or 200 <= call.status_code < 300) and not call.failed


def _usable(index: int, call: TokenCall, original: Any, tokenize: Tokenize | None) -> _Used | None:
    has_ids = call.prompt_token_ids is not None and call.completion_token_ids is not None
    return _used(index, call, original, tokenize) if has_ids or tokenize else None


def _used(index: int, call: TokenCall, original: Any, tokenize: Tokenize | None) -> _Used:
    prompt, completion = call.prompt_token_ids, call.completion_token_ids
    logprobs = _sampled_logprobs(call)
    if prompt is None or completion is None:
        assert tokenize is not None  # _select skips id-less calls without a fallback
        made_prompt, made_completion = tokenize(original)
        prompt = list(made_prompt) if prompt is None else prompt
        completion = list(made_completion) if completion is None else completion
    set_aside = logprobs is None and call.completion_logprobs is not None and call.completion_token_ids is not None
    return _Used(index, prompt, completion, logprobs, call.finish_reason, set_aside)


def _sampled_logprobs(call: TokenCall) -> list[float] | None:
    """The call's logprobs, one per completion id, or None. Logprobs belong to the server's completion ids
    only; a tokenizer's ids need not line up with them. Ones that do not count as the ids are set aside (the
    fidelity report counts them: a warning per call flooded the log of a damaged store)."""
    sampled, ids = call.completion_logprobs, call.completion_token_ids
    if sampled is None or ids is None or len(sampled) != len(ids):
        return None
    # A null (pydantic writes a NaN or an infinity so), a NaN or an infinity (Python's json reads and writes them),
    # or any non-number, sets the call's logprobs aside: one bad value must not cost the row its every token.
    if not all(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
               for value in sampled):
        return None
    return [float(value) for value in sampled]


# --- chaining -----------------------------------------------------------------------------------------------------


def _common_prefix(seq: Sequence[int], other: Sequence[int], start: int = 0) -> int:
    """How many tokens of `other` equal seq[start:] from its beginning."""
    limit = min(len(seq) - start, len(other))
    matched = 0
    while matched < limit:
        end = min(matched + _CHUNK, limit)
        if seq[start + matched : start + end] == other[matched:end]:
            matched = end
            continue
        while seq[start + matched] == other[matched]:
            matched += 1
        return matched
    return matched


def _extends(prompt: list[int], previous: _Used) -> bool:
    cut = len(previous.prompt)
    return (
        len(prompt) >= previous.length
        and prompt[:cut] == previous.prompt
        and prompt[cut : previous.length] == previous.completion
    )


def _chains(used: list[_Used], *, strict: bool) -> list[list[int]]:
    """Group the usable calls into clean chains (lists of positions in `used`), in order."""
    try:
        return _chains_indexed(used, strict=strict)
    except TypeError:  # token ids that do not sort against each other (not all ints): compare chain by chain
        return _chains_scanned(used, strict=strict)


def _chains_scanned(used: list[_Used], *, strict: bool) -> list[list[int]]:
    chains: list[list[int]] = []
    for position, call in enumerate(used):
        target, target_length = None, -1
        for number, chain in enumerate(chains):
            last = used[chain[-1]]
            if last.length >= target_length and _extends(call.prompt, last):
                target, target_length = number, last.length
        if target is not None:
            chains[target].append(position)
            continue
        if chains and strict:
            raise _drift_error(used[position - 1], call)
        chains.append([position])
    return chains


def _chains_indexed(used: list[_Used], *, strict: bool) -> list[list[int]]:
    """_chains_scanned's chains, finding the chain a call extends in a sorted list of the chains' latest sequences
    instead of trying every chain: an agent of many independent calls has as many chains."""
    chains: list[list[int]] = []
    ends: list[tuple[int, ...]] = []  # sorted; a sequence that several chains end in appears once
    ending: dict[tuple[int, ...], list[int]] = {}  # sequence -> the chains it ends
    for position, call in enumerate(used):
        prompt = tuple(call.prompt)
        extended = _longest_prefix_in(ends, prompt)
        if extended is not None:
            number = max(ending[extended])  # the later chain on ties
            ending[extended].remove(number)
            if not ending[extended]:
                del ending[extended]
                del ends[bisect.bisect_left(ends, extended)]
            chains[number].append(position)
        elif chains and strict:
            raise _drift_error(used[position - 1], call)
        else:
            number = len(chains)
            chains.append([position])
        sequence = prompt + tuple(call.completion)
        if sequence not in ending:
            bisect.insort(ends, sequence)
        ending.setdefault(sequence, []).append(number)
    return chains


def _longest_prefix_in(ends: list[tuple[int, ...]], prompt: tuple[int, ...]) -> tuple[int, ...] | None:
    """The longest of the sorted ``ends`` that ``prompt`` starts with, or None."""
    upper = bisect.bisect_right(ends, prompt)
    while upper:
        candidate = ends[upper - 1]
        shared = _common_prefix(prompt, candidate)
        if shared == len(candidate):
            # Any longer one would sort between this and the prompt.
            return candidate
        # One sharing more than `shared` tokens with the prompt would sort between the candidate and the prompt,
        # so the rest all start with prompt[:shared], and sort at or before it.
        upper = bisect.bisect_right(ends, prompt[:shared], 0, upper - 1)
    return None


def _drift_error(previous: _Used, call: _Used) -> TokenDriftError:
    expected = previous.prompt + previous.completion
    at = _common_prefix(expected, call.prompt)
    found = call.prompt[at] if at < len(call.prompt) else "the end of the prompt"
    return TokenDriftError(
        f"call {call.index}'s prompt does not extend call {previous.index}'s {len(expected)} tokens: "
        f"they differ at token {at} (expected {expected[at]}, found {found}); "
        "use the 'realign' or 'fork' row policy to train on such conversations"
    )


# --- assembling rows ----------------------------------------------------------------------------------------------

_Span = tuple[int, int, list[float] | None]  # start in the row's sequence, how many tokens, their logprobs


def _chain_row(used: list[_Used], chain: list[int], eos_token_id: int) -> tuple[TrainingRow, int]:
    final = used[chain[-1]]
    spans = [(len(used[p].prompt), len(used[p].completion), used[p].logprobs) for p in chain]
    return _assemble(final, spans, len(used[chain[0]].prompt), eos_token_id)


def _realign_row(used: list[_Used], eos_token_id: int) -> tuple[TrainingRow, int]:
    final = used[-1]
    seq = final.prompt + final.completion
    spans = [span for call in used if (span := _exact_span(seq, call)) is not None]
    # The earliest prompt F starts with (final's own at the latest): an agent's first call may be a side call (a
    # helper's short thread) sharing only template tokens with F, while the thread F ends in opened with this one.
    opening = next(len(call.prompt) for call in used if _common_prefix(seq, call.prompt) == len(call.prompt))
    return _assemble(final, spans, opening, eos_token_id)


def _exact_span(seq: list[int], call: _Used) -> _Span | None:
    """The leading part of the call's completion that keeps its exact left context in `seq`, if any."""
    start = len(call.prompt)
    if _common_prefix(seq, call.prompt) < start:
        return None
    count = _common_prefix(seq, call.completion, start)
    return (start, count, call.logprobs) if count else None


def _assemble(final: _Used, spans: list[_Span], opening: int, eos_token_id: int) -> tuple[TrainingRow, int]:
    """The row over final's sequence with the spans trained (later spans win overlaps); also missing logprobs."""
    seq = final.prompt + final.completion
    mask = [0] * len(seq)
    logprobs = [0.0] * len(seq)
    known = [True] * len(seq)
    for start, count, sampled in spans:
        end = start + count
        mask[start:end] = [1] * count
        logprobs[start:end] = [0.0] * count if sampled is None else sampled[:count]
        known[start:end] = [sampled is not None] * count
    missing = sum(1 for trained, has in zip(mask, known, strict=True) if trained and not has)
    cut = _prompt_cut(seq, mask, opening, len(final.prompt))
    row = TrainingRow(
        prompt_ids=seq[:cut],
        completion_ids=seq[cut:],
        env_mask=mask[cut:],
        logprobs=None if missing else logprobs[cut:],
        truncated=final.finish_reason == "length" or not final.completion or final.completion[-1] != eos_token_id,
    )
    return row, missing


def _prompt_cut(seq: list[int], mask: list[int], opening: int, final_prompt_length: int) -> int:
    """The row's prompt: the opening prompt (a prefix of ``seq``), cut before the first trained token."""
    first_trained = mask.index(1) if 1 in mask else final_prompt_length
    cut = min(opening, first_trained) or first_trained
    # A completion is never empty: trainers index the token before it.
    return min(cut, max(len(seq) - 1, 0))
