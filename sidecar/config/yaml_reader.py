"""Reading YAML with positions: every problem names the `file:line` it comes from.

`read_yaml` reads one file's document (round-trip nodes, which know their lines) after checking
its size and nesting; `DocumentReader` converts that document's nodes into attrs settings
classes, by their fields' types, and collects every problem instead of stopping at the first.
Strings may use `${NAME}` or `${NAME:-default}` to take values from the environment.
"""

import os
import re
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import attrs
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.events import AliasEvent, CollectionEndEvent, CollectionStartEvent, MappingStartEvent, ScalarEvent
from ruamel.yaml.reader import ReaderError

from sidecar.redaction import credential_shown, without_secrets
from sidecar.suggestions import did_you_mean
from sidecar.units import is_int, is_number, parse_bytesize, parse_duration


@attrs.frozen
class Where:
    """A place in a config file; `line` is 1-based."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@attrs.frozen
class ConfigProblem:
    # A message may quote the value at fault, which may hold a password: kept out of it.
    where: Where | None
    message: str = attrs.field(converter=without_secrets)

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


class ConfigError(Exception):
    """The configuration cannot be used; `problems` lists every reason with its place."""

    def __init__(self, problems: list[ConfigProblem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class Invalid(Exception):
    """A value could not be converted; its problem is recorded already."""


class Interpolated(str):
    """A string that came from `${...}`: equal to its value, displayed as its template."""

    template: str

    def __new__(cls, value: str, template: str):
        self = super().__new__(cls, value)
        self.template = template
        return self


def display_value(value, credential: bool = False) -> Any:
    """What may be shown of a setting (sidecar.redaction): templates instead of environment
    values, no passwords, tokens or credentials. The values of a mapping inside a setting (an
    otlp backend's `headers`, as a dict or as its pairs) are credentials: only their `${NAME}`
    references are shown. `credential`: `value` is one."""
    if isinstance(value, str):
        text = value.template if isinstance(value, Interpolated) else value
        return credential_shown(text) if credential else without_secrets(text)
    if isinstance(value, dict):
        return {str(k): display_value(v, True) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        if value and all(isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str) for v in value):
            return {k: display_value(v, True) for k, v in value}  # a mapping, as StringPairs or plain() hold it
        return [display_value(v, credential) for v in value]
    return "***" if credential and isinstance(value, (int, float)) and not isinstance(value, bool) else value


_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class DocumentReader:
    """Converts one YAML document's nodes into settings, collecting problems with their lines."""

    def __init__(self, file: str, problems: list[ConfigProblem], environ=os.environ):
        self.file = file
        self.problems = problems
        self.environ = environ

    def problem(self, where: Where | None, message: str) -> None:
        self.problems.append(ConfigProblem(where, message))

    def fail(self, where: Where, message: str):
        self.problem(where, message)
        raise Invalid

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
        """One scalar or nested value to `kind`; raises Invalid after recording a problem."""
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
            if marker == "mapping":
                if not isinstance(value, dict):
                    self.fail(where, f"{label} must be a mapping, got {_yaml_kind(value)}")
                return tuple((str(k), self.convert(str, v, self.value_where(value, k), f"{label}.{k}")) for k, v in value.items())
            return self.convert(base, value, where, label)
        if origin is Literal:
            choices = typing.get_args(kind)
            if value not in choices:
                self.fail(where, f"{label} must be one of {', '.join(map(str, choices))}, got {value!r}")
            return value
        if origin is tuple:
            if not isinstance(value, list):
                self.fail(where, f"{label} must be a list, got {_yaml_kind(value)}")
            (item_kind, _ellipsis) = typing.get_args(kind)
            return tuple(self.convert(item_kind, v, self.item_where(value, i), f"{label}[{i}]") for i, v in enumerate(value))
        if attrs.has(kind):
            if not isinstance(value, dict):
                self.fail(where, f"{label} must be a mapping, got {_yaml_kind(value)}")
            return self.build(kind, value, where, label)
        if kind is bool:
            if not isinstance(value, bool):
                self.fail(where, f"{label} must be true or false, got {value!r}")
            return value
        # ruamel.yaml's round-trip scalars are subclasses (ScalarInt, ScalarFloat): keep plain values.
        if kind is int:
            if not is_int(value):
                self.fail(where, f"{label} must be an integer, got {value!r}")
            return int(value)
        if kind is float:
            if not is_number(value):
                self.fail(where, f"{label} must be a number, got {value!r}")
            return float(value)
        if kind is str:
            if not isinstance(value, str):
                # YAML reads an unquoted 0660 as a number (and a leading zero may make it octal).
                hint = "; write it in quotes to keep it as written (\"0660\", not 0660)" if isinstance(value, (int, float)) and not isinstance(value, bool) else ""
                self.fail(where, f"{label} must be a string, got {_yaml_kind(value)}{hint}")
            return self.interpolate(str(value), where)
        if kind is Any:
            return plain(value)
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
                self.problem(self.key_where(mapping, key), f"unknown key {label}.{key} (known keys: {known}){did_you_mean(key, fields)}")
                ok = False
                continue
            value_at = self.value_where(mapping, key)
            try:
                converted = self.convert(field.type, value, value_at, f"{label}.{key}")
                if field.validator is not None:
                    field.validator(None, field, converted)
            except Invalid:
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
            raise Invalid
        try:
            return cls(**kwargs)
        except (ValueError, TypeError) as exc:
            self.problem(where, f"{label}: {_validator_message(exc)}")
            raise Invalid from None

    def _duration(self, value, where, label) -> float:
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.fail(where, f"{label} {exc}")

    def _bytesize(self, value, where, label) -> int:
        try:
            return parse_bytesize(value)
        except ValueError as exc:
            self.fail(where, f"{label} {exc}")


def _validator_message(exc: Exception) -> str:
    # attrs' comparison validators raise ValueError("'name' must be >= 1: 0"); keep it readable.
    return str(exc.args[0]) if exc.args else str(exc)


def _yaml_kind(value) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "null"
    # ruamel.yaml's scalars are subclasses (ScalarInt, ScalarFloat): name what YAML read.
    if isinstance(value, bool):
        return f"a boolean ({'true' if value else 'false'})"
    if isinstance(value, int):
        return f"an integer ({int(value)})"
    if isinstance(value, float):
        return f"a number ({float(value)!r})"
    return f"{type(value).__name__} {value!r}"


def plain(value, interpolate=None):
    """A hashable copy of free-form YAML data (for unavailable backends' options)."""
    if isinstance(value, dict):
        return tuple((str(k), plain(v, interpolate)) for k, v in value.items())
    if isinstance(value, list):
        return tuple(plain(v, interpolate) for v in value)
    if isinstance(value, str):
        return interpolate(str(value)) if interpolate is not None else str(value)
    if isinstance(value, bool) or value is None:
        return value
    if is_int(value):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return value


def submapping(mapping: CommentedMap, keys) -> CommentedMap:
    """The entries of `mapping` under `keys`, in that order, keeping their lines for problems."""
    part = CommentedMap((k, mapping[k]) for k in keys)
    for k in part:
        part.lc.add_kv_line_col(k, list(mapping.lc.data[k]))
    return part


def read_yaml(path: Path, problems: list[ConfigProblem], *, max_file_size: int, max_file_depth: int):
    """One YAML file's document, or None with its problem recorded. Its size and nesting are
    checked first, from its bytes and its event stream (which takes no stack), so no file can
    exhaust memory, time or the composer's recursion."""
    yaml = YAML(typ="rt")
    try:
        size = path.stat().st_size
        if size > max_file_size:
            problems.append(ConfigProblem(Where(str(path), 1), f"the file is {size:,} bytes, more than reload.max_file_size ({max_file_size:,})"))
            return None
        text = path.read_text(encoding="utf-8")
    except IsADirectoryError:
        problems.append(ConfigProblem(Where(str(path), 1), "cannot read: is a directory, not a config file"))
        return None
    except PermissionError:
        problems.append(ConfigProblem(Where(str(path), 1), f"cannot read: permission denied (the sidecar runs as uid {os.getuid()}): make the file readable for it"))
        return None
    except OSError as exc:
        problems.append(ConfigProblem(Where(str(path), 1), f"cannot read: {exc.strerror.lower() if exc.strerror else exc}"))
        return None
    except UnicodeDecodeError as exc:
        line = exc.object.count(b"\n", 0, exc.start) + 1
        problems.append(ConfigProblem(Where(str(path), line), f"cannot read: not UTF-8 text (byte 0x{exc.object[exc.start]:02x}): save the file as UTF-8"))
        return None
    try:
        structure_problem = _structure_problem(yaml, text, str(path), max_file_depth)
        if structure_problem is not None:
            problems.append(structure_problem)
            return None
        return yaml.load(text)
    except MarkedYAMLError as exc:
        raw = exc.problem or exc.context
        explained = _explain(exc)
        # An unclosed quote is found at the end of the file; it began where the scalar did.
        mark = exc.context_mark if raw == "found unexpected end of stream" and exc.context_mark else exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        message = f"invalid YAML: {explained} (the parser says: {raw})" if explained else f"invalid YAML: {raw}"
        problems.append(ConfigProblem(Where(str(path), line), message))
        return None
    except ReaderError as exc:  # a character YAML does not allow, found before any token
        line = text.count("\n", 0, exc.position) + 1 if isinstance(exc.position, int) else 1
        problems.append(ConfigProblem(Where(str(path), line), f"invalid YAML: {exc.reason} (character {exc.character!r})"))
        return None
    except (YAMLError, ValueError, RecursionError, MemoryError) as exc:  # ruamel's errors besides marked ones
        problems.append(ConfigProblem(Where(str(path), 1), f"cannot read as YAML: {type(exc).__name__}: {exc}"))
        return None


_INDENTATION = "the indentation of this line does not match the lines above: a key or '- ' item is indented less or more than the others at its level"


def _explain(exc: MarkedYAMLError) -> str | None:
    """What the parser's complaint means in plain words, for the mistakes people make; None
    when its own words are plain already (a duplicate key) or the case is not one of those."""
    problem = exc.problem or ""
    if problem.startswith("expected <block end>, but found"):
        if problem.endswith("'<scalar>'"):
            return "a value that begins with '{', '[' or a quote goes on after it closes: quote the whole value (e.g. \"{source}.jsonl\")"
        return _INDENTATION
    if problem == "mapping values are not allowed here":
        return "a ':' where no key can begin: this line is indented more than it should be, the line above lacks its ':', or a value holding ': ' needs quotes"
    if problem.startswith("found character '\\t'"):
        return "a tab: YAML indents with spaces only"
    if problem.startswith("found character") and "cannot start any token" in problem:
        return f"a value cannot begin with {problem.split()[2]} unquoted: put it in quotes"
    if problem == "found unexpected end of stream" and exc.context == "while scanning a quoted scalar":
        return "a quote opened here is never closed"
    if problem.startswith(("expected ',' or", "expected the node content, but found '<stream end>'")) or exc.context in ("while parsing a flow mapping", "while parsing a flow sequence"):
        return "a '[' or '{' is not closed, or an inline list or mapping lacks a ','; a value with {placeholders} needs quotes"
    if problem.startswith("found undefined alias"):
        return "a value beginning with '*' is an alias, and no anchor ('&name') of that name comes before it: quote it if it is text"
    if problem == "could not find expected ':'":
        return "a line that is neither 'key: value' nor '- item': a ':' missing, or a quoted value going on past its line"
    if problem.startswith("did not find expected key") or problem.startswith("did not find expected '-' indicator"):
        return _INDENTATION
    return None


def _structure_problem(yaml: YAML, text: str, file: str, max_file_depth: int) -> ConfigProblem | None:
    """What in the event stream would break composing the document: nesting deeper than
    `max_file_depth`, or a mapping or list used as a key. None when there is neither."""
    # Per open collection: for a mapping, how many nodes it has had (an even count means the
    # next is a key); None for a sequence.
    open_nodes: list[int | None] = []
    collection_anchors = set()
    for event in yaml.parse(text):
        is_node = isinstance(event, (CollectionStartEvent, ScalarEvent, AliasEvent))
        if is_node and open_nodes and open_nodes[-1] is not None:
            collection_key = isinstance(event, CollectionStartEvent) or (isinstance(event, AliasEvent) and event.anchor in collection_anchors)
            if open_nodes[-1] % 2 == 0 and collection_key:
                # ruamel would raise TypeError (unhashable) while composing it
                return ConfigProblem(Where(file, _line_of(event)), "invalid YAML: a key must be a string or a number, not a mapping or a list")
            open_nodes[-1] += 1
        if isinstance(event, CollectionStartEvent):
            if event.anchor is not None:
                collection_anchors.add(event.anchor)
            open_nodes.append(0 if isinstance(event, MappingStartEvent) else None)
            if len(open_nodes) > max_file_depth:
                return ConfigProblem(Where(file, _line_of(event)), f"nested deeper than reload.max_file_depth ({max_file_depth} levels)")
        elif isinstance(event, CollectionEndEvent):
            open_nodes.pop()
    return None


def _line_of(event) -> int:
    return event.start_mark.line + 1 if event.start_mark is not None else 1
