"""Aggregation benchmark: the CPU a metric point costs with an `aggregate:` step on and off.

The same N metric points (4 sources, `--names` names, `--tag-sets` tag sets, all stamped in
one window) go over C connections as JSON lines to a sidecar without an aggregate step, then to
one whose step aggregates every metric of every source (10 s windows, all statistics, raw points
kept), rounds alternating; each run is timed until the last raw point is in the files backend,
and no window closes meanwhile. Prints messages/s and the sidecar's CPU per point for both, the
ratio of CPU with aggregation to without, and apart from it the CPU of closing the window the
points filled (a cost per group and window).

    .venv/bin/python bench/aggregate.py [--messages 400000] [--connections 4] [--names 20] [--tag-sets 50] [--rounds 2] [--python-path]
"""

import argparse
import datetime as dt
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import orjson
from benchkit import senders, start_sidecar
from ingest import count_lines, cpu_model, cpu_seconds, measure, peak_rss_mib, report

from sidecar.protocol import NATIVE_AVAILABLE

WINDOW = 10.0  # seconds: the step's

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
      window: {window}s
"""


def payload(connection: int, count: int, names: int, tag_sets: int, stamp: float) -> bytes:
    """Metric points stamped `stamp` (seconds since the epoch)."""
    now = dt.datetime.fromtimestamp(stamp, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
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
    config = CONFIG.format(base=out, aggregates=work / "aggregates", native="false" if args.python_path else "true", aggregate=AGGREGATE.format(window=int(WINDOW)) if aggregating else "")
    sidecar, port = start_sidecar(work, config)
    try:
        # The points are stamped in the window that begins after they are made, and sent once it
        # has begun: no window closes while they are counted (a close costs per group, not per
        # point), and the one they filled is closed, and its CPU taken, after.
        start = (time.time() + 3) // WINDOW * WINDOW + WINDOW
        payloads = [payload(c, per_connection, args.names, args.tag_sets, start + 0.001) for c in range(args.connections)]
        time.sleep(max(0.0, start + 0.05 - time.time()))
        figures = measure(sidecar, work, senders(port, payloads), total, {})
        if time.time() >= start + WINDOW:
            raise SystemExit(f"the points took over a window ({WINDOW:.0f} s) to arrive: the window closed while they were counted")
        if aggregating:
            figures["close"] = close_cpu(sidecar, work / "aggregates", start + WINDOW, 4 * args.names * args.tag_sets)
        figures["rss"] = peak_rss_mib(sidecar.pid)
        figures["size"] = sum(map(len, payloads))
    finally:
        sidecar.terminate()
        sidecar.wait(60)
    return figures


def close_cpu(sidecar, aggregates: Path, end: float, groups: int) -> float:
    """The sidecar's CPU seconds from just before the window ends until its `groups` aggregates
    are written (the idle sidecar's share of that is under a millisecond)."""
    time.sleep(max(0.0, end - 0.2 - time.time()))
    before = sum(cpu_seconds(sidecar.pid))
    offsets: dict[Path, int] = {}
    written = 0
    while written < groups:
        written += count_lines(aggregates, offsets)
        if time.time() > end + 60:
            raise SystemExit(f"{written} of {groups} aggregates written a minute after their window ended")
        time.sleep(0.002)
    return sum(cpu_seconds(sidecar.pid)) - before


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
    # Each round's two runs, seconds apart, see about the same load on the machine: its ratio
    # cancels what drifts between rounds. The user CPU leaves out the kernel's writing of the
    # files (the same bytes either way, and the noisiest part of a run).
    paired = statistics.median((on["user"] + on["system"]) / (off["user"] + off["system"]) for off, on in zip(runs[False], runs[True]))
    user = {k: statistics.median(f["user"] / total for f in v) for k, v in runs.items()}
    print(f"each round's ratio (median): {paired:.2f}x; user CPU a point (medians): {user[False] * 1e6:.2f} µs without, {user[True] * 1e6:.2f} µs with")
    # The step's work is all user CPU: what it adds there, over all the CPU of a point without it.
    print(f"the user CPU aggregation adds, over a point's CPU without it: {1 + (user[True] - user[False]) / cpu[False]:.2f}x")
    groups = 4 * args.names * args.tag_sets
    close = statistics.median(f["close"] for f in runs[True])
    print(f"closing a window of {groups:,} groups (median): {close * 1e3:.0f} ms of CPU, {close / groups * 1e6:.1f} µs a group")
    complete = all(f["counted"] == total for v in runs.values() for f in v)
    return 0 if complete else 1


if __name__ == "__main__":
    raise SystemExit(main())
