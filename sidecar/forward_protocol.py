"""Sans-IO server side of the Fluent forward protocol (Forward Protocol Specification v1): bytes
in; envelope messages, acks and handshake replies out. No sockets, no trio, no clock, no
randomness (the nonce and salt are given): `ForwardConnection` is a state machine that a
source feeds with what it read.

A connection is a stream of MessagePack values, each one frame:

- `nil`: a heartbeat, ignored;
- `[tag, time, record, option?]`: Message mode, one entry;
- `[tag, [[time, record], ...], option?]`: Forward mode;
- `[tag, bin|str, option?]`: PackedForward, the entries concatenated as MessagePack;
  CompressedPackedForward when `option.compressed` is `"gzip"` (one or more gzip members).

`time` is an integer or a float (seconds since the epoch), or EventTime (extension type 0:
big-endian uint32 seconds and uint32 nanoseconds); Fluent Bit's `[time, metadata]` pair is
read as its time. With a shared key, the connection starts with the handshake: the server
sends HELO (nonce, auth salt), the client PING (its digest of the key), the server PONG.

Whose fault: what breaks the framing of the stream (not MessagePack, a frame that is not an
array, a tag that is not a string, a mode that is none of the four, an option that is not a
map, a frame past `max_frame_size` or nested deeper than the unpacker's 1024 levels, a failed
handshake) raises `ForwardViolation` and ends the connection. What is wrong with one entry
(a record that is not a map, a bad time, invalid UTF-8, a field the envelope refuses) is a
`DecodeError` for that entry, and the frame and the connection go on. So is what is wrong with
a packed payload as a whole (bad gzip, more than `max_decompressed_size` once unzipped): its
entries are lost, counted, and the connection goes on.

Each frame with `option.chunk` gives an ack (`{"ack": chunk}`, encoded) for the source to send
once it has handed the frame's messages over (see sidecar/sources/forward.py).
"""

import datetime as dt
import hashlib
import hmac
import struct
import zlib

import attrs
import msgpack
import orjson

from sidecar.constants import DEFAULT_MAX_DEPTH, LEVEL_ALIASES, LEVELS, MAX_SOURCE_LENGTH, MESSAGE_TYPES
from sidecar.ingest import PythonChunk
from sidecar.message import MessageError, validate_message
from sidecar.protocol import DecodeError, ProtocolViolation, msgpack_object_end

DEFAULT_MAX_FRAME_SIZE = 8 * 1024 * 1024
DEFAULT_MAX_DECOMPRESSED_SIZE = 16 * 1024 * 1024
DEFAULT_CHUNK_SIZE = 1024 * 1024
# What a client that has not passed the handshake may make the server hold (a PING is ~300 bytes).
HANDSHAKE_FRAME_LIMIT = 64 * 1024

# Levels as logging libraries and syslog spell them, beyond the protocol's own aliases.
_LEVELS = {
    **{level: level for level in LEVELS},
    **LEVEL_ALIASES,
    "information": "info",
    "informational": "info",
    "notice": "info",
    "trace": "debug",
    "emerg": "critical",
    "emergency": "critical",
    "alert": "critical",
    "panic": "critical",
}
# Syslog severities 0..7 (emergency .. debug).
_SYSLOG_SEVERITIES = ("critical", "critical", "critical", "error", "warning", "info", "info", "debug")
# Time in range for RFC 3339 output: year 1 to year 9999.
_MIN_SECONDS = -62135596800
_MAX_SECONDS = 253402300799
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_STR_HEADERS = frozenset(range(0xA0, 0xC0)) | {0xD9, 0xDA, 0xDB}
_ARRAY_HEADERS = frozenset(range(0x90, 0xA0)) | {0xDC, 0xDD}
_MAP_HEADERS = frozenset(range(0x80, 0x90)) | {0xDE, 0xDF}


class ForwardViolation(ProtocolViolation):
    """The peer broke the forward protocol; the connection ends. `reply`: bytes to send it
    first (a failed handshake's PONG), else empty."""

    def __init__(self, reason: str, detail: str, messages=(), errors=(), reply: bytes = b""):
        super().__init__(reason, detail, messages, errors)
        self.reply = reply


@attrs.frozen
class EnvelopeMapping:
    """How a Fluent record becomes a message of this project's envelope (docs/configuration.md,
    "type: forward").

    A record that holds an envelope already (`type` one of the message types and `data` a map)
    is taken as it is: `source` from the tag when it has none, `timestamp` from the entry's time
    when it has none. Any other record becomes an `event`: `message` from the first of
    `message_keys` present, `level` from the first of `level_keys` that names a level, the other
    keys into `data` or `context` (`extra_into`). `source` is the tag without `tag_prefix`, or
    the record's `source_from` key when that is a non-empty string; characters that are not
    printable become `_`, it is cut to 200 characters, and an empty one is `fallback_source`.
    """

    fallback_source: str
    source_from: str = "tag"
    tag_prefix: str = ""
    message_keys: tuple[str, ...] = ("log", "message")
    level_keys: tuple[str, ...] = ("level", "severity")
    extra_into: str = "data"
    default_level: str = "info"

    def message_of(self, tag: str, timestamp: str, record: dict) -> dict:
        """The envelope message of one entry's record (which it may take over and change)."""
        kind = record.get("type")
        if type(kind) is str and kind in MESSAGE_TYPES and type(record.get("data")) is dict:
            if record.get("source") is None:
                record["source"] = self.source_of(tag, record)
            if record.get("timestamp") is None:
                record["timestamp"] = timestamp
            return record
        source = self.source_of(tag, record)
        if self.source_from != "tag" and type(record.get(self.source_from)) is str and record[self.source_from]:
            del record[self.source_from]  # it is the source now
        text = None
        for key in self.message_keys:
            if key in record:
                value = record.pop(key)
                text = value if type(value) is str else _json_text(value)
                break
        level = None
        for key in self.level_keys:
            if key in record:
                level = level_of(record[key])
                if level is not None:
                    del record[key]
                    break
        if text is None:
            text = _json_text(record)
        data = {"level": level or self.default_level, "message": text}
        message = {"source": source, "type": "event", "timestamp": timestamp, "data": data}
        if record:
            if self.extra_into == "data":
                for key, value in record.items():
                    data[f"_{key}" if key == "level" or key == "message" else key] = value
            else:
                message["context"] = record
        return message

    def source_of(self, tag: str, record: dict) -> str:
        if self.source_from != "tag":
            value = record.get(self.source_from)
            if type(value) is str and value:
                return self._valid_source(value)
        if self.tag_prefix and tag.startswith(self.tag_prefix):
            tag = tag[len(self.tag_prefix) :]
        return self._valid_source(tag)

    def _valid_source(self, name: str) -> str:
        if len(name) > MAX_SOURCE_LENGTH:
            name = name[:MAX_SOURCE_LENGTH]
        if not name.isprintable():
            name = "".join(c if c.isprintable() else "_" for c in name)
        return name or self.fallback_source


def level_of(value) -> str | None:
    """The protocol level a record's level value names (any case; syslog severities 0-7), or
    None."""
    if type(value) is str:
        return _LEVELS.get(value.lower())
    if type(value) is int and 0 <= value <= 7:
        return _SYSLOG_SEVERITIES[value]
    return None


def _json_text(value) -> str:
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return orjson.dumps(_jsonable(value)).decode()


def _jsonable(value):
    """`value` with what MessagePack carries and JSON cannot made into JSON: binary as its
    UTF-8 text, a MessagePack timestamp as RFC 3339; MessageError for the rest (binary that
    is not UTF-8, extension types, keys that are not strings)."""
    kind = type(value)
    if kind is dict:
        out = {}
        for key, item in value.items():
            if type(key) is bytes:
                key = _text(key)
            if type(key) is not str:
                raise MessageError("invalid_key", f"key {str(key)[:40]!r} is not a string")
            out[key] = _jsonable(item)
        return out
    if kind is list:
        return [_jsonable(item) for item in value]
    if kind is bytes:
        return _text(value)
    if kind is msgpack.Timestamp:
        return _format_time(value.seconds, value.nanoseconds)
    if kind is msgpack.ExtType:
        raise MessageError("invalid_field", f"MessagePack extension type {value.code} has no JSON form")
    return value


def _text(data: bytes) -> str:
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise MessageError("invalid_utf8", "a binary value is not UTF-8 text") from None


def _format_time(seconds: int, nanoseconds: int) -> str:
    moment = _EPOCH + dt.timedelta(seconds=seconds)
    return f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}T{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d}.{nanoseconds // 1_000_000:03d}Z"


class _Undecodable:
    """A value inside a frame the unpacker could not build; the frame's framing is intact."""

    __slots__ = ("reason", "detail")

    def __init__(self, reason: str, detail: str):
        self.reason = reason
        self.detail = detail


def _undecodable(exc: Exception) -> _Undecodable:
    if isinstance(exc, UnicodeDecodeError):
        reason = "invalid_utf8"
    elif isinstance(exc, TypeError):  # an array or a map as a map key: unhashable
        reason = "invalid_key"
    elif isinstance(exc, msgpack.StackError):
        reason = "too_deep"
    else:
        reason = "invalid_msgpack"
    return _Undecodable(reason, f"{type(exc).__name__}: {exc}")


def _unpack(data, raw: bool = False):
    """One value, or an `_Undecodable` saying why not."""
    try:
        return msgpack.unpackb(data, raw=raw, strict_map_key=False)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        return _undecodable(exc)


def _array_header(data: bytes, at: int) -> tuple[int, int] | None:
    """(items, offset of the first) of the array whose header is at `at`, else None."""
    byte = data[at]
    if 0x90 <= byte <= 0x9F:
        return byte & 0x0F, at + 1
    if byte == 0xDC:
        return int.from_bytes(data[at + 1 : at + 3], "big"), at + 3
    if byte == 0xDD:
        return int.from_bytes(data[at + 1 : at + 5], "big"), at + 5
    return None


def _item_bounds(data: bytes, start: int, count: int) -> list[tuple[int, int]]:
    """Where each of `count` values that follow one another from `start` begins and ends."""
    skipper = msgpack.Unpacker(max_buffer_size=max(len(data), 1))
    skipper.feed(memoryview(data)[start:])
    bounds = []
    for _ in range(count):
        begin = skipper.tell()
        skipper.skip()
        bounds.append((start + begin, start + skipper.tell()))
    return bounds


def _frame_items(frame: bytes) -> list | None:
    """A frame that is an array, as the list of its items; None when it is not an array.

    The whole frame is one `unpackb` when it can be. When it cannot (invalid UTF-8 somewhere,
    a map key that is an array, a PackedForward payload sent as a `str` that is not UTF-8),
    each item is read alone, and a Forward mode's entries one by one, so that what the
    unpacker cannot build costs only the entry it is in: it stands there as an `_Undecodable`.
    A packed payload is always handed on as bytes."""
    whole = _unpack(frame)
    if type(whole) is list:
        if len(whole) >= 2 and type(whole[1]) is str:
            whole[1] = whole[1].encode()  # a packed payload sent as str: its bytes, exactly
        return whole
    header = _array_header(frame, 0)
    if header is None:
        return None
    count, first = header
    if not 2 <= count <= 4:
        return [None] * count  # the wrong shape whatever it holds: not worth reading
    bounds = _item_bounds(frame, first, count)
    items = []
    for index, (begin, end) in enumerate(bounds):
        if index == 1 and frame[begin] in _STR_HEADERS:
            items.append(_unpack(frame[begin:end], raw=True))
        elif index == 1 and frame[begin] in _ARRAY_HEADERS:
            entries, entries_start = _array_header(frame, begin)
            items.append([_unpack(frame[b:e]) for b, e in _item_bounds(frame, entries_start, entries)])
        else:
            items.append(_unpack(frame[begin:end]))
    return items


def _packed_entries(payload: bytes):
    """The entries of a PackedForward payload, each alone, so that one the unpacker cannot
    build costs only itself. Entries are found by skipping (in C); nesting past the
    unpacker's stack is stepped over by structure (in Python); broken framing or a payload
    that ends inside an entry ends the payload with an `_Undecodable` for it."""
    size = len(payload)
    skipper = msgpack.Unpacker(max_buffer_size=max(size, 1))
    skipper.feed(payload)
    at = 0
    while at < size:
        try:
            skipper.skip()
            end = skipper.tell()
        except msgpack.OutOfData:
            yield _Undecodable("truncated", f"the payload ends {size - at} bytes into an entry")
            return
        except msgpack.StackError:
            # Nesting the skipper cannot follow: from here on, entries are found by structure.
            yield from _packed_entries_by_structure(payload, at)
            return
        except (ValueError, msgpack.UnpackException) as exc:
            yield _Undecodable("invalid_msgpack", f"broken MessagePack in the payload: {type(exc).__name__}: {exc}")
            return
        yield _unpack(payload[at:end])
        at = end


def _packed_entries_by_structure(payload: bytes, at: int):
    """As `_packed_entries`, stepping over each entry in Python: slower, but with no limit on
    nesting (an entry too deep to build is then `too_deep`, alone)."""
    size = len(payload)
    while at < size:
        try:
            end = msgpack_object_end(payload, at)
        except ValueError as exc:
            yield _Undecodable("invalid_msgpack", f"broken MessagePack in the payload: {exc}")
            return
        if end is None:
            yield _Undecodable("truncated", f"the payload ends {size - at} bytes into an entry")
            return
        yield _unpack(payload[at:end])
        at = end


class GzipError(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def gunzip(data: bytes, limit: int) -> bytes:
    """One or more concatenated gzip members, decompressed; GzipError `too_large` past `limit`
    bytes (checked while inflating, so a small bomb never grows in memory), `invalid_gzip` for
    data that is not gzip or ends inside a member."""
    out = bytearray()
    while data:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            out += inflater.decompress(data, limit - len(out) + 1)
        except zlib.error as exc:
            raise GzipError("invalid_gzip", f"not gzip: {exc}") from None
        if len(out) > limit or inflater.unconsumed_tail:
            raise GzipError("too_large", f"the entries are more than {limit} bytes once decompressed")
        if not inflater.eof:
            raise GzipError("invalid_gzip", "the gzip data ends inside a member")
        data = inflater.unused_data
        if not data.strip(b"\x00"):  # padding after the last member, as gzip(1) allows
            break
    return bytes(out)


@attrs.frozen
class SharedKeyAuth:
    """The handshake's secrets: the shared key and, when any, the users' passwords
    (username -> password). `hostname` is the server's, sent in PONG."""

    shared_key: bytes = attrs.field(repr=False)
    hostname: str
    users: dict = attrs.field(factory=dict, repr=False)


def shared_key_digest(salt: bytes, hostname: bytes, nonce: bytes, key: bytes) -> str:
    return hashlib.sha512(salt + hostname + nonce + key).hexdigest()


def password_digest(auth_salt: bytes, username: bytes, password: bytes) -> str:
    return hashlib.sha512(auth_salt + username + password).hexdigest()


@attrs.define
class ForwardReceived:
    """What one `receive_data` call completed. `reply`: bytes to send now (the handshake's
    PONG); `messages` and `errors`: for the intake; `acks`: bytes to send once the messages
    are handed over."""

    messages: PythonChunk = attrs.field(factory=PythonChunk)
    errors: list = attrs.field(factory=list)
    acks: list = attrs.field(factory=list)
    reply: bytes = b""
    size: int = 0  # bytes decoded: the frames, and what their packed payloads unzipped to


class ForwardConnection:
    """One connection's server side. Feed it with `receive_data`; send `greeting()` first.

    `nonce` and `auth_salt` (16 random bytes each, from the caller) are used only with `auth`;
    `chunk_size` bounds the bytes of frames one call decodes (see `receive_data`).
    `entries_seen` counts the entries read, valid or not, as `messages_seen` of the TCP
    decoder does; error details number them from 1.
    """

    def __init__(
        self,
        mapping: EnvelopeMapping,
        *,
        auth: SharedKeyAuth | None = None,
        nonce: bytes = b"",
        auth_salt: bytes = b"",
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        max_decompressed_size: int = DEFAULT_MAX_DECOMPRESSED_SIZE,
        max_depth: int = DEFAULT_MAX_DEPTH,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ):
        self.mapping = mapping
        self.auth = auth
        self.nonce = nonce
        self.auth_salt = auth_salt if auth is not None and auth.users else b""
        self.max_frame_size = max_frame_size
        self.max_decompressed_size = max_decompressed_size
        self.max_depth = max_depth
        self.chunk_size = chunk_size
        self.authenticated = auth is None
        self.username: str | None = None
        self.entries_seen = 0
        self.frames_seen = 0
        self._unfed = bytearray()  # received, not yet given to the skipper
        self._stopped_early = False
        self._buffer = bytearray()  # from where the next frame starts, and what follows
        self._buffer_offset = 0  # the stream's position of _buffer[0]
        self._frame_start = 0  # in _buffer, while frames are being taken from it
        # Finds where each frame ends (skipping is in C and builds nothing); the frame itself
        # is then decoded from `_buffer`.
        self._skipper = msgpack.Unpacker(max_buffer_size=2 * max_frame_size)
        self._violation: ForwardViolation | None = None
        self._second = None  # the last entry time's whole second, and its text
        self._second_text = ""

    def greeting(self) -> bytes:
        """What the server sends when the connection opens: HELO with a shared key, else
        nothing."""
        if self.auth is None:
            return b""
        return msgpack.packb(["HELO", {"nonce": self.nonce, "auth": self.auth_salt, "keepalive": True}], use_bin_type=True)

    def receive_data(self, data: bytes) -> ForwardReceived:
        """The frames `data` completes, up to `chunk_size` bytes of them (frames and what their
        packed payloads unzip to; a frame is never split): while `pending`, `receive_more()`
        returns the next such chunk, so that a read of many small compressed frames never
        becomes one huge chunk of messages. Raises ForwardViolation (with what was whole before
        it) when the stream breaks; after that, every call raises it again."""
        if self._violation is not None:
            raise self._violation
        received = ForwardReceived()
        if data:
            if self.frames_seen == 0 and not self._buffer and not self._unfed:
                self._check_first_byte(data[0], received)
            self._unfed += data
        return self._receive(received)

    @property
    def buffered(self) -> int:
        """Bytes held that no complete frame has taken yet (0 at a frame boundary)."""
        return len(self._buffer) - self._frame_start + len(self._unfed)

    @property
    def pending(self) -> bool:
        """Whether bytes already received may complete more frames: call `receive_more()`."""
        return self._stopped_early or bool(self._unfed)

    def receive_more(self) -> ForwardReceived:
        """The next chunk of what was received already (see `receive_data`)."""
        return self.receive_data(b"")

    def receive_eof(self) -> ForwardReceived:
        """The peer closed (call once nothing is `pending`): a frame cut off by the end of the
        stream is one `truncated` error."""
        received = ForwardReceived()
        if self._violation is None and self._buffer:
            received.errors.append(DecodeError("truncated", f"frame {self.frames_seen + 1}: the stream ended {len(self._buffer)} bytes into it"))
            self._buffer = bytearray()
        return received

    def _receive(self, received: ForwardReceived) -> ForwardReceived:
        # Fed to the skipper in pieces no larger than a frame, so that many small frames read at
        # once never fill its buffer, which holds two frames at the limit.
        while True:
            self._stopped_early = not self._frames(received)
            if self._stopped_early or not self._unfed:
                return received
            piece = bytes(self._unfed[: self.max_frame_size])
            del self._unfed[: self.max_frame_size]
            self._buffer += piece
            self._skipper.feed(piece)

    def _fail(self, received: ForwardReceived, reason: str, detail: str, reply: bytes = b""):
        self._violation = ForwardViolation(reason, detail, received.messages, received.errors, reply)
        raise self._violation

    def _check_first_byte(self, byte: int, received: ForwardReceived) -> None:
        if byte == 0x7B or byte == 0x5B:
            self._fail(received, "unknown_format", f"first byte {chr(byte)!r}: this source reads the forward protocol in MessagePack, not JSON; JSON lines go to a source of type tcp")
        if byte in _MAP_HEADERS:
            self._fail(received, "unknown_format", "first byte is a MessagePack map: this is a Fluent forward source ([tag, time, record] arrays); the SDKs' MessagePack maps go to a source of type tcp")

    def _frames(self, received: ForwardReceived) -> bool:
        """Decode the complete frames in `_buffer` until `chunk_size` is reached; whether all
        were (False: stopped early, more may be complete)."""
        skipper = self._skipper
        buffer = self._buffer
        while True:
            if received.size >= self.chunk_size:
                self._trim()
                return False
            try:
                skipper.skip()
            except msgpack.OutOfData:
                break
            except msgpack.StackError:
                self._fail(received, "too_deep", f"frame {self.frames_seen + 1} nests deeper than 1024 levels")
            except (ValueError, msgpack.UnpackException) as exc:
                self._fail(received, "invalid_msgpack", f"broken MessagePack after frame {self.frames_seen}: {type(exc).__name__}: {exc}")
            # tell() is exact after a value was skipped: where the next frame starts.
            end = skipper.tell() - self._buffer_offset
            frame = bytes(buffer[self._frame_start : end])
            self._frame_start = end
            self.frames_seen += 1
            if len(frame) > self.max_frame_size:
                self._fail(received, "too_large", f"frame {self.frames_seen} is larger than {self.max_frame_size} bytes")
            received.size += len(frame)
            self._frame(frame, received)
        self._trim()
        # What is left is one frame, incomplete.
        limit = self.max_frame_size if self.authenticated else min(self.max_frame_size, HANDSHAKE_FRAME_LIMIT)
        if len(buffer) > limit:
            self._fail(received, "too_large", f"frame {self.frames_seen + 1} is larger than {limit} bytes{'' if self.authenticated else ' (before the handshake)'}")
        return True

    def _trim(self) -> None:
        """Drop the frames taken from `_buffer`."""
        if self._frame_start:
            del self._buffer[: self._frame_start]
            self._buffer_offset += self._frame_start
            self._frame_start = 0

    def _frame(self, frame: bytes, received: ForwardReceived) -> None:
        if not self.authenticated:
            self._handshake(frame, received)
            return
        if frame == b"\xc0":  # nil: a heartbeat
            return
        number = self.frames_seen
        items = _frame_items(frame)
        if items is None:
            self._fail(received, "not_an_array", f"frame {number} is not an array (first byte 0x{frame[0]:02x}): a frame is [tag, time, record], [tag, entries] or [tag, packed entries]")
        if not 2 <= len(items) <= 4:
            self._fail(received, "invalid_frame", f"frame {number} has {len(items)} items: a frame is [tag, time, record, option?], [tag, entries, option?] or [tag, packed entries, option?]")
        tag, body = items[0], items[1]
        if type(tag) is not str:
            self._fail(received, "invalid_tag", f"frame {number}: the tag must be a string, got {_kind(tag)}")
        kind = type(body)
        if kind is list or kind is bytes:
            if len(items) > 3:
                self._fail(received, "invalid_frame", f"frame {number}: a {'Forward' if kind is list else 'PackedForward'} frame has 2 or 3 items, got {len(items)}")
            option = items[2] if len(items) == 3 else None
        elif kind is int or kind is float or kind is msgpack.ExtType or kind is msgpack.Timestamp:
            if len(items) < 3:
                self._fail(received, "invalid_frame", f"frame {number}: a Message frame is [tag, time, record, option?], got 2 items")
            option = items[3] if len(items) == 4 else None
        else:
            self._fail(received, "unknown_mode", f"frame {number}: the second item is {_kind(body)}: neither a time (Message), an array (Forward) nor bin/str (PackedForward)")
        if option is not None and type(option) is not dict:
            self._fail(received, "invalid_option", f"frame {number}: the option must be a map, got {_kind(option)}")
        option = option or {}
        size = option.get("size")
        size = size if type(size) is int and size > 0 else None
        lost = 0
        if kind is list:
            entries = body
        elif kind is bytes:
            entries = _packed_entries(body)
            if option.get("compressed") == "gzip":
                try:
                    payload = gunzip(body, self.max_decompressed_size)
                    received.size += len(payload)
                    entries = _packed_entries(payload)
                except GzipError as exc:
                    lost = size or 1
                    received.errors.append(DecodeError(exc.reason, f"frame {number}: {exc.detail}; its {size or 'unknown number of'} entries are lost", count=lost))
                    entries = ()
        else:
            entries = ([body, items[2]],)
        read = self._entries(tag, entries, received)
        if size is not None and not lost and size > read:
            received.errors.append(DecodeError("missing_entries", f"frame {number}: option.size says {size} entries, {read} were there", count=size - read))
        chunk = option.get("chunk")
        if chunk is not None:
            received.acks.append(msgpack.packb({"ack": chunk}, use_bin_type=True))

    def _entries(self, tag: str, entries, received: ForwardReceived) -> int:
        """Each entry mapped to a message and validated, or its error; how many were read."""
        append = received.messages.append
        errors = received.errors
        message_of = self._message_of
        read = 0
        for entry in entries:
            read += 1
            self.entries_seen += 1
            try:
                append(message_of(tag, entry))
            except MessageError as exc:
                errors.append(DecodeError(exc.reason, f"entry {self.entries_seen}: {exc.detail}"))
            except Exception as exc:  # a bug in mapping or validation costs this entry, not the stream
                errors.append(DecodeError("internal_error", f"entry {self.entries_seen}: {type(exc).__name__}: {exc}", exception=exc))
        return read

    def _message_of(self, tag: str, entry) -> dict:
        if type(entry) is not list or len(entry) != 2:
            if type(entry) is _Undecodable:
                raise MessageError(entry.reason, entry.detail)
            raise MessageError("invalid_entry", f"an entry must be [time, record], got {_kind(entry)}")
        time, record = entry
        if type(record) is not dict:
            if type(record) is _Undecodable:
                raise MessageError(record.reason, record.detail)
            raise MessageError("not_an_object", f"the record must be a map, got {_kind(record)}")
        message = self.mapping.message_of(tag, self._timestamp(time), record)
        # MessagePack carries what JSON cannot (binary, non-string keys, extension types);
        # every backend writes JSON, so it is made JSON here, or refused, not at delivery.
        try:
            orjson.dumps(message)
        except TypeError:
            message = _jsonable(message)
        validate_message(message, self.max_depth)
        return message

    def _timestamp(self, value) -> str:
        kind = type(value)
        if kind is list and len(value) == 2 and type(value[1]) is dict:  # Fluent Bit's [time, metadata]
            value = value[0]
            kind = type(value)
        if kind is int:
            seconds, nanoseconds = value, 0
        elif kind is msgpack.ExtType:
            if value.code != 0 or len(value.data) != 8:
                raise MessageError("invalid_timestamp", f"time: extension type {value.code} of {len(value.data)} bytes is not EventTime (type 0, 8 bytes)")
            seconds, nanoseconds = struct.unpack(">II", value.data)
        elif kind is float:
            if value - value != 0.0:
                raise MessageError("invalid_timestamp", f"time {value} is not a finite number")
            # To the microsecond, as the other sources read epoch floats (datetime rounds so),
            # so that 1700000000.001 is .001 and not .000999927.
            seconds = int(value // 1)
            microseconds = round((value - seconds) * 1e6)
            if microseconds == 1_000_000:
                seconds, microseconds = seconds + 1, 0
            nanoseconds = microseconds * 1000
        elif kind is msgpack.Timestamp:
            seconds, nanoseconds = value.seconds, value.nanoseconds
        else:
            raise MessageError("invalid_timestamp", f"time must be an integer, a float or EventTime, got {_kind(value)}")
        if not _MIN_SECONDS <= seconds <= _MAX_SECONDS or nanoseconds >= 1_000_000_000:
            raise MessageError("invalid_timestamp", f"time {seconds}.{nanoseconds:09d} is out of range")
        if seconds != self._second:
            moment = _EPOCH + dt.timedelta(seconds=seconds)
            self._second = seconds
            self._second_text = f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}T{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d}"
        return f"{self._second_text}.{nanoseconds // 1_000_000:03d}Z"

    def _handshake(self, frame: bytes, received: ForwardReceived) -> None:
        auth = self.auth
        ping = _unpack(frame, raw=True)
        if type(ping) is not list or not ping or ping[0] != b"PING":
            self._fail(received, "auth_required", "this source needs the shared-key handshake: a PING answering HELO before any event")
        if len(ping) != 6 or any(type(value) is not bytes for value in ping[1:]):
            self._refuse_ping(received, "malformed PING: expected [PING, hostname, salt, digest, username, password]", b"?")
        _, hostname, salt, digest, username, password = ping
        if not hmac.compare_digest(digest, shared_key_digest(salt, hostname, self.nonce, auth.shared_key).encode()):
            self._refuse_ping(received, "shared_key mismatch", hostname)
        if auth.users:
            name = username.decode("utf-8", "replace")
            known = auth.users.get(name)
            if known is None or not hmac.compare_digest(password, password_digest(self.auth_salt, username, known).encode()):
                self._refuse_ping(received, "username/password mismatch", hostname)
            self.username = name
        self.authenticated = True
        own = auth.hostname.encode()
        received.reply += msgpack.packb(["PONG", True, "", auth.hostname, shared_key_digest(salt, own, self.nonce, auth.shared_key)])

    def _refuse_ping(self, received: ForwardReceived, reason: str, hostname: bytes):
        pong = msgpack.packb(["PONG", False, reason, self.auth.hostname, ""])
        client = hostname.decode("utf-8", "replace")[:100]
        self._fail(received, "auth_failed", f"handshake failed: {reason} (client hostname {client!r})", reply=pong)


def _kind(value) -> str:
    if value is None:
        return "nil"
    if type(value) is _Undecodable:
        return f"undecodable ({value.reason})"
    if type(value) is msgpack.ExtType:
        return f"extension type {value.code}"
    return type(value).__name__
