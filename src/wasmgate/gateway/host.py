"""The gateway as the plugins' embedder: ticks, http_calls, queues and logs on the event loop.

Plugins may call out while they are being started in a worker thread (configure runs there),
so every entry point hops onto the loop with `call_soon_threadsafe` when needed. Results are
delivered back into the plugin on the loop; streams the plugin resumes wake through their
chain stream's `on_wakeup`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..api.gateway import parse_cluster_name
from ..runtime.abi import LogLevel
from ..runtime.errors import RuntimeFailure
from ..runtime.host import (
    GrpcCallRequest,
    Host,
    HttpCallRequest,
    RedisCallRequest,
    RedisInitRequest,
    UnknownUpstream,
    python_level,
)
from ..runtime.metrics import MetricStore
from ..runtime.plugin import Plugin
from ..runtime.shared import SharedDataStore, SharedQueueStore
from ..runtime.vm import WasmVM
from .http1 import InvalidHead, choose_framing, header_value, request_head, strip_hop_by_hop
from .redis import RedisError, RedisPools, RedisTarget, database_of
from .upstream import BufferedResponse, Endpoint, UpstreamPools

if TYPE_CHECKING:
    from ..api.gateway import Cluster, Redis
    from .grpc import GrpcCalls

log = logging.getLogger("wasmgate.gateway.host")
wasm_log = logging.getLogger("wasmgate.wasm")

Resolver = Callable[[str], "Cluster | tuple[str, int] | None"]
RedisResolver = Callable[[str], "Redis | tuple[str, int] | None"]
REDIS_NETWORK_ERROR = 1
"""proxy_on_redis_call_response status for a failed call (Higress RedisStatus::NetworkError)."""
UPSTREAM_TIMEOUT = b"upstream request timeout"
NO_HEALTHY_UPSTREAM = b"no healthy upstream"
CONNECT_TIMEOUT = 5.0
"""The connect timeout for a `host:port` upstream (a cluster has its own, 5 s by default); the
call's own timeout covers connecting and the response together."""


def _transport_failure(exc: OSError) -> str:
    """Envoy's transport failure reason for a connect that failed: the errno's text for a
    socket error (asyncio's own text is "Connect call failed (addr)"), the reason for TLS."""
    if isinstance(exc, ssl.SSLError):
        return f"TLS_error:{exc.reason or exc}"
    if exc.errno and exc.errno > 0 and not isinstance(exc, socket.gaierror):
        return f"delayed connect error: {os.strerror(exc.errno)}"
    return f"delayed connect error: {exc.strerror or exc}"


def _reset_body(reason: str, transport: str = "") -> bytes:
    """The body of Envoy's router reply for an upstream reset before the response headers."""
    text = f"upstream connect error or disconnect/reset before headers. reset reason: {reason}"
    return (text + (f", transport failure reason: {transport}" if transport else "")).encode()


class GatewayHost(Host):
    """One per gateway process; every plugin of the process shares it (and its stores)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, pools: UpstreamPools,
                 resolve: Resolver, shared_data: SharedDataStore | None = None,
                 queues: SharedQueueStore | None = None,
                 metrics: MetricStore | None = None) -> None:
        super().__init__(shared_data=shared_data, queues=queues, metrics=metrics)
        self.loop = loop
        self.pools = pools
        self.resolve = resolve
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._loop_thread = threading.get_ident()
        self.on_crash: Callable[[Plugin, Exception], None] = lambda plugin, exc: None
        self.resolve_redis: RedisResolver = parse_cluster_name
        """Redis cluster names; the app passes ``Gateway.resolve_redis`` (credentials)."""
        self.redis_pools = RedisPools()
        self._redis_tasks: set[asyncio.Task[None]] = set()
        self._grpc: GrpcCalls | None = None  # created on the first gRPC call (imports grpcio)

    def _on_loop(self, fn: Callable[[], None]) -> None:
        if threading.get_ident() == self._loop_thread:
            fn()
        else:
            self.loop.call_soon_threadsafe(fn)

    # -- logs --------------------------------------------------------------------------------
    def log(self, plugin: Plugin, level: LogLevel, message: str) -> None:
        wasm_log.log(python_level(level), "wasm log%s: %s", plugin.log_prefix(), message)

    # -- ticks -------------------------------------------------------------------------------
    def set_tick_period(self, plugin: Plugin, period_ms: int) -> None:
        self._on_loop(lambda: self._arm_tick(plugin, period_ms))

    def _arm_tick(self, plugin: Plugin, period_ms: int) -> None:
        old = self._timers.pop(id(plugin), None)
        if old is not None:
            old.cancel()
        if period_ms > 0:
            self._timers[id(plugin)] = self.loop.call_later(period_ms / 1000, self._tick, plugin)

    def _tick(self, plugin: Plugin) -> None:
        self._timers.pop(id(plugin), None)
        if plugin.vm is None or plugin.failed:
            return
        if plugin.starting:  # (see _held_while_starting; re-armed, so stop_plugin cancels it)
            self._arm_tick(plugin, 10)
            return
        try:
            plugin.tick()
        except RuntimeFailure as exc:
            self.on_crash(plugin, exc)
            return
        if plugin.root.tick_period_ms > 0 and id(plugin) not in self._timers:
            self._arm_tick(plugin, plugin.root.tick_period_ms)

    def stop_plugin(self, plugin: Plugin) -> None:
        """The plugin is being closed (reload, removal, shutdown) or restarted on a fresh VM
        (FAIL_RELOAD): stop its tick and cancel its open gRPC calls. http and redis calls in
        flight finish and are dropped on delivery (they belong to a VM that is gone)."""
        self._on_loop(lambda: self._stop(plugin))

    def _stop(self, plugin: Plugin) -> None:
        timer = self._timers.pop(id(plugin), None)
        if timer is not None:
            timer.cancel()
        if self._grpc is not None:
            cancelled = self._grpc.cancel_all(plugin)
            if cancelled:
                log.debug("%s stopped: %d gRPC call(s) cancelled", plugin.describe(), cancelled)

    # -- queues ------------------------------------------------------------------------------
    def queue_ready(self, plugin: object, token: int) -> None:
        if isinstance(plugin, Plugin):
            self._on_loop(lambda: self.loop.call_soon(self._deliver_queue, plugin, token))

    def _deliver_queue(self, plugin: Plugin, token: int) -> None:
        if self._held_while_starting(plugin, lambda: self._deliver_queue(plugin, token)):
            return
        if plugin.vm is not None and not plugin.failed:
            try:
                plugin.deliver_queue_ready(token)
            except RuntimeFailure as exc:
                self.on_crash(plugin, exc)

    # -- http_call ---------------------------------------------------------------------------
    def http_call(self, plugin: Plugin, request: HttpCallRequest) -> None:
        target = self.resolve(request.upstream)
        if target is None:
            raise UnknownUpstream(request.upstream)
        if isinstance(target, tuple):
            endpoint, timeout_default = Endpoint(target[0], target[1]), 15.0
            connect_timeout = CONNECT_TIMEOUT
        else:
            first = target.targets()[0]
            endpoint = Endpoint(first.host, first.port, first.tls)
            timeout_default = target.timeout_ms / 1000
            connect_timeout = target.connect_timeout_ms / 1000
        timeout = request.timeout_ms / 1000 if request.timeout_ms else timeout_default
        vm = plugin.vm  # the issuing VM: a restarted plugin's fresh VM never sees the result
        self._on_loop(lambda: self.loop.create_task(
            self._http_call(plugin, vm, request, endpoint, timeout, connect_timeout)))

    async def _http_call(self, plugin: Plugin, vm: WasmVM | None, request: HttpCallRequest,
                         endpoint: Endpoint, timeout: float,
                         connect_timeout: float = CONNECT_TIMEOUT) -> None:
        """Envoy's async client runs the router: failing before any response header arrived, the
        call gets the router's local reply as a response (503 ``upstream connect error ...`` for
        connect failures and resets, 502 for a protocol error, 504 ``upstream request timeout``);
        only a stream reset after the headers is a failure, (0, 0, 0) with status 11 reset.
        `timeout` covers connecting and the response together, as Envoy's does. A host name
        that does not resolve is Envoy's STRICT_DNS cluster without hosts: 503 ``no healthy
        upstream``."""
        deadline = self.loop.time() + timeout
        done: asyncio.Future[BufferedResponse] = self.loop.create_future()
        sink = BufferedResponse(lambda r: done.done() or done.set_result(r))
        try:
            connection = await self.pools.pool(endpoint).acquire(min(timeout, connect_timeout))
        except (OSError, TimeoutError) as exc:
            log.debug("http_call to %s: connect failed: %s", endpoint, exc)
            if isinstance(exc, TimeoutError):
                reply = ((504, UPSTREAM_TIMEOUT) if timeout <= connect_timeout
                         else (503, _reset_body("connection timeout")))
            elif isinstance(exc, socket.gaierror):
                reply = (503, NO_HEALTHY_UPSTREAM)
            else:
                reply = (503, _reset_body("remote connection failure",
                                          _transport_failure(exc)))
            self._deliver_router_reply(plugin, vm, request.token, *reply)
            return
        try:
            headers = request.headers
            method = header_value(headers, b":method") or b"GET"
            path = header_value(headers, b":path") or b"/"
            out = [(b"host", header_value(headers, b":authority") or b""),
                   *strip_hop_by_hop(headers)]
            if request.body:  # the body is all here: its true length, as Envoy sets it
                out = [p for p in out if p[0] != b"content-length"]
                out.append((b"content-length", b"%d" % len(request.body)))
            out, framing = choose_framing(out, not request.body)
            try:
                head = request_head(method, path, out)
            except InvalidHead as exc:  # Envoy's router: a 503 local reply, nothing sent
                connection.pool.release(connection)
                self._deliver_router_reply(plugin, vm, request.token, 503, str(exc).encode())
                return
            connection.start(sink, head, method == b"HEAD")
            if request.body:
                connection.write(framing.encode(request.body, True))
            response = await asyncio.wait_for(done, max(deadline - self.loop.time(), 0))
        except (OSError, TimeoutError) as exc:
            connection.abandon()
            log.debug("http_call to %s failed: %s", endpoint, exc)
            if sink.status:  # headers seen: Envoy resets the stream
                self._deliver_failure(plugin, vm, request.token)
            elif isinstance(exc, TimeoutError):
                self._deliver_router_reply(plugin, vm, request.token, 504, UPSTREAM_TIMEOUT)
            else:
                self._deliver_router_reply(plugin, vm, request.token, 503,
                                           _reset_body("connection termination"))
            return
        if response.error is not None:
            log.debug("http_call to %s failed: %s", endpoint, response.error)
            if response.status:
                self._deliver_failure(plugin, vm, request.token)
            else:  # e.g. upstream_reset_before_response_started{connection_termination}
                protocol = response.error.startswith("upstream_protocol_error")
                reason = "protocol error" if protocol else (
                    response.error.partition("{")[2].rstrip("}").replace("_", " ")
                    or "connection termination")
                self._deliver_router_reply(plugin, vm, request.token,
                                           502 if protocol else 503, _reset_body(reason))
            return
        pairs = [(b":status", str(response.status).encode()), *response.headers]
        self._deliver(plugin, vm, lambda: plugin.deliver_http_call_response(
            request.token, pairs, bytes(response.body), response.trailers))

    def _deliver_failure(self, plugin: Plugin, vm: WasmVM | None, token: int) -> None:
        self._deliver(plugin, vm, lambda: plugin.deliver_http_call_failure(token))

    def _deliver_router_reply(self, plugin: Plugin, vm: WasmVM | None, token: int, status: int,
                              body: bytes) -> None:
        """The response Envoy's router makes itself when the call never got one."""
        pairs = [(b":status", str(status).encode()), (b"content-length", str(len(body)).encode()),
                 (b"content-type", b"text/plain")]
        self._deliver(plugin, vm, lambda: plugin.deliver_http_call_response(
            token, pairs, body, []))

    def _held_while_starting(self, plugin: Plugin, again: Callable[[], None]) -> bool:
        """A plugin inside start() (on_configure, perhaps in a loader thread) is not called
        into from the loop meanwhile: one wasmtime Store, one thread. `again` runs 10 ms
        later instead (True), until it has started."""
        if not plugin.starting:
            return False
        self.loop.call_later(0.01, again)
        return True

    def _deliver(self, plugin: Plugin, vm: WasmVM | None, action: Callable[[], None]) -> None:
        """Run a result's callback, unless the VM that made the call is gone: a plugin that
        was stopped, crashed, or restarted on a fresh VM (whose tokens start again at 1, so an
        old result would reach the new VM under a token it has just issued)."""
        current = plugin.vm
        if current is not vm:
            if current is not None:
                log.debug("%s: a result for its previous VM dropped", plugin.describe())
            return
        if current is None or plugin.failed:
            return
        if self._held_while_starting(plugin, lambda: self._deliver(plugin, vm, action)):
            return
        try:
            action()
        except RuntimeFailure as exc:
            self.on_crash(plugin, exc)

    # -- redis (Higress) -----------------------------------------------------------------------
    def redis_init(self, plugin: Plugin, request: RedisInitRequest) -> None:
        # keyed by the Envoy cluster (no ?options): the plugin calls with either spelling
        plugin.redis_clusters[request.cluster.split("?", 1)[0]] = self._redis_target(
            request.cluster, request.username, request.password, request.timeout_ms)

    def _redis_target(self, cluster: str, username: str, password: str,
                      timeout_ms: int) -> tuple[RedisTarget, float]:
        found = self.resolve_redis(cluster)
        if found is None:
            raise UnknownUpstream(cluster)
        if isinstance(found, tuple):
            host, port = found
        else:
            host, port = found.address.host, found.address.port
            username = username or found.username or ""
            password = password or found.password or ""
        target = RedisTarget(host, port, username, password, database_of(cluster))
        return target, (timeout_ms if timeout_ms > 0 else 1000) / 1000

    def redis_call(self, plugin: Plugin, request: RedisCallRequest) -> None:
        known = plugin.redis_clusters.get(request.cluster.split("?", 1)[0])
        if not isinstance(known, tuple):  # called without redis_init: defaults
            known = self._redis_target(request.cluster, "", "", 0)
        target, timeout = known
        vm = plugin.vm  # the issuing VM (see _deliver)
        self._on_loop(lambda: self._start_redis_call(plugin, vm, request, target, timeout))

    def _start_redis_call(self, plugin: Plugin, vm: WasmVM | None, request: RedisCallRequest,
                          target: RedisTarget, timeout: float) -> None:
        task = self.loop.create_task(self._redis_call(plugin, vm, request, target, timeout))
        self._redis_tasks.add(task)
        task.add_done_callback(self._redis_tasks.discard)

    async def _redis_call(self, plugin: Plugin, vm: WasmVM | None, request: RedisCallRequest,
                          target: RedisTarget, timeout: float) -> None:
        try:
            reply = await self.redis_pools.call(target, request.query, timeout)
        except RedisError as exc:
            log.debug("redis_call to %s:%d failed: %s", target.host, target.port, exc)
            self._deliver(plugin, vm, lambda: plugin.deliver_redis_response(
                request.token, REDIS_NETWORK_ERROR))
            return
        self._deliver(plugin, vm, lambda: plugin.deliver_redis_response(request.token, 0, reply))

    # -- gRPC (grpc.aio; see gateway/grpc.py) --------------------------------------------------
    def _grpc_calls(self) -> GrpcCalls:
        if self._grpc is None:
            from .grpc import GrpcCalls
            self._grpc = GrpcCalls(self.loop, self._deliver)
        return self._grpc

    def grpc_call(self, plugin: Plugin, request: GrpcCallRequest) -> None:
        from .grpc import cluster_of
        name = cluster_of(request.service)
        target = self.resolve(name) if name is not None else None
        if target is None:
            raise UnknownUpstream(name or request.service.decode("utf-8", "replace"))
        if isinstance(target, tuple):
            (host, port), tls, timeout_default = target, False, 15.0
        else:
            first = target.targets()[0]
            host, port, tls = first.host, first.port, first.tls
            timeout_default = target.timeout_ms / 1000
        timeout: float | None = request.timeout_ms / 1000 if request.timeout_ms > 0 else (
            None if request.streaming else timeout_default)
        vm = plugin.vm  # gRPC calls are keyed by the issuing VM (tokens restart per VM)
        self._on_loop(lambda: self._grpc_calls().start(plugin, vm, request, host, port, tls,
                                                       timeout))

    def grpc_send(self, plugin: Plugin, token: int, message: bytes, end_stream: bool) -> None:
        vm = plugin.vm
        self._on_loop(lambda: self._grpc_calls().send(vm, token, message, end_stream))

    def grpc_cancel(self, plugin: Plugin, token: int) -> None:
        vm = plugin.vm
        self._on_loop(lambda: self._grpc_calls().cancel(vm, token))

    def grpc_close(self, plugin: Plugin, token: int) -> None:
        vm = plugin.vm
        self._on_loop(lambda: self._grpc_calls().close(vm, token))
