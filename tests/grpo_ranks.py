"""One GRPO step on two CPU processes, as ``torchrun --nproc_per_node 2`` (on GPUs, or ``accelerate launch``) runs a
multi-GPU job: every rank builds its own PolicyServer and AgentManager, as README's multi-GPU recipe says,
and TRL calls each rank's ``rollout_func`` with that rank's prompts.

Usage: python -m torch.distributed.run --standalone --nproc_per_node 2 tests/grpo_ranks.py WORKDIR
Each rank writes ``WORKDIR/rank-N.json``: its agents, what TRL got, and (rank 0) the logged metrics.
The agents of rank 1 make two calls and then fail; those of rank 0 make one call and succeed.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from rollouttap.manager import AgentManager, CommandAgent  # noqa: E402
from rollouttap.trainer_hooks.policy_server import PolicyServer  # noqa: E402
from rollouttap.trainer_hooks.rollout import agent_rollout  # noqa: E402
from rollouttap.trainer_hooks.tiny_model import build_tiny_model  # noqa: E402

AGENT = """
import os, sys, openai
c = openai.OpenAI(base_url=os.environ["OPENAI_BASE_URL"], api_key="k", max_retries=0)
msgs = [{"role": "user", "content": sys.argv[1]}]
for _ in range(1 if sys.argv[2] == "0" else 2):
    c.chat.completions.create(model="policy", messages=msgs, max_tokens=4)
if sys.argv[2] != "0":
    sys.exit("rank 1's agents fail on purpose")
print("done")
"""


def main(workdir: Path) -> None:
    rank = int(os.environ["RANK"])
    path = build_tiny_model()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": f"say hi {i}"}]} for i in range(2)])
    agent = workdir / f"agent-{rank}.py"
    agent.write_text(AGENT)
    results, outputs = [], []
    args = GRPOConfig(output_dir=str(workdir / "out"), max_steps=1, per_device_train_batch_size=2,
                      num_generations=2, max_completion_length=32, learning_rate=1e-2, use_cpu=True, bf16=False,
                      gradient_checkpointing=False, report_to="none", save_strategy="no", logging_steps=1,
                      disable_tqdm=True, seed=0, shuffle_dataset=False)
    # Each rank its own store file: one per node is what README asks; per rank is as good.
    with PolicyServer(model, tokenizer, logprobs_mode="processed_logprobs") as server, \
            AgentManager(CommandAgent([sys.executable, str(agent), "{prompt}", str(rank)]),
                         store=workdir / f"runs-{rank}.db", parallel=2, timeout=60,
                         model_url=server.base_url, confdir=workdir / "conf") as manager:
        inner = agent_rollout(manager, prompt_to_agent=lambda p: p[-1]["content"], on_results=results.extend)

        def rollout(prompts, trainer):
            out = inner(prompts, trainer)
            outputs.append(out)
            return out

        trainer = GRPOTrainer(model=model, reward_funcs=[lambda completions, **kw: [0.0, 1.0]], args=args,
                              train_dataset=dataset, processing_class=tokenizer, rollout_func=rollout)
        trainer.train()
    # A file per rank: two ranks printing to one pipe can interleave (print writes the line and its newline apart).
    (workdir / f"rank-{rank}.json").write_text(json.dumps({
        "rank": rank, "steps": trainer.state.global_step,
        "agents": [{"id": r.agent_id, "status": r.status, "calls": r.calls,
                    "completion_ids": r.row.completion_ids if r.row is not None else None} for r in results],
        "trl_completion_ids": [ids for out in outputs for ids in out["completion_ids"]],
        "logged": [h for h in trainer.state.log_history if "agents/success_rate" in h],
    }))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
