"""Time, ticks, effective context, done, status, 0.1.0 configuration, Higress upstream calls."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..abi import Status
from ..contexts import HttpContextState
from ..serde import serialize_pairs
from . import hostcall
from ._util import OK

if TYPE_CHECKING:
    from ..vm import WasmVM


@hostcall("proxy_get_current_time_nanoseconds", "i")
def proxy_get_current_time_nanoseconds(vm: WasmVM, ret_time: int) -> int:
    vm.memory.write_u64(ret_time, vm.plugin.host.now_ns())
    return OK


@hostcall("proxy_set_tick_period_milliseconds", "i")
def proxy_set_tick_period_milliseconds(vm: WasmVM, period_ms: int) -> int:
    """Applies to the plugin's root context (whatever context calls it); 0 disables."""
    vm.plugin.root.tick_period_ms = period_ms
    vm.plugin.host.set_tick_period(vm.plugin, period_ms)
    return OK


@hostcall("proxy_set_effective_context", "i")
def proxy_set_effective_context(vm: WasmVM, context_id: int) -> int:
    ctx = vm.contexts.get(context_id)
    if ctx is None or ctx.deleted:
        return Status.BAD_ARGUMENT
    vm.effective_context_id = context_id
    return OK


@hostcall("proxy_done", "")
def proxy_done(vm: WasmVM) -> int:
    """After on_done returned false (`Plugin.finish`): the plugin is done; on_delete and
    the VM's end follow once this call returns (as proxy-wasm-cpp-host defers them)."""
    root = vm.plugin.root
    if not root.done_pending or vm.context() is not root:  # (cpp-host: the caller's own)
        return Status.NOT_FOUND
    root.done_pending = False
    vm.defer(vm.plugin.proxy_done)
    return OK


@hostcall("proxy_get_status", "iii")
def proxy_get_status(vm: WasmVM, ret_code: int, ret_ptr: int, ret_len: int) -> int:
    code, message = vm.plugin.root.status
    vm.memory.check(ret_code, 4)
    vm.return_bytes(message, ret_ptr, ret_len)
    vm.memory.write_u32(ret_code, code)
    return OK


@hostcall("proxy_get_configuration", "ii")
def proxy_get_configuration(vm: WasmVM, ret_ptr: int, ret_len: int) -> int:
    """ABI 0.1.0: plugin configuration inside on_configure, VM configuration otherwise."""
    config = vm.plugin.config
    data = config.configuration if vm.in_configure else config.vm_configuration
    return vm.return_bytes(data, ret_ptr, ret_len)


@hostcall("proxy_get_upstream_hosts", "ii")
def proxy_get_upstream_hosts(vm: WasmVM, ret_ptr: int, ret_len: int) -> int:
    pairs = vm.plugin.host.upstream_hosts(vm.plugin)
    return vm.return_bytes(serialize_pairs(pairs), ret_ptr, ret_len)


@hostcall("proxy_set_upstream_override_host", "ii")
def proxy_set_upstream_override_host(vm: WasmVM, addr_ptr: int, addr_len: int) -> int:
    address = vm.memory.read(addr_ptr, addr_len)
    ctx = vm.context()
    if not isinstance(ctx, HttpContextState):
        return Status.BAD_ARGUMENT
    ctx.upstream_override = address
    vm.plugin.host.set_upstream_override_host(vm.plugin, ctx.id, address)
    return OK


@hostcall("proxy_inject_encoded_data_to_filter_chain", "iii")
def proxy_inject_encoded_data_to_filter_chain(vm: WasmVM, body_ptr: int, body_len: int,
                                              end_stream: int) -> int:
    body = vm.memory.read(body_ptr, body_len)
    ctx = vm.context()
    if not isinstance(ctx, HttpContextState):
        return Status.BAD_ARGUMENT
    if not vm.plugin.host.inject_encoded_data(vm.plugin, ctx.id, body, bool(end_stream)):
        return Status.UNIMPLEMENTED
    return OK
