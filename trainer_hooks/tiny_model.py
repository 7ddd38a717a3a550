"""Build a tiny Qwen2 model and BPE tokenizer, deterministically and offline.

The "prefix" and "reasoning_dropping" variants have random weights; "calculator" is warm-started
to call the calculator tool (see warm_start.py)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rollouttap.paths import cache_root

from .chat_template import chat_template, reasoning_dropping_template
from .tiny_corpus import corpus_documents
from .warm_start import RECIPE_VERSION, greedy_exact_rates, train_calculator

logger = logging.getLogger(__name__)

# Bump when anything below changes what gets built, so stale caches are not reused.
BUILD_VERSION = "tiny-qwen2-v1"
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Added but not special (as in Qwen): they survive skip_special_tokens, so they reach the text.
MARKUP_TOKENS = ("<tool_call>", "</tool_call>", "<think>", "</think>")
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
BPE_VOCAB_SIZE = 1024
SEED = 1234
# Qwen2's pre-tokenizer split: digits one by one, letters with one leading non-letter.
_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_MARKER = "rollouttap-tiny.json"
_REQUIRED = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json")
Variant = Literal["prefix", "reasoning_dropping", "calculator"]
_DIR_SUFFIX = {
    "prefix": "", "reasoning_dropping": "-reasoning-dropping", "calculator": "-calculator",
}
# Written beside the weights of the warm-started variant: what it scored when it was built.
WARM_START_REPORT = "rollouttap-warm-start.json"


@dataclass(frozen=True)
class ModelShape:
    """The Qwen2 sizes that differ between variants."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    # Wider than the usual 0.02 so greedy output varies (multi-byte text, <think>, eos).
    initializer_range: float = 0.3


RANDOM_SHAPE = ModelShape()
# Two layers learn to copy the expression sooner than four; eight heads sooner than four.
CALCULATOR_SHAPE = ModelShape(128, 256, 2, 8, 4, initializer_range=0.02)


def default_cache_dir(variant: Variant = "prefix") -> Path:
    """Where build_tiny_model caches by default: $ROLLOUTTAP_CACHE or ~/.cache/rollouttap."""
    return cache_root() / f"{BUILD_VERSION}{_DIR_SUFFIX[variant]}"


def build_tiny_model(out_dir: str | Path | None = None, *, variant: Variant = "prefix") -> Path:
    """Build (or reuse) the tiny model and tokenizer in out_dir and return its path.

    variant="calculator" also supervised-trains the model to use CALCULATOR_TOOL (about a minute
    on two cores, once: the result is cached like the others)."""
    if variant not in _DIR_SUFFIX:
        raise ValueError(f"unknown template variant {variant!r}")
    target = Path(out_dir) if out_dir is not None else default_cache_dir(variant)
    if is_complete(target, variant):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename, so a crash never leaves a half-written cache behind.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _write_all(tmp, variant)
        _install(tmp, target, variant)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("built tiny model in %s", target)
    return target


def is_complete(path: Path, variant: Variant = "prefix") -> bool:
    """Whether path holds a finished build of this version and template variant."""
    try:
        marker = json.loads((path / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker == _marker(variant) and all((path / name).is_file() for name in _REQUIRED)


def _marker(variant: Variant) -> dict[str, str]:
    marker = {"version": BUILD_VERSION, "variant": variant}
    if variant == "calculator":
        marker["recipe"] = RECIPE_VERSION  # a new recipe must not reuse an old training run
    return marker


def _install(tmp: Path, target: Path, variant: Variant) -> None:
    if target.exists() and not is_complete(target, variant):
        shutil.rmtree(target)
    try:
        os.rename(tmp, target)
    except OSError:
        # Another process finished the same build first; its result is as good as ours.
        if not is_complete(target, variant):
            raise


def _write_all(path: Path, variant: Variant) -> None:
    tokenizer = build_tokenizer(variant)
    tokenizer.save_pretrained(path)
    if variant == "calculator":
        model = _warm_started(tokenizer, path)
    else:
        model = build_model(tokenizer)
    model.save_pretrained(path, safe_serialization=True)
    (path / _MARKER).write_text(json.dumps(_marker(variant)))


def _warm_started(tokenizer: Any, path: Path) -> Any:
    """The calculator model, trained; its held-out greedy scores go to the log and a report file."""
    started = time.monotonic()
    model = train_calculator(build_model(tokenizer, CALCULATOR_SHAPE), tokenizer)
    seconds = time.monotonic() - started
    call, answer = greedy_exact_rates(model, tokenizer)
    logger.info("warm start took %.0f s; held-out greedy: tool call %.0f%%, final answer %.0f%%",
                seconds, 100 * call, 100 * answer)
    report = {"recipe": RECIPE_VERSION, "train_seconds": round(seconds, 1),
              "held_out_greedy_tool_call": call, "held_out_greedy_answer": answer}
    (path / WARM_START_REPORT).write_text(json.dumps(report, indent=1))
    return model


def build_tokenizer(variant: Variant = "prefix"):  # -> PreTrainedTokenizerFast
    """Train the byte-level BPE tokenizer on the embedded corpus and wrap it for transformers."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    # The same pipeline Qwen2Tokenizer rebuilds on load, so AutoTokenizer gives identical ids.
    raw.normalizer = normalizers.NFC()
    raw.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    raw.decoder = decoders.ByteLevel()
    raw.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    raw.train_from_iterator(corpus_documents(), trainer=trainer)
    raw.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    raw.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKUP_TOKENS])
    template = reasoning_dropping_template() if variant == "reasoning_dropping" else chat_template()
    return PreTrainedTokenizerFast(
        tokenizer_object=raw,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
        chat_template=template,
    )


def build_model(tokenizer, shape: ModelShape = RANDOM_SHAPE):  # -> Qwen2ForCausalLM
    """A seeded random-weight Qwen2ForCausalLM sized for the tokenizer."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        initializer_range=shape.initializer_range,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
    )
    # fork_rng: seeding must not disturb the caller's global random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=None
    )
    return model.eval()
