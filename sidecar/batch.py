"""The unit the delivery machinery moves: some of one source's messages, as JSON lines.

Every enriched message travels as its JSON line (what the file and S3 backends write), encoded
once by the correlator while the chunk is still in the CPU's cache, with its timestamp beside it
for the latency histogram. The decoded messages come along when the correlator had them (the
Python path) and are otherwise parsed from the lines only when a backend that needs fields asks
(`messages()`): on the native path no message is ever a dict unless PostgreSQL, CloudWatch, the
console, a filter or a tap wants one.
"""

import orjson

from sidecar.constants import URGENT_LEVELS


def is_urgent(messages: list[dict]) -> bool:
    """An error or critical event among them: the batcher flushes it at once."""
    return any(m["type"] == "event" and m["data"]["level"] in URGENT_LEVELS for m in messages)


class Batch:
    __slots__ = ("source", "lines", "timestamps", "urgent", "_messages", "record", "_received_at", "_aggregates", "points")

    # `urgent`: an error or critical event is among them, so the batcher flushes at once. A part
    # of an urgent batch (head, tail) stays urgent: at worst a flush comes early.
    def __init__(self, source: str, lines: list[bytes], timestamps: list[str], urgent: bool = False, messages: list[dict] | None = None, received_at: str | None = None, aggregates: bool | None = None, points=None):
        self.source = source
        self.lines = lines
        self.timestamps = timestamps
        self.urgent = urgent
        self._messages = messages
        # The batch as a disk-log record (sidecar.disk_log.encode_record), encoded once for all
        # the backends' logs it goes to, and let go once it is offered to them.
        self.record = None
        self._received_at = received_at  # the first message's; None: read from it when asked
        # Whether an aggregate (a metric with `data.aggregation`) may be among them: known from
        # the native decoder, else found out when first asked.
        self._aggregates = aggregates
        # The native decoder's record of these very lines (`sidecar._native.Points`), which the
        # aggregate steps read instead of the lines: only while the lines are these, so a part
        # or a new batch has none, and let go once the steps have read it (it holds the chunk).
        self.points = points

    @classmethod
    def of(cls, messages: list[dict]) -> "Batch":
        """Enriched messages of one source as a batch (the Python path, tests)."""
        source = messages[0]["source"] if messages else ""
        return cls(source, list(map(orjson.dumps, messages)), [m["timestamp"] for m in messages], is_urgent(messages), messages)

    @classmethod
    def runs(cls, messages: list[dict]) -> list["Batch"]:
        """Enriched messages of any sources as batches, one per run of one source."""
        batches = []
        start = 0
        for index in range(1, len(messages) + 1):
            if index == len(messages) or messages[index]["source"] != messages[start]["source"]:
                batches.append(cls.of(messages[start:index]))
                start = index
        return batches

    @classmethod
    def empty(cls, source: str = "") -> "Batch":
        return cls(source, [], [], False, [])

    def __len__(self) -> int:
        return len(self.lines)

    def __repr__(self) -> str:
        return f"<Batch of {len(self.lines)} from {self.source!r}{' urgent' if self.urgent else ''}>"

    @property
    def received_at(self) -> str:
        """When the sidecar received the first message ("" for an empty batch): known from the
        correlator, read from the first line for a batch read back from disk."""
        if self._received_at is None:
            first = self._messages[0] if self._messages else orjson.loads(self.lines[0]) if self.lines else {}
            self._received_at = first.get("received_at") or ""
        return self._received_at

    def may_hold_aggregates(self) -> bool:
        """False when no message of the batch is an aggregate (`data.aggregation`): a filter on
        `aggregated` then decides for the whole batch without parsing a line."""
        if self._aggregates is None:
            if self._messages is not None:
                self._aggregates = any(m["type"] == "metric" and "aggregation" in m["data"] for m in self._messages)
            else:
                # Lines are the decoders' (the native one declines a key written with escapes,
                # the Python one writes none), so the key is there as written; a backslash
                # anywhere sends the batch the slow way all the same. Searched in one buffer:
                # a search per line costs several times more.
                joined = b"\n".join(self.lines)
                self._aggregates = b'"aggregation"' in joined or b"\\" in joined
        return self._aggregates

    def messages(self) -> list[dict]:
        """The messages as dicts: parsed from the lines on first use, then kept."""
        if self._messages is None:
            self._messages = list(map(orjson.loads, self.lines))
        return self._messages

    def head(self, count: int) -> "Batch":
        """The first `count` messages (a new batch; this one is unchanged)."""
        messages = self._messages[:count] if self._messages is not None else None
        return Batch(self.source, self.lines[:count], self.timestamps[:count], self.urgent, messages, self._received_at, self._part_aggregates)

    def tail(self, count: int) -> "Batch":
        """All but the first `count` messages (a new batch)."""
        messages = self._messages[count:] if self._messages is not None else None
        return Batch(self.source, self.lines[count:], self.timestamps[count:], self.urgent, messages, aggregates=self._part_aggregates)

    def last(self, count: int) -> "Batch":
        return self.tail(max(len(self.lines) - count, 0))

    def pick(self, indices: list[int]) -> "Batch":
        """The messages at these positions, in order."""
        messages = self.messages()
        chosen = [messages[i] for i in indices]
        return Batch(self.source, [self.lines[i] for i in indices], [self.timestamps[i] for i in indices], is_urgent(chosen), chosen, aggregates=self._part_aggregates)

    @property
    def _part_aggregates(self) -> bool | None:
        """What a part of this batch is known to hold: no aggregate if this one has none."""
        return False if self._aggregates is False else None

    def extend(self, other: "Batch") -> None:
        """Append another batch's messages to this one (which must not be shared)."""
        self.record = None
        self.points = None
        if not self.lines:
            self._received_at = other._received_at
        self.lines += other.lines
        self.timestamps += other.timestamps
        self.urgent = self.urgent or other.urgent
        self._aggregates = False if self._aggregates is False and other._aggregates is False else None
        if self._messages is not None and other._messages is not None:
            self._messages += other._messages
        else:
            self._messages = None  # dicts for a part only: all are parsed from the lines if asked

    def take_front(self, count: int) -> "Batch":
        """Remove the first `count` messages from this batch and return them as a new one."""
        front = self.head(count)
        self.record = None
        self.points = None
        self._received_at = None
        del self.lines[:count]
        del self.timestamps[:count]
        if self._messages is not None:
            del self._messages[:count]
        return front