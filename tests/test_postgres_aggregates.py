"""The postgres backend's typed aggregates table (`aggregates_table`): the row of any aggregate
(hypothesis), and against a real PostgreSQL server (tests/services/postgres.py) the backend
alone and a real sidecar with an `aggregate:` step."""

import copy
import datetime as dt
import math
import random
import re
import signal
import time as wall

import orjson
import pytest
from hypothesis import given, settings, strategies as st

from sidecar.aggregate import aggregate_message
from sidecar.aggregation import EXACT_STATS, RELATIVE_ACCURACY, ClosedGroup, quantile_of
from sidecar.backends.base import Attempt, PartialDelivery, RetryableError
from sidecar.backends.postgres import AGGREGATE_COLUMNS, PostgresSettings, aggregate_binary_row_of, aggregate_row_of
from sidecar.config import ConfigError, load_config
from sidecar.message import format_timestamp
from tests.harness import REPO, SidecarProcess
from tests.services.postgres import postgres_server  # noqa: F401
from tests.test_postgres import as_batch, enriched, make_backend, rows, unique_table

NUL, REPLACED = "\x00", "\ufffd"
QUANTILE_STATS = ("p0", "p12.5", "p50", "p90", "p99", "p99.9", "p100")


def utc(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc)


def stamp(seconds: float) -> str:
    return format_timestamp(utc(seconds))


def without_nul(value):
    if isinstance(value, str):
        return value.replace(NUL, REPLACED)
    return {without_nul(k): without_nul(v) for k, v in value.items()}


# ---------------------------------------------------------------- the row of any aggregate

texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=8)  # NUL included
numbers = st.one_of(st.floats(allow_nan=False), st.integers(-10**6, 10**6).map(float))


@st.composite
def closed_groups(draw) -> ClosedGroup:
    window = draw(st.sampled_from([1.0, 10.0, 3600.0]))
    start = draw(st.integers(0, 4 * 10**9 // int(window))) * window
    names = draw(st.lists(st.sampled_from(EXACT_STATS + QUANTILE_STATS), unique=True))
    stats = {name: draw(st.integers(1, 2**62) if name == "count" else numbers) for name in names}
    tags = tuple(sorted(draw(st.dictionaries(texts, texts, max_size=3)).items()))
    return ClosedGroup(
        (draw(st.sampled_from(["svc", "svc-a"])), draw(texts.filter(bool)), tags), start, start + window, stats,
        draw(numbers), draw(st.booleans()), draw(st.none() | texts.filter(bool)),
    )


@settings(max_examples=400, deadline=None)
@given(closed_groups(), st.floats(0, 4 * 10**9))
def test_an_aggregates_typed_row_holds_its_statistics_in_their_columns(closed, now):
    message = aggregate_message(closed, "h1", now)
    untouched = copy.deepcopy(message)
    binary = dict(zip(AGGREGATE_COLUMNS, aggregate_binary_row_of(message, {})))
    text = dict(zip(AGGREGATE_COLUMNS, aggregate_row_of(message)))
    assert message == untouched, "messages are shared with other backends: never modified"
    source, name, tags = closed.key
    stats = closed.stats
    quantiles = {stat: value for stat, value in stats.items() if quantile_of(stat) is not None}
    expected = {
        "source": source, "name": without_nul(name), "unit": without_nul(closed.unit) if closed.unit else None,
        "partial": closed.partial, "count": stats.get("count"), "sum": stats.get("sum", closed.sum),
        **{stat: stats.get(stat) for stat in ("min", "max", "avg", "last", "p50", "p90", "p99")},
        "host": "h1", "trace_id": None, "job_id": None,
    }
    for column, value in expected.items():
        assert binary[column] == value and text[column] == value, column
    assert (binary["window_start"], binary["window_end"]) == (utc(closed.window_start), utc(closed.window_end))
    assert (text["window_start"], text["window_end"]) == (stamp(closed.window_start), stamp(closed.window_end))
    assert binary["received_at"] == dt.datetime.fromisoformat(message["received_at"]) and text["received_at"] == message["received_at"]
    assert orjson.loads(binary["tags"]) == orjson.loads(text["tags"]) == without_nul(dict(tags))
    if quantiles:
        assert orjson.loads(binary["quantiles"]) == orjson.loads(text["quantiles"]) == {k: (None if math.isinf(v) else v) for k, v in quantiles.items()}
    else:
        assert binary["quantiles"] is text["quantiles"] is None


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False, allow_infinity=False) | texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3), max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(json_values, st.dictionaries(st.sampled_from(("window_start", "window_end", "partial", "count", "sum", "p99", "p99.9")), json_values)))
def test_a_clients_aggregation_of_any_shape_is_a_row_or_a_named_refusal(aggregation):
    """A client may send any `data.aggregation`: its row is made for the server to judge, or it
    is refused by name (an aggregation that is not an object, an object where a value belongs,
    a number JSON cannot carry); binary COPY hands anything it cannot take to text COPY."""
    message = enriched("metric", {"name": "m", "value": 1.0, "aggregation": aggregation})
    try:
        row = aggregate_row_of(message)
    except TypeError as exc:
        assert re.match(r"data\.aggregation(\.\S+)? is not |Integer exceeds 64-bit range", str(exc)), exc
        with pytest.raises((TypeError, ValueError, OverflowError)):
            aggregate_binary_row_of(message, {})
        return
    assert len(row) == len(AGGREGATE_COLUMNS)
    try:
        binary = aggregate_binary_row_of(message, {})
    except (TypeError, ValueError, OverflowError):
        return  # text COPY takes it
    assert dict(zip(AGGREGATE_COLUMNS, binary))["count"] == aggregation.get("count")


def test_the_setting_is_an_identifier_other_than_the_events_table_with_file_and_line(write):
    def problems(value: str) -> list[str]:
        path = write("sidecar.yaml", f"""
            backends:
              pg:
                type: postgres
                connection_string: "postgresql://u@h/d"
                table: monitoring_events
                aggregates_table: {value}
            routing:
              all:
                - backend: pg
            """)
        with pytest.raises(ConfigError) as caught:
            load_config(path, None, {})
        return [str(p) for p in caught.value.problems]

    [bad] = problems('"Aggregates; DROP TABLE x"')
    assert "sidecar.yaml:" in bad and "'aggregates_table' must be a lower-case SQL identifier" in bad
    [same] = problems("monitoring_events")
    assert "sidecar.yaml:" in same and "must name another table than 'table'" in same
    assert PostgresSettings(connection_string="postgresql://u@h/d").aggregates_table is None


# ---------------------------------------------------------------- the backend and a real server


def aggregate(name: str, stats: dict, *, tags=None, start="2025-10-20T10:30:00.000Z", end="2025-10-20T10:31:00.000Z", partial=False, **extra) -> dict:
    aggregation = {"window_start": start, "window_end": end, "partial": partial, **stats}
    data = {"name": name, "value": stats.get("sum", 0.0), "tags": {} if tags is None else tags, "unit": "ms", "aggregation": aggregation}
    return enriched("metric", data, timestamp=start, **extra)


def aggregate_rows(server, table: str, where: str = "true") -> list[tuple]:
    return rows(server, f"SELECT {', '.join(AGGREGATE_COLUMNS)} FROM {table}_aggregates WHERE {where} ORDER BY name, window_start")


@pytest.mark.parametrize("binary", [True, False], ids=["binary-copy", "text-copy"])
async def test_a_batch_of_raw_points_and_aggregates_is_one_transaction_over_both_tables(postgres_server, binary):
    table = unique_table()
    backend = make_backend(postgres_server, table, aggregates_table=f"{table}_aggregates")
    await backend.open()
    assert backend.events.binary_copy is backend.aggregates.binary_copy is True
    backend.aggregates.binary_copy = binary  # text COPY: what a table with other column types gets
    stats = {"count": 3, "sum": 6.5, "min": 1.0, "max": 4.0, "avg": 6.5 / 3, "last": 1.5, "p50": 1.5, "p99": 4.0, "p99.9": 4.0}
    batch = [
        enriched("metric", {"name": "job_duration_ms", "value": 1.0, "tags": {"env": "prod"}}),
        aggregate("job_duration_ms", stats, tags={"env": "prod"}, trace_id="4bf92f3577b34da6a3ce929d0e0e4736", context={"job_id": "job-1"}),
        enriched("event", {"level": "info", "message": "between"}),
        aggregate("rows_loaded", {"count": 2}, partial=True, start="2025-10-20T10:31:00.000Z", end="2025-10-20T10:32:00.000Z"),
    ]
    await backend.write_batch(Attempt("svc", as_batch(batch)))
    await backend.aclose()
    assert rows(postgres_server, f"SELECT type, name FROM {table} ORDER BY type") == [("event", None), ("metric", "job_duration_ms")]
    utc_at = dt.datetime.fromisoformat
    received = utc_at("2025-10-20T10:30:45.200Z")
    assert aggregate_rows(postgres_server, table) == [
        (utc_at("2025-10-20T10:30:00Z"), utc_at("2025-10-20T10:31:00Z"), received, "svc", "job_duration_ms", "ms", {"env": "prod"}, False,
         3, 6.5, 1.0, 4.0, 6.5 / 3, 1.5, 1.5, None, 4.0, {"p50": 1.5, "p99": 4.0, "p99.9": 4.0}, "h1", "4bf92f3577b34da6a3ce929d0e0e4736", "job-1"),
        (utc_at("2025-10-20T10:31:00Z"), utc_at("2025-10-20T10:32:00Z"), received, "svc", "rows_loaded", "ms", {}, True,
         2, 0.0, None, None, None, None, None, None, None, None, "h1", None, None),
    ]
    # One transaction: every row of both tables was written by the same one.
    assert len(rows(postgres_server, f"SELECT xmin::text FROM {table} UNION SELECT xmin::text FROM {table}_aggregates")) == 1
    types = dict(rows(postgres_server, "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = %s", f"{table}_aggregates"))
    assert types == {
        "window_start": "timestamp with time zone", "window_end": "timestamp with time zone", "received_at": "timestamp with time zone",
        "source": "text", "name": "text", "unit": "text", "tags": "jsonb", "partial": "boolean", "count": "bigint",
        **{stat: "double precision" for stat in ("sum", "min", "max", "avg", "last", "p50", "p90", "p99")},
        "quantiles": "jsonb", "host": "text", "trace_id": "text", "job_id": "text",
    }
    not_null = {c for (c,) in rows(postgres_server, "SELECT column_name FROM information_schema.columns WHERE table_name = %s AND is_nullable = 'NO'", f"{table}_aggregates")}
    assert not_null == {"window_start", "window_end", "source", "name", "partial"}
    indexes = dict(rows(postgres_server, "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = %s", f"{table}_aggregates"))
    assert set(indexes) == {f"{table}_aggregates_series_idx", f"{table}_aggregates_window_brin_idx"}
    assert indexes[f"{table}_aggregates_series_idx"].endswith("USING btree (source, name, window_start)")
    assert indexes[f"{table}_aggregates_window_brin_idx"].endswith("USING brin (window_start)")


@pytest.mark.parametrize("binary", [True, False], ids=["binary-copy", "text-copy"])
async def test_bad_aggregate_rows_are_isolated_and_counted_while_the_rest_of_the_batch_commits(postgres_server, binary):
    table = unique_table()
    backend = make_backend(postgres_server, table, aggregates_table=f"{table}_aggregates")
    await backend.open()
    backend.aggregates.binary_copy = binary
    batch = [aggregate(f"good{i:02d}", {"count": i, "sum": float(i)}) for i in range(30)]
    batch[2] = aggregate("bad", {"count": 1}, start="2025-02-30T10:00:00.000Z")  # no such date
    batch[5] = aggregate("bad", {"count": 2**70})  # beyond bigint
    batch[7] = aggregate("bad", {"count": 12.5})  # not an integer
    batch[11] = {**batch[11], "data": {**batch[11]["data"], "aggregation": "p99=4"}}  # not an object
    batch[13] = aggregate("bad", {"count": 1, "min": {"deep": 1}})  # an object where a number belongs
    batch[17] = aggregate("bad", {"count": 1})
    del batch[17]["data"]["aggregation"]["partial"]  # NOT NULL
    batch[19] = aggregate("good19", {"count": 19, "sum": 19.0}, tags={"k\x00": "v\x00"})  # NUL: replaced, the row kept
    batch[23] = enriched("metric", {"name": "raw", "value": "1e400"})  # a raw point out of range, in the events table
    batch[24] = enriched("metric", {"name": "raw", "value": 24.0})
    with pytest.raises(PartialDelivery) as caught:
        await backend.write_batch(Attempt("svc", as_batch(batch)))
    await backend.aclose()
    assert caught.value.rejected == {
        2: "postgres_datetime_field_overflow", 5: "postgres_numeric_value_out_of_range", 7: "postgres_invalid_text_representation",
        11: "unencodable", 13: "unencodable", 17: "postgres_not_null_violation", 23: "postgres_numeric_value_out_of_range",
    }
    assert "data.aggregation is not an object but str" in str(caught.value) and "data.aggregation.min is not a single value" in str(caught.value)
    landed = [(name, count) for (name, count) in rows(postgres_server, f"SELECT name, count FROM {table}_aggregates ORDER BY name")]
    assert landed == [(f"good{i:02d}", i) for i in range(30) if i not in (2, 5, 7, 11, 13, 17, 23, 24)]
    assert rows(postgres_server, f"SELECT tags FROM {table}_aggregates WHERE name = 'good19'") == [({"k\ufffd": "v\ufffd"},)]
    assert rows(postgres_server, f"SELECT name, value FROM {table}") == [("raw", 24.0)]


async def test_an_existing_aggregates_table_lacking_a_column_trips_the_circuit_and_is_left_as_it_is(postgres_server):
    table = unique_table()
    columns = "window_start timestamptz NOT NULL, window_end timestamptz NOT NULL, source text NOT NULL, name text NOT NULL, partial boolean NOT NULL, count bigint"
    postgres_server.admin(f"CREATE TABLE {table}_aggregates ({columns}); ALTER TABLE {table}_aggregates OWNER TO sidecar")
    backend = make_backend(postgres_server, table, aggregates_table=f"{table}_aggregates")
    with pytest.raises(RetryableError) as caught:
        await backend.open()
    assert caught.value.trip_circuit
    assert str(caught.value) == (
        f"cannot connect: table public.{table}_aggregates lacks columns received_at, unit, tags, sum, min, max, avg, last,"
        " p50, p90, p99, quantiles, host, trace_id, job_id; it is never altered by the sidecar"
    )
    found = [c for (c,) in rows(postgres_server, "SELECT column_name FROM information_schema.columns WHERE table_name = %s ORDER BY ordinal_position", f"{table}_aggregates")]
    assert found == ["window_start", "window_end", "source", "name", "partial", "count"]


async def test_an_aggregates_table_of_other_column_types_is_written_with_text_copy_and_the_events_table_still_binary(postgres_server):
    table = unique_table()
    postgres_server.admin(
        f"CREATE TABLE {table}_aggregates (window_start timestamptz NOT NULL, window_end timestamptz NOT NULL, received_at timestamptz,"
        " source varchar(100) NOT NULL, name text NOT NULL, unit text, tags json, partial boolean NOT NULL, count numeric, sum numeric,"
        " min float8, max float8, avg float8, last float8, p50 float8, p90 float8, p99 real, quantiles jsonb, host text, trace_id text, job_id text,"
        f" extra text DEFAULT 'kept'); ALTER TABLE {table}_aggregates OWNER TO sidecar"
    )
    backend = make_backend(postgres_server, table, aggregates_table=f"{table}_aggregates")
    await backend.open()
    assert backend.events.binary_copy is True and backend.aggregates.binary_copy is False
    batch = [aggregate("m", {"count": 4, "sum": 10.0, "p99": 4.5}, tags={"env": "prod"}), enriched("metric", {"name": "m", "value": 1.0})]
    await backend.write_batch(Attempt("svc", as_batch(batch)))
    await backend.aclose()
    assert rows(postgres_server, f"SELECT count, sum, p99, tags::text, extra FROM {table}_aggregates") == [(4, 10, 4.5, '{"env":"prod"}', "kept")]
    assert rows(postgres_server, f"SELECT value FROM {table}") == [(1.0,)]


# ---------------------------------------------------------------- a real sidecar

SIDECAR_CONFIG = """
tcp: {{host: 127.0.0.1, port: 0}}
shutdown: {{connection_grace: 0.2, drain_timeout: 10}}
backends:
  timescaledb:
    type: postgres
    connection_string: "${{PG_URL}}"
    table: {table}
    aggregates_table: {table}_aggregates
    connect_timeout: 2
    batch: {{max_messages: 500, timeout: 0.05}}
    retry: {{initial_backoff: 0.05, max_backoff: 0.3}}
    circuit_breaker: {{failure_threshold: 3, reset_timeout: 0.3, max_reset_timeout: 1.0}}
aggregate:
  "svc-*":
    - metrics: [job_duration_ms]
      window: 1h                        # the current hour's window: flushed, partial, at SIGTERM
      stats: [count, sum, min, max, avg, last, p50, p90, p99, p99.9]
    - metrics: [ticks]
      window: 1s                        # closed by the timer
      stats: [count, sum]
routing:
  all:
    - backend: timescaledb
"""


def documented_query(title: str, table: str) -> str:
    """The ready query of docs/postgres.md under the sentence that starts with `title`, as written."""
    text = (REPO / "docs" / "postgres.md").read_text()
    words = r"\s+".join(map(re.escape, title.split()))
    query = re.search(words + r".*?```sql\n(.*?)```", text, re.S).group(1)
    return query.replace("monitoring_events", table)


@pytest.fixture
def sidecar_of(tmp_path, postgres_server):
    started = []

    def start(table: str) -> SidecarProcess:
        sidecar = SidecarProcess(tmp_path, SIDECAR_CONFIG.format(table=table), env={"PG_URL": postgres_server.url()}).start()
        started.append(sidecar)
        return sidecar

    yield start
    for sidecar in started:
        if sidecar.process.poll() is None:
            sidecar.stop(signal.SIGKILL)


def test_a_sidecar_writes_raw_points_to_the_events_table_and_aggregates_to_the_typed_one(postgres_server, sidecar_of):
    table = unique_table()
    sidecar = sidecar_of(table)
    rng = random.Random(23)
    now = wall.time()
    points, reference = [], {}
    for index in range(3000):
        source = f"svc-{'ab'[index % 2]}"
        tags = rng.choice([{}, {"env": "prod"}, {"env": "dev", "zone": "z1"}])
        value = rng.randint(1, 40000) / 4  # exact in binary: sums equal in any order
        points.append({"source": source, "type": "metric", "timestamp": stamp(now), "data": {"name": "job_duration_ms", "value": value, "unit": "ms", "tags": tags}})
        reference.setdefault((source, tuple(sorted(tags.items()))), []).append(value)
    ticks = [{"source": "svc-a", "type": "metric", "data": {"name": "ticks", "value": 2}} for _ in range(50)]
    events = [{"source": "svc-b", "type": "event", "data": {"level": "info", "message": f"m{i}"}} for i in range(20)]
    sidecar.send(points + ticks + events)
    sidecar.wait_for(lambda s: s["aggregates_emitted"] >= 1 and s["backends"][0]["queued"] == 0, what="a ticks window closed by the timer")
    assert sidecar.stop() == 0
    stats = sidecar.stats()
    pg = stats["backends"][0]
    assert pg["dropped"] == {} and pg["delivered"] == len(points) + len(ticks) + len(events) + stats["aggregates_emitted"]
    # Raw points and events in the events table, and no aggregate.
    assert rows(postgres_server, f"SELECT type, count(*) FROM {table} GROUP BY type ORDER BY type") == [("event", 20), ("metric", 3050)]
    assert rows(postgres_server, f"SELECT count(*) FROM {table} WHERE data ? 'aggregation'") == [(0,)]
    # Every aggregate in the typed table, with the statistics of the reference.
    assert rows(postgres_server, f"SELECT count(*) FROM {table}_aggregates") == [(stats["aggregates_emitted"],)]
    found = aggregate_rows(postgres_server, table, "name = 'job_duration_ms'")
    assert len(found) == len(reference)
    hour = math.floor(now / 3600) * 3600
    for row in found:
        got = dict(zip(AGGREGATE_COLUMNS, row))
        values = reference[got["source"], tuple(sorted(got["tags"].items()))]
        assert (got["window_start"], got["window_end"], got["partial"]) == (utc(hour), utc(hour + 3600), True)
        assert (got["count"], got["sum"], got["min"], got["max"], got["last"]) == (len(values), sum(values), min(values), max(values), values[-1])
        assert got["avg"] == sum(values) / len(values) and got["unit"] == "ms" and got["host"] and got["received_at"] > got["window_start"]
        assert set(got["quantiles"]) == {"p50", "p90", "p99", "p99.9"} and (got["p50"], got["p90"], got["p99"]) == tuple(got["quantiles"][q] for q in ("p50", "p90", "p99"))
        ordered = sorted(values)
        for stat, value in got["quantiles"].items():
            exact = ordered[math.floor(quantile_of(stat) * (len(ordered) - 1))]  # the rank DDSketch estimates
            assert abs(value - exact) <= RELATIVE_ACCURACY * exact, (stat, value, exact)
    # The ready queries of docs/postgres.md, as written.
    p99s = rows(postgres_server, documented_query("From the aggregates table, each source's p99", table))
    assert sorted((source, sorted(tags.items()), p99) for _start, source, tags, _points, p99 in p99s) == sorted(
        (got[3], sorted(got[6].items()), got[16]) for got in found
    )
    per_window = rows(postgres_server, documented_query("From the aggregates table, the points of each window", table).replace("'job_duration_ms'", "'ticks'"))
    assert sum(points for _start, _end, points, _groups, _partial in per_window) == 50
    assert any(not partial for *_rest, partial in per_window), "a ticks window closed by the timer"
    assert rows(postgres_server, f"SELECT count(*) FROM {table} WHERE type = 'metric' AND name = 'ticks'") == [(50,)]
    worst = rows(postgres_server, documented_query("A quantile without a column of its own", table))
    assert sorted((source, sorted(tags.items()), p99, p999) for source, tags, p99, p999 in worst) == sorted(
        (got[3], sorted(got[6].items()), got[16], got[17]["p99.9"]) for got in found
    )


def test_a_bad_aggregate_from_a_client_is_refused_alone_and_counted_on_metrics(postgres_server, sidecar_of):
    table = unique_table()
    sidecar = sidecar_of(table)
    handmade = {"window_start": "2025-02-30T10:00:00.000Z", "window_end": "2025-02-30T10:01:00.000Z", "partial": False, "count": 3}
    good = {**handmade, "window_start": "2025-10-20T10:00:00.000Z", "window_end": "2025-10-20T10:01:00.000Z"}
    sidecar.send([
        {"source": "ops", "type": "metric", "data": {"name": "imported", "value": 1, "aggregation": handmade}},
        {"source": "ops", "type": "metric", "data": {"name": "imported", "value": 1, "tags": {"k": "nul\u0000"}, "aggregation": good}},
        {"source": "ops", "type": "event", "data": {"level": "info", "message": "next to them"}},
    ])
    sidecar.wait_for(lambda s: s["backends"][0].get("delivered") == 2, what="the two good messages")
    assert sidecar.backend("timescaledb")["dropped"] == {"postgres_datetime_field_overflow": 1}
    status, body = sidecar.http("/metrics")
    assert status == 200
    dropped = [line for line in body.decode().splitlines() if line.startswith("sidecar_backend_dropped")]
    assert dropped == ['sidecar_backend_dropped_total{backend="timescaledb",reason="postgres_datetime_field_overflow",type="postgres"} 1.0']
    assert "refused by PostgreSQL: #0: postgres_datetime_field_overflow" in sidecar.log()
    assert sidecar.stop() == 0
    assert rows(postgres_server, f"SELECT name, tags, count FROM {table}_aggregates") == [("imported", {"k": "nul\ufffd"}, 3)]
    assert rows(postgres_server, f"SELECT type FROM {table}") == [("event",)]


def test_a_sidecar_whose_aggregates_table_lacks_a_column_opens_the_circuit_with_the_reason(postgres_server, sidecar_of):
    table = unique_table()
    postgres_server.admin(
        f"CREATE TABLE {table}_aggregates (window_start timestamptz NOT NULL, window_end timestamptz NOT NULL, source text NOT NULL, name text NOT NULL);"
        f" ALTER TABLE {table}_aggregates OWNER TO sidecar"
    )
    sidecar = sidecar_of(table)
    sidecar.send([{"source": "svc-a", "type": "event", "data": {"level": "info", "message": "waits"}}])
    pg = sidecar.wait_for(lambda s: s["backends"][0].get("circuit") == "open", what="the circuit to open")["backends"][0]
    assert f"table public.{table}_aggregates lacks columns received_at, unit, tags, partial, count" in pg["last_error"]
    assert pg["circuit_opened"] == 1 and pg["queued"] == 1 and pg["delivered"] == 0
