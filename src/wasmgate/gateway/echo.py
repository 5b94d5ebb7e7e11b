"""A built-in upstream for the demo and the tests: it answers every request with a JSON echo
of what it received (method, path, headers, body size), so the effect of plugins is visible.
"""

from __future__ import annotations

import asyncio
import json

import httptools


class EchoProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self._reset()

    def _reset(self) -> None:
        self.url = b""
        self.headers: list[tuple[str, str]] = []
        self.body = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        echo = {"method": self.parser.get_method().decode(), "path": self.url.decode("latin-1"),
                "headers": dict(self.headers), "body_bytes": len(self.body),
                "body": self.body[:4096].decode("utf-8", "replace")}
        body = json.dumps(echo, indent=1).encode() + b"\n"
        head = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                b"x-upstream: wasmgate-echo\r\ncontent-length: %d\r\n\r\n" % len(body))
        if self.transport is not None:
            self.transport.write(head + body)
            if not self.parser.should_keep_alive():
                self.transport.close()
        self._reset()


async def start_echo(host: str = "127.0.0.1", port: int = 0) -> asyncio.AbstractServer:
    loop = asyncio.get_running_loop()
    return await loop.create_server(EchoProtocol, host, port)
