"""GatewayHost.http_call reports upstream failures as Envoy's async client does.

Envoy runs the router filter inside its async client, so a call that fails before any response
header arrives gets the router's local reply as an ordinary response: 503 ``upstream connect
error or disconnect/reset before headers. reset reason: ...`` (connect failure, reset), 502 for a
protocol error, 504 ``upstream request timeout``. Only a reset after the headers reaches the
plugin as a failure: ``proxy_on_http_call_response(token, 0, 0, 0)`` and get_status 11 "reset".
Each case here runs against a real socket on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from wasmgate.gateway.host import GatewayHost
from wasmgate.gateway.upstream import UpstreamPools
from wasmgate.runtime.host import HttpCallRequest

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class FakePlugin:
    """Stands in for a started Plugin: records what the host delivers."""

    vm = object()
    failed = False
    starting = False

    def __init__(self) -> None:
        self.delivered: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()

    def deliver_http_call_response(self, token: int, headers: Any, body: bytes = b"",
                                   trailers: Any = None) -> None:
        self.delivered.put_nowait(("response", token, dict(headers), bytes(body)))

    def deliver_http_call_failure(self, token: int, message: bytes = b"reset") -> None:
        self.delivered.put_nowait(("failure", token))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def call(port: int, timeout_ms: int = 2000) -> tuple[Any, ...]:
    host = GatewayHost(asyncio.get_running_loop(), UpstreamPools(),
                       lambda name: ("127.0.0.1", port))
    plugin = FakePlugin()
    request = HttpCallRequest(token=4, upstream=f"127.0.0.1:{port}",
                              headers=[(b":method", b"GET"), (b":path", b"/auth"),
                                       (b":authority", b"auth")],
                              body=b"", trailers=[], timeout_ms=timeout_ms, context_id=1)
    host.http_call(plugin, request)  # type: ignore[arg-type]
    return await asyncio.wait_for(plugin.delivered.get(), 10)


async def with_server(handler: Handler, timeout_ms: int = 2000) -> tuple[Any, ...]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        return await call(server.sockets[0].getsockname()[1], timeout_ms)
    finally:
        server.close()


async def read_head(reader: asyncio.StreamReader) -> None:
    await reader.readuntil(b"\r\n\r\n")


def test_an_answer_is_delivered_as_is() -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 2\r\nx-why: bad\r\n\r\nno")
        await writer.drain()
        writer.close()

    kind, token, headers, body = asyncio.run(with_server(answer))
    assert (kind, token, body) == ("response", 4, b"no")
    assert headers[b":status"] == b"401" and headers[b"x-why"] == b"bad"


def test_connection_refused_is_the_routers_503() -> None:
    kind, _, headers, body = asyncio.run(call(free_port()))
    assert kind == "response" and headers[b":status"] == b"503"
    assert body == (b"upstream connect error or disconnect/reset before headers. reset reason: "
                    b"remote connection failure, transport failure reason: "
                    b"delayed connect error: Connection refused")
    assert headers[b"content-length"] == str(len(body)).encode()
    assert headers[b"content-type"] == b"text/plain"


def test_no_answer_in_time_is_the_routers_504() -> None:
    held = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        await held.wait()  # never answers; released when the test ends

    async def run() -> tuple[Any, ...]:
        try:
            return await with_server(silent, timeout_ms=200)
        finally:
            held.set()

    kind, _, headers, body = asyncio.run(run())
    assert (kind, headers[b":status"], body) == ("response", b"504", b"upstream request timeout")


def test_closed_before_the_headers_is_the_routers_503() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.close()

    kind, _, headers, body = asyncio.run(with_server(hang_up))
    assert kind == "response" and headers[b":status"] == b"503"
    assert body.endswith(b"before headers. reset reason: connection termination")


def test_a_malformed_response_is_the_routers_502() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"NOT HTTP AT ALL\r\n\r\n")
        await writer.drain()

    kind, _, headers, body = asyncio.run(with_server(garbage))
    assert kind == "response" and headers[b":status"] == b"502"
    assert body.endswith(b"reset reason: protocol error")


def test_reset_after_the_headers_is_a_failure() -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
        await writer.drain()
        writer.close()

    assert asyncio.run(with_server(cut)) == ("failure", 4)
