"""PostgreSQL benchmark: rows/s into PostgreSQL through the sidecar (SDK-like clients over TCP ->
sidecar -> postgres backend, COPY per batch) versus a plain psycopg `executemany` INSERT of the
same rows (the seed's TimescaleDBBackend), in the same run, on a throwaway server started here.

The sidecar figure runs from the first byte sent until `SELECT count(*)` reaches N. Both write
into an identical fresh table (same columns and indexes).

    .venv/bin/python bench/postgres.py [--messages 200000] [--baseline-messages 20000] [--connections 4]
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import orjson
import psycopg
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sidecar.backends.postgres import COLUMNS, PostgresBackend, PostgresSettings, row_of  # noqa: E402
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


def create_table(url: str, table: str) -> None:
    async def create():
        backend = PostgresBackend(PostgresSettings(connection_string=url, table=table), label="bench")
        await backend.open()
        await backend.aclose()

    trio.run(create)


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


def through_sidecar(url: str, total: int, connections: int, batch: int) -> tuple[float, dict]:
    per_connection = total // connections
    total = per_connection * connections
    payloads = [b"".join(orjson.dumps(message(c, i)) + b"\n" for i in range(per_connection)) for c in range(connections)]
    create_table(url, "through_sidecar")
    with tempfile.TemporaryDirectory(prefix="bench-pg-") as work:
        work = Path(work)
        status = work / "status.json"
        stderr_path = work / "sidecar.stderr"
        sidecar, port = start_sidecar(work, CONFIG.format(batch=batch), env={"PG_URL": url}, status_interval=0.5)
        try:
            threads = senders(port, payloads)
            with psycopg.connect(url, autocommit=True) as watcher:
                started = time.perf_counter()
                for thread in threads:
                    thread.start()
                counted = 0
                while counted < total:
                    time.sleep(0.05)
                    counted = watcher.execute("SELECT count(*) FROM through_sidecar").fetchone()[0]
                    if sidecar.poll() is not None:
                        raise SystemExit(f"sidecar died:\n{stderr_path.read_text()}")
                elapsed = time.perf_counter() - started
            for thread in threads:
                thread.join()
            stats = json.loads(status.read_text())["backends"][0]
        finally:
            sidecar.terminate()
            sidecar.wait(60)
    if counted != total:
        raise SystemExit(f"expected {total} rows, found {counted}")
    return total / elapsed, stats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--baseline-messages", type=int, default=20_000)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--batch", type=int, default=5000, help="the sidecar's batch.max_messages")
    args = parser.parse_args()

    print("starting a throwaway PostgreSQL server ...", flush=True)
    server = start_server()
    try:
        url = server.url()
        version = server.admin("SHOW server_version")[0][0]
        print(f"machine: {os.cpu_count()} cores, Python {platform.python_version()}, PostgreSQL {version} (fsync off), psycopg {psycopg.__version__}")
        base = baseline(url, args.baseline_messages)
        print(f"executemany baseline: {base:,.0f} rows/s ({args.baseline_messages:,} rows, batches of 1000, one commit each)", flush=True)
        single = per_message(url, min(args.baseline_messages, 5000))
        print(f"(for context: one INSERT + commit per message: {single:,.0f} rows/s)", flush=True)
        rate, stats = through_sidecar(url, args.messages, args.connections, args.batch)
        print(f"through the sidecar:  {rate:,.0f} rows/s ({args.messages:,} rows over {args.connections} TCP connections, COPY batches of up to {args.batch}; {stats['batches']} batches)")
        print(f"ratio: {rate / base:.1f}x the executemany baseline (target: at least 10x); {rate / single:.1f}x one INSERT per message")
        return 0
    finally:
        server.close()


if __name__ == "__main__":
    raise SystemExit(main())
