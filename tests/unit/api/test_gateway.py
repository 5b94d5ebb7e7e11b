"""The Gateway resource: defaults, validation, upstream names, routes."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from wasmgate.api import GATEWAY_NAME_LABEL, Address, Cluster, Endpoint, Gateway, Redis

from .helpers import load_docs

FULL = """
apiVersion: wasmgate.io/v1alpha1
kind: Gateway
metadata: {name: edge, labels: {tier: front}, annotations: {note: x}}
spec:
  listen: "[::1]:0"
  admin: 0.0.0.0:9902
  labels: {app: web}
  namespace: shop
  rootNamespace: mesh-root
  clusters:
    - name: web
      endpoints: ["127.0.0.1:9000", "http://web.local", "https://secure.local:8443"]
      connectTimeoutMs: 100
      timeoutMs: 200
      tls: false
  routes:
    - name: api
      match: {prefix: /api, headers: {X-Version: "2"}, host: "*.example.com"}
      cluster: web
  redis:
    - {name: cache, address: "127.0.0.1:6379", username: u, password: p}
  limits: {memoryMiB: 128, callbackMs: 250}
  bodyBufferLimitBytes: 4096
"""


def gateway(**spec: Any) -> Gateway:
    return Gateway.model_validate({"metadata": {"name": "edge"}, "spec": spec})


def gateway_errors(**spec: Any) -> list[tuple[str, str]]:
    doc = {"apiVersion": "wasmgate.io/v1alpha1", "kind": "Gateway", "metadata": {"name": "edge"}}
    return [(e.path, e.reason) for e in load_docs(doc | {"spec": spec}).errors]


def test_every_field_round_trips() -> None:
    source = yaml.safe_load(FULL)
    gw = Gateway.model_validate(source)
    assert gw.to_dict() == source
    assert Gateway.model_validate(gw.to_dict()) == gw
    assert gw.spec.listen == Address("::1", 0) and str(gw.spec.listen) == "[::1]:0"
    assert gw.spec.limits is not None and gw.spec.limits.memory_mib == 128
    assert gw.spec.root_namespace == "mesh-root"


def test_defaults() -> None:
    gw = Gateway.model_validate({"apiVersion": "wasmgate.io/v1alpha1", "metadata": {"name": "g"}})
    spec = gw.spec
    assert spec.listen == Address("127.0.0.1", 8080)
    assert spec.admin == Address("127.0.0.1", 9901)
    assert (spec.namespace, spec.root_namespace) == ("default", "istio-system")
    assert spec.body_buffer_limit_bytes == 1024 * 1024
    assert spec.limits is None and spec.clusters == [] and spec.routes == [] and spec.redis == []


def test_workload_labels_carry_the_gateway_name() -> None:
    assert gateway(labels={"app": "x"}).workload_labels == {GATEWAY_NAME_LABEL: "edge", "app": "x"}
    assert gateway(labels={GATEWAY_NAME_LABEL: "other"}).workload_labels == {
        GATEWAY_NAME_LABEL: "other"
    }


def test_cluster_targets() -> None:
    gw = Gateway.model_validate(yaml.safe_load(FULL))
    web = gw.cluster("web")
    assert web is not None
    assert web.targets() == [
        Endpoint("127.0.0.1", 9000, False),
        Endpoint("web.local", 80, False),
        Endpoint("secure.local", 8443, True),
    ]
    tls = Cluster(name="t", endpoints=["a:1", "http://b"], tls=True)
    assert tls.targets() == [Endpoint("a", 1, True), Endpoint("b", 80, False)]
    assert Cluster(name="s", endpoints=["https://s"]).targets() == [Endpoint("s", 443, True)]


def test_password_is_not_in_repr() -> None:
    assert "s3cret" not in repr(Redis(name="r", address="h:1", password="s3cret"))


@pytest.mark.parametrize(
    ("spec", "path", "reason"),
    [
        ({"listen": "8080"}, "spec.listen", "has no port"),
        ({"listen": "host:99999"}, "spec.listen", "0..65535"),
        ({"listen": "::1:80"}, "spec.listen", "brackets"),
        ({"admin": 9901}, "spec.admin", "host:port"),
        ({"namespace": "Shop"}, "spec.namespace", "DNS-1123 label"),
        ({"rootNamespace": ""}, "spec.rootNamespace", "DNS-1123 label"),
        ({"clusters": [{"name": "c", "endpoints": []}]}, "spec.clusters[0].endpoints",
         "at least 1"),
        ({"clusters": [{"name": "c", "endpoints": ["h:0"]}]}, "spec.clusters[0].endpoints[0]",
         "1..65535"),
        ({"clusters": [{"name": "c", "endpoints": ["ftp://h"]}]}, "spec.clusters[0].endpoints[0]",
         "http:// or https://"),
        ({"clusters": [{"name": "c", "endpoints": ["http://h/path"]}]},
         "spec.clusters[0].endpoints[0]", "no path"),
        ({"clusters": [{"name": "c", "endpoints": ["h:1"], "timeoutMs": 0}]},
         "spec.clusters[0].timeoutMs", "greater than 0"),
        ({"clusters": [{"name": "c", "endpoints": ["h:1"], "tsl": True}]},
         "spec.clusters[0].tsl", "did you mean 'tls'?"),
        ({"clusters": [{"name": "c", "endpoints": ["h:1"]}, {"name": "c", "endpoints": ["h:2"]}]},
         "spec.clusters[1].name", "duplicate name 'c'"),
        ({"routes": [{"name": "r", "cluster": "nowhere"}]}, "spec.routes[0].cluster",
         "neither a cluster"),
        ({"routes": [{"name": "r", "cluster": "h:1", "match": {"prefix": "api"}}]},
         "spec.routes[0].match.prefix", "pattern"),
        ({"routes": [{"name": "r", "cluster": "h:1"}, {"name": "r", "cluster": "h:1"}]},
         "spec.routes[1].name", "duplicate name 'r'"),
        ({"redis": [{"name": "r", "address": "nohost"}]}, "spec.redis[0].address", "no port"),
        ({"limits": {"memoryMib": 1}}, "spec.limits.memoryMib", "did you mean 'memoryMiB'?"),
        ({"limits": {"callbackMs": -1}}, "spec.limits.callbackMs", "greater than 0"),
        ({"bodyBufferLimitBytes": -1}, "spec.bodyBufferLimitBytes", "greater than or equal to 0"),
        ({"listener": "x:1"}, "spec.listener", "did you mean 'listen'?"),
    ],
)  # fmt: skip
def test_validation_rule(spec: dict[str, Any], path: str, reason: str) -> None:
    errors = gateway_errors(**spec)
    assert len(errors) == 1, errors
    assert errors[0][0] == path
    assert reason in errors[0][1]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("backend", "cluster:backend"),
        ("outbound|6379||redis.static", "cluster:outbound|6379||redis.static"),
        ("outbound|6379||redis.static?buffer_flush_timeout=3",
         "cluster:outbound|6379||redis.static"),
        ("outbound|80||httpbin.dns", Address("httpbin.dns", 80)),
        ("outbound|8080|v1|reviews.default.svc.cluster.local",
         Address("reviews.default.svc.cluster.local", 8080)),
        ("outbound|443||api.example.com?x=1", Address("api.example.com", 443)),
        ("127.0.0.1:9000", Address("127.0.0.1", 9000)),
        ("[::1]:9000", Address("::1", 9000)),
        ("svc.local:80", Address("svc.local", 80)),
        ("unknown", None),
        ("outbound|http||host", None),
        ("outbound|70000||host", None),
        ("outbound|80||", None),
        ("inbound|80||", None),
        ("host:0", None),
        ("http://host:80", None),
    ],
)  # fmt: skip
def test_resolve_upstream(name: str, expected: object) -> None:
    gw = gateway(
        clusters=[
            {"name": "backend", "endpoints": ["10.0.0.1:80"]},
            {"name": "outbound|6379||redis.static", "endpoints": ["10.0.0.2:6379"]},
        ]
    )
    found = gw.resolve_upstream(name)
    if isinstance(found, Cluster):
        found = f"cluster:{found.name}"
    assert found == expected


def test_explicit_cluster_wins_over_the_name_form() -> None:
    gw = gateway(clusters=[{"name": "127.0.0.1:9000", "endpoints": ["10.9.9.9:1"]}])
    found = gw.resolve_upstream("127.0.0.1:9000")
    assert isinstance(found, Cluster) and found.targets()[0].host == "10.9.9.9"


def test_resolve_redis() -> None:
    gw = gateway(redis=[{"name": "outbound|6379||redis.static", "address": "127.0.0.1:6380"}])
    found = gw.resolve_redis("outbound|6379||redis.static?buffer_flush_timeout=3")
    assert isinstance(found, Redis) and found.address == Address("127.0.0.1", 6380)
    assert gw.resolve_redis("outbound|6379||other.static") == Address("other.static", 6379)
    assert gw.resolve_redis("nope") is None


def test_routes_route_to_the_first_match() -> None:
    gw = gateway(
        clusters=[{"name": "a", "endpoints": ["h:1"]}, {"name": "b", "endpoints": ["h:2"]}],
        routes=[
            {"name": "v2", "match": {"prefix": "/api", "headers": {"X-V": "2"}}, "cluster": "a"},
            {"name": "host", "match": {"host": "*.example.com"}, "cluster": "a"},
            {"name": "exact", "match": {"host": "shop.test"}, "cluster": "b"},
            {"name": "api", "match": {"prefix": "/api"}, "cluster": "b"},
        ],
    )

    def name(path: str, host: str | None = None, **headers: str) -> str | None:
        route = gw.route_for(path, host, {k.replace("_", "-"): v for k, v in headers.items()})
        return route.name if route else None

    assert name("/api/x", x_v="2") == "v2"
    assert name("/api/x", X_V="2") == "v2"
    assert name("/api/x", x_v="3") == "api"
    assert name("/x", "a.example.com:8443") == "host"
    assert name("/x", "example.com") is None
    assert name("/x", "SHOP.test") == "exact"
    assert name("/x") is None
    assert name("/api") == "api"
