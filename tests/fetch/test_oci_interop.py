"""Interop with skopeo (containers/image) both ways, against a real registry.

skopeo 1.9 reads only OCI manifests from an OCI layout (a Docker-schema2 manifest there is "no
descriptor found"), so the Docker format goes registry -> skopeo only; ``skopeo inspect`` without
``--raw`` refuses artifacts ("unsupported image-specific operation"), so those are inspected raw.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from wasmgate.fetch.images import build_image, extract_wasm, push, read_layout, write_layout
from wasmgate.fetch.oci import pull

from .conftest import Registry, make_wasm

pytestmark = pytest.mark.usefixtures("no_docker_config")


def run(*args: str) -> str:
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(args)}: {done.stderr}"
    return done.stdout


@pytest.mark.parametrize("fmt", ["oci", "artifact", "cncf"])
def test_skopeo_copies_our_layout_and_we_pull_it(skopeo: str, registry: Registry,
                                                 tmp_path: Path, fmt: str) -> None:
    wasm = make_wasm(f"skopeo-in-{fmt}")
    image = build_image(wasm, fmt)
    layout = write_layout(image, tmp_path / "layout", tag="v1")
    assert (layout / "oci-layout").is_file() and (layout / "index.json").is_file()
    run(skopeo, "--insecure-policy", "copy", "--dest-tls-verify=false", f"oci:{layout}:v1",
        f"docker://{registry.host}/skopeo-in/{fmt}:v1")
    pulled = pull(f"{registry.host}/skopeo-in/{fmt}:v1")
    assert (pulled.wasm, pulled.manifest_digest) == (wasm, image.digest)


@pytest.mark.parametrize("fmt", ["oci", "docker", "artifact", "cncf"])
def test_skopeo_reads_what_we_push(skopeo: str, registry: Registry, tmp_path: Path,
                                   fmt: str) -> None:
    wasm = make_wasm(f"skopeo-out-{fmt}")
    image = build_image(wasm, fmt)
    ref = f"docker://{registry.host}/skopeo-out/{fmt}:v1"
    push(image, ref.removeprefix("docker://"))
    raw = run(skopeo, "inspect", "--tls-verify=false", "--raw", ref)
    assert raw.encode() == image.manifest
    if fmt in ("oci", "docker"):
        info = json.loads(run(skopeo, "inspect", "--tls-verify=false", ref))
        assert info["Digest"] == image.digest
        assert (info["Os"], info["Architecture"]) == ("linux", "amd64")
    out = tmp_path / "copied"
    run(skopeo, "--insecure-policy", "copy", "--src-tls-verify=false", ref, f"oci:{out}:v1")
    copied = read_layout(out, "v1")
    if fmt != "docker":  # copied verbatim; Docker schema2 is converted to OCI for a layout
        assert copied.digest == image.digest
    module, _ = extract_wasm(json.loads(copied.manifest), copied.media_type,
                             lambda desc: copied.blobs[desc["digest"]])
    assert module == wasm


def test_skopeo_copies_registry_to_registry_and_we_pull(skopeo: str, registry: Registry,
                                                        tls_registry: Registry) -> None:
    """Our push (plain) -> skopeo -> the TLS registry (trusting the test CA) -> our pull."""
    wasm = make_wasm("skopeo-r2r")
    image = build_image(wasm, "docker")
    push(image, registry.ref("r2r/plugin"))
    assert tls_registry.ca_file is not None
    certs = tls_registry.ca_file.parent / "skopeo-certs"
    certs.mkdir(exist_ok=True)
    (certs / "ca.crt").write_bytes(tls_registry.ca_file.read_bytes())
    run(skopeo, "--insecure-policy", "copy", "--src-tls-verify=false", f"--dest-cert-dir={certs}",
        f"docker://{registry.host}/r2r/plugin:v1", f"docker://{tls_registry.host}/r2r/plugin:v1")
    pulled = pull(tls_registry.ref("r2r/plugin"), ca_file=tls_registry.ca_file)
    assert (pulled.wasm, pulled.manifest_digest, pulled.format) == (wasm, image.digest, "docker")
