"""A message as a row of a table: the columns, their types, and the two encodings COPY takes,
for the events table (`EVENTS`) and the typed aggregates table (`AGGREGATES`).

`row_of` makes the text COPY row (the server parses every value); `binary_row_of` the binary
COPY row (timestamps as aware datetimes, `value` as a double, context and data as JSON text
that `JsonbBytes` sends as jsonb), and raises for a message whose values do not fit those types
as they are, which then goes by text COPY for the server to judge. `aggregate_row_of` and
`aggregate_binary_row_of` do the same for an aggregate's row (its `data.aggregation` spread
over typed columns). NUL characters, which PostgreSQL text and jsonb cannot hold, are replaced
by U+FFFD in names, units, job ids, tags, context and data. A message is shared with other
backends: these functions only read it.
"""

import datetime as dt
from collections.abc import Callable

import attrs
import orjson
from psycopg.adapt import Dumper
from psycopg.pq import Format

from sidecar.aggregation import quantile_of
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


# ---------------------------------------------------------------- the aggregates table

AGGREGATE_COLUMNS = (
    "window_start", "window_end", "received_at", "source", "name", "unit", "tags", "partial",
    "count", "sum", "min", "max", "avg", "last", "p50", "p90", "p99", "quantiles",
    "host", "trace_id", "job_id",
)
AGGREGATE_COLUMN_TYPES = {
    "window_start": "timestamptz NOT NULL",
    "window_end": "timestamptz NOT NULL",
    "received_at": "timestamptz",
    "source": "text NOT NULL",
    "name": "text NOT NULL",
    "unit": "text",
    "tags": "jsonb",
    "partial": "boolean NOT NULL",
    "count": "bigint",
    **{stat: "double precision" for stat in ("sum", "min", "max", "avg", "last", "p50", "p90", "p99")},
    "quantiles": "jsonb",
    "host": "text",
    "trace_id": "text",
    "job_id": "text",
}
AGGREGATE_COPY_TYPES = (
    "timestamptz", "timestamptz", "timestamptz", "text", "text", "text", "jsonb", "bool",
    "int8", "float8", "float8", "float8", "float8", "float8", "float8", "float8", "float8", "jsonb",
    "text", "text", "text",
)
_DOUBLES = ("min", "max", "avg", "last", "p50", "p90", "p99")  # after `sum`, in column order
_INT8 = range(-2**63, 2**63)
_SCALARS = (str, int, float, bool, type(None))


def _aggregate_parts(message: dict) -> tuple:
    """data, its aggregation (an object, else TypeError: nothing to spread over the columns),
    the quantiles (every pQ statistic, None when there are none) and the job."""
    data = message["data"]
    aggregation = data["aggregation"]
    if not isinstance(aggregation, dict):
        raise TypeError(f"data.aggregation is not an object but {type(aggregation).__name__}")
    quantiles = {stat: value for stat, value in aggregation.items() if quantile_of(stat) is not None}
    return data, aggregation, quantiles or None, job_id_of(message)


def _sum_of(data: dict, aggregation: dict):
    """The window's sum: the `sum` statistic, else `data.value` (an aggregate's value is its sum)."""
    return aggregation["sum"] if "sum" in aggregation else data.get("value")


def _scalar(aggregation: dict, stat: str, value):
    """A value for a text COPY column as it is, for the server to judge; an object or array
    cannot be one."""
    if not isinstance(value, _SCALARS):
        raise TypeError(f"data.aggregation.{stat} is not a single value but {type(value).__name__}")
    return value


def aggregate_row_of(message: dict) -> tuple:
    """One aggregate as a row in AGGREGATE_COLUMNS order, for text COPY. Raises TypeError for
    an aggregation that is not an object or holds an object where a value belongs."""
    data, aggregation, quantiles, job_id = _aggregate_parts(message)
    tags = data.get("tags")
    stats = [_scalar(aggregation, stat, aggregation.get(stat)) for stat in ("window_start", "window_end", "partial", "count")]
    doubles = [_scalar(aggregation, stat, aggregation.get(stat)) for stat in _DOUBLES]
    return (
        stats[0], stats[1],
        message.get("received_at"),
        message["source"],
        _text(data.get("name")),
        _text(data.get("unit")),
        _json(tags) if tags is not None else None,
        stats[2], stats[3],
        _scalar(aggregation, "sum", _sum_of(data, aggregation)),
        *doubles,
        _json(quantiles) if quantiles is not None else None,
        message.get("host"),
        message.get("trace_id"),
        _text(job_id),
    )


def _double(value) -> float | None:
    if value is None or type(value) is float:
        return value
    if type(value) is not int:
        raise TypeError("a statistic is not a number")
    return float(value)  # OverflowError beyond a double


def aggregate_binary_row_of(message: dict, moments: dict) -> tuple:
    """`aggregate_row_of` with the types binary COPY sends (AGGREGATE_COPY_TYPES). Raises for an
    aggregate whose values do not fit those types as they are; text COPY then takes it."""
    data, aggregation, quantiles, job_id = _aggregate_parts(message)
    partial, count, received_at, tags = aggregation.get("partial"), aggregation.get("count"), message.get("received_at"), data.get("tags")
    if partial is not None and type(partial) is not bool:
        raise TypeError("partial is not a boolean")
    if count is not None and (type(count) is not int or count not in _INT8):
        raise TypeError("count is not a 64-bit integer")
    row = (
        _moment(aggregation.get("window_start"), moments),
        _moment(aggregation.get("window_end"), moments),
        _moment(received_at, moments) if received_at is not None else None,
        message["source"],
        _text(data.get("name")),
        _text(data.get("unit")),
        _json_bytes(tags) if tags is not None else None,
        partial,
        count,
        _double(_sum_of(data, aggregation)),
        *(_double(aggregation.get(stat)) for stat in _DOUBLES),
        _json_bytes(quantiles) if quantiles is not None else None,
        message.get("host"),
        message.get("trace_id"),
        _text(job_id),
    )
    if not {type(row[3]), type(row[18]), type(row[19])} <= _TEXT_TYPES:
        raise TypeError("a text column's value is not a string")
    return row


# ---------------------------------------------------------------- the two kinds of table


@attrs.frozen
class TableShape:
    """What one kind of table holds: its columns (in COPY order) and their types as created,
    the types binary COPY sends, a message's text and binary rows, the time column (the
    hypertable's dimension, else BRIN-indexed), and the indexes' name suffixes: the btrees'
    (with their columns) and the BRIN's; an index is named `<table>_<suffix>`."""

    columns: tuple[str, ...]
    column_types: dict[str, str]
    copy_types: tuple[str, ...]
    row_of: Callable[[dict], tuple]
    binary_row_of: Callable[[dict, dict], tuple]
    time: str
    indexes: tuple[tuple[str, tuple[str, ...]], ...]
    brin: str


EVENTS = TableShape(
    COLUMNS, COLUMN_TYPES, COPY_TYPES, row_of, binary_row_of, "time",
    (("job_id_time_idx", ("job_id", "time")), ("trace_id_idx", ("trace_id",)), ("source_time_idx", ("source", "time"))),
    "time_brin_idx",
)
AGGREGATES = TableShape(
    AGGREGATE_COLUMNS, AGGREGATE_COLUMN_TYPES, AGGREGATE_COPY_TYPES, aggregate_row_of, aggregate_binary_row_of, "window_start",
    (("series_idx", ("source", "name", "window_start")),),
    "window_brin_idx",
)
