"""Per-call latency of the Python SDK: log_event and log_metric, sidecar up and down.

The "up" case talks to a draining TCP server in a separate process (so its reads do not compete
for this process's GIL); the "down" case points at a port with nothing listening, so after the
queue fills every call also drops the oldest message. Target: p99 under 20 µs.

    python bench/python_sdk.py [--calls N]
"""

from __future__ import annotations

import argparse
import gc
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sdk_clients" / "python" / "src"))

from monitoring_sdk import MonitoringClient  # noqa: E402

DRAIN_SERVER = """
import socket, sys, threading
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
def drain(conn):
    while conn.recv(1 << 20):
        pass
while True:
    conn, _ = listener.accept()
    threading.Thread(target=drain, args=(conn,), daemon=True).start()
"""
TARGET_P99_US = 20.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure(call, calls: int) -> tuple:
    """p50 and p99 in µs of ``calls`` timed calls, after a warm-up."""
    for i in range(2000):
        call(i)
    samples = []
    clock = time.perf_counter_ns
    for i in range(calls):
        started = clock()
        call(i)
        samples.append(clock() - started)
    samples.sort()
    return samples[len(samples) // 2] / 1000, samples[int(len(samples) * 0.99)] / 1000


def run(port: int, calls: int) -> dict:
    mon = MonitoringClient("bench", host="127.0.0.1", port=port)
    mon.set_context("job_id", "job-12345")
    results = {
        "log_event": measure(lambda i: mon.log_event("info", "Received file", {"file": "data.csv"}), calls),
        "log_metric": measure(lambda i: mon.log_metric("rows_loaded", i, "count", {"table": "x"}), calls),
    }
    results["stats"] = mon.statistics()
    mon.close(timeout=2)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=50000)
    args = parser.parse_args()
    server = subprocess.Popen([sys.executable, "-c", DRAIN_SERVER], stdout=subprocess.PIPE, text=True)
    try:
        up_port = int(server.stdout.readline())
        gc.collect()
        rows = [("up", run(up_port, args.calls)), ("down", run(free_port(), args.calls))]
    finally:
        server.kill()
        server.wait()
    print(f"Python SDK per-call latency, {args.calls} calls each (µs; target p99 < {TARGET_P99_US:g})")
    print(f"{'sidecar':<8} {'call':<11} {'p50':>7} {'p99':>7}  result   sent/dropped")
    worst = 0.0
    for state, result in rows:
        for call in ("log_event", "log_metric"):
            p50, p99 = result[call]
            worst = max(worst, p99)
            verdict = "ok" if p99 < TARGET_P99_US else "SLOW"
            stats = result["stats"]
            print(f"{state:<8} {call:<11} {p50:>7.2f} {p99:>7.2f}  {verdict:<8} {stats['sent']}/{stats['dropped']}")
    return 0 if worst < TARGET_P99_US else 1


if __name__ == "__main__":
    sys.exit(main())
