"""The filter chain as ASGI middleware: Proxy-Wasm plugins in front of any ASGI application.

    app = WasmPluginMiddleware(app, plugins=[PluginSpec("auth.wasm", config=b"...")])
    app = WasmPluginMiddleware(app, plugins=["wasmplugins/"], labels={"app": "shop"})

`plugins` takes `PluginSpec` entries (a module path or bytes and its configuration),
`WasmPlugin` resources, `.wasm` paths, and YAML/JSON files or directories of WasmPlugins (loaded
with `api.load_paths`; errors are raised). Resources go through Istio's selection and ordering
(`api.select_plugins` with `labels`, `namespace`, `root_namespace`, `listener_mode`, `port`) and
take the place of the first resource entry; the other entries keep their positions.
Plugins' http_calls go to `clusters` (`{"auth": "127.0.0.1:8081"}` or `api.Cluster`s), or to
`outbound|PORT||HOST` and `host:port` names directly.

Modules compile and start in worker threads at `lifespan.startup` (waiting up to
`startup_timeout`), or, if the server sends no lifespan, from the first request on without
waiting. A plugin that is not ready yet stands in per failStrategy, as in the gateway (Istio's
placeholder: FAIL_OPEN passes, otherwise 403 `wasm_plugin_unavailable`). At
`lifespan.shutdown` (after the application's own shutdown) the plugins are closed.

One HTTP request is one `ChainStream`, driven as `gateway.server.Exchange` drives it:

* Request: pseudo-headers from the scope (`:path` is `raw_path` plus the query string,
  `:authority` the Host header), the headers, an `x-request-id` when absent. Body chunks from
  `receive` that are already there are coalesced, so a body arriving in one go reaches the
  plugins as one callback with end_of_stream, together with the headers: the chain then sends
  headers and body in one batch and sets a true content-length when a plugin rewrote the body.
* When the chain forwards the headers, the application is called with a rewritten scope
  (`method`, `path`/`raw_path`/`query_string`, `scheme`, `headers`) and a `receive` that yields
  the body the chain forwards. Local replies never call it.
* The application's `http.response.start` is held until its first body message so that
  headers and (often whole) body enter the chain together, as on the request side; what the
  chain lets through is sent to the client. Hop-by-hop headers are dropped and framing is left
  to the server (a content-length the chain removed means chunked).
* A plugin that pauses (an http_call, say) holds only its request: the stream's `on_wakeup`
  drains it again on the event loop.
* The application failing before its response entered the chain gives a 500 through the
  plugins' response path (`asgi_app_exception`); later, or a chain `Reset`, raises
  `StreamReset` so the server closes the connection (before any response was sent the server
  answers 500 itself).
* An application cut off (client gone, local reply, reset) reads `http.disconnect` from its
  `receive`; one listening for it gets `DISCONNECT_GRACE` to end on its own (Django's handler
  cancels its own view task then) before its task is cancelled.

Layering: imports chain, runtime, api and fetch (module bytes of a WasmPlugin url), and reuses
the gateway's asyncio embedder, `gateway.host.GatewayHost` (ticks, http_calls, queues, logs on
the event loop; its http_calls use `gateway.upstream` pools). Nothing else of the gateway.
Websocket and other scopes pass through untouched. One middleware serves one event loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from .api.errors import ConfigErrors
from .api.gateway import Cluster, resolve_upstream
from .api.loading import load_paths
from .api.ordering import ListenerMode, select_plugins
from .api.pluginconfig import encode_plugin_config
from .api.resources import WasmPlugin
from .chain import (
    DEFAULT_BUFFER_LIMIT,
    ChainAction,
    FailStrategy,
    FilterChain,
    ForwardBody,
    ForwardHeaders,
    ForwardTrailers,
    PluginSlot,
    Reset,
    SendBody,
    SendHeaders,
    SendTrailers,
    StreamState,
)
from .fetch import fetch_module
from .gateway.host import GatewayHost
from .gateway.upstream import UpstreamPools
from .runtime.host import Host
from .runtime.module import PluginModule
from .runtime.plugin import Plugin, PluginConfig
from .runtime.serde import Pairs
from .runtime.vm import Limits

log = logging.getLogger("wasmgate.asgi")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                        b"te", b"upgrade", b"trailer", b"proxy-authenticate",
                        b"proxy-authorization"})
# Extensions whose messages cannot pass through the chain: hidden from the application.
UNSUPPORTED_EXTENSIONS = ("http.response.pathsend", "http.response.zerocopysend",
                          "http.response.early_hint", "http.response.push")
COALESCE_LIMIT = 1 << 16  # at most this much of an arriving body is merged into one chunk
# How long an application that listens for http.disconnect has to end on its own once it is
# cut off (client gone, local reply, reset) before its task is cancelled; see _end_app.
DISCONNECT_GRACE = 5.0
_INTERNAL_ERROR = b"Internal Server Error"


class StreamReset(Exception):
    """The stream was reset (a plugin closed it, or the application failed mid-response)."""

    def __init__(self, details: str) -> None:
        super().__init__(details)
        self.details = details


@dataclass(frozen=True)
class PluginSpec:
    """One plugin, without a WasmPlugin resource: the module and what Envoy would pass it.

    `config` is the plugin configuration: bytes, text, or a mapping (sent as Istio sends
    pluginConfig: compact JSON, sorted keys). `name` defaults to the file's stem.
    """

    path: str | Path | bytes
    config: bytes | str | Mapping[str, Any] = b""
    root_id: str = ""
    name: str = ""
    fail_strategy: FailStrategy | str = FailStrategy.FAIL_CLOSE
    vm_config: bytes = b""
    env: Mapping[str, str] = field(default_factory=dict)
    allow_on_headers_stop_iteration: bool = False

    @property
    def plugin_name(self) -> str:
        if self.name:
            return self.name
        return Path(self.path).stem if not isinstance(self.path, bytes) else "plugin"

    def configuration(self) -> bytes:
        config = self.config
        if isinstance(config, bytes):
            return config
        if isinstance(config, str):
            return config.encode()
        return encode_plugin_config(dict(config))


PluginEntry = PluginSpec | WasmPlugin | str | Path


@dataclass
class _Entry:
    name: str
    fail_strategy: FailStrategy
    build: Callable[[Host, Limits], Plugin]  # runs in a worker thread


def _started(plugin: Plugin) -> Plugin:
    """Start it; one that fails to start has what it started stopped and its VM closed."""
    try:
        plugin.start()
    except BaseException:
        try:
            plugin.host.stop_plugin(plugin)
            plugin.close()
        except Exception as exc:  # the start failure is what to report
            log.warning("plugin %s: error while closing: %s", plugin.describe(), exc)
        raise
    return plugin


def _spec_entry(spec: PluginSpec) -> _Entry:
    def build(host: Host, limits: Limits) -> Plugin:
        module = PluginModule.load(spec.path)
        config = PluginConfig(name=spec.plugin_name, root_id=spec.root_id,
                              configuration=spec.configuration(),
                              vm_configuration=spec.vm_config, env=dict(spec.env),
                              limits=limits,
                              allow_on_headers_stop_iteration=spec.allow_on_headers_stop_iteration)
        return _started(Plugin(module, config, host))

    return _Entry(spec.plugin_name, FailStrategy(str(getattr(spec.fail_strategy, "value",
                                                              spec.fail_strategy))), build)


def _resource_entry(resource: WasmPlugin) -> _Entry:
    def build(host: Host, limits: Limits) -> Plugin:
        url = resource.resolved_url()
        module = PluginModule(fetch_module(url, resource.spec.sha256 or None), source=url)
        config = PluginConfig(name=resource.filter_name, root_id=resource.root_id,
                              configuration=resource.plugin_configuration_bytes(),
                              env=resource.effective_env(os.environ), limits=limits)
        return _started(Plugin(module, config, host))

    return _Entry(resource.filter_name, FailStrategy(str(resource.spec.fail_strategy)), build)


def plugin_entries(plugins: PluginEntry | Iterable[PluginEntry], *,
                   labels: Mapping[str, str] | None = None, namespace: str = "default",
                   root_namespace: str = "istio-system",
                   listener_mode: ListenerMode = "SERVER",
                   port: int | None = None) -> list[_Entry]:
    """The chain's plugins in order (see the module doc); YAML errors raise ConfigErrors."""
    items = [plugins] if isinstance(plugins, PluginSpec | WasmPlugin | str | Path) else (
        list(plugins))
    resources: list[WasmPlugin] = []
    placed: list[_Entry | None] = []  # None: where the ordered resources go
    for item in items:
        if isinstance(item, PluginSpec):
            placed.append(_spec_entry(item))
            continue
        if isinstance(item, str | Path) and Path(item).suffix == ".wasm":
            placed.append(_spec_entry(PluginSpec(item)))
            continue
        if isinstance(item, WasmPlugin):
            resources.append(item)
        elif isinstance(item, str | Path):
            result = load_paths([item])
            if result.errors:
                raise ConfigErrors(result.errors)
            resources.extend(result.plugins)
        else:
            raise TypeError(f"not a plugin: {item!r} (PluginSpec, WasmPlugin, or a path)")
        if None not in placed:
            placed.append(None)
    ordered = select_plugins(resources, dict(labels or {}), namespace, root_namespace,
                             listener_mode, port) if resources else []
    entries: list[_Entry] = []
    for entry in placed:
        if entry is None:
            entries.extend(_resource_entry(r) for r in ordered)
        else:
            entries.append(entry)
    return entries


class WasmPluginMiddleware:
    """Runs the Proxy-Wasm filter chain in front of an ASGI application."""

    def __init__(self, app: ASGIApp, plugins: PluginEntry | Iterable[PluginEntry] = (), *,
                 labels: Mapping[str, str] | None = None, namespace: str = "default",
                 root_namespace: str = "istio-system", listener_mode: ListenerMode = "SERVER",
                 port: int | None = None,
                 clusters: Mapping[str, str | list[str]] | Iterable[Cluster] = (),
                 buffer_limit: int = DEFAULT_BUFFER_LIMIT, limits: Limits | None = None,
                 startup_timeout: float = 30.0, workers: int = 2) -> None:
        self.app = app
        self.entries = plugin_entries(plugins, labels=labels, namespace=namespace,
                                      root_namespace=root_namespace,
                                      listener_mode=listener_mode, port=port)
        self.buffer_limit = buffer_limit
        self.limits = limits or Limits()
        self.startup_timeout = startup_timeout
        self.clusters = _clusters(clusters)
        self.slots = [PluginSlot(e.name, e.fail_strategy) for e in self.entries]
        self.chain = FilterChain(self.slots, buffer_limit=buffer_limit)
        self.host: GatewayHost | None = None
        self._workers = workers
        self._executor: ThreadPoolExecutor | None = None
        self._pools: UpstreamPools | None = None
        self._loads: list[asyncio.Future[Plugin]] = []
        self._closed = False

    # -- plugins -----------------------------------------------------------------------------
    def begin_loading(self) -> None:
        """Start compiling and starting every plugin in worker threads (idempotent)."""
        if self.host is not None or self._closed:
            return
        loop = asyncio.get_running_loop()
        self._pools = UpstreamPools()
        self.host = GatewayHost(loop, self._pools, self._resolve)
        self.host.on_crash = self._on_crash
        self._executor = ThreadPoolExecutor(self._workers, thread_name_prefix="wasmgate-asgi")
        for index, entry in enumerate(self.entries):
            future = loop.run_in_executor(self._executor, entry.build, self.host, self.limits)
            future.add_done_callback(lambda f, i=index: self._loaded(i, f))
            self._loads.append(future)

    def _loaded(self, index: int, future: asyncio.Future[Plugin]) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        name = self.entries[index].name
        if exc is not None:
            self.slots[index].mark_failed(str(exc))
            log.error("plugin %s failed to load: %s", name, exc)
            return
        plugin = future.result()
        if self._closed:
            if self.host is not None:
                self.host.stop_plugin(plugin)
            plugin.close()
            return
        self.slots[index] = PluginSlot(name, self.entries[index].fail_strategy, plugin)
        self.chain = FilterChain(self.slots, buffer_limit=self.buffer_limit)
        log.info("plugin %s ready", name)

    async def startup(self, timeout: float | None = None) -> None:
        """Load the plugins and wait for them (at most `timeout`, default startup_timeout);
        one still loading after that stands in until it is ready."""
        self.begin_loading()
        pending = [f for f in self._loads if not f.done()]
        if pending:
            wait = self.startup_timeout if timeout is None else timeout
            _, late = await asyncio.wait(pending, timeout=wait)
            if late:
                log.warning("%d plugin(s) still loading after %.0f s; they stand in meanwhile",
                            len(late), wait)

    @property
    def ready(self) -> bool:
        """Every plugin finished loading (ready or failed)."""
        return not self.entries or (bool(self._loads) and all(f.done() for f in self._loads))

    async def shutdown(self) -> None:
        """Close every plugin (on_done, on_delete) and stop loading. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for future in self._loads:
            future.cancel()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        for slot in self.slots:
            if slot.plugin is not None:
                if self.host is not None:
                    self.host.stop_plugin(slot.plugin)
                slot.plugin.close()
        if self._pools is not None:
            self._pools.close()

    def _on_crash(self, plugin: Plugin, exc: Exception) -> None:
        for slot in self.slots:
            if slot.plugin is plugin:
                slot.on_crash(str(exc))

    def _resolve(self, name: str) -> Cluster | tuple[str, int] | None:
        found = resolve_upstream(self.clusters, name)
        if found is None or isinstance(found, Cluster):
            return found
        return (found.host, found.port)

    def describe(self) -> list[dict[str, object]]:
        return [slot.describe() for slot in self.slots]

    # -- ASGI --------------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http" and self.entries:
            self.begin_loading()
            await _Exchange(self, scope, receive, send).run()
        elif kind == "lifespan":
            await self._lifespan(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        received = False

        async def lifespan_receive() -> Message:
            nonlocal received
            message = await receive()
            received = True
            if message["type"] == "lifespan.startup":
                await self.startup()
            return message

        async def lifespan_send(message: Message) -> None:
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                await self.shutdown()
            await send(message)

        try:
            await self.app(scope, lifespan_receive, lifespan_send)
        except Exception:
            if received:
                raise
        if not received:  # the application does not speak lifespan: speak it for the plugins
            log.debug("the application ignored the lifespan scope; handling it here")
            await self._own_lifespan(receive, send)

    async def _own_lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.startup()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return


def _clusters(clusters: Mapping[str, str | list[str]] | Iterable[Cluster]) -> list[Cluster]:
    if isinstance(clusters, Mapping):
        return [Cluster(name=name, endpoints=[target] if isinstance(target, str) else target)
                for name, target in clusters.items()]
    return list(clusters)


def header_value(headers: Pairs, name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def request_pairs(scope: Scope) -> Pairs:
    """The request as the plugins see it: pseudo-headers first, then the headers."""
    headers: Pairs = [(bytes(k).lower(), bytes(v)) for k, v in scope.get("headers", ())]
    authority = header_value(headers, b"host")
    if authority is None:
        server = scope.get("server")
        authority = f"{server[0]}:{server[1]}".encode() if server else b""
    pairs: Pairs = [(b":method", scope.get("method", "GET").encode()),
                    (b":path", _target(scope)), (b":authority", authority),
                    (b":scheme", scope.get("scheme", "http").encode())]
    pairs.extend((k, v) for k, v in headers if k != b"host")
    if header_value(headers, b"x-request-id") is None:
        pairs.append((b"x-request-id", str(uuid.uuid4()).encode()))
    return pairs


def _target(scope: Scope) -> bytes:
    raw = scope.get("raw_path") or quote(scope.get("path") or "/", safe="/:@!$&'()*+,;=~").encode()
    query = scope.get("query_string") or b""
    return bytes(raw) + b"?" + bytes(query) if query else bytes(raw)


def attributes(scope: Scope) -> dict[str, object]:
    """Envoy attributes of the stream, as the gateway sets them."""
    client = scope.get("client") or ("", 0)
    server = scope.get("server") or ("", 0)
    return {"source.address": f"{client[0]}:{client[1]}", "source.port": client[1] or 0,
            "destination.address": f"{server[0]}:{server[1]}",
            "destination.port": server[1] or 0,
            "request.protocol": f"HTTP/{scope.get('http_version', '1.1')}",
            "request.time": time.time_ns(), "xds.route_name": "", "xds.cluster_name": ""}


class _ClientGone:
    """Queued when the client disconnected."""


@dataclass
class _Internal:
    """Queued when the middleware itself failed."""

    error: BaseException


Output = ChainAction | _ClientGone | _Internal


class _Exchange:
    """One request: ASGI events -> filter chain -> application, and back to the client."""

    def __init__(self, middleware: WasmPluginMiddleware, scope: Scope, receive: Receive,
                 send: Send) -> None:
        self.mw = middleware
        self.scope = scope
        self._receive = receive
        self._send = send
        self.loop = asyncio.get_running_loop()
        self.headers = request_pairs(scope)
        self.stream = middleware.chain.stream(attributes(scope))
        self.stream.on_wakeup = lambda _s: self.loop.call_soon_threadsafe(self._drain)
        self.limit = middleware.buffer_limit
        # towards the client
        self._out: asyncio.Queue[Output] = asyncio.Queue()
        self._out_bytes = 0
        self._out_drained = asyncio.Event()
        self._started = False  # http.response.start sent
        self._done = False  # the response is complete
        self._gone = False  # the client disconnected
        # towards the application
        self._app_task: asyncio.Task[None] | None = None
        self._to_app: deque[Message] = deque()
        self._app_bytes = 0
        self._app_wakeup = asyncio.Event()
        self._app_drained = asyncio.Event()
        self._app_start: Message | None = None  # http.response.start held for its body
        self._app_trailers: Pairs = []
        self._trailers_declared = False
        self._response_fed = False  # the application's response entered the chain
        self._head = False  # a HEAD request: the response ends with its headers
        self._app_finished = False  # ... completely
        self._app_listening = False  # waiting in receive(), or told http.disconnect
        self._pending: asyncio.Future[Message] | None = None  # a receive() under way

    # -- the whole exchange ------------------------------------------------------------------
    async def run(self) -> None:
        reader = self.loop.create_task(self._read_request())
        try:
            await self._respond()
        finally:
            reader.cancel()
            if self._pending is not None:
                self._pending.cancel()
            self._finish()
            await self._end_app()

    async def _end_app(self) -> None:
        task = self._app_task
        if task is None:
            return
        if not task.done() and not (self._done and self._app_finished
                                    and self.stream.state == StreamState.DONE):
            # Its response was replaced, reset or abandoned. An application that listens for
            # http.disconnect (now what its receive returns) is let end on its own first:
            # Django's handler, waiting on its disconnect listener and its view as two tasks,
            # cancels the view itself; cancelling the handler from outside instead interrupts
            # it mid-way and leaves the view's task running unobserved (forever, for an
            # endless StreamingHttpResponse). One that does not listen, or does not end within
            # DISCONNECT_GRACE, is cancelled.
            if self._app_listening:
                try:
                    await asyncio.wait({task}, timeout=DISCONNECT_GRACE)
                except asyncio.CancelledError:
                    task.cancel()
                    raise
            if not task.done():
                task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            if not task.cancelled():
                raise
        except Exception:  # already handled in _run_app
            pass

    def _finish(self) -> None:
        """The response is over (sent, reset or abandoned): on_log, on_done, on_delete."""
        self._app_wakeup.set()
        self._app_drained.set()
        self._out_drained.set()
        try:
            self.stream.complete()
        except Exception:
            log.exception("completing the stream failed")

    # -- request side ------------------------------------------------------------------------
    async def _next(self, wait: bool) -> Message | None:
        """The next message from the server; with wait False only one that is there already."""
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._receive())
        if not self._pending.done():
            if wait:
                await asyncio.wait({self._pending})
            else:
                await asyncio.sleep(0)  # receive() finishes in one step when data is there
                if not self._pending.done():
                    return None
        task, self._pending = self._pending, None
        return task.result()

    def _fixed_length(self) -> int | None:
        """The body length the request announces: content-length, or 0 for HTTP/1 without
        transfer-encoding; None when the body streams (chunked, HTTP/2 without length)."""
        length = header_value(self.headers, b"content-length")
        if length is not None and length.strip().isdigit():
            return int(length)
        if (header_value(self.headers, b"transfer-encoding") is None
                and str(self.scope.get("http_version", "1.1")).startswith("1")):
            return 0
        return None

    async def _read_request(self) -> None:
        try:
            await self._read_request_body()
            while not self._gone:  # watch for the client going away
                message = await self._next(wait=True)
                if message is not None and message["type"] == "http.disconnect":
                    self._client_gone()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("reading the request failed")
            self._out.put_nowait(_Internal(exc))

    async def _read_request_body(self) -> None:
        fixed = self._fixed_length()
        headers_fed = False
        received = 0
        message = await self._next(wait=fixed is not None)
        if message is None:  # a streaming body that has not started: headers go alone
            self._feed((self.stream.request_headers, self.headers, False))
            headers_fed = True
            message = await self._next(wait=True)
        while True:
            assert message is not None
            if message["type"] == "http.disconnect":
                self._client_gone()
                return
            chunk = bytes(message.get("body", b""))
            more = bool(message.get("more_body", False))
            received += len(chunk)
            while more and len(chunk) < COALESCE_LIMIT:  # merge what is already there
                message = await self._next(wait=fixed is not None and received >= fixed)
                if message is None:
                    break
                if message["type"] == "http.disconnect":
                    self._client_gone()
                    return
                data = bytes(message.get("body", b""))
                chunk, more, received = chunk + data, bool(message.get("more_body")), (
                    received + len(data))
            if not headers_fed:  # headers and what is there of the body enter together
                headers_fed = True
                events: list[tuple[Any, ...]] = [
                    (self.stream.request_headers, self.headers, not chunk and not more)]
                if chunk:
                    events.append((self.stream.request_body, chunk, not more))
                self._feed(*events)
            elif chunk or not more:
                self._feed((self.stream.request_body, chunk, not more))
            if not more:
                return
            while self._app_bytes > self.limit and not (self._done or self._gone):
                self._app_drained.clear()
                await self._app_drained.wait()
            message = await self._next(wait=True)

    def _client_gone(self) -> None:
        if not self._gone:
            self._gone = True
            self._app_wakeup.set()
            self._out.put_nowait(_ClientGone())

    # -- the chain ---------------------------------------------------------------------------
    def _feed(self, *events: tuple[Any, ...]) -> None:
        """Feed events (`(method, *args)`) and carry out what the chain asks for."""
        try:
            for method, *args in events:
                method(*args)
            actions = self.stream.take_actions()
        except Exception as exc:
            log.exception("filter chain failed")
            self._out.put_nowait(_Internal(exc))
            return
        self._dispatch(actions)

    def _drain(self) -> None:
        if not self._done:
            self._feed()

    def _dispatch(self, actions: list[ChainAction]) -> None:
        for action in actions:
            if isinstance(action, ForwardHeaders):
                self._start_app(action.headers, action.end_of_stream)
            elif isinstance(action, ForwardBody):
                self._to_app_body(action.data, action.end_of_stream)
            elif isinstance(action, ForwardTrailers):  # ASGI has no request trailers
                self._to_app_body(b"", True)
            else:
                if isinstance(action, SendBody):
                    self._out_bytes += len(action.data)
                self._out.put_nowait(action)
        if self.stream.state in (StreamState.LOCAL_REPLY, StreamState.RESET):
            self._app_wakeup.set()  # the application (if any) now reads a disconnect

    # -- the application ---------------------------------------------------------------------
    def _start_app(self, headers: Pairs, end_of_stream: bool) -> None:
        if self._app_task is not None:
            return
        self._head = header_value(headers, b":method") == b"HEAD"
        if end_of_stream:
            self._to_app.append({"type": "http.request", "body": b"", "more_body": False})
        self._app_task = self.loop.create_task(self._run_app(self._app_scope(headers)))

    def _app_scope(self, headers: Pairs) -> Scope:
        scope = dict(self.scope)
        original = self.headers
        method = header_value(headers, b":method")
        if method and method != header_value(original, b":method"):
            scope["method"] = method.decode("latin-1")
        path = header_value(headers, b":path")
        if path and path != header_value(original, b":path"):
            raw, _, query = path.partition(b"?")
            scope["raw_path"] = raw
            scope["path"] = unquote(raw.decode("latin-1"))
            scope["query_string"] = query
        scheme = header_value(headers, b":scheme")
        if scheme and scheme != header_value(original, b":scheme"):
            scope["scheme"] = scheme.decode("latin-1")
        authority = header_value(headers, b":authority")
        out: Pairs = [(b"host", authority)] if authority else []
        out.extend((k, v) for k, v in headers if not k.startswith(b":"))
        scope["headers"] = out
        extensions = scope.get("extensions")
        if extensions:
            scope["extensions"] = {k: v for k, v in extensions.items()
                                   if k not in UNSUPPORTED_EXTENSIONS}
        return scope

    def _to_app_body(self, data: bytes, end_of_stream: bool) -> None:
        self._to_app.append({"type": "http.request", "body": data,
                             "more_body": not end_of_stream})
        self._app_bytes += len(data)
        self._app_wakeup.set()

    def _cut_off(self) -> bool:
        """The application no longer matters: replaced by a local reply, reset, or over."""
        return (self._gone or self._done
                or self.stream.state in (StreamState.LOCAL_REPLY, StreamState.RESET))

    async def _app_receive(self) -> Message:
        while True:
            if self._to_app:
                message = self._to_app.popleft()
                self._app_bytes -= len(message["body"])
                self._app_drained.set()
                return message
            if self._cut_off():
                self._app_listening = True
                return {"type": "http.disconnect"}
            self._app_wakeup.clear()
            self._app_listening = True
            try:
                await self._app_wakeup.wait()
            finally:
                self._app_listening = False

    async def _app_send(self, message: Message) -> None:
        if self._cut_off():
            return  # the client gets something else (or nothing): drop it
        kind = message["type"]
        if kind == "http.response.start":
            if self._app_start is not None or self._response_fed:
                raise RuntimeError("http.response.start sent twice")
            self._app_start = message
            self._trailers_declared = bool(message.get("trailers", False))
            return
        if kind == "http.response.body":
            if self._head and self._response_fed:
                return
            body = b"" if self._head else bytes(message.get("body", b""))
            more = bool(message.get("more_body", False)) and not self._head
            eos = not more and (self._head or not self._trailers_declared)
            self._app_finished = self._app_finished or eos
            start, self._app_start = self._app_start, None
            if start is not None:
                status = int(start["status"])
                pairs: Pairs = [(b":status", str(status).encode())]
                pairs.extend((bytes(k).lower(), bytes(v)) for k, v in start.get("headers", ()))
                self._response_fed = True
                events: list[tuple[Any, ...]] = [
                    (self.stream.response_headers, pairs, not body and eos)]
                if body:
                    events.append((self.stream.response_body, body, eos))
                self._feed(*events)
            elif not self._response_fed:
                raise RuntimeError("http.response.body before http.response.start")
            elif body or eos:
                self._feed((self.stream.response_body, body, eos))
            while self._out_bytes > self.limit and not self._cut_off():
                self._out_drained.clear()
                await self._out_drained.wait()
            return
        if kind == "http.response.trailers" and self._head:
            return
        if kind == "http.response.trailers" and self._trailers_declared and self._response_fed:
            self._app_trailers.extend((bytes(k).lower(), bytes(v))
                                      for k, v in message.get("headers", ()))
            if not message.get("more_trailers", False):
                self._app_finished = True
                self._feed((self.stream.response_trailers, self._app_trailers))
            return
        raise RuntimeError(f"unexpected ASGI message {kind!r}")

    async def _run_app(self, scope: Scope) -> None:
        try:
            await self.mw.app(scope, self._app_receive, self._app_send)
        except asyncio.CancelledError:
            raise
        except Exception:
            if self._app_finished and not self._cut_off():  # a background task, say
                log.exception("the ASGI application failed after its response")
            elif not self._cut_off():
                log.exception("the ASGI application failed")
                self._app_failed("asgi_app_exception")
            else:
                log.debug("the ASGI application failed after its response was cut off",
                          exc_info=True)
            return
        if not self._app_finished:
            self._app_failed("asgi_app_incomplete_response")

    def _app_failed(self, details: str) -> None:
        if self._cut_off():
            return
        if not self._response_fed:
            self._feed((self.stream.upstream_reply, 500, _INTERNAL_ERROR, details))
        else:
            self._out.put_nowait(Reset(details))

    # -- response side -----------------------------------------------------------------------
    async def _respond(self) -> None:
        while not self._done:
            output = await self._out.get()
            if isinstance(output, _ClientGone):
                return
            if isinstance(output, _Internal):
                await self._internal_error(output.error)
                return
            if isinstance(output, Reset):
                raise StreamReset(output.details)
            if isinstance(output, SendHeaders):
                await self._send_start(output)
            elif isinstance(output, SendBody):
                self._out_bytes -= len(output.data)
                self._out_drained.set()
                await self._send_body(output.data, output.end_of_stream)
            elif isinstance(output, SendTrailers):
                await self._send_body(b"", True, output.trailers)

    async def _send_start(self, action: SendHeaders) -> None:
        if self._started:
            return
        status = header_value(action.headers, b":status") or b"502"
        named = header_value(action.headers, b"connection") or b""
        drop = HOP_BY_HOP | {t.strip().lower() for t in named.split(b",") if t.strip()}
        headers = [(k, v) for k, v in action.headers
                   if not k.startswith(b":") and k not in drop]
        message: Message = {"type": "http.response.start",
                            "status": int(status) if status.isdigit() else 502,
                            "headers": headers}
        if self._trailers_declared:
            message["trailers"] = True
        self._started = True
        await self._send(message)
        if action.end_of_stream:
            await self._send_body(b"", True)

    async def _send_body(self, data: bytes, end_of_stream: bool,
                         trailers: Pairs | None = None) -> None:
        if not self._started or self._done:
            return
        await self._send({"type": "http.response.body", "body": data,
                          "more_body": not end_of_stream})
        if not end_of_stream:
            return
        if self._trailers_declared:
            await self._send({"type": "http.response.trailers", "headers": trailers or [],
                              "more_trailers": False})
        elif trailers:
            log.debug("response trailers dropped: the application declared none")
        self._done = True
        self._finish()

    async def _internal_error(self, error: BaseException) -> None:
        if self._started:
            raise error
        self._started = True
        await self._send({"type": "http.response.start", "status": 500,
                          "headers": [(b"content-type", b"text/plain"),
                                      (b"content-length", str(len(_INTERNAL_ERROR)).encode())]})
        await self._send({"type": "http.response.body", "body": _INTERNAL_ERROR})
        self._done = True


__all__ = ["PluginSpec", "StreamReset", "WasmPluginMiddleware", "attributes", "plugin_entries",
           "request_pairs"]
