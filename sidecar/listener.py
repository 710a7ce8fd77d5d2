"""The TCP listener: accepts SDK connections and feeds decoded chunks into a bounded channel.

Each connection reads large chunks and sends one list of messages per chunk. When the channel
is full, `send` waits, the connection stops reading, and TCP pushes back to the SDK: memory
stays bounded by channel size x chunk size, whatever the clients do.
"""

import datetime as dt
import errno
import itertools
import logging

import attrs
import trio

from sidecar.config import TcpSettings
from sidecar.logs import DistinctErrorLog, RateLimitedLog
from sidecar.message import format_timestamp
from sidecar.metrics import Counters
from sidecar.protocol import NativeChunk, StreamDecoder, ProtocolViolation

log = logging.getLogger("sidecar.listener")

_ACCEPT_RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


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


class Listener:
    def __init__(self, settings: TcpSettings, counters: Counters, *, native: bool = False):
        self.settings = settings
        self.native = native  # decode JSON lines with the native hot path where it can
        self.counters = counters
        self.connections: dict[int, Connection] = {}
        self.address: tuple[str, int] | None = None
        self._ids = itertools.count(1)
        self._accept_scope = trio.CancelScope()
        self._read_deadline = float("inf")
        self._errors_log = RateLimitedLog(log)
        self._bugs = DistinctErrorLog(log)

    async def run(self, send_channel: trio.MemorySendChannel, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve until `stop_accepting()` and `close_connections()`; closes `send_channel` last,
        which ends the correlator's input once every connection is done."""
        listeners = await trio.open_tcp_listeners(self.settings.port, host=self.settings.host)
        sockname = listeners[0].socket.getsockname()
        self.address = (sockname[0], sockname[1])
        log.info("listening on %s:%d (JSON lines or MessagePack)", *self.address)
        async with send_channel, trio.open_nursery() as connections:
            task_status.started(self.address)
            with self._accept_scope:
                async with trio.open_nursery() as acceptors:
                    for listener in listeners:
                        acceptors.start_soon(self._accept_loop, listener, connections, send_channel)

    def stop_accepting(self) -> None:
        self._accept_scope.cancel()

    def close_connections(self, grace: float) -> None:
        """Let connected clients send for `grace` seconds more, then stop reading from them."""
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
                    log.error("accept failed: %s; pausing 100 ms", exc)
                    await trio.sleep(0.1)
                    continue
                if len(self.connections) >= self.settings.max_connections:
                    self.counters.inc("connections_refused_total", reason="limit")
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
        try:
            peer = "%s:%d" % stream.socket.getpeername()[:2]
        except OSError:
            peer = "unknown"
        connection = Connection(next(self._ids), peer)
        self.connections[connection.id] = connection
        self.counters.inc("connections_total")
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
                        self.counters.inc("connections_closed_total", reason="shutdown")
                        break
                    if not data:
                        messages, errors = decoder.receive_eof()
                        await self._hand_over(connection, send_channel, messages, errors)
                        break
                    connection.bytes += len(data)
                    try:
                        messages, errors = decoder.receive_data(data)
                    except ProtocolViolation as violation:
                        await self._hand_over(connection, send_channel, violation.messages, violation.errors)
                        self._record_errors(connection, [violation])
                        self.counters.inc("connections_closed_total", reason=violation.reason)
                        await self._refuse(stream, violation.detail)
                        break
                    connection.format = decoder.format.value
                    await self._hand_over(connection, send_channel, messages, errors)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self.counters.inc("connections_closed_total", reason="reset")
            log.debug("connection %d from %s reset: %s", connection.id, peer, exc)
        except Exception as exc:
            # A bug met by one connection's bytes outside the decoder's own guard ends that
            # connection, loudly (once per place in the code), not the sidecar and every other
            # client with it.
            self.counters.inc("connections_closed_total", reason="internal_error")
            self._bugs.log(exc, "connection %d from %s: internal error; connection closed", connection.id, peer)
        finally:
            self.counters.inc("bytes_received_total", connection.bytes)
            del self.connections[connection.id]

    async def _hand_over(self, connection: Connection, send_channel, messages: list[dict], errors: list) -> None:
        if errors:
            self._record_errors(connection, errors)
        if messages:
            connection.messages += len(messages)
            self.counters.inc("messages_received_total", len(messages))
            # Which path decoded them: an operator's check that the traffic is on the fast one.
            self.counters.inc("decoded_messages_total", len(messages), path="native" if type(messages) is NativeChunk else "python")
            received_at = format_timestamp(dt.datetime.now(dt.timezone.utc))
            await send_channel.send((received_at, messages, connection.holds))

    def _record_errors(self, connection: Connection, errors: list) -> None:
        for error in errors:
            count = getattr(error, "count", 1)
            connection.errors += count
            self.counters.inc("decode_errors_total", count, reason=error.reason)
            self._errors_log.warning(error.reason, "rejected from %s (connection %d): %s: %s", connection.peer, connection.id, error.reason, error.detail)
            exception = getattr(error, "exception", None)
            if exception is not None:
                self._bugs.log(exception, "internal error while decoding %d messages from %s (connection %d); they are dropped, the connection goes on", count, connection.peer, connection.id)

    def statistics(self) -> dict:
        return {
            "address": f"{self.address[0]}:{self.address[1]}" if self.address else None,
            "connections_active": len(self.connections),
            "connections": [attrs.asdict(c, filter=lambda a, _v: a.name not in ("read_scope", "holds")) for c in self.connections.values()],
        }
