"""The sidecar as a subprocess, fed over real TCP sockets, writing real files."""

import os
import re
import signal
import socket
import subprocess
import threading
import time

import pytest
import trio

from sidecar.protocol import NATIVE_AVAILABLE

from tests.harness import SidecarProcess, SteadySender, encode, event, read_jsonl, seqs, wait_until

FILES_CONFIG = """
tcp:
  host: 127.0.0.1
  port: 0
  max_connections: {max_connections}
shutdown:
  connection_grace: 0.2
  drain_timeout: {drain_timeout}
reload:
  poll_interval: 0.1
  settle_delay: 0.1
backends:
  files:
    type: filesystem
    base_path: {base}
    create_base_path: true
    fsync: never
    batch: {{max_messages: 500, timeout: {batch_timeout}}}
    queue: {{max_messages: 100000, when_full: block}}
  broken:
    type: filesystem
    base_path: {base}/broken
    batch: {{max_messages: 100, timeout: 0.05}}
    retry: {{initial_backoff: 0.05, max_backoff: 0.2}}
    circuit_breaker: {{failure_threshold: 3, probe_interval: 0.05, reset_timeout: 0.3, max_reset_timeout: 0.5}}
routing:
  all:
    - backend: files
"""


@pytest.fixture
def start_sidecar(tmp_path):
    started = []

    def start(config=None, routes=None, max_connections=1024, drain_timeout=10, batch_timeout=0.05, env=None):
        text = (config or FILES_CONFIG).format(base=tmp_path / "out", max_connections=max_connections, drain_timeout=drain_timeout, batch_timeout=batch_timeout)
        sidecar = SidecarProcess(tmp_path, text, routes, env).start()
        started.append(sidecar)
        return sidecar

    yield start
    for sidecar in started:
        if sidecar.process.poll() is None:
            sidecar.stop(signal.SIGKILL)


def test_json_and_msgpack_clients_both_arrive_enriched(start_sidecar, tmp_path):
    sidecar = start_sidecar()
    sidecar.send([event("json-svc", i) for i in range(100)], "json")
    sidecar.send([event("msgpack-svc", i) for i in range(100)], "msgpack")
    sidecar.wait_for(lambda s: s["backends"][0]["delivered"] == 200, what="200 delivered")
    for source in ("json-svc", "msgpack-svc"):
        written = read_jsonl(tmp_path / "out" / f"{source}.jsonl")
        assert seqs(written) == list(range(100))
        assert {m["host"] for m in written} == {socket.gethostname()}
        assert all(m["received_at"].endswith("Z") and len(m["received_at"]) == 24 for m in written)
    assert sidecar.stop() == 0


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_json_lines_take_the_path_the_config_names_and_the_file_is_the_same(start_sidecar, tmp_path, native):
    if native and not NATIVE_AVAILABLE:
        pytest.skip("sidecar._native is not built")
    sidecar = start_sidecar(FILES_CONFIG + f"pipeline: {{{{native: {'true' if native else 'false'}}}}}\n")
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    sidecar.send([event("paths", 0, trace_id=trace, context={"seq": 0, "job_id": "job-1"})])
    sidecar.send([event("paths", i, trace_id=trace) for i in range(1, 100)])
    sidecar.wait_for(lambda s: s["backends"][0]["delivered"] == 100, what="100 delivered")
    sidecar.send([event("paths", 100, trace_id=trace.upper())])  # upper case: the Python path's
    stats = sidecar.wait_for(lambda s: s["backends"][0]["delivered"] == 101, what="101 delivered")
    assert stats["decoded_by_path"] == ({"native": 100, "python": 1} if native else {"python": 101})
    written = read_jsonl(tmp_path / "out" / "paths.jsonl")
    assert seqs(written) == list(range(101))
    assert {m["context"]["job_id"] for m in written[:100]} == {"job-1"}  # from the trace
    assert written[100]["trace_id"] == trace
    assert list(written[1]) == ["source", "type", "timestamp", "data", "context", "trace_id", "received_at", "host"]
    assert sidecar.stop() == 0


def test_fifty_concurrent_connections_deliver_every_message_in_order(start_sidecar, tmp_path):
    sidecar = start_sidecar()
    per_connection = 400
    barrier = threading.Barrier(50)
    errors = []

    def client(index):
        try:
            with sidecar.connect() as conn:
                barrier.wait(10)
                payload = encode([event(f"svc-{index}", i) for i in range(per_connection)], "msgpack" if index % 2 else "json")
                for start in range(0, len(payload), 4096):  # many small writes, interleaved with the others
                    conn.sendall(payload[start : start + 4096])
                conn.shutdown(socket.SHUT_WR)
                conn.recv(1)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    stats = sidecar.wait_for(lambda s: s["backends"][0]["delivered"] == 50 * per_connection, what="every message delivered")
    assert stats["received"] == 50 * per_connection
    assert stats["connections_total"] == 50
    for index in range(50):
        assert seqs(read_jsonl(tmp_path / "out" / f"svc-{index}.jsonl")) == list(range(per_connection))
    assert sidecar.stop() == 0


def test_bad_lines_are_counted_by_reason_and_every_good_line_arrives(start_sidecar, tmp_path):
    sidecar = start_sidecar()
    good = [event("mixed", i) for i in range(50)]
    bad = [
        b"{not json",
        b'{"source": "mixed", "type": "event", "data": {"level": "info"}}',
        b'{"source": "mixed", "type": "gauge", "data": {}}',
        b'{"source": "mixed", "type": "metric", "data": {"name": "x", "value": "7"}}',
        b'{"source": "mixed", "type": "event", "timestamp": "soon", "data": {"level": "info", "message": "m"}}',
        b"[1, 2, 3]",
    ]
    stream = b""
    for i, message in enumerate(good):
        stream += encode([message])
        if i < len(bad):
            stream += bad[i] + b"\n"
    with sidecar.connect() as conn:
        conn.sendall(stream)
        conn.sendall(b'{"source": "mixed", "data": "' + b"x" * (1024 * 1024 + 10) + b'"}\n')  # over the 1 MiB limit
        conn.sendall(encode([event("mixed", 50)]))
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)
    stats = sidecar.wait_for(lambda s: s["backends"][0]["delivered"] == 51, what="51 good messages delivered")
    assert stats["decode_errors"] == {"invalid_json": 1, "missing_field": 1, "unknown_type": 1, "invalid_field": 1, "invalid_timestamp": 1, "not_an_object": 1, "too_large": 1}
    assert seqs(read_jsonl(tmp_path / "out" / "mixed.jsonl")) == list(range(51))
    assert "rejected from 127.0.0.1" in sidecar.log()
    assert sidecar.stop() == 0


def test_syslog_from_util_linux_logger_is_refused_by_name_and_the_sidecar_keeps_serving(start_sidecar):
    sidecar = start_sidecar()
    subprocess.run(["logger", "-T", "-n", "127.0.0.1", "-P", str(sidecar.port), "hello from logger"], check=True, timeout=30, stdin=subprocess.DEVNULL)
    sidecar.wait_for(lambda s: s["decode_errors"].get("unknown_format") == 1, what="the refusal to be counted")
    assert "this looks like syslog, which is not a source type" in sidecar.log()
    sidecar.send([event("after", 0)])
    sidecar.wait_for(lambda s: s["backends"][0]["delivered"] == 1, what="the sidecar to keep serving")


def test_a_stream_in_an_unknown_format_is_refused_with_one_error_line(start_sidecar):
    sidecar = start_sidecar()
    with sidecar.connect() as conn:
        conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = conn.recv(4096)
        assert conn.recv(4096) == b""  # closed
    assert reply.startswith(b"error: first byte 0x47 is an HTTP request: the sidecar's HTTP view is on its own port")
    sidecar.wait_for(lambda s: s["decode_errors"].get("unknown_format") == 1, what="the refusal to be counted")
    sidecar.send([event("after", 0)])
    sidecar.wait_for(lambda s: s["backends"][0]["delivered"] == 1, what="the sidecar to keep serving")
    assert sidecar.stop() == 0


def test_connections_over_the_limit_are_refused_and_counted(start_sidecar):
    sidecar = start_sidecar(max_connections=2)
    first, second = sidecar.connect(), sidecar.connect()
    sidecar.wait_for(lambda s: s["sources"]["tcp"]["connections_active"] == 2, what="two connections")
    with sidecar.connect() as third:
        assert third.recv(4096) == b"error: too many connections (limit 2)\n"
    sidecar.wait_for(lambda s: s["connections_refused"] == {"limit": 1}, what="the refusal to be counted")
    first.close()
    second.close()
    sidecar.wait_for(lambda s: s["sources"]["tcp"]["connections_active"] == 0, what="connections to close")
    sidecar.send([event("again", 0)])
    sidecar.wait_for(lambda s: s["backends"][0]["delivered"] == 1, what="a new connection to be served")
    assert sidecar.stop() == 0


def test_a_source_name_cannot_escape_base_path(start_sidecar, tmp_path):
    sidecar = start_sidecar()
    hostile = ["../../../../tmp/escaped", "/etc/cron.d/x", "..", "a/../../b"]
    sidecar.send([event(name, 0) for name in hostile])
    sidecar.wait_for(lambda s: s["backends"][0]["delivered"] == len(hostile), what="hostile sources delivered")
    out = tmp_path / "out"
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert len(written) == len(hostile)
    assert all("/" not in name and not name.startswith(".") for name in written), written
    assert not (tmp_path / "escaped.jsonl").exists()
    assert sidecar.stop() == 0


def test_reload_under_load_adds_a_route_within_two_seconds_and_loses_nothing(start_sidecar, tmp_path):
    """The seed's "Runtime Configuration Changes" scenario: a route is added by editing a file."""
    routes = {"50-queue-service.yaml": "queue-service:\n  - backend: files\n"}
    sidecar = start_sidecar(routes=routes)
    sender = SteadySender(sidecar, "queue-service", per_second=400)
    sender.start()
    wait_until(lambda: sender.sent > 300, what="load to run")
    edited_at = time.time()
    sidecar.write_route(
        "50-queue-service.yaml",
        """
        queue-service:
          - backend: files
          - backend: files   # NEW: a debugging copy, as the seed adds CloudWatch
            enabled: true
            config:
              path: debug/{source}.jsonl
        """,
    )
    debug = tmp_path / "out" / "debug" / "queue-service.jsonl"
    first = wait_until(lambda: read_jsonl(debug)[:1], timeout=5, what="the new route to receive messages")[0]
    assert first["sent_at"] - edited_at < 2.0
    time.sleep(0.5)
    sent = sender.stop()
    stats = sidecar.wait_for(lambda s: s["received"] == sent and all(b["queued"] == 0 for b in s["backends"]), what="all sent messages handled")
    assert stats["reloads"] == 1 and stats["reload_failures"] == 0
    everything = seqs(read_jsonl(tmp_path / "out" / "queue-service.jsonl"))
    assert everything == list(range(sent)), "the existing route lost or duplicated messages"
    copied = seqs(read_jsonl(debug))
    assert copied == list(range(copied[0], sent)), "the new route has gaps"
    # the unchanged backend instance was kept, not restarted: one instance, counting everything
    files = next(b for b in stats["backends"] if b["backend"] == "files")
    assert files["delivered"] == sent
    assert "reload applied (changed:" in sidecar.log()
    assert sidecar.stop() == 0


def test_an_invalid_drop_in_is_rejected_with_file_and_line_and_the_old_table_keeps_running(start_sidecar, tmp_path):
    sidecar = start_sidecar(routes={"50-a.yaml": "svc:\n  - backend: files\n"})
    bad = sidecar.write_route("60-bad.yaml", "svc:\n  - backend: files\n    filter: {types: [gossip]}\n")
    stats = sidecar.wait_for(lambda s: s["reload_failures"] == 1, what="the reload to be rejected")
    assert f"{bad}:3: filter.types: unknown 'gossip'" in stats["last_reload_error"]
    assert f"reload rejected (changed: {bad}): {bad}:3" in sidecar.log()
    sidecar.send([event("svc", 0)])
    sidecar.wait_for(lambda s: s["backends"][0]["delivered"] == 1, what="delivery on the old table")
    os.unlink(bad)
    sidecar.wait_for(lambda s: s["reloads"] == 1 and s["last_reload_error"] is None, what="the fixed config to load")
    assert sidecar.stop() == 0


def test_sighup_reloads_now(start_sidecar):
    sidecar = start_sidecar()
    sidecar.send_signal(signal.SIGHUP)
    sidecar.wait_for(lambda s: s["reloads"] == 1, what="SIGHUP reload")
    assert "reload applied (SIGHUP)" in sidecar.log()
    assert sidecar.stop() == 0


def test_a_failing_backend_retries_and_opens_its_circuit_while_others_deliver(start_sidecar, tmp_path):
    sidecar = start_sidecar(routes={"50-broken.yaml": "svc:\n  - backend: files\n  - backend: broken\n"})
    mount_point = tmp_path / "out" / "broken"  # every write fails until it exists
    sidecar.send([event("svc", i) for i in range(300)])
    stats = sidecar.wait_for(lambda s: sidecar.backend("broken").get("circuit_opened", 0) >= 1 and sidecar.backend("files").get("delivered") == 300, what="circuit open, files delivered")
    broken = sidecar.backend("broken")
    assert broken["retries"] >= 3 and broken["delivered"] == 0 and broken["queued"] == 300
    assert "does not exist (not mounted?)" in broken["last_error"]
    assert "circuit open" in sidecar.log()
    retries, probes = broken["retries"], broken["probes"]
    time.sleep(0.25)
    assert sidecar.backend("broken")["retries"] == retries, "an open circuit writes only after a probe passes"
    assert probes < sidecar.backend("broken")["probes"] <= probes + 6, "an open circuit probes every probe_interval"
    mount_point.mkdir(parents=True)
    sidecar.wait_for(lambda s: sidecar.backend("broken").get("delivered") == 300, what="recovery")
    assert seqs(read_jsonl(mount_point / "svc.jsonl")) == list(range(300))
    assert sidecar.backend("broken")["circuit"] == "closed"
    assert stats["received"] == 300
    assert sidecar.stop() == 0


async def test_the_signal_handler_is_in_place_before_any_source_listens(tmp_path):
    # The sources listen before the backends start (a port in use ends the start at once); a
    # SIGTERM from the moment a client can connect must be a drain, not the default death.
    from sidecar.app import Sidecar

    config = tmp_path / "sidecar.yaml"
    config.write_text(FILES_CONFIG.format(base=tmp_path / "out", max_connections=16, drain_timeout=5, batch_timeout=0.05) + "http: {enabled: false}\n")
    sidecar = Sidecar(config, None)
    seen = []
    for source in sidecar.sources.values():
        listen = source.run

        async def run(send_channel, *, task_status=trio.TASK_STATUS_IGNORED, listen=listen):
            seen.append(signal.getsignal(signal.SIGTERM))
            await listen(send_channel, task_status=task_status)

        source.run = run
    async with trio.open_nursery() as nursery:
        await nursery.start(sidecar.run)
        sidecar.stop()
    assert seen and all(handler not in (signal.SIG_DFL, None) for handler in seen), seen


def test_sigterm_drains_every_queued_message_then_exits_zero(start_sidecar, tmp_path):
    sidecar = start_sidecar(batch_timeout=30)  # nothing is flushed by time before the signal
    sidecar.send([event("drain", i) for i in range(1234)])
    sidecar.wait_for(lambda s: s["received"] == 1234, what="all received")
    # Two full batches of 500 may go at once; the last 234 wait for the 30 s timer, or SIGTERM.
    assert len(read_jsonl(tmp_path / "out" / "drain.jsonl")) <= 1000 and sidecar.backend("files")["queued"] >= 234
    assert sidecar.stop(signal.SIGTERM) == 0
    assert seqs(read_jsonl(tmp_path / "out" / "drain.jsonl")) == list(range(1234))
    final = sidecar.stats()
    assert final["backends"][0]["delivered"] == 1234 and final["backends"][0]["queued"] == 0
    assert re.search(r"shutdown complete in [\d.]+s: received 1234, delivered 1234 \(all backends\), undelivered 0 \(on disk 0, lost 0\)", sidecar.log())


def test_sigterm_with_a_dead_backend_does_not_wait_for_its_open_circuit_and_reports_what_was_lost(start_sidecar, tmp_path):
    sidecar = start_sidecar(routes={"50-broken.yaml": "svc:\n  - backend: files\n  - backend: broken\n"}, drain_timeout=8)
    sidecar.send([event("svc", i) for i in range(77)])
    sidecar.wait_for(lambda s: sidecar.backend("files").get("delivered") == 77 and sidecar.backend("broken").get("circuit") == "open", what="the good backend to deliver, the broken one's circuit open")
    started = time.monotonic()
    assert sidecar.stop(signal.SIGINT) == 0
    assert time.monotonic() - started < 4, "an open circuit is not waited for (drain_timeout is 8 s)"
    assert "backend broken: circuit open at shutdown; not waiting for it (77 messages held)" in sidecar.log()
    # The default queue is on disk: what the dead backend held is there for the next start.
    assert "undelivered messages: broken=77 (77 on disk for the next start, 0 lost)" in sidecar.log()
    assert sidecar.backend("broken")["queued"] == 77


def test_sigterm_exits_within_the_shutdown_budget_whatever_drain_timeout_says(start_sidecar, tmp_path):
    # A backend that keeps failing with its circuit closed (a threshold it never reaches) would
    # be retried for the whole drain_timeout; the budget ends it first.
    config = FILES_CONFIG.replace("failure_threshold: 3,", "failure_threshold: 1000,").replace("  drain_timeout: {drain_timeout}\n", "  drain_timeout: {drain_timeout}\n  budget: 1.5\n")
    assert "budget: 1.5" in config and "failure_threshold: 1000" in config
    sidecar = start_sidecar(config=config, routes={"50-broken.yaml": "svc:\n  - backend: files\n  - backend: broken\n"}, drain_timeout=60)
    sidecar.send([event("svc", i) for i in range(50)])
    sidecar.wait_for(lambda s: sidecar.backend("files").get("delivered") == 50 and sidecar.backend("broken").get("retries", 0) >= 2, what="the broken backend retrying")
    started = time.monotonic()
    assert sidecar.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 3, "shutdown.budget is 1.5 s"
    assert re.search(r"shutting down within 1\.5s", sidecar.log())
    assert "undelivered messages: broken=50 (50 on disk for the next start, 0 lost)" in sidecar.log()


def test_an_otlp_exporter_at_the_http_view_is_counted_and_told_where_it_is(start_sidecar):
    sidecar = start_sidecar()
    status, _body = sidecar.http("/v1/traces", method="POST")
    assert status == 404
    status, _body = sidecar.http("/no/such/page")
    assert status == 404
    stats = sidecar.wait_for(lambda s: s["http_not_found"] == 2, what="the 404s to be counted")
    assert "POST /v1/traces is an OTLP/HTTP export: point the exporter at a source of `type: otlp`" in sidecar.log()
    status, metrics = sidecar.http("/metrics")
    assert b"sidecar_http_not_found_total 2.0" in metrics, metrics[:2000]
    assert stats["decode_errors"] == {}
