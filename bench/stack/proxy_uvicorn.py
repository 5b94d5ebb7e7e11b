"""(c) Reverse proxy: uvicorn (http=httptools, loop=uvloop) + a raw ASGI app.

Upstream client (choose with --client):
  raw      (default) the callback UpstreamPool/Upstream from proxy_raw.py (httptools
           response parser, keep-alive pool), wrapped in a small awaitable sink;
  aiohttp  an aiohttp.ClientSession with TCPConnector(limit=...).

Single process, single event loop; the response is streamed with more_body=True.

    python proxy_uvicorn.py --port 18090 --upstream 127.0.0.1:18081 --client raw
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections import deque

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from proxy_raw import HOP, NO_BODY_STATUS, UpstreamPool, build_request_head

HOP_STR = frozenset(h.decode() for h in HOP)


class AsgiSink:
    """Bridges the callback Upstream to awaitables for one exchange."""

    __slots__ = ("chunks", "done", "error", "head", "loop", "paused", "up", "waiter")

    def __init__(self, loop):
        self.loop = loop
        self.head = loop.create_future()
        self.chunks: deque[bytes] = deque()
        self.waiter = None
        self.done = False
        self.error = None
        self.up = None
        self.paused = False

    def _wake(self):
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)

    def up_head(self, status, reason, headers, up):
        self.up = up
        self.head.set_result((status, headers))

    def up_body(self, body):
        self.chunks.append(body)
        if len(self.chunks) > 8 and not self.paused:
            self.paused = True
            self.up.pause_reading()
        self._wake()

    def up_done(self):
        self.done = True
        self._wake()

    def up_error(self, exc, retriable):
        self.error = exc
        if not self.head.done():
            self.head.set_exception(exc)
        self.done = True
        self._wake()

    # request-body back-pressure: uvicorn owns the downstream socket; no-op here
    def pause_reading_downstream(self):
        pass

    def resume_reading_downstream(self):
        pass

    async def next_chunk(self) -> bytes | None:
        while not self.chunks:
            if self.done:
                if self.error is not None:
                    raise self.error
                return None
            self.waiter = self.loop.create_future()
            await self.waiter
            self.waiter = None
        if self.paused and len(self.chunks) <= 2:
            self.paused = False
            self.up.resume_reading()
        return self.chunks.popleft()


def make_raw_app(upstream: str, limit: int):
    state = {}
    uh = upstream.encode()
    host, _, port = upstream.rpartition(":")

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    state["pool"] = UpstreamPool(asyncio.get_running_loop(), host, int(port),
                                                 limit)
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        loop = asyncio.get_running_loop()
        pool: UpstreamPool = state["pool"]
        method = scope["method"].encode()
        url = scope["raw_path"] or scope["path"].encode()
        if scope["query_string"]:
            url += b"?" + scope["query_string"]
        client = scope.get("client")
        cip = client[0].encode() if client else b"unknown"
        head, chunked = build_request_head(method, url, scope["headers"], cip, uh)
        has_body = any((n == b"content-length" and v != b"0") or n == b"transfer-encoding"
                       for n, v in scope["headers"])
        for attempt in (0, 1):
            up = await pool.acquire_async()
            if up is None:
                await _simple(send, 502, b"upstream connect failed")
                return
            sink = AsgiSink(loop)
            up.start(head, sink, method)
            if has_body:
                more = True
                while more:
                    msg = await receive()
                    body = msg.get("body", b"")
                    more = msg.get("more_body", False)
                    if body:
                        up.send(b"%x\r\n%b\r\n" % (len(body), body) if chunked else body)
                if chunked:
                    up.send(b"0\r\n\r\n")
            try:
                status, headers = await sink.head
                break
            except Exception:
                if attempt or has_body:
                    await _simple(send, 502, b"upstream error")
                    return
        out = [(n, v) for n, v in headers if n.lower() not in HOP]
        await send({"type": "http.response.start", "status": status, "headers": out})
        if method == b"HEAD" or status in NO_BODY_STATUS:
            await send({"type": "http.response.body", "body": b""})
            return
        while True:
            chunk = await sink.next_chunk()  # raises on truncation -> uvicorn aborts
            if chunk is None:
                break
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b""})

    return app


def make_aiohttp_app(upstream: str, limit: int):
    import aiohttp
    from yarl import URL
    state = {}
    base = f"http://{upstream}"

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    state["s"] = aiohttp.ClientSession(
                        connector=aiohttp.TCPConnector(limit=limit, keepalive_timeout=60),
                        auto_decompress=False,
                        skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept"),
                        timeout=aiohttp.ClientTimeout(total=None, sock_connect=5))
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await state["s"].close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        hdrs = []
        xff = None
        for n, v in scope["headers"]:
            if n in HOP:
                continue
            if n == b"x-forwarded-for":
                xff = v.decode("latin-1")
                continue
            hdrs.append((n.decode("latin-1"), v.decode("latin-1")))
        client = scope.get("client")
        cip = client[0] if client else "unknown"
        hdrs.append(("X-Forwarded-For", f"{xff}, {cip}" if xff else cip))
        path = (scope["raw_path"] or scope["path"].encode()).decode("latin-1")
        if scope["query_string"]:
            path += "?" + scope["query_string"].decode("latin-1")

        async def body_gen():
            more = True
            while more:
                msg = await receive()
                more = msg.get("more_body", False)
                if msg.get("body"):
                    yield msg["body"]

        has_body = any(n in (b"content-length", b"transfer-encoding") for n, _ in scope["headers"])
        async with state["s"].request(scope["method"], URL(base + path, encoded=True),
                                      headers=hdrs, data=body_gen() if has_body else None,
                                      allow_redirects=False) as up:
            out = [(k.encode("latin-1"), v.encode("latin-1"))
                   for k, v in up.headers.items() if k.lower() not in HOP_STR]
            await send({"type": "http.response.start", "status": up.status, "headers": out})
            async for chunk in up.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})

    return app


async def _simple(send, status, msg):
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-length", b"%d" % len(msg))]})
    await send({"type": "http.response.body", "body": msg})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=18090)
    ap.add_argument("--upstream", default="127.0.0.1:18081")
    ap.add_argument("--limit", type=int, default=64)
    ap.add_argument("--client", choices=("raw", "aiohttp"), default="raw")
    a = ap.parse_args()
    import uvicorn
    app = (make_raw_app if a.client == "raw" else make_aiohttp_app)(a.upstream, a.limit)
    uvicorn.run(app, host=a.host, port=a.port, loop="uvloop", http="httptools",
                lifespan="on", access_log=False, log_level="warning", server_header=False,
                date_header=False, backlog=1024, proxy_headers=False)


if __name__ == "__main__":
    main()
