"""The on-disk module cache: content-addressed modules and an index that survives restarts.

    <root>/modules/<sha256>.wasm         the unwrapped modules, named by their own sha256
    <root>/compiled/<sha256>-<key>.cwasm the runtime's precompiled code (CompiledModuleCache)
    <root>/index.json                    url -> {checksum, module_sha256, revisions, last_used,
                                         size}; module sha256 -> last use; checksum -> module
    <root>/index.lock                    flock'ed around every index read-modify-write

`checksum` is what Istio keys on: the OCI manifest digest, or the module's sha256 for http. As in
Istio, a module outlives the url that brought it (a moved tag keeps the old digest cached until it
expires), so the index also maps checksums to modules and keeps each module's last use.
Modules are written atomically (temp file, fsync, rename) and verified when read, so a torn or
corrupt file is a miss, never a wrong module. Several worker processes may share one cache: each
index update takes the lock, re-reads the index and replaces it atomically. Readers without the
lock always see a whole index (rename is atomic).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .http import parse_duration

log = logging.getLogger("wasmgate.fetch.cache")

DEFAULT_EXPIRY = 24 * 3600.0
DEFAULT_PURGE_INTERVAL = 3600.0
INDEX_VERSION = 1
_STALE_TEMP = 3600.0


def default_cache_root() -> Path:
    """`WASMGATE_CACHE_DIR`, else ~/.cache/wasmgate (the runtime's compiled cache lives inside)."""
    env = os.environ.get("WASMGATE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "wasmgate"


def _env_seconds(name: str, default: float) -> float:
    value = os.environ.get(name)
    return parse_duration(value) if value else default


@dataclass
class CacheEntry:
    url: str
    checksum: str
    """OCI manifest digest (hex), or the module's sha256 for http."""
    module_sha256: str
    revisions: dict[str, str] = field(default_factory=dict)
    """Resource name -> its revision when it last pulled or used this url."""
    last_used: float = 0.0
    size: int = 0

    @classmethod
    def from_json(cls, url: str, raw: dict[str, Any]) -> CacheEntry:
        return cls(url=url, checksum=str(raw["checksum"]), module_sha256=str(raw["module_sha256"]),
                   revisions={str(k): str(v) for k, v in dict(raw.get("revisions", {})).items()},
                   last_used=float(raw.get("last_used", 0.0)), size=int(raw.get("size", 0)))

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        del data["url"]
        return data


@dataclass
class Index:
    entries: dict[str, CacheEntry] = field(default_factory=dict)
    modules: dict[str, float] = field(default_factory=dict)
    """Module sha256 -> last use."""
    digests: dict[str, str] = field(default_factory=dict)
    """Checksum (OCI manifest digest) -> module sha256, where they differ."""
    last_purge: float = 0.0

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Index:
        entries = {url: CacheEntry.from_json(url, e) for url, e in raw["entries"].items()}
        modules = {str(k): float(v) for k, v in dict(raw.get("modules", {})).items()}
        for e in entries.values():  # an index without modules (or a torn merge): rebuild
            modules[e.module_sha256] = max(modules.get(e.module_sha256, 0.0), e.last_used)
        digests = {str(k): str(v) for k, v in dict(raw.get("digests", {})).items()}
        return cls(entries, modules, digests, float(raw.get("last_purge", 0.0)))

    def to_json(self) -> dict[str, Any]:
        return {"version": INDEX_VERSION, "last_purge": self.last_purge,
                "entries": {url: e.to_json() for url, e in sorted(self.entries.items())},
                "modules": dict(sorted(self.modules.items())),
                "digests": dict(sorted(self.digests.items()))}

    def forget_modules(self, shas: set[str]) -> None:
        self.entries = {u: e for u, e in self.entries.items() if e.module_sha256 not in shas}
        self.modules = {m: t for m, t in self.modules.items() if m not in shas}
        self.digests = {d: m for d, m in self.digests.items() if m not in shas}


class ModuleCache:
    """Content-addressed modules plus a persistent url index; safe across processes."""

    def __init__(self, root: Path | str | None = None, *, expiry: float | None = None,
                 purge_interval: float | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.root = Path(root) if root else default_cache_root()
        self.modules_dir = self.root / "modules"
        self.compiled_dir = self.root / "compiled"
        self.index_path = self.root / "index.json"
        self.lock_path = self.root / "index.lock"
        self.expiry = _env_seconds("WASM_MODULE_EXPIRY", DEFAULT_EXPIRY) if expiry is None \
            else expiry
        self.purge_interval = (_env_seconds("WASM_PURGE_INTERVAL", DEFAULT_PURGE_INTERVAL)
                               if purge_interval is None else purge_interval)
        self.clock = clock
        self.module_count = 0
        """Distinct modules in the index at the last read (for `wasm_cache_entries`)."""

    # -- reading -------------------------------------------------------------------------------

    def load_index(self) -> Index:
        """The index as on disk now (no lock needed: it is replaced atomically)."""
        try:
            index = Index.from_json(json.loads(self.index_path.read_text()))
        except FileNotFoundError:
            index = Index()
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("module cache index %s unreadable (%s); starting afresh",
                        self.index_path, exc)
            index = Index()
        self.module_count = len(index.modules)
        return index

    def entry(self, url: str) -> CacheEntry | None:
        return self.load_index().entries.get(url)

    def entries(self) -> list[CacheEntry]:
        return sorted(self.load_index().entries.values(), key=lambda e: e.url)

    def module_path(self, sha256: str) -> Path:
        return self.modules_dir / f"{sha256}.wasm"

    def read_module(self, sha256: str) -> bytes | None:
        """The module with this sha256, verified; None when absent or corrupt (then removed)."""
        path = self.module_path(sha256)
        try:
            data = path.read_bytes()
        except OSError:
            return None
        if hashlib.sha256(data).hexdigest() != sha256:
            log.warning("cached module %s is corrupt; removing it", path)
            path.unlink(missing_ok=True)
            return None
        return data

    def module_for_checksum(self, checksum: str, index: Index | None = None) -> str | None:
        """The sha256 of a cached module whose checksum is `checksum` (an http file hash is its
        own module name; an OCI manifest digest is looked up in the index), if on disk."""
        if self.module_path(checksum).is_file():
            return checksum
        index = index or self.load_index()
        module = index.digests.get(checksum)
        return module if module and self.module_path(module).is_file() else None

    # -- writing -------------------------------------------------------------------------------

    def store_module(self, wasm: bytes) -> str:
        """Write the module under its sha256 (atomic; skipped when already there)."""
        sha = hashlib.sha256(wasm).hexdigest()
        path = self.module_path(sha)
        if path.is_file() and path.stat().st_size == len(wasm):
            return sha
        self.modules_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(path, wasm)
        return sha

    def record(self, url: str, *, checksum: str, module_sha256: str, size: int,
               resource_name: str = "", revision: str = "") -> CacheEntry:
        """Remember that `url` gave this module (a pull or a cache hit) and refresh its use."""
        with self.locked() as index:
            entry = index.entries.get(url)
            if entry is None:  # other resources' revisions stay when a tag moves (as Istio)
                entry = index.entries[url] = CacheEntry(url, checksum, module_sha256)
            entry.checksum, entry.module_sha256, entry.size = checksum, module_sha256, size
            entry.revisions[resource_name] = revision
            entry.last_used = index.modules[module_sha256] = self.clock()
            if checksum != module_sha256:
                index.digests[checksum] = module_sha256
            return entry

    def store(self, url: str, wasm: bytes, *, checksum: str, resource_name: str = "",
              revision: str = "") -> CacheEntry:
        sha = self.store_module(wasm)
        return self.record(url, checksum=checksum, module_sha256=sha, size=len(wasm),
                           resource_name=resource_name, revision=revision)

    @contextlib.contextmanager
    def locked(self) -> Iterator[Index]:
        """The index under an exclusive flock, re-read from disk; written back on exit."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            index = self.load_index()
            yield index
            self._write_index(index)
        finally:
            os.close(fd)  # releases the flock

    def _write_index(self, index: Index) -> None:
        atomic_write(self.index_path, json.dumps(index.to_json(), indent=1).encode())
        self.module_count = len(index.modules)

    # -- expiry --------------------------------------------------------------------------------

    def purge(self, *, older_than: float | None = None, everything: bool = False) -> list[str]:
        """Forget modules and urls unused for `older_than` seconds (default: the expiry) and
        delete the modules' files with their compiled code. Returns the deleted sha256s.

        An unreferenced module younger than the cutoff is kept: another process may have just
        written it and not yet recorded it."""
        now = self.clock()
        cutoff = now - (self.expiry if older_than is None else older_than)
        with self.locked() as index:
            index.forget_modules({m for m, used in index.modules.items()
                                  if everything or used < cutoff})
            index.entries = {u: e for u, e in index.entries.items() if e.last_used >= cutoff}
            index.last_purge = now
            referenced = set(index.modules)
            removed = self._delete_unreferenced(referenced, None if everything else cutoff)
        if removed:
            log.info("module cache: purged %d module(s)", len(removed))
        return removed

    def maybe_purge(self) -> list[str]:
        """`purge()` if no process of this cache purged within `purge_interval` (call often)."""
        if self.clock() - self.load_index().last_purge < self.purge_interval:
            return []
        return self.purge()

    def _delete_unreferenced(self, referenced: set[str], cutoff: float | None) -> list[str]:
        removed: list[str] = []
        if not self.modules_dir.is_dir():
            return removed
        for path in self.modules_dir.iterdir():
            if path.name.endswith(".tmp"):
                _remove_stale_temp(path, self.clock())
                continue
            sha = path.name.removesuffix(".wasm")
            if path.suffix != ".wasm" or sha in referenced:
                continue
            if cutoff is not None and _mtime(path) >= cutoff:
                continue
            path.unlink(missing_ok=True)
            self._delete_compiled(sha)
            removed.append(sha)
        return removed

    def _delete_compiled(self, sha: str) -> None:
        if not self.compiled_dir.is_dir():
            return
        for pattern in (f"{sha}-*.cwasm", f"{sha}-*.cwasm.sha256"):
            for path in self.compiled_dir.glob(pattern):
                path.unlink(missing_ok=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _remove_stale_temp(path: Path, now: float) -> None:
    if now - _mtime(path) > _STALE_TEMP:
        path.unlink(missing_ok=True)


def atomic_write(path: Path, data: bytes) -> None:
    """Write via a temp file in the same directory, fsync, rename (readers never see a part)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
