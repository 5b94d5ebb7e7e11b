"""--workers admin pieces without processes: an exited worker's gauges leave the sums
(stats.py), the workers' table records start times and a reused pid is not the worker
(shared_metrics.py, admin.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from wasmgate.fetch.metrics import FetchMetrics
from wasmgate.gateway.admin import AdminServer, WorkerView, _alive, _state
from wasmgate.gateway.shared_metrics import ProcessMetricStore, process_start_time
from wasmgate.gateway.stats import (
    GatewayStats,
    combine_fetch,
    combine_plugins,
    fetch_snapshot,
    render_gateway,
    render_workers,
    without_gauges,
)

procfs = pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc")


def plugin(name: str, streams: int, memory: int, status: str = "ready") -> dict[str, object]:
    return {"name": name, "status": status, "error": None, "streams": streams, "crashes": 0,
            "reloads": 0, "callbacks": streams, "callback_seconds": 0.5,
            "memory_bytes": memory}


def snapshot(plugins: list[dict[str, object]], cache_entries: int) -> dict[str, object]:
    fetch = FetchMetrics()
    fetch.set_cache_entries(cache_entries)
    return {"worker": 1, "gateway": GatewayStats().snapshot(), "plugins": plugins,
            "fetch": fetch_snapshot(fetch)}


def test_an_exited_workers_snapshot_keeps_counters_not_gauges() -> None:
    live = snapshot([plugin("a", 3, 100)], 2)
    dead = without_gauges(snapshot([plugin("a", 4, 200, "failed"), plugin("gone", 5, 300)], 3))
    merged = {p["name"]: p for p in combine_plugins([live["plugins"], dead["plugins"]])}
    assert (merged["a"]["streams"], merged["a"]["memory_bytes"]) == (7, 100)
    assert merged["a"]["status"] == "ready"  # the dead worker's "failed" is not a status now
    assert (merged["gone"]["streams"], merged["gone"]["status"]) == (5, None)
    lines = render_gateway(GatewayStats(), list(merged.values()))
    assert 'wasmgate_plugin_streams_total{plugin="gone"} 5' in lines
    assert not [line for line in lines if line.startswith(("wasmgate_plugin_ready{plugin=\"gone",
                                                           "wasmgate_plugin_vm_memory_bytes{"
                                                           "plugin=\"gone"))]
    assert 'wasmgate_plugin_vm_memory_bytes{plugin="a"} 100' in lines
    # the stale one first (e.g. worker 0 listed after it) changes nothing
    [first] = combine_plugins([dead["plugins"][:1], live["plugins"]])
    assert (first["status"], first["memory_bytes"], first["streams"]) == ("ready", 100, 7)
    assert "wasm_cache_entries 2" in combine_fetch([live["fetch"], dead["fetch"]]) \
        .prometheus_lines()


def test_refused_metrics_are_a_counter() -> None:
    lines = render_workers({0: "up", 1: "exited"}, 3)
    assert "# TYPE wasmgate_plugin_metrics_refused_total counter" in lines
    assert "wasmgate_plugin_metrics_refused_total 3" in lines


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ProcessMetricStore]:
    created = ProcessMetricStore.create(str(tmp_path), workers=2, slots=64)
    yield created
    created.close()
    created.unlink()


@procfs
def test_the_workers_table_records_start_times(store: ProcessMetricStore) -> None:
    store.set_worker(1, pid=os.getpid())
    store.set_worker(1, port=8081)  # keeps the pid and its start time
    started = process_start_time(os.getpid())
    assert started > 0
    assert store.worker_entries() == [(0, 0, 0), (os.getpid(), 8081, started)]
    assert store.worker_table() == [(0, 0), (os.getpid(), 8081)]


@procfs
def test_a_reused_pid_is_not_the_worker() -> None:
    me, started = os.getpid(), process_start_time(os.getpid())
    assert _alive(me) and _alive(me, started)
    assert not _alive(me, started + 1)  # the same pid, started at another time
    assert _state(me, 8081, started + 1, answered=False) == "exited"
    assert _state(me, 8081, started, answered=False) == "not answering"
    assert _state(me, 0, started, answered=False) == "starting"
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child_started = process_start_time(child.pid)
    assert child_started >= started
    deadline = time.monotonic() + 10
    while _state_letter(child.pid) != "Z":  # exited, not reaped yet: a zombie
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert not _alive(child.pid) and not _alive(child.pid, child_started)
    child.wait()
    assert not _alive(child.pid, child_started)  # gone (or another process's pid)


def _state_letter(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_a_zombie_leader_with_threads_left_has_not_exited() -> None:
    """SIGKILL makes the leader thread a zombie before the other threads are gone, and the
    process's files (its listening socket) close only with its last thread: until then the
    worker has not exited, or traffic is sent to a listener still being torn down."""
    code = ("import ctypes, threading, time\n"
            "threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
            "time.sleep(0.2)\n"
            "ctypes.CDLL(None).pthread_exit(None)\n")  # the leader ends; its thread stays
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 10
        while _proc_state(child.pid) != "Z":
            assert time.monotonic() < deadline, "the leader never became a zombie"
            time.sleep(0.02)
        assert _alive(child.pid)  # a thread still runs: not exited
        child.kill()
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
    assert not _alive(child.pid)  # reaped: gone


def _proc_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()[0].decode()


def test_a_respawned_workers_predecessors_keep_their_counters() -> None:
    admin = AdminServer(SimpleNamespace(worker=0))  # type: ignore[arg-type]

    def worker_1(requests: int, streams: int, memory: int) -> dict[str, object]:
        snap = snapshot([plugin("a", streams, memory)], 1)
        snap["gateway"] = {**snap["gateway"], "requests": requests}  # type: ignore[dict-item]
        return snap

    admin._last[1] = worker_1(5, 3, 100)
    admin._replaced(1)  # a new process: the old one's counters are retained, not its gauges
    admin._last[1] = worker_1(2, 1, 50)
    admin._replaced(1)  # and again
    live = worker_1(4, 2, 70)
    snaps = admin._snapshots([WorkerView(1, 1234, "up", live)])
    assert GatewayStats.combined(s["gateway"] for s in snaps).requests == 5 + 2 + 4
    [merged] = combine_plugins(s["plugins"] for s in snaps)
    assert (merged["streams"], merged["memory_bytes"], merged["status"]) == (6, 70, "ready")
    assert combine_fetch(s["fetch"] for s in snaps).cache_entries == 1  # the live one's
    admin._replaced(1)  # nothing fetched from the process replaced now: nothing to fold
    assert GatewayStats.combined(s["gateway"] for s in admin._snapshots([])).requests == 7
