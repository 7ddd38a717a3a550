"""A real TRL GRPOTrainer step whose rollouts are real agent processes behind the real proxy, talking to
the embedded policy server that serves the trainer's live tiny model (CPU, no vLLM)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

pytest.importorskip("trl")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from rollouttap.manager import AgentManager, CommandAgent  # noqa: E402
from rollouttap.trainer_hooks.policy_server import PolicyServer  # noqa: E402
from rollouttap.trainer_hooks.rollout import agent_rollout  # noqa: E402
from rollouttap.trainer_hooks.tiny_model import build_tiny_model  # noqa: E402

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

# Two model calls: the second prompt adds a user turn (environment tokens) after the first reply.
# A task containing "crash" fails after its first call.
AGENT = """
import os, sys, openai
c = openai.OpenAI(base_url=os.environ["OPENAI_BASE_URL"], api_key="k", max_retries=0)
msgs = [{"role": "user", "content": sys.argv[1]}]
r = c.chat.completions.create(model="policy", messages=msgs, max_tokens=8, stream=True)
text = "".join(ch.choices[0].delta.content or "" for ch in r if ch.choices)
if "crash" in sys.argv[1]:
    sys.exit("agent crashed on purpose")
msgs += [{"role": "assistant", "content": text}, {"role": "user", "content": "Go on."}]
r = c.chat.completions.create(model="policy", messages=msgs, max_tokens=8)
print(r.choices[0].message.content)
"""


RESPONSES_AGENT = """
import os, sys, openai
c = openai.OpenAI(base_url=os.environ["OPENAI_BASE_URL"], api_key="k", max_retries=0)
items = [{"role": "user", "content": sys.argv[1]}]
text = "".join(e.delta for e in c.responses.create(model="policy", input=items, max_output_tokens=8, stream=True)
               if e.type == "response.output_text.delta")
items += [{"role": "assistant", "content": text}, {"role": "user", "content": "Go on."}]
print(c.responses.create(model="policy", input=items, max_output_tokens=8).output_text)
"""


def _grpo_step(tmp_path, confdir, agent_source: str, prompts: list) -> SimpleNamespace:
    """One GRPO step whose rollouts are runs of ``agent_source`` behind the proxy, the trainer's live model
    served by PolicyServer: the trainer, what TRL got and built, the agents' results."""
    path = build_tiny_model()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    before = [p.detach().clone() for p in model.parameters()]
    dataset = Dataset.from_list([{"prompt": p} for p in prompts])
    seen_kwargs: list[dict] = []

    def reward(completions, agent_status, agent_calls, agent_answer, **kwargs):
        seen_kwargs.append({"agent_status": agent_status, "agent_calls": agent_calls, **kwargs})
        # any reward that differs within a group gives GRPO an advantage to learn from: by position, as two
        # samples of the tiny model may well give the same answer (the step then changed nothing, now and then)
        return [(i + 1) / len(agent_status) if s == "ok" else 0.0 for i, s in enumerate(agent_status)]

    results_seen, outputs = [], []
    args = GRPOConfig(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=4,
                      num_generations=2, max_completion_length=128, learning_rate=1e-2, use_cpu=True,
                      bf16=False, gradient_checkpointing=False, report_to="none", save_strategy="no",
                      logging_steps=1, disable_tqdm=True, seed=0, shuffle_dataset=False)
    agent_file = tmp_path / "agent.py"
    agent_file.write_text(agent_source)
    spec = CommandAgent([sys.executable, str(agent_file), "{prompt}"])
    with PolicyServer(model, tokenizer, logprobs_mode="processed_logprobs") as server, \
            AgentManager(spec, store=tmp_path / "runs.db", parallel=4, timeout=60, confdir=confdir,
                         model_url=server.base_url) as manager:  # no eos: agent_rollout gives the trainer's
        inner = agent_rollout(manager, prompt_to_agent=lambda p: p[-1]["content"],
                              on_results=results_seen.extend)

        def rollout(batch, trainer):
            out = inner(batch, trainer)
            outputs.append(out)
            return out

        trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=dataset,
                              processing_class=tokenizer, rollout_func=rollout)
        built = []
        generate = trainer._generate_and_score_completions
        trainer._generate_and_score_completions = lambda inputs: built.append(generate(inputs)) or built[-1]
        trainer.train()
    changed = any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))
    return SimpleNamespace(trainer=trainer, tokenizer=tokenizer, manager=manager, changed=changed,
                           outputs=outputs, results=results_seen, built=built, seen_kwargs=seen_kwargs)


def test_grpo_step_trains_on_agent_rows(tmp_path, confdir):
    prompts = [[{"role": "user", "content": "say hi"}], [{"role": "user", "content": "please crash"}]]
    step = _grpo_step(tmp_path, confdir, AGENT, prompts)
    trainer, tokenizer, manager = step.trainer, step.tokenizer, step.manager
    outputs, results_seen, built, seen_kwargs = step.outputs, step.results, step.built, step.seen_kwargs
    # the step ran and changed the weights
    assert trainer.state.global_step == 1
    assert manager.eos_token_id == tokenizer.eos_token_id
    assert step.changed
    # TRL received one row per prompt, equal to the manager's rows (failed agents: all mask 0)
    [out] = outputs
    assert len(out["completion_ids"]) == len(results_seen) == 4
    for i, result in enumerate(results_seen):
        if result.status == "ok":
            assert result.calls == 2 and result.row is not None
            assert out["prompt_ids"][i] == result.row.prompt_ids
            assert out["completion_ids"][i] == result.row.completion_ids
            assert out["env_mask"][i] == result.row.env_mask
            assert 0 in result.row.env_mask and 1 in result.row.env_mask  # the user turn is env
            assert out["logprobs"][i] == result.row.logprobs
        else:
            assert result.status == "failed" and "crashed on purpose" in result.stderr_tail
            assert set(out["env_mask"][i]) == {0}
    assert sorted(r.status for r in results_seen) == ["failed", "failed", "ok", "ok"]
    # the rewards saw the agents' fields
    assert sorted(seen_kwargs[0]["agent_status"]) == ["failed", "failed", "ok", "ok"]
    assert "agent_id" in seen_kwargs[0] and "agent_coverage" in seen_kwargs[0]
    # the loss mask TRL built is our env mask: mask-0 tokens carry no loss
    [inputs] = built
    for i in range(4):
        n = len(out["completion_ids"][i])
        assert inputs["tool_mask"][i][:n].tolist() == out["env_mask"][i]
    # the agent metrics reached TRL's log
    logged = {k for h in trainer.state.log_history for k in h}
    assert "agents/success_rate" in logged and "flows/unattributed" in logged


def test_grpo_step_trains_on_responses_api_agent_rows(tmp_path, confdir):
    # The agent uses the Responses API (the OpenAI Agents SDK's default): rows carry token ids, no logprobs.
    step = _grpo_step(tmp_path, confdir, RESPONSES_AGENT, [[{"role": "user", "content": "say hi"}]] * 2)
    assert step.trainer.state.global_step == 1 and step.changed
    [out] = step.outputs
    assert [r.status for r in step.results] == ["ok"] * 4
    for i, result in enumerate(step.results):
        assert result.calls == 2 and result.row is not None
        assert out["completion_ids"][i] == result.row.completion_ids and out["env_mask"][i] == result.row.env_mask
        assert 0 in result.row.env_mask and 1 in result.row.env_mask  # the user turn is env
        assert result.row.logprobs is None and out["logprobs"][i] == [None] * len(result.row.completion_ids)


def test_grpo_on_two_ranks_logs_the_metrics_of_every_ranks_agents(tmp_path):
    # torchrun starts two trainer processes (as on two GPUs); each rank runs its own agents behind its own
    # proxy. Rank 1's agents make two calls and fail, rank 0's make one and succeed: the log, written by
    # rank 0 alone, must count both ranks' agents.
    build_tiny_model()  # once, before the ranks would both build it
    script = os.path.join(os.path.dirname(__file__), "grpo_ranks.py")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           script, str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = {r["rank"]: r for r in (json.loads((tmp_path / f"rank-{n}.json").read_text()) for n in (0, 1))}
    assert sorted(ranks) == [0, 1] and all(r["steps"] == 1 for r in ranks.values())
    assert [a["status"] for a in ranks[0]["agents"]] == ["ok", "ok"]
    assert [a["status"] for a in ranks[1]["agents"]] == ["failed", "failed"]
    assert [a["calls"] for r in (0, 1) for a in ranks[r]["agents"]] == [1, 1, 2, 2]
    assert len({a["id"] for r in ranks.values() for a in r["agents"]}) == 4
    # each rank trained on its own agents' rows
    for r in ranks.values():
        built = [a["completion_ids"] for a in r["agents"]]
        assert all(ids for ids in built)
        if r["rank"] == 0:
            assert r["trl_completion_ids"] == built
    [logged] = ranks[0]["logged"]
    assert logged["agents/success_rate"] == 0.5  # rank 0's own agents alone: 1.0
    assert logged["agents/calls_mean"] == 1.5  # rank 0's own: 1.0
    assert logged["flows/unattributed"] == 0


def test_with_a_vllm_server_no_ranks_agents_start_before_the_main_process_pushed_its_weights(tmp_path, upstream):
    # TRL pushes weights to a vLLM server from rank 0 alone; rank 1 comes back from that sync at once. Rank 1's
    # agents must still wait for rank 0 (here 3 s late), or they sample from the weights of the step before.
    script = os.path.join(os.path.dirname(__file__), "vllm_sync_ranks.py")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           script, str(tmp_path), upstream.base_url], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank-{n}.json").read_text()) for n in (0, 1)]
    assert all(len(r["agent_starts"]) == 2 for r in ranks)
    assert ranks[1]["called"] < ranks[0]["called"] - 2  # the race is real: rank 1 came first
    assert min(ranks[1]["agent_starts"]) >= ranks[0]["called"]
