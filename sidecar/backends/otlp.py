"""OTLP/HTTP: batches as protobuf export requests to an OpenTelemetry Collector, Jaeger, Tempo or
a vendor (`POST {endpoint}/v1/logs`, `/v1/traces`, `/v1/metrics`).

The messages become requests in `otlp_export` (pure); which of a batch's requests the receiver
has taken is the attempt's state, so a retry sends only the rest. The answer is read as the
OTLP/HTTP specification says: 429, 502, 503 and 504 are retried, after the receiver's
`Retry-After` when it gives one; 400 drops the batch (it can never be taken as it is); 401, 403,
404, 405 and 415 are a configuration to fix (the circuit opens); items a 200 reports as
rejected (partial success) are logged and counted, since the receiver took the request.
"""

import gzip
import http.client
import logging
import time
import urllib.parse
from typing import Literal

import attrs

from sidecar.backends.base import Attempt, Backend, BlockingCalls, PermanentError, RetryableError
from sidecar.backends.otlp_export import Exporter, Requests
from sidecar.units import Duration, StringPairs

log = logging.getLogger("sidecar.backends.otlp")

PATHS = {"logs": "/v1/logs", "traces": "/v1/traces", "metrics": "/v1/metrics"}
_RETRIED = {429, 502, 503, 504}
_TO_FIX = {401, 403, 404, 405, 415}


def _check_endpoint(_instance, _attribute, endpoint: str) -> None:
    parts = urllib.parse.urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise ValueError(f"endpoint {endpoint!r} must be http://HOST[:PORT][/PATH] or https://…")


@attrs.frozen
class OtlpSettings:
    # The base URL, as OTEL_EXPORTER_OTLP_ENDPOINT: the signal's path is added to it.
    endpoint: str = attrs.field(default="http://127.0.0.1:4318", validator=_check_endpoint)
    headers: StringPairs = ()  # e.g. {authorization: "Bearer ${OTLP_TOKEN}"}: from the environment
    compression: Literal["gzip", "none"] = "gzip"
    timeout: Duration = attrs.field(default=10.0, validator=attrs.validators.gt(0))
    # How long a span's start waits for its end before it is sent as a span without one.
    span_hold: Duration = attrs.field(default=300.0, validator=attrs.validators.gt(0))
    max_held_spans: int = attrs.field(default=10_000, validator=attrs.validators.ge(1))


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date; None if absent or unreadable."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        from email.utils import parsedate_to_datetime

        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


class OtlpBackend(Backend):
    type_name = "otlp"
    Settings = OtlpSettings

    def __init__(self, settings: OtlpSettings, *, label: str):
        super().__init__(settings, label=label)
        self.blocking = BlockingCalls(interrupt=self._interrupt)
        self.url = urllib.parse.urlsplit(settings.endpoint)
        self.exporter = Exporter(settings.span_hold, settings.max_held_spans)
        self._connection: http.client.HTTPConnection | None = None
        self.rejected_by_receiver = 0
        self.unended_spans = 0

    def statistics(self) -> dict:
        return {"held_span_starts": len(self.exporter.starts), "unended_spans": self.unended_spans, "rejected_by_receiver": self.rejected_by_receiver}

    async def probe(self) -> None:
        """An empty logs export: the receiver answers, and takes what we send."""
        from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

        await self.run_blocking(self._post, "logs", ExportLogsServiceRequest())

    async def write_batch(self, attempt: Attempt) -> None:
        if attempt.state is None:
            requests: Requests = self.exporter.requests(attempt.batch.messages(), time.monotonic())
            self.unended_spans += requests.unended
            attempt.state = {kind: request for kind in PATHS if (request := getattr(requests, kind)) is not None}
        pending: dict = attempt.state
        for kind in list(pending):
            await self.run_blocking(self._post, kind, pending[kind])
            del pending[kind]  # taken: a retry does not send it again

    def _post(self, kind: str, request) -> None:
        body = request.SerializeToString()
        headers = {"Content-Type": "application/x-protobuf", **dict(self.settings.headers)}
        if self.settings.compression == "gzip":
            body, headers["Content-Encoding"] = gzip.compress(body, 6), "gzip"
        where = f"{self.settings.endpoint.rstrip('/')}{PATHS[kind]}"
        try:
            connection = self._connect()
            connection.request("POST", self.url.path.rstrip("/") + PATHS[kind], body=body, headers=headers)
            response = connection.getresponse()
            answer = response.read()
        except (OSError, http.client.HTTPException) as exc:
            self._close()
            raise RetryableError(f"POST {where}: {exc or type(exc).__name__}") from exc
        if response.getheader("Connection", "").lower() == "close":
            self._close()
        status = response.status
        if status == 200:
            self._count_partial(kind, answer, where)
            return
        text = f"POST {where}: HTTP {status} {response.reason}: {_status_message(answer)}"
        if status in _RETRIED:
            raise RetryableError(text, retry_after=retry_after(response.getheader("Retry-After")))
        if status in _TO_FIX:
            raise RetryableError(text, trip_circuit=True)
        if 400 <= status < 500:
            raise PermanentError(text, reason=f"otlp_{status}")
        raise RetryableError(text)

    def _count_partial(self, kind: str, answer: bytes, where: str) -> None:
        from google.protobuf.message import DecodeError
        from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceResponse
        from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

        response = {"logs": ExportLogsServiceResponse, "traces": ExportTraceServiceResponse, "metrics": ExportMetricsServiceResponse}[kind]()
        try:
            response.ParseFromString(answer)
        except DecodeError:  # a receiver that answers 200 took the request, whatever it says
            log.warning("backend %s: %s answered 200 with a body that is not an export response", self.label, where)
            return
        partial = response.partial_success
        rejected = partial.rejected_log_records if kind == "logs" else partial.rejected_spans if kind == "traces" else partial.rejected_data_points
        if rejected:
            self.rejected_by_receiver += rejected
            log.warning("backend %s: %s rejected %d of the %s sent: %s", self.label, where, rejected, kind, partial.error_message or "(no message)")

    def _connect(self) -> http.client.HTTPConnection:
        if self._connection is None:
            kind = http.client.HTTPSConnection if self.url.scheme == "https" else http.client.HTTPConnection
            self._connection = kind(self.url.hostname, self.url.port, timeout=self.settings.timeout)
        return self._connection

    def _close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()

    def _interrupt(self) -> None:
        connection = self._connection
        if connection is not None and connection.sock is not None:
            connection.sock.close()  # the blocked read returns at once

    async def aclose(self) -> None:
        # Starts still waiting for their ends go out as spans without one, if the receiver is up.
        held = self.exporter.requests([], time.monotonic(), flush=True)
        if held.traces is not None:
            try:
                await self.run_blocking(self._post, "traces", held.traces)
                self.unended_spans += held.unended
            except (RetryableError, PermanentError) as exc:
                log.warning("backend %s: %d span start(s) without an end not sent at shutdown: %s", self.label, held.unended, exc)
        await self.run_blocking(self._close)


def _status_message(answer: bytes) -> str:
    """A google.rpc.Status body's message, else the start of the body as text."""
    from google.protobuf.message import DecodeError
    from google.rpc.status_pb2 import Status

    status = Status()
    try:
        status.ParseFromString(answer)
    except DecodeError:
        status.message = ""  # not a Status (a proxy's HTML page, say): shown as text
    return status.message or answer[:200].decode("utf-8", "replace").strip() or "(no body)"
