"""The filesystem backend: confinement of wire-controlled paths, JSONL appends, rotation."""

import os
import urllib.parse

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.batch import Batch
from sidecar.backends.base import Attempt
from sidecar.backends.filesystem import FilesystemBackend, FilesystemSettings
from sidecar.naming import FILE_NAME, escaped


@given(st.text(max_size=300))
@settings(max_examples=500)
def test_any_source_name_resolves_inside_base_path(source):
    backend = FilesystemBackend(FilesystemSettings(base_path="/srv/logs", path="{source}/{type}-{date}.jsonl"), label="t")
    path = backend.path_for(source, source, source)
    assert path.startswith("/srv/logs/")
    assert os.path.normpath(path) == path
    assert ".." not in path.split("/")
    assert all(c.isascii() and c.isprintable() for c in path)


@pytest.mark.parametrize("source", ["../../etc/x", "..", ".", "/etc/passwd", "a/../../b", "x\x00y", "\u202e.jsonl"])
def test_hostile_source_names_are_escaped_into_one_component(source):
    component = escaped(source, FILE_NAME)
    assert "/" not in component and component not in (".", "..") and not component.startswith(".") and component.isascii()
    assert urllib.parse.unquote(component, errors="surrogatepass") == source


def event(source="svc", i=0, timestamp="2025-10-20T10:30:45.123Z"):
    return {"source": source, "type": "event", "timestamp": timestamp, "data": {"level": "info", "message": f"m{i}"}}


async def test_batches_append_as_jsonl(tmp_path):
    backend = FilesystemBackend(FilesystemSettings(base_path=str(tmp_path), fsync="batch"), label="t")
    await backend.open()
    await backend.write_batch(Attempt("../../etc/x", Batch.of([event("../../etc/x", i) for i in range(3)])))
    await backend.write_batch(Attempt("../../etc/x", Batch.of([event("../../etc/x", 3)])))
    await backend.aclose()
    written = tmp_path / "%2E.%2F..%2Fetc%2Fx.jsonl"
    assert [orjson.loads(line)["data"]["message"] for line in written.read_bytes().splitlines()] == ["m0", "m1", "m2", "m3"]
    assert sorted(os.listdir(tmp_path)) == ["%2E.%2F..%2Fetc%2Fx.jsonl"]


async def test_type_and_date_templates_split_a_batch(tmp_path):
    backend = FilesystemBackend(FilesystemSettings(base_path=str(tmp_path), path="{source}/{date}.jsonl"), label="t")
    await backend.open()
    await backend.write_batch(Attempt("svc", Batch.of([event(i=0, timestamp="2025-10-20T23:59:59.999Z"), event(i=1, timestamp="2025-10-21T00:00:00.000Z")])))
    await backend.aclose()
    assert sorted(os.listdir(tmp_path / "svc")) == ["2025-10-20.jsonl", "2025-10-21.jsonl"]


async def test_rotation_by_size_keeps_the_configured_number_of_files(tmp_path):
    backend = FilesystemBackend(FilesystemSettings(base_path=str(tmp_path), rotate_bytes=500, rotate_keep=2), label="t")
    await backend.open()
    for i in range(20):
        await backend.write_batch(Attempt("svc", Batch.of([event(i=i)])))
    await backend.aclose()
    names = sorted(os.listdir(tmp_path))
    assert names == ["svc.jsonl", "svc.jsonl.1", "svc.jsonl.2"]
    assert all(os.path.getsize(tmp_path / n) <= 500 for n in names)
    newest = [orjson.loads(line)["data"]["message"] for line in (tmp_path / "svc.jsonl").read_bytes().splitlines()]
    assert newest[-1] == "m19"


async def test_a_missing_base_path_is_retried_not_created_unless_asked(tmp_path):
    from sidecar.backends.base import RetryableError

    missing = tmp_path / "not-mounted"
    backend = FilesystemBackend(FilesystemSettings(base_path=str(missing)), label="t")
    with pytest.raises(RetryableError, match="does not exist"):
        await backend.open()
    assert not missing.exists()
    creating = FilesystemBackend(FilesystemSettings(base_path=str(missing), create_base_path=True), label="t")
    await creating.open()
    assert missing.is_dir()


def test_writes_go_to_a_thread_on_network_filesystems_only(tmp_path):
    from sidecar.backends.filesystem import is_network_filesystem

    mounts = "/dev/vda / ext4 rw 0 0\nserver:/export /mnt/nas nfs4 rw 0 0\nfs /mnt/nas/local ext4 rw 0 0\n"
    assert not is_network_filesystem("/srv/logs", mounts)
    assert is_network_filesystem("/mnt/nas/logs/deeper", mounts)
    assert not is_network_filesystem("/mnt/nas/local/x", mounts)  # the longest mount point wins
    assert is_network_filesystem("/srv/logs", "")  # unknown: safer in a thread
    local = FilesystemBackend(FilesystemSettings(base_path=str(tmp_path)), label="t")
    assert local._in_thread is is_network_filesystem(str(tmp_path))
    assert FilesystemBackend(FilesystemSettings(base_path=str(tmp_path), io="thread"), label="t")._in_thread
