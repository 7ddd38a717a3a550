"""Saying a thing at most once in a while: one log line per burst of the same trouble, not one per event."""

from __future__ import annotations

import time


class Throttle:
    """``due()`` is True at most once per ``seconds`` (the first time always)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._last = -float("inf")

    def due(self, *, now: bool = False) -> bool:
        """Whether to say it this time; ``now``: say it whatever the time since (a new burst began)."""
        moment = time.monotonic()
        if not now and moment - self._last < self.seconds:
            return False
        self._last = moment
        return True
