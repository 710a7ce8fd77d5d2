"""The ingest interface: what a decoder hands on for the correlator, and how it is enriched.

A decoder (sidecar.protocol.StreamDecoder) makes each chunk of messages it read into a chunk of
one of two kinds, with the same interface:

- `PythonChunk`: the messages as validated dicts (orjson, `validate_message`); a list.
- `NativeChunk`: the messages parsed and validated by the Rust hot path (`sidecar._native`,
  through sidecar.native), still as the bytes received.

Both have `path` ("python" or "native", for the `decoded_messages_total` counter), `len()`, and
`enrich(received_at, host, trace_jobs)`, which adds the sidecar's fields, gives a message the
job of its trace, encodes every message's JSON line once, and returns an `Enriched`: the batches
per source and the summaries per (job, trace, source) cell for the live index. The Python
chunk's enrichment is the reference; tests/test_native.py checks the native one gives the same.

The choice between the two is made once, by the decoder, per chunk: native where the stream
asked for it, the extension is built and the native decoder takes the lines; Python for the
rest. Nothing downstream tests which it got.
"""

from collections.abc import Iterable, Iterator
from typing import NamedTuple, Protocol

import orjson

from sidecar import native
from sidecar.batch import Batch
from sidecar.jobs import CellSummary, SourceActivity, summaries_of
from sidecar.message import job_id_of

NATIVE_AVAILABLE = native.AVAILABLE


class TraceJobs:
    """trace_id -> job_id: the first job a trace was seen with, given to the trace's messages
    that name none. Bounded: past `limit` traces the one linked first is forgotten.

    Both ingest paths use it the same way: they read `jobs` (a dict, oldest first) for a trace's
    job and add a link only through `link`, so the policy is here alone."""

    __slots__ = ("limit", "jobs")

    def __init__(self, limit: int):
        self.limit = limit
        self.jobs: dict[str, str] = {}

    def link(self, trace_id: str, job_id: str) -> None:
        """A message of `trace_id` named `job_id`: remembered if the trace has no job yet (a
        call for a known trace changes nothing, so a caller may skip it)."""
        jobs = self.jobs
        if trace_id not in jobs:
            jobs[trace_id] = job_id
            if len(jobs) > self.limit:
                del jobs[next(iter(jobs))]

    def __len__(self) -> int:
        return len(self.jobs)

    def items(self):
        return self.jobs.items()


class Enriched(NamedTuple):
    """A chunk after enrichment. `batches`: one per source, in order of first appearance, each
    message's line encoded. `cells`: one `CellSummary` per (job, trace, source), made as they
    are read, so that the live index, reading them inside the correlator's view guard, is the
    only one a bug in a summary costs."""

    batches: list[Batch]
    cells: Iterable[CellSummary]


class Chunk(Protocol):
    """What both kinds of chunk offer (see the module's doc)."""

    path: str

    def __len__(self) -> int: ...

    def enrich(self, received_at: str, host: str, trace_jobs: TraceJobs, points: bool = False) -> Enriched:
        """`points`: the aggregate steps will read the batches (the native chunk then gives each
        batch its decoder's record, `Batch.points`)."""
        ...


class PythonChunk(list):
    """Messages decoded by the Python path: validated dicts, in order. A list, so what reads a
    decoder's messages reads them as a list."""

    __slots__ = ()
    path = "python"

    def enrich(self, received_at: str, host: str, trace_jobs: TraceJobs, points: bool = False) -> Enriched:
        by_source, cells = self.correlate(received_at, host, trace_jobs)
        # Encoded now, while the chunk is in the CPU's cache, once for every backend.
        return Enriched(list(map(Batch.of, by_source.values())), summaries_of(cells))

    def correlate(self, received_at: str, host: str, trace_jobs: TraceJobs) -> tuple[dict[str, list[dict]], dict[tuple, list[dict]]]:
        """Add received_at and host, fill a missing timestamp, give a message without a job the
        job of its trace; group by source (order kept within a source), and by (job, trace,
        source) for the live index, as `jobs.cells_of` does, in the same pass."""
        jobs = trace_jobs.jobs
        link = trace_jobs.link
        by_source: dict[str, list[dict]] = {}
        cells: dict[tuple, list[dict]] = {}
        last_source = None
        group: list[dict] = []
        for message in self:
            message["received_at"] = received_at
            message["host"] = host
            if "timestamp" not in message:
                message["timestamp"] = received_at
            trace_id = message.get("trace_id")
            if trace_id is not None:
                context = message.get("context")
                own = context.get("job_id") if context else None
                if own:
                    if trace_id not in jobs:
                        link(trace_id, own)
                else:
                    known = jobs.get(trace_id)
                    if known is not None:
                        if context is None:
                            message["context"] = {"job_id": known}
                        else:
                            context["job_id"] = known
            source = message["source"]
            if source != last_source:
                group = by_source.get(source)
                if group is None:
                    group = by_source[source] = []
                last_source = source
            group.append(message)
            job_id = job_id_of(message)
            if job_id is not None or trace_id is not None:
                key = (job_id, trace_id, source)
                cell = cells.get(key)
                if cell is None:
                    cell = cells[key] = []
                cell.append(message)
        return by_source, cells


class NativeChunk:
    """Messages decoded by the native path (a `sidecar._native.Chunk`): validated, still bytes.
    Enriched and encoded in one native call, with no dict per message."""

    __slots__ = ("_chunk",)
    path = "native"

    def __init__(self, chunk):
        self._chunk = chunk

    def __len__(self) -> int:
        return len(self._chunk)

    def enrich(self, received_at: str, host: str, trace_jobs: TraceJobs, points: bool = False) -> Enriched:
        enrichment = self._chunk.enrich(received_at, host, trace_jobs, points)
        batches = [Batch(group.source, group.lines, group.timestamps, group.urgent, None, received_at, group.aggregates, group.points) for group in enrichment.groups]
        return Enriched(batches, _summaries(enrichment.cells))


def _summaries(cells) -> Iterator[CellSummary]:
    """The native cell summaries (`sidecar._native.Cell`) as the live index takes them."""
    for cell in cells:
        activity = SourceActivity(cell.source, cell.first, cell.last, cell.count, cell.errors, cell.events, cell.metrics, cell.progress)
        yield CellSummary(cell.job_id, cell.trace_id, activity, list(map(orjson.loads, cell.spans)))


def decode_natively(complete: bytes, max_message_size: int, max_depth: int):
    """The native decoder's reading of complete JSON lines: a `sidecar._native.Decoded` (the
    lines it declined, and `mend` to make the chunk without them or with their normalised
    forms), or None if the native code met a bug."""
    return native.decode(complete, max_message_size, max_depth)


def native_chunk(decoded, replacements: list[tuple[int, bytes]]) -> NativeChunk | None:
    """The chunk of a `Decoded` with each declined line replaced by its normalised form in
    `replacements` (`(line number, line)`, in line order) or left out; None if the native
    decoder declines a replacement too."""
    chunk = decoded.mend(replacements)
    return None if chunk is None else NativeChunk(chunk)
