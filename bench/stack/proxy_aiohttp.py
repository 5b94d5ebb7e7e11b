"""(a) Reverse proxy: aiohttp.web server + aiohttp.ClientSession, on uvloop.

Single process, single event loop. Upstream keep-alive pooling through a shared
ClientSession / TCPConnector(limit=...). The response is streamed
(StreamResponse + iter_any), never buffered whole.

    python proxy_aiohttp.py --port 18090 --upstream 127.0.0.1:18081
"""

from __future__ import annotations

import argparse
import asyncio

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

HOP = frozenset(
    ("connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
     "upgrade", "proxy-authenticate", "proxy-authorization")
)


def make_app(upstream: str, limit: int) -> web.Application:
    base = f"http://{upstream}"
    app = web.Application()

    async def on_startup(app):
        app["session"] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=limit, keepalive_timeout=60,
                                           ttl_dns_cache=None, use_dns_cache=True),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept"),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
        )

    async def on_cleanup(app):
        await app["session"].close()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)

    async def handler(request: web.Request) -> web.StreamResponse:
        session: aiohttp.ClientSession = request.app["session"]
        headers = CIMultiDict()
        xff = None
        for k, v in request.headers.items():
            lk = k.lower()
            if lk in HOP:
                continue
            if lk == "x-forwarded-for":
                xff = v if xff is None else f"{xff}, {v}"
                continue
            headers.add(k, v)
        peer = request.remote or "unknown"
        headers["X-Forwarded-For"] = f"{xff}, {peer}" if xff else peer
        url = URL(base + request.raw_path, encoded=True)
        data = request.content if request.body_exists else None
        async with session.request(request.method, url, headers=headers, data=data,
                                   allow_redirects=False) as up:
            resp = web.StreamResponse(status=up.status, reason=up.reason)
            for k, v in up.headers.items():
                if k.lower() not in HOP:
                    resp.headers.add(k, v)
            if up.content_length is None and request.method != "HEAD":
                resp.enable_chunked_encoding()
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    app.router.add_route("*", "/{tail:.*}", handler)
    return app


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=18090)
    ap.add_argument("--upstream", default="127.0.0.1:18081")
    ap.add_argument("--limit", type=int, default=64, help="TCPConnector limit")
    a = ap.parse_args()
    import uvloop
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    web.run_app(make_app(a.upstream, a.limit), host=a.host, port=a.port,
                access_log=None, print=lambda *x: print(*x, flush=True), backlog=1024)


if __name__ == "__main__":
    main()
