"""The Python SDK against a real TCP capture server: messages, spans, propagation, bad days."""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import CaptureServer, free_port, wait_until

from monitoring_sdk import MonitoringClient, init

SRC = str(Path(__file__).resolve().parents[1] / "src")
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
TRACE_ID = re.compile(r"[0-9a-f]{32}")
SPAN_ID = re.compile(r"[0-9a-f]{16}")


def body(message: dict) -> dict:
    """The message without its timestamp, after checking the timestamp's form."""
    message = dict(message)
    assert TIMESTAMP.fullmatch(message.pop("timestamp"))
    return message


def run_python(script: str, timeout: float = 20.0) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=SRC)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, timeout=timeout,
                          capture_output=True, text=True)


@pytest.fixture
def client(server):
    mon = MonitoringClient("svc", host="127.0.0.1", port=server.port)
    yield mon
    mon.close(timeout=1.0)


# -- exact messages --------------------------------------------------------------------------------


def test_event_bytes_are_one_compact_json_line(server, client):
    client.log_event("info", "Received file", {"file": "a.csv"})
    server.wait_messages(1)
    raw = server.raw()
    pattern = (rb'\{"source":"svc","type":"event","timestamp":"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z",'
               rb'"context":\{"file":"a\.csv"\},"data":\{"level":"info","message":"Received file"\}\}\n')
    assert re.fullmatch(pattern, raw), raw


def test_each_call_produces_its_message(server, client):
    client.log_event("WARN", "disk almost full")
    client.log_metric("rows_loaded", 10000, "count", {"table": "x", "shard": 3})
    client.log_metric("latency", 1.5)
    client.log_progress("job-1", 50, "running")
    client.log_resource(12.5, 512, None, 0.25)
    client.log_resource()
    assert [body(m) for m in server.wait_messages(6)] == [
        {"source": "svc", "type": "event", "data": {"level": "warning", "message": "disk almost full"}},
        {"source": "svc", "type": "metric",
         "data": {"name": "rows_loaded", "value": 10000, "unit": "count", "tags": {"table": "x", "shard": "3"}}},
        {"source": "svc", "type": "metric", "data": {"name": "latency", "value": 1.5}},
        {"source": "svc", "type": "progress", "data": {"job_id": "job-1", "percent": 50, "status": "running"}},
        {"source": "svc", "type": "resource", "data": {"cpu_percent": 12.5, "memory_mb": 512, "network_io_mb": 0.25}},
        {"source": "svc", "type": "resource", "data": {}},
    ]


def test_control_characters_cannot_forge_records(server, client):
    client.log_event("info", 'line\nbreak "quoted" {"type":"metric"}\r\x00 é ✓')
    client.log_metric("n\n", 1, tags={"k\n": "v\n"})
    messages = server.wait_messages(2)
    assert len(server.lines()) == 2
    assert messages[0]["data"]["message"] == 'line\nbreak "quoted" {"type":"metric"}\r\x00 é ✓'
    assert "é ✓".encode() in server.raw()  # UTF-8, not \u escapes
    assert messages[1]["data"]["tags"] == {"k\n": "v\n"}


def test_init_is_the_constructor(server):
    mon = init("seed", "127.0.0.1", server.port)
    mon.log_event("info", "hello")
    assert body(server.wait_messages(1)[0])["source"] == "seed"
    mon.close(timeout=1)


def test_msgpack_encoding_sends_the_same_maps(server):
    msgpack = pytest.importorskip("msgpack")
    mon = MonitoringClient("svc", host="127.0.0.1", port=server.port, encoding="msgpack")
    mon.set_context("job_id", "j")
    mon.log_metric("rows", 3, "count")
    mon.log_event("info", "done")

    def unpacked():
        unpacker = msgpack.Unpacker(raw=False)
        unpacker.feed(server.raw())
        return list(unpacker)

    assert wait_until(lambda: len(unpacked()) == 2)
    assert 0x80 <= server.raw()[0] <= 0x8F  # a map header: the sidecar detects MessagePack
    messages = [body(m) for m in unpacked()]
    assert messages == [
        {"source": "svc", "type": "metric", "context": {"job_id": "j"},
         "data": {"name": "rows", "value": 3, "unit": "count"}},
        {"source": "svc", "type": "event", "context": {"job_id": "j"}, "data": {"level": "info", "message": "done"}},
    ]
    mon.close(timeout=1)


# -- context and spans -----------------------------------------------------------------------------


def test_context_merges_with_call_context_and_is_exported(server, client):
    client.set_context("job_id", "job-1")
    client.set_context("step", 2)
    assert json.loads(os.environ["MONITORING_CONTEXT"]) == {"job_id": "job-1", "step": 2}
    client.log_event("info", "a", {"file": "f", "step": 3})
    client.set_context("step", None)
    client.log_metric("m", 1)
    client.set_context("job_id", None)
    client.log_event("info", "b")
    assert "MONITORING_CONTEXT" not in os.environ
    messages = server.wait_messages(3)
    assert messages[0]["context"] == {"job_id": "job-1", "step": 3, "file": "f"}
    assert messages[1]["context"] == {"job_id": "job-1"}
    assert "context" not in messages[2]


def test_span_nesting_ids_and_traceparent(server, client):
    client.log_event("info", "before")
    with client.span("outer") as outer:
        assert os.environ["TRACEPARENT"].split("-")[2] == outer
        client.log_event("info", "in outer")
        inner = client.start_span("inner")
        assert os.environ["TRACEPARENT"].split("-")[2] == inner
        client.log_metric("m", 1)
        client.end_span(inner, "success")
        assert os.environ["TRACEPARENT"].split("-")[2] == outer
    assert "TRACEPARENT" not in os.environ
    client.log_event("info", "after")
    with client.span("second"):
        pass
    before, o_start, in_outer, i_start, metric, i_end, o_end, after, s_start, s_end = server.wait_messages(10)

    assert "trace_id" not in before and "span_id" not in before and "trace_id" not in after
    trace = o_start["trace_id"]
    assert TRACE_ID.fullmatch(trace) and SPAN_ID.fullmatch(outer) and SPAN_ID.fullmatch(inner)
    assert o_start["span_id"] == outer and "parent_span_id" not in o_start
    assert o_start["data"] == {"name": "outer", "phase": "start"}
    assert (in_outer["trace_id"], in_outer["span_id"]) == (trace, outer)
    assert (i_start["trace_id"], i_start["span_id"], i_start["parent_span_id"]) == (trace, inner, outer)
    assert (metric["trace_id"], metric["span_id"]) == (trace, inner)
    assert i_end["data"]["phase"] == "end" and i_end["data"]["status"] == "success"
    assert (i_end["span_id"], i_end["parent_span_id"]) == (inner, outer)
    assert o_end["span_id"] == outer and "parent_span_id" not in o_end
    assert o_end["data"]["name"] == "outer" and isinstance(o_end["data"]["duration_ms"], float)
    assert o_end["data"]["duration_ms"] >= i_end["data"]["duration_ms"] >= 0
    assert s_start["trace_id"] != trace  # a new root span starts a new trace
    assert s_end["data"]["status"] == "success"


def test_context_manager_and_decorator_mark_errors_and_reraise(server, client):
    @client.traced("load")
    def load(x):
        return x * 2

    @client.traced
    def broken():
        raise ValueError("bad row")

    assert load(21) == 42
    with pytest.raises(ValueError, match="bad row"):
        broken()
    with pytest.raises(KeyError):
        with client.span("block"):
            raise KeyError("k")
    messages = [m["data"] for m in server.wait_messages(6)]
    assert [(d["name"], d["phase"], d.get("status")) for d in messages] == [
        ("load", "start", None), ("load", "end", "success"),
        ("test_context_manager_and_decorator_mark_errors_and_reraise.<locals>.broken", "start", None),
        ("test_context_manager_and_decorator_mark_errors_and_reraise.<locals>.broken", "end", "error"),
        ("block", "start", None), ("block", "end", "error"),
    ]


def test_async_functions_can_be_traced(server, client):
    import asyncio

    @client.traced("fetch")
    async def fetch():
        client.log_event("info", "inside")
        return 7

    assert asyncio.run(fetch()) == 7
    start, event, end = server.wait_messages(3)
    assert event["span_id"] == start["span_id"] == end["span_id"]
    assert end["data"]["status"] == "success"


def test_active_spans_are_per_thread(server, client):
    with client.span("main") as main_span:
        worker = threading.Thread(target=client.log_event, args=("info", "from worker"))
        worker.start()
        worker.join()
        client.log_event("info", "from main")
    messages = {m["data"].get("message"): m for m in server.wait_messages(4)}
    assert "span_id" not in messages["from worker"]
    assert messages["from main"]["span_id"] == main_span


def test_traceparent_and_context_are_read_at_init(server):
    os.environ["TRACEPARENT"] = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    os.environ["MONITORING_CONTEXT"] = '{"job_id": "job-12345"}'
    mon = MonitoringClient("db-loader", host="127.0.0.1", port=server.port)
    mon.log_event("info", "joined")
    with mon.span("load") as span_id:
        pass
    assert os.environ["TRACEPARENT"] == "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    event, start, end = server.wait_messages(3)
    assert event["trace_id"] == "0af7651916cd43dd8448eb211c80319c"
    assert event["span_id"] == "b7ad6b7169203331"
    assert event["context"] == {"job_id": "job-12345"}
    assert (start["trace_id"], start["span_id"], start["parent_span_id"]) == (
        "0af7651916cd43dd8448eb211c80319c", span_id, "b7ad6b7169203331")
    mon.close(timeout=1)


def test_child_process_joins_trace_and_context(server):
    os.environ["MONITORING_SIDECAR"] = f"127.0.0.1:{server.port}"
    mon = MonitoringClient("queue-service")
    mon.set_context("job_id", "job-12345")
    with mon.span("process_file") as parent_span:
        result = run_python("""
            from monitoring_sdk import MonitoringClient
            mon = MonitoringClient("db-loader", port=1)  # MONITORING_SIDECAR wins
            mon.log_event("info", "child here")
            with mon.span("load"):
                mon.log_metric("rows", 5)
            assert mon.close(timeout=5)
        """)
        assert result.returncode == 0, result.stderr
    assert mon.flush(timeout=5)
    messages = server.wait_messages(6)
    parent_start = next(m for m in messages if m["source"] == "queue-service")
    child = [m for m in messages if m["source"] == "db-loader"]
    trace = parent_start["trace_id"]
    assert [m["type"] for m in child] == ["event", "span", "metric", "span"]
    assert all(m["trace_id"] == trace and m["context"] == {"job_id": "job-12345"} for m in child)
    assert child[0]["span_id"] == parent_span
    assert child[1]["parent_span_id"] == parent_span
    assert child[2]["span_id"] == child[1]["span_id"] != parent_span
    mon.close(timeout=1)


def test_environment_wins_over_arguments(server):
    os.environ["MONITORING_SIDECAR"] = f"127.0.0.1:{server.port}"
    os.environ["MONITORING_SOURCE"] = "from-env"
    mon = MonitoringClient("hard-coded", host="10.255.255.1", port=1)
    mon.log_event("info", "x")
    assert server.wait_messages(1)[0]["source"] == "from-env"
    mon.close(timeout=1)


# -- bad days --------------------------------------------------------------------------------------


def test_sidecar_down_calls_return_at_once_and_never_raise():
    errors = []
    mon = MonitoringClient("svc", host="127.0.0.1", port=free_port(), on_error=errors.append)
    slowest = 0.0
    for i in range(2000):
        started = time.perf_counter()
        mon.log_event("info", f"m{i}")
        mon.log_metric("n", i)
        slowest = max(slowest, time.perf_counter() - started)
    with mon.span("s"):
        mon.log_progress("j", 10)
    assert slowest < 0.05
    assert mon.statistics()["queued"] == 4003
    started = time.monotonic()
    assert mon.flush(timeout=0.2) is False
    assert mon.close(timeout=2) is False
    assert time.monotonic() - started < 1.0
    assert mon.statistics()["dropped"] == 4003
    assert errors and all(isinstance(e, ConnectionRefusedError) for e in errors)
    mon.log_event("info", "after close")  # still no exception


def test_bad_arguments_are_counted_and_warned_once(caplog, server, client):
    seen = []
    client._on_error = seen.append
    with caplog.at_level(logging.WARNING, logger="monitoring_sdk"):
        client.log_metric("x", float("nan"))
        client.log_metric("x", "not a number")
        client.end_span("0000000000000000")
        client.log_event("info", "still fine")
    assert client.statistics()["errors"] == 3 and len(seen) == 3
    assert len([r for r in caplog.records if "call failed" in r.getMessage()]) == 1
    assert body(server.wait_messages(1)[0])["data"]["message"] == "still fine"


def test_connect_failure_is_warned_once(caplog):
    mon = MonitoringClient("svc", host="127.0.0.1", port=free_port())
    with caplog.at_level(logging.WARNING, logger="monitoring_sdk"):
        mon.log_event("info", "x")
        for _ in range(3):
            mon.flush(timeout=0.05)
        mon.close(timeout=1)
    assert len([r for r in caplog.records if "connect failed" in r.getMessage()]) == 1


def test_sidecar_back_and_restarted_delivers_in_order_without_duplicates():
    port = free_port()
    mon = MonitoringClient("svc", host="127.0.0.1", port=port)
    for i in range(50):
        mon.log_event("info", str(i))
    assert wait_until(lambda: mon._retry_at > 0)  # the sender has failed to connect at least once
    server = CaptureServer(port=port)
    assert mon.flush(timeout=5)
    assert len(server.wait_messages(50)) == 50
    for i in range(50, 100):
        mon.log_event("info", str(i))
    server.wait_messages(100)
    server.stop()  # the sidecar restarts
    for i in range(100, 150):
        mon.log_event("info", str(i))
    assert mon.flush(timeout=0.3) is False
    restarted = CaptureServer(port=port)
    for i in range(150, 200):
        mon.log_event("info", str(i))
    assert mon.flush(timeout=5)
    received = [m["data"]["message"] for m in server.messages() + restarted.wait_messages(100)]
    assert received == [str(i) for i in range(200)]
    assert mon.statistics()["reconnects"] >= 1
    mon.close(timeout=1)
    restarted.stop()


def test_overflow_drops_oldest_and_reports_the_count_after_reconnect():
    port = free_port()
    mon = MonitoringClient("svc", host="127.0.0.1", port=port, max_messages=10)
    for i in range(25):
        mon.log_event("info", str(i))
    stats = mon.statistics()
    assert (stats["queued"], stats["dropped"]) == (10, 15)
    server = CaptureServer(port=port)
    assert mon.flush(timeout=5)
    first, *rest = server.wait_messages(11)
    assert body(first) == {"source": "svc", "type": "metric", "data": {
        "name": "sdk.dropped_messages", "value": 15, "unit": "count", "tags": {"reason": "buffer_full"}}}
    assert [m["data"]["message"] for m in rest] == [str(i) for i in range(15, 25)]
    mon.log_event("info", "later")
    assert mon.flush(timeout=5)
    assert [m["data"].get("message") for m in server.wait_messages(12)[11:]] == ["later"]  # reported once
    mon.close(timeout=1)
    server.stop()


def test_byte_bound_drops_oldest():
    mon = MonitoringClient("svc", host="127.0.0.1", port=free_port(), max_bytes=1000)
    for i in range(100):
        mon.log_event("info", f"{i:03d}" + "x" * 50)
    stats = mon.statistics()
    assert stats["queued"] + stats["dropped"] == 100 and stats["queued"] == 1000 // len(mon._queue[0])
    assert mon._queue[-1].count(b'"099') == 1
    mon.close(timeout=0.5)


def test_concurrent_calls_from_8_threads_arrive_intact(server, client):
    per_thread = 500

    def worker(n):
        for i in range(per_thread):
            client.log_event("info", f"{n}:{i}", {"thread": n, "pad": "x" * (i % 50)})

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert client.flush(timeout=10)
    messages = server.wait_messages(8 * per_thread)  # every line parses as JSON
    assert len(messages) == 8 * per_thread
    seen = {n: [] for n in range(8)}
    for m in messages:
        n, i = map(int, m["data"]["message"].split(":"))
        assert m["context"] == {"thread": n, "pad": "x" * (i % 50)}
        seen[n].append(i)
    assert all(seen[n] == list(range(per_thread)) for n in range(8))
    assert client.statistics()["sent"] == 8 * per_thread


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")  # the point here
def test_fork_child_gets_fresh_queue_thread_and_socket(server):
    down = MonitoringClient("pending", host="127.0.0.1", port=free_port())
    down.log_event("info", "queued in parent")
    mon = MonitoringClient("svc", host="127.0.0.1", port=server.port)
    mon.log_event("info", "parent before")
    assert mon.flush(timeout=5)
    pid = os.fork()
    if pid == 0:  # child: no pytest machinery from here on
        ok = down.statistics()["queued"] == 0 and mon.statistics()["sent"] == 0
        mon.log_event("info", "child")
        ok = mon.close(timeout=5) and ok
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    mon.log_event("info", "parent after")
    assert mon.flush(timeout=5)
    server.wait_messages(3)
    assert sorted(m["data"]["message"] for m in server.messages()) == ["child", "parent after", "parent before"]
    assert len(server.streams) == 2  # the child connected on its own
    assert down.statistics()["queued"] == 1
    mon.close(timeout=1)
    down.close(timeout=0.2)


def test_server_that_never_reads_does_not_block_the_caller():
    server = CaptureServer(read=False, rcvbuf=4096)
    mon = MonitoringClient("svc", host="127.0.0.1", port=server.port, max_bytes=256 * 1024)
    payload = "x" * 1024
    slowest = 0.0
    for count in range(20000):
        started = time.perf_counter()
        mon.log_event("info", payload)
        slowest = max(slowest, time.perf_counter() - started)
        if count % 100 == 0:
            # Let the sender move the queue into the socket, so the kernel's buffers (megabytes
            # on loopback) fill up and the sender is stuck with a full queue behind it.
            time.sleep(0.001)
    assert slowest < 0.1
    assert wait_until(lambda: mon.statistics()["dropped"] > 0)
    started = time.monotonic()
    assert mon.close(timeout=0.3) is False
    assert time.monotonic() - started < 1.0
    server.stop()


def test_atexit_flushes_and_exits_promptly_when_sidecar_is_down(server):
    script = """
        from monitoring_sdk import MonitoringClient
        mon = MonitoringClient("script", host="127.0.0.1", port={port})
        for i in range(100):
            mon.log_event("info", str(i))
    """
    assert run_python(script.format(port=server.port)).returncode == 0
    assert [m["data"]["message"] for m in server.wait_messages(100)] == [str(i) for i in range(100)]
    started = time.monotonic()
    assert run_python(script.format(port=free_port())).returncode == 0
    assert time.monotonic() - started < 2.0


def test_encoder_matches_json_dumps_with_the_protocol_settings():
    from monitoring_sdk import client as module

    value = {"s": 'é ✓ "q" \\ \n\t\x00\u2028', "n": [1, 2.5, -0.0, 10**20, True, None], "o": object}
    expected = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=str)
    assert module._encode(value) == expected
    with pytest.raises(ValueError):
        module._encode({"v": float("inf")})


def test_json_lines_are_byte_for_byte_the_encoded_message_dict(monkeypatch):
    """The JSON path assembles lines from cached pieces; the dict path (MessagePack's) builds the
    message dict. With the JSON packer on both, every call must give the same bytes and errors."""
    from collections import UserDict
    from decimal import Decimal

    from monitoring_sdk import client as module

    class Shouting:
        def __str__(self):
            return "LOUD\n"

    class Sub(dict):
        pass

    monkeypatch.setattr(module, "_time_ns", lambda: 1_700_000_000_987_654_321)
    monkeypatch.setattr(module.time, "perf_counter", lambda: 1.0)
    shared = ["a"]

    def script(mon):
        mon.log_event("info", "plain")
        mon.log_event("INFO", 'ctl \n\r\t\x00 "q" \\ é ✓ 😀 \u2028', {"file": "a.csv", "n": 3})
        mon.log_event("Warn", "lone \ud800 surrogate", {"job_id": "override"})
        mon.log_event("wArN", Shouting(), UserDict({"k": "v"}))
        mon.log_event(None, 1, Sub(x=1.5, y=None, z=True))
        mon.log_event(3, "key types", {1: "int", 2.5: "float", None: "none", "s": [1, {"d": 2}]})
        mon.log_event("debug", "empty mapping", UserDict())
        mon.set_context("step", 2)
        mon.set_context("files", shared)
        shared.append("b")  # changed after set_context: the message shows it, as it always did
        mon.log_metric("rows", 10000, "count", {"table": "x", "shard": 3})
        mon.log_metric("ratio", 0.1 + 0.2, Shouting(), {1: "int key", "1": "str key"})
        mon.log_metric("neg", -0.0, tags=UserDict({"k": Shouting()}))
        mon.log_metric("big", 10 ** 30)
        mon.log_metric("flag", True)
        mon.log_metric("dec", Decimal("2.5"))
        mon.log_metric("nan", float("nan"))  # an error, counted
        mon.log_metric("bad", "x")  # an error, counted
        mon.set_context("files", None)
        mon.log_progress("job-1", 50, "running")
        mon.log_progress("job-1", 99.5)
        mon.log_resource(12.5, 512, None, 0.25)
        mon.log_resource()
        with mon.span("outer"):
            mon.log_event("info", "in outer", {"step": 3})
            with mon.span(Shouting()):
                mon.log_metric("m", 1)
        mon.set_context("tuple", (1, ("x", 2.5)))
        mon.log_event("error", "tuple context")
        mon.source = "renamed"
        mon.log_event("critical", "after rename")
        mon.source = 42
        mon.log_event("info", "numeric source")
        mon.set_context("bad", float("inf"))  # every message fails to encode from here on
        mon.log_event("info", "lost")

    results = []
    for dict_path in (False, True):
        os.environ["TRACEPARENT"] = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        os.environ["MONITORING_CONTEXT"] = '{"job_id": "job-1", "nested": {"a": [1, null]}}'
        ids = itertools.count()
        monkeypatch.setattr(os, "urandom", lambda n: next(ids).to_bytes(n, "big"))
        shared[:] = ["a"]
        errors = []
        mon = MonitoringClient("svc", host="127.0.0.1", port=free_port(), on_error=errors.append)
        mon._binary = dict_path  # with the JSON packer: the dict encoded by json, as before
        lines = []
        mon._offer = lines.append
        script(mon)
        mon.close(timeout=0)
        results.append((lines, [type(e) for e in errors]))
    (fast, fast_errors), (reference, reference_errors) = results
    assert len(fast) == len(reference) == 26
    for got, expected in zip(fast, reference):
        assert got == expected
    assert fast_errors == reference_errors == [ValueError, ValueError, ValueError, ValueError]
    assert b'"files":["a","b"]' in fast[8]
    assert b'"source":42' in fast[-1]


def test_context_values_that_can_change_are_read_per_message(server, client):
    files = ["a.csv"]
    client.set_context("files", files)
    client.set_context("job_id", "job-1")
    client.log_event("info", "one")
    files.append("b.csv")
    client.log_event("info", "two", {"file": "c.csv"})
    one, two = server.wait_messages(2)
    assert one["context"] == {"files": ["a.csv"], "job_id": "job-1"}
    assert two["context"] == {"files": ["a.csv", "b.csv"], "job_id": "job-1", "file": "c.csv"}


# -- transports: a Unix socket, the ingest token -------------------------------------------------


def test_a_unix_socket_from_monitoring_sidecar_or_the_argument(tmp_path):
    path = str(tmp_path / "sidecar.sock")
    server = CaptureServer(unix=path)
    try:
        mon = MonitoringClient("svc", host="10.255.255.1", port=1, unix_socket=path)
        mon.log_event("info", "by argument")
        assert mon.flush(timeout=5)
        mon.close(timeout=1)
        os.environ["MONITORING_SIDECAR"] = f"unix:{path}"
        mon = MonitoringClient("svc", host="10.255.255.1", port=1)  # the variable wins over host and port
        assert mon.unix_socket == path
        mon.log_event("info", "by MONITORING_SIDECAR")
        mon.close(timeout=5)
        assert [m["data"]["message"] for m in server.wait_messages(2)] == ["by argument", "by MONITORING_SIDECAR"]
        assert len(server.connection_bytes()) == 2
    finally:
        server.stop()


def test_a_unix_socket_sidecar_down_then_back_blocks_no_call_and_loses_nothing(tmp_path):
    path = str(tmp_path / "sidecar.sock")
    errors = []
    mon = MonitoringClient("svc", unix_socket=path, on_error=errors.append)
    slowest = 0.0
    for i in range(500):
        started = time.perf_counter()
        mon.log_event("info", str(i))
        slowest = max(slowest, time.perf_counter() - started)
    assert slowest < 0.05
    assert wait_until(lambda: mon._retry_at > 0)  # the connection was refused: no socket file yet
    assert errors and isinstance(errors[0], FileNotFoundError)
    server = CaptureServer(unix=path)
    try:
        assert mon.flush(timeout=5)
        assert [m["data"]["message"] for m in server.wait_messages(500)] == [str(i) for i in range(500)]
    finally:
        mon.close(timeout=1)
        server.stop()


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
def test_the_token_goes_first_on_every_connection_and_the_variable_wins(tmp_path, encoding):
    if encoding == "msgpack":
        msgpack = pytest.importorskip("msgpack")
    path = str(tmp_path / "sidecar.sock")
    os.environ["MONITORING_SIDECAR_TOKEN"] = "from-the-environment"
    server = CaptureServer(unix=path)
    mon = MonitoringClient("svc", unix_socket=path, token="from-the-argument", encoding=encoding)
    try:
        mon.log_event("info", "one")
        assert mon.flush(timeout=5)
        assert wait_until(lambda: b"one" in server.raw())
        server.stop()  # the sidecar restarts: the new connection authenticates again
        mon.log_event("info", "two")
        assert mon.flush(timeout=0.3) is False
        server = CaptureServer(unix=path)
        mon.log_event("info", "three")
        assert mon.flush(timeout=5)
        mon.close(timeout=1)
        assert wait_until(lambda: b"three" in server.raw())
        [stream] = server.connection_bytes()
        if encoding == "json":
            values = [json.loads(line) for line in stream.splitlines()]
        else:
            unpacker = msgpack.Unpacker(raw=False)
            unpacker.feed(stream)
            values = list(unpacker)
        assert values[0] == {"auth": "from-the-environment"}
        assert [m["data"]["message"] for m in values[1:]] == ["two", "three"]
    finally:
        mon.close(timeout=1)
        server.stop()
    del os.environ["MONITORING_SIDECAR_TOKEN"]
    server = CaptureServer()
    mon = MonitoringClient("svc", host="127.0.0.1", port=server.port, token="from-the-argument")  # over TCP too
    mon.log_event("info", "four")
    mon.close(timeout=5)
    assert wait_until(lambda: len(server.lines()) == 2)
    assert server.lines()[0] == b'{"auth":"from-the-argument"}' and json.loads(server.lines()[1])["data"]["message"] == "four"
    server.stop()
