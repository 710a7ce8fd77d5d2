"""The SDKs' source: JSON lines or MessagePack over TCP (or a Unix socket), the format picked
by a connection's first byte.

Each connection reads large chunks and hands one chunk of messages at a time to the intake.
When the correlator's channel is full, the hand-over waits, the connection stops reading, and
TCP pushes back to the SDK: memory stays bounded by channel size x chunk size, whatever the
clients do. Listening, the connection limit and shutdown are `StreamSource`'s (stream.py).
"""

import attrs
import trio

from sidecar.constants import DEFAULT_MAX_DEPTH, MAX_DEPTH_LIMIT
from sidecar.protocol import ProtocolViolation, StreamDecoder
from sidecar.ratelimit import RateLimitSettings
from sidecar.sources.stream import DEFAULT_MAX_INFLIGHT_BYTES, Connection, StreamSource, check_inflight_room
from sidecar.tls import TlsSettings
from sidecar.units import ByteSize, Duration


@attrs.frozen
class TcpSettings:
    host: str = "127.0.0.1"
    port: int = attrs.field(default=17000, validator=attrs.validators.and_(attrs.validators.ge(0), attrs.validators.le(65535)))
    # A Unix socket's path, in place of host and port.
    unix: str | None = None
    max_connections: int = attrs.field(default=1024, validator=attrs.validators.ge(1))
    max_message_size: ByteSize = attrs.field(default=1024 * 1024, validator=attrs.validators.ge(64))
    read_size: ByteSize = attrs.field(default=256 * 1024, validator=attrs.validators.ge(1024))
    # Levels of nesting a message may have (itself level 1); deeper ones are rejected as too_deep.
    max_depth: int = attrs.field(default=DEFAULT_MAX_DEPTH, validator=attrs.validators.and_(attrs.validators.ge(3), attrs.validators.le(MAX_DEPTH_LIMIT)))
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


class TcpSource(StreamSource):
    type_name = "tcp"
    Settings = TcpSettings
    protocol_name = "JSON lines or MessagePack"

    async def converse(self, connection: Connection, stream: trio.abc.Stream, send_channel: trio.MemorySendChannel) -> None:
        decoder = StreamDecoder(self.settings.max_message_size, native=self.native, max_depth=self.settings.max_depth)
        connection.decoder = decoder  # what it holds counts against the limits
        while True:
            data = await self.receive(connection, stream)
            if data is None:
                self.intake.count("connections_closed_total", reason="shutdown")
                return
            if not data:
                messages, errors = decoder.receive_eof()
                await self.hand_over(connection, send_channel, messages, errors)
                return
            try:
                messages, errors = decoder.receive_data(data)
            except ProtocolViolation as violation:
                await self.hand_over(connection, send_channel, violation.messages, [*violation.errors, violation])
                self.intake.count("connections_closed_total", reason=violation.reason)
                await self.refuse(stream, violation.detail)
                return
            connection.format = decoder.format.value
            await self.hand_over(connection, send_channel, messages, errors)
