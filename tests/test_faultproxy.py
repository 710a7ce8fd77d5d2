"""The fault proxy the outage tests and the soak put in front of servers: each mode does what
it says, over real sockets."""

import socket
import socketserver
import threading

import pytest

from tests.faultproxy import FaultProxy
from tests.harness import wait_until


class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture
def proxy():
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Echo)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with FaultProxy(server.server_address) as proxy:
        yield proxy
    server.shutdown()
    server.server_close()


def connect(proxy):
    conn = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    return conn


def test_pass_forwards_both_ways(proxy):
    with connect(proxy) as conn:
        conn.sendall(b"hello")
        assert conn.recv(100) == b"hello"


def test_a_black_hole_holds_everything_until_it_heals(proxy):
    with connect(proxy) as conn:
        proxy.set("black_hole")
        conn.sendall(b"held")
        conn.settimeout(0.3)
        with pytest.raises(socket.timeout):
            conn.recv(100)
        proxy.set("pass")
        conn.settimeout(5)
        assert conn.recv(100) == b"held"


def test_reset_cuts_open_connections_and_refuse_closes_the_port(proxy):
    with connect(proxy) as conn:
        conn.sendall(b"x")
        assert conn.recv(10) == b"x"
        proxy.set("reset")
        with pytest.raises(ConnectionResetError):
            conn.recv(10)
    proxy.set("refuse")
    wait_until(lambda: _refused(proxy), what="the port to refuse")
    proxy.set("pass")
    wait_until(lambda: not _refused(proxy), what="the port to listen again")
    with connect(proxy) as conn:
        conn.sendall(b"again")
        assert conn.recv(100) == b"again"


def test_an_unknown_mode_is_refused_by_name(proxy):
    with pytest.raises(ValueError, match="mode must be one of pass, latency, reset, black_hole, refuse, got 'flaky'"):
        proxy.set("flaky")


def _refused(proxy) -> bool:
    try:
        socket.create_connection(("127.0.0.1", proxy.port), timeout=1).close()
        return False
    except ConnectionRefusedError:
        return True


def test_latency_holds_each_chunk_for_the_delay(proxy):
    import time

    proxy.set("latency")
    with connect(proxy) as conn:
        started = time.monotonic()
        conn.sendall(b"slow")
        assert conn.recv(100) == b"slow"
        assert time.monotonic() - started >= 2 * proxy.delay  # there and back, a delay each
