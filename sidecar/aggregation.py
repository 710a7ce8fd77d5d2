"""Tumbling windows of numeric points per group: the pure core of the aggregate step.

No I/O and no clock: every call is given the time, in seconds since the epoch (the wall
clock's, as the points' timestamps are). A window is `[k * window, (k + 1) * window)` for an
integer k, so windows are aligned to the wall clock and every step with the same `window`
closes at the same moments.

Per group and window: count, sum (float addition in arrival order), min, max and last are
exact; quantiles come from a DDSketch (PyPI `ddsketch`, DataDog's), whose answer is within
RELATIVE_ACCURACY of the exact quantile as long as the magnitudes of a group's values span at
most SKETCH_RANGE (lower magnitudes beyond it are collapsed into the lowest bin: the lowest
quantiles lose accuracy, never the memory bound).
"""

import math
import re
from collections.abc import Iterable

import attrs
from ddsketch import LogCollapsingLowestDenseDDSketch


RELATIVE_ACCURACY = 0.01
SKETCH_BINS = 1024  # per sign: positive and negative values have a store each
# The ratio between the largest and smallest magnitude the bins cover at full accuracy.
SKETCH_RANGE = ((1 + RELATIVE_ACCURACY) / (1 - RELATIVE_ACCURACY)) ** SKETCH_BINS
# A bin's count is one float (a pointer in the store's list and the float object).
BYTES_PER_BIN = 8 + 24
# What a group holds at most, sketch included: both stores full, plus the objects themselves.
MAX_GROUP_BYTES = 2 * SKETCH_BINS * BYTES_PER_BIN + 2048

EXACT_STATS = ("count", "sum", "min", "max", "avg", "last")
_QUANTILE = re.compile(r"p(100|\d{1,2}(?:\.\d+)?)")
OVERFLOW = "__overflow__"
LATE_POLICIES = ("current", "drop")


def quantile_of(stat: str) -> float | None:
    """The quantile a statistic names (`p99` -> 0.99, `p99.9` -> 0.999), None for another."""
    match = _QUANTILE.fullmatch(stat)
    return float(match.group(1)) / 100 if match else None


def check_stats(stats: Iterable[str]) -> None:
    wrong = [s for s in stats if s not in EXACT_STATS and quantile_of(s) is None]
    if wrong:
        raise ValueError(f"unknown statistic {', '.join(map(repr, wrong))} (known: {', '.join(EXACT_STATS)}, and quantiles p0..p100 like p50, p99, p99.9)")


class GroupStats:
    """One group's points in one window. Bounded: at most MAX_GROUP_BYTES, whatever the count."""

    __slots__ = ("count", "sum", "min", "max", "last", "unit", "sketch")

    def __init__(self, quantiles: bool):
        self.count = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.last = 0.0
        self.unit: str | None = None  # the last one a point gave
        self.sketch = LogCollapsingLowestDenseDDSketch(RELATIVE_ACCURACY, SKETCH_BINS) if quantiles else None

    def add(self, value: float, unit: str | None = None) -> None:
        if unit:
            self.unit = unit
        self.count += 1
        self.sum += value
        if value < self.min:
            self.min = value
        if value > self.max:
            self.max = value
        self.last = value
        if self.sketch is not None:
            self.sketch.add(value)

    def result(self, stats: tuple[str, ...]) -> dict:
        """The statistics asked for, by name."""
        found = {}
        for stat in stats:
            if stat == "count":
                found[stat] = self.count
            elif stat == "sum":
                found[stat] = self.sum
            elif stat == "min":
                found[stat] = self.min
            elif stat == "max":
                found[stat] = self.max
            elif stat == "avg":
                found[stat] = self.sum / self.count
            elif stat == "last":
                found[stat] = self.last
            else:
                # Within [min, max], which the exact quantile is too: never further from it.
                found[stat] = min(max(self.sketch.get_quantile_value(quantile_of(stat)), self.min), self.max)
        return found


# A group: the source, the name, and the tags that make it, as sorted (key, value) pairs.
GroupKey = tuple[str, str, tuple[tuple[str, str], ...]]


@attrs.frozen
class ClosedGroup:
    """One group's window, closed: what the step emits as one aggregated message."""

    key: GroupKey
    window_start: float
    window_end: float
    stats: dict  # the statistics asked for
    sum: float  # always: an aggregated message's value
    partial: bool
    unit: str | None = None  # the last one a point of the group gave in the window


@attrs.define
class WindowCounts:
    """What a step did with its points, beyond aggregating them."""

    points: int = 0
    late: int = 0  # stamped in a window already closed
    early: int = 0  # stamped more than one window ahead of the clock
    dropped: int = 0  # late or early under `late: drop`
    overflow: int = 0  # folded into a source's __overflow__ group


class Windows:
    """One step's open windows, each a mapping of group -> GroupStats.

    A point goes to the window its timestamp falls in when that window is still open: the
    current one, or the next (a client's clock a little ahead). A point stamped in a window
    already closed is late, one stamped further ahead is early; both go, by `late`, to the
    current window (`current`) or nowhere (`drop`). At most `max_groups` groups per window: the
    points of further groups are folded into their source's `__overflow__` group (one per
    source, beyond the cap). So a step holds at most about two windows of `max_groups` groups.
    A group keeps the last unit its points gave (the overflow group none), for its aggregate.
    """

    max_group_bytes = MAX_GROUP_BYTES

    def __init__(self, window: float, stats: tuple[str, ...], *, late: str = "current", max_groups: int = 10_000, now: float):
        if window <= 0:
            raise ValueError("window must be positive")
        self.window = window
        self.stats = stats
        self.late = late
        self.max_groups = max_groups
        self.quantiles = any(quantile_of(s) is not None for s in stats)
        # Windows that end at or before this are closed; the one the step started in is open.
        self.closed_until = self.start_of(now)
        self.open: dict[float, dict[GroupKey, GroupStats]] = {}
        self.counts = WindowCounts()

    def start_of(self, moment: float) -> float:
        return math.floor(moment / self.window) * self.window

    def next_close(self) -> float:
        """When the earliest window that may be open ends."""
        return self.closed_until + self.window

    @property
    def groups(self) -> int:
        return sum(len(groups) for groups in self.open.values())

    def add(self, key: GroupKey, timestamp: float, value: float, now: float, unit: str | None = None) -> bool:
        """Count one point; False when it was dropped (late or early under `drop`)."""
        self.counts.points += 1
        start = self.start_of(timestamp)
        current = max(self.start_of(now), self.closed_until)
        if start < self.closed_until or start > current + self.window:
            if start < self.closed_until:
                self.counts.late += 1
            else:
                self.counts.early += 1
            if self.late == "drop":
                self.counts.dropped += 1
                return False
            start = current
        groups = self.open.get(start)
        if groups is None:
            groups = self.open[start] = {}
        stats = groups.get(key)
        if stats is None:
            if len(groups) >= self.max_groups and key[1] != OVERFLOW:
                self.counts.overflow += 1
                key = (key[0], OVERFLOW, ())
                unit = None  # of many metrics
                stats = groups.get(key)
            if stats is None:
                stats = groups[key] = GroupStats(self.quantiles)
        stats.add(value, unit)
        return True

    def close(self, now: float) -> list[ClosedGroup]:
        """The windows that ended at or before `now`, closed, oldest first."""
        boundary = self.start_of(now)
        if boundary <= self.closed_until:
            return []
        self.closed_until = boundary
        return self._take([start for start in self.open if start + self.window <= boundary], now)

    def flush(self, now: float) -> list[ClosedGroup]:
        """Every open window, closed: those not yet ended are marked partial (a shutdown, or a
        reload that changed the step)."""
        self.closed_until = max(self.closed_until, self.start_of(now))
        return self._take(list(self.open), now)

    def _take(self, starts: list[float], now: float) -> list[ClosedGroup]:
        closed = []
        for start in sorted(starts):
            end = start + self.window
            for key, stats in self.open.pop(start).items():
                closed.append(ClosedGroup(key, start, end, stats.result(self.stats), stats.sum, end > now, stats.unit))
        return closed
