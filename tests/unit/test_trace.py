"""The ABI trace: Envoy's `wasm:trace` lines, switchable per plugin at run time."""

from __future__ import annotations

from wasmgate.testing import Emulator, LogLevel

from ..conftest import EXAMPLE


def _trace(emulator: Emulator) -> list[str]:
    return emulator.logs(LogLevel.TRACE)


def test_trace_lines_have_envoys_format() -> None:
    emulator = Emulator(EXAMPLE, root_id="example", plugin_config="hi",
                        log_level="trace").start()
    stream = emulator.http_context()
    stream.request_headers({":path": "/x", ":method": "GET"}, end_of_stream=True)
    lines = _trace(emulator)
    assert "[host->vm] proxy_on_request_headers(2, 2, 1)" in lines
    assert "[host<-vm] proxy_on_request_headers return: 0" in lines
    assert any(line.startswith("[vm->host] env.proxy_get_header_map_value(0, ")
               for line in lines)
    assert "[vm<-host] env.proxy_get_header_map_value return: 0" in lines
    assert "[host->vm] proxy_on_context_create(1, 0)" in lines
    assert "[host<-vm] proxy_on_context_create return: void" in lines


def test_trace_prints_i32_unsigned() -> None:
    emulator = Emulator(EXAMPLE, root_id="example", log_level="trace").start()
    emulator.plugin.vm.call("proxy_on_memory_allocate" if emulator.plugin.vm.has(
        "proxy_on_memory_allocate") else "malloc", -1 & 0xFF)
    emulator.plugin.vm.tracer.guest_call("f", (-1,))
    assert "[host->vm] f(4294967295)" in _trace(emulator)


def test_trace_switches_at_run_time() -> None:
    emulator = Emulator(EXAMPLE, root_id="example", log_level="info").start()
    emulator.http_context().request_headers({":path": "/a"})
    assert _trace(emulator) == []
    emulator.set_log_level("trace")
    emulator.http_context().request_headers({":path": "/b"})
    assert any("proxy_on_request_headers" in line for line in _trace(emulator))
    count = len(_trace(emulator))
    emulator.set_log_level(LogLevel.DEBUG)
    emulator.http_context().request_headers({":path": "/c"})
    assert len(_trace(emulator)) == count
