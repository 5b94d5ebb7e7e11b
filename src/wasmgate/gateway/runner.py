"""Running the gateway from the command line: logging, the event loop, worker processes.

With `--workers N` the parent starts N processes that each run a full gateway on the same
port (SO_REUSEPORT; the kernel spreads connections). Each worker has its own plugins and VMs,
as each Envoy worker thread has its own VMs; shared data (with CAS) and shared queues are ONE
store across the workers (a memory-mapped file, see shared_store.py and shared_queues.py), as
across Envoy's worker threads; so are plugin-defined metrics (shared_metrics.py). The admin
endpoint is worker 0's; the other workers serve theirs on 127.0.0.1 (a free port, written into
the metrics file's workers' table), and worker 0 gathers their gateway and per-plugin stats
from there for /stats/prometheus, /plugins and /ready, and passes /logging on to them
(admin.py). A Gateway with
`spec.sharedData: redis://...` puts shared data in that Redis instead (each worker connects).
The parent supervises the workers (`_Supervisor`): one that exits while the gateway is not
shutting down is started again with the same index, after a backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import time
from pathlib import Path

from .access_log import MAX_RELAYED_BATCH, AccessLogWriter, relay_batch
from .app import ConfigInvalid, GatewayApp
from .shared_metrics import ProcessMetricStore
from .shared_queues import ProcessSharedQueues
from .shared_store import ProcessSharedData

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
WORKER_LOG_FORMAT = "%(asctime)s %(levelname)-7s [%(processName)s] %(name)s: %(message)s"
"""With --workers, each line says which worker wrote it (as Envoy's logs carry a thread id)."""


def setup_logging(level: str, *, worker: bool = False) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()),
                        format=WORKER_LOG_FORMAT if worker else LOG_FORMAT, stream=sys.stderr)
    # Plugin logs are filtered by each plugin's own level (admin /logging); let them all through
    # here, trace included.
    logging.addLevelName(5, "TRACE")
    logging.getLogger("wasmgate.wasm").setLevel(1)
    # httpx logs every request's full URL at INFO, credentials included (a module URL may
    # carry them); wasmgate's fetch logs say what it fetched, redacted.
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.root.level))


def _event_loop_policy() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; stay usable without it
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def _serve(app: GatewayApp) -> None:
    await app.start()
    await app.serve_forever()


_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """Linux: SIGTERM this worker when its parent dies. A SIGKILLed (or OOM-killed) supervisor
    would otherwise leave its workers serving unsupervised, holding the port, with nobody to
    respawn them or to remove the shared files; this way they drain and stop, and the last one
    out removes the files (see `_worker`)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the workers outlive a killed parent
        return
    if os.getppid() != parent:  # it died before prctl took effect: nothing will signal
        sys.exit(0)


def _worker(configs: list[Path], options: dict[str, object], index: int,
            shared_data: ProcessSharedData, metrics: ProcessMetricStore, parent: int) -> None:
    # Until the event loop handles SIGTERM (a drain), it ends the worker through the
    # `finally` below, so an orphan removes the shared files even while starting.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # (a log rotation while starting: no-op)
    try:
        _die_with_parent(parent)
        level = str(options.pop("log_level"))
        setup_logging(level, worker=True)
        options["plugin_log_level"] = "warn" if level == "warning" else level
        _event_loop_policy()
        if index > 0:
            options["admin"] = ("127.0.0.1", 0)
        queues = ProcessSharedQueues(shared_data, index)
        app = GatewayApp(configs, reuse_port=True, shared_data=shared_data,
                         shared_queues=queues, metric_store=metrics, worker=index,
                         **options)  # type: ignore[arg-type]
        asyncio.run(_serve(app))
    except ConfigInvalid as exc:  # changed between the parent's check and this worker's load
        logging.getLogger("wasmgate").error("invalid configuration:\n%s", exc)
        sys.exit(2)
    except OSError as exc:
        logging.getLogger("wasmgate").error("cannot start: %s", exc)
        sys.exit(1)
    finally:
        if os.getppid() != parent:  # orphaned: the parent cannot remove the shared files
            shared_data.unlink()
            metrics.unlink()


def _listen_port_free(host: str, port: int) -> None:
    """The workers bind with SO_REUSEPORT, which a second gateway started on the same port
    (as the same user) would share silently, each getting part of the traffic. A bind without
    it fails if anyone listens there: raise OSError (EADDRINUSE) then."""
    if port == 0:
        return
    for family, kind, proto, _, address in socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE):
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # (TIME_WAIT is fine)
            try:
                probe.bind(address)
            except OSError as exc:
                raise OSError(exc.errno, f"{host}:{port}: {exc.strerror}") from None


def _exit_on_sigterm(_signum: int, _frame: object) -> None:
    raise SystemExit(0)


def run_gateway(configs: list[Path], *, listen: tuple[str, int] | None,
                admin: tuple[str, int] | None, upstream: str | None, workers: int,
                log_level: str, access_log: bool | None = None,
                access_log_format: str | None = None, cache_dir: Path | None = None,
                ca_file: str | None = None, drain_seconds: float = 10.0) -> int:
    setup_logging(log_level)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # until the gateway reopens logs on it
    plugin_level = "warn" if log_level == "warning" else log_level
    if workers <= 1:
        _event_loop_policy()
        app = GatewayApp(configs, listen=listen, admin=admin, upstream=upstream,
                         cache_dir=cache_dir, plugin_log_level=plugin_level, ca_file=ca_file,
                         access_log=access_log, access_log_format=access_log_format,
                         drain_seconds=drain_seconds)
        try:
            asyncio.run(_serve(app))
        except ConfigInvalid as exc:
            logging.getLogger("wasmgate").error("invalid configuration:\n%s", exc)
            return 2
        except OSError as exc:
            logging.getLogger("wasmgate").error("cannot start: %s", exc)
            return 1
        return 0
    options = {"listen": listen, "admin": admin, "upstream": upstream, "log_level": log_level,
               "access_log": access_log, "access_log_format": access_log_format,
               "cache_dir": cache_dir, "ca_file": ca_file, "drain_seconds": drain_seconds}
    try:  # once, here, rather than N tracebacks from N workers
        gateway = GatewayApp(configs, listen=listen, admin=admin, upstream=upstream,
                             access_log=access_log,
                             access_log_format=access_log_format).check_config()
        _listen_port_free(gateway.spec.listen.host, gateway.spec.listen.port)
    except ConfigInvalid as exc:
        logging.getLogger("wasmgate").error("invalid configuration:\n%s", exc)
        return 2
    except OSError as exc:
        logging.getLogger("wasmgate").error("cannot start: %s", exc)
        return 1
    try:
        shared_data = ProcessSharedData.create()
    except OSError as exc:  # e.g. NoSpace: /dev/shm too small for the tables
        logging.getLogger("wasmgate").error("cannot start: %s", exc)
        return 1
    try:
        metrics = ProcessMetricStore.create(workers=workers)
    except OSError as exc:
        shared_data.close()
        shared_data.unlink()
        logging.getLogger("wasmgate").error("cannot start: %s", exc)
        return 1
    try:
        return _Supervisor(configs, options, workers, shared_data, metrics).run()
    finally:
        shared_data.close()
        shared_data.unlink()
        metrics.close()
        metrics.unlink()


class _Supervisor:
    """The parent of `--workers N`: starts the workers, forwards signals to them, and starts a
    new process with the same index when one exits while the gateway is not shutting down
    (after a backoff: RESPAWN_DELAY, doubled up to RESPAWN_MAX_DELAY while it keeps dying
    within STABLE_AFTER seconds of starting). A worker that exits with 1 or 2 (cannot start,
    invalid configuration) before its index ever listened (at startup) stops the gateway with
    that code; a respawned one that does is retried with the backoff (the other workers serve
    meanwhile)."""

    RESPAWN_DELAY = 0.5
    RESPAWN_MAX_DELAY = 30.0
    STABLE_AFTER = 10.0

    def __init__(self, configs: list[Path], options: dict[str, object], workers: int,
                 shared_data: ProcessSharedData, metrics: ProcessMetricStore) -> None:
        self.configs, self.options = configs, options
        self.shared_data, self.metrics = shared_data, metrics
        self.context = multiprocessing.get_context("spawn")
        self.processes: list[multiprocessing.process.BaseProcess | None] = [None] * workers
        self.started = [0.0] * workers  # monotonic start time of each worker's process
        self.delay = [self.RESPAWN_DELAY] * workers  # the next backoff of each index
        self.listened = [False] * workers  # whether a process of each index ever listened
        self.respawn_at: dict[int, float] = {}  # index -> when to start it again
        self.stopping = False
        self.exit_code = 0
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        # Access log lines the workers relay (for a pipe or terminal: one writer, whole
        # lines; access_log.py); read until EOF, also after their worker exited.
        self.relays: list[multiprocessing.connection.Connection] = []
        self.relay_writers: dict[str, AccessLogWriter] = {}
        self._to_forward: set[int] = set()  # SIGHUP / SIGUSR1 for the listening workers

    def run(self) -> int:
        log = logging.getLogger("wasmgate")
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(sig, self._forward)
        try:
            for index in range(len(self.processes)):
                self._start(index)
            while any(p is not None for p in self.processes) or \
                    (self.respawn_at and not self.stopping):
                now = time.monotonic()
                for index, when in sorted(self.respawn_at.items()):
                    if when <= now and self.respawn_at.pop(index, None) is not None:
                        self._start(index)
                due = min(self.respawn_at.values(), default=None)
                timeout = None if due is None else max(0.0, due - time.monotonic())
                sentinels = {p.sentinel: i for i, p in enumerate(self.processes)
                             if p is not None}
                ready = multiprocessing.connection.wait(
                    [*sentinels, self._wake_r, *self.relays], timeout)
                if self._wake_r in ready:
                    os.read(self._wake_r, 512)
                while self._to_forward:
                    signum = self._to_forward.pop()
                    self._kill_all(signum, listening_only=True)
                    if signum == signal.SIGUSR1:  # the logs this process writes too
                        for relay_writer in self.relay_writers.values():
                            relay_writer.reopen()
                for item in ready:
                    if item in sentinels:
                        self._exited(sentinels[item], log)  # type: ignore[index]
                    elif isinstance(item, multiprocessing.connection.Connection):
                        self._relay(item)
            while self.relays:  # what exited workers left in their pipes
                ready = multiprocessing.connection.wait(self.relays, 5)
                if not ready:  # (nothing more within 5 s: give up on the rest)
                    break
                for relay in ready:
                    self._relay(relay)  # type: ignore[arg-type]
        finally:
            os.close(self._wake_r)
            os.close(self._wake_w)
            for writer in self.relay_writers.values():
                writer.close()
        return self.exit_code

    def _relay(self, relay: multiprocessing.connection.Connection) -> None:
        try:
            relay_batch(self.relay_writers, relay.recv_bytes(MAX_RELAYED_BATCH))
        except (EOFError, OSError):  # the worker is gone and its pipe drained
            relay.close()
            self.relays.remove(relay)

    def _start(self, index: int) -> None:
        reader, writer = self.context.Pipe(duplex=False)
        options = {**self.options, "access_relay": writer}
        process = self.context.Process(
            target=_worker, args=(self.configs, options, index, self.shared_data,
                                  self.metrics, os.getpid()), name=f"wasmgate-worker-{index}")
        process.start()
        writer.close()  # the worker's copy only: EOF once it is gone
        self.relays.append(reader)
        self.processes[index] = process
        self.started[index] = time.monotonic()
        # port 0 until the new process listens: worker 0 does not ask the old one's port
        self.metrics.set_worker(index, pid=process.pid, port=0)
        if self.stopping and process.pid:  # SIGTERM came while it was being started
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)

    def _exited(self, index: int, log: logging.Logger) -> None:
        process = self.processes[index]
        assert process is not None
        process.join()
        code, pid = process.exitcode, process.pid
        self.processes[index] = None  # (first: a signal forwarded meanwhile must not see it)
        process.close()
        pid_now, port, _ = self.metrics.worker_entries()[index]
        self.listened[index] |= pid_now == pid and port != 0
        if self.stopping:
            self.exit_code = max(self.exit_code, code or 0)
            return
        how = (f"was killed by signal {_signal_name(-code)}"
               if code is not None and code < 0 else f"exited with code {code}")
        if code in (1, 2) and not self.listened[index]:  # cannot start: respawning won't help
            log.error("worker %d (pid %s) %s before it started: stopping the gateway", index,
                      pid, how)
            self.exit_code = max(self.exit_code, code)
            self._stop(signal.SIGTERM)
            return
        ran = time.monotonic() - self.started[index]
        if ran >= self.STABLE_AFTER:
            self.delay[index] = self.RESPAWN_DELAY
        delay = self.delay[index]
        self.delay[index] = min(delay * 2, self.RESPAWN_MAX_DELAY)
        log.error("worker %d (pid %s) %s after %.1f s: starting a new one in %g s", index, pid,
                  how, ran, delay)
        self.respawn_at[index] = time.monotonic() + delay

    def _stop(self, signum: int) -> None:
        self.stopping = True
        self.respawn_at.clear()
        self._kill_all(signum)

    def _kill_all(self, signum: int, listening_only: bool = False) -> None:
        """Signal every worker; `listening_only`: those that listen, the others are still
        starting (a worker that starts loads the configuration and opens its logs anyway,
        and before its handlers are in place SIGHUP or SIGUSR1 would kill it)."""
        entries = self.metrics.worker_entries() if listening_only else None
        for index, process in enumerate(self.processes):
            try:
                pid = process.pid if process is not None else None
            except ValueError:  # closed meanwhile
                continue
            if not pid:
                continue
            if entries is not None and (entries[index][0] != pid or not entries[index][1]):
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def _forward(self, signum: int, _frame: object) -> None:
        if signum in (signal.SIGHUP, signal.SIGUSR1):  # reload / reopen logs: every worker,
            self._to_forward.add(signum)  # from the loop (it reads the workers' table: a lock)
        else:
            self._stop(signum)
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)
