"""The HTTP view safe by default, replayed against real sidecars over real sockets: the token on
every /api route (and the one a view beyond loopback makes), bearers that are not ASCII, Host and
Origin checks (DNS rebinding, a cross-origin reload), JSON only for what changes something, tap
subscribers bounded and stalled ones costing ingestion nothing, a job of a million spans answered
in pages; and the pure parts (RequestGuard, page_of, Tap, stored_token) by property."""

import json
import os
import re
import socket
import stat
import subprocess
import sys
import threading
import time

import pytest
import trio
from hypothesis import given, strategies as st
from prometheus_client.parser import text_string_to_metric_families

from sidecar.batch import Batch
from sidecar.http import TOKEN_FILE, BadRequest, RequestGuard, TapHub, TokenFileError, is_json, is_loopback, page_of, stored_token
from tests.harness import SidecarProcess, wait_until

TOKEN = "s3cret-t0ken-for-tests"
UNROUTED = """
tcp: {{host: 127.0.0.1, port: 0}}
storage: {{data_dir: {data}}}
http: {{{http}}}
index: {{{index}}}
backends: {{}}
"""


def config(tmp_path, http="", index=""):
    return UNROUTED.format(data=tmp_path / "data", http=http, index=index)


# --- real requests ----------------------------------------------------------------------------


OWN = object()  # the Host a client sends that reached the view at `address`: "address:port"


def request(port: int, method: str, path: str, headers=(), body: bytes = b"", host=OWN, address="127.0.0.1"):
    """(status, headers dict, body) of one request over a raw socket: any header bytes at all."""
    lines = [f"{method} {path} HTTP/1.1".encode()]
    if host is OWN:
        host = f"{address}:{port}".encode()
    if host is not None:
        lines.append(b"Host: " + host)
    lines += [name.encode() + b": " + (value if isinstance(value, bytes) else value.encode()) for name, value in headers]
    lines += [b"Connection: close", f"Content-Length: {len(body)}".encode()]
    with socket.create_connection((address, port), timeout=10) as conn:
        conn.sendall(b"\r\n".join(lines) + b"\r\n\r\n" + body)
        reply = b""
        while b"\r\n\r\n" not in reply and (chunk := conn.recv(65536)):
            reply += chunk
        head, _, content = reply.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        found = {k.lower(): v for k, v in (line.split(": ", 1) for line in header_lines)}
        while len(content) < int(found.get("content-length", 0)) and (chunk := conn.recv(65536)):
            content += chunk
    return int(status_line.split()[1]), found, content


def get_json(port, path, **kwargs):
    status, _headers, body = request(port, "GET", path, **kwargs)
    return status, json.loads(body) if body else None


def metric(sidecar, name, **labels) -> float:
    text = request(sidecar.http_port, "GET", "/metrics")[2].decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in (name, f"{name}_total") and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def bearer(token=TOKEN):
    return [("Authorization", f"Bearer {token}")]


@pytest.fixture
def loopback_sidecar(tmp_path):
    sidecar = SidecarProcess(tmp_path, config(tmp_path, http="allowed_hosts: [sidecar.example.internal]")).start()
    yield sidecar
    assert sidecar.stop() == 0


def test_on_loopback_without_a_token_the_api_is_open_to_this_machine_only_by_name(loopback_sidecar):
    port = loopback_sidecar.http_port
    for host in (b"127.0.0.1", f"127.0.0.1:{port}".encode(), b"localhost", f"localhost:{port}".encode(), b"[::1]", b"sidecar.example.internal:8080", b"LOCALHOST."):
        assert get_json(port, "/api/jobs", host=host)[0] == 200, host
    # DNS rebinding: another site's name made to resolve to this machine arrives with that name.
    for host in (b"attacker.example", f"attacker.example:{port}".encode(), b"127.0.0.1.nip.io", b"sidecar.example.internal.evil"):
        status, body = get_json(port, "/api/jobs", host=host)
        assert status == 421 and "http.allowed_hosts" in body["error"], host
    assert get_json(port, "/healthz", host=b"attacker.example")[0] == 421  # every route
    assert get_json(port, "/api/jobs", host=None)[0] in (400, 421)  # h11 refuses HTTP/1.1 without one
    assert metric(loopback_sidecar, "sidecar_http_refused", reason="host") >= 5
    assert "refused a request (host" in loopback_sidecar.log()


def test_a_cross_origin_reload_is_refused_and_only_json_changes_anything(loopback_sidecar):
    port = loopback_sidecar.http_port
    reloads = lambda: loopback_sidecar.stats()["reloads"]
    # What any web page can send without asking the browser first: a text/plain POST.
    status, _h, body = request(port, "POST", "/api/reload", [("Origin", "http://attacker.example"), ("Content-Type", "text/plain")], b"{}")
    assert status == 403 and "another origin" in json.loads(body)["error"]
    for origin in ("null", f"http://127.0.0.1:{port + 1}", f"https://127.0.0.1:{port}"):
        assert request(port, "POST", "/api/reload", [("Origin", origin), ("Content-Type", "application/json")], b"{}")[0] == 403, origin
    assert request(port, "GET", "/api/jobs", [("Origin", "http://attacker.example")])[0] == 403
    # Without an Origin (curl, a script): still JSON only.
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/jsonp"):
        status, _h, body = request(port, "POST", "/api/reload", [("Content-Type", content_type)], b"{}")
        assert status == 415 and "application/json" in json.loads(body)["error"], content_type
    assert request(port, "POST", "/api/reload")[0] == 415
    assert request(port, "GET", "/api/reload")[0] == 405
    assert reloads() == 0
    # The view's own page (same origin) and a plain client may.
    status, _h, body = request(port, "POST", "/api/reload", [("Origin", f"http://127.0.0.1:{port}"), ("Content-Type", "application/json; charset=utf-8")], b"{}")
    assert status == 200 and json.loads(body)["applied"] is True
    loopback_sidecar.wait_for(lambda s: s["reloads"] == 1, what="the reload")
    assert metric(loopback_sidecar, "sidecar_http_refused", reason="origin") == 5
    assert metric(loopback_sidecar, "sidecar_http_refused", reason="content_type") == 5


def test_with_a_token_every_api_route_needs_it_and_no_bearer_makes_a_500(tmp_path):
    sidecar = SidecarProcess(tmp_path, config(tmp_path), env={"MONITORING_SIDECAR_TOKEN": TOKEN}).start()
    port = sidecar.http_port
    try:
        sidecar.send([{"source": "a", "type": "event", "context": {"job_id": "job-1"}, "data": {"level": "info", "message": "the secret text"}}])
        sidecar.wait_for(lambda s: s["received"] == 1, what="the message")
        paths = ["/api/jobs", "/api/jobs/job-1", "/api/traces/x", "/api/routes", "/api/backends", "/api/statistics", "/api/taps", "/api/tap", "/api/nothing", "/api"]
        wrong = [
            b"",
            b"Bearer",
            b"Bearer ",
            b"Basic " + TOKEN.encode(),
            b"Bearer " + TOKEN.encode()[:-1],
            b"Bearer " + TOKEN.encode() + b"x",
            b"Bearer \xc3\xa9\xc3\xa8 non-ascii",  # UTF-8
            b"Bearer \xe9\xff\x80",  # not UTF-8 at all
            "Bearer s3cret-t0ken-for-testś".encode(),
            b"Bearer\t" + TOKEN.encode(),
            b"Token " + TOKEN.encode(),
        ]
        for value in wrong:
            for path in ("/api/jobs/job-1", "/api/tap"):
                status, headers, body = request(port, "GET", path, [("Authorization", value)] if value else [])
                assert status == 401 and headers["www-authenticate"] == "Bearer" and b"secret text" not in body, (value, path)
        assert request(port, "POST", "/api/reload", [("Authorization", b"Bearer \xff"), ("Content-Type", "application/json")], b"{}")[0] == 401
        for path in paths:
            assert request(port, "GET", path)[0] == 401, path
        status, body = get_json(port, "/api/jobs/job-1", headers=bearer())
        assert status == 200 and body["sources"][0]["events"][0]["message"] == "the secret text"
        assert get_json(port, "/api/jobs/job-1", headers=[("Authorization", f"bearer   {TOKEN}")])[0] == 200  # the scheme in any case
        # Probes and Prometheus stay open; the page too (it asks for the token).
        for path in ("/healthz", "/readyz", "/metrics", "/metrics/apps", "/"):
            assert request(port, "GET", path)[0] == 200, path
        assert metric(sidecar, "sidecar_http_refused", reason="token") == 2 * len(wrong) + 1 + len(paths)
        url = {"MONITORING_SIDECAR_URL": f"http://127.0.0.1:{port}"}
        for token, code in ((TOKEN, 0), ("", 1), ("wrong", 1)):
            traced = subprocess.run([sys.executable, "-m", "sidecar", "trace", "job-1"], capture_output=True, text=True, timeout=30, env={**os.environ, **url, "MONITORING_SIDECAR_TOKEN": token})
            assert traced.returncode == code, traced.stderr
        assert "monitoring-sidecar token" in traced.stderr or "is not the sidecar's token" in traced.stderr
        assert "Traceback" not in sidecar.log() and "level=error" not in sidecar.log()
    finally:
        assert sidecar.stop() == 0
    assert TOKEN not in sidecar.log() + sidecar.stdout_path.read_text() + sidecar.status_path.read_text()


def non_loopback_address() -> str | None:
    """An address of this machine that is not loopback (the one it would send from), if any."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: this only picks a route
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if is_loopback(address) or address == "0.0.0.0" else address


def token_command(tmp_path, *args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "token", "--config", str(tmp_path / "sidecar.yaml"), *args],
        capture_output=True, text=True, cwd=tmp_path, timeout=30, env={**os.environ, **(env or {})},
    )


def test_beyond_loopback_without_a_token_the_view_makes_one_keeps_it_and_only_the_token_command_prints_it(tmp_path):
    env = {"MONITORING_SIDECAR_HTTP": "0.0.0.0:0"}
    env_without = {k: v for k, v in os.environ.items() if k != "MONITORING_SIDECAR_TOKEN"}
    sidecar = SidecarProcess(tmp_path, config(tmp_path), env=env)
    sidecar.env = {**env_without, **env}
    sidecar.start()
    path = tmp_path / "data" / TOKEN_FILE
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        token = path.read_text().strip()
        assert len(token) >= 40
        printed = token_command(tmp_path, "--http", "0.0.0.0:17001", env={"MONITORING_SIDECAR_TOKEN": ""})
        assert printed.returncode == 0 and printed.stdout == token + "\n", printed.stderr
        port = sidecar.http_port
        assert request(port, "GET", "/api/jobs")[0] == 401
        assert request(port, "GET", "/api/jobs", bearer(token))[0] == 200
        assert request(port, "GET", "/healthz")[0] == 200
        address = non_loopback_address()
        if address is not None:  # reached at another of its addresses, under that address
            assert request(port, "GET", "/api/jobs", bearer(token), host=f"{address}:{port}".encode(), address=address)[0] == 200
            assert request(port, "GET", "/healthz", host=b"attacker.example", address=address)[0] == 421
        assert "made for this view in" in sidecar.log() and token not in sidecar.log()
        assert token not in json.dumps(get_json(port, "/api/statistics", headers=bearer(token))[1])
        assert token not in request(port, "GET", "/metrics")[2].decode()
    finally:
        assert sidecar.stop() == 0
    again = SidecarProcess(tmp_path, config(tmp_path), env=env)
    again.env = {**env_without, **env}
    again.start()
    try:
        assert path.read_text().strip() == token  # reused on restart
        assert request(again.http_port, "GET", "/api/jobs", bearer(token))[0] == 200
    finally:
        assert again.stop() == 0
    everything = "".join(p.read_text(errors="replace") for p in tmp_path.iterdir() if p.is_file())
    assert token not in everything  # logs, stdout, status file, config
    check = subprocess.run([sys.executable, "-m", "sidecar", "check", "--config", str(tmp_path / "sidecar.yaml")], capture_output=True, text=True, cwd=tmp_path, timeout=30)
    assert check.returncode == 0 and token not in check.stdout + check.stderr


def test_the_token_command_prints_the_variable_and_says_when_there_is_none(tmp_path):
    (tmp_path / "sidecar.yaml").write_text(config(tmp_path))
    given = token_command(tmp_path, env={"MONITORING_SIDECAR_TOKEN": TOKEN})
    assert given.returncode == 0 and given.stdout == TOKEN + "\n"
    none = token_command(tmp_path, env={"MONITORING_SIDECAR_TOKEN": ""})
    assert none.returncode == 1 and none.stdout == ""
    assert "listens on loopback only and needs no token" in none.stderr and "hint: set $MONITORING_SIDECAR_TOKEN" in none.stderr
    assert not (tmp_path / "data" / TOKEN_FILE).exists()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / TOKEN_FILE).mkdir()  # what is there is no token file
    broken = token_command(tmp_path, "--http", "0.0.0.0:1", env={"MONITORING_SIDECAR_TOKEN": ""})
    assert broken.returncode == 1 and "token file" in broken.stderr and "Traceback" not in broken.stderr


# --- the pure parts ---------------------------------------------------------------------------


def scope(headers=(), server=("127.0.0.1", 17001), scheme="http"):
    return {"headers": [(k.encode() if isinstance(k, str) else k, v) for k, v in headers], "server": server, "scheme": scheme}


_space = st.sampled_from([b"", b" ", b"\t", b"  \t "])
_bearers = st.one_of(
    st.binary(max_size=80),
    st.builds(  # near the right one: the scheme in any case, spaces, and what may spoil it
        lambda pre, scheme, mid, token, post: pre + scheme + b" " + mid + token + post,
        _space,
        st.sampled_from([b"Bearer", b"bearer", b"BEARER", b"bEaReR", b"Basic", b"Bearer:"]),
        _space,
        st.sampled_from([TOKEN.encode(), TOKEN.encode()[:-1], TOKEN.encode() + b"x", TOKEN.upper().encode(), "s3cret-t0ken-for-testś".encode()]),
        st.one_of(_space, st.binary(max_size=3)),
    ),
)


@given(_bearers)
def test_any_authorization_bytes_are_answered_and_only_the_token_passes(value):
    import re

    guard = RequestGuard("127.0.0.1", (), TOKEN)
    right = re.fullmatch(rb"\s*(?i:bearer) \s*" + re.escape(TOKEN.encode()) + rb"\s*", value) is not None
    assert guard.authorised(scope([("authorization", value)])) is right
    assert guard.authorised(scope([("authorization", value), ("authorization", value)])) is False  # two: refused


@given(st.binary(max_size=40), st.binary(max_size=40))
def test_any_host_or_origin_bytes_are_answered(host, origin):
    guard = RequestGuard("0.0.0.0", ("sidecar.example",), None)
    given = scope([("host", host), ("origin", origin)])
    assert guard.host_allowed(given) in (True, False) and guard.origin_allowed(given) in (True, False)


@given(st.from_regex(r"[a-z0-9-]{1,12}(\.[a-z0-9-]{1,12}){0,3}\.?", fullmatch=True), st.one_of(st.none(), st.integers(0, 65535)))
def test_a_name_is_allowed_with_any_port_only_when_it_is_listed(name, port):
    import ipaddress

    try:
        ipaddress.ip_address(name.rstrip("."))
        return  # an address, not a name: not what DNS rebinding sends
    except ValueError:
        pass
    guard = RequestGuard("0.0.0.0", ("sidecar.example",), None)
    host = name if port is None else f"{name}:{port}"
    listed = name.rstrip(".") in ("localhost", "sidecar.example")
    assert guard.host_allowed(scope([("host", host.encode())])) is listed
    assert guard.host_allowed(scope([("host", host.upper().encode())])) is listed


def test_the_host_check_accepts_the_address_a_request_arrived_at_and_no_other():
    guard = RequestGuard("0.0.0.0", (), None)
    arrived = scope([("host", b"10.1.2.3:17001")], server=("10.1.2.3", 17001))
    assert guard.host_allowed(arrived)
    assert not guard.host_allowed(scope([("host", b"10.9.9.9:17001")], server=("10.1.2.3", 17001)))
    assert guard.host_allowed(scope([("host", b"[::1]:17001")], server=("::1", 17001)))
    assert not guard.host_allowed(scope([("host", b"localhost"), ("host", b"attacker.example")]))  # two
    assert RequestGuard("sidecar.local").host_allowed(scope([("host", b"SIDECAR.local:1")]))
    assert RequestGuard("127.0.0.1").origin_allowed(scope([("host", b"127.0.0.1:80"), ("origin", b"http://127.0.0.1")]))
    assert not RequestGuard("127.0.0.1").origin_allowed(scope([("host", b"127.0.0.1"), ("origin", b"http://127.0.0.1"), ("origin", b"http://evil")]))
    assert is_json(scope([("content-type", b"Application/JSON ; charset=utf-8")]))
    assert not is_json(scope([("content-type", b"application/json"), ("content-type", b"text/plain")]))


@given(st.dictionaries(st.sampled_from(["page", "limit", "other"]), st.text(max_size=15)), st.integers(1, 5000))
def test_a_page_query_is_a_page_within_the_limit_or_a_clear_error(query, most):
    try:
        page, limit = page_of(query, most)
    except BadRequest as exc:
        assert any(name in str(exc) for name in ("page", "limit"))
        return
    assert page >= 1 and 1 <= limit <= most
    if "limit" not in query:
        assert limit == most


tap_ops = st.lists(
    st.one_of(
        st.tuples(st.just("publish"), st.sampled_from(["a", "b"]), st.integers(1, 4), st.integers(1, 3000)),  # source, messages, bytes
        st.tuples(st.just("take"), st.integers(0, 2)),  # which subscriber reads a batch
        st.tuples(st.just("leave"), st.integers(0, 2)),
    ),
    max_size=60,
)


@given(tap_ops, st.integers(1024, 8192))
def test_tap_subscribers_get_or_are_told_of_every_message_and_a_stalled_one_costs_a_chunk_nothing(ops, capacity):
    hub = TapHub(capacity)
    taps = [hub.subscribe(None, None), hub.subscribe("a", None), hub.subscribe("b", "event")]
    wanted = {id(tap): 0 for tap in taps}  # messages of its source published while it listened
    taken = {id(tap): 0 for tap in taps}
    offers = {id(tap): 0 for tap in taps}
    for tap in taps:
        tap.offer = (lambda tap, offer: lambda *a: (offers.__setitem__(id(tap), offers[id(tap)] + 1), offer(*a))[1])(tap, tap.offer)
    largest = 0
    for op in ops:
        if op[0] == "publish":
            _kind, source, count, size = op
            largest = max(largest, size)
            listening = [t for t in taps if t in set(hub)]
            active = [t for t in listening if t in hub.active and t.source in (None, source)]
            before = dict(offers)
            hub.publish([Batch(source, [b"x" * (size // count)] * count, [""] * count)])
            for tap in listening:
                wanted[id(tap)] += count if tap.source in (None, source) else 0
                # Only a subscriber taking batches is offered one: a stalled one is not looked at.
                assert offers[id(tap)] - before[id(tap)] == (tap in active)
        elif op[0] == "take" and taps[op[1]] in set(hub):
            tap = taps[op[1]]
            try:
                lines, _dropped_before = tap.next_lines_nowait()
            except trio.WouldBlock:
                continue
            taken[id(tap)] += len(lines)
        elif op[0] == "leave" and taps[op[1]] in set(hub):
            hub.unsubscribe(taps[op[1]])
        for tap in hub:
            assert tap.held <= max(capacity, largest)  # a batch larger than the buffer goes alone
    for tap in taps:
        held = sum(len(lines) for lines, _size, _before in tap._pending)
        assert taken[id(tap)] + held + tap.dropped_now == wanted[id(tap)]
    assert hub.dropped() == sum(tap.dropped_now for tap in taps)


async def test_a_tap_sends_its_type_only_and_says_where_the_gap_is():
    hub = TapHub(1024)
    tap = hub.subscribe("a", "event")
    # Each names the other type in its text: the type filter reads the type, not the bytes.
    event = b'{"source":"a","type":"event","data":{"message":"\\"type\\":\\"metric\\""}}'
    other = b'{"source":"a","type":"metric","data":{"message":"\\"type\\":\\"event\\""}}'
    big = lambda *lines: Batch("a", list(lines), [""] * len(lines))
    hub.publish([big(event, other + b" " * 1000), Batch("b", [event], [""])])
    hub.publish([big(event + b" " * 1000)])  # no room: dropped for this subscriber alone
    assert tap in hub.stalled and tap.dropped_now == 1
    hub.publish([big(event)])
    assert tap.dropped_now == 2
    lines, dropped_before = await tap.next_lines()
    assert (tap.frames(lines), dropped_before) == (b"data: " + event + b"\n\n", 0)
    assert tap in hub.active
    hub.publish([big(event, event)])
    lines, dropped_before = await tap.next_lines()
    assert dropped_before == 2 and tap.frames(lines) == (b"data: " + event + b"\n\n") * 2
    assert tap.statistics() == {"source": "a", "type": "event", "held_bytes": 0, "sent": 3, "dropped": 2, "stalled": False}
    tap.close()
    assert await tap.next_lines() is None
    hub.unsubscribe(tap)
    assert len(hub) == 0 and hub.dropped() == 2


def test_the_token_file_is_made_once_with_mode_0600_and_kept(tmp_path):
    path = tmp_path / "data" / TOKEN_FILE
    tokens = []
    threads = [threading.Thread(target=lambda: tokens.append(stored_token(path))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(tokens)) == 1 and path.read_text() == tokens[0] + "\n"  # one, whoever came first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == [TOKEN_FILE]  # no temporary left
    assert stored_token(path) == tokens[0]
    path.chmod(0o644)
    assert stored_token(path) == tokens[0] and stat.S_IMODE(path.stat().st_mode) == 0o600
    path.write_text("")
    with pytest.raises(TokenFileError, match="holds no token"):
        stored_token(path)
    path.unlink()
    path.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(TokenFileError, match="cannot read"):
        stored_token(path)


def test_loopback_is_localhost_and_loopback_addresses_only():
    assert all(map(is_loopback, ["127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost", "LocalHost."]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "", "10.0.0.1", "myhost", "localhost.example"]))


# --- taps and a huge job: nothing a client does slows ingestion ---------------------------------


def open_stalled_tap(port: int, query: str = "") -> tuple[socket.socket, int]:
    """A tap subscriber that reads its answer's head and then nothing, with a small receive
    buffer so that the sidecar's side fills soon; the socket and the status."""
    conn = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    conn.settimeout(10)
    conn.connect(("127.0.0.1", port))
    conn.sendall(f"GET /api/tap{query} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += conn.recv(1)
    return conn, int(head.split()[1])


def payload(count: int, source: str = "load") -> bytes:
    line = b'{"source":"%s","type":"event","data":{"level":"info","message":"message number %%d of the measured load"}}\n' % source.encode()
    return b"".join(line % n for n in range(count))


def ingestion_rate(sidecar, data: bytes, count: int, times: int = 1) -> float:
    """Messages per second through the correlator (every one unrouted: no backend), from the
    first byte sent to the last message counted; `data` (`count` messages) sent `times` over."""
    before = sidecar.stats()["unrouted"]
    started = time.perf_counter()
    with sidecar.connect() as conn:
        for _ in range(times):
            conn.sendall(data)
    wait_until(lambda: sidecar.stats()["unrouted"] >= before + count * times, 60, "the load to pass", interval=0.005)
    return count * times / (time.perf_counter() - started)


def best_rate(sidecar, data: bytes, count: int) -> float:
    """The better of two runs of about two seconds each: another process on the two shared
    cores only ever slows a run, and the status file's 50 ms are 2.5% of one."""
    return max(ingestion_rate(sidecar, data, count, times=5) for _ in range(2))


def test_tap_subscribers_past_the_cap_are_refused_and_counted(tmp_path):
    sidecar = SidecarProcess(tmp_path, config(tmp_path)).start()
    port = sidecar.http_port
    taps = []
    try:
        for _ in range(200):
            conn, status = open_stalled_tap(port)
            taps.append((conn, status))
        statuses = [status for _conn, status in taps]
        assert statuses.count(200) == 16 and statuses.count(503) == 184
        assert metric(sidecar, "sidecar_http_refused", reason="tap_limit") == 184
        assert metric(sidecar, "sidecar_tap_subscribers") == 16
        assert len(get_json(port, "/api/taps")[1]["taps"]) == 16
        assert get_json(port, "/api/tap?type=bogus")[0] == 400
        for conn, status in taps:
            if status == 200:
                conn.close()
        wait_until(lambda: metric(sidecar, "sidecar_tap_subscribers") == 0, what="the taps to close")
        assert open_stalled_tap(port)[1] == 200  # room again
    finally:
        for conn, _status in taps:
            conn.close()
        assert sidecar.stop() == 0


def test_two_hundred_stalled_tap_subscribers_do_not_slow_ingestion(tmp_path):
    # The cap raised to 200 (the default 16 refuses the rest: above); small tap buffers so that
    # every subscriber is stalled, dropping, before the measurement starts.
    sidecar = SidecarProcess(tmp_path, config(tmp_path, http="max_tap_subscribers: 200, tap_buffer: 4KiB")).start()
    port = sidecar.http_port
    count = 400_000
    data = payload(count)
    taps = []
    try:
        ingestion_rate(sidecar, data[: len(data) // 8], count // 8)  # warm
        alone = best_rate(sidecar, data, count)
        for _ in range(200):
            conn, status = open_stalled_tap(port)
            assert status == 200
            taps.append(conn)
        for _round in range(100):  # until every subscriber has had to drop: all are stalled
            ingestion_rate(sidecar, data[: len(data) // 40], count // 40)
            if all(t["dropped"] for t in get_json(port, "/api/taps")[1]["taps"]):
                break
        listed = get_json(port, "/api/taps")[1]["taps"]
        # Each holds its buffer or, as here, the one batch larger than it (a chunk: tcp.read_size
        # of lines before enrichment).
        assert len(listed) == 200 and all(t["dropped"] > 0 and t["held_bytes"] <= 1024 * 1024 for t in listed)
        tapped = best_rate(sidecar, data, count)
        if tapped < 0.9 * alone:  # noisy neighbours: once more
            tapped = max(tapped, best_rate(sidecar, data, count))
        print(f"ingestion alone {alone:,.0f}/s, with 200 stalled tap subscribers {tapped:,.0f}/s")
        assert tapped >= 0.9 * alone
        dropped = sum(t["dropped"] for t in get_json(port, "/api/taps")[1]["taps"])
        assert metric(sidecar, "sidecar_tap_dropped_messages") == dropped > 200 * 10 * count
    finally:
        for conn in taps:
            conn.close()
        assert sidecar.stop() == 0


def rss_mib(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_job_of_a_million_spans_is_answered_in_pages_with_memory_bounded_and_ingestion_going_on(tmp_path):
    sidecar = SidecarProcess(tmp_path, config(tmp_path)).start()
    port = sidecar.http_port
    count = 1_000_000
    line = b'{"source":"big","type":"span","trace_id":"' + b"a" * 32 + b'","span_id":"%016x","context":{"job_id":"job-big"},"data":{"name":"step","phase":"start"}}\n'
    data = b"".join(line % n for n in range(count))
    pages_seen, slowest = [], 0.0
    try:
        sidecar.send([{"source": "big", "type": "event", "data": {"level": "info", "message": "start"}, "context": {"job_id": "job-big"}}])
        sidecar.wait_for(lambda s: s["unrouted"] == 1, what="the job")
        before = rss_mib(sidecar.process.pid)
        def send_all():
            with socket.create_connection(("127.0.0.1", sidecar.port), timeout=120) as conn:  # 180 MB
                conn.sendall(data)

        sender = threading.Thread(target=send_all, daemon=True)
        sender.start()
        while sender.is_alive():  # the view asked for while the spans pour in
            started = time.perf_counter()
            status, _headers, body = request(port, "GET", "/api/jobs/job-big?page=1")
            slowest = max(slowest, time.perf_counter() - started)
            assert status == 200
            pages_seen.append(json.loads(body)["page"]["spans"])
            time.sleep(0.2)
        sender.join()
        sidecar.wait_for(lambda s: s["unrouted"] == count + 1, timeout=60, what="every span")
        grown = rss_mib(sidecar.process.pid) - before
        status, first = get_json(port, "/api/jobs/job-big")
        page = first["page"]
        assert (page["spans"], page["pages"], page["limit"], page["evicted_spans"]) == (10_000, 10, 1000, count - 10_000)
        assert page["next"] == "/api/jobs/job-big?page=2&limit=1000"
        sizes, ids = [], []
        for number in range(1, 11):
            status, _h, body = request(port, "GET", f"/api/jobs/job-big?page={number}&limit=5000")  # limit capped
            view = json.loads(body)
            assert status == 200 and len(view["spans"]) == 1000
            sizes.append(len(body))
            ids += [span["span_id"] for span in view["spans"]]
        assert ids == [f"{n:016x}" for n in range(count - 10_000, count)]  # the latest, all starts at one time
        assert get_json(port, "/api/jobs/job-big?page=11")[1]["spans"] == []
        assert get_json(port, "/api/jobs/job-big?page=0")[0] == 400
        status, trace = get_json(port, "/api/traces/" + "a" * 32 + "?limit=10")
        assert len(trace["spans"]) == 10 and trace["page"]["pages"] == 1000
        print(f"RSS grew {grown:.0f} MiB; pages of {max(sizes):,} bytes at most; slowest page while ingesting {slowest * 1000:.0f} ms; spans held as seen: {pages_seen}")
        assert max(sizes) < 1024 * 1024
        assert grown < 150, f"RSS grew {grown:.0f} MiB"
        assert slowest < 1.0 and len(pages_seen) >= 2
        assert metric(sidecar, "sidecar_index_evicted_spans", of="jobs") == count - 10_000
        assert metric(sidecar, "sidecar_index_evicted_spans", of="traces") == count - 10_000
    finally:
        assert sidecar.stop() == 0


def test_the_tap_command_sends_the_token_and_says_when_it_fell_behind(tmp_path):
    sidecar = SidecarProcess(tmp_path, config(tmp_path, http="tap_buffer: 4KiB"), env={"MONITORING_SIDECAR_TOKEN": TOKEN}).start()
    env = {**os.environ, "MONITORING_SIDECAR_URL": f"http://127.0.0.1:{sidecar.http_port}", "MONITORING_SIDECAR_TOKEN": TOKEN}
    tap = subprocess.Popen([sys.executable, "-m", "sidecar", "tap", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=tmp_path)
    try:
        wait_until(lambda: metric(sidecar, "sidecar_tap_subscribers") == 1, what="the tap to open")
        # The command's stdout is not read: it stops reading the stream, and the sidecar drops for it.
        for _ in range(100):
            with sidecar.connect() as conn:
                conn.sendall(payload(20_000, "flood"))
            if get_json(sidecar.http_port, "/api/taps", headers=bearer())[1]["taps"][0]["stalled"]:
                break
        lines = []
        reader = threading.Thread(target=lambda: lines.extend(tap.stdout), daemon=True)
        reader.start()

        def after_the_gap():  # sent until the tap takes batches again (one sent before is dropped too)
            sidecar.send([{"source": "after", "type": "event", "data": {"level": "info", "message": "after the gap"}}])
            return any(b'"after the gap"' in line for line in lines)

        wait_until(after_the_gap, 30, "a message after the gap", interval=0.2)
    finally:
        tap.terminate()
        _out, err = tap.communicate(timeout=10)
        assert sidecar.stop() == 0
    assert re.search(rb"tap: \d+ messages dropped so far: this terminal fell behind", err), err[-500:]
    assert all(json.loads(line)["source"] in ("flood", "after") for line in lines)
