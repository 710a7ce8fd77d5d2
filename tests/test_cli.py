"""The command line: check, send, run on the embedded default, and the installed wheel."""

import os
import signal
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from tests.conftest import SEED_CONFIG
from tests.harness import REPO, read_jsonl, wait_until


def cli(*args, cwd=None, env=None, timeout=30):
    return subprocess.run([sys.executable, "-m", "sidecar", *args], capture_output=True, text=True, cwd=cwd or REPO, env={**os.environ, **(env or {})}, timeout=timeout, stdin=subprocess.DEVNULL)


def test_check_prints_the_seeds_routing_table():
    result = cli("check", "--config", str(SEED_CONFIG), "--source", "file-receiver")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "source tcp (tcp): 0.0.0.0:17000" in out
    assert "  queue-service:\n    -> timescaledb" in out
    assert "-> nfs-file[path]" in out and "writes /mnt/nas/logs/queue-service.jsonl" in out
    assert "  config-service:\n    -> s3[bucket,prefix]" in out
    assert "  default:\n    -> cloudwatch[log_group,log_stream]" in out
    # every backend is listed with its type; a type this build lacks is named so, not an error
    from sidecar.backends import backend_class

    for name, kind in (("timescaledb", "postgres"), ("s3", "s3"), ("cloudwatch", "cloudwatch")):
        line = next(l for l in out.splitlines() if l.strip().startswith(name + " "))
        assert kind in line
        assert ("not available in this build" in line) == (backend_class(kind) is None)
    assert "postgresql://user:***@localhost:5432/monitoring" in out
    assert "user:pass@" not in out
    assert "file-receiver goes to:\n    -> cloudwatch" in out


def test_check_says_whether_the_disk_logs_can_be_written(tmp_path):
    config = tmp_path / "sidecar.yaml"
    config.write_text(f"storage: {{data_dir: {tmp_path / 'spool'}}}\nbackends:\n  files: {{type: filesystem, base_path: {tmp_path}}}\n")
    result = cli("check", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert f"disk logs: {tmp_path / 'spool'} (writable), at most 4 GiB together" in result.stdout
    (tmp_path / "file").write_text("x\n")
    config.write_text(f"storage: {{data_dir: {tmp_path / 'file' / 'spool'}}}\nbackends:\n  files: {{type: filesystem, base_path: {tmp_path}}}\n")
    result = cli("check", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert f"disk logs: {tmp_path / 'file' / 'spool'} ** {tmp_path / 'file'} is not a directory: disk queues (queue.mode: disk, the default) will be in memory only: a crash loses what they hold" in result.stdout


def test_check_exits_non_zero_with_file_and_line(tmp_path):
    config = tmp_path / "sidecar.yaml"
    config.write_text("tcp:\n  port: http\n")
    result = cli("check", "--config", str(config))
    assert result.returncode == 2
    assert f"error: {config}:2: tcp.port must be an integer, got 'http'" in result.stderr


def test_run_uses_the_embedded_default_and_send_shows_on_console_and_in_var(tmp_path):
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "run", "--listen", f"127.0.0.1:{port}", "--http", "127.0.0.1:0"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        wait_until(lambda: _accepts(port), what="the sidecar to listen")
        sent = cli("send", "--port", str(port), "--source", "shell-script", "--message", "hello from make run", "--context", "job_id=job-1", cwd=tmp_path, env={"PYTHONPATH": str(REPO)})
        assert sent.returncode == 0, sent.stderr
        written = tmp_path / "var" / "log" / "shell-script.jsonl"
        messages = wait_until(lambda: read_jsonl(written), what="the message in ./var/log")
        assert messages[0]["data"] == {"level": "info", "message": "hello from make run"}
        assert messages[0]["context"] == {"job_id": "job-1"}
    finally:
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert "shell-script     event    INFO     hello from make run  [job_id=job-1]" in out.decode()


def test_send_without_a_sidecar_fails_clearly():
    result = cli("send", "--port", str(_free_port()), "--message", "nobody listens")
    assert result.returncode == 1
    assert "cannot send to the sidecar at 127.0.0.1:" in result.stderr


def test_send_refuses_an_invalid_message():
    result = cli("send", "--type", "metric", "--name", "x")
    assert result.returncode == 2
    assert "data.value must be a number" in result.stderr


@pytest.mark.slow
def test_the_built_wheel_installs_and_runs_in_a_fresh_venv(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(wheels), str(REPO)], check=True, timeout=300)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    wheel = next(wheels.glob("monitoring_sidecar-*.whl"))
    subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", str(wheel)], check=True, timeout=600)
    command = venv / "bin" / "monitoring-sidecar"
    version = subprocess.run([str(command), "--version"], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert version.stdout.startswith("monitoring-sidecar ")
    if shutil.which("cargo"):
        # A toolchain was there to build it: the wheel must carry the Rust hot path.
        assert "(native hot path: built)" in version.stdout, version.stdout
    check = subprocess.run([str(command), "check", "--config", str(SEED_CONFIG)], capture_output=True, text=True, cwd=tmp_path)
    assert check.returncode == 0, check.stderr
    assert "config-service:" in check.stdout
    default = subprocess.run([str(command), "check"], capture_output=True, text=True, cwd=tmp_path)
    assert default.returncode == 0 and "default.yaml" in default.stdout


@pytest.mark.slow
def test_without_a_rust_toolchain_the_wheel_still_builds_and_runs_on_the_python_path(tmp_path):
    # `pipx install` on a machine with no cargo: the native extension is optional.
    source = tmp_path / "source"
    tracked = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, tracked):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    no_cargo = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if not (Path(p) / "cargo").exists())
    env = {**os.environ, "PATH": no_cargo}
    assert shutil.which("cargo", path=no_cargo) is None
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(wheels), str(source)], check=True, timeout=300, env=env)
    wheel = next(wheels.glob("monitoring_sidecar-*.whl"))
    assert "_native" not in " ".join(zipfile.ZipFile(wheel).namelist())
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", str(wheel)], check=True, timeout=600)
    command = venv / "bin" / "monitoring-sidecar"
    version = subprocess.run([str(command), "--version"], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert "(native hot path: not built" in version.stdout, version.stdout
    check = subprocess.run([str(command), "check", "--config", str(SEED_CONFIG)], capture_output=True, text=True, cwd=tmp_path)
    assert check.returncode == 0, check.stderr


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accepts(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        time.sleep(0.05)
        return False
