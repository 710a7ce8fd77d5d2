#!/usr/bin/env python3
"""Conformance driver of the Python SDK: replays one scenario with the public API.

    python sdk_clients/python/conformance_driver.py SCENARIO.json

The contract (arguments, output, exit status) is sdk_clients/conformance/DRIVERS.md. The SDK is
imported from this directory's src/, so the driver tests the source tree, installed or not.
"""

import inspect
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

import monitoring_sdk  # noqa: E402

CALLS = ("set_context", "log_event", "log_metric", "log_progress", "log_resource", "start_span", "end_span")


def resolve(value, saved):
    if isinstance(value, dict) and set(value) == {"ref"}:
        if value["ref"] not in saved:
            raise SystemExit(f"conformance-driver: no saved value named {value['ref']!r}")
        return saved[value["ref"]]
    return value


def bind(method, args):
    """Positional JSON args -> keyword arguments; null for a parameter with a default means 'not
    given' (the default applies), null for a required one is passed as None."""
    params = list(inspect.signature(method).parameters.values())
    if len(args) > len(params):
        raise SystemExit(f"conformance-driver: {method.__name__} takes {len(params)} arguments, got {len(args)}")
    return {p.name: a for p, a in zip(params, args) if a is not None or p.default is inspect.Parameter.empty}


def emit_line(text: bytes) -> None:
    sys.stdout.buffer.write(text + b"\n")
    sys.stdout.buffer.flush()


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: {argv[0]} SCENARIO.json", file=sys.stderr)
        return 2
    scenario = json.loads(Path(argv[1]).read_bytes().decode("utf-8"))
    mon = monitoring_sdk.init(scenario["source"], "localhost", 17000)
    saved: dict[str, object] = {}
    for index, step in enumerate(scenario.get("calls", [])):
        name = step.get("call")
        args = [resolve(a, saved) for a in step.get("args", [])]
        if name == "print_env":
            emit_line(os.environb.get(os.fsencode(args[0]), b""))
            continue
        if name not in CALLS:
            print(f"conformance-driver: call #{index}: unknown call {name!r}", file=sys.stderr)
            return 2
        method = getattr(mon, name)
        result = method(**bind(method, args))
        if step.get("save"):
            saved[step["save"]] = result
        if step.get("print"):
            emit_line(b"" if result is None else str(result).encode("utf-8"))
    if not mon.close(timeout=10):  # generous: only an upper bound, for a loaded machine
        print("conformance-driver: close() could not write out every message", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
