"""Aider, run unmodified, as a rollouttap agent: its spec, a task (template repo + instruction) and a check.

    examples/aider/install.sh                                   # Aider in its own virtualenv (.venv here)
    python examples/aider/spec.py --model-url http://127.0.0.1:8000/v1 --n 4 --store runs.db

Each agent gets a fresh copy of ``task/`` (calc.py has a bug, test_calc.py fails) and the instruction as
``--message``; afterwards the check runs the test in the agent's workdir. Aider reaches the model through
OPENAI_API_BASE, which the manager sets to the model URL (or, in base-URL mode, the agent's own URL), so the
flags below carry no URL; they keep Aider offline, non-interactive and out of git.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from rollouttap.manager import AgentManager, CommandAgent

HERE = Path(__file__).resolve().parent
VENV = HERE / ".venv"
TASK = HERE / "task"
INSTRUCTION = ("The test in test_calc.py fails. Fix the bug in calc.py so that `python -m unittest test_calc` "
               "passes. Only edit calc.py.")

# Aider's options reference: https://aider.chat/docs/config/options.html
FLAGS = (
    "--yes-always",                 # never wait for a confirmation
    "--no-git", "--no-auto-commits", "--no-dirty-commits", "--no-gitignore",
    "--no-show-model-warnings",     # an unknown model name (our policy) would otherwise ask
    "--no-check-update", "--no-show-release-notes", "--no-analytics",
    "--no-pretty", "--no-fancy-input", "--no-detect-urls", "--no-suggest-shell-commands",
    "--no-restore-chat-history",
    "--map-tokens", "0",            # no repo map: the task names its files
    "--edit-format", "whole",       # whole-file edits: the simplest format for a small policy
)
# litellm would fetch its model price list from the network at import time.
ENV = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "AIDER_ANALYTICS": "false"}


def aider_path(venv: Path = VENV) -> Path:
    return venv / "bin" / "aider"


def check(workdir: Path) -> dict[str, Any]:
    """Run the task's test in the agent's workdir: {"passed": bool, "output": the test's last lines}."""
    proc = subprocess.run([sys.executable, "-m", "unittest", "-q", "test_calc"], cwd=workdir,
                          capture_output=True, text=True, timeout=60)
    return {"passed": proc.returncode == 0, "output": (proc.stdout + proc.stderr)[-1500:]}


def aider_agent(*, venv: Path = VENV, model: str = "openai/policy", stream: bool = True,
                extra: tuple[str, ...] = ()) -> CommandAgent:
    """The spec: Aider with the offline, non-interactive flags, the prompt as its one message."""
    argv = [str(aider_path(venv)), "--model", model, *FLAGS, "--stream" if stream else "--no-stream", *extra,
            "--message", "{prompt}", "calc.py"]
    return CommandAgent(argv, env=ENV, check=check)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run Aider on the calc task behind the capture proxy.")
    parser.add_argument("--model-url", required=True, help="the model server's OpenAI base URL")
    parser.add_argument("--n", type=int, default=1, help="how many agents")
    parser.add_argument("--store", default="runs.db")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args(argv)
    if not aider_path().exists():
        print(f"Aider is not installed: run {HERE / 'install.sh'}", file=sys.stderr)
        return 1
    with AgentManager(aider_agent(), store=args.store, model_url=args.model_url, workdir_template=TASK,
                      timeout=args.timeout, parallel=min(args.n, 8)) as manager:
        for result in manager.deploy([INSTRUCTION] * args.n):
            print(json.dumps({"agent_id": result.agent_id, "status": result.status, "calls": result.calls,
                              "check": result.check_result, "error": result.error}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
