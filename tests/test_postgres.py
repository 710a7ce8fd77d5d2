"""The postgres backend against a real PostgreSQL server (tests/services/postgres.py)."""

import itertools
import signal
import subprocess
import sys
import time

import psycopg
import pytest
import trio
from hypothesis import given, settings, strategies as st

from sidecar.batch import Batch
from sidecar.backends.base import Attempt, PartialDelivery, RetryableError
from sidecar.backends.postgres import PostgresBackend, PostgresSettings, Transaction
from sidecar.backends.postgres.rows import EVENTS
from sidecar.backends.postgres.schema import index_name
from tests.harness import REPO, SidecarProcess, SteadySender, event, outage, read_jsonl, seqs, wait_until
from tests.services.postgres import PASSWORD, postgres_server  # noqa: F401

_tables = itertools.count()
TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN, PARENT = "00f067aa0ba902b7", "1111111111111111"


def as_batch(messages: list[dict]) -> Batch:
    """Messages as the delivery machinery hands them over. PostgreSQL reads `messages()`, which
    gives back this very list (a retry is known by it), so the lines are left empty: some of these
    messages could not even be encoded, which is what the tests want of them."""
    return Batch("svc", [b""] * len(messages), [m.get("timestamp") for m in messages], False, messages)


def unique_table() -> str:
    return f"events_{next(_tables)}_{int(time.time() * 1000) % 100000}"


def make_backend(server, table: str, **settings) -> PostgresBackend:
    options = {"connection_string": server.url(), "table": table, "connect_timeout": 3.0, **settings}
    return PostgresBackend(PostgresSettings(**options), label="pg")


def enriched(kind: str, data: dict, **extra) -> dict:
    return {
        "source": "svc", "type": kind, "timestamp": "2025-10-20T10:30:45.123Z", "received_at": "2025-10-20T10:30:45.200Z",
        "host": "h1", "data": data, **extra,
    }


def rows(server, query: str, *params):
    with psycopg.connect(server.admin_dsn()) as conn:
        return conn.execute(query, params or None).fetchall()


async def test_every_message_type_lands_in_typed_columns(postgres_server):
    table = unique_table()
    backend = make_backend(postgres_server, table)
    await backend.open()
    batch = [
        enriched("event", {"level": "error", "message": "boom"}, trace_id=TRACE, span_id=SPAN, context={"job_id": "job-1", "user": "u"}),
        enriched("metric", {"name": "queue.depth", "value": 42.5, "unit": "items", "tags": {"q": "a"}}, context={"job_id": "job-1"}),
        enriched("progress", {"job_id": "job-2", "percent": 50, "status": "half"}),
        enriched("resource", {"cpu_percent": 12.5, "memory_mb": 300}),
        enriched("span", {"name": "load", "phase": "start"}, trace_id=TRACE, span_id=SPAN, parent_span_id=PARENT),
        enriched("span", {"name": "load", "phase": "end", "status": "ok", "duration_ms": 1234}, trace_id=TRACE, span_id=SPAN, parent_span_id=PARENT),
    ]
    await backend.write_batch(Attempt("svc", as_batch(batch)))
    await backend.aclose()
    got = rows(
        postgres_server,
        f"SELECT to_char(time AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS'), received_at - time, source, type, level, name, value,"
        f" trace_id, span_id, parent_span_id, job_id, host, context, data FROM {table} ORDER BY data::text",
    )
    by_type = {}
    for row in got:
        by_type.setdefault(row[3], []).append(row)
    assert len(got) == 6
    event_row = by_type["event"][0]
    assert event_row[0] == "2025-10-20T10:30:45.123" and event_row[1].total_seconds() == pytest.approx(0.077)
    assert event_row[2:] == ("svc", "event", "error", None, None, TRACE, SPAN, None, "job-1", "h1", {"job_id": "job-1", "user": "u"}, {"level": "error", "message": "boom"})
    assert by_type["metric"][0][4:7] == (None, "queue.depth", 42.5) and by_type["metric"][0][10] == "job-1"
    assert by_type["metric"][0][13]["tags"] == {"q": "a"}
    assert by_type["progress"][0][10] == "job-2" and by_type["progress"][0][13]["percent"] == 50
    assert by_type["resource"][0][4:7] == (None, None, None) and by_type["resource"][0][13] == {"cpu_percent": 12.5, "memory_mb": 300}
    spans = sorted(by_type["span"], key=lambda r: r[13]["phase"])
    assert [s[5] for s in spans] == ["load", "load"] and [s[13]["phase"] for s in spans] == ["end", "start"]
    assert spans[0][7:10] == (TRACE, SPAN, PARENT) and spans[0][13]["duration_ms"] == 1234
    # the column types, as created
    types = dict(rows(postgres_server, "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = %s", table))
    assert types["time"] == types["received_at"] == "timestamp with time zone"
    assert types["value"] == "double precision" and types["context"] == types["data"] == "jsonb"


@settings(max_examples=300)
@given(st.from_regex(r"[a-z_][a-z0-9_]{0,47}", fullmatch=True))
def test_index_names_fit_postgres_and_stay_apart(table):
    """The names looked up are the names PostgreSQL keeps (at most 63 bytes, not cut by it), as
    written when they fit, and a table's indexes never share one."""
    names = [index_name(table, suffix) for suffix in ("job_id_time_idx", "trace_id_idx", "source_time_idx", "time_brin_idx", "series_idx", "window_brin_idx")]
    assert all(len(name) <= 63 for name in names) and len(set(names)) == len(names)
    assert all(name == f"{table}_{suffix}" for name, suffix in zip(names, ("job_id_time_idx", "trace_id_idx", "source_time_idx", "time_brin_idx", "series_idx", "window_brin_idx")) if len(table) + len(suffix) < 63)


async def test_a_table_of_the_longest_name_gets_its_indexes_under_the_names_it_looks_for(postgres_server):
    table = (unique_table() + "_" + "x" * 48)[:48]
    backend = make_backend(postgres_server, table)
    await backend.open()
    await backend.write_batch(Attempt("svc", as_batch([enriched("event", {"level": "info", "message": "m"})])))
    found = sorted(name for (name,) in rows(postgres_server, "SELECT indexname FROM pg_indexes WHERE tablename = %s", table))
    assert found == sorted(index_name(table, suffix) for suffix in ("job_id_time_idx", "trace_id_idx", "source_time_idx", "time_brin_idx"))
    await backend.aclose()


async def test_a_table_owned_by_another_role_without_its_indexes_is_written_with_a_warning(postgres_server, caplog):
    """The role may insert but not create indexes (it does not own the table): the writes go on,
    each index it could not make is a warning, and the circuit stays closed."""
    table = unique_table()
    columns = ", ".join(f"{name} {kind}" for name, kind in EVENTS.column_types.items())
    postgres_server.admin(f"CREATE TABLE {table} ({columns})")
    postgres_server.admin(f"GRANT SELECT, INSERT ON {table} TO sidecar")
    backend = make_backend(postgres_server, table)
    with caplog.at_level("WARNING", logger="sidecar.backends.postgres"):
        await backend.open()
        await backend.write_batch(Attempt("svc", as_batch([enriched("event", {"level": "info", "message": f"m{i}"}) for i in range(3)])))
    assert rows(postgres_server, f"SELECT count(*) FROM {table}") == [(3,)]
    refused = sorted(r.getMessage().split("cannot create index ")[1].split(" ")[0] for r in caplog.records if "cannot create index" in r.getMessage())
    assert refused == sorted(index_name(table, suffix) for suffix in ("job_id_time_idx", "trace_id_idx", "source_time_idx", "time_brin_idx"))
    assert all("must be owner" in r.getMessage() for r in caplog.records if "cannot create index" in r.getMessage())
    await backend.aclose()


async def test_a_batch_is_one_copy_statement_and_the_schema_is_created_once(postgres_server):
    table = unique_table()
    first = make_backend(postgres_server, table)
    await first.open()
    # A statement-level trigger records the text of every statement that inserts into the table.
    postgres_server.admin(f"""
        CREATE TABLE {table}_statements (query text);
        CREATE FUNCTION {table}_log() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER AS
          $$ BEGIN INSERT INTO {table}_statements VALUES (current_query()); RETURN NULL; END $$;
        CREATE TRIGGER log_statements AFTER INSERT ON {table} FOR EACH STATEMENT EXECUTE FUNCTION {table}_log();
    """)
    await first.write_batch(Attempt("svc", as_batch([enriched("event", {"level": "info", "message": f"m{i}"}) for i in range(1000)])))
    statements = [q for (q,) in rows(postgres_server, f"SELECT query FROM {table}_statements")]
    assert len(statements) == 1 and statements[0].startswith(f'COPY "public"."{table}"'), statements

    def indexes():
        return sorted(name for (name,) in rows(postgres_server, "SELECT indexname FROM pg_indexes WHERE tablename = %s", table))

    assert indexes() == sorted(f"{table}_{suffix}" for suffix in ("job_id_time_idx", "trace_id_idx", "source_time_idx", "time_brin_idx"))
    assert first.timescaledb is False  # the Debian server has no TimescaleDB: plain table, BRIN on time
    # A second backend (another sidecar, a restart) reuses the table: no error, nothing added.
    second = make_backend(postgres_server, table)
    await second.open()
    await second.write_batch(Attempt("svc", as_batch([enriched("event", {"level": "info", "message": "again"})])))
    assert indexes() == sorted(f"{table}_{suffix}" for suffix in ("job_id_time_idx", "trace_id_idx", "source_time_idx", "time_brin_idx"))
    assert rows(postgres_server, f"SELECT count(*) FROM {table}") == [(1001,)]
    # reconnecting after a failure does not run the schema checks again
    await first.aclose()
    await first.open()
    await first.write_batch(Attempt("svc", as_batch([enriched("event", {"level": "info", "message": "after reconnect"})])))
    assert rows(postgres_server, f"SELECT count(*) FROM {table}") == [(1002,)]
    await first.aclose()
    await second.aclose()


@pytest.mark.parametrize("binary", [True, False], ids=["binary-copy", "text-copy"])
async def test_poison_rows_are_isolated_and_the_rest_of_the_batch_lands(postgres_server, binary):
    table = unique_table()
    backend = make_backend(postgres_server, table)
    await backend.open()
    assert backend.events.binary_copy is True
    backend.events.binary_copy = binary  # text COPY: what a table with other column types gets
    batch = [enriched("metric", {"name": "m", "value": float(i)}, context={"seq": i}) for i in range(40)]
    batch[3] = enriched("metric", {"name": "m", "value": "1e400"}, context={"seq": 3})  # out of range for double precision
    batch[17] = {**batch[17], "timestamp": "2025-02-30T10:00:00.000Z"}  # no such date
    batch[25] = enriched("event", {"level": "info", "message": "nul\x00byte"}, context={"seq": 25, "k\x00": "v\x00"})
    batch[30] = enriched("metric", {"name": "m", "value": 10**400}, context={"seq": 30})  # not even encodable as JSON
    batch[8] = {**batch[8], "host": "h\udc80"}  # a lone surrogate: no UTF-8 for it; found while the binary COPY runs
    with pytest.raises(PartialDelivery) as caught:
        await backend.write_batch(Attempt("svc", as_batch(batch)))
    assert caught.value.rejected == {3: "postgres_numeric_value_out_of_range", 8: "unencodable", 17: "postgres_datetime_field_overflow", 30: "unencodable"}
    assert "#3: postgres_numeric_value_out_of_range" in str(caught.value) and "#17:" in str(caught.value)
    landed = sorted(seq for (seq,) in rows(postgres_server, f"SELECT (context->>'seq')::int FROM {table}"))
    assert landed == [i for i in range(40) if i not in (3, 8, 17, 30)]
    # NUL characters cannot be stored: they are replaced, and the row is kept
    assert rows(postgres_server, f"SELECT data->>'message', context FROM {table} WHERE type = 'event'") == [("nul\ufffdbyte", {"seq": 25, "k\ufffd": "v\ufffd"})]
    assert batch[25]["data"]["message"] == "nul\x00byte", "messages are shared with other backends: never modified"
    await backend.aclose()


async def test_values_binary_copy_cannot_carry_go_by_text_copy_in_the_same_transaction(postgres_server):
    """A value the binary row cannot hold as it is (a number in a string, a timestamp without an
    offset or in another zone) is written by a second, text COPY: the server reads it as before."""
    table = unique_table()
    backend = make_backend(postgres_server, table)
    await backend.open()
    batch = [enriched("metric", {"name": "m", "value": i}, context={"seq": i}) for i in range(6)]
    batch[1] = enriched("metric", {"name": "m", "value": "42.5"}, context={"seq": 1})
    batch[2] = {**batch[2], "timestamp": "2025-10-20T12:30:45.123+02:00"}  # read by Python: still binary
    batch[4] = {**batch[4], "timestamp": "2025-10-20 10:30:45.123"}  # no offset: the session's zone (UTC here)
    await backend.write_batch(Attempt("svc", as_batch(batch)))
    await backend.aclose()
    got = rows(
        postgres_server,
        f"SELECT (context->>'seq')::int, value, to_char(time AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.MS') FROM {table} ORDER BY 1",
    )
    assert got == [(i, 42.5 if i == 1 else float(i), "2025-10-20 10:30:45.123") for i in range(6)]


async def test_a_table_with_other_column_types_is_written_with_text_copy(postgres_server):
    """Binary COPY needs the columns' exact types. A table made by someone else (numeric, json,
    varchar) is written with text COPY, which lets the server convert; a column whose type
    changes while the sidecar runs makes one attempt fail (nothing written, circuit not
    tripped) and the retry switches to text COPY."""
    table = unique_table()
    postgres_server.admin(
        f"CREATE TABLE {table} (time timestamptz NOT NULL, received_at timestamptz, source varchar(100) NOT NULL, type text NOT NULL,"
        f" level text, name text, value numeric, trace_id text, span_id text, parent_span_id text, job_id text, host text, context json, data jsonb)"
    )
    postgres_server.admin(f"GRANT ALL ON {table} TO sidecar")
    other = make_backend(postgres_server, table, create_schema=False)
    await other.open()
    assert other.events.binary_copy is False
    await other.write_batch(Attempt("svc", as_batch([enriched("metric", {"name": "m", "value": 1.5}, context={"seq": 0})])))
    await other.aclose()
    assert rows(postgres_server, f"SELECT value, context::text FROM {table}") == [(1.5, '{"seq":0}')]

    table = unique_table()
    backend = make_backend(postgres_server, table)
    await backend.open()
    assert backend.events.binary_copy is True
    await backend.write_batch(Attempt("svc", as_batch([enriched("metric", {"name": "m", "value": 1.0}, context={"seq": 1})])))
    postgres_server.admin(f"ALTER TABLE {table} ALTER COLUMN value TYPE numeric")
    attempt = Attempt("svc", as_batch([enriched("metric", {"name": "m", "value": 2.0}, context={"seq": 2})]))
    with pytest.raises(RetryableError) as caught:
        await backend.write_batch(attempt)
    assert not caught.value.trip_circuit and backend.events.binary_copy is False
    await backend.write_batch(attempt)
    await backend.aclose()
    assert rows(postgres_server, f"SELECT (context->>'seq')::int, value FROM {table} ORDER BY 1") == [(1, 1), (2, 2)]


async def test_a_wrong_password_trips_the_circuit_and_is_never_shown(postgres_server):
    backend = PostgresBackend(PostgresSettings(connection_string=postgres_server.url(password="Wrong-Secret-1234"), table=unique_table()), label="pg")
    with pytest.raises(RetryableError) as caught:
        await backend.open()
    assert caught.value.trip_circuit
    assert "password authentication failed" in str(caught.value)
    assert "Wrong-Secret-1234" not in str(caught.value)
    missing_db = PostgresBackend(PostgresSettings(connection_string=postgres_server.url(dbname="nope"), table="t"), label="pg")
    with pytest.raises(RetryableError) as caught:
        await missing_db.open()
    assert caught.value.trip_circuit and "does not exist" in str(caught.value) and PASSWORD not in str(caught.value)
    # libpq quotes unparsable connection strings; the settings refuse them without the text
    with pytest.raises(ValueError) as invalid:
        PostgresSettings(connection_string="postgresql://u:sec ret-Zz9@h:x/d")
    assert "sec ret" not in str(invalid.value)


async def test_a_server_that_is_down_is_retryable_without_tripping(postgres_server):
    backend = PostgresBackend(PostgresSettings(connection_string=f"postgresql://sidecar:{PASSWORD}@127.0.0.1:1/monitoring", table="t", connect_timeout=2), label="pg")
    with pytest.raises(RetryableError) as caught:
        await backend.open()
    assert not caught.value.trip_circuit and PASSWORD not in str(caught.value)


SIDECAR_CONFIG = """
tcp: {{host: 127.0.0.1, port: 0}}
shutdown: {{connection_grace: 0.2, drain_timeout: 5}}
backends:
  timescaledb:
    type: postgres
    connection_string: "${{PG_URL}}"
    table: {table}
    connect_timeout: 2
    batch: {{max_messages: 200, timeout: 0.1}}
    queue: {{max_messages: 100000, when_full: drop_newest}}
    retry: {{initial_backoff: 0.05, max_backoff: 0.3, attempt_timeout: 10}}
    circuit_breaker: {{failure_threshold: 3, reset_timeout: 0.3, max_reset_timeout: 1.0}}
  files:
    type: filesystem
    base_path: {base}
    create_base_path: true
    fsync: never
    batch: {{max_messages: 200, timeout: 0.05}}
routing:
  queue-service:
    - backend: timescaledb
    - backend: files
"""


@pytest.fixture
def sidecars():
    started = []
    yield started
    for sidecar in started:
        if sidecar.process and sidecar.process.poll() is None:
            sidecar.stop(signal.SIGKILL)


def test_a_rotated_password_delivers_what_was_queued_under_the_old_one(postgres_server, tmp_path, sidecars):
    # The operator rotates the password: the same backend, new settings. What was queued while
    # the old one was refused goes with the new one; nothing is orphaned or dropped.
    table = unique_table()
    bad = SIDECAR_CONFIG.format(table=table, base=tmp_path / "out").replace('"${PG_URL}"', '"${PG_URL_BAD}"')
    sidecar = SidecarProcess(tmp_path, bad, env={"PG_URL_BAD": postgres_server.url(password="Wrong-Pa55"), "PG_URL": postgres_server.url()})
    sidecars.append(sidecar.start())
    sidecar.send([event("queue-service", i) for i in range(500)])
    sidecar.wait_for(lambda s: sidecar.backend("timescaledb").get("circuit") == "open" and sidecar.backend("timescaledb")["queued"] == 500, what="500 queued behind the refusal")
    sidecar.config_path.write_text(SIDECAR_CONFIG.format(table=table, base=tmp_path / "out"))
    status, body = sidecar.http("/api/reload", method="POST")
    assert status == 200, body
    stats = sidecar.wait_for(lambda s: sidecar.backend("timescaledb").get("delivered") == 500, what="delivery with the new password")
    (pg,) = [b for b in stats["backends"] if b["type"] == "postgres"]
    assert pg["reconfigured"] == 1 and pg["dropped"] == {} and pg["queued"] == 0 and pg["circuit"] == "closed"
    assert len(stats["backends"]) == 2, "the instance took the new settings; none was retired"
    assert sorted(r[0] for r in rows(postgres_server, f"SELECT (context->>'seq')::int FROM {table}")) == list(range(500))
    assert sidecar.stop() == 0


def test_bad_password_end_to_end_circuit_opens_and_the_password_stays_hidden(postgres_server, tmp_path, sidecars):
    secret = "Bad-Pa55-Never-Shown-77"
    config = SIDECAR_CONFIG.format(table=unique_table(), base=tmp_path / "out")
    sidecar = SidecarProcess(tmp_path, config, env={"PG_URL": postgres_server.url(password=secret)})
    sidecars.append(sidecar.start())
    sidecar.send([event("queue-service", i) for i in range(10)])
    # Tripped at once; then the probes (a connection and SELECT 1) are held off 0.3 s, 0.6 s, 1 s.
    stats = sidecar.wait_for(lambda s: sidecar.backend("timescaledb").get("probes", 0) >= 2, what="two probes")
    pg = sidecar.backend("timescaledb")
    assert pg["delivered"] == 0 and pg["queued"] == 10 and "password authentication failed" in pg["last_error"]
    assert pg["circuit_opened"] == 1 and pg["retries"] == 1 and "circuit open after 1 failures, next probe in 0.3s" in sidecar.log()
    probes = pg["probes"]
    time.sleep(0.5)
    assert sidecar.backend("timescaledb")["probes"] <= probes + 1, "a tripped circuit must hold its probes off"
    assert sidecar.backend("timescaledb")["retries"] == 1, "no write goes until a probe passes"
    assert sidecar.backend("files")["delivered"] == 10
    sidecar.stop()
    assert secret not in sidecar.log() and secret not in str(stats) and secret not in sidecar.status_path.read_text()
    assert "circuit open" in sidecar.log()
    # `check` shows the template for ${PG_URL}, and hides a password written in the file
    for connection_string in ("${PG_URL}", postgres_server.url(password=secret)):
        (tmp_path / "check.yaml").write_text(config.replace('"${PG_URL}"', f'"{connection_string}"'))
        output = subprocess.run(
            [sys.executable, "-m", "sidecar", "check", "--config", str(tmp_path / "check.yaml"), "--source", "queue-service"],
            capture_output=True, text=True, cwd=REPO, env={**sidecar.env}, timeout=60,
        )
        assert output.returncode == 0, output.stderr
        assert "timescaledb" in output.stdout and secret not in output.stdout + output.stderr


def test_outage_under_load_every_message_arrives_exactly_once(postgres_server, tmp_path, sidecars):
    """Stop PostgreSQL for 10 s under steady load, start it again: every message is in the table
    exactly once (one transaction per batch; a batch whose commit reply was lost is looked up by
    its transaction id before it is retried), and the filesystem backend never stopped."""
    table = unique_table()
    config = SIDECAR_CONFIG.format(table=table, base=tmp_path / "out")
    sidecar = SidecarProcess(tmp_path, config, env={"PG_URL": postgres_server.url()})
    sidecars.append(sidecar.start())
    sender = SteadySender(sidecar, "queue-service", per_second=300)
    sender.start()
    try:
        sidecar.wait_for(lambda s: sidecar.backend("timescaledb").get("delivered", 0) >= 300, what="postgres delivering")
        postgres_server.stop()
        try:
            files_at_stop = sidecar.backend("files")["delivered"]
            sidecar.wait_for(lambda s: sidecar.backend("timescaledb").get("circuit") == "open", timeout=10, what="the circuit to open")
            time.sleep(10)
            during = sidecar.backend("files")["delivered"] - files_at_stop
            stalled = sidecar.backend("timescaledb")
        finally:
            postgres_server.start()
        wait_until(lambda: sender.sent > 0, what="sending")
        time.sleep(1)
    finally:
        sent = sender.stop()
    assert during >= 1500, f"the filesystem backend received only {during} messages during the outage"
    assert stalled["queued"] > 1000 and stalled["circuit_opened"] >= 1
    final = sidecar.wait_for(
        lambda s: sidecar.backend("timescaledb").get("delivered") == sent and sidecar.backend("files").get("delivered") == sent,
        timeout=30, what="every message delivered to both backends",
    )
    pg = sidecar.backend("timescaledb")
    assert pg["dropped"] == {} and pg["queued"] == 0 and pg["circuit"] == "closed"
    assert final["received"] == sent
    count, distinct = rows(postgres_server, f"SELECT count(*), count(DISTINCT (context->>'seq')::int) FROM {table}")[0]
    assert (count, distinct) == (sent, sent), "every message exactly once"
    assert seqs(read_jsonl(tmp_path / "out" / "queue-service.jsonl")) == list(range(sent))
    assert sidecar.stop() == 0
    assert PASSWORD not in sidecar.log()


DEFAULTS_CONFIG = """
tcp: {{host: 127.0.0.1, port: 0}}
backends:
  timescaledb:
    type: postgres
    connection_string: "${{PG_URL}}"
    table: {table}
  files:
    type: filesystem
    base_path: {base}
    create_base_path: true
routing:
  all:
    - backend: timescaledb
    - backend: files
"""


def test_with_default_settings_a_crash_for_10_s_at_5000_per_second_loses_nothing_and_delivery_resumes_at_once(postgres_server, tmp_path, sidecars):
    """No delivery setting given: PostgreSQL killed (`pg_ctl stop -m immediate`) for 10 s under
    5,000 messages/s. The disk queue holds the 50,000 that wait, the probe sees the server back
    within its 0.5 s interval, and every message is in the table exactly once."""
    table = unique_table()
    sidecar = SidecarProcess(tmp_path, DEFAULTS_CONFIG.format(table=table, base=tmp_path / "out"), env={"PG_URL": postgres_server.url()})
    sidecars.append(sidecar.start())
    sender = SteadySender(sidecar, "queue-service", per_second=5000)
    sender.start()
    try:
        sidecar.wait_for(lambda s: sidecar.backend("timescaledb").get("delivered", 0) >= 5000, what="postgres delivering")
        held, resumed_after = outage(sidecar, "timescaledb", lambda: postgres_server.stop(mode="immediate"), postgres_server.start)
        time.sleep(1)
    finally:
        sent = sender.stop()
    assert held > 40_000, f"only {held} held: the outage was shorter than meant"
    final = sidecar.wait_for(
        lambda s: all(b["delivered"] == sent and b["queued"] == 0 for b in s["backends"]), timeout=60, what="every message delivered to both backends",
    )
    assert all(b["dropped"] == {} for b in final["backends"]), final["backends"]
    assert final["received"] == sent
    count, distinct = rows(postgres_server, f"SELECT count(*), count(DISTINCT (context->>'seq')::int) FROM {table}")[0]
    assert (count, distinct) == (sent, sent), "every message exactly once"
    # The probe runs every 0.5 s: a second is its interval twice over, with a connect between.
    assert resumed_after < 1.0, f"delivery resumed {resumed_after:.2f} s after PostgreSQL was back"
    assert sidecar.stop() == 0


def test_a_black_holed_database_stalls_only_itself_and_gets_everything_once_the_network_heals(postgres_server, tmp_path, sidecars):
    """PostgreSQL behind a proxy that stops passing bytes (a partition: connections stay open,
    nothing answers) for 5 s under 2,000 messages/s: the filesystem backend keeps delivering
    all the while; once the partition heals, every message is in the table exactly once."""
    from tests.faultproxy import FaultProxy

    table = unique_table()
    with FaultProxy(("127.0.0.1", postgres_server.port)) as proxy:
        url = postgres_server.url().replace(f":{postgres_server.port}/", f":{proxy.port}/")
        sidecar = SidecarProcess(tmp_path, DEFAULTS_CONFIG.format(table=table, base=tmp_path / "out"), env={"PG_URL": url})
        sidecars.append(sidecar.start())
        sender = SteadySender(sidecar, "queue-service", per_second=2000)
        sender.start()
        try:
            sidecar.wait_for(lambda s: sidecar.backend("timescaledb").get("delivered", 0) >= 2000, what="postgres delivering")
            proxy.set("black_hole")
            files_before, pg_before = sidecar.backend("files")["delivered"], sidecar.backend("timescaledb")["delivered"]
            time.sleep(5)
            files_during = sidecar.backend("files")["delivered"] - files_before
            pg_during = sidecar.backend("timescaledb")["delivered"] - pg_before
            proxy.set("pass")
            time.sleep(1)
        finally:
            sent = sender.stop()
        assert files_during >= 7000, f"the filesystem backend delivered only {files_during} in the 5 s"
        assert pg_during <= 5000, "nothing passes a black hole beyond what was in flight"
        final = sidecar.wait_for(lambda s: all(b["delivered"] == sent and b["queued"] == 0 for b in s["backends"]), timeout=60, what="every message delivered to both")
    assert all(b["dropped"] == {} for b in final["backends"])
    count, distinct = rows(postgres_server, f"SELECT count(*), count(DISTINCT (context->>'seq')::int) FROM {table}")[0]
    assert (count, distinct) == (sent, sent), "every message exactly once"
    assert sidecar.stop() == 0


async def test_a_transaction_the_restarted_server_never_heard_of_is_written_again(postgres_server):
    """Killed between `pg_current_xact_id()` and anything durable, the server restarts with that
    id "in the future" (seen with `pg_ctl stop -m immediate` under load, where it held the
    circuit off, doubling, as if a person had to act). The batch did not commit: it is written."""
    table = unique_table()
    backend = make_backend(postgres_server, table)
    await backend.open()
    batch = as_batch([enriched("event", {"level": "info", "message": f"m{i}"}) for i in range(20)])
    ((current,),) = rows(postgres_server, "SELECT pg_current_xact_id()::text")
    attempt = Attempt("svc", batch, tries=1, state=Transaction(xid=str(int(current) + 10**6)))  # an id the server has not reached
    await backend.write_batch(attempt)
    assert rows(postgres_server, f"SELECT count(*) FROM {table}") == [(20,)]
    assert attempt.state.xid is None
    await backend.aclose()


async def test_attempt_timeout_cancels_the_statement_and_the_retry_writes_once(postgres_server):
    """A COPY stuck behind a lock: the attempt times out, the server-side statement is cancelled,
    and the retry writes the batch exactly once."""
    table = unique_table()
    backend = make_backend(postgres_server, table)
    await backend.open()
    batch = [enriched("event", {"level": "info", "message": f"m{i}"}) for i in range(50)]
    attempt = Attempt("svc", as_batch(batch))
    with psycopg.connect(postgres_server.admin_dsn()) as locker:
        locker.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(trio.TooSlowError):
            with trio.fail_after(1):
                await backend.write_batch(attempt)
        active = rows(postgres_server, "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'COPY%%' AND state = 'active'")
        assert active == [(0,)], "the cancelled COPY must not still be running"
        locker.rollback()
    await backend.write_batch(attempt)
    assert rows(postgres_server, f"SELECT count(*) FROM {table}") == [(50,)]
    await backend.aclose()


def test_postgres_batches_default_to_5000_messages_and_the_config_still_wins(tmp_path):
    from sidecar.config import load_config
    from tests.conftest import SEED_CONFIG

    seed = load_config(SEED_CONFIG, None).backends["timescaledb"].delivery.batch
    assert (seed.max_messages, seed.timeout) == (5000, 1.0)
    (tmp_path / "sidecar.yaml").write_text(
        'backends:\n  pg:\n    type: postgres\n    connection_string: "postgresql://u@h/d"\n    batch: {max_messages: 300}\n'
        "routing:\n  all:\n    - backend: pg\n"
    )
    assert load_config(tmp_path / "sidecar.yaml", None).backends["pg"].delivery.batch.max_messages == 300


def test_aggregates_land_as_metric_rows_and_the_documented_query_reads_their_p99(tmp_path, postgres_server):
    import re

    table = unique_table()
    config = f"""
tcp: {{host: 127.0.0.1, port: 0}}
backends:
  timescaledb:
    type: postgres
    connection_string: "${{PG_URL}}"
    table: {table}
    batch: {{timeout: 0.05}}
aggregate:
  loader:
    - metrics: [job_duration_ms]
      window: 1h
      by: [source, name]
routing:
  loader:
    - backend: timescaledb
      filter: {{aggregated: true}}
"""
    values = [float(v) for v in range(1, 201)]
    sidecar = SidecarProcess(tmp_path, config, env={"PG_URL": postgres_server.url()}).start()
    try:
        sidecar.send([{"type": "metric", "source": "loader", "data": {"name": "job_duration_ms", "value": v, "unit": "ms"}} for v in values])
        sidecar.wait_for(lambda s: s["correlator"]["aggregation"]["loader[aggregate]"]["points"] == len(values), what="the points taken")
    finally:
        assert sidecar.stop() == 0  # routes the open window, partial, before the backend drains
    documented = (REPO / "docs" / "postgres.md").read_text()
    query = re.search(r"```sql\n(SELECT time AS window_start.*?)```", documented, re.S).group(1).replace("monitoring_events", table)
    [(_start, source, tags, points, p99, total)] = rows(postgres_server, query)
    assert (source, tags, points, total) == ("loader", {}, 200, sum(values))
    assert abs(p99 - 198.0) <= 0.01 * 198.0 + 2  # DDSketch: 1 % of the exact rank's value
