"""The one shared wasmtime Engine, its settings, and the epoch ticker behind CPU deadlines.

Every VM of the process shares one Engine, so compiled modules are shared and the precompiled
cache key (wasmtime version + these settings) is one value. CPU deadlines use epoch
interruption: a daemon thread bumps the engine's epoch every `EPOCH_TICK_SECONDS`; a guest call
gets a deadline of N ticks and traps with `interrupt` once it passes. Guest calls release the
GIL (ctypes), so the ticker runs even while a plugin spins.

`EPOCH.count` mirrors the engine's epoch (which wasmtime does not expose): a VM whose last
deadline was set at the count still current skips setting it again (the same deadline). The
ticker bumps the count before the engine's epoch, both under `EPOCH.lock`, and a deadline is
set under the lock too; so outside the lock the count is never behind the engine's epoch, and
an equal count means the engine's epoch is the one the deadline was computed from.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import wasmtime

EPOCH_TICK_SECONDS = 0.01


@dataclass(frozen=True)
class EngineSettings:
    """Settings that change compiled code: part of the precompiled-module cache key."""

    cranelift_opt_level: str = "speed"
    parallel_compilation: bool = True
    epoch_interruption: bool = True
    # Linear memories never move (4 GiB reserved up front, as wasmtime does by default on
    # 64-bit hosts): MemoryAccess can keep the base address for the VM's whole life.
    memory_reservation: int = 4 << 30

    def cache_key(self) -> str:
        return (f"wasmtime-{wasmtime_version()}-opt={self.cranelift_opt_level}"
                f"-epoch={int(self.epoch_interruption)}-reserve={self.memory_reservation}-fixed")


def wasmtime_version() -> str:
    from importlib.metadata import version

    return version("wasmtime")


class EpochCount:
    """The ticks so far (see the module's docstring); `lock` orders them with deadlines."""

    __slots__ = ("count", "lock")

    def __init__(self) -> None:
        self.count = 0
        self.lock = threading.Lock()


EPOCH = EpochCount()
_engine: wasmtime.Engine | None = None
_engine_settings: EngineSettings | None = None
_lock = threading.Lock()
_ticker: threading.Thread | None = None


def shared_engine(settings: EngineSettings | None = None) -> wasmtime.Engine:
    """Return the process-wide Engine, creating it (and the epoch ticker) on first use."""
    global _engine, _engine_settings
    with _lock:
        if _engine is None:
            _engine_settings = settings or EngineSettings()
            config = wasmtime.Config()
            config.epoch_interruption = _engine_settings.epoch_interruption
            config.cranelift_opt_level = _engine_settings.cranelift_opt_level
            config.parallel_compilation = _engine_settings.parallel_compilation
            config.memory_reservation = _engine_settings.memory_reservation
            config.memory_may_move = False
            _engine = wasmtime.Engine(config)
            _start_ticker(_engine)
        return _engine


def engine_settings() -> EngineSettings:
    shared_engine()
    assert _engine_settings is not None
    return _engine_settings


def _start_ticker(engine: wasmtime.Engine) -> None:
    global _ticker

    def tick() -> None:
        epoch = EPOCH
        while True:
            time.sleep(EPOCH_TICK_SECONDS)
            with epoch.lock:
                epoch.count += 1  # first: never behind the engine's epoch outside the lock
                engine.increment_epoch()

    _ticker = threading.Thread(target=tick, name="wasmgate-epoch", daemon=True)
    _ticker.start()


def _after_fork_in_child() -> None:
    """A forked child has no ticker thread, and the parent's may have held the lock: a new
    lock, and a ticker again if the engine exists."""
    EPOCH.lock = threading.Lock()
    if _engine is not None:
        _start_ticker(_engine)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def ticks_for(seconds: float) -> int:
    """Epoch ticks that make up `seconds` (at least one)."""
    return max(1, round(seconds / EPOCH_TICK_SECONDS))
