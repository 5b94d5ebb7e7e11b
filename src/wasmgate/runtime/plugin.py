"""A plugin: one root context on a VM, driven through the lifecycle the reference host uses.

start(): instantiate -> `_initialize` (+ `main`) or `_start` -> on_context_create(root, 0) ->
on_vm_start(root, len(vm_config)) -> on_configure(root, len(plugin_config)). Streams are
`HttpContext`s (see http.py). Results of outbound work come back through `deliver_*`.
A trap marks the plugin failed; `restart()` builds a fresh VM from the same compiled module.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from .abi import FailState, LogLevel
from .contexts import RootContext
from .errors import ConfigurationRejected, PluginStartError, PluginTrap, TrapInfo
from .host import Host
from .http import Attributes, HttpContext
from .module import PluginModule
from .serde import Pairs, normalize_headers
from .vm import Limits, WasmVM

log = logging.getLogger("wasmgate.runtime.plugin")


@dataclass
class PluginConfig:
    """What Envoy's PluginConfig + VmConfig carry, minus the code source."""

    name: str = ""
    root_id: str = ""
    vm_id: str = ""
    configuration: bytes = b""
    vm_configuration: bytes = b""
    env: dict[str, str] = field(default_factory=dict)
    log_level: LogLevel = LogLevel.INFO
    limits: Limits = field(default_factory=Limits)
    properties: dict[str, object] = field(default_factory=dict)
    allow_on_headers_stop_iteration: bool = False


class PluginState(Enum):
    CREATED = "created"
    READY = "ready"
    FAILED = "failed"


class Plugin:
    """A running plugin instance: its VM, root context, and lifecycle."""

    def __init__(self, module: PluginModule, config: PluginConfig | None = None,
                 host: Host | None = None) -> None:
        self.module = module
        self.config = config or PluginConfig()
        self.host = host or Host()
        self.log_level = self.config.log_level
        self.state = PluginState.CREATED
        self.fail_state = FailState.OK
        self.failure: str | None = None
        self.last_trap: TrapInfo | None = None
        self.vm: WasmVM | None = None
        self.root = RootContext(0)
        self.properties: dict[str, object] = dict(self.config.properties)
        self.filter_state: dict[bytes, bytes] = {}  # root-level set_property values
        self.redis_clusters: dict[str, object] = {}
        # Streams begun and not yet completed. An embedder that retires the plugin (a reload)
        # sets `on_idle`, called when the last of them completes: only then may the VM go,
        # as Envoy keeps a replaced VM for as long as a stream holds it.
        self.active_streams = 0
        self.on_idle: Callable[[Plugin], None] | None = None
        self.on_finished: Callable[[Plugin], None] | None = None  # see finish()
        self._done_called = False  # on_done ran (finish): close() calls only on_delete

    # -- identity ----------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.config.name

    @property
    def root_id(self) -> str:
        return self.config.root_id

    @property
    def vm_id(self) -> str:
        return self.config.vm_id

    def log_prefix(self, context_id: int | None = None) -> str:
        """Envoy's ` name root_id vm_id` (empty parts left out) for a stream context, without
        the name for the root context; `context_id` defaults to the running callback's."""
        if context_id is None and self.vm is not None:
            context_id = self.vm.current_context_id or None
        parts = [self.name, self.root_id, self.vm_id]
        if context_id is None or context_id == self.root.id:
            parts = parts[1:]
        return "".join(f" {p}" for p in parts if p)

    # -- logging -----------------------------------------------------------------------------
    def emit_log(self, level: LogLevel, message: str) -> None:
        if level >= self.log_level:
            self.host.log(self, level, message)

    def set_log_level(self, level: LogLevel | str | int) -> None:
        """Change the plugin's log level at run time; TRACE switches the ABI trace on."""
        self.log_level = LogLevel.parse(level)
        if self.vm is not None:
            self.vm.tracer.enabled = self.log_level == LogLevel.TRACE

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Create the VM and run vm_start and configure. Raises on any failure."""
        self.vm = vm = WasmVM(self.module, self, self.config.limits)
        self.state = PluginState.CREATED
        self._done_called = False
        vm.in_vm_start_or_configure = True
        try:
            self._initialize(vm)
            self.root = RootContext(vm.new_context_id())
            vm.contexts[self.root.id] = self.root
            vm.call("proxy_on_context_create", self.root.id, 0, context_id=self.root.id)
            self._vm_start(vm)
            self._configure(vm)
        except PluginTrap as trap:
            self._mark_failed(FailState.START_FAILED, trap.info.fail_message())
            raise PluginStartError(f"plugin {self.describe()} failed to start:\n"
                                   f"{trap.info.fail_message()}") from None
        except (PluginStartError, ConfigurationRejected) as exc:
            self._mark_failed(self.fail_state or FailState.START_FAILED, str(exc))
            raise
        finally:
            vm.in_vm_start_or_configure = False
        self.state = PluginState.READY

    def _initialize(self, vm: WasmVM) -> None:
        if vm.has("_initialize"):
            vm.call("_initialize", context_id=0)
            if vm.has("main") and self.module.func_exports["main"][0] == ("i32", "i32"):
                vm.call("main", 0, 0, context_id=0)
            elif vm.has("__main_void"):
                vm.call("__main_void", context_id=0)
        elif vm.has("_start"):
            vm.call("_start", context_id=0)

    def _vm_start(self, vm: WasmVM) -> None:
        size = len(self.config.vm_configuration)
        if vm.call("proxy_on_vm_start", self.root.id, size, context_id=self.root.id) == 0:
            self.fail_state = FailState.START_FAILED
            raise PluginStartError(f"plugin {self.describe()}: on_vm_start returned false "
                                   "(Failed to start)")

    def _configure(self, vm: WasmVM) -> None:
        size = len(self.config.configuration)
        vm.in_configure = True
        try:
            accepted = vm.call("proxy_on_configure", self.root.id, size, context_id=self.root.id)
        finally:
            vm.in_configure = False
        if accepted == 0:
            self.fail_state = FailState.CONFIGURE_FAILED
            raise ConfigurationRejected(f"plugin {self.describe()}: on_configure returned "
                                        "false (configuration rejected)")

    def restart(self) -> None:
        """A fresh VM from the same compiled module (FAIL_RELOAD), started again. The host
        first stops the old VM's outbound work (tick, calls): its tokens are reused by the
        fresh VM."""
        self.host.stop_plugin(self)
        if self.vm is not None:
            self.vm.close()
        self.failure = None
        self.fail_state = FailState.OK
        self.start()

    def on_vm_failed(self, info: TrapInfo) -> None:
        """Called by the VM on any trap: log Envoy's fail message and mark us failed."""
        self.last_trap = info
        self.host.log(self, LogLevel.ERROR, info.fail_message())
        self._mark_failed(FailState.RUNTIME_ERROR, info.fail_message())

    def _mark_failed(self, fail_state: FailState, why: str) -> None:
        self.state = PluginState.FAILED
        if self.fail_state == FailState.OK:
            self.fail_state = fail_state
        self.failure = why

    @property
    def starting(self) -> bool:
        """Inside start() (vm_start, configure): maybe in another thread than the embedder's
        loop, so nothing else may call into the VM now."""
        vm = self.vm
        return vm is not None and vm.in_vm_start_or_configure

    @property
    def failed(self) -> bool:
        return self.state == PluginState.FAILED

    def describe(self) -> str:
        return repr(self.name or self.root_id or self.module.source)

    def finish(self) -> bool:
        """Envoy's shutdown of the root context (the plugin was replaced or removed): on_done,
        then on_delete and the VM freed. If on_done returns false the plugin has work to end
        first (a flush over an http_call, say): the VM stays, its tick and calls go on, until
        it calls proxy_done (then `on_finished` is called) or the embedder gives up and calls
        `close()`. True if the plugin is closed now."""
        vm = self.vm
        if vm is None:
            return True
        if self.failed or vm.failed is not None or self._done_called:
            self.close()
            return True
        self._done_called = True
        root = self.root
        try:
            done = vm.call("proxy_on_done", root.id, context_id=root.id)
        except PluginTrap:
            self.close()
            return True
        if done == 0 and self.vm is vm:  # (None: no on_done export)
            root.done_pending = True
            return False
        self.close()
        return True

    def proxy_done(self) -> None:
        """The plugin called proxy_done after a false on_done (applied after its call)."""
        self.close()
        if self.on_finished is not None:
            self.on_finished(self)

    def close(self) -> None:
        """Run on_done (unless `finish` did) and on_delete for the root context, and free
        the VM. Idempotent."""
        vm, self.vm = self.vm, None
        if vm is None:
            return
        self.root.done_pending = False
        if not self.failed and vm.failed is None:
            try:
                if not self._done_called:
                    vm.call("proxy_on_done", self.root.id, context_id=self.root.id)
                vm.call("proxy_on_delete", self.root.id, context_id=self.root.id)
            except PluginTrap:
                pass
        vm.close()

    # -- streams -----------------------------------------------------------------------------
    def new_http_context(self, attributes: Attributes | None = None,
                         filter_state: dict[bytes, bytes] | None = None) -> HttpContext:
        """A stream; `attributes` is a dict or a function returning one (called when a
        plugin first reads an attribute). `filter_state`: the stream's filter state when
        other plugins share the stream (Envoy has one per stream, not one per filter)."""
        return HttpContext(self, attributes or {}, filter_state)

    # -- deliveries from the embedder --------------------------------------------------------
    def _vm(self) -> WasmVM:
        if self.vm is None:
            raise PluginStartError(f"plugin {self.describe()} is not started")
        return self.vm

    def tick(self) -> None:
        self._vm().call("proxy_on_tick", self.root.id, context_id=self.root.id)

    def deliver_http_call_response(self, token: int, headers: object, body: bytes = b"",
                                   trailers: object = None) -> None:
        root = self.root
        root.call_headers.open(normalize_headers(headers))
        root.call_trailers.open(normalize_headers(trailers))
        root.call_body = bytes(body)
        root.status = (0, b"")
        try:
            self._vm().call("proxy_on_http_call_response", root.id, token,
                            len(root.call_headers.pairs or []), len(body),
                            len(root.call_trailers.pairs or []), context_id=root.id)
        finally:
            root.call_headers = type(root.call_headers)()
            root.call_trailers = type(root.call_trailers)()
            root.call_body = None

    def deliver_http_call_failure(self, token: int, message: bytes = b"reset") -> None:
        """A reset after the response headers (Envoy's onFailure): (root, token, 0, 0, 0) and
        get_status = (11, msg). Timeouts and connect failures are router replies (503/504)."""
        self.root.status = (11, message)
        self._vm().call("proxy_on_http_call_response", self.root.id, token, 0, 0, 0,
                        context_id=self.root.id)

    def deliver_redis_response(self, token: int, status: int, response: bytes = b"") -> None:
        root = self.root
        root.redis_response = bytes(response) if status == 0 else None
        root.status = (0, b"") if status == 0 else (11, b"reset")
        try:
            self._vm().call("proxy_on_redis_call_response", root.id, token, status,
                            len(response) if status == 0 else 0, context_id=root.id)
        finally:
            root.redis_response = None

    def deliver_queue_ready(self, token: int) -> None:
        self._vm().call("proxy_on_queue_ready", self.root.id, token, context_id=self.root.id)

    def deliver_grpc_initial_metadata(self, token: int, metadata: object) -> None:
        root = self.root
        root.grpc_initial.open(normalize_headers(metadata))
        try:
            self._vm().call("proxy_on_grpc_receive_initial_metadata", root.id, token,
                            len(root.grpc_initial.pairs or []), context_id=root.id)
        finally:
            root.grpc_initial.close()

    def deliver_grpc_message(self, token: int, message: bytes) -> None:
        root = self.root
        root.grpc_message = bytes(message)
        try:
            self._vm().call("proxy_on_grpc_receive", root.id, token, len(message),
                            context_id=root.id)
        finally:
            root.grpc_message = None

    def deliver_grpc_trailing_metadata(self, token: int, metadata: object) -> None:
        root = self.root
        root.grpc_trailing.open(normalize_headers(metadata))
        try:
            self._vm().call("proxy_on_grpc_receive_trailing_metadata", root.id, token,
                            len(root.grpc_trailing.pairs or []), context_id=root.id)
        finally:
            root.grpc_trailing.close()

    def deliver_grpc_close(self, token: int, status: int, message: bytes = b"") -> None:
        self.root.status = (status, message)
        self._vm().grpc_tokens.discard(token)
        self._vm().call("proxy_on_grpc_close", self.root.id, token, status,
                        context_id=self.root.id)

    def call_foreign_function(self, function_id: int, args: bytes) -> None:
        """The host calls into the plugin's `proxy_on_foreign_function` (args in CallData)."""
        self.root.call_data = bytes(args)
        try:
            self._vm().call("proxy_on_foreign_function", self.root.id, function_id, len(args),
                            context_id=self.root.id)
        finally:
            self.root.call_data = None

    def header_pairs(self, value: object) -> Pairs:
        return normalize_headers(value)

    def memory_bytes(self) -> int:
        return self.vm.memory_bytes() if self.vm is not None else 0

    def __repr__(self) -> str:
        return f"<Plugin {self.describe()} {self.state.value} abi={self.module.abi}>"
