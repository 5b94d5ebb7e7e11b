"""The downstream HTTP/1.1 server: one asyncio Protocol per connection, one Exchange per request.

Hand-written on httptools + uvloop because the stack benchmark (bench/stack/README.md) showed
it at several times aiohttp's requests/s, and the proxy needs per-event control anyway: each
parser event feeds the filter chain, each chain action becomes a write, with no ASGI layer in
between. Pipelined requests are answered in order (a later exchange's output waits).

HTTP/1.1 conformance, Envoy's defaults unless said otherwise (tests/e2e/test_http_conformance.py):

- httptools (llhttp, strict) refuses with 400: Content-Length together with Transfer-Encoding,
  two Content-Lengths (even equal ones), a list or sign in Content-Length, bad chunk sizes or
  chunk lines, obs-fold, a header line without a colon, whitespace before the colon, CR/LF/NUL
  or other controls in a field, bad request lines. A Transfer-Encoding other than exactly
  `chunked` gets 501, as at Envoy. A parse error is answered in order: earlier pipelined
  requests finish first, the request being read is abandoned (its upstream reset), then the
  error is written and the connection closes.
- Only HTTP/1.0 and 1.1 are served (505 otherwise; Envoy refuses 1.0 by default, we serve it
  and answer `connection: keep-alive` when the client asked for it). An HTTP/1.1 request
  without Host, or with two, is a 400 (RFC 9112 3.2). An absolute-form target
  (`GET http://host/path`) becomes `:authority` host and `:path` /path, its host winning
  over Host (RFC 9112 3.2.2, Envoy too), so plugins and the upstream see the same request.
  CONNECT and Upgrade requests get 501 and are never forwarded.
- A request after one that closes the connection (`Connection: close`, HTTP/1.0 without
  keep-alive) is neither answered nor forwarded. `Expect: 100-continue` is answered by the
  gateway (in order) and removed, as Envoy does by default.
- Request heads are limited to `MAX_REQUEST_HEAD_BYTES` (60 KiB) and `MAX_REQUEST_HEADERS`
  (100), Envoy's defaults: 431 and close. A request head that does not complete within the
  Gateway's `requestHeadersTimeoutMs` (300 s, Envoy's stream idle timeout), or a request
  body that stops arriving for that long, gets 408 and close; a connection idle for
  `idleTimeoutMs` (1 h, Envoy's) is closed. One sweep per second (per event loop; more
  often for timeouts under 4 s) checks both.
- Heads are validated where they are serialized (see http1.py): a request head a plugin left
  malformed gets Envoy's 503, a malformed response head a 502. A 204, 304 or HEAD response
  never carries body bytes; a body that disagrees with its content-length never overflows it
  and the connection is closed (downstream) or not reused (upstream). An upstream connection
  whose response ends before its request was sent whole is not reused.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from random import getrandbits
from typing import TYPE_CHECKING

import httptools

from ..chain import (
    ChainAction,
    ChainStream,
    ForwardBody,
    ForwardHeaders,
    ForwardTrailers,
    Reset,
    SendBody,
    SendHeaders,
    SendTrailers,
    StreamState,
)
from ..runtime.serde import Pairs
from .access_log import AccessLog, AccessRecord
from .http1 import (
    HOP_BY_HOP,
    Framing,
    InvalidHead,
    head_is_clean,
    head_problem,
    header_value,
    is_target,
    is_token,
    names_are_tokens,
    response_head,
    response_headers_out,
    simple_response,
)
from .upstream import Endpoint, EndpointPool, UpstreamConnection, UpstreamPools

if TYPE_CHECKING:
    from .proxy import ProxyState

log = logging.getLogger("wasmgate.gateway")


def _attributes(conn: DownstreamProtocol, route: RouteTarget | None, version: str,
                request_time: int) -> dict[str, object]:
    """The Envoy attributes of a stream (what plugins read as source.address, ...)."""
    return {"source.address": f"{conn.peer[0]}:{conn.peer[1]}", "source.port": conn.peer[1],
            "destination.address": f"{conn.local[0]}:{conn.local[1]}",
            "destination.port": conn.local[1], "connection.id": conn.connection_id,
            "request.protocol": f"HTTP/{version}",
            "request.time": request_time,
            "xds.route_name": route.route_name if route else "",
            "xds.cluster_name": route.cluster_name if route else ""}


_UUID_MASK = ~(0xF000 << 64) & ~(0xC000 << 48)
_UUID_BITS = (0x4000 << 64) | (0x8000 << 48)  # version 4, variant 10


def _request_id() -> bytes:
    """A version-4 UUID from the fast PRNG (ids need uniqueness, not secrecy)."""
    h = b"%032x" % (getrandbits(128) & _UUID_MASK | _UUID_BITS)
    return b"-".join((h[:8], h[8:12], h[12:16], h[16:20], h[20:]))
_TIMER_SLACK = 0.001
_HEAD_SPECIAL = HOP_BY_HOP | {b"content-length"}
_REQUEST_SPECIAL = frozenset({b"host", b"x-forwarded-for", b"content-length",
                              b"transfer-encoding", b"x-request-id", b"connection", b"expect"})
MAX_REQUEST_HEAD_BYTES = 60 * 1024  # Envoy's max_request_headers_kb default
MAX_REQUEST_HEADERS = 100  # Envoy's max_headers_count default
REQUEST_HEAD_TIMEOUT = 300.0  # seconds; the Gateway's requestHeadersTimeoutMs by default
IDLE_TIMEOUT = 3600.0  # seconds; its idleTimeoutMs


class _Refused(Exception):
    """A request the gateway answers itself (and closes), before any plugin sees it."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(status, body)
        self.status, self.body = status, body


def _origin_form(method: bytes, target: bytes) -> tuple[bytes, bytes | None]:
    """(path, authority) of a request-target that is not origin-form: an absolute-form
    target's host is the authority (RFC 9112 3.2.2); OPTIONS * stays; anything else (an
    authority-form target without CONNECT, garbage) is refused."""
    if target == b"*" and method == b"OPTIONS":
        return target, None
    scheme = target[:8].lower()
    if scheme.startswith(b"http://"):
        rest = target[7:]
    elif scheme.startswith(b"https://"):
        rest = target[8:]
    else:
        raise _Refused(400, b"invalid request target\n")
    end = len(rest)
    for separator in (b"/", b"?"):
        index = rest.find(separator)
        if 0 <= index < end:
            end = index
    authority, path = rest[:end], rest[end:]
    if not authority or b"@" in authority:
        raise _Refused(400, b"invalid request target\n")
    return (path if path[:1] == b"/" else b"/" + path), authority


class _Sweeper:
    """The request-head and idle timeouts of every downstream connection of an event loop,
    with one timer: each `period` s `now` takes the loop's time; a connection notes the `now`
    at which its head (or its idleness) began, a float store rather than a clock read per
    request. The period is 1 s, or a quarter of the shortest timeout configured."""

    def __init__(self) -> None:
        self.now = 0.0
        self.loop: asyncio.AbstractEventLoop | None = None
        self.connections: weakref.WeakSet[DownstreamProtocol] = weakref.WeakSet()
        self.period = 1.0

    def add(self, connection: DownstreamProtocol, head_timeout: float,
            idle_timeout: float) -> None:
        self.connections.add(connection)
        self.period = max(0.05, min(self.period, head_timeout / 4, idle_timeout / 4))
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # (a protocol driven by hand, with no loop)
            return
        if self.loop is not loop:
            self.loop = loop
            self.now = loop.time()
            loop.call_later(self.period, self._sweep, loop)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.loop is not loop:
            return
        if not self.connections:
            self.loop = None  # the next connection starts the timer again
            return
        self.now = now = loop.time()
        for connection in list(self.connections):
            connection.check_timeouts(now)
        loop.call_later(self.period, self._sweep, loop)


_SWEEPER = _Sweeper()


@dataclass
class RouteTarget:
    """Where a request goes: what plugins see as route_name/cluster_name, and the endpoints."""

    route_name: str
    cluster_name: str
    endpoints: list[Endpoint]
    timeout: float = 15.0
    connect_timeout: float = 5.0
    _next: int = field(default=0, repr=False)
    # the pools of `endpoints`, looked up once per UpstreamPools (not hashed per request)
    _pools_of: UpstreamPools | None = field(default=None, repr=False, compare=False)
    _pools: list[EndpointPool] = field(default_factory=list, repr=False, compare=False)

    def pick(self, pools: UpstreamPools) -> tuple[Endpoint, EndpointPool]:
        """The next endpoint (round robin) and its pool of keep-alive connections."""
        endpoints = self.endpoints
        index = self._next % len(endpoints)
        self._next += 1
        if self._pools_of is not pools or len(self._pools) != len(endpoints):
            self._pools = [pools.pool(endpoint) for endpoint in endpoints]
            self._pools_of = pools
        return endpoints[index], self._pools[index]


class DownstreamProtocol(asyncio.Protocol):
    """One client connection."""

    def __init__(self, state_getter: Callable[[], ProxyState], connection_id: int,
                 on_close: Callable[[DownstreamProtocol], None]) -> None:
        self._state_getter = state_getter
        self.connection_id = connection_id
        self._on_close = on_close
        self.transport: asyncio.Transport | None = None
        self.peer = ("", 0)
        self.local = ("", 0)
        self.parser = httptools.HttpRequestParser(self)
        self.exchanges: deque[Exchange] = deque()
        self.closing = False
        self._url = b""
        self._headers: Pairs = []
        self._current: Exchange | None = None
        self._out: list[bytes] = []
        self._flush_pending = False
        # Upstream response deadlines: one timer per connection, at the earliest deadline of
        # its exchanges (not one TimerHandle per request); see `arm_deadline`.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        # Conformance state (see the module docstring).
        self._discard = False  # nothing more is read: after a closing request, or an error
        self._last = False  # the request being read closes the connection
        self._final: bytes | None = None  # an error answer waiting for earlier exchanges
        self._in_head = False  # a request head has begun and is not complete
        self._head_bytes = 0  # bytes of the reads that ended inside that head
        self._read_size = 0
        self._boundary = False  # a message ended in this read
        self._since = 0.0  # the sweep's `now` when the head, or idleness, began

    # -- asyncio.Protocol --------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername") or ("", 0)
        local = transport.get_extra_info("sockname") or ("", 0)
        self.peer, self.local = (peer[0], peer[1]), (local[0], local[1])
        self._since = _SWEEPER.now
        state = self._state_getter()
        _SWEEPER.add(self, state.head_timeout, state.idle_timeout)

    def data_received(self, data: bytes) -> None:
        if self._discard:  # after a request that closes the connection, or an error
            return
        if self._current is not None:  # a request body is arriving: the stream is active
            self._since = _SWEEPER.now
        self._read_size = len(data)
        self._boundary = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # CONNECT or Upgrade: on_headers_complete refused it already
        except httptools.HttpParserError as exc:
            if not self._discard:  # (llhttp also refuses data after `Connection: close`)
                self._error(400, f"malformed request: {exc}\n".encode())
            return
        if self._in_head and not self._discard:  # the read ended inside a request head
            if self._boundary:  # it began after a message that ended in this read: an
                self._boundary = False  # unknown share of the read; not counted
            else:
                self._head_bytes += len(data)
                if self._head_bytes > MAX_REQUEST_HEAD_BYTES:
                    self._error(431, b"request header fields too large\n")

    held = False  # reading paused because the upstream is slower than the client

    def refresh(self) -> None:
        """Activity now: the timeouts count from here."""
        self._since = _SWEEPER.now

    def check_timeouts(self, now: float) -> None:
        """The sweep: a head begun longer ago than the request headers timeout gets 408;
        idleness longer than the idle timeout, a close."""
        if self.closing or self._discard:
            return
        if self.held:  # the gateway itself stopped reading (a slow upstream): not the client
            return
        state = self._state_getter()
        if self._in_head or self._current is not None:  # a request head or body arriving
            if now - self._since > state.head_timeout:
                log.debug("connection %d: request timeout", self.connection_id)
                self._error(408, b"request timeout\n")
        elif not self.exchanges and now - self._since > state.idle_timeout:
            log.debug("connection %d: idle timeout", self.connection_id)
            self.close()

    def pause_writing(self) -> None:
        """The client reads slower than the upstream sends: stop reading the upstream."""
        if self.exchanges:
            self.exchanges[0].client_paused(True)

    def resume_writing(self) -> None:
        if self.exchanges:
            self.exchanges[0].client_paused(False)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for exchange in list(self.exchanges):
            exchange.abort("downstream_remote_disconnect")
        self.exchanges.clear()
        _SWEEPER.connections.discard(self)
        self._on_close(self)

    # -- httptools callbacks -----------------------------------------------------------------
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._in_head = True
        self._head_bytes = 0
        self._since = _SWEEPER.now

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._discard:
            return
        parser = self.parser
        headers = self._headers
        if len(headers) > MAX_REQUEST_HEADERS or (
                (self._head_bytes or self._read_size > MAX_REQUEST_HEAD_BYTES)
                and len(self._url) + sum(len(k) + len(v) for k, v in headers)
                > MAX_REQUEST_HEAD_BYTES):
            self._error(431, b"request header fields too large\n")
            return
        version = parser.get_http_version()
        if version != "1.1" and version != "1.0":
            self._error(505, b"http version not supported\n")
            return
        if parser.should_upgrade():  # CONNECT, Upgrade: never forwarded
            self._error(501, b"upgrades are not supported\n")
            return
        keep_alive = parser.should_keep_alive()
        try:
            exchange = Exchange(self, self._state_getter(), parser.get_method(), self._url,
                                headers, version, keep_alive)
        except _Refused as refused:
            self._error(refused.status, refused.body)
            return
        self._last = not keep_alive
        self._current = exchange
        self.exchanges.append(exchange)
        if exchange.expects_continue:  # answered here and removed, as Envoy does
            self.write(exchange, b"HTTP/1.1 100 Continue\r\n\r\n")
        exchange.start()

    def on_body(self, body: bytes) -> None:
        if self._current is not None:
            self._current.request_body(body)

    def on_message_complete(self) -> None:
        self._boundary = True
        if self._last:  # nothing after a request that closes the connection is read
            self._discard = True
        exchange, self._current = self._current, None
        if exchange is not None:
            exchange.request_end()

    # -- output ordering ---------------------------------------------------------------------
    def write(self, exchange: Exchange, data: bytes) -> None:
        """Queue output; it goes out in one send at the end of this loop iteration (a
        response's head and body, written by separate parser callbacks, share a syscall)."""
        if not data or self.transport is None or self.closing:
            return
        if self.exchanges and self.exchanges[0] is exchange:
            self._out.append(data)
            if not self._flush_pending:
                self._flush_pending = True
                loop = self._loop
                if loop is None:
                    loop = self._loop = asyncio.get_running_loop()
                loop.call_soon(self._flush)
        else:
            exchange.pending_output.append(data)

    def _flush(self) -> None:
        self._flush_pending = False
        if self._out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(self._out) if len(self._out) > 1 else self._out[0])
        self._out.clear()

    def finished(self, exchange: Exchange) -> None:
        """The exchange wrote its whole response: let the next pipelined one write."""
        if self.exchanges and self.exchanges[0] is exchange:
            self.exchanges.popleft()
            if not exchange.keep_alive:
                self.close()
                return
            while self.exchanges and self.transport is not None:
                head = self.exchanges[0]
                for chunk in head.pending_output:
                    self.write(head, chunk)
                head.pending_output.clear()
                if not head.response_done:
                    break
                self.exchanges.popleft()
                if not head.keep_alive:
                    self.close()
                    return
            if not self.exchanges:
                if self._final is not None:
                    self._write_final()
                    return
                self._since = _SWEEPER.now  # idle from now

    # -- upstream response deadlines -----------------------------------------------------------
    def arm_deadline(self, exchange: Exchange, timeout: float) -> None:
        """`exchange` times out `timeout` s from now unless its response headers come first
        (it clears `exchange.deadline`). The connection's one timer fires at the earliest
        pending deadline; an exchange whose deadline is later waits for a re-arm then."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        due = exchange.deadline = loop.time() + timeout
        timer = self._timer
        if timer is None:
            self._timer_at = due
            self._timer = loop.call_at(due, self._deadlines_due)
        elif due < self._timer_at:  # a shorter route timeout than the pending one
            timer.cancel()
            self._timer_at = due
            self._timer = loop.call_at(due, self._deadlines_due)

    def _deadlines_due(self) -> None:
        self._timer = None
        loop = self._loop
        assert loop is not None
        # the event loop's timers are as coarse as its clock (uvloop: 1 ms)
        now = loop.time() + _TIMER_SLACK
        nearest = 0.0
        for exchange in tuple(self.exchanges):  # a timeout may finish exchanges
            due = exchange.deadline
            if due:
                if due <= now:
                    exchange._on_timeout()
                elif not nearest or due < nearest:
                    nearest = due
        if nearest and not self.closing and self._timer is None:
            self._timer_at = nearest
            self._timer = loop.call_at(nearest, self._deadlines_due)

    def close(self) -> None:
        self._flush()
        self.closing = True
        if self.transport is not None:
            self.transport.close()

    def _error(self, status: int, body: bytes) -> None:
        """Answer what the parser or a limit refused, in order, and close: earlier pipelined
        exchanges finish first; the request whose body was being read is abandoned (its
        upstream reset); nothing more is read."""
        self._discard = True
        self._in_head = False
        if self.transport is not None and not self.closing:
            self.transport.pause_reading()
        current, self._current = self._current, None
        if current is not None:
            current.abort("downstream_protocol_error")
            if current._response_started or current not in self.exchanges:
                self.close()  # it has (part of) an answer already: no second one
                return
            self.exchanges.remove(current)
        self._final = simple_response(status, body, keep_alive=False)
        if not self.exchanges:
            self._write_final()

    def _write_final(self) -> None:
        final, self._final = self._final, None
        if final is not None and self.transport is not None and not self.closing:
            self._out.append(final)
        self.close()

    @property
    def idle(self) -> bool:
        return not self.exchanges


class Exchange:
    """One request: downstream events -> filter chain -> upstream, and back."""

    def __init__(self, connection: DownstreamProtocol, state: ProxyState, method: bytes,
                 target: bytes, headers: Pairs, version: str, keep_alive: bool) -> None:
        self.connection = connection
        self.state = state
        self.started_at = time.monotonic()
        self.method = method
        self.version = version
        self.keep_alive = keep_alive
        self.pending_output: list[bytes] = []
        self.response_done = False
        self.status = 0
        self.details = ""
        self.bytes_sent = 0
        self._upstream: UpstreamConnection | None = None
        self._upstream_queue: list[bytes] | None = []
        self._request_framing: Framing | None = None
        self._response_framing: Framing | None = None
        self._response_started = False
        self.deadline = 0.0  # when the upstream response times out (0: no deadline armed)
        self._finished = False
        self._body_ended = False
        self.headers, length, chunked = self._request_pairs(target, headers)
        self._expects_body = (length is not None and length.strip() not in (b"", b"0")) or (
            length is None and chunked)
        # With a known length the last chunk carries end_of_stream itself (as Envoy's codec
        # does), saving the plugins an empty final body callback.
        self._remaining = int(length) if length is not None and length.isdigit() else None
        self.route = state.router.route(self.headers)
        self.stream: ChainStream | None = None
        if state.chain is not None and state.chain.slots:
            # Attributes as of now, built only if a plugin reads one.
            self.stream = state.chain.stream(partial(_attributes, connection, self.route,
                                                     version, time.time_ns()))
            self.stream.on_wakeup = self._wakeup
        if state.access_log is not None:
            state.access_log.writer.in_flight += 1

    # -- request side ------------------------------------------------------------------------
    _plain = True
    expects_continue = False

    def _request_pairs(self, target: bytes, headers: Pairs) -> tuple[Pairs, bytes | None, bool]:
        """What plugins see: pseudo-headers, the headers, x-forwarded-for with the client
        appended, an x-request-id when there is none. One pass; also returns the framing.
        Raises `_Refused` for what is not forwarded (module docstring)."""
        host = authority = forwarded = length = None
        chunked = has_id = False
        if target[:1] != b"/":
            target, authority = _origin_form(self.method, target)
        pairs: Pairs = [(b":method", self.method), (b":path", target), (b"", b""),
                        (b":scheme", b"http")]
        append = pairs.append
        for pair in headers:
            key = pair[0]
            if key not in _REQUEST_SPECIAL:  # (most headers: one set lookup)
                append(pair)
                continue
            value = pair[1]
            if key == b"host":
                if host is not None:
                    raise _Refused(400, b"multiple host headers\n")
                host = value
                continue
            if key == b"x-forwarded-for":  # several lines are one list (RFC 9110 5.3)
                forwarded = value if forwarded is None else forwarded + b", " + value
                continue
            if key == b"content-length":
                length = value
            elif key == b"transfer-encoding":
                if value.strip().lower() != b"chunked":  # (Envoy's codec: 501 too)
                    raise _Refused(501, b"unsupported transfer encoding\n")
                chunked = True
            elif key == b"x-request-id":
                has_id = True
            elif key == b"connection":
                if value.lower() not in (b"keep-alive", b"close"):
                    self._plain = False  # it names more hop-by-hop headers: the general path
            elif value.lower() == b"100-continue":  # (expect)
                self.expects_continue = self.version == "1.1"  # (1.0: MUST be ignored)
                continue
            append(pair)
        if host is None and authority is None and self.version == "1.1":
            raise _Refused(400, b"missing host header\n")
        pairs[2] = (b":authority", authority or host or b"")
        client = self.connection.peer[0].encode()
        pairs.append((b"x-forwarded-for", forwarded + b", " + client if forwarded else client))
        if not has_id:
            pairs.append((b"x-request-id", _request_id()))
        return pairs, length, chunked

    def _attributes(self) -> dict[str, object]:
        return _attributes(self.connection, self.route, self.version, time.time_ns())

    def start(self) -> None:
        eos = not self._expects_body
        self.state.stats.requests += 1
        if self.stream is None:  # no plugins: straight to the upstream, no action objects
            self._forward_headers(self.headers, eos)
            return
        self.stream.request_headers(self.headers, eos, normalized=True)
        self._drain()

    def request_body(self, data: bytes) -> None:
        self.bytes_received += len(data)
        eos = False
        if self._remaining is not None:
            self._remaining -= len(data)
            eos = self._remaining <= 0
        self._body_ended = eos
        if self.stream is None:
            self._dispatch([ForwardBody(data, eos)])
            return
        self.stream.request_body(data, eos)
        self._drain()

    def request_end(self) -> None:
        if not self._expects_body or self._body_ended:
            return
        self._body_ended = True
        if self.stream is None:
            self._dispatch([ForwardBody(b"", True)])
            return
        self.stream.request_body(b"", True)
        self._drain()

    # -- chain actions -----------------------------------------------------------------------
    def _wakeup(self, _stream: ChainStream) -> None:
        self._drain()

    def _drain(self) -> None:
        if self.stream is not None:
            actions = self.stream.take_actions()
            if actions:
                self._dispatch(actions)

    def _dispatch(self, actions: list[ChainAction]) -> None:
        for action in actions:  # (the most frequent kinds first)
            if isinstance(action, ForwardHeaders):
                self._forward_headers(action.headers, action.end_of_stream)
            elif isinstance(action, SendHeaders):
                self._send_headers(action.headers, action.end_of_stream, action.details)
            elif isinstance(action, SendBody):
                self._send_body(action.data, action.end_of_stream)
            elif isinstance(action, ForwardBody):
                self._to_upstream(self._framing_encode(action.data, action.end_of_stream))
                if action.end_of_stream:
                    self._request_sent()
            elif isinstance(action, ForwardTrailers):
                self._to_upstream(self._framing_encode(b"", True, action.trailers))
                self._request_sent()
            elif isinstance(action, SendTrailers):
                self._send_body(b"", True, action.trailers)
            elif isinstance(action, Reset):
                self.details = action.details
                self.abort(action.details)
                self.connection.close()

    def _framing_encode(self, data: bytes, eos: bool, trailers: Pairs | None = None) -> bytes:
        framing = self._request_framing
        return framing.encode(data, eos, trailers) if framing else data

    _sent_whole = False  # the request's end went upstream, framed as announced
    _no_upstream = False  # the request will not go upstream after all

    def _request_sent(self) -> None:
        """The request's end went to the upstream (queued or written)."""
        framing = self._request_framing
        if framing is not None and framing.mismatch:
            log.warning("request body does not match its content-length%s",
                        " (short)" if framing.remaining else " (excess dropped)")
            if framing.remaining:  # short: the upstream would wait for the rest forever
                self._no_upstream = True
                if self._upstream is not None:
                    self._upstream.abandon()
                    self._upstream = None
                self.on_upstream_error(
                    "upstream_reset_before_response_started{request_length_mismatch}", 503)
                return
        else:
            self._sent_whole = True
        self._arm_timeout()

    def _forward_headers(self, headers: Pairs, eos: bool) -> None:
        # Plugins may have changed what routing looks at: route again (Envoy clears the
        # route cache when filters edit headers); without plugins the first answer stands.
        route = (self.state.router.route(headers) if self.stream is not None else None) or (
            self.route)
        if route is None:
            self._router_reply(404, b"no route\n", "route_not_found")
            return
        self.route = route
        self._forwarded_headers = headers
        try:
            if self.stream is None and self._plain:
                method, head = self.method, self._plain_head(headers, eos)
            else:
                method, head = self._head(headers, eos)
        except InvalidHead as exc:  # Envoy's router: 503, nothing goes upstream
            message = str(exc)
            log.warning("not forwarding a malformed request head (%s)", message)
            self._router_reply(503, message.encode(), "filter_removed_required_request_headers{"
                               + message.replace(" ", "_") + "}")
            return
        self._request_head = head if eos and method in (b"GET", b"HEAD", b"OPTIONS") else None
        self._upstream_queue = [head]
        pool = self._pick(route)
        idle = pool.take_idle()
        if idle is not None:  # the common case: no task, no await
            self._attach(idle, method == b"HEAD")
        else:
            asyncio.get_running_loop().create_task(
                self._connect(route, pool, method == b"HEAD"))
        if eos:
            self._sent_whole = True
            self._arm_timeout()

    def _pick(self, route: RouteTarget) -> EndpointPool:
        """The pool of the route's next endpoint; plugins then read it as Envoy's
        `upstream.address` / `upstream.port` (e.g. gpustack-token-usage tells upstream traffic
        from local replies by it)."""
        endpoint, pool = route.pick(self.state.pools)
        self._endpoint = endpoint
        if self.stream is not None:
            address = endpoint.address
            for f in self.stream.filters:
                if f.context is not None:
                    f.context.state.add_attribute("upstream.address", address)
                    f.context.state.add_attribute("upstream.port", endpoint.port)
        return pool

    def _head(self, headers: Pairs, eos: bool) -> tuple[bytes, bytes]:
        """Method and upstream head from the headers plugins left: the pseudo-headers give
        the request line and host; hop-by-hop headers (and those `Connection` names) go;
        a valid content-length keeps the framing (one content-length line: the first), else
        chunked when a body follows. One pass over the headers (the same result as
        `strip_hop_by_hop` + `choose_framing`). Raises `InvalidHead` for what must not be
        serialized (http1.py)."""
        method = path = authority = connection = length = None
        out: Pairs = []
        append = out.append
        for pair in headers:  # (the pair itself is kept: no new tuple per header)
            key = pair[0]
            if key in _HEAD_SPECIAL:  # hop-by-hop or content-length
                if key == b"content-length":
                    if length is None:
                        length = pair[1]
                        append(pair)
                elif key == b"connection" and connection is None:
                    connection = pair[1]
            elif key[:1] == b":":
                if key == b":method":
                    if method is None:
                        method = pair[1]
                elif key == b":path":
                    if path is None:
                        path = pair[1]
                elif key == b":authority" and authority is None:
                    authority = pair[1]
            else:
                append(pair)
        if connection:
            named = {t.strip().lower() for t in connection.split(b",") if t.strip()}
            if named:
                out = [(k, v) for k, v in out if k not in named]
                length = header_value(out, b"content-length")
        method = method or self.method
        path = path or b"/"
        if length is not None and not length.isdigit():  # never next to chunked framing
            out = [(k, v) for k, v in out if k != b"content-length"]
            length = None
        lines = [method + b" " + path + b" HTTP/1.1"]
        if authority:
            lines.append(b"host: " + authority)
        lines += [k + b": " + v for k, v in out]
        if length is not None:
            self._request_framing = Framing(False, int(length))
        elif eos:
            self._request_framing = Framing(False, 0)
        else:
            lines.append(b"transfer-encoding: chunked")
            self._request_framing = Framing(True, None)
        lines.append(b"\r\n")
        head = b"\r\n".join(lines)
        # Only a plugin can have put a bad byte here, and the runtime marks a stream whose
        # plugin changed a header map (or replied with a suspect field): checked then.
        if self.stream is not None and self.stream.headers_suspect() and not (
                head_is_clean(head, len(lines)) and names_are_tokens(out)
                and is_token(method) and is_target(path)):
            raise InvalidHead(head_problem([(b"host", authority or b""), *out], method, path)
                              or "invalid request head")
        return method, head

    def _plain_head(self, headers: Pairs, eos: bool) -> bytes:
        """No plugins touched the headers: what `_request_pairs` saw decides the framing, and
        no header named by `Connection` needs removing (`_plain`)."""
        lines = [self.method + b" " + headers[1][1] + b" HTTP/1.1", b"host: " + headers[2][1]]
        lines += [k + b": " + v for k, v in headers[4:] if k not in HOP_BY_HOP]
        if self._remaining is not None or eos:
            self._request_framing = None
        else:
            lines.append(b"transfer-encoding: chunked")
            self._request_framing = Framing(True, None)
        lines.append(b"\r\n")
        # (no head_is_clean scan: only bytes httptools accepted, see http1.py)
        return b"\r\n".join(lines)

    async def _connect(self, route: RouteTarget, pool: EndpointPool, head_request: bool,
                       fresh: bool = False) -> None:
        try:
            connection = await (pool.connect(route.connect_timeout) if fresh
                                else pool.acquire(route.connect_timeout))
        except (OSError, TimeoutError) as exc:
            log.debug("connect to %s failed: %s", pool.endpoint, exc)
            self.state.stats.upstream_connect_failures += 1
            if self._finished or self._no_upstream:  # the exchange ended meanwhile
                return
            self.on_upstream_error("upstream_reset_before_response_started{connection_failure}",
                                   503)
            return
        if self._finished or self._no_upstream:
            connection.pool.release(connection)
            return
        self._attach(connection, head_request)

    def _attach(self, connection: UpstreamConnection, head_request: bool) -> None:
        queued, self._upstream_queue = self._upstream_queue or [], None
        self._upstream = connection
        connection.start(self, b"".join(queued), head_request)

    def _to_upstream(self, data: bytes) -> None:
        if self._upstream_queue is not None:
            self._upstream_queue.append(data)
        elif self._upstream is not None:
            self._upstream.write(data)

    def _arm_timeout(self) -> None:
        if not self.deadline and self.route is not None and self.route.timeout > 0:
            self.connection.arm_deadline(self, self.route.timeout)

    def _on_timeout(self) -> None:
        self.deadline = 0.0
        if not self._response_started and not self._finished:
            self.state.stats.upstream_timeouts += 1
            if self._upstream is not None:
                self._upstream.abandon()
                self._upstream = None
            self._router_reply(504, b"upstream request timeout", "upstream_response_timeout")

    # -- flow control ------------------------------------------------------------------------
    def client_paused(self, paused: bool) -> None:
        if self._upstream is not None:
            self._upstream.pause_reading(paused)

    def upstream_paused(self, paused: bool) -> None:
        """The upstream reads the request body slower than the client sends it."""
        connection = self.connection
        transport = connection.transport
        if transport is not None and not transport.is_closing():
            # while the gateway holds the body back, the client is not stalling: no 408
            connection.held = paused
            if paused:
                transport.pause_reading()
            else:
                connection.refresh()
                transport.resume_reading()

    # -- upstream response (ResponseSink) ----------------------------------------------------
    def on_response_headers(self, status: int, headers: Pairs, end_of_stream: bool) -> None:
        self.deadline = 0.0
        if self.stream is None:
            self._send_headers(headers, end_of_stream, "", status)
        else:
            pairs: Pairs = [(b":status", str(status).encode()), *headers]
            self.stream.response_headers(pairs, end_of_stream, normalized=True)
            self._drain()
        self._response_eos_sent = end_of_stream

    _response_eos_sent = False

    def on_response_body(self, data: bytes, end_of_stream: bool = False) -> None:
        if end_of_stream:
            self._response_eos_sent = True
        if self.stream is None:
            self._send_body(data, end_of_stream)
        else:
            self.stream.response_body(data, end_of_stream)
            self._drain()

    def on_response_end(self, trailers: Pairs) -> None:
        upstream, self._upstream = self._upstream, None
        if upstream is not None and not self._sent_whole:
            upstream.spoil()  # answered before the request was all sent: not reusable
        if self._response_eos_sent:
            return
        if self.stream is None:
            self._send_body(b"", True, trailers)
        else:
            if trailers:
                self.stream.response_trailers(trailers)
            else:
                self.stream.response_body(b"", True)
            self._drain()

    _request_head: bytes | None = None
    _retried = False

    def on_upstream_error(self, details: str, status: int) -> None:
        self._upstream = None
        if (self._request_head is not None and not self._retried and not self._response_started
                and "before_response_started{connection_termination}" in details):
            # A pooled keep-alive connection the upstream had just closed: an idempotent,
            # body-less request is safe to send once more on a fresh connection.
            self._retried = True
            self._upstream_queue = [self._request_head]
            route = self.route
            assert route is not None
            asyncio.get_running_loop().create_task(
                self._connect(route, self._pick(route), self.method == b"HEAD", fresh=True))
            return
        if self._response_started:
            self.abort(details)
            self.connection.close()
            return
        body = {503: b"upstream connect error or disconnect/reset before headers",
                502: b"upstream protocol error"}.get(status, b"upstream error")
        self._router_reply(status, body, details)

    def _router_reply(self, status: int, body: bytes, details: str) -> None:
        """A reply made by the proxy itself; it passes every plugin's response callbacks."""
        if self.stream is None:
            self.details = details
            headers: Pairs = [(b":status", str(status).encode()),
                              (b"content-type", b"text/plain"),
                              (b"content-length", str(len(body)).encode())]
            self._dispatch([SendHeaders(headers, False, details), SendBody(body, True)])
            return
        self.stream.upstream_reply(status, body, details)
        self._drain()

    # -- downstream response -----------------------------------------------------------------
    def _send_headers(self, headers: Pairs, eos: bool, details: str,
                      status: int | None = None) -> None:
        if self._response_started:
            return
        self._response_started = True
        self._sent_response_headers = headers
        self.details = details or self.details
        head_request = self.method == b"HEAD"
        self.status, out, self._response_framing = response_headers_out(headers, eos,
                                                                         head_request, status)
        status = self.status
        if self.stream is None and not self._response_framing.chunked:
            # the upstream's parser delimits the body exactly as announced: nothing to count
            self._response_framing = None
        if head_request or status == 204 or status == 304:
            self._no_body = eos = True  # whatever body follows is not written
        if self.version == "1.0":
            if self._response_framing is not None and self._response_framing.chunked:
                out = [(k, v) for k, v in out if k != b"transfer-encoding"]
                self._response_framing = Framing(False, None)
                self.keep_alive = False
            elif self.keep_alive:  # an HTTP/1.0 client closes unless told otherwise
                out.append((b"connection", b"keep-alive"))
        if not self.keep_alive:
            out.append((b"connection", b"close"))
        try:
            if not 200 <= status <= 999:  # (a 1xx would leave the client waiting for more)
                raise InvalidHead("invalid :status")
            # in full only for a stream whose plugin changed a header map (see `_head`)
            suspect = self.stream is not None and self.stream.headers_suspect()
            if suspect and not names_are_tokens(out):
                raise InvalidHead(head_problem(out) or "invalid response head")
            head = response_head(status, out, self.version.encode(), suspect)
        except InvalidHead as exc:
            self._refuse_response(str(exc))
            return
        self.connection.write(self, head)
        if eos:
            self._finish()

    _no_body = False  # HEAD, 204, 304: body bytes are never written

    def _refuse_response(self, problem: str) -> None:
        """A response head that must not be written: a plain 502 instead, then close."""
        log.warning("not sending a malformed response head (%s)", problem)
        self.details = "invalid_response_headers{" + problem.replace(" ", "_") + "}"
        self.status = 502
        self.keep_alive = False
        self._response_framing = None
        if self._upstream is not None:
            self._upstream.abandon()
            self._upstream = None
        self.connection.write(self, simple_response(502, problem.encode() + b"\n",
                                                    keep_alive=False))
        self._finish()

    def _send_body(self, data: bytes, eos: bool, trailers: Pairs | None = None) -> None:
        if self.response_done or not self._response_started:
            return
        if trailers:
            self._sent_trailers = trailers
        framing = self._response_framing
        if not self._no_body:
            if framing is not None:
                payload = framing.encode(data, eos, trailers)
                if framing.mismatch and self.keep_alive:
                    # close once done: a short body is seen truncated, never followed by
                    # what the client would take for the next response
                    log.warning("response body does not match its content-length")
                    self.keep_alive = False
            else:
                payload = data
            self.bytes_sent += len(data)
            self.connection.write(self, payload)
        if eos:
            self._finish()

    def _finish(self) -> None:
        if self.response_done or self._finished:  # (aborted already: logged once)
            return
        self.response_done = True
        self._finished = True
        self.deadline = 0.0
        if self.stream is not None:
            self.stream.complete()
        self.state.stats.record(self.status, time.monotonic() - self.started_at)
        if self.state.access_log is not None:
            self._access_log(self.state.access_log)
        self.connection.finished(self)

    def abort(self, details: str) -> None:
        """The client went away or the stream was reset: release everything."""
        if self._finished:
            return
        self._finished = True
        self.details = self.details or details
        self.deadline = 0.0
        if self._upstream is not None:
            self._upstream.abandon()
            self._upstream = None
        if self.stream is not None:
            self.stream.complete()
        self.state.stats.record(self.status or 0, time.monotonic() - self.started_at)
        if self.state.access_log is not None:
            self._access_log(self.state.access_log)

    # What the access log reads: class defaults, set as the exchange gets that far.
    bytes_received = 0
    _forwarded_headers: Pairs | None = None
    _sent_response_headers: Pairs | None = None
    _sent_trailers: Pairs | None = None
    _endpoint: Endpoint | None = None

    def _access_log(self, access: AccessLog) -> None:
        duration = time.monotonic() - self.started_at
        stream, route, endpoint = self.stream, self.route, self._endpoint
        request_headers = self._forwarded_headers or (
            stream.request_headers_seen() if stream is not None else None) or self.headers
        access.log(AccessRecord(
            start_time=time.time() - duration, duration=duration,
            protocol=f"HTTP/{self.version}", request_headers=request_headers,
            response_headers=self._sent_response_headers or [],
            response_trailers=self._sent_trailers or [], status=self.status,
            details=self.details, bytes_received=self.bytes_received,
            bytes_sent=self.bytes_sent,
            upstream_host=endpoint.address if endpoint is not None else None,
            upstream_cluster=route.cluster_name if route is not None else None,
            route_name=route.route_name if route is not None else None,
            downstream_remote=self.connection.peer, downstream_local=self.connection.local,
            filter_state=stream.filter_state if stream is not None else {},
            local_reply=stream is not None and stream.state is StreamState.LOCAL_REPLY))
        access.writer.done_with()
