"""AgentManager inside someone else's program: what an entry point's interpreter imports, a program whose main
thread ends while a deploy runs on a daemon thread, and a Ctrl-C while the proxy starts.

Agents, proxies and the programs that embed the manager are real processes.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from conftest import ctrl_c_as_from_a_terminal, running_agents, wait_for
from rollouttap.errors import AgentSpecError
from rollouttap.manager import AgentManager, EntryPointAgent
from rollouttap.store import Store

TESTS = str(Path(__file__).parent)


def entry_imports(prompt: str) -> dict:
    """What this agent's interpreter imported json from and where its module search begins."""
    import json
    return {"json": json.__file__, "cwd": os.getcwd(), "path": sys.path}


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _proxies_of(pid: int) -> list[psutil.Process]:
    """The mitmdump processes process ``pid`` started that have not ended."""
    found = []
    for child in psutil.Process(pid).children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "rollouttap.addon.fastdump" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:  # ended meanwhile
            pass
    return found


def _program(tmp_path: Path, body: str) -> subprocess.Popen[str]:
    """A Python program run by this interpreter, its warnings errors; it reads stdin and writes stdout."""
    script = tmp_path / "program.py"
    script.write_text(textwrap.dedent(body))
    return subprocess.Popen([sys.executable, "-W", "error", "-W", "ignore::ResourceWarning", str(script)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=ctrl_c_as_from_a_terminal)


# -- the import path of an entry point's interpreter ------------------------------------------------------
@pytest.mark.parametrize("name, file, root", [
    ("mod", "/p/mod.py", "/p"),
    ("pkg.mod", "/p/pkg/mod.py", "/p"),
    ("pkg", "/p/pkg/__init__.py", "/p"),
    ("pkg.sub", "/p/pkg/sub/__init__.py", "/p"),
    ("ext", "/p/ext.cpython-313-x86_64-linux-gnu.so", "/p"),
    ("myloose", "/p/loose_agent.py", None),  # spec_from_file_location("myloose", ".../loose_agent.py")
    ("pkg.mod", "/p/other/mod.py", None),
])
def test_import_root(name, file, root):
    from rollouttap.manager.agents import import_root
    assert import_root(name, Path(file)) == (Path(root) if root else None)


def test_parent_path_keeps_what_is_not_the_interpreters_own_where_it_stood():
    from rollouttap.manager.agents import parent_path
    installed = ["/py/lib", "/venv/lib/python3.13/site-packages"]
    path = ["", "/proj/agents", "/py/lib/python313.zip", "/py/lib/python3.13",
            "/venv/lib/python3.13/site-packages", "/src/editable", "/proj/agents", "rel"]
    front, back = parent_path(path, "/home/me", installed)
    assert (front, back) == (["/home/me", "/proj/agents"], ["/src/editable", "/home/me/rel"])


def test_import_path_puts_the_root_first_and_each_directory_once():
    from rollouttap.manager.runner_entry import import_path
    assert import_path(["/py/lib", "/site", "/a"], "/root", ["/a", "/root"], ["/site", "/b"]) == [
        "/root", "/a", "/py/lib", "/site", "/b"]


def test_an_entry_points_workdir_does_not_shadow_what_it_imports(tmp_path, confdir):
    template = tmp_path / "repo"
    template.mkdir()
    (template / "json.py").write_text("raise ImportError('the workdir json.py shadowed the standard library')\n")
    with AgentManager(EntryPointAgent(entry_imports), store=tmp_path / "r.db", confdir=confdir,
                      workdir_template=template, timeout=60) as m:
        [result] = m.deploy(["x"])
    assert result.status == "ok", (result.error, result.stderr_tail)
    value = result.return_value
    assert not value["json"].startswith(value["cwd"])
    assert value["path"][0] == TESTS and value["cwd"] not in value["path"]  # its own root, not its workdir


def test_an_entry_point_imports_from_the_directories_its_program_added(tmp_path, confdir, monkeypatch):
    (tmp_path / "agents").mkdir()
    (tmp_path / "lib").mkdir()
    (tmp_path / "agents" / "embed_agent_mod.py").write_text(
        "def run(prompt):\n    from embed_helper_mod import shout\n    return shout(prompt)\n")
    (tmp_path / "lib" / "embed_helper_mod.py").write_text("def shout(text):\n    return text.upper()\n")
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    monkeypatch.syspath_prepend(str(tmp_path / "agents"))
    with AgentManager(EntryPointAgent("embed_agent_mod:run"), store=tmp_path / "r.db", confdir=confdir,
                      timeout=60) as m:
        [result] = m.deploy(["hi"])
    assert (result.status, result.return_value) == ("ok", "HI"), (result.error, result.stderr_tail)


def test_an_entry_point_loaded_under_a_name_that_is_not_its_files_is_refused(tmp_path, monkeypatch):
    (tmp_path / "loose_agent.py").write_text("def run(prompt):\n    return prompt\n")
    spec = importlib.util.spec_from_file_location("embed_loose", tmp_path / "loose_agent.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "embed_loose", module)
    spec.loader.exec_module(module)
    with pytest.raises(AgentSpecError, match="a fresh .* imports .embed_loose. from nowhere"):
        EntryPointAgent(module.run)


# -- the program around the manager ends -------------------------------------------------------------------
def test_a_deploy_on_a_daemon_thread_is_cancelled_when_the_main_thread_ends(tmp_path, confdir):
    store = tmp_path / "r.db"
    program = _program(tmp_path, f"""
        import sys, threading
        from rollouttap.manager import AgentManager, CommandAgent
        manager = AgentManager(CommandAgent(["sleep", "{{prompt}}"]), store={str(store)!r}, confdir={str(confdir)!r},
                               timeout=60).start()
        threading.Thread(target=manager.deploy, args=(["60"],), daemon=True).start()
        sys.stdin.readline()
        raise RuntimeError("the trainer crashed")
    """)
    try:
        [agent] = running_agents(store, 1, timeout=30)
        program.stdin.write("go\n")
        program.stdin.flush()
        started = time.monotonic()
        output, _ = program.communicate(timeout=30)  # the agent alone would keep it 60 s
    finally:
        program.kill()
        program.wait()
    assert program.returncode == 1 and "the trainer crashed" in output, output
    assert time.monotonic() - started < 30
    assert _gone(agent.root_pid)
    with Store(store) as s:
        [ended] = s.agents()
    assert ended.status == "error"


def test_a_ctrl_c_while_the_proxy_starts_stops_it(tmp_path, confdir):
    store = tmp_path / "r.db"
    program = _program(tmp_path, f"""
        import sys
        from rollouttap.manager.proxy import ProxyConfig, ProxyProcess
        try:
            ProxyProcess(ProxyConfig(store={str(store)!r}, confdir={str(confdir)!r})).start()
            print("started", flush=True)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        sys.stdin.readline()  # alive: the proxy would end with this process anyway
    """)
    _interrupt_while_starting(program, store, started=lambda: bool(_proxies_of(program.pid)))


def test_a_ctrl_c_while_several_proxies_start_stops_them_all(tmp_path, confdir):
    store = tmp_path / "r.db"
    program = _program(tmp_path, f"""
        import sys
        from rollouttap.manager import AgentManager, CommandAgent
        manager = AgentManager(CommandAgent(["true", "{{prompt}}"]), store={str(store)!r}, confdir={str(confdir)!r},
                               proxies=4)
        try:
            manager.start()
            print("started", flush=True)
        except KeyboardInterrupt:
            print("interrupted", flush=True)
        sys.stdin.readline()
    """)
    # The first proxy listens before the others start, on threads the main thread joins.
    _interrupt_while_starting(program, store, started=lambda: len(_proxies_of(program.pid)) > 1)


def _interrupt_while_starting(program: subprocess.Popen, store: Path, started: Callable[[], bool]) -> None:
    """Ctrl-C ``program`` once ``started`` holds: it must say it was interrupted, and leave no proxy running."""
    try:
        wait_for(started, 30, "the proxies to start")
        os.kill(program.pid, signal.SIGINT)
        assert program.stdout.readline().strip() == "interrupted"
        wait_for(lambda: not _proxies_of(program.pid), 30, "the interrupted proxies to end")
        with Store(store) as s:
            assert s.proxies(alive_only=True) == []
        program.stdin.write("done\n")
        program.stdin.flush()
        assert program.wait(30) == 0
    finally:
        program.kill()
        program.wait()


def test_an_entry_point_of_a_package_its_own_finder_maps_is_accepted_and_importable(tmp_path):
    # The project is installed editable: setuptools' finder maps rollouttap.examples to ./examples, a directory
    # whose names are not the module's. (Installed the usual way, it is a plain case.)
    spec = EntryPointAgent("rollouttap.examples.openai_agent:run")
    env = {**os.environ, **spec.extra_env()}
    out = subprocess.run([spec.python, "-P", "-c", "import rollouttap.examples.openai_agent as m; print(m.__file__)"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip().endswith("openai_agent.py"), out.stderr


def test_an_entry_point_only_a_finder_added_at_run_time_finds_is_refused(tmp_path):
    import importlib.abc
    (tmp_path / "impl_file.py").write_text("def run(prompt):\n    return prompt\n")

    class RunTimeFinder(importlib.abc.MetaPathFinder):  # an import hook of this program's: not a fresh one's
        def find_spec(self, name, path, target=None):
            return importlib.util.spec_from_file_location(name, tmp_path / "impl_file.py") \
                if name == "ghost_agent_mod" else None
    finder = RunTimeFinder()
    sys.meta_path.append(finder)
    try:
        __import__("ghost_agent_mod")
        with pytest.raises(AgentSpecError, match="imports 'ghost_agent_mod' from nowhere"):
            EntryPointAgent("ghost_agent_mod:run")
    finally:
        sys.meta_path.remove(finder)
        sys.modules.pop("ghost_agent_mod", None)


def test_an_entry_point_its_own_env_makes_importable_is_accepted(tmp_path):
    import importlib.abc
    impl = tmp_path / "impl_file.py"
    impl.write_text("def run(prompt):\n    return prompt\n")
    hook = tmp_path / "hook"
    hook.mkdir()
    finder_src = textwrap.dedent(f"""
        import importlib.abc, importlib.util
        class MagicFinder(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                return importlib.util.spec_from_file_location(name, {str(impl)!r}) \\
                    if name == "magic_agent_mod" else None
        """)
    (hook / "magic_finder.py").write_text(finder_src)
    # Installed at start-up by the agent's environment (a sitecustomize on its PYTHONPATH), as by the program here.
    (hook / "sitecustomize.py").write_text(
        "import sys, magic_finder\nsys.meta_path.append(magic_finder.MagicFinder())\n")
    namespace: dict = {}
    exec(finder_src, namespace)
    finder: importlib.abc.MetaPathFinder = namespace["MagicFinder"]()
    sys.meta_path.append(finder)
    try:
        __import__("magic_agent_mod")
        spec = EntryPointAgent("magic_agent_mod:run", env={"PYTHONPATH": str(hook)})
        assert spec.target == "magic_agent_mod:run"
    finally:
        sys.meta_path.remove(finder)
        sys.modules.pop("magic_agent_mod", None)
