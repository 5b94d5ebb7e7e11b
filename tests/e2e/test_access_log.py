"""The access log through `wasmgate run`: Istio's default line, Envoy formats (text and JSON)
from the Gateway document or the CLI, plugin filter state in it, failures with Envoy's
response flags, a bad format refused, and a reload changing the format."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from wasmgate.gateway.app import GatewayApp

from .conftest import WASMGATE, Gateway, free_port
from .test_gateway import conformance, gateway_doc
from .test_reload_lifetime import fetch, get, read_to_end, slow_upstream

Start = Callable[..., Gateway]


def wait_for_lines(path: Path, count: int, timeout: float = 10) -> list[str]:
    """The access log's lines once there are `count` (lines are flushed within a second)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in (path.read_text() if path.exists() else "").splitlines()
                 if line]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def access_lines(gateway: Gateway, count: int) -> list[str]:
    """Lines of Istio's default format in the gateway's stdout (shared with its logs)."""
    pattern = re.compile(r'^\[\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z\] "')
    deadline = time.monotonic() + 10
    while True:
        lines = [line for line in gateway.logs().splitlines() if pattern.match(line)]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def test_default_line_is_istios_format(start_gateway: Start, upstream: str) -> None:
    gateway = start_gateway(gateway_doc(upstream))  # started with --access-log
    status, _, _ = gateway.request("POST", "/things?q=1", body=b"hello",
                                   headers={"user-agent": "ua/1", "x-request-id": "rid-7"})
    assert status == 200
    [line] = access_lines(gateway, 1)
    status, text = gateway.admin_get("/stats/prometheus")
    assert b"\nwasmgate_access_log_dropped_lines_total 0\n" in text
    port = upstream.split(":")[1]
    assert re.fullmatch(
        r'\[[^\]]+\] "POST /things\?q=1 HTTP/1\.1" 200 - via_upstream - "-" 5 \d+ \d+ - '
        rf'"127\.0\.0\.1" "ua/1" "rid-7" "127\.0\.0\.1:{gateway.port}" "127\.0\.0\.1:{port}" '
        rf"backend - 127\.0\.0\.1:{gateway.port} 127\.0\.0\.1:\d+ - main", line), line


def test_json_format_to_a_file_with_a_plugins_filter_state(start_gateway: Start, upstream: str,
                                                           tmp_path: Path) -> None:
    path = tmp_path / "access.jsonl"
    fields = {"code": "%RESPONSE_CODE%", "details": "%RESPONSE_CODE_DETAILS%",
              "flags": "%RESPONSE_FLAGS%", "path": "%REQ(:PATH)%",
              "added": "%REQ(x-added)%", "resp": "%RESP(x-upstream)%",
              "ai_log": "%FILTER_STATE(wasm.ai_log:PLAIN)%", "cluster": "%UPSTREAM_CLUSTER%",
              "received": "%BYTES_RECEIVED%", "route": "%ROUTE_NAME%"}
    extra = f"  accessLog:\n    path: {path}\n    jsonFormat: {json.dumps(fields)}\n"
    # one plugin writes the filter state, the request header and the deny; another one reads
    gateway = start_gateway(
        gateway_doc(upstream, extra=extra)
        + conformance("writer", ["request_headers set_property s:ai_log s:tokens-7",
                                 "request_headers add_header_map_value 0 s:x-added s:yes"],
                      priority=10)
        + conformance("guard", ["request_headers send_local_response 403 s:denied-by-guard "
                                "s:no null -1"], priority=5))
    status, _, _ = gateway.get("/x")
    assert status == 403
    [line] = wait_for_lines(path, 1)
    assert json.loads(line) == {
        "code": 403, "details": "denied-by-guard", "flags": "-", "path": "/x",
        "added": "yes", "resp": None, "ai_log": "tokens-7", "cluster": "backend",
        "received": 0, "route": "main"}


def test_cli_format_and_failures_with_envoy_flags(start_gateway: Start, upstream: str) -> None:
    refused = f"127.0.0.1:{free_port()}"  # nothing listens there
    extra = ("  - name: down\n    match: {prefix: /down}\n    cluster: dead\n")
    doc = gateway_doc(upstream).replace("  routes:\n", "  routes:\n" + extra).replace(
        "  clusters:\n", f"  clusters:\n  - name: dead\n    endpoints: [\"{refused}\"]\n")
    gateway = start_gateway(doc, "--access-log-format",
                            "wasmgate %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% "
                            "%ROUTE_NAME% %UPSTREAM_CLUSTER% %REQ(:PATH):4%")
    assert gateway.get("/down/here")[0] == 503
    assert gateway.get("/status/404")[0] == 404
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = [line for line in gateway.logs().splitlines() if line.startswith("wasmgate ")]
        if len(lines) == 2:
            break
        time.sleep(0.05)
    assert lines == [
        "wasmgate 503 UF upstream_reset_before_response_started{connection_failure} down dead "
        "/dow",
        "wasmgate 404 - via_upstream main backend /sta"]


def test_a_bad_format_is_refused_at_startup_naming_the_field(tmp_path: Path,
                                                             upstream: str) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(gateway_doc(upstream, extra="  accessLog:\n    format: '%CODE%'\n"))
    result = subprocess.run([str(WASMGATE), "run", "-c", str(config), "--listen",
                             f"127.0.0.1:{free_port()}", "--admin", f"127.0.0.1:{free_port()}"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "spec.accessLog.format: %CODE% at position 0: not an operator wasmgate provides" in (
        result.stderr)


def test_reload_changes_the_format_and_no_access_log_turns_it_off(
        start_gateway: Start, upstream: str, tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    gateway = start_gateway(gateway_doc(
        upstream, extra=f"  accessLog:\n    path: {path}\n    format: 'one %RESPONSE_CODE%'\n"))
    assert gateway.get("/a")[0] == 200
    assert wait_for_lines(path, 1) == ["one 200"]
    config: Path = gateway.config_path  # type: ignore[attr-defined]
    config.write_text(config.read_text().replace("'one %RESPONSE_CODE%'",
                                                 "'two %REQ(:PATH)%'"))
    deadline = time.monotonic() + 20
    while gateway.admin_json("/config_dump").get("generation", 0) < 2:  # reloaded
        assert time.monotonic() < deadline, gateway.logs()
        time.sleep(0.1)
    assert gateway.get("/b")[0] == 200
    assert wait_for_lines(path, 2) == ["one 200", "two /b"]

    quiet = start_gateway(gateway_doc(
        upstream, extra=f"  accessLog:\n    path: {tmp_path / 'quiet.log'}\n"), "--no-access-log")
    assert quiet.get("/c")[0] == 200
    quiet.process.terminate()  # flushes at shutdown: nothing to flush
    quiet.process.wait(10)
    assert not (tmp_path / "quiet.log").exists()


def test_a_plugins_reply_without_details_is_not_via_upstream(start_gateway: Start,
                                                             upstream: str) -> None:
    """The Go SDK's SendHttpResponse gives no details: the line must not say the upstream
    answered."""
    gateway = start_gateway(
        gateway_doc(upstream) + conformance(
            "guard", ["request_headers send_local_response 403 s: s:no null -1"]),
        "--access-log-format", "wasmgate %RESPONSE_CODE% %RESPONSE_CODE_DETAILS%")
    assert gateway.get("/x")[0] == 403
    logs = gateway.wait_logged("wasmgate 403 ")
    assert [line for line in logs.splitlines() if line.startswith("wasmgate ")] == [
        "wasmgate 403 -"]


def test_requests_cut_off_at_shutdown_are_logged(tmp_path: Path) -> None:
    """A request still waiting when the drain ends is logged (downstream disconnect) before
    the log is closed, as Envoy logs it."""
    async def main() -> str:
        silent = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)  # never answers
        path = tmp_path / "access.log"
        listen = free_port()
        config = tmp_path / "gateway.yaml"
        config.write_text(gateway_doc(
            f"127.0.0.1:{silent.sockets[0].getsockname()[1]}",
            extra=f"  listen: 127.0.0.1:{listen}\n  admin: 127.0.0.1:0\n"
                  f"  accessLog:\n    path: {path}\n"
                  "    format: '%RESPONSE_CODE% %RESPONSE_FLAGS% %REQ(:PATH)%'\n"))
        app = GatewayApp([config], drain_seconds=0.2, reload_interval=0)
        await app.start()
        _, writer = await asyncio.open_connection("127.0.0.1", listen)
        writer.write(b"GET /cut HTTP/1.1\r\nhost: x\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.2)  # the request reached the upstream, which keeps silent
        await app.stop()
        writer.close()
        silent.close()
        return path.read_text()

    assert asyncio.run(main()) == "0 DC /cut\n"


def test_workers_sharing_a_stdout_pipe_never_mix_long_lines(tmp_path: Path,
                                                            upstream: str) -> None:
    """stdout is a pipe (as under Kubernetes) shared by --workers: lines far longer than
    PIPE_BUF (an ai_log with a long prompt) arrive whole, since the workers relay them to the
    parent, the one process writing there."""
    config = tmp_path / "gateway.yaml"
    port, admin = free_port(), free_port()
    config.write_text(gateway_doc(upstream, extra="  accessLog:\n    format: '%REQ(x-long)%'\n"))
    process = subprocess.Popen(
        [str(WASMGATE), "run", "-c", str(config), "--listen", f"127.0.0.1:{port}", "--admin",
         f"127.0.0.1:{admin}", "--workers", "2", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    gateway = Gateway(process, port, admin, tmp_path / "unused.log")  # type: ignore[arg-type]
    out: list[bytes] = []
    reader = threading.Thread(target=lambda: out.append(process.stdout.read()))  # type: ignore
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if gateway.admin_get("/ready")[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.1)

        def send(letter: str) -> None:
            for _ in range(10):  # a connection each: spread over both workers' listeners
                assert gateway.get("/", headers={"x-long": letter * 20000,
                                                 "connection": "close"})[0] == 200
        senders = [threading.Thread(target=send, args=(c,)) for c in "abcd"]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
    finally:
        process.terminate()
        process.wait(30)
        reader.join(30)
    lines = out[0].decode().splitlines()
    assert sorted(lines) == sorted(c * 20000 for c in "abcd" for _ in range(10))


def test_log_rotation_reopens_the_file(start_gateway: Start, upstream: str,
                                       tmp_path: Path) -> None:
    """logrotate moves the file, then SIGUSR1 (or POST /reopen_logs, as Envoy's admin): lines
    after it go to a new file at the path; none is lost or written to the moved one."""
    path = tmp_path / "access.log"
    gateway = start_gateway(gateway_doc(upstream, extra=(
        f"  accessLog:\n    path: {path}\n    format: '%REQ(:PATH)%'\n")))
    assert gateway.get("/one")[0] == 200
    assert wait_for_lines(path, 1) == ["/one"]
    path.rename(tmp_path / "access.log.1")
    assert gateway.get("/two")[0] == 200  # (buffered: it lands in whichever file is open)
    gateway.process.send_signal(signal.SIGUSR1)
    gateway.wait_logged("access logs reopened")
    assert gateway.get("/three")[0] == 200
    rotated = wait_for_lines(tmp_path / "access.log.1", 1)
    assert sorted(rotated + wait_for_lines(path, 1)) == ["/one", "/three", "/two"]
    assert "/three" in wait_for_lines(path, 1) and rotated[0] == "/one"

    (tmp_path / "access.log").rename(tmp_path / "access.log.2")
    status, _, body = gateway.request("POST", "/reopen_logs", port=gateway.admin)
    assert (status, json.loads(body)) == (200, {"reopened": [str(path)]})
    assert gateway.get("/four")[0] == 200
    assert wait_for_lines(path, 1) == ["/four"]
    assert gateway.request("GET", "/reopen_logs", port=gateway.admin)[0] == 405


def test_workers_reopen_on_the_admin_request(start_gateway: Start, upstream: str,
                                             tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    gateway = start_gateway(gateway_doc(upstream, extra=(
        f"  accessLog:\n    path: {path}\n    format: '%REQ(:PATH)%'\n")), "--workers", "2")
    for i in range(6):  # a connection each: both workers' files get opened
        assert gateway.get(f"/before{i}", headers={"connection": "close"})[0] == 200
    wait_for_lines(path, 6)
    path.rename(tmp_path / "access.log.1")
    status, _, body = gateway.request("POST", "/reopen_logs", port=gateway.admin)
    reply = json.loads(body)
    assert status == 200 and reply["reopened"] == [str(path)]
    assert [(w["worker"], w.get("reopened")) for w in reply["workers"]] == [
        (0, [str(path)]), (1, [str(path)])]
    for i in range(6):
        assert gateway.get(f"/after{i}", headers={"connection": "close"})[0] == 200
    assert sorted(wait_for_lines(path, 6)) == sorted(f"/after{i}" for i in range(6))
    assert sorted(wait_for_lines(tmp_path / "access.log.1", 6)) == sorted(
        f"/before{i}" for i in range(6))


def test_a_path_a_reload_drops_is_closed_when_its_last_request_is_logged(
        tmp_path: Path) -> None:
    """A request begun before the reload logs to the path it began with, however long it
    runs; the file is closed once it has, and later requests log to the new path."""
    def open_paths() -> set[str]:
        found = set()
        for fd in Path("/proc/self/fd").iterdir():
            with contextlib.suppress(OSError):
                found.add(os.readlink(fd))
        return found

    first, second = tmp_path / "first.log", tmp_path / "second.log"

    async def main() -> None:
        release = asyncio.Event()
        upstream = await slow_upstream(release)
        address = f"127.0.0.1:{upstream.sockets[0].getsockname()[1]}"
        config = tmp_path / "gateway.yaml"
        listen = free_port()

        def write(path: Path) -> None:
            config.write_text(gateway_doc(address, extra=(
                f"  listen: 127.0.0.1:{listen}\n  admin: 127.0.0.1:0\n"
                f"  accessLog:\n    path: {path}\n    format: '%REQ(:PATH)%'\n")))

        write(first)
        app = GatewayApp([config], drain_seconds=0.1, reload_interval=0)
        await app.start()
        try:
            reader, writer = await get(listen, "/slow")
            await asyncio.wait_for(reader.readuntil(b"first\r\n"), 10)
            write(second)
            assert await app.reload()
            await asyncio.sleep(1.5)  # past the old fixed delay (the drain, plus a second)
            assert str(first) in open_paths()  # the slow request will still log there
            release.set()
            await read_to_end(reader)
            writer.close()
            for _ in range(100):
                if str(first) not in open_paths():
                    break
                await asyncio.sleep(0.02)
            assert str(first) not in open_paths()
            await fetch(listen, "/later")
        finally:
            await app.stop()
            upstream.close()

    asyncio.run(main())
    assert first.read_text() == "/slow\n"
    assert second.read_text() == "/later\n"
