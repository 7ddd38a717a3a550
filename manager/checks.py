"""Running an agent's check on its workdir: a Python callable or a shell command, each within a timeout.

A check runs in the manager while the batch goes on, so whatever it does (hang, exit, print gigabytes, leave
a background job) must end as a result for that one agent: never hang, kill or bloat the manager.
"""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rollouttap.manager.launch import pidfd_of

TAIL_CHARS = 2000  # of a shell check's stdout and stderr, in its result
_TAIL_BYTES = TAIL_CHARS * 4  # enough bytes for that many characters of UTF-8
_POLL = 0.1  # seconds between looks at the stop event (only while a check runs)

CheckOutcome = tuple[Any, str | None]  # (result, error)


def _stopped(stop: threading.Event | None) -> bool:
    return stop is not None and stop.is_set()


def run_callable_check(check: Callable[[Path], Any], workdir: Path, timeout: float,
                       stop: threading.Event | None = None) -> CheckOutcome:
    """(result, error) of ``check(workdir)``, run on a thread of its own and waited for at most ``timeout``
    seconds (or until ``stop`` is set).

    Python cannot kill a thread: a check that overruns is left running as a daemon thread (it ends with the
    process), and its agent's result says it timed out. SystemExit (a CLI's main() used as the check) is that
    agent's check error; KeyboardInterrupt raised by the check is raised here, in the caller's thread."""
    box: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            box["outcome"] = (check(workdir), None)
        except (Exception, SystemExit) as exc:  # a broken check is reported with the agent, never fails the batch
            box["outcome"] = (None, f"{type(exc).__name__}: {exc}")
        except BaseException as exc:  # KeyboardInterrupt: the caller's to handle
            box["raise"] = exc
        finally:
            done.set()

    threading.Thread(target=run, name="rollouttap-check", daemon=True).start()
    deadline = time.monotonic() + timeout
    while not done.wait(max(0.0, min(_POLL, deadline - time.monotonic()))):
        if _stopped(stop):
            return None, "check stopped: the batch was cancelled (its thread is left running)"
        if time.monotonic() >= deadline:
            name = getattr(check, "__qualname__", repr(check))
            return None, f"check timed out after {timeout:g}s: {name} (its thread is left running)"
    if "raise" in box:
        raise box["raise"]
    return box["outcome"]


def run_shell_check(command: str, workdir: Path, timeout: float,
                    stop: threading.Event | None = None) -> CheckOutcome:
    """Run ``command`` with sh in the workdir: {"passed", "exit_code", "stdout_tail", "stderr_tail"}.

    The check's process group is killed as soon as its shell exits (a background job it started does not
    outlive it, nor keep its output pipe open), at the timeout, or when ``stop`` is set. Only the tails of its
    output are kept, read as it comes."""
    proc = subprocess.Popen(["sh", "-c", command], cwd=workdir, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    assert proc.stdout is not None and proc.stderr is not None
    out, err = bytearray(), bytearray()
    tails = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
    try:
        ended = _read_until_exit(proc, tails, time.monotonic() + timeout, stop)
    finally:
        # While the exited shell is not reaped its pid still names the group: no other process can hold it.
        _kill_group(proc.pid)
        _drain(tails)
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    if ended == "timeout":
        return None, f"check timed out after {timeout:g}s: {command}"
    if ended == "cancelled":
        return None, f"check stopped: the batch was cancelled: {command}"
    return {"passed": proc.returncode == 0, "exit_code": proc.returncode,
            "stdout_tail": out.decode("utf-8", "replace")[-TAIL_CHARS:],
            "stderr_tail": err.decode("utf-8", "replace")[-TAIL_CHARS:]}, None


def _read_until_exit(proc: subprocess.Popen[bytes], tails: dict[int, bytearray], deadline: float,
                     stop: threading.Event | None) -> str:
    """Read the check's output until its shell exits (``exited``, the shell left unreaped), the deadline
    (``timeout``) or ``stop`` (``cancelled``)."""
    pidfd = pidfd_of(proc.pid)
    with selectors.DefaultSelector() as selector:
        for fd in tails:
            os.set_blocking(fd, False)
            selector.register(fd, selectors.EVENT_READ)
        if pidfd is not None:  # wakes the wait as the shell exits; without one, _POLL bounds the delay
            selector.register(pidfd, selectors.EVENT_READ)
        try:
            while True:
                if _exited(proc.pid):
                    return "exited"
                if _stopped(stop):
                    return "cancelled"
                left = deadline - time.monotonic()
                if left <= 0:
                    return "timeout"
                for key, _ in selector.select(min(_POLL, left)):
                    if key.fd in tails and _read_into(key.fd, tails[key.fd]) is False:
                        selector.unregister(key.fd)  # its end: every writer closed it
        finally:
            if pidfd is not None:
                os.close(pidfd)


def _read_into(fd: int, tail: bytearray) -> bool | None:
    """Read what is there into ``tail`` (only its last bytes kept): True if something was read, None if
    nothing is there now, False at the end of the stream."""
    try:
        chunk = os.read(fd, 64 * 1024)
    except BlockingIOError:
        return None
    tail += chunk
    del tail[:-_TAIL_BYTES]
    return bool(chunk)


def _drain(tails: dict[int, bytearray]) -> None:
    """Read what the killed group left in its pipes, without waiting for more."""
    for fd, tail in tails.items():
        try:
            while _read_into(fd, tail):
                pass
        except OSError:
            continue


def _exited(pid: int) -> bool:
    """Whether the process has exited, leaving it unreaped (its pid keeps naming its process group)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
