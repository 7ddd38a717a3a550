"""Child-process runner for entry-point agents: one fresh interpreter per agent, never a reused worker.

Usage: ``python -m rollouttap.manager.runner_entry module:function --prompt-file F --result-file R``.
Reads the prompt (JSON) from F, calls the function (awaiting it if it is a coroutine function), and writes
``{"ok": true, "value": ...}`` or ``{"ok": false, "error": ..., "traceback": ...}`` to R. Exit code 0 on
success, 1 when the function raised or returned something JSON cannot hold; threads the function left
running end with it.
"""

from __future__ import annotations

import argparse
import atexit
import asyncio
import importlib
import inspect
import json
import os
import sys
import threading
import traceback
from pathlib import Path
from typing import Any

ENTRY_PATH_ENV = "ROLLOUTTAP_ENTRY_PATH"  # the directory the manager imported the entry point's module from
PARENT_PATH_ENV = "ROLLOUTTAP_PARENT_PATH"  # the manager's own sys.path entries: {"front": [...], "back": [...]}


def load(target: str) -> Any:
    """The object named ``module:attr[.attr]``."""
    module_name, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def call(func: Any, prompt: Any) -> Any:
    """Call the entry point; a coroutine it returns is run to completion."""
    value = func(prompt)
    if inspect.iscoroutine(value):
        value = asyncio.run(value)
    return value


def outcome(target: str, prompt: Any) -> dict[str, Any]:
    """Run the entry point and describe what happened as a JSON-ready dict."""
    try:
        value = call(load(target), prompt)
    except BaseException as exc:  # the agent's own failure, SystemExit included, is the result
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    try:
        json.dumps(value)
    except (TypeError, ValueError) as exc:
        return {"ok": False, "error": f"return value is not JSON-serialisable: {exc}", "traceback": None}
    return {"ok": True, "value": value}


def import_path(own: list[str], root: str | None, front: list[str], back: list[str]) -> list[str]:
    """sys.path for the entry point: its root, the manager's entries that stood before its interpreter's
    own, this interpreter's own, the manager's others; each directory once, where it first comes."""
    out: list[str] = []
    for entry in ([root] if root else []) + front + own + back:
        if entry not in out:
            out.append(entry)
    return out


def use_manager_path() -> None:
    """sys.path as the manager asks for it (ENTRY_PATH_ENV, PARENT_PATH_ENV); also what its spec check runs."""
    parent = json.loads(os.environ.get(PARENT_PATH_ENV) or "{}")
    sys.path[:] = import_path(sys.path, os.environ.get(ENTRY_PATH_ENV), parent.get("front", []),
                              parent.get("back", []))


def write_atomically(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m " + __spec__.name if __spec__ else None)
    parser.add_argument("target", help="module:function")
    parser.add_argument("--prompt-file", type=Path, required=True)
    parser.add_argument("--result-file", type=Path, required=True)
    args = parser.parse_args(argv)
    use_manager_path()
    prompt = json.loads(args.prompt_file.read_text(encoding="utf-8"))
    result = outcome(args.target, prompt)
    if not result["ok"] and result.get("traceback"):
        sys.stderr.write(result["traceback"])
    write_atomically(args.result_file, result)
    return 0 if result["ok"] else 1


ATEXIT_WAIT_S = 10.0  # how long atexit handlers may run when a left thread keeps the interpreter from ending


def exit_now(code: int) -> None:
    """End the process once the result file is written: as any program ends (atexit handlers, buffered files
    flushed), unless a non-daemon thread the entry point left running would keep the interpreter (and so the
    agent) alive until the manager's timeout kills it and reports it timed out: then the atexit handlers run
    and the process ends at once (a file only that thread still writes keeps what reached it)."""
    if all(t.daemon or t is threading.main_thread() for t in threading.enumerate()):
        sys.exit(code)
    # A handler may wait for that very thread (multiprocessing joins its children): bounded, then on regardless.
    handlers = threading.Thread(target=atexit._run_exitfuncs, name="rollouttap-atexit", daemon=True)
    handlers.start()
    handlers.join(ATEXIT_WAIT_S)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed by the entry point, or its reader gone
            pass
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
