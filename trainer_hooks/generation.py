"""Token-by-token sampling from a live causal LM, with vLLM's stop and logprob semantics."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch

logger = logging.getLogger(__name__)

LogprobsMode = Literal["raw_logprobs", "processed_logprobs"]
# vLLM clamps -inf so that JSON can carry it.
MIN_LOGPROB = -9999.0


@dataclass(frozen=True)
class SamplingParams:
    """One request's sampling settings (temperature 0 means greedy)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logit_bias: tuple[tuple[int, float], ...] = ()
    num_logprobs: int | None = None  # None: no logprobs; k: the sampled token's and the top k
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False  # vLLM's: a stop string hit stays in the text


@dataclass(frozen=True)
class TokenChoice:
    """A sampled token, its logprob and the top alternatives (token id, logprob), best first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]


@dataclass(frozen=True)
class Delta:
    """What one generated token adds: its choice, the text it releases, and the finish if last."""

    choice: TokenChoice
    text: str
    finish_reason: str | None = None
    stop_reason: int | str | None = None


def sample_token(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None,
    mode: LogprobsMode = "raw_logprobs",
) -> TokenChoice:
    """Pick the next token from one position's logits; logprobs follow vLLM's logprobs mode."""
    logits = logits.float()
    processed = logits.clone()
    for token_id, bias in params.logit_bias:
        processed[token_id] += bias
    if params.temperature <= 1e-5:
        token_id = int(torch.argmax(processed))
    else:
        processed = _truncate(processed / params.temperature, params.top_k, params.top_p)
        probs = torch.softmax(processed, dim=-1)
        token_id = int(torch.multinomial(probs, 1, generator=generator))
    logprobs = torch.log_softmax(logits if mode == "raw_logprobs" else processed, dim=-1)
    return TokenChoice(token_id, _clamp(logprobs[token_id]), _top(logprobs, params.num_logprobs))


def _truncate(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask everything outside the top-k and the top-p nucleus with -inf."""
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Keep a token when the mass before it is still under top_p (the first always stays).
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        logits = logits.clone()
        logits[order[drop]] = float("-inf")
    return logits


def _top(logprobs: torch.Tensor, k: int | None) -> tuple[tuple[int, float], ...]:
    if not k:
        return ()
    values, ids = torch.topk(logprobs, min(k, logprobs.numel()))
    return tuple((int(i), _clamp(v)) for i, v in zip(ids, values, strict=True))


def _clamp(value: torch.Tensor) -> float:
    return max(float(value), MIN_LOGPROB)


class TextTracker:
    """Incremental detokenizer: releases text that later tokens cannot change, cut at stop strings."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...], *, keep_stop: bool = False) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._keep_stop = keep_stop
        # A stop string may be split over tokens: hold back what could be its beginning.
        self._holdback = max((len(s) for s in self._stop), default=1) - 1
        self.emitted = ""

    def update(self, token_ids: list[int], *, final: bool) -> tuple[str, str | None]:
        """(new text, the stop string hit or None) after token_ids (all text tokens so far)."""
        full = self._tokenizer.decode(
            token_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        hit = _first_stop(full, self._stop)
        if hit is not None:
            end = full.index(hit) + (len(hit) if self._keep_stop else 0)
            return self._release(full[:end]), hit
        if not final:
            # A trailing U+FFFD is an incomplete UTF-8 sequence that the next token completes.
            full = full.rstrip("\ufffd")
            full = full[: max(len(self.emitted), len(full) - self._holdback)]
        return self._release(full), None

    def _release(self, text: str) -> str:
        if not text.startswith(self.emitted):
            logger.warning("detokenized text changed behind the stream; not re-sent")
            return ""
        delta = text[len(self.emitted):]
        self.emitted = text
        return delta


def _first_stop(text: str, stops: tuple[str, ...]) -> str | None:
    found = [(text.find(s), s) for s in stops if s in text]
    return min(found)[1] if found else None


def generate(
    model: Any,
    tokenizer: Any,
    prompt_ids: list[int],
    params: SamplingParams,
    *,
    eos_ids: frozenset[int],
    mode: LogprobsMode = "raw_logprobs",
) -> Iterator[Delta]:
    """Yield one Delta per generated token; the last carries finish_reason. Caller holds the lock."""
    generator = _generator(params.seed)
    tracker = TextTracker(tokenizer, params.stop, keep_stop=params.include_stop_str_in_output)
    # closing: the eval-mode restore must not wait for garbage collection of the inner generator.
    choices = contextlib.closing(_token_choices(model, prompt_ids, params, generator, mode))
    with choices as stream:
        yield from _deltas(stream, tracker, params, eos_ids)


def _deltas(
    stream: Iterator[TokenChoice], tracker: TextTracker, params: SamplingParams,
    eos_ids: frozenset[int],
) -> Iterator[Delta]:
    ids: list[int] = []
    for choice in stream:
        ids.append(choice.token_id)
        finish, reason = _token_finish(choice.token_id, params, eos_ids)
        text_ids = ids[:-1] if finish else ids
        out_of_room = len(ids) >= params.max_tokens
        text, hit = tracker.update(text_ids, final=bool(finish) or out_of_room)
        if hit is not None:
            finish, reason = "stop", hit
        elif finish is None and out_of_room:
            finish = "length"
        yield Delta(choice, text, finish, reason)
        if finish:
            return


def _token_finish(
    token_id: int, params: SamplingParams, eos_ids: frozenset[int]
) -> tuple[str | None, int | None]:
    """vLLM's finish for a token: eos gives stop_reason None, a stop token id gives its id."""
    if token_id in eos_ids and not params.ignore_eos:
        return "stop", None
    if token_id in params.stop_token_ids:
        return "stop", token_id
    return None, None


def _generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def _token_choices(
    model: Any,
    prompt_ids: list[int],
    params: SamplingParams,
    generator: torch.Generator,
    mode: LogprobsMode,
) -> Iterator[TokenChoice]:
    """Endless sampling with a KV cache; the caller stops iterating."""
    device = _device(model)
    inputs = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    cache_key = _cache_kwarg()
    cache = None
    with eval_mode(model):
        while True:
            # no_grad around the call only: grad mode is thread state, and we yield to the caller.
            with torch.no_grad():
                out = model(input_ids=inputs, use_cache=True, **{cache_key: cache})
            cache = getattr(out, cache_key)
            choice = sample_token(out.logits[0, -1].cpu(), params, generator, mode)
            yield choice
            inputs = torch.tensor([[choice.token_id]], dtype=torch.long, device=device)


@functools.cache
def _cache_kwarg() -> str:
    """The KV-cache argument and output name: "cache" since transformers 5.2x, else the old one."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    names = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    return "cache" if "cache" in names else "past_key_values"


def _device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Eval mode for the duration, restoring every submodule's own train/eval flag after."""
    modules = list(model.modules()) if hasattr(model, "modules") else []
    modes = [(module, module.training) for module in modules]
    if hasattr(model, "eval"):
        model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
