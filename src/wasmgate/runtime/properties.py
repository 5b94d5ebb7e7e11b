"""Envoy's attribute set for proxy_get_property / proxy_set_property.

Resolution order for a NUL-separated path:
1. a value the plugin stored with set_property (the stream's filter state, then the plugin's);
2. Wasm tokens: plugin_name, plugin_root_id, plugin_vm_id, plugin_vm_memory;
3. request.* / response.* derived from the stream's headers;
4. the stream's attributes and the plugin's properties given by the embedder (dotted keys
   or nested dicts), with the legacy top-level names (route_name, cluster_name, ...) mapped
   to and from `xds.*`;
5. the embedder's `Host.property`.
Values encode as Envoy serializes CEL values: str/bytes raw, int 8-byte LE, float 8-byte IEEE,
bool 1 byte, maps and lists in the pairs format.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from .contexts import HttpContextState
from .serde import serialize_pairs

if TYPE_CHECKING:
    from .plugin import Plugin

LEGACY = {"route_name": "xds.route_name", "cluster_name": "xds.cluster_name",
          "cluster_metadata": "xds.cluster_metadata", "listener_direction":
          "xds.listener_direction", "listener_metadata": "xds.listener_metadata",
          "route_metadata": "xds.route_metadata", "upstream_host_metadata":
          "xds.upstream_host_metadata", "node": "xds.node"}
_REVERSE = {v: k for k, v in LEGACY.items()}
_MISSING = object()


def encode_value(value: object) -> bytes:
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bool):
        return b"\x01" if value else b"\x00"
    if isinstance(value, int):
        return struct.pack("<q" if value < 0 else "<Q", value)
    if isinstance(value, float):
        return struct.pack("<d", value)
    if isinstance(value, dict):
        return serialize_pairs((encode_value(k), encode_value(v)) for k, v in value.items())
    if isinstance(value, list | tuple):
        return serialize_pairs((encode_value(v), b"") for v in value)
    raise TypeError(f"cannot encode property value of type {type(value).__name__}")


def split_path(raw: bytes) -> list[str]:
    raw = raw[:-1] if raw.endswith(b"\0") else raw
    return [part.decode("utf-8", "replace") for part in raw.split(b"\0")]


def _walk(value: object, parts: list[str]) -> object:
    for part in parts:
        if isinstance(value, dict):
            if part not in value:
                return _MISSING
            value = value[part]
        elif isinstance(value, list | tuple) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return _MISSING
    return value


def _header(pairs: list[tuple[bytes, bytes]] | None, name: bytes) -> str | None:
    for k, v in pairs or ():
        if k == name:
            return v.decode("latin-1")
    return None


def _headers_map(pairs: list[tuple[bytes, bytes]] | None) -> dict[str, str]:
    merged: dict[str, str] = {}
    for k, v in pairs or ():
        key = k.decode("latin-1")
        merged[key] = f"{merged[key]},{v.decode('latin-1')}" if key in merged else (
            v.decode("latin-1"))
    return merged


def _request_attribute(ctx: HttpContextState, name: str) -> object:
    pairs = ctx.request_headers.pairs
    if pairs is None:
        return _MISSING
    path = _header(pairs, b":path")
    derived: dict[str, object | None] = {
        "path": path,
        "url_path": path.split("?", 1)[0] if path is not None else None,
        "query": path.split("?", 1)[1] if path and "?" in path else ("" if path else None),
        "host": _header(pairs, b":authority"),
        "scheme": _header(pairs, b":scheme"),
        "method": _header(pairs, b":method"),
        "referer": _header(pairs, b"referer"),
        "useragent": _header(pairs, b"user-agent"),
        "id": _header(pairs, b"x-request-id"),
        "headers": _headers_map(pairs),
    }
    value = derived.get(name)
    return _MISSING if value is None else value


def _response_attribute(ctx: HttpContextState, name: str) -> object:
    pairs = ctx.response_headers.pairs
    if name == "code_details" and ctx.local_response is not None:
        return ctx.local_response.details
    if pairs is None:
        return _MISSING
    if name == "code_details":  # Envoy's details for a response that came from the upstream
        return "via_upstream"
    if name == "code":
        status = _header(pairs, b":status")
        return int(status) if status and status.isdigit() else _MISSING
    if name == "headers":
        return _headers_map(pairs)
    if name == "trailers":
        return _headers_map(ctx.response_trailers.pairs)
    return _MISSING


_FILTER_STATE = b"filter_state\0wasm."
"""Envoy keeps a proxy_set_property value as filter state `wasm.<path>`; CEL reads it as
`filter_state["wasm.<path>"]`."""


def resolve(plugin: Plugin, ctx: object, raw_path: bytes) -> bytes | None:
    """The encoded property value, or None (NOT_FOUND)."""
    state = ctx if isinstance(ctx, HttpContextState) else None
    if state is not None:
        stored = state.filter_state.get(raw_path)
        if stored is not None:
            return stored
        if raw_path.startswith(_FILTER_STATE):  # the same value by Envoy's CEL name for it
            stored = state.filter_state.get(raw_path[len(_FILTER_STATE):])
            if stored is not None:
                return stored
    stored = plugin.filter_state.get(raw_path)
    if stored is not None:
        return stored
    plan = _PLANS.get(raw_path)
    if plan is None:
        plan = _plan(raw_path)
    value = _resolve_plan(plugin, state, plan)
    if value is _MISSING:
        context_id = state.id if state else plugin.root.id
        return plugin.host.property(plugin, context_id, [p.encode() for p in plan.parts])
    return encode_value(value)


class _Plan:
    """What a property path means, worked out once per distinct path: its parts, and the
    (dotted key, rest) lookups of each candidate spelling (the path itself, then its legacy
    or xds.* alias), longest key first."""

    __slots__ = ("derive", "head", "lookups", "parts", "single")

    def __init__(self, parts: list[str]) -> None:
        self.parts = parts
        self.head = parts[0]
        self.single = len(parts) == 1
        self.derive = (_request_attribute if self.head == "request" else _response_attribute
                       if self.head == "response" else None) if len(parts) == 2 else None
        candidates = [parts]
        if parts[0] in LEGACY:
            candidates.append(LEGACY[parts[0]].split(".") + parts[1:])
        if ".".join(parts[:2]) in _REVERSE:
            candidates.append([_REVERSE[".".join(parts[:2])], *parts[2:]])
        self.lookups = [[(".".join(c[:cut]), c[cut:]) for cut in range(len(c), 0, -1)]
                        for c in candidates]


_PLANS: dict[bytes, _Plan] = {}
_MAX_PLANS = 4096  # distinct paths remembered (plugins use a handful; this bounds a flood)


def _plan(raw_path: bytes) -> _Plan:
    plan = _Plan(split_path(raw_path))
    if len(_PLANS) >= _MAX_PLANS:
        _PLANS.clear()
    _PLANS[raw_path] = plan
    return plan


_TOKENS = ("plugin_name", "plugin_root_id", "plugin_vm_id")


def _resolve_plan(plugin: Plugin, state: HttpContextState | None, plan: _Plan) -> object:
    head = plan.head
    if plan.single:
        if head in _TOKENS:
            return {"plugin_name": plugin.name, "plugin_root_id": plugin.root_id,
                    "plugin_vm_id": plugin.vm_id}[head]
        if head == "plugin_vm_memory":
            return plugin.memory_bytes()
    if state is not None and plan.derive is not None:
        value = plan.derive(state, plan.parts[1])
        if value is not _MISSING:
            return value
    tables = (state.attributes, plugin.properties) if state is not None else (
        plugin.properties,)
    for lookups in plan.lookups:
        for table in tables:
            for key, rest in lookups:  # longest dotted prefix, then walk what is left
                if key in table:
                    value = _walk(table[key], rest)
                    if value is not _MISSING:
                        return value
                    break
    return _MISSING
