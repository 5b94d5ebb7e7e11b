"""Plugin-defined metrics (counter, gauge, histogram) with Envoy's semantics and ids.

Envoy creates `wasmcustom.<name>` per definition; the same name defined twice is the same stat
under a new id. Ids are per VM with the type in the low two bits (counters 4, 8...; gauges 5,
9...; histograms 6, 10...), as proxy-wasm-cpp-host assigns them.

`MetricStore` keeps the values in this process. A store that keeps them elsewhere (the gateway's
`ProcessMetricStore`, one set of metrics across `--workers`) subclasses it and overrides
`define`, the storage methods (`_add`, `_set`, `_observe`), `get` and `all`; the semantics of
each operation per type stay here. Read values through the store (`get`, `all`, `values`),
never from the `Metric` that `define` returned.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass, field
from typing import cast

from .abi import MetricType, Status

# Envoy's default histogram bucket bounds.
DEFAULT_BUCKETS = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000,
                   60000, 300000, 600000, 1800000, 3600000)


def bucket_index(value: int) -> int:
    """The bucket a sample falls in; `len(DEFAULT_BUCKETS)` above the last bound (+Inf only)."""
    return bisect.bisect_left(DEFAULT_BUCKETS, value)


@dataclass(eq=False)
class Metric:
    """A defined metric: what a VM's metric id stands for (values live in its store)."""

    name: str
    type: MetricType


@dataclass(eq=False)
class MetricValues(Metric):
    """A metric with its values: `MetricStore`'s own metrics, and what `all()` returns."""

    value: int = 0
    bucket_counts: list[int] = field(default_factory=lambda: [0] * len(DEFAULT_BUCKETS))
    sample_sum: float = 0.0
    sample_count: int = 0

    def copy(self) -> MetricValues:
        return MetricValues(self.name, self.type, self.value, list(self.bucket_counts),
                            self.sample_sum, self.sample_count)


class MetricStore:
    """name -> metric, shared by every VM of the embedder; values kept in this process."""

    def __init__(self) -> None:
        self._metrics: dict[str, MetricValues] = {}
        self._lock = threading.Lock()

    def define(self, metric_type: MetricType, name: str) -> Metric:
        """The metric named `name`, created if new (an existing one keeps its type)."""
        with self._lock:
            metric = self._metrics.get(name)
            if metric is None:
                metric = self._metrics[name] = MetricValues(name, metric_type)
            return metric

    def increment(self, metric: Metric, offset: int) -> Status:
        if metric.type == MetricType.COUNTER:
            if offset <= 0:
                return Status.BAD_ARGUMENT
        elif metric.type != MetricType.GAUGE:
            return Status.BAD_ARGUMENT
        self._add(metric, offset)
        return Status.OK

    def record(self, metric: Metric, value: int) -> Status:
        if metric.type == MetricType.COUNTER:
            self._add(metric, value)
        elif metric.type == MetricType.GAUGE:
            self._set(metric, value)
        else:
            self._observe(metric, value)
        return Status.OK

    def get(self, metric: Metric) -> int:
        """A counter's or gauge's value (a histogram's sample count)."""
        values = cast(MetricValues, metric)
        with self._lock:
            return (values.sample_count if metric.type == MetricType.HISTOGRAM
                    else values.value)

    def all(self) -> list[MetricValues]:
        """A consistent copy of every metric with its values, in definition order."""
        with self._lock:
            return [m.copy() for m in self._metrics.values()]

    def values(self) -> dict[str, int]:
        """name -> value (histograms: sample count)."""
        return {m.name: (m.sample_count if m.type == MetricType.HISTOGRAM else m.value)
                for m in self.all()}

    # -- storage: what a subclass overrides to keep the values elsewhere ----------------------
    def _add(self, metric: Metric, delta: int) -> None:
        values = cast(MetricValues, metric)
        with self._lock:
            values.value += delta

    def _set(self, metric: Metric, value: int) -> None:
        values = cast(MetricValues, metric)
        with self._lock:
            values.value = value

    def _observe(self, metric: Metric, value: int) -> None:
        values = cast(MetricValues, metric)
        index = bucket_index(value)
        with self._lock:
            if index < len(DEFAULT_BUCKETS):  # above the last bound: only +Inf counts it
                values.bucket_counts[index] += 1
            values.sample_sum += value
            values.sample_count += 1


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
