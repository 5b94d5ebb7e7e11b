"""Third-party Higress plugins for the ``real`` tests, fetched from PyPI at test time.

The 14 plugins ship inside the ``gpustack-higress-plugins`` wheel. They are not
ours to commit, so they are downloaded once with pip into a cache directory
(``$WASMGATE_TEST_CACHE`` or ``~/.cache/wasmgate-test/higress-0.5.1``) and reused.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

__all__ = [
    "HIGRESS_PLUGIN_NAMES",
    "HIGRESS_VERSION",
    "HigressDownloadError",
    "higress_plugin",
    "higress_plugins_dir",
]

HIGRESS_PACKAGE = "gpustack-higress-plugins"
HIGRESS_VERSION = "0.5.1"

HIGRESS_PLUGIN_NAMES: tuple[str, ...] = (
    "ai-data-masking",
    "ai-statistics",
    "gpustack-ai-proxy",
    "gpustack-ext-auth",
    "gpustack-generic-proxy-router",
    "gpustack-ip-acl",
    "gpustack-lb",
    "gpustack-lb-decision-service",
    "gpustack-lb-least-load",
    "gpustack-lb-session-affinity",
    "gpustack-rate-limit",
    "gpustack-set-header-pre-route",
    "gpustack-token-usage",
    "transformer",
)

_MARKER = ".complete"


class HigressDownloadError(RuntimeError):
    """The Higress plugins could not be downloaded or unpacked."""


def _cache_dir() -> Path:
    env = os.environ.get("WASMGATE_TEST_CACHE")
    base = Path(env) if env else Path.home() / ".cache" / "wasmgate-test"
    return base / f"higress-{HIGRESS_VERSION}"


def _plugin_name(member: str) -> str:
    """Plugin name for a wheel member: ``.../<name>/<version>/plugin.wasm`` or ``<name>.wasm``."""
    path = PurePosixPath(member)
    if path.stem != "plugin":
        return path.stem
    parts = [p for p in path.parent.parts if not p[:1].isdigit()]
    return parts[-1]


def _download_wheel(dest: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-d",
        str(dest),
        f"{HIGRESS_PACKAGE}=={HIGRESS_VERSION}",
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HigressDownloadError(f"running pip failed: {exc}") from exc
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise HigressDownloadError(
            f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{proc.stderr.strip()[-2000:]}"
        )
    return wheels[0]


def _extract_plugins(wheel: Path, dest: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    with zipfile.ZipFile(wheel) as zf:
        for member in zf.namelist():
            if not member.endswith(".wasm"):
                continue
            name = _plugin_name(member)
            if name in found:
                raise HigressDownloadError(f"two wasm files for plugin {name!r} in {wheel.name}")
            target = dest / f"{name}.wasm"
            with zf.open(member) as src, target.open("wb") as out:
                shutil.copyfileobj(src, out)
            found[name] = target
    return found


def _populate(final: Path) -> None:
    """Download and unpack into a temp dir next to ``final``, then rename it into place."""
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=".higress-") as tmp:
        staging = Path(tmp) / "plugins"
        staging.mkdir()
        wheel = _download_wheel(Path(tmp) / "wheel")
        found = _extract_plugins(wheel, staging)
        missing = sorted(set(HIGRESS_PLUGIN_NAMES) - set(found))
        if missing:
            raise HigressDownloadError(
                f"{wheel.name} lacks plugins {missing}; it has {sorted(found)}"
            )
        (staging / _MARKER).write_text(f"{HIGRESS_PACKAGE}=={HIGRESS_VERSION}\n")
        if final.exists():  # a stale or partial cache from an older run
            shutil.rmtree(final)
        try:
            staging.rename(final)
        except OSError:
            if not (final / _MARKER).exists():  # not just a concurrent run that won
                raise


def higress_plugins_dir() -> Path:
    """The cache directory holding ``<name>.wasm`` for every Higress plugin."""
    final = _cache_dir()
    if not (final / _MARKER).exists():
        _populate(final)
    return final


def higress_plugin(name: str) -> Path:
    """Path of one plugin's wasm, e.g. ``higress_plugin("transformer")``."""
    if name not in HIGRESS_PLUGIN_NAMES:
        raise KeyError(f"unknown Higress plugin {name!r}; known: {', '.join(HIGRESS_PLUGIN_NAMES)}")
    return higress_plugins_dir() / f"{name}.wasm"
