"""Loading modules: ABI detection, rejection with clear errors, start functions."""

from __future__ import annotations

from pathlib import Path

import pytest
import wasmtime

from wasmgate.runtime.errors import (
    MissingImport,
    ModuleLoadError,
    PluginStartError,
    UnsupportedAbi,
)
from wasmgate.runtime.module import PluginModule
from wasmgate.testing import Action, Emulator

from ..conftest import CONFORMANCE, EXAMPLE, WAT


@pytest.mark.parametrize(("path", "abi"), [
    (WAT / "abi_0_1_0.wasm", "0_1_0"),
    (EXAMPLE, "0_2_0"),
    (CONFORMANCE, "0_2_1"),
    (WAT / "abi_0_2_100.wasm", "0_2_100"),
])
def test_abi_detected_from_export(path: Path, abi: str) -> None:
    assert PluginModule.load(path).abi == abi


def test_load_from_bytes_and_path_agree() -> None:
    from_path = PluginModule.load(EXAMPLE)
    from_bytes = PluginModule.load(EXAMPLE.read_bytes())
    assert from_path.sha256 == from_bytes.sha256
    assert from_bytes.source == "<bytes>"


def test_no_abi_export_is_rejected() -> None:
    with pytest.raises(UnsupportedAbi, match="Proxy-Wasm ABI version"):
        PluginModule.load(WAT / "no_abi.wasm")


def test_unknown_import_is_named() -> None:
    module = PluginModule.load(WAT / "unknown_import.wasm")
    with pytest.raises(MissingImport, match=r"env\.proxy_does_not_exist"):
        Emulator(module.wasm).start()


def test_import_with_wrong_signature_names_both_types() -> None:
    wat = """(module (import "env" "proxy_log" (func (param i32) (result i32)))
      (memory (export "memory") 1) (func (export "proxy_abi_version_0_2_0")))"""
    with pytest.raises(MissingImport, match=r"env\.proxy_log.*declared as \(i32\)->\(i32\)"):
        Emulator(wasmtime.wat2wasm(wat)).start()


def test_corrupt_bytes_are_rejected_with_source(tmp_path: Path) -> None:
    bad = tmp_path / "corrupt.wasm"
    bad.write_bytes(b"\0asm\x01\0\0\0\x01\xff\xff")
    with pytest.raises(ModuleLoadError, match=r"corrupt\.wasm: not a valid WebAssembly module"):
        PluginModule.load(bad)


def test_missing_file_is_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModuleLoadError, match="cannot read module"):
        PluginModule.load(tmp_path / "nope.wasm")


def test_trap_in_initialize_fails_start_cleanly() -> None:
    emulator = Emulator(WAT / "trap_initialize.wasm")
    with pytest.raises(Exception, match="_initialize failed") as info:
        emulator.start()
    assert "unreachable" in str(info.value)
    assert emulator.failed


def test_command_module_runs_start() -> None:
    emulator = Emulator(WAT / "start_command.wasm").start()
    assert "started" in emulator.logs()


def test_wrong_callback_signature_is_treated_as_absent() -> None:
    emulator = Emulator(WAT / "wrong_signature.wasm").start()
    stream = emulator.http_context()
    assert stream.request_headers({":path": "/"}) == Action.CONTINUE
    assert "wrong signature called" not in emulator.logs()


def test_abi_0_1_0_forms() -> None:
    emulator = Emulator(WAT / "abi_0_1_0.wasm", plugin_config="cfg-010",
                        vm_config="vm-010").start()
    assert "configuration=cfg-010" in emulator.logs()
    stream = emulator.http_context()
    stream.request_headers({":path": "/", ":method": "GET"})
    assert "request_headers n=2" in emulator.logs()
    assert "continue_request status=0" in emulator.logs()
    stream.response_headers({":status": "200"})
    assert "continue_response status=0" in emulator.logs()
    assert "clear_route_cache status=0" in emulator.logs()


def test_allocator_returning_zero_is_a_failure_status_not_a_crash() -> None:
    emulator = Emulator(WAT / "malloc_zero.wasm", plugin_config="some config").start()
    assert "get_buffer_bytes status=10" in emulator.logs()
    assert not emulator.failed


def test_start_error_is_plugin_start_error_subclass_of_runtime_failure() -> None:
    from wasmgate.runtime.errors import RuntimeFailure

    assert issubclass(PluginStartError, RuntimeFailure)
