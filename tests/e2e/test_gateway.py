"""The gateway as a user runs it: `wasmgate run`, real sockets, a real upstream server."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ..conftest import CONFORMANCE, EXAMPLE
from .conftest import Gateway, free_port

Start = Callable[..., Gateway]


def gateway_doc(upstream: str, labels: dict[str, str] | None = None,
                extra: str = "") -> str:
    label_text = json.dumps(labels or {"app": "edge"})
    return f"""apiVersion: wasmgate.io/v1alpha1
kind: Gateway
metadata: {{name: test}}
spec:
  labels: {label_text}
  clusters:
  - name: backend
    endpoints: ["{upstream}"]
    timeoutMs: 1000
  routes:
  - name: main
    cluster: backend
{extra}"""


def conformance(name: str, steps: list[str], *, phase: str | None = None,
                priority: int | None = None, fail: str | None = None,
                selector: dict[str, str] | None = None, namespace: str = "default") -> str:
    lines = [f"---\napiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\n"
             f"metadata: {{name: {name}, namespace: {namespace}}}\nspec:\n"
             f"  url: file://{CONFORMANCE}\n  pluginConfig: {json.dumps({'steps': steps})}"]
    if phase:
        lines.append(f"  phase: {phase}")
    if priority is not None:
        lines.append(f"  priority: {priority}")
    if fail:
        lines.append(f"  failStrategy: {fail}")
    if selector:
        lines.append(f"  selector: {{matchLabels: {json.dumps(selector)}}}")
    return "\n".join(lines) + "\n"


def example(greeting: str = "hello") -> str:
    return (f"---\napiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\n"
            f"metadata: {{name: example}}\nspec:\n  url: file://{EXAMPLE}\n"
            f"  pluginName: example\n  pluginConfig: {{greeting: {greeting}}}\n")


def echoed(body: bytes) -> dict:  # type: ignore[type-arg]
    return json.loads(body)


def header_values(echo: dict, name: str) -> list[str]:  # type: ignore[type-arg]
    return [v for k, v in echo["headers"] if k == name]


def mark(name: str) -> list[str]:
    return [f"request_headers add_header_map_value 0 s:x-order s:{name}"]


def test_plugins_run_in_istio_order(start_gateway: Start, upstream: str) -> None:
    config = gateway_doc(upstream)
    config += conformance("stats-low", mark("stats-low"), phase="STATS", priority=1)
    config += conformance("unspecified", mark("unspecified"))
    config += conformance("authz", mark("authz"), phase="AUTHZ")
    config += conformance("stats-high", mark("stats-high"), phase="STATS", priority=10)
    config += conformance("stats-unset", mark("stats-unset"), phase="STATS")
    config += conformance("stats-negative", mark("stats-negative"), phase="STATS", priority=-5)
    config += conformance("authn", mark("authn"), phase="AUTHN")
    gateway = start_gateway(config)
    status, _, body = gateway.get("/order")
    assert status == 200
    order = header_values(echoed(body), "x-order")
    assert order == ["authn", "authz", "stats-high", "stats-low", "stats-negative",
                     "stats-unset", "unspecified"]


def test_plugin_config_reaches_on_configure(start_gateway: Start, upstream: str) -> None:
    gateway = start_gateway(gateway_doc(upstream) + example("bonjour"))
    status, headers, body = gateway.get("/hi")
    assert status == 200
    assert headers["x-wasm-greeting"] == '{"greeting":"bonjour"}'
    assert header_values(echoed(body), "x-wasm-example") == ["seen"]
    status, headers, body = gateway.get("/deny/this")
    assert (status, body) == (403, b"denied by wasm plugin\n")
    assert "configured with: {\"greeting\":\"bonjour\"}" in gateway.logs()


def test_selectors_match_and_do_not_match(start_gateway: Start, upstream: str) -> None:
    config = gateway_doc(upstream, labels={"app": "edge", "tier": "front"})
    config += conformance("mine", mark("mine"), selector={"app": "edge"})
    config += conformance("theirs", mark("theirs"), selector={"app": "other"})
    config += conformance("elsewhere", mark("elsewhere"), namespace="other-ns")
    config += conformance("mesh-wide", mark("mesh-wide"), namespace="istio-system")
    gateway = start_gateway(config)
    order = header_values(echoed(gateway.get("/")[2]), "x-order")
    assert sorted(order) == ["mesh-wide", "mine"]
    names = [p["name"] for p in gateway.admin_json("/plugins")["plugins"]]
    assert "default.theirs" not in names and "other-ns.elsewhere" not in names


@pytest.mark.parametrize(("strategy", "statuses"), [
    ("FAIL_CLOSE", [503, 503]), ("FAIL_OPEN", [200, 200]), ("FAIL_RELOAD", [503, 503])])
def test_fail_strategies_with_a_crashing_plugin(start_gateway: Start, upstream: str,
                                                strategy: str, statuses: list[int]) -> None:
    config = gateway_doc(upstream) + conformance("crasher", ["request_headers trap"],
                                                 fail=strategy)
    gateway = start_gateway(config)
    seen = [gateway.get("/")[0] for _ in statuses]
    assert seen == statuses
    [plugin] = gateway.admin_json("/plugins")["plugins"]
    assert plugin["crashes"] >= 1
    if strategy == "FAIL_RELOAD":
        assert plugin["reloads"] >= 1  # a fresh VM was built for the second request
    logs = gateway.logs()
    assert "Function: proxy_on_request_headers failed: wasm trap: wasm `unreachable`" in logs
    assert "Proxy-Wasm plugin in-VM backtrace:" in logs
    if strategy != "FAIL_OPEN":
        gateway.wait_logged('"GET / HTTP/1.1" 503 - wasm_fail_stream ')  # the access log


def test_missing_module_stands_in_and_gateway_still_serves(start_gateway: Start,
                                                          upstream: str) -> None:
    config = gateway_doc(upstream)
    config += ("---\napiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\n"
               "metadata: {name: gone}\nspec:\n  url: file:///nonexistent/plugin.wasm\n"
               "  failStrategy: FAIL_OPEN\n")
    gateway = start_gateway(config)
    assert gateway.get("/")[0] == 200
    [plugin] = gateway.admin_json("/plugins")["plugins"]
    assert plugin["status"] == "failed"
    assert "/nonexistent/plugin.wasm" in plugin["error"]


def test_deny_all_stand_in_for_fail_close(start_gateway: Start, upstream: str) -> None:
    config = gateway_doc(upstream)
    config += ("---\napiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\n"
               "metadata: {name: gone}\nspec:\n  url: file:///nonexistent/plugin.wasm\n")
    gateway = start_gateway(config)
    status, _, body = gateway.get("/")
    assert (status, body) == (403, b"RBAC: access denied")


def test_admin_endpoints(start_gateway: Start, upstream: str) -> None:
    steps = ["configure define_metric 0 s:demo_requests_total",
             "request_headers increment_metric 4 1",
             "configure define_metric 1 s:reporter=.=edge;.;demo_inflight"]
    gateway = start_gateway(gateway_doc(upstream) + conformance("metrics", steps))
    for _ in range(3):
        assert gateway.get("/")[0] == 200
    status, text = gateway.admin_get("/stats/prometheus")
    prometheus = text.decode()
    assert status == 200
    assert "# TYPE demo_requests_total counter\ndemo_requests_total 3" in prometheus
    assert 'demo_inflight{reporter="edge"} 0' in prometheus
    assert "wasmgate_requests_total 3" in prometheus
    assert 'wasmgate_responses_total{code="200"} 3' in prometheus
    assert 'wasmgate_plugin_streams_total{plugin="default.metrics"} 3' in prometheus
    dump = gateway.admin_json("/config_dump")
    assert dump["plugins"][0]["filter_name"] == "default.metrics"
    assert len(dump["plugins"][0]["sha256"]) == 64
    assert gateway.admin_get("/ready") == (200, b"LIVE\n")
    before = gateway.admin_json("/logging")["levels"]
    assert gateway.admin_get("/logging?default.metrics=trace")[0] == 405  # a change is a POST
    assert gateway.admin_json("/logging")["levels"] == before != {"default.metrics": "trace"}
    levels = gateway.admin_post_json("/logging?default.metrics=trace")
    assert levels["changed"] == {"default.metrics": "trace"}
    gateway.get("/traced")
    assert "[host->vm] proxy_on_request_headers(" in gateway.logs()
    assert gateway.admin_post("/logging?nobody=trace")[0] == 404


def test_secrets_are_redacted_in_config_dump(start_gateway: Start, upstream: str) -> None:
    config = gateway_doc(upstream) + conformance("s", ["request_headers log 2 s:x"])
    config = config.replace("  pluginConfig:", "  vmConfig:\n    env:\n"
                            "    - {name: API_TOKEN, value: hunter2}\n  pluginConfig:")
    gateway = start_gateway(config)
    text = gateway.admin_get("/config_dump")[1].decode()
    assert "hunter2" not in text and "[redacted]" in text


def test_upstream_failures_map_to_503_and_504(start_gateway: Start, upstream: str) -> None:
    dead = f"127.0.0.1:{free_port()}"
    config = gateway_doc(upstream, extra=f"""  - name: dead
    match: {{prefix: /dead}}
    cluster: "{dead}"
""").replace("  routes:\n  - name: main\n    cluster: backend\n",
             "  routes:\n") + """  - name: main
    cluster: backend
"""
    gateway = start_gateway(config + example())
    status, headers, _ = gateway.get("/dead/x")
    assert status == 503
    assert "x-wasm-greeting" in headers  # the plugins' response path saw the router reply
    status, _, _ = gateway.get("/slow")
    assert status == 504
    gateway.wait_logged('"GET /slow HTTP/1.1" 504 UT upstream_response_timeout ')
    assert "upstream_reset_before_response_started{connection_failure}" in gateway.logs()


def test_hot_reload_under_load_without_failures(start_gateway: Start, upstream: str) -> None:
    gateway = start_gateway(gateway_doc(upstream) + example("one"))
    config_path: Path = gateway.config_path  # type: ignore[attr-defined]
    results: list[tuple[int, str]] = []
    stop = threading.Event()

    def load() -> None:
        while not stop.is_set():
            status, headers, _ = gateway.get("/load")
            results.append((status, headers.get("x-wasm-greeting", "")))

    workers = [threading.Thread(target=load) for _ in range(4)]
    for worker in workers:
        worker.start()
    time.sleep(1.0)
    config_path.write_text(gateway_doc(upstream) + example("two"))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not any("two" in g for _, g in results[-20:]):
        time.sleep(0.2)
    time.sleep(1.0)
    stop.set()
    for worker in workers:
        worker.join()
    statuses = {s for s, _ in results}
    assert statuses == {200}, f"non-200 during reload: {statuses}"
    greetings = [g for _, g in results]
    assert '{"greeting":"one"}' in greetings and '{"greeting":"two"}' in greetings
    assert greetings[-1] == '{"greeting":"two"}'
    assert len(results) > 50


def test_invalid_reload_keeps_the_running_config(start_gateway: Start, upstream: str) -> None:
    gateway = start_gateway(gateway_doc(upstream) + example("kept"))
    config_path: Path = gateway.config_path  # type: ignore[attr-defined]
    broken = gateway_doc(upstream) + conformance("rejects", ["configure return 0"])
    broken = broken.replace("name: rejects", "name: example")  # same plugin, new version
    config_path.write_text(broken)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        plugins = gateway.admin_json("/plugins")["plugins"]
        if plugins and plugins[0].get("reload_error"):
            break
        time.sleep(0.2)
    [plugin] = gateway.admin_json("/plugins")["plugins"]
    assert "configuration rejected" in plugin["reload_error"]
    status, headers, _ = gateway.get("/still")
    assert (status, headers["x-wasm-greeting"]) == (200, '{"greeting":"kept"}')
