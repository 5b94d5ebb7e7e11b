"""Plugin-defined metrics (counter, gauge, histogram) with Envoy's semantics and ids.

Envoy creates `wasmcustom.<name>` per definition; the same name defined twice is the same stat
under a new id. Ids are per VM with the type in the low two bits (counters 4, 8...; gauges 5,
9...; histograms 6, 10...), as proxy-wasm-cpp-host assigns them.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field

from .abi import MetricType, Status

# Envoy's default histogram bucket bounds.
DEFAULT_BUCKETS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000,
                   60000, 300000, 600000, 1800000, 3600000)


@dataclass
class Metric:
    name: str
    type: MetricType
    value: int = 0
    bucket_counts: list[int] = field(default_factory=lambda: [0] * len(DEFAULT_BUCKETS))
    sample_sum: float = 0.0
    sample_count: int = 0


class MetricStore:
    """name -> Metric, shared by every VM of the embedder."""

    def __init__(self) -> None:
        self._metrics: dict[str, Metric] = {}
        self._lock = threading.Lock()

    def define(self, metric_type: MetricType, name: str) -> Metric:
        with self._lock:
            metric = self._metrics.get(name)
            if metric is None:
                metric = self._metrics[name] = Metric(name, metric_type)
            return metric

    def increment(self, metric: Metric, offset: int) -> Status:
        with self._lock:
            if metric.type == MetricType.COUNTER:
                if offset <= 0:
                    return Status.BAD_ARGUMENT
                metric.value += offset
            elif metric.type == MetricType.GAUGE:
                metric.value += offset
            else:
                return Status.BAD_ARGUMENT
            return Status.OK

    def record(self, metric: Metric, value: int) -> Status:
        with self._lock:
            if metric.type == MetricType.COUNTER:
                metric.value += value
            elif metric.type == MetricType.GAUGE:
                metric.value = value
            else:
                index = bisect.bisect_left(DEFAULT_BUCKETS, value)
                if index < len(DEFAULT_BUCKETS):  # above the last bound: only +Inf counts it
                    metric.bucket_counts[index] += 1
                metric.sample_sum += value
                metric.sample_count += 1
            return Status.OK

    def all(self) -> list[Metric]:
        with self._lock:
            return list(self._metrics.values())

    def values(self) -> dict[str, int]:
        """name -> value (histograms: sample count)."""
        with self._lock:
            return {m.name: (m.sample_count if m.type == MetricType.HISTOGRAM else m.value)
                    for m in self._metrics.values()}


class MetricIds:
    """One VM's id space over a MetricStore."""

    def __init__(self) -> None:
        self._next = {MetricType.COUNTER: 1, MetricType.GAUGE: 1, MetricType.HISTOGRAM: 1}
        self._by_id: dict[int, Metric] = {}

    def add(self, metric: Metric) -> int:
        n = self._next[metric.type]
        self._next[metric.type] = n + 1
        metric_id = (n << 2) | int(metric.type)
        self._by_id[metric_id] = metric
        return metric_id

    def get(self, metric_id: int) -> Metric | None:
        return self._by_id.get(metric_id)
