"""A source's rate limit: token buckets for messages and bytes per second.

`TokenBucket` and `RateLimiter` are pure: every call takes the time `now` (trio's clock in the
sidecar, any number in tests) and nothing here sleeps. A source under `when_over: drop` asks
`admit` how many of the messages it decoded may go; under `pushback` it `charge`s what went
(the bucket may go into debt) and waits with `pace` before it reads again, so TCP pushes back
to the client.
"""

import math
from typing import Literal

import attrs
import trio

from sidecar.units import ByteSize, Duration

# Float rounding must not cost a whole message: 2.9999999999 tokens are 3.
_EPSILON = 1e-9


def _positive_or_none(_instance, attribute, value) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"must be more than 0 (leave it out for no limit), got {value!r}")


@attrs.frozen
class RateLimitSettings:
    """`rate_limit:` of a source: what all its connections together may send."""

    messages_per_second: float | None = attrs.field(default=None, validator=_positive_or_none)
    bytes_per_second: ByteSize | None = attrs.field(default=None, validator=_positive_or_none)
    # The buckets hold this many seconds' worth of each rate: a burst after a quiet spell.
    burst: Duration = attrs.field(default=1.0, validator=attrs.validators.gt(0))
    # drop: messages over the limit are dropped and counted; pushback: reads wait.
    when_over: Literal["drop", "pushback"] = "pushback"

    def __attrs_post_init__(self):
        if self.messages_per_second is None and self.bytes_per_second is None:
            raise ValueError("set messages_per_second, bytes_per_second or both")


@attrs.define
class TokenBucket:
    """`rate` tokens a second, up to `capacity`; it starts full. Tokens may go below zero (a
    debt, under pushback), and are then paid back by the time passing."""

    rate: float
    capacity: float
    tokens: float
    updated: float

    @classmethod
    def full(cls, rate: float, capacity: float, now: float) -> "TokenBucket":
        return cls(rate, capacity, capacity, now)

    def refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
            self.updated = now

    def available(self, now: float) -> float:
        self.refill(now)
        return self.tokens

    def take(self, amount: float, now: float) -> None:
        self.refill(now)
        self.tokens -= amount

    def delay(self, now: float) -> float:
        """Seconds until the bucket is out of debt (0 when it is)."""
        self.refill(now)
        # A debt of rounding is none: waiting it out would not move a clock that reads 1e6.
        if self.tokens >= -_EPSILON * max(1.0, self.capacity):
            return 0.0
        return -self.tokens / self.rate


class RateLimiter:
    """The buckets of one source's `rate_limit`: messages and bytes, either or both."""

    def __init__(self, settings: RateLimitSettings, now: float):
        self.settings = settings
        self.messages = TokenBucket.full(settings.messages_per_second, settings.messages_per_second * settings.burst, now) if settings.messages_per_second else None
        self.bytes = TokenBucket.full(settings.bytes_per_second, settings.bytes_per_second * settings.burst, now) if settings.bytes_per_second else None

    @property
    def drops(self) -> bool:
        return self.settings.when_over == "drop"

    def admit(self, count: int, size: int, now: float) -> int:
        """Under `drop`: how many of `count` messages (`size` bytes together, shared evenly among
        them) may go now, the first ones; their tokens are taken, the rest cost nothing."""
        if count <= 0:
            return 0
        allowed = count
        if self.messages is not None:
            allowed = min(allowed, math.floor(self.messages.available(now) + _EPSILON))
        share = size / count
        if self.bytes is not None and share > 0:
            allowed = min(allowed, math.floor(self.bytes.available(now) / share + _EPSILON))
        allowed = max(allowed, 0)
        if allowed:
            if self.messages is not None:
                self.messages.take(allowed, now)
            if self.bytes is not None:
                self.bytes.take(allowed * share, now)
        return allowed

    def charge(self, count: int, size: int, now: float) -> None:
        """Under `pushback`: `count` messages and `size` bytes went; the buckets may go into
        debt, which `delay` makes the next read wait out."""
        if self.messages is not None and count:
            self.messages.take(count, now)
        if self.bytes is not None and size:
            self.bytes.take(size, now)

    def delay(self, now: float) -> float:
        """Seconds until every bucket is out of debt."""
        return max((bucket.delay(now) for bucket in (self.messages, self.bytes) if bucket is not None), default=0.0)


async def pace(limiter: RateLimiter) -> float:
    """Wait until `limiter` is out of debt; the seconds waited."""
    started = trio.current_time()
    while (delay := limiter.delay(trio.current_time())) > 0:
        await trio.sleep(max(delay, 1e-6))  # at least a step any clock can take
    return trio.current_time() - started
