"""Building a SidecarConfig from the main file, the routes.d/ drop-ins and the environment.

`load_config` reads the sections in order (top-level settings, sources, backends, then the rules
of the main file's `routing:` and of every drop-in), collects every problem with its `file:line`
and raises them together as one ConfigError.
"""

import os
import re
from pathlib import Path
from typing import Any

import attrs
from ruamel.yaml.comments import CommentedMap

from sidecar.aggregate import AggregateSettings, AggregateSpec
from sidecar.backends import BackendTypeUnknown, backend_class
from sidecar.config.settings import (
    DELIVERY_KEYS,
    BackendSpec,
    DeliverySettings,
    HttpSettings,
    IndexSettings,
    MessageFilter,
    PipelineSettings,
    ReloadSettings,
    Rule,
    SecuritySettings,
    ShutdownSettings,
    SidecarConfig,
    SourceSpec,
    StorageSettings,
    UnavailableSettings,
    instance_label,
)
from sidecar.config.exposure import exposures
from sidecar.config.yaml_reader import ConfigError, DocumentReader, Invalid, Where, plain, read_yaml, submapping
from sidecar.constants import LEVELS, MESSAGE_TYPES
from sidecar.sources import SourceTypeUnknown, source_class
from sidecar.sources.base import SettingsFromEnvironment
from sidecar.sources.tcp import TcpSettings
from sidecar.suggestions import did_you_mean
from sidecar.transforms import TRANSFORM_TYPES, TransformSpec, TransformTypeUnknown, transform_class
from sidecar.transforms.filter import FILTER_KEYS


ROUTE_FILE_PATTERNS = ("*.yaml", "*.yml")
DEFAULT_CONFIG = Path(__file__).parent.parent / "default.yaml"

_TOP_LEVEL = {
    "tcp": TcpSettings,
    "http": HttpSettings,
    "pipeline": PipelineSettings,
    "index": IndexSettings,
    "storage": StorageSettings,
    "reload": ReloadSettings,
    "shutdown": ShutdownSettings,
    "security": SecuritySettings,
}
_MAIN_KEYS = (*_TOP_LEVEL, "sources", "backends", "transforms", "aggregate", "routing")
_RULE_KEYS = ("backend", "enabled", "priority", "filter", "config")


@attrs.frozen
class BackendDefinition:
    """One entry of `backends:`: its own settings are checked, and each rule naming it resolves
    them again under the rule's `config` overrides."""

    name: str
    type: str
    options: dict = attrs.field(eq=False)  # raw options, for merging with rule overrides
    delivery: DeliverySettings
    where: Where


@attrs.frozen
class _Backends:
    """What `backends:` defines, as the rules need it."""

    defined: dict  # name -> BackendDefinition, for those without problems
    broken: set  # names whose settings have problems (reported at their own lines)
    names: list  # every name given, for the message about an unknown one


def route_files(routes_dir: Path | None) -> list[Path]:
    """Drop-in files in lexical order: `*.yaml` and `*.yml`, symlinks followed (a mounted
    ConfigMap's `key -> ..data/key`). Hidden names are skipped, which pathlib's glob would match:
    the ConfigMap's `..data` and timestamped directories, an editor's or a writer's temporary
    files; so is a symlink that points nowhere (a key the kubelet is adding or removing)."""
    if routes_dir is None or not routes_dir.is_dir():
        return []
    found = {p for pattern in ROUTE_FILE_PATTERNS for p in routes_dir.glob(pattern) if not p.name.startswith(".") and p.is_file()}
    return sorted(found, key=lambda p: p.name)


def load_config(config_path: Path | None, routes_dir: Path | None, environ=os.environ) -> SidecarConfig:
    """Read, validate and resolve the whole configuration, or raise ConfigError listing every
    problem. `config_path=None` means the embedded default."""
    main_path = config_path or DEFAULT_CONFIG
    reader = DocumentReader(str(main_path), [], environ)
    main = _read_main(reader, main_path)
    sections = _read_sections(reader, main)
    sources = _read_sources(reader, main, sections["tcp"])
    _refuse_exposures(reader, main, sources, sections["security"])
    backends = _read_backends(reader, main)
    documents, files = _routing_documents(reader, main, routes_dir, sections["reload"])
    steps: list[_SourceSteps] = []  # the transforms and aggregate steps of routing entries
    rules = _read_routing(documents, backends, steps)
    transforms = _read_transforms(reader, main, steps)
    aggregate = _read_aggregate(reader, main, steps)
    if reader.problems:
        raise ConfigError(list(dict.fromkeys(reader.problems)))
    return SidecarConfig(
        sources=sources,
        http=sections["http"],
        pipeline=sections["pipeline"],
        index=sections["index"],
        storage=sections["storage"],
        reload=sections["reload"],
        shutdown=sections["shutdown"],
        backends=backends.defined,
        rules=rules,
        files=tuple(files),
        transforms=transforms,
        aggregate=aggregate,
        security=sections["security"],
    )


def _read_main(reader: DocumentReader, path: Path) -> CommentedMap:
    """The main file's mapping, its unknown top-level keys reported; raises ConfigError when
    there is nothing to read further."""
    # The main file is held to the default limits: its own reload: section is not read yet.
    limits = ReloadSettings()
    main = read_yaml(path, reader.problems, max_file_size=limits.max_file_size, max_file_depth=limits.max_file_depth)
    if main is None and not reader.problems:  # an empty file
        main = CommentedMap()
    if main is not None and not isinstance(main, dict):
        reader.problem(reader.node_where(main), "the main config must be a mapping")
        main = None
    if main is None:
        raise ConfigError(reader.problems)
    for key in main:
        if key not in _MAIN_KEYS:
            reader.problem(reader.key_where(main, key), f"unknown top-level key {key!r} (known keys: {', '.join(_MAIN_KEYS)}){did_you_mean(key, _MAIN_KEYS)}")
    return main


def _read_sections(reader: DocumentReader, main) -> dict[str, Any]:
    """The top-level settings sections by key; one with problems counts as its defaults, so the
    rest of the file is still checked."""
    sections = {}
    for key, cls in _TOP_LEVEL.items():
        node = main.get(key)
        try:
            sections[key] = reader.convert(cls, node, reader.value_where(main, key), key) if node is not None else cls()
        except Invalid:
            sections[key] = cls()
    return sections


def _read_sources(reader: DocumentReader, main, tcp: TcpSettings) -> dict[str, SourceSpec]:
    """`sources:`, a map of name -> {type, settings}. The `tcp:` section is the source named
    `tcp`; with neither, that source listens on its defaults."""
    sources: dict[str, SourceSpec] = {}
    node = main.get("sources")
    if "tcp" in main or node is None:
        where = reader.key_where(main, "tcp") if "tcp" in main else Where(reader.file, 1)
        tcp_node = main.get("tcp")
        resolved = _from_environment(reader, tcp, tcp_node if isinstance(tcp_node, dict) else {}, where, "tcp")
        sources["tcp"] = SourceSpec("tcp", "tcp", resolved or tcp, where)
    if node is None:
        return sources
    if not isinstance(node, dict) or not node:
        reader.problem(reader.value_where(main, "sources"), "sources must be a mapping of name -> {type, ...settings}")
        return sources
    for name, settings_node in node.items():
        where = reader.key_where(node, name)
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            reader.problem(where, f"source name {name!r} must be letters, digits, '.', '_' or '-'")
        elif name in sources:
            reader.problem(where, f"source {name!r} is defined twice (the `tcp:` section is the source named tcp)")
        else:
            source = _read_source(reader, name, settings_node, where)
            if source is not None:
                sources[name] = source
    return sources


def _refuse_exposures(reader: DocumentReader, main, sources: dict[str, SourceSpec], security: SecuritySettings) -> None:
    """With security.require_auth_beyond_loopback, each source open beyond loopback without
    authentication is a problem at its host setting's line (without it, `check` and `run`
    warn of them: sidecar.config.exposure)."""
    if not security.require_auth_beyond_loopback:
        return
    settings = {name: spec.settings for name, spec in sources.items()}
    for exposure in exposures(settings):
        if "tcp" in main and exposure.source == "tcp":
            section, label, fix = main.get("tcp"), "tcp.host", "set tcp.tls with client_ca, use a Unix socket (tcp.unix), or bind tcp.host to 127.0.0.1"
        else:
            section, label, fix = main["sources"][exposure.source], f"sources.{exposure.source}.host", "set its tls with client_ca (or its token or shared key), use a Unix socket (unix:), or bind it to 127.0.0.1"
        reader.problem(
            reader.value_where(section, "host"),
            f"{label}: {exposure.what} would listen on {exposure.address}, beyond loopback, without authentication, and security.require_auth_beyond_loopback is true: {fix}",
        )


def _read_source(reader: DocumentReader, name: str, node, where: Where) -> SourceSpec | None:
    """One entry of `sources:`, read into its type's Settings; None after a problem."""
    if not isinstance(node, dict):
        reader.problem(where, f"source {name!r} must be a mapping with at least a type")
        return None
    type_name = node.get("type")
    try:
        cls = source_class(type_name) if isinstance(type_name, str) else None
    except SourceTypeUnknown as exc:
        reader.problem(reader.value_where(node, "type"), str(exc))
        return None
    if cls is None:
        reader.problem(where, f"source {name!r} needs a type")
        return None
    options = submapping(node, [k for k in node if k != "type"])
    try:
        settings = reader.build(cls.Settings, options, where, f"sources.{name}")
    except Invalid:
        return None
    settings = _from_environment(reader, settings, node, where, f"sources.{name}")
    return SourceSpec(name, type_name, settings, where) if settings is not None else None


def _from_environment(reader: DocumentReader, settings, node: dict, where: Where, label: str):
    """A source's settings with the secrets they name read from the environment; None after a
    problem, reported at the line of the key at fault."""
    if not hasattr(settings, "from_environment"):
        return settings
    try:
        return settings.from_environment(reader.environ)
    except SettingsFromEnvironment as exc:
        reader.problem(reader.value_where(node, exc.key) if exc.key in node else where, f"{label}.{exc}")
        return None


def _read_backends(reader: DocumentReader, main) -> _Backends:
    """`backends:`, a map of name -> {type, delivery settings, the type's own settings}."""
    node = main.get("backends") or CommentedMap()
    if not isinstance(node, dict):
        reader.problem(reader.value_where(main, "backends"), "backends must be a mapping of name -> settings")
        node = CommentedMap()
    backends = _Backends(defined={}, broken=set(), names=list(node))
    for name, backend_node in node.items():
        definition = _read_backend(reader, name, backend_node, reader.key_where(node, name))
        if definition is None:
            continue
        # Checked once here, at the backend's own lines; a rule then only adds its overrides.
        problems_before = len(reader.problems)
        if _backend_spec(reader, definition, None, definition.where) is not None and len(reader.problems) == problems_before:
            backends.defined[str(name)] = definition
        else:
            backends.broken.add(str(name))
    return backends


def _read_backend(reader: DocumentReader, name, node, where: Where) -> BackendDefinition | None:
    """One entry of `backends:`, its delivery settings read and the rest kept raw; None when it
    is not a mapping with a known type."""
    if not isinstance(node, dict):
        reader.problem(where, f"backend {name!r} must be a mapping with at least a type")
        return None
    type_name = node.get("type")
    if not isinstance(type_name, str):
        reader.problem(where, f"backend {name!r} needs a type")
        return None
    try:
        cls = backend_class(type_name)
    except BackendTypeUnknown as exc:
        reader.problem(reader.value_where(node, "type"), str(exc))
        return None
    delivery_node = submapping(node, [k for k in DELIVERY_KEYS if k in node])
    try:
        delivery = reader.build(DeliverySettings, delivery_node, where, f"backends.{name}")
    except Invalid:
        delivery = DeliverySettings()
    delivery = _with_backend_defaults(delivery, cls, delivery_node)
    options = submapping(node, [k for k in node if k != "type" and k not in DELIVERY_KEYS])
    return BackendDefinition(str(name), type_name, options, delivery, where)


def _with_backend_defaults(delivery: DeliverySettings, cls, given: dict) -> DeliverySettings:
    """A backend type may tune the shared machinery's defaults (S3 wants large, slow batches);
    what the operator set still wins, key by key."""
    for section, values in getattr(cls, "delivery_defaults", {}).items():
        chosen = given.get(section) or {}
        current = getattr(delivery, section)
        delivery = attrs.evolve(delivery, **{section: attrs.evolve(current, **{k: v for k, v in values.items() if k not in chosen})})
    return delivery


def _routing_documents(reader: DocumentReader, main, routes_dir: Path | None, limits: ReloadSettings) -> tuple[list, list[str]]:
    """The routing documents, each with its reader and place: the main file's `routing:`, then
    every drop-in in order; and every file read, main file first."""
    documents: list[tuple[DocumentReader, Any, Where, bool]] = []  # ..., whether a drop-in
    if main.get("routing") is not None:
        documents.append((reader, main["routing"], reader.value_where(main, "routing"), False))
    files = [reader.file]
    for path in route_files(routes_dir):
        files.append(str(path))
        document = read_yaml(path, reader.problems, max_file_size=limits.max_file_size, max_file_depth=limits.max_file_depth)
        if document is not None:
            documents.append((DocumentReader(str(path), reader.problems, reader.environ), document, Where(str(path), 1), True))
    return documents, files


@attrs.frozen
class _SourceSteps:
    """A routing entry's `transforms:` or `aggregate:` (the mapping form of a source key's
    entry), read with the sections of the same name after the main file's own."""

    reader: DocumentReader
    section: str  # "transforms" or "aggregate"
    source: str
    steps: Any  # the node: a list of steps, checked where it is read
    where: Where


# A source key's entry in routing is a list of rules, or a mapping of these.
_ENTRY_KEYS = ("routes", "transforms", "aggregate")


def _read_routing(documents: list, backends: _Backends, steps: list[_SourceSteps]) -> tuple[Rule, ...]:
    """Every rule of every routing document, by priority; the sort is stable, so rules of equal
    priority keep the order of the files and of their lines. The entries' steps go to `steps`."""
    rules: list[Rule] = []
    for reader, routing, where, drop_in in documents:
        rules.extend(_read_routing_document(reader, routing, where, backends, drop_in, steps))
    return tuple(sorted(_numbered(rules), key=lambda rule: rule.priority))


def _numbered(rules: list[Rule]) -> list[Rule]:
    """The rules with each backend instance's label unique: the second and later instances
    whose labels would be equal (one backend, different values for the same keys) get `#2`,
    `#3`, ... in the order their rules are read, so adding a rule after them renames none."""
    labels: dict[tuple, str] = {}  # (name, overrides): the instance's label
    taken: set[str] = set()
    numbered = []
    for rule in rules:
        key = (rule.spec.name, rule.spec.overrides)
        if key not in labels:
            base = label = instance_label(rule.spec.name, rule.spec.overrides)
            number = 1
            while label in taken:
                number += 1
                label = f"{base}#{number}"
            labels[key] = label
            taken.add(label)
        numbered.append(attrs.evolve(rule, spec=attrs.evolve(rule.spec, label=labels[key])))
    return numbered


def _read_routing_document(reader: DocumentReader, routing, where: Where, backends: _Backends, drop_in: bool = False, steps: list | None = None) -> list[Rule]:
    """One mapping of source key -> its entry: the main file's `routing:`, or a drop-in. An
    entry is a list of rules, or a mapping with `routes` (that list), `transforms` and
    `aggregate` (lists of steps, as in the sections of those names)."""
    if not isinstance(routing, dict):
        reader.problem(where, "routing must be a mapping of source -> list of rules" + ("; a drop-in is that mapping itself, e.g. `svc: [{backend: files}]`" if drop_in else ""))
        return []
    rules = []
    for source, rule_list in routing.items():
        source_where = reader.key_where(routing, source)
        if not isinstance(source, str) or not source:
            reader.problem(source_where, f"source key must be a non-empty string, got {source!r}")
            continue
        if isinstance(rule_list, dict) and "backend" not in rule_list and any(key in _ENTRY_KEYS for key in rule_list):
            for key in rule_list:
                if key not in _ENTRY_KEYS:
                    reader.problem(reader.key_where(rule_list, key), f"unknown key {key!r} in the entry of {source!r} (an entry is a list of rules, or a mapping of {', '.join(_ENTRY_KEYS)}){did_you_mean(key, _ENTRY_KEYS)}")
            for section in ("transforms", "aggregate"):
                if section in rule_list and steps is not None:
                    steps.append(_SourceSteps(reader, section, source, rule_list[section], reader.key_where(rule_list, section)))
            if "routes" not in rule_list:
                continue
            source_where = reader.key_where(rule_list, "routes")
            rule_list = rule_list["routes"]
        if not isinstance(rule_list, list):
            reader.problem(source_where, f"rules for {source!r} must be a list{_rules_hint(source, rule_list, drop_in)}")
            continue
        for index, rule_node in enumerate(rule_list):
            if isinstance(rule_node, dict) and isinstance(rule_node.get("backend"), str) and rule_node["backend"] in backends.broken:
                continue  # its backend's own problem is reported already
            rule = _read_rule(reader, backends, source, rule_node, reader.item_where(rule_list, index))
            if rule is not None:
                rules.append(rule)
    return rules


def _rules_hint(source: str, node, drop_in: bool) -> str:
    """What a source key whose rules are not a list most likely meant."""
    if source == "routing" and isinstance(node, dict):
        if drop_in:
            return "; drop-ins hold the routing mapping at their top level, without `routing:` (source -> list of rules)"
        return "; `routing:` is written once, with source -> list of rules under it"
    if drop_in and source in _MAIN_KEYS and isinstance(node, dict):
        return f"; `{source}:` belongs in the main config file, a drop-in holds only source -> list of rules"
    if isinstance(node, dict) and "backend" in node:
        return f"; write each rule as a list item: `{source}: [{{backend: ...}}]`, or `- backend: ...` on the line below"
    return ""


def _near_backend_key(node: dict) -> str:
    """A misspelt `backend:` (`backends:`, `backnd:`) is reported as an unknown key already;
    the missing-backend problem points at it too."""
    for key in node:
        if did_you_mean(key, ("backend",)):
            return f"; is {key!r} meant to be `backend`?"
    return ""


def _read_rule(reader: DocumentReader, backends: _Backends, source: str, node, where: Where) -> Rule | None:
    if not isinstance(node, dict):
        reader.problem(where, f"a rule for {source!r} must be a mapping with a backend")
        return None
    ok = True
    for key in node:
        if key not in _RULE_KEYS:
            reader.problem(reader.key_where(node, key), f"unknown rule key {key!r} (known keys: {', '.join(_RULE_KEYS)}){did_you_mean(key, _RULE_KEYS)}")
            ok = False
    name = node.get("backend")
    definition = backends.defined.get(name) if isinstance(name, str) else None
    if definition is None:
        known = ", ".join(map(str, backends.names)) or "none defined"
        if "backend" not in node:
            reader.problem(where, f"rule for {source!r} has no `backend:` key: add one naming the backend it sends to (backends: {known}){_near_backend_key(node)}")
        elif name is None:
            reader.problem(reader.key_where(node, "backend"), f"rule for {source!r} has an empty `backend:`: name the backend it sends to (backends: {known})")
        else:
            reader.problem(reader.value_where(node, "backend"), f"rule for {source!r} names unknown backend {name!r} (backends: {known}){did_you_mean(name, backends.names)}")
        return None
    try:
        enabled = reader.convert(bool, node.get("enabled", True), reader.value_where(node, "enabled"), "enabled")
        priority = reader.convert(int, node.get("priority", 100), reader.value_where(node, "priority"), "priority")
        message_filter = _read_filter(reader, node.get("filter"), reader.value_where(node, "filter"))
    except Invalid:
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
        reader.fail(where, "filter must be a mapping with types, levels, names and/or aggregated")
    values = {}
    for key, value in node.items():
        key_where = reader.key_where(node, key)
        if key not in FILTER_KEYS:
            reader.fail(key_where, f"unknown filter key {key!r} (known keys: {', '.join(FILTER_KEYS)}){did_you_mean(key, FILTER_KEYS)}")
        if key == "aggregated":
            values[key] = reader.convert(bool, value, reader.value_where(node, key), f"filter.{key}")
            continue
        items = reader.convert(tuple[str, ...], value, reader.value_where(node, key), f"filter.{key}")
        allowed = {"types": MESSAGE_TYPES, "levels": LEVELS}.get(key)
        if allowed is not None:
            wrong = [i for i in items if i not in allowed]
            if wrong:
                reader.fail(key_where, f"filter.{key}: unknown {', '.join(map(repr, wrong))} (known: {', '.join(sorted(allowed))}){did_you_mean(wrong[0], allowed)}")
        values[key] = items
    return MessageFilter.build(**values)


def _steps_by_source_key(reader: DocumentReader, main, section: str, more: list[_SourceSteps], example: str | None = None):
    """The steps of a section that maps source keys to lists of steps (`transforms:`,
    `aggregate:`), then those of the routing entries (`more`), as (their reader, source key,
    position from 1 among that key's steps, step node, its Where); shape problems are reported
    at their lines and skip what they concern."""
    entries: list[tuple[DocumentReader, str, Any, Where]] = []
    node = main.get(section)
    if node is not None and not isinstance(node, dict):
        reader.problem(reader.value_where(main, section), f"{section} must be a mapping of source key -> list of steps")
    elif node is not None:
        for source, steps in node.items():
            entries.append((reader, source, steps, reader.key_where(node, source)))
    entries.extend((s.reader, s.source, s.steps, s.where) for s in more if s.section == section)
    positions: dict[str, int] = {}
    for entry_reader, source, steps, source_where in entries:
        if not isinstance(source, str) or not source:
            entry_reader.problem(source_where, f"source key must be a non-empty string, got {source!r}")
        elif not isinstance(steps, list):
            entry_reader.problem(source_where, f"{section} for {source!r} must be a list of steps" + (f", each a mapping like {example}" if example else ""))
        else:
            for index, step in enumerate(steps):
                positions[source] = positions.get(source, 0) + 1
                yield entry_reader, source, positions[source], step, entry_reader.item_where(steps, index)


def _read_transforms(reader: DocumentReader, main, more: list[_SourceSteps]) -> tuple[TransformSpec, ...]:
    """`transforms:`, source key -> the list of steps for it, each `{type: NAME, ...settings}`."""
    steps = _steps_by_source_key(reader, main, "transforms", more)
    return tuple(spec for step_reader, source, _position, step, where in steps if (spec := _read_transform(step_reader, source, step, where)) is not None)


def _read_transform(reader: DocumentReader, source: str, node, where: Where) -> TransformSpec | None:
    if not isinstance(node, dict) or not isinstance(node.get("type"), str):
        reader.problem(where, f"a transform step for {source!r} must be a mapping with a type (known types: {', '.join(sorted(TRANSFORM_TYPES))})")
        return None
    try:
        cls = transform_class(node["type"])
    except TransformTypeUnknown as exc:
        reader.problem(reader.value_where(node, "type"), str(exc))
        return None
    try:
        settings = reader.build(cls.Settings, node, where, f"transforms.{source}.{cls.type_name}", extra_keys=("type",))
    except Invalid:
        return None
    return TransformSpec(source, cls.type_name, settings, where)


def _read_aggregate(reader: DocumentReader, main, more: list[_SourceSteps]) -> tuple[AggregateSpec, ...]:
    """`aggregate:`, source key -> the list of aggregate steps for it (sidecar.aggregate)."""
    specs = []
    for step_reader, source, position, step, where in _steps_by_source_key(reader, main, "aggregate", more, "{metrics: [NAME, ...], window: 60s}"):
        if not isinstance(step, dict):
            step_reader.problem(where, f"an aggregate step for {source!r} must be a mapping like {{metrics: [NAME, ...], window: 60s}}")
            continue
        try:
            settings = step_reader.build(AggregateSettings, step, where, f"aggregate.{source}")
        except Invalid:
            continue
        specs.append(AggregateSpec(source, settings, where, position))
    return tuple(specs)


def _backend_spec(reader: DocumentReader, definition: BackendDefinition, overrides, where: Where) -> BackendSpec | None:
    """The effective settings of a backend under one rule's `config` overrides (none: the
    backend's own settings). Problems are reported at the lines of the keys at fault."""
    cls = backend_class(definition.type)
    overrides = overrides or {}
    override_items = tuple(sorted((str(k), plain(v)) for k, v in overrides.items()))
    if cls is None:
        merged = {**definition.options, **overrides}
        options = UnavailableSettings(plain(merged, lambda text: reader.interpolate(text, where)))
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
    except Invalid:
        return None
    return BackendSpec(definition.name, cls.type_name, settings, definition.delivery, override_items)
