"""proxy_get_property and proxy_set_property (resolution lives in runtime/properties.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..abi import Status
from ..contexts import HttpContextState
from ..properties import resolve
from . import hostcall
from ._util import OK

if TYPE_CHECKING:
    from ..vm import WasmVM


@hostcall("proxy_get_property", "iiii")
def proxy_get_property(vm: WasmVM, path_ptr: int, path_len: int, ret_ptr: int,
                       ret_len: int) -> int:
    path = vm.memory.read(path_ptr, path_len)
    value = resolve(vm.plugin, vm.context(), path)
    if value is None:
        return Status.NOT_FOUND
    return vm.return_bytes(value, ret_ptr, ret_len)


@hostcall("proxy_set_property", "iiii")
def proxy_set_property(vm: WasmVM, path_ptr: int, path_len: int, value_ptr: int,
                       value_len: int) -> int:
    """Filter state of the stream; on a root context Envoy has no stream info: NOT_FOUND."""
    path = vm.memory.read(path_ptr, path_len)
    value = vm.memory.read(value_ptr, value_len)
    ctx = vm.context()
    if not isinstance(ctx, HttpContextState):
        return Status.NOT_FOUND
    if path.endswith(b"\0"):
        path = path[:-1]
    ctx.filter_state[path] = value
    return OK
