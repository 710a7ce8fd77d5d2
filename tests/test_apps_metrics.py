"""The applications' metrics for Prometheus: the pure state (sidecar.apps_metrics) under
hypothesis, and GET /metrics/apps of a real sidecar parsed by prometheus_client's parser."""

import math
import re
import signal
import time as wall

from hypothesis import given, settings, strategies as st
from prometheus_client.parser import text_string_to_metric_families

from sidecar.apps_metrics import AppsMetrics, label_name, labels_of, metric_name
from sidecar.http import AppsCollector
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry

from tests.harness import SidecarProcess

METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")

names = st.text(min_size=1, max_size=12)
tag_sets = st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=3)


# The time the pure state is given: no window below (10 s each, from 10:00:00 to 10:00:50) is
# stale yet, the earliest from 10:00:30.
NOW = 1796292000.0 + 20  # 2026-12-03T10:00:20Z


def aggregate(source: str, name: str, tags: dict, start: int, value: float, **stats) -> dict:
    window_start = f"2026-12-03T10:{start // 60:02d}:{start % 60:02d}.000Z"
    end = start + 10
    window_end = f"2026-12-03T10:{end // 60:02d}:{end % 60:02d}.000Z"
    aggregation = {"window_start": window_start, "window_end": window_end, "partial": False, **stats}
    return {"source": source, "type": "metric", "timestamp": window_start, "data": {"name": name, "value": value, "tags": tags, "aggregation": aggregation}}


def scrape(apps: AppsMetrics, now: float = NOW) -> dict:
    """What a Prometheus scrape of `apps` at `now` reads, by the client's own parser: {(sample
    name, labels): value}."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AppsCollector(apps, clock=lambda: now))
    text = generate_latest(registry).decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in found, f"duplicate series {key}"
            found[key] = sample.value
    return found


@given(names)
def test_metric_names_are_in_prometheus_alphabet(name):
    assert METRIC_NAME.fullmatch(metric_name(name))
    assert metric_name(metric_name(name)) == metric_name(name)


@given(names)
def test_label_names_are_in_prometheus_alphabet_and_off_reserved_ones(name):
    cleaned = label_name(name)
    assert LABEL_NAME.fullmatch(cleaned)
    assert not cleaned.startswith("__") and cleaned not in ("source", "quantile", "le")


@given(st.text(max_size=8), tag_sets)
def test_every_tag_becomes_a_label_beside_the_source(source, tags):
    labels = dict(labels_of(source, tags))
    assert labels["source"] == source
    assert len(labels) == len(tags) + 1
    assert sorted(labels.values()) == sorted([source, *tags.values()])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b"]), names, tag_sets, st.integers(0, 50), st.integers(-1000, 1000)), max_size=40), st.integers(1, 12))
def test_the_latest_window_wins_within_the_cap_and_the_scrape_parses(updates, max_series):
    apps = AppsMetrics(max_series)
    reference, refused = {}, 0
    for source, name, tags, start, value in updates:
        key = (source, name, labels_of(source, tags))
        message = aggregate(source, name, tags, start, value / 4, count=start + 1, min=value / 4, p99=value / 4)
        if key in reference:
            if start >= reference[key][0]:
                reference[key] = (start, value / 4, start + 1)
        elif len(reference) < max_series:
            reference[key] = (start, value / 4, start + 1)
        else:
            refused += 1
        apps.add_aggregates([message], NOW)
    assert apps.series == len(reference) <= max_series
    assert apps.dropped == refused
    found = scrape(apps)
    owners = {}
    for (source, name, labels), (start, value, count) in sorted(reference.items()):
        base = metric_name(name)
        if owners.setdefault(base, name) != name:
            continue  # the family belongs to another metric whose name cleans to the same
        assert found[(base + "_sum", labels)] == value
        assert found[(base + "_count", labels)] == count
        assert found[(base, tuple(sorted((*labels, ("quantile", "0.99")))))] == value
        if owners.setdefault(base + "_min", name) == name:
            assert found[(base + "_min", labels)] == value


def test_names_that_clean_to_one_family_keep_the_first_and_count_the_other():
    apps = AppsMetrics()
    apps.add_aggregates([aggregate("s", "a.b", {}, 0, 1, count=1), aggregate("s", "a_b", {}, 0, 2, count=1)], NOW)
    found = scrape(apps)
    assert found[("a_b_sum", (("source", "s"),))] == 1  # "a.b" sorts first
    assert apps.conflicts == 1


def test_raw_points_are_gauges_of_their_last_value_apart_from_aggregates():
    apps = AppsMetrics(3, raw=True)
    point = lambda name, value, **tags: {"source": "s", "type": "metric", "data": {"name": name, "value": value, "tags": tags}}
    apps.add_points([point("rows", 1, env="prod"), point("rows", 5, env="prod"), point("rows", 2), {"source": "s", "type": "log", "data": {}}], NOW)
    apps.add_aggregates([aggregate("s", "rows", {}, 0, 7, count=2, last=5)], NOW)
    apps.add_points([point("other", 1)], NOW)  # a fourth series: past the cap
    found = scrape(apps)
    assert found[("rows_raw", (("env", "prod"), ("source", "s")))] == 5
    assert found[("rows_raw", (("source", "s"),))] == 2
    assert found[("rows_sum", (("source", "s"),))] == 7 and found[("rows_last", (("source", "s"),))] == 5
    assert apps.dropped == 1 and not any(name == "other_raw" for name, _ in found)


def test_stale_series_are_let_go_and_make_room_under_the_cap():
    """An aggregated group two windows after its latest window's end, a raw series
    `raw_max_age` after its last point: gone from the scrape, counted, their room free."""
    now = NOW + 50  # 10:01:10
    apps = AppsMetrics(4, raw=True, raw_max_age=60)
    point = lambda name, value: {"source": "s", "type": "metric", "data": {"name": name, "value": value, "tags": {}}}
    # Windows ending 10:00:10 and 10:01:00: stale from 10:00:30 and 10:01:20.
    apps.add_aggregates([aggregate("s", "old", {}, 0, 1, count=1), aggregate("s", "kept", {}, 50, 2, count=1)], now)
    apps.add_points([point("quiet", 1)], now - 60)  # stale from 10:01:10
    apps.add_points([point("busy", 1)], now - 65)
    apps.add_points([point("busy", 2)], now - 5)  # updated: stale from 10:02:05
    found = scrape(apps, now + 5)
    assert {name for name, _ in found} == {"kept_sum", "kept_count", "busy_raw"}
    assert found[("busy_raw", (("source", "s"),))] == 2
    assert (apps.expired, apps.series) == (2, 2)
    assert scrape(apps, now + 60) == {}
    assert (apps.expired, apps.series) == (4, 0)
    # Full, with a stale series: the new one takes its room.
    apps = AppsMetrics(1, raw=True, raw_max_age=60)
    apps.add_points([point("first", 1)], now)
    apps.add_points([point("second", 1)], now + 30)
    assert apps.dropped == 1
    apps.add_points([point("second", 1)], now + 61)
    assert (apps.dropped, apps.expired, list(scrape(apps, now + 61))) == (1, 1, [("second_raw", (("source", "s"),))])


# ---------------------------------------------------------------- through a real sidecar

CONFIG = """
tcp: {{host: 127.0.0.1, port: 0}}
http: {{host: 127.0.0.1, port: 0, apps_metrics_max_series: 4}}
shutdown: {{connection_grace: 0.2, drain_timeout: 5}}
backends:
  out:
    type: filesystem
    base_path: {base}
    create_base_path: true
    fsync: never
aggregate:
  svc:
    - metrics: ["jobs.*", rows_loaded]
      window: {window}
      stats: [count, sum, min, max, avg, last, p50, p99]
routing:
  svc:
    - backend: out
"""


def test_a_sidecar_serves_its_latest_windows_on_metrics_apps(tmp_path):
    sidecar = SidecarProcess(tmp_path, CONFIG.format(base=tmp_path / "out", window="10000h")).start()
    try:
        at = wall.time()
        sent = {("jobs.done", (("env", "prod"),)): [1.5, 2.25, 8.0, 0.5], ("jobs.done", ()): [3.0], ("rows_loaded", (("db", "main"),)): [10, 20, 30]}
        messages = [
            {"source": "svc", "type": "metric", "timestamp": wall.strftime("%Y-%m-%dT%H:%M:%S", wall.gmtime(at)) + ".000Z", "data": {"name": name, "value": value, "tags": dict(tags)}}
            for (name, tags), values in sent.items()
            for value in values
        ]
        # Five more groups, past the cap of four series: one of them (or more) is held, the rest counted.
        extra = [{**messages[0], "data": {"name": "jobs.other", "value": 1, "tags": {"k": str(i)}}} for i in range(5)]
        sidecar.send(messages + extra)
        step = lambda s: s["correlator"]["aggregation"].get("svc[aggregate]", {}).get("points", 0)
        sidecar.wait_for(lambda s: step(s) == len(messages) + len(extra), what="the points to be aggregated")
        # A changed step emits its windows (partial) at the reload: one window per group,
        # whatever the wall clock, and they are the latest the view has.
        changed = sidecar.config_path.with_name("changed.yaml")
        changed.write_text(CONFIG.format(base=tmp_path / "out", window="9999h"))
        changed.replace(sidecar.config_path)
        sidecar.wait_for(lambda s: s["aggregates_emitted"] >= 8, what="the reload to emit the windows")
        status, body = sidecar.http("/metrics/apps")
        assert status == 200
        families = {family.name: family for family in text_string_to_metric_families(body.decode())}
        _, own = sidecar.http("/metrics")
    finally:
        assert sidecar.stop(signal.SIGTERM) == 0
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for family in families.values() for s in family.samples}
    assert families["jobs_done"].type == "summary" and families["jobs_done_max"].type == "gauge"
    held = 0
    for (name, tags), values in sent.items():
        labels = tuple(sorted((*tags, ("source", "svc"))))
        if (metric_name(name) + "_sum", labels) not in samples:
            continue  # the cap let another group in first
        held += 1
        base = metric_name(name)
        assert samples[(base + "_sum", labels)] == sum(values)
        assert samples[(base + "_count", labels)] == len(values)
        assert samples[(base + "_min", labels)] == min(values)
        assert samples[(base + "_max", labels)] == max(values)
        assert samples[(base + "_last", labels)] == values[-1]
        assert math.isclose(samples[(base + "_avg", labels)], sum(values) / len(values))
        for quantile in ("0.5", "0.99"):
            assert min(values) <= samples[(base, tuple(sorted((*labels, ("quantile", quantile)))))] <= max(values)
    series = {labels for (name, labels) in samples if name.endswith("_sum")}
    assert len(series) == 4
    dropped = [s for f in text_string_to_metric_families(own.decode()) for s in f.samples if s.name == "sidecar_apps_metrics_dropped_series_total"]
    assert dropped[0].value == 8 - 4
    assert held >= 1


import pytest

from sidecar.config import ConfigError, load_config


@pytest.mark.parametrize("path", ["/metrics", "/api/jobs/x", "metrics/apps"])
def test_an_apps_metrics_path_the_view_serves_or_without_slash_is_a_config_error_at_its_line(tmp_path, path):
    main = tmp_path / "sidecar.yaml"
    main.write_text(f"backends: {{}}\nhttp:\n  apps_metrics_path: {path}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(main, None, {})
    assert f"{main}:3" in str(caught.value) and "apps_metrics_path" in str(caught.value)


def test_the_apps_metrics_settings_are_read(tmp_path):
    main = tmp_path / "sidecar.yaml"
    main.write_text("backends: {}\nhttp: {apps_metrics_path: /prom, apps_metrics_raw: true, apps_metrics_max_series: 7}\n")
    http = load_config(main, None, {}).http
    assert (http.apps_metrics_path, http.apps_metrics_raw, http.apps_metrics_max_series) == ("/prom", True, 7)


RAW_CONFIG = """
tcp: {host: 127.0.0.1, port: 0}
http: {host: 127.0.0.1, port: 0, apps_metrics_path: /prom, apps_metrics_raw: true}
backends:
  out: {type: filesystem, base_path: out, create_base_path: true, fsync: never}
routing:
  svc:
    - backend: out
"""


def test_a_sidecar_serves_raw_points_last_values_on_its_configured_path(tmp_path):
    sidecar = SidecarProcess(tmp_path, RAW_CONFIG).start()
    try:
        stamp = wall.strftime("%Y-%m-%dT%H:%M:%S", wall.gmtime()) + ".000Z"
        values = {"a": [1, 2.5, 7], "b": [4]}
        sidecar.send([{"source": "svc", "type": "metric", "timestamp": stamp, "data": {"name": "queue.depth", "value": v, "tags": {"queue": q}}} for q, vs in values.items() for v in vs])
        sidecar.wait_for(lambda s: s["routed"] >= 4, what="the points to be routed")
        status, body = sidecar.http("/prom")
        missing, _ = sidecar.http("/metrics/apps")
    finally:
        assert sidecar.stop(signal.SIGTERM) == 0
    assert (status, missing) == (200, 404)
    [family] = text_string_to_metric_families(body.decode())
    assert (family.name, family.type) == ("queue_depth_raw", "gauge")
    assert {s.labels["queue"]: s.value for s in family.samples} == {q: vs[-1] for q, vs in values.items()}
    assert all(s.labels["source"] == "svc" for s in family.samples)
