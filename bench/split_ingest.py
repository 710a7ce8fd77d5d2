"""Experiment: what ingest worker processes behind SO_REUSEPORT, feeding one coordinator, could
reach on this machine (docs/performance.md, "Why 300,000 messages/s needs the second core").

Not the sidecar: a measurement of the design's ceiling before building it. Each worker reads its
connections with the sidecar's own decoder and validation, enriches, encodes each line, and
summarises the chunk for the live index (the index's own cell summaries); it hands the
coordinator one frame per chunk over a pipe: the lines joined per source, and the summaries. The
coordinator never builds a message dict: it appends each source's lines to its file and merges
the summaries into its index. Left out, as cheap or rare: routing (a lookup per source),
filling a job from its trace (a message without a job re-encoded in the coordinator).

    .venv/bin/python bench/split_ingest.py [--messages 2000000] [--connections 8] [--workers 2]
"""

import argparse
import datetime as dt
import gc
import multiprocessing
import os
import pickle
import socket
import struct
import sys
import tempfile
import time
from pathlib import Path

import orjson
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sidecar.jobs import LiveIndex, SourceActivity, cells_of  # noqa: E402
from sidecar.message import format_timestamp  # noqa: E402
from sidecar.protocol import StreamDecoder  # noqa: E402
from benchkit import senders  # noqa: E402
from ingest import cpu_model, cpu_seconds, message, peak_rss_mib  # noqa: E402

FRAME = struct.Struct("!I")


def summaries(messages: list[dict]) -> list[tuple]:
    """The chunk's index cells, summarised as the live index does: (job, trace, piece, spans)."""
    return [(job_id, trace_id, *SourceActivity.of_cell(source, cell)) for (job_id, trace_id, source), cell in cells_of(messages).items()]


async def worker_main(port: int, pipe_fd: int) -> None:
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    await sock.bind(("127.0.0.1", port))
    sock.listen(128)
    pipe = trio.lowlevel.FdStream(pipe_fd)
    host = socket.gethostname()
    dumps = orjson.dumps
    lock = trio.Lock()

    async def serve(stream: trio.SocketStream) -> None:
        decoder = StreamDecoder()
        async with stream:
            while data := await stream.receive_some(1 << 18):
                messages, _errors = decoder.receive_data(data)
                if not messages:
                    continue
                received_at = format_timestamp(dt.datetime.now(dt.timezone.utc))
                by_source: dict[str, list[bytes]] = {}
                for m in messages:
                    m["received_at"] = received_at
                    m["host"] = host
                    by_source.setdefault(m["source"], []).append(dumps(m))
                frame = pickle.dumps(({s: b"\n".join(lines) + b"\n" for s, lines in by_source.items()}, len(messages), summaries(messages)), protocol=5)
                async with lock:
                    await pipe.send_all(FRAME.pack(len(frame)) + frame)

    async with trio.open_nursery() as nursery:
        await trio.serve_listeners(lambda stream: serve(stream), [trio.SocketListener(sock)], handler_nursery=nursery)


def tune_gc() -> None:
    """As `monitoring-sidecar run` does: the hot path makes many short-lived dicts, no cycles."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def worker(port: int, pipe_fd: int) -> None:
    tune_gc()
    trio.run(worker_main, port, pipe_fd)


def coordinator(read_fds: list[int], out: str, total: int, done) -> None:
    tune_gc()
    index = LiveIndex(10_000, 10_000, 3600, time.monotonic)
    files: dict[str, int] = {}
    delivered = 0

    async def drain(fd: int) -> None:
        nonlocal delivered
        stream = trio.lowlevel.FdStream(fd)
        buffer = bytearray()
        while data := await stream.receive_some(1 << 20):
            buffer += data
            while len(buffer) >= 4:
                (size,) = FRAME.unpack_from(buffer)
                if len(buffer) < 4 + size:
                    break
                payloads, count, cells = pickle.loads(memoryview(buffer)[4 : 4 + size])
                del buffer[: 4 + size]
                for source, payload in payloads.items():
                    fd_out = files.get(source)
                    if fd_out is None:
                        fd_out = files[source] = os.open(os.path.join(out, f"{source}.jsonl"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                    os.write(fd_out, payload)
                now = time.monotonic()
                for job_id, trace_id, piece, spans in cells:
                    index.add_piece(job_id, trace_id, piece, spans, now)
                delivered += count
                if delivered >= total:
                    done.set()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for fd in read_fds:
                nursery.start_soon(drain, fd)

    trio.run(main)


def cpu_of(pid: int) -> float:
    return sum(cpu_seconds(pid))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=2_000_000)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    per_connection = args.messages // args.connections
    total = per_connection * args.connections
    payloads = [b"".join(orjson.dumps(message(c, i)) + b"\n" for i in range(per_connection)) for c in range(args.connections)]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="bench-split-") as out:
        context = multiprocessing.get_context("fork")
        done = context.Event()
        pipes = [os.pipe() for _ in range(args.workers)]
        coord = context.Process(target=coordinator, args=([r for r, _w in pipes], out, total, done))
        coord.start()
        workers = [context.Process(target=worker, args=(port, w)) for _r, w in pipes]
        for process in workers:
            process.start()
        time.sleep(1.0)  # workers listening
        processes = [coord, *workers]
        cpu_before = [cpu_of(p.pid) for p in processes]
        started = time.perf_counter()
        threads = senders(port, payloads)
        for thread in threads:
            thread.start()
        if not done.wait(300):
            raise SystemExit("not all messages arrived")
        elapsed = time.perf_counter() - started
        cpu = [cpu_of(p.pid) - before for p, before in zip(processes, cpu_before)]
        rss = [peak_rss_mib(p.pid) for p in processes]
        for process in processes:
            process.kill()
        lines = sum(path.read_bytes().count(b"\n") for path in Path(out).glob("*.jsonl"))
    print(f"machine: {os.cpu_count()} cores, {cpu_model()}; load average {os.getloadavg()[0]:.2f}")
    print(f"{total:,} messages, {args.connections} connections, {args.workers} workers: {total / elapsed:,.0f} messages/s")
    print(f"coordinator CPU {cpu[0] / total * 1e6:.2f} µs per message, peak RSS {rss[0]:.0f} MiB")
    for n, (used, peak) in enumerate(zip(cpu[1:], rss[1:]), 1):
        print(f"worker {n} CPU {used:.1f} s ({used / elapsed:.0%} of a core), peak RSS {peak:.0f} MiB")
    print(f"lines written: {lines:,} of {total:,}")
    return 0 if lines == total else 1


if __name__ == "__main__":
    raise SystemExit(main())
