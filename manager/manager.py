"""AgentManager: one fresh agent process per prompt, behind the capture proxy, conversations out.

    with AgentManager(agent=CommandAgent("my-agent {prompt}"), store="runs.db", model_url=URL) as manager:
        results = manager.deploy(prompts)   # one AgentResult per prompt, in prompt order
"""

from __future__ import annotations

import functools
import json
import logging
import os
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed, wait
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from rollouttap.addon.fd_limit import raise_fd_limit  # pure: no mitmproxy
from rollouttap.errors import AgentSpecError, ConfigError, StoreError
from rollouttap.manager import launch
from rollouttap.manager.agents import (
    MAX_SECONDS, AgentSpec, EntryPointAgent, LaunchContext, Prompt, check_prompt, env_problem, prompt_text,
)
from rollouttap.manager.bypass import BypassConnection, BypassDetector, merge, model_targets
from rollouttap.manager.deploy_reports import (
    Pending, Progress, new_agent_id, report, report_late, unreported,
)
from rollouttap.manager.export import SIDE_FILES
from rollouttap.manager.launch import agent_environment, model_env, split_model_url
from rollouttap.manager.proxy import ProxyConfig
from rollouttap.manager.proxy_link import ProxyLink
from rollouttap.manager.reaper import Reaper
from rollouttap.manager.results import (
    AgentResult, Settled, collect_flows, decide_status, join_errors, settle_flows, start_failure, summarise,
    with_model_failure, with_uncommitted,
)
from rollouttap.store import Store, new_token
from rollouttap.store.redact import redact_command
from rollouttap.throttle import Throttle

log = logging.getLogger(__name__)

__all__ = ["AgentManager", "Progress", "new_agent_id"]


class AgentManager:
    """Runs agents behind a capture proxy it starts (or attaches to) and returns their conversations.

    proxy: None starts a proxy; ``"http://127.0.0.1:PORT"`` attaches to a running ``rollouttap proxy``
    recording into the same store (it cannot be restarted from here); a ProxyConfig starts one so.
    model_url: the model server's OpenAI base URL (``http://127.0.0.1:8000/v1``): the proxy asks it for
    token ids, agents get ``OPENAI_BASE_URL``/``OPENAI_API_BASE`` (unless env or the spec set them), and
    direct connections to it are reported as bypasses. base_url_mode: agents' base URL goes through a
    reverse listener whose path names the agent, for clients that ignore proxy settings (NO_PROXY then
    names that listener's host:port; a client that sends it through the proxy all the same, as curl and
    aiohttp do, is served as the reverse listener would serve it). proxies: how many proxies to start, each
    its own process and event loop, agents spread over them in turn: one proxy's event loop tops out at a
    few hundred requests/s, a node with many cores and many agents can use one per core or two.
    keep_for: seconds; each deploy() first deletes from the store what ended more than that long ago
    (``Store.prune``: whole agents, with all their flows), so a long training run does not fill its disk
    (every call of an agent resends its conversation). Skipped while another deploy() of this manager runs,
    whose agents' flows may still be being read. None (the default) keeps everything.
    """

    def __init__(self, agent: AgentSpec | Callable[..., Any], *, store: str | Path = "runs.db",
                 parallel: int = 16, timeout: float = 600.0, proxy: str | ProxyConfig | None = None,
                 model_url: str | None = None, env: Mapping[str, str] | None = None,
                 base_url_mode: bool = False, workdir_template: str | Path | None = None,
                 grace: float = 10.0, eos_token_id: int | None = None, run_id: str | None = None,
                 keep_workdirs: bool = False, confdir: str | Path | None = None,
                 poll_interval: float = 0.2, proxies: int = 1, keep_for: float | None = None) -> None:
        self.spec = agent if isinstance(agent, AgentSpec) else _as_spec(agent)
        _check_settings(parallel=parallel, timeout=timeout, grace=grace, poll_interval=poll_interval,
                        proxies=proxies, eos_token_id=eos_token_id, keep_for=keep_for)
        if base_url_mode and model_url is None:
            raise ConfigError("base_url_mode needs model_url (the reverse listener's target)")
        if model_url is not None:
            split_model_url(model_url)  # validates
        if env is not None and (problem := env_problem(env)) is not None:
            raise ConfigError(f"env: {problem}")
        self.workdir_template = Path(workdir_template) if workdir_template is not None else None
        if self.workdir_template is not None and not self.workdir_template.is_dir():
            raise ConfigError(f"workdir_template {self.workdir_template} is not a directory")
        self.store_path = Path(store).resolve()
        self.parallel, self.timeout, self.grace = parallel, float(timeout), float(grace)
        self.model_url, self.base_url_mode = model_url, base_url_mode
        self.env = dict(env or {})
        self.eos_token_id, self.keep_workdirs = eos_token_id, keep_workdirs
        self.run_id = run_id or uuid.uuid4().hex
        self.poll_interval = poll_interval
        self.keep_for = None if keep_for is None else float(keep_for)
        self._prune_skips_said = Throttle(600.0)
        self._proxy_arg, self._confdir = proxy, Path(confdir) if confdir is not None else None
        self.store: Store | None = None
        self.proxies = proxies
        self.links: list[ProxyLink] = []
        self.link: ProxyLink | None = None  # the first of ``links``
        self._running: dict[str, launch.AgentProcess] = {}
        self._bypass: dict[str, list[BypassConnection]] = {}
        self._lock = threading.Lock()
        self._on_link: dict[int, int] = {}  # agents running per proxy (id of its link), under _lock
        self._turn = 0  # which proxy a tie goes to: every proxy in turn, across deploys
        self._deploys: dict[threading.Event, list[Future[AgentResult]]] = {}  # running deploys: stop -> agents
        self._callers: dict[threading.Event, threading.Thread] = {}  # running deploys: stop -> calling thread
        self._late = Pending()  # results of broken-off deploys still to be reported (see cancel())
        self._closing = threading.Event()
        self._closed = False  # set under _lock by close(): a deploy() not yet registered then starts no agent
        self._threads: list[threading.Thread] = []
        self._detector = BypassDetector(model_targets(model_url) if model_url else frozenset())
        self._tables = launch.SharedProcessTable()  # the monitor and every agent's clean-up share scans
        self._reaper = Reaper(None)  # kills the running agents if this process dies without close()

    # -- lifecycle ---------------------------------------------------------------------------------
    def __enter__(self) -> AgentManager:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> AgentManager:
        """Open the store, start (or attach to) the proxy and the background watchers."""
        if self.store is not None:
            return self
        # Each running agent holds ~5 descriptors here (its output pipes and files, a pidfd): under the soft limit
        # of 1,024 many systems start processes with, a few hundred agents at once fail to start (EMFILE).
        before, now = raise_fd_limit()
        if now != before:
            log.info("rollouttap: open-file limit raised from %d to %d for the agents' pipes", before, now)
        new_store = not self.store_path.exists()
        self.store = Store(self.store_path)
        with self._lock:
            self._on_link.clear()
        try:
            self._reaper = Reaper.start(self.store_path)
            self.links = ProxyLink.open(self._proxy_arg, self.proxies, store=self.store,
                                        store_path=self.store_path, model_url=self.model_url,
                                        base_url_mode=self.base_url_mode, confdir=self._confdir)
            self.link = self.links[0]
        except BaseException:
            self._reaper.stop()
            drop = new_store and self._untouched()
            self.store.close()
            self.store = None
            if drop:
                for path in (self.store_path, *(self.store_path.with_name(self.store_path.name + side)
                                                for side in SIDE_FILES)):
                    path.unlink(missing_ok=True)
            raise
        self._reaper.wait_ready()
        self._closing.clear()
        with self._lock:
            self._closed = False  # started again after a close()
        _OPEN.add(self)
        for name, target in (("watchdog", self._watch_proxy), ("monitor", self._watch_agents)):
            thread = threading.Thread(target=target, name=f"rollouttap-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def _untouched(self) -> bool:
        """Whether the store this start made holds nothing and no other process records into it (a second run
        or proxy may have opened the same new path meanwhile): a failed start then leaves no empty file behind.
        Its own proxies are stopped by now; a store that cannot be read is kept."""
        assert self.store is not None
        try:
            return not (self.store.count_flows() or self.store.agents() or self.store.proxies(alive_only=True))
        except Exception:  # never in place of the error that failed the start
            return False

    def close(self) -> None:
        """Stop what this manager started (its proxy commits every flow first); close the store.

        Running deploys (other threads') are cancelled first: their agents are killed and recorded, and
        their calls return those results, before the proxy and the store go."""
        finished = links_closed = False
        _OPEN.discard(self)
        with self._lock:
            self._closed = True
        try:
            finished = self.cancel()
            self._closing.set()
            for thread in self._threads:
                thread.join(10)
            self._threads = []
            # In parallel: each may take its writer's whole close time (a store taking no rows).
            with ThreadPoolExecutor(max_workers=max(1, len(self.links))) as pool:
                closing = [pool.submit(link.close) for link in self.links]
            links_closed = True
            for done in closing:
                done.result()  # the first failure is raised, as a loop over them would
        finally:  # whatever failed above, the proxies, the reaper and the store are settled
            links, self.links, self.link = self.links, [], None
            if not links_closed:  # broken off before (Ctrl-C in cancel()): no proxy may outlive its manager
                self._closing.set()
                for link in links:
                    try:
                        link.close()
                    except Exception:
                        log.exception("rollouttap: a proxy could not be stopped")
            if finished:
                self._reaper.stop()
            else:  # agents that would not end in time (or close() failed): the reaper kills and records them
                self._reaper.abandon()
            if self.store is not None:
                self.store.close()
                self.store = None

    def cancel(self, timeout: float = 60.0) -> bool:
        """Stop every running deploy and wait for its agents to be killed and recorded; False on timeout.

        Waits on the agents' futures, which run on pool threads: so a close() from a progress callback,
        inside a deploy, waits for that deploy's agents too; so does a caller whose deploy() a second Ctrl-C
        broke off, and its progress callback gets the results still owed meanwhile."""
        _check_settings(cancel_timeout=timeout)
        return self._cancel(timeout, lambda _caller: True)

    def _cancel(self, timeout: float, which: Callable[[threading.Thread], bool]) -> bool:
        """cancel() for the running deploys whose calling thread ``which`` selects."""
        with self._lock:
            stops = [stop for stop in self._deploys if which(self._callers[stop])]
            for stop in stops:
                stop.set()
            # done(), not wait()'s test: a future cancelled while queued is done, but wait() counts it only once
            # a pool thread has taken it, which an interrupted deploy's pool never does.
            pending = [f for stop in stops for f in self._deploys[stop] if not f.done()]
        deadline = time.monotonic() + self.grace + timeout
        if wait(pending, timeout=self.grace + timeout).not_done:
            return False
        # A future is done before its callbacks run: wait for the late reports too, so they are out on return.
        return self._late.wait_none(max(0.0, deadline - time.monotonic()))

    @property
    def proxy_url(self) -> str:
        return self._link().url

    @property
    def proxy_restarts(self) -> int:
        return sum(link.restarts for link in self.links)

    def _link(self) -> ProxyLink:
        """The first proxy (RuntimeError before start())."""
        links = self.links
        if not links or self.store is None:
            raise RuntimeError("AgentManager is not started: use it as a context manager or call start()")
        return links[0]

    def _take_link(self) -> ProxyLink:
        """The proxy for an agent starting now: the one with the fewest agents running (each in turn on a tie),
        across every deploy() of this manager, however many prompts each has."""
        with self._lock:
            links, self._turn = list(self.links), self._turn + 1
            if not links:
                raise RuntimeError("AgentManager is not started (or closed): use it as a context manager or call "
                                   "start()")
            order = [links[(self._turn + i) % len(links)] for i in range(len(links))]
            chosen = min(order, key=lambda link: self._on_link.get(id(link), 0))
            self._on_link[id(chosen)] = self._on_link.get(id(chosen), 0) + 1
            return chosen

    def _release_link(self, link: ProxyLink) -> None:
        with self._lock:
            if id(link) in self._on_link:  # a manager closed and started again counts its new proxies afresh
                self._on_link[id(link)] -= 1

    def _watch_proxy(self) -> None:
        while not self._closing.wait(0.25):
            for link in list(self.links):
                link.revive_if_dead(self._closing, self.store)

    def _watch_agents(self) -> None:
        """Record every agent's processes (so the tree kill finds them) and direct model connections."""
        while not self._closing.wait(self.poll_interval):
            with self._lock:
                running = dict(self._running)
            if not running:
                continue
            table = self._tables.after(time.monotonic())
            live = {agent_id: agent.observe(table) for agent_id, agent in running.items()}
            for agent_id, found in self._detector.scan(live).items():
                with self._lock:
                    merge(self._bypass.setdefault(agent_id, []), found)

    # -- deploying ---------------------------------------------------------------------------------
    def deploy(self, prompts: Iterable[Prompt], *, timeout: float | None = None,
               progress: Progress | None = None) -> list[AgentResult]:
        """Run one agent per prompt (``parallel`` at a time, per call: deploy() calls made at once from several
        threads run that many each); results in prompt order.

        A failing, hanging or crashing agent never fails the batch: its result says what happened.
        ``timeout`` overrides the manager's for this batch; ``progress`` is called with each result.
        """
        if isinstance(prompts, (str, bytes, Mapping)):
            raise AgentSpecError(f"deploy() takes a list of prompts, not one {type(prompts).__name__}: "
                                 "wrap a single prompt as [prompt]")
        if not isinstance(prompts, Iterable):
            raise AgentSpecError(f"deploy() takes a list of prompts, not {prompts!r}")
        if timeout is not None:
            _check_settings(timeout=timeout)
        limit = self.timeout if timeout is None else float(timeout)
        items = [check_prompt(p) for p in prompts]
        for index, item in enumerate(items):  # before any agent starts: not one failure per agent, later
            self.spec.check_fits(item, index)
        self._link()
        self._prune_ended()
        results: list[AgentResult | None] = [None] * len(items)
        stop = threading.Event()
        pool = ThreadPoolExecutor(max_workers=max(1, min(self.parallel, len(items))),
                                  thread_name_prefix="rollouttap-agent")
        futures: list[Future[AgentResult]] = []
        with self._lock:  # registered before any agent starts: a close() from now on cancels them all
            if self._closed:  # closed while this call got ready (pruning a large store, say)
                pool.shutdown()
                raise RuntimeError("AgentManager was closed while deploy() got ready: no agent was started")
            self._deploys[stop] = futures
            self._callers[stop] = threading.current_thread()
            futures += [pool.submit(self._run_guarded, i, p, stop, limit) for i, p in enumerate(items)]
        interrupted = False
        try:
            for future in as_completed(futures):
                result = future.result()
                results[result.index] = result
                report(progress, result)
        except BaseException:
            interrupted = True
            stop.set()  # running agents are killed, queued ones never start
            for future in futures:
                future.cancel()
            raise
        finally:
            try:
                pool.shutdown(wait=True, cancel_futures=True)
                if interrupted:  # its killed agents are recorded by now: every prompt still gets a result
                    for result in unreported(futures, items, results):
                        results[result.index] = result
                        report(progress, result)
            finally:  # a second Ctrl-C breaks that wait: the deploy stays known until its agents end
                stop.set()
                owed = interrupted and any(r is None for r in results)
                for index, future in enumerate(futures):
                    if owed and results[index] is None:  # reported as its agent ends (see cancel())
                        self._late.add()
                        try:
                            future.add_done_callback(
                                functools.partial(report_late, progress, items, index, self._late))
                        except BaseException:  # a third Ctrl-C right here: nothing will report this one
                            self._late.done()
                            raise
                    future.add_done_callback(lambda _f: self._forget_deploy(stop))
                if not futures:  # no agent (none asked for, or broken off before one was): none will drop it
                    self._forget_deploy(stop)
        return [r for r in results if r is not None]

    def _prune_ended(self) -> None:
        """keep_for: delete what ended more than keep_for seconds ago, unless another deploy() runs. An agent
        that ends after the cutoff is read is never older than it, so one of a deploy starting meanwhile is kept."""
        if self.keep_for is None or self.store is None:
            return
        cutoff = time.time() - self.keep_for
        with self._lock:
            if self._deploys:
                if self._prune_skips_said.due():  # deploys that always overlap would never prune: say so
                    log.warning("rollouttap: keep_for: the store is not pruned while another deploy() of this manager "
                                "runs (deploys that always overlap never prune: Store.prune between them)")
                return
        try:
            flows, agents = self.store.prune(cutoff)
        except StoreError as exc:  # the next deploy() tries again; agents run all the same
            log.warning("rollouttap: pruning the store before this deploy failed: %s", exc)
            return
        if flows or agents:
            log.info("pruned %d flows and %d agents that ended more than %gs ago", flows, agents, self.keep_for)

    def _forget_deploy(self, stop: threading.Event) -> None:
        """Drop a finished deploy (each of its agents calls this as it ends; the last one drops it)."""
        with self._lock:
            if all(f.done() for f in self._deploys.get(stop, ())):
                self._deploys.pop(stop, None)
                self._callers.pop(stop, None)

    def summary(self, results: Sequence[AgentResult], since: float | None = None) -> dict[str, Any]:
        """Batch counts (statuses, calls, tokens, bypasses), proxy restarts and unattributed flows."""
        out = summarise(results).to_dict()
        out["proxy_restarts"] = self.proxy_restarts
        if self.store is not None and since is not None:  # through this manager's proxies: a store may be shared
            proxy_ids = [proxy_id for link in self.links for proxy_id in link.proxy_ids]
            # A flow named only by a tag or header that no agent registered (a process that escaped its agent and
            # dropped its environment, say) belongs to no result either.
            out["unattributed_flows"] = self.store.count_flows(unowned=True, since=since, proxy_ids=proxy_ids)
        return out

    def _run_guarded(self, index: int, prompt: Prompt, stop: threading.Event, timeout: float) -> AgentResult:
        agent_id = new_agent_id()
        store = self.store  # close() may drop it meanwhile
        if stop.is_set():
            return AgentResult(agent_id, index, prompt, "error", error="cancelled before it started")
        try:
            return self._run_one(agent_id, index, prompt, stop, timeout)
        # A manager-side failure fails this agent, never the batch: SystemExit too (a sys.exit() reached from
        # user code, as a CLI main() used as a check); KeyboardInterrupt goes on up.
        except (Exception, SystemExit) as exc:
            log.exception("agent %s (prompt %d) could not be run", agent_id, index)
            error = f"{type(exc).__name__}: {exc}"
            try:
                assert store is not None
                store.agent_ended(agent_id, "error", {"error": error})
            except Exception:
                log.exception("agent %s: recording its end failed too", agent_id)
            return AgentResult(agent_id, index, prompt, "error", error=error)
        finally:
            self._reaper.release(agent_id)  # ended and recorded (or never started)

    def _run_one(self, agent_id: str, index: int, prompt: Prompt, stop: threading.Event,
                 timeout: float) -> AgentResult:
        store, token = self.store, new_token()
        assert store is not None
        if (gone := store.detached()) is not None:  # its proxies answer 503 and nothing is recorded: fail fast
            raise StoreError(gone)
        link = self._take_link()
        try:  # the reaper's from the start: a manager killed while a workdir is copied leaves no copy behind
            run_dir = launch.new_run_dir() if self.keep_workdirs else \
                launch.new_run_dir(functools.partial(self._reaper.claim, agent_id))
        except BaseException:
            self._release_link(link)
            raise
        try:
            store.register_agent(agent_id, token=token, run_id=self.run_id,
                                 meta={"index": index, "agent": redact_command(self.spec.describe())})
            # A proxy that died since the watchdog last looked is restarted (or waited for) before an agent
            # is pointed at its port: an agent that does not retry would fail on a dead port.
            link.revive_if_dead(self._closing, self.store)
            if stop.is_set():  # cancelled meanwhile (that wait can be long): not started only to be killed
                store.agent_ended(agent_id, "error", {"error": "cancelled before it started"})
                return AgentResult(agent_id, index, prompt, "error", error="cancelled before it started")
            try:
                ctx, agent, given = self._start(agent_id, token, prompt, run_dir, link)
            except (OSError, AgentSpecError, ValueError) as exc:
                error = start_failure(exc)
                store.agent_ended(agent_id, "error", {"error": error})
                return AgentResult(agent_id, index, prompt, "error", error=error)
            return self._finish(ctx, agent, index, link, self._supervise(agent, timeout, stop), timeout, stop, given)
        finally:
            self._release_link(link)
            if not self.keep_workdirs:
                launch.remove_run_dir(run_dir)

    def _start(self, agent_id: str, token: str, prompt: Prompt, run_dir: Path,
               link: ProxyLink) -> tuple[LaunchContext, launch.AgentProcess, list[str]]:
        """The started agent, and the proxy it is pointed at (running as it starts: its rows could die with it)."""
        ctx, argv, stdin = _prepare(self.spec, agent_id, prompt, run_dir, self.workdir_template)
        env = self._environment(agent_id, token, link)
        assert self.store is not None
        given = link.serving(self.store)  # after the workdir is made (seconds, maybe): a restart meanwhile counts
        agent = launch.spawn(agent_id, argv, env=env, cwd=ctx.workdir, stdin=stdin,
                             stdout=run_dir / "stdout.log", stderr=run_dir / "stderr.log")
        self._reaper.watch(agent_id, agent.pid, agent.members.get(agent.pid))  # before any store write
        return ctx, agent, given

    def _supervise(self, agent: launch.AgentProcess, timeout: float, stop: threading.Event) -> _Supervised:
        """Wait for the agent (watched by the monitor meanwhile), then kill whatever is left of its tree."""
        with self._lock:
            self._running[agent.agent_id] = agent
        try:
            assert self.store is not None
            self.store.agent_started(agent.agent_id, agent.pid)
            outcome = launch.wait(agent, agent.started + timeout, stop)
        finally:  # whatever happened here, nothing of the agent outlives this call
            killed_at = time.time()
            killed, survivors = launch.kill_tree(agent, tables=self._tables)
            output_cut = launch.finish_output(agent)
            with self._lock:
                self._running.pop(agent.agent_id, None)
                bypass = tuple(c.to_dict() for c in self._bypass.pop(agent.agent_id, []))
        if survivors:
            log.error("agent %s: processes %s survived SIGKILL", agent.agent_id, survivors)
        return _Supervised(outcome, killed, survivors, bypass, killed_at, output_cut)

    def _finish(self, ctx: LaunchContext, agent: launch.AgentProcess, index: int, link: ProxyLink, run: _Supervised,
                timeout: float, stop: threading.Event, given: list[str]) -> AgentResult:
        """Collect the finished agent's flows, conversation, row and check into its result."""
        ended_at = time.time()  # the agent's tree is gone: all it sent reached the proxy before now
        store = self.store
        assert store is not None
        duration = time.monotonic() - agent.started
        is_entry = isinstance(self.spec, EntryPointAgent)
        entry = launch.read_json(ctx.result_file) if is_entry else None
        status, error = decide_status(run.outcome, agent.popen.returncode, entry, is_entry_point=is_entry,
                                      timeout=timeout)
        try:
            settled = settle_flows(store, agent.agent_id, self.grace, ended_at=ended_at,
                                   given=link.served_since(given, store))
        except StoreError as exc:  # its open flows could not be ended in the store: its result still stands
            settled = Settled((), f"its flows could not be settled in the store: {exc}")
        flows = collect_flows(store, agent.agent_id, eos_token_id=self.eos_token_id)
        try:  # its token is void from now (not only once its check, minutes maybe, is done): a process that
            # escaped the tree cannot add to the store what its result lacks. Written after settling: a write
            # waiting out another writer's lock must not hold up the wait for the proxy's commits.
            store.agent_exited(agent.agent_id, at=ended_at)
        except StoreError as exc:  # its end, written below, voids it then
            log.error("agent %s: recording that its processes ended failed: %s", agent.agent_id, exc)
        error = with_model_failure(status, error, flows.conversation, killed_at=run.killed_at)
        status, error = with_uncommitted(status, error, settled.uncommitted)
        # A cancelled batch (Ctrl-C, close()) is ending: its agents' checks (minutes, maybe) are not run.
        if run.outcome == "cancelled":
            skipped = "not run: the batch was cancelled" if self.spec.check is not None else None
            check_result, check_error = None, skipped
        else:
            check_result, check_error = self.spec.run_check(ctx.workdir, stop)  # a cancel cuts it short too
        run_dir = ctx.workdir.parent
        result = AgentResult(
            agent.agent_id, index, ctx.prompt, status, exit_code=agent.popen.returncode, duration_s=duration,
            stdout_tail=launch.tail(run_dir / "stdout.log"), stderr_tail=launch.tail(run_dir / "stderr.log"),
            error=error, return_value=(entry or {}).get("value"), calls=flows.calls, flows=flows.counts,
            incomplete_flows=settled.incomplete, bypass_connections=run.bypass,
            workdir=str(ctx.workdir) if self.keep_workdirs else None, check_result=check_result,
            check_error=check_error, conversation=flows.conversation, row=flows.row, fidelity=flows.fidelity,
            tokens=flows.tokens, killed_processes=run.killed, proxy_restarts=link.restarts,
            output_cut=run.output_cut)
        try:
            store.agent_ended(agent.agent_id, status, _ended_meta(result, run.survivors))
        except StoreError as exc:  # the agent ran: its result stands, saying why the store lacks its end
            log.error("agent %s: recording its end failed: %s", agent.agent_id, exc)
            note = f"its end could not be recorded in the store: {exc}"
            result = replace(result, error=join_errors(result.error, note))
        return result

    def _environment(self, agent_id: str, token: str, link: ProxyLink) -> dict[str, str]:
        routed = isinstance(self._proxy_arg, ProxyConfig) and bool(self._proxy_arg.routes)
        models = model_env(self.model_url, os.environ, reverse_url=link.reverse_url if self.base_url_mode
                           else None, agent_id=agent_id, token=token, routed=routed)
        return agent_environment(os.environ, proxy=link.env(agent_id, token), model=models,
                                 user=self.env, spec={**self.spec.env, **self.spec.extra_env()})


_OPEN: weakref.WeakSet[AgentManager] = weakref.WeakSet()  # started, not closed (weak: one dropped is not kept)


def _deserted(caller: threading.Thread) -> bool:
    """Whether a deploy called from ``caller`` is left to itself once the main thread has ended: the program
    does not wait for a daemon thread (or one that is gone); it waits for any other."""
    return caller.daemon or not caller.is_alive() or caller is threading.current_thread()


def _cancel_deserted_deploys() -> None:
    """At exit: cancel (agents killed and recorded) the deploys of open managers no thread will wait for."""
    for manager in list(_OPEN):
        try:
            manager._cancel(60.0, _deserted)
        except Exception:  # the exit goes on: the reaper kills what is left
            log.exception("cancelling the running deploys at exit failed")


# A deploy() on a daemon thread of a program whose main thread has ended would keep it alive until its agents
# time out: its pool's threads are joined at exit (concurrent.futures registers that join the same way, on
# import, above). Threading's exit functions run in reverse order of registration, so this cancel runs first
# and the join finds the agents killed and recorded, as close() leaves them. Not daemon pool threads instead:
# the interpreter would end with the agents unrecorded (only the reaper then kills them, as after a crash).
# An atexit.register() function would run only after that join. A deploy on a thread the program waits for
# (not daemon, alive) is left to finish, as Python leaves that thread.
threading._register_atexit(_cancel_deserted_deploys)  # type: ignore[attr-defined]


def _prepare(spec: AgentSpec, agent_id: str, prompt: Prompt, run_dir: Path,
             template: Path | None) -> tuple[LaunchContext, list[str], Path | None]:
    """Workdir, prompt files and the command line for one agent."""
    workdir = launch.make_workdir(run_dir, template)
    ctx = LaunchContext(agent_id, prompt, workdir, run_dir / "prompt.txt", run_dir / "prompt.json",
                        run_dir / "result.json")
    ctx.prompt_file.write_text(prompt_text(prompt), encoding="utf-8")
    ctx.prompt_json_file.write_text(json.dumps(prompt), encoding="utf-8")
    data = spec.stdin_bytes(ctx)
    stdin = None
    if data is not None:
        stdin = run_dir / "stdin"
        stdin.write_bytes(data)
    return ctx, spec.argv(ctx), stdin


def _ended_meta(result: AgentResult, survivors: list[int]) -> dict[str, Any]:
    return {"exit_code": result.exit_code, "duration_s": round(result.duration_s, 3), "error": result.error,
            "calls": result.calls, "incomplete_flows": len(result.incomplete_flows),
            "bypass_connections": len(result.bypass_connections), "killed_processes": result.killed_processes,
            "survivors": survivors, "output_cut": dict(result.output_cut)}


# name -> (whole numbers only, the least value allowed, whether that value itself is allowed)
_SETTINGS: dict[str, tuple[bool, float, bool]] = {
    "parallel": (True, 1, True), "proxies": (True, 1, True), "eos_token_id": (True, 0, True),
    "timeout": (False, 0, False), "grace": (False, 0, True), "poll_interval": (False, 0, False),
    "keep_for": (False, 0, True), "cancel_timeout": (False, 0, True),
}
_OPTIONAL = frozenset(("eos_token_id", "keep_for"))  # None: not set


def _check_settings(**values: Any) -> None:
    """ConfigError naming the first setting of the wrong type or out of range (None: not set)."""
    for name, value in values.items():
        if value is None and name in _OPTIONAL:
            continue
        whole, least, inclusive = _SETTINGS[name]
        kinds = (int,) if whole else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise ConfigError(f"{name} must be {'an integer' if whole else 'a number'}, not {value!r}")
        if not (value > least or (inclusive and value == least)):  # NaN fails both
            raise ConfigError(f"{name} must be {'>=' if inclusive else '>'} {least:g}, got {value!r}")
        if not whole and value > MAX_SECONDS:  # seconds: infinity, or a float an int will not fit
            raise ConfigError(f"{name} is too large: {value!r} (at most {MAX_SECONDS:g} s)")


@dataclass(frozen=True)
class _Supervised:
    """How an agent's run ended, and what the manager killed of it when it did."""
    outcome: str  # launch.wait's: exited, timeout or cancelled
    killed: int
    survivors: list[int]
    bypass: tuple[dict[str, Any], ...]
    killed_at: float  # when the manager began killing what was left of its tree
    output_cut: dict[str, int]  # stdout/stderr whose middle was not kept: bytes cut


def _as_spec(agent: object) -> AgentSpec:
    if callable(agent):
        return EntryPointAgent(agent)
    raise AgentSpecError(f"agent must be an AgentSpec (CommandAgent, EntryPointAgent), not {agent!r}")
