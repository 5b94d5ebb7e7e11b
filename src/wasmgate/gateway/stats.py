"""Gateway statistics and the Prometheus text exposition of /stats/prometheus.

Plugin-defined metrics appear under their own names, as Envoy exposes them since Istio 1.12
(the `wasmcustom.` namespace stripped, characters outside [a-zA-Z0-9_] replaced by `_`,
Istio-style `tag=.=value;.;` segments turned into labels, names starting with a digit
dropped). Hand-written rather than prometheus_client: its text format forces a `_total`
suffix on counters, which would rename the plugins' metrics.
"""

from __future__ import annotations

import bisect
import re
from collections import Counter
from collections.abc import Iterable

from ..runtime.abi import MetricType
from ..runtime.metrics import DEFAULT_BUCKETS, Metric

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

    def record(self, status: int, seconds: float) -> None:
        self.responses[status] += 1
        index = bisect.bisect_left(LATENCY_BUCKETS, seconds)
        if index < len(LATENCY_BUCKETS):
            self.latency_counts[index] += 1
        self.latency_sum += seconds
        self.latency_count += 1


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


def render_plugin_metrics(metrics: Iterable[Metric]) -> list[str]:
    families: dict[str, tuple[MetricType, list[tuple[dict[str, str], Metric]]]] = {}
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


def _histogram(name: str, labels: dict[str, str], metric: Metric) -> list[str]:
    lines, running = [], 0
    for bound, count in zip(DEFAULT_BUCKETS, metric.bucket_counts, strict=True):
        running += count
        lines.append(f"{name}_bucket{_labels({**labels, 'le': f'{bound:g}'})} {running}")
    lines.append(f"{name}_bucket{_labels({**labels, 'le': '+Inf'})} {metric.sample_count}")
    lines.append(f"{name}_sum{_labels(labels)} {metric.sample_sum:g}")
    lines.append(f"{name}_count{_labels(labels)} {metric.sample_count}")
    return lines


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
        "wasmgate_plugin_ready": ("gauge", lambda p: int(p["status"] == "ready")),
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
            lines.append(f'{name}{{plugin="{_escape(str(plugin["name"]))}"}} {value(plugin)}')
    return lines
