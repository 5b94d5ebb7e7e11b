"""The admin endpoint (loopback by default), shaped after Envoy's.

GET /stats/prometheus   plugin-defined metrics under their own names, then gateway and
                        per-plugin metrics (requests, crashes, callback time, VM memory)
GET /config_dump        the resolved plugins in chain order with digests and status
GET /plugins            each plugin's status: loading, ready, failed (with the reason)
GET /ready              200 once every plugin finished loading (ready or failed), else 503
GET|POST /logging       list levels; `?<plugin>=<level>` (or `?all=trace`) sets them live
GET /stats/worker       this process's own gateway, plugin and fetch numbers as JSON

With `--workers N` every worker has an admin endpoint (worker 0 on the configured address, the
others on 127.0.0.1 with a free port, which each writes into the workers' table of the shared
metrics file: shared_metrics.py). Worker 0 answers /stats/prometheus, /plugins and /ready for
the whole gateway: it fetches `/stats/worker` from the other workers concurrently (at most
WORKER_TIMEOUT seconds) and combines the snapshots (stats.py). Plugin-defined metrics need no
gathering: they are one set in the shared file. A worker that does not answer in time, or has
exited, is reported with `wasmgate_worker_up{worker="N"} 0` and its last snapshot (if it ever
answered) stays in the sums, so counters never go backwards; /plugins gives each worker's
state. /ready waits for every worker that is running to have started and finished loading
its plugins (an exited worker is left out).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from ..runtime.abi import LogLevel
from .http1 import simple_response
from .shared_metrics import ProcessMetricStore
from .stats import (
    GatewayStats,
    combine_fetch,
    combine_plugins,
    fetch_snapshot,
    render_gateway,
    render_plugin_metrics,
    render_workers,
)

if TYPE_CHECKING:
    from .app import GatewayApp

log = logging.getLogger("wasmgate.admin")
Reply = tuple[int, bytes, bytes]
_GATHERED = ("/stats/prometheus", "/plugins", "/ready")


@dataclass
class WorkerView:
    """One worker as worker 0 sees it for one admin request."""

    index: int
    pid: int
    state: str  # up | not answering | starting | exited
    snapshot: dict[str, Any] | None  # current if up, else the last one received (or None)


class AdminServer:
    WORKER_TIMEOUT = 2.0
    """Seconds worker 0 waits for the other workers' snapshots."""

    def __init__(self, app: GatewayApp) -> None:
        self.app = app
        self.server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._last: dict[int, dict[str, Any]] = {}

    async def start(self, host: str, port: int) -> None:
        self.server = await asyncio.start_server(self._serve, host, port)
        store, index = self._workers()
        if store is not None and index is not None:
            store.set_worker(index, pid=os.getpid(), port=self.port)

    def _workers(self) -> tuple[ProcessMetricStore | None, int | None]:
        """The shared store with the workers' table, and this worker's index (--workers)."""
        store = getattr(self.app, "metric_store", None)
        if isinstance(store, ProcessMetricStore) and store.workers > 1:
            return store, getattr(self.app, "worker", None)
        return None, None

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
                status, content_type, body = await self.respond(method, target)
                writer.write(simple_response(status, body, content_type=content_type))
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError,
                asyncio.CancelledError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def respond(self, method: str, target: str) -> Reply:
        """`handle`, after gathering the other workers' snapshots where the answer covers the
        whole gateway (worker 0 of `--workers N`)."""
        store, index = self._workers()
        if store is not None and index == 0 and urlsplit(target).path in _GATHERED:
            return self.handle(method, target, await self.gather(store))
        return self.handle(method, target)

    def handle(self, method: str, target: str, workers: list[WorkerView] | None = None) -> Reply:
        url = urlsplit(target)
        query = parse_qsl(url.query, keep_blank_values=True)
        routes = {"/stats/prometheus": self._prometheus, "/config_dump": self._config_dump,
                  "/plugins": self._plugins, "/ready": self._ready, "/logging": self._logging,
                  "/stats/worker": self._stats_worker}
        handler = routes.get(url.path)
        if handler is None:
            return 404, b"text/plain", b"unknown admin path; try " + ", ".join(routes).encode()
        if url.path in _GATHERED:
            return handler(method, query, workers)  # type: ignore[operator]
        return handler(method, query)  # type: ignore[operator]

    # -- the workers (--workers N) -------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """This process's own numbers (`/stats/worker`)."""
        app = self.app
        return {"worker": getattr(app, "worker", None) or 0, "pid": os.getpid(),
                "gateway": app.stats.snapshot(), "plugins": app.plugin_statuses(),
                "fetch": fetch_snapshot(app.plugins.fetcher.metrics),
                "config_errors": app.config_errors}

    async def gather(self, store: ProcessMetricStore) -> list[WorkerView]:
        """Every worker's view: this one's snapshot, the others' fetched concurrently."""
        table = store.worker_table()
        own = getattr(self.app, "worker", 0)
        others = [i for i in range(len(table)) if i != own]
        fetched = await asyncio.gather(*(self._fetch(i, *table[i]) for i in others))
        views = [WorkerView(own, os.getpid(), "up", self.snapshot())]
        for index, snapshot in zip(others, fetched, strict=True):
            pid, port = table[index]
            if snapshot is not None:
                self._last[index] = snapshot
                state = "up"
            elif pid and not _alive(pid):
                state = "exited"
            elif not port:
                state = "starting"
            else:
                state = "not answering"
            views.append(WorkerView(index, pid, state, snapshot or self._last.get(index)))
        return sorted(views, key=lambda v: v.index)

    async def _fetch(self, index: int, pid: int, port: int) -> dict[str, Any] | None:
        if not port or (pid and not _alive(pid)):
            return None
        try:
            snapshot = await asyncio.wait_for(_get_json("127.0.0.1", port, "/stats/worker"),
                                              self.WORKER_TIMEOUT)
        except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError) as exc:
            log.debug("worker %d (pid %d, admin port %d) did not answer: %r", index, pid, port,
                      exc)
            return None
        if not isinstance(snapshot, dict) or snapshot.get("worker") != index \
                or not {"gateway", "plugins", "fetch"} <= snapshot.keys():
            return None
        return snapshot

    @staticmethod
    def _snapshots(workers: list[WorkerView]) -> list[dict[str, Any]]:
        return [w.snapshot for w in workers if w.snapshot is not None]

    # -- handlers ----------------------------------------------------------------------------
    def _prometheus(self, method: str, query: list[tuple[str, str]],
                    workers: list[WorkerView] | None) -> Reply:
        text = "\n".join(self.prometheus_lines(workers)) + "\n"
        return 200, b"text/plain; version=0.0.4", text.encode()

    def prometheus_lines(self, workers: list[WorkerView] | None = None) -> list[str]:
        """Plugin-defined metrics, then the gateway's, per-plugin and fetch metrics over
        `workers` (this process alone when None)."""
        app = self.app
        store = app.plugins.host.metric_store
        snapshots = [self.snapshot()] if workers is None else self._snapshots(workers)
        lines = (render_plugin_metrics(store.all())
                 + render_gateway(GatewayStats.combined(s["gateway"] for s in snapshots),
                                  combine_plugins(s["plugins"] for s in snapshots))
                 + combine_fetch(s["fetch"] for s in snapshots).prometheus_lines())
        if workers is not None and isinstance(store, ProcessMetricStore):
            lines += render_workers({w.index: w.state for w in workers}, store.refused)
        return lines

    def _stats_worker(self, method: str, query: list[tuple[str, str]]) -> Reply:
        return _json(self.snapshot())

    def _config_dump(self, method: str, query: list[tuple[str, str]]) -> Reply:
        return _json(self.app.config_dump())

    def _plugins(self, method: str, query: list[tuple[str, str]],
                 workers: list[WorkerView] | None) -> Reply:
        """This worker's plugins; with `--workers`, also each worker's state and plugins."""
        out: dict[str, Any] = {"plugins": self.app.plugin_statuses(),
                               "config_errors": self.app.config_errors}
        if workers is not None:
            keys = ("name", "status", "error", "crashes", "reloads", "streams", "memory_bytes")
            out["workers"] = [
                {"worker": w.index, "pid": w.pid, "state": w.state,
                 "plugins": ([{k: p.get(k) for k in keys} for p in w.snapshot["plugins"]]
                             if w.snapshot is not None else None)}
                for w in workers]
        return _json(out)

    def _ready(self, method: str, query: list[tuple[str, str]],
               workers: list[WorkerView] | None) -> Reply:
        if workers is None:
            workers = [WorkerView(0, os.getpid(), "up",
                                  {"plugins": self.app.plugin_statuses()})]
        waiting = []
        for w in workers:
            if w.state == "exited":
                continue
            if w.snapshot is None:
                waiting.append(f"worker {w.index} {w.state}")
                continue
            loading = [str(p["name"]) for p in w.snapshot["plugins"]
                       if p["status"] == "loading"]
            if loading:
                waiting.append(" ".join(loading) if len(workers) == 1
                               else f"worker {w.index}: " + " ".join(loading))
        if waiting:
            return 503, b"text/plain", ("LOADING " + "; ".join(waiting)).encode()
        return 200, b"text/plain", b"LIVE\n"

    def _logging(self, method: str, query: list[tuple[str, str]]) -> Reply:
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


def _json(value: object) -> Reply:
    return 200, b"application/json", json.dumps(value, indent=2, default=str).encode() + b"\n"


async def _get_json(host: str, port: int, path: str) -> Any:
    """GET `path` from another worker's admin endpoint (ours: content-length framed)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nhost: {host}\r\n\r\n".encode())
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        if head[0].split()[1:2] != ["200"]:
            raise ValueError(f"status line {head[0]!r}")
        lengths = [int(line.split(":", 1)[1]) for line in head[1:]
                   if line.lower().startswith("content-length:")]
        if not lengths:
            raise ValueError("no content-length")
        return json.loads(await reader.readexactly(lengths[0]))
    finally:
        writer.close()


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, exited but not yet reaped, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
