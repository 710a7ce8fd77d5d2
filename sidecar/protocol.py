"""Sans-IO decoder for wire protocol v1: bytes in, validated messages and errors out.

No sockets, no trio: a source feeds `receive_data()` with whatever it read and gets back
whole messages. The format is detected from the first byte of the stream: `{` is JSON lines,
a MessagePack map header is a MessagePack stream. Work is done per chunk, not per byte: a chunk
is split at its last newline and every complete line in it is parsed in one loop, and only the
incomplete tail is kept, so the cost is linear in the bytes read.
"""

import enum
import hmac
import re

import attrs
import msgpack
import orjson

from sidecar.constants import DEFAULT_MAX_DEPTH, DEFAULT_MAX_MESSAGE_SIZE
from sidecar.ingest import NATIVE_AVAILABLE, Chunk, PythonChunk, decode_natively, native_chunk
from sidecar.message import MessageError, validate_message


class StreamFormat(enum.Enum):
    JSON_LINES = "json"
    MSGPACK = "msgpack"


def detect_format(first_byte: int) -> StreamFormat | None:
    if first_byte == 0x7B:  # "{"
        return StreamFormat.JSON_LINES
    if 0x80 <= first_byte <= 0x8F or first_byte in (0xDE, 0xDF):  # fixmap, map16, map32
        return StreamFormat.MSGPACK
    return None


_HTTP_METHODS = (b"GET ", b"POST ", b"PUT ", b"HEAD ", b"DELETE ", b"OPTIONS ", b"PATCH ", b"CONNECT ")
_SYSLOG_PRI = re.compile(rb"(\d{1,5} )?<\d{1,3}>")  # octet-counted (RFC 6587) or not
_STREAM_FORMATS = "this port takes JSON lines or MessagePack maps (docs/protocol.md)"


def foreign_protocol(start: bytes) -> str:
    """Why a stream whose format is not ours is refused, naming the protocol its first bytes
    look like, and where that client should go instead."""
    first = start[0]
    if 0x90 <= first <= 0x9F or first in (0xDC, 0xDD):
        return f"a MessagePack array: this looks like Fluent forward ([tag, time, record] or [tag, entries]): configure a source of type forward (default port 24224) and point the client there; {_STREAM_FORMATS}"
    if _SYSLOG_PRI.match(start):
        return f"'<PRI>': this looks like syslog, which is not a source type; {_STREAM_FORMATS}"
    if start.startswith(b"PRI * HTTP/2"):
        return f"an HTTP/2 preface: this looks like gRPC (an OTLP/gRPC exporter?), which is not a source type: send OTLP/HTTP (protocol http/protobuf) to a source of `type: otlp`; {_STREAM_FORMATS}"
    if start.startswith(_HTTP_METHODS):
        return f"an HTTP request: the sidecar's HTTP view is on its own port (http:, 127.0.0.1:17001 by default), and OTLP/HTTP goes to a source of `type: otlp` (127.0.0.1:4318 by default); {_STREAM_FORMATS}"
    if first == 0x16 and len(start) > 1 and start[1] == 0x03:
        return f"a TLS handshake: this port is plain TCP (keep it on loopback, or a Unix socket); {_STREAM_FORMATS}"
    return f"neither '{{' (JSON lines) nor a MessagePack map; {_STREAM_FORMATS}"


@attrs.frozen
class DecodeError:
    """Messages were rejected (one, unless `count` says more); the stream goes on. `reason` is a
    short metric label. `exception` is set for `internal_error`: a bug met while decoding, which
    costs the messages it was decoding and nothing else."""

    reason: str
    detail: str
    count: int = 1
    exception: BaseException | None = attrs.field(default=None, eq=False, repr=False)


def _json_error(exc: orjson.JSONDecodeError) -> str:
    """The reason label for a line orjson refused: most are plain invalid JSON, but two are
    limits the other paths name the same way."""
    text = str(exc)
    if text.startswith("depth limit exceeded"):
        return "too_deep"
    if text.startswith("number is infinity"):
        return "not_finite"
    return "invalid_json"


def _json_incompatible(exc: TypeError) -> str:
    """The reason label for a decoded MessagePack message that JSON cannot carry."""
    return "invalid_key" if "key must be str" in str(exc) else "invalid_field"


def _msgpack_error(exc: Exception) -> str:
    """The reason label for a MessagePack message the unpacker could frame but not build."""
    if isinstance(exc, UnicodeDecodeError):
        return "invalid_utf8"
    if isinstance(exc, TypeError):  # an array or a map as a map key: unhashable
        return "invalid_key"
    if isinstance(exc, msgpack.StackError):
        return "too_deep"
    return "invalid_msgpack"


# MessagePack headers by first byte from 0xc4 on: (size of the length or count field, what it
# counts). "payload": that many bytes follow; "ext": that many plus the type byte; "items" and
# "pairs": that many values (twice as many for a map) follow; a size of 0 with "fixed" means
# the byte count in the third place follows the header byte.
_MSGPACK_HEADERS = {
    0xC4: (1, "payload", 0), 0xC5: (2, "payload", 0), 0xC6: (4, "payload", 0),
    0xC7: (1, "ext", 0), 0xC8: (2, "ext", 0), 0xC9: (4, "ext", 0),
    0xCA: (0, "fixed", 4), 0xCB: (0, "fixed", 8),
    0xCC: (0, "fixed", 1), 0xCD: (0, "fixed", 2), 0xCE: (0, "fixed", 4), 0xCF: (0, "fixed", 8),
    0xD0: (0, "fixed", 1), 0xD1: (0, "fixed", 2), 0xD2: (0, "fixed", 4), 0xD3: (0, "fixed", 8),
    0xD4: (0, "fixed", 2), 0xD5: (0, "fixed", 3), 0xD6: (0, "fixed", 5), 0xD7: (0, "fixed", 9), 0xD8: (0, "fixed", 17),
    0xD9: (1, "payload", 0), 0xDA: (2, "payload", 0), 0xDB: (4, "payload", 0),
    0xDC: (2, "items", 0), 0xDD: (4, "items", 0),
    0xDE: (2, "pairs", 0), 0xDF: (4, "pairs", 0),
}


def msgpack_object_end(buffer: bytes, start: int) -> int | None:
    """Where the MessagePack object at `start` ends, from its structure alone: no string is
    decoded, no key hashed, and nesting of any depth takes no stack. None if `buffer` ends
    before it does; ValueError for a byte that starts no object (0xc1), when framing is lost.
    This is how the decoder steps over one message the unpacker could not build."""
    at = start
    remaining = 1
    size = len(buffer)
    while remaining:
        if at >= size:
            return None
        byte = buffer[at]
        remaining -= 1
        at += 1
        if byte <= 0x7F or byte >= 0xE0 or byte in (0xC0, 0xC2, 0xC3):
            continue
        if byte <= 0x8F:
            remaining += 2 * (byte & 0x0F)
        elif byte <= 0x9F:
            remaining += byte & 0x0F
        elif byte <= 0xBF:
            at += byte & 0x1F
        elif byte == 0xC1:
            raise ValueError(f"byte 0xc1 at offset {at - 1} starts no MessagePack object")
        else:
            field, kind, fixed = _MSGPACK_HEADERS[byte]
            if kind == "fixed":
                at += fixed
                continue
            if at + field > size:
                return None
            count = int.from_bytes(buffer[at : at + field], "big")
            at += field
            if kind == "payload":
                at += count
            elif kind == "ext":
                at += count + 1
            elif kind == "items":
                remaining += count
            else:
                remaining += 2 * count
    return at if at <= size else None


class ProtocolViolation(Exception):
    """The peer broke the framing; nothing more can be read from this stream.

    `messages` (a PythonChunk) and `errors` hold what was whole in the same chunk before the break.
    """

    def __init__(self, reason: str, detail: str, messages=(), errors=()):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.messages = PythonChunk(messages)
        self.errors = list(errors)


def _accept(message, number: int, messages: list[dict], errors: list[DecodeError], max_depth: int) -> bool:
    """A decoded value: appended to `messages` if it is a valid protocol message, else its
    error to `errors`. Returns whether it was accepted."""
    if type(message) is not dict:
        errors.append(DecodeError("not_an_object", f"message {number}: expected an object, got {type(message).__name__}"))
        return False
    try:
        validate_message(message, max_depth)
    except MessageError as exc:
        errors.append(DecodeError(exc.reason, f"message {number}: {exc.detail}"))
        return False
    except Exception as exc:  # a bug in validation costs this message, not the stream
        errors.append(DecodeError("internal_error", f"message {number}: {type(exc).__name__}: {exc}", exception=exc))
        return False
    messages.append(message)
    return True


class StreamDecoder:
    """Decode one connection's byte stream.

    `receive_data()` returns `(messages, errors)`: the valid messages completed by this chunk, in
    order, as a chunk of the ingest interface (sidecar.ingest), and a DecodeError for each
    rejected one. The chunk is a PythonChunk (a list of the message dicts), or with `native` a
    NativeChunk when the native decoder took the lines (see `_decode_natively`): the same
    messages, validated, still as bytes, for the correlator to enrich and encode in one call.
    This is where a chunk's path is chosen.
    It raises ProtocolViolation when the stream cannot be framed any more (unknown format,
    broken or oversized MessagePack); after that every call raises it again. Anything else is
    wrong with one message alone, and costs that message alone: a MessagePack message the
    unpacker cannot build (invalid UTF-8, an array as a key, nesting past its stack) is stepped
    over by its structure, and the stream goes on after it.
    """

    def __init__(self, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE, *, native: bool = False, max_depth: int = DEFAULT_MAX_DEPTH):
        self.max_message_size = max_message_size
        self.max_depth = max_depth
        # JSON lines through the native decoder when it is built (see `_decode_natively`).
        self.native = native and NATIVE_AVAILABLE
        self.format: StreamFormat | None = None
        self.messages_seen = 0
        self._tail = bytearray()
        self._skipping_oversize_line = False
        self._unpacker: msgpack.Unpacker | None = None
        # MessagePack bytes fed to the unpacker from where its next message starts (at its
        # position `_message_start`: its tell() is exact only right after it yields a message).
        self._unconsumed = b""
        self._message_start = 0
        # A message the unpacker failed on, still incomplete: skipped once its end arrives.
        self._bad_message: DecodeError | None = None
        self._violation: ProtocolViolation | None = None

    @property
    def buffered(self) -> int:
        """Bytes held of a message not complete yet (0 at a message boundary)."""
        return len(self._tail) + len(self._unconsumed)

    def receive_data(self, data: bytes) -> tuple[Chunk, list[DecodeError]]:
        if self._violation is not None:
            raise self._violation
        if not data:
            return PythonChunk(), []
        if self.format is None:
            self.format = detect_format(data[0])
            if self.format is None:
                self._fail("unknown_format", f"first byte 0x{data[0]:02x} is {foreign_protocol(bytes(data[:16]))}")
            if self.format is StreamFormat.MSGPACK:
                self._unpacker = self._new_unpacker()
        if self.format is StreamFormat.JSON_LINES:
            return self._receive_json(data)
        return self._receive_msgpack(data)

    def receive_eof(self) -> tuple[Chunk, list[DecodeError]]:
        """The peer closed: a last JSON line without its newline still counts; a MessagePack
        message cut off by the end of the stream is counted as `truncated`."""
        messages = PythonChunk()
        errors: list[DecodeError] = []
        if self._violation is not None:
            return messages, errors
        if self.format is StreamFormat.JSON_LINES and self._tail:
            line, self._tail = bytes(self._tail), bytearray()
            self._parse_lines([line], messages, errors)
        elif self.format is StreamFormat.MSGPACK and (self._unconsumed or self._bad_message):
            if self._bad_message is not None:
                errors.append(self._bad_message)
            else:
                self.messages_seen += 1
                errors.append(DecodeError("truncated", f"message {self.messages_seen}: the stream ended {len(self._unconsumed)} bytes into a MessagePack message"))
            self._unconsumed, self._bad_message = b"", None
        return messages, errors

    def _fail(self, reason: str, detail: str):
        self._violation = ProtocolViolation(reason, detail)
        raise self._violation

    def _receive_json(self, data: bytes) -> tuple[Chunk, list[DecodeError]]:
        messages = PythonChunk()
        errors: list[DecodeError] = []
        if self._skipping_oversize_line:
            newline = data.find(b"\n")
            if newline < 0:
                return messages, errors
            self._skipping_oversize_line = False
            data = data[newline + 1 :]
        last_newline = data.rfind(b"\n")
        if last_newline < 0:
            self._tail += data
        else:
            if self._tail:
                self._tail += data[:last_newline]
                complete = bytes(self._tail)
            else:
                complete = data[:last_newline]
            self._tail = bytearray(data[last_newline + 1 :])
            messages = self._decode_lines(bytes(complete), errors)
        if len(self._tail) > self.max_message_size:
            self.messages_seen += 1
            errors.append(DecodeError("too_large", f"message {self.messages_seen}: line longer than {self.max_message_size} bytes, skipped"))
            self._tail = bytearray()
            self._skipping_oversize_line = True
        return messages, errors

    def _decode_lines(self, complete: bytes, errors: list[DecodeError]):
        """Complete lines as a chunk (native where it can be, else Python). A bug met while
        decoding them costs this chunk's messages, counted as `internal_error`, and nothing else."""
        seen = self.messages_seen
        found: list[DecodeError] = []
        try:
            chunk = self._decode_natively(complete, found) if self.native else None
            if chunk is not None:
                messages = chunk
            else:
                messages = PythonChunk()
                if not self._parse_as_array(complete, messages, found):
                    self._parse_lines(complete.split(b"\n"), messages, found)
        except Exception as exc:
            count = complete.count(b"\n") + 1
            self.messages_seen = seen + count
            errors.append(DecodeError("internal_error", f"messages {seen + 1}-{seen + count}: {type(exc).__name__}: {exc}", count=count, exception=exc))
            return PythonChunk()
        errors += found
        return messages

    def _parse_as_array(self, complete: bytes, messages: list[dict], errors: list[DecodeError]) -> bool:
        """The fast path: all complete lines parsed by one `orjson.loads` of them as a JSON array
        (cheaper than a call per line: docs/performance.md). It applies only when the result
        cannot differ from line-by-line parsing: nothing over the size limit, no line invalid or
        blank (either makes the array invalid), and exactly one value per line (a line holding
        `{...},{...}` would otherwise pass as two). Returns False to take the line-by-line path."""
        if not complete or len(complete) > self.max_message_size:
            return False
        try:
            parsed = orjson.loads(b"[" + complete.replace(b"\n", b",") + b"]")
        except orjson.JSONDecodeError:
            return False
        if len(parsed) != complete.count(b"\n") + 1:
            return False
        validate = validate_message
        append = messages.append
        first = self.messages_seen + 1
        max_depth = self.max_depth
        for offset, message in enumerate(parsed):
            if type(message) is dict:
                try:
                    validate(message, max_depth)
                except Exception:  # not lost: `_accept` below validates it again and says why
                    pass
                else:
                    append(message)
                    continue
            _accept(message, first + offset, messages, errors, max_depth)  # rejected: says why
        self.messages_seen += len(parsed)
        return True

    def _decode_natively(self, complete: bytes, errors: list[DecodeError]):
        """The chunk as a NativeChunk, or None to take the Python path for all of it.

        The native decoder takes a chunk whose every line is valid as it stands or after the
        rewrites it does itself (timestamps, level aliases). Otherwise it names the lines it
        declined; when they are at most half, they are decoded here, one by one, exactly as
        `_parse_lines` would: an invalid one is dropped with its error, a valid one goes back to
        the native decoder in its normalised form (`orjson.dumps` of the message), which parses
        just those lines and merges them in. So a few odd lines do not send a whole chunk the
        slow way.
        """
        decoded = decode_natively(complete, self.max_message_size, self.max_depth)
        if decoded is None:
            return None
        declined = decoded.declined
        lines = decoded.lines
        if 2 * len(declined) > lines:
            return None
        replacements: list[tuple[int, bytes]] = []
        found: list[DecodeError] = []
        blank = 0  # lines that are no message at all, and so take no number
        for index, start, end in declined:
            normalised: list[dict] = []
            if not self._parse_line(complete[start:end], self.messages_seen + index + 1 - blank, normalised, found):
                blank += 1
            elif normalised:
                replacements.append((index, orjson.dumps(normalised[0])))
        chunk = native_chunk(decoded, replacements)
        if chunk is None:
            return None  # a normalised message the native decoder still declines (rare)
        self.messages_seen += lines - blank
        errors += found
        return chunk

    def _parse_lines(self, lines: list[bytes], messages: list[dict], errors: list[DecodeError]) -> None:
        number = self.messages_seen
        for line in lines:
            number += self._parse_line(line, number + 1, messages, errors)
        self.messages_seen = number

    def _parse_line(self, line: bytes, number: int, messages: list[dict], errors: list[DecodeError]) -> int:
        """One line, as message `number`: appended to `messages` if valid, else its error to
        `errors`. Returns 0 for a blank line (no message, no number), else 1."""
        if not line:
            return 0
        if len(line) > self.max_message_size:
            errors.append(DecodeError("too_large", f"message {number}: line longer than {self.max_message_size} bytes, skipped"))
            return 1
        try:
            message = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            if not line.strip():
                return 0
            errors.append(DecodeError(_json_error(exc), f"message {number}: {exc}"))
            return 1
        _accept(message, number, messages, errors, self.max_depth)
        return 1

    def _new_unpacker(self) -> msgpack.Unpacker:
        # Room for one message at the limit plus the chunk that completes it.
        return msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=2 * self.max_message_size)

    def _receive_msgpack(self, data: bytes) -> tuple[Chunk, list[DecodeError]]:
        messages = PythonChunk()
        errors: list[DecodeError] = []
        # `buffer` holds the bytes from where the unpacker's next message starts; a position p
        # of the unpacker is buffer[p + origin], so a message it fails on can be found here.
        buffer = self._unconsumed + data if self._unconsumed else data
        unpacker = self._unpacker
        if self._bad_message is not None:
            end = self._skip_bad_message(buffer, 0, messages, errors)
            if end is None:
                return messages, errors
            unpacker.feed(buffer[end:])
            return self._unpack(buffer, end, messages, errors)
        origin = -self._message_start
        try:
            unpacker.feed(data)
        except msgpack.BufferFull:
            self._fail("too_large", f"MessagePack message larger than {self.max_message_size} bytes")
        return self._unpack(buffer, origin, messages, errors)

    def _unpack(self, buffer: bytes, origin: int, messages: list[dict], errors: list[DecodeError]):
        """Every message the unpacker can yield from what it was fed (the bytes of `buffer` from
        `origin` on), stepping over the ones it cannot build."""
        unpacker = self._unpacker
        tell = unpacker.tell
        dumps = orjson.dumps
        max_depth = self.max_depth
        next_start = self._message_start
        while True:
            try:
                for message in unpacker:
                    next_start = tell()
                    self.messages_seen += 1
                    if not _accept(message, self.messages_seen, messages, errors, max_depth):
                        continue
                    # MessagePack can carry what JSON cannot (bytes, non-string keys, ext types);
                    # every backend writes JSON, so refuse those here rather than at delivery.
                    try:
                        dumps(message)
                    except TypeError as exc:
                        messages.pop()
                        errors.append(DecodeError(_json_incompatible(exc), f"message {self.messages_seen}: not representable as JSON: {exc}"))
                break
            except (ValueError, TypeError, msgpack.UnpackException) as exc:
                self.messages_seen += 1
                self._bad_message = DecodeError(_msgpack_error(exc), f"message {self.messages_seen}: {type(exc).__name__}: {exc}")
                bad_start = next_start + origin
                unpacker = self._unpacker = self._new_unpacker()
                tell = unpacker.tell
                self._message_start = next_start = 0
                origin = self._skip_bad_message(buffer, bad_start, messages, errors)
                if origin is None:
                    return messages, errors
                unpacker.feed(buffer[origin:])
        self._message_start = next_start
        self._unconsumed = buffer[next_start + origin :]
        if len(self._unconsumed) > self.max_message_size:
            self._fail("too_large", f"MessagePack message larger than {self.max_message_size} bytes")
        return messages, errors

    def _skip_bad_message(self, buffer: bytes, start: int, messages: list[dict], errors: list[DecodeError]) -> int | None:
        """Step over `self._bad_message`, which starts at buffer[start]: where it ends when
        that is in `buffer` (its error is recorded then), or None when more bytes are needed."""
        try:
            end = msgpack_object_end(buffer, start)
        except ValueError as exc:
            self._violation = ProtocolViolation("invalid_msgpack", f"broken MessagePack framing after message {self.messages_seen - 1}: {exc}", messages, errors)
            raise self._violation from None
        if end is None:
            self._unconsumed = buffer[start:]
            if len(self._unconsumed) > self.max_message_size:
                self._fail("too_large", f"MessagePack message larger than {self.max_message_size} bytes")
            return None
        errors.append(self._bad_message)
        self._bad_message = None
        return end


# The first message of a connection to a source with a token; longer, it is refused unread.
MAX_AUTH_MESSAGE_SIZE = 4096
_AUTH_FORM = 'the first message must be {"auth": "<token>"} (a JSON line or a MessagePack map): this source takes only connections that authenticate (docs/protocol.md)'


class AuthRefused(Exception):
    """A connection's first message is not the auth message, or carries another token. `detail`
    is what the client is told; it never holds either token."""

    def __init__(self, detail: str):
        super().__init__(detail)
        self.detail = detail


def _auth_message(buffer: bytes, max_size: int) -> tuple[str, bytes] | None:
    """The token of the auth message that begins `buffer`, and the bytes after it; None while it
    is incomplete (and within `max_size`); AuthRefused when it is something else."""
    form = detect_format(buffer[0])
    if form is StreamFormat.JSON_LINES:
        end = buffer.find(b"\n", 0, max_size + 1)
        if end < 0:
            return _incomplete(buffer, max_size)
        rest = buffer[end + 1 :]
        try:
            value = orjson.loads(buffer[:end])
        except orjson.JSONDecodeError:
            raise AuthRefused(_AUTH_FORM) from None
    elif form is StreamFormat.MSGPACK:
        try:
            end = msgpack_object_end(buffer, 0)
        except ValueError:
            raise AuthRefused(_AUTH_FORM) from None
        if end is None or end > max_size:
            return _incomplete(buffer, max_size)
        rest = buffer[end:]
        try:
            value = msgpack.unpackb(buffer[:end], raw=False, strict_map_key=False)
        except (ValueError, TypeError, msgpack.UnpackException):
            raise AuthRefused(_AUTH_FORM) from None
    else:
        raise AuthRefused(_AUTH_FORM)
    token = value.get("auth") if type(value) is dict and len(value) == 1 else None
    if type(token) is not str:
        raise AuthRefused(_AUTH_FORM)
    return token, rest


def _incomplete(buffer: bytes, max_size: int) -> None:
    if len(buffer) > max_size:
        raise AuthRefused(f"{_AUTH_FORM}; no auth message within its first {max_size} bytes")
    return None


class AuthCheck:
    """Sans-IO check of a connection's first message against the source's token, before its
    bytes reach a StreamDecoder (which then sees the stream from the message after it, and so
    keeps its fast path). `receive_data()` returns None while the auth message is incomplete,
    then the bytes that followed it; it raises AuthRefused when the message is anything else."""

    def __init__(self, token: bytes, max_size: int = MAX_AUTH_MESSAGE_SIZE):
        self._token = token
        self._max_size = max_size
        self._buffer = b""

    @property
    def pending(self) -> bool:
        """Part of a first message arrived."""
        return bool(self._buffer)

    def receive_data(self, data: bytes) -> bytes | None:
        buffer = self._buffer + bytes(data) if self._buffer else bytes(data)
        if not buffer:
            return None
        found = _auth_message(buffer, self._max_size)
        if found is None:
            self._buffer = buffer
            return None
        token, rest = found
        if not hmac.compare_digest(token.encode("utf-8", "surrogatepass"), self._token):
            raise AuthRefused("authentication failed: wrong token")
        self._buffer = b""
        return rest


# How an SDK begins the auth message: {"auth": as a JSON line, or a one-entry map, key "auth".
_AUTH_STARTS = (b'{"auth":', b"\x81\xa4auth")


class UnusedAuth:
    """Sans-IO, for a source without a token: the auth message of a client that sends one anyway
    (an SDK given a token before its sidecar requires one) is dropped without an error, and every
    other stream passes untouched. Only a stream that begins as an SDK writes the auth message is
    held, until that first message is complete (at most MAX_AUTH_MESSAGE_SIZE bytes)."""

    def __init__(self, max_size: int = MAX_AUTH_MESSAGE_SIZE):
        self._max_size = max_size
        self._buffer = b""

    def receive_data(self, data: bytes) -> bytes | None:
        """The bytes for the decoder, or None while they may still begin with an auth message."""
        buffer = self._buffer + data if self._buffer else data
        self._buffer = b""
        start = next((start for start in _AUTH_STARTS if buffer[: len(start)] == start[: len(buffer)]), None)
        if start is None:
            return buffer
        if len(buffer) < len(start):  # not yet told apart from a message
            self._buffer = buffer
            return None
        try:
            found = _auth_message(buffer, self._max_size)
        except AuthRefused:
            return buffer  # not an auth message after all: the decoder judges it
        if found is None:
            self._buffer = buffer
            return None
        return found[1]

    def receive_eof(self) -> bytes:
        """What was held when the stream ended, for the decoder: nothing when it is an auth line
        the end of the stream completes (the decoder takes such a last line as a message)."""
        held, self._buffer = self._buffer, b""
        if held[:1] == b"{" and b"\n" not in held:
            try:
                if _auth_message(held + b"\n", self._max_size + 1) is not None:
                    return b""
            except AuthRefused:
                pass
        return held
