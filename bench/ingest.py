"""Ingest benchmark: N messages of about 300 bytes over C connections into a running sidecar that
routes them to the filesystem backend.

Prints messages/s from the first byte sent to the last line written (the sidecar's own count of
delivered messages, checked against the lines in the file), and the sidecar's peak RSS.

With `--protocol forward`, the same run measures the messages twice, on one sidecar: as
`--format` over the tcp source (the baseline), then as Fluent forward records (PackedForward
frames of 1000 entries, or `--forward-mode`) over a forward source, and prints both and their
ratio.

    .venv/bin/python bench/ingest.py [--messages 2000000] [--connections 8] [--format json|msgpack] [--odd-every N] [--python-path] [--queue disk|memory]
        [--protocol tcp|forward] [--forward-mode message|forward|packed|compressed]
"""

import argparse
import gzip
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import orjson
from benchkit import senders, start_sidecar

from sidecar.protocol import NATIVE_AVAILABLE

CONFIG = """
sources:
  tcp: {{type: tcp, host: 127.0.0.1, port: 0}}
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


def forward_payload(connection: int, count: int, mode: str) -> bytes:
    """The same messages as Fluent forward records: the tag is the source, the event's fields are
    the record's (`log`, `level`, the context's keys), and EventTime carries the timestamp."""
    tag = f"bench-{connection % 4}"
    time = msgpack.ExtType(0, (1760956245).to_bytes(4, "big") + (123_000_000).to_bytes(4, "big"))
    entries = []
    for seq in range(count):
        m = message(connection, seq)
        entries.append([time, {"log": m["data"]["message"], "level": "info", "trace_id": m["trace_id"], "span_id": m["span_id"], **m["context"]}])
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


def measure(sidecar: subprocess.Popen, port: int, payloads: list[bytes], total: int, out: Path, profile: str | None = None) -> dict:
    """Send `payloads` (one connection each) and wait for the last of `total` lines in `out`:
    the figures of that stretch."""
    # The backend keeps its files open: count only what is written from now on.
    offsets: dict[Path, int] = {path: path.stat().st_size for path in out.glob("*.jsonl")}
    threads = senders(port, payloads)
    profiler = None
    if profile:
        if not Path(sys.executable).with_name("py-spy").exists():
            raise SystemExit("--profile needs py-spy: .venv/bin/pip install -e '.[bench]'")
        profiler = subprocess.Popen(
            [str(Path(sys.executable).with_name("py-spy")), "record", "-p", str(sidecar.pid), "-f", "raw", "-o", profile, "-r", "200"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        time.sleep(1)  # py-spy attaches
    cpu_before = cpu_seconds(sidecar.pid)
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    sent = time.perf_counter()
    # The end is the moment the last line is in the files: count newlines as they grow.
    counted = 0
    while counted < total:
        for path in out.glob("*.jsonl"):
            with path.open("rb") as handle:
                handle.seek(offsets.get(path, 0))
                fresh = handle.read()
            offsets[path] = offsets.get(path, 0) + len(fresh)
            counted += fresh.count(b"\n")
        if sidecar.poll() is not None:
            raise SystemExit(f"sidecar died:\n{(out.parent / 'sidecar.stderr').read_text()}")
        time.sleep(0.002)
    finished = time.perf_counter()
    user, system = (after - before for after, before in zip(cpu_seconds(sidecar.pid), cpu_before))
    if profiler is not None:
        profiler.send_signal(signal.SIGINT)
        profiler.wait(30)
    return {"sent": sent - started, "elapsed": finished - started, "user": user, "system": system, "counted": counted, "size": sum(map(len, payloads))}


def report(name: str, figures: dict, total: int) -> None:
    elapsed, cpu_used = figures["elapsed"], figures["user"] + figures["system"]
    print(f"{name}: sent in {figures['sent']:.2f}s; last line written after {elapsed:.2f}s")
    print(f"  throughput: {total / elapsed:,.0f} messages/s ({figures['size'] / elapsed / 2**20:.0f} MiB/s in, {figures['size'] / total:.0f} bytes per message)")
    print(
        f"  sidecar CPU: {cpu_used / total * 1e6:.2f} µs per message ({figures['user'] / total * 1e6:.2f} user, {figures['system'] / total * 1e6:.2f} system;"
        f" {cpu_used / elapsed:.0%} of one core)"
    )
    print(f"  lines in the output files: {figures['counted']:,} of {total:,}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=2_000_000)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--format", choices=["json", "msgpack"], default="json")
    parser.add_argument("--odd-every", type=int, default=0, metavar="N", help="every N-th message has an upper-case trace id, for the Python path to normalise: mixed traffic")
    parser.add_argument("--python-path", action="store_true", help="run the sidecar with `pipeline.native: false` (every message on the Python path)")
    parser.add_argument("--queue", choices=["disk", "memory"], default="disk", help="the backend's queue.mode (disk, the default: every message written to its log first)")
    parser.add_argument("--protocol", choices=["tcp", "forward"], default="tcp", help="forward: also send the messages as Fluent forward records, after the tcp baseline, in the same run")
    parser.add_argument("--forward-mode", choices=["message", "forward", "packed", "compressed"], default="packed")
    parser.add_argument("--profile", metavar="FILE", help="record the sidecar with py-spy (raw, collapsed stacks) into FILE; needs `pip install -e '.[bench]'`")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as work:
        work = Path(work)
        per_connection = args.messages // args.connections
        total = per_connection * args.connections
        print(f"preparing {total:,} messages over {args.connections} connections ({args.format}) ...", flush=True)
        payloads = [payload(c, per_connection, args.format, args.odd_every) for c in range(args.connections)]
        forward_payloads = [forward_payload(c, per_connection, args.forward_mode) for c in range(args.connections)] if args.protocol == "forward" else []
        size = sum(map(len, payloads))
        print(f"  {size / total:.0f} bytes per message on the wire, {size / 2**20:.0f} MiB in all", flush=True)

        sidecar, port = start_sidecar(work, CONFIG.format(base=work / "out", native="false" if args.python_path else "true", queue_mode=", mode: memory" if args.queue == "memory" else ""))
        try:
            baseline = measure(sidecar, port, payloads, total, work / "out", args.profile)
            forward = None
            if forward_payloads:
                forward_port = int(json.loads((work / "status.json").read_text())["sources"]["fluent"]["address"].rsplit(":", 1)[1])
                forward = measure(sidecar, forward_port, forward_payloads, total, work / "out")
            rss = peak_rss_mib(sidecar.pid)
        finally:
            sidecar.terminate()
            sidecar.wait(60)
        print(f"machine: {os.cpu_count()} cores, {cpu_model()}, Python {platform.python_version()}")
        print(f"hot path: {'Python' if args.python_path or not NATIVE_AVAILABLE else 'native (sidecar._native)'}; queue: {args.queue}")
        report(f"tcp source ({args.format})", baseline, total)
        if forward is not None:
            report(f"forward source ({args.forward_mode})", forward, total)
            base_cpu = (baseline["user"] + baseline["system"]) / total
            forward_cpu = (forward["user"] + forward["system"]) / total
            print(f"forward / tcp: {baseline['elapsed'] / forward['elapsed']:.2f}x the messages/s, {forward_cpu / base_cpu:.2f}x the CPU per message")
        print(f"sidecar peak RSS: {rss:.0f} MiB")
        complete = baseline["counted"] == total and (forward is None or forward["counted"] == total)
        return 0 if complete else 1


if __name__ == "__main__":
    raise SystemExit(main())
