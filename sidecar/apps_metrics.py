"""The applications' metrics as Prometheus scrapes them (`GET /metrics/apps`): the latest closed
window of each aggregated group and, optionally, each raw metric's last value.

Pure state, fed by the correlator (the aggregate step's messages as they are routed, and the
raw points it routes), read by `families()` when scraped; every call is given the time (seconds
since the epoch). Bounded: at most `max_series` entries (one per aggregated group, one per raw
metric name and tag set); past it a new entry is not added and is counted in `dropped`, while
those already held keep updating. A series goes when it is stale (counted in `expired`): an
aggregated group two windows after its latest window ended without a newer one, a raw series
`raw_max_age` seconds after its last point.

Per aggregated metric NAME (its name sanitized to Prometheus's alphabet):
    NAME{quantile="0.99",source=...,TAGS}   summary: the window's p-statistics
    NAME_count / NAME_sum                   the window's count and sum
    NAME_min, NAME_max, NAME_avg, NAME_last gauges, where the step computes them
and per raw metric NAME_raw, a gauge of its last value. A family name two metrics would share
(`a.b` and `a_b`, or `x_min` beside x's min) belongs to the first in sorted order; the other's
samples are left out and counted in `conflicts` (each scrape).
"""

import re
from decimal import Decimal
from collections.abc import Iterable, Iterator

from prometheus_client.metrics_core import Metric

from sidecar.aggregation import quantile_of
from sidecar.message import epoch_ms

_NAME_WRONG = re.compile(r"[^a-zA-Z0-9_:]")
_LABEL_WRONG = re.compile(r"[^a-zA-Z0-9_]")
GAUGE_STATS = ("min", "max", "avg", "last")
RAW_SUFFIX = "_raw"
# Labels the exposition gives meaning to: a tag by one of these names is `tag_NAME`.
_RESERVED_LABELS = ("source", "quantile", "le")


def metric_name(name: str) -> str:
    """`name` in `[a-zA-Z_:][a-zA-Z0-9_:]*`: every other character `_`, a leading digit prefixed."""
    cleaned = _NAME_WRONG.sub("_", name)
    return cleaned if cleaned and not cleaned[0].isdigit() else "_" + cleaned


def label_name(name: str) -> str:
    """A tag's name as a label, `[a-zA-Z_][a-zA-Z0-9_]*`, off the names Prometheus reserves
    (`__*`) and those this exposition sets."""
    cleaned = _LABEL_WRONG.sub("_", name)
    if not cleaned or cleaned[0].isdigit():
        cleaned = "_" + cleaned
    if cleaned.startswith("__") or cleaned in _RESERVED_LABELS:
        cleaned = "tag" + cleaned if cleaned.startswith("_") else "tag_" + cleaned
    return cleaned


def labels_of(source: str, tags: dict | None) -> tuple[tuple[str, str], ...]:
    """`source` and the tags as label pairs, sorted; two tags that clean to one label name
    both stay, the later ones numbered (`_2`, `_3`, ...)."""
    labels = {"source": source}
    for key, value in sorted((tags or {}).items()):
        name = base = label_name(str(key))
        number = 1
        while name in labels:
            number += 1
            name = label_name(f"{base}_{number}")
        labels[name] = value if isinstance(value, str) else str(value)
    return tuple(sorted(labels.items()))


def _format_quantile(stat: str) -> str:
    """`p99.9` -> "0.999", in decimal: the float 99.9 / 100 is 0.9990000000000001."""
    return format(Decimal(stat[1:]) / 100, "f")


def _stale_after(aggregation: dict) -> float:
    """When an aggregated group's series is stale: two windows after its window ended."""
    start = epoch_ms(aggregation["window_start"]) or 0
    end = epoch_ms(aggregation["window_end"]) or start
    return (end + 2 * (end - start)) / 1000


class AppsMetrics:
    def __init__(self, max_series: int = 10_000, *, raw: bool = False, raw_max_age: float = 300.0):
        self.max_series = max_series
        self.raw = raw
        self.raw_max_age = raw_max_age
        # (source, name, tags) -> (window_start, value, aggregation, stale after)
        self.aggregates: dict[tuple, tuple[str, float, dict, float]] = {}
        # (source, name, tags) -> (last value, stale after); oldest update first
        self.points: dict[tuple, tuple[float, float]] = {}
        self.dropped = 0  # updates not held: a new series past max_series
        self.expired = 0  # series let go when stale
        self.conflicts = 0  # samples left out of the last scrape: their family name was taken

    @property
    def series(self) -> int:
        return len(self.aggregates) + len(self.points)

    def _room_for(self, table: dict, key: tuple, now: float) -> bool:
        if key in table or self.series < self.max_series:
            return True
        self.expire(now)  # full: the stale go first
        if self.series < self.max_series:
            return True
        self.dropped += 1
        return False

    def expire(self, now: float) -> None:
        """Let go of the stale series."""
        stale = [key for key, held in self.aggregates.items() if held[3] <= now]
        for key in stale:
            del self.aggregates[key]
        expired = len(stale)
        # Raw series are kept in order of their last update: the stale ones are in front.
        while self.points:
            key = next(iter(self.points))
            if self.points[key][1] > now:
                break
            del self.points[key]
            expired += 1
        self.expired += expired

    def add_aggregates(self, messages: Iterable[dict], now: float) -> None:
        """The aggregate step's messages (docs/protocol.md): each group keeps its latest
        window (by window_start; of two with one start, the later given)."""
        for message in messages:
            data = message["data"]
            aggregation = data["aggregation"]
            key = (message["source"], data["name"], labels_of(message["source"], data.get("tags")))
            held = self.aggregates.get(key)
            if held is not None and held[0] > aggregation["window_start"]:
                continue
            if self._room_for(self.aggregates, key, now):
                self.aggregates[key] = (aggregation["window_start"], float(data["value"]), aggregation, _stale_after(aggregation))

    def add_points(self, messages: Iterable[dict], now: float) -> None:
        """Raw messages: each metric point (not an aggregate) sets its series' last value."""
        points = self.points
        for message in messages:
            if message["type"] != "metric":
                continue
            data = message["data"]
            if "aggregation" in data:
                continue
            key = (message["source"], data["name"], labels_of(message["source"], data.get("tags")))
            if self._room_for(points, key, now):
                points.pop(key, None)  # to the end: the order is that of the last updates
                points[key] = (float(data["value"]), now + self.raw_max_age)

    def families(self, now: float) -> Iterator[Metric]:
        """The metric families to expose, in a stable order (the stale let go first)."""
        self.expire(now)
        families: dict[str, Metric] = {}
        owners: dict[str, str] = {}
        conflicts = 0

        def family(name: str, owner: str, kind: str, documentation: str) -> Metric | None:
            nonlocal conflicts
            if owners.setdefault(name, owner) != owner:
                conflicts += 1
                return None
            if name not in families:
                families[name] = Metric(name, documentation, kind)
            return families[name]

        for (source, name, labels), (_start, value, aggregation, _stale) in sorted(self.aggregates.items()):
            base = metric_name(name)
            owner = "aggregate " + name
            label_map = dict(labels)
            summary = family(base, owner, "summary", f"{name}: the latest window's statistics (aggregate step)")
            if summary is not None:
                for stat, found in sorted(aggregation.items()):
                    if quantile_of(stat) is not None and found is not None:
                        summary.add_sample(base, {**label_map, "quantile": _format_quantile(stat)}, float(found))
                if aggregation.get("count") is not None:
                    summary.add_sample(base + "_count", label_map, float(aggregation["count"]))
                summary.add_sample(base + "_sum", label_map, value)
            for stat in GAUGE_STATS:
                if aggregation.get(stat) is None:
                    continue
                gauge = family(f"{base}_{stat}", owner, "gauge", f"{name}: the latest window's {stat}")
                if gauge is not None:
                    gauge.add_sample(f"{base}_{stat}", label_map, float(aggregation[stat]))
        for (source, name, labels), (value, _stale) in sorted(self.points.items()):
            full = metric_name(name) + RAW_SUFFIX
            gauge = family(full, "raw " + name, "gauge", f"{name}: the last point received")
            if gauge is not None:
                gauge.add_sample(full, dict(labels), value)
        self.conflicts = conflicts
        yield from families.values()
