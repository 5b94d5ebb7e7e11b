"""`wasmgate pull` and `wasmgate cache ls|prune` through click's CliRunner."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from wasmgate.fetch.cache import ModuleCache
from wasmgate.fetch.cli import register

from .helpers_http import TINY_WASM, Reply, WasmServer, example_wasm

WASM = example_wasm()
SHA = hashlib.sha256(WASM).hexdigest()


@click.group()
def main() -> None:
    """The commands as the wasmgate group will carry them."""


register(main)


@pytest.fixture
def server() -> Iterator[WasmServer]:
    with WasmServer() as s:
        yield s


@pytest.fixture
def run(tmp_path: Path) -> Any:
    runner = CliRunner()

    def invoke(*args: str) -> Any:
        return runner.invoke(main, [*args[:2], "--cache-dir", str(tmp_path / "c"), *args[2:]]
                             if args[0] == "cache" else
                             [*args, "--cache-dir", str(tmp_path / "c")])
    return invoke


def test_pull_an_http_url(run: Any, server: WasmServer, tmp_path: Path) -> None:
    url = server.add("/m.wasm", WASM)
    result = run("pull", url, "-o", str(tmp_path / "out.wasm"))
    assert result.exit_code == 0, result.output
    assert f"pulled {url}" in result.output
    assert f"module sha256: {SHA}" in result.output
    assert (tmp_path / "c" / "modules" / f"{SHA}.wasm").read_bytes() == WASM
    assert (tmp_path / "out.wasm").read_bytes() == WASM
    again = run("pull", url)  # pull asks the source again
    assert again.exit_code == 0 and server.hits["/m.wasm"] == 2
    pinned = run("pull", url, "--sha256", SHA)  # unless the pinned module is cached
    assert pinned.exit_code == 0 and f"cached {url}" in pinned.output
    assert server.hits["/m.wasm"] == 2


def test_pull_a_local_file_says_where_it_is(run: Any, tmp_path: Path) -> None:
    """A file:// module is read where it lies (never cached): the path shown is the file."""
    module = tmp_path / "local.wasm"
    module.write_bytes(WASM)
    result = run("pull", f"file://{module}")
    assert result.exit_code == 0, result.output
    assert f"read file://{module}" in result.output
    assert f"path:          {module}" in result.output
    assert not (tmp_path / "c" / "modules").exists()


def test_pull_failures(run: Any, server: WasmServer) -> None:
    missing = run("pull", server.url("/missing.wasm"))
    assert missing.exit_code == 1
    assert "wasmgate: error:" in missing.output and "404" in missing.output
    url = server.add("/m.wasm", WASM)
    wrong = run("pull", url, "--sha256", "ab" * 32)
    assert wrong.exit_code == 1 and "which does not match: " + "ab" * 32 in wrong.output
    bad_ref = run("pull", "localhost:5000/x:v1")
    assert bad_ref.exit_code == 2 and "oci://" in bad_ref.output


def test_pull_large_module_with_progress(run: Any, server: WasmServer) -> None:
    big = TINY_WASM + b"\x00\x83\x80\xc0\x00" + b"\x01x" + b"\x00" * (0x100000 - 2)
    url = server.add("/big.wasm", Reply(body=big))
    result = run("pull", url)
    assert result.exit_code == 0, result.output
    assert "pulled" in result.output and "1.0 MiB" in result.output


def test_cache_ls_and_prune(run: Any, server: WasmServer) -> None:
    empty = run("cache", "ls")
    assert empty.exit_code == 0 and "empty" in empty.output
    url = server.add("/m.wasm", WASM)
    tiny = server.add("/tiny.wasm", TINY_WASM)
    assert run("pull", url).exit_code == 0
    assert run("pull", tiny).exit_code == 0
    listing = run("cache", "ls")
    assert listing.exit_code == 0
    assert url in listing.output and SHA[:12] in listing.output
    assert "19.3 KiB" in listing.output and "just now" in listing.output
    as_json = json.loads(run("cache", "ls", "--json").output)
    assert as_json[url]["module_sha256"] == SHA
    assert run("cache", "prune").output.startswith("removed 0 modules; 2 urls remain")
    assert run("cache", "prune", "--older-than", "1h").output.startswith("removed 0 modules")
    bad = run("cache", "prune", "--older-than", "soon")
    assert bad.exit_code == 2 and "invalid duration" in bad.output
    pruned = run("cache", "prune", "--all")
    assert pruned.exit_code == 0 and pruned.output.startswith("removed 2 modules; 0 urls")
    assert "empty" in run("cache", "ls").output


def test_prune_older_than_uses_last_use(run: Any, server: WasmServer, tmp_path: Path) -> None:
    url = server.add("/m.wasm", WASM)
    run("pull", url)
    cache = ModuleCache(tmp_path / "c", clock=lambda: 0.0)  # rewrite last use to the epoch
    with cache.locked() as index:
        index.entries[url].last_used = 0.0
        index.modules = dict.fromkeys(index.modules, 0.0)
    module = cache.module_path(SHA)
    os.utime(module, (0, 0))
    result = run("cache", "prune", "--older-than", "24h")
    assert result.output.startswith("removed 1 module;"), result.output
    assert not module.exists()


def test_pull_from_a_registry(run: Any, registry: Any) -> None:
    from wasmgate.fetch.images import build_image, push

    ref = registry.ref("cli/example", "v1")
    digest = push(build_image(WASM, "docker"), ref)
    result = run("pull", ref)
    assert result.exit_code == 0, result.output
    assert f"module sha256: {SHA}" in result.output
    assert f"manifest:      {digest}" in result.output
