"""A loaded plugin module: validated bytes, detected ABI, compiled code, names for backtraces."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import wasmtime

from .abi import ABI_EXPORTS
from .engine import shared_engine
from .errors import ModuleLoadError, UnsupportedAbi
from .module_cache import CompiledModuleCache

log = logging.getLogger("wasmgate.runtime.module")

_ABI_PREFERENCE = ("0_2_100", "0_2_1", "0_2_0", "0_1_0")
_default_cache: CompiledModuleCache | None = None


def default_module_cache() -> CompiledModuleCache:
    global _default_cache
    if _default_cache is None:
        _default_cache = CompiledModuleCache()
    return _default_cache


@dataclass(frozen=True)
class FuncImport:
    module: str
    name: str
    params: tuple[str, ...]
    results: tuple[str, ...]

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"


def _valtypes(types: list[wasmtime.ValType]) -> tuple[str, ...]:
    return tuple(str(t) for t in types)


class PluginModule:
    """Compiled once, instantiated into any number of VMs (one per plugin, fresh on reload)."""

    def __init__(self, wasm: bytes, *, source: str = "<bytes>",
                 cache: CompiledModuleCache | None = None) -> None:
        self.wasm = bytes(wasm)
        self.source = source
        self.sha256 = hashlib.sha256(self.wasm).hexdigest()
        try:
            wasmtime.Module.validate(shared_engine(), self.wasm)
        except wasmtime.WasmtimeError as exc:
            raise ModuleLoadError(f"{source}: not a valid WebAssembly module: {exc}") from exc
        cache = cache if cache is not None else default_module_cache()
        self.module = cache.get(self.wasm, self.sha256)
        self.func_imports, self.other_imports = self._imports()
        self.func_exports = self._exports()
        self.abi = self._detect_abi()

    @classmethod
    def load(cls, source: bytes | str | Path, *,
             cache: CompiledModuleCache | None = None) -> PluginModule:
        """Load from bytes or a file path (str paths that are not a file are an error)."""
        if isinstance(source, bytes | bytearray):
            return cls(bytes(source), cache=cache)
        path = Path(source)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ModuleLoadError(f"{path}: cannot read module: {exc.strerror}") from exc
        return cls(data, source=str(path), cache=cache)

    def _imports(self) -> tuple[list[FuncImport], list[str]]:
        funcs, others = [], []
        for imp in self.module.imports:
            if isinstance(imp.type, wasmtime.FuncType):
                funcs.append(FuncImport(imp.module, imp.name or "", _valtypes(imp.type.params),
                                        _valtypes(imp.type.results)))
            else:
                others.append(f"{imp.module}.{imp.name}")
        return funcs, others

    def _exports(self) -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
        return {e.name: (_valtypes(e.type.params), _valtypes(e.type.results))
                for e in self.module.exports if isinstance(e.type, wasmtime.FuncType)}

    def _detect_abi(self) -> str:
        found = {ABI_EXPORTS[name] for name in self.func_exports if name in ABI_EXPORTS}
        for version in _ABI_PREFERENCE:
            if version in found:
                return version
        raise UnsupportedAbi(
            f"{self.source}: missing or unknown Proxy-Wasm ABI version (no function export "
            f"named proxy_abi_version_0_1_0/0_2_0/0_2_1/0_2_100)")

    @cached_property
    def info(self):  # type: ignore[no-untyped-def]
        """Binary-level facts (names, custom sections); parsed on first use."""
        from .binary import parse_module

        return parse_module(self.wasm)

    @cached_property
    def function_names(self) -> dict[int, str]:
        try:
            return dict(self.info.function_names)
        except Exception as exc:  # a broken name section must not break a backtrace
            log.debug("no function names for %s: %s", self.source, exc)
            return {}

    @cached_property
    def symbolizer(self):  # type: ignore[no-untyped-def]
        """DWARF address -> source line mapper, or None without DWARF."""
        try:
            from .binary import has_dwarf
            from .dwarf import DwarfIndex

            return DwarfIndex(self.wasm, self.info) if has_dwarf(self.info) else None
        except Exception as exc:
            log.debug("no DWARF symbolizer for %s: %s", self.source, exc)
            return None

    def __repr__(self) -> str:
        return f"<PluginModule {self.source} abi={self.abi} sha256={self.sha256[:12]}>"
