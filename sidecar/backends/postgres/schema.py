"""The table: created when missing (schema, table, indexes, a TimescaleDB hypertable or a BRIN
index on time), never altered or dropped; an existing one checked for the columns COPY needs,
and for whether their types are exactly those binary COPY sends (else text COPY, which lets
the server convert). All blocking, on the backend's connection, in its worker thread."""

import logging

import psycopg
from psycopg import sql

from sidecar.backends.postgres.errors import Misconfigured, Scrubber
from sidecar.backends.postgres.rows import COLUMN_TYPES, COLUMNS, COPY_TYPES
from sidecar.backends.postgres.settings import PostgresSettings

log = logging.getLogger("sidecar.backends.postgres")

# information_schema's names of the COPY_TYPES: binary COPY needs the columns to be exactly these.
_TYPE_NAMES = {"timestamptz": "timestamp with time zone", "text": "text", "float8": "double precision", "jsonb": "jsonb"}


def prepare(conn: psycopg.Connection, settings: PostgresSettings, qualified: sql.Identifier, *, label: str, scrub: Scrubber) -> bool:
    """Create what is missing (schema, table, indexes, hypertable), never alter or drop. Returns
    whether TimescaleDB is enabled in the database."""
    schema, table = settings.schema, settings.table
    name = f"{schema}.{table}"
    index_names = {
        f"{table}_job_id_time_idx": sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (job_id, time)"),
        f"{table}_trace_id_idx": sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (trace_id)"),
        f"{table}_source_time_idx": sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (source, time)"),
    }
    brin_name = f"{table}_time_brin_idx"

    def present(relation: str) -> bool:
        return conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f'"{schema}"."{relation}"',)).fetchone()[0]

    timescaledb = bool(conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'").fetchone())
    missing = [n for n in (table, *index_names) if not present(n)]
    conn.rollback()
    if missing and settings.create_schema:
        with conn.transaction():
            # Two sidecars starting together must not race on CREATE ... IF NOT EXISTS.
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"monitoring-sidecar schema {name}",))
            created = not present(table)
            if schema != "public":
                conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
            columns = sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(c), sql.SQL(COLUMN_TYPES[c])) for c in COLUMNS)
            conn.execute(sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(qualified, columns))
            for index_name, statement in index_names.items():
                conn.execute(statement.format(sql.Identifier(index_name), qualified))
            if created and settings.hypertable:
                timescaledb = _try_timescaledb(conn, label=label, scrub=scrub)
            if timescaledb and created:
                conn.execute(
                    "SELECT create_hypertable(%s::regclass, 'time', chunk_time_interval => %s * interval '1 second', if_not_exists => TRUE)",
                    (f'"{schema}"."{table}"', settings.chunk_time_interval),
                )
                log.info("backend %s: created TimescaleDB hypertable %s", label, name)
            elif created or not _is_hypertable(conn, settings, timescaledb):
                conn.execute(sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} USING brin (time)").format(sql.Identifier(brin_name), qualified))
                if created:
                    log.info("backend %s: created table %s (plain PostgreSQL, BRIN index on time)", label, name)
    return timescaledb


def column_types(conn: psycopg.Connection, settings: PostgresSettings) -> dict[str, str]:
    """The table's columns and their types (information_schema's names); empty if it is missing."""
    found = dict(conn.execute(
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = %s AND table_name = %s",
        (settings.schema, settings.table),
    ).fetchall())
    conn.rollback()
    return found


def checked_columns(conn: psycopg.Connection, settings: PostgresSettings) -> dict[str, str]:
    """`column_types`, raising Misconfigured when the table or one of COLUMNS is missing."""
    name = f"{settings.schema}.{settings.table}"
    found = column_types(conn, settings)
    if not found:
        raise Misconfigured(f"table {name} does not exist (create_schema is off)")
    lacking = [c for c in COLUMNS if c not in found]
    if lacking:
        raise Misconfigured(f"table {name} lacks columns {', '.join(lacking)}; it is never altered by the sidecar")
    return found


def other_types(found: dict[str, str]) -> list[str]:
    """The columns (as "name type") whose type is not the one binary COPY sends: none means
    binary COPY fits the table."""
    return [f"{c} {found.get(c)}" for c, t in zip(COLUMNS, COPY_TYPES) if found.get(c) != _TYPE_NAMES[t]]


def _try_timescaledb(conn: psycopg.Connection, *, label: str, scrub: Scrubber) -> bool:
    if not conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'").fetchone():
        return False
    try:
        with conn.transaction():  # a savepoint: lacking the privilege must not abort the rest
            conn.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
    except psycopg.Error as exc:
        log.info("backend %s: TimescaleDB is available but cannot be enabled (%s); using plain PostgreSQL", label, scrub(str(exc)).splitlines()[0])
    return bool(conn.execute("SELECT 1 FROM pg_extension WHERE extname = 'timescaledb'").fetchone())


def _is_hypertable(conn: psycopg.Connection, settings: PostgresSettings, timescaledb: bool) -> bool:
    if not timescaledb:
        return False
    return bool(conn.execute(
        "SELECT 1 FROM timescaledb_information.hypertables WHERE hypertable_schema = %s AND hypertable_name = %s",
        (settings.schema, settings.table),
    ).fetchone())
