"""Plugins' proxy_http_call through the gateway: several concurrent calls from one request,
every way of naming the upstream, and failures reported the way Envoy reports them."""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from .conftest import Gateway, free_port
from .test_gateway import conformance, gateway_doc

Start = Callable[..., Gateway]


def call(upstream: str, path: str, timeout_ms: int = 2000) -> str:
    return (f"request_headers http_call s:{upstream} "
            f"m::path={path}&:method=GET&:authority=echo s: null {timeout_ms}")


def enters(gateway: Gateway) -> list[list[int]]:
    return [[int(x) for x in m.group(1).split()]
            for m in re.finditer(r"enter http_call_response ([\d -]+)", gateway.logs())]


def wait_for_enters(gateway: Gateway, count: int, timeout: float = 10) -> list[list[int]]:
    deadline = time.monotonic() + timeout
    while len(enters(gateway)) < count:
        assert time.monotonic() < deadline, gateway.logs()[-3000:]
        time.sleep(0.05)
    return enters(gateway)


def test_three_concurrent_calls_from_one_request(start_gateway: Start, upstream: str) -> None:
    host, port = upstream.split(":")
    steps = [call("backend", "/one"), call(f"outbound%7C{port}%7C%7C{host}", "/two"),
             call(upstream, "/three"), "request_headers return 1",
             "http_call_response get_buffer_bytes 4 0 200",
             "http_call_response set_effective_context 2",
             "http_call_response continue_stream 0"]
    gateway = start_gateway(gateway_doc(upstream) + conformance("caller", steps))
    status, _, _ = gateway.get("/")
    assert status == 200
    calls = wait_for_enters(gateway, 3)
    tokens = {c[1] for c in calls}
    assert len(tokens) == 3 and all(t % 4 == 0 for t in tokens)  # http tokens: kind bits 0
    assert all(c[2] > 0 and c[3] > 0 for c in calls)  # headers and a body came back
    bodies = re.findall(r"conf http_call_response get_buffer_bytes status=0 out=(\S+)",
                        gateway.logs())
    for path in ("/one", "/two", "/three"):
        assert any(f"%22path%22:%20%22{path}%22" in body for body in bodies), bodies


def test_unknown_upstream_is_bad_argument(start_gateway: Start, upstream: str) -> None:
    gateway = start_gateway(gateway_doc(upstream) + conformance(
        "caller", [call("no-such-cluster", "/x")]))
    assert gateway.get("/")[0] == 200
    assert "conf request_headers http_call status=2" in gateway.logs()
    assert "unknown upstream 'no-such-cluster'" in gateway.logs()


# Envoy's async client runs the router: a call that gets no response headers receives the
# router's own reply (503 / 504) as a response; only a reset after the headers is a failure
# (0, 0, 0 and status 11 "reset": tests/unit/test_http_call_replies.py).
def test_connection_failure_reaches_the_plugin_as_a_503(start_gateway: Start,
                                                        upstream: str) -> None:
    dead = f"127.0.0.1:{free_port()}"
    steps = [call(dead, "/x"), "http_call_response get_header_map_value 6 s::status",
             "http_call_response get_buffer_bytes 4 0 200"]
    gateway = start_gateway(gateway_doc(upstream) + conformance("caller", steps))
    assert gateway.get("/")[0] == 200
    [failed] = wait_for_enters(gateway, 1)
    assert failed[2] > 0 and failed[3] > 0  # headers and a body: the router's reply
    assert "conf http_call_response get_header_map_value status=0 out=503" in gateway.logs()
    assert ("get_buffer_bytes status=0 out=upstream%20connect%20error%20or%20disconnect/reset"
            in gateway.logs())


def test_timeout_reaches_the_plugin_as_a_504(start_gateway: Start, upstream: str) -> None:
    steps = [call(upstream, "/slow", timeout_ms=300),
             "http_call_response get_header_map_value 6 s::status",
             "http_call_response get_buffer_bytes 4 0 200"]
    gateway = start_gateway(gateway_doc(upstream) + conformance("caller", steps))
    assert gateway.get("/")[0] == 200
    wait_for_enters(gateway, 1)
    assert "get_header_map_value status=0 out=504" in gateway.logs()
    assert "get_buffer_bytes status=0 out=upstream%20request%20timeout" in gateway.logs()
