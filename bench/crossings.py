"""Per-crossing cost: stock wasmtime-py vs wasmgate's raw crossings, measured in one run.

Python->Wasm: a Python loop calls an export N times (the cost of an empty Python loop of N
iterations is subtracted). Wasm->Python: one guest call runs a wasm loop that calls the
import N times; per-host-call cost = (loop time - empty wasm loop time) / N.
Every figure is the best of `--reps` repetitions, in microseconds per call.

    python bench/crossings.py [--n 200000] [--reps 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import wasmtime

from wasmgate.runtime.crossings import (
    CallerState,
    GuestFunction,
    MemoryAccess,
    RawHostFunction,
    context_address,
    set_epoch_deadline,
)
from wasmgate.runtime.engine import shared_engine

BIG_DEADLINE = 1 << 40

# Guest side: `nop` ()->(), `add3` (i32,i32,i32)->i32, `run(n)` calls env.f(5 x i32) n times
# (f reads 16 B at arg0 and writes 4 B at arg2 when it is the memory variant), `empty(n)` is
# the same loop without the call.
WAT = """
(module
  (import "env" "f" (func $f (param i32 i32 i32 i32 i32)))
  (memory (export "memory") 1)
  (func (export "nop"))
  (func (export "add3") (param i32 i32 i32) (result i32)
    (i32.add (i32.add (local.get 0) (local.get 1)) (local.get 2)))
  (func (export "run") (param $n i32) (local $i i32)
    (block $done
      (loop $l
        (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
        (call $f (i32.const 64) (i32.const 16) (i32.const 128) (local.get $i) (i32.const 5))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $l))))
  (func (export "empty") (param $n i32) (local $i i32) (local $acc i32)
    (block $done
      (loop $l
        (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
        (local.set $acc (i32.add (local.get $acc) (local.get $i)))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $l)))
    (global.set $sink (local.get $acc)))
  (global $sink (mut i32) (i32.const 0))
)
"""

I32 = wasmtime.ValType.i32
FIVE_I32 = wasmtime.FuncType([I32(), I32(), I32(), I32(), I32()], [])


def best_of(reps: int, fn) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def python_loop_floor(n: int, reps: int) -> float:
    def loop() -> None:
        for _ in range(n):
            pass
    return best_of(reps, loop)


# -- stock wasmtime-py ---------------------------------------------------------------------------

def stock_guest(engine: wasmtime.Engine, n: int, reps: int, floor: float) -> dict[str, float]:
    store = wasmtime.Store(engine)
    linker = wasmtime.Linker(engine)
    linker.define_func("env", "f", FIVE_I32, lambda *a: None)
    exports = linker.instantiate(store, wasmtime.Module(engine, WAT)).exports(store)
    nop, add3 = exports["nop"], exports["add3"]

    def call_nop() -> None:
        for _ in range(n):
            nop(store)

    def call_add3() -> None:
        for _ in range(n):
            add3(store, 1, 2, 3)

    assert add3(store, 1, 2, 3) == 6
    return {"nop": (best_of(reps, call_nop) - floor) / n * 1e6,
            "add3": (best_of(reps, call_add3) - floor) / n * 1e6}


def stock_host(engine: wasmtime.Engine, n: int, reps: int) -> dict[str, float]:
    out = {}
    for variant in ("noop", "memory"):
        store = wasmtime.Store(engine)
        linker = wasmtime.Linker(engine)
        if variant == "noop":
            linker.define_func("env", "f", FIVE_I32, lambda a, b, c, d, e: None)
        else:
            def f(caller: wasmtime.Caller, ptr: int, length: int, out_ptr: int, d: int,
                  e: int) -> None:
                mem = caller["memory"]
                data = mem.read(caller, ptr, ptr + length)
                mem.write(caller, len(data).to_bytes(4, "little"), out_ptr)
            linker.define_func("env", "f", FIVE_I32, f, access_caller=True)
        exports = linker.instantiate(store, wasmtime.Module(engine, WAT)).exports(store)
        run, empty = exports["run"], exports["empty"]
        loop = best_of(reps, lambda: run(store, n))
        base = best_of(reps, lambda: empty(store, n))
        out[variant] = (loop - base) / n * 1e6
        if variant == "memory":
            assert exports["memory"].read(store, 128, 132) == (16).to_bytes(4, "little")
    return out


# -- wasmgate crossings --------------------------------------------------------------------------

class Ours:
    """One instance wired as WasmVM wires it: RawHostFunction imports, GuestFunction exports."""

    def __init__(self, engine: wasmtime.Engine, variant: str) -> None:
        self.store = wasmtime.Store(engine)
        self.store.set_epoch_deadline(BIG_DEADLINE)
        self.state = CallerState(context_address(self.store))
        self.memory: MemoryAccess | None = None
        if variant == "noop":
            def impl(a: int, b: int, c: int, d: int, e: int) -> None:
                return None
        else:
            def impl(ptr: int, length: int, out_ptr: int, d: int, e: int) -> None:
                mem = self.memory
                data = mem.read(ptr, length)
                mem.write_u32(out_ptr, len(data))
        self.host = RawHostFunction("env", "f", ("i32",) * 5, (), impl, self.state,
                                    self._on_exception)
        linker = wasmtime.Linker(engine)
        self.host.define(linker)
        exports = linker.instantiate(self.store, wasmtime.Module(engine, WAT)).exports(self.store)
        self._wasm_memory = exports["memory"]
        self.memory = MemoryAccess(exports["memory"], self.state, 64 << 20)
        self.nop = GuestFunction("nop", exports["nop"], (), ())
        self.add3 = GuestFunction("add3", exports["add3"], ("i32",) * 3, ("i32",))
        self.run = GuestFunction("run", exports["run"], ("i32",), ())
        self.empty = GuestFunction("empty", exports["empty"], ("i32",), ())
        self.ctx = context_address(self.store)
        set_epoch_deadline(self.ctx, BIG_DEADLINE)

    def _on_exception(self, qualname: str, exc: BaseException) -> bytes:
        raise SystemExit(f"host function {qualname} raised {exc!r}")


def ours_guest(engine: wasmtime.Engine, n: int, reps: int, floor: float) -> dict[str, float]:
    o = Ours(engine, "noop")
    ctx, nop, add3 = o.ctx, o.nop.call, o.add3.call
    empty_args: tuple[int, ...] = ()
    args = (1, 2, 3)

    def call_nop() -> None:
        for _ in range(n):
            nop(ctx, empty_args)

    def call_add3() -> None:
        for _ in range(n):
            add3(ctx, args)

    assert add3(ctx, args) == 6
    return {"nop": (best_of(reps, call_nop) - floor) / n * 1e6,
            "add3": (best_of(reps, call_add3) - floor) / n * 1e6}


def ours_host(engine: wasmtime.Engine, n: int, reps: int) -> dict[str, float]:
    out = {}
    for variant in ("noop", "memory"):
        o = Ours(engine, variant)
        ctx, args = o.ctx, (n,)
        loop = best_of(reps, lambda: o.run.call(ctx, args))
        base = best_of(reps, lambda: o.empty.call(ctx, args))
        out[variant] = (loop - base) / n * 1e6
        if variant == "memory":
            assert o._wasm_memory.read(o.store, 128, 132) == (16).to_bytes(4, "little")
    return out


# -- report --------------------------------------------------------------------------------------

ROWS = [
    ("guest", "nop", "Python→Wasm, `()->()` export"),
    ("guest", "add3", "Python→Wasm, `(i32,i32,i32)->i32` export"),
    ("host", "noop", "Wasm→Python host function, 5 × i32 args, no-op"),
    ("host", "memory", "Wasm→Python host function, 5 × i32 + read 16 B + write 4 B"),
]


def measure(n: int, reps: int) -> dict:
    floor = python_loop_floor(n, reps)
    plain = wasmtime.Engine()
    shared = shared_engine()
    return {
        "n": n, "reps": reps, "python_loop_floor_us": floor / n * 1e6,
        "stock": {"guest": stock_guest(plain, n, reps, floor),
                  "host": stock_host(plain, n, reps)},
        "ours_shared_engine": {"guest": ours_guest(shared, n, reps, floor),
                               "host": ours_host(shared, n, reps)},
        "ours_plain_engine": {"guest": ours_guest(plain, n, reps, floor),
                              "host": ours_host(plain, n, reps)},
    }


def table(r: dict) -> str:
    lines = [
        "| crossing | stock wasmtime-py (µs) | wasmgate, shared engine (µs) "
        "| wasmgate, plain engine (µs) | speed-up |",
        "|---|---:|---:|---:|---:|",
    ]
    for kind, key, label in ROWS:
        stock = r["stock"][kind][key]
        ours = r["ours_shared_engine"][kind][key]
        plain = r["ours_plain_engine"][kind][key]
        lines.append(f"| {label} | {stock:.2f} | **{ours:.2f}** | {plain:.2f} "
                     f"| {stock / ours:.1f}× |")
    lines.append("")
    lines.append(f"N = {r['n']} calls per repetition, best of {r['reps']}; stock uses a plain "
                 f"`wasmtime.Engine()`, \"shared engine\" is `shared_engine()` (epoch "
                 f"interruption on). Python→Wasm figures have the empty Python loop "
                 f"({r['python_loop_floor_us'] * 1000:.0f} ns/iteration) subtracted; "
                 f"Wasm→Python figures have the empty wasm loop subtracted.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    result = measure(args.n, args.reps)
    print(table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    sys.exit(main())
