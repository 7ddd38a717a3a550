"""The main job on a CPU: real GRPO training of a tiny model whose rollouts are real agent processes.

The tiny (warm-started, offline) model is served live by the embedded PolicyServer; each prompt runs the
example openai-SDK agent (examples/openai_agent.py, installed as rollouttap.examples, unmodified, multi-turn
with a calculator tool) behind the capture proxy; the reward is computed from the agent's outcome.
``generation="trl"`` runs the same prompts and reward with TRL's own generation instead, for comparison.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rollouttap.errors import RolloutTapError

log = logging.getLogger(__name__)

Generation = Literal["agents", "trl"]
DEMO_MODULES = ("torch", "transformers", "trl", "datasets", "tokenizers")
AGENT_MODULES = ("openai",)  # the example agent's, run by this interpreter


class DemoFailed(RolloutTapError):
    """The demo's agents cannot run at all: training on their rollouts would only train on failures."""


def example_agent() -> Path:
    """The example agent's file, in a checkout (examples/) or an installed package (rollouttap.examples)."""
    import rollouttap.examples
    return Path(rollouttap.examples.__file__).resolve().parent / "openai_agent.py"


def check_batch(results: list[Any]) -> None:
    """Raise DemoFailed when no agent of a batch ended ok or reached the model: a broken setup (a missing
    package, no model server), which would otherwise train quietly on nothing but zero rewards. Under
    torchrun each rank checks its own batch (a setup broken on one rank only leaves the others waiting)."""
    if not results or any(r.status == "ok" or r.calls for r in results):
        return
    first = results[0]
    detail = (first.stderr_tail or "").strip().splitlines()[-1:] or [""]
    raise DemoFailed(f"all {len(results)} agents of a batch failed without a model call; the first: "
                     f"{first.error or first.status}" + (f" ({detail[0]})" if detail[0] else ""))


@dataclass(frozen=True)
class DemoConfig:
    store: Path
    prompts: int = 12
    steps: int = 3
    num_generations: int = 4
    prompts_per_step: int = 2
    parallel: int = 4
    max_tokens: int = 64
    timeout: float = 120.0
    generation: Generation = "agents"
    seed: int = 0
    model_dir: Path | None = None
    temperature: float = 1.3
    vllm_url: str | None = None  # a `trl vllm-serve` server: TRL syncs weights into it, agents call it


@dataclass
class DemoSummary:
    steps: int = 0
    rewards: list[float] = field(default_factory=list)
    agents: dict[str, int] = field(default_factory=dict)
    calls: int = 0
    trainable_tokens: int = 0
    flows: dict[str, int] = field(default_factory=dict)
    weights_changed: bool = False
    store: str = ""


def arithmetic_prompts(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """A small data set: chat prompts asking for a sum, difference or product, with the answer."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b, op = rng.randint(2, 40), rng.randint(2, 40), rng.choice("+-*")
        answer = {"+": a + b, "-": a - b, "*": a * b}[op]
        rows.append({"prompt": [{"role": "user", "content": f"What is {a} {op} {b}?"}],
                     "answer": str(answer)})
    return rows


def _text(completion: Any) -> str:
    if isinstance(completion, list):  # conversational: a list of messages
        return " ".join(str(m.get("content") or "") for m in completion if isinstance(m, dict))
    return str(completion)


def answer_reward(completions: list[Any], answer: list[str], agent_answer: list[str] | None = None,
                  agent_status: list[str] | None = None, **_: Any) -> list[float]:
    """1.0 when the final answer holds the right number; agents must also have ended ``ok``."""
    rewards = []
    for i, expected in enumerate(answer):
        if agent_answer is not None:
            text = agent_answer[i] if (agent_status is None or agent_status[i] == "ok") else ""
        else:
            text = _text(completions[i])
        found = re.findall(r"-?\d+", text)
        rewards.append(1.0 if expected in found else 0.0)
    return rewards


def vllm_args(vllm_url: str | None) -> dict[str, Any]:
    """GRPOConfig settings for TRL's server mode, where `trl vllm-serve` runs vLLM's own OpenAI server."""
    if vllm_url is None:
        return {"use_vllm": False}
    return {"use_vllm": True, "vllm_mode": "server", "vllm_server_base_url": vllm_url.rstrip("/")}


def last_user_text(prompt: Any) -> str:
    """What the example agent takes: the task text of a chat prompt."""
    if isinstance(prompt, list):
        return str(prompt[-1]["content"])
    return str(prompt)


def run_demo(config: DemoConfig) -> DemoSummary:
    """Train for ``config.steps`` optimizer steps and summarise what happened."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from rollouttap.trainer_hooks.tiny_model import build_tiny_model

    torch.manual_seed(config.seed)
    model_dir = config.model_dir or build_tiny_model(variant="calculator")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    before = [p.detach().clone() for p in model.parameters()]
    dataset = Dataset.from_list(arithmetic_prompts(config.prompts, config.seed))
    # TRL wants an output folder; with save_strategy="no" it writes nothing there worth keeping.
    with tempfile.TemporaryDirectory(prefix="rollouttap-demo-trainer-") as out_dir:
        args = GRPOConfig(
            output_dir=out_dir, max_steps=config.steps, learning_rate=5e-5, seed=config.seed,
            per_device_train_batch_size=config.num_generations * config.prompts_per_step,
            num_generations=config.num_generations, max_completion_length=config.max_tokens * 4,
            use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none",
            save_strategy="no", logging_steps=1, temperature=config.temperature, disable_tqdm=False,
            **vllm_args(config.vllm_url),
        )
        summary = DemoSummary(store=str(config.store))
        if config.generation == "trl":
            trainer = GRPOTrainer(model=model, reward_funcs=[answer_reward], args=args,
                                  train_dataset=dataset, processing_class=tokenizer)
            trainer.train()
        else:
            trainer = _train_with_agents(config, model, tokenizer, dataset, args, summary)
    summary.weights_changed = any(not torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))
    history = trainer.state.log_history
    summary.rewards = [h["reward"] for h in history if "reward" in h]
    summary.steps = max((h.get("step", 0) for h in history), default=0)
    return summary


def _train_with_agents(config: DemoConfig, model: Any, tokenizer: Any, dataset: Any, args: Any,
                       summary: DemoSummary) -> Any:
    from trl import GRPOTrainer

    from rollouttap.manager import AgentManager, CommandAgent
    from rollouttap.store import Store
    from rollouttap.trainer_hooks.policy_server import PolicyServer
    from rollouttap.trainer_hooks.rollout import agent_rollout

    def tally(results: list[Any]) -> None:
        check_batch(results)
        for r in results:
            summary.agents[r.status] = summary.agents.get(r.status, 0) + 1
            summary.calls += r.calls
            if r.row is not None and r.status == "ok":
                summary.trainable_tokens += sum(r.row.env_mask)

    # Sampling a little hotter than 1.0 makes some rollouts fail, so GRPO groups have reward spread.
    agent = CommandAgent([sys.executable, str(example_agent()), "{prompt}"],
                         env={"MAX_TURNS": "4", "TEMPERATURE": str(config.temperature)})
    with contextlib.ExitStack() as stack:
        if config.vllm_url is None:  # the embedded server serves the trainer's live model object
            server = stack.enter_context(PolicyServer(model, tokenizer, logprobs_mode="processed_logprobs",
                                                      max_new_tokens=config.max_tokens))
            model_url = server.base_url
        else:
            model_url = config.vllm_url.rstrip("/") + "/v1"
        manager = stack.enter_context(AgentManager(
            agent, store=config.store, parallel=config.parallel, timeout=config.timeout,
            model_url=model_url, eos_token_id=tokenizer.eos_token_id))
        rollout = agent_rollout(manager, prompt_to_agent=last_user_text, on_results=tally)
        trainer = GRPOTrainer(model=model, reward_funcs=[answer_reward], args=args, train_dataset=dataset,
                              processing_class=tokenizer, rollout_func=rollout)
        trainer.train()
    with Store(config.store) as store:
        summary.flows = store.flow_counts()
    return trainer
