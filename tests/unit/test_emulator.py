"""The Emulator's own API, through the AssemblyScript example plugin and the pytest fixture."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from wasmgate.testing import Action, Emulator, EmulatorError, LogLevel

from ..conftest import CONFORMANCE, EXAMPLE


def test_fixture_starts_and_the_example_plugin_works(
        wasm_emulator: Callable[..., Emulator]) -> None:
    emu = wasm_emulator(EXAMPLE, plugin_config=b"bonjour", root_id="example")
    stream = emu.http_context()
    assert stream.request_headers({":path": "/hello", ":method": "GET"}, True) == Action.CONTINUE
    assert stream.header("x-wasm-example") == "seen"
    assert stream.response_headers({":status": "200"}, True) == Action.CONTINUE
    assert stream.header("x-wasm-greeting", "response") == "bonjour"
    stream.complete()
    assert "example: configured with: bonjour" in emu.logs(LogLevel.INFO)


def test_local_response_view(wasm_emulator: Callable[..., Emulator]) -> None:
    emu = wasm_emulator(EXAMPLE, plugin_config=b"x", root_id="example")
    stream = emu.http_context()
    action = stream.request_headers({":path": "/deny/this", ":method": "GET"}, True)
    assert action == Action.STOP_ALL_ITERATION_AND_WATERMARK
    response = stream.local_response
    assert response is not None
    assert (response.status, response.body) == (403, b"denied by wasm plugin\n")
    assert response.headers == [(b"x-denied-by", b"example")]
    assert response.details == "denied_by_wasm_plugin"


def test_wrong_root_id_fails_start_with_the_plugin_logs() -> None:
    emu = Emulator(EXAMPLE, plugin_config=b"x", root_id="not-registered")
    with pytest.raises(EmulatorError) as info:
        emu.start()
    assert "plugin logs:" in str(info.value)
    assert "proc_exit(255)" in str(info.value)


def test_rejected_configuration_is_reported() -> None:
    emu = Emulator(CONFORMANCE, plugin_config="configure return 0")
    with pytest.raises(EmulatorError, match="configuration rejected"):
        emu.start()


def test_http_call_round_trip_and_resume() -> None:
    steps = """
request_headers http_call s:auth m::path=/check&:method=GET&:authority=auth s: null 500
request_headers return 1
http_call_response set_effective_context 2
http_call_response add_header_map_value 0 s:x-auth s:ok
http_call_response continue_stream 0
"""
    emu = Emulator(CONFORMANCE, plugin_config=steps).start()
    stream = emu.http_context()
    assert stream.request_headers({":path": "/"}) == Action.STOP_ALL_ITERATION_AND_WATERMARK
    assert stream.request_body(b"held") == Action.PAUSE
    [call] = emu.pending_http_calls()
    assert (call.upstream, call.timeout_ms, call.header(":path")) == ("auth", 500, "/check")
    assert stream.request_paused
    emu.respond_http_call(call.token, {":status": "200"}, b"fine")
    assert not stream.request_paused
    assert stream.header("x-auth") == "ok"
    assert stream.request_body_now == b"held"  # the held chunk was replayed
    assert "enter request_body 2 4 0" in emu.logs()


def test_properties_set_from_the_test() -> None:
    emu = Emulator(CONFORMANCE, plugin_config="request_headers get_property s:route_name").start()
    emu.set_property("xds.route_name", "route-7")
    emu.http_context().request_headers({":path": "/"})
    assert "conf request_headers get_property status=0 out=route-7" in emu.logs()


def test_queue_access_from_the_test() -> None:
    steps = """
configure register_shared_queue s:jobs
queue_ready dequeue_shared_queue $token
"""
    emu = Emulator(CONFORMANCE, plugin_config=steps, vm_id="vm1").start()
    emu.enqueue("jobs", b"job-1")
    assert "conf queue_ready dequeue_shared_queue status=0 out=job-1" in emu.logs()
    assert emu.queue_items("jobs") == []


def test_context_manager_closes_root() -> None:
    with Emulator(CONFORMANCE) as emu:
        assert "enter vm_start 1 0" in emu.logs()
    assert "enter done 1" in emu.logs()
    assert "enter delete 1" in emu.logs()


def test_conformance_accepts_istio_json_steps() -> None:
    import json

    config = json.dumps({"steps": ["request_headers log 2 s:json-array-ok"]})
    emu = Emulator(CONFORMANCE, plugin_config=config).start()
    emu.http_context().request_headers({":path": "/"})
    assert "conf request_headers log status=0" in emu.logs()
    assert "json-array-ok" in emu.logs()
    single = json.dumps({"steps": "request_headers log 2 s:one\nrequest_headers log 2 s:two"})
    emu = Emulator(CONFORMANCE, plugin_config=single).start()
    emu.http_context().request_headers({":path": "/"})
    assert [m for m in emu.logs() if m in ("one", "two")] == ["one", "two"]
