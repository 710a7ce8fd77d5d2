"""PostgresBackend: the write path, one transaction per batch, and open, probe and close.

Binary COPY, streamed: each message becomes a row (`rows.binary_row_of`) and is written as soon
as it is made, so the server parses and indexes the first rows while the sidecar is still making
the last ones; binary rows spare the server the parsing of timestamps, numbers and escapes
(figures in docs/performance.md). A message the binary encoding cannot carry as it is (a
timestamp Python cannot read, a `value` that is not a number) goes into a second, text COPY in
the same transaction, so the server judges it as before. A table whose columns have other types
than the ones created here (an existing table made with `numeric`, `json`, `varchar`...) is
written with text COPY throughout, which lets the server convert; so is one whose column types
change while the sidecar runs, after one failed attempt.

Why a worker thread and not trio-asyncio: psycopg's blocking API runs in a worker thread
(`run_blocking`) on a connection owned by this backend. The hand-off is small beside a batch's
COPY, and the per-row work (making the rows, psycopg's formatting, the server's parsing and index
upkeep) is the same under the async API (docs/performance.md). trio-asyncio would also need an
asyncio loop open around the whole sidecar (`open`/`write_batch`/`aclose` are separate calls
from the delivery task), a core change for one backend. The thread is never left running behind
a retry: on cancellation (the per-attempt timeout) a call that has not started is skipped and a
running statement is cancelled on the server, so the timeout takes effect without a write ever
being duplicated.

Exactly once: each batch is one transaction whose id is read before the COPY. If the connection
breaks and the outcome is unknown (the COMMIT may have reached the server while its reply was
lost), the retry of that batch first asks the server `pg_xact_status(xid)` and does not write
it again if it committed. A batch whose COMMIT succeeded while its attempt was being cancelled is
remembered the same way.

Aggregates: with `aggregates_table` set, the batch's aggregates (`type: metric` with
`data.aggregation`) go into that table by their own COPY (`rows.AGGREGATES`), the other
messages into the events table, both in the batch's one transaction: the resolution by
transaction id, the binary/text choice (per table) and the isolation of poison rows cover both.

Poison rows: when a COPY fails on a row-level error (bad data, out of range, too large), the same
transaction retries the rows in halves under savepoints until the bad rows are alone; the others
commit, and `PartialDelivery` reports each bad row with the server's reason (or `unencodable`
for a value that cannot be sent at all).

Passwords never leave this backend: every error raised carries a message scrubbed of the
password (`errors.classified`).
"""

import logging

import attrs
import psycopg

from sidecar.backends.base import Attempt, Backend, BlockingCalls, PartialDelivery, RetryableError
from sidecar.backends.postgres import schema
from sidecar.backends.postgres.errors import Scrubber, classified, row_level, row_reason, unencodable
from sidecar.backends.postgres.read import read_messages
from sidecar.backends.postgres.rows import AGGREGATES, EVENTS, JsonbBytes
from sidecar.backends.postgres.settings import PostgresSettings
from sidecar.backends.postgres.table import Table
from sidecar.transforms.filter import is_aggregate

log = logging.getLogger("sidecar.backends.postgres")


@attrs.define
class Transaction:
    """What the tries of one batch left (an attempt's state): the id of a transaction begun
    whose commit was not seen to succeed or fail, and whether one of them is known committed."""

    xid: str | None = None
    committed: bool = False


class PostgresBackend(Backend):
    type_name = "postgres"
    Settings = PostgresSettings
    # Larger batches than the shared default of 1000: fewer per-batch costs (the transaction, the
    # hand-off, the pause between COPYs) per row; figures in docs/performance.md. The time limit
    # is unchanged.
    delivery_defaults = {"batch": {"max_messages": 5000}}
    # The stored job and trace view reads the table back (sidecar/stored_view.py).
    read_messages = staticmethod(read_messages)

    def __init__(self, settings: PostgresSettings, *, label: str):
        super().__init__(settings, label=label)
        self.scrub = Scrubber(settings.connection_string)
        self.events = Table(EVENTS, settings.schema, settings.table)
        # Where the batch's aggregates go: their own typed table, or None (the events table).
        self.aggregates = Table(AGGREGATES, settings.schema, settings.aggregates_table) if settings.aggregates_table else None
        self.tables = [self.events, *([self.aggregates] if self.aggregates else [])]
        self.timescaledb = False  # known after the first open
        self._conn: psycopg.Connection | None = None
        self._schema_ready = False
        # On cancellation a running statement is cancelled on the server; the state the call
        # leaves in the attempt (`Transaction`) tells the retry what happened.
        self.blocking = BlockingCalls(self._cancel_statement, grace=settings.connect_timeout)

    # ---------------------------------------------------------------- the Backend contract

    async def open(self) -> None:
        await self.run_blocking(self._open)

    async def probe(self) -> None:
        await self.run_blocking(self._probe)

    def _probe(self) -> None:
        """Connected and answering: `SELECT 1` on the connection the writes use."""
        self._open()
        try:
            self._conn.execute("SELECT 1")
            self._conn.rollback()
        except Exception as exc:
            self._close()
            raise classified(exc, "probe", self.scrub) from None

    async def write_batch(self, attempt: Attempt) -> None:
        if attempt.state is None:
            attempt.state = Transaction()
        rejected = await self.run_blocking(self._write, attempt.state, attempt.batch.messages())
        if rejected:
            details = "; ".join(f"#{index}: {reason} ({detail})" for index, (reason, detail) in sorted(rejected.items())[:5])
            more = f"; and {len(rejected) - 5} more" if len(rejected) > 5 else ""
            raise PartialDelivery(f"rows refused by PostgreSQL: {details}{more}", {i: reason for i, (reason, _d) in rejected.items()})

    async def aclose(self) -> None:
        await self.run_blocking(self._close)

    def _cancel_statement(self) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            conn.cancel_safe(timeout=self.settings.connect_timeout)
        except Exception:  # best effort: the statement timeout and TCP timeouts still apply
            log.debug("backend %s: cancel request failed", self.label, exc_info=True)

    # ---------------------------------------------------------------- in the worker thread

    def _open(self) -> None:
        if self._conn is not None and not self._conn.closed and not self._conn.broken:
            return
        self._close()
        try:
            options = f"-c statement_timeout={int(self.settings.statement_timeout * 1000)}"
            self._conn = psycopg.connect(
                self.settings.connection_string,
                connect_timeout=max(1, int(self.settings.connect_timeout)),
                application_name=self.settings.application_name,
                options=options,
                keepalives=1, keepalives_idle=30, keepalives_interval=10, keepalives_count=3,
                tcp_user_timeout=int(self.settings.connect_timeout * 1000),
                autocommit=False,
            )
            self._conn.adapters.register_dumper(None, JsonbBytes)
            if not self._schema_ready:
                self._prepare_schema(self._conn)
                self._schema_ready = True
        except Exception as exc:
            self._close()
            raise classified(exc, "cannot connect", self.scrub) from None

    def _write(self, tx: "Transaction", batch: list[dict]) -> dict[int, tuple[str, str]]:
        if tx.committed:
            return {}  # committed by a try whose success was not seen (cancelled meanwhile)
        self._open()
        conn = self._conn
        rejected: dict[int, tuple[str, str]] = {}
        began = False
        try:
            if tx.xid is not None and self._resolve_unknown_outcome(conn, tx, len(batch)):
                return {}
            self._begin(conn, tx)
            began = True
            parts = self._parts(batch)
            table = None
            try:
                for table, indexes in parts:
                    self._copy_part(conn, table, batch, indexes, rejected)
            except psycopg.Error as exc:
                if table.binary_copy and exc.sqlstate in ("22P03", "08P01") and not conn.broken and not conn.closed:
                    # "incorrect binary data format", "insufficient data left in message": has a
                    # column's type changed since the check (ALTER TABLE)? Nothing was written;
                    # if so, the retry uses text COPY for that table.
                    conn.rollback()
                    tx.xid = None
                    if self._binary_fits(conn, table):
                        raise
                    log.warning("backend %s: binary COPY into %s refused (%s); writing it with text COPY from now on", self.label, table, self.scrub(str(exc)).splitlines()[0])
                    raise RetryableError(f"write failed: a column's type in {table} no longer fits binary COPY; retrying with text COPY") from None
                if not row_level(exc, conn):
                    raise
                # Start over in a new transaction and find the bad rows under savepoints.
                conn.rollback()
                tx.xid = None
                self._begin(conn, tx)
                rejected = {}
                for table, indexes in parts:
                    self._isolate_part(conn, table, batch, indexes, rejected)
            conn.commit()
            tx.xid = None
            tx.committed = True
            return rejected
        except Exception as exc:
            if not conn.broken and not conn.closed:
                if began:
                    # The server answered with an error: this transaction did not commit.
                    tx.xid = None
                try:
                    conn.rollback()
                except psycopg.Error:
                    self._close()
            else:
                self._close()
            raise classified(exc, "write failed", self.scrub) from None

    def _begin(self, conn: psycopg.Connection, tx: "Transaction") -> None:
        tx.xid = conn.execute("SELECT pg_current_xact_id()::text").fetchone()[0]

    def _resolve_unknown_outcome(self, conn: psycopg.Connection, tx: "Transaction", size: int) -> bool:
        """True when the transaction of an earlier try, whose commit was in doubt, did commit."""
        xid = tx.xid
        try:
            status = conn.execute("SELECT pg_xact_status(%s::xid8)", (xid,)).fetchone()[0]
        except psycopg.errors.InvalidParameterValue:
            # "transaction ID ... is in the future": the server crashed and restarted before that
            # transaction wrote anything durable, so it cannot have committed.
            conn.rollback()
            tx.xid = None
            log.info("backend %s: transaction %s was lost with a server restart before it committed; writing its batch again", self.label, xid)
            return False
        conn.rollback()
        if status == "in progress":
            raise RetryableError(f"the previous attempt's transaction {xid} is still in progress on the server")
        tx.xid = None
        if status == "committed":
            log.info("backend %s: the batch of %d whose commit reply was lost did commit (transaction %s); not writing it again", self.label, size, xid)
            tx.committed = True
            return True
        if status is None:
            log.warning("backend %s: the outcome of transaction %s is no longer known; writing its batch again (may duplicate)", self.label, xid)
        return False

    def _parts(self, batch: list[dict]) -> list[tuple[Table, range | list[int]]]:
        """The tables the batch's messages go into, each with the indexes of its messages (in
        batch order); only tables that get some."""
        if self.aggregates is None:
            return [(self.events, range(len(batch)))]
        events, aggregates = [], []
        for index, message in enumerate(batch):
            (aggregates if is_aggregate(message) else events).append(index)
        return [(table, indexes) for table, indexes in ((self.events, events), (self.aggregates, aggregates)) if indexes]

    def _copy_part(self, conn: psycopg.Connection, table: Table, batch: list[dict], indexes, rejected: dict) -> None:
        """The messages at `indexes` into `table`: streaming binary COPY, then text COPY for those
        binary COPY cannot carry (or text COPY throughout when binary does not fit the table)."""
        leftovers = self._copy_streaming(conn, table, batch, indexes, table.binary_copy, rejected)
        if leftovers:
            text_rows = self._text_rows(table, batch, leftovers, rejected)
            if text_rows:
                self._copy(conn, table, [row for _i, row in text_rows], binary=False)

    def _isolate_part(self, conn: psycopg.Connection, table: Table, batch: list[dict], indexes, rejected: dict) -> None:
        """`_copy_part` under savepoints, the bad rows found and added to `rejected`."""
        if table.binary_copy:
            binary_rows, leftovers = self._binary_rows(table, batch, indexes)
            rejected.update(self._copy_isolating(conn, table, binary_rows, binary=True))
        else:
            leftovers = indexes
        text_rows = self._text_rows(table, batch, leftovers, rejected)
        rejected.update(self._copy_isolating(conn, table, text_rows, binary=False))

    def _copy_streaming(self, conn: psycopg.Connection, table: Table, batch: list[dict], indexes, binary: bool, rejected: dict) -> list[int]:
        """COPY of the messages at `indexes`, each row written as soon as it is made. Binary:
        returns the indexes of the messages the binary row could not take, left for
        `_text_rows`. Text: a message that cannot be encoded goes to `rejected`."""
        leftovers = []
        moments = {}
        shape = table.shape
        make_row = shape.binary_row_of if binary else shape.row_of
        with conn.cursor().copy(table.copy_binary_sql if binary else table.copy_sql) as copy:
            if binary:
                copy.set_types(shape.copy_types)
            write_row = copy.write_row
            for index in indexes:
                try:
                    row = make_row(batch[index], moments) if binary else make_row(batch[index])
                except Exception as exc:
                    if binary:
                        leftovers.append(index)
                    else:
                        rejected[index] = unencodable(exc)
                    continue
                try:
                    write_row(row)
                except psycopg.Error:
                    raise
                except Exception as exc:  # e.g. a lone surrogate in a string: the COPY is abandoned
                    raise psycopg.DataError(f"{type(exc).__name__}: {exc}"[:200]) from None
        return leftovers

    @staticmethod
    def _binary_rows(table: Table, batch: list[dict], indexes) -> tuple[list[tuple[int, tuple]], list[int]]:
        rows, leftovers = [], []
        moments = {}
        binary_row_of = table.shape.binary_row_of
        for index in indexes:
            try:
                rows.append((index, binary_row_of(batch[index], moments)))
            except Exception:
                leftovers.append(index)
        return rows, leftovers

    @staticmethod
    def _text_rows(table: Table, batch: list[dict], indexes, rejected: dict) -> list[tuple[int, tuple]]:
        """Text COPY rows of the messages at `indexes`; those that cannot be encoded at all go to
        `rejected`."""
        rows = []
        row_of = table.shape.row_of
        for index in indexes:
            try:
                rows.append((index, row_of(batch[index])))
            except Exception as exc:  # e.g. a value orjson cannot encode
                rejected[index] = unencodable(exc)
        return rows

    def _copy(self, conn: psycopg.Connection, table: Table, rows: list[tuple], *, binary: bool) -> None:
        with conn.cursor().copy(table.copy_binary_sql if binary else table.copy_sql) as copy:
            if binary:
                copy.set_types(table.shape.copy_types)
            write_row = copy.write_row
            for row in rows:
                try:
                    write_row(row)
                except psycopg.Error:
                    raise
                except Exception as exc:  # a value psycopg cannot send: the COPY is abandoned
                    raise psycopg.DataError(f"{type(exc).__name__}: {exc}"[:200]) from None

    def _copy_isolating(self, conn: psycopg.Connection, table: Table, rows: list[tuple[int, tuple]], *, binary: bool) -> dict[int, tuple[str, str]]:
        """COPY `rows` (index, row) under savepoints, splitting failed chunks in halves until
        each bad row is alone; returns the bad rows' reasons. All in the current transaction."""
        rejected = {}
        pending = [rows] if rows else []
        while pending:
            chunk = pending.pop()
            conn.execute("SAVEPOINT sidecar_rows")
            try:
                self._copy(conn, table, [row for _i, row in chunk], binary=binary)
            except psycopg.Error as exc:
                if not row_level(exc, conn):
                    raise
                conn.execute("ROLLBACK TO SAVEPOINT sidecar_rows")
                conn.execute("RELEASE SAVEPOINT sidecar_rows")
                if len(chunk) == 1:
                    rejected[chunk[0][0]] = row_reason(exc, self.scrub)
                elif len(chunk) <= 8:
                    pending.extend([row] for row in reversed(chunk))
                else:
                    middle = len(chunk) // 2
                    pending.extend((chunk[middle:], chunk[:middle]))
            else:
                conn.execute("RELEASE SAVEPOINT sidecar_rows")
        return rejected

    def _prepare_schema(self, conn: psycopg.Connection) -> None:
        """For each table: create what is missing, check the columns COPY needs, choose binary or
        text COPY."""
        for table in self.tables:
            self.timescaledb = schema.prepare(conn, self.settings, table, label=self.label, scrub=self.scrub) or self.timescaledb
            self._binary_fits(conn, table, schema.checked_columns(conn, table))

    def _binary_fits(self, conn: psycopg.Connection, table: Table, found: dict[str, str] | None = None) -> bool:
        """Sets and returns the table's `binary_copy`: whether every column has the type binary
        COPY sends."""
        found = schema.column_types(conn, table) if found is None else found
        other = schema.other_types(table, found)
        if other and table.binary_copy:
            log.info(
                "backend %s: table %s has columns of other types (%s): writing with text COPY, which lets PostgreSQL convert",
                self.label, table, ", ".join(other),
            )
        table.binary_copy = not other
        return table.binary_copy

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass  # closing a broken connection; nothing is left to release
