"""proxy_call_foreign_function with a registry of named functions.

Built in: Envoy's `compress`/`uncompress`/`clear_route_cache`/`declare_property`, and the
ones the Higress Go framework calls (`get_log_level`, `set_global_max_requests_per_io_cycle`).
Embedders add their own in `Host.foreign_functions`.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..abi import Status
from ..crossings import StatusError
from . import hostcall
from ._util import OK, read_str

if TYPE_CHECKING:
    from ..plugin import Plugin
    from ..vm import WasmVM

Builtin = Callable[["Plugin", bytes], bytes | None]


def _compress(plugin: Plugin, args: bytes) -> bytes:
    return zlib.compress(args)


def _uncompress(plugin: Plugin, args: bytes) -> bytes:
    try:
        return zlib.decompress(args)
    except zlib.error as exc:
        raise StatusError(Status.SERIALIZATION_FAILURE, str(exc)) from exc


def _get_log_level(plugin: Plugin, args: bytes) -> bytes:
    return struct.pack("<I", int(plugin.log_level))


def _accept(plugin: Plugin, args: bytes) -> None:
    return None


BUILTINS: dict[str, Builtin] = {
    "compress": _compress,
    "uncompress": _uncompress,
    "get_log_level": _get_log_level,
    "clear_route_cache": _accept,
    "declare_property": _accept,
    "set_global_max_requests_per_io_cycle": _accept,
}


@hostcall("proxy_call_foreign_function", "iiiiii")
def proxy_call_foreign_function(vm: WasmVM, name_ptr: int, name_len: int, args_ptr: int,
                                args_len: int, ret_ptr: int, ret_len: int) -> int:
    name = read_str(vm, name_ptr, name_len)
    args = vm.memory.read(args_ptr, args_len)
    func = vm.plugin.host.foreign_functions.get(name) or BUILTINS.get(name)
    if func is None:
        return Status.NOT_FOUND
    result = func(vm.plugin, args)
    if ret_ptr == 0 or result is None:
        if ret_ptr and ret_len:
            vm.return_bytes(b"", ret_ptr, ret_len)
        return OK
    return vm.return_bytes(result, ret_ptr, ret_len)
