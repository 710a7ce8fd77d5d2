"""Thin, non-blocking client for the monitoring sidecar (wire protocol v1).

A call encodes its message at once and offers the bytes to a bounded queue; a daemon thread owns
the socket, connects lazily, reconnects with capped backoff and writes the queue in batches. No
call blocks on the network or raises into the host program.

JSON lines are assembled from pieces rather than by encoding a dict per call: the part that stays
the same from call to call (``{"source":...,"type":...,"timestamp":"``, the date and time to the
second, the encoded ``set_context`` values, the ids of the active span) is encoded once and
reused, and only the call's own strings and numbers are escaped each time. The bytes are the same
as ``json.dumps(message, ensure_ascii=False, separators=(",", ":"), allow_nan=False,
default=str)`` of the message dict (the tests compare the two); MessagePack still packs the dict.
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
import queue
import re
import select
import socket
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from json.encoder import encode_basestring as _esc  # the C one where there is one: a str -> "..."
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
_MILLIS = tuple(f".{ms:03d}Z\"," for ms in range(1000))  # what follows the second in a JSON line
_clients: weakref.WeakSet[MonitoringClient] = weakref.WeakSet()
_ts_cache: tuple[int, str] = (-1, "")
_time_ns = time.time_ns
_int_repr, _float_repr = int.__repr__, float.__repr__
_KINDS = ("event", "metric", "progress", "resource", "span")
_EVENT, _METRIC, _PROGRESS, _RESOURCE, _SPAN = range(len(_KINDS))
# The level part of an event's data for the usual spellings; others are normalised per call.
_LEVELS = {spelling: '{"level":"%s","message":' % ("warning" if name == "warn" else name)
           for name in ("debug", "info", "warning", "warn", "error", "critical")
           for spelling in (name, name.upper(), name.capitalize())}
_FROZEN = (str, int, float, bool, type(None))  # context values that cannot change after set_context
_RESOURCES = ("cpu_percent", "memory_mb", "disk_io_mb", "network_io_mb")

F = TypeVar("F", bound=Callable[..., Any])
# name, trace_id, parent_span_id, start (perf_counter), the ids as a JSON fragment for messages in it
_Span = tuple[str, str, Optional[str], float, str]
# the open root span's id, and the context state (``_ctx``) and ``_owned`` keys when it started
_Scope = tuple[str, tuple[dict[str, Any], Optional[str], Optional[str]], frozenset[str]]


def _second(sec: int) -> str:
    """The date and time part of the timestamp, formatted once per second."""
    global _ts_cache
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    _ts_cache = (sec, text)
    return text


def _timestamp() -> str:
    """RFC 3339 UTC with milliseconds."""
    sec, ms = divmod(_time_ns() // 1000000, 1000)
    cached = _ts_cache
    return (cached[1] if cached[0] == sec else _second(sec)) + _MILLIS[ms][:-2]


def _number(value: Any) -> Any:
    """An int or float as is; anything else (bool, Decimal, numpy scalars) through float()."""
    return value if type(value) is int or type(value) is float else float(value)


def _num_json(value: Any) -> str:
    """JSON text of what :func:`_number` returns, as the json module writes it."""
    if type(value) is int:
        return _int_repr(value)
    if type(value) is not float:
        value = float(value)
    if value - value == 0.0:  # finite: NaN and the infinities are refused, as by allow_nan=False
        return _float_repr(value)
    return _encode(value)  # raises ValueError


def _ids_json(trace_id: str, span_id: str, parent: str | None = None) -> str:
    """The ids of a message as a JSON fragment; ids are lowercase hex, nothing to escape."""
    text = f'"trace_id":"{trace_id}","span_id":"{span_id}",'
    return text + f'"parent_span_id":"{parent}",' if parent else text


def _frozen(value: Any) -> bool:
    return type(value) in _FROZEN or (type(value) is tuple and all(map(_frozen, value)))


def _pack_json(message: dict[str, Any]) -> bytes:
    return _utf8(_encode(message) + "\n")


def _utf8(line: str) -> bytes:
    try:
        return line.encode()
    except UnicodeEncodeError:  # lone surrogates, which UTF-8 cannot carry
        return line.encode("utf-8", "replace")


class MonitoringClient:
    """Client for one source (service or script name).

    ``MONITORING_SIDECAR`` ("host:port", or "unix:/path" for a Unix socket, as ``unix_socket``
    gives it), ``MONITORING_SIDECAR_TOKEN`` (the ingest token, as ``token``; sent first on every
    connection) and ``MONITORING_SOURCE`` in the environment win over the arguments. ``TRACEPARENT`` and ``MONITORING_CONTEXT`` are read at construction, so a
    child process joins its parent's trace and context. Context set inside a root span (one
    started while no span of this client is open) is undone when that span ends; see
    :meth:`set_context`. ``on_error`` is called with every internal error (connect, send, a
    call that could not be encoded); by default it is unset and only the first error of each
    kind is logged as a warning.
    """

    def __init__(self, source: str, host: str = "localhost", port: int = 17000, *, encoding: str = "json",
                 max_messages: int = 10000, max_bytes: int = 8 << 20, connect_timeout: float = 1.0,
                 atexit_timeout: float = 2.0, on_error: Callable[[BaseException], None] | None = None,
                 unix_socket: str | None = None, token: str | None = None) -> None:
        self._warned: set[str] = set()
        self._on_error = on_error
        self._errors = 0
        self.source = os.environ.get("MONITORING_SOURCE") or source
        self.host, self.port = host, int(port)
        self.unix_socket = unix_socket or None  # a path: the sidecar's Unix socket, in place of host and port
        sidecar = os.environ.get("MONITORING_SIDECAR")
        if sidecar:
            env_host, _, env_port = sidecar.rpartition(":")
            if sidecar.startswith("unix:") and len(sidecar) > 5:
                self.unix_socket = sidecar[5:]
            elif env_port.isdigit():
                self.host, self.port, self.unix_socket = env_host.strip("[]") or "localhost", int(env_port), None
            else:
                self._report("config", ValueError(f"ignoring malformed MONITORING_SIDECAR={sidecar!r}"))
        token = os.environ.get("MONITORING_SIDECAR_TOKEN") or token
        self.encoding = "json"
        self._pack: Callable[[dict[str, Any]], bytes] = _pack_json
        self._binary = False  # True: messages are dicts packed by self._pack, not JSON text
        if encoding == "msgpack":
            try:
                import msgpack  # type: ignore
                self._pack, self.encoding = functools.partial(msgpack.packb, default=str), "msgpack"
                self._binary = True
            except ImportError as exc:
                self._report("config", exc)
        # The auth message, in the stream's encoding; never logged, never in an error.
        self._auth = self._pack({"auth": str(token)}) if token else b""
        self._max_messages, self._max_bytes = max_messages, max_bytes
        self._connect_timeout, self._atexit_timeout = connect_timeout, atexit_timeout
        context: dict[str, Any] = {}
        try:
            seeded = json.loads(os.environ.get("MONITORING_CONTEXT") or "{}")
            context = seeded if isinstance(seeded, dict) else {}
        except ValueError as exc:
            self._report("config", exc)
        self._owned = set(context)  # keys whose values were parsed here: nothing else can change them
        self._set_context(context)
        match = _TRACEPARENT.fullmatch(os.environ.get("TRACEPARENT", "").strip().lower())
        self._remote: tuple[str, str] | None = match.groups() if match else None  # type: ignore[assignment]
        self._remote_ids = _ids_json(*self._remote) if self._remote else ""
        self._spans: dict[str, _Span] = {}  # open spans of every thread; changed under self._lock
        self._scope: _Scope | None = None  # set while a root span is open (and until its end restored)
        self._active: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
            f"monitoring_sdk_spans_{id(self)}", default=())
        self._closed = False
        self._reset_io()
        _clients.add(self)

    def _reset_io(self) -> None:
        """Fresh lock, queue, counters and no socket or thread: at construction and in a forked child."""
        self._lock = threading.Lock()
        self._bell: queue.SimpleQueue[None] = queue.SimpleQueue()  # wakes the sender when it waits
        self._drained = threading.Condition(self._lock)  # flush() waits here
        self._queue: deque[bytes] = deque()
        self._queued_bytes = self._in_flight = 0
        self._sent = self._dropped = self._unreported = self._connections = 0
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._kick = self._abandon = self._idle = False
        self._retry_at = 0.0

    @property
    def source(self) -> Any:
        return self._source

    @source.setter
    def source(self, value: Any) -> None:
        self._source = value
        self._heads = self._make_heads(value) if type(value) is str else None  # else encoded per call

    # -- public API ------------------------------------------------------------------------------

    def log_event(self, level: str, message: str, context: Mapping[str, Any] | None = None) -> None:
        """Log an event; ``level`` is debug, info, warning ("warn" accepted), error or critical."""
        try:
            if self._binary:
                level = str(level).lower()
                self._emit("event", {"level": "warning" if level == "warn" else level, "message": str(message)},
                           context)
                return
            head = _LEVELS.get(level) if type(level) is str else None
            if head is None:
                level = str(level).lower()
                head = f'{{"level":{_esc("warning" if level == "warn" else level)},"message":'
            self._emit_json(_EVENT, f"{head}{_esc(str(message))}}}", context)
        except Exception as exc:
            self._fail(exc)

    def log_metric(self, name: str, value: float, unit: str | None = None,
                   tags: Mapping[str, Any] | None = None) -> None:
        """Log a numeric metric; tag values are sent as strings."""
        try:
            if self._binary:
                data: dict[str, Any] = {"name": str(name), "value": _number(value)}
                if unit is not None:
                    data["unit"] = str(unit)
                if tags:
                    data["tags"] = {str(k): str(v) for k, v in tags.items()}
                self._emit("metric", data)
                return
            name = _esc(str(name))
            value = _int_repr(value) if type(value) is int else _num_json(value)
            text = f'{{"name":{name},"value":{value}'
            if unit is not None:
                text = f'{text},"unit":{_esc(str(unit))}'
            if tags:
                part: str | None = ""
                if type(tags) is dict:  # str keys stay distinct through str(); others may collide
                    for k, v in tags.items():
                        if type(k) is not str:
                            part = None
                            break
                        part = f"{part},{_esc(k)}:{_esc(str(v))}"
                else:
                    part = None
                if part is None:
                    part = "," + _encode({str(k): str(v) for k, v in tags.items()})[1:-1]
                text = f'{text},"tags":{{{part[1:]}}}'
            self._emit_json(_METRIC, f"{text}}}")
        except Exception as exc:
            self._fail(exc)

    def log_progress(self, job_id: str, percent: float, status: str = "running") -> None:
        """Report progress of a job, ``percent`` from 0 to 100."""
        try:
            if self._binary:
                self._emit("progress", {"job_id": str(job_id), "percent": _number(percent), "status": str(status)})
                return
            self._emit_json(_PROGRESS, f'{{"job_id":{_esc(str(job_id))},"percent":{_num_json(percent)}'
                                       f',"status":{_esc(str(status))}}}')
        except Exception as exc:
            self._fail(exc)

    def log_resource(self, cpu_percent: float | None = None, memory_mb: float | None = None,
                     disk_io_mb: float | None = None, network_io_mb: float | None = None) -> None:
        """Report resource usage; values left as None are omitted."""
        values = (cpu_percent, memory_mb, disk_io_mb, network_io_mb)
        try:
            if self._binary:
                self._emit("resource", {k: _number(v) for k, v in zip(_RESOURCES, values) if v is not None})
                return
            text = ""
            for key, value in zip(_RESOURCES, values):
                if value is not None:
                    text += ',"' + key + '":' + _num_json(value)
            self._emit_json(_RESOURCE, "{" + text[1:] + "}")
        except Exception as exc:
            self._fail(exc)

    def start_span(self, name: str) -> str:
        """Start a span in the current thread (or task) and return its id.

        It becomes the innermost active span: later messages of this thread carry its ids, and
        ``TRACEPARENT`` names it until it ends. Started while no span of this client is open (in
        any thread), it is a root span: the context is remembered, to be restored when it ends.
        """
        span_id = os.urandom(8).hex()
        try:
            current = self._current()
            trace_id, parent = current if current else (os.urandom(16).hex(), None)
            name = str(name)
            span = (name, trace_id, parent, time.perf_counter(), _ids_json(trace_id, span_id))
            with self._lock:  # the root test and the snapshot must not interleave with another start or set
                if self._scope is None and not self._spans:
                    self._scope = (span_id, self._ctx, frozenset(self._owned))
                self._spans[span_id] = span
            self._active.set(tuple(s for s in self._active.get() if s in self._spans) + (span_id,))
            self._export_traceparent()
            if self._binary:
                self._emit("span", {"name": name, "phase": "start"}, ids=(trace_id, span_id, parent))
            else:
                self._emit_json(_SPAN, '{"name":' + _esc(name) + ',"phase":"start"}', None,
                                _ids_json(trace_id, span_id, parent))
        except Exception as exc:
            self._fail(exc)
        return span_id

    def end_span(self, span_id: str, status: str = "success") -> None:
        """End a span started with :meth:`start_span`, with its duration in milliseconds.

        The end message carries the context as it is. Ending a root span then restores the
        context, and ``MONITORING_CONTEXT``, to what they were when it started, whichever nested
        spans are still open.
        """
        try:
            with self._lock:
                name, trace_id, parent, started, _ = self._spans.pop(span_id)
                scope = self._scope if self._scope is not None and self._scope[0] == span_id else None
            duration_ms = round((time.perf_counter() - started) * 1000, 3)
            stack = self._active.get()
            if span_id in stack:
                self._active.set(tuple(s for s in stack if s != span_id))
            self._export_traceparent()
            try:
                if self._binary:
                    self._emit("span", {"name": name, "phase": "end", "status": str(status),
                                        "duration_ms": duration_ms}, ids=(trace_id, span_id, parent))
                else:
                    self._emit_json(_SPAN, '{"name":' + _esc(name) + ',"phase":"end","status":' + _esc(str(status))
                                    + ',"duration_ms":' + _num_json(duration_ms) + "}", None,
                                    _ids_json(trace_id, span_id, parent))
            finally:  # also when the end message could not be encoded: the span's context must not leak
                if scope is not None:
                    self._restore(scope)
        except Exception as exc:
            self._fail(exc)

    @contextmanager
    def span(self, name: str) -> Iterator[str]:
        """Context manager around a span; the status is "error" if an exception escapes (re-raised).

        It scopes context as :meth:`start_span` and :meth:`end_span` do."""
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
        (``None`` removes the key).

        Set while no span is open, it lasts until changed. Set while a root span is open (also
        inside a nested span), it lasts until that root span ends, which restores the context
        as it was when the root span started. The context is one per client, not per thread:
        a span started while another thread's span is open is nested for this purpose.
        """
        key = str(key)
        with self._lock:  # copy on write: encoders in other threads keep a consistent snapshot
            context = {k: v for k, v in self._context.items() if k != key}
            if value is not None:
                context[key] = value
            self._owned.discard(key)
            self._set_context(context)
        try:
            self._export_context(context)
        except Exception as exc:
            self._fail(exc)

    def flush(self, timeout: float = 2.0) -> bool:
        """Wait up to ``timeout`` seconds until the queue is written out; True if it was.

        Also makes a sender that is backing off retry the connection at once.
        """
        with self._lock:
            self._kick = True
            self._bell.put(None)
            return self._drained.wait_for(lambda: not self._queue and not self._in_flight, timeout)

    def close(self, timeout: float = 2.0) -> bool:
        """Stop accepting messages and write out the queue, waiting at most ``timeout`` seconds.

        Returns True if everything was written; what is left is counted as dropped. Idempotent;
        also run at interpreter exit with ``atexit_timeout``.
        """
        with self._lock:
            self._closed = True
            self._bell.put(None)
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

    @staticmethod
    def _make_heads(source: Any) -> tuple[str, ...]:
        """Each message type's opening up to the timestamp's value, ``{"source":...,"timestamp":"``."""
        encoded = _encode(source)
        return tuple(f'{{"source":{encoded},"type":"{kind}","timestamp":"' for kind in _KINDS)

    def _set_context(self, context: dict[str, Any]) -> None:
        """Install a new context dict (never changed afterwards) with its JSON, encoded once when
        its values cannot change behind our back; else they are encoded per message, as before."""
        state: tuple[dict[str, Any], str | None, str | None] = (context, None, None)
        if not context:
            state = (context, "", '"context":{')
        elif all(k in self._owned or _frozen(v) for k, v in context.items()):
            try:
                inner = _encode(context)[1:-1]
                state = (context, '"context":{' + inner + "},", '"context":{' + inner + ",")
            except Exception:  # e.g. NaN: not cached; each message then encodes it, fails and is counted
                pass
        self._context = context
        self._ctx = state  # read by callers in one go: the dict and its JSON always match

    def _restore(self, scope: _Scope) -> None:
        """Put back the context of a root span's start, after its end message was offered."""
        _, state, owned = scope
        with self._lock:
            self._scope = None
            changed = self._context is not state[0]
            self._owned = set(owned)
            self._context, self._ctx = state[0], state  # its cached JSON still matches: never changed
        if changed:  # else MONITORING_CONTEXT already holds it
            self._export_context(state[0])

    def _export_context(self, context: dict[str, Any]) -> None:
        """``MONITORING_CONTEXT`` = ``context`` if it is still the current one; unset when empty."""
        text = _encode(context) if context else None  # outside the lock: default=str may run user code
        with self._lock:  # threads setting context at once: the environment ends as the last change
            if self._context is not context:  # replaced meanwhile; the newer change exports itself
                return
            if text is None:
                os.environ.pop("MONITORING_CONTEXT", None)
            else:
                os.environ["MONITORING_CONTEXT"] = text

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

    def _current_ids(self, stack: tuple[str, ...]) -> str:
        """The JSON ids fragment of the innermost live span of ``stack``, else the remote parent's."""
        spans = self._spans
        for span_id in reversed(stack):
            span = spans.get(span_id)
            if span is not None:
                return span[4]
        return self._remote_ids

    def _export_traceparent(self) -> None:
        current = self._current()
        if current:
            os.environ["TRACEPARENT"] = f"00-{current[0]}-{current[1]}-01"
        else:
            os.environ.pop("TRACEPARENT", None)

    def _emit_json(self, kind: int, data: str, context: Mapping[str, Any] | None = None,
                   ids: str | None = None) -> None:
        """Assemble and offer one JSON line; ``data`` is the message's encoded ``data`` object."""
        sec, ms = divmod(_time_ns() // 1000000, 1000)
        cached = _ts_cache
        stamp = (cached[1] if cached[0] == sec else _second(sec)) + _MILLIS[ms]
        if ids is None:
            stack = self._active.get()
            ids = self._current_ids(stack) if stack else self._remote_ids
        state = self._ctx
        if context and type(context) is not dict:
            context = {**context}  # as a merge reads it; empty: no call context
        if context:
            base, _, text = state
            merged: str | None = None
            if text is not None:
                for k, v in context.items():  # new keys follow the encoded ones, as after a merge
                    if type(k) is not str or k in base:
                        break
                    if type(v) is str:
                        v = _esc(v)
                    elif type(v) is int:
                        v = _int_repr(v)
                    else:
                        break
                    text = f"{text}{_esc(k)}:{v},"
                else:
                    merged = f"{text[:-1]}}},"
            if merged is None:  # a key of set_context overridden, a value of another type, values that may change
                merged = f'"context":{_encode({**base, **context})},'
        else:
            merged = state[1]
            if merged is None:  # values that may change: encoded per message
                merged = '"context":' + _encode(state[0]) + ","
        line = f'{(self._heads or self._make_heads(self._source))[kind]}{stamp}{ids}{merged}"data":{data}}}\n'
        try:
            self._offer(line.encode())
        except UnicodeEncodeError:  # lone surrogates, which UTF-8 cannot carry
            self._offer(line.encode("utf-8", "replace"))

    def _emit(self, kind: str, data: dict[str, Any], context: Mapping[str, Any] | None = None,
              ids: tuple[str, str, str | None] | None = None) -> None:
        """The message as a dict, packed by ``self._pack`` (MessagePack)."""
        message: dict[str, Any] = {"source": self._source, "type": kind, "timestamp": _timestamp()}
        if ids is not None:
            message["trace_id"], message["span_id"] = ids[0], ids[1]
            if ids[2]:
                message["parent_span_id"] = ids[2]
        else:
            current = self._current()
            if current:
                message["trace_id"], message["span_id"] = current
        base = self._ctx[0]
        merged = {**base, **context} if context else base
        if merged:
            message["context"] = merged
        message["data"] = data
        self._offer(self._pack(message))

    def _offer(self, data: bytes) -> None:
        size = len(data)
        lock = self._lock
        lock.acquire()
        try:
            if self._closed or size > self._max_bytes:
                self._dropped += 1
                return
            q = self._queue
            q.append(data)
            self._queued_bytes += size
            dropped = self._trim() if len(q) > self._max_messages or self._queued_bytes > self._max_bytes else 0
            if self._idle:  # only a sender waiting for work needs waking
                self._idle = False
                self._bell.put(None)
            elif self._thread is None:
                self._thread = threading.Thread(target=self._run, name="monitoring-sdk-sender", daemon=True)
                self._thread.start()
        finally:
            lock.release()
        if dropped and "buffer_full" not in self._warned:
            self._warn_once("buffer_full", "buffer full: dropping the oldest messages (counted, reported later)")

    def _trim(self) -> int:
        """Drop the oldest messages until the queue is within bounds (lock held)."""
        q, size, max_messages, max_bytes = self._queue, self._queued_bytes, self._max_messages, self._max_bytes
        dropped = 0
        while len(q) > max_messages or size > max_bytes:
            size -= len(q.popleft())
            dropped += 1
        self._queued_bytes = size
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
                ready = self._ready()
                if ready:
                    self._idle = False
                    if not self._queue:  # closed and written out
                        break
                    self._kick = False
                else:
                    self._idle = not self._queue  # else backing off: new messages need not wake it
                    wait = max(0.0, self._retry_at - time.monotonic()) if self._queue else None
            if not ready:
                try:  # a message offered to an idle sender, flush() or close() rings the bell
                    self._bell.get(timeout=wait)
                except queue.Empty:
                    pass
                continue
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
        sock = None
        try:
            if self.unix_socket is not None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self._connect_timeout)
                sock.connect(self.unix_socket)
            else:
                sock = socket.create_connection((self.host, self.port), timeout=self._connect_timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._auth:  # first on every connection; a fresh socket's buffer takes it at once
                sock.sendall(self._auth)
            sock.settimeout(_SEND_POLL)
        except OSError as exc:
            if sock is not None:
                sock.close()
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
