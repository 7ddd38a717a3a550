"""TRL's ``rollout_func`` from an AgentManager: one agent per prompt, one token-exact row per agent.

TRL 1.16 calls ``rollout_func(prompts, trainer)`` on every rank with that rank's prompts (each already
repeated ``num_generations`` times by its sampler) and needs one row per prompt: ``prompt_ids``,
``completion_ids``, ``logprobs`` and optionally ``env_mask``; every other key reaches the reward functions
as a keyword argument, one value per prompt.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, replace
from typing import Any, Literal, TypedDict

from rollouttap.errors import ConfigError
from rollouttap.manager.fidelity import Fidelity, batch_fidelity
from rollouttap.manager.rows import TrainingRow, empty_row
from rollouttap.trainer_hooks.policy_check import check_generation
from rollouttap.trainer_hooks.policy_server import wait_for_generation

log = logging.getLogger(__name__)

RolloutFunc = Callable[[list[Any], Any], dict[str, list[Any]]]
TemperatureCheck = Literal["warn", "error", "off"]  # what agent_rollout does when agents sample at another one


class RolloutOutput(TypedDict, total=False):
    """The dict TRL's GRPOTrainer takes from ``rollout_func`` (extra keys go to reward functions)."""
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    logprobs: list[list[float | None]]
    env_mask: list[list[int]]
    agent_id: list[str]
    agent_status: list[str]
    agent_exit_code: list[int | None]
    agent_return_value: list[Any]
    agent_calls: list[int]
    agent_check: list[Any]
    agent_answer: list[str]
    agent_coverage: list[float]
    agent_trainable_tokens: list[int]


def safe_row(row: TrainingRow | None, ok: bool, eos_token_id: int,
             prompt_ids: Sequence[int] | None = None) -> TrainingRow:
    """The row TRL gets: the agent's own when it succeeded, else one that teaches nothing (all mask 0)."""
    if row is None:
        return empty_row(eos_token_id, prompt_ids)
    if ok:
        return row
    return replace(row, env_mask=[0] * len(row.completion_ids),
                   logprobs=None if row.logprobs is None else [0.0] * len(row.completion_ids))


def cut_row(row: TrainingRow, limit: int | None, end_ids: Collection[int] = ()) -> TrainingRow:
    """``row`` with its completion cut to ``limit`` tokens (marked truncated); unchanged when it fits.

    TRL 1.16 ignores ``truncated``: a completion is cut, for ``mask_truncated_completions`` and
    ``completions/clipped_ratio``, only when its last token is not one of ``end_ids`` (its eos ids and pad id).
    A multi-turn completion has an eos (ChatML's ``<|im_end|>``) after every turn, so a cut right after one
    would pass for a finished answer: those trailing tokens go too."""
    if limit is None or len(row.completion_ids) <= limit:
        return row
    keep = limit
    while keep and row.completion_ids[keep - 1] in end_ids:
        keep -= 1
    # Nothing but end tokens: TRL needs one token (it reads ids[-1]), which can only pass for a finished
    # answer, so it is kept untrained.
    mask = row.env_mask[:keep] if keep else [0]
    keep = max(keep, 1)
    return replace(row, completion_ids=row.completion_ids[:keep], env_mask=mask,
                   logprobs=None if row.logprobs is None else row.logprobs[:keep], truncated=True)


def to_rollout_output(results: Sequence[Any], *, eos_token_id: int,
                      prompt_ids: Sequence[Sequence[int]] | None = None,
                      train_on_failed: bool = False, max_completion_length: int | None = None,
                      end_ids: Collection[int] | None = None) -> RolloutOutput:
    """One TRL row per agent result, in order, plus the per-agent fields reward functions get.

    A completion longer than ``max_completion_length`` (a multi-turn agent's easily is) is cut to it: TRL
    trains on whatever it is given, and counts a completion as truncated when it does not end with one of
    ``end_ids`` (the trainer's eos ids and pad id; ``eos_token_id`` alone when not given)."""
    ends = frozenset(end_ids) if end_ids is not None else frozenset({eos_token_id})
    rows: list[TrainingRow] = []
    for i, result in enumerate(results):
        ok = result.status == "ok" or train_on_failed
        fallback = prompt_ids[i] if prompt_ids is not None else None
        rows.append(cut_row(safe_row(getattr(result, "row", None), ok, eos_token_id, fallback),
                            max_completion_length, ends))
    # A row without sampling logprobs (token ids only) gets None per token: TRL (>= 1.16) leaves those tokens
    # out of the importance-sampling correction. None for the whole batch would break TRL's vLLM path.
    logprobs = [list(r.logprobs) if r.logprobs is not None else [None] * len(r.completion_ids) for r in rows]
    fidelities = trained_reports(results, [r.env_mask for r in rows])
    return RolloutOutput(
        prompt_ids=[list(r.prompt_ids) for r in rows],
        completion_ids=[list(r.completion_ids) for r in rows],
        logprobs=logprobs,
        env_mask=[list(r.env_mask) for r in rows],
        agent_id=[r.agent_id for r in results],
        agent_status=[r.status for r in results],
        agent_exit_code=[r.exit_code for r in results],
        agent_return_value=[r.return_value for r in results],
        agent_calls=[r.calls for r in results],
        agent_check=[r.check_result for r in results],
        agent_answer=[_last_line(r.stdout_tail) for r in results],
        agent_coverage=[f.coverage if f is not None else 0.0 for f in fidelities],
        agent_trainable_tokens=[sum(row.env_mask) for row in rows],
    )


def trained_reports(results: Sequence[Any], env_masks: Sequence[Sequence[int]]) -> list[Fidelity | None]:
    """Each agent's fidelity report counting what TRL trains: its row as given to TRL (a failed agent's fully
    masked, a long one cut to max_completion_length), not as built; None for an agent without a report."""
    reports: list[Fidelity | None] = []
    for result, mask in zip(results, env_masks):
        report = getattr(result, "fidelity", None)
        trained = sum(mask)
        reports.append(None if report is None else replace(
            report, trainable_tokens=trained, dropped_tokens=max(report.sampled_tokens - trained, 0)))
    return reports


def _last_line(text: str | None) -> str:
    """An agent's answer is, by convention, the last line it printed."""
    lines = (text or "").strip().splitlines()
    return lines[-1].strip() if lines else ""


_FIDELITY = "fidelity."  # prefix of the Fidelity counts among rollout_counts' keys


def rollout_counts(results: Sequence[Any], env_masks: Sequence[Sequence[int]] | None = None) -> dict[str, float]:
    """The sums a batch's figures are made of (agents, successes, calls, fidelity counts, ...). Sums add up
    over the ranks of a multi-process run; the rates and shares made of them do not."""
    reports = trained_reports(results, env_masks) if env_masks is not None else \
        [getattr(r, "fidelity", None) for r in results]
    fid = batch_fidelity([f for f in reports if f is not None])
    return {
        "agents": float(len(results)),
        "ok": float(sum(r.status == "ok" for r in results)),
        "timeout": float(sum(r.status == "timeout" for r in results)),
        "calls": float(sum(r.calls for r in results)),
        "agents_calling": float(sum(bool(r.calls) for r in results)),
        "incomplete_flows": float(sum(len(r.incomplete_flows) for r in results)),
        "bypass_connections": float(sum(len(r.bypass_connections or ()) for r in results)),
        # No report although the agent called the model: no rows were built, so nothing of it trains.
        "agents_without_rows": float(sum(bool(r.calls) and getattr(r, "fidelity", None) is None for r in results)),
        # Flows through the manager's proxies that no agent claims: filled in by agent_rollout from the
        # manager's summary (summaries: how many ranks had one), so every rank sends the same keys to the sum.
        "unattributed_flows": 0.0,
        "summaries": 0.0,
        **{_FIDELITY + name: float(value) for name, value in asdict(fid).items()},
    }


def metrics_from_counts(counts: Mapping[str, float]) -> dict[str, float]:
    """The trainer's log figures from ``rollout_counts`` (one rank's, or summed over all ranks)."""
    n = max(counts["agents"], 1.0)
    fid = Fidelity(**{key[len(_FIDELITY):]: int(value) for key, value in counts.items() if key.startswith(_FIDELITY)})
    metrics = {
        "agents/success_rate": counts["ok"] / n,
        "agents/timeout_rate": counts["timeout"] / n,
        "agents/calls_mean": counts["calls"] / n,
        "agents/incomplete_flows": counts["incomplete_flows"],
        "agents/bypass_connections": counts["bypass_connections"],
        "fidelity/coverage": fid.coverage if fid.agents or not counts["agents_calling"] else 0.0,
        "fidelity/agents_without_rows": counts["agents_without_rows"],
        "fidelity/dropped_tokens": float(fid.dropped_tokens),
        "fidelity/realigned_joins": float(fid.realigned_joins),
        "fidelity/calls_without_ids": float(fid.calls_without_ids),
        "fidelity/ids_set_aside": float(fid.ids_set_aside),  # ids that disagreed with the server's usage
        "fidelity/logprobs_set_aside": float(fid.logprobs_set_aside),  # not one logprob per completion id
    }
    if counts.get("summaries"):
        metrics["flows/unattributed"] = counts["unattributed_flows"]
    return metrics


def rollout_metrics(results: Sequence[Any], env_masks: Sequence[Sequence[int]] | None = None) -> dict[str, float]:
    """Batch figures for the trainer's log: success, calls, fidelity, lost or unattributed flows. With the
    rows' ``env_masks`` (what TRL trains), fidelity counts those, as ``agent_coverage`` does."""
    return metrics_from_counts(rollout_counts(results, env_masks))


def summed_over_ranks(trainer: Any, counts: dict[str, float]) -> dict[str, float]:
    """``counts`` summed over every process of a multi-process (multi-GPU, multi-node) run, so the log, which
    only the main process writes, describes the whole batch and not its own share of the agents. Every
    rank calls ``rollout_func`` at the same point of each step, so the collective cannot wait on one that
    does not; a single process gets its own counts back."""
    accelerator = _ranks(trainer)
    if accelerator is None:
        return counts
    import torch  # trainer_hooks' own dependency, not the manager's

    keys = sorted(counts)  # the same order on every rank
    local = torch.tensor([counts[k] for k in keys], dtype=torch.float64, device=accelerator.device)
    total = accelerator.reduce(local, reduction="sum")
    return dict(zip(keys, total.tolist()))


def await_weight_push(trainer: Any) -> bool:
    """Whether this rank waited for the others before its agents start. With a vLLM server and several
    processes, only the main one pushes the new weights and resets the server's prefix cache before TRL calls
    ``rollout_func``; the other ranks come back from that sync at once, and their agents would sample from the
    old weights, or a mix, with the previous step's cache. TRL's own generation waits in its gather; this is
    that wait. A colocated vLLM loads each rank's own weights before it returns: nothing to wait for."""
    args, accelerator = getattr(trainer, "args", None), _ranks(trainer)
    if accelerator is None or not getattr(args, "use_vllm", False) or getattr(args, "vllm_mode", "server") != "server":
        return False
    accelerator.wait_for_everyone()
    return True


def _ranks(trainer: Any) -> Any | None:
    """The trainer's accelerator where it runs several processes (the collectives above take part in); else None."""
    accelerator = getattr(trainer, "accelerator", None)
    return accelerator if accelerator is not None and getattr(accelerator, "num_processes", 1) > 1 else None


def agent_rollout(manager: Any, *, eos_token_id: int | None = None, train_on_failed: bool = False,
                  prompt_to_agent: Callable[[Any], Any] | None = None,
                  on_results: Callable[[list[Any]], None] | None = None,
                  check_policy: bool = True, temperature_check: TemperatureCheck = "warn") -> RolloutFunc:
    """Turn an AgentManager into TRL's ``rollout_func``: ``GRPOTrainer(..., rollout_func=agent_rollout(m))``.

    ``prompt_to_agent`` maps a dataset prompt (a string or chat messages) to what the agent spec takes;
    failed agents get all-mask-0 rows unless ``train_on_failed``. In a multi-process run every rank gives the
    trainer its own (TRL calls ``rollout_func`` on every rank): the batch figures it logs are summed over the
    ranks, a collective operation each rank's call takes part in (a rank that fails before it leaves the others
    waiting, as TRL's own gathers do); with a vLLM server, every rank's agents also wait until the main process
    has pushed the new weights (``await_weight_push``, another collective). At its first batch it checks that
    the agents sample from the weights TRL trains (trainer_hooks/policy_check.py); ``check_policy=False`` skips
    that. At every batch it compares the temperature the agents' model calls sampled at with
    ``GRPOConfig.temperature`` and logs each distinct mismatch once (``temperature_check="error"`` raises
    ConfigError instead, ``"off"`` skips it).
    """
    if temperature_check not in ("warn", "error", "off"):
        raise ValueError(f"temperature_check must be 'warn', 'error' or 'off', not {temperature_check!r}")
    checked = not check_policy
    reported: set[float | None] = set()  # temperatures already warned about: once each, not every batch

    def rollout(prompts: list[Any], trainer: Any) -> dict[str, list[Any]]:
        nonlocal checked
        if not checked:  # the trainer's settings are first seen here; the same on every rank
            warning = check_generation(getattr(trainer, "args", None), getattr(manager, "model_url", None))
            if warning and _is_main_process(trainer):  # TRL syncs weights from the main process only
                log.warning("%s", warning)
            checked = True
        # Train or eval, read now: a generation still running when the agents are done flips the model to eval.
        mode = _mode_of(trainer)
        eos = eos_token_id if eos_token_id is not None else _eos_of(trainer)
        _share_eos(manager, eos)
        agent_prompts = [prompt_to_agent(p) for p in prompts] if prompt_to_agent else list(prompts)
        await_weight_push(trainer)  # a collective, as summed_over_ranks below
        started = time.time()
        results = manager.deploy(agent_prompts)
        # An agent killed mid-call leaves its generation running a few tokens more, the model in eval mode: TRL
        # must not train on it meanwhile.
        wait_for_generation(getattr(manager, "model_url", None))
        if temperature_check != "off":
            _check_temperatures(results, trainer, reported, raise_error=temperature_check == "error")
        # Only an agent without a row needs its prompt rendered (the prompt of its all-mask-0 row).
        fallback = [_prompt_ids(trainer, p) if getattr(r, "row", None) is None else None
                    for r, p in zip(results, prompts)]
        output = to_rollout_output(results, eos_token_id=eos, prompt_ids=fallback,
                                   train_on_failed=train_on_failed,
                                   max_completion_length=getattr(getattr(trainer, "args", None),
                                                                 "max_completion_length", None),
                                   end_ids=_end_ids(trainer, eos))
        counts = rollout_counts(results, output["env_mask"])
        if hasattr(manager, "summary"):
            summary = manager.summary(results, since=started)
            counts["unattributed_flows"] = float(summary.get("unattributed_flows", 0))
            counts["summaries"] = 1.0
        _log_metrics(trainer, metrics_from_counts(summed_over_ranks(trainer, counts)), mode)
        if on_results is not None:
            on_results(results)
        return dict(output)

    return rollout


def _share_eos(manager: Any, eos: int) -> None:
    """The manager builds rows with the trainer's eos: set it when the manager has none, refuse a mismatch."""
    if not hasattr(manager, "eos_token_id"):
        return
    if manager.eos_token_id is None:
        manager.eos_token_id = eos  # without one the manager builds no rows, and nothing would train
    elif manager.eos_token_id != eos:
        raise ValueError(f"AgentManager(eos_token_id={manager.eos_token_id}) differs from the trainer's "
                         f"eos token id {eos}: rows would end with the wrong token")


def _eos_of(trainer: Any) -> int:
    tokenizer = getattr(trainer, "processing_class", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("pass eos_token_id= to agent_rollout: the trainer's tokenizer has none")
    return int(eos)


def _end_ids(trainer: Any, eos: int) -> frozenset[int]:
    """The ids TRL 1.16 takes for the end of a completion: its ``eos_token_ids`` (the tokenizer's and the
    model's generation config's) and its tokenizer's pad id."""
    ids = {eos, *(getattr(trainer, "eos_token_ids", None) or ())}
    processing = getattr(trainer, "processing_class", None)
    tokenizer = getattr(processing, "tokenizer", processing)  # a multimodal processor holds the tokenizer
    pad = getattr(tokenizer, "pad_token_id", None)
    return frozenset(ids if pad is None else ids | {pad})


# -- sampling temperature: the agents' requests decide it, TRL computes its logprobs at GRPOConfig's ----------
def call_temperatures(results: Iterable[Any]) -> Counter[float | None]:
    """How many of the agents' answered model calls asked for each temperature (None: the request named none)."""
    counts: Counter[float | None] = Counter()
    for result in results:
        for call in getattr(getattr(result, "conversation", None), "model_calls", None) or ():
            if getattr(call, "failed", False):
                continue  # sampled nothing that trains
            value = (getattr(call, "params", None) or {}).get("temperature")
            numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
            counts[float(value) if numeric else None] += 1
    return counts


def temperature_mismatches(counts: Mapping[float | None, int], trained: float, default: float,
                           default_name: str) -> dict[float | None, str]:
    """A message for each temperature in ``counts`` (None: the server's ``default``, described by
    ``default_name``) that is not ``trained``."""
    total = sum(counts.values())
    messages: dict[float | None, str] = {}
    for asked, n in counts.items():
        sampled = default if asked is None else asked
        if math.isclose(sampled, trained, abs_tol=1e-6):
            continue
        how = f"sent no temperature, so sampled at {default_name}," if asked is None else \
            f"asked for temperature {sampled:g}"
        messages[asked] = (
            f"{n} of {total} model calls of this batch {how} but TRL computes its logprobs at "
            f"GRPOConfig(temperature={trained:g}): the agents sample from another policy than the one trained, "
            f"and with vLLM the importance-sampling ratios against the server's logprobs are wrong. Have the "
            f"agents send temperature={trained:g} or set GRPOConfig(temperature={sampled:g})")
    return messages


def default_temperature(trainer: Any) -> tuple[float, str]:
    """The temperature a request without one samples at, and its name in a warning. vLLM's default comes from
    the model's generation config (``trl vllm-serve`` serves the model TRL trains), else 1.0. Without vLLM the
    server is PolicyServer (1.0) or one not known here: the warning names it the server's default."""
    if getattr(getattr(trainer, "args", None), "use_vllm", False):
        config = getattr(getattr(trainer, "model", None), "generation_config", None)
        configured = getattr(config, "temperature", None)
        if isinstance(configured, (int, float)):
            return float(configured), f"vLLM's default, {configured:g} from the model's generation config"
        return 1.0, "vLLM's default, 1"
    return 1.0, "the server's default (PolicyServer's: 1)"


def _check_temperatures(results: Sequence[Any], trainer: Any, reported: set[float | None], *,
                        raise_error: bool) -> None:
    trained = getattr(getattr(trainer, "args", None), "temperature", None)
    if not isinstance(trained, (int, float)):
        return
    default, name = default_temperature(trainer)
    for asked, message in temperature_mismatches(call_temperatures(results), float(trained), default, name).items():
        if raise_error:
            raise ConfigError(message + " (agent_rollout(..., temperature_check='warn') only warns)")
        if asked not in reported:
            reported.add(asked)
            log.warning("%s", message)


def _prompt_ids(trainer: Any, prompt: Any) -> list[int] | None:
    """The prompt rendered by the policy's tokenizer: the prompt of a row for an agent that made no call."""
    tokenizer = getattr(trainer, "processing_class", None)
    if tokenizer is None:
        return None
    try:
        if isinstance(prompt, list):
            return list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                      return_dict=False))
        return list(tokenizer.encode(str(prompt), add_special_tokens=False)) or None
    except Exception as exc:  # a template problem must not stop training; the row stays all mask 0
        log.warning("cannot render prompt for an empty row: %s", exc)
        return None


def _is_main_process(trainer: Any) -> bool:
    return bool(getattr(getattr(trainer, "accelerator", None), "is_main_process", True))


def _mode_of(trainer: Any) -> str:
    return "train" if getattr(getattr(trainer, "model", None), "training", True) else "eval"


def _log_metrics(trainer: Any, metrics: dict[str, float], mode: str) -> None:
    # GRPOTrainer averages whatever lands in its per-mode metrics dict and logs it with its own metrics.
    store = getattr(trainer, "_metrics", None)
    if store is None:
        return
    for key, value in metrics.items():
        store[mode][key].append(value)
