"""Re-running an agent offline against its recorded answers, and re-sending its model requests elsewhere.

``replay_agent`` starts a proxy that records into a replay store (capture addon) and answers every request from
the recording (``rollouttap.addon.replay``), runs the agent command through it, and reports the first request
that diverged. ``resend_requests`` sends recorded model requests to another server to compare the answers.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shlex
import signal
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import requests

from rollouttap.addon.injection import ENDPOINT_SUFFIXES, endpoint_for_path  # pure: no mitmproxy
from rollouttap.errors import ConfigError, NotFoundError, ProxyError, StoreError
from rollouttap.manager.conversation import call_from_flow, flow_kind
from rollouttap.manager.export import SIDE_FILES, same_file
from rollouttap.manager.inspect import answer_text
from rollouttap.manager.proxy import ProxyConfig, ProxyProcess
from rollouttap.store import AgentRecord, FlowRecord, Store, is_redacted, is_secret_name, map_secret_query, new_token
from rollouttap.store.redact import redact_command

log = logging.getLogger(__name__)

DIVERGED_STATUS = 599  # what the replay proxy answers from the divergence on (see addon/replay.py)
# Secret headers are stored redacted (a fingerprint, not the key): sending one would be a bogus credential.
_NOT_FORWARDED = frozenset({"host", "content-length", "connection", "transfer-encoding", "accept-encoding"})

__all__ = [
    "DIVERGED_STATUS", "ReplayProxyConfig", "ReplayResult", "Resent", "default_replay_store", "model_hosts_of",
    "replay_agent", "replay_script", "resend_requests", "target_url",
]


def replay_script() -> Path:
    """Path of the replay addon file ``mitmdump -s`` loads (found without importing mitmproxy here)."""
    spec = importlib.util.find_spec("rollouttap.addon.replay")
    if spec is None or spec.origin is None:
        raise ProxyError("rollouttap.addon.replay is not installed")
    return Path(spec.origin)


@dataclass
class ReplayProxyConfig(ProxyConfig):
    """A capture proxy that also loads the replay addon, answering from ``replay_store``'s ``replay_agent``."""
    replay_store: Path = Path()
    replay_agent: str = ""
    replay_report: Path = Path()

    def argv(self, proxy_id: str) -> list[str]:
        # Scripts run in command-line order: capture sees (and records) each request before replay answers it.
        return super().argv(proxy_id) + [
            "-s", str(replay_script()),
            "--set", f"rollouttap_replay_store={self.replay_store}",
            "--set", f"rollouttap_replay_agent={self.replay_agent}",
            "--set", f"rollouttap_replay_report={self.replay_report}",
        ]


@dataclass(frozen=True)
class ReplayResult:
    """How a replay went. ``divergence`` holds the addon's report (index, reason, unified diff) or None."""
    agent_id: str
    replay_agent_id: str
    run_id: str
    store: Path
    exit_code: int | None
    recorded: int
    requests: int
    answered: int
    divergence: dict[str, Any] | None
    timed_out: bool = False
    stdout: str | None = None
    stderr: str | None = None
    recorded_exit_code: int | None = None  # how the recorded agent's process ended, where the store says
    recorded_status: str | None = None  # its status there (ok, failed, timeout, error); None: not registered
    # Recorded requests the agent made again whose answer could not be given back (answered 502: a body kept in
    # part, a flow still in flight when read, one the agent hung up on)
    unreplayable: tuple[int, ...] = ()

    @property
    def ok(self) -> bool:
        """The agent made exactly the recorded requests, got every recorded answer back, and exited 0."""
        return self.divergence is None and self.exit_code == 0 and not self.unreplayable

    @property
    def exit_status(self) -> int:
        """A process exit status for the replay: 1 on divergence, else the agent's (128 + signal if killed)."""
        if self.divergence is not None:
            return 1
        code = self.exit_code or 0
        return 128 - code if code < 0 else code


def default_replay_store(store: Path) -> Path:
    """Where a replay records by default: beside the recorded store."""
    return store.with_name(f"{store.stem}.replay.db")


def model_hosts_of(flows: Sequence[FlowRecord]) -> tuple[str, ...]:
    """``host:port`` of every server the recording asked for token ids, so the replay proxy asks again."""
    hosts = {f"{f.host}:{f.port}" for f in flows if f.meta.get("injected") and f.host and f.port}
    return tuple(sorted(hosts))


def recorded_base_url(flows: Sequence[FlowRecord]) -> str | None:
    """The OpenAI base URL the recorded agent's first model call went to (``http://h:8000/v1``), as
    ``AgentManager`` gave it through OPENAI_BASE_URL; None where it called none, or called a hard-wired endpoint
    that a route sent on (it was given no base URL: its calls went where it addressed them)."""
    for flow in flows:
        if flow_kind(flow) == "other" or not flow.url:
            continue
        if flow.meta.get("routed_from"):
            return None
        parts = urlsplit(flow.url)
        path, endpoint = parts.path.rstrip("/"), endpoint_for_path(parts.path)
        if endpoint is not None:
            return f"{parts.scheme}://{parts.netloc}{path[:-len(ENDPOINT_SUFFIXES[endpoint])]}"
    return None


def replay_model_env(flows: Sequence[FlowRecord], base: Mapping[str, str]) -> dict[str, str]:
    """What the replayed agent's environment lacks of what ``AgentManager`` gives a recorded agent: its
    OPENAI_BASE_URL (and OPENAI_API_BASE) at the server the recording called, and a placeholder OPENAI_API_KEY
    (the replay proxy answers; no server checks it). Nothing the caller's environment sets is changed."""
    url = recorded_base_url(flows)
    if url is None or base.get("OPENAI_BASE_URL") or base.get("OPENAI_API_BASE"):
        return {}
    return {"OPENAI_BASE_URL": url, "OPENAI_API_BASE": url,
            **({} if base.get("OPENAI_API_KEY") else {"OPENAI_API_KEY": "sk-rollouttap-replay"})}


def logprobs_of(flows: Sequence[FlowRecord]) -> bool:
    """Whether the recording proxy asked for logprobs (``rollouttap_logprobs``), so the replay proxy asks the same:
    off where it injected token ids and never logprobs. (An agent that asked for its own is asked for nothing.)"""
    injected = [f.meta["injected"] for f in flows if f.meta.get("injected")]
    return not injected or any("logprobs" in fields for fields in injected)


def _read_report(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _wait_ready(proxy: ProxyProcess, report: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (_read_report(report) or {}).get("state") != "ready":
        if not proxy.alive():
            raise ProxyError(f"the replay proxy exited:\n{proxy.log_tail()}")
        if time.monotonic() > deadline:
            raise ProxyError(f"the replay addon did not load its recording:\n{proxy.log_tail()}")
        time.sleep(0.02)


def _recorded(store: Path, agent_id: str) -> tuple[list[FlowRecord], AgentRecord | None]:
    """The agent's flows and its record. A registered agent that made no request replays too (every request
    of the replay then diverges); an agent the store does not know is not found."""
    with Store(store, readonly=True) as recorded:
        flows, agent = recorded.flows(agent_id=agent_id), recorded.agent(agent_id)
    if not flows and agent is None:
        raise NotFoundError(f"no agent {agent_id!r} in {store}")
    return flows, agent


def _register_replay(out: Path, replay_id: str, token: str, run_id: str, meta: dict[str, Any]) -> None:
    try:
        with Store(out) as replay_store:
            replay_store.register_agent(replay_id, token=token, run_id=run_id, meta=meta)
    except StoreError as exc:  # a directory, another database, a read-only place: the option to change is --out
        raise ConfigError(f"cannot record the replay into {out} (--out): {exc}") from exc


def replay_agent(store: str | Path, agent_id: str, command: Sequence[str], *, out: str | Path | None = None,
                 confdir: Path | None = None, model_hosts: Sequence[str] | None = None,
                 routes: Sequence[str] = (), env: Mapping[str, str] | None = None, cwd: str | Path | None = None,
                 timeout: float | None = 600.0, capture_output: bool = False) -> ReplayResult:
    """Run ``command`` against the recorded answers of ``agent_id``; the run is recorded into ``out``."""
    if not command:
        raise ConfigError("replay needs the agent command after --")
    store = Path(store).resolve()
    out_path = Path(out).resolve() if out is not None else default_replay_store(store)
    if out_path == store or same_file(out_path, store):
        raise ConfigError("the replay must record into another store than the one it replays")
    if out_path.name.endswith(SIDE_FILES):  # SQLite's own file beside a store: it deletes or rewrites it at will
        raise ConfigError(f"--out {out_path} is named like a file SQLite keeps beside a store; give a store file, "
                          f"e.g. {out_path.with_name('replay.db')}")
    if out_path.is_dir():
        raise ConfigError(f"--out {out_path} is a directory: give a store file, e.g. {out_path / 'replay.db'}")
    flows, recorded_agent = _recorded(store, agent_id)
    hosts = tuple(model_hosts) if model_hosts is not None else model_hosts_of(flows)
    run_id = "replay-" + uuid.uuid4().hex[:12]
    replay_id, token = f"{agent_id}.{run_id}", new_token()
    report = out_path.with_name(f"{out_path.name}.{run_id}.json")
    # The command line redacted as `rollouttap run` records its agents': it may carry keys (`env KEY=...`).
    _register_replay(out_path, replay_id, token, run_id, {
        "replay_of": agent_id, "source_store": str(store), "command": redact_command(shlex.join(command))})
    config = ReplayProxyConfig(store=out_path, confdir=confdir, model_hosts=hosts, routes=tuple(routes),
                               logprobs=logprobs_of(flows),
                               replay_store=store, replay_agent=agent_id, replay_report=report)
    try:
        with ProxyProcess(config) as proxy:
            _wait_ready(proxy, report, timeout=30.0)
            base = dict(os.environ if env is None else env)
            base.pop("ROLLOUTTAP_AGENT_ID", None)
            if given := replay_model_env(flows, base):
                urls = ", ".join(f"{k}={v}" for k, v in given.items() if k != "OPENAI_API_KEY")
                log.info("replay: the agent gets %s from the recording%s", urls,
                         " and a placeholder OPENAI_API_KEY" if "OPENAI_API_KEY" in given else "")
                base.update(given)
            completed, timed_out = _run(command, {**base, **proxy.env(replay_id, token)}, cwd, timeout,
                                        capture_output, out_path, replay_id)
        final = _read_report(report) or {}  # the addon writes its final report as the proxy stops
    finally:
        report.unlink(missing_ok=True)
    if final.get("state") != "done":
        raise ProxyError("the replay proxy stopped without its final report")
    result = ReplayResult(agent_id, replay_id, run_id, out_path, completed.returncode, final["recorded"],
                          final["requests"], final["answered"], final["divergence"], timed_out,
                          completed.stdout, completed.stderr, *_recorded_end(recorded_agent),
                          tuple(final.get("unreplayable", ())))
    _record_outcome(out_path, result)
    return result


def _recorded_end(agent: AgentRecord | None) -> tuple[int | None, str | None]:
    """(exit code, status) of the recorded agent, to set beside the replayed one's."""
    if agent is None:
        return None, None
    code = agent.meta.get("exit_code")
    return (code if isinstance(code, int) else None), agent.status


def _run(command: Sequence[str], env: dict[str, str], cwd: str | Path | None, timeout: float | None,
         capture_output: bool, store: Path, replay_id: str) -> tuple[subprocess.CompletedProcess[str], bool]:
    pipe = subprocess.PIPE if capture_output else None
    # Its own session: a timeout (or Ctrl-C here) ends the agent's children too, which could otherwise hold
    # the captured pipes open.
    proc = subprocess.Popen(list(command), env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=pipe, stderr=pipe,
                            text=True, start_new_session=True)
    with Store(store) as replay_store:
        replay_store.agent_started(replay_id, proc.pid)
    timed_out = False
    stdout: str | None
    stderr: str | None
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        log.warning("replayed agent timed out after %ss", timeout)
        stdout, stderr = _kill_session(proc)
    except BaseException:
        _kill_session(proc)
        raise
    return subprocess.CompletedProcess(list(command), proc.returncode, stdout, stderr), timed_out


def _kill_session(proc: subprocess.Popen[str]) -> tuple[str | None, str | None]:
    """Kill the agent's whole session; what it wrote so far (pipes a stray process keeps open are left)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        return proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        proc.wait()
        return None, None


def _record_outcome(store: Path, result: ReplayResult) -> None:
    status = "timeout" if result.timed_out else "ok" if result.ok else "failed"
    with Store(store) as replay_store:
        replay_store.agent_ended(result.replay_agent_id, status, {
            "exit_code": result.exit_code, "diverged": result.divergence is not None,
            "divergence_index": (result.divergence or {}).get("index"),
            "unreplayable": list(result.unreplayable)})  # requests whose recorded answer could not be given back


# -- resend -----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Resent:
    """One recorded model request sent again: the recorded answer beside the new one."""
    index: int
    flow_id: str
    method: str
    path: str
    url: str
    old_status: int | None
    new_status: int | None
    old_answer: str
    new_answer: str
    old_latency: float | None
    new_latency: float | None
    error: str | None = None
    new_body: dict[str, Any] | None = field(default=None, repr=False)


def target_url(base: str, path: str) -> str:
    """``base`` (a server URL, optionally with a path prefix such as ``/v1``) joined with a recorded path."""
    parts = urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"--to {base!r} is not an http(s) URL")
    prefix = parts.path.rstrip("/")
    if prefix and (path == prefix or path.startswith(prefix + "/")):
        prefix = ""  # the recorded path already carries it
    return f"{parts.scheme}://{parts.netloc}{prefix}{path}"


def _answer_of(flow: FlowRecord) -> str:
    call = call_from_flow(flow)
    return answer_text(call) if call is not None else flow.response_text()[:200]


def _forwarded_headers(flow: FlowRecord, extra: Mapping[str, str]) -> dict[str, str]:
    headers = {k: v for k, v in flow.request_headers  # is_redacted: stores redacted under older rules
               if k.lower() not in _NOT_FORWARDED and not is_secret_name(k) and not is_redacted(v)}
    headers.update(extra)
    return headers


def _resend_one(index: int, flow: FlowRecord, url: str, headers: Mapping[str, str], timeout: float,
                session: requests.Session) -> Resent:
    old = Resent(index, flow.flow_id, flow.method or "POST", flow.path or "/", url, flow.status_code, None,
                 _answer_of(flow), "", (flow.t_end - flow.t_request) if flow.t_end and flow.t_request else None, None)
    if cut := flow.meta.get("request_body_cut"):  # sending its first part would ask another question
        return replace(old, error=f"not sent: its request body was kept only in part ({cut.get('kept')} of "
                                  f"{cut.get('size')} bytes)")
    start = time.monotonic()
    try:
        resp = session.request(old.method, url, data=flow.request_body or b"", timeout=timeout,
                               headers=_forwarded_headers(flow, headers))
    except requests.RequestException as exc:
        return replace(old, error=f"{type(exc).__name__}: {exc}")
    latency = time.monotonic() - start
    # Read the new answer with the same code as the recorded one: a flow record holding the new response.
    # requests already undid any content-encoding, so the header goes.
    new_headers = [(k, v) for k, v in resp.headers.items() if k.lower() != "content-encoding"]
    fresh = replace(flow, status_code=resp.status_code, response_headers=new_headers, response_body=resp.content,
                    state="done", error=None, streamed="text/event-stream" in resp.headers.get("content-type", ""))
    body = fresh.response_json()
    return replace(old, new_status=resp.status_code, new_answer=_answer_of(fresh), new_latency=latency,
                   new_body=body if isinstance(body, dict) else None)


ModelKind = Literal["chat", "completion", "responses"]


def resend_requests(flows: Sequence[FlowRecord], to: str, *, headers: Mapping[str, str] | None = None,
                    timeout: float = 120.0, kinds: Sequence[ModelKind] = ("chat", "completion", "responses"),
                    ) -> list[Resent]:
    """Send each recorded model request (body as the agent sent it) to ``to`` and read both answers."""
    chosen = [f for f in flows if flow_kind(f) in kinds and f.request_body]
    with requests.Session() as session:
        session.trust_env = False  # straight to the given server, never through a proxy from the environment
        # Secret query values are stored as fingerprints: sending one would be a bogus key, so it goes.
        return [_resend_one(i, f, target_url(to, map_secret_query(f.path or "/", lambda _v: None)), headers or {},
                            timeout, session) for i, f in enumerate(chosen)]
