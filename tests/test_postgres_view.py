"""The unified view answered from PostgreSQL: a job that crossed two sidecars shows whole, and a
job gone from the live index is still found."""

import json

from tests.harness import SidecarProcess
from tests.services.postgres import postgres_server  # noqa: F401
from tests.test_postgres import unique_table
from tests.test_view import EXPECTED_TREE, TRACE, assert_each_job_has_its_own_process_job, queue_service_jobs, seed_job

CONFIG = """
tcp: {{host: 127.0.0.1, port: 0}}
index: {{max_jobs: 2, max_traces: 2}}
backends:
  db:
    type: postgres
    connection_string: "${{PG_URL}}"
    table: {table}
    batch: {{timeout: 0.05}}
routing:
  all: [{{backend: db}}]
"""


def test_a_job_across_two_sidecars_and_out_of_the_live_index_is_answered_from_the_database(postgres_server, tmp_path):
    table = unique_table()
    env = {"PG_URL": postgres_server.url()}
    hosts = []
    for name in ("host-a", "host-b"):
        (tmp_path / name).mkdir()
        hosts.append(SidecarProcess(tmp_path / name, CONFIG.format(table=table), env=env).start())
    host_a, host_b = hosts
    try:
        job = seed_job()
        # file-receiver ran on host A; queue-service and db-loader on host B
        host_a.send([m for m in job if m["source"] == "file-receiver"])
        host_b.send([m for m in job if m["source"] != "file-receiver"])
        for sidecar, count in ((host_a, 3), (host_b, 9)):
            sidecar.wait_for(lambda s, count=count: s["backends"] and s["backends"][0]["delivered"] == count, what=f"{count} rows written")
        status, body = host_a.http("/api/jobs/job-12345")
        view = json.loads(body)
        assert status == 200 and view["origin"].startswith("database")
        assert [s["source"] for s in view["sources"]] == ["file-receiver", "queue-service", "db-loader"]
        status, body = host_a.http(f"/api/traces/{TRACE}")
        assert json.loads(body)["spans"][0]["children"][0]["name"] == "load_data"
        # push job-12345 out of host B's live index (it keeps two jobs): the database still has it
        for n in range(3):
            host_b.send(seed_job(f"job-other-{n}", f"{n + 1:032x}"))
        host_b.wait_for(lambda s: s["correlator"]["index"]["evicted_jobs"] >= 2, what="eviction")
        from tests.test_cli import cli

        result = cli("trace", "job-12345", "--url", f"http://127.0.0.1:{host_b.http_port}")
        assert result.returncode == 0, result.stderr
        assert result.stdout.rstrip("\n") == EXPECTED_TREE + ", completed"  # `trace` adds the status
    finally:
        for sidecar in hosts:
            assert sidecar.stop() == 0


def test_a_job_read_back_from_the_database_holds_its_traces_messages_that_named_no_job(postgres_server, tmp_path):
    table = unique_table()
    sidecar = SidecarProcess(tmp_path, CONFIG.format(table=table), env={"PG_URL": postgres_server.url()}).start()
    try:
        messages = queue_service_jobs(3)
        sidecar.send(messages)
        sidecar.wait_for(lambda s: s["backends"] and s["backends"][0]["delivered"] == len(messages), what="every row written")
        # The live index keeps two jobs: job-1 is answered by the database alone.
        for n in (1, 2, 3):
            status, body = sidecar.http(f"/api/jobs/job-{n}")
            view = json.loads(body)
            assert status == 200 and view["origin"].startswith("database"), view.get("origin")
            assert_each_job_has_its_own_process_job(view, n)
    finally:
        assert sidecar.stop() == 0
