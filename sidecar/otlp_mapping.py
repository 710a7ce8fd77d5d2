"""OpenTelemetry's data model as the sidecar's messages: pure functions, no I/O.

An OTLP export request (the `opentelemetry-proto` classes, decoded from protobuf or JSON by
sidecar.otlp) becomes, item by item, the envelope of docs/protocol.md:

- a log record: one `event`;
- a span: a `span` start and end pair with the span's own ids, and one `event` per span event
  (an `exception` event at level `error`);
- a metric data point: one `metric` (gauge and sum points with their value; histogram,
  exponential histogram and summary points with their count as `value` and the rest in data).

Each item yields its messages, or a `Rejected` naming why it cannot be mapped; a caller
validates the messages (sidecar.message.validate_message) and rejects the item whole when one
of them is invalid, so a span's start is never stored without its end.

The resource's `service.name` is the message's `source`; resource and scope attributes are kept
in `context` (`resource`, `scope`), and the job is the first of `job_id_attributes` found in the
item's own attributes, then the resource's. The inverse mapping (messages to OTLP, for a
backend) belongs beside these functions, with the same names the other way round.
"""

import base64
import datetime as dt
import functools
import math
from collections.abc import Iterator

import attrs
import orjson

from sidecar.constants import LEVEL_ALIASES, LEVELS, MAX_SOURCE_LENGTH
from sidecar.message import format_timestamp

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
SERVICE_NAME = "service.name"

# SeverityNumber ranges (logs data model): 1-4 TRACE, 5-8 DEBUG, 9-12 INFO, 13-16 WARN,
# 17-20 ERROR, 21-24 FATAL. The project has no trace level: it reads as debug.
_SEVERITY_LEVELS = ((8, "debug"), (12, "info"), (16, "warning"), (20, "error"))
_SPAN_KINDS = {1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}
_TEMPORALITIES = {1: "delta", 2: "cumulative"}
_STATUS_CODE_ERROR = 2
_NO_RECORDED_VALUE = 1  # DataPointFlags: a staleness marker, no value to store
# Keys of a message's data that the envelope gives a meaning: an attribute of the same name is
# kept under `attributes.<key>` instead of replacing it.
_RESERVED_DATA_KEYS = frozenset({"level", "message", "name", "phase", "status", "duration_ms", "value", "unit", "tags", "kind"})


@attrs.frozen
class MappingOptions:
    """What the mapping takes from the source's settings."""

    # The source of messages whose resource has no usable service.name.
    default_source: str = "otel"
    # Attributes that name a message's job (context.job_id), first found wins.
    job_id_attributes: tuple[str, ...] = ("job.id", "job_id")


@attrs.frozen
class Rejected:
    """One OTLP item (log record, span, data point) that has no mapping: `reason` is the
    decode_errors_total label, `detail` what an operator reads."""

    reason: str
    detail: str


# ------------------------------------------------------------------ values


def any_value(value):
    """An AnyValue as JSON's nearest: bytes as base64 (as OTLP's JSON mapping writes them), a
    NaN or an infinity as its name (JSON has none), an empty value as None."""
    kind = value.WhichOneof("value")
    if kind == "string_value":
        return value.string_value
    if kind == "int_value":
        return value.int_value
    if kind == "double_value":
        number = value.double_value
        return number if math.isfinite(number) else str(number)
    if kind == "bool_value":
        return value.bool_value
    if kind == "array_value":
        return [any_value(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return attributes(value.kvlist_value.values)
    if kind == "bytes_value":
        return base64.b64encode(value.bytes_value).decode()
    return None


def attributes(key_values) -> dict:
    """Repeated KeyValue as a dict (a repeated key: the last wins)."""
    return {kv.key: any_value(kv.value) for kv in key_values}


def _tag(value) -> str:
    """A metric tag's value: a string as it is, anything else as its JSON text."""
    return value if type(value) is str else orjson.dumps(value).decode()


def _timestamp(unix_nano: int) -> str | None:
    """Nanoseconds since the epoch as the sidecar's RFC 3339 with ms; None for 0 (unset).
    A fixed64 of nanoseconds ends in the year 2554: always within range."""
    if not unix_nano:
        return None
    return _millisecond_timestamp(unix_nano // 1_000_000)


@functools.lru_cache(maxsize=4096)  # the items of a batch mostly share their milliseconds
def _millisecond_timestamp(unix_ms: int) -> str:
    return format_timestamp(_EPOCH + dt.timedelta(milliseconds=unix_ms))


def _hex_id(raw: bytes, size: int, what: str) -> str | None:
    """A trace or span id as lowercase hex; None when unset (empty or all zeros, both invalid
    ids by the spec, meaning none). ValueError for another length."""
    if not raw or not any(raw):
        return None
    if len(raw) != size:
        raise ValueError(f"{what} must be {size} bytes, got {len(raw)}")
    return raw.hex()


def source_name(service_name, default: str) -> str:
    """A valid message source from a resource's service.name: printable, at most
    MAX_SOURCE_LENGTH characters (unprintable ones become `_`); `default` when there is none."""
    if service_name is None or service_name == "":
        return default
    text = service_name if type(service_name) is str else orjson.dumps(service_name).decode()
    text = "".join(c if c.isprintable() else "_" for c in text[:MAX_SOURCE_LENGTH])
    return text or default


def level_of(severity_number: int, severity_text: str) -> str:
    """The project's level for an OTel severity: by its number when set, else by its text
    (the level names and their aliases, `trace` as debug), else info."""
    if severity_number > 0:
        for highest, level in _SEVERITY_LEVELS:
            if severity_number <= highest:
                return level
        return "critical"
    text = severity_text.strip().lower()
    text = LEVEL_ALIASES.get(text, text)
    if text in LEVELS:
        return text
    return "debug" if text == "trace" else "info"


def _merge(data: dict, extra: dict) -> dict:
    """Attributes into a message's data, the envelope's own keys kept (see _RESERVED_DATA_KEYS)."""
    for key, value in extra.items():
        if key in _RESERVED_DATA_KEYS:
            data.setdefault(f"attributes.{key}", value)
        else:
            data.setdefault(key, value)
    return data


# ------------------------------------------------------------------ shared parts


@attrs.frozen
class _Origin:
    """What a resource and a scope give every item under them."""

    source: str
    resource: dict
    context: dict  # resource and scope attributes, as context carries them

    def context_for(self, own: dict, options: MappingOptions) -> dict:
        """The context of one item: the origin's, with the job named by the item's attributes or
        the resource's (job ids that are not a string or an integer are ignored)."""
        context = dict(self.context)
        for found in (own, self.resource):
            for key in options.job_id_attributes:
                job_id = found.get(key)
                if type(job_id) is str and job_id:
                    context["job_id"] = job_id
                    return context
                if type(job_id) is int:
                    context["job_id"] = str(job_id)
                    return context
        return context


def _origin(resource, scope, options: MappingOptions) -> _Origin:
    resource_attributes = attributes(resource.attributes)
    context: dict = {}
    if resource_attributes:
        context["resource"] = resource_attributes
    scope_part = {key: value for key, value in (("name", scope.name), ("version", scope.version)) if value}
    scope_attributes = attributes(scope.attributes)
    if scope_attributes:
        scope_part["attributes"] = scope_attributes
    if scope_part:
        context["scope"] = scope_part
    return _Origin(source_name(resource_attributes.get(SERVICE_NAME), options.default_source), resource_attributes, context)


def _ids(message: dict, trace_id: bytes, span_id: bytes, parent_span_id: bytes = b"") -> dict:
    """The ids on a message, as hex; ValueError for a malformed one."""
    for key, raw, size in (("trace_id", trace_id, 16), ("span_id", span_id, 8), ("parent_span_id", parent_span_id, 8)):
        value = _hex_id(raw, size, key)
        if value is not None:
            message[key] = value
    return message


# ------------------------------------------------------------------ logs


def logs_to_messages(request, options: MappingOptions) -> Iterator[list[dict] | Rejected]:
    """An ExportLogsServiceRequest: per log record, its `event` (in a list) or a Rejected."""
    for resource_logs in request.resource_logs:
        for scope_logs in resource_logs.scope_logs:
            origin = _origin(resource_logs.resource, scope_logs.scope, options)
            for record in scope_logs.log_records:
                yield _log_record(record, origin, options)


def log_body(body) -> str:
    """A log body as an event's message: a string as it is, any other value as its JSON text
    (the empty body: an empty message)."""
    value = any_value(body)
    if type(value) is str:
        return value
    return "" if value is None else orjson.dumps(value).decode()


def _log_record(record, origin: _Origin, options: MappingOptions) -> list[dict] | Rejected:
    own = attributes(record.attributes)
    data = {"level": level_of(record.severity_number, record.severity_text), "message": log_body(record.body)}
    if record.event_name:
        data["event_name"] = record.event_name
    message = {"source": origin.source, "type": "event", "data": _merge(data, own)}
    timestamp = _timestamp(record.time_unix_nano) or _timestamp(record.observed_time_unix_nano)
    if timestamp is not None:
        message["timestamp"] = timestamp
    try:
        _ids(message, record.trace_id, record.span_id)
    except ValueError as exc:
        return Rejected("invalid_field", f"log record: {exc}")
    context = origin.context_for(own, options)
    if context:
        message["context"] = context
    return [message]


# ------------------------------------------------------------------ traces


def traces_to_messages(request, options: MappingOptions) -> Iterator[list[dict] | Rejected]:
    """An ExportTraceServiceRequest: per span, its start, its events and its end, or a Rejected."""
    for resource_spans in request.resource_spans:
        for scope_spans in resource_spans.scope_spans:
            origin = _origin(resource_spans.resource, scope_spans.scope, options)
            for span in scope_spans.spans:
                yield _span(span, origin, options)


def _span(span, origin: _Origin, options: MappingOptions) -> list[dict] | Rejected:
    name = span.name
    where = f"span {name[:60]!r}"
    try:
        ids = _ids({}, span.trace_id, span.span_id, span.parent_span_id)
    except ValueError as exc:
        return Rejected("invalid_field", f"{where}: {exc}")
    if "trace_id" not in ids or "span_id" not in ids:
        return Rejected("missing_field", f"{where}: a span needs a trace_id and a span_id")
    start, end = span.start_time_unix_nano, span.end_time_unix_nano
    if not start or not end:
        return Rejected("missing_field", f"{where}: a span needs its start and end times")
    if end < start:
        return Rejected("invalid_field", f"{where}: it ends {(start - end) / 1e6:g} ms before it starts")
    own = attributes(span.attributes)
    context = origin.context_for(own, options)
    kind = _SPAN_KINDS.get(span.kind)

    def message(kind_of_message: str, timestamp: int, data: dict, with_ids: dict) -> dict:
        built = {"source": origin.source, "type": kind_of_message, "timestamp": _timestamp(timestamp), **with_ids, "data": data}
        if context:
            built["context"] = dict(context)
        return built

    start_data = {"name": name, "phase": "start"}
    end_data = {"name": name, "phase": "end", "status": "error" if span.status.code == _STATUS_CODE_ERROR else "success", "duration_ms": round((end - start) / 1e6, 3)}
    if kind is not None:
        start_data["kind"] = end_data["kind"] = kind
    if span.status.code == _STATUS_CODE_ERROR and span.status.message:
        end_data["status_message"] = span.status.message
    links = []
    for link in span.links:
        try:
            links.append(_ids(attributes(link.attributes), link.trace_id, link.span_id))
        except ValueError as exc:
            return Rejected("invalid_field", f"{where}: link: {exc}")
    if links:
        end_data["links"] = links
    messages = [message("span", start, start_data, ids)]
    # A span event happened inside the span: an event with the span's ids (no parent: the
    # envelope's parent_span_id is a span's parent, not an event's).
    event_ids = {"trace_id": ids["trace_id"], "span_id": ids["span_id"]}
    for event in span.events:
        event_attributes = attributes(event.attributes)
        if event.name == "exception":
            described = ": ".join(str(event_attributes[k]) for k in ("exception.type", "exception.message") if event_attributes.get(k) not in (None, ""))
            data = {"level": "error", "message": described or "exception"}
        else:
            data = {"level": "info", "message": event.name}
        messages.append(message("event", event.time_unix_nano or start, _merge(data, event_attributes), event_ids))
    messages.append(message("span", end, _merge(end_data, own), ids))
    return messages


# ------------------------------------------------------------------ metrics


def metrics_to_messages(request, options: MappingOptions) -> Iterator[list[dict] | Rejected]:
    """An ExportMetricsServiceRequest: per data point, its `metric` (in a list) or a Rejected.
    A point flagged as having no recorded value yields nothing; a metric with no data at all is
    one Rejected."""
    for resource_metrics in request.resource_metrics:
        for scope_metrics in resource_metrics.scope_metrics:
            origin = _origin(resource_metrics.resource, scope_metrics.scope, options)
            for metric in scope_metrics.metrics:
                yield from _metric(metric, origin, options)


def _metric(metric, origin: _Origin, options: MappingOptions) -> Iterator[list[dict] | Rejected]:
    kind = metric.WhichOneof("data")
    if kind is None:
        yield Rejected("missing_field", f"metric {metric.name[:60]!r} has no data")
        return
    data_of_kind = getattr(metric, kind)
    shape = {"kind": kind}
    if kind == "sum":
        shape["monotonic"] = data_of_kind.is_monotonic
    temporality = _TEMPORALITIES.get(getattr(data_of_kind, "aggregation_temporality", 0))
    if temporality is not None:
        shape["temporality"] = temporality
    for point in data_of_kind.data_points:
        if point.flags & _NO_RECORDED_VALUE:
            continue
        own = attributes(point.attributes)
        data = {"name": metric.name}
        if kind in ("gauge", "sum"):
            which = point.WhichOneof("value")
            if which is None:
                yield Rejected("missing_field", f"metric {metric.name[:60]!r}: a data point has no value")
                continue
            data["value"] = getattr(point, which)
        else:
            data["value"] = point.count
            data.update(_distribution(kind, point))
        if metric.unit:
            data["unit"] = metric.unit
        if own:
            data["tags"] = {key: _tag(value) for key, value in own.items()}
        data.update(shape)
        message = {"source": origin.source, "type": "metric", "data": data}
        timestamp = _timestamp(point.time_unix_nano)
        if timestamp is not None:
            message["timestamp"] = timestamp
        context = origin.context_for(own, options)
        if context:
            message["context"] = context
        yield [message]


def _distribution(kind: str, point) -> dict:
    """A histogram's, exponential histogram's or summary's point beyond its count."""
    data = {"count": point.count}
    if kind == "summary" or point.HasField("sum"):
        data["sum"] = point.sum
    if kind != "summary":
        for bound in ("min", "max"):
            if point.HasField(bound):
                data[bound] = getattr(point, bound)
    if kind == "histogram":
        data["bounds"] = list(point.explicit_bounds)
        data["bucket_counts"] = list(point.bucket_counts)
    elif kind == "exponential_histogram":
        data["scale"] = point.scale
        data["zero_count"] = point.zero_count
        for side in ("positive", "negative"):
            buckets = getattr(point, side)
            if buckets.bucket_counts:
                data[side] = {"offset": buckets.offset, "bucket_counts": list(buckets.bucket_counts)}
    else:
        data["quantiles"] = [{"quantile": q.quantile, "value": q.value} for q in point.quantile_values]
    return data


# ------------------------------------------------------------------ counts


def log_record_count(request) -> int:
    return sum(len(scope.log_records) for resource in request.resource_logs for scope in resource.scope_logs)


def span_count(request) -> int:
    return sum(len(scope.spans) for resource in request.resource_spans for scope in resource.scope_spans)


def data_point_count(request) -> int:
    """Data points, a metric with no data counting as one (it is rejected as one)."""
    total = 0
    for resource in request.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                kind = metric.WhichOneof("data")
                total += 1 if kind is None else len(getattr(metric, kind).data_points)
    return total
