"""The warm-started calculator model: its synthetic chats, its training run, and the model served."""

from __future__ import annotations

import json
import random

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
openai = pytest.importorskip("openai")

from rollouttap.trainer_hooks.hermes import parse_assistant_text  # noqa: E402
from rollouttap.trainer_hooks.policy_server import PolicyServer  # noqa: E402
from rollouttap.trainer_hooks.tiny_model import (  # noqa: E402
    WARM_START_REPORT, ModelShape, build_model, build_tiny_model, build_tokenizer,
    default_cache_dir, is_complete,
)
from rollouttap.trainer_hooks.warm_start import (  # noqa: E402
    ANSWER_FORMAT, CALCULATOR_TOOL, Problem, TrainConfig, all_problems, assistant_spans,
    batch_loss, calculate, common_prefix_length, conversation, encode_with_mask,
    held_out_questions, is_held_out, tool_call_text, train_calculator, training_batches,
)

HELD_OUT = held_out_questions(10, seed=1)
# Much smaller than the real one: enough to check the training machinery, in a second.
SMALL = ModelShape(32, 64, 1, 2, 1, initializer_range=0.02)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


# ------------------------------------------------------------------ pure functions

@pytest.mark.parametrize("problem, expression, result", [
    (Problem(12, "+", 7), "12 + 7", 19),
    (Problem(3, "-", 10), "3 - 10", -7),
    (Problem(4, "*", 6), "4 * 6", 24),
    (Problem(0, "*", 9), "0 * 9", 0),
])
def test_problems(problem, expression, result):
    assert (problem.expression, problem.result) == (expression, result)
    assert calculate(problem.expression) == str(result)


@pytest.mark.parametrize("expression, value", [
    ("12 + 7", "19"), ("3 - 10", "-7"), ("2 * (3 + 4)", "14"), ("-5 + 2", "-3"), (" 8*9 ", "72"),
])
def test_calculate(expression, value):
    assert calculate(expression) == value


@pytest.mark.parametrize("expression", [
    "", "2 ** 10", "1 / 2", "1.5 + 1", "__import__('os').getcwd()", "x + 1", "True + 1", "12 +",
])
def test_calculate_rejects(expression):
    with pytest.raises(ValueError):
        calculate(expression)


def test_held_out_questions_are_never_trained_on():
    assert HELD_OUT == held_out_questions(10, seed=1)
    assert all(is_held_out(p) for _, p in HELD_OUT)
    questions = [q for q, _ in HELD_OUT]
    assert len(set(questions)) == len(questions)
    share = sum(map(is_held_out, all_problems())) / len(all_problems())
    assert 0.08 < share < 0.2
    assert not is_held_out(Problem(12, "+", 7))  # the demo's example question is a trained one


@pytest.mark.parametrize("text, spans", [
    ("<|im_start|>user\nhi<|im_end|>\n", []),
    ("<|im_start|>assistant\nA<|im_end|>\n", [(22, 33)]),
    ("<|im_start|>assistant\nA<|im_end|>\n<|im_start|>user\nB<|im_end|>\n"
     "<|im_start|>assistant\nCD<|im_end|>\n", [(22, 33), (85, 97)]),
])
def test_assistant_spans(text, spans):
    assert list(assistant_spans(text)) == spans
    assert all(text[a:b].endswith("<|im_end|>") for a, b in spans)


@pytest.mark.parametrize("rows, length", [
    ([[1, 2, 3], [1, 2, 4]], 2), ([[1, 2], [1, 2, 3]], 2), ([[5], [6]], 0), ([[1, 2, 3]], 3),
])
def test_common_prefix_length(rows, length):
    assert common_prefix_length(rows) == length


# ------------------------------------------------------------ data and training

def test_the_trained_tokens_are_exactly_what_the_server_parses(tok):
    problem = Problem(12, "+", 7)
    ids, mask = encode_with_mask(tok, conversation(problem, "What is 12 + 7?", None))
    trained = tok.decode([t for t, m in zip(ids, mask, strict=True) if m])
    call = tool_call_text("12 + 7")
    assert trained == f"{call}<|im_end|>The answer is 19.<|im_end|>"
    assert ANSWER_FORMAT.format(result=19) == "The answer is 19."
    parsed = parse_assistant_text(call)
    assert parsed.content is None and len(parsed.tool_calls) == 1
    assert parsed.tool_calls[0].name == "calculator"
    assert json.loads(parsed.tool_calls[0].arguments) == {"expression": "12 + 7"}
    # The prompt the model trains under is the one the server renders for tools=[CALCULATOR_TOOL].
    text = tok.decode(ids)
    assert text.startswith(tok.apply_chat_template(
        [{"role": "user", "content": "What is 12 + 7?"}], tools=[CALCULATOR_TOOL],
        add_generation_prompt=True, tokenize=False))


def test_batch_loss_equals_a_plain_forward_pass(tok):
    model = build_model(tok, SMALL)
    config = TrainConfig(batch_size=3)
    batch = next(training_batches(tok, config, random.Random(0), tools=True))
    with torch.no_grad():
        shared = batch_loss(model, batch, tok.pad_token_id)
        total, count = 0.0, 0
        for ids, mask in batch:
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
            wanted = torch.tensor(mask[1:])
            targets = torch.tensor(ids[1:])[wanted]
            total += float(torch.nn.functional.cross_entropy(
                logits[wanted], targets, reduction="sum"))
            count += int(wanted.sum())
    assert float(shared) == pytest.approx(total / count, rel=1e-5)


def test_training_is_deterministic_and_restores_torch_settings(tok):
    threads = torch.get_num_threads()
    config = TrainConfig(short_steps=2, steps=2, batch_size=4, warmup=1)
    first = train_calculator(build_model(tok, SMALL), tok, config).state_dict()
    second = train_calculator(build_model(tok, SMALL), tok, config).state_dict()
    untrained = build_model(tok, SMALL).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], untrained[k]) for k in first)
    assert torch.get_num_threads() == threads
    assert not torch.are_deterministic_algorithms_enabled()


def test_calculator_cache_dir_and_marker(monkeypatch, tmp_path):
    monkeypatch.setenv("ROLLOUTTAP_CACHE", str(tmp_path))
    target = default_cache_dir("calculator")
    assert target == tmp_path / "tiny-qwen2-v1-calculator"
    target.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        (target / name).write_text("{}")
    # A random-weight build is no calculator: the marker must name the variant and the recipe.
    (target / "rollouttap-tiny.json").write_text(
        json.dumps({"version": "tiny-qwen2-v1", "variant": "calculator"}))
    assert not is_complete(target, "calculator")


# ------------------------------------------------- the built model, served (slow)

@pytest.fixture(scope="module")
def calculator_path():
    # The default cache on purpose: built once per machine (about a minute and a half).
    return build_tiny_model(variant="calculator")


@pytest.fixture(scope="module")
def client(calculator_path):
    tokenizer = transformers.AutoTokenizer.from_pretrained(calculator_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(calculator_path)
    with PolicyServer(model, tokenizer, max_new_tokens=64) as server:
        with openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0) as c:
            yield c


def ask(client, messages, **kwargs):
    kwargs.setdefault("temperature", 0)
    return client.chat.completions.create(
        model="policy", messages=messages, tools=[CALCULATOR_TOOL], **kwargs).choices[0]


def expression_of(choice) -> str | None:
    """The expression of the choice's one calculator call, or None when it made no such call."""
    calls = choice.message.tool_calls or []
    if len(calls) != 1 or calls[0].function.name != "calculator":
        return None
    try:
        return json.loads(calls[0].function.arguments).get("expression")
    except ValueError:
        return None


def answer_after_tool(client, question: str, expression: str, **kwargs) -> str:
    """The model's reply once the (correct) tool result for expression is back."""
    messages = [{"role": "user", "content": question}]
    call = {"id": "call_1", "type": "function",
            "function": {"name": "calculator", "arguments": json.dumps({"expression": expression})}}
    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
    messages.append({"role": "tool", "tool_call_id": "call_1", "content": calculate(expression)})
    return ask(client, messages, **kwargs).message.content or ""


@pytest.mark.slow
@pytest.mark.timeout(900)  # the first run on a machine builds the model, maybe on a busy CPU
def test_the_build_is_complete_and_reports_its_scores(calculator_path):
    assert is_complete(calculator_path, "calculator")
    report = json.loads((calculator_path / WARM_START_REPORT).read_text())
    assert report["held_out_greedy_tool_call"] >= 0.7
    assert report["held_out_greedy_answer"] >= 0.7


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_example_question_goes_through_the_calculator(client):
    messages = [{"role": "user", "content": "What is 12 + 7?"}]
    first = ask(client, messages)
    assert first.finish_reason == "tool_calls"
    (call,) = first.message.tool_calls
    assert call.function.name == "calculator"
    assert json.loads(call.function.arguments) == {"expression": "12 + 7"}
    # As an agent does: send the assistant message back, then the tool's result.
    messages.append(first.message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id,
                     "content": calculate(json.loads(call.function.arguments)["expression"])})
    second = ask(client, messages)
    assert second.finish_reason == "stop" and not second.message.tool_calls
    assert "19" in second.message.content


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_held_out_questions_at_temperature_zero(client):
    calls = [expression_of(ask(client, [{"role": "user", "content": q}])) for q, _ in HELD_OUT]
    assert sum(c is not None for c in calls) >= 0.7 * len(HELD_OUT)  # valid calculator calls
    assert sum(c == p.expression for c, (_, p) in zip(calls, HELD_OUT)) >= 0.7 * len(HELD_OUT)
    answers = [answer_after_tool(client, q, p.expression) for q, p in HELD_OUT]
    assert sum(str(p.result) in a for a, (_, p) in zip(answers, HELD_OUT)) >= 0.7 * len(HELD_OUT)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sampling_at_temperature_one_mostly_succeeds_but_not_always(client):
    # GRPO learns from the spread of rewards within a group: some rollouts must go wrong.
    questions = held_out_questions(40, seed=2)
    right = [expression_of(ask(client, [{"role": "user", "content": q}], temperature=1.0, seed=i))
             == p.expression for i, (q, p) in enumerate(questions)]
    assert 0.5 * len(right) <= sum(right) < len(right)
