"""What every source that serves byte streams shares: listening on TCP or a Unix socket, TLS,
one task per connection with its bookkeeping and counters, backpressure through the intake, the
read deadline that ends connections at shutdown, and the limits against hostile or broken
clients:

- `max_connections`, and `max_connections_per_peer` per client address (not on a Unix socket,
  whose file permissions say who may connect);
- `idle_timeout`: a connection that sends nothing for this long is closed (`idle`);
  `partial_timeout`: one that keeps an unfinished message waiting longer is closed (`slow`);
- `rate_limit`: the source's token buckets (sidecar.ratelimit), dropping what is over them or
  making reads wait;
- `max_inflight_bytes`: what the connections hold of bytes read and not handed over yet (their
  unfinished messages, chunks waiting for the pipeline). Each connection holds up to
  `OWN_ALLOWANCE` outside it, so that clients with short messages go on while unfinished long
  ones fill it; beyond that a connection takes from the cap, and waits to read while it is full.
  A connection waiting for the client's bytes takes nothing from the cap: on a plain socket
  the read is sized only once bytes are there, under TLS it asks for 16 KiB (one record).

A stream source (tcp, forward, otlp) is a `StreamSource` subclass that implements `converse`:
what one connection says, read with `receive` and handed over with `hand_over`, with
`connection.decoder` set to what holds its unfinished message (anything with `buffered`).
"""

import collections
import contextlib
import errno
import itertools
import logging
import os
import re
import socket
import ssl
import stat

import attrs
import trio

from sidecar.ingest import PythonChunk
from sidecar.logs import DistinctErrorLog, RateLimitedLog
from sidecar.ratelimit import RateLimiter, pace
from sidecar.sources.base import CannotListen, Source
from sidecar.tls import server_context

log = logging.getLogger("sidecar.listener")

_ACCEPT_RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
DEFAULT_UNIX_MODE = "0660"  # the owner and its group: the services beside it


def unix_mode(_instance, _attribute, value: str) -> None:
    """The validator of the `mode` setting of a stream source's settings: its Unix socket's
    permissions, in octal."""
    if not re.fullmatch(r"0?[0-7]{3}", value):
        raise ValueError(f'must be a file mode in octal digits, in quotes (e.g. "0660"), got {value!r}')

DEFAULT_MAX_INFLIGHT_BYTES = 16 * 1024 * 1024
# What each connection may hold outside max_inflight_bytes (see the module's doc).
OWN_ALLOWANCE = 16 * 1024


def check_inflight_room(max_inflight_bytes: int, largest: int, largest_key: str, read_size: int) -> None:
    """A source's max_inflight_bytes must hold its largest message and a read, or that
    message could never be read whole."""
    if max_inflight_bytes < largest + read_size:
        raise ValueError(f"max_inflight_bytes ({max_inflight_bytes}) must hold the largest message ({largest_key}: {largest}) and a read (read_size: {read_size})")


class ConnectionTimedOut(Exception):
    """A client kept a read waiting past its patience: `reason` is idle or slow."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


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
    tls: bool = False
    # What holds its unfinished message (anything with `buffered`: a decoder), set by converse.
    decoder: object = None
    inflight: int = 0  # bytes it holds, counted against max_inflight_bytes
    unfinished_for: float = 0.0  # seconds its unfinished message has kept reads waiting
    unadmitted_bytes: int = 0  # under rate_limit drop: read since messages were last admitted

    @property
    def where(self) -> str:
        return f"{self.peer} (connection {self.id})"

    @property
    def buffered(self) -> int:
        """Bytes its decoder holds of a message not complete yet."""
        return getattr(self.decoder, "buffered", 0) if self.decoder is not None else 0


class InflightBudget:
    """A source's `max_inflight_bytes`: what its connections hold of bytes read and not handed
    over. `reserve` before a read takes room for it (waiting while there is none), `set` says
    what a connection holds once it knows (after the read, after a hand-over)."""

    def __init__(self, capacity: int, allowance: int = OWN_ALLOWANCE):
        self.capacity = capacity
        self.allowance = allowance
        self.used = 0  # taken from the cap: what connections hold beyond their allowance
        self.held = 0  # everything connections hold, allowances included
        self._lot = trio.lowlevel.ParkingLot()

    def _beyond_allowance(self, held: int) -> int:
        return max(0, held - self.allowance)

    def room(self, connection: Connection) -> int:
        return max(0, self.allowance - connection.inflight) + (self.capacity - self.used)

    def set(self, connection: Connection, held: int) -> None:
        self.used += self._beyond_allowance(held) - self._beyond_allowance(connection.inflight)
        self.held += held - connection.inflight
        shrunk = held < connection.inflight
        connection.inflight = held
        if shrunk and self._lot:
            self._lot.unpark_all()

    async def reserve(self, connection: Connection, wanted: int) -> tuple[int, bool]:
        """Room to read up to `wanted` bytes more (at least 1), and whether it had to wait."""
        waited = False
        while self.room(connection) <= 0:
            waited = True
            await self._lot.park()
        size = min(wanted, self.room(connection))
        self.set(connection, connection.inflight + size)
        return size, waited


class StreamSource(Source):
    """A source of byte streams. Its settings have `host`, `port`, `unix` (a path in place of
    host and port), `max_connections`, `read_size`, `where`, and the limits: `tls`,
    `max_connections_per_peer`, `idle_timeout`, `partial_timeout`, `rate_limit` and
    `max_inflight_bytes`. A subclass sets `protocol_name` (for the log) and implements
    `converse`; `refusal` is what a refused client is told, or `refuse` itself is overridden
    where the refusal is a conversation (otlp's HTTP 503)."""

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
        self._limits_log = RateLimitedLog(log)
        self.tls_context = server_context(settings.tls) if settings.tls is not None else None
        self._per_peer: collections.Counter[str] = collections.Counter()
        self.inflight = InflightBudget(settings.max_inflight_bytes)
        self._limiter: RateLimiter | None = None  # made in `run`, on trio's clock
        if settings.rate_limit is not None and settings.rate_limit.when_over == "drop":
            self.native = False  # a native chunk is handed over whole; dropping takes part of one

    @property
    def active_connections(self) -> int:
        return len(self.connections)

    async def run(self, send_channel: trio.MemorySendChannel, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        if self.settings.rate_limit is not None:
            self._limiter = RateLimiter(self.settings.rate_limit, trio.current_time())
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
                    nursery.start_soon(self._turn_away, stream, f"too many connections (limit {self.settings.max_connections})")
                    continue
                peer = _peer_host(stream)
                if peer is not None and self._per_peer[peer] >= self.settings.max_connections_per_peer:
                    self.intake.count("connections_refused_total", reason="per_peer")
                    self._limits_log.warning("per_peer", "source %s: %s has %d connections open, its limit (max_connections_per_peer); another one refused", self.name, peer, self._per_peer[peer])
                    nursery.start_soon(self._turn_away, stream, f"too many connections from {peer} (limit {self.settings.max_connections_per_peer})")
                    continue
                if peer is not None:
                    self._per_peer[peer] += 1
                nursery.start_soon(self._serve, stream, send_channel.clone(), peer)

    async def _turn_away(self, stream: trio.SocketStream, reason: str) -> None:
        """A connection refused before it was served: told why, except under TLS, where the
        client understands nothing before a handshake it is not worth giving it."""
        if self.tls_context is not None:
            await trio.aclose_forcefully(stream)
        else:
            await self.refuse(stream, reason)

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

    async def _serve(self, stream: trio.SocketStream, send_channel: trio.MemorySendChannel, peer: str | None = None) -> None:
        connection = self.connection_type(next(self._ids), _peer_of(stream))
        self.connections[connection.id] = connection
        try:
            async with send_channel:
                if self.tls_context is not None:
                    stream = await self._handshake(connection, stream)
                    if stream is None:
                        return
                self.intake.count("connections_total")
                async with stream:
                    try:
                        await self.converse(connection, stream, send_channel)
                    except ConnectionTimedOut as timeout:
                        self.intake.count("connections_closed_total", reason=timeout.reason)
                        if timeout.reason == "slow":
                            self._limits_log.warning("slow", "source %s: %s: %s; connection closed", self.name, connection.where, timeout.detail)
                        else:
                            log.debug("source %s: %s: %s; connection closed", self.name, connection.where, timeout.detail)
                        await self.refuse(stream, timeout.detail)
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
            self.inflight.set(connection, 0)
            del self.connections[connection.id]
            if peer is not None:
                self._per_peer[peer] -= 1
                if not self._per_peer[peer]:
                    del self._per_peer[peer]

    async def _handshake(self, connection: Connection, stream: trio.SocketStream) -> trio.SSLStream | None:
        """The TLS handshake within tls.handshake_timeout: the stream to converse on, or None
        when it failed (counted as refused for `tls`, logged, the connection closed)."""
        tls_stream = trio.SSLStream(stream, self.tls_context, server_side=True, https_compatible=True)
        timeout = self.settings.tls.handshake_timeout
        failure = None
        # The connection's scope: shutdown's read deadline moves it too.
        with trio.move_on_at(min(trio.current_time() + timeout, self._read_deadline)) as connection.read_scope:
            try:
                await tls_stream.do_handshake()
                connection.tls = True
                return tls_stream
            except trio.BrokenResourceError as exc:
                failure = _tls_failure(exc)
        await trio.aclose_forcefully(tls_stream)
        if failure is None and trio.current_time() >= self._read_deadline:
            self.intake.count("connections_closed_total", reason="shutdown")
            return None
        self.intake.count("connections_refused_total", reason="tls")
        self._limits_log.warning("tls", "source %s: TLS handshake with %s failed: %s; connection closed", self.name, connection.where, failure or f"none within {timeout:g}s (tls.handshake_timeout)")
        return None

    async def converse(self, connection: Connection, stream: trio.abc.Stream, send_channel: trio.MemorySendChannel) -> None:
        """Read what one client sends until it closes, is cut off, or shutdown ends its reads.
        The stream and the channel clone are closed by the caller."""
        raise NotImplementedError

    async def receive(self, connection: Connection, stream: trio.abc.ReceiveStream, *, deadline: float = float("inf")) -> bytes | None:
        """The next bytes from the client (b"" when it closed), after what holds its reads back
        (backends under `block`, the rate limit, max_inflight_bytes); None when shutdown's read
        deadline (or `deadline`) passed first. ConnectionTimedOut when the client kept it
        waiting past idle_timeout, or past partial_timeout with a message unfinished."""
        # A fresh scope per wait (a scope is entered once); shutdown moves its deadline.
        with trio.move_on_at(min(deadline, self._read_deadline)) as connection.read_scope:
            # A backend under `block` that had no room for this connection's last messages
            # holds its next read back (backpressure for this client only).
            while self.reads_wait_for_holds and connection.holds:
                connection.held_back = True
                await connection.holds[0].wait()
                connection.holds.pop(0)
            connection.held_back = False
            if self._limiter is not None and not self._limiter.drops and self._limiter.delay(trio.current_time()) > 0:
                self.intake.count("reads_waited_total", reason="rate_limit")
                await pace(self._limiter)
        if connection.read_scope.cancelled_caught:
            return None
        # Only the client's patience is measured from here: the waits above were the sidecar's.
        unfinished = connection.buffered
        self.inflight.set(connection, unfinished)
        if unfinished:
            patience, reason = self.settings.partial_timeout - connection.unfinished_for, "slow"
        else:
            connection.unfinished_for = 0.0
            patience, reason = self.settings.idle_timeout, "idle"
        started = trio.current_time()
        data = None
        with trio.move_on_at(min(deadline, self._read_deadline, started + patience)) as connection.read_scope:
            if isinstance(stream, trio.SocketStream):
                # No room is taken while the client says nothing: the read is sized once bytes
                # are there.
                await trio.lowlevel.wait_readable(stream.socket)
                wanted = self._read_size()
            else:
                # A TLS stream may hold decrypted bytes already, so it reads at once; a read
                # returns one record, 16 KiB at most: asking no more, a connection waiting for
                # its client holds its own allowance only.
                wanted = min(self._read_size(), OWN_ALLOWANCE)
            size, waited = await self.inflight.reserve(connection, wanted)
            if waited:
                self.intake.count("reads_waited_total", reason="inflight")
            data = await stream.receive_some(size)
            self.inflight.set(connection, connection.inflight - size + len(data))
        now = trio.current_time()
        if unfinished:
            connection.unfinished_for += now - started
        if data is not None:
            connection.bytes += len(data)
            if self._limiter is not None:
                if self._limiter.drops:
                    connection.unadmitted_bytes += len(data)
                else:
                    self._limiter.charge(0, len(data), now)
            return data
        if now >= self._read_deadline or now >= deadline:
            return None
        if reason == "slow":
            raise ConnectionTimedOut("slow", f"{unfinished} bytes of an unfinished message kept waiting for {self.settings.partial_timeout:g}s (partial_timeout)")
        raise ConnectionTimedOut("idle", f"nothing received for {self.settings.idle_timeout:g}s (idle_timeout)")

    def _read_size(self) -> int:
        """read_size, or less under a pushback rate limit on bytes: no read takes more than a
        burst's worth, so that no single read puts the source in debt for long."""
        limiter = self._limiter
        if limiter is not None and not limiter.drops and limiter.bytes is not None:
            return max(1, min(self.settings.read_size, int(limiter.bytes.capacity)))
        return self.settings.read_size

    async def send(self, connection: Connection, stream: trio.abc.SendStream, data: bytes, *, timeout: float) -> bool:
        """Send `data` to the client within `timeout` seconds and shutdown's read deadline;
        whether it went."""
        with trio.move_on_at(min(trio.current_time() + timeout, self._read_deadline)) as connection.read_scope:
            await stream.send_all(data)
            return True
        return False

    async def hand_over(self, connection: Connection, send_channel, messages, errors: list) -> None:
        """Count and log `errors`, and give `messages` to the intake (waiting while its channel
        is full), those the rate limit admits."""
        if messages or errors:
            connection.unfinished_for = 0.0  # a message was completed: what is left began after it
        if errors:
            connection.errors += self.intake.reject(errors, connection.where)
        messages = self.admit(connection, messages)
        if messages:
            connection.messages += len(messages)
            await self.intake.hand_over(send_channel, messages, [], peer=connection.where, holds=connection.holds)
        # Handed over: only its unfinished message is held now.
        self.inflight.set(connection, connection.buffered)

    def admit(self, connection: Connection, messages):
        """What of `messages` the rate limit lets go: under `drop`, the first ones the buckets
        hold tokens for (the rest dropped and counted); under `pushback` all, charged, so that
        the next read waits."""
        limiter = self._limiter
        if limiter is None or not messages:
            return messages
        now = trio.current_time()
        if not limiter.drops:
            limiter.charge(len(messages), 0, now)
            return messages
        size, connection.unadmitted_bytes = connection.unadmitted_bytes, 0
        allowed = limiter.admit(len(messages), size, now)
        if allowed == len(messages):
            return messages
        dropped = len(messages) - allowed
        self.intake.count("rate_limited_messages_total", dropped)
        self._limits_log.warning("rate_limit", "source %s: over its rate limit; %d messages from %s dropped", self.name, dropped, connection.where)
        return PythonChunk(messages[:allowed])

    def statistics(self) -> dict:
        return {
            **super().statistics(),
            "tls": self.tls_context is not None,
            "connections_active": len(self.connections),
            "inflight_bytes": self.inflight.held,
            "connections": [attrs.asdict(c, filter=lambda a, _v: a.name not in ("read_scope", "holds", "decoder", "unadmitted_bytes")) for c in self.connections.values()],
        }


def _tls_failure(exc: trio.BrokenResourceError) -> str:
    """Why a handshake failed, in words: the usual causes named, else OpenSSL's."""
    cause = exc.__cause__
    if not isinstance(cause, ssl.SSLError):
        return str(cause or exc) or "the client closed the connection"
    reason = cause.reason or ""
    if reason in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNKNOWN_PROTOCOL", "RECORD_LAYER_FAILURE"):
        return "the client does not speak TLS (plaintext on a TLS port?)"
    if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return "the client presented no certificate (tls.client_ca requires one)"
    if reason in ("CERTIFICATE_VERIFY_FAILED", "TLSV1_ALERT_UNKNOWN_CA", "SSLV3_ALERT_BAD_CERTIFICATE"):
        return f"the client's certificate is not one tls.client_ca signed ({cause.verify_message if getattr(cause, 'verify_message', None) else reason})"
    if isinstance(cause, ssl.SSLEOFError):
        return "the client closed the connection during the handshake"
    return reason or str(cause)


def _peer_host(stream: trio.SocketStream) -> str | None:
    """The client's address, for max_connections_per_peer; None on a Unix socket."""
    try:
        peer = stream.socket.getpeername()
    except OSError:
        return None
    return peer[0] if isinstance(peer, tuple) else None


def _peer_of(stream: trio.SocketStream) -> str:
    try:
        peer = stream.socket.getpeername()
    except OSError:
        return "unknown"
    if isinstance(peer, tuple):
        return "%s:%d" % peer[:2]
    return f"unix:{peer or 'peer'}"
