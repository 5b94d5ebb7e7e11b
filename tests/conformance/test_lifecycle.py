"""Callback order and arguments, start-up, traps in every callback kind, fail open/closed,
restart, ticks, log level, done, get_status, effective context, plugin-side errors."""

from __future__ import annotations

import pytest

from wasmgate.runtime.errors import PluginTrap
from wasmgate.testing import Action, EmulatorError

from .conftest import HTTP_CALL, REQUEST, RESPONSE

OK, NOT_FOUND, BAD_ARGUMENT = 0, 1, 2


def test_start_order_and_arguments(make) -> None:  # type: ignore[no-untyped-def]
    vm, steps = "vm_start log 2 s:v\n", "configure log 2 s:c\n# comment\n"
    run = make(steps, vm)
    assert run.enters() == [("context_create", (1, 0)), ("vm_start", (1, len(vm))),
                            ("configure", (1, len(steps)))]
    assert f"config vm_start buffer=6 status=0 bytes={len(vm)} steps=1" in run.logs("debug")
    assert f"config configure buffer=7 status=0 bytes={len(steps)} steps=1" in run.logs("debug")


def test_stream_order_and_arguments(make) -> None:  # type: ignore[no-untyped-def]
    run = make("request_body return 1\n")
    stream = run.http_context()
    stream.request_headers(REQUEST, False)
    stream.request_body(b"abc", False)
    stream.request_body(b"de", False)
    stream.request_trailers([("t", "1"), ("u", "2")])
    stream.response_headers(RESPONSE, False)
    stream.response_body(b"xyz", True)
    stream.complete()
    stream.complete()  # idempotent
    sid = stream.id
    assert sid == 2
    assert run.enters()[3:] == [
        ("context_create", (sid, 1)), ("request_headers", (sid, 6, 0)),
        ("request_body", (sid, 3, 0)), ("request_body", (sid, 5, 0)),
        ("request_trailers", (sid, 2)), ("response_headers", (sid, 2, 0)),
        ("response_body", (sid, 3, 1)), ("log", (sid,)), ("done", (sid,)),
        ("delete", (sid,))]


def test_stream_ids_increase_and_context_created_lazily(make) -> None:  # type: ignore[no-untyped-def]
    run = make()
    a, b = run.http_context(), run.http_context()
    assert run.enters("context_create") == [("context_create", (1, 0))]
    b.response_headers(RESPONSE, True)
    a.request_headers(REQUEST, True)
    assert run.enters("context_create")[1:] == [("context_create", (b.id, 1)),
                                                ("context_create", (a.id, 1))]
    assert b.id == a.id + 1


def test_close_runs_root_done_and_delete(make) -> None:  # type: ignore[no-untyped-def]
    run = make()
    run.close()
    assert run.enters()[-2:] == [("done", (1,)), ("delete", (1,))]


@pytest.mark.parametrize(("cb", "vm"), [("vm_start", True), ("configure", False)])
def test_start_callbacks_returning_false_fail_start(make, cb: str, vm: bool) -> None:  # type: ignore[no-untyped-def]
    step = f"{cb} return 0\n"
    run = make("" if vm else step, step if vm else "", start=False)
    with pytest.raises(EmulatorError):
        run.start()
    assert run.failed


@pytest.mark.parametrize(("cb", "vm"), [("vm_start", True), ("configure", False)])
def test_trap_during_start(make, cb: str, vm: bool) -> None:  # type: ignore[no-untyped-def]
    step = f"{cb} trap\n"
    run = make("" if vm else step, step if vm else "", start=False)
    with pytest.raises(EmulatorError, match="failed"):
        run.start()
    assert run.failed


def _drive_root(run, cb: str) -> None:  # type: ignore[no-untyped-def]
    if cb == "tick":
        run.tick()
    elif cb == "queue_ready":
        run.enqueue("q", b"x")
    elif cb == "foreign_function":
        run.call_foreign_function(1, b"")
    elif cb == "http_call_response":
        run.respond_http_call(run.pending_http_calls()[0].token)
    elif cb == "redis_call_response":
        run.respond_redis_call(run.pending_redis_calls()[0].token, b"+OK\r\n")
    elif cb.startswith("grpc_"):
        run.respond_grpc_call(run.pending_grpc_calls()[0].token, b"m", 0, [("a", "b")],
                              [("c", "d")])


ROOT_TRAPS = ["tick", "queue_ready", "foreign_function", "http_call_response",
              "redis_call_response", "grpc_receive_initial_metadata", "grpc_receive",
              "grpc_receive_trailing_metadata", "grpc_close"]


@pytest.mark.parametrize("cb", ROOT_TRAPS)
def test_trap_in_root_callback(make, cb: str) -> None:  # type: ignore[no-untyped-def]
    run = make(f"configure register_shared_queue s:q\nconfigure {HTTP_CALL}\n"
               "configure redis_call s:r s:x\nconfigure grpc_stream s:g s:S s:M m:\n"
               f"{cb} trap\n")
    with pytest.raises(PluginTrap):
        _drive_root(run, cb)
    assert run.failed and len(run.crashes) == 1
    assert run.crashes[0].info.function == f"proxy_on_{cb}"
    assert any(line.startswith(f"Function: proxy_on_{cb} failed") for line in run.logs("error"))
    stream = run.http_context()  # new streams on a failed plugin fail closed
    assert stream.request_headers(REQUEST, True) == Action.STOP_ALL_ITERATION_AND_WATERMARK
    assert stream.local_response is not None and stream.local_response.status == 503


def _drive_stream(stream, cb: str) -> Action | None:  # type: ignore[no-untyped-def]
    steps = [("request_headers", lambda: stream.request_headers(REQUEST, False)),
             ("request_body", lambda: stream.request_body(b"b", False)),
             ("request_trailers", lambda: stream.request_trailers([("t", "1")])),
             ("response_headers", lambda: stream.response_headers(RESPONSE, False)),
             ("response_body", lambda: stream.response_body(b"r", False)),
             ("response_trailers", lambda: stream.response_trailers([("t", "1")]))]
    for name, step in steps:
        action = step()
        if name == cb:
            return action  # type: ignore[no-any-return]
    stream.complete()
    return None


STREAM_TRAPS = ["context_create", "request_headers", "request_body", "request_trailers",
                "response_headers", "response_body", "response_trailers", "log", "done",
                "delete"]


@pytest.mark.parametrize("cb", STREAM_TRAPS)
def test_trap_in_stream_callback_fails_closed(make, cb: str) -> None:  # type: ignore[no-untyped-def]
    # context_create traps for the stream only (the root's ran at start, before this line ran)
    run = make(f"{cb} trap\n")
    stream = run.http_context()
    action = _drive_stream(stream, "request_headers" if cb == "context_create" else cb)
    assert run.failed
    assert any(line.startswith(f"Function: proxy_on_{cb} failed") for line in run.logs("error"))
    if action is not None:
        assert action == Action.STOP_ALL_ITERATION_AND_WATERMARK or action == Action.PAUSE
        reply = stream.local_response
        assert reply is not None and (reply.status, reply.details) == (503, "wasm_fail_stream")
    after = run.http_context()
    assert after.request_headers(REQUEST, True) != Action.CONTINUE
    assert after.local_response is not None and after.local_response.status == 503


@pytest.mark.parametrize("cb", ["request_headers", "response_trailers", "log", "done",
                                "delete"])
def test_stream_trap_is_recorded_in_crashes(make, cb: str) -> None:  # type: ignore[no-untyped-def]
    run = make(f"{cb} trap\n")
    _drive_stream(run.http_context(), cb)
    assert [c.info.function for c in run.crashes] == [f"proxy_on_{cb}"]


@pytest.mark.parametrize("cb", ["request_headers", "request_body", "response_headers"])
def test_trap_fail_open_continues(make, cb: str) -> None:  # type: ignore[no-untyped-def]
    run = make(f"{cb} trap\n", fail_open=True)
    stream = run.http_context()
    assert _drive_stream(stream, cb) == Action.CONTINUE
    assert run.failed and stream.local_response is None
    after = run.http_context()
    assert after.request_headers(REQUEST, True) == Action.CONTINUE
    assert after.local_response is None


def test_restart_gives_a_fresh_working_vm(make) -> None:  # type: ignore[no-untyped-def]
    run = make("response_headers trap\nrequest_headers get_property s:plugin_root_id\n",
               "vm_start set_shared_data s:boots s:x 0\n")
    stream = run.http_context()
    stream.request_headers(REQUEST, True)
    stream.response_headers(RESPONSE, True)
    assert run.failed
    run.restart()
    assert not run.failed
    assert [cb for cb, _ in run.enters()].count("vm_start") == 2
    fresh = run.http_context()
    assert fresh.request_headers(REQUEST, True) == Action.CONTINUE
    assert fresh.local_response is None
    assert run.one("request_headers", "get_property").out == b"conf"
    assert run.enters("context_create")[-1][1][1] == 1  # new root is id 1 again


def test_tick_period_and_tick(make) -> None:  # type: ignore[no-untyped-def]
    run = make("request_headers set_tick_period_milliseconds 50\ntick get_log_level\n",
               "vm_start set_tick_period_milliseconds 250\n")
    assert run.tick_period_ms == 250
    run.tick()
    run.tick()
    assert run.enters("tick") == [("tick", (1,)), ("tick", (1,))]
    assert len(run.recs("tick", "get_log_level")) == 2
    run.http_context().request_headers(REQUEST, True)
    assert run.tick_period_ms == 50


def test_log_levels_and_filtering(make) -> None:  # type: ignore[no-untyped-def]
    run = make("tick log 0 s:t\ntick log 1 s:d\ntick log 3 s:w\ntick log 4 s:e\n"
               "tick log 5 s:c\ntick log 6 s:x\n", log_level="debug")
    run.tick()
    assert [r.status for r in run.recs("tick")] == [OK, OK, OK, OK, OK, BAD_ARGUMENT]
    assert "t" not in run.logs() and "d" in run.logs("debug")
    last = (run.logs("warn")[-1], run.logs("error")[-1], run.logs("critical")[-1])
    assert last == ("w", "e", "c")
    run.set_log_level("warn")
    run.tick()
    assert run.recs("tick", "log")[-1].status == BAD_ARGUMENT  # no new INFO lines after warn
    assert len(run.recs("tick")) == 6
    assert run.logs("warn").count("w") == 2 and "d" not in run.logs()[-4:]


def test_complete_without_events_creates_the_context_first(make) -> None:  # type: ignore[no-untyped-def]
    run = make()
    stream = run.http_context()
    stream.complete()
    sid = stream.id
    assert run.enters()[3:] == [("context_create", (sid, 1)), ("log", (sid,)), ("done", (sid,)),
                                ("delete", (sid,))]


def test_done_and_get_status_defaults(make) -> None:  # type: ignore[no-untyped-def]
    run = make("tick done\ntick get_status\nrequest_headers done\n")
    run.tick()
    run.http_context().request_headers(REQUEST, True)
    assert run.one("tick", "done").status == NOT_FOUND
    assert run.one("request_headers", "done").status == NOT_FOUND
    assert run.one("tick", "get_status").outs == (b"0", b"")


def test_effective_context(make) -> None:  # type: ignore[no-untyped-def]
    run = make("tick set_effective_context 2\ntick get_header_map_value 0 s::method\n"
               "tick set_effective_context 77\ntick set_effective_context 0\n"
               "request_headers return 1\n")
    stream = run.http_context()
    stream.request_headers(REQUEST, False)
    run.tick()
    recs = run.recs("tick")
    assert [(r.op, r.status) for r in recs] == [
        ("set_effective_context", OK), ("get_header_map_value", OK),
        ("set_effective_context", BAD_ARGUMENT), ("set_effective_context", BAD_ARGUMENT)]
    assert recs[1].out == b"GET"
    stream.complete()
    run.tick()  # the stream was deleted: its id is unknown now
    assert run.recs("tick")[4].status == BAD_ARGUMENT


def test_get_upstream_hosts_and_override(make) -> None:  # type: ignore[no-untyped-def]
    run = make("tick get_upstream_hosts\nrequest_headers set_upstream_override_host s:10.1.2.3:80\n"
               "request_headers inject_encoded_data_to_filter_chain s:x 1\n")
    run.tick()
    stream = run.http_context()
    stream.request_headers(REQUEST, True)
    assert run.one("tick", "get_upstream_hosts").outs == (b"",)
    assert run.one("request_headers", "set_upstream_override_host").status == OK
    assert stream.context.state.upstream_override == b"10.1.2.3:80"
    assert run.one("request_headers", "inject_encoded_data_to_filter_chain").status == 12


def test_plugin_reports_unknown_names(make) -> None:  # type: ignore[no-untyped-def]
    run = make("nosuch log 2 s:x\ntick\ntick frobnicate\n")
    run.tick()
    errors = run.logs("error")
    assert "conf unknown callback nosuch" in errors
    assert "conf missing op for tick" in errors
    assert "conf unknown op frobnicate" in errors


def test_configure_steps_append(make) -> None:  # type: ignore[no-untyped-def]
    run = make("tick log 2 s:once\n", "tick log 2 s:from-vm\n")
    run.tick()
    assert [r for r in run.logs("info") if r in ("once", "from-vm")] == ["from-vm", "once"]
