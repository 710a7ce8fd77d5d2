"""The `monitoring-sidecar` command: run, check, send."""

import argparse
import gc
import datetime as dt
import json
import os
import socket
import sys
from pathlib import Path

import orjson

from sidecar import __version__
from sidecar.ingest import NATIVE_AVAILABLE
from sidecar.backends import backend_class
from sidecar.config import ConfigError, display_value, load_config
from sidecar.constants import LEVELS, MESSAGE_TYPES
from sidecar.message import MessageError, format_timestamp, validate_message
from sidecar.routing import RouteTable
from sidecar.transforms import TransformStage
from sidecar.sources import CannotListen

EXIT_CONFIG_ERROR = 2


def _paths(args) -> tuple[Path | None, Path | None]:
    config = args.config or os.environ.get("MONITORING_SIDECAR_CONFIG")
    routes = args.routes or os.environ.get("MONITORING_SIDECAR_ROUTES")
    config_path = Path(config) if config else None
    if routes:
        routes_dir = Path(routes)
    elif config_path is not None and (config_path.parent / "routes.d").is_dir():
        routes_dir = config_path.parent / "routes.d"
    else:
        routes_dir = None
    return config_path, routes_dir


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="main config file (default: $MONITORING_SIDECAR_CONFIG, else the embedded default)")
    parser.add_argument("--routes", help="drop-in routes directory (default: $MONITORING_SIDECAR_ROUTES, else routes.d beside --config)")


def _print_problems(error: ConfigError) -> None:
    for problem in error.problems:
        print(f"error: {problem}", file=sys.stderr)
    print(f"{len(error.problems)} problem(s); configuration rejected", file=sys.stderr)


def command_run(args) -> int:
    import trio

    from sidecar.app import Sidecar
    from sidecar.logs import configure_logging

    configure_logging(args.log_level)
    config_path, routes_dir = _paths(args)
    try:
        sidecar = Sidecar(config_path, routes_dir, status_file=Path(args.status_file) if args.status_file else None, status_interval=args.status_interval)
    except ConfigError as error:
        _print_problems(error)
        return EXIT_CONFIG_ERROR
    if args.http:
        host, _sep, port = args.http.rpartition(":")
        try:
            sidecar.serve_http_on(host or "127.0.0.1", int(port))
        except ValueError:
            print(f"error: --http takes HOST:PORT, got {args.http!r}", file=sys.stderr)
            return EXIT_CONFIG_ERROR
    if args.listen:
        host, _sep, port = args.listen.rpartition(":")
        try:
            port = int(port)
        except ValueError:
            print(f"error: --listen takes HOST:PORT, got {args.listen!r}", file=sys.stderr)
            return EXIT_CONFIG_ERROR
        try:
            sidecar.listen_on(host or None, port)
        except ValueError as exc:
            print(f"error: --listen: {exc}", file=sys.stderr)
            return EXIT_CONFIG_ERROR
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
        for exc in _leaves(cannot_listen):
            print(f"error: {exc.strerror}", file=sys.stderr)
        return 1
    return 0


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
    config_path, routes_dir = _paths(args)
    try:
        config = load_config(config_path, routes_dir)
    except ConfigError as error:
        _print_problems(error)
        return EXIT_CONFIG_ERROR
    table = RouteTable(config.rules)
    print(f"configuration OK: {len(config.files)} file(s): {', '.join(config.files)}")
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
    stage = TransformStage(config.transforms)
    if stage:
        print("\ntransforms (per source key, in order, before routing):")
        for key in stage.source_keys():
            print(f"  {key}:")
            for spec, step in stage.steps_under(key):
                print(f"    {spec.type}: {step.describe()}  ({spec.where})")
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
    return 0


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
    try:
        return int(text)
    except ValueError:
        return float(text)


def _parse_context(pairs: list[str]) -> dict:
    context = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--context takes key=value, got {pair!r}")
        context[key] = value
    return context


def command_send(args) -> int:
    address = os.environ.get("MONITORING_SIDECAR", f"{args.host}:{args.port}")
    host, _sep, port = address.rpartition(":")
    message: dict = {"source": args.source or os.environ.get("MONITORING_SOURCE", "shell"), "type": args.type}
    message["timestamp"] = format_timestamp(dt.datetime.now(dt.timezone.utc))
    data = {
        "event": lambda: {"level": args.level, "message": args.message},
        "metric": lambda: {"name": args.name, "value": _number(args.value) if args.value is not None else None, **({"unit": args.unit} if args.unit else {})},
        "progress": lambda: {"job_id": args.job_id, "percent": args.percent, "status": args.status},
        "resource": lambda: {k: v for k, v in {"cpu_percent": args.cpu, "memory_mb": args.memory}.items() if v is not None},
        "span": lambda: {"name": args.name, "phase": "start"},
    }[args.type]()
    message["data"] = {k: v for k, v in data.items() if v is not None}
    try:
        context = _parse_context(args.context or [])
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    if args.job_id and args.type != "progress":
        context["job_id"] = args.job_id
    if context:
        message["context"] = context
    if args.trace_id:
        message["trace_id"] = args.trace_id
    try:
        validate_message(message)
    except MessageError as exc:
        print(f"error: not a valid message: {exc.detail}", file=sys.stderr)
        return EXIT_CONFIG_ERROR
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=args.timeout) as conn:
            conn.sendall(orjson.dumps(message) + b"\n")
            conn.shutdown(socket.SHUT_WR)
    except (OSError, ValueError) as exc:
        print(f"error: cannot send to the sidecar at {address}: {exc}", file=sys.stderr)
        return 1
    if args.verbose:
        print(json.dumps(message))
    return 0


def _view_url(args) -> str:
    return (args.url or os.environ.get("MONITORING_SIDECAR_URL") or "http://127.0.0.1:17001").rstrip("/")


def _get_json(url: str, timeout: float):
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def command_trace(args) -> int:
    """Print the seed's unified view of one job (or trace) from a running sidecar."""
    import urllib.error
    import urllib.parse

    from sidecar.jobs import render_tree

    kind = "traces" if args.trace else "jobs"
    url = f"{_view_url(args)}/api/{kind}/{urllib.parse.quote(args.id, safe='')}"
    try:
        status, view = _get_json(url, args.timeout)
    except (urllib.error.URLError, OSError) as exc:
        print(f"error: cannot reach the sidecar's HTTP view at {_view_url(args)}: {exc}", file=sys.stderr)
        return 1
    if status == 404:
        print(f"error: {view.get('error', 'not found')}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(view, indent=2))
    else:
        print(render_tree(view))
    return 0


def command_tap(args) -> int:
    """Follow the live stream of messages in the terminal (Server-Sent Events)."""
    import urllib.error
    import urllib.parse
    import urllib.request

    from sidecar.backends.console import format_line

    query = urllib.parse.urlencode({k: v for k, v in (("source", args.source), ("type", args.type)) if v})
    request = urllib.request.Request(f"{_view_url(args)}/api/tap?{query}")
    token = os.environ.get("MONITORING_SIDECAR_TOKEN")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request) as stream:
            for raw in stream:
                if raw.startswith(b"data: "):
                    message = json.loads(raw[6:])
                    print(json.dumps(message) if args.json else format_line(message), flush=True)
    except KeyboardInterrupt:
        return 0
    except (urllib.error.URLError, OSError) as exc:
        print(f"error: cannot follow the sidecar's tap at {_view_url(args)}: {exc}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="monitoring-sidecar", description="Telemetry sidecar: receive from SDKs over local TCP, correlate, route to backends.")
    native = "built" if NATIVE_AVAILABLE else "not built: every message takes the Python path"
    parser.add_argument("--version", action="version", version=f"monitoring-sidecar {__version__} (native hot path: {native})")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the sidecar")
    _add_config_arguments(run)
    run.add_argument("--listen", metavar="HOST:PORT", default=os.environ.get("MONITORING_SIDECAR_LISTEN"), help="override tcp.host and tcp.port (default: $MONITORING_SIDECAR_LISTEN)")
    run.add_argument("--http", metavar="HOST:PORT", default=os.environ.get("MONITORING_SIDECAR_HTTP"), help="override http.host and http.port (default: $MONITORING_SIDECAR_HTTP)")
    run.add_argument("--log-level", default=os.environ.get("MONITORING_SIDECAR_LOG_LEVEL", "info"), choices=["debug", "info", "warning", "error"])
    run.add_argument("--status-file", help="write statistics as JSON to this file every --status-interval seconds, on SIGUSR1 and at exit")
    run.add_argument("--status-interval", type=float, default=1.0)
    run.set_defaults(handler=command_run)

    check = commands.add_parser("check", help="validate the configuration and print the routing table")
    _add_config_arguments(check)
    check.add_argument("--source", action="append", help="also show where messages of this source go (repeatable)")
    check.set_defaults(handler=command_check)

    send = commands.add_parser("send", help="send one message (from a shell script)")
    send.add_argument("--host", default="127.0.0.1")
    send.add_argument("--port", type=int, default=17000)
    send.add_argument("--source", help="default: $MONITORING_SOURCE, else 'shell'")
    send.add_argument("--type", default="event", choices=sorted(MESSAGE_TYPES))
    send.add_argument("--level", default="info", choices=LEVELS)
    send.add_argument("--message", default="")
    send.add_argument("--name", help="metric or span name")
    send.add_argument("--value", help="metric value")
    send.add_argument("--unit")
    send.add_argument("--job-id")
    send.add_argument("--percent", type=float)
    send.add_argument("--status")
    send.add_argument("--cpu", type=float)
    send.add_argument("--memory", type=float)
    send.add_argument("--trace-id")
    send.add_argument("--context", action="append", metavar="KEY=VALUE")
    send.add_argument("--timeout", type=float, default=2.0)
    send.add_argument("-v", "--verbose", action="store_true", help="print the message sent")
    send.set_defaults(handler=command_send)
    trace = commands.add_parser("trace", help="print a job's (or trace's) timeline from a running sidecar")
    trace.add_argument("id", help="a job id (or a trace id with --trace)")
    trace.add_argument("--trace", action="store_true", help="the id is a trace id")
    trace.add_argument("--url", help="the sidecar's HTTP view (default: $MONITORING_SIDECAR_URL, else http://127.0.0.1:17001)")
    trace.add_argument("--json", action="store_true", help="print the timeline as JSON")
    trace.add_argument("--timeout", type=float, default=5.0)
    trace.set_defaults(handler=command_trace)

    tap = commands.add_parser("tap", help="follow messages as they pass, in the terminal")
    tap.add_argument("--source")
    tap.add_argument("--type", choices=sorted(MESSAGE_TYPES))
    tap.add_argument("--url", help="the sidecar's HTTP view (default: $MONITORING_SIDECAR_URL, else http://127.0.0.1:17001)")
    tap.add_argument("--json", action="store_true")
    tap.set_defaults(handler=command_tap)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)
