"""The OTLP mapping and request decoding, without I/O (sidecar.otlp_mapping, sidecar.otlp):
property tests over generated requests, and the spec's rules case by case."""

import base64
import gzip
import math

import orjson
import pytest
from google.protobuf import json_format
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest, ExportLogsServiceResponse
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

from sidecar.constants import LEVELS, MAX_SOURCE_LENGTH
from sidecar.message import validate_message
from sidecar.otlp import SIGNALS, Encoding, RequestError, decode, error_body, export, gunzip, route
from sidecar.otlp_mapping import MappingOptions, any_value, level_of, log_body, source_name

OPTIONS = MappingOptions()
LOGS, TRACES, METRICS = SIGNALS["/v1/logs"], SIGNALS["/v1/traces"], SIGNALS["/v1/metrics"]
NOW_NS = 1_764_000_000_000_000_000  # 2025-11-24

# ------------------------------------------------------------------ generated values

scalars = st.one_of(
    st.text(max_size=20).map(lambda v: ("string_value", v)),
    st.integers(-(2**63), 2**63 - 1).map(lambda v: ("int_value", v)),
    st.floats().map(lambda v: ("double_value", v)),
    st.booleans().map(lambda v: ("bool_value", v)),
    st.binary(max_size=10).map(lambda v: ("bytes_value", v)),
    st.just(("empty", None)),
)
trees = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4).map(lambda v: ("array_value", v)),
        st.lists(st.tuples(st.text(max_size=8), children), max_size=4).map(lambda v: ("kvlist_value", v)),
    ),
    max_leaves=12,
)


def build(tree) -> AnyValue:
    kind, value = tree
    built = AnyValue()
    if kind == "array_value":
        built.array_value.values.extend(build(item) for item in value)
    elif kind == "kvlist_value":
        built.kvlist_value.values.extend(KeyValue(key=key, value=build(item)) for key, item in value)
    elif kind != "empty":
        setattr(built, kind, value)
    return built


def expected(tree):
    kind, value = tree
    if kind == "array_value":
        return [expected(item) for item in value]
    if kind == "kvlist_value":
        return {key: expected(item) for key, item in dict(value).items()}  # the last of a repeated key wins
    if kind == "double_value" and not math.isfinite(value):
        return str(value)
    if kind == "bytes_value":
        return base64.b64encode(value).decode()
    return value


def attributes(**values) -> list[KeyValue]:
    return [KeyValue(key=key, value=build(("string_value", v) if isinstance(v, str) else ("int_value", v))) for key, v in values.items()]


def logs_request(records, resource=None) -> ExportLogsServiceRequest:
    request = ExportLogsServiceRequest()
    resource_logs = request.resource_logs.add()
    resource_logs.resource.attributes.extend(attributes(**(resource if resource is not None else {"service.name": "billing"})))
    scope = resource_logs.scope_logs.add()
    scope.scope.name = "tests"
    scope.log_records.extend(records)
    return request


def traces_request(spans, resource=None) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    resource_spans.resource.attributes.extend(attributes(**(resource if resource is not None else {"service.name": "billing"})))
    resource_spans.scope_spans.add().spans.extend(spans)
    return request


# ------------------------------------------------------------------ values and names


@given(trees)
def test_an_any_value_becomes_what_json_carries(tree):
    value = any_value(build(tree))
    assert value == expected(tree)
    orjson.dumps(value)  # NaN and the infinities are names, bytes base64: JSON takes it all


@given(trees)
def test_a_log_body_is_a_string_as_it_is_and_anything_else_its_json(tree):
    body = log_body(build(tree))
    value = expected(tree)
    assert body == (value if isinstance(value, str) else "" if value is None else orjson.dumps(value).decode())


def test_severity_numbers_read_as_the_projects_levels_rising_with_them():
    levels = [level_of(number, "") for number in range(1, 25)]
    assert levels == ["debug"] * 8 + ["info"] * 4 + ["warning"] * 4 + ["error"] * 4 + ["critical"] * 4
    assert level_of(99, "") == "critical"


@pytest.mark.parametrize("text, level", [("WARN", "warning"), ("Error", "error"), ("fatal", "critical"), ("TRACE", "debug"), ("notice", "info"), ("", "info")])
def test_without_a_severity_number_its_text_names_the_level(text, level):
    assert level_of(0, text) == level


def test_the_severity_number_wins_over_the_text():
    assert level_of(17, "info") == "error"


@given(st.one_of(st.none(), st.text(), st.integers(-(2**63), 2**63 - 1), trees.map(expected)))
def test_any_service_name_makes_a_valid_source(service_name):
    source = source_name(service_name, "otel")
    validate_message({"source": source, "type": "event", "data": {"level": "info", "message": ""}})
    assert len(source) <= MAX_SOURCE_LENGTH
    if isinstance(service_name, str) and service_name and service_name.isprintable() and len(service_name) <= MAX_SOURCE_LENGTH:
        assert source == service_name
    if service_name in (None, ""):
        assert source == "otel"


# ------------------------------------------------------------------ logs

ids = st.sampled_from([b"", bytes(16), bytes(8), bytes(15)]) | st.binary(min_size=16, max_size=16) | st.binary(min_size=8, max_size=8)
log_records = st.builds(
    lambda time, observed, number, text, tree, trace_id, span_id: LogRecord(
        time_unix_nano=time, observed_time_unix_nano=observed, severity_number=number, severity_text=text, body=build(tree), trace_id=trace_id, span_id=span_id
    ),
    st.sampled_from([0, NOW_NS]) | st.integers(0, 2**64 - 1),
    st.sampled_from([0, NOW_NS]),
    st.integers(0, 24),
    st.sampled_from(["", "INFO", "warn", "boom"]),
    trees,
    ids,
    ids,
)


@given(st.lists(log_records, max_size=8))
def test_every_log_record_is_an_event_or_a_counted_rejection(records):
    request = logs_request(records)
    exported = export(LOGS, request, OPTIONS)
    assert len(exported.messages) + exported.rejected == len(records) == exported.items
    for message in exported.messages:
        assert message["type"] == "event" and message["source"] == "billing" and message["data"]["level"] in LEVELS
        validate_message(message)  # what is handed on is valid as it stands
    valid_ids = [(r.trace_id, r.span_id) for r in records if all(len(i) in (0, n) or not any(i) for i, n in ((r.trace_id, 16), (r.span_id, 8)))]
    assert len(exported.messages) == len(valid_ids)
    response = ExportLogsServiceResponse.FromString(exported.response(Encoding.PROTOBUF))
    assert response.HasField("partial_success") == bool(exported.rejected)
    assert response.partial_success.rejected_log_records == exported.rejected


def test_a_log_record_maps_field_by_field():
    record = LogRecord(
        time_unix_nano=NOW_NS + 123_456_789, severity_number=13, severity_text="WARN", body=build(("string_value", "disk nearly full")),
        trace_id=bytes(range(1, 17)), span_id=bytes(range(1, 9)), event_name="disk.check",
    )
    record.attributes.extend(attributes(percent=93, level="shadowed", **{"job.id": "job-42"}))
    request = logs_request([record], resource={"service.name": "storage", "host.name": "db1"})
    (message,) = export(LOGS, request, OPTIONS).messages
    assert message == {
        "source": "storage",
        "type": "event",
        "timestamp": "2025-11-24T16:00:00.123Z",
        "trace_id": bytes(range(1, 17)).hex(),
        "span_id": bytes(range(1, 9)).hex(),
        "data": {"level": "warning", "message": "disk nearly full", "event_name": "disk.check", "percent": 93, "attributes.level": "shadowed", "job.id": "job-42"},
        "context": {"resource": {"service.name": "storage", "host.name": "db1"}, "scope": {"name": "tests"}, "job_id": "job-42"},
    }


def test_the_job_comes_from_the_records_attributes_then_the_resources_and_the_source_from_the_default():
    own = LogRecord(body=build(("string_value", "a")))
    own.attributes.extend(attributes(job_id=7))
    inherited = LogRecord(body=build(("string_value", "b")))
    request = logs_request([own, inherited], resource={"job.id": "nightly"})
    first, second = export(LOGS, request, MappingOptions(default_source="unnamed")).messages
    assert (first["source"], first["context"]["job_id"]) == ("unnamed", "7")
    assert second["context"]["job_id"] == "nightly"
    third = export(LOGS, logs_request([inherited], resource={"run": "r-1"}), MappingOptions(job_id_attributes=("run",))).messages[0]
    assert third["context"]["job_id"] == "r-1"


def test_a_log_record_without_a_time_keeps_its_observed_time_or_none():
    observed, neither = export(LOGS, logs_request([LogRecord(observed_time_unix_nano=NOW_NS), LogRecord()]), OPTIONS).messages
    assert observed["timestamp"] == "2025-11-24T16:00:00.000Z" and "timestamp" not in neither


def test_an_attribute_nested_past_max_depth_rejects_its_record_alone():
    deep = ("string_value", "bottom")
    for _ in range(12):
        deep = ("kvlist_value", [("down", deep)])
    nested = LogRecord(body=build(("string_value", "deep")))
    nested.attributes.add(key="tree", value=build(deep))
    exported = export(LOGS, logs_request([nested, LogRecord(body=build(("string_value", "flat")))]), OPTIONS, max_depth=10)
    assert [m["data"]["message"] for m in exported.messages] == ["flat"]
    assert [e.reason for e in exported.errors] == ["too_deep"]


# ------------------------------------------------------------------ traces

span_ids = st.sampled_from([b"", bytes(8), bytes(7)]) | st.binary(min_size=8, max_size=8)


@st.composite
def spans(draw):
    start = draw(st.sampled_from([0, NOW_NS]) | st.integers(0, 2**63))
    end = draw(st.sampled_from([0, start, start + 1_500_000]) | st.integers(0, 2**63))
    span = Span(
        trace_id=draw(st.sampled_from([b"", bytes(16), bytes(range(16))]) | st.binary(min_size=16, max_size=16)),
        span_id=draw(span_ids), parent_span_id=draw(span_ids), name=draw(st.text(max_size=10)),
        kind=draw(st.integers(0, 5)), start_time_unix_nano=start, end_time_unix_nano=end,
        status=Status(code=draw(st.integers(0, 2)), message=draw(st.sampled_from(["", "boom"]))),
    )
    for _ in range(draw(st.integers(0, 2))):
        span.events.add(time_unix_nano=start, name=draw(st.sampled_from(["exception", "retry"])))
    return span


def _valid_span(span: Span) -> bool:
    def ok(raw, size, required):
        return (len(raw) == size and any(raw)) if required else (not raw or not any(raw) or len(raw) == size)

    return ok(span.trace_id, 16, True) and ok(span.span_id, 8, True) and ok(span.parent_span_id, 8, False) and 0 < span.start_time_unix_nano <= span.end_time_unix_nano


@given(st.lists(spans(), max_size=6))
def test_every_span_is_a_start_and_end_pair_or_a_counted_rejection(generated):
    exported = export(TRACES, traces_request(generated), OPTIONS)
    accepted = [span for span in generated if _valid_span(span)]
    assert exported.rejected == len(generated) - len(accepted)
    pairs = [m for m in exported.messages if m["type"] == "span"]
    assert len(pairs) == 2 * len(accepted)
    for span, (start, end) in zip(accepted, zip(pairs[::2], pairs[1::2])):
        assert (start["data"]["phase"], end["data"]["phase"]) == ("start", "end")
        assert start["span_id"] == end["span_id"] == span.span_id.hex() and start["trace_id"] == span.trace_id.hex()
        assert start.get("parent_span_id") == (span.parent_span_id.hex() if any(span.parent_span_id) else None)
        assert end["data"]["duration_ms"] == round((span.end_time_unix_nano - span.start_time_unix_nano) / 1e6, 3)
        assert end["data"]["status"] == ("error" if span.status.code == 2 else "success")
    events = [m for m in exported.messages if m["type"] == "event"]
    assert len(events) == sum(len(span.events) for span in accepted)
    assert {e["data"]["level"] for e in events if e["data"]["message"] == "exception"} <= {"error"}


def test_a_failed_span_carries_the_error_status_its_message_and_its_exception():
    span = Span(trace_id=bytes(range(16)), span_id=bytes(range(1, 9)), parent_span_id=bytes(range(2, 10)), name="load", kind=2,
                start_time_unix_nano=NOW_NS, end_time_unix_nano=NOW_NS + 2_500_000, status=Status(code=2, message="disk full"))
    span.attributes.extend(attributes(rows=10))
    event = span.events.add(time_unix_nano=NOW_NS + 1_000_000, name="exception")
    event.attributes.extend(attributes(**{"exception.type": "OSError", "exception.message": "disk full"}))
    start, exception, end = export(TRACES, traces_request([span]), OPTIONS).messages
    assert start["data"] == {"name": "load", "phase": "start", "kind": "server"}
    assert start["timestamp"] == "2025-11-24T16:00:00.000Z" and end["timestamp"] == "2025-11-24T16:00:00.002Z"
    assert end["data"] == {"name": "load", "phase": "end", "status": "error", "duration_ms": 2.5, "kind": "server", "status_message": "disk full", "rows": 10}
    assert exception["type"] == "event" and exception["data"]["level"] == "error" and exception["data"]["message"] == "OSError: disk full"
    assert exception["span_id"] == start["span_id"] and "parent_span_id" not in exception


def test_a_span_that_ends_before_it_starts_is_rejected_with_the_reason():
    span = Span(trace_id=bytes(range(16)), span_id=bytes(range(1, 9)), name="x", start_time_unix_nano=NOW_NS, end_time_unix_nano=NOW_NS - 1_000_000)
    exported = export(TRACES, traces_request([span]), OPTIONS)
    assert not exported.messages and [(e.reason, e.detail) for e in exported.errors] == [("invalid_field", "span 'x': it ends 1 ms before it starts")]
    assert exported.error_message() == "1 of 1 spans rejected: invalid_field (1, e.g. span 'x': it ends 1 ms before it starts)"


# ------------------------------------------------------------------ metrics


@given(st.lists(st.tuples(st.sampled_from(["gauge", "sum"]), st.one_of(st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=False, allow_infinity=False)), trees), max_size=6))
def test_every_gauge_and_sum_point_is_a_metric_with_its_value_and_string_tags(points):
    request = ExportMetricsServiceRequest()
    scope = request.resource_metrics.add().scope_metrics.add()
    for kind, value, tree in points:
        metric = scope.metrics.add(name="m", unit="ms")
        point = getattr(metric, kind).data_points.add(time_unix_nano=NOW_NS)
        setattr(point, "as_int" if isinstance(value, int) else "as_double", value)
        point.attributes.add(key="tag", value=build(tree))
    exported = export(METRICS, request, OPTIONS)
    assert exported.rejected == 0 and len(exported.messages) == len(points)
    for message, (kind, value, tree) in zip(exported.messages, points):
        assert message["source"] == "otel" and message["data"]["value"] == value and message["data"]["kind"] == kind
        assert all(isinstance(tag, str) for tag in message["data"]["tags"].values())


def test_histograms_keep_count_sum_min_max_and_buckets_and_a_nan_gauge_is_rejected():
    request = ExportMetricsServiceRequest()
    scope = request.resource_metrics.add().scope_metrics.add()
    histogram = scope.metrics.add(name="latency", unit="ms").histogram
    histogram.aggregation_temporality = 1
    histogram.data_points.add(count=3, sum=30.0, min=1.0, max=20.0, explicit_bounds=[10.0], bucket_counts=[2, 1], time_unix_nano=NOW_NS)
    exponential = scope.metrics.add(name="size").exponential_histogram
    point = exponential.data_points.add(count=2, scale=1, zero_count=0, time_unix_nano=NOW_NS)
    point.positive.offset, point.positive.bucket_counts[:] = 3, [1, 1]
    scope.metrics.add(name="temperature").gauge.data_points.add(as_double=math.nan)
    scope.metrics.add(name="stale").gauge.data_points.add(as_double=1.0, flags=1)  # no recorded value: nothing to store
    scope.metrics.add(name="empty")
    exported = export(METRICS, request, OPTIONS)
    first, second = exported.messages
    assert first["data"] == {"name": "latency", "value": 3, "count": 3, "sum": 30.0, "min": 1.0, "max": 20.0, "bounds": [10.0], "bucket_counts": [2, 1], "unit": "ms", "kind": "histogram", "temporality": "delta"}
    assert second["data"] == {"name": "size", "value": 2, "count": 2, "scale": 1, "zero_count": 0, "positive": {"offset": 3, "bucket_counts": [1, 1]}, "kind": "exponential_histogram"}
    assert sorted(e.reason for e in exported.errors) == ["missing_field", "not_finite"]


# ------------------------------------------------------------------ decoding


def _otlp_json(message) -> bytes:
    """A request in OTLP's JSON: protobuf's JSON mapping with the ids in hex."""
    document = json_format.MessageToDict(message)

    def hexed(node):
        if isinstance(node, dict):
            return {k: base64.b64decode(v).hex().upper() if k in ("traceId", "spanId", "parentSpanId") else hexed(v) for k, v in node.items()}
        if isinstance(node, list):
            return [hexed(item) for item in node]
        return node

    return orjson.dumps(hexed(document))


@settings(max_examples=50)
@given(st.lists(spans(), max_size=4), st.lists(log_records, max_size=4))
def test_json_and_protobuf_bodies_decode_to_the_same_request(generated_spans, records):
    for signal, request in ((TRACES, traces_request(generated_spans)), (LOGS, logs_request(records))):
        from_json = decode(signal, _otlp_json(request), Encoding.JSON, "", 1 << 20)
        from_protobuf = decode(signal, request.SerializeToString(), Encoding.PROTOBUF, "", 1 << 20)
        # As dicts: a NaN is "NaN" in both (as messages, NaN != NaN, and JSON keeps no NaN payload).
        assert json_format.MessageToDict(from_json) == json_format.MessageToDict(from_protobuf) == json_format.MessageToDict(request)


@given(st.binary(max_size=300), st.sampled_from(list(Encoding)), st.booleans())
def test_arbitrary_bytes_are_decoded_or_a_400_and_never_anything_else(body, encoding, gzipped):
    for signal in SIGNALS.values():
        try:
            decode(signal, gzip.compress(body) if gzipped else body, encoding, "gzip" if gzipped else "", 1 << 16)
        except RequestError as error:
            assert error.status == 400 and error.reason in ("invalid_protobuf", "invalid_json")


@given(st.binary(max_size=5000), st.integers(0, 6000))
def test_gunzip_gives_the_body_back_or_413_past_the_limit(body, limit):
    packed = gzip.compress(body) + gzip.compress(b"more")  # two members: still one body
    if len(body) + 4 <= limit:
        assert gunzip(packed, limit) == body + b"more"
    else:
        with pytest.raises(RequestError) as caught:
            gunzip(packed, limit)
        assert caught.value.status == 413


def test_a_gzip_bomb_stops_at_the_limit_and_a_cut_body_is_a_400():
    bomb = gzip.compress(bytes(50_000_000))
    assert len(bomb) < 100_000
    with pytest.raises(RequestError, match="more than 1048576 bytes") as caught:
        gunzip(bomb, 1 << 20)
    assert caught.value.status == 413
    with pytest.raises(RequestError, match="cut short") as caught:
        gunzip(gzip.compress(b"x" * 100)[:-10], 1 << 20)
    assert caught.value.status == 400


def test_a_json_id_that_is_not_hex_is_a_400():
    with pytest.raises(RequestError, match="traceId 'xyz' is not hex") as caught:
        decode(TRACES, b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "xyz"}]}]}]}', Encoding.JSON, "", 1 << 20)
    assert caught.value.status == 400


@pytest.mark.parametrize("method, path, content_type, encoding, status", [
    ("POST", "/v1/traces", "application/x-protobuf", "", None),
    ("POST", "/v1/logs?x=1", "application/json; charset=utf-8", "gzip", None),
    ("POST", "/v1/profiles", "application/x-protobuf", "", 404),
    ("GET", "/v1/metrics", "application/x-protobuf", "", 405),
    ("POST", "/v1/metrics", "text/plain", "", 415),
    ("POST", "/v1/metrics", "application/json", "br", 415),
])
def test_a_request_head_is_routed_or_answered_at_once(method, path, content_type, encoding, status):
    if status is None:
        signal, _encoding = route(method, path, content_type, encoding)
        assert signal.path == path.split("?")[0]
    else:
        with pytest.raises(RequestError) as caught:
            route(method, path, content_type, encoding)
        assert caught.value.status == status


def test_an_error_body_is_a_google_rpc_status_in_either_encoding():
    assert orjson.loads(error_body(415, "use protobuf", Encoding.JSON)) == {"code": 3, "message": "use protobuf"}
    from google.rpc.status_pb2 import Status as RpcStatus  # googleapis' own class, as exporters read it

    assert RpcStatus.FromString(error_body(503, "busy", Encoding.PROTOBUF)) == RpcStatus(code=14, message="busy")
