"""A TCP proxy on 127.0.0.1 in front of a backend's server, with faults switched while it runs:
the network's failures, which stopping a server does not show.

    with FaultProxy(("127.0.0.1", server_port)) as proxy:
        url = f"postgresql://...@127.0.0.1:{proxy.port}/..."
        proxy.set("black_hole")   # connections open, nothing goes through, nothing answers
        proxy.set("pass")

Modes: `pass` (bytes forwarded as they come), `latency` (each chunk held `delay` seconds),
`reset` (open connections are reset, new ones too), `black_hole` (accepted and read, nothing
forwarded or answered: a partition, whose held bytes TCP delivers once it heals), `refuse` (no
listening socket: connection refused). The proxy runs trio
in a thread of its own, so synchronous tests and benchmarks can drive it.
"""

import socket
import struct
import threading

import trio

MODES = ("pass", "latency", "reset", "black_hole", "refuse")


class FaultProxy:
    def __init__(self, target: tuple[str, int], delay: float = 0.2, port: int = 0):
        """`port` 0: a free one. A long run that switches to `refuse` often should pass a port
        outside the kernel's ephemeral range: while nothing listens, a client's own outgoing
        connection may take the port and connect to itself, or keep the proxy from listening again."""
        self.target = target
        self.delay = delay
        self.mode = "pass"
        self.port = port
        self.connections = 0  # accepted so far
        self._token: trio.lowlevel.TrioToken | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True, name="fault-proxy")
        self._stop: trio.Event | None = None
        self._changed: trio.Event | None = None
        self._open: set[trio.CancelScope] = set()

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the fault proxy did not start")
        return self

    def __exit__(self, *exc) -> None:
        trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(10)

    def set(self, mode: str) -> None:
        """Switch the fault; `reset` and `refuse` act on open connections at once."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        trio.from_thread.run_sync(self._switch, mode, trio_token=self._token)

    def _switch(self, mode: str) -> None:
        self.mode = mode
        self._changed.set()
        self._changed = trio.Event()
        if mode in ("reset", "refuse"):
            for scope in list(self._open):
                scope.cancel()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        self._changed = trio.Event()
        if not self.port:
            probe = socket.socket()
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
            probe.close()
        async with trio.open_nursery() as nursery:
            await nursery.start(self._listen_while_wanted, nursery)
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    async def _listen_while_wanted(self, nursery: trio.Nursery, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Listen on the same port except while refusing; started once it first listens."""
        while True:
            if self.mode == "refuse":
                await self._changed.wait()
                continue
            listeners = await trio.open_tcp_listeners(self.port, host="127.0.0.1")
            task_status.started()
            task_status = trio.TASK_STATUS_IGNORED
            with trio.CancelScope() as scope:
                nursery.start_soon(self._cancel_on_refuse, scope)
                await trio.serve_listeners(self._serve, listeners, handler_nursery=nursery)

    async def _cancel_on_refuse(self, scope: trio.CancelScope) -> None:
        while self.mode != "refuse":
            await self._changed.wait()
        scope.cancel()

    async def _serve(self, client: trio.SocketStream) -> None:
        self.connections += 1
        if self.mode in ("reset", "refuse"):
            await _reset(client)
            return
        server = None
        with trio.CancelScope() as scope:
            self._open.add(scope)
            try:
                server = await trio.open_tcp_stream(*self.target)
                async with trio.open_nursery() as pipes:
                    pipes.start_soon(self._pipe, client, server, pipes)
                    pipes.start_soon(self._pipe, server, client, pipes)
            except OSError:
                pass  # the server refused: so does the proxy, below
            finally:
                self._open.discard(scope)
        for stream in (client, server):
            if stream is not None:
                await (_reset(stream) if scope.cancelled_caught or server is None else stream.aclose())

    async def _pipe(self, source: trio.SocketStream, sink: trio.SocketStream, pipes: trio.Nursery) -> None:
        try:
            while True:
                data = await source.receive_some(65536)
                if not data:
                    break
                while self.mode == "black_hole":
                    await self._changed.wait()
                if self.mode == "latency":
                    await trio.sleep(self.delay)
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        pipes.cancel_scope.cancel()


async def _reset(stream: trio.SocketStream) -> None:
    """Close with RST, as a crashed peer or a middlebox does."""
    try:
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    await stream.aclose()
