"""ProcessSharedData: cpp-host's shared-data semantics, in one process and across processes."""

from __future__ import annotations

import multiprocessing
import pickle
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from wasmgate.gateway import shared_store
from wasmgate.gateway.shared_store import ProcessSharedData
from wasmgate.runtime.abi import Status
from wasmgate.runtime.shared import SharedDataStore


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ProcessSharedData]:
    created = ProcessSharedData.create(str(tmp_path), slots=64, arena_bytes=1 << 20,
                                       max_value=64 << 10)
    yield created
    created.close()
    created.unlink()


# The semantics every backend shares (missing keys, CAS rules, one counter, vm_id namespaces,
# binary data, random operation sequences against the in-process store) are tested once for
# all three stores, this one included, in test_redis_shared.py (`any_store`).


def test_cas_wraps_to_one_never_zero(store: ProcessSharedData) -> None:
    struct.pack_into("<Q", store._mm, shared_store._CAS_AT, 0xFFFFFFFF)
    store.set("vm", b"k", b"a", 0)
    assert store.get("vm", b"k")[1] == 0xFFFFFFFF  # type: ignore[index]
    store.set("vm", b"k", b"b", 0)
    assert store.get("vm", b"k")[1] == 1  # type: ignore[index]


def test_values_up_to_the_cap_and_past_it(store: ProcessSharedData) -> None:
    big = bytes(range(256)) * 256  # 64 KiB exactly
    assert store.set("vm", b"big", big, 0) == Status.OK
    assert store.get("vm", b"big")[0] == big  # type: ignore[index]
    cas = store.get("vm", b"big")[1]  # type: ignore[index]
    assert store.set("vm", b"big", big + b"x", 0) == Status.BAD_ARGUMENT
    assert store.get("vm", b"big") == (big, cas)  # untouched
    assert store.set("vm", b"k" * (65 << 10), b"v", 0) == Status.BAD_ARGUMENT
    assert store.set("vm", b"small", b"ok", 0) == Status.OK  # still usable


def test_growing_and_shrinking_values_reuse_blocks(store: ProcessSharedData) -> None:
    for i in range(2000):
        value = bytes([i % 256]) * ((i * 37) % 5000)
        assert store.set("vm", b"k", value, 0) == Status.OK
        assert store.get("vm", b"k")[0] == value  # type: ignore[index]
    assert store.stats()["arena_used"] < 64 << 10


def test_table_full_is_a_clear_error(store: ProcessSharedData) -> None:
    capacity = store.stats()["key_capacity"]
    for i in range(capacity):
        assert store.set("vm", b"k%d" % i, b"v", 0) == Status.OK
    assert store.set("vm", b"one-more", b"v", 0) == Status.INTERNAL_FAILURE
    assert store.get("vm", b"one-more") is None
    assert store.set("vm", b"k0", b"updated", 0) == Status.OK  # existing keys still update
    for i in range(1, capacity):
        assert store.get("vm", b"k%d" % i) == (b"v", store.get("vm", b"k%d" % i)[1])  # type: ignore[index]


def test_arena_full_is_a_clear_error(tmp_path: Path) -> None:
    store = ProcessSharedData.create(str(tmp_path), slots=64, arena_bytes=256 << 10,
                                     max_value=128 << 10)
    try:
        assert store.set("vm", b"a", b"x" * (100 << 10), 0) == Status.OK
        assert store.set("vm", b"b", b"y" * (100 << 10), 0) == Status.INTERNAL_FAILURE
        assert store.get("vm", b"b") is None
        assert store.get("vm", b"a")[0] == b"x" * (100 << 10)  # type: ignore[index]
        assert store.set("vm", b"c", b"small", 0) == Status.OK
    finally:
        store.close()
        store.unlink()


def test_pickles_as_its_path_and_attaches(store: ProcessSharedData) -> None:
    store.set("vm", b"k", b"v", 0)
    other = pickle.loads(pickle.dumps(store))
    try:
        assert other.get("vm", b"k") == store.get("vm", b"k")
        other.set("vm", b"k", b"w", 0)
        assert store.get("vm", b"k")[0] == b"w"  # type: ignore[index]
    finally:
        other.close()


def test_not_a_store_file(tmp_path: Path) -> None:
    path = tmp_path / "junk"
    path.write_bytes(b"\0" * 4096)
    with pytest.raises(ValueError, match="not a wasmgate shared-data file"):
        ProcessSharedData.attach(path)


def _increment(store: SharedDataStore, rounds: int, results: multiprocessing.Queue,
               go: Any) -> None:
    """CAS-increment one counter `rounds` times, as a rate limiter does; report the successes."""
    done = 0
    mismatches = 0
    results.put("ready")
    go.wait(60)  # start together, so that the writers really overlap
    for _ in range(rounds):
        while True:
            found = store.get("vm", b"counter")
            value, cas = (int(found[0]), found[1]) if found else (0, 0)
            status = store.set("vm", b"counter", b"%d" % (value + 1), cas)
            if status == Status.OK:
                done += 1
                break
            assert status == Status.CAS_MISMATCH
            mismatches += 1
    results.put((done, mismatches))


def assert_no_lost_cas_updates(store: SharedDataStore, workers: int, rounds: int) -> None:
    """`workers` spawned processes CAS-increment one counter `rounds` times each, all starting
    together: every increment lands, and the CAS refused a concurrent writer at least once."""
    context = multiprocessing.get_context("spawn")
    results: multiprocessing.Queue = context.Queue()
    store.set("vm", b"counter", b"0", 0)
    go = context.Event()
    processes = [context.Process(target=_increment, args=(store, rounds, results, go))
                 for _ in range(workers)]
    for process in processes:
        process.start()
    for _ in processes:  # every process at the start line
        assert results.get(timeout=120) == "ready"
    go.set()
    reports = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(30)
        assert process.exitcode == 0
    assert sum(done for done, _ in reports) == workers * rounds
    assert store.get("vm", b"counter")[0] == b"%d" % (workers * rounds)  # type: ignore[index]
    # the CAS actually refused concurrent writers at least once (else the test proves little)
    assert sum(mismatches for _, mismatches in reports) > 0


def test_no_lost_updates_across_processes(store: ProcessSharedData) -> None:
    assert_no_lost_cas_updates(store, workers=4, rounds=1500)


def _hammer_unconditional(store: ProcessSharedData, index: int, rounds: int) -> None:
    for i in range(rounds):
        store.set("vm", b"k%d-%d" % (index, i % 20), b"%d:%d" % (index, i) * (i % 50), 0)


def test_concurrent_new_keys_and_resizes_keep_the_table_consistent(
        store: ProcessSharedData) -> None:
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_hammer_unconditional, args=(store, i, 2000))
                 for i in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(120)
        assert process.exitcode == 0
    keys = sorted(store.keys("vm"))
    assert keys == sorted(b"k%d-%d" % (i, j) for i in range(2) for j in range(20))
    for i in range(2):
        for j in range(20):
            last = max(r for r in range(2000) if r % 20 == j)
            assert store.get("vm", b"k%d-%d" % (i, j))[0] == b"%d:%d" % (i, last) * (last % 50)  # type: ignore[index]


def test_in_process_cas_wraps_to_one_never_zero() -> None:
    store = SharedDataStore()
    store._cas_counter = 0xFFFFFFFF
    store.set("vm", b"k", b"a", 0)
    assert store.get("vm", b"k") == (b"a", 0xFFFFFFFF)
    store.set("vm", b"k", b"b", 0)
    assert store.get("vm", b"k") == (b"b", 1)
