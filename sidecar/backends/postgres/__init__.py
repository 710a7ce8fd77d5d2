"""PostgreSQL and TimescaleDB: one table with typed columns (and, when configured, a second one
for aggregates), written with binary COPY, one transaction per batch (docs/postgres.md).

- `backend.py`: `PostgresBackend` (the write path; open, probe, close) and `Transaction`, what
  the tries of one batch leave for the next (exactly once across lost commit replies).
- `settings.py`: `PostgresSettings`.
- `rows.py`: the columns and their types, a message as a text or a binary COPY row, NUL
  characters replaced; `TableShape`, what the events table (`EVENTS`) and the aggregates table
  (`AGGREGATES`) each hold.
- `table.py`: `Table`, one table written: its shape, name, COPY statements, binary or text COPY.
- `schema.py`: creating a table (a TimescaleDB hypertable when it can), checking an existing
  one, whether binary COPY fits its column types.
- `errors.py`: what an error means (retry, trip the circuit, a refused row), the password
  scrubbed from every message.
- `read.py`: `read_messages`, the messages of a job or trace read back for the stored view
  (`Backend.read_messages`).
"""

from sidecar.backends.postgres.backend import PostgresBackend, Transaction
from sidecar.backends.postgres.read import read_messages
from sidecar.backends.postgres.rows import (
    AGGREGATE_COLUMNS, AGGREGATES, COLUMN_TYPES, COLUMNS, COPY_TYPES, EVENTS, JsonbBytes, TableShape,
    aggregate_binary_row_of, aggregate_row_of, binary_row_of, row_of,
)
from sidecar.backends.postgres.settings import PostgresSettings
from sidecar.backends.postgres.table import Table

__all__ = [
    "AGGREGATES", "AGGREGATE_COLUMNS", "COLUMN_TYPES", "COLUMNS", "COPY_TYPES", "EVENTS", "JsonbBytes", "PostgresBackend",
    "PostgresSettings", "Table", "TableShape", "Transaction", "aggregate_binary_row_of", "aggregate_row_of", "binary_row_of",
    "read_messages", "row_of",
]
