"""The tables: created when missing (schema, table, indexes, a TimescaleDB hypertable or a BRIN
index on the time column), never altered or dropped; an existing one checked for the columns
COPY needs, and for whether their types are exactly those binary COPY sends (else text COPY,
which lets the server convert). The same rules for the events table and the aggregates table
(`rows.TableShape` says what each holds). All blocking, on the backend's connection, in its
worker thread."""

import logging

import psycopg
from psycopg import sql

from sidecar.backends.postgres.errors import Misconfigured, Scrubber
from sidecar.backends.postgres.settings import PostgresSettings
from sidecar.backends.postgres.table import Table

log = logging.getLogger("sidecar.backends.postgres")

# information_schema's names of the COPY types: binary COPY needs the columns to be exactly these.
_TYPE_NAMES = {
    "timestamptz": "timestamp with time zone", "text": "text", "float8": "double precision", "jsonb": "jsonb",
    "bool": "boolean", "int8": "bigint",
}


# PostgreSQL keeps at most this many bytes of a name (NAMEDATALEN - 1) and cuts longer ones.
MAX_NAME_LENGTH = 63


def index_name(table: str, suffix: str) -> str:
    """`<table>_<suffix>`, with the table's part shortened when the whole would be longer than
    PostgreSQL keeps: so the name looked up is the name created, and the suffixes keep a long
    table's indexes apart (cut from the end, they could all become one name). Names are ASCII
    (the settings' identifiers), so characters are bytes."""
    whole = f"{table}_{suffix}"
    return whole if len(whole) <= MAX_NAME_LENGTH else f"{table[: MAX_NAME_LENGTH - len(suffix) - 1]}_{suffix}"


def prepare(conn: psycopg.Connection, settings: PostgresSettings, table: Table, *, label: str, scrub: Scrubber) -> bool:
    """Create what is missing (schema, table, indexes, hypertable), never alter or drop. Returns
    whether TimescaleDB is enabled in the database."""
    schema, name, shape, qualified = table.schema, table.name, table.shape, table.qualified
    index_names = {
        index_name(name, suffix): sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} ({})").format(
            sql.Identifier(index_name(name, suffix)), qualified, sql.SQL(", ").join(map(sql.Identifier, columns)),
        )
        for suffix, columns in shape.indexes
    }
    brin_name = index_name(name, shape.brin)

    def present(relation: str) -> bool:
        return conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f'"{schema}"."{relation}"',)).fetchone()[0]

    timescaledb = bool(conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'").fetchone())
    missing = [n for n in (name, *index_names) if not present(n)]
    conn.rollback()
    if missing and settings.create_schema:
        with conn.transaction():
            # Two sidecars starting together must not race on CREATE ... IF NOT EXISTS.
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"monitoring-sidecar schema {table}",))
            created = not present(name)
            if schema != "public":
                conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
            columns = sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(shape.column_types[c])) for c in shape.columns)
            conn.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(qualified, columns))
            for index, statement in index_names.items():
                _create_index(conn, statement, index, table, label)
            if created and settings.hypertable:
                timescaledb = _try_timescaledb(conn, label=label, scrub=scrub)
            if timescaledb and created:
                conn.execute(
                    "SELECT create_hypertable(%s::regclass, %s, chunk_time_interval => %s * interval '1 second', if_not_exists => TRUE)",
                    (f'"{schema}"."{name}"', shape.time, settings.chunk_time_interval),
                )
                log.info("backend %s: created TimescaleDB hypertable %s", label, table)
            elif created or not _is_hypertable(conn, table, timescaledb):
                brin = sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} USING brin ({})").format(
                    sql.Identifier(brin_name), qualified, sql.Identifier(shape.time),
                )
                _create_index(conn, brin, brin_name, table, label)
                if created:
                    log.info("backend %s: created table %s (plain PostgreSQL, BRIN index on %s)", label, table, shape.time)
    return timescaledb


def _create_index(conn: psycopg.Connection, statement: sql.Composable, name: str, table: Table, label: str) -> None:
    """An index, when the role may make it: on a table another role owns it may not, and the
    writes need no index (the view's reads of the table are slower without it), so a refusal is
    a warning and costs this index alone (under a savepoint)."""
    try:
        with conn.transaction():
            conn.execute(statement)
    except psycopg.errors.InsufficientPrivilege as exc:
        log.warning("backend %s: cannot create index %s on %s (%s); writing without it (reading jobs and traces back is slower): its owner can create it", label, name, table, str(exc).splitlines()[0])


def column_types(conn: psycopg.Connection, table: Table) -> dict[str, str]:
    """The table's columns and their types (information_schema's names); empty if it is missing."""
    found = dict(conn.execute(
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = %s AND table_name = %s",
        (table.schema, table.name),
    ).fetchall())
    conn.rollback()
    return found


def checked_columns(conn: psycopg.Connection, table: Table) -> dict[str, str]:
    """`column_types`, raising Misconfigured when the table or one of its shape's columns is missing."""
    found = column_types(conn, table)
    if not found:
        raise Misconfigured(f"table {table} does not exist (create_schema is off)")
    lacking = [c for c in table.shape.columns if c not in found]
    if lacking:
        raise Misconfigured(f"table {table} lacks columns {', '.join(lacking)}; it is never altered by the sidecar")
    return found


def other_types(table: Table, found: dict[str, str]) -> list[str]:
    """The columns (as "name type") whose type is not the one binary COPY sends: none means
    binary COPY fits the table."""
    shape = table.shape
    return [f"{c} {found.get(c)}" for c, t in zip(shape.columns, shape.copy_types) if found.get(c) != _TYPE_NAMES[t]]


def _try_timescaledb(conn: psycopg.Connection, *, label: str, scrub: Scrubber) -> bool:
    if not conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'").fetchone():
        return False
    try:
        with conn.transaction():  # a savepoint: lacking the privilege must not abort the rest
            conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
    except psycopg.Error as exc:
        log.info("backend %s: TimescaleDB is available but cannot be enabled (%s); using plain PostgreSQL", label, scrub(str(exc)).splitlines()[0])
    return bool(conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'").fetchone())


def _is_hypertable(conn: psycopg.Connection, table: Table, timescaledb: bool) -> bool:
    if not timescaledb:
        return False
    return bool(conn.execute(
        "SELECT 1 FROM timescaledb_information.hypertables WHERE hypertable_schema = %s AND hypertable_name = %s",
        (table.schema, table.name),
    ).fetchone())
