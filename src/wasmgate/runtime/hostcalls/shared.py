"""Shared data (with CAS) and shared queues, namespaced by the plugin's vm_id."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..abi import Status
from . import hostcall
from ._util import OK, read_str

if TYPE_CHECKING:
    from ..vm import WasmVM


@hostcall("proxy_get_shared_data", "iiiii")
def proxy_get_shared_data(vm: WasmVM, key_ptr: int, key_len: int, ret_ptr: int, ret_len: int,
                          ret_cas: int) -> int:
    key = vm.memory.read(key_ptr, key_len)
    found = vm.plugin.host.shared_data_store.get(vm.plugin.vm_id, key)
    if found is None:
        return Status.NOT_FOUND
    value, cas = found
    vm.memory.check(ret_cas, 4)
    vm.return_bytes(value, ret_ptr, ret_len)
    vm.memory.write_u32(ret_cas, cas)
    return OK


@hostcall("proxy_set_shared_data", "iiiii")
def proxy_set_shared_data(vm: WasmVM, key_ptr: int, key_len: int, value_ptr: int,
                          value_len: int, cas: int) -> int:
    key = vm.memory.read(key_ptr, key_len)
    value = vm.memory.read(value_ptr, value_len)
    return vm.plugin.host.shared_data_store.set(vm.plugin.vm_id, key, value, cas)


@hostcall("proxy_register_shared_queue", "iii")
def proxy_register_shared_queue(vm: WasmVM, name_ptr: int, name_len: int,
                                ret_token: int) -> int:
    name = read_str(vm, name_ptr, name_len)
    vm.memory.check(ret_token, 4)
    token = vm.plugin.host.queue_store.register(vm.plugin.vm_id, name, vm.plugin)
    if isinstance(token, Status):  # a store with finite room (shared_queues.py) is full
        return token
    vm.memory.write_u32(ret_token, token)
    return OK


@hostcall("proxy_resolve_shared_queue", "iiiii")
def proxy_resolve_shared_queue(vm: WasmVM, vm_id_ptr: int, vm_id_len: int, name_ptr: int,
                               name_len: int, ret_token: int) -> int:
    vm_id = read_str(vm, vm_id_ptr, vm_id_len) or vm.plugin.vm_id
    name = read_str(vm, name_ptr, name_len)
    token = vm.plugin.host.queue_store.resolve(vm_id, name)
    if token is None:
        return Status.NOT_FOUND
    vm.memory.write_u32(ret_token, token)
    return OK


@hostcall("proxy_enqueue_shared_queue", "iii")
def proxy_enqueue_shared_queue(vm: WasmVM, token: int, ptr: int, size: int) -> int:
    data = vm.memory.read(ptr, size)
    host = vm.plugin.host
    return host.queue_store.enqueue(token, data, lambda owner, t: host.queue_ready(owner, t))


@hostcall("proxy_dequeue_shared_queue", "iii")
def proxy_dequeue_shared_queue(vm: WasmVM, token: int, ret_ptr: int, ret_len: int) -> int:
    item = vm.plugin.host.queue_store.dequeue(token)
    if isinstance(item, Status):
        return item
    return vm.return_bytes(item, ret_ptr, ret_len)
