"""The tcp source's transport guards: a Unix socket's file permissions (`mode`), which the
kernel enforces, and the ingest token (`token_env`): a connection's first message must be
`{"auth": TOKEN}`, and nothing of a client that does not send it reaches the correlator."""

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import msgpack
import orjson
import pytest
import trio
from hypothesis import assume, given
from hypothesis import strategies as st

from sidecar.config import ConfigError, load_config
from sidecar.metrics import Counters
from sidecar.ingest import NATIVE_AVAILABLE, TraceJobs
from sidecar.protocol import MAX_AUTH_MESSAGE_SIZE, AuthCheck, AuthRefused, UnusedAuth
from sidecar.sources import Intake
from sidecar.sources.tcp import TcpSettings, TcpSource
from tests.harness import SidecarProcess, encode, event, read_jsonl, seqs, wait_until
from tests.test_cli import cli

TOKEN = "s3cr3t-ingest-token"


def auth_message(token: str, encoding: str = "json") -> bytes:
    if encoding == "msgpack":
        return msgpack.packb({"auth": token})
    return orjson.dumps({"auth": token}) + b"\n"


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)])]


# -- the sans-IO check ----------------------------------------------------------------------------

@given(
    token=st.text(min_size=1, max_size=200),
    encoding=st.sampled_from(["json", "msgpack"]),
    rest=st.binary(max_size=300),
    cuts=st.lists(st.integers(0, 1200), max_size=6),
)
def test_the_auth_message_passes_however_it_is_split_and_leaves_what_follows_untouched(token, encoding, rest, cuts):
    check = AuthCheck(token.encode())
    passed, after = None, b""
    for piece in split(auth_message(token, encoding) + rest, cuts):
        if passed is None:
            passed = check.receive_data(piece)
        else:
            after += piece
    assert passed is not None and passed + after == rest


@given(token=st.text(min_size=1, max_size=60), other=st.text(min_size=1, max_size=60), encoding=st.sampled_from(["json", "msgpack"]))
def test_any_other_token_is_refused_and_the_refusal_names_neither(token, other, encoding):
    assume(token != other)
    with pytest.raises(AuthRefused) as refused:
        AuthCheck(token.encode()).receive_data(auth_message(other, encoding) + b"{}\n")
    assert refused.value.detail == "authentication failed: wrong token"


@given(data=st.binary(min_size=1, max_size=600))
def test_arbitrary_bytes_pass_only_as_an_auth_message_with_the_token(data):
    check = AuthCheck(TOKEN.encode(), max_size=512)
    try:
        rest = check.receive_data(data)
    except AuthRefused:
        return
    if rest is None:  # incomplete, and within the bound
        assert len(data) <= 512
        return
    first = data[: len(data) - len(rest)]
    value = orjson.loads(first) if first[:1] == b"{" else msgpack.unpackb(first)
    assert value == {"auth": TOKEN}


@pytest.mark.parametrize("first", [
    b'{"source":"svc","type":"event","data":{"level":"info","message":"m"}}\n',  # a message, no auth
    b'{"auth": 17}\n',
    b'{"auth": "' + TOKEN.encode() + b'", "source": "svc"}\n',  # the token, but not alone
    b'{"auth": "' + TOKEN.encode() + b'"\n',  # not JSON
    b'["auth"]\n',
    msgpack.packb({"auth": TOKEN.encode()}),  # bytes, not a string
    msgpack.packb({"token": TOKEN}),
    b"\x93\x01\x02\x03",  # an array: not a map header
    b"GET / HTTP/1.1\r\n\r\n",
])
def test_a_first_message_that_is_not_the_auth_message_is_refused(first):
    with pytest.raises(AuthRefused, match=r'the first message must be \{"auth": "<token>"\}'):
        AuthCheck(TOKEN.encode()).receive_data(first)


def test_a_first_message_longer_than_the_bound_is_refused_unread():
    check = AuthCheck(TOKEN.encode())
    assert check.receive_data(b'{"auth": "' + b"x" * (MAX_AUTH_MESSAGE_SIZE - 20)) is None  # still within it
    with pytest.raises(AuthRefused, match=f"no auth message within its first {MAX_AUTH_MESSAGE_SIZE} bytes"):
        check.receive_data(b"x" * 100)
    with pytest.raises(AuthRefused, match="within its first"):
        AuthCheck(TOKEN.encode()).receive_data(msgpack.packb({"auth": "x" * (2 * MAX_AUTH_MESSAGE_SIZE)}))


def through_unused_auth(pieces: list[bytes]) -> bytes:
    unused, out = UnusedAuth(), b""
    for piece in pieces:
        if piece:
            passed = unused.receive_data(piece)
            out += passed if passed is not None else b""
    return out + unused.receive_eof()


@given(token=st.text(max_size=100), encoding=st.sampled_from(["json", "msgpack"]), rest=st.binary(max_size=300), cuts=st.lists(st.integers(0, 800), max_size=6))
def test_without_a_token_an_auth_message_first_is_dropped_however_it_is_split(token, encoding, rest, cuts):
    assert through_unused_auth(split(auth_message(token, encoding) + rest, cuts)) == rest


@given(data=st.one_of(
    st.binary(max_size=600),
    st.lists(st.builds(lambda seq, auth: {**event("svc", seq), **({"auth": "x"} if auth else {})}, st.integers(0, 99), st.booleans()), max_size=4).map(encode),
    st.lists(st.builds(lambda seq: event("svc", seq), st.integers(0, 99)), max_size=4).map(lambda m: encode(m, "msgpack")),
), cuts=st.lists(st.integers(0, 800), max_size=6))
def test_without_a_token_nothing_but_a_leading_auth_message_is_ever_dropped(data, cuts):
    out = through_unused_auth(split(data, cuts))
    assert data.endswith(out)
    if out != data:  # what was dropped is exactly one auth message
        dropped = data[: len(data) - len(out)]
        value = orjson.loads(dropped) if dropped[:1] == b"{" else msgpack.unpackb(dropped)
        assert set(value) == {"auth"} and isinstance(value["auth"], str)


# -- settings -------------------------------------------------------------------------------------

def test_authenticates_says_whether_a_token_is_required():
    assert not TcpSettings().authenticates
    assert TcpSettings(token_env="SIDECAR_TOKEN").authenticates


def problems(write, text: str, environ: dict) -> list[str]:
    path = write("sidecar.yaml", text)
    with pytest.raises(ConfigError) as error:
        load_config(path, None, environ)
    return [str(p) for p in error.value.problems], path


def test_a_token_variable_that_is_not_set_is_an_error_at_its_line_in_either_section(write):
    found, path = problems(write, "tcp:\n  port: 0\n  token_env: INGEST_TOKEN\n", {})
    assert found == [f"{path}:3: tcp.token_env: environment variable INGEST_TOKEN is not set"]
    found, path = problems(write, "sources:\n  local:\n    type: tcp\n    unix: /tmp/x.sock\n    token_env: INGEST_TOKEN\n", {"INGEST_TOKEN": ""})
    assert found == [f"{path}:5: sources.local.token_env: environment variable INGEST_TOKEN is empty"]
    config = load_config(path, None, {"INGEST_TOKEN": TOKEN})
    assert config.sources["local"].settings.authenticates and TOKEN not in repr(config)


@pytest.mark.parametrize("value, message", [
    ('"0999"', "must be a file mode in octal digits, in quotes (e.g. \"0660\"), got '0999'"),
    ('"rw-rw----"', "must be a file mode in octal digits"),
    ("0660", "must be a string, got an integer (660); write it in quotes"),  # YAML reads it as the decimal 660
])
def test_a_mode_that_is_not_octal_is_an_error_at_its_line(write, value, message):
    found, path = problems(write, f"sources:\n  local:\n    type: tcp\n    unix: /tmp/x.sock\n    mode: {value}\n", {})
    assert len(found) == 1 and found[0].startswith(f"{path}:5: sources.local.mode") and message in found[0], found


def test_forward_and_otlp_sources_take_a_mode_too(write):
    path = write("sidecar.yaml", 'sources:\n  f: {type: forward, unix: /tmp/f.sock, mode: "0600"}\n  o: {type: otlp, unix: /tmp/o.sock, mode: "0640"}\n')
    config = load_config(path, None, {})
    assert (config.sources["f"].settings.mode, config.sources["o"].settings.mode) == ("0600", "0640")


# -- the source, in process, over real sockets ----------------------------------------------------

class Running:
    """A TcpSource listening in the test's nursery, and what it hands over."""

    def __init__(self, source: TcpSource, counters: Counters, receive_channel):
        self.source, self.counters, self.receive_channel = source, counters, receive_channel

    async def connect(self) -> trio.SocketStream:
        address = self.source.address
        if address.startswith("unix:"):
            return await trio.open_unix_socket(address[5:])
        host, port = address.rsplit(":", 1)
        return await trio.open_tcp_stream(host, int(port))

    async def next_messages(self) -> tuple[str, list[dict]]:
        """The next chunk handed over: its decode path, and its messages as the correlator
        enriches them (either path)."""
        with trio.fail_after(5):
            received_at, chunk, _holds = await self.receive_channel.receive()
        enriched = chunk.enrich(received_at, "host", TraceJobs(1000))
        return chunk.path, [orjson.loads(line) for batch in enriched.batches for line in batch.lines]

    def refused(self) -> int:
        return self.counters.get("connections_refused_total", input="tcp", reason="auth")


async def start(nursery, tmp_path, transport: str, **settings) -> Running:
    if transport == "unix":
        settings["unix"] = str(tmp_path / "sidecar.sock")
    else:
        settings["port"] = 0
    counters = Counters()
    source = TcpSource("tcp", TcpSettings(**settings), Intake("tcp", counters, logging.getLogger("test")), native=True)
    send_channel, receive_channel = trio.open_memory_channel(10)
    await nursery.start(source.run, send_channel)
    return Running(source, counters, receive_channel)


async def exchange(running: Running, payload: bytes) -> bytes:
    """Send `payload`, half-close, and read what the sidecar says until it closes."""
    stream = await running.connect()
    async with stream:
        await stream.send_all(payload)
        await stream.send_eof()
        with trio.fail_after(5):
            said = b""
            while chunk := await stream.receive_some(4096):
                said += chunk
            return said


@pytest.mark.parametrize("transport", ["tcp", "unix"])
async def test_with_the_right_token_messages_arrive_and_the_auth_message_is_not_one(tmp_path, monkeypatch, transport):
    monkeypatch.setenv("INGEST_TOKEN", TOKEN)
    async with trio.open_nursery() as nursery:
        running = await start(nursery, tmp_path, transport, token_env="INGEST_TOKEN")
        stream = await running.connect()
        # The auth line and the first messages in one write: split apart, the messages still
        # go to the native decoder.
        await stream.send_all(auth_message(TOKEN) + encode([event("svc", 1), event("svc", 2)]))
        path, messages = await running.next_messages()
        assert seqs(messages) == [1, 2] and path == ("native" if NATIVE_AVAILABLE else "python")
        await stream.send_all(encode([event("svc", 3)]))
        assert seqs((await running.next_messages())[1]) == [3]
        await stream.aclose()

        stream = await running.connect()  # MessagePack, the auth map arriving a byte at a time
        for byte in auth_message(TOKEN, "msgpack"):
            await stream.send_all(bytes([byte]))
        await stream.send_all(encode([event("svc", 4)], "msgpack"))
        _path, messages = await running.next_messages()
        assert seqs(messages) == [4]
        await stream.aclose()
        assert running.refused() == 0 and running.source.statistics()["authenticates"] is True
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("transport", ["tcp", "unix"])
async def test_a_wrong_or_missing_token_is_refused_counted_and_nothing_it_sent_arrives(tmp_path, monkeypatch, caplog, transport):
    monkeypatch.setenv("INGEST_TOKEN", TOKEN)
    async with trio.open_nursery() as nursery:
        running = await start(nursery, tmp_path, transport, token_env="INGEST_TOKEN")
        said = await exchange(running, auth_message("guessed") + encode([event("intruder", 1)]))
        assert said == b"error: authentication failed: wrong token\n"
        said = await exchange(running, encode([event("intruder", 2)]))
        assert said.startswith(b'error: the first message must be {"auth": "<token>"}') and said.endswith(b"\n")
        said = await exchange(running, auth_message(TOKEN)[:10])  # closed in the middle of it
        assert said == b"error: the connection closed before its auth message ended\n"
        assert await exchange(running, b"") == b""  # connected and closed: nothing to refuse
        assert running.refused() == 3
        # The first thing handed over is the honest client's: none of the refused ones' bytes.
        await exchange(running, auth_message(TOKEN) + encode([event("svc", 7)]))
        _path, messages = await running.next_messages()
        assert [(m["source"], m["context"]["seq"]) for m in messages] == [("svc", 7)]
        assert running.counters.get("messages_received_total", input="tcp") == 1
        nursery.cancel_scope.cancel()
    assert "refused" in caplog.text and TOKEN not in caplog.text and "guessed" not in caplog.text


async def test_without_a_token_the_source_takes_any_first_message_and_drops_an_auth_message(tmp_path):
    async with trio.open_nursery() as nursery:
        running = await start(nursery, tmp_path, "tcp")
        await exchange(running, encode([event("svc", 1)]))
        assert seqs((await running.next_messages())[1]) == [1]
        # An SDK given a token before its sidecar requires one: no error for the auth line.
        await exchange(running, auth_message("not needed") + encode([event("svc", 2)]))
        path, messages = await running.next_messages()
        assert seqs(messages) == [2] and path == ("native" if NATIVE_AVAILABLE else "python")
        # A message that merely begins like one is a message.
        await exchange(running, encode([{"auth": "x", **event("svc", 3)}]))
        assert seqs((await running.next_messages())[1]) == [3]
        await exchange(running, b'{"auth": "alone, and no newline"}')
        assert running.counters.get("decode_errors_total", input="tcp", reason="missing_field") == 0
        assert running.source.statistics()["authenticates"] is False and running.refused() == 0
        nursery.cancel_scope.cancel()


# -- the Unix socket's permissions ----------------------------------------------------------------

CLIENT = """
import socket, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    sock.connect(sys.argv[1])
except OSError as exc:
    print("refused", exc.errno)
    sys.exit(0)
sock.sendall(sys.argv[2].encode())
sock.shutdown(socket.SHUT_WR)
sock.recv(1)
print("sent")
"""


@pytest.fixture
def shared_dir():
    """A directory everyone may enter (pytest's tmp_path is the owner's alone), so that what
    refuses another user is the socket's own mode."""
    path = Path(tempfile.mkdtemp(prefix="sidecar-socket-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


async def run_as_nobody(path: Path, payload: bytes) -> str:
    done = await trio.run_process(
        ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups", "/usr/bin/python3", "-c", CLIENT, str(path), payload.decode()],
        capture_stdout=True, capture_stderr=True, check=False,
    )
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode().strip()


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv to run a client as another user")
async def test_a_user_without_permission_on_the_socket_is_refused_by_the_kernel(shared_dir):
    path = shared_dir / "sidecar.sock"
    payload = encode([event("nobody", 1)])
    for mode, expected in (("0660", f"refused {13}"), ("0666", "sent")):  # EACCES; then the control
        counters = Counters()
        source = TcpSource("tcp", TcpSettings(unix=str(path), mode=mode), Intake("tcp", counters, logging.getLogger("test")))
        send_channel, receive_channel = trio.open_memory_channel(10)
        async with trio.open_nursery() as nursery:
            await nursery.start(source.run, send_channel)
            assert oct(path.stat().st_mode & 0o777) == oct(int(mode, 8))
            assert await run_as_nobody(path, payload) == expected
            if expected == "sent":
                with trio.fail_after(5):
                    _received_at, messages, _holds = await receive_channel.receive()
                assert [m["source"] for m in messages] == ["nobody"]
            else:
                assert counters.get("connections_total", input="tcp") == 0  # it never got in
                with pytest.raises(trio.WouldBlock):
                    receive_channel.receive_nowait()
            nursery.cancel_scope.cancel()


# -- a real sidecar: the token never shows ---------------------------------------------------------

SIDECAR = """
tcp: {{host: 127.0.0.1, port: 0, token_env: INGEST_TOKEN}}
sources:
  local: {{type: tcp, unix: {socket}, mode: "0600", token_env: INGEST_TOKEN}}
http: {{enabled: true, host: 127.0.0.1, port: 0}}
backends:
  files: {{type: filesystem, base_path: {base}, create_base_path: true, batch: {{timeout: 0.05}}}}
routing:
  all: [{{backend: files}}]
"""


def unix_exchange(path: Path, payload: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        said = b""
        while chunk := sock.recv(4096):
            said += chunk
        return said


def test_a_sidecar_with_a_token_refuses_counts_and_never_shows_it(tmp_path):
    path = tmp_path / "local.sock"
    config = SIDECAR.format(socket=path, base=tmp_path / "out")
    sidecar = SidecarProcess(tmp_path, config, env={"INGEST_TOKEN": TOKEN}).start()
    try:
        assert oct(path.stat().st_mode & 0o777) == "0o600"
        assert unix_exchange(path, auth_message(TOKEN) + encode([event("svc", 1), event("svc", 2)])) == b""
        assert unix_exchange(path, auth_message(TOKEN[:-1]) + encode([event("svc", 3)])) == b"error: authentication failed: wrong token\n"
        sidecar.send_raw(auth_message(TOKEN, "msgpack") + encode([event("svc", 4)], "msgpack"))  # the tcp: section's source
        with sidecar.connect() as conn:  # no token at all
            conn.sendall(encode([event("svc", 5)]))
            assert conn.recv(4096).startswith(b'error: the first message must be {"auth"')
        stats = sidecar.wait_for(lambda s: s["backends"][0]["delivered"] == 3, what="the three authenticated messages")
        assert sorted(seqs(read_jsonl(tmp_path / "out" / "svc.jsonl"))) == [1, 2, 4]
        status, metrics = sidecar.http("/metrics")
        text = metrics.decode()
        assert 'sidecar_connections_refused_total{input="local",reason="auth"} 1.0' in text
        assert 'sidecar_connections_refused_total{input="tcp",reason="auth"} 1.0' in text
        assert stats["sources"]["local"]["authenticates"] is True
        shown = [text, json.dumps(stats), sidecar.log()]
        for route in ("/api/statistics", "/api/routes", "/api/backends"):
            shown.append(sidecar.http(route)[1].decode(errors="replace"))
    finally:
        assert sidecar.stop() == 0
    checked = cli("check", "--config", str(sidecar.config_path), env={"INGEST_TOKEN": TOKEN})
    assert checked.returncode == 0, checked.stderr
    assert f"source local (tcp): unix:{path}" in checked.stdout
    shown += [checked.stdout, checked.stderr, sidecar.log()]
    assert not [s for s in shown if TOKEN in s]
    refused = cli("check", "--config", str(sidecar.config_path), env={"INGEST_TOKEN": ""})
    assert refused.returncode != 0 and f"{sidecar.config_path}:2: tcp.token_env: environment variable INGEST_TOKEN is empty" in refused.stderr + refused.stdout


def test_send_goes_over_a_unix_socket_and_sends_the_token_first(tmp_path):
    """`monitoring-sidecar send` takes MONITORING_SIDECAR=unix:PATH as the SDKs do, and sends
    MONITORING_SIDECAR_TOKEN's auth message first; a wrong token delivers nothing."""
    path = tmp_path / "local.sock"
    sidecar = SidecarProcess(tmp_path, SIDECAR.format(socket=path, base=tmp_path / "out"), env={"INGEST_TOKEN": TOKEN}).start()
    try:
        sent = cli("send", "--source", "svc", "--message", "over unix", env={"MONITORING_SIDECAR": f"unix:{path}", "MONITORING_SIDECAR_TOKEN": TOKEN})
        assert sent.returncode == 0, sent.stderr
        assert sent.stdout.strip() == f"sent 1 message to unix:{path} (from $MONITORING_SIDECAR)"
        refused = cli("send", "--source", "svc", "--message", "wrong token", env={"MONITORING_SIDECAR": f"unix:{path}", "MONITORING_SIDECAR_TOKEN": "nope"})
        assert refused.returncode == 0  # the refusal comes after the write: counted by the sidecar
        sidecar.wait_for(lambda s: s["backends"][0]["delivered"] == 1, what="the message sent with the token")
        wait_until(lambda: 'sidecar_connections_refused_total{input="local",reason="auth"} 1.0' in sidecar.http("/metrics")[1].decode(), 10, "the refusal to be counted")
        [delivered] = read_jsonl(tmp_path / "out" / "svc.jsonl")
        assert delivered["data"]["message"] == "over unix"
        missing = cli("send", "--message", "x", env={"MONITORING_SIDECAR": f"unix:{tmp_path / 'none.sock'}"})
        assert missing.returncode == 1 and f"cannot send to the sidecar at unix:{tmp_path / 'none.sock'}" in missing.stderr
    finally:
        assert sidecar.stop() == 0
    assert TOKEN not in sidecar.log()
