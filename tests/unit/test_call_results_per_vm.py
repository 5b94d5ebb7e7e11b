"""A call's result goes only to the VM that made the call (GatewayHost, real sockets).

A plugin restarted on a fresh VM (FAIL_RELOAD) keeps its `Plugin` object but gets a new `vm`,
whose tokens start again at 1: a result of the old VM's must not reach the new one under a
token it has just issued. Here the plugin's `vm` is swapped while a call is in flight, without
`stop_plugin`, so each delivery path's own check is what is tested.
"""

from __future__ import annotations

import asyncio
from concurrent import futures
from types import SimpleNamespace
from typing import Any

import pytest

from wasmgate.gateway.host import GatewayHost
from wasmgate.gateway.upstream import UpstreamPools
from wasmgate.runtime.host import GrpcCallRequest, HttpCallRequest, RedisCallRequest


def new_vm() -> Any:
    return SimpleNamespace(grpc_tokens=set())


class Plugin:
    """Stands in for a started Plugin: records what the host delivers, and to which VM."""

    failed = False
    starting = False

    def __init__(self) -> None:
        self.vm = new_vm()
        self.redis_clusters: dict[str, object] = {}
        self.delivered: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()

    def describe(self) -> str:
        return "'fake'"

    def _put(self, *what: Any) -> None:
        self.delivered.put_nowait((self.vm, *what))

    def deliver_http_call_response(self, token: int, headers: Any, body: bytes = b"",
                                   trailers: Any = None) -> None:
        self._put("http", token, bytes(body))

    def deliver_http_call_failure(self, token: int, message: bytes = b"reset") -> None:
        self._put("http-failure", token)

    def deliver_redis_response(self, token: int, status: int, response: bytes = b"") -> None:
        self._put("redis", token, status, bytes(response))

    def deliver_grpc_message(self, token: int, message: bytes) -> None:
        self._put("grpc", token, bytes(message))

    def deliver_grpc_close(self, token: int, status: int, message: bytes = b"") -> None:
        self._put("grpc-close", token, status)


async def answer_after(delays: dict[bytes, float], reply: Any) -> asyncio.Server:
    """A server that answers each request (first line containing a key of `delays`) after
    that delay with `reply(key)`."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            key = next(k for k in delays if k in data)
            await asyncio.sleep(delays[key])
            writer.write(reply(key))
            await writer.drain()
        writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


async def drain(queue: asyncio.Queue[tuple[Any, ...]], wait: float) -> list[tuple[Any, ...]]:
    await asyncio.sleep(wait)
    out = []
    while not queue.empty():
        out.append(queue.get_nowait())
    return out


def test_http_call_result_of_a_previous_vm_is_dropped() -> None:
    def http(key: bytes) -> bytes:
        body = key.strip(b"/ ")
        return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)

    async def run() -> list[tuple[Any, ...]]:
        server = await answer_after({b"/old ": 0.2, b"/new ": 0.4}, http)
        port = server.sockets[0].getsockname()[1]
        host = GatewayHost(asyncio.get_running_loop(), UpstreamPools(),
                           lambda name: ("127.0.0.1", port))
        plugin = Plugin()

        def request(path: bytes) -> HttpCallRequest:
            return HttpCallRequest(4, "up", [(b":method", b"GET"), (b":path", path),
                                             (b":authority", b"a")], b"", [], 2000, 1)

        host.http_call(plugin, request(b"/old"))  # type: ignore[arg-type]
        plugin.vm = fresh = new_vm()  # restarted: the fresh VM issues token 4 again
        host.http_call(plugin, request(b"/new"))  # type: ignore[arg-type]
        delivered = await drain(plugin.delivered, 0.8)
        server.close()
        assert all(vm is fresh for vm, *_ in delivered)
        return [tuple(rest) for _, *rest in delivered]

    assert asyncio.run(run()) == [("http", 4, b"new")]


def test_redis_reply_of_a_previous_vm_is_dropped() -> None:
    async def run() -> list[tuple[Any, ...]]:
        server = await answer_after({b"OLD": 0.2, b"NEW": 0.4},
                                    lambda key: b"+" + key + b"\r\n")
        port = server.sockets[0].getsockname()[1]
        host = GatewayHost(asyncio.get_running_loop(), UpstreamPools(), lambda name: None)
        host.resolve_redis = lambda name: ("127.0.0.1", port)
        plugin = Plugin()
        old = RedisCallRequest(3, "redis", b"*1\r\n$3\r\nOLD\r\n", 1)
        host.redis_call(plugin, old)  # type: ignore[arg-type]
        plugin.vm = new_vm()
        new = RedisCallRequest(3, "redis", b"*1\r\n$3\r\nNEW\r\n", 1)
        host.redis_call(plugin, new)  # type: ignore[arg-type]
        delivered = await drain(plugin.delivered, 0.8)
        server.close()
        return [tuple(rest) for _, *rest in delivered]

    assert asyncio.run(run()) == [("redis", 3, 0, b"+NEW\r\n")]


def test_grpc_calls_are_keyed_by_the_issuing_vm() -> None:
    grpc = pytest.importorskip("grpc")

    def slow(request: bytes, context: Any) -> bytes:
        import time

        time.sleep(0.3)
        return b"old:" + request

    def fast(request: bytes, context: Any) -> bytes:
        import time

        time.sleep(0.6)
        return b"new:" + request

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.S", {
        "Old": grpc.unary_unary_rpc_method_handler(slow),
        "New": grpc.unary_unary_rpc_method_handler(fast)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()

    async def run() -> list[tuple[Any, ...]]:
        host = GatewayHost(asyncio.get_running_loop(), UpstreamPools(),
                           lambda name: ("127.0.0.1", port))
        plugin = Plugin()

        def request(method: str) -> GrpcCallRequest:
            return GrpcCallRequest(token=1, service=b"svc", service_name="t.S", method=method,
                                   initial_metadata=[], message=b"x", timeout_ms=5000,
                                   context_id=1)

        host.grpc_call(plugin, request("Old"))  # type: ignore[arg-type]
        plugin.vm = new_vm()  # the fresh VM's first gRPC token is 1 again
        host.grpc_call(plugin, request("New"))  # type: ignore[arg-type]
        delivered = await drain(plugin.delivered, 1.5)
        assert host._grpc is not None and not host._grpc.calls
        await host._grpc.aclose()
        return [tuple(rest) for _, *rest in delivered]

    try:
        # the old VM's answer is dropped, and does not take the new call's place either
        assert asyncio.run(run()) == [("grpc", 1, b"new:x")]
    finally:
        server.stop(0)
