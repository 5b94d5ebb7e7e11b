"""Small helpers shared by host function modules."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..abi import Status
from ..contexts import HttpContextState, RootContext
from ..crossings import StatusError

if TYPE_CHECKING:
    from ..vm import WasmVM

OK = int(Status.OK)


def read_str(vm: WasmVM, ptr: int, size: int) -> str:
    return vm.memory.read(ptr, size).decode("utf-8", "replace")


def http_state(vm: WasmVM) -> HttpContextState:
    """The stream host calls act on, or NOT_FOUND when running on a root context."""
    ctx = vm.context()
    if isinstance(ctx, HttpContextState):
        return ctx
    raise StatusError(Status.NOT_FOUND, "no HTTP stream in this context")


def root_of(vm: WasmVM) -> RootContext:
    return vm.root()


def signed32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value
