"""The sidecar's whole path for one connection's bytes, without sockets: decode, enrich, index,
route into each backend instance's queue, and render every view; with the properties that must
hold whatever the bytes are. Shared by the hypothesis tests (`test_whole_path.py`) and the
coverage-guided fuzzer (`tests/fuzz/whole_path.py`, `make fuzz`).
"""

import textwrap
from pathlib import Path

import attrs
import orjson
import trio

from sidecar.config import load_config
from sidecar.correlator import Correlator, Routing
from sidecar.delivery import BackendSupervisor
from sidecar.jobs import LiveIndex, render_tree
from sidecar.message import DEFAULT_MAX_DEPTH
from sidecar.metrics import Counters
from sidecar.protocol import ProtocolViolation, StreamDecoder
from sidecar.routing import RouteTable

RECEIVED = "2026-12-02T08:00:00.000Z"

# Every source to `everything`; spans and metrics also to `some`, with a filter in between.
CONFIG = """
backends:
  everything: {type: filesystem, base_path: /nonexistent/everything}
  some: {type: filesystem, base_path: /nonexistent/some}
routing:
  all:
    - backend: everything
    - backend: some
      filter: {types: [span, metric, event], levels: [error, critical], names: ["rows*"]}
"""


@attrs.frozen
class Outcome:
    lines: dict  # backend label -> the JSON lines its queue holds, in order
    accepted: int
    errors: tuple  # (reason, detail) of each decode error
    violation: str | None  # the reason the stream's framing was lost, if it was
    views: tuple  # every job and trace view, rendered
    counters: dict


def routing_for(workdir: Path) -> Routing:
    path = workdir / "whole-path.yaml"
    path.write_text(textwrap.dedent(CONFIG))
    config = load_config(path, None)
    table = RouteTable(config.rules)
    return table, {spec: BackendSupervisor(spec) for spec in table.specs}


class WholePath:
    """One decode path (`native` or not) with its own correlator state; `run()` is one
    connection's bytes in the given chunks."""

    def __init__(self, workdir: Path, *, native: bool, max_depth: int = DEFAULT_MAX_DEPTH):
        self.native = native
        self.max_depth = max_depth
        self.workdir = workdir

    def run(self, chunks: list[bytes]) -> Outcome:
        return trio.run(self._run, chunks)

    async def _run(self, chunks: list[bytes]) -> Outcome:
        table, supervisors = routing_for(self.workdir)
        counters = Counters()
        index = LiveIndex(50, 50, 3600, clock=lambda: 0.0)
        correlator = Correlator(Routing(table, supervisors), counters, index, trace_cache_size=8, host="fuzz-host")
        decoder = StreamDecoder(native=self.native, max_depth=self.max_depth)
        errors = []
        accepted = 0
        violation = None
        try:
            for chunk in [*chunks, None]:
                messages, found = decoder.receive_data(chunk) if chunk is not None else decoder.receive_eof()
                errors += found
                if messages:
                    accepted += len(messages)
                    await correlator.process(RECEIVED, messages)
        except ProtocolViolation as exc:
            violation = exc.reason
            errors += exc.errors
            if exc.messages:
                accepted += len(exc.messages)
                await correlator.process(RECEIVED, exc.messages)
        lines = {}
        for spec, supervisor in supervisors.items():
            taken = []
            while supervisor.queue.depth:
                for batch in await supervisor.queue.get(1 << 30):
                    taken += batch.lines
            lines[spec.label] = taken
        views = []
        for key in list(index.jobs):
            views.append(render_tree(index.job(key)))
        for key in list(index.traces):
            views.append(render_tree(index.trace(key)))
        views.append(orjson.dumps(index.recent_jobs()).decode())
        return Outcome(lines, accepted, tuple((e.reason, e.detail) for e in errors), violation, tuple(views), dict((f"{n}{sorted(l.items())}", v) for n, l, v in counters.items()))


def depth_of(value) -> int:
    """Levels of nesting of a decoded JSON value (a scalar is 0), without recursion."""
    deepest = 0
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            pending.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def check_outcome(outcome: Outcome, max_depth: int = DEFAULT_MAX_DEPTH) -> None:
    """What must hold whatever the bytes were."""
    assert not any(reason == "internal_error" for reason, _ in outcome.errors), outcome.errors
    assert not any("internal_error" in key for key in outcome.counters), outcome.counters
    assert outcome.counters.get("view_errors_total[]", 0) == 0
    everything = outcome.lines["everything"]
    assert len(everything) == outcome.accepted
    for label, lines in outcome.lines.items():
        for line in lines:
            message = orjson.loads(line)  # every line is JSON
            assert depth_of(message) <= max_depth, (label, line[:200])
            assert message["received_at"] == RECEIVED and message["host"] == "fuzz-host"
            assert len(message["timestamp"]) == 24 and message["timestamp"].endswith("Z")
    some = outcome.lines["some"]
    assert len(some) <= len(everything)
