"""Building Wasm images (no network): formats, determinism, OCI layouts, extraction rules."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from pathlib import Path

import pytest

from wasmgate.fetch import images
from wasmgate.fetch.errors import FetchError, NotWasm
from wasmgate.fetch.images import (
    build_image,
    build_index,
    choose_manifest,
    digest_of,
    extract_wasm,
    read_layout,
    wasm_from_tar,
    write_layout,
)

from .conftest import make_wasm

WASM = make_wasm("images")


def extract(image: images.WasmImage) -> tuple[bytes, str]:
    return extract_wasm(json.loads(image.manifest), image.media_type,
                        lambda desc: image.blobs[desc["digest"]])


@pytest.mark.parametrize(("fmt", "media", "config", "layers"), [
    ("oci", images.OCI_MANIFEST, images.OCI_CONFIG, [images.OCI_LAYER]),
    ("compat", images.DOCKER_MANIFEST, images.DOCKER_CONFIG, [images.DOCKER_LAYER]),
    ("docker", images.DOCKER_MANIFEST, images.DOCKER_CONFIG, [images.DOCKER_LAYER]),
    ("artifact", images.OCI_MANIFEST, images.ARTIFACT_CONFIG,
     [images.ARTIFACT_CONFIG, images.ARTIFACT_LAYER]),
    ("cncf", images.OCI_MANIFEST, images.CNCF_CONFIG, [images.CNCF_LAYER]),
])
def test_formats(fmt: str, media: str, config: str, layers: list[str]) -> None:
    image = build_image(WASM, fmt)
    manifest = json.loads(image.manifest)
    assert manifest["mediaType"] == image.media_type == media
    assert manifest["config"]["mediaType"] == config
    assert [layer["mediaType"] for layer in manifest["layers"]] == layers
    for desc in [manifest["config"], *manifest["layers"]]:  # every blob is there and addressed
        assert digest_of(image.blobs[desc["digest"]]) == desc["digest"]
        assert len(image.blobs[desc["digest"]]) == desc["size"]
    assert extract(image) == (WASM, images.FORMATS[fmt])


def test_compat_layers_hold_plugin_wasm_and_configs_are_sane() -> None:
    oci = json.loads(build_image(WASM, "oci").manifest)
    assert oci["annotations"] == {"module.wasm.image/variant": "compat"}
    image = build_image(WASM, "docker")
    manifest = json.loads(image.manifest)
    layer = image.blobs[manifest["layers"][0]["digest"]]
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer))) as tar:
        (member,) = tar.getmembers()
        assert (member.name, member.mtime, member.uid, member.mode) == ("plugin.wasm", 0, 0, 0o644)
    config = json.loads(image.blobs[manifest["config"]["digest"]])
    assert (config["os"], config["architecture"]) == ("linux", "amd64")
    assert config["rootfs"]["diff_ids"] == [digest_of(gzip.decompress(layer))]
    cncf = build_image(WASM, "cncf")
    cncf_config = json.loads(cncf.blobs[json.loads(cncf.manifest)["config"]["digest"]])
    assert cncf_config["architecture"] == "wasm"
    assert cncf_config["layerDigests"] == [digest_of(WASM)]


@pytest.mark.parametrize("fmt", sorted(images.FORMATS))
def test_builds_are_reproducible(fmt: str) -> None:
    first, second = build_image(WASM, fmt), build_image(WASM, fmt)
    assert first.digest == second.digest and first.blobs == second.blobs
    assert build_image(make_wasm("other"), fmt).digest != first.digest


def test_unknown_format_and_non_wasm() -> None:
    with pytest.raises(ValueError, match="unknown image format"):
        build_image(WASM, "zip")
    with pytest.raises(NotWasm):
        build_image(b"not wasm", "oci")
    assert build_image(b"not wasm", "cncf", check=False).format == "cncf"


def test_layout_round_trip(tmp_path: Path) -> None:
    image = build_image(WASM, "artifact")
    root = write_layout(image, tmp_path / "layout", tag="v1")
    assert json.loads((root / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((root / "index.json").read_text())
    (entry,) = index["manifests"]
    assert entry["digest"] == image.digest
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == "v1"
    for digest in [image.digest, *image.blobs]:
        assert (root / "blobs" / "sha256" / digest[7:]).is_file()
    again = read_layout(root)
    assert (again.manifest, again.blobs) == (image.manifest, image.blobs)
    # a second tag goes beside the first; re-tagging replaces
    other = build_image(make_wasm("second"), "cncf")
    write_layout(other, root, tag="v2")
    write_layout(other, root, tag="v2")
    assert read_layout(root, "v2").digest == other.digest
    assert read_layout(root, "v1").digest == image.digest
    with pytest.raises(FetchError, match="found 2"):
        read_layout(root)
    with pytest.raises(FetchError, match="found 0"):
        read_layout(root, "v3")


def test_layout_with_an_index(tmp_path: Path) -> None:
    amd, arm = build_image(make_wasm("amd"), "oci"), build_image(make_wasm("arm"), "oci")
    index = build_index([(arm, ("linux", "arm64")), (amd, ("linux", "amd64"))])
    read = read_layout(write_layout(index, tmp_path / "idx"))
    assert read.digest == index.digest
    assert amd.digest in read.blobs and arm.digest in read.blobs


def test_layout_detects_corrupt_blobs(tmp_path: Path) -> None:
    image = build_image(WASM, "cncf")
    root = write_layout(image, tmp_path / "layout")
    (root / "blobs" / "sha256" / digest_of(WASM)[7:]).write_bytes(b"\0asm\1\0\0\0tampered")
    with pytest.raises(FetchError, match="corrupt"):
        read_layout(root)


def tar_gz(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(buffer.getvalue())


def test_plugin_wasm_found_by_basename() -> None:
    layer = tar_gz({"runtime-config.json": b"{}", "some/dir/plugin.wasm": WASM,
                    "plugin.wasm.bak": b"x"})
    assert wasm_from_tar(layer) == WASM
    with pytest.raises(NotWasm, match=r"no plugin\.wasm"):
        wasm_from_tar(tar_gz({"filter.wasm": WASM}))
    with pytest.raises(NotWasm, match="not gzip"):
        wasm_from_tar(b"plain bytes")


def test_gzip_bomb_is_capped() -> None:
    bomb = gzip.compress(b"\0" * 5_000_000)
    with pytest.raises(FetchError, match="size cap"):
        wasm_from_tar(bomb, limit=1_000_000)


def test_unknown_layouts_name_every_format() -> None:
    manifest = {"layers": [{"mediaType": "application/octet-stream", "digest": "x"}]}
    with pytest.raises(NotWasm) as caught:
        extract_wasm(manifest, images.OCI_MANIFEST, lambda d: b"", subject="img")
    for needle in ("compat", images.ARTIFACT_LAYER, images.CNCF_LAYER):
        assert needle in str(caught.value)
    with pytest.raises(NotWasm, match="no layers"):
        extract_wasm({"layers": []}, images.OCI_MANIFEST, lambda d: b"")


def test_choose_manifest() -> None:
    def entry(os_name: str, arch: str, **annotations: str) -> dict[str, object]:
        return {"digest": f"sha256:{os_name}-{arch}", "annotations": annotations,
                "platform": {"os": os_name, "architecture": arch}}

    amd = entry("linux", "amd64")
    assert choose_manifest({"manifests": [entry("linux", "arm64"), amd]}, "x") is amd
    only = entry("linux", "s390x")
    attestation = entry("unknown", "unknown", **{"vnd.docker.reference.type":
                                                  "attestation-manifest"})
    assert choose_manifest({"manifests": [only, attestation]}, "x") is only
    with pytest.raises(NotWasm, match="empty"):
        choose_manifest({"manifests": []}, "x")
    with pytest.raises(NotWasm, match="linux/arm64, linux/s390x"):
        choose_manifest({"manifests": [entry("linux", "arm64"), only]}, "x")
