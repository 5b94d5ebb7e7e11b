"""Upstream connections: a keep-alive pool per endpoint, responses parsed with httptools.

A `UpstreamExchange` sends one request on a pooled connection and reports the response
through a `ResponseSink` (headers, body chunks, end, or an error). Connect failures and
timeouts are reported as errors with Envoy's details, so the caller can answer 503/504.

What the upstream sends is held to one message per request: interim 1xx responses (100
Continue, 103 Early Hints) are dropped, as Envoy drops them by default, and the final response
that follows is the answer; a 101, a transfer-coding other than `chunked` (Envoy's codec
refuses those too) or a head larger than `MAX_HEAD_BYTES` is a protocol error (502); bytes
arriving on an idle pooled connection (a body after a 204, an unsolicited response) close it,
so they can never be read as the answer to the next request.

Writes to upstreams made during one event-loop iteration leave together at its end (as the
downstream side's responses do): with many connections, the heads of every request parsed
from one epoll batch go out back to back, so the upstream is woken once per batch instead of
once per request. On loopback each wake-up of a sleeping reader costs ~7 us of the writer's
kernel time (bench/gateway.sh at 32 connections: +5% requests/s).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import ssl
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from time import perf_counter
from typing import Protocol

import httptools

from ..runtime.serde import Pairs

log = logging.getLogger("wasmgate.upstream")
MAX_HEAD_BYTES = 60 * 1024  # Envoy's max_response_headers_kb default
MAX_HEADERS = 100  # Envoy's max_response_headers_count default


class ResponseSink(Protocol):
    def on_response_headers(self, status: int, headers: Pairs, end_of_stream: bool) -> None: ...

    def on_response_body(self, data: bytes, end_of_stream: bool = False) -> None: ...

    def on_response_end(self, trailers: Pairs) -> None: ...

    def on_upstream_error(self, details: str, status: int) -> None: ...


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    tls: bool = False

    def __str__(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    @functools.cached_property
    def address(self) -> str:
        """`host:port`, as plugins read Envoy's `upstream.address`."""
        return f"{self.host}:{self.port}"


class UpstreamConnection(asyncio.Protocol):
    """One TCP connection to an endpoint; serves one exchange at a time."""

    def __init__(self, pool: EndpointPool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.sink: ResponseSink | None = None
        self.closed = False
        self._parser = httptools.HttpResponseParser(self)
        self._headers: Pairs = []
        self._head_request = False
        self._reusable = True
        self._writable = asyncio.Event()
        self._writable.set()

    # -- asyncio.Protocol --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._writes = _writes_of(asyncio.get_running_loop())

    def data_received(self, data: bytes) -> None:
        if self.sink is None:  # nothing was asked: never the answer to a later request
            self.close()
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(f"upstream_protocol_error{{{exc}}}", 502)
        except httptools.HttpParserUpgrade:
            self._fail("upstream_protocol_error{unexpected upgrade}", 502)
        else:
            if not self._headers_seen and self.sink is not None:
                self._head_bytes += len(data)  # (an upper bound: may count body of a 1xx)
                if self._head_bytes > MAX_HEAD_BYTES:
                    self._fail("upstream_protocol_error{headers too large}", 502)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        if self.sink is None:
            return
        if self._headers_seen and self._close_delimited and exc is None:
            sink, self.sink = self.sink, None  # no length, not chunked: the close ends it
            sink.on_response_end([])
            return
        details = ("upstream_reset_after_response_started{connection_termination}"
                   if self._headers_seen
                   else "upstream_reset_before_response_started{connection_termination}")
        self._fail(details, 503)

    # Flow control: a slow upstream pauses the client's reads, and the reverse (server.py).
    def pause_writing(self) -> None:
        self._writable.clear()
        if self.sink is not None and hasattr(self.sink, "upstream_paused"):
            self.sink.upstream_paused(True)

    def resume_writing(self) -> None:
        self._writable.set()
        if self.sink is not None and hasattr(self.sink, "upstream_paused"):
            self.sink.upstream_paused(False)

    reading_paused = False  # by `pause_reading` (a slow client)

    def pause_reading(self, paused: bool) -> None:
        if self.transport is not None and not self.closed:
            self.reading_paused = paused
            if paused:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    # -- httptools callbacks -------------------------------------------------------------------
    _headers_seen = False
    _interim = False  # the message being parsed is a 1xx
    _spoiled = False  # see `spoil`
    _head_bytes = 0

    def on_message_begin(self) -> None:
        self._headers = []
        self._headers_seen = False
        if self.sink is None:  # a second message for one request (after a 204's "body"...)
            self.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))  # (after the head: trailers)

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200 or len(self._headers) > MAX_HEADERS:
            if status == 101 or status >= 200:
                self._fail("upstream_protocol_error{"
                           + ("unexpected upgrade" if status == 101 else "too many headers")
                           + "}", 502)
                return
            self._interim = True  # 100 Continue, 102, 103 Early Hints: the answer follows
            return
        self._headers_seen = True
        self._reusable = self._parser.should_keep_alive()
        no_body = self._head_request or status in (204, 304) or 100 <= status < 200
        if self._head_request:  # nothing follows the headers: end the message here
            self._reusable = False
        length = None
        chunked = False
        for key, value in self._headers:  # (one pass; no generator frames)
            if key == b"content-length":
                if length is None:
                    length = value
            elif key == b"transfer-encoding":
                if chunked or value.strip().lower() != b"chunked":
                    self._fail("upstream_protocol_error{unsupported transfer encoding}", 502)
                    return
                chunked = True
        self._remaining = int(length) if length is not None and length.isdigit() else None
        self._close_delimited = length is None and not chunked
        if length == b"0":
            no_body = True
        if self.sink is not None:
            self.sink.on_response_headers(status, self._headers, no_body)
        self._headers = []  # what on_header sees from now on are trailers
        if self._head_request:  # the parser would wait for the announced body: done here
            sink, self.sink = self.sink, None
            if sink is not None:
                sink.on_response_end([])
            self.close()

    _remaining: int | None = None
    _close_delimited = False

    def on_body(self, body: bytes) -> None:
        """With a known length the last chunk carries end_of_stream."""
        eos = False
        if self._remaining is not None:
            self._remaining -= len(body)
            eos = self._remaining <= 0
        if self.sink is not None:
            self.sink.on_response_body(body, eos)

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        sink, self.sink = self.sink, None
        if sink is not None:
            sink.on_response_end(self._headers)
        if self._reusable and not self._spoiled and not self.closed and not self._head_request:
            self.pool.release(self)
        else:
            self.close()

    # -- use -----------------------------------------------------------------------------------
    def start(self, sink: ResponseSink, head: bytes, head_request: bool) -> None:
        """Send a request. The parser carries over between keep-alive responses; a HEAD
        response (headers announcing a body that never comes) ends the connection's reuse."""
        self.sink = sink
        self._head_request = head_request
        self._headers_seen = self._close_delimited = False  # nothing of this response yet
        self._head_bytes = 0
        self._spoiled = False
        if head_request:
            self._parser = httptools.HttpResponseParser(self)
        assert self.transport is not None
        self.write(head)

    _out: list[bytes] | None = None  # written this loop iteration, not yet sent

    def write(self, data: bytes) -> None:
        """Send at the end of this loop iteration (module docstring), in order."""
        if data and self.transport is not None and not self.closed:
            out = self._out
            if out is not None:  # (deferred already: keep the order)
                out.append(data)
                return
            writes = self._writes
            if writes.deferring:
                self._out = [data]
                writes.defer(self)
            else:
                writes.direct()
                self.transport.write(data)

    def _flush(self) -> None:
        out, self._out = self._out, None
        if out and self.transport is not None and not self.closed:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def spoil(self) -> None:
        """This connection carried a request that was not sent whole (or not as framed):
        close it once its response is done instead of pooling it."""
        self._spoiled = True

    def abandon(self) -> None:
        """The downstream went away mid-exchange: this connection cannot be reused."""
        self.sink = None
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()

    def _fail(self, details: str, status: int) -> None:
        sink, self.sink = self.sink, None
        self.close()
        if sink is not None:
            sink.on_upstream_error(details, status)


class _LoopWrites:
    """The upstream writes of one event loop, sent together at the end of the loop iteration
    while many connections write in one iteration (load from many clients), at once
    otherwise.

    Deferring costs a callback per iteration (~1.5 us) and pays only when it groups several
    writes, so the mode adapts: after `DIRECT_AFTER` iterations in a row that deferred fewer
    than `WORTH` connections' writes, writes go out at once; then every `PROBE_EVERY`-th
    write opens a one-iteration probe, and `WORTH` writes in it defer again. A group leaves
    early once its first write has waited `MAX_WAIT` seconds: with plugins, each request's
    work is ~50-100 us, and a whole iteration's worth of waiting would lengthen the tail.
    """

    DIRECT_AFTER = 16
    PROBE_EVERY = 64
    WORTH = 3
    MAX_WAIT = 300e-6

    __slots__ = ("deferring", "first_at", "grouped", "loop", "pending", "probe", "small",
                 "until_probe")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = weakref.ref(loop)  # (a strong one would keep its _LOOP_WRITES key alive)
        self.pending: list[UpstreamConnection] = []
        self.first_at = 0.0  # when the first of `pending` was deferred
        self.grouped = 0  # connections sent in early groups this iteration
        self.deferring = True
        self.small = 0  # iterations in a row that deferred fewer than WORTH connections
        self.until_probe = self.PROBE_EVERY
        self.probe = -1  # writes seen in the open probe (-1: none open)

    def defer(self, connection: UpstreamConnection) -> None:
        """`connection` has output waiting (`_out`): send it with its group."""
        pending = self.pending
        pending.append(connection)
        if len(pending) == 1:
            self.first_at = perf_counter()
            if not self.grouped:
                self._call_soon(self.flush)
        elif perf_counter() - self.first_at > self.MAX_WAIT:
            self.pending = []
            self.grouped += len(pending)
            for waiting in pending:
                waiting._flush()

    def direct(self) -> None:
        """A write about to go out at once: watch for many writers per iteration."""
        if self.probe >= 0:
            self.probe += 1
            if self.probe >= self.WORTH:  # many writers in one iteration: group them again
                self.deferring, self.small = True, 0
        else:
            self.until_probe -= 1
            if self.until_probe <= 0:
                self.until_probe = self.PROBE_EVERY
                self.probe = 1
                self._call_soon(self._end_probe)

    def _call_soon(self, callback: Callable[[], None]) -> None:
        loop = self.loop()
        if loop is not None:
            loop.call_soon(callback)

    def _end_probe(self) -> None:
        self.probe = -1

    def flush(self) -> None:
        """The end of the iteration: what is waiting goes out."""
        pending, self.pending = self.pending, []
        writers = len(pending) + self.grouped
        self.grouped = 0
        if writers < self.WORTH:
            self.small += 1
            if self.small >= self.DIRECT_AFTER:
                self.deferring = False
        else:
            self.small = 0
        for connection in pending:
            connection._flush()


_LOOP_WRITES: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopWrites] = (
    weakref.WeakKeyDictionary())


def _writes_of(loop: asyncio.AbstractEventLoop) -> _LoopWrites:
    writes = _LOOP_WRITES.get(loop)
    if writes is None:
        writes = _LOOP_WRITES[loop] = _LoopWrites(loop)
    return writes


class EndpointPool:
    """Idle keep-alive connections to one endpoint."""

    def __init__(self, endpoint: Endpoint, max_idle: int = 64) -> None:
        self.endpoint = endpoint
        self.max_idle = max_idle
        self.idle: deque[UpstreamConnection] = deque()
        self.active = 0

    def take_idle(self) -> UpstreamConnection | None:
        while self.idle:
            connection = self.idle.pop()
            if not connection.closed:
                return connection
        return None

    async def acquire(self, connect_timeout: float) -> UpstreamConnection:
        connection = self.take_idle()
        if connection is not None:
            return connection
        return await self.connect(connect_timeout)

    async def connect(self, connect_timeout: float) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        endpoint = self.endpoint
        tls = _client_tls() if endpoint.tls else None
        _, protocol = await asyncio.wait_for(
            loop.create_connection(lambda: UpstreamConnection(self), endpoint.host,
                                   endpoint.port, ssl=tls,
                                   server_hostname=endpoint.host if tls else None),
            connect_timeout)
        return protocol

    def release(self, connection: UpstreamConnection) -> None:
        if connection.reading_paused:  # a connection paused for a slow client reads again
            connection.pause_reading(False)
        if len(self.idle) < self.max_idle:
            self.idle.append(connection)
        else:
            connection.close()

    def forget(self, connection: UpstreamConnection) -> None:
        if connection in self.idle:
            self.idle.remove(connection)

    def close(self) -> None:
        while self.idle:
            self.idle.pop().close()


_TLS: ssl.SSLContext | None = None


def _client_tls() -> ssl.SSLContext:
    """One verifying client context (system CAs, plus $WASMGATE_CA_FILE when set)."""
    global _TLS
    if _TLS is None:
        _TLS = ssl.create_default_context(cafile=os.environ.get("WASMGATE_CA_FILE") or None)
    return _TLS


class UpstreamPools:
    """Endpoint -> pool, shared by every exchange of a gateway process."""

    def __init__(self) -> None:
        self._pools: dict[Endpoint, EndpointPool] = {}

    def pool(self, endpoint: Endpoint) -> EndpointPool:
        pool = self._pools.get(endpoint)
        if pool is None:
            pool = self._pools[endpoint] = EndpointPool(endpoint)
        return pool

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()

    def idle_connections(self) -> int:
        return sum(len(p.idle) for p in self._pools.values())


class BufferedResponse:
    """A ResponseSink that collects a whole response (for plugin http_calls)."""

    def __init__(self, done: Callable[[BufferedResponse], None]) -> None:
        self.status = 0
        self.headers: Pairs = []
        self.body = bytearray()
        self.trailers: Pairs = []
        self.error: str | None = None
        self._done = done

    def on_response_headers(self, status: int, headers: Pairs, end_of_stream: bool) -> None:
        self.status, self.headers = status, headers

    def on_response_body(self, data: bytes, end_of_stream: bool = False) -> None:
        self.body += data

    def on_response_end(self, trailers: Pairs) -> None:
        self.trailers = trailers
        self._done(self)

    def on_upstream_error(self, details: str, status: int) -> None:
        self.error = details
        self._done(self)
