"""End-to-end fixtures: a real upstream HTTP server and the gateway started as a user would."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

WASMGATE = Path(sys.executable).parent / "wasmgate"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EchoHandler(BaseHTTPRequestHandler):
    """Answers with a JSON echo of the request; /slow sleeps first; /status/N answers N."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self._answer()

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def _answer(self, send_body: bool = True) -> None:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            body = self._read_chunked()
        else:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else b""
        if self.path.startswith("/slow"):
            time.sleep(1.5)
        status = int(self.path.split("/")[2]) if self.path.startswith("/status/") else 200
        echo = {"method": self.command, "path": self.path,
                "headers": [[k.lower(), v] for k, v in self.headers.items()],
                "body": body.decode("utf-8", "replace")}
        payload = json.dumps(echo).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.send_header("x-upstream", "echo")
        self.end_headers()
        if send_body:
            self.wfile.write(payload)

    def _read_chunked(self) -> bytes:
        body = b""
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return body
            body += self.rfile.read(size)
            self.rfile.readline()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def upstream() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), EchoHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class Gateway:
    """A `wasmgate run` process and small HTTP helpers against it."""

    def __init__(self, process: subprocess.Popen[str], port: int, admin: int,
                 log_path: Path) -> None:
        self.process, self.port, self.admin, self.log_path = process, port, admin, log_path

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict[str, str] | None = None, port: int | None = None,
                timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", port or self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            data = response.read()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, data
        finally:
            conn.close()

    def get(self, path: str, **kw: object) -> tuple[int, dict[str, str], bytes]:
        return self.request("GET", path, **kw)  # type: ignore[arg-type]

    def admin_get(self, path: str) -> tuple[int, bytes]:
        status, _, body = self.request("GET", path, port=self.admin)
        return status, body

    def admin_json(self, path: str) -> dict:  # type: ignore[type-arg]
        return json.loads(self.admin_get(path)[1])

    def admin_post(self, path: str) -> tuple[int, bytes]:
        status, _, body = self.request("POST", path, port=self.admin)
        return status, body

    def admin_post_json(self, path: str) -> dict:  # type: ignore[type-arg]
        return json.loads(self.admin_post(path)[1])

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_logged(self, text: str, timeout: float = 10) -> str:
        """The logs once they contain `text` (access log lines are flushed within a second)."""
        deadline = time.monotonic() + timeout
        while text not in (logs := self.logs()):
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not logged in {timeout}s:\n{logs}")
            time.sleep(0.05)
        return logs

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"gateway exited {self.process.returncode}:\n{self.logs()}")
            with contextlib.suppress(OSError):
                if self.admin_get("/ready")[0] == 200:
                    return
            time.sleep(0.1)
        raise AssertionError(f"gateway not ready in {timeout}s:\n{self.logs()}")


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator[Callable[..., Gateway]]:
    started: list[Gateway] = []

    def start(config: str, *args: str, wait: bool = True) -> Gateway:
        config_path = tmp_path / f"config-{len(started)}.yaml"  # one each: no cross-reloads
        config_path.write_text(config)
        port, admin = free_port(), free_port()
        log_path = tmp_path / f"gateway-{len(started)}.log"
        env = dict(os.environ, WASMGATE_CACHE_DIR=str(Path.home() / ".cache" / "wasmgate"))
        process = subprocess.Popen(
            [str(WASMGATE), "run", "-c", str(config_path), "--listen", f"127.0.0.1:{port}",
             "--admin", f"127.0.0.1:{admin}", "--log-level", "debug", "--access-log", *args],
            stdout=log_path.open("w"), stderr=subprocess.STDOUT, text=True, env=env)
        gateway = Gateway(process, port, admin, log_path)
        gateway.config_path = config_path  # type: ignore[attr-defined]
        started.append(gateway)
        if wait:
            gateway.wait_ready()
        return gateway

    yield start
    for gateway in started:
        if gateway.process.poll() is None:
            gateway.process.terminate()
            try:
                gateway.process.wait(10)
            except subprocess.TimeoutExpired:
                gateway.process.kill()
