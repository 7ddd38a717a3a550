"""What a deploy() reports: each agent's result as it ends, to the progress callback, and for a batch broken off
(Ctrl-C, cancel(), close()) the results still owed: those of agents that end later, and one for each prompt
whose agent never started."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future

from rollouttap.manager.agents import Prompt
from rollouttap.manager.results import AgentResult

log = logging.getLogger(__name__)

Progress = Callable[[AgentResult], None]


def new_agent_id() -> str:
    """An agent id unique across processes and machines (several trainer ranks may share a proxy)."""
    return "ag-" + uuid.uuid4().hex


def unreported(futures: Sequence[Future[AgentResult]], items: Sequence[Prompt],
               results: Sequence[AgentResult | None]) -> list[AgentResult]:
    """Results of a cancelled batch not reported yet: its agents' own, or for a prompt whose agent never
    started, one saying so (it has no agent row)."""
    out = []
    for index, future in enumerate(futures):
        result = owed_result(future, items, index) if results[index] is None else None
        if result is not None:
            out.append(result)
    return out


def owed_result(future: Future[AgentResult], items: Sequence[Prompt], index: int) -> AgentResult | None:
    """The result a finished agent's future gives its prompt: its own, or for one cancelled before its agent
    started, one saying so (it has no agent row); None while it runs (or if it raised)."""
    if future.cancelled():
        return AgentResult(new_agent_id(), index, items[index], "error", error="cancelled before it started")
    if future.done() and future.exception() is None:
        return future.result()
    return None


class Pending:
    """A count of things under way that someone may wait to see finish."""

    def __init__(self) -> None:
        self._count = 0
        self._changed = threading.Condition()
        self._here = threading.local()  # how many of them the current thread is inside

    def add(self) -> None:
        with self._changed:
            self._count += 1

    def enter(self) -> None:
        """The current thread starts one of them (its ``done()`` follows on this thread)."""
        self._here.inside = getattr(self._here, "inside", 0) + 1

    def done(self) -> None:
        if getattr(self._here, "inside", 0):
            self._here.inside -= 1
        with self._changed:
            self._count -= 1
            self._changed.notify_all()

    def wait_none(self, timeout: float) -> bool:
        """True once none is under way (but those the calling thread is inside: a progress callback that
        calls cancel()); False if some still are after ``timeout`` seconds."""
        mine = getattr(self._here, "inside", 0)
        with self._changed:
            return self._changed.wait_for(lambda: self._count <= mine, timeout)


def report_late(progress: Progress | None, items: Sequence[Prompt], index: int, pending: Pending,
                future: Future[AgentResult]) -> None:
    """Report the result of an agent whose deploy() was broken off before it could."""
    pending.enter()
    try:
        result = owed_result(future, items, index)
        if result is not None:
            report(progress, result)
    finally:
        pending.done()


def report(progress: Progress | None, result: AgentResult) -> None:
    """Give ``result`` to the progress callback; a callback that raises is logged, never passed on."""
    if progress is None:
        return
    try:
        progress(result)
    except Exception:  # a broken progress display must not stop the batch
        log.exception("progress callback failed")
