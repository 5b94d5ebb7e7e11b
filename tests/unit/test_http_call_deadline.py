"""GatewayHost.http_call: one timeout for connecting and the answer together (as Envoy's), and
connect failures reported with the exception's own reason. Real sockets on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from typing import Any

from wasmgate.api.gateway import Cluster
from wasmgate.gateway.host import GatewayHost
from wasmgate.gateway.upstream import UpstreamPools
from wasmgate.runtime.host import HttpCallRequest

from .test_http_call_replies import FakePlugin


async def http_call(resolved: Any, timeout_ms: int) -> tuple[tuple[Any, ...], float]:
    """One http_call to whatever `resolved` is; what was delivered, and after how long."""
    loop = asyncio.get_running_loop()
    host = GatewayHost(loop, UpstreamPools(), lambda name: resolved)
    plugin = FakePlugin()
    request = HttpCallRequest(token=4, upstream="auth", body=b"", trailers=[], context_id=1,
                              headers=[(b":method", b"GET"), (b":path", b"/auth"),
                                       (b":authority", b"auth")], timeout_ms=timeout_ms)
    started = loop.time()
    host.http_call(plugin, request)  # type: ignore[arg-type]
    delivered = await asyncio.wait_for(plugin.delivered.get(), 20)
    return delivered, loop.time() - started


class SlowToAccept:
    """An upstream whose accept queue is full when the call connects: the kernel drops the
    SYN and the client sends it again ~1 s later, so connecting takes ~1 s. The server then
    answers `answer_after` seconds after it accepted the call's connection."""

    def __init__(self, answer_after: float) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(0)
        self.port = self.listener.getsockname()[1]
        self.filler = socket.create_connection(("127.0.0.1", self.port))  # fills the queue
        self.answer_after = answer_after
        self.started = time.monotonic()
        self.connected_after: float | None = None
        self.kept: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        time.sleep(0.2)  # the call's SYN has been dropped by now
        self.kept.append(self.listener.accept()[0])  # the filler: room for the retried SYN
        connection = self.listener.accept()[0]
        self.kept.append(connection)
        self.connected_after = time.monotonic() - self.started
        connection.recv(65536)
        time.sleep(self.answer_after)
        with contextlib.suppress(OSError):  # the gateway may have given up already
            connection.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nlate")

    def close(self) -> None:
        for s in (*self.kept, self.filler, self.listener):
            s.close()


def test_the_timeout_covers_connecting_and_the_answer() -> None:
    upstream = SlowToAccept(answer_after=0.8)  # connected at ~1.0 s, answered at ~1.8 s
    try:
        (kind, _, headers, body), elapsed = asyncio.run(
            http_call(("127.0.0.1", upstream.port), timeout_ms=1500))
    finally:
        upstream.close()
    assert upstream.connected_after is not None and upstream.connected_after > 0.5, (
        "connecting was not slow: the test does not exercise the split")
    assert (kind, headers[b":status"], body) == ("response", b"504", b"upstream request timeout")
    assert elapsed < 1.5 + 0.25  # not connect time + the whole timeout again


def test_an_answer_within_the_one_timeout_arrives() -> None:
    upstream = SlowToAccept(answer_after=0.3)  # connected at ~1.0 s, answered at ~1.3 s
    try:
        (kind, _, headers, body), _ = asyncio.run(
            http_call(("127.0.0.1", upstream.port), timeout_ms=2500))
    finally:
        upstream.close()
    assert (kind, headers[b":status"], body) == ("response", b"200", b"late")


def test_a_name_that_does_not_resolve_is_no_healthy_upstream() -> None:
    cluster = Cluster(name="auth", endpoints=["does-not-exist.invalid:80"])
    (kind, _, headers, body), _ = asyncio.run(http_call(cluster, timeout_ms=4000))
    assert (kind, headers[b":status"], body) == ("response", b"503", b"no healthy upstream")
    assert headers[b"content-length"] == b"19"


def test_a_tls_failure_names_its_reason() -> None:
    async def run() -> tuple[Any, ...]:
        async def plain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(1024)  # a ClientHello, answered in plain HTTP
            writer.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(plain, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            cluster = Cluster(name="auth", endpoints=[f"127.0.0.1:{port}"], tls=True)
            return (await http_call(cluster, timeout_ms=4000))[0]
        finally:
            server.close()

    kind, _, headers, body = asyncio.run(run())
    assert kind == "response" and headers[b":status"] == b"503"
    prefix = (b"upstream connect error or disconnect/reset before headers. reset reason: "
              b"remote connection failure, transport failure reason: TLS_error:")
    assert body.startswith(prefix), body
    reason = body[len(prefix):]
    assert reason and b"Operation not permitted" not in reason and b"errno" not in reason
