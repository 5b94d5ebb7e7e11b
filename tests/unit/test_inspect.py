"""Tests for `wasmgate inspect` (wasmgate.cli) and `wasmgate.inspection.inspect_module`."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import wasmtime
from click.testing import CliRunner

from wasmgate.cli import main
from wasmgate.inspection import inspect_module
from wasmgate.runtime.binary import WasmBinaryError

ROOT = Path(__file__).resolve().parents[2]
PLUGINS = ROOT / "plugins"
EXAMPLE_AS = PLUGINS / "example-as" / "example.wasm"
CONFORMANCE = PLUGINS / "conformance" / "conformance.wasm"
UNKNOWN_IMPORT = PLUGINS / "wat" / "unknown_import.wasm"
NO_ABI = PLUGINS / "wat" / "no_abi.wasm"
CRASH = PLUGINS / "dwarf-crash" / "crash.wasm"

MISMATCH_WAT = """
(module
  (import "env" "proxy_log" (func (param i32 i32) (result i32)))
  (import "env" "mem" (memory 1 4))
  (memory (export "memory") 1)
  (func (export "proxy_abi_version_0_2_1"))
)
"""


def _inspect(path: Path):
    return inspect_module(path.read_bytes(), str(path))


def _run(*args: str):
    return CliRunner().invoke(main, list(args))


# -- the pure function ------------------------------------------------------------------------


def test_example_as_runs_here() -> None:
    data = EXAMPLE_AS.read_bytes()
    r = inspect_module(data, "example.wasm")
    assert r.source == "example.wasm"
    assert r.size == len(data)
    assert r.sha256 == hashlib.sha256(data).hexdigest()
    assert r.abi_version == "0_2_0"
    assert r.sdk == "assemblyscript"
    assert dict(r.sdk_evidence)["assemblyscript"]
    proc_exit = next(i for i in r.imports if i.qualname == "wasi_unstable.proc_exit")
    assert proc_exit.satisfied
    assert proc_exit.signature == "(i32) -> ()"
    assert r.unsatisfied_imports == ()
    callbacks = {e.name for e in r.callbacks}
    assert {"proxy_on_vm_start", "proxy_on_request_headers", "proxy_on_done"} <= callbacks
    assert all(name.startswith("proxy_on_") for name in callbacks)
    assert "proxy_abi_version_0_2_0" in {e.name for e in r.other_exports}
    assert r.exports_memory
    assert [(m.origin, m.minimum, m.maximum) for m in r.memories] == [("defined", 1, None)]
    assert not r.has_dwarf
    assert r.runnable and r.problems == ()


def test_conformance_c_module() -> None:
    r = _inspect(CONFORMANCE)
    assert r.abi_version == "0_2_1"
    assert r.runnable, r.problems
    names = {i.qualname for i in r.satisfied_imports}
    assert {"env.proxy_log", "env.proxy_record_metric", "wasi_snapshot_preview1.fd_write"} <= names
    assert "proxy_on_new_connection" in {e.name for e in r.callbacks}


def test_unknown_import_is_not_satisfied() -> None:
    r = _inspect(UNKNOWN_IMPORT)
    assert r.abi_version == "0_2_0"
    [bad] = r.unsatisfied_imports
    assert bad.qualname == "env.proxy_does_not_exist"
    assert bad.reason == "no such host function"
    assert not r.runnable
    assert any("env.proxy_does_not_exist" in p for p in r.problems)


def test_no_abi() -> None:
    r = _inspect(NO_ABI)
    assert r.abi_version is None
    assert r.abi_exports == ()
    assert not r.runnable
    assert any("ABI" in p for p in r.problems)


def test_dwarf_crash_has_debug_info() -> None:
    r = _inspect(CRASH)
    assert r.has_dwarf
    assert r.has_name_section and r.function_names > 0
    assert r.sdk == "c/c++"
    producers = dict(r.producers)
    assert "processed-by" in producers
    assert any("clang" in name.lower() for name, _ in producers["processed-by"])


def test_signature_mismatch_and_memory_import() -> None:
    r = inspect_module(wasmtime.wat2wasm(MISMATCH_WAT), "mismatch.wat")
    by_name = {i.qualname: i for i in r.imports}
    log = by_name["env.proxy_log"]
    assert not log.satisfied
    assert log.reason == (
        "signature mismatch: declared (i32, i32) -> (i32), "
        "host provides (i32, i32, i32) -> (i32)"
    )
    mem = by_name["env.mem"]
    assert mem.kind == "memory" and not mem.satisfied
    assert [(m.origin, m.minimum, m.maximum) for m in r.memories] == [
        ("imported from env.mem", 1, 4),
        ("defined", 1, None),
    ]
    assert not r.runnable


def test_malformed_raises_with_offset() -> None:
    with pytest.raises(WasmBinaryError) as info:
        inspect_module(b"\0asm\x01\0\0\0\x01\xff", "bad.wasm")
    assert info.value.offset > 0


def test_to_dict_is_json_serialisable() -> None:
    d = _inspect(UNKNOWN_IMPORT).to_dict()
    assert json.loads(json.dumps(d)) == d
    assert [i["name"] for i in d["imports"]["not_satisfied"]] == ["proxy_does_not_exist"]
    assert d["runnable"] is False


# -- the command ------------------------------------------------------------------------------


def test_cli_example_as_exit_0() -> None:
    result = _run("inspect", str(EXAMPLE_AS))
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "0_2_0" in out
    assert "assemblyscript" in out
    assert "wasi_unstable.proc_exit" in out
    assert hashlib.sha256(EXAMPLE_AS.read_bytes()).hexdigest() in out
    assert f"{EXAMPLE_AS.stat().st_size} bytes" in out
    assert "proxy_on_request_headers" in out
    assert "NOT satisfied" not in out
    assert "can run" in out


def test_cli_conformance_exit_0() -> None:
    result = _run("inspect", str(CONFORMANCE))
    assert result.exit_code == 0, result.output
    assert "0_2_1" in result.stdout


def test_cli_unknown_import_exit_1() -> None:
    result = _run("inspect", str(UNKNOWN_IMPORT))
    assert result.exit_code == 1, result.output
    assert "env.proxy_does_not_exist" in result.stdout
    assert "NOT satisfied" in result.stdout
    last = result.stdout.strip().splitlines()[-1]
    assert "env.proxy_does_not_exist" in last  # the reason is said at the end


def test_cli_no_abi_exit_1() -> None:
    result = _run("inspect", str(NO_ABI))
    assert result.exit_code == 1, result.output
    assert "no Proxy-Wasm ABI version" in result.stdout


def test_cli_dwarf() -> None:
    result = _run("inspect", "--json", str(CRASH))
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert d["debug"]["dwarf"] is True
    assert d["debug"]["name_section"] is True


def test_cli_garbage_exit_2(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.wasm"
    garbage.write_bytes(b"this is not wasm at all")
    result = _run("inspect", str(garbage))
    assert result.exit_code == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert str(garbage) in lines[0]
    assert "offset 0x0" in lines[0]


def test_cli_truncated_exit_2_names_offset(tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.wasm"
    truncated.write_bytes(EXAMPLE_AS.read_bytes()[:100])
    result = _run("inspect", str(truncated))
    assert result.exit_code == 2
    [line] = result.stderr.strip().splitlines()
    assert str(truncated) in line and "offset 0x" in line


def test_cli_missing_file_exit_2(tmp_path: Path) -> None:
    missing = tmp_path / "missing.wasm"
    result = _run("inspect", str(missing))
    assert result.exit_code == 2
    [line] = result.stderr.strip().splitlines()
    assert str(missing) in line


def test_cli_json_parses() -> None:
    result = _run("inspect", "--json", str(EXAMPLE_AS))
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert d["abi_version"] == "0_2_0"
    assert d["sdk"]["guess"] == "assemblyscript"
    assert d["size"] == EXAMPLE_AS.stat().st_size
    assert d["runnable"] is True and d["problems"] == []
    satisfied = {f"{i['module']}.{i['name']}" for i in d["imports"]["satisfied"]}
    assert "wasi_unstable.proc_exit" in satisfied
    assert d["imports"]["not_satisfied"] == []


def test_cli_json_exit_1_keeps_json_clean() -> None:
    result = _run("inspect", "--json", str(NO_ABI))
    assert result.exit_code == 1
    d = json.loads(result.stdout)
    assert d["abi_version"] is None and d["problems"]


def test_cli_version_and_help() -> None:
    result = _run("--version")
    assert result.exit_code == 0
    assert "wasmgate" in result.stdout
    result = _run("--help")
    assert result.exit_code == 0
    assert "inspect" in result.stdout


# -- third-party plugins (downloaded) -------------------------------------------------------


@pytest.mark.real
def test_real_higress_plugins() -> None:
    sys.path.insert(0, str(Path(__file__).parents[1] / "real"))
    from higress import higress_plugin

    go = _inspect(higress_plugin("transformer"))
    assert go.sdk == "go"
    assert go.abi_version is not None
    assert go.runnable, go.problems
    assert any(i.module == "wasi_snapshot_preview1" for i in go.imports)

    rust = _inspect(higress_plugin("ai-data-masking"))
    assert rust.sdk == "rust"
    assert rust.abi_version is not None
    assert rust.runnable, rust.problems
    assert "language" in dict(rust.producers)

    result = _run("inspect", "--json", str(higress_plugin("transformer")))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["sdk"]["guess"] == "go"
