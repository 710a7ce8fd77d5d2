"""The SDKs' source: JSON lines or MessagePack over TCP (or a Unix socket), the format picked
by a connection's first byte.

Each connection reads large chunks and hands one chunk of messages at a time to the intake.
When the correlator's channel is full, the hand-over waits, the connection stops reading, and
TCP pushes back to the SDK: memory stays bounded by channel size x chunk size, whatever the
clients do. Listening, the connection limit and shutdown are `StreamSource`'s (stream.py).

With a token (`token_env`), a connection's first message must be `{"auth": TOKEN}`
(protocol.AuthCheck); anything else is refused before one byte of it reaches the decoder.
Without one, an auth message a client sends anyway is dropped (protocol.UnusedAuth).
"""

import os

import attrs
import trio

from sidecar.constants import DEFAULT_MAX_DEPTH, MAX_DEPTH_LIMIT
from sidecar.logs import RateLimitedLog
from sidecar.protocol import AuthCheck, AuthRefused, ProtocolViolation, StreamDecoder, UnusedAuth
from sidecar.ratelimit import RateLimitSettings
from sidecar.sources.base import SettingsFromEnvironment
from sidecar.sources.stream import DEFAULT_MAX_INFLIGHT_BYTES, DEFAULT_UNIX_MODE, Connection, StreamSource, check_inflight_room, log, unix_mode
from sidecar.tls import TlsSettings
from sidecar.units import ByteSize, Duration


def _not_empty(_instance, _attribute, value: str | None) -> None:
    if value == "":
        raise ValueError("must not be empty")


@attrs.frozen
class TcpSettings:
    host: str = "127.0.0.1"
    port: int = attrs.field(default=17000, validator=attrs.validators.and_(attrs.validators.ge(0), attrs.validators.le(65535)))
    # A Unix socket's path, in place of host and port.
    unix: str | None = None
    # The socket's permissions (octal): who may connect is who may write to it.
    mode: str = attrs.field(default=DEFAULT_UNIX_MODE, validator=unix_mode)
    max_connections: int = attrs.field(default=1024, validator=attrs.validators.ge(1))
    max_message_size: ByteSize = attrs.field(default=1024 * 1024, validator=attrs.validators.ge(64))
    read_size: ByteSize = attrs.field(default=256 * 1024, validator=attrs.validators.ge(1024))
    # Levels of nesting a message may have (itself level 1); deeper ones are rejected as too_deep.
    max_depth: int = attrs.field(default=DEFAULT_MAX_DEPTH, validator=attrs.validators.and_(attrs.validators.ge(3), attrs.validators.le(MAX_DEPTH_LIMIT)))
    # The environment variable holding the shared token every connection must send first.
    token_env: str | None = attrs.field(default=None, validator=_not_empty)
    # The limits against hostile or broken clients, the same for every stream source (stream.py).
    tls: TlsSettings | None = None
    max_connections_per_peer: int = attrs.field(default=256, validator=attrs.validators.ge(1))
    idle_timeout: Duration = attrs.field(default=300.0, validator=attrs.validators.gt(0))
    partial_timeout: Duration = attrs.field(default=30.0, validator=attrs.validators.gt(0))
    rate_limit: RateLimitSettings | None = None
    max_inflight_bytes: ByteSize = attrs.field(default=DEFAULT_MAX_INFLIGHT_BYTES, validator=attrs.validators.ge(64 * 1024))

    def __attrs_post_init__(self):
        check_inflight_room(self.max_inflight_bytes, self.max_message_size, "max_message_size", self.read_size)

    @property
    def where(self) -> str:
        place = f"unix:{self.unix}" if self.unix else f"{self.host}:{self.port}"
        return f"{place} (TLS)" if self.tls else place

    @property
    def authenticates(self) -> bool:
        """Every connection must authenticate with the token before it is read."""
        return self.token_env is not None

    def token_from(self, environ) -> str | None:
        """The token `token_env` names, from `environ` (None without `token_env`);
        SettingsFromEnvironment naming the key when the variable is not set or empty. The token
        is kept by the source, never in the settings: nothing that shows settings can show it."""
        if self.token_env is None:
            return None
        value = environ.get(self.token_env)
        if not value:
            raise SettingsFromEnvironment("token_env", f"token_env: environment variable {self.token_env} is {'empty' if value == '' else 'not set'}")
        return value

    def from_environment(self, environ) -> "TcpSettings":
        """The config loader's check that the variable `token_env` names is set."""
        self.token_from(environ)
        return self


class TcpSource(StreamSource):
    type_name = "tcp"
    Settings = TcpSettings
    protocol_name = "JSON lines or MessagePack"

    def __init__(self, name: str, settings: TcpSettings, intake, *, native: bool = False):
        super().__init__(name, settings, intake, native=native)
        # Read once, at start, as every source setting is (the loader checked it is set).
        self._token = settings.token_from(os.environ)
        self._auth_log = RateLimitedLog(log)

    async def converse(self, connection: Connection, stream: trio.abc.Stream, send_channel: trio.MemorySendChannel) -> None:
        decoder = StreamDecoder(self.settings.max_message_size, native=self.native, max_depth=self.settings.max_depth)
        connection.decoder = decoder  # what it holds counts against the limits
        pending = b""
        unused_auth = None
        if self._token is not None:
            pending = await self._authenticate(connection, stream)
            if pending is None:
                return
        else:
            unused_auth = UnusedAuth()
        while True:
            if pending:
                data, pending = pending, b""
            else:
                data = await self.receive(connection, stream)
            if data is None:
                self.intake.count("connections_closed_total", reason="shutdown")
                return
            if unused_auth is not None:  # only until the first message is told apart
                held = unused_auth.receive_data(data) if data else unused_auth.receive_eof()
                if held is None:
                    continue
                unused_auth = None
                if data and not held:
                    continue  # that was the auth message alone
                if held and not await self._decode(connection, stream, send_channel, decoder, held):
                    return
                if data:
                    continue
            if not data:
                messages, errors = decoder.receive_eof()
                await self.hand_over(connection, send_channel, messages, errors)
                return
            if not await self._decode(connection, stream, send_channel, decoder, data):
                return

    async def _decode(self, connection: Connection, stream: trio.abc.Stream, send_channel, decoder: StreamDecoder, data: bytes) -> bool:
        """Decode and hand over what `data` completes; False when the stream broke its framing
        and the connection is closed."""
        try:
            messages, errors = decoder.receive_data(data)
        except ProtocolViolation as violation:
            await self.hand_over(connection, send_channel, violation.messages, [*violation.errors, violation])
            self.intake.count("connections_closed_total", reason=violation.reason)
            await self.refuse(stream, violation.detail)
            return False
        connection.format = decoder.format.value
        await self.hand_over(connection, send_channel, messages, errors)
        return True

    async def _authenticate(self, connection: Connection, stream: trio.abc.Stream) -> bytes | None:
        """Read the connection's auth message: the bytes that came after it, or None when the
        connection ends here (refused, closed before authenticating, or shutdown). The auth
        message is not a message: the decoder never sees it, nor anything of a refused client."""
        check = AuthCheck(self._token.encode("utf-8", "surrogatepass"))
        while True:
            data = await self.receive(connection, stream)
            if data is None:
                self.intake.count("connections_closed_total", reason="shutdown")
                return None
            try:
                if not data:
                    if not check.pending:
                        return None  # connected and closed without a word: nothing to refuse
                    raise AuthRefused("the connection closed before its auth message ended")
                rest = check.receive_data(data)
            except AuthRefused as refused:
                self.intake.count("connections_refused_total", reason="auth")
                self._auth_log.warning("auth", "source %s: refused %s: %s", self.name, connection.where, refused.detail)
                await self.refuse(stream, refused.detail)
                return None
            if rest is not None:
                return rest

    def statistics(self) -> dict:
        return {**super().statistics(), "authenticates": self._token is not None}
