"""The first call after a given one whose prompt starts with given tokens, for manager/rows.py's selection of
resampled calls: a scan of every later call for each resampled request is quadratic in an agent's calls."""

from __future__ import annotations

import bisect
import functools
from typing import Protocol


class Call(Protocol):
    @property
    def index(self) -> int: ...  # the call's position among the agent's calls

    @property
    def prompt(self) -> list[int]: ...


class PrefixIndex[C: Call]:
    """Calls (in call order), to find the first after a given one whose prompt starts with given tokens. Prompts are
    sorted once, so those with a prefix are one range, and a merge-sort tree over that order gives the range's
    first call after any point: a scan of every later call for each run instead is quadratic for an agent that
    samples each request twice."""

    def __init__(self, calls: list[C]) -> None:
        self._calls = calls  # in call order
        self._by_index = {call.index: call for call in calls}

    @functools.cached_property
    def _sorted(self) -> tuple[list[list[int]], list[list[int]]] | None:
        # Built on first use: an agent that never resamples never pays for it.
        try:
            ordered = sorted(self._calls, key=lambda call: call.prompt)
        except TypeError:  # token ids that do not sort against each other (not all ints): scan instead
            return None
        return [call.prompt for call in ordered], _index_tree([call.index for call in ordered])

    def first(self, prefix: list[int], *, after: int) -> C | None:
        """The earliest call after call ``after`` whose prompt starts with ``prefix``."""
        if self._sorted is not None:
            prompts, tree = self._sorted
            try:
                lo = bisect.bisect_left(prompts, prefix)
            except TypeError:  # a prefix token that does not sort against the prompts' (a completion's)
                pass
            else:
                hi = bisect.bisect_left(prompts, True, lo, key=lambda prompt: prompt[:len(prefix)] != prefix)
                index = _least_from(tree, lo, hi, after + 1)
                return None if index is None else self._by_index[index]
        return next((c for c in self._calls if c.index > after and c.prompt[:len(prefix)] == prefix), None)


def _index_tree(indices: list[int]) -> list[list[int]]:
    """A bottom-up merge-sort tree: leaf ``len(indices) + i`` holds indices[i], every node its children's sorted."""
    size = len(indices)
    tree: list[list[int]] = [[] for _ in range(size)] + [[index] for index in indices]
    for node in range(size - 1, 0, -1):
        tree[node] = sorted(tree[2 * node] + tree[2 * node + 1])  # two sorted runs: a linear merge
    return tree


def _least_from(tree: list[list[int]], lo: int, hi: int, floor: int) -> int | None:
    """The least index at least ``floor`` among leaves lo..hi-1 of an _index_tree."""
    size = len(tree) // 2
    lo, hi = lo + size, hi + size
    spans: list[list[int]] = []  # the O(log n) nodes that cover the leaves exactly
    while lo < hi:
        if lo & 1:
            spans.append(tree[lo])
            lo += 1
        if hi & 1:
            hi -= 1
            spans.append(tree[hi])
        lo, hi = lo // 2, hi // 2
    return min((span[at] for span in spans if (at := bisect.bisect_left(span, floor)) < len(span)), default=None)
