"""The forward source (`type: forward`) in a real sidecar, fed by clients nobody here wrote
(PyPI's fluent-logger: its sync and async senders) and by a client written in this file from
the Forward Protocol Specification v1 (PackedForward, CompressedPackedForward, acks, the
shared-key handshake, TLS); what arrives is read from the files backend."""

import gzip
import hashlib
import logging
import os
import socket
import ssl
import subprocess
import sys
import time

import msgpack
import pytest
import trio
import trio.testing
import trustme
from fluent import asyncsender, sender

from sidecar.metrics import Counters
from sidecar.sources import Intake
from sidecar.sources.forward import ForwardSettings, ForwardSource
from tests.harness import REPO, SidecarProcess, read_jsonl, wait_until

CONFIG = """
sources:
  fluent:
    type: forward
    host: 127.0.0.1
    port: 0
{extra}
backends:
  files: {{type: filesystem, base_path: {base}, create_base_path: true, batch: {{timeout: 0.05}}}}
routing:
  all: [{{backend: files}}]
"""


def start(tmp_path, extra: str = "", env: dict | None = None) -> SidecarProcess:
    indented = "\n".join(f"    {line}" for line in extra.strip().splitlines())
    return SidecarProcess(tmp_path, CONFIG.format(extra=indented, base=tmp_path / "out"), env=env).start()


def fluent_port(sidecar: SidecarProcess) -> int:
    return int(sidecar.stats()["sources"]["fluent"]["address"].rsplit(":", 1)[1])


def delivered(sidecar: SidecarProcess, count: int) -> dict:
    return sidecar.wait_for(lambda s: s["backends"][0]["delivered"] >= count, what=f"{count} delivered")


def metric(sidecar: SidecarProcess, line: str) -> bool:
    return line in sidecar.http("/metrics")[1].decode()


def event_time(seconds: int, nanoseconds: int) -> msgpack.ExtType:
    return msgpack.ExtType(0, seconds.to_bytes(4, "big") + nanoseconds.to_bytes(4, "big"))


class ForwardClient:
    """A forward client after the spec: the handshake when the server greets with HELO,
    frames out, acks and PONG back."""

    def __init__(self, port: int, *, tls_context: ssl.SSLContext | None = None):
        self.socket = socket.create_connection(("127.0.0.1", port), timeout=10)
        if tls_context is not None:
            self.socket = tls_context.wrap_socket(self.socket, server_hostname="localhost")
        self.unpacker = msgpack.Unpacker(raw=False)

    def read(self):
        """The next MessagePack value from the server; None when it closed."""
        while True:
            try:
                return next(self.unpacker)
            except StopIteration:
                try:
                    data = self.socket.recv(65536)
                except ConnectionResetError:  # it closed while we were still sending
                    return None
                if not data:
                    return None
                self.unpacker.feed(data)

    def handshake(self, key: bytes, hostname: str = "client.example", username: str = "", password: str = ""):
        """HELO in, PING out: the PONG, its own digest checked when the server says yes."""
        helo = self.read()
        assert helo[0] == "HELO" and len(helo[1]["nonce"]) == 16
        nonce, auth_salt = helo[1]["nonce"], helo[1]["auth"]
        salt = os.urandom(16)
        digest = hashlib.sha512(salt + hostname.encode() + nonce + key).hexdigest()
        password_digest = hashlib.sha512(auth_salt + username.encode() + password.encode()).hexdigest() if username else ""
        self.send(["PING", hostname, salt, digest, username, password_digest])
        pong = self.read()
        if pong is not None and pong[1]:
            assert pong[4] == hashlib.sha512(salt + pong[3].encode() + nonce + key).hexdigest(), "the server knows the key too"
        return pong

    def send(self, frame) -> None:
        self.socket.sendall(frame if isinstance(frame, bytes) else msgpack.packb(frame, use_bin_type=True))

    def close(self) -> None:
        self.socket.close()


def packed(entries) -> bytes:
    return b"".join(msgpack.packb(entry, use_bin_type=True) for entry in entries)


# -- clients nobody here wrote ------------------------------------------------------------


def test_fluent_logger_senders_deliver_every_record_mapped(tmp_path):
    sidecar = start(tmp_path)
    try:
        port = fluent_port(sidecar)
        plain = sender.FluentSender("app", host="127.0.0.1", port=port)
        for seq in range(20):
            assert plain.emit("seconds", {"message": f"s{seq}", "level": "WARN", "seq": seq}), plain.last_error
        plain.close()
        precise = sender.FluentSender("app", host="127.0.0.1", port=port, nanosecond_precision=True)
        for seq in range(20):
            assert precise.emit_with_time("nanos", 1700000000 + seq * 0.125, {"log": f"n{seq}", "seq": seq}), precise.last_error
        precise.close()
        background = asyncsender.FluentSender("app", host="127.0.0.1", port=port)
        for seq in range(20):
            assert background.emit("async", {"log": f"a{seq}", "severity": "error", "seq": seq})
        background.close()  # sends what it queued, then stops its thread
        delivered(sidecar, 60)
    finally:
        assert sidecar.stop() == 0
    out = tmp_path / "out"
    seconds = read_jsonl(out / "app.seconds.jsonl")
    assert [m["data"] for m in seconds] == [{"level": "warning", "message": f"s{seq}", "seq": seq} for seq in range(20)]
    assert all(m["type"] == "event" and m["timestamp"].endswith(".000Z") for m in seconds)
    nanos = read_jsonl(out / "app.nanos.jsonl")
    assert [(m["timestamp"], m["data"]) for m in nanos] == [(f"2023-11-14T22:13:{20 + seq // 8}.{seq % 8 * 125:03d}Z", {"level": "info", "message": f"n{seq}", "seq": seq}) for seq in range(20)]
    background_messages = read_jsonl(out / "app.async.jsonl")
    assert [m["data"] for m in background_messages] == [{"level": "error", "message": f"a{seq}", "seq": seq} for seq in range(20)]
    assert {m["source"] for m in seconds + nanos + background_messages} == {"app.seconds", "app.nanos", "app.async"}


def test_fluent_logger_over_a_unix_socket_with_a_tag_prefix(tmp_path):
    path = tmp_path / "fluent.sock"
    sidecar = SidecarProcess(tmp_path, CONFIG.replace("host: 127.0.0.1\n    port: 0", f"unix: {path}\n    tag_prefix: docker.").format(extra="", base=tmp_path / "out"))
    sidecar.config_path.write_text(sidecar.config_path.read_text() + "tcp: {host: 127.0.0.1, port: 0}\n")  # for the harness's wait
    sidecar.start()
    try:
        client = sender.FluentSender("docker", host=f"unix://{path}")
        for seq in range(5):
            assert client.emit("web", {"log": f"line {seq}", "container_name": "/web"}), client.last_error
        client.close()
        delivered(sidecar, 5)
    finally:
        assert sidecar.stop() == 0
    assert [m["data"]["message"] for m in read_jsonl(tmp_path / "out" / "web.jsonl")] == [f"line {seq}" for seq in range(5)]


GO_CLIENT = REPO / "tests" / "clients" / "fluent_go"


@pytest.fixture(scope="module")
def go_fluent_client(tmp_path_factory):
    """tests/clients/fluent_go built: fluent-logger-golang, the library of Docker's fluentd
    log driver (from the Go module proxy, pinned by its go.sum)."""
    binary = tmp_path_factory.mktemp("go") / "fluentclient"
    built = subprocess.run(["go", "build", "-o", str(binary), "."], cwd=GO_CLIENT, capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr
    return binary


@pytest.mark.parametrize("mode", ["ack", "subsecond", "async", "plain"])
def test_the_go_library_of_dockers_fluentd_log_driver_delivers_every_record(tmp_path, go_fluent_client, mode):
    sidecar = start(tmp_path, "tag_prefix: docker.")
    try:
        sent = subprocess.run(
            [str(go_fluent_client)], env={**os.environ, "FLUENT_PORT": str(fluent_port(sidecar)), "COUNT": "300", "MODE": mode, "TAG": "docker.web"},
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        )
        assert sent.returncode == 0, sent.stderr
        delivered(sidecar, 300)
    finally:
        assert sidecar.stop() == 0
    messages = read_jsonl(tmp_path / "out" / "web.jsonl")
    assert [m["data"]["message"] for m in messages] == [f"line {i}" for i in range(300)]
    assert all(m["type"] == "event" and m["source"] == "web" for m in messages)
    assert messages[0]["data"] | {"message": "x"} == {"level": "info", "message": "x", "container_id": "3f2a9c1b7d4e", "container_name": "/web", "source": "stdout"}
    if mode in ("ack", "subsecond"):  # EventTime: milliseconds that are not all zero, in general
        assert any(not m["timestamp"].endswith(".000Z") for m in messages)


# -- a client after the spec --------------------------------------------------------------


def test_packed_and_compressed_forward_are_acknowledged(tmp_path):
    sidecar = start(tmp_path)
    try:
        client = ForwardClient(fluent_port(sidecar))
        entries = [[event_time(1700000000, seq * 1_000_000), {"log": f"p{seq}", "seq": seq}] for seq in range(100)]
        client.send(["packed", packed(entries), {"chunk": "cGFja2Vk", "size": 100}])
        assert client.read() == {"ack": "cGFja2Vk"}
        zipped = gzip.compress(packed(entries[:50])) + gzip.compress(packed(entries[50:]))
        client.send(["zipped", zipped, {"chunk": "emlwcGVk", "size": 100, "compressed": "gzip"}])
        assert client.read() == {"ack": "emlwcGVk"}
        client.close()
        delivered(sidecar, 200)
    finally:
        assert sidecar.stop() == 0
    for source in ("packed", "zipped"):
        messages = read_jsonl(tmp_path / "out" / f"{source}.jsonl")
        assert [(m["timestamp"], m["data"]["message"]) for m in messages] == [(f"2023-11-14T22:13:20.{seq:03d}Z", f"p{seq}") for seq in range(100)]


def test_invalid_entries_are_counted_and_the_connection_stays_open(tmp_path):
    sidecar = start(tmp_path)
    try:
        client = ForwardClient(fluent_port(sidecar))
        client.send(["mixed", [
            [1700000000, {"log": "good 1"}],
            [1700000000, "a string, not a record"],
            ["noon", {"log": "a time that is not one"}],
            [1700000000, {"log": "good 2"}],
            [1700000000, {"type": "span", "data": {"name": "s", "phase": "start"}}],  # no span_id
        ], {"chunk": "bWl4ZWQ="}])
        assert client.read() == {"ack": "bWl4ZWQ="}  # received: the valid ones are in, the rest counted
        client.send(["mixed", 1700000001, {"log": "good 3"}, {"chunk": "YWZ0ZXI="}])
        assert client.read() == {"ack": "YWZ0ZXI="}  # the same connection
        client.close()
        delivered(sidecar, 3)
        wait_until(lambda: metric(sidecar, 'sidecar_decode_errors_total{input="fluent",reason="missing_field"} 1.0'), what="the errors counted")
        text = sidecar.http("/metrics")[1].decode()
        assert 'sidecar_decode_errors_total{input="fluent",reason="not_an_object"} 1.0' in text
        assert 'sidecar_decode_errors_total{input="fluent",reason="invalid_timestamp"} 1.0' in text
        assert 'sidecar_messages_received_total{input="fluent"} 3.0' in text
        assert 'sidecar_connections_closed_total{input="fluent"' not in text
    finally:
        assert sidecar.stop() == 0
    assert [m["data"]["message"] for m in read_jsonl(tmp_path / "out" / "mixed.jsonl")] == ["good 1", "good 2", "good 3"]


def test_a_broken_frame_closes_the_connection_with_a_reason_and_others_go_on(tmp_path):
    sidecar = start(tmp_path)
    try:
        port = fluent_port(sidecar)
        broken = ForwardClient(port)
        broken.send(["t", 1, {"log": "before the break"}])
        broken.send(["t", None, {"log": "no mode"}])
        assert broken.read() is None  # closed
        healthy = ForwardClient(port)
        healthy.send(["t", 2, {"log": "another client"}])
        healthy.close()
        delivered(sidecar, 2)
        assert metric(sidecar, 'sidecar_connections_closed_total{input="fluent",reason="unknown_mode"} 1.0')
    finally:
        assert sidecar.stop() == 0
    assert "unknown_mode" in sidecar.log() and "neither a time (Message)" in sidecar.log()


def test_connections_past_the_limit_are_refused_and_counted(tmp_path):
    sidecar = start(tmp_path, "max_connections: 1")
    try:
        port = fluent_port(sidecar)
        first = ForwardClient(port)
        first.send(["t", 1, {"log": "in"}, {"chunk": "MQ=="}])
        assert first.read() == {"ack": "MQ=="}
        second = ForwardClient(port)
        assert second.read() is None
        assert metric(sidecar, 'sidecar_connections_refused_total{input="fluent",reason="limit"} 1.0')
        first.close()
    finally:
        assert sidecar.stop() == 0


# -- the handshake -----------------------------------------------------------------------


def test_the_shared_key_handshake_right_and_wrong(tmp_path):
    extra = "shared_key_env: FLUENT_SHARED_KEY\nself_hostname: sidecar.example\nusers: [{username: alice, password_env: FLUENT_ALICE}]"
    sidecar = start(tmp_path, extra, env={"FLUENT_SHARED_KEY": "s3cr3t-key", "FLUENT_ALICE": "alice-pw"})
    try:
        port = fluent_port(sidecar)
        right = ForwardClient(port)
        assert right.handshake(b"s3cr3t-key", username="alice", password="alice-pw")[:4] == ["PONG", True, "", "sidecar.example"]
        right.send(["auth", 1700000000, {"log": "authenticated"}, {"chunk": "b2s="}])
        assert right.read() == {"ack": "b2s="}
        right.close()

        wrong = ForwardClient(port)
        assert wrong.handshake(b"not-the-key") == ["PONG", False, "shared_key mismatch", "sidecar.example", ""]
        wrong.send(["auth", 1700000000, {"log": "never delivered"}])
        assert wrong.read() is None  # closed after PONG

        bad_password = ForwardClient(port)
        assert bad_password.handshake(b"s3cr3t-key", username="alice", password="guess")[1:3] == [False, "username/password mismatch"]

        no_handshake = ForwardClient(port)
        assert no_handshake.read()[0] == "HELO"
        no_handshake.send(["auth", 1700000000, {"log": "skipping the handshake"}])
        assert no_handshake.read() is None

        delivered(sidecar, 1)
        wait_until(lambda: metric(sidecar, 'sidecar_connections_closed_total{input="fluent",reason="auth_failed"} 2.0'), what="the failures counted")
        assert metric(sidecar, 'sidecar_connections_closed_total{input="fluent",reason="auth_required"} 1.0')
        stats = sidecar.stats()
        assert stats["sources"]["fluent"]["handshake"] is True and stats["received"] == 1
    finally:
        assert sidecar.stop() == 0
    assert [m["data"]["message"] for m in read_jsonl(tmp_path / "out" / "auth.jsonl")] == ["authenticated"]
    assert "shared_key mismatch" in sidecar.log()
    for secret in ("s3cr3t-key", "alice-pw"):
        assert secret not in sidecar.log() and secret not in sidecar.status_path.read_text()


def test_check_never_shows_a_shared_key(tmp_path):
    config = tmp_path / "sidecar.yaml"
    config.write_text("sources:\n  a: {type: forward, port: 0, shared_key: literal-secret}\n  b: {type: forward, port: 0, shared_key_env: KEY_B}\n")
    shown = subprocess.run([sys.executable, "-m", "sidecar", "check", "--config", str(config)], cwd=REPO, env={**os.environ, "KEY_B": "env-secret"}, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert "source a (forward): 127.0.0.1:0" in shown.stdout
    assert "literal-secret" not in shown.stdout + shown.stderr and "env-secret" not in shown.stdout + shown.stderr
    unset = subprocess.run([sys.executable, "-m", "sidecar", "check", "--config", str(config)], cwd=REPO, env={k: v for k, v in os.environ.items() if k != "KEY_B"}, capture_output=True, text=True, timeout=60)
    assert unset.returncode == 2 and f"{config}:3: sources.b.shared_key_env: environment variable KEY_B is not set" in unset.stderr


# -- TLS ----------------------------------------------------------------------------------


def test_tls_with_the_handshake(tmp_path):
    authority = trustme.CA()
    certificate = authority.issue_cert("localhost", "127.0.0.1")
    certificate.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    certificate.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    extra = f"shared_key_env: FLUENT_SHARED_KEY\ntls: {{cert: {tmp_path / 'cert.pem'}, key: {tmp_path / 'key.pem'}}}"
    sidecar = start(tmp_path, extra, env={"FLUENT_SHARED_KEY": "k"})
    try:
        context = ssl.create_default_context()
        authority.configure_trust(context)
        client = ForwardClient(fluent_port(sidecar), tls_context=context)
        assert client.handshake(b"k")[1] is True
        client.send(["secure", [[1700000000, {"log": "over TLS"}]], {"chunk": "dGxz"}])
        assert client.read() == {"ack": "dGxz"}
        client.close()
        plaintext = ForwardClient(fluent_port(sidecar))
        plaintext.send(["secure", 1, {"log": "not TLS"}])
        assert plaintext.read() is None
        delivered(sidecar, 1)
        wait_until(lambda: metric(sidecar, 'sidecar_connections_refused_total{input="fluent",reason="tls"} 1.0'), what="the plaintext client counted")
        assert sidecar.stats()["sources"]["fluent"]["tls"] is True
    finally:
        assert sidecar.stop() == 0
    assert [m["data"]["message"] for m in read_jsonl(tmp_path / "out" / "secure.jsonl")] == ["over TLS"]


# -- in-process: when the ack goes --------------------------------------------------------


async def test_an_ack_goes_only_after_the_messages_are_handed_over():
    counters = Counters()
    source = ForwardSource("fluent", ForwardSettings(port=0), Intake("fluent", counters, logging.getLogger("test")))
    send_channel, receive_channel = trio.open_memory_channel(0)  # nothing is taken until the test takes it
    async with trio.open_nursery() as nursery:
        host, port = (await nursery.start(source.run, send_channel)).rsplit(":", 1)
        client = socket.create_connection((host, int(port)))
        client.sendall(msgpack.packb(["t", [[1, {"log": "m"}]], {"chunk": "Yw=="}]))
        with trio.fail_after(10):
            while not any(c.bytes for c in source.connections.values()):
                await trio.sleep(0.01)  # until the source has read the frame
        await trio.testing.wait_all_tasks_blocked()  # and is waiting on the channel
        client.setblocking(False)
        with pytest.raises(BlockingIOError):
            client.recv(100)  # no ack while the messages are not handed over
        client.setblocking(True)
        _received_at, messages, _holds = await receive_channel.receive()
        assert [m["data"]["message"] for m in messages] == ["m"]
        client.settimeout(10)
        assert msgpack.unpackb(await trio.to_thread.run_sync(client.recv, 100)) == {"ack": "Yw=="}
        client.close()
        source.stop_accepting()
        source.close_connections(0)
    assert counters.get("messages_received_total", input="fluent") == 1


async def test_a_client_that_never_finishes_the_handshake_is_closed(autojump_clock):
    source = ForwardSource("fluent", ForwardSettings(port=0, shared_key="k", handshake_timeout=10), Intake("fluent", Counters(), logging.getLogger("test")))
    send_channel, _receive_channel = trio.open_memory_channel(1)
    async with trio.open_nursery() as nursery:
        host, port = (await nursery.start(source.run, send_channel)).rsplit(":", 1)
        stream = await trio.open_tcp_stream(host, int(port))
        helo = msgpack.unpackb(await stream.receive_some(1000))
        assert helo[0] == "HELO"
        with trio.fail_after(60):  # on the mock clock: the handshake's 10 s come first
            assert await stream.receive_some(1000) == b""
        assert source.intake.counters.get("connections_closed_total", input="fluent", reason="handshake_timeout") == 1
        await stream.aclose()
        source.stop_accepting()
        source.close_connections(0)
