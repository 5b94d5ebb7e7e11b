"""Small builders shared by the api tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import yaml

from wasmgate.api import LoadResult, WasmPlugin, load_text

T0 = datetime(2024, 1, 1, tzinfo=UTC)


def plugin_doc(name: str = "p", namespace: str = "default", **spec: Any) -> dict[str, Any]:
    spec.setdefault("url", "oci://ghcr.io/org/p:v1")
    return {
        "apiVersion": "extensions.istio.io/v1alpha1",
        "kind": "WasmPlugin",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def load_docs(*docs: dict[str, Any], file: str = "plugins.yaml") -> LoadResult:
    return load_text(yaml.safe_dump_all(docs, sort_keys=False), file, now=T0)


def errors_for(**spec: Any) -> list[tuple[str, str]]:
    """(path, reason) of every error of one WasmPlugin document with this spec."""
    result = load_docs(plugin_doc(**spec))
    return [(e.path, e.reason) for e in result.errors]


def plugin(
    name: str = "p",
    namespace: str = "default",
    created: int = 0,
    **spec: Any,
) -> WasmPlugin:
    """A WasmPlugin created ``created`` seconds after T0."""
    doc = plugin_doc(name, namespace, **spec)
    doc["metadata"]["creationTimestamp"] = (T0 + timedelta(seconds=created)).isoformat()
    return WasmPlugin.model_validate(doc)
