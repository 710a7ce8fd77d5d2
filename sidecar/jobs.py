"""The live index of recent jobs and traces: what the unified view shows.

Fed by the correlator one chunk at a time; bounded by count and by age, and each job and trace
by its number of spans, evictions counted. Timestamps are the canonical RFC 3339 strings the
sidecar writes, so they order as strings and are parsed only when a view is built, never on the
hot path. A view is answered in pages, so that no job, however large, makes one huge response.
"""

import datetime as dt
import math
import operator
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import attrs

from sidecar.constants import ERROR_LEVELS, KEY_EVENTS_PER_SOURCE
from sidecar.message import format_timestamp, job_id_of, parse_timestamp

_timestamp_of = operator.itemgetter("timestamp")
_event_time = operator.itemgetter(0)  # of an (timestamp, level, message) event
FAILED_STATUSES = frozenset({"error", "failed", "failure", "aborted", "cancelled"})
DONE_STATUSES = frozenset({"completed", "complete", "done", "success", "succeeded", "finished"})
MAX_SPANS = 10_000  # spans (and links) one job or trace holds by default: index.max_spans_per_job
PAGE_SIZE = 1000  # spans and sources in one page of a view by default: http.max_page_items
# Levels of children a page nests (deeper spans are listed at its top level with their parent's
# id): JSON encoders stop at a depth (orjson at 255), and a chain of spans can be any length.
MAX_NESTING = 64


def seconds_between(first: str, last: str) -> float:
    return (parse_timestamp(last) - parse_timestamp(first)).total_seconds()


def span_start(end: str, duration_ms: float) -> str | None:
    """When a span began that is known only by its end and duration; None when that is no
    time at all (before the year 1: a duration sent in the wrong unit, or a zero-time end)."""
    try:
        return format_timestamp(parse_timestamp(end) - dt.timedelta(milliseconds=duration_ms))
    except (OverflowError, ValueError):
        return None


@attrs.define
class SourceActivity:
    """What one source did within a job or trace."""

    source: str
    first: str
    last: str
    messages: int = 0
    errors: int = 0
    events: list = attrs.field(factory=list)  # (timestamp, level, message), the latest few
    metrics: dict = attrs.field(factory=dict)  # name -> (value, unit), the latest
    progress: dict | None = None

    @classmethod
    def of_cell(cls, source: str, cell: list[dict]) -> tuple["SourceActivity", list[dict]]:
        """The summary of one cell's messages (see `cells_of`), and the span messages among them."""
        piece = cls(source, cell[0]["timestamp"], cell[0]["timestamp"])
        return piece, piece.add_group(cell)

    def add_group(self, group: list[dict]) -> list[dict]:
        """Messages of this source, in arrival order: one pass per kind of message. Returns the
        span messages among them."""
        timestamps = list(map(_timestamp_of, group))
        first, last = min(timestamps), max(timestamps)
        if first < self.first:
            self.first = first
        if last > self.last:
            self.last = last
        self.messages += len(group)
        events = [m for m in group if m["type"] == "event"]
        spans = []
        if events:
            levels = [m["data"]["level"] for m in events]
            self.errors += sum(map(ERROR_LEVELS.__contains__, levels))
            self.events.extend((m["timestamp"], m["data"]["level"], m["data"]["message"]) for m in events[-KEY_EVENTS_PER_SOURCE:])
            del self.events[:-KEY_EVENTS_PER_SOURCE]
        if len(events) < len(group):
            for m in group:
                kind = m["type"]
                if kind == "span":
                    spans.append(m)
                elif kind == "metric":
                    data = m["data"]
                    self.metrics[data["name"]] = (data["value"], data.get("unit"))
                elif kind == "progress" and (self.progress is None or m["timestamp"] >= self.progress["at"]):
                    data = m["data"]  # the latest by time, as `merge` keeps it across chunks
                    self.progress = {"percent": data["percent"], "status": data["status"], "at": m["timestamp"]}
        return spans

    def merge(self, later: "SourceActivity") -> None:
        """Fold in the activity of messages that arrived after this one's."""
        if later.first < self.first:
            self.first = later.first
        if later.last > self.last:
            self.last = later.last
        self.messages += later.messages
        self.errors += later.errors
        if later.events:
            # By time: a chunk's cells (one per trace) are merged one after another.
            self.events.extend(later.events)
            self.events.sort(key=_event_time)
            del self.events[:-KEY_EVENTS_PER_SOURCE]
        self.metrics.update(later.metrics)
        if later.progress is not None and (self.progress is None or later.progress["at"] >= self.progress["at"]):
            self.progress = later.progress


@attrs.define
class SpanRecord:
    span_id: str
    name: str
    source: str
    trace_id: str | None
    parent_span_id: str | None = None
    start: str | None = None
    end: str | None = None
    duration_ms: float | None = None
    status: str | None = None


@attrs.define
class SpanCap:
    """The most spans (and links) each job, or each trace, of an index holds, and what was let
    go for them all: the oldest span gives way to a new one; a link past the cap is not kept."""

    max_spans: int = MAX_SPANS
    evicted_spans: int = 0
    dropped_links: int = 0


def _span_order(span: SpanRecord) -> str:
    return span.start or ""


@attrs.define
class Activity:
    """A job or a trace: its sources' activity and its spans."""

    key: str
    first: str
    last: str
    sources: dict = attrs.field(factory=dict)  # source -> SourceActivity
    spans: OrderedDict = attrs.field(factory=OrderedDict)  # span_id -> SpanRecord, oldest first
    links: set = attrs.field(factory=set)  # trace ids of a job, job ids of a trace
    updated: float = 0.0  # monotonic time of the last message, for eviction by age
    # Of a trace: its messages that named no job, for each job the trace is linked to later
    # (a root span's start, sent before its job's first set_context, is one).
    unlinked: "Activity | None" = None
    cap: SpanCap = attrs.field(factory=SpanCap)  # shared by the index's jobs, or its traces
    evicted_spans: int = 0  # of this one
    # Kept as spans change, so that a status costs nothing however many spans there are.
    open_spans: int = 0
    failed_spans: int = 0

    def add_cell(self, piece: SourceActivity, spans: list[dict], link) -> None:
        """One source's messages of one chunk, summarised in `piece`; `link` is the trace of a
        job's cell or the job of a trace's (None when the messages had none)."""
        activity = self.sources.get(piece.source)
        if activity is None:
            activity = self.sources[piece.source] = SourceActivity(piece.source, piece.first, piece.last)
        activity.merge(piece)
        if activity.first < self.first:
            self.first = activity.first
        if activity.last > self.last:
            self.last = activity.last
        if link is not None and link not in self.links:
            if len(self.links) < self.cap.max_spans:
                self.links.add(link)
            else:
                self.cap.dropped_links += 1
        for message in spans:
            self._add_span(message)

    def absorb(self, other: "Activity") -> None:
        """Fold in another activity's messages: a trace's that named no job, when the trace is
        linked to this job."""
        for piece in other.sources.values():
            self.add_cell(piece, [], None)
        for record in other.spans.values():
            span = self.spans.get(record.span_id)
            if span is None:
                self._insert(attrs.evolve(record))
                continue
            self._count(span, -1)
            if record.start is not None and (span.start is None or record.end is None):
                span.start = record.start  # sent, where this one's may be worked out from its end
            if span.end is None and record.end is not None:
                span.end, span.duration_ms, span.status = record.end, record.duration_ms, record.status
            span.parent_span_id = span.parent_span_id or record.parent_span_id
            self._count(span, 1)

    def _insert(self, span: SpanRecord) -> None:
        """A span new to this activity; at the cap, the oldest one gives way (counted)."""
        spans = self.spans
        if len(spans) >= self.cap.max_spans:
            _, oldest = spans.popitem(last=False)
            self._count(oldest, -1)
            self.evicted_spans += 1
            self.cap.evicted_spans += 1
        spans[span.span_id] = span
        self._count(span, 1)

    def _count(self, span: SpanRecord, sign: int) -> None:
        self.open_spans += sign * (span.end is None)
        self.failed_spans += sign * (span.status in FAILED_STATUSES)

    def _add_span(self, message: dict) -> None:
        data = message["data"]
        span = self.spans.get(message["span_id"])
        if span is None:
            span = SpanRecord(message["span_id"], data["name"], message["source"], message.get("trace_id"))
            self._insert(span)
        self._count(span, -1)
        if message.get("parent_span_id"):
            span.parent_span_id = message["parent_span_id"]
        if data["phase"] == "start":
            span.start = message["timestamp"]
        else:
            span.end = message["timestamp"]
            span.duration_ms = data["duration_ms"]
            span.status = data["status"]
            if span.start is None:
                span.start = span_start(span.end, span.duration_ms)
        self._count(span, 1)

    def status(self) -> str:
        if any(a.errors for a in self.sources.values()):
            return "failed"
        if self.failed_spans:
            return "failed"
        progresses = [a.progress for a in self.sources.values() if a.progress]
        if any(p["status"] in FAILED_STATUSES for p in progresses):
            return "failed"
        latest = max(progresses, key=lambda p: p["at"], default=None)
        if latest and (latest["percent"] >= 100 or latest["status"] in DONE_STATUSES) and not self.open_spans:
            return "completed"
        if not progresses and self.spans and not self.open_spans:
            return "completed"
        return "running"

    def walk(self) -> list[tuple[SpanRecord, int]]:
        """Every span once with its depth, depth first and children by start: the order the view
        pages the span tree in. Spans whose parents form a cycle (no root leads to them) are
        walked last, each not yet reached as a root."""
        spans = self.spans
        ordered = sorted(spans.values(), key=_span_order)
        children: dict[str, list] = {}
        roots = []
        for span in ordered:
            parent = span.parent_span_id
            if parent is not None and parent != span.span_id and parent in spans:
                children.setdefault(parent, []).append(span)
            else:
                roots.append(span)
        order: list[tuple[SpanRecord, int]] = []
        reached: set[str] = set()
        for starts in (roots, ordered):
            for root in starts:
                if root.span_id in reached:
                    continue
                stack = [(root, 0)]
                while stack:
                    span, depth = stack.pop()
                    if span.span_id in reached:
                        continue
                    reached.add(span.span_id)
                    order.append((span, depth))
                    stack.extend((child, depth + 1) for child in reversed(children.get(span.span_id, ())))
            if len(order) == len(spans):
                break
        return order

    def view(self, kind: str, page: int = 1, limit: int = PAGE_SIZE) -> dict:
        """The timeline as JSON, one page of it: per source and the span tree, ordered by time.
        Page `page` (from 1) holds the `limit` sources of that page, by their first message, and
        the `limit` spans of that page of the tree walked depth first (`walk`): a span is nested
        under its parent when both are on the page, and else listed at the page's top level with
        its `parent_span_id`. `page` says how many there are of each."""
        first = (page - 1) * limit
        sources = sorted(self.sources.values(), key=lambda a: a.first)
        walked = self.walk()
        longest: dict[str, float] = {}
        for span in self.spans.values():
            if span.duration_ms is not None and span.duration_ms / 1000 > longest.get(span.source, 0.0):
                longest[span.source] = span.duration_ms / 1000
        links = "trace_ids" if kind == "job_id" else "job_ids"
        return {
            kind: self.key,
            "status": self.status(),
            "start": self.first,
            "end": self.last,
            "duration_s": round(seconds_between(self.first, self.last), 3),
            links: sorted(self.links)[:limit],
            "sources": [
                {
                    "source": a.source,
                    "first": a.first,
                    "last": a.last,
                    "duration_s": round(max(seconds_between(a.first, a.last), longest.get(a.source, 0.0)), 3),
                    "messages": a.messages,
                    "errors": a.errors,
                    "events": [{"timestamp": t, "level": level, "message": text} for t, level, text in a.events],
                    "metrics": {name: {"value": value, "unit": unit} for name, (value, unit) in a.metrics.items()},
                    "progress": a.progress,
                    "summary": summarise(a),
                }
                for a in sources[first : first + limit]
            ],
            "spans": _nest(walked[first : first + limit]),
            "page": {
                "number": page,
                "limit": limit,
                "pages": max(1, math.ceil(max(len(walked), len(sources)) / limit)),
                "spans": len(walked),
                "sources": len(sources),
                links: len(self.links),
                "evicted_spans": self.evicted_spans,
            },
        }


def _nest(walked: list[tuple[SpanRecord, int]]) -> list[dict]:
    """A run of `Activity.walk` as a tree: each span under the last one before it a level up,
    when that is on this run too and within MAX_NESTING levels; otherwise at the top."""
    top: list[dict] = []
    placed: list[tuple[int, int, dict]] = []  # (depth, level shown, node) from the top down
    for span, depth in walked:
        node = {**attrs.asdict(span, recurse=False), "children": []}
        while placed and placed[-1][0] >= depth:
            placed.pop()
        if placed and placed[-1][0] == depth - 1 and placed[-1][1] + 1 < MAX_NESTING:
            level = placed[-1][1] + 1
            placed[-1][2]["children"].append(node)
        else:
            level = 0
            placed.clear()
            top.append(node)
        placed.append((depth, level, node))
    return top


def summarise(activity: SourceActivity) -> str:
    """One line for a source: its distinct event messages, then its metrics."""
    seen = []
    for _t, _level, text in activity.events:
        if text not in seen:
            seen.append(text)
    parts = seen[-4:]
    for name, (value, unit) in activity.metrics.items():
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        shown = f"{value:,}" if isinstance(value, int) else f"{value:g}"
        parts.append(f"{name} {shown}{' ' + unit if unit else ''}")
    if activity.progress and not parts:
        parts.append(f"{activity.progress['percent']:g}% {activity.progress['status']}")
    return ", ".join(parts) if parts else f"{activity.messages} messages"


class CellSummary(NamedTuple):
    """What one (job, trace, source) cell of a chunk did, as the live index takes it: the same
    from either ingest path (sidecar.ingest)."""

    job_id: str | None
    trace_id: str | None
    activity: SourceActivity
    spans: list[dict]  # the cell's span messages, in order


def cells_of(messages: list[dict]) -> dict[tuple, list[dict]]:
    """A chunk's messages grouped by (job_id, trace_id, source), in order, leaving out those with
    neither a job nor a trace. (The Python ingest path builds the same groups inside its own loop.)"""
    cells: dict[tuple, list[dict]] = {}
    for message in messages:
        job_id = job_id_of(message)
        trace_id = message.get("trace_id")
        if job_id is None and trace_id is None:
            continue
        key = (job_id, trace_id, message["source"])
        cell = cells.get(key)
        if cell is None:
            cell = cells[key] = []
        cell.append(message)
    return cells


def summaries_of(cells: dict[tuple, list[dict]]) -> Iterator[CellSummary]:
    """The summary of each cell grouped by `cells_of`, made as it is read."""
    for (job_id, trace_id, source), cell in cells.items():
        activity, spans = SourceActivity.of_cell(source, cell)
        yield CellSummary(job_id, trace_id, activity, spans)


class LiveIndex:
    """Recent jobs (by context.job_id, or a progress message's job_id) and traces (by trace_id)."""

    def __init__(self, max_jobs: int, max_traces: int, max_age: float, clock, *, max_spans_per_job: int = MAX_SPANS, max_spans_per_trace: int = MAX_SPANS):
        self.max_jobs = max_jobs
        self.max_traces = max_traces
        self.max_age = max_age
        self.clock = clock
        self.jobs: dict[str, Activity] = {}
        self.traces: dict[str, Activity] = {}
        self.evicted = {"jobs": 0, "traces": 0}
        self.caps = {"jobs": SpanCap(max_spans_per_job), "traces": SpanCap(max_spans_per_trace)}
        # A trace's job-less part copies some of its spans: what it lets go, the trace counts.
        self._unlinked_cap = SpanCap(max_spans_per_trace)

    def add(self, messages: list[dict]) -> None:
        """Index a chunk of messages."""
        self.add_summaries(summaries_of(cells_of(messages)))

    def add_summaries(self, summaries: Iterable[CellSummary]) -> None:
        """Index a chunk summarised per cell (`Enriched.cells` of either ingest path): each
        cell once, for its job and its trace both."""
        now = self.clock()
        for summary in summaries:
            self.add_piece(summary.job_id, summary.trace_id, summary.activity, summary.spans, now)

    def add_piece(self, job_id: str | None, trace_id: str | None, piece: SourceActivity, spans: list[dict], now: float) -> None:
        """One cell's summary (`SourceActivity.of_cell`), to its job and to its trace. A job's
        view holds every message of the traces linked to it: those of a trace that named no job
        are folded into each job the trace is linked to, before the link or after."""
        if job_id is not None:
            job = self._record(self.jobs, job_id, piece, spans, trace_id, now, self.max_jobs, "jobs")
            trace = self.traces.get(trace_id) if trace_id is not None else None
            if trace is not None and trace.unlinked is not None and job_id not in trace.links:
                job.absorb(trace.unlinked)
        if trace_id is not None:
            trace = self._record(self.traces, trace_id, piece, spans, job_id, now, self.max_traces, "traces")
            if job_id is None:
                if trace.unlinked is None:
                    trace.unlinked = Activity(trace_id, piece.first, piece.last, cap=self._unlinked_cap)
                trace.unlinked.add_cell(piece, spans, None)
                for linked in trace.links:
                    job = self.jobs.get(linked)
                    if job is not None:
                        job.add_cell(piece, spans, trace_id)

    def _record(self, table: dict, key: str, piece: SourceActivity, spans: list[dict], link, now: float, limit: int, kind: str) -> Activity:
        activity = table.pop(key, None)  # re-inserted last: least recently updated first
        if activity is None:
            activity = Activity(key, piece.first, piece.last, cap=self.caps[kind])
            if len(table) >= limit:
                del table[next(iter(table))]
                self.evicted[kind] += 1
        table[key] = activity
        activity.updated = now
        activity.add_cell(piece, spans, link)
        return activity

    def expire(self) -> None:
        """Drop what has not been updated for max_age; called now and then, not per message."""
        horizon = self.clock() - self.max_age
        for kind, table in (("jobs", self.jobs), ("traces", self.traces)):
            while table:
                key = next(iter(table))
                if table[key].updated >= horizon:
                    break
                del table[key]
                self.evicted[kind] += 1

    def job(self, job_id: str, page: int = 1, limit: int = PAGE_SIZE) -> dict | None:
        activity = self.jobs.get(job_id)
        return activity.view("job_id", page, limit) if activity else None

    def trace(self, trace_id: str, page: int = 1, limit: int = PAGE_SIZE) -> dict | None:
        activity = self.traces.get(trace_id)
        return activity.view("trace_id", page, limit) if activity else None

    def jobs_page(self, since: str | None = None, page: int = 1, limit: int = PAGE_SIZE) -> dict:
        """Page `page` (from 1) of the jobs updated last at or after `since`, the most recently
        updated first, `limit` to a page; each summarised only when it is on the page."""
        matching = [a for a in reversed(self.jobs.values()) if not since or a.last >= since]
        first = (page - 1) * limit
        found = [
            {
                "job_id": activity.key,
                "status": activity.status(),
                "start": activity.first,
                "end": activity.last,
                "duration_s": round(seconds_between(activity.first, activity.last), 3),
                "sources": [a.source for a in sorted(activity.sources.values(), key=lambda a: a.first)],
            }
            for activity in matching[first : first + limit]
        ]
        return {"jobs": found, "page": {"number": page, "limit": limit, "pages": max(1, math.ceil(len(matching) / limit)), "jobs": len(matching)}}

    def recent_jobs(self, since: str | None = None) -> list[dict]:
        """Every job of `jobs_page`, on one page."""
        return self.jobs_page(since, 1, max(1, len(self.jobs)))["jobs"]

    def statistics(self) -> dict:
        jobs, traces = self.caps["jobs"], self.caps["traces"]
        return {
            "jobs": len(self.jobs),
            "traces": len(self.traces),
            "evicted_jobs": self.evicted["jobs"],
            "evicted_traces": self.evicted["traces"],
            "evicted_spans_of_jobs": jobs.evicted_spans,
            "evicted_spans_of_traces": traces.evicted_spans,
            "dropped_links": jobs.dropped_links + traces.dropped_links,
        }


def render_tree(view: dict) -> str:
    """The seed's unified view as text:

    job-12345:
      ├─ file-receiver: File received, validated, queued (2.3s)
      └─ db-loader: Data loaded, 10,000 rows inserted (45.2s)

      Total: 47.6s
    """
    key = view.get("job_id") or view.get("trace_id")
    lines = [f"{key}:"]
    sources = view["sources"]
    for index, source in enumerate(sources):
        branch = "└─" if index == len(sources) - 1 else "├─"
        lines.append(f"  {branch} {source['source']}: {source['summary']} ({source['duration_s']:.1f}s)")
    lines.append("")
    lines.append(f"  Total: {view['duration_s']:.1f}s")
    return "\n".join(lines)
