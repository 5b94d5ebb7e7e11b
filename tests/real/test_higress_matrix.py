"""All 14 Higress plugins through `wasmgate run`: the matrix in docs/compatibility.md.

Each plugin runs alone in a gateway in front of the echo upstream, with a documented config. Every
plugin must reach "ready" in /plugins, serve a normal request without a 5xx and without a crash;
plugins whose behaviour can be seen from outside also show it.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from ..e2e.conftest import Gateway
from ..e2e.test_gateway import gateway_doc, header_values
from .higress import HIGRESS_PLUGIN_NAMES
from .test_higress_gateway import MASKING, TRANSFORMER, wasm_plugin
from .test_higress_plugins import IP_ACL, START_CONFIGS

Start = Callable[..., Gateway]
Check = Callable[[Gateway], None]

RATE_LIMIT = {"rule_name": "rl", "enable_on_path_suffix": ["*"],
              "limit_combinations": [{"name": "per-consumer",
                                      "match": [{"source": "consumer", "value": "*"}],
                                      "query_limits": {"per_minute": 2}}]}

# Behaviour plugins get the detailed configs of plugin-toolchains.md section 3; the rest start
# with the smallest config they accept (START_CONFIGS, else {}).
CONFIGS: dict[str, dict[str, object]] = {
    **START_CONFIGS,
    "transformer": TRANSFORMER,
    "gpustack-ip-acl": IP_ACL,
    "gpustack-rate-limit": RATE_LIMIT,
    "ai-data-masking": MASKING,
    # routeNameHeader alone starts but is a no-op: the plugin acts only on enabled paths.
    "gpustack-set-header-pre-route": {"routeNameHeader": "x-route",
                                      "clusterNameHeader": "x-cluster",
                                      "enableOnPathSuffix": ["*"]},
}

REQUEST = {"x-request-id": "req-1", "x-mse-consumer": "alice"}


def config_of(name: str) -> dict[str, object]:
    return CONFIGS.get(name, {})


def start(start_gateway: Start, upstream: str, name: str,
          config: dict[str, object] | None = None) -> Gateway:
    doc = gateway_doc(upstream) + wasm_plugin(name, config_of(name) if config is None else config)
    return start_gateway(doc)


def plugin_entry(gateway: Gateway) -> dict:  # type: ignore[type-arg]
    [plugin] = gateway.admin_json("/plugins")["plugins"]
    return plugin  # type: ignore[no-any-return]


def serves(gateway: Gateway) -> dict:  # type: ignore[type-arg]
    """A normal GET; it reaches the echo upstream and the echo is returned."""
    status, _, body = gateway.get("/v1/models", headers=dict(REQUEST))
    assert status == 200, (status, body, gateway.logs()[-3000:])
    return json.loads(body)  # type: ignore[no-any-return]


def check_transformer(gateway: Gateway) -> None:
    status, headers, body = gateway.request("POST", "/v1/chat", body=b'{"model": "qwen"}',
                                            headers={"content-type": "application/json"})
    assert status == 200
    echo = json.loads(body)
    assert header_values(echo, "x-added") == ["v1"]
    assert header_values(echo, "x-model") == ["qwen"]  # mapped from the body into a header
    assert echo["body"] == '{"model": "qwen"}'
    assert headers["x-resp"] == "r1"


def check_ip_acl(gateway: Gateway) -> None:
    serves(gateway)  # 127.0.0.1 / no x-forwarded-for
    status, _, body = gateway.get("/v1/models", headers={
        **REQUEST, "x-forwarded-for": "10.1.2.3"})
    assert status == 403
    assert json.loads(body) == {"message": "Client IP denied for this API key"}
    status, _, _ = gateway.get("/v1/models", headers={**REQUEST, "x-forwarded-for": "192.168.1.1"})
    assert status == 200


def check_rate_limit(gateway: Gateway) -> None:
    carol = {**REQUEST, "x-mse-consumer": "carol"}  # alice already spent one in serves()
    statuses = [gateway.get("/v1/chat", headers=carol)[0] for _ in range(4)]
    assert statuses == [200, 200, 429, 429]
    status, _, body = gateway.get("/v1/chat", headers={**REQUEST, "x-mse-consumer": "bob"})
    assert status == 200  # the limit is per consumer
    status, _, body = gateway.get("/v1/chat", headers=carol)
    assert json.loads(body)["error"]["code"] == 429
    assert "using local (per-instance) rate limiting mode" in gateway.logs()


def check_ai_data_masking(gateway: Gateway) -> None:
    payload = json.dumps({"messages": [{"role": "user", "content": "call 13800138000"}]})
    status, _, body = gateway.request("POST", "/v1/chat/completions", body=payload.encode(),
                                      headers={"content-type": "application/json"})
    assert status == 200
    echo = json.loads(body)
    assert json.loads(echo["body"])["messages"][0]["content"] == "call ****"
    assert header_values(echo, "content-length") == [str(len(echo["body"].encode()))]


def check_set_header_pre_route(gateway: Gateway) -> None:
    echo = serves(gateway)
    assert header_values(echo, "x-route") == ["main"]  # the route_name property
    # cluster_name is the gateway's cluster name, "backend": not the Istio form
    # outbound|PORT||HOST the plugin parses, so it sets an empty x-cluster (see the test below).
    assert header_values(echo, "x-cluster") == [""]


CHECKS: dict[str, Check] = {
    "transformer": check_transformer,
    "gpustack-ip-acl": check_ip_acl,
    "gpustack-rate-limit": check_rate_limit,
    "ai-data-masking": check_ai_data_masking,
    "gpustack-set-header-pre-route": check_set_header_pre_route,
}


def test_the_matrix_covers_all_fourteen() -> None:
    assert len(HIGRESS_PLUGIN_NAMES) == 14
    assert set(CONFIGS) <= set(HIGRESS_PLUGIN_NAMES)
    assert set(CHECKS) <= set(HIGRESS_PLUGIN_NAMES)


@pytest.mark.parametrize("name", HIGRESS_PLUGIN_NAMES)
def test_plugin_through_the_gateway(start_gateway: Start, upstream: str, name: str) -> None:
    gateway = start(start_gateway, upstream, name)
    plugin = plugin_entry(gateway)
    assert plugin["status"] == "ready", plugin
    serves(gateway)
    if name in CHECKS:
        CHECKS[name](gateway)
    plugin = plugin_entry(gateway)
    assert plugin["status"] == "ready", plugin
    assert plugin["crashes"] == 0, gateway.logs()[-3000:]


def test_ip_acl_by_source_address(start_gateway: Start, upstream: str) -> None:
    """No realIPHeader: the plugin reads source.address, the peer of the downstream connection."""
    config = {"consumers": {"alice": {"deniedCidrs": ["127.0.0.0/8"]},
                            "*": {"allowedCidrs": ["0.0.0.0/0"]}}}
    gateway = start(start_gateway, upstream, "gpustack-ip-acl", config)
    status, _, body = gateway.get("/v1/models", headers=dict(REQUEST))
    assert status == 403
    assert json.loads(body) == {"message": "Client IP denied for this API key"}
    status, _, _ = gateway.get("/v1/models", headers={**REQUEST, "x-mse-consumer": "bob"})
    assert status == 200
    assert plugin_entry(gateway)["crashes"] == 0


def test_set_header_pre_route_with_an_istio_cluster_name(start_gateway: Start,
                                                         upstream: str) -> None:
    """A route whose cluster is outbound|PORT||HOST: the plugin puts HOST in clusterNameHeader."""
    host, port = upstream.rsplit(":", 1)
    doc = f"""apiVersion: wasmgate.io/v1alpha1
kind: Gateway
metadata: {{name: test}}
spec:
  labels: {{app: edge}}
  routes:
  - name: main
    cluster: "outbound|{port}||{host}"
"""
    name = "gpustack-set-header-pre-route"
    gateway = start_gateway(doc + wasm_plugin(name, config_of(name)))
    echo = serves(gateway)
    assert header_values(echo, "x-route") == ["main"]
    assert header_values(echo, "x-cluster") == [host]
    assert plugin_entry(gateway)["crashes"] == 0
