"""Pure statistics for the benchmarks: percentiles of one run, medians and spread over repeated runs."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True)
class RunSummary:
    """One run of n timed operations."""
    n: int
    p50: float
    p99: float
    mean: float
    per_s: float  # operations per second of wall time (sequential: 1000 / mean latency in ms)


def summarize(latencies_ms: Sequence[float], wall_s: float | None = None) -> RunSummary:
    """p50/p99/mean of latencies in ms; rate from wall time when given, else from the mean."""
    n = len(latencies_ms)
    if n == 0:
        return RunSummary(0, math.nan, math.nan, math.nan, math.nan)
    mean = statistics.fmean(latencies_ms)
    if wall_s:
        rate = n / wall_s
    else:
        rate = 1000.0 / mean if mean > 0 else math.nan
    return RunSummary(n, percentile(latencies_ms, 50), percentile(latencies_ms, 99), mean, rate)


@dataclass(frozen=True)
class Spread:
    """A figure over repeated runs: the median and the lowest and highest run."""
    median: float
    lo: float
    hi: float
    runs: int

    def fmt(self, digits: int = 2) -> str:
        """``1.23 (1.10–1.40)``; a single run shows just its value."""
        if math.isnan(self.median):
            return "—"
        if self.runs <= 1 or self.lo == self.hi:
            return f"{self.median:.{digits}f}"
        return f"{self.median:.{digits}f} ({self.lo:.{digits}f}–{self.hi:.{digits}f})"


def spread(values: Sequence[float]) -> Spread:
    """Median and range of one figure across runs; NaNs are ignored."""
    clean = [v for v in values if not math.isnan(v)]
    if not clean:
        return Spread(math.nan, math.nan, math.nan, 0)
    return Spread(statistics.median(clean), min(clean), max(clean), len(clean))


def ratio(a: float, b: float) -> float:
    """a / b, NaN when b is zero or either is NaN."""
    if math.isnan(a) or math.isnan(b) or b == 0:
        return math.nan
    return a / b


def fmt(value: float, digits: int = 2, suffix: str = "") -> str:
    """A number for a table cell; ``—`` for NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.{digits}f}{suffix}"
