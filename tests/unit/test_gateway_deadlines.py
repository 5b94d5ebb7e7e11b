"""Upstream response timeouts (504 upstream_response_timeout) with one timer per downstream
connection: each request's deadline still counts from its own end, whatever the requests
before it on the same keep-alive connection did. Real sockets on 127.0.0.1, in process."""

from __future__ import annotations

import asyncio
from itertools import count

import pytest
import uvloop

from wasmgate.api.loading import load_text
from wasmgate.gateway.proxy import ProxyState, Router
from wasmgate.gateway.server import DownstreamProtocol
from wasmgate.gateway.stats import GatewayStats
from wasmgate.gateway.upstream import UpstreamPools


async def _upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers a request unless its path contains /slow (those never get an answer)."""
    while True:
        head = await reader.readuntil(b"\r\n\r\n")
        if b"/slow" not in head.split(b"\r\n", 1)[0]:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")


async def _gateway(upstream_port: int) -> tuple[asyncio.AbstractServer, GatewayStats]:
    spec = load_text(f"""\
apiVersion: wasmgate.io/v1alpha1
kind: Gateway
metadata: {{name: t}}
spec:
  clusters:
  - {{name: long, endpoints: ["127.0.0.1:{upstream_port}"], timeoutMs: 600}}
  - {{name: short, endpoints: ["127.0.0.1:{upstream_port}"], timeoutMs: 300}}
  routes:
  - {{name: short, match: {{prefix: /short}}, cluster: short}}
  - {{name: long, cluster: long}}
""").gateways[0].spec
    stats = GatewayStats()
    state = ProxyState(Router(spec), None, UpstreamPools(), stats)
    ids = count(1)
    server = await asyncio.get_running_loop().create_server(
        lambda: DownstreamProtocol(lambda: state, next(ids), lambda _p: None), "127.0.0.1", 0)
    return server, stats


async def _get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
               path: str) -> tuple[bytes, float]:
    loop = asyncio.get_running_loop()
    started = loop.time()
    writer.write(f"GET {path} HTTP/1.1\r\nhost: t\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    await reader.readexactly(length)
    return head.split(b"\r\n", 1)[0], loop.time() - started


@pytest.mark.parametrize("loop_factory", [asyncio.new_event_loop, uvloop.new_event_loop],
                         ids=["asyncio", "uvloop"])
def test_each_request_times_out_after_its_own_deadline(loop_factory: object) -> None:
    async def run() -> None:
        upstream = await asyncio.start_server(_upstream, "127.0.0.1", 0)
        server, stats = await _gateway(upstream.sockets[0].getsockname()[1])
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", server.sockets[0].getsockname()[1])
        try:
            # a later deadline than the connection's pending timer: re-armed when it fires
            assert (await _get(reader, writer, "/short/a"))[0] == b"HTTP/1.1 200 OK"
            await asyncio.sleep(0.2)
            status, elapsed = await _get(reader, writer, "/short/slow")
            assert status == b"HTTP/1.1 504 Gateway Timeout"
            assert 0.29 <= elapsed < 0.3 + 0.15
            # an earlier deadline than the pending timer (a shorter route timeout): fires early
            assert (await _get(reader, writer, "/a"))[0] == b"HTTP/1.1 200 OK"
            status, elapsed = await _get(reader, writer, "/short/slow")
            assert status == b"HTTP/1.1 504 Gateway Timeout"
            assert 0.29 <= elapsed < 0.3 + 0.15
            # and the longer one on the same connection keeps its own
            status, elapsed = await _get(reader, writer, "/slow")
            assert status == b"HTTP/1.1 504 Gateway Timeout"
            assert 0.59 <= elapsed < 0.6 + 0.15
            # answered requests never time out later
            assert (await _get(reader, writer, "/short/b"))[0] == b"HTTP/1.1 200 OK"
            await asyncio.sleep(0.4)
            assert (await _get(reader, writer, "/short/c"))[0] == b"HTTP/1.1 200 OK"
            assert stats.upstream_timeouts == 3
        finally:
            writer.close()
            server.close()
            upstream.close()

    with asyncio.Runner(loop_factory=loop_factory) as runner:  # type: ignore[arg-type]
        runner.run(run())
