"""Messages of the wire format as OTLP export requests (pure): the way back of the otlp source.

One batch (one source) becomes at most three requests, for logs, traces and metrics:

- `event` -> a log record: the level as severity (number and text), `data.message` as the body,
  the rest of `data` as attributes, trace and span ids kept.
- `span` -> a span, made at its `end`: start = end - `duration_ms` (the SDK's measure), the status `ok`/`success`/
  `completed`/`done` as OK and a failed one (sidecar.jobs' FAILED_STATUSES) as ERROR with the
  status as its message, any other as UNSET; the data of its `start`, when that was seen, and of
  its end as attributes. A start waits in `HeldStarts` for its end; one not ended within the hold
  time is sent as a span without an end time (`end_time_unix_nano` 0), counted; one that comes
  after its end (remembered for the last `limit` spans) is not sent again.
- `metric` -> a gauge point (`data.tags` as attributes, `unit` kept); `progress` -> a gauge
  `progress.percent` (unit `%`, `job_id` and `status` as attributes); `resource` -> one gauge per
  figure given, `resource.<name>`.

A message's source is its resource's `service.name`, its host the `host.name`, its context the
other resource attributes (messages of one source, host and context share one resource), which
is where the otlp source reads context from.
"""

from collections.abc import Iterable

import attrs
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, InstrumentationScope, KeyValue, KeyValueList
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs, ScopeLogs
from opentelemetry.proto.metrics.v1.metrics_pb2 import Gauge, Metric, NumberDataPoint, ResourceMetrics, ScopeMetrics
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

from sidecar import __version__
from sidecar.bounded import ForgetfulCache
from sidecar.jobs import FAILED_STATUSES
from sidecar.message import parse_timestamp

SCOPE = InstrumentationScope(name="monitoring-sidecar", version=__version__)
# Severity numbers of the OTLP log data model for each level (the first of each range).
SEVERITY = {"debug": 5, "info": 9, "warning": 13, "error": 17, "critical": 21}
OK_STATUSES = frozenset({"ok", "success", "succeeded", "completed", "done"})
_NS = 1_000_000_000


def nanos(timestamp: str) -> int:
    """An RFC 3339 timestamp as nanoseconds since the epoch (0 when it cannot be read)."""
    try:
        moment = parse_timestamp(timestamp)
    except (TypeError, ValueError):
        return 0
    return int(moment.timestamp()) * _NS + moment.microsecond * 1000


def any_value(value) -> AnyValue:
    """A JSON value as an OTLP AnyValue (null as an empty value)."""
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value) if -(2**63) <= value < 2**63 else AnyValue(string_value=str(value))
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, str):
        return AnyValue(string_value=value)
    if isinstance(value, dict):
        return AnyValue(kvlist_value=KeyValueList(values=attributes(value)))
    if isinstance(value, list):
        return AnyValue(array_value=ArrayValue(values=[any_value(v) for v in value]))
    return AnyValue()


def attributes(mapping: dict, skip: Iterable[str] = ()) -> list[KeyValue]:
    skipped = set(skip)
    return [KeyValue(key=str(k), value=any_value(v)) for k, v in mapping.items() if k not in skipped]


def _ids(message: dict, into) -> None:
    if "trace_id" in message:
        into.trace_id = bytes.fromhex(message["trace_id"])
    if "span_id" in message:
        into.span_id = bytes.fromhex(message["span_id"])


class HeldStarts:
    """Span starts waiting for their ends, by (trace, span) id: at most `limit`, each for
    `hold` seconds; `expired(now)` hands back those past their time, oldest first."""

    def __init__(self, hold: float, limit: int):
        self.hold = hold
        self.limit = limit
        self._starts: dict[tuple, tuple[float, dict]] = {}

    def __len__(self) -> int:
        return len(self._starts)

    def hold_start(self, message: dict, now: float) -> list[dict]:
        """Keep `message`; the starts pushed out by the limit, to send without an end."""
        key = (message.get("trace_id"), message.get("span_id"))
        self._starts.pop(key, None)  # the same span started again: the later start, as the newest
        self._starts[key] = (now, message)
        pushed = []
        while len(self._starts) > self.limit:
            key = next(iter(self._starts))
            pushed.append(self._starts.pop(key)[1])
        return pushed

    def take(self, end: dict) -> dict | None:
        entry = self._starts.pop((end.get("trace_id"), end.get("span_id")), None)
        return None if entry is None else entry[1]

    def expired(self, now: float) -> list[dict]:
        found = []
        while self._starts:
            key, (held_at, message) = next(iter(self._starts.items()))
            if now - held_at < self.hold:
                break
            del self._starts[key]
            found.append(message)
        return found

    def take_all(self) -> list[dict]:
        found = [message for _held_at, message in self._starts.values()]
        self._starts.clear()
        return found


def span_of(end: dict | None, start: dict | None) -> Span:
    """The span of an end message (and its start, when seen), or of a start alone (no end time)."""
    first = start if start is not None else end
    span = Span(name=first["data"]["name"], kind=Span.SpanKind.SPAN_KIND_INTERNAL)
    _ids(first, span)
    if "parent_span_id" in first:
        span.parent_span_id = bytes.fromhex(first["parent_span_id"])
    data = {**(start["data"] if start else {}), **(end["data"] if end else {})}
    span.attributes.extend(attributes(data, ("name", "phase", "status", "duration_ms")))
    if end is None:
        span.start_time_unix_nano = nanos(start["timestamp"])
        return span
    span.end_time_unix_nano = nanos(end["timestamp"])
    # The duration is what the SDK measured; the start message's timestamp has milliseconds only.
    span.start_time_unix_nano = max(0, span.end_time_unix_nano - round(end["data"]["duration_ms"] * 1_000_000))
    status = end["data"]["status"]
    if status in FAILED_STATUSES:
        span.status.CopyFrom(Status(code=Status.StatusCode.STATUS_CODE_ERROR, message=status))
    elif status in OK_STATUSES:
        span.status.CopyFrom(Status(code=Status.StatusCode.STATUS_CODE_OK))
    else:
        span.status.CopyFrom(Status(code=Status.StatusCode.STATUS_CODE_UNSET, message=status))
    return span


def log_record_of(message: dict) -> LogRecord:
    data = message["data"]
    record = LogRecord(
        time_unix_nano=nanos(message["timestamp"]),
        observed_time_unix_nano=nanos(message.get("received_at", "")),
        severity_number=SEVERITY[data["level"]],
        severity_text=data["level"].upper(),
        body=AnyValue(string_value=data["message"]),
    )
    record.attributes.extend(attributes(data, ("level", "message")))
    _ids(message, record)
    return record


def points_of(message: dict) -> list[tuple[str, str, NumberDataPoint]]:
    """(metric name, unit, point) for a metric, progress or resource message."""
    data, kind, at = message["data"], message["type"], nanos(message["timestamp"])

    def point(value, tags: dict) -> NumberDataPoint:
        made = NumberDataPoint(time_unix_nano=at, attributes=attributes(tags))
        if isinstance(value, int) and -(2**63) <= value < 2**63:
            made.as_int = value
        else:
            made.as_double = float(value)
        return made

    if kind == "metric":
        return [(data["name"], data.get("unit") or "", point(data["value"], data.get("tags") or {}))]
    if kind == "progress":
        return [("progress.percent", "%", point(data["percent"], {"job_id": data["job_id"], "status": data["status"]}))]
    units = {"cpu_percent": "%"}
    return [(f"resource.{name}", units.get(name, "MiBy" if name.endswith("_mb") else ""), point(value, {})) for name, value in data.items() if value is not None]


def resource_of(source: str, host: str | None, context: dict) -> Resource:
    fixed = {"service.name": source, **({"host.name": host} if host else {})}
    return Resource(attributes=attributes({**context, **fixed}))


@attrs.frozen
class Requests:
    """A batch's export requests (None where it has nothing of that kind) and how many messages
    each carries."""

    logs: ExportLogsServiceRequest | None
    traces: ExportTraceServiceRequest | None
    metrics: ExportMetricsServiceRequest | None
    unended: int  # spans sent without an end (their start waited past the hold time)


class Exporter:
    """Makes a batch's requests; keeps span starts between batches (`HeldStarts`)."""

    def __init__(self, hold: float, limit: int):
        self.starts = HeldStarts(hold, limit)
        # Spans already sent at their end: a start that comes later (out of order, or a client's
        # resend) is not held, or the span would go out twice.
        self._ended = ForgetfulCache(limit)

    def requests(self, messages: list[dict], now: float, *, flush: bool = False) -> Requests:
        """The requests for one batch, with the held starts whose time is up (`flush`: all of
        them, at shutdown); a held start may be of another source than the batch."""
        groups: dict[tuple, dict] = {}  # (host, context) -> what goes under its resource
        unended = 0

        def group(message: dict) -> dict:
            context = message.get("context") or {}
            key = (message["source"], message.get("host"), tuple(sorted((k, repr(v)) for k, v in context.items())))
            parts = groups.get(key)
            if parts is None:
                parts = groups[key] = {"logs": [], "spans": [], "points": [], "example": message}
            return parts

        for message in messages:
            kind = message["type"]
            if kind == "event":
                group(message)["logs"].append(log_record_of(message))
            elif kind == "span":
                key = (message.get("trace_id"), message.get("span_id"))
                if message["data"]["phase"] == "start":
                    if key in self._ended:
                        continue
                    for pushed in self.starts.hold_start(message, now):
                        group(pushed)["spans"].append(span_of(None, pushed))
                        unended += 1
                else:
                    group(message)["spans"].append(span_of(message, self.starts.take(message)))
                    self._ended.remember(key, True)
            else:
                group(message)["points"].extend(points_of(message))
        for start in self.starts.take_all() if flush else self.starts.expired(now):
            group(start)["spans"].append(span_of(None, start))
            unended += 1
        return self._assemble(groups, unended)

    def _assemble(self, groups, unended: int) -> Requests:
        logs, traces, metrics = ExportLogsServiceRequest(), ExportTraceServiceRequest(), ExportMetricsServiceRequest()
        for parts in groups.values():
            example = parts["example"]
            resource = resource_of(example["source"], example.get("host"), example.get("context") or {})
            if parts["logs"]:
                logs.resource_logs.append(ResourceLogs(resource=resource, scope_logs=[ScopeLogs(scope=SCOPE, log_records=parts["logs"])]))
            if parts["spans"]:
                traces.resource_spans.append(ResourceSpans(resource=resource, scope_spans=[ScopeSpans(scope=SCOPE, spans=parts["spans"])]))
            if parts["points"]:
                by_metric: dict[tuple[str, str], list] = {}
                for name, unit, point in parts["points"]:
                    by_metric.setdefault((name, unit), []).append(point)
                made = [Metric(name=name, unit=unit, gauge=Gauge(data_points=points)) for (name, unit), points in by_metric.items()]
                metrics.resource_metrics.append(ResourceMetrics(resource=resource, scope_metrics=[ScopeMetrics(scope=SCOPE, metrics=made)]))
        return Requests(logs if logs.resource_logs else None, traces if traces.resource_spans else None, metrics if metrics.resource_metrics else None, unended)
