"""`wasmgate image build|push`: Wasm OCI images from a .wasm, as docker or buildah would make
them (Docker compat, OCI compat), the Wasm artifact Istio accepts, or the CNCF artifact."""

from __future__ import annotations

from pathlib import Path

import click

from .errors import FetchError
from .images import build_image, push, write_layout

FORMATS = ["oci", "compat", "docker", "artifact", "cncf"]


@click.group("image")
def image() -> None:
    """Build and push Wasm OCI images."""


@image.command("build")
@click.argument("wasm", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-t", "--tag", "ref", required=True,
              help="Image reference, e.g. 127.0.0.1:5000/plugins/example:v1.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="oci", show_default=True,
              help="oci = OCI compat (buildah), compat/docker = Docker compat (docker build), "
                   "artifact = Wasm artifact (wasme), cncf = CNCF application/wasm.")
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path),
              help="Write an OCI image layout directory here (default: ./<name>.oci).")
@click.option("--push/--no-push", "do_push", default=False, help="Push to the registry too.")
@click.option("--insecure", is_flag=True, help="Plain HTTP / no TLS verification.")
@click.option("--pull-secret", help="Docker config JSON (file, k8s secret dir, or JSON text).")
def build(wasm: Path, ref: str, fmt: str, output: Path | None, do_push: bool, insecure: bool,
          pull_secret: str | None) -> None:
    """Build an image holding WASM; write an OCI layout and/or push it."""
    try:
        image_ = build_image(wasm.read_bytes(), fmt)
        tag = ref.rsplit(":", 1)[1] if ":" in ref.rsplit("/", 1)[-1] else "latest"
        directory = output or Path(f"{wasm.stem}.oci")
        write_layout(image_, directory, tag)
        click.echo(f"wrote OCI layout {directory} (tag {tag}, manifest {image_.digest})")
        if do_push:
            digest = push(image_, ref, pull_secret, insecure=insecure or None)
            click.echo(f"pushed {ref}@{digest}")
    except (FetchError, ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc


@image.command("push")
@click.argument("layout", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("ref")
@click.option("--tag", "layout_tag", help="Which tag of the layout (default: the only one).")
@click.option("--insecure", is_flag=True, help="Plain HTTP / no TLS verification.")
@click.option("--pull-secret", help="Docker config JSON (file, k8s secret dir, or JSON text).")
def push_cmd(layout: Path, ref: str, layout_tag: str | None, insecure: bool,
             pull_secret: str | None) -> None:
    """Push an OCI image layout directory to REF."""
    try:
        digest = push(layout, ref, pull_secret, insecure=insecure or None, layout_tag=layout_tag)
    except (FetchError, ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"pushed {ref}@{digest}")
