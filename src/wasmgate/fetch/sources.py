"""Module sources. `file://` and plain paths read the file and check the result is Wasm.

Remote sources (http(s)://, oci://) are not implemented yet: asking for one is a FetchError
that names the url, so the gateway stands the plugin in per its failStrategy and says why in
/plugins instead of refusing to start.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from urllib.parse import unquote, urlsplit

WASM_MAGIC = b"\0asm"


class FetchError(Exception):
    """A module could not be obtained; the message names the url and the reason."""


def fetch_module(url: str, sha256: str | None = None) -> bytes:
    """The module's bytes, verified against `sha256` when given (file hash)."""
    scheme = urlsplit(url).scheme if "://" in url else ""
    if scheme in ("", "file"):
        data = _read_file(url)
    else:
        raise FetchError(f"{url}: fetching {scheme}:// modules is not supported yet")
    if len(data) < 8 or not data.startswith(WASM_MAGIC):
        raise FetchError(f"{url}: fetched Wasm binary is invalid (no \\0asm header)")
    if sha256:
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256:
            raise FetchError(f"module downloaded from {url} has checksum {actual}, "
                             f"which does not match: {sha256}")
    return data


def _read_file(url: str) -> bytes:
    path = Path(unquote(url[len("file://"):]) if url.startswith("file://") else url)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise FetchError(f"{url}: cannot read {path}: {exc.strerror}") from exc
