"""Building blocks shared by the resource models: base classes, enum coercion, names, addresses."""

from __future__ import annotations

import re
from collections.abc import Callable
from enum import StrEnum
from typing import Annotated, Any, NamedTuple

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    PlainSerializer,
    StringConstraints,
)
from pydantic.alias_generators import to_camel

INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1

_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS1123_SUBDOMAIN = re.compile(rf"^{_DNS_LABEL}(\.{_DNS_LABEL})*$")
DNS1123_LABEL = re.compile(rf"^{_DNS_LABEL}$")


class PathError(ValueError):
    """A validation failure that belongs to a sub-field of the object being validated.

    Raised from model validators so that loaders can report ``spec.vmConfig.env[1].name`` rather
    than ``spec.vmConfig``: ``subpath`` is appended to the location pydantic reports.
    """

    def __init__(self, subpath: tuple[str | int, ...], reason: str) -> None:
        super().__init__(reason)
        self.subpath = subpath
        self.reason = reason


class SpecModel(BaseModel):
    """Base of every spec object: camelCase aliases as in the YAML, typos are errors."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
    )


def enum_coercer(enum: type[StrEnum]) -> Callable[[Any], Any]:
    """Accept an enum's name or its protobuf number (Istio's CRDs take int-or-string)."""
    members = list(enum)

    def coerce(value: Any) -> Any:
        if isinstance(value, bool):
            return value  # let pydantic reject it
        if isinstance(value, int):
            if 0 <= value < len(members):
                return members[value]
            top = len(members) - 1
            raise ValueError(f"{value} is not a valid {enum.__name__} number (0..{top})")
        return value

    return coerce


def _check_subdomain(value: str) -> str:
    if len(value) > 253 or not DNS1123_SUBDOMAIN.match(value):
        raise ValueError(
            f"{value!r} is not a DNS-1123 subdomain (lowercase alphanumerics, '-' and '.', "
            "starting and ending alphanumeric, at most 253 characters)"
        )
    return value


def _check_label(value: str) -> str:
    if len(value) > 63 or not DNS1123_LABEL.match(value):
        raise ValueError(
            f"{value!r} is not a DNS-1123 label (lowercase alphanumerics and '-', "
            "starting and ending alphanumeric, at most 63 characters)"
        )
    return value


DnsSubdomain = Annotated[str, AfterValidator(_check_subdomain)]
DnsLabel = Annotated[str, AfterValidator(_check_label)]
NonEmpty = Annotated[str, StringConstraints(min_length=1)]


# -- addresses ---------------------------------------------------------------------------------


class Address(NamedTuple):
    """A ``host:port`` pair; IPv6 hosts are kept without brackets."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{format_host(self.host)}:{self.port}"


def format_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def split_host_port(text: str, *, allow_port_zero: bool = False) -> Address:
    """Parse ``host:port`` / ``[v6]:port``; raise ValueError explaining what is wrong."""
    low = 0 if allow_port_zero else 1
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"{text!r} is not [ipv6]:port")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"{text!r} has no port (expected host:port)")
        if ":" in host:
            raise ValueError(f"{text!r}: write IPv6 hosts in brackets, [::1]:port")
    if not host or any(c.isspace() or c in "/?#@" for c in host):
        raise ValueError(f"{text!r} has an invalid host")
    if not port_text.isdigit() or not low <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: port must be a number in {low}..65535")
    return Address(host, int(port_text))


def _address_in(allow_port_zero: bool) -> Callable[[Any], Any]:
    def parse(value: Any) -> Any:
        if isinstance(value, str):
            return split_host_port(value.strip(), allow_port_zero=allow_port_zero)
        if isinstance(value, Address):
            return value
        raise ValueError("expected a 'host:port' string")

    return parse


HostPort = Annotated[
    Address, BeforeValidator(_address_in(False)), PlainSerializer(str, return_type=str)
]
ListenAddress = Annotated[
    Address, BeforeValidator(_address_in(True)), PlainSerializer(str, return_type=str)
]
