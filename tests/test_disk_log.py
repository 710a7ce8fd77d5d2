"""The write-ahead log under a disk queue: order, the acknowledgement frontier across restarts,
damaged segments, the caps; and the disk queue in front of it."""

import collections
import errno
import os
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

import orjson
import pytest
import trio
import trio.testing
from hypothesis import given, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from sidecar.batch import Batch
from sidecar.config import QueueSettings
from sidecar.delivery import DeliveryQueue
from sidecar.disk_log import END_MARK, HEADER, LEGACY_MAGIC, MAGIC, PREFIX, URGENT, DiskBudget, DiskLog, LogFull, held_in
from tests.harness import event, seqs


def chunk(start, n, source="svc"):
    return Batch.of([event(source, i) for i in range(start, start + n)])


def messages_of(taken):
    return [m for _record, batch in taken for m in batch.messages()]


def reopen(log, **kwargs):
    log.close()
    return DiskLog(log.directory, kwargs.pop("max_bytes", log.max_bytes), segment_bytes=kwargs.pop("segment_bytes", log.segment_bytes), **kwargs)


def test_records_come_back_in_order_and_segments_go_once_acknowledged(tmp_path):
    log = DiskLog(tmp_path, max_bytes=10**9, segment_bytes=2000)
    for start in range(0, 100, 10):
        assert log.append(chunk(start, 10), cache=False) is None
    assert log.unread == 100 and log.held == 100 and len(log.segments) > 2
    taken = log.read(35)
    assert seqs(messages_of(taken)) == list(range(40))  # whole records: up to the one that passes 35
    segments_before = len(list(tmp_path.glob("segment-*.log")))
    for record, batch in taken:
        log.acknowledge(record, len(batch))
    assert len(list(tmp_path.glob("segment-*.log"))) < segments_before
    assert seqs(messages_of(log.read(1000))) == list(range(40, 100))
    assert log.unread == 0 and log.held == 60


def test_a_batch_comes_back_as_it_went_in(tmp_path):
    log = DiskLog(tmp_path, max_bytes=10**9)
    batch = Batch.of([event("svc", 1, level="error"), event("svc", 2, extra={"text": "ü\n\"\u2028"})])
    log.append(batch, cache=False)
    log = reopen(log)
    ((_record, back),) = log.read(10)
    assert back.source == "svc" and back.lines == batch.lines and back.timestamps == batch.timestamps and back.urgent


def test_a_restart_delivers_what_was_not_acknowledged_and_skips_what_was(tmp_path):
    log = DiskLog(tmp_path, max_bytes=10**9)
    records = [log.append(chunk(start, 5, source), cache=True) for start, source in ((0, "a"), (5, "b"), (10, "a"), (15, "b"))]
    log.acknowledge(records[0], 5)  # the frontier passes the first record
    log.acknowledge(records[2], 5)  # delivered out of order: past the frontier, so it comes again
    log.acknowledge(records[1], 2)  # a part of a record: the whole record comes again
    assert log.held == 8
    log = reopen(log)
    assert log.recovered == 15 and log.held == 15
    assert seqs(messages_of(log.read(100))) == list(range(5, 20))


def test_acknowledged_everything_leaves_nothing_for_the_next_start(tmp_path):
    log = DiskLog(tmp_path, max_bytes=10**9, segment_bytes=4096)
    for start in range(0, 300, 10):
        record = log.append(chunk(start, 10), cache=True)
        log.acknowledge(record, 10)
    assert log.held == 0 and len(log.segments) == 1  # only the segment being written is left
    log = reopen(log)
    assert log.recovered == 0 and log.read(100) == [] and held_in(tmp_path) == (0, 0)
    # New records after a restart go to a new segment, which the old ledger cannot misplace.
    log.append(chunk(300, 10), cache=False)
    log = reopen(log)
    assert seqs(messages_of(log.read(100))) == list(range(300, 310))


def test_a_recycled_segment_file_gives_back_no_message_of_its_former_life(tmp_path):
    log = DiskLog(tmp_path, max_bytes=10**9, segment_bytes=4096)
    start = 0
    while not (tmp_path / "spare.log").exists():  # segments filled and acknowledged: one file kept
        log.append(chunk(start, 20), cache=True)
        start += 20
        while log._records:
            log.acknowledge(log._records[0], log._records[0].count - log._records[0].acked)
    number, first_unacknowledged = log.segments[-1].number, start
    while log.segments[-1].number == number:  # the next segment takes the spare file
        log.append(chunk(start, 2), cache=False)
        start += 2
    reused = log.segments[-1]
    assert not (tmp_path / "spare.log").exists() and reused.path.stat().st_size > reused.end + len(END_MARK)
    log = reopen(log)
    assert seqs(messages_of(log.read(10**6))) == list(range(first_unacknowledged, start))
    assert log.corrupt_segments == 0


def test_a_truncated_tail_is_counted_and_skipped(tmp_path):
    log = DiskLog(tmp_path, max_bytes=10**9)
    for start in range(0, 30, 10):
        log.append(chunk(start, 10), cache=False)
    log.close()
    segment = next(tmp_path.glob("segment-*.log"))
    segment.write_bytes(segment.read_bytes()[: -len(END_MARK) - 7])  # the last record loses its end, as at a crash
    recovered = DiskLog(tmp_path, max_bytes=10**9)
    assert recovered.unread == 20 and recovered.corrupt_segments == 1 and recovered.corrupt_bytes > HEADER.size
    assert seqs(messages_of(recovered.read(100))) == list(range(20))


def test_garbage_in_a_segment_is_skipped_from_the_damage_on(tmp_path):
    log = DiskLog(tmp_path, max_bytes=10**9)
    log.append(chunk(0, 10), cache=False)
    log.append(chunk(10, 10), cache=False)
    log.close()
    segment = next(tmp_path.glob("segment-*.log"))
    data = bytearray(segment.read_bytes())
    data[-len(END_MARK) - 20] ^= 0xFF  # a flipped byte in the second record's payload: its CRC fails
    segment.write_bytes(bytes(data))
    recovered = DiskLog(tmp_path, max_bytes=10**9)
    assert recovered.unread == 10 and recovered.corrupt_segments == 1


def test_a_damaged_ledger_means_everything_on_disk_again(tmp_path):
    log = DiskLog(tmp_path, max_bytes=10**9)
    first = log.append(chunk(0, 10), cache=True)
    log.append(chunk(10, 10), cache=True)
    log.acknowledge(first, 10)
    log.close()
    ledger = tmp_path / "ledger"
    ledger.write_bytes(b"\xff" + ledger.read_bytes()[1:])
    assert DiskLog(tmp_path, max_bytes=10**9).recovered == 20


def test_the_caps_refuse_a_batch_whole(tmp_path):
    log = DiskLog(tmp_path, max_bytes=8192)
    accepted = 0
    with pytest.raises(LogFull):
        for i in range(100):
            log.append(chunk(i * 5, 5), cache=False)
            accepted += 1
    assert 0 < accepted < 100 and log.bytes_on_disk <= 8192
    budget = DiskBudget(12000)
    one = DiskLog(tmp_path / "one", max_bytes=10**9, budget=budget)
    two = DiskLog(tmp_path / "two", max_bytes=10**9, budget=budget)
    with pytest.raises(LogFull):
        for i in range(100):
            (one if i % 2 else two).append(chunk(i * 5, 5), cache=False)
    assert budget.used == one.bytes_on_disk + two.bytes_on_disk <= 12000
    one.close()
    assert budget.used == two.bytes_on_disk


def test_records_of_the_former_spill_format_are_read(tmp_path):
    messages = [event("a", 0), event("a", 1), event("b", 2)]
    payload = orjson.dumps(messages)
    header = struct.pack(">2sIII", LEGACY_MAGIC, len(payload), len(messages), zlib.crc32(payload))
    (tmp_path / "segment-000000000001.log").write_bytes(header + payload)
    log = DiskLog(tmp_path, max_bytes=10**9)
    taken = log.read(10)
    assert [b.source for _r, b in taken] == ["a", "b"] and seqs(messages_of(taken)) == [0, 1, 2]
    record = taken[0][0]
    assert all(r is record for r, _b in taken)  # one record, acknowledged by its count
    log.acknowledge(record, 3)
    assert log.held == 0


def test_records_that_stored_their_timestamps_are_read(tmp_path):
    batch = Batch.of([event("svc", 0), event("svc", 1, level="error")])
    source, stamps, lines = b"svc", "\n".join(batch.timestamps).encode(), b"\n".join(batch.lines)
    payload = PREFIX.pack(len(source), len(stamps)) + source + stamps + lines
    header = HEADER.pack(MAGIC, URGENT, len(payload), 2, zlib.crc32(payload))
    (tmp_path / "segment-000000000001.log").write_bytes(header + payload)
    ((_record, back),) = DiskLog(tmp_path, max_bytes=10**9).read(10)
    assert (back.source, back.lines, back.timestamps, back.urgent) == ("svc", batch.lines, batch.timestamps, True)


def test_a_batch_offered_to_several_logs_is_encoded_once(tmp_path):
    batch = chunk(0, 5)
    one, two = DiskLog(tmp_path / "one", max_bytes=10**9), DiskLog(tmp_path / "two", max_bytes=10**9)
    one.append(batch, cache=False)
    parts = batch.record[0]
    two.append(batch, cache=False)
    assert batch.record[0] is parts
    assert (tmp_path / "one" / "segment-000000000001.log").read_bytes() == (tmp_path / "two" / "segment-000000000001.log").read_bytes()
    batch.extend(chunk(5, 1))
    assert batch.record is None  # a changed batch is encoded again


class LogAgainstModel(RuleBasedStateMachine):
    """Any interleaving of appends (cached or not), reads, acknowledgements per source in the
    order handed out, and restarts: after a restart, exactly the messages not acknowledged
    before the frontier come back, each source's in order, and nothing accepted is missing."""

    def __init__(self):
        super().__init__()
        self.directory = tempfile.mkdtemp(prefix="disk-log-")
        self.log = DiskLog(Path(self.directory), max_bytes=10**9, segment_bytes=4096)
        self.next_seq = 0
        self.accepted: dict[int, str] = {}  # seq -> source
        self.acknowledged: set[int] = set()
        self.handed: dict[str, collections.deque] = collections.defaultdict(collections.deque)  # (record, seq)
        self.cache: list[tuple] = []  # records in memory, not yet handed out

    def teardown(self):
        self.log.close()
        shutil.rmtree(self.directory)

    @rule(count=st.integers(1, 30), source=st.sampled_from("abc"), cache=st.booleans())
    def append(self, count, source, cache):
        batch = chunk(self.next_seq, count, source)
        for seq in range(self.next_seq, self.next_seq + count):
            self.accepted[seq] = source
        self.next_seq += count
        record = self.log.append(batch, cache=cache)
        if record is not None:
            self.cache.append((record, batch))

    @rule(limit=st.integers(1, 60))
    def read(self, limit):
        for record, batch in self.cache + self.log.read(limit):
            for message in batch.messages():
                self.handed[batch.source].append((record, message["context"]["seq"]))
        self.cache = []

    @precondition(lambda self: any(self.handed.values()))
    @rule(source=st.sampled_from("abc"), count=st.integers(1, 40))
    def acknowledge(self, source, count):
        handed = self.handed[source]
        for _ in range(min(count, len(handed))):
            record, seq = handed.popleft()
            self.log.acknowledge(record, 1)
            self.acknowledged.add(seq)

    @rule()
    def restart(self):
        self.log.close()
        self.log = DiskLog(Path(self.directory), max_bytes=10**9, segment_bytes=4096)
        taken = self.log.read(10**9)
        back = messages_of(taken)
        got = seqs(back)
        missing = set(self.accepted) - self.acknowledged - set(got)
        assert not missing, f"lost {sorted(missing)[:10]}"
        assert len(got) == len(set(got)) and self.log.recovered == len(got)
        for source in "abc":
            mine = [m["context"]["seq"] for m in back if m["source"] == source]
            assert mine == sorted(mine)
        # What came back (again, for some) is handed out, to be acknowledged anew.
        self.acknowledged -= set(got)
        self.cache = []
        self.handed = collections.defaultdict(collections.deque)
        for record, batch in taken:
            for message in batch.messages():
                self.handed[batch.source].append((record, message["context"]["seq"]))

    @invariant()
    def held_is_what_is_not_acknowledged(self):
        unacknowledged = sum(1 for seq in self.accepted if seq not in self.acknowledged)
        assert self.log.held == unacknowledged


LogAgainstModel.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
test_log_against_a_model = LogAgainstModel.TestCase


# ---------------------------------------------------------------- the disk queue


async def drain(queue, count, max_messages=8):
    got = []
    while len(got) < count:
        for batch in await queue.get(max_messages):
            got.extend(batch.messages())
            queue.acknowledge(batch.source, len(batch))
    return got


async def test_a_disk_queue_keeps_order_across_memory_and_disk(tmp_path):
    queue = DeliveryQueue(QueueSettings(max_messages=10), DiskLog(tmp_path, max_bytes=10**9, segment_bytes=4096))
    for start in range(0, 105, 7):
        assert await queue.put(chunk(start, 7)) == (0, None)
    assert queue.depth <= 10 + 7 and queue.waiting_on_disk > 0
    assert queue.log.held == 105
    assert seqs(await drain(queue, 105)) == list(range(105))
    assert queue.log.held == 0 and len(queue.log.segments) <= 1
    queue.close()
    with pytest.raises(trio.EndOfChannel):
        await queue.get(1)


async def test_a_full_disk_queue_drops_the_newest_or_blocks_until_delivery_frees_room(tmp_path):
    dropping = DeliveryQueue(QueueSettings(max_messages=10, max_bytes=8192), DiskLog(tmp_path / "drop", max_bytes=8192))
    results = [await dropping.put(chunk(i * 5, 5)) for i in range(100)]
    assert (5, "queue_full") in results and results[0] == (0, None)

    blocking = DeliveryQueue(QueueSettings(max_messages=10, max_bytes=8192, when_full="block"), DiskLog(tmp_path / "block", max_bytes=8192))
    done = []

    async def producer():
        for i in range(60):
            assert await blocking.put(chunk(i * 5, 5)) == (0, None)
        done.append(True)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(producer)
        await trio.testing.wait_all_tasks_blocked()
        assert not done and blocking.entering == 5  # waiting, and counted while it waits
        got = await drain(blocking, 300, max_messages=50)
    assert done and seqs(got) == list(range(300))


async def test_a_batch_the_disk_refuses_stays_in_memory_when_it_can(tmp_path, monkeypatch):
    log = DiskLog(tmp_path, max_bytes=10**9)
    queue = DeliveryQueue(QueueSettings(max_messages=10), log)
    real_pwritev = os.pwritev

    def failing_pwritev(fd, parts, offset):
        if fd == log._writer:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwritev(fd, parts, offset)

    monkeypatch.setattr(os, "pwritev", failing_pwritev)
    assert await queue.put(chunk(0, 5)) == (0, None)  # memory has room: kept there
    assert await queue.put(chunk(5, 10)) == (0, None)
    assert await queue.put(chunk(15, 5)) == (5, "disk_error")  # memory is full too
    assert queue.memory_only() == 15 and log.write_errors == 3 and "No space left" in queue.last_error
    monkeypatch.setattr(os, "pwritev", real_pwritev)
    assert await queue.put(chunk(20, 5)) == (0, None)
    assert seqs(await drain(queue, 20, max_messages=50)) == list(range(15)) + list(range(20, 25))
    assert queue.memory_only() == 0 and log.held == 0


def test_the_segment_being_written_is_handed_for_an_fsync_only_when_written_to(tmp_path):
    log = DiskLog(tmp_path, max_bytes=10**9)
    assert log.writer_to_sync() is None  # nothing written yet
    log.append(chunk(0, 5), cache=False)
    descriptor = log.writer_to_sync()
    assert descriptor is not None and descriptor != log._writer
    log.close()  # the duplicate stays usable after the log closed its own
    os.fsync(descriptor)
    os.close(descriptor)
    assert log.syncs == 1


@given(st.lists(st.integers(0, 50), min_size=1, max_size=20), st.text(min_size=1, max_size=20))
def test_has_room_knows_a_records_size_exactly(sizes, source):
    with tempfile.TemporaryDirectory() as directory:
        log = DiskLog(Path(directory), max_bytes=10**9)
        for size in sizes:
            batch = Batch.of([{**event(source, i), "pad": "x" * size} for i in range(size % 7 + 1)])
            before = log.bytes_on_disk
            log.append(batch, cache=False)
            grown = log.bytes_on_disk - before
            (segment,) = Path(directory).glob("segment-*.log")
            assert segment.stat().st_size == log.bytes_on_disk + len(END_MARK)  # what was written
            batch.record = None  # computed again for has_room
            log.max_bytes = log.bytes_on_disk + grown
            assert log.has_room(batch)
            log.max_bytes -= 1
            assert not log.has_room(batch)
            log.max_bytes = 10**9
        log.close()


class DiskQueueUnderBlock(RuleBasedStateMachine):
    """A disk queue with `block` and caps small enough to fill: any interleaving of offers, gets
    and acknowledgements keeps each source's order, drops nothing, and accounts for every
    message at every step: offered = acknowledged + handed out + in memory + on disk only +
    waiting to enter."""

    def __init__(self):
        super().__init__()
        self.directory = tempfile.mkdtemp(prefix="disk-queue-")
        self.queue = DeliveryQueue(QueueSettings(max_messages=15, max_bytes=8192, when_full="block"), DiskLog(Path(self.directory), max_bytes=8192))
        self.next_seq = 0
        self.offered = 0
        self.acknowledged = 0
        self.handed: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self.seen: dict[str, list[int]] = collections.defaultdict(list)
        self.admissions: list[trio.Event] = []

    def teardown(self):
        self.queue.close_log()
        shutil.rmtree(self.directory)

    @rule(count=st.integers(1, 12), source=st.sampled_from("ab"))
    def offer(self, count, source):
        dropped, _reason, admitted = self.queue.offer(chunk(self.next_seq, count, source))
        assert dropped == 0
        self.next_seq += count
        self.offered += count
        if admitted is not None:
            self.admissions.append(admitted)

    @rule(limit=st.integers(1, 30))
    def get(self, limit):
        if not self.queue.depth and not self.queue.waiting_on_disk:
            return
        for batch in trio.run(self.queue.get, limit):
            seqs_of = [m["context"]["seq"] for m in batch.messages()]
            self.handed[batch.source].extend(seqs_of)
            self.seen[batch.source].extend(seqs_of)

    @rule(source=st.sampled_from("ab"), count=st.integers(1, 30))
    def acknowledge(self, source, count):
        count = min(count, len(self.handed[source]))
        for _ in range(count):
            self.handed[source].popleft()
        self.queue.acknowledge(source, count)
        self.acknowledged += count

    @invariant()
    def every_message_is_somewhere_once(self):
        queue = self.queue
        handed = sum(map(len, self.handed.values()))
        assert self.offered == self.acknowledged + handed + queue.depth + queue.waiting_on_disk + queue.entering
        for source, got in self.seen.items():
            assert got == sorted(got) and len(got) == len(set(got)), f"{source} out of order"

    @invariant()
    def a_batch_waits_only_while_there_is_no_room(self):
        for admitted in self.admissions:
            if not admitted.is_set():
                assert self.queue.entering > 0


DiskQueueUnderBlock.TestCase.settings = settings(max_examples=60, stateful_step_count=50, deadline=None)
test_a_disk_queue_under_block_against_a_model = DiskQueueUnderBlock.TestCase


def test_a_cap_of_one_segment_never_fills_with_what_was_acknowledged(tmp_path):
    log = DiskLog(tmp_path, max_bytes=4096)  # one segment's worth
    assert log.segment_bytes == 4096
    for start in range(0, 2000, 10):
        assert log.has_room(chunk(start, 10))
        record = log.append(chunk(start, 10), cache=True)
        log.acknowledge(record, 10)
    log.append(chunk(2000, 10), cache=False)
    log = reopen(log)
    assert seqs(messages_of(log.read(100))) == list(range(2000, 2010))
