"""The ``extensions.istio.io/v1alpha1`` WasmPlugin resource, field for field.

Field names and enum spellings are Istio's YAML (camelCase aliases; Python attributes are
snake_case). Every spec object forbids unknown fields, except ``pluginConfig`` which is free JSON.
Enums take their names or their protobuf numbers. The ``Gateway`` resource lives in
:mod:`wasmgate.api.gateway` and is re-exported here.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    Strict,
    StringConstraints,
    field_validator,
    model_validator,
)

from . import urls
from ._common import INT32_MAX, INT32_MIN, DnsLabel, DnsSubdomain, PathError, SpecModel
from .enums import (
    EnvValueSource,
    EnvValueSourceField,
    FailStrategy,
    FailStrategyField,
    ImagePullPolicy,
    ImagePullPolicyField,
    Phase,
    PhaseField,
    PluginType,
    PluginTypeField,
    WorkloadMode,
    WorkloadModeField,
)
from .gateway import Cluster, Gateway, GatewaySpec, Redis, Route
from .pluginconfig import encode_plugin_config, normalise_plugin_config

__all__ = [
    "Cluster",
    "EnvValueSource",
    "EnvVar",
    "FailStrategy",
    "Gateway",
    "GatewaySpec",
    "ImagePullPolicy",
    "ObjectMeta",
    "Phase",
    "PluginType",
    "PolicyTargetReference",
    "PortSelector",
    "Redis",
    "Route",
    "TrafficSelector",
    "VmConfig",
    "WasmPlugin",
    "WasmPluginSpec",
    "WorkloadMode",
    "WorkloadSelector",
]

ISTIO_API_VERSION = "extensions.istio.io/v1alpha1"
GATEWAY_API_GROUP = "gateway.networking.k8s.io"


# -- metadata ----------------------------------------------------------------------------------

# Server-populated ObjectMeta fields found in `kubectl get -o yaml` output: accepted and dropped.
_SERVER_METADATA = frozenset(
    {
        "uid", "generation", "generateName", "selfLink", "managedFields", "ownerReferences",
        "finalizers", "deletionTimestamp", "deletionGracePeriodSeconds",
    }
)  # fmt: skip


def _utc(value: datetime | None) -> datetime | None:
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _str_of_scalar(value: Any) -> Any:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class ObjectMeta(SpecModel):
    name: DnsSubdomain
    namespace: DnsLabel = "default"
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    creation_timestamp: Annotated[datetime | None, AfterValidator(_utc)] = None
    """Orders plugins on equal priority; when absent the loader assigns load order."""
    resource_version: Annotated[str | None, BeforeValidator(_str_of_scalar)] = None

    @model_validator(mode="before")
    @classmethod
    def _drop_server_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if k not in _SERVER_METADATA}
        return data


# -- attachment --------------------------------------------------------------------------------


def _check_label_key(key: str) -> str:
    if not key:
        raise ValueError("empty key is not supported in selector")
    if "*" in key:
        raise ValueError(f"wildcard is not supported in selector key {key!r}")
    return key


def _check_label_value(value: str) -> str:
    if "*" in value:
        raise ValueError(f"wildcard is not supported in selector value {value!r}")
    return value


LabelKey = Annotated[str, AfterValidator(_check_label_key)]
LabelValue = Annotated[str, StringConstraints(max_length=63), AfterValidator(_check_label_value)]


class WorkloadSelector(SpecModel):
    match_labels: dict[LabelKey, LabelValue] = Field(default_factory=dict, max_length=4096)


# (canonical group, kind) a WasmPlugin may target.
_TARGET_KINDS = frozenset(
    {
        (GATEWAY_API_GROUP, "Gateway"),
        (GATEWAY_API_GROUP, "GatewayClass"),
        ("core", "Service"),
        ("networking.istio.io", "ServiceEntry"),
    }
)


_GROUP = r"^$|^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_KIND = r"^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$"


class PolicyTargetReference(SpecModel):
    group: Annotated[str, StringConstraints(max_length=253, pattern=_GROUP)] = ""
    kind: Annotated[str, StringConstraints(min_length=1, max_length=63, pattern=_KIND)]
    name: Annotated[str, StringConstraints(min_length=1, max_length=253)]
    namespace: str = ""

    @property
    def canonical_group(self) -> str:
        return self.group or "core"

    @model_validator(mode="after")
    def _check_target(self) -> PolicyTargetReference:
        if self.namespace:
            raise PathError(("namespace",), "cross namespace referencing is not supported")
        if (self.canonical_group, self.kind) not in _TARGET_KINDS:
            raise PathError(
                ("kind",),
                f"{self.group or 'core'}/{self.kind} cannot be targeted; allowed: Gateway and "
                f"GatewayClass ({GATEWAY_API_GROUP}), Service (core), ServiceEntry "
                "(networking.istio.io)",
            )
        return self


class PortSelector(SpecModel):
    number: Annotated[int, Strict(), Field(ge=1, le=65535)]


class TrafficSelector(SpecModel):
    mode: WorkloadModeField = WorkloadMode.UNDEFINED
    ports: list[PortSelector] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_ports(self) -> TrafficSelector:
        seen: set[int] = set()
        for i, port in enumerate(self.ports):
            if port.number in seen:
                raise PathError(("ports", i, "number"), f"duplicate port {port.number}")
            seen.add(port.number)
        return self


# -- VM ------------------------------------------------------------------------------------------


class EnvVar(SpecModel):
    name: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    value_from: EnvValueSourceField = EnvValueSource.INLINE
    value: Annotated[str, StringConstraints(max_length=2048)] | None = None

    @model_validator(mode="after")
    def _host_has_no_value(self) -> EnvVar:
        if self.value_from is EnvValueSource.HOST and self.value is not None:
            raise PathError(("value",), "value may only be set when valueFrom is INLINE")
        return self


class VmConfig(SpecModel):
    env: list[EnvVar] = Field(default_factory=list, max_length=256)

    @model_validator(mode="after")
    def _unique_names(self) -> VmConfig:
        seen: set[str] = set()
        for i, var in enumerate(self.env):
            if var.name in seen:
                raise PathError(("env", i, "name"), f"duplicate env name {var.name!r}")
            seen.add(var.name)
        return self


# -- spec --------------------------------------------------------------------------------------

Priority = Annotated[int, Strict(), Field(ge=INT32_MIN, le=INT32_MAX)]


class WasmPluginSpec(SpecModel):
    selector: WorkloadSelector | None = None
    target_ref: PolicyTargetReference | None = None
    """Legacy singular form; used when ``targetRefs`` is empty."""
    target_refs: list[PolicyTargetReference] = Field(default_factory=list, max_length=16)
    url: Annotated[str, AfterValidator(urls.check_url)]
    sha256: str = ""
    image_pull_policy: ImagePullPolicyField = ImagePullPolicy.UNSPECIFIED_POLICY
    image_pull_secret: Annotated[str, StringConstraints(min_length=1, max_length=253)] | None = None
    verification_key: str | None = None
    """Accepted and ignored, as in Istio."""
    plugin_config: Annotated[dict[str, Any], BeforeValidator(normalise_plugin_config)] = Field(
        default_factory=dict
    )
    plugin_name: Annotated[str, StringConstraints(min_length=1, max_length=256)] | None = None
    phase: PhaseField = Phase.UNSPECIFIED_PHASE
    priority: Priority | None = None
    """None = unset: orders as INT32_MIN, i.e. after every other explicit value."""
    fail_strategy: FailStrategyField = FailStrategy.FAIL_CLOSE
    vm_config: VmConfig | None = None
    match: list[TrafficSelector] = Field(default_factory=list)
    type: PluginTypeField = PluginType.UNSPECIFIED_PLUGIN_TYPE

    @field_validator("sha256")
    @classmethod
    def _check_sha256(cls, value: str) -> str:
        if value and not urls.SHA256_HEX.match(value):
            raise ValueError("must be empty or 64 lowercase hex digits")
        return value

    @model_validator(mode="after")
    def _cross_field(self) -> WasmPluginSpec:
        given = [n for n, v in (("selector", self.selector), ("targetRef", self.target_ref),
                                ("targetRefs", self.target_refs)) if v]  # fmt: skip
        if len(given) > 1:
            raise PathError((), f"at most one of selector, targetRef, targetRefs: got {given}")
        digest = urls.url_digest(self.url)
        if digest is not None:
            if not urls.SHA256_HEX.match(digest):
                raise PathError(("url",), "the digest after @sha256: must be 64 lowercase hex")
            if self.sha256 and self.sha256 != digest:
                raise PathError(
                    ("sha256",), f"{self.sha256} does not match the url's @sha256:{digest}"
                )
        return self


# -- the resource ------------------------------------------------------------------------------


class WasmPlugin(SpecModel):
    api_version: Literal["extensions.istio.io/v1alpha1"] = ISTIO_API_VERSION
    kind: Literal["WasmPlugin"] = "WasmPlugin"
    metadata: ObjectMeta
    spec: WasmPluginSpec
    status: dict[str, Any] | None = None
    """Accepted (``kubectl get -o yaml`` output has one) and ignored."""

    # identity

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str:
        return self.metadata.namespace

    @property
    def filter_name(self) -> str:
        """Envoy's plugin name (log prefix, metrics): ``<namespace>.<name>``."""
        return f"{self.metadata.namespace}.{self.metadata.name}"

    @property
    def root_id(self) -> str:
        return self.spec.plugin_name or ""

    @property
    def plugin_type(self) -> PluginType:
        """HTTP or NETWORK (unspecified means HTTP)."""
        if self.spec.type is PluginType.NETWORK:
            return PluginType.NETWORK
        return PluginType.HTTP

    def target_refs(self) -> list[PolicyTargetReference]:
        """``targetRefs``, or the legacy ``targetRef`` when those are empty."""
        if self.spec.target_refs:
            return list(self.spec.target_refs)
        return [self.spec.target_ref] if self.spec.target_ref else []

    def revision(self) -> str:
        """``resourceVersion``, or a hash of the object when it has none.

        ``Always`` re-pulls when this changes, as Istio does when the object changes.
        The creation timestamp is left out (the loader may assign it afresh on each load).
        """
        if self.metadata.resource_version:
            return self.metadata.resource_version
        data = self.model_dump(mode="json", by_alias=True, exclude={"status": True,
                               "metadata": {"creation_timestamp", "resource_version"}})  # fmt: skip
        blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
        return "sha256:" + hashlib.sha256(blob).hexdigest()[:16]

    # what Envoy gets

    def plugin_configuration_bytes(self) -> bytes:
        """For ``proxy_on_configure``: compact JSON of pluginConfig, keys sorted; b"" if empty."""
        return encode_plugin_config(self.spec.plugin_config)

    def effective_env(self, host_env: Mapping[str, str]) -> dict[str, str]:
        """The plugin's WASI environment.

        INLINE variables with their values, HOST variables copied from ``host_env`` when present
        there (missing ones are skipped). INLINE names starting ``ISTIO_META_`` are dropped, as
        the istio-agent deletes every ``ISTIO_META_*`` key_value (HOST keys are not touched).
        """
        env: dict[str, str] = {}
        for var in self.spec.vm_config.env if self.spec.vm_config else ():
            if var.value_from is EnvValueSource.HOST:
                if var.name in host_env:
                    env[var.name] = host_env[var.name]
            elif not var.name.startswith("ISTIO_META_"):
                env[var.name] = var.value or ""
        return env

    # where the module comes from

    @property
    def url_scheme(self) -> urls.Scheme:
        return urls.url_scheme(self.spec.url)

    def resolved_url(self) -> str:
        """The url with ``oci://`` added when written without a scheme."""
        return urls.resolve_url(self.spec.url)

    def pinned_sha256(self) -> str | None:
        """The checksum known before fetching: ``sha256``, else an oci url's ``@sha256:``."""
        if self.spec.sha256:
            return self.spec.sha256
        return urls.url_digest(self.spec.url) if self.url_scheme == "oci" else None

    def pull_policy_effective(self) -> ImagePullPolicy:
        """IfNotPresent or Always (spec §3.4).

        An explicit policy wins. Unspecified means Always only for an oci url whose path ends
        ``:latest``; IfNotPresent otherwise (http(s), untagged or other tags, file). Note that a
        known checksum (:meth:`pinned_sha256`) makes a cached module acceptable under any policy.
        """
        if self.spec.image_pull_policy is not ImagePullPolicy.UNSPECIFIED_POLICY:
            return self.spec.image_pull_policy
        resolved = self.resolved_url()
        if self.url_scheme == "oci" and urls.url_path(resolved).endswith(":latest"):
            return ImagePullPolicy.ALWAYS
        return ImagePullPolicy.IF_NOT_PRESENT

    def to_dict(self) -> dict[str, Any]:
        """The resource as Istio YAML would have it (only fields that were set)."""
        dumped = self.model_dump(mode="json", by_alias=True, exclude_unset=True)
        return {"apiVersion": self.api_version, "kind": self.kind, **dumped}
