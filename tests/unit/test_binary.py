"""Tests for the hand-written wasm binary reader (wasmgate.runtime.binary)."""

from __future__ import annotations

from pathlib import Path

import pytest
import wasmtime

from wasmgate.runtime.binary import (
    FuncType,
    Limits,
    WasmBinaryError,
    abi_version,
    demangle,
    guess_sdk,
    has_dwarf,
    parse_module,
)
from wasmgate.runtime.module import PluginModule

CRASH_WASM = Path(__file__).resolve().parents[2] / "plugins" / "dwarf-crash" / "crash.wasm"

PLUGIN_WAT = """
(module
  (type $log (func (param i32 i32 i32) (result i32)))
  (import "env" "proxy_log" (func $proxy_log (type $log)))
  (import "env" "proxy_get_property" (func $gp (param i32 i32 i32 i32) (result i32)))
  (import "env" "mem" (memory 1 4))
  (import "env" "g" (global i64))
  (func $helper (param f32 f64) (result i64) i64.const 0)
  (func $on_headers (param i32 i32 i32) (result i32) i32.const 0)
  (func $abi)
  (export "proxy_on_request_headers" (func $on_headers))
  (export "proxy_abi_version_0_2_1" (func $abi))
  (export "helper" (func $helper))
  (export "memory" (memory 0))
)
"""


def _module(body: str) -> bytes:
    return bytes(wasmtime.wat2wasm(f"(module {body})"))


def _custom_section(name: str, payload: bytes) -> bytes:
    name_bytes = name.encode()
    content = _leb(len(name_bytes)) + name_bytes + payload
    return b"\x00" + _leb(len(content)) + content


def _leb(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _str(s: str) -> bytes:
    return _leb(len(s)) + s.encode()


def test_imports_with_signatures() -> None:
    info = parse_module(bytes(wasmtime.wat2wasm(PLUGIN_WAT)))
    kinds = [(i.module, i.name, i.kind) for i in info.imports]
    assert kinds == [
        ("env", "proxy_log", "func"),
        ("env", "proxy_get_property", "func"),
        ("env", "mem", "memory"),
        ("env", "g", "global"),
    ]
    assert info.imports[0].signature == FuncType(("i32", "i32", "i32"), ("i32",))
    assert info.imports[1].signature == FuncType(("i32",) * 4, ("i32",))
    assert info.imports[2].limits == Limits(1, 4)
    assert info.num_imported_funcs == 2


def test_exports_with_signatures_and_indices() -> None:
    info = parse_module(bytes(wasmtime.wat2wasm(PLUGIN_WAT)))
    exports = {e.name: e for e in info.exports}
    assert exports["helper"].index == 2  # after the two imported functions
    assert exports["helper"].signature == FuncType(("f32", "f64"), ("i64",))
    assert exports["proxy_on_request_headers"].signature == FuncType(("i32",) * 3, ("i32",))
    assert exports["memory"].kind == "memory" and exports["memory"].signature is None
    assert info.memories == (Limits(1, 4),)
    assert str(exports["helper"].signature) == "(f32, f64) -> (i64)"


def test_name_section_includes_imported_functions() -> None:
    info = parse_module(bytes(wasmtime.wat2wasm(PLUGIN_WAT)))
    assert info.function_names[0] == "proxy_log"
    assert info.function_names[1] == "gp"
    assert info.function_names[3] == "on_headers"
    assert info.func_name(3) == "on_headers"
    assert "name" in {s.name for s in info.custom_sections}


def test_defined_memory_limits_and_code_offset() -> None:
    data = _module('(memory 2 10) (func (export "f"))')
    info = parse_module(data)
    assert info.memories == (Limits(2, 10),)
    assert info.code_offset is not None
    # The code section's contents start with the function count (1) then body size.
    assert data[info.code_offset] == 1
    assert info.code_offset + info.code_size <= len(data)


def test_custom_section_ranges() -> None:
    data = _module("") + _custom_section("hello", b"payload!")
    section = parse_module(data).custom_section("hello")
    assert section is not None
    assert data[section.start : section.end] == b"payload!"


@pytest.mark.parametrize("version", ["0_1_0", "0_2_0", "0_2_1", "0_2_100"])
def test_abi_version_each(version: str) -> None:
    info = parse_module(_module(f'(func (export "proxy_abi_version_{version}"))'))
    assert abi_version(info) == version


def test_abi_version_newest_wins_like_the_runtime() -> None:
    body = '(func (export "proxy_abi_version_0_2_100")) (func (export "proxy_abi_version_0_2_0"))'
    assert abi_version(parse_module(_module(body))) == "0_2_100"
    assert PluginModule(_module(body)).abi == "0_2_100"


def test_abi_version_none_and_non_function_export() -> None:
    assert abi_version(parse_module(_module('(func (export "main"))'))) is None
    global_export = '(global (export "proxy_abi_version_0_2_0") i32 (i32.const 0))'
    assert abi_version(parse_module(_module(global_export))) is None


@pytest.mark.parametrize(
    ("data", "offset", "message"),
    [
        (b"\0asx\x01\0\0\0", 0, "bad magic"),
        (b"", 0, "bad magic"),
        (b"\0asm\x02\0\0\0", 4, "version"),
        (b"\0asm\x01\0", 6, "truncated header"),
        # type section claims 16 bytes but the file ends
        (b"\0asm\x01\0\0\0\x01\x10\x01", 8, "truncated"),
        # section size LEB never terminates
        (b"\0asm\x01\0\0\0\x01\x80\x80", 9, "LEB"),
        # export section: count 1, name length 72 with no bytes following
        (b"\0asm\x01\0\0\0\x07\x02\x01\x48", 12, "truncated"),
    ],
)
def test_malformed_input_names_offset(data: bytes, offset: int, message: str) -> None:
    with pytest.raises(WasmBinaryError, match=message) as excinfo:
        parse_module(data)
    assert excinfo.value.offset == offset
    assert f"{offset:#x}" in str(excinfo.value)


def test_producers_section_parsed() -> None:
    payload = (
        _leb(2)
        + _str("language")
        + _leb(1)
        + _str("Rust")
        + _str("")
        + _str("processed-by")
        + _leb(1)
        + _str("rustc")
        + _str("1.80.0")
    )
    data = _module('(func (export "f"))') + _custom_section("producers", payload)
    info = parse_module(data)
    assert info.producers == {
        "language": (("Rust", ""),),
        "processed-by": (("rustc", "1.80.0"),),
    }
    guess = guess_sdk(info, data)
    assert guess.sdk == "rust"
    assert any("rustc 1.80.0" in e for e in guess.evidence["rust"])


def test_guess_sdk_go() -> None:
    body = """
      (func $runtime.alloc (export "runtime.alloc"))
      (func (export "_initialize"))
      (func (export "proxy_on_memory_allocate") (param i32) (result i32) i32.const 0)
      (func (export "proxy_abi_version_0_2_100"))
      (memory 1) (data (i32.const 0) "go1.22.1 go:buildid")
    """
    data = _module(body)
    guess = guess_sdk(parse_module(data), data)
    assert guess.sdk == "go"
    assert len(guess.evidence["go"]) >= 3


def test_guess_sdk_assemblyscript() -> None:
    body = """
      (func (export "__new") (param i32 i32) (result i32) i32.const 0)
      (func (export "__pin") (param i32) (result i32) i32.const 0)
      (memory 1) (data (i32.const 0) "~lib/rt/itcms.ts")
    """
    data = _module(body)
    guess = guess_sdk(parse_module(data), data)
    assert guess.sdk == "assemblyscript"


def test_guess_sdk_unknown() -> None:
    data = _module('(func (export "f"))')
    assert guess_sdk(parse_module(data), data).sdk == "unknown"


def test_c_plugin_fixture() -> None:
    data = CRASH_WASM.read_bytes()
    info = parse_module(data)
    assert abi_version(info) == "0_2_0"
    assert has_dwarf(info)
    assert guess_sdk(info, data).sdk == "c/c++"
    assert {"handle_request", "parse_header", "check_bounds"} <= set(info.function_names.values())


def test_has_dwarf_false() -> None:
    assert not has_dwarf(parse_module(_module("")))


@pytest.mark.parametrize(
    ("mangled", "expected"),
    [
        ("_ZN4core3fmt9Formatter3pad17h0123456789abcdefE", "core::fmt::Formatter::pad"),
        ("_ZN3std2rt10lang_start17h1111111111111111E", "std::rt::lang_start"),
        (
            "_ZN36_$LT$T$u20$as$u20$core..any..Any$GT$7type_id17h0123456789abcdefE",
            "<T as core::any::Any>::type_id",
        ),
        ("_ZN3foo3barEi", "foo::bar(int)"),
        ("_Z3fooPKci", "foo(char const*, int)"),
        ("_ZNK3Foo3getEv", "Foo::get() const"),
        ("_Z4mainv", "main()"),
        (
            "core::ptr::drop_in_place$LT$serde_json..value..Value$GT$::h23ed08186aeeb53e",
            "core::ptr::drop_in_place<serde_json::value::Value>",
        ),
        ("proxy_on_tick", "proxy_on_tick"),
        ("_ZN3foo", "_ZN3foo"),
    ],
)
def test_demangle(mangled: str, expected: str) -> None:
    assert demangle(mangled) == expected
