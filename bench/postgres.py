"""PostgreSQL benchmark: rows/s into PostgreSQL through the sidecar (SDK-like clients over TCP ->
sidecar -> postgres backend, COPY per batch) versus a plain psycopg `executemany` INSERT of the
same rows (the seed's TimescaleDBBackend), in the same run, on a throwaway server started here.

Also in the same run, what the server takes with no sidecar at all (its ceiling on this machine):
COPY of rows built before the clock starts, straight from psycopg, in text (the backend's
`row_of` encoding) and binary (`FORMAT BINARY`, `copy.set_types` + `write_row`, the backend's
`binary_row_of` rows), batches of 5000 with one commit each; binary also from two connections at
once, and, for scale only, into a table without its indexes. And the backend alone:
`PostgresBackend.write_batch` of the enriched messages, in this process, no sidecar.

Every figure writes into its own fresh table with the backend's columns and indexes. The sidecar
figure runs from the first byte sent until the sidecar's status file (written every 50 ms)
counts N rows delivered, that is committed; `count(*)` then checks the table. (Polling
`count(*)` instead cost the server 15-20% of a core on this 2-core machine.)

    .venv/bin/python bench/postgres.py [--messages 200000] [--baseline-messages 20000] [--connections 4]
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import orjson
import psycopg
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sidecar.batch import Batch  # noqa: E402
from sidecar.backends.base import Attempt  # noqa: E402
from sidecar.backends.postgres import (  # noqa: E402
    COLUMNS, COPY_TYPES, JsonbBytes, PostgresBackend, PostgresSettings, binary_row_of, row_of,
)
from tests.services.postgres import start_server  # noqa: E402
from benchkit import senders, start_sidecar  # noqa: E402

CONFIG = """
tcp: {{host: 127.0.0.1, port: 0}}
shutdown: {{drain_timeout: 60}}
backends:
  pg:
    type: postgres
    connection_string: "${{PG_URL}}"
    table: through_sidecar
    batch: {{max_messages: {batch}, timeout: 0.2}}
    queue: {{max_messages: 50000, when_full: block}}
routing:
  all:
    - backend: pg
"""


def message(connection: int, seq: int) -> dict:
    return {
        "source": f"bench-{connection % 4}",
        "type": "event" if seq % 4 else "metric",
        "timestamp": "2025-10-20T10:30:45.123Z",
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
        "span_id": "00f067aa0ba902b7",
        "context": {"job_id": f"job-{seq // 1000}", "seq": seq},
        "data": {"level": "info", "message": f"connection {connection} processed record {seq} of the nightly load"}
        if seq % 4
        else {"name": "records.processed", "value": float(seq), "unit": "count"},
    }


def create_table(url: str, table: str, *, indexes: bool = True) -> None:
    async def create():
        backend = PostgresBackend(PostgresSettings(connection_string=url, table=table), label="bench")
        await backend.open()
        await backend.aclose()

    trio.run(create)
    if not indexes:
        with psycopg.connect(url, autocommit=True) as conn:
            for (index,) in conn.execute("SELECT indexname FROM pg_indexes WHERE tablename = %s", (table,)).fetchall():
                conn.execute(f"DROP INDEX {index}")


def enriched_messages(count: int, connections: int) -> list[dict]:
    """The messages the sidecar path sends, as the backend gets them (enriched by the sidecar),
    the connections' messages interleaved."""
    per_connection = count // connections
    return [
        {**message(c, i), "received_at": "2025-10-20T10:30:45.200Z", "host": "bench"}
        for i in range(per_connection) for c in range(connections)
    ]


def baseline(url: str, count: int) -> float:
    """The seed's way: executemany(INSERT ...) of the same rows, one transaction, psycopg 3."""
    create_table(url, "executemany_baseline")
    enriched = [{**message(0, i), "received_at": "2025-10-20T10:30:45.200Z", "host": "bench"} for i in range(count)]
    rows = [row_of(m) for m in enriched]
    insert = f"INSERT INTO executemany_baseline ({', '.join(COLUMNS)}) VALUES ({', '.join(['%s'] * len(COLUMNS))})"
    with psycopg.connect(url) as conn:
        started = time.perf_counter()
        with conn.cursor() as cursor:
            for start in range(0, count, 1000):  # the seed's batches of messages
                cursor.executemany(insert, rows[start : start + 1000])
                conn.commit()
        elapsed = time.perf_counter() - started
        assert conn.execute("SELECT count(*) FROM executemany_baseline").fetchone()[0] == count
    return count / elapsed


def per_message(url: str, count: int) -> float:
    """For context: one INSERT and one commit per message, as a client writing directly would."""
    create_table(url, "per_message_baseline")
    rows = [row_of({**message(0, i), "received_at": "2025-10-20T10:30:45.200Z", "host": "bench"}) for i in range(count)]
    insert = f"INSERT INTO per_message_baseline ({', '.join(COLUMNS)}) VALUES ({', '.join(['%s'] * len(COLUMNS))})"
    with psycopg.connect(url, autocommit=True) as conn:
        started = time.perf_counter()
        for row in rows:
            conn.execute(insert, row)
        return count / (time.perf_counter() - started)


def server_ceiling(url: str, table: str, messages: list[dict], *, binary: bool, connections: int = 1, indexes: bool = True, batch: int = 5000) -> float:
    """No sidecar: COPY of rows built before the clock starts, batches of `batch`, one commit
    each, from `connections` connections at once (each its share of the rows)."""
    create_table(url, table, indexes=indexes)
    if binary:
        moments = {}
        rows = [binary_row_of(m, moments) for m in messages]
        statement = f"COPY {table} ({', '.join(COLUMNS)}) FROM STDIN (FORMAT BINARY)"
    else:
        rows = [row_of(m) for m in messages]
        statement = f"COPY {table} ({', '.join(COLUMNS)}) FROM STDIN"
    share = len(rows) // connections
    conns = [psycopg.connect(url) for _ in range(connections)]
    errors = []

    def copy(conn: psycopg.Connection, part: list[tuple]) -> None:
        try:
            conn.adapters.register_dumper(None, JsonbBytes)  # jsonb from encoded JSON, as the backend sends it
            for start in range(0, len(part), batch):
                with conn.cursor().copy(statement) as copy:
                    if binary:
                        copy.set_types(COPY_TYPES)
                    for row in part[start : start + batch]:
                        copy.write_row(row)
                conn.commit()
        except BaseException as exc:
            errors.append(exc)

    try:
        threads = [threading.Thread(target=copy, args=(conn, rows[i * share : (i + 1) * share])) for i, conn in enumerate(conns)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
        if errors:
            raise errors[0]
        assert conns[0].execute(f"SELECT count(*) FROM {table}").fetchone()[0] == share * connections
    finally:
        for conn in conns:
            conn.close()
    return share * connections / elapsed


def backend_alone(url: str, messages: list[dict], batch: int) -> float:
    """PostgresBackend.write_batch in this process: the backend's work and the server's, no sidecar."""
    table = "backend_alone"

    async def write() -> float:
        backend = PostgresBackend(PostgresSettings(connection_string=url, table=table), label="bench")
        await backend.open()
        batches = [Batch.of(messages[start : start + batch]) for start in range(0, len(messages), batch)]
        started = time.perf_counter()
        for each in batches:
            await backend.write_batch(Attempt("bench", each))
        elapsed = time.perf_counter() - started
        await backend.aclose()
        return len(messages) / elapsed

    rate = trio.run(write)
    with psycopg.connect(url) as conn:
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == len(messages)
    return rate


def through_sidecar(url: str, total: int, connections: int, batch: int) -> tuple[float, dict]:
    per_connection = total // connections
    total = per_connection * connections
    payloads = [b"".join(orjson.dumps(message(c, i)) + b"\n" for i in range(per_connection)) for c in range(connections)]
    create_table(url, "through_sidecar")
    with tempfile.TemporaryDirectory(prefix="bench-pg-") as work:
        work = Path(work)
        status = work / "status.json"
        stderr_path = work / "sidecar.stderr"
        sidecar, port = start_sidecar(work, CONFIG.format(batch=batch), env={"PG_URL": url}, status_interval=0.05)
        try:
            threads = senders(port, payloads)
            started = time.perf_counter()
            for thread in threads:
                thread.start()
            delivered = 0
            while delivered < total:
                time.sleep(0.01)
                try:
                    stats = json.loads(status.read_text())["backends"][0]
                except (OSError, ValueError):
                    continue  # being replaced
                delivered = stats["delivered"]
                if sidecar.poll() is not None:
                    raise SystemExit(f"sidecar died:\n{stderr_path.read_text()}")
                if stats["dropped"]:
                    raise SystemExit(f"the sidecar dropped messages: {stats}")
            elapsed = time.perf_counter() - started
            for thread in threads:
                thread.join()
        finally:
            sidecar.terminate()
            sidecar.wait(60)
    with psycopg.connect(url) as conn:
        counted = conn.execute("SELECT count(*) FROM through_sidecar").fetchone()[0]
    if counted != total:
        raise SystemExit(f"expected {total} rows, found {counted}")
    return total / elapsed, stats


def settle(server, table: str) -> None:
    """Between measurements: drop the table just filled (autovacuum would soon visit it, during
    the next measurement) and write the dirty pages out now (a checkpoint forced by the WAL
    written so far would otherwise land in the middle of a later measurement)."""
    server.admin(f"DROP TABLE {table}")
    server.admin("CHECKPOINT")


def load() -> str:
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--baseline-messages", type=int, default=20_000)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--batch", type=int, default=5000, help="the sidecar's batch.max_messages, and the COPY batches without it")
    args = parser.parse_args()

    print("starting a throwaway PostgreSQL server ...", flush=True)
    server = start_server()
    try:
        url = server.url()
        version = server.admin("SHOW server_version")[0][0]
        print(f"machine: {os.cpu_count()} cores, Python {platform.python_version()}, PostgreSQL {version} (fsync off), psycopg {psycopg.__version__}")
        print(f"load average at the start: {load()}", flush=True)
        server.admin("CHECKPOINT")
        base = baseline(url, args.baseline_messages)
        settle(server, "executemany_baseline")
        print(f"executemany baseline: {base:,.0f} rows/s ({args.baseline_messages:,} rows, batches of 1000, one commit each)", flush=True)
        single = per_message(url, min(args.baseline_messages, 5000))
        settle(server, "per_message_baseline")
        print(f"(for context: one INSERT + commit per message: {single:,.0f} rows/s)", flush=True)

        def versus(rate: float) -> str:
            return f"{rate:,.0f} rows/s = {rate / base:.1f}x the baseline"

        messages = enriched_messages(args.messages, args.connections)
        print(f"server ceiling, no sidecar ({len(messages):,} pre-built rows, COPY batches of {args.batch}, one commit each):")
        text = server_ceiling(url, "ceiling_text", messages, binary=False, batch=args.batch)
        settle(server, "ceiling_text")
        print(f"  text COPY, 1 connection:             {versus(text)}", flush=True)
        binary = server_ceiling(url, "ceiling_binary", messages, binary=True, batch=args.batch)
        settle(server, "ceiling_binary")
        print(f"  binary COPY, 1 connection:           {versus(binary)}", flush=True)
        binary2 = server_ceiling(url, "ceiling_binary_2", messages, binary=True, connections=2, batch=args.batch)
        settle(server, "ceiling_binary_2")
        print(f"  binary COPY, 2 connections at once:  {versus(binary2)}", flush=True)
        bare = server_ceiling(url, "ceiling_no_indexes", messages, binary=True, indexes=False, batch=args.batch)
        settle(server, "ceiling_no_indexes")
        print(f"  (for scale only, binary COPY into the table without its 4 indexes: {versus(bare)})", flush=True)
        alone = backend_alone(url, messages, args.batch)
        settle(server, "backend_alone")
        print(f"backend alone (PostgresBackend.write_batch in this process, no sidecar): {versus(alone)}", flush=True)
        del messages
        rate, stats = through_sidecar(url, args.messages, args.connections, args.batch)
        print(f"through the sidecar:  {rate:,.0f} rows/s ({args.messages:,} rows over {args.connections} TCP connections, COPY batches of up to {args.batch}; {stats['batches']} batches)")
        print(f"ratio: {rate / base:.1f}x the executemany baseline (target: at least 10x); {rate / single:.1f}x one INSERT per message")
        print(f"the sidecar reaches {rate / binary:.0%} of the one-connection binary COPY ceiling and {rate / alone:.0%} of the backend alone;"
              f" the best the server took here with the required indexes, {max(binary, binary2):,.0f} rows/s, is {max(binary, binary2) / base:.1f}x the baseline")
        print(f"load average at the end: {load()}")
        return 0
    finally:
        server.close()


if __name__ == "__main__":
    raise SystemExit(main())
