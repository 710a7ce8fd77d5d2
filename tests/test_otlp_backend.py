"""The otlp backend: messages as OTLP export requests (pure, property-tested), the delivery's
respect for a receiver's Retry-After (on trio's mock clock), and a real sidecar sending to a real
OTLP/HTTP receiver over a socket: protobuf bodies, gzip, 503 with Retry-After, 400, partial success."""

import gzip
import http.server
import threading
import time

import attrs
import hypothesis.strategies as st
import pytest
import trio
from hypothesis import given, settings
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest, ExportLogsServiceResponse
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Status

from sidecar.backends.base import MAX_RETRY_AFTER, Attempt, Backend, RetryableError
from sidecar.backends.otlp import retry_after
from sidecar.backends.otlp_export import Exporter, HeldStarts, nanos
from sidecar.config import BackendSpec, BatchSettings, CircuitBreakerSettings, DeliverySettings, RetrySettings
from sidecar.delivery import BackendSupervisor
from sidecar.message import validate_message
from tests.harness import SidecarProcess, read_jsonl, wait_until
from tests.test_delivery import file_spec, msgs

HEX = "0123456789abcdef"
trace_ids = st.text(HEX, min_size=32, max_size=32).filter(lambda t: t != "0" * 32)
span_ids = st.text(HEX, min_size=16, max_size=16).filter(lambda s: s != "0" * 16)
stamps = st.datetimes(min_value=__import__("datetime").datetime(2000, 1, 1), max_value=__import__("datetime").datetime(2100, 1, 1)).map(
    lambda d: d.strftime("%Y-%m-%dT%H:%M:%S.") + f"{d.microsecond // 1000:03d}Z"
)
plain = st.one_of(st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20), st.booleans())
extras = st.dictionaries(st.text("abcxyz_", min_size=1, max_size=6).filter(lambda k: k not in ("level", "message", "name", "value", "unit", "tags", "phase", "status", "duration_ms")), plain, max_size=3)


@st.composite
def messages(draw):
    kind = draw(st.sampled_from(["event", "metric", "progress", "resource", "span"]))
    message = {"type": kind, "source": draw(st.sampled_from(["a", "b"])), "timestamp": draw(stamps), "host": "h"}
    if draw(st.booleans()):
        message["context"] = {"job_id": draw(st.sampled_from(["j1", "j2"]))}
    if kind == "event":
        message["data"] = {"level": draw(st.sampled_from(["debug", "info", "warning", "error", "critical"])), "message": draw(st.text(max_size=30)), **draw(extras)}
    elif kind == "metric":
        message["data"] = {"name": draw(st.text("abc._", min_size=1, max_size=8)), "value": draw(st.one_of(st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False))), "tags": draw(st.dictionaries(st.text("xy", min_size=1, max_size=3), st.text(max_size=5), max_size=2))}
    elif kind == "progress":
        message["data"] = {"job_id": "j1", "percent": draw(st.integers(0, 100)), "status": "running"}
    elif kind == "resource":
        message["data"] = {"cpu_percent": draw(st.one_of(st.none(), st.floats(0, 800))), "memory_mb": draw(st.one_of(st.none(), st.integers(0, 10**6)))}
    else:
        message["trace_id"], message["span_id"] = draw(trace_ids), draw(span_ids)
        if draw(st.booleans()):
            message["data"] = {"name": "step", "phase": "start", **draw(extras)}
        else:
            message["data"] = {"name": "step", "phase": "end", "status": draw(st.sampled_from(["success", "error", "odd"])), "duration_ms": draw(st.floats(0, 10**6))}
    validate_message(message)
    return message


def exported(requests):
    """(log records, spans, data points) in the requests, after a serialisation round trip."""
    records, spans, points = [], [], []
    if requests.logs is not None:
        request = ExportLogsServiceRequest.FromString(requests.logs.SerializeToString())
        records = [(r.resource, record) for r in request.resource_logs for s in r.scope_logs for record in s.log_records]
    if requests.traces is not None:
        request = ExportTraceServiceRequest.FromString(requests.traces.SerializeToString())
        spans = [(r.resource, span) for r in request.resource_spans for s in r.scope_spans for span in s.spans]
    if requests.metrics is not None:
        request = ExportMetricsServiceRequest.FromString(requests.metrics.SerializeToString())
        points = [(r.resource, m, p) for r in request.resource_metrics for s in r.scope_metrics for m in s.metrics for p in m.gauge.data_points]
    return records, spans, points


def attributes_of(resource) -> dict:
    return {kv.key: kv.value.string_value for kv in resource.attributes}


@given(st.lists(messages(), max_size=40))
@settings(max_examples=200, deadline=None)
def test_every_message_becomes_one_item_under_its_own_resource(batch):
    exporter = Exporter(hold=60.0, limit=1000)
    records, spans, points = exported(exporter.requests(batch, now=0.0))
    events = [m for m in batch if m["type"] == "event"]
    ends = [m for m in batch if m["type"] == "span" and m["data"]["phase"] == "end"]
    figures = sum(1 if m["type"] in ("metric", "progress") else sum(v is not None for v in m["data"].values()) for m in batch if m["type"] in ("metric", "progress", "resource"))
    assert len(records) == len(events) and len(spans) == len(ends) and len(points) == figures
    # each under its own source's resource, with its context; within a resource in batch order
    made = [(attributes_of(r)["service.name"], attributes_of(r).get("job_id", ""), rec.body.string_value, rec.severity_text, rec.time_unix_nano) for r, rec in records]
    wanted = [(m["source"], (m.get("context") or {}).get("job_id", ""), m["data"]["message"], m["data"]["level"].upper(), nanos(m["timestamp"])) for m in events]
    assert sorted(made) == sorted(wanted)
    for resource, *_ in [*records, *spans, *points]:
        assert attributes_of(resource)["host.name"] == "h"
    # the starts wait for their ends; a flush sends each once, without an end time
    starts = {(m["trace_id"], m["span_id"]) for m in batch if m["type"] == "span" and m["data"]["phase"] == "start"} - {(m["trace_id"], m["span_id"]) for m in ends}
    _, unended, _ = exported(exporter.requests([], now=0.0, flush=True))
    assert sorted((s.trace_id.hex(), s.span_id.hex()) for _, s in unended) == sorted(starts)
    assert all(s.end_time_unix_nano == 0 for _, s in unended)


def test_a_span_is_made_at_its_end_from_its_start_with_status_parent_and_both_datas():
    trace, span, parent = "ab" * 16, "cd" * 8, "ef" * 8
    start = {"type": "span", "source": "a", "timestamp": "2026-12-03T10:00:00.000Z", "trace_id": trace, "span_id": span, "parent_span_id": parent, "data": {"name": "load", "phase": "start", "file": "x.csv"}}
    end = {"type": "span", "source": "a", "timestamp": "2026-12-03T10:00:02.500Z", "trace_id": trace, "span_id": span, "data": {"name": "load", "phase": "end", "status": "failed", "duration_ms": 2500.0, "rows": 3}}
    exporter = Exporter(hold=60.0, limit=10)
    assert exporter.requests([start], now=0.0).traces is None  # held for its end
    [(_resource, made)] = exported(exporter.requests([end], now=1.0))[1]
    assert (made.trace_id.hex(), made.span_id.hex(), made.parent_span_id.hex(), made.name) == (trace, span, parent, "load")
    assert made.end_time_unix_nano - made.start_time_unix_nano == 2_500_000_000
    assert made.status.code == Status.StatusCode.STATUS_CODE_ERROR and made.status.message == "failed"
    assert {kv.key for kv in made.attributes} == {"file", "rows"}
    # an end without a start seen: the start comes from the duration
    [(_resource, alone)] = exported(Exporter(60.0, 10).requests([end], now=0.0))[1]
    assert alone.start_time_unix_nano == made.start_time_unix_nano
    # an end before its start (out of order, or a resent start): the span goes out once
    late = Exporter(60.0, 10)
    assert len(exported(late.requests([end, start], now=0.0))[1]) == 1
    assert exported(late.requests([start], now=1.0, flush=True))[1] == []


@given(st.lists(st.tuples(st.sampled_from(["start", "end", "tick"]), st.integers(0, 7), st.floats(0, 5)), max_size=60), st.integers(1, 4))
def test_held_starts_each_come_back_once_ended_pushed_out_expired_or_flushed(steps, limit):
    held = HeldStarts(hold=3.0, limit=limit)
    now, returned, alive, replaced, started = 0.0, [], set(), 0, 0
    for number, (action, span, later) in enumerate(steps):
        now += later
        message = {"trace_id": "t", "span_id": str(span), "n": number, "at": now}
        if action == "start":
            started += 1
            replaced += message["span_id"] in alive  # the same span started again: the later start stands
            back = held.hold_start(message, now)
            alive.add(message["span_id"])
        elif action == "end":
            found = held.take(message)
            assert (found is not None) == (message["span_id"] in alive)
            back = [found] if found else []
        else:
            back = held.expired(now)
            assert all(now - m["at"] >= 3.0 for m in back)
        returned += back
        alive -= {m["span_id"] for m in back}
        assert len(held) == len(alive) <= limit
    returned += held.take_all()
    assert len(held) == 0
    assert len({m["n"] for m in returned}) == len(returned) == started - replaced


@pytest.mark.parametrize(("header", "seconds"), [("7", 7.0), (" 12 ", 12.0), (None, None), ("soon", None), ("", None)])
def test_retry_after_reads_delta_seconds(header, seconds):
    assert retry_after(header) == seconds


def test_retry_after_reads_an_http_date():
    from email.utils import formatdate

    assert 25 <= retry_after(formatdate(time.time() + 30, usegmt=True)) <= 31


class Throttled(Backend):
    """Answers the first `refusals` writes with the wait it asks for, then takes the batches."""

    type_name = "throttled"

    def __init__(self, asks: float, refusals: int):
        super().__init__(None, label="throttled")
        self.asks, self.refusals, self.tries = asks, refusals, []

    async def write_batch(self, attempt: Attempt) -> None:
        self.tries.append(trio.current_time())
        if len(self.tries) <= self.refusals:
            raise RetryableError("HTTP 503", retry_after=self.asks)


@pytest.mark.parametrize(("asks", "waits"), [(7.0, 7.0), (0.0, 0.0), (10_000.0, MAX_RETRY_AFTER)])
async def test_a_retry_waits_what_the_destination_asked_up_to_a_cap(tmp_path, autojump_clock, asks, waits):
    spec = file_spec(tmp_path, batch=BatchSettings(max_messages=10, timeout=0.01), retry=RetrySettings(initial_backoff=0.01, max_backoff=0.05),
                     circuit_breaker=CircuitBreakerSettings(failure_threshold=10))
    supervisor = BackendSupervisor(spec)
    supervisor.backend = Throttled(asks, refusals=2)
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        await supervisor.put(msgs(3))
        while supervisor.delivered < 3:
            await trio.sleep(1)
        supervisor.close()
    first, second, third = supervisor.backend.tries
    for gap in (second - first, third - second):
        assert waits <= gap <= waits + 0.05 + 1e-6, supervisor.backend.tries


class Receiver(http.server.ThreadingHTTPServer):
    """An OTLP/HTTP receiver: decodes each body (gzip, protobuf) and keeps it; `answers` is a
    list of (status, headers, body) to give before taking requests with 200."""

    def __init__(self, port: int = 0):
        super().__init__(("127.0.0.1", port), _Handler)
        self.got = {"/v1/logs": [], "/v1/traces": [], "/v1/metrics": []}
        self.tenants: list[str | None] = []
        self.times: list[tuple[str, float]] = []
        self.answers: list[tuple[int, dict, bytes]] = []
        self.partial = 0
        self.lock = threading.Lock()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    kinds = {"/v1/logs": ExportLogsServiceRequest, "/v1/traces": ExportTraceServiceRequest, "/v1/metrics": ExportMetricsServiceRequest}

    def do_POST(self):
        server: Receiver = self.server
        body = self.rfile.read(int(self.headers["Content-Length"]))
        assert self.headers["Content-Type"] == "application/x-protobuf"
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        with server.lock:
            server.times.append((self.path, time.monotonic()))
            server.tenants.append(self.headers.get("x-tenant"))
            answer = server.answers.pop(0) if server.answers else None
            if answer is None:
                request = self.kinds[self.path].FromString(body)
                server.got[self.path].append(request)
        status, headers, reply = answer or (200, {}, b"")
        if answer is None and self.path == "/v1/logs" and server.partial:
            reply = ExportLogsServiceResponse(partial_success={"rejected_log_records": server.partial, "error_message": "too old"}).SerializeToString()
        self.send_response(status)
        for key, value in {"Content-Type": "application/x-protobuf", "Content-Length": str(len(reply)), **headers}.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args):
        pass


@pytest.fixture
def receiver():
    server = Receiver()
    yield server
    server.shutdown()


CONFIG = """
tcp: {{host: 127.0.0.1, port: 0}}
backends:
  otel:
    type: otlp
    endpoint: {endpoint}
    headers: {{x-tenant: "${{TENANT}}"}}
    batch: {{timeout: 0.05}}
    retry: {{initial_backoff: 0.05, max_backoff: 0.2}}
routing:
  all: [{{backend: otel}}]
"""


def logs_of(receiver) -> list:
    return [record for request in receiver.got["/v1/logs"] for r in request.resource_logs for s in r.scope_logs for record in s.log_records]


def test_a_sidecar_sends_logs_spans_and_metrics_to_an_otlp_receiver_retrying_as_told(tmp_path, receiver):
    from google.rpc.status_pb2 import Status as RpcStatus

    receiver.answers = [(503, {"Retry-After": "1"}, b"busy"), (400, {}, RpcStatus(code=3, message="bad field").SerializeToString())]
    sidecar = SidecarProcess(tmp_path, CONFIG.format(endpoint=receiver.endpoint), env={"TENANT": "acme"}).start()
    try:
        trace, span = "ab" * 16, "cd" * 8
        sidecar.send([{"type": "event", "source": "svc", "data": {"level": "info", "message": "refused once, then dropped"}}])
        sidecar.wait_for(lambda s: s["backends"][0]["dropped"], what="the 400 answer's batch dropped")
        sidecar.send([
            {"type": "event", "source": "svc", "data": {"level": "error", "message": "disk full", "path": "/x"}, "context": {"job_id": "job-1"}, "trace_id": trace, "span_id": span},
            {"type": "span", "source": "svc", "trace_id": trace, "span_id": span, "data": {"name": "load", "phase": "start"}},
            {"type": "span", "source": "svc", "trace_id": trace, "span_id": span, "data": {"name": "load", "phase": "end", "status": "error", "duration_ms": 12.5}},
            {"type": "metric", "source": "svc", "data": {"name": "rows_loaded", "value": 300, "unit": "rows", "tags": {"table": "orders"}}},
        ])
        stats = sidecar.wait_for(lambda s: s["backends"][0]["delivered"] == 4 and s["backends"][0]["queued"] == 0, what="the rest delivered")
    finally:
        assert sidecar.stop() == 0
    assert stats["backends"][0]["dropped"] == {"otlp_400": 1}
    assert "HTTP 400 Bad Request: bad field" in sidecar.log()
    # the 503 asked for a second: the next request came no sooner
    (_first_path, refused_at), (_second_path, next_at) = receiver.times[:2]
    assert next_at - refused_at >= 1.0
    assert set(receiver.tenants) == {"acme"}  # the header, from the environment
    [record] = logs_of(receiver)
    assert (record.body.string_value, record.severity_text, record.trace_id.hex(), record.span_id.hex()) == ("disk full", "ERROR", trace, span)
    resource = receiver.got["/v1/logs"][0].resource_logs[0].resource
    assert attributes_of(resource) == {"job_id": "job-1", "service.name": "svc", "host.name": attributes_of(resource)["host.name"]}
    [request] = receiver.got["/v1/traces"]
    [made] = request.resource_spans[0].scope_spans[0].spans
    assert made.name == "load" and made.status.code == Status.StatusCode.STATUS_CODE_ERROR
    assert made.end_time_unix_nano - made.start_time_unix_nano > 0
    [metrics] = receiver.got["/v1/metrics"]
    [metric] = metrics.resource_metrics[0].scope_metrics[0].metrics
    assert (metric.name, metric.unit, metric.gauge.data_points[0].as_int) == ("rows_loaded", "rows", 300)


def test_items_a_receiver_rejects_in_a_partial_success_are_logged_and_counted(tmp_path, receiver):
    receiver.partial = 2
    sidecar = SidecarProcess(tmp_path, CONFIG.format(endpoint=receiver.endpoint), env={"TENANT": "acme"}).start()
    try:
        sidecar.send([{"type": "event", "source": "svc", "data": {"level": "info", "message": f"m{i}"}} for i in range(5)])
        stats = sidecar.wait_for(lambda s: s["backends"][0]["delivered"] == 5, what="delivered")
    finally:
        assert sidecar.stop() == 0
    assert stats["backends"][0]["details"]["rejected_by_receiver"] == 2
    assert "rejected 2 of the logs sent: too old" in sidecar.log()


def test_the_receiver_down_is_an_outage_retried_until_it_is_back(tmp_path):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sidecar = SidecarProcess(tmp_path, CONFIG.format(endpoint=f"http://127.0.0.1:{port}"), env={"TENANT": "acme"}).start()
    try:
        sidecar.send([{"type": "event", "source": "svc", "data": {"level": "info", "message": "waits"}}])
        sidecar.wait_for(lambda s: s["backends"][0]["retries"] >= 2, what="retries while nothing listens")
        server = Receiver(port)
        try:
            sidecar.wait_for(lambda s: s["backends"][0]["delivered"] == 1, timeout=60, what="delivered once the receiver is up")
        finally:
            server.shutdown()
    finally:
        assert sidecar.stop() == 0
    assert [r.body.string_value for r in logs_of(server)] == ["waits"]


def test_headers_come_from_the_environment_and_check_shows_the_template(tmp_path, receiver):
    from tests.test_cli import cli

    config = tmp_path / "sidecar.yaml"
    config.write_text(CONFIG.format(endpoint=receiver.endpoint))
    result = cli("check", "--config", str(config), env={"TENANT": "secret-tenant"})
    assert result.returncode == 0, result.stderr
    assert "${TENANT}" in result.stdout and "secret-tenant" not in result.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("backends:\n  otel:\n    type: otlp\n    endpoint: 127.0.0.1:4318\n    headers: [a]\n")
    result = cli("check", "--config", str(bad))
    assert result.returncode == 2
    assert f"{bad}:4: backends.otel.endpoint: endpoint '127.0.0.1:4318' must be http://HOST[:PORT][/PATH]" in result.stderr
    assert f"{bad}:5: backends.otel.headers must be a mapping, got a list" in result.stderr


RECEIVING = """
tcp: {{host: 127.0.0.1, port: 0}}
sources:
  otel: {{type: otlp, host: 127.0.0.1, port: 0}}
backends:
  files: {{type: filesystem, base_path: {base}, create_base_path: true, batch: {{timeout: 0.05}}}}
routing:
  all: [{{backend: files}}]
"""


def test_spans_logs_and_metrics_round_trip_through_a_second_sidecars_otlp_source(tmp_path):
    (tmp_path / "receiver").mkdir()
    (tmp_path / "sender").mkdir()
    receiver = SidecarProcess(tmp_path / "receiver", RECEIVING.format(base=tmp_path / "out")).start()
    try:
        endpoint = "http://" + receiver.stats()["sources"]["otel"]["address"]
        sender = SidecarProcess(tmp_path / "sender", CONFIG.format(endpoint=endpoint), env={"TENANT": "acme"}).start()
        trace, root, child = "12" * 16, "34" * 8, "56" * 8
        sent = [
            {"type": "event", "source": "loader", "data": {"level": "warning", "message": "slow disk", "path": "/data"}, "context": {"job_id": "job-7"}, "trace_id": trace, "span_id": root},
            {"type": "span", "source": "loader", "trace_id": trace, "span_id": root, "data": {"name": "process_job", "phase": "start"}, "context": {"job_id": "job-7"}},
            {"type": "span", "source": "loader", "trace_id": trace, "span_id": child, "parent_span_id": root, "data": {"name": "load_data", "phase": "start", "file": "a.csv"}, "context": {"job_id": "job-7"}},
            {"type": "span", "source": "loader", "trace_id": trace, "span_id": child, "parent_span_id": root, "data": {"name": "load_data", "phase": "end", "status": "error", "duration_ms": 40.0}, "context": {"job_id": "job-7"}},
            {"type": "span", "source": "loader", "trace_id": trace, "span_id": root, "data": {"name": "process_job", "phase": "end", "status": "success", "duration_ms": 55.5}, "context": {"job_id": "job-7"}},
            {"type": "metric", "source": "loader", "data": {"name": "rows_loaded", "value": 300, "unit": "rows", "tags": {"table": "orders"}}, "context": {"job_id": "job-7"}},
        ]
        try:
            sender.send(sent)
            sender.wait_for(lambda s: s["backends"][0]["delivered"] == len(sent), what="sent on")
        finally:
            assert sender.stop() == 0
        # 1 event, 2 spans as start and end each, 1 metric
        receiver.wait_for(lambda s: s["sources"]["otel"]["received"] == 6 and s["backends"][0]["queued"] == 0, what="received back")
    finally:
        assert receiver.stop() == 0
    back = read_jsonl(tmp_path / "out" / "loader.jsonl")
    assert {m["context"].get("job_id") for m in back} == {"job-7"}
    [event] = [m for m in back if m["type"] == "event"]
    assert (event["data"]["level"], event["data"]["message"], event["data"]["path"], event["trace_id"], event["span_id"]) == ("warning", "slow disk", "/data", trace, root)
    spans = {(m["span_id"], m["data"]["phase"]): m for m in back if m["type"] == "span"}
    assert set(spans) == {(root, "start"), (root, "end"), (child, "start"), (child, "end")}
    assert spans[child, "start"]["parent_span_id"] == root and spans[child, "start"]["data"]["name"] == "load_data"
    assert spans[child, "end"]["data"]["status"] == "error" and spans[child, "end"]["data"]["duration_ms"] == 40.0
    assert spans[root, "end"]["data"]["status"] == "success" and spans[root, "end"]["data"]["duration_ms"] == 55.5
    assert spans[child, "end"]["data"]["file"] == "a.csv"  # a span's attributes come back on its end
    [metric] = [m for m in back if m["type"] == "metric"]
    assert (metric["data"]["name"], metric["data"]["value"], metric["data"]["unit"], metric["data"]["tags"]) == ("rows_loaded", 300, "rows", {"table": "orders"})
