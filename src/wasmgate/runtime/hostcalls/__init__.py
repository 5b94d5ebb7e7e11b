"""Host functions, one module per concern; each function is defined once and registered here.

A host function is `impl(vm, *args) -> int | None` where args are the wasm parameters as Python
ints (i32 unsigned). Raising `StatusError` returns that status; any other exception traps.
`REGISTRY` maps (import module, name) to the signatures it accepts, so the linker can bind the
exact type a module declares (0.1.0 and 0.2.x disagree on a few).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

WASI_MODULES = ("wasi_snapshot_preview1", "wasi_unstable")


@dataclass(frozen=True)
class HostCallSpec:
    module: str
    name: str
    params: tuple[str, ...]
    results: tuple[str, ...]
    impl: Callable[..., Any]


REGISTRY: dict[tuple[str, str], list[HostCallSpec]] = {}

_TYPES = {"i": "i32", "I": "i64", "f": "f32", "F": "f64"}


def hostcall(name: str, params: str, results: str = "i", *, module: str | tuple[str, ...] = "env",
             ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register `impl` for `module.name` with a signature like "iii" -> "i" (I = i64)."""
    modules = (module,) if isinstance(module, str) else module

    def register(impl: Callable[..., Any]) -> Callable[..., Any]:
        for mod in modules:
            spec = HostCallSpec(mod, name, tuple(_TYPES[c] for c in params),
                                tuple(_TYPES[c] for c in results), impl)
            REGISTRY.setdefault((mod, name), []).append(spec)
        return impl

    return register


def find(module: str, name: str, params: tuple[str, ...], results: tuple[str, ...],
         ) -> HostCallSpec | None:
    """The spec matching the module's declared signature exactly, if any."""
    for spec in REGISTRY.get((module, name), ()):
        if spec.params == params and spec.results == results:
            return spec
    return None


def load_all() -> None:
    """Import every host function module so the registry is complete."""
    from . import (  # noqa: F401
        buffers,
        calls,
        foreign,
        headers,
        logs,
        metrics,
        misc,
        properties,
        shared,
        streams,
        wasi,
    )
