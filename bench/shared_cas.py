"""Shared-data CAS round trip: get + set(cas) of one small counter, as a rate limiter does.

Stores compared, each measured in one run:
  in-process   wasmgate.runtime.shared.SharedDataStore (one worker; the floor)
  shm+flock    wasmgate.gateway.shared_store.ProcessSharedData (what --workers uses)
  sqlite-wal   the alternative: SQLite in WAL mode on tmpfs, BEGIN IMMEDIATE per CAS
Uncontended: one process, best of `--reps` runs of `--n` round trips. Contended: `--procs`
processes (default 2 = this machine's cores) increment one counter at once; the figure is wall
time / total successful increments (CAS mismatches retried), plus the mismatch count.

    python bench/shared_cas.py [--n 20000] [--reps 5] [--procs 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sqlite3
import tempfile
import time
from typing import Protocol

from wasmgate.gateway.shared_store import ProcessSharedData
from wasmgate.runtime.abi import Status
from wasmgate.runtime.shared import SharedDataStore


class Store(Protocol):
    def get(self, vm_id: str, key: bytes) -> tuple[bytes, int] | None: ...
    def set(self, vm_id: str, key: bytes, value: bytes, cas: int) -> Status: ...


class SqliteStore:
    """The same semantics over SQLite (WAL, synchronous=OFF, on tmpfs)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None, timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=OFF")
        self.db.execute("CREATE TABLE IF NOT EXISTS kv (vm TEXT, k BLOB, v BLOB, cas INTEGER,"
                        " PRIMARY KEY (vm, k)) WITHOUT ROWID")
        self.db.execute("CREATE TABLE IF NOT EXISTS counter (id INTEGER PRIMARY KEY, cas INTEGER)")
        self.db.execute("INSERT OR IGNORE INTO counter VALUES (0, 1)")

    def __reduce__(self) -> tuple[type[SqliteStore], tuple[str]]:
        return (SqliteStore, (self.path,))

    def get(self, vm_id: str, key: bytes) -> tuple[bytes, int] | None:
        row = self.db.execute("SELECT v, cas FROM kv WHERE vm=? AND k=?", (vm_id, key)).fetchone()
        return (row[0], row[1]) if row else None

    def set(self, vm_id: str, key: bytes, value: bytes, cas: int) -> Status:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            row = db.execute("SELECT cas FROM kv WHERE vm=? AND k=?", (vm_id, key)).fetchone()
            if cas and row is not None and row[0] != cas:
                db.execute("ROLLBACK")
                return Status.CAS_MISMATCH
            (new,) = db.execute("SELECT cas FROM counter WHERE id=0").fetchone()
            db.execute("UPDATE counter SET cas=? WHERE id=0", ((new + 1) & 0xFFFFFFFF or 1,))
            db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?, ?, ?)", (vm_id, key, value, new))
            db.execute("COMMIT")
            return Status.OK
        except BaseException:
            db.execute("ROLLBACK")
            raise


def increment(store: Store) -> int:
    """One CAS increment, retried until it lands; returns the number of mismatches."""
    mismatches = 0
    while True:
        found = store.get("vm", b"counter")
        value, cas = (int(found[0]), found[1]) if found else (0, 0)
        if store.set("vm", b"counter", b"%d" % (value + 1), cas) == Status.OK:
            return mismatches
        mismatches += 1


def uncontended(store: Store, n: int, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(n):
            increment(store)
        best = min(best, time.perf_counter() - start)
    return best / n * 1e6


def _contender(store: Store, n: int, barrier: object, out: object) -> None:
    barrier.wait()  # type: ignore[attr-defined]
    mismatches = sum(increment(store) for _ in range(n))
    out.put(mismatches)  # type: ignore[attr-defined]


def contended(store: Store, n: int, procs: int) -> tuple[float, int]:
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(procs + 1)
    out = context.Queue()
    workers = [context.Process(target=_contender, args=(store, n, barrier, out))
               for _ in range(procs)]
    for worker in workers:
        worker.start()
    barrier.wait()
    start = time.perf_counter()
    mismatches = sum(out.get() for _ in workers)
    elapsed = time.perf_counter() - start
    for worker in workers:
        worker.join()
    return elapsed / (n * procs) * 1e6, mismatches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--json", type=str, default=None)
    args = parser.parse_args()
    directory = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        shm = ProcessSharedData.create(tmp)
        sqlite = SqliteStore(os.path.join(tmp, "shared.db"))
        stores: list[tuple[str, Store]] = [("in-process", SharedDataStore()),
                                           ("shm+flock", shm), ("sqlite-wal", sqlite)]
        for name, store in stores:
            row: dict[str, float] = {"uncontended_us": uncontended(store, args.n, args.reps)}
            if name != "in-process":
                before = int(store.get("vm", b"counter")[0])  # type: ignore[index]
                per, mismatches = contended(store, args.n, args.procs)
                after = int(store.get("vm", b"counter")[0])  # type: ignore[index]
                assert after - before == args.n * args.procs, "lost updates"
                row |= {"contended_us": per, "mismatches": mismatches}
            results[name] = row
            figures = "  ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in row.items())
            print(f"{name:12} {figures}", flush=True)
        shm.close()
        sqlite.db.close()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"n": args.n, "reps": args.reps, "procs": args.procs,
                       "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
