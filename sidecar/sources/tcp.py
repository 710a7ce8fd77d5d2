"""The SDKs' source: JSON lines or MessagePack over TCP (or a Unix socket), the format picked
by a connection's first byte.

Each connection reads large chunks and hands one chunk of messages at a time to the intake.
When the correlator's channel is full, the hand-over waits, the connection stops reading, and
TCP pushes back to the SDK: memory stays bounded by channel size x chunk size, whatever the
clients do.
"""

import contextlib
import errno
import itertools
import logging
import os
import socket
import stat

import attrs
import trio

from sidecar.logs import DistinctErrorLog
from sidecar.constants import DEFAULT_MAX_DEPTH, MAX_DEPTH_LIMIT
from sidecar.protocol import ProtocolViolation, StreamDecoder
from sidecar.sources.base import CannotListen, Source
from sidecar.units import ByteSize

log = logging.getLogger("sidecar.listener")

_ACCEPT_RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


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

    @property
    def where(self) -> str:
        return f"unix:{self.unix}" if self.unix else f"{self.host}:{self.port}"


@attrs.define
class Connection:
    id: int
    peer: str
    format: str | None = None
    messages: int = 0
    errors: int = 0
    bytes: int = 0
    read_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    # Events of backends under `block` that had no room for its messages: its next read waits.
    holds: list = attrs.field(factory=list)
    held_back: bool = False  # waiting for them now


class TcpSource(Source):
    type_name = "tcp"
    Settings = TcpSettings

    def __init__(self, name: str, settings: TcpSettings, intake, *, native: bool = False):
        super().__init__(name, settings, intake, native=native)
        self.connections: dict[int, Connection] = {}
        self._ids = itertools.count(1)
        self._accept_scope = trio.CancelScope()
        self._read_deadline = float("inf")
        self._bugs = DistinctErrorLog(log)

    @property
    def active_connections(self) -> int:
        return len(self.connections)

    async def run(self, send_channel: trio.MemorySendChannel, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        try:
            listeners = await self._open_listeners()
        except OSError as exc:
            send_channel.close()
            raise CannotListen(exc.errno, f"source {self.name}: cannot listen on {self.settings.where}: {exc.strerror or exc}") from exc
        log.info("source %s listening on %s (JSON lines or MessagePack)", self.name, self.address)
        try:
            async with send_channel, trio.open_nursery() as connections:
                task_status.started(self.address)
                with self._accept_scope:
                    async with trio.open_nursery() as acceptors:
                        for listener in listeners:
                            acceptors.start_soon(self._accept_loop, listener, connections, send_channel)
        finally:
            if self.settings.unix is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.settings.unix)  # no socket left for clients to find closed

    async def _open_listeners(self) -> list[trio.SocketListener]:
        settings = self.settings
        if settings.unix is None:
            listeners = await trio.open_tcp_listeners(settings.port, host=settings.host)
            host, port = listeners[0].socket.getsockname()[:2]
            self.address = f"{host}:{port}"
            return listeners
        path = settings.unix
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)  # a previous run's socket; anything else at the path stays, and bind says so
        except FileNotFoundError:
            pass
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.bind(path)
            os.chmod(path, 0o660)  # the owner and its group: the services beside it
            sock.listen(socket.SOMAXCONN)
        except BaseException:
            sock.close()
            raise
        self.address = f"unix:{path}"
        return [trio.SocketListener(sock)]

    def stop_accepting(self) -> None:
        self._accept_scope.cancel()

    def close_connections(self, grace: float) -> None:
        self._read_deadline = trio.current_time() + grace
        for connection in self.connections.values():
            connection.read_scope.deadline = self._read_deadline

    async def _accept_loop(self, listener: trio.SocketListener, nursery: trio.Nursery, send_channel) -> None:
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in _ACCEPT_RESOURCE_ERRORS:
                        raise
                    log.error("source %s: accept failed: %s; pausing 100 ms", self.name, exc)
                    await trio.sleep(0.1)
                    continue
                if len(self.connections) >= self.settings.max_connections:
                    self.intake.count("connections_refused_total", reason="limit")
                    nursery.start_soon(self._refuse, stream, f"too many connections (limit {self.settings.max_connections})")
                    continue
                nursery.start_soon(self._serve, stream, send_channel.clone())

    async def _refuse(self, stream: trio.SocketStream, reason: str) -> None:
        with trio.move_on_after(1):
            try:
                await stream.send_all(f"error: {reason}\n".encode())
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the peer is gone; the refusal is counted already
        await trio.aclose_forcefully(stream)

    async def _serve(self, stream: trio.SocketStream, send_channel: trio.MemorySendChannel) -> None:
        connection = Connection(next(self._ids), _peer_of(stream))
        where = f"{connection.peer} (connection {connection.id})"
        self.connections[connection.id] = connection
        self.intake.count("connections_total")
        decoder = StreamDecoder(self.settings.max_message_size, native=self.native, max_depth=self.settings.max_depth)
        read_size = self.settings.read_size
        try:
            async with send_channel, stream:
                while True:
                    data = b""
                    # A fresh scope per read (a scope is entered once); shutdown moves its deadline.
                    with trio.move_on_at(self._read_deadline) as connection.read_scope:
                        # A backend under `block` that had no room for this connection's last
                        # messages holds its next read back (backpressure for this client only).
                        while connection.holds:
                            connection.held_back = True
                            await connection.holds[0].wait()
                            connection.holds.pop(0)
                        connection.held_back = False
                        data = await stream.receive_some(read_size)
                    if connection.read_scope.cancelled_caught:
                        self.intake.count("connections_closed_total", reason="shutdown")
                        break
                    if not data:
                        messages, errors = decoder.receive_eof()
                        await self._hand_over(connection, where, send_channel, messages, errors)
                        break
                    connection.bytes += len(data)
                    try:
                        messages, errors = decoder.receive_data(data)
                    except ProtocolViolation as violation:
                        await self._hand_over(connection, where, send_channel, violation.messages, [*violation.errors, violation])
                        self.intake.count("connections_closed_total", reason=violation.reason)
                        await self._refuse(stream, violation.detail)
                        break
                    connection.format = decoder.format.value
                    await self._hand_over(connection, where, send_channel, messages, errors)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.intake.count("connections_closed_total", reason="reset")
            log.debug("connection %d from %s reset: %s", connection.id, connection.peer, exc)
        except Exception as exc:
            # A bug met by one connection's bytes outside the decoder's own guard ends that
            # connection, loudly (once per place in the code), not the sidecar and every other
            # client with it.
            self.intake.count("connections_closed_total", reason="internal_error")
            self._bugs.log(exc, "connection %d from %s: internal error; connection closed", connection.id, connection.peer)
        finally:
            self.intake.count("bytes_received_total", connection.bytes)
            del self.connections[connection.id]

    async def _hand_over(self, connection: Connection, where: str, send_channel, messages, errors: list) -> None:
        if errors:
            connection.errors += self.intake.reject(errors, where)
        if messages:
            connection.messages += len(messages)
            await self.intake.hand_over(send_channel, messages, [], peer=where, holds=connection.holds)

    def statistics(self) -> dict:
        return {
            **super().statistics(),
            "connections_active": len(self.connections),
            "connections": [attrs.asdict(c, filter=lambda a, _v: a.name not in ("read_scope", "holds")) for c in self.connections.values()],
        }


def _peer_of(stream: trio.SocketStream) -> str:
    try:
        peer = stream.socket.getpeername()
    except OSError:
        return "unknown"
    if isinstance(peer, tuple):
        return "%s:%d" % peer[:2]
    return f"unix:{peer or 'peer'}"
