"""Token-exact rows: clean chains, breaks under each policy, retries, missing ids, truncation, fidelity."""

from __future__ import annotations

import random
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from rollouttap.errors import RolloutTapError
from rollouttap.manager.fidelity import Fidelity, batch_fidelity
from rollouttap.manager.rows import (
    TokenCall,
    TokenDriftError,
    TrainingRow,
    as_token_call,
    build_row,
    build_rows,
    empty_row,
)

EOS = 2
POLICY_NAMES = ["realign", "fork", "strict"]


def lp(completion: list[int], salt: float = 0.0) -> list[float]:
    """Distinct made-up logprobs, so a test can tell whose logprob landed where."""
    return [-(i + 1) / 1000 - salt for i in range(len(completion))]


def call(prompt, completion, *, salt=0.0, logprobs="auto", **fields) -> TokenCall:
    sampled = lp(completion, salt) if logprobs == "auto" else logprobs
    return TokenCall(list(prompt), list(completion), sampled, **{"finish_reason": "stop", **fields})


def chain(first_prompt: list[int], turns: list[tuple[list[int], list[int]]]) -> list[TokenCall]:
    """A clean conversation: turn k's prompt is everything so far plus its env tokens (turn 0: first_prompt)."""
    calls, seq = [], list(first_prompt)
    for k, (env, completion) in enumerate(turns):
        seq = seq + env
        calls.append(call(seq, completion, salt=k))
        seq = seq + completion
    return calls


def trained(row: TrainingRow) -> tuple[list[int], list[float]]:
    picks = [i for i, m in enumerate(row.env_mask) if m]
    assert row.logprobs is not None
    return [row.completion_ids[i] for i in picks], [row.logprobs[i] for i in picks]


def context(row: TrainingRow) -> list[int]:
    return [t for t, m in zip(row.completion_ids, row.env_mask, strict=True) if not m]


def assert_shape(row: TrainingRow) -> None:
    assert len(row.completion_ids) == len(row.env_mask) >= 1
    assert row.logprobs is None or len(row.logprobs) == len(row.completion_ids)
    assert set(row.env_mask) <= {0, 1}
    if row.logprobs is not None:
        assert all(lp == 0.0 for lp, m in zip(row.logprobs, row.env_mask, strict=True) if not m)


CLEAN_TABLE = {
    "one call": [([], [10, 11, EOS])],
    "tool loop": [([], [10, 11, EOS]), ([50, 51, 52], [12, EOS]), ([53], [13, 14, 15, EOS])],
    "no env between": [([], [10, 11]), ([], [12, EOS])],
    "empty completion mid": [([], [10, EOS]), ([50], []), ([51], [11, EOS])],
    "long": [([60 + k] * (k + 1), [100 + k] * 7 + [EOS]) for k in range(12)],
}


@pytest.mark.parametrize("policy", POLICY_NAMES)
@pytest.mark.parametrize("turns", CLEAN_TABLE.values(), ids=CLEAN_TABLE.keys())
def test_clean_chain_is_exactly_what_the_server_sent(turns, policy):
    calls = chain([1, 3, 4], turns)
    result = build_rows(calls, eos_token_id=EOS, policy=policy)
    (row,) = result.rows
    assert_shape(row)
    last = calls[-1]
    assert row.prompt_ids == calls[0].prompt_token_ids
    assert row.prompt_ids + row.completion_ids == last.prompt_token_ids + last.completion_token_ids
    tokens, logprobs = trained(row)
    assert tokens == [t for c in calls for t in c.completion_token_ids]
    assert logprobs == [x for c in calls for x in c.completion_logprobs]
    assert context(row) == [t for env, _ in turns[1:] for t in env]
    fid = result.fidelity
    assert (fid.clean_joins, fid.realigned_joins, fid.forked_joins) == (len(calls) - 1, 0, 0)
    assert fid.sampled_tokens == fid.trainable_tokens == len(tokens)
    assert (fid.dropped_tokens, fid.coverage, fid.rows, fid.calls_used) == (0, 1.0, 1, len(calls))


def drop_reasoning_calls() -> list[TokenCall]:
    """Turns 0-1 are a tool loop; at turn 2 the template drops call 1's reasoning and re-renders its tool call."""
    sys_user, gen = [1, 3, 4], [5]
    c0 = [10, 11, EOS]  # no reasoning: survives
    c1 = [30, 31, 32, 40, 41, 42, EOS]  # <think> 30 31 </think> 32, then a tool call 40 41 42
    p0 = sys_user + gen
    p1 = p0 + c0 + [50, 51] + gen
    rendered_c1 = [40, 41, 43, EOS]  # reasoning gone, tool-call arguments normalised from token 43 on
    p2 = p0 + c0 + [50, 51] + gen + rendered_c1 + [52] + [7, 8] + gen
    c2 = [20, 21, EOS]
    return [call(p0, c0, salt=0), call(p1, c1, salt=1), call(p2, c2, salt=2)]


def test_realign_after_dropped_reasoning_keeps_exact_spans_only():
    calls = drop_reasoning_calls()
    result = build_rows(calls, eos_token_id=EOS)
    (row,) = result.rows
    assert_shape(row)
    last = calls[-1]
    assert row.prompt_ids + row.completion_ids == last.prompt_token_ids + last.completion_token_ids
    assert row.prompt_ids == calls[0].prompt_token_ids
    tokens, logprobs = trained(row)
    assert tokens == [10, 11, EOS, 20, 21, EOS]  # call 1 diverges at its first token: no exact context left
    assert logprobs == lp([10, 11, EOS], 0) + lp([20, 21, EOS], 2)
    fid = result.fidelity
    assert (fid.clean_joins, fid.realigned_joins, fid.forked_joins) == (1, 1, 0)
    assert (fid.sampled_tokens, fid.trainable_tokens, fid.dropped_tokens) == (13, 6, 7)
    assert fid.coverage == pytest.approx(6 / 13)


def test_realign_keeps_the_leading_part_of_a_rerendered_completion():
    p0 = [1, 3, 5]
    c0 = [40, 41, 42, 44, EOS]
    p1 = p0 + [40, 41, 43, EOS] + [50, 5]  # the template re-rendered c0 from its third token on
    c1 = [20, EOS]
    result = build_rows([call(p0, c0, salt=0), call(p1, c1, salt=1)], eos_token_id=EOS)
    (row,) = result.rows
    assert trained(row) == ([40, 41, 20, EOS], lp(c0, 0)[:2] + lp(c1, 1))
    assert (result.fidelity.trainable_tokens, result.fidelity.dropped_tokens) == (4, 3)


def test_realign_never_trains_a_span_found_after_changed_context():
    # History truncated from the front: c0 reappears whole, but after a different left context.
    p0 = [1, 3, 5]
    c0 = [10, 11, EOS]
    p1 = [1, 9, 5] + c0 + [50, 5]
    result = build_rows([call(p0, c0), call(p1, [20, EOS], salt=1)], eos_token_id=EOS)
    (row,) = result.rows
    assert trained(row)[0] == [20, EOS]
    assert row.prompt_ids == p1  # the first prompt F starts with (p0 is not a prefix of it)
    assert result.fidelity.dropped_tokens == 3


def test_realign_prompt_is_the_main_threads_opening_when_a_side_call_came_first():
    # A helper's short thread first: its prompt shares only template tokens ([1, 3]) with the main thread.
    side = call([1, 3, 7], [30, EOS], salt=2)
    main = chain([1, 3, 5, 6], [([], [10, EOS]), ([50, 5], [11, EOS])])
    (row,) = build_rows([side, *main], eos_token_id=EOS).rows
    assert row.prompt_ids == [1, 3, 5, 6]
    assert trained(row)[0] == [10, EOS, 11, EOS] and context(row) == [50, 5]


def test_fork_gives_one_row_per_break_and_trains_every_token_once():
    calls = drop_reasoning_calls()
    result = build_rows(calls, eos_token_id=EOS, policy="fork")
    assert len(result.rows) == 2
    first, second = result.rows
    assert first.prompt_ids + first.completion_ids == calls[1].prompt_token_ids + calls[1].completion_token_ids
    assert second.prompt_ids == calls[2].prompt_token_ids
    assert trained(first)[0] + trained(second)[0] == [t for c in calls for t in c.completion_token_ids]
    fid = result.fidelity
    assert (fid.clean_joins, fid.realigned_joins, fid.forked_joins, fid.dropped_tokens, fid.rows) == (1, 0, 1, 0, 2)


def test_strict_raises_a_named_error_on_a_break():
    with pytest.raises(TokenDriftError, match="call 2's prompt does not extend call 1") as caught:
        build_rows(drop_reasoning_calls(), eos_token_id=EOS, policy="strict")
    assert isinstance(caught.value, RolloutTapError)


@pytest.mark.parametrize("breaks", [0, 1, 2, 5])
def test_fork_row_count_is_breaks_plus_one(breaks):
    calls = []
    for b in range(breaks + 1):  # each thread starts with a prompt no earlier sequence prefixes
        calls += chain([1, 100 + b], [([], [10 + b, EOS]), ([50], [20 + b, EOS])])
    result = build_rows(calls, eos_token_id=EOS, policy="fork")
    assert len(result.rows) == breaks + 1
    assert result.fidelity.forked_joins == breaks
    realigned = build_rows(calls, eos_token_id=EOS).fidelity
    assert (realigned.realigned_joins, realigned.rows, realigned.clean_joins) == (breaks, 1, breaks + 1)


def test_interleaved_sub_agent_threads_each_extend_their_own_chain():
    main = chain([1, 100], [([], [10, EOS]), ([50], [11, EOS]), ([51], [12, EOS])])
    sub = chain([1, 200], [([], [20, EOS]), ([60], [21, EOS])])
    calls = [main[0], sub[0], main[1], sub[1], main[2]]
    result = build_rows(calls, eos_token_id=EOS, policy="fork")
    assert [trained(r)[0] for r in result.rows] == [[10, EOS, 11, EOS, 12, EOS], [20, EOS, 21, EOS]]
    assert (result.fidelity.clean_joins, result.fidelity.forked_joins) == (3, 1)
    realigned = build_rows(calls, eos_token_id=EOS)
    assert trained(realigned.rows[0])[0] == [10, EOS, 11, EOS, 12, EOS]  # the main thread made the last call
    assert realigned.fidelity.dropped_tokens == 4


# --- which calls are used -----------------------------------------------------------------------------------------

FAILED = {"state": "error", "status_code": None}
A = ([1, 5], [10, EOS])
B = ([1, 5, 10, EOS, 50, 5], [11, EOS])

SELECTION_TABLE = {
    # name: (calls as (prompt, completion, fields), trained tokens, (used, retries, failed))
    "retry after failure": ([(*A, FAILED), (*A, {"is_retry": True})], [10, EOS], (1, 1, 0)),
    "retry after a 500": ([(*A, {"status_code": 500}), (*A, {"is_retry": True})], [10, EOS], (1, 1, 0)),
    "answered then retried": (
        [(*A, {}), ([1, 5], [12, EOS], {"is_retry": True}), ([1, 5, 12, EOS, 50, 5], [11, EOS], {})],
        [12, EOS, 11, EOS],
        (2, 1, 0),
    ),
    "retry that fails": ([(*A, {}), (*A, {"is_retry": True, **FAILED})], None, (0, 1, 1)),
    "two retries": ([(*A, FAILED), (*A, {"is_retry": True, **FAILED}), (*A, {"is_retry": True})], [10, EOS], (1, 2, 0)),
    "failed then next": ([(*A, FAILED), (*B, {})], [11, EOS], (1, 0, 1)),
    # 200, but its stream broke off (an error event before [DONE]): the agent asked again another way
    "broken-off answer then next": ([(*A, {"failed": True}), (*B, {})], [11, EOS], (1, 0, 1)),
    "broken-off answer last": ([(*B, {}), (*A, {"failed": True})], [11, EOS], (1, 0, 1)),
    "broken-off answer retried": ([(*A, {"failed": True}), (*A, {"is_retry": True})], [10, EOS], (1, 1, 0)),
    "leading retry": ([(*A, {"is_retry": True})], [10, EOS], (1, 0, 0)),
    "retry of the same turn": ([(*A, {**FAILED, "turn": 0}), (*A, {"is_retry": True, "turn": 0})], [10, EOS], (1, 1, 0)),
    # a retry whose first attempts never reached the proxy has a turn of its own: it replaces nothing
    "retry of an unseen attempt": ([(*A, {"turn": 0}), (*B, {"is_retry": True, "turn": 1})], [10, EOS, 11, EOS],
                                   (2, 0, 0)),
    "429": ([(*A, {"status_code": 429})], None, (0, 0, 1)),
    # an agent sampling the same request twice (n=1 servers) goes on with either answer: what follows says which
    "second sample, the first kept": ([(*A, {"turn": 0}), (A[0], [12, EOS], {"turn": 0}), (*B, {"turn": 1})],
                                      [10, EOS, 11, EOS], (2, 1, 0)),
    "second sample, the second kept": ([(*A, {"turn": 0}), (A[0], [12, EOS], {"turn": 0}),
                                        ([1, 5, 12, EOS, 50, 5], [11, EOS], {"turn": 1})],
                                       [12, EOS, 11, EOS], (2, 1, 0)),
    "second sample last": ([(*A, {"turn": 0}), (A[0], [12, EOS], {"turn": 0})], [12, EOS], (1, 1, 0)),
    "second sample, then another thread": ([(*A, {"turn": 0}), (A[0], [12, EOS], {"turn": 0}),
                                            ([7, 8], [11, EOS], {"turn": 1})], [11, EOS], (2, 1, 0)),
    # two sub-agents sent the same request at once: each goes on with its own answer, both are kept
    "twin samples, each continued": ([(*A, {"turn": 0}), (A[0], [12, EOS], {"turn": 0}), (*B, {"turn": 1}),
                                     ([1, 5, 12, EOS, 60, 5], [13, EOS], {"turn": 2})], [12, EOS, 13, EOS], (4, 0, 0)),
    "identical twin samples, continued": ([(*A, {"turn": 0}), (*A, {"turn": 0}), (*B, {"turn": 1})],
                                          [10, EOS, 11, EOS], (2, 1, 0)),
    "second sample retried": ([(*A, {"turn": 0}), (A[0], [12, EOS], {"turn": 0}),
                               (*A, {"turn": 0, "is_retry": True, **FAILED})], [10, EOS], (1, 2, 0)),
}


@pytest.mark.parametrize("policy", ["realign", "fork"])
def test_a_second_sample_kept_without_token_ids_is_not_replaced_by_the_other(policy):
    # The answer the agent went on with came back without ids: the discarded sample must not stand in for it.
    kept = TokenCall(None, None, None, "stop", turn=0)
    calls = [kept, call(A[0], [12, EOS], turn=0), call([1, 5, 10, EOS, 50, 5], [11, EOS], salt=1, turn=1)]
    result = build_rows(calls, eos_token_id=EOS, policy=policy)
    (row,) = result.rows
    assert trained(row)[0] == [11, EOS] and 12 not in row.completion_ids + row.prompt_ids
    assert (result.fidelity.calls_without_ids, result.fidelity.retries_skipped) == (1, 1)


@pytest.mark.parametrize(("specs", "expected", "counts"), SELECTION_TABLE.values(), ids=SELECTION_TABLE.keys())
def test_retries_and_failures_are_skipped_and_counted(specs, expected, counts):
    calls = [call(p, c, **f) for p, c, f in specs]
    result = build_rows(calls, eos_token_id=EOS)
    fid = result.fidelity
    assert (fid.calls_used, fid.retries_skipped, fid.failed_calls) == counts
    assert fid.calls == len(calls) == fid.calls_used + fid.retries_skipped + fid.failed_calls
    if expected is None:
        assert result.rows == []
    else:
        assert trained(result.rows[0])[0] == expected


def test_calls_without_ids_are_skipped_and_their_tokens_become_context():
    calls = chain([1, 5], [([], [10, EOS]), ([50], [11, EOS]), ([51], [12, EOS])])
    calls[1] = TokenCall(None, None, None, "stop")
    result = build_rows(calls, eos_token_id=EOS)
    (row,) = result.rows
    assert trained(row)[0] == [10, EOS, 12, EOS]
    assert context(row) == [50, 11, EOS, 51]
    fid = result.fidelity
    assert (fid.calls_without_ids, fid.inexact_calls, fid.calls_used, fid.clean_joins) == (1, 0, 2, 1)


def test_a_tokenize_fallback_makes_an_inexact_call_without_logprobs():
    @dataclass(frozen=True)
    class Chat:  # the caller's own call type, with text only the caller's tokenizer understands
        text: str
        prompt_token_ids: list[int] | None = None
        completion_token_ids: list[int] | None = None
        completion_logprobs: list[float] | None = None
        finish_reason: str | None = "stop"
        state: str = "done"

    seen = []

    def tokenize(chat):
        seen.append(chat.text)
        return [1, 5, 10, EOS, 50, 5], [11, EOS]

    first = Chat("first", [1, 5], [10, EOS], lp([10, EOS]))
    result = build_rows([first, Chat("second")], eos_token_id=EOS, tokenize=tokenize)
    assert seen == ["second"]
    (row,) = result.rows
    assert row.completion_ids == [10, EOS, 50, 5, 11, EOS] and row.env_mask == [1, 1, 0, 0, 1, 1]
    assert row.logprobs is None  # never a made-up 0.0 for a trained token
    fid = result.fidelity
    assert (fid.calls_without_ids, fid.inexact_calls, fid.missing_logprobs, fid.clean_joins) == (1, 1, 2, 1)


@pytest.mark.parametrize("sampled", [None, [-0.5], [-0.5, None], [-0.5, "x"], [True, -0.5], [-0.5, float("nan")],
                                     [float("-inf"), -0.5]],
                         ids=["absent", "wrong length", "a null", "a string", "a boolean", "a NaN", "an infinity"])
def test_missing_or_misaligned_logprobs_make_the_row_logprobs_none(sampled):
    result = build_rows([call([1, 5], [10, EOS], logprobs=sampled)], eos_token_id=EOS)
    assert result.rows[0].logprobs is None
    assert result.rows[0].env_mask == [1, 1]
    assert result.fidelity.missing_logprobs == 2
    assert result.fidelity.logprobs_set_aside == (sampled is not None)  # counted, not a warning per call


def test_logprobs_set_aside_are_counted_per_used_call_not_logged(caplog):
    # A failed attempt (no answer) is not used: the two answered calls count.
    calls = [call([1, 5], [10, EOS], logprobs=[-0.5], status_code=500, state="error"),
             call([1, 5], [10, EOS], logprobs=[-0.5], is_retry=True),
             call([1, 5, 10, EOS, 7], [11, EOS], logprobs=[-0.1])]
    with caplog.at_level("WARNING"):
        result = build_rows(calls, eos_token_id=EOS)
    assert result.fidelity.logprobs_set_aside == 2 and result.rows[0].logprobs is None
    assert not caplog.records  # a damaged store's thousand calls log nothing each


TRUNCATION_TABLE = [
    # (last completion, finish_reason, truncated)
    ([10, EOS], "stop", False),
    ([10, 11], "length", True),
    ([10, 11], "stop", True),  # a stop string: no eos, and TRL counts that as truncated too
    ([10, EOS], "length", True),
    ([], "stop", True),
]


@pytest.mark.parametrize(("completion", "finish", "truncated"), TRUNCATION_TABLE)
def test_truncation_is_reported_and_the_completion_kept(completion, finish, truncated):
    calls = [call([1, 5], [10, EOS]), call([1, 5, 10, EOS, 50, 5], completion, finish_reason=finish)]
    result = build_rows(calls, eos_token_id=EOS)
    (row,) = result.rows
    assert row.truncated is truncated and result.fidelity.truncated == int(truncated)
    assert row.completion_ids == [10, EOS, 50, 5] + completion


def test_a_single_empty_completion_still_gives_a_nonempty_completion():
    (row,) = build_rows([call([1, 5], [])], eos_token_id=EOS).rows
    assert (row.prompt_ids, row.completion_ids, row.env_mask, row.truncated) == ([1], [5], [0], True)


@pytest.mark.parametrize("policy", POLICY_NAMES)
def test_no_usable_calls_give_an_empty_result(policy):
    for calls in ([], [call([1], [EOS], **FAILED)]):
        result = build_rows(calls, eos_token_id=EOS, policy=policy)
        assert result.rows == [] and result.fidelity.rows == 0 and result.fidelity.coverage == 1.0


def test_build_row_substitutes_a_safe_empty_row():
    row, fid = build_row([], eos_token_id=EOS, fallback_prompt_ids=[1, 5])
    assert row == empty_row(EOS, [1, 5]) == TrainingRow([1, 5], [EOS], [0], [0.0], False)
    assert (fid.rows, fid.empty_rows) == (0, 1)
    assert empty_row(EOS).prompt_ids == [EOS]
    row, fid = build_row(chain([1], [([], [10, EOS])]), eos_token_id=EOS)
    assert row.completion_ids == [10, EOS] and fid.empty_rows == 0


def test_bad_policies_are_rejected():
    with pytest.raises(ValueError, match="unknown row policy"):
        build_rows([], eos_token_id=EOS, policy="loose")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs build_rows"):
        build_row([], eos_token_id=EOS, policy="fork")  # type: ignore[arg-type]


def test_any_object_with_the_fields_is_accepted():
    plain = SimpleNamespace(prompt_token_ids=(1, 5), completion_token_ids=(10, EOS), completion_logprobs=(-0.1, -0.2))
    assert as_token_call(plain) == TokenCall([1, 5], [10, EOS], [-0.1, -0.2])
    (row,) = build_rows([plain, call([1, 5, 10, EOS, 50, 5], [11, EOS])], eos_token_id=EOS).rows
    assert row.env_mask == [1, 1, 0, 0, 1, 1]  # tuples from the first call compare equal as lists


def test_row_as_dict_copies():
    row = TrainingRow([1], [10, EOS], [1, 1], [-0.1, -0.2], False)
    data = row.as_dict()
    expected = {"prompt_ids": [1], "completion_ids": [10, EOS], "env_mask": [1, 1], "logprobs": [-0.1, -0.2]}
    assert data == {**expected, "truncated": False}
    data["env_mask"].append(0)
    assert row.env_mask == [1, 1]


def test_fidelity_merges_into_a_batch_report():
    one = Fidelity(calls=2, sampled_tokens=10, trainable_tokens=5, rows=1)
    two = Fidelity(calls=3, sampled_tokens=0, trainable_tokens=0, empty_rows=1)
    total = batch_fidelity([one, two])
    assert (total.agents, total.calls, total.rows, total.empty_rows, total.coverage) == (2, 5, 1, 1, 0.5)
    assert one.merge([two]) == total
    assert batch_fidelity([]) == Fidelity(agents=0)
    assert Fidelity().coverage == 1.0 and Fidelity().as_dict()["coverage"] == 1.0
    assert Fidelity(calls=2, calls_without_ids=2).coverage == 0.0  # nothing of theirs trains


# --- a seeded random property test --------------------------------------------------------------------------------


def random_conversation(rng: random.Random) -> list[TokenCall]:
    """Random tool loops with random breaks: dropped spans, truncated history, fresh threads, failures, retries."""
    calls, seq, fresh = [], [1, rng.randint(3, 9)], iter(range(1000, 10**6))
    for k in range(rng.randint(1, 8)):
        seq = seq + [rng.randint(3, 60) for _ in range(rng.randint(0, 4))]
        completion = [next(fresh) for _ in range(rng.randint(0, 6))] + ([EOS] if rng.random() < 0.8 else [])
        if rng.random() < 0.15:
            calls.append(call(seq, [], **FAILED))
        calls.append(call(seq, completion, salt=k, is_retry=bool(calls) and rng.random() < 0.1))
        seq = seq + completion
        match rng.choice(["clean"] * 5 + ["drop", "cut", "front", "thread"]):
            case "drop":
                seq = seq[: len(seq) - len(completion)] + completion[len(completion) // 2 :]
            case "cut":
                seq = seq[: rng.randint(1, len(seq))]
            case "front":
                seq = [1] + seq[rng.randint(1, len(seq)) :]
            case "thread":
                seq = [1, rng.randint(3, 9)]
    return calls


def sequence_at_sampling(calls: list[TokenCall]) -> dict[tuple[int, ...], float]:
    """Every sampled token keyed by its whole left context plus itself, with its logprob."""
    found = {}
    for c in calls:
        if c.state != "done" or not c.completion_token_ids:
            continue
        seq = list(c.prompt_token_ids)
        for token, logprob in zip(c.completion_token_ids, c.completion_logprobs, strict=True):
            seq.append(token)
            found[tuple(seq)] = logprob
    return found


@pytest.mark.parametrize("seed", range(60))
def test_random_conversations_keep_every_invariant(seed):
    rng = random.Random(seed)
    calls = random_conversation(rng)
    sampled = sequence_at_sampling(calls)
    for policy in ("realign", "fork"):
        result = build_rows(calls, eos_token_id=EOS, policy=policy)
        fid = result.fidelity
        for row in result.rows:
            assert_shape(row)
            seq = row.prompt_ids + row.completion_ids
            for i, (mask, logprob) in enumerate(zip(row.env_mask, row.logprobs, strict=True)):
                position = len(row.prompt_ids) + i
                if mask:  # a trained token is a sampled token with its exact left context, and its logprob
                    assert sampled[tuple(seq[: position + 1])] == logprob
        assert fid.trainable_tokens + fid.dropped_tokens == fid.sampled_tokens
        assert fid.calls == fid.calls_used + fid.retries_skipped + fid.failed_calls + fid.calls_without_ids
        assert fid.clean_joins + fid.realigned_joins + fid.forked_joins == max(fid.calls_used - 1, 0)
        if policy == "fork":
            assert fid.dropped_tokens == 0
            assert len(result.rows) == (fid.forked_joins + 1 if fid.calls_used else 0)
        else:
            assert len(result.rows) == (1 if fid.calls_used else 0)
        if not fid.realigned_joins and not fid.forked_joins and result.rows:
            assert build_rows(calls, eos_token_id=EOS, policy="strict").rows == result.rows


# --- resampling agents against a straightforward selection ------------------------------------------------------


def resampling_agent(rng: random.Random, turns: int, vocab: list) -> list[TokenCall]:
    """Interleaved threads (some twins of others) that sample each request one to three times, with attempts
    failed, retried, identical, re-rendered or without ids; few distinct tokens, so that threads share prefixes."""
    threads, calls = [[1, 5]], []
    for turn in range(turns):
        if rng.random() < 0.2:  # a sub-agent: a fresh thread, or a twin sending what another thread sends
            threads.append(list(rng.choice(threads)) if rng.random() < 0.5 else [1, rng.choice(vocab)])
        at = rng.randrange(len(threads))
        prompt = threads[at] + [rng.choice(vocab) for _ in range(rng.randint(0, 2))]
        sequences = []
        for k in range(rng.randint(1, 3)):
            # now and then an attempt's prompt was rendered otherwise (its last token, or a token more)
            sent = rng.choice([prompt] * 4 + [prompt[:-1] + [rng.choice(vocab)], prompt + [rng.choice(vocab)]])
            answer = [rng.choice(vocab) for _ in range(rng.randint(0, 2))] + [EOS]
            fields = rng.choice([{}] * 6 + [FAILED, {"is_retry": True}, {"ids": None}])
            if fields.pop("ids", 0) is None:
                calls.append(TokenCall(None, None, None, "stop", turn=turn))
            else:
                calls.append(call(sent, answer, salt=turn + k / 10, **{"turn": turn, **fields}))
            sequences.append(sent + answer)
        threads[at] = rng.choice(sequences)
    return calls


def straightforward_selection(calls: list[TokenCall]) -> list[TokenCall]:
    """The calls build_rows keeps, found as the module docstring says, looking at every later call for each run."""
    runs: list[list[int]] = []
    for index, c in enumerate(calls):
        if runs and (calls[runs[-1][-1]].turn == c.turn if c.turn is not None else c.is_retry):
            runs[-1].append(index)
        else:
            runs.append([index])
    answered = [[i for at, i in enumerate(run) if calls[i].state == "done" and 200 <= calls[i].status_code < 300
                 and not (at + 1 < len(run) and calls[run[at + 1]].is_retry)] for run in runs]
    kept = [i for number, attempts in enumerate(answered) if attempts
            for i in straightforward_continued(calls, attempts, [j for run in answered[number + 1:] for j in run])]
    return [TokenCall(c.prompt_token_ids, c.completion_token_ids, c.completion_logprobs, c.finish_reason)
            for c in (calls[i] for i in kept)]


def straightforward_continued(calls: list[TokenCall], attempts: list[int], later: list[int]) -> list[int]:
    def seq(i):
        return calls[i].prompt_token_ids + calls[i].completion_token_ids

    known = [i for i in attempts if calls[i].prompt_token_ids is not None]
    if len(attempts) == 1 or not known:
        return attempts[-1:]
    opening = calls[known[0]].prompt_token_ids
    followers = [calls[j].prompt_token_ids for j in later
                 if calls[j].prompt_token_ids is not None and calls[j].prompt_token_ids[:len(opening)] == opening]
    if not followers:
        return attempts[-1:]
    if not any(followers[0][:len(seq(i))] == seq(i) for i in known):
        return ([i for i in attempts if calls[i].prompt_token_ids is None] or attempts)[-1:]
    continued = {}
    for i in known:
        if any(f[:len(seq(i))] == seq(i) for f in followers):
            continued.setdefault(tuple(seq(i)), i)
    return list(continued.values())


@pytest.mark.parametrize(("seed", "turns", "vocab"), [
    *((seed, 60, [3, 4, 5]) for seed in range(30)),
    (100, 1500, [3, 4, 5, 6]),  # thousands of calls: many runs of samples under one opening
    (101, 300, [3, 4, "x"]),  # token ids that do not sort against each other
])
def test_resampling_agents_keep_the_calls_a_straightforward_selection_keeps(seed, turns, vocab):
    calls = resampling_agent(random.Random(seed), turns, vocab)
    chosen = straightforward_selection(calls)
    for policy in ("realign", "fork"):
        result, expected = build_rows(calls, eos_token_id=EOS, policy=policy), build_rows(chosen, eos_token_id=EOS,
                                                                                          policy=policy)
        assert result.rows == expected.rows
        assert result.fidelity.calls_used == expected.fidelity.calls_used
        assert result.fidelity.retries_skipped == len(calls) - len(chosen) - result.fidelity.failed_calls


def test_a_call_extending_two_identical_chains_joins_the_later_one():
    first = call([1, 5], [10, EOS], salt=0)
    prefilled = call([1, 5, 10], [EOS], salt=1)  # a continuation request: its sequence equals the first call's
    follow = call([1, 5, 10, EOS, 50, 5], [11, EOS], salt=2)
    rows = build_rows([first, prefilled, follow], eos_token_id=EOS, policy="fork").rows
    assert [trained(r) for r in rows] == [
        ([10, EOS], lp([10, EOS], 0)),
        ([EOS, 11, EOS], lp([EOS], 1) + lp([11, EOS], 2)),
    ]


def test_twin_samples_continued_by_two_threads_are_each_trained_once_with_fork():
    # Two sub-agents sent one request at once and each went on with its own answer: every sample is trained once.
    calls = [call(*A, turn=0), call(A[0], [12, EOS], salt=1, turn=0), call(*B, salt=2, turn=1),
             call([1, 5, 12, EOS, 60, 5], [13, EOS], salt=3, turn=2)]
    result = build_rows(calls, eos_token_id=EOS, policy="fork")
    assert sorted(t for row in result.rows for t in trained(row)[0]) == sorted([10, EOS, 11, EOS, 12, EOS, 13, EOS])
    assert result.fidelity.retries_skipped == 0
