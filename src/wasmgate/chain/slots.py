"""A place in the filter chain: one plugin, its failure policy, and its stand-ins.

A slot whose plugin is not available (module still being fetched, failed to load, failed to
start) stands in as Istio's RBAC placeholder: allow-all for FAIL_OPEN, deny-all otherwise. A
slot whose running plugin crashes applies failStrategy: FAIL_CLOSE -> 503 `wasm_fail_stream`,
FAIL_OPEN -> bypass, FAIL_RELOAD -> 503 for that stream and a fresh VM (with exponential
backoff) for the streams after it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from enum import Enum

from ..runtime.errors import RuntimeFailure
from ..runtime.plugin import Plugin, PluginState

log = logging.getLogger("wasmgate.chain")


class FailStrategy(Enum):
    FAIL_CLOSE = "FAIL_CLOSE"
    FAIL_OPEN = "FAIL_OPEN"
    FAIL_RELOAD = "FAIL_RELOAD"


class SlotStatus(Enum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


class PluginSlot:
    """One configured plugin in a chain. `plugin` is None until it is ready."""

    RELOAD_BACKOFF_BASE = 1.0
    RELOAD_BACKOFF_MAX = 60.0

    def __init__(self, name: str, fail_strategy: FailStrategy = FailStrategy.FAIL_CLOSE,
                 plugin: Plugin | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.fail_strategy = fail_strategy
        self.plugin = plugin
        self.error: str | None = None
        self._status = SlotStatus.READY if plugin is not None else SlotStatus.LOADING
        self._clock = clock
        self._reload_at = 0.0
        self._backoff = self.RELOAD_BACKOFF_BASE
        self.crashes = 0
        self.reloads = 0
        self.streams = 0  # streams that ran this plugin
        self.callbacks = 0
        self.callback_seconds = 0.0  # wall time inside the plugin's stream callbacks

    @property
    def status(self) -> SlotStatus:
        if self.plugin is not None and self.plugin.state == PluginState.FAILED:
            return SlotStatus.FAILED
        return self._status

    def mark_failed(self, error: str) -> None:
        """The module could not be fetched, loaded or started: stand in per failStrategy."""
        self._status = SlotStatus.FAILED
        self.error = error

    def stand_in(self) -> str | None:
        """None when the plugin runs; else "allow" or "deny" for this stream."""
        plugin = self.plugin
        if (plugin is not None and self._status is SlotStatus.READY
                and plugin.state is not PluginState.FAILED):
            return None  # the common case: a running plugin (nothing to reload)
        self._maybe_reload()
        if self.plugin is not None and self.status == SlotStatus.READY:
            return None
        if self.plugin is not None and self.plugin.state == PluginState.FAILED:
            return "allow" if self.fail_strategy == FailStrategy.FAIL_OPEN else "fail"
        return "allow" if self.fail_strategy == FailStrategy.FAIL_OPEN else "deny"

    def on_crash(self, why: str) -> None:
        self.crashes += 1
        self.error = why
        if self.fail_strategy == FailStrategy.FAIL_RELOAD:
            self._reload_at = self._clock() + (0 if self.crashes == 1 else self._backoff)

    def _maybe_reload(self) -> None:
        plugin = self.plugin
        if (self.fail_strategy != FailStrategy.FAIL_RELOAD or plugin is None
                or plugin.state != PluginState.FAILED or self._clock() < self._reload_at):
            return
        try:
            plugin.restart()
        except RuntimeFailure as exc:
            self._backoff = min(self._backoff * 2, self.RELOAD_BACKOFF_MAX)
            self._reload_at = self._clock() + self._backoff
            self.error = str(exc)
            log.warning("plugin %s: reload failed (next try in %.0f s): %s", self.name,
                        self._backoff, exc)
            return
        self.reloads += 1
        self._backoff = self.RELOAD_BACKOFF_BASE
        log.info("plugin %s: reloaded a fresh VM after a crash", self.name)

    def describe(self) -> dict[str, object]:
        return {"name": self.name, "status": self.status.value,
                "fail_strategy": self.fail_strategy.value, "error": self.error,
                "crashes": self.crashes, "reloads": self.reloads}
