"""The job and trace view from what a backend stored: when a configured backend can read its
messages back (its class's `read_messages`, e.g. PostgreSQL's), a job or trace is answered from
there, whichever sidecar wrote them and also when they have left the live index; else, or when
the read fails, from the live index (`database_error` then says why)."""

import functools
import logging
from collections.abc import Callable, Iterable

import trio

from sidecar.backends import backend_class
from sidecar.jobs import PAGE_SIZE, LiveIndex

log = logging.getLogger("sidecar")


def stored_reader(specs: Iterable) -> tuple[object, Callable] | None:
    """The first of `specs` (running backend instances, `BackendSpec`s) whose type can read its
    messages back, with that read; None when none can."""
    for spec in specs:
        cls = backend_class(spec.type)  # None: the type is not available in this build
        read = cls.read_messages if cls is not None else None
        if read is not None:
            return spec, read
    return None


async def view(kind: str, key: str, index: LiveIndex, specs: Iterable, page: int = 1, limit: int = PAGE_SIZE) -> dict | None:
    """Page `page` of the view of job or trace (`kind`) `key`, marked with its `origin`:
    "database (LABEL)" when read back through the backend instance LABEL, "live" from the live
    `index` (whose caps of spans per job and trace the one read back keeps too)."""
    live = index.job(key, page, limit) if kind == "job" else index.trace(key, page, limit)
    if live is not None:
        live["origin"] = "live"
    found = stored_reader(specs)
    if found is None:
        return live
    spec, read = found
    try:
        messages = await trio.to_thread.run_sync(functools.partial(read, spec.settings, **{f"{kind}_id": key}))
    except Exception as exc:
        log.warning("%s %s: database not available for the view (%s); answering from the live index", kind, key, exc)
        if live is not None:
            live["database_error"] = str(exc)
        return live
    if not messages:
        return live
    caps = index.caps
    stored = LiveIndex(1, 1, float("inf"), trio.current_time, max_spans_per_job=caps["jobs"].max_spans, max_spans_per_trace=caps["traces"].max_spans)
    stored.add(messages)
    view = stored.job(key, page, limit) if kind == "job" else stored.trace(key, page, limit)
    view["origin"] = f"database ({spec.label})"
    return view
