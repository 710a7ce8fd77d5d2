"""A message as a row of the table: the columns, their types, and the two encodings COPY takes.

`row_of` makes the text COPY row (the server parses every value); `binary_row_of` the binary
COPY row (timestamps as aware datetimes, `value` as a double, context and data as JSON text
that `JsonbBytes` sends as jsonb), and raises for a message whose values do not fit those types
as they are, which then goes by text COPY for the server to judge. NUL characters, which
PostgreSQL text and jsonb cannot hold, are replaced by U+FFFD in names, job ids, context and
data. A message is shared with other backends: these functions only read it.
"""

import datetime as dt

import orjson
from psycopg.adapt import Dumper
from psycopg.pq import Format

from sidecar.message import job_id_of

COLUMNS = (
    "time", "received_at", "source", "type", "level", "name", "value",
    "trace_id", "span_id", "parent_span_id", "job_id", "host", "context", "data",
)
COLUMN_TYPES = {
    "time": "timestamptz NOT NULL",
    "received_at": "timestamptz",
    "source": "text NOT NULL",
    "type": "text NOT NULL",
    "level": "text",
    "name": "text",
    "value": "double precision",
    "trace_id": "text",
    "span_id": "text",
    "parent_span_id": "text",
    "job_id": "text",
    "host": "text",
    "context": "jsonb",
    "data": "jsonb",
}
# The columns' types for binary COPY, in COLUMNS order (jsonb is sent by `JsonbBytes`).
COPY_TYPES = (
    "timestamptz", "timestamptz", "text", "text", "text", "text", "float8",
    "text", "text", "text", "text", "text", "jsonb", "jsonb",
)
_NUL_JSON = b"\\u0000"
_TEXT_TYPES = frozenset({str, type(None)})


class JsonbBytes(Dumper):
    """jsonb in binary COPY from JSON text already encoded (bytes): the format's version byte, then
    the text. Registered by oid only, on this backend's connection, for `copy.set_types`."""

    format = Format.BINARY
    oid = 3802  # jsonb

    def dump(self, obj: bytes) -> bytes:
        return b"\x01" + obj


def _without_nul(value):
    """A copy with every NUL character replaced (PostgreSQL text and jsonb cannot hold one)."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {_without_nul(k): _without_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_nul(v) for v in value]
    return value


def _json_bytes(value) -> bytes:
    text = orjson.dumps(value)
    if _NUL_JSON in text:
        text = orjson.dumps(_without_nul(value))
    return text


def _json(value) -> str:
    return _json_bytes(value).decode()


def _text(value) -> str | None:
    if value is None:
        return None
    value = value if isinstance(value, str) else str(value)
    return value.replace("\x00", "\ufffd") if "\x00" in value else value


def _parts(message: dict) -> tuple:
    """type, data, context and the job (context.job_id, or a progress message's own job_id)."""
    return message["type"], message["data"], message.get("context"), job_id_of(message)


def row_of(message: dict) -> tuple:
    """One message as a row in COLUMNS order. The message is shared with other backends: only read."""
    kind, data, context, job_id = _parts(message)
    return (
        message["timestamp"],
        message.get("received_at"),
        message["source"],
        kind,
        data.get("level") if kind == "event" else None,
        _text(data.get("name")) if kind in ("metric", "span") else None,
        data.get("value") if kind == "metric" else None,
        message.get("trace_id"),
        message.get("span_id"),
        message.get("parent_span_id"),
        _text(job_id),
        message.get("host"),
        _json(context) if context is not None else None,
        _json(data),
    )


def _moment(text, cache: dict) -> dt.datetime:
    """A timestamp string as an aware datetime (the batch's `cache` holds the ones already read).
    Raises for anything else, which then goes by text COPY for the server to judge."""
    moment = cache.get(text)
    if moment is None:
        moment = dt.datetime.fromisoformat(text)  # TypeError for a non-string, ValueError for e.g. February 30
        if moment.tzinfo is None:  # the server reads it in its session's zone: text COPY
            raise ValueError("timestamp without an offset")
        cache[text] = moment
    return moment


def binary_row_of(message: dict, moments: dict) -> tuple:
    """`row_of` with the types binary COPY sends (COPY_TYPES). Raises for a message whose values
    do not fit those types as they are; `row_of` and text COPY then take it."""
    kind, data, context, job_id = _parts(message)
    value = data.get("value") if kind == "metric" else None
    if value is not None and type(value) is not float:
        if type(value) is not int:
            raise TypeError("value is not a number")
        value = float(value)  # OverflowError beyond a double
    received_at = message.get("received_at")
    row = (
        _moment(message["timestamp"], moments),
        _moment(received_at, moments) if received_at is not None else None,
        message["source"],
        kind,
        data.get("level") if kind == "event" else None,
        _text(data.get("name")) if kind in ("metric", "span") else None,
        value,
        message.get("trace_id"),
        message.get("span_id"),
        message.get("parent_span_id"),
        _text(job_id),
        message.get("host"),
        _json_bytes(context) if context is not None else None,
        _json_bytes(data),
    )
    if not {type(row[2]), type(kind), type(row[4]), type(row[7]), type(row[8]), type(row[9]), type(row[11])} <= _TEXT_TYPES:
        raise TypeError("a text column's value is not a string")
    return row
