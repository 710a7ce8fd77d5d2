"""The delivery machinery around a backend: queue policies, circuit breaker, batching, accounting."""

import math
import attrs
import orjson
import pytest
import trio
import trio.testing

from sidecar.batch import Batch
from sidecar.backends.filesystem import FilesystemSettings
from sidecar.config import BackendSpec, BatchSettings, CircuitBreakerSettings, DeliverySettings, QueueSettings, RetrySettings
from sidecar.delivery import BackendSupervisor, CircuitBreaker, DeliveryQueue, backoff_delay, count_within, log_directory_name


def msgs(n, source="svc", level="info", start=0):
    return Batch.of([{"source": source, "type": "event", "timestamp": "2025-10-20T10:30:45.123Z", "data": {"level": level, "message": f"m{start + i}"}} for i in range(n)])


async def drain(queue, at_most=10):
    """The texts of every message left in the queue, taken `at_most` at a time."""
    texts = []
    while queue.depth:
        batches = await queue.get(at_most)
        assert 0 < sum(map(len, batches)) <= at_most
        for batch in batches:
            assert batch.lines == [orjson.dumps(m) for m in batch.messages()]
            texts += [m["data"]["message"] for m in batch.messages()]
    return texts


async def test_block_policy_waits_for_room():
    queue = DeliveryQueue(QueueSettings(mode="memory", max_messages=3, when_full="block"))
    await queue.put(msgs(3))
    done = trio.Event()

    async def producer():
        await queue.put(msgs(2))
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(producer)
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()
        assert sum(map(len, await queue.get(2))) == 2
        await done.wait()
    assert queue.depth == 3


async def test_the_accounting_holds_while_a_put_waits_for_room(tmp_path):
    # block: the correlator's put waits while the backend cannot write; the messages it holds
    # are queued (entering), never missing from routed = delivered + dropped + queued.
    spec = file_spec(tmp_path / "unmounted", queue=QueueSettings(mode="memory", max_messages=10, when_full="block"), batch=BatchSettings(max_messages=5, timeout=0.01))
    supervisor = BackendSupervisor(spec)
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        for start in (0, 10, 20):  # more than the queue and the supervisor's batches hold
            nursery.start_soon(supervisor.put, msgs(10, start=start))
            await trio.sleep(0.1)
        stats = supervisor.statistics()
        assert stats["queue"]["entering"] == 10 and stats["queue"]["depth"] >= 10, stats["queue"]
        assert stats["routed"] == 30 and stats["queued"] == 30 and stats["delivered"] == 0
        assert_accounting(supervisor)
        nursery.cancel_scope.cancel()


class AccountingWatch(trio.abc.Instrument):
    """Checks `routed = delivered + dropped + queued` after every step of every task: what the
    status writer or the HTTP view, which run between any two steps, could ever read."""

    def __init__(self, supervisor):
        self.supervisor = supervisor
        self.steps = 0
        self.failures: list[dict] = []

    def after_task_step(self, task):
        self.steps += 1
        stats = self.supervisor.statistics()
        if stats["routed"] != stats["delivered"] + sum(stats["dropped"].values()) + stats["queued"] and len(self.failures) < 3:
            self.failures.append({key: stats[key] for key in ("routed", "delivered", "dropped", "queued", "queue")} | {"task": task.name})


@pytest.mark.parametrize("mode", ["disk", "memory"])
async def test_the_accounting_holds_after_every_task_step(tmp_path, mode):
    # The writes fail until the directory appears, then succeed: retries, hand-outs, flushes
    # and acknowledgements, with a producer putting batches of every size meanwhile.
    spec = file_spec(tmp_path / "unmounted", queue=QueueSettings(mode=mode, max_messages=40), batch=BatchSettings(max_messages=7, timeout=0.01), retry=RetrySettings(initial_backoff=0.01, max_backoff=0.02))
    supervisor = BackendSupervisor(spec, data_dir=tmp_path / "data")
    watch = AccountingWatch(supervisor)
    trio.lowlevel.add_instrument(watch)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(supervisor.run)
            sent = 0
            for size in [1, 5, 13, 2, 30, 7, 1, 1, 8] * 3:
                await supervisor.put(msgs(size, start=sent))
                sent += size
                await trio.sleep(0.005)
                if sent > 100:
                    (tmp_path / "unmounted").mkdir(exist_ok=True)
            await wait_until(lambda: supervisor.delivered + sum(supervisor.dropped.values()) == sent, what="everything delivered or dropped")
            supervisor.close()
    finally:
        trio.lowlevel.remove_instrument(watch)
    assert supervisor.queue.statistics()["mode"] == mode
    assert watch.steps > 50 and supervisor.retries > 0
    assert not watch.failures, watch.failures


async def test_drop_newest_keeps_what_was_there():
    queue = DeliveryQueue(QueueSettings(mode="memory", max_messages=3, when_full="drop_newest"))
    assert await queue.put(msgs(2)) == (0, None)
    assert await queue.put(msgs(3, start=2)) == (2, "queue_full")
    assert await drain(queue) == ["m0", "m1", "m2"]


async def test_drop_oldest_keeps_the_newest():
    queue = DeliveryQueue(QueueSettings(mode="memory", max_messages=3, when_full="drop_oldest"))
    await queue.put(msgs(2))
    assert await queue.put(msgs(2, start=2)) == (1, "queue_full")
    assert await queue.put(msgs(5, start=4)) == (5 - 3 + 3, "queue_full")
    assert await drain(queue) == ["m6", "m7", "m8"]


@pytest.mark.parametrize("when_full", ["drop_oldest", "drop_newest", "block"])
async def test_lines_stay_paired_with_their_messages(when_full):
    # Slices by the overflow policy and by `get`: each line and timestamp is always its own
    # message's.
    queue = DeliveryQueue(QueueSettings(mode="memory", max_messages=5, when_full=when_full))
    await queue.put(msgs(3))
    await queue.put(msgs(2, start=3))
    if when_full != "block":
        await queue.put(msgs(4, start=5))
    taken = await drain(queue, at_most=2)
    expected = {"drop_oldest": ["m4", "m5", "m6", "m7", "m8"], "drop_newest": ["m0", "m1", "m2", "m3", "m4"], "block": ["m0", "m1", "m2", "m3", "m4"]}
    assert taken == expected[when_full]


async def test_get_never_mutates_a_chunk_shared_with_other_queues():
    chunk = msgs(3)
    first, second = DeliveryQueue(QueueSettings(mode="memory")), DeliveryQueue(QueueSettings(mode="memory"))
    for queue in (first, second):
        await queue.put(chunk)
        await queue.put(msgs(2, start=3))
    assert [len(b) for b in await first.get(4)] == [3, 1]
    assert len(chunk) == 3 and len(chunk.messages()) == 3
    assert [len(b) for b in await second.get(10)] == [3, 2]


async def test_closed_queue_drains_then_ends():
    queue = DeliveryQueue(QueueSettings(mode="memory"))
    await queue.put(msgs(2))
    queue.close()
    assert sum(map(len, await queue.get(10))) == 2
    with pytest.raises(trio.EndOfChannel):
        await queue.get(10)


def test_circuit_breaker_opens_probes_half_opens_and_closes():
    breaker = CircuitBreaker(CircuitBreakerSettings(failure_threshold=3, probe_interval=0.5, reset_timeout=1.0, max_reset_timeout=3.0))
    assert not breaker.record_failure(0.0)
    assert not breaker.record_failure(0.1)
    assert breaker.record_failure(0.2)
    assert breaker.state == "open" and breaker.ready_at() == pytest.approx(0.7)
    for now in (0.7, 1.2, 1.7, 30.0):  # an outage: probes fail at the fixed interval, nothing doubles
        breaker.probe_failed(now)
        assert breaker.ready_at() == pytest.approx(now + 0.5) and breaker.reset_timeout == 0.0
    breaker.probe_passed()
    assert breaker.state == "half_open" and breaker.ready_at() == -math.inf
    breaker.record_failure(30.6)  # answers probes, refuses writes: held off, doubling
    assert breaker.state == "open" and breaker.reset_timeout == 1.0 and breaker.ready_at() == pytest.approx(31.6)
    breaker.probe_passed()
    breaker.record_failure(31.6)
    assert breaker.reset_timeout == 2.0
    breaker.probe_passed()
    breaker.record_failure(33.6)
    assert breaker.reset_timeout == 3.0  # capped
    breaker.probe_passed()
    breaker.record_success()
    assert breaker.state == "closed" and breaker.consecutive_failures == 0 and breaker.reset_timeout == 0.0
    assert breaker.times_opened == 1


def test_an_error_a_person_must_fix_holds_the_probes_off_doubling():
    breaker = CircuitBreaker(CircuitBreakerSettings(probe_interval=0.5, reset_timeout=1.0, max_reset_timeout=8.0))
    assert breaker.record_failure(0.0, trip=True)
    assert breaker.ready_at() == pytest.approx(1.0)
    breaker.probe_failed(1.0, trip=True)
    assert breaker.ready_at() == pytest.approx(3.0)
    breaker.probe_failed(3.0)  # the password was fixed; the server is restarting
    assert breaker.ready_at() == pytest.approx(3.5)


def test_a_tripping_error_opens_the_circuit_at_once():
    breaker = CircuitBreaker(CircuitBreakerSettings(failure_threshold=5))
    assert breaker.record_failure(0.0, trip=True)
    assert breaker.state == "open"


def test_backoff_grows_is_capped_and_never_zero():
    for attempt in range(40):
        delay = backoff_delay(attempt, 0.1, 5.0)
        assert 0.05 <= delay <= 5.0
    assert backoff_delay(30, 0.1, 5.0) >= 2.5


def file_spec(base, **delivery) -> BackendSpec:
    settings = FilesystemSettings(base_path=str(base), path="{source}.jsonl", fsync="never")
    return BackendSpec("files", "filesystem", settings, attrs.evolve(DeliverySettings(), **delivery))


def lines(path):
    return [orjson.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


def assert_accounting(supervisor):
    stats = supervisor.statistics()
    assert stats["routed"] == stats["delivered"] + sum(stats["dropped"].values()) + stats["queued"], stats


async def wait_until(predicate, timeout=10.0, what="condition"):
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.01)
        return
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def test_batches_flush_by_size_by_time_and_at_once_for_errors(tmp_path):
    spec = file_spec(tmp_path, batch=BatchSettings(max_messages=10, timeout=2.0))
    supervisor = BackendSupervisor(spec)
    target = tmp_path / "svc.jsonl"
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        started = trio.current_time()
        await supervisor.put(msgs(25))
        await wait_until(lambda: len(lines(target)) == 20, what="two full batches")
        assert_accounting(supervisor)
        await wait_until(lambda: len(lines(target)) == 25, what="the remainder, by time")
        assert trio.current_time() - started >= 2.0
        await supervisor.put(msgs(1, level="error", start=25))
        before = trio.current_time()
        await wait_until(lambda: len(lines(target)) == 26, what="the error event")
        assert trio.current_time() - before < 1.5  # it did not wait for the batch timer
        supervisor.close()
    assert [m["data"]["message"] for m in lines(target)] == [f"m{i}" for i in range(26)]
    assert supervisor.delivered == 26
    assert_accounting(supervisor)


async def test_batches_are_cut_by_bytes_before_the_timer(tmp_path):
    spec = file_spec(tmp_path, batch=BatchSettings(max_messages=1000, timeout=30.0, max_bytes=1000))
    supervisor = BackendSupervisor(spec)
    target = tmp_path / "svc.jsonl"
    messages = Batch.of([{**m, "data": {"level": "info", "message": f"m{i:03d}"}} for i, m in enumerate(msgs(40).messages())])
    line_size = len(messages.lines[0]) + 1
    assert {len(line) + 1 for line in messages.lines} == {line_size}
    per_batch = 1000 // line_size
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        await supervisor.put(messages)
        # Cut while 1000 bytes or more wait; the remainder, under 1000, waits for the timer.
        waiting, cuts = 40, 0
        while waiting * line_size >= 1000:
            waiting, cuts = waiting - per_batch, cuts + 1
        await wait_until(lambda: len(lines(target)) == 40 - waiting, timeout=5, what="the batches that filled 1000 bytes")
        assert supervisor.batches == cuts and supervisor.queued == waiting > 0
        assert target.stat().st_size <= supervisor.batches * 1000
        assert_accounting(supervisor)
        supervisor.close()
    assert len(lines(target)) == 40  # the rest at close


def test_a_message_larger_than_max_bytes_still_goes_alone():
    assert count_within([b"x" * 50, b"y"], 10, 20) == 1
    assert count_within([b"x" * 5, b"y" * 5, b"z" * 5], 10, 12) == 2
    assert count_within([b"x"] * 5, 3, 1000) == 3


async def test_a_failing_backend_retries_opens_its_circuit_and_recovers(tmp_path):
    spec = file_spec(
        tmp_path,
        batch=BatchSettings(max_messages=5, timeout=0.05),
        retry=RetrySettings(initial_backoff=0.02, max_backoff=0.1),
        circuit_breaker=CircuitBreakerSettings(failure_threshold=3, reset_timeout=0.5, max_reset_timeout=0.5),
    )
    spec = attrs.evolve(spec, settings=attrs.evolve(spec.settings, base_path=str(tmp_path / "unmounted")))
    target = tmp_path / "unmounted" / "svc.jsonl"  # every write fails until its directory exists
    supervisor = BackendSupervisor(spec)
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        await supervisor.put(msgs(12))
        await wait_until(lambda: supervisor.breaker.times_opened >= 1, what="the circuit to open")
        stats = supervisor.statistics()
        assert stats["retries"] >= 3
        assert "does not exist (not mounted?)" in stats["last_error"]
        assert stats["delivered"] == 0 and stats["queued"] == 12
        assert_accounting(supervisor)
        attempts = supervisor.retries
        await trio.sleep(0.3)
        assert supervisor.retries == attempts  # open circuit: no writes, no spinning
        target.parent.mkdir()
        await wait_until(lambda: supervisor.delivered == 12, what="delivery after recovery")
        assert supervisor.statistics()["circuit"] == "closed"
        supervisor.close()
    assert [m["data"]["message"] for m in lines(target)] == [f"m{i}" for i in range(12)]
    assert_accounting(supervisor)


async def test_delivery_resumes_within_a_probe_interval_of_the_destination_coming_back(tmp_path, autojump_clock):
    spec = file_spec(
        tmp_path / "unmounted",
        batch=BatchSettings(max_messages=5, timeout=0.05),
        retry=RetrySettings(initial_backoff=0.02, max_backoff=0.1),
        circuit_breaker=CircuitBreakerSettings(failure_threshold=3, probe_interval=0.5, reset_timeout=5.0),
    )
    spec = attrs.evolve(spec, settings=attrs.evolve(spec.settings, io="inline"))  # no thread: the mock clock sees every wait
    supervisor = BackendSupervisor(spec)
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        await supervisor.put(msgs(12))
        await trio.sleep(120)  # a two-minute outage: probes, no writes
        assert supervisor.breaker.state == "open" and supervisor.retries == 3
        assert 200 <= supervisor.probes <= 240 and supervisor.breaker.reset_timeout == 0.0
        (tmp_path / "unmounted").mkdir()
        back = trio.current_time()
        await wait_until(lambda: supervisor.delivered == 12, what="delivery after recovery")
        assert trio.current_time() - back <= 0.5 + 0.1
        assert supervisor.statistics()["circuit"] == "closed"
        supervisor.close()
    assert_accounting(supervisor)


async def test_new_settings_cut_a_long_hold_off_short_and_take_the_queue_with_them(tmp_path, autojump_clock):
    # A refusal a person must fix holds the probes off for a minute; the fix arrives as new
    # settings for the same backend, and the queue is delivered with them at once.
    broken = file_spec(
        tmp_path / "unmounted",
        batch=BatchSettings(max_messages=5, timeout=0.05),
        circuit_breaker=CircuitBreakerSettings(failure_threshold=1, reset_timeout=60.0, max_reset_timeout=60.0),
    )
    broken = attrs.evolve(broken, settings=attrs.evolve(broken.settings, io="inline"))
    supervisor = BackendSupervisor(broken)
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        await supervisor.put(msgs(12))
        await trio.sleep(1)
        supervisor.breaker.probe_failed(trio.current_time(), trip=True)  # as a bad password would
        assert supervisor.breaker.ready_at() - trio.current_time() == 60.0
        (tmp_path / "mounted").mkdir()
        fixed = attrs.evolve(broken, settings=attrs.evolve(broken.settings, base_path=str(tmp_path / "mounted")))
        assert supervisor.can_take(fixed)
        assert_accounting(supervisor)
        supervisor.reconfigure(fixed)
        told = trio.current_time()
        await wait_until(lambda: supervisor.delivered == 12, what="delivery with the new settings")
        assert trio.current_time() - told < 0.2 and supervisor.reconfigured == 1 and supervisor.spec == fixed
        assert [m["data"]["message"] for m in lines(tmp_path / "mounted" / "svc.jsonl")] == [f"m{i}" for i in range(12)]
        supervisor.close()
    assert_accounting(supervisor)


def test_a_buffer_is_named_by_its_backend_not_by_its_settings(tmp_path):
    spec = file_spec(tmp_path)
    changed = attrs.evolve(spec, settings=attrs.evolve(spec.settings, base_path="/elsewhere"), delivery=attrs.evolve(spec.delivery, batch=BatchSettings(max_messages=7)))
    assert log_directory_name(spec) == log_directory_name(changed) == "files"
    with_overrides = attrs.evolve(spec, overrides=(("path", "{type}.jsonl"),))
    assert log_directory_name(with_overrides).startswith("files-") and log_directory_name(with_overrides) != log_directory_name(attrs.evolve(spec, overrides=(("path", "x"),)))
    assert "/" not in log_directory_name(attrs.evolve(spec, name="../up"))


async def test_overflow_is_counted_as_dropped_with_its_reason(tmp_path):
    spec = file_spec(tmp_path / "unmounted", queue=QueueSettings(mode="memory", max_messages=10, when_full="drop_newest"), batch=BatchSettings(max_messages=5, timeout=0.01))
    supervisor = BackendSupervisor(spec)
    async with trio.open_nursery() as nursery:
        await nursery.start(supervisor.run)
        for start in range(0, 100, 10):
            await supervisor.put(msgs(10, start=start))
            assert_accounting(supervisor)
            await trio.sleep(0.01)
        assert supervisor.dropped["queue_full"] > 0
        nursery.cancel_scope.cancel()
    assert_accounting(supervisor)


async def test_a_backend_type_missing_from_the_build_counts_its_messages_as_dropped(monkeypatch):
    from sidecar.backends import BACKEND_TYPES
    from sidecar.config import UnavailableSettings

    monkeypatch.setitem(BACKEND_TYPES, "tape", ("sidecar.backends.tape", "TapeBackend"))
    supervisor = BackendSupervisor(BackendSpec("archive", "tape", UnavailableSettings(()), DeliverySettings()))
    assert supervisor.backend is None
    await supervisor.put(msgs(4))
    assert supervisor.dropped["backend_unavailable"] == 4
    assert_accounting(supervisor)
