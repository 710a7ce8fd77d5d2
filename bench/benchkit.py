"""What the benchmarks share: a sidecar subprocess on a free port, and clients that send
prepared bytes over real sockets."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path


def start_sidecar(work: Path, config: str, env: dict | None = None, status_interval: float = 1.0) -> tuple[subprocess.Popen, int]:
    """`monitoring-sidecar run` on `config` (written to work/sidecar.yaml); returns it and its port."""
    (work / "sidecar.yaml").write_text(config)
    status = work / "status.json"
    stderr = work / "sidecar.stderr"
    sidecar = subprocess.Popen(
        [
            sys.executable, "-m", "sidecar", "run", "--config", str(work / "sidecar.yaml"), "--status-file", str(status),
            "--status-interval", str(status_interval), "--log-level", "warning", "--http", "127.0.0.1:0",
        ],
        stdout=subprocess.DEVNULL, stderr=stderr.open("wb"), stdin=subprocess.DEVNULL, cwd=work, env={**os.environ, **(env or {})},
    )
    deadline = time.monotonic() + 20
    while True:
        if time.monotonic() > deadline or sidecar.poll() is not None:
            sidecar.kill()
            raise SystemExit(f"sidecar did not start:\n{stderr.read_text()}")
        try:
            return sidecar, int(json.loads(status.read_text())["sources"]["tcp"]["address"].rsplit(":", 1)[1])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            time.sleep(0.02)


def send(port: int, data: bytes) -> None:
    """One connection: all of `data` in 256 KiB writes, then wait for the sidecar to close."""
    with socket.create_connection(("127.0.0.1", port)) as conn:
        view = memoryview(data)
        for start in range(0, len(view), 1 << 18):
            conn.sendall(view[start : start + (1 << 18)])
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)


def senders(port: int, payloads: list[bytes]) -> list[threading.Thread]:
    """One thread per payload, not started yet."""
    return [threading.Thread(target=send, args=(port, payload)) for payload in payloads]
