"""WASI preview1, as proxy-wasm-cpp-host provides it to plugins (under both module names).

Why hand-written and not wasmtime's `define_wasi`: plugins must not reach the host's files or
stdout. fd 1/2 go to the plugin's log (info/error, one trailing newline stripped), environ is
the plugin's vmConfig env, the filesystem and sockets are stubs that answer as Envoy's do, and
`proc_exit` ends the current callback as a trap instead of exiting anything. wasmtime's WASI
also lacks `wasi_unstable`, which AssemblyScript plugins import.
"""

from __future__ import annotations

import os
import struct
from typing import TYPE_CHECKING

from ..abi import MAX_RANDOM_BYTES, LogLevel
from . import WASI_MODULES, hostcall

if TYPE_CHECKING:
    from ..vm import WasmVM

SUCCESS, BADF, INVAL, NOENT, NOSYS, NOTDIR, NOTSUP = 0, 8, 28, 44, 52, 54, 58
RIGHT_FD_WRITE = 64


def wasi(name: str, params: str, results: str = "i"):  # type: ignore[no-untyped-def]
    return hostcall(name, params, results, module=WASI_MODULES)


def _gather(vm: WasmVM, iovs: int, count: int) -> bytes:
    parts = []
    for i in range(count):
        ptr, size = struct.unpack("<II", vm.memory.read(iovs + 8 * i, 8))
        parts.append(vm.memory.read(ptr, size))
    return b"".join(parts)


def _write(vm: WasmVM, fd: int, iovs: int, count: int, ret_written: int) -> int:
    if fd not in (1, 2):
        return BADF
    data = _gather(vm, iovs, count)
    text = data.decode("utf-8", "replace")
    if text.endswith("\n"):
        text = text[:-1]
    vm.plugin.emit_log(LogLevel.INFO if fd == 1 else LogLevel.ERROR, text)
    vm.memory.write_u32(ret_written, len(data))
    return SUCCESS


@wasi("fd_write", "iiii")
def fd_write(vm: WasmVM, fd: int, iovs: int, count: int, ret_written: int) -> int:
    return _write(vm, fd, iovs, count, ret_written)


@wasi("fd_pwrite", "iiiIi")
def fd_pwrite(vm: WasmVM, fd: int, iovs: int, count: int, _offset: int, ret: int) -> int:
    return _write(vm, fd, iovs, count, ret)


@wasi("fd_read", "iiii")
def fd_read(vm: WasmVM, *_: int) -> int:
    return NOSYS


@wasi("fd_pread", "iiiIi")
def fd_pread(vm: WasmVM, *_: int) -> int:
    return NOSYS


@wasi("fd_seek", "iIii")
def fd_seek(vm: WasmVM, *_: int) -> int:
    return SUCCESS if _[0] in (1, 2) else BADF


@wasi("fd_close", "i")
def fd_close(vm: WasmVM, fd: int) -> int:
    return SUCCESS


@wasi("fd_fdstat_get", "ii")
def fd_fdstat_get(vm: WasmVM, fd: int, ret_stat: int) -> int:
    if fd not in (1, 2):
        return BADF
    vm.memory.write(ret_stat, struct.pack("<BxHxxxxQQ", 2, 0, RIGHT_FD_WRITE, 0))
    return SUCCESS


@wasi("fd_fdstat_set_flags", "ii")
def fd_fdstat_set_flags(vm: WasmVM, *_: int) -> int:
    return NOSYS


@wasi("fd_fdstat_set_rights", "iII")
def fd_fdstat_set_rights(vm: WasmVM, fd: int, *_: int) -> int:
    return SUCCESS if fd in (1, 2) else BADF


@wasi("fd_prestat_get", "ii")
def fd_prestat_get(vm: WasmVM, *_: int) -> int:
    return BADF  # no preopened directories: ends the libc/Go preopen scan


@wasi("fd_prestat_dir_name", "iii")
def fd_prestat_dir_name(vm: WasmVM, *_: int) -> int:
    return NOSYS


@wasi("fd_filestat_get", "ii")
def fd_filestat_get(vm: WasmVM, *_: int) -> int:
    return BADF


@wasi("fd_filestat_set_size", "iI")
def fd_filestat_set_size(vm: WasmVM, fd: int, *_: int) -> int:
    return SUCCESS if fd in (1, 2) else BADF


@wasi("fd_filestat_set_times", "iIIi")
def fd_filestat_set_times(vm: WasmVM, fd: int, *_: int) -> int:
    return SUCCESS if fd in (1, 2) else BADF


@wasi("fd_advise", "iIIi")
def fd_advise(vm: WasmVM, *_: int) -> int:
    return SUCCESS


@wasi("fd_allocate", "iII")
def fd_allocate(vm: WasmVM, fd: int, *_: int) -> int:
    return SUCCESS if fd in (1, 2) else BADF


@wasi("fd_datasync", "i")
def fd_datasync(vm: WasmVM, fd: int) -> int:
    return SUCCESS if fd in (1, 2) else BADF


@wasi("fd_sync", "i")
def fd_sync(vm: WasmVM, fd: int) -> int:
    return SUCCESS if fd in (1, 2) else BADF


@wasi("fd_tell", "ii")
def fd_tell(vm: WasmVM, fd: int, ret_offset: int) -> int:
    vm.memory.write_u64(ret_offset, 0)
    return SUCCESS


@wasi("fd_readdir", "iiiIi")
def fd_readdir(vm: WasmVM, *_: int) -> int:
    return NOTDIR


@wasi("fd_renumber", "ii")
def fd_renumber(vm: WasmVM, *_: int) -> int:
    return NOTSUP


@wasi("path_open", "iiiiiIIii")
def path_open(vm: WasmVM, *args: int) -> int:
    vm.memory.write_u32(args[-1], 0)
    return NOENT


@wasi("path_filestat_get", "iiiii")
def path_filestat_get(vm: WasmVM, *_: int) -> int:
    return NOENT


@wasi("path_create_directory", "iii")
def path_create_directory(vm: WasmVM, *_: int) -> int:
    return NOTSUP


@wasi("path_remove_directory", "iii")
def path_remove_directory(vm: WasmVM, *_: int) -> int:
    return NOTSUP


@wasi("path_unlink_file", "iii")
def path_unlink_file(vm: WasmVM, *_: int) -> int:
    return NOTSUP


@wasi("path_readlink", "iiiiii")
def path_readlink(vm: WasmVM, *_: int) -> int:
    return NOTSUP


@wasi("path_rename", "iiiiii")
def path_rename(vm: WasmVM, *_: int) -> int:
    return NOTSUP


@wasi("path_symlink", "iiiii")
def path_symlink(vm: WasmVM, *_: int) -> int:
    return NOTSUP


@wasi("path_link", "iiiiiii")
def path_link(vm: WasmVM, *_: int) -> int:
    return NOTSUP


@wasi("path_filestat_set_times", "iiiiIIi")
def path_filestat_set_times(vm: WasmVM, *_: int) -> int:
    return NOTSUP


@wasi("sock_accept", "iii")
def sock_accept(vm: WasmVM, *_: int) -> int:
    return NOTSUP


@wasi("sock_recv", "iiiiii")
def sock_recv(vm: WasmVM, *_: int) -> int:
    return NOTSUP


@wasi("sock_send", "iiiii")
def sock_send(vm: WasmVM, *_: int) -> int:
    return NOTSUP


@wasi("sock_shutdown", "ii")
def sock_shutdown(vm: WasmVM, *_: int) -> int:
    return NOTSUP


def _environ(vm: WasmVM) -> list[bytes]:
    return [f"{k}={v}".encode() + b"\0" for k, v in vm.plugin.config.env.items()]


@wasi("environ_sizes_get", "ii")
def environ_sizes_get(vm: WasmVM, ret_count: int, ret_size: int) -> int:
    entries = _environ(vm)
    vm.memory.write_u32(ret_count, len(entries))
    vm.memory.write_u32(ret_size, sum(len(e) for e in entries))
    return SUCCESS


@wasi("environ_get", "ii")
def environ_get(vm: WasmVM, ret_pointers: int, ret_buffer: int) -> int:
    offset = ret_buffer
    for i, entry in enumerate(_environ(vm)):
        vm.memory.write(offset, entry)
        vm.memory.write_u32(ret_pointers + 4 * i, offset)
        offset += len(entry)
    return SUCCESS


@wasi("args_sizes_get", "ii")
def args_sizes_get(vm: WasmVM, ret_count: int, ret_size: int) -> int:
    vm.memory.write_u32(ret_count, 0)
    vm.memory.write_u32(ret_size, 0)
    return SUCCESS


@wasi("args_get", "ii")
def args_get(vm: WasmVM, *_: int) -> int:
    return SUCCESS


@wasi("clock_time_get", "iIi")
def clock_time_get(vm: WasmVM, clock_id: int, _precision: int, ret_time: int) -> int:
    if clock_id == 0:
        vm.memory.write_u64(ret_time, vm.plugin.host.now_ns())
    elif clock_id == 1:
        vm.memory.write_u64(ret_time, vm.plugin.host.monotonic_ns())
    else:
        return NOTSUP
    return SUCCESS


@wasi("clock_res_get", "ii")
def clock_res_get(vm: WasmVM, clock_id: int, ret_resolution: int) -> int:
    if clock_id not in (0, 1):
        return NOTSUP
    vm.memory.write_u64(ret_resolution, 1)
    return SUCCESS


@wasi("random_get", "ii")
def random_get(vm: WasmVM, ptr: int, size: int) -> int:
    if size > MAX_RANDOM_BYTES:
        return INVAL
    vm.memory.write(ptr, os.urandom(size))
    return SUCCESS


@wasi("poll_oneoff", "iiii")
def poll_oneoff(vm: WasmVM, _in: int, _out: int, _count: int, ret_events: int) -> int:
    vm.memory.write_u32(ret_events, 0)
    return SUCCESS


@wasi("sched_yield", "")
def sched_yield(vm: WasmVM) -> int:
    return SUCCESS


@wasi("proc_raise", "i")
def proc_raise(vm: WasmVM, *_: int) -> int:
    return NOTSUP


@wasi("proc_exit", "i", "")
def proc_exit(vm: WasmVM, code: int) -> None:
    from ..vm import ProcExit

    raise ProcExit(code)
