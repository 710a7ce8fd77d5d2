"""The disk buffer: order, restart after SIGTERM or SIGKILL, damaged segments, its cap."""

import os
import re
import signal

import orjson
import trio

from sidecar.batch import Batch
from sidecar.config import QueueSettings
from sidecar.delivery import DeliveryQueue
from sidecar.spill import HEADER, SpillLog
from tests.harness import SidecarProcess, event, read_jsonl, seqs


def chunk(start, n, source="svc"):
    return [event(source, i) for i in range(start, start + n)]


def chunk_lines(start, n, source="svc"):
    """The JSON lines of `chunk`, as the disk buffer takes them."""
    return list(map(orjson.dumps, chunk(start, n, source)))


def test_records_come_back_in_order_and_segments_go_once_acknowledged(tmp_path):
    log = SpillLog(tmp_path, max_bytes=10**9, segment_bytes=2000)
    for start in range(0, 100, 10):
        assert log.append(chunk_lines(start, 10))
    assert log.unread == 100 and len(log.segments) > 2
    records = log.read(35)
    got = [m for _segment, messages in records for m in messages]
    assert seqs(got) == list(range(40))  # whole records: up to the one that passes 35
    files_before = len(list(tmp_path.iterdir()))
    counts = {}
    for segment, messages in records:
        counts[segment] = counts.get(segment, 0) + len(messages)
    log.acknowledge(counts)
    assert len(list(tmp_path.iterdir())) < files_before
    rest = [m for _s, messages in log.read(1000) for m in messages]
    assert seqs(rest) == list(range(40, 100))
    assert log.unread == 0


def test_a_new_log_on_the_same_directory_finds_what_was_not_acknowledged(tmp_path):
    first = SpillLog(tmp_path, max_bytes=10**9)
    first.append(chunk_lines(0, 5))
    first.append(chunk_lines(5, 5))
    first.read(5)  # handed out, never acknowledged: a crash before delivery
    os.close(first.lock_fd)  # as the crashed process's exit would
    second = SpillLog(tmp_path, max_bytes=10**9)
    assert second.unread == 10
    assert seqs([m for _s, ms in second.read(100) for m in ms]) == list(range(10))


def test_a_truncated_tail_is_counted_and_skipped(tmp_path):
    log = SpillLog(tmp_path, max_bytes=10**9)
    for start in range(0, 30, 10):
        log.append(chunk_lines(start, 10))
    log.close()
    segment = next(tmp_path.glob("segment-*.log"))
    data = segment.read_bytes()
    segment.write_bytes(data[:-7])  # the last record loses its end
    recovered = SpillLog(tmp_path, max_bytes=10**9)
    assert recovered.unread == 20
    assert recovered.corrupt_segments == 1 and recovered.corrupt_bytes > HEADER.size
    assert seqs([m for _s, ms in recovered.read(100) for m in ms]) == list(range(20))


def test_garbage_in_a_segment_is_skipped_from_the_damage_on(tmp_path):
    log = SpillLog(tmp_path, max_bytes=10**9)
    log.append(chunk_lines(0, 10))
    log.append(chunk_lines(10, 10))
    log.close()
    segment = next(tmp_path.glob("segment-*.log"))
    data = bytearray(segment.read_bytes())
    data[-20] ^= 0xFF  # a flipped byte in the second record's payload: its CRC fails
    segment.write_bytes(bytes(data))
    recovered = SpillLog(tmp_path, max_bytes=10**9)
    assert recovered.unread == 10 and recovered.corrupt_segments == 1


def test_the_cap_refuses_a_chunk_whole(tmp_path):
    log = SpillLog(tmp_path, max_bytes=3000)
    accepted = sum(log.append(chunk_lines(i * 5, 5)) for i in range(20))
    assert 0 < accepted < 20
    assert log.bytes_on_disk <= 3000


async def test_a_spilling_queue_keeps_order_across_memory_and_disk(tmp_path):
    queue = DeliveryQueue(QueueSettings(max_messages=10, when_full="spill"), SpillLog(tmp_path, max_bytes=10**9))
    for start in range(0, 100, 7):
        assert await queue.put(Batch.of(chunk(start, 7))) == 0
    assert queue.depth <= 10 + 7 and queue.spilled > 0
    got = []
    while len(got) < 105:
        for batch in await queue.get(8):
            got.extend(batch.messages())
            await queue.acknowledge(batch)
    assert seqs(got) == list(range(105))
    assert list(tmp_path.glob("segment-*.log")) == []
    queue.close()
    with trio.move_on_after(1):
        try:
            await queue.get(1)
        except trio.EndOfChannel:
            pass
        else:
            raise AssertionError("a drained, closed queue must end")


SPILL_CONFIG = """
tcp: {{host: 127.0.0.1, port: 0}}
storage: {{data_dir: {data}}}
shutdown: {{drain_timeout: 0.5}}
backends:
  files:
    type: filesystem
    base_path: {base}
    batch: {{max_messages: 10, timeout: 0.05}}
    queue: {{max_messages: 20, when_full: spill}}
    retry: {{initial_backoff: 0.05, max_backoff: 0.2}}
    circuit_breaker: {{failure_threshold: 2, reset_timeout: 0.2, max_reset_timeout: 0.3}}
routing:
  all: [{{backend: files}}]
"""


def start_spilling_sidecar(tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir(exist_ok=True)
    config = SPILL_CONFIG.format(data=tmp_path / "spool", base=tmp_path / "out")
    return SidecarProcess(workdir, config).start()


def test_spilled_records_survive_sigkill_and_a_damaged_segment(tmp_path):
    target = tmp_path / "out" / "svc.jsonl"  # the backend fails until its directory is there
    sidecar = start_spilling_sidecar(tmp_path)
    for start in range(0, 500, 20):  # 25 chunks, so the disk buffer holds many records
        sidecar.send(chunk(start, 20))
    stats = sidecar.wait_for(lambda s: s["received"] == 500 and s["backends"][0]["queue"]["spilled_messages"] > 400, what="most messages spilled")
    spilled = stats["backends"][0]["queue"]["spilled_messages"]
    sidecar.stop(signal.SIGKILL)
    # cut the newest segment in the middle of its last record, as a crash mid-write would
    newest = sorted((tmp_path / "spool").rglob("segment-*.log"))[-1]
    newest.write_bytes(newest.read_bytes()[:-30])
    target.parent.mkdir()
    again = start_spilling_sidecar(tmp_path)
    final = again.wait_for(lambda s: s["backends"][0]["queued"] == 0 and s["backends"][0]["delivered"] > 0, what="the disk buffer delivered")
    assert again.stop() == 0
    delivered = seqs(read_jsonl(target))
    # every record that reached the disk before the kill is delivered, except the damaged last one
    lost_to_damage = 500 - max(delivered) - 1
    assert 0 < lost_to_damage <= 20  # at most one chunk record
    assert delivered == sorted(delivered)
    assert set(range(500 - spilled, 500 - lost_to_damage)) <= set(delivered)
    assert final["backends"][0]["queue"]["spill_corrupt_segments"] == 1
    assert "damaged or truncated bytes" in again.log()


def test_sigterm_saves_what_memory_holds_and_the_next_start_delivers_everything(tmp_path):
    target = tmp_path / "out" / "svc.jsonl"  # the backend fails until its directory is there
    sidecar = start_spilling_sidecar(tmp_path)
    sidecar.send(chunk(0, 300))
    sidecar.wait_for(lambda s: s["received"] == 300, what="all received")
    assert sidecar.stop(signal.SIGTERM) == 0
    assert "undelivered messages saved to the disk buffer" in sidecar.log()
    assert "undelivered messages: files=300 (300 on disk for the next start, 0 lost)" in sidecar.log()
    target.parent.mkdir()
    again = start_spilling_sidecar(tmp_path)
    again.wait_for(lambda s: s["backends"][0]["delivered"] >= 300 and s["backends"][0]["queued"] == 0, what="everything delivered after restart")
    assert again.stop() == 0
    assert sorted(set(seqs(read_jsonl(target)))) == list(range(300))


def rewrite_config(sidecar: SidecarProcess, tmp_path, *, base, name="files", batch=10) -> None:
    text = SPILL_CONFIG.format(data=tmp_path / "spool", base=base)
    text = text.replace("  files:\n", f"  {name}:\n").replace("{backend: files}", f"{{backend: {name}}}").replace("max_messages: 10,", f"max_messages: {batch},")
    temporary = sidecar.config_path.with_suffix(".tmp")
    temporary.write_text(text)
    temporary.replace(sidecar.config_path)
    status, body = sidecar.http("/api/reload", method="POST")
    assert status == 200, body


def test_new_settings_for_a_backend_deliver_what_its_disk_buffer_holds(tmp_path):
    # base_path is not mounted, so the messages spill; the operator then points the backend at
    # another path and a larger batch: the same destination by name, with new settings.
    sidecar = start_spilling_sidecar(tmp_path)
    sidecar.send(chunk(0, 300))
    sidecar.wait_for(lambda s: s["received"] == 300 and s["backends"][0]["queue"]["spilled_messages"] > 200, what="most messages spilled")
    mounted = tmp_path / "mounted"
    mounted.mkdir()
    rewrite_config(sidecar, tmp_path, base=mounted, batch=50)
    stats = sidecar.wait_for(lambda s: s["backends"][0]["delivered"] == 300 and s["backends"][0]["queued"] == 0, what="the buffer delivered with the new settings")
    (backend,) = stats["backends"]
    assert backend["reconfigured"] == 1 and backend["dropped"] == {} and backend["routed"] == 300
    assert sorted(seqs(read_jsonl(mounted / "svc.jsonl"))) == list(range(300))
    assert sidecar.stop() == 0


def test_a_removed_backends_disk_buffer_is_reported_kept_and_delivered_when_it_returns(tmp_path):
    sidecar = start_spilling_sidecar(tmp_path)
    sidecar.send(chunk(0, 300))
    sidecar.wait_for(lambda s: s["received"] == 300, what="all received")
    assert sidecar.stop(signal.SIGTERM) == 0
    # Restarted with the backend renamed: its buffer is no one's, and says so.
    rewrite = SPILL_CONFIG.format(data=tmp_path / "spool", base=tmp_path / "out").replace("  files:\n", "  archive:\n").replace("{backend: files}", "{backend: archive}")
    again = SidecarProcess(tmp_path / "run", rewrite).start()
    try:
        status, body = again.http("/api/backends")
        (orphan,) = orjson.loads(body)["orphaned_buffers"]
        assert orphan["directory"] == str(tmp_path / "spool" / "files") and orphan["messages"] == 300
        assert "holds 300 messages that no configured backend owns" in again.log()
        assert (tmp_path / "spool" / "files").is_dir()
        # The backend comes back under its name: it delivers the buffer, and nothing is orphaned.
        (tmp_path / "out").mkdir()
        rewrite_config(again, tmp_path, base=tmp_path / "out")
        stats = again.wait_for(lambda s: any(b["backend"] == "files" and b["delivered"] == 300 and b["queued"] == 0 for b in s["backends"]), what="the buffer delivered")
        assert stats["orphaned_buffers"] == []
        assert sorted(seqs(read_jsonl(tmp_path / "out" / "svc.jsonl"))) == list(range(300))
    finally:
        assert again.stop() == 0


def test_two_sidecars_on_one_data_dir_never_share_a_disk_buffer(tmp_path):
    first = start_spilling_sidecar(tmp_path)
    second_dir = tmp_path / "second"
    second_dir.mkdir()
    second = SidecarProcess(second_dir, SPILL_CONFIG.format(data=tmp_path / "spool", base=tmp_path / "out")).start()
    try:
        assert "no disk buffer" in second.log() and "in use by another sidecar on the same data_dir" in second.log()
        assert second.backend("files")["queue"]["when_full"] == "drop_newest"
        assert first.backend("files")["queue"]["when_full"] == "spill"
    finally:
        assert second.stop() == 0
        assert first.stop() == 0


def test_a_data_dir_that_cannot_be_written_leaves_the_queue_in_memory_with_a_warning(tmp_path):
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where data_dir's directory would go\n")
    sidecar = SidecarProcess(tmp_path, SPILL_CONFIG.format(data=blocked / "spool", base=tmp_path / "out")).start()
    try:
        assert re.search(r"backend files: no disk buffer \(.*blocked/spool/files: .*\); its queue is in memory only: in an outage, messages beyond queue.max_messages \(20\) are dropped", sidecar.log()), sidecar.log()
        (tmp_path / "out").mkdir()
        sidecar.send(chunk(0, 10))
        sidecar.wait_for(lambda s: s["backends"][0]["delivered"] == 10, what="delivery from memory")
    finally:
        assert sidecar.stop() == 0
