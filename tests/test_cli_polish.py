"""Issue 15, point 6: help with examples, the environment documented, `send` confirming, `trace`
with status, failures and spans, JSON logs, and `make run` saying what its first run builds."""

import argparse
import json
import logging
import re
import socket
import sys
import threading

from sidecar.cli import build_parser
from sidecar.logs import JsonFormatter
from tests.harness import FILES_CONFIG, REPO, SidecarProcess
from tests.test_cli import cli
from tests.test_view import EXPECTED_TREE, seed_job, timeline_message

COMMANDS = ("run", "check", "send", "trace", "tap")


def _subparsers(parser):
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return commands.choices


def test_every_option_has_help_and_every_command_examples():
    parser = build_parser()
    for name, command in {"monitoring-sidecar": parser, **_subparsers(parser)}.items():
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help, f"{name} {action.option_strings or action.dest} has no help text"
        assert "examples:\n  monitoring-sidecar" in (command.epilog or ""), name
    for name in COMMANDS:
        shown = cli(name, "--help")
        assert shown.returncode == 0
        assert "examples:\n" in shown.stdout and f"  monitoring-sidecar {name}" in shown.stdout, shown.stdout


def test_the_readme_documents_every_environment_variable_the_code_reads():
    read = set()
    for path in (REPO / "sidecar").rglob("*.py"):
        read |= set(re.findall(r"\b(MONITORING_(?:SIDECAR|SOURCE)\w*)", path.read_text()))
    assert {"MONITORING_SIDECAR_LISTEN", "MONITORING_SIDECAR_LOG_LEVEL", "MONITORING_SIDECAR_URL", "MONITORING_SIDECAR_HTTP", "MONITORING_SIDECAR_LOG_FORMAT"} <= read
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("**Environment variables**") :]
    rows = {m.group(1) for m in re.finditer(r"^\| `(MONITORING_\w+)` \|", table, re.MULTILINE)}
    assert read <= rows, f"not in the README's table: {sorted(read - rows)}"


class _Receiver:
    """A TCP server that keeps the lines it is sent."""

    def __init__(self):
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen()
        self.port = self.server.getsockname()[1]
        self.lines: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                data = b""
                while chunk := conn.recv(65536):
                    data += chunk
                self.lines.extend(data.splitlines())


def test_send_confirms_and_is_silent_with_q():
    receiver = _Receiver()
    try:
        sent = cli("send", "--port", str(receiver.port), "--message", "hi")
        assert sent.returncode == 0, sent.stderr
        assert sent.stdout == f"sent 1 message to 127.0.0.1:{receiver.port}\n" and sent.stderr == ""
        quiet = cli("send", "-q", "--port", str(receiver.port), "--message", "hi")
        assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == ""
        only_json = cli("send", "-qv", "--port", str(receiver.port), "--type", "metric", "--name", "rows", "--value", "42")
        assert json.loads(only_json.stdout)["data"] == {"name": "rows", "value": 42}
        from_env = cli("send", "--port", "1", "--message", "hi", env={"MONITORING_SIDECAR": f"127.0.0.1:{receiver.port}"})
        assert from_env.stdout == f"sent 1 message to 127.0.0.1:{receiver.port} (from $MONITORING_SIDECAR)\n"
        assert len(receiver.lines) == 4
    finally:
        receiver.server.close()


def failed_job(job="job-bad", trace="c" * 32):
    def m(source, seconds, kind, data, span=None, parent=None):
        return timeline_message(job, trace, source, seconds, kind, data, span, parent)

    return [
        m("file-receiver", 0.0, "event", {"level": "info", "message": "File received"}),
        m("db-loader", 1.0, "span", {"name": "load_data", "phase": "start"}, span="d" * 16),
        m("db-loader", 1.5, "span", {"name": "insert", "phase": "start"}, span="e" * 16, parent="d" * 16),
        m("db-loader", 2.0, "event", {"level": "error", "message": "connection lost"}, span="d" * 16),
        m("db-loader", 3.0, "span", {"name": "load_data", "phase": "end", "status": "error", "duration_ms": 2000.0}, span="d" * 16),
    ]


def test_trace_shows_the_status_what_failed_and_the_spans(tmp_path):
    sidecar = SidecarProcess(tmp_path, FILES_CONFIG.format(base=tmp_path / "out")).start()
    try:
        messages = seed_job() + failed_job()
        sidecar.send(messages)
        sidecar.wait_for(lambda s: s["received"] == len(messages), what="the jobs received")
        url = f"http://127.0.0.1:{sidecar.http_port}"
        completed = cli("trace", "job-12345", "--spans", "--url", url)
        assert completed.returncode == 0, completed.stderr
        assert completed.stdout == EXPECTED_TREE + ", completed\n\n  Spans:\n    └─ process_job (queue-service): 45.2s, success\n       └─ load_data (db-loader): 45.2s, success\n"
        failed = cli("trace", "job-bad", "--spans", "--url", url)
        assert failed.returncode == 0, failed.stderr
        assert failed.stdout == (
            "job-bad:\n"
            "  ├─ file-receiver: File received (0.0s)\n"
            "  └─ db-loader: connection lost (2.0s)\n"
            "\n"
            "  Total: 3.0s, failed\n"
            "  Failed in db-loader: 1 error, at 2025-10-20T10:00:02.000Z: connection lost; span load_data ended error\n"
            "\n"
            "  Spans:\n"
            "    └─ load_data (db-loader): 2.0s, error\n"
            "       └─ insert (db-loader): open since 2025-10-20T10:00:01.500Z\n"
        )
        assert cli("trace", "job-bad", "--json", "--url", url).stdout.count('"status": "failed"') == 1
    finally:
        assert sidecar.stop() == 0


def test_log_format_json_writes_one_object_per_line(tmp_path):
    sidecar = SidecarProcess(tmp_path, FILES_CONFIG.format(base=tmp_path / "out"), extra_args=["--log-format", "json"]).start()
    assert sidecar.stop() == 0
    lines = [json.loads(line) for line in sidecar.log().splitlines()]
    assert lines and all(set(line) == {"time", "level", "logger", "msg"} for line in lines), lines
    assert any(line["msg"].startswith("monitoring-sidecar ") and " ready: " in line["msg"] for line in lines)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", lines[0]["time"])
    from_env = SidecarProcess(tmp_path, FILES_CONFIG.format(base=tmp_path / "out"), env={"MONITORING_SIDECAR_LOG_FORMAT": "json"}).start()
    assert from_env.stop() == 0
    assert all(json.loads(line) for line in from_env.log().splitlines())


def test_json_log_lines_carry_the_traceback_text():
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("sidecar.test", logging.ERROR, __file__, 1, "failed %s", ("here",), sys.exc_info())
    line = json.loads(JsonFormatter().format(record))
    assert line["level"] == "error" and line["logger"] == "sidecar.test" and line["msg"] == "failed here"
    assert line["exc_info"].startswith("Traceback") and "ValueError: boom" in line["exc_info"]
    surrogate = logging.LogRecord("sidecar", logging.INFO, __file__, 1, "from the wire: \udcff", (), None)
    assert json.loads(JsonFormatter().format(surrogate))["msg"] == "from the wire: \udcff"


def test_the_first_make_run_says_what_it_builds(tmp_path):
    import shutil
    import subprocess

    if shutil.which("make") is None:
        return
    for name in ("Makefile", "pyproject.toml", "sdk_clients/python/pyproject.toml", "native/Cargo.toml", "native/Cargo.lock", "native/src/lib.rs"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, tmp_path / name)
    # A dry run prints the recipe; run its first lines (the version check and the message) only.
    recipe = subprocess.run(["make", "-n", "run"], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    steps = recipe.split("\ntest -x .venv/bin/python")[0]
    said = subprocess.run(["bash", "-c", steps], cwd=tmp_path, capture_output=True, text=True)
    assert said.returncode == 0, said.stderr
    assert re.fullmatch(r"first run: installing into \.venv (and building the native hot path |\(about a minute; no cargo).*\.\.\.\n", said.stdout), said.stdout
    assert recipe.index("first run: installing into") < recipe.index("-m venv .venv")
