"""Warm-start the tiny model as a calculator-tool user: synthetic chats, a short supervised run."""

from __future__ import annotations

import ast
import json
import logging
import math
import operator
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

# The tool as the demo agent offers it; the model was trained with this very schema in its prompt.
CALCULATOR_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "calculator",
        "description": "Evaluate an arithmetic expression and return the result.",
        "parameters": {
            "type": "object",
            # No digits in the schema: the model copies numbers out of its prompt, and digits here
            # would be candidates.
            "properties": {
                "expression": {"type": "string", "description": "The arithmetic expression."},
            },
            "required": ["expression"],
        },
    },
}
# The tool result is the bare integer (calculate's output); the final answer quotes it thus.
ANSWER_FORMAT = "The answer is {result}."
# Bump when the data or the recipe below changes what gets trained.
RECIPE_VERSION = "calculator-v1"
SEED = 4321
OPERATORS = ("+", "-", "*")
QUESTION_FORMATS = (
    "What is {e}?",
    "what is {e}",
    "Compute {e}.",
    "Calculate {e}.",
    "How much is {e}?",
    "What's {e}?",
    "Please work out {e}.",
    "Can you tell me what {e} is?",
    "{e} = ?",
    "Use the calculator: {e}",
    "I need the value of {e}.",
    "Solve {e}, please.",
)
# Other system prompts, so the model does not tie its behaviour to one exact prefix length.
SYSTEM_PROMPTS = (
    None,
    None,
    "You are a careful assistant. Use the calculator for arithmetic.",
    "Answer the user's math question.",
)


@dataclass(frozen=True)
class Problem:
    """One arithmetic question: a op b with small integers."""

    a: int
    op: str
    b: int

    @property
    def expression(self) -> str:
        return f"{self.a} {self.op} {self.b}"

    @property
    def result(self) -> int:
        if self.op == "+":
            return self.a + self.b
        if self.op == "-":
            return self.a - self.b
        return self.a * self.b


@dataclass(frozen=True)
class TrainConfig:
    """The supervised run's settings (tuned on two CPU cores: about a minute)."""

    # First chats without the tool list: in a short context the copying of the expression and
    # the result (an induction head) forms within a few hundred steps; under the long tool prompt
    # it takes far longer. Then chats as the agent sends them, while the rate decays.
    short_steps: int = 200
    steps: int = 120
    batch_size: int = 64
    lr: float = 3e-3
    warmup: int = 10
    weight_decay: float = 0.01
    seed: int = SEED


_BINARY: dict[type, Callable[[int, int], int]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
}


def calculate(expression: str) -> str:
    """The calculator tool: an expression of integers, + - * and parentheses, evaluated as text."""
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"not an arithmetic expression: {expression!r}") from exc
    return str(_evaluate(tree.body))


def _evaluate(node: ast.AST) -> int:
    # Only integer literals and the three operators: a tool must never eval arbitrary code.
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_evaluate(node.operand)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        return _BINARY[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    raise ValueError(f"unsupported in a calculator expression: {ast.dump(node)}")


def all_problems() -> list[Problem]:
    """Every problem the data draws from: sums and differences to 50, products to 12."""
    out = [Problem(a, op, b) for op in "+-" for a in range(51) for b in range(51)]
    out += [Problem(a, "*", b) for a in range(13) for b in range(13)]
    return out


def is_held_out(problem: Problem) -> bool:
    """Whether a problem is kept out of training (about one in eight), for evaluation."""
    return (problem.a * 7 + problem.b * 3 + OPERATORS.index(problem.op)) % 8 == 5


def held_out_questions(count: int, seed: int = 0) -> list[tuple[str, Problem]]:
    """count (question, problem) pairs never seen in training, phrased with the known formats."""
    rng = random.Random(seed)
    pool = [p for p in all_problems() if is_held_out(p)]
    picks = rng.sample(pool, count)
    return [(QUESTION_FORMATS[i % len(QUESTION_FORMATS)].format(e=p.expression), p)
            for i, p in enumerate(picks)]


def tool_call_text(expression: str) -> str:
    """The hermes tool-call completion the model should produce for an expression."""
    call = {"name": "calculator", "arguments": {"expression": expression}}
    return f"<tool_call>\n{json.dumps(call)}\n</tool_call>"


def conversation(problem: Problem, question: str, system: str | None) -> list[dict[str, Any]]:
    """The whole exchange: question, tool call, tool result, final answer."""
    messages: list[dict[str, Any]] = []
    if system is not None:
        messages.append({"role": "system", "content": system})
    call = {"id": "call_0", "type": "function",
            "function": {"name": "calculator", "arguments": {"expression": problem.expression}}}
    messages += [
        {"role": "user", "content": question},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_0", "content": str(problem.result)},
        {"role": "assistant", "content": ANSWER_FORMAT.format(result=problem.result)},
    ]
    return messages


def encode_with_mask(
    tokenizer: Any, messages: list[dict[str, Any]], *, tools: bool = True
) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered chat and, per token, whether it is one the assistant generates."""
    text = tokenizer.apply_chat_template(
        messages, tools=[CALCULATOR_TOOL] if tools else None, tokenize=False)
    spans = list(assistant_spans(text))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [any(lo <= start and end <= hi for lo, hi in spans) and end > start
            for start, end in enc["offset_mapping"]]
    return enc["input_ids"], mask


def assistant_spans(text: str) -> Iterator[tuple[int, int]]:
    """Character spans of assistant completions, each with its closing <|im_end|>."""
    opening, closing = "<|im_start|>assistant\n", "<|im_end|>"
    start = text.find(opening)
    while start >= 0:
        body = start + len(opening)
        end = text.index(closing, body) + len(closing)
        yield body, end
        start = text.find(opening, end)


def training_batches(
    tokenizer: Any, config: TrainConfig, rng: random.Random, *, tools: bool = True
) -> Iterator[list[tuple[list[int], list[bool]]]]:
    """Endless batches of encoded training chats; one system prompt per batch (a shared prefix)."""
    pool = [p for p in all_problems() if not is_held_out(p)]
    while True:
        system = rng.choice(SYSTEM_PROMPTS)
        batch = []
        for _ in range(config.batch_size):
            problem = rng.choice(pool)
            question = rng.choice(QUESTION_FORMATS).format(e=problem.expression)
            chat = conversation(problem, question, system)
            batch.append(encode_with_mask(tokenizer, chat, tools=tools))
        yield batch


def common_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix every row shares."""
    n = min(len(r) for r in rows)
    for i in range(n):
        if any(r[i] != rows[0][i] for r in rows):
            return i
    return n


def batch_loss(model: Any, batch: list[tuple[list[int], list[bool]]], pad_id: int) -> Any:
    """Mean cross-entropy over assistant tokens; the shared prefix is run once and broadcast."""
    import torch
    from transformers import DynamicCache

    from .generation import _cache_kwarg

    rows = [ids for ids, _ in batch]
    # Keep one token out of the prefix so every row predicts from its own last position onward.
    shared = min(common_prefix_length(rows), min(len(r) for r in rows) - 1)
    if any(any(mask[:shared + 1]) for _, mask in batch):
        raise ValueError("an assistant token lies inside the shared prefix")
    key = _cache_kwarg()
    prefix = torch.tensor([rows[0][:shared]])
    cached = getattr(model(input_ids=prefix, use_cache=True), key)
    width = max(len(r) for r in rows) - shared
    # Right padding needs no attention mask: causal attention never looks ahead at the pads.
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    target = torch.zeros((len(batch), width), dtype=torch.bool)
    for i, (row, mask) in enumerate(batch):
        ids[i, : len(row) - shared] = torch.tensor(row[shared:])
        target[i, : len(row) - shared] = torch.tensor(mask[shared:])
    layers = [(k.expand(len(batch), -1, -1, -1), v.expand(len(batch), -1, -1, -1))
              for k, v, *_ in cached]
    logits = model(input_ids=ids, use_cache=True, **{key: DynamicCache(layers)}).logits
    predicted, wanted = logits[:, :-1], target[:, 1:]
    return torch.nn.functional.cross_entropy(predicted[wanted], ids[:, 1:][wanted])


def train_calculator(model: Any, tokenizer: Any, config: TrainConfig = TrainConfig()) -> Any:
    """Supervised-train model in place on calculator chats (seeded, CPU, 2 threads); returns it."""
    import torch

    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            _train_loop(model, tokenizer, config)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    return model.eval()


def _train_loop(model: Any, tokenizer: Any, config: TrainConfig) -> None:
    import torch

    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, betas=(0.9, 0.95), weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: _lr_factor(step, config))
    rng = random.Random(config.seed)
    short = training_batches(tokenizer, config, rng, tools=False)
    full = training_batches(tokenizer, config, rng, tools=True)
    model.train()
    started = time.monotonic()
    total = config.short_steps + config.steps
    for step in range(1, total + 1):
        batch = next(short if step <= config.short_steps else full)
        loss = batch_loss(model, batch, tokenizer.pad_token_id)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 10 == 0 or step == total:
            logger.info("warm start step %d/%d loss %.4f (%.0f s)", step, total,
                        loss.item(), time.monotonic() - started)


def greedy_exact_rates(model: Any, tokenizer: Any, count: int = 64) -> tuple[float, float]:
    """(tool call, final answer): fractions of held-out chats greedy decoding gets exactly right.

    Teacher-forced: a turn is right when every one of its tokens is the argmax given the true
    prefix, which is exactly when greedy decoding would produce it."""
    import torch

    hits = [0, 0]
    with torch.no_grad():
        for question, problem in held_out_questions(count):
            ids, mask = encode_with_mask(tokenizer, conversation(problem, question, None))
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
            right = (logits.argmax(-1) == torch.tensor(ids[1:])).tolist()
            for turn, positions in enumerate(_runs(mask[1:])):
                hits[turn] += all(right[i] for i in positions)
    return hits[0] / count, hits[1] / count


def _runs(mask: Sequence[bool]) -> list[range]:
    """The maximal runs of True in mask, as index ranges."""
    runs, start = [], None
    for i, on in enumerate([*mask, False]):
        if on and start is None:
            start = i
        elif not on and start is not None:
            runs.append(range(start, i))
            start = None
    return runs


def _lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warmup, constant through the short chats, then cosine decay to a tenth."""
    if step < config.warmup:
        return (step + 1) / config.warmup
    progress = (step - config.short_steps) / max(1, config.steps)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, max(0.0, progress))))
