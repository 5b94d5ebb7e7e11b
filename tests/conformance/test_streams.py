"""Stream control: send_local_response (and the forced stop), continue_stream from an http
call response via set_effective_context (held body replayed), close_stream, actions."""

from __future__ import annotations

import pytest

from wasmgate.testing import Action

from .conftest import HTTP_CALL, REQUEST, RESPONSE

OK, NOT_FOUND, BAD_ARGUMENT, UNIMPLEMENTED = 0, 1, 2, 12


def test_send_local_response_from_request_headers(make) -> None:  # type: ignore[no-untyped-def]
    run = make("request_headers send_local_response 403 s:access%20denied%09now%0Ax s:no! "
               "m:X-Reason=policy&x-b=2 -1\nrequest_headers return 0\n")
    stream = run.http_context()
    action = stream.request_headers(REQUEST, False)
    assert run.one("request_headers", "send_local_response").status == OK
    assert action == Action.STOP_ALL_ITERATION_AND_WATERMARK  # forced stop despite `return 0`
    reply = stream.local_response
    assert reply is not None
    assert (reply.status, reply.body, reply.details, reply.grpc_status) == (
        403, b"no!", "access_denied_now_x", None)
    assert reply.headers == [(b"x-reason", b"policy"), (b"x-b", b"2")]


@pytest.mark.parametrize(("grpc", "want"), [("0", 0), ("3", 3), ("16", 16), ("17", None),
                                            ("-1", None)])
def test_send_local_response_grpc_status(make, grpc: str, want: int | None) -> None:  # type: ignore[no-untyped-def]
    run = make(f"request_headers send_local_response 200 s: s: m: {grpc}\n")
    stream = run.http_context()
    stream.request_headers(REQUEST, True)
    assert stream.local_response is not None
    assert stream.local_response.grpc_status == want
    assert stream.local_response.details == ""


def test_send_local_response_forces_stop_in_body_and_response(make) -> None:  # type: ignore[no-untyped-def]
    run = make("request_body send_local_response 413 s:too_big s: m:\n")
    stream = run.http_context()
    assert stream.request_headers(REQUEST, False) == Action.CONTINUE
    assert stream.request_body(b"x", True) == Action.PAUSE
    assert stream.local_response is not None and stream.local_response.status == 413
    run2 = make("response_headers send_local_response 502 s:bad s:b m:\n"
                "response_headers return 0\n")
    s2 = run2.http_context()
    s2.request_headers(REQUEST, True)
    assert s2.response_headers(RESPONSE, True) == Action.STOP_ALL_ITERATION_AND_WATERMARK
    assert s2.local_response is not None and s2.local_response.status == 502


def test_send_local_response_from_root_is_rejected(make) -> None:  # type: ignore[no-untyped-def]
    run = make("tick send_local_response 403 s: s: m: -1\n")
    run.tick()
    assert run.one("tick", "send_local_response").status == NOT_FOUND


def test_headers_pause_holds_body_until_continue_from_http_call_response(make) -> None:  # type: ignore[no-untyped-def]
    run = make(f"request_headers {HTTP_CALL}\nrequest_headers return 1\n"
               "http_call_response set_effective_context 2\n"
               "http_call_response continue_stream 0\n")
    stream = run.http_context()
    assert stream.id == 2
    assert stream.request_headers(REQUEST, False) == Action.STOP_ALL_ITERATION_AND_WATERMARK
    assert stream.request_paused
    assert stream.request_body(b"held", True) == Action.PAUSE
    assert run.enters("request_body") == []  # held, not delivered
    (call,) = run.pending_http_calls()
    assert call.context_id == 2
    run.respond_http_call(call.token)
    assert run.one("http_call_response", "set_effective_context").status == OK
    assert run.one("http_call_response", "continue_stream").status == OK
    assert not stream.request_paused
    assert run.order()[-2:] == ["http_call_response", "request_body"]
    assert run.enters("request_body") == [("request_body", (2, 4, 1))]
    assert stream.request_body_now == b"held"


def test_continue_stream_from_root_without_effective_context(make) -> None:  # type: ignore[no-untyped-def]
    run = make(f"request_headers {HTTP_CALL}\nrequest_headers return 1\n"
               "http_call_response continue_stream 0\n")
    stream = run.http_context()
    stream.request_headers(REQUEST, False)
    run.respond_http_call(run.pending_http_calls()[0].token)
    assert run.one("http_call_response", "continue_stream").status == NOT_FOUND
    assert stream.request_paused


def test_response_pause_and_continue_from_tick_via_effective_context(make) -> None:  # type: ignore[no-untyped-def]
    run = make("response_headers return 1\ntick set_effective_context 2\n"
               "tick continue_stream 1\n")
    stream = run.http_context()
    stream.request_headers(REQUEST, True)
    stream.response_headers(RESPONSE, False)
    assert stream.response_paused
    assert stream.response_body(b"r", True) == Action.PAUSE
    run.tick()
    assert not stream.response_paused
    assert run.enters("response_body") == [("response_body", (2, 1, 1))]


def test_continue_stream_enum(make) -> None:  # type: ignore[no-untyped-def]
    run = make("request_headers continue_stream 2\nrequest_headers continue_stream 3\n"
               "request_headers continue_stream 4\nrequest_headers continue_stream 0\n")
    stream = run.http_context()
    assert stream.request_headers(REQUEST, True) == Action.CONTINUE
    assert [r.status for r in run.recs("request_headers")] == [UNIMPLEMENTED, UNIMPLEMENTED,
                                                               BAD_ARGUMENT, OK]


def test_close_stream(make) -> None:  # type: ignore[no-untyped-def]
    run = make("request_headers close_stream 0\n")
    stream = run.http_context()
    assert not stream.closed
    stream.request_headers(REQUEST, True)
    assert run.one("request_headers", "close_stream").status == OK
    assert stream.closed


@pytest.mark.parametrize(("ret", "action"), [
    ("0", Action.CONTINUE), ("1", Action.STOP_ALL_ITERATION_AND_WATERMARK),
    ("2", Action.CONTINUE), ("3", Action.STOP_ALL_ITERATION_AND_BUFFER),
    ("4", Action.STOP_ALL_ITERATION_AND_WATERMARK), ("7", Action.STOP_ALL_ITERATION_AND_WATERMARK),
])
def test_headers_action_mapping(make, ret: str, action: Action) -> None:  # type: ignore[no-untyped-def]
    run = make(f"request_headers return {ret}\n")
    assert run.http_context().request_headers(REQUEST, False) == action


def test_trailers_pause(make) -> None:  # type: ignore[no-untyped-def]
    run = make("request_trailers return 1\n")
    stream = run.http_context()
    stream.request_headers(REQUEST, False)
    assert stream.request_trailers([("t", "1")]) == Action.PAUSE
    assert stream.request_paused
