"""The production soak (bench/soak.py) for 60 seconds: SDK processes and raw senders through a
real sidecar to the filesystem, PostgreSQL, SeaweedFS and moto, under faults, reloads, a
SIGTERM and a SIGKILL; every accepted message in every backend, the accounting, flat RSS.
The soak starts its own servers on free ports and stops them."""

import subprocess
import sys

import pytest

from tests.harness import REPO


def test_a_60_s_soak_with_faults_reloads_and_two_restarts_passes_every_criterion(tmp_path):
    finished = subprocess.run(
        [sys.executable, str(REPO / "bench" / "soak.py"), "--seconds", "60", "--workdir", str(tmp_path / "soak")],
        cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=170,
    )
    if finished.returncode != 0 or "result: PASS" not in finished.stdout:
        stderr = f"\nstderr:\n{finished.stderr[-3000:]}" if finished.stderr.strip() else ""
        pytest.fail(f"the soak failed (exit {finished.returncode}):\n{finished.stdout}{stderr}", pytrace=False)
