"""The `monitoring-sidecar` command: run, check, send, trace, tap, token.

An operator's mistake (a port in use, a bad flag value, a config file that is not there) ends in
one or two lines, `error: what happened` and `hint: what to do`, with exit code 2 for usage and
configuration errors and 1 for failures at run time; `--debug` adds the traceback. Anything else
that escapes is a bug and shows its traceback.
"""

import argparse
import errno
import gc
import datetime as dt
import json
import logging
import math
import os
import socket
import sys
import traceback
from pathlib import Path

import attrs
import orjson

from sidecar import __version__
from sidecar.aggregate import bound_bytes
from sidecar.ingest import NATIVE_AVAILABLE
from sidecar.native import use_native
from sidecar.backends import backend_class
from sidecar.config import ConfigError, display_value, load_config
from sidecar.config.exposure import exposures
from sidecar.constants import LEVELS, MESSAGE_TYPES
from sidecar.message import MessageError, format_timestamp, validate_message
from sidecar import places
from sidecar.routing import RouteTable
from sidecar.transforms import TransformStage
from sidecar.sources import CannotListen

EXIT_CONFIG_ERROR = 2  # usage and configuration errors (argparse's own code for usage)
EXIT_RUNTIME_ERROR = 1
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


class OperatorError(Exception):
    """A failure the operator caused and can fix: `message` says what happened, `hint` what to
    do; shown without a traceback (but with `--debug`), exit `code`."""

    def __init__(self, message: str, hint: str | None = None, code: int = EXIT_RUNTIME_ERROR):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.code = code


def _print_error(message: str, hint: str | None = None) -> None:
    print(f"error: {message}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)


def _from(option: str, env: str, given) -> str:
    """How to name where a value came from: the option, or the environment variable."""
    return option if given else f"${env}"


def _setting(value, env: str):
    """An option's value, else its environment variable's (empty counts as unset)."""
    return value if value is not None else (os.environ.get(env) or None)


def _paths(args) -> tuple[Path | None, Path | None, str]:
    """The main file, the routes directory, and how the directory was chosen (for the operator)."""
    config = _setting(args.config, "MONITORING_SIDECAR_CONFIG")
    routes = _setting(args.routes, "MONITORING_SIDECAR_ROUTES")
    config_path = Path(config) if config else None
    if config_path is not None:
        where = _from("--config", "MONITORING_SIDECAR_CONFIG", args.config)
        if config_path.is_dir():
            raise OperatorError(
                f"{where} {config_path}: is a directory, not a file",
                f"{where} takes the main config file (e.g. {config_path / 'sidecar.yaml'}); a directory of drop-in rules goes to --routes",
                EXIT_CONFIG_ERROR,
            )
        if not config_path.exists():
            raise OperatorError(
                f"{where} {config_path}: no such file",
                f"give the path of an existing file, or leave {where} out to run on the embedded default (`monitoring-sidecar check` shows it)",
                EXIT_CONFIG_ERROR,
            )
    if routes:
        routes_dir = Path(routes)
        where = _from("--routes", "MONITORING_SIDECAR_ROUTES", args.routes)
        if not routes_dir.exists():
            raise OperatorError(
                f"{where} {routes_dir}: no such directory",
                f"create it (mkdir -p {routes_dir}) and drop rule files (*.yaml) into it, or leave {where} out",
                EXIT_CONFIG_ERROR,
            )
        if not routes_dir.is_dir():
            raise OperatorError(
                f"{where} {routes_dir}: not a directory",
                f"{where} takes a directory of drop-in rule files (*.yaml); the main config file goes to --config",
                EXIT_CONFIG_ERROR,
            )
        return config_path, routes_dir, f"{routes_dir} (from {where})"
    # Drop-ins sit beside the main file; without one (the embedded default), in the directory
    # the command runs in, as `make run` and a pipx install used from a checkout expect.
    beside = config_path.parent if config_path is not None else Path(".")
    routes_dir = beside / "routes.d"
    if routes_dir.is_dir():
        return config_path, routes_dir, f"{routes_dir} ({'beside the main file' if config_path is not None else 'in the current directory'})"
    return config_path, None, f"none ({routes_dir} not found; --routes DIR gives one)"


def _host_port(text: str, where: str) -> tuple[str, int]:
    """HOST:PORT (or :PORT, or PORT) into (host, port); host "" when not given."""
    host, _sep, port = text.strip().rpartition(":")
    if not port.isdigit() or int(port) > 65535:
        example = f"{where[1:]}=127.0.0.1:17000" if where.startswith("$") else f"{where} 127.0.0.1:17000"
        raise OperatorError(f"{where} takes HOST:PORT (a port from 0 to 65535), got {text!r}", f"for example {example}", EXIT_CONFIG_ERROR)
    return host.strip("[]"), int(port)


def _choice(value, env: str, option: str, choices: tuple, default: str) -> str:
    chosen = _setting(value, env) or default
    if chosen.lower() not in choices:
        raise OperatorError(f"${env} must be one of {', '.join(choices)}, got {chosen!r}", f"set it to one of those, or unset it (the default is {default})", EXIT_CONFIG_ERROR)
    return chosen.lower()


def _status_file(text: str | None) -> Path | None:
    if not text:
        return None
    path = Path(text)
    if path.is_dir():
        raise OperatorError(f"--status-file {path}: is a directory", f"give a file name, e.g. --status-file {path / 'status.json'}", EXIT_CONFIG_ERROR)
    parent = path.parent
    if not parent.is_dir():
        raise OperatorError(f"--status-file {path}: directory {parent} does not exist", f"create it (mkdir -p {parent}) or write the status elsewhere", EXIT_CONFIG_ERROR)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OperatorError(f"--status-file {path}: directory {parent} is not writable by this user", "choose a directory the sidecar can write", EXIT_CONFIG_ERROR)
    return path


def _listen_hint(exc: OSError) -> str | None:
    """What to do when a source or the HTTP view cannot listen (`CannotListen`)."""
    text = exc.strerror or ""
    what = text.split(":", 1)[0]
    if what == "http view":
        change = "choose another with --http HOST:PORT (or http.port in the config)"
    elif what == "source tcp":
        change = "choose another with --listen HOST:PORT (or tcp.port in the config)"
    else:
        change = f"choose another (sources.{what.removeprefix('source ')} in the config)"
    if "unix:" in text:
        if exc.errno == errno.EADDRINUSE:
            return "something other than a socket is at that path, or another sidecar is using it: move it away, or set another unix: path"
        if exc.errno in (errno.EACCES, errno.EPERM, errno.ENOENT):
            return "the socket's directory must exist and be writable by this user: create it, or set another unix: path"
        return None
    if exc.errno == errno.EADDRINUSE:
        return f"another process listens there (a sidecar already running? `ss -ltnp` names it): stop it, or {change}"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"ports below 1024 need privileges: {change}, above 1023"
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"that host is not an address of this machine: use 127.0.0.1, 0.0.0.0 or one of its own addresses; {change}"
    if exc.errno is not None and exc.errno < 0:  # getaddrinfo's: the host name does not resolve
        return f"the host name does not resolve: use an IP address or a name this machine knows; {change}"
    return None


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="main config file (default: $MONITORING_SIDECAR_CONFIG, else the embedded default)")
    parser.add_argument("--routes", metavar="DIR", help="drop-in routes directory (default: $MONITORING_SIDECAR_ROUTES, else routes.d beside --config, or ./routes.d without --config)")


def _print_problems(error: ConfigError) -> None:
    for problem in error.problems:
        print(f"error: {problem}", file=sys.stderr)
    print(f"{len(error.problems)} problem(s); configuration rejected", file=sys.stderr)


def command_run(args) -> int:
    import trio

    from sidecar.app import Sidecar
    from sidecar.logs import configure_logging

    level = _choice(args.log_level, "MONITORING_SIDECAR_LOG_LEVEL", "--log-level", LOG_LEVELS, "info")
    log_format = _choice(args.log_format, "MONITORING_SIDECAR_LOG_FORMAT", "--log-format", LOG_FORMATS, "text")
    listen = _setting(args.listen, "MONITORING_SIDECAR_LISTEN")
    listen = _host_port(listen, _from("--listen", "MONITORING_SIDECAR_LISTEN", args.listen)) if listen else None
    http = _setting(args.http, "MONITORING_SIDECAR_HTTP")
    http = _host_port(http, _from("--http", "MONITORING_SIDECAR_HTTP", args.http)) if http else None
    status_file = _status_file(args.status_file)
    configure_logging(level, log_format)
    config_path, routes_dir, routes_note = _paths(args)
    logging.getLogger("sidecar").info("drop-in routes: %s", routes_note)
    try:
        sidecar = Sidecar(config_path, routes_dir, status_file=status_file, status_interval=args.status_interval)
    except ConfigError as error:
        _print_problems(error)
        return EXIT_CONFIG_ERROR
    if http:
        sidecar.serve_http_on(http[0] or "127.0.0.1", http[1])
    if listen:
        try:
            sidecar.listen_on(listen[0] or None, listen[1])
        except ValueError as exc:
            raise OperatorError(f"--listen: {exc}", "--listen moves a source of type tcp: configure one (tcp: or sources:), or leave --listen out", EXIT_CONFIG_ERROR) from exc
    _warn_of_exposures(sidecar)
    # The hot path allocates many short-lived dicts and builds no reference cycles: freeze what
    # start-up allocated and collect the young generation less often (docs/performance.md).
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    # Backends block in worker threads (psycopg, boto3, network filesystems). A worker coming back
    # from a system call waits for the GIL up to the switch interval while the event loop computes;
    # 5 ms made every batch wait that long (the "convoy effect"), 0.5 ms does not.
    sys.setswitchinterval(0.0005)
    try:
        trio.run(sidecar.run)
    except BaseExceptionGroup as group:
        cannot_listen, others = group.split(CannotListen)
        if cannot_listen is None or others is not None:
            raise
        if args.debug:
            traceback.print_exception(group)
        for exc in _leaves(cannot_listen):
            _print_error(exc.strerror, _listen_hint(exc))
        return EXIT_RUNTIME_ERROR
    return 0


def _warn_of_exposures(sidecar) -> None:
    """What listens beyond loopback without authentication, where --listen and --http put it:
    a warning each, or with security.require_auth_beyond_loopback a refusal (the config's own
    addresses were refused by the loader already; these come from the command line)."""
    found = exposures({name: source.settings for name, source in sidecar.sources.items()})
    if found and sidecar.config.security.require_auth_beyond_loopback:
        first = found[0]
        raise OperatorError(
            f"{first.what} would listen on {first.address} (from --listen), beyond loopback, without authentication, and security.require_auth_beyond_loopback is true",
            "listen on 127.0.0.1, or configure authentication for it (docs/security.md)",
            EXIT_CONFIG_ERROR,
        )
    for exposure in found:
        logging.getLogger("sidecar").warning("%s", exposure.warning)


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    return [leaf for exc in group.exceptions for leaf in (_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])]


def _describe_settings(spec) -> str:
    if not spec.available:
        options = ", ".join(f"{k}={display_value(v)}" for k, v in spec.settings.options)
        return f"not available in this build ({options})" if options else "not available in this build"
    import attrs

    defaults = type(spec.settings)
    shown = []
    for field in attrs.fields(defaults):
        value = getattr(spec.settings, field.name)
        if field.default is attrs.NOTHING or value != field.default:
            shown.append(f"{field.name}={display_value(value)}")
    return ", ".join(shown)


def command_check(args) -> int:
    config_path, routes_dir, routes_note = _paths(args)
    try:
        config = load_config(config_path, routes_dir)
    except ConfigError as error:
        _print_problems(error)
        return EXIT_CONFIG_ERROR
    table = RouteTable(config.rules)
    now = dt.datetime.now(dt.timezone.utc)
    print(f"configuration OK: {len(config.files)} file(s): {', '.join(config.files)}")
    print(f"drop-in routes: {routes_note}")
    for name, spec in config.sources.items():
        print(f"source {name} ({spec.type}): {spec.settings.where}")
    print(f"disk logs: {_data_dir_state(Path(config.storage.data_dir))}, at most {_mib(config.storage.max_bytes)} together")
    print("\nbackends:")
    for name, definition in config.backends.items():
        available = backend_class(definition.type) is not None
        used = any(r.backend == name and r.enabled for r in config.rules)
        settings = ", ".join(f"{k}={display_value(v)}" for k, v in definition.options.items())
        notes = ("" if used else "  (no enabled rule uses it)") + (
            "" if available else "  ** not available in this build: messages routed here are dropped and counted **"
        )
        print(f"  {name:<16} {definition.type:<11} {settings}{notes}")
    print("\nrouting (per source; `default` applies to sources with no rule of their own, `all` to every source):")
    for key in table.source_keys():
        print(f"  {key}:")
        for rule in table.rules_under(key):
            state = "" if rule.enabled else "  [disabled]"
            where = f"  ({rule.where})"
            print(f"    -> {rule.spec.label:<40} priority {rule.priority:<4} {rule.filter.describe()}{state}{where}")
            sample = _sample_place(rule, key, table.source_names(), now)
            if sample:
                print(f"       writes {sample}")
    stage = TransformStage(config.transforms)
    if stage:
        print("\ntransforms (per source key, in order, before routing):")
        for key in stage.source_keys():
            print(f"  {key}:")
            for spec, step in stage.steps_under(key):
                print(f"    {spec.type}: {step.describe()}  ({spec.where})")
    if config.aggregate:
        print("\naggregate (per source key, after the transforms):")
        for spec in config.aggregate:
            step = spec.settings
            what = " ".join(f"{kind}={','.join(globs)}" for kind, globs in (("metrics", step.metrics), ("spans", step.spans)) if globs)
            print(f"  {spec.source}: {what} window={step.window:g}s by={','.join(step.by)} stats={','.join(step.stats)} keep_raw={str(step.keep_raw).lower()}  ({spec.where})")
            windows = "native" if use_native(config.pipeline.native) else "Python"
            print(f"      at most {step.max_groups:,} groups a window; its windows hold at most {bound_bytes(step, config.pipeline.native) / 2**20:,.0f} MiB ({windows} windows, the groups' names and tags aside)")
    for source in args.source or ():
        for spec, step in stage.steps_for(source):
            print(f"\n{source} first passes {spec.label}: {step.describe()}")
        print(f"\n{source} goes to:")
        targets = table.targets_for(source)
        if not targets:
            print("    (nothing: no rule matches, messages are counted as unrouted)")
        for target in targets:
            filters = " or ".join(f.describe() for f in target.filters) or "all messages"
            print(f"    -> {target.spec.label}: {filters}; {_describe_settings(target.spec)}")
    for exposure in exposures({name: spec.settings for name, spec in config.sources.items()}):
        print(f"\nwarning: {exposure.warning}")
    shared = places.shared_places(table, places.sources_to_try(table, tuple(args.source or ())), now)
    for headline, *details in places.warnings_for(shared):
        print(f"\nwarning: {headline}")
        for detail in details:
            print(f"    {detail}")
    return 0


def _sample_place(rule, key: str, table_names: list[str], now: dt.datetime) -> str | None:
    """What a write of this rule makes, for a source under `key`: a file, object key or stream."""
    source = key if key in table_names else places.ANY_SOURCE
    kinds = sorted(rule.filter.types) if rule.filter.types else ["event"]
    place = places.place_of(rule.spec, source, kinds[0], now)
    return None if place is None else place.sample


def _mib(size: int) -> str:
    return f"{size / 1024**3:g} GiB" if size >= 1024**3 else f"{size / 1024**2:g} MiB"


def _data_dir_state(data_dir: Path) -> str:
    """Whether disk queues can have their logs: data_dir, or its nearest existing parent, writable."""
    existing = data_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.is_dir() and os.access(existing, os.W_OK | os.X_OK):
        return f"{data_dir} (writable)"
    reason = "not a directory" if existing.exists() and not existing.is_dir() else "not writable"
    return f"{data_dir} ** {existing} is {reason}: disk queues (queue.mode: disk, the default) will be in memory only: a crash loses what they hold, and an outage beyond queue.max_messages drops messages **"


def _number(text: str):
    """A metric's value (--value): an integer or a finite number."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (for example --value 42 or --value 0.5)") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def _positive(text: str) -> float:
    """Seconds: a number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, got {text!r}")
    return value


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"not a port (1 to 65535): {text!r}")
    return int(text)


def _parse_context(pairs: list[str]) -> dict:
    context = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise OperatorError(f"--context takes KEY=VALUE, got {pair!r}", "for example --context job_id=job-1 (repeat --context for more keys)", EXIT_CONFIG_ERROR)
        context[key] = value
    return context


# The option that sets each field of a message's data, for the hint when one is missing or wrong.
_DATA_OPTIONS = {"level": "--level", "message": "--message", "name": "--name", "value": "--value", "unit": "--unit", "job_id": "--job-id", "percent": "--percent", "status": "--status", "cpu_percent": "--cpu", "memory_mb": "--memory"}


def _message_hint(detail: str, kind: str) -> str | None:
    field = detail.split(" ", 1)[0].removeprefix("data.")
    option = _DATA_OPTIONS.get(field)
    if option is None:
        return None
    needed = {"metric": "--name and --value", "progress": "--job-id, --percent and --status", "span": "--name"}.get(kind)
    return f"set it with {option}" + (f" (a {kind} needs {needed})" if needed else "")


def command_send(args) -> int:
    address = os.environ.get("MONITORING_SIDECAR")
    unix_path = None
    if address and address.startswith("unix:"):  # a Unix socket, as in the SDKs
        unix_path = address[len("unix:"):]
        if not unix_path:
            raise OperatorError("$MONITORING_SIDECAR takes unix:PATH or HOST:PORT, got 'unix:'", "for example MONITORING_SIDECAR=unix:/run/monitoring/sidecar.sock", EXIT_CONFIG_ERROR)
        host, port = None, None
    elif address:  # wins over --host and --port, as in the SDKs
        host, port = _host_port(address, "$MONITORING_SIDECAR")
        host = host or "127.0.0.1"
    else:
        host, port = args.host, args.port
    target = f"unix:{unix_path}" if unix_path else f"{host}:{port}"
    message: dict = {"source": args.source or os.environ.get("MONITORING_SOURCE", "shell"), "type": args.type}
    message["timestamp"] = format_timestamp(dt.datetime.now(dt.timezone.utc))
    data = {
        "event": lambda: {"level": args.level, "message": args.message},
        "metric": lambda: {"name": args.name, "value": args.value, **({"unit": args.unit} if args.unit else {})},
        "progress": lambda: {"job_id": args.job_id, "percent": args.percent, "status": args.status},
        "resource": lambda: {k: v for k, v in {"cpu_percent": args.cpu, "memory_mb": args.memory}.items() if v is not None},
        "span": lambda: {"name": args.name, "phase": "start"},
    }[args.type]()
    message["data"] = {k: v for k, v in data.items() if v is not None}
    context = _parse_context(args.context or [])
    if args.job_id and args.type != "progress":
        context["job_id"] = args.job_id
    if context:
        message["context"] = context
    if args.trace_id:
        message["trace_id"] = args.trace_id
    try:
        validate_message(message)
    except MessageError as exc:
        raise OperatorError(f"not a valid message: {exc.detail}", _message_hint(exc.detail, args.type), EXIT_CONFIG_ERROR) from exc
    # The auth message first when a token is set (docs/protocol.md); a sidecar without one
    # drops it unread.
    token = os.environ.get("MONITORING_SIDECAR_TOKEN")
    payload = (orjson.dumps({"auth": token}) + b"\n" if token else b"") + orjson.dumps(message) + b"\n"
    try:
        if unix_path:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.settimeout(args.timeout)
            try:
                conn.connect(unix_path)
            except BaseException:
                conn.close()
                raise
        else:
            conn = socket.create_connection((host, port), timeout=args.timeout)
        with conn:
            conn.sendall(payload)
            conn.shutdown(socket.SHUT_WR)
    except OSError as exc:
        where = "$MONITORING_SIDECAR" if address else "--host and --port"
        raise OperatorError(
            f"cannot send to the sidecar at {target}: {exc.strerror or exc}",
            f"is the sidecar running there (`make run`, or `monitoring-sidecar run`)? {where} say where send goes (the sidecar's tcp: address, 127.0.0.1:17000 by default)",
        ) from exc
    if args.verbose:
        print(json.dumps(message))
    if not args.quiet:
        print(f"sent 1 message to {target}" + (" (from $MONITORING_SIDECAR)" if address else ""))
    return 0


def _view_url(args) -> str:
    url = (args.url or os.environ.get("MONITORING_SIDECAR_URL") or "http://127.0.0.1:17001").rstrip("/")
    if not url.startswith(("http://", "https://")):
        where = _from("--url", "MONITORING_SIDECAR_URL", args.url)
        raise OperatorError(f"{where} takes the sidecar's HTTP view as a URL, got {url!r}", "for example http://127.0.0.1:17001 (the sidecar's http: address)", EXIT_CONFIG_ERROR)
    return url


def _unreachable(url: str, exc: Exception, what: str = "reach the sidecar's HTTP view") -> OperatorError:
    reason = getattr(exc, "reason", exc)
    reason = getattr(reason, "strerror", None) or reason
    return OperatorError(
        f"cannot {what} at {url}: {reason}",
        "is the sidecar running, with its HTTP view on (http: in its config, or run --http HOST:PORT)? --url or $MONITORING_SIDECAR_URL say where to look",
    )


def _with_token(request):
    """The request with the bearer token of $MONITORING_SIDECAR_TOKEN, when it is set."""
    token = os.environ.get("MONITORING_SIDECAR_TOKEN")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    return request


def _get_json(url: str, timeout: float, base: str):
    """(status, JSON body) of a GET; an answer that is not JSON is an OperatorError."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(_with_token(urllib.request.Request(url)), timeout=timeout) as response:
            status, body = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read() or b"{}"
    except (urllib.error.URLError, OSError) as exc:
        raise _unreachable(base, exc) from exc
    try:
        return status, json.loads(body)
    except ValueError as exc:
        raise OperatorError(f"{base} answered HTTP {status}, but not with the sidecar's JSON", "is that the sidecar's HTTP view? (its http: address, 127.0.0.1:17001 by default)") from exc


def command_trace(args) -> int:
    """Print the seed's unified view of one job (or trace) from a running sidecar."""
    import urllib.parse

    kind = "traces" if args.trace else "jobs"
    base = _view_url(args)
    status, view = _get_json(f"{base}/api/{kind}/{urllib.parse.quote(args.id, safe='')}", args.timeout, base)
    if status == 404:
        what = "trace ids are 32 hex digits, as in TRACEPARENT" if args.trace else f"the live index keeps recent jobs (index.max_jobs, index.max_age); {base}/api/jobs lists them"
        raise OperatorError(view.get("error", "not found"), what)
    if status == 401:
        raise OperatorError(f"the sidecar's view at {base} refused: HTTP 401", _TOKEN_HINT if not os.environ.get("MONITORING_SIDECAR_TOKEN") else "$MONITORING_SIDECAR_TOKEN is not the sidecar's token")
    if status != 200:
        raise OperatorError(f"the sidecar's view answered HTTP {status}: {view.get('error', view)}")
    if args.json:
        print(json.dumps(view, indent=2))
    else:
        print(render_view(view, spans=args.spans))
    return 0


def _walk(spans: list) -> list[dict]:
    return [node for span in spans for node in (span, *_walk(span.get("children") or []))]


def _failures(view: dict) -> list[str]:
    """Which service failed and with what, from the view's JSON (`/api/jobs/ID`): its error
    events, the spans that ended failed, a progress that says failed; one line per service."""
    from sidecar.jobs import FAILED_STATUSES

    found: dict[str, list[str]] = {}
    for source in view.get("sources") or []:
        name = source.get("source")
        errors = [e for e in source.get("events") or [] if e.get("level") in ("error", "critical")]
        if source.get("errors"):
            count = source["errors"]
            text = f"{count} error{'s' if count != 1 else ''}"
            if errors:
                last = errors[-1]
                text += f", {'the last ' if count > 1 else ''}at {last.get('timestamp')}: {last.get('message')}"
            found.setdefault(name, []).append(text)
        progress = source.get("progress") or {}
        if progress.get("status") in FAILED_STATUSES:
            found.setdefault(name, []).append(f"progress {progress.get('status')} at {progress.get('percent', 0):g}%")
    for span in _walk(view.get("spans") or []):
        if span.get("status") in FAILED_STATUSES:
            found.setdefault(span.get("source"), []).append(f"span {span.get('name')} ended {span.get('status')}")
    return [f"{name}: {'; '.join(parts)}" for name, parts in found.items()]


def _describe_span(span: dict) -> str:
    where = f"{span.get('name')} ({span.get('source')})"
    if span.get("end") is None:
        return f"{where}: open since {span.get('start') or 'an unknown time'}"
    duration = span.get("duration_ms")
    took = f"{duration / 1000:.1f}s" if isinstance(duration, (int, float)) else "?"
    return f"{where}: {took}, {span.get('status')}"


def _span_tree(spans: list, indent: str = "    ") -> list[str]:
    lines = []
    for index, span in enumerate(spans):
        last = index == len(spans) - 1
        lines.append(f"{indent}{'└─' if last else '├─'} {_describe_span(span)}")
        lines.extend(_span_tree(span.get("children") or [], indent + ("   " if last else "│  ")))
    return lines


_TOKEN_HINT = "set $MONITORING_SIDECAR_TOKEN to the sidecar's token: `monitoring-sidecar token` prints it where the sidecar runs"


def render_view(view: dict, spans: bool = False) -> str:
    """`trace` in the terminal: the seed's tree (sidecar.jobs.render_tree) with the status on
    its Total line, then which service failed and how, and with `spans` the span tree (of the
    view's first page: a note says how many more there are)."""
    from sidecar.jobs import render_tree

    lines = render_tree(view).split("\n")
    status = view.get("status")
    if status:
        lines[-1] += f", {status}"
    failures = _failures(view)
    if failures:
        lines.append("  Failed in " + ("" if len(failures) == 1 else f"{len(failures)} services:"))
        if len(failures) == 1:
            lines[-1] += failures[0]
        else:
            lines.extend(f"    {line}" for line in failures)
    if spans:
        lines.append("")
        tree = _span_tree(view.get("spans") or [])
        lines.append("  Spans:" if tree else "  Spans: none")
        lines.extend(tree)
        page = view.get("page") or {}
        if page.get("pages", 1) > 1:
            lines.append(f"  ... the first {page['limit']:,} of {page['spans']:,} spans (the rest: /api/jobs/ID?page=2 and on)")
    return "\n".join(lines)


def command_tap(args) -> int:
    """Follow the live stream of messages in the terminal (Server-Sent Events)."""
    import urllib.error
    import urllib.parse
    import urllib.request

    from sidecar.backends.console import format_line

    base = _view_url(args)
    query = urllib.parse.urlencode({k: v for k, v in (("source", args.source), ("type", args.type)) if v})
    request = _with_token(urllib.request.Request(f"{base}/api/tap?{query}"))
    token = os.environ.get("MONITORING_SIDECAR_TOKEN")
    try:
        with urllib.request.urlopen(request) as stream:
            event = None  # of the Server-Sent Event being read: None for a message
            for raw in stream:
                if raw.startswith(b"event: "):
                    event = raw[7:].strip().decode("ascii", "replace")
                elif raw.startswith(b"data: ") and event == "dropped":
                    dropped = json.loads(raw[6:])["dropped"]
                    print(f"tap: {dropped} messages dropped so far: this terminal fell behind the sidecar's tap buffer (http.tap_buffer)", file=sys.stderr, flush=True)
                elif raw.startswith(b"data: "):
                    message = json.loads(raw[6:])
                    print(json.dumps(message) if args.json else format_line(message), flush=True)
                elif raw in (b"\n", b"\r\n"):
                    event = None
    except KeyboardInterrupt:  # the way to stop following
        return 0
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            hint = _TOKEN_HINT if not token else "$MONITORING_SIDECAR_TOKEN is not the sidecar's token"
            raise OperatorError(f"the sidecar's tap at {base} refused: HTTP {exc.code}", hint) from exc
        if exc.code == 503:
            raise OperatorError(f"the sidecar's tap at {base} is full: HTTP 503", "as many follow it as http.max_tap_subscribers allows: try again later") from exc
        raise OperatorError(f"the sidecar's tap at {base} answered HTTP {exc.code}", "is --url the sidecar's HTTP view?") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise _unreachable(base, exc, "follow the sidecar's tap") from exc
    return 0


def command_token(args) -> int:
    """Print the bearer token the HTTP view's /api routes need, as `run` with these arguments
    would take it: the variable http.token_env names, or the token made in storage.data_dir
    for a view beyond loopback (made now when the view has not made it yet)."""
    from sidecar.http import TokenFileError, view_token

    config_path, routes_dir, _note = _paths(args)
    try:
        config = load_config(config_path, routes_dir)
    except ConfigError as error:
        _print_problems(error)
        return EXIT_CONFIG_ERROR
    settings = config.http
    http = _setting(args.http, "MONITORING_SIDECAR_HTTP")
    if http:
        host, port = _host_port(http, _from("--http", "MONITORING_SIDECAR_HTTP", args.http))
        settings = attrs.evolve(settings, host=host or "127.0.0.1", port=port, enabled=True)
    if not settings.enabled:
        raise OperatorError("the HTTP view is off (http.enabled: false): it needs no token", "turn it on in the config (or run --http HOST:PORT)")
    try:
        token, _origin = view_token(settings, Path(config.storage.data_dir), os.environ)
    except TokenFileError as exc:
        raise OperatorError(str(exc), "storage.data_dir must be a directory this user can write (the sidecar keeps the token there)") from exc
    if token is None:
        raise OperatorError(
            f"the HTTP view at {settings.host}:{settings.port} listens on loopback only and needs no token",
            f"set ${settings.token_env} (for `run` and its clients) to require one; a view beyond loopback makes its own",
        )
    print(token)
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors in two lines (what is wrong, where the help is) instead of the whole usage."""

    def error(self, message: str):
        self.exit(EXIT_CONFIG_ERROR, f"error: {message}\nhint: `{self.prog} --help` shows the options, with examples\n")


_EXAMPLES = {
    "main": """examples:
  monitoring-sidecar run                                  # the embedded default: 127.0.0.1:17000, ./var/log, the console
  monitoring-sidecar check --config sidecar.yaml          # validate a config, print its routing table
  monitoring-sidecar send --source demo --message hello   # one event from a shell
  monitoring-sidecar trace job-1                          # a job's timeline from a running sidecar
  monitoring-sidecar run --help                           # each command's options and examples

exit codes: 0 done; 1 a failure at run time (a port in use, no sidecar to send to);
2 a usage or configuration error. --debug adds the traceback behind an error.""",
    "run": """examples:
  monitoring-sidecar run
  monitoring-sidecar run --config /etc/sidecar/sidecar.yaml --routes /etc/sidecar/routes.d
  monitoring-sidecar run --listen 0.0.0.0:17000 --http 127.0.0.1:17001 --log-format json
  MONITORING_SIDECAR_LOG_LEVEL=debug monitoring-sidecar run --status-file /tmp/sidecar-status.json

Routes are reloaded when their files change, on SIGHUP, or on POST /api/reload; SIGTERM or
Ctrl-C drain the backends and exit. SIGUSR1 logs the statistics.""",
    "check": """examples:
  monitoring-sidecar check                                # the embedded default
  monitoring-sidecar check --config sidecar.yaml --routes routes.d
  monitoring-sidecar check --config sidecar.yaml --source queue-service --source db-loader

Exit 2 with every problem at its file:line; nothing is started.""",
    "send": """examples:
  monitoring-sidecar send --source backup --message "backup started" --context job_id=nightly-42
  monitoring-sidecar send --source backup --level error --message "disk full"
  monitoring-sidecar send --source backup --type metric --name bytes_written --value 1048576 --unit bytes
  monitoring-sidecar send --type progress --job-id nightly-42 --percent 50 --status running
  monitoring-sidecar send -q --port 17100 --message "to another sidecar, silently"

$MONITORING_SIDECAR (HOST:PORT, or unix:PATH for a Unix socket) wins over --host and --port,
as in the SDKs; with $MONITORING_SIDECAR_TOKEN set, the auth message goes first.""",
    "trace": """examples:
  monitoring-sidecar trace job-12345                      # sources, status, what failed
  monitoring-sidecar trace job-12345 --spans              # ... and the span tree
  monitoring-sidecar trace --trace 4bf92f3577b34da6a3ce929d0e0e4736
  monitoring-sidecar trace job-12345 --json | jq .status
  monitoring-sidecar trace job-12345 --url http://10.0.0.5:17001""",
    "tap": """examples:
  monitoring-sidecar tap                                  # every message as it passes (Ctrl-C stops)
  monitoring-sidecar tap --source queue-service --type event
  monitoring-sidecar tap --json | jq 'select(.data.level == "error")'

Needs $MONITORING_SIDECAR_TOKEN when the sidecar has a token (`monitoring-sidecar token`).""",
    "token": """examples:
  monitoring-sidecar token --config /etc/sidecar/sidecar.yaml
  MONITORING_SIDECAR_TOKEN=$(monitoring-sidecar token) monitoring-sidecar tap

Run it where `run` runs, with the same --config and --http: the token is $MONITORING_SIDECAR_TOKEN
(http.token_env) when set, else the one a view beyond loopback keeps in storage.data_dir.
A view on loopback without the variable needs none (exit 1). Nothing else prints the token.""",
}


def _command(commands, name: str, parents: list, help_text: str) -> argparse.ArgumentParser:
    return commands.add_parser(name, parents=parents, help=help_text, description=help_text[0].upper() + help_text[1:] + ".", epilog=_EXAMPLES[name], formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="monitoring-sidecar",
        description="Telemetry sidecar: receive from SDKs over local TCP, correlate, route to backends.",
        epilog=_EXAMPLES["main"],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    native = "built" if NATIVE_AVAILABLE else "not built: every message takes the Python path"
    parser.add_argument("--version", action="version", version=f"monitoring-sidecar {__version__} (native hot path: {native})", help="print the version and whether the native hot path is built")
    parser.add_argument("--debug", action="store_true", help="show the traceback behind an error (for reports); without it an operator's mistake is one or two lines")
    # Accepted after the command as well (`monitoring-sidecar run --debug`).
    debug = _Parser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback behind an error")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = _command(commands, "run", [debug], "run the sidecar")
    _add_config_arguments(run)
    run.add_argument("--listen", metavar="HOST:PORT", help="override tcp.host and tcp.port (default: $MONITORING_SIDECAR_LISTEN)")
    run.add_argument("--http", metavar="HOST:PORT", help="override http.host and http.port, and turn the HTTP view on (default: $MONITORING_SIDECAR_HTTP)")
    run.add_argument("--log-level", choices=LOG_LEVELS, help="the sidecar's own log level (default: $MONITORING_SIDECAR_LOG_LEVEL, else info)")
    run.add_argument("--log-format", choices=LOG_FORMATS, help="the sidecar's own log lines on stderr: text (logfmt) or json, one object per line (default: $MONITORING_SIDECAR_LOG_FORMAT, else text)")
    run.add_argument("--status-file", metavar="FILE", help="write statistics as JSON to this file every --status-interval seconds, on SIGUSR1 and at exit")
    run.add_argument("--status-interval", type=_positive, default=1.0, metavar="SECONDS", help="how often --status-file is written (default: 1)")
    run.set_defaults(handler=command_run)

    check = _command(commands, "check", [debug], "validate the configuration and print the routing table")
    _add_config_arguments(check)
    check.add_argument("--source", action="append", metavar="NAME", help="also show where messages of this source go (repeatable)")
    check.set_defaults(handler=command_check)

    send = _command(commands, "send", [debug], "send one message (from a shell script)")
    send.add_argument("--host", default="127.0.0.1", help="the sidecar's address (default: 127.0.0.1; $MONITORING_SIDECAR wins)")
    send.add_argument("--port", type=_port, default=17000, help="the sidecar's port (default: 17000; $MONITORING_SIDECAR wins)")
    send.add_argument("--source", help="the sending service's name (default: $MONITORING_SOURCE, else 'shell')")
    send.add_argument("--type", default="event", choices=sorted(MESSAGE_TYPES), help="the kind of message (default: event)")
    send.add_argument("--level", default="info", choices=LEVELS, help="an event's level (default: info)")
    send.add_argument("--message", default="", help="an event's text")
    send.add_argument("--name", help="a metric's or span's name")
    send.add_argument("--value", type=_number, help="a metric's value (a number)")
    send.add_argument("--unit", help="a metric's unit (e.g. bytes, ms, count)")
    send.add_argument("--job-id", help="the job: progress's job_id, else context.job_id (what `trace` looks up)")
    send.add_argument("--percent", type=float, help="progress: percent done, 0 to 100")
    send.add_argument("--status", help="progress: its status (e.g. running, completed, failed)")
    send.add_argument("--cpu", type=float, metavar="PERCENT", help="resource: CPU use in percent")
    send.add_argument("--memory", type=float, metavar="MB", help="resource: memory use in MB")
    send.add_argument("--trace-id", help="the trace this message belongs to (32 hex digits)")
    send.add_argument("--context", action="append", metavar="KEY=VALUE", help="a context key (repeatable)")
    send.add_argument("--timeout", type=_positive, default=2.0, metavar="SECONDS", help="give up connecting after this long (default: 2)")
    send.add_argument("-v", "--verbose", action="store_true", help="print the message sent, as JSON")
    send.add_argument("-q", "--quiet", action="store_true", help="do not confirm what was sent (errors are still printed)")
    send.set_defaults(handler=command_send)

    trace = _command(commands, "trace", [debug], "print a job's (or trace's) timeline from a running sidecar")
    trace.add_argument("id", help="a job id (or a trace id with --trace)")
    trace.add_argument("--trace", action="store_true", help="the id is a trace id")
    trace.add_argument("--spans", action="store_true", help="also print the span tree")
    trace.add_argument("--url", help="the sidecar's HTTP view (default: $MONITORING_SIDECAR_URL, else http://127.0.0.1:17001)")
    trace.add_argument("--json", action="store_true", help="print the timeline as JSON, as /api/jobs/ID has it")
    trace.add_argument("--timeout", type=_positive, default=5.0, metavar="SECONDS", help="give up waiting for the sidecar after this long (default: 5)")
    trace.set_defaults(handler=command_trace)

    tap = _command(commands, "tap", [debug], "follow messages as they pass, in the terminal")
    tap.add_argument("--source", help="only this source's messages")
    tap.add_argument("--type", choices=sorted(MESSAGE_TYPES), help="only messages of this type")
    tap.add_argument("--url", help="the sidecar's HTTP view (default: $MONITORING_SIDECAR_URL, else http://127.0.0.1:17001)")
    tap.add_argument("--json", action="store_true", help="print each message as JSON instead of the console's line")
    tap.set_defaults(handler=command_tap)

    token = _command(commands, "token", [debug], "print the bearer token the HTTP view's /api routes need")
    _add_config_arguments(token)
    token.add_argument("--http", metavar="HOST:PORT", help="the view's address, as given to run (default: $MONITORING_SIDECAR_HTTP, else http.host and http.port)")
    token.set_defaults(handler=command_token)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except OperatorError as error:
        if args.debug:
            traceback.print_exc()
        _print_error(error.message, error.hint)
        return error.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`tap | head`): nothing more to say, and nowhere to say it.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
