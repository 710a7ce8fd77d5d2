"""The disk buffer behind `queue.when_full: spill`: an append-only log of segment files.

Each record is one chunk of messages: a header (magic, payload length, message count, CRC-32 of
the payload) and the chunk as JSON. Records are read back in order; a segment file is deleted
once the reader has passed it and every message read from it was delivered (or dropped for a
reason), so a crash at any point loses nothing that reached the disk: it is delivered again
after restart (at least once). A segment damaged or cut short is read up to the damage; the rest
is counted and skipped, never fatal.

Pure blocking file I/O: the delivery queue calls it from a worker thread, one call at a time.
"""

import errno
import fcntl
import logging
import os
import struct
import zlib
from pathlib import Path

import orjson

log = logging.getLogger("sidecar.spill")

MAGIC = b"SL"
HEADER = struct.Struct(">2sIII")  # magic, payload length, message count, crc32(payload)
SEGMENT_BYTES = 16 * 1024 * 1024


def buffered_in(directory: Path) -> tuple[int, int]:
    """Messages and bytes of whole records in a disk buffer's segments, read without taking
    the buffer (headers only, nothing changed): for a buffer that no backend owns."""
    messages = size = 0
    for path in sorted(directory.glob("segment-*.log")):
        try:
            with open(path, "rb") as segment:
                end = os.fstat(segment.fileno()).st_size
                position = 0
                while position + HEADER.size <= end:
                    segment.seek(position)
                    magic, length, count, _crc = HEADER.unpack(segment.read(HEADER.size))
                    if magic != MAGIC or position + HEADER.size + length > end:
                        break
                    position += HEADER.size + length
                    messages += count
                size += position
        except OSError:
            continue
    return messages, size


class Segment:
    def __init__(self, number: int, path: Path):
        self.number = number
        self.path = path
        self.end = 0  # bytes of whole, valid records
        self.unread = 0  # messages not yet handed to the reader
        self.outstanding = 0  # messages handed out, not yet acknowledged
        self.offset = 0  # the reader's position
        self.sealed = False  # no more appends


class BufferInUse(OSError):
    """Another process (or instance) holds this disk buffer's lock."""


class SpillLog:
    def __init__(self, directory: Path, max_bytes: int, segment_bytes: int = SEGMENT_BYTES):
        self.directory = directory
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.segments: list[Segment] = []
        self.corrupt_bytes = 0
        self.corrupt_segments = 0
        self._writer: int | None = None
        self.directory.mkdir(parents=True, exist_ok=True)
        # One owner at a time: two sidecars on one data_dir must not interleave records.
        self.lock_fd: int | None = os.open(self.directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.lock_fd)
            self.lock_fd = None
            raise BufferInUse(errno.EWOULDBLOCK, "in use by another sidecar on the same data_dir", str(self.directory)) from None
        self._recover()

    # ------------------------------------------------------------ state

    @property
    def unread(self) -> int:
        return sum(s.unread for s in self.segments)

    @property
    def held(self) -> int:
        """Messages a restart would find: not yet read, or read and not acknowledged."""
        return sum(s.unread + s.outstanding for s in self.segments)

    @property
    def bytes_on_disk(self) -> int:
        return sum(s.end for s in self.segments)

    def statistics(self) -> dict:
        return {
            "spilled_messages": self.unread,
            "spill_bytes": self.bytes_on_disk,
            "spill_segments": len(self.segments),
            "spill_corrupt_segments": self.corrupt_segments,
            "spill_corrupt_bytes": self.corrupt_bytes,
        }

    # ------------------------------------------------------------ writing

    def append(self, lines: list[bytes]) -> bool:
        """Write the JSON lines of one batch as one record (a JSON array of the messages); False
        (nothing written) when it would pass `max_bytes`."""
        payload = b"[" + b",".join(lines) + b"]"
        record = HEADER.pack(MAGIC, len(payload), len(lines), zlib.crc32(payload)) + payload
        if self.bytes_on_disk + len(record) > self.max_bytes:
            return False
        segment = self._writable(len(record))
        view = memoryview(record)
        while view:
            view = view[os.write(self._writer, view) :]
        segment.end += len(record)
        segment.unread += len(lines)
        return True

    def _writable(self, size: int) -> Segment:
        current = self.segments[-1] if self.segments else None
        if current is None or current.sealed or current.end + size > self.segment_bytes and current.end > 0:
            self._seal()
            number = current.number + 1 if current else 1
            segment = Segment(number, self.directory / f"segment-{number:012d}.log")
            self._writer = os.open(segment.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
            self.segments.append(segment)
            return segment
        return current

    def _seal(self) -> None:
        if self._writer is not None:
            os.fsync(self._writer)
            os.close(self._writer)
            self._writer = None
        if self.segments:
            self.segments[-1].sealed = True

    # ------------------------------------------------------------ reading

    def read(self, max_messages: int) -> list[tuple[int, list[dict]]]:
        """Up to about `max_messages` in order, as (segment number, messages) records."""
        taken: list[tuple[int, list[dict]]] = []
        count = 0
        for segment in self.segments:
            if count >= max_messages:
                break
            if not segment.unread:
                continue
            if segment is self.segments[-1] and not segment.sealed:
                # Reading the segment being written: seal it so it can go once delivered.
                self._seal()
            with segment.path.open("rb") as handle:
                handle.seek(segment.offset)
                while segment.offset < segment.end and count < max_messages:
                    header = handle.read(HEADER.size)
                    _magic, length, messages_in_record, _crc = HEADER.unpack(header)
                    messages = orjson.loads(handle.read(length))
                    segment.offset += HEADER.size + length
                    segment.unread -= messages_in_record
                    segment.outstanding += messages_in_record
                    taken.append((segment.number, messages))
                    count += messages_in_record
        self._delete_finished()
        return taken

    def acknowledge(self, counts: dict[int, int]) -> None:
        """Messages read from these segments are delivered or dropped for good."""
        for segment in self.segments:
            if segment.number in counts:
                segment.outstanding -= counts[segment.number]
        self._delete_finished()

    def _delete_finished(self) -> None:
        for segment in list(self.segments):
            if segment.sealed and segment.unread == 0 and segment.outstanding == 0 and segment.offset >= segment.end:
                segment.path.unlink(missing_ok=True)
                self.segments.remove(segment)

    def close(self) -> None:
        self._seal()
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None

    # ------------------------------------------------------------ recovery

    def _recover(self) -> None:
        """Index what a previous run left: whole records count, a damaged tail is skipped."""
        for path in sorted(self.directory.glob("segment-*.log")):
            try:
                number = int(path.stem.split("-", 1)[1])
            except ValueError:
                continue
            segment = Segment(number, path)
            segment.sealed = True
            data = path.read_bytes()
            position = 0
            while position + HEADER.size <= len(data):
                magic, length, count, crc = HEADER.unpack_from(data, position)
                start = position + HEADER.size
                payload = data[start : start + length]
                if magic != MAGIC or len(payload) != length or zlib.crc32(payload) != crc:
                    break
                position = start + length
                segment.unread += count
            segment.end = position
            if position < len(data):
                self.corrupt_segments += 1
                self.corrupt_bytes += len(data) - position
                log.error("disk buffer %s: %d damaged or truncated bytes at offset %d skipped", path, len(data) - position, position)
            if segment.unread:
                self.segments.append(segment)
            else:
                path.unlink(missing_ok=True)
        if self.segments:
            log.info("disk buffer %s: %d messages from a previous run to deliver", self.directory, self.unread)
