"""The CloudWatch Logs backend: the batch builder against the service limits (hypothesis), and a
real sidecar writing to moto through a proxy that records every PutLogEvents request."""

import datetime as dt
import os
import signal
import time
import uuid

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.backends.cloudwatch_requests import (
    EVENT_OVERHEAD,
    MAX_AGE_MS,
    MAX_EVENT_BYTES,
    MAX_FUTURE_MS,
    MAX_REQUEST_BYTES,
    MAX_REQUEST_EVENTS,
    MAX_REQUEST_SPAN_MS,
    plan_requests,
    truncate_message,
)
from sidecar.backends.cloudwatch import CloudWatchBackend, CloudWatchSettings
from sidecar.config import ConfigError, load_config
from tests.harness import SidecarProcess, encode
from tests.services.cloudwatch import ACCESS_KEY, SECRET_KEY, cloudwatch_server, logs_proxy  # noqa: F401 (fixtures)

TRUNCATED = "...[truncated by monitoring-sidecar: "
NOW = 1_760_000_000_000  # a fixed "now" for the pure tests, in ms
HOUR = 3_600_000


def assert_obeys_limits(request_events: list[dict], max_event_size: int = MAX_EVENT_BYTES) -> None:
    """One PutLogEvents request's events (as sent) against every limit the service enforces."""
    assert 1 <= len(request_events) <= MAX_REQUEST_EVENTS
    sizes = [len(e["message"].encode("utf-8")) for e in request_events]
    assert sum(sizes) + EVENT_OVERHEAD * len(sizes) <= MAX_REQUEST_BYTES
    assert all(size + EVENT_OVERHEAD <= max_event_size for size in sizes)
    stamps = [e["timestamp"] for e in request_events]
    assert stamps == sorted(stamps), "events in a request must be in timestamp order"
    assert stamps[-1] - stamps[0] < MAX_REQUEST_SPAN_MS


# ---------------------------------------------------------------- the batch builder

_TEXT = st.text(alphabet=st.sampled_from("aZ9 {}\"\\\n\té€😀\u0800\U0010fffd"), min_size=0, max_size=8)
_ENTRY = st.tuples(
    st.sampled_from([("g1", "s1"), ("g1", "s2"), ("g2", "s1")]),
    st.integers(NOW - MAX_AGE_MS - 2 * HOUR, NOW + MAX_FUTURE_MS + HOUR),
    _TEXT,
    st.integers(1, 40_000),  # the text repeated this often: events from bytes to ~1 MiB
)


@given(st.lists(_ENTRY, max_size=40), st.sampled_from([None, 1, 30]))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
def test_any_batch_is_cut_into_requests_that_obey_every_limit(raw, retention_days):
    entries = [(i, g, s, ts, text * repeat) for i, ((g, s), ts, text, repeat) in enumerate(raw)]
    plan = plan_requests(entries, NOW, retention_days=retention_days)
    oldest = NOW - MAX_AGE_MS if retention_days is None else max(NOW - MAX_AGE_MS, NOW - retention_days * 24 * HOUR)
    placed = [e.index for r in plan.requests for e in r.events]
    # every event is sent exactly once or refused with a reason, never both, never lost
    assert sorted(placed + list(plan.rejected)) == list(range(len(entries)))
    assert set(plan.rejected.values()) <= {"too_old", "too_far_in_future"}
    for index, reason in plan.rejected.items():
        ts = entries[index][3]
        assert (ts < oldest + 60_000) if reason == "too_old" else (ts > NOW + MAX_FUTURE_MS - 60_000)
    for request in plan.requests:
        sent = [{"timestamp": e.timestamp, "message": e.message} for e in request.events]
        assert_obeys_limits(sent)
        assert all(oldest <= e.timestamp <= NOW + MAX_FUTURE_MS for e in request.events)
        assert all(entries[e.index][1:3] == (request.group, request.stream) for e in request.events)
        for event in request.events:
            original = entries[event.index][4]
            if event.index in plan.truncated:
                assert event.message.endswith(" bytes]") and len(original.encode("utf-8", "surrogatepass")) + EVENT_OVERHEAD > MAX_EVENT_BYTES
                assert original.startswith(event.message[: event.message.rindex("...[truncated")])
            else:
                assert event.message == original
    # within a stream, requests follow each other in time: the stream reads back in order
    for key in {(r.group, r.stream) for r in plan.requests}:
        stamps = [e.timestamp for r in plan.requests if (r.group, r.stream) == key for e in r.events]
        assert stamps == sorted(stamps)


def test_ten_thousand_events_per_request_at_most_and_ties_keep_batch_order():
    entries = [(i, "g", "s", NOW - (i % 7), "x") for i in range(25_001)]
    plan = plan_requests(entries, NOW)
    assert [len(r.events) for r in plan.requests] == [10_000, 10_000, 5_001]
    flat = [e for r in plan.requests for e in r.events]
    assert all((a.timestamp, a.index) < (b.timestamp, b.index) for a, b in zip(flat, flat[1:]))


def test_a_request_never_spans_24_hours_and_out_of_window_events_are_refused():
    entries = [
        (0, "g", "s", NOW - 23 * HOUR, "a"),
        (1, "g", "s", NOW - 14 * 24 * HOUR - 1, "too old"),
        (2, "g", "s", NOW + 3 * HOUR, "too new"),
        (3, "g", "s", NOW + HOUR, "b"),
        (4, "g", "s", NOW - 25 * HOUR, "c"),
    ]
    plan = plan_requests(entries, NOW)
    assert plan.rejected == {1: "too_old", 2: "too_far_in_future"}
    assert [[e.index for e in r.events] for r in plan.requests] == [[4, 0], [3]]


def test_multibyte_messages_are_counted_in_utf8_bytes():
    euro = "€" * 1000  # 3,000 bytes, 1,000 characters
    entries = [(i, "g", "s", NOW, euro) for i in range(400)]
    plan = plan_requests(entries, NOW)
    per_request = (MAX_REQUEST_BYTES) // (3000 + EVENT_OVERHEAD)
    assert [len(r.events) for r in plan.requests] == [per_request, 400 - per_request]


def test_truncation_cuts_between_characters_and_marks_the_event():
    message = "😀" * 100_000  # 400,000 bytes
    cut = truncate_message(message, MAX_EVENT_BYTES)
    assert len(cut.encode()) + EVENT_OVERHEAD <= MAX_EVENT_BYTES
    assert cut.endswith("...[truncated by monitoring-sidecar: 400000 bytes]")
    assert set(cut[: cut.index("...")]) == {"😀"}


@pytest.mark.parametrize("source", ["../../etc", "a:b*c", "", "aws/x", "x" * 600, "\x00\n\u202e", "ünï cödé"])
def test_source_names_cannot_make_invalid_or_escaping_group_or_stream_names(source):
    backend = CloudWatchBackend(CloudWatchSettings(log_group="/app/{source}", log_stream="{host}/{source}"), label="t")
    group, stream = backend.names(source)
    assert group.startswith("/app/") and group.count("/") == 2 and len(group) <= 512
    assert set(group) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-/#")
    assert stream.count("/") == 1 and ":" not in stream and "*" not in stream and stream.isprintable() and len(stream) <= 512


def test_invalid_templates_are_config_errors_with_the_line(write):
    config = write(
        "sidecar.yaml",
        """
        backends:
          cw:
            type: cloudwatch
            log_group: "aws/{source}"
            log_stream: "{source}:{nope}"
            retention_days: 8
        """,
    )
    with pytest.raises(ConfigError) as caught:
        load_config(config, None)
    text = str(caught.value)
    assert f"{config}:4: backends.cw.log_group: log_group 'aws/{{source}}': log group names starting with aws/ are reserved" in text
    assert f"{config}:5:" in text and "unknown placeholder {nope}" in text
    assert f"{config}:6:" in text


# ---------------------------------------------------------------- a real sidecar, moto behind a recording proxy

CLOUDWATCH_CONFIG = """
tcp: {{host: 127.0.0.1, port: 0}}
shutdown: {{connection_grace: 0.2, drain_timeout: 20}}
backends:
  cloudwatch:
    type: cloudwatch
    region: us-east-1
    endpoint_url: {endpoint}
    log_group: "{group}/{{source}}"
    log_stream: "{{host}}-{{type}}"
    batch: {{max_messages: {max_messages}, timeout: {batch_timeout}}}
    queue: {{max_messages: 100000, when_full: block}}
    retry: {{initial_backoff: 0.05, max_backoff: 0.3}}
    circuit_breaker: {{failure_threshold: 50, reset_timeout: 0.5, max_reset_timeout: 1}}
routing:
  all:
    - backend: cloudwatch
"""


def aws_environ() -> dict:
    # Fixed credentials, and nothing from this machine's own AWS configuration.
    return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture
def cloudwatch_sidecar(tmp_path, logs_proxy):
    started = []

    def start(max_messages=12_000, batch_timeout=0.2):
        group = f"/e2e/{uuid.uuid4().hex[:8]}"
        text = CLOUDWATCH_CONFIG.format(endpoint=logs_proxy.endpoint_url, group=group, max_messages=max_messages, batch_timeout=batch_timeout)
        sidecar = SidecarProcess(tmp_path, text, env=aws_environ()).start()
        started.append(sidecar)
        return sidecar, group

    yield start
    for sidecar in started:
        if sidecar.process.poll() is None:
            sidecar.stop(signal.SIGKILL)


def iso(ms: int) -> str:
    moment = dt.datetime.fromtimestamp(ms / 1000, dt.timezone.utc)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{moment.microsecond // 1000:03d}Z"


def test_25000_events_from_three_sources_arrive_in_order_in_requests_within_the_limits(cloudwatch_sidecar, cloudwatch_server, logs_proxy):
    sidecar, group = cloudwatch_sidecar(batch_timeout=1.0)
    now = int(time.time() * 1000)
    counts = {"small-svc": 12_000, "wide-svc": 8_000, "ütf8-svc": 5_000}
    messages = []
    for source, count in counts.items():
        for seq in range(count):
            # timestamps out of order within each source (newest first in blocks of 10)
            stamp = now - 600_000 + (seq // 10) * 10 + (9 - seq % 10)
            text = {"small-svc": "ok", "wide-svc": "w" * 300, "ütf8-svc": "日本語€😀" * 20}[source]
            messages.append({"source": source, "type": "event", "timestamp": iso(stamp), "data": {"level": "info", "message": text}, "context": {"seq": seq}})
    huge = {"source": "ütf8-svc", "type": "event", "timestamp": iso(now), "data": {"level": "info", "message": "é" * 200_000}, "context": {"seq": "huge"}}
    too_old = {"source": "small-svc", "type": "event", "timestamp": iso(now - 15 * 24 * HOUR), "data": {"level": "info", "message": "old"}, "context": {"seq": "old"}}
    with sidecar.connect() as conn:
        conn.sendall(encode(messages + [huge, too_old]))
    total = sum(counts.values()) + 2
    stats = sidecar.wait_for(lambda s: s["received"] == total and s["backends"] and s["backends"][0]["queued"] == 0, timeout=60, what="all events handled")
    backend = stats["backends"][0]
    assert backend["delivered"] == total - 1 and backend["dropped"] == {"too_old": 1}
    assert "truncated 1 event(s) from ütf8-svc" in sidecar.log()
    assert backend["details"] == {"truncated_events": 1}

    recorded = logs_proxy.recorded()
    for body in recorded:
        assert_obeys_limits(body["logEvents"])
    payloads = {}
    for body in recorded:
        payload = sum(len(e["message"].encode()) + EVENT_OVERHEAD for e in body["logEvents"])
        payloads.setdefault(body["logGroupName"], []).append(payload)
    # requests were packed up to the byte limit (enriched messages are too large for 10,000 of
    # them to fit in 1 MiB: the count limit is covered by the builder's own tests)
    assert max(payloads[f"{group}/small-svc"]) > 0.95 * MAX_REQUEST_BYTES
    assert max(payloads[f"{group}/wide-svc"]) > 0.95 * MAX_REQUEST_BYTES

    host_stream = f"{_host()}-event"
    for source, count in counts.items():
        source_group = f"{group}/{source.replace('ü', '#C3#BC')}"  # group names escape with #
        assert cloudwatch_server.streams(source_group) == [host_stream]
        events = cloudwatch_server.events(source_group, host_stream)
        seqs = [orjson.loads(e["message"])["context"]["seq"] for e in events if TRUNCATED not in e["message"]]
        assert sorted(seqs) == list(range(count)), f"{source}: lost or duplicated events"
        stamps = [e["timestamp"] for e in events]
        assert stamps == sorted(stamps)
    truncated = [e["message"] for e in cloudwatch_server.events(f"{group}/#C3#BCtf8-svc", host_stream) if TRUNCATED in e["message"]]
    assert len(truncated) == 1 and truncated[0].endswith(" bytes]")
    assert len(truncated[0].encode()) + EVENT_OVERHEAD <= MAX_EVENT_BYTES
    assert sidecar.stop() == 0


def _host() -> str:
    return os.uname().nodename


def test_throttling_is_retried_access_denied_opens_the_circuit_and_a_deleted_stream_comes_back(cloudwatch_sidecar, cloudwatch_server, logs_proxy):
    sidecar, group = cloudwatch_sidecar(max_messages=100)
    stream = f"{_host()}-event"

    def send(first, count):
        sidecar.send([{"source": "svc", "type": "event", "data": {"level": "info", "message": "m"}, "context": {"seq": s}} for s in range(first, first + count)])

    logs_proxy.fail_next(3, 400, "ThrottlingException", "Rate exceeded")
    send(0, 50)
    stats = sidecar.wait_for(lambda s: s["backends"] and s["backends"][0]["delivered"] == 50, timeout=20, what="delivery after throttling")
    assert stats["backends"][0]["retries"] >= 3 and stats["backends"][0]["circuit_opened"] == 0

    logs_proxy.fail_next(1, 400, "AccessDeniedException", "User is not authorized to perform: logs:PutLogEvents")
    send(50, 50)
    stats = sidecar.wait_for(lambda s: s["backends"][0]["delivered"] == 100, timeout=20, what="delivery after access was granted again")
    backend = stats["backends"][0]
    assert backend["circuit_opened"] == 1, "one access-denied answer must open the circuit at once"
    assert "AccessDeniedException" in backend["last_error"]
    assert "circuit open" in sidecar.log()

    cloudwatch_server.client().delete_log_stream(logGroupName=f"{group}/svc", logStreamName=stream)
    send(100, 20)
    sidecar.wait_for(lambda s: s["backends"][0]["delivered"] == 120, timeout=20, what="delivery to a recreated stream")
    seqs = [orjson.loads(e["message"])["context"]["seq"] for e in cloudwatch_server.events(f"{group}/svc", stream)]
    assert seqs == list(range(100, 120)), "the deleted stream was recreated with the new events, once each"
    assert sidecar.backend("cloudwatch")["dropped"] == {}
    assert sidecar.stop() == 0
    assert "sidecar-test-secret" not in sidecar.log()
