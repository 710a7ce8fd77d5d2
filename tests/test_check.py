"""Issue 15, points 2 and 3: `check` names the routes directory it read (or that none was
found), shows where each rule writes (a file, a sample S3 key, a CloudWatch stream), and warns,
naming both rules' file:line, when two backend instances write one place; `run` reads
./routes.d when no --config is given, and logs the same warnings. Run through the installed
command, from a directory of the test's own."""

import datetime as dt
import re
import signal
import subprocess
import sys
from pathlib import Path

from sidecar import places
from sidecar.config import load_config
from sidecar.routing import RouteTable
from tests.harness import REPO, read_jsonl, wait_until
from tests.test_cli import _accepts, _free_port, cli

COMMAND = Path(sys.executable).parent / "monitoring-sidecar"
PERL_EXAMPLE = REPO / "examples" / "perl-pipeline"
DEFAULT = REPO / "sidecar" / "default.yaml"


def command(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(COMMAND), *args], capture_output=True, text=True, cwd=cwd, timeout=60, stdin=subprocess.DEVNULL)


def warnings_in(output: str) -> list[list[str]]:
    """Each `warning:` line of check's output with its indented detail lines."""
    found = []
    for line in output.splitlines():
        if line.startswith("warning: "):
            found.append([line])
        elif found and line.startswith("    ") and len(found[-1]) and not line.startswith("    ->"):
            found[-1].append(line.strip())
    return found


def default_rule_line(backend: str) -> int:
    """The line of the embedded default's `all` rule for `backend`."""
    return next(n for n, line in enumerate(DEFAULT.read_text().splitlines(), 1) if line.strip() == f"- backend: {backend}")


def test_the_perl_example_on_the_embedded_default_is_warned_of_naming_both_rules(tmp_path):
    result = command("check", "--routes", str(PERL_EXAMPLE / "routes.d"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"drop-in routes: {PERL_EXAMPLE / 'routes.d'} (from --routes)" in result.stdout
    warnings = warnings_in(result.stdout)
    files = tmp_path / "var" / "log"
    expected = {
        "config-service": "10-config-service.yaml:4", "file-receiver": "20-file-receiver.yaml:3",
        "queue-service": "30-queue-service.yaml:3", "db-loader": "40-db-loader.yaml:3",
    }
    assert len(warnings) == len(expected), result.stdout
    # one backend, four rules overriding its path: four instances, numbered in the order read
    for number, ((headline, first, second, cost), (source, rule)) in enumerate(zip(warnings, expected.items()), 1):
        assert headline == f"warning: 2 backend instances write file {files / source}.jsonl:"
        assert first == f"files for {source} (all: {DEFAULT}:{default_rule_line('files')})"
        assert second == f"files[path]{f'#{number}' if number > 1 else ''} for {source} ({source}: {PERL_EXAMPLE / 'routes.d' / rule})"
        assert cost.startswith(f"{source}'s messages are written there twice: drop one of the rules")


def test_the_perl_examples_own_config_reads_its_routes_and_writes_each_file_once(tmp_path):
    result = command("check", "--config", str(PERL_EXAMPLE / "sidecar.yaml"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"drop-in routes: {PERL_EXAMPLE / 'routes.d'} (beside the main file)" in result.stdout
    assert "warning" not in result.stdout
    for source in ("config-service", "file-receiver", "queue-service", "db-loader"):
        assert f"       writes {tmp_path / 'var' / 'log' / source}.jsonl\n" in result.stdout


def test_check_shows_a_sample_s3_key_and_cloudwatch_stream_per_rule_for_the_seed(tmp_path):
    result = command("check", "--config", str(REPO / "tests" / "fixtures" / "seed" / "sidecar-config.yaml"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    after = {re.match(r"\s*(-> [\w-]+)", lines[i - 1]).group(1): line.strip() for i, line in enumerate(lines) if line.startswith("       writes ")}
    # the seed's `prefix: config-service/` under the config-service rule: no second source level
    assert re.fullmatch(r"writes s3://monitoring-logs/config-service/\d{4}/\d{2}/\d{2}/\d{2}/\d{8}T\d{9}Z-<uuid>\.jsonl", after["-> s3"]), after
    assert after["-> cloudwatch"] == f"writes log group /app/monitoring, stream {places.ANY_SOURCE}"
    assert after["-> nfs-file"] == "writes /mnt/nas/logs/queue-service.jsonl"
    assert "drop-in routes: none (tests/fixtures/seed/routes.d not found; --routes DIR gives one)" not in result.stdout  # absolute path given
    assert f"drop-in routes: none ({REPO / 'tests' / 'fixtures' / 'seed' / 'routes.d'} not found; --routes DIR gives one)" in result.stdout
    # no two rules write one place; the one warning is the seed's 0.0.0.0 (docs/security.md)
    warnings = [line for line in lines if "warning" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: source tcp listens on 0.0.0.0:17000, beyond loopback, without authentication"), warnings


SHARED = """
backends:
  files: {{type: filesystem, base_path: {base}, create_base_path: true}}
  archive: {{type: s3, bucket: logs, prefix: archive/}}
  cloudwatch: {{type: cloudwatch, region: us-east-1, log_group: /apps}}
routing:
  billing:
    - backend: archive
      config: {{prefix: archive/billing/}}
    - backend: cloudwatch
      config: {{log_stream: billing}}
    - backend: files
      filter: {{types: [metric]}}
      config: {{path: shared.jsonl, fsync: batch}}
  payments:
    - backend: files
      config: {{path: shared.jsonl}}
  all:
    - backend: archive
    - backend: cloudwatch
"""


def test_an_s3_prefix_a_cloudwatch_stream_and_a_file_shared_by_two_instances_are_each_warned_of(tmp_path):
    config = tmp_path / "sidecar.yaml"
    config.write_text(SHARED.format(base=tmp_path / "out"))
    result = command("check", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    warnings = {w[0]: w[1:] for w in warnings_in(result.stdout)}
    assert set(warnings) == {
        "warning: 2 backend instances write s3://logs/archive/billing/:",
        "warning: 2 backend instances write CloudWatch Logs us-east-1 /apps:billing:",
        f"warning: 2 backend instances write file {tmp_path / 'out' / 'shared.jsonl'}:",
    }, result.stdout
    s3 = warnings["warning: 2 backend instances write s3://logs/archive/billing/:"]
    assert s3[:2] == [f"archive[prefix] for billing (billing: {config}:8)", f"archive for billing (all: {config}:19)"]
    assert s3[2].startswith("billing's messages are written there twice")
    # two sources, one file: not twice, but two writers rotating one file
    shared_file = warnings[f"warning: 2 backend instances write file {tmp_path / 'out' / 'shared.jsonl'}:"]
    assert shared_file[:2] == [f"files[fsync,path] for billing (billing: {config}:12)", f"files[path] for payments (payments: {config}:16)"]
    assert shared_file[2].startswith("two writers of one place")
    # and the samples: the `all` rule's, for any source
    assert f"       writes s3://logs/archive/{places.ANY_SOURCE}/" in result.stdout


def test_two_rules_that_take_different_types_into_one_file_are_two_writers_not_duplicates(tmp_path):
    config = tmp_path / "sidecar.yaml"
    config.write_text(
        f"backends:\n  files: {{type: filesystem, base_path: {tmp_path}}}\n"
        "routing:\n  app:\n    - backend: files\n      filter: {types: [event]}\n"
        "    - backend: files\n      filter: {types: [metric]}\n      config: {fsync: batch}\n"
    )
    table = RouteTable(load_config(config, None).rules)
    [shared] = places.shared_places(table, places.sources_to_try(table), dt.datetime(2026, 12, 3, tzinfo=dt.timezone.utc))
    assert shared.where == f"file {tmp_path / 'app.jsonl'}" and shared.twice == {}
    assert [(w.source, w.kinds) for w in shared.writers] == [("app", ("event",)), ("app", ("metric",))]


def test_check_names_the_routes_directory_it_read_or_that_none_was_found(tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    result = command("check", cwd=bare)
    assert result.returncode == 0 and "drop-in routes: none (routes.d not found; --routes DIR gives one)" in result.stdout
    with_routes = tmp_path / "with"
    (with_routes / "routes.d").mkdir(parents=True)
    (with_routes / "routes.d" / "10-mine.yaml").write_text("mine:\n  - backend: files\n    config: {path: mine-only.jsonl}\n")
    result = command("check", cwd=with_routes)
    assert result.returncode == 0, result.stderr
    assert "drop-in routes: routes.d (in the current directory)" in result.stdout
    assert "configuration OK: 2 file(s)" in result.stdout and "routes.d/10-mine.yaml" in result.stdout
    assert f"       writes {with_routes / 'var' / 'log' / 'mine-only.jsonl'}" in result.stdout


def test_run_without_a_config_reads_routes_d_of_the_current_directory_and_logs_what_it_read(tmp_path):
    (tmp_path / "routes.d").mkdir()
    (tmp_path / "routes.d" / "10-mine.yaml").write_text("mine:\n  - backend: files\n    config: {path: mine.jsonl}\n")
    port = _free_port()
    process = subprocess.Popen(
        [str(COMMAND), "run", "--listen", f"127.0.0.1:{port}", "--http", "127.0.0.1:0"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    )
    try:
        wait_until(lambda: _accepts(port), what="the sidecar to listen")
        sent = cli("send", "--port", str(port), "--source", "mine", "--message", "to my own file", cwd=tmp_path)
        assert sent.returncode == 0, sent.stderr
        # the drop-in's file, and the default's `all` rule's {source}.jsonl beside it
        assert wait_until(lambda: read_jsonl(tmp_path / "var" / "log" / "mine.jsonl"), what="the drop-in's file")[0]["data"]["message"] == "to my own file"
    finally:
        process.send_signal(signal.SIGTERM)
        _out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert "drop-in routes: routes.d (in the current directory)" in err


def test_run_logs_the_warning_check_gives(tmp_path):
    port = _free_port()
    process = subprocess.Popen(
        [str(COMMAND), "run", "--listen", f"127.0.0.1:{port}", "--http", "127.0.0.1:0", "--routes", str(PERL_EXAMPLE / "routes.d")],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
    )
    try:
        wait_until(lambda: _accepts(port), what="the sidecar to listen")
    finally:
        process.send_signal(signal.SIGTERM)
        _out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    logged = [line for line in err.splitlines() if "backend instances write file" in line]
    assert len(logged) == 4 and all("WARNING" in line or "warning" in line for line in logged), err
    assert f"files[path]#2 for file-receiver (file-receiver: {PERL_EXAMPLE / 'routes.d' / '20-file-receiver.yaml'}:3)" in err


def test_check_lists_the_aggregate_steps_with_their_lines(tmp_path):
    config = tmp_path / "sidecar.yaml"
    config.write_text(
        "backends:\n  files: {type: filesystem, base_path: out}\n"
        "aggregate:\n  queue-service:\n    - metrics: [\"jobs_*\"]\n      window: 1m\n      stats: [count, p99]\n"
        "routing:\n  all: [{backend: files}]\n"
    )
    result = command("check", "--config", str(config), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"  queue-service: metrics=jobs_* window=60s by=source,name,tags stats=count,p99 keep_raw=true  ({config}:5)" in result.stdout
