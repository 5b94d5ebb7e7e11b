"""Configuration as data: WasmPlugin and Gateway resources, loading with precise errors, and
Istio's plugin selection and ordering. No I/O beyond reading configuration files; no imports from
the rest of wasmgate."""

from ._common import Address
from .enums import EnvValueSource, FailStrategy, ImagePullPolicy, Phase, PluginType, WorkloadMode
from .errors import ConfigError, ConfigErrors
from .gateway import (
    GATEWAY_NAME_LABEL,
    Cluster,
    Endpoint,
    Gateway,
    GatewaySpec,
    Limits,
    Redis,
    Route,
)
from .loading import LoadResult, load_paths, load_text
from .ordering import phase_buckets, select_for_gateway, select_plugins
from .resources import WasmPlugin, WasmPluginSpec

__all__ = [
    "GATEWAY_NAME_LABEL",
    "Address",
    "Cluster",
    "ConfigError",
    "ConfigErrors",
    "Endpoint",
    "EnvValueSource",
    "FailStrategy",
    "Gateway",
    "GatewaySpec",
    "ImagePullPolicy",
    "Limits",
    "LoadResult",
    "Phase",
    "PluginType",
    "Redis",
    "Route",
    "WasmPlugin",
    "WasmPluginSpec",
    "WorkloadMode",
    "load_paths",
    "load_text",
    "phase_buckets",
    "select_for_gateway",
    "select_plugins",
]
