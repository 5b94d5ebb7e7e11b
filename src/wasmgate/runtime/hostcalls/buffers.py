"""proxy_get_buffer_bytes, proxy_set_buffer_bytes, proxy_get_buffer_status.

Which bytes each buffer type means depends on the callback running: bodies in the stream's
body callbacks, call responses in their callbacks, plugin configuration only while configuring.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..abi import BufferType, Status
from ..contexts import HttpContextState
from ..crossings import StatusError
from . import hostcall
from ._util import OK

if TYPE_CHECKING:
    from ..vm import WasmVM

MAX_BUFFER_TYPE = BufferType.REDIS_CALL_RESPONSE


def _buffer(vm: WasmVM, buffer_type: int) -> bytes | bytearray:
    if buffer_type > MAX_BUFFER_TYPE:
        raise StatusError(Status.BAD_ARGUMENT, f"buffer type {buffer_type}")
    kind = BufferType(buffer_type)
    root = vm.plugin.root
    value: bytes | bytearray | None = None
    if kind in (BufferType.HTTP_REQUEST_BODY, BufferType.HTTP_RESPONSE_BODY):
        ctx = vm.context()
        if isinstance(ctx, HttpContextState):
            slot = ctx.request_body if kind == BufferType.HTTP_REQUEST_BODY else ctx.response_body
            value = slot.data if slot.readable else None
    elif kind == BufferType.HTTP_CALL_RESPONSE_BODY:
        value = root.call_body
    elif kind == BufferType.GRPC_RECEIVE_BUFFER:
        value = root.grpc_message
    elif kind == BufferType.VM_CONFIGURATION:
        value = vm.plugin.config.vm_configuration
    elif kind == BufferType.PLUGIN_CONFIGURATION:
        value = vm.plugin.config.configuration if vm.in_configure else None
    elif kind == BufferType.CALL_DATA:
        value = root.call_data
    elif kind == BufferType.REDIS_CALL_RESPONSE:
        value = root.redis_response
    if value is None:
        raise StatusError(Status.NOT_FOUND, f"buffer {kind.name} not available now")
    return value


@hostcall("proxy_get_buffer_bytes", "iiiii")
def proxy_get_buffer_bytes(vm: WasmVM, buffer_type: int, start: int, max_size: int,
                           ret_ptr: int, ret_len: int) -> int:
    buffer = _buffer(vm, buffer_type)
    if start + max_size > 0xFFFFFFFF:
        return Status.BAD_ARGUMENT
    return vm.return_bytes(bytes(buffer[start:start + max_size]), ret_ptr, ret_len)


@hostcall("proxy_get_buffer_status", "iii")
def proxy_get_buffer_status(vm: WasmVM, buffer_type: int, ret_size: int, ret_flags: int) -> int:
    buffer = _buffer(vm, buffer_type)
    vm.memory.write_u32(ret_size, len(buffer))
    vm.memory.write_u32(ret_flags, 0)
    return OK


@hostcall("proxy_set_buffer_bytes", "iiiii")
def proxy_set_buffer_bytes(vm: WasmVM, buffer_type: int, start: int, size: int,
                           data_ptr: int, data_len: int) -> int:
    buffer = _buffer(vm, buffer_type)
    if not isinstance(buffer, bytearray):
        return Status.BAD_ARGUMENT  # configuration, call responses: immutable
    data = vm.memory.read(data_ptr, data_len)
    if start == 0:  # drain `size` bytes, then prepend (replace when size >= len)
        del buffer[:size]
        buffer[0:0] = data
    elif start >= len(buffer):
        buffer += data
    else:
        return Status.BAD_ARGUMENT
    return OK
