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
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import sys
from pathlib import Path

from .app import ConfigInvalid, GatewayApp, load_config
from .shared_metrics import ProcessMetricStore
from .shared_queues import ProcessSharedQueues
from .shared_store import ProcessSharedData

LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
WORKER_LOG_FORMAT = "%(asctime)s %(levelname)-7s [%(processName)s] %(name)s: %(message)s"
"""With --workers, each line says which worker wrote it (as Envoy's logs carry a thread id)."""


def setup_logging(level: str, access_log: bool, *, worker: bool = False) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()),
                        format=WORKER_LOG_FORMAT if worker else LOG_FORMAT, stream=sys.stderr)
    logging.getLogger("wasmgate.access").setLevel(logging.INFO if access_log else logging.WARNING)
    # Plugin logs are filtered by each plugin's own level (admin /logging); let them all through
    # here, trace included.
    logging.addLevelName(5, "TRACE")
    logging.getLogger("wasmgate.wasm").setLevel(1)


def _event_loop_policy() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; stay usable without it
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def _serve(app: GatewayApp) -> None:
    await app.start()
    await app.serve_forever()


def _worker(configs: list[Path], options: dict[str, object], index: int,
            shared_data: ProcessSharedData, metrics: ProcessMetricStore) -> None:
    level = str(options.pop("log_level"))
    setup_logging(level, bool(options.pop("access_log")), worker=True)
    options["plugin_log_level"] = "warn" if level == "warning" else level
    _event_loop_policy()
    if index > 0:
        options["admin"] = ("127.0.0.1", 0)
    queues = ProcessSharedQueues(shared_data, index)
    app = GatewayApp(configs, reuse_port=True, shared_data=shared_data, shared_queues=queues,
                     metric_store=metrics, worker=index, **options)  # type: ignore[arg-type]
    try:
        asyncio.run(_serve(app))
    except ConfigInvalid as exc:  # changed between the parent's check and this worker's load
        logging.getLogger("wasmgate").error("invalid configuration:\n%s", exc)
        sys.exit(2)
    except OSError as exc:
        logging.getLogger("wasmgate").error("cannot start: %s", exc)
        sys.exit(1)


def run_gateway(configs: list[Path], *, listen: tuple[str, int] | None,
                admin: tuple[str, int] | None, upstream: str | None, workers: int,
                log_level: str, access_log: bool, cache_dir: Path | None = None,
                ca_file: str | None = None) -> int:
    setup_logging(log_level, access_log)
    plugin_level = "warn" if log_level == "warning" else log_level
    if workers <= 1:
        _event_loop_policy()
        app = GatewayApp(configs, listen=listen, admin=admin, upstream=upstream,
                         cache_dir=cache_dir, plugin_log_level=plugin_level, ca_file=ca_file)
        try:
            asyncio.run(_serve(app))
        except ConfigInvalid as exc:
            logging.getLogger("wasmgate").error("invalid configuration:\n%s", exc)
            return 2
        except OSError as exc:
            logging.getLogger("wasmgate").error("cannot start: %s", exc)
            return 1
        return 0
    try:  # once, here, rather than N tracebacks from N workers
        load_config(configs)
    except ConfigInvalid as exc:
        logging.getLogger("wasmgate").error("invalid configuration:\n%s", exc)
        return 2
    options = {"listen": listen, "admin": admin, "upstream": upstream, "log_level": log_level,
               "access_log": access_log, "cache_dir": cache_dir, "ca_file": ca_file}
    context = multiprocessing.get_context("spawn")
    shared_data = ProcessSharedData.create()
    metrics = ProcessMetricStore.create(workers=workers)
    processes = [context.Process(target=_worker,
                                 args=(configs, dict(options), i, shared_data, metrics),
                                 name=f"wasmgate-worker-{i}") for i in range(workers)]
    for index, process in enumerate(processes):
        process.start()
        metrics.set_worker(index, pid=process.pid)

    def forward(signum: int, _frame: object) -> None:
        for process in processes:
            if process.pid:
                os.kill(process.pid, signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    try:
        for process in processes:
            process.join()
    finally:
        shared_data.close()
        shared_data.unlink()
        metrics.close()
        metrics.unlink()
    return max((p.exitcode or 0) for p in processes)
