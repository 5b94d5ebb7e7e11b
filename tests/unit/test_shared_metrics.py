"""ProcessMetricStore: Envoy's metric semantics as one set across processes; combining the
workers' gateway stats (stats.py)."""

from __future__ import annotations

import logging
import multiprocessing
import pickle
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from wasmgate.fetch.metrics import FetchMetrics
from wasmgate.gateway.shared_metrics import ProcessMetricStore
from wasmgate.gateway.stats import (
    GatewayStats,
    combine_fetch,
    combine_plugins,
    fetch_snapshot,
    render_plugin_metrics,
)
from wasmgate.runtime.abi import MetricType, Status
from wasmgate.runtime.metrics import MetricStore
from wasmgate.testing import Emulator

from ..conftest import CONFORMANCE

COUNTER, GAUGE, HISTOGRAM = MetricType.COUNTER, MetricType.GAUGE, MetricType.HISTOGRAM


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ProcessMetricStore]:
    created = ProcessMetricStore.create(str(tmp_path), workers=2, slots=64)
    yield created
    created.close()
    created.unlink()


def test_same_as_in_process_store(store: ProcessMetricStore) -> None:
    reference = MetricStore()
    ops: list[tuple[str, MetricType, str, int]] = [
        ("increment", COUNTER, "c", 5), ("increment", COUNTER, "c", 0),
        ("increment", COUNTER, "c", -1), ("record", COUNTER, "c", 3),
        ("record", GAUGE, "g", 10), ("increment", GAUGE, "g", -13), ("record", GAUGE, "g2", 4),
        ("record", HISTOGRAM, "h", 12), ("record", HISTOGRAM, "h", 700),
        ("increment", HISTOGRAM, "h", 1), ("record", HISTOGRAM, "h", 10**9),
        ("record", GAUGE, "c", 99),  # defined as a counter first: stays one
    ]
    for op, kind, name, arg in ops:
        ours, theirs = store.define(kind, name), reference.define(kind, name)
        assert ours.type == theirs.type
        assert getattr(store, op)(ours, arg) == getattr(reference, op)(theirs, arg)
        assert store.get(ours) == reference.get(theirs)
    assert [vars(m) for m in store.all()] == [vars(m) for m in reference.all()]
    assert store.values() == reference.values() == {"c": 107, "g": -3, "g2": 4, "h": 3}
    assert render_plugin_metrics(store.all()) == render_plugin_metrics(reference.all())


def test_histogram_buckets(store: ProcessMetricStore) -> None:
    h = store.define(HISTOGRAM, "lat")
    for sample in (0, 1, 2, 5, 12, 3_600_000, 3_600_001, 2**40):
        assert store.record(h, sample) == Status.OK
    [metric] = store.all()
    # bounds 0.5, 1, 5, 10, 25, ... 3600000; a sample on a bound counts in that bucket
    assert metric.bucket_counts[:5] == [1, 1, 2, 0, 1]
    assert metric.bucket_counts[-1] == 1 and sum(metric.bucket_counts) == 6  # 2 above: +Inf
    assert metric.sample_count == 8 and store.get(h) == 8
    assert metric.sample_sum == 0 + 1 + 2 + 5 + 12 + 3_600_000 + 3_600_001 + 2**40
    text = "\n".join(render_plugin_metrics([metric]))
    assert 'lat_bucket{le="+Inf"} 8' in text and f"lat_sum {metric.sample_sum:.0f}" in text


def test_gauge_set_and_counter_add_seen_through_another_mapping(
        store: ProcessMetricStore) -> None:
    other = ProcessMetricStore.attach(store.path)  # its own fd: flock excludes between the two
    try:
        mine, theirs = store.define(GAUGE, "level"), other.define(GAUGE, "level")
        store.record(mine, 7)
        assert other.get(theirs) == 7
        other.increment(theirs, -10)
        assert store.get(mine) == -3
        other.record(theirs, 2)  # a set replaces whatever any worker added
        assert store.get(mine) == 2
        c1, c2 = store.define(COUNTER, "hits"), other.define(COUNTER, "hits")
        store.increment(c1, 2)
        other.increment(c2, 3)
        assert store.get(c1) == other.get(c2) == 5
        assert [m.name for m in other.all()] == ["level", "hits"]
    finally:
        other.close()


def test_values_wrap_at_64_bits(store: ProcessMetricStore) -> None:
    c = store.define(COUNTER, "c")
    store.record(c, 2**64 - 1)
    store.increment(c, 2)
    assert store.get(c) == 1


def _hammer(store: ProcessMetricStore, n: int, barrier: object) -> None:
    counter = store.define(COUNTER, "requests")
    histogram = store.define(HISTOGRAM, "size")
    gauge = store.define(GAUGE, "inflight")
    barrier.wait()  # type: ignore[attr-defined]  # all four at once
    for i in range(n):
        store.increment(counter, 1)
        store.increment(gauge, 1)
        store.increment(gauge, -1)
        if i % 4 == 0:
            store.record(histogram, 12)


def test_no_lost_updates_across_four_processes(store: ProcessMetricStore) -> None:
    n, procs = 10000, 4
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(procs)
    workers = [context.Process(target=_hammer, args=(store, n, barrier)) for _ in range(procs)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    found = {m.name: m for m in store.all()}
    assert set(found) == {"requests", "size", "inflight"}  # one record per name
    assert found["requests"].value == n * procs
    assert found["inflight"].value == 0
    assert found["size"].sample_count == n // 4 * procs == found["size"].bucket_counts[4]
    assert found["size"].sample_sum == 12 * (n // 4 * procs)


def test_pickles_as_its_path(store: ProcessMetricStore) -> None:
    store.increment(store.define(COUNTER, "c"), 4)
    clone = pickle.loads(pickle.dumps(store))
    try:
        assert clone.path == store.path and clone.workers == 2
        assert clone.get(clone.define(COUNTER, "c")) == 4
    finally:
        clone.close()


def test_attach_refuses_another_file(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.write_bytes(b"\0" * 4096)
    with pytest.raises(ValueError, match="not a wasmgate metrics file"):
        ProcessMetricStore.attach(other)


def test_full_file_refuses_sharing_with_a_warning_never_a_failure(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = ProcessMetricStore.create(str(tmp_path), slots=8)  # 7 names fit
    try:
        with caplog.at_level(logging.DEBUG, "wasmgate.metrics"):
            metrics = [store.define(COUNTER, f"m{i}") for i in range(10)]
            assert store.define(COUNTER, "m9") is metrics[9]  # refused once, then remembered
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert "'m7' is not shared across workers nor exported" in warnings[0].getMessage()
        assert "7 metrics defined" in warnings[0].getMessage()
        for metric in metrics:  # every one still counts for this worker's VMs
            assert store.increment(metric, 3) == Status.OK
            assert store.get(metric) == 3
        assert [m.name for m in store.all()] == [f"m{i}" for i in range(7)]
        assert store.refused == 3 and store.stats()["metrics"] == 7
    finally:
        store.close()
        store.unlink()


def test_full_arena_refuses_sharing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = ProcessMetricStore.create(str(tmp_path), slots=64, arena_bytes=256)
    try:
        small = store.define(HISTOGRAM, "h")  # 8 + 8 + 168 bytes
        with caplog.at_level(logging.WARNING, "wasmgate.metrics"):
            big = store.define(HISTOGRAM, "h2")
        assert "(256 bytes of records)" in caplog.text
        store.record(small, 1)
        store.record(big, 1)
        assert store.get(big) == 1
        assert [m.name for m in store.all()] == ["h"] and store.refused == 1
    finally:
        store.close()
        store.unlink()


def test_workers_table(store: ProcessMetricStore) -> None:
    assert store.worker_table() == [(0, 0), (0, 0)]
    store.set_worker(1, pid=1234)
    store.set_worker(1, port=8081)
    store.set_worker(0, port=9901)
    store.set_worker(5, port=1)  # no such worker: ignored
    assert store.worker_table() == [(0, 9901), (1234, 8081)]


def _get_metric_outs(emulator: Emulator) -> list[int]:
    return [int(n) for n in re.findall(r"get_metric status=0 out=(\d+)",
                                       "\n".join(emulator.logs()))]


def test_two_vms_over_one_store_see_one_counter(store: ProcessMetricStore) -> None:
    steps = ("tick define_metric 0 s:hits\ntick increment_metric $metric 5\n"
             "tick get_metric $metric\n")
    emulators = [Emulator(CONFORMANCE, plugin_config=steps, root_id="conf") for _ in range(2)]
    try:
        for emulator in emulators:
            emulator.metric_store = store
            emulator.start()
            emulator.tick()
        assert _get_metric_outs(emulators[0]) == [5]
        assert _get_metric_outs(emulators[1]) == [10]  # the other "worker"'s 5 included
        assert store.values() == {"hits": 10}
    finally:
        for emulator in emulators:
            emulator.close()


# -- combining the workers' stats (stats.py) -------------------------------------------------
def test_gateway_stats_combined() -> None:
    a, b = GatewayStats(), GatewayStats()
    a.requests, b.requests = 3, 4
    a.record(200, 0.002)
    b.record(200, 0.2)
    b.record(503, 20)
    a.upstream_connect_failures, b.upstream_timeouts = 1, 2
    a.reloads, b.reloads, b.reload_failures = 2, 2, 1
    total = GatewayStats.combined([a.snapshot(), b.snapshot()])
    assert total.requests == 7 and total.responses == {200: 2, 503: 1}
    assert total.latency_count == 3 and sum(total.latency_counts) == 2  # 20 s: +Inf only
    assert total.latency_sum == pytest.approx(20.202)
    assert (total.upstream_connect_failures, total.upstream_timeouts) == (1, 2)
    assert (total.reloads, total.reload_failures) == (2, 1)  # the same files: max, not sum


def test_plugins_combined() -> None:
    def status(streams: int, memory: int, state: str = "ready") -> dict[str, object]:
        return {"name": "p", "status": state, "error": None if state == "ready" else "boom",
                "streams": streams, "crashes": 1, "reloads": 0, "callbacks": streams * 2,
                "callback_seconds": 0.5, "memory_bytes": memory}

    [merged] = combine_plugins([[status(3, 100)], [status(4, 200)]])
    assert (merged["streams"], merged["callbacks"], merged["crashes"]) == (7, 14, 2)
    assert (merged["callback_seconds"], merged["memory_bytes"]) == (1.0, 300)
    assert merged["status"] == "ready"
    [merged] = combine_plugins([[status(1, 1)], [status(1, 1, "failed")]])
    assert (merged["status"], merged["error"]) == ("failed", "boom")


def test_fetch_metrics_combined() -> None:
    a, b = FetchMetrics(), FetchMetrics()
    a.lookup(True)
    b.lookup(True)
    b.lookup(False)
    a.remote_fetch("success")
    a.set_cache_entries(3)
    b.set_cache_entries(2)
    total = combine_fetch([fetch_snapshot(a), fetch_snapshot(b)])
    lines = total.prometheus_lines()
    assert "wasm_cache_entries 3" in lines
    assert 'wasm_cache_lookup_count{hit="true"} 2' in lines
    assert 'wasm_cache_lookup_count{hit="false"} 1' in lines
    assert 'wasm_remote_fetch_count{result="success"} 1' in lines
