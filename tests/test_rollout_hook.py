"""agent_rollout's plumbing that needs no trainer: the eos it shares with the manager, the batch metrics."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from rollouttap.manager import AgentManager, CommandAgent
from rollouttap.manager.fidelity import Fidelity
from rollouttap.manager.rows import TrainingRow
from rollouttap.trainer_hooks.rollout import (_share_eos, metrics_from_counts, rollout_counts, rollout_metrics,
                                              to_rollout_output)


def _manager(tmp_path, eos):
    return AgentManager(CommandAgent(["true"]), store=tmp_path / "runs.db", eos_token_id=eos)


def test_a_manager_without_eos_gets_the_trainers(tmp_path):
    manager = _manager(tmp_path, None)
    _share_eos(manager, 7)
    assert manager.eos_token_id == 7
    _share_eos(manager, 7)  # the same again is fine


def test_a_manager_with_another_eos_is_refused(tmp_path):
    with pytest.raises(ValueError, match="differs from the trainer's"):
        _share_eos(_manager(tmp_path, 5), 7)


def _result(calls: int, fidelity: Fidelity | None):
    return SimpleNamespace(status="ok", calls=calls, fidelity=fidelity, incomplete_flows=(),
                           bypass_connections=())


@pytest.mark.parametrize("results, coverage", [
    ([_result(2, Fidelity(sampled_tokens=10, trainable_tokens=10))], 1.0),
    ([_result(2, Fidelity(sampled_tokens=10, trainable_tokens=5))], 0.5),
    ([_result(2, None), _result(1, None)], 0.0),  # calls but no rows: nothing trains, say so
    ([_result(0, None)], 1.0),  # no call, nothing sampled: nothing was missed
])
def test_coverage_metric_is_zero_when_calls_built_no_rows(results, coverage):
    assert rollout_metrics(results)["fidelity/coverage"] == coverage


def test_calls_whose_ids_were_set_aside_are_logged():
    results = [_result(2, Fidelity(sampled_tokens=4, trainable_tokens=4, calls_without_ids=1, ids_set_aside=1,
                                   logprobs_set_aside=2))]
    metrics = rollout_metrics(results)
    assert metrics["fidelity/ids_set_aside"] == 1.0 and metrics["fidelity/calls_without_ids"] == 1.0
    assert metrics["fidelity/logprobs_set_aside"] == 2.0  # the warning per call it replaced went to the log


def test_agents_that_called_but_built_no_row_are_counted():
    results = [_result(2, Fidelity(sampled_tokens=10, trainable_tokens=10)), _result(3, None), _result(0, None)]
    metrics = rollout_metrics(results)
    assert metrics["fidelity/agents_without_rows"] == 1.0 and metrics["fidelity/coverage"] == 1.0


def test_a_row_without_logprobs_gets_none_per_token_and_the_others_keep_theirs():
    # TRL's vLLM path subtracts sampling logprobs: None for the whole batch would crash it; None per token
    # only leaves those tokens out of the importance-sampling correction.
    def result(row):
        return SimpleNamespace(status="ok", row=row, fidelity=None, agent_id="a", exit_code=0, return_value=None,
                               calls=1, check_result=None, stdout_tail="")
    with_lp = TrainingRow([1], [5, 6, 2], [1, 1, 1], [-0.5, -0.25, -0.1], truncated=False)
    without = TrainingRow([1], [7, 2], [1, 1], None, truncated=False)
    out = to_rollout_output([result(with_lp), result(without)], eos_token_id=2)
    assert out["logprobs"] == [[-0.5, -0.25, -0.1], [None, None]]
    assert [len(ids) for ids in out["completion_ids"]] == [len(lp) for lp in out["logprobs"]]


@pytest.mark.parametrize("limit, expected", [(None, 3), (5, 3), (3, 3), (2, 2)])
def test_completions_longer_than_trls_limit_are_cut(limit, expected):
    row = TrainingRow([1], [5, 6, 2], [1, 0, 1], [-0.5, 0.0, -0.1], truncated=False)
    result = SimpleNamespace(status="ok", row=row, fidelity=None, agent_id="a", exit_code=0, return_value=None,
                             calls=1, check_result=None, stdout_tail="")
    out = to_rollout_output([result], eos_token_id=2, max_completion_length=limit)
    assert out["completion_ids"] == [[5, 6, 2][:expected]]
    assert out["env_mask"] == [[1, 0, 1][:expected]] and out["logprobs"] == [[-0.5, 0.0, -0.1][:expected]]
    assert out["agent_trainable_tokens"] == [sum([1, 0, 1][:expected])]


@pytest.mark.parametrize("status, limit, coverage", [
    ("ok", None, 1.0),
    ("ok", 2, 0.5),  # cut to TRL's max_completion_length: one of the two sampled tokens is trained
    ("error", None, 0.0),  # a failed agent's row is fully masked: nothing of it trains
])
def test_coverage_counts_what_trl_trains(status, limit, coverage):
    row = TrainingRow([1], [5, 6, 2], [1, 0, 1], [-0.5, 0.0, -0.1], truncated=False)
    result = SimpleNamespace(status=status, row=row, fidelity=Fidelity(sampled_tokens=2, trainable_tokens=2),
                             agent_id="a", exit_code=0, return_value=None, calls=1, check_result=None, stdout_tail="",
                             incomplete_flows=(), bypass_connections=())
    out = to_rollout_output([result], eos_token_id=2, max_completion_length=limit)
    assert out["agent_coverage"] == [coverage]
    metrics = rollout_metrics([result], out["env_mask"])
    assert metrics["fidelity/coverage"] == coverage and metrics["fidelity/dropped_tokens"] == 2 - 2 * coverage


def test_counts_summed_over_ranks_give_the_whole_batchs_metrics():
    # A multi-process run sums each rank's counts before logging: the figures must be those of all agents.
    ok = SimpleNamespace(status="ok", calls=1, fidelity=Fidelity(sampled_tokens=4, trainable_tokens=4),
                         incomplete_flows=(), bypass_connections=())
    slow = SimpleNamespace(status="timeout", calls=3, fidelity=Fidelity(sampled_tokens=6, trainable_tokens=0,
                                                                        dropped_tokens=6),
                           incomplete_flows=("f1",), bypass_connections=("c",))
    rank0, rank1 = [ok, ok], [slow, ok]
    summed = {k: v + rollout_counts(rank1)[k] for k, v in rollout_counts(rank0).items()}
    assert metrics_from_counts(summed) == rollout_metrics(rank0 + rank1)
    whole = rollout_metrics(rank0 + rank1)
    assert whole["agents/success_rate"] == 0.75 and whole["agents/timeout_rate"] == 0.25
    assert whole["agents/calls_mean"] == 1.5 and whole["fidelity/coverage"] == 12 / 18
    assert whole["agents/incomplete_flows"] == 1 and whole["agents/bypass_connections"] == 1
