"""proxy_log and proxy_get_log_level."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..abi import LogLevel, Status
from . import hostcall
from ._util import OK

if TYPE_CHECKING:
    from ..vm import WasmVM


@hostcall("proxy_log", "iii")
def proxy_log(vm: WasmVM, level: int, ptr: int, size: int) -> int:
    if level > LogLevel.CRITICAL:
        return Status.BAD_ARGUMENT
    message = vm.memory.read(ptr, size).decode("utf-8", "replace")
    vm.plugin.emit_log(LogLevel(level), message)
    return OK


@hostcall("proxy_get_log_level", "i")
def proxy_get_log_level(vm: WasmVM, ret_level: int) -> int:
    vm.memory.write_u32(ret_level, int(vm.plugin.log_level))
    return OK
