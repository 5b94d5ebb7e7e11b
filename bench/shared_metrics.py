"""Plugin metric operations: what `proxy_increment_metric` / `proxy_record_metric` cost the store.

Stores compared, each measured in one run:
  in-process   wasmgate.runtime.metrics.MetricStore (one worker; the floor)
  shm+flock    wasmgate.gateway.shared_metrics.ProcessMetricStore (what --workers uses)
Operations: increment a counter, set a gauge, record a histogram sample, get a counter.
Uncontended: one process, best of `--reps` runs of `--n` operations. Contended: `--procs`
processes (default 2 = this machine's cores) increment one counter at once; the figure is wall
time / total increments, and the final value is checked (no lost increments).

    python bench/shared_metrics.py [--n 50000] [--reps 5] [--procs 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import tempfile
import time
from collections.abc import Callable

from wasmgate.gateway.shared_metrics import ProcessMetricStore
from wasmgate.runtime.abi import MetricType
from wasmgate.runtime.metrics import MetricStore


def operations(store: MetricStore) -> dict[str, Callable[[], object]]:
    counter = store.define(MetricType.COUNTER, "bench_counter")
    gauge = store.define(MetricType.GAUGE, "bench_gauge")
    histogram = store.define(MetricType.HISTOGRAM, "bench_histogram")
    return {"increment_us": lambda: store.increment(counter, 1),
            "gauge_set_us": lambda: store.record(gauge, 7),
            "histogram_record_us": lambda: store.record(histogram, 12),
            "get_us": lambda: store.get(counter)}


def uncontended(op: Callable[[], object], n: int, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(n):
            op()
        best = min(best, time.perf_counter() - start)
    return best / n * 1e6


def _contender(store: MetricStore, n: int, barrier: object) -> None:
    counter = store.define(MetricType.COUNTER, "bench_contended")
    barrier.wait()  # type: ignore[attr-defined]
    for _ in range(n):
        store.increment(counter, 1)


def contended(store: ProcessMetricStore, n: int, procs: int) -> float:
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(procs + 1)
    workers = [context.Process(target=_contender, args=(store, n, barrier))
               for _ in range(procs)]
    for worker in workers:
        worker.start()
    barrier.wait()
    start = time.perf_counter()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - start
    total = store.get(store.define(MetricType.COUNTER, "bench_contended"))
    assert total == n * procs, f"lost increments: {total} != {n * procs}"
    return elapsed / (n * procs) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--json", type=str, default=None)
    args = parser.parse_args()
    directory = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        shm = ProcessMetricStore.create(tmp, workers=args.procs)
        stores: list[tuple[str, MetricStore]] = [("in-process", MetricStore()),
                                                 ("shm+flock", shm)]
        for name, store in stores:
            row = {op_name: uncontended(op, args.n, args.reps)
                   for op_name, op in operations(store).items()}
            if store is shm:
                row["contended_increment_us"] = contended(shm, args.n, args.procs)
            results[name] = row
            print(f"{name:12} " + "  ".join(f"{k}={v:.2f}" for k, v in row.items()), flush=True)
        shm.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"n": args.n, "reps": args.reps, "procs": args.procs,
                       "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
