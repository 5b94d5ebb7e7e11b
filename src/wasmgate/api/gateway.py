"""The ``wasmgate.io/v1alpha1`` Gateway: what Istio would take from its own configuration.

Where the gateway listens, which workload it is (labels, namespace: these decide which
WasmPlugins attach), its upstream clusters and routes, Redis endpoints, and limits. Plugins name
upstreams by cluster name; :meth:`Gateway.resolve_upstream` turns those names into a cluster or
an address as users of Istio/Higress plugins expect (plugin-toolchains spec §5).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal, NamedTuple
from urllib.parse import parse_qsl, unquote, urlsplit

from pydantic import AfterValidator, Field, PositiveInt, Strict, model_validator

from ._common import (
    Address,
    DnsLabel,
    DnsSubdomain,
    HostPort,
    ListenAddress,
    NonEmpty,
    PathError,
    SpecModel,
    split_host_port,
)
from .access_log import FormatError, parse_format, parse_json_format

GATEWAY_API_VERSION = "wasmgate.io/v1alpha1"
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
"""The label Istio puts on a Gateway API gateway's pods; targetRefs attach through it."""
MIB = 1024 * 1024


class Endpoint(NamedTuple):
    host: str
    port: int
    tls: bool


def parse_endpoint(text: str, default_tls: bool = False) -> Endpoint:
    """``host:port``, ``http://host[:port]`` or ``https://host[:port]`` (no path)."""
    scheme, sep, rest = text.partition("://")
    if not sep:
        address = split_host_port(text)
        return Endpoint(address.host, address.port, default_tls)
    if scheme not in ("http", "https"):
        raise ValueError(f"{text!r}: endpoint URLs are http:// or https://")
    hostport, _, path = rest.partition("/")
    if path or any(c in hostport for c in "?#@"):
        raise ValueError(f"{text!r}: an endpoint URL has no path, query or credentials")
    tls = scheme == "https"
    has_port = hostport.rsplit("]", 1)[-1].count(":") == 1
    if not has_port:
        hostport = f"{hostport}:{443 if tls else 80}"
    address = split_host_port(hostport)
    return Endpoint(address.host, address.port, tls)


def _check_endpoint(text: str) -> str:
    parse_endpoint(text)
    return text


SHARED_DATA_PREFIX = "wasmgate:shared:"
SHARED_DATA_TIMEOUT_MS = 250


class SharedDataURL(NamedTuple):
    """Where ``spec.sharedData`` keeps plugin shared data: a Redis, and how to use it."""

    tls: bool
    host: str
    port: int
    username: str | None
    password: str | None
    db: int
    prefix: str = SHARED_DATA_PREFIX
    """Every key the store writes starts with it (several gateway fleets can share one Redis)."""
    timeout_ms: int = SHARED_DATA_TIMEOUT_MS
    """Connect and command timeout: the longest a host call can block the event loop."""


def parse_shared_data_url(text: str) -> SharedDataURL:
    """``redis://[[user]:password@]host[:port][/db][?prefix=P&timeout_ms=N]``, or ``rediss://``
    (TLS, the system's CAs). Errors never repeat the password."""
    scheme, sep, _ = text.partition("://")
    if not sep or scheme.lower() not in ("redis", "rediss"):
        raise ValueError(f"sharedData must be a redis:// or rediss:// URL, not "
                         f"{redact_url(text)!r}")
    parts = urlsplit(text)
    shown = redact_url(text)
    try:
        port = 6379 if parts.port is None else parts.port
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise ValueError(f"{shown!r}: the port is not a number in 1..65535")
    if not parts.hostname:
        raise ValueError(f"{shown!r}: no host")
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError(f"{shown!r}: the path is the database number (/0, /1, ...)")
    if parts.fragment:
        raise ValueError(f"{shown!r}: a sharedData URL has no #fragment")
    options: dict[str, str] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name not in ("prefix", "timeout_ms"):
            raise ValueError(f"{shown!r}: unknown option {name!r} (known: prefix, timeout_ms)")
        options[name] = value
    prefix = options.get("prefix", SHARED_DATA_PREFIX)
    if not prefix:
        raise ValueError(f"{shown!r}: prefix is empty")
    timeout = options.get("timeout_ms", str(SHARED_DATA_TIMEOUT_MS))
    if not timeout.isdigit() or int(timeout) == 0:
        raise ValueError(f"{shown!r}: timeout_ms is a positive number of milliseconds")
    return SharedDataURL(
        tls=scheme.lower() == "rediss", host=parts.hostname, port=port,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password is not None else None,
        db=int(path or 0), prefix=prefix, timeout_ms=int(timeout))


_SECRET_PARAM = re.compile(r"([?&][^=&#]*(?:secret|password|passwd|token|credential|signature|"
                           r"sig|api[-_]?key|auth)[^=&#]*=)[^&#]*", re.IGNORECASE)


def redact_url(text: str) -> str:
    """The URL with any password, and the values of query parameters named like secrets
    (`token`, `X-Amz-Signature`...), replaced by ``[redacted]``, also when the password holds
    raw ``/ ? # @`` (an invalid URL is still echoed in errors): better to redact too much."""
    scheme, sep, rest = text.partition("://")
    if not sep:
        return text
    query = min((i for i in map(rest.find, "?#") if i >= 0), default=len(rest))
    at = rest.rfind("@", 0, query)
    if at < 0:
        at = rest.rfind("@")  # a raw '?' or '#' in the password
    userinfo = rest[:at] if at >= 0 else ""
    colon = userinfo.find(":")
    if colon >= 0 and "/" not in userinfo[:colon]:
        rest = f"{userinfo[:colon]}:[redacted]@{rest[at + 1:]}"
    return scheme + "://" + redact_secret_params(rest)


def redact_secret_params(text: str) -> str:
    """`text` with the values of query parameters named like secrets replaced."""
    return _SECRET_PARAM.sub(r"\1[redacted]", text)


def _check_shared_data(text: str) -> str:
    parse_shared_data_url(text)
    return text


def parse_cluster_name(name: str) -> Address | None:
    """``outbound|PORT|SUBSET|HOST[?options]`` or ``host:port``; None for anything else."""
    base = name.split("?", 1)[0]
    parts = base.split("|")
    if len(parts) == 4 and parts[0] == "outbound":
        port, host = parts[1], parts[3].strip("[]")
        if host and port.isdigit() and 1 <= int(port) <= 65535:
            return Address(host, int(port))
        return None
    if len(parts) != 1:
        return None
    try:
        return split_host_port(base)
    except ValueError:
        return None


class Cluster(SpecModel):
    name: NonEmpty
    endpoints: list[Annotated[str, AfterValidator(_check_endpoint)]] = Field(min_length=1)
    connect_timeout_ms: Annotated[PositiveInt, Strict()] = 5000
    timeout_ms: Annotated[PositiveInt, Strict()] = 15000
    tls: bool = False
    """TLS to every endpoint; an ``https://`` endpoint uses TLS regardless."""

    def targets(self) -> list[Endpoint]:
        return [parse_endpoint(text, self.tls) for text in self.endpoints]


class RouteMatch(SpecModel):
    prefix: Annotated[str, Field(pattern=r"^/")] = "/"
    headers: dict[NonEmpty, str] = Field(default_factory=dict)
    """Exact values; names compare case-insensitively."""
    host: NonEmpty | None = None
    """Exact host (port ignored), or ``*.suffix``."""

    def matches(self, path: str, host: str | None, headers: Mapping[str, str]) -> bool:
        if not path.startswith(self.prefix):
            return False
        if self.host is not None and not _host_matches(self.host, host or ""):
            return False
        lowered = {k.lower(): v for k, v in headers.items()}
        return all(lowered.get(k.lower()) == v for k, v in self.headers.items())


def _host_matches(pattern: str, host: str) -> bool:
    host = host.lower()
    if host.startswith("["):
        host = host.split("]", 1)[0] + "]"
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    pattern = pattern.lower()
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return host == pattern


class Route(SpecModel):
    name: NonEmpty
    match: RouteMatch = Field(default_factory=RouteMatch)
    cluster: NonEmpty
    """A cluster name, or any name :meth:`Gateway.resolve_upstream` resolves."""


class Redis(SpecModel):
    name: NonEmpty
    address: HostPort
    username: str | None = None
    password: str | None = Field(default=None, repr=False)


class Limits(SpecModel):
    memory_mib: Annotated[PositiveInt, Strict()] | None = Field(default=None, alias="memoryMiB")
    callback_ms: Annotated[PositiveInt, Strict()] | None = None


class AccessLog(SpecModel):
    """Istio's meshConfig ``accessLogFile`` / ``accessLogFormat`` / ``accessLogEncoding``: where
    the access log goes and its Envoy format, text (``format``) or JSON (``jsonFormat``, a map
    of field -> format). Neither given: Istio's default text format."""

    path: NonEmpty = "/dev/stdout"
    format: str | None = None
    json_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check_format(self) -> AccessLog:
        if self.format is not None and self.json_format is not None:
            raise PathError(("jsonFormat",), "give format or jsonFormat, not both")
        try:
            if self.format is not None:
                parse_format(self.format)
        except FormatError as exc:
            raise PathError(("format",), str(exc)) from None
        try:
            if self.json_format is not None:
                parse_json_format(self.json_format)
        except FormatError as exc:
            raise PathError(("jsonFormat",), str(exc)) from None
        return self


def _unique(items: list[Any], field: str) -> None:
    seen: set[str] = set()
    for i, item in enumerate(items):
        if item.name in seen:
            raise PathError((field, i, "name"), f"duplicate name {item.name!r}")
        seen.add(item.name)


class GatewaySpec(SpecModel):
    listen: ListenAddress = Address("127.0.0.1", 8080)
    admin: ListenAddress = Address("127.0.0.1", 9901)
    labels: dict[str, str] = Field(default_factory=dict)
    """The workload's labels, which WasmPlugin selectors match."""
    namespace: DnsLabel = "default"
    root_namespace: DnsLabel = "istio-system"
    clusters: list[Cluster] = Field(default_factory=list)
    routes: list[Route] = Field(default_factory=list)
    redis: list[Redis] = Field(default_factory=list)
    limits: Limits | None = None
    shared_data: Annotated[str, AfterValidator(_check_shared_data)] | None = Field(
        default=None, repr=False)
    """Plugin shared data in a Redis (``redis://`` / ``rediss://`` URL) that several gateway
    replicas share, instead of this gateway's own store (see ``gateway/redis_shared.py``)."""
    body_buffer_limit_bytes: Annotated[int, Strict(), Field(ge=0)] = MIB
    access_log: AccessLog | None = None
    request_headers_timeout_ms: Annotated[PositiveInt, Strict()] = 300_000
    """A request head not complete within this gets 408 (Envoy's stream idle timeout)."""
    idle_timeout_ms: Annotated[PositiveInt, Strict()] = 3_600_000
    """A client connection idle this long is closed (Envoy's HTTP idle timeout)."""
    """Present: one line per request (``--access-log`` turns it on with the defaults)."""

    @model_validator(mode="after")
    def _check_names(self) -> GatewaySpec:
        _unique(self.clusters, "clusters")
        _unique(self.routes, "routes")
        _unique(self.redis, "redis")
        for i, route in enumerate(self.routes):
            if resolve_upstream(self.clusters, route.cluster) is None:
                raise PathError(
                    ("routes", i, "cluster"),
                    f"{route.cluster!r} is neither a cluster nor outbound|PORT||HOST nor host:port",
                )
        return self


def resolve_upstream(clusters: list[Cluster], name: str) -> Cluster | Address | None:
    """An explicit cluster of that name (also with ``?options`` stripped) wins; then
    ``outbound|PORT||HOST`` gives (HOST, PORT) and ``host:port`` itself; else None."""
    for candidate in dict.fromkeys((name, name.split("?", 1)[0])):
        for cluster in clusters:
            if cluster.name == candidate:
                return cluster
    return parse_cluster_name(name)


class GatewayMeta(SpecModel):
    name: DnsSubdomain
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class Gateway(SpecModel):
    api_version: Literal["wasmgate.io/v1alpha1"] = GATEWAY_API_VERSION
    kind: Literal["Gateway"] = "Gateway"
    metadata: GatewayMeta
    spec: GatewaySpec = Field(default_factory=GatewaySpec)

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def workload_labels(self) -> dict[str, str]:
        """``spec.labels`` plus the Gateway API gateway-name label (= metadata.name) unless
        ``spec.labels`` sets it: WasmPlugins with ``targetRefs`` to this Gateway attach."""
        return {GATEWAY_NAME_LABEL: self.metadata.name, **self.spec.labels}

    def cluster(self, name: str) -> Cluster | None:
        return next((c for c in self.spec.clusters if c.name == name), None)

    def resolve_upstream(self, name: str) -> Cluster | Address | None:
        """The upstream a plugin's ``http_call``/``grpc_call`` cluster name means, or None."""
        return resolve_upstream(self.spec.clusters, name)

    def resolve_redis(self, name: str) -> Redis | Address | None:
        """Like :meth:`resolve_upstream`, over ``spec.redis`` (which carries credentials)."""
        for candidate in dict.fromkeys((name, name.split("?", 1)[0])):
            for redis in self.spec.redis:
                if redis.name == candidate:
                    return redis
        return parse_cluster_name(name)

    def route_for(
        self, path: str, host: str | None = None, headers: Mapping[str, str] | None = None
    ) -> Route | None:
        """The first route whose match accepts the request."""
        return next(
            (r for r in self.spec.routes if r.match.matches(path, host, headers or {})), None
        )

    def to_dict(self) -> dict[str, Any]:
        dumped = self.model_dump(mode="json", by_alias=True, exclude_unset=True)
        return {"apiVersion": self.api_version, "kind": self.kind, **dumped}
