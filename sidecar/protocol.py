"""Sans-IO decoder for wire protocol v1: bytes in, validated messages and errors out.

No sockets, no trio: the listener feeds `receive_data()` with whatever it read and gets back
whole messages. The format is detected from the first byte of the stream: `{` is JSON lines,
a MessagePack map header is a MessagePack stream. Work is done per chunk, not per byte: a chunk
is split at its last newline and every complete line in it is parsed in one loop, and only the
incomplete tail is kept, so the cost is linear in the bytes read.
"""

import enum

import attrs
import msgpack
import orjson

from sidecar.message import MessageError, validate_message

try:
    from sidecar._native import Chunk as NativeChunk, decode as native_decode
except ImportError:  # built without a Rust toolchain: the Python path does everything
    NativeChunk = native_decode = None

NATIVE_AVAILABLE = native_decode is not None

DEFAULT_MAX_MESSAGE_SIZE = 1024 * 1024


class StreamFormat(enum.Enum):
    JSON_LINES = "json"
    MSGPACK = "msgpack"


def detect_format(first_byte: int) -> StreamFormat | None:
    if first_byte == 0x7B:  # "{"
        return StreamFormat.JSON_LINES
    if 0x80 <= first_byte <= 0x8F or first_byte in (0xDE, 0xDF):  # fixmap, map16, map32
        return StreamFormat.MSGPACK
    return None


@attrs.frozen
class DecodeError:
    """One message was rejected; the stream goes on. `reason` is a short metric label."""

    reason: str
    detail: str


class ProtocolViolation(Exception):
    """The peer broke the framing; nothing more can be read from this stream.

    `messages` and `errors` hold what was whole in the same chunk before the break.
    """

    def __init__(self, reason: str, detail: str, messages=(), errors=()):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.messages = list(messages)
        self.errors = list(errors)


def _accept(message, number: int, messages: list[dict], errors: list[DecodeError]) -> bool:
    """A decoded value: appended to `messages` if it is a valid protocol message, else its
    error to `errors`. Returns whether it was accepted."""
    if type(message) is not dict:
        errors.append(DecodeError("not_an_object", f"message {number}: expected an object, got {type(message).__name__}"))
        return False
    try:
        validate_message(message)
    except MessageError as exc:
        errors.append(DecodeError(exc.reason, f"message {number}: {exc.detail}"))
        return False
    messages.append(message)
    return True


class StreamDecoder:
    """Decode one connection's byte stream.

    `receive_data()` returns `(messages, errors)`: the valid messages completed by this chunk, in
    order, and a DecodeError for each rejected one. With `native`, `messages` is instead a
    `NativeChunk` when the native decoder took the chunk (see `_decode_natively`): the same
    messages, validated, still as bytes, for the correlator to enrich and encode in one call.
    It raises ProtocolViolation when the stream cannot be framed any more (unknown format,
    broken or oversized MessagePack); after that every call raises it again.
    """

    def __init__(self, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE, *, native: bool = False):
        self.max_message_size = max_message_size
        # JSON lines through the native decoder when it is built (see `_decode_natively`).
        self.native = native and NATIVE_AVAILABLE
        self.format: StreamFormat | None = None
        self.messages_seen = 0
        self._tail = bytearray()
        self._skipping_oversize_line = False
        self._unpacker: msgpack.Unpacker | None = None
        self._msgpack_bytes_fed = 0
        self._violation: ProtocolViolation | None = None

    def receive_data(self, data: bytes) -> tuple[list[dict], list[DecodeError]]:
        if self._violation is not None:
            raise self._violation
        if not data:
            return [], []
        if self.format is None:
            self.format = detect_format(data[0])
            if self.format is None:
                self._fail("unknown_format", f"first byte 0x{data[0]:02x} is neither '{{' (JSON lines) nor a MessagePack map")
            if self.format is StreamFormat.MSGPACK:
                # Room for one message at the limit plus the chunk that completes it.
                self._unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=2 * self.max_message_size)
        if self.format is StreamFormat.JSON_LINES:
            return self._receive_json(data)
        return self._receive_msgpack(data)

    def receive_eof(self) -> tuple[list[dict], list[DecodeError]]:
        """The peer closed: a last JSON line without its newline still counts."""
        if self._violation is not None or self.format is not StreamFormat.JSON_LINES or not self._tail:
            return [], []
        line, self._tail = bytes(self._tail), bytearray()
        messages: list[dict] = []
        errors: list[DecodeError] = []
        self._parse_lines([line], messages, errors)
        return messages, errors

    def _fail(self, reason: str, detail: str):
        self._violation = ProtocolViolation(reason, detail)
        raise self._violation

    def _receive_json(self, data: bytes) -> tuple[list[dict], list[DecodeError]]:
        messages: list[dict] = []
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
            chunk = self._decode_natively(bytes(complete), errors) if self.native else None
            if chunk is not None:
                messages = chunk
            elif not self._parse_as_array(complete, messages, errors):
                self._parse_lines(complete.split(b"\n"), messages, errors)
        if len(self._tail) > self.max_message_size:
            self.messages_seen += 1
            errors.append(DecodeError("too_large", f"message {self.messages_seen}: line longer than {self.max_message_size} bytes, skipped"))
            self._tail = bytearray()
            self._skipping_oversize_line = True
        return messages, errors

    def _parse_as_array(self, complete: bytes, messages: list[dict], errors: list[DecodeError]) -> bool:
        """The fast path: all complete lines parsed by one `orjson.loads` of them as a JSON array
        (a call per line costs about 0.5 µs more per message). It applies only when the result
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
        for offset, message in enumerate(parsed):
            if type(message) is dict:
                try:
                    validate(message)
                except MessageError:
                    pass
                else:
                    append(message)
                    continue
            _accept(message, first + offset, messages, errors)  # rejected: says why
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
        decoded = native_decode(complete, self.max_message_size)
        if type(decoded) is NativeChunk:
            self.messages_seen += len(decoded)
            return decoded
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
        chunk = decoded.mend(replacements)
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
            errors.append(DecodeError("invalid_json", f"message {number}: {exc}"))
            return 1
        _accept(message, number, messages, errors)
        return 1

    def _receive_msgpack(self, data: bytes) -> tuple[list[dict], list[DecodeError]]:
        messages: list[dict] = []
        errors: list[DecodeError] = []
        unpacker = self._unpacker
        try:
            unpacker.feed(data)
        except msgpack.BufferFull:
            self._fail("too_large", f"MessagePack message larger than {self.max_message_size} bytes")
        self._msgpack_bytes_fed += len(data)
        dumps = orjson.dumps
        try:
            for message in unpacker:
                self.messages_seen += 1
                if not _accept(message, self.messages_seen, messages, errors):
                    continue
                # MessagePack can carry what JSON cannot (bytes, non-string keys, huge ints);
                # every backend writes JSON, so refuse those here rather than at delivery.
                try:
                    dumps(message)
                except TypeError as exc:
                    messages.pop()
                    errors.append(DecodeError("invalid_field", f"message {self.messages_seen}: not representable as JSON: {exc}"))
        except (ValueError, msgpack.UnpackException) as exc:
            self._violation = ProtocolViolation(
                "invalid_msgpack", f"broken MessagePack framing after message {self.messages_seen} ({type(exc).__name__}: {exc})", messages, errors
            )
            raise self._violation from None
        if self._msgpack_bytes_fed - unpacker.tell() > self.max_message_size:
            self._fail("too_large", f"MessagePack message larger than {self.max_message_size} bytes")
        return messages, errors
