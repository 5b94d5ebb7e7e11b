"""Shared test paths and fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "plugins"
WAT = PLUGINS / "wat"
EXAMPLE = PLUGINS / "example-as" / "example.wasm"
CONFORMANCE = PLUGINS / "conformance" / "conformance.wasm"
DWARF_CRASH = PLUGINS / "dwarf-crash" / "crash.wasm"


@pytest.fixture
def compiled_cache(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A precompiled-module cache in a temporary directory."""
    from wasmgate.runtime.module_cache import CompiledModuleCache

    return CompiledModuleCache(tmp_path / "compiled")


def missing(what: str) -> None:
    """A tool or download a test needs is absent: skip on a developer's machine, fail under CI
    (CI runs scripts/test, which installs every tool, so absence there is a real failure)."""
    import os

    message = f"{what} (scripts/install-test-deps installs the tools)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)
