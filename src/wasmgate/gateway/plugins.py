"""Turning WasmPlugin resources into running plugin slots, in the background.

The gateway serves at once: a slot whose module is still being fetched, compiled and started
stands in per failStrategy until it is ready. Fetching (through the module cache and its pull
policies), compiling (seconds for a Go plugin) and `on_configure` run in a worker thread. A
fetch that fails is retried with exponential backoff (1 s doubling to 5 min) for as long as
the plugin stays configured; `/plugins` shows the last error and the next attempt.

On reload, a plugin whose inputs did not change keeps its running slot; a changed one is
built and configured first (a canary) and replaces the old one only if that worked -
otherwise the old one stays and the error is reported.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from ..api.gateway import redact_url
from ..api.resources import FailStrategy as ApiFailStrategy
from ..api.resources import WasmPlugin
from ..chain import FailStrategy, PluginSlot, SlotStatus
from ..fetch.fetcher import ModuleFetcher
from ..fetch.sources import FetchError
from ..runtime.abi import LogLevel
from ..runtime.errors import RuntimeFailure
from ..runtime.module import PluginModule
from ..runtime.module_cache import CompiledModuleCache
from ..runtime.plugin import Plugin, PluginConfig
from ..runtime.vm import Limits
from .host import GatewayHost

log = logging.getLogger("wasmgate.gateway.plugins")

_FAIL = {ApiFailStrategy.FAIL_CLOSE: FailStrategy.FAIL_CLOSE,
         ApiFailStrategy.FAIL_OPEN: FailStrategy.FAIL_OPEN,
         ApiFailStrategy.FAIL_RELOAD: FailStrategy.FAIL_RELOAD}


def fingerprint(resource: WasmPlugin, env: dict[str, str]) -> str:
    """Everything that, changed, needs a new plugin instance: for a `file://` module also
    the file's size and modification time, so a rebuilt module is picked up (the plugin
    author's loop: build, and the gateway reloads it)."""
    spec = resource.spec
    path = local_module(resource)
    try:
        stat = os.stat(path) if path is not None else None
    except OSError:
        stat = None
    blob = json.dumps([resource.resolved_url(), spec.sha256, resource.root_id,
                       resource.plugin_configuration_bytes().decode(), env,
                       str(spec.fail_strategy),
                       (stat.st_size, stat.st_mtime_ns) if stat is not None else None],
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def local_module(resource: WasmPlugin) -> str | None:
    """The path of a `file://` module, else None."""
    parts = urlsplit(resource.resolved_url())
    return unquote(parts.path) if parts.scheme == "file" else None


RETRY_BASE = 1.0
RETRY_MAX = 300.0


@dataclass
class ManagedSlot:
    resource: WasmPlugin
    slot: PluginSlot
    fingerprint: str
    ready: asyncio.Future[None]
    sha256: str | None = None
    log_level: LogLevel = LogLevel.INFO
    env: dict[str, str] = field(default_factory=dict)
    attempts: int = 0
    next_retry: float | None = None  # loop time of the next fetch attempt, when failing
    retired: bool = False


class PluginManager:
    def __init__(self, host: GatewayHost, *, limits: Limits | None = None,
                 properties: dict[str, object] | None = None, workers: int = 2,
                 fetcher: ModuleFetcher | None = None,
                 log_level: LogLevel = LogLevel.INFO, ca_file: str | None = None,
                 done_timeout: float = 30.0) -> None:
        self.ca_file = ca_file
        self.host = host
        self.fetcher = fetcher or ModuleFetcher()
        # Compiled artifacts live beside the modules they came from (purged with them).
        self.compiled = CompiledModuleCache(self.fetcher.cache.compiled_dir)
        self.log_level = log_level
        self.limits = limits or Limits()
        self.properties = properties or {}
        self.managed: dict[str, ManagedSlot] = {}
        self.errors: dict[str, str] = {}  # filter name -> why its new version was refused
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix="wasmgate-load")
        host.on_crash = self._on_crash
        # Plugins a reload replaced or dropped, still running streams or finishing (retire);
        # `done_timeout`: how long one whose on_done returned false may take to call
        # proxy_done (proxy-wasm-cpp-host waits for ever: a plugin that never calls it would
        # keep its VM).
        self.draining: dict[int, Plugin] = {}
        self.done_timeout = done_timeout
        self._done_timers: dict[int, asyncio.TimerHandle] = {}

    def prepare(self, resources: list[WasmPlugin]) -> list[ManagedSlot]:
        """Slots for `resources` in order: reused when unchanged, else new and loading."""
        result = []
        for resource in resources:
            env = resource.effective_env(os.environ)
            fp = fingerprint(resource, env)
            current = self.managed.get(resource.filter_name)
            if current is not None and current.fingerprint == fp:
                current.resource = resource
                result.append(current)
                continue
            result.append(self._start(resource, env, fp))
        return result

    def _start(self, resource: WasmPlugin, env: dict[str, str], fp: str) -> ManagedSlot:
        loop = asyncio.get_running_loop()
        slot = PluginSlot(resource.filter_name, _FAIL[resource.spec.fail_strategy])
        managed = ManagedSlot(resource, slot, fp, loop.create_future(), env=env,
                              log_level=self.log_level)
        self._attempt(managed)
        return managed

    def _attempt(self, managed: ManagedSlot) -> None:
        if managed.retired:
            return
        managed.attempts += 1
        managed.next_retry = None
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, self._load, managed, managed.env)
        future.add_done_callback(lambda f: self._loaded(managed, f))

    def _load(self, managed: ManagedSlot, env: dict[str, str]) -> Plugin:
        resource = managed.resource
        data = self.fetcher.fetch_plugin(resource, ca_file=self.ca_file).wasm
        managed.sha256 = hashlib.sha256(data).hexdigest()
        module = PluginModule(data, source=redact_url(resource.resolved_url()),
                              cache=self.compiled)
        config = PluginConfig(name=resource.filter_name, root_id=resource.root_id,
                              configuration=resource.plugin_configuration_bytes(), env=env,
                              log_level=managed.log_level, limits=self.limits,
                              properties=dict(self.properties))
        plugin = Plugin(module, config, self.host)
        try:
            plugin.start()
        except BaseException:
            self._discard(plugin)  # what on_vm_start / on_configure started, and the VM
            raise
        return plugin

    def _discard(self, plugin: Plugin) -> None:
        """Drop a plugin that will never serve: stop its outbound work (tick, gRPC calls; the
        host does that on the loop) and close its VM. Any thread."""
        try:
            self.host.stop_plugin(plugin)
            plugin.close()
        except Exception as exc:  # closing must never take the gateway down
            log.warning("plugin %s: error while closing: %s", plugin.describe(), exc)

    def _loaded(self, managed: ManagedSlot, future: asyncio.Future[Plugin]) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        if exc is None and managed.retired:  # replaced while loading: never used
            self._discard(future.result())
            return
        if exc is None:
            managed.slot.plugin = future.result()
            managed.slot._status = SlotStatus.READY
            log.info("plugin %s ready (sha256 %s)", managed.slot.name, (managed.sha256 or "")[:12])
        else:
            if not isinstance(exc, FetchError | RuntimeFailure):
                log.error("plugin %s: unexpected error while loading", managed.slot.name,
                          exc_info=exc)
            managed.slot.mark_failed(str(exc))
            log.error("plugin %s failed to load: %s", managed.slot.name, exc)
            if isinstance(exc, FetchError) and not managed.retired:
                self._schedule_retry(managed)
        if not managed.ready.done():
            managed.ready.set_result(None)

    def _schedule_retry(self, managed: ManagedSlot) -> None:
        """The registry or server may come back: try again later (the slot stands in)."""
        delay = min(RETRY_BASE * 2 ** (managed.attempts - 1), RETRY_MAX)
        loop = asyncio.get_running_loop()
        managed.next_retry = loop.time() + delay
        loop.call_later(delay, self._attempt, managed)
        log.info("plugin %s: fetching again in %.0f s", managed.slot.name, delay)

    async def settle(self, managed: list[ManagedSlot], timeout: float) -> None:
        pending = [m.ready for m in managed if not m.ready.done()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)

    def commit(self, candidates: list[ManagedSlot]) -> list[ManagedSlot]:
        """After a reload's candidates settled: keep the old slot where the new one failed."""
        chosen: list[ManagedSlot] = []
        self.errors = {}
        for candidate in candidates:
            name = candidate.slot.name
            old = self.managed.get(name)
            failed = candidate.slot.status == SlotStatus.FAILED and candidate.slot.plugin is None
            if failed and old is not None and old is not candidate and (
                    old.slot.status == SlotStatus.READY):
                self.errors[name] = candidate.slot.error or "failed"
                log.error("plugin %s: new version refused, keeping the running one: %s", name,
                          candidate.slot.error)
                candidate.retired = True  # no fetch retries for a version never installed
                chosen.append(old)
            else:
                chosen.append(candidate)
        return chosen

    def install(self, chosen: list[ManagedSlot]) -> list[Plugin]:
        """Make `chosen` the current set; return plugins no longer used (close them later)."""
        keep = {id(m.slot) for m in chosen}
        dropped = [m for m in self.managed.values() if id(m.slot) not in keep]
        for managed in dropped:
            managed.retired = True  # stops its fetch retries
        self.managed = {m.slot.name: m for m in chosen}
        return [m.slot.plugin for m in dropped if m.slot.plugin is not None]

    def set_log_level(self, name: str, level: LogLevel) -> list[str]:
        changed = []
        for managed in self.managed.values():
            if name in ("all", managed.slot.name, managed.resource.name):
                managed.log_level = level
                if managed.slot.plugin is not None:
                    managed.slot.plugin.set_log_level(level)
                changed.append(managed.slot.name)
        return changed

    # -- retired plugins ---------------------------------------------------------------------
    def retire(self, plugin: Plugin) -> None:
        """A plugin the configuration replaced or dropped: finished (its VM freed) once the
        last stream using it completes, however long that stream runs (an SSE answer may
        take minutes), as Envoy keeps a replaced VM while a stream holds it."""
        self.draining[id(plugin)] = plugin
        if plugin.active_streams == 0:
            self._finish(plugin)
            return
        loop = asyncio.get_running_loop()
        plugin.on_idle = lambda p: loop.call_soon(self._finish, p)
        log.debug("plugin %s retired: closed when its %d stream(s) end", plugin.describe(),
                  plugin.active_streams)

    def _finish(self, plugin: Plugin) -> None:
        """Its last stream ended: on_done, and on_delete unless the plugin asked to end some
        work first (on_done false); then it has `done_timeout` s to call proxy_done."""
        if id(plugin) not in self.draining:
            return
        plugin.on_idle = None
        try:
            finished = plugin.finish()
        except Exception as exc:  # closing must never take the gateway down
            log.warning("closing plugin %s: %s", plugin.describe(), exc)
            finished = True
        if finished:
            self._finished(plugin)
            return
        log.info("plugin %s: on_done returned false: waiting up to %g s for proxy_done",
                 plugin.describe(), self.done_timeout)
        self._done_timers[id(plugin)] = asyncio.get_running_loop().call_later(
            self.done_timeout, self._give_up, plugin)
        plugin.on_finished = self._finished

    def _give_up(self, plugin: Plugin) -> None:
        if id(plugin) in self.draining:
            log.warning("plugin %s did not call proxy_done within %g s: closed",
                        plugin.describe(), self.done_timeout)
            self._discard(plugin)
            self._finished(plugin)

    def _finished(self, plugin: Plugin) -> None:
        timer = self._done_timers.pop(id(plugin), None)
        if timer is not None:
            timer.cancel()
        self.draining.pop(id(plugin), None)
        plugin.on_finished = None
        self.host.stop_plugin(plugin)  # (its tick and gRPC calls, if any)

    def draining_statuses(self) -> list[dict[str, object]]:
        """Retired plugins still alive: running streams, or waiting for proxy_done."""
        return [{"name": p.name, "streams": p.active_streams, "memory_bytes": p.memory_bytes(),
                 "waiting_for_proxy_done": p.root.done_pending}
                for p in self.draining.values()]

    def close_draining(self) -> None:
        """Shutdown: whatever is still draining is closed now."""
        for plugin in list(self.draining.values()):
            self._discard(plugin)
            self._finished(plugin)

    def _on_crash(self, plugin: Plugin, exc: Exception) -> None:
        if id(plugin) in self._done_timers:  # failed while finishing: no proxy_done can come
            self._give_up(plugin)
            return
        for managed in self.managed.values():
            if managed.slot.plugin is plugin:
                managed.slot.on_crash(str(exc))

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
