"""Per-request cost through `wasmgate.testing.Emulator`, and through a naive stock host.

One request = new HTTP context + request_headers(eos=True) + response_headers(eos=True) +
complete() (on_log, on_done, on_delete). Reported: median over `--batches` batches of
`--batch` requests, in µs per request.

  (a) Higress `transformer` (Go SDK, from the gpustack-higress-plugins wheel; downloaded once)
  (b) `plugins/example-as/example.wasm` (AssemblyScript)
  (c) the transformer again through `StockHost` below: stock wasmtime-py `define_func(
      access_caller=True)` / `Func.__call__`, just enough Proxy-Wasm for this plugin.

For (a) and (b) the crossings of one request are counted, and one batch is re-run with a
timestamping tracer to split the request into time inside wasm (plus the crossing itself),
time inside Python host functions, and the rest (the Python host around the guest calls).

    python bench/request.py [--batch 2000] [--batches 7] [--json PATH] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import struct
import sys
import time
from collections import Counter
from pathlib import Path

import wasmtime

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "real"))

from wasmgate.runtime.crossings import Tracer  # noqa: E402
from wasmgate.testing import Emulator  # noqa: E402

TRANSFORMER_CONFIG = {
    "reqRules": [{"operate": "add", "headers": [{"key": "x-added", "value": "v1"}]}],
    "respRules": [{"operate": "add", "headers": [{"key": "x-resp", "value": "r1"}]}],
}
TRANSFORMER_PROPERTIES = {"route_name": "r1", "cluster_name": "c1"}
REQUEST_HEADERS = [(":method", "GET"), (":path", "/x"), (":authority", "example.com"),
                   ("user-agent", "bench"), ("accept", "*/*")]
RESPONSE_HEADERS = [(":status", "200"), ("content-type", "text/plain"), ("content-length", "2")]


def transformer_wasm() -> Path:
    from higress import higress_plugin

    return Path(higress_plugin("transformer"))


CPU_US: dict[int, list[float]] = {}  # id(batches list) -> thread CPU µs/request per batch


def median_us(run_batch, batch: int, batches: int) -> tuple[float, list[float]]:
    """Median wall-clock µs/request over `batches`; thread CPU time is kept alongside (a
    check against other processes taking the CPU: wall ≫ CPU means the run was contended)."""
    run_batch(min(batch, 500))  # warm-up
    per, cpu = [], []
    for _ in range(batches):
        c0, t0 = time.thread_time(), time.perf_counter()
        run_batch(batch)
        t1, c1 = time.perf_counter(), time.thread_time()
        per.append((t1 - t0) / batch * 1e6)
        cpu.append((c1 - c0) / batch * 1e6)
    CPU_US[id(per)] = cpu
    return statistics.median(per), per


def cpu_fields(per: list[float]) -> dict:
    cpu = CPU_US.pop(id(per))
    return {"cpu_us_per_request": statistics.median(cpu), "cpu_batches_us": cpu,
            "min_batch_us_per_request": min(per)}


# -- (a), (b): the emulator ----------------------------------------------------------------------

def emulator_request(em: Emulator):
    headers, response = REQUEST_HEADERS, RESPONSE_HEADERS

    def one() -> None:
        s = em.http_context()
        s.request_headers(headers, True)
        s.response_headers(response, True)
        s.complete()

    def run(n: int) -> None:
        for _ in range(n):
            one()
    return one, run


class TimingTracer(Tracer):
    """Counts crossings and timestamps them (only while `bench` turns it on)."""

    def __init__(self) -> None:
        self.enabled = True
        self.host = Counter()
        self.guest = Counter()
        self.host_time = 0.0  # inside host function bodies
        self.wasm_time = 0.0  # between guest entry/host return and host call/guest return
        self._mark = 0.0
        self._host_start = 0.0
        self.clock = time.perf_counter

    def guest_call(self, name: str, args: tuple[int, ...]) -> None:
        self.guest[name] += 1
        self._mark = self.clock()

    def guest_return(self, name: str, result: int | None) -> None:
        self.wasm_time += self.clock() - self._mark

    def host_call(self, qualname: str, args: tuple[int, ...]) -> None:
        now = self.clock()
        self.wasm_time += now - self._mark
        self.host[qualname] += 1
        self._host_start = now

    def host_return(self, qualname: str, result: int | None) -> None:
        now = self.clock()
        self.host_time += now - self._host_start
        self._mark = now


def with_tracer(em: Emulator, tracer: Tracer | None):
    """Swap the VM's tracer for `tracer` (RawHostFunction closures hold the AbiTracer object,
    so its methods are replaced in place) and return a function that restores it."""
    vm = em.plugin.vm
    t = vm.tracer
    saved = dict(t.__dict__)
    t.enabled = True
    for name in ("host_call", "host_return", "guest_call", "guest_return"):
        setattr(t, name, getattr(tracer, name))

    def restore() -> None:
        t.__dict__.clear()
        t.__dict__.update(saved)
    return restore


def calibrate() -> dict[str, float]:
    """No-op crossing costs on the shared engine (bench/crossings.py, smaller N)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import crossings

    from wasmgate.runtime.engine import shared_engine

    n, reps = 50_000, 3
    floor = crossings.python_loop_floor(n, reps)
    guest = crossings.ours_guest(shared_engine(), n, reps, floor)
    host = crossings.ours_host(shared_engine(), n, reps)
    return {"guest_call_us": guest["add3"], "host_call_us": host["noop"]}


def bench_emulator(label: str, em: Emulator, batch: int, batches: int,
                   profile: bool) -> dict:
    _, run = emulator_request(em)
    med, per = median_us(run, batch, batches)
    # crossings per request and a wasm / host-function / rest split (tracer on: slower)
    tracer = TimingTracer()
    restore = with_tracer(em, tracer)
    try:
        n = min(batch, 1000)
        t0 = time.perf_counter()
        run(n)
        traced_total = (time.perf_counter() - t0) / n * 1e6
    finally:
        restore()
    host_calls = {k: v / n for k, v in sorted(tracer.host.items(), key=lambda kv: -kv[1])}
    guest_calls = {k: v / n for k, v in tracer.guest.items()}
    result = {
        "label": label, "us_per_request": med, "batches_us": per, "batch": batch,
        **cpu_fields(per),
        "host_calls_per_request": sum(host_calls.values()),
        "guest_calls_per_request": sum(guest_calls.values()),
        "host_calls": host_calls, "guest_calls": guest_calls,
        "traced_us_per_request": traced_total,
        "traced_wasm_us": tracer.wasm_time / n * 1e6,
        "traced_host_fn_us": tracer.host_time / n * 1e6,
    }
    allocs = allocations_per_request(em, run, min(batch, 1000))
    result.update(allocs)
    if profile:
        result["profile"] = profile_text(run, batch)
    return result


def allocations_per_request(em: Emulator, run, n: int) -> dict:
    """Guest allocator calls made from inside host calls (not seen by the tracer), timed."""
    vm = em.plugin.vm
    original = vm.allocate
    acc = [0.0, 0]
    clock = time.perf_counter

    def allocate(size: int) -> int:
        t0 = clock()
        try:
            return original(size)
        finally:
            acc[0] += clock() - t0
            acc[1] += 1
    vm.allocate = allocate
    try:
        run(n)
    finally:
        del vm.allocate
    return {"allocator_calls_per_request": acc[1] / n,
            "allocator_us_per_call": acc[0] / acc[1] * 1e6 if acc[1] else 0.0}


def profile_text(run, n: int, top: int = 30) -> str:
    prof = cProfile.Profile()
    prof.enable()
    run(n)
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    stats.sort_stats("tottime").print_stats(top)
    return out.getvalue()


# -- (c): a naive stock wasmtime-py host for the transformer ------------------------------------

I32 = wasmtime.ValType.i32
I64 = wasmtime.ValType.i64
_VT = {"i32": I32, "i64": I64}
OK, NOT_FOUND = 0, 1


def serialize_pairs(pairs: list[tuple[bytes, bytes]]) -> bytes:
    head = [struct.pack("<I", len(pairs))]
    body = []
    for k, v in pairs:
        head.append(struct.pack("<II", len(k), len(v)))
        body.append(k + b"\0" + v + b"\0")
    return b"".join(head + body)


def deserialize_pairs(data: bytes) -> list[tuple[bytes, bytes]]:
    (n,) = struct.unpack_from("<I", data, 0)
    sizes = struct.unpack_from(f"<{2 * n}I", data, 4)
    pos = 4 + 8 * n
    out = []
    for i in range(n):
        kl, vl = sizes[2 * i], sizes[2 * i + 1]
        k = data[pos:pos + kl]
        pos += kl + 1
        v = data[pos:pos + vl]
        pos += vl + 1
        out.append((k, v))
    return out


class StockHost:
    """Just enough Proxy-Wasm, on stock wasmtime-py, to run the transformer's requests.

    Implemented: proxy_log, proxy_get/set_header_map_pairs, proxy_get_header_map_value,
    proxy_get_buffer_bytes (plugin configuration only), proxy_get_property (a dict),
    proxy_set_effective_context, and the WASI calls Go's runtime start needs. Every other import
    is a stub returning 0. Returned bytes go through the guest's proxy_on_memory_allocate.
    """

    def __init__(self, wasm: Path, config: bytes, properties: dict[str, str]) -> None:
        self.engine = wasmtime.Engine()
        self.module = wasmtime.Module.from_file(self.engine, str(wasm))
        self.store = wasmtime.Store(self.engine)
        self.config = config
        self.properties = {k.encode(): v.encode() for k, v in properties.items()}
        self.properties[b"plugin_root_id"] = b""
        self.properties[b"plugin_name"] = b"transformer"
        self.missing_properties: Counter = Counter()
        self.logs: list[tuple[int, str]] = []
        self.maps: dict[int, list[tuple[bytes, bytes]]] = {}
        self.calls = Counter()
        self.memory: wasmtime.Memory | None = None
        self.counting = False
        linker = wasmtime.Linker(self.engine)
        seen = set()
        for imp in self.module.imports:
            if (imp.module, imp.name) in seen:
                continue
            seen.add((imp.module, imp.name))
            impl = self._counted(imp.name, getattr(self, imp.name, None)
                                 or self._stub(imp.name, imp.type))
            linker.define_func(imp.module, imp.name, imp.type, impl, access_caller=True)
        self.instance = linker.instantiate(self.store, self.module)
        ex = self.instance.exports(self.store)
        self.memory = ex["memory"]
        self.malloc = ex["proxy_on_memory_allocate"]
        self.ex = ex
        self.next_id = 1
        ex["_initialize"](self.store)
        self.root_id = self._new_id()
        ex["proxy_on_context_create"](self.store, self.root_id, 0)
        assert ex["proxy_on_vm_start"](self.store, self.root_id, 0) != 0
        assert ex["proxy_on_configure"](self.store, self.root_id, len(config)) != 0

    def _new_id(self) -> int:
        i = self.next_id
        self.next_id += 1
        return i

    def _stub(self, name: str, ty: wasmtime.FuncType):
        returns = bool(ty.results)

        def stub(caller, *args):
            return 0 if returns else None
        return stub

    def _counted(self, name: str, impl):
        def counted(caller, *args):
            if self.counting:
                self.calls[name] += 1
            return impl(caller, *args)
        return counted if name not in ("fd_write",) else impl

    # helpers
    def _read(self, caller, ptr: int, n: int) -> bytes:
        return bytes(self.memory.read(caller, ptr, ptr + n))

    def _return_bytes(self, caller, data: bytes, ptr_ptr: int, len_ptr: int) -> int:
        ptr = self.malloc(caller, len(data)) if data else 0
        if data:
            self.memory.write(caller, data, ptr)
        self.memory.write(caller, struct.pack("<I", ptr), ptr_ptr)
        self.memory.write(caller, struct.pack("<I", len(data)), len_ptr)
        return OK

    # Proxy-Wasm imports the transformer's requests use
    def proxy_log(self, caller, level, ptr, size):
        self.logs.append((level, self._read(caller, ptr, size).decode("utf-8", "replace")))
        return OK

    def proxy_get_header_map_value(self, caller, map_type, kptr, klen, ret_ptr, ret_len):
        key = self._read(caller, kptr, klen).lower()
        for k, v in self.maps.get(map_type, ()):
            if k == key:
                return self._return_bytes(caller, v, ret_ptr, ret_len)
        return NOT_FOUND

    def proxy_get_header_map_pairs(self, caller, map_type, ret_ptr, ret_len):
        return self._return_bytes(caller, serialize_pairs(self.maps.get(map_type, [])),
                                  ret_ptr, ret_len)

    def proxy_set_header_map_pairs(self, caller, map_type, ptr, size):
        self.maps[map_type] = deserialize_pairs(self._read(caller, ptr, size))
        return OK

    def proxy_get_buffer_bytes(self, caller, buf_type, start, length, ret_ptr, ret_len):
        if buf_type != 7:  # PLUGIN_CONFIGURATION
            return NOT_FOUND
        return self._return_bytes(caller, self.config[start:start + length], ret_ptr, ret_len)

    def proxy_get_property(self, caller, path_ptr, path_len, ret_ptr, ret_len):
        path = self._read(caller, path_ptr, path_len).rstrip(b"\0")
        value = self.properties.get(path)
        if value is None:
            self.missing_properties[path] += 1
            return NOT_FOUND
        return self._return_bytes(caller, value, ret_ptr, ret_len)

    def proxy_set_effective_context(self, caller, context_id):
        return OK

    # WASI the Go runtime needs
    def fd_write(self, caller, fd, iovs, iovs_len, nwritten_ptr):
        total = 0
        for i in range(iovs_len):
            _, n = struct.unpack("<II", self._read(caller, iovs + 8 * i, 8))
            total += n
        self.memory.write(caller, struct.pack("<I", total), nwritten_ptr)
        return 0

    def clock_time_get(self, caller, clock_id, precision, ret_ptr):
        self.memory.write(caller, struct.pack("<Q", time.time_ns()), ret_ptr)
        return 0

    def args_sizes_get(self, caller, ret_count, ret_size):
        self.memory.write(caller, bytes(4), ret_count)
        self.memory.write(caller, bytes(4), ret_size)
        return 0

    environ_sizes_get = args_sizes_get

    def fd_prestat_get(self, caller, fd, ret_ptr):
        return 8  # EBADF: no preopened directories (ends Go's preopen scan)

    def fd_fdstat_get(self, caller, fd, ret_ptr):
        return 8

    def random_get(self, caller, ptr, n):
        import os

        self.memory.write(caller, os.urandom(n), ptr)
        return 0

    # one request
    def request(self) -> None:
        ex, store = self.ex, self.store
        cid = self._new_id()
        ex["proxy_on_context_create"](store, cid, self.root_id)
        self.maps[0] = [(k.encode(), v.encode()) for k, v in REQUEST_HEADERS]
        ex["proxy_on_request_headers"](store, cid, len(REQUEST_HEADERS), 1)
        self.maps[2] = [(k.encode(), v.encode()) for k, v in RESPONSE_HEADERS]
        ex["proxy_on_response_headers"](store, cid, len(RESPONSE_HEADERS), 1)
        ex["proxy_on_log"](store, cid)
        ex["proxy_on_done"](store, cid)
        ex["proxy_on_delete"](store, cid)


def bench_stock(wasm: Path, batch: int, batches: int) -> dict:
    host = StockHost(wasm, json.dumps(TRANSFORMER_CONFIG).encode(), TRANSFORMER_PROPERTIES)
    host.request()
    assert (b"x-added", b"v1") in host.maps[0], host.maps[0]
    assert (b"x-resp", b"r1") in host.maps[2], host.maps[2]

    def run(n: int) -> None:
        for _ in range(n):
            host.request()
    # stock is several times slower: fewer requests per batch
    small = max(100, batch // 5)
    med, per = median_us(run, small, batches)
    host.counting = True
    host.calls.clear()
    run(100)
    host.counting = False
    calls = {k: v / 100 for k, v in host.calls.most_common()}
    return {"label": "transformer (Go) — naive stock wasmtime-py host", "us_per_request": med,
            "batches_us": per, "batch": small, **cpu_fields(per),
            "host_calls_per_request": sum(calls.values()),
            "guest_calls_per_request": 6, "host_calls": calls,
            "missing_properties": {k.decode(): v for k, v in host.missing_properties.items()}}


# -- main ----------------------------------------------------------------------------------------

def table(results: list[dict], cal: dict[str, float]) -> str:
    lines = ["| plugin / host | µs per request (median) | fastest batch | thread CPU µs/req "
             "| host calls / req | guest calls / req |", "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        hc = r.get("host_calls_per_request")
        gc = r.get("guest_calls_per_request")
        lines.append(f"| {r['label']} | **{r['us_per_request']:.1f}** "
                     f"| {r['min_batch_us_per_request']:.1f} | {r['cpu_us_per_request']:.1f} "
                     f"| {'' if hc is None else f'{hc:.0f}'} "
                     f"| {'' if gc is None else f'{gc:.0f}'} |")
    lines.append("")
    lines.append(f"One request = new HTTP context + request_headers(eos) + response_headers(eos) "
                 f"+ complete() (on_log/on_done/on_delete); median over batches of "
                 f"{results[0]['batch']} requests (stock: {results[-1]['batch']}). Thread CPU "
                 f"time ≈ wall time means the run was not disturbed by other processes.")
    lines.append("")
    lines.append("Split of one request (one batch re-run with a timestamping tracer, which "
                 "itself adds ~1 µs per crossing; so the parts sum to more than the median):")
    lines.append("")
    lines.append("| plugin | traced µs/req | in wasm (+crossings) | of which guest code "
                 "(est.) | in host function bodies | of which guest allocator "
                 "| rest (Python host around guest calls) |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        if "traced_wasm_us" not in r:
            continue
        rest = r["traced_us_per_request"] - r["traced_wasm_us"] - r["traced_host_fn_us"]
        crossing = (r["guest_calls_per_request"] * cal["guest_call_us"]
                    + r["host_calls_per_request"] * cal["host_call_us"])
        pure = r["traced_wasm_us"] - crossing
        r["estimated_guest_code_us"] = pure
        alloc = r["allocator_calls_per_request"] * r["allocator_us_per_call"]
        lines.append(f"| {r['label']} | {r['traced_us_per_request']:.1f} "
                     f"| {r['traced_wasm_us']:.1f} | {pure:.1f} "
                     f"| {r['traced_host_fn_us']:.1f} "
                     f"| {alloc:.1f} ({r['allocator_calls_per_request']:g} × "
                     f"{r['allocator_us_per_call']:.2f}) | {rest:.1f} |")
    lines.append("")
    lines.append(f"Guest code (est.) = in-wasm time − guest calls × {cal['guest_call_us']:.2f} µs "
                 f"− host calls × {cal['host_call_us']:.2f} µs (no-op crossing costs measured "
                 f"in this run). The guest allocator (`malloc`/`proxy_on_memory_allocate`, "
                 f"called by the host to return bytes) is timed inside the host function bodies.")
    lines.append("")
    for r in results:
        if "host_calls" in r:
            calls = ", ".join(f"`{k.split('.')[-1]}` {v:g}" for k, v in r["host_calls"].items())
            lines.append(f"- {r['label']}: host calls per request: {calls}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2000)
    ap.add_argument("--batches", type=int, default=7)
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--profile", action="store_true", help="cProfile one batch of each")
    ap.add_argument("--skip-stock", action="store_true")
    args = ap.parse_args()

    wasm = transformer_wasm()
    results = []
    em = Emulator(wasm, plugin_config=json.dumps(TRANSFORMER_CONFIG),
                  properties=TRANSFORMER_PROPERTIES, log_level="info").start()
    one, _ = emulator_request(em)
    one()
    s = em.http_context()
    s.request_headers(REQUEST_HEADERS, True)
    s.response_headers(RESPONSE_HEADERS, True)
    assert (b"x-added", b"v1") in s.request_headers_now, s.request_headers_now
    assert (b"x-resp", b"r1") in s.response_headers_now, s.response_headers_now
    s.complete()
    results.append(bench_emulator("transformer (Go) — wasmgate Emulator", em, args.batch,
                                  args.batches, args.profile))

    example = ROOT / "plugins" / "example-as" / "example.wasm"
    em2 = Emulator(example, plugin_config="hello", root_id="example", log_level="info").start()
    results.append(bench_emulator("example-as (AssemblyScript) — wasmgate Emulator", em2,
                                  args.batch, args.batches, args.profile))

    if not args.skip_stock:
        results.append(bench_stock(wasm, args.batch, args.batches))

    cal = calibrate()
    print(table(results, cal))
    if args.profile:
        for r in results:
            if "profile" in r:
                print(f"\n### cProfile: {r['label']}\n```\n{r['profile']}```")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"calibration": cal, "results": results}, f, indent=2, default=str)
            f.write("\n")


if __name__ == "__main__":
    sys.exit(main())
