"""The protobuf enums of the WasmPlugin API, spelled as in Istio YAML."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import BeforeValidator

from ._common import enum_coercer


class Phase(StrEnum):
    UNSPECIFIED_PHASE = "UNSPECIFIED_PHASE"
    AUTHN = "AUTHN"
    AUTHZ = "AUTHZ"
    STATS = "STATS"


class ImagePullPolicy(StrEnum):
    UNSPECIFIED_POLICY = "UNSPECIFIED_POLICY"
    IF_NOT_PRESENT = "IfNotPresent"
    ALWAYS = "Always"


class FailStrategy(StrEnum):
    FAIL_CLOSE = "FAIL_CLOSE"
    FAIL_OPEN = "FAIL_OPEN"
    FAIL_RELOAD = "FAIL_RELOAD"


class PluginType(StrEnum):
    UNSPECIFIED_PLUGIN_TYPE = "UNSPECIFIED_PLUGIN_TYPE"
    HTTP = "HTTP"
    NETWORK = "NETWORK"


class WorkloadMode(StrEnum):
    UNDEFINED = "UNDEFINED"
    CLIENT = "CLIENT"
    SERVER = "SERVER"
    CLIENT_AND_SERVER = "CLIENT_AND_SERVER"


class EnvValueSource(StrEnum):
    INLINE = "INLINE"
    HOST = "HOST"


# Field types: the enum's name or its protobuf number in, the enum out.
PhaseField = Annotated[Phase, BeforeValidator(enum_coercer(Phase))]
ImagePullPolicyField = Annotated[ImagePullPolicy, BeforeValidator(enum_coercer(ImagePullPolicy))]
FailStrategyField = Annotated[FailStrategy, BeforeValidator(enum_coercer(FailStrategy))]
PluginTypeField = Annotated[PluginType, BeforeValidator(enum_coercer(PluginType))]
WorkloadModeField = Annotated[WorkloadMode, BeforeValidator(enum_coercer(WorkloadMode))]
EnvValueSourceField = Annotated[EnvValueSource, BeforeValidator(enum_coercer(EnvValueSource))]
