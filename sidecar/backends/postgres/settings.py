"""The settings of a postgres backend (`backends: {NAME: {type: postgres, ...}}`)."""

import re

import attrs
import psycopg
import psycopg.conninfo

from sidecar.units import Duration

_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,47}")


def _identifier(_instance, attribute, value) -> None:
    if not _IDENTIFIER.fullmatch(value):
        raise ValueError(f"'{attribute.name}' must be a lower-case SQL identifier ([a-z_][a-z0-9_]*, at most 48 characters), got {value!r}")


@attrs.frozen
class PostgresSettings:
    connection_string: str  # libpq URL or key=value string; use ${ENV} for the password
    table: str = attrs.field(default="monitoring_events", validator=_identifier)
    schema: str = attrs.field(default="public", validator=_identifier)
    # Aggregates (`type: metric` with `data.aggregation`) into this table of typed columns, in
    # the same schema; None: into `table` like every metric.
    aggregates_table: str | None = attrs.field(default=None, validator=attrs.validators.optional(_identifier))
    create_schema: bool = True  # create the schema, table and indexes when missing
    hypertable: bool = True  # make a new table a TimescaleDB hypertable when the extension is available
    chunk_time_interval: Duration = attrs.field(default=86400.0, validator=attrs.validators.gt(0))
    connect_timeout: Duration = attrs.field(default=10.0, validator=attrs.validators.ge(1))
    statement_timeout: Duration = attrs.field(default=60.0, validator=attrs.validators.ge(0))  # 0: none
    application_name: str = "monitoring-sidecar"

    def __attrs_post_init__(self):
        if self.aggregates_table == self.table:
            raise ValueError(f"'aggregates_table' must name another table than 'table' ({self.table!r}): its columns are others")
        try:
            psycopg.conninfo.conninfo_to_dict(self.connection_string)
        except psycopg.Error:
            # libpq's message quotes the text it could not parse, which may be the password.
            raise ValueError("connection_string is neither a postgresql:// URL nor a key=value connection string") from None
