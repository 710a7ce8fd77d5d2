"""The correlator: enriches each chunk of messages, joins traces to jobs, and routes.

It is the single consumer of the sources' channel and the single producer into every backend
queue, so a routing table swap between two chunks is atomic without a lock. Nothing a chunk
holds can stop it: a bug met while enriching a chunk costs that chunk (counted as
`correlator_dropped_messages_total{reason="internal_error"}`), one met while indexing or tapping
it costs only the view (`view_errors_total`), and the traceback of each is logged once.
"""

import logging
import socket
import time

import attrs
import trio

from sidecar.aggregate import Aggregation
from sidecar.batch import Batch
from sidecar.ingest import Chunk, Enriched, TraceJobs
from sidecar.jobs import LiveIndex
from sidecar.logs import DistinctErrorLog
from sidecar.metrics import Counters
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
    def __init__(self, routing: Routing, counters: Counters, index: LiveIndex, *, trace_cache_size: int, host: str | None = None, aggregation: Aggregation | None = None):
        self.routing = routing
        self.index = index
        self.observers: list = []  # callables given each enriched chunk (the HTTP tap)
        # The HTTP view's application metrics (sidecar.apps_metrics): given the aggregates
        # routed and, when it takes raw points, each batch as it is routed.
        self.apps_metrics = None
        self.counters = counters
        self.host = host or socket.gethostname()
        # The aggregate steps' windows: fed after the transforms, closed by `close_windows`.
        self.aggregation = aggregation if aggregation is not None else Aggregation(host=self.host)
        self.aggregation.host = self.host
        # trace_id -> job_id, bounded so a flood of traces cannot grow it.
        self.trace_jobs = TraceJobs(trace_cache_size)
        self.chunks = 0
        self._bugs = DistinctErrorLog(log)

    async def run(self, receive_channel: trio.MemoryReceiveChannel, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Process chunks until every source has closed its sender, then return."""
        task_status.started()
        async with receive_channel:
            async for received_at, messages, holds in receive_channel:
                await self.process(received_at, messages, holds)

    def enrich(self, received_at: str, chunk: Chunk) -> Enriched:
        """A chunk through the ingest interface (sidecar.ingest), whichever path decoded it."""
        return chunk.enrich(received_at, self.host, self.trace_jobs, bool(self.aggregation))

    async def process(self, received_at: str, chunk: Chunk, holds: list | None = None) -> None:
        """One chunk, as a decoder made it (sidecar.ingest). `holds`: the sending connection's;
        a backend under `block` with no room adds the Event the connection waits for before it
        reads more, so that only the sources routed to a full backend wait."""
        self.chunks += 1
        try:
            enriched = self.enrich(received_at, chunk)
        except Exception as exc:
            self.counters.inc("correlator_dropped_messages_total", len(chunk), reason="internal_error")
            self._bugs.log(exc, "internal error while enriching a chunk of %d messages; they are dropped", len(chunk))
            return
        self._view(self.index.add_summaries, enriched.cells)
        batches = enriched.batches
        for observer in self.observers:
            self._view(observer, batches)
        routing = self.routing
        aggregation = self.aggregation
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
            if aggregation:
                try:
                    batch = aggregation.apply(batch, self._removed_by_label)
                except Exception as exc:  # a bug in the step: the batch goes no further, counted
                    self.counters.inc("correlator_dropped_messages_total", len(batch), reason="internal_error")
                    self._bugs.log(exc, "internal error while aggregating %d messages from %s; they are dropped", len(batch), batch.source)
                    continue
                if not len(batch):
                    continue
            apps = self.apps_metrics
            if apps is not None and apps.raw:
                self._view(apps.add_points, batch.messages(), time.time())
            if self._route(routing, batch, holds):
                self.counters.inc("routed_messages_total", len(batch))
            else:
                self.counters.inc("unrouted_messages_total", len(batch))
        for batch in batches:
            batch.points = None  # read by the aggregate steps; it holds the chunk

    def _route(self, routing: Routing, batch: Batch, holds: list | None) -> int:
        """Offer `batch` to the backends its source's rules name; how many targets it had."""
        targets = routing.table.targets_for(batch.source)
        if not targets:
            batch.record = None
            return 0
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
        return len(targets)

    def route_aggregates(self, messages: list[dict]) -> None:
        """The aggregate step's messages, routed like any message of their source (the
        transforms and the aggregate steps do not see them again), counted apart from what
        the sources received."""
        self.counters.inc("aggregates_emitted_total", len(messages))
        if self.apps_metrics is not None:
            self._view(self.apps_metrics.add_aggregates, messages, time.time())
        routing = self.routing
        for batch in Batch.runs(messages):
            try:
                if not self._route(routing, batch, None):
                    self.counters.inc("unrouted_aggregates_total", len(batch))
            except Exception as exc:
                self.counters.inc("correlator_dropped_messages_total", len(batch), reason="internal_error")
                self._bugs.log(exc, "internal error while routing %d aggregates from %s; they are dropped", len(batch), batch.source)

    async def close_windows(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """The aggregate steps' timer: routes each window's aggregates as it ends, until
        `flush_windows`."""
        await self.aggregation.run(self.route_aggregates, task_status=task_status)

    def flush_windows(self) -> None:
        """At shutdown, once the sources' channel is drained: every open window, partial ones
        marked, goes to the backends before their queues close."""
        messages = self.aggregation.flush()
        if messages:
            self.route_aggregates(messages)

    def reconfigure_aggregation(self, specs) -> None:
        """A reload's aggregate steps (after its routing is in place): unchanged steps keep
        their windows, the windows of the others are routed now."""
        messages = self.aggregation.reconfigure(specs)
        if messages:
            self.route_aggregates(messages)

    def _removed_by(self, spec, count: int) -> None:
        self.counters.inc("transform_removed_messages_total", count, transform=spec.label)

    def _removed_by_label(self, label: str, count: int) -> None:
        self.counters.inc("transform_removed_messages_total", count, transform=label)

    def _view(self, update, chunk, *args) -> None:
        """Feed the live index or a tap: what they show is not worth a message."""
        try:
            update(chunk, *args)
        except Exception as exc:
            self.counters.inc("view_errors_total")
            self._bugs.log(exc, "internal error while updating the view (%s); the messages are delivered all the same", getattr(update, "__qualname__", update))

    def statistics(self) -> dict:
        return {"chunks": self.chunks, "traces_with_jobs": len(self.trace_jobs), "index": self.index.statistics(), "aggregation": self.aggregation.statistics()}
