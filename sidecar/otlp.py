"""OTLP/HTTP without I/O: an export request's path, headers and body in; the sidecar's messages,
the rejections to count and the response out (opentelemetry-proto's specification.md, OTLP/HTTP).

- `route(method, path, content_type, content_encoding)`: the signal a request is for, or the
  `RequestError` to answer at once (404, 405, 415), before its body is read.
- `decode(signal, body, encoding, content_encoding, limit)`: the body, gunzipped within `limit`,
  as the signal's Export*ServiceRequest; `RequestError` 400 or 413.
- `export(signal, request, options, max_depth)`: the `Export` of a decoded request: its
  messages (an `ingest.PythonChunk`, each validated), one `DecodeError` per rejected item, and
  the 200 response, with `partial_success` when any item was rejected.
- `error_body(...)`: the google.rpc.Status body of a 4xx or 5xx response.

Bodies are binary protobuf or OTLP's JSON (protobuf's JSON mapping with hex trace and span ids
and integer enums); a response is in the request's encoding.
"""

import base64
import enum
import zlib
from collections.abc import Callable

import attrs
import orjson
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.message import DecodeError as ProtobufDecodeError
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest, ExportLogsServiceResponse
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest, ExportMetricsServiceResponse
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest, ExportTraceServiceResponse

from sidecar.constants import DEFAULT_MAX_DEPTH
from sidecar.ingest import PythonChunk
from sidecar.message import MessageError, validate_message
from sidecar.otlp_mapping import (
    MappingOptions,
    Rejected,
    data_point_count,
    log_record_count,
    logs_to_messages,
    metrics_to_messages,
    span_count,
    traces_to_messages,
)
from sidecar.protocol import DecodeError


class Encoding(enum.Enum):
    PROTOBUF = "application/x-protobuf"
    JSON = "application/json"


# Content types as clients send them (the media type, parameters aside).
_ENCODINGS = {"application/x-protobuf": Encoding.PROTOBUF, "application/protobuf": Encoding.PROTOBUF, "application/json": Encoding.JSON}
# google.rpc.Code of each HTTP status the source answers with (the spec leaves Status.code free).
_RPC_CODES = {400: 3, 404: 12, 405: 12, 408: 4, 413: 3, 415: 3, 429: 8, 500: 13, 503: 14}


@attrs.frozen
class Signal:
    """One of the three export paths."""

    path: str
    name: str  # what its items are, for messages: "log records"
    request_class: type
    response_class: type
    to_messages: Callable
    count_items: Callable  # how many items a request holds
    rejected_field: str  # the partial_success field counting rejected items


SIGNALS = {
    signal.path: signal
    for signal in (
        Signal("/v1/logs", "log records", ExportLogsServiceRequest, ExportLogsServiceResponse, logs_to_messages, log_record_count, "rejected_log_records"),
        Signal("/v1/traces", "spans", ExportTraceServiceRequest, ExportTraceServiceResponse, traces_to_messages, span_count, "rejected_spans"),
        Signal("/v1/metrics", "data points", ExportMetricsServiceRequest, ExportMetricsServiceResponse, metrics_to_messages, data_point_count, "rejected_data_points"),
    )
}


class RequestError(Exception):
    """A request answered with an error status: `status` (HTTP), `message` (the Status body's),
    `reason` (a short label for the decode_errors_total counter, when it costs data)."""

    def __init__(self, status: int, message: str, reason: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason


def encoding_of(content_type: str) -> Encoding | None:
    """The body encoding a Content-Type names, or None for one OTLP does not use."""
    return _ENCODINGS.get(content_type.split(";", 1)[0].strip().lower())


def route(method: str, path: str, content_type: str, content_encoding: str) -> tuple[Signal, Encoding]:
    """The signal and body encoding of a request, from its head alone; RequestError when it
    is answered without reading the body."""
    signal = SIGNALS.get(path.split("?", 1)[0])
    if signal is None:
        raise RequestError(404, f"no such path: {path[:100]} (OTLP/HTTP posts to {', '.join(SIGNALS)})")
    if method != "POST":
        raise RequestError(405, f"{method[:20]} {signal.path}: use POST")
    encoding = encoding_of(content_type)
    if encoding is None:
        raise RequestError(415, f"content type {content_type[:100]!r} is not OTLP's: use application/x-protobuf or application/json")
    if content_encoding.strip().lower() not in ("", "identity", "gzip"):
        raise RequestError(415, f"content encoding {content_encoding[:40]!r} is not supported: send gzip or none")
    return signal, encoding


def gunzip(body: bytes, limit: int) -> bytes:
    """A gzip body (one member or several) decompressed, never past `limit` bytes:
    RequestError 413 beyond it, 400 for one that is not gzip or cut short."""
    out = bytearray()
    rest = body
    while rest:
        inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
        try:
            out += inflater.decompress(rest, limit + 1 - len(out))
        except zlib.error as exc:
            raise RequestError(400, f"the gzip body cannot be decompressed: {exc}", "invalid_gzip") from None
        if len(out) > limit:
            raise RequestError(413, f"the body decompresses to more than {limit} bytes (the source's max_body_size)", "too_large")
        if not inflater.eof:
            raise RequestError(400, "the gzip body is cut short", "invalid_gzip")
        rest = inflater.unused_data
    return bytes(out)


def decode(signal: Signal, body: bytes, encoding: Encoding, content_encoding: str, limit: int):
    """The body as the signal's Export*ServiceRequest. RequestError 400 when it cannot be
    decoded (reason invalid_gzip, invalid_protobuf or invalid_json), 413 past `limit`."""
    if content_encoding.strip().lower() == "gzip":
        body = gunzip(body, limit)
    if encoding is Encoding.PROTOBUF:
        try:
            return signal.request_class.FromString(body)
        except ProtobufDecodeError as exc:
            raise RequestError(400, f"the body is not a protobuf {signal.request_class.__name__}: {exc}", "invalid_protobuf") from None
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise RequestError(400, f"the body is not JSON: {exc}", "invalid_json") from None
    if type(document) is not dict:
        raise RequestError(400, f"the body must be a JSON object ({signal.request_class.__name__}), got {type(document).__name__}", "invalid_json")
    try:
        _hex_ids_to_base64(document)
        return json_format.ParseDict(document, signal.request_class(), ignore_unknown_fields=True)
    except (json_format.ParseError, ValueError) as exc:
        raise RequestError(400, f"the body is not an OTLP JSON {signal.request_class.__name__}: {str(exc)[:300]}", "invalid_json") from None


_ID_KEYS = frozenset({"traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id"})


def _hex_ids_to_base64(document: dict) -> None:
    """OTLP's JSON writes trace and span ids in hex where protobuf's JSON mapping has base64:
    rewritten in place, wherever they are (attributes are lists of key/value objects, so no
    attribute key is ever a JSON key here). Iterative: no depth exhausts the stack."""
    pending = [document]
    while pending:
        node = pending.pop()
        if type(node) is dict:
            for key, value in node.items():
                if key in _ID_KEYS and type(value) is str:
                    try:
                        node[key] = base64.b64encode(bytes.fromhex(value)).decode()
                    except ValueError:
                        raise ValueError(f"{key} {value[:40]!r} is not hex") from None
                elif type(value) in (dict, list):
                    pending.append(value)
        else:
            pending.extend(item for item in node if type(item) in (dict, list))


@attrs.frozen
class Export:
    """What one decoded export request comes to."""

    signal: Signal
    messages: PythonChunk
    errors: list[DecodeError]  # one per rejected item
    items: int  # items in the request

    @property
    def rejected(self) -> int:
        return sum(error.count for error in self.errors)

    def error_message(self) -> str:
        """The partial_success error_message: how many were rejected, each reason with its count
        and its first detail."""
        by_reason: dict[str, list] = {}
        for error in self.errors:
            first = by_reason.setdefault(error.reason, [0, error.detail])
            first[0] += error.count
        reasons = "; ".join(f"{reason} ({count}, e.g. {detail})" for reason, (count, detail) in by_reason.items())
        return f"{self.rejected} of {self.items} {self.signal.name} rejected: {reasons}"[:2000]

    def response(self, encoding: Encoding) -> bytes:
        """The Export*ServiceResponse: partial_success set only when some item was rejected."""
        response = self.signal.response_class()
        if self.errors:
            setattr(response.partial_success, self.signal.rejected_field, self.rejected)
            response.partial_success.error_message = self.error_message()
        return _encode(response, encoding)


def export(signal: Signal, request, options: MappingOptions, max_depth: int = DEFAULT_MAX_DEPTH) -> Export:
    """Map and validate every item of a decoded request. An item whose mapping or any of whose
    messages is invalid is rejected whole (a span's start never without its end); the others go
    on. A bug met in the mapping costs the items not mapped yet (`internal_error`), not the
    request nor the sidecar."""
    messages = PythonChunk()
    errors: list[DecodeError] = []
    mapped = 0
    items = signal.to_messages(request, options)
    while True:
        try:
            item = next(items, None)
        except Exception as exc:
            left = max(1, signal.count_items(request) - mapped)
            errors.append(DecodeError("internal_error", f"internal error mapping {signal.name}: {exc!r}", left, exc))
            mapped += left
            break
        if item is None:
            break
        mapped += 1
        if isinstance(item, Rejected):
            errors.append(DecodeError(item.reason, item.detail))
            continue
        try:
            for message in item:
                validate_message(message, max_depth)
        except MessageError as exc:
            errors.append(DecodeError(exc.reason, f"{signal.name[:-1]} of {item[0].get('source')!r}: {exc.detail}"))
            continue
        messages.extend(item)
    return Export(signal, messages, errors, mapped)


def error_body(status: int, message: str, encoding: Encoding) -> bytes:
    """A google.rpc.Status for a 4xx or 5xx response."""
    return _encode(_Status(code=_RPC_CODES.get(status, 2), message=message), encoding)


def _encode(message, encoding: Encoding) -> bytes:
    if encoding is Encoding.JSON:
        return orjson.dumps(json_format.MessageToDict(message))
    return message.SerializeToString()


def _status_class():
    """google.rpc.Status (code, message; details left out), built in a pool of its own: no
    package of googleapis for two fields, and no clash with one that registers it."""
    proto = descriptor_pb2.FileDescriptorProto(name="sidecar/google/rpc/status.proto", package="google.rpc", syntax="proto3")
    status = proto.message_type.add(name="Status")
    field = descriptor_pb2.FieldDescriptorProto
    status.field.add(name="code", number=1, type=field.TYPE_INT32, label=field.LABEL_OPTIONAL, json_name="code")
    status.field.add(name="message", number=2, type=field.TYPE_STRING, label=field.LABEL_OPTIONAL, json_name="message")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("google.rpc.Status"))


_Status = _status_class()
