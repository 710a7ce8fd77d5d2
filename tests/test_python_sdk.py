"""The Python SDK through a real sidecar to the filesystem backend."""

import subprocess
import sys
import textwrap

from tests.harness import FILES_CONFIG, SidecarProcess, read_jsonl

PROGRAM = """
from monitoring_sdk import MonitoringClient

mon = MonitoringClient("etl-job", host="localhost", port=17000)
mon.set_context("job_id", "job-py-1")
with mon.span("extract"):
    mon.log_event("info", "extracting", {"table": "orders"})
    mon.log_metric("rows", 10000, "count", {"table": "orders"})
    mon.log_progress("job-py-1", 50, "running")
    mon.log_resource(12.5, 256.0, None, None)
mon.close(timeout=5)
"""


def test_python_sdk_messages_arrive_through_the_sidecar(tmp_path):
    sidecar = SidecarProcess(tmp_path, FILES_CONFIG.format(base=tmp_path / "out")).start()
    try:
        run = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(PROGRAM)],
            env={"MONITORING_SIDECAR": f"127.0.0.1:{sidecar.port}", "PATH": "/usr/bin:/bin"},
            capture_output=True, text=True, timeout=60,
        )
        assert run.returncode == 0, run.stderr
        sidecar.wait_for(lambda s: s["backends"][0]["delivered"] == 6, what="six messages delivered")
        assert sidecar.stats()["decode_errors"] == {}
    finally:
        assert sidecar.stop() == 0
    messages = read_jsonl(tmp_path / "out" / "etl-job.jsonl")
    assert [m["type"] for m in messages] == ["span", "event", "metric", "progress", "resource", "span"]
    assert len({m["trace_id"] for m in messages}) == 1
    assert all(m["context"]["job_id"] == "job-py-1" for m in messages)
    start, end = messages[0], messages[-1]
    assert (start["data"]["phase"], end["data"]["phase"]) == ("start", "end")
    assert end["span_id"] == start["span_id"] and end["data"]["status"] == "success"
    assert messages[1]["span_id"] == start["span_id"]
    assert messages[2]["data"] == {"name": "rows", "value": 10000, "unit": "count", "tags": {"table": "orders"}}
