"""One VM: a wasmtime Store + instance of a PluginModule, its exports, limits and crossings.

The VM knows contexts by id and which one host calls act on (the running callback's, or the
one `proxy_set_effective_context` chose). It turns every trap into a `PluginTrap` carrying
Envoy's fail message and a symbolized backtrace, and marks itself failed.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import wasmtime

from . import hostcalls
from .abi import LogLevel, Status
from .contexts import Context, HttpContextState, RootContext
from .crossings import (
    CallerState,
    GuestCallError,
    GuestFunction,
    MemoryAccess,
    RawHostFunction,
    StatusError,
    Tracer,
    context_address,
    error_frames,
    set_epoch_deadline,
)
from .engine import EPOCH, shared_engine, ticks_for
from .errors import (
    Frame,
    MissingImport,
    ModuleLoadError,
    PluginFailed,
    PluginStartError,
    PluginTrap,
    TrapInfo,
)
from .metrics import MetricIds
from .module import PluginModule

if TYPE_CHECKING:
    from .plugin import Plugin

log = logging.getLogger("wasmgate.runtime.vm")

MiB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """Per-VM resource limits, applied when the Store is created."""

    memory_bytes: int = 512 * MiB  # linear memory cap (Envoy's hard cap is 1 GiB)
    callback_seconds: float = 1.0  # CPU deadline of one stream/timer callback
    startup_seconds: float = 30.0  # _initialize, on_vm_start, on_configure (big configs)


class ProcExit(Exception):
    """WASI proc_exit: ends the current guest call as a trap."""

    def __init__(self, code: int) -> None:
        self.code = code
        super().__init__(f"proc_exit({code})")


class AbiTracer(Tracer):
    """Envoy's `wasm:trace` lines, sent to the plugin log at trace level."""

    def __init__(self, emit: Callable[[str], None]) -> None:
        self.enabled = False
        self._emit = emit

    def host_call(self, qualname: str, args: tuple[int, ...]) -> None:
        self._emit(f"[vm->host] {qualname}({_args(args)})")

    def host_return(self, qualname: str, result: int | None) -> None:
        shown = "void" if result is None else str(result & 0xFFFFFFFF)
        self._emit(f"[vm<-host] {qualname} return: {shown}")

    def guest_call(self, name: str, args: tuple[int, ...]) -> None:
        self._emit(f"[host->vm] {name}({_args(args)})")

    def guest_return(self, name: str, result: int | None) -> None:
        shown = "void" if result is None else str(result & 0xFFFFFFFF)
        self._emit(f"[host<-vm] {name} return: {shown}")


def _args(args: tuple[int, ...]) -> str:
    return ", ".join(str(a & 0xFFFFFFFF) if -(1 << 31) <= a < (1 << 32) else str(a)
                     for a in args)


class WasmVM:
    """A live instance. Create through `Plugin`; `close()` is idempotent."""

    def __init__(self, module: PluginModule, plugin: Plugin, limits: Limits) -> None:
        hostcalls.load_all()
        self.module = module
        self.plugin = plugin
        self.limits = limits
        self.failed: TrapInfo | None = None
        self.contexts: dict[int, Context] = {}
        self.metric_ids = MetricIds()
        self.grpc_tokens: set[int] = set()  # open gRPC calls and streams
        self._next_context_id = 1
        self._next_token = 1
        self.current_context_id = 0
        self.effective_context_id: int | None = None
        self.in_vm_start_or_configure = False
        self.in_configure = False  # plugin configuration is readable only now
        self._depth = 0
        self._after_call: list[Callable[[], None]] = []
        self.tracer = AbiTracer(lambda line: plugin.emit_log(LogLevel.TRACE, line))
        self.tracer.enabled = plugin.log_level == LogLevel.TRACE
        self._callback_ticks = ticks_for(limits.callback_seconds)
        self._startup_ticks = ticks_for(limits.startup_seconds)
        # the deadline last set: at which EPOCH.count, for how many ticks (-1: not by call)
        self._armed_epoch = -1
        self._armed_ticks = -1
        self.store = wasmtime.Store(shared_engine())
        self.store.set_limits(memory_size=limits.memory_bytes)
        self.state = CallerState(context_address(self.store))
        self._host_functions = self._link()
        self.exports = self._instantiate()

    # -- instantiation -----------------------------------------------------------------------
    def _link(self) -> list[RawHostFunction]:
        self.linker = wasmtime.Linker(shared_engine())
        bound = []
        seen: set[tuple[str, str]] = set()
        for imp in self.module.func_imports:
            if (imp.module, imp.name) in seen:  # Go lists fd_write and random_get twice
                continue
            seen.add((imp.module, imp.name))
            spec = hostcalls.find(imp.module, imp.name, imp.params, imp.results)
            if spec is None:
                raise MissingImport(imp.module, imp.name, self._import_problem(imp))
            impl = _bind(spec.impl, self)
            fn = RawHostFunction(imp.module, imp.name, imp.params, imp.results, impl,
                                 self.state, self._on_host_exception, self.tracer)
            fn.define(self.linker)
            bound.append(fn)
        if self.module.other_imports:
            raise MissingImport(*self.module.other_imports[0].split(".", 1),
                                "only function imports are supported")
        return bound

    def _import_problem(self, imp: Any) -> str:
        known = hostcalls.REGISTRY.get((imp.module, imp.name))
        if not known:
            return "no such host function"
        sigs = ", ".join(f"({','.join(s.params)})->({','.join(s.results)})" for s in known)
        return (f"declared as ({','.join(imp.params)})->({','.join(imp.results)}), "
                f"host provides {sigs}")

    def _instantiate(self) -> dict[str, GuestFunction]:
        self.store.set_epoch_deadline(ticks_for(self.limits.startup_seconds))
        try:
            instance = self.linker.instantiate(self.store, self.module.module)
        except wasmtime.Trap as trap:
            info = self._trap_info("(start function)", GuestCallError(trap, None))
            raise PluginStartError(info.fail_message()) from None
        except wasmtime.WasmtimeError as exc:
            raise ModuleLoadError(f"{self.module.source}: cannot instantiate: {exc}") from exc
        exports = instance.exports(self.store)
        memory = exports.get("memory")
        if not isinstance(memory, wasmtime.Memory):
            raise ModuleLoadError(f"{self.module.source}: module exports no memory")
        self.memory = MemoryAccess(memory, self.state, self.limits.memory_bytes)
        funcs: dict[str, GuestFunction] = {}
        for name, (params, results) in self.module.func_exports.items():
            func = exports.get(name)
            if not isinstance(func, wasmtime.Func):
                continue
            expected = expected_signature(name, self.module.abi)
            if expected is not None and expected != (params, results):
                # proxy-wasm-cpp-host's wasmtime backend treats it as absent; say so.
                plugin_log = self.plugin.emit_log
                plugin_log(LogLevel.WARN, f"export {name} has signature ({','.join(params)})->"
                           f"({','.join(results)}), expected ({','.join(expected[0])})->"
                           f"({','.join(expected[1])}): ignored")
                continue
            funcs[name] = GuestFunction(name, func, params, results)
        return funcs

    # -- guest calls -------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        return name in self.exports

    def call(self, name: str, *args: int, context_id: int | None = None) -> int | None:
        """Call export `name` (absent -> None). Raises PluginTrap / PluginFailed."""
        fn = self.exports.get(name)
        if fn is None:
            if self.closed:
                raise PluginFailed(f"plugin {self.plugin.name!r}: its VM was closed")
            return None
        if self.failed is not None:
            raise PluginFailed(f"plugin {self.plugin.name!r} has failed: {self.failed.message}")
        saved_current, saved_effective = self.current_context_id, self.effective_context_id
        if context_id is not None:
            self.current_context_id = context_id
        self.effective_context_id = None
        state = self.state
        if self._depth == 0:
            ctx = state.store_context if state.caller is None else state.context()
            ticks = self._startup_ticks if self.in_vm_start_or_configure else self._callback_ticks
            # The deadline is (engine epoch now + ticks): while no tick has passed since it
            # was set for as many ticks, setting it again would set the same value.
            if EPOCH.count != self._armed_epoch or ticks != self._armed_ticks:
                self._arm(ctx, ticks)
        else:
            ctx = state.context()
        tracing = self.tracer.enabled
        if tracing:
            self.tracer.guest_call(name, args)
        self._depth += 1
        try:
            result = fn.call(ctx, args)
        except GuestCallError as exc:
            info = self._trap_info(name, exc)
            self.fail(info)
            raise PluginTrap(info) from None
        finally:
            self._depth -= 1
            self.current_context_id, self.effective_context_id = saved_current, saved_effective
        if tracing:
            self.tracer.guest_return(name, result)
        if self._depth == 0 and self._after_call:
            self._run_after_call()
        return result

    def _arm(self, ctx: int, ticks: int) -> None:
        """Set the CPU deadline `ticks` from the engine's epoch now (see engine.EPOCH)."""
        with EPOCH.lock:  # no tick between reading the count and setting the deadline
            set_epoch_deadline(ctx, ticks)
            self._armed_epoch = EPOCH.count
        self._armed_ticks = ticks

    def defer(self, action: Callable[[], None]) -> None:
        """Run `action` once the outermost guest call returns (Envoy's after-VM-call actions)."""
        if self._depth == 0:
            action()
        else:
            self._after_call.append(action)

    def _run_after_call(self) -> None:
        while self._after_call:
            actions, self._after_call = self._after_call, []
            for action in actions:
                action()

    def allocate(self, size: int) -> int:
        """Guest memory for a host-returned buffer: `malloc`, else `proxy_on_memory_allocate`."""
        fn = self.exports.get("malloc") or self.exports.get("proxy_on_memory_allocate")
        if fn is None:
            raise StatusError(Status.INTERNAL_FAILURE, "module exports no allocator")
        ptr = (fn.call(self.state.context(), (size,)) or 0) & 0xFFFFFFFF
        if ptr == 0:
            raise StatusError(Status.INTERNAL_FAILURE, f"allocator returned 0 for {size} bytes")
        return ptr

    def return_bytes(self, data: bytes, ptr_ptr: int, len_ptr: int) -> int:
        """Copy `data` into guest memory and write its address/length to the out-pointers."""
        self.memory.check(ptr_ptr, 4)
        self.memory.check(len_ptr, 4)
        if not data:
            self.memory.write_u32(ptr_ptr, 0)
            self.memory.write_u32(len_ptr, 0)
            return Status.OK
        ptr = self.allocate(len(data))
        self.memory.write(ptr, data)
        self.memory.write_u32(ptr_ptr, ptr)
        self.memory.write_u32(len_ptr, len(data))
        return Status.OK

    # -- contexts ----------------------------------------------------------------------------
    def new_context_id(self) -> int:
        context_id = self._next_context_id
        self._next_context_id += 1
        return context_id

    def new_token(self, kind: int) -> int:
        token = (self._next_token << 2) | kind
        self._next_token += 1
        return token

    def context(self) -> Context:
        """The context host calls act on now (effective if set and alive)."""
        context_id = self.effective_context_id
        if context_id is not None:
            ctx = self.contexts.get(context_id)
            if ctx is not None:
                return ctx
        ctx = self.contexts.get(self.current_context_id)
        if ctx is None:
            raise StatusError(Status.BAD_ARGUMENT, "no context is active")
        return ctx

    def root(self) -> RootContext:
        ctx = self.context()
        if isinstance(ctx, RootContext):
            return ctx
        if isinstance(ctx, HttpContextState):
            return ctx.root
        return self.plugin.root

    # -- failure -----------------------------------------------------------------------------
    def _on_host_exception(self, qualname: str, exc: BaseException) -> bytes:
        self._host_exception = exc
        if isinstance(exc, ProcExit):
            return str(exc).encode()
        log.debug("host function %s raised", qualname, exc_info=exc)
        return f"host function {qualname} raised {type(exc).__name__}: {exc}".encode()

    def _trap_info(self, function: str, exc: GuestCallError) -> TrapInfo:
        host_exc = getattr(self, "_host_exception", None)
        self._host_exception = None
        if exc.trap is None:
            error = exc.error
            return TrapInfo(function, _short_message(str(error)), None,
                            self._frames(error_frames(error)) if error else [], host_exc)
        trap = exc.trap
        code = trap.trap_code.name.lower() if trap.trap_code is not None else None
        message = _short_message(trap.message)
        if code == "interrupt":
            message += f" (CPU deadline exceeded: {self._deadline_seconds():g} s)"
        return TrapInfo(function, message, code, self._frames(trap.frames), host_exc)

    def _deadline_seconds(self) -> float:
        return (self.limits.startup_seconds if self.in_vm_start_or_configure
                else self.limits.callback_seconds)

    def _frames(self, raw_frames: list[wasmtime.Frame]) -> list[Frame]:
        from .abi import MAX_BACKTRACE_FRAMES

        names = self.module.function_names
        symbolizer = self.module.symbolizer
        frames = []
        for frame in raw_frames[:MAX_BACKTRACE_FRAMES]:
            name = names.get(frame.func_index) or frame.func_name
            source = None
            if symbolizer is not None and frame.module_offset is not None:
                location = symbolizer.lookup(frame.module_offset)
                if location is not None:
                    source = f"{location.file}:{location.line}"
            frames.append(Frame(frame.func_index, _demangle(name), frame.module_offset, source))
        return frames

    def fail(self, info: TrapInfo) -> None:
        self.failed = info
        self.plugin.on_vm_failed(info)

    def memory_bytes(self) -> int:
        if self.closed:
            return 0
        try:
            return self.memory.size()
        except StatusError:
            return 0

    closed = False

    def close(self) -> None:
        """Free the Store now: its linear memory (megabytes for a Go plugin) and instance.
        Left to the cyclic gc (the VM, its host functions and its plugin refer to each
        other), every reload would keep the old VM's memory until a full collection. No
        guest call can follow: the exports are gone, and `call` raises PluginFailed."""
        if self.closed:
            return
        if self._depth:  # asked from inside one of its own calls: once that call returns
            self._after_call.append(self.close)
            return
        self.closed = True
        self.exports = {}
        self.contexts.clear()
        self._host_functions = []
        self._after_call.clear()
        self.store.close()
        self.linker.close()


_I = "i32"
_CALLBACKS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "_initialize": ((), ()), "_start": ((), ()), "main": ((_I, _I), (_I,)),
    "__main_void": ((), (_I,)), "malloc": ((_I,), (_I,)),
    "proxy_on_memory_allocate": ((_I,), (_I,)),
    "proxy_on_context_create": ((_I, _I), ()), "proxy_on_vm_start": ((_I, _I), (_I,)),
    "proxy_on_configure": ((_I, _I), (_I,)), "proxy_validate_configuration": ((_I, _I), (_I,)),
    "proxy_on_tick": ((_I,), ()), "proxy_on_queue_ready": ((_I, _I), ()),
    "proxy_on_foreign_function": ((_I, _I, _I), ()),
    "proxy_on_request_headers": ((_I, _I, _I), (_I,)),
    "proxy_on_response_headers": ((_I, _I, _I), (_I,)),
    "proxy_on_request_body": ((_I, _I, _I), (_I,)), "proxy_on_response_body": ((_I, _I, _I), (_I,)),
    "proxy_on_request_trailers": ((_I, _I), (_I,)), "proxy_on_response_trailers": ((_I, _I), (_I,)),
    "proxy_on_log": ((_I,), ()), "proxy_on_done": ((_I,), (_I,)), "proxy_on_delete": ((_I,), ()),
    "proxy_on_http_call_response": ((_I, _I, _I, _I, _I), ()),
    "proxy_on_grpc_receive_initial_metadata": ((_I, _I, _I), ()),
    "proxy_on_grpc_receive": ((_I, _I, _I), ()),
    "proxy_on_grpc_receive_trailing_metadata": ((_I, _I, _I), ()),
    "proxy_on_grpc_close": ((_I, _I, _I), ()),
    "proxy_on_redis_call_response": ((_I, _I, _I, _I), ()),
}


def expected_signature(name: str, abi: str) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """The signature the host calls `name` with (None: not a callback we call)."""
    if abi == "0_1_0" and name in ("proxy_on_request_headers", "proxy_on_response_headers"):
        return ((_I, _I), (_I,))
    return _CALLBACKS.get(name)


def _short_message(message: str) -> str:
    """wasmtime's trap text without its own backtrace: the 'wasm trap: ...' line."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("wasm trap:") or "proc_exit" in line or "host function" in line:
            return line
    return lines[-1] if lines else message


def _demangle(name: str | None) -> str | None:
    if not name:
        return name
    try:
        from .binary import demangle

        return demangle(name)
    except Exception:
        return name


def _bind(impl: Callable[..., Any], vm: WasmVM) -> Callable[..., Any]:
    return functools.partial(impl, vm)  # C-level binding: cheaper than a closure per call
