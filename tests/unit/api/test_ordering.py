"""Selection and Istio's order: phases, priorities, ties, namespaces, match, targetRefs."""

from __future__ import annotations

from typing import Any

import pytest

from wasmgate.api import GATEWAY_NAME_LABEL, Gateway, Phase, load_paths
from wasmgate.api.ordering import order_buckets, phase_buckets, select_for_gateway, select_plugins

from .helpers import T0, plugin
from .test_loading import DATA

LABELS = {"app": "web", "version": "v1"}
GW_REF = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": "edge"}


def names(plugins: list[Any]) -> list[str]:
    return [p.filter_name for p in plugins]


def select(plugins: list[Any], **kwargs: Any) -> list[str]:
    kwargs.setdefault("labels", LABELS)
    kwargs.setdefault("namespace", "default")
    return names(select_plugins(plugins, **kwargs))


def test_phases_then_priority_descending_with_unset_last() -> None:
    plugins = [
        plugin("stats", phase="STATS"),
        plugin("none-unset"),
        plugin("none-neg", priority=-5),
        plugin("authz-low", phase="AUTHZ", priority=1),
        plugin("authz-high", phase="AUTHZ", priority=100),
        plugin("authn-unset", phase="AUTHN"),
        plugin("authn-min", phase="AUTHN", priority=-(2**31)),
        plugin("authn-neg", phase="AUTHN", priority=-1000),
        plugin("authn-zero", phase="AUTHN", priority=0),
    ]
    assert select(plugins) == [
        "default.authn-zero",
        "default.authn-neg",
        # unset counts as INT32_MIN: tied with the explicit minimum, ordered by creation then name
        "default.authn-min",
        "default.authn-unset",
        "default.authz-high",
        "default.authz-low",
        "default.stats",
        "default.none-neg",
        "default.none-unset",
    ]


def test_ties_by_namespace_then_creation_then_name_then_namespace() -> None:
    plugins = [
        plugin("root-old", "istio-system", created=0, priority=5),
        plugin("b", created=10, priority=5),
        plugin("a", created=10, priority=5),
        plugin("old", created=1, priority=5),
        plugin("higher", "istio-system", created=99, priority=6),
    ]
    assert select(plugins) == [
        "istio-system.higher",
        "default.old",
        "default.a",
        "default.b",
        "istio-system.root-old",
    ]


def test_same_name_in_both_namespaces() -> None:
    plugins = [plugin("x", "istio-system", created=0), plugin("x", "default", created=5)]
    assert select(plugins) == ["default.x", "istio-system.x"]
    # with the workload in the root namespace there is only one namespace to walk
    assert names(order_buckets(plugins, ["istio-system"])[3][1]) == ["istio-system.x"]


def test_namespace_walk_order_decides_between_equal_plugins() -> None:
    # (creation, name, namespace) presorts; walking the namespaces then groups by namespace
    plugins = [plugin("x", "zz", created=0), plugin("x", "aa", created=0)]
    ordered = order_buckets(plugins, ["zz", "aa"])[3][1]
    assert names(ordered) == ["zz.x", "aa.x"]
    ordered = order_buckets(plugins, ["aa", "zz"])[3][1]
    assert names(ordered) == ["aa.x", "zz.x"]


def test_selectors() -> None:
    plugins = [
        plugin("all"),
        plugin("empty", selector={"matchLabels": {}}),
        plugin("match", selector={"matchLabels": {"app": "web"}}),
        plugin("both", selector={"matchLabels": {"app": "web", "version": "v1"}}),
        plugin("wrong-value", selector={"matchLabels": {"app": "db"}}),
        plugin("extra-key", selector={"matchLabels": {"app": "web", "zone": "a"}}),
        plugin("other-ns", "team-b"),
        plugin("mesh", "istio-system"),
        plugin("mesh-sel", "istio-system", selector={"matchLabels": {"app": "web"}}),
        plugin("mesh-miss", "istio-system", selector={"matchLabels": {"app": "db"}}),
    ]
    assert sorted(select(plugins)) == [
        "default.all",
        "default.both",
        "default.empty",
        "default.match",
        "istio-system.mesh",
        "istio-system.mesh-sel",
    ]
    assert sorted(select(plugins, root_namespace="elsewhere")) == [
        "default.all",
        "default.both",
        "default.empty",
        "default.match",
    ]
    assert select(plugins, namespace="team-b", labels={}) == [
        "team-b.other-ns",
        "istio-system.mesh",
    ]


def test_target_refs() -> None:
    plugins = [
        plugin("to-edge", targetRefs=[GW_REF]),
        plugin("legacy", targetRef=GW_REF),
        plugin("to-other", targetRefs=[GW_REF | {"name": "other"}]),
        plugin("class", targetRefs=[{**GW_REF, "kind": "GatewayClass", "name": "istio"}]),
        plugin("service", targetRefs=[{"kind": "Service", "name": "edge"}]),
        plugin("root", "istio-system", targetRefs=[GW_REF]),
        plugin("by-label"),
    ]
    gateway_labels = {GATEWAY_NAME_LABEL: "edge", "app": "web"}
    assert sorted(select(plugins, labels=gateway_labels)) == [
        "default.by-label",
        "default.legacy",
        "default.to-edge",
    ]
    # without the gateway-name label, plugins with targetRefs never attach
    assert select(plugins) == ["default.by-label"]


def test_type_filter() -> None:
    plugins = [plugin("u"), plugin("h", type="HTTP"), plugin("n", type="NETWORK")]
    assert sorted(select(plugins)) == ["default.h", "default.u"]
    assert select(plugins, plugin_type="NETWORK") == ["default.n"]


@pytest.mark.parametrize(
    ("mode", "port", "expected"),
    [
        ("CLIENT", 8080, ["any", "both", "client", "client-8080", "multi", "undefined-mode"]),
        ("CLIENT", 9090, ["any", "both", "client", "multi", "undefined-mode"]),
        ("SERVER", 8080, ["any", "both", "multi", "server", "undefined-mode"]),
        ("SERVER", 443, ["any", "both", "multi", "server", "server-443", "undefined-mode"]),
        ("CLIENT", None, ["any", "both", "client", "multi", "undefined-mode"]),
        ("UNDEFINED", 8080, ["any", "both", "undefined-mode"]),
        # Istio's "any listener": every selector matches
        ("UNDEFINED", None, ["any", "both", "client", "client-8080", "multi", "server",
                             "server-443", "undefined-mode"]),
    ],
)  # fmt: skip
def test_match(mode: str, port: int | None, expected: list[str]) -> None:
    plugins = [
        plugin("any"),
        plugin("undefined-mode", match=[{"mode": "UNDEFINED"}]),
        plugin("both", match=[{"mode": "CLIENT_AND_SERVER"}]),
        plugin("client", match=[{"mode": "CLIENT"}]),
        plugin("server", match=[{"mode": "SERVER"}]),
        plugin("client-8080", match=[{"mode": "CLIENT", "ports": [{"number": 8080}]}]),
        plugin("server-443", match=[{"mode": "SERVER", "ports": [{"number": 443}]}]),
        plugin("multi", match=[{"mode": "CLIENT"}, {"mode": "SERVER"}]),
    ]
    got = select(plugins, listener_mode=mode, port=port)
    assert sorted(n.removeprefix("default.") for n in got) == expected


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="listener_mode"):
        select_plugins([], {}, "default", listener_mode="INBOUND")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="plugin_type"):
        select_plugins([], {}, "default", plugin_type="TCP")  # type: ignore[arg-type]


def test_phase_buckets() -> None:
    plugins = [plugin("s", phase="STATS"), plugin("a", phase="AUTHN"), plugin("u")]
    buckets = phase_buckets(plugins, LABELS, "default")
    assert [(phase, names(ps)) for phase, ps in buckets] == [
        (Phase.AUTHN, ["default.a"]),
        (Phase.AUTHZ, []),
        (Phase.STATS, ["default.s"]),
        (Phase.UNSPECIFIED_PHASE, ["default.u"]),
    ]


def test_select_for_the_sample_gateway() -> None:
    result = load_paths([DATA / "sample.yaml"], now=T0)
    gateway = result.gateway
    assert isinstance(gateway, Gateway)
    assert names(select_for_gateway(result.plugins, gateway)) == [
        "istio-system.openid-connect",
        "shop.basic-auth",
        "shop.header-stats",
    ]
    # basic-auth only matches port 8080
    assert names(select_for_gateway(result.plugins, gateway, port=9000)) == [
        "istio-system.openid-connect",
        "shop.header-stats",
    ]
    elsewhere = gateway.model_copy(update={"spec": gateway.spec.model_copy(update={"labels": {}})})
    assert names(select_for_gateway(result.plugins, elsewhere)) == ["shop.basic-auth"]
