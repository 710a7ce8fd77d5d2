"""Thin, non-blocking client for the monitoring sidecar (wire protocol v1).

A call encodes its message at once and offers the bytes to a bounded queue; a daemon thread owns
the socket, connects lazily, reconnects with capped backoff and writes the queue in batches. No
call blocks on the network or raises into the host program.
"""

from __future__ import annotations

import atexit
import contextvars
import functools
import inspect
import json
import logging
import os
import re
import select
import socket
import threading
import time
import weakref
from collections import deque
from contextlib import contextmanager
from typing import Any, Callable, Deque, Dict, Iterator, List, Mapping, Optional, Tuple, TypeVar

_log = logging.getLogger("monitoring_sdk")
_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=str)
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")
_BACKOFF_START, _BACKOFF_CAP = 0.1, 30.0
_MAX_BATCH = 1024  # messages per write: bounds the time the sender holds the GIL
_SEND_POLL = 0.25  # a write blocked on a full socket rechecks this often whether close() gave up
_clients: "weakref.WeakSet[MonitoringClient]" = weakref.WeakSet()
_ts_cache: Tuple[int, str] = (-1, "")

F = TypeVar("F", bound=Callable[..., Any])
_Span = Tuple[str, str, Optional[str], float]  # name, trace_id, parent_span_id, start (perf_counter)


def _timestamp() -> str:
    """RFC 3339 UTC with milliseconds; the date and time part is formatted once per second."""
    global _ts_cache
    now = time.time()
    sec = int(now)
    cached = _ts_cache
    if cached[0] != sec:
        cached = _ts_cache = (sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)))
    return "%s.%03dZ" % (cached[1], int((now - sec) * 1000))


def _number(value: Any) -> Any:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else float(value)


def _pack_json(message: Dict[str, Any]) -> bytes:
    # "replace" only matters for lone surrogates, which UTF-8 cannot carry.
    return (_JSON.encode(message) + "\n").encode("utf-8", "replace")


def _guarded(method: F) -> F:
    """Run a public method so that no exception reaches the host: count and report it instead."""

    @functools.wraps(method)
    def wrapper(self: "MonitoringClient", *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            self._fail(exc)
            return None

    return wrapper  # type: ignore[return-value]


class MonitoringClient:
    """Client for one source (service or script name).

    ``MONITORING_SIDECAR`` ("host:port") and ``MONITORING_SOURCE`` in the environment win over
    the arguments. ``TRACEPARENT`` and ``MONITORING_CONTEXT`` are read at construction, so a
    child process joins its parent's trace and context. ``on_error`` is called with every
    internal error (connect, send, a call that could not be encoded); by default it is unset
    and only the first error of each kind is logged as a warning.
    """

    def __init__(self, source: str, host: str = "localhost", port: int = 17000, *, encoding: str = "json",
                 max_messages: int = 10000, max_bytes: int = 8 << 20, connect_timeout: float = 1.0,
                 atexit_timeout: float = 2.0, on_error: Optional[Callable[[BaseException], None]] = None) -> None:
        self._warned: set = set()
        self._on_error = on_error
        self._errors = 0
        self.source = os.environ.get("MONITORING_SOURCE") or source
        self.host, self.port = host, int(port)
        sidecar = os.environ.get("MONITORING_SIDECAR")
        if sidecar:
            env_host, _, env_port = sidecar.rpartition(":")
            if env_port.isdigit():
                self.host, self.port = env_host.strip("[]") or "localhost", int(env_port)
            else:
                self._report("config", ValueError(f"ignoring malformed MONITORING_SIDECAR={sidecar!r}"))
        self.encoding = "json"
        self._pack: Callable[[Dict[str, Any]], bytes] = _pack_json
        if encoding == "msgpack":
            try:
                import msgpack
                self._pack, self.encoding = functools.partial(msgpack.packb, default=str), "msgpack"
            except ImportError as exc:
                self._report("config", exc)
        self._max_messages, self._max_bytes = max_messages, max_bytes
        self._connect_timeout, self._atexit_timeout = connect_timeout, atexit_timeout
        self._context: Dict[str, Any] = {}
        try:
            seeded = json.loads(os.environ.get("MONITORING_CONTEXT") or "{}")
            self._context = seeded if isinstance(seeded, dict) else {}
        except ValueError as exc:
            self._report("config", exc)
        match = _TRACEPARENT.fullmatch(os.environ.get("TRACEPARENT", "").strip().lower())
        self._remote: Optional[Tuple[str, str]] = match.groups() if match else None  # type: ignore[assignment]
        self._spans: Dict[str, _Span] = {}
        self._active: contextvars.ContextVar[Tuple[str, ...]] = contextvars.ContextVar(
            f"monitoring_sdk_spans_{id(self)}", default=())
        self._closed = False
        self._reset_io()
        _clients.add(self)

    def _reset_io(self) -> None:
        """Fresh lock, queue, counters and no socket or thread: at construction and in a forked child."""
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)  # the sender waits here for work
        self._drained = threading.Condition(self._lock)  # flush() waits here
        self._queue: Deque[bytes] = deque()
        self._queued_bytes = self._in_flight = 0
        self._sent = self._dropped = self._unreported = self._connections = 0
        self._sock: Optional[socket.socket] = None
        self._thread: Optional[threading.Thread] = None
        self._kick = self._abandon = False
        self._retry_at = 0.0

    # -- public API ------------------------------------------------------------------------------

    @_guarded
    def log_event(self, level: str, message: str, context: Optional[Mapping[str, Any]] = None) -> None:
        """Log an event; ``level`` is debug, info, warning ("warn" accepted), error or critical."""
        level = str(level).lower()
        self._emit("event", {"level": "warning" if level == "warn" else level, "message": str(message)}, context)

    @_guarded
    def log_metric(self, name: str, value: float, unit: Optional[str] = None,
                   tags: Optional[Mapping[str, Any]] = None) -> None:
        """Log a numeric metric; tag values are sent as strings."""
        data: Dict[str, Any] = {"name": str(name), "value": _number(value)}
        if unit is not None:
            data["unit"] = str(unit)
        if tags:
            data["tags"] = {str(k): str(v) for k, v in tags.items()}
        self._emit("metric", data)

    @_guarded
    def log_progress(self, job_id: str, percent: float, status: str = "running") -> None:
        """Report progress of a job, ``percent`` from 0 to 100."""
        self._emit("progress", {"job_id": str(job_id), "percent": _number(percent), "status": str(status)})

    @_guarded
    def log_resource(self, cpu_percent: Optional[float] = None, memory_mb: Optional[float] = None,
                     disk_io_mb: Optional[float] = None, network_io_mb: Optional[float] = None) -> None:
        """Report resource usage; values left as None are omitted."""
        values = {"cpu_percent": cpu_percent, "memory_mb": memory_mb, "disk_io_mb": disk_io_mb,
                  "network_io_mb": network_io_mb}
        self._emit("resource", {k: _number(v) for k, v in values.items() if v is not None})

    def start_span(self, name: str) -> str:
        """Start a span in the current thread (or task) and return its id.

        It becomes the innermost active span: later messages of this thread carry its ids, and
        ``TRACEPARENT`` names it until it ends.
        """
        span_id = os.urandom(8).hex()
        try:
            current = self._current()
            trace_id, parent = current if current else (os.urandom(16).hex(), None)
            self._spans[span_id] = (str(name), trace_id, parent, time.perf_counter())
            self._active.set(tuple(s for s in self._active.get() if s in self._spans) + (span_id,))
            self._export_traceparent()
            self._emit("span", {"name": str(name), "phase": "start"}, ids=(trace_id, span_id, parent))
        except Exception as exc:
            self._fail(exc)
        return span_id

    @_guarded
    def end_span(self, span_id: str, status: str = "success") -> None:
        """End a span started with :meth:`start_span`, with its duration in milliseconds."""
        name, trace_id, parent, started = self._spans.pop(span_id)
        duration_ms = round((time.perf_counter() - started) * 1000, 3)
        stack = self._active.get()
        if span_id in stack:
            self._active.set(tuple(s for s in stack if s != span_id))
        self._export_traceparent()
        self._emit("span", {"name": name, "phase": "end", "status": str(status), "duration_ms": duration_ms},
                   ids=(trace_id, span_id, parent))

    @contextmanager
    def span(self, name: str) -> Iterator[str]:
        """Context manager around a span; the status is "error" if an exception escapes (re-raised)."""
        span_id = self.start_span(name)
        try:
            yield span_id
        except BaseException:
            self.end_span(span_id, "error")
            raise
        self.end_span(span_id, "success")

    def traced(self, name: Any = None) -> Any:
        """Decorator running each call of a function (sync or async) in a span named ``name``
        (default: the function's qualified name). Usable as ``@traced`` or ``@traced("load")``."""
        if callable(name):
            return self.traced()(name)

        def decorate(fn: F) -> F:
            span_name = name or fn.__qualname__
            if inspect.iscoroutinefunction(fn):
                @functools.wraps(fn)
                async def run_async(*args: Any, **kwargs: Any) -> Any:
                    with self.span(span_name):
                        return await fn(*args, **kwargs)
                return run_async  # type: ignore[return-value]

            @functools.wraps(fn)
            def run(*args: Any, **kwargs: Any) -> Any:
                with self.span(span_name):
                    return fn(*args, **kwargs)
            return run  # type: ignore[return-value]

        return decorate

    @_guarded
    def set_context(self, key: str, value: Any) -> None:
        """Set a context value sent with every message and exported in ``MONITORING_CONTEXT``
        (``None`` removes the key)."""
        key = str(key)
        with self._lock:  # copy on write: encoders in other threads keep a consistent snapshot
            context = {k: v for k, v in self._context.items() if k != key}
            if value is not None:
                context[key] = value
            self._context = context
        if context:
            os.environ["MONITORING_CONTEXT"] = _JSON.encode(context)
        else:
            os.environ.pop("MONITORING_CONTEXT", None)

    def flush(self, timeout: float = 2.0) -> bool:
        """Wait up to ``timeout`` seconds until the queue is written out; True if it was.

        Also makes a sender that is backing off retry the connection at once.
        """
        with self._lock:
            self._kick = True
            self._wake.notify()
            return self._drained.wait_for(lambda: not self._queue and not self._in_flight, timeout)

    def close(self, timeout: float = 2.0) -> bool:
        """Stop accepting messages and write out the queue, waiting at most ``timeout`` seconds.

        Returns True if everything was written; what is left is counted as dropped. Idempotent;
        also run at interpreter exit with ``atexit_timeout``.
        """
        with self._lock:
            self._closed = True
            self._wake.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            self._abandon = thread.is_alive()
        with self._lock:
            left = len(self._queue) + self._in_flight
            if not self._abandon:
                self._dropped += len(self._queue)
                self._queue.clear()
            return left == 0

    def statistics(self) -> Dict[str, int]:
        """Counters: queued (waiting now), sent, dropped, reconnects, errors (failed calls)."""
        with self._lock:
            return {"queued": len(self._queue), "sent": self._sent, "dropped": self._dropped,
                    "reconnects": max(0, self._connections - 1), "errors": self._errors}

    # -- message building (caller's thread) ------------------------------------------------------

    def _current(self) -> Optional[Tuple[str, str]]:
        """(trace_id, span_id) of the innermost active span of this thread, else the remote parent."""
        for span_id in reversed(self._active.get()):
            span = self._spans.get(span_id)
            if span is not None:
                return span[1], span_id
        return self._remote

    def _export_traceparent(self) -> None:
        current = self._current()
        if current:
            os.environ["TRACEPARENT"] = f"00-{current[0]}-{current[1]}-01"
        else:
            os.environ.pop("TRACEPARENT", None)

    def _emit(self, kind: str, data: Dict[str, Any], context: Optional[Mapping[str, Any]] = None,
              ids: Optional[Tuple[str, str, Optional[str]]] = None) -> None:
        message: Dict[str, Any] = {"source": self.source, "type": kind, "timestamp": _timestamp()}
        if ids is not None:
            message["trace_id"], message["span_id"] = ids[0], ids[1]
            if ids[2]:
                message["parent_span_id"] = ids[2]
        else:
            current = self._current()
            if current:
                message["trace_id"], message["span_id"] = current
        merged = {**self._context, **context} if context else self._context
        if merged:
            message["context"] = merged
        message["data"] = data
        self._offer(self._pack(message))

    def _offer(self, data: bytes) -> None:
        with self._lock:
            if self._closed or len(data) > self._max_bytes:
                self._dropped += 1
                return
            self._queue.append(data)
            self._queued_bytes += len(data)
            dropped = self._trim() if len(self._queue) > self._max_messages or \
                self._queued_bytes > self._max_bytes else 0
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="monitoring-sdk-sender", daemon=True)
                self._thread.start()
            self._wake.notify()
        if dropped:
            self._warn_once("buffer_full", "buffer full: dropping the oldest messages (counted, reported later)")

    def _trim(self) -> int:
        """Drop the oldest messages until the queue is within bounds (lock held)."""
        dropped = 0
        while len(self._queue) > self._max_messages or self._queued_bytes > self._max_bytes:
            self._queued_bytes -= len(self._queue.popleft())
            dropped += 1
        self._dropped += dropped
        self._unreported += dropped
        return dropped

    def _warn_once(self, kind: str, text: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            _log.warning("monitoring_sdk[%s]: %s; further occurrences are only counted", self.source, text)

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            self._errors += 1
        self._report("call", exc)

    def _report(self, kind: str, exc: BaseException) -> None:
        self._warn_once(kind, f"{kind} failed: {exc!r}")
        if self._on_error is not None:
            try:
                self._on_error(exc)
            except Exception:
                pass

    # -- sender thread ---------------------------------------------------------------------------

    def _ready(self) -> bool:
        if not self._queue:
            return self._closed
        return self._sock is not None or self._kick or self._closed or time.monotonic() >= self._retry_at

    def _run(self) -> None:
        delay = _BACKOFF_START
        while not self._abandon:
            with self._lock:
                while not self._ready():
                    self._wake.wait(max(0.0, self._retry_at - time.monotonic()) if self._queue else None)
                if not self._queue:  # closed and written out
                    break
                self._kick = False
            if self._sock is None:
                if not self._connect():
                    if self._closed:
                        break
                    self._retry_at = time.monotonic() + delay
                    delay = min(delay * 2, _BACKOFF_CAP)
                    continue
                delay = _BACKOFF_START
            self._write_batch()
        self._disconnect()

    def _connect(self) -> bool:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self._connect_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(_SEND_POLL)
        except OSError as exc:
            self._report("connect", exc)
            return False
        with self._lock:
            self._sock = sock
            self._connections += 1
        return True

    def _disconnect(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def _peer_closed(self, sock: socket.socket) -> bool:
        """True if the sidecar closed the connection: writing now would lose the batch silently."""
        try:
            if not select.select([sock], [], [], 0)[0]:
                return False
            return sock.recv(4096) == b""  # anything else the sidecar sent is an error line
        except ValueError:  # descriptor beyond select()'s range: cannot tell
            return False
        except OSError:
            return True

    def _write_batch(self) -> None:
        with self._lock:
            batch: List[bytes] = [self._queue.popleft() for _ in range(min(len(self._queue), _MAX_BATCH))]
            self._queued_bytes -= sum(map(len, batch))
            self._in_flight = len(batch)
            report = self._unreported
        if report:
            batch.insert(0, self._pack({"source": self.source, "type": "metric", "timestamp": _timestamp(), "data": {
                "name": "sdk.dropped_messages", "value": report, "unit": "count", "tags": {"reason": "buffer_full"}}}))
        sock, written, error = self._sock, 0, None
        try:
            assert sock is not None
            if self._peer_closed(sock):
                raise ConnectionResetError("the sidecar closed the connection")
            data = memoryview(b"".join(batch))
            while written < len(data):
                try:
                    written += sock.send(data[written:])
                except socket.timeout:  # the sidecar is not reading: wait, unless close() gave up
                    if self._abandon:
                        raise
        except OSError as exc:
            error = exc
        # A message is delivered once all its bytes are written (a JSON line even without its
        # newline: the sidecar takes a last unterminated line at EOF). The rest goes back to the
        # front of the queue for the next connection, so nothing is duplicated or reordered.
        slack = 1 if self.encoding == "json" else 0
        done = end = 0
        for message in batch:
            end += len(message)
            if end - slack > written:
                break
            done += 1
        extra = 1 if report else 0
        with self._lock:
            if report and done >= 1:
                self._unreported -= report
            self._sent += max(0, done - extra)
            rest = batch[max(done, extra):]
            if rest:
                self._queue.extendleft(reversed(rest))
                self._queued_bytes += sum(map(len, rest))
                self._trim()
            self._in_flight = 0
            self._drained.notify_all()
        if error is not None:
            self._disconnect()
            self._report("send", error)


def init(source: str, host: str = "localhost", port: int = 17000, **options: Any) -> MonitoringClient:
    """Create a client: the seed's ``init(source_name, tcp_host, tcp_port)``."""
    return MonitoringClient(source, host, port, **options)


def _close_all_at_exit() -> None:
    for client in list(_clients):
        client.close(client._atexit_timeout)


def _reset_all_in_child() -> None:
    # The child must not share the parent's socket or resend its queue; threads do not survive fork.
    for client in list(_clients):
        client._disconnect()
        client._reset_io()


atexit.register(_close_all_at_exit)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_all_in_child)
