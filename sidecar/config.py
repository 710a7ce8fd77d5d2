"""Configuration: the main file plus routes.d/ drop-ins, read into frozen attrs settings.

Every problem is reported with the `file:line` it comes from, and all problems of a load are
reported together, not just the first. Strings may use `${NAME}` or `${NAME:-default}` to take
values (secrets above all) from the environment; such a value remembers its template, and
everything that displays settings shows the template, never the value.
"""

import fnmatch
import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import attrs
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.reader import ReaderError
from ruamel.yaml.events import AliasEvent, CollectionEndEvent, CollectionStartEvent, MappingStartEvent, ScalarEvent

from sidecar.constants import LEVELS, MESSAGE_TYPES
from sidecar.sources import SourceTypeUnknown, source_class
from sidecar.sources.tcp import TcpSettings
from sidecar.units import ByteSize, Duration, is_int, is_number, parse_bytesize, parse_duration


ROUTE_FILE_PATTERNS = ("*.yaml", "*.yml")
DEFAULT_CONFIG = Path(__file__).with_name("default.yaml")
RESERVED_SOURCE_KEYS = ("default", "all")


@attrs.frozen
class Where:
    """A place in a config file; `line` is 1-based."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@attrs.frozen
class ConfigProblem:
    where: Where | None
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


class ConfigError(Exception):
    """The configuration cannot be used; `problems` lists every reason with its place."""

    def __init__(self, problems: list[ConfigProblem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class Interpolated(str):
    """A string that came from `${...}`: equal to its value, displayed as its template."""

    template: str

    def __new__(cls, value: str, template: str):
        self = super().__new__(cls, value)
        self.template = template
        return self


def display_value(value) -> Any:
    """What may be shown of a setting: templates instead of environment values, no URL passwords."""
    if isinstance(value, Interpolated):
        return value.template
    if isinstance(value, str):
        value = re.sub(r"(://[^:/@\s]*:)[^@\s]+@", r"\1***@", value)
        return re.sub(r"(\bpassword\s*=\s*)('[^']*'|\S+)", r"\1***", value, flags=re.IGNORECASE)
    if isinstance(value, tuple):
        return [display_value(v) for v in value]
    return value


# ---------------------------------------------------------------- settings of the core


@attrs.frozen
class PipelineSettings:
    # Chunks (lists of messages read in one go) between the sources and the correlator.
    channel_size: int = attrs.field(default=4, validator=attrs.validators.ge(1))
    # trace_id -> job_id pairs remembered to give later messages of a trace their job.
    trace_cache_size: int = attrs.field(default=100_000, validator=attrs.validators.ge(0))
    # Decode, validate, enrich and encode JSON lines in the Rust extension when it is built
    # (about 3x the messages per CPU second); false keeps every message on the Python path.
    native: bool = True


@attrs.frozen
class HttpSettings:
    """The HTTP view: health, /metrics, the job and trace API, the web page."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = attrs.field(default=17001, validator=attrs.validators.and_(attrs.validators.ge(0), attrs.validators.le(65535)))
    # When this environment variable is set, POST /api/reload and /api/tap need `Bearer <value>`.
    token_env: str = "MONITORING_SIDECAR_TOKEN"


@attrs.frozen
class IndexSettings:
    """The live index of recent jobs and traces behind the unified view."""

    max_jobs: int = attrs.field(default=10_000, validator=attrs.validators.ge(1))
    max_traces: int = attrs.field(default=10_000, validator=attrs.validators.ge(1))
    max_age: Duration = attrs.field(default=3600.0, validator=attrs.validators.gt(0))


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
    # parsed: a file is a few kilobytes of rules, and parsing YAML costs about 10 s per MiB.
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


@attrs.frozen
class BackendSpec:
    """One running backend instance: a named backend with its effective settings.

    Two rules that resolve to equal specs share one instance (queue, batches, connection); a
    reload keeps an instance whose spec did not change.
    """

    name: str
    type: str
    settings: Any
    delivery: DeliverySettings
    overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def available(self) -> bool:
        return not isinstance(self.settings, UnavailableSettings)

    @property
    def label(self) -> str:
        if not self.overrides:
            return self.name
        shown = ", ".join(f"{k}={display_value(v)}" for k, v in self.overrides)
        return f"{self.name}({shown})"


@attrs.frozen
class BackendDefinition:
    name: str
    type: str
    options: dict = attrs.field(eq=False)  # raw options, for merging with rule overrides
    delivery: DeliverySettings
    where: Where


@attrs.frozen
class MessageFilter:
    """Which messages a rule passes. `levels` applies to events, `names` (globs) to metrics."""

    types: frozenset | None = None
    levels: frozenset | None = None
    names: tuple[str, ...] | None = None
    _names_regex: Any = attrs.field(default=None, eq=False, repr=False)

    @classmethod
    def build(cls, types=None, levels=None, names=None) -> "MessageFilter":
        regex = re.compile("|".join(fnmatch.translate(n) for n in names)) if names else None
        return cls(
            frozenset(types) if types is not None else None,
            frozenset(levels) if levels is not None else None,
            tuple(names) if names is not None else None,
            regex,
        )

    @property
    def passes_all(self) -> bool:
        return self.types is None and self.levels is None and self.names is None

    def passes(self, message: dict) -> bool:
        kind = message["type"]
        if self.types is not None and kind not in self.types:
            return False
        if self.levels is not None and kind == "event" and message["data"]["level"] not in self.levels:
            return False
        if self._names_regex is not None and kind == "metric" and not self._names_regex.match(message["data"]["name"]):
            return False
        return True

    def describe(self) -> str:
        parts = []
        if self.types is not None:
            parts.append("types=" + ",".join(sorted(self.types)))
        if self.levels is not None:
            parts.append("levels=" + ",".join(sorted(self.levels, key=LEVELS.index)))
        if self.names is not None:
            parts.append("names=" + ",".join(self.names))
        return " ".join(parts) or "all messages"


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

    @property
    def specs(self) -> set:
        return {rule.spec for rule in self.rules if rule.enabled}


# ---------------------------------------------------------------- reading YAML with positions


_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class _Invalid(Exception):
    pass


class DocumentReader:
    """Converts one YAML document's nodes into settings, collecting problems with their lines."""

    def __init__(self, file: str, problems: list[ConfigProblem], environ=os.environ):
        self.file = file
        self.problems = problems
        self.environ = environ

    def problem(self, where: Where | None, message: str) -> None:
        self.problems.append(ConfigProblem(where, message))

    def at(self, line0: int | None) -> Where:
        return Where(self.file, (line0 or 0) + 1)

    def key_where(self, mapping, key) -> Where:
        try:
            return self.at(mapping.lc.key(key)[0])
        except (AttributeError, KeyError, TypeError):
            return self.node_where(mapping)

    def value_where(self, mapping, key) -> Where:
        try:
            return self.at(mapping.lc.value(key)[0])
        except (AttributeError, KeyError, TypeError):
            return self.key_where(mapping, key)

    def item_where(self, sequence, index: int) -> Where:
        try:
            return self.at(sequence.lc.item(index)[0])
        except (AttributeError, KeyError, TypeError):
            return self.node_where(sequence)

    def node_where(self, node) -> Where:
        return self.at(getattr(getattr(node, "lc", None), "line", 0))

    def interpolate(self, text: str, where: Where) -> str:
        if "${" not in text:
            return text
        missing = []

        def substitute(match: re.Match) -> str:
            name, fallback = match.group(1), match.group(2)
            value = self.environ.get(name)
            if value is None:
                if fallback is None:
                    missing.append(name)
                    return ""
                return fallback
            return value

        value = _ENV_REFERENCE.sub(substitute, text)
        for name in missing:
            self.problem(where, f"environment variable {name} is not set (use ${{{name}:-default}} for a fallback)")
        return Interpolated(value, text)

    def convert(self, kind, value, where: Where, label: str):
        """One scalar or nested value to `kind`; raises _Invalid after recording a problem."""
        origin = typing.get_origin(kind)
        if origin is typing.Union or origin is getattr(__import__("types"), "UnionType", None):
            options = [k for k in typing.get_args(kind) if k is not type(None)]
            if value is None:
                return None
            return self.convert(options[0], value, where, label)
        if origin is Annotated:
            base, marker = typing.get_args(kind)
            if marker == "duration":
                return self._duration(value, where, label)
            if marker == "bytesize":
                return self._bytesize(value, where, label)
            return self.convert(base, value, where, label)
        if origin is Literal:
            choices = typing.get_args(kind)
            if value not in choices:
                self._fail(where, f"{label} must be one of {', '.join(map(str, choices))}, got {value!r}")
            return value
        if origin is tuple:
            if not isinstance(value, list):
                self._fail(where, f"{label} must be a list, got {_yaml_kind(value)}")
            (item_kind, _ellipsis) = typing.get_args(kind)
            return tuple(self.convert(item_kind, v, self.item_where(value, i), f"{label}[{i}]") for i, v in enumerate(value))
        if attrs.has(kind):
            if not isinstance(value, dict):
                self._fail(where, f"{label} must be a mapping, got {_yaml_kind(value)}")
            return self.build(kind, value, where, label)
        if kind is bool:
            if not isinstance(value, bool):
                self._fail(where, f"{label} must be true or false, got {value!r}")
            return value
        # ruamel.yaml's round-trip scalars are subclasses (ScalarInt, ScalarFloat): keep plain values.
        if kind is int:
            if not is_int(value):
                self._fail(where, f"{label} must be an integer, got {value!r}")
            return int(value)
        if kind is float:
            if not is_number(value):
                self._fail(where, f"{label} must be a number, got {value!r}")
            return float(value)
        if kind is str:
            if not isinstance(value, str):
                self._fail(where, f"{label} must be a string, got {_yaml_kind(value)}")
            return self.interpolate(str(value), where)
        if kind is Any:
            return _plain(value)
        raise TypeError(f"unsupported settings type {kind!r} for {label}")

    def build(self, cls, mapping: dict, where: Where, label: str, extra_keys: tuple = ()):
        """An attrs settings class from a mapping: unknown keys, wrong types and failed checks are
        reported at the line of the key at fault."""
        attrs.resolve_types(cls)
        fields = {f.name: f for f in attrs.fields(cls) if f.init}
        kwargs = {}
        ok = True
        for key, value in mapping.items():
            if key in extra_keys:
                continue
            field = fields.get(key)
            if field is None:
                known = ", ".join(fields) or "none"
                self.problem(self.key_where(mapping, key), f"unknown key {label}.{key} (known keys: {known})")
                ok = False
                continue
            value_at = self.value_where(mapping, key)
            try:
                converted = self.convert(field.type, value, value_at, f"{label}.{key}")
                if field.validator is not None:
                    field.validator(None, field, converted)
            except _Invalid:
                ok = False
                continue
            except (ValueError, TypeError) as exc:
                self.problem(value_at, f"{label}.{key}: {_validator_message(exc)}")
                ok = False
                continue
            kwargs[field.alias or key] = converted
        missing = [name for name, f in fields.items() if f.default is attrs.NOTHING and name not in mapping]
        for name in missing:
            self.problem(where, f"{label}.{name} is required")
        if missing or not ok:
            raise _Invalid
        try:
            return cls(**kwargs)
        except (ValueError, TypeError) as exc:
            self.problem(where, f"{label}: {_validator_message(exc)}")
            raise _Invalid from None

    def _fail(self, where: Where, message: str):
        self.problem(where, message)
        raise _Invalid

    def _duration(self, value, where, label) -> float:
        try:
            return parse_duration(value)
        except ValueError as exc:
            self._fail(where, f"{label} {exc}")

    def _bytesize(self, value, where, label) -> int:
        try:
            return parse_bytesize(value)
        except ValueError as exc:
            self._fail(where, f"{label} {exc}")


def _validator_message(exc: Exception) -> str:
    # attrs' comparison validators raise ValueError("'name' must be >= 1: 0"); keep it readable.
    return str(exc.args[0]) if exc.args else str(exc)


def _yaml_kind(value) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return "null" if value is None else f"{type(value).__name__} {value!r}"


def _plain(value, interpolate=None):
    """A hashable copy of free-form YAML data (for unavailable backends' options)."""
    if isinstance(value, dict):
        return tuple((str(k), _plain(v, interpolate)) for k, v in value.items())
    if isinstance(value, list):
        return tuple(_plain(v, interpolate) for v in value)
    if isinstance(value, str):
        return interpolate(str(value)) if interpolate is not None else str(value)
    if isinstance(value, bool) or value is None:
        return value
    if is_int(value):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return value


def _read_yaml(path: Path, problems: list[ConfigProblem], limits: "ReloadSettings | None" = None):
    """One YAML file's document, or None with its problem recorded. Its size and nesting are
    checked first, from its bytes and its event stream (which takes no stack), so no file can
    exhaust memory, time or the composer's recursion."""
    limits = limits or ReloadSettings()
    yaml = YAML(typ="rt")
    try:
        size = path.stat().st_size
        if size > limits.max_file_size:
            problems.append(ConfigProblem(Where(str(path), 1), f"the file is {size:,} bytes, more than reload.max_file_size ({limits.max_file_size:,})"))
            return None
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(ConfigProblem(Where(str(path), 1), f"cannot read: {exc}"))
        return None
    try:
        # Per open collection: for a mapping, how many nodes it has had (an even count means
        # the next is a key); None for a sequence.
        open_nodes: list[int | None] = []
        collection_anchors = set()
        for event in yaml.parse(text):
            is_node = isinstance(event, (CollectionStartEvent, ScalarEvent, AliasEvent))
            if is_node and open_nodes and open_nodes[-1] is not None:
                collection_key = isinstance(event, CollectionStartEvent) or (isinstance(event, AliasEvent) and event.anchor in collection_anchors)
                if open_nodes[-1] % 2 == 0 and collection_key:
                    # ruamel would raise TypeError (unhashable) while composing it
                    problems.append(ConfigProblem(Where(str(path), _line_of(event)), "invalid YAML: a key must be a string or a number, not a mapping or a list"))
                    return None
                open_nodes[-1] += 1
            if isinstance(event, CollectionStartEvent):
                if event.anchor is not None:
                    collection_anchors.add(event.anchor)
                open_nodes.append(0 if isinstance(event, MappingStartEvent) else None)
                if len(open_nodes) > limits.max_file_depth:
                    problems.append(ConfigProblem(Where(str(path), _line_of(event)), f"nested deeper than reload.max_file_depth ({limits.max_file_depth} levels)"))
                    return None
            elif isinstance(event, CollectionEndEvent):
                open_nodes.pop()
        return yaml.load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        problems.append(ConfigProblem(Where(str(path), line), f"invalid YAML: {exc.problem or exc.context}"))
        return None
    except ReaderError as exc:  # a character YAML does not allow, found before any token
        line = text.count("\n", 0, exc.position) + 1 if isinstance(exc.position, int) else 1
        problems.append(ConfigProblem(Where(str(path), line), f"invalid YAML: {exc.reason} (character {exc.character!r})"))
        return None
    except (YAMLError, ValueError, RecursionError, MemoryError) as exc:  # ruamel's errors besides marked ones
        problems.append(ConfigProblem(Where(str(path), 1), f"cannot read as YAML: {type(exc).__name__}: {exc}"))
        return None


def _line_of(event) -> int:
    return event.start_mark.line + 1 if event.start_mark is not None else 1


# ---------------------------------------------------------------- the whole configuration

_TOP_LEVEL = {
    "tcp": TcpSettings,
    "http": HttpSettings,
    "pipeline": PipelineSettings,
    "index": IndexSettings,
    "storage": StorageSettings,
    "reload": ReloadSettings,
    "shutdown": ShutdownSettings,
}
_MAIN_KEYS = (*_TOP_LEVEL, "sources", "backends", "routing")


def route_files(routes_dir: Path | None) -> list[Path]:
    """Drop-in files in lexical order. Hidden entries (a ConfigMap's ..data) are not matched."""
    if routes_dir is None or not routes_dir.is_dir():
        return []
    found = {p for pattern in ROUTE_FILE_PATTERNS for p in routes_dir.glob(pattern) if p.is_file()}
    return sorted(found, key=lambda p: p.name)


def load_config(config_path: Path | None, routes_dir: Path | None, environ=os.environ) -> SidecarConfig:
    """Read, validate and resolve the whole configuration, or raise ConfigError listing every
    problem. `config_path=None` means the embedded default."""
    from sidecar.backends import BackendTypeUnknown, backend_class

    problems: list[ConfigProblem] = []
    main_path = config_path or DEFAULT_CONFIG
    main = _read_yaml(main_path, problems)
    main_file = str(main_path)
    reader = DocumentReader(main_file, problems, environ)
    if main is None and not problems:
        main = CommentedMap()
    if main is not None and not isinstance(main, dict):
        reader.problem(reader.node_where(main), "the main config must be a mapping")
        main = None
    if main is None:
        raise ConfigError(problems)

    for key in main:
        if key not in _MAIN_KEYS:
            reader.problem(reader.key_where(main, key), f"unknown top-level key {key!r} (known keys: {', '.join(_MAIN_KEYS)})")

    sections = {}
    for key, cls in _TOP_LEVEL.items():
        node = main.get(key)
        try:
            sections[key] = reader.convert(cls, node, reader.value_where(main, key), key) if node is not None else cls()
        except _Invalid:
            sections[key] = cls()

    sources = _read_sources(reader, main, sections["tcp"])

    backends: dict[str, BackendDefinition] = {}
    broken_backends: set[str] = set()
    backends_node = main.get("backends") or CommentedMap()
    if not isinstance(backends_node, dict):
        reader.problem(reader.value_where(main, "backends"), "backends must be a mapping of name -> settings")
        backends_node = CommentedMap()
    for name, node in backends_node.items():
        where = reader.key_where(backends_node, name)
        if not isinstance(node, dict):
            reader.problem(where, f"backend {name!r} must be a mapping with at least a type")
            continue
        type_name = node.get("type")
        if not isinstance(type_name, str):
            reader.problem(where, f"backend {name!r} needs a type")
            continue
        try:
            backend_class(type_name)
        except BackendTypeUnknown as exc:
            reader.problem(reader.value_where(node, "type"), str(exc))
            continue
        delivery = DeliverySettings()
        delivery_node = CommentedMap((k, node[k]) for k in DELIVERY_KEYS if k in node)
        for k in DELIVERY_KEYS:
            if k in node:
                delivery_node.lc.add_kv_line_col(k, list(node.lc.data[k]))
        try:
            delivery = reader.build(DeliverySettings, delivery_node, where, f"backends.{name}")
        except _Invalid:
            pass
        delivery = _with_backend_defaults(delivery, backend_class(type_name), delivery_node)
        options = CommentedMap((k, v) for k, v in node.items() if k != "type" and k not in DELIVERY_KEYS)
        for k in options:
            options.lc.add_kv_line_col(k, list(node.lc.data[k]))
        definition = BackendDefinition(str(name), type_name, options, delivery, where)
        # Checked once here, at the backend's own lines; a rule then only adds its overrides.
        problems_before = len(problems)
        if _backend_spec(reader, definition, None, where) is not None and len(problems) == problems_before:
            backends[str(name)] = definition
        else:
            broken_backends.add(str(name))

    rule_nodes: list[tuple[DocumentReader, Any, Any]] = []
    if main.get("routing") is not None:
        rule_nodes.append((reader, main["routing"], reader.value_where(main, "routing")))
    files = [main_file]
    for path in route_files(routes_dir):
        files.append(str(path))
        document = _read_yaml(path, problems, sections["reload"])
        if document is None:
            continue
        rule_nodes.append((DocumentReader(str(path), problems, environ), document, Where(str(path), 1)))

    rules: list[Rule] = []
    order = 0
    for doc_reader, routing, where in rule_nodes:
        if not isinstance(routing, dict):
            doc_reader.problem(where, "routing must be a mapping of source -> list of rules")
            continue
        for source, rule_list in routing.items():
            source_where = doc_reader.key_where(routing, source)
            if not isinstance(source, str) or not source:
                doc_reader.problem(source_where, f"source key must be a non-empty string, got {source!r}")
                continue
            if not isinstance(rule_list, list):
                doc_reader.problem(source_where, f"rules for {source!r} must be a list")
                continue
            for index, rule_node in enumerate(rule_list):
                if isinstance(rule_node, dict) and rule_node.get("backend") in broken_backends:
                    continue  # its backend's own problem is reported already
                rule = _read_rule(doc_reader, backends, source, rule_node, doc_reader.item_where(rule_list, index), list(backends_node))
                if rule is not None:
                    rules.append((rule.priority, order, rule))
                    order += 1

    if problems:
        raise ConfigError(list(dict.fromkeys(problems)))
    ordered = tuple(rule for _priority, _order, rule in sorted(rules, key=lambda r: (r[0], r[1])))
    return SidecarConfig(
        sources=sources,
        http=sections["http"],
        pipeline=sections["pipeline"],
        index=sections["index"],
        storage=sections["storage"],
        reload=sections["reload"],
        shutdown=sections["shutdown"],
        backends=backends,
        rules=ordered,
        files=tuple(files),
    )


def _read_sources(reader: DocumentReader, main, tcp: TcpSettings) -> dict[str, SourceSpec]:
    """`sources:`, a map of name -> {type, settings}. The `tcp:` section is the source named
    `tcp`; with neither, that source listens on its defaults."""
    sources: dict[str, SourceSpec] = {}
    node = main.get("sources")
    if "tcp" in main or node is None:
        sources["tcp"] = SourceSpec("tcp", "tcp", tcp, reader.key_where(main, "tcp") if "tcp" in main else Where(reader.file, 1))
    if node is None:
        return sources
    if not isinstance(node, dict) or not node:
        reader.problem(reader.value_where(main, "sources"), "sources must be a mapping of name -> {type, ...settings}")
        return sources
    for name, settings_node in node.items():
        where = reader.key_where(node, name)
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            reader.problem(where, f"source name {name!r} must be letters, digits, '.', '_' or '-'")
            continue
        if name in sources:
            reader.problem(where, f"source {name!r} is defined twice (the `tcp:` section is the source named tcp)")
            continue
        if not isinstance(settings_node, dict):
            reader.problem(where, f"source {name!r} must be a mapping with at least a type")
            continue
        type_name = settings_node.get("type")
        try:
            cls = source_class(type_name) if isinstance(type_name, str) else None
        except SourceTypeUnknown as exc:
            reader.problem(reader.value_where(settings_node, "type"), str(exc))
            continue
        if cls is None:
            reader.problem(where, f"source {name!r} needs a type")
            continue
        options = CommentedMap((k, v) for k, v in settings_node.items() if k != "type")
        for k in options:
            options.lc.add_kv_line_col(k, list(settings_node.lc.data[k]))
        try:
            sources[name] = SourceSpec(name, type_name, reader.build(cls.Settings, options, where, f"sources.{name}"), where)
        except _Invalid:
            continue
    return sources


def _with_backend_defaults(delivery: DeliverySettings, cls, given: dict) -> DeliverySettings:
    """A backend type may tune the shared machinery's defaults (S3 wants large, slow batches);
    what the operator set still wins, key by key."""
    for section, values in getattr(cls, "delivery_defaults", {}).items():
        chosen = given.get(section) or {}
        current = getattr(delivery, section)
        delivery = attrs.evolve(delivery, **{section: attrs.evolve(current, **{k: v for k, v in values.items() if k not in chosen})})
    return delivery


_RULE_KEYS = ("backend", "enabled", "priority", "filter", "config")


def _read_rule(reader: DocumentReader, backends: dict, source: str, node, where: Where, all_names) -> Rule | None:
    if not isinstance(node, dict):
        reader.problem(where, f"a rule for {source!r} must be a mapping with a backend")
        return None
    ok = True
    for key in node:
        if key not in _RULE_KEYS:
            reader.problem(reader.key_where(node, key), f"unknown rule key {key!r} (known keys: {', '.join(_RULE_KEYS)})")
            ok = False
    name = node.get("backend")
    definition = backends.get(name) if isinstance(name, str) else None
    if definition is None:
        known = ", ".join(all_names) or "none defined"
        reader.problem(reader.value_where(node, "backend") if "backend" in node else where, f"rule for {source!r} names unknown backend {name!r} (backends: {known})")
        return None
    try:
        enabled = reader.convert(bool, node.get("enabled", True), reader.value_where(node, "enabled"), "enabled")
        priority = reader.convert(int, node.get("priority", 100), reader.value_where(node, "priority"), "priority")
        message_filter = _read_filter(reader, node.get("filter"), reader.value_where(node, "filter"))
    except _Invalid:
        return None
    overrides = node.get("config")
    if overrides is not None and not isinstance(overrides, dict):
        reader.problem(reader.value_where(node, "config"), "config must be a mapping of backend settings")
        return None
    spec = _backend_spec(reader, definition, overrides, reader.value_where(node, "config") if overrides else where)
    if spec is None or not ok:
        return None
    return Rule(source, definition.name, spec, enabled, priority, message_filter, where)


def _read_filter(reader: DocumentReader, node, where: Where) -> MessageFilter:
    if node is None:
        return MessageFilter()
    if not isinstance(node, dict):
        reader._fail(where, "filter must be a mapping with types, levels and/or names")
    values = {}
    for key, value in node.items():
        key_where = reader.key_where(node, key)
        if key not in ("types", "levels", "names"):
            reader._fail(key_where, f"unknown filter key {key!r} (known keys: types, levels, names)")
        items = reader.convert(tuple[str, ...], value, reader.value_where(node, key), f"filter.{key}")
        allowed = {"types": MESSAGE_TYPES, "levels": LEVELS}.get(key)
        if allowed is not None:
            wrong = [i for i in items if i not in allowed]
            if wrong:
                reader._fail(key_where, f"filter.{key}: unknown {', '.join(map(repr, wrong))} (known: {', '.join(sorted(allowed))})")
        values[key] = items
    return MessageFilter.build(**values)


def _backend_spec(reader: DocumentReader, definition: BackendDefinition, overrides, where: Where) -> BackendSpec | None:
    """The effective settings of a backend under one rule's `config` overrides (none: the
    backend's own settings). Problems are reported at the lines of the keys at fault."""
    from sidecar.backends import backend_class

    cls = backend_class(definition.type)
    overrides = overrides or {}
    override_items = tuple(sorted((str(k), _plain(v)) for k, v in overrides.items()))
    if cls is None:
        merged = {**definition.options, **overrides}
        options = UnavailableSettings(_plain(merged, lambda text: reader.interpolate(text, where)))
        return BackendSpec(definition.name, definition.type, options, definition.delivery, override_items)
    merged = CommentedMap({**definition.options, **overrides})
    for key in merged:
        origin = overrides if key in overrides else definition.options
        try:
            merged.lc.add_kv_line_col(key, list(origin.lc.data[key]))
        except (AttributeError, KeyError):
            pass
    label = f"backends.{definition.name}" if not overrides else f"{definition.name} config"
    try:
        settings = reader.build(cls.Settings, merged, where, label)
    except _Invalid:
        return None
    return BackendSpec(definition.name, cls.type_name, settings, definition.delivery, override_items)
