"""WASI as the reference host provides it: stdout/stderr -> plugin log, environ from `env=`,
clocks, random_get, and proc_exit ending the callback as a trap."""

from __future__ import annotations

import re
import time

import pytest

from wasmgate.runtime.errors import PluginTrap
from wasmgate.testing import Action

from .conftest import REQUEST


def _line(run, prefix: str) -> str:  # type: ignore[no-untyped-def]
    found = [line for line in run.logs() if line.startswith(prefix)]
    assert found, f"no line starting {prefix!r}"
    return found[-1]


def test_stdout_and_stderr_go_to_the_log(make) -> None:  # type: ignore[no-untyped-def]
    run = make("tick stdout s:to%20out\ntick stderr s:to%20err\n"
               "request_headers stdout s:from-stream\n")
    run.tick()
    run.http_context().request_headers(REQUEST, True)
    assert "to out" in run.logs("info") and "to err" in run.logs("error")
    assert "from-stream" in run.logs("info")
    assert "to err" not in run.logs("info")
    assert [(r.status, r.num()) for r in run.recs("tick")] == [(0, 7), (0, 7)]


def test_getenv(make) -> None:  # type: ignore[no-untyped-def]
    run = make("tick getenv s:FOO\ntick getenv s:EMPTY\ntick getenv s:MISSING\n",
               env={"FOO": "bar baz", "EMPTY": ""})
    run.tick()
    got = [line for line in run.logs() if line.startswith("conf tick getenv")]
    assert got == ["conf tick getenv value=bar%20baz", "conf tick getenv value=",
                   "conf tick getenv value=<unset>"]


def test_clocks(make) -> None:  # type: ignore[no-untyped-def]
    run = make("tick clock\ntick get_current_time_nanoseconds\n")
    before = time.time_ns()
    run.tick()
    after = time.time_ns()
    m = re.fullmatch(r"conf tick clock status=0 realtime=(\d+) status=0 monotonic=(\d+)",
                     _line(run, "conf tick clock"))
    assert m is not None
    assert before <= int(m.group(1)) <= after
    assert int(m.group(2)) > 0
    assert before <= run.one("tick", "get_current_time_nanoseconds").num() <= after


@pytest.mark.parametrize("size", [1, 16, 100])
def test_random(make, size: int) -> None:  # type: ignore[no-untyped-def]
    run = make(f"tick random {size}\n")
    run.tick()
    run.tick()
    lines = [line for line in run.logs() if line.startswith("conf tick random")]
    hexes = [re.fullmatch(r"conf tick random status=0 hex=([0-9a-f]*)", line) for line in lines]
    assert all(hexes) and len(hexes) == 2
    assert [len(m.group(1)) for m in hexes if m] == [2 * size] * 2
    if size >= 16:
        assert hexes[0].group(1) != hexes[1].group(1)  # type: ignore[union-attr]


def test_exit_in_stream_callback_traps(make) -> None:  # type: ignore[no-untyped-def]
    run = make("request_headers exit 3\n")
    stream = run.http_context()
    action = stream.request_headers(REQUEST, True)
    assert action == Action.STOP_ALL_ITERATION_AND_WATERMARK
    assert not any("exit returned" in line for line in run.logs())
    assert run.failed and len(run.crashes) == 1
    assert "proc_exit(3)" in run.crashes[0].info.message
    reply = stream.local_response
    assert reply is not None and (reply.status, reply.details) == (503, "wasm_fail_stream")


def test_exit_in_tick_traps(make) -> None:  # type: ignore[no-untyped-def]
    run = make("tick exit 0\n")
    with pytest.raises(PluginTrap):
        run.tick()
    assert run.failed and run.crashes
