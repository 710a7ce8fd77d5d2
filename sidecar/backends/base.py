"""What a backend is: a small class that opens, writes one batch, and closes; and the kit every
backend uses: the `Attempt` it is handed, and `run_blocking` for a client library that blocks.
A backend may also offer a capability (`read_messages`: what it stored, read back).

Batching, queueing, retries, the circuit breaker and the accounting live in
`sidecar.delivery`, written once around every backend.
"""

import threading
from collections.abc import Callable
from typing import Any, ClassVar

import attrs
import trio

from sidecar.batch import Batch
from sidecar.redaction import without_secrets


class DeliveryError(Exception):
    """A write failed. Subclasses say whether trying again can help. The message is shown (the
    status file, /api/backends, logs) and may quote an endpoint or a connection string: its
    secrets are taken out here."""

    def __init__(self, message: str, *args):
        super().__init__(without_secrets(str(message)), *args)


class RetryableError(DeliveryError):
    """The destination is unavailable now (network, server down, throttled): keep the batch and
    try again later. `trip_circuit` opens the circuit breaker at once (e.g. access denied),
    so a misconfigured destination is retried slowly, not in a tight loop. `retry_after`: the
    seconds the destination asked to be left alone (HTTP's Retry-After); the next try waits at
    least that long, up to MAX_RETRY_AFTER."""

    def __init__(self, message: str, *, trip_circuit: bool = False, retry_after: float | None = None):
        super().__init__(message)
        self.trip_circuit = trip_circuit
        self.retry_after = retry_after


# The longest a destination's Retry-After is followed: a wrong header cannot park a backend.
MAX_RETRY_AFTER = 300.0


class PermanentError(DeliveryError):
    """This batch can never be written as it is; it is dropped and counted under `reason`."""

    def __init__(self, message: str, *, reason: str = "rejected"):
        super().__init__(message)
        self.reason = reason


class PartialDelivery(DeliveryError):
    """The batch was written except the messages at `rejected` (index -> reason label), which
    the destination refused for good; they are dropped and counted, the rest is delivered."""

    def __init__(self, message: str, rejected: dict[int, str]):
        super().__init__(message)
        self.rejected = rejected


@attrs.frozen
class Place:
    """Where an instance puts a source's messages of one type on one day. `where` names what two
    instances must not share (a file, an S3 prefix, a CloudWatch stream: both would hold the
    same messages, or two writers would rotate one file); `sample` is what a write makes there."""

    where: str
    sample: str


@attrs.define(eq=False)
class Attempt:
    """One batch on its way to one backend, from its first try until it is settled (delivered,
    or dropped for good). Every retry of the batch gets this same object: `tries` counts them,
    this one included, and `state` is the backend's own slot for what a try leaves behind (the
    objects already stored, the requests accepted, a transaction whose commit was not seen), so
    that a retry resumes instead of writing twice."""

    source: str
    batch: Batch
    tries: int = 0
    state: Any = None


class BlockingCalls:
    """A backend's calls into a blocking client library, run in worker threads one at a time.

    On cancellation (the attempt timeout, shutdown) a call that has not started never starts; a
    running one is interrupted (`interrupt`, e.g. a statement cancel on the server) and waited
    for up to `grace` seconds; then Cancelled goes on. A call that outlives its grace still
    holds the lock, so the next call, a retry's, waits for it in its own thread: two calls never
    overlap, and what the late one did is in the state it left before the retry reads it."""

    def __init__(self, interrupt=None, grace: float = 5.0):
        self.interrupt = interrupt  # called in a thread while a cancelled call runs
        self.grace = grace
        self._lock = threading.Lock()

    async def run(self, function, *args, **keywords):
        abandoned = threading.Event()
        finished = threading.Event()

        def call():
            with self._lock:
                try:
                    return None if abandoned.is_set() else function(*args, **keywords)
                finally:
                    finished.set()

        try:
            return await trio.to_thread.run_sync(call, abandon_on_cancel=True)
        except trio.Cancelled:
            abandoned.set()
            with trio.CancelScope(shield=True), trio.move_on_after(self.grace):
                if self.interrupt is not None and not finished.is_set():
                    await trio.to_thread.run_sync(self.interrupt, abandon_on_cancel=True)
                while not finished.is_set():
                    await trio.sleep(0.01)
            raise


class Backend:
    """Base of every backend. A subclass sets `type_name` and `Settings` (a frozen attrs class
    read from the config with file:line errors) and implements `write_batch`."""

    type_name: ClassVar[str]
    Settings: ClassVar[type]
    # Defaults of the shared delivery settings for this type, e.g. {"batch": {"timeout": 60.0}};
    # a backend's own `batch:`/`queue:`/`retry:`/`circuit_breaker:` keys in the config win.
    delivery_defaults: ClassVar[dict] = {}
    # A capability: reading back what this type stored, for the job and trace view
    # (`sidecar.stored_view`). A blocking function (run in a worker thread)
    # `(settings, *, job_id=None, trace_id=None, limit=...) -> list[dict]`: the messages of that
    # job or trace as dicts of the wire format, oldest first; it raises with a message fit to
    # show (no secrets). None: this type cannot be read back. Set it with `staticmethod`.
    read_messages: ClassVar[Callable[..., list[dict]] | None] = None
    # A capability: `(settings, source, kind, moment) -> Place | None`, where messages of `source`
    # of type `kind` received at `moment` (an aware datetime) go; pure, for `check`'s samples and
    # its warning about instances sharing a place. None: nothing to show. Set it with `staticmethod`.
    place_of: ClassVar[Callable[..., "Place | None"] | None] = None

    def __init__(self, settings, *, label: str):
        self.settings = settings
        self.label = label
        self.blocking = BlockingCalls()

    async def run_blocking(self, function, *args, **keywords):
        """`function(*args, **keywords)` in a worker thread, cancelled as `BlockingCalls` says."""
        return await self.blocking.run(function, *args, **keywords)

    async def open(self) -> None:
        """Connect or prepare. Called before the first write and again after a failed one."""

    async def probe(self) -> None:
        """Whether the destination takes writes now, asked cheaply while the circuit is open:
        return if it does, raise a DeliveryError (or OSError) if not. The default connects
        (`open`); a backend with a health call of its own uses it."""
        await self.open()

    async def write_batch(self, attempt: Attempt) -> None:
        """Write `attempt.batch`, messages of `attempt.source`, in order: `batch.lines` are
        their JSON lines (no newline), `batch.messages()` the same as dicts (parsed on first
        use). Raise a DeliveryError subclass on failure; any other exception is treated as
        retryable and logged with its traceback. A retry gets the same `attempt`."""
        raise NotImplementedError

    def statistics(self) -> dict:
        """Counts of this backend's own (e.g. events truncated to fit), shown beside the shared
        machinery's; names to counts. Also exported by /metrics."""
        return {}

    async def aclose(self) -> None:
        """Release connections and descriptors; called once, after the last write."""
