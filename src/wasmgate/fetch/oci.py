"""Wasm modules from OCI registries: a small registry v2 client on httpx.

Not ``oras`` (0.2.43 evaluated): it adds ``requests`` + ``jsonschema``; ``get_manifest`` returns
parsed JSON (no bytes, so no manifest digest), ``download_blob`` never checks digests; no index
platform choice, size cap, progress, plain-HTTP fallback or bearer-``realm`` guard; its retry
decorator sleeps 3 + 3**n s on any error (a stopped registry blocks a pull for minutes). It does
anonymous tokens, Basic and a custom CA, but what we need on top is most of a client.

As Istio's fetcher (go-containerregistry): docker reference rules; index -> linux/amd64, else
the only entry; checksum = the chosen manifest's digest; ``WASM_INSECURE_REGISTRIES`` and
localhost registries may use plain HTTP; the SSRF realm guard is in :mod:`.credentials`, the
image formats in :mod:`.images`. Every manifest and blob is checked against its digest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from ..api.urls import SHA256_HEX
from . import credentials as cr
from . import errors as err
from .credentials import Credentials, check_realm, is_insecure_registry

DEFAULT_MAX_SIZE = 256 * 1024 * 1024
DEFAULT_TIMEOUT = 30.0
MANIFEST_MAX = 4 * 1024 * 1024  # as go-containerregistry's manifest limit
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MANIFEST_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST)
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
DOCKER_HUB = "index.docker.io"
Progress = Callable[[int, int], None]
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*$")
_TAG = re.compile(r"^\w[\w.-]{0,127}$")
_PARAM = re.compile(r'(\w+)=(?:"([^"]*)"|([^,\s]*))')


@dataclass(frozen=True)
class Reference:
    """``registry/repository[:tag][@sha256:...]``; ``registry`` is the API host[:port]."""

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def reference(self) -> str:
        return self.digest or self.tag or "latest"

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    def __str__(self) -> str:
        return self.name + (f":{self.tag}" if self.tag else "") + (
            f"@{self.digest}" if self.digest else "")


@dataclass(frozen=True)
class PulledImage:
    wasm: bytes
    manifest_digest: str
    format: str
    ref: str
    index_digest: str | None = None  # the index it was chosen from, if any


@dataclass(frozen=True)
class Manifest:
    raw: bytes
    media_type: str
    digest: str
    data: dict[str, Any]


def parse_reference(ref: str) -> Reference:
    """Parse ``oci://host[:port]/repo[:tag][@sha256:hex]`` or a scheme-less docker reference."""
    raw = ref.strip()
    if raw[:6].lower() == "oci://":
        raw = raw[6:]
    elif "://" in raw:
        raise err.FetchError(f"{ref}: not an OCI reference (expected oci:// or no scheme)")
    name, _, digest = raw.partition("@")
    digest = normalize_digest(digest, ref) if digest else None
    tag = None
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = name.rsplit(":", 1)
        if not _TAG.match(tag):
            raise err.FetchError(f"{ref}: invalid tag {tag!r}")
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        registry, repository = first.lower(), rest
    else:
        registry, repository = "docker.io", name
    if registry in ("docker.io", "index.docker.io", "registry-1.docker.io"):
        registry = DOCKER_HUB
        if "/" not in repository:
            repository = f"library/{repository}"
    if not _REPO.match(repository):
        raise err.FetchError(f"{ref}: invalid repository name {repository!r}")
    return Reference(registry, repository, tag if tag or digest else "latest", digest)


def normalize_digest(value: str, subject: str = "digest") -> str:
    """``sha256:<hex>`` from ``sha256:<hex>`` or bare hex; anything else is a FetchError."""
    hexpart = value[7:] if value.startswith("sha256:") else value
    if not SHA256_HEX.match(hexpart):
        raise err.FetchError(f"{subject}: {value!r} is not a sha256 digest")
    return f"sha256:{hexpart}"


def parse_challenge(value: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="...",service="..."`` -> ("bearer", {realm, service, ...})."""
    scheme, _, rest = value.strip().partition(" ")
    params = {m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
              for m in _PARAM.finditer(rest)}
    return scheme.lower(), params


class RegistryClient:
    """One registry: scheme discovery, auth (bearer tokens per scope, Basic), digest checks."""

    def __init__(self, registry: str, credentials: Credentials | None = None, *,
                 insecure: bool | None = None, ca_file: str | os.PathLike[str] | None = None,
                 timeout: float = DEFAULT_TIMEOUT, max_size: int = DEFAULT_MAX_SIZE,
                 resolve: cr.Resolver | None = None) -> None:
        self.registry = registry
        self.credentials = credentials or Credentials()
        self.insecure = is_insecure_registry(registry) if insecure is None else insecure
        self.max_size = max_size
        self._resolve = resolve or cr.resolve_host  # looked up late: tests replace it
        plain_ok = self.insecure or cr.is_loopback_host(cr.host_of(registry))
        self._schemes = ["https", "http"] if plain_ok else ["https"]
        self._base: str | None = None
        self._tokens: dict[str, str] = {}
        self._use_basic = False
        verify: ssl.SSLContext | bool = True
        if self.insecure:
            verify = False
        elif ca_file:
            verify = ssl.create_default_context(cafile=os.fspath(ca_file))
        self._http = httpx.Client(verify=verify, timeout=timeout, follow_redirects=True,
                                  headers={"User-Agent": "wasmgate"})

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.close()

    def request(self, method: str, path: str, *, scope: str, stream: bool = False,
                **kwargs: Any) -> httpx.Response:
        """Send with auth; a 401 triggers one authentication and one retry."""
        response = self._send(method, path, scope, stream, kwargs)
        if response.status_code == 401:
            challenge = response.headers.get("www-authenticate", "")
            response.close()
            self._authenticate(challenge, scope)
            response = self._send(method, path, scope, stream, kwargs)
            if response.status_code == 401:
                response.close()
                raise err.AuthError(f"{self.registry}: authentication failed "
                                f"({self._who()}) for {method} {path}")
        if response.status_code == 403:
            response.close()
            raise err.AuthError(f"{self.registry}: denied ({self._who()}) for {method} {path}")
        return response

    def _who(self) -> str:
        if self.credentials.username:
            return f"as user {self.credentials.username!r}"
        return "anonymous" if self.credentials.anonymous else "with a token"

    def _send(self, method: str, path: str, scope: str, stream: bool,
              kwargs: dict[str, Any]) -> httpx.Response:
        bases = [self._base] if self._base else [f"{s}://{self.registry}" for s in self._schemes]
        error: Exception | None = None
        for base in bases:
            url = path if "://" in path else base + path
            headers = dict(kwargs.get("headers") or {})
            if urlsplit(url).netloc == self.registry:  # never hand credentials elsewhere
                if scope in self._tokens:
                    headers["Authorization"] = f"Bearer {self._tokens[scope]}"
                elif self._use_basic:
                    headers["Authorization"] = self.credentials.basic_header()
            request = self._http.build_request(method, url, **{**kwargs, "headers": headers})
            try:
                response = self._http.send(request, stream=stream)
            except httpx.TimeoutException:
                raise err.RegistryUnreachable(f"{self.registry}: timed out: {path}") from None
            except (httpx.ConnectError, httpx.RemoteProtocolError) as exc:
                error = exc
                if "CERTIFICATE_VERIFY_FAILED" in str(exc):
                    raise err.RegistryUnreachable(f"{self.registry}: TLS certificate not trusted "
                                              f"({_reason(exc)})") from None
                continue
            except httpx.HTTPError as exc:
                raise err.RegistryUnreachable(f"{self.registry}: {_reason(exc)}") from None
            self._base = self._base or base
            return response
        raise err.RegistryUnreachable(f"{self.registry}: cannot connect: {_reason(error)}")

    def _authenticate(self, challenge: str, scope: str) -> None:
        scheme, params = parse_challenge(challenge)
        if scheme == "basic":
            if not self.credentials.has_basic:
                raise err.AuthError(f"{self.registry}: authentication required and no credentials "
                                "were given")
            if self._use_basic:
                raise err.AuthError(f"{self.registry}: authentication failed ({self._who()})")
            self._use_basic = True
            return
        if scheme != "bearer" or not params.get("realm"):
            raise err.AuthError(f"{self.registry}: unsupported authentication challenge {scheme!r}")
        realm = params["realm"]
        check_realm(realm, self.registry, self._resolve)
        creds = self.credentials
        if creds.registry_token:
            self._tokens[scope] = creds.registry_token
            return
        query = {k: v for k, v in (("service", params.get("service")),
                                   ("scope", params.get("scope") or scope)) if v}
        try:
            if creds.identity_token:
                form = {**query, "grant_type": "refresh_token", "client_id": "wasmgate",
                        "refresh_token": creds.identity_token}
                reply = self._http.post(realm, data=form, follow_redirects=False)
            else:
                headers = {"Authorization": creds.basic_header()} if creds.has_basic else {}
                reply = self._http.get(realm, params=query, headers=headers,
                                       follow_redirects=False)
        except httpx.HTTPError as exc:
            raise err.RegistryUnreachable(f"{self.registry}: token service {realm}: "
                                      f"{_reason(exc)}") from None
        if reply.status_code in (401, 403):
            raise err.AuthError(f"{self.registry}: token service {realm} refused ({self._who()})")
        if reply.status_code != 200:
            raise err.RegistryError(f"{self.registry}: token service {realm} answered "
                                f"{reply.status_code}", reply.status_code)
        try:
            body = reply.json()
            token = body.get("token") or body.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise err.RegistryError(f"{self.registry}: token service {realm} gave no token")
        self._tokens[scope] = token

    def check(self, response: httpx.Response, what: str) -> None:
        """Map an error status to the exception family (401/403 are handled in request)."""
        if response.status_code < 400:
            return
        response.read()
        detail = _registry_errors(response)
        response.close()
        if response.status_code == 404:
            raise err.NotFound(f"{self.registry}: {what} not found{detail}")
        raise err.RegistryError(f"{self.registry}: {what}: HTTP {response.status_code}{detail}",
                            response.status_code)

    def read_capped(self, response: httpx.Response, limit: int, what: str,
                    progress: Progress | None = None, total: int = 0) -> tuple[bytes, str]:
        """The body (at most ``limit`` bytes) and its ``sha256:`` digest."""
        digest, chunks, done = hashlib.sha256(), [], 0
        try:
            for chunk in response.iter_bytes():
                done += len(chunk)
                if done > limit:
                    raise err.FetchError(f"{self.registry}: {what} exceeds the size cap of "
                                     f"{limit} bytes")
                digest.update(chunk)
                chunks.append(chunk)
                if progress:
                    progress(done, max(total, done))
        except httpx.HTTPError as exc:
            raise err.RegistryUnreachable(f"{self.registry}: {what}: {_reason(exc)}") from None
        finally:
            response.close()
        return b"".join(chunks), f"sha256:{digest.hexdigest()}"

    def get_manifest(self, repository: str, reference: str) -> Manifest:
        what = f"manifest {repository}:{reference}"
        response = self.request("GET", f"/v2/{repository}/manifests/{reference}",
                                scope=f"repository:{repository}:pull", stream=True,
                                headers={"Accept": ", ".join(MANIFEST_TYPES)})
        self.check(response, what)
        raw, digest = self.read_capped(response, MANIFEST_MAX, what)
        if reference.startswith("sha256:") and digest != reference:
            raise err.DigestMismatch(f"{self.registry}/{repository} manifest", reference, digest)
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise err.RegistryError(f"{self.registry}: {what} is not a JSON object")
        media = data.get("mediaType") or response.headers.get("content-type", "")
        return Manifest(raw, str(media).split(";")[0].strip(), digest, data)

    def get_blob(self, repository: str, descriptor: dict[str, Any],
                 progress: Progress | None = None) -> bytes:
        digest = normalize_digest(str(descriptor.get("digest", "")), "layer descriptor")
        size = int(descriptor.get("size") or 0)
        if size > self.max_size:
            raise err.FetchError(f"{self.registry}: blob {digest} is {size} bytes, over the size "
                             f"cap of {self.max_size}")
        what = f"blob {digest} of {repository}"
        response = self.request("GET", f"/v2/{repository}/blobs/{digest}",
                                scope=f"repository:{repository}:pull", stream=True)
        self.check(response, what)
        data, actual = self.read_capped(response, self.max_size, what, progress, size)
        if actual != digest:
            raise err.DigestMismatch(f"{self.registry}/{repository} blob", digest, actual)
        return data


def _registry_errors(response: httpx.Response) -> str:
    try:
        errors = response.json().get("errors") or []
        text = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors[:3])
    except (ValueError, AttributeError):
        return ""
    return f" ({text[:300]})" if text else ""


def _reason(exc: BaseException | None) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 300 else text[:300] + "..."


def _client(ref: Reference, credentials: Any, insecure: bool | None,
            ca_file: str | os.PathLike[str] | None, timeout: float,
            max_size: int) -> RegistryClient:
    lookup = "docker.io" if ref.registry == DOCKER_HUB else ref.registry
    return RegistryClient(ref.registry, cr.credentials_for(lookup, credentials), insecure=insecure,
                          ca_file=ca_file, timeout=timeout, max_size=max_size)


def _pin_matches(expected: str | None, ref: str, *digests: str) -> None:
    if expected:
        want = normalize_digest(expected, f"{ref}: expected digest")
        if want not in digests:
            raise err.DigestMismatch(f"image {ref}", want, digests[0])


def resolve_digest(ref: str, *, credentials: Any = None, insecure: bool | None = None,
                   ca_file: str | os.PathLike[str] | None = None,
                   timeout: float = DEFAULT_TIMEOUT) -> str:
    """The digest of the manifest ``pull`` would use, without downloading layers."""
    from .images import choose_manifest

    parsed = parse_reference(ref)
    with _client(parsed, credentials, insecure, ca_file, timeout, DEFAULT_MAX_SIZE) as client:
        top = client.get_manifest(parsed.repository, parsed.reference)
        if top.media_type not in INDEX_TYPES:
            return top.digest
        return normalize_digest(str(choose_manifest(top.data, ref)["digest"]), ref)


def pull(ref: str, *, credentials: Any = None, insecure: bool | None = None,
         ca_file: str | os.PathLike[str] | None = None, expected_digest: str | None = None,
         progress: Progress | None = None, timeout: float = DEFAULT_TIMEOUT,
         max_size: int = DEFAULT_MAX_SIZE) -> PulledImage:
    """Fetch ``ref`` and extract its Wasm module, checking every digest on the way.

    ``credentials``: as :func:`credentials.credentials_for`. ``expected_digest`` pins the chosen
    manifest (an index's digest is accepted too: it commits to the chosen manifest).
    """
    from .images import choose_manifest, extract_wasm

    parsed = parse_reference(ref)
    with _client(parsed, credentials, insecure, ca_file, timeout, max_size) as client:
        chosen = top = client.get_manifest(parsed.repository, parsed.reference)
        if top.media_type in INDEX_TYPES:
            entry = choose_manifest(top.data, ref)
            chosen = client.get_manifest(parsed.repository, normalize_digest(entry["digest"]))
            if chosen.media_type in INDEX_TYPES:
                raise err.NotWasm(f"{ref}: nested image indexes are not supported")
        _pin_matches(expected_digest, ref, chosen.digest, top.digest)
        wasm, fmt = extract_wasm(chosen.data, chosen.media_type,
                                 lambda desc: client.get_blob(parsed.repository, desc, progress),
                                 subject=ref, max_size=max_size)
    return PulledImage(wasm, chosen.digest, fmt, str(parsed),
                       top.digest if top is not chosen else None)

