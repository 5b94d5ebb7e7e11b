"""Shared data in Redis (`spec.sharedData`): what one host call and one CAS round trip cost.

Starts a throwaway redis-server on 127.0.0.1 (or uses `--url`) and measures, in one run:
  ping-raw     a PING over a plain blocking socket: the loopback round trip, the floor
  get / set    one RedisSharedData.get / .set(cas=0) (one round trip each)
  cas          get + set with the CAS just read, one process (bench/shared_cas.py's figure)
  contended    `--procs` processes incrementing one counter (mismatches retried)
  in-process   the same CAS round trip on SharedDataStore, for scale
Figures are best of `--reps` runs of `--n` operations, in µs per operation.

    python bench/redis_shared.py [--n 5000] [--reps 5] [--procs 2] [--url redis://...] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from shared_cas import contended, uncontended

from wasmgate.gateway.redis_shared import RedisSharedData
from wasmgate.runtime.shared import SharedDataStore


def best(fn: Callable[[], None], n: int, reps: int) -> float:
    fastest = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        fastest = min(fastest, time.perf_counter() - start)
    return fastest / n * 1e6


def start_redis(workdir: str) -> tuple[subprocess.Popen[bytes], int]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server not found (scripts/install-test-deps installs it), or pass --url")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no", "--dir", workdir],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    return process, port
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                raise
            time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--url", type=str, default=None)
    parser.add_argument("--json", type=str, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        process, url = None, args.url
        if url is None:
            process, port = start_redis(tmp)
            url = f"redis://127.0.0.1:{port}/0?prefix=bench:"
        try:
            store = RedisSharedData(url)
            where = store.where
            results: dict[str, float] = {}
            with socket.create_connection((where.host, where.port)) as raw:
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

                def ping() -> None:
                    raw.sendall(b"PING\r\n")
                    raw.recv(64)

                results["ping-raw"] = best(ping, args.n, args.reps)
            store.set("vm", b"k", b"x" * 16, 0)
            results["get"] = best(lambda: store.get("vm", b"k"), args.n, args.reps)
            results["set"] = best(lambda: store.set("vm", b"k", b"x" * 16, 0), args.n,
                                  args.reps)
            results["cas"] = uncontended(store, args.n, args.reps)
            before = int(store.get("vm", b"counter")[0])  # type: ignore[index]
            per, mismatches = contended(store, args.n, args.procs)
            after = int(store.get("vm", b"counter")[0])  # type: ignore[index]
            assert after - before == args.n * args.procs, "lost updates"
            results["contended"] = per
            results["in-process"] = uncontended(SharedDataStore(), args.n * 4, args.reps)
            for name, figure in results.items():
                print(f"{name:12} {figure:8.2f} µs", flush=True)
            print(f"{'mismatches':12} {mismatches:8d} ({args.procs} processes)")
            store.close()
        finally:
            if process is not None:
                process.terminate()
                process.wait(10)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"n": args.n, "reps": args.reps, "procs": args.procs, "results": results,
                       "mismatches": mismatches}, f, indent=2)


if __name__ == "__main__":
    main()
