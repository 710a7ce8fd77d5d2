"""The seed's four Perl programs, run as written against a real sidecar."""

import collections
import json
import os
import shutil
import subprocess

from tests.harness import REPO, SidecarProcess, read_jsonl
from tests.services.postgres import postgres_server  # noqa: F401
from tests.test_cli import cli
from tests.test_postgres import rows, unique_table

PIPELINE = REPO / "examples" / "perl-pipeline"

# The example's own sidecar.yaml, on a free port and a temporary directory, batching quickly.
CONFIG = (
    (PIPELINE / "sidecar.yaml").read_text()
    .replace("port: 17000", "port: 0")
    .replace("base_path: ./var/log", "base_path: {base}")
    .replace("create_base_path: true", "create_base_path: true\n    batch: {{timeout: 0.05}}")
)
assert "{base}" in CONFIG and "port: 0" in CONFIG


def run_pipeline(sidecar: SidecarProcess, work, queue: str = "traced") -> list[str]:
    run = subprocess.run(
        ["bash", str(PIPELINE / "run-pipeline.sh")],
        env={**os.environ, "MONITORING_SIDECAR": f"127.0.0.1:{sidecar.port}", "PIPELINE_WORK": str(work), "PIPELINE_FILES": "3", "PIPELINE_QUEUE": queue},
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )
    assert run.returncode == 0, run.stderr
    jobs = [line.split()[1] for line in run.stdout.splitlines() if line.startswith("job ")]
    assert len(jobs) == 3
    stats = sidecar.wait_for(lambda s: s["received"] > 0 and all(b["queued"] == 0 for b in s["backends"]) and s["received"] == s["routed"], what="everything delivered")
    assert stats["decode_errors"] == {}
    return jobs


def test_the_seeds_perl_services_join_up_by_job_and_trace(tmp_path):
    sidecar = SidecarProcess(tmp_path, CONFIG.format(base=tmp_path / "out"))
    shutil.copytree(PIPELINE / "routes.d", sidecar.routes_dir, dirs_exist_ok=True)
    sidecar.start()
    try:
        jobs = run_pipeline(sidecar, tmp_path / "work")
        # the unified view: `trace` shows the three services of each job, in order
        for job in jobs:
            shown = cli("trace", job, "--url", f"http://127.0.0.1:{sidecar.http_port}")
            assert shown.returncode == 0, shown.stderr
            lines = shown.stdout.splitlines()
            assert lines[0] == f"{job}:"
            assert [line.split(":")[0].split()[-1] for line in lines[1:4]] == ["file-receiver", "queue-service", "db-loader"]
            assert lines[-1].strip().startswith("Total: ")
    finally:
        assert sidecar.stop() == 0

    out = tmp_path / "out"
    by_source = {source: read_jsonl(out / f"{source}.jsonl") for source in ("config-service", "file-receiver", "queue-service", "db-loader")}
    for source, messages in by_source.items():  # each message once (no second rule writes the file)
        lines = [json.dumps(m, sort_keys=True) for m in messages]
        assert len(set(lines)) == len(lines), f"{source}: {len(lines) - len(set(lines))} lines written twice"
    # config-service went only where its route says: its own file, nowhere else
    assert by_source["config-service"] and all(m["source"] == "config-service" for m in by_source["config-service"])
    assert sorted(p.name for p in out.iterdir()) == ["config-service.jsonl", "db-loader.jsonl", "file-receiver.jsonl", "queue-service.jsonl"]
    assert all("config-service" not in m["source"] for s in ("file-receiver", "queue-service", "db-loader") for m in by_source[s])

    per_job = collections.defaultdict(list)
    for source in ("file-receiver", "queue-service", "db-loader"):
        for message in by_source[source]:
            job = (message.get("context") or {}).get("job_id")
            if job is None and message["type"] == "progress":
                job = message["data"]["job_id"]
            per_job[job].append(message)
    assert set(per_job) == set(jobs), f"messages without a job or of unknown jobs: {set(per_job) - set(jobs)}"
    for job in jobs:
        messages = per_job[job]
        assert {m["source"] for m in messages} == {"file-receiver", "queue-service", "db-loader"}, job
        assert len({m.get("trace_id") for m in messages}) == 1, f"{job}: several traces {[(m['source'], m.get('trace_id')) for m in messages]}"
        loaded = [m for m in messages if m["source"] == "db-loader" and m["type"] == "metric" and m["data"]["name"] == "rows_loaded"]
        assert len(loaded) == 1 and loaded[0]["data"]["value"] in (100, 200, 300)
        # db_loader is one thread: its CPU reading is in percent of one core (it was 1336.9)
        [resource] = [m["data"] for m in messages if m["type"] == "resource"]
        assert 0 <= resource["cpu_percent"] <= 100, resource
        progress = [m["data"]["percent"] for m in messages if m["type"] == "progress"]
        assert progress == [0, 100]
        spans = {m["data"]["name"]: m for m in messages if m["type"] == "span" and m["data"]["phase"] == "start"}
        assert spans["load_data"]["parent_span_id"] == spans["process_job"]["span_id"]


def test_with_a_queue_that_carries_only_the_job_each_job_still_joins_up(tmp_path):
    # The seed's queue-service as written (start_span, then set_context) over a queue of bare
    # {id, file}: by the SDKs' rule for context and spans, no message names another job.
    sidecar = SidecarProcess(tmp_path, CONFIG.format(base=tmp_path / "out"))
    shutil.copytree(PIPELINE / "routes.d", sidecar.routes_dir, dirs_exist_ok=True)
    sidecar.start()
    try:
        jobs = run_pipeline(sidecar, tmp_path / "work", queue="plain")
        views = {}
        for job in jobs:
            status, body = sidecar.http(f"/api/jobs/{job}")
            assert status == 200, body
            views[job] = json.loads(body)
    finally:
        assert sidecar.stop() == 0

    out = tmp_path / "out"
    messages = [m for source in ("file-receiver", "queue-service", "db-loader") for m in read_jsonl(out / f"{source}.jsonl")]
    jobs_of_trace = collections.defaultdict(set)
    for message in messages:
        job = (message.get("context") or {}).get("job_id")
        if message["type"] == "progress":
            assert job == message["data"]["job_id"], f"a progress message of {message['data']['job_id']} names {job}"
        if job is None:
            # Only what queue-service sends outside a job's context: each process_job start
            # (before set_context) and jobs_processed (after end_span).
            assert message["source"] == "queue-service", message
            assert (message["type"], message["data"].get("name")) in (("span", "process_job"), ("metric", "jobs_processed")), message
        elif message.get("trace_id"):
            jobs_of_trace[message["trace_id"]].add(job)
        assert job in (None, *jobs), message
    assert all(len(named) == 1 for named in jobs_of_trace.values()), f"a trace names several jobs: {dict(jobs_of_trace)}"

    for job, view in views.items():
        assert [s["source"] for s in view["sources"]] == ["file-receiver", "queue-service", "db-loader"], job
        assert len(view["trace_ids"]) == 2, f"{job}: the delivery's trace and the job's: {view['trace_ids']}"
        (root,) = [span for span in view["spans"] if span["name"] == "process_job"]
        assert root["start"] and root["end"] and root["status"] == "success", root
        assert [child["name"] for child in root["children"]] == ["load_data"], root
        started = [m for m in messages if m["type"] == "span" and m["span_id"] == root["span_id"] and m["data"]["phase"] == "start"]
        assert len(started) == 1 and "context" not in started[0], "the start of process_job names no job, not the previous one"


POSTGRES_ROUTES = """
# The seed: queue-service, file-receiver and db-loader also go to TimescaleDB/PostgreSQL.
queue-service: [{backend: timescaledb}]
file-receiver: [{backend: timescaledb}]
db-loader: [{backend: timescaledb}]
"""


def test_with_a_connection_string_the_seeds_services_write_to_postgresql(tmp_path, postgres_server):
    table = unique_table()
    config = CONFIG.format(base=tmp_path / "out") + f"""
  timescaledb:
    type: postgres
    connection_string: "${{PG_URL}}"
    table: {table}
    batch: {{timeout: 0.05}}
"""
    sidecar = SidecarProcess(tmp_path, config, env={"PG_URL": postgres_server.url()})
    shutil.copytree(PIPELINE / "routes.d", sidecar.routes_dir, dirs_exist_ok=True)
    sidecar.write_route("90-postgres.yaml", POSTGRES_ROUTES)
    sidecar.start()
    try:
        jobs = run_pipeline(sidecar, tmp_path / "work")
    finally:
        assert sidecar.stop() == 0
    for job in jobs:
        sources = [s for (s,) in rows(postgres_server, f"SELECT DISTINCT source FROM {table} WHERE job_id = %s ORDER BY 1", job)]
        assert sources == ["db-loader", "file-receiver", "queue-service"]
        loaded = rows(postgres_server, f"SELECT value FROM {table} WHERE job_id = %s AND type = 'metric' AND name = 'rows_loaded'", job)
        assert len(loaded) == 1 and loaded[0][0] in (100, 200, 300)
    assert rows(postgres_server, f"SELECT count(*) FROM {table} WHERE source = 'config-service'") == [(0,)]
