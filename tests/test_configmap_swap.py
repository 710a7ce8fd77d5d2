"""A mounted ConfigMap as routes.d, updated the way the kubelet updates it, under a running sidecar.

The kubelet's volume (its AtomicWriter) holds the files in a timestamped directory, a `..data`
symlink to it, and one symlink per key (`default.yaml -> ..data/default.yaml`). An update writes
a new timestamped directory, makes the symlinks of keys that are new (dangling until the swap),
renames a `..data_tmp` symlink over `..data` (the one atomic step), removes the old directory,
then the symlinks of keys that are gone (dangling since the swap). Each step is replayed here
with a pause longer than the watcher's poll, so the sidecar sees every state in between.
"""

import os
import re
import tempfile
import time
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.config.loader import route_files
from tests.harness import SidecarProcess, SteadySender, read_jsonl, seqs, wait_until

CONFIG = """
tcp: {{host: 127.0.0.1, port: 0}}
reload: {{poll_interval: 100ms, settle_delay: 100ms}}
backends:
  old: {{type: filesystem, base_path: {base}/old, create_base_path: true, batch: {{timeout: 0.05}}}}
  new: {{type: filesystem, base_path: {base}/new, create_base_path: true, batch: {{timeout: 0.05}}}}
"""

BEFORE = {
    "default.yaml": "all:\n  - backend: old\n",
    "retired.yaml": "batch-*:\n  - backend: old\n",
}
AFTER = {
    "default.yaml": "all:\n  - backend: new\n",
    "added.yaml": "audit-*:\n  - backend: new\n",
}
# Longer than the watcher's poll: each state of the update is seen on its own.
STEP = 0.3


class ConfigMapVolume:
    """A directory laid out and updated as the kubelet lays out a ConfigMap volume."""

    def __init__(self, path, files: dict[str, str], stamp: str):
        self.path = path
        self.current = self._write_generation(files, stamp)
        os.symlink(self.current, path / "..data")
        for key in files:
            os.symlink(f"..data/{key}", path / key)
        self.keys = set(files)

    def _write_generation(self, files: dict[str, str], stamp: str) -> str:
        name = f"..{stamp}"
        (self.path / name).mkdir()
        for key, text in files.items():
            (self.path / name / key).write_text(text)
        return name

    def update(self, files: dict[str, str], stamp: str, pause: float) -> None:
        new = self._write_generation(files, stamp)
        time.sleep(pause)
        for key in files.keys() - self.keys:
            os.symlink(f"..data/{key}", self.path / key)  # dangling until the swap
        time.sleep(pause)
        os.symlink(new, self.path / "..data_tmp")
        os.rename(self.path / "..data_tmp", self.path / "..data")
        time.sleep(pause)
        for entry in sorted((self.path / self.current).iterdir()):
            entry.unlink()
        (self.path / self.current).rmdir()
        time.sleep(pause)
        for key in self.keys - files.keys():
            (self.path / key).unlink()  # dangling since the swap
        self.current, self.keys = new, set(files)


def test_a_kubelet_configmap_update_applies_the_new_routes_and_loses_nothing(tmp_path):
    sidecar = SidecarProcess(tmp_path, CONFIG.format(base=tmp_path))
    volume = ConfigMapVolume(sidecar.routes_dir, BEFORE, "2026_12_03_10_00_00.123")
    sidecar.start()
    sender = SteadySender(sidecar, "app", per_second=1000)
    try:
        sender.start()
        wait_until(lambda: len(read_jsonl(tmp_path / "old" / "app.jsonl")) > 300, what="messages routed to old")
        volume.update(AFTER, "2026_12_03_10_05_00.456", STEP)
        wait_until(lambda: "reload applied" in sidecar.log(), timeout=10, what="the reload")
        sent_after_reload = sender.sent
        wait_until(lambda: sender.sent > sent_after_reload + 500, what="messages sent after the reload")
        sent = sender.stop()
        old = seqs(read_jsonl(tmp_path / "old" / "app.jsonl"))
        new = seqs(read_jsonl(tmp_path / "new" / "app.jsonl"))

        def all_arrived():
            nonlocal old, new
            old = seqs(read_jsonl(tmp_path / "old" / "app.jsonl"))
            new = seqs(read_jsonl(tmp_path / "new" / "app.jsonl"))
            return len(old) + len(new) >= sent

        wait_until(all_arrived, what=f"all {sent} messages in old/ and new/")
        assert sorted(old + new) == list(range(sent)), "each message once, in one of the two backends"
        # The switch is one point in the stream: everything before it went to old, after it to new.
        assert old == list(range(len(old))) and new == list(range(len(old), sent))
        assert len(old) <= sent_after_reload < sent
    finally:
        if sender.is_alive():
            sender.stop()
        code = sidecar.stop()
    log = sidecar.log()
    assert code == 0, log[-3000:]
    applied = re.findall(r"reload applied \((.*?)\)", log)
    assert len(applied) == 1, f"one reload for one update, got {applied}"
    assert "default.yaml" in applied[0] and "added.yaml" in applied[0] and "retired.yaml" in applied[0], applied
    # The hidden entries are not route files: nothing about them, no warning, no error.
    assert ".." + "data" not in log and "..2026" not in log, log[-3000:]
    assert not re.search(r"level=(warning|error|critical)|reload rejected|Traceback", log), log[-3000:]
    assert sorted(os.listdir(sidecar.routes_dir)) == ["..2026_12_03_10_05_00.456", "..data", "added.yaml", "default.yaml"]


# What a routes directory can hold: regular files, directories, symlinks to either, dangling ones.
ENTRY_KINDS = ("file", "directory", "link to file", "link to directory", "dangling link")
NAMES = st.from_regex(r"\.{0,2}[a-z0-9_]{1,8}(\.yaml|\.yml|\.json|\.yaml\.tmp|)", fullmatch=True)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(NAMES, st.sampled_from(ENTRY_KINDS), max_size=8))
def test_route_files_are_the_visible_yaml_files_that_resolve_to_files(entries):
    with tempfile.TemporaryDirectory() as scratch:
        routes, elsewhere = Path(scratch) / "routes.d", Path(scratch) / "elsewhere"
        routes.mkdir()
        elsewhere.mkdir()
        (elsewhere / "target.yaml").write_text("all: []\n")
        for name, kind in entries.items():
            path = routes / name
            if kind == "file":
                path.write_text("all: []\n")
            elif kind == "directory":
                path.mkdir()
            elif kind == "link to file":
                path.symlink_to(elsewhere / "target.yaml")
            elif kind == "link to directory":
                path.symlink_to(elsewhere)
            else:
                path.symlink_to(elsewhere / "missing.yaml")
        expected = sorted(
            name for name, kind in entries.items()
            if kind in ("file", "link to file") and not name.startswith(".") and name.endswith((".yaml", ".yml"))
        )
        assert [p.name for p in route_files(routes)] == expected
