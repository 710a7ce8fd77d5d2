"""Ingest benchmark: N messages of about 300 bytes over C connections into a running sidecar that
routes them to the filesystem backend.

Prints messages/s from the first byte sent to the last line written (the sidecar's own count of
delivered messages, checked against the lines in the file), and the sidecar's peak RSS.

With `--protocol otlp` the same events are then sent again, to the same sidecar, as OTLP/HTTP
log exports (protobuf, `--batch` records a request, as an OpenTelemetry SDK batches them, over
keep-alive connections), and both runs are printed with the ratio of OTLP to JSON lines. With
`--protocol forward` they are sent again as Fluent forward records (PackedForward frames of 1000
entries, or `--forward-mode`) to a forward source of the same sidecar, compared the same way.

    .venv/bin/python bench/ingest.py [--messages 2000000] [--connections 8] [--format json|msgpack] [--odd-every N] [--python-path] [--queue disk|memory]
        [--protocol otlp [--batch 512] | --protocol forward [--forward-mode message|forward|packed|compressed]]
"""

import argparse
import gzip
import http.client
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgpack
import orjson
from benchkit import senders, start_sidecar
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from sidecar.protocol import NATIVE_AVAILABLE

CONFIG = """
tcp: {{host: 127.0.0.1, port: 0}}
sources:
  otel: {{type: otlp, host: 127.0.0.1, port: 0, max_body_size: 16MiB}}
  fluent: {{type: forward, host: 127.0.0.1, port: 0, max_frame_size: 64MiB}}
shutdown: {{drain_timeout: 60}}
backends:
  files:
    type: filesystem
    base_path: {base}
    create_base_path: true
    path: "{{source}}.jsonl"
    fsync: never
    batch: {{max_messages: 2000, timeout: 0.2}}
    queue: {{max_messages: 10000, when_full: block{queue_mode}}}
routing:
  all:
    - backend: files
pipeline: {{native: {native}}}
"""


def message(connection: int, seq: int, odd_every: int = 0) -> dict:
    """An info event; with `odd_every`, every that many-th one has its trace id in capitals, which
    the sidecar lower-cases on the Python path (the native decoder declines it)."""
    odd = bool(odd_every) and seq % odd_every == 0
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    return {
        "source": f"bench-{connection % 4}",
        "type": "event",
        "timestamp": "2025-10-20T10:30:45.123Z",
        "trace_id": trace_id.upper() if odd else trace_id,
        "span_id": "00f067aa0ba902b7",
        "context": {"job_id": f"job-{seq // 1000}", "seq": seq},
        "data": {"level": "info", "message": f"connection {connection} processed record {seq} of the nightly load without error"},
    }


def payload(connection: int, count: int, fmt: str, odd_every: int = 0) -> bytes:
    if fmt == "msgpack":
        return b"".join(msgpack.packb(message(connection, i, odd_every)) for i in range(count))
    return b"".join(orjson.dumps(message(connection, i, odd_every)) + b"\n" for i in range(count))


def otlp_requests(connection: int, count: int, batch: int) -> list[bytes]:
    """The events of `message` as ExportLogsServiceRequest bodies of `batch` records each: the
    same source (service.name), job (job.id), ids, timestamp, message and context."""
    bodies = []
    for first in range(0, count, batch):
        request = ExportLogsServiceRequest()
        resource_logs = request.resource_logs.add()
        resource_logs.resource.attributes.add(key="service.name", value=AnyValue(string_value=f"bench-{connection % 4}"))
        scope_logs = resource_logs.scope_logs.add()
        for seq in range(first, min(first + batch, count)):
            event = message(connection, seq)
            record = scope_logs.log_records.add(
                time_unix_nano=1_760_956_245_123_000_000, severity_number=9,
                trace_id=bytes.fromhex(event["trace_id"]), span_id=bytes.fromhex(event["span_id"]),
            )
            record.body.string_value = event["data"]["message"]
            record.attributes.add(key="job.id", value=AnyValue(string_value=event["context"]["job_id"]))
            record.attributes.add(key="seq", value=AnyValue(int_value=seq))
        bodies.append(request.SerializeToString())
    return bodies


def post_all(port: int, bodies: list[bytes]) -> None:
    """One keep-alive connection posting each body to /v1/logs; a 503 is retried after its
    Retry-After, as exporters do; anything else but 200 ends the run."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for body in bodies:
        while True:
            connection.request("POST", "/v1/logs", body, {"Content-Type": "application/x-protobuf"})
            response = connection.getresponse()
            response.read()
            if response.status == 200:
                break
            if response.status != 503:
                raise SystemExit(f"OTLP request answered {response.status}")
            time.sleep(float(response.headers.get("Retry-After", "1")))
    connection.close()


def forward_payload(connection: int, count: int, mode: str) -> bytes:
    """The same messages as Fluent forward records: the tag is the source, the event's fields are
    the record's (`log`, `level`, the context's keys), and EventTime carries the timestamp."""
    tag = f"bench-{connection % 4}"
    event_time = msgpack.ExtType(0, (1760956245).to_bytes(4, "big") + (123_000_000).to_bytes(4, "big"))
    entries = []
    for seq in range(count):
        m = message(connection, seq)
        entries.append([event_time, {"log": m["data"]["message"], "level": "info", "trace_id": m["trace_id"], "span_id": m["span_id"], **m["context"]}])
    if mode == "message":
        return b"".join(msgpack.packb([tag, t, record], use_bin_type=True) for t, record in entries)
    frames = []
    for start in range(0, count, 1000):
        batch = entries[start : start + 1000]
        if mode == "forward":
            frames.append(msgpack.packb([tag, batch], use_bin_type=True))
            continue
        packed = b"".join(msgpack.packb(entry, use_bin_type=True) for entry in batch)
        if mode == "compressed":
            frames.append(msgpack.packb([tag, gzip.compress(packed, 1), {"compressed": "gzip", "size": len(batch)}], use_bin_type=True))
        else:
            frames.append(msgpack.packb([tag, packed, {"size": len(batch)}], use_bin_type=True))
    return b"".join(frames)


def count_lines(out: Path, offsets: dict[Path, int]) -> int:
    """Lines added to the output files since the offsets (updated)."""
    counted = 0
    for path in out.glob("*.jsonl"):
        with path.open("rb") as handle:
            handle.seek(offsets.get(path, 0))
            fresh = handle.read()
        offsets[path] = offsets.get(path, 0) + len(fresh)
        counted += fresh.count(b"\n")
    return counted


def measure(sidecar: subprocess.Popen, work: Path, threads: list[threading.Thread], total: int, offsets: dict[Path, int]) -> dict:
    """Start the senders; wall time until `total` more lines are in the files, and the
    sidecar's CPU meanwhile."""
    cpu_before = cpu_seconds(sidecar.pid)
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    sent = time.perf_counter()
    counted = 0
    while counted < total:
        counted += count_lines(work / "out", offsets)
        if sidecar.poll() is not None:
            raise SystemExit(f"sidecar died:\n{(work / 'sidecar.stderr').read_text()}")
        time.sleep(0.002)
    finished = time.perf_counter()
    user, system = (after - before for after, before in zip(cpu_seconds(sidecar.pid), cpu_before))
    return {"sent": sent - started, "elapsed": finished - started, "user": user, "system": system, "counted": counted}


def report(name: str, run: dict, total: int, size: int) -> None:
    elapsed, cpu_used = run["elapsed"], run["user"] + run["system"]
    print(f"{name}: sent in {run['sent']:.2f}s; last line written after {elapsed:.2f}s")
    print(f"  throughput: {total / elapsed:,.0f} messages/s ({size / elapsed / 2**20:.0f} MiB/s in, {size / total:.0f} bytes per message)")
    print(
        f"  sidecar CPU: {cpu_used / total * 1e6:.2f} µs per message ({run['user'] / total * 1e6:.2f} user, {run['system'] / total * 1e6:.2f} system;"
        f" {cpu_used / elapsed:.0%} of one core)"
    )


def peak_rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


def cpu_seconds(pid: int) -> tuple[float, float]:
    """User and system CPU time of a process so far: steadier than wall time on a shared machine."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / os.sysconf("SC_CLK_TCK"), int(fields[12]) / os.sysconf("SC_CLK_TCK")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=2_000_000)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--format", choices=["json", "msgpack"], default="json")
    parser.add_argument("--odd-every", type=int, default=0, metavar="N", help="every N-th message has an upper-case trace id, for the Python path to normalise: mixed traffic")
    parser.add_argument("--python-path", action="store_true", help="run the sidecar with `pipeline.native: false` (every message on the Python path)")
    parser.add_argument("--queue", choices=["disk", "memory"], default="disk", help="the backend's queue.mode (disk, the default: every message written to its log first)")
    parser.add_argument("--profile", metavar="FILE", help="record the sidecar with py-spy (raw, collapsed stacks) into FILE; needs `pip install -e '.[bench]'`")
    parser.add_argument("--protocol", choices=["otlp", "forward"], help="then send the same events as OTLP/HTTP log exports, or as Fluent forward records, to the same sidecar, and compare")
    parser.add_argument("--batch", type=int, default=512, help="log records per OTLP request (the OpenTelemetry SDKs' default batch: 512)")
    parser.add_argument("--forward-mode", choices=["message", "forward", "packed", "compressed"], default="packed", help="the Fluent forward mode of --protocol forward")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as work:
        work = Path(work)
        per_connection = args.messages // args.connections
        total = per_connection * args.connections
        print(f"preparing {total:,} messages over {args.connections} connections ({args.format}) ...", flush=True)
        payloads = [payload(c, per_connection, args.format, args.odd_every) for c in range(args.connections)]
        size = sum(map(len, payloads))
        print(f"  {size / total:.0f} bytes per message on the wire, {size / 2**20:.0f} MiB in all", flush=True)
        otlp_bodies = None
        if args.protocol == "otlp":
            otlp_bodies = [otlp_requests(c, per_connection, args.batch) for c in range(args.connections)]
            print(f"  and as OTLP: {sum(map(len, otlp_bodies)):,} requests of {args.batch} records", flush=True)
        forward_payloads = [forward_payload(c, per_connection, args.forward_mode) for c in range(args.connections)] if args.protocol == "forward" else None

        sidecar, port = start_sidecar(work, CONFIG.format(base=work / "out", native="false" if args.python_path else "true", queue_mode=", mode: memory" if args.queue == "memory" else ""))
        try:
            profiler = None
            if args.profile:
                if not Path(sys.executable).with_name("py-spy").exists():
                    raise SystemExit("--profile needs py-spy: .venv/bin/pip install -e '.[bench]'")
                profiler = subprocess.Popen(
                    [str(Path(sys.executable).with_name("py-spy")), "record", "-p", str(sidecar.pid), "-f", "raw", "-o", args.profile, "-r", "200"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )
                time.sleep(1)  # py-spy attaches
            offsets: dict[Path, int] = {}
            lines = measure(sidecar, work, senders(port, payloads), total, offsets)
            otlp = None
            if otlp_bodies is not None:
                otlp_port = int(orjson.loads((work / "status.json").read_bytes())["sources"]["otel"]["address"].rsplit(":", 1)[1])
                otlp = measure(sidecar, work, [threading.Thread(target=post_all, args=(otlp_port, bodies)) for bodies in otlp_bodies], total, offsets)
            forward = None
            if forward_payloads is not None:
                forward_port = int(orjson.loads((work / "status.json").read_bytes())["sources"]["fluent"]["address"].rsplit(":", 1)[1])
                forward = measure(sidecar, work, senders(forward_port, forward_payloads), total, offsets)
            if profiler is not None:
                profiler.send_signal(signal.SIGINT)
                profiler.wait(30)
            rss = peak_rss_mib(sidecar.pid)
        finally:
            sidecar.terminate()
            sidecar.wait(60)
        print(f"machine: {os.cpu_count()} cores, {cpu_model()}, Python {platform.python_version()}")
        print(f"hot path: {'Python' if args.python_path or not NATIVE_AVAILABLE else 'native (sidecar._native)'}; queue: {args.queue}")
        report(f"JSON lines over TCP ({args.format})", lines, total, size)
        complete = lines["counted"] == total
        if otlp is not None:
            report(f"OTLP/HTTP protobuf ({args.batch} records a request)", otlp, total, sum(len(b) for bodies in otlp_bodies for b in bodies))
            print(
                f"OTLP / JSON lines: {lines['elapsed'] / otlp['elapsed']:.2f}x the throughput,"
                f" {(otlp['user'] + otlp['system']) / (lines['user'] + lines['system']):.2f}x the CPU per message"
            )
            complete = complete and otlp["counted"] == total
        if forward is not None:
            report(f"Fluent forward ({args.forward_mode})", forward, total, sum(map(len, forward_payloads)))
            print(
                f"forward / JSON lines: {lines['elapsed'] / forward['elapsed']:.2f}x the throughput,"
                f" {(forward['user'] + forward['system']) / (lines['user'] + lines['system']):.2f}x the CPU per message"
            )
            complete = complete and forward["counted"] == total
        second = otlp or forward
        print(f"sidecar peak RSS: {rss:.0f} MiB")
        print(f"lines in the output files: {lines['counted'] + (second['counted'] if second else 0):,} of {total * (2 if second else 1):,}")
        return 0 if complete else 1


if __name__ == "__main__":
    raise SystemExit(main())
