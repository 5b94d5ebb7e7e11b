"""DWARF lookups on a real trap from plugins/dwarf-crash (built by its build.sh)."""

from __future__ import annotations

from pathlib import Path

import pytest
import wasmtime

from wasmgate.runtime.binary import parse_module
from wasmgate.runtime.dwarf import DwarfIndex, dwarf_index, lookup

PLUGIN_DIR = Path(__file__).resolve().parents[2] / "plugins" / "dwarf-crash"
CRASH_WASM = PLUGIN_DIR / "crash.wasm"
CALL_CHAIN = ["check_bounds", "parse_header", "handle_request", "proxy_on_request_headers"]


def _marker_line(marker: str) -> int:
    lines = (PLUGIN_DIR / "crash.c").read_text().splitlines()
    return next(i for i, text in enumerate(lines, 1) if marker in text)


def _stub_imports(store: wasmtime.Store, module: wasmtime.Module) -> list[wasmtime.Func]:
    """A do-nothing function (returning zeros) for every import."""
    stubs = []
    for imp in module.imports:
        ty = imp.type
        assert isinstance(ty, wasmtime.FuncType), f"unexpected import {imp.name}"
        zeros = [0] * len(ty.results)

        def stub(*_args: object, _zeros: list[int] = zeros) -> object:
            return None if not _zeros else _zeros[0] if len(_zeros) == 1 else _zeros

        stubs.append(wasmtime.Func(store, ty, stub))
    return stubs


@pytest.fixture(scope="module")
def crash_data() -> bytes:
    return CRASH_WASM.read_bytes()


@pytest.fixture(scope="module")
def trap_frames(crash_data: bytes) -> list[wasmtime.Frame]:
    engine = wasmtime.Engine()
    store = wasmtime.Store(engine)
    module = wasmtime.Module(engine, crash_data)
    instance = wasmtime.Instance(store, module, _stub_imports(store, module))
    exports = instance.exports(store)
    exports["_initialize"](store)
    with pytest.raises(wasmtime.Trap) as excinfo:
        exports["proxy_on_request_headers"](store, 1, 2, 0)
    frames = excinfo.value.frames
    assert frames, "wasmtime reported no frames"
    return frames


def test_top_frame_maps_to_trap_line(crash_data: bytes, trap_frames: list) -> None:
    top = trap_frames[0]
    loc = lookup(crash_data, top.module_offset)
    assert loc is not None
    assert Path(loc.file).name == "crash.c"
    assert loc.line == _marker_line("// TRAP LINE")
    assert loc.function == "check_bounds"
    assert str(loc).startswith("check_bounds at crash.c:")


def test_frames_map_to_call_chain(crash_data: bytes, trap_frames: list) -> None:
    names = [lookup(crash_data, f.module_offset).function for f in trap_frames[:4]]
    assert names == CALL_CHAIN
    assert [f.func_name for f in trap_frames[:4]] == CALL_CHAIN


def test_caller_frames_point_at_call_lines(crash_data: bytes, trap_frames: list) -> None:
    lines = (PLUGIN_DIR / "crash.c").read_text().splitlines()
    callees = CALL_CHAIN[:-1]
    for frame, callee in zip(trap_frames[1:4], callees, strict=True):
        loc = lookup(crash_data, frame.module_offset)
        assert loc is not None and f"{callee}(" in lines[loc.line - 1]


def test_address_base_is_code_section_contents(crash_data: bytes, trap_frames: list) -> None:
    info = parse_module(crash_data)
    assert info.code_offset is not None
    index = DwarfIndex(crash_data, info)
    top = trap_frames[0].module_offset
    assert index.lookup_address(top - info.code_offset) == index.lookup(top)
    assert index.lookup(top).line == _marker_line("// TRAP LINE")


def test_index_is_cached(crash_data: bytes) -> None:
    assert dwarf_index(crash_data) is dwarf_index(bytes(crash_data))
    assert dwarf_index(crash_data).available


def test_out_of_range_offsets(crash_data: bytes) -> None:
    assert lookup(crash_data, 0) is None
    assert lookup(crash_data, len(crash_data) + 100) is None


def test_no_dwarf_and_garbage_never_raise() -> None:
    plain = bytes(wasmtime.wat2wasm('(module (func (export "f") unreachable))'))
    assert lookup(plain, 30) is None
    assert not DwarfIndex(plain).available
    assert lookup(b"not wasm at all", 3) is None


def test_corrupt_debug_sections_never_raise(crash_data: bytes) -> None:
    info = parse_module(crash_data)
    corrupt = bytearray(crash_data)
    for name in (".debug_info", ".debug_line"):
        section = info.custom_section(name)
        assert section is not None
        corrupt[section.start : section.end] = b"\xff" * (section.end - section.start)
    assert DwarfIndex(bytes(corrupt)).lookup(1000) is None
