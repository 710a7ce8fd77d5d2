"""The example application: a batch worker that runs a job every EXAMPLE_JOB_INTERVAL seconds
and reports it to the sidecar, as the SDKs do, over $MONITORING_SIDECAR (unix:PATH or
HOST:PORT): a span around the job, its progress, an event and a metric.

Standard library only, so it runs on the plain Python image. Like an SDK it never stops for the
sidecar: a message that cannot be sent is dropped and counted, and the next one reconnects.
EXAMPLE_JOBS=N runs N jobs and exits (0 runs until SIGTERM).
"""

import datetime
import json
import os
import secrets
import signal
import socket
import sys
import time

SOURCE = os.environ.get("EXAMPLE_SOURCE", "example-worker")
JOBS = int(os.environ.get("EXAMPLE_JOBS", "0"))
JOB_INTERVAL = float(os.environ.get("EXAMPLE_JOB_INTERVAL", "30"))
STEP_SECONDS = float(os.environ.get("EXAMPLE_STEP_SECONDS", "1"))


class Sender:
    """One connection to the sidecar, opened when needed; a failed send drops its message."""

    def __init__(self, address: str):
        self.address = address
        self.sock: socket.socket | None = None
        self.sent = 0
        self.dropped = 0

    def _connect(self) -> socket.socket:
        if self.address.startswith("unix:"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target = self.address[len("unix:"):]
        else:
            host, _, port = self.address.rpartition(":")
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            target = (host, int(port))
        sock.settimeout(2.0)
        try:
            sock.connect(target)
        except OSError:
            sock.close()
            raise
        return sock

    def send(self, message: dict) -> None:
        line = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        try:
            if self.sock is None:
                self.sock = self._connect()
            self.sock.sendall(line)
            self.sent += 1
        except OSError as exc:
            self.dropped += 1
            if self.dropped == 1:
                print(f"example-worker: cannot send to {self.address}: {exc}; dropping and counting", file=sys.stderr)
            self.close()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def run_job(sender: Sender, number: int) -> None:
    job_id = f"job-{number}-{int(time.time())}"
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    ids = {"trace_id": trace_id, "span_id": span_id, "context": {"job_id": job_id}}

    def send(kind: str, data: dict) -> None:
        sender.send({"source": SOURCE, "type": kind, "timestamp": now(), "data": data, **ids})

    started = time.monotonic()
    send("span", {"name": "nightly-export", "phase": "start"})
    for percent in (0, 25, 50, 75, 100):
        send("progress", {"job_id": job_id, "percent": percent, "status": "running" if percent < 100 else "completed"})
        if percent < 100:
            time.sleep(STEP_SECONDS)
    rows = 1000 + number
    send("metric", {"name": "rows_exported", "value": rows, "unit": "count"})
    send("event", {"level": "warning" if number % 5 == 4 else "info", "message": f"exported {rows} rows"})
    send("span", {"name": "nightly-export", "phase": "end", "status": "success", "duration_ms": round((time.monotonic() - started) * 1000, 1)})
    print(f"example-worker: {job_id} done ({sender.sent} sent, {sender.dropped} dropped so far)", flush=True)


def main() -> int:
    stopping = False

    def stop(_signum, _frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    sender = Sender(os.environ.get("MONITORING_SIDECAR", "127.0.0.1:17000"))
    number = 0
    while not stopping and (JOBS == 0 or number < JOBS):
        run_job(sender, number)
        number += 1
        deadline = time.monotonic() + JOB_INTERVAL
        while not stopping and (JOBS == 0 or number < JOBS) and time.monotonic() < deadline:
            time.sleep(0.2)
    sender.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
