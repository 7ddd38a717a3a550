"""``rollouttap proxy`` as a user runs it: prints the environment, records, stops cleanly on Ctrl-C."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from conftest import run_client, settled_flows, start_proxy, wait_for
from rollouttap.errors import ConfigError
from rollouttap.manager.proxy import ProxyConfig, ProxyProcess, launch_env
from rollouttap.store import Store

ROLLOUTTAP = [sys.executable, "-m", "rollouttap.cli"]


def _read_exports(proc: subprocess.Popen) -> dict[str, str]:
    env: dict[str, str] = {}
    while "CURL_CA_BUNDLE" not in env:
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        key, _, value = line.removeprefix("export ").strip().partition("=")
        env[key] = shlex.split(value)[0] if value else ""
    return env


@pytest.mark.parametrize("launcher", ["fastdump", "mitmdump"])
def test_proxy_command_prints_env_records_and_stops_on_ctrl_c(tmp_path, confdir, upstream, launcher):
    store = tmp_path / "runs.db"
    proc = subprocess.Popen([*ROLLOUTTAP, "proxy", "--store", str(store), "--confdir", str(confdir),
                             "--model-host", upstream.url.split("://")[1], "--launcher", launcher,
                             "--set", "rollouttap_logprobs=false"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        exports = _read_exports(proc)
        assert exports["HTTP_PROXY"].startswith("http://127.0.0.1:")
        assert exports["NO_PROXY"] == "" and exports["no_proxy"] == ""
        assert Path(exports["SSL_CERT_FILE"]).is_file()
        env = {**os.environ, **exports, "ROLLOUTTAP_AGENT_ID": "cli-agent"}
        run_client("openai", upstream.base_url, env, "--calls", "3", "--stream")
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    with Store(store) as s:
        flows = s.flows(agent_id="cli-agent")
        assert len(flows) == 3 and all(f.state == "done" for f in flows)
        # --set took effect (no logprobs); a stream is asked for its usage
        assert all(f.meta["injected"] == {"return_token_ids": True, "stream_options": {"include_usage": True}}
                   for f in flows)
        assert s.proxies()[0]["stopped_at"] is not None


def test_proxy_command_says_how_its_mitmdump_ended_when_it_dies(tmp_path, confdir):
    store = tmp_path / "runs.db"
    proc = subprocess.Popen([*ROLLOUTTAP, "proxy", "--store", str(store), "--confdir", str(confdir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _read_exports(proc)
        with Store(store) as s:
            [row] = s.proxies()
        os.kill(row["pid"], signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1
    assert "mitmdump exited unexpectedly with status -9 (log " in err and "every flow is committed" not in err


def _signalled(proc: subprocess.Popen, signum: int, once: Callable[[], object]) -> tuple[str, str]:
    """Send ``signum`` to the command once ``once()`` returned; its output when it ended (killed if it did not)."""
    try:
        once()
        proc.send_signal(signum)
        return proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.parametrize("how", ["SIGINT, inherited as ignored", "SIGHUP"])
def test_proxy_command_stops_cleanly_on_a_ctrl_c_it_inherited_ignored_and_on_a_hangup(tmp_path, confdir, how):
    # A script that starts the command in the background hands it SIGINT ignored; a closed terminal sends SIGHUP.
    signum = signal.SIGINT if how.startswith("SIGINT") else signal.SIGHUP
    proc = subprocess.Popen([*ROLLOUTTAP, "proxy", "--store", str(tmp_path / "runs.db"), "--confdir", str(confdir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    _, err = _signalled(proc, signum, once=lambda: _read_exports(proc))
    assert proc.returncode == 0 and "every flow is committed" in err, err


def test_proxy_command_keeps_its_reverse_port_and_ends_what_a_killed_proxy_left_open(tmp_path, confdir):
    import sqlite3

    from rollouttap.manager.proxy import free_port
    store, free = tmp_path / "runs.db", free_port("127.0.0.1")
    argv = [*ROLLOUTTAP, "proxy", "--store", str(store), "--confdir", str(confdir),
            "--reverse", "http://127.0.0.1:9", "--reverse-port", str(free)]
    first = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _read_exports(first)
    with Store(store) as s:
        [row] = s.proxies()
    with sqlite3.connect(store) as db:  # a request in flight, as the proxy's writer opens it
        db.execute("INSERT INTO flows (flow_id, proxy_id, attribution, t_request) VALUES ('left-open', ?, 'none', 1)",
                   (row["proxy_id"],))
    os.kill(row["pid"], signal.SIGKILL)  # killed (OOM): it never ends its flows
    first.communicate(timeout=30)
    second = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _read_exports(second)
        with Store(store) as s:
            reverse = [x["port"] for p in s.proxies(alive_only=True) for x in p["listen"]
                       if x["mode"] == "reverse"]
            left = s.flow("left-open")
    finally:
        second.send_signal(signal.SIGINT)
        second.communicate(timeout=30)
    assert reverse == [free]  # where its agents' base URLs point, start after start
    assert left is not None and left.state == "error" and "proxy process ended" in (left.error or "")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_proxy_command_signalled_while_its_proxy_starts_leaves_no_proxy_running(tmp_path, confdir, signum):
    store = tmp_path / "runs.db"
    proc = subprocess.Popen([*ROLLOUTTAP, "proxy", "--store", str(store), "--confdir", str(confdir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def starting() -> None:
        wait_for(store.exists, what="the proxy starting (its store opened)")
    out, err = _signalled(proc, signum, once=starting)
    with Store(store) as s:
        alive = s.proxies(alive_only=True)
    assert proc.returncode == 130 and "export HTTP_PROXY" not in out, err
    assert alive == []


def test_a_reverse_port_without_a_reverse_url_is_refused_and_the_callers_signal_handlers_stay(tmp_path, capsys):
    from rollouttap.cli import main
    handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)]
    assert main(["proxy", "--store", str(tmp_path / "s.db"), "--reverse-port", "45678"]) == 1
    assert "--reverse-port 45678 needs --reverse" in capsys.readouterr().err
    assert main(["proxy", "--store", "/proc/no-such-dir/s.db"]) == 1  # it fails once its handlers are in place
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)] == handlers


def test_proxy_command_rejects_bad_listen(tmp_path):
    out = subprocess.run([*ROLLOUTTAP, "proxy", "--store", str(tmp_path / "r.db"), "--listen", "nope"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert "--listen 'nope' is not HOST:PORT" in out.stderr and "next:" in out.stderr


def test_proxy_command_rejects_a_set_without_a_value(tmp_path):
    out = subprocess.run([*ROLLOUTTAP, "proxy", "--store", str(tmp_path / "r.db"), "--set", "nope"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "--set 'nope' is not KEY=VALUE" in out.stderr


@pytest.mark.parametrize("listen, public, url, every, where", [
    ("0.0.0.0:0", None, "127.0.0.1", "every IPv4 address", "put this host's address in place of 127.0.0.1 below"),
    ("[::]:0", None, "127.0.0.1", "every address, IPv4 and IPv6",  # not IPv6 only, as asyncio binds "::"
     "put this host's address in place of 127.0.0.1 below"),
    ("0.0.0.0:0", "10.9.8.7", "10.9.8.7", "every IPv4 address", "use 10.9.8.7 as below"),
])
def test_proxy_command_on_every_address_says_what_remote_agents_use(tmp_path, confdir, listen, public, url, every,
                                                                     where):
    proc = subprocess.Popen([*ROLLOUTTAP, "proxy", "--store", str(tmp_path / "r.db"), "--confdir", str(confdir),
                             "--listen", listen, "--allow-remote", *(["--public-host", public] if public else [])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        exported = _read_exports(proc)["HTTP_PROXY"]
        assert exported.startswith(f"http://{url}:")  # agents are given an address they can connect to
        port = int(exported.rsplit(":", 1)[1])
        for family, loopback in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            if family == socket.AF_INET or listen.startswith("["):  # what it says it listens on takes a connection
                with socket.create_connection((loopback, port), timeout=10):
                    pass
    finally:
        proc.send_signal(signal.SIGINT)
        err = proc.communicate(timeout=30)[1]
    assert f"it listens on {every}: agents on other hosts {where}" in err
    assert f"--proxy {'http://' + public if public else 'http://ADDRESS'}:{port}` prints an agent's credentials" in err


def test_a_public_host_is_an_address_without_a_port(tmp_path):
    for bad in ("0.0.0.0", "::", "node:8080", "http://node", ""):
        with pytest.raises(ConfigError, match="public_host"):
            ProxyConfig(store=tmp_path / "r.db", public_host=bad)
    for good, url_host in (("10.0.0.5", "10.0.0.5"), ("node2.cluster", "node2.cluster"), ("[fd77::1]", "[fd77::1]"),
                           ("fd77::1", "[fd77::1]")):
        proc = ProxyProcess(ProxyConfig(store=tmp_path / "r.db", public_host=good))
        proc.listen = [{"mode": "regular", "port": 8080}, {"mode": "reverse", "port": 8081}]  # as if it listened
        assert (proc.url, proc.reverse_url) == (f"http://{url_host}:8080", f"http://{url_host}:8081")


@pytest.mark.parametrize("key, instead", [
    ("rollouttap_store", "use --store"), ("rollouttap_allow_remote", "use --allow-remote"),
    ("rollouttap_proxy_id", "it sets it for each proxy"), ("rollouttap_parent_pid", "it sets it for each proxy"),
    ("rollouttap_log_file", "it sets it for each proxy"),
])
def test_proxy_command_refuses_to_set_its_own_options(tmp_path, key, instead):
    out = subprocess.run([*ROLLOUTTAP, "proxy", "--store", str(tmp_path / "r.db"), "--set", f"{key}=x"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and f"--set {key} is the command's own: {instead}" in out.stderr


def test_proxy_command_rejects_an_unknown_launcher(tmp_path):
    out = subprocess.run([*ROLLOUTTAP, "proxy", "--store", str(tmp_path / "r.db"), "--launcher", "nope"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert "unknown launcher 'nope'" in out.stderr


def _sets(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]


def test_proxy_config_sets_each_scalar_option_once_extra_winning(tmp_path):
    # mitmdump hangs at start-up when a script option is --set twice with different values.
    config = ProxyConfig(store=tmp_path / "s.db", model_hosts=("a:1", "b:2"), pid_lookup="eager",
                         extra={"rollouttap_pid_lookup": "fallback", "rollouttap_token_ids": "false"})
    sets = _sets(config.argv("p1"))
    names = [s.split("=", 1)[0] for s in sets]
    scalars = [n for n in names if n != "rollouttap_model_hosts"]
    assert len(scalars) == len(set(scalars))
    assert "rollouttap_pid_lookup=fallback" in sets and "rollouttap_token_ids=false" in sets
    assert names.count("rollouttap_model_hosts") == 2  # list options: one --set per item


@pytest.mark.parametrize("launcher, expected", [("fastdump", ["-P", "-O", "-m", "rollouttap.addon.fastdump"]),
                                                 ("mitmdump", ["-P", "-c"])])
def test_proxy_config_launcher_picks_how_mitmdump_starts(tmp_path, launcher, expected):
    argv = ProxyConfig(store=tmp_path / "s.db", launcher=launcher).argv("p1")
    assert argv[1:1 + len(expected)] == expected


@pytest.mark.parametrize("launcher, environ, expected", [
    ("fastdump", {"PYTHONDONTWRITEBYTECODE": "1", "X": "y"}, {"X": "y", "PYTHONPYCACHEPREFIX": "CACHE/pycache"}),
    ("fastdump", {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONPYCACHEPREFIX": "/mine"}, {"PYTHONPYCACHEPREFIX": "/mine"}),
    ("fastdump", {"X": "y"}, {"X": "y"}),  # Python writes the -O bytecode where it always does
    ("mitmdump", {"PYTHONDONTWRITEBYTECODE": "1"}, {"PYTHONDONTWRITEBYTECODE": "1"}),  # pip's bytecode serves
])
def test_launch_env_gives_python_O_a_bytecode_cache(monkeypatch, tmp_path, launcher, environ, expected):
    monkeypatch.setenv("ROLLOUTTAP_CACHE", str(tmp_path))
    env = launch_env(launcher, environ)
    assert env == {k: v.replace("CACHE", str(tmp_path)) for k, v in expected.items()}


def test_a_proxy_without_bytecode_writing_caches_its_own(monkeypatch, tmp_path):
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    monkeypatch.setenv("ROLLOUTTAP_CACHE", str(tmp_path / "cache"))
    config = ProxyConfig(store=tmp_path / "s.db", confdir=tmp_path / "conf")
    with ProxyProcess(config).start(timeout=60) as proxy:
        assert proxy.alive()
    cached = [p.name for p in (tmp_path / "cache" / "pycache").rglob("*.opt-1.pyc")]
    assert any(name.startswith("addonmanager.") for name in cached)  # mitmproxy's, compiled once, kept


def test_proxy_config_refuses_an_unknown_launcher(tmp_path):
    with pytest.raises(ConfigError, match="unknown launcher 'mitmweb'"):
        ProxyConfig(store=tmp_path / "s.db", launcher="mitmweb")


@pytest.mark.parametrize("key", ["rollouttap_store", "rollouttap_proxy_id", "rollouttap_log_file"])
def test_proxy_config_refuses_extra_options_its_process_depends_on(tmp_path, key):
    # The store and id ProxyProcess waits on, the file it sends the output to: overridden, mitmdump would record
    # elsewhere or refuse to start, and start() would only time out.
    with pytest.raises(ConfigError, match=rf"extra\['{key}'\]"):
        ProxyConfig(store=tmp_path / "s.db", extra={key: str(tmp_path / "x")})


def test_proxy_starts_with_an_extra_option_overriding_a_field(tmp_path):
    config = ProxyConfig(store=tmp_path / "s.db", confdir=tmp_path / "conf",
                         extra={"rollouttap_logprobs": "false"})
    with ProxyProcess(config).start(timeout=60) as proxy:
        assert proxy.alive()


def test_entering_a_started_proxy_starts_no_second_one(tmp_path, confdir):
    proxy = ProxyProcess(ProxyConfig(store=tmp_path / "s.db", confdir=confdir)).start(timeout=60)
    first = proxy.proc
    with proxy as entered:
        assert entered.proc is first
    assert first.poll() is not None  # stopped with the block: nothing of it left running


def test_a_clean_stop_removes_an_empty_log_and_keeps_any_other(tmp_path, confdir):
    proxy = ProxyProcess(ProxyConfig(store=tmp_path / "s.db", confdir=confdir)).start(timeout=60)
    clean = proxy.log_path
    assert clean.exists()
    proxy.stop()
    assert not clean.exists()
    proxy.start(timeout=60)  # a new log for the new run
    with open(proxy.log_path, "a") as log:
        log.write("[00:00:00.000] Addon error: something a hook swallowed\n")
    logged = proxy.log_path
    proxy.stop()
    assert logged.exists()  # a log with something in it stays, clean stop or not
    logged.unlink()
    proxy.start(timeout=60)
    crashed = proxy.log_path
    assert crashed != clean and crashed.exists()
    os.killpg(proxy.proc.pid, signal.SIGKILL)
    proxy.proc.wait()
    proxy.stop()
    assert crashed.exists()  # kept for whoever looks into the crash
    crashed.unlink()


def test_a_manager_fills_the_reverse_target_of_a_config_that_pins_only_the_reverse_port(tmp_path):
    from rollouttap.manager.proxy_link import own_proxy_config
    store = (tmp_path / "s.db").resolve()
    config = own_proxy_config(ProxyConfig(store=store, reverse_port=45678), store_path=store,
                              model_url="http://127.0.0.1:8000/v1", base_url_mode=True, confdir=None)
    assert (config.reverse_target, config.reverse_port) == ("http://127.0.0.1:8000", 45678)


def test_an_agent_run_by_hand_gets_credentials_that_end_with_it(tmp_path, confdir, upstream):
    # An agent on another host is attributed by proxy credentials only: `agent start` registers one and prints
    # its environment, `agent end` voids it.
    store = tmp_path / "runs.db"
    with start_proxy(store, confdir) as proc:
        def cli(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([*ROLLOUTTAP, "agent", *args, "--store", str(store)], capture_output=True,
                                  text=True, timeout=60)

        def call(proxy_url: str) -> int:
            return requests.post(upstream.base_url + "/chat/completions", json={"model": "m", "messages": []},
                                 proxies={"http": proxy_url}, timeout=20).status_code

        started = cli("start", "--proxy", proc.url, "--id", "by-hand")
        assert started.returncode == 0, started.stderr
        env = dict(line.removeprefix("export ").split("=", 1) for line in started.stdout.splitlines())
        assert env["ROLLOUTTAP_AGENT_ID"] == "by-hand" and "by-hand:" in env["HTTP_PROXY"]
        assert call(env["HTTP_PROXY"]) == 200
        [flow] = settled_flows(store, agent_id="by-hand")
        assert flow.attribution == "credentials"
        # Its id as a tag, without its token, speaks for nobody: any process may carry any tag.
        posed = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-x", proc.url,
                                upstream.base_url + "/models"], capture_output=True, text=True, timeout=30,
                               env={**os.environ, "ROLLOUTTAP_AGENT_ID": "by-hand"})
        assert posed.stdout == "200"
        with Store(store) as opened:
            wait_for(lambda: len(opened.flows(state="done")) == 2, 10, "the tagged call's row")
            assert [f.agent_id for f in opened.flows()] == ["by-hand", None]
        again = cli("start", "--proxy", proc.url, "--id", "by-hand")
        assert again.returncode == 1 and "already in" in again.stderr
        assert cli("end", "by-hand").returncode == 0
        assert call(env["HTTP_PROXY"]) == 407
        assert "already ended" in cli("end", "by-hand").stderr
        elsewhere = cli("start", "--proxy", "http://127.0.0.1:9")
        assert elsewhere.returncode == 1 and "no running rollouttap proxy at http://127.0.0.1:9" in elsewhere.stderr
        with Store(store) as opened:  # a manager's agent ends with its processes, never by `agent end`
            opened.register_agent("managed", token="t0k3n", run_id="r1")
        assert "was not started by `rollouttap agent start`" in cli("end", "managed").stderr
        # Its tag names it while its root is not recorded yet (a busy store, say): it is starting.
        tagged = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-x", proc.url, upstream.base_url + "/models"],
                                capture_output=True, text=True, timeout=30,
                                env={**os.environ, "ROLLOUTTAP_AGENT_ID": "managed"})
        assert tagged.returncode == 0
        with Store(store) as opened:
            wait_for(lambda: len(opened.flows(state="done")) == 3, 10, "the starting agent's row")
            assert [f.agent_id for f in opened.flows()][-1] == "managed"
    with Store(store) as opened:
        assert opened.agent("by-hand").status == "ok" and opened.agent("managed").status == "registered"
    mistyped = subprocess.run([*ROLLOUTTAP, "agent", "start", "--proxy", "http://127.0.0.1:9", "--store",
                               str(tmp_path / "typo.db")], capture_output=True, text=True, timeout=60)
    assert mistyped.returncode == 1 and "no store at" in mistyped.stderr and not (tmp_path / "typo.db").exists()
