"""Every host function from every callback where it is legal: root callbacks (vm_start,
configure, tick, queue_ready, http_call_response, foreign_function) and stream callbacks
(request/response headers, body, trailers, log), with normal, out-of-bounds and bad-enum args."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from .conftest import ALL_CBS, HTTP_CALL, ROOT_CBS, STREAM_CBS, Rec, everywhere

OK, NOT_FOUND, BAD_ARGUMENT, INVALID_MEMORY, UNIMPLEMENTED = 0, 1, 2, 6, 12
Check = Callable[[Rec], bool] | None

# (steps, op checked, status in root callbacks, status in stream callbacks, out check)
CASES: list[tuple[list[str], str, int, int, Check]] = [
    (["log 2 s:everywhere"], "log", OK, OK, None),
    (["get_log_level"], "get_log_level", OK, OK, lambda r: r.num() == 1),
    (["get_current_time_nanoseconds"], "get_current_time_nanoseconds", OK, OK,
     lambda r: r.num() > 1_600_000_000 * 10**9),
    (["set_tick_period_milliseconds 0"], "set_tick_period_milliseconds", OK, OK, None),
    (["get_property s:plugin_root_id"], "get_property", OK, OK, lambda r: r.out == b"conf"),
    (["get_property s:no.such.property"], "get_property", NOT_FOUND, NOT_FOUND, None),
    (["set_shared_data s:k s:v 0"], "set_shared_data", OK, OK, None),
    (["get_shared_data s:missing"], "get_shared_data", NOT_FOUND, NOT_FOUND, None),
    (["set_shared_data s:k2 s:v2 0", "get_shared_data s:k2"], "get_shared_data", OK, OK,
     lambda r: r.out == b"v2" and r.num(1) > 0),
    (["register_shared_queue s:q2"], "register_shared_queue", OK, OK, lambda r: r.num() > 0),
    (["resolve_shared_queue s: s:confq"], "resolve_shared_queue", OK, OK,
     lambda r: r.num() > 0),
    (["resolve_shared_queue s: s:nosuch"], "resolve_shared_queue", NOT_FOUND, NOT_FOUND, None),
    (["enqueue_shared_queue 99999 s:x"], "enqueue_shared_queue", NOT_FOUND, NOT_FOUND, None),
    (["dequeue_shared_queue 99999"], "dequeue_shared_queue", NOT_FOUND, NOT_FOUND, None),
    (["define_metric 0 s:c"], "define_metric", OK, OK, lambda r: r.num() & 3 == 0),
    (["define_metric 1 s:g", "record_metric $metric 7", "get_metric $metric"], "get_metric",
     OK, OK, lambda r: r.num() == 7),
    (["increment_metric 99999 1"], "increment_metric", NOT_FOUND, NOT_FOUND, None),
    (["get_metric 99999"], "get_metric", NOT_FOUND, NOT_FOUND, None),
    (["call_foreign_function s:compress s:abc"], "call_foreign_function", OK, OK,
     lambda r: len(r.out) > 0),
    (["call_foreign_function s:nosuch s:"], "call_foreign_function", NOT_FOUND, NOT_FOUND,
     None),
    (["get_status"], "get_status", OK, OK, None),
    (["done"], "done", NOT_FOUND, NOT_FOUND, None),
    (["get_upstream_hosts"], "get_upstream_hosts", OK, OK, lambda r: r.out == b""),
    (["set_effective_context $root"], "set_effective_context", OK, OK, None),
    (["set_effective_context 99999"], "set_effective_context", BAD_ARGUMENT, BAD_ARGUMENT,
     None),
    ([HTTP_CALL], "http_call", OK, OK, lambda r: r.num() % 4 == 0 and r.num() > 0),
    (["http_call s:up m:%3Amethod=GET&%3Aauthority=up null null 1000"], "http_call",
     BAD_ARGUMENT, BAD_ARGUMENT, None),
    (["grpc_call s:svc s:pkg.S s:M m: s:msg 1000"], "grpc_call", OK, OK,
     lambda r: r.num() % 4 == 1),
    (["grpc_stream s:svc s:pkg.S s:M m:"], "grpc_stream", OK, OK, lambda r: r.num() % 4 == 2),
    (["grpc_stream s:svc s:pkg.S s:M m:", "grpc_send $token s:m 0"], "grpc_send", OK, OK, None),
    (["grpc_call s:svc s:pkg.S s:M m: s:msg 1000", "grpc_send $token s:m 0"], "grpc_send",
     BAD_ARGUMENT, BAD_ARGUMENT, None),
    (["grpc_call s:svc s:pkg.S s:M m: s:msg 1000", "grpc_cancel $token"], "grpc_cancel",
     OK, OK, None),
    (["grpc_stream s:svc s:pkg.S s:M m:", "grpc_close $token"], "grpc_close", OK, OK, None),
    (["redis_init s:redis s:u s:p 100"], "redis_init", OK, OK, None),
    (["redis_call s:redis s:*1%0D%0A$4%0D%0APING%0D%0A"], "redis_call", OK, OK,
     lambda r: r.num() % 4 == 3),
    (["set_property s:k s:v"], "set_property", NOT_FOUND, OK, None),
    (["set_upstream_override_host s:10.0.0.1:80"], "set_upstream_override_host",
     BAD_ARGUMENT, OK, None),
    (["inject_encoded_data_to_filter_chain s:x 0"], "inject_encoded_data_to_filter_chain",
     BAD_ARGUMENT, UNIMPLEMENTED, None),
    (["close_stream 0"], "close_stream", NOT_FOUND, OK, None),
    (["continue_stream 2"], "continue_stream", UNIMPLEMENTED, UNIMPLEMENTED, None),
    # bad enums
    (["log 6 s:x"], "log", BAD_ARGUMENT, BAD_ARGUMENT, None),
    (["get_buffer_bytes 10 0 10"], "get_buffer_bytes", BAD_ARGUMENT, BAD_ARGUMENT, None),
    (["get_buffer_status 10"], "get_buffer_status", BAD_ARGUMENT, BAD_ARGUMENT, None),
    (["set_buffer_bytes 10 0 0 s:x"], "set_buffer_bytes", BAD_ARGUMENT, BAD_ARGUMENT, None),
    (["get_header_map_size 8"], "get_header_map_size", BAD_ARGUMENT, BAD_ARGUMENT, None),
    (["get_header_map_pairs 8"], "get_header_map_pairs", BAD_ARGUMENT, BAD_ARGUMENT, None),
    (["set_header_map_pairs 8 m:a=b"], "set_header_map_pairs", BAD_ARGUMENT, BAD_ARGUMENT,
     None),
    (["get_header_map_value 8 s:a"], "get_header_map_value", BAD_ARGUMENT, BAD_ARGUMENT, None),
    (["add_header_map_value 8 s:a s:b"], "add_header_map_value", BAD_ARGUMENT, BAD_ARGUMENT,
     None),
    (["replace_header_map_value 8 s:a s:b"], "replace_header_map_value", BAD_ARGUMENT,
     BAD_ARGUMENT, None),
    (["remove_header_map_value 8 s:a"], "remove_header_map_value", BAD_ARGUMENT, BAD_ARGUMENT,
     None),
    (["continue_stream 4"], "continue_stream", BAD_ARGUMENT, BAD_ARGUMENT, None),
    (["close_stream 4"], "close_stream", BAD_ARGUMENT, BAD_ARGUMENT, None),
    (["define_metric 3 s:m"], "define_metric", BAD_ARGUMENT, BAD_ARGUMENT, None),
    # out-of-bounds input pointers
    (["log 2 bad"], "log", INVALID_MEMORY, INVALID_MEMORY, None),
    (["get_property bad"], "get_property", INVALID_MEMORY, INVALID_MEMORY, None),
    (["set_property bad s:v"], "set_property", INVALID_MEMORY, INVALID_MEMORY, None),
    (["set_shared_data bad s:v 0"], "set_shared_data", INVALID_MEMORY, INVALID_MEMORY, None),
    (["get_shared_data bad"], "get_shared_data", INVALID_MEMORY, INVALID_MEMORY, None),
    (["register_shared_queue bad"], "register_shared_queue", INVALID_MEMORY, INVALID_MEMORY,
     None),
    (["resolve_shared_queue s: bad"], "resolve_shared_queue", INVALID_MEMORY, INVALID_MEMORY,
     None),
    (["define_metric 0 bad"], "define_metric", INVALID_MEMORY, INVALID_MEMORY, None),
    (["call_foreign_function bad s:"], "call_foreign_function", INVALID_MEMORY,
     INVALID_MEMORY, None),
    (["call_foreign_function s:compress bad"], "call_foreign_function", INVALID_MEMORY,
     INVALID_MEMORY, None),
    (["http_call bad m:%3Apath=/&%3Amethod=GET&%3Aauthority=up"], "http_call",
     INVALID_MEMORY, INVALID_MEMORY, None),
    (["http_call s:up bad"], "http_call", INVALID_MEMORY, INVALID_MEMORY, None),
    (["grpc_call s:svc s:S s:M m: bad 1000"], "grpc_call", INVALID_MEMORY, INVALID_MEMORY,
     None),
    (["grpc_stream bad s:S s:M m:"], "grpc_stream", INVALID_MEMORY, INVALID_MEMORY, None),
    (["redis_init bad"], "redis_init", INVALID_MEMORY, INVALID_MEMORY, None),
    (["redis_call s:redis bad"], "redis_call", INVALID_MEMORY, INVALID_MEMORY, None),
    (["get_header_map_value 0 bad"], "get_header_map_value", INVALID_MEMORY, INVALID_MEMORY,
     None),
    (["add_header_map_value 0 bad s:v"], "add_header_map_value", INVALID_MEMORY,
     INVALID_MEMORY, None),
    (["send_local_response 403 bad"], "send_local_response", INVALID_MEMORY, INVALID_MEMORY,
     None),
    (["set_upstream_override_host bad"], "set_upstream_override_host", INVALID_MEMORY,
     INVALID_MEMORY, None),
    (["inject_encoded_data_to_filter_chain bad 0"], "inject_encoded_data_to_filter_chain",
     INVALID_MEMORY, INVALID_MEMORY, None),
    # out-of-bounds out-pointers on calls that would otherwise succeed
    (["get_log_level !badout"], "get_log_level", INVALID_MEMORY, INVALID_MEMORY, None),
    (["get_current_time_nanoseconds !badout"], "get_current_time_nanoseconds",
     INVALID_MEMORY, INVALID_MEMORY, None),
    (["get_property s:plugin_root_id !badout"], "get_property", INVALID_MEMORY,
     INVALID_MEMORY, None),
    (["get_buffer_status 6 !badout"], "get_buffer_status", INVALID_MEMORY, INVALID_MEMORY,
     None),
    (["get_buffer_bytes 6 0 100 !badout"], "get_buffer_bytes", INVALID_MEMORY,
     INVALID_MEMORY, None),
    (["set_shared_data s:k3 s:v 0", "get_shared_data s:k3 !badout"], "get_shared_data",
     INVALID_MEMORY, INVALID_MEMORY, None),
    (["register_shared_queue s:q3 !badout"], "register_shared_queue", INVALID_MEMORY,
     INVALID_MEMORY, None),
    (["resolve_shared_queue s: s:confq !badout"], "resolve_shared_queue", INVALID_MEMORY,
     INVALID_MEMORY, None),
    (["define_metric 0 s:c !badout"], "define_metric", INVALID_MEMORY, INVALID_MEMORY, None),
    (["define_metric 1 s:g2", "get_metric $metric !badout"], "get_metric", INVALID_MEMORY,
     INVALID_MEMORY, None),
    (["get_status !badout"], "get_status", INVALID_MEMORY, INVALID_MEMORY, None),
    (["call_foreign_function s:compress s:abc !badout"], "call_foreign_function",
     INVALID_MEMORY, INVALID_MEMORY, None),
    ([HTTP_CALL + " !badout"], "http_call", INVALID_MEMORY, INVALID_MEMORY, None),
    (["grpc_call s:svc s:S s:M m: s:x 1000 !badout"], "grpc_call", INVALID_MEMORY,
     INVALID_MEMORY, None),
    (["grpc_stream s:svc s:S s:M m: !badout"], "grpc_stream", INVALID_MEMORY, INVALID_MEMORY,
     None),
    (["redis_call s:redis s:x !badout"], "redis_call", INVALID_MEMORY, INVALID_MEMORY, None),
    (["get_upstream_hosts !badout"], "get_upstream_hosts", INVALID_MEMORY, INVALID_MEMORY,
     None),
]


def _id(case: tuple[list[str], str, int, int, Check]) -> str:
    return " ; ".join(case[0])[:60]


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_host_function_in_every_callback(make, case) -> None:  # type: ignore[no-untyped-def]
    steps, op, root_status, stream_status, check = case
    run = everywhere(make, steps)
    got = {cb: run.one(cb, op) for cb in ALL_CBS}
    want = {cb: root_status if cb in ROOT_CBS else stream_status for cb in ALL_CBS}
    assert {cb: r.status for cb, r in got.items()} == want
    if check is not None:
        bad = {cb: r.outs for cb, r in got.items() if not check(r)}
        assert not bad


def test_everywhere_drives_every_callback(make) -> None:  # type: ignore[no-untyped-def]
    run = everywhere(make, ["log 2 s:x"])
    entered = set(run.order())
    assert set(ALL_CBS) <= entered
    assert set(ROOT_CBS) <= entered and set(STREAM_CBS) <= entered
    assert not run.failed and not run.crashes
