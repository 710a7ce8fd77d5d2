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
from psycopg import sql

from sidecar.backends.base import Attempt, Backend, BlockingCalls, PartialDelivery, RetryableError
from sidecar.backends.postgres import schema
from sidecar.backends.postgres.errors import Scrubber, classified, row_level, row_reason, unencodable
from sidecar.backends.postgres.read import read_messages
from sidecar.backends.postgres.rows import COLUMNS, COPY_TYPES, JsonbBytes, binary_row_of, row_of
from sidecar.backends.postgres.settings import PostgresSettings

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
        self.qualified = sql.Identifier(settings.schema, settings.table)
        column_list = sql.SQL(", ").join(map(sql.Identifier, COLUMNS))
        self.copy_sql = sql.SQL("COPY {} ({}) FROM STDIN").format(self.qualified, column_list)
        self.copy_binary_sql = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(self.qualified, column_list)
        self.timescaledb = False  # known after the first open
        self._conn: psycopg.Connection | None = None
        self._schema_ready = False
        # On cancellation a running statement is cancelled on the server; the state the call
        # leaves in the attempt (`Transaction`) tells the retry what happened.
        self.blocking = BlockingCalls(self._cancel_statement, grace=settings.connect_timeout)
        # Binary COPY when the table's columns have exactly the types it sends (known after the
        # first open); text COPY, which lets the server convert, for a table made otherwise.
        self.binary_copy = True

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
            binary = self.binary_copy
            try:
                leftovers = self._copy_streaming(conn, batch, binary, rejected)
                if leftovers:
                    text_rows = self._text_rows(batch, leftovers, rejected)
                    if text_rows:
                        self._copy(conn, [row for _i, row in text_rows], binary=False)
            except psycopg.Error as exc:
                if binary and exc.sqlstate in ("22P03", "08P01") and not conn.broken and not conn.closed:
                    # "incorrect binary data format", "insufficient data left in message": has a
                    # column's type changed since the check (ALTER TABLE)? Nothing was written;
                    # if so, the retry uses text COPY.
                    conn.rollback()
                    tx.xid = None
                    if self._binary_fits(conn):
                        raise
                    log.warning("backend %s: binary COPY refused (%s); writing with text COPY from now on", self.label, self.scrub(str(exc)).splitlines()[0])
                    raise RetryableError("write failed: a column's type no longer fits binary COPY; retrying with text COPY") from None
                if not row_level(exc, conn):
                    raise
                # Start over in a new transaction and find the bad rows under savepoints.
                conn.rollback()
                tx.xid = None
                self._begin(conn, tx)
                rejected = {}
                if binary:
                    binary_rows, leftovers = self._binary_rows(batch)
                    rejected.update(self._copy_isolating(conn, binary_rows, binary=True))
                else:
                    leftovers = range(len(batch))
                text_rows = self._text_rows(batch, leftovers, rejected)
                rejected.update(self._copy_isolating(conn, text_rows, binary=False))
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

    def _copy_streaming(self, conn: psycopg.Connection, batch: list[dict], binary: bool, rejected: dict) -> list[int]:
        """COPY of the batch, each row written as soon as it is made. Binary: returns the indexes
        of the messages `binary_row_of` could not take, left for `_text_rows`. Text: a message
        that cannot be encoded goes to `rejected`."""
        leftovers = []
        moments = {}
        with conn.cursor().copy(self.copy_binary_sql if binary else self.copy_sql) as copy:
            if binary:
                copy.set_types(COPY_TYPES)
            write_row = copy.write_row
            for index, message in enumerate(batch):
                try:
                    row = binary_row_of(message, moments) if binary else row_of(message)
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
    def _binary_rows(batch: list[dict]) -> tuple[list[tuple[int, tuple]], list[int]]:
        rows, leftovers = [], []
        moments = {}
        for index, message in enumerate(batch):
            try:
                rows.append((index, binary_row_of(message, moments)))
            except Exception:
                leftovers.append(index)
        return rows, leftovers

    @staticmethod
    def _text_rows(batch: list[dict], indexes, rejected: dict) -> list[tuple[int, tuple]]:
        """Text COPY rows of the messages at `indexes`; those that cannot be encoded at all go to
        `rejected`."""
        rows = []
        for index in indexes:
            try:
                rows.append((index, row_of(batch[index])))
            except Exception as exc:  # e.g. a value orjson cannot encode
                rejected[index] = unencodable(exc)
        return rows

    def _copy(self, conn: psycopg.Connection, rows: list[tuple], *, binary: bool) -> None:
        with conn.cursor().copy(self.copy_binary_sql if binary else self.copy_sql) as copy:
            if binary:
                copy.set_types(COPY_TYPES)
            write_row = copy.write_row
            for row in rows:
                try:
                    write_row(row)
                except psycopg.Error:
                    raise
                except Exception as exc:  # a value psycopg cannot send: the COPY is abandoned
                    raise psycopg.DataError(f"{type(exc).__name__}: {exc}"[:200]) from None

    def _copy_isolating(self, conn: psycopg.Connection, rows: list[tuple[int, tuple]], *, binary: bool) -> dict[int, tuple[str, str]]:
        """COPY `rows` (index, row) under savepoints, splitting failed chunks in halves until
        each bad row is alone; returns the bad rows' reasons. All in the current transaction."""
        rejected = {}
        pending = [rows] if rows else []
        while pending:
            chunk = pending.pop()
            conn.execute("SAVEPOINT sidecar_rows")
            try:
                self._copy(conn, [row for _i, row in chunk], binary=binary)
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
        """Create what is missing, check the columns COPY needs, choose binary or text COPY."""
        self.timescaledb = schema.prepare(conn, self.settings, self.qualified, label=self.label, scrub=self.scrub)
        self._binary_fits(conn, schema.checked_columns(conn, self.settings))

    def _binary_fits(self, conn: psycopg.Connection, found: dict[str, str] | None = None) -> bool:
        """Sets and returns `binary_copy`: whether every column has the type binary COPY sends."""
        found = schema.column_types(conn, self.settings) if found is None else found
        other = schema.other_types(found)
        if other and self.binary_copy:
            log.info(
                "backend %s: table %s.%s has columns of other types (%s): writing with text COPY, which lets PostgreSQL convert",
                self.label, self.settings.schema, self.settings.table, ", ".join(other),
            )
        self.binary_copy = not other
        return self.binary_copy

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass  # closing a broken connection; nothing is left to release
