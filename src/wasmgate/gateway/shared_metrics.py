"""Plugin-defined metrics that span the worker processes of one gateway (`--workers N`).

Envoy keeps one stats store per process: a counter that VMs on two worker threads increment is
one counter, a gauge set on any thread is that value, histograms accumulate together and
`proxy_get_metric` reads the combined value. wasmgate's workers are processes, so
``ProcessMetricStore`` keeps the metrics' values in one memory-mapped file that every worker
maps, with the same mechanism as shared data (``shared_store.py``): a file in ``/dev/shm``
(another temp dir where there is none), every operation under ``fcntl.flock`` on that file plus
a ``threading.Lock`` (flock does not exclude threads sharing one open file), pickled as its path
for the spawn context, created by the parent (``runner.py``) and unlinked when it exits. A
killed worker never leaves the file locked (the kernel drops its flock).

Layout: a header, the workers' table (below), an index of records in definition order (what a
scrape walks), an open-addressing table name -> record, and an arena of records (type, name,
values: one u64 for counters and gauges; 19 bucket counts, sum and count for histograms).
Metrics are never removed (Envoy's are not while a plugin may use them). Each process caches
name -> record offset, so an increment is one lock round and one u64 read-modify-write
(``bench/shared_metrics.py``). Values are 64-bit and wrap as Envoy's do; gauges read back
signed.

Limits: ``slots`` names (7/8 of them usable) and ``arena_bytes`` for records. A metric defined
once the file is full is refused from sharing, never failed (SDKs panic when
``proxy_define_metric`` fails): a warning is logged once per worker, the metric works for that
worker's VMs with the values kept in the process, it is left out of ``/stats/prometheus``, and
``refused`` (shown as the counter ``wasmgate_plugin_metrics_refused_total``) counts it.

The workers' table is the rendezvous for the admin endpoint (``admin.py``): the parent writes
each worker's pid once it has started it (with the process's start time, so that a pid reused
by another process is not taken for the worker; a respawned worker's new pid resets its port to
0 until it listens), each worker writes the port of its private
admin endpoint once it listens; worker 0 reads it to gather the other workers' own statistics.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from dataclasses import dataclass

from ..runtime.abi import MetricType
from ..runtime.metrics import DEFAULT_BUCKETS, Metric, MetricStore, MetricValues, bucket_index
from .mapped_file import MappedFile, new_file

log = logging.getLogger("wasmgate.metrics")

MAGIC = b"WGMETRC1"
# magic, slots, max_metrics, workers, used, refused, (pad), arena_start, arena_end, arena_top
_HEADER = struct.Struct("<8sIIIIIIQQQ")
_USED_AT = 8 + 12
_REFUSED_AT = _USED_AT + 4
_ARENA_TOP_AT = 8 + 24 + 16
_WORKERS_AT = 64
_WORKER = struct.Struct("<IIQ")  # pid, admin port, start time (process_start_time)
_SLOT = struct.Struct("<IIQ")  # hash (0 = empty), (pad), record offset
_RECORD = struct.Struct("<II")  # type, name length; the name, then the values (8-aligned)
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_MASK = (1 << 64) - 1
_BUCKETS = len(DEFAULT_BUCKETS)
_HISTOGRAM = struct.Struct(f"<{_BUCKETS + 2}Q")  # bucket counts, sum, count
_SUM_AT = 8 * _BUCKETS
_COUNT_AT = _SUM_AT + 8


def _align(n: int) -> int:
    return n + (-n % 8)


def _offsets(slots: int, max_metrics: int, workers: int) -> tuple[int, int, int]:
    """(index, slot table, arena) offsets."""
    index_at = _align(_WORKERS_AT + _WORKER.size * workers)
    slots_at = index_at + 8 * max_metrics
    return index_at, slots_at, slots_at + _SLOT.size * slots


def _signed(value: int) -> int:
    return value - (1 << 64) if value >> 63 else value


@dataclass(eq=False)
class SharedMetric(Metric):
    """A metric whose values are at `offset` in the file."""

    offset: int = 0


class ProcessMetricStore(MappedFile, MetricStore):
    """A ``MetricStore`` over a memory-mapped file that several processes attach to.

    The parent calls :meth:`create` (and :meth:`unlink` when the gateway exits); workers
    receive the store as a spawn argument (it pickles as its path) or call :meth:`attach`.
    """

    def __init__(self, path: str, *, _fd: int | None = None) -> None:
        super().__init__()  # its dict holds the metrics refused from sharing (kept here)
        self._map(path, _fd)
        magic, slots, max_metrics, workers, _, _, _, arena_start, arena_end, _ = \
            _HEADER.unpack_from(self._mm, 0)
        if magic != MAGIC:
            raise ValueError(f"{path} is not a wasmgate metrics file")
        self.slots, self.max_metrics, self.workers = slots, max_metrics, workers
        self._index_at, self._slots_at, _ = _offsets(slots, max_metrics, workers)
        self._arena_start, self._arena_end = arena_start, arena_end
        self._local: dict[str, Metric] = {}
        self._warned: set[str] = set()

    # -- life cycle -------------------------------------------------------------------------
    @classmethod
    def create(cls, directory: str | None = None, *, workers: int = 1, slots: int = 16384,
               arena_bytes: int = 8 << 20) -> ProcessMetricStore:
        """A new, empty store in a fresh file (sparse: memory is used as it is written)."""
        if slots < 8 or slots & (slots - 1):
            raise ValueError("slots must be a power of two >= 8")
        if workers < 1 or arena_bytes < 64:
            raise ValueError("workers must be >= 1 and arena_bytes >= 64")
        max_metrics = slots - slots // 8
        _, _, arena_start = _offsets(slots, max_metrics, workers)
        size = arena_start + arena_bytes
        header = _HEADER.pack(MAGIC, slots, max_metrics, workers, 0, 0, 0, arena_start, size,
                              arena_start)
        path, fd = new_file("metrics", directory, size, header, reserve=arena_start)
        return cls(path, _fd=fd)

    # -- definitions ------------------------------------------------------------------------
    def define(self, metric_type: MetricType, name: str) -> Metric:
        metric = self._local.get(name)
        if metric is not None:
            return metric
        raw = name.encode("utf-8", "surrogateescape")
        h = zlib.crc32(raw) or 1
        self._acquire()
        try:
            metric = self._local.get(name)  # another thread of this process defined it
            if metric is None:
                metric = self._define_locked(metric_type, name, raw, h)
                self._local[name] = metric
            return metric
        finally:
            self._release()

    def _define_locked(self, metric_type: MetricType, name: str, raw: bytes,
                       h: int) -> Metric:
        mm, mask, n = self._mm, self.slots - 1, len(raw)
        index = h & mask
        while True:
            at = self._slots_at + index * _SLOT.size
            slot_hash, _, record = _SLOT.unpack_from(mm, at)
            if slot_hash == 0:
                break
            if slot_hash == h:
                stored_type, name_len = _RECORD.unpack_from(mm, record)
                if name_len == n and mm[record + 8:record + 8 + n] == raw:
                    # defined before (here or by another worker); it keeps its first type
                    return SharedMetric(name, MetricType(stored_type), record + 8 + _align(n))
            index = (index + 1) & mask
        (used,) = _U32.unpack_from(mm, _USED_AT)
        if used >= self.max_metrics:
            return self._refuse(metric_type, name, "names", f"{used} metrics defined")
        size = 8 + _align(n) + (_HISTOGRAM.size if metric_type == MetricType.HISTOGRAM else 8)
        (top,) = _U64.unpack_from(mm, _ARENA_TOP_AT)
        if top + size > self._arena_end:
            return self._refuse(metric_type, name, "arena",
                                f"{self._arena_end - self._arena_start} bytes of records")
        if not self.reserve(top + size):
            return self._refuse(metric_type, name, "space",
                                f"no space left in {os.path.dirname(self.path)}")
        # the record is in place (its values are zero: fresh, never-written file pages) before
        # the slot and the index publish it
        _RECORD.pack_into(mm, top, int(metric_type), n)
        mm[top + 8:top + 8 + n] = raw
        _U64.pack_into(mm, _ARENA_TOP_AT, top + size)
        _U64.pack_into(mm, self._index_at + 8 * used, top)
        _SLOT.pack_into(mm, at, h, 0, top)
        _U32.pack_into(mm, _USED_AT, used + 1)
        return SharedMetric(name, metric_type, top + 8 + _align(n))

    def _refuse(self, metric_type: MetricType, name: str, kind: str, state: str) -> Metric:
        (refused,) = _U32.unpack_from(self._mm, _REFUSED_AT)
        _U32.pack_into(self._mm, _REFUSED_AT, refused + 1)
        message = (f"plugin metric {name!r} is not shared across workers nor exported: the "
                   f"shared metrics file is full ({state}); this worker's VMs still count it")
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning("%s (logged once per worker)", message)
        else:
            log.debug("%s", message)
        with self._lock:
            return self._metrics.setdefault(name, MetricValues(name, metric_type))

    @property
    def refused(self) -> int:
        """Definitions refused from sharing since the file was created (once per worker/name)."""
        return int(_U32.unpack_from(self._mm, _REFUSED_AT)[0])

    # -- values -----------------------------------------------------------------------------
    def _add(self, metric: Metric, delta: int) -> None:
        if type(metric) is not SharedMetric:
            return super()._add(metric, delta)
        offset, mm = metric.offset, self._mm
        self._acquire()
        try:
            _U64.pack_into(mm, offset, (_U64.unpack_from(mm, offset)[0] + delta) & _MASK)
        finally:
            self._release()

    def _set(self, metric: Metric, value: int) -> None:
        if type(metric) is not SharedMetric:
            return super()._set(metric, value)
        self._acquire()
        try:
            _U64.pack_into(self._mm, metric.offset, value & _MASK)
        finally:
            self._release()

    def _observe(self, metric: Metric, value: int) -> None:
        if type(metric) is not SharedMetric:
            return super()._observe(metric, value)
        index = bucket_index(value)
        offset, mm = metric.offset, self._mm
        self._acquire()
        try:
            if index < _BUCKETS:
                at = offset + 8 * index
                _U64.pack_into(mm, at, (_U64.unpack_from(mm, at)[0] + 1) & _MASK)
            at = offset + _SUM_AT
            _U64.pack_into(mm, at, (_U64.unpack_from(mm, at)[0] + value) & _MASK)
            at = offset + _COUNT_AT
            _U64.pack_into(mm, at, (_U64.unpack_from(mm, at)[0] + 1) & _MASK)
        finally:
            self._release()

    def get(self, metric: Metric) -> int:
        if type(metric) is not SharedMetric:
            return super().get(metric)
        at = metric.offset + (_COUNT_AT if metric.type == MetricType.HISTOGRAM else 0)
        self._acquire()
        try:
            (value,) = _U64.unpack_from(self._mm, at)
        finally:
            self._release()
        return _signed(value) if metric.type == MetricType.GAUGE else value

    def all(self) -> list[MetricValues]:
        """Every shared metric with its values, in definition order (one consistent read).
        Metrics refused from sharing are left out: they would show one worker's values."""
        mm, out = self._mm, []
        self._acquire()
        try:
            (used,) = _U32.unpack_from(mm, _USED_AT)
            for (record,) in _U64.iter_unpack(mm[self._index_at:self._index_at + 8 * used]):
                metric_type, n = _RECORD.unpack_from(mm, record)
                name = mm[record + 8:record + 8 + n].decode("utf-8", "surrogateescape")
                at = record + 8 + _align(n)
                kind = MetricType(metric_type)
                if kind == MetricType.HISTOGRAM:
                    *buckets, total, count = _HISTOGRAM.unpack_from(mm, at)
                    out.append(MetricValues(name, kind, 0, buckets, float(total), count))
                else:
                    (value,) = _U64.unpack_from(mm, at)
                    out.append(MetricValues(name, kind, _signed(value)
                                            if kind == MetricType.GAUGE else value))
        finally:
            self._release()
        return out

    # -- the workers' table (rendezvous for the admin endpoint) -----------------------------
    def set_worker(self, index: int, *, pid: int | None = None, port: int | None = None,
                   start: int | None = None) -> None:
        """Record worker `index`'s pid (the parent) or admin port (the worker itself). A pid
        comes with its process's start time (read now unless given)."""
        if not 0 <= index < self.workers:
            return
        if pid is not None and start is None:
            start = process_start_time(pid)
        at = _WORKERS_AT + _WORKER.size * index
        self._acquire()
        try:
            old_pid, old_port, old_start = _WORKER.unpack_from(self._mm, at)
            _WORKER.pack_into(self._mm, at, old_pid if pid is None else pid,
                              old_port if port is None else port,
                              old_start if start is None else start)
        finally:
            self._release()

    def worker_entries(self) -> list[tuple[int, int, int]]:
        """(pid, admin port, start time) of each worker; 0 where not known yet."""
        self._acquire()
        try:
            return [_WORKER.unpack_from(self._mm, _WORKERS_AT + _WORKER.size * i)
                    for i in range(self.workers)]
        finally:
            self._release()

    def worker_table(self) -> list[tuple[int, int]]:
        """(pid, admin port) of each worker; 0 where not known yet."""
        return [(pid, port) for pid, port, _ in self.worker_entries()]

    def stats(self) -> dict[str, int]:
        """Metrics stored, arena bytes used, and the capacity of each."""
        _, _, max_metrics, _, used, refused, _, start, end, top = _HEADER.unpack_from(self._mm, 0)
        return {"metrics": used, "metric_capacity": max_metrics, "arena_used": top - start,
                "arena_capacity": end - start, "refused": refused}


def process_start_time(pid: int) -> int:
    """When process `pid` started (clock ticks since boot: /proc/<pid>/stat field 22), or 0
    where that is unknown (no /proc, no such process). With the pid it names one process: a pid
    reused by a later process comes with a later start time."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return 0
