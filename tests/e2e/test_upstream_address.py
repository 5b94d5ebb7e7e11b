"""Envoy's `upstream.address` / `upstream.port` attributes: set once the gateway picks the
upstream host, so plugins reading them at response time (gpustack-token-usage tells traffic
that reached an upstream from local replies by `upstream.address`) see the endpoint; a
request answered before any upstream is picked has none (NOT_FOUND, as in Envoy)."""

from __future__ import annotations

import re
import struct
from collections.abc import Callable

from wasmgate.runtime.contexts import HttpContextState, RootContext

from .conftest import Gateway
from .test_gateway import conformance, gateway_doc

Start = Callable[..., Gateway]


def test_add_attribute_keeps_unbuilt_attributes_lazy() -> None:
    built: list[int] = []

    def factory() -> dict[str, object]:
        built.append(1)
        return {"source.address": "127.0.0.1:1"}

    state = HttpContextState(2, RootContext(1))
    state.attributes = factory
    state.add_attribute("upstream.address", "10.0.0.1:80")
    assert built == []  # nothing built until a plugin reads
    assert state.attributes == {"source.address": "127.0.0.1:1",
                                "upstream.address": "10.0.0.1:80"}
    state.add_attribute("upstream.port", 80)  # already built: updated in place
    assert state.attributes["upstream.port"] == 80 and built == [1]


def _percent(raw: bytes) -> str:
    """How the conformance plugin logs bytes: [A-Za-z0-9._~/:-] as is, the rest as %XX."""
    plain = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._~/:-"
    return "".join(chr(b) if b in plain else f"%{b:02X}" for b in raw)


def _outs(logs: str, callback: str) -> list[tuple[int, str]]:
    found = re.findall(rf"conf {callback} get_property status=(\d+) out=(\S*)", logs)
    assert found, callback
    return [(int(status), out) for status, out in found]


def test_upstream_address_seen_by_plugins_through_the_gateway(start_gateway: Start,
                                                             upstream: str) -> None:
    steps = ["request_headers get_property s:upstream%00address",
             "response_headers get_property s:upstream%00address",
             "response_headers get_property s:upstream%00port"]
    gateway = start_gateway(gateway_doc(upstream) + conformance("reader", steps))
    assert gateway.get("/")[0] == 200
    logs = gateway.logs()
    host, port = upstream.rsplit(":", 1)
    # request headers: no upstream picked yet; response headers: the endpoint
    assert _outs(logs, "request_headers") == [(1, "")]
    [(status, address), (port_status, raw_port)] = _outs(logs, "response_headers")
    assert (status, address) == (0, f"{host}:{port}")
    assert (port_status, raw_port) == (0, _percent(struct.pack("<Q", int(port))))
