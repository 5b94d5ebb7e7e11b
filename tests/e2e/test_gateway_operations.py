"""What an operator meets running the gateway: a half-written config during a reload, secrets
in module URLs, a second gateway started on the same port, settings that take effect only at
restart, bad command-line values, the shutdown drain, and a rebuilt local module."""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from wasmgate.gateway.app import GatewayApp

from ..conftest import CONFORMANCE, EXAMPLE
from .conftest import WASMGATE, free_port
from .test_gateway import gateway_doc
from .test_reload_lifetime import fetch, get, slow_upstream


def example_doc(url: str, greeting: str = "hi") -> str:
    return ("apiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\n"
            "metadata: {name: example}\nspec:\n"
            f"  url: {url}\n  pluginName: example\n  pluginConfig: {{greeting: {greeting}}}\n"
            "  selector: {matchLabels: {app: edge}}\n")


@asynccontextmanager
async def gateway_in(directory: Path, **kw: object) -> AsyncIterator[GatewayApp]:
    app = GatewayApp([directory], drain_seconds=0.2, **kw)  # type: ignore[arg-type]
    await app.start()
    await app.plugins.settle(list(app.plugins.managed.values()), timeout=60)
    try:
        yield app
    finally:
        await app.stop()


async def greeting(port: int) -> str | None:
    """The example plugin's response header (None: the plugin did not run)."""
    head = (await fetch(port, "/")).split(b"\r\n\r\n", 1)[0].decode()
    for line in head.split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.lower() == "x-wasm-greeting":
            return value.strip()
    return None


def test_an_emptied_gateway_document_is_refused_and_routes_and_plugins_stay(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An editor's save caught half-way must not swap in a default Gateway: no routes, and
    every plugin its labels selected gone (an auth plugin too)."""
    async def main() -> None:
        upstream = await slow_upstream(asyncio.Event())
        address = f"127.0.0.1:{upstream.sockets[0].getsockname()[1]}"
        listen = free_port()
        gateway_yaml = tmp_path / "gateway.yaml"
        gateway_yaml.write_text(gateway_doc(address, extra=f"  listen: 127.0.0.1:{listen}\n"
                                                           "  admin: 127.0.0.1:0\n"))
        (tmp_path / "example.yaml").write_text(example_doc(f"file://{EXAMPLE}"))
        try:
            async with gateway_in(tmp_path, reload_interval=0) as app:
                assert await greeting(listen) == '{"greeting":"hi"}'
                for broken in ("", None):  # emptied, then moved away
                    if broken is None:
                        gateway_yaml.unlink()
                    else:
                        gateway_yaml.write_text(broken)
                    assert not await app.reload()
                    assert "the Gateway document is gone" in app.config_errors[0]
                    assert await greeting(listen) == '{"greeting":"hi"}'
                    assert app.config_dump()["gateway"]["metadata"]["name"] == "test"
        finally:
            upstream.close()

    asyncio.run(main())


def test_module_url_credentials_never_reach_logs_or_admin_views(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secret_url = f"http://alice:s3cretpw@127.0.0.1:{free_port()}/example.wasm?d=0&token=tok123"

    async def main() -> None:
        (tmp_path / "gateway.yaml").write_text(gateway_doc(
            "127.0.0.1:1", extra="  listen: 127.0.0.1:0\n  admin: 127.0.0.1:0\n"))
        (tmp_path / "example.yaml").write_text(example_doc(secret_url))
        async with gateway_in(tmp_path, reload_interval=0) as app:
            views = repr(app.config_dump()) + repr(app.plugin_statuses())
            assert "alice:[redacted]@" in views and "token=[redacted]" in views
            assert "s3cretpw" not in views and "tok123" not in views

    asyncio.run(main())
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "alice:" in logged  # the failed fetch was logged, redacted
    assert "s3cretpw" not in logged and "tok123" not in logged


def test_listen_and_admin_changes_wait_for_a_restart_and_say_so(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        listen, admin, other = free_port(), free_port(), free_port()
        config = tmp_path / "gateway.yaml"

        def write(port: int) -> None:
            config.write_text(gateway_doc("127.0.0.1:1", extra=(
                f"  listen: 127.0.0.1:{port}\n  admin: 127.0.0.1:{admin}\n")))

        write(listen)
        async with gateway_in(tmp_path, reload_interval=0) as app:
            write(other)
            assert await app.reload()
            assert app.config_dump()["gateway"]["spec"]["listen"] == f"127.0.0.1:{listen}"
            assert app.port == listen

    asyncio.run(main())
    assert any("spec.listen changed to 127.0.0.1:" in r.getMessage()
               and "takes effect at restart" in r.getMessage() for r in caplog.records)


def test_a_rebuilt_local_module_is_picked_up(tmp_path: Path) -> None:
    """The plugin author's loop: rebuild the .wasm, and the gateway reloads it."""
    async def main() -> None:
        upstream = await slow_upstream(asyncio.Event())
        address = f"127.0.0.1:{upstream.sockets[0].getsockname()[1]}"
        listen = free_port()
        module = tmp_path / "build" / "plugin.wasm"
        module.parent.mkdir()
        shutil.copy(EXAMPLE, module)
        config = tmp_path / "config"
        config.mkdir()
        (config / "gateway.yaml").write_text(gateway_doc(
            address, extra=f"  listen: 127.0.0.1:{listen}\n  admin: 127.0.0.1:0\n"))
        (config / "example.yaml").write_text(example_doc(f"file://{module}"))
        try:
            async with gateway_in(config, reload_interval=0.1) as app:
                first = app.plugin_statuses()[0]["sha256"]
                assert await greeting(listen) == '{"greeting":"hi"}'
                shutil.copy(CONFORMANCE, module)  # "rebuilt": another plugin
                for _ in range(100):
                    if app.plugin_statuses()[0]["sha256"] != first:
                        break
                    await asyncio.sleep(0.05)
                assert app.plugin_statuses()[0]["sha256"] != first
                assert await greeting(listen) is None  # the conformance plugin now
        finally:
            upstream.close()

    asyncio.run(main())


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(WASMGATE), "run", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize(("args", "flag"), [
    (["--listen", "127.0.0.1:99999"], "--listen"),
    (["--upstream", "ftp://x"], "--upstream"),
    (["--access-log-format", "%START_TIME% %BOGUS%"], "--access-log-format"),
])
def test_bad_flag_values_are_named_without_a_traceback(tmp_path: Path, args: list[str],
                                                       flag: str) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(gateway_doc("127.0.0.1:1"))
    for workers in ("1", "2"):
        result = run_cli("-c", str(config), "--admin", "127.0.0.1:0", "--workers", workers,
                         *args)
        assert result.returncode == 2, result.stderr
        assert f"{flag}: " in result.stderr
        assert "Traceback" not in result.stderr and "pydantic" not in result.stderr


def test_workers_must_be_at_least_one() -> None:
    result = run_cli("--workers", "0")
    assert result.returncode == 2 and "--workers" in result.stderr


def test_a_second_gateway_with_workers_cannot_share_the_port(tmp_path: Path) -> None:
    """The workers bind with SO_REUSEPORT; a second gateway on the same port must not quietly
    take half of the traffic."""
    config = tmp_path / "gateway.yaml"
    config.write_text(gateway_doc("127.0.0.1:1"))
    port = free_port()
    first = subprocess.Popen(
        [str(WASMGATE), "run", "-c", str(config), "--listen", f"127.0.0.1:{port}",
         "--admin", f"127.0.0.1:{free_port()}", "--workers", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:  # listening?
            try:
                asyncio.run(asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1))
                break
            except OSError:
                assert time.monotonic() < deadline and first.poll() is None
                time.sleep(0.1)
        second = run_cli("-c", str(config), "--listen", f"127.0.0.1:{port}",
                         "--admin", f"127.0.0.1:{free_port()}", "--workers", "2")
        assert second.returncode == 1
        assert f"127.0.0.1:{port}" in second.stderr and "in use" in second.stderr
    finally:
        first.terminate()
        first.wait(30)


def test_the_drain_time_is_a_flag_and_the_drain_is_logged(tmp_path: Path) -> None:
    async def main() -> None:
        upstream = await slow_upstream(asyncio.Event())  # /slow never ends
        address = f"127.0.0.1:{upstream.sockets[0].getsockname()[1]}"
        config = tmp_path / "gateway.yaml"
        config.write_text(gateway_doc(address))
        port = free_port()
        process = await asyncio.create_subprocess_exec(
            str(WASMGATE), "run", "-c", str(config), "--listen", f"127.0.0.1:{port}",
            "--admin", f"127.0.0.1:{free_port()}", "--drain-seconds", "0.5",
            stderr=asyncio.subprocess.PIPE)
        try:
            for _ in range(300):
                try:
                    reader, writer = await get(port, "/slow")
                    break
                except OSError:
                    await asyncio.sleep(0.1)
            await asyncio.wait_for(reader.readuntil(b"first\r\n"), 10)
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), 10) == 0
            assert time.monotonic() - started < 5  # not the default 10 s
            assert process.stderr is not None
            log = (await process.stderr.read()).decode()
            assert "draining 1 busy connection(s), up to 0.5 s" in log
            writer.close()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            upstream.close()

    asyncio.run(main())


def test_a_refused_new_version_is_not_fetched_again_behind_the_running_one(
        tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A reload whose new module cannot be fetched keeps the running version; the refused
    candidate must not go on retrying (and, once a retry succeeded, start a VM nobody uses)."""
    caplog.set_level(logging.INFO)
    monkeypatch.setenv("WASM_HTTP_REQUEST_MAX_RETRIES", "1")

    async def main() -> None:
        (tmp_path / "gateway.yaml").write_text(gateway_doc(
            "127.0.0.1:1", extra="  listen: 127.0.0.1:0\n  admin: 127.0.0.1:0\n"))
        plugin_yaml = tmp_path / "example.yaml"
        plugin_yaml.write_text(example_doc(f"file://{EXAMPLE}"))
        async with gateway_in(tmp_path, reload_interval=0) as app:
            plugin_yaml.write_text(example_doc(f"http://127.0.0.1:{free_port()}/gone.wasm"))
            assert await app.reload()
            assert app.plugin_statuses()[0]["reload_error"]
            assert app.plugin_statuses()[0]["status"] == "ready"  # the running version
            await asyncio.sleep(3.5)  # retries would come after 1 s, then 2 s

    asyncio.run(main())
    failures = [r for r in caplog.records if "failed to load" in r.getMessage()]
    assert len(failures) == 1, [r.getMessage() for r in failures]
