"""What a backend is: a small class that opens, writes one batch, and closes.

Batching, queueing, retries, the circuit breaker and the accounting live in
`sidecar.delivery`, written once around every backend.
"""

from typing import ClassVar

from sidecar.batch import Batch


class DeliveryError(Exception):
    """A write failed. Subclasses say whether trying again can help."""


class RetryableError(DeliveryError):
    """The destination is unavailable now (network, server down, throttled): keep the batch and
    try again later. `trip_circuit` opens the circuit breaker at once (e.g. access denied),
    so a misconfigured destination is retried slowly, not in a tight loop."""

    def __init__(self, message: str, *, trip_circuit: bool = False):
        super().__init__(message)
        self.trip_circuit = trip_circuit


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


class Backend:
    """Base of every backend. A subclass sets `type_name` and `Settings` (a frozen attrs class
    read from the config with file:line errors) and implements `write_batch`."""

    type_name: ClassVar[str]
    Settings: ClassVar[type]
    # Defaults of the shared delivery settings for this type, e.g. {"batch": {"timeout": 60.0}};
    # a backend's own `batch:`/`queue:`/`retry:`/`circuit_breaker:` keys in the config win.
    delivery_defaults: ClassVar[dict] = {}

    def __init__(self, settings, *, label: str):
        self.settings = settings
        self.label = label

    async def open(self) -> None:
        """Connect or prepare. Called before the first write and again after a failed one."""

    async def probe(self) -> None:
        """Whether the destination takes writes now, asked cheaply while the circuit is open:
        return if it does, raise a DeliveryError (or OSError) if not. The default connects
        (`open`); a backend with a health call of its own uses it."""
        await self.open()

    async def write_batch(self, source: str, batch: Batch) -> None:
        """Write messages of one source, in order: `batch.lines` are their JSON lines (no
        newline), `batch.messages()` the same as dicts (parsed on first use, the same list on
        every retry of a batch). Raise a DeliveryError subclass on failure; any other exception
        is treated as retryable and logged with its traceback."""
        raise NotImplementedError

    def statistics(self) -> dict:
        """Counts of this backend's own (e.g. events truncated to fit), shown beside the shared
        machinery's; names to counts. Also exported by /metrics."""
        return {}

    async def aclose(self) -> None:
        """Release connections and descriptors; called once, after the last write."""
