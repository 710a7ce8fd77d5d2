"""The aggregate step: metric points and span durations of a source, in tumbling windows per
group, emitted at each window's end as one `metric` message per group.

    aggregate:                                  # main file or a routing entry; keys are routing's
      queue-service:
        - metrics: ["jobs_*", rows_loaded]      # metric-name globs
          spans: [process_job]                  # span names (globs): duration_ms of their ends
          window: 10s
          by: [source, name, tags.env]          # default: source, name and all tags
          stats: [count, sum, min, max, avg, last, p50, p90, p99]
          keep_raw: true

The windows are `sidecar.aggregation`'s (pure); this module picks the points out of a batch,
names the groups, turns closed windows into messages and closes the windows on trio's clock
(`Aggregation.run`, a task the correlator's owner starts). With `pipeline.native` on and the
extension built, a step's windows are the native ones (`NativeWindows`, same semantics), which
read the batch's lines themselves: no point becomes a dict. The correlator routes what it emits
like any message, without the transform stage (an aggregate is not aggregated again).
"""

import collections
import fnmatch
import functools
import logging
import re
import time
from collections.abc import Callable, Iterable

import attrs
import orjson
import trio

from sidecar import native
from sidecar.aggregation import LATE_POLICIES, MAX_GROUP_BYTES, ClosedGroup, GroupKey, WindowCounts, Windows, check_stats, quantile_of
from sidecar.batch import Batch
from sidecar.message import epoch_ms, format_timestamp
from sidecar.source_keys import SourceKeys
from sidecar.units import Duration

import datetime as dt

log = logging.getLogger("sidecar.aggregate")

DEFAULT_STATS = ("count", "sum", "min", "max", "avg", "last", "p50", "p90", "p99")
SPAN_SUFFIX = ".duration_ms"  # an aggregate of span durations is the metric `NAME.duration_ms`


def _check_by(_instance, _attribute, by) -> None:
    wrong = [key for key in by if key not in ("source", "name", "tags") and not (key.startswith("tags.") and len(key) > 5)]
    if wrong:
        raise ValueError(f"unknown group key {', '.join(map(repr, wrong))} (known: source, name, tags for all tags, tags.NAME for one)")
    if "source" not in by or "name" not in by:
        raise ValueError("must hold source and name: an aggregate is routed by its source and named by its metric")


def _check_stats(_instance, _attribute, stats) -> None:
    if not stats:
        raise ValueError("must name at least one statistic")
    check_stats(stats)


def _check_late(_instance, _attribute, late) -> None:
    if late not in LATE_POLICIES:
        raise ValueError(f"must be one of {', '.join(LATE_POLICIES)}, got {late!r}")


def _positive(_instance, attribute, value) -> None:
    if value <= 0:
        raise ValueError(f"must be positive, got {value!r}")


@attrs.frozen
class AggregateSettings:
    metrics: tuple[str, ...] | None = None  # metric-name globs
    spans: tuple[str, ...] | None = None  # span-name globs: their ends' duration_ms
    window: Duration = attrs.field(default=60.0, validator=_positive)
    by: tuple[str, ...] = attrs.field(default=("source", "name", "tags"), validator=_check_by)
    stats: tuple[str, ...] = attrs.field(default=DEFAULT_STATS, validator=_check_stats)
    keep_raw: bool = True
    late: str = attrs.field(default="current", validator=_check_late)
    max_groups: int = attrs.field(default=10_000, validator=_positive)

    def __attrs_post_init__(self):
        if not self.metrics and not self.spans:
            raise ValueError("a step needs metrics (name globs) or spans (names), or both")


@attrs.frozen
class AggregateSpec:
    source: str  # a source key, as in routing
    settings: AggregateSettings
    where: object = attrs.field(eq=False)  # file:line of the step: moving it changes nothing
    position: int = 1  # among its key's steps


def _names_regex(globs: tuple[str, ...] | None):
    return re.compile("|".join(fnmatch.translate(g) for g in globs)) if globs else None


# A group without a sketch, on either windows, with its entries in its window's maps: at most
# this (142 bytes measured on the Python windows; its key's strings come on top).
GROUP_BASE_BYTES = 1024
# The native windows' memo of sent keys, a key at most: its table slot (16 bytes and a control
# byte, 16/7 of them a key when the table has just grown), and its length and bytes (at most
# 512) in a buffer that may have twice the room it uses.
SENT_KEY_BYTES = 40 + 2 * (2 + 512)


def bound_bytes(settings: AggregateSettings, native_path: bool) -> int:
    """The most a step's windows hold, the groups' key strings aside: two windows (the current
    one and the next) of `max_groups` groups, each of at most the windows' bound with quantiles
    in `stats` and GROUP_BASE_BYTES without, and the native windows' memo of sent keys. (Each
    source also has an `__overflow__` group beyond the cap once it overflows.)"""
    native_path = native.use_native(native_path)  # as AggregateStep chooses its windows
    quantiles = any(quantile_of(stat) is not None for stat in settings.stats)
    group = (native.AGGREGATE_MAX_GROUP_BYTES if native_path else MAX_GROUP_BYTES) if quantiles else GROUP_BASE_BYTES
    memo = (2 * settings.max_groups + 64) * SENT_KEY_BYTES if native_path else 0
    return 2 * (settings.max_groups * group + memo)


def step_label(spec: AggregateSpec) -> str:
    return f"{spec.source}[aggregate]" if spec.position == 1 else f"{spec.source}[aggregate {spec.position}]"


class NativeWindows:
    """A step's windows on the native path (`sidecar._native.AggregateWindows`: the semantics of
    `sidecar.aggregation.Windows` and of this module's point picking, quantiles from the crate
    `sketches-ddsketch` at the same 1%), behind `Windows`' interface, plus `take`, which reads a
    batch's lines itself."""

    def __init__(self, settings: "AggregateSettings", now: float):
        self.window = settings.window
        self.stats = settings.stats
        by_tags = None if "tags" in settings.by else [key[5:] for key in settings.by if key.startswith("tags.")]
        self._windows = windows = native.AggregateWindows(
            settings.window, [(stat, quantile_of(stat)) for stat in settings.stats], late=settings.late, max_groups=settings.max_groups, now=now,
            metrics=list(settings.metrics or ()), spans=list(settings.spans or ()), tags=by_tags,
        )
        self.take, self.add, self.next_close = windows.take, windows.add, windows.next_close
        self.max_group_bytes = native.AGGREGATE_MAX_GROUP_BYTES

    @property
    def counts(self) -> WindowCounts:
        return WindowCounts(*self._windows.counts())

    @property
    def groups(self) -> int:
        return self._windows.groups

    @property
    def closed_until(self) -> float:
        return self._windows.closed_until

    def close(self, now: float) -> list[ClosedGroup]:
        return [ClosedGroup(*closed) for closed in self._windows.close(now)]

    def flush(self, now: float) -> list[ClosedGroup]:
        return [ClosedGroup(*closed) for closed in self._windows.flush(now)]


class AggregateStep:
    """One configured step, running: its windows and what it counted. `native`: whether its
    windows are the native ones (the caller's `pipeline.native`, where the extension is built)."""

    def __init__(self, spec: AggregateSpec, now: float, native_path: bool = False):
        self.spec = spec
        settings = spec.settings
        self.label = step_label(spec)
        self.native = native.use_native(native_path)
        self.windows = self._new_windows(now)
        self.emitted = 0
        self.internal_errors = 0  # closings that failed (a bug): their windows were let go
        self._metrics = _names_regex(settings.metrics)
        self._spans = _names_regex(settings.spans)
        self._all_tags = "tags" in settings.by
        self._tags = tuple(key[5:] for key in settings.by if key.startswith("tags."))
        self._last_stamp: tuple[str | None, int | None] = (None, None)  # a timestamp and its ms

    def _new_windows(self, now: float):
        settings = self.spec.settings
        if self.native:
            return NativeWindows(settings, now)
        return Windows(settings.window, settings.stats, late=settings.late, max_groups=settings.max_groups, now=now)

    def close(self, now: float, flush: bool = False) -> list[ClosedGroup]:
        """The windows ended by `now` (every open one with `flush`). A bug met closing them
        costs this step's open windows, logged and counted, and nothing else: the step starts
        afresh rather than failing again at every turn of the timer."""
        try:
            return self.windows.flush(now) if flush else self.windows.close(now)
        except Exception:
            self.internal_errors += 1
            log.exception("internal error while closing the windows of %s; its open windows (%d groups) are let go", self.label, self._groups_or_zero())
            self.windows = self._new_windows(now)
            return []

    def _groups_or_zero(self) -> int:
        try:
            return self.windows.groups
        except Exception:  # the windows are what failed: their size is only for the log line
            return 0

    def take(self, batch: Batch, now: float) -> Batch:
        """Add the batch's points to the windows; the batch to pass on (without them when
        `keep_raw` is false)."""
        taken = []
        source = batch.source
        if self.native:
            # The native windows read the lines; one they cannot (an escaped key, say) is read
            # here, in its place among them, and they go on after it.
            lines = batch.lines
            wanted = None if self.spec.settings.keep_raw else taken
            at = 0
            points = batch.points
            while (at := self.windows.take(source, lines, at, now, wanted, points)) < len(lines):
                self._take_message(source, orjson.loads(lines[at]), at, now, taken)
                at += 1
        else:
            for index, message in enumerate(batch.messages()):
                self._take_message(source, message, index, now, taken)
        if taken and not self.spec.settings.keep_raw:
            chosen = set(taken)
            return batch.pick([i for i in range(len(batch)) if i not in chosen])
        return batch

    def _take_message(self, source: str, message: dict, index: int, now: float, taken: list[int]) -> None:
        kind = message["type"]
        data = message["data"]
        metrics, spans = self._metrics, self._spans
        if kind == "metric" and metrics is not None and "aggregation" not in data and metrics.match(data["name"]):
            key = (source, data["name"], self._tags_of(data.get("tags")))
            value = data["value"]
            unit = data.get("unit") or None
        elif kind == "span" and spans is not None and data.get("phase") == "end" and spans.match(data["name"]):
            key = (source, data["name"] + SPAN_SUFFIX, (("status", data["status"]),))
            value = data["duration_ms"]
            unit = None
        else:
            return
        timestamp = message["timestamp"]
        last, stamped = self._last_stamp
        if timestamp != last:  # a batch's points often share their millisecond
            stamped = epoch_ms(timestamp)
            self._last_stamp = (timestamp, stamped)
        self.windows.add(key, stamped / 1000 if stamped is not None else now, float(value), now, unit)
        taken.append(index)

    def _tags_of(self, tags: dict | None) -> tuple:
        if not tags:
            return ()
        if self._all_tags:
            return tuple(sorted(tags.items()))
        return tuple((name, tags[name]) for name in self._tags if name in tags)

    def statistics(self) -> dict:
        counts = self.windows.counts
        return {**attrs.asdict(counts), "open_groups": self.windows.groups, "emitted": self.emitted, "internal_errors": self.internal_errors, "max_bytes_per_group": self.windows.max_group_bytes}


@functools.lru_cache(maxsize=64)  # a close's groups share their window's bounds and its `now`
def _iso(seconds: float) -> str:
    return format_timestamp(dt.datetime.fromtimestamp(seconds, dt.timezone.utc))


def aggregate_message(closed: ClosedGroup, host: str, now: float) -> dict:
    """One closed group as the `metric` message the pipeline routes (docs/protocol.md), with
    its points' unit (span durations are in ms)."""
    source, name, tags = closed.key
    aggregation = {"window_start": _iso(closed.window_start), "window_end": _iso(closed.window_end), "partial": closed.partial, **closed.stats}
    data = {"name": name, "value": closed.sum, "tags": dict(tags), "aggregation": aggregation}
    unit = "ms" if name.endswith(SPAN_SUFFIX) else closed.unit
    if unit:
        data["unit"] = unit
    return {"source": source, "type": "metric", "timestamp": aggregation["window_start"], "data": data, "received_at": _iso(now), "host": host}


# Aggregates made and routed at a time when the timer closes windows, with a checkpoint
# between: a close of 10,000 groups (about 150 ms) would hold the event loop, and with it every
# socket, that long.
CLOSE_SLICE = 500


class Aggregation:
    """Every source key's aggregate steps and their open windows.

    Time: the points' timestamps are the wall clock's; the windows close on trio's clock (so
    tests can run them on a MockClock), through a fixed offset between the two taken when first
    needed (inside trio's run): `now() = epoch + clock()`.
    """

    def __init__(self, specs: Iterable[AggregateSpec] = (), *, host: str = "", clock: Callable[[], float] = trio.current_time, epoch: float | None = None, native: bool = True):
        self.clock = clock
        self._epoch = epoch
        self.host = host
        self.native = native  # `pipeline.native`: native windows where the extension is built
        self.steps: list[AggregateStep] = [AggregateStep(spec, self.now(), native) for spec in specs]
        self._keys = SourceKeys((step.spec.source, step) for step in self.steps)
        self._changed = trio.Event()
        self._scope = trio.CancelScope()
        # Groups the timer closed and has not routed yet, oldest first, with the time they
        # closed at: a reload or a flush meanwhile routes them first.
        self._closing: collections.deque[tuple[AggregateStep, ClosedGroup, float]] = collections.deque()

    def __bool__(self) -> bool:
        return bool(self.steps)

    @property
    def epoch(self) -> float:
        if self._epoch is None:
            self._epoch = time.time() - self.clock()
        return self._epoch

    def now(self) -> float:
        return self.epoch + self.clock()

    def apply(self, batch: Batch, removed: Callable) -> Batch:
        """Add the batch's points to its source's steps; `removed(label, count)` hears of the
        raw points a step with `keep_raw: false` kept from going further."""
        steps = self._keys.for_source(batch.source)
        if not steps:
            return batch
        now = self.now()
        for step in steps:
            before = len(batch)
            batch = step.take(batch, now)
            if len(batch) < before:
                removed(step.label, before - len(batch))
            if not len(batch):
                break
        return batch

    def reconfigure(self, specs: Iterable[AggregateSpec]) -> list[dict]:
        """Take a reload's steps: an unchanged step (same source key and settings) keeps its
        open windows and counts; those of a changed or removed step are emitted now, as partial
        where they had not ended (returned, for the caller to route)."""
        now = self.now()
        running: dict[AggregateSpec, list[AggregateStep]] = {}
        for step in self.steps:
            running.setdefault(attrs.evolve(step.spec, position=1), []).append(step)
        steps = []
        for spec in specs:
            kept = running.get(attrs.evolve(spec, position=1))
            if kept:
                step = kept.pop(0)
                step.spec = spec
                step.label = step_label(spec)
                steps.append(step)
            else:
                steps.append(AggregateStep(spec, now, self.native))
        self._close([step for left in running.values() for step in left], now, flush=True)
        self.steps = steps
        self._keys = SourceKeys((step.spec.source, step) for step in self.steps)
        self._changed.set()
        return self.take_closing()

    def close_due(self) -> None:
        """Close every window that has ended; `take_closing` gives their messages."""
        self._close(self.steps, self.now())

    def _close(self, steps: list[AggregateStep], now: float, flush: bool = False) -> None:
        """Close the steps' ended windows (every window with `flush`), their groups after those
        closed before and not routed yet."""
        self._closing.extend((step, group, now) for step in steps for group in step.close(now, flush=flush))

    def take_closing(self, limit: int | None = None) -> list[dict]:
        """The messages of (up to `limit` of) the groups closed and not routed yet, oldest first."""
        count = len(self._closing) if limit is None else min(limit, len(self._closing))
        messages = []
        for _ in range(count):
            step, group, now = self._closing.popleft()
            step.emitted += 1
            messages.append(aggregate_message(group, self.host, now))
        return messages

    def flush(self) -> list[dict]:
        """Stop the timer and close every window, partial ones included (shutdown); groups the
        timer closed and had not routed come first."""
        self._scope.cancel()
        self._close(self.steps, self.now(), flush=True)
        return self.take_closing()

    async def run(self, emit: Callable[[list[dict]], None], *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Close the windows as they end, handing their messages to `emit` CLOSE_SLICE at a
        time, until `flush`; a reload wakes it to look at its new steps."""
        task_status.started()
        with self._scope:
            while True:
                due = min((step.windows.next_close() for step in self.steps), default=None)
                self._changed = trio.Event()
                if due is None:
                    await self._changed.wait()
                    continue
                with trio.move_on_at(due - self.epoch):
                    await self._changed.wait()
                self.close_due()
                while self._closing:
                    emit(self.take_closing(CLOSE_SLICE))
                    await trio.lowlevel.checkpoint()

    def statistics(self) -> dict:
        return {step.label: step.statistics() for step in self.steps}
