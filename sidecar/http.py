"""The HTTP side: health, Prometheus metrics, the unified view's JSON API and a live tap.

A small ASGI application served by hypercorn's trio worker inside the sidecar's nursery (no web
framework: a dozen routes do not need one). Read-only except `POST /api/reload`; reload and tap
can require a bearer token taken from the environment.
"""

import functools
import hmac
import logging
import os
import time
import urllib.parse

import orjson
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from sidecar.apps_metrics import AppsMetrics
from sidecar.config import display_value
from sidecar.logs import RateLimitedLog
from sidecar.sources.base import CannotListen
from sidecar.tls import server_context

log = logging.getLogger("sidecar.http")

TAP_BUFFER = 1000  # messages a slow tap client may lag behind before it loses some (counted)


class Tap:
    """One live-stream subscriber: a filter and a bounded channel."""

    def __init__(self, source: str | None, kind: str | None):
        self.source = source
        self.kind = kind
        self.send, self.receive = trio.open_memory_channel(TAP_BUFFER)
        self.dropped = 0

    def offer(self, batches: list) -> None:
        """A chunk's batches (one per source); messages are decoded for a tap only."""
        for batch in batches:
            if self.source is not None and batch.source != self.source:
                continue
            for message in batch.messages():
                if self.kind is None or message["type"] == self.kind:
                    try:
                        self.send.send_nowait(message)
                    except trio.WouldBlock:
                        self.dropped += 1


class SidecarCollector(Collector):
    """Every counter of the core, read when scraped."""

    def __init__(self, sidecar):
        self.sidecar = sidecar

    def collect(self):
        sidecar = self.sidecar
        counters = sidecar.counters
        for name, help_text in (
            ("routed_messages_total", "Messages the correlator routed to at least one rule"),
            ("unrouted_messages_total", "Messages no rule matched"),
            ("reloads_total", "Configuration reloads applied"),
            ("reload_failures_total", "Configuration reloads rejected"),
            ("view_errors_total", "Live index or tap updates that met a bug (their messages were delivered)"),
            ("http_not_found_total", "Requests to the HTTP view for paths it does not serve"),
        ):
            family = CounterMetricFamily(f"sidecar_{name.removesuffix('_total')}", help_text)
            family.add_metric([], counters.get(name))
            yield family
        # A source's counters carry its name as `input`.
        for name, labels, help_text in (
            ("messages_received_total", ("input",), "Valid messages received, by source"),
            ("transform_removed_messages_total", ("transform",), "Messages a transform step kept from going further, by step (source key[type])"),
            ("connections_total", ("input",), "Connections accepted, by source"),
            ("bytes_received_total", ("input",), "Bytes read from finished connections, by source"),
            ("decode_errors_total", ("input", "reason"), "Messages rejected by the decoder, by source and reason"),
            ("connections_refused_total", ("input", "reason"), "Connections refused, by source and reason"),
            ("connections_closed_total", ("input", "reason"), "Connections closed by the sidecar, by source and reason"),
            ("reads_waited_total", ("input", "reason"), "Reads that waited for a source's limit, by source and limit (rate_limit, inflight: max_inflight_bytes)"),
            ("rate_limited_messages_total", ("input",), "Messages dropped over a source's rate limit (when_over: drop), by source"),
            ("otlp_requests_total", ("input", "path", "code"), "OTLP/HTTP requests answered, by source, path (other: any but the three signals') and status code"),
        ):
            family = CounterMetricFamily(f"sidecar_{name.removesuffix('_total')}", help_text, labels=list(labels))
            for values, count in sorted(counters.by_labels(name, labels).items()):
                family.add_metric(list(values), count)
            yield family
        for name, label, help_text in (
            ("correlator_dropped_messages_total", "reason", "Valid messages the correlator dropped, by reason (internal_error: a bug met while enriching them)"),
            ("decoded_messages_total", "path", "Valid messages by the path that decoded them: native (the Rust hot path) or python"),
        ):
            family = CounterMetricFamily(f"sidecar_{name.removesuffix('_total')}", help_text, labels=[label])
            for value, count in sorted(counters.by_label(name, label).items()):
                family.add_metric([value], count)
            yield family
        active = GaugeMetricFamily("sidecar_connections_active", "Open connections, by source", labels=["input"])
        for name, source in sidecar.sources.items():
            active.add_metric([name], source.active_connections)
        yield active
        inflight = GaugeMetricFamily("sidecar_inflight_bytes", "Bytes read and not handed over yet (unfinished messages, chunks waiting), by source", labels=["input"])
        for name, source in sidecar.sources.items():
            budget = getattr(source, "inflight", None)
            if budget is not None:
                inflight.add_metric([name], budget.held)
        yield inflight
        supervisors = sidecar.topology.all_supervisors()
        per_backend = {
            "routed": CounterMetricFamily("sidecar_backend_routed", "Messages routed to a backend instance", labels=["backend", "type"]),
            "delivered": CounterMetricFamily("sidecar_backend_delivered", "Messages a backend instance delivered", labels=["backend", "type"]),
            "retries": CounterMetricFamily("sidecar_backend_retries", "Failed writes retried", labels=["backend", "type"]),
            "queued": GaugeMetricFamily("sidecar_backend_queued", "Messages held for a backend instance (memory and disk)", labels=["backend", "type"]),
            "circuit_open": GaugeMetricFamily("sidecar_backend_circuit_open", "1 while the circuit is open or half-open", labels=["backend", "type"]),
            "disk_bytes": GaugeMetricFamily("sidecar_backend_disk_bytes", "Bytes of a disk queue's log (its cap is queue.max_bytes)", labels=["backend", "type"]),
        }
        dropped = CounterMetricFamily("sidecar_backend_dropped", "Messages dropped, by reason", labels=["backend", "type", "reason"])
        details = CounterMetricFamily("sidecar_backend_events", "A backend type's own counts (e.g. truncated_events)", labels=["backend", "type", "name"])
        latency = HistogramMetricFamily("sidecar_delivery_latency_seconds", "From message timestamp to delivery", labels=["backend", "type"])
        for supervisor in supervisors:
            labels = [supervisor.label, supervisor.spec.type]
            per_backend["routed"].add_metric(labels, supervisor.routed)
            per_backend["delivered"].add_metric(labels, supervisor.delivered)
            per_backend["retries"].add_metric(labels, supervisor.retries)
            per_backend["queued"].add_metric(labels, supervisor.queued)
            per_backend["circuit_open"].add_metric(labels, 0 if supervisor.breaker.state == "closed" else 1)
            if supervisor.queue.log is not None:
                per_backend["disk_bytes"].add_metric(labels, supervisor.queue.log.bytes_on_disk)
            for reason, count in sorted(supervisor.dropped.items()):
                dropped.add_metric([*labels, reason], count)
            latency.add_metric(labels, supervisor.latency.cumulative(), supervisor.latency.total)
            if supervisor.backend is not None:
                for name, count in sorted(supervisor.backend.statistics().items()):
                    details.add_metric([*labels, name], count)
        yield from per_backend.values()
        yield dropped
        yield details
        yield latency
        index = sidecar.correlator.index.statistics() if sidecar.correlator else {}
        for key in ("jobs", "traces"):
            gauge = GaugeMetricFamily(f"sidecar_index_{key}", f"{key.capitalize()} in the live index")
            gauge.add_metric([], index.get(key, 0))
            yield gauge
            evicted = CounterMetricFamily(f"sidecar_index_evicted_{key}", f"{key.capitalize()} evicted from the live index")
            evicted.add_metric([], index.get(f"evicted_{key}", 0))
            yield evicted
        apps = self.sidecar.view.apps_metrics if self.sidecar.view is not None else None
        if apps is not None:
            series = GaugeMetricFamily("sidecar_apps_metrics_series", "Series held for the applications' metrics (aggregated groups and raw metrics; cap: http.apps_metrics_max_series)")
            series.add_metric([], apps.series)
            yield series
            dropped = CounterMetricFamily("sidecar_apps_metrics_dropped_series", "Updates to the applications' metrics not held: a new series past http.apps_metrics_max_series")
            dropped.add_metric([], apps.dropped)
            yield dropped
            expired = CounterMetricFamily("sidecar_apps_metrics_expired_series", "Series of the applications' metrics let go when stale (an aggregated group two windows after its latest window, a raw series after http.apps_metrics_raw_max_age)")
            expired.add_metric([], apps.expired)
            yield expired
            conflicts = GaugeMetricFamily("sidecar_apps_metrics_name_conflicts", "Samples left out of the last scrape of the applications' metrics: their sanitized name was another metric's")
            conflicts.add_metric([], apps.conflicts)
            yield conflicts


class AppsCollector(Collector):
    """The applications' metrics (sidecar.apps_metrics), read when scraped."""

    def __init__(self, apps_metrics: AppsMetrics, clock=time.time):
        self.apps_metrics = apps_metrics
        self.clock = clock  # the wall clock, whose time the windows' ends are in

    def collect(self):
        yield from self.apps_metrics.families(self.clock())


# Paths an OTLP/HTTP exporter posts to: a 404 there is a client pointed at the wrong place.
_OTLP_PATHS = ("/v1/traces", "/v1/metrics", "/v1/logs")


class ViewServer:
    def __init__(self, sidecar, settings):
        self.sidecar = sidecar
        self.settings = settings
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SidecarCollector(sidecar))
        self.apps_metrics = AppsMetrics(settings.apps_metrics_max_series, raw=settings.apps_metrics_raw, raw_max_age=settings.apps_metrics_raw_max_age)
        self.apps_registry = CollectorRegistry(auto_describe=False)
        self.apps_registry.register(AppsCollector(self.apps_metrics))
        self.taps: set[Tap] = set()
        self._not_found_log = RateLimitedLog(log, interval=60.0)
        self.address: tuple[str, int] | None = None
        self._stop = trio.Event()
        self._routes = {
            ("GET", "/healthz"): self.healthz,
            ("GET", "/readyz"): self.readyz,
            ("GET", "/metrics"): self.metrics,
            ("GET", settings.apps_metrics_path): self.apps,
            ("GET", "/api/jobs"): self.jobs,
            ("GET", "/api/routes"): self.routes,
            ("GET", "/api/backends"): self.backends,
            ("GET", "/api/statistics"): self.statistics,
            ("GET", "/api/tap"): self.tap,
            ("POST", "/api/reload"): self.reload,
            ("GET", "/"): self.page,
        }

    # ------------------------------------------------------------ serving

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        config = HypercornConfig()
        config.bind = [f"{self.settings.host}:{self.settings.port}"]
        config.accesslog = None
        config.errorlog = logging.getLogger("sidecar.http.server")
        config.graceful_timeout = 1.0
        tls = self.settings.tls
        if tls is not None:
            # hypercorn serves TLS when both files are set; the context is the sources' own
            # (hypercorn's would trust the system's CAs for client certificates too).
            config.certfile, config.keyfile = tls.cert, tls.key
            config.ssl_handshake_timeout = tls.handshake_timeout
            context = server_context(tls)
            context.set_alpn_protocols(config.alpn_protocols)
            config.create_ssl_context = lambda: context
        # Bound here, so that an address in use is one line naming the view (as for a source),
        # not hypercorn's traceback from inside its nursery; serve then listens on these.
        try:
            sockets = config.create_sockets()
        except OSError as exc:
            raise CannotListen(exc.errno, f"http view: cannot listen on {self.settings.host}:{self.settings.port}: {exc.strerror or exc}") from exc
        config.create_sockets = lambda: sockets
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(functools.partial(serve, self, config, shutdown_trigger=self._stop.wait))
            scheme, _, address = bound[0].partition("://")
            host, port = address.rsplit(":", 1)
            self.address = (host.strip("[]"), int(port))
            log.info("HTTP view on %s://%s:%d/", scheme, *self.address)
            task_status.started(self.address)

    def stop(self) -> None:
        self._stop.set()
        for tap in list(self.taps):
            tap.send.close()

    def publish(self, batches: list) -> None:
        for tap in self.taps:
            tap.offer(batches)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        path = scope["path"]
        query = dict(urllib.parse.parse_qsl(scope.get("query_string", b"").decode()))
        handler = self._routes.get((scope["method"], path))
        argument = None
        if handler is None:
            for prefix, method in (("/api/jobs/", self.job), ("/api/traces/", self.trace)):
                if path.startswith(prefix) and scope["method"] == "GET":
                    handler, argument = method, urllib.parse.unquote(path[len(prefix) :])
        if handler is None:
            allowed = [m for (m, p) in self._routes if p == path]
            if allowed:
                await _respond(send, 405, {"error": f"use {', '.join(allowed)}"})
            else:
                self._not_found(scope["method"], path)
                await _respond(send, 404, {"error": f"no such resource: {path}"})
            return
        if handler in (self.reload, self.tap) and not self._authorised(scope):
            await _respond(send, 401, {"error": "a bearer token is required"}, headers=[(b"www-authenticate", b"Bearer")])
            return
        if argument is not None:
            await handler(send, argument)
        elif handler == self.tap:
            await handler(send, receive, query)
        else:
            await handler(send, query)

    def _authorised(self, scope) -> bool:
        token = os.environ.get(self.settings.token_env) if self.settings.token_env else None
        if not token:
            return True
        given = dict(scope["headers"]).get(b"authorization", b"").decode()
        return hmac.compare_digest(given, f"Bearer {token}")

    # ------------------------------------------------------------ routes

    def _not_found(self, method: str, path: str) -> None:
        self.sidecar.counters.inc("http_not_found_total")
        if path in _OTLP_PATHS:
            self._not_found_log.warning("otlp", "HTTP view: %s %s is an OTLP/HTTP export: point the exporter at a source of `type: otlp` (127.0.0.1:4318 by default; docs/configuration.md), not at the HTTP view", method, path)
        else:
            self._not_found_log.warning("other", "HTTP view: %s %s: no such resource (counted in http_not_found_total)", method, path)

    async def healthz(self, send, query):
        await _respond(send, 200, {"status": "alive"})

    async def readyz(self, send, query):
        ready = self.sidecar.ready
        await _respond(send, 200 if ready else 503, {"ready": ready, "sources": {name: s.address for name, s in self.sidecar.sources.items()}})

    async def metrics(self, send, query):
        await _respond_bytes(send, 200, generate_latest(self.registry), b"text/plain; version=0.0.4; charset=utf-8")

    async def apps(self, send, query):
        await _respond_bytes(send, 200, generate_latest(self.apps_registry), b"text/plain; version=0.0.4; charset=utf-8")

    async def jobs(self, send, query):
        await _respond(send, 200, {"jobs": self.sidecar.correlator.index.recent_jobs(query.get("since"))})

    async def job(self, send, job_id):
        view = await self.sidecar.job_view(job_id)
        await _respond(send, 200, view) if view else await _respond(send, 404, {"error": f"no job {job_id!r} in the live index"})

    async def trace(self, send, trace_id):
        view = await self.sidecar.trace_view(trace_id)
        await _respond(send, 200, view) if view else await _respond(send, 404, {"error": f"no trace {trace_id!r} in the live index"})

    async def routes(self, send, query):
        table = self.sidecar.correlator.routing.table
        rules = [
            {
                "source": rule.source,
                "backend": rule.spec.label,
                "type": rule.spec.type,
                "enabled": rule.enabled,
                "priority": rule.priority,
                "filter": rule.filter.describe(),
                "overrides": {k: display_value(v) for k, v in rule.spec.overrides},
                "file": rule.where.file,
                "line": rule.where.line,
            }
            for rule in table.rules
        ]
        await _respond(send, 200, {"files": list(self.sidecar.config.files), "rules": rules, "last_reload_error": self.sidecar.last_reload_error})

    async def backends(self, send, query):
        topology = self.sidecar.topology
        await _respond(send, 200, {"backends": [s.statistics() for s in topology.all_supervisors()], "orphaned_buffers": list(topology.orphaned_buffers.values())})

    async def statistics(self, send, query):
        await _respond(send, 200, self.sidecar.statistics())

    async def reload(self, send, query):
        applied = await self.sidecar.reload("HTTP request")
        await _respond(send, 200 if applied else 422, {"applied": applied, "error": self.sidecar.last_reload_error})

    async def tap(self, send, receive, query):
        tap = Tap(query.get("source"), query.get("type"))
        self.taps.add(tap)
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-store")]})
        await send({"type": "http.response.body", "body": b": tap open\n\n", "more_body": True})
        try:
            async with trio.open_nursery() as nursery:

                async def until_disconnect():
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    nursery.cancel_scope.cancel()

                nursery.start_soon(until_disconnect)
                async for message in tap.receive:
                    await send({"type": "http.response.body", "body": b"data: " + orjson.dumps(message) + b"\n\n", "more_body": True})
                nursery.cancel_scope.cancel()
        finally:
            self.taps.discard(tap)
        with trio.move_on_after(1) as cleanup:
            cleanup.shield = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def page(self, send, query):
        from importlib.resources import files

        try:
            body = files("sidecar").joinpath("web/index.html").read_bytes()
        except FileNotFoundError:
            await _respond(send, 404, {"error": "the web page is not part of this build"})
            return
        await _respond_bytes(send, 200, body, b"text/html; charset=utf-8")


async def _respond(send, status: int, payload, headers=()) -> None:
    await _respond_bytes(send, status, orjson.dumps(payload, option=orjson.OPT_INDENT_2), b"application/json", headers)


async def _respond_bytes(send, status: int, body: bytes, content_type: bytes, headers=()) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})
