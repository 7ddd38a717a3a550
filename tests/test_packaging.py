"""What a pip user gets: the wheel carries every file its commands run, and a missing extra is one clear line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from rollouttap.errors import MissingDependencyError
from rollouttap.extras import missing_message, require
from rollouttap.trainer_hooks.demo import DemoFailed, check_batch, example_agent

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_carries_the_addon_script_the_schema_and_the_demos_agent(tmp_path):
    pytest.importorskip("setuptools", minversion="77")  # the backend (SPDX license), used without network
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".venv", ".git", "build", "*.egg-info", "__pycache__",
                                                             "*.db*", ".pytest_cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True, timeout=300)
    [wheel] = (tmp_path / "dist").glob("rollouttap-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("rollouttap/addon/entry.py", "rollouttap/addon/fastdump.py", "rollouttap/store/SCHEMA.md",
                   "rollouttap/examples/openai_agent.py", "rollouttap/manager/runner_entry.py"):
        assert needed in names, needed
    assert not [n for n in names if n.startswith(("tests/", "bench/", "rollouttap/examples/aider"))]


def test_the_demo_finds_its_agent_as_a_module_of_the_package():
    assert example_agent().is_file() and example_agent().parent.name == "examples"
    out = subprocess.run([sys.executable, "-m", "rollouttap.examples.openai_agent"], capture_output=True,
                         text=True, stdin=subprocess.DEVNULL, timeout=60)
    assert out.returncode == 2 and "usage: openai_agent.py TASK" in out.stderr  # no task given


def test_require_names_the_extra_to_install():
    require("this", "json", "sqlite3")  # present: nothing to say
    with pytest.raises(MissingDependencyError, match=r"^demo needs no_such_mod_x, no_such_mod_y, not installed "
                                                     r"here: pip install 'rollouttap\[train\]'$"):
        require("demo", "no_such_mod_x", "no_such_mod_y")
    assert missing_message("it", ["aiohttp", "torch"]).endswith("pip install 'rollouttap[test,train]'")


@pytest.mark.parametrize("missing, args, expected", [
    # As on a core install: trl cannot be imported (a module set to None in sys.modules is not importable).
    ("trl", [], "rollouttap demo needs trl, not installed here: pip install 'rollouttap[train]'"),
    # TRL's own error would come after a traceback, naming TRL's extra.
    ("vllm", ["--vllm-url", "http://127.0.0.1:1"],
     "rollouttap demo --vllm-url needs vllm, not installed here: pip install 'rollouttap[vllm]'"),
], ids=["train", "vllm"])
def test_demo_lacking_an_extra_is_one_line_naming_it_and_leaves_no_folder(tmp_path, missing, args, expected):
    code = (f"import sys; sys.modules[{missing!r}] = None; from rollouttap.cli import main; "
            f"sys.exit(main(['demo', '--steps', '1', *{args!r}]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TMPDIR": str(tmp_path)})
    assert out.returncode == 1, out.stderr
    assert out.stderr.startswith(f"rollouttap: {expected}"), out.stderr
    assert "Traceback" not in out.stderr and list(tmp_path.iterdir()) == []


def _result(status: str, calls: int, error: str | None = None, stderr: str = "") -> SimpleNamespace:
    return SimpleNamespace(status=status, calls=calls, error=error, stderr_tail=stderr)


def test_a_demo_batch_whose_agents_all_fail_before_the_model_stops_the_demo():
    check_batch([_result("ok", 2), _result("failed", 0)])
    check_batch([_result("failed", 1), _result("timeout", 0)])  # they reached the model: a policy that fails
    with pytest.raises(DemoFailed, match=r"all 2 agents of a batch failed without a model call; the first: "
                                         r"exited with code 1 \(ModuleNotFoundError: No module named 'openai'\)"):
        check_batch([_result("failed", 0, "exited with code 1", "Traceback\nModuleNotFoundError: No module named "
                                                                "'openai'\n"), _result("failed", 0)])
