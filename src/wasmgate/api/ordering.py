"""Which WasmPlugins apply to a workload's listener, and in what order (spec §2).

Selection (Istio's ``WorkloadPolicyMatcher.ShouldAttachPolicy`` for a non-waypoint workload):

* Only plugins in the workload's namespace and in the root namespace are considered.
* A plugin without ``targetRefs``/``targetRef`` attaches by ``selector.matchLabels`` being a
  subset of the workload labels; no selector means every workload of its namespace (mesh-wide
  when that is the root namespace).
* A plugin with ``targetRefs`` ignores its selector (it has none: at most one of the three) and
  attaches only to a Gateway API gateway: the workload labels carry
  ``gateway.networking.k8s.io/gateway-name`` (:attr:`Gateway.workload_labels` adds it, set to the
  Gateway's name), a ref is ``gateway.networking.k8s.io`` ``Gateway`` with that name, and the
  plugin lives in the workload's namespace (refs are same-namespace; a root-namespace plugin with
  targetRefs does not go mesh-wide). ``GatewayClass``, ``Service`` and ``ServiceEntry`` refs only
  ever attach to waypoints, which wasmgate is not, so they never attach. Workloads without the
  gateway-name label ignore every plugin that has targetRefs.
* Selector-based plugins also apply to gateways (the default of Istio's
  ``ENABLE_SELECTOR_BASED_K8S_GATEWAY_POLICY``).

Then the chain type (HTTP chains take HTTP and unspecified; network chains NETWORK) and ``match``
(Istio's ``matchTrafficSelectors``) filter, and the result is ordered: phases AUTHN, AUTHZ, STATS,
UNSPECIFIED; inside a phase by priority descending (unset = INT32_MIN), ties by namespace (the
workload's first, then the root), then creationTimestamp, name, namespace.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Literal

from ._common import INT32_MIN
from .enums import Phase, WorkloadMode
from .gateway import GATEWAY_NAME_LABEL, Gateway
from .resources import GATEWAY_API_GROUP, WasmPlugin

ListenerMode = Literal["CLIENT", "SERVER", "UNDEFINED"]
"""Listener class: gateways and sidecar outbound are CLIENT, sidecar inbound SERVER; UNDEFINED
with no port is Istio's "any listener", which every ``match`` accepts."""
ChainType = Literal["HTTP", "NETWORK"]
PHASE_ORDER: tuple[Phase, ...] = (Phase.AUTHN, Phase.AUTHZ, Phase.STATS, Phase.UNSPECIFIED_PHASE)
_NO_TIME = datetime.min.replace(tzinfo=UTC)


def attaches(
    plugin: WasmPlugin, labels: Mapping[str, str], namespace: str, root_namespace: str
) -> bool:
    """Whether the plugin's selector or targetRefs pick this workload (see the module doc)."""
    if plugin.namespace not in (namespace, root_namespace):
        return False
    refs = plugin.target_refs()
    if not refs:
        selector = plugin.spec.selector
        return selector is None or all(labels.get(k) == v for k, v in selector.match_labels.items())
    gateway_name = labels.get(GATEWAY_NAME_LABEL)
    if gateway_name is None or plugin.namespace != namespace:
        return False
    return any(
        ref.canonical_group == GATEWAY_API_GROUP
        and ref.kind == "Gateway"
        and ref.name == gateway_name
        for ref in refs
    )


def matches_type(plugin: WasmPlugin, chain: ChainType) -> bool:
    return plugin.plugin_type.value == chain


def matches_listener(plugin: WasmPlugin, mode: ListenerMode, port: int | None) -> bool:
    """``match``: OR over entries, each mode AND ports; no entries match every listener."""
    number = port or 0
    if (mode == "UNDEFINED" and number == 0) or not plugin.spec.match:
        return True
    for selector in plugin.spec.match:
        wanted = selector.mode
        mode_ok = wanted in (WorkloadMode.UNDEFINED, WorkloadMode.CLIENT_AND_SERVER) or (
            wanted.value == mode
        )
        if mode_ok and (not selector.ports or any(p.number == number for p in selector.ports)):
            return True
    return False


def _namespaces(namespace: str, root_namespace: str) -> list[str]:
    return list(dict.fromkeys((namespace, root_namespace)))


def _creation_key(plugin: WasmPlugin) -> tuple[datetime, str, str]:
    return (plugin.metadata.creation_timestamp or _NO_TIME, plugin.name, plugin.namespace)


def _priority(plugin: WasmPlugin) -> int:
    priority = plugin.spec.priority
    return INT32_MIN if priority is None else priority


def order_buckets(
    plugins: Iterable[WasmPlugin], namespaces: Iterable[str]
) -> list[tuple[Phase, list[WasmPlugin]]]:
    """Istio's ordering of already-selected plugins: one (phase, plugins) per phase, in chain
    order (empty phases included); ``namespaces`` in scan order."""
    presorted = sorted(plugins, key=_creation_key)
    walked = [p for ns in dict.fromkeys(namespaces) for p in presorted if p.namespace == ns]
    buckets: list[tuple[Phase, list[WasmPlugin]]] = []
    for phase in PHASE_ORDER:
        in_phase = [p for p in walked if p.spec.phase is phase]
        buckets.append((phase, sorted(in_phase, key=_priority, reverse=True)))
    return buckets


def phase_buckets(
    plugins: Iterable[WasmPlugin],
    labels: Mapping[str, str],
    namespace: str,
    root_namespace: str = "istio-system",
    listener_mode: ListenerMode = "CLIENT",
    port: int | None = None,
    plugin_type: ChainType = "HTTP",
) -> list[tuple[Phase, list[WasmPlugin]]]:
    """:func:`select_plugins`, grouped as (phase, plugins) for AUTHN, AUTHZ, STATS, UNSPECIFIED."""
    if listener_mode not in ("CLIENT", "SERVER", "UNDEFINED"):
        raise ValueError(
            f"listener_mode must be CLIENT, SERVER or UNDEFINED, not {listener_mode!r}"
        )
    if plugin_type not in ("HTTP", "NETWORK"):
        raise ValueError(f"plugin_type must be HTTP or NETWORK, not {plugin_type!r}")
    chosen = [
        p
        for p in plugins
        if attaches(p, labels, namespace, root_namespace)
        and matches_type(p, plugin_type)
        and matches_listener(p, listener_mode, port)
    ]
    return order_buckets(chosen, _namespaces(namespace, root_namespace))


def select_plugins(
    plugins: Iterable[WasmPlugin],
    labels: Mapping[str, str],
    namespace: str,
    root_namespace: str = "istio-system",
    listener_mode: ListenerMode = "CLIENT",
    port: int | None = None,
    plugin_type: ChainType = "HTTP",
) -> list[WasmPlugin]:
    """The plugins of one listener's filter chain, in the order Istio installs them.

    ``port`` is the listener's port (None = 0, which only port-less ``match`` entries accept).
    """
    buckets = phase_buckets(
        plugins, labels, namespace, root_namespace, listener_mode, port, plugin_type
    )
    return [plugin for _, in_phase in buckets for plugin in in_phase]


def select_for_gateway(
    plugins: Iterable[WasmPlugin],
    gateway: Gateway,
    *,
    port: int | None = None,
    plugin_type: ChainType = "HTTP",
) -> list[WasmPlugin]:
    """:func:`select_plugins` for a wasmgate Gateway: its workload labels, namespaces, the
    CLIENT listener class (as for any Istio gateway) and its listen port unless given."""
    spec = gateway.spec
    return select_plugins(
        plugins,
        gateway.workload_labels,
        spec.namespace,
        spec.root_namespace,
        "CLIENT",
        spec.listen.port if port is None else port,
        plugin_type,
    )


def why_not_selected(plugin: WasmPlugin, gateway: Gateway) -> str:
    """Why :func:`select_for_gateway` leaves `plugin` out (the first reason found)."""
    spec = gateway.spec
    if not attaches(plugin, gateway.workload_labels, spec.namespace, spec.root_namespace):
        return (f"its namespace, selector or targetRefs do not take gateway {gateway.name} "
                f"(labels {dict(gateway.workload_labels)}, namespace {spec.namespace})")
    if not matches_type(plugin, "HTTP"):
        return "type NETWORK: wasmgate runs HTTP plugins"
    if not matches_listener(plugin, "CLIENT", spec.listen.port):
        return (f"its match (mode/ports) does not take this gateway's listener (CLIENT, "
                f"port {spec.listen.port})")
    return "selected"


__all__ = [
    "PHASE_ORDER",
    "ChainType",
    "ListenerMode",
    "attaches",
    "matches_listener",
    "matches_type",
    "order_buckets",
    "phase_buckets",
    "select_for_gateway",
    "select_plugins",
    "why_not_selected",
]
