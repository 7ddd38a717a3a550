"""Where agent rows meet TRL's limits: a completion cut to ``max_completion_length`` must look cut to TRL, and
the agents' sampling temperature must be the one TRL computes its logprobs at (else a warning says so).

Real agent processes behind the real proxy call the scripted vLLM-shaped upstream, which renders with the
project's tiny tokenizer; the trainer is a real TRL GRPOTrainer over the tiny model (CPU)."""

from __future__ import annotations

import logging
import os
import sys
from types import SimpleNamespace

import pytest

pytest.importorskip("trl")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from rollouttap.errors import ConfigError  # noqa: E402
from rollouttap.manager import AgentManager, CommandAgent  # noqa: E402
from rollouttap.manager.rows import TrainingRow  # noqa: E402
from rollouttap.testing.replies import Reply  # noqa: E402
from rollouttap.testing.upstream import ScriptedUpstream  # noqa: E402
from rollouttap.trainer_hooks.rollout import (_end_ids, agent_rollout, cut_row,  # noqa: E402
                                              default_temperature, temperature_mismatches)
from rollouttap.trainer_hooks.tiny_model import build_tiny_model, build_tokenizer  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]

# Two chat calls, the second after a user turn: a completion with an <|im_end|> inside. A task holding "t=X"
# sends temperature X; any other sends none (the server's default).
AGENT = """
import json, os, sys, urllib.request
task = sys.argv[1]
extra = {"temperature": float(task.split("t=")[1].split()[0])} if "t=" in task else {}
messages = [{"role": "user", "content": task}]
for _ in range(2):
    body = json.dumps({"model": "policy", "messages": messages, "max_tokens": 16, **extra}).encode()
    request = urllib.request.Request(os.environ["OPENAI_BASE_URL"] + "/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        text = json.loads(response.read())["choices"][0]["message"]["content"]
    messages += [{"role": "assistant", "content": text}, {"role": "user", "content": "Go on."}]
print(text)
"""


@pytest.fixture(scope="module")
def tiny_path():
    return build_tiny_model()


@pytest.fixture(scope="module")
def manager(tmp_path_factory, confdir):
    tokenizer = build_tokenizer("prefix")
    work = tmp_path_factory.mktemp("limits")
    (work / "agent.py").write_text(AGENT)
    with ScriptedUpstream(lambda request: Reply(content="Hi there."), tokenizer=tokenizer,
                          deterministic=True) as upstream, \
            AgentManager(CommandAgent([sys.executable, str(work / "agent.py"), "{prompt}"]), store=work / "runs.db",
                         parallel=2, timeout=60, confdir=confdir, model_url=upstream.base_url,
                         eos_token_id=tokenizer.eos_token_id) as manager:
        yield manager


def _trainer(path, tmp_path, rollout_func=None, **settings) -> GRPOTrainer:
    args = GRPOConfig(**{**dict(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2,
                                num_generations=2, learning_rate=1e-2, use_cpu=True, bf16=False,
                                gradient_checkpointing=False, report_to="none", save_strategy="no",
                                logging_steps=1, disable_tqdm=True, seed=0, shuffle_dataset=False), **settings})
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": "say hi"}]}])
    return GRPOTrainer(model=AutoModelForCausalLM.from_pretrained(path), reward_funcs=[_by_position], args=args,
                       train_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(path),
                       rollout_func=rollout_func)


def _by_position(completions, **kwargs):
    return [float(i) for i in range(len(completions))]


def _trl_sees_truncated(trainer: GRPOTrainer, ids: list[int]) -> bool:
    # TRL 1.16's own rule (grpo_trainer.py, mask_truncated_completions and completions/clipped_ratio).
    return ids[-1] not in [*trainer.eos_token_ids, trainer.processing_class.pad_token_id]


# -- a completion cut to max_completion_length ------------------------------------------------------------
def test_a_cut_right_after_a_turns_end_looks_cut_to_trl(manager, tiny_path, tmp_path):
    row = manager.deploy(["say hi"])[0].row
    eos = manager.eos_token_id
    limit = row.completion_ids.index(eos) + 1  # the cut lands right after the first turn's <|im_end|>
    assert limit < len(row.completion_ids)
    outputs = []

    def rollout(prompts, trainer):
        outputs.append(inner(prompts, trainer))
        return outputs[-1]

    inner = agent_rollout(manager, prompt_to_agent=lambda p: p[-1]["content"])
    trainer = _trainer(tiny_path, tmp_path, max_completion_length=limit, mask_truncated_completions=True,
                       rollout_func=rollout)
    trainer.train()
    clipped = [log["completions/clipped_ratio"] for log in trainer.state.log_history
               if "completions/clipped_ratio" in log]
    assert clipped == [1.0]  # TRL counted both completions as cut (and masked them)
    for ids, mask in zip(outputs[0]["completion_ids"], outputs[0]["env_mask"]):
        assert ids == row.completion_ids[:limit - 1] and sum(mask) == limit - 1  # the turn less its <|im_end|>
        assert _trl_sees_truncated(trainer, ids)


def test_every_end_id_trl_knows_is_dropped_from_a_cut(tiny_path, tmp_path):
    trainer = _trainer(tiny_path, tmp_path)
    tokenizer = trainer.processing_class
    ends = _end_ids(trainer, tokenizer.eos_token_id)
    assert ends == {tokenizer.eos_token_id, tokenizer.pad_token_id, *trainer.eos_token_ids}
    text = tokenizer.apply_chat_template([{"role": "user", "content": "say hi"}, {"role": "assistant",
                                          "content": "Hi there."}], tokenize=False)
    # The template ends a turn with "<|im_end|>\n": the pad goes right after the <|im_end|>.
    ids = tokenizer.encode(text.rstrip("\n") + tokenizer.pad_token + "more", add_special_tokens=False)
    pad_at = ids.index(tokenizer.pad_token_id)
    assert ids[pad_at - 1] == tokenizer.eos_token_id  # ... <|im_end|> <|endoftext|> more
    row = TrainingRow([1], ids, [1] * len(ids), [-0.5] * len(ids), truncated=False)
    cut = cut_row(row, pad_at + 1, ends)
    assert cut.completion_ids == ids[:pad_at - 1] and cut.truncated
    assert len(cut.env_mask) == len(cut.logprobs) == pad_at - 1
    assert _trl_sees_truncated(trainer, cut.completion_ids)


@pytest.mark.parametrize("ids, limit, kept, mask", [
    ([5, 6, 2, 7], 3, [5, 6], [1, 1]),  # cut right after an eos: it goes
    ([5, 2, 0, 7], 3, [5], [1]),  # eos then pad: both go
    ([5, 6, 7, 2], 3, [5, 6, 7], [1, 1, 1]),  # the cut ends on another token: kept as is
    ([5, 6, 2], 3, [5, 6, 2], [1, 1, 1]),  # fits: not cut, its eos stays
    ([2, 2, 7], 2, [2], [0]),  # only end tokens: TRL needs one token, and this one must train nothing
])
def test_cut_rows_never_end_on_an_end_token_nor_come_out_empty(ids, limit, kept, mask):
    row = TrainingRow([1], ids, [1] * len(ids), [-1.0] * len(ids), truncated=False)
    cut = cut_row(row, limit, frozenset({2, 0}))
    assert (cut.completion_ids, cut.env_mask, cut.logprobs) == (kept, mask, [-1.0] * len(kept))


# -- sampling temperature ---------------------------------------------------------------------------------
@pytest.mark.parametrize("counts, trained, default, warned", [
    ({0.7: 3}, 1.0, 1.0, [0.7]),
    ({1.0: 2, None: 1}, 1.0, 1.0, []),
    ({None: 4}, 0.7, 1.0, [None]),  # no temperature sent: the server's default is what it sampled at
    ({None: 4}, 0.7, 0.7, []),  # ... which may be the model's generation config's (vLLM)
    ({0.7: 1, 0.0: 1, None: 2}, 0.7, 1.0, [0.0, None]),
])
def test_temperatures_other_than_the_trainers_are_named(counts, trained, default, warned):
    assert sorted(temperature_mismatches(counts, trained, default, "its default"), key=str) == sorted(warned, key=str)


@pytest.mark.parametrize("use_vllm, generation_config, default", [
    (False, GenerationConfig(temperature=0.6, do_sample=True), 1.0),  # PolicyServer: 1.0 whatever the model says
    (True, GenerationConfig(temperature=0.6, do_sample=True), 0.6),  # vLLM: the model's generation config ...
    (True, GenerationConfig(), 1.0),  # ... else 1.0
])
def test_the_servers_default_temperature(use_vllm, generation_config, default):
    # trl vllm-serve serves the model TRL trains, and vLLM takes its sampling defaults from its generation config.
    trainer = SimpleNamespace(args=SimpleNamespace(use_vllm=use_vllm),
                              model=SimpleNamespace(generation_config=generation_config))
    assert default_temperature(trainer)[0] == default


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "rollouttap.trainer_hooks.rollout" and r.levelno == logging.WARNING]


def test_agents_sampling_at_another_temperature_are_warned_about_once(manager, tiny_path, tmp_path, caplog):
    trainer = _trainer(tiny_path, tmp_path, temperature=1.0)
    rollout = agent_rollout(manager)
    caplog.set_level(logging.WARNING, logger="rollouttap.trainer_hooks.rollout")
    rollout(["say hi t=1.0", "say hi"], trainer)  # 1.0 sent, and none sent (the server's default, 1.0)
    assert _warnings(caplog) == []
    rollout(["say hi t=0.7", "say hi"], trainer)
    rollout(["say hi t=0.7", "say hi t=0.7"], trainer)  # the same mismatch again: not repeated
    [warning] = _warnings(caplog)
    assert "2 of 4 model calls of this batch asked for temperature 0.7" in warning
    assert "GRPOConfig(temperature=1)" in warning


def test_agents_sending_no_temperature_sample_at_the_servers_default(manager, tiny_path, tmp_path, caplog):
    trainer = _trainer(tiny_path, tmp_path, temperature=0.7)
    caplog.set_level(logging.WARNING, logger="rollouttap.trainer_hooks.rollout")
    agent_rollout(manager)(["say hi t=0.7"], trainer)
    assert _warnings(caplog) == []
    agent_rollout(manager)(["say hi"], trainer)
    [warning] = _warnings(caplog)
    assert "sent no temperature, so sampled at the server's default (PolicyServer's: 1)," in warning
    assert "GRPOConfig(temperature=0.7)" in warning
    with pytest.raises(ConfigError, match="asked for temperature 0.3"):
        agent_rollout(manager, temperature_check="error")(["say hi t=0.3"], trainer)


def test_an_unknown_temperature_check_is_refused():
    with pytest.raises(ValueError, match="temperature_check"):
        agent_rollout(None, temperature_check="loud")  # type: ignore[arg-type]
