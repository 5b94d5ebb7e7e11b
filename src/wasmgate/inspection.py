"""Static inspection of a Proxy-Wasm module: what it is, and whether wasmgate can run it.

`inspect_module` is pure (bytes in, `Inspection` out): it decodes the binary with
`wasmgate.runtime.binary` and checks every import against the runtime's host-function
registry, exactly as the VM's linker would (same module, name and signature).
Rendering lives in `wasmgate.cli`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from .runtime import hostcalls
from .runtime.binary import (
    ABI_VERSIONS,
    FuncType,
    Import,
    Limits,
    abi_version,
    guess_sdk,
    has_dwarf,
    parse_module,
)

__all__ = [
    "ExportEntry",
    "ImportCheck",
    "Inspection",
    "MemoryEntry",
    "inspect_module",
]

WASM_PAGE = 64 * 1024
CALLBACK_PREFIX = "proxy_on_"


@dataclass(frozen=True)
class ImportCheck:
    """One import and whether the host satisfies it; ``reason`` says why not."""

    module: str
    name: str
    kind: str
    signature: str | None  # "(i32, i32) -> (i32)" for functions
    satisfied: bool
    reason: str | None = None

    @property
    def qualname(self) -> str:
        return f"{self.module}.{self.name}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "name": self.name,
            "kind": self.kind,
            "signature": self.signature,
            "satisfied": self.satisfied,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class ExportEntry:
    name: str
    kind: str
    signature: str | None  # functions only

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "signature": self.signature}


@dataclass(frozen=True)
class MemoryEntry:
    """A linear memory; limits are in 64 KiB pages (``maximum`` None = unbounded)."""

    origin: str  # "defined" or "imported from <module>.<name>"
    minimum: int
    maximum: int | None
    shared: bool
    memory64: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "origin": self.origin,
            "minimum_pages": self.minimum,
            "maximum_pages": self.maximum,
            "minimum_bytes": self.minimum * WASM_PAGE,
            "maximum_bytes": None if self.maximum is None else self.maximum * WASM_PAGE,
            "shared": self.shared,
            "memory64": self.memory64,
        }


@dataclass(frozen=True)
class Inspection:
    source: str
    size: int
    sha256: str
    abi_version: str | None  # the version wasmgate would use, e.g. "0_2_1"
    abi_exports: tuple[str, ...]  # every proxy_abi_version_* export, if several
    sdk: str
    sdk_evidence: tuple[tuple[str, tuple[str, ...]], ...]  # (candidate sdk, evidence)
    imports: tuple[ImportCheck, ...]
    callbacks: tuple[ExportEntry, ...]  # proxy_on_* function exports
    other_exports: tuple[ExportEntry, ...]
    memories: tuple[MemoryEntry, ...]
    exports_memory: bool
    has_dwarf: bool
    has_name_section: bool
    function_names: int  # entries in the name section
    producers: tuple[tuple[str, tuple[tuple[str, str], ...]], ...]  # field -> (name, version)
    custom_sections: tuple[str, ...]

    @property
    def satisfied_imports(self) -> tuple[ImportCheck, ...]:
        return tuple(i for i in self.imports if i.satisfied)

    @property
    def unsatisfied_imports(self) -> tuple[ImportCheck, ...]:
        return tuple(i for i in self.imports if not i.satisfied)

    @property
    def problems(self) -> tuple[str, ...]:
        """Why the module cannot run on this host (empty when it can)."""
        out = []
        if self.abi_version is None:
            out.append(
                "no Proxy-Wasm ABI version export "
                f"({', '.join(ABI_VERSIONS)})"
            )
        bad = self.unsatisfied_imports
        if bad:
            names = ", ".join(i.qualname for i in bad)
            out.append(f"{len(bad)} import{'s' if len(bad) != 1 else ''} not satisfied: {names}")
        if not self.exports_memory:
            out.append("no exported memory named 'memory'")
        return tuple(out)

    @property
    def runnable(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "size": self.size,
            "sha256": self.sha256,
            "abi_version": self.abi_version,
            "abi_exports": list(self.abi_exports),
            "sdk": {
                "guess": self.sdk,
                "evidence": {sdk: list(ev) for sdk, ev in self.sdk_evidence},
            },
            "imports": {
                "satisfied": [i.to_dict() for i in self.satisfied_imports],
                "not_satisfied": [i.to_dict() for i in self.unsatisfied_imports],
            },
            "callbacks": [e.to_dict() for e in self.callbacks],
            "other_exports": [e.to_dict() for e in self.other_exports],
            "memories": [m.to_dict() for m in self.memories],
            "exports_memory": self.exports_memory,
            "debug": {
                "dwarf": self.has_dwarf,
                "name_section": self.has_name_section,
                "function_names": self.function_names,
            },
            "producers": {
                field: [{"name": n, "version": v} for n, v in values]
                for field, values in self.producers
            },
            "custom_sections": list(self.custom_sections),
            "runnable": self.runnable,
            "problems": list(self.problems),
        }


def _sig(sig: FuncType | None) -> str | None:
    return None if sig is None else str(sig)


def _check_import(imp: Import) -> ImportCheck:
    sig = _sig(imp.signature)
    if imp.kind != "func" or imp.signature is None:
        return ImportCheck(imp.module, imp.name, imp.kind, sig, False,
                           f"{imp.kind} import: only function imports are supported")
    params, results = imp.signature.params, imp.signature.results
    if hostcalls.find(imp.module, imp.name, params, results) is not None:
        return ImportCheck(imp.module, imp.name, imp.kind, sig, True)
    known = hostcalls.REGISTRY.get((imp.module, imp.name))
    if not known:
        return ImportCheck(imp.module, imp.name, imp.kind, sig, False, "no such host function")
    provided = " or ".join(str(FuncType(s.params, s.results)) for s in known)
    return ImportCheck(imp.module, imp.name, imp.kind, sig, False,
                       f"signature mismatch: declared {sig}, host provides {provided}")


def _memories(imports: tuple[Import, ...], limits: tuple[Limits, ...]) -> tuple[MemoryEntry, ...]:
    # ModuleInfo.memories lists imported memories first, in import order.
    origins = [f"imported from {i.module}.{i.name}" for i in imports if i.kind == "memory"]
    origins += ["defined"] * (len(limits) - len(origins))
    return tuple(
        MemoryEntry(origin, lim.minimum, lim.maximum, lim.shared, lim.memory64)
        for origin, lim in zip(origins, limits, strict=True)
    )


def inspect_module(data: bytes, source: str) -> Inspection:
    """Inspect a wasm module's bytes; ``source`` names it (usually the path).

    Raises `wasmgate.runtime.binary.WasmBinaryError` (with the offset) on malformed input.
    """
    data = bytes(data)
    info = parse_module(data)
    hostcalls.load_all()
    guess = guess_sdk(info, data)

    seen: set[Import] = set()
    checks = []
    for imp in info.imports:  # Go lists some WASI imports twice: show each once
        if imp not in seen:
            seen.add(imp)
            checks.append(_check_import(imp))

    exports = [ExportEntry(e.name, e.kind, _sig(e.signature)) for e in info.exports]
    callbacks = tuple(
        e for e in exports if e.kind == "func" and e.name.startswith(CALLBACK_PREFIX)
    )
    funcs = info.func_exports
    memory = info.export("memory")
    return Inspection(
        source=source,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        abi_version=abi_version(info),
        abi_exports=tuple(
            v.removeprefix("proxy_abi_version_") for v in ABI_VERSIONS if v in funcs
        ),
        sdk=guess.sdk,
        sdk_evidence=tuple((sdk, tuple(ev)) for sdk, ev in guess.evidence.items()),
        imports=tuple(checks),
        callbacks=callbacks,
        other_exports=tuple(e for e in exports if e not in callbacks),
        memories=_memories(info.imports, info.memories),
        exports_memory=memory is not None and memory.kind == "memory",
        has_dwarf=has_dwarf(info),
        has_name_section=info.custom_section("name") is not None,
        function_names=len(info.function_names),
        producers=tuple(info.producers.items()),
        custom_sections=tuple(s.name for s in info.custom_sections),
    )
