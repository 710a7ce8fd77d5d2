"""The kit every backend uses (sidecar.backends.base): the thread hand-off, and the batch's
received_at that S3 keys and CloudWatch's fallback timestamps come from."""

import threading
import time

import orjson
import pytest
import trio

from sidecar.backends.base import BlockingCalls
from sidecar.batch import Batch


def batch_of(received: list[str]) -> Batch:
    messages = [{"source": "svc", "type": "event", "timestamp": at, "received_at": at, "data": {"level": "info", "message": "m"}} for at in received]
    return Batch("svc", [orjson.dumps(m) for m in messages], list(received))


def test_a_batch_knows_when_its_first_message_arrived_through_every_cut():
    stamps = [f"2026-12-03T10:00:0{i}.000Z" for i in range(6)]
    given = Batch("svc", batch_of(stamps).lines, list(stamps), received_at="given")
    assert given.received_at == "given"  # from the correlator: nothing parsed
    read_back = batch_of(stamps)  # as from the disk log: read from the first line
    assert read_back.received_at == stamps[0]
    assert read_back.head(2).received_at == stamps[0]
    assert read_back.tail(2).received_at == stamps[2]
    front = read_back.take_front(3)
    assert (front.received_at, read_back.received_at) == (stamps[0], stamps[3])
    merged = Batch.empty("svc")
    merged.extend(front)
    merged.extend(read_back)
    assert merged.received_at == stamps[0] and len(merged) == 6
    assert Batch.empty("svc").received_at == ""


async def test_a_cancelled_call_that_has_not_started_never_starts():
    calls = BlockingCalls()
    release = threading.Event()
    ran = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(calls.run, release.wait)  # holds the one slot
        await trio.sleep(0.05)
        with trio.move_on_after(0.05):
            await calls.run(ran.append, "late")  # waits for the slot, then is cancelled
        release.set()
    time.sleep(0.05)  # its thread has had every chance to run it
    assert ran == []


async def test_a_running_call_is_interrupted_and_waited_for_before_cancellation_goes_on():
    stop = threading.Event()
    finished = []

    def stuck():
        stop.wait(10)
        finished.append(stop.is_set())

    calls = BlockingCalls(interrupt=stop.set, grace=5.0)
    with trio.move_on_after(0.1) as scope:
        await calls.run(stuck)
    assert scope.cancelled_caught
    assert finished == [True]  # interrupted, and over before run() gave up


async def test_a_call_past_its_grace_still_keeps_the_next_call_waiting():
    order = []
    release = threading.Event()

    def slow():
        release.wait(10)
        order.append("slow done")

    calls = BlockingCalls(grace=0.05)
    with trio.move_on_after(0.05):
        await calls.run(slow)  # no interrupt: given up on after its grace, still running
    assert order == []

    async def release_soon():
        await trio.sleep(0.1)
        release.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(release_soon)
        await calls.run(order.append, "next")
    assert order == ["slow done", "next"]


async def test_keywords_and_results_and_errors_pass_through():
    calls = BlockingCalls()
    assert await calls.run(dict, a=1) == {"a": 1}
    with pytest.raises(ZeroDivisionError):
        await calls.run(lambda: 1 / 0)


def test_passwords_are_taken_out_of_urls_and_libpq_strings_alike():
    from sidecar.redaction import without_passwords

    assert without_passwords("postgresql://sidecar:s3cr%40t@db:5432/x") == "postgresql://sidecar:***@db:5432/x"
    assert without_passwords("host=db password='it\\'s quoted' user=u") == "host=db password='***' user=u"
    assert without_passwords("PASSWORD = plain dbname=x") == "PASSWORD = *** dbname=x"
    assert without_passwords("no secret here: passwords=are_words") == "no secret here: passwords=are_words"


def test_a_forgetful_cache_stays_within_its_limit():
    from sidecar.bounded import ForgetfulCache

    cache = ForgetfulCache(limit=3)
    for key in range(10):
        assert cache.remember(key, key * 2) == key * 2
        assert len(cache) <= 3 and cache[key] == key * 2
