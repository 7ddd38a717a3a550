"""The examples run as real agents behind the real proxy: the openai-SDK tool agent, and Aider (when installed)."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

from rollouttap.manager import AgentManager, CommandAgent
from rollouttap.testing.fake_tokenizer import FakeTokenizer
from rollouttap.testing.replies import Reply
from rollouttap.testing.upstream import ScriptedUpstream

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem + "_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


openai_agent = _load(EXAMPLES / "openai_agent.py")
aider = _load(EXAMPLES / "aider" / "spec.py")


@pytest.mark.parametrize("expression, value", [
    ("17 * 23", "391"), ("(2 + 3) ^ 2", "25"), ("7 / 2", "3.5"), ("-4 + 10 % 3", "-3"),
    ("1 / 0", "error: division by zero"), ("__import__('os')", "error: unsupported Call in the expression"),
    ("2 ** 1000", "error: exponent too large"),
])
def test_calculator(expression, value):
    assert openai_agent.calculate(expression) == value


def test_openai_agent_offers_what_the_demo_model_was_trained_on():
    from rollouttap.trainer_hooks.warm_start import CALCULATOR_TOOL, SYSTEM_PROMPTS
    assert openai_agent.TOOLS == [CALCULATOR_TOOL]
    assert openai_agent.SYSTEM in SYSTEM_PROMPTS


def test_openai_agent_multi_turn_streamed_with_a_tool(tmp_path, confdir, upstream):
    spec = CommandAgent([sys.executable, str(EXAMPLES / "openai_agent.py"), "{prompt}"])
    with AgentManager(spec, store=tmp_path / "runs.db", model_url=upstream.base_url, confdir=confdir,
                      eos_token_id=FakeTokenizer.eos_token_id) as manager:
        [result] = manager.deploy(["What is 17 * 23?"])
    assert result.status == "ok", result.stderr_tail
    assert result.stdout_tail.strip() == "The answer is 391."
    calls = result.conversation.calls
    assert len(calls) == 2 and all(c.stream for c in calls)
    assert calls[0].response.tool_calls[0]["function"]["name"] == "calculator"
    assert calls[1].messages[-1] == {"role": "tool", "tool_call_id": calls[0].response.tool_calls[0]["id"],
                                     "content": "391"}
    assert result.conversation.discontinuities == []
    assert result.conversation.history[-1]["content"] == "The answer is 391."
    assert result.row is not None and result.fidelity.clean_joins == 1 and result.fidelity.dropped_tokens == 0


def test_openai_agent_takes_a_chat_message_prompt_as_its_conversation(tmp_path, confdir, upstream):
    asked = [{"role": "user", "content": "What is 17 * 23?"}]  # a conversational data set's prompt
    spec = CommandAgent([sys.executable, str(EXAMPLES / "openai_agent.py"), "{prompt}"])
    with AgentManager(spec, store=tmp_path / "runs.db", model_url=upstream.base_url, confdir=confdir) as manager:
        [result] = manager.deploy([asked])
    assert result.status == "ok", result.stderr_tail
    assert result.conversation.calls[0].messages == [{"role": "system", "content": openai_agent.SYSTEM}, *asked]
    assert result.stdout_tail.strip() == "The answer is 391."


@pytest.mark.parametrize("task, expected", [
    ('[{"role": "system", "content": "S"}, {"role": "user", "content": "u"}]', None),  # its own system prompt
    ('[{"role": "developer", "content": "D"}, {"role": "user", "content": "u"}]', None),
    ("[1, 2] + [3]", [{"role": "user", "content": "[1, 2] + [3]"}]),  # a task that reads as JSON, not messages
    ("[unbalanced", [{"role": "user", "content": "[unbalanced"}]),
])
def test_openai_agent_opening(task, expected):
    import json
    got = openai_agent.opening(task)
    assert got == (json.loads(task) if expected is None else [{"role": "system", "content": openai_agent.SYSTEM},
                                                               *expected])


def test_aider_check_tells_the_task_apart_from_a_fix(tmp_path):
    workdir = tmp_path / "work"
    shutil.copytree(aider.TASK, workdir)
    assert aider.check(workdir)["passed"] is False
    source = (workdir / "calc.py").read_text().replace("return a - b", "return a + b")
    (workdir / "calc.py").write_text(source)
    assert aider.check(workdir)["passed"] is True


def test_aider_spec_keeps_it_offline_and_non_interactive():
    argv = list(aider.aider_agent().argv_template)
    for flag in ("--yes-always", "--no-git", "--no-auto-commits", "--no-show-model-warnings",
                 "--no-check-update", "--no-analytics"):
        assert flag in argv
    assert argv[argv.index("--message") + 1] == "{prompt}" and argv[argv.index("--model") + 1] == "openai/policy"


FIXED = "def add(a, b):\n    return a + b\n\n\ndef multiply(a, b):\n    return a * b\n"


@pytest.mark.slow
@pytest.mark.skipif(not aider.aider_path().exists(),
                    reason="Aider is not installed: run examples/aider/install.sh (creates examples/aider/.venv)")
def test_aider_fixes_the_task_behind_the_proxy(tmp_path, confdir):
    reply = Reply(content=f"calc.py\n```python\n{FIXED}```\n")
    with ScriptedUpstream(script=lambda request: reply) as model:
        with AgentManager(aider.aider_agent(), store=tmp_path / "runs.db", model_url=model.base_url,
                          workdir_template=aider.TASK, confdir=confdir, timeout=300) as manager:
            [result] = manager.deploy([aider.INSTRUCTION])
    assert result.status == "ok", result.stderr_tail + result.stdout_tail
    assert result.calls >= 1 and result.conversation.calls[0].stream
    assert aider.INSTRUCTION in str(result.conversation.calls[0].messages)
    assert result.check_result["passed"] is True, result.check_result
