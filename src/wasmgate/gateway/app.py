"""The gateway process: configuration -> plugins and routes -> listener + admin, hot reload,
graceful shutdown.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import signal
from multiprocessing.connection import Connection
from pathlib import Path

from pydantic import ValidationError

from ..api.access_log import parse_json_format
from ..api.gateway import Gateway, GatewayMeta, GatewaySpec, redact_url
from ..api.loading import LoadResult, config_files, load_paths
from ..api.ordering import select_for_gateway, why_not_selected
from ..chain import FilterChain
from ..fetch.cache import ModuleCache
from ..fetch.fetcher import ModuleFetcher
from ..runtime.abi import LogLevel
from ..runtime.metrics import MetricStore
from ..runtime.plugin import Plugin
from ..runtime.shared import SharedDataStore, SharedQueueStore
from ..runtime.vm import Limits
from .access_log import AccessLog, AccessLogFormat, AccessLogWriter, Relay
from .admin import AdminServer
from .host import GatewayHost
from .plugins import ManagedSlot, PluginManager, local_module
from .proxy import ProxyState, Router
from .server import DownstreamProtocol
from .shared_queues import ProcessSharedQueues
from .stats import GatewayStats
from .upstream import UpstreamPools

log = logging.getLogger("wasmgate.gateway")
_SECRET = re.compile(r"secret|password|passwd|token|credential|api[-_]?key", re.IGNORECASE)


class ConfigInvalid(Exception):
    """The configuration cannot be used (the message lists every error)."""


class GatewayApp:
    def __init__(self, config_paths: list[Path], *, listen: tuple[str, int] | None = None,
                 admin: tuple[str, int] | None = None, upstream: str | None = None,
                 drain_seconds: float = 10.0, reload_interval: float = 1.0,
                 reuse_port: bool = False, cache_dir: Path | None = None,
                 plugin_log_level: str = "info", ca_file: str | None = None,
                 shared_data: SharedDataStore | None = None,
                 shared_queues: SharedQueueStore | None = None,
                 metric_store: MetricStore | None = None, worker: int | None = None,
                 access_log: bool | None = None, access_log_format: str | None = None,
                 access_relay: Connection | None = None) -> None:
        """`access_log`: True / False override the Gateway document's ``spec.accessLog``
        (None: as it says); `access_log_format` (an Envoy text format) implies True."""
        self.ca_file = ca_file
        # plugin metrics: one set across --workers (shared_metrics.py); `worker` is this
        # process's index there (worker 0's admin gathers the others' stats: admin.py)
        self.metric_store = metric_store
        self.worker = worker
        # one store across --workers (shared_store.py, shared_queues.py)
        self.shared_data = shared_data
        self.shared_queues = shared_queues
        self.config_paths = config_paths
        self.overrides = {"listen": listen, "admin": admin, "upstream": upstream}
        self.access_log_override = True if access_log_format else access_log
        self.access_log_format = access_log_format
        self._access_writers: dict[str, AccessLogWriter] = {}  # by path, kept across reloads
        self._retired_writers: set[AccessLogWriter] = set()  # dropped, closed when unused
        # --workers: the parent writes the lines for stdout (a pipe): access_log.Relay
        self.access_relay = Relay(access_relay) if access_relay is not None else None
        self.drain_seconds = drain_seconds
        self.cache_dir = cache_dir
        self.plugin_log_level = LogLevel.parse(plugin_log_level)
        self.reload_interval = reload_interval
        self.reuse_port = reuse_port
        self.pools = UpstreamPools()
        self.stats = GatewayStats()
        self.connections: set[DownstreamProtocol] = set()
        self.config_errors: list[str] = []
        self.gateway: Gateway | None = None
        self.state: ProxyState | None = None
        self.server: asyncio.AbstractServer | None = None
        self.admin = AdminServer(self)
        self._ids = itertools.count(1)
        self._mtimes: dict[Path, float] = {}
        self._watcher: asyncio.Task[None] | None = None
        self._generation = 0
        self._invalid_plugins: set[str] = set()  # namespace/name of WasmPlugins that failed
        self._stopping = asyncio.Event()
        # How long a retired plugin whose on_done returned false may take to call proxy_done
        # (PluginManager.retire).
        self.done_timeout = 30.0
        self._gateway_documented = False  # the files had a Gateway document at the last load
        self.plugins: PluginManager = None  # type: ignore[assignment]

    # -- configuration -----------------------------------------------------------------------
    def _load(self, *, reloading: bool = False) -> tuple[Gateway, list[object]]:
        result = load_config(self.config_paths)
        if reloading and self._gateway_documented and not result.gateways:
            # An emptied or moved file (an editor's save caught half-way): the default Gateway
            # would drop every route, and every plugin a selector chose (an auth plugin too).
            raise ConfigInvalid("the Gateway document is gone from the configuration; "
                                "a running gateway keeps its routes and plugins")
        errors = [str(e) for e in result.errors]
        self._invalid_plugins = {e.name for e in result.errors
                                 if e.kind == "WasmPlugin" and e.name}
        self.config_errors = errors
        for error in errors:
            log.error("config: %s", error)
        self._gateway_documented = bool(result.gateways)
        gateway = result.gateways[0] if result.gateways else Gateway(
            metadata=GatewayMeta(name="default"))
        return self._apply_overrides(gateway), list(result.plugins)

    @staticmethod
    def _keep_addresses(new: Gateway, running: Gateway) -> Gateway:
        """The sockets stay where they are until a restart: say so, and keep /config_dump
        showing where the gateway really listens."""
        changed = {}
        for field in ("listen", "admin"):
            was, now = getattr(running.spec, field), getattr(new.spec, field)
            if now != was:
                log.warning("spec.%s changed to %s:%d: it takes effect at restart; still on "
                            "%s:%d", field, now.host, now.port, was.host, was.port)
                changed[field] = was
        if not changed:
            return new
        return new.model_copy(update={"spec": new.spec.model_copy(update=changed)})

    def check_config(self) -> Gateway:
        """The Gateway as `start` would load it (CLI flags applied); raises ConfigInvalid."""
        return self._load()[0]

    def _apply_overrides(self, gateway: Gateway) -> Gateway:
        """CLI flags win over the Gateway document; the result is validated again."""
        data = gateway.spec.model_dump(mode="json", by_alias=True, exclude_none=True)
        if self.overrides["listen"]:
            data["listen"] = _address(self.overrides["listen"])  # type: ignore[arg-type]
        if self.overrides["admin"]:
            data["admin"] = _address(self.overrides["admin"])  # type: ignore[arg-type]
        upstream = self.overrides["upstream"]
        if upstream:
            data["clusters"] = [c for c in data.get("clusters", []) if c["name"] != "default"]
            data["clusters"].append({"name": "default", "endpoints": [str(upstream)]})
            data["routes"] = [{"name": "default", "cluster": "default"},
                              *[r for r in data.get("routes", []) if r["name"] != "default"]]
        if self.access_log_override is False:
            data.pop("accessLog", None)
        elif self.access_log_override:
            access = data.setdefault("accessLog", {})
            if self.access_log_format:
                access.pop("jsonFormat", None)
                access["format"] = self.access_log_format
        try:
            spec = GatewaySpec.model_validate(data)
        except ValidationError as exc:  # (the document itself was valid: a flag is not)
            raise ConfigInvalid("\n".join(
                f"{_FLAG_OF.get(str(e['loc'][0]) if e['loc'] else '', 'spec')}: {e['msg']}"
                for e in exc.errors())) from None
        return gateway.model_copy(update={"spec": spec})

    def _select(self, gateway: Gateway, plugins: list[object]) -> list[object]:
        chosen = list(select_for_gateway(plugins, gateway))  # type: ignore[arg-type]
        ids = {id(p) for p in chosen}
        for plugin in plugins:
            if id(plugin) not in ids:
                log.warning("WasmPlugin %s/%s not selected: %s",
                            plugin.namespace, plugin.name,  # type: ignore[attr-defined]
                            why_not_selected(plugin, gateway))  # type: ignore[arg-type]
        return chosen

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        gateway, resources = self._load()
        self.gateway = gateway
        if not gateway.spec.routes:
            log.warning("no routes (no Gateway document with routes, no --upstream): every "
                        "request gets 404")
        router = Router(gateway.spec)
        host = GatewayHost(loop, self.pools, router.resolve,
                           shared_data=self._shared_data_for(gateway), queues=self.shared_queues,
                           metrics=self.metric_store)
        if isinstance(self.shared_queues, ProcessSharedQueues):
            self.shared_queues.listen(loop, host.queue_ready)
        host.resolve_redis = gateway.resolve_redis
        limits = _limits(gateway.spec)
        fetcher = ModuleFetcher(ModuleCache(self.cache_dir) if self.cache_dir else None)
        self.plugins = PluginManager(host, limits=limits, fetcher=fetcher,
                                     log_level=self.plugin_log_level, ca_file=self.ca_file,
                                     done_timeout=self.done_timeout)
        self._purger = loop.create_task(self._purge_periodically())
        managed = self.plugins.prepare(self._select(gateway, resources))  # type: ignore[arg-type]
        self.plugins.install(managed)
        self._swap(router, managed, self._access_log(gateway.spec))
        listen = gateway.spec.listen
        self.server = await loop.create_server(self._protocol, listen.host, listen.port,
                                               reuse_port=self.reuse_port or None, backlog=1024)
        admin = gateway.spec.admin
        await self.admin.start(admin.host, admin.port)
        self._remember_mtimes()
        if self.reload_interval > 0:
            self._watcher = loop.create_task(self._watch())
        log.info("listening on %s:%d, admin on %s:%d, %d plugin(s)", listen.host, self.port,
                 admin.host, self.admin.port, len(managed))

    def _shared_data_for(self, gateway: Gateway) -> SharedDataStore | None:
        """``spec.sharedData`` (a Redis shared by gateway replicas; each --workers process
        connects itself) wins over the store this process was given (per worker or mmap'd)."""
        url = gateway.spec.shared_data
        if url is None:
            return self.shared_data
        try:
            from .redis_shared import RedisSharedData
        except ImportError as exc:
            raise ConfigInvalid(f"spec.sharedData needs the redis client "
                                f"(pip install 'wasmgate[redis]'): {exc}") from exc
        self._redis_shared = RedisSharedData(url)  # never raises for an unreachable Redis
        return self._redis_shared

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    def _protocol(self) -> DownstreamProtocol:
        protocol = DownstreamProtocol(lambda: self.state, next(self._ids),  # type: ignore
                                      self.connections.discard)
        self.connections.add(protocol)
        return protocol

    def _swap(self, router: Router, managed: list[ManagedSlot],
              access_log: AccessLog | None) -> None:
        self._generation += 1
        chain = FilterChain([m.slot for m in managed],
                            buffer_limit=self.gateway.spec.body_buffer_limit_bytes)  # type: ignore
        spec = self.gateway.spec  # type: ignore[union-attr]
        self.state = ProxyState(router, chain if managed else None, self.pools, self.stats,
                                self._generation, access_log,
                                spec.request_headers_timeout_ms / 1000,
                                spec.idle_timeout_ms / 1000)

    def _access_log(self, spec: GatewaySpec) -> AccessLog | None:
        """The access log ``spec.accessLog`` asks for; a writer is kept per path, so a reload
        changes the format without reopening (or losing lines buffered for) the file."""
        config = spec.access_log
        if config is None:
            return None
        writer = self._access_writers.get(config.path)
        if writer is None:
            try:
                writer = AccessLogWriter(config.path, self.access_relay, self._count_dropped)
            except OSError as exc:
                raise ConfigInvalid(f"spec.accessLog.path: cannot open {config.path}: "
                                    f"{exc.strerror or exc}") from None
            self._access_writers[config.path] = writer
        json_format = (parse_json_format(config.json_format) if config.json_format is not None
                       else None)
        return AccessLog(AccessLogFormat(config.format, json_format), writer)

    async def reload(self) -> bool:
        """Rebuild from the config files; the old config stays if anything is invalid."""
        try:
            gateway, resources = self._load(reloading=True)
            access_log = self._access_log(gateway.spec)
        except Exception as exc:
            self.stats.reload_failures += 1
            self.config_errors = [str(exc)]
            log.error("reload refused, keeping the running configuration:\n%s", exc)
            return False
        router = Router(gateway.spec)
        self.plugins.host.resolve = router.resolve
        self.plugins.host.resolve_redis = gateway.resolve_redis
        if self.gateway is not None and gateway.spec.shared_data != self.gateway.spec.shared_data:
            log.warning("spec.sharedData changed: it takes effect at restart; plugins keep "
                        "the shared data store they started with")
        if self.gateway is not None:
            gateway = self._keep_addresses(gateway, self.gateway)
        resources += self._still_running(resources)
        candidates = self.plugins.prepare(self._select(gateway, resources))  # type: ignore
        await self.plugins.settle(candidates, timeout=120)
        chosen = self.plugins.commit(candidates)
        retired = self.plugins.install(chosen)
        self.gateway = gateway
        self._swap(router, chosen, access_log)
        self.stats.reloads += 1
        for plugin in retired:
            self.plugins.retire(plugin)
        self._retired_writers = {w for w in self._retired_writers if not w.closing}
        in_use = {gateway.spec.access_log.path} if gateway.spec.access_log else set()
        for path in [p for p in self._access_writers if p not in in_use]:
            # a path the configuration dropped: closed once the requests still using it end
            writer = self._access_writers.pop(path)
            self._retired_writers.add(writer)
            writer.retire()
        self._mtimes = self._watched()  # (the modules of the plugins now in use)
        log.info("configuration reloaded (generation %d, %d plugin(s))", self._generation,
                 len(chosen))
        return True

    def _still_running(self, resources: list[object]) -> list[object]:
        """Running plugins whose document is now invalid keep running in their last valid
        version (as Istio's API server keeps the stored object when an update is rejected),
        rather than silently leaving the chain: that could open a route an auth plugin
        guarded."""
        present = {f"{r.namespace}/{r.name}" for r in resources}  # type: ignore[attr-defined]
        kept = []
        for managed in self.plugins.managed.values():
            key = f"{managed.resource.namespace}/{managed.resource.name}"
            if key in self._invalid_plugins and key not in present:
                log.warning("WasmPlugin %s is invalid now: its running version stays", key)
                kept.append(managed.resource)
        return kept

    def _watched(self) -> dict[Path, float]:
        """The config files' and the `file://` modules' modification times: a changed
        document or a rebuilt module reloads."""
        found = _mtimes(self.config_paths)
        for managed in self.plugins.managed.values() if self.plugins is not None else ():
            path = local_module(managed.resource)
            if path is not None:
                try:
                    found[Path(path)] = os.stat(path).st_mtime
                except OSError:
                    continue
        return found

    def _remember_mtimes(self) -> None:
        self._mtimes = self._watched()

    async def _watch(self) -> None:
        while not self._stopping.is_set():
            await asyncio.sleep(self.reload_interval)
            current = self._watched()
            if current != self._mtimes:
                self._mtimes = current
                await self.reload()

    async def _purge_periodically(self) -> None:
        """Expire modules unused for WASM_MODULE_EXPIRY, every WASM_PURGE_INTERVAL (1 h)."""
        interval = float(os.environ.get("WASM_PURGE_INTERVAL_SECONDS", 3600))
        while not self._stopping.is_set():
            await asyncio.sleep(interval)
            try:
                removed = await asyncio.get_running_loop().run_in_executor(
                    None, self.plugins.fetcher.purge)
            except OSError as exc:
                log.warning("module cache purge failed: %s", exc)
                continue
            if removed:
                log.info("module cache: expired %d unused module(s)", len(removed))

    async def serve_forever(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload()))
        loop.add_signal_handler(signal.SIGUSR1, self.reopen_logs)  # (Envoy's, for logrotate)
        await self._stopping.wait()
        await self.stop()

    def _count_dropped(self, lines: int) -> None:
        self.stats.access_log_dropped += lines  # (also from a writer thread: the GIL's +=)

    def reopen_logs(self) -> list[str]:
        """Reopen every access log file by its path (log rotation); the paths reopened."""
        reopened = []
        for writer in self._retired_writers:  # (dropped paths, still logging their requests)
            if not writer.closing:
                writer.reopen()
        for path, writer in self._access_writers.items():
            writer.reopen()
            if writer.owns_file:
                reopened.append(path)
        log.info("access logs reopened: %s", ", ".join(reopened) or "none (stdout/stderr)")
        return reopened

    def request_stop(self) -> None:
        self._stopping.set()

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (up to drain_seconds), close."""
        self._stopping.set()
        if self._watcher is not None:
            self._watcher.cancel()
        if getattr(self, "_purger", None) is not None:
            self._purger.cancel()
        if self.server is not None:
            self.server.close()
        deadline = asyncio.get_running_loop().time() + self.drain_seconds
        busy = sum(not c.idle for c in self.connections)
        log.info("stopping%s", f": draining {busy} busy connection(s), up to "
                 f"{self.drain_seconds:g} s" if busy else "")
        while any(not c.idle for c in self.connections):
            if asyncio.get_running_loop().time() > deadline:
                log.warning("drain timeout: closing %d busy connection(s)",
                            sum(not c.idle for c in self.connections))
                break
            await asyncio.sleep(0.05)
        for connection in list(self.connections):
            connection.close()
        for _ in range(3):  # their connection_lost (each cut request's access line) first
            await asyncio.sleep(0)
        for writer in [*self._access_writers.values(), *self._retired_writers]:
            writer.close()  # (idempotent: a retired writer may be closed already)
        await self.admin.close()
        self.pools.close()
        if self.plugins is not None:
            self.plugins.host.redis_pools.close()
            if self.plugins.host._grpc is not None:  # channels opened by plugins' gRPC calls
                await self.plugins.host._grpc.aclose()
        if self.plugins is not None:
            _close_plugins([m.slot.plugin for m in self.plugins.managed.values()
                            if m.slot.plugin is not None], self.plugins.host)
            self.plugins.close_draining()
            self.plugins.shutdown()
        if getattr(self, "_redis_shared", None) is not None:
            self._redis_shared.close()

    # -- admin views -------------------------------------------------------------------------
    def plugin_statuses(self) -> list[dict[str, object]]:
        out = []
        for managed in self.plugins.managed.values():
            info = managed.slot.describe()
            plugin = managed.slot.plugin
            info.update({"url": redact_url(managed.resource.resolved_url()),
                         "sha256": managed.sha256,
                         "phase": str(managed.resource.spec.phase),
                         "priority": managed.resource.spec.priority,
                         "streams": managed.slot.streams, "callbacks": managed.slot.callbacks,
                         "callback_seconds": round(managed.slot.callback_seconds, 6),
                         "memory_bytes": plugin.memory_bytes() if plugin else 0,
                         "abi": plugin.module.abi if plugin else None,
                         "fetch_attempts": managed.attempts,
                         "next_fetch_in": (round(managed.next_retry - _now(), 1)
                                           if managed.next_retry is not None else None),
                         "reload_error": self.plugins.errors.get(managed.slot.name)})
            out.append(info)
        return out

    def draining_statuses(self) -> list[dict[str, object]]:
        return self.plugins.draining_statuses() if self.plugins is not None else []

    def config_dump(self) -> dict[str, object]:
        gateway = self.gateway
        dump_gateway = gateway.model_dump(mode="json", by_alias=True) if gateway else {}
        for redis in dump_gateway.get("spec", {}).get("redis", []):
            if redis.get("password"):
                redis["password"] = "[redacted]"
        if dump_gateway.get("spec", {}).get("sharedData"):
            dump_gateway["spec"]["sharedData"] = redact_url(dump_gateway["spec"]["sharedData"])
        plugins = []
        for order, managed in enumerate(self.plugins.managed.values()):
            resource = managed.resource.to_dict()
            if resource.get("spec", {}).get("url"):
                resource["spec"]["url"] = redact_url(resource["spec"]["url"])
            for env in resource.get("spec", {}).get("vmConfig", {}).get("env", []):
                if _SECRET.search(env.get("name", "")) and "value" in env:
                    env["value"] = "[redacted]"
            plugins.append({"order": order, "filter_name": managed.slot.name,
                            "status": managed.slot.status.value, "sha256": managed.sha256,
                            "resource": resource})
        return {"generation": self._generation, "gateway": dump_gateway, "plugins": plugins,
                "config_errors": self.config_errors}

    def prometheus_lines(self) -> list[str]:
        """This process's /stats/prometheus (worker 0's admin combines every worker's)."""
        return self.admin.prometheus_lines()


def load_config(paths: list[Path]) -> LoadResult:
    """The configuration, or ConfigInvalid when it cannot be used as a whole.

    A bad WasmPlugin is left out and the others run, as in Istio (a reload keeps its running
    version). A bad Gateway document, or a document that did not parse (it may be the
    Gateway), is not replaced by a default Gateway: that would drop every route and listener
    setting. Startup refuses; a reload keeps the running configuration. Documents of other
    kinds or APIs (Istio's own Gateway, a Service...) are reported and skipped.
    """
    result = load_paths(paths)
    fatal = [e for e in result.errors if e.kind in (None, "Gateway")]
    if fatal or (result.errors and not (result.plugins or result.gateways)):
        raise ConfigInvalid("\n".join(str(e) for e in result.errors))
    return result


_FLAG_OF = {"listen": "--listen", "admin": "--admin", "clusters": "--upstream",
            "routes": "--upstream", "accessLog": "--access-log-format"}


def _now() -> float:
    return asyncio.get_running_loop().time()


def _close_plugins(plugins: list[Plugin], host: GatewayHost) -> None:
    for plugin in plugins:
        host.stop_plugin(plugin)
        try:
            plugin.close()
        except Exception as exc:  # closing must never take the gateway down
            log.warning("closing plugin %s: %s", plugin.describe(), exc)


def _mtimes(paths: list[Path]) -> dict[Path, float]:
    found: dict[Path, float] = {}
    for path in paths:
        for file in config_files(Path(path)) if Path(path).exists() else []:
            try:
                found[file] = file.stat().st_mtime
            except OSError:
                continue
    return found


def _address(value: tuple[str, int]) -> str:
    return f"{value[0]}:{value[1]}"


def _limits(spec: GatewaySpec) -> Limits:
    limits = spec.limits
    if limits is None:
        return Limits()
    defaults = Limits()
    return Limits(memory_bytes=(limits.memory_mib << 20) if limits.memory_mib
                  else defaults.memory_bytes,
                  callback_seconds=(limits.callback_ms / 1000) if limits.callback_ms
                  else defaults.callback_seconds)
