"""What every source that serves byte streams shares: listening on TCP or a Unix socket, the
connection limit, one task per connection with its bookkeeping and counters, backpressure
through the intake, and the read deadline that ends connections at shutdown.

A stream source (tcp, forward, otlp) is a `StreamSource` subclass that implements `converse`:
what one connection says, read with `receive` and handed over with `hand_over`.
"""

import contextlib
import errno
import itertools
import logging
import os
import re
import socket
import stat

import attrs
import trio

from sidecar.logs import DistinctErrorLog
from sidecar.sources.base import CannotListen, Source

log = logging.getLogger("sidecar.listener")

_ACCEPT_RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
DEFAULT_UNIX_MODE = "0660"  # the owner and its group: the services beside it


def unix_mode(_instance, _attribute, value: str) -> None:
    """The validator of the `mode` setting of a stream source's settings: its Unix socket's
    permissions, in octal."""
    if not re.fullmatch(r"0?[0-7]{3}", value):
        raise ValueError(f'must be a file mode in octal digits, in quotes (e.g. "0660"), got {value!r}')


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

    @property
    def where(self) -> str:
        return f"{self.peer} (connection {self.id})"


class StreamSource(Source):
    """A source of byte streams. Its settings have `host`, `port`, `unix` (a path in place of
    host and port), `max_connections`, `read_size` and `where`. A subclass sets `protocol_name`
    (for the log) and implements `converse`; `refusal` is what a refused client is told, or
    `refuse` itself is overridden where the refusal is a conversation (otlp's HTTP 503)."""

    protocol_name = "a byte stream"
    connection_type = Connection  # a subclass of Connection, for a protocol's own fields
    # False for a source that waits on its connections' holds itself (otlp: within a patience,
    # then it answers "retry later"): its reads are not held back.
    reads_wait_for_holds = True

    def __init__(self, name: str, settings, intake, *, native: bool = False):
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
        log.info("source %s listening on %s (%s)", self.name, self.address, self.protocol_name)
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
            os.chmod(path, int(settings.mode, 8))  # before listen(): until then, connects are refused
            sock.listen(socket.SOMAXCONN)
        except BaseException:
            sock.close()
            raise
        self.address = f"unix:{path}"
        return [trio.SocketListener(sock)]

    @property
    def accepting(self) -> bool:
        """False once shutdown began (a protocol that can say so tells its clients)."""
        return not self._accept_scope.cancel_called

    def stop_accepting(self) -> None:
        self._accept_scope.cancel()

    def close_connections(self, grace: float) -> None:
        self._read_deadline = trio.current_time() + grace
        for connection in self.connections.values():
            connection.read_scope.deadline = min(connection.read_scope.deadline, self._read_deadline)

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
                    nursery.start_soon(self.refuse, stream, f"too many connections (limit {self.settings.max_connections})")
                    continue
                nursery.start_soon(self._serve, stream, send_channel.clone())

    def refusal(self, reason: str) -> bytes:
        """What a client that is refused or cut off is told before its connection closes."""
        return f"error: {reason}\n".encode()

    async def refuse(self, stream: trio.abc.Stream, reason: str) -> None:
        """Tell the client `reason` (within a second) and close its connection."""
        message = self.refusal(reason)
        if message:
            with trio.move_on_after(1):
                try:
                    await stream.send_all(message)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass  # the peer is gone; the refusal is counted already
        await trio.aclose_forcefully(stream)

    async def _serve(self, stream: trio.SocketStream, send_channel: trio.MemorySendChannel) -> None:
        connection = self.connection_type(next(self._ids), _peer_of(stream))
        self.connections[connection.id] = connection
        self.intake.count("connections_total")
        try:
            async with send_channel, stream:
                await self.converse(connection, stream, send_channel)
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

    async def converse(self, connection: Connection, stream: trio.abc.Stream, send_channel: trio.MemorySendChannel) -> None:
        """Read what one client sends until it closes, is cut off, or shutdown ends its reads.
        The stream and the channel clone are closed by the caller."""
        raise NotImplementedError

    async def receive(self, connection: Connection, stream: trio.abc.ReceiveStream, *, deadline: float = float("inf")) -> bytes | None:
        """The next bytes from the client (b"" when it closed), after what holds its reads back;
        None when shutdown's read deadline (or `deadline`) passed first."""
        # A fresh scope per read (a scope is entered once); shutdown moves its deadline.
        with trio.move_on_at(min(deadline, self._read_deadline)) as connection.read_scope:
            # A backend under `block` that had no room for this connection's last messages
            # holds its next read back (backpressure for this client only).
            while self.reads_wait_for_holds and connection.holds:
                connection.held_back = True
                await connection.holds[0].wait()
                connection.holds.pop(0)
            connection.held_back = False
            data = await stream.receive_some(self.settings.read_size)
            connection.bytes += len(data)
            return data
        return None

    async def send(self, connection: Connection, stream: trio.abc.SendStream, data: bytes, *, timeout: float) -> bool:
        """Send `data` to the client within `timeout` seconds and shutdown's read deadline;
        whether it went."""
        with trio.move_on_at(min(trio.current_time() + timeout, self._read_deadline)) as connection.read_scope:
            await stream.send_all(data)
            return True
        return False

    async def hand_over(self, connection: Connection, send_channel, messages, errors: list) -> None:
        """Count and log `errors`, and give `messages` to the intake (waiting while its channel
        is full)."""
        if errors:
            connection.errors += self.intake.reject(errors, connection.where)
        if messages:
            connection.messages += len(messages)
            await self.intake.hand_over(send_channel, messages, [], peer=connection.where, holds=connection.holds)

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
