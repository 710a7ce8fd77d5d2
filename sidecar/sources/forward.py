"""The Fluent forward source (`type: forward`): what Fluent Bit's and Fluentd's `forward`
outputs, Docker's `fluentd` log driver and the fluent-logger libraries send, over TCP, TLS or a
Unix socket. sidecar/forward_protocol.py decodes it and maps each record to the envelope;
listening, limits, backpressure and shutdown are `StreamSource`'s, as for the tcp source.

Acks: a frame with `option.chunk` is acknowledged only after its messages were handed over,
that is, once they are in the channel to the correlator. A client that waits for acks and
resends what was not acknowledged (Fluent Bit's `Require_ack_response`, Fluentd's
`require_ack_response`) loses nothing up to that channel (at least once: what was handed over
before a connection broke, unacknowledged, comes again); from there on, the backends' queues
and their `when_full` settings decide, as for every source, and a SIGKILL costs what the
channel holds.
"""

import os
import socket
from typing import Literal

import attrs
import trio

from sidecar.constants import DEFAULT_MAX_DEPTH, LEVELS, MAX_DEPTH_LIMIT
from sidecar.forward_protocol import (
    DEFAULT_MAX_DECOMPRESSED_SIZE,
    DEFAULT_MAX_FRAME_SIZE,
    EnvelopeMapping,
    ForwardConnection,
    ForwardViolation,
    SharedKeyAuth,
)
from sidecar.ratelimit import RateLimitSettings
from sidecar.sources.base import SettingsFromEnvironment
from sidecar.sources.stream import DEFAULT_MAX_INFLIGHT_BYTES, DEFAULT_UNIX_MODE, Connection, StreamSource, check_inflight_room, log, unix_mode
from sidecar.tls import TlsSettings
from sidecar.units import ByteSize, Duration


@attrs.frozen
class ForwardUser:
    """A username and its password (`password_env`: the variable that holds it)."""

    username: str
    password_env: str | None = None
    password: str | None = attrs.field(default=None, repr=False)


@attrs.frozen
class ForwardSettings:
    host: str = "127.0.0.1"
    port: int = attrs.field(default=24224, validator=attrs.validators.and_(attrs.validators.ge(0), attrs.validators.le(65535)))
    # A Unix socket's path, in place of host and port, and its permissions (octal).
    unix: str | None = None
    mode: str = attrs.field(default=DEFAULT_UNIX_MODE, validator=unix_mode)
    max_connections: int = attrs.field(default=1024, validator=attrs.validators.ge(1))
    # A larger frame (one MessagePack array: a Message, or a whole Forward or packed chunk)
    # closes the connection, as a too large MessagePack message does on the tcp source.
    max_frame_size: ByteSize = attrs.field(default=DEFAULT_MAX_FRAME_SIZE, validator=attrs.validators.ge(64))
    # A CompressedPackedForward payload larger once unzipped costs its entries (too_large).
    max_decompressed_size: ByteSize = attrs.field(default=DEFAULT_MAX_DECOMPRESSED_SIZE, validator=attrs.validators.ge(64))
    read_size: ByteSize = attrs.field(default=256 * 1024, validator=attrs.validators.ge(1024))
    max_depth: int = attrs.field(default=DEFAULT_MAX_DEPTH, validator=attrs.validators.and_(attrs.validators.ge(3), attrs.validators.le(MAX_DEPTH_LIMIT)))
    # The mapping to the envelope (forward_protocol.EnvelopeMapping).
    source_from: str = "tag"
    tag_prefix: str = ""
    message_keys: tuple[str, ...] = ("log", "message")
    level_keys: tuple[str, ...] = ("level", "severity")
    extra_into: Literal["data", "context"] = "data"
    default_level: Literal[LEVELS] = "info"
    # The handshake: the variable holding the shared key (or the key itself, never shown).
    shared_key_env: str | None = None
    shared_key: str | None = attrs.field(default=None, repr=False)
    self_hostname: str | None = None  # in PONG; default: this machine's hostname
    users: tuple[ForwardUser, ...] = ()
    # A client must finish the handshake within this (after TLS's, tls.handshake_timeout); acks
    # and replies are sent within send_timeout, or the connection is closed (a client that
    # never reads).
    handshake_timeout: Duration = attrs.field(default=10.0, validator=attrs.validators.gt(0))
    send_timeout: Duration = attrs.field(default=10.0, validator=attrs.validators.gt(0))
    # The limits against hostile or broken clients, as for every stream source (stream.py).
    tls: TlsSettings | None = None
    max_connections_per_peer: int = attrs.field(default=256, validator=attrs.validators.ge(1))
    idle_timeout: Duration = attrs.field(default=300.0, validator=attrs.validators.gt(0))
    partial_timeout: Duration = attrs.field(default=30.0, validator=attrs.validators.gt(0))
    rate_limit: RateLimitSettings | None = None
    max_inflight_bytes: ByteSize = attrs.field(default=DEFAULT_MAX_INFLIGHT_BYTES, validator=attrs.validators.ge(64 * 1024))

    def __attrs_post_init__(self):
        if self.users and not (self.shared_key_env or self.shared_key):
            raise ValueError("users need a shared key (shared_key_env): the handshake carries them")
        if not self.message_keys:
            raise ValueError("message_keys must name at least one key")
        check_inflight_room(self.max_inflight_bytes, self.max_frame_size, "max_frame_size", self.read_size)

    @property
    def where(self) -> str:
        place = f"unix:{self.unix}" if self.unix else f"{self.host}:{self.port}"
        return f"{place} (TLS)" if self.tls else place

    def from_environment(self, environ) -> "ForwardSettings":
        """The secrets that `*_env` settings name, read from `environ`; SettingsFromEnvironment
        naming the key when one is not set."""
        settings = self
        if self.shared_key_env:
            if self.shared_key is not None:
                raise SettingsFromEnvironment("shared_key", "shared_key: set shared_key_env or shared_key, not both")
            settings = attrs.evolve(settings, shared_key=_secret(environ, "shared_key_env", "shared_key_env", self.shared_key_env))
        users = []
        for index, user in enumerate(self.users):
            if user.password_env:
                user = attrs.evolve(user, password=_secret(environ, "users", f"users[{index}].password_env", user.password_env))
            elif user.password is None:
                raise SettingsFromEnvironment("users", f"users[{index}] ({user.username}) needs password_env (or password)")
            users.append(user)
        return attrs.evolve(settings, users=tuple(users))


def _secret(environ, key: str, label: str, name: str) -> str:
    value = environ.get(name)
    if not value:
        raise SettingsFromEnvironment(key, f"{label}: environment variable {name} is {'empty' if value == '' else 'not set'}")
    return value


class ForwardSource(StreamSource):
    type_name = "forward"
    Settings = ForwardSettings
    protocol_name = "Fluent forward"

    def __init__(self, name: str, settings: ForwardSettings, intake, *, native: bool = False):
        if settings.shared_key is None and settings.shared_key_env:
            settings = settings.from_environment(os.environ)  # not read through the config loader
        super().__init__(name, settings, intake, native=native)
        self.mapping = EnvelopeMapping(
            fallback_source=name,
            source_from=settings.source_from,
            tag_prefix=settings.tag_prefix,
            message_keys=settings.message_keys,
            level_keys=settings.level_keys,
            extra_into=settings.extra_into,
            default_level=settings.default_level,
        )
        self.auth = None
        if settings.shared_key is not None:
            users = {user.username: (user.password or "").encode() for user in settings.users}
            self.auth = SharedKeyAuth(settings.shared_key.encode(), settings.self_hostname or socket.gethostname(), users)

    def refusal(self, reason: str) -> bytes:
        return b""  # a forward client reads only MessagePack; the reason is in the log and the counters

    async def converse(self, connection: Connection, stream: trio.abc.Stream, send_channel: trio.MemorySendChannel) -> None:
        settings = self.settings
        connection.format = "forward"
        handshake_deadline = trio.current_time() + settings.handshake_timeout
        decoder = ForwardConnection(
            self.mapping,
            auth=self.auth,
            nonce=os.urandom(16),
            auth_salt=os.urandom(16),
            max_frame_size=settings.max_frame_size,
            max_decompressed_size=settings.max_decompressed_size,
            max_depth=settings.max_depth,
            chunk_size=settings.read_size,
        )
        connection.decoder = decoder  # what it holds counts against the limits
        greeting = decoder.greeting()
        if greeting and not await self._send(connection, stream, greeting):
            return
        while True:
            deadline = handshake_deadline if not decoder.authenticated else float("inf")
            data = await self.receive(connection, stream, deadline=deadline)
            if data is None:
                timed_out = not decoder.authenticated and trio.current_time() >= handshake_deadline
                self.intake.count("connections_closed_total", reason="handshake_timeout" if timed_out else "shutdown")
                return
            if not data:
                received = decoder.receive_eof()
                await self.hand_over(connection, send_channel, received.messages, received.errors)
                return
            received = None
            while received is None or decoder.pending:
                try:
                    received = decoder.receive_data(data) if received is None else decoder.receive_more()
                except ForwardViolation as violation:
                    await self.hand_over(connection, send_channel, violation.messages, [*violation.errors, violation])
                    self.intake.count("connections_closed_total", reason=violation.reason)
                    if violation.reply:
                        await self._send(connection, stream, violation.reply)
                    await trio.aclose_forcefully(stream)
                    return
                if not await self._deliver(connection, stream, send_channel, received):
                    return

    async def _deliver(self, connection: Connection, stream: trio.abc.Stream, send_channel, received) -> bool:
        """The handshake's reply, then the messages to the intake, then the acks: whether the
        connection goes on."""
        if received.reply and not await self._send(connection, stream, received.reply):
            return False
        await self.hand_over(connection, send_channel, received.messages, received.errors)
        # Only now: the messages are in the correlator's channel (see the module's doc).
        return not received.acks or await self._send(connection, stream, b"".join(received.acks))

    async def _send(self, connection: Connection, stream: trio.abc.Stream, data: bytes) -> bool:
        if await self.send(connection, stream, data, timeout=self.settings.send_timeout):
            return True
        self.intake.count("connections_closed_total", reason="send_timeout")
        return False

    def statistics(self) -> dict:
        return {**super().statistics(), "handshake": self.auth is not None}
