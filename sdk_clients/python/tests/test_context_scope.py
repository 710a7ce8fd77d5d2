"""Context and spans scope each other: what is set inside a root span is undone when it ends."""

from __future__ import annotations

import json
import os
import threading

import pytest
from conftest import free_port
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from monitoring_sdk import MonitoringClient


@pytest.fixture
def client(server):
    mon = MonitoringClient("queue-service", host="127.0.0.1", port=server.port)
    yield mon
    mon.close(timeout=1.0)


def exported() -> dict | None:
    text = os.environ.get("MONITORING_CONTEXT")
    return None if text is None else json.loads(text)


def by_message(messages: list[dict]) -> dict[str, dict]:
    return {m["data"]["message"]: m for m in messages if m["type"] == "event"}


def test_queue_service_loop_keeps_each_jobs_context_to_itself(server, client):
    client.set_context("service", "qs")
    for job_id in ("job-1", "job-2"):
        span_id = client.start_span("process_job")
        client.set_context("job_id", job_id)
        client.log_event("info", f"processing {job_id}")
        assert exported() == {"service": "qs", "job_id": job_id}
        client.end_span(span_id, "success")
        assert exported() == {"service": "qs"}
        client.log_metric("jobs_processed", 1, "count")
    messages = server.wait_messages(8)
    start1, event1, end1, metric1, start2, event2, end2, metric2 = messages

    assert start1["context"] == start2["context"] == {"service": "qs"}
    assert event1["context"] == end1["context"] == {"service": "qs", "job_id": "job-1"}
    assert event2["context"] == end2["context"] == {"service": "qs", "job_id": "job-2"}
    assert metric1["context"] == metric2["context"] == {"service": "qs"}
    assert "trace_id" not in metric1 and "trace_id" not in metric2
    assert start1["trace_id"] == end1["trace_id"] != start2["trace_id"] == end2["trace_id"]
    assert not any(m.get("context", {}).get("job_id") == "job-1" for m in (start2, event2, end2, metric2))


def test_context_set_with_no_span_open_lasts(server, client):
    client.set_context("service", "qs")
    with client.span("job"):
        pass
    client.log_event("info", "after")
    assert server.wait_messages(3)[-1]["context"] == {"service": "qs"}
    assert exported() == {"service": "qs"}


def test_keys_changed_or_removed_inside_come_back(server, client):
    client.set_context("service", "qs")
    client.set_context("tenant", "acme")
    with client.span("job"):
        client.set_context("service", "other")
        client.set_context("tenant", None)
        client.set_context("job_id", "job-1")
        client.log_event("info", "inside")
    client.log_event("info", "after")
    messages = by_message(server.wait_messages(4))
    assert messages["inside"]["context"] == {"service": "other", "job_id": "job-1"}
    assert messages["after"]["context"] == {"service": "qs", "tenant": "acme"}
    assert exported() == {"service": "qs", "tenant": "acme"}


def test_context_set_in_a_nested_span_lasts_until_the_root_ends(server, client):
    root = client.start_span("process_job")
    nested = client.start_span("load")
    client.set_context("stage", "load")
    client.end_span(nested)
    client.log_event("info", "after nested")
    assert exported() == {"stage": "load"}
    client.end_span(root)
    client.log_event("info", "after root")
    messages = server.wait_messages(5)
    nested_end, root_end = messages[2], messages[4]
    assert nested_end["context"] == {"stage": "load"}
    assert by_message(messages)["after nested"]["context"] == {"stage": "load"}
    assert root_end["span_id"] == root and root_end["context"] == {"stage": "load"}  # sent before the restore
    assert "context" not in by_message(messages)["after root"]
    assert "MONITORING_CONTEXT" not in os.environ


def test_ending_out_of_order_restores_when_the_root_ends(server, client):
    client.set_context("service", "qs")
    root = client.start_span("process_job")
    nested = client.start_span("load")
    client.set_context("job_id", "job-1")
    client.end_span(root)  # the nested span is still open: the restore happens now all the same
    assert exported() == {"service": "qs"}
    client.log_event("info", "nested still open")
    client.end_span(nested)
    assert exported() == {"service": "qs"}
    root_end, event, nested_end = server.wait_messages(5)[2:]
    assert root_end["span_id"] == root and root_end["context"] == {"service": "qs", "job_id": "job-1"}
    assert event["span_id"] == nested and event["context"] == {"service": "qs"}
    assert nested_end["span_id"] == nested and nested_end["context"] == {"service": "qs"}


def test_a_span_started_while_another_is_open_is_not_a_root(server, client):
    root = client.start_span("process_job")
    nested = client.start_span("load")
    client.end_span(root)
    later = client.start_span("upload")  # the nested span is open: this one scopes nothing
    client.set_context("job_id", "job-1")
    client.end_span(later)
    client.end_span(nested)
    assert exported() == {"job_id": "job-1"}
    with client.span("next"):  # no span open: a root again
        client.set_context("job_id", "job-2")
    assert exported() == {"job_id": "job-1"}


def test_inherited_context_comes_back_and_is_exported(server):
    os.environ["MONITORING_CONTEXT"] = '{"job_id": "job-parent", "tenant": "acme"}'
    mon = MonitoringClient("db-loader", host="127.0.0.1", port=server.port)
    with mon.span("load_data"):
        mon.set_context("job_id", "job-child")
        mon.set_context("file", "a.csv")
        assert exported() == {"job_id": "job-child", "tenant": "acme", "file": "a.csv"}
    assert exported() == {"job_id": "job-parent", "tenant": "acme"}
    mon.log_event("info", "back")
    assert server.wait_messages(3)[-1]["context"] == {"job_id": "job-parent", "tenant": "acme"}
    mon.close(timeout=1)


def test_context_manager_and_decorator_scope_context_also_on_errors(server, client):
    @client.traced("transform")
    def transform():
        client.set_context("step", "transform")
        raise ValueError("bad row")

    with pytest.raises(ValueError):
        transform()
    assert "MONITORING_CONTEXT" not in os.environ
    with pytest.raises(KeyError):
        with client.span("block"):
            client.set_context("step", "block")
            raise KeyError("k")
    client.log_event("info", "after")
    messages = server.wait_messages(5)
    assert [(m["data"].get("status"), m.get("context")) for m in messages] == [
        (None, None), ("error", {"step": "transform"}), (None, None), ("error", {"step": "block"}), (None, None)]


def test_restore_happens_even_when_the_end_message_cannot_be_encoded(server):
    errors: list[BaseException] = []
    mon = MonitoringClient("svc", host="127.0.0.1", port=server.port, on_error=errors.append)
    mon.set_context("service", "qs")
    with mon.span("job"):
        mon.set_context("ratio", float("nan"))  # no message can be encoded with it
    mon.log_event("info", "after")
    assert server.wait_messages(2)[-1]["context"] == {"service": "qs"}
    assert exported() == {"service": "qs"}
    assert errors and all(isinstance(e, ValueError) for e in errors)
    mon.close(timeout=1)


def test_the_root_span_is_the_clients_first_open_span_in_any_thread(server, client):
    def worker():
        with client.span("in worker"):
            client.set_context("worker", "w")

    with client.span("main"):
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
        assert exported() == {"worker": "w"}  # the worker's span was not a root
    assert "MONITORING_CONTEXT" not in os.environ


def test_threads_leave_the_exported_context_equal_to_the_context(server, client):
    def worker(n):
        for i in range(200):
            span_id = client.start_span("process_job")
            client.set_context(f"t{n}", i)
            client.end_span(span_id)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert client._spans == {} and client._scope is None
    assert exported() == (client._context or None)


# -- any sequence of calls -------------------------------------------------------------------------

KEYS = ("job_id", "stage", "tenant")
calls = st.lists(st.one_of(
    st.tuples(st.just("set"), st.sampled_from(KEYS), st.one_of(st.none(), st.sampled_from(["a", "b", 1, [1, 2]]))),
    st.tuples(st.just("start")),
    st.tuples(st.just("end"), st.integers(0, 10)),  # which open span, modulo their number
    st.tuples(st.just("log")),
), max_size=40)
inherited = st.dictionaries(st.sampled_from(KEYS), st.sampled_from(["p", 7, {"x": [None]}]), max_size=3)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(calls=calls, seed=inherited, dict_path=st.booleans())
def test_any_sequence_restores_the_root_spans_starting_context(calls, seed, dict_path):
    """Model: one context, the open spans in start order, the root's snapshot. After a root
    span's end the context (and MONITORING_CONTEXT) is what it was at its start; its end
    message carries the context from before the restore; nothing else undoes context."""
    if seed:
        os.environ["MONITORING_CONTEXT"] = json.dumps(seed)
    else:
        os.environ.pop("MONITORING_CONTEXT", None)
    try:
        mon = MonitoringClient("svc", host="127.0.0.1", port=free_port())
        mon._binary = dict_path  # the dict path, with the JSON packer
        lines: list[bytes] = []
        mon._offer = lines.append
        context, open_spans, root, snapshot = dict(seed), [], None, None
        for call in calls:
            if call[0] == "set":
                _, key, value = call
                mon.set_context(key, value)
                context.pop(key, None)
                if value is not None:
                    context[key] = value
            elif call[0] == "start":
                span_id = mon.start_span("s")
                if not open_spans:
                    root, snapshot = span_id, dict(context)
                open_spans.append(span_id)
            elif call[0] == "end" and open_spans:
                span_id = open_spans.pop(call[1] % len(open_spans))
                mon.end_span(span_id)
                end = json.loads(lines[-1])
                assert (end["span_id"], end["data"]["phase"]) == (span_id, "end")
                assert end.get("context", {}) == context  # the context as it is, before any restore
                if span_id == root:
                    context, root = snapshot, None
            elif call[0] == "log":
                mon.log_event("info", "x")
                assert json.loads(lines[-1]).get("context", {}) == context
            assert mon._context == context
            assert exported() == (context or None)
        mon.close(timeout=0)
    finally:
        os.environ.pop("MONITORING_CONTEXT", None)
        os.environ.pop("TRACEPARENT", None)
