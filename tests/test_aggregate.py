"""The aggregate step: the pure windows (hypothesis against an exact reference), the timer on
trio's MockClock, and a real sidecar's aggregates written by the files backend."""

import functools
import math
import operator

from hypothesis import given, settings, strategies as st

from sidecar.aggregation import OVERFLOW, RELATIVE_ACCURACY, GroupStats, Windows, check_stats, quantile_of

import pytest

STATS = ("count", "sum", "min", "max", "avg", "last", "p0", "p50", "p90", "p99", "p100")

# Magnitudes within the sketch's full-accuracy range (SKETCH_RANGE, about 8e8), and zero.
values = st.one_of(
    st.just(0.0),
    st.floats(min_value=1e-3, max_value=1e5),
    st.floats(min_value=-1e5, max_value=-1e-3),
    st.integers(min_value=-10**5, max_value=10**5).map(float),
)


def exact_quantile(ordered: list[float], q: float) -> float:
    """The value DDSketch estimates: the one of rank floor(q * (n - 1))."""
    return ordered[math.floor(q * (len(ordered) - 1))]


def assert_matches(result: dict, points: list[float]) -> None:
    assert result["count"] == len(points)
    assert result["sum"] == functools.reduce(operator.add, points, 0.0)  # in arrival order
    assert result["min"] == min(points)
    assert result["max"] == max(points)
    assert result["last"] == points[-1]
    assert result["avg"] == result["sum"] / len(points)
    ordered = sorted(points)
    for stat in ("p0", "p50", "p90", "p99", "p100"):
        exact = exact_quantile(ordered, quantile_of(stat))
        assert abs(result[stat] - exact) <= RELATIVE_ACCURACY * abs(exact) + 1e-12, (stat, result[stat], exact)


@settings(max_examples=300, deadline=None)
@given(st.lists(values, min_size=1, max_size=400))
def test_a_groups_statistics_are_exact_and_its_quantiles_within_the_sketchs_error(points):
    stats = GroupStats(quantiles=True)
    for value in points:
        stats.add(value)
    assert_matches(stats.result(STATS), points)


# (group index, seconds into the run, value); the clock only moves forward, points may lag it.
point_strategy = st.tuples(st.integers(0, 5), st.floats(0, 3.0), st.floats(-2.0, 0.0), values)


@settings(max_examples=200, deadline=None)
@given(st.lists(point_strategy, min_size=1, max_size=300), st.sampled_from(["current", "drop"]), st.sampled_from([0.5, 1.0, 10.0]))
def test_windows_hold_every_point_once_in_its_window_or_count_it(steps, late, window):
    start = 1_700_000_000.0
    windows = Windows(window, STATS, late=late, max_groups=100, now=start)
    reference: dict[tuple, list[float]] = {}
    emitted: dict[tuple, dict] = {}
    late_points = dropped = 0
    now = start
    for group, advance, lag, value in sorted(steps, key=lambda s: s[1]):
        now = max(now, start + advance)
        for closed in windows.close(now):
            emitted[closed.key, closed.window_start] = closed
        timestamp = now + lag
        key = ("svc", f"m{group}", (("g", str(group)),))
        window_start = math.floor(timestamp / window) * window
        if window_start < windows.closed_until:
            late_points += 1
            if late == "drop":
                dropped += 1
                assert not windows.add(key, timestamp, value, now)
                continue
            window_start = max(math.floor(now / window) * window, windows.closed_until)
        assert windows.add(key, timestamp, value, now)
        reference.setdefault((key, window_start), []).append(value)
    for closed in windows.flush(now):
        emitted[closed.key, closed.window_start] = closed
    assert set(emitted) == set(reference)
    for place, closed in emitted.items():
        assert_matches(closed.stats, reference[place])
        assert closed.window_end == closed.window_start + window
        assert closed.partial == (closed.window_end > now)
    assert windows.counts.late == late_points
    assert windows.counts.dropped == dropped
    assert windows.counts.points == len(steps)
    assert not windows.open


@given(st.integers(1, 20), st.lists(st.integers(0, 40), min_size=1, max_size=200))
def test_groups_past_max_groups_fold_into_their_sources_overflow_group(max_groups, groups):
    windows = Windows(60.0, ("count", "sum"), max_groups=max_groups, now=0.0)
    admitted: list[int] = []
    for group in groups:
        if group not in admitted and len(admitted) < max_groups:
            admitted.append(group)
        windows.add(("svc", f"m{group}", ()), 1.0, 1.0, 1.0)
    closed = {c.key[1]: c.stats["count"] for c in windows.flush(1.0)}
    folded = sum(1 for g in groups if g not in admitted)
    assert windows.counts.overflow == folded
    assert closed.pop(OVERFLOW, 0) == folded
    assert closed == {f"m{g}": groups.count(g) for g in admitted}


def test_points_stamped_more_than_a_window_ahead_are_early_and_follow_the_policy():
    windows = Windows(10.0, ("count",), late="current", now=100.0)
    windows.add(("s", "m", ()), 115.0, 1.0, 101.0)  # the next window: kept there
    windows.add(("s", "m", ()), 125.0, 1.0, 101.0)  # two ahead: early, into the current one
    assert windows.counts.early == 1
    assert [(c.window_start, c.stats["count"]) for c in windows.flush(101.0)] == [(100.0, 1), (110.0, 1)]


def test_unknown_statistics_are_named():
    check_stats(["count", "p99.9", "p0"])
    with pytest.raises(ValueError, match="'median'"):
        check_stats(["median", "count"])
    assert quantile_of("p99.9") == pytest.approx(0.999)


# ---------------------------------------------------------------- the step and its timer

import trio
import trio.testing

from sidecar import native
from sidecar.aggregate import CLOSE_SLICE, AggregateSettings, AggregateSpec, AggregateStep, Aggregation
from sidecar.batch import Batch
from sidecar.message import epoch_ms, format_timestamp
import datetime as dt

EPOCH = 1_700_000_005.0  # the wall clock when the MockClock reads 0: 5 s into a 10 s window


def stamp(seconds: float) -> str:
    return format_timestamp(dt.datetime.fromtimestamp(seconds, dt.timezone.utc))


def metric(name: str, value, at: float, source: str = "svc", **tags) -> dict:
    return {"source": source, "type": "metric", "timestamp": stamp(at), "data": {"name": name, "value": value, "tags": tags}, "received_at": stamp(at), "host": "h"}


def span_end(name: str, status: str, duration_ms: float, at: float) -> dict:
    return {"source": "svc", "type": "span", "timestamp": stamp(at), "span_id": "a" * 16, "data": {"name": name, "phase": "end", "status": status, "duration_ms": duration_ms}}


def spec(**settings) -> AggregateSpec:
    return AggregateSpec("svc", AggregateSettings(**settings), where="test:1")


# Each step test runs on the Python windows and on the native ones (when the extension is built).
PATHS = [pytest.param(False, id="python"), pytest.param(True, id="native", marks=pytest.mark.skipif(not native.AVAILABLE, reason="sidecar._native not built"))]


@pytest.fixture(params=PATHS)
def native_path(request) -> bool:
    return request.param


async def test_windows_close_at_their_end_on_trios_clock_and_emit_one_message_per_group(autojump_clock, native_path):
    aggregation = Aggregation([spec(metrics=("jobs_*",), spans=("process_job",), window=10.0, stats=("count", "sum", "max", "p50"))], host="h", epoch=EPOCH, native=native_path)
    assert [step.native for step in aggregation.steps] == [native_path]  # the windows asked for
    emitted: list[tuple[float, list[dict]]] = []
    removed = []
    batch = Batch.of([
        metric("jobs_done", 1, EPOCH), metric("jobs_done", 3, EPOCH + 1, env="prod"), metric("other", 5, EPOCH),
        metric("jobs_done", 2, EPOCH + 2, env="prod"), span_end("process_job", "ok", 12.5, EPOCH), span_end("process_job", "error", 40, EPOCH),
    ])
    assert aggregation.apply(batch, lambda label, count: removed.append((label, count))) is batch  # keep_raw
    assert not removed
    async with trio.open_nursery() as nursery:
        await nursery.start(aggregation.run, lambda messages: emitted.append((trio.current_time(), messages)))
        await trio.sleep(4.9)
        assert not emitted
        await trio.sleep(0.2)
        assert [at for at, _ in emitted] == [5.0]  # 1_700_000_010: the window's end
        aggregation.apply(Batch.of([metric("jobs_done", 7, EPOCH + 6)]), removed.append)
        await trio.sleep(10)
        nursery.cancel_scope.cancel()
    first = {(m["data"]["name"], tuple(sorted(m["data"]["tags"].items()))): m for m in emitted[0][1]}
    assert set(first) == {("jobs_done", ()), ("jobs_done", (("env", "prod"),)), ("process_job.duration_ms", (("status", "ok"),)), ("process_job.duration_ms", (("status", "error"),))}
    prod = first["jobs_done", (("env", "prod"),)]
    assert prod["type"] == "metric" and prod["source"] == "svc" and prod["timestamp"] == "2023-11-14T22:13:20.000Z"
    assert prod["data"]["value"] == 5
    assert prod["data"]["aggregation"] == {"window_start": "2023-11-14T22:13:20.000Z", "window_end": "2023-11-14T22:13:30.000Z", "partial": False, "count": 2, "sum": 5.0, "max": 3.0, "p50": pytest.approx(2.0, rel=RELATIVE_ACCURACY)}
    assert first["process_job.duration_ms", (("status", "error"),)]["data"]["unit"] == "ms"
    assert [at for at, _ in emitted] == [5.0, 15.0]
    assert emitted[1][1][0]["data"]["aggregation"]["count"] == 1


async def test_keep_raw_false_takes_the_points_out_and_reports_them(autojump_clock, native_path):
    aggregation = Aggregation([spec(metrics=("rows_loaded",), keep_raw=False)], epoch=EPOCH, native=native_path)
    removed = []
    out = aggregation.apply(Batch.of([metric("rows_loaded", 1, EPOCH), metric("kept", 1, EPOCH), metric("rows_loaded", 2, EPOCH)]), lambda label, count: removed.append((label, count)))
    assert [m["data"]["name"] for m in out.messages()] == ["kept"]
    assert removed == [("svc[aggregate]", 2)]


async def test_flush_emits_partial_windows_and_stops_the_timer(autojump_clock, native_path):
    aggregation = Aggregation([spec(metrics=("m",), window=10.0, stats=("count",))], epoch=EPOCH, native=native_path)
    aggregation.apply(Batch.of([metric("m", 1, EPOCH)]), print)
    emitted = []
    async with trio.open_nursery() as nursery:
        await nursery.start(aggregation.run, emitted.append)
        await trio.sleep(2)
        flushed = aggregation.flush()
    assert not emitted
    assert [(m["data"]["aggregation"]["partial"], m["data"]["aggregation"]["count"]) for m in flushed] == [(True, 1)]


async def test_a_bug_closing_a_steps_windows_costs_its_open_windows_and_the_timer_goes_on(autojump_clock, native_path):
    """A closing that raises (a bug, injected here) is counted and the step starts afresh: the
    timer does not stop, nor spin on the same failure, and the next window closes as usual."""
    aggregation = Aggregation([spec(metrics=("m",), window=10.0, stats=("count",))], epoch=EPOCH, native=native_path)
    (step,) = aggregation.steps
    aggregation.apply(Batch.of([metric("m", 1, EPOCH)]), print)

    def broken(now):
        raise RuntimeError("injected")

    step.windows.close = broken
    emitted = []
    async with trio.open_nursery() as nursery:
        await nursery.start(aggregation.run, emitted.extend)
        await trio.sleep(10)  # the first window's end: its closing fails
        assert step.statistics()["internal_errors"] == 1 and not emitted
        aggregation.apply(Batch.of([metric("m", 2, EPOCH + 10.5)]), print)
        await trio.sleep(10)
        aggregation.flush()
    assert step.statistics()["internal_errors"] == 1
    assert [(m["data"]["aggregation"]["count"], m["data"]["value"]) for m in emitted] == [(1, 2.0)]


async def test_a_reload_keeps_the_windows_of_an_unchanged_step_and_emits_those_of_a_changed_one(autojump_clock, native_path):
    kept, changed = spec(metrics=("a",), window=10.0), spec(metrics=("b",), window=10.0)
    aggregation = Aggregation([kept, changed], epoch=EPOCH, native=native_path)
    aggregation.apply(Batch.of([metric("a", 1, EPOCH), metric("b", 2, EPOCH)]), print)
    emitted = []
    async with trio.open_nursery() as nursery:
        await nursery.start(aggregation.run, emitted.append)
        await trio.sleep(1)
        moved = AggregateSpec("svc", kept.settings, where="test:9")  # the same step, on another line
        flushed = aggregation.reconfigure([moved, spec(metrics=("b",), window=20.0)])
        assert [(m["data"]["name"], m["data"]["aggregation"]["partial"]) for m in flushed] == [("b", True)]
        aggregation.apply(Batch.of([metric("a", 1, EPOCH + 2)]), print)
        await trio.sleep(5)
        nursery.cancel_scope.cancel()
    assert [(m["data"]["name"], m["data"]["aggregation"]["count"]) for m in emitted[0]] == [("a", 2)]


def test_the_settings_check_their_keys():
    with pytest.raises(ValueError, match="metrics .* or spans"):
        AggregateSettings()
    with pytest.raises(ValueError, match="source and name"):
        AggregateSettings(metrics=("m",), by=("name",))
    with pytest.raises(ValueError, match="unknown group key 'env'"):
        AggregateSettings(metrics=("m",), by=("source", "name", "env"))
    with pytest.raises(ValueError, match="current, drop"):
        AggregateSettings(metrics=("m",), late="later")


# ---------------------------------------------------------------- the configuration

from sidecar.config import ConfigError, load_config


def test_the_aggregate_section_is_read_per_source_key_with_file_line_errors(tmp_path):
    main = tmp_path / "sidecar.yaml"
    main.write_text(
        "aggregate:\n"
        "  queue-service:\n"
        "    - metrics: ['jobs_*', rows_loaded]\n"
        "      window: 10s\n"
        "      by: [source, name, tags.env]\n"
        "      stats: [count, p99]\n"
        "      keep_raw: false\n"
        "routing:\n"
        "  all:\n"
        "    - backend: console\n"
        "      filter: {aggregated: true}\n"
        "backends:\n"
        "  console: {type: console}\n"
    )
    config = load_config(main, None, {})
    [step] = config.aggregate
    assert (step.source, step.settings.metrics, step.settings.window, step.settings.by, step.settings.stats, step.settings.keep_raw) == ("queue-service", ("jobs_*", "rows_loaded"), 10.0, ("source", "name", "tags.env"), ("count", "p99"), False)
    assert config.rules[0].filter.aggregated is True
    main.write_text("aggregate:\n  svc:\n    - metrics: [m]\n      stats: [count, median]\n    - window: 10s\n    - {metrics: [m], late: later, max_groups: 0}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(main, None, {})
    problems = "\n".join(map(str, caught.value.problems))
    assert "sidecar.yaml:4" in problems and "'median'" in problems
    assert "sidecar.yaml:5" in problems and "metrics (name globs) or spans" in problems
    assert "sidecar.yaml:6" in problems and "aggregate.svc.late" in problems and "aggregate.svc.max_groups" in problems


# ---------------------------------------------------------------- through a real sidecar

import random
import signal
import socket
import time as wall

import orjson

from tests.harness import SidecarProcess, read_jsonl

E2E_CONFIG = """
tcp: {{host: 127.0.0.1, port: 0}}
shutdown: {{connection_grace: 0.2, drain_timeout: 10}}
backends:
  raw:
    type: filesystem
    base_path: {base}/raw
    create_base_path: true
    fsync: never
    batch: {{max_messages: 500, timeout: 0.05}}
  aggregates:
    type: filesystem
    base_path: {base}/aggregates
    create_base_path: true
    fsync: never
    batch: {{max_messages: 500, timeout: 0.05}}
aggregate:
  "svc-*":
    - metrics: ["jobs_*", rows_loaded]
      window: 10000h                    # one window for the whole test: flushed at SIGTERM
      stats: [count, sum, min, max, avg, last, p50, p90, p99]
    - spans: [process_job]
      window: 10000h
      stats: [count, max, p50]
  svc-a:
    - metrics: [late_one]
      window: 10000h
      late: drop
      keep_raw: false
    - metrics: [wide]
      window: 10000h
      by: [source, name, tags.k]
      max_groups: 5
      stats: [count]
    - metrics: [ticks]
      window: 1s
      stats: [count, sum]
routing:
  all:
    - backend: raw
      filter: {{aggregated: false}}
    - backend: aggregates
      filter: {{aggregated: true}}
"""


def test_a_sidecars_aggregates_match_a_reference_and_split_from_the_raw_points(tmp_path):
    sidecar = SidecarProcess(tmp_path, E2E_CONFIG.format(base=tmp_path / "out")).start()
    try:
        rng = random.Random(17)
        now = wall.time()
        points, reference = [], {}
        for index in range(6000):
            source = f"svc-{'abc'[index % 3]}"
            name = rng.choice(["jobs_done", "jobs_failed", "rows_loaded"])
            tags = rng.choice([{}, {"env": "prod"}, {"env": "dev", "zone": "z1"}])
            value = rng.randint(1, 4000) / 4  # exact in binary: sums equal in any order
            points.append(metric(name, value, now, source, **tags))
            reference.setdefault((source, name, tuple(sorted(tags.items()))), []).append(value)
        spans = [span_end("process_job", rng.choice(["ok", "error"]), rng.randint(1, 10**6) / 8, now) for _ in range(300)]
        for message in spans:
            message["source"] = "svc-b"
            reference.setdefault(("svc-b", "process_job.duration_ms", (("status", message["data"]["status"]),)), []).append(message["data"]["duration_ms"])
        late = [metric("late_one", 1, now - 10**8, "svc-a") for _ in range(7)]
        wide = [metric("wide", 1, now, "svc-a", k=str(i % 8)) for i in range(80)]  # 8 groups, 5 allowed
        ticks = [metric("ticks", 2, wall.time(), "svc-a") for _ in range(50)]
        sidecar.send(points + spans + late + wide + ticks)
        sent_raw = len(points) + len(spans) + len(wide) + len(ticks)  # late_one: keep_raw false
        # The 1 s window closes on the timer, before any SIGTERM.
        sidecar.wait_for(lambda s: s["aggregates_emitted"] >= 1 and s["backends"] and all(b["queued"] == 0 for b in s["backends"]), what="the ticks window to close")
        assert sidecar.stop(signal.SIGTERM) == 0
        stats = sidecar.stats()
    finally:
        if sidecar.process.poll() is None:
            sidecar.stop(signal.SIGKILL)
    raw = [m for path in sorted((tmp_path / "out" / "raw").glob("*.jsonl")) for m in read_jsonl(path)]
    aggregates = [m for path in sorted((tmp_path / "out" / "aggregates").glob("*.jsonl")) for m in read_jsonl(path)]
    assert len(raw) == sent_raw and not any("aggregation" in m["data"] for m in raw)
    assert aggregates and all("aggregation" in m["data"] for m in aggregates)
    found = {(m["source"], m["data"]["name"], tuple(sorted(m["data"]["tags"].items()))): m["data"] for m in aggregates if m["data"]["name"] not in ("ticks", "late_one", "wide", "__overflow__")}
    assert set(found) == set(reference)
    for key, values in reference.items():
        data = found[key]
        aggregation = data["aggregation"]
        assert aggregation["partial"] is True  # flushed by SIGTERM
        assert data["value"] == aggregation.get("sum", data["value"]) == sum(values)
        assert aggregation["count"] == len(values)
        assert aggregation["max"] == max(values)
        if "min" in aggregation:
            assert (aggregation["min"], aggregation["last"], aggregation["avg"]) == (min(values), values[-1], sum(values) / len(values))
        ordered = sorted(values)
        for stat in ("p50", "p90", "p99"):
            if stat in aggregation:
                exact = exact_quantile(ordered, quantile_of(stat))
                assert abs(aggregation[stat] - exact) <= RELATIVE_ACCURACY * exact, (key, stat)
    # Late points under `late: drop`: counted, not aggregated; their raw points removed.
    step = stats["correlator"]["aggregation"]
    assert step["svc-a[aggregate]"]["late"] == step["svc-a[aggregate]"]["dropped"] == 7
    assert not [m for m in aggregates if m["data"]["name"] == "late_one"]
    assert stats["removed_by_transforms"]["svc-a[aggregate]"] == 7
    # Overflow: 5 groups of 10 points kept, 3 folded into svc-a's __overflow__ group.
    assert step["svc-a[aggregate 2]"]["overflow"] == 30
    wide_counts = {m["data"]["name"] + m["data"]["tags"].get("k", ""): m["data"]["aggregation"]["count"] for m in aggregates if m["data"]["name"] in ("wide", "__overflow__")}
    assert wide_counts == {**{f"wide{k}": 10 for k in range(5)}, "__overflow__": 30}
    # The 1 s windows: every tick in a window that closed on time or (arriving after its
    # close) a later one; at least one closed by the timer rather than the flush.
    ticks_out = [m["data"]["aggregation"] for m in aggregates if m["data"]["name"] == "ticks"]
    assert sum(a["count"] for a in ticks_out) == 50 and sum(a["sum"] for a in ticks_out) == 100
    assert any(not a["partial"] for a in ticks_out)
    assert stats["aggregates_emitted"] == len(aggregates)


DROP_IN_MAIN = """
tcp: {{host: 127.0.0.1, port: 0}}
shutdown: {{connection_grace: 0.2, drain_timeout: 10}}
reload: {{poll_interval: 0.1, settle_delay: 0.05}}
backends:
  raw: {{type: filesystem, base_path: {base}/raw, create_base_path: true, fsync: never, batch: {{max_messages: 500, timeout: 0.05}}}}
  aggregates: {{type: filesystem, base_path: {base}/aggregates, create_base_path: true, fsync: never, batch: {{max_messages: 500, timeout: 0.05}}}}
"""

DROP_IN = """
svc:
  routes:
    - backend: raw
      filter: {{aggregated: false}}
    - backend: aggregates
      filter: {{aggregated: true}}
  aggregate:
    - metrics: [rows]
      window: 10000h
      stats: [{stats}]
"""


def test_a_drop_ins_entry_holds_routes_and_aggregate_steps_with_its_own_file_lines(tmp_path):
    main = tmp_path / "sidecar.yaml"
    main.write_text(DROP_IN_MAIN.format(base=tmp_path / "out"))
    routes = tmp_path / "routes.d"
    routes.mkdir()
    (routes / "svc.yaml").write_text(DROP_IN.format(stats="count, sum"))
    config = load_config(main, routes, {})
    [step] = config.aggregate
    assert (step.source, step.settings.metrics, step.settings.stats) == ("svc", ("rows",), ("count", "sum"))
    assert str(step.where) == f"{routes / 'svc.yaml'}:9"
    assert [(rule.backend, rule.filter.aggregated) for rule in config.rules] == [("raw", False), ("aggregates", True)]
    (routes / "svc.yaml").write_text(DROP_IN.format(stats="count, median") + "  transfroms: []\n")
    with pytest.raises(ConfigError) as caught:
        load_config(main, routes, {})
    problems = "\n".join(map(str, caught.value.problems))
    assert "svc.yaml:11" in problems and "'median'" in problems
    assert "svc.yaml:12" in problems and "'transfroms'" in problems and "did you mean 'transforms'" in problems


def test_windows_survive_a_reload_that_keeps_their_step_and_are_routed_partial_when_it_changes(tmp_path):
    """Through a real sidecar, the step in a drop-in: a reload that leaves the step as it was
    (another drop-in added) keeps the window's points; one that changes the step routes the
    window at once, partial, and the new step starts empty."""
    out = tmp_path / "out"
    sidecar = SidecarProcess(tmp_path, DROP_IN_MAIN.format(base=out), routes={"svc.yaml": DROP_IN.format(stats="count, sum")}).start()
    try:
        now = wall.time()
        sidecar.send([metric("rows", 1, now) for _ in range(100)])
        sidecar.wait_for(lambda s: s["routed"] == 100, what="the first points")
        sidecar.write_route("other.yaml", "other:\n  - backend: raw\n")
        sidecar.wait_for(lambda s: s["reloads"] == 1, what="the reload that keeps the step")
        sidecar.send([metric("rows", 2, now) for _ in range(50)])
        sidecar.wait_for(lambda s: s["routed"] == 150, what="the points after the first reload")
        assert sidecar.stats()["aggregates_emitted"] == 0
        sidecar.write_route("svc.yaml", DROP_IN.format(stats="count, sum, max"))
        sidecar.wait_for(lambda s: s["reloads"] == 2 and s["aggregates_emitted"] == 1, what="the reload that changes the step")
        sidecar.send([metric("rows", 4, now) for _ in range(25)])
        sidecar.wait_for(lambda s: s["routed"] == 175, what="the points after the second reload")
        assert sidecar.stop(signal.SIGTERM) == 0
    finally:
        if sidecar.process.poll() is None:
            sidecar.stop(signal.SIGKILL)
    aggregates = [m["data"] for path in sorted((out / "aggregates").glob("*.jsonl")) for m in read_jsonl(path)]
    assert [a["aggregation"] for a in aggregates] == [
        {"window_start": aggregates[0]["aggregation"]["window_start"], "window_end": aggregates[0]["aggregation"]["window_end"], "partial": True, "count": 150, "sum": 200.0},
        {"window_start": aggregates[0]["aggregation"]["window_start"], "window_end": aggregates[0]["aggregation"]["window_end"], "partial": True, "count": 25, "sum": 100.0, "max": 4.0},
    ]
    assert len([m for path in (out / "raw").glob("*.jsonl") for m in read_jsonl(path)]) == 175


EXACTNESS_CONFIG = """
tcp: {{host: 127.0.0.1, port: 0}}
shutdown: {{connection_grace: 0.2, drain_timeout: 60}}
backends:
  aggregates: {{type: filesystem, base_path: {base}, create_base_path: true, fsync: never}}
aggregate:
  all:
    - metrics: ["*"]
      window: 10000h                    # the current window and the next: flushed at SIGTERM
      stats: [count, sum, min, max, avg, last, p50, p90, p99, p99.9]
      keep_raw: false
routing:
  all:
    - backend: aggregates
"""


def test_a_million_points_aggregate_exactly_through_a_real_sidecar(tmp_path):
    """1,000,000 points of 3 sources, 20 names and 50 tag sets over two windows (stamped in the
    current one and the next): every window's count, sum, min, max and last equal the
    reference, every quantile within the sketch's relative error of the exact one."""
    sidecar = SidecarProcess(tmp_path, EXACTNESS_CONFIG.format(base=tmp_path / "out")).start()
    window = 10000 * 3600
    rng = random.Random(1_000_000)
    now = wall.time()
    stamps = [stamp(now), stamp(now + window)]
    reference: dict[tuple, list[float]] = {}
    try:
        for source_number in range(3):
            source = f"svc-{source_number}"
            lines = []
            for seq in range(1_000_000 // 3 + (source_number < 1_000_000 % 3)):
                name = f"m{rng.randrange(20)}"
                tags = {"table": f"t{rng.randrange(50)}"}
                later = rng.random() < 0.5
                value = rng.lognormvariate(3, 2) if seq % 4 else rng.randint(-400, 4000) / 4
                lines.append(orjson.dumps({"source": source, "type": "metric", "timestamp": stamps[later], "data": {"name": name, "value": value, "tags": tags}}) + b"\n")
                reference.setdefault((later, source, name, tags["table"]), []).append(value)
            with socket.create_connection(("127.0.0.1", sidecar.port), timeout=120) as connection:
                connection.sendall(b"".join(lines))
                connection.shutdown(socket.SHUT_WR)
                connection.recv(1)
        assert sum(map(len, reference.values())) == 1_000_000
        sidecar.wait_for(lambda s: s["received"] == 1_000_000, timeout=120, what="every point")
        assert sidecar.stop(signal.SIGTERM, timeout=120) == 0
        stats = sidecar.stats()
    finally:
        if sidecar.process.poll() is None:
            sidecar.stop(signal.SIGKILL)
    aggregates = [m for path in sorted((tmp_path / "out").glob("*.jsonl")) for m in read_jsonl(path)]
    starts = sorted({m["data"]["aggregation"]["window_start"] for m in aggregates})
    assert len(starts) == 2 and len(aggregates) == len(reference) == 6000
    step = stats["correlator"]["aggregation"]["all[aggregate]"]
    assert (step["points"], step["late"], step["early"], step["overflow"]) == (1_000_000, 0, 0, 0)
    for message in aggregates:
        data = message["data"]
        aggregation = data["aggregation"]
        values = reference[(aggregation["window_start"] == starts[1], message["source"], data["name"], data["tags"]["table"])]
        assert aggregation["count"] == len(values)
        assert data["value"] == aggregation["sum"] == functools.reduce(operator.add, values, 0.0)  # in arrival order
        assert (aggregation["min"], aggregation["max"], aggregation["last"]) == (min(values), max(values), values[-1])
        assert aggregation["avg"] == aggregation["sum"] / len(values)
        ordered = sorted(values)
        for stat in ("p50", "p90", "p99", "p99.9"):
            exact = exact_quantile(ordered, quantile_of(stat))
            assert abs(aggregation[stat] - exact) <= RELATIVE_ACCURACY * abs(exact), (message["source"], data["name"], data["tags"], stat)


# The native windows against the Python ones and an exact reference: the same random batches
# (metric points and span ends, random tags, keys spelt with escapes that the native reader
# leaves to the Python one, stamps around window boundaries, late and early points, more groups
# than max_groups) through both kinds of step.

import fnmatch
import re

needs_native = pytest.mark.skipif(not native.AVAILABLE, reason="sidecar._native not built")

BASE_MS = 1_700_000_000_000
tag_sets = st.dictionaries(st.sampled_from(["a", "b", 'q"k', "é"]), st.sampled_from(["1", "2", "x\ny", "ü"]), max_size=3)


@st.composite
def messages(draw, at_ms: int) -> dict:
    stamp_ms = at_ms + draw(st.integers(-25_000, 25_000))
    stamp_text = stamp(stamp_ms / 1000)
    if draw(st.booleans()):
        value = draw(st.one_of(values, st.integers(-10**6, 10**6)))
        data = {"name": draw(st.sampled_from(["m1", "m2", "mé", "other", OVERFLOW])), "value": value, "tags": draw(tag_sets)}
        if draw(st.integers(0, 3)) == 0:
            data["unit"] = draw(st.sampled_from(["", "ms", "rows"]))
        if draw(st.integers(0, 9)) == 0:
            data["aggregation"] = {"count": 1}
        return {"source": "svc", "type": "metric", "timestamp": stamp_text, "data": data, "received_at": stamp_text, "host": "h"}
    phase = draw(st.sampled_from(["end", "end", "start"]))
    data = {"name": draw(st.sampled_from(["s1", "s2", "t1"])), "phase": phase}
    if phase == "end":
        data |= {"status": draw(st.sampled_from(["ok", "error"])), "duration_ms": draw(st.one_of(st.just(0.0), st.floats(1e-3, 1e5), st.integers(0, 10**5)))}
    return {"source": "svc", "type": "span", "timestamp": stamp_text, "span_id": "a" * 16, "data": data}


class ExactWindows:
    """The windows' rules, with every value kept: the reference for quantiles."""

    def __init__(self, window: float, late: str, max_groups: int, now: float):
        self.window, self.late, self.max_groups = window, late, max_groups
        self.closed_until = math.floor(now / window) * window
        self.open: dict[float, dict[tuple, list[float]]] = {}

    def add(self, key: tuple, timestamp: float, value: float, now: float) -> None:
        start = math.floor(timestamp / self.window) * self.window
        current = max(math.floor(now / self.window) * self.window, self.closed_until)
        if start < self.closed_until or start > current + self.window:
            if self.late == "drop":
                return
            start = current
        groups = self.open.setdefault(start, {})
        if key not in groups and len(groups) >= self.max_groups and key[1] != OVERFLOW:
            key = (key[0], OVERFLOW, ())
        groups.setdefault(key, []).append(value)

    def close(self, now: float, everything: bool = False) -> dict:
        boundary = math.floor(now / self.window) * self.window
        if not everything and boundary <= self.closed_until:
            return {}
        self.closed_until = max(self.closed_until, boundary)
        starts = [s for s in self.open if everything or s + self.window <= boundary]
        return {(key, start): points for start in starts for key, points in self.open.pop(start).items()}


def exact_points(settings: AggregateSettings, batch: Batch, reference: ExactWindows, now: float) -> None:
    """The points a step takes, by the documented rules, into the reference."""
    for message in batch.messages():
        data = message["data"]
        at = epoch_ms(message["timestamp"]) / 1000
        if message["type"] == "metric" and "aggregation" not in data and any(fnmatch.fnmatchcase(data["name"], g) for g in settings.metrics or ()):
            tags = data.get("tags") or {}
            chosen = sorted(tags.items()) if "tags" in settings.by else [(k[5:], tags[k[5:]]) for k in settings.by if k.startswith("tags.") and k[5:] in tags]
            reference.add(("svc", data["name"], tuple(chosen)), at, float(data["value"]), now)
        elif message["type"] == "span" and data["phase"] == "end" and any(fnmatch.fnmatchcase(data["name"], g) for g in settings.spans or ()):
            reference.add(("svc", data["name"] + ".duration_ms", (("status", data["status"]),)), at, float(data["duration_ms"]), now)


def assert_same_groups(python: list, native_closed: list, exact: dict) -> None:
    assert [(c.key, c.window_start, c.window_end, c.partial, c.unit) for c in native_closed] == [(c.key, c.window_start, c.window_end, c.partial, c.unit) for c in python]
    for ours, theirs in zip(native_closed, python):
        assert {k: v for k, v in ours.stats.items() if k in EXACT} == {k: v for k, v in theirs.stats.items() if k in EXACT}
        assert ours.sum == theirs.sum
        points = exact[ours.key, ours.window_start]
        assert_matches(ours.stats, points)


EXACT = ("count", "sum", "min", "max", "avg", "last")


@needs_native
@settings(max_examples=150, deadline=None)
@given(
    st.data(),
    st.sampled_from([1.0, 10.0]),
    st.sampled_from(["current", "drop"]),
    st.integers(1, 6),
    st.sampled_from([("source", "name", "tags"), ("source", "name", "tags.a", "tags.é")]),
    st.booleans(),
)
def test_the_native_windows_give_the_python_windows_results(data, window, late, max_groups, by, keep_raw):
    settings_ = AggregateSettings(metrics=("m*", OVERFLOW), spans=("s?",), window=window, by=by, stats=STATS, late=late, max_groups=max_groups, keep_raw=keep_raw)
    now_ms = BASE_MS + data.draw(st.integers(0, 20_000))
    now = now_ms / 1000
    step_spec = AggregateSpec("svc", settings_, where="test:1")
    python, ours = AggregateStep(step_spec, now, False), AggregateStep(step_spec, now, True)
    assert (python.native, ours.native) == (False, True)
    reference = ExactWindows(window, late, max_groups, now)
    exact: dict = {}
    closed_python, closed_native = [], []
    for _round in range(data.draw(st.integers(1, 4))):
        now_ms += data.draw(st.integers(0, 15_000))
        now = now_ms / 1000
        closed_python += python.windows.close(now)
        closed_native += ours.windows.close(now)
        exact |= reference.close(now)
        batch = Batch.of(data.draw(st.lists(messages(now_ms), min_size=1, max_size=40)))
        out_python, out_native = python.take(batch, now), ours.take(batch, now)
        assert out_native.lines == out_python.lines
        exact_points(settings_, batch, reference, now)
        assert ours.windows.groups == python.windows.groups
        assert ours.windows.next_close() == python.windows.next_close()
    now += data.draw(st.sampled_from([0.0, 0.5, window]))
    closed_python += python.windows.flush(now)
    closed_native += ours.windows.flush(now)
    exact |= reference.close(now, everything=True)
    assert_same_groups(closed_python, closed_native, exact)
    assert len(closed_native) == len(exact)
    assert ours.windows.counts == python.windows.counts
    assert ours.windows.groups == 0


from sidecar.ingest import NativeChunk, TraceJobs
from sidecar.protocol import StreamDecoder

# Tag keys spelt without escapes: the native decoder takes them (a key with one sends a whole
# chunk the Python way, which gives no record).
plain_tag_sets = st.dictionaries(st.sampled_from(["a", "b", "é"]), st.sampled_from(["1", "2", "x\ny", "ü"]), max_size=3)


@st.composite
def sent_messages(draw, at_ms: int) -> dict:
    """A message as a client sends it: what `messages` draws, without the sidecar's fields."""
    message = draw(messages(at_ms))
    message.pop("received_at", None)
    message.pop("host", None)
    if message["type"] == "metric":
        message["data"]["tags"] = draw(plain_tag_sets)
    return message


def decoded_batch(sent: list[dict]) -> Batch:
    """The messages through the real decoder and enrichment, as the correlator gets them with
    aggregate steps running: one batch, with the decoder's record of its lines."""
    chunk, errors = StreamDecoder(native=True).receive_data(b"".join(orjson.dumps(m) + b"\n" for m in sent))
    assert not errors and isinstance(chunk, NativeChunk)
    (batch,) = chunk.enrich("2023-11-14T22:13:20.000Z", "h", TraceJobs(100), points=True).batches
    assert batch.points is not None and len(batch.points) == len(batch) == len(sent)
    return batch


@needs_native
@settings(max_examples=150, deadline=None)
@given(
    st.data(),
    st.sampled_from([1.0, 10.0]),
    st.sampled_from(["current", "drop"]),
    st.integers(1, 6),
    st.sampled_from([("source", "name", "tags"), ("source", "name", "tags.a", "tags.é")]),
    st.booleans(),
)
def test_the_decoders_record_gives_what_the_lines_give(data, window, late, max_groups, by, keep_raw):
    """A native step reading a batch's points (`Batch.points`, with its memo of the groups met)
    and one reading its enriched lines agree on everything: groups, statistics (the same
    sketch, so quantiles too), units, counts and the raw points passed on."""
    settings_ = AggregateSettings(metrics=("m*", OVERFLOW), spans=("s?",), window=window, by=by, stats=STATS, late=late, max_groups=max_groups, keep_raw=keep_raw)
    now_ms = BASE_MS + data.draw(st.integers(0, 20_000))
    step_spec = AggregateSpec("svc", settings_, where="test:1")
    by_points, by_lines = AggregateStep(step_spec, now_ms / 1000, True), AggregateStep(step_spec, now_ms / 1000, True)
    closed_points, closed_lines = [], []
    for _round in range(data.draw(st.integers(1, 4))):
        now_ms += data.draw(st.integers(0, 15_000))
        now = now_ms / 1000
        closed_points += by_points.windows.close(now)
        closed_lines += by_lines.windows.close(now)
        batch = decoded_batch(data.draw(st.lists(sent_messages(now_ms), min_size=1, max_size=40)))
        lines_only = Batch(batch.source, list(batch.lines), list(batch.timestamps))
        out_points, out_lines = by_points.take(batch, now), by_lines.take(lines_only, now)
        assert out_points.lines == out_lines.lines
        assert by_points.windows.counts == by_lines.windows.counts
        assert by_points.windows.groups == by_lines.windows.groups
    now += data.draw(st.sampled_from([0.0, 0.5, window]))
    closed_points += by_points.windows.flush(now)
    closed_lines += by_lines.windows.flush(now)
    assert closed_points == closed_lines


GLOB_ALPHABET = "ab-!^[]\\*?&~|é"


@needs_native
@settings(max_examples=1000, deadline=None)
@given(st.text(GLOB_ALPHABET, max_size=8), st.lists(st.text(GLOB_ALPHABET + "\n", max_size=6), min_size=1, max_size=5))
def test_the_native_globs_match_as_fnmatchcase(glob, names):
    """The native step's metric globs, through the extension, against fnmatch.fnmatchcase; a
    glob Python cannot compile is refused by both."""
    try:
        re.compile(fnmatch.translate(glob))
    except (re.error, IndexError):
        with pytest.raises(ValueError):
            native.AggregateWindows(10.0, [("count", None)], late="current", max_groups=10, now=0.0, metrics=[glob], spans=[], tags=None)
        return
    windows = native.AggregateWindows(10.0, [("count", None)], late="current", max_groups=10, now=0.0, metrics=[glob], spans=[], tags=None)
    lines = [orjson.dumps({"source": "s", "type": "metric", "timestamp": "1970-01-01T00:00:01.000Z", "data": {"name": name or "x", "value": 1}}) for name in names]
    taken: list[int] = []
    assert windows.take("s", lines, 0, 1.0, taken) == len(lines)
    assert taken == [i for i, name in enumerate(names) if fnmatch.fnmatchcase(name or "x", glob)]


# -- the stated bound --------------------------------------------------------------------------

import subprocess
import sys
import tracemalloc

from sidecar.aggregate import bound_bytes


def test_the_python_windows_stay_within_the_stated_bound_with_every_group_at_its_widest():
    """Two windows of max_groups groups, each with values over the sketch's whole range and
    beyond (so both stores fill and collapse), hold less than `bound_bytes` says."""
    settings_ = AggregateSettings(metrics=("m",), window=10.0, stats=STATS, max_groups=20)
    windows = Windows(settings_.window, settings_.stats, max_groups=settings_.max_groups, now=BASE_MS / 1000)
    keys = [("svc", "m", (("g", str(g)),)) for g in range(settings_.max_groups)]
    values = [sign * 10.0 ** (exponent / 20) for exponent in range(-200, 260) for sign in (1, -1)] + [0.0]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for window in range(2):
            for key in keys:
                for value in values:
                    windows.add(key, BASE_MS / 1000 + 10 * window, value, BASE_MS / 1000)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert windows.groups == 2 * settings_.max_groups and windows.counts.overflow == 0
    assert held <= bound_bytes(settings_, native_path=False), (held, bound_bytes(settings_, native_path=False))


def test_check_states_each_steps_bound(tmp_path):
    config = tmp_path / "sidecar.yaml"
    config.write_text(f"""tcp: {{host: 127.0.0.1, port: 0}}
pipeline: {{native: false}}
backends:
  files: {{type: filesystem, base_path: {tmp_path / "out"}, create_base_path: true}}
routing:
  all: [{{backend: files}}]
aggregate:
  all:
    - metrics: ["*"]
    - metrics: [x]
      stats: [count, sum]
      max_groups: 500
""")
    done = subprocess.run([sys.executable, "-m", "sidecar", "check", "--config", str(config)], capture_output=True, text=True, timeout=60, cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    bounds = [line.strip() for line in done.stdout.splitlines() if "groups a window" in line]
    assert bounds == [
        "at most 10,000 groups a window; its windows hold at most 1,289 MiB (Python windows, the groups' names and tags aside)",
        "at most 500 groups a window; its windows hold at most 1 MiB (Python windows, the groups' names and tags aside)",
    ]


async def test_a_close_of_many_groups_is_routed_a_slice_at_a_time_and_a_flush_meanwhile_loses_none(autojump_clock, native_path):
    """The timer routes a window's aggregates CLOSE_SLICE at a time with a checkpoint between,
    so other tasks (the sockets' readers) run meanwhile; a shutdown's flush between two slices
    routes the rest, before the partial windows."""
    groups = 3 * CLOSE_SLICE + 10
    aggregation = Aggregation([spec(metrics=("m",), window=10.0, stats=("count",))], epoch=EPOCH, native=native_path)
    aggregation.apply(Batch.of([metric("m", 1, EPOCH, table=f"t{i}") for i in range(groups)]), print)
    emitted: list[list[dict]] = []
    first_slice = trio.Event()
    between: list[int] = []  # the slices routed when the other task woke

    def emit(messages: list[dict]) -> None:
        emitted.append(messages)
        if len(emitted) == 1:
            first_slice.set()
        if len(emitted) == 3:
            flushed.extend(aggregation.flush())

    async def other_task():
        await first_slice.wait()
        between.append(len(emitted))

    flushed: list[dict] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(other_task)
        await nursery.start(aggregation.run, emit)
        aggregation.apply(Batch.of([metric("m", 2, EPOCH + 10.5)]), print)  # the next window's
        await trio.sleep(10)
        nursery.cancel_scope.cancel()
    assert [len(messages) for messages in emitted] == [CLOSE_SLICE] * 3
    # Woken by the first slice, the other task ran before the third: a checkpoint puts the
    # timer in the same batch as the tasks runnable then (trio may shuffle their order).
    assert between in ([1], [2])
    assert [m["data"]["aggregation"]["partial"] for m in flushed] == [False] * 10 + [True]
    tables = [m["data"]["tags"].get("table") for messages in emitted for m in messages] + [m["data"]["tags"].get("table") for m in flushed]
    assert sorted(filter(None, tables)) == sorted(f"t{i}" for i in range(groups))
    assert aggregation.steps[0].statistics()["emitted"] == groups + 1
