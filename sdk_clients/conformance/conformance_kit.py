"""Machinery of the SDK conformance suite: the language table, a capture server, the wire
parser, the schema check and the matcher of scenario expectations.

Imported by test_conformance.py (beside this file); kept free of pytest fixtures and of any
conftest so the suite runs alone or together with the repository's tests/.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import re
import selectors
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
SCHEMA_PATH = HERE / "schema" / "wire-protocol-v1.schema.json"
SCENARIO_DIR = HERE / "scenarios"

# Variables the suite controls: never inherited from the environment pytest runs in.
CONTROLLED_ENV = ("MONITORING_SIDECAR", "MONITORING_SIDECAR_TOKEN", "MONITORING_SOURCE", "MONITORING_CONTEXT", "TRACEPARENT", "TRACESTATE")
# How a driver reaches its sidecar: every scenario is replayed over each.
TRANSPORTS = ("tcp", "unix")
DRIVER_TIMEOUT = float(os.environ.get("CONFORMANCE_DRIVER_TIMEOUT", "60"))
API_CALLS = ("set_context", "log_event", "log_metric", "log_progress", "log_resource", "start_span", "end_span")
SUITE_CALLS = API_CALLS + ("print_env",)


# -- languages ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Language:
    name: str
    sdk_dir: str  # relative to the repository root; absent -> the language is skipped
    driver: str  # the file that must exist (and be executable when run directly)
    interpreter: str | None  # program to run it with, looked up in PATH; None: run the driver itself
    build_hint: str = ""

    def command(self) -> list[str]:
        if self.interpreter == "python":
            return [sys.executable, self.driver]
        return [self.interpreter, self.driver] if self.interpreter else [str(REPO / self.driver)]

    def present(self) -> bool:
        return (REPO / self.sdk_dir).is_dir()

    def problem(self) -> str | None:
        """Why this language's driver cannot run, or None. Only meaningful when present()."""
        path = REPO / self.driver
        hint = f" ({self.build_hint})" if self.build_hint else ""
        if not path.is_file():
            return f"{self.name}: sdk_clients/{self.sdk_dir.split('/')[-1]}/ exists but its conformance driver {self.driver} is missing or not built{hint}; see sdk_clients/conformance/DRIVERS.md"
        if self.interpreter is None and not os.access(path, os.X_OK):
            return f"{self.name}: conformance driver {self.driver} is not executable{hint}"
        if self.interpreter not in (None, "python") and not _which(self.interpreter):
            return f"{self.name}: the SDK is present but '{self.interpreter}' is not installed (needed to run {self.driver})"
        return None


def _which(program: str) -> str | None:
    for directory in os.environ.get("PATH", os.defpath).split(os.pathsep):
        candidate = os.path.join(directory, program)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


LANGUAGES = [
    Language("perl", "sdk_clients/perl", "sdk_clients/perl/t/bin/conformance-driver.pl", "perl"),
    Language("python", "sdk_clients/python", "sdk_clients/python/conformance_driver.py", "python"),
    Language("c", "sdk_clients/c", "sdk_clients/c/build/conformance-driver", None, "built by `make -C sdk_clients/c`"),
    Language("java", "sdk_clients/java", "sdk_clients/java/conformance-driver.sh", None,
             "it runs the compiled driver class, built by the Makefile before the suite"),
    Language("r", "sdk_clients/r", "sdk_clients/r/conformance-driver.R", "Rscript"),
]


# -- scenarios ------------------------------------------------------------------------------------

def load_scenarios() -> list[dict]:
    scenarios = []
    for path in sorted(SCENARIO_DIR.glob("*.json")):
        scenario = json.loads(path.read_text(encoding="utf-8"))
        scenario["_path"] = path
        scenarios.append(scenario)
    return scenarios


def scenario_problems(scenario: dict) -> list[str]:
    """Structural problems of a scenario file (the suite's own self-check)."""
    problems = []
    path = scenario.get("_path")
    if path is not None and scenario.get("name") != path.stem:
        problems.append(f"name {scenario.get('name')!r} differs from the file name {path.stem!r}")
    for key in ("name", "description", "source", "calls", "expect"):
        if key not in scenario:
            problems.append(f"missing key {key!r}")
    for variable in ("MONITORING_SIDECAR", "MONITORING_SIDECAR_TOKEN"):
        if variable in scenario.get("env", {}):
            problems.append(f"env must not set {variable} (the suite sets it{': use the key token' if 'TOKEN' in variable else ''})")
    if "token" in scenario and not (isinstance(scenario["token"], str) and scenario["token"]):
        problems.append("token must be a non-empty string")
    problems += _calls_problems(scenario.get("calls", []), "calls")
    child = scenario.get("child")
    if child is not None:
        for key in ("source", "env_from_stdout", "calls", "expect"):
            if key not in child:
                problems.append(f"child: missing key {key!r}")
        problems += _calls_problems(child.get("calls", []), "child.calls")
        lines = len(scenario.get("expect_stdout", []))
        for var, index in child.get("env_from_stdout", {}).items():
            if not isinstance(index, int) or not 0 <= index < lines:
                problems.append(f"child.env_from_stdout[{var!r}]: {index!r} is not an index of expect_stdout")
    return problems


ARITY = {"set_context": 2, "log_event": 3, "log_metric": 4, "log_progress": 3, "log_resource": 4,
         "start_span": 1, "end_span": 2, "print_env": 1}


def _calls_problems(calls: list, where: str) -> list[str]:
    problems, saved = [], set()
    for i, step in enumerate(calls):
        name = step.get("call")
        if name not in SUITE_CALLS:
            problems.append(f"{where}[{i}]: unknown call {name!r}")
            continue
        args = step.get("args", [])
        if len(args) != ARITY[name]:
            problems.append(f"{where}[{i}]: {name} needs all {ARITY[name]} positional args (null for omitted ones), got {len(args)}")
        for arg in args:
            if isinstance(arg, dict) and set(arg) == {"ref"} and arg["ref"] not in saved:
                problems.append(f"{where}[{i}]: ref {arg['ref']!r} before it was saved")
        if step.get("save"):
            saved.add(step["save"])
    return problems


# -- capture server -------------------------------------------------------------------------------

class CaptureServer:
    """A listener that records the bytes of each connection: TCP on 127.0.0.1 at a free port,
    or a Unix socket at `unix` (a path). `address` is what MONITORING_SIDECAR says for it."""

    def __init__(self, unix: str | os.PathLike | None = None) -> None:
        if unix is not None:
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listener.bind(str(unix))
            self.address = f"unix:{unix}"
        else:
            self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.listener.bind(("127.0.0.1", 0))
            self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.listener.listen(128)
        self.listener.setblocking(False)
        self.connections: list[bytearray] = []  # in the order they were accepted
        self._open = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._quiet = threading.Event()  # set when nothing is open and nothing waits to be accepted
        self._selector = selectors.DefaultSelector()
        self._selector.register(self.listener, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._run, name="conformance-capture", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                events = self._selector.select(timeout=0.05)
                if not events:
                    with self._lock:
                        if self._open == 0:
                            self._quiet.set()
                    continue
                for key, _ in events:
                    if key.data is None:
                        self._accept()
                    else:
                        self._read(key.fileobj, key.data)
        finally:
            for key in list(self._selector.get_map().values()):
                key.fileobj.close()
            self._selector.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            conn.setblocking(False)
            buffer = bytearray()
            with self._lock:
                self._quiet.clear()
                self.connections.append(buffer)
                self._open += 1
            self._selector.register(conn, selectors.EVENT_READ, buffer)

    def _read(self, conn: socket.socket, buffer: bytearray) -> None:
        try:
            chunk = conn.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if chunk:
            with self._lock:
                buffer += chunk
            return
        self._selector.unregister(conn)
        conn.close()
        with self._lock:
            self._open -= 1

    def settle(self, timeout: float = 10.0) -> list[bytes]:
        """After the client process ended: wait until every connection reached EOF and no
        connection waits to be accepted, then return the bytes of each connection."""
        self._quiet.clear()
        if not self._quiet.wait(timeout):
            with self._lock:
                still = self._open
            raise AssertionError(f"capture server: {still} connection(s) still open {timeout}s after the driver "
                                 "exited (a leftover process holding the socket?)")
        with self._lock:
            return [bytes(b) for b in self.connections]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.listener.close()
        if self.address.startswith("unix:"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.address[5:])  # the path is free for the next server

    def __enter__(self) -> "CaptureServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# -- running a driver -----------------------------------------------------------------------------

@dataclass
class DriverRun:
    language: str
    returncode: int
    stdout: bytes
    stderr: bytes
    started: float  # wall clock, seconds
    ended: float

    def describe(self) -> str:
        err = self.stderr.decode("utf-8", "replace").strip()
        return f"{self.language} driver exit status {self.returncode}" + (f"; stderr:\n{err[-4000:]}" if err else "")


def driver_env(scenario_env: dict[str, str], address: str, token: str | None = None) -> dict[str, str]:
    """The driver's environment: `address` is MONITORING_SIDECAR (`127.0.0.1:PORT` or
    `unix:/path`), `token` MONITORING_SIDECAR_TOKEN when given."""
    env = {k: v for k, v in os.environ.items() if k not in CONTROLLED_ENV}
    env.update(scenario_env)
    env["MONITORING_SIDECAR"] = address
    if token is not None:
        env["MONITORING_SIDECAR_TOKEN"] = token
    return env


def run_driver(language: Language, scenario_file: Path, scenario_env: dict[str, str], address: str,
               timeout: float = DRIVER_TIMEOUT, token: str | None = None) -> DriverRun:
    started = time.time()
    try:
        done = subprocess.run(language.command() + [str(scenario_file)], cwd=REPO,
                              env=driver_env(scenario_env, address, token), stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{language.name} driver did not finish within {timeout}s on {scenario_file.name}; "
                             f"stderr:\n{(exc.stderr or b'').decode('utf-8', 'replace')[-3000:]}") from None
    return DriverRun(language.name, done.returncode, done.stdout, done.stderr, started, time.time())


# -- the wire: framing and JSON -------------------------------------------------------------------

class _Duplicate(ValueError):
    pass


def _no_duplicates(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise _Duplicate(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def _reject_constant(name):
    raise ValueError(f"{name} is not JSON")


def _lone_surrogates(value, path="") -> list[str]:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return [f"{path or 'value'}: string holds a lone UTF-16 surrogate escape"]
        return []
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _lone_surrogates(k, f"{path}.<key>") + _lone_surrogates(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _lone_surrogates(v, f"{path}[{i}]")]
    return []


def parse_connections(connections: list[bytes], token: str | None = None) -> tuple[list[dict], list[str]]:
    """Split every connection's bytes into JSON lines and parse them strictly.

    Returns the messages in order (connections in accept order) and the framing problems:
    a stream not starting with '{', a message not terminated by '\\n', '\\r\\n', an empty line,
    invalid UTF-8, invalid JSON, duplicate keys, NaN/Infinity, lone surrogates, a non-object.
    With `token`, every connection must begin with the auth line `{"auth": token}` (its one
    key), which is not a message.
    """
    messages, problems = [], []
    for c, data in enumerate(connections):
        if not data:
            continue  # a connection that sent nothing is harmless
        where = f"connection {c + 1}"
        if token is not None:
            first, _, data = bytes(data).partition(b"\n")
            problems += [f"{where}: {p}" for p in auth_line_problems(first, token)]
            if not data:
                continue
        if data[:1] != b"{":
            problems.append(f"{where}: stream starts with {data[:1]!r}, not '{{' (JSON lines)")
        if not data.endswith(b"\n"):
            problems.append(f"{where}: the last message is not terminated by '\\n': {bytes(data[-120:])!r}")
        lines = data.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        for n, line in enumerate(lines, 1):
            at = f"{where}, line {n}"
            if line.endswith(b"\r"):
                problems.append(f"{at}: terminated by '\\r\\n'; SDKs write '\\n' only")
                line = line[:-1]
            if not line.strip():
                problems.append(f"{at}: empty line")
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                problems.append(f"{at}: not valid UTF-8 ({exc}): {line[:200]!r}")
                continue
            try:
                value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
            except ValueError as exc:
                problems.append(f"{at}: not valid JSON ({exc}): {text[:300]!r}")
                continue
            if not isinstance(value, dict):
                problems.append(f"{at}: a JSON {type(value).__name__}, not an object: {text[:200]!r}")
                continue
            problems += [f"{at}: {p}" for p in _lone_surrogates(value)]
            messages.append(value)
    return messages, problems


def auth_line_problems(line: bytes, token: str) -> list[str]:
    """What is wrong with a connection's first line as the auth line for `token`."""
    try:
        value = json.loads(line.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except ValueError as exc:
        return [f"the first line is not the auth line {{\"auth\": TOKEN}} ({exc}): {line[:200]!r}"]
    if value != {"auth": token}:
        shown = json.dumps(value, ensure_ascii=False)[:200] if not (isinstance(value, dict) and "auth" in value) else "an auth line with another token or other keys"
        return [f"the first line must be the auth line {{\"auth\": MONITORING_SIDECAR_TOKEN}} (one key), got {shown}"]
    return []


# -- schema ---------------------------------------------------------------------------------------

JSONSCHEMA_MISSING = ("the conformance suite validates every message with the `jsonschema` package "
                      "(JSON Schema draft 2020-12), which is not installed in this environment: add "
                      "\"jsonschema>=4.18\" to the `test` extra of /work/main/pyproject.toml")


def schema_validator():
    """A Draft 2020-12 validator of one message; AssertionError if jsonschema is missing."""
    try:
        import jsonschema
    except ImportError:
        raise AssertionError(JSONSCHEMA_MISSING) from None
    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)


def schema_problems(validator, messages: list[dict], label: str = "message") -> list[str]:
    problems = []
    for i, message in enumerate(messages, 1):
        for error in sorted(validator.iter_errors(message), key=lambda e: list(e.absolute_path)):
            where = "/".join(str(p) for p in error.absolute_path) or "(top)"
            problems.append(f"{label} {i}: schema: at {where}: {error.message}")
    return problems


# -- expectations ---------------------------------------------------------------------------------

TIMESTAMP_RE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
_PLACEHOLDER = re.compile(r"<(trace|span):([A-Za-z0-9_.-]+)>|<(timestamp|duration|number|string)>")
_ID_SIZE = {"trace": 32, "span": 16}
CLOCK_SLACK = 2.0  # seconds allowed between a timestamp and the driver's run


def _is_number(value) -> bool:
    return type(value) in (int, float)


@dataclass
class Matcher:
    """Matches captured messages against scenario patterns.

    Placeholders (a whole string, or inside a string for ids):
      <timestamp>  RFC 3339 UTC, exactly milliseconds and 'Z', within the driver's run
      <duration>   a non-negative number, at most the driver's run time
      <trace:NAME> 32 lowercase hex digits, not all zero; <span:NAME> the same with 16.
                   The first occurrence binds NAME; later ones must be the same id; different
                   NAMEs must be different ids.
      <number>, <string>  any value of that type
    Objects must have exactly the pattern's keys; numbers compare numerically (10 == 10.0)
    but never equal booleans; everything else compares exactly.
    """

    window: tuple[float, float] = (0.0, math.inf)
    ids: dict[str, dict[str, str]] = field(default_factory=lambda: {"trace": {}, "span": {}})
    timestamps: list[tuple[str, str]] = field(default_factory=list)

    def match(self, pattern: Any, actual: Any, path: str) -> list[str]:
        if isinstance(pattern, dict):
            if not isinstance(actual, dict):
                return [f"{path}: expected an object, got {json.dumps(actual, ensure_ascii=False)}"]
            problems = []
            for key in pattern:
                if key not in actual:
                    problems.append(f"{path}.{key}: missing (expected {json.dumps(pattern[key], ensure_ascii=False)})")
            for key in actual:
                if key not in pattern:
                    problems.append(f"{path}.{key}: unexpected key, value {json.dumps(actual[key], ensure_ascii=False)}")
            for key in pattern:
                if key in actual:
                    problems += self.match(pattern[key], actual[key], f"{path}.{key}")
            return problems
        if isinstance(pattern, list):
            if not isinstance(actual, list) or len(actual) != len(pattern):
                return [f"{path}: expected {json.dumps(pattern, ensure_ascii=False)}, got {json.dumps(actual, ensure_ascii=False)}"]
            return [p for i, (q, a) in enumerate(zip(pattern, actual)) for p in self.match(q, a, f"{path}[{i}]")]
        if isinstance(pattern, str) and _PLACEHOLDER.search(pattern):
            return self._placeholder(pattern, actual, path)
        if _is_number(pattern):
            if not _is_number(actual) or actual != pattern:
                return [f"{path}: expected the number {pattern!r}, got {json.dumps(actual, ensure_ascii=False)}"]
            return []
        if type(actual) is not type(pattern) or actual != pattern:
            return [f"{path}: expected {json.dumps(pattern, ensure_ascii=False)}, got {json.dumps(actual, ensure_ascii=False)}"]
        return []

    def _placeholder(self, pattern: str, actual: Any, path: str) -> list[str]:
        whole = _PLACEHOLDER.fullmatch(pattern)
        if whole and whole.group(3):
            return self._typed(whole.group(3), actual, path)
        if not isinstance(actual, str):
            return [f"{path}: expected a string like {pattern!r}, got {json.dumps(actual, ensure_ascii=False)}"]
        regex, names, last = [], [], 0
        for m in _PLACEHOLDER.finditer(pattern):
            regex.append(re.escape(pattern[last:m.start()]))
            if m.group(1):
                regex.append(f"([0-9a-f]{{{_ID_SIZE[m.group(1)]}}})")
                names.append((m.group(1), m.group(2)))
            else:
                regex.append("(.*?)")
                names.append((m.group(3), None))
            last = m.end()
        regex.append(re.escape(pattern[last:]))
        found = re.fullmatch("".join(regex), actual)
        if not found:
            return [f"{path}: {actual!r} does not have the form {pattern!r} (ids: lowercase hex, 32 digits for a trace, 16 for a span)"]
        problems = []
        for (kind, name), value in zip(names, found.groups()):
            if name is not None:
                problems += self._bind(kind, name, value, path)
            else:
                problems += self._typed(kind, value, path)
        return problems

    def _typed(self, kind: str, actual: Any, path: str) -> list[str]:
        shown = json.dumps(actual, ensure_ascii=False)
        if kind == "string":
            return [] if isinstance(actual, str) else [f"{path}: expected a string, got {shown}"]
        if kind == "number":
            return [] if _is_number(actual) else [f"{path}: expected a number, got {shown}"]
        if kind == "duration":
            if not _is_number(actual) or not math.isfinite(actual) or actual < 0:
                return [f"{path}: duration_ms must be a non-negative number, got {shown}"]
            limit = (self.window[1] - self.window[0] + CLOCK_SLACK) * 1000
            if actual > limit:
                return [f"{path}: duration_ms {actual} is longer than the whole driver run ({limit:.0f} ms with slack)"]
            return []
        # timestamp
        if not isinstance(actual, str) or not TIMESTAMP_RE.fullmatch(actual):
            return [f"{path}: expected an RFC 3339 UTC timestamp with exactly milliseconds and 'Z' "
                    f"(e.g. 2025-10-20T10:30:45.123Z), got {shown}"]
        try:
            moment = dt.datetime.strptime(actual, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.timezone.utc).timestamp()
        except ValueError:
            return [f"{path}: {actual!r} is not a valid date and time"]
        self.timestamps.append((path, actual))
        low, high = self.window
        if not low - CLOCK_SLACK <= moment <= high + CLOCK_SLACK:
            return [f"{path}: timestamp {actual} is outside the driver's run "
                    f"({_iso(low)} .. {_iso(high)}, ±{CLOCK_SLACK}s): not the current UTC time?"]
        return []

    def _bind(self, kind: str, name: str, value: str, path: str) -> list[str]:
        if value == "0" * _ID_SIZE[kind]:
            return [f"{path}: an all-zero {kind} id is invalid (W3C trace context)"]
        table = self.ids[kind]
        if name in table:
            if table[name] != value:
                return [f"{path}: expected the same {kind} id as <{kind}:{name}> ({table[name]}), got {value}"]
            return []
        for other, bound in table.items():
            if bound == value:
                return [f"{path}: <{kind}:{name}> should be a new {kind} id, got {value}, the id of <{kind}:{other}>"]
        table[name] = value
        return []

    def order_problems(self) -> list[str]:
        """Timestamps of the messages, in the order they arrived, must not go back."""
        problems = []
        for (p1, t1), (p2, t2) in zip(self.timestamps, self.timestamps[1:]):
            if t2 < t1:
                problems.append(f"{p2}: timestamp {t2} is earlier than the previous message's {t1} ({p1})")
        return problems


def _iso(seconds: float) -> str:
    return dt.datetime.fromtimestamp(seconds, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def match_messages(matcher: Matcher, expect: list, messages: list[dict], label: str = "message") -> list[str]:
    problems = []
    if len(messages) != len(expect):
        problems.append(f"expected {len(expect)} messages, got {len(messages)}")
    for i, (pattern, message) in enumerate(zip(expect, messages), 1):
        what = f"{label} {i} ({message.get('type')}{'/' + str(message['data'].get('phase')) if message.get('type') == 'span' and isinstance(message.get('data'), dict) else ''})"
        problems += matcher.match(pattern, message, what)
    problems += matcher.order_problems()
    return problems


def match_stdout(matcher: Matcher, expect: list, stdout: bytes) -> list[str]:
    """Each expected line: a string pattern ("" = the variable is not set) or {"json": pattern}."""
    try:
        text = stdout.decode("utf-8")
    except UnicodeDecodeError as exc:
        return [f"stdout is not valid UTF-8: {exc}"]
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    else:
        return [f"stdout does not end with a newline: {text[-200:]!r}"] if text else \
            ([f"stdout is empty, expected {len(expect)} lines"] if expect else [])
    problems = []
    if len(lines) != len(expect):
        problems.append(f"stdout: expected {len(expect)} lines, got {len(lines)}: {lines!r}")
    for i, (pattern, line) in enumerate(zip(expect, lines), 1):
        where = f"stdout line {i}"
        if line.endswith("\r"):
            problems.append(f"{where}: ends with '\\r'")
            line = line[:-1]
        if isinstance(pattern, dict) and set(pattern) == {"json"}:
            try:
                value = json.loads(line, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
            except ValueError as exc:
                problems.append(f"{where}: expected JSON, got {line!r} ({exc})")
                continue
            problems += matcher.match(pattern["json"], value, where)
        else:
            problems += matcher.match(pattern, line, where)
    return problems


def render(title: str, problems: list[str], expect: list, messages: list[dict], run: DriverRun | None) -> str:
    out = [f"{title}: {len(problems)} problem(s)"] + [f"  - {p}" for p in problems[:60]]
    if len(problems) > 60:
        out.append(f"  ... and {len(problems) - 60} more")
    out.append("expected messages:")
    out += [f"  {json.dumps(m, ensure_ascii=False, sort_keys=True)}" for m in expect]
    out.append("captured messages:")
    out += [f"  {json.dumps(m, ensure_ascii=False, sort_keys=True)}" for m in messages]
    if run is not None:
        out.append(f"stdout: {run.stdout.decode('utf-8', 'replace')!r}")
        out.append(run.describe())
    return "\n".join(out)
