"""A request the client gives up on while the gateway is still connecting upstream ends once:
the connect failure that follows must not finish it again (feed its plugins after on_delete, a
trap in the Go and Rust SDKs; log it twice; spoil the access log's count of requests in
flight, so a writer a reload drops would be closed under a running request)."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import pytest

from wasmgate.gateway.app import GatewayApp

from .conftest import free_port
from .test_gateway import conformance


@contextmanager
def black_hole() -> Iterator[int]:
    """A port whose accept queue is full: connects to it hang until they time out."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            yield port


def doc(listen: int, hole: int, slow: int, access: Path | None) -> str:
    text = f"""apiVersion: wasmgate.io/v1alpha1
kind: Gateway
metadata: {{name: test}}
spec:
  labels: {{app: edge}}
  listen: 127.0.0.1:{listen}
  admin: 127.0.0.1:0
  clusters:
  - name: hole
    endpoints: ["127.0.0.1:{hole}"]
    connectTimeoutMs: 300
  - name: slow
    endpoints: ["127.0.0.1:{slow}"]
  routes:
  - name: hole
    match: {{prefix: /hole}}
    cluster: hole
  - name: slow
    cluster: slow
"""
    if access is not None:
        text += f"  accessLog:\n    path: {access}\n    format: '%REQ(:PATH)% %RESPONSE_CODE%'\n"
    return text


async def answer_when(release: asyncio.Event) -> asyncio.Server:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            await release.wait()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            await writer.drain()
            await reader.read()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        writer.close()
    return await asyncio.start_server(serve, "127.0.0.1", 0)


async def abandon(listen: int, path: str) -> None:
    """Send a request and go away before the gateway's upstream connect times out."""
    _, writer = await asyncio.open_connection("127.0.0.1", listen)
    writer.write(f"GET {path} HTTP/1.1\r\nhost: h\r\n\r\n".encode())
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.close()
    await asyncio.sleep(0.6)  # past the 300 ms connect timeout


async def long_request_across_a_log_drop(
        app: GatewayApp, config: Path, ports: tuple[int, int, int], release: asyncio.Event,
        then: Callable[[], None] | None = None) -> None:
    """GET /long; while the upstream holds it, a reload drops the access log (then `then`);
    the answer comes, whole."""
    listen, hole, slow_port = ports
    reader, writer = await asyncio.open_connection("127.0.0.1", listen)
    writer.write(b"GET /long HTTP/1.1\r\nhost: h\r\n\r\n")
    await writer.drain()
    await asyncio.sleep(0.1)
    config.write_text(doc(listen, hole, slow_port, None))
    assert await app.reload()
    if then is not None:
        then()
    release.set()
    head = await asyncio.wait_for(reader.readuntil(b"ok"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    writer.close()
    await asyncio.sleep(0.2)


@asynccontextmanager
async def logging_gateway(config: Path, access: Path,
                          hole: int = 1) -> AsyncIterator[tuple[GatewayApp, tuple[int, int, int],
                                                                asyncio.Event]]:
    """The gateway in process, its access log at `access`, in front of an upstream that
    answers when the event is set (and of `hole`); stopped at the end."""
    release = asyncio.Event()
    slow = await answer_when(release)
    ports = (free_port(), hole, slow.sockets[0].getsockname()[1])
    config.write_text(doc(*ports, access))
    app = GatewayApp([config], drain_seconds=0.2, reload_interval=0)
    await app.start()
    try:
        yield app, ports, release
    finally:
        await app.stop()
        slow.close()


def test_an_abandoned_request_is_logged_once_and_a_dropped_log_still_gets_later_lines(
        tmp_path: Path) -> None:
    access, config = tmp_path / "access.log", tmp_path / "gateway.yaml"

    async def main() -> None:
        with black_hole() as hole:
            async with logging_gateway(config, access, hole) as (app, ports, release):
                await abandon(ports[0], "/hole")
                await long_request_across_a_log_drop(app, config, ports, release)

    asyncio.run(main())
    lines = access.read_text().splitlines()
    assert "/long 200" in lines  # logged where it began, although the reload dropped the path
    assert [line for line in lines if line.startswith("/hole")] in (["/hole 0"], ["/hole 503"])


def test_no_plugin_callback_after_on_delete(tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    config = tmp_path / "gateway.yaml"

    async def main() -> None:
        listen = free_port()
        with black_hole() as hole:
            config.write_text(doc(listen, hole, 1, None)
                              + conformance("watch", ["request_headers log 2 s:seen"]))
            app = GatewayApp([config], drain_seconds=0.2, reload_interval=0)
            await app.start()
            await app.plugins.settle(list(app.plugins.managed.values()), timeout=60)
            try:
                await abandon(listen, "/hole")
            finally:
                await app.stop()

    asyncio.run(main())
    entered = [r.getMessage().rsplit(": ", 1)[-1] for r in caplog.records
               if "wasm log" in r.getMessage()]
    stream = [m.split() for m in entered if m.startswith("enter ")]
    stream = [m for m in stream if len(m) > 2 and m[2] != "1"]  # (context 1: the root)
    assert [m[1] for m in stream] == ["context_create", "request_headers", "log", "done",
                                      "delete"]


def test_log_rotation_reaches_a_path_a_reload_dropped(tmp_path: Path) -> None:
    """A dropped path lives on while its requests run (an SSE stream: minutes): SIGUSR1 or
    POST /reopen_logs after logrotate reopens it too, so their lines go to the new file."""
    access, config = tmp_path / "access.log", tmp_path / "gateway.yaml"

    async def main() -> None:
        async with logging_gateway(config, access) as (app, ports, release):
            def rotate() -> None:  # (what logrotate and SIGUSR1 do)
                access.rename(tmp_path / "access.log.1")
                app.reopen_logs()

            await long_request_across_a_log_drop(app, config, ports, release, then=rotate)

    asyncio.run(main())
    assert access.read_text() == "/long 200\n"
