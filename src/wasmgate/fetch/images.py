"""Wasm OCI images: the four formats, building them, OCI layouts, pushing, and extraction.

Formats (spec section 4):

- ``docker`` (alias ``compat``): Docker v2 manifest, Docker image config, one gzip tar layer with
  ``plugin.wasm`` (what ``docker build`` makes from ``FROM scratch`` + ``COPY plugin.wasm ./``).
- ``oci``: the same as an OCI manifest (``buildah``), annotated
  ``module.wasm.image/variant=compat``.
- ``artifact``: the wasme artifact, two layers: runtime config
  (``application/vnd.module.wasm.config.v1+json``) and the raw module
  (``application/vnd.module.wasm.content.layer.v1+wasm``).
- ``cncf``: the CNCF Wasm artifact, config ``application/vnd.wasm.config.v0+json`` and one
  ``application/wasm`` layer (Istio cannot read it; we can).

Builds are deterministic: tar entries have mtime 0, uid/gid 0, and gzip has mtime 0 and no name,
so the same module gives the same digests (for one zlib).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import FetchError, NotWasm
from .oci import (
    DEFAULT_MAX_SIZE,
    DEFAULT_TIMEOUT,
    DOCKER_LIST,
    DOCKER_MANIFEST,
    INDEX_TYPES,
    OCI_INDEX,
    OCI_MANIFEST,
    RegistryClient,
    normalize_digest,
    parse_reference,
)

WASM_MAGIC = b"\0asm"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
ARTIFACT_CONFIG = "application/vnd.module.wasm.config.v1+json"
ARTIFACT_LAYER = "application/vnd.module.wasm.content.layer.v1+wasm"
CNCF_CONFIG = "application/vnd.wasm.config.v0+json"
CNCF_LAYER = "application/wasm"
GZIP_LAYERS = frozenset({DOCKER_LAYER, OCI_LAYER})
FORMATS = {"oci": "oci", "compat": "docker", "docker": "docker", "artifact": "artifact",
           "cncf": "cncf"}
TITLE = "org.opencontainers.image.title"
REF_NAME = "org.opencontainers.image.ref.name"


@dataclass
class WasmImage:
    """A manifest (or index) and every blob it needs, child manifests included."""

    manifest: bytes
    media_type: str
    blobs: dict[str, bytes] = field(default_factory=dict)
    format: str = ""

    @property
    def digest(self) -> str:
        return digest_of(self.manifest)

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest,
                "size": len(self.manifest), **extra}


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def _add(blobs: dict[str, bytes], data: bytes, media_type: str, **extra: Any) -> dict[str, Any]:
    digest = digest_of(data)
    blobs[digest] = data
    return {"mediaType": media_type, "digest": digest, "size": len(data), **extra}


def plugin_tar(wasm: bytes, name: str = "plugin.wasm") -> bytes:
    """An uncompressed, deterministic tar holding ``wasm`` as ``name``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(wasm), 0o644, 0
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        tar.addfile(info, io.BytesIO(wasm))
    return buffer.getvalue()


def build_image(wasm: bytes, fmt: str = "oci", *, check: bool = True,
                runtime_config: dict[str, Any] | None = None,
                annotations: dict[str, str] | None = None,
                platform: tuple[str, str] = ("linux", "amd64")) -> WasmImage:
    """Build a Wasm image in format ``fmt`` (oci, compat/docker, artifact, cncf)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown image format {fmt!r} (use {', '.join(FORMATS)})")
    if check and not wasm.startswith(WASM_MAGIC):
        raise NotWasm("refusing to build an image from content that is not Wasm")
    kind = FORMATS[fmt]
    blobs: dict[str, bytes] = {}
    manifest: dict[str, Any] = {"schemaVersion": 2}
    if kind in ("oci", "docker"):
        tar = plugin_tar(wasm)
        layer_type = DOCKER_LAYER if kind == "docker" else OCI_LAYER
        layer = _add(blobs, gzip.compress(tar, mtime=0), layer_type)
        os_name, arch = platform
        config = {"architecture": arch, "os": os_name, "config": {},
                  "rootfs": {"type": "layers", "diff_ids": [digest_of(tar)]}}
        media = DOCKER_MANIFEST if kind == "docker" else OCI_MANIFEST
        config_type = DOCKER_CONFIG if kind == "docker" else OCI_CONFIG
        manifest.update(mediaType=media, config=_add(blobs, _canonical(config), config_type),
                        layers=[layer])
        if kind == "oci":
            manifest["annotations"] = {"module.wasm.image/variant": "compat"}
    elif kind == "artifact":
        runtime = _canonical(runtime_config or {"type": "envoy_proxy", "abi_version": "v0.2.1",
                                                "config": {"root_ids": []}})
        config = _add(blobs, runtime, ARTIFACT_CONFIG)
        layers = [_add(blobs, runtime, ARTIFACT_CONFIG, annotations={TITLE: "runtime-config.json"}),
                  _add(blobs, wasm, ARTIFACT_LAYER, annotations={TITLE: "filter.wasm"})]
        manifest.update(mediaType=OCI_MANIFEST, config=config, layers=layers)
    else:
        layer = _add(blobs, wasm, CNCF_LAYER, annotations={TITLE: "plugin.wasm"})
        config = {"architecture": "wasm", "os": "wasip1", "layerDigests": [layer["digest"]]}
        manifest.update(mediaType=OCI_MANIFEST, config=_add(blobs, _canonical(config),
                                                            CNCF_CONFIG), layers=[layer])
    if annotations:
        manifest["annotations"] = {**manifest.get("annotations", {}), **annotations}
    media_type = manifest["mediaType"]
    return WasmImage(_canonical(manifest), media_type, blobs, kind)


def build_index(entries: list[tuple[WasmImage, tuple[str, str]]],
                docker: bool = False) -> WasmImage:
    """An image index (or Docker manifest list) of images for (os, architecture) platforms."""
    blobs: dict[str, bytes] = {}
    manifests = []
    for image, (os_name, arch) in entries:
        blobs.update(image.blobs)
        blobs[image.digest] = image.manifest
        manifests.append(image.descriptor(platform={"os": os_name, "architecture": arch}))
    media = DOCKER_LIST if docker else OCI_INDEX
    index = {"schemaVersion": 2, "mediaType": media, "manifests": manifests}
    return WasmImage(_canonical(index), media, blobs, "index")


# -- OCI image layout -------------------------------------------------------------------------

def write_layout(image: WasmImage, directory: str | os.PathLike[str],
                 tag: str = "latest") -> Path:
    """Write (or add to) an OCI image layout; ``index.json`` names the image ``tag``."""
    root = Path(directory)
    (root / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (root / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    for digest, data in {**image.blobs, image.digest: image.manifest}.items():
        path = root / "blobs" / "sha256" / digest.split(":", 1)[1]
        if not path.exists():
            path.write_bytes(data)
    index_path = root / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {
        "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    index["manifests"] = [m for m in index.get("manifests", [])
                          if (m.get("annotations") or {}).get(REF_NAME) != tag]
    index["manifests"].append(image.descriptor(annotations={REF_NAME: tag}))
    index_path.write_text(json.dumps(index, indent=2))
    return root


def read_layout(directory: str | os.PathLike[str], tag: str | None = None) -> WasmImage:
    """The image named ``tag`` in an OCI layout (the only image when ``tag`` is None)."""
    root = Path(directory)
    index = json.loads((root / "index.json").read_text())
    entries = index.get("manifests") or []
    if tag is not None:
        entries = [m for m in entries if (m.get("annotations") or {}).get(REF_NAME) == tag]
    if len(entries) != 1:
        raise FetchError(f"{root}: expected one image{f' tagged {tag}' if tag else ''} in "
                         f"index.json, found {len(entries)}")

    def blob(digest: str) -> bytes:
        data = (root / "blobs" / "sha256" / normalize_digest(digest)[7:]).read_bytes()
        if digest_of(data) != digest:
            raise FetchError(f"{root}: blob {digest} is corrupt")
        return data

    top = entries[0]
    manifest = blob(top["digest"])
    image = WasmImage(manifest, top.get("mediaType") or json.loads(manifest).get("mediaType"))
    pending = [json.loads(manifest)]
    while pending:
        doc = pending.pop()
        for desc in [doc.get("config") or {}, *(doc.get("layers") or []),
                     *(doc.get("manifests") or [])]:
            if desc.get("digest") and desc["digest"] not in image.blobs:
                image.blobs[desc["digest"]] = blob(desc["digest"])
                if desc.get("mediaType") in (*INDEX_TYPES, OCI_MANIFEST, DOCKER_MANIFEST):
                    pending.append(json.loads(image.blobs[desc["digest"]]))
    return image


# -- pushing ----------------------------------------------------------------------------------

def push(source: WasmImage | str | os.PathLike[str], ref: str, credentials: Any = None, *,
         insecure: bool | None = None, ca_file: str | os.PathLike[str] | None = None,
         layout_tag: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> str:
    """Push a built image or an OCI layout directory to ``ref``; return the manifest digest.

    Blobs go up monolithically (POST then PUT ``?digest=``), skipped when HEAD finds them;
    an index's child manifests are put by digest before the index itself.
    """
    from .credentials import credentials_for

    image = source if isinstance(source, WasmImage) else read_layout(source, layout_tag)
    parsed = parse_reference(ref)
    lookup = "docker.io" if parsed.registry == "index.docker.io" else parsed.registry
    repo = parsed.repository
    scope = f"repository:{repo}:pull,push"
    with RegistryClient(parsed.registry, credentials_for(lookup, credentials),
                        insecure=insecure, ca_file=ca_file, timeout=timeout) as client:
        def put_manifest(data: bytes, media_type: str, reference: str) -> None:
            doc = json.loads(data)
            for child in doc.get("manifests") or []:
                child_data = image.blobs[child["digest"]]
                put_manifest(child_data, child.get("mediaType") or OCI_MANIFEST, child["digest"])
            for desc in [doc.get("config"), *(doc.get("layers") or [])]:
                if desc:
                    _push_blob(client, repo, scope, desc["digest"], image.blobs[desc["digest"]])
            response = client.request("PUT", f"/v2/{repo}/manifests/{reference}", scope=scope,
                                      content=data, headers={"Content-Type": media_type})
            client.check(response, f"manifest {repo}:{reference}")
            response.close()

        put_manifest(image.manifest, image.media_type, parsed.digest or parsed.tag or "latest")
    if parsed.digest and parsed.digest != image.digest:
        raise FetchError(f"{ref}: pushed manifest is {image.digest}")
    return image.digest


def _push_blob(client: RegistryClient, repo: str, scope: str, digest: str, data: bytes) -> None:
    head = client.request("HEAD", f"/v2/{repo}/blobs/{digest}", scope=scope)
    head.close()
    if head.status_code == 200:
        return
    start = client.request("POST", f"/v2/{repo}/blobs/uploads/", scope=scope)
    client.check(start, f"blob upload to {repo}")
    start.close()
    location = start.headers.get("location")
    if not location:
        raise FetchError(f"{client.registry}: blob upload to {repo} gave no Location")
    if "://" not in location:
        location = str(start.request.url.join(location))
    separator = "&" if "?" in location else "?"
    put = client.request("PUT", f"{location}{separator}digest={digest}", scope=scope,
                         content=data, headers={"Content-Type": "application/octet-stream"})
    client.check(put, f"blob {digest} upload to {repo}")
    put.close()


# -- extraction -------------------------------------------------------------------------------

def _gunzip(data: bytes, limit: int) -> bytes:
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise NotWasm(f"layer is not gzip ({exc})") from None
    if len(out) > limit:
        raise FetchError(f"layer expands past the size cap of {limit} bytes")
    return out


def wasm_from_tar(layer: bytes, limit: int = DEFAULT_MAX_SIZE) -> bytes:
    """``plugin.wasm`` (by basename) from a gzip tar layer."""
    try:
        with tarfile.open(fileobj=io.BytesIO(_gunzip(layer, limit)), mode="r:") as tar:
            for member in tar:
                if member.isfile() and os.path.basename(member.name) == "plugin.wasm":
                    handle = tar.extractfile(member)
                    if handle is not None:
                        return handle.read()
    except tarfile.TarError as exc:
        raise NotWasm(f"layer is not a tar archive ({exc})") from None
    raise NotWasm("the last layer has no plugin.wasm")


def choose_manifest(index: dict[str, Any], subject: str) -> dict[str, Any]:
    """An index's linux/amd64 entry, else its only (non-attestation) entry."""
    entries = [e for e in index.get("manifests") or [] if isinstance(e, dict) and e.get("digest")
               and (e.get("annotations") or {}).get("vnd.docker.reference.type")
               != "attestation-manifest"]
    platforms = [(e.get("platform") or {}) for e in entries]
    for entry, platform in zip(entries, platforms, strict=True):
        if platform.get("os") == "linux" and platform.get("architecture") == "amd64":
            return entry
    if len(entries) == 1:
        return entries[0]
    found = ", ".join(f"{p.get('os')}/{p.get('architecture')}" for p in platforms)
    raise NotWasm(f"{subject}: image index has no linux/amd64 entry (has {found})"
                  if found else f"{subject}: image index is empty")


def extract_wasm(manifest: dict[str, Any], media_type: str,
                 fetch: Callable[[dict[str, Any]], bytes], *, subject: str = "image",
                 max_size: int = DEFAULT_MAX_SIZE) -> tuple[bytes, str]:
    """(module, format) from an image manifest; ``fetch`` returns a verified blob."""
    layers = [d for d in manifest.get("layers") or [] if isinstance(d, dict)]
    config_type = (manifest.get("config") or {}).get("mediaType")
    types = [d.get("mediaType") for d in layers]
    if not layers:
        raise NotWasm(f"{subject}: the image has no layers")
    if CNCF_LAYER in types:
        wasm, fmt = fetch(layers[types.index(CNCF_LAYER)]), "cncf"
    elif ARTIFACT_LAYER in types:
        wasm, fmt = fetch(layers[types.index(ARTIFACT_LAYER)]), "artifact"
    elif types[-1] in GZIP_LAYERS:
        fmt = "docker" if media_type == DOCKER_MANIFEST else "oci"
        try:
            wasm = wasm_from_tar(fetch(layers[-1]), max_size)
        except NotWasm as exc:
            raise NotWasm(f"{subject}: {exc}") from None
    else:
        raise NotWasm(f"{subject}: no Wasm in a known format (manifest {media_type}, config "
                      f"{config_type}, layers {', '.join(map(str, types))}): not Docker/OCI "
                      f"compat (last layer not tar+gzip), not a Wasm artifact ({ARTIFACT_LAYER}) "
                      f"nor a CNCF one ({CNCF_LAYER})")
    if len(wasm) < 8 or not wasm.startswith(WASM_MAGIC):
        raise NotWasm(f"{subject}: fetched Wasm binary is invalid (no \\0asm header, "
                      f"{fmt} format)")
    return wasm, fmt


__all__ = [
    "FORMATS",
    "WasmImage",
    "build_image",
    "build_index",
    "choose_manifest",
    "extract_wasm",
    "plugin_tar",
    "push",
    "read_layout",
    "wasm_from_tar",
    "write_layout",
]
