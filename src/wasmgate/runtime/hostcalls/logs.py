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
    if level > _CRITICAL:
        return _BAD_ARGUMENT
    plugin = vm.plugin
    if level < plugin.log_level:  # a dropped line: bounds-checked (as Envoy does), not copied
        if size:
            vm.memory.check(ptr, size)
        return OK
    message = vm.memory.read(ptr, size)  # decode and build the enum only for lines kept
    plugin.host.log(plugin, _LEVELS[level], message.decode("utf-8", "replace"))
    return OK


_LEVELS = tuple(LogLevel)
_CRITICAL = int(LogLevel.CRITICAL)
_BAD_ARGUMENT = Status.BAD_ARGUMENT


@hostcall("proxy_get_log_level", "i")
def proxy_get_log_level(vm: WasmVM, ret_level: int) -> int:
    vm.memory.write_u32(ret_level, int(vm.plugin.log_level))
    return OK
