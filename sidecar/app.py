"""The sidecar: one trio nursery owning the sources, the correlator, the config watcher and one
supervised task per backend instance, connected by bounded channels.

    sources --(one memory channel, chunks)--> correlator --(DeliveryQueue per backend)--> supervisor

Shutdown goes in phases, each bounded: stop accepting; let connected clients send for
`connection_grace`; the sources close their clones of the channel, the correlator drains it and
closes every backend queue; backends deliver what they hold until `drain_timeout`; what is left
then is reported by count.
"""

import datetime as dt
import logging
import os
import signal
from pathlib import Path

import attrs
import orjson
import trio

from sidecar import __version__, places, stored_view
from sidecar.aggregate import Aggregation
from sidecar.config import BackendSpec, ConfigError, SidecarConfig, load_config
from sidecar.correlator import Correlator, Routing
from sidecar.delivery import BackendSupervisor
from sidecar.disk_log import DiskBudget, held_in
from sidecar.http import ViewServer
from sidecar.jobs import PAGE_SIZE, LiveIndex
from sidecar.metrics import Counters
from sidecar.routing import RouteTable
from sidecar.transforms import TransformStage
from sidecar.sources import Intake, Source, source_class
from sidecar.watcher import ConfigWatcher

log = logging.getLogger("sidecar")

# Of shutdown.budget: kept for closing the backends and their disk logs (at most), and for exit.
SAVE_RESERVE = 2.0
EXIT_MARGIN = 0.25


def _fsync_and_close(descriptors: list[int]) -> None:
    for descriptor in descriptors:
        try:
            os.fsync(descriptor)
        except OSError as exc:
            log.error("disk log: fsync failed: %s", exc.strerror or exc)
        finally:
            os.close(descriptor)


class Topology:
    """The running backend instances, keyed by their effective settings.

    `apply()` starts instances new to a table, keeps the unchanged ones (queue, batches and
    connection included) and closes the removed ones, which drain and stop on their own.
    """

    def __init__(self):
        self.supervisors: dict[BackendSpec, BackendSupervisor] = {}
        self.retiring: set[BackendSupervisor] = set()
        self.orphaned_buffers: dict[str, dict] = {}  # directory -> what it holds
        self.budget: DiskBudget | None = None  # the disk logs' total cap
        self.sync_interval = 0.0  # storage.sync_interval; 0: the logs are fsynced at exit only
        self.scope = trio.CancelScope()  # its deadline bounds the drain at shutdown
        self.stopped = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._closed = trio.Event()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Own the backend tasks; returns once every one has drained after `close_all()`."""
        try:
            with self.scope:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    task_status.started()
                    while not self._closed.is_set():
                        # Read each round: a reload may change it (0, never, is looked at again in 1 s).
                        with trio.move_on_after(self.sync_interval or 1.0):
                            await self._closed.wait()
                        if self.sync_interval and not self._closed.is_set():
                            await self._sync_logs()
        finally:
            self.stopped.set()

    def apply(self, table: RouteTable, data_dir: Path, max_bytes: int = 4 * 1024**3, sync_interval: float = 0.0) -> dict[BackendSpec, BackendSupervisor]:
        """`max_bytes`: storage.max_bytes, the total cap on the disk logs under data_dir;
        `sync_interval`: storage.sync_interval."""
        self.sync_interval = sync_interval
        if self.budget is None:
            self.budget = DiskBudget(max_bytes)
        self.budget.max_bytes = max_bytes
        wanted = table.specs
        # In rule order, so that logs and statistics list backends the same way every time.
        for spec in dict.fromkeys(rule.spec for rule in table.rules if rule.enabled):
            if spec in self.supervisors:
                continue
            # New settings for a destination that runs (a rotated password, a batch size):
            # its instance takes them, and keeps its queue and disk buffer.
            same = next((old for old, s in self.supervisors.items() if old not in wanted and s.can_take(spec)), None)
            if same is not None:
                supervisor = self.supervisors.pop(same)
                supervisor.reconfigure(spec)
                self.supervisors[spec] = supervisor
                log.info("backend %s: settings changed; its %d queued messages are delivered with the new ones", spec.label, supervisor.queued)
                continue
            supervisor = BackendSupervisor(spec, data_dir, self.budget)
            self.supervisors[spec] = supervisor
            self._nursery.start_soon(supervisor.run, name=f"backend {spec.label}")
            log.info("backend %s (%s) started", spec.label, spec.type)
        for spec in self.supervisors.keys() - wanted:
            supervisor = self.supervisors.pop(spec)
            supervisor.close()
            self.retiring.add(supervisor)
            self._nursery.start_soon(self._retire, supervisor)
        self._find_orphaned_buffers(data_dir)
        return dict(self.supervisors)

    def _find_orphaned_buffers(self, data_dir: Path) -> None:
        """Disk logs under data_dir that no running instance owns (a backend renamed or
        removed, or its queue now in memory): reported, kept, and delivered when a backend of
        that name with a disk queue comes back."""
        owned = {s.queue.log.directory.resolve() for s in self.all_supervisors() if s.queue.log is not None}
        found = {}
        try:
            directories = sorted(p for p in data_dir.iterdir() if p.is_dir() and p.resolve() not in owned)
        except OSError:
            directories = []
        for directory in directories:
            messages, size = held_in(directory)
            if messages:
                found[str(directory)] = {"directory": str(directory), "messages": messages, "bytes": size}
                if str(directory) not in self.orphaned_buffers:
                    log.warning(
                        "disk log %s holds %d messages that no configured backend owns; kept, and delivered when a backend named %r with a disk queue is configured",
                        directory, messages, directory.name,
                    )
        self.orphaned_buffers = found

    async def _sync_logs(self) -> None:
        """fsync what the disk logs wrote since the last time, in a worker thread: an fsync
        takes as long as the disk does, which the event loop must not wait for."""
        descriptors = [fd for s in self.all_supervisors() if s.queue.log is not None and (fd := s.queue.log.writer_to_sync()) is not None]
        if descriptors:
            await trio.to_thread.run_sync(_fsync_and_close, descriptors)

    async def _retire(self, supervisor: BackendSupervisor) -> None:
        await supervisor.wait_stopped()
        self.retiring.discard(supervisor)
        log.info("backend %s drained and stopped (%d delivered)", supervisor.label, supervisor.delivered)

    def close_all(self) -> None:
        for supervisor in self.supervisors.values():
            supervisor.close()
        self._closed.set()

    def all_supervisors(self) -> list[BackendSupervisor]:
        return [*self.supervisors.values(), *self.retiring]


class Sidecar:
    def __init__(self, config_path: Path | None, routes_dir: Path | None, *, environ=os.environ, status_file: Path | None = None, status_interval: float = 1.0):
        self.config_path = config_path
        self.routes_dir = routes_dir
        self.environ = environ
        self.config: SidecarConfig = load_config(config_path, routes_dir, environ)
        self.counters = Counters()
        self.topology = Topology()
        self.sources: dict[str, Source] = {name: self._make_source(spec) for name, spec in self.config.sources.items()}
        self.correlator: Correlator | None = None
        self.watcher = ConfigWatcher(config_path, routes_dir, self.config.reload, self.reload)
        self.status_file = status_file
        self.status_interval = status_interval
        self._status_error: str | None = None  # the last failed status write's, logged once
        self.last_reload_error: str | None = None
        self.http_settings = self.config.http
        self.view: ViewServer | None = None
        self.started_at = dt.datetime.now(dt.timezone.utc)
        self._stop = trio.Event()
        self._undelivered: dict[str, dict] = {}  # label -> exit account, of backends that held messages
        self._shutdown_seconds = 0.0

    def _make_source(self, spec) -> Source:
        intake = Intake(spec.name, self.counters, logging.getLogger(f"sidecar.source.{spec.name}"))
        return source_class(spec.type)(spec.name, spec.settings, intake, native=self.config.pipeline.native)

    def listen_on(self, host: str | None, port: int) -> None:
        """Override the address of the TCP source named `tcp`, or else of the first TCP source
        (the command line's --listen); `host` None keeps the configured one."""
        source = self.sources.get("tcp")
        if source is None or source.type_name != "tcp":
            source = next((s for s in self.sources.values() if s.type_name == "tcp"), None)
        if source is None:
            raise ValueError("no source of type tcp is configured")
        source.settings = attrs.evolve(source.settings, host=host or source.settings.host, port=port, unix=None)

    @property
    def ready(self) -> bool:
        """Every source listens and the correlator runs."""
        return self.correlator is not None and all(s.address is not None for s in self.sources.values())

    def serve_http_on(self, host: str, port: int) -> None:
        """Override the HTTP view's address (the command line's --http)."""
        self.http_settings = attrs.evolve(self.http_settings, host=host, port=port, enabled=True)

    async def job_view(self, job_id: str, page: int = 1, limit: int = PAGE_SIZE) -> dict | None:
        return await self._view("job", job_id, page, limit)

    async def trace_view(self, trace_id: str, page: int = 1, limit: int = PAGE_SIZE) -> dict | None:
        return await self._view("trace", trace_id, page, limit)

    async def _view(self, kind: str, key: str, page: int, limit: int) -> dict | None:
        """Page `page` of it, from a backend that reads its messages back when one is
        configured, else from the live index (`sidecar.stored_view`)."""
        return await stored_view.view(kind, key, self.correlator.index, self.topology.supervisors, page, limit)

    async def _expire_index(self) -> None:
        while True:
            await trio.sleep(min(60.0, self.config.index.max_age / 10))
            self.correlator.index.expire()

    # ---------------------------------------------------------------- lifecycle

    async def run(self, *, handle_signals: bool = True, task_status=trio.TASK_STATUS_IGNORED) -> None:
        send_channel, receive_channel = trio.open_memory_channel(self.config.pipeline.channel_size)
        async with trio.open_nursery() as nursery:
            if handle_signals:  # before anything listens: a SIGTERM from then on is a drain
                await nursery.start(self._handle_signals)
            # Listen first: a port in use ends the start before any backend or disk log is opened
            # (what is sent meanwhile waits in the channel for the correlator). Each source sends
            # through a clone: the correlator's input ends when the last is closed.
            async with send_channel:
                addresses = [await nursery.start(source.run, send_channel.clone()) for source in self.sources.values()]
            await nursery.start(self.topology.run)
            table = RouteTable(self.config.rules)
            _warn_of_shared_places(table)
            index_settings = self.config.index
            index = LiveIndex(
                index_settings.max_jobs, index_settings.max_traces, index_settings.max_age, trio.current_time,
                max_spans_per_job=index_settings.max_spans_per_job, max_spans_per_trace=index_settings.max_spans_per_trace,
            )
            supervisors = self.topology.apply(table, Path(self.config.storage.data_dir), self.config.storage.max_bytes, self.config.storage.sync_interval)
            routing = Routing(table, supervisors, TransformStage(self.config.transforms))
            self.correlator = Correlator(routing, self.counters, index, trace_cache_size=self.config.pipeline.trace_cache_size, aggregation=Aggregation(self.config.aggregate, native=self.config.pipeline.native))
            nursery.start_soon(self._run_correlator, receive_channel)
            await nursery.start(self.correlator.close_windows)
            await nursery.start(self.watcher.run)
            nursery.start_soon(self._expire_index)
            if self.http_settings.enabled:
                self.view = ViewServer(self, self.http_settings)
                self.correlator.observers.append(self.view.publish)
                self.correlator.apps_metrics = self.view.apps_metrics
                await nursery.start(self.view.run)
            if self.status_file is not None:
                nursery.start_soon(self._write_status_periodically)
            log.info("monitoring-sidecar %s ready: %d rules, %d backends, config %s", __version__, len(self.config.rules), len(self.topology.supervisors), ", ".join(self.config.files))
            task_status.started(addresses[0] if len(addresses) == 1 else addresses)
            await self._stop.wait()
            if self.view is not None:
                self.view.stop()
            await self._shutdown()
            nursery.cancel_scope.cancel()
        self._report_shutdown()

    def stop(self) -> None:
        self._stop.set()

    async def _run_correlator(self, receive_channel) -> None:
        await self.correlator.run(receive_channel)
        # The channel is closed and drained: the aggregate steps' open windows are the last
        # messages, and then nothing more can reach the backends.
        self.correlator.flush_windows()
        self.topology.close_all()

    async def _shutdown(self) -> None:
        """Every phase inside `shutdown.budget`, from SIGTERM to exit: the clients' grace, the
        drain (a backend whose circuit is open is not waited for), then closing the backends,
        which keeps a reserve of the budget for itself. What a disk queue holds is on disk
        already: nothing is left to save."""
        settings = self.config.shutdown
        began = trio.current_time()
        exit_at = began + settings.budget - EXIT_MARGIN
        drain_until = min(began + settings.connection_grace + settings.drain_timeout, exit_at - min(SAVE_RESERVE, settings.budget / 5))
        grace = max(0.0, min(settings.connection_grace, drain_until - began))
        log.info("shutting down within %.1fs: no new connections; clients have %.1fs to finish", settings.budget, grace)
        for source in self.sources.values():
            source.stop_accepting()
            source.close_connections(grace)
        for supervisor in self.topology.all_supervisors():
            supervisor.stop_soon(exit_at)
        # The correlator ends when the sources' channel is drained, and then closes the
        # backend queues; backends deliver what they hold until drain_until.
        self.topology.scope.deadline = drain_until
        await self.topology.stopped.wait()
        self._shutdown_seconds = trio.current_time() - began
        self._undelivered = {s.label: s.exit_account for s in self.topology.all_supervisors() if s.exit_account and s.exit_account["held"]}

    def _report_shutdown(self) -> None:
        stats = self.statistics()
        delivered = sum(b["delivered"] for b in stats["backends"])
        accounts = self._undelivered.values()
        if self._undelivered:
            log.warning(
                "shutdown: undelivered messages: %s",
                ", ".join(
                    f"{label}={a['held']} ({a['on_disk']} on disk for the next start, {a['lost']} lost)" for label, a in sorted(self._undelivered.items())
                ),
            )
        log.info(
            "shutdown complete in %.1fs: received %d, delivered %d (all backends), undelivered %d (on disk %d, lost %d)",
            self._shutdown_seconds, stats["received"], delivered, sum(a["held"] for a in accounts), sum(a["on_disk"] for a in accounts), sum(a["lost"] for a in accounts),
        )
        if self.status_file is not None:
            self._write_status(stats)

    async def _handle_signals(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1) as signals:
            task_status.started()
            async for signum in signals:
                if signum == signal.SIGHUP:
                    self.watcher.request_reload("SIGHUP")
                elif signum == signal.SIGUSR1:
                    if self.correlator is None:
                        log.info("statistics: none yet, the sidecar is starting")
                        continue
                    log.info("statistics: %s", orjson.dumps(self.statistics()).decode())
                    if self.status_file is not None:
                        self._write_status(self.statistics())
                else:
                    log.info("received %s", signal.Signals(signum).name)
                    self.stop()

    # ---------------------------------------------------------------- reload

    async def reload(self, reason: str) -> bool:
        """Build, validate and swap the routing table; on error keep the running one."""
        try:
            config = await trio.to_thread.run_sync(load_config, self.config_path, self.routes_dir, self.environ)
        except ConfigError as exc:
            self.counters.inc("reload_failures_total")
            self.last_reload_error = str(exc)
            for problem in exc.problems:
                log.error("reload rejected (%s): %s", reason, problem)
            log.error("reload rejected: keeping the running configuration (%d rules)", len(self.config.rules))
            return False
        except Exception as exc:  # a bug the files found in the loader: a rejected reload, not an exit
            self.counters.inc("reload_failures_total")
            self.last_reload_error = f"internal error while loading the configuration: {type(exc).__name__}: {exc}"
            log.exception("reload rejected (%s): internal error while loading the configuration; keeping the running one (%d rules)", reason, len(self.config.rules))
            return False
        if (config.sources, config.http, config.pipeline, config.index) != (self.config.sources, self.config.http, self.config.pipeline, self.config.index):
            log.warning("reload: sources (tcp), http, pipeline and index settings change only on restart; routes and backends are applied now")
        table = RouteTable(config.rules)
        _warn_of_shared_places(table)
        supervisors = self.topology.apply(table, Path(config.storage.data_dir), config.storage.max_bytes, config.storage.sync_interval)
        self.correlator.routing = Routing(table, supervisors, TransformStage(config.transforms))
        self.correlator.reconfigure_aggregation(config.aggregate)
        self.config = config  # as loaded; the sources keep the settings they started with
        self.watcher.settings = config.reload
        self.last_reload_error = None
        self.counters.inc("reloads_total")
        log.info("reload applied (%s): %d rules, %d backends", reason, len(config.rules), len(supervisors))
        return True

    # ---------------------------------------------------------------- observability

    def statistics(self) -> dict:
        counters = self.counters
        return {
            "version": __version__,
            "pid": os.getpid(),
            "started_at": self.started_at.isoformat(),
            "received": counters.total("messages_received_total"),
            "decode_errors": counters.by_label("decode_errors_total", "reason"),
            "decoded_by_path": counters.by_label("decoded_messages_total", "path"),
            "routed": counters.get("routed_messages_total"),
            "unrouted": counters.get("unrouted_messages_total"),
            "removed_by_transforms": counters.by_label("transform_removed_messages_total", "transform"),
            "aggregates_emitted": counters.get("aggregates_emitted_total"),
            "aggregates_unrouted": counters.get("unrouted_aggregates_total"),
            "correlator_dropped": counters.by_label("correlator_dropped_messages_total", "reason"),
            "view_errors": counters.get("view_errors_total"),
            "http_not_found": counters.get("http_not_found_total"),
            "connections_total": counters.total("connections_total"),
            "connections_refused": counters.by_label("connections_refused_total", "reason"),
            "connections_closed": counters.by_label("connections_closed_total", "reason"),
            "sources": {name: {**source.statistics(), "received": counters.get("messages_received_total", input=name)} for name, source in self.sources.items()},
            "http": f"{self.view.address[0]}:{self.view.address[1]}" if self.view and self.view.address else None,
            "correlator": self.correlator.statistics() if self.correlator else {},
            "reloads": counters.get("reloads_total"),
            "reload_failures": counters.get("reload_failures_total"),
            "last_reload_error": self.last_reload_error,
            "config_files": list(self.config.files),
            "backends": [s.statistics() for s in self.topology.all_supervisors()],
            "orphaned_buffers": list(self.topology.orphaned_buffers.values()),
        }

    def _write_status(self, stats: dict) -> None:
        stats = {**stats, "written_at": dt.datetime.now(dt.timezone.utc).isoformat()}
        temporary = self.status_file.with_name(self.status_file.name + ".tmp")
        try:
            temporary.write_bytes(orjson.dumps(stats, option=orjson.OPT_INDENT_2))
            os.replace(temporary, self.status_file)
        except OSError as exc:  # a full disk, its directory removed: the sidecar goes on
            if str(exc) != self._status_error:
                log.error("status file %s: cannot write it: %s; the sidecar goes on, and tries again at the next write", self.status_file, exc.strerror or exc)
            self._status_error = str(exc)
        else:
            self._status_error = None

    async def _write_status_periodically(self) -> None:
        while True:
            self._write_status(self.statistics())
            await trio.sleep(self.status_interval)


def _warn_of_shared_places(table: RouteTable) -> None:
    """What `check` warns of, in the log: two backend instances writing one place."""
    shared = places.shared_places(table, places.sources_to_try(table), dt.datetime.now(dt.timezone.utc))
    for warning in places.warnings_for(shared):
        log.warning("%s", " ".join(warning))
