"""The tiny offline model: deterministic build, tokenizer, chat template and its prefix property."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

from rollouttap.trainer_hooks.chat_template import reasoning_dropping_template  # noqa: E402
from rollouttap.trainer_hooks.hermes import parse_assistant_text  # noqa: E402
from rollouttap.trainer_hooks.tiny_corpus import corpus_documents  # noqa: E402
from rollouttap.trainer_hooks.tiny_model import (  # noqa: E402
    EOS_TOKEN, MARKUP_TOKENS, SPECIAL_TOKENS, build_tiny_model, default_cache_dir, is_complete,
)

TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tok(tiny_path):
    return transformers.AutoTokenizer.from_pretrained(tiny_path)


def ids_of(tok, messages, *, tools=None, generation=False, template=None):
    return tok.apply_chat_template(
        messages, tools=tools, add_generation_prompt=generation, tokenize=True,
        return_dict=False, chat_template=template,
    )


# ------------------------------------------------------------------ build and cache

def test_two_builds_are_identical(tiny_path, tmp_path):
    other = build_tiny_model(tmp_path / "again")
    assert (other / "tokenizer.json").read_bytes() == (tiny_path / "tokenizer.json").read_bytes()
    first, second = load_file(tiny_path / "model.safetensors"), load_file(other / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_a_complete_build_is_reused(tiny_path):
    before = (tiny_path / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_model(tiny_path) == tiny_path
    assert (tiny_path / "model.safetensors").stat().st_mtime_ns == before


def test_a_half_written_directory_is_rebuilt(tmp_path):
    target = tmp_path / "half"
    target.mkdir()
    (target / "config.json").write_text("{}")
    assert not is_complete(target)
    build_tiny_model(target)
    assert is_complete(target)
    assert [p.name for p in tmp_path.iterdir()] == ["half"]  # no temporary directory left over


def test_default_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ROLLOUTTAP_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "tiny-qwen2-v1"
    assert default_cache_dir("reasoning_dropping") == tmp_path / "tiny-qwen2-v1-reasoning-dropping"


def test_the_reasoning_dropping_variant_builds_with_its_template(tmp_path):
    path = build_tiny_model(tmp_path / "rd", variant="reasoning_dropping")
    loaded = transformers.AutoTokenizer.from_pretrained(path)
    assert loaded.chat_template == reasoning_dropping_template()


# ---------------------------------------------------------------------- tokenizer

@pytest.mark.parametrize("token", SPECIAL_TOKENS + MARKUP_TOKENS)
def test_control_tokens_are_single_ids(tok, token):
    ids = tok.encode(f"a{token}b", add_special_tokens=False)
    assert len(ids) == 3 and tok.convert_ids_to_tokens(ids[1]) == token


def test_eos_and_pad(tok, tiny_path):
    assert tok.eos_token == EOS_TOKEN and tok.pad_token == "<|endoftext|>"
    generation = transformers.GenerationConfig.from_pretrained(tiny_path)
    assert generation.eos_token_id == tok.convert_tokens_to_ids(EOS_TOKEN)
    assert generation.pad_token_id == tok.pad_token_id


def test_markup_survives_skipping_special_tokens(tok):
    ids = tok.encode("<|im_start|>x<tool_call>y</tool_call><think>z</think><|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "x<tool_call>y</tool_call><think>z</think>"


def test_loaded_tokenizer_encodes_like_the_built_one(tok, tiny_path):
    from rollouttap.trainer_hooks.tiny_model import build_tokenizer

    built = build_tokenizer()
    texts = [*corpus_documents(), "héllo wörld ünïcode 你好", "  two  spaces\n\n\ttab"]
    assert [tok.encode(t) for t in texts] == [built.encode(t) for t in texts]
    assert len(tok) == len(built)


def test_vocabulary_is_small_but_real(tok):
    assert 1000 <= len(tok) <= 2100
    assert len(tok.encode("The quick brown fox jumps over the lazy dog.")) < 20


# ------------------------------------------------------------------ chat template

def test_template_renders_tools_calls_and_responses(tok):
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "c1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        }]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": "warm"},
        {"role": "assistant", "content": "Sunny and warm."},
    ]
    text = tok.apply_chat_template(messages, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n")
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text
    assert text.endswith(
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\nwarm\n"
        "</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nSunny and warm.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_template_without_tools_and_with_content_parts(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
    ]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"


# Completions as a model would generate them; the server parses them into the assistant message.
GENERATED = [
    "Hello there.",
    "<think>Two and two.</think>The answer is 4.",
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    'Let me check.<tool_call>\n{"name": "search", "arguments": {"query": "été à Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "calculator", "arguments": {"expression": "1 + 1"}}\n</tool_call>',
    '<think>Need weather.</think><tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>',
]


def message_from(text: str) -> dict:
    """The assistant message an OpenAI client gets back (and sends again) for a completion."""
    parsed = parse_assistant_text(text, tools=True)
    message = {"role": "assistant", "content": parsed.content}
    if parsed.reasoning is not None:
        message["reasoning_content"] = parsed.reasoning
    if parsed.tool_calls:
        message["tool_calls"] = [
            {"id": f"call{i}", "type": "function",
             "function": {"name": c.name, "arguments": c.arguments}}
            for i, c in enumerate(parsed.tool_calls)
        ]
    return message


def conversation(first: str, second: str) -> tuple[list[dict], dict[int, str]]:
    """system, user, assistant(first), tool results, assistant(second), user, assistant(first).

    Also returns, per assistant message index, the completion text it came from."""
    messages = [{"role": "system", "content": "You help."}, {"role": "user", "content": "Go."}]
    generated: dict[int, str] = {}

    def answer(text: str) -> None:
        generated[len(messages)] = text
        messages.append(message_from(text))
        for call in messages[-1].get("tool_calls", []):
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": "ok"})

    answer(first)
    answer(second)
    messages.append({"role": "user", "content": "Again."})
    answer(first)
    return messages, generated


def prefix_failures(tok, case, template=None, upto: int | None = None) -> list[int]:
    """Assistant turns k where prompt(messages[:k]) + completion is no token prefix of the whole."""
    messages, generated = case
    messages = messages[:upto]
    eos = tok.convert_tokens_to_ids(EOS_TOKEN)
    whole = ids_of(tok, messages, tools=TOOLS, template=template)
    failures = []
    for k, text in generated.items():
        if k >= len(messages):
            continue
        prompt = ids_of(tok, messages[:k], tools=TOOLS, generation=True, template=template)
        candidate = prompt + tok.encode(text, add_special_tokens=False) + [eos]
        if whole[: len(candidate)] != candidate:
            failures.append(k)
    return failures


@pytest.mark.parametrize("first", GENERATED)
@pytest.mark.parametrize("second", GENERATED[:3])
def test_template_is_prefix_preserving(tok, first, second):
    assert prefix_failures(tok, conversation(first, second)) == []


@pytest.mark.parametrize("first", [GENERATED[1], GENERATED[4]])
def test_reasoning_dropping_template_is_not_prefix_preserving(tok, first):
    case = conversation(first, GENERATED[0])
    failures = prefix_failures(tok, case, template=reasoning_dropping_template())
    # Turns before the last user message lose their reasoning; the last turn keeps it.
    assert failures and max(failures) < max(case[1])
    assert prefix_failures(tok, case) == []


def test_reasoning_dropping_keeps_reasoning_inside_a_tool_loop(tok):
    case = conversation(GENERATED[4], GENERATED[1])
    last_user = max(i for i, m in enumerate(case[0]) if m["role"] == "user")
    assert prefix_failures(tok, case, template=reasoning_dropping_template(), upto=last_user) == []


# ---------------------------------------------------------------------------- model

def test_model_loads_and_runs_forward(tiny_path, tok):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_path)
    assert model.config.model_type == "qwen2" and model.config.tie_word_embeddings
    ids = ids_of(tok, [{"role": "user", "content": "hi"}], generation=True)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tok))
    assert torch.isfinite(logits).all()
