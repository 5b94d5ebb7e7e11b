"""Gateway statistics and the Prometheus text exposition of /stats/prometheus.

Plugin-defined metrics appear under their own names, as Envoy exposes them since Istio 1.12
(the `wasmcustom.` namespace stripped, characters outside [a-zA-Z0-9_] replaced by `_`,
Istio-style `tag=.=value;.;` segments turned into labels, names starting with a digit
dropped). Hand-written rather than prometheus_client: its text format forces a `_total`
suffix on counters, which would rename the plugins' metrics.

With `--workers N` the gateway and per-plugin numbers are per worker process; each worker's
admin serves them as a JSON snapshot (`/stats/worker`) and worker 0 combines the snapshots
(`combine_*` below): counters and histograms are summed; per-plugin VM memory is summed (what
the plugin costs the whole gateway; `/plugins` has each worker's); a plugin is `ready` only if
it is ready in every worker; config reloads take the maximum (every worker reloads the same
files: the count is of configuration changes, not of workers); `wasm_cache_entries` takes the
maximum (the module cache is one directory). An exited worker's last snapshot keeps its
counters in the sums (they never go backwards) but not its gauges (`without_gauges`): its VM
memory is freed and its plugins serve nothing.
"""

from __future__ import annotations

import bisect
import re
from collections import Counter
from collections.abc import Iterable
from typing import Any

from ..fetch.metrics import FetchMetrics
from ..runtime.abi import MetricType
from ..runtime.metrics import DEFAULT_BUCKETS, MetricValues

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_TAG = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=\.=(.*?);\.;")
_UNSAFE = re.compile(r"[^a-zA-Z0-9_]")


class GatewayStats:
    """Counters of one gateway process."""

    def __init__(self) -> None:
        self.requests = 0
        self.responses: Counter[int] = Counter()
        self.upstream_connect_failures = 0
        self.upstream_timeouts = 0
        self.latency_counts = [0] * len(LATENCY_BUCKETS)
        self.latency_sum = 0.0
        self.latency_count = 0
        self.reloads = 0
        self.reload_failures = 0
        self.access_log_dropped = 0  # lines the access log could not write (access_log.py)

    def record(self, status: int, seconds: float) -> None:
        self.responses[status] += 1
        index = bisect.bisect_left(LATENCY_BUCKETS, seconds)
        if index < len(LATENCY_BUCKETS):
            self.latency_counts[index] += 1
        self.latency_sum += seconds
        self.latency_count += 1

    def snapshot(self) -> dict[str, Any]:
        """The counters as JSON-able data (what a worker reports to worker 0)."""
        return {"requests": self.requests,
                "responses": {str(code): n for code, n in self.responses.items()},
                "upstream_connect_failures": self.upstream_connect_failures,
                "upstream_timeouts": self.upstream_timeouts,
                "latency_counts": list(self.latency_counts), "latency_sum": self.latency_sum,
                "latency_count": self.latency_count, "reloads": self.reloads,
                "reload_failures": self.reload_failures,
                "access_log_dropped": self.access_log_dropped}

    @classmethod
    def combined(cls, snapshots: Iterable[dict[str, Any]]) -> GatewayStats:
        """The gateway's stats from its workers' snapshots: sums; reloads take the maximum."""
        total = cls()
        for snap in snapshots:
            total.requests += snap["requests"]
            total.responses.update({int(code): n for code, n in snap["responses"].items()})
            total.upstream_connect_failures += snap["upstream_connect_failures"]
            total.upstream_timeouts += snap["upstream_timeouts"]
            total.latency_counts = [a + b for a, b in zip(total.latency_counts,
                                                          snap["latency_counts"], strict=True)]
            total.latency_sum += snap["latency_sum"]
            total.latency_count += snap["latency_count"]
            total.reloads = max(total.reloads, snap["reloads"])
            total.reload_failures = max(total.reload_failures, snap["reload_failures"])
            total.access_log_dropped += snap.get("access_log_dropped", 0)
        return total


_SUMMED_PLUGIN_FIELDS = ("streams", "crashes", "reloads", "callbacks", "callback_seconds",
                         "memory_bytes", "fetch_attempts")


_GAUGE_PLUGIN_FIELDS = ("status", "memory_bytes")


def without_gauges(snapshot: dict[str, Any]) -> dict[str, Any]:
    """An exited worker's last snapshot as it counts in the sums: its counters, not its gauges
    (plugin status and VM memory are None, the module cache entries 0)."""
    plugins = [{**p, **dict.fromkeys(_GAUGE_PLUGIN_FIELDS)} for p in snapshot["plugins"]]
    return {**snapshot, "plugins": plugins, "fetch": {**snapshot["fetch"], "cache_entries": 0}}


def combine_plugins(per_worker: Iterable[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One entry per plugin name over the workers' statuses (the first worker's order and
    details): per-worker counts and VM memory summed; the status is `ready` only if every
    worker has it ready, else the first other status seen (with its error). A None status or
    memory (`without_gauges`) is left out; None if no worker has one."""
    merged: dict[str, dict[str, Any]] = {}
    for plugins in per_worker:
        for plugin in plugins:
            into = merged.get(plugin["name"])
            if into is None:
                merged[plugin["name"]] = dict(plugin)
                continue
            for name in _SUMMED_PLUGIN_FIELDS:
                if isinstance(plugin.get(name), int | float):
                    into[name] = (into.get(name) or 0) + plugin[name]
            if plugin["status"] is None:
                continue
            if into["status"] is None or (into["status"] == "ready"
                                          and plugin["status"] != "ready"):
                into["status"], into["error"] = plugin["status"], plugin.get("error")
    for plugin in merged.values():
        if isinstance(plugin.get("callback_seconds"), float):
            plugin["callback_seconds"] = round(plugin["callback_seconds"], 6)
    return list(merged.values())


def fetch_snapshot(metrics: FetchMetrics) -> dict[str, Any]:
    return {"cache_entries": metrics.cache_entries,
            "lookups": {str(hit).lower(): n for hit, n in dict(metrics.lookups).items()},
            "remote_fetches": dict(metrics.remote_fetches)}


def combine_fetch(snapshots: Iterable[dict[str, Any]]) -> FetchMetrics:
    """Fetch counters summed over the workers (each fetches for itself); cache entries: max."""
    total = FetchMetrics()
    for snap in snapshots:
        total.cache_entries = max(total.cache_entries, snap["cache_entries"])
        total.lookups.update({hit == "true": n for hit, n in snap["lookups"].items()})
        total.remote_fetches.update(snap["remote_fetches"])
    return total


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def plugin_metric_name(name: str) -> tuple[str, dict[str, str]] | None:
    """Envoy's Prometheus name for a custom stat, with Istio-style tags extracted."""
    labels = {m.group(1): m.group(2) for m in _TAG.finditer(name)}
    stripped = _TAG.sub("", name)
    if stripped.startswith("wasmcustom."):
        stripped = stripped[len("wasmcustom."):]
    sanitized = _UNSAFE.sub("_", stripped)
    if not sanitized or sanitized[0].isdigit():
        return None
    return sanitized, labels


def render_plugin_metrics(metrics: Iterable[MetricValues]) -> list[str]:
    families: dict[str, tuple[MetricType, list[tuple[dict[str, str], MetricValues]]]] = {}
    for metric in metrics:
        named = plugin_metric_name(metric.name)
        if named is None:
            continue
        name, labels = named
        families.setdefault(name, (metric.type, []))[1].append((labels, metric))
    lines: list[str] = []
    for name, (kind, members) in sorted(families.items()):
        lines.append(f"# TYPE {name} {kind.name.lower()}")
        for labels, metric in members:
            if kind == MetricType.HISTOGRAM:
                lines.extend(_histogram(name, labels, metric))
            else:
                lines.append(f"{name}{_labels(labels)} {metric.value}")
    return lines


def _histogram(name: str, labels: dict[str, str], metric: MetricValues) -> list[str]:
    lines, running = [], 0
    for bound, count in zip(DEFAULT_BUCKETS, metric.bucket_counts, strict=True):
        running += count
        lines.append(f"{name}_bucket{_labels({**labels, 'le': f'{bound:g}'})} {running}")
    lines.append(f"{name}_bucket{_labels({**labels, 'le': '+Inf'})} {metric.sample_count}")
    lines.append(f"{name}_sum{_labels(labels)} {_number(metric.sample_sum)}")
    lines.append(f"{name}_count{_labels(labels)} {metric.sample_count}")
    return lines


def _number(value: float) -> str:
    """Exact for integral values (`:g` would print 1234567 as 1.23457e+06)."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def render_gateway(stats: GatewayStats, plugins: list[dict[str, object]]) -> list[str]:
    lines = ["# TYPE wasmgate_requests_total counter",
             f"wasmgate_requests_total {stats.requests}",
             "# TYPE wasmgate_responses_total counter"]
    lines += [f'wasmgate_responses_total{{code="{code}"}} {n}'
              for code, n in sorted(stats.responses.items())]
    lines += ["# TYPE wasmgate_upstream_connect_failures_total counter",
              f"wasmgate_upstream_connect_failures_total {stats.upstream_connect_failures}",
              "# TYPE wasmgate_upstream_timeouts_total counter",
              f"wasmgate_upstream_timeouts_total {stats.upstream_timeouts}",
              "# TYPE wasmgate_config_reloads_total counter",
              f'wasmgate_config_reloads_total{{result="success"}} {stats.reloads}',
              f'wasmgate_config_reloads_total{{result="failure"}} {stats.reload_failures}',
              "# TYPE wasmgate_access_log_dropped_lines_total counter",
              f"wasmgate_access_log_dropped_lines_total {stats.access_log_dropped}",
              "# TYPE wasmgate_request_duration_seconds histogram"]
    running = 0
    for bound, count in zip(LATENCY_BUCKETS, stats.latency_counts, strict=True):
        running += count
        lines.append(f'wasmgate_request_duration_seconds_bucket{{le="{bound:g}"}} {running}')
    lines += [f'wasmgate_request_duration_seconds_bucket{{le="+Inf"}} {stats.latency_count}',
              f"wasmgate_request_duration_seconds_sum {stats.latency_sum:.6f}",
              f"wasmgate_request_duration_seconds_count {stats.latency_count}"]
    lines += _plugin_lines(plugins)
    return lines


def _plugin_lines(plugins: list[dict[str, object]]) -> list[str]:
    series = {
        "wasmgate_plugin_ready": ("gauge", lambda p: None if p["status"] is None
                                  else int(p["status"] == "ready")),
        "wasmgate_plugin_streams_total": ("counter", lambda p: p["streams"]),
        "wasmgate_plugin_crashes_total": ("counter", lambda p: p["crashes"]),
        "wasmgate_plugin_reloads_total": ("counter", lambda p: p["reloads"]),
        "wasmgate_plugin_callbacks_total": ("counter", lambda p: p["callbacks"]),
        "wasmgate_plugin_callback_seconds_total": ("counter", lambda p: p["callback_seconds"]),
        "wasmgate_plugin_vm_memory_bytes": ("gauge", lambda p: p["memory_bytes"]),
    }
    lines = []
    for name, (kind, value) in series.items():
        lines.append(f"# TYPE {name} {kind}")
        for plugin in plugins:
            number = value(plugin)
            if number is not None:  # a gauge of a plugin only exited workers had
                lines.append(f'{name}{{plugin="{_escape(str(plugin["name"]))}"}} {number}')
    return lines


def render_workers(states: dict[int, str], refused: int) -> list[str]:
    """`--workers` only: which workers' numbers are current in this scrape, and plugin metrics
    the shared metrics file had no room for (see shared_metrics.py)."""
    up = [f'wasmgate_worker_up{{worker="{index}"}} {int(state == "up")}'
          for index, state in sorted(states.items())]
    return ["# TYPE wasmgate_worker_up gauge", *up,
            "# TYPE wasmgate_plugin_metrics_refused_total counter",
            f"wasmgate_plugin_metrics_refused_total {refused}"]
