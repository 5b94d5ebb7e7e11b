"""Pulling from and pushing to a real registry (anonymous, plain HTTP): formats, references,
indexes, digests and the failures each has a documented outcome for."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from wasmgate.fetch import images, oci
from wasmgate.fetch.errors import (
    DigestMismatch,
    FetchError,
    NotFound,
    NotWasm,
    RegistryUnreachable,
)
from wasmgate.fetch.images import FORMATS, WasmImage, build_image, build_index, digest_of, push
from wasmgate.fetch.oci import parse_reference, pull, resolve_digest

from .conftest import Registry, make_wasm

pytestmark = pytest.mark.usefixtures("no_docker_config")
EXAMPLE = Path(images.__file__).resolve().parents[1] / "data" / "example.wasm"


def custom_image(layers: list[tuple[str, bytes]], config_type: str = images.OCI_CONFIG,
                 media_type: str = images.OCI_MANIFEST) -> WasmImage:
    """An image with exactly these layers (for content we refuse)."""
    blobs = {digest_of(data): data for _, data in layers}
    config = b"{}"
    blobs[digest_of(config)] = config
    manifest = {"schemaVersion": 2, "mediaType": media_type,
                "config": {"mediaType": config_type, "digest": digest_of(config), "size": 2},
                "layers": [{"mediaType": m, "digest": digest_of(d), "size": len(d)}
                           for m, d in layers]}
    return WasmImage(json.dumps(manifest).encode(), media_type, blobs)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_push_then_pull_every_format(registry: Registry, fmt: str) -> None:
    wasm = make_wasm(fmt)
    image = build_image(wasm, fmt)
    ref = registry.ref(f"formats/{fmt}", "v1")
    assert push(image, ref) == image.digest
    pulled = pull(ref)
    assert pulled.wasm == wasm
    assert pulled.manifest_digest == image.digest
    assert pulled.format == FORMATS[fmt]
    assert pulled.ref == f"{registry.host}/formats/{fmt}:v1"
    assert pulled.index_digest is None
    assert resolve_digest(ref) == image.digest


def test_tags_digests_and_scheme_less_references(registry: Registry) -> None:
    wasm = make_wasm("refs")
    image = build_image(wasm, "oci")
    digest = push(image, registry.ref("refs/plugin", "1.0"))
    push(image, registry.ref("refs/plugin", "latest"))
    for ref in (f"oci://{registry.host}/refs/plugin@{digest}",
                f"{registry.host}/refs/plugin:1.0",
                f"{registry.host}/refs/plugin",  # :latest
                f"oci://{registry.host}/refs/plugin:1.0@{digest}"):
        pulled = pull(ref)
        assert (pulled.wasm, pulled.manifest_digest) == (wasm, digest), ref
    assert pull(f"{registry.host}/refs/plugin@{digest}").ref.endswith(f"@{digest}")


def test_a_real_plugin_with_progress(registry: Registry) -> None:
    wasm = EXAMPLE.read_bytes()
    image = build_image(wasm, "docker")
    ref = registry.ref("real/example", "v1")
    push(image, ref)
    seen: list[tuple[int, int]] = []
    pulled = pull(ref, progress=lambda done, total: seen.append((done, total)))
    assert pulled.wasm == wasm
    layer_size = json.loads(image.manifest)["layers"][0]["size"]
    assert seen and seen[-1] == (layer_size, layer_size)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)


def test_pinned_digest_mismatch_names_both(registry: Registry) -> None:
    image = build_image(make_wasm("pin"), "cncf")
    ref = registry.ref("pin/plugin")
    push(image, ref)
    wrong = "sha256:" + "ab" * 32
    with pytest.raises(DigestMismatch) as caught:
        pull(ref, expected_digest=wrong)
    assert wrong in str(caught.value) and image.digest in str(caught.value)
    assert (caught.value.expected, caught.value.actual) == (wrong, image.digest)
    # bare hex pins work as sha256: ones
    assert pull(ref, expected_digest=image.digest[7:]).manifest_digest == image.digest


def test_manifest_served_with_the_wrong_bytes(registry: Registry) -> None:
    image = build_image(make_wasm("tampered-manifest"), "oci")
    push(image, registry.ref("tamper/manifest"))
    manifest_file = registry.blob_path(image.digest)
    manifest_file.write_bytes(image.manifest.replace(b'"schemaVersion":2', b'"schemaVersion":2 '))
    with pytest.raises(DigestMismatch) as caught:
        pull(f"oci://{registry.host}/tamper/manifest@{image.digest}")
    assert image.digest in str(caught.value)


def test_corrupt_layer_blob(registry: Registry) -> None:
    image = build_image(make_wasm("corrupt"), "artifact")
    ref = registry.ref("tamper/blob")
    push(image, ref)
    layer = json.loads(image.manifest)["layers"][-1]
    path = registry.blob_path(layer["digest"])
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DigestMismatch) as caught:
        pull(ref)
    assert caught.value.expected == layer["digest"]
    assert layer["digest"] in str(caught.value) and "blob" in str(caught.value)


def test_missing_tag_and_repository_are_not_found(registry: Registry) -> None:
    push(build_image(make_wasm("nf"), "oci"), registry.ref("nf/plugin", "v1"))
    with pytest.raises(NotFound, match="not found"):
        pull(registry.ref("nf/plugin", "v2"))
    with pytest.raises(NotFound):
        pull(registry.ref("nf/no-such-repo", "v1"))
    with pytest.raises(NotFound):
        resolve_digest(registry.ref("nf/plugin", "v2"))


@pytest.mark.parametrize("bad", [
    custom_image([(images.CNCF_LAYER, b"hello, not wasm")], images.CNCF_CONFIG),
    custom_image([(images.ARTIFACT_LAYER, b"\x7fELF\x02\x01\x01\x00")]),
    custom_image([(images.OCI_LAYER, images.gzip.compress(images.plugin_tar(b"\0asm\1\0\0\0",
                                                                             "other.wasm")))]),
    custom_image([(images.OCI_LAYER, b"not gzip at all")]),
    custom_image([("application/vnd.oci.image.layer.v1.tar", images.plugin_tar(b"x"))]),
], ids=["cncf-text", "artifact-elf", "tar-without-plugin.wasm", "not-gzip", "uncompressed-tar"])
def test_non_wasm_content_is_not_wasm(registry: Registry, bad: WasmImage) -> None:
    ref = registry.ref("bad/content", bad.digest[7:19])
    push(bad, ref)
    with pytest.raises(NotWasm):
        pull(ref)


def test_build_refuses_non_wasm() -> None:
    with pytest.raises(NotWasm):
        build_image(b"GIF89a", "cncf")


def test_index_chooses_linux_amd64(registry: Registry) -> None:
    arm, amd = build_image(make_wasm("arm"), "oci"), build_image(make_wasm("amd"), "oci")
    index = build_index([(arm, ("linux", "arm64")), (amd, ("linux", "amd64"))])
    ref = registry.ref("multi/plugin")
    assert push(index, ref) == index.digest
    pulled = pull(ref)
    assert pulled.wasm == pull(f"oci://{registry.host}/multi/plugin@{amd.digest}").wasm
    assert (pulled.manifest_digest, pulled.index_digest) == (amd.digest, index.digest)
    assert resolve_digest(ref) == amd.digest
    # pinning either the chosen manifest or the index that commits to it is accepted
    assert pull(ref, expected_digest=amd.digest).manifest_digest == amd.digest
    assert pull(ref, expected_digest=index.digest).manifest_digest == amd.digest
    with pytest.raises(DigestMismatch):
        pull(ref, expected_digest=arm.digest)


def test_docker_manifest_list_with_one_other_platform(registry: Registry) -> None:
    only = build_image(make_wasm("only"), "docker")
    index = build_index([(only, ("linux", "arm64"))], docker=True)
    ref = registry.ref("multi/only")
    push(index, ref)
    assert pull(ref).manifest_digest == only.digest


def test_index_without_amd64_among_several(registry: Registry) -> None:
    a, b = build_image(make_wasm("a"), "oci"), build_image(make_wasm("b"), "oci")
    ref = registry.ref("multi/none")
    push(build_index([(a, ("linux", "arm64")), (b, ("windows", "amd64"))]), ref)
    with pytest.raises(NotWasm, match="linux/arm64, windows/amd64"):
        pull(ref)


def test_size_cap(registry: Registry) -> None:
    ref = registry.ref("cap/plugin")
    push(build_image(make_wasm("x" * 4000), "cncf"), ref)
    with pytest.raises(FetchError, match="size cap"):
        pull(ref, max_size=1000)


def test_registry_stopped(own_registry: Registry) -> None:
    ref = own_registry.ref("gone/plugin")
    push(build_image(make_wasm("gone"), "oci"), ref)
    assert pull(ref).format == "oci"
    own_registry.stop()
    started = time.monotonic()
    with pytest.raises(RegistryUnreachable, match="cannot connect") as caught:
        pull(ref)
    assert isinstance(caught.value, FetchError)
    assert time.monotonic() - started < 5
    with pytest.raises(RegistryUnreachable):
        resolve_digest(ref)


def test_push_skips_blobs_the_registry_has(registry: Registry) -> None:
    image = build_image(make_wasm("twice"), "docker")
    assert push(image, registry.ref("twice/a")) == push(image, registry.ref("twice/a", "v2"))
    assert pull(registry.ref("twice/a", "v2")).manifest_digest == image.digest


# -- references and plain-HTTP rules (no network) ---------------------------------------------

@pytest.mark.parametrize(("ref", "expected"), [
    ("nginx", ("index.docker.io", "library/nginx", "latest", None)),
    ("docker.io/org/filter:v1", ("index.docker.io", "org/filter", "v1", None)),
    ("index.docker.io/f", ("index.docker.io", "library/f", "latest", None)),
    ("org/filter:1.2.3", ("index.docker.io", "org/filter", "1.2.3", None)),
    ("ghcr.io/org/sub/filter:v1", ("ghcr.io", "org/sub/filter", "v1", None)),
    ("localhost:5000/f", ("localhost:5000", "f", "latest", None)),
    ("oci://localhost/f:v2", ("localhost", "f", "v2", None)),
    ("OCI://10.0.0.1:5000/a/b@sha256:" + "0" * 64,
     ("10.0.0.1:5000", "a/b", None, "sha256:" + "0" * 64)),
    ("reg.io:443/a:t@sha256:" + "1" * 64, ("reg.io:443", "a", "t", "sha256:" + "1" * 64)),
])
def test_parse_reference(ref: str, expected: tuple[str, str, str | None, str | None]) -> None:
    parsed = parse_reference(ref)
    assert (parsed.registry, parsed.repository, parsed.tag, parsed.digest) == expected


@pytest.mark.parametrize("ref", ["http://reg.io/a", "reg.io/Upper/Case", "reg.io/a@sha256:xyz",
                                 "reg.io/a:bad tag", "reg.io/a@md5:" + "0" * 32])
def test_parse_reference_rejects(ref: str) -> None:
    with pytest.raises(FetchError):
        parse_reference(ref)


def test_plain_http_only_for_local_or_insecure(monkeypatch: pytest.MonkeyPatch) -> None:
    def schemes(registry: str) -> tuple[list[str], bool]:
        with oci.RegistryClient(registry) as client:
            return client._schemes, client.insecure

    assert schemes("reg.example.com") == (["https"], False)
    assert schemes("10.0.0.1:5000") == (["https"], False)
    assert schemes("127.0.0.1:5000") == (["https", "http"], False)
    assert schemes("localhost:5000") == (["https", "http"], False)
    monkeypatch.setenv("WASM_INSECURE_REGISTRIES", "10.0.0.1:5000, other.example")
    assert schemes("10.0.0.1:5000") == (["https", "http"], True)
    assert schemes("other.example:8443") == (["https", "http"], True)
    assert schemes("reg.example.com") == (["https"], False)
    monkeypatch.setenv("WASM_INSECURE_REGISTRIES", "*")
    assert schemes("reg.example.com") == (["https", "http"], True)
