"""Module sources: `file://` and plain paths here; http(s):// and oci:// through the fetcher.

`fetch_module(url, sha256)` is the simple entry point the gateway and the ASGI middleware use:
files are read and checked here; remote urls go through a process-wide `ModuleFetcher` (the
on-disk cache, Istio's pull policy for an unspecified policy). Every failure is a FetchError that
names the url, so the gateway stands the plugin in per its failStrategy and says why in /plugins.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    from .fetcher import ModuleFetcher

try:  # the error family lives in errors.py; keep one FetchError class when it is there
    from .errors import FetchError
except ImportError:  # pragma: no cover - only before errors.py exists

    class FetchError(Exception):  # type: ignore[no-redef]
        """A module could not be obtained; the message names the url and the reason."""


WASM_MAGIC = b"\0asm"
REMOTE_SCHEMES = frozenset({"http", "https", "oci"})
_FALLBACK_ERRORS: dict[str, type[FetchError]] = {}
_DEFAULT: list[ModuleFetcher] = []
_DEFAULT_LOCK = threading.Lock()


def fetch_error(kind: str, message: str) -> FetchError:
    """An instance of `errors.<kind>` (DigestMismatch, NotWasm, NotFound, ...), else a FetchError
    subclass of that name, so callers can raise the precise kind whichever modules exist."""
    try:
        from . import errors

        cls = getattr(errors, kind)
    except (ImportError, AttributeError):
        cls = _FALLBACK_ERRORS.setdefault(kind, type(kind, (FetchError,), {}))
    return cls(message)  # type: ignore[no-any-return]


def url_scheme(url: str) -> str:
    """`file` for file:// urls and plain paths, else the lowercased scheme."""
    if "://" not in url:
        return "file"
    return urlsplit(url).scheme.lower() or "file"


def fetch_module(url: str, sha256: str | None = None) -> bytes:
    """The module's bytes, verified against `sha256` when given (file hash, or OCI manifest
    digest for oci:// urls)."""
    scheme = url_scheme(url)
    if scheme in REMOTE_SCHEMES:
        return default_fetcher().fetch(url, sha256=sha256).wasm
    if scheme != "file":
        raise FetchError(f"{url}: fetching {scheme}:// modules is not supported")
    return read_file_module(url, sha256)


def read_file_module(url: str, sha256: str | None = None) -> bytes:
    """A local module: read, checked to be Wasm, verified against `sha256` when given."""
    data = _read_file(url)
    check_wasm(data, url)
    if sha256:
        check_sha256(data, url, sha256)
    return data


def check_wasm(data: bytes, url: str) -> None:
    if len(data) < 8 or not data.startswith(WASM_MAGIC):
        raise fetch_error("NotWasm", f"fetched Wasm binary from {url} is invalid "
                                     "(no \\0asm header)")


def check_sha256(data: bytes, url: str, expected: str) -> str:
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise mismatch(url, actual, expected)
    return actual


def mismatch(url: str, actual: str, expected: str) -> FetchError:
    """A DigestMismatch with Istio's wording, naming both digests."""
    message = f"module downloaded from {url} has checksum {actual}, which does not match: " \
              f"{expected}"
    try:
        from .errors import DigestMismatch
    except ImportError:  # pragma: no cover - only before errors.py exists
        return fetch_error("DigestMismatch", message)
    exc = DigestMismatch(url, expected, actual)
    exc.args = (message,)
    return exc


def default_fetcher() -> ModuleFetcher:
    """The process-wide fetcher over the default cache (`WASMGATE_CACHE_DIR` or ~/.cache)."""
    with _DEFAULT_LOCK:
        if not _DEFAULT:
            from .cache import ModuleCache
            from .fetcher import ModuleFetcher

            _DEFAULT.append(ModuleFetcher(ModuleCache()))
        return _DEFAULT[0]


def _read_file(url: str) -> bytes:
    path = Path(unquote(url[len("file://"):]) if url.startswith("file://") else url)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise FetchError(f"{url}: cannot read {path}: {exc.strerror}") from exc
