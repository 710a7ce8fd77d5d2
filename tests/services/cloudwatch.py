"""A CloudWatch Logs emulator for the tests: moto in server mode (PyPI `moto[server]`) on
127.0.0.1 at a free port, one subprocess per session.

moto does not enforce PutLogEvents' size and count limits, so tests put a `RecordingProxy` between
the sidecar and moto: it forwards every request, records each PutLogEvents body for assertions,
and can answer the next requests with a canned error (throttling, access denied) instead.
"""

import http.client
import http.server
import json
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from tests.services.s3 import free_port

REGION = "us-east-1"
# moto accepts any credentials; fixed ones keep the sidecar off the machine's real chain.
ACCESS_KEY = "sidecar-test-access"
SECRET_KEY = "sidecar-test-secret-0123456789"
PUT_LOG_EVENTS = "Logs_20140328.PutLogEvents"


class MotoServer:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self.region = REGION
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> "MotoServer":
        with (self.workdir / "moto.out").open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                cwd=self.workdir, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.process.returncode}: {self.output()}")
            try:
                with urllib.request.urlopen(f"{self.endpoint_url}/moto-api/", timeout=2):
                    return self
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto server not ready after {timeout}s: {exc}") from exc
                time.sleep(0.1)

    def output(self) -> str:
        path = self.workdir / "moto.out"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def client(self, endpoint_url: str | None = None):
        import boto3

        return boto3.client("logs", endpoint_url=endpoint_url or self.endpoint_url, region_name=self.region, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)

    def events(self, group: str, stream: str) -> list[dict]:
        """Every event of a stream, read back with boto3 (oldest first)."""
        client = self.client()
        events: list[dict] = []
        token = None
        while True:
            kwargs = {"nextToken": token} if token else {}
            page = client.get_log_events(logGroupName=group, logStreamName=stream, startFromHead=True, **kwargs)
            events.extend(page["events"])
            if not page["events"] or page.get("nextForwardToken") == token:
                return events
            token = page["nextForwardToken"]

    def streams(self, group: str) -> list[str]:
        client = self.client()
        names: list[str] = []
        kwargs = {}
        try:
            while True:
                page = client.describe_log_streams(logGroupName=group, **kwargs)
                names.extend(s["logStreamName"] for s in page["logStreams"])
                if not page.get("nextToken") or not page["logStreams"]:
                    return sorted(names)
                kwargs = {"nextToken": page["nextToken"]}
        except client.exceptions.ResourceNotFoundException:
            return []

    def groups(self, prefix: str = "/") -> list[str]:
        pages = self.client().get_paginator("describe_log_groups").paginate(logGroupNamePrefix=prefix)
        return sorted(g["logGroupName"] for page in pages for g in page["logGroups"])


class RecordingProxy:
    """An HTTP proxy in front of moto that records PutLogEvents bodies and can inject errors."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.requests: list[dict] = []  # decoded PutLogEvents bodies, in arrival order
        self.failures: list[tuple[int, str, str]] = []  # (status, code, message) for the next PutLogEvents calls
        self.failed = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                target = self.headers.get("X-Amz-Target", "")
                if target == PUT_LOG_EVENTS:
                    with proxy.lock:
                        failure = proxy.failures.pop(0) if proxy.failures else None
                        if failure is None:
                            proxy.requests.append(json.loads(body))
                        else:
                            proxy.failed += 1
                    if failure is not None:
                        status, code, message = failure
                        self._answer(status, json.dumps({"__type": code, "message": message}).encode(), {"Content-Type": "application/x-amz-json-1.1"})
                        return
                upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")}
                    upstream.request("POST", self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    payload = response.read()
                    passed = {k: v for k, v in response.getheaders() if k.lower() not in ("connection", "keep-alive", "transfer-encoding", "content-length")}
                    self._answer(response.status, payload, passed)
                finally:
                    upstream.close()

            def _answer(self, status: int, payload: bytes, headers: dict) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint_url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def fail_next(self, count: int, status: int, code: str, message: str = "injected by the test proxy") -> None:
        with self.lock:
            self.failures.extend([(status, code, message)] * count)

    def recorded(self) -> list[dict]:
        with self.lock:
            return list(self.requests)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="session")
def cloudwatch_server(tmp_path_factory):
    server = MotoServer(tmp_path_factory.mktemp("moto")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def logs_proxy(cloudwatch_server):
    proxy = RecordingProxy(cloudwatch_server.port)
    try:
        yield proxy
    finally:
        proxy.close()
