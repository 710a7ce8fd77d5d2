"""No single input stops the sidecar or costs another message.

Each input here once ended the process, closed its connection, or lost the messages around it.
Against a real sidecar on each decode path: the input is sent alone, a good message follows on
the same connection, and the test asserts the sidecar still runs, the good message is
delivered and the input's reason is counted in /metrics.
"""

import math
import re
import signal
import socket
import time

import msgpack
import orjson
import pytest

from sidecar.protocol import NATIVE_AVAILABLE

from tests.harness import SidecarProcess, SteadySender, read_jsonl, wait_until

CONFIG = """
tcp: {{host: 127.0.0.1, port: 0}}
pipeline: {{native: {native}}}
backends:
  files: {{type: filesystem, base_path: {base}, create_base_path: true, fsync: never, batch: {{timeout: 0.05}}}}
routing:
  all: [{{backend: files}}]
"""

TRACE = "0123456789abcdef0123456789abcdef"
NOW = "2026-12-02T07:00:00.000Z"


def span_end(source: str, timestamp=NOW, duration=1, **extra) -> dict:
    message = {
        "source": source, "type": "span", "timestamp": timestamp, "trace_id": TRACE, "span_id": "0123456789abcdef",
        "data": {"name": "x", "phase": "end", "status": "ok", "duration_ms": duration},
    }
    message.update(extra)
    return message


def good(source: str, seq: int = 0) -> dict:
    return {"source": source, "type": "event", "timestamp": NOW, "data": {"level": "info", "message": f"good {seq}"}}


def nested(depth: int) -> dict:
    """A valid message `depth` levels deep (the message itself is level 1)."""
    value: object = "leaf"
    for _ in range(depth - 2):
        value = [value]
    return {"source": "deep", "type": "event", "timestamp": NOW, "data": {"level": "info", "message": "m", "extra": value}}


def encode(message: dict, encoding: str) -> bytes:
    if encoding == "msgpack":
        return msgpack.packb(message)
    return orjson.dumps(message) + b"\n"


def deep_json(depth: int) -> bytes:
    """A line nested `depth` levels, beyond what orjson writes (so not built through it)."""
    inner = b"[" * (depth - 2) + b'"leaf"' + b"]" * (depth - 2)
    return b'{"source":"deep","type":"event","timestamp":"' + NOW.encode() + b'","data":{"level":"info","message":"m","extra":' + inner + b"}}\n"


def deep_msgpack(depth: int) -> bytes:
    """A MessagePack message nested `depth` levels (the unpacker's own stack stops at 1,024)."""
    return (
        b"\x84\xa6source\xa4deep\xa4type\xa5event\xa9timestamp" + msgpack.packb(NOW)
        + b"\xa4data\x83\xa5level\xa4info\xa7message\xa1m\xa5extra" + b"\x91" * (depth - 2) + b"\xa4leaf"
    )


class Sidecar:
    """One sidecar of the module, on one decode path; every test uses sources of its own."""

    def __init__(self, process: SidecarProcess, base):
        self.process = process
        self.base = base

    def delivered(self, source: str) -> list[dict]:
        return read_jsonl(self.base / f"{source}.jsonl")

    def send(self, payload: bytes, then: bytes = b"") -> None:
        """`payload`, then `then` on the same connection, which must stay open for it."""
        with self.process.connect() as conn:
            conn.sendall(payload + then)
            conn.shutdown(socket.SHUT_WR)
            assert conn.recv(4096) == b"", "the sidecar answered (it does only when it closes a connection for a reason)"

    def wait_delivered(self, source: str, count: int) -> list[dict]:
        self.assert_running()
        return wait_until(lambda: len(self.delivered(source)) >= count and self.delivered(source), 10, f"{count} from {source}")

    def assert_running(self) -> None:
        assert self.process.process.poll() is None, f"the sidecar exited:\n{self.process.log()[-3000:]}"

    def metric(self, name: str, **labels) -> float:
        """The sum of a metric's series that carry these labels (others, such as `input`, any)."""
        status, body = self.process.http("/metrics")
        assert status == 200
        total = 0.0
        for found in re.finditer(rf"^{re.escape(name)}(?:\{{(.*)\}})? (\S+)$", body.decode(), re.MULTILINE):
            series = dict(re.findall(r'(\w+)="([^"]*)"', found.group(1) or ""))
            if all(series.get(k) == str(v) for k, v in labels.items()):
                total += float(found.group(2))
        return total


PATHS = [pytest.param(True, id="native"), pytest.param(False, id="python")]


@pytest.fixture(scope="module", params=PATHS)
def sidecar(request, tmp_path_factory):
    if request.param and not NATIVE_AVAILABLE:
        pytest.skip("sidecar._native is not built")
    workdir = tmp_path_factory.mktemp("hostile")
    base = workdir / "out"
    process = SidecarProcess(workdir, CONFIG.format(native=str(request.param).lower(), base=base)).start()
    yield Sidecar(process, base)
    alive = process.process.poll() is None
    process.stop(signal.SIGKILL)
    assert alive, process.log()[-3000:]
    assert "Traceback" not in process.log(), process.log()[-3000:]


@pytest.mark.parametrize(
    "name, message",
    [
        ("go_zero_time", span_end("zero-time", timestamp="0001-01-01T00:00:00.000Z")),
        ("nanoseconds", span_end("nanoseconds", duration=6.4e13)),
        ("huge_duration", span_end("huge-duration", duration=1e20)),
        ("largest_duration", span_end("largest-duration", duration=1.7976931348623157e308)),
        ("job_only", {**span_end("job-only", duration=1e15, context={"job_id": "job-x"}), "trace_id": None}),
        ("epoch_year_1", span_end("epoch-year-1", timestamp=-62135596800)),
        ("year_9999_end", span_end("year-9999", timestamp="9999-12-31T23:59:59.999Z", duration=1e15)),
    ],
)
@pytest.mark.parametrize("encoding", ["json", "msgpack"])
def test_a_span_whose_start_falls_before_year_1_is_delivered_with_its_start_unknown(sidecar, name, message, encoding):
    message = {k: v for k, v in message.items() if v is not None}
    source = f"{message['source']}-{encoding}"
    message["source"] = source
    sidecar.send(encode(message, encoding), encode(good(source), encoding))
    delivered = sidecar.wait_delivered(source, 2)
    assert [m["type"] for m in delivered] == ["span", "event"]
    assert delivered[0]["data"]["duration_ms"] == message["data"]["duration_ms"]
    key = ("job_id", "job-x") if name == "job_only" else ("trace_id", TRACE)
    status, body = sidecar.process.http(f"/api/{'jobs' if key[0] == 'job_id' else 'traces'}/{key[1]}")
    assert status == 200, body


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("field", ["duration_ms", "metric_value", "percent", "free_form"])
def test_a_non_finite_msgpack_number_is_rejected_as_not_finite(sidecar, field, value):
    source = f"not-finite-{field}-{value}"
    message = {
        "span": span_end(source, duration=value),
        "metric": {"source": source, "type": "metric", "timestamp": NOW, "data": {"name": "rows", "value": value}},
        "progress": {"source": source, "type": "progress", "timestamp": NOW, "data": {"job_id": "j", "percent": value, "status": "x"}},
        "free_form": {**good(source), "context": {"ratio": [1, {"deep": value}]}},
    }[{"duration_ms": "span", "metric_value": "metric", "percent": "progress", "free_form": "free_form"}[field]]
    before = sidecar.metric("sidecar_decode_errors_total", reason="not_finite")
    sidecar.send(msgpack.packb(message), msgpack.packb(good(source)))
    assert [m["data"]["message"] for m in sidecar.wait_delivered(source, 1)] == ["good 0"]
    assert sidecar.metric("sidecar_decode_errors_total", reason="not_finite") == before + 1


@pytest.mark.parametrize("field", ["type", "level"])
@pytest.mark.parametrize("value", [{"job_id": 6}, ["event"]], ids=["object", "array"])
@pytest.mark.parametrize("encoding", ["json", "msgpack"])
def test_an_object_or_array_where_a_name_goes_is_rejected_with_its_reason(sidecar, field, value, encoding):
    # Found by make fuzz: an unhashable type or level reached a set lookup (internal_error).
    source = f"unhashable-{field}-{type(value).__name__}-{encoding}"
    message = good(source)
    if field == "type":
        message["type"] = value
    else:
        message["data"]["level"] = value
    reason = "unknown_type" if field == "type" else "invalid_field"
    before = sidecar.metric("sidecar_decode_errors_total", reason=reason)
    sidecar.send(encode(message, encoding), encode(good(source), encoding))
    assert [m["data"]["message"] for m in sidecar.wait_delivered(source, 1)] == ["good 0"]
    assert sidecar.metric("sidecar_decode_errors_total", reason=reason) == before + 1
    assert sidecar.metric("sidecar_decode_errors_total", reason="internal_error") == 0


@pytest.mark.parametrize(
    "timestamp",
    ["0000-01-01T00:00:00.000Z", "2026-13-01T00:00:00.000Z", "2026-02-29T00:00:00.000Z", "2026-12-02T24:00:00.000Z", "2026-12-31T23:59:60.000Z"],
)
@pytest.mark.parametrize("encoding", ["json", "msgpack"])
def test_a_timestamp_of_the_canonical_shape_but_no_real_time_is_rejected(sidecar, timestamp, encoding):
    # Found by make fuzz: year 0 passed the shape check and broke the view; month 13 would
    # have been refused by PostgreSQL with the whole batch around it.
    source = f"no-such-time-{timestamp[:13]}-{timestamp[17:19]}-{encoding}"
    before = sidecar.metric("sidecar_decode_errors_total", reason="invalid_timestamp")
    sidecar.send(encode({**good(source), "timestamp": timestamp}, encoding), encode(good(source), encoding))
    assert [m["data"]["message"] for m in sidecar.wait_delivered(source, 1)] == ["good 0"]
    assert sidecar.metric("sidecar_decode_errors_total", reason="invalid_timestamp") == before + 1


@pytest.mark.parametrize("depth", [65, 255, 1024, 1025, 2000])
def test_nesting_past_the_limit_is_rejected_as_too_deep_alone_or_among_others(sidecar, depth):
    source = f"deep-{depth}"
    line = deep_json(depth).replace(b'"deep"', f'"{source}"'.encode())
    before = sidecar.metric("sidecar_decode_errors_total", reason="too_deep")
    # Alone in its chunk, then in the majority of one, then among 30 good messages.
    sidecar.send(line, encode(good(source, 0), "json"))
    sidecar.send(line * 3 + encode(good(source, 1), "json"))
    sidecar.send(b"".join(encode(good(source, 2 + i), "json") for i in range(15)) + line + b"".join(encode(good(source, 17 + i), "json") for i in range(15)))
    delivered = sidecar.wait_delivered(source, 32)
    assert sorted(int(m["data"]["message"].split()[1]) for m in delivered) == list(range(32))
    assert sidecar.metric("sidecar_decode_errors_total", reason="too_deep") == before + 5


@pytest.mark.parametrize("depth", [64, 65, 255, 1025, 2000])
def test_msgpack_nesting_past_the_limit_is_rejected_as_too_deep(sidecar, depth):
    source = f"deep-msgpack-{depth}"
    message = deep_msgpack(depth).replace(b"\xa4deep", msgpack.packb(source))
    before = sidecar.metric("sidecar_decode_errors_total", reason="too_deep")
    sidecar.send(message, msgpack.packb(good(source)))
    delivered = sidecar.wait_delivered(source, 2 if depth <= 64 else 1)
    assert delivered[-1]["data"]["message"] == "good 0"
    assert sidecar.metric("sidecar_decode_errors_total", reason="too_deep") == before + (0 if depth <= 64 else 1)


def test_the_deepest_message_allowed_is_delivered_as_sent(sidecar):
    message = {**nested(64), "source": "deepest"}
    sidecar.send(encode(message, "json") + encode(message, "json"))
    delivered = sidecar.wait_delivered("deepest", 2)
    assert [m["data"]["extra"] for m in delivered] == [message["data"]["extra"]] * 2


MSGPACK_CASES = {
    # name: (bytes of one message, reason)
    "invalid_utf8_value": (b"\x83\xa6source\xa4bad1\xa4type\xa5event\xa4data\x81\xa7message\xa2\xff\xfe", "invalid_utf8"),
    "invalid_utf8_key": (b"\x82\xa6source\xa4bad2\xa2\xc3\x28\x01", "invalid_utf8"),
    "array_key": (b"\x82\xa6source\xa4bad3\x91\x01\x01", "invalid_key"),
    "map_key": (b"\x82\xa6source\xa4bad4\x81\xa1k\xa1v\x01", "invalid_key"),
    "integer_key": (msgpack.packb({**good("bad5"), "context": {1: "x"}}), "invalid_key"),
    "bytes_value": (msgpack.packb({**good("bad6"), "context": {"blob": b"\x00\x01"}}), "invalid_field"),
    "bad_timestamp_ext": (b"\x81\xa6source\xd4\xff\x00", "invalid_msgpack"),
    "not_a_map_inside": (msgpack.packb({**good("bad8"), "data": [1, 2, 3]}), "invalid_field"),
}


@pytest.mark.parametrize("name", MSGPACK_CASES)
def test_a_msgpack_message_that_cannot_be_built_costs_itself_alone(sidecar, name):
    payload, reason = MSGPACK_CASES[name]
    source = f"msgpack-{name}"
    before = sidecar.metric("sidecar_decode_errors_total", reason=reason)
    closed_before = sidecar.metric("sidecar_connections_closed_total", reason="invalid_msgpack")
    sidecar.send(msgpack.packb(good(source, 0)) + payload, msgpack.packb(good(source, 1)))
    assert [m["data"]["message"] for m in sidecar.wait_delivered(source, 2)] == ["good 0", "good 1"]
    assert sidecar.metric("sidecar_decode_errors_total", reason=reason) == before + 1
    assert sidecar.metric("sidecar_connections_closed_total", reason="invalid_msgpack") == closed_before


def test_a_msgpack_message_cut_off_by_the_end_of_the_stream_is_counted(sidecar):
    before = sidecar.metric("sidecar_decode_errors_total", reason="truncated")
    whole = msgpack.packb(good("cut-off"))
    sidecar.send(whole + whole[:-3])
    sidecar.send(msgpack.packb(good("cut-off", 1)))
    assert [m["data"]["message"] for m in sidecar.wait_delivered("cut-off", 2)] == ["good 0", "good 1"]
    assert sidecar.metric("sidecar_decode_errors_total", reason="truncated") == before + 1


def test_broken_msgpack_framing_closes_that_connection_alone_with_its_reason(sidecar):
    before = sidecar.metric("sidecar_connections_closed_total", reason="invalid_msgpack")
    with sidecar.process.connect() as conn:
        conn.sendall(msgpack.packb(good("framing")) + b"\x81\xa6source\xc1")
        assert conn.recv(4096).startswith(b"error: broken MessagePack framing")
    sidecar.send(msgpack.packb(good("framing", 1)))
    assert [m["data"]["message"] for m in sidecar.wait_delivered("framing", 2)] == ["good 0", "good 1"]
    assert sidecar.metric("sidecar_connections_closed_total", reason="invalid_msgpack") == before + 1
    assert "Traceback" not in sidecar.process.log()


@pytest.mark.parametrize("text", ["99999999999999999999", "18446744073709551616", "-9223372036854775809", "1" + "0" * 30])
def test_an_integer_beyond_64_bits_is_stored_the_same_way_on_both_paths(sidecar, text):
    source = f"big-int-{len(text)}-{text[0]}"
    line = b'{"source":"%s","type":"metric","timestamp":"%s","data":{"name":"n","value":%s,"tags":{"k":"v"}},"context":{"n":%s}}\n' % (
        source.encode(), NOW.encode(), text.encode(), text.encode()
    )
    sidecar.send(line + line)
    delivered = sidecar.wait_delivered(source, 2)
    written = (sidecar.base / f"{source}.jsonl").read_bytes().splitlines()
    # As orjson reads it: a float; and the same bytes whichever path decoded the line.
    assert delivered[0]["data"]["value"] == float(text) and delivered[0]["context"]["n"] == float(text)
    assert all(b'"value":' + orjson.dumps(float(text)) in line for line in written)


ISOLATION_CONFIG = """
tcp: {{host: 127.0.0.1, port: 0}}
backends:
  files:
    type: filesystem
    base_path: {base}
    path: "{{source}}/events.jsonl"
    fsync: never
    batch: {{timeout: 0.05, max_messages: 50}}
    retry: {{initial_backoff: 0.05, max_backoff: 0.2}}
    circuit_breaker: {{failure_threshold: 3, reset_timeout: 0.3}}
routing:
  all: [{{backend: files}}]
"""


def test_a_path_that_can_never_be_written_costs_its_own_messages_alone(tmp_path):
    base = tmp_path / "out"
    outside = tmp_path / "outside"
    outside.mkdir()
    (base / "directory" / "events.jsonl").mkdir(parents=True)  # a directory where the file goes
    (base / "symlink").mkdir()
    (base / "symlink" / "events.jsonl").symlink_to(outside / "stolen.jsonl")
    (base / "file").write_text("a file where the source's directory goes\n")
    (base / "escape").symlink_to(outside, target_is_directory=True)  # a directory leading out
    sidecar = SidecarProcess(tmp_path, ISOLATION_CONFIG.format(base=base)).start()
    try:
        bad = ["directory", "symlink", "file", "escape"]
        with sidecar.connect() as conn:
            for seq in range(2000):
                source = bad[seq // 2 % 4] if seq % 2 else "innocent"
                conn.sendall(orjson.dumps(good(source, seq)) + b"\n")
        stats = sidecar.wait_for(lambda s: s["backends"][0]["delivered"] == 1000 and sum(s["backends"][0]["dropped"].values()) == 1000, what="1,000 delivered and 1,000 rejected")
        files = stats["backends"][0]
        assert files["circuit"] == "closed" and files["circuit_opened"] == 0 and files["retries"] == 0
        assert files["dropped"] == {"path_is_directory": 250, "path_is_symlink": 250, "path_not_directory": 250, "path_escape": 250}
        assert files["rejected_by_source"] == {
            "directory": {"path_is_directory": 250}, "symlink": {"path_is_symlink": 250},
            "file": {"path_not_directory": 250}, "escape": {"path_escape": 250},
        }
        innocent = read_jsonl(base / "innocent" / "events.jsonl")
        assert [int(m["data"]["message"].split()[1]) for m in innocent] == list(range(0, 2000, 2))
        assert list(outside.iterdir()) == []
        assert "Traceback" not in sidecar.log()
        status, body = sidecar.http("/metrics")
        assert 'sidecar_backend_dropped_total{backend="files",reason="path_is_symlink",type="filesystem"} 250.0' in body.decode()
    finally:
        sidecar.stop(signal.SIGKILL)


RELOAD_CONFIG = """
tcp: {{host: 127.0.0.1, port: 0}}
reload: {{poll_interval: 0.05, settle_delay: 0.2}}
backends:
  files: {{type: filesystem, base_path: {base}, create_base_path: true, fsync: never, batch: {{timeout: 0.05}}}}
routing:
  other: [{{backend: files}}]
"""

ALPHA_ROUTE = """\
alpha:
  - backend: files
    config:
      path: archive/alpha-{source}.jsonl
"""


@pytest.fixture
def reloading(tmp_path):
    base = tmp_path / "out"
    sidecar = SidecarProcess(tmp_path, RELOAD_CONFIG.format(base=base), routes={"50-alpha.yaml": ALPHA_ROUTE}).start()
    yield sidecar, base
    alive = sidecar.process.poll() is None
    sidecar.stop(signal.SIGKILL)
    assert alive, sidecar.log()[-3000:]


def deep_yaml(depth: int) -> str:
    return "beta:\n  - backend: files\n    config: {path: " + "[" * depth + "x" + "]" * depth + "}\n"


def test_a_drop_in_nested_too_deep_is_a_rejected_reload_with_its_line(reloading):
    sidecar, _base = reloading
    path = sidecar.write_route("60-deep.yaml", deep_yaml(300))
    sidecar.wait_for(lambda s: s["reload_failures"] == 1, what="the reload rejected")
    assert f"{path}:3: nested deeper than reload.max_file_depth (32 levels)" in sidecar.stats()["last_reload_error"]
    path.unlink()
    sidecar.process.send_signal(signal.SIGHUP)
    sidecar.wait_for(lambda s: s["reloads"] >= 1, what="the next reload applied")
    assert "Traceback" not in sidecar.log()


def test_check_names_the_line_of_a_drop_in_nested_too_deep(tmp_path):
    import subprocess
    import sys

    routes = tmp_path / "routes.d"
    routes.mkdir()
    (tmp_path / "sidecar.yaml").write_text("backends:\n  files: {type: filesystem, base_path: /tmp}\n")
    (routes / "60-deep.yaml").write_text(deep_yaml(2000))
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "check", "--config", str(tmp_path / "sidecar.yaml"), "--routes", str(routes)],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 2
    assert f"error: {routes / '60-deep.yaml'}:3: nested deeper than reload.max_file_depth" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_drop_in_larger_than_the_cap_is_rejected_without_being_parsed(reloading):
    sidecar, _base = reloading
    rules = "".join(f"svc-{i}:\n  - backend: files\n" for i in range(120_000))  # about 3 MiB
    started = time.monotonic()
    path = sidecar.write_route("70-huge.yaml", rules)
    sidecar.wait_for(lambda s: s["reload_failures"] == 1, what="the reload rejected")
    assert time.monotonic() - started < 10
    assert f"{path}:1: the file is {len(rules):,} bytes, more than reload.max_file_size (1,048,576)" in sidecar.stats()["last_reload_error"]


def test_a_drop_in_rewritten_in_place_in_two_steps_is_applied_only_whole(reloading):
    sidecar, base = reloading
    path = sidecar.routes_dir / "50-alpha.yaml"
    rewritten = ALPHA_ROUTE.replace("archive/alpha-", "archive/alphabet-")
    cut = rewritten.index("alphabet-") + 3
    sender = SteadySender(sidecar, "alpha", per_second=400)
    sender.start()
    try:
        wait_until(lambda: read_jsonl(base / "archive" / "alpha-alpha.jsonl"), what="alpha's messages in its file")
        with path.open("w") as handle:  # in place, as `cat > file` or a naive script writes
            handle.write(rewritten[:cut])  # "...path: archive/alp": valid YAML, a wrong path
            handle.flush()
            time.sleep(1.5)  # a writer's pause: well past the settle delay
            assert sidecar.stats()["reloads"] == 0, "a file without its final newline was applied"
            handle.write(rewritten[cut:])
        sidecar.wait_for(lambda s: s["reloads"] == 1, what="the whole file applied")
        wait_until(lambda: read_jsonl(base / "archive" / "alphabet-alpha.jsonl"), what="alpha's messages in its new file")
    finally:
        sent = sender.stop()
    archive = base / "archive"
    wait_until(lambda: len(read_jsonl(archive / "alpha-alpha.jsonl")) + len(read_jsonl(archive / "alphabet-alpha.jsonl")) == sent, what="every message in one file or the other")
    # The status file is written on an interval: wait until it has counted the last ones.
    stats = sidecar.wait_for(lambda s: s["received"] == sent, what="the status file to count every message")
    assert stats["unrouted"] == 0 and stats["reload_failures"] == 0
    assert sorted(p.name for p in (base / "archive").iterdir()) == ["alpha-alpha.jsonl", "alphabet-alpha.jsonl"]
