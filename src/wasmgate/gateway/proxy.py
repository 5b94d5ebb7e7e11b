"""What exchanges read: the routing table, the filter chain, the upstream pools and stats.

A `ProxyState` is immutable once built; a reload builds a new one and swaps it in, while
in-flight exchanges keep the state they started with (and so the plugins they started with).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..api.gateway import Cluster, GatewaySpec, resolve_upstream
from ..chain import FilterChain
from ..runtime.serde import Pairs
from .access_log import AccessLog
from .http1 import header_value
from .server import IDLE_TIMEOUT, REQUEST_HEAD_TIMEOUT, RouteTarget
from .stats import GatewayStats
from .upstream import Endpoint, UpstreamPools


class Router:
    """Gateway routes in order; the first match wins (prefix, host, exact headers)."""

    def __init__(self, spec: GatewaySpec) -> None:
        self.spec = spec
        self._targets: dict[str, RouteTarget] = {}
        for route in spec.routes:
            target = _target(route.name, route.cluster, spec.clusters)
            if target is not None:
                self._targets[route.name] = target
        self._compiled = [(r, r.match.prefix.encode("latin-1"),
                           not r.match.headers and r.match.host is None) for r in spec.routes]

    def route(self, headers: Pairs) -> RouteTarget | None:
        path_raw = header_value(headers, b":path") or b"/"
        path = host = None
        lookup: dict[str, str] | None = None
        for route, prefix, simple in self._compiled:
            if simple:  # prefix only: no decoding, no header map
                if path_raw.startswith(prefix):
                    return self._targets.get(route.name)
                continue
            if path is None:
                path = path_raw.decode("latin-1")
                host = (header_value(headers, b":authority") or b"").decode("latin-1")
                lookup = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers
                          if not k.startswith(b":")}
            if route.match.matches(path, host, lookup or {}):
                return self._targets.get(route.name)
        return None

    def resolve(self, name: str) -> Cluster | tuple[str, int] | None:
        """An upstream name from a plugin (http_call, redis): cluster, outbound|..., host:port."""
        found = resolve_upstream(self.spec.clusters, name)
        if found is None or isinstance(found, Cluster):
            return found
        return (found.host, found.port)


def _target(route_name: str, cluster_name: str, clusters: list[Cluster]) -> RouteTarget | None:
    found = resolve_upstream(clusters, cluster_name)
    if found is None:
        return None
    if isinstance(found, Cluster):
        endpoints = [Endpoint(e.host, e.port, e.tls) for e in found.targets()]
        return RouteTarget(route_name, found.name, endpoints, found.timeout_ms / 1000,
                           found.connect_timeout_ms / 1000)
    return RouteTarget(route_name, cluster_name, [Endpoint(found.host, found.port)])


@dataclass
class ProxyState:
    router: Router
    chain: FilterChain | None
    pools: UpstreamPools
    stats: GatewayStats
    generation: int = 0
    access_log: AccessLog | None = None
    head_timeout: float = REQUEST_HEAD_TIMEOUT
    """Seconds a request head may take (408 after)."""
    idle_timeout: float = IDLE_TIMEOUT
    """Seconds a downstream connection may stay idle (closed after)."""
    exchanges: int = field(default=0)
