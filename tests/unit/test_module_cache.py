"""The precompiled-module cache: disk hits, and corrupt or stale entries recompiled."""

from __future__ import annotations

from pathlib import Path

from wasmgate.runtime.module import PluginModule
from wasmgate.runtime.module_cache import CompiledModuleCache
from wasmgate.testing import Emulator

from ..conftest import EXAMPLE


def _entries(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.cwasm"))


def test_compiled_once_then_loaded_from_disk(tmp_path: Path) -> None:
    first = CompiledModuleCache(tmp_path)
    PluginModule.load(EXAMPLE, cache=first)
    assert first.stats["compiles"] == 1
    [entry] = _entries(tmp_path)
    assert entry.name.startswith(PluginModule.load(EXAMPLE, cache=first).sha256)
    second = CompiledModuleCache(tmp_path)
    module = PluginModule.load(EXAMPLE, cache=second)
    assert second.stats == {"memory_hits": 0, "disk_hits": 1, "compiles": 0, "rejected": 0}
    emulator = Emulator(module.wasm, root_id="example", plugin_config="x")
    emulator.plugin.module = module
    emulator.start()


def test_corrupt_entry_is_recompiled_not_trusted(tmp_path: Path) -> None:
    PluginModule.load(EXAMPLE, cache=CompiledModuleCache(tmp_path))
    [entry] = _entries(tmp_path)
    data = bytearray(entry.read_bytes())
    data[len(data) // 2] ^= 0xFF
    entry.write_bytes(bytes(data))
    cache = CompiledModuleCache(tmp_path)
    PluginModule.load(EXAMPLE, cache=cache)
    assert cache.stats["rejected"] == 1
    assert cache.stats["compiles"] == 1
    assert _entries(tmp_path)  # rewritten


def test_truncated_entry_is_recompiled(tmp_path: Path) -> None:
    PluginModule.load(EXAMPLE, cache=CompiledModuleCache(tmp_path))
    [entry] = _entries(tmp_path)
    entry.write_bytes(entry.read_bytes()[:100])
    cache = CompiledModuleCache(tmp_path)
    PluginModule.load(EXAMPLE, cache=cache)
    assert cache.stats["rejected"] == 1


def test_key_includes_wasmtime_version_and_settings(tmp_path: Path) -> None:
    from wasmgate.runtime.engine import engine_settings, wasmtime_version

    key = engine_settings().cache_key()
    assert wasmtime_version() in key
    assert "opt=" in key and "epoch=" in key
    cache = CompiledModuleCache(tmp_path)
    PluginModule.load(EXAMPLE, cache=cache)
    [entry] = _entries(tmp_path)
    stale = entry.with_name(entry.name.replace(entry.name.split("-")[1], "0000000000000000"))
    entry.rename(stale)
    entry.with_suffix(".cwasm.sha256").rename(stale.with_suffix(".cwasm.sha256"))
    fresh = CompiledModuleCache(tmp_path)
    PluginModule.load(EXAMPLE, cache=fresh)
    assert fresh.stats["compiles"] == 1  # another key never matches
