"""The admin endpoint (loopback by default), shaped after Envoy's.

GET /stats/prometheus   plugin-defined metrics under their own names, then gateway and
                        per-plugin metrics (requests, crashes, callback time, VM memory)
GET /config_dump        the resolved plugins in chain order with digests and status
GET /plugins            each plugin's status: loading, ready, failed (with the reason)
GET /ready              200 once every plugin finished loading (ready or failed), else 503
GET|POST /logging       list levels; `?<plugin>=<level>` (or `?all=trace`) sets them live
GET /stats/worker       this process's own gateway, plugin and fetch numbers as JSON
POST /reopen_logs       access log files opened again by their paths (after logrotate; also
                        SIGUSR1)

With `--workers N` every worker has an admin endpoint (worker 0 on the configured address, the
others on 127.0.0.1 with a free port, which each writes into the workers' table of the shared
metrics file: shared_metrics.py). Worker 0 answers /stats/prometheus, /plugins and /ready for
the whole gateway: it fetches `/stats/worker` from the other workers concurrently (at most
WORKER_TIMEOUT seconds, READY_TIMEOUT for /ready) and combines the snapshots (stats.py).
Plugin-defined metrics need no gathering: they are one set in the shared file. A worker that
does not answer in time, or has exited, is reported with `wasmgate_worker_up{worker="N"} 0`.
A slow worker's last snapshot (if it ever answered) stays in the sums; an exited worker's
keeps its counters there (they never go backwards) but not its gauges (plugin ready, VM
memory). When the workers' table shows a new process (pid, start time) for an index (the
parent respawned it), the old process's last snapshot is folded into that index's retained
counters, which stay in the sums, and the new process counts from zero. /plugins gives each
worker's state. /ready answers within READY_TIMEOUT (a kubelet probe times out after 1 s by
default): 200 once every running worker has started, answered and
finished loading its plugins (an exited worker is left out), else 503 naming the workers.
/logging and /reopen_logs are applied by worker 0 and then by every other worker (the same
request to their admins); the answer says what each worker did, and which did not answer
(not an error: those keep their levels). An exited worker is one whose pid is gone, a
zombie, or names a process started at another time than the one recorded at spawn (a reused
pid).
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
    without_gauges,
)

if TYPE_CHECKING:
    from .app import GatewayApp

log = logging.getLogger("wasmgate.admin")
Reply = tuple[int, bytes, bytes]
_GATHERED = ("/stats/prometheus", "/plugins", "/ready")
_EVERYWHERE = ("/logging", "/reopen_logs")  # applied by worker 0, then by every other one


@dataclass
class WorkerView:
    """One worker as worker 0 sees it for one admin request."""

    index: int
    pid: int
    state: str  # up | not answering | starting | exited
    snapshot: dict[str, Any] | None  # current if up, else the last one received (or None)


class AdminServer:
    WORKER_TIMEOUT = 2.0
    """Seconds worker 0 waits for the other workers' snapshots (and /logging answers)."""
    READY_TIMEOUT = 0.4
    """... for /ready's: a probe must be answered within its own timeout (kubelet: 1 s)."""

    def __init__(self, app: GatewayApp) -> None:
        self.app = app
        self.server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._last: dict[int, dict[str, Any]] = {}
        self._ident: dict[int, tuple[int, int]] = {}  # index -> (pid, start) of _last's process
        self._retained: dict[int, dict[str, Any]] = {}  # index -> its replaced processes' sums

    async def start(self, host: str, port: int) -> None:
        # SO_REUSEADDR: a respawned worker 0 binds the address its predecessor's connections
        # may still hold in TIME_WAIT
        self.server = await asyncio.start_server(self._serve, host, port, reuse_address=True)
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
        path = urlsplit(target).path
        if store is not None and index == 0 and path in _GATHERED:
            timeout = self.READY_TIMEOUT if path == "/ready" else self.WORKER_TIMEOUT
            return self.handle(method, target, await self.gather(store, timeout))
        if store is not None and index == 0 and path in _EVERYWHERE:
            return await self._everywhere(store, method, target)
        return self.handle(method, target)

    def handle(self, method: str, target: str, workers: list[WorkerView] | None = None) -> Reply:
        url = urlsplit(target)
        query = parse_qsl(url.query, keep_blank_values=True)
        routes = {"/stats/prometheus": self._prometheus, "/config_dump": self._config_dump,
                  "/plugins": self._plugins, "/ready": self._ready, "/logging": self._logging,
                  "/stats/worker": self._stats_worker, "/reopen_logs": self._reopen_logs}
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

    def _others(self, store: ProcessMetricStore) -> list[tuple[int, int, int, int]]:
        """(index, pid, admin port, start time) of every other worker."""
        own = getattr(self.app, "worker", 0)
        return [(i, *entry) for i, entry in enumerate(store.worker_entries()) if i != own]

    async def gather(self, store: ProcessMetricStore,
                     timeout: float | None = None) -> list[WorkerView]:
        """Every worker's view: this one's snapshot, the others' fetched concurrently (each
        within `timeout` seconds, WORKER_TIMEOUT by default)."""
        others = self._others(store)
        wait = self.WORKER_TIMEOUT if timeout is None else timeout
        fetched = await asyncio.gather(*(self._fetch(*w, wait) for w in others))
        views = [WorkerView(getattr(self.app, "worker", 0), os.getpid(), "up", self.snapshot())]
        for (index, pid, port, start), snapshot in zip(others, fetched, strict=True):
            if self._ident.setdefault(index, (pid, start)) != (pid, start):
                self._replaced(index)
                self._ident[index] = (pid, start)
            if snapshot is not None:
                self._last[index] = snapshot
            state = _state(pid, port, start, snapshot is not None)
            views.append(WorkerView(index, pid, state, snapshot or self._last.get(index)))
        return sorted(views, key=lambda v: v.index)

    def _replaced(self, index: int) -> None:
        """Worker `index` is a new process (the parent respawned it): fold the old one's last
        counters into the index's retained sums (counters never go backwards); the new
        process counts from zero."""
        old = self._last.pop(index, None)
        if old is None:
            return
        log.info("worker %d is a new process: keeping its predecessor's counters", index)
        parts = [without_gauges(old), *([self._retained[index]] if index in self._retained
                                        else [])]
        self._retained[index] = {
            "worker": index, "pid": 0,
            "gateway": GatewayStats.combined(p["gateway"] for p in parts).snapshot(),
            "plugins": combine_plugins(p["plugins"] for p in parts),
            "fetch": fetch_snapshot(combine_fetch(p["fetch"] for p in parts))}

    async def _fetch(self, index: int, pid: int, port: int, start: int,
                     timeout: float) -> dict[str, Any] | None:
        reply = await self._ask(index, pid, port, start, "/stats/worker", timeout)
        if reply is None or reply[0] != 200:
            return None
        try:
            snapshot = json.loads(reply[1])
        except ValueError:
            return None
        if not isinstance(snapshot, dict) or snapshot.get("worker") != index \
                or snapshot.get("pid", pid) != pid \
                or not {"gateway", "plugins", "fetch"} <= snapshot.keys():
            return None
        return snapshot

    async def _ask(self, index: int, pid: int, port: int, start: int, target: str,
                   timeout: float, method: str = "GET") -> tuple[int, bytes] | None:
        """(status, body) of `method` `target` on worker `index`'s admin; None if it is not
        running, not listening yet, or did not answer within `timeout` seconds."""
        if not port or (pid and not _alive(pid, start)):
            return None
        try:
            return await asyncio.wait_for(_get("127.0.0.1", port, target, method), timeout)
        except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError) as exc:
            log.debug("worker %d (pid %d, admin port %d) did not answer %s: %r", index, pid,
                      port, target, exc)
            return None

    def _snapshots(self, workers: list[WorkerView]) -> list[dict[str, Any]]:
        """The snapshots to combine: an exited worker's last one without its gauges, then the
        counters of the processes respawned workers replaced."""
        return [without_gauges(w.snapshot) if w.state == "exited" else w.snapshot
                for w in workers if w.snapshot is not None] \
            + [self._retained[i] for i in sorted(self._retained)]

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
                               "draining": self.app.draining_statuses(),
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
        waiting, unknown = [], []
        for w in workers:
            if w.state == "exited":
                continue
            if w.state != "up" or w.snapshot is None:  # its last snapshot is no answer now
                unknown.append(f"worker {w.index} {w.state}"
                               + (f" (within {self.READY_TIMEOUT:g} s)"
                                  if w.state == "not answering" else ""))
                continue
            loading = [str(p["name"]) for p in w.snapshot["plugins"]
                       if p["status"] == "loading"]
            if loading:
                waiting.append(" ".join(loading) if len(workers) == 1
                               else f"worker {w.index}: " + " ".join(loading))
        if waiting or unknown:
            parts = ([f"NOT READY {'; '.join(unknown)}"] if unknown else []) \
                + ([f"LOADING {'; '.join(waiting)}"] if waiting else [])
            return 503, b"text/plain", "\n".join(parts).encode()
        return 200, b"text/plain", b"LIVE\n"

    def _logging(self, method: str, query: list[tuple[str, str]]) -> Reply:
        """This worker's plugins' levels; every name and level is checked before any is set
        (a 400 or 404 changed nothing)."""
        if query and method != "POST":  # (a state change on GET: Envoy refuses it too)
            return 405, b"text/plain", b"POST /logging?NAME=LEVEL to change a level\n"
        plugins = self.app.plugins
        wanted = []
        for name, value in query:
            try:
                level = LogLevel.parse(value)
            except ValueError as exc:
                return 400, b"text/plain", f"{exc}\n".encode()
            if not any(name in ("all", m.slot.name, m.resource.name)
                       for m in plugins.managed.values()):
                return 404, b"text/plain", f"no plugin named {name!r}\n".encode()
            wanted.append((name, level))
        changed: dict[str, str] = {}
        for name, level in wanted:
            for n in plugins.set_log_level(name, level):
                changed[n] = level.name.lower()
        levels = {m.slot.name: m.log_level.name.lower() for m in plugins.managed.values()}
        return _json({"changed": changed, "levels": levels})

    def _reopen_logs(self, method: str, query: list[tuple[str, str]]) -> Reply:
        """Envoy's /reopen_logs: access log files opened again by their paths (logrotate)."""
        if method != "POST":
            return 405, b"text/plain", b"POST /reopen_logs\n"
        return _json({"reopened": self.app.reopen_logs()})

    async def _everywhere(self, store: ProcessMetricStore, method: str, target: str) -> Reply:
        """/logging or /reopen_logs on worker 0 of `--workers N`: here first (a bad level or
        name stops it here), then the same request to every other worker's admin,
        concurrently. The answer is this worker's, plus `workers`: what each did (`changed`
        and `levels`, or `reopened`), or its state and `error` when it did not do it."""
        status, content_type, body = self.handle(method, target)
        if status != 200:
            return status, content_type, body
        mine = json.loads(body)
        others = self._others(store)
        replies = await asyncio.gather(*(self._ask(*w, target, self.WORKER_TIMEOUT, method)
                                         for w in others))
        report: list[dict[str, Any]] = [{"worker": getattr(self.app, "worker", 0),
                                         "pid": os.getpid(), "state": "up", **mine}]
        for (index, pid, port, start), reply in zip(others, replies, strict=True):
            entry: dict[str, Any] = {"worker": index, "pid": pid,
                                     "state": _state(pid, port, start, reply is not None)}
            if reply is None:
                entry["error"] = {"exited": "exited",
                                  "starting": "not listening yet: not changed"}.get(
                    entry["state"], f"no answer within {self.WORKER_TIMEOUT:g} s: not changed")
            elif reply[0] != 200:
                entry["error"] = f"{reply[0]}: {reply[1].decode(errors='replace').strip()}"
            else:
                try:
                    entry.update(json.loads(reply[1]))
                except ValueError as exc:
                    entry["error"] = f"unreadable answer: {exc}"
            if "error" in entry and entry["state"] != "exited" and (
                    urlsplit(target).query or method == "POST"):
                log.warning("%s: worker %d did not apply it: %s", target, index,
                            entry["error"])
            report.append(entry)
        report.sort(key=lambda e: int(e["worker"]))
        return _json({**mine, "workers": report})


def _json(value: object) -> Reply:
    return 200, b"application/json", json.dumps(value, indent=2, default=str).encode() + b"\n"


async def _get(host: str, port: int, target: str, method: str = "GET") -> tuple[int, bytes]:
    """`method` `target` on another worker's admin endpoint (ours: content-length framed)."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"{method} {target} HTTP/1.1\r\nhost: {host}\r\n\r\n".encode())
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = head[0].split()[1:2]
        if not status or not status[0].isdigit():
            raise ValueError(f"status line {head[0]!r}")
        lengths = [int(line.split(":", 1)[1]) for line in head[1:]
                   if line.lower().startswith("content-length:")]
        if not lengths:
            raise ValueError("no content-length")
        return int(status[0]), await reader.readexactly(lengths[0])
    finally:
        writer.close()


def _state(pid: int, port: int, start: int, answered: bool) -> str:
    """A worker's state for one admin request."""
    if answered:
        return "up"
    if pid and not _alive(pid, start):
        return "exited"
    return "not answering" if port else "starting"


def _alive(pid: int, start: int = 0) -> bool:
    """Whether process `pid` runs (a zombie, exited but not yet reaped, does not) and, when
    `start` is known, is the process that started then (not a later one given the same pid)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except FileNotFoundError:
        if os.path.isdir("/proc/self"):
            return False  # procfs, and no such process
        fields = None
    except (OSError, IndexError):
        fields = None
    if fields is None:  # no procfs: ask the kernel whether the pid exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    if fields[:1] == [b"Z"]:
        # The leader thread is a zombie, but the process has exited only when its last thread
        # has: until then its files (its listening socket among them) stay open.
        try:
            return len(os.listdir(f"/proc/{pid}/task")) > 1
        except OSError:
            return False
    return not start or fields[19:20] == [str(start).encode()]
