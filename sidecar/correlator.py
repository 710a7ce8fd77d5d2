"""The correlator: enriches each chunk of messages, joins traces to jobs, and routes.

It is the single consumer of the sources' channel and the single producer into every backend
queue, so a routing table swap between two chunks is atomic without a lock. Nothing a chunk
holds can stop it: a bug met while enriching a chunk costs that chunk (counted as
`correlator_dropped_messages_total{reason="internal_error"}`), one met while indexing or tapping
it costs only the view (`view_errors_total`), and the traceback of each is logged once.
"""

import logging
import socket

import attrs
import trio

from sidecar.batch import Batch
from sidecar.jobs import LiveIndex
from sidecar.logs import DistinctErrorLog
from sidecar.metrics import Counters
from sidecar.protocol import NativeChunk
from sidecar.routing import RouteTable
from sidecar.transforms import TransformStage

log = logging.getLogger("sidecar.correlator")


@attrs.frozen
class Routing:
    """A routing table together with the running instances its targets name."""

    table: RouteTable
    supervisors: dict  # BackendSpec -> BackendSupervisor
    transforms: TransformStage = attrs.field(factory=TransformStage)  # each source's steps, before the table


class Correlator:
    def __init__(self, routing: Routing, counters: Counters, index: LiveIndex, *, trace_cache_size: int, host: str | None = None):
        self.routing = routing
        self.index = index
        self.observers: list = []  # callables given each enriched chunk (the HTTP tap)
        self.counters = counters
        self.host = host or socket.gethostname()
        self.trace_cache_size = trace_cache_size
        # trace_id -> job_id, oldest first; bounded so a flood of traces cannot grow it.
        self.trace_jobs: dict[str, str] = {}
        self.chunks = 0
        self._bugs = DistinctErrorLog(log)

    async def run(self, receive_channel: trio.MemoryReceiveChannel, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Process chunks until every source has closed its sender, then return."""
        task_status.started()
        async with receive_channel:
            async for received_at, messages, holds in receive_channel:
                await self.process(received_at, messages, holds)

    def enrich(self, received_at: str, messages: list[dict]) -> tuple[dict[str, list[dict]], dict[tuple, list[dict]]]:
        """Add received_at and host, fill a missing timestamp, give a message the job of its
        trace; group by source (order kept within a source), and by (job, trace, source) for
        the live index, as `jobs.cells_of` does, in the same pass."""
        host = self.host
        trace_jobs = self.trace_jobs
        by_source: dict[str, list[dict]] = {}
        cells: dict[tuple, list[dict]] = {}
        last_source = None
        group: list[dict] = []
        for message in messages:
            message["received_at"] = received_at
            message["host"] = host
            if "timestamp" not in message:
                message["timestamp"] = received_at
            context = message.get("context")
            job_id = context.get("job_id") if context else None
            trace_id = message.get("trace_id")
            if trace_id is not None:
                if job_id:
                    if trace_id not in trace_jobs:
                        trace_jobs[trace_id] = job_id
                        if len(trace_jobs) > self.trace_cache_size:
                            del trace_jobs[next(iter(trace_jobs))]
                else:
                    known = trace_jobs.get(trace_id)
                    if known is not None:
                        job_id = known
                        if context is None:
                            message["context"] = {"job_id": job_id}
                        else:
                            context["job_id"] = job_id
            source = message["source"]
            if source != last_source:
                group = by_source.get(source)
                if group is None:
                    group = by_source[source] = []
                last_source = source
            group.append(message)
            if job_id is None and message["type"] == "progress":
                job_id = message["data"]["job_id"]
            if job_id is not None or trace_id is not None:
                key = (job_id, trace_id, source)
                cell = cells.get(key)
                if cell is None:
                    cell = cells[key] = []
                cell.append(message)
        return by_source, cells

    async def process(self, received_at: str, messages, holds: list | None = None) -> None:
        """One chunk: a native `Chunk` (decoded and validated in Rust, enriched and encoded there
        too) or, from the Python decoder, a list of message dicts. `holds`: the sending
        connection's; a backend under `block` with no room adds the Event the connection waits
        for before it reads more, so that only the sources routed to a full backend wait."""
        self.chunks += 1
        try:
            if type(messages) is NativeChunk:
                groups, summaries = messages.enrich(received_at, self.host, self.trace_jobs, self.trace_cache_size)
                index_chunk = self.index.add_summaries, summaries
                batches = [Batch(source, lines, timestamps, urgent, None, received_at) for source, lines, timestamps, urgent in groups]
            else:
                by_source, cells = self.enrich(received_at, messages)
                index_chunk = self.index.add_cells, cells
                # Encoded now, while the chunk is in the CPU's cache, once for every backend.
                batches = list(map(Batch.of, by_source.values()))
        except Exception as exc:
            self.counters.inc("correlator_dropped_messages_total", len(messages), reason="internal_error")
            self._bugs.log(exc, "internal error while enriching a chunk of %d messages; they are dropped", len(messages))
            return
        self._view(*index_chunk)
        for observer in self.observers:
            self._view(observer, batches)
        routing = self.routing
        for batch in batches:
            if routing.transforms:
                try:
                    batch = routing.transforms.apply(batch, self._removed_by)
                except Exception as exc:  # a step's bug: the batch goes no further, counted
                    self.counters.inc("correlator_dropped_messages_total", len(batch), reason="internal_error")
                    self._bugs.log(exc, "internal error in a transform of %d messages from %s; they are dropped", len(batch), batch.source)
                    continue
                if not len(batch):
                    continue
            targets = routing.table.targets_for(batch.source)
            if not targets:
                self.counters.inc("unrouted_messages_total", len(batch))
                continue
            for target in targets:
                try:
                    selected = target.select(batch)
                except Exception as exc:  # a filter's bug: this backend misses the batch, counted
                    self.counters.inc("correlator_dropped_messages_total", len(batch), reason="internal_error")
                    self._bugs.log(exc, "internal error while filtering %d messages from %s for %s; they are dropped for it", len(batch), batch.source, target.spec.label)
                    continue
                if len(selected):
                    admitted = routing.supervisors[target.spec].offer(selected)
                    if admitted is not None and holds is not None:
                        holds.append(admitted)
                    selected.record = None  # in every log it goes to: the memory queues keep only the lines
            batch.record = None
            self.counters.inc("routed_messages_total", len(batch))

    def _removed_by(self, spec, count: int) -> None:
        self.counters.inc("transform_removed_messages_total", count, transform=spec.label)

    def _view(self, update, chunk) -> None:
        """Feed the live index or a tap: what they show is not worth a message."""
        try:
            update(chunk)
        except Exception as exc:
            self.counters.inc("view_errors_total")
            self._bugs.log(exc, "internal error while updating the view (%s); the messages are delivered all the same", getattr(update, "__qualname__", update))

    def statistics(self) -> dict:
        return {"chunks": self.chunks, "traces_with_jobs": len(self.trace_jobs), "index": self.index.statistics()}
