"""Aggregation benchmark: the CPU a metric point costs with an `aggregate:` step on and off.

The same N metric points (4 sources, `--names` names, `--tag-sets` tag sets, stamped now) go
over C connections as JSON lines to a sidecar without an aggregate step, then to one whose step
aggregates every metric of every source (10 s windows, all statistics, raw points kept), rounds
alternating; each run is timed until the last raw point is in the files backend. Prints
messages/s and the sidecar's CPU per point for both, and the ratio of CPU with aggregation to
without.

    .venv/bin/python bench/aggregate.py [--messages 400000] [--connections 4] [--names 20] [--tag-sets 50] [--rounds 2] [--python-path]
"""

import argparse
import datetime as dt
import os
import platform
import statistics
import tempfile
from pathlib import Path

import orjson
from benchkit import senders, start_sidecar
from ingest import cpu_model, measure, peak_rss_mib, report

from sidecar.protocol import NATIVE_AVAILABLE

CONFIG = """
tcp: {{host: 127.0.0.1, port: 0}}
shutdown: {{drain_timeout: 60}}
backends:
  files:
    type: filesystem
    base_path: {base}
    create_base_path: true
    fsync: never
    batch: {{max_messages: 2000, timeout: 0.2}}
    queue: {{max_messages: 10000, when_full: block}}
  aggregates:
    type: filesystem
    base_path: {aggregates}
    create_base_path: true
    fsync: never
routing:
  all:
    - backend: files
      filter: {{aggregated: false}}
    - backend: aggregates
      filter: {{aggregated: true}}
pipeline: {{native: {native}}}
{aggregate}
"""

AGGREGATE = """
aggregate:
  all:
    - metrics: ["*"]
      window: 10s
"""


def payload(connection: int, count: int, names: int, tag_sets: int) -> bytes:
    """Metric points stamped now (so they fall in the step's current window)."""
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    lines = []
    for seq in range(count):
        point = {
            "source": f"bench-{connection % 4}", "type": "metric", "timestamp": now,
            "data": {"name": f"rows_{seq % names}", "value": seq % 997, "unit": "rows", "tags": {"table": f"t{seq // names % tag_sets}", "env": "bench"}},
        }
        lines.append(orjson.dumps(point) + b"\n")
    return b"".join(lines)


def run_once(aggregating: bool, args, work: Path, total: int, per_connection: int) -> dict:
    out = work / "out"
    config = CONFIG.format(base=out, aggregates=work / "aggregates", native="false" if args.python_path else "true", aggregate=AGGREGATE if aggregating else "")
    sidecar, port = start_sidecar(work, config)
    try:
        payloads = [payload(c, per_connection, args.names, args.tag_sets) for c in range(args.connections)]
        figures = measure(sidecar, work, senders(port, payloads), total, {})
        figures["rss"] = peak_rss_mib(sidecar.pid)
        figures["size"] = sum(map(len, payloads))
    finally:
        sidecar.terminate()
        sidecar.wait(60)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=400_000)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--names", type=int, default=20)
    parser.add_argument("--tag-sets", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each kind")
    parser.add_argument("--python-path", action="store_true", help="run the sidecar with `pipeline.native: false`")
    args = parser.parse_args()
    per_connection = args.messages // args.connections
    total = per_connection * args.connections
    runs: dict[bool, list[dict]] = {False: [], True: []}
    for round_number in range(args.rounds):
        for aggregating in (False, True):
            with tempfile.TemporaryDirectory(prefix="bench-aggregate-") as work:
                figures = run_once(aggregating, args, Path(work), total, per_connection)
            runs[aggregating].append(figures)
            print(f"round {round_number + 1}, aggregation {'on' if aggregating else 'off'}: {total / figures['elapsed']:,.0f} points/s, {(figures['user'] + figures['system']) / total * 1e6:.2f} µs CPU a point", flush=True)
    print(f"machine: {os.cpu_count()} cores, {cpu_model()}, Python {platform.python_version()}")
    print(f"hot path: {'Python' if args.python_path or not NATIVE_AVAILABLE else 'native (sidecar._native)'}; {total:,} points, {4 * args.names * args.tag_sets:,} groups a window")
    for aggregating in (False, True):
        best = min(runs[aggregating], key=lambda f: f["user"] + f["system"])
        report(f"aggregation {'on' if aggregating else 'off'} (the round with the least CPU)", best, total, best["size"])
    cpu = {k: statistics.median((f["user"] + f["system"]) / total for f in v) for k, v in runs.items()}
    speed = {k: statistics.median(total / f["elapsed"] for f in v) for k, v in runs.items()}
    print(f"with / without aggregation (medians): {cpu[True] / cpu[False]:.2f}x the CPU a point, {speed[True] / speed[False]:.2f}x the points/s")
    complete = all(f["counted"] == total for v in runs.values() for f in v)
    return 0 if complete else 1


if __name__ == "__main__":
    raise SystemExit(main())
