"""The HTTP side: health, Prometheus metrics, the unified view's JSON API and a live tap.

A small ASGI application served by hypercorn's trio worker inside the sidecar's nursery (no web
framework: a dozen routes do not need one). Safe by default (docs/http-api.md): a request whose
Host does not name this view (DNS rebinding) or that comes from another origin is refused; every
/api route needs the bearer token when there is one, from the environment or made in
`storage.data_dir` when the view listens beyond loopback; the one route that changes anything,
`POST /api/reload`, takes only JSON. `/healthz`, `/readyz` and the metrics stay open for probes
and Prometheus. Jobs and traces are answered in pages and the tap's subscribers are bounded, each
with a buffer of its own, so that no client makes a huge answer or slows ingestion.
"""

import collections
import functools
import hmac
import ipaddress
import logging
import os
import re
import secrets
import stat
import time
import urllib.parse
from pathlib import Path

import orjson
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from sidecar.apps_metrics import AppsMetrics
from sidecar.config import display_value
from sidecar.constants import MESSAGE_TYPES
from sidecar.logs import RateLimitedLog
from sidecar.sources.base import CannotListen
from sidecar.tls import server_context

log = logging.getLogger("sidecar.http")

TOKEN_FILE = ".http-token"  # in storage.data_dir; backends' logs there are directories
_TOKEN_TEXT = re.compile(r"[!-~]{16,512}")  # printable ASCII without spaces


# ---------------------------------------------------------------- the token


def is_loopback(host: str) -> bool:
    """Whether a view listening on `host` is reachable from this machine only: `localhost` or a
    loopback address; not `0.0.0.0`, `::`, "" (every interface) or another name."""
    name = host.strip("[]").lower().rstrip(".")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class TokenFileError(Exception):
    """The generated token's file cannot be read or made; the message names it and says why."""


def view_token(settings, data_dir: Path, environ) -> tuple[str | None, str]:
    """The bearer token every /api route of the view needs, and where it comes from (to name it,
    never to show it): the value of `http.token_env` when set; else, for a view that listens
    beyond loopback, the one made in `data_dir` (`stored_token`); else none."""
    if settings.token_env and environ.get(settings.token_env):
        return environ[settings.token_env], f"${settings.token_env}"
    if is_loopback(settings.host):
        return None, "none: the view listens on loopback only"
    path = Path(data_dir) / TOKEN_FILE
    return stored_token(path), f"made for this view in {path} (`monitoring-sidecar token` prints it)"


def stored_token(path: Path) -> str:
    """The token in the file `path`, made first when there is none: random, mode 0600, created
    whole in one step (written to a temporary file beside it, then linked to its name: no reader
    sees part of one, and of two starts at the same time only one makes it), reused ever after."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return _read_token(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise TokenFileError(f"cannot read the HTTP view's token file {path}: {exc.strerror or exc}") from exc
    token = secrets.token_urlsafe(32)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(descriptor, token.encode() + b"\n")
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        try:
            os.link(temporary, path)
        except FileExistsError:
            return _read_token(path)  # another start made it first: the token is that one
    except OSError as exc:
        raise TokenFileError(f"cannot make the HTTP view's token file {path}: {exc.strerror or exc}") from exc
    finally:
        temporary.unlink(missing_ok=True)
    return token


def _read_token(path: Path) -> str:
    descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise TokenFileError(f"the HTTP view's token file {path} is not a regular file")
        if status.st_mode & 0o077:
            os.fchmod(descriptor, 0o600)
            log.warning("HTTP view: the token file %s could be read by others (mode %o): it is 0600 now", path, stat.S_IMODE(status.st_mode))
        text = os.read(descriptor, 1024)
    finally:
        os.close(descriptor)
    token = text.decode("ascii", "replace").strip()
    if not _TOKEN_TEXT.fullmatch(token):
        raise TokenFileError(f"the HTTP view's token file {path} holds no token (16 to 512 printable ASCII characters): remove it, and the next start makes a new one")
    return token


# ---------------------------------------------------------------- who may ask


def _headers(scope, name: bytes) -> list[bytes]:
    return [value for key, value in scope["headers"] if key == name]


def _host_name(authority: str) -> str:
    """The host of a Host header (`name`, `name:port`, `[v6]:port`), lower case, no final dot."""
    if authority.startswith("["):
        name = authority[1 : authority.find("]")] if "]" in authority else authority
    else:
        name = authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority
    return name.lower().rstrip(".")


def _address(text: str):
    try:
        return ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return None


def _origin(scheme: str, authority: str) -> str:
    """An origin as browsers write it: the default port left out."""
    authority = authority.lower()
    default = {"http": ":80", "https": ":443"}.get(scheme)
    if default and authority.endswith(default):
        authority = authority.removesuffix(default)
    return f"{scheme}://{authority}"


class RequestGuard:
    """Whether a request may be answered, from its ASGI scope alone (pure: tested by property).

    - Host must name this view: `localhost`, a loopback address, the address the view was told
      to listen on, the address the request arrived at, or a name in `http.allowed_hosts`. A page
      of another site whose name was made to resolve to this machine (DNS rebinding) sends its
      own name, and is refused.
    - Origin, when sent, must be the view's own (the scheme and the Host): a page of another
      site cannot drive the view from a visitor's browser.
    - with a token, every /api route needs `Authorization: Bearer <token>` (any bytes compared
      as bytes in constant time, so a header that is not ASCII is refused, not an error).
    """

    def __init__(self, host: str, allowed_hosts=(), token: str | None = None):
        self.names = {"localhost", *(name.lower().rstrip(".") for name in allowed_hosts)}
        own = host.strip("[]").lower().rstrip(".")
        if own:
            self.names.add(own)
        self.token = token.encode() if token else None

    def host_allowed(self, scope) -> bool:
        given = _headers(scope, b"host") or _headers(scope, b":authority")
        if len(given) != 1:
            return False
        name = _host_name(given[0].decode("latin-1"))
        if name in self.names:
            return True
        address = _address(name)
        if address is None:
            return False
        server = scope.get("server")
        return address.is_loopback or (server is not None and address == _address(str(server[0])))

    def origin_allowed(self, scope) -> bool:
        origins = _headers(scope, b"origin")
        if not origins:
            return True
        hosts = _headers(scope, b"host") or _headers(scope, b":authority")
        own = _origin(scope.get("scheme", "http"), hosts[0].decode("latin-1")) if hosts else None
        return len(origins) == 1 and origins[0].decode("latin-1").lower() == own

    def authorised(self, scope) -> bool:
        if self.token is None:
            return True
        given = _headers(scope, b"authorization")
        if len(given) != 1:
            return False
        scheme, _space, credentials = given[0].strip().partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), self.token)


def is_json(scope) -> bool:
    """The request's body is declared JSON (`application/json`, parameters allowed): a type a
    page of another site cannot send without the browser asking first (CORS), and being told no."""
    given = _headers(scope, b"content-type")
    return len(given) == 1 and given[0].split(b";", 1)[0].strip().lower() == b"application/json"


class BadRequest(Exception):
    """A query the view cannot answer (400); the message says which parameter and why."""


def page_of(query: dict, most: int) -> tuple[int, int]:
    """`?page=` (from 1, default 1) and `?limit=` (default and at most `most`)."""

    def positive(name: str, default: int) -> int:
        text = query.get(name)
        if text is None:
            return default
        # ASCII digits only: str.isdigit() also takes '²', which int() refuses.
        if not (text.isascii() and text.isdigit()) or len(text) > 12 or int(text) < 1:
            raise BadRequest(f"{name} must be a whole number from 1, got {text[:40]!r}")
        return int(text)

    return positive("page", 1), min(positive("limit", most), most)


# ---------------------------------------------------------------- the tap


class Tap:
    """One live-stream subscriber: its filter, and a buffer of its own that holds whole batches'
    lines up to `capacity` bytes (or one batch, when a single one is larger). Lines are filtered
    by type, and sent, in the subscriber's own task; one that lags behind its buffer is set
    aside by its TapHub until it has room again."""

    def __init__(self, hub: "TapHub", source: str | None, kind: str | None, capacity: int):
        self.hub = hub
        self.source = source
        self.kind = kind
        self.capacity = capacity
        self._needle = f'"type":"{kind}"'.encode() if kind else None
        self._pending: collections.deque = collections.deque()  # (lines, bytes, dropped before them)
        self.held = 0  # bytes in _pending
        self.dropped = 0  # messages dropped for this subscriber, up to when it was last set aside
        self.stalled_at: int | None = None  # while set aside: its source's count (TapHub.seen) then
        self.sent = 0
        self._wakeup = trio.Event()
        self._closed = False

    def offer(self, lines: list[bytes], size: int) -> bool:
        """A batch's lines (never changed once the correlator made them) and their bytes; False
        when there is no room for them."""
        if self.held and self.held + size > self.capacity:
            return False
        self._pending.append((lines, size, self.dropped))
        self.held += size
        self._wakeup.set()
        return True

    @property
    def dropped_now(self) -> int:
        """Messages dropped for this subscriber so far, those of a stall still going on too."""
        return self.dropped + (self.hub.seen(self.source) - self.stalled_at if self.stalled_at is not None else 0)

    def close(self) -> None:
        self._closed = True
        self._wakeup.set()

    async def next_lines(self) -> tuple[list[bytes], int] | None:
        """The oldest batch's lines, waiting for one, and the messages dropped for this
        subscriber before they came; None once closed."""
        while not self._pending:
            if self._closed:
                return None
            self._wakeup = trio.Event()
            await self._wakeup.wait()
        return self.next_lines_nowait()

    def next_lines_nowait(self) -> tuple[list[bytes], int]:
        """As `next_lines`, or trio.WouldBlock when none is held. Taking one makes room: a
        subscriber set aside takes batches again."""
        if not self._pending:
            raise trio.WouldBlock
        lines, size, dropped = self._pending.popleft()
        self.held -= size
        if self.stalled_at is not None:
            self.hub.resume(self)
        return lines, dropped

    def frames(self, lines: list[bytes]) -> bytes:
        """The Server-Sent Events of those lines that pass the type filter: one `data:` each
        (an enriched line is compact JSON, without a newline)."""
        if self._needle is not None:
            needle, kind = self._needle, self.kind
            lines = [line for line in lines if needle in line and orjson.loads(line)["type"] == kind]
        self.sent += len(lines)
        return b"".join(b"data: " + line + b"\n\n" for line in lines)

    def statistics(self) -> dict:
        return {"source": self.source, "type": self.kind, "held_bytes": self.held, "sent": self.sent, "dropped": self.dropped_now, "stalled": self.stalled_at is not None}


class TapHub:
    """The tap's subscribers, fed every chunk's batches by the correlator. A subscriber that has
    no room for a batch is set aside until it takes one from its buffer: meanwhile chunks cost
    nothing for it, however many such subscribers there are, and what it missed is the number of
    its source's messages published in between (counted per subscriber and in total)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.active: set[Tap] = set()
        self.stalled: set[Tap] = set()
        # Messages published while there were subscribers, in all (None) and for each source a
        # subscriber follows: what a stalled subscriber's drops are counted from.
        self._seen: collections.Counter = collections.Counter()
        self._followed: collections.Counter = collections.Counter()  # source -> subscribers
        self.dropped_by_closed = 0

    def __len__(self) -> int:
        return len(self.active) + len(self.stalled)

    def __iter__(self):
        yield from self.active
        yield from self.stalled

    def seen(self, source: str | None) -> int:
        return self._seen[source]

    def subscribe(self, source: str | None, kind: str | None) -> Tap:
        tap = Tap(self, source, kind, self.capacity)
        self.active.add(tap)
        if source is not None:
            self._followed[source] += 1
        return tap

    def unsubscribe(self, tap: Tap) -> None:
        tap.dropped, tap.stalled_at = tap.dropped_now, None  # counted from here on without the hub
        self.dropped_by_closed += tap.dropped
        self.active.discard(tap)
        self.stalled.discard(tap)
        if tap.source is not None:
            self._followed[tap.source] -= 1
            if not self._followed[tap.source]:
                self._followed.pop(tap.source)
                self._seen.pop(tap.source, None)

    def resume(self, tap: Tap) -> None:
        tap.dropped = tap.dropped_now
        tap.stalled_at = None
        self.stalled.discard(tap)
        self.active.add(tap)

    def dropped(self) -> int:
        return self.dropped_by_closed + sum(tap.dropped_now for tap in self)

    def close(self) -> None:
        for tap in list(self):
            tap.close()

    def publish(self, batches: list) -> None:
        """A chunk's batches: per batch two counts, and for each subscriber taking batches of its
        source one append (a stalled one is not even looked at)."""
        if not (self.active or self.stalled):
            return
        seen, followed, active = self._seen, self._followed, self.active
        for batch in batches:
            lines = batch.lines
            count = len(lines)
            source = batch.source
            seen[None] += count
            if source in followed:
                seen[source] += count
            if not active:
                continue
            size = -1
            for tap in tuple(active):
                if tap.source is not None and tap.source != source:
                    continue
                if size < 0:
                    size = sum(map(len, lines))
                if not tap.offer(lines, size):  # set aside, this batch the first it missed
                    tap.stalled_at = seen[tap.source] - count
                    active.discard(tap)
                    self.stalled.add(tap)


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
            ("http_refused_total", "reason", "Requests the HTTP view refused, by reason: host (421), origin (403), token (401), content_type (415), bad_request (400), tap_limit (503)"),
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
        spans = CounterMetricFamily("sidecar_index_evicted_spans", "Spans a job or trace let go for newer ones (index.max_spans_per_job, index.max_spans_per_trace)", labels=["of"])
        for key in ("jobs", "traces"):
            spans.add_metric([key], index.get(f"evicted_spans_of_{key}", 0))
        yield spans
        links = CounterMetricFamily("sidecar_index_dropped_links", "Traces of a job (or jobs of a trace) not kept: it held as many as its spans may be")
        links.add_metric([], index.get("dropped_links", 0))
        yield links
        if self.sidecar.view is not None:
            taps = self.sidecar.view.taps
            subscribers = GaugeMetricFamily("sidecar_tap_subscribers", "Open /api/tap streams (cap: http.max_tap_subscribers)")
            subscribers.add_metric([], len(taps))
            yield subscribers
            dropped = CounterMetricFamily("sidecar_tap_dropped_messages", "Messages a tap subscriber missed: it lagged behind by more than http.tap_buffer")
            dropped.add_metric([], taps.dropped())
            yield dropped
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
        self.taps = TapHub(settings.tap_buffer)
        self._not_found_log = RateLimitedLog(log, interval=60.0)
        self._refused_log = RateLimitedLog(log, interval=60.0)
        self.address: tuple[str, int] | None = None
        self._stop = trio.Event()
        self.guard = RequestGuard(settings.host, settings.allowed_hosts, self._token())
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
            ("GET", "/api/taps"): self.tap_statistics,
            ("POST", "/api/reload"): self.reload,
            ("GET", "/"): self.page,
        }
        # What changes something: POST with a JSON body only (is_json).
        self._changes = {self.reload}

    def _token(self) -> str | None:
        try:
            token, origin = view_token(self.settings, Path(self.sidecar.config.storage.data_dir), self.sidecar.environ)
        except TokenFileError as exc:
            # Closed rather than open: a token no one knows, until the variable is set.
            log.warning("HTTP view: %s; every /api route refuses until $%s is set", exc, self.settings.token_env)
            return secrets.token_urlsafe(32)
        if token is None:
            log.info("HTTP view: /api needs no token (%s; $%s sets one)", origin, self.settings.token_env)
        else:
            log.info("HTTP view: every /api route needs the bearer token, %s", origin)
        return token

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
        self.taps.close()

    def publish(self, batches: list) -> None:
        self.taps.publish(batches)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        path = scope["path"]
        guard = self.guard
        if not guard.host_allowed(scope):
            hosts = _headers(scope, b"host")
            given = hosts[0].decode("latin-1")[:100] if len(hosts) == 1 else f"{len(hosts)} Host headers"
            await self._refuse(send, 421, "host", f"this view answers to localhost, its own address and the names in http.allowed_hosts, not to {given!r}")
            return
        if not guard.origin_allowed(scope):
            await self._refuse(send, 403, "origin", "requests from another origin (a page of another site) are refused")
            return
        if (path == "/api" or path.startswith("/api/")) and not guard.authorised(scope):
            await self._refuse(send, 401, "token", "a bearer token is required (`monitoring-sidecar token` prints it)", [(b"www-authenticate", b"Bearer")])
            return
        query = dict(urllib.parse.parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        handler = self._routes.get((scope["method"], path))
        argument = None
        if handler is None:
            for prefix, method in (("/api/jobs/", self.job), ("/api/traces/", self.trace)):
                if path.startswith(prefix) and scope["method"] == "GET":
                    # `path` is decoded already; the id is the raw path's, decoded once (an id
                    # may hold "%" or "/").
                    raw = scope.get("raw_path")
                    raw = raw.decode("latin-1").split("?", 1)[0] if raw else None
                    argument = urllib.parse.unquote(raw[len(prefix) :]) if raw and raw.startswith(prefix) else path[len(prefix) :]
                    handler = method
        if handler is None:
            allowed = [m for (m, p) in self._routes if p == path]
            if allowed:
                await _respond(send, 405, {"error": f"use {', '.join(allowed)}"}, headers=[(b"allow", ", ".join(allowed).encode())])
            else:
                self._not_found(scope["method"], path)
                await _respond(send, 404, {"error": f"no such resource: {path}"})
            return
        if handler in self._changes and not is_json(scope):
            await self._refuse(send, 415, "content_type", "send Content-Type: application/json")
            return
        try:
            if argument is not None:
                await handler(send, argument, query, path)
            elif handler == self.tap:
                await handler(send, receive, query)
            else:
                await handler(send, query)
        except BadRequest as exc:
            await self._refuse(send, 400, "bad_request", str(exc))

    async def _refuse(self, send, status: int, reason: str, message: str, headers=()) -> None:
        """Answer `status`, counted by reason, logged at most once a minute per reason."""
        self.sidecar.counters.inc("http_refused_total", reason=reason)
        self._refused_log.warning(reason, "HTTP view: refused a request (%s, counted in http_refused_total): %s", reason, message)
        await _respond(send, status, {"error": message}, headers=headers)

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
        number, limit = page_of(query, self.settings.max_page_items)
        since = query.get("since")
        found = self.sidecar.correlator.index.jobs_page(since, number, limit)
        found["page"]["next"] = _next_page("/api/jobs", found["page"], since=since)
        await _respond(send, 200, found)

    async def job(self, send, job_id, query, path):
        await self._paged_view(send, "job", job_id, self.sidecar.job_view, query, path)

    async def trace(self, send, trace_id, query, path):
        await self._paged_view(send, "trace", trace_id, self.sidecar.trace_view, query, path)

    async def _paged_view(self, send, kind: str, key: str, view_of, query, path) -> None:
        """One page of a job's or trace's view (`view_of(key, page, limit)`), or a 404."""
        number, limit = page_of(query, self.settings.max_page_items)
        view = await view_of(key, number, limit)
        if view is None:
            await _respond(send, 404, {"error": f"no {kind} {key!r} in the live index"})
            return
        view["page"]["next"] = _next_page(path, view["page"])
        await _respond(send, 200, view)

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

    async def tap_statistics(self, send, query):
        await _respond(send, 200, {"taps": [tap.statistics() for tap in self.taps], "max_tap_subscribers": self.settings.max_tap_subscribers, "tap_buffer": self.settings.tap_buffer})

    async def tap(self, send, receive, query):
        kind = query.get("type")
        if kind is not None and kind not in MESSAGE_TYPES:
            raise BadRequest(f"type must be one of {', '.join(sorted(MESSAGE_TYPES))}, got {kind[:40]!r}")
        if len(self.taps) >= self.settings.max_tap_subscribers:
            await self._refuse(send, 503, "tap_limit", f"{len(self.taps)} tap subscribers already (http.max_tap_subscribers); try again later", [(b"retry-after", b"10")])
            return
        tap = self.taps.subscribe(query.get("source"), kind)
        try:
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-store")]})
            await send({"type": "http.response.body", "body": b": tap open\n\n", "more_body": True})
            async with trio.open_nursery() as nursery:

                async def until_disconnect():
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    nursery.cancel_scope.cancel()

                nursery.start_soon(until_disconnect)
                reported = 0
                while (taken := await tap.next_lines()) is not None:
                    lines, dropped = taken
                    body = tap.frames(lines)
                    if dropped != reported:  # where the gap is: before these lines
                        reported = dropped
                        body = b"event: dropped\ndata: " + orjson.dumps({"dropped": dropped}) + b"\n\n" + body
                    if body:
                        await send({"type": "http.response.body", "body": body, "more_body": True})
                nursery.cancel_scope.cancel()
        finally:
            self.taps.unsubscribe(tap)
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


def _next_page(path: str, page: dict, **query) -> str | None:
    """The path and query of the page after `page`, None on the last."""
    if page["number"] >= page["pages"]:
        return None
    given = {k: v for k, v in query.items() if v is not None}
    return f"{urllib.parse.quote(path)}?{urllib.parse.urlencode({**given, 'page': page['number'] + 1, 'limit': page['limit']})}"


async def _respond(send, status: int, payload, headers=()) -> None:
    await _respond_bytes(send, status, orjson.dumps(payload, option=orjson.OPT_INDENT_2), b"application/json", headers)


async def _respond_bytes(send, status: int, body: bytes, content_type: bytes, headers=()) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})
