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


def test_a_gateway_document_that_does_not_parse_refuses_startup(start_gateway: Start,
                                                                upstream: str) -> None:
    broken = gateway_doc(upstream).replace("  routes:", "  routes: [unclosed\n", 1)
    gateway = start_gateway(example() + "---\n" + broken, wait=False)
    assert gateway.process.wait(60) == 2
    assert "invalid YAML" in gateway.logs()


def test_with_workers_an_invalid_gateway_exits_2_once(start_gateway: Start,
                                                      upstream: str) -> None:
    gateway = start_gateway(gateway_doc(upstream, extra=BAD) + example(), "--workers", "2",
                            wait=False)
    assert gateway.process.wait(60) == 2
    logs = gateway.logs()
    assert logs.count("invalid configuration") == 1 and "Traceback" not in logs


ISTIO_GATEWAY = """---
apiVersion: networking.istio.io/v1beta1
kind: Gateway
metadata: {name: ingress}
spec: {selector: {istio: ingressgateway}}
"""


def test_an_istio_gateway_next_to_ours_is_skipped(start_gateway: Start, upstream: str) -> None:
    gateway = start_gateway(gateway_doc(upstream) + example("hi") + ISTIO_GATEWAY)
    status, headers, _ = gateway.get("/")
    assert (status, headers["x-wasm-greeting"]) == (200, '{"greeting":"hi"}')
    [error] = gateway.admin_json("/config_dump")["config_errors"]
    assert "is not a wasmgate resource (skipped)" in error


def test_a_plugin_whose_document_turns_invalid_keeps_running(start_gateway: Start,
                                                             upstream: str) -> None:
    gateway = start_gateway(gateway_doc(upstream) + example("kept"))
    config_path: Path = gateway.config_path  # type: ignore[attr-defined]
    # a typo in the plugin's document: priority must be an integer
    config_path.write_text(gateway_doc(upstream) + example("new") + "  priority: high\n")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and "its running version stays" not in gateway.logs():
        time.sleep(0.2)
    assert "WasmPlugin default/example is invalid now: its running version stays" in \
        gateway.logs()
    errors = gateway.admin_json("/config_dump")["config_errors"]
    assert any("spec.priority" in error for error in errors), errors
    status, headers, _ = gateway.get("/after")
    assert (status, headers["x-wasm-greeting"]) == (200, '{"greeting":"kept"}')
    # fixed again: the new version replaces it
    config_path.write_text(gateway_doc(upstream) + example("fixed"))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        status, headers, _ = gateway.get("/fixed")
        if headers.get("x-wasm-greeting") == '{"greeting":"fixed"}':
            break
        time.sleep(0.2)
    assert (status, headers["x-wasm-greeting"]) == (200, '{"greeting":"fixed"}')
