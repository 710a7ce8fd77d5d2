"""A real sidecar in a subprocess, and real socket clients, for end-to-end tests."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import msgpack
import orjson

REPO = Path(__file__).resolve().parent.parent

# Every source to the filesystem backend under {base}, flushed within 50 ms: `.format(base=...)`.
FILES_CONFIG = """
tcp: {{host: 127.0.0.1, port: 0}}
backends:
  files: {{type: filesystem, base_path: {base}, create_base_path: true, batch: {{timeout: 0.05}}}}
routing:
  all: [{{backend: files}}]
"""


def event(source: str, seq: int, level: str = "info", **extra) -> dict:
    return {
        "source": source,
        "type": "event",
        "timestamp": "2025-10-20T10:30:45.123Z",
        "data": {"level": level, "message": f"{source} #{seq}"},
        "context": {"seq": seq},
        **extra,
    }


def seqs(messages: list[dict]) -> list[int]:
    return [m["context"]["seq"] for m in messages]


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line]


def wait_until(predicate, timeout: float = 15.0, what: str = "condition", interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class SidecarProcess:
    """`monitoring-sidecar run` on a config written into `workdir`, listening on a free port."""

    def __init__(self, workdir: Path, config: str, routes: dict[str, str] | None = None, env: dict | None = None, extra_args=()):
        self.workdir = workdir
        self.config_path = workdir / "sidecar.yaml"
        self.routes_dir = workdir / "routes.d"
        self.status_path = workdir / "status.json"
        self.stderr_path = workdir / "sidecar.stderr"
        self.stdout_path = workdir / "sidecar.stdout"
        self.config_path.write_text(textwrap.dedent(config))
        self.routes_dir.mkdir(exist_ok=True)
        for name, text in (routes or {}).items():
            self.write_route(name, text)
        # The HTTP view on a free port too, so sidecars of several tests never collide.
        self.env = {**os.environ, "MONITORING_SIDECAR_HTTP": "127.0.0.1:0", **(env or {})}
        self.http_port: int | None = None
        self.extra_args = list(extra_args)
        self.process: subprocess.Popen | None = None
        self.port: int | None = None

    def write_route(self, name: str, text: str) -> Path:
        """Replace a drop-in the way editors do: write a temporary file, rename it over."""
        path = self.routes_dir / name
        temporary = self.routes_dir / f".{name}.tmp"
        temporary.write_text(textwrap.dedent(text))
        os.replace(temporary, path)
        return path

    def start(self, timeout: float = 20.0) -> "SidecarProcess":
        command = [
            sys.executable, "-m", "sidecar", "run",
            "--config", str(self.config_path), "--routes", str(self.routes_dir),
            "--status-file", str(self.status_path), "--status-interval", "0.05", *self.extra_args,
        ]
        self.process = subprocess.Popen(
            command, cwd=self.workdir, env=self.env, stdin=subprocess.DEVNULL,
            stdout=self.stdout_path.open("wb"), stderr=self.stderr_path.open("wb"),
        )

        def listening():
            if self.process.poll() is not None:
                raise AssertionError(f"sidecar exited with {self.process.returncode}:\n{self.log()}")
            log = self.log()
            found = re.search(r"listening on [\d.]+:(\d+)", log)
            # "ready": the sources listen before the backends start, and a status file may be
            # a previous run's; the ready line comes once every part has started.
            return found and " ready: " in log and self.status_path.exists() and int(found.group(1))

        self.port = wait_until(listening, timeout, "the sidecar to be ready")
        found = re.search(r"HTTP view on http://[\d.]+:(\d+)/", self.log())
        self.http_port = int(found.group(1)) if found else None
        return self

    def http(self, path: str, method: str = "GET", headers: dict | None = None):
        """(status, body bytes) of a request to the sidecar's HTTP view."""
        import urllib.error
        import urllib.request

        if self.http_port is None:  # the view may announce itself just after the listener
            found = wait_until(lambda: re.search(r"HTTP view on http://[\d.]+:(\d+)/", self.log()), 10, "the HTTP view to start")
            self.http_port = int(found.group(1))

        headers = dict(headers or {})
        if method == "POST":  # the view's one state-changing route takes JSON only
            headers.setdefault("Content-Type", "application/json")
        request = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def stats(self) -> dict:
        while True:
            try:
                return json.loads(self.status_path.read_text())
            except (OSError, ValueError):
                time.sleep(0.01)  # replaced between our open and read; read the new one

    def backend(self, label: str) -> dict:
        found = [b for b in self.stats()["backends"] if b["backend"] == label]
        return found[0] if found else {}

    def wait_for(self, predicate, timeout: float = 15.0, what: str = "condition") -> dict:
        last = {}

        def check():
            nonlocal last
            last = self.stats()
            return predicate(last)

        try:
            wait_until(check, timeout, what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last statistics: {json.dumps(last)[:3000]}\nlog:\n{self.log()[-3000:]}") from None
        return last

    def send_signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"sidecar did not stop within {timeout}s after {signal.Signals(signum).name}:\n{self.log()[-3000:]}")

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def send(self, messages: list[dict], encoding: str = "json") -> None:
        """Send over one new connection, then close it."""
        self.send_raw(encode(messages, encoding))

    def send_raw(self, payload: bytes) -> None:
        with self.connect() as conn:
            conn.sendall(payload)
            conn.shutdown(socket.SHUT_WR)
            conn.recv(1)  # the sidecar closes after reading everything


def encode(messages: list[dict], encoding: str = "json") -> bytes:
    if encoding == "msgpack":
        return b"".join(msgpack.packb(m) for m in messages)
    return b"".join(orjson.dumps(m) + b"\n" for m in messages)


class SteadySender(threading.Thread):
    """Sends numbered events from one source at a steady rate over one connection until stopped:
    every 5 ms, what is due by then (so thousands per second need no finer sleep)."""

    def __init__(self, sidecar: SidecarProcess, source: str, per_second: int = 500, make_message=event):
        super().__init__(daemon=True)
        self.make_message = make_message
        self.sidecar = sidecar
        self.source = source
        self.per_second = per_second
        self.sent = 0
        self._stopping = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with self.sidecar.connect() as conn:
                started = time.monotonic()
                while not self._stopping.is_set():
                    due = int((time.monotonic() - started) * self.per_second) + 1
                    if due > self.sent:
                        now = time.time()
                        conn.sendall(b"".join(orjson.dumps(self.make_message(self.source, seq, sent_at=now)) + b"\n" for seq in range(self.sent, due)))
                        self.sent = due
                    time.sleep(0.005)
                conn.shutdown(socket.SHUT_WR)
                conn.recv(1)
        except BaseException as exc:  # reported by stop(), on the test's thread
            self.error = exc

    def stop(self) -> int:
        self._stopping.set()
        self.join(10)
        if self.error is not None:
            raise self.error
        return self.sent


def outage(sidecar: SidecarProcess, label: str, stop_server, start_server, seconds: float = 10.0) -> tuple[int, float]:
    """Stop a backend's server for `seconds` (from its circuit opening) while senders go on; the
    messages its backend held at the end, and the seconds from the server being back to its
    first delivery."""
    stop_server()
    try:
        sidecar.wait_for(lambda s: sidecar.backend(label).get("circuit") == "open", timeout=30, what="the circuit to open")
        time.sleep(seconds)
        held = sidecar.backend(label)["queued"]
    finally:
        start_server()
    back = time.monotonic()
    delivered_then = sidecar.backend(label)["delivered"]
    sidecar.wait_for(lambda s: sidecar.backend(label)["delivered"] > delivered_then, timeout=10, what="delivery to resume")
    resumed_after = time.monotonic() - back
    print(f"backend {label}: delivery resumed {resumed_after:.2f} s after its server was back; {held} were held")
    return held, resumed_after
