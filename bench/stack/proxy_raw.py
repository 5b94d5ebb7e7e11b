"""(b) Hand-written reverse proxy: asyncio.Protocol on uvloop + httptools.

Downstream: one ``Downstream`` protocol per client connection, parsed with
``httptools.HttpRequestParser``; pipelined requests are queued and served in
order. Upstream: ``UpstreamPool`` of keep-alive ``Upstream`` protocols parsed
with ``httptools.HttpResponseParser``. The response is streamed: head and every
body piece are written downstream as they arrive (no buffering), with
back-pressure both ways (pause_reading on the other side when a write buffer
goes over its high-water mark).

The Upstream speaks to a small "sink" interface (up_head / up_body / up_done /
up_error) so the same pool also serves the ASGI app in proxy_uvicorn.py.

Prototype limits: no 1xx/Expect handling, no Upgrade/CONNECT (501), trailers of
chunked upstream responses are dropped, no timeouts.

    python proxy_raw.py --port 18090 --upstream 127.0.0.1:18081
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections import deque

import httptools

# Hop-by-hop headers (RFC 9110 7.6.1), never forwarded as-is.
HOP = frozenset(
    (b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
     b"transfer-encoding", b"upgrade", b"proxy-authenticate", b"proxy-authorization")
)
NO_BODY_STATUS = frozenset((204, 304))
IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"))


class Upstream(asyncio.Protocol):
    """One keep-alive connection to the upstream; serves one exchange at a time."""

    __slots__ = (
        "closed",
        "got_bytes",
        "headers",
        "method",
        "parser",
        "pool",
        "reason",
        "sink",
        "sink_paused_for_us",
        "transport",
        "until_close",
    )

    def __init__(self, pool: UpstreamPool):
        self.pool = pool
        self.transport = None
        self.parser = httptools.HttpResponseParser(self)
        self.sink = None
        self.method = b"GET"
        self.reason = b""
        self.headers: list = []
        self.got_bytes = False
        self.closed = False
        self.sink_paused_for_us = False
        self.until_close = False

    # -- driven by the sink ------------------------------------------------
    def start(self, head: bytes, sink, method: bytes) -> None:
        self.sink = sink
        self.method = method
        self.reason = b""
        self.headers = []
        self.got_bytes = False
        self.until_close = False
        self.transport.write(head)

    def send(self, data: bytes) -> None:
        self.transport.write(data)

    def pause_reading(self):
        if not self.closed:
            self.transport.pause_reading()

    def resume_reading(self):
        if not self.closed:
            self.transport.resume_reading()

    def abandon(self) -> None:
        """Sink went away mid-exchange: this connection is in an unknown state."""
        self.sink = None
        if not self.closed:
            self.transport.close()

    # -- asyncio.Protocol ----------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(exc, retriable=False)

    def connection_lost(self, exc):
        self.closed = True
        self.pool.discard(self)
        if self.sink is not None:
            # EOF before message_complete. httptools has no llhttp_finish(), so a
            # close-delimited body (no content-length, not chunked) ends HERE.
            if self.until_close and exc is None:
                self._done(False)
                return
            self._fail(exc or ConnectionResetError("upstream closed"),
                       retriable=not self.got_bytes)

    def pause_writing(self):  # our request body is outrunning the upstream
        if self.sink is not None:
            self.sink.pause_reading_downstream()
            self.sink_paused_for_us = True

    def resume_writing(self):
        if self.sink is not None and self.sink_paused_for_us:
            self.sink.resume_reading_downstream()
        self.sink_paused_for_us = False

    # -- httptools callbacks -------------------------------------------------
    def on_status(self, status: bytes):
        self.reason += status  # may arrive in fragments

    def on_header(self, name: bytes, value: bytes):
        self.headers.append((name, value))

    def on_headers_complete(self):
        status = self.parser.get_status_code()
        sink = self.sink
        if sink is None:
            return
        framed = False
        for name, value in self.headers:
            lname = name.lower()
            if lname == b"content-length" or (lname == b"transfer-encoding"
                                              and b"chunked" in value.lower()):
                framed = True
        self.until_close = not framed
        sink.up_head(status, self.reason, self.headers, self)
        if self.method == b"HEAD" or status in NO_BODY_STATUS:
            # httptools can't be told "this answers a HEAD" (llhttp wants 1 from
            # on_headers_complete, httptools returns 1 only for upgrades), so it
            # would wait for content-length bytes that never come. Finish here
            # and replace the parser for the next exchange.
            keep = self.parser.should_keep_alive()
            self.parser = httptools.HttpResponseParser(self)
            self._done(keep)

    def on_body(self, body: bytes):
        # Never pass an empty piece on: re-framed as chunked it would be "0\r\n\r\n",
        # i.e. a premature end of the downstream message.
        if body and self.sink is not None:
            self.sink.up_body(body)

    def on_message_complete(self):
        if self.sink is not None:
            self._done(self.parser.should_keep_alive())

    # -- internals -----------------------------------------------------------
    def _done(self, keep: bool):
        sink, self.sink = self.sink, None
        if self.sink_paused_for_us:
            sink.resume_reading_downstream()
            self.sink_paused_for_us = False
        sink.up_done()
        if keep and not self.closed:
            self.transport.resume_reading()  # sink may have paused us
            self.pool.release(self)
        elif not self.closed:
            self.transport.close()

    def _fail(self, exc, retriable: bool):
        sink, self.sink = self.sink, None
        if not self.closed:
            self.transport.close()
        if sink is not None:
            sink.up_error(exc, retriable)


class UpstreamPool:
    """Keep-alive pool with a connection limit; callback-based (no tasks when warm)."""

    def __init__(self, loop, host: str, port: int, limit: int = 64):
        self.loop, self.host, self.port, self.limit = loop, host, port, limit
        self.idle: list[Upstream] = []
        self.count = 0
        self.waiters: deque = deque()

    def acquire(self, cb) -> None:
        """cb(upstream) now or later; cb(None) if a connection could not be made."""
        idle = self.idle
        while idle:
            up = idle.pop()  # LIFO: the warmest connection
            if not up.closed:
                cb(up)
                return
        if self.count < self.limit:
            self.count += 1
            fut = self.loop.create_task(
                self.loop.create_connection(lambda: Upstream(self), self.host, self.port))
            fut.add_done_callback(lambda f: self._connected(f, cb))
        else:
            self.waiters.append(cb)

    async def acquire_async(self) -> Upstream | None:
        fut = self.loop.create_future()
        self.acquire(fut.set_result)
        return await fut

    def _connected(self, fut, cb):
        if fut.cancelled() or fut.exception() is not None:
            self.count -= 1
            cb(None)
        else:
            cb(fut.result()[1])

    def release(self, up: Upstream) -> None:
        if self.waiters:
            self.waiters.popleft()(up)
        else:
            self.idle.append(up)

    def discard(self, up: Upstream) -> None:
        with contextlib.suppress(ValueError):
            self.idle.remove(up)
        self.count -= 1
        if self.waiters and self.count < self.limit:
            self.acquire(self.waiters.popleft())


def build_request_head(method: bytes, url: bytes, headers, client_ip: bytes,
                       upstream_host: bytes) -> tuple[bytes, bool]:
    """Upstream request head (HTTP/1.1, keep-alive). Returns (head, body_chunked)."""
    out = [method, b" ", url, b" HTTP/1.1\r\n"]
    xff = None
    has_host = False
    clen = None
    chunked = False
    for name, value in headers:
        lname = name.lower()
        if lname in HOP:
            if lname == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            continue
        if lname == b"x-forwarded-for":
            xff = value if xff is None else xff + b", " + value
            continue
        if lname == b"host":
            has_host = True
        elif lname == b"content-length":
            clen = value
        out += (name, b": ", value, b"\r\n")
    if not has_host:
        out += (b"host: ", upstream_host, b"\r\n")
    out += (b"x-forwarded-for: ", (xff + b", " + client_ip) if xff else client_ip, b"\r\n")
    if chunked and clen is None:
        out.append(b"transfer-encoding: chunked\r\n")
    out.append(b"\r\n")
    return b"".join(out), (chunked and clen is None)


class Request:
    __slots__ = (
        "chunked",
        "complete",
        "has_body",
        "head",
        "headers",
        "http11",
        "keep_alive",
        "method",
        "pending",
        "retried",
        "url",
    )

    def __init__(self):
        self.url = b""
        self.headers = []
        self.pending: list[bytes] = []  # body pieces not yet sent upstream
        self.complete = False
        self.retried = False
        self.has_body = False


class Downstream(asyncio.Protocol):
    """One client connection. Acts as the Upstream's sink for its active request."""

    def __init__(self, pool: UpstreamPool, upstream_host: bytes):
        self.pool = pool
        self.upstream_host = upstream_host
        self.parser = httptools.HttpRequestParser(self)
        self.transport = None
        self.client_ip = b""
        self.queue: deque[Request] = deque()
        self.cur: Request | None = None     # being parsed
        self.active: Request | None = None  # being proxied
        self.up: Upstream | None = None
        self.closed = False
        self.write_paused = False
        self.read_paused = False
        self.rechunk = False
        self.keep = True
        self.head: bytes | None = None  # response head not yet written

    # -- asyncio.Protocol ----------------------------------------------------
    def connection_made(self, transport):
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0].encode() if peer else b"unknown"

    def data_received(self, data):
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._simple(501, b"upgrade not supported")
        except httptools.HttpParserError:
            self._simple(400, b"bad request")

    def connection_lost(self, exc):
        self.closed = True
        self.queue.clear()
        if self.up is not None:
            self.up.abandon()  # mid-response: that connection can't be reused
            self.up = None

    def pause_writing(self):  # client reads slower than upstream sends
        self.write_paused = True
        if self.up is not None:
            self.up.pause_reading()

    def resume_writing(self):
        self.write_paused = False
        if self.up is not None:
            self.up.resume_reading()

    # -- httptools callbacks -------------------------------------------------
    def on_message_begin(self):
        self.cur = Request()

    def on_url(self, url: bytes):
        self.cur.url += url  # may be called several times for one URL

    def on_header(self, name: bytes, value: bytes):
        self.cur.headers.append((name, value))

    def on_headers_complete(self):
        r = self.cur
        p = self.parser
        r.method = p.get_method()
        r.http11 = p.get_http_version() == "1.1"
        r.keep_alive = p.should_keep_alive()
        r.head, r.chunked = build_request_head(r.method, r.url, r.headers, self.client_ip,
                                               self.upstream_host)
        r.headers = None
        self.queue.append(r)
        if self.active is None:
            self._start_next()
        elif len(self.queue) > 16 and not self.read_paused:  # pipelining flood
            self.read_paused = True
            self.transport.pause_reading()

    def on_body(self, body: bytes):
        r = self.cur
        if not body:
            return
        r.has_body = True
        if r is self.active and self.up is not None:
            self.up.send(b"%x\r\n%b\r\n" % (len(body), body) if r.chunked else body)
        else:
            r.pending.append(body)

    def on_message_complete(self):
        r = self.cur
        r.complete = True
        if r.chunked and r is self.active and self.up is not None:
            self.up.send(b"0\r\n\r\n")

    # -- proxying ------------------------------------------------------------
    def _start_next(self):
        self.active = r = self.queue.popleft()
        self.pool.acquire(self._attach)
        if self.read_paused and len(self.queue) <= 16:
            self.read_paused = False
            self.transport.resume_reading()
        return r

    def _attach(self, up: Upstream | None):
        if self.closed:
            if up is not None:
                self.pool.release(up)
            return
        if up is None:
            self._simple(502, b"upstream connect failed")
            return
        r = self.active
        self.up = up
        up.start(r.head, self, r.method)
        if r.pending:
            body = b"".join(r.pending)
            r.pending = []
            up.send(b"%x\r\n%b\r\n" % (len(body), body) if r.chunked else body)
        if r.complete and r.chunked:
            up.send(b"0\r\n\r\n")
        if self.write_paused:
            up.pause_reading()

    # sink interface (called by Upstream)
    def up_head(self, status: int, reason: bytes, headers, up: Upstream):
        r = self.active
        out = [b"HTTP/1.1 %d %b\r\n" % (status, reason)]
        has_len = False
        for name, value in headers:
            lname = name.lower()
            if lname in HOP:
                continue
            if lname == b"content-length":
                has_len = True
            out += (name, b": ", value, b"\r\n")
        self.keep = r.keep_alive
        self.rechunk = False
        if not has_len and r.method != b"HEAD" and status not in NO_BODY_STATUS:
            if r.http11:
                self.rechunk = True  # upstream chunked or close-delimited: re-frame
                out.append(b"transfer-encoding: chunked\r\n")
            else:
                self.keep = False  # HTTP/1.0 client: delimit by close
        if not self.keep:
            out.append(b"connection: close\r\n")
        elif not r.http11:
            out.append(b"connection: keep-alive\r\n")
        out.append(b"\r\n")
        # Held back and sent with the first body piece: one send() instead of two per
        # small response (uvloop's write() tries the socket at once, each call a syscall).
        self.head = b"".join(out)

    def up_body(self, body: bytes):
        if self.rechunk:
            body = b"%x\r\n%b\r\n" % (len(body), body)
        if self.head is not None:
            body = self.head + body
            self.head = None
        self.transport.write(body)

    def up_done(self):
        tail = b"0\r\n\r\n" if self.rechunk else b""
        if self.head is not None:
            tail = self.head + tail
            self.head = None
        if tail:
            self.transport.write(tail)
        self.up = None
        self.active = None
        if not self.keep:
            self.transport.close()
            self.closed = True
        elif self.queue:
            self._start_next()

    def up_error(self, exc, retriable: bool):
        self.up = None
        r = self.active
        if (retriable and r is not None and not r.retried and r.complete
                and not r.has_body and r.method in IDEMPOTENT):
            # Stale keep-alive connection closed by the upstream under our feet.
            r.retried = True
            self.pool.acquire(self._attach)
            return
        self.active = None
        if r is not None and retriable:  # nothing sent downstream yet
            self._simple(502, b"upstream error")
        else:
            self.transport.abort()  # truncated response: cut the client off
            self.closed = True

    def pause_reading_downstream(self):
        if not self.closed:
            self.transport.pause_reading()

    def resume_reading_downstream(self):
        if not self.closed:
            self.transport.resume_reading()

    def _simple(self, status: int, msg: bytes):
        if self.closed:
            return
        self.transport.write(b"HTTP/1.1 %d %b\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%b"
                             % (status, msg, len(msg), msg))
        self.transport.close()
        self.closed = True


def parse_hostport(s: str) -> tuple[str, int]:
    host, _, port = s.rpartition(":")
    return host, int(port)


async def serve(host: str, port: int, upstream: str, limit: int) -> None:
    loop = asyncio.get_running_loop()
    uhost, uport = parse_hostport(upstream)
    pool = UpstreamPool(loop, uhost, uport, limit)
    uh = upstream.encode()
    server = await loop.create_server(lambda: Downstream(pool, uh), host, port,
                                      backlog=1024, reuse_address=True)
    print(f"proxy_raw listening on {host}:{port} -> {upstream}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=18090)
    ap.add_argument("--upstream", default="127.0.0.1:18081")
    ap.add_argument("--limit", type=int, default=64, help="max upstream connections")
    a = ap.parse_args()
    import uvloop
    uvloop.run(serve(a.host, a.port, a.upstream, a.limit))


if __name__ == "__main__":
    main()
