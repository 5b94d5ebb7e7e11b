"""The admin endpoint (loopback by default), shaped after Envoy's.

GET /stats/prometheus   plugin-defined metrics under their own names, then gateway and
                        per-plugin metrics (requests, crashes, callback time, VM memory)
GET /config_dump        the resolved plugins in chain order with digests and status
GET /plugins            each plugin's status: loading, ready, failed (with the reason)
GET /ready              200 once every plugin finished loading (ready or failed), else 503
GET|POST /logging       list levels; `?<plugin>=<level>` (or `?all=trace`) sets them live
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, urlsplit

from ..runtime.abi import LogLevel
from .http1 import simple_response

if TYPE_CHECKING:
    from .app import GatewayApp

log = logging.getLogger("wasmgate.admin")


class AdminServer:
    def __init__(self, app: GatewayApp) -> None:
        self.app = app
        self.server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self, host: str, port: int) -> None:
        self.server = await asyncio.start_server(self._serve, host, port)

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for writer in list(self._writers):
                writer.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
                parts = request_line.split()
                if len(parts) != 3:
                    writer.write(simple_response(400, b"bad request\n", keep_alive=False))
                    break
                method, target = parts[0], parts[1]
                status, content_type, body = self.handle(method, target)
                writer.write(simple_response(status, body, content_type=content_type))
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError,
                asyncio.CancelledError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    def handle(self, method: str, target: str) -> tuple[int, bytes, bytes]:
        url = urlsplit(target)
        query = parse_qsl(url.query, keep_blank_values=True)
        routes = {"/stats/prometheus": self._prometheus, "/config_dump": self._config_dump,
                  "/plugins": self._plugins, "/ready": self._ready, "/logging": self._logging}
        handler = routes.get(url.path)
        if handler is None:
            return 404, b"text/plain", b"unknown admin path; try " + ", ".join(routes).encode()
        return handler(method, query)

    # -- handlers ----------------------------------------------------------------------------
    def _prometheus(self, method: str, query: list[tuple[str, str]]) -> tuple[int, bytes, bytes]:
        text = "\n".join(self.app.prometheus_lines()) + "\n"
        return 200, b"text/plain; version=0.0.4", text.encode()

    def _config_dump(self, method: str, query: list[tuple[str, str]]) -> tuple[int, bytes, bytes]:
        return _json(self.app.config_dump())

    def _plugins(self, method: str, query: list[tuple[str, str]]) -> tuple[int, bytes, bytes]:
        return _json({"plugins": self.app.plugin_statuses(), "config_errors":
                      self.app.config_errors})

    def _ready(self, method: str, query: list[tuple[str, str]]) -> tuple[int, bytes, bytes]:
        loading = [p["name"] for p in self.app.plugin_statuses() if p["status"] == "loading"]
        if loading:
            return 503, b"text/plain", ("LOADING " + " ".join(map(str, loading))).encode()
        return 200, b"text/plain", b"LIVE\n"

    def _logging(self, method: str, query: list[tuple[str, str]]) -> tuple[int, bytes, bytes]:
        changed: dict[str, str] = {}
        for name, value in query:
            try:
                level = LogLevel.parse(value)
            except ValueError as exc:
                return 400, b"text/plain", f"{exc}\n".encode()
            names = self.app.plugins.set_log_level(name, level)
            if not names:
                return 404, b"text/plain", f"no plugin named {name!r}\n".encode()
            for n in names:
                changed[n] = level.name.lower()
        levels = {m.slot.name: m.log_level.name.lower()
                  for m in self.app.plugins.managed.values()}
        return _json({"changed": changed, "levels": levels})


def _json(value: object) -> tuple[int, bytes, bytes]:
    return 200, b"application/json", json.dumps(value, indent=2, default=str).encode() + b"\n"
