"""Agent specifications: what process to start for one prompt (a command template or a Python entry point).

A prompt is a string or a list of chat messages. Commands see a message list as JSON text: in ``{prompt}``,
in the ``{prompt_file}`` file and on stdin. Entry points receive the prompt as the Python value it was.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import os
import shlex
import site
import string
import subprocess
import sys
import sysconfig
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Union

from rollouttap.errors import AgentSpecError
from rollouttap.manager.checks import run_callable_check, run_shell_check

log = logging.getLogger(__name__)

MAX_ARG_BYTES = 32 * 4096 - 1  # Linux's MAX_ARG_STRLEN holds one argument and its terminating NUL

Prompt = Union[str, list[dict[str, Any]]]
# A check computes the result of an agent's work from its workdir (used by rewards): a callable taking the
# workdir, or a shell command run there (its exit code and output tails become the result).
Check = Union[Callable[[Path], Any], str, None]

PLACEHOLDERS = frozenset({"prompt", "prompt_file", "workdir", "agent_id"})
RUNNER_MODULE = "rollouttap.manager.runner_entry"
# Read by runner_entry (not imported from it: `-m` would then find it imported already, and warn).
ENTRY_PATH_ENV = "ROLLOUTTAP_ENTRY_PATH"
PARENT_PATH_ENV = "ROLLOUTTAP_PARENT_PATH"


@dataclass(frozen=True)
class LaunchContext:
    """Everything a spec may put on an agent's command line, for one agent."""
    agent_id: str
    prompt: Prompt
    workdir: Path
    prompt_file: Path  # the prompt as text (JSON for a message list)
    prompt_json_file: Path  # the prompt as JSON, whatever its type (what entry points read)
    result_file: Path  # where an entry point's runner writes its outcome

    @property
    def values(self) -> dict[str, str]:
        return {"prompt": prompt_text(self.prompt), "prompt_file": str(self.prompt_file),
                "workdir": str(self.workdir), "agent_id": self.agent_id}


def prompt_text(prompt: Prompt) -> str:
    """A prompt as text: a string as it is, a message list as JSON."""
    if isinstance(prompt, str):
        return prompt
    return json.dumps(prompt, ensure_ascii=False)


def check_prompt(prompt: object) -> Prompt:
    """The prompt itself when it is a string or a list of message dicts that agents can be given (UTF-8 text,
    JSON); else AgentSpecError."""
    if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        if not prompt:
            raise AgentSpecError("a prompt that is a list of chat messages needs at least one message")
        for message in prompt:
            if not isinstance(message.get("role"), str) or not ("content" in message or "tool_calls" in message):
                raise AgentSpecError(f"a chat message needs a string 'role' and a 'content' (or 'tool_calls'), "
                                     f"not {json.dumps(message, default=str)[:200]}")
    elif not isinstance(prompt, str):
        raise AgentSpecError(f"a prompt is a string or a list of chat messages, not {type(prompt).__name__}")
    try:
        prompt_text(prompt).encode("utf-8")
    except (TypeError, ValueError) as exc:  # a value JSON cannot hold (bytes, a set), a lone surrogate
        raise AgentSpecError(f"a prompt must be text an agent can be given (JSON, UTF-8): {exc}") from exc
    return prompt


def template_fields(template: str) -> set[str]:
    """Placeholder names used in one template argument; AgentSpecError for unknown or positional ones."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise AgentSpecError(f"bad template {template!r}: {exc} (write {{{{ and }}}} for braces)") from exc
    names = {name for _, name, _, _ in parsed if name is not None}
    for name in names:
        if name not in PLACEHOLDERS:
            known = ", ".join("{" + p + "}" for p in sorted(PLACEHOLDERS))
            raise AgentSpecError(f"unknown placeholder {{{name}}} in {template!r}; known: {known}")
    return names


def render_argv(template: Sequence[str], values: Mapping[str, str]) -> list[str]:
    """Fill placeholders argument by argument: a prompt never splits into several arguments."""
    return [part.format_map(values) for part in template]


MAX_SECONDS = 1e9  # a setting in seconds: ~31 years; past it (or at infinity) Python's own waits overflow


@dataclass(frozen=True, kw_only=True)
class AgentSpec:
    """What every spec has: extra environment, and an optional check of the workdir after the agent ends."""
    env: Mapping[str, str] = field(default_factory=dict)
    check: Check = None
    check_timeout: float = 120.0

    def __post_init__(self) -> None:
        if (problem := env_problem(self.env)) is not None:
            raise AgentSpecError(f"env: {problem}")
        object.__setattr__(self, "env", MappingProxyType(dict(self.env)))
        if self.check is not None and not (callable(self.check) or isinstance(self.check, str)):
            raise AgentSpecError("check is a callable taking the workdir, or a shell command")
        timeout = self.check_timeout
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout <= MAX_SECONDS:
            raise AgentSpecError(f"check_timeout must be a number of seconds above 0 (at most {MAX_SECONDS:g}), "
                                 f"not {timeout!r}")

    def argv(self, ctx: LaunchContext) -> list[str]:
        raise NotImplementedError

    def stdin_bytes(self, ctx: LaunchContext) -> bytes | None:
        """What to feed the agent on stdin; None gives it an empty stdin (EOF)."""
        return None

    def extra_env(self) -> dict[str, str]:
        """Variables this kind of spec needs on top of ``env``."""
        return {}

    def describe(self) -> str:
        raise NotImplementedError

    def check_fits(self, prompt: Prompt, index: int) -> None:
        """AgentSpecError when this kind of agent cannot be given ``prompt`` (``index``: its place in the batch)."""

    def run_check(self, workdir: Path, stop: threading.Event | None = None) -> tuple[Any, str | None]:
        """(result, error) of the check on a finished agent's workdir; (None, None) without a check.

        Either kind is given up after ``check_timeout`` seconds, or once ``stop`` is set (the batch is being
        cancelled); see ``rollouttap.manager.checks``."""
        if self.check is None:
            return None, None
        if isinstance(self.check, str):
            return run_shell_check(self.check, workdir, self.check_timeout, stop)
        return run_callable_check(self.check, workdir, self.check_timeout, stop)


def absolute_paths(parts: Sequence[str], origin: Path, workdir: Path) -> tuple[str, ...]:
    """``parts`` with each relative path that has a directory part, names nothing in the agent's
    ``workdir`` and exists in ``origin`` made absolute (not resolved: a venv's python is a symlink).

    Every agent runs in a fresh working directory, so ``python examples/agent.py`` or ``.venv/bin/python``
    written where the spec was made would name nothing there; a path the workdir (a ``workdir_template``
    copy) does hold stays the agent's own. Bare names (``python``, ``agent.py``) are left to PATH and to the
    working directory."""
    out = []
    for part in parts:
        if ("/" in part and "{" not in part and not os.path.isabs(part)
                and not os.path.lexists(workdir / part) and os.path.lexists(origin / part)):
            part = os.path.abspath(origin / part)
        out.append(part)
    return tuple(out)


@dataclass(frozen=True, kw_only=True)
class CommandAgent(AgentSpec):
    """Any program: an argv template (a string is split like a shell would, without running one).

    Relative paths with a directory part that exist in ``origin`` (where the spec is made) and not in the
    agent's working directory are made absolute (see ``absolute_paths``)."""
    argv_template: str | Sequence[str] = field(kw_only=False)
    stdin: bool = False
    origin: Path = field(default_factory=Path.cwd)

    def __post_init__(self) -> None:
        super().__post_init__()
        template = self.argv_template
        if isinstance(template, str):
            try:
                template = shlex.split(template)
            except ValueError as exc:
                raise AgentSpecError(f"cannot split command {self.argv_template!r}: {exc}") from exc
        parts = tuple(template)
        if not parts or not all(isinstance(p, str) for p in parts):
            raise AgentSpecError("a command template is a non-empty list of strings")
        used = set().union(*(template_fields(part) for part in parts))
        if not self.stdin and not used & {"prompt", "prompt_file"}:
            log.warning("the agent command %s never receives the prompt: put {prompt} or {prompt_file} in it, "
                        "or pass it on stdin (stdin=True, --stdin)", shlex.join(parts))
        object.__setattr__(self, "argv_template", parts)

    def argv(self, ctx: LaunchContext) -> list[str]:
        return render_argv(absolute_paths(self.argv_template, self.origin, ctx.workdir), ctx.values)

    def check_fits(self, prompt: Prompt, index: int) -> None:
        """AgentSpecError when ``{prompt}`` cannot carry this prompt as a command-line argument."""
        text = prompt_text(prompt)
        for part in self.argv_template:
            if "prompt" not in template_fields(part):
                continue
            if "\0" in text:
                raise AgentSpecError(f"prompt {index} holds a NUL character, which no command-line argument can: "
                                     "pass it as {prompt_file} or on stdin (stdin=True, --stdin)")
            # Paths and ids are not known before launch: counted at a generous length.
            rendered = render_argv((part,), {"prompt": text, "prompt_file": "p" * 512, "workdir": "w" * 512,
                                             "agent_id": "a" * 128})[0]
            if len(rendered.encode("utf-8", "surrogatepass")) > MAX_ARG_BYTES:
                raise AgentSpecError(f"prompt {index} is {len(text.encode('utf-8'))} bytes, more than one "
                                     f"command-line argument holds on Linux ({MAX_ARG_BYTES + 1} with its end): "
                                     "pass it as {prompt_file} or on stdin (stdin=True, --stdin)")

    def stdin_bytes(self, ctx: LaunchContext) -> bytes | None:
        return prompt_text(ctx.prompt).encode("utf-8") if self.stdin else None

    def describe(self) -> str:
        return shlex.join(self.argv_template)


@dataclass(frozen=True, kw_only=True)
class EntryPointAgent(AgentSpec):
    """A Python function ``package.module:function(prompt)``, run in a fresh interpreter per agent.

    Its JSON-serialisable return value comes back in the result; an exception fails the agent. A function
    object is accepted too if it is importable by name (not a lambda, a local, or defined in ``__main__``).

    The agent imports what this process would: its interpreter gets first on ``sys.path`` the directory the
    module was imported from (unless it is site-packages), then this process's ``sys.path`` entries that are
    not this interpreter's own standard library or site-packages (the script's directory, entries the program
    added; ``''`` is this process's working directory), before or after its own as they stand here, much as
    multiprocessing's spawn does. Never the agent's working directory: a ``workdir_template`` copy holding a
    ``json.py`` or a package checkout would shadow what it imports. A module a fresh interpreter cannot import
    by its name (loaded with ``importlib.util.spec_from_file_location`` under another name) is refused here.
    """
    target: str | Callable[..., Any] = field(kw_only=False)
    python: str = sys.executable

    def __post_init__(self) -> None:
        super().__post_init__()
        name = self.target if isinstance(self.target, str) else _name_of(self.target)
        resolve_entry_point(name)
        object.__setattr__(self, "target", name)
        check_importable(self.module, self.python, {**self.env, **self.extra_env()})

    @property
    def module(self) -> str:
        return str(self.target).partition(":")[0]

    def argv(self, ctx: LaunchContext) -> list[str]:
        # -P: `-m` would put the working directory (the agent's workdir) first on sys.path. Every interpreter
        # that can run rollouttap has it (requires-python >= 3.12; -P came in 3.11).
        return [self.python, "-P", "-m", RUNNER_MODULE, str(self.target),
                "--prompt-file", str(ctx.prompt_json_file), "--result-file", str(ctx.result_file)]

    def extra_env(self) -> dict[str, str]:
        # Read at each launch: the program may add to sys.path after making the spec.
        installed = installation_dirs()
        front, back = parent_path(sys.path, os.getcwd(), installed)
        env = {PARENT_PATH_ENV: json.dumps({"front": front, "back": back})}
        # The child must import the module from where this process found it (e.g. a tests/ directory); not
        # from this interpreter's site-packages, which `python=` (another interpreter) must not get in front.
        root = module_root(self.module)
        if root is not None and not _under(str(root), installed):
            env[ENTRY_PATH_ENV] = str(root)
        return env

    def describe(self) -> str:
        return str(self.target)


def env_problem(env: object) -> str | None:
    """What makes ``env`` unfit for a process's environment (names and values must be strings: an int fails
    every agent at its start, not once), or None."""
    if not isinstance(env, Mapping):
        return f"a mapping of names to strings, not {type(env).__name__}"
    for name, value in env.items():
        if not isinstance(name, str) or not name or "=" in name or "\0" in name:
            return f"{name!r} is not a variable name"
        if not isinstance(value, str) or "\0" in value:
            return f"{name}={value!r}: values must be strings (without NUL)"
    return None


def resolve_entry_point(target: str) -> Callable[..., Any]:
    """The callable named ``module:attr[.attr]``; AgentSpecError when it cannot be imported or called."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise AgentSpecError(f"entry point {target!r} is not module:function")
    try:
        obj: Any = importlib.import_module(module_name)
    except (Exception, SystemExit) as exc:  # a module that exits at import must not end the caller's program
        raise AgentSpecError(f"cannot import {module_name!r} for entry point {target!r}: {exc!r}") from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise AgentSpecError(f"{module_name!r} has no attribute {attr!r}") from exc
    if not callable(obj):
        raise AgentSpecError(f"entry point {target!r} is not callable")
    return obj


def module_root(module_name: str) -> Path | None:
    """The sys.path directory a module was imported from (None for built-in or namespace modules, and for one
    whose file is not where its name leads: a finder of its own maps it, as an editable install's does)."""
    located = _located(module_name)
    return None if located is None else import_root(*located)


def _located(module_name: str) -> tuple[str, Path] | None:
    """(the name the module was imported by, its file); None for a module without a file."""
    module = sys.modules.get(module_name) or importlib.import_module(module_name)
    origin = getattr(module, "__file__", None)
    if not origin:
        return None
    spec = getattr(module, "__spec__", None)
    # Its own name: os.path is posixpath, found as such (the name a spec loaded from a file was given, too).
    name = spec.name if spec is not None and spec.name else module_name
    return name, Path(os.path.abspath(origin))  # not resolved: a symlinked file keeps the name it is imported by


# What the agent's interpreter imports for a module name, with the import path runner_entry will give it.
_FIND_ORIGIN = """
import importlib.util, os, sys
from rollouttap.manager.runner_entry import use_manager_path
use_manager_path()
spec = importlib.util.find_spec(sys.argv[1])
print(os.path.abspath(spec.origin) if spec is not None and spec.origin else "")
"""


def check_importable(module_name: str, python: str, env: Mapping[str, str]) -> None:
    """AgentSpecError unless the agent's interpreter (``python`` with ``env``) imports ``module_name`` from the
    file this process did. Only a module whose file is not where its name leads is asked about (a finder of its
    own: an editable install's, or one added at run time; or a name a file was loaded under), in a child process:
    this process's finders are not all the fresh interpreter's."""
    located = _located(module_name)
    if located is None or import_root(*located) is not None:
        return
    name, file = located
    try:
        out = subprocess.run([python, "-P", "-c", _FIND_ORIGIN, name], env={**os.environ, **env},
                             stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AgentSpecError(f"cannot ask {python} where it imports {name!r} from: {exc}") from exc
    found = out.stdout.strip() or "nowhere"
    if out.returncode != 0:
        found = f"nowhere ({(out.stderr.strip().splitlines() or ['it failed'])[-1]})"
    if found != str(file):
        raise AgentSpecError(f"module {module_name!r} was loaded from {file}, but a fresh {python} imports "
                             f"{name!r} from {found}: import it by its file's name from a directory on sys.path")


def import_root(name: str, file: Path) -> Path | None:
    """The directory from which importing module ``name`` finds ``file``; None when it would not."""
    stem, parts = file.name.partition(".")[0], name.split(".")
    if stem != "__init__":  # a package's __init__ stands for its directory
        if stem != parts[-1]:
            return None
        parts = parts[:-1]
    path = file.parent
    for part in reversed(parts):
        if path.name != part:
            return None
        path = path.parent
    return path


@functools.cache
def installation_dirs() -> tuple[str, ...]:
    """This interpreter's own import directories (standard library, site-packages, its zip): the agent's
    interpreter, maybe another one (``python=``), has its own."""
    dirs = set(site.getsitepackages()) | {site.getusersitepackages()}
    for prefixes in (None, {"base": sys.base_prefix, "platbase": sys.base_exec_prefix}):
        paths = sysconfig.get_paths(vars=prefixes)
        dirs |= {paths["purelib"], paths["platlib"], os.path.dirname(paths["stdlib"]),
                 os.path.dirname(paths["platstdlib"])}  # their parents: pythonXY.zip, dist-packages
    return tuple(sorted(os.path.abspath(d) for d in dirs))


def _under(path: str, dirs: Sequence[str]) -> bool:
    return any(path == d or path.startswith(d.rstrip(os.sep) + os.sep) for d in dirs)


def parent_path(path: Sequence[object], cwd: str, installed: Sequence[str]) -> tuple[list[str], list[str]]:
    """The entries of ``path`` (a sys.path) outside the ``installed`` directories, absolute (``''``: ``cwd``):
    (those before the first installed one, the rest), to go before and after the agent interpreter's own."""
    front: list[str] = []
    back: list[str] = []
    seen_installed = False
    for entry in path:
        if not isinstance(entry, str):
            continue
        entry = os.path.abspath(os.path.join(cwd, entry))
        if _under(entry, installed):
            seen_installed = True
        elif entry not in front and entry not in back:
            (back if seen_installed else front).append(entry)
    return front, back


def _name_of(func: Callable[..., Any]) -> str:
    module, qualname = getattr(func, "__module__", None), getattr(func, "__qualname__", "")
    if not qualname or not isinstance(qualname, str):  # a functools.partial, an instance with __call__
        raise AgentSpecError(f"{func!r} has no name a fresh process could import it by; define a function "
                             "at the top level of an importable module (it can call this one)")
    if not module or module == "__main__" or "<" in qualname:
        raise AgentSpecError(f"{func!r} cannot be imported by name in a fresh process; "
                             "define it at the top level of an importable module")
    return f"{module}:{qualname}"
