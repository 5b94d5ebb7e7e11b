"""Fetch and cache metrics under Istio's names (spec §3.8), in the admin endpoint's text format.

`wasm_cache_entries` (gauge: modules in the cache), `wasm_cache_lookup_count{hit}` and
`wasm_remote_fetch_count{result}`. The names keep Istio's spelling (no `_total` suffix), as the
rest of /stats/prometheus does for plugin metrics.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Literal

FetchOutcome = Literal["success", "download_failure", "manifest_failure", "checksum_mismatched",
                       "fetch_failure"]
FETCH_RESULTS: tuple[FetchOutcome, ...] = ("success", "download_failure", "manifest_failure",
                                           "checksum_mismatched", "fetch_failure")


class FetchMetrics:
    """Counters of one process's fetcher; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.cache_entries = 0
        self.lookups: Counter[bool] = Counter()
        self.remote_fetches: Counter[str] = Counter()

    def lookup(self, hit: bool) -> None:
        with self._lock:
            self.lookups[hit] += 1

    def remote_fetch(self, result: FetchOutcome) -> None:
        with self._lock:
            self.remote_fetches[result] += 1

    def set_cache_entries(self, count: int) -> None:
        with self._lock:
            self.cache_entries = count

    def prometheus_lines(self) -> list[str]:
        with self._lock:
            lines = ["# TYPE wasm_cache_entries gauge",
                     f"wasm_cache_entries {self.cache_entries}",
                     "# TYPE wasm_cache_lookup_count counter"]
            lines += [f'wasm_cache_lookup_count{{hit="{str(hit).lower()}"}} {self.lookups[hit]}'
                      for hit in (True, False)]
            lines.append("# TYPE wasm_remote_fetch_count counter")
            lines += [f'wasm_remote_fetch_count{{result="{r}"}} {self.remote_fetches[r]}'
                      for r in FETCH_RESULTS]
        return lines
