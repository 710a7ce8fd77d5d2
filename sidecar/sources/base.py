"""What a source is: a small class that takes messages in over its own protocol and hands
them to the `Intake`, the machinery every source shares.

The main nursery owns each source's `run`; all of them feed the one bounded channel to the
correlator, each through its own clone, so the correlator's input ends when the last source
has closed its clone. Shutdown asks a source to stop accepting, then to stop reading after a
grace period.
"""

import datetime as dt
import logging
from typing import ClassVar

import trio

from sidecar.logs import DistinctErrorLog, RateLimitedLog
from sidecar.message import format_timestamp
from sidecar.metrics import Counters


class CannotListen(OSError):
    """A source could not open its address: what the operator reads, naming the source."""


class SettingsFromEnvironment(ValueError):
    """A source's setting that names an environment variable (a secret) or a file could not be
    resolved; `key` is the setting, for the problem's line."""

    def __init__(self, key: str, detail: str):
        super().__init__(detail)
        self.key = key


class Intake:
    """Where a source hands what it decoded: counted under the source's name (the `input`
    label), stamped with the time it arrived, and sent to the correlator. `hand_over` waits
    while the channel is full: the source stops reading, and its clients feel the backpressure."""

    def __init__(self, name: str, counters: Counters, log: logging.Logger):
        self.name = name
        self.counters = counters
        self._errors_log = RateLimitedLog(log)
        self._bugs = DistinctErrorLog(log)

    def count(self, counter: str, amount: int = 1, **labels: str) -> None:
        self.counters.inc(counter, amount, input=self.name, **labels)

    async def hand_over(self, send_channel: trio.MemorySendChannel, messages, errors: list, *, peer: str, holds: list) -> None:
        """`messages` (a chunk, as a decoder gives it) go to the correlator; `errors` are
        counted by reason and logged (rate-limited) naming `peer`. `holds`: the sender's list
        of Events to wait for before it reads more (a backend under `block` adds to it)."""
        if errors:
            self.reject(errors, peer)
        if messages:
            self.count("messages_received_total", len(messages))
            # Which path decoded them: an operator's check that the traffic is on the fast one.
            self.counters.inc("decoded_messages_total", len(messages), path=messages.path)
            received_at = format_timestamp(dt.datetime.now(dt.timezone.utc))
            await send_channel.send((received_at, messages, holds))

    async def hand_over_within(self, patience: float, send_channel: trio.MemorySendChannel, messages, errors: list, *, peer: str, holds: list) -> bool:
        """`hand_over` for a client better told to come back than kept waiting (an HTTP
        request): the messages go to the correlator if `holds` are released and the channel has
        room within `patience` seconds, and only then are they and `errors` counted. False if
        not: nothing was sent and nothing counted, so a retried request counts once."""
        received_at = format_timestamp(dt.datetime.now(dt.timezone.utc))
        with trio.move_on_after(patience):
            while holds:
                await holds[0].wait()
                holds.pop(0)
            await send_channel.send((received_at, messages, holds))
            if errors:
                self.reject(errors, peer)
            self.count("messages_received_total", len(messages))
            self.counters.inc("decoded_messages_total", len(messages), path=messages.path)
            return True
        return False

    def reject(self, errors: list, peer: str) -> int:
        """Count and log messages a decoder rejected; how many they were."""
        rejected = 0
        for error in errors:
            count = getattr(error, "count", 1)
            rejected += count
            self.count("decode_errors_total", count, reason=error.reason)
            self._errors_log.warning(error.reason, "rejected from %s: %s: %s", peer, error.reason, error.detail)
            exception = getattr(error, "exception", None)
            if exception is not None:
                self._bugs.log(exception, "internal error while decoding %d messages from %s; they are dropped, the connection goes on", count, peer)
        return rejected


class Source:
    """Base of every source. A subclass sets `type_name` and `Settings` (a frozen attrs class
    read from the config with file:line errors) and implements `run`. `Settings` may have
    `from_environment(environ)`, which the config loader calls to read the secrets its settings
    name (raising SettingsFromEnvironment)."""

    type_name: ClassVar[str]
    Settings: ClassVar[type]

    def __init__(self, name: str, settings, intake: Intake, *, native: bool = False):
        self.name = name
        self.settings = settings
        self.intake = intake
        self.native = native  # pipeline.native: decode with the native hot path where it can
        self.address: str | None = None  # where it listens, once it does

    async def run(self, send_channel: trio.MemorySendChannel, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve until `stop_accepting()` and `close_connections()`; `task_status.started()`
        once it listens. Closes `send_channel` (its own clone) when its last client is done."""
        raise NotImplementedError

    def stop_accepting(self) -> None:
        """No new clients from now on."""

    def close_connections(self, grace: float) -> None:
        """Let connected clients send for `grace` seconds more, then stop reading from them."""

    @property
    def active_connections(self) -> int:
        return 0

    def statistics(self) -> dict:
        return {"type": self.type_name, "address": self.address}
