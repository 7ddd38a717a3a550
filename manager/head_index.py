"""Which earlier calls a new turn of an agent may continue, found without comparing it with every one.

``continuity.assign_threads`` keeps each thread's heads (the calls of its latest turn) here with their expected
histories; ``candidates`` gives the few that ``_pick_thread`` can choose for a turn, so an agent of thousands of
calls is threaded in near-linear time.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

M = TypeVar("M", bound=Hashable)  # a normalised message
Head = tuple[int, int]  # (thread, index of the call whose history a next turn may continue)


class _Node(Generic[M]):
    """A message-trie node: the heads whose expected history ends here, and all heads at or below it."""
    __slots__ = ("children", "ending", "below")

    def __init__(self) -> None:
        self.children: dict[M, _Node[M]] = {}
        self.ending: set[Head] = set()
        self.below: set[Head] = set()


class HeadIndex(Generic[M]):
    """Every thread's heads with their expected histories (normalised once, when a call becomes a head), in a
    trie of messages and an index of where each message recurs: a turn is compared only with the heads that can
    win ``_pick_thread`` for it, not with every head (an agent of many independent calls has as many threads)."""

    def __init__(self) -> None:
        self.root: _Node[M] = _Node()
        self.expected: dict[Head, list[M]] = {}
        self.later: dict[M, set[Head]] = {}  # message -> heads holding it at index 2 or beyond
        self.threads: dict[int, list[Head]] = {}

    def set_heads(self, thread: int, heads: list[tuple[Head, list[M]]]) -> None:
        """Make ``heads`` the thread's heads, in place of its earlier ones."""
        for head, expected in heads:  # before the old ones go, so the branch they share stays in place
            self._add(head, expected)
        for head in self.threads.get(thread, []):
            self._remove(head)
        self.threads[thread] = [head for head, _ in heads]

    def _add(self, head: Head, expected: list[M]) -> None:
        self.expected[head] = expected
        node = self.root
        node.below.add(head)
        for message in expected:
            node = node.children.setdefault(message, _Node())
            node.below.add(head)
        node.ending.add(head)
        # _resumes_at looks past the shared prefix, which is at least one message when it counts: index 2 on
        for message in expected[2:]:
            self.later.setdefault(message, set()).add(head)

    def _remove(self, head: Head) -> None:
        expected = self.expected.pop(head)
        node = self.root
        node.below.discard(head)
        for message in expected:
            parent, node = node, node.children[message]
            node.below.discard(head)
            if not node.below:  # nothing below: drop the branch, so a walk stops where some head still is
                del parent.children[message]
                break
        else:
            node.ending.discard(head)
        for message in expected[2:]:
            holders = self.later.get(message)
            if holders is not None:
                holders.discard(head)
                if not holders:
                    del self.later[message]

    def candidates(self, current: list[M], system: int) -> list[tuple[Head, list[M]]]:
        """The heads ``_pick_thread`` can choose for ``current``: the exact extensions when there are any, else
        those sharing the longest prefix when it goes beyond the ``system`` leading system messages, else those
        that may resume."""
        path = [self.root]
        for message in current:
            child = path[-1].children.get(message)
            if child is None:
                break
            path.append(child)
        found = {head for node in path for head in node.ending}
        depth = len(path) - 1  # the longest prefix any head shares with current; every head below shares that
        if not found and depth > system:
            found = path[-1].below
        elif not found:
            # a head resuming at k (1 <= k <= depth) holds current[k] at some index past k, so from index 2 on
            found = {head for k in range(1, min(depth + 1, len(current))) for head in self.later.get(current[k], ())}
        return [(head, self.expected[head]) for head in found]
