"""Shared-queue round trip: enqueue + dequeue of one small item, as a plugin hands work over.

Stores compared, each measured in one run:
  in-process   wasmgate.runtime.shared.SharedQueueStore (one worker; the floor)
  shm+flock    wasmgate.gateway.shared_queues.ProcessSharedQueues (what --workers uses),
               enqueuer = owner (direct wake-up) and enqueuer != owner (a datagram per item)
Best of `--reps` runs of `--n` round trips.

    python bench/shared_queues.py [--n 20000] [--reps 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

from wasmgate.gateway.shared_queues import ProcessSharedQueues
from wasmgate.gateway.shared_store import ProcessSharedData
from wasmgate.runtime.abi import Status
from wasmgate.runtime.shared import SharedQueueStore


def _ignore(owner: object, token: int) -> None:
    pass


def round_trip(store: SharedQueueStore, token: int, n: int, reps: int) -> float:
    item = b"x" * 64
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(n):
            if store.enqueue(token, item, _ignore) != Status.OK:
                raise RuntimeError("enqueue failed")
            store.dequeue(token)
        best = min(best, time.perf_counter() - start)
    return best / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()

    results: dict[str, float] = {}
    local = SharedQueueStore()
    token = local.register("vm", "q", "owner")
    assert isinstance(token, int)
    results["in-process"] = round_trip(local, token, args.n, args.reps)

    with tempfile.TemporaryDirectory() as directory:
        data = ProcessSharedData.create(directory)
        owner = ProcessSharedQueues(data, 0)
        other = ProcessSharedQueues(data, 1)
        try:
            token = owner.register("vm", "q", "owner")
            assert isinstance(token, int)
            results["shm+flock, owner enqueues"] = round_trip(owner, token, args.n, args.reps)
            # worker 1 enqueues: every item sends a wake-up datagram to worker 0's socket
            # (nobody reads it here; the kernel drops what overflows, as the store allows)
            results["shm+flock, other worker enqueues"] = round_trip(other, token, args.n,
                                                                     args.reps)
        finally:
            owner.close()
            other.close()
            data.close()
            data.unlink()

    for name, micros in results.items():
        print(f"{name:36s} {micros:6.2f} µs per enqueue + dequeue")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(results, out, indent=2)


if __name__ == "__main__":
    main()
