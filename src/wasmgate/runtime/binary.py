"""A small reader of a wasm module's binary format.

Hand-written because wasmtime-py exposes neither custom sections nor the
``name`` section, and wasmgate needs both: the Proxy-Wasm ABI version, which
SDK built a plugin, function names for traps, and the code section's file
offset (DWARF addresses in wasm are relative to it). Only the sections that
matter are decoded; everything else is skipped by size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = [
    "ABI_VERSIONS",
    "CustomSection",
    "Export",
    "FuncType",
    "Import",
    "Limits",
    "ModuleInfo",
    "SdkGuess",
    "WasmBinaryError",
    "abi_version",
    "demangle",
    "guess_sdk",
    "has_dwarf",
    "parse_module",
]

MAGIC = b"\0asm"
VERSION = b"\x01\0\0\0"

# Spec order first (as proxy-wasm-cpp-host checks them), then the legacy 0_2_100.
ABI_VERSIONS: tuple[str, ...] = (
    "proxy_abi_version_0_1_0",
    "proxy_abi_version_0_2_0",
    "proxy_abi_version_0_2_1",
    "proxy_abi_version_0_2_100",
)

_VALTYPES = {
    0x7F: "i32",
    0x7E: "i64",
    0x7D: "f32",
    0x7C: "f64",
    0x7B: "v128",
    0x70: "funcref",
    0x6F: "externref",
}
_KINDS = {0: "func", 1: "table", 2: "memory", 3: "global", 4: "tag"}

_SEC_CUSTOM, _SEC_TYPE, _SEC_IMPORT, _SEC_FUNCTION = 0, 1, 2, 3
_SEC_MEMORY, _SEC_EXPORT, _SEC_CODE = 5, 7, 10
# Sections decoded in full, so their declared size must match what was read.
_STRICT_SECTIONS = frozenset({_SEC_TYPE, _SEC_IMPORT, _SEC_FUNCTION, _SEC_MEMORY, _SEC_EXPORT})


class WasmBinaryError(ValueError):
    """The bytes are not a well-formed wasm module; the message names the offset."""

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(f"{message} at offset {offset:#x}")
        self.offset = offset


@dataclass(frozen=True)
class FuncType:
    params: tuple[str, ...]
    results: tuple[str, ...]

    def __str__(self) -> str:
        return f"({', '.join(self.params)}) -> ({', '.join(self.results)})"


@dataclass(frozen=True)
class Limits:
    minimum: int
    maximum: int | None
    shared: bool = False
    memory64: bool = False


@dataclass(frozen=True)
class Import:
    module: str
    name: str
    kind: str
    signature: FuncType | None = None  # only for functions
    limits: Limits | None = None  # only for memories and tables


@dataclass(frozen=True)
class Export:
    name: str
    kind: str
    index: int
    signature: FuncType | None = None  # only for functions


@dataclass(frozen=True)
class CustomSection:
    """A custom section; ``start``/``end`` delimit its payload after the name."""

    name: str
    start: int
    end: int


@dataclass(frozen=True)
class ModuleInfo:
    types: tuple[FuncType, ...]
    imports: tuple[Import, ...]
    exports: tuple[Export, ...]
    custom_sections: tuple[CustomSection, ...]
    memories: tuple[Limits, ...]  # imported memories first, then defined ones
    num_imported_funcs: int
    func_types: tuple[FuncType, ...]  # every function's type, by function index
    function_names: dict[int, str] = field(hash=False, compare=False)
    code_offset: int | None = None  # file offset of the code section's contents
    code_size: int = 0
    producers: dict[str, tuple[tuple[str, str], ...]] = field(
        default_factory=dict, hash=False, compare=False
    )

    def custom_section(self, name: str) -> CustomSection | None:
        return next((s for s in self.custom_sections if s.name == name), None)

    def export(self, name: str) -> Export | None:
        return next((e for e in self.exports if e.name == name), None)

    @property
    def func_exports(self) -> dict[str, Export]:
        return {e.name: e for e in self.exports if e.kind == "func"}

    def func_name(self, index: int) -> str | None:
        """The name-section name of a function, else the name it is exported under."""
        if index in self.function_names:
            return self.function_names[index]
        return next((e.name for e in self.exports if e.kind == "func" and e.index == index), None)


class _Reader:
    """A cursor over a byte range; all errors carry the absolute file offset."""

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    def at_end(self) -> bool:
        return self.pos >= self.end

    def byte(self) -> int:
        if self.pos >= self.end:
            raise WasmBinaryError("unexpected end of data", self.pos)
        b = self.data[self.pos]
        self.pos += 1
        return b

    def bytes(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise WasmBinaryError(f"truncated: need {n} bytes", self.pos)
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u32(self) -> int:
        return self.uleb(32)

    def uleb(self, bits: int = 32) -> int:
        start, result, shift = self.pos, 0, 0
        while True:
            if shift >= bits + 7 or self.pos >= self.end:
                raise WasmBinaryError("bad LEB128", start)
            b = self.byte()
            result |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        if result >> bits:
            raise WasmBinaryError(f"LEB128 overflows u{bits}", start)
        return result

    def name(self) -> str:
        start = self.pos
        raw = self.bytes(self.u32())
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise WasmBinaryError("name is not UTF-8", start) from None

    def valtype(self) -> str:
        start = self.pos
        b = self.byte()
        if b not in _VALTYPES:
            raise WasmBinaryError(f"unknown value type {b:#x}", start)
        return _VALTYPES[b]

    def limits(self) -> Limits:
        start = self.pos
        flags = self.byte()
        if flags & ~0x07:
            raise WasmBinaryError(f"bad limits flags {flags:#x}", start)
        bits = 64 if flags & 0x04 else 32
        minimum = self.uleb(bits)
        maximum = self.uleb(bits) if flags & 0x01 else None
        return Limits(minimum, maximum, bool(flags & 0x02), bool(flags & 0x04))


def _parse_types(r: _Reader) -> list[FuncType]:
    types = []
    for _ in range(r.u32()):
        start = r.pos
        form = r.byte()
        if form != 0x60:
            raise WasmBinaryError(f"unsupported type form {form:#x}", start)
        params = tuple(r.valtype() for _ in range(r.u32()))
        results = tuple(r.valtype() for _ in range(r.u32()))
        types.append(FuncType(params, results))
    return types


def _type_at(types: list[FuncType], index: int, offset: int) -> FuncType:
    if index >= len(types):
        raise WasmBinaryError(f"type index {index} out of range", offset)
    return types[index]


def _parse_imports(r: _Reader, types: list[FuncType]) -> list[Import]:
    imports = []
    for _ in range(r.u32()):
        module, name = r.name(), r.name()
        start = r.pos
        kind = _KINDS.get(r.byte())
        if kind == "func":
            imports.append(Import(module, name, kind, signature=_type_at(types, r.u32(), start)))
        elif kind == "table":
            r.valtype()
            imports.append(Import(module, name, kind, limits=r.limits()))
        elif kind == "memory":
            imports.append(Import(module, name, kind, limits=r.limits()))
        elif kind == "global":
            r.valtype()
            r.byte()  # mutability
            imports.append(Import(module, name, kind))
        elif kind == "tag":
            r.byte()
            r.u32()
            imports.append(Import(module, name, kind))
        else:
            raise WasmBinaryError("unknown import kind", start)
    return imports


def _parse_exports(r: _Reader) -> list[tuple[str, str, int]]:
    exports = []
    for _ in range(r.u32()):
        name = r.name()
        start = r.pos
        kind = _KINDS.get(r.byte())
        if kind is None:
            raise WasmBinaryError("unknown export kind", start)
        exports.append((name, kind, r.u32()))
    return exports


def _parse_function_names(r: _Reader) -> dict[int, str]:
    """Subsection 1 (function names) of the ``name`` section; others are skipped."""
    names: dict[int, str] = {}
    while not r.at_end():
        sub_id = r.byte()
        size = r.u32()
        sub = _Reader(r.data, r.pos, r.pos + size)
        if sub.end > r.end:
            raise WasmBinaryError("truncated name subsection", r.pos)
        r.pos = sub.end
        if sub_id == 1:
            for _ in range(sub.u32()):
                index = sub.u32()
                names[index] = sub.name()
    return names


def _parse_producers(r: _Reader) -> dict[str, tuple[tuple[str, str], ...]]:
    """The tool-conventions ``producers`` section: field -> ((name, version), ...)."""
    fields = {}
    for _ in range(r.u32()):
        field_name = r.name()
        fields[field_name] = tuple((r.name(), r.name()) for _ in range(r.u32()))
    return fields


@dataclass
class _State:
    types: list[FuncType] = field(default_factory=list)
    imports: list[Import] = field(default_factory=list)
    func_type_indices: list[int] = field(default_factory=list)
    raw_exports: list[tuple[str, str, int]] = field(default_factory=list)
    memories: list[Limits] = field(default_factory=list)
    customs: list[CustomSection] = field(default_factory=list)
    names: dict[int, str] = field(default_factory=dict)
    producers: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)
    code_offset: int | None = None
    code_size: int = 0


def _parse_custom(r: _Reader, state: _State) -> None:
    name = r.name()
    state.customs.append(CustomSection(name, r.pos, r.end))
    # A malformed name or producers section is not fatal for engines, so not for us.
    try:
        if name == "name":
            state.names = _parse_function_names(r)
        elif name == "producers":
            state.producers = _parse_producers(r)
    except WasmBinaryError:
        pass


def _parse_section(sec_id: int, r: _Reader, state: _State) -> None:
    if sec_id == _SEC_CUSTOM:
        _parse_custom(r, state)
    elif sec_id == _SEC_TYPE:
        state.types = _parse_types(r)
    elif sec_id == _SEC_IMPORT:
        state.imports = _parse_imports(r, state.types)
        state.memories.extend(i.limits for i in state.imports if i.kind == "memory" and i.limits)
    elif sec_id == _SEC_FUNCTION:
        state.func_type_indices = [r.u32() for _ in range(r.u32())]
    elif sec_id == _SEC_MEMORY:
        state.memories.extend(r.limits() for _ in range(r.u32()))
    elif sec_id == _SEC_EXPORT:
        state.raw_exports = _parse_exports(r)
    elif sec_id == _SEC_CODE:
        state.code_offset, state.code_size = r.pos, r.end - r.pos


def _build(state: _State) -> ModuleInfo:
    func_types = [i.signature for i in state.imports if i.kind == "func" and i.signature]
    func_types += [_type_at(state.types, t, 0) for t in state.func_type_indices]
    exports = tuple(
        Export(
            name,
            kind,
            index,
            func_types[index] if kind == "func" and index < len(func_types) else None,
        )
        for name, kind, index in state.raw_exports
    )
    return ModuleInfo(
        types=tuple(state.types),
        imports=tuple(state.imports),
        exports=exports,
        custom_sections=tuple(state.customs),
        memories=tuple(state.memories),
        num_imported_funcs=sum(1 for i in state.imports if i.kind == "func"),
        func_types=tuple(func_types),
        function_names=state.names,
        code_offset=state.code_offset,
        code_size=state.code_size,
        producers=state.producers,
    )


def parse_module(data: bytes) -> ModuleInfo:
    """Decode the parts of a wasm module wasmgate cares about.

    Raises WasmBinaryError (with the offending offset) on malformed input.
    """
    data = bytes(data)
    if data[:4] != MAGIC:
        raise WasmBinaryError("bad magic (not a wasm module)", 0)
    if data[4:8] != VERSION:
        if len(data) < 8:
            raise WasmBinaryError("truncated header", len(data))
        raise WasmBinaryError(f"unsupported wasm version {data[4:8].hex()}", 4)
    r = _Reader(data, 8)
    state = _State()
    while not r.at_end():
        sec_start = r.pos
        sec_id = r.byte()
        size = r.u32()
        if r.pos + size > len(data):
            raise WasmBinaryError(
                f"section {sec_id} truncated: size {size} exceeds file", sec_start
            )
        section = _Reader(data, r.pos, r.pos + size)
        _parse_section(sec_id, section, state)
        if sec_id in _STRICT_SECTIONS and section.pos != section.end:
            raise WasmBinaryError(f"section {sec_id} size mismatch", section.pos)
        r.pos = section.end
    return _build(state)


def abi_version(info: ModuleInfo) -> str | None:
    """The Proxy-Wasm ABI version the module exports; with several, the newest wins (as in
    `PluginModule`), so a Higress module that also exports 0_2_1 gets its 0_2_100 behaviour."""
    funcs = info.func_exports
    found = [v for v in ABI_VERSIONS if v in funcs]
    return found[-1].removeprefix("proxy_abi_version_") if found else None


def has_dwarf(info: ModuleInfo) -> bool:
    return info.custom_section(".debug_info") is not None


@dataclass(frozen=True)
class SdkGuess:
    """The best guess at a plugin's language/SDK, with the evidence for each candidate."""

    sdk: str  # "go", "tinygo", "rust", "c/c++", "assemblyscript" or "unknown"
    evidence: dict[str, tuple[str, ...]] = field(hash=False, compare=False)

    def __str__(self) -> str:
        return self.sdk


def _all_names(info: ModuleInfo) -> set[str]:
    names = set(info.function_names.values())
    names.update(e.name for e in info.exports)
    names.update(i.name for i in info.imports)
    return names


def _producer_tools(info: ModuleInfo) -> dict[str, str]:
    tools: dict[str, str] = {}
    for key in ("language", "processed-by", "sdk"):
        for name, version in info.producers.get(key, ()):
            tools[name.lower()] = version
    return tools


def _go_evidence(info: ModuleInfo, data: bytes, names: set[str]) -> list[str]:
    ev = []
    languages = {n.lower(): v for n, v in info.producers.get("language", ())}
    if "go" in languages:
        ev.append(f"producers: Go {languages['go']}".rstrip())
    if info.custom_section("go:buildid"):
        ev.append("'go:buildid' custom section")
    elif b"go:buildid" in data or b"Go build ID" in data:
        ev.append("Go build id string")
    runtime_names = [n for n in names if n.startswith("runtime.")]
    if runtime_names:
        ev.append(f"{len(runtime_names)} 'runtime.*' functions")
    if re.search(rb"go1\.\d+", data):
        ev.append("'go1.N' version string")
    # The reactor layout alone also fits C plugins, so it only backs other evidence.
    layout = {"_initialize", "proxy_on_memory_allocate"} <= names
    if ev and layout and abi_version(info) in ("0_2_0", "0_2_100"):
        ev.append("_initialize + proxy_on_memory_allocate reactor (Go SDK layout)")
    return ev


def _tinygo_evidence(info: ModuleInfo, data: bytes, names: set[str]) -> list[str]:
    ev = []
    if any("tinygo" in tool for tool in _producer_tools(info)):
        ev.append("producers: tinygo")
    if b"tinygo" in data or b"TinyGo" in data:
        ev.append("'tinygo' string in binary")
    if any(n.startswith(("tinygo_", "(*internal/task.", "internal/task.")) for n in names):
        ev.append("TinyGo runtime functions")
    return ev


def _rust_evidence(info: ModuleInfo, data: bytes, names: set[str]) -> list[str]:
    ev = []
    tools = _producer_tools(info)
    if "rustc" in tools or "rust" in tools:
        ev.append(f"producers: rustc {tools.get('rustc', tools.get('rust', ''))}".rstrip())
    rusty = [n for n in names if n.startswith(("_ZN", "__rust", "_RN")) or "core::" in n]
    if rusty:
        ev.append(f"{len(rusty)} Rust-mangled/core:: names")
    if b"/rustc/" in data:
        ev.append("'/rustc/' paths in binary")
    return ev


def _c_evidence(info: ModuleInfo, data: bytes, names: set[str]) -> list[str]:
    ev = []
    tools = _producer_tools(info)
    clang = next((t for t in tools if "clang" in t), None)
    if clang and "rustc" not in tools:
        ev.append(f"producers: {clang} {tools[clang]}".rstrip())
    if {"c99", "c11", "c17", "c++", "c++14", "c++17", "c++20"} & set(tools):
        ev.append("producers: C/C++ language")
    libc = sorted(names & {"dlmalloc", "__libc_malloc", "__original_main", "__wasi_fd_write"})
    if libc:
        ev.append(f"wasi-libc functions {', '.join(libc)}")
    if any(n.startswith("_Z") and not n.startswith("_ZN") for n in names):
        ev.append("C++-mangled names")
    return ev


def _as_evidence(info: ModuleInfo, data: bytes, names: set[str]) -> list[str]:
    ev = []
    markers = {"__new", "__retain", "__release", "__rtti_base", "__pin", "__collect"}
    found = sorted(markers & {e.name for e in info.exports})
    if found:
        ev.append(f"AssemblyScript runtime exports {', '.join(found)}")
    if b"~lib/" in data:
        ev.append("'~lib/' strings")
    return ev


# Order matters for ties: more specific toolchains first.
_DETECTORS = (
    ("tinygo", _tinygo_evidence),
    ("go", _go_evidence),
    ("assemblyscript", _as_evidence),
    ("rust", _rust_evidence),
    ("c/c++", _c_evidence),
)


def _score(evidence: tuple[str, ...]) -> int:
    """The producers section is what the toolchain says about itself: weigh it most."""
    return sum(3 if item.startswith("producers:") else 1 for item in evidence)


def guess_sdk(info: ModuleInfo, data: bytes) -> SdkGuess:
    """Guess which language/SDK produced the module, keeping the evidence seen."""
    names = _all_names(info)
    evidence = {sdk: tuple(fn(info, data, names)) for sdk, fn in _DETECTORS}
    evidence = {k: v for k, v in evidence.items() if v}
    if not evidence:
        return SdkGuess("unknown", {})
    # TinyGo modules look like Go too; clear TinyGo evidence decides between them.
    if _score(evidence.get("tinygo", ())) >= 2:
        return SdkGuess("tinygo", evidence)
    order = [sdk for sdk, _ in _DETECTORS if sdk in evidence]
    best = max(order, key=lambda sdk: (_score(evidence[sdk]), -order.index(sdk)))
    return SdkGuess(best, evidence)


# --- demangling -------------------------------------------------------------------------

_RUST_ESCAPES = {
    "$SP$": "@",
    "$BP$": "*",
    "$RF$": "&",
    "$LT$": "<",
    "$GT$": ">",
    "$LP$": "(",
    "$RP$": ")",
    "$C$": ",",
    "$u7e$": "~",
    "$u20$": " ",
    "$u27$": "'",
    "$u5b$": "[",
    "$u5d$": "]",
    "$u7b$": "{",
    "$u7d$": "}",
    "$u3b$": ";",
    "$u2b$": "+",
    "$u22$": '"',
}
_RUST_HASH = re.compile(r"^h[0-9a-f]{16}$")
_RUST_HASH_SUFFIX = re.compile(r"::h[0-9a-f]{16}$")
_CXX_BUILTIN = {
    "v": "void",
    "b": "bool",
    "c": "char",
    "a": "signed char",
    "h": "unsigned char",
    "s": "short",
    "t": "unsigned short",
    "i": "int",
    "j": "unsigned int",
    "l": "long",
    "m": "unsigned long",
    "x": "long long",
    "y": "unsigned long long",
    "f": "float",
    "d": "double",
    "e": "long double",
    "w": "wchar_t",
    "z": "...",
}


def _unescape_rust(ident: str) -> str:
    if ident.startswith("_$"):  # rustc prefixes an identifier starting with '$' by '_'
        ident = ident[1:]
    for esc, ch in _RUST_ESCAPES.items():
        ident = ident.replace(esc, ch)
    ident = re.sub(r"\$u([0-9a-f]+)\$", lambda m: chr(int(m.group(1), 16)), ident)
    return ident.replace("..", "::")


def _source_names(s: str, pos: int) -> tuple[list[str], int]:
    """Parse `<len><ident>`* starting at pos; stops at the first non-digit."""
    parts = []
    while pos < len(s) and s[pos].isdigit():
        m = re.match(r"\d+", s[pos:])
        assert m
        n = int(m.group())
        pos += len(m.group())
        if pos + n > len(s):
            raise ValueError("truncated identifier")
        parts.append(s[pos : pos + n])
        pos += n
    return parts, pos


def _demangle_rust_legacy(name: str) -> str | None:
    """`_ZN<len><ident>...E` with nothing after the E (C++ would have parameters)."""
    parts, pos = _source_names(name, 3)
    if not parts or pos != len(name) - 1 or name[pos] != "E":
        return None
    if len(parts) > 1 and _RUST_HASH.match(parts[-1]):
        parts = parts[:-1]
    return "::".join(_unescape_rust(p) for p in parts)


def _cxx_types(s: str) -> str:
    """Best effort for simple parameter lists: builtins, P/R/K prefixes, named types."""
    out, pos, prefix = [], 0, ""
    while pos < len(s):
        c = s[pos]
        if c in "PRK":
            prefix = {"P": "*", "R": "&", "K": " const"}[c] + prefix
            pos += 1
            continue
        if c in _CXX_BUILTIN:
            base, pos = _CXX_BUILTIN[c], pos + 1
        elif c.isdigit():
            names, pos = _source_names(s, pos)
            base = names[0]
        elif c == "N":
            names, pos = _source_names(s, pos + 1)
            if s[pos : pos + 1] != "E":
                raise ValueError("unsupported")
            base, pos = "::".join(names), pos + 1
        else:
            raise ValueError("unsupported")
        out.append(base + prefix)
        prefix = ""
    return "" if out == ["void"] else ", ".join(out)


def _demangle_cxx(name: str) -> str | None:
    s = name[2:]
    if s.startswith("N"):
        pos = 1
        const = ""
        if s[pos : pos + 1] == "K":
            const, pos = " const", pos + 1
        parts, pos = _source_names(s, pos)
        if not parts or s[pos : pos + 1] != "E":
            return None
        qual, rest = "::".join(parts), s[pos + 1 :]
    else:
        parts, pos = _source_names(s, 0)
        if len(parts) != 1:
            return None
        qual, rest, const = parts[0], s[pos:], ""
    try:
        return f"{qual}({_cxx_types(rest)}){const}"
    except ValueError:
        return qual


def demangle(name: str) -> str:
    """Best-effort demangling of Rust legacy (`_ZN...E`) and simple Itanium C++ names.

    Hand-written (no dependency) and partial: anything it cannot parse is
    returned unchanged, so it is always safe to call on a symbol.
    """
    try:
        if name.startswith("_ZN") and (rust := _demangle_rust_legacy(name)):
            return rust
        if name.startswith("_Z"):
            return _demangle_cxx(name) or name
        if _RUST_HASH_SUFFIX.search(name):  # a half-demangled Rust name-section entry
            return _unescape_rust(_RUST_HASH_SUFFIX.sub("", name))
    except (ValueError, IndexError):
        pass
    return name
