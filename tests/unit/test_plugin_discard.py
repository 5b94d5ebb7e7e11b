"""A plugin dropped before it serves, or restarted on a fresh VM, has its outbound work stopped
(`host.stop_plugin`) and its VM closed: the gateway's PluginManager (a start that fails, a
plugin replaced while it was loading) and `Plugin.restart` (FAIL_RELOAD)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path

import pytest

from wasmgate import asgi
from wasmgate.api.loading import load_text
from wasmgate.api.resources import WasmPlugin
from wasmgate.fetch.cache import ModuleCache
from wasmgate.fetch.fetcher import ModuleFetcher
from wasmgate.gateway import plugins as gateway_plugins
from wasmgate.gateway.host import GatewayHost
from wasmgate.gateway.plugins import PluginManager
from wasmgate.gateway.upstream import UpstreamPools
from wasmgate.runtime.errors import PluginFailed, RuntimeFailure
from wasmgate.runtime.host import Host
from wasmgate.runtime.module import PluginModule
from wasmgate.runtime.plugin import Plugin, PluginConfig
from wasmgate.runtime.vm import Limits
from wasmgate.testing import Emulator

from ..conftest import CONFORMANCE

TICK = "configure set_tick_period_milliseconds 60000"  # armed, and never fires in a test


def resource(steps: list[str]) -> WasmPlugin:
    text = (f"apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\n"
            f"metadata: {{name: p, namespace: default}}\nspec:\n  url: file://{CONFORMANCE}\n"
            f"  pluginConfig: {json.dumps({'steps': steps})}\n")
    [plugin] = load_text(text).plugins
    return plugin


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[Plugin]:
    """Every Plugin the PluginManager (or the ASGI middleware) builds."""
    built: list[Plugin] = []

    class Recorded(Plugin):
        def start(self) -> None:
            built.append(self)
            super().start()

    monkeypatch.setattr(gateway_plugins, "Plugin", Recorded)
    monkeypatch.setattr(asgi, "Plugin", Recorded)
    return built


def manager(tmp_path: Path) -> tuple[PluginManager, GatewayHost]:
    host = GatewayHost(asyncio.get_running_loop(), UpstreamPools(), lambda name: None)
    return PluginManager(host, fetcher=ModuleFetcher(ModuleCache(tmp_path))), host


async def until(check, timeout: float = 20) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.02)


def test_a_plugin_that_fails_to_start_is_stopped_and_closed(tmp_path: Path,
                                                            started: list[Plugin]) -> None:
    async def run() -> None:
        plugins, host = manager(tmp_path)
        [managed] = plugins.prepare([resource([TICK, "configure return 0"])])
        await asyncio.wait_for(managed.ready, 20)
        await asyncio.sleep(0)  # the stop hops onto the loop
        assert managed.slot.error and "configuration rejected" in managed.slot.error
        [plugin] = started
        assert plugin.vm is None, "the VM of a plugin that failed to start was left open"
        assert id(plugin) not in host._timers, "its tick is still armed"
        plugins.shutdown()

    asyncio.run(run())


def test_a_plugin_replaced_while_loading_is_stopped_and_closed(tmp_path: Path,
                                                               started: list[Plugin]) -> None:
    async def run() -> None:
        plugins, host = manager(tmp_path)
        [first] = plugins.prepare([resource([TICK])])
        plugins.install([first])
        [second] = plugins.prepare([resource([TICK, "configure get_log_level"])])
        plugins.install([second])  # the first is retired before it finished loading
        await asyncio.wait_for(second.ready, 20)
        await until(lambda: len(started) == 2 and all(
            p.vm is None for p in started if p is not second.slot.plugin))
        [old] = [p for p in started if p is not second.slot.plugin]
        assert id(old) not in host._timers, "the replaced plugin's tick is still armed"
        assert id(second.slot.plugin) in host._timers  # the one in use keeps its own
        plugins.shutdown()

    asyncio.run(run())


def test_asgi_plugin_that_fails_to_start_is_stopped_and_closed(started: list[Plugin]) -> None:
    async def run() -> None:
        host = GatewayHost(asyncio.get_running_loop(), UpstreamPools(), lambda name: None)
        entry = asgi.plugin_entries([asgi.PluginSpec(
            CONFORMANCE, f"{TICK}\nconfigure return 0\n")])[0]
        with pytest.raises(RuntimeFailure, match="configuration rejected"):
            entry.build(host, Limits())
        [plugin] = started
        assert plugin.vm is None and id(plugin) not in host._timers

    asyncio.run(run())


def test_restart_stops_the_old_vms_work_first() -> None:
    class Recording(Host):
        def __init__(self) -> None:
            super().__init__()
            self.events: list[str] = []

        def stop_plugin(self, plugin: Plugin) -> None:
            self.events.append(f"stop vm={id(plugin.vm)}")

    host = Recording()
    module = PluginModule(CONFORMANCE.read_bytes(), source=str(CONFORMANCE))
    plugin = Plugin(module, PluginConfig(configuration=b"configure get_log_level"), host)
    plugin.start()
    old = plugin.vm
    plugin.restart()
    assert host.events == [f"stop vm={id(old)}"]  # stopped while the old VM was still there
    assert plugin.vm is not old and plugin.vm is not None
    plugin.close()
    Host().stop_plugin(plugin)  # the base Host has it (a no-op)


def test_emulator_restart_cancels_pending_calls() -> None:
    emulator = Emulator(CONFORMANCE, plugin_config=(
        "tick http_call s:up m::path=/&:method=GET&:authority=a s: null 1000\n"
        "vm_start set_tick_period_milliseconds 100\n"), vm_config=b"")
    emulator.start()
    emulator.tick()
    assert [c.token for c in emulator.pending_http_calls()] == [4]
    emulator.restart()
    assert emulator.pending_http_calls() == []  # Envoy cancels the old VM's calls
    emulator.tick()
    assert [c.token for c in emulator.pending_http_calls()] == [4]  # the fresh VM's own
    emulator.close()


def test_streams_are_counted_and_the_last_one_reports_idle() -> None:
    """What the gateway waits for before closing a plugin a reload replaced."""
    module = PluginModule(CONFORMANCE.read_bytes(), source=str(CONFORMANCE))
    plugin = Plugin(module, PluginConfig(), Host())
    plugin.start()
    idle: list[int] = []
    first, second = plugin.new_http_context(), plugin.new_http_context()
    plugin.on_idle = lambda p: idle.append(p.active_streams)
    assert plugin.active_streams == 2
    first.request_headers({"a": "1"}, end_of_stream=True)
    first.complete()
    first.complete()  # idempotent: counted once
    assert (plugin.active_streams, idle) == (1, [])
    second.complete()
    assert (plugin.active_streams, idle) == (0, [0])
    plugin.close()


def test_closing_frees_the_store_and_nothing_calls_in_afterwards() -> None:
    module = PluginModule(CONFORMANCE.read_bytes(), source=str(CONFORMANCE))
    plugin = Plugin(module, PluginConfig(), Host())
    plugin.start()
    vm = plugin.vm
    assert vm is not None and vm.memory_bytes() > 0
    stream = plugin.new_http_context()
    plugin.close()
    assert vm.closed and vm.memory_bytes() == 0
    with pytest.raises(ValueError, match="closed"):
        vm.store.ptr()  # the wasmtime Store (and its linear memory) is freed
    with pytest.raises(PluginFailed, match="closed"):  # (not None: that would be Continue)
        vm.call("proxy_on_request_headers", stream.id, 0, 1)
    stream.complete()  # a stream the closed plugin still held ends quietly
    assert plugin.active_streams == 0


def test_a_close_asked_inside_a_guest_call_waits_for_it_to_return() -> None:
    """A host function that ends up closing its own VM (an embedder's callback) must not free
    the Store under the running guest code."""
    class Closing(Host):
        def log(self, plugin: Plugin, level: object, message: str) -> None:
            if message == "closing" and plugin.vm is not None:
                vm = plugin.vm
                vm.close()
                seen.append(vm.closed)  # not yet: the guest is still running

    seen: list[bool] = []
    module = PluginModule(CONFORMANCE.read_bytes(), source=str(CONFORMANCE))
    plugin = Plugin(module, PluginConfig(configuration=b"request_headers log 2 s:closing"),
                    Closing())
    plugin.start()
    vm = plugin.vm
    assert vm is not None
    plugin.new_http_context().request_headers({"a": "1"}, end_of_stream=True)
    assert seen == [False] and vm.closed


def test_emulator_shutdown_waits_for_proxy_done_after_on_done_false() -> None:
    """Envoy's root shutdown, as plugin authors test a flush on shutdown: on_done false keeps
    the VM (its http_call can still be answered) until the plugin calls proxy_done."""
    emulator = Emulator(CONFORMANCE, plugin_config=(
        "done return 0\n"
        "done http_call s:collector m::path=/flush&:method=POST&:authority=c s:batch null 1000\n"
        "http_call_response done\n"), upstreams={"collector"})
    with emulator:
        assert emulator.shutdown() is False
        assert not emulator.finished
        [call] = emulator.pending_http_calls()
        assert call.body == b"batch"
        emulator.respond_http_call(call.token, {":status": "200"})
        assert emulator.finished
        entered = [line for line in emulator.logs() if line.startswith("enter ")]
        assert entered[-3:] == ["enter done 1",
                                f"enter http_call_response 1 {call.token} 1 0 0",
                                "enter delete 1"]


def test_emulator_shutdown_of_a_plugin_that_is_done_at_once() -> None:
    with Emulator(CONFORMANCE, plugin_config="configure get_log_level") as emulator:
        assert emulator.shutdown() is True and emulator.finished
        entered = [line for line in emulator.logs() if line.startswith("enter ")]
        assert entered[-2:] == ["enter done 1", "enter delete 1"]  # on_done once


def test_proxy_done_from_a_stream_context_is_not_found() -> None:
    """proxy-wasm-cpp-host's done() looks the calling context up among the root contexts
    waiting: from a stream it is NOT_FOUND, and nothing is ended under the stream."""
    emu = Emulator(CONFORMANCE, plugin_config="done return 0\nresponse_headers done\n").start()
    stream = emu.http_context()
    stream.request_headers({":path": "/", ":method": "GET"}, True)
    assert emu.shutdown() is False  # on_done false: waiting for proxy_done
    stream.response_headers({":status": "200"}, True)
    assert "conf response_headers done status=1" in emu.logs()
    assert not emu.finished
    stream.complete()
    emu.close()


def test_a_restarted_plugin_gets_on_done_again() -> None:
    emu = Emulator(CONFORMANCE, plugin_config="").start()
    assert emu.shutdown() is True  # on_done, on_delete, VM freed
    emu.restart()  # a fresh VM from the same module
    before = emu.logs().count("enter done 1")
    emu.close()
    assert emu.logs().count("enter done 1") == before + 1, emu.logs()[-4:]


def test_no_result_is_delivered_while_the_plugin_is_still_starting() -> None:
    """on_configure runs in a loader thread; an http_call it made must not be answered into
    the same wasmtime Store from the event loop's thread before it returns (a Store is not
    thread-safe): the answer waits until the plugin has started."""
    async def main() -> tuple[list[tuple[float, str]], float]:
        async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await r.readuntil(b"\r\n\r\n")
            w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await w.drain()
            w.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        host = GatewayHost(loop, UpstreamPools(), lambda name: ("127.0.0.1", port))
        seen: list[tuple[float, str]] = []
        host.log = lambda p, level, msg: seen.append(  # type: ignore[method-assign]
            (time.monotonic(), msg))
        steps = ("configure http_call s:up m::path=/&:method=GET&:authority=x s: null 5000\n"
                 "configure loop\n")  # a configure that runs until its deadline
        plugin = Plugin(PluginModule(CONFORMANCE.read_bytes(), source=str(CONFORMANCE)),
                        PluginConfig(name="p", configuration=steps.encode(),
                                     limits=Limits(startup_seconds=1.0)), host)
        with contextlib.suppress(RuntimeFailure):
            await loop.run_in_executor(None, plugin.start)
        ended = time.monotonic()
        server.close()
        return seen, ended

    seen, start_ended = asyncio.run(main())
    early = [msg for at, msg in seen
             if msg.startswith("enter http_call_response") and at < start_ended]
    assert early == []
