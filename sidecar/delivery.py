"""The delivery machinery, written once around every backend: a bounded queue with a declared
overflow policy, batching per source, retries with backoff and jitter, a circuit breaker, and
the accounting `routed = delivered + dropped{reason} + queued`, true at every instant.
"""

import collections
import logging
import math
import random

import attrs
import trio

from sidecar.backends import backend_class
from sidecar.backends.base import PartialDelivery, PermanentError, RetryableError
from sidecar.config import BackendSpec, CircuitBreakerSettings, QueueSettings
from sidecar.message import URGENT_LEVELS

log = logging.getLogger("sidecar.delivery")


class DeliveryQueue:
    """A bounded queue of messages between the correlator and one backend instance.

    Items are lists of messages (a chunk as read from a socket); capacity counts messages.
    `when_full` says what a full queue does: `block` makes `put` wait (backpressure up to the
    sockets), `drop_newest` refuses what does not fit, `drop_oldest` discards from the front.
    """

    def __init__(self, settings: QueueSettings):
        self.capacity = settings.max_messages
        self.when_full = settings.when_full
        self.depth = 0
        self._chunks: collections.deque[list[dict]] = collections.deque()
        self._closed = False
        self._getters = trio.lowlevel.ParkingLot()
        self._putters = trio.lowlevel.ParkingLot()

    async def put(self, messages: list[dict]) -> int:
        """Enqueue; returns how many messages the overflow policy dropped (0 under `block`)."""
        if self.when_full == "block":
            while self.depth >= self.capacity and not self._closed:
                await self._putters.park()
            return self._append(messages)
        dropped = 0
        room = self.capacity - self.depth
        if len(messages) > room:
            if self.when_full == "drop_newest":
                dropped = len(messages) - max(room, 0)
                messages = messages[: max(room, 0)]
            else:
                excess = len(messages) - room
                if excess >= len(messages) and len(messages) > self.capacity:
                    dropped += len(messages) - self.capacity
                    messages = messages[-self.capacity :]
                    excess = self.depth + len(messages) - self.capacity
                dropped += self._drop_oldest(excess)
        if messages:
            self._append(messages)
        return dropped

    def _append(self, messages: list[dict]) -> int:
        self._chunks.append(messages)
        self.depth += len(messages)
        self._getters.unpark_all()
        return 0

    def _drop_oldest(self, count: int) -> int:
        dropped = 0
        while count > 0 and self._chunks:
            oldest = self._chunks[0]
            if len(oldest) <= count:
                self._chunks.popleft()
                taken = len(oldest)
            else:
                self._chunks[0] = oldest[count:]
                taken = count
            dropped += taken
            count -= taken
            self.depth -= taken
        return dropped

    async def get(self, max_messages: int) -> list[dict]:
        """Up to `max_messages` from the front, waiting for some; EndOfChannel when closed and empty."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while not self._chunks:
            if self._closed:
                raise trio.EndOfChannel
            await self._getters.park()
        # Chunks are shared with other backends' queues: never mutate one, build a new list.
        taken: list[dict] = []
        count = 0
        while self._chunks and count < max_messages:
            chunk = self._chunks.popleft()
            room = max_messages - count
            if len(chunk) > room:
                self._chunks.appendleft(chunk[room:])
                chunk = chunk[:room]
            taken = chunk if not count else taken + chunk
            count += len(chunk)
        self.depth -= count
        self._putters.unpark_all()
        await trio.lowlevel.cancel_shielded_checkpoint()
        return taken

    def close(self) -> None:
        """No more puts will come; the consumer drains what is left, then gets EndOfChannel."""
        self._closed = True
        self._getters.unpark_all()
        self._putters.unpark_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def statistics(self) -> dict:
        return {"depth": self.depth, "capacity": self.capacity, "when_full": self.when_full}


@attrs.define
class CircuitBreaker:
    """closed: writes go ahead. open: no writes until the reset timeout passes. half-open: one
    trial write; success closes, failure opens again with the timeout doubled (capped)."""

    settings: CircuitBreakerSettings
    state: str = "closed"
    consecutive_failures: int = 0
    opened_at: float = 0.0
    reset_timeout: float = 0.0
    times_opened: int = 0

    def ready_at(self) -> float:
        """When the next write may be tried (trio clock); -inf when now."""
        return self.opened_at + self.reset_timeout if self.state == "open" else -math.inf

    def before_attempt(self, now: float) -> None:
        if self.state == "open" and now >= self.ready_at():
            self.state = "half_open"

    def record_success(self) -> None:
        self.state = "closed"
        self.consecutive_failures = 0
        self.reset_timeout = 0.0

    def record_failure(self, now: float, *, trip: bool = False) -> bool:
        """Count a failed write; returns True when this failure opened the circuit."""
        self.consecutive_failures += 1
        if self.state == "half_open":
            self.reset_timeout = min(self.reset_timeout * 2, self.settings.max_reset_timeout)
        elif trip or self.consecutive_failures >= self.settings.failure_threshold:
            self.reset_timeout = self.settings.reset_timeout
        else:
            return False
        was_open = self.state != "closed"
        self.state = "open"
        self.opened_at = now
        if not was_open:
            self.times_opened += 1
        return True


def backoff_delay(attempt: int, initial: float, maximum: float) -> float:
    """Exponential backoff with equal jitter: never zero, never in lockstep with others."""
    ceiling = min(maximum, initial * 2 ** min(attempt, 30))
    return ceiling / 2 + random.uniform(0, ceiling / 2)


class BackendSupervisor:
    """Runs one backend instance: owns its queue, batches per source, delivers with retries
    behind a circuit breaker, and keeps the accounting."""

    def __init__(self, spec: BackendSpec):
        self.spec = spec
        self.label = spec.label
        self.queue = DeliveryQueue(spec.delivery.queue)
        self.breaker = CircuitBreaker(spec.delivery.circuit_breaker)
        cls = backend_class(spec.type)
        self.backend = cls(spec.settings, label=self.label) if cls is not None else None
        self.routed = 0
        self.delivered = 0
        self.dropped: collections.Counter = collections.Counter()
        self.retries = 0
        self.batches = 0
        self.restarts = 0
        self.last_error: str | None = None
        self._opened = False
        self._buffers: dict[str, list[dict]] = {}
        self._buffer_started: dict[str, float] = {}
        self._urgent: set[str] = set()
        self._in_flight = 0
        self._stopped = trio.Event()

    # ---------------------------------------------------------------- producer side

    async def put(self, messages: list[dict]) -> None:
        self.routed += len(messages)
        if self.backend is None:
            self.dropped["backend_unavailable"] += len(messages)
            return
        if self.queue.closed:
            self.dropped["backend_removed"] += len(messages)
            return
        dropped = await self.queue.put(messages)
        if dropped:
            self.dropped["queue_full"] += dropped

    def close(self) -> None:
        self.queue.close()

    # ---------------------------------------------------------------- accounting

    @property
    def queued(self) -> int:
        return self.queue.depth + sum(map(len, self._buffers.values())) + self._in_flight

    def statistics(self) -> dict:
        return {
            "backend": self.label,
            "type": self.spec.type,
            "available": self.backend is not None,
            "routed": self.routed,
            "delivered": self.delivered,
            "dropped": dict(self.dropped),
            "queued": self.queued,
            "queue": self.queue.statistics(),
            "retries": self.retries,
            "batches": self.batches,
            "restarts": self.restarts,
            "circuit": self.breaker.state,
            "circuit_opened": self.breaker.times_opened,
            "last_error": self.last_error,
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
                except Exception:
                    self.restarts += 1
                    log.exception("backend %s: delivery task crashed; restarting", self.label)
                    await trio.sleep(backoff_delay(self.restarts, 0.5, 30.0))
        finally:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(5):
                    await self._close_backend()
            self._stopped.set()

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
        batch_settings = self.spec.delivery.batch
        max_messages = batch_settings.max_messages
        while True:
            now = trio.current_time()
            for source, whole in self._due(now, batch_settings.timeout, max_messages):
                await self._flush(source, max_messages, whole=whole)
            deadline = min(self._buffer_started.values(), default=math.inf) + batch_settings.timeout
            with trio.move_on_at(deadline):
                try:
                    chunk = await self.queue.get(max_messages)
                except trio.EndOfChannel:
                    for source in list(self._buffers):
                        await self._flush(source, max_messages, whole=True)
                    return
                self._buffer(chunk, trio.current_time())

    def _buffer(self, chunk: list[dict], now: float) -> None:
        buffers = self._buffers
        urgent = self._urgent
        last_source = None
        target = None
        for message in chunk:
            source = message["source"]
            if source != last_source:
                target = buffers.get(source)
                if target is None:
                    target = buffers[source] = []
                    self._buffer_started[source] = now
                last_source = source
            target.append(message)
            if message["type"] == "event" and message["data"]["level"] in URGENT_LEVELS:
                urgent.add(source)

    def _due(self, now: float, timeout: float, max_messages: int) -> list[tuple[str, bool]]:
        """Sources to flush now, and whether wholly (timer or urgent) or only full batches."""
        due = []
        for source, buffered in self._buffers.items():
            if source in self._urgent or now - self._buffer_started[source] >= timeout:
                due.append((source, True))
            elif len(buffered) >= max_messages:
                due.append((source, False))
        return due

    async def _flush(self, source: str, max_messages: int, *, whole: bool) -> None:
        pending = self._buffers[source]
        while len(pending) >= max_messages or (whole and pending):
            batch = pending[:max_messages]
            # Moved from buffered to in flight in one step, so `queued` never misses it.
            del pending[:max_messages]
            self._in_flight = len(batch)
            await self._deliver(source, batch)
            self._in_flight = 0
        if not pending:
            # A remainder keeps its start time: it has waited that long already.
            del self._buffers[source]
            del self._buffer_started[source]
            self._urgent.discard(source)

    async def _deliver(self, source: str, batch: list[dict]) -> None:
        retry = self.spec.delivery.retry
        attempt = 0
        while True:
            wait_until = self.breaker.ready_at()
            if wait_until > trio.current_time():
                await trio.sleep_until(wait_until)
            self.breaker.before_attempt(trio.current_time())
            try:
                with trio.fail_after(retry.attempt_timeout):
                    if not self._opened:
                        await self.backend.open()
                        self._opened = True
                    await self.backend.write_batch(source, batch)
            except PartialDelivery as exc:
                self._record_success()
                self.delivered += len(batch) - len(exc.rejected)
                for reason in exc.rejected.values():
                    self.dropped[reason] += 1
                log.warning("backend %s: %d of %d messages from %s rejected: %s", self.label, len(exc.rejected), len(batch), source, exc)
                return
            except PermanentError as exc:
                self._record_success()
                self.dropped[exc.reason] += len(batch)
                self.last_error = str(exc)
                log.error("backend %s: dropped a batch of %d from %s: %s", self.label, len(batch), source, exc)
                return
            except (RetryableError, trio.TooSlowError, OSError) as exc:
                self._record_failure(exc, trip=getattr(exc, "trip_circuit", False))
            except Exception as exc:
                # Unclassified: retried like an outage, but with the traceback, since it may be a bug.
                log.exception("backend %s: unexpected error writing a batch", self.label)
                self._record_failure(exc, trip=False)
            else:
                self._record_success()
                self.delivered += len(batch)
                return
            self.retries += 1
            attempt += 1
            if self.breaker.state == "closed":
                await trio.sleep(backoff_delay(attempt, retry.initial_backoff, retry.max_backoff))

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
        if self.breaker.record_failure(trio.current_time(), trip=trip):
            log.warning(
                "backend %s: circuit open for %.1fs after %d failures: %s",
                self.label, self.breaker.reset_timeout, self.breaker.consecutive_failures, message,
            )
        elif first:
            log.warning("backend %s: write failed, retrying: %s", self.label, message)
