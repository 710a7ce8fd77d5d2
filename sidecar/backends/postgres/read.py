"""Reading messages back from the table: PostgresBackend's `read_messages` capability, which
the stored job and trace view (`sidecar/stored_view.py`) uses."""

import psycopg
from psycopg import sql

from sidecar.backends.postgres.errors import Scrubber
from sidecar.backends.postgres.settings import PostgresSettings
from sidecar.message import format_timestamp


def read_messages(settings: PostgresSettings, *, job_id: str | None = None, trace_id: str | None = None, limit: int = 20_000) -> list[dict]:
    """The messages of one job or trace as the table holds them, oldest first, whichever sidecar
    wrote them: the unified view's answer for jobs that crossed hosts or left the live index. A
    job's are those that name it, and those of the traces linked to it that name no job (a root
    span's start, sent before the job was set, is one). Blocking (call it from a worker thread);
    errors come back with the password removed."""
    table = sql.Identifier(settings.schema, settings.table)
    columns = sql.SQL("SELECT time, received_at, source, type, trace_id, span_id, parent_span_id, host, context, data FROM {}").format(table)
    if job_id is not None:
        where = sql.SQL("WHERE job_id = %s OR (job_id IS NULL AND trace_id IN (SELECT DISTINCT trace_id FROM {} WHERE job_id = %s AND trace_id IS NOT NULL))").format(table)
        parameters = (job_id, job_id, limit)
    else:
        where, parameters = sql.SQL("WHERE trace_id = %s"), (trace_id, limit)
    query = sql.SQL(" ").join([columns, where, sql.SQL("ORDER BY time, received_at LIMIT %s")])
    try:
        with psycopg.connect(settings.connection_string, connect_timeout=int(settings.connect_timeout), application_name=settings.application_name, autocommit=True) as conn:
            rows = conn.execute(query, parameters).fetchall()
    except psycopg.Error as exc:
        raise RuntimeError(Scrubber(settings.connection_string)(str(exc).strip())) from None
    messages = []
    for time, received_at, source, kind, trace, span, parent, host, context, data in rows:
        message = {"source": source, "type": kind, "timestamp": format_timestamp(time), "data": data}
        for key, field in (("trace_id", trace), ("span_id", span), ("parent_span_id", parent), ("context", context), ("host", host)):
            if field is not None:
                message[key] = field
        if received_at is not None:
            message["received_at"] = format_timestamp(received_at)
        messages.append(message)
    return messages
