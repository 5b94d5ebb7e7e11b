"""Fast Python<->Wasm crossings on wasmtime's unchecked C API.

Why hand-written: wasmtime-py's `Func.__call__` and `define_func` cost 6-26 us per crossing
(each call rebuilds the FuncType and converts every value through `Val`). A Proxy-Wasm request
makes 10-30 crossings, so this module talks to the C API directly through ctypes prototypes of
our own (`wasmtime_func_call_unchecked`, `wasmtime_linker_define_func_unchecked`) with
`void*`-typed arguments, which measured 0.3-2.5 us.

This is the only module that touches wasmtime-py's private bindings (`_bindings.dll`, the
`_func`/`_memory` structs); `wasmtime` is pinned exactly and `tests/unit/test_crossings.py`
checks the layer against that pin.

Rules the layer enforces:
- An exception escaping a raw ctypes callback would be printed and the callback would return 0,
  i.e. success. `RawHostFunction` catches `BaseException`, keeps it, and returns a trap.
- Linear memory can move whenever the guest runs: `MemoryAccess` re-reads base and size on
  every access and never keeps a view across a guest call.
"""

from __future__ import annotations

import ctypes
import struct
import sys
from collections.abc import Callable
from ctypes import POINTER, c_char_p, c_int32, c_size_t, c_uint64, c_void_p, cast

import wasmtime
from wasmtime import _bindings as _b
from wasmtime import _ffi as _ffi_types

from .abi import Status

_dll = _b.dll

RAW_CALLBACK = ctypes.CFUNCTYPE(c_size_t, c_void_p, c_void_p, c_void_p, c_size_t)
_FINALIZER = ctypes.CFUNCTYPE(None, c_void_p)

_define_func_unchecked = ctypes.CFUNCTYPE(
    c_void_p, c_void_p, c_char_p, c_size_t, c_char_p, c_size_t, c_void_p, RAW_CALLBACK,
    c_void_p, _FINALIZER,
)(("wasmtime_linker_define_func_unchecked", _dll))
_func_call_unchecked = ctypes.CFUNCTYPE(c_void_p, c_void_p, c_void_p, c_void_p, c_size_t, c_void_p)(
    ("wasmtime_func_call_unchecked", _dll)
)
_caller_context = ctypes.CFUNCTYPE(c_void_p, c_void_p)(("wasmtime_caller_context", _dll))
_memory_data = ctypes.CFUNCTYPE(c_void_p, c_void_p, c_void_p)(("wasmtime_memory_data", _dll))
_memory_data_size = ctypes.CFUNCTYPE(c_size_t, c_void_p, c_void_p)(
    ("wasmtime_memory_data_size", _dll)
)
_trap_new = ctypes.CFUNCTYPE(c_void_p, c_char_p, c_size_t)(("wasmtime_trap_new", _dll))
_set_epoch_deadline = ctypes.CFUNCTYPE(None, c_void_p, c_uint64)(
    ("wasmtime_context_set_epoch_deadline", _dll)
)
_NULL_FINALIZER = ctypes.cast(None, _FINALIZER)

# The process's address space as one byte view. Used only at addresses wasmtime hands over
# for the call (a raw callback's argument/result slots): a struct unpack/pack there costs
# ~50 ns where `ctypes.string_at` / `c_uint32.from_address` cost 100-270 ns. Reading through
# it is exactly as (un)checked as `from_address`; the view itself maps and copies nothing.
_NATIVE = memoryview((ctypes.c_char * sys.maxsize).from_address(0)).cast("B")

_VALTYPES = {"i32": wasmtime.ValType.i32, "i64": wasmtime.ValType.i64,
             "f32": wasmtime.ValType.f32, "f64": wasmtime.ValType.f64}
_SLOT = {"i32": "I12x", "i64": "Q8x", "f32": "f12x", "f64": "d8x"}
_SLOT_SIGNED = {"i32": "i12x", "i64": "q8x", "f32": "f12x", "f64": "d8x"}
_MASK = {"i32": 0xFFFFFFFF, "i64": 0xFFFFFFFFFFFFFFFF}


def slot_format(types: tuple[str, ...], signed: bool = False) -> struct.Struct:
    """Struct over `wasmtime_val_raw_t` slots (16 bytes each) holding `types`."""
    slots = _SLOT_SIGNED if signed else _SLOT
    return struct.Struct("<" + "".join(slots[t] for t in types))


def context_address(store: wasmtime.Store) -> int:
    return cast(store._context(), c_void_p).value or 0


class StatusError(Exception):
    """Raised inside a host function to return a Proxy-Wasm status instead of trapping."""

    def __init__(self, status: Status, why: str = "") -> None:
        self.status = status
        super().__init__(f"{status.name}: {why}" if why else status.name)


class CallerState:
    """Which wasmtime context host functions run in right now (a stack: calls nest)."""

    __slots__ = ("caller", "store_context")

    def __init__(self, store_context: int) -> None:
        self.store_context = store_context
        self.caller: int | None = None

    def context(self) -> int:
        caller = self.caller
        return _caller_context(caller) if caller else self.store_context


_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class MemoryAccess:
    """Bounds-checked reads and writes of a guest's linear memory.

    The engine reserves every linear memory up front and forbids moving it
    (`memory_may_move=False`), so the base address is fixed for the instance's life and a
    memoryview over the whole reservable range is valid. Memory only grows: an access within
    the last size seen is in bounds; anything beyond re-reads the size before deciding.
    """

    __slots__ = ("_memory", "_memory_address", "_size", "_state", "_view", "base", "limit")

    def __init__(self, memory: wasmtime.Memory, state: CallerState, limit: int) -> None:
        self._memory = memory  # keeps the struct alive
        self._memory_address = ctypes.addressof(memory._memory)
        self._state = state
        ctx = state.context()
        self.base = _memory_data(ctx, self._memory_address) or 0
        self._size = _memory_data_size(ctx, self._memory_address)
        self.limit = max(limit, self._size)
        self._view = memoryview((ctypes.c_char * self.limit).from_address(self.base)).cast("B")

    def _check(self, ptr: int, length: int) -> None:
        end = ptr + length
        if end > self._size or ptr < 0 or length < 0:
            self._size = _memory_data_size(self._state.context(), self._memory_address)
            if end > self._size or ptr < 0 or length < 0 or end > self.limit:
                raise StatusError(Status.INVALID_MEMORY_ACCESS,
                                  f"[{ptr}, +{length}) beyond {self._size}")

    def size(self) -> int:
        self._size = _memory_data_size(self._state.context(), self._memory_address)
        return self._size

    # The accessors test the common case (inside the size last seen) inline, and call
    # `_check` only otherwise: one Python call less per access.
    def read(self, ptr: int, length: int) -> bytes:
        if length == 0:
            return b""
        end = ptr + length
        if end > self._size or ptr < 0 or length < 0:
            self._check(ptr, length)
        return self._view[ptr:end].tobytes()

    def write(self, ptr: int, data: bytes) -> None:
        if data:
            end = ptr + len(data)
            if end > self._size or ptr < 0:
                self._check(ptr, len(data))
            self._view[ptr:end] = data

    def write_u32(self, ptr: int, value: int) -> None:
        if ptr + 4 > self._size or ptr < 0:
            self._check(ptr, 4)
        _U32.pack_into(self._view, ptr, value & 0xFFFFFFFF)

    def write_u64(self, ptr: int, value: int) -> None:
        self._check(ptr, 8)
        _U64.pack_into(self._view, ptr, value & 0xFFFFFFFFFFFFFFFF)

    def read_u32(self, ptr: int) -> int:
        self._check(ptr, 4)
        return int(_U32.unpack_from(self._view, ptr)[0])

    check = _check

    def current_base(self) -> int:
        """The base address as wasmtime reports it now (tests check it never moves)."""
        return _memory_data(self._state.context(), self._memory_address) or 0


class GuestCallError(Exception):
    """A guest call ended in a trap or a wasmtime error; `trap` holds the details."""

    def __init__(self, trap: wasmtime.Trap | None, error: wasmtime.WasmtimeError | None) -> None:
        self.trap = trap
        self.error = error
        super().__init__(trap.message if trap is not None else str(error))


class GuestFunction:
    """A guest export called through `wasmtime_func_call_unchecked`.

    The caller passes the context to call in: the store's at the top level, the current
    caller's when a host function re-enters the guest (its allocator).
    """

    __slots__ = ("_addr", "_buf", "_buf_addr", "_depth", "_func", "_n", "_pack", "_result",
                 "_trap", "_trap_addr", "has_result", "name", "params", "results")

    def __init__(self, name: str, func: wasmtime.Func, params: tuple[str, ...],
                 results: tuple[str, ...]) -> None:
        self.name, self.params, self.results = name, params, results
        self.has_result = bool(results)
        self._func = func
        self._addr = ctypes.addressof(func._func)
        self._n = max(len(params), len(results))
        self._buf = (ctypes.c_uint8 * (16 * max(self._n, 1)))()
        self._buf_addr = ctypes.addressof(self._buf)
        self._pack = slot_format(params).pack_into
        self._trap = c_void_p()
        self._trap_addr = ctypes.addressof(self._trap)
        self._depth = 0
        # the first result slot, read as the signed value wasmtime stored
        self._result = (struct.Struct("<q" if results[0] == "i64" else "<i").unpack_from
                        if results else None)

    def call(self, context: int, args: tuple[int, ...]) -> int | None:
        if self._depth:  # the same export re-entered through a host call: own buffers
            return self._call_with(context, args, (ctypes.c_uint8 * len(self._buf))(), c_void_p())
        # the common case, inlined: this export's own argument buffer and trap slot
        buf = self._buf
        try:
            self._pack(buf, 0, *args)
        except struct.error:  # negative or oversized ints: wrap as the wasm types do
            self._pack(buf, 0, *[a & _MASK[t] for a, t in zip(args, self.params, strict=True)])
        trap = self._trap  # None here: wasmtime writes it only on a trap, reset below
        self._depth = 1
        error = _func_call_unchecked(context, self._addr, self._buf_addr, self._n,
                                     self._trap_addr)
        self._depth = 0
        if error or trap.value:
            raised, trap.value = trap.value, None
            raise _guest_error(error, raised)
        result = self._result
        return result(buf)[0] if result is not None else None

    def _call_with(self, context: int, args: tuple[int, ...], buf: ctypes.Array[ctypes.c_uint8],
                   trap: c_void_p) -> int | None:
        try:
            self._pack(buf, 0, *args)
        except struct.error:  # negative or oversized ints: wrap as the wasm types do
            self._pack(buf, 0, *[a & _MASK[t] for a, t in zip(args, self.params, strict=True)])
        buf_addr = ctypes.addressof(buf)
        trap.value = None
        self._depth += 1
        error = _func_call_unchecked(context, self._addr, buf_addr, self._n,
                                     ctypes.addressof(trap))
        self._depth -= 1
        if error or trap.value:
            raise _guest_error(error, trap.value)
        if not self.has_result:
            return None
        if self.results[0] == "i64":
            return ctypes.c_int64.from_address(buf_addr).value
        return c_int32.from_address(buf_addr).value


def _guest_error(error: int | None, trap: int | None) -> GuestCallError:
    if trap:
        ptr = cast(trap, POINTER(_ffi_types.wasm_trap_t))
        return GuestCallError(wasmtime.Trap._from_ptr(ptr), None)
    ptr = cast(error, POINTER(_ffi_types.wasmtime_error_t))
    return GuestCallError(None, wasmtime.WasmtimeError._from_ptr(ptr))


set_epoch_deadline: Callable[[int, int], None] = _set_epoch_deadline
"""`set_epoch_deadline(context, ticks)`: the C function itself (no Python frame per call)."""


HostImpl = Callable[..., int | None]


class Tracer:
    """Receives every crossing while `enabled` (the ABI trace); off costs one attribute read."""

    enabled: bool = False

    def host_call(self, qualname: str, args: tuple[int, ...]) -> None: ...

    def host_return(self, qualname: str, result: int | None) -> None: ...


class RawHostFunction:
    """One host function bound into a linker as an unchecked raw callback.

    `impl(*args)` gets the i32/i64 parameters as Python ints (i32 unsigned) and returns the
    i32 result (or None for a void function). `StatusError` becomes that status; any other
    exception is handed to `on_exception` and the guest sees a trap.
    """

    def __init__(self, module: str, name: str, params: tuple[str, ...],
                 results: tuple[str, ...], impl: HostImpl, state: CallerState,
                 on_exception: Callable[[str, BaseException], bytes],
                 tracer: Tracer | None = None) -> None:
        self.module, self.name, self.params, self.results = module, name, params, results
        self.qualname = f"{module}.{name}"
        self.callback = RAW_CALLBACK(self._make_callback(impl, state, on_exception, tracer))

    def functype(self) -> wasmtime.FuncType:
        return wasmtime.FuncType([_VALTYPES[t]() for t in self.params],
                                 [_VALTYPES[t]() for t in self.results])

    def define(self, linker: wasmtime.Linker) -> None:
        functype = self.functype()
        module, name = self.module.encode(), self.name.encode()
        linker_ptr = cast(linker.ptr(), c_void_p).value
        type_ptr = cast(functype.ptr(), c_void_p).value
        error = _define_func_unchecked(linker_ptr, module, len(module), name, len(name),
                                       type_ptr, self.callback, None, _NULL_FINALIZER)
        if error:
            ptr = cast(error, POINTER(_ffi_types.wasmtime_error_t))
            raise wasmtime.WasmtimeError._from_ptr(ptr)

    def _make_callback(self, impl: HostImpl, state: CallerState,
                       on_exception: Callable[[str, BaseException], bytes],
                       tracer: Tracer | None) -> Callable[[int, int, int, int], int]:
        nargs = len(self.params)
        unpack = slot_format(self.params).unpack_from if nargs else None
        returns = bool(self.results)
        qualname = self.qualname
        native = _NATIVE
        write_result = _U32.pack_into

        def callback(_env: int, caller: int, args: int, _n: int) -> int:
            previous = state.caller
            state.caller = caller
            try:
                values = unpack(native, args) if unpack else ()
                tracing = tracer is not None and tracer.enabled
                if tracing:
                    tracer.host_call(qualname, values)
                try:
                    result = impl(*values)
                except StatusError as status:
                    result = int(status.status)
                if tracing:
                    tracer.host_return(qualname, result)
                if returns:
                    write_result(native, args, (result or 0) & 0xFFFFFFFF)
                return 0
            except BaseException as exc:
                message = on_exception(qualname, exc)
                return _trap_new(message, len(message)) or 0
            finally:
                state.caller = previous

        return callback


def error_frames(error: wasmtime.WasmtimeError) -> list[wasmtime.Frame]:
    """The wasm backtrace of a non-trap error (e.g. a host trap created by our callbacks)."""
    from wasmtime._trap import FrameList

    frames = FrameList(error)
    _b.wasmtime_error_wasm_trace(error.ptr(), ctypes.byref(frames.vec))
    return [wasmtime.Frame._from_ptr(frames.vec.data[i], frames) for i in range(frames.vec.size)]
