"""An in-memory Proxy-Wasm host for plugin authors: proxytest, for a `.wasm` of any language.

The emulator is a `Host` whose outbound world is a set of lists a test reads and answers:
http/gRPC/Redis calls wait in `pending_*()` until `respond_*()`; ticks happen on `tick()`;
logs, metrics, shared data and queues are plain views. Streams are driven callback by
callback and expose what the plugin did to them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from ..runtime.abi import Action, LogLevel
from ..runtime.contexts import LocalResponse
from ..runtime.errors import ModuleLoadError, PluginFailed, PluginTrap, RuntimeFailure
from ..runtime.host import (
    GrpcCallRequest,
    Host,
    HttpCallRequest,
    RedisCallRequest,
    RedisInitRequest,
)
from ..runtime.http import HttpContext
from ..runtime.module import PluginModule
from ..runtime.plugin import Plugin, PluginConfig
from ..runtime.serde import Pairs, normalize_headers, to_bytes
from ..runtime.vm import Limits

FAIL_STREAM = LocalResponse(503, b"", [], "wasm_fail_stream")


class EmulatorError(RuntimeFailure):
    """The plugin would not start; the message carries its logs."""


@dataclass(frozen=True)
class LogRecord:
    level: LogLevel
    message: str


class Emulator(Host):
    """Load a plugin and drive it in memory. See the README's "Testing plugins" section."""

    def __init__(self, wasm: bytes | bytearray | str | Path, plugin_config: bytes | str = b"",
                 vm_config: bytes | str = b"", root_id: str = "",
                 properties: dict[str, object] | None = None,
                 env: dict[str, str] | None = None, *, name: str = "", vm_id: str = "",
                 log_level: LogLevel | str = LogLevel.DEBUG, limits: Limits | None = None,
                 fail_open: bool = False, upstreams: set[str] | None = None) -> None:
        super().__init__()
        self.module = _load(wasm)
        self.config = PluginConfig(
            name=name, root_id=root_id, vm_id=vm_id, configuration=to_bytes(plugin_config),
            vm_configuration=to_bytes(vm_config), env=dict(env or {}),
            log_level=LogLevel.parse(log_level), limits=limits or Limits(),
            properties=dict(properties or {}))
        self.fail_open = fail_open
        self.upstreams = upstreams
        self.records: list[LogRecord] = []
        self.http_calls: dict[int, HttpCallRequest] = {}
        self.grpc_calls: dict[int, GrpcCallRequest] = {}
        self.redis_calls: dict[int, RedisCallRequest] = {}
        self.redis_inits: list[RedisInitRequest] = []
        self.tick_period_ms = 0
        self.crashes: list[PluginTrap] = []
        self.plugin = Plugin(self.module, self.config, self)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> Emulator:
        """Start the VM and configure the plugin; raise EmulatorError with its logs if not."""
        try:
            self.plugin.start()
        except ModuleLoadError:
            raise  # the plugin never ran: nothing to add
        except RuntimeFailure as exc:
            logs = "\n".join(f"  [{r.level.name.lower()}] {r.message}" for r in self.records)
            raise EmulatorError(f"{exc}\nplugin logs:\n{logs or '  (none)'}") from exc
        return self

    def close(self) -> None:
        self.plugin.close()

    def shutdown(self) -> bool:
        """What a gateway does when the plugin is replaced or removed: on_done, then on_delete
        and the VM freed (True). If on_done returns false (the plugin flushes something first),
        False: the VM stays, its calls can still be answered (`respond_http_call`), and it ends
        when the plugin calls proxy_done (see `finished`) or at `close()`."""
        return self.plugin.finish()

    @property
    def finished(self) -> bool:
        """The plugin is closed (after `shutdown`, or `close`)."""
        return self.plugin.vm is None

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()

    def http_context(self, attributes: dict[str, object] | None = None) -> EmulatedStream:
        return EmulatedStream(self, attributes or {})

    # -- Host: what the plugin does to the world --------------------------------------------
    def log(self, plugin: Plugin, level: LogLevel, message: str) -> None:
        self.records.append(LogRecord(level, message))

    def set_tick_period(self, plugin: Plugin, period_ms: int) -> None:
        self.tick_period_ms = period_ms

    def stop_plugin(self, plugin: Plugin) -> None:
        """The VM goes away (restart): its tick stops and its pending calls are cancelled, as
        Envoy cancels them (the fresh VM reuses their tokens)."""
        self.tick_period_ms = 0
        self.http_calls.clear()
        self.grpc_calls.clear()
        self.redis_calls.clear()

    def _known(self, upstream: str) -> bool:
        return self.upstreams is None or upstream in self.upstreams

    def http_call(self, plugin: Plugin, request: HttpCallRequest) -> None:
        if not self._known(request.upstream):
            super().http_call(plugin, request)
        self.http_calls[request.token] = request

    def grpc_call(self, plugin: Plugin, request: GrpcCallRequest) -> None:
        service = request.service.decode("utf-8", "replace")
        if not self._known(service):
            super().grpc_call(plugin, request)
        self.grpc_calls[request.token] = request

    def grpc_send(self, plugin: Plugin, token: int, message: bytes, end_stream: bool) -> None:
        if token in self.grpc_calls:
            self.grpc_calls[token].sent.append((message, end_stream))

    def grpc_cancel(self, plugin: Plugin, token: int) -> None:
        self.grpc_calls.pop(token, None)

    def redis_init(self, plugin: Plugin, request: RedisInitRequest) -> None:
        if not self._known(request.cluster.split("?", 1)[0]):
            super().redis_init(plugin, request)
        self.redis_inits.append(request)

    def redis_call(self, plugin: Plugin, request: RedisCallRequest) -> None:
        if not self._known(request.cluster.split("?", 1)[0]):
            super().redis_call(plugin, request)
        self.redis_calls[request.token] = request

    def queue_ready(self, plugin: object, token: int) -> None:
        if isinstance(plugin, Plugin) and plugin.vm is not None:
            target = plugin
            plugin.vm.defer(lambda: self._guard(lambda: target.deliver_queue_ready(token)))

    # -- test-side controls ------------------------------------------------------------------
    def logs(self, level: LogLevel | str | None = None) -> list[str]:
        """Messages the plugin logged, all or at exactly `level`."""
        wanted = None if level is None else LogLevel.parse(level)
        return [r.message for r in self.records if wanted is None or r.level == wanted]

    def tick(self) -> None:
        self._guard(self.plugin.tick)

    def pending_http_calls(self) -> list[HttpCallRequest]:
        return list(self.http_calls.values())

    def respond_http_call(self, token: int, headers: object = None, body: bytes | str = b"",
                          trailers: object = None) -> None:
        self.http_calls.pop(token)
        self._guard(lambda: self.plugin.deliver_http_call_response(
            token, normalize_headers(headers or [(":status", "200")]), to_bytes(body), trailers))

    def fail_http_call(self, token: int) -> None:
        """A reset after the response headers: the plugin sees (0 headers) and get_status =
        (11, "reset"). (Envoy answers a timeout or a refused connection itself, with a 504 /
        503 response: give those with `respond_http_call`.)"""
        self.http_calls.pop(token)
        self._guard(lambda: self.plugin.deliver_http_call_failure(token))

    def pending_grpc_calls(self) -> list[GrpcCallRequest]:
        return list(self.grpc_calls.values())

    def respond_grpc_call(self, token: int, message: bytes = b"", status: int = 0,
                          initial_metadata: object = None, trailing_metadata: object = None,
                          ) -> None:
        """Answer a gRPC call or stream as Envoy delivers it.

        Unary call: success delivers only the response message (`proxy_on_grpc_receive`),
        failure (status != 0) only `proxy_on_grpc_close`. Stream: initial metadata, the message
        (if any), and, when `status` is non-zero or trailing metadata is given, trailing
        metadata then close; otherwise the stream stays open for more."""
        request = self.grpc_calls.pop(token)
        plugin = self.plugin
        if not request.streaming:
            if status == 0:
                plugin.vm.grpc_tokens.discard(token) if plugin.vm else None
                self._guard(lambda: plugin.deliver_grpc_message(token, message))
            else:
                self._guard(lambda: plugin.deliver_grpc_close(token, status))
            return
        self._guard(lambda: plugin.deliver_grpc_initial_metadata(token, initial_metadata or []))
        if message:
            self._guard(lambda: plugin.deliver_grpc_message(token, message))
        if status == 0 and not trailing_metadata:
            self.grpc_calls[token] = request  # a stream stays open until closed
            return
        self._guard(lambda: plugin.deliver_grpc_trailing_metadata(token, trailing_metadata or []))
        self._guard(lambda: plugin.deliver_grpc_close(token, status))

    def pending_redis_calls(self) -> list[RedisCallRequest]:
        return list(self.redis_calls.values())

    def respond_redis_call(self, token: int, response: bytes, status: int = 0) -> None:
        self.redis_calls.pop(token)
        self._guard(lambda: self.plugin.deliver_redis_response(token, status, response))

    def metrics(self) -> dict[str, int]:
        """Plugin-defined metrics by name (histograms: their sample count)."""
        return self.metric_store.values()

    @property
    def shared_data(self) -> dict[bytes, bytes]:
        return self.shared_data_store.snapshot(self.config.vm_id)

    def queue_items(self, name: str) -> list[bytes]:
        token = self.queue_store.resolve(self.config.vm_id, name)
        return self.queue_store.items(token) if token is not None else []

    def enqueue(self, name: str, data: bytes | str) -> None:
        """Put an item on a queue the plugin registered; it gets on_queue_ready."""
        token = self.queue_store.resolve(self.config.vm_id, name)
        if token is None:
            raise KeyError(f"no shared queue named {name!r}")
        self.queue_store.enqueue(token, to_bytes(data), self.queue_ready)

    def set_property(self, path: str, value: object) -> None:
        """Set a property the plugin reads (dotted path, e.g. "xds.route_name")."""
        self.plugin.properties[path] = value

    def set_log_level(self, level: LogLevel | str) -> None:
        self.plugin.set_log_level(level)

    def call_foreign_function(self, function_id: int, args: bytes) -> None:
        self._guard(lambda: self.plugin.call_foreign_function(function_id, args))

    def restart(self) -> None:
        """A fresh VM from the same module (what FAIL_RELOAD does)."""
        self.plugin.restart()

    @property
    def failed(self) -> bool:
        return self.plugin.failed

    def _guard(self, action: object) -> None:
        """Run a delivery; a trap is recorded (the plugin is marked failed) and re-raised."""
        try:
            action()  # type: ignore[operator]
        except PluginTrap as trap:
            self.crashes.append(trap)
            raise


class EmulatedStream:
    """One HTTP stream through the plugin. A trap applies the emulator's fail policy:
    fail closed = local reply 503 `wasm_fail_stream`; fail open = continue."""

    def __init__(self, emulator: Emulator, attributes: dict[str, object]) -> None:
        self.emulator = emulator
        self._failed_response: LocalResponse | None = None
        self.context: HttpContext | None = None
        if emulator.plugin.failed:
            self._failed_response = None if emulator.fail_open else FAIL_STREAM
        else:
            self.context = emulator.plugin.new_http_context(attributes)

    def _run(self, method: str, *args: object) -> Action:
        if self.context is None or self.emulator.plugin.failed:
            return self._fail_action()
        try:
            return getattr(self.context, method)(*args)  # type: ignore[no-any-return]
        except (PluginTrap, PluginFailed) as exc:
            if isinstance(exc, PluginTrap):
                self.emulator.crashes.append(exc)
            if not self.emulator.fail_open:
                self._failed_response = FAIL_STREAM
            return self._fail_action()

    def _fail_action(self) -> Action:
        if self.emulator.fail_open:
            return Action.CONTINUE
        self._failed_response = FAIL_STREAM
        return Action.STOP_ALL_ITERATION_AND_WATERMARK

    def request_headers(self, headers: object, end_of_stream: bool = False) -> Action:
        return self._run("request_headers", headers, end_of_stream)

    def request_body(self, data: bytes | str, end_of_stream: bool = False) -> Action:
        return self._run("request_body", to_bytes(data), end_of_stream)

    def request_trailers(self, trailers: object) -> Action:
        return self._run("request_trailers", trailers)

    def response_headers(self, headers: object, end_of_stream: bool = False) -> Action:
        return self._run("response_headers", headers, end_of_stream)

    def response_body(self, data: bytes | str, end_of_stream: bool = False) -> Action:
        return self._run("response_body", to_bytes(data), end_of_stream)

    def response_trailers(self, trailers: object) -> Action:
        return self._run("response_trailers", trailers)

    def complete(self) -> None:
        """on_log, on_done, on_delete; a trap there is recorded like any other."""
        if self.context is None:
            return
        try:
            self.context.complete()
        except PluginTrap as trap:
            self.emulator.crashes.append(trap)

    # -- views -------------------------------------------------------------------------------
    def _view(self, name: str, default: object) -> object:
        return getattr(self.context, name) if self.context is not None else default

    @property
    def id(self) -> int:
        return self.context.id if self.context is not None else 0

    @property
    def request_headers_now(self) -> Pairs:
        return self._view("request_headers_now", [])  # type: ignore[return-value]

    @property
    def response_headers_now(self) -> Pairs:
        return self._view("response_headers_now", [])  # type: ignore[return-value]

    @property
    def request_trailers_now(self) -> Pairs:
        return self._view("request_trailers_now", [])  # type: ignore[return-value]

    @property
    def response_trailers_now(self) -> Pairs:
        return self._view("response_trailers_now", [])  # type: ignore[return-value]

    @property
    def request_body_now(self) -> bytes:
        return self._view("request_body_now", b"")  # type: ignore[return-value]

    @property
    def response_body_now(self) -> bytes:
        return self._view("response_body_now", b"")  # type: ignore[return-value]

    @property
    def local_response(self) -> LocalResponse | None:
        if self._failed_response is not None:
            return self._failed_response
        return self._view("local_response", None)  # type: ignore[return-value]

    @property
    def closed(self) -> bool:
        return bool(self.context is not None and self.context.state.closed)

    @property
    def request_paused(self) -> bool:
        return bool(self._view("request_paused", False))

    @property
    def response_paused(self) -> bool:
        return bool(self._view("response_paused", False))

    def header(self, name: str, which: str = "request") -> str | None:
        """First value of a header in the current request (or response) headers."""
        pairs = self.request_headers_now if which == "request" else self.response_headers_now
        key = name.lower().encode()
        return next((v.decode("latin-1") for k, v in pairs if k == key), None)


_modules: dict[str, PluginModule] = {}


def _load(wasm: bytes | bytearray | str | Path) -> PluginModule:
    """Compile each distinct module once per process (tests create many emulators)."""
    data = bytes(wasm) if isinstance(wasm, bytes | bytearray) else Path(wasm).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    module = _modules.get(digest)
    if module is None:
        source = "<bytes>" if isinstance(wasm, bytes | bytearray) else str(wasm)
        module = _modules[digest] = PluginModule(data, source=source)
    return module
