"""The embedder interface: what the runtime needs from the world around it.

The runtime never does I/O. When a plugin asks for the outside world (an http_call, a gRPC or
Redis call, a tick period, a log line), the runtime calls a method of the `Host` it was given;
the embedder (the gateway, the ASGI middleware, the emulator) does the work and later delivers
the result back with `Plugin.deliver_*`. `Host` itself is a complete in-memory default: calls
are recorded as pending, logs go to Python logging, and shared data, queues and metrics live in
process-wide stores that an embedder can replace (for example, shared across workers).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .abi import LogLevel
from .metrics import MetricStore
from .serde import Pairs
from .shared import SharedDataStore, SharedQueueStore

if TYPE_CHECKING:
    from .plugin import Plugin

_PY_LEVELS = {LogLevel.TRACE: 5, LogLevel.DEBUG: logging.DEBUG, LogLevel.INFO: logging.INFO,
              LogLevel.WARN: logging.WARNING, LogLevel.ERROR: logging.ERROR,
              LogLevel.CRITICAL: logging.CRITICAL}


def python_level(level: LogLevel) -> int:
    return _PY_LEVELS[level]


@dataclass
class HttpCallRequest:
    """A plugin's `proxy_http_call`; the response goes to `Plugin.deliver_http_call_response`."""

    token: int
    upstream: str
    headers: Pairs
    body: bytes
    trailers: Pairs
    timeout_ms: int
    context_id: int  # the context that issued it (the SDKs route the reply to it)

    def header(self, name: str) -> str | None:
        key = name.encode()
        for k, v in self.headers:
            if k == key:
                return v.decode("latin-1")
        return None


@dataclass
class GrpcCallRequest:
    token: int
    service: bytes  # serialized GrpcService proto or a bare cluster name
    service_name: str
    method: str
    initial_metadata: Pairs
    message: bytes | None  # None for a stream
    timeout_ms: int
    context_id: int
    streaming: bool = False
    sent: list[tuple[bytes, bool]] = field(default_factory=list)


@dataclass
class RedisInitRequest:
    cluster: str
    username: str
    password: str
    timeout_ms: int


@dataclass
class RedisCallRequest:
    token: int
    cluster: str
    query: bytes  # a complete RESP command, sent as-is
    context_id: int


class UnknownUpstream(Exception):
    """The embedder does not know the named cluster: the plugin gets BAD_ARGUMENT."""


ForeignFunction = Callable[["Plugin", bytes], bytes | None]


class Host:
    """Default embedder: in-memory stores, pending call lists, logs to Python logging."""

    def __init__(self, *, shared_data: SharedDataStore | None = None,
                 queues: SharedQueueStore | None = None,
                 metrics: MetricStore | None = None) -> None:
        self.shared_data_store = shared_data if shared_data is not None else SharedDataStore()
        self.queue_store = queues if queues is not None else SharedQueueStore()
        self.metric_store = metrics if metrics is not None else MetricStore()
        self.foreign_functions: dict[str, ForeignFunction] = {}
        self.logger = logging.getLogger("wasmgate.wasm")

    # -- logging ---------------------------------------------------------------------------
    def log(self, plugin: Plugin, level: LogLevel, message: str) -> None:
        self.logger.log(python_level(level), "wasm log%s: %s", plugin.log_prefix(), message)

    # -- time --------------------------------------------------------------------------------
    def now_ns(self) -> int:
        return time.time_ns()

    def monotonic_ns(self) -> int:
        return time.monotonic_ns()

    # -- outbound work (override in embedders) ---------------------------------------------
    def stop_plugin(self, plugin: Plugin) -> None:
        """The plugin's VM is going away (close, or `Plugin.restart` on a fresh VM): stop its
        tick and cancel its outbound calls; nothing of that VM's may be delivered later (as
        Envoy cancels a destroyed context's calls)."""

    def set_tick_period(self, plugin: Plugin, period_ms: int) -> None:
        """The plugin wants `on_tick` every `period_ms` (0 = stop)."""

    def http_call(self, plugin: Plugin, request: HttpCallRequest) -> None:
        """Send it; raise UnknownUpstream for an unknown cluster."""
        raise UnknownUpstream(request.upstream)

    def grpc_call(self, plugin: Plugin, request: GrpcCallRequest) -> None:
        raise UnknownUpstream(request.service_name)

    def grpc_send(self, plugin: Plugin, token: int, message: bytes, end_stream: bool) -> None:
        """More data on an open gRPC stream."""

    def grpc_cancel(self, plugin: Plugin, token: int) -> None:
        """Abandon the call; no further callbacks."""

    def grpc_close(self, plugin: Plugin, token: int) -> None:
        """Half-close the stream."""

    def redis_init(self, plugin: Plugin, request: RedisInitRequest) -> None:
        raise UnknownUpstream(request.cluster)

    def redis_call(self, plugin: Plugin, request: RedisCallRequest) -> None:
        raise UnknownUpstream(request.cluster)

    def queue_ready(self, plugin: Plugin, token: int) -> None:
        """An item was enqueued on a queue `plugin` registered: deliver `on_queue_ready` soon
        (not from inside the current callback)."""

    def property(self, plugin: Plugin, context_id: int, path: list[bytes]) -> bytes | None:
        """Attributes only the embedder knows (connection, upstream...); None = not found."""
        return None

    def inject_encoded_data(self, plugin: Plugin, context_id: int, body: bytes,
                            end_stream: bool) -> bool:
        """Higress: inject body data into the filter chain; False = not supported here."""
        return False

    def upstream_hosts(self, plugin: Plugin) -> Pairs:
        return []

    def set_upstream_override_host(self, plugin: Plugin, context_id: int, host: bytes) -> bool:
        return False
