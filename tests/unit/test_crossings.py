"""The raw crossing layer: results, memory bounds, traps from host exceptions, the pin."""

from __future__ import annotations

from importlib.metadata import version

import pytest
import wasmtime

from wasmgate.runtime.abi import Status
from wasmgate.runtime.crossings import (
    CallerState,
    GuestCallError,
    GuestFunction,
    MemoryAccess,
    RawHostFunction,
    StatusError,
    context_address,
)
from wasmgate.runtime.engine import shared_engine

WAT = """(module
  (import "env" "host" (func $host (param i32 i32) (result i32)))
  (import "env" "wide" (func $wide (param i32 i64) (result i32)))
  (memory (export "memory") 1)
  (func (export "call_host") (param i32 i32) (result i32)
    (call $host (local.get 0) (local.get 1)))
  (func (export "call_wide") (param i32 i64) (result i32)
    (call $wide (local.get 0) (local.get 1)))
  (func (export "grow") (param i32) (result i32) (memory.grow (local.get 0)))
  (func (export "boom") unreachable))"""


class Harness:
    def __init__(self, host_impl, wide_impl=lambda a, b: 0) -> None:  # type: ignore[no-untyped-def]
        engine = shared_engine()
        self.store = wasmtime.Store(engine)
        self.store.set_epoch_deadline(1 << 40)
        linker = wasmtime.Linker(engine)
        self.state = CallerState(context_address(self.store))
        self.exceptions: list[BaseException] = []

        def on_exception(qualname: str, exc: BaseException) -> bytes:
            self.exceptions.append(exc)
            return f"{qualname} failed".encode()

        self.funcs = [
            RawHostFunction("env", "host", ("i32", "i32"), ("i32",), host_impl, self.state,
                            on_exception),
            RawHostFunction("env", "wide", ("i32", "i64"), ("i32",), wide_impl, self.state,
                            on_exception)]
        for fn in self.funcs:
            fn.define(linker)
        instance = linker.instantiate(self.store, wasmtime.Module(engine, WAT))
        exports = instance.exports(self.store)
        self.memory = MemoryAccess(exports["memory"], self.state, 64 << 20)
        self.exports = exports

    def call(self, name: str, params: tuple[str, ...], results: tuple[str, ...],
             *args: int) -> int | None:
        fn = GuestFunction(name, self.exports[name], params, results)
        return fn.call(self.state.store_context, args)


def test_values_cross_both_ways() -> None:
    h = Harness(lambda a, b: a * 10 + b)
    assert h.call("call_host", ("i32", "i32"), ("i32",), 4, 2) == 42


def test_i32_arrive_unsigned_and_i64_whole() -> None:
    seen = []
    h = Harness(lambda a, b: seen.append((a, b)) or 0,
                lambda a, b: seen.append((a, b)) or 0)
    h.call("call_host", ("i32", "i32"), ("i32",), -1, 7)
    h.call("call_wide", ("i32", "i64"), ("i32",), 1, 1 << 40)
    assert seen == [(0xFFFFFFFF, 7), (1, 1 << 40)]


def test_status_error_returns_the_status() -> None:
    def impl(a: int, b: int) -> int:
        raise StatusError(Status.CAS_MISMATCH)

    assert Harness(impl).call("call_host", ("i32", "i32"), ("i32",), 0, 0) == Status.CAS_MISMATCH


def test_any_other_exception_is_a_trap_never_success() -> None:
    def impl(a: int, b: int) -> int:
        raise KeyError("oops")

    h = Harness(impl)
    with pytest.raises(GuestCallError) as info:
        h.call("call_host", ("i32", "i32"), ("i32",), 0, 0)
    assert "env.host failed" in str(info.value)
    assert isinstance(h.exceptions[0], KeyError)


def test_memory_bounds_are_checked() -> None:
    holder: dict[str, MemoryAccess] = {}

    def impl(ptr: int, size: int) -> int:
        holder["m"].read(ptr, size)
        return 0

    h = Harness(impl)
    holder["m"] = h.memory
    assert h.call("call_host", ("i32", "i32"), ("i32",), 65536 - 4, 4) == 0
    assert h.call("call_host", ("i32", "i32"), ("i32",), 65536 - 4, 5) == (
        Status.INVALID_MEMORY_ACCESS)
    assert h.call("call_host", ("i32", "i32"), ("i32",), 0xFFFFFFF0, 16) == (
        Status.INVALID_MEMORY_ACCESS)


def test_growth_is_seen_without_refreshing() -> None:
    """An access beyond the last known size re-reads the size instead of failing."""
    holder: dict[str, MemoryAccess] = {}

    def impl(ptr: int, size: int) -> int:
        holder["m"].write(ptr, b"z" * size)
        return 0

    h = Harness(impl)
    holder["m"] = h.memory
    h.call("grow", ("i32",), ("i32",), 1)
    assert h.call("call_host", ("i32", "i32"), ("i32",), 65536 + 10, 4) == 0
    assert h.memory.read(65536 + 10, 4) == b"zzzz"


def test_memory_growth_is_seen_after_guest_calls() -> None:
    h = Harness(lambda a, b: 0)
    assert h.memory.size() == 65536
    base = h.memory.base
    h.call("grow", ("i32",), ("i32",), 2)
    assert h.memory.current_base() == base  # memories never move: the cached base stays valid
    assert h.memory.size() == 3 * 65536
    h.memory.write(3 * 65536 - 4, b"abcd")
    assert h.memory.read(3 * 65536 - 4, 4) == b"abcd"


def test_guest_trap_carries_frames() -> None:
    h = Harness(lambda a, b: 0)
    with pytest.raises(GuestCallError) as info:
        h.call("boom", (), ())
    assert info.value.trap is not None
    assert info.value.trap.frames


def test_wasmtime_is_the_pinned_version() -> None:
    """crossings.py uses wasmtime-py's private bindings: only the pinned version is tested."""
    assert version("wasmtime") == "50.0.1"
    from wasmtime import _bindings

    for symbol in ("wasmtime_func_call_unchecked", "wasmtime_linker_define_func_unchecked",
                   "wasmtime_caller_context", "wasmtime_memory_data",
                   "wasmtime_memory_data_size", "wasmtime_trap_new",
                   "wasmtime_context_set_epoch_deadline", "wasmtime_error_wasm_trace"):
        assert hasattr(_bindings.dll, symbol)
