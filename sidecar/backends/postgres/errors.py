"""What a PostgreSQL error means for delivery, and the password kept out of every message.

`classified` turns any exception into a RetryableError whose message is scrubbed of the
password, tripping the circuit when a person must act (credentials, database, privileges, the
table's shape) or the server answered with an error this backend does not expect. `row_level`
says whether an error is about one row's content (the rows are then isolated under savepoints),
`row_reason` and `unencodable` name a refused row's reason. libpq's own parse errors, which may
quote the connection string, are never shown (see `PostgresSettings`).
"""

import os
import re

import psycopg
import psycopg.conninfo

from sidecar.backends.base import RetryableError
from sidecar.redaction import without_passwords

# SQLSTATE classes of errors caused by one row's content: data exceptions, integrity violations,
# program limits (a value too large for an index row). Anything else is about the database.
ROW_LEVEL_CLASSES = ("22", "23", "54")
# Errors that a person must fix (credentials, database, privileges, the table's shape): retried
# slowly behind an open circuit, not in a loop.
MISCONFIGURED_STATES = {"28000", "28P01", "3D000", "42501", "42P01", "42703", "42804", "3F000"}
MISCONFIGURED_TEXT = re.compile(
    r"password authentication failed|no password supplied|no pg_hba\.conf entry|"
    r"database \S+ does not exist|role \S+ does not exist|permission denied|SSL (?:is )?(?:required|off)",
    re.IGNORECASE,
)
# SQLSTATE classes the backend expects from a healthy configuration and retries at the normal
# pace: connection exceptions, invalid transaction state, transaction rollback, insufficient
# resources, operator intervention, system errors.
_TRANSIENT_CLASSES = ("08", "25", "40", "53", "57", "58")


class Misconfigured(Exception):
    """Raised inside the worker thread for a problem found by our own checks."""


def password_of(connection_string: str) -> str | None:
    try:
        return psycopg.conninfo.conninfo_to_dict(connection_string).get("password")
    except psycopg.Error:
        return None


class Scrubber:
    """Removes the password from text: the known value, and any URL or key=value password."""

    def __init__(self, connection_string: str):
        self.secrets = [s for s in (password_of(connection_string), os.environ.get("PGPASSWORD")) if s]

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return without_passwords(text)


def classified(exc: BaseException, what: str, scrub: Scrubber) -> Exception:
    """A RetryableError with a scrubbed message, tripping the circuit when a person must act."""
    if isinstance(exc, RetryableError):
        return exc
    if isinstance(exc, Misconfigured):
        return RetryableError(f"{what}: {scrub(str(exc))}", trip_circuit=True)
    state = getattr(exc, "sqlstate", None)
    text = scrub(str(exc)).strip().replace("\n\t", " ").replace("\n", " ")
    if isinstance(exc, psycopg.Error):
        label = f" [{state}]" if state else ""
        message = f"{what}: {text}{label}"
        trip = state in MISCONFIGURED_STATES or (state is None and bool(MISCONFIGURED_TEXT.search(text)))
        if state and state[:2] not in _TRANSIENT_CLASSES and not trip:
            # A server error this module does not expect: retried, but slowly.
            trip = True
        return RetryableError(message, trip_circuit=trip)
    return RetryableError(f"{what}: {type(exc).__name__}: {text}")


def row_level(exc: psycopg.Error, conn: psycopg.Connection) -> bool:
    """Whether `exc` is about one row's content (and the connection still usable)."""
    if conn.broken or conn.closed:
        return False
    state = exc.sqlstate
    if state is None:
        # Raised by psycopg itself while formatting a row (the server never saw it).
        return isinstance(exc, psycopg.DataError)
    return state[:2] in ROW_LEVEL_CLASSES


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def row_reason(exc: psycopg.Error, scrub: Scrubber) -> tuple[str, str]:
    """(reason label, detail) of a row the server or psycopg refused."""
    if not exc.sqlstate:  # refused by psycopg before the server saw it
        return "unencodable", scrub((str(exc).splitlines() or [type(exc).__name__])[0])[:200]
    detail = (exc.diag.message_primary or str(exc)).splitlines()[0]
    return f"postgres_{_snake(type(exc).__name__)}", scrub(detail)[:200]


def unencodable(exc: Exception) -> tuple[str, str]:
    """(reason label, detail) of a message that cannot be made into a row at all."""
    return "unencodable", f"{type(exc).__name__}: {exc}"[:200]
