"""The delivery machinery, written once around every backend: a bounded queue with a declared
overflow policy, batching per source, retries with backoff and jitter, a circuit breaker, and
the accounting `routed = delivered + dropped{reason} + queued`, true at every instant.
"""

import bisect
import collections
import hashlib
import itertools
import logging
import math
import random
import time

from pathlib import Path

import attrs
import trio

from sidecar.backends import backend_class
from sidecar.backends.base import MAX_RETRY_AFTER, Attempt, DeliveryError, PartialDelivery, PermanentError, RetryableError
from sidecar.config.settings import BackendSpec, CircuitBreakerSettings, QueueSettings
from sidecar.message import parse_timestamp
from sidecar.naming import safe_component
from sidecar.batch import Batch
from sidecar.logs import DistinctErrorLog, RateLimitedLog
from sidecar.disk_log import BufferInUse, DiskBudget, DiskLog, LogFull, Record

# Sources named in `rejected_by_source`: past that, the rest are counted under OTHER_SOURCES.
MAX_REJECTED_SOURCES = 1000
OTHER_SOURCES = "(other sources)"


def buffer_key(spec: BackendSpec) -> tuple:
    """What a backend instance's buffer belongs to: the destination (the backend's name and a
    rule's overrides), never its settings, so that a rotated password, a new connection string
    or a batch size keeps and delivers what is buffered."""
    return (spec.name, spec.overrides)


def log_directory_name(spec: BackendSpec) -> str:
    """The disk log's directory under data_dir: the backend's name, with a digest only where
    the name is not a safe file name as it is or a rule's overrides make another instance."""
    name = safe_component(spec.name)
    if name == spec.name and not spec.overrides:
        return name
    digest = hashlib.sha256(repr(buffer_key(spec)).encode()).hexdigest()[:12]
    return f"{name}-{digest}"

log = logging.getLogger("sidecar.delivery")


class DeliveryQueue:
    """A bounded queue of batches between the correlator and one backend instance.

    Items are Batches (one source's messages of a chunk, as JSON lines). Batches are shared with
    other backends' queues, so they are never changed here: a part is taken by slicing.

    With a disk log (`queue.mode: disk`, the default) every batch put is written to the log
    before it counts as queued, and memory is only a cache in front of it: up to `max_messages`
    wait in memory while nothing waits on disk ahead of them, the rest are read back in order as
    delivery catches up. The caps are the log's (`queue.max_bytes`, `storage.max_bytes`); past
    them `when_full` drops the newest or makes `put` wait. A batch the disk refuses (a write
    error) stays in memory if the cache has room and order allows; else it is dropped as
    `disk_error`. Delivered messages are acknowledged per source, in the order handed out
    (delivery of one source is in order), which moves the log's frontier.

    Without a log (`queue.mode: memory`) memory is the queue and `max_messages` its capacity:
    `block` makes `put` wait, `drop_newest` refuses what does not fit, `drop_oldest` discards
    from the front.
    """

    def __init__(self, settings: QueueSettings, disk_log: DiskLog | None = None):
        self.settings = settings
        self.capacity = settings.max_messages
        self.when_full = settings.overflow
        self.log = disk_log
        self.depth = 0  # messages in memory, not yet handed out
        self.entering = 0  # messages of puts still waiting for room
        self.last_error: str | None = None  # the disk's, when a write failed
        self._batches: collections.deque[tuple[Batch, Record | None]] = collections.deque()
        # With a log: per source, [record, messages] handed out and not yet acknowledged.
        self._handed: dict[str, collections.deque[list]] = {}
        self._closed = False
        self._getters = trio.lowlevel.ParkingLot()
        # Under `block`: batches waiting for room, in order, each with the Event its sender waits on.
        self._waiting: collections.deque[tuple[Batch, trio.Event]] = collections.deque()
        # Drops decided after `offer` returned (a waiting batch the disk refused): the owner's
        # counter, set by the supervisor.
        self.late_drops: collections.Counter = collections.Counter()

    @property
    def waiting_on_disk(self) -> int:
        """Messages on disk only: neither in memory nor handed out."""
        return self.log.unread if self.log is not None else 0

    def reconfigure(self, settings: QueueSettings) -> None:
        """New settings of the same mode (see BackendSupervisor.can_take)."""
        self.settings = settings
        self.capacity = settings.max_messages
        self.when_full = settings.overflow
        if self.log is not None:
            self.log.max_bytes = settings.max_bytes
        self._admit_waiting()  # a larger cap may let waiting batches in

    def offer(self, batch: Batch) -> tuple[int, str | None, trio.Event | None]:
        """Enqueue without waiting: how many messages were dropped and why, and, under `block`
        when there is no room, an Event set once the batch is in. Until then it waits here, in
        order, counted as `entering` (the accounting holds at every instant), and the caller
        holds back only what depends on it: the connection it came from."""
        if self.when_full == "block" and (self._waiting or not self._has_room_for(batch)):
            admitted = trio.Event()
            self._waiting.append((batch, admitted))
            self.entering += len(batch)
            return 0, None, admitted
        if self.log is not None:
            dropped, reason = self._put_logged(batch)
        else:
            dropped, reason = self._put_in_memory(batch)
        return dropped, reason, None

    async def put(self, batch: Batch) -> tuple[int, str | None]:
        """`offer`, waiting until the batch is in (for tests and callers with nothing else to do)."""
        dropped, reason, admitted = self.offer(batch)
        if admitted is not None:
            await admitted.wait()
        return dropped, reason

    def _has_room_for(self, batch: Batch) -> bool:
        if self.log is not None:
            return self.log.has_room(batch)  # while closing too: acknowledgements still free room
        return self._closed or self.depth < self.capacity  # a closing memory queue takes the last ones

    def _admit_waiting(self) -> None:
        """Let waiting batches in, in order, as far as there is room."""
        while self._waiting and self._has_room_for(self._waiting[0][0]):
            batch, admitted = self._waiting.popleft()
            self.entering -= len(batch)
            if self.log is not None:
                dropped, reason = self._put_logged(batch)  # it fits; a disk error may still cost it
                if dropped:
                    self.late_drops[reason] += dropped
            else:
                self._append(batch, None)
            admitted.set()

    def _put_logged(self, batch: Batch) -> tuple[int, str | None]:
        cache = not self.log.unread and self.depth < self.capacity
        try:
            record = self.log.append(batch, cache=cache)
        except LogFull:
            return len(batch), "queue_full"
        except OSError as exc:
            self.last_error = f"{self.log.directory}: {exc.strerror or exc}"
            if cache:  # memory has room and nothing waits on disk ahead of it
                self._append(batch, None)
                return 0, None
            return len(batch), "disk_error"
        if record is not None:
            self._append(batch, record)
        else:
            self._getters.unpark_all()
        return 0, None

    def _put_in_memory(self, batch: Batch) -> tuple[int, str | None]:
        if self.when_full == "block":
            self._append(batch, None)  # offer saw room (or the queue is closing)
            return 0, None
        dropped = 0
        room = self.capacity - self.depth
        if len(batch) > room:
            if self.when_full == "drop_newest":
                dropped = len(batch) - max(room, 0)
                batch = batch.head(max(room, 0))
            else:
                excess = len(batch) - room
                if excess >= len(batch) and len(batch) > self.capacity:
                    dropped += len(batch) - self.capacity
                    batch = batch.last(self.capacity)
                    excess = self.depth + len(batch) - self.capacity
                dropped += self._drop_oldest(excess)
        if len(batch):
            self._append(batch, None)
        return dropped, "queue_full" if dropped else None

    def _append(self, batch: Batch, record: Record | None) -> None:
        self._batches.append((batch, record))
        self.depth += len(batch)
        self._getters.unpark_all()

    def _drop_oldest(self, count: int) -> int:
        dropped = 0
        while count > 0 and self._batches:
            oldest, record = self._batches[0]
            if len(oldest) <= count:
                self._batches.popleft()
                taken = len(oldest)
            else:
                self._batches[0] = (oldest.tail(count), record)
                taken = count
            dropped += taken
            count -= taken
            self.depth -= taken
        return dropped

    async def get(self, max_messages: int) -> list[Batch]:
        """Batches from the front, `max_messages` at most in all, waiting for some; EndOfChannel
        when closed and empty. Whole batches as they were put, and the front part of the last.
        (Taking many per call matters: one per call left the queue full, the messages in it
        cold, and the sidecar larger; docs/performance.md.)"""
        # The schedule point comes before the hand-off, never between it and the caller: what
        # is taken must be in the caller's hands (its buffers, counted as queued) at once.
        await trio.lowlevel.checkpoint_if_cancelled()
        scheduled = False
        while True:
            if self.waiting_on_disk and self.depth < self.capacity // 2 + 1:
                self._read_back(self.capacity - self.depth)
            if self._batches:
                if scheduled:
                    break
                await trio.lowlevel.cancel_shielded_checkpoint()
                scheduled = True
                continue
            if self._closed and not self.waiting_on_disk and not self._waiting:
                raise trio.EndOfChannel
            await self._getters.park()
            scheduled = True
        taken = []
        count = 0
        while self._batches and count < max_messages:
            batch, record = self._batches.popleft()
            room = max_messages - count
            if len(batch) > room:
                self._batches.appendleft((batch.tail(room), record))
                batch = batch.head(room)
            taken.append(batch)
            count += len(batch)
            if self.log is not None:
                self._hand_out(batch.source, record, len(batch))
        self.depth -= count
        if self._waiting:
            self._admit_waiting()
        return taken

    def _read_back(self, room: int) -> None:
        try:
            records = self.log.read(max(room, 1))
        except OSError as exc:
            # What is on disk stays there; the next get tries again.
            self.last_error = f"{self.log.directory}: reading back: {exc.strerror or exc}"
            log.error("disk log %s: reading back failed: %s", self.log.directory, exc.strerror or exc)
            return
        for record, batch in records:
            self._batches.append((batch, record))
            self.depth += len(batch)

    def _hand_out(self, source: str, record: Record | None, count: int) -> None:
        handed = self._handed.get(source)
        if handed is None:
            handed = self._handed[source] = collections.deque()
        if handed and handed[-1][0] is record:
            handed[-1][1] += count
        else:
            handed.append([record, count])

    def acknowledge(self, source: str, count: int) -> None:
        """The first `count` messages of `source` handed out and not yet acknowledged are
        delivered or dropped for good: the log may let them go."""
        handed = self._handed.get(source)
        if handed is None:
            return
        while count and handed:
            entry = handed[0]
            taken = min(count, entry[1])
            if entry[0] is not None:
                self.log.acknowledge(entry[0], taken)
            entry[1] -= taken
            count -= taken
            if not entry[1]:
                handed.popleft()
        if not handed:
            del self._handed[source]
        if self._waiting:
            self._admit_waiting()  # acknowledgements may have freed a segment

    def memory_only(self) -> int:
        """Of what this queue holds, handed out or has waiting, the messages that are on no disk."""
        waiting = sum(len(batch) for batch, _admitted in self._waiting)
        if self.log is None:
            return self.depth + waiting
        unlogged = waiting + sum(len(batch) for batch, record in self._batches if record is None)
        return unlogged + sum(entry[1] for handed in self._handed.values() for entry in handed if entry[0] is None)

    def close_log(self) -> None:
        if self.log is not None:
            self.log.close()

    def close(self) -> None:
        """No more puts will come; the consumer drains what is left, then gets EndOfChannel."""
        self._closed = True
        self._getters.unpark_all()
        self._admit_waiting()

    @property
    def closed(self) -> bool:
        return self._closed

    def statistics(self) -> dict:
        stats = {
            "mode": "disk" if self.log is not None else "memory",
            "depth": self.depth,
            "entering": self.entering,
            "capacity": self.capacity,
            "when_full": self.when_full,
        }
        if self.log is not None:
            stats.update(self.log.statistics(), max_bytes=self.log.max_bytes)
        return stats


@attrs.define
class CircuitBreaker:
    """closed: writes go ahead. open: no writes; the backend's cheap probe runs every
    `probe_interval`, and the first that passes lets one trial write go (half-open): so a
    destination that is back is used again within a probe interval, however long it was away.
    A trial write that fails opens the circuit again and holds the probes off for the reset
    timeout, doubled on each such failure (capped); so does an error that says a person must
    act (`trip`: a bad password, access denied), from a write or a probe. The doubling is for a
    destination that answers but refuses, never for one that is simply down."""

    settings: CircuitBreakerSettings
    state: str = "closed"
    consecutive_failures: int = 0
    next_probe_at: float = 0.0
    reset_timeout: float = 0.0  # the hold-off after the last failed trial write
    times_opened: int = 0

    def ready_at(self) -> float:
        """When the next probe may run (trio clock); -inf when writes may go now."""
        return self.next_probe_at if self.state == "open" else -math.inf

    def probe_failed(self, now: float, *, trip: bool = False) -> None:
        if trip:
            self._hold_off(now)
        else:
            self.next_probe_at = now + self.settings.probe_interval

    def _hold_off(self, now: float) -> None:
        self.reset_timeout = min(max(self.reset_timeout * 2, self.settings.reset_timeout), self.settings.max_reset_timeout)
        self.next_probe_at = now + self.reset_timeout

    def probe_passed(self) -> None:
        """The destination answers: one trial write may go."""
        if self.state == "open":
            self.state = "half_open"

    def record_success(self) -> None:
        self.state = "closed"
        self.consecutive_failures = 0
        self.reset_timeout = 0.0

    def record_failure(self, now: float, *, trip: bool = False) -> bool:
        """Count a failed write; returns True when this failure opened the circuit."""
        self.consecutive_failures += 1
        if self.state == "half_open" or trip:
            self._hold_off(now)
        elif self.consecutive_failures >= self.settings.failure_threshold:
            self.next_probe_at = now + self.settings.probe_interval
        else:
            return False
        was_open = self.state != "closed"
        self.state = "open"
        if not was_open:
            self.times_opened += 1
        return True


class LatencyHistogram:
    """Seconds from a message's timestamp to its delivery, in Prometheus-style buckets.
    Timestamps repeat within a batch (milliseconds), so each distinct one is parsed once."""

    BOUNDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

    def __init__(self):
        self.counts = [0] * (len(self.BOUNDS) + 1)
        self.total = 0.0
        self.count = 0

    def observe_batch(self, timestamps: list[str]) -> None:
        now = time.time()
        counts = self.counts
        bounds = self.BOUNDS
        # Counted per distinct timestamp in C (a batch has a few hundred at most), then each
        # parsed and placed in its bucket once.
        for timestamp, count in collections.Counter(timestamps).items():
            latency = max(now - parse_timestamp(timestamp).timestamp(), 0.0)
            counts[bisect.bisect_left(bounds, latency)] += count
            self.total += latency * count
        self.count += len(timestamps)

    def cumulative(self) -> list[tuple[str, int]]:
        """(upper bound, count of observations at or below it), +Inf last."""
        running = 0
        buckets = []
        for bound, count in zip((*map(str, self.BOUNDS), "+Inf"), self.counts):
            running += count
            buckets.append((bound, running))
        return buckets


def encoded_size(batch: Batch) -> int:
    """The bytes of a batch's lines, a newline each: what a file or an object gets."""
    return sum(map(len, batch.lines)) + len(batch.lines)


def count_within(lines: list[bytes], max_messages: int, max_bytes: int) -> int:
    """How many lines from the front make a batch of at most `max_messages` and `max_bytes`
    (newlines counted); at least one, so that a message larger than `max_bytes` still goes."""
    total = 0
    for count, line in enumerate(itertools.islice(lines, max_messages)):
        total += len(line) + 1
        if total > max_bytes:
            return max(count, 1)
    return min(len(lines), max_messages)


def backoff_delay(attempt: int, initial: float, maximum: float) -> float:
    """Exponential backoff with equal jitter: never zero, never in lockstep with others."""
    ceiling = min(maximum, initial * 2 ** min(attempt, 30))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


class _GiveUp(Exception):
    """Shutting down with the circuit open: what is held stays on disk or is counted, not waited on."""


class BackendSupervisor:
    """Runs one backend instance: owns its queue, batches per source, delivers with retries
    behind a circuit breaker, and keeps the accounting."""

    def __init__(self, spec: BackendSpec, data_dir: Path | None = None, budget: DiskBudget | None = None):
        """`data_dir`: where a disk queue keeps its log (`budget`: the total cap of all logs
        there); None for no disk at all (the queue is in memory), as for a supervisor made
        outside a running sidecar."""
        self.spec = spec
        self.label = spec.label
        queue_settings = spec.delivery.queue
        disk_log = None
        if queue_settings.mode == "disk" and data_dir is not None:
            directory = Path(data_dir) / log_directory_name(spec)
            try:
                disk_log = DiskLog(directory, queue_settings.max_bytes, budget)
            except OSError as exc:
                # Memory still delivers; what is at risk is said once, by path.
                fix = "give each sidecar its own storage.data_dir" if isinstance(exc, BufferInUse) else "make storage.data_dir a directory this user can write"
                log.warning(
                    "backend %s: no disk log (%s: %s); its queue is in memory only: a crash loses what it holds, and an outage beyond queue.max_messages (%d) drops messages. To keep it on disk, %s (or set queue.mode: memory to choose memory)",
                    spec.label, directory, exc.strerror or exc, queue_settings.max_messages, fix,
                )
        if queue_settings.mode == "disk" and disk_log is None:
            queue_settings = attrs.evolve(queue_settings, mode="memory", when_full=queue_settings.overflow)
        cls = backend_class(spec.type)
        self.backend = cls(spec.settings, label=self.label) if cls is not None else None
        self.queue = DeliveryQueue(queue_settings, disk_log)
        self.dropped: collections.Counter = collections.Counter()
        self.queue.late_drops = self.dropped
        self._drops_log = RateLimitedLog(log, interval=10.0)
        self.breaker = CircuitBreaker(spec.delivery.circuit_breaker)
        # Messages a previous run left in the disk log are routed to this run's count.
        self.routed = self.queue.waiting_on_disk
        self.delivered = 0
        # What the destination refused for good, per source and reason: an operator's answer
        # to "whose messages were dropped, and why", beside the totals in `dropped`.
        self.rejected_by_source: dict[str, collections.Counter] = {}
        self._rejections_log = RateLimitedLog(log, interval=10.0)
        self.retries = 0
        self.probes = 0  # health probes while the circuit was open
        self._bugs = DistinctErrorLog(log)
        self.batches = 0
        self.restarts = 0
        self.last_error: str | None = None
        self._opened = False
        self._buffers: dict[str, Batch] = {}
        self._max_bytes = spec.delivery.batch.max_bytes
        self._buffer_bytes: dict[str, int] = {}  # with max_bytes: the buffered lines' size
        self._buffer_started: dict[str, float] = {}
        self._urgent: set[str] = set()
        self._in_flight: Batch = Batch.empty()
        self._stopped = trio.Event()
        self.latency = LatencyHistogram()
        self.stopping = False  # shutting down: an open circuit is not waited for
        self.exit_deadline = math.inf  # at shutdown, when the backend must be closed by
        self.exit_account: dict | None = None  # what was held at exit: on disk, lost
        self._next_spec: BackendSpec | None = None  # new settings, taken at the next attempt
        self._wake = trio.Event()  # set to cut a probe hold-off or a backoff short
        self.reconfigured = 0

    # ---------------------------------------------------------------- new settings

    def can_take(self, spec: BackendSpec) -> bool:
        """Whether `spec` is new settings for this instance's destination that apply in place."""
        return (
            buffer_key(spec) == buffer_key(self.spec)
            and self.backend is not None
            and backend_class(spec.type) is not None
            and spec.delivery.queue.mode == self.spec.delivery.queue.mode
            and not self.queue.closed
        )

    def reconfigure(self, spec: BackendSpec) -> None:
        """Deliver what this instance holds, and all that follows, with new settings: the
        queue, its disk buffer, the batches and the accounting stay; the next attempt opens a
        new backend (a batch being written finishes with the old one)."""
        self._next_spec = spec
        self.queue.reconfigure(spec.delivery.queue)
        self._wake.set()

    def stop_soon(self, exit_deadline: float) -> None:
        """At shutdown: deliver what can be until the topology's deadline, give up at once while
        the circuit is open, and close the backend by `exit_deadline`."""
        self.stopping = True  # acted on once the queue is closed (`close` wakes the supervisor)
        self.exit_deadline = exit_deadline

    async def _sleep_until(self, deadline: float) -> None:
        """Sleep, but wake for new settings."""
        with trio.move_on_at(deadline):
            await self._wake.wait()
        if self._wake.is_set():
            self._wake = trio.Event()
        if self._next_spec is not None:
            await self._take_new_settings()

    async def _take_new_settings(self) -> None:
        spec, self._next_spec = self._next_spec, None
        self._wake = trio.Event()
        await self._close_backend()
        self.spec = spec
        self.label = spec.label
        self.backend = backend_class(spec.type)(spec.settings, label=self.label)
        self.breaker = CircuitBreaker(spec.delivery.circuit_breaker)  # the new settings deserve a try
        self.last_error = None
        if spec.delivery.batch.max_bytes != self._max_bytes:
            self._max_bytes = spec.delivery.batch.max_bytes
            self._buffer_bytes = {source: encoded_size(batch) for source, batch in self._buffers.items()} if self._max_bytes else {}
        self.reconfigured += 1
        log.debug("backend %s: new settings applied", self.label)

    # ---------------------------------------------------------------- producer side

    async def put(self, batch: Batch) -> None:
        """`offer`, waiting until the batch is in."""
        admitted = self.offer(batch)
        if admitted is not None:
            await admitted.wait()

    def offer(self, batch: Batch) -> trio.Event | None:
        """One source's messages (a batch may be shared with other backends: never changed),
        without waiting: under `block` with no room, the Event its sender should wait for
        before it sends more (see DeliveryQueue.offer)."""
        self.routed += len(batch)
        if self.backend is None:
            self.dropped["backend_unavailable"] += len(batch)
            return None
        if self.queue.closed:
            self.dropped["backend_removed"] += len(batch)
            return None
        dropped, reason, admitted = self.queue.offer(batch)
        if dropped:
            self.dropped[reason] += dropped
            queue = self.queue
            if reason == "disk_error":
                self._drops_log.warning(reason, "backend %s: %d messages dropped: the disk log cannot be written (%s) and memory holds %d", self.label, dropped, queue.last_error, queue.depth)
            elif queue.log is not None:
                self._drops_log.warning(reason, "backend %s: %d messages dropped: its disk log is full (%d bytes, queue.max_bytes %d)", self.label, dropped, queue.log.bytes_on_disk, queue.log.max_bytes)
            else:
                self._drops_log.warning(reason, "backend %s: %d messages dropped: its memory queue is full (queue.max_messages %d)", self.label, dropped, queue.capacity)
        return admitted

    def close(self) -> None:
        self.queue.close()
        self._wake.set()  # a supervisor stopping with its circuit open gives up now

    # ---------------------------------------------------------------- accounting

    @property
    def queued(self) -> int:
        if self.exit_account is not None:  # stopped: what it held is on disk, or was lost
            return self.exit_account["on_disk"] + self.exit_account["lost"]
        queue = self.queue
        return queue.entering + queue.depth + queue.waiting_on_disk + sum(map(len, self._buffers.values())) + len(self._in_flight)

    def statistics(self) -> dict:
        return {
            "backend": self.label,
            "type": self.spec.type,
            "available": self.backend is not None,
            "routed": self.routed,
            "delivered": self.delivered,
            "dropped": dict(self.dropped),
            "rejected_by_source": {source: dict(reasons) for source, reasons in self.rejected_by_source.items()},
            "queued": self.queued,
            "queue": self.queue.statistics(),
            "retries": self.retries,
            "probes": self.probes,
            "batches": self.batches,
            "restarts": self.restarts,
            "reconfigured": self.reconfigured,
            "circuit": self.breaker.state,
            "circuit_opened": self.breaker.times_opened,
            "last_error": self.last_error,
            "details": self.backend.statistics() if self.backend is not None else {},
        }

    # ---------------------------------------------------------------- consumer side

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Deliver until the queue is closed and drained. Restarts itself after an unexpected
        exception (a bug, not an I/O failure: those are retried in `_deliver`), keeping what it
        held, since buffers and queue live on this object."""
        task_status.started()
        if self.backend is None:
            log.warning("backend %s: type %r is not available in this build; its messages are dropped and counted", self.label, self.spec.type)
            self._stopped.set()
            return
        try:
            while True:
                try:
                    await self._deliver_until_closed()
                    return
                except _GiveUp:
                    log.warning("backend %s: circuit open at shutdown; not waiting for it (%d messages held)", self.label, self.queued)
                    return
                except Exception:
                    self.restarts += 1
                    log.exception("backend %s: delivery task crashed; restarting", self.label)
                    await trio.sleep(backoff_delay(self.restarts, 0.5, 30.0))
        finally:
            with trio.CancelScope(shield=True):
                with trio.move_on_at(min(self.exit_deadline, trio.current_time() + 5)):
                    await self._close_backend()
                try:
                    self._account_for_leftovers()
                except OSError as exc:
                    log.error("backend %s: closing its disk log: %s", self.label, exc)
            self._stopped.set()

    def _account_for_leftovers(self) -> None:
        """What is held at exit: with a disk log, all of it is there for the next start, but for
        batches the disk refused; in memory, it is lost. Counted either way."""
        queue = self.queue
        lost = queue.memory_only()
        if queue.log is None:
            lost += sum(map(len, self._buffers.values())) + len(self._in_flight)
        on_disk = queue.log.held if queue.log is not None else 0
        self.exit_account = {"held": self.queued, "on_disk": on_disk, "lost": lost}
        queue.close_log()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    async def _close_backend(self) -> None:
        if self._opened:
            self._opened = False
            try:
                await self.backend.aclose()
            except Exception:
                log.exception("backend %s: error while closing", self.label)

    async def _deliver_until_closed(self) -> None:
        while True:
            batch_settings = self.spec.delivery.batch  # new settings apply from the next round
            max_messages = batch_settings.max_messages
            now = trio.current_time()
            for source, whole in self._due(now, batch_settings.timeout, max_messages):
                await self._flush(source, max_messages, whole=whole)
            deadline = min(self._buffer_started.values(), default=math.inf) + batch_settings.timeout
            with trio.move_on_at(deadline):
                try:
                    batches = await self.queue.get(max_messages)
                except trio.EndOfChannel:
                    for source in list(self._buffers):
                        await self._flush(source, max_messages, whole=True)
                    return
                now = trio.current_time()
                for batch in batches:
                    self._take(batch, now)

    def _take(self, batch: Batch, now: float) -> None:
        source = batch.source
        target = self._buffers.get(source)
        if target is None:
            target = self._buffers[source] = Batch.empty(source)
            self._buffer_started[source] = now
        target.extend(batch)
        if self._max_bytes:
            self._buffer_bytes[source] = self._buffer_bytes.get(source, 0) + encoded_size(batch)
        if batch.urgent:
            self._urgent.add(source)

    def _due(self, now: float, timeout: float, max_messages: int) -> list[tuple[str, bool]]:
        """Sources to flush now, and whether wholly (timer or urgent) or only full batches."""
        due = []
        for source, buffered in self._buffers.items():
            # The same sum as the deadline in _deliver_until_closed: `now - started >= timeout`
            # can be false by a rounding at that very deadline, which would spin the loop.
            if source in self._urgent or now >= self._buffer_started[source] + timeout:
                due.append((source, True))
            elif len(buffered) >= max_messages or self._full_by_bytes(source):
                due.append((source, False))
        return due

    def _full_by_bytes(self, source: str) -> bool:
        return bool(self._max_bytes) and self._buffer_bytes[source] >= self._max_bytes

    async def _flush(self, source: str, max_messages: int, *, whole: bool) -> None:
        pending = self._buffers[source]
        while len(pending) >= max_messages or self._full_by_bytes(source) or (whole and len(pending)):
            count = max_messages
            if self._max_bytes:
                count = count_within(pending.lines, max_messages, self._max_bytes)
            # Moved from buffered to in flight in one step, so `queued` never misses it.
            self._in_flight = batch = pending.take_front(count)
            if self._max_bytes:
                self._buffer_bytes[source] -= encoded_size(batch)
            await self._deliver(source, batch)
            self._in_flight = Batch.empty()
            self.queue.acknowledge(source, len(batch))
        if not len(pending):
            # A remainder keeps its start time: it has waited that long already.
            del self._buffers[source]
            del self._buffer_started[source]
            self._buffer_bytes.pop(source, None)
            self._urgent.discard(source)

    async def _deliver(self, source: str, batch: Batch) -> None:
        attempt = Attempt(source, batch)
        tried_with = self.backend
        while True:
            if self._next_spec is not None:
                await self._take_new_settings()
            retry = self.spec.delivery.retry
            await self._until_circuit_lets_through()
            if self.backend is not tried_with:  # new settings: what a try left was the old backend's
                attempt.state, tried_with = None, self.backend
            attempt.tries += 1
            asked = None  # a wait the destination asked for
            try:
                with trio.fail_after(retry.attempt_timeout):
                    if not self._opened:
                        await self.backend.open()
                        self._opened = True
                    await self.backend.write_batch(attempt)
            except PartialDelivery as exc:
                # The destination answered: the circuit stays closed, whoever else is refused.
                self._record_success()
                self.delivered += len(batch) - len(exc.rejected)
                self._reject(source, collections.Counter(exc.rejected.values()))
                self._rejections_log.warning(
                    (source, "partial"), "backend %s: %d of %d messages from %s rejected: %s", self.label, len(exc.rejected), len(batch), source, exc
                )
                return
            except PermanentError as exc:
                self._record_success()
                self._reject(source, collections.Counter({exc.reason: len(batch)}))
                self.last_error = str(exc)
                self._rejections_log.warning((source, "batch"), "backend %s: dropped a batch of %d from %s: %s", self.label, len(batch), source, exc)
                return
            except (RetryableError, trio.TooSlowError, OSError) as exc:
                self._record_failure(exc, trip=getattr(exc, "trip_circuit", False))
                asked = getattr(exc, "retry_after", None)
            except Exception as exc:
                # Unclassified: retried like an outage, but with the traceback, since it may be a bug.
                log.exception("backend %s: unexpected error writing a batch", self.label)
                self._record_failure(exc, trip=False)
            else:
                self._record_success()
                self.delivered += len(batch)
                self.latency.observe_batch(batch.timestamps)
                return
            self.retries += 1
            if self.breaker.state == "closed":
                delay = backoff_delay(attempt.tries, retry.initial_backoff, retry.max_backoff)
                await self._sleep_until(trio.current_time() + max(delay, min(asked or 0.0, MAX_RETRY_AFTER)))

    async def _until_circuit_lets_through(self) -> None:
        """While the circuit is open, probe the backend on the breaker's schedule; return when
        a probe has passed (a trial write may go) or the circuit is not open."""
        while self.breaker.ready_at() != -math.inf:
            if self.stopping and self.queue.closed:
                raise _GiveUp  # nothing more will come: what is held stays on disk or is counted
            await self._sleep_until(self.breaker.ready_at())
            if trio.current_time() < self.breaker.ready_at():
                continue  # woken early (stopping, or new settings with a closed circuit): look again
            try:
                with trio.fail_after(self.spec.delivery.retry.attempt_timeout):
                    await self.backend.probe()
            except (DeliveryError, trio.TooSlowError, OSError) as exc:
                self.last_error = str(exc) or type(exc).__name__
                # A refusal (not an outage) is for a person to fix: the probes are held off.
                refused = getattr(exc, "trip_circuit", False) or isinstance(exc, PermanentError)
                self.breaker.probe_failed(trio.current_time(), trip=refused)
            except Exception as exc:
                self._bugs.log(exc, "backend %s: unexpected error in its probe; taken as failed", self.label)
                self.last_error = str(exc) or type(exc).__name__
                self.breaker.probe_failed(trio.current_time())
            else:
                self._opened = False  # the trial write opens the backend afresh
                self.breaker.probe_passed()
                log.info("backend %s: probe passed; trying a write", self.label)
            finally:
                self.probes += 1  # counted with its outcome, so a reader of the count sees its error

    def _reject(self, source: str, reasons: collections.Counter) -> None:
        self.dropped.update(reasons)
        if source not in self.rejected_by_source and len(self.rejected_by_source) >= MAX_REJECTED_SOURCES:
            source = OTHER_SOURCES
        self.rejected_by_source.setdefault(source, collections.Counter()).update(reasons)

    def _record_success(self) -> None:
        self.batches += 1
        if self.breaker.state != "closed":
            log.info("backend %s: circuit closed, delivering again", self.label)
        self.breaker.record_success()

    def _record_failure(self, exc: BaseException, *, trip: bool) -> None:
        message = str(exc) or type(exc).__name__
        first = self.breaker.consecutive_failures == 0
        self.last_error = message
        self._opened = False
        was_closed = self.breaker.state == "closed"
        if self.breaker.record_failure(trio.current_time(), trip=trip):
            # The first opening is news; a failed trial that re-opens it is not, until it closes.
            log.log(
                logging.WARNING if was_closed else logging.DEBUG,
                "backend %s: circuit open after %d failures, next probe in %.1fs: %s",
                self.label, self.breaker.consecutive_failures, self.breaker.next_probe_at - trio.current_time(), message,
            )
        elif first:
            log.warning("backend %s: write failed, retrying: %s", self.label, message)
