"""``pluginConfig``: a free JSON object, encoded for ``proxy_on_configure`` as istiod does.

istiod sends ``Any(StringValue(JSON))`` where the JSON is compact jsonpb of a protobuf Struct:
map keys sorted and every number a double. So ``1.0`` and ``1`` both arrive as ``1``, integers
beyond 2**53 lose precision, and exponents follow Go (``1e-7``, ``1e+21``). Strings are escaped
as JSON requires (Go's additional HTML escaping of ``<>&`` is not reproduced; it decodes equal).
"""

from __future__ import annotations

import json
import math
from decimal import Decimal
from typing import Any


def _key(key: Any, path: str) -> str:
    # sigs.k8s.io/yaml turns scalar keys into strings (``404: page`` is common in configs).
    if isinstance(key, str):
        return key
    if isinstance(key, bool):
        return "true" if key else "false"
    if isinstance(key, int | float):
        return _number(float(key), path)
    if key is None:
        return "null"
    raise ValueError(f"{path}: key {key!r} is not a string")


def _normalise(value: Any, path: str) -> Any:
    if isinstance(value, dict):
        return {_key(k, path): _normalise(v, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_normalise(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{path}: {value} cannot be encoded as JSON")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**1024:
        raise ValueError(f"{path}: {value} is out of range for a JSON number (a double)")
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise ValueError(f"{path}: {type(value).__name__} is not a JSON value")


def normalise_plugin_config(value: Any) -> Any:
    """Validate that ``value`` is a JSON object (``None`` means empty); stringify scalar keys."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError("pluginConfig must be a JSON object")
    return _normalise(value, "pluginConfig")


def _number(value: float, path: str = "pluginConfig") -> str:
    """Go's float64 JSON formatting (encoding/json and protojson agree)."""
    if not math.isfinite(value):
        raise ValueError(f"{path}: {value} cannot be encoded as JSON")
    if value == 0:
        return "0"
    magnitude = abs(value)
    if magnitude < 1e-6 or magnitude >= 1e21:
        mantissa, exponent = f"{value!r}".split("e")
        sign = "-" if exponent.startswith("-") else "+"
        digits = exponent.lstrip("+-")
        return f"{mantissa.removesuffix('.0')}e{sign}{digits if sign == '+' else int(digits)}"
    text = format(Decimal(repr(value)), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def _encode(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return _number(float(value))
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ",".join(_encode(v) for v in value) + "]"
    items = (f"{json.dumps(k, ensure_ascii=False)}:{_encode(v)}" for k, v in sorted(value.items()))
    return "{" + ",".join(items) + "}"


def encode_plugin_config(config: dict[str, Any]) -> bytes:
    """Compact JSON with sorted keys and double-valued numbers; ``b""`` for an empty object."""
    return _encode(config).encode() if config else b""
