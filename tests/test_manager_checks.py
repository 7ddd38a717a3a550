"""What an agent's output and its check may cost the manager: disk, memory, time, processes, the batch.

Each agent is a real process behind a real proxy; its checks run in this process, as the manager runs them.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from conftest import wait_for
from rollouttap.manager import AgentManager, CommandAgent, EntryPointAgent
from rollouttap.manager.output import OUTPUT_KEEP_BYTES, CappedOutput, cut_marker


def shell_agent(**kwargs) -> CommandAgent:
    return CommandAgent(["sh", "-c", "{prompt}"], **kwargs)


def manager(spec, tmp_path: Path, confdir: Path, **kwargs) -> AgentManager:
    return AgentManager(spec, store=tmp_path / "runs.db", confdir=confdir, **{"timeout": 30, **kwargs})


def entry_leaves_a_thread(prompt: str) -> str:
    """An entry point that returns while a non-daemon thread of its own still runs."""
    threading.Thread(target=time.sleep, args=(600,), daemon=False).start()
    return prompt


_TRAJECTORY: list = []  # a file an entry point keeps open for the interpreter's exit to flush and close


def entry_leaves_work_for_exit(prompt: str) -> str:
    """An entry point that leaves a buffered file and an atexit handler for the interpreter's normal end."""
    import atexit
    _TRAJECTORY.append(open("trajectory.log", "w"))  # noqa: SIM115 - closed at exit, on purpose
    _TRAJECTORY[0].write(prompt)
    atexit.register(Path("atexit.log").write_text, prompt)
    return prompt


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# -- agent output -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [0, 7, 10, 20, 21, 100])
def test_capped_output_keeps_the_first_and_last_bytes(tmp_path, size):
    data = (b"0123456789abcdef" * 10)[:size]
    out = CappedOutput(tmp_path / "out", keep=10)
    for at in range(0, size, 3):  # several chunks, one per read or not
        os.write(out.write_fd, data[at:at + 3])
    dropped = out.finish(5)
    assert dropped == max(0, size - 20)
    kept = data if not dropped else data[:10] + cut_marker(dropped) + data[-10:]
    assert (tmp_path / "out").read_bytes() == kept


def test_endless_output_keeps_only_its_head_and_tail_on_disk(tmp_path, confdir):
    total = 6 * OUTPUT_KEEP_BYTES
    prompt = f"echo FIRST; head -c {total} /dev/zero | tr '\\0' x; echo LAST; echo ERR >&2"
    with manager(shell_agent(), tmp_path, confdir, keep_workdirs=True) as m:
        [result] = m.deploy([prompt])
    run_dir = Path(result.workdir).parent
    try:
        data = (run_dir / "stdout.log").read_bytes()
    finally:
        shutil.rmtree(run_dir)
    cut = len("FIRST\n") + total + len("LAST\n") - 2 * OUTPUT_KEEP_BYTES
    assert len(data) == 2 * OUTPUT_KEEP_BYTES + len(cut_marker(cut))
    assert data.startswith(b"FIRST\nxxx") and data.endswith(b"xxxLAST\n") and cut_marker(cut) in data
    assert result.status == "ok" and result.output_cut == {"stdout": cut}
    assert result.stdout_tail.endswith("xxxLAST\n") and result.stderr_tail == "ERR\n"
    assert result.to_dict()["output_cut"] == {"stdout": cut}


def test_an_entry_point_that_leaves_a_thread_running_ends_when_it_returns(tmp_path, confdir):
    with manager(EntryPointAgent(entry_leaves_a_thread), tmp_path, confdir, timeout=10) as m:
        [result] = m.deploy(["done"])
    assert (result.status, result.return_value, result.error) == ("ok", "done", None)


def test_an_entry_point_without_threads_left_ends_as_a_program_does(tmp_path, confdir):
    def check(workdir: Path) -> dict:
        return {name: (workdir / name).read_text() for name in ("trajectory.log", "atexit.log")}
    with manager(EntryPointAgent(entry_leaves_work_for_exit, check=check), tmp_path, confdir) as m:
        [result] = m.deploy(["kept"])
    assert result.status == "ok" and result.check_result == {"trajectory.log": "kept", "atexit.log": "kept"}


# -- Python checks ------------------------------------------------------------------------------------------
def test_a_check_that_exits_fails_only_its_own_agents_check(tmp_path, confdir):
    def check(workdir: Path) -> str:
        if (workdir / "exit").exists():
            sys.exit(2)  # as a CLI's main() used as the check does
        return "fine"
    with manager(shell_agent(check=check), tmp_path, confdir, parallel=2) as m:
        results = m.deploy(["touch exit", "true"])
    assert [(r.status, r.check_result, r.check_error) for r in results] == [
        ("ok", None, "SystemExit: 2"), ("ok", "fine", None)]


def test_a_check_raising_keyboard_interrupt_raises_it_in_the_caller(tmp_path):
    def check(workdir: Path) -> None:
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        shell_agent(check=check).run_check(tmp_path)


def test_a_hanging_check_times_out(tmp_path, confdir):
    release = threading.Event()
    spec = shell_agent(check=lambda workdir: release.wait(60), check_timeout=1)
    out: list = []
    try:
        with manager(spec, tmp_path, confdir) as m:
            threading.Thread(target=lambda: out.extend(m.deploy(["true"])), daemon=True).start()
            [result] = wait_for(lambda: out, 10, "the deploy to give up on its check")
    finally:
        release.set()
    assert result.status == "ok" and result.check_result is None
    assert result.check_error.startswith("check timed out after 1s: "), result.check_error


def test_cancel_ends_the_wait_for_a_hanging_check(tmp_path, confdir):
    release, entered = threading.Event(), threading.Event()

    def check(workdir: Path) -> None:
        entered.set()
        release.wait(60)
    m = manager(shell_agent(check=check, check_timeout=60), tmp_path, confdir, grace=1).start()
    out: list = []
    try:
        deploy = threading.Thread(target=lambda: out.extend(m.deploy(["true"])), daemon=True)
        deploy.start()
        wait_for(entered.is_set, 10, "the check to start")
        assert m.cancel(timeout=3)
        deploy.join(10)
    finally:
        release.set()
        m.close()
    [result] = out
    assert result.check_error.startswith("check stopped: the batch was cancelled"), result.check_error


# -- shell checks -------------------------------------------------------------------------------------------
def test_a_shell_checks_background_job_ends_with_it(tmp_path, confdir):
    with manager(shell_agent(check="sleep 30 >/dev/null 2>&1 & echo $!"), tmp_path, confdir) as m:
        [result] = m.deploy(["true"])
    pid = int(result.check_result["stdout_tail"])
    try:
        wait_for(lambda: _gone(pid), 5, "the check's background job to end")
    finally:
        if not _gone(pid):
            os.kill(pid, signal.SIGKILL)


def test_a_shell_check_ends_with_its_shell_not_with_its_pipe(tmp_path, confdir):
    # The background job holds the check's stdout: waiting for that pipe to close would wait for the job.
    with manager(shell_agent(check="sleep 10 & echo checked", check_timeout=60), tmp_path, confdir) as m:
        started = time.monotonic()
        [result] = m.deploy(["true"])
        took = time.monotonic() - started
    assert result.check_result == {"passed": True, "exit_code": 0, "stdout_tail": "checked\n", "stderr_tail": ""}
    assert took < 5


def test_a_shell_check_printing_much_keeps_only_its_tail_in_memory(tmp_path):
    # VmHWM, not ru_maxrss: that one keeps the RSS of the process before exec, a fork of this large pytest.
    code = ("import re, sys; from pathlib import Path; from rollouttap.manager import CommandAgent; "
            "spec = CommandAgent(['true', '{prompt}'], check='head -c 200000000 /dev/zero; echo END'); "
            "result, error = spec.run_check(Path(sys.argv[1])); "
            "hwm = int(re.search(r'VmHWM:\\s+(\\d+)', Path('/proc/self/status').read_text()).group(1)); "
            "print(repr(result['stdout_tail'][-4:]), hwm // 1024)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    tail, peak_mib = out.stdout.split()
    assert tail == "'END\\n'" and int(peak_mib) < 100, out.stdout


def test_output_that_cannot_be_kept_never_stops_the_agents_stream():
    # A full disk: the agent's writes must go on (it died of SIGPIPE), and finishing must not raise.
    output = CappedOutput(Path("/dev/full"), keep=1024)
    writer = subprocess.Popen(["sh", "-c", "head -c 300000 /dev/zero; echo done >&2"], stdout=output.write_fd,
                              stderr=subprocess.PIPE)
    output.close_write_end()
    _, err = writer.communicate(timeout=30)
    assert writer.returncode == 0 and err == b"done\n"
    output.finish(5)
    assert output.write_error is not None and "No space left" in output.write_error
