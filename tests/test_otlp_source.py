"""The OTLP/HTTP source (`type: otlp`): OpenTelemetry's own SDK and exporters send logs, spans
and metrics to a real sidecar; hand-written requests per the spec check JSON, gzip, partial
success and the error statuses; in-process runs on trio's MockClock check the timeouts, the
connection limit, the 503 when the pipeline has no room, and shutdown; the standard library's
HTTP client keeps a connection alive over a Unix socket."""

import gzip
import http.client
import os
import socket
import subprocess
import sys
import time
import json
import logging
import urllib.error
import urllib.request

import h11
import orjson
import pytest
import trio
import trio.testing
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest, ExportLogsServiceResponse
from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import Status, StatusCode

from sidecar.metrics import Counters
from sidecar.sources import Intake
from sidecar.sources.otlp import THREAD_THRESHOLD, OtlpSettings, OtlpSource
from tests.harness import SidecarProcess, read_jsonl

CONFIG = """
tcp: {{host: 127.0.0.1, port: 0}}
sources:
  otel: {{type: otlp, host: 127.0.0.1, port: 0, max_body_size: 4KiB{extra}}}
backends:
  files: {{type: filesystem, base_path: {base}, create_base_path: true, batch: {{timeout: 0.05}}}}
routing:
  all: [{{backend: files}}]
"""


@pytest.fixture
def sidecar(tmp_path):
    process = SidecarProcess(tmp_path, CONFIG.format(base=tmp_path / "out", extra="")).start()
    process.otlp = "http://" + process.stats()["sources"]["otel"]["address"]
    process.out = tmp_path / "out"
    yield process
    assert process.stop() == 0


def post(url: str, body: bytes, content_type: str = "application/x-protobuf", **headers):
    """(status, headers, body) of one POST, with urllib: a client nobody here wrote."""
    request = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type, **headers})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def delivered(sidecar, count: int) -> dict:
    return sidecar.wait_for(lambda s: s["backends"][0]["delivered"] >= count, what=f"{count} delivered")


RESOURCE = Resource.create({"service.name": "billing", "job.id": "job-7"})


# ------------------------------------------------------------------ the OpenTelemetry SDK


# The SDK's LoggingHandler is deprecated for the one in opentelemetry-instrumentation-logging; it
# still is the SDK's own bridge from `logging`, which is what is tested here.
@pytest.mark.filterwarnings("ignore:`LoggingHandler` in `opentelemetry-sdk` is deprecated:DeprecationWarning")
def test_sdk_logs_arrive_as_events_with_levels_attributes_ids_and_job(sidecar):
    logs = LoggerProvider(resource=RESOURCE)
    logs.add_log_record_processor(SimpleLogRecordProcessor(OTLPLogExporter(endpoint=f"{sidecar.otlp}/v1/logs")))
    traces = TracerProvider(resource=RESOURCE)
    logger = logging.getLogger("test_otlp_source.billing")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    handler = LoggingHandler(logger_provider=logs)
    logger.addHandler(handler)
    try:
        logger.debug("starting")
        with traces.get_tracer("billing").start_as_current_span("invoice") as span:
            logger.warning("invoice %s is late", "INV-1", extra={"invoice": "INV-1", "days": 3})
            span_context = span.get_span_context()
        logger.error("payment failed")
        logs.force_flush()
    finally:
        logger.removeHandler(handler)
        logs.shutdown()
    delivered(sidecar, 3)
    events = read_jsonl(sidecar.out / "billing.jsonl")
    assert [(e["type"], e["data"]["level"], e["data"]["message"]) for e in events] == [
        ("event", "debug", "starting"), ("event", "warning", "invoice INV-1 is late"), ("event", "error", "payment failed"),
    ]
    late = events[1]
    assert late["data"]["invoice"] == "INV-1" and late["data"]["days"] == 3
    assert late["trace_id"] == format(span_context.trace_id, "032x") and late["span_id"] == format(span_context.span_id, "016x")
    assert "trace_id" not in events[0]
    assert all(e["context"]["job_id"] == "job-7" and e["context"]["resource"]["service.name"] == "billing" for e in events)
    assert events[0]["context"]["scope"]["name"] == "test_otlp_source.billing"


def test_sdk_spans_arrive_as_start_and_end_pairs_with_parents_and_the_error_status(sidecar):
    traces = TracerProvider(resource=RESOURCE)
    traces.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"{sidecar.otlp}/v1/traces")))
    tracer = traces.get_tracer("billing")
    with tracer.start_as_current_span("run", attributes={"batch": 12}) as run:
        with tracer.start_as_current_span("load") as load:
            with tracer.start_as_current_span("parse"):
                pass
        with tracer.start_as_current_span("charge") as charge:
            charge.record_exception(ValueError("card declined"))
            charge.set_status(Status(StatusCode.ERROR, "card declined"))
    traces.shutdown()
    delivered(sidecar, 9)
    messages = read_jsonl(sidecar.out / "billing.jsonl")
    spans = {(m["data"]["name"], m["data"]["phase"]): m for m in messages if m["type"] == "span"}
    assert len(spans) == 8
    trace_id = format(run.get_span_context().trace_id, "032x")
    assert {m["trace_id"] for m in messages} == {trace_id}
    ids = {name: spans[(name, "start")]["span_id"] for name in ("run", "load", "parse", "charge")}
    assert ids["run"] == format(run.get_span_context().span_id, "016x") and ids["load"] == format(load.get_span_context().span_id, "016x")
    assert {name: spans[(name, "end")].get("parent_span_id") for name in ids} == {"run": None, "load": ids["run"], "parse": ids["load"], "charge": ids["run"]}
    for name in ids:
        assert spans[(name, "start")]["span_id"] == spans[(name, "end")]["span_id"]
        assert spans[(name, "end")]["data"]["duration_ms"] >= 0
    assert spans[("run", "end")]["data"]["status"] == "success" and spans[("run", "end")]["data"]["batch"] == 12
    charge_end = spans[("charge", "end")]["data"]
    assert (charge_end["status"], charge_end["status_message"]) == ("error", "card declined")
    (exception,) = [m for m in messages if m["type"] == "event"]
    assert exception["data"]["level"] == "error" and exception["data"]["message"] == "ValueError: card declined" and exception["span_id"] == ids["charge"]
    assert all(m["context"]["job_id"] == "job-7" for m in messages)


def test_sdk_metrics_arrive_with_values_tags_and_histogram_buckets(sidecar):
    reader = PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=f"{sidecar.otlp}/v1/metrics"), export_interval_millis=3_600_000)
    meters = MeterProvider(resource=RESOURCE, metric_readers=[reader])
    meter = meters.get_meter("billing")
    meter.create_counter("invoices", unit="1").add(5, {"region": "eu", "paid": True})
    meter.create_up_down_counter("queue_depth").add(-2)
    meter.create_gauge("temperature", unit="Cel").set(21.5)
    latency = meter.create_histogram("latency", unit="ms")
    for value in (3, 12, 40):
        latency.record(value)
    meters.force_flush()
    delivered(sidecar, 4)
    meters.shutdown()
    metrics = {m["data"]["name"]: m for m in read_jsonl(sidecar.out / "billing.jsonl")}
    invoices = metrics["invoices"]["data"]
    assert (invoices["value"], invoices["kind"], invoices["monotonic"], invoices["unit"], invoices["tags"]) == (5, "sum", True, "1", {"region": "eu", "paid": "true"})
    assert (metrics["queue_depth"]["data"]["value"], metrics["queue_depth"]["data"]["monotonic"]) == (-2, False)
    assert (metrics["temperature"]["data"]["value"], metrics["temperature"]["data"]["kind"]) == (21.5, "gauge")
    histogram = metrics["latency"]["data"]
    assert (histogram["value"], histogram["count"], histogram["sum"], histogram["min"], histogram["max"]) == (3, 3, 55, 3, 40)
    assert sum(histogram["bucket_counts"]) == 3 and len(histogram["bucket_counts"]) == len(histogram["bounds"]) + 1
    assert all(m["type"] == "metric" and m["context"]["job_id"] == "job-7" for m in metrics.values())


# ------------------------------------------------------------------ requests written per the spec

JSON_LOGS = {
    "resourceLogs": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "importer"}}]},
        "scopeLogs": [{
            "scope": {"name": "handwritten"},
            "logRecords": [
                {"timeUnixNano": "1764000000123000000", "severityNumber": 17, "body": {"stringValue": "row 7 is broken"},
                 "traceId": "5B8EFFF798038103D269B633813FC60C", "spanId": "EEE19B7EC3C1B174",
                 "attributes": [{"key": "row", "value": {"intValue": "7"}}, {"key": "job_id", "value": {"stringValue": "import-3"}}]},
                {"observedTimeUnixNano": "1764000000200000000", "body": {"kvlistValue": {"values": [{"key": "rows", "value": {"intValue": "40"}}]}}},
                {"body": {"stringValue": "bad ids"}, "traceId": "5B8EFFF798038103D269B633813FC6"},
            ],
        }],
    }],
}


def test_a_json_request_per_the_spec_arrives_and_an_invalid_record_gets_partial_success(sidecar):
    status, headers, body = post(f"{sidecar.otlp}/v1/logs", orjson.dumps(JSON_LOGS), "application/json")
    assert status == 200 and headers["Content-Type"] == "application/json"
    partial = json.loads(body)["partialSuccess"]
    assert partial["rejectedLogRecords"] == "1"  # an int64: a string in protobuf's JSON
    assert partial["errorMessage"] == "1 of 3 log records rejected: invalid_field (1, e.g. log record: trace_id must be 16 bytes, got 15)"
    stats = delivered(sidecar, 2)
    assert stats["decode_errors"] == {"invalid_field": 1}
    first, second = read_jsonl(sidecar.out / "importer.jsonl")
    assert first["timestamp"] == "2025-11-24T16:00:00.123Z" and first["data"]["level"] == "error" and first["data"]["row"] == 7
    assert (first["trace_id"], first["span_id"]) == ("5b8efff798038103d269b633813fc60c", "eee19b7ec3c1b174")
    assert first["context"]["job_id"] == "import-3"
    assert second["data"]["message"] == '{"rows":40}' and second["timestamp"] == "2025-11-24T16:00:00.200Z"


def test_a_gzip_protobuf_body_arrives_and_a_full_success_leaves_partial_success_unset(sidecar):
    request = ExportLogsServiceRequest()
    records = request.resource_logs.add().scope_logs.add().log_records
    for n in range(200):  # compresses well below max_body_size, and is well above it unpacked
        records.add(severity_number=9).body.string_value = f"record {n} of a gzip body"
    raw = request.SerializeToString()
    assert len(raw) > 4096
    status, headers, body = post(f"{sidecar.otlp}/v1/logs", gzip.compress(raw[:4000]), **{"Content-Encoding": "gzip"})
    assert status == 400  # cut mid-record: not a request
    small = ExportLogsServiceRequest()
    small.resource_logs.add().scope_logs.add().log_records.extend(request.resource_logs[0].scope_logs[0].log_records[:50])
    status, headers, body = post(f"{sidecar.otlp}/v1/logs", gzip.compress(small.SerializeToString()), **{"Content-Encoding": "gzip"})
    assert status == 200 and headers["Content-Type"] == "application/x-protobuf"
    assert not ExportLogsServiceResponse.FromString(body).HasField("partial_success")
    delivered(sidecar, 50)
    assert [m["data"]["message"] for m in read_jsonl(sidecar.out / "otel.jsonl")] == [f"record {n} of a gzip body" for n in range(50)]
    status, _headers, body = post(f"{sidecar.otlp}/v1/logs", gzip.compress(raw), **{"Content-Encoding": "gzip"})
    assert status == 413 and b"decompresses to more than 4096 bytes" in body


def test_error_statuses_with_status_bodies_and_the_requests_counted_by_path_and_code(sidecar):
    from google.rpc.status_pb2 import Status as RpcStatus

    status, _headers, body = post(f"{sidecar.otlp}/v1/logs", b"{}", "text/plain")
    assert status == 415 and "use application/x-protobuf or application/json" in RpcStatus.FromString(body).message
    status, _headers, body = post(f"{sidecar.otlp}/v1/logs", bytes(5000))
    assert status == 413 and "more than 4096" in RpcStatus.FromString(body).message
    status, _headers, body = post(f"{sidecar.otlp}/v1/logs", b"\xff\xff\xff")
    assert status == 400 and "not a protobuf ExportLogsServiceRequest" in RpcStatus.FromString(body).message
    status, _headers, body = post(f"{sidecar.otlp}/v1/traces", b"[1, 2]", "application/json")
    assert status == 400 and json.loads(body)["message"].startswith("the body must be a JSON object")
    status, _headers, _body = post(f"{sidecar.otlp}/v1/profiles", b"")
    assert status == 404
    status, _headers, _body = post(f"{sidecar.otlp}/v1/metrics", b"")  # an empty request: a success
    assert status == 200
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(f"{sidecar.otlp}/v1/metrics", timeout=10)
    assert caught.value.code == 405
    stats = sidecar.wait_for(lambda s: sum(sum(codes.values()) for codes in s["sources"]["otel"]["requests"].values()) == 7, what="7 requests counted")
    assert stats["sources"]["otel"]["requests"] == {"/v1/logs": {"400": 1, "413": 1, "415": 1}, "/v1/traces": {"400": 1}, "/v1/metrics": {"200": 1, "405": 1}, "other": {"404": 1}}
    assert stats["decode_errors"] == {"invalid_protobuf": 1, "invalid_json": 1, "too_large": 1}
    status, metrics = sidecar.http("/metrics")
    text = metrics.decode()
    assert 'sidecar_otlp_requests_total{code="415",input="otel",path="/v1/logs"} 1.0' in text
    assert 'sidecar_decode_errors_total{input="otel",reason="invalid_protobuf"} 1.0' in text
    assert 'sidecar_connections_total{input="otel"}' in text


def test_check_shows_the_otlp_source_and_its_address(tmp_path):
    from tests.test_cli import cli

    (tmp_path / "sidecar.yaml").write_text(CONFIG.format(base=tmp_path / "out", extra=", default_source: unnamed, job_id_attributes: [run.id]"))
    shown = cli("check", "--config", str(tmp_path / "sidecar.yaml"))
    assert shown.returncode == 0, shown.stderr
    assert "source otel (otlp): 127.0.0.1:0" in shown.stdout


BLOCK_CONFIG = """
tcp: {{host: 127.0.0.1, port: 0}}
sources:
  otel: {{type: otlp, host: 127.0.0.1, port: 0, busy_timeout: 0.2, retry_after: 0}}
storage: {{data_dir: {data}}}
backends:
  slow:
    type: filesystem
    base_path: {slow}
    batch: {{max_messages: 10, timeout: 0.05}}
    queue: {{mode: memory, max_messages: 50, when_full: block}}
    circuit_breaker: {{failure_threshold: 2, probe_interval: 0.1}}
routing:
  all: [{{backend: slow}}]
"""


def test_a_backend_under_block_turns_an_exporter_away_with_503_and_its_retries_lose_nothing(tmp_path):
    import http.client

    sidecar = SidecarProcess(tmp_path, BLOCK_CONFIG.format(data=tmp_path / "spool", slow=tmp_path / "slow")).start()
    try:
        host, port = sidecar.stats()["sources"]["otel"]["address"].rsplit(":", 1)
        exporter = http.client.HTTPConnection(host, int(port), timeout=10)

        def export(first: int) -> int:
            request = ExportLogsServiceRequest()
            records = request.resource_logs.add().scope_logs.add().log_records
            for n in range(first, first + 100):
                records.add().body.string_value = str(n)
            exporter.request("POST", "/v1/logs", request.SerializeToString(), {"Content-Type": "application/x-protobuf"})
            response = exporter.getresponse()
            response.read()
            if response.status == 503:
                assert response.headers["Retry-After"] == "0"
            return response.status

        statuses = [export(first) for first in range(0, 300, 100)]  # the slow backend's directory is missing: its queue fills
        assert statuses[0] == 200 and 503 in statuses, statuses
        refused = [first for first, status in zip(range(0, 300, 100), statuses) if status == 503]
        (tmp_path / "slow").mkdir()
        for first in refused:  # as an exporter does: the same request again
            while export(first) != 200:
                time.sleep(0.05)
        stats = sidecar.wait_for(lambda s: s["backends"][0]["delivered"] == 300, timeout=30, what="all 300 delivered")
        exporter.close()
        assert stats["received"] == 300 and stats["backends"][0]["dropped"] == {}
        assert stats["sources"]["otel"]["requests"]["/v1/logs"]["503"] >= len(refused)
        assert sorted(int(m["data"]["message"]) for m in read_jsonl(tmp_path / "slow" / "otel.jsonl")) == list(range(300))
    finally:
        assert sidecar.stop() == 0


# ------------------------------------------------------------------ in-process, on trio's MockClock


class Client:
    """An HTTP/1.1 client on h11 over a real loopback connection."""

    def __init__(self, stream: trio.SocketStream):
        self.stream = stream
        self.http = h11.Connection(h11.CLIENT)

    @classmethod
    async def connect(cls, source: OtlpSource) -> "Client":
        host, port = source.address.rsplit(":", 1)
        return cls(await trio.open_tcp_stream(host, int(port)))

    async def send_request(self, path: str, body: bytes, content_type: str = "application/x-protobuf") -> None:
        head = h11.Request(method="POST", target=path, headers=[("host", "sidecar"), ("content-type", content_type), ("content-length", str(len(body)))])
        await self.stream.send_all(self.http.send(head) + self.http.send(h11.Data(data=body)) + self.http.send(h11.EndOfMessage()))

    async def response(self) -> tuple[int, dict, bytes] | None:
        """The next response, or None when the server closed without one."""
        status, headers, body = None, {}, b""
        while True:
            event = self.http.next_event()
            if event is h11.NEED_DATA:
                self.http.receive_data(await self.stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status, headers = event.status_code, dict(event.headers)
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                if self.http.our_state is h11.DONE and self.http.their_state is h11.DONE:
                    self.http.start_next_cycle()
                return status, headers, body
            elif isinstance(event, h11.ConnectionClosed):
                return None

    async def closed(self) -> bool:
        return await self.stream.receive_some(1) == b""


def one_log(message: str) -> bytes:
    request = ExportLogsServiceRequest()
    request.resource_logs.add().scope_logs.add().log_records.add().body.string_value = message
    return request.SerializeToString()


async def running_source(nursery, settings: OtlpSettings, channel_size: int = 10):
    counters = Counters()
    source = OtlpSource("otel", settings, Intake("otel", counters, logging.getLogger("tests.otlp")))
    send, receive = trio.open_memory_channel(channel_size)
    await nursery.start(source.run, send)
    return source, counters, receive


async def test_a_slow_client_gets_408_after_request_timeout_and_an_idle_one_is_closed(autojump_clock):
    async with trio.open_nursery() as nursery:
        source, counters, _receive = await running_source(nursery, OtlpSettings(port=0, request_timeout=5, idle_timeout=30))
        slow = await Client.connect(source)
        await slow.stream.send_all(b"POST /v1/logs HTTP/1.1\r\nhost: x\r\ncontent-type: application/x-protobuf\r\ncontent-length: 100\r\n\r\nonly part")
        began = trio.current_time()
        status, _headers, body = await slow.response()
        assert status == 408 and b"request_timeout" in body and trio.current_time() - began == pytest.approx(5)
        assert await slow.closed()
        idle = await Client.connect(source)
        began = trio.current_time()
        assert await idle.closed() and trio.current_time() - began == pytest.approx(30)
        assert counters.get("connections_closed_total", input="otel", reason="timeout") == 1
        assert counters.get("connections_closed_total", input="otel", reason="idle") == 1
        nursery.cancel_scope.cancel()


async def test_a_full_pipeline_gets_503_with_retry_after_and_the_retry_counts_once(autojump_clock):
    async with trio.open_nursery() as nursery:
        source, counters, receive = await running_source(nursery, OtlpSettings(port=0, busy_timeout=2, retry_after=3), channel_size=1)
        client = await Client.connect(source)
        await client.send_request("/v1/logs", one_log("first"))  # fills the channel's one place: nothing reads it yet
        status, _headers, _body = await client.response()
        assert status == 200 and counters.get("messages_received_total", input="otel") == 1
        began = trio.current_time()
        await client.send_request("/v1/logs", one_log("second"))
        status, headers, body = await client.response()
        assert status == 503 and headers[b"retry-after"] == b"3" and trio.current_time() - began == pytest.approx(2)
        assert counters.get("messages_received_total", input="otel") == 1, "nothing of a refused request is counted"
        _at, first, _holds = await receive.receive()
        assert [m["data"]["message"] for m in first] == ["first"]
        await client.send_request("/v1/logs", one_log("second"))  # the exporter's retry, on the same connection
        status, _headers, _body = await client.response()
        assert status == 200 and counters.get("messages_received_total", input="otel") == 2
        _at, second, _holds = await receive.receive()
        assert [m["data"]["message"] for m in second] == ["second"]
        nursery.cancel_scope.cancel()


async def test_a_connection_over_the_limit_gets_503_and_is_counted(autojump_clock):
    async with trio.open_nursery() as nursery:
        source, counters, _receive = await running_source(nursery, OtlpSettings(port=0, max_connections=1))
        first = await Client.connect(source)
        await first.send_request("/v1/logs", one_log("in"))
        assert (await first.response())[0] == 200
        second = await Client.connect(source)
        await second.send_request("/v1/logs", one_log("refused"))
        status, headers, _body = await second.response()
        assert status == 503 and headers[b"retry-after"] == b"1" and headers[b"connection"] == b"close"
        assert counters.get("connections_refused_total", input="otel", reason="limit") == 1
        nursery.cancel_scope.cancel()


async def test_a_large_request_is_decoded_beside_the_event_loop_and_arrives_whole():
    request = ExportLogsServiceRequest()
    records = request.resource_logs.add().scope_logs.add().log_records
    for n in range(3000):
        records.add(severity_number=13).body.string_value = f"record {n} of a large request"
    body = request.SerializeToString()
    assert len(body) > THREAD_THRESHOLD
    async with trio.open_nursery() as nursery:
        source, counters, receive = await running_source(nursery, OtlpSettings(port=0))
        client = await Client.connect(source)
        await client.send_request("/v1/logs", body)
        assert (await client.response())[0] == 200
        _at, chunk, _holds = await receive.receive()
        assert [m["data"]["message"] for m in chunk] == [f"record {n} of a large request" for n in range(3000)]
        assert counters.get("messages_received_total", input="otel") == 3000
        nursery.cancel_scope.cancel()


async def test_a_client_that_expects_100_continue_gets_it_before_sending_the_body():
    body = one_log("after 100")
    async with trio.open_nursery() as nursery:
        source, _counters, receive = await running_source(nursery, OtlpSettings(port=0))
        client = await Client.connect(source)
        head = [("host", "x"), ("content-type", "application/x-protobuf"), ("content-length", str(len(body))), ("expect", "100-continue")]
        await client.stream.send_all(client.http.send(h11.Request(method="POST", target="/v1/logs", headers=head)))
        while (event := client.http.next_event()) is h11.NEED_DATA:
            client.http.receive_data(await client.stream.receive_some(1024))
        assert isinstance(event, h11.InformationalResponse) and event.status_code == 100
        await client.stream.send_all(client.http.send(h11.Data(data=body)) + client.http.send(h11.EndOfMessage()))
        assert (await client.response())[0] == 200
        assert [m["data"]["message"] for m in (await receive.receive())[1]] == ["after 100"]
        nursery.cancel_scope.cancel()


async def test_garbage_gets_400_and_the_connection_closes_counted(autojump_clock):
    async with trio.open_nursery() as nursery:
        source, counters, _receive = await running_source(nursery, OtlpSettings(port=0))
        client = await Client.connect(source)
        await client.stream.send_all(b"\x16\x03\x01 not http at all\r\n\r\n")
        status, _headers, _body = await client.response()
        assert status == 400 and await client.closed()
        assert counters.get("connections_closed_total", input="otel", reason="http_protocol_error") == 1
        nursery.cancel_scope.cancel()


async def test_shutdown_closes_idle_connections_after_the_grace_and_run_returns(autojump_clock):
    source = None
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            source, counters, receive = await running_source(nursery, OtlpSettings(port=0, idle_timeout=600))
            client = await Client.connect(source)
            await client.send_request("/v1/logs", one_log("before"))
            assert (await client.response())[0] == 200
            late = await Client.connect(source)
            await trio.testing.wait_all_tasks_blocked()  # both connections wait for their next request
            source.stop_accepting()
            began = trio.current_time()
            source.close_connections(2.0)
            await late.send_request("/v1/logs", one_log("during the grace"))
            status, headers, _body = await late.response()
            assert status == 200 and headers[b"connection"] == b"close" and await late.closed()
            assert await client.closed() and trio.current_time() - began == pytest.approx(2)
        # run() has returned: its clone of the channel is closed, so the correlator's input ends.
        assert [[m["data"]["message"] for m in (await receive.receive())[1]] for _ in range(2)] == [["before"], ["during the grace"]]
        with pytest.raises(trio.EndOfChannel):
            await receive.receive()
    assert counters.get("connections_closed_total", input="otel", reason="shutdown") == 2 and source.active_connections == 0


class UnixHTTPConnection(http.client.HTTPConnection):
    """The standard library's HTTP/1.1 client, connected to a Unix socket."""

    def __init__(self, path: str):
        super().__init__("sidecar", timeout=30)
        self.socket_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.socket_path)


def post_twice_over_unix(path: str) -> list[tuple[int, bytes]]:
    """Two requests on one keep-alive connection."""
    client = UnixHTTPConnection(path)
    answers = []
    try:
        for message in ("over a unix socket", "and again"):
            client.request("POST", "/v1/logs", one_log(message), {"content-type": "application/x-protobuf"})
            response = client.getresponse()
            answers.append((response.status, response.read()))
    finally:
        client.close()
    return answers


async def test_a_unix_socket_source_keeps_alive_and_removes_its_socket_at_the_end(tmp_path):
    path = tmp_path / "otlp.sock"
    async with trio.open_nursery() as nursery:
        source, counters, receive = await running_source(nursery, OtlpSettings(unix=str(path)))
        assert source.address == f"unix:{path}" and oct(path.stat().st_mode & 0o777) == "0o660"
        answers = await trio.to_thread.run_sync(post_twice_over_unix, str(path))
        assert [status for status, _body in answers] == [200, 200]
        assert ExportLogsServiceResponse.FromString(answers[0][1]).HasField("partial_success") is False
        messages = [[m["data"]["message"] for m in (await receive.receive())[1]] for _ in range(2)]
        assert messages == [["over a unix socket"], ["and again"]]
        assert counters.get("connections_total", input="otel") == 1 and counters.get("otlp_requests_total", input="otel", path="/v1/logs", code="200") == 2
        nursery.cancel_scope.cancel()
    assert not path.exists()


# ------------------------------------------------------------------ one trace across OTel and the Perl SDK

ORCHESTRATOR = '''
import os, subprocess, sys
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.propagate import inject
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

# Configured as the README says: OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_RESOURCE_ATTRIBUTES.
(worker,) = sys.argv[1:]
provider = TracerProvider(resource=Resource.create())
provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter()))
with provider.get_tracer("orchestrator").start_as_current_span("orchestrate") as span:
    carrier = {}
    inject(carrier)  # W3C trace context, OpenTelemetry's default propagator
    subprocess.run(["perl", worker], env={**os.environ, "TRACEPARENT": carrier["traceparent"]}, check=True, timeout=60)
    context = span.get_span_context()
    print(format(context.trace_id, "032x"), format(context.span_id, "016x"))
provider.shutdown()
'''

PERL_WORKER = '''
use strict;
use warnings;
use Monitoring::SDK;
my $mon = Monitoring::SDK->new(source => 'perl-worker');
my $span = $mon->start_span('load');
$mon->log_event('info', 'loading rows');
$mon->log_metric('rows_loaded', 40, 'count');
$mon->end_span($span, 'success');
$mon->close(5) or die "not everything was sent\\n";
'''


def test_a_trace_begun_in_an_otel_process_and_continued_in_perl_is_one_trace_and_one_job(tmp_path):
    from tests.harness import REPO
    from tests.test_cli import cli

    sidecar = SidecarProcess(tmp_path, CONFIG.format(base=tmp_path / "out", extra="")).start()
    try:
        otlp = "http://" + sidecar.stats()["sources"]["otel"]["address"]
        (tmp_path / "orchestrator.py").write_text(ORCHESTRATOR)
        (tmp_path / "worker.pl").write_text(PERL_WORKER)
        env = {
            **os.environ, "MONITORING_SIDECAR": f"127.0.0.1:{sidecar.port}", "PERL5LIB": str(REPO / "sdk_clients" / "perl" / "lib"),
            "OTEL_EXPORTER_OTLP_ENDPOINT": otlp, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_RESOURCE_ATTRIBUTES": "service.name=orchestrator,job.id=job-otel-1",
        }
        run = subprocess.run([sys.executable, str(tmp_path / "orchestrator.py"), str(tmp_path / "worker.pl")], env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert run.returncode == 0, run.stderr
        trace_id, root_span_id = run.stdout.split()
        stats = delivered(sidecar, 6)
        assert stats["decode_errors"] == {}
        shown = cli("trace", "job-otel-1", "--url", f"http://127.0.0.1:{sidecar.http_port}")
        assert shown.returncode == 0, shown.stderr
        lines = shown.stdout.splitlines()
        assert lines[0] == "job-otel-1:" and lines[-1].strip().startswith("Total: "), shown.stdout
        assert [line.split(":")[0].split()[-1] for line in lines[1:3]] == ["orchestrator", "perl-worker"], shown.stdout
        status, body = sidecar.http("/api/jobs/job-otel-1")
        view = json.loads(body)
        assert status == 200 and view["trace_ids"] == [trace_id] and [s["source"] for s in view["sources"]] == ["orchestrator", "perl-worker"]
    finally:
        assert sidecar.stop() == 0
    worker = read_jsonl(tmp_path / "out" / "perl-worker.jsonl")
    orchestrator = read_jsonl(tmp_path / "out" / "orchestrator.jsonl")
    assert {m["trace_id"] for m in worker + orchestrator} == {trace_id}
    (load_start,) = [m for m in worker if m["type"] == "span" and m["data"]["phase"] == "start"]
    assert load_start["parent_span_id"] == root_span_id
