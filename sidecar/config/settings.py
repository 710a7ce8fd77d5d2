"""The settings: frozen attrs classes whose fields are the config keys, with their defaults and
checks (validators, `__attrs_post_init__`), and what a loaded configuration is made of."""

from typing import Any, Literal

import attrs

from sidecar.config.yaml_reader import Where
from sidecar.tls import TlsSettings
from sidecar.transforms.filter import MessageFilter  # noqa: F401 (a rule's filter)
from sidecar.units import ByteSize, Duration


@attrs.frozen
class PipelineSettings:
    # Chunks (lists of messages read in one go) between the sources and the correlator.
    channel_size: int = attrs.field(default=4, validator=attrs.validators.ge(1))
    # trace_id -> job_id pairs remembered to give later messages of a trace their job.
    trace_cache_size: int = attrs.field(default=100_000, validator=attrs.validators.ge(0))
    # Decode, validate, enrich and encode JSON lines in the Rust extension when it is built
    # (about 3x the messages per CPU second); false keeps every message on the Python path.
    native: bool = True


def _check_apps_metrics_path(_instance, _attribute, path) -> None:
    if not path.startswith("/") or path in _VIEW_PATHS or path.startswith(("/api/jobs/", "/api/traces/")):
        raise ValueError(f"must be a path starting with / that the view does not serve already ({', '.join(_VIEW_PATHS)}), got {path!r}")


_VIEW_PATHS = ("/", "/healthz", "/readyz", "/metrics", "/api/jobs", "/api/routes", "/api/backends", "/api/statistics", "/api/tap", "/api/taps", "/api/reload")


def _check_host_names(_instance, _attribute, names) -> None:
    for name in names:
        if not name or any(c.isspace() or c in "/:@[]" for c in name):
            raise ValueError(f"must be host names as a Host header carries them, without a port (e.g. sidecar.example.com), got {name!r}")


@attrs.frozen
class HttpSettings:
    """The HTTP view: health, /metrics, the job and trace API, the web page."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = attrs.field(default=17001, validator=attrs.validators.and_(attrs.validators.ge(0), attrs.validators.le(65535)))
    # When this environment variable is set, every /api route needs `Bearer <value>`; unset, a
    # view beyond loopback makes a token of its own in storage.data_dir (sidecar.http).
    token_env: str = "MONITORING_SIDECAR_TOKEN"
    # The applications' metrics for Prometheus (sidecar.apps_metrics); /metrics stays the sidecar's.
    apps_metrics_path: str = attrs.field(default="/metrics/apps", validator=_check_apps_metrics_path)
    apps_metrics_raw: bool = False  # raw metric points too, as gauges of their last value
    apps_metrics_max_series: int = attrs.field(default=10_000, validator=attrs.validators.ge(1))
    # A raw series without a point for this long is let go (aggregated groups: two windows).
    apps_metrics_raw_max_age: Duration = attrs.field(default=300.0, validator=attrs.validators.gt(0))
    # Names a request's Host may carry besides localhost and the view's own address (DNS
    # rebinding: a page of another site reaching this view under that site's name is refused).
    allowed_hosts: tuple[str, ...] = attrs.field(default=(), validator=_check_host_names)
    max_tap_subscribers: int = attrs.field(default=16, validator=attrs.validators.ge(1))
    # Bytes of messages each tap subscriber may lag behind before batches are dropped for it.
    tap_buffer: ByteSize = attrs.field(default=1024 * 1024, validator=attrs.validators.ge(1024))
    # Spans and sources in one page of a job or trace, jobs in one of /api/jobs: the default
    # and the most a `limit` may ask for.
    max_page_items: int = attrs.field(default=1000, validator=attrs.validators.and_(attrs.validators.ge(1), attrs.validators.le(100_000)))
    # HTTPS in place of HTTP; with client_ca, only clients with a certificate it signed.
    tls: TlsSettings | None = None


@attrs.frozen
class SecuritySettings:
    """What the sidecar insists on for listeners beyond loopback (sidecar.config.exposure)."""

    # false: a source or the HTTP view open beyond loopback without authentication is a
    # warning from `check` and `run`; true: a config error at its host setting's line.
    require_auth_beyond_loopback: bool = False


@attrs.frozen
class IndexSettings:
    """The live index of recent jobs and traces behind the unified view."""

    max_jobs: int = attrs.field(default=10_000, validator=attrs.validators.ge(1))
    max_traces: int = attrs.field(default=10_000, validator=attrs.validators.ge(1))
    max_age: Duration = attrs.field(default=3600.0, validator=attrs.validators.gt(0))
    # Spans (and linked traces or jobs) each job and each trace holds; past it the oldest span
    # gives way, counted.
    max_spans_per_job: int = attrs.field(default=10_000, validator=attrs.validators.ge(1))
    max_spans_per_trace: int = attrs.field(default=10_000, validator=attrs.validators.ge(1))


@attrs.frozen
class StorageSettings:
    # The disk queues' logs live here, one directory per backend instance (by its name).
    data_dir: str = "./var/spool"
    # All logs under data_dir together stay within this; past it, queues are full.
    max_bytes: ByteSize = attrs.field(default=4 * 1024**3, validator=attrs.validators.ge(4096))
    # The segment each log is writing is fsynced this often, from a worker thread; 0: only at
    # exit. A machine crash (not a process crash) costs what was written since.
    sync_interval: Duration = attrs.field(default=1.0, validator=attrs.validators.ge(0))


@attrs.frozen
class ReloadSettings:
    poll_interval: Duration = attrs.field(default=1.0, validator=attrs.validators.gt(0))
    # Editors and ConfigMap updates write in several steps: wait until the files stop changing.
    settle_delay: Duration = attrs.field(default=0.25, validator=attrs.validators.ge(0))
    # Limits on one config file (the main file is held to the defaults), checked before it is
    # parsed: a file is a few kilobytes of rules, and parsing YAML is slow (docs/performance.md).
    max_file_size: ByteSize = attrs.field(default=1024 * 1024, validator=attrs.validators.ge(1024))
    max_file_depth: int = attrs.field(default=32, validator=attrs.validators.and_(attrs.validators.ge(4), attrs.validators.le(200)))


@attrs.frozen
class ShutdownSettings:
    # After SIGTERM, connected clients may still send this long before their sockets are closed.
    connection_grace: Duration = attrs.field(default=0.5, validator=attrs.validators.ge(0))
    # Then backends get this long to deliver what is queued; the rest is reported by count.
    drain_timeout: Duration = attrs.field(default=10.0, validator=attrs.validators.ge(0))
    # SIGTERM to exit, all phases included: within Kubernetes' default grace of 30 s, with margin.
    budget: Duration = attrs.field(default=10.0, validator=attrs.validators.gt(0))


@attrs.frozen
class BatchSettings:
    max_messages: int = attrs.field(default=1000, validator=attrs.validators.ge(1))
    timeout: Duration = attrs.field(default=1.0, validator=attrs.validators.ge(0))
    # A batch's JSON lines (a newline each) stay within this many bytes; 0: no byte limit. A
    # single longer message still goes, alone.
    max_bytes: ByteSize = attrs.field(default=0, validator=attrs.validators.ge(0))


@attrs.frozen
class QueueSettings:
    # disk: what a backend instance accepts is written to its log under storage.data_dir before
    # it counts as queued, so an outage, a restart or a crash loses none of it. memory: faster
    # for the price of what the queue holds when the process dies or an outage outlasts it.
    mode: Literal["disk", "memory"] = "disk"
    # disk: the messages kept in memory ahead of delivery (the rest is read back from the log);
    # memory: the queue's capacity.
    max_messages: int = attrs.field(default=20_000, validator=attrs.validators.ge(1))
    # disk: the log's cap (storage.max_bytes caps all logs together).
    max_bytes: ByteSize = attrs.field(default=1024**3, validator=attrs.validators.ge(4096))
    # At the cap: drop_newest (counted as queue_full) or block (backpressure up to the sockets);
    # a memory queue can also drop_oldest. `spill` is the former name of a disk queue that
    # drops the newest at its cap.
    when_full: Literal["block", "drop_newest", "drop_oldest", "spill"] = "drop_newest"

    def __attrs_post_init__(self):
        if self.mode == "disk" and self.when_full == "drop_oldest":
            raise ValueError("when_full: drop_oldest needs mode: memory (a disk queue drops the newest at its cap, or blocks)")
        if self.mode == "memory" and self.when_full == "spill":
            raise ValueError("when_full: spill needs mode: disk (the default)")

    @property
    def overflow(self) -> str:
        """What a full queue does: `when_full` with `spill` read as what it means now."""
        return "drop_newest" if self.when_full == "spill" else self.when_full


@attrs.frozen
class RetrySettings:
    initial_backoff: Duration = attrs.field(default=0.1, validator=attrs.validators.gt(0))
    max_backoff: Duration = attrs.field(default=10.0, validator=attrs.validators.gt(0))
    attempt_timeout: Duration = attrs.field(default=30.0, validator=attrs.validators.gt(0))


@attrs.frozen
class CircuitBreakerSettings:
    failure_threshold: int = attrs.field(default=5, validator=attrs.validators.ge(1))
    # While open, the backend's probe (connect, or its health call) runs this often; the first
    # that passes lets a trial write go.
    probe_interval: Duration = attrs.field(default=0.5, validator=attrs.validators.gt(0))
    # After a trial write fails although the probe passed: no probes for this long, doubled per
    # such failure up to the maximum.
    reset_timeout: Duration = attrs.field(default=5.0, validator=attrs.validators.gt(0))
    max_reset_timeout: Duration = attrs.field(default=60.0, validator=attrs.validators.gt(0))


@attrs.frozen
class DeliverySettings:
    """The shared machinery's knobs, set per backend under these four keys."""

    batch: BatchSettings = BatchSettings()
    queue: QueueSettings = QueueSettings()
    retry: RetrySettings = RetrySettings()
    circuit_breaker: CircuitBreakerSettings = CircuitBreakerSettings()


DELIVERY_KEYS = tuple(f.name for f in attrs.fields(DeliverySettings))


@attrs.frozen
class UnavailableSettings:
    """Options of a backend type this build does not carry, kept as given."""

    options: tuple[tuple[str, Any], ...]


def instance_label(name: str, overrides: tuple[tuple[str, Any], ...]) -> str:
    """What an instance is called before it is numbered: the backend's name, and the keys (never
    the values) a rule's `config` overrides, `files[path]`. The loader numbers the second and
    later instances of one such label in the order their rules are read: `files[path]#2`."""
    return f"{name}[{','.join(key for key, _value in overrides)}]" if overrides else name


@attrs.frozen
class BackendSpec:
    """One running backend instance: a named backend with its effective settings.

    Two rules that resolve to equal specs share one instance (queue, batches, connection); a
    reload keeps an instance whose spec did not change, and one whose settings or label changed
    for the same destination takes them in place.
    """

    name: str
    type: str
    settings: Any
    delivery: DeliverySettings
    overrides: tuple[tuple[str, Any], ...] = ()
    # What logs, /metrics, /api/* and the status file call the instance: made of names, never
    # of setting values, which may hold a connection string's password (instance_label).
    label: str = attrs.field(default=attrs.Factory(lambda spec: instance_label(spec.name, spec.overrides), takes_self=True))

    @property
    def available(self) -> bool:
        return not isinstance(self.settings, UnavailableSettings)


@attrs.frozen
class Rule:
    source: str  # exact name, glob, "default" or "all"
    backend: str
    spec: BackendSpec
    enabled: bool
    priority: int
    filter: MessageFilter
    where: Where


@attrs.frozen
class SourceSpec:
    """One configured source: its name (the `input` label of its counters), type and settings."""

    name: str
    type: str
    settings: Any
    where: Where


@attrs.frozen
class SidecarConfig:
    sources: dict  # name -> SourceSpec, in the order configured
    http: HttpSettings
    pipeline: PipelineSettings
    index: IndexSettings
    storage: StorageSettings
    reload: ReloadSettings
    shutdown: ShutdownSettings
    backends: dict
    rules: tuple
    files: tuple  # every file read, main file first
    transforms: tuple = ()  # of TransformSpec, in the order configured
    aggregate: tuple = ()  # of sidecar.aggregate.AggregateSpec, in the order configured
    security: SecuritySettings = SecuritySettings()

    @property
    def specs(self) -> set:
        return {rule.spec for rule in self.rules if rule.enabled}
