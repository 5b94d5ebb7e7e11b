"""Map wasm module offsets (as in wasmtime trap frames) to source locations via DWARF.

wasmtime-py gives a trap frame's ``module_offset`` (a file offset into the
wasm bytes) but no source location, so wasmgate reads the module's DWARF
custom sections itself with pyelftools. DWARF addresses in wasm are relative
to the start of the code section's contents (the byte after its size LEB),
so ``address = module_offset - ModuleInfo.code_offset``.

Debug info is optional and often broken in the wild, so nothing here raises:
lookups return None and the reason is logged at debug level.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import itertools
import logging
import posixpath
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from wasmgate.runtime.binary import ModuleInfo, demangle, parse_module

__all__ = ["DwarfIndex", "SourceLocation", "dwarf_index", "lookup"]

log = logging.getLogger(__name__)

# Every section DWARFInfo accepts; the ones a module lacks are passed as None.
_DWARF_SECTIONS = (
    "debug_info",
    "debug_aranges",
    "debug_abbrev",
    "debug_frame",
    "eh_frame",
    "debug_str",
    "debug_loc",
    "debug_ranges",
    "debug_line",
    "debug_pubtypes",
    "debug_pubnames",
    "debug_addr",
    "debug_str_offsets",
    "debug_line_str",
    "debug_loclists",
    "debug_rnglists",
    "debug_sup",
    "gnu_debugaltlink",
    "debug_types",
)
# wasm-ld marks code of discarded functions with 0 (old LLVM) or -1/-2 (newer).
_TOMBSTONE_MIN = 0xFFFFFFF0


@dataclass(frozen=True)
class SourceLocation:
    """Where an instruction came from. ``file`` is as the compiler recorded it."""

    file: str
    line: int
    column: int | None = None
    function: str | None = None
    directory: str | None = None  # compilation or include directory, if known

    @property
    def path(self) -> str:
        """``file`` joined with its directory (absolute when the compiler said so)."""
        return posixpath.join(self.directory, self.file) if self.directory else self.file

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" + (f":{self.column}" if self.column else "")
        return f"{self.function} at {where}" if self.function else where


@dataclass(frozen=True)
class _Row:
    address: int
    file: str
    directory: str | None
    line: int
    column: int


@dataclass(frozen=True)
class _Span:
    """``[start, end)`` in code-section-relative addresses, plus what it maps to."""

    start: int
    end: int
    value: Any


class _SpanTable:
    """Sorted, non-overlapping spans with bisect lookup; later overlaps are dropped."""

    def __init__(self, spans: list[_Span]) -> None:
        spans.sort(key=lambda s: (s.start, s.end))
        kept: list[_Span] = []
        for span in spans:
            if kept and span.start < kept[-1].end:
                continue
            kept.append(span)
        self._spans = kept
        self._starts = [s.start for s in kept]

    def __len__(self) -> int:
        return len(self._spans)

    def find(self, address: int) -> Any:
        i = bisect.bisect_right(self._starts, address) - 1
        if i >= 0 and address < self._spans[i].end:
            return self._spans[i].value
        return None


def _valid_address(address: int, code_size: int) -> bool:
    return 0 < address < _TOMBSTONE_MIN and address <= code_size


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _line_files(lineprog: Any, comp_dir: str | None) -> list[tuple[str, str | None]]:
    """(name, directory) per file index, honouring DWARF 4 (1-based) vs 5 (0-based)."""
    header = lineprog.header
    dirs = [_text(d) for d in header["include_directory"]]
    version = header["version"]
    files: list[tuple[str, str | None]] = []
    for entry in header["file_entry"]:
        dir_index = entry.dir_index
        if version >= 5:
            directory = dirs[dir_index] if dir_index < len(dirs) else None
        else:
            directory = (
                comp_dir
                if dir_index == 0
                else (dirs[dir_index - 1] if dir_index - 1 < len(dirs) else None)
            )
        files.append((_text(entry.name), directory))
    return files


def _file_at(
    files: list[tuple[str, str | None]], index: int, version: int, comp_dir: str | None
) -> tuple[str, str | None]:
    """(file, directory): file relative to the compilation dir when it lies under it."""
    i = index if version >= 5 else index - 1
    if not 0 <= i < len(files):
        return "<unknown>", None
    name, directory = files[i]
    if posixpath.isabs(name):
        return name, None
    if directory and comp_dir and not posixpath.isabs(directory):
        directory = posixpath.normpath(posixpath.join(comp_dir, directory))
    if not directory or directory == comp_dir:
        return name, directory
    full = posixpath.join(directory, name)
    if comp_dir and full.startswith(comp_dir.rstrip("/") + "/"):
        return full[len(comp_dir.rstrip("/")) + 1 :], comp_dir
    return full, None


def _sequences(lineprog: Any) -> list[list[tuple[int, int, int, int]]]:
    """Raw (address, file, line, column) rows per sequence; the last row ends it."""
    seqs: list[list[tuple[int, int, int, int]]] = []
    current: list[tuple[int, int, int, int]] = []
    for entry in lineprog.get_entries():
        state = entry.state
        if state is None:
            continue
        current.append((state.address, state.file, state.line, state.column))
        if state.end_sequence:
            seqs.append(current)
            current = []
    return seqs


def _line_spans(dwarf: Any, cu: Any, code_size: int) -> list[_Span]:
    lineprog = dwarf.line_program_for_CU(cu)
    if lineprog is None:
        return []
    top = cu.get_top_DIE()
    comp_dir_attr = top.attributes.get("DW_AT_comp_dir")
    comp_dir = _text(comp_dir_attr.value) if comp_dir_attr else None
    version = lineprog.header["version"]
    files = _line_files(lineprog, comp_dir)
    spans = []
    for seq in _sequences(lineprog):
        if len(seq) < 2 or not _valid_address(seq[0][0], code_size):
            continue
        last_line = None
        for (addr, file_index, line, col), nxt in itertools.pairwise(seq):
            # Line 0 means "no source line" (compiler-generated); keep the previous one.
            if line == 0 and last_line is not None:
                file_index, line, col = last_line
            elif line != 0:
                last_line = (file_index, line, col)
            if line == 0 or nxt[0] <= addr:
                continue
            name, directory = _file_at(files, file_index, version, comp_dir)
            spans.append(_Span(addr, nxt[0], _Row(addr, name, directory, line, col)))
    return spans


def _die_name(die: Any) -> str | None:
    """The most helpful name: demangled linkage name, else DW_AT_name, following origins."""
    for _ in range(4):  # DW_AT_specification / abstract_origin chains are short
        attrs = die.attributes
        for key in ("DW_AT_linkage_name", "DW_AT_MIPS_linkage_name"):
            if key in attrs:
                raw = _text(attrs[key].value)
                pretty = demangle(raw)
                if pretty != raw or "DW_AT_name" not in attrs:
                    return pretty
        if "DW_AT_name" in attrs:
            return _text(attrs["DW_AT_name"].value)
        origin = next(
            (k for k in ("DW_AT_abstract_origin", "DW_AT_specification") if k in attrs), None
        )
        if origin is None:
            return None
        die = die.get_DIE_from_attribute(origin)
    return None


def _die_ranges(dwarf: Any, cu: Any, die: Any) -> list[tuple[int, int]]:
    attrs = die.attributes
    if "DW_AT_low_pc" in attrs and "DW_AT_high_pc" in attrs:
        low = attrs["DW_AT_low_pc"].value
        high_attr = attrs["DW_AT_high_pc"]
        high = high_attr.value if high_attr.form == "DW_FORM_addr" else low + high_attr.value
        return [(low, high)]
    if "DW_AT_ranges" in attrs and (range_lists := dwarf.range_lists()) is not None:
        base = cu.get_top_DIE().attributes.get("DW_AT_low_pc")
        base_addr = base.value if base else 0
        out = []
        for entry in range_lists.get_range_list_at_offset(attrs["DW_AT_ranges"].value, cu=cu):
            if hasattr(entry, "base_address"):
                base_addr = entry.base_address
            elif entry.is_absolute:
                out.append((entry.begin_offset, entry.end_offset))
            else:
                out.append((base_addr + entry.begin_offset, base_addr + entry.end_offset))
        return out
    return []


def _function_spans(dwarf: Any, cu: Any, code_size: int) -> list[_Span]:
    spans = []
    for die in cu.iter_DIEs():
        if die.tag != "DW_TAG_subprogram":
            continue
        try:
            ranges = _die_ranges(dwarf, cu, die)
        except Exception as exc:  # one odd DIE must not lose the whole table
            log.debug("dwarf: skipping ranges of DIE %#x: %s", die.offset, exc)
            continue
        name = None
        for low, high in ranges:
            if _valid_address(low, code_size) and high > low:
                name = name or _die_name(die) or "<anonymous>"
                spans.append(_Span(low, high, name))
    return spans


def _build_dwarf_info(data: bytes, info: ModuleInfo) -> Any:
    from elftools.dwarf.dwarfinfo import DebugSectionDescriptor, DwarfConfig, DWARFInfo

    kwargs: dict[str, Any] = {}
    for sec in _DWARF_SECTIONS:
        custom = info.custom_section("." + sec)
        kwargs[sec + "_sec"] = (
            None
            if custom is None
            else DebugSectionDescriptor(
                io.BytesIO(data[custom.start : custom.end]),
                "." + sec,
                None,
                custom.end - custom.start,
                0,
            )
        )
    config = DwarfConfig(little_endian=True, machine_arch="wasm", default_address_size=4)
    return DWARFInfo(config=config, **kwargs)


class DwarfIndex:
    """Address -> source tables for one module, built lazily on first lookup."""

    def __init__(self, data: bytes, info: ModuleInfo | None = None) -> None:
        self._data = data
        self._info = info
        self._lines: _SpanTable | None = None
        self._functions: _SpanTable | None = None
        self._code_offset: int | None = None
        self._lock = threading.Lock()

    def _ensure_built(self) -> bool:
        with self._lock:
            if self._lines is None:
                self._lines, self._functions = self._build()
                self._data = b""  # tables are built; do not pin the module bytes
        return len(self._lines) > 0 or len(self._functions or ()) > 0

    def _build(self) -> tuple[_SpanTable, _SpanTable]:
        lines: list[_Span] = []
        functions: list[_Span] = []
        try:
            info = self._info or parse_module(self._data)
            self._code_offset = info.code_offset
            if info.custom_section(".debug_info") is None or info.code_offset is None:
                return _SpanTable([]), _SpanTable([])
            dwarf = _build_dwarf_info(self._data, info)
            for cu in dwarf.iter_CUs():
                try:
                    lines += _line_spans(dwarf, cu, info.code_size)
                    functions += _function_spans(dwarf, cu, info.code_size)
                except Exception as exc:  # keep what the other CUs give
                    log.debug("dwarf: skipping CU at %#x: %s", cu.cu_offset, exc)
        except Exception as exc:  # WasmBinaryError, ELFError, struct errors, ...
            log.debug("dwarf: cannot read debug info: %s", exc)
        return _SpanTable(lines), _SpanTable(functions)

    @property
    def available(self) -> bool:
        """Whether the module has usable DWARF line or function information."""
        return self._ensure_built()

    def lookup(self, module_offset: int) -> SourceLocation | None:
        """Source location of the instruction at ``module_offset`` (a file offset)."""
        if not self._ensure_built() or self._code_offset is None:
            return None
        return self.lookup_address(module_offset - self._code_offset)

    def lookup_address(self, address: int) -> SourceLocation | None:
        """Like lookup() but with a DWARF (code-section-relative) address."""
        if not self._ensure_built():
            return None
        assert self._lines is not None and self._functions is not None
        row: _Row | None = self._lines.find(address)
        function: str | None = self._functions.find(address)
        if row is None:
            return None
        return SourceLocation(row.file, row.line, row.column or None, function, row.directory)


_CACHE_SIZE = 16
_cache: OrderedDict[bytes, DwarfIndex] = OrderedDict()
_cache_lock = threading.Lock()


def dwarf_index(data: bytes, info: ModuleInfo | None = None) -> DwarfIndex:
    """A cached DwarfIndex for these module bytes (keyed by content hash)."""
    key = hashlib.blake2b(data, digest_size=16).digest()
    with _cache_lock:
        index = _cache.get(key)
        if index is None:
            index = _cache[key] = DwarfIndex(bytes(data), info)
            if len(_cache) > _CACHE_SIZE:
                _cache.popitem(last=False)
        else:
            _cache.move_to_end(key)
        return index


def lookup(data: bytes, module_offset: int) -> SourceLocation | None:
    """Source location for a trap frame's ``module_offset`` in module ``data``, if known."""
    return dwarf_index(data).lookup(module_offset)
