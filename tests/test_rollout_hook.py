"""agent_rollout's plumbing that needs no trainer: the eos it shares with the manager, the batch metrics."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from rollouttap.manager import AgentManager, CommandAgent
from rollouttap.manager.fidelity import Fidelity
from rollouttap.trainer_hooks.rollout import _share_eos, rollout_metrics


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


def test_agents_that_called_but_built_no_row_are_counted():
    results = [_result(2, Fidelity(sampled_tokens=10, trainable_tokens=10)), _result(3, None), _result(0, None)]
    metrics = rollout_metrics(results)
    assert metrics["fidelity/agents_without_rows"] == 1.0 and metrics["fidelity/coverage"] == 1.0
