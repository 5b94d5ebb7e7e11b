"""What a reload does to the plugin it replaces: the old VM serves the streams it began to
their end, however long they run (Envoy keeps a replaced VM while a stream holds it), and is
freed as soon as the last one completes, not left to the cyclic gc (bench/reload_churn.py
measures the memory: flat over hundreds of reloads)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from wasmgate.gateway.app import GatewayApp
from wasmgate.runtime.plugin import Plugin
from wasmgate.runtime.vm import WasmVM

from .conftest import free_port
from .test_gateway import conformance, gateway_doc

DRAIN = 0.2  # the old fixed delay closed a replaced VM after drain + 1 s, streams or not


def config(upstream: str, listen: int, generation: str,
           steps: list[str] | None = None) -> str:
    return gateway_doc(upstream, extra=f"  listen: 127.0.0.1:{listen}\n"
                                       "  admin: 127.0.0.1:0\n") + conformance(
        "lifetime", [f"response_body log 2 s:body-{generation}",
                     f"log log 2 s:on-log-{generation}", *(steps or [])])


async def slow_upstream(release: asyncio.Event) -> asyncio.Server:
    """Answers with a first chunk at once and the last one when `release` is set."""
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                             b"5\r\nfirst\r\n")
                await writer.drain()
                if head.startswith(b"GET /slow "):
                    await release.wait()
                writer.write(b"4\r\nlast\r\n0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            writer.close()  # the gateway closed its pooled connection, or the test ended

    return await asyncio.start_server(serve, "127.0.0.1", 0)


async def get(port: int, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nhost: h\r\n\r\n".encode())
    await writer.drain()
    return reader, writer


async def started(app: GatewayApp) -> None:
    await app.start()
    await app.plugins.settle(list(app.plugins.managed.values()), timeout=60)


async def read_to_end(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.readuntil(b"0\r\n\r\n"), 10)


async def fetch(port: int, path: str) -> bytes:
    """A whole GET (the slow upstream's chunked answer) on a connection of its own."""
    reader, writer = await get(port, path)
    try:
        return await read_to_end(reader)
    finally:
        writer.close()


@dataclass
class Running:
    app: GatewayApp
    path: Path
    address: str  # the slow upstream
    listen: int
    old: Plugin  # the plugin of generation "one"
    old_vm: WasmVM

    async def reload_to_two(self) -> None:
        self.path.write_text(config(self.address, self.listen, "two"))
        assert await self.app.reload()


@contextlib.asynccontextmanager
async def running(tmp_path: Path, release: asyncio.Event,
                  steps: Callable[[str], list[str]] | None = None,
                  done_timeout: float | None = None) -> AsyncIterator[Running]:
    """The gateway in process, generation "one" of the plugin loaded, in front of the slow
    upstream; stopped at the end."""
    upstream = await slow_upstream(release)
    address = f"127.0.0.1:{upstream.sockets[0].getsockname()[1]}"
    listen = free_port()
    path = tmp_path / "gateway.yaml"
    path.write_text(config(address, listen, "one", steps(address) if steps else None))
    app = GatewayApp([path], drain_seconds=DRAIN, reload_interval=0)
    if done_timeout is not None:
        app.done_timeout = done_timeout
    await started(app)
    try:
        old = app.plugins.managed["default.lifetime"].slot.plugin
        assert old is not None and old.vm is not None
        yield Running(app, path, address, listen, old, old.vm)
    finally:
        await app.stop()
        upstream.close()


async def closed_soon(vm: WasmVM) -> bool:
    """The VM was closed within 2 s (closing is scheduled on the loop)."""
    for _ in range(200):
        if vm.closed:
            return True
        await asyncio.sleep(0.01)
    return False


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What the plugin logged (its `enter <callback>`, `conf ...` and `log` step lines)."""
    return [r.getMessage().rsplit(": ", 1)[-1] for r in caplog.records
            if r.name.startswith("wasmgate") and "wasm log" in r.getMessage()]


def plugin_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What the plugin logged with its `log` steps."""
    return [m for m in messages(caplog) if m.startswith(("body-", "on-log-"))]


def test_a_replaced_plugin_serves_its_long_stream_to_the_end(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)

    async def main() -> None:
        release = asyncio.Event()
        async with running(tmp_path, release) as run:
            reader, writer = await get(run.listen, "/slow")
            head = await asyncio.wait_for(reader.readuntil(b"first\r\n"), 10)
            assert head.startswith(b"HTTP/1.1 200")
            await run.reload_to_two()
            assert run.app.draining_statuses() == [
                {"name": "default.lifetime", "streams": 1,
                 "memory_bytes": run.old_vm.memory_bytes(), "waiting_for_proxy_done": False}]
            await asyncio.sleep(DRAIN + 1.3)  # past the old fixed delay
            assert run.old.vm is run.old_vm and not run.old_vm.closed  # the stream holds it

            release.set()
            assert (await read_to_end(reader)).endswith(b"4\r\nlast\r\n0\r\n\r\n")
            writer.close()
            assert await closed_soon(run.old_vm)
            assert run.old.vm is None and run.app.draining_statuses() == []
            # the old plugin saw its stream's body to the end, and its on_log
            assert plugin_lines(caplog) == ["body-one"] * 3 + ["on-log-one"]

            await fetch(run.listen, "/new")
        later = plugin_lines(caplog)[4:]  # the new request: the new plugin only
        assert later[-1] == "on-log-two" and set(later[:-1]) == {"body-two"}

    asyncio.run(main())


def test_a_replaced_plugin_without_streams_is_freed_at_the_reload(tmp_path: Path) -> None:
    async def main() -> None:
        async with running(tmp_path, asyncio.Event()) as run:
            await fetch(run.listen, "/done")
            assert run.old.active_streams == 0 and run.old_vm.memory_bytes() > 0
            await run.reload_to_two()
            assert run.old_vm.closed and run.old.vm is None and run.old_vm.memory_bytes() == 0
            assert run.app.draining_statuses() == []
            new = run.app.plugins.managed["default.lifetime"].slot.plugin
            assert new is not None and new is not run.old and new.vm is not None

    asyncio.run(main())


def on_done_flushing(address: str) -> list[str]:
    """A root context that flushes over an http_call when it is shut down, and says it is
    done (proxy_done) when the call is answered."""
    return ["done return 0",
            f"done http_call s:{address} m::path=/slow&:method=GET&:authority=up s: null "
            "10000",
            "http_call_response done"]


def test_on_done_false_keeps_the_vm_until_the_plugin_calls_proxy_done(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Envoy's root-context shutdown: on_done false means the plugin still has work; the VM
    lives on (its http_call is answered) until proxy_done, then on_delete runs."""
    caplog.set_level(logging.INFO)

    async def main() -> None:
        release = asyncio.Event()
        async with running(tmp_path, release, on_done_flushing) as run:
            await run.reload_to_two()
            [draining] = run.app.draining_statuses()
            assert draining["streams"] == 0 and draining["waiting_for_proxy_done"]
            await asyncio.sleep(0.3)
            assert not run.old_vm.closed  # the flush is still on its way
            entered = [m for m in messages(caplog) if m.startswith("enter ")]
            assert "enter done 1" in entered and "enter delete 1" not in entered
            release.set()
            assert await closed_soon(run.old_vm)
            assert run.app.draining_statuses() == []
            entered = [m for m in messages(caplog) if m.startswith("enter ")]
            assert entered.index("enter delete 1") > entered.index(
                next(m for m in entered if m.startswith("enter http_call_response 1")))
            assert "conf http_call_response done status=0" in messages(caplog)

    asyncio.run(main())


def test_a_plugin_that_never_calls_proxy_done_is_closed_after_the_timeout(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)

    async def main() -> None:
        async with running(tmp_path, asyncio.Event(), lambda _: ["done return 0"],
                           done_timeout=0.3) as run:
            await run.reload_to_two()
            assert not run.old_vm.closed
            await asyncio.sleep(0.6)
            assert run.old_vm.closed and run.app.draining_statuses() == []
            assert "enter delete 1" in messages(caplog)
            assert any("did not call proxy_done within 0.3 s" in r.getMessage()
                       for r in caplog.records)

    asyncio.run(main())


def flush_then_trap(address: str) -> list[str]:
    return ["done return 0",
            f"done http_call s:{address} m::path=/fast&:method=GET&:authority=up s: null 10000",
            "http_call_response trap"]


def test_a_plugin_that_fails_while_finishing_is_freed_at_once(tmp_path: Path) -> None:
    """It can never call proxy_done: no reason to keep its VM for the rest of done_timeout."""
    async def main() -> None:
        async with running(tmp_path, asyncio.Event(), flush_then_trap, done_timeout=30) as run:
            await run.reload_to_two()
            for _ in range(100):
                if run.old.failed:
                    break
                await asyncio.sleep(0.02)
            assert run.old.failed  # trapped in http_call_response
            assert await closed_soon(run.old_vm), run.app.draining_statuses()

    asyncio.run(main())
