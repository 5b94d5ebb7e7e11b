"""Crash handling, CPU deadlines, memory caps, Envoy's fail message and DWARF backtraces."""

from __future__ import annotations

import re
import threading
import time

import pytest

from wasmgate.runtime.vm import Limits
from wasmgate.testing import Action, Emulator, LogLevel

from ..conftest import CONFORMANCE, DWARF_CRASH, EXAMPLE, WAT

MiB = 1 << 20


def test_infinite_loop_hits_the_cpu_deadline_and_the_host_goes_on() -> None:
    emulator = Emulator(WAT / "infinite_loop.wasm",
                        limits=Limits(callback_seconds=0.2)).start()
    stream = emulator.http_context()
    action = stream.request_headers({":path": "/"})
    assert action == Action.STOP_ALL_ITERATION_AND_WATERMARK
    assert stream.local_response is not None
    assert stream.local_response.status == 503
    assert stream.local_response.details == "wasm_fail_stream"
    trap = emulator.crashes[0].info
    assert trap.trap_code == "interrupt"
    assert "CPU deadline exceeded: 0.2 s" in trap.message
    assert emulator.failed


@pytest.mark.parametrize("pause", [0.0, 0.1])
def test_each_callback_gets_its_whole_cpu_budget(pause: float) -> None:
    """The deadline is set again only when the epoch ticked since it was last set (else it
    would be the same value): a callback right after another (pause 0: the same tick), or
    after ticks have passed, still runs its whole budget, and no more than one tick over."""
    emulator = Emulator(WAT / "infinite_loop.wasm",
                        limits=Limits(callback_seconds=0.2)).start()
    stream = emulator.http_context()
    assert stream.context is not None
    stream.context._ensure_created()  # a guest call (proxy_on_context_create) sets a deadline
    time.sleep(pause)
    started = time.monotonic()
    stream.request_headers({":path": "/"})
    elapsed = time.monotonic() - started
    assert emulator.crashes[0].info.trap_code == "interrupt"
    assert 0.2 - 0.011 <= elapsed < 0.2 + 0.01 + 0.2  # (+0.2: a loaded machine's scheduling)


def test_deadline_does_not_block_other_threads() -> None:
    """A spinning plugin releases the GIL: another Python thread keeps running."""
    emulator = Emulator(WAT / "infinite_loop.wasm",
                        limits=Limits(callback_seconds=0.5)).start()
    ticks = []
    stop = threading.Event()

    def count() -> None:
        while not stop.is_set():
            ticks.append(time.monotonic())
            time.sleep(0.01)

    worker = threading.Thread(target=count)
    worker.start()
    emulator.http_context().request_headers({":path": "/"})
    stop.set()
    worker.join()
    assert len(ticks) >= 10


@pytest.mark.parametrize("cap_mib", [2, 8])
def test_memory_bomb_is_capped(cap_mib: int) -> None:
    emulator = Emulator(WAT / "memory_bomb.wasm",
                        limits=Limits(memory_bytes=cap_mib * MiB)).start()
    emulator.http_context().request_headers({":path": "/"})
    [line] = [m for m in emulator.logs() if m.startswith("memory_bomb max pages=")]
    assert int(line.split("=")[1]) == cap_mib * 16  # 64 KiB pages
    assert emulator.plugin.memory_bytes() == cap_mib * MiB
    assert not emulator.failed


def test_memory_bomb_during_vm_start_is_capped() -> None:
    emulator = Emulator(WAT / "memory_bomb_vm_start.wasm",
                        limits=Limits(memory_bytes=4 * MiB)).start()
    assert "memory_bomb max pages=64" in emulator.logs()


def test_bad_pointers_get_invalid_memory_access_not_a_crash() -> None:
    emulator = Emulator(WAT / "bad_pointers.wasm").start()
    emulator.http_context().request_headers({":path": "/"})
    for what in ("log beyond", "log straddle", "ghmv ret_ptr", "ghmv ret_len", "ghmv key"):
        assert f"{what} status=6" in emulator.logs()
    assert not emulator.failed


def test_fail_message_has_envoys_shape() -> None:
    emulator = Emulator(CONFORMANCE, plugin_config="request_headers trap").start()
    emulator.http_context().request_headers({":path": "/"})
    errors = emulator.logs(LogLevel.ERROR)
    assert errors, "the trap must be logged at error level"
    lines = errors[-1].splitlines()
    assert lines[0] == ("Function: proxy_on_request_headers failed: "
                        "wasm trap: wasm `unreachable` instruction executed")
    assert lines[1] == "Proxy-Wasm plugin in-VM backtrace:"
    assert re.fullmatch(r"  0:  0x[0-9a-f]+ - .+", lines[2])


def test_dwarf_backtrace_names_source_lines() -> None:
    emulator = Emulator(DWARF_CRASH).start()
    emulator.http_context().request_headers({":path": "/"})
    frames = emulator.crashes[0].info.frames
    source = (DWARF_CRASH.parent / "crash.c").read_text().splitlines()
    trap_line = next(i for i, text in enumerate(source, 1) if "// TRAP LINE" in text)
    assert frames[0].func_name == "check_bounds"
    assert frames[0].source == f"crash.c:{trap_line}"
    names = [f.func_name for f in frames]
    assert names[:4] == ["check_bounds", "parse_header", "handle_request",
                         "proxy_on_request_headers"]
    message = emulator.logs(LogLevel.ERROR)[-1]
    assert f"- check_bounds at crash.c:{trap_line}" in message


@pytest.mark.parametrize("callback", ["request_headers", "request_body", "request_trailers",
                                      "response_headers", "response_body", "response_trailers",
                                      "log", "tick"])
def test_trap_in_each_callback_fails_the_plugin_and_reload_recovers(callback: str) -> None:
    emulator = Emulator(CONFORMANCE, plugin_config=f"{callback} trap").start()
    stream = emulator.http_context()
    steps = [("request_headers", lambda: stream.request_headers({":path": "/"})),
             ("request_body", lambda: stream.request_body(b"x")),
             ("request_trailers", lambda: stream.request_trailers({"t": "1"})),
             ("response_headers", lambda: stream.response_headers({":status": "200"})),
             ("response_body", lambda: stream.response_body(b"y")),
             ("response_trailers", lambda: stream.response_trailers({"t": "2"})),
             ("log", stream.complete),
             ("tick", emulator.tick)]
    for name, step in steps:
        if name == "tick" and callback == "tick":
            with pytest.raises(Exception, match="proxy_on_tick failed"):
                step()
        else:
            step()
        if name == callback:
            break
    assert emulator.failed
    assert emulator.plugin.last_trap is not None
    assert emulator.plugin.last_trap.function == f"proxy_on_{callback}"
    emulator.restart()
    assert not emulator.failed


def test_fail_open_continues_the_stream() -> None:
    emulator = Emulator(CONFORMANCE, plugin_config="request_headers trap",
                        fail_open=True).start()
    stream = emulator.http_context()
    assert stream.request_headers({":path": "/"}) == Action.CONTINUE
    assert stream.local_response is None
    assert emulator.http_context().request_headers({":path": "/"}) == Action.CONTINUE


def test_failed_plugin_denies_new_streams_until_restart() -> None:
    emulator = Emulator(CONFORMANCE, plugin_config="request_headers trap").start()
    emulator.http_context().request_headers({":path": "/"})
    later = emulator.http_context()
    later.request_headers({":path": "/"})
    assert later.local_response is not None and later.local_response.status == 503
    emulator.restart()
    fresh = Emulator(EXAMPLE, root_id="example", plugin_config="hi").start()
    assert fresh.http_context().request_headers({":path": "/"}) == Action.CONTINUE


def test_proc_exit_ends_the_callback_as_a_trap() -> None:
    emulator = Emulator(CONFORMANCE, plugin_config="request_headers exit 3").start()
    stream = emulator.http_context()
    stream.request_headers({":path": "/"})
    assert "exit returned" not in " ".join(emulator.logs())
    assert emulator.crashes[0].info.message == "proc_exit(3)"
    assert stream.local_response is not None


def test_host_exception_becomes_a_trap_never_silent_success() -> None:
    """An embedder bug inside a host call must trap the plugin, not return garbage."""
    emulator = Emulator(CONFORMANCE, plugin_config="request_headers get_property s:boom")

    def broken(plugin: object, context_id: int, path: list[bytes]) -> bytes | None:
        raise RuntimeError("embedder bug")

    emulator.property = broken  # type: ignore[method-assign]
    emulator.start()
    stream = emulator.http_context()
    stream.request_headers({":path": "/"})
    info = emulator.crashes[0].info
    assert "host function env.proxy_get_property raised RuntimeError: embedder bug" in (
        info.message)
    assert isinstance(info.host_exception, RuntimeError)
    assert "conf request_headers get_property" not in " ".join(emulator.logs())
