"""The seed's configuration example run as written, its backends pointed at local servers through
the environment only, and the seed's "add a CloudWatch route at run time" scenario for real.

The seed's file is used unchanged: `--listen` replaces its fixed 0.0.0.0:17000, and the standard
AWS variables (AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL_CLOUDWATCH_LOGS, AWS_ACCESS_KEY_ID, ...)
send its `s3` and `cloudwatch` backends to SeaweedFS and moto. Its `timescaledb` backend has a
literal connection string to localhost:5432 and its `nfs-file` backend an absolute base_path,
/mnt/nas/logs, that does not exist here (and is not created by the tests): those two are only
checked to be retried and reported, never to lose or invent data.
"""

import re
import time

import orjson

from tests.conftest import SEED_CONFIG
from tests.harness import SidecarProcess, SteadySender, event, read_jsonl, seqs, wait_until
from tests.services.cloudwatch import ACCESS_KEY, SECRET_KEY, cloudwatch_server, logs_proxy  # noqa: F401 (fixtures)
from tests.services.s3 import s3_server  # noqa: F401 (fixture)


def seed_sidecar(tmp_path, env: dict) -> SidecarProcess:
    """The sidecar on the seed's file as written, listening on a free loopback port."""
    return SidecarProcess(tmp_path, SEED_CONFIG.read_text(), env=env, extra_args=["--listen", "127.0.0.1:0"]).start()


def now_event(source: str, seq: int, **extra) -> dict:
    """harness.event without its fixed 2025 timestamp: the sidecar stamps it on arrival, so
    CloudWatch's 14-day window never refuses it."""
    message = event(source, seq, **extra)
    del message["timestamp"]
    return message


def aws_environ(s3_server, logs_endpoint: str) -> dict:
    return {
        **s3_server.environ(),
        "AWS_ENDPOINT_URL_CLOUDWATCH_LOGS": logs_endpoint,
        "AWS_CONFIG_FILE": "/nonexistent",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def by_name(stats: dict, name: str) -> dict:
    found = [b for b in stats["backends"] if b["backend"] == name or b["backend"].startswith(name + "[")]
    return found[0] if found else {}


def test_the_seed_config_as_written_puts_each_source_where_its_text_says(tmp_path, s3_server, cloudwatch_server, logs_proxy):
    s3_server.create_bucket("monitoring-logs")
    sidecar = seed_sidecar(tmp_path, aws_environ(s3_server, logs_proxy.endpoint_url))
    try:
        started = time.time()
        sidecar.send([now_event("config-service", i) for i in range(30)])
        sidecar.send([now_event("file-receiver", i) for i in range(40)])
        sidecar.send([now_event("queue-service", i) for i in range(20)])
        sidecar.send([{"source": "queue-service", "type": "metric", "data": {"name": "queue.depth", "value": i}, "context": {"seq": 100 + i}} for i in range(5)])
        # default -> CloudWatch /app/monitoring, one stream per source
        stats = sidecar.wait_for(lambda s: by_name(s, "cloudwatch").get("delivered") == 40, timeout=20, what="file-receiver in CloudWatch")
        # queue-service -> nfs-file (events only): /mnt/nas/logs is not mounted here, so it retries
        stats = sidecar.wait_for(lambda s: by_name(s, "nfs-file").get("retries", 0) >= 2, timeout=20, what="nfs-file retried")
        nfs = by_name(stats, "nfs-file")
        assert nfs["routed"] == 20 and nfs["delivered"] == 0 and nfs["queued"] == 20 and not nfs["dropped"]
        assert "/mnt/nas/logs does not exist" in nfs["last_error"]
        timescale = by_name(stats, "timescaledb")
        # queue-service's metrics and events; localhost:5432 is not a server these tests start
        assert timescale["routed"] == 25 and timescale["delivered"] + timescale["queued"] + sum(timescale["dropped"].values()) == 25
        # config-service -> S3 only; the seed's s3 batches slowly (60 s), so shutdown flushes it
        assert by_name(stats, "s3")["routed"] == 30 and by_name(stats, "s3")["queued"] == 30
    finally:
        sidecar.stop(timeout=40)
    final = sidecar.stats()
    assert by_name(final, "s3")["delivered"] == 30 and by_name(final, "cloudwatch")["delivered"] == 40
    assert re.search(r"undelivered messages: .*nfs-file\[path\]=20", sidecar.log()), "what nfs-file could not write is reported at shutdown"

    objects = s3_server.objects("monitoring-logs")
    assert objects and all(re.fullmatch(r"config-service/\d{4}/\d{2}/\d{2}/\d{2}/\d{8}T\d{9}Z-[0-9a-f]{32}\.jsonl", k) for k in objects), sorted(objects)
    in_s3 = [orjson.loads(line) for body in objects.values() for line in body.splitlines()]
    assert sorted(m["context"]["seq"] for m in in_s3) == list(range(30)) and {m["source"] for m in in_s3} == {"config-service"}

    assert cloudwatch_server.streams("/app/monitoring") == ["file-receiver"], "config-service and queue-service have rules of their own"
    in_cloudwatch = [orjson.loads(e["message"]) for e in cloudwatch_server.events("/app/monitoring", "file-receiver")]
    assert [m["context"]["seq"] for m in in_cloudwatch] == list(range(40))
    assert all(body["logGroupName"] == "/app/monitoring" for body in logs_proxy.recorded())
    assert time.time() - started < 60


RELOAD_CONFIG = """
tcp: {{host: 127.0.0.1, port: 0}}
reload: {{poll_interval: 0.1, settle_delay: 0.1}}
shutdown: {{connection_grace: 0.2, drain_timeout: 20}}
backends:
  nfs-file:
    type: filesystem
    base_path: {base}
    create_base_path: true
    fsync: never
    batch: {{max_messages: 500, timeout: 0.1}}
    queue: {{max_messages: 100000, when_full: block}}
  cloudwatch:
    type: cloudwatch
    region: us-east-1
    batch: {{timeout: 0.5}}
"""


def test_adding_the_cloudwatch_route_to_queue_service_under_load(tmp_path, cloudwatch_server):
    """The seed's "Runtime Configuration Changes": a drop-in gains the cloudwatch rule while
    queue-service sends; its new messages reach /debug/queue-service within seconds, and the
    file backend it already had loses nothing. (nfs-file is a temporary directory here.)"""
    env = {"AWS_ENDPOINT_URL_CLOUDWATCH_LOGS": cloudwatch_server.endpoint_url, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent"}
    routes = {"50-queue-service.yaml": "queue-service:\n  - backend: nfs-file\n    config: {path: queue-service.jsonl}\n"}
    sidecar = SidecarProcess(tmp_path, RELOAD_CONFIG.format(base=tmp_path / "nas"), routes, env).start()
    sender = SteadySender(sidecar, "queue-service", per_second=300, make_message=now_event)
    sender.start()
    try:
        wait_until(lambda: sender.sent > 200, what="load to run")
        edited_at = time.time()
        sidecar.write_route(
            "50-queue-service.yaml",
            """
            queue-service:
              - backend: nfs-file
                config: {path: queue-service.jsonl}
              - backend: cloudwatch   # NEW: debugging copy
                enabled: true
                config:
                  log_group: /debug/queue-service
            """,
        )
        first = wait_until(lambda: cloudwatch_server.streams("/debug/queue-service") and cloudwatch_server.events("/debug/queue-service", "queue-service")[:1], timeout=10, what="queue-service messages in /debug/queue-service")
        assert orjson.loads(first[0]["message"])["sent_at"] - edited_at < 5
        time.sleep(0.5)
    finally:
        sent = sender.stop()
    stats = sidecar.wait_for(lambda s: s["received"] == sent and all(b["queued"] == 0 for b in s["backends"]), timeout=20, what="everything sent handled")
    assert stats["reloads"] == 1 and stats["reload_failures"] == 0
    assert seqs(read_jsonl(tmp_path / "nas" / "queue-service.jsonl")) == list(range(sent)), "the file route lost or duplicated messages"
    copied = [orjson.loads(e["message"])["context"]["seq"] for e in cloudwatch_server.events("/debug/queue-service", "queue-service")]
    assert copied and sorted(copied) == list(range(min(copied), sent)), "the new route has gaps or duplicates"
    assert by_name(stats, "cloudwatch")["dropped"] == {}
    assert sidecar.stop() == 0
