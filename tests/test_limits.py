"""The limits against hostile or broken clients (sidecar/sources/stream.py, sidecar/ratelimit.py).

The token buckets are pure, property-tested, and run on trio's MockClock; the timeouts are
tested in-process on the MockClock over real sockets; the rest against a real sidecar
subprocess: 1,000 idle and 100 slowloris connections beside a well-behaved client, 1,000
clients each holding most of a 1 MiB line, 1,024 idle sockets, the rate limit on the real
clock, connections per peer address (clients bound to 127.0.0.2, 127.0.0.3, ...)."""

import datetime as dt
import logging
import re
import resource
import selectors
import socket
import threading
import time

import orjson
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.metrics import Counters
from sidecar.ratelimit import RateLimiter, RateLimitSettings, TokenBucket, pace
from sidecar.sources import Intake
from sidecar.sources.stream import DEFAULT_MAX_INFLIGHT_BYTES, OWN_ALLOWANCE, Connection, InflightBudget
from sidecar.sources.tcp import TcpSettings, TcpSource
from tests.harness import SidecarProcess, SteadySender, event, read_jsonl, wait_until

# ------------------------------------------------------------------ the token buckets, pure

schedules = st.lists(
    st.tuples(st.floats(min_value=0, max_value=2, allow_nan=False), st.integers(min_value=0, max_value=500), st.integers(min_value=0, max_value=100_000)),
    max_size=60,
)
rates = st.floats(min_value=1, max_value=10_000, allow_nan=False)
bursts = st.floats(min_value=0.01, max_value=5, allow_nan=False)


@given(schedules, rates, rates, bursts)
def test_drop_never_admits_more_than_the_burst_and_the_rate_allow(schedule, per_second, bytes_per_second, burst):
    limiter = RateLimiter(RateLimitSettings(messages_per_second=per_second, bytes_per_second=int(bytes_per_second), burst=burst, when_over="drop"), 0.0)
    now = admitted_messages = admitted_bytes = 0.0
    for elapsed, count, size in schedule:
        now += elapsed
        admitted = limiter.admit(count, size, now)
        assert 0 <= admitted <= count
        admitted_messages += admitted
        admitted_bytes += admitted * size / count if count else 0
    assert admitted_messages <= per_second * burst + per_second * now + 1e-6
    assert admitted_bytes <= int(bytes_per_second) * burst + int(bytes_per_second) * now + 1e-3


@given(st.lists(st.floats(min_value=0.001, max_value=2, allow_nan=False), max_size=60), rates, bursts)
def test_drop_admits_everything_that_keeps_within_the_rate(gaps, per_second, burst):
    limiter = RateLimiter(RateLimitSettings(messages_per_second=per_second, burst=burst, when_over="drop"), 0.0)
    now = 0.0
    for gap in gaps:
        now += gap
        count = int(min(per_second * gap, per_second * burst))
        assert limiter.admit(count, 0, now) == count


@given(st.lists(st.tuples(st.integers(min_value=1, max_value=1000), st.integers(min_value=0, max_value=50_000)), min_size=1, max_size=60), rates, bursts)
def test_pushback_waiting_out_each_delay_keeps_to_the_rate(charges, per_second, burst):
    limiter = RateLimiter(RateLimitSettings(messages_per_second=per_second, bytes_per_second=100_000, burst=burst), 0.0)
    now = charged = 0.0
    for count, size in charges:
        delay = limiter.delay(now)
        now += delay
        assert limiter.delay(now) <= 1e-9  # out of debt once the delay is waited out
        limiter.charge(count, size, now)
        charged += count
    largest = max(count for count, _ in charges)
    assert charged <= per_second * burst + per_second * now + largest + 1e-6


@given(st.floats(min_value=0, max_value=1e6, allow_nan=False), st.floats(min_value=0, max_value=1e6, allow_nan=False))
def test_a_bucket_never_holds_more_than_its_capacity_nor_refills_backwards(first, second):
    bucket = TokenBucket.full(10.0, 25.0, 0.0)
    bucket.take(20, first)
    assert bucket.available(first) == pytest.approx(5.0)
    later = bucket.available(first + second)
    assert 5.0 <= later <= 25.0 and bucket.available(first) == later  # an earlier time changes nothing


def test_rate_limit_settings_need_a_rate():
    with pytest.raises(ValueError, match="set messages_per_second, bytes_per_second or both"):
        RateLimitSettings()
    with pytest.raises(ValueError, match="must be more than 0"):
        RateLimitSettings(messages_per_second=0)


# ------------------------------------------------------------------ the token buckets, on trio's clock


async def test_pushback_paces_a_greedy_sender_to_the_rate(autojump_clock):
    limiter = RateLimiter(RateLimitSettings(messages_per_second=1000, burst=0.5), trio.current_time())
    sent = 0
    while trio.current_time() < 10:
        await pace(limiter)
        limiter.charge(50, 0, trio.current_time())
        sent += 50
    assert 500 + 10_000 <= sent <= 500 + 10_000 + 50 + 50  # the burst, the rate, one charge of rounding


async def test_drop_lets_the_rate_through_and_drops_the_rest(autojump_clock):
    limiter = RateLimiter(RateLimitSettings(messages_per_second=1000, burst=0.5, when_over="drop"), trio.current_time())
    admitted = offered = 0
    while trio.current_time() < 10:
        admitted += limiter.admit(5, 1500, trio.current_time())
        offered += 5
        await trio.sleep(0.001)  # 5,000 a second offered
    assert offered == pytest.approx(50_000, rel=0.01)
    assert 500 + 10_000 - 5 <= admitted <= 500 + 10_000 + 5


# ------------------------------------------------------------------ max_inflight_bytes, pure


@given(st.lists(st.tuples(st.integers(min_value=0, max_value=9), st.integers(min_value=0, max_value=200_000)), max_size=200))
def test_the_inflight_cap_is_never_exceeded_by_what_reserve_allows(steps):
    budget = InflightBudget(100_000, allowance=OWN_ALLOWANCE)
    connections = [Connection(i, f"peer {i}") for i in range(10)]
    for index, wanted in steps:
        connection = connections[index]
        room = budget.room(connection)
        if wanted % 2 and room > 0:  # a read: what reserve would take, then less arrives
            size = min(wanted, room)
            budget.set(connection, connection.inflight + size)
            budget.set(connection, connection.inflight - size + size // 3)
        else:  # a hand-over: it holds less now
            budget.set(connection, min(connection.inflight, wanted))
        assert budget.used <= budget.capacity
        assert budget.used == sum(max(0, c.inflight - OWN_ALLOWANCE) for c in connections)
        assert budget.held == sum(c.inflight for c in connections) <= budget.capacity + len(connections) * OWN_ALLOWANCE


# ------------------------------------------------------------------ the timeouts, in-process on trio's clock

GOOD = b'{"source":"svc","type":"event","data":{"level":"info","message":"m"}}\n'


async def serving(settings: TcpSettings, body):
    """Run a tcp source on `settings` and `body(port, counters, messages)` beside it."""
    counters = Counters()
    source = TcpSource("tcp", settings, Intake("tcp", counters, logging.getLogger("test")))
    send_channel, receive_channel = trio.open_memory_channel(100)
    received = []

    async def collect():
        async for _received_at, messages, _holds in receive_channel:
            received.extend(messages)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(collect)
        address = await nursery.start(source.run, send_channel)
        await body(int(address.rsplit(":", 1)[1]), counters, received)
        source.stop_accepting()
        source.close_connections(0)
    return counters


async def closed_at(stream: trio.SocketStream) -> float:
    """When the sidecar closed `stream` (what it said before is read and dropped)."""
    while await stream.receive_some(65536):
        pass
    return trio.current_time()


async def test_an_idle_connection_is_closed_at_idle_timeout(autojump_clock):
    async def body(port, counters, received):
        started = trio.current_time()
        idle = await trio.open_tcp_stream("127.0.0.1", port)
        assert await closed_at(idle) - started == pytest.approx(300, abs=0.1)
        assert counters.get("connections_closed_total", input="tcp", reason="idle") == 1

    await serving(TcpSettings(port=0), body)


async def test_an_unfinished_line_is_closed_at_partial_timeout_counting_only_the_waits(autojump_clock):
    async def body(port, counters, received):
        slow = await trio.open_tcp_stream("127.0.0.1", port)
        started = trio.current_time()
        await slow.send_all(GOOD[:10])
        await trio.sleep(20)
        await slow.send_all(GOOD[10:20])  # still unfinished: 20 s of the 30 are used
        assert await closed_at(slow) - started == pytest.approx(30, abs=0.1)
        assert counters.get("connections_closed_total", input="tcp", reason="slow") == 1
        # A slow client whose messages do complete is not closed for it.
        steady = await trio.open_tcp_stream("127.0.0.1", port)
        for _ in range(5):
            await steady.send_all(GOOD[:30])
            await trio.sleep(20)
            await steady.send_all(GOOD[30:])
        await steady.send_eof()
        await closed_at(steady)
        assert len(received) == 5 and counters.get("connections_closed_total", input="tcp", reason="slow") == 1

    await serving(TcpSettings(port=0), body)


async def test_time_the_sidecar_holds_a_connection_back_is_not_the_clients(autojump_clock):
    # A greedy client paced by the rate limit waits longer than partial_timeout in all, with
    # lines unfinished at the ends of its reads: never closed as slow for the sidecar's waits.
    settings = TcpSettings(port=0, read_size=1024, partial_timeout=1.0, rate_limit=RateLimitSettings(bytes_per_second=1024, burst=1.0))

    async def body(port, counters, received):
        greedy = await trio.open_tcp_stream("127.0.0.1", port)
        await greedy.send_all(GOOD * 100)  # 7 KiB: about 7 s at 1 KiB/s
        await greedy.send_eof()
        started = trio.current_time()
        await closed_at(greedy)
        # a burst's worth at once, one more read right away, then a read a second
        assert trio.current_time() - started == pytest.approx(len(GOOD) * 100 / 1024 - 2, abs=1.01)
        assert len(received) == 100
        assert counters.get("connections_closed_total", input="tcp", reason="slow") == 0
        assert counters.get("reads_waited_total", input="tcp", reason="rate_limit") >= 5

    await serving(settings, body)


# ------------------------------------------------------------------ against a real sidecar

LIMITS_CONFIG = """
tcp:
  host: 127.0.0.1
  port: 0
{tcp}
backends:
  files: {{type: filesystem, base_path: {base}, create_base_path: true, batch: {{timeout: 0.05}}}}
routing:
  all: [{{backend: files}}]
"""


@pytest.fixture(scope="module", autouse=True)
def enough_descriptors():
    """Room for a few thousand sockets in this process; the sidecar inherits the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 8192:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(8192, hard), hard))
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= 4096, "these tests need 4096 descriptors"
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def start(tmp_path, **tcp) -> SidecarProcess:
    lines = "\n".join(f"  {key}: {value}" for key, value in tcp.items())
    process = SidecarProcess(tmp_path, LIMITS_CONFIG.format(tcp=lines, base=tmp_path / "out")).start()
    process.out = tmp_path / "out"
    limit = re.search(r"Max open files\s+(\d+)", open(f"/proc/{process.process.pid}/limits").read())
    assert int(limit.group(1)) >= 4096, "the sidecar inherits too few descriptors"
    return process


def open_from(port: int, count: int, first_peer: int = 2, per_peer: int = 200) -> list[socket.socket]:
    """`count` connections, from 127.0.0.{first_peer}, the next address every `per_peer`."""
    sockets = []
    for i in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((f"127.0.0.{first_peer + i // per_peer}", 0))
        sock.connect(("127.0.0.1", port))
        sockets.append(sock)
    return sockets


def active(sidecar: SidecarProcess) -> int:
    return sidecar.stats()["sources"]["tcp"]["connections_active"]


def vm(pid: int, field: str) -> int:
    """A /proc/PID/status field in KiB (VmRSS now, VmHWM its peak)."""
    return int(re.search(rf"^{field}:\s+(\d+) kB", open(f"/proc/{pid}/status").read(), re.M).group(1))


def delivery_latency(sidecar: SidecarProcess, source: str, seq: int) -> float:
    """Seconds from sending one message on a new connection to its line in the file."""
    started = time.monotonic()
    sidecar.send([event(source, seq)])
    wait_until(lambda: any(m["context"]["seq"] == seq for m in read_jsonl(sidecar.out / f"{source}.jsonl")), timeout=10, what=f"message {seq}", interval=0.005)
    return time.monotonic() - started


def close_all(sockets) -> None:
    for sock in sockets:
        sock.close()


def test_idle_and_slowloris_connections_do_not_stop_a_good_client(tmp_path):
    sidecar = start(tmp_path, max_connections=2048, partial_timeout="3s")
    idle, slow = [], []
    try:
        baseline = max(delivery_latency(sidecar, "good", seq) for seq in range(5))
        idle = open_from(sidecar.port, 1000, first_peer=2)
        slow = open_from(sidecar.port, 100, first_peer=20)
        wait_until(lambda: active(sidecar) == 1100, what="1,100 connections open")
        line = orjson.dumps(event("slowloris", 0)) + b"\n"
        latencies = []
        for step in range(12):  # a byte every 0.5 s from each slowloris client, never a whole line
            for sock in slow:
                try:
                    sock.send(line[step : step + 1])
                except OSError:
                    pass  # closed as slow already
            latencies.append(delivery_latency(sidecar, "good", 100 + step))
            time.sleep(0.5)
        print(f"good client: {baseline * 1000:.1f} ms alone, at most {max(latencies) * 1000:.1f} ms beside 1,100 bad connections")
        assert max(latencies) < max(1.0, 5 * baseline)  # the filesystem backend's 50 ms batches, and margin
        stats = sidecar.wait_for(lambda s: s["connections_closed"].get("slow", 0) == 100, what="the slowloris clients closed as slow")
        assert stats["sources"]["tcp"]["connections_active"] == 1000  # the idle ones wait for idle_timeout (5 min)
        assert not (sidecar.out / "slowloris.jsonl").exists()
    finally:
        close_all(idle + slow)
        assert sidecar.stop() == 0


def test_a_thousand_clients_holding_a_megabyte_of_unfinished_line_keep_memory_bounded(tmp_path):
    sidecar = start(tmp_path, max_connections=2048, partial_timeout="60s")
    pid = sidecar.process.pid
    sockets = []
    try:
        sockets = open_from(sidecar.port, 1000)
        for sock in sockets:
            sock.setblocking(False)
        wait_until(lambda: active(sidecar) == 1000, what="1,000 connections open")
        # ~1 MiB each of a line that never ends (under max_message_size, so it is kept whole).
        chunk = b'{"source":"hog","type":"event","data":{"level":"info","message":"' + b"x" * (1024 * 1024 - 2048)
        left = {sock: memoryview(chunk) for sock in sockets}
        selector = selectors.DefaultSelector()
        for sock in sockets:
            selector.register(sock, selectors.EVENT_WRITE)
        deadline = time.monotonic() + 60
        stalled_since = None
        while left and time.monotonic() < deadline:
            ready = selector.select(timeout=0.2)
            if not ready:  # the sidecar reads no more: the rest waits in the kernel's buffers
                stalled_since = stalled_since or time.monotonic()
                if time.monotonic() - stalled_since > 3:
                    break
                continue
            stalled_since = None
            for key, _ in ready:
                sock = key.fileobj
                try:
                    sent = sock.send(left[sock][:65536])
                except BlockingIOError:
                    continue
                left[sock] = left[sock][sent:]
                if not left[sock]:
                    del left[sock]
                    selector.unregister(sock)
        selector.close()
        sent = sum(len(chunk) - len(left.get(sock, b"")) for sock in sockets)
        peak = vm(pid, "VmHWM")
        stats = sidecar.stats()["sources"]["tcp"]
        print(f"sent {sent / 2**20:.0f} MiB of unfinished lines; sidecar peak RSS {peak / 1024:.0f} MiB, now {vm(pid, 'VmRSS') / 1024:.0f} MiB, in flight {stats['inflight_bytes'] / 2**20:.1f} MiB")
        assert sent > 200 * 2**20  # the sidecar read what its cap allows, the kernel buffered more
        assert peak < 150 * 1024
        assert stats["inflight_bytes"] <= DEFAULT_MAX_INFLIGHT_BYTES + 1000 * OWN_ALLOWANCE
        assert 'sidecar_reads_waited_total{input="tcp",reason="inflight"}' in sidecar.http("/metrics")[1].decode()
        # A client with short messages still gets through while the cap is full.
        assert delivery_latency(sidecar, "good", 1) < 2.0
        assert vm(pid, "VmHWM") < 150 * 1024
    finally:
        close_all(sockets)
        assert sidecar.stop() == 0


def test_with_1024_idle_sockets_a_good_client_connects_and_delivers(tmp_path):
    sidecar = start(tmp_path, idle_timeout="5s")
    idle = []
    try:
        idle = open_from(sidecar.port, 1024)
        wait_until(lambda: active(sidecar) == 1024, what="1,024 connections open")
        with socket.create_connection(("127.0.0.1", sidecar.port), timeout=10) as refused:
            assert refused.recv(200).startswith(b"error: too many connections (limit 1024)")
        started = time.monotonic()

        def delivered():
            try:
                sidecar.send([event("patient", 1)])
            except OSError:
                return False
            return bool(read_jsonl(sidecar.out / "patient.jsonl"))

        wait_until(delivered, timeout=10, what="the good client to get in", interval=0.1)
        waited = time.monotonic() - started
        print(f"the good client got in {waited:.2f} s after 1,024 idle sockets filled the limit")
        assert waited < 5 + 1.5  # idle_timeout, and margin
        stats = sidecar.wait_for(lambda s: s["connections_closed"].get("idle", 0) == 1024, what="the idle sockets closed as idle")
        assert stats["connections_refused"].get("limit", 0) >= 1
        for sock in idle[:10]:  # told why, and closed by the sidecar
            sock.settimeout(5)
            assert sock.makefile("rb").read() == b"error: nothing received for 5s (idle_timeout)\n"
    finally:
        close_all(idle)
        assert sidecar.stop() == 0


def test_connections_are_limited_per_peer_address(tmp_path):
    sidecar = start(tmp_path, max_connections_per_peer=5)
    sockets = []
    try:
        sockets = open_from(sidecar.port, 5, first_peer=2, per_peer=5)
        wait_until(lambda: active(sidecar) == 5, what="5 connections from 127.0.0.2")
        extra = open_from(sidecar.port, 1, first_peer=2)[0]
        sockets.append(extra)
        extra.settimeout(10)
        assert extra.recv(200) == b"error: too many connections from 127.0.0.2 (limit 5)\n"
        other = open_from(sidecar.port, 1, first_peer=3)[0]
        sockets.append(other)
        other.sendall(orjson.dumps(event("other-peer", 1)) + b"\n")
        wait_until(lambda: read_jsonl(sidecar.out / "other-peer.jsonl"), what="the other peer's message")
        sockets[0].close()  # a slot of 127.0.0.2's is free again
        wait_until(lambda: active(sidecar) == 5, what="the closed one gone")
        again = open_from(sidecar.port, 1, first_peer=2)[0]
        sockets.append(again)
        again.sendall(orjson.dumps(event("again", 1)) + b"\n")
        wait_until(lambda: read_jsonl(sidecar.out / "again.jsonl"), what="127.0.0.2 served again")
        assert sidecar.stats()["connections_refused"] == {"per_peer": 1}
        assert 'sidecar_connections_refused_total{input="tcp",reason="per_peer"} 1.0' in sidecar.http("/metrics")[1].decode()
    finally:
        close_all(sockets)
        assert sidecar.stop() == 0


def received_rate(sidecar: SidecarProcess, settle: float, window: float) -> float:
    """Messages received a second, between two status files `window` seconds apart, after
    `settle` seconds (the burst spent), timed by the files' own `written_at`."""
    time.sleep(settle)
    first = sidecar.stats()
    time.sleep(window)
    last = sidecar.stats()
    seconds = (dt.datetime.fromisoformat(last["written_at"]) - dt.datetime.fromisoformat(first["written_at"])).total_seconds()
    return (last["received"] - first["received"]) / seconds


class Flood(threading.Thread):
    """Sends fixed-size events over one connection as fast as the sidecar reads them."""

    def __init__(self, port: int, size: int = 300):
        super().__init__(daemon=True)
        self.port = port
        message = event("flood", 0)
        message["data"]["message"] = ""
        padding = size - len(orjson.dumps(message)) - 1
        message["data"]["message"] = "x" * padding
        self.line = orjson.dumps(message) + b"\n"
        assert len(self.line) == size
        self.stopping = threading.Event()
        self.sent = 0

    def run(self) -> None:
        batch = self.line * 100
        try:
            with socket.create_connection(("127.0.0.1", self.port)) as conn:
                while not self.stopping.is_set():
                    conn.sendall(batch)
                    self.sent += 100
        except OSError:
            if not self.stopping.is_set():
                raise


@pytest.mark.parametrize("limit, per_second", [("{messages_per_second: 10000, burst: 0.5s}", 10_000), ("{bytes_per_second: 3000000, burst: 0.5s}", 10_000)], ids=["messages", "bytes"])
def test_a_pushback_rate_limit_holds_within_5_percent(tmp_path, limit, per_second):
    sidecar = start(tmp_path, read_size="32KiB", rate_limit=limit)
    flood = Flood(sidecar.port, size=300)  # 3,000,000 B/s is 10,000 of these a second
    flood.start()
    try:
        rate = received_rate(sidecar, settle=1.0, window=3.0)
        print(f"received {rate:.0f} messages a second under a limit of {per_second}")
        assert rate == pytest.approx(per_second, rel=0.05)
        assert 'sidecar_reads_waited_total{input="tcp",reason="rate_limit"}' in sidecar.http("/metrics")[1].decode()
    finally:
        flood.stopping.set()
        assert sidecar.stop() == 0


def test_a_drop_rate_limit_holds_within_5_percent_and_counts_every_message_it_drops(tmp_path):
    sidecar = start(tmp_path, rate_limit="{messages_per_second: 5000, burst: 0.5s, when_over: drop}")
    sender = SteadySender(sidecar, "steady", per_second=10_000)
    sender.start()
    try:
        try:
            rate = received_rate(sidecar, settle=1.0, window=3.0)
            print(f"received {rate:.0f} messages a second of 10,000 under a drop limit of 5,000")
            assert rate == pytest.approx(5000, rel=0.05)
        finally:
            sent = sender.stop()
        stats = sidecar.wait_for(lambda s: s["received"] + _dropped(sidecar) == sent, what="every message received or counted as dropped")
        assert stats["decoded_by_path"].get("native", 0) == 0  # cut into on the Python path
        wait_until(lambda: len(read_jsonl(tmp_path / "out" / "steady.jsonl")) == stats["received"], what="every received message written")
    finally:
        assert sidecar.stop() == 0


def _dropped(sidecar: SidecarProcess) -> int:
    found = re.search(r'^sidecar_rate_limited_messages_total\{input="tcp"\} (\S+)$', sidecar.http("/metrics")[1].decode(), re.M)
    return int(float(found.group(1))) if found else 0
