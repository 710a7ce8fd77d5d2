"""The S3 backend against a real S3-compatible store (SeaweedFS on 127.0.0.1), read back with boto3."""

import gzip
import re
import signal
import uuid

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.backends.s3 import object_key, split_lines
from sidecar.backends.s3_layout import source_prefix
from sidecar.naming import S3_KEY, escaped
from sidecar.config import ConfigError, load_config
from tests.harness import SidecarProcess, event, wait_until
from tests.services.s3 import s3_server  # noqa: F401 (fixture)

KEY = re.compile(r"(?P<prefix>.*?)(?P<source>[A-Za-z0-9._!*'()%-]+)/(?P<y>\d{4})/(?P<m>\d{2})/(?P<d>\d{2})/(?P<h>\d{2})/(?P<stamp>\d{8}T\d{9}Z)-[0-9a-f]{32}\.jsonl(?P<gz>\.gz)?")


@given(st.text(max_size=300), st.sampled_from(["", "logs/", "a/b-", "raw/{source}/v1/", "x/{source}-"]))
@settings(max_examples=300)
def test_any_source_name_makes_a_key_inside_the_prefix_with_the_partition_levels(source, prefix):
    key = object_key(prefix, source, "2025-10-20T10:30:45.123Z", unique="0" * 32, gzipped=False)
    head = source_prefix(prefix, source)
    assert key.startswith(head) and head.startswith(prefix.partition("{source}")[0])
    rest = key[len(head):].split("/")
    assert len(rest) == 5 and rest[:4] == ["2025", "10", "20", "10"]
    # the source is in the head once, as one component or part of one, never a climb out
    assert all(part not in ("", ".", "..") and not part.startswith(".") for part in head.split("/")[:-1] if part)
    assert head.count(escaped(source, S3_KEY)) >= 1 and all(c.isascii() and c.isprintable() for c in key)


@pytest.mark.parametrize(("prefix", "head"), [
    ("", "config-service/"),
    ("logs/", "logs/config-service/"),
    ("config-service/", "config-service/"),  # the seed's route: not config-service/config-service/
    ("logs/config-service/", "logs/config-service/"),
    ("config-service", "config-serviceconfig-service/"),  # no slash: a name prefix, not a level
    ("raw/{source}/v1/", "raw/config-service/v1/"),
])
def test_a_prefix_that_names_the_source_gets_no_second_source_level(prefix, head):
    assert source_prefix(prefix, "config-service") == head
    assert object_key(prefix, "config-service", "2025-10-20T10:30:45.123Z", unique="0" * 32, gzipped=True) == f"{head}2025/10/20/10/20251020T103045123Z-{'0' * 32}.jsonl.gz"


@given(st.lists(st.binary(min_size=1, max_size=50).map(lambda b: b + b"\n"), max_size=60), st.integers(1, 200))
def test_split_lines_keeps_order_and_size_limits(lines, limit):
    ranges = split_lines(lines, limit)
    assert [i for start, end in ranges for i in range(start, end)] == list(range(len(lines)))
    for start, end in ranges:
        assert end - start == 1 or sum(map(len, lines[start:end])) <= limit


def test_a_prefix_cannot_climb_out(write):
    config = write("sidecar.yaml", "backends:\n  s3:\n    type: s3\n    bucket: b\n    prefix: ../other/\n")
    with pytest.raises(ConfigError, match=r"sidecar.yaml:5: backends.s3.prefix: prefix '../other/' must be relative"):
        load_config(config, None)


S3_CONFIG = """
tcp: {{host: 127.0.0.1, port: 0}}
shutdown: {{connection_grace: 0.2, drain_timeout: 20}}
backends:
  s3:
    type: s3
    region: us-east-1
    endpoint_url: {endpoint}
    bucket: {bucket}
    prefix: logs/
    gzip: {gzip}
    max_object_size: {max_object_size}
    batch: {{timeout: {batch_timeout}}}
    retry: {{initial_backoff: 0.05, max_backoff: 0.5}}
    circuit_breaker: {{failure_threshold: 3, reset_timeout: 0.3, max_reset_timeout: 1}}
routing:
  all:
    - backend: s3
"""


@pytest.fixture
def s3_sidecar(tmp_path, s3_server):
    started = []

    def start(bucket=None, gzip=True, max_object_size="16KiB", batch_timeout=0.5, create_bucket=True):
        bucket = bucket or f"test-{uuid.uuid4().hex[:12]}"
        if create_bucket:
            s3_server.create_bucket(bucket)
        text = S3_CONFIG.format(endpoint=s3_server.endpoint_url, bucket=bucket, gzip=str(gzip).lower(), max_object_size=max_object_size, batch_timeout=batch_timeout)
        env = {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key, "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_EC2_METADATA_DISABLED": "true"}
        sidecar = SidecarProcess(tmp_path, text, env=env).start()
        started.append(sidecar)
        return sidecar, bucket

    yield start
    for sidecar in started:
        if sidecar.process.poll() is None:
            sidecar.stop(signal.SIGKILL)


def read_objects(s3_server, bucket: str) -> dict[str, list[dict]]:
    """key -> messages, every object decompressed and parsed."""
    found = {}
    for key, body in s3_server.objects(bucket).items():
        if key.endswith(".gz"):
            body = gzip.decompress(body)
        assert body.endswith(b"\n")
        found[key] = [orjson.loads(line) for line in body.splitlines()]
    return found


def test_objects_land_under_partitioned_keys_gzipped_split_by_size_each_message_once(s3_sidecar, s3_server):
    sidecar, bucket = s3_sidecar()
    sources = {"billing": 1500, "../../etc/passwd": 300}
    for source, count in sources.items():
        sidecar.send([event(source, i) for i in range(count)])
    sidecar.wait_for(lambda s: s["backends"][0]["delivered"] == 1800, timeout=30, what="all delivered")
    objects = read_objects(s3_server, bucket)
    raw = s3_server.objects(bucket)
    by_source: dict[str, list[int]] = {}
    for key, messages in objects.items():
        match = KEY.fullmatch(key)
        assert match and match["prefix"] == "logs/" and match["gz"], key
        # the partition is the hour the batch's first message was received
        received = messages[0]["received_at"]
        assert (match["y"], match["m"], match["d"], match["h"]) == (received[:4], received[5:7], received[8:10], received[11:13])
        assert len(gzip.decompress(raw[key])) <= 16 * 1024 or len(messages) == 1
        assert {m["source"] for m in messages} == {messages[0]["source"]}
        assert match["source"] == {"billing": "billing", "../../etc/passwd": "%2E.%2F..%2Fetc%2Fpasswd"}[messages[0]["source"]]
        by_source.setdefault(messages[0]["source"], []).extend(m["context"]["seq"] for m in messages)
    for source, count in sources.items():
        assert sorted(by_source[source]) == list(range(count)), f"{source}: every message exactly once"
    assert len(objects) >= 1800 * 200 // (16 * 1024), "large batches are split into objects of at most max_object_size"
    assert sidecar.stop() == 0


def test_few_messages_wait_for_the_age_threshold_and_make_one_object(s3_sidecar, s3_server):
    sidecar, bucket = s3_sidecar(gzip=False, max_object_size="8MiB", batch_timeout=3)
    sidecar.send([event("slow", i) for i in range(40)])
    sidecar.wait_for(lambda s: s["received"] == 40, what="received")
    assert s3_server.objects(bucket) == {}, "no object before the age threshold"
    sidecar.wait_for(lambda s: s["backends"][0]["delivered"] == 40, timeout=20, what="flush by age")
    objects = read_objects(s3_server, bucket)
    assert len(objects) == 1 and [m["context"]["seq"] for m in next(iter(objects.values()))] == list(range(40))
    assert next(iter(objects)).endswith(".jsonl")
    assert sidecar.stop() == 0


def test_a_stopped_server_loses_nothing_and_a_missing_bucket_opens_the_circuit(s3_sidecar, s3_server):
    sidecar, bucket = s3_sidecar(batch_timeout=0.2, create_bucket=False)
    sidecar.send([event("svc", i) for i in range(100)])
    stats = sidecar.wait_for(lambda s: s["backends"][0]["circuit_opened"] >= 1, timeout=20, what="the circuit to open on a missing bucket")
    assert "NoSuchBucket" in stats["backends"][0]["last_error"] and stats["backends"][0]["delivered"] == 0
    # Open, the backend asks HeadBucket (held off, doubling: the bucket is for a person to make).
    stats = sidecar.wait_for(lambda s: s["backends"][0]["probes"] >= 1, timeout=20, what="a probe of the missing bucket")
    assert "HeadBucket" in stats["backends"][0]["last_error"] and stats["backends"][0]["retries"] == 1
    s3_server.create_bucket(bucket)
    sidecar.wait_for(lambda s: s["backends"][0]["delivered"] == 100, timeout=20, what="delivery once the bucket exists")

    s3_server.stop()
    try:
        sidecar.send([event("svc", i) for i in range(100, 300)])
        sidecar.wait_for(lambda s: s["backends"][0]["retries"] >= 3 and s["backends"][0]["queued"] == 200, timeout=20, what="retries while the server is down")
        probes = sidecar.backend("s3")["probes"]
        sidecar.wait_for(lambda s: s["backends"][0]["probes"] >= probes + 2, timeout=20, what="probes while the server is down")
    finally:
        s3_server.start()
    sidecar.wait_for(lambda s: s["backends"][0]["delivered"] == 300, timeout=30, what="delivery after the server is back")
    seqs = sorted(m["context"]["seq"] for messages in read_objects(s3_server, bucket).values() for m in messages)
    assert seqs == list(range(300)), "nothing lost, nothing written twice"
    assert sidecar.backend("s3")["dropped"] == {}
    assert sidecar.stop() == 0
    assert s3_server.secret_key not in sidecar.log()


def test_shutdown_flushes_what_waits_for_the_age_threshold(s3_sidecar, s3_server):
    sidecar, bucket = s3_sidecar(batch_timeout=600)
    sidecar.send([event("late", i) for i in range(25)])
    sidecar.wait_for(lambda s: s["received"] == 25, what="received")
    assert sidecar.stop() == 0
    wait_until(lambda: read_objects(s3_server, bucket), timeout=5, what="the object written at shutdown")
    seqs = [m["context"]["seq"] for messages in read_objects(s3_server, bucket).values() for m in messages]
    assert seqs == list(range(25))


def test_with_default_settings_a_10_s_outage_at_5000_per_second_loses_nothing_and_delivery_resumes_at_once(tmp_path, s3_server):
    """No delivery setting given (batches of 20,000 messages, 8 MiB or 60 s): SeaweedFS stopped for
    10 s under 5,000 messages/s. The disk queue holds what waits; the HeadBucket probe sees the
    server back within its 0.5 s interval; after SIGTERM every message is in the bucket."""
    from tests.harness import SteadySender, outage

    bucket = s3_server.create_bucket(f"test-{uuid.uuid4().hex[:12]}")
    config = f"""
tcp: {{host: 127.0.0.1, port: 0}}
backends:
  s3: {{type: s3, region: us-east-1, endpoint_url: "{s3_server.endpoint_url}", bucket: {bucket}}}
routing:
  all: [{{backend: s3}}]
"""
    env = {"AWS_ACCESS_KEY_ID": s3_server.access_key, "AWS_SECRET_ACCESS_KEY": s3_server.secret_key, "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_EC2_METADATA_DISABLED": "true"}
    sidecar = SidecarProcess(tmp_path, config, env=env).start()
    sender = SteadySender(sidecar, "svc", per_second=5000)
    sender.start()
    try:
        sidecar.wait_for(lambda s: s["backends"][0]["delivered"] >= 20_000, timeout=30, what="a first object")
        held, resumed_after = outage(sidecar, "s3", s3_server.stop, s3_server.start)
    finally:
        sent = sender.stop()
    sidecar.wait_for(lambda s: s["received"] == sent, what="everything received")
    assert sidecar.stop() == 0  # SIGTERM flushes what waits for the 60 s timer
    final = sidecar.stats()["backends"][0]
    assert held > 40_000 and final["dropped"] == {} and final["delivered"] == sent, final
    seqs = [m["context"]["seq"] for messages in read_objects(s3_server, bucket).values() for m in messages]
    assert sorted(set(seqs)) == list(range(sent)), "nothing lost"
    print(f"{len(seqs) - sent} delivered twice (at least once)")
    assert resumed_after < 1.0, f"delivery resumed {resumed_after:.2f} s after SeaweedFS was back"
