"""OpenTelemetry's source: OTLP/HTTP (protobuf or JSON, gzip or not) on h11 and trio.

One task per connection reads a request with h11, answers what its head settles at once (404,
405, 413, 415), reads the body within `max_body_size` and `request_timeout`, and hands what
sidecar.otlp decoded and mapped to the intake as one chunk. When the correlator's channel stays
full for `busy_timeout`, the request is not kept waiting: it gets 503 with Retry-After, and its
exporter retries it later (nothing of it was taken, nothing counted twice). Listening (TCP or a
Unix socket), the connection limit and shutdown are `StreamSource`'s (stream.py).
"""

import math

import attrs
import h11
import trio

from sidecar.constants import DEFAULT_MAX_DEPTH, MAX_DEPTH_LIMIT, MAX_SOURCE_LENGTH
from sidecar.logs import RateLimitedLog
from sidecar.otlp import SIGNALS, Encoding, RequestError, decode, encoding_of, error_body, export, route
from sidecar.otlp_mapping import MappingOptions
from sidecar.ratelimit import RateLimitSettings
from sidecar.sources.stream import DEFAULT_MAX_INFLIGHT_BYTES, DEFAULT_UNIX_MODE, Connection, StreamSource, check_inflight_room, log, unix_mode
from sidecar.tls import TlsSettings
from sidecar.units import ByteSize, Duration

MAX_HEAD_SIZE = 16 * 1024  # request line and headers
# Bodies from this size up are decoded in a worker thread (a 64 KiB body is some 5 ms of work).
THREAD_THRESHOLD = 64 * 1024
SERVER = b"monitoring-sidecar"


def _valid_source(_instance, _attribute, value: str) -> None:
    if not value or len(value) > MAX_SOURCE_LENGTH or not value.isprintable():
        raise ValueError(f"must be 1 to {MAX_SOURCE_LENGTH} printable characters, got {value!r}")


@attrs.frozen
class OtlpSettings:
    host: str = "127.0.0.1"
    port: int = attrs.field(default=4318, validator=attrs.validators.and_(attrs.validators.ge(0), attrs.validators.le(65535)))
    # A Unix socket's path, in place of host and port, and its permissions (octal).
    unix: str | None = None
    mode: str = attrs.field(default=DEFAULT_UNIX_MODE, validator=unix_mode)
    max_connections: int = attrs.field(default=256, validator=attrs.validators.ge(1))
    # A request's body as sent, and again after gzip: beyond it, 413.
    max_body_size: ByteSize = attrs.field(default=4 * 1024 * 1024, validator=attrs.validators.ge(1024))
    # From a request's first byte to its last: a slower client gets 408 and is disconnected.
    request_timeout: Duration = attrs.field(default=10.0, validator=attrs.validators.gt(0))
    # An open connection with no request in it is closed after this.
    idle_timeout: Duration = attrs.field(default=60.0, validator=attrs.validators.gt(0))
    # How long a request waits for room in the pipeline before it is answered 503.
    busy_timeout: Duration = attrs.field(default=1.0, validator=attrs.validators.ge(0))
    # The Retry-After of that 503, in seconds.
    retry_after: Duration = attrs.field(default=1.0, validator=attrs.validators.ge(0))
    # The source of messages whose resource has no service.name.
    default_source: str = attrs.field(default="otel", validator=_valid_source)
    # Attributes naming a message's job (context.job_id): the item's own, then the resource's.
    job_id_attributes: tuple[str, ...] = ("job.id", "job_id")
    max_depth: int = attrs.field(default=DEFAULT_MAX_DEPTH, validator=attrs.validators.and_(attrs.validators.ge(3), attrs.validators.le(MAX_DEPTH_LIMIT)))
    read_size: ByteSize = attrs.field(default=64 * 1024, validator=attrs.validators.ge(1024))
    # The limits against hostile or broken clients, as for every stream source (stream.py); a
    # request's own timeouts above are its idle and partial ones.
    tls: TlsSettings | None = None
    max_connections_per_peer: int = attrs.field(default=256, validator=attrs.validators.ge(1))
    rate_limit: RateLimitSettings | None = None
    max_inflight_bytes: ByteSize = attrs.field(default=DEFAULT_MAX_INFLIGHT_BYTES, validator=attrs.validators.ge(64 * 1024))

    def __attrs_post_init__(self):
        check_inflight_room(self.max_inflight_bytes, self.max_body_size, "max_body_size", self.read_size)

    @property
    def where(self) -> str:
        place = f"unix:{self.unix}" if self.unix else f"{self.host}:{self.port}"
        return f"{place} (TLS)" if self.tls else place

    @property
    def partial_timeout(self) -> float:
        """A request's bytes must all come within request_timeout: its partial timeout."""
        return self.request_timeout

    @property
    def mapping(self) -> MappingOptions:
        return MappingOptions(self.default_source, self.job_id_attributes)


@attrs.define
class HttpConnection(Connection):
    requests: int = 0


class _RequestBody(bytearray):
    """A request's body as it arrives: what the connection holds of an unfinished message."""

    @property
    def buffered(self) -> int:
        return len(self)


class _Closed(Exception):
    """The connection ends here: `reason` for connections_closed_total (None: the peer's own
    clean close, not counted as closed by the sidecar)."""

    def __init__(self, reason: str | None):
        self.reason = reason


@attrs.frozen
class _Response:
    status: int
    body: bytes
    encoding: Encoding
    headers: tuple = ()
    close: bool = False  # the request's body was not read: the connection cannot go on


class OtlpSource(StreamSource):
    type_name = "otlp"
    Settings = OtlpSettings
    protocol_name = f"OTLP/HTTP: POST {', '.join(SIGNALS)}, protobuf or JSON"
    connection_type = HttpConnection
    # A request waits for its holds within busy_timeout, in hand_over_within, and is answered
    # 503 past it: the next request is read all the same.
    reads_wait_for_holds = False

    def __init__(self, name: str, settings: OtlpSettings, intake, *, native: bool = False):
        super().__init__(name, settings, intake, native=native)
        self._mapping = settings.mapping
        self._errors_log = RateLimitedLog(log)

    async def refuse(self, stream: trio.abc.Stream, reason: str) -> None:
        """503 with Retry-After to a connection over the limit, once its request's head is in
        (within a second): an exporter retries it later."""
        http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_SIZE)
        with trio.move_on_after(1):
            try:
                while (event := http.next_event()) is h11.NEED_DATA:
                    http.receive_data(await stream.receive_some(self.settings.read_size))
                if isinstance(event, h11.Request):
                    encoding = encoding_of(dict(event.headers).get(b"content-type", b"").decode("latin-1")) or Encoding.PROTOBUF
                    body = error_body(503, f"{reason}: retry in {self._retry_after()}s", encoding)
                    headers = [(b"content-type", encoding.value.encode()), (b"content-length", str(len(body)).encode()), (b"retry-after", str(self._retry_after()).encode()), (b"connection", b"close")]
                    await stream.send_all(http.send(h11.Response(status_code=503, headers=headers)) + http.send(h11.Data(data=body)) + http.send(h11.EndOfMessage()))
            except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
                pass  # the peer is gone or speaks no HTTP; the refusal is counted already
        await trio.aclose_forcefully(stream)

    def _retry_after(self) -> int:
        return math.ceil(self.settings.retry_after)

    # ------------------------------------------------------------ one connection

    async def converse(self, connection: HttpConnection, stream: trio.abc.Stream, send_channel: trio.MemorySendChannel) -> None:
        connection.format = "http"
        http = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_SIZE)
        while True:
            try:
                await self._serve_request(connection, http, stream, send_channel)
            except _Closed as closed:
                if closed.reason is not None:
                    self.intake.count("connections_closed_total", reason=closed.reason)
                return
            if not self.accepting:
                self.intake.count("connections_closed_total", reason="shutdown")
                return
            if http.our_state is h11.MUST_CLOSE:  # the client asked for it, or spoke HTTP/1.0
                return
            http.start_next_cycle()

    async def _next_event(self, connection: HttpConnection, http: h11.Connection, stream, deadline: float):
        """h11's next event, reading as it needs: TimeoutError past `deadline`, _Closed past
        shutdown's read deadline or on bytes that are not HTTP (answered 400 first)."""
        while True:
            try:
                event = http.next_event()
            except h11.RemoteProtocolError as exc:
                await self._send_error(http, stream, exc.error_status_hint, f"not an HTTP/1.1 request: {exc}", Encoding.PROTOBUF)
                self._log_rejection("http_protocol_error", connection, str(exc))
                raise _Closed("http_protocol_error") from None
            if event is not h11.NEED_DATA:
                return event
            data = await self.receive(connection, stream, deadline=deadline)
            if data is None:
                if trio.current_time() >= self._read_deadline:
                    raise _Closed("shutdown")
                raise TimeoutError
            http.receive_data(data)

    async def _serve_request(self, connection: HttpConnection, http: h11.Connection, stream, send_channel) -> None:
        connection.decoder = None  # the last request's body is let go
        idle_deadline = trio.current_time() + self.settings.idle_timeout
        try:
            request = await self._next_event(connection, http, stream, idle_deadline)
        except TimeoutError:
            raise _Closed("idle") from None
        if isinstance(request, h11.ConnectionClosed):
            raise _Closed(None)
        deadline = trio.current_time() + self.settings.request_timeout
        connection.requests += 1
        headers = {name: value.decode("latin-1") for name, value in request.headers}
        path = request.target.decode("latin-1")
        encoding = encoding_of(headers.get(b"content-type", "")) or Encoding.PROTOBUF
        try:
            response = await self._answer(connection, http, stream, send_channel, request, headers, deadline)
        except TimeoutError:
            response = _Response(408, error_body(408, f"the request did not arrive within {self.settings.request_timeout:g}s (request_timeout)", encoding), encoding, close=True)
            self._log_rejection("request_timeout", connection, f"{request.method.decode()} {path[:100]}: too slow")
        except RequestError as error:
            response = _Response(error.status, error_body(error.status, error.message, encoding), encoding, close=http.their_state is not h11.DONE)
            if error.reason is not None:
                self.intake.count("decode_errors_total", reason=error.reason)
            self._log_rejection(error.reason or f"http_{error.status}", connection, error.message)
        signal_path = path.split("?", 1)[0]
        self.intake.count("otlp_requests_total", path=signal_path if signal_path in SIGNALS else "other", code=str(response.status))
        headers_out = [(b"content-type", response.encoding.value.encode()), (b"content-length", str(len(response.body)).encode()), *response.headers]
        if response.close or not self.accepting:
            headers_out.append((b"connection", b"close"))
        answer = http.send(h11.Response(status_code=response.status, headers=headers_out)) + http.send(h11.Data(data=response.body)) + http.send(h11.EndOfMessage())
        if not await self.send(connection, stream, answer, timeout=self.settings.request_timeout):
            raise _Closed("shutdown" if trio.current_time() >= self._read_deadline else "timeout")
        if response.close:
            await self._linger(connection, stream)
            raise _Closed("timeout" if response.status == 408 else f"http_{response.status}")

    async def _linger(self, connection: HttpConnection, stream) -> None:
        """Before closing on a body left unread: end our side, then read and drop what the client
        still sends, for a second at most (and not past shutdown's deadline). Closing with unread
        bytes would reset the connection, and the client could lose the response it has not
        read yet."""
        with trio.move_on_at(min(trio.current_time() + 1, self._read_deadline)) as connection.read_scope:
            try:
                await stream.send_eof()
                while await stream.receive_some(self.settings.read_size):
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # gone already: nothing left to protect

    async def _answer(self, connection: HttpConnection, http, stream, send_channel, request: h11.Request, headers: dict, deadline: float) -> _Response:
        """The response to one request whose head has arrived (RequestError or TimeoutError
        for the ones answered with an error)."""
        signal, encoding = route(request.method.decode("latin-1"), request.target.decode("latin-1"), headers.get(b"content-type", ""), headers.get(b"content-encoding", ""))
        limit = self.settings.max_body_size
        declared = headers.get(b"content-length")
        if declared is not None and int(declared) > limit:
            raise RequestError(413, f"the body is {declared} bytes, more than {limit} (the source's max_body_size)", "too_large")
        if http.they_are_waiting_for_100_continue:
            await stream.send_all(http.send(h11.InformationalResponse(status_code=100, headers=[])))
        body = connection.decoder = _RequestBody()
        while True:
            event = await self._next_event(connection, http, stream, deadline)
            if isinstance(event, h11.EndOfMessage):
                break
            if isinstance(event, h11.ConnectionClosed):
                raise _Closed(None)
            body += event.data
            if len(body) > limit:
                raise RequestError(413, f"the body is more than {limit} bytes (the source's max_body_size)", "too_large")
        exported = await self._decode(signal, bytes(body), encoding, headers.get(b"content-encoding", ""))
        where = f"{connection.peer} (connection {connection.id}, {signal.path})"
        messages = self.admit(connection, exported.messages)
        if messages:
            taken = await self.intake.hand_over_within(self.settings.busy_timeout, send_channel, messages, exported.errors, peer=where, holds=connection.holds)
            if not taken:
                self._log_rejection("busy", connection, f"the pipeline had no room within {self.settings.busy_timeout:g}s (busy_timeout); answered 503")
                message = f"the sidecar is busy: retry in {self._retry_after()}s"
                return _Response(503, error_body(503, message, encoding), encoding, ((b"retry-after", str(self._retry_after()).encode()),))
            connection.messages += len(messages)
        elif exported.errors:
            self.intake.reject(exported.errors, where)
        connection.errors += exported.rejected
        return _Response(200, exported.response(encoding), encoding)

    async def _decode(self, signal, body: bytes, encoding: Encoding, content_encoding: str):
        """The request decoded, mapped and validated (RequestError when it cannot be decoded).
        A large one (about 10 us per item) in a worker thread: the event loop keeps serving the
        other clients meanwhile."""

        def decoded():
            return export(signal, decode(signal, body, encoding, content_encoding, self.settings.max_body_size), self._mapping, self.settings.max_depth)

        if len(body) < THREAD_THRESHOLD:
            return decoded()
        return await trio.to_thread.run_sync(decoded)

    async def _send_error(self, http: h11.Connection, stream, status: int, message: str, encoding: Encoding) -> None:
        """An error response where h11 can still send one (a head it could not parse)."""
        if http.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = error_body(status, message, encoding)
        headers = [(b"content-type", encoding.value.encode()), (b"content-length", str(len(body)).encode()), (b"connection", b"close")]
        with trio.move_on_after(1):
            try:
                await stream.send_all(http.send(h11.Response(status_code=status, headers=headers)) + http.send(h11.Data(data=body)) + http.send(h11.EndOfMessage()))
            except h11.LocalProtocolError:
                pass  # the head was too broken for h11 to answer it; the connection closes anyway

    def _log_rejection(self, reason: str, connection: HttpConnection, detail: str) -> None:
        self._errors_log.warning(reason, "source %s: %s (connection %d): %s", self.name, connection.peer, connection.id, detail)

    def statistics(self) -> dict:
        requests = {}
        for (source, path, code), count in sorted(self.intake.counters.by_labels("otlp_requests_total", ("input", "path", "code")).items()):
            if source == self.name:
                requests.setdefault(path, {})[code] = count
        return {**super().statistics(), "requests": requests}
