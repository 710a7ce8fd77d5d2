"""The production soak: real SDK processes and raw senders through one sidecar to four backends at
once, under faults, route reloads and restarts; then every message is looked for in every backend.

    .venv/bin/python bench/soak.py --minutes 30     # the full run
    .venv/bin/python bench/soak.py --seconds 60     # what tests/test_soak.py runs

Clients, each sending a numbered sequence (message N of source S carries N in `context.seq`, or
in `tags.seq` for metrics): the Perl, Python and C SDKs, each in its own OS process
(bench/soak_perl.pl, bench/soak_python.py, bench/soak_c.c), and a JSON-lines and a MessagePack
sender in this process, about 2,000 messages/s together. The sidecar (a subprocess, default queue
settings: disk queues) routes every source to a filesystem, PostgreSQL, S3 (SeaweedFS) and
CloudWatch Logs (moto) backend; each network backend is reached through a FaultProxy. During the
run: each proxy cycles through latency, resets, a black hole and refusals, a few seconds each,
healed in between; the routes.d drop-in is rewritten every 4 s, alternating between two
equivalent tables, the second of which adds a filesystem rule with a path of its own (an
instance started and retired each time); at a third of the run the sidecar gets SIGTERM and is
started again, at two thirds SIGKILL and again.

What is checked, and how "accepted" is told (docs/guarantees.md, "The soak", says it at length):
a message is accepted when it went through the correlator: it is then in at least one backend.
Per backend, every accepted message must be there; per run of the sidecar, the distinct messages
received in that run (by their `received_at`) must be what its counters say it routed there
(exactly, or at least what the last status file said for a run ended by SIGKILL); no drops; the
accounting `routed = delivered + dropped + queued` in every status file read; per client, what
was sent and never accepted must sit at a restart (a gap in the sequence inside a run is a
loss); the sidecar's RSS flat within each run. Exit status 1 when a criterion fails.
"""

import argparse
import bisect
import contextlib
import dataclasses
import datetime as dt
import functools
import gzip
import json
import os
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from array import array
from collections import Counter
from pathlib import Path

import msgpack
import orjson

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.faultproxy import FaultProxy  # noqa: E402
from tests.harness import SidecarProcess  # noqa: E402
from tests.services.cloudwatch import MotoServer  # noqa: E402
from tests.services.postgres import start_server as start_postgres  # noqa: E402
from tests.services.s3 import SeaweedS3  # noqa: E402

C_CLIENT = REPO / "sdk_clients" / "c" / "build" / "soak"
# source, how it is sent, messages per second (before --rate)
CLIENTS = (
    ("soak-perl", "perl", 300),
    ("soak-python", "python", 400),
    ("soak-c", "c", 500),
    ("soak-raw-json", "json", 500),
    ("soak-raw-msgpack", "msgpack", 300),
)
BACKENDS = ("files", "postgres", "s3", "cloudwatch")
EXTRA = "files(path=extra/{source}.jsonl)"  # the label of version B's extra rule
BUCKET = "soak"
# Each proxy's cycle: a fault, then healed for a while. The proxies start a third of a cycle apart.
FAULT_CYCLE = (("latency", 3.0), ("pass", 3.0), ("reset", 2.0), ("pass", 3.0), ("black_hole", 3.0), ("pass", 3.0), ("refuse", 3.0), ("pass", 4.0))
FAULTS_FROM = 5.0  # seconds of warm-up without faults
RELOAD_EVERY = 4.0
RSS_LIMIT = 1.5  # within a run, the last third's peak over the first third's, after warm-up
DRAIN_TIMEOUT = 180.0

CONFIG = """\
tcp: {{host: 127.0.0.1, port: {port}}}
storage: {{data_dir: {spool}}}
backends:
  files: {{type: filesystem, base_path: {files}, create_base_path: true}}
  postgres: {{type: postgres, connection_string: "${{SOAK_PG_URL}}", table: soak_events}}
  s3:
    type: s3
    region: us-east-1
    endpoint_url: "http://127.0.0.1:{s3_port}"
    bucket: {bucket}
    # The type's default waits up to 60 s to fill an object; 2 s keeps S3 as busy as the others.
    # Queue, retry and circuit breaker settings are the defaults everywhere.
    batch: {{timeout: 2s}}
  cloudwatch:
    type: cloudwatch
    region: us-east-1
    endpoint_url: "http://127.0.0.1:{cw_port}"
    log_group: "/soak/{{source}}"
    log_stream: "{{type}}"
"""

# Two equivalent tables: every source to the four backends in both. B splits them between a
# glob and `all`, in another order, and adds a filesystem rule with its own path.
ROUTES_FILE = "50-soak.yaml"
ROUTES = {
    "A": """\
# soak, version A: one list
all:
  - {backend: files}
  - {backend: postgres}
  - {backend: s3}
  - {backend: cloudwatch}
""",
    "B": """\
# soak, version B: the same four backends, plus a filesystem rule of its own
soak-*:
  - {backend: cloudwatch, priority: 10}
  - {backend: s3, priority: 20}
all:
  - {backend: postgres}
  - {backend: files}
  - {backend: files, config: {path: "extra/{source}.jsonl"}}
""",
}


# ---------------------------------------------------------------- small helpers


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def iso_now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def quiet_port() -> int:
    """A free port below the kernel's ephemeral range. The sidecar's port is reconnected to while
    nothing listens (restarts), and so are the proxies' (refusals): a port the kernel may give
    an outgoing connection could then connect to itself, or be taken before we listen again."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(500):
        port = random.randrange(10000, max(10001, low))
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port found below {low}")


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def connections_active(stats: dict) -> int:
    """Clients connected now: under `sources` (one entry per way in), or `listener` before there were sources."""
    sources = stats.get("sources") or {"tcp": stats.get("listener", {})}
    return sum(source.get("connections_active", 0) for source in sources.values())


def read_status(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class Clock:
    """Seconds since the soak began, for the timeline and the RSS table."""

    def __init__(self):
        self.began = time.monotonic()

    def __call__(self) -> float:
        return time.monotonic() - self.began


class Timeline:
    def __init__(self, clock: Clock):
        self.clock = clock
        self.events: list[tuple[float, str, str]] = []  # (t, kind, text)
        self._lock = threading.Lock()

    def add(self, kind: str, text: str, t: float | None = None) -> None:
        with self._lock:
            self.events.append((self.clock() if t is None else t, kind, text))


# ---------------------------------------------------------------- servers


class Servers:
    """PostgreSQL, SeaweedFS and moto on free ports, each behind a FaultProxy; stopped on exit."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self._stack = contextlib.ExitStack()
        self.proxies: dict[str, FaultProxy] = {}

    def __enter__(self) -> "Servers":
        try:
            self.postgres = start_postgres()
            self._stack.callback(self.postgres.close)
            self.s3 = SeaweedS3(self.workdir / "seaweedfs").start()
            self._stack.callback(self.s3.stop)
            (self.workdir / "moto").mkdir(exist_ok=True)
            self.cloudwatch = MotoServer(self.workdir / "moto").start()
            self._stack.callback(self.cloudwatch.stop)
            self.s3.create_bucket(BUCKET)
            for name, port in (("postgres", self.postgres.port), ("s3", int(self.s3.endpoint_url.rsplit(":", 1)[1])), ("cloudwatch", self.cloudwatch.port)):
                self.proxies[name] = self._stack.enter_context(FaultProxy(("127.0.0.1", port), port=quiet_port()))
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def sidecar_environ(self) -> dict[str, str]:
        proxy = self.proxies["postgres"].port
        return {
            "SOAK_PG_URL": self.postgres.url().replace(f":{self.postgres.port}/", f":{proxy}/"),
            # Fixed credentials, and nothing from this machine's own AWS configuration.
            "AWS_ACCESS_KEY_ID": self.s3.access_key, "AWS_SECRET_ACCESS_KEY": self.s3.secret_key,
            "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent", "AWS_EC2_METADATA_DISABLED": "true",
        }


# ---------------------------------------------------------------- clients


def soak_message(source: str, seq: int, timestamp: str) -> dict:
    """The raw senders' mix, the same as the SDK clients': mostly info, some warnings, a metric
    in five, a rare error (flushed by the sidecar at once)."""
    if seq % 5 == 4:
        return {"source": source, "type": "metric", "timestamp": timestamp, "data": {"name": "soak.seq", "value": seq, "unit": "count", "tags": {"seq": str(seq)}}}
    level = "error" if seq % 997 == 0 else "warning" if seq % 3 == 0 else "info"
    return {"source": source, "type": "event", "timestamp": timestamp, "data": {"level": level, "message": f"soak {source} #{seq}"}, "context": {"seq": seq}}


def peer_closed(conn: socket.socket) -> bool:
    """The sidecar only ever writes to refuse a stream: readable means closed (or refused)."""
    readable, _, _ = select.select([conn], [], [], 0)
    if not readable:
        return False
    try:
        conn.recv(4096)
    except OSError:
        pass
    return True


class RawSender(threading.Thread):
    """Numbered messages at a steady rate over one connection, JSON lines or MessagePack,
    reconnecting when the sidecar goes away. No buffer: what was written into a socket the
    sidecar never read is lost, and shows as a gap at that restart."""

    def __init__(self, source: str, encoding: str, port: int, per_second: float):
        super().__init__(daemon=True, name=f"sender {source}")
        self.source = source
        self.encoding = encoding
        self.port = port
        self.per_second = per_second
        self.written = 0  # ids handed to a socket (0 .. written-1)
        self.connections = 0
        self.error: BaseException | None = None
        self._stopping = threading.Event()

    def encode(self, first: int, count: int) -> bytes:
        timestamp = iso_now()
        messages = (soak_message(self.source, seq, timestamp) for seq in range(first, first + count))
        if self.encoding == "msgpack":
            return b"".join(map(msgpack.packb, messages))
        return b"".join(orjson.dumps(m) + b"\n" for m in messages)

    def run(self) -> None:
        try:
            while not self._stopping.is_set():
                try:
                    conn = socket.create_connection(("127.0.0.1", self.port), timeout=5)
                except OSError:
                    self._stopping.wait(0.05)  # down: retry soon, as an SDK's first backoff
                    continue
                with conn:
                    conn.settimeout(None)
                    self.connections += 1
                    self._send_until_gone(conn)
        except BaseException as exc:  # reported by stop(), on the soak's thread
            self.error = exc

    def _send_until_gone(self, conn: socket.socket) -> None:
        started = time.monotonic()
        written_here = 0
        try:
            while not self._stopping.is_set():
                if peer_closed(conn):
                    return
                due = int((time.monotonic() - started) * self.per_second) + 1 - written_here
                if due > 0:
                    first = self.written
                    self.written += due  # counted before the write: a failed one may have sent a part
                    written_here += due
                    conn.sendall(self.encode(first, due))
                time.sleep(0.005)
            conn.shutdown(socket.SHUT_WR)
            conn.settimeout(30)
            conn.recv(1)  # the sidecar closes once it has read everything
        except OSError:
            return

    def stop(self) -> dict:
        self._stopping.set()
        self.join(60)
        if self.error is not None:
            raise self.error
        return {"called": self.written, "sent": self.written, "dropped": 0, "reconnects": max(0, self.connections - 1), "exit": 0}


class SdkProcess:
    """One SDK's soak client (bench/soak_perl.pl, soak_python.py, soak_c.c) in its own process."""

    def __init__(self, source: str, kind: str, port: int, per_second: float, seconds: float, workdir: Path):
        command = {
            "perl": ["perl", f"-I{REPO / 'sdk_clients' / 'perl' / 'lib'}", str(REPO / "bench" / "soak_perl.pl")],
            "python": [sys.executable, str(REPO / "bench" / "soak_python.py")],
            "c": [str(C_CLIENT)],
        }[kind]
        env = {k: v for k, v in os.environ.items() if k not in ("MONITORING_SIDECAR", "MONITORING_SOURCE", "TRACEPARENT", "MONITORING_CONTEXT")}
        self.source = source
        self.stderr_path = workdir / f"{source}.stderr"
        self.process = subprocess.Popen(
            [*command, source, "127.0.0.1", str(port), f"{per_second:g}", f"{seconds:g}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.stderr_path.open("wb"), env=env, text=True,
        )

    def result(self, timeout: float) -> dict:
        """Its own report: called (ids used), sent (handed to the socket), dropped, reconnects."""
        try:
            out, _ = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            out, _ = self.process.communicate()
        lines = [line for line in out.splitlines() if line.startswith("{")]
        report = json.loads(lines[-1]) if lines else {}
        return {
            "called": report.get("called", 0), "sent": report.get("sent", 0), "dropped": report.get("dropped", 0),
            "reconnects": report.get("reconnects", 0), "exit": self.process.returncode, "flushed": report.get("flushed"),
            "stderr": self.stderr_path.read_text(errors="replace")[-500:],
        }


def build_c_client() -> None:
    subprocess.run(["make", "-s", "-C", str(REPO / "sdk_clients" / "c"), "build/soak"], check=True, stdin=subprocess.DEVNULL)


# ---------------------------------------------------------------- the sidecar, run after run


@dataclasses.dataclass
class Run:
    number: int
    started_ms: int  # wall clock: messages received in this run have received_at from here ...
    started_t: float
    pid: int = 0
    ready_seconds: float = 0.0
    ended_ms: int = 0  # ... to here
    ended_by: str = ""  # SIGTERM, SIGKILL, end (the final SIGTERM), crash, hung
    exit_code: int | None = None
    stop_seconds: float = 0.0
    final: dict | None = None  # the status file after exit; after SIGKILL the last one written (50 ms old at most)
    log: str = ""

    @property
    def exact(self) -> bool:
        """Whether `final` holds the run's last counters (written at exit)."""
        return self.ended_by in ("SIGTERM", "end")


class SoakSidecar:
    """One SidecarProcess started again and again on the same port, config, routes and data_dir;
    each run has its own status file and log."""

    def __init__(self, workdir: Path, config: str, env: dict, clock: Clock):
        self.process = SidecarProcess(workdir, config, env=env)
        self.clock = clock
        self.runs: list[Run] = []
        self.lock = threading.Lock()  # held while the process is being replaced

    def start(self) -> Run:
        sidecar = self.process
        number = len(self.runs) + 1
        sidecar.status_path = sidecar.workdir / f"status-{number}.json"
        sidecar.stderr_path = sidecar.workdir / f"sidecar-{number}.stderr"
        sidecar.stdout_path = sidecar.workdir / f"sidecar-{number}.stdout"
        run = Run(number, now_ms(), self.clock())
        began = time.monotonic()
        self.runs.append(run)
        sidecar.start(timeout=60)
        run.pid = sidecar.process.pid
        run.ready_seconds = time.monotonic() - began
        return run

    def stop(self, signum: int, ended_by: str) -> Run:
        run = self.runs[-1]
        began = time.monotonic()
        try:
            run.exit_code = self.process.stop(signum, timeout=30)
            run.ended_by = ended_by
        except AssertionError:  # killed after 30 s: a hang, reported
            run.exit_code, run.ended_by = self.process.process.returncode, "hung"
        self._close(run, began)
        return run

    def _close(self, run: Run, began: float) -> None:
        run.ended_ms = now_ms()
        run.stop_seconds = time.monotonic() - began
        run.final = read_status(self.process.status_path)
        run.log = self.process.log()

    def restart(self, signum: int, ended_by: str) -> tuple[Run, Run]:
        with self.lock:
            old = self.stop(signum, ended_by)
            return old, self.start()

    def crashed(self) -> bool:
        process = self.process.process
        return process is not None and process.poll() is not None

    def restart_after_crash(self) -> Run:
        with self.lock:
            run = self.runs[-1]
            run.exit_code, run.ended_by = self.process.process.returncode, "crash"
            self._close(run, time.monotonic())
            self.start()
            return run

    def status(self) -> dict | None:
        return read_status(self.process.status_path)


# ---------------------------------------------------------------- what runs beside the load


def status_problems(stats: dict) -> list[str]:
    """What must hold in every status file: the accounting per backend, nothing dropped, disk
    queues, nothing undecodable, unrouted or refused on reload."""
    problems = []
    for b in stats["backends"]:
        dropped = sum(b["dropped"].values())
        if b["routed"] != b["delivered"] + dropped + b["queued"]:
            problems.append(f"{b['backend']}: routed {b['routed']} != delivered {b['delivered']} + dropped {dropped} + queued {b['queued']}")
        if b["dropped"]:
            problems.append(f"{b['backend']}: dropped {b['dropped']}")
        if b["queue"]["mode"] != "disk":
            problems.append(f"{b['backend']}: queue in {b['queue']['mode']}, not on disk")
    for key in ("decode_errors", "correlator_dropped"):
        if stats[key]:
            problems.append(f"{key} {stats[key]}")
    if stats["unrouted"]:
        problems.append(f"unrouted {stats['unrouted']}")
    if stats["reload_failures"]:
        problems.append(f"reload failures {stats['reload_failures']}: {stats['last_reload_error']}")
    return problems


@dataclasses.dataclass
class Sample:
    t: float
    run: int
    rss_kib: int
    received: int
    queued: int


class Sampler(threading.Thread):
    """Checks the status file every STATUS_EVERY seconds (it is rewritten every 50 ms: a
    transient wrong count shows only if read often) and samples it with the sidecar's RSS every
    `interval` seconds."""

    STATUS_EVERY = 0.1

    def __init__(self, sidecar: SoakSidecar, clock: Clock, interval: float):
        super().__init__(daemon=True, name="sampler")
        self.sidecar = sidecar
        self.clock = clock
        self.interval = interval
        self.samples: list[Sample] = []
        self.statuses_checked = 0
        self.violations: list[str] = []
        self.violation_count = 0
        self._stopping = threading.Event()

    def run(self) -> None:
        next_sample = 0.0
        while not self._stopping.wait(self.STATUS_EVERY):
            sampled = self.read()
            if sampled is None:
                continue
            run, stats, rss = sampled
            t = self.clock()
            self.check(t, run, stats)
            if t >= next_sample:
                self.samples.append(Sample(t, run.number, rss, stats["received"], sum(b["queued"] for b in stats["backends"])))
                next_sample = t + self.interval

    def read(self) -> tuple[Run, dict, int] | None:
        if not self.sidecar.lock.acquire(blocking=False):
            return None  # being restarted
        try:
            run = self.sidecar.runs[-1]
            stats = self.sidecar.status() if not self.sidecar.crashed() else None
            rss = rss_kib(run.pid)
        finally:
            self.sidecar.lock.release()
        return None if stats is None or rss is None else (run, stats, rss)

    def check(self, t: float, run: Run, stats: dict) -> None:
        self.statuses_checked += 1
        for problem in status_problems(stats):
            self.violation_count += 1
            if len(self.violations) < 20:
                self.violations.append(f"t={t:.1f}s run {run.number}: {problem}")

    def stop(self) -> None:
        self._stopping.set()
        self.join(10)


class FaultScheduler(threading.Thread):
    """Cycles each proxy through FAULT_CYCLE, the proxies a third of a cycle apart."""

    def __init__(self, proxies: dict[str, FaultProxy], clock: Clock, timeline: Timeline):
        super().__init__(daemon=True, name="faults")
        self.proxies = proxies
        self.clock = clock
        self.timeline = timeline
        self._stopping = threading.Event()

    def run(self) -> None:
        cycle = sum(seconds for _, seconds in FAULT_CYCLE)
        # name -> (when its next change is due, index in the cycle)
        due = {name: (FAULTS_FROM + i * cycle / len(self.proxies), 0) for i, name in enumerate(self.proxies)}
        while True:
            name, (at, index) = min(due.items(), key=lambda item: item[1][0])
            if self._stopping.wait(max(0.0, at - self.clock())):
                return
            mode, seconds = FAULT_CYCLE[index]
            self.proxies[name].set(mode)
            self.timeline.add("fault", f"{name}: {mode}" + (f" for {seconds:g} s" if mode != "pass" else ""))
            due[name] = (at + seconds, (index + 1) % len(FAULT_CYCLE))

    def stop_and_heal(self) -> None:
        self._stopping.set()
        self.join(10)
        for name, proxy in self.proxies.items():
            if proxy.mode != "pass":
                proxy.set("pass")
                self.timeline.add("fault", f"{name}: pass (the end)")


class Controller(threading.Thread):
    """Rewrites the drop-in every RELOAD_EVERY seconds and restarts the sidecar at a third
    (SIGTERM) and two thirds (SIGKILL) of the run; restarts it after a crash, which is a failure."""

    def __init__(self, sidecar: SoakSidecar, clock: Clock, timeline: Timeline, seconds: float, problems: list[str]):
        super().__init__(daemon=True, name="controller")
        self.sidecar = sidecar
        self.clock = clock
        self.timeline = timeline
        self.seconds = seconds
        self.problems = problems
        self.restarts = [(seconds / 3, signal.SIGTERM), (2 * seconds / 3, signal.SIGKILL)]
        self.version = "A"
        self.activations = 0  # times version B (the extra rule) took effect
        self.reloads_applied = 0

    def run(self) -> None:
        next_reload = 3.0
        while (now := self.clock()) < self.seconds:
            if self.sidecar.crashed():
                run = self.sidecar.restart_after_crash()
                self.problems.append(f"the sidecar exited by itself (code {run.exit_code}) in run {run.number}; log tail:\n{run.log[-2000:]}")
                self.timeline.add("restart", f"CRASH of run {run.number} (exit {run.exit_code}); started again")
            elif self.restarts and self.restarts[0][0] <= now:
                self.restart(self.restarts.pop(0)[1])
            elif next_reload <= now:
                self.reload("B" if self.version == "A" else "A")
                next_reload = self.clock() + RELOAD_EVERY
            else:
                due = min(next_reload, self.restarts[0][0] if self.restarts else self.seconds, self.seconds)
                time.sleep(min(0.5, max(0.0, due - now)))  # a timer: the schedule is by the clock

    def restart(self, signum: int) -> None:
        name = signal.Signals(signum).name
        t = self.clock()
        old, new = self.sidecar.restart(signum, name)
        self.timeline.add("restart", f"{name}: run {old.number} exited {old.exit_code} in {old.stop_seconds:.1f} s; run {new.number} listening {new.ready_seconds:.1f} s later", t)

    def reload(self, version: str) -> None:
        sidecar = self.sidecar.process
        before = sidecar.stats()
        t = self.clock()
        sidecar.write_route(ROUTES_FILE, ROUTES[version])
        try:
            after = sidecar.wait_for(lambda s: s["reloads"] > before["reloads"] or s["reload_failures"] > before["reload_failures"], timeout=15, what=f"version {version} of the routes applied")
        except AssertionError as exc:
            self.problems.append(f"reload to version {version} at t={t:.1f}s: {str(exc)[:1500]}")
            return
        if after["reload_failures"] > before["reload_failures"]:
            self.problems.append(f"reload to version {version} at t={t:.1f}s rejected: {after['last_reload_error']}")
            return
        self.version = version
        self.reloads_applied += 1
        self.activations += version == "B"
        self.timeline.add("reload", f"routes version {version} applied {self.clock() - t:.1f} s after the write", t)


# ---------------------------------------------------------------- reading the backends back

Identity = tuple  # (source, seq or None, received_at in ms, other key or None)


@functools.lru_cache(maxsize=8192)
def received_ms(text: str) -> int:
    return round(dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1000)


def identity_of(message: dict) -> Identity:
    """What names a message: its source and seq; a message without one (an SDK's drop report)
    by its name, value and timestamp."""
    source = message.get("source")
    data = message.get("data") or {}
    context = message.get("context")
    tags = data.get("tags")
    seq = context.get("seq") if isinstance(context, dict) else None
    if seq is None and isinstance(tags, dict):
        seq = tags.get("seq")
    received = received_ms(message["received_at"]) if "received_at" in message else 0
    if seq is not None:
        return source, int(seq), received, None
    return source, None, received, (data.get("name"), str(data.get("value")), message.get("timestamp"))


def identities_of_lines(lines) -> list:
    found = []
    for line in lines:
        if not line:
            continue
        try:
            found.append(identity_of(orjson.loads(line)))
        except (ValueError, KeyError, TypeError, AttributeError):
            found.append(("(unreadable line)", None, 0, None))
    return found


def read_files(directory: Path):
    for path in sorted(directory.glob("*.jsonl")):
        yield from identities_of_lines(path.read_bytes().splitlines())


POSTGRES_QUERY = """
SELECT source, coalesce(context->>'seq', data->'tags'->>'seq'), (extract(epoch FROM received_at) * 1000)::bigint,
       data->>'name', data->>'value', to_char(time AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')
FROM soak_events
"""


def read_postgres(server):
    import psycopg

    with psycopg.connect(server.admin_dsn()) as conn, conn.cursor(name="soak") as cursor:
        cursor.itersize = 20000
        cursor.execute(POSTGRES_QUERY)
        for source, seq, received, name, value, timestamp in cursor:
            yield (source, int(seq), received, None) if seq is not None else (source, None, received, (name, value, timestamp))


def read_s3(server):
    client = server.client()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for item in page.get("Contents", []):
            body = client.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read()
            if item["Key"].endswith(".gz"):
                body = gzip.decompress(body)
            yield from identities_of_lines(body.splitlines())


def read_cloudwatch(server):
    client = server.client()
    for group in server.groups("/soak/"):
        for stream in server.streams(group):
            token = None
            while True:
                page = client.get_log_events(logGroupName=group, logStreamName=stream, startFromHead=True, **({"nextToken": token} if token else {}))
                yield from identities_of_lines(e["message"].encode() for e in page["events"])
                if not page["events"] or page.get("nextForwardToken") == token:
                    break
                token = page["nextForwardToken"]


# ---------------------------------------------------------------- what arrived, per message


class Presence:
    """How many copies of each message each backend holds (a byte per message and backend), and
    when the sidecar received each message (its received_at, which names the run)."""

    def __init__(self, called: dict[str, int], runs: list[Run]):
        self.called = called
        self.runs = runs
        self._starts = [r.started_ms for r in runs]
        self.copies: dict[str, dict[str, bytearray]] = {}
        self.received = {source: array("q", bytes(8 * n)) for source, n in called.items()}  # 0: not seen
        self.others: dict[str, Counter] = {}  # backend -> (source, key) -> copies
        self.distinct_per_run: dict[str, Counter] = {}  # backend -> run number -> distinct messages
        self.phantoms: Counter = Counter()  # backend -> messages no client sent
        self.received_twice: Counter = Counter()  # backend -> copies whose received_at differs from another's
        self.outside_runs: Counter = Counter()  # backend -> received_at in no run's window

    def run_of(self, ms: int) -> int:
        """The run whose window holds `ms`; 0 for none."""
        index = bisect.bisect_right(self._starts, ms)
        if index == 0:
            return 0
        run = self.runs[index - 1]
        return run.number if not run.ended_ms or ms <= run.ended_ms else 0

    def add(self, backend: str, identities) -> None:
        copies = self.copies.setdefault(backend, {source: bytearray(n) for source, n in self.called.items()})
        others = self.others.setdefault(backend, Counter())
        per_run = self.distinct_per_run.setdefault(backend, Counter())
        for source, seq, received, other in identities:
            counts = copies.get(source)
            if counts is None or (seq is not None and not 0 <= seq < len(counts)) or (seq is None and other is None):
                self.phantoms[backend] += 1
                continue
            if seq is None:
                key = (source, other)
                if not others[key]:
                    self._count_distinct(backend, per_run, received)
                others[key] += 1
                continue
            first = self.received[source][seq]
            if not first:
                self.received[source][seq] = received
            elif first != received:
                self.received_twice[backend] += 1
            if not counts[seq]:
                self._count_distinct(backend, per_run, received)
            if counts[seq] < 255:
                counts[seq] += 1

    def _count_distinct(self, backend: str, per_run: Counter, received: int) -> None:
        run = self.run_of(received)
        if not run:
            self.outside_runs[backend] += 1
        per_run[run] += 1

    def accepted(self, source: str) -> bytes:
        """1 for each message some main backend holds: it went through the correlator."""
        arrays = [self.copies[b][source] for b in BACKENDS]
        return bytes(1 if any(column) else 0 for column in zip(*arrays))

    def accepted_others(self) -> set:
        return set().union(*(self.others[b] for b in BACKENDS))


# ---------------------------------------------------------------- checks


@dataclasses.dataclass
class Criterion:
    name: str
    ok: bool
    detail: str = ""


@dataclasses.dataclass
class Gap:
    source: str
    first: int
    end: int  # exclusive
    after_run: int | None  # the run of the accepted message before it (None: at the start)
    before_run: int | None  # the run of the accepted message after it (None: at the end)

    @property
    def at_restart(self) -> bool:
        return self.after_run is not None and self.before_run is not None and self.before_run > self.after_run


def gaps_of(source: str, accepted: bytes, presence: Presence) -> list[Gap]:
    """Maximal runs of ids a client used that no backend holds."""
    received = presence.received[source]
    found = []
    at = 0
    while (first := accepted.find(b"\x00", at)) >= 0:
        end = accepted.find(b"\x01", first)
        end = len(accepted) if end < 0 else end
        after = presence.run_of(received[first - 1]) if first else None
        before = presence.run_of(received[end]) if end < len(accepted) else None
        found.append(Gap(source, first, end, after, before))
        at = end
    return found


def carried_over(log: str, directory_name: str) -> int:
    """Messages a previous run left in a backend's disk log, as this run's log says."""
    total = 0
    for path, count in re.findall(r"disk log (\S+): (\d+) messages from a previous run", log):
        if Path(path).name == directory_name:
            total += int(count)
    return total


def backend_entry(stats: dict | None, label: str) -> dict | None:
    if not stats:
        return None
    return next((b for b in stats["backends"] if b["backend"] == label), None)


class Verdict:
    """Every criterion of the soak, and the figures the report shows."""

    def __init__(self, presence: Presence, clients: dict[str, dict], runs: list[Run], controller: Controller, sampler: Sampler, problems: list[str]):
        self.presence = presence
        self.clients = clients
        self.runs = runs
        self.controller = controller
        self.sampler = sampler
        self.criteria: list[Criterion] = []
        self.doubts: list[str] = []
        self.accepted = {source: presence.accepted(source) for source in clients}
        self.gaps = {source: gaps_of(source, accepted, presence) for source, accepted in self.accepted.items()}
        self.backend_rows: list[dict] = []
        self.run_rows: list[dict] = []
        for problem in problems:
            self.criteria.append(Criterion("the run itself", False, problem))

    def check(self) -> "Verdict":
        self.check_clients()
        self.check_backends()
        self.check_runs()
        self.check_extra()
        self.check_statuses()
        self.check_rss()
        return self

    def add(self, name: str, ok: bool, detail: str = "") -> None:
        self.criteria.append(Criterion(name, ok, detail))

    @property
    def passed(self) -> bool:
        return all(c.ok for c in self.criteria)

    # -- clients

    def check_clients(self) -> None:
        for source, report in self.clients.items():
            accepted = self.accepted[source].count(1)
            self.add(f"{source}: the client ran to its end and reported", report["exit"] == 0 and report["called"] > 0, f"exit {report['exit']}, {report.get('stderr', '')[-300:]}")
            self.add(f"{source}: accepted no more than it sent", accepted <= report["sent"], f"accepted {accepted}, sent {report['sent']}")
            if report["sent"] + report["dropped"] != report["called"]:
                self.doubts.append(f"{source}: the SDK's own counts do not add up: called {report['called']} != sent {report['sent']} + dropped {report['dropped']}")
            inside = [g for g in self.gaps[source] if not g.at_restart]
            self.add(
                f"{source}: every id never accepted is at a restart (none lost inside a run, none at the end)", not inside,
                "; ".join(f"ids {g.first}..{g.end - 1} ({g.end - g.first}) between run {g.after_run} and run {g.before_run}" for g in inside[:5]),
            )
            runs_seen = {self.presence.run_of(ms) for ms in self.presence.received[source] if ms}
            missing_runs = [r.number for r in self.runs if r.number not in runs_seen]
            self.add(f"{source}: delivered messages in every run (it survived the restarts)", not missing_runs, f"none in runs {missing_runs}")

    # -- backends

    def last_chunk_of_killed_runs(self) -> dict[int, int]:
        """run -> the latest received_at of a run ended by SIGKILL or a crash: the chunk the
        correlator may have been routing, to some backends and not yet to others, when it died."""
        killed = {r.number for r in self.runs if not r.exact}
        latest: dict[int, int] = {}
        for received in self.presence.received.values():
            for ms in received:
                if ms and (run := self.presence.run_of(ms)) in killed and ms > latest.get(run, 0):
                    latest[run] = ms
        return latest

    def check_backends(self) -> None:
        presence = self.presence
        accepted_others = presence.accepted_others()
        latest = None
        for backend in BACKENDS:
            copies = presence.copies[backend]
            missing, excused = [], 0
            present = duplicates = 0
            for source, accepted in self.accepted.items():
                counts = copies[source]
                present += len(counts) - counts.count(0)
                duplicates += sum(counts) - (len(counts) - counts.count(0))
                for seq in (i for i, (a, c) in enumerate(zip(accepted, counts)) if a and not c):
                    if latest is None:
                        latest = self.last_chunk_of_killed_runs()
                    ms = presence.received[source][seq]
                    if latest.get(presence.run_of(ms)) == ms:
                        excused += 1
                    else:
                        missing.append((source, seq))
            others = presence.others[backend]
            missing_others = len(accepted_others - others.keys())
            expected = sum(a.count(1) for a in self.accepted.values()) + len(accepted_others)
            self.backend_rows.append({
                "backend": backend, "expected": expected, "present": present + len(others), "missing": len(missing) + missing_others,
                "excused": excused, "duplicates": duplicates + sum(others.values()) - len(others), "phantoms": presence.phantoms[backend],
            })
            self.add(
                f"{backend}: every accepted message is there", not missing and not missing_others,
                f"{len(missing) + missing_others} missing, e.g. {missing[:10]}" + (f"; {missing_others} SDK drop reports" if missing_others else ""),
            )
            self.add(f"{backend}: no message no client sent", not presence.phantoms[backend], f"{presence.phantoms[backend]} unknown or unreadable")
            if excused:
                self.doubts.append(f"{backend}: {excused} messages of the chunk being routed at SIGKILL are in other backends and not here (not routed here before the kill: not counted as missing)")
            if presence.received_twice[backend]:
                self.doubts.append(f"{backend}: {presence.received_twice[backend]} copies carry another received_at than a copy elsewhere (received twice?)")
            if presence.outside_runs[backend]:
                self.add(f"{backend}: every received_at inside a run", False, f"{presence.outside_runs[backend]} outside every run's window")

    # -- runs

    def check_runs(self) -> None:
        for run in self.runs:
            row = {"run": run.number, "ended_by": run.ended_by, "exit": run.exit_code, "stop_s": run.stop_seconds, "ready_s": run.ready_seconds, "backends": {}}
            final = run.final or {}
            row["received"] = final.get("received")
            row["routed"] = final.get("routed")
            row["lost"] = {source: sum(g.end - g.first for g in gaps if g.at_restart and g.after_run == run.number) for source, gaps in self.gaps.items()}
            if run.ended_by in ("SIGTERM", "end"):
                self.add(f"run {run.number}: {run.ended_by} exits 0", run.exit_code == 0, f"exit {run.exit_code}")
                lost = re.search(r"shutdown complete in [\d.]+s: .* lost (\d+)\)", run.log)
                self.add(f"run {run.number}: nothing lost at shutdown, as its log says", bool(lost) and lost.group(1) == "0", lost.group(0) if lost else "no 'shutdown complete' line")
                if final:
                    self.add(f"run {run.number}: at exit, every message read was routed", final["received"] == final["routed"] + final["unrouted"], f"received {final['received']}, routed {final['routed']}")
            elif final:
                row["in_channel"] = final["received"] - final["routed"]
            for backend in BACKENDS:
                entry = backend_entry(final, backend)
                if entry is None:
                    self.add(f"run {run.number}: {backend} in the last status", False, "absent")
                    continue
                carried = carried_over(run.log, backend)
                routed_here = entry["routed"] - carried
                present = self.presence.distinct_per_run[backend][run.number]
                ok = present == routed_here if run.exact else present >= routed_here
                row["backends"][backend] = (present, routed_here, carried)
                relation = "==" if run.exact else ">="
                self.add(
                    f"run {run.number}: {backend} holds what the sidecar routed to it in the run ({relation})", ok,
                    f"present {present}, routed {entry['routed']} - {carried} carried over = {routed_here}",
                )
            self.run_rows.append(row)

    # -- the extra rule of version B

    def check_extra(self) -> None:
        copies = self.presence.copies.get("extra")
        if copies is None:
            return
        phantoms = sum(1 for source, accepted in self.accepted.items() for a, c in zip(accepted, copies[source]) if c and not a)
        self.add("extra rule: every message in its files was accepted", not phantoms and not self.presence.phantoms["extra"], f"{phantoms} not accepted, {self.presence.phantoms['extra']} unknown")
        activations = self.controller.activations
        worst = 0
        for source, accepted in self.accepted.items():
            flags = bytes(1 if c else 0 for a, c in zip(accepted, copies[source]) if a)
            stretches = flags.count(b"\x00\x01") + (flags[:1] == b"\x01")
            worst = max(worst, stretches)
            self.add(
                f"extra rule: {source}'s messages there form one stretch per time the rule was applied (a loss inside one splits it)",
                1 <= stretches <= activations, f"{stretches} stretches, applied {activations} times",
            )
        lines = sum(sum(c) for c in copies.values()) + sum(self.presence.others["extra"].values())
        known = self.extra_delivered()
        self.add("extra rule: its files hold at least what its instances counted as delivered", lines >= known, f"{lines} lines, {known} delivered by the counters (runs ended by SIGKILL not counted)")
        self.extra_figures = {"lines": lines, "delivered_counted": known, "activations": activations, "worst_stretches": worst}

    def extra_delivered(self) -> int:
        """Delivered by the extra rule's instances: those retired on reload say it in the log,
        those alive at a clean exit in the exit status (a SIGKILL's are not known)."""
        pattern = re.escape(f"backend {EXTRA} drained and stopped (") + r"(\d+) delivered\)"
        total = 0
        for run in self.runs:
            total += sum(int(n) for n in re.findall(pattern, run.log))
            if run.exact and run.final:
                total += sum(b["delivered"] for b in run.final["backends"] if b["backend"] == EXTRA)
        return total

    # -- every status file read, and the exit statuses

    def check_statuses(self) -> None:
        sampler = self.sampler
        self.add(f"every status read ({sampler.statuses_checked}): accounting holds, nothing dropped, disk queues", not sampler.violation_count, f"{sampler.violation_count} problems: " + "; ".join(sampler.violations[:8]))
        for run in self.runs:
            problems = status_problems(run.final) if run.final else ["no status file"]
            self.add(f"run {run.number}: its last status is sound", not problems, "; ".join(problems[:8]))
        last = self.runs[-1].final or {"backends": [], "orphaned_buffers": ["(no status)"]}
        left = {b["backend"]: b["queued"] for b in last["backends"] if b["queued"]}
        self.add("at the end: nothing queued, no orphaned disk log", not left and not last["orphaned_buffers"], f"queued {left}, orphaned {last['orphaned_buffers']}")
        warnings = [line for run in self.runs for line in run.log.splitlines() if "no disk log" in line or "level=error" in line or "Traceback" in line]
        if warnings:
            self.doubts.append(f"{len(warnings)} error lines in the sidecar's logs, e.g.: " + " | ".join(w[-300:] for w in warnings[:3]))

    # -- memory

    def rss_by_run(self) -> list[dict]:
        rows = []
        for run in self.runs:
            samples = [s for s in self.sampler.samples if s.run == run.number]
            end_t = samples[-1].t if samples else run.started_t
            warm_up = max(5.0, 0.1 * (end_t - run.started_t))
            kept = [s.rss_kib for s in samples if s.t - run.started_t >= warm_up]
            row = {"run": run.number, "samples": len(samples), "judged": len(kept) >= 9, "peak": max((s.rss_kib for s in samples), default=0)}
            if row["judged"]:
                third = len(kept) // 3
                row["first"], row["last"] = max(kept[:third]), max(kept[-third:])
                row["ok"] = row["last"] <= RSS_LIMIT * row["first"]
            rows.append(row)
        return rows

    def check_rss(self) -> None:
        rows = self.rss_by_run()
        for row in rows:
            if row["judged"]:
                self.add(
                    f"run {row['run']}: RSS flat (last third's peak <= {RSS_LIMIT}x the first third's, after warm-up)", row["ok"],
                    f"{row['first'] / 1024:.1f} MiB then {row['last'] / 1024:.1f} MiB",
                )
        self.add("RSS judged in at least one run", any(r["judged"] for r in rows), "every run too short to judge")


# ---------------------------------------------------------------- the report


def render_report(seconds: float, verdict: Verdict, timeline: Timeline, sampler: Sampler, workdir: Path, rates: dict[str, float]) -> str:
    out = []
    w = out.append
    total_rate = sum(rates.values())
    w(f"soak: {seconds:g} s, {len(rates)} clients at {total_rate:g} messages/s together, backends {', '.join(BACKENDS)} (+ the extra rule of routes version B)")
    w(f"workdir: {workdir}")
    w("")
    w("clients (ids a client used; sent = handed to a socket; SDK-dropped = the SDK's own count; accepted = in some backend)")
    w(f"  {'client':<18} {'used':>9} {'sent':>9} {'SDK-dropped':>11} {'accepted':>9} {'lost in flight':>14} {'gaps':>5} {'reconnects':>10} {'exit':>5}")
    for source, report in verdict.clients.items():
        accepted = verdict.accepted[source].count(1)
        lost = report["called"] - accepted - report["dropped"]
        w(f"  {source:<18} {report['called']:>9} {report['sent']:>9} {report['dropped']:>11} {accepted:>9} {lost:>14} {len(verdict.gaps[source]):>5} {report['reconnects']:>10} {report['exit']!s:>5}")
    w("")
    w("backends (expected = every accepted message; duplicates = copies beyond the first, at least once)")
    w(f"  {'backend':<11} {'expected':>9} {'present':>9} {'missing':>8} {'duplicates':>10} {'unknown':>8}")
    for row in verdict.backend_rows:
        excused = f"  ({row['excused']} of the chunk being routed at SIGKILL in other backends only)" if row["excused"] else ""
        w(f"  {row['backend']:<11} {row['expected']:>9} {row['present']:>9} {row['missing']:>8} {row['duplicates']:>10} {row['phantoms']:>8}{excused}")
    if hasattr(verdict, "extra_figures"):
        f = verdict.extra_figures
        w(f"  extra rule: {f['lines']} lines, applied {f['activations']} times, at most {f['worst_stretches']} stretches per source, {f['delivered_counted']} delivered by its counters")
    w("")
    w("runs of the sidecar (per backend: distinct messages received in the run that it holds / routed there in the run, from the counters less what was carried over on disk)")
    for row in verdict.run_rows:
        lost = ", ".join(f"{s.removeprefix('soak-')} {n}" for s, n in row["lost"].items())
        channel = f"; in the listener channel at the last status: {row['in_channel']}" if "in_channel" in row else ""
        w(f"  run {row['run']}: ended by {row['ended_by']} (exit {row['exit']}, {row['stop_s']:.1f} s to stop; listening {row['ready_s']:.1f} s after start); received {row['received']}, routed {row['routed']}{channel}")
        w("    " + "; ".join(f"{b} {p}/{r} (carried {c})" for b, (p, r, c) in row["backends"].items()))
        if row["ended_by"] != "end":
            w(f"    sent but never accepted at its end (lost in flight, per client): {lost}")
    w("")
    w("timeline")
    events = sorted(timeline.events)
    # A long run lists its restarts and the end; faults and reloads are summed up.
    summed = {"fault", "reload"} if len(events) > 80 else set()
    for t, kind, text in events:
        if kind not in summed:
            w(f"  {t:7.1f} s  {kind:<8} {text}")
    if summed:
        faults = Counter(text.split(" for ")[0] for _, kind, text in events if kind == "fault")
        w("  fault switches, not listed: " + ", ".join(f"{k} x{n}" for k, n in sorted(faults.items())))
        reloads = [(text, float(re.search(r"applied ([\d.]+) s", text).group(1))) for _, kind, text in events if kind == "reload"]
        versions = Counter(text.split()[2] for text, _ in reloads)
        delays = [delay for _, delay in reloads] or [0.0]
        w(f"  reloads, not listed: {len(reloads)} applied (" + ", ".join(f"version {v} x{n}" for v, n in sorted(versions.items())) + f"), {min(delays):.1f}-{max(delays):.1f} s after the write")
    w("")
    w("sidecar RSS over time")
    w(f"  {'t (s)':>7} {'run':>4} {'RSS MiB':>8} {'received':>10} {'queued':>8}")
    step = max(1, len(sampler.samples) // 24)
    for s in sampler.samples[::step]:
        w(f"  {s.t:7.1f} {s.run:>4} {s.rss_kib / 1024:8.1f} {s.received:>10} {s.queued:>8}")
    for row in verdict.rss_by_run():
        judged = f"after warm-up first third's peak {row['first'] / 1024:.1f} MiB, last third's {row['last'] / 1024:.1f} MiB ({row['last'] / row['first']:.2f}x)" if row["judged"] else "too short to judge"
        w(f"  run {row['run']}: {row['samples']} samples, peak {row['peak'] / 1024:.1f} MiB; {judged}")
    w("")
    if verdict.doubts:
        w("doubtful (reported, not failures)")
        for doubt in verdict.doubts:
            w(f"  - {doubt}")
        w("")
    failed = [c for c in verdict.criteria if not c.ok]
    w(f"criteria: {len(verdict.criteria) - len(failed)} of {len(verdict.criteria)} passed")
    for c in failed:
        w(f"  FAIL  {c.name}: {c.detail}")
    w(f"result: {'PASS' if verdict.passed else 'FAIL'}")
    return "\n".join(out)


# ---------------------------------------------------------------- the soak


class Soak:
    def __init__(self, servers: Servers, workdir: Path, seconds: float, rate_scale: float):
        self.servers = servers
        self.workdir = workdir
        self.seconds = seconds
        self.rates = {source: per_second * rate_scale for source, _, per_second in CLIENTS}
        self.clock = Clock()
        self.timeline = Timeline(self.clock)
        self.problems: list[str] = []
        self.files = workdir / "files"
        config = CONFIG.format(
            port=quiet_port(), spool=workdir / "spool", files=self.files, bucket=BUCKET,
            s3_port=servers.proxies["s3"].port, cw_port=servers.proxies["cloudwatch"].port,
        )
        (workdir / "sidecar").mkdir(exist_ok=True)
        self.sidecar = SoakSidecar(workdir / "sidecar", config, servers.sidecar_environ(), self.clock)
        self.sidecar.process.write_route(ROUTES_FILE, ROUTES["A"])
        self.sampler = Sampler(self.sidecar, self.clock, interval=0.5 if seconds <= 600 else seconds / 1200)
        self.faults = FaultScheduler(servers.proxies, self.clock, self.timeline)
        self.controller = Controller(self.sidecar, self.clock, self.timeline, seconds, self.problems)

    def run(self) -> tuple[Verdict, str]:
        self.sidecar.start()
        self.timeline.add("restart", f"run 1 listening on port {self.sidecar.process.port}")
        port = self.sidecar.process.port
        senders = {source: RawSender(source, kind, port, self.rates[source]) for source, kind, _ in CLIENTS if kind in ("json", "msgpack")}
        sdks = {source: SdkProcess(source, kind, port, self.rates[source], self.seconds, self.workdir) for source, kind, _ in CLIENTS if source not in senders}
        for thread in (*senders.values(), self.sampler, self.faults, self.controller):
            thread.start()
        self.controller.join()
        self.faults.stop_and_heal()
        clients = {source: sender.stop() for source, sender in senders.items()}
        clients.update({source: sdk.result(timeout=90) for source, sdk in sdks.items()})
        self.timeline.add("end", "clients done; draining")
        if self.controller.version != "B":
            self.controller.reload("B")  # an extra rule's log orphaned by a restart is delivered by it
        self.drain()
        self.sidecar.stop(signal.SIGTERM, "end")
        self.sampler.stop()
        self.timeline.add("end", f"final SIGTERM: exit {self.sidecar.runs[-1].exit_code}")
        presence = self.read_back({source: report["called"] for source, report in clients.items()})
        verdict = Verdict(presence, {s: clients[s] for s, _, _ in CLIENTS}, self.sidecar.runs, self.controller, self.sampler, self.problems).check()
        return verdict, render_report(self.seconds, verdict, self.timeline, self.sampler, self.workdir, self.rates)

    def drain(self) -> None:
        """Until every backend has delivered what it holds, and nothing waits in a log no
        backend owns."""
        def drained(stats: dict) -> bool:
            return (
                all(b["queued"] == 0 for b in stats["backends"]) and not stats["orphaned_buffers"]
                and connections_active(stats) == 0 and stats["received"] == stats["routed"] + stats["unrouted"]
            )

        began = self.clock()
        try:
            self.sidecar.process.wait_for(drained, timeout=DRAIN_TIMEOUT, what="every backend drained")
            self.timeline.add("end", f"drained in {self.clock() - began:.1f} s")
        except AssertionError as exc:
            self.problems.append(f"not drained within {DRAIN_TIMEOUT:g} s: {str(exc)[:3000]}")

    def read_back(self, called: dict[str, int]) -> Presence:
        presence = Presence(called, self.sidecar.runs)
        began = self.clock()
        presence.add("files", read_files(self.files))
        presence.add("extra", read_files(self.files / "extra"))
        presence.add("postgres", read_postgres(self.servers.postgres))
        presence.add("s3", read_s3(self.servers.s3))
        presence.add("cloudwatch", read_cloudwatch(self.servers.cloudwatch))
        self.timeline.add("end", f"read back the backends in {self.clock() - began:.1f} s")
        return presence


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, help="length of the load (default 30)")
    length.add_argument("--seconds", type=float, help="length of the load, for short runs")
    parser.add_argument("--rate", type=float, default=1.0, help="scale every client's rate (1: about 2,000 messages/s together)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (it is kept anyway when the soak fails)")
    parser.add_argument("--workdir", type=Path, help="work in this directory (made if missing, then kept) instead of a temporary one")
    args = parser.parse_args(argv)
    args.length = args.seconds if args.seconds is not None else (args.minutes if args.minutes is not None else 30) * 60
    if args.length < 30:
        parser.error("the soak needs at least 30 s: warm-up, two restarts and faults between them")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    build_c_client()
    workdir = args.workdir.resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="sidecar-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    with Servers(workdir) as servers:
        soak = Soak(servers, workdir, args.length, args.rate)
        try:
            verdict, report = soak.run()
        finally:
            if soak.sidecar.process.process is not None and soak.sidecar.process.process.poll() is None:
                soak.sidecar.process.process.kill()
    print(report, flush=True)
    if verdict.passed and not args.keep and not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if verdict.passed else 1


if __name__ == "__main__":
    sys.exit(main())
