"""The default disk queue in a running sidecar: SIGKILL and SIGTERM lose nothing accepted, a
damaged log costs only the damage, a buffer follows its backend's name through new settings and
absence, and a data_dir that cannot be used is said by path."""

import re
import signal
import threading

import orjson

from tests.harness import SidecarProcess, event, read_jsonl, seqs

DISK_CONFIG = """
tcp: {{host: 127.0.0.1, port: 0}}
storage: {{data_dir: {data}}}
shutdown: {{drain_timeout: 0.5}}
backends:
  files:
    type: filesystem
    base_path: {base}
    batch: {{max_messages: 10, timeout: 0.05}}
    queue: {{max_messages: 20}}
    retry: {{initial_backoff: 0.05, max_backoff: 0.2}}
    circuit_breaker: {{failure_threshold: 2, probe_interval: 0.1}}
routing:
  all: [{{backend: files}}]
"""


def chunk(start, n, source="svc"):
    return [event(source, i) for i in range(start, start + n)]


def start_sidecar(tmp_path, config=DISK_CONFIG):
    workdir = tmp_path / "run"
    workdir.mkdir(exist_ok=True)
    return SidecarProcess(workdir, config.format(data=tmp_path / "spool", base=tmp_path / "out")).start()


def held(stats) -> int:
    return stats["backends"][0]["queue"]["on_disk_messages"]


def test_sigkill_during_an_outage_loses_nothing_accepted(tmp_path):
    target = tmp_path / "out" / "svc.jsonl"  # the backend fails until its directory is there
    sidecar = start_sidecar(tmp_path)
    for start in range(0, 500, 20):
        sidecar.send(chunk(start, 20))
    sidecar.wait_for(lambda s: s["backends"][0]["queued"] == 500 and held(s) == 500, what="all 500 queued, on disk")
    sidecar.stop(signal.SIGKILL)
    target.parent.mkdir()
    again = start_sidecar(tmp_path)
    assert "500 messages from a previous run to deliver (at least once)" in again.log()
    final = again.wait_for(lambda s: s["backends"][0]["delivered"] == 500 and s["backends"][0]["queued"] == 0, what="the log delivered")
    assert again.stop() == 0
    assert seqs(read_jsonl(target)) == list(range(500))
    assert final["backends"][0]["routed"] == 500 and final["backends"][0]["dropped"] == {}


def test_sigkill_after_delivery_brings_back_only_what_was_not_acknowledged(tmp_path):
    (tmp_path / "out").mkdir()
    sidecar = start_sidecar(tmp_path)
    sidecar.send(chunk(0, 200))
    sidecar.wait_for(lambda s: s["backends"][0]["delivered"] == 200, what="the first 200 delivered")
    # The directory goes away: another source's messages wait in the log behind the first ones.
    (tmp_path / "out" / "svc.jsonl").rename(tmp_path / "first.jsonl")
    (tmp_path / "out").rmdir()
    sidecar.send(chunk(200, 300, source="other"))
    sidecar.wait_for(lambda s: s["backends"][0]["queued"] == 300, what="300 queued")
    sidecar.stop(signal.SIGKILL)
    (tmp_path / "out").mkdir()
    again = start_sidecar(tmp_path)
    again.wait_for(lambda s: s["backends"][0]["delivered"] >= 300 and s["backends"][0]["queued"] == 0, what="the rest delivered")
    assert again.stop() == 0
    assert seqs(read_jsonl(tmp_path / "out" / "other.jsonl")) == list(range(200, 500))
    assert not (tmp_path / "out" / "svc.jsonl").exists()  # acknowledged before the kill: not again


def test_a_damaged_log_costs_only_the_damaged_record(tmp_path):
    target = tmp_path / "out" / "svc.jsonl"
    sidecar = start_sidecar(tmp_path)
    for start in range(0, 500, 20):
        sidecar.send(chunk(start, 20))
    sidecar.wait_for(lambda s: held(s) == 500, what="all on disk")
    sidecar.stop(signal.SIGKILL)
    newest = sorted((tmp_path / "spool").rglob("segment-*.log"))[-1]
    newest.write_bytes(newest.read_bytes()[:-30])  # cut in its last record, as a crash mid-write would
    target.parent.mkdir()
    again = start_sidecar(tmp_path)
    final = again.wait_for(lambda s: s["backends"][0]["queued"] == 0 and s["backends"][0]["delivered"] > 0, what="the log delivered")
    assert again.stop() == 0
    delivered = seqs(read_jsonl(target))
    assert delivered == list(range(len(delivered))) and 480 <= len(delivered) < 500  # one chunk's record at most
    assert final["backends"][0]["queue"]["disk_corrupt_segments"] == 1
    assert "damaged or truncated bytes" in again.log()


def test_sigterm_leaves_everything_held_on_disk_and_says_so_exactly(tmp_path):
    target = tmp_path / "out" / "svc.jsonl"
    sidecar = start_sidecar(tmp_path)
    sidecar.send(chunk(0, 300))
    stats = sidecar.wait_for(lambda s: s["received"] == 300 and s["backends"][0]["queued"] == 300, what="all queued")
    status, metrics = sidecar.http("/metrics")
    size = stats["backends"][0]["queue"]["disk_bytes"]
    assert status == 200 and size > 300 * 50
    assert re.search(rb'sidecar_backend_disk_bytes\{backend="files",type="filesystem"\} (\d+)', metrics), metrics[-2000:]
    # storage.sync_interval (1 s): what was written is fsynced from a worker thread.
    sidecar.wait_for(lambda s: s["backends"][0]["queue"]["disk_syncs"] >= 1, what="an fsync of the log")
    assert sidecar.stop(signal.SIGTERM) == 0
    assert "undelivered messages: files=300 (300 on disk for the next start, 0 lost)" in sidecar.log()
    assert re.search(r"shutdown complete in [\d.]+s: received 300, delivered 0 \(all backends\), undelivered 300 \(on disk 300, lost 0\)", sidecar.log())
    target.parent.mkdir()
    again = start_sidecar(tmp_path)
    again.wait_for(lambda s: s["backends"][0]["delivered"] == 300 and s["backends"][0]["queued"] == 0, what="everything delivered after restart")
    assert again.stop() == 0
    assert seqs(read_jsonl(target)) == list(range(300))


def rewrite_config(sidecar: SidecarProcess, tmp_path, *, base, name="files", batch=10) -> None:
    text = DISK_CONFIG.format(data=tmp_path / "spool", base=base)
    text = text.replace("  files:\n", f"  {name}:\n").replace("{backend: files}", f"{{backend: {name}}}").replace("max_messages: 10,", f"max_messages: {batch},")
    temporary = sidecar.config_path.with_suffix(".tmp")
    temporary.write_text(text)
    temporary.replace(sidecar.config_path)
    status, body = sidecar.http("/api/reload", method="POST")
    assert status == 200, body


def test_new_settings_for_a_backend_deliver_what_its_log_holds(tmp_path):
    # base_path is not mounted; the operator then points the backend at another path with a
    # larger batch: the same destination by name, with new settings.
    sidecar = start_sidecar(tmp_path)
    sidecar.send(chunk(0, 300))
    sidecar.wait_for(lambda s: s["backends"][0]["queued"] == 300, what="all queued")
    mounted = tmp_path / "mounted"
    mounted.mkdir()
    rewrite_config(sidecar, tmp_path, base=mounted, batch=50)
    stats = sidecar.wait_for(lambda s: s["backends"][0]["delivered"] == 300 and s["backends"][0]["queued"] == 0, what="the log delivered with the new settings")
    (backend,) = stats["backends"]
    assert backend["reconfigured"] == 1 and backend["dropped"] == {} and backend["routed"] == 300
    assert seqs(read_jsonl(mounted / "svc.jsonl")) == list(range(300))
    assert sidecar.stop() == 0


def test_a_removed_backends_log_is_reported_kept_and_delivered_when_it_returns(tmp_path):
    sidecar = start_sidecar(tmp_path)
    sidecar.send(chunk(0, 300))
    sidecar.wait_for(lambda s: s["backends"][0]["queued"] == 300, what="all queued")
    assert sidecar.stop(signal.SIGTERM) == 0
    # Restarted with the backend renamed: its log is no one's, and says so.
    renamed = DISK_CONFIG.replace("  files:\n", "  archive:\n").replace("{{backend: files}}", "{{backend: archive}}")
    again = start_sidecar(tmp_path, renamed)
    try:
        status, body = again.http("/api/backends")
        (orphan,) = orjson.loads(body)["orphaned_buffers"]
        assert orphan["directory"] == str(tmp_path / "spool" / "files") and orphan["messages"] == 300
        assert "holds 300 messages that no configured backend owns" in again.log()
        # The backend comes back under its name: it delivers the log, and nothing is orphaned.
        (tmp_path / "out").mkdir()
        rewrite_config(again, tmp_path, base=tmp_path / "out")
        stats = again.wait_for(lambda s: any(b["backend"] == "files" and b["delivered"] == 300 and b["queued"] == 0 for b in s["backends"]), what="the log delivered")
        assert stats["orphaned_buffers"] == []
        assert seqs(read_jsonl(tmp_path / "out" / "svc.jsonl")) == list(range(300))
    finally:
        assert again.stop() == 0


def test_two_sidecars_on_one_data_dir_never_share_a_log(tmp_path):
    first = start_sidecar(tmp_path)
    second_dir = tmp_path / "second"
    second_dir.mkdir()
    second = SidecarProcess(second_dir, DISK_CONFIG.format(data=tmp_path / "spool", base=tmp_path / "out")).start()
    try:
        assert "no disk log" in second.log() and "in use by another sidecar on the same data_dir" in second.log()
        assert second.backend("files")["queue"]["mode"] == "memory"
        assert first.backend("files")["queue"]["mode"] == "disk"
    finally:
        assert second.stop() == 0
        assert first.stop() == 0


def test_a_data_dir_that_cannot_be_written_leaves_the_queue_in_memory_with_a_warning(tmp_path):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where data_dir's directory would go\n")
    sidecar = SidecarProcess(tmp_path, DISK_CONFIG.format(data=blocked / "spool", base=tmp_path / "out")).start()
    try:
        assert re.search(
            r"backend files: no disk log \(.*blocked/spool/files: .*\); its queue is in memory only: a crash loses what it holds, and an outage beyond queue.max_messages \(20\) drops messages",
            sidecar.log(),
        ), sidecar.log()
        (tmp_path / "out").mkdir()
        sidecar.send(chunk(0, 10))
        sidecar.wait_for(lambda s: s["backends"][0]["delivered"] == 10, what="delivery from memory")
    finally:
        assert sidecar.stop() == 0


def test_a_burst_of_500000_messages_reaches_the_filesystem_whole(tmp_path):
    # Defaults but for the paths: 4 connections as fast as they go, two of JSON lines, two of
    # MessagePack. The disk queue takes what the backend cannot yet write; nothing is dropped.
    import threading

    from tests.harness import FILES_CONFIG, encode

    sidecar = SidecarProcess(tmp_path, FILES_CONFIG.format(base=tmp_path / "out")).start()
    per_connection = 125_000
    payloads = [encode([event(f"burst-{c}", i) for i in range(per_connection)], "json" if c < 2 else "msgpack") for c in range(4)]

    def send(payload):
        with sidecar.connect() as conn:
            conn.sendall(payload)

    threads = [threading.Thread(target=send, args=(p,)) for p in payloads]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    final = sidecar.wait_for(lambda s: s["backends"][0]["delivered"] == 4 * per_connection, timeout=120, what="all 500,000 delivered")
    assert final["backends"][0]["dropped"] == {} and final["received"] == 4 * per_connection
    for c in range(4):
        assert seqs(read_jsonl(tmp_path / "out" / f"burst-{c}.jsonl")) == list(range(per_connection))
    assert sidecar.stop() == 0


BLOCK_CONFIG = """
tcp: {{host: 127.0.0.1, port: 0}}
storage: {{data_dir: {data}}}
backends:
  slow:
    type: filesystem
    base_path: {slow}
    batch: {{max_messages: 10, timeout: 0.05}}
    queue: {{mode: memory, max_messages: 50, when_full: block}}
    circuit_breaker: {{failure_threshold: 2, probe_interval: 0.1}}
  files:
    type: filesystem
    base_path: {base}
    create_base_path: true
    batch: {{timeout: 0.05}}
routing:
  both: [{{backend: slow}}, {{backend: files}}]
  other: [{{backend: files}}]
"""


def test_block_holds_back_only_the_connections_routed_to_the_full_backend(tmp_path):
    sidecar = SidecarProcess(tmp_path, BLOCK_CONFIG.format(data=tmp_path / "spool", slow=tmp_path / "slow", base=tmp_path / "out")).start()
    blocked = sidecar.connect()
    # Far more than the slow backend's queue and many of the sidecar's reads, so that it still
    # has some to read when it stops reading; from a thread, since sendall waits while the
    # connection is held back and the sockets' buffers are full.
    total = 20_000
    data = b"".join(orjson.dumps(m) + b"\n" for m in chunk(0, total, "both"))
    sender = threading.Thread(target=blocked.sendall, args=(data,), daemon=True)
    sender.start()
    held = sidecar.wait_for(lambda s: any(c["held_back"] for c in s["sources"]["tcp"]["connections"]), what="the connection held back")
    slow = next(b for b in held["backends"] if b["backend"] == "slow")
    assert slow["queue"]["entering"] > 0 and slow["routed"] == slow["delivered"] + sum(slow["dropped"].values()) + slow["queued"]
    # Another client whose source does not go to the full backend is served meanwhile.
    sidecar.send(chunk(0, 300, "other"))
    sidecar.wait_for(lambda s: len(read_jsonl(tmp_path / "out" / "other.jsonl")) == 300, what="the other source delivered while the first is held")
    assert any(c["held_back"] for c in sidecar.stats()["sources"]["tcp"]["connections"])
    # The slow backend's destination appears: the held connection goes on, nothing was dropped.
    (tmp_path / "slow").mkdir()
    final = sidecar.wait_for(lambda s: all(b["queued"] == 0 for b in s["backends"]) and len(read_jsonl(tmp_path / "slow" / "both.jsonl")) == total, timeout=60, what="everything delivered")
    sender.join(10)
    blocked.close()
    assert all(b["dropped"] == {} for b in final["backends"])
    assert seqs(read_jsonl(tmp_path / "slow" / "both.jsonl")) == list(range(total))
    assert seqs(read_jsonl(tmp_path / "out" / "both.jsonl")) == list(range(total))
    assert sidecar.stop() == 0
