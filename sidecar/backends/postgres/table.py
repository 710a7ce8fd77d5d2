"""One table the backend writes: its shape (`rows.TableShape`: the events table's or the
aggregates table's), its name, its COPY statements, and whether binary COPY fits its columns
(set once they are checked, `schema.other_types`)."""

from psycopg import sql

from sidecar.backends.postgres.rows import TableShape


class Table:
    def __init__(self, shape: TableShape, schema: str, name: str):
        self.shape = shape
        self.schema = schema
        self.name = name
        self.qualified = sql.Identifier(schema, name)
        column_list = sql.SQL(", ").join(map(sql.Identifier, shape.columns))
        self.copy_sql = sql.SQL("COPY {} ({}) FROM STDIN").format(self.qualified, column_list)
        self.copy_binary_sql = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(self.qualified, column_list)
        # Binary COPY when the columns have exactly the types it sends; text COPY, which lets
        # the server convert, for a table made otherwise.
        self.binary_copy = True

    def __str__(self) -> str:
        return f"{self.schema}.{self.name}"
