"""AgentManager(keep_for=...): each deploy() first deletes what ended longer ago than that, so a long training run
does not fill its disk. Real proxy, real agent processes, real store; the model is the scripted upstream."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import wait_for
from manager_support import HERE as SUPPORT
from rollouttap.errors import ConfigError
from rollouttap.manager import AgentManager, CommandAgent
from rollouttap.store import Store

AGENT = CommandAgent([sys.executable, SUPPORT, "{prompt}"])


def _kept(manager: AgentManager) -> dict[str, int]:
    """Agent id -> flows the store holds of it, for every agent it holds."""
    assert manager.store is not None
    return {a.agent_id: len(manager.store.flows(agent_id=a.agent_id)) for a in manager.store.agents()}


@pytest.mark.parametrize("keep_for, pruned", [(0, True), (3600, False), (None, False)])
def test_a_deploy_deletes_the_agents_that_ended_more_than_keep_for_ago(tmp_path, confdir, upstream, keep_for, pruned):
    with AgentManager(AGENT, store=tmp_path / "r.db", model_url=upstream.base_url, confdir=confdir,
                      keep_for=keep_for) as m:
        [first] = m.deploy(["chat 2 @id"])
        assert first.status == "ok" and _kept(m) == {first.agent_id: 2}
        [second] = m.deploy(["chat 1 @id"])
        kept = _kept(m)
    assert second.status == "ok" and second.calls == 1 and kept[second.agent_id] == 1
    assert (first.agent_id not in kept) is pruned
    if not pruned:
        assert kept[first.agent_id] == 2


def test_nothing_is_pruned_while_another_deploy_of_the_manager_runs(tmp_path, confdir, upstream, caplog):
    go = tmp_path / "go"
    with AgentManager(AGENT, store=tmp_path / "r.db", model_url=upstream.base_url, confdir=confdir,
                      keep_for=0) as m, ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(m.deploy, [f"await {go}"])
        with Store(tmp_path / "r.db") as reader:
            wait_for(lambda: [a for a in reader.agents() if a.status == "running"], what="the waiting agent running")
        [ended] = m.deploy(["chat 1 @id"])
        [during] = m.deploy(["chat 1 @id"])  # the other deploy's agents may still be being read: nothing goes
        assert _kept(m)[ended.agent_id] == 1
        said = [r.message for r in caplog.records if "not pruned while another deploy()" in r.message]
        assert len(said) == 1  # said, once: deploys that always overlap would never prune
        go.touch()
        [waited] = waiting.result(timeout=60)
        [last] = m.deploy(["chat 1 @id"])  # alone again: everything that ended before it goes
        kept = _kept(m)
    assert [r.status for r in (ended, during, waited, last)] == ["ok"] * 4
    assert kept == {last.agent_id: 1}


def test_an_empty_deploy_does_not_stop_later_ones_pruning(tmp_path, confdir, upstream):
    with AgentManager(AGENT, store=tmp_path / "r.db", model_url=upstream.base_url, confdir=confdir,
                      keep_for=0) as m:
        assert m.deploy([]) == []  # a batch filtered down to nothing: no agent to end it
        [first] = m.deploy(["chat 1 @id"])
        [second] = m.deploy(["chat 1 @id"])
        assert _kept(m) == {second.agent_id: 1} and first.status == "ok"


@pytest.mark.parametrize("keep_for", [-1, "6h", float("nan"), True, 10 ** 400])
def test_keep_for_must_be_a_number_of_seconds_not_below_zero(tmp_path, keep_for):
    with pytest.raises(ConfigError, match="keep_for"):
        AgentManager(AGENT, store=tmp_path / "r.db", keep_for=keep_for)
