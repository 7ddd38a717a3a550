"""Two trainer processes with a vLLM server (``GRPOConfig(use_vllm=True, vllm_mode="server")``), as
``torchrun --nproc_per_node 2`` runs them: rank 0 spends SYNC_S seconds pushing weights before TRL calls its
``rollout_func``, rank 1 returns from that sync at once. Each rank's agents write when they started.

Usage: python -m torch.distributed.run --standalone --nproc_per_node 2 tests/vllm_sync_ranks.py WORKDIR MODEL_URL
Each rank writes ``WORKDIR/rank-N.json``: when its rollout_func was called and when each of its agents started.
No vLLM is installed here, so the trainer is TRL's config and accelerator without the GRPOTrainer around them.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

from accelerate import Accelerator
from trl import GRPOConfig

from rollouttap.manager import AgentManager, CommandAgent
from rollouttap.trainer_hooks.rollout import agent_rollout

SYNC_S = 3.0
AGENT = "import sys, time; open(sys.argv[1], 'a').write(repr(time.time()) + chr(10))"  # no braces: a template


def main(workdir: Path, model_url: str) -> None:
    rank = int(os.environ["RANK"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        args = GRPOConfig(output_dir=str(workdir / "out"), use_cpu=True, bf16=False, report_to="none",
                          gradient_checkpointing=False, use_vllm=True, vllm_mode="server")
    trainer = SimpleNamespace(args=args, accelerator=Accelerator(cpu=True), processing_class=None, model=None)
    starts = workdir / f"starts-{rank}.txt"
    agent = CommandAgent([sys.executable, "-c", AGENT, str(starts), "{prompt}"])
    with AgentManager(agent, store=workdir / f"runs-{rank}.db", parallel=2, timeout=60, model_url=model_url,
                      confdir=workdir / "conf") as manager:
        rollout = agent_rollout(manager, eos_token_id=2, check_policy=False, temperature_check="off")
        trainer.accelerator.wait_for_everyone()  # both managers up: the race starts here
        if rank == 0:
            time.sleep(SYNC_S)  # its weight push and the server's cache reset (TRL's sync_weights)
        called = time.time()
        rollout(["a", "b"], trainer)
    (workdir / f"rank-{rank}.json").write_text(json.dumps({
        "called": called, "agent_starts": [float(line) for line in starts.read_text().split()]}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
