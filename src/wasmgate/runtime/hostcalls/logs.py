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
    message = vm.memory.read(ptr, size)
    plugin = vm.plugin
    if level >= plugin.log_level:  # decode and build the enum only for lines that are kept
        plugin.host.log(plugin, _LEVELS[level], message.decode("utf-8", "replace"))
    return OK


_LEVELS = tuple(LogLevel)


@hostcall("proxy_get_log_level", "i")
def proxy_get_log_level(vm: WasmVM, ret_level: int) -> int:
    vm.memory.write_u32(ret_level, int(vm.plugin.log_level))
    return OK
