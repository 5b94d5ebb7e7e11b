"""Compiled modules, precompiled to disk and loaded back with `Module.deserialize_file`.

Compiling a 10 MB Go plugin takes ~2.4 s; deserializing its .cwasm (mmap) takes ~0.3 ms. The
key is the wasm's sha256 plus wasmtime's version and the engine settings, so a new wasmtime or
other settings never load stale code. Entries are written atomically (temp file + rename) and
carry a sidecar with the sha256 of the .cwasm bytes: a corrupt or truncated entry fails that
check (or fails to deserialize) and is recompiled, never trusted.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
from pathlib import Path

import wasmtime

from .engine import engine_settings, shared_engine

log = logging.getLogger("wasmgate.runtime.cache")


def default_cache_dir() -> Path:
    env = os.environ.get("WASMGATE_CACHE_DIR")
    base = Path(env) if env else Path.home() / ".cache" / "wasmgate"
    return base / "compiled"


class CompiledModuleCache:
    """sha256 -> compiled `wasmtime.Module`, in memory and (optionally) on disk."""

    def __init__(self, directory: Path | str | None = None, *, on_disk: bool = True) -> None:
        self.directory = Path(directory) if directory else default_cache_dir()
        self.on_disk = on_disk
        self._memory: dict[str, wasmtime.Module] = {}
        self._lock = threading.Lock()
        self.stats = {"memory_hits": 0, "disk_hits": 0, "compiles": 0, "rejected": 0}

    def _paths(self, digest: str) -> tuple[Path, Path]:
        key = hashlib.sha256(engine_settings().cache_key().encode()).hexdigest()[:16]
        stem = self.directory / f"{digest}-{key}"
        return stem.with_suffix(".cwasm"), stem.with_suffix(".cwasm.sha256")

    def get(self, wasm: bytes, digest: str | None = None) -> wasmtime.Module:
        """Return the compiled module for `wasm`, compiling at most once per process and key."""
        digest = digest or hashlib.sha256(wasm).hexdigest()
        with self._lock:
            module = self._memory.get(digest)
            if module is not None:
                self.stats["memory_hits"] += 1
                return module
        module = self._load(digest) if self.on_disk else None
        if module is None:
            module = wasmtime.Module(shared_engine(), wasm)
            self.stats["compiles"] += 1
            if self.on_disk:
                self._store(digest, module)
        with self._lock:
            self._memory[digest] = module
        return module

    def _load(self, digest: str) -> wasmtime.Module | None:
        cwasm, sidecar = self._paths(digest)
        if not cwasm.exists():
            return None
        try:
            expected = sidecar.read_text().strip()
            actual = _file_sha256(cwasm)
            if expected != actual:
                raise ValueError(f"checksum {actual} != recorded {expected}")
            module = wasmtime.Module.deserialize_file(shared_engine(), str(cwasm))
        except Exception as exc:  # corrupt, truncated, stale: recompile
            log.warning("precompiled module %s rejected (%s); recompiling", cwasm, exc)
            self.stats["rejected"] += 1
            for path in (cwasm, sidecar):
                path.unlink(missing_ok=True)
            return None
        self.stats["disk_hits"] += 1
        return module

    def _store(self, digest: str, module: wasmtime.Module) -> None:
        cwasm, sidecar = self._paths(digest)
        try:
            cwasm.parent.mkdir(parents=True, exist_ok=True)
            data = bytes(module.serialize())
            _atomic_write(sidecar, hashlib.sha256(data).hexdigest().encode())
            _atomic_write(cwasm, data)
        except OSError as exc:
            log.warning("cannot write precompiled module %s: %s", cwasm, exc)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
