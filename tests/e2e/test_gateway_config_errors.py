"""A bad Gateway document is never replaced by a default one.

A bad WasmPlugin is left out while the others run (as in Istio), but a Gateway document that
does not validate would otherwise silently become the default Gateway: no clusters, no routes,
another listener. So `wasmgate run` refuses to start on one (exit 2, naming file, document and
field), and a reload to one keeps the running configuration.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from .conftest import Gateway
from .test_gateway import example, gateway_doc

Start = Callable[..., Gateway]
BAD = "  sharedData: ftp://127.0.0.1:1\n"


def test_startup_refuses_an_invalid_gateway_document(start_gateway: Start,
                                                     upstream: str) -> None:
    gateway = start_gateway(gateway_doc(upstream, extra=BAD) + example(), wait=False)
    assert gateway.process.wait(60) == 2
    logs = gateway.logs()
    assert "invalid configuration" in logs
    assert "document 1 (Gateway test)" in logs and "spec.sharedData" in logs


def test_a_reload_to_an_invalid_gateway_document_keeps_the_running_one(
        start_gateway: Start, upstream: str) -> None:
    gateway = start_gateway(gateway_doc(upstream) + example("kept"))
    assert gateway.get("/before")[0] == 200
    config_path: Path = gateway.config_path  # type: ignore[attr-defined]
    config_path.write_text(gateway_doc(upstream, extra=BAD) + example("new"))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        errors = gateway.admin_json("/config_dump")["config_errors"]
        if errors:
            break
        time.sleep(0.2)
    assert any("spec.sharedData" in error for error in errors), errors
    assert "reload refused" in gateway.logs()
    status, headers, _ = gateway.get("/after")
    assert (status, headers["x-wasm-greeting"]) == (200, '{"greeting":"kept"}')
    # the routes and clusters of the running Gateway are still there
    assert gateway.admin_json("/config_dump")["gateway"]["spec"]["clusters"][0]["name"] == \
        "backend"
