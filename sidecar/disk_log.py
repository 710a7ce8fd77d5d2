"""A backend instance's write-ahead log: what its queue accepts is written here first.

The log is a directory of append-only segment files and a small ledger. Each record is one
batch of one source: a header (magic, flags, payload length, message count, CRC-32 of the
payload) and the payload (the source and the JSON lines; a record read back takes each
message's timestamp from its line). The ledger holds the acknowledgement frontier: the position
before which every message was delivered or dropped for good. A restart skips what is before
the frontier and delivers the rest again (at least once: what was delivered past the frontier
comes twice). A record damaged or cut short ends its segment's valid part; the rest is counted
and skipped.

A segment that is done leaves its file as the log's one spare, which the next segment takes
and overwrites (cheaper for the kernel than filling a new file); each write ends with a zeroed
header slot, overwritten by the next record, so a scan knows where the valid part ends.

Writes go to the page cache from the event loop (one vectored write per batch, no fsync): that
survives the process being killed or crashing. The segment being written is fsynced from a
worker thread every `storage.sync_interval` (see `writer_to_sync`) and at close; a machine crash
costs what was written since.

Pure blocking file I/O, one caller at a time; no trio here.
"""

import collections
import errno
import fcntl
import logging
import os
import struct
from pathlib import Path

import orjson

from sidecar.batch import Batch
from sidecar.native import crc32

log = logging.getLogger("sidecar.disk_log")

MAGIC = b"WQ"
HEADER = struct.Struct(">2sBxIII")  # magic, flags, -, payload length, message count, crc32(payload)
URGENT = 0x01
PREFIX = struct.Struct(">HI")  # source length, timestamps length (0 now; earlier records stored them)
# The format `when_full: spill` wrote: a JSON array of messages per record. Still read.
LEGACY_MAGIC = b"SL"
LEGACY_HEADER = struct.Struct(">2sIII")
LEDGER = struct.Struct(">QQI")  # segment number, offset, crc32 of the two
LEDGER_NAME = "ledger"
SEGMENT_BYTES = 16 * 1024 * 1024
# Written after every record, overwritten by the next: where the valid part of a segment ends,
# also in a recycled file that holds an earlier life's bytes past it.
END_MARK = bytes(HEADER.size)
SPARE_NAME = "spare.log"


class LogFull(Exception):
    """Appending would pass the log's cap or the total cap of all logs."""


class BufferInUse(OSError):
    """Another process (or instance) holds this log's lock."""


class DamagedRecord(ValueError):
    pass


class DiskBudget:
    """The total cap on all logs under one data_dir (`storage.max_bytes`)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.used = 0


def encode_record(batch: Batch) -> tuple[list[bytes], int]:
    """A record as the parts of one vectored write (the lines are joined once and not copied
    again) and its size; kept on the batch for every log it goes to. The timestamps are not
    stored: a record read back takes them from its lines, so the healthy path writes less."""
    if batch.record is None:
        source = batch.source.encode()
        head = PREFIX.pack(len(source), 0) + source
        lines = b"\n".join(batch.lines)
        crc = crc32(lines, crc32(head))
        flags = URGENT if batch.urgent else 0
        parts = [HEADER.pack(MAGIC, flags, len(head) + len(lines), len(batch.lines), crc), head, lines]
        batch.record = parts, sum(map(len, parts))
    return batch.record


def decode_payload(magic: bytes, flags: int, payload: bytes, count: int) -> list[Batch]:
    """The batches of one record (one, or several for a legacy record of many sources)."""
    if magic == LEGACY_MAGIC:
        messages = orjson.loads(payload)
        if not isinstance(messages, list) or len(messages) != count:
            raise DamagedRecord("message count does not match")
        return Batch.runs(messages)
    source_length, stamps_length = PREFIX.unpack_from(payload)
    start = PREFIX.size
    source = payload[start : start + source_length].decode()
    start += source_length
    lines = payload[start + stamps_length :].split(b"\n")
    if stamps_length:  # written before records left them out
        stamps = payload[start : start + stamps_length].decode().split("\n")
    else:
        stamps = [orjson.loads(line)["timestamp"] for line in lines]
    if len(lines) != count or len(stamps) != count:
        raise DamagedRecord("message count does not match")
    return [Batch(source, lines, stamps, bool(flags & URGENT))]


def _header_at(data, position: int):
    """(magic, flags, payload length, count, crc, header size) of the record at `position`, or
    None where no whole header of a known kind is."""
    magic = bytes(data[position : position + 2])
    if magic == MAGIC and position + HEADER.size <= len(data):
        _m, flags, length, count, crc = HEADER.unpack_from(data, position)
        return magic, flags, length, count, crc, HEADER.size
    if magic == LEGACY_MAGIC and position + LEGACY_HEADER.size <= len(data):
        _m, length, count, crc = LEGACY_HEADER.unpack_from(data, position)
        return magic, 0, length, count, crc, LEGACY_HEADER.size
    return None


def scan_segment(data: bytes, start: int = 0) -> tuple[int, int, bool]:
    """(messages, end of the last whole, valid record, whether the rest is no damage) from
    `start` in a segment's bytes. The rest is no damage when it is nothing, or starts with the
    zeroed header slot each write leaves after its record (a recycled file has old bytes past it)."""
    messages = 0
    position = start
    while True:
        header = _header_at(data, position)
        if header is None:
            rest = data[position : position + HEADER.size]
            return messages, position, rest == END_MARK[: len(rest)]
        _magic, _flags, length, count, crc, size = header
        payload_start = position + size
        if payload_start + length > len(data) or crc32(data[payload_start : payload_start + length]) != crc:
            return messages, position, False
        messages += count
        position = payload_start + length


def read_ledger(directory: Path) -> tuple[int, int]:
    """The acknowledgement frontier a previous run left; (0, 0), everything, when none or damaged."""
    try:
        data = (directory / LEDGER_NAME).read_bytes()
    except FileNotFoundError:
        return 0, 0
    if len(data) < LEDGER.size:
        return 0, 0
    number, offset, crc = LEDGER.unpack_from(data)
    if crc32(data[:16]) != crc:
        log.error("disk log %s: its ledger is damaged; everything on disk will be delivered again", directory)
        return 0, 0
    return number, offset


def segment_number(path: Path) -> int | None:
    try:
        return int(path.stem.split("-", 1)[1])
    except (IndexError, ValueError):
        return None


def held_in(directory: Path) -> tuple[int, int]:
    """Messages not yet acknowledged, and bytes, in a log that nobody holds (read only)."""
    number, offset = read_ledger(directory)
    messages = size = 0
    for path in sorted(directory.glob("segment-*.log")):
        found = segment_number(path)
        if found is None or found < number:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        count, end, _clean = scan_segment(data, offset if found == number else 0)
        messages += count
        size += end
    return messages, size


class Segment:
    __slots__ = ("number", "path", "end", "sealed", "reader", "recyclable")

    def __init__(self, number: int, path: Path):
        self.number = number
        self.path = path
        self.end = 0  # bytes of whole, valid records
        self.sealed = False  # no more appends
        self.recyclable = False  # written by this run, so holds no record of the former format
        self.reader: int | None = None  # a descriptor for reading back, opened on first use


class Record:
    """One record read or cached, until all its messages are acknowledged."""

    __slots__ = ("segment", "end", "count", "acked")

    def __init__(self, segment: Segment, end: int, count: int):
        self.segment = segment
        self.end = end  # the offset just past it: the frontier once it and all before are done
        self.count = count
        self.acked = 0


class DiskLog:
    def __init__(self, directory: Path, max_bytes: int, budget: DiskBudget | None = None, segment_bytes: int | None = None):
        self.directory = directory
        self.max_bytes = max_bytes
        self.budget = budget
        # Small caps get small segments, so that acknowledged space comes back in time.
        self.segment_bytes = segment_bytes or min(SEGMENT_BYTES, max(4096, max_bytes // 16))
        self.segments: list[Segment] = []
        self.unread = 0  # messages on disk past the read position: never read, nor cached
        self.held = 0  # messages on disk not yet acknowledged (unread, cached or handed out)
        self.recovered = 0  # messages a previous run left, delivered again by this one
        self.corrupt_bytes = 0
        self.corrupt_segments = 0
        self.write_errors = 0
        self.syncs = 0  # fsyncs of the segment being written (storage.sync_interval)
        self._unsynced = False  # written to since the last fsync
        self._records: collections.deque[Record] = collections.deque()  # read or cached, not all acked
        self._read_segment = 0  # index in `segments` of the read position
        self._read_offset = 0
        self._writer: int | None = None
        self._ledger: int | None = None
        self._next_number = 1  # of the next segment: past every one a previous run left
        spare = self.directory / SPARE_NAME
        self._spare: Path | None = spare if spare.exists() else None  # a done segment's file, to reuse
        self.directory.mkdir(parents=True, exist_ok=True)
        # One owner at a time: two sidecars on one data_dir must not interleave records.
        self.lock_fd: int | None = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.lock_fd)
            self.lock_fd = None
            raise BufferInUse(errno.EWOULDBLOCK, "in use by another sidecar on the same data_dir", str(self.directory)) from None
        try:
            self._recover()
            self._ledger = os.open(self.directory / LEDGER_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ state

    @property
    def bytes_on_disk(self) -> int:
        return sum(s.end for s in self.segments)

    def statistics(self) -> dict:
        return {
            "on_disk_messages": self.held,
            "disk_only_messages": self.unread,
            "disk_bytes": self.bytes_on_disk,
            "disk_segments": len(self.segments),
            "disk_write_errors": self.write_errors,
            "disk_syncs": self.syncs,
            "disk_corrupt_segments": self.corrupt_segments,
            "disk_corrupt_bytes": self.corrupt_bytes,
        }

    # ------------------------------------------------------------ writing

    def has_room(self, batch: Batch) -> bool:
        """Whether `append` would take this batch now, as far as the caps go."""
        return self._within_caps(encode_record(batch)[1]) or self._writer_reclaimable()

    def _writer_reclaimable(self) -> bool:
        """Everything is acknowledged and only the segment being written is left: its bytes can
        go, where the caps would otherwise refuse for good (a cap of a segment or two)."""
        return len(self.segments) == 1 and not self.segments[0].sealed and not self._records and not self.unread

    def _reclaim_writer(self) -> None:
        self._seal()
        self._delete(self.segments.pop())
        self._read_segment, self._read_offset = 0, 0

    def _within_caps(self, size: int) -> bool:
        return self.bytes_on_disk + size <= self.max_bytes and (self.budget is None or self.budget.used + size <= self.budget.max_bytes)

    def append(self, batch: Batch, *, cache: bool) -> Record | None:
        """Write one batch as one record. With `cache` (only while nothing is unread, so order
        is kept) the caller keeps the batch in memory and gets its Record; otherwise it waits on
        disk to be read back. Raises LogFull past a cap, OSError when the write fails."""
        parts, size = encode_record(batch)
        if not self._within_caps(size):
            if not self._writer_reclaimable():
                raise LogFull
            self._reclaim_writer()
            if not self._within_caps(size):
                raise LogFull
        segment = self._writable(size)
        parts = [*parts, END_MARK]
        try:
            written = os.pwritev(self._writer, parts, segment.end)
            if written < size + len(END_MARK):  # a short write (a signal, a nearly full disk): the rest
                whole = b"".join(parts)
                while written < len(whole):
                    written += os.pwrite(self._writer, whole[written:], segment.end + written)
        except OSError:
            # A part may be there: this segment takes no more, and its valid end stays as it was.
            self.write_errors += 1
            self._seal()
            raise
        segment.end += size
        self._unsynced = True
        if self.budget is not None:
            self.budget.used += size
        self.held += len(batch)
        if cache and not self.unread:
            entry = Record(segment, segment.end, len(batch))
            self._records.append(entry)
            self._read_segment = len(self.segments) - 1
            self._read_offset = segment.end
            return entry
        self.unread += len(batch)
        return None

    def _writable(self, size: int) -> Segment:
        current = self.segments[-1] if self.segments else None
        if current is None or current.sealed or current.end + size > self.segment_bytes and current.end > 0:
            self._seal()
            number = self._next_number
            self._next_number += 1
            segment = Segment(number, self.directory / f"segment-{number:012d}.log")
            segment.recyclable = True
            flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
            if self._spare is not None:
                # Overwriting a file's pages costs the kernel less than filling a new one
                # (docs/performance.md, the disk queue).
                os.rename(self._spare, segment.path)
                self._spare = None
            else:
                flags |= os.O_TRUNC
            self._writer = os.open(segment.path, flags, 0o600)
            self.segments.append(segment)
            if current is None or (self._read_segment == len(self.segments) - 2 and self._read_offset >= current.end):
                self._read_segment, self._read_offset = len(self.segments) - 1, 0
            return segment
        return current

    def writer_to_sync(self) -> int | None:
        """A duplicate of the segment file being written, for a worker thread to fsync and
        close, when it was written to since the last time; None when there is nothing to sync.
        (A duplicate, so that sealing the segment meanwhile cannot close it under the thread.)"""
        if self._writer is None or not self._unsynced:
            return None
        self._unsynced = False
        self.syncs += 1
        return os.dup(self._writer)

    def _seal(self, sync: bool = False) -> None:
        # No fsync while running: it would stall the event loop for as long as the disk takes.
        if self._writer is not None:
            try:
                if sync:
                    os.fsync(self._writer)
            finally:
                os.close(self._writer)
                self._writer = None
        if self.segments:
            self.segments[-1].sealed = True

    # ------------------------------------------------------------ reading

    def read(self, max_messages: int) -> list[tuple[Record, Batch]]:
        """Whole records from the read position, about `max_messages` (at least one record)."""
        taken: list[tuple[Record, Batch]] = []
        count = 0
        while self.unread and count < max_messages:
            segment = self.segments[self._read_segment]
            if self._read_offset >= segment.end:
                self._close_reader(segment)
                self._read_segment += 1
                self._read_offset = 0
                continue
            if segment.reader is None:
                segment.reader = os.open(segment.path, os.O_RDONLY | os.O_CLOEXEC)
            head = os.pread(segment.reader, HEADER.size, self._read_offset)
            magic, flags, length, messages, _crc, size = _header_at(head, 0)
            payload = os.pread(segment.reader, length, self._read_offset + size)
            self._read_offset += size + length
            record = Record(segment, self._read_offset, messages)
            self._records.append(record)
            self.unread -= messages
            count += messages
            try:
                batches = decode_payload(magic, flags, payload, messages)
            except ValueError as exc:  # DamagedRecord, bad UTF-8, bad JSON in a former-format record
                # Its CRC passed, so this is no torn write: a bug worth the log line.
                log.error("disk log %s: a record at %s:%d cannot be read back (%s); its %d messages are skipped", self.directory, segment.path.name, self._read_offset - size - length, exc, messages)
                self.corrupt_bytes += size + length
                self.acknowledge(record, messages)
                continue
            taken.extend((record, batch) for batch in batches)
        return taken

    def _close_reader(self, segment: Segment) -> None:
        if segment.reader is not None:
            os.close(segment.reader)
            segment.reader = None

    # ------------------------------------------------------------ acknowledging

    def acknowledge(self, record: Record, count: int) -> None:
        """`count` of the record's messages are delivered or dropped for good."""
        record.acked += count
        self.held -= count
        records = self._records
        if not records or records[0].acked < records[0].count:
            return
        while records and records[0].acked >= records[0].count:
            done = records.popleft()
        self._advance_frontier(done.segment, done.end)

    def _advance_frontier(self, segment: Segment, offset: int) -> None:
        position = LEDGER.pack(segment.number, offset, 0)[:16]
        os.pwrite(self._ledger, position + struct.pack(">I", crc32(position)), 0)
        # Segments wholly behind the frontier go, the one being written excepted.
        while self.segments and self.segments[0] is not segment and self.segments[0].sealed:
            self._delete(self.segments.pop(0))
            self._read_segment -= 1
        first = self.segments[0] if self.segments else None
        if first is segment and first.sealed and offset >= first.end and self._read_segment > 0:
            self._delete(self.segments.pop(0))
            self._read_segment -= 1

    def _delete(self, segment: Segment) -> None:
        self._close_reader(segment)
        if segment.recyclable and self._spare is None:
            self._spare = self.directory / SPARE_NAME
            os.rename(segment.path, self._spare)
        else:
            segment.path.unlink(missing_ok=True)
        if self.budget is not None:
            self.budget.used -= segment.end

    def close(self) -> None:
        if self.budget is not None:
            self.budget.used -= self.bytes_on_disk
            self.budget = None
        try:
            self._seal(sync=True)
        except OSError as exc:
            log.error("disk log %s: closing its segment failed: %s", self.directory, exc)
        for segment in self.segments:
            self._close_reader(segment)
        for name in ("_ledger", "lock_fd"):
            descriptor = getattr(self, name)
            if descriptor is not None:
                if name == "_ledger":
                    os.fsync(descriptor)
                os.close(descriptor)
                setattr(self, name, None)

    # ------------------------------------------------------------ recovery

    def _recover(self) -> None:
        """Index what a previous run left from its frontier on: whole records count, a damaged
        tail is skipped, segments before the frontier go."""
        number, offset = read_ledger(self.directory)
        self._next_number = number + 1
        for path in sorted(self.directory.glob("segment-*.log")):
            found = segment_number(path)
            if found is None:
                continue
            self._next_number = max(self._next_number, found + 1)
            if found < number:
                path.unlink(missing_ok=True)
                continue
            start = offset if found == number else 0
            data = path.read_bytes()
            messages, end, clean = scan_segment(data, start)
            if not clean:
                self.corrupt_segments += 1
                self.corrupt_bytes += len(data) - end
                log.error("disk log %s: %d damaged or truncated bytes at offset %d skipped", path, len(data) - end, end)
            if not messages:
                path.unlink(missing_ok=True)
                continue
            segment = Segment(found, path)
            segment.end = end
            segment.sealed = True
            if not self.segments:
                self._read_offset = start
            self.segments.append(segment)
            self.unread += messages
        self.held = self.recovered = self.unread
        if self.budget is not None:
            self.budget.used += self.bytes_on_disk
        if self.recovered:
            log.info("disk log %s: %d messages from a previous run to deliver (at least once)", self.directory, self.recovered)
