"""`ModuleFetcher`: Istio's cache.Get (spec §3.4-3.6) over the on-disk `ModuleCache`.

Policy, as Istio's agent applies it:
- A known checksum (`sha256`, an oci url's `@sha256:`, or the url's remembered checksum when the
  policy lets us trust it) means a cached module with that checksum is used, whatever the policy.
- IfNotPresent trusts the remembered url -> checksum; Always trusts it only while this resource's
  revision is the one it had when it last pulled or used the url, i.e. Always re-pulls when the
  WasmPlugin changes, not on every call. Unspecified = Always for `oci://...:latest`, else
  IfNotPresent.
- OCI: the manifest digest is resolved first and the cache checked for it before any layer is
  downloaded. A pinned checksum that differs is a DigestMismatch naming both digests.

Better than Istio: http urls remember their checksum too (Istio re-downloads them on every
load); the index survives restarts; a revision is recorded only once a fetch succeeded, so a
failed re-pull under Always is retried rather than silently served from the cache; a full disk
degrades to serving the downloaded module uncached.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, Literal

from .cache import Index, ModuleCache
from .http import HttpFetcher, Progress, redact_url
from .metrics import FetchMetrics
from .sources import REMOTE_SCHEMES, FetchError, mismatch, read_file_module, url_scheme

if TYPE_CHECKING:
    from ..api.resources import WasmPlugin

log = logging.getLogger("wasmgate.fetch")

PullPolicy = Literal["IfNotPresent", "Always"]
Source = Literal["cache", "remote", "file"]
_OCI_DIGEST = re.compile(r"@sha256:([a-f0-9]{64})$")


@dataclass(frozen=True)
class FetchResult:
    wasm: bytes
    module_sha256: str
    checksum: str
    """What the cache keys on: the OCI manifest digest, else the module's sha256 (hex)."""
    source: Source
    url: str

    def __repr__(self) -> str:
        return (f"FetchResult(url={redact_url(self.url)!r}, source={self.source!r}, "
                f"module_sha256={self.module_sha256[:12]}, size={len(self.wasm)})")


def effective_policy(policy: str | Enum | None, url: str) -> PullPolicy:
    """An explicit policy wins; unspecified means Always only for an oci url ending `:latest`."""
    value = str(policy.value if isinstance(policy, Enum) else policy or "")
    if value in ("IfNotPresent", "Always"):
        return value  # type: ignore[return-value]
    if url_scheme(url) == "oci" and url.split("?", 1)[0].endswith(":latest"):
        return "Always"
    return "IfNotPresent"


def url_digest(url: str) -> str | None:
    """The hex digest of an `oci://...@sha256:<hex>` url."""
    match = _OCI_DIGEST.search(url) if url_scheme(url) == "oci" else None
    return match.group(1) if match else None


def _hex(digest: str) -> str:
    return digest.removeprefix("sha256:")


class ModuleFetcher:
    """Fetches modules from files, http(s) and OCI registries through the cache."""

    def __init__(self, cache: ModuleCache | None = None, *, metrics: FetchMetrics | None = None,
                 http: HttpFetcher | None = None) -> None:
        self.cache = cache or ModuleCache()
        self.metrics = metrics or FetchMetrics()
        self.http = http or HttpFetcher()
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self.cache.load_index()
        self.metrics.set_cache_entries(self.cache.module_count)

    def purge(self) -> list[str]:
        """Expire unused modules now (the gateway calls this every `WASM_PURGE_INTERVAL`)."""
        removed = self.cache.purge()
        self.metrics.set_cache_entries(self.cache.module_count)
        return removed

    def fetch_plugin(self, plugin: WasmPlugin, **kwargs: Any) -> FetchResult:
        """`fetch` with everything a WasmPlugin says about its module."""
        return self.fetch(plugin.resolved_url(), sha256=plugin.pinned_sha256(),
                          pull_policy=plugin.pull_policy_effective(),
                          pull_secret=plugin.spec.image_pull_secret,
                          resource_name=plugin.filter_name, revision=plugin.revision(), **kwargs)

    def fetch(self, url: str, *, sha256: str | None = None,
              pull_policy: str | Enum | None = None, pull_secret: Any = None,
              resource_name: str = "", revision: str = "", insecure: bool | None = None,
              ca_file: str | None = None, progress: Progress | None = None,
              force: bool = False) -> FetchResult:
        """The module at `url`, from the cache when the policy allows.

        `force` trusts no remembered checksum (`wasmgate pull`); a pinned one still hits."""
        scheme = url_scheme(url)
        if scheme == "file":
            wasm = read_file_module(url, sha256)
            digest = hashlib.sha256(wasm).hexdigest()
            return FetchResult(wasm, digest, digest, "file", url)
        if scheme not in REMOTE_SCHEMES:
            raise FetchError(f"{redact_url(url)}: fetching {scheme}:// modules is not supported")
        pinned = _hex(sha256.strip().lower()) if sha256 else url_digest(url)
        request = _Request(url, redact_url(url), pinned,
                           effective_policy(pull_policy, url), resource_name, revision)
        with self._lock_for(request.key):
            hit = self._lookup(request, force)
            if hit is not None:
                return hit
            if scheme == "oci":
                return self._fetch_oci(request, pull_secret, insecure, ca_file, progress)
            return self._fetch_http(request, insecure, ca_file, progress)

    # -- cache ---------------------------------------------------------------------------------

    def _lookup(self, request: _Request, force: bool) -> FetchResult | None:
        index = self.cache.load_index()
        known = request.pinned
        entry = index.entries.get(request.key)
        if known is None and entry is not None and not force:
            trusted = (request.policy == "IfNotPresent"
                       or entry.revisions.get(request.resource_name) == request.revision)
            known = entry.checksum if trusted else None
        hit = self._from_cache(request, known, index) if known else None
        self.metrics.lookup(hit is not None)
        return hit

    def _from_cache(self, request: _Request, checksum: str,
                    index: Index | None = None) -> FetchResult | None:
        module_sha = self.cache.module_for_checksum(checksum, index)
        wasm = self.cache.read_module(module_sha) if module_sha else None
        if wasm is None or module_sha is None:
            return None
        self._record(request, checksum, module_sha, len(wasm))
        return FetchResult(wasm, module_sha, checksum, "cache", request.url)

    def _record(self, request: _Request, checksum: str, module_sha: str, size: int) -> None:
        try:
            self.cache.record(request.key, checksum=checksum, module_sha256=module_sha, size=size,
                              resource_name=request.resource_name, revision=request.revision)
        except OSError as exc:
            log.warning("module cache %s: cannot update the index: %s", self.cache.root, exc)
        self.metrics.set_cache_entries(self.cache.module_count)

    def _store(self, request: _Request, wasm: bytes, checksum: str) -> FetchResult:
        module_sha = hashlib.sha256(wasm).hexdigest()
        try:
            self.cache.store_module(wasm)
        except OSError as exc:
            log.warning("module cache %s: cannot store %s: %s", self.cache.root, request.shown,
                        exc)
            return FetchResult(wasm, module_sha, checksum, "remote", request.url)
        self._record(request, checksum, module_sha, len(wasm))
        return FetchResult(wasm, module_sha, checksum, "remote", request.url)

    def _lock_for(self, key: str) -> threading.Lock:
        # One download per url at a time in this process; other processes may race, harmlessly.
        with self._locks_guard:
            return self._locks.setdefault(key, threading.Lock())

    # -- http ----------------------------------------------------------------------------------

    def _fetch_http(self, request: _Request, insecure: bool | None, ca_file: str | None,
                    progress: Progress | None) -> FetchResult:
        from .errors import NotWasm

        try:
            wasm = self.http.fetch(request.url, insecure=insecure, ca_file=ca_file,
                                   progress=progress)
        except NotWasm:
            self.metrics.remote_fetch("fetch_failure")
            raise
        except FetchError:
            self.metrics.remote_fetch("download_failure")
            raise
        checksum = hashlib.sha256(wasm).hexdigest()
        self._check_pin(request, checksum)
        self.metrics.remote_fetch("success")
        return self._store(request, wasm, checksum)

    def _check_pin(self, request: _Request, checksum: str) -> None:
        if request.pinned and checksum != request.pinned:
            self.metrics.remote_fetch("checksum_mismatched")
            raise mismatch(request.shown, checksum, request.pinned)

    # -- oci -----------------------------------------------------------------------------------

    def _fetch_oci(self, request: _Request, pull_secret: Any, insecure: bool | None,
                   ca_file: str | None, progress: Progress | None) -> FetchResult:
        from . import oci

        options: dict[str, Any] = {"credentials": pull_secret, "insecure": insecure,
                                   "ca_file": ca_file}
        expected = request.pinned
        if expected is None:  # resolve the tag first: the cache may hold its manifest already
            try:
                expected = _hex(oci.resolve_digest(request.url, **options))
            except FetchError:
                self.metrics.remote_fetch("manifest_failure")
                raise
            hit = self._from_cache(request, expected)
            self.metrics.lookup(hit is not None)
            if hit is not None:
                return hit
        # The registry client checks the digest against the manifest (or the index it came
        # from) before it downloads any layer.
        pulled = self._pull(request, expected, progress, options)
        self.metrics.remote_fetch("success")
        return self._store(request, pulled.wasm, expected)

    def _pull(self, request: _Request, digest: str, progress: Progress | None,
              options: dict[str, Any]) -> Any:
        from . import oci
        from .errors import DigestMismatch, NotWasm

        try:
            return oci.pull(request.url, expected_digest=f"sha256:{digest}", progress=progress,
                            max_size=self.http.options.max_size, **options)
        except DigestMismatch as exc:
            if _hex(exc.expected) != digest:  # a corrupt blob, not a moved or wrong pin
                self.metrics.remote_fetch("download_failure")
                raise
            self.metrics.remote_fetch("checksum_mismatched")
            raise mismatch(request.shown, _hex(exc.actual), digest) from None
        except NotWasm:
            self.metrics.remote_fetch("fetch_failure")
            raise
        except FetchError:
            self.metrics.remote_fetch("download_failure")
            raise


@dataclass(frozen=True)
class _Request:
    url: str
    shown: str
    """The url without credentials: for messages and the cache index key."""
    pinned: str | None
    policy: PullPolicy
    resource_name: str
    revision: str

    @property
    def key(self) -> str:
        return self.shown
