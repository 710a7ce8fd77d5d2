"""A capture server on a real TCP or Unix socket, and helpers to wait on it with deadlines."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from typing import Callable

import pytest

PROPAGATED = ("TRACEPARENT", "MONITORING_CONTEXT", "MONITORING_SIDECAR", "MONITORING_SOURCE", "MONITORING_SIDECAR_TOKEN")


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


def free_port() -> int:
    """A port with nothing listening on it (for the 'sidecar down' cases)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class CaptureServer:
    """Listens on 127.0.0.1 (or on the Unix socket ``unix``) and records every byte of every
    connection, in accept order.

    With ``read=False`` it accepts connections but never reads from them.
    """

    def __init__(self, port: int = 0, read: bool = True, rcvbuf: int | None = None, unix: str | None = None) -> None:
        if unix is not None:
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listener.bind(unix)
            self.port = 0
        else:
            self.listener = socket.socket()
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if rcvbuf:
                self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self.listener.bind(("127.0.0.1", port))
            self.port = self.listener.getsockname()[1]
        self.listener.listen(16)
        self.unix = unix
        self.read = read
        self.streams: list[bytearray] = []
        self.conns: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                self.conns.append(conn)
                self.streams.append(bytearray())
                stream = self.streams[-1]
            if self.read:
                threading.Thread(target=self._drain, args=(conn, stream), daemon=True).start()

    def _drain(self, conn: socket.socket, stream: bytearray) -> None:
        while True:
            try:
                chunk = conn.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            with self.lock:
                stream += chunk

    def raw(self) -> bytes:
        with self.lock:
            return b"".join(bytes(s) for s in self.streams)

    def connection_bytes(self) -> list[bytes]:
        with self.lock:
            return [bytes(s) for s in self.streams]

    def lines(self) -> list[bytes]:
        """Complete lines of all connections, in order (an unterminated tail is left out)."""
        with self.lock:
            streams = [bytes(s) for s in self.streams]
        out: list[bytes] = []
        for stream in streams:
            out.extend(stream.split(b"\n")[:-1])
        return out

    def messages(self) -> list[dict]:
        return [json.loads(line) for line in self.lines()]

    def wait_messages(self, count: int, timeout: float = 5.0) -> list[dict]:
        assert wait_until(lambda: len(self.lines()) >= count, timeout), \
            f"expected {count} messages, got {len(self.lines())}"
        return self.messages()

    def stop(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept(); close() alone does not
        except OSError:
            pass
        self.listener.close()
        if self.unix is not None and os.path.exists(self.unix):
            os.unlink(self.unix)  # a restarted server binds the path again
        with self.lock:
            for conn in self.conns:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                conn.close()


@pytest.fixture(autouse=True)
def clean_environment():
    """The SDK exports propagation variables into os.environ; keep tests independent."""
    saved = {name: os.environ.pop(name, None) for name in PROPAGATED}
    yield
    for name, value in saved.items():
        os.environ.pop(name, None)
        if value is not None:
            os.environ[name] = value


@pytest.fixture
def server():
    srv = CaptureServer()
    yield srv
    srv.stop()
