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
import itertools
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
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Callable, Optional, TypeVar

_log = logging.getLogger("monitoring_sdk")
try:  # the json module's own C encoder, built once rather than by every JSONEncoder.encode() call
    from json.encoder import c_encode_basestring, c_make_encoder  # type: ignore[attr-defined]

    _C_ENCODER = c_make_encoder(None, str, c_encode_basestring, None, ":", ",", False, False, False)

    def _encode(obj: Any) -> str:
        return "".join(_C_ENCODER(obj, 0))
except (ImportError, TypeError):  # no C accelerator (PyPy): the same settings in pure Python
    _encode = json.JSONEncoder(  # type: ignore[assignment]
        ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=str).encode
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")
_BACKOFF_START, _BACKOFF_CAP = 0.1, 30.0
_SEND_POLL = 0.25  # a write blocked on a full socket rechecks this often whether close() gave up
_MILLIS = tuple(f".{ms:03d}Z" for ms in range(1000))
_clients: weakref.WeakSet[MonitoringClient] = weakref.WeakSet()
_ts_cache: tuple[int, str] = (-1, "")

F = TypeVar("F", bound=Callable[..., Any])
_Span = tuple[str, str, Optional[str], float]  # name, trace_id, parent_span_id, start (perf_counter)


def _timestamp() -> str:
    """RFC 3339 UTC with milliseconds; the date and time part is formatted once per second."""
    global _ts_cache
    sec, ms = divmod(time.time_ns() // 1000000, 1000)
    cached = _ts_cache
    if cached[0] != sec:
        cached = _ts_cache = (sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)))
    return cached[1] + _MILLIS[ms]


def _number(value: Any) -> Any:
    """An int or float as is; anything else (bool, Decimal, numpy scalars) through float()."""
    return value if type(value) is int or type(value) is float else float(value)


def _pack_json(message: dict[str, Any]) -> bytes:
    line = _encode(message) + "\n"
    try:
        return line.encode()
    except UnicodeEncodeError:  # lone surrogates, which UTF-8 cannot carry
        return line.encode("utf-8", "replace")


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
                 atexit_timeout: float = 2.0, on_error: Callable[[BaseException], None] | None = None) -> None:
        self._warned: set[str] = set()
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
        self._pack: Callable[[dict[str, Any]], bytes] = _pack_json
        if encoding == "msgpack":
            try:
                import msgpack  # type: ignore
                self._pack, self.encoding = functools.partial(msgpack.packb, default=str), "msgpack"
            except ImportError as exc:
                self._report("config", exc)
        self._max_messages, self._max_bytes = max_messages, max_bytes
        self._connect_timeout, self._atexit_timeout = connect_timeout, atexit_timeout
        self._context: dict[str, Any] = {}
        try:
            seeded = json.loads(os.environ.get("MONITORING_CONTEXT") or "{}")
            self._context = seeded if isinstance(seeded, dict) else {}
        except ValueError as exc:
            self._report("config", exc)
        match = _TRACEPARENT.fullmatch(os.environ.get("TRACEPARENT", "").strip().lower())
        self._remote: tuple[str, str] | None = match.groups() if match else None  # type: ignore[assignment]
        self._spans: dict[str, _Span] = {}
        self._active: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
            f"monitoring_sdk_spans_{id(self)}", default=())
        self._closed = False
        self._reset_io()
        _clients.add(self)

    def _reset_io(self) -> None:
        """Fresh lock, queue, counters and no socket or thread: at construction and in a forked child."""
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)  # the sender waits here for work
        self._drained = threading.Condition(self._lock)  # flush() waits here
        self._queue: deque[bytes] = deque()
        self._queued_bytes = self._in_flight = 0
        self._sent = self._dropped = self._unreported = self._connections = 0
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._kick = self._abandon = self._idle = False
        self._retry_at = 0.0

    # -- public API ------------------------------------------------------------------------------

    def log_event(self, level: str, message: str, context: Mapping[str, Any] | None = None) -> None:
        """Log an event; ``level`` is debug, info, warning ("warn" accepted), error or critical."""
        try:
            level = str(level).lower()
            self._emit("event", {"level": "warning" if level == "warn" else level, "message": str(message)}, context)
        except Exception as exc:
            self._fail(exc)

    def log_metric(self, name: str, value: float, unit: str | None = None,
                   tags: Mapping[str, Any] | None = None) -> None:
        """Log a numeric metric; tag values are sent as strings."""
        try:
            data: dict[str, Any] = {"name": str(name), "value": _number(value)}
            if unit is not None:
                data["unit"] = str(unit)
            if tags:
                data["tags"] = {str(k): str(v) for k, v in tags.items()}
            self._emit("metric", data)
        except Exception as exc:
            self._fail(exc)

    def log_progress(self, job_id: str, percent: float, status: str = "running") -> None:
        """Report progress of a job, ``percent`` from 0 to 100."""
        try:
            self._emit("progress", {"job_id": str(job_id), "percent": _number(percent), "status": str(status)})
        except Exception as exc:
            self._fail(exc)

    def log_resource(self, cpu_percent: float | None = None, memory_mb: float | None = None,
                     disk_io_mb: float | None = None, network_io_mb: float | None = None) -> None:
        """Report resource usage; values left as None are omitted."""
        values = {"cpu_percent": cpu_percent, "memory_mb": memory_mb, "disk_io_mb": disk_io_mb,
                  "network_io_mb": network_io_mb}
        try:
            self._emit("resource", {k: _number(v) for k, v in values.items() if v is not None})
        except Exception as exc:
            self._fail(exc)

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

    def end_span(self, span_id: str, status: str = "success") -> None:
        """End a span started with :meth:`start_span`, with its duration in milliseconds."""
        try:
            name, trace_id, parent, started = self._spans.pop(span_id)
            duration_ms = round((time.perf_counter() - started) * 1000, 3)
            stack = self._active.get()
            if span_id in stack:
                self._active.set(tuple(s for s in stack if s != span_id))
            self._export_traceparent()
            self._emit("span", {"name": name, "phase": "end", "status": str(status), "duration_ms": duration_ms},
                       ids=(trace_id, span_id, parent))
        except Exception as exc:
            self._fail(exc)

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

    def set_context(self, key: str, value: Any) -> None:
        """Set a context value sent with every message and exported in ``MONITORING_CONTEXT``
        (``None`` removes the key)."""
        key = str(key)
        with self._lock:  # copy on write: encoders in other threads keep a consistent snapshot
            context = {k: v for k, v in self._context.items() if k != key}
            if value is not None:
                context[key] = value
            self._context = context
        try:
            if context:
                os.environ["MONITORING_CONTEXT"] = _encode(context)
            else:
                os.environ.pop("MONITORING_CONTEXT", None)
        except Exception as exc:
            self._fail(exc)

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

    def statistics(self) -> dict[str, int]:
        """Counters: queued (waiting now), sent, dropped, reconnects, errors (failed calls)."""
        with self._lock:
            return {"queued": len(self._queue), "sent": self._sent, "dropped": self._dropped,
                    "reconnects": max(0, self._connections - 1), "errors": self._errors}

    # -- message building (caller's thread) ------------------------------------------------------

    def _current(self) -> tuple[str, str] | None:
        """(trace_id, span_id) of the innermost active span of this thread, else the remote parent."""
        stack = self._active.get()
        if not stack:
            return self._remote
        for span_id in reversed(stack):
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

    def _emit(self, kind: str, data: dict[str, Any], context: Mapping[str, Any] | None = None,
              ids: tuple[str, str, str | None] | None = None) -> None:
        message: dict[str, Any] = {"source": self.source, "type": kind, "timestamp": _timestamp()}
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
            if self._idle:  # only a sender waiting for work needs waking; notify() is not free
                self._idle = False
                self._wake.notify()
            elif self._thread is None:
                self._thread = threading.Thread(target=self._run, name="monitoring-sdk-sender", daemon=True)
                self._thread.start()
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
                    self._idle = not self._queue  # else backing off: new messages need not wake it
                    self._wake.wait(max(0.0, self._retry_at - time.monotonic()) if self._queue else None)
                self._idle = False
                if not self._queue:  # closed and written out
                    break
                self._kick = False
            sock = self._sock or self._connect()
            if sock is not None and self._write_batch(sock):
                delay = _BACKOFF_START
            elif self._closed and self._sock is None:
                break
            else:
                self._retry_at = time.monotonic() + delay
                delay = min(delay * 2, _BACKOFF_CAP)
        self._disconnect()

    def _connect(self) -> socket.socket | None:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self._connect_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(_SEND_POLL)
        except OSError as exc:
            self._report("connect", exc)
            return None
        with self._lock:
            self._sock = sock
            self._connections += 1
        return sock

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

    def _write_batch(self, sock: socket.socket) -> bool:
        """Write the whole queue in one go; on failure put back what did not get out."""
        with self._lock:  # O(1) swap: callers never wait while a long batch is copied
            batch, self._queue = self._queue, deque()
            self._queued_bytes, self._in_flight = 0, len(batch)
            report = self._unreported
        if report:
            batch.appendleft(self._pack({"source": self.source, "type": "metric", "timestamp": _timestamp(), "data": {
                "name": "sdk.dropped_messages", "value": report, "unit": "count", "tags": {"reason": "buffer_full"}}}))
        data, written = memoryview(b"".join(batch)), 0
        try:
            if self._peer_closed(sock):
                raise ConnectionResetError("the sidecar closed the connection")
            while written < len(data):
                try:
                    written += sock.send(data[written:])
                except socket.timeout:  # the sidecar is not reading: wait, unless close() gave up
                    if self._abandon:
                        raise
            done, error = len(batch), None
        except OSError as exc:
            done, error = self._delivered(batch, written), exc
        extra = 1 if report else 0
        with self._lock:
            if report and done:
                self._unreported -= report
            self._sent += max(0, done - extra)
            rest = list(itertools.islice(batch, max(done, extra), None))
            if rest:  # back to the front of the queue for the next connection, in order
                self._queue.extendleft(reversed(rest))
                self._queued_bytes += sum(map(len, rest))
                self._trim()
            self._in_flight = 0
            self._drained.notify_all()
        if error is not None:
            self._disconnect()
            self._report("send", error)
        return error is None

    def _delivered(self, batch: deque[bytes], written: int) -> int:
        """How many messages of a batch the sidecar got whole when only ``written`` bytes went out.

        A JSON line counts even without its newline: the sidecar takes an unterminated last line
        at EOF, so sending it again would duplicate it.
        """
        slack = 1 if self.encoding == "json" else 0
        done = end = 0
        for message in batch:
            end += len(message)
            if end - slack > written:
                break
            done += 1
        return done


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
