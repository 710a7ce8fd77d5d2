"""Issue 15, point 1: every mistake an operator can make ends in one or two lines (`error:` what
happened, `hint:` what to do), exit 2 for usage and configuration errors and 1 for failures at
run time, and no traceback unless `--debug` asks for it. Each case runs the command itself."""

import http.server
import os
import re
import socket
import threading

import pytest

from tests.harness import FILES_CONFIG, SidecarProcess, wait_until
from tests.test_cli import _free_port, cli


def assert_short(result, code: int, *texts: str) -> list[str]:
    """Exit `code`, one `error:` line and at most one `hint:` line on stderr, each of `texts` in
    them, and no traceback."""
    lines = result.stderr.splitlines()
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert 1 <= len(lines) <= 2 and lines[0].startswith("error: "), result.stderr
    assert len(lines) == 1 or lines[1].startswith("hint: "), result.stderr
    for text in texts:
        assert text in result.stderr, (text, result.stderr)
    return lines


# ---------------------------------------------------------------- flags and their values


@pytest.mark.parametrize(
    ("args", "shown"),
    [
        (("send", "--type", "metric", "--name", "n", "--value", "abc"), "argument --value: not a number: 'abc'"),
        (("send", "--value", "nan"), "argument --value: not a finite number: 'nan'"),
        (("send", "--port", "http"), "argument --port: not a port (1 to 65535): 'http'"),
        (("send", "--timeout", "-1"), "argument --timeout: must be more than 0 seconds"),
        (("send", "--percent", "half"), "argument --percent: invalid float value: 'half'"),
        (("send", "--type", "gossip"), "argument --type: invalid choice: 'gossip'"),
        (("run", "--status-interval", "0"), "argument --status-interval: must be more than 0 seconds, got '0'"),
        (("run", "--log-level", "loud"), "argument --log-level: invalid choice: 'loud'"),
        (("run", "--bogus"), "unrecognized arguments: --bogus"),
        ((), "the following arguments are required: COMMAND"),
    ],
)
def test_a_bad_flag_value_is_two_lines_and_exit_2(args, shown):
    lines = assert_short(cli(*args), 2, shown)
    assert "--help` shows the options" in lines[1]


def test_a_metric_without_its_value_names_the_flag_to_add():
    assert_short(cli("send", "--type", "metric", "--name", "n"), 2, "not a valid message: data.value must be a number", "hint: set it with --value (a metric needs --name and --value)")


def test_a_context_without_equals_shows_an_example():
    assert_short(cli("send", "--context", "job-1"), 2, "--context takes KEY=VALUE, got 'job-1'", "--context job_id=job-1")


@pytest.mark.parametrize(
    ("args", "env", "shown"),
    [
        (("run", "--listen", "127.0.0.1:99999"), {}, "--listen takes HOST:PORT (a port from 0 to 65535), got '127.0.0.1:99999'"),
        (("run", "--http", "localhost"), {}, "--http takes HOST:PORT"),
        (("run",), {"MONITORING_SIDECAR_LISTEN": "nowhere"}, "$MONITORING_SIDECAR_LISTEN takes HOST:PORT"),
        (("run",), {"MONITORING_SIDECAR_HTTP": "127.0.0.1:http"}, "$MONITORING_SIDECAR_HTTP takes HOST:PORT"),
        (("run",), {"MONITORING_SIDECAR_LOG_LEVEL": "verbose"}, "$MONITORING_SIDECAR_LOG_LEVEL must be one of debug, info, warning, error, got 'verbose'"),
        (("run",), {"MONITORING_SIDECAR_LOG_FORMAT": "xml"}, "$MONITORING_SIDECAR_LOG_FORMAT must be one of text, json, got 'xml'"),
        (("send",), {"MONITORING_SIDECAR": "sidecar"}, "$MONITORING_SIDECAR takes HOST:PORT"),
        (("trace", "job-1", "--url", "127.0.0.1:17001"), {}, "--url takes the sidecar's HTTP view as a URL"),
        (("tap",), {"MONITORING_SIDECAR_URL": "localhost:17001"}, "$MONITORING_SIDECAR_URL takes the sidecar's HTTP view as a URL"),
    ],
)
def test_a_bad_address_names_where_it_came_from(args, env, shown, tmp_path):
    assert_short(cli(*args, env=env, cwd=tmp_path), 2, shown)


def test_debug_adds_the_traceback_before_or_after_the_command():
    for args in (("--debug", "send", "--context", "x"), ("send", "--context", "x", "--debug")):
        result = cli(*args)
        assert result.returncode == 2
        assert "Traceback" in result.stderr and "OperatorError" in result.stderr
        assert result.stderr.splitlines()[-2].startswith("error: --context takes KEY=VALUE")


# ---------------------------------------------------------------- files


def test_a_config_file_that_does_not_exist(tmp_path):
    for command in ("run", "check"):
        assert_short(cli(command, "--config", str(tmp_path / "sidecar.yml"), cwd=tmp_path), 2, f"--config {tmp_path / 'sidecar.yml'}: no such file", "embedded default")
    result = cli("check", env={"MONITORING_SIDECAR_CONFIG": str(tmp_path / "gone.yaml")})
    assert_short(result, 2, f"$MONITORING_SIDECAR_CONFIG {tmp_path / 'gone.yaml'}: no such file")


def test_a_config_file_that_is_a_directory(tmp_path):
    assert_short(cli("check", "--config", str(tmp_path)), 2, f"--config {tmp_path}: is a directory, not a file", "goes to --routes")


def test_a_routes_directory_that_is_missing_or_a_file(tmp_path):
    assert_short(cli("check", "--routes", str(tmp_path / "routes.d")), 2, f"--routes {tmp_path / 'routes.d'}: no such directory", "mkdir -p")
    (tmp_path / "rules.yaml").write_text("svc: [{backend: files}]\n")
    assert_short(cli("check", "--routes", str(tmp_path / "rules.yaml")), 2, "not a directory", "the main config file goes to --config")


def test_a_config_file_that_is_not_utf8_names_its_line(tmp_path):
    config = tmp_path / "sidecar.yaml"
    config.write_bytes(b"tcp:\n  host: \"\xff\"\n")
    result = cli("check", "--config", str(config))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"error: {config}:2: cannot read: not UTF-8 text (byte 0xff): save the file as UTF-8" in result.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_an_unreadable_config_file(tmp_path):
    config = tmp_path / "sidecar.yaml"
    config.write_text("tcp: {port: 0}\n")
    config.chmod(0)
    result = cli("check", "--config", str(config))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert f"{config}:1: cannot read: permission denied (the sidecar runs as uid {os.geteuid()})" in result.stderr


def test_a_status_file_in_a_directory_that_does_not_exist(tmp_path):
    assert_short(cli("run", "--status-file", str(tmp_path / "no" / "status.json"), cwd=tmp_path), 2, f"directory {tmp_path / 'no'} does not exist", "mkdir -p")
    assert_short(cli("run", "--status-file", str(tmp_path), cwd=tmp_path), 2, "is a directory")


# ---------------------------------------------------------------- at run time


def test_the_http_views_port_in_use_is_one_line_and_a_hint(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        sidecar = SidecarProcess(tmp_path, FILES_CONFIG.format(base=tmp_path / "out"), env={"MONITORING_SIDECAR_HTTP": f"127.0.0.1:{port}"})
        with pytest.raises(AssertionError, match="exited with 1"):
            sidecar.start(timeout=10)
            wait_until(lambda: sidecar.process.poll() is not None, 10, "the sidecar to exit")
    log = sidecar.log()
    assert f"error: http view: cannot listen on 127.0.0.1:{port}: Address already in use\nhint: another process listens there" in log
    assert "--http HOST:PORT (or http.port in the config)" in log
    assert "Traceback" not in log


def test_the_tcp_port_in_use_says_what_to_do_and_debug_shows_the_traceback(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli("run", "--listen", f"127.0.0.1:{port}", "--http", "127.0.0.1:0", cwd=tmp_path)
        debug = cli("--debug", "run", "--listen", f"127.0.0.1:{port}", "--http", "127.0.0.1:0", cwd=tmp_path)
    errors = [line for line in result.stderr.splitlines() if "level=" not in line]
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert errors == [
        f"error: source tcp: cannot listen on 127.0.0.1:{port}: Address already in use",
        "hint: another process listens there (a sidecar already running? `ss -ltnp` names it): stop it, or choose another with --listen HOST:PORT (or tcp.port in the config)",
    ]
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "OSError: [Errno 98]" in debug.stderr
    assert f"error: source tcp: cannot listen on 127.0.0.1:{port}" in debug.stderr


def test_an_address_that_is_not_this_machines(tmp_path):
    result = cli("run", "--listen", "192.0.2.1:0", "--http", "127.0.0.1:0", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "error: source tcp: cannot listen on 192.0.2.1:0: Cannot assign requested address\nhint: that host is not an address of this machine" in result.stderr


def test_a_data_dir_that_cannot_be_used_says_what_to_do(tmp_path):
    (tmp_path / "blocked").write_text("a file where data_dir would go\n")
    config = FILES_CONFIG.format(base=tmp_path / "out") + f"storage: {{data_dir: {tmp_path / 'blocked' / 'spool'}}}\n"
    sidecar = SidecarProcess(tmp_path, config).start()
    try:
        assert re.search(r"backend files: no disk log \(.*: Not a directory\); its queue is in memory only: .* To keep it on disk, make storage.data_dir a directory this user can write \(or set queue.mode: memory to choose memory\)", sidecar.log()), sidecar.log()
    finally:
        assert sidecar.stop() == 0
    assert "Traceback" not in sidecar.log()


def test_a_backend_that_cannot_start_says_what_to_do_and_the_sidecar_goes_on(tmp_path):
    config = FILES_CONFIG.format(base=tmp_path / "out").replace("create_base_path: true", "create_base_path: false")
    sidecar = SidecarProcess(tmp_path, config).start()
    try:
        result = cli("send", "--port", str(sidecar.port), "--message", "hello")
        assert result.returncode == 0, result.stderr
        stats = sidecar.wait_for(lambda s: s["backends"][0]["last_error"], what="the backend's error")
        assert stats["backends"][0]["last_error"] == f"base_path {tmp_path / 'out'} does not exist (not mounted?): mount or create it, or set create_base_path: true"
    finally:
        assert sidecar.stop() == 0
    assert "Traceback" not in sidecar.log()


def test_a_status_file_that_stops_being_writable_is_logged_once_and_the_sidecar_goes_on(tmp_path):
    sidecar = SidecarProcess(tmp_path, FILES_CONFIG.format(base=tmp_path / "out")).start()
    try:
        sidecar.status_path.unlink()
        sidecar.status_path.mkdir()  # os.replace over a directory fails from now on
        wait_until(lambda: "cannot write it" in sidecar.log(), what="the error logged")
        wait_until(lambda: sidecar.log().count("status file") == 1 and sidecar.process.poll() is None, what="one line")
    finally:
        assert sidecar.stop() == 0
    assert sidecar.log().count("cannot write it") == 1 and "Traceback" not in sidecar.log()


# ---------------------------------------------------------------- the client commands


def test_send_trace_and_tap_without_a_sidecar():
    port = _free_port()
    lines = assert_short(cli("send", "--port", str(port)), 1, f"cannot send to the sidecar at 127.0.0.1:{port}: Connection refused")
    assert "is the sidecar running there" in lines[1]
    for args in (("trace", "job-1"), ("tap",)):
        lines = assert_short(cli(*args, "--url", f"http://127.0.0.1:{port}"), 1, f"at http://127.0.0.1:{port}: Connection refused")
        assert "is the sidecar running, with its HTTP view on" in lines[1]


def test_trace_pointed_at_something_else_says_so():
    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"<html>not the sidecar</html>")

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert_short(cli("trace", "job-1", "--url", url), 1, f"{url} answered HTTP 200, but not with the sidecar's JSON", "is that the sidecar's HTTP view?")
    finally:
        server.shutdown()
