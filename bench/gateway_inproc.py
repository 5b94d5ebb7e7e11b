"""The gateway's per-request Python cost, in process: no sockets, no wrk, no other processes.

A request goes through the real gateway objects: `DownstreamProtocol` (httptools parse) ->
`Exchange` -> `ChainStream` / `PluginSlot` -> `HttpContext` -> the plugin's VM, and the
response back the same way, with a pooled `UpstreamConnection` whose transport answers each
request (nginx's 100-byte reply) on the next loop turn, and a downstream transport that
feeds the next request when a response is written (wrk with one connection). What is left
out is the kernel (the four send/recv syscalls and epoll of a real request): the in-process
figure is the Python the gateway adds per request.

    python bench/gateway_inproc.py [--requests 20000] [--reps 5] [--only example,...]
                                   [--profile NAME] [--parts] [--json PATH]

`NAME+log` (e.g. `none+log`) also writes Istio's default access log line per request (to
/dev/null, flushed each second as to a file): what the access log costs.
Configurations are those of bench/gateway.sh: no plugin, the AssemblyScript example plugin,
the Higress Go transformer (tests/real/higress.py fetches it once); and `noop`, a plugin whose
every callback returns at once and which makes no host call: noop - none is what the host
itself adds per request for one plugin (contexts, chain, the 7 guest calls), and
example - noop what the example's own work costs (its code, host calls, allocations).
`--profile NAME` prints a cProfile of one run. `--parts` splits what each plugin adds to
`none` into: the Python around the guest calls (stream set-up, chain, contexts, actions, the
gateway's plugin path) and the time inside `WasmVM.call` (one re-run timing each guest call),
the latter into host function bodies, guest allocator re-entries (another re-run timing each
host call and allocation) and the rest (guest code and crossings). Timer costs are measured
and subtracted; `--json PATH` keeps the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import dataclasses
import gc
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "real"))

from wasmgate.api.loading import load_text  # noqa: E402
from wasmgate.chain import FailStrategy, FilterChain, PluginSlot  # noqa: E402
from wasmgate.gateway.access_log import AccessLog, AccessLogFormat, AccessLogWriter  # noqa: E402
from wasmgate.gateway.host import GatewayHost  # noqa: E402
from wasmgate.gateway.proxy import ProxyState, Router  # noqa: E402
from wasmgate.gateway.server import DownstreamProtocol  # noqa: E402
from wasmgate.gateway.stats import GatewayStats  # noqa: E402
from wasmgate.gateway.upstream import Endpoint, UpstreamConnection, UpstreamPools  # noqa: E402
from wasmgate.runtime.abi import LogLevel  # noqa: E402
from wasmgate.runtime.module import PluginModule  # noqa: E402
from wasmgate.runtime.plugin import Plugin, PluginConfig  # noqa: E402

EXAMPLE = ROOT / "plugins" / "example-as" / "example.wasm"
NOOP_WAT = """(module
  (memory (export "memory") 1)
  (global $next (mut i32) (i32.const 1024))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "malloc") (param i32) (result i32)
    (local $p i32) (local.set $p (global.get $next))
    (global.set $next (i32.add (global.get $next) (local.get 0))) (local.get $p))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (i32.const 0))
  (func (export "proxy_on_request_body") (param i32 i32 i32) (result i32) (i32.const 0))
  (func (export "proxy_on_request_trailers") (param i32 i32) (result i32) (i32.const 0))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32) (i32.const 0))
  (func (export "proxy_on_response_body") (param i32 i32 i32) (result i32) (i32.const 0))
  (func (export "proxy_on_response_trailers") (param i32 i32) (result i32) (i32.const 0))
  (func (export "proxy_on_log") (param i32))
  (func (export "proxy_on_done") (param i32) (result i32) (i32.const 1))
  (func (export "proxy_on_delete") (param i32)))"""
GATEWAY = """\
apiVersion: wasmgate.io/v1alpha1
kind: Gateway
metadata: {name: bench}
spec:
  listen: 127.0.0.1:18190
  clusters: [{name: up, endpoints: ["127.0.0.1:18181"]}]
  routes: [{name: all, cluster: up}]
"""
PLUGINS = {
    "example": """
---
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {name: example}
spec: {url: "file://@WASM@", pluginName: example, pluginConfig: {greeting: bench}}
""",
    "noop": """
---
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {name: noop}
spec: {url: "file://@WASM@"}
""",
    "transformer": """
---
apiVersion: extensions.istio.io/v1alpha1
kind: WasmPlugin
metadata: {name: transformer}
spec:
  url: "file://@WASM@"
  pluginConfig:
    reqRules: [{operate: add, headers: [{key: x-added, value: v1}]}]
    respRules: [{operate: add, headers: [{key: x-resp, value: r1}]}]
""",
}
# What wrk sends and what the bench upstream (bench/stack/nginx_upstream.conf) answers.
REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:18190\r\n\r\n"
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Tue, 24 Nov 2026 07:55:00 GMT\r\n"
            b"Content-Type: text/plain\r\nContent-Length: 100\r\nConnection: keep-alive\r\n\r\n"
            + b"wasmgate upstream: " + b"0123456789" * 8 + b"\n")


def wasm_of(name: str) -> Path:
    if name == "example":
        return EXAMPLE
    if name == "noop":
        import tempfile

        import wasmtime

        path = Path(tempfile.gettempdir()) / "wasmgate-bench-noop.wasm"
        path.write_bytes(wasmtime.wat2wasm(NOOP_WAT))
        return path
    from higress import higress_plugin

    return Path(higress_plugin("transformer"))


class FakeTransport:
    """Enough of asyncio.Transport for both sides."""

    def __init__(self, on_write, extra: dict[str, object]) -> None:
        self.on_write = on_write
        self.extra = extra
        self.closed = False
        self.written = 0

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self.extra.get(name, default)

    def write(self, data: bytes) -> None:
        self.written += 1
        self.on_write(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class Bench:
    def __init__(self, name: str, loop: asyncio.AbstractEventLoop) -> None:
        self.name = name
        self.loop = loop
        name, _, extra = name.partition("+")  # "NAME+log": with Istio's access log line
        text = GATEWAY
        if name != "none":
            text += PLUGINS[name].replace("@WASM@", str(wasm_of(name)))
        result = load_text(text)
        assert not result.errors, result.errors
        gateway = result.gateways[0]
        router = Router(gateway.spec)
        self.pools = UpstreamPools()
        host = GatewayHost(loop, self.pools, router.resolve)
        chain = None
        self.plugin: Plugin | None = None
        if result.plugins:
            resource = result.plugins[0]
            module = PluginModule(wasm_of(name).read_bytes(), source=resource.resolved_url())
            config = PluginConfig(name=resource.filter_name, root_id=resource.root_id,
                                  configuration=resource.plugin_configuration_bytes(),
                                  log_level=LogLevel.WARN)  # `wasmgate run --log-level warning`
            self.plugin = Plugin(module, config, host)
            self.plugin.start()
            chain = FilterChain([PluginSlot(resource.filter_name, FailStrategy.FAIL_CLOSE,
                                            self.plugin)],
                                buffer_limit=gateway.spec.body_buffer_limit_bytes)
        access_log = (AccessLog(AccessLogFormat(), AccessLogWriter("/dev/null"))
                      if extra == "log" else None)
        self.state = ProxyState(router, chain, self.pools, GatewayStats(), 0, access_log)
        self.remaining = 0
        self.done: asyncio.Future[None] | None = None
        self.responses: list[bytes] = []
        # the upstream: one pooled keep-alive connection answering on the next loop turn
        endpoint = Endpoint("127.0.0.1", 18181)
        pool = self.pools.pool(endpoint)
        self.upstream = UpstreamConnection(pool)
        self.upstream.connection_made(FakeTransport(self._upstream_write, {}))
        pool.release(self.upstream)
        # the client: one connection
        self.protocol = DownstreamProtocol(lambda: self.state, 1, lambda _p: None)
        self.protocol.connection_made(FakeTransport(self._client_write, {
            "peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 18190)}))

    def _upstream_write(self, data: bytes) -> None:
        if data.endswith(b"\r\n\r\n"):
            self.loop.call_soon(self.upstream.data_received, RESPONSE)

    def _client_write(self, data: bytes) -> None:
        if self.keep:
            self.responses.append(data)
        self.remaining -= 1
        if self.remaining > 0:
            self.loop.call_soon(self.protocol.data_received, REQUEST)
        elif self.done is not None:
            self.done.set_result(None)

    keep = False

    async def run(self, n: int) -> tuple[float, float]:
        """Wall and thread-CPU seconds for `n` sequential requests."""
        self.remaining = n
        self.done = self.loop.create_future()
        c0, t0 = time.thread_time(), time.perf_counter()
        self.protocol.data_received(REQUEST)
        await self.done
        return time.perf_counter() - t0, time.thread_time() - c0

    async def check(self) -> bytes:
        self.keep = True
        await self.run(1)
        self.keep = False
        out, self.responses = self.responses[0], []
        return out


async def breakdown(benches: dict[str, Bench], n: int, reps: int) -> dict:
    """Extra figures for `--parts`, from two instrumented runs per plugin configuration:
    (1) time inside `WasmVM.call` (the guest calls with everything they do) timed per call;
    (2) each host function body and the guest allocator timed per call. Timer costs are
    measured and subtracted."""
    from wasmgate.runtime import hostcalls
    from wasmgate.runtime.vm import WasmVM

    out: dict = {}
    clock = time.perf_counter
    overhead = _timer_overhead(clock)
    real_call = WasmVM.call
    inside = [0.0, 0]

    def timed_call(self: WasmVM, name: str, *args: int,
                   context_id: int | None = None) -> int | None:
        t0 = clock()
        try:
            return real_call(self, name, *args, context_id=context_id)
        finally:
            inside[0] += clock() - t0
            inside[1] += 1

    for name, bench in benches.items():
        if name == "none":
            continue
        samples = []
        for _ in range(reps):
            WasmVM.call = timed_call  # type: ignore[method-assign]
            inside[:] = [0.0, 0]
            try:
                await bench.run(n)
            finally:
                WasmVM.call = real_call  # type: ignore[method-assign]
            samples.append((inside[0] - inside[1] * overhead) / n * 1e6)
        out[f"{name}: guest calls"] = {"per_request": inside[1] / n,
                                       "us": statistics.median(samples)}

    # host calls: wrap every registered implementation with a timer, then build fresh VMs
    spent: dict[str, float] = {}
    calls: dict[str, int] = {}
    saved = {key: list(specs) for key, specs in hostcalls.REGISTRY.items()}
    hostcalls.load_all()
    for specs in hostcalls.REGISTRY.values():
        for i, spec in enumerate(specs):
            def timed(*args: int, _impl=spec.impl, _name=spec.name) -> object:
                t0 = clock()
                try:
                    return _impl(*args)
                finally:
                    spent[_name] = spent.get(_name, 0.0) + clock() - t0
                    calls[_name] = calls.get(_name, 0) + 1
            specs[i] = dataclasses.replace(spec, impl=timed)
    real_allocate = WasmVM.allocate

    def allocate(self: WasmVM, size: int) -> int:
        t0 = clock()
        try:
            return real_allocate(self, size)
        finally:
            spent["(guest allocator)"] = spent.get("(guest allocator)", 0.0) + clock() - t0
            calls["(guest allocator)"] = calls.get("(guest allocator)", 0) + 1

    WasmVM.allocate = allocate  # type: ignore[method-assign]
    try:
        for name in benches:
            if name in ("none", "noop"):
                continue
            bench = Bench(name, benches[name].loop)
            await bench.run(min(n, 2000))
            spent.clear()
            calls.clear()
            await bench.run(n)
            per_call = {k: (calls[k] / n, (spent[k] - calls[k] * overhead) / n * 1e6)
                        for k in calls}
            out[f"{name}: host calls"] = per_call
    finally:
        WasmVM.allocate = real_allocate  # type: ignore[method-assign]
        hostcalls.REGISTRY.clear()
        hostcalls.REGISTRY.update(saved)
    return out


def _timer_overhead(clock: object) -> float:
    """Seconds the timing wrapper adds to one call (measured on a no-op)."""
    spent = [0.0]

    def noop() -> None:
        return None

    def timed() -> None:
        t0 = clock()  # type: ignore[operator]
        try:
            return noop()
        finally:
            spent[0] += clock() - t0  # type: ignore[operator]
    count = 200000
    t0 = time.perf_counter()
    for _ in range(count):
        noop()
    plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(count):
        timed()
    wrapped = time.perf_counter() - t0
    return max(0.0, (wrapped - plain) / count - spent[0] / count)


async def measure(names: list[str], n: int, reps: int, profile: str | None,
                  parts: bool = False) -> dict:
    loop = asyncio.get_running_loop()
    benches = {name: Bench(name, loop) for name in names}
    for bench in benches.values():
        head = (await bench.check()).split(b"\r\n\r\n")[0]
        print(f"== {bench.name}: {head!r}", file=sys.stderr)
        await bench.run(min(n, 2000))  # warm-up
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    gc.collect()
    for _ in range(reps):  # interleaved, so a noisy neighbour hits every configuration
        for name, bench in benches.items():
            wall, cpu = await bench.run(n)
            results[name].append((wall / n * 1e6, cpu / n * 1e6))
    if parts:
        results.update(await breakdown(benches, n, reps))
    if profile:
        bench = benches[profile]
        prof = cProfile.Profile()
        prof.enable()
        await bench.run(n)
        prof.disable()
        out = io.StringIO()
        stats = pstats.Stats(prof, stream=out)
        stats.sort_stats("tottime").print_stats(40)
        stats.sort_stats("cumulative").print_stats(60)
        print(out.getvalue())
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--only", default="none,noop,example,transformer")
    parser.add_argument("--profile", default=None)
    parser.add_argument("--parts", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    names = args.only.split(",")
    if args.profile and args.profile not in names:
        names.append(args.profile)
    results = asyncio.run(measure(names, args.requests, args.reps, args.profile, args.parts))
    hosts = {k: results.pop(k) for k in list(results)
             if k.endswith((": host calls", ": guest calls"))}
    med = {name: statistics.median(c for _, c in per) for name, per in results.items()}
    base = med.get("none")
    print(f"{'config':<26} {'CPU us/req (median)':>20} {'min':>8} {'max':>8} "
          f"{'wall us/req':>12} {'CPU vs none':>12}")
    for name, per in results.items():
        cpu = [c for _, c in per]
        wall = statistics.median(w for w, _ in per)
        extra = f"+{med[name] - base:.1f}" if base is not None and name != "none" else ""
        print(f"{name:<26} {med[name]:>20.2f} {min(cpu):>8.2f} {max(cpu):>8.2f} "
              f"{wall:>12.2f} {extra:>12}")
    print("(thread CPU time is the figure to compare: wall >> CPU means other processes "
          "took the core)")
    report: dict[str, object] = {"us_per_request": med, "runs": results}
    if args.parts and base is not None:
        parts: dict[str, object] = {"gateway without plugins (none)": base}
        for name in names:
            if name == "none":
                continue
            guest = hosts.get(f"{name}: guest calls", {"per_request": 0, "us": 0.0})
            per_call = dict(hosts.get(f"{name}: host calls", {}))
            allocs, alloc_us = per_call.pop("(guest allocator)", (0.0, 0.0))
            count = sum(c for c, _ in per_call.values())
            bodies = sum(t for _, t in per_call.values())
            extra = med[name] - base
            inside = guest["us"]  # type: ignore[index]
            parts[f"{name}: added to none"] = extra
            parts[f"{name}: - host Python around the guest calls (set-up, chain, contexts, "
                  "actions, gateway plugin path)"] = extra - inside
            parts[f"{name}: - inside the {guest['per_request']:g} guest calls"] = inside
            if name != "noop":
                parts[f"{name}:   - host call bodies ({count:.0f} calls), allocator "
                      "excluded"] = bodies - alloc_us
                parts[f"{name}:   - guest allocator re-entries ({allocs:.0f})"] = alloc_us
                parts[f"{name}:   - guest code + crossings"] = inside - bodies
                parts[f"{name}: host calls"] = {k: {"per_request": c, "us": round(t, 2)}
                                               for k, (c, t) in sorted(per_call.items())}
        print("\nper-request parts (CPU us; instrumented runs, timer cost subtracted):")
        for label, value in parts.items():
            if isinstance(value, dict):
                print(f"  {label}: " + ", ".join(
                    f"{k} {v['per_request']:g}x {v['us']:.1f}" for k, v in value.items()))
            else:
                print(f"  {label:<92} {value:7.2f}")
        report["parts"] = parts
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
