"""The unified view: the live index, the HTTP API, /metrics, the tap, and `trace`."""

import json
import os
import socket
import subprocess
import sys
import threading
import urllib.parse

from prometheus_client.parser import text_string_to_metric_families

from hypothesis import given, strategies as st

from sidecar.ingest import PythonChunk, TraceJobs
from sidecar.jobs import LiveIndex, cells_of, render_tree
from sidecar.message import validate_message
from tests.harness import FILES_CONFIG, REPO, SidecarProcess, wait_until

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def timeline_message(job, trace, source, seconds, kind, data, span=None, parent=None, hour="2025-10-20T10"):
    """A valid message of `job` and `trace`, `seconds` after the start of `hour`."""
    message = {
        "source": source,
        "type": kind,
        "timestamp": f"{hour}:{int(seconds // 60):02d}:{seconds % 60:06.3f}Z",
        "trace_id": trace,
        "context": {"job_id": job},
        "data": data,
    }
    if span:
        message["span_id"] = span
    if parent:
        message["parent_span_id"] = parent
    validate_message(message)
    return message


def seed_job(job="job-12345", trace=TRACE):
    """The seed's unified view as messages: file-receiver, queue-service, db-loader."""

    def m(source, seconds, kind, data, span=None, parent=None):
        return timeline_message(job, trace, source, seconds, kind, data, span, parent)

    return [
        m("file-receiver", 0.0, "event", {"level": "info", "message": "File received"}),
        m("file-receiver", 1.0, "event", {"level": "info", "message": "validated"}),
        m("file-receiver", 2.3, "event", {"level": "info", "message": "queued"}),
        m("queue-service", 2.4, "span", {"name": "process_job", "phase": "start"}, span="a" * 16),
        m("queue-service", 2.4, "progress", {"job_id": job, "percent": 0, "status": "started"}, span="a" * 16),
        m("queue-service", 2.5, "event", {"level": "info", "message": "Job dequeued, processing started"}, span="a" * 16),
        m("db-loader", 2.5, "span", {"name": "load_data", "phase": "start"}, span="b" * 16, parent="a" * 16),
        m("db-loader", 2.5, "event", {"level": "info", "message": "Data loaded"}, span="b" * 16),
        m("db-loader", 47.7, "metric", {"name": "rows_inserted", "value": 10000}, span="b" * 16),
        m("db-loader", 47.7, "span", {"name": "load_data", "phase": "end", "status": "success", "duration_ms": 45200.0}, span="b" * 16, parent="a" * 16),
        m("queue-service", 47.6, "progress", {"job_id": job, "percent": 100, "status": "completed"}, span="a" * 16),
        m("queue-service", 47.6, "span", {"name": "process_job", "phase": "end", "status": "success", "duration_ms": 45200.0}, span="a" * 16),
    ]


EXPECTED_TREE = """job-12345:
  ├─ file-receiver: File received, validated, queued (2.3s)
  ├─ queue-service: Job dequeued, processing started (45.2s)
  └─ db-loader: Data loaded, rows_inserted 10,000 (45.2s)

  Total: 47.7s"""


def test_the_live_index_gives_the_seeds_tree():
    index = LiveIndex(100, 100, 3600, clock=lambda: 0.0)
    index.add(seed_job())
    view = index.job("job-12345")
    assert view["status"] == "completed"
    assert [s["source"] for s in view["sources"]] == ["file-receiver", "queue-service", "db-loader"]
    assert render_tree(view) == EXPECTED_TREE
    (root,) = view["spans"]
    assert root["name"] == "process_job" and [c["name"] for c in root["children"]] == ["load_data"]
    assert view["trace_ids"] == [TRACE]
    assert index.trace(TRACE)["job_ids"] == ["job-12345"]


def queue_service_jobs(count=2, hour="2025-10-20T11"):
    """The seed's queue-service loop with a queue that carries only {id, file}, as the SDKs send
    it (docs/protocol.md, context and spans): each job's process_job start names no job (the
    previous job's context ended with its span) and opens a trace of its own; jobs_processed,
    after the span, names none either."""
    messages = []
    for n in range(1, count + 1):
        job, trace, root, child = f"job-{n}", f"{n:032x}", f"{n:016x}", f"{n + 100:016x}"

        def m(source, seconds, kind, data, span=root, parent=None, named=True):
            message = timeline_message(job, trace, source, 60 * n + seconds, kind, data, span, parent, hour=hour)
            if not named:
                del message["context"]
            return message

        messages += [
            m("queue-service", 0.0, "span", {"name": "process_job", "phase": "start"}, named=False),
            m("queue-service", 0.1, "progress", {"job_id": job, "percent": 0, "status": "started"}),
            m("db-loader", 0.2, "span", {"name": "load_data", "phase": "start"}, span=child, parent=root),
            m("db-loader", 0.3, "event", {"level": "info", "message": "Starting DB load"}, span=child),
            m("db-loader", 5.0, "span", {"name": "load_data", "phase": "end", "status": "success", "duration_ms": 4800.0}, span=child, parent=root),
            m("queue-service", 5.1, "progress", {"job_id": job, "percent": 100, "status": "completed"}),
            m("queue-service", 5.2, "span", {"name": "process_job", "phase": "end", "status": "success", "duration_ms": 5200.0}),
        ]
        jobs_processed = m("queue-service", 5.3, "metric", {"name": "jobs_processed", "value": 1, "unit": "count"}, named=False)
        del jobs_processed["trace_id"], jobs_processed["span_id"]
        messages.append(jobs_processed)
    return messages


def assert_each_job_has_its_own_process_job(view, n):
    (root,) = view["spans"]
    assert (root["name"], root["span_id"], root["trace_id"]) == ("process_job", f"{n:016x}", f"{n:032x}")
    assert root["start"] is not None and root["start"].endswith(f"{n:02d}:00.000Z") and root["status"] == "success"
    assert [c["name"] for c in root["children"]] == ["load_data"]
    assert view["trace_ids"] == [f"{n:032x}"]
    queue_service = next(s for s in view["sources"] if s["source"] == "queue-service")
    assert queue_service["messages"] == 4, "the job-less start is the job's; the job-less, trace-less metric is no job's"


def test_a_job_holds_the_messages_of_its_trace_sent_before_the_job_was_named():
    index = LiveIndex(100, 100, 3600, clock=lambda: 0.0)
    index.add(queue_service_jobs())
    for n in (1, 2):
        assert_each_job_has_its_own_process_job(index.job(f"job-{n}"), n)


@given(st.permutations(range(16)), st.lists(st.integers(1, 16), max_size=6))
def test_a_job_view_is_the_same_whatever_order_and_chunks_its_messages_arrive_in(order, cuts):
    messages = queue_service_jobs()
    in_order = LiveIndex(100, 100, 3600, clock=lambda: 0.0)
    in_order.add(messages)
    shuffled = [messages[i] for i in order]
    chunked = LiveIndex(100, 100, 3600, clock=lambda: 0.0)
    bounds = sorted({0, len(shuffled), *cuts})
    for start, end in zip(bounds, bounds[1:]):
        chunked.add(shuffled[start:end])
    for n in (1, 2):
        assert chunked.job(f"job-{n}") == in_order.job(f"job-{n}")
        assert chunked.trace(f"{n:032x}") == in_order.trace(f"{n:032x}")


def test_a_trace_shared_by_two_jobs_lends_each_only_its_job_less_messages():
    job_a = [timeline_message("job-a", TRACE, "batch", s, "event", {"level": "info", "message": f"a{s}"}) for s in (1, 2)]
    job_b = [timeline_message("job-b", TRACE, "batch", s, "event", {"level": "info", "message": f"b{s}"}) for s in (3, 4)]
    shared = timeline_message(None, TRACE, "batch", 0, "event", {"level": "info", "message": "batch started"})
    del shared["context"]
    index = LiveIndex(100, 100, 3600, clock=lambda: 0.0)
    index.add([shared, *job_a, *job_b])
    for job, mine in (("job-a", ["a1", "a2"]), ("job-b", ["b3", "b4"])):
        assert [e["message"] for e in index.job(job)["sources"][0]["events"]] == ["batch started", *mine]


def test_a_chunk_indexes_as_its_messages_one_by_one():
    # Two jobs, their traces and a trace without a job, interleaved in one chunk.
    messages = [m for pair in zip(seed_job("job-a", "a" * 32), seed_job("job-b", "b" * 32)) for m in pair]
    messages += [timeline_message(None, "c" * 32, "file-receiver", 70, "event", {"level": "error", "message": "no job"})]
    del messages[-1]["context"]
    whole, single = (LiveIndex(100, 100, 3600, clock=lambda: 0.0) for _ in range(2))
    whole.add(messages)
    for message in messages:
        single.add([message])
    for job in ("job-a", "job-b"):
        assert whole.job(job) == single.job(job)
    for trace in ("a" * 32, "b" * 32, "c" * 32):
        assert whole.trace(trace) == single.trace(trace)
    assert whole.trace("c" * 32)["sources"][0]["errors"] == 1 and whole.trace("c" * 32)["job_ids"] == []


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b"]),  # source
            st.sampled_from([None, "", "job-1", "job-2"]),  # context.job_id
            st.sampled_from([None, "1" * 32, "2" * 32]),  # trace_id
            st.booleans(),  # a progress message (with its own job_id) rather than an event
        ),
        max_size=30,
    )
)
def test_the_python_ingest_path_groups_cells_as_the_index_does(specs):
    messages = []
    for source, job, trace, progress in specs:
        message = {"source": source, "type": "event", "timestamp": "2025-10-20T10:00:00.000Z", "data": {"level": "info", "message": "m"}}
        if progress:
            message.update(type="progress", data={"job_id": "job-p", "percent": 1, "status": "running"})
        if job is not None:
            message["context"] = {"job_id": job}
        if trace is not None:
            message["trace_id"] = trace
        messages.append(message)
    by_source, cells = PythonChunk(messages).correlate("2025-10-20T10:00:00.001Z", "h", TraceJobs(100))
    assert cells == cells_of(messages)
    assert by_source == {source: [m for m in messages if m["source"] == source] for source in dict.fromkeys(m["source"] for m in messages)}


def test_status_follows_errors_and_open_work():
    index = LiveIndex(100, 100, 3600, clock=lambda: 0.0)
    running = seed_job("job-run", "1" * 32)[:5]
    index.add(running)
    assert index.job("job-run")["status"] == "running"
    failing = seed_job("job-fail", "2" * 32)
    failing[1]["data"]["level"] = "error"
    index.add(failing)
    assert index.job("job-fail")["status"] == "failed"


def test_the_index_is_bounded_by_count_and_by_age():
    now = [0.0]
    index = LiveIndex(max_jobs=3, max_traces=3, max_age=10, clock=lambda: now[0])
    for n in range(5):
        index.add(seed_job(f"job-{n}", f"{n:032x}"))
    assert list(index.jobs) == ["job-2", "job-3", "job-4"]
    assert index.statistics()["evicted_jobs"] == 2
    now[0] = 5.0
    index.add(seed_job("job-4", f"{4:032x}"))  # touched: stays
    now[0] = 12.0
    index.expire()
    assert list(index.jobs) == ["job-4"]
    assert index.statistics()["evicted_jobs"] == 4


def get_json(sidecar, path, **kwargs):
    status, body = sidecar.http(path, **kwargs)
    return status, json.loads(body) if body else None


def test_the_http_view_serves_jobs_traces_routes_backends_and_metrics(tmp_path):
    sidecar = SidecarProcess(tmp_path, FILES_CONFIG.format(base=tmp_path / "out"), env={"MONITORING_SIDECAR_TOKEN": "t0ken"}).start()
    auth = {"Authorization": "Bearer t0ken"}
    try:
        sidecar.send(seed_job())
        sidecar.send([{"source": "other", "type": "metric", "data": {"name": "x", "value": 1}}])
        sidecar.send_raw(b'{"source": "other", "type": "bogus", "data": {}}\n')
        sidecar.wait_for(lambda s: s["backends"] and s["backends"][0]["delivered"] == 13, what="13 delivered")
        assert get_json(sidecar, "/healthz") == (200, {"status": "alive"})
        assert get_json(sidecar, "/readyz")[0] == 200

        # With a token, every /api route needs it: the job's messages are not for anyone.
        for path in ("/api/jobs", "/api/jobs/job-12345", f"/api/traces/{TRACE}", "/api/routes", "/api/backends", "/api/statistics", "/api/taps", "/api/nothing"):
            assert get_json(sidecar, path)[0] == 401, path
        status, job = get_json(sidecar, "/api/jobs/job-12345", headers=auth)
        assert status == 200 and job["status"] == "completed" and job["duration_s"] == 47.7
        assert [s["source"] for s in job["sources"]] == ["file-receiver", "queue-service", "db-loader"]
        assert job["sources"][0]["duration_s"] == 2.3
        assert job["page"] == {"number": 1, "limit": 1000, "pages": 1, "spans": 2, "sources": 3, "trace_ids": 1, "evicted_spans": 0, "next": None}
        assert get_json(sidecar, "/api/jobs/nope", headers=auth)[0] == 404
        status, trace = get_json(sidecar, f"/api/traces/{TRACE}", headers=auth)
        assert trace["spans"][0]["children"][0]["name"] == "load_data"
        status, jobs = get_json(sidecar, "/api/jobs?since=2025-10-20T00:00:00.000Z", headers=auth)
        assert [j["job_id"] for j in jobs["jobs"]] == ["job-12345"] and jobs["jobs"][0]["status"] == "completed"
        assert get_json(sidecar, "/api/jobs?since=2099-01-01T00:00:00.000Z", headers=auth)[1] == {"jobs": [], "page": {"number": 1, "limit": 1000, "pages": 1, "jobs": 0, "next": None}}

        status, routes = get_json(sidecar, "/api/routes", headers=auth)
        assert routes["rules"][0]["backend"] == "files" and routes["rules"][0]["file"].endswith("sidecar.yaml") and routes["rules"][0]["line"] == 6
        status, backends = get_json(sidecar, "/api/backends", headers=auth)
        assert backends["backends"][0]["delivered"] == 13 and backends["backends"][0]["circuit"] == "closed"

        status, body = sidecar.http("/metrics")  # open, for Prometheus
        families = {f.name: f for f in text_string_to_metric_families(body.decode())}
        value = lambda name, **labels: next(s.value for s in families[name].samples if s.name.endswith("_total") and all(s.labels.get(k) == v for k, v in labels.items()))
        assert value("sidecar_messages_received") == 13
        assert value("sidecar_decode_errors", reason="unknown_type") == 1
        assert value("sidecar_backend_delivered", backend="files") == 13
        assert value("sidecar_http_refused", reason="token") == 8
        latency = families["sidecar_delivery_latency_seconds"]
        assert next(s.value for s in latency.samples if s.name.endswith("_count")) == 13

        assert get_json(sidecar, "/api/reload", method="POST")[0] == 401
        status, reloaded = get_json(sidecar, "/api/reload", method="POST", headers=auth)
        assert status == 200 and reloaded["applied"] is True
        assert get_json(sidecar, "/api/nothing", headers=auth)[0] == 404
        assert get_json(sidecar, "/healthz", method="POST")[0] == 405
    finally:
        assert sidecar.stop() == 0


def test_a_job_id_is_its_path_segment_decoded_once(tmp_path):
    """An id holding "%" or "/" is asked for percent-encoded, and decoded once, not twice."""
    sidecar = SidecarProcess(tmp_path, FILES_CONFIG.format(base=tmp_path / "out"), env={"MONITORING_SIDECAR_TOKEN": "t0ken"}).start()
    auth = {"Authorization": "Bearer t0ken"}
    try:
        for job_id in ("50%25/a b", "50%/a b"):
            sidecar.send([{"source": "svc", "type": "event", "context": {"job_id": job_id}, "data": {"level": "info", "message": job_id}}])
        sidecar.wait_for(lambda s: s["backends"] and s["backends"][0]["delivered"] == 2, what="2 delivered")
        for job_id in ("50%25/a b", "50%/a b"):
            status, job = get_json(sidecar, "/api/jobs/" + urllib.parse.quote(job_id, safe=""), headers=auth)
            assert status == 200 and job["job_id"] == job_id, (job_id, job)
    finally:
        assert sidecar.stop() == 0


def test_the_tap_streams_messages_as_they_pass(tmp_path):
    sidecar = SidecarProcess(tmp_path, FILES_CONFIG.format(base=tmp_path / "out")).start()
    received = []
    try:
        with socket.create_connection(("127.0.0.1", sidecar.http_port), timeout=10) as conn:
            conn.sendall(b"GET /api/tap?source=wanted&type=event HTTP/1.1\r\nHost: localhost\r\n\r\n")
            stream = conn.makefile("rb")
            wait_until(lambda: b"tap open" in (stream.readline() or b"tap open"), what="the tap to open")

            def read():
                for line in stream:
                    if line.startswith(b"data: "):
                        received.append(json.loads(line[6:]))
                        if len(received) == 3:
                            return

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            sidecar.send([{"source": "wanted", "type": "event", "data": {"level": "info", "message": f"m{i}"}} for i in range(3)] + [{"source": "unwanted", "type": "event", "data": {"level": "info", "message": "x"}}])
            reader.join(10)
    finally:
        assert sidecar.stop() == 0
    assert [m["data"]["message"] for m in received] == ["m0", "m1", "m2"]


def test_trace_prints_the_seeds_tree_from_a_running_sidecar(tmp_path):
    sidecar = SidecarProcess(tmp_path, FILES_CONFIG.format(base=tmp_path / "out")).start()
    try:
        sidecar.send(seed_job())
        sidecar.wait_for(lambda s: s["received"] == 12, what="the job received")
        env = {**os.environ, "MONITORING_SIDECAR_URL": f"http://127.0.0.1:{sidecar.http_port}"}
        result = subprocess.run([sys.executable, "-m", "sidecar", "trace", "job-12345"], capture_output=True, text=True, env=env, cwd=REPO, timeout=30)
        assert result.returncode == 0, result.stderr
        assert result.stdout.rstrip("\n") == EXPECTED_TREE + ", completed"  # `trace` adds the status
        missing = subprocess.run([sys.executable, "-m", "sidecar", "trace", "job-0"], capture_output=True, text=True, env=env, cwd=REPO, timeout=30)
        assert missing.returncode == 1 and "no job 'job-0'" in missing.stderr
    finally:
        assert sidecar.stop() == 0


# --- caps and pages -----------------------------------------------------------------------


def span_message(n, phase="start", parent=None, status="success", job="job-big", trace=TRACE, second=0.0):
    data = {"name": f"step-{n}", "phase": phase}
    if phase == "end":
        data.update(status=status, duration_ms=10.0)
    return timeline_message(job, trace, "worker", second, "span", data, span=f"{n:016x}", parent=f"{parent:016x}" if parent is not None else None)


def naive_status(activity) -> str:
    """Activity.status as it was before it kept counts: from every span, each time."""
    from sidecar.jobs import DONE_STATUSES, FAILED_STATUSES

    if any(a.errors for a in activity.sources.values()) or any(s.status in FAILED_STATUSES for s in activity.spans.values()):
        return "failed"
    progresses = [a.progress for a in activity.sources.values() if a.progress]
    if any(p["status"] in FAILED_STATUSES for p in progresses):
        return "failed"
    open_spans = any(s.end is None for s in activity.spans.values())
    latest = max(progresses, key=lambda p: p["at"], default=None)
    if latest and (latest["percent"] >= 100 or latest["status"] in DONE_STATUSES) and not open_spans:
        return "completed"
    return "completed" if not progresses and activity.spans and not open_spans else "running"


def flatten(nodes):
    return [node for n in nodes for node in (n, *flatten(n["children"]))]


def depth_of(nodes) -> int:
    return max((1 + depth_of(n["children"]) for n in nodes), default=0)


span_events = st.lists(
    st.tuples(
        st.integers(0, 12),  # span id
        st.sampled_from(["start", "end"]),
        st.one_of(st.none(), st.integers(0, 12)),  # parent (cycles and self-parents included)
        st.sampled_from(["success", "error", "cancelled", "done"]),
    ),
    max_size=60,
)


@given(span_events, st.integers(1, 8), st.integers(1, 5))
def test_a_job_holds_at_most_its_cap_of_spans_and_pages_walk_each_once(events, cap, limit):
    index = LiveIndex(10, 10, 3600, clock=lambda: 0.0, max_spans_per_job=cap, max_spans_per_trace=cap)
    for second, (n, phase, parent, status) in enumerate(events):
        index.add([span_message(n, phase, parent, status, second=float(second))])
    job = index.jobs.get("job-big")
    if job is None:
        return
    assert len(job.spans) <= cap and len(index.traces[TRACE].spans) <= cap
    firsts = list(dict.fromkeys(n for n, *_ in events))  # a span evicted and seen again is new again
    assert job.evicted_spans == index.statistics()["evicted_spans_of_jobs"] >= max(0, len(firsts) - cap)
    assert job.status() == naive_status(job)
    assert job.open_spans == sum(s.end is None for s in job.spans.values())
    walked = [span.span_id for span, _depth in job.walk()]
    assert sorted(walked) == sorted(job.spans)
    pages = index.job("job-big", 1, limit)["page"]["pages"]
    paged = [node["span_id"] for page in range(1, pages + 1) for node in flatten(index.job("job-big", page, limit)["spans"])]
    assert paged == walked
    assert index.job("job-big", pages + 1, limit)["spans"] == []


def test_a_chain_of_spans_deeper_than_the_nesting_limit_is_listed_flat_past_it():
    from sidecar.jobs import MAX_NESTING

    index = LiveIndex(10, 10, 3600, clock=lambda: 0.0)
    index.add([span_message(n, parent=n - 1 if n else None, second=n / 1000) for n in range(300)])
    view = index.job("job-big")
    assert depth_of(view["spans"]) == MAX_NESTING
    assert [n["span_id"] for n in flatten(view["spans"])] == [f"{n:016x}" for n in range(300)]
    assert len(orjson_dumps(view)) > 0  # deeper than orjson's 255 levels would raise


def orjson_dumps(value):
    import orjson

    return orjson.dumps(value, option=orjson.OPT_INDENT_2)


def test_a_page_nests_what_it_holds_and_lists_a_span_whose_parent_is_on_an_earlier_page_at_its_top():
    index = LiveIndex(10, 10, 3600, clock=lambda: 0.0)
    # 0 -> 1 -> 2, 0 -> 3: walked 0, 1, 2, 3
    index.add([span_message(0, second=0), span_message(1, parent=0, second=1), span_message(2, parent=1, second=2), span_message(3, parent=0, second=3)])
    first, second = index.job("job-big", 1, 2), index.job("job-big", 2, 2)
    assert [(n["span_id"][-1], [c["span_id"][-1] for c in n["children"]]) for n in first["spans"]] == [("0", ["1"])]
    assert [(n["span_id"][-1], n["parent_span_id"][-1]) for n in second["spans"]] == [("2", "1"), ("3", "0")]
    assert first["page"] == {"number": 1, "limit": 2, "pages": 2, "spans": 4, "sources": 1, "trace_ids": 1, "evicted_spans": 0}


def test_the_oldest_span_gives_way_and_the_job_list_is_paged():
    index = LiveIndex(100, 100, 3600, clock=lambda: 0.0, max_spans_per_job=3)
    index.add([span_message(n, second=n) for n in range(5)])
    assert list(index.jobs["job-big"].spans) == [f"{n:016x}" for n in (2, 3, 4)]
    assert index.job("job-big")["page"]["evicted_spans"] == 2
    for n in range(5):
        index.add(seed_job(f"job-{n}", f"{n + 1:032x}"))
    newest_first = [j["job_id"] for j in index.recent_jobs()]
    pages = [index.jobs_page(None, page, 2) for page in (1, 2, 3, 4)]
    assert [j["job_id"] for p in pages for j in p["jobs"]] == newest_first
    assert pages[0]["page"] == {"number": 1, "limit": 2, "pages": 3, "jobs": 6}
