"""Wire protocol v1: validation and normalisation of one decoded message.

Messages stay plain dicts on the hot path (orjson reads and writes them natively; an object per
message would cost more than the whole validation). This module is pure: no I/O, no clock.
"""

import datetime as dt
import re

import msgpack

from sidecar.constants import (
    DEFAULT_MAX_DEPTH,
    EPOCH_MS_THRESHOLD,
    LEVEL_ALIASES,
    LEVELS,
    MAX_SOURCE_LENGTH,
    MESSAGE_TYPES,
    SPAN_ID_LENGTH,
    TRACE_ID_LENGTH,
)

# The form the sidecar writes, with each field in its range (not year 0, month 13, hour 24);
# a day past the 28th is checked against its month by datetime.
_CANONICAL_TIMESTAMP = re.compile(r"(?!0000)\d{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12]\d|3[01])T(?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d\.\d{3}Z")


class MessageError(Exception):
    """A message the peer sent is not valid protocol v1; `reason` is a short metric label."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_MILLISECOND = dt.timedelta(milliseconds=1)  # made once: building it took half of epoch_ms's time


def parse_timestamp(text) -> dt.datetime:
    """An RFC 3339 timestamp (the sidecar's own form, or any with an offset) as an aware
    datetime; one without an offset is taken as UTC. ValueError or TypeError for anything else."""
    moment = dt.datetime.fromisoformat(text)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.timezone.utc)


def epoch_ms(text) -> int | None:
    """An RFC 3339 timestamp as milliseconds since the epoch; None when it cannot be read."""
    try:
        return (parse_timestamp(text) - _EPOCH) // _MILLISECOND
    except (TypeError, ValueError, OverflowError):
        return None


def format_timestamp(moment: dt.datetime) -> str:
    """RFC 3339 UTC with milliseconds, the one form the sidecar writes."""
    moment = moment.astimezone(dt.timezone.utc)
    # Fields, not strftime: its %Y gives "5", not "0005", for the year 5 on glibc.
    return (
        f"{moment.year:04d}-{moment.month:02d}-{moment.day:02d}T"
        f"{moment.hour:02d}:{moment.minute:02d}:{moment.second:02d}.{moment.microsecond // 1000:03d}Z"
    )


def normalise_timestamp(value) -> str:
    """RFC 3339 with any offset, epoch seconds or milliseconds -> RFC 3339 UTC with ms."""
    if type(value) is str:
        if value[8:10] <= "28" and _CANONICAL_TIMESTAMP.fullmatch(value):
            return value
        try:
            moment = dt.datetime.fromisoformat(value)
        except ValueError:
            raise MessageError("invalid_timestamp", f"timestamp {value[:40]!r} is not RFC 3339") from None
        if moment.tzinfo is None:
            raise MessageError("invalid_timestamp", f"timestamp {value[:40]!r} has no UTC offset")
        try:
            return format_timestamp(moment)
        except OverflowError:  # the offset moves it past year 1 or 9999
            raise MessageError("invalid_timestamp", f"timestamp {value[:40]!r} is out of range in UTC") from None
    if type(value) in (int, float):
        seconds = value / 1000 if abs(value) >= EPOCH_MS_THRESHOLD else value
        try:
            return format_timestamp(dt.datetime.fromtimestamp(seconds, dt.timezone.utc))
        except (ValueError, OverflowError, OSError):
            raise MessageError("invalid_timestamp", f"epoch timestamp {value!r} is out of range") from None
    if isinstance(value, msgpack.Timestamp):
        try:
            return format_timestamp(value.to_datetime())
        except (ValueError, OverflowError, OSError):
            raise MessageError("invalid_timestamp", f"MessagePack timestamp {value.seconds}s is out of range") from None
    raise MessageError("invalid_timestamp", f"timestamp must be a string or a number, got {_kind(value)}")


def _kind(value) -> str:
    return "null" if value is None else type(value).__name__


def _is_number(value) -> bool:
    return type(value) in (int, float)


def _need_str(data: dict, key: str, where: str) -> str:
    value = data.get(key)
    if type(value) is not str:
        reason = "missing_field" if value is None else "invalid_field"
        raise MessageError(reason, f"{where}.{key} must be a string, got {_kind(value)}")
    return value


def _need_number(data: dict, key: str, where: str):
    value = data.get(key)
    if not _is_number(value):
        reason = "missing_field" if value is None else "invalid_field"
        raise MessageError(reason, f"{where}.{key} must be a number, got {_kind(value)}")
    return value


def _check_event(data: dict) -> None:
    level = data.get("level")
    if level not in LEVELS:
        if type(level) is str:
            lowered = level.lower()
            lowered = LEVEL_ALIASES.get(lowered, lowered)
            if lowered in LEVELS:
                data["level"] = lowered
                level = lowered
        if level not in LEVELS:
            reason = "missing_field" if level is None else "invalid_field"
            raise MessageError(reason, f"data.level must be one of {', '.join(LEVELS)}, got {str(level)[:40]!r}")
    _need_str(data, "message", "data")


def _check_metric(data: dict) -> None:
    if not _need_str(data, "name", "data"):
        raise MessageError("invalid_field", "data.name must not be empty")
    _need_number(data, "value", "data")
    unit = data.get("unit")
    if unit is not None and type(unit) is not str:
        raise MessageError("invalid_field", f"data.unit must be a string, got {_kind(unit)}")
    tags = data.get("tags")
    if tags is not None:
        if type(tags) is not dict or any(type(v) is not str for v in tags.values()):
            raise MessageError("invalid_field", "data.tags must be an object of string values")


def _check_progress(data: dict) -> None:
    job_id = data.get("job_id")
    if type(job_id) is int:
        data["job_id"] = str(job_id)
    elif type(job_id) is not str or not job_id:
        raise MessageError("missing_field" if job_id is None else "invalid_field", "data.job_id must be a non-empty string")
    percent = _need_number(data, "percent", "data")
    if not 0 <= percent <= 100:
        raise MessageError("invalid_field", f"data.percent must be within 0..100, got {percent}")
    _need_str(data, "status", "data")


def _check_resource(data: dict) -> None:
    for key, value in data.items():
        if value is not None and not _is_number(value):
            raise MessageError("invalid_field", f"data.{key} must be a number, got {_kind(value)}")


def _check_span(data: dict) -> None:
    _need_str(data, "name", "data")
    phase = data.get("phase")
    if phase == "end":
        _need_str(data, "status", "data")
        if _need_number(data, "duration_ms", "data") < 0:
            raise MessageError("invalid_field", "data.duration_ms must not be negative")
    elif phase != "start":
        raise MessageError("missing_field" if phase is None else "invalid_field", "data.phase must be 'start' or 'end'")


_DATA_CHECKS = {
    "event": _check_event,
    "metric": _check_metric,
    "progress": _check_progress,
    "resource": _check_resource,
    "span": _check_span,
}


_LEVEL_SET = frozenset(LEVELS)
_TRACE_ID = re.compile(f"[0-9a-f]{{{TRACE_ID_LENGTH}}}")
_SPAN_ID = re.compile(f"[0-9a-f]{{{SPAN_ID_LENGTH}}}")


class _SeenValid(set):
    """Values already found valid and canonical. Sources are few, and ids and millisecond
    timestamps repeat across the messages of a trace or a burst, so a set lookup replaces a
    regex match or a scan for most messages. Cleared when full, to stay bounded."""

    def remember(self, value) -> None:
        if len(self) >= 8192:
            self.clear()
        self.add(value)


_valid_sources = _SeenValid()
_valid_timestamps = _SeenValid()
_valid_trace_ids = _SeenValid()
_valid_span_ids = _SeenValid()


def _checked_id(key: str, value, pattern: re.Pattern, seen: _SeenValid) -> str:
    """The id in canonical form (lower case), or MessageError."""
    if type(value) is str:
        lowered = value.lower()
        if pattern.fullmatch(lowered):
            if lowered == value:
                seen.remember(value)
            return lowered
    size = TRACE_ID_LENGTH if pattern is _TRACE_ID else SPAN_ID_LENGTH
    raise MessageError("invalid_field", f"{key} must be {size} lowercase hex digits, got {str(value)[:40]!r}")


def _check_source(source) -> None:
    if type(source) is not str or not source:
        reason = "missing_field" if source is None else "invalid_field"
        raise MessageError(reason, f"source must be a non-empty string, got {_kind(source)}")
    if len(source) > MAX_SOURCE_LENGTH or not source.isprintable():
        raise MessageError("invalid_field", f"source must be at most {MAX_SOURCE_LENGTH} printable characters")
    _valid_sources.remember(source)


def _checked_timestamp(timestamp) -> str:
    canonical = normalise_timestamp(timestamp)
    if canonical == timestamp:
        _valid_timestamps.remember(canonical)
    return canonical


def validate_message(message: dict, max_depth: int = DEFAULT_MAX_DEPTH) -> None:
    """Check one decoded message against protocol v1 and normalise it in place.

    Raises MessageError naming the field at fault. Normalises: event level aliases, the
    timestamp to RFC 3339 UTC with ms, upper-case ids to lower case, an integer job_id to a
    string; null optional keys are removed. This runs for every message: the common case is
    checked inline, and each field's slow path (normalising, or explaining) is a call away.
    """
    problem = free_form_problem(message, max_depth)
    if problem is not None:
        raise problem
    get = message.get
    source = get("source")
    if type(source) is not str or source not in _valid_sources:
        _check_source(source)
    kind = get("type")
    if type(kind) is not str:  # before any lookup: an object or array as type is unhashable
        _raise_unknown_type(kind)
    data = get("data")
    if type(data) is not dict:
        if kind not in _DATA_CHECKS:
            _raise_unknown_type(kind)
        raise MessageError("missing_field" if data is None else "invalid_field", f"data must be an object, got {_kind(data)}")
    if kind == "event":
        level = data.get("level")
        if type(level) is not str or level not in _LEVEL_SET or type(data.get("message")) is not str:
            _check_event(data)
    else:
        check = _DATA_CHECKS.get(kind)
        if check is None:
            _raise_unknown_type(kind)
        check(data)
    timestamp = get("timestamp")
    if timestamp is not None:
        if type(timestamp) is not str or timestamp not in _valid_timestamps:
            message["timestamp"] = _checked_timestamp(timestamp)
    elif "timestamp" in message:
        del message["timestamp"]
    trace_id = get("trace_id")
    if trace_id is not None:
        if type(trace_id) is not str or trace_id not in _valid_trace_ids:
            message["trace_id"] = _checked_id("trace_id", trace_id, _TRACE_ID, _valid_trace_ids)
    elif "trace_id" in message:
        del message["trace_id"]
    span_id = get("span_id")
    if span_id is not None:
        if type(span_id) is not str or span_id not in _valid_span_ids:
            message["span_id"] = _checked_id("span_id", span_id, _SPAN_ID, _valid_span_ids)
    else:
        if "span_id" in message:
            del message["span_id"]
        if kind == "span":
            raise MessageError("missing_field", "span_id is required on span messages")
    parent = get("parent_span_id")
    if parent is not None:
        if type(parent) is not str or parent not in _valid_span_ids:
            message["parent_span_id"] = _checked_id("parent_span_id", parent, _SPAN_ID, _valid_span_ids)
    elif "parent_span_id" in message:
        del message["parent_span_id"]
    context = get("context")
    if context is not None:
        if type(context) is not dict:
            raise MessageError("invalid_field", f"context must be an object, got {_kind(context)}")
        job_id = context.get("job_id")
        if job_id is not None and type(job_id) is not str:
            if type(job_id) is not int:
                raise MessageError("invalid_field", f"context.job_id must be a string, got {_kind(job_id)}")
            context["job_id"] = str(job_id)
    elif "context" in message:
        del message["context"]


def free_form_problem(message: dict, max_depth: int = DEFAULT_MAX_DEPTH) -> MessageError | None:
    """What is wrong with the values anywhere in a message that no field check looks at, or None:
    nesting deeper than `max_depth` levels (`too_deep`), or a float that is NaN or infinite
    (`not_finite`, which JSON cannot carry: only MessagePack can send one). Iterative, so no
    depth of nesting can exhaust the stack."""
    # The common shape first, inline: objects of scalars under the top level (data, context).
    # Anything nested deeper, or a float that is not finite, takes the full walk below.
    for value in message.values():
        kind = type(value)
        if kind is dict:
            for inner in value.values():
                inner_kind = type(inner)
                if inner_kind is float:
                    if inner - inner != 0.0:  # NaN or an infinity (a finite float gives 0.0)
                        return _free_form_walk(message, max_depth)
                elif inner_kind is dict or inner_kind is list:
                    return _free_form_walk(message, max_depth)
        elif kind is float:
            if value - value != 0.0:
                return _free_form_walk(message, max_depth)
        elif kind is list:
            return _free_form_walk(message, max_depth)
    return None


def _free_form_walk(message: dict, max_depth: int) -> MessageError | None:
    pending = [(message, 1, ())]
    while pending:
        container, depth, path = pending.pop()
        items = container.items() if type(container) is dict else enumerate(container)
        for key, value in items:
            kind = type(value)
            if kind is float:
                if value - value != 0.0:  # NaN or an infinity (a finite float gives 0.0)
                    return MessageError("not_finite", f"{_path(path, key)} must be a finite number, got {value}")
            elif kind is dict or kind is list:
                if depth >= max_depth:
                    return MessageError("too_deep", f"{_path(path, key)} nests deeper than {max_depth} levels")
                pending.append((value, depth + 1, (*path, key)))
    return None


def _path(path: tuple, key) -> str:
    return ".".join(map(str, (*path, key)))[:200]


def _raise_unknown_type(kind):
    if kind is None:
        raise MessageError("missing_field", "type is required")
    raise MessageError("unknown_type", f"type must be one of {', '.join(sorted(MESSAGE_TYPES))}, got {str(kind)[:40]!r}")


def job_id_of(message: dict):
    """The job a message belongs to: its context.job_id, or else the job_id of a progress
    message. The one rule in Python for the live index, the correlator and PostgreSQL's job_id
    column (native/src/enrich.rs has the Rust copy, checked against it by tests/test_native.py)."""
    context = message.get("context")
    job_id = context.get("job_id") if context else None
    if job_id is None and message["type"] == "progress":
        return message["data"]["job_id"]
    return job_id
