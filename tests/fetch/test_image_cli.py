"""`wasmgate image build|push` against a real registry, pulled back with our client."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from wasmgate.cli import main
from wasmgate.fetch.oci import pull

from ..conftest import EXAMPLE
from .conftest import Registry


@pytest.mark.parametrize("fmt", ["oci", "compat", "artifact", "cncf"])
def test_build_push_pull_round_trip(registry: Registry, tmp_path: Path, fmt: str) -> None:
    ref = f"{registry.host}/cli/example:{fmt}"
    layout = tmp_path / "layout"
    result = CliRunner().invoke(main, ["image", "build", str(EXAMPLE), "-t", ref, "--format",
                                       fmt, "-o", str(layout), "--push", "--insecure"])
    assert result.exit_code == 0, result.output
    assert f"pushed {ref}@sha256:" in result.output
    assert json.loads((layout / "index.json").read_text())["manifests"]
    pulled = pull(f"oci://{ref}", insecure=True)
    assert pulled.wasm == EXAMPLE.read_bytes()


def test_push_a_layout(registry: Registry, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    built = CliRunner().invoke(main, ["image", "build", str(EXAMPLE), "-t", "x/example:v9",
                                      "-o", str(layout)])
    assert built.exit_code == 0, built.output
    ref = f"{registry.host}/cli/layout:v9"
    pushed = CliRunner().invoke(main, ["image", "push", str(layout), ref, "--insecure"])
    assert pushed.exit_code == 0, pushed.output
    assert pull(f"oci://{ref}", insecure=True).wasm == EXAMPLE.read_bytes()


def test_build_refuses_non_wasm(tmp_path: Path) -> None:
    bogus = tmp_path / "not.wasm"
    bogus.write_bytes(b"hello")
    result = CliRunner().invoke(main, ["image", "build", str(bogus), "-t", "x/y:z",
                                       "-o", str(tmp_path / "o")])
    assert result.exit_code != 0
    assert "wasm" in result.output.lower()
