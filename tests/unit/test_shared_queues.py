"""ProcessSharedQueues: cpp-host's shared-queue semantics, in one process and across processes.

The same behaviour tests run against the in-process SharedQueueStore (the reference), then the
cross-process ones: several processes enqueueing and dequeueing one queue lose and duplicate
nothing, and an enqueue in one process wakes the owner registered in another.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from wasmgate.gateway import shared_queues
from wasmgate.gateway.shared_queues import ProcessSharedQueues
from wasmgate.gateway.shared_store import ProcessSharedData
from wasmgate.runtime.abi import Status
from wasmgate.runtime.shared import SharedQueueStore


@pytest.fixture
def data(tmp_path: Path) -> Iterator[ProcessSharedData]:
    created = ProcessSharedData.create(str(tmp_path), slots=256, arena_bytes=4 << 20,
                                       max_value=64 << 10)
    yield created
    created.close()
    created.unlink()


@pytest.fixture(params=["in-process", "across-processes"])
def queues(request: pytest.FixtureRequest, data: ProcessSharedData) -> Iterator[SharedQueueStore]:
    if request.param == "in-process":
        yield SharedQueueStore()
        return
    store = ProcessSharedQueues(data, 0)
    yield store
    store.close()


def ignore(owner: object, token: int) -> None:
    pass


def test_register_is_idempotent_per_vm_id_and_name(queues: SharedQueueStore) -> None:
    a = queues.register("vm", "q", "owner-1")
    assert isinstance(a, int) and a != 0
    assert queues.register("vm", "q", "owner-2") == a
    b = queues.register("vm", "other", "owner-1")
    c = queues.register("vm2", "q", "owner-1")
    assert len({a, b, c}) == 3 and 0 not in (b, c)
    assert queues.resolve("vm", "q") == a
    assert queues.resolve("vm2", "q") == c
    assert queues.resolve("vm", "missing") is None
    assert queues.resolve("nobody", "q") is None


def test_fifo_binary_items_empty_and_unknown_token(queues: SharedQueueStore) -> None:
    token = queues.register("vm", "q", "owner")
    assert isinstance(token, int)
    assert queues.dequeue(token) == Status.EMPTY
    items = [b"first", b"", b"\x00\xff binary \x00", b"x" * 5000]
    for item in items:
        assert queues.enqueue(token, item, ignore) == Status.OK
    assert queues.items(token) == items
    assert [queues.dequeue(token) for _ in items] == items
    assert queues.dequeue(token) == Status.EMPTY
    assert queues.enqueue(token, b"again", ignore) == Status.OK  # usable after draining
    assert queues.dequeue(token) == b"again"
    assert queues.enqueue(9999, b"x", ignore) == Status.NOT_FOUND
    assert queues.dequeue(9999) == Status.NOT_FOUND


def test_the_last_registrant_is_woken(queues: SharedQueueStore) -> None:
    woken: list[tuple[object, int]] = []
    token = queues.register("vm", "q", "first")
    assert queues.register("vm", "q", "second") == token
    assert queues.enqueue(token, b"item", lambda owner, t: woken.append((owner, t))) == Status.OK
    assert woken == [("second", token)]


def test_items_reuse_the_arena(data: ProcessSharedData) -> None:
    store = ProcessSharedQueues(data, 0)
    try:
        token = store.register("vm", "q", "owner")
        assert isinstance(token, int)
        for _ in range(3):  # warm the free lists
            store.enqueue(token, b"y" * 1000, ignore)
            store.dequeue(token)
        used = data.stats()["arena_used"]
        for i in range(5000):
            assert store.enqueue(token, b"y" * 1000, ignore) == Status.OK, i
            assert store.dequeue(token) == b"y" * 1000
        assert data.stats()["arena_used"] == used
    finally:
        store.close()


def test_limits_refuse_and_change_nothing(data: ProcessSharedData,
                                          caplog: pytest.LogCaptureFixture) -> None:
    store = ProcessSharedQueues(data, 0)
    try:
        token = store.register("vm", "q", "owner")
        assert isinstance(token, int)
        used = data.stats()["arena_used"]
        assert store.enqueue(token, b"z" * (data.max_value + 1), ignore) == Status.INTERNAL_FAILURE
        assert "queue item" in caplog.text
        assert data.stats()["arena_used"] == used and store.items(token) == []
        # fill the arena (4 MiB) with 64 KiB items until it refuses, then drain
        count = 0
        while store.enqueue(token, b"f" * (60 << 10), ignore) == Status.OK:
            count += 1
            assert count < 100
        assert count > 10 and "arena full" in caplog.text
        assert len(store.items(token)) == count
        for _ in range(count):
            assert store.dequeue(token) == b"f" * (60 << 10)
        assert store.enqueue(token, b"fits again", ignore) == Status.OK
    finally:
        store.close()


# -- across processes ---------------------------------------------------------------------------
def _producer(path: str, worker: int, count: int) -> None:
    store = ProcessSharedQueues(ProcessSharedData.attach(path), worker)
    token = store.resolve("vm", "q")
    assert token is not None
    for i in range(count):
        assert store.enqueue(token, f"{worker}:{i}".encode(), ignore) == Status.OK


def _consumer(path: str, worker: int, out: multiprocessing.Queue[list[bytes]]) -> None:
    store = ProcessSharedQueues(ProcessSharedData.attach(path), worker)
    token = store.resolve("vm", "q")
    assert token is not None
    got: list[bytes] = []
    misses = 0
    while misses < 200:
        item = store.dequeue(token)
        if isinstance(item, Status):
            misses += 1
            continue
        misses = 0
        got.append(item)
    out.put(got)


def test_four_producers_lose_and_reorder_nothing(data: ProcessSharedData) -> None:
    store = ProcessSharedQueues(data, 0)
    try:
        token = store.register("vm", "q", "owner")
        context = multiprocessing.get_context("spawn")
        processes = [context.Process(target=_producer, args=(data.path, w, 300))
                     for w in range(1, 5)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(60)
            assert process.exitcode == 0
        items = store.items(token)  # type: ignore[arg-type]
        assert len(items) == 1200
        for worker in range(1, 5):  # each producer's items in its own order
            mine = [i for i in items if i.startswith(f"{worker}:".encode())]
            assert mine == [f"{worker}:{i}".encode() for i in range(300)]
    finally:
        store.close()


def test_concurrent_consumers_dequeue_each_item_once(data: ProcessSharedData) -> None:
    store = ProcessSharedQueues(data, 0)
    try:
        token = store.register("vm", "q", "owner")
        assert isinstance(token, int)
        sent = [f"item-{i}".encode() for i in range(2000)]
        for item in sent:
            store.enqueue(token, item, ignore)
        context = multiprocessing.get_context("spawn")
        out: multiprocessing.Queue[list[bytes]] = context.Queue()
        processes = [context.Process(target=_consumer, args=(data.path, w, out))
                     for w in (1, 2)]
        for process in processes:
            process.start()
        results = [out.get(timeout=60) for _ in processes]
        for process in processes:
            process.join(60)
        received = results[0] + results[1]
        assert sorted(received) == sorted(sent)  # every item exactly once
        for got in results:  # and each consumer saw them in queue order
            assert got == sorted(got, key=sent.index)
    finally:
        store.close()


def test_an_enqueue_in_another_process_wakes_the_owner(data: ProcessSharedData) -> None:
    async def scenario() -> list[tuple[object, int]]:
        loop = asyncio.get_running_loop()
        owner_store = ProcessSharedQueues(data, 0)
        woken: list[tuple[object, int]] = []
        done = asyncio.Event()

        def notify(owner: object, token: int) -> None:
            woken.append((owner, token))
            if len(woken) == 3:
                done.set()

        owner_store.listen(loop, notify)
        try:
            owner_store.register("vm", "q", "the-owner")
            context = multiprocessing.get_context("spawn")
            process = context.Process(target=_producer, args=(data.path, 1, 3))
            process.start()
            await asyncio.wait_for(done.wait(), 60)
            await loop.run_in_executor(None, process.join, 60)
            assert process.exitcode == 0
            assert [owner_store.dequeue(woken[0][1]) for _ in range(3)] == \
                [b"1:0", b"1:1", b"1:2"]
            return woken
        finally:
            owner_store.close()

    woken = asyncio.run(scenario())
    token = woken[0][1]
    assert woken == [("the-owner", token)] * 3


def test_an_owner_that_has_gone_leaves_the_items(data: ProcessSharedData) -> None:
    gone = ProcessSharedQueues(data, 7)
    token = gone.register("vm", "q", "owner-in-worker-7")
    gone.close()  # worker 7 exits: its wake-up socket is gone
    store = ProcessSharedQueues(data, 0)
    try:
        assert store.enqueue(token, b"kept", ignore) == Status.OK  # type: ignore[arg-type]
        assert store.dequeue(token) == b"kept"  # type: ignore[arg-type]
    finally:
        store.close()


def test_a_burst_of_enqueues_in_another_worker_wakes_the_owner_once_per_item(
        data: ProcessSharedData) -> None:
    """More wake-ups than the kernel's datagram queue holds (net.unix.max_dgram_qlen, often
    10) while the owner's loop is busy: none is lost, as Envoy calls on_queue_ready once per
    enqueue and plugins often dequeue one item per call."""
    async def scenario() -> int:
        loop = asyncio.get_running_loop()
        owner_store = ProcessSharedQueues(data, 0)
        woken: list[int] = []
        done = asyncio.Event()

        def notify(owner: object, token: int) -> None:
            woken.append(token)
            if len(woken) == 100:
                done.set()

        owner_store.listen(loop, notify)
        try:
            owner_store.register("vm", "q", "the-owner")
            context = multiprocessing.get_context("spawn")
            process = context.Process(target=_producer, args=(data.path, 1, 100))
            process.start()
            process.join(60)  # blocks the loop until the producer is done: wake-ups wait
            assert process.exitcode == 0
            await asyncio.wait_for(done.wait(), 30)
            await asyncio.sleep(0.1)  # and no extra ones follow
            return len(woken)
        finally:
            owner_store.close()

    assert asyncio.run(scenario()) == 100


def _die_while_publishing(path: str, token: int) -> None:
    """Enqueue, and die (as SIGKILL would) right after linking the item to the tail, before
    the record is updated: the worst point of an enqueue."""
    real = shared_queues._RECORD

    class DieOnPublish:
        size = real.size

        def unpack_from(self, *args: object) -> tuple[int, ...]:
            return real.unpack_from(*args)  # type: ignore[arg-type]

        def pack_into(self, *args: object) -> None:
            os._exit(9)

    shared_queues._RECORD = DieOnPublish()  # type: ignore[assignment]
    store = ProcessSharedQueues(ProcessSharedData.attach(path), 1)
    store.enqueue(token, b"B" * 500, ignore)


def test_a_worker_killed_mid_enqueue_loses_that_item_and_corrupts_nothing(
        data: ProcessSharedData) -> None:
    store = ProcessSharedQueues(data, 0)
    try:
        token = store.register("vm", "q", "owner")
        assert isinstance(token, int)
        assert store.enqueue(token, b"A" * 500, ignore) == Status.OK
        process = multiprocessing.get_context("spawn").Process(
            target=_die_while_publishing, args=(data.path, token))
        process.start()
        process.join(60)
        assert process.exitcode == 9
        assert store.dequeue(token) == b"A" * 500
        assert store.dequeue(token) == Status.EMPTY  # B was lost with its worker
        assert store.enqueue(token, b"C" * 10, ignore) == Status.OK
        for i in range(3):  # reuse freed blocks: they must not overlap live ones
            assert data.set("vm", b"k%d" % i, bytes([65 + i]) * 900, 0) == Status.OK
        assert store.items(token) == [b"C" * 10]
        assert store.dequeue(token) == b"C" * 10
        assert store.dequeue(token) == Status.EMPTY
        for i in range(3):
            assert data.get("vm", b"k%d" % i)[0] == bytes([65 + i]) * 900  # type: ignore[index]
    finally:
        store.close()
