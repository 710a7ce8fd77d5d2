"""CloudWatch Embedded Metric Format: documents checked against the specification's structure and
limits (the validator below is written from the spec, not from sidecar/backends/emf.py) and for
their values (hypothesis); a real sidecar writing them to moto's CloudWatch Logs."""

import datetime as dt
import math
import signal
import time
import uuid

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.backends.cloudwatch import CloudWatchSettings
from sidecar.backends.cloudwatch_requests import LogNames, plan_batch
from sidecar.backends.emf import NotPlaced, emf_document
from sidecar.batch import Batch
from sidecar.config import ConfigError, load_config
from tests.harness import SidecarProcess, encode, wait_until
from tests.services.cloudwatch import ACCESS_KEY, SECRET_KEY, cloudwatch_server, logs_proxy  # noqa: F401 (fixtures)

# MetricDatum's StandardUnit values, which the spec names for MetricDefinition.Unit.
SPEC_UNITS = {
    "Seconds", "Microseconds", "Milliseconds", "Bytes", "Kilobytes", "Megabytes", "Gigabytes", "Terabytes", "Bits",
    "Kilobits", "Megabits", "Gigabits", "Terabits", "Percent", "Count", "Bytes/Second", "Kilobytes/Second",
    "Megabytes/Second", "Gigabytes/Second", "Terabytes/Second", "Bits/Second", "Kilobits/Second", "Megabits/Second",
    "Gigabits/Second", "Terabits/Second", "Count/Second", "None",
}


def _is_number(value) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def validate_emf(text: str) -> dict:
    """The document, or AssertionError naming the rule of the EMF specification it breaks."""
    root = orjson.loads(text)
    assert type(root) is dict, "the log event is one JSON object"
    meta = root.get("_aws")
    assert type(meta) is dict, "the root has the _aws metadata object"
    assert set(meta) <= {"CloudWatchMetrics", "Timestamp"}, f"no other members in _aws: {set(meta)}"
    assert type(meta.get("Timestamp")) is int and meta["Timestamp"] >= 0, "Timestamp: ms since the epoch"
    directives = meta.get("CloudWatchMetrics")
    assert type(directives) is list and directives, "CloudWatchMetrics: an array of MetricDirectives"
    metric_count = 0
    for directive in directives:
        assert type(directive) is dict and set(directive) == {"Namespace", "Dimensions", "Metrics"}, directive.keys()
        assert type(directive["Namespace"]) is str and 1 <= len(directive["Namespace"]) <= 255
        assert type(directive["Dimensions"]) is list
        for dimension_set in directive["Dimensions"]:
            assert type(dimension_set) is list and len(dimension_set) <= 30, "a DimensionSet has at most 30 keys"
            assert len(set(dimension_set)) == len(dimension_set)
            for key in dimension_set:
                assert type(key) is str and 1 <= len(key) <= 255 and not key.startswith(":")
                assert key in root, f"dimension {key!r} is a member of the root"
                value = root[key]
                assert type(value) is str and 1 <= len(value) <= 1024, f"dimension {key!r}: a string of 1-1024 characters"
        metrics = directive["Metrics"]
        assert type(metrics) is list and len(metrics) <= 100, "at most 100 MetricDefinitions"
        metric_count += len(metrics)
        for definition in metrics:
            assert type(definition) is dict and "Name" in definition and set(definition) <= {"Name", "Unit", "StorageResolution"}
            name = definition["Name"]
            assert type(name) is str and 1 <= len(name) <= 255
            assert name in root, f"metric {name!r} is a member of the root"
            value = root[name]
            assert _is_number(value) or (type(value) is list and len(value) <= 100 and all(map(_is_number, value))), f"{name}: a number or at most 100"
            assert definition.get("Unit", "Count") in SPEC_UNITS, definition
            assert definition.get("StorageResolution", 60) in (1, 60)
            assert not any(name in s for s in directive["Dimensions"]), "a metric is not a dimension"
    assert metric_count <= 100
    return root


# ---------------------------------------------------------------- documents (hypothesis)

names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=300)
tag_values = st.one_of(st.text(max_size=20), st.text(min_size=1000, max_size=1100, alphabet="ab"))
tags = st.dictionaries(st.one_of(st.text(min_size=1, max_size=12), st.sampled_from(["_aws", "source", "aggregation", ":x", "x" * 256])), tag_values, max_size=40)
numbers = st.one_of(st.integers(-(2**53), 2**53), st.floats(allow_nan=False, allow_infinity=False))
stats = st.one_of(
    st.dictionaries(st.sampled_from(["count", "sum", "min", "max", "avg", "last", "p50", "p90", "p99", "p99.9"]), numbers),
    st.dictionaries(st.builds("p{}".format, st.integers(1, 999)), numbers, min_size=90, max_size=130),
)
units = st.one_of(st.none(), st.sampled_from(["ms", "s", "bytes", "%", "count", "Milliseconds", "furlongs", ""]))
NOW_MS = 1_760_000_000_000


def iso(ms: int) -> str:
    moment = dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{moment.microsecond // 1000:03d}Z"


@st.composite
def metrics(draw):
    data = {"name": draw(names), "value": draw(numbers)}
    unit = draw(units)
    if unit is not None:
        data["unit"] = unit
    data["tags"] = draw(tags)
    if draw(st.booleans()):
        start = draw(st.integers(NOW_MS - 10**9, NOW_MS))
        data["aggregation"] = {"window_start": iso(start), "window_end": iso(start + 10_000), "partial": draw(st.booleans()), **draw(stats)}
    return {"source": draw(st.text(max_size=30)), "type": "metric", "timestamp": iso(NOW_MS), "data": data}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(metrics())
def test_every_document_obeys_the_spec_and_carries_the_values(message):
    document = emf_document(message, NOW_MS, "ns")
    if document is None:  # an aggregate without statistics
        assert set(message["data"]["aggregation"]) == {"window_start", "window_end", "partial"}
        return
    root = validate_emf(document.text)
    data = message["data"]
    directive = root["_aws"]["CloudWatchMetrics"][0]
    assert directive["Namespace"] == "ns"
    dimensions = directive["Dimensions"][0]
    assert dimensions[0] == "source" and root["source"] == (message["source"] or "_")
    defined = {d["Name"]: d.get("Unit") for d in directive["Metrics"]}
    aggregation = data.get("aggregation")
    if aggregation is None:
        assert root["_aws"]["Timestamp"] == NOW_MS
        member = data["name"][:255]
        member = f"metric.{member}" if member in ("_aws", "source", "aggregation") else member
        assert list(defined) == [member] and root[member] == data["value"]
    else:
        assert root["_aws"]["Timestamp"] == int(dt.datetime.fromisoformat(aggregation["window_end"]).timestamp() * 1000)
        assert root["aggregation"] == {k: aggregation[k] for k in ("window_start", "window_end", "partial")}
        statistics = {k: v for k, v in aggregation.items() if k not in ("window_start", "window_end", "partial")}
        placed = {}
        for stat, value in statistics.items():
            member = f"{data['name']}.{stat}"[:255]
            member = f"metric.{member}" if member in ("_aws", "source", "aggregation") else member
            if len(data["name"]) < 240:  # names cut to 255 characters may coincide
                assert root[member] == value and (member in defined or member in document.not_metrics)
                placed[member] = stat
        assert len(defined) == min(100, len(set(defined) | set(document.not_metrics)))
        for member, stat in placed.items():
            if member in defined:
                assert defined[member] == ("Count" if stat == "count" else defined[member])
    for key, value in data["tags"].items():
        if key in document.left_out:
            assert key in ("_aws", "source", "aggregation") or key in defined or key in document.not_metrics
            continue
        assert root[key] == value
        assert (key in dimensions) != (key in document.not_dimensions)
    def fits(key):
        return 1 <= len(key) <= 255 and 1 <= len(data["tags"][key]) <= 1024 and not key.startswith(":")

    assert dimensions[1:] == sorted(k for k in data["tags"] if k not in document.left_out and k not in document.not_dimensions)
    assert all(not fits(k) for k in document.not_dimensions) or len(dimensions) == 30


def test_units_map_to_cloudwatch_names_and_others_are_left_out():
    def unit_of(unit):
        document = emf_document({"source": "s", "type": "metric", "data": {"name": "m", "value": 1, "unit": unit}}, NOW_MS)
        return validate_emf(document.text)["_aws"]["CloudWatchMetrics"][0]["Metrics"][0].get("Unit")

    assert [unit_of(u) for u in ("ms", "s", "bytes", "%", "count", "Milliseconds", "furlongs")] == \
        ["Milliseconds", "Seconds", "Bytes", "Percent", "Count", "Milliseconds", None]


def test_messages_other_than_metrics_are_no_documents():
    for message in ({"source": "s", "type": "event", "data": {"level": "info", "message": "m"}},
                    {"source": "s", "type": "metric", "data": {"name": "m", "value": 1, "aggregation": {"window_end": "x", "count": "many"}}}):
        assert emf_document(message, NOW_MS) is None


def test_a_planned_batch_sends_documents_for_metrics_and_lines_for_the_rest():
    messages = [
        {"source": "s", "type": "metric", "timestamp": iso(NOW_MS), "data": {"name": "rows", "value": 5, "tags": {f"t{i:02d}": "v" for i in range(35)}}},
        {"source": "s", "type": "event", "timestamp": iso(NOW_MS), "data": {"level": "info", "message": "hello"}},
    ]
    batch = Batch("s", [orjson.dumps(m) for m in messages], [m["timestamp"] for m in messages])
    plan = plan_batch(LogNames("/g", "{source}"), "s", batch, NOW_MS, lambda m, ts: emf_document(m, ts, "ns"))
    (request,) = plan.requests
    first, second = request.events
    assert validate_emf(first.message)["rows"] == 5 and first.message != batch.lines[0].decode()
    assert second.message == batch.lines[1].decode()
    not_placed = NotPlaced()
    (logged,) = not_placed.add(plan.documents)
    assert "t29" in logged and not_placed.counts["emf_tags_not_dimensions"] == 6  # 29 tags fit beside source
    assert not_placed.add(plan.documents) == [] and not_placed.counts["emf_tags_not_dimensions"] == 12


def test_format_and_namespace_are_checked_at_their_line(tmp_path):
    for line, what in (("format: xml", "format"), ("namespace: AWS/EC2", "namespace")):
        path = tmp_path / "c.yaml"
        path.write_text(f"backends:\n  cw:\n    type: cloudwatch\n    region: us-east-1\n    {line}\nrouting:\n  all:\n    - backend: cw\n")
        with pytest.raises(ConfigError) as raised:
            load_config(path, None)
        assert f"{path}:5:" in str(raised.value) and what in str(raised.value)
    assert CloudWatchSettings().format == "json" and CloudWatchSettings().namespace == "monitoring-sidecar"


# ---------------------------------------------------------------- a real sidecar, moto

EMF_CONFIG = """
tcp: {{host: 127.0.0.1, port: 0}}
shutdown: {{connection_grace: 0.2, drain_timeout: 20}}
backends:
  cloudwatch:
    type: cloudwatch
    region: us-east-1
    endpoint_url: {endpoint}
    log_group: "{group}"
    log_stream: "{{source}}"
    format: emf
    namespace: sidecar-test
    batch: {{max_messages: 100, timeout: 0.2}}
    retry: {{initial_backoff: 0.05, max_backoff: 0.3}}
aggregate:
  timer:
    - metrics: [latency_ms]
      window: 1s
      stats: [count, sum, min, max, p50]
      keep_raw: false
routing:
  all:
    - backend: cloudwatch
"""


def test_a_sidecar_writes_metrics_and_aggregates_as_emf_documents_to_cloudwatch_logs(tmp_path, cloudwatch_server, logs_proxy):
    group = f"/emf/{uuid.uuid4().hex[:8]}"
    env = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_CONFIG_FILE": "/nonexistent",
           "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_EC2_METADATA_DISABLED": "true"}
    sidecar = SidecarProcess(tmp_path, EMF_CONFIG.format(endpoint=logs_proxy.endpoint_url, group=group), env=env).start()
    try:
        now = int(time.time() * 1000)
        raw = [{"source": "jobs", "type": "metric", "timestamp": iso(now - i), "data": {"name": "rows_loaded", "value": i * 1.5, "unit": "rows", "tags": {"env": "prod"}}} for i in range(5)]
        aggregate = {"source": "jobs", "type": "metric", "timestamp": iso(now - 10_000), "data": {
            "name": "job_duration_ms", "value": 30.0, "unit": "ms", "tags": {"env": "prod", "queue": "a"},
            "aggregation": {"window_start": iso(now - 10_000), "window_end": iso(now), "partial": False,
                            "count": 3, "sum": 30.0, "min": 5.0, "max": 15.0, "avg": 10.0, "last": 15.0, "p99": 15.0}}}
        event = {"source": "jobs", "type": "event", "timestamp": iso(now), "data": {"level": "info", "message": "done"}}
        # and points the sidecar's own aggregate step turns into one metric per 1 s window
        points = [{"source": "timer", "type": "metric", "timestamp": iso(now), "data": {"name": "latency_ms", "value": v, "unit": "ms"}} for v in (2.0, 4.0, 8.0, 16.0)]
        with sidecar.connect() as conn:
            conn.sendall(encode(raw + [aggregate, event] + points))
        sidecar.wait_for(lambda s: s["backends"] and s["backends"][0]["delivered"] >= 8, timeout=30, what="7 events and an aggregate delivered")

        def step_documents():
            if "timer" not in cloudwatch_server.streams(group):
                return None
            found = [validate_emf(e["message"]) for e in cloudwatch_server.events(group, "timer")]
            return found if sum(d["latency_ms.count"] for d in found) == 4 else None

        windows = wait_until(step_documents, 30, "the aggregate step's documents", interval=0.2)
        assert sum(d["latency_ms.sum"] for d in windows) == 30.0
        assert min(d["latency_ms.min"] for d in windows) == 2.0 and max(d["latency_ms.max"] for d in windows) == 16.0
        for document in windows:
            # the aggregate carries its points' unit: ms for the statistics, Count for the count
            assert {m["Name"]: m.get("Unit") for m in document["_aws"]["CloudWatchMetrics"][0]["Metrics"]} == {
                "latency_ms.count": "Count", "latency_ms.sum": "Milliseconds", "latency_ms.min": "Milliseconds", "latency_ms.max": "Milliseconds", "latency_ms.p50": "Milliseconds"}
            assert document["_aws"]["Timestamp"] == int(dt.datetime.fromisoformat(document["aggregation"]["window_end"]).timestamp() * 1000)
        events = [orjson.loads(e["message"]) for e in cloudwatch_server.events(group, "jobs")]
        documents = [validate_emf(orjson.dumps(e).decode()) for e in events if "_aws" in e]
        assert len(documents) == 6 and [e["data"]["message"] for e in events if "_aws" not in e] == ["done"]
        assert sorted(d["rows_loaded"] for d in documents if "rows_loaded" in d) == [i * 1.5 for i in range(5)]
        for document in documents:
            directive = document["_aws"]["CloudWatchMetrics"][0]
            assert directive["Namespace"] == "sidecar-test" and document["source"] == "jobs" and document["env"] == "prod"
        (window,) = [d for d in documents if "aggregation" in d]
        assert window["_aws"]["Timestamp"] == now
        assert window["_aws"]["CloudWatchMetrics"][0]["Dimensions"] == [["source", "env", "queue"]]
        stats = aggregate["data"]["aggregation"]
        assert {k.removeprefix("job_duration_ms."): window[k] for k in window if k.startswith("job_duration_ms.")} == \
            {k: v for k, v in stats.items() if k not in ("window_start", "window_end", "partial")}
        units = {d["Name"]: d.get("Unit") for d in window["_aws"]["CloudWatchMetrics"][0]["Metrics"]}
        assert units["job_duration_ms.count"] == "Count" and units["job_duration_ms.p99"] == "Milliseconds"
        assert sidecar.stop() == 0
    finally:
        if sidecar.process.poll() is None:
            sidecar.stop(signal.SIGKILL)
