"""Conformance suite helpers: drive `plugins/conformance/conformance.wasm` by its steps.

`make(steps, vm_steps, **emulator_kwargs)` builds and starts an `Emulator` and returns a `Run`
that parses the plugin's log lines:

* `conf <cb> <op> status=N out=...` -> `Rec(callback, op, status, outs)`, byte outs
  percent-decoded (`Rec.out` is the first out as bytes, `Rec.num(i)` an out as int);
* `enter <cb> <args...>` -> `(callback, (args...))`, to assert callback order and arguments.

`everywhere(make, steps, ...)` runs the same steps in every root and stream callback.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from wasmgate.testing import Emulator

from ..conftest import CONFORMANCE

REQUEST = [(":path", "/x?q=1"), (":method", "GET"), (":authority", "example.com"),
           ("user-agent", "ua"), ("x-a", "1"), ("x-a", "2")]
RESPONSE = [(":status", "200"), ("content-type", "text/plain")]
HTTP_CALL = "http_call s:up m:%3Apath=/&%3Amethod=GET&%3Aauthority=up null null 1000"
ROOT_CBS = ("vm_start", "configure", "tick", "queue_ready", "http_call_response",
            "foreign_function")
STREAM_CBS = ("request_headers", "request_body", "request_trailers", "response_headers",
              "response_body", "response_trailers", "log")
ALL_CBS = ROOT_CBS + STREAM_CBS

_CONF = re.compile(r"^conf (\S+) (\S+) status=(-?\d+)((?: out=\S*)*)$")
_PCT = re.compile(rb"%([0-9A-F]{2})")


def unescape(text: str) -> bytes:
    """Undo the plugin's escaping: `%XX` -> byte."""
    return _PCT.sub(lambda m: bytes([int(m.group(1), 16)]), text.encode())


@dataclass(frozen=True)
class Rec:
    callback: str
    op: str
    status: int
    outs: tuple[bytes, ...] = field(default=())

    @property
    def out(self) -> bytes:
        return self.outs[0]

    def num(self, index: int = 0) -> int:
        return int(self.outs[index])


def parse_conf(lines: list[str]) -> list[Rec]:
    recs = []
    for line in lines:
        m = _CONF.match(line)
        if m:
            outs = tuple(unescape(o) for o in m.group(4).split(" out=")[1:])
            recs.append(Rec(m.group(1), m.group(2), int(m.group(3)), outs))
    return recs


def parse_enter(lines: list[str]) -> list[tuple[str, tuple[int, ...]]]:
    found = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "enter":
            found.append((parts[1], tuple(int(a) for a in parts[2:])))
    return found


class Run:
    """An emulator plus views over what the conformance plugin logged."""

    def __init__(self, emulator: Emulator) -> None:
        self.emu = emulator

    def __getattr__(self, name: str) -> Any:
        return getattr(self.emu, name)

    def recs(self, callback: str | None = None, op: str | None = None) -> list[Rec]:
        return [r for r in parse_conf(self.emu.logs())
                if (callback is None or r.callback == callback) and (op is None or r.op == op)]

    def one(self, callback: str, op: str) -> Rec:
        """The last record of `op` in `callback` (there must be one)."""
        found = self.recs(callback, op)
        assert found, f"no conf line for {callback} {op}; logs:\n" + "\n".join(self.emu.logs())
        return found[-1]

    def enters(self, callback: str | None = None) -> list[tuple[str, tuple[int, ...]]]:
        return [e for e in parse_enter(self.emu.logs()) if callback is None or e[0] == callback]

    def order(self) -> list[str]:
        return [cb for cb, _ in self.enters()]


Make = Callable[..., Run]


@pytest.fixture
def make() -> Iterator[Make]:
    made: list[Emulator] = []

    def build(steps: str = "", vm_steps: str = "", *, start: bool = True, root_id: str = "conf",
              **kwargs: Any) -> Run:
        emulator = Emulator(CONFORMANCE, plugin_config=steps, vm_config=vm_steps,
                            root_id=root_id, **kwargs)
        made.append(emulator)
        if start:
            emulator.start()
        return Run(emulator)

    yield build
    for emulator in made:
        emulator.close()


def everywhere(make: Make, steps: list[str], callbacks: tuple[str, ...] = ALL_CBS,
               **kwargs: Any) -> Run:
    """Run `steps` (ops with args) in each of `callbacks`, driving one of each callback."""
    vm = ["vm_start register_shared_queue s:confq"]
    plugin = [f"tick {HTTP_CALL}"]
    for cb in callbacks:
        (vm if cb == "vm_start" else plugin).extend(f"{cb} {step}" for step in steps)
    run = make("\n".join(plugin) + "\n", "\n".join(vm) + "\n", **kwargs)
    run.tick()
    first = min(c.token for c in run.pending_http_calls())
    run.respond_http_call(first, [(":status", "200")], b"call-body", [("tr", "1")])
    run.enqueue("confq", b"item")
    run.call_foreign_function(9, b"ffargs")
    stream = run.http_context()
    stream.request_headers(REQUEST, False)
    stream.request_body(b"hello", False)
    stream.request_trailers([("rt", "1")])
    stream.response_headers(RESPONSE, False)
    stream.response_body(b"world", False)
    stream.response_trailers([("st", "1")])
    stream.complete()
    run.stream = stream
    return run


def now_ns() -> int:
    return time.time_ns()
