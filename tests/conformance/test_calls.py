"""Outbound calls: http_call (validation, token shape, response delivery, failure),
gRPC call/stream/send/cancel/close and Higress redis_init/redis_call."""

from __future__ import annotations

import pytest

from .conftest import HTTP_CALL, REQUEST

OK, NOT_FOUND, BAD_ARGUMENT, PARSE_FAILURE = 0, 1, 2, 4
HEADERS = {"path": "%3Apath=/p", "method": "%3Amethod=POST", "authority": "%3Aauthority=up"}


@pytest.mark.parametrize("missing", ["path", "method", "authority"])
def test_http_call_requires_pseudo_headers(make, missing: str) -> None:  # type: ignore[no-untyped-def]
    hdrs = "&".join(v for k, v in HEADERS.items() if k != missing)
    run = make(f"tick http_call s:up m:{hdrs} null null 1000\n")
    run.tick()
    assert run.one("tick", "http_call").status == BAD_ARGUMENT
    assert run.pending_http_calls() == []


def test_http_call_unknown_upstream(make) -> None:  # type: ignore[no-untyped-def]
    hdrs = "&".join(HEADERS.values())
    run = make(f"tick http_call s:nowhere m:{hdrs} null null 1000\n"
               f"tick http_call s:known m:{hdrs} null null 1000\n", upstreams={"known"})
    run.tick()
    first, second = run.recs("tick", "http_call")
    assert first.status == BAD_ARGUMENT
    assert second.status == OK
    assert [c.upstream for c in run.pending_http_calls()] == ["known"]
    assert any("nowhere" in line for line in run.logs("warn"))


def test_http_call_request_and_token_shape(make) -> None:  # type: ignore[no-untyped-def]
    hdrs = "&".join(HEADERS.values())
    run = make(f"request_headers http_call s:up m:{hdrs}&x-up=1 s:body! m:tr=1 1234\n"
               f"request_headers http_call s:up m:{hdrs} null null 0\n")
    stream = run.http_context()
    stream.request_headers(REQUEST, True)
    tokens = [r.num() for r in run.recs("request_headers", "http_call")]
    assert all(t > 0 and t % 4 == 0 for t in tokens) and tokens[0] != tokens[1]
    call = {c.token: c for c in run.pending_http_calls()}[tokens[0]]
    assert (call.upstream, call.body, call.timeout_ms, call.context_id) == (
        "up", b"body!", 1234, stream.id)
    assert call.header(":path") == "/p" and call.header("x-up") == "1"
    assert call.header("content-length") == "5"
    assert call.trailers == [(b"tr", b"1")]
    assert {c.token: c for c in run.pending_http_calls()}[tokens[1]].header(
        "content-length") is None


def test_http_call_response_delivery(make) -> None:  # type: ignore[no-untyped-def]
    run = make(f"tick {HTTP_CALL}\nhttp_call_response get_status\n"
               "http_call_response get_buffer_bytes 4 0 100\n")
    run.tick()
    token = run.one("tick", "http_call").num()
    run.respond_http_call(token, [(":status", "200"), ("a", "1")], b"body", [("t", "x")])
    assert run.enters("http_call_response") == [("http_call_response", (1, token, 2, 4, 1))]
    assert run.one("http_call_response", "get_status").outs == (b"0", b"")
    assert run.one("http_call_response", "get_buffer_bytes").out == b"body"
    assert run.pending_http_calls() == []


def test_http_call_failure(make) -> None:  # type: ignore[no-untyped-def]
    run = make(f"tick {HTTP_CALL}\nhttp_call_response get_status\n"
               "http_call_response get_buffer_bytes 4 0 10\n"
               "http_call_response get_header_map_pairs 6\n")
    run.tick()
    token = run.one("tick", "http_call").num()
    run.fail_http_call(token)
    assert run.enters("http_call_response") == [("http_call_response", (1, token, 0, 0, 0))]
    status = run.one("http_call_response", "get_status")
    assert (status.status, status.outs) == (OK, (b"11", b"reset"))
    assert run.one("http_call_response", "get_buffer_bytes").status == NOT_FOUND
    assert run.one("http_call_response", "get_header_map_pairs").out == b""


def test_grpc_call_and_stream_tokens(make) -> None:  # type: ignore[no-untyped-def]
    run = make("tick grpc_call s:svc s:pkg.Svc s:Get m:k=v s:req 500\n"
               "tick grpc_stream s:svc s:pkg.Svc s:Watch m:\n"
               "tick grpc_send $token s:more 1\n")
    run.tick()
    call_tok = run.one("tick", "grpc_call").num()
    stream_tok = run.one("tick", "grpc_stream").num()
    assert call_tok & 3 == 1 and stream_tok & 3 == 2 and call_tok > 4 and stream_tok > 4
    assert run.one("tick", "grpc_send").status == OK
    calls = {c.token: c for c in run.pending_grpc_calls()}
    call, stream = calls[call_tok], calls[stream_tok]
    assert (call.service, call.service_name, call.method, call.message, call.timeout_ms) == (
        b"svc", "pkg.Svc", "Get", b"req", 500)
    assert call.initial_metadata == [(b"k", b"v")] and not call.streaming
    assert stream.streaming and stream.message is None and stream.sent == [(b"more", True)]


def test_grpc_send_cancel_close_token_checks(make) -> None:  # type: ignore[no-untyped-def]
    run = make("tick grpc_call s:svc s:S s:M m: s:x 500\n"
               "tick grpc_send $token s:m 0\n"
               "tick grpc_send 4 s:m 0\n"
               "tick grpc_cancel 8\n"
               "tick grpc_close 0\n"
               "tick grpc_cancel $token\n")
    run.tick()
    statuses = [r.status for r in run.recs("tick")]
    assert statuses == [OK, BAD_ARGUMENT, NOT_FOUND, NOT_FOUND, NOT_FOUND, OK]
    assert run.pending_grpc_calls() == []


def test_grpc_send_unknown_stream_token_is_not_found(make) -> None:  # type: ignore[no-untyped-def]
    run = make("tick grpc_send 1002 s:m 0\n")
    run.tick()
    assert run.one("tick", "grpc_send").status == NOT_FOUND


def test_grpc_unknown_service_is_parse_failure(make) -> None:  # type: ignore[no-untyped-def]
    run = make("tick grpc_call s:nope s:S s:M m: s:x 500\ntick grpc_stream s:nope s:S s:M m:\n",
               upstreams={"known"})
    run.tick()
    assert [r.status for r in run.recs("tick")] == [PARSE_FAILURE, PARSE_FAILURE]


def test_grpc_unary_success_delivers_only_the_message(make) -> None:  # type: ignore[no-untyped-def]
    """As Envoy: a successful unary call ends with proxy_on_grpc_receive; a failed one gets
    only proxy_on_grpc_close with its status."""
    run = make("tick grpc_call s:svc s:S s:M m: s:x 500\n"
               "grpc_receive get_buffer_bytes 5 0 100\n"
               "grpc_close get_status\n")
    run.tick()
    token = run.one("tick", "grpc_call").num()
    run.respond_grpc_call(token, b"reply")
    assert [e[0] for e in run.enters()[-1:]] == ["grpc_receive"]
    assert run.one("grpc_receive", "get_buffer_bytes").out == b"reply"
    run.tick()
    failed = run.one("tick", "grpc_call").num()
    run.respond_grpc_call(failed, status=14)
    assert run.enters()[-1] == ("grpc_close", (1, failed, 14))


def test_grpc_response_delivery(make) -> None:  # type: ignore[no-untyped-def]
    run = make("tick grpc_stream s:svc s:S s:M m:\n"
               "grpc_receive_initial_metadata get_header_map_value 4 s:im\n"
               "grpc_receive get_buffer_bytes 5 0 100\n"
               "grpc_receive_trailing_metadata get_header_map_value 5 s:tm\n"
               "grpc_close get_status\n")
    run.tick()
    token = run.one("tick", "grpc_stream").num()
    run.respond_grpc_call(token, b"reply", status=5, initial_metadata=[("im", "1")],
                          trailing_metadata=[("tm", "2")])
    assert run.enters()[-4:] == [("grpc_receive_initial_metadata", (1, token, 1)),
                                 ("grpc_receive", (1, token, 5)),
                                 ("grpc_receive_trailing_metadata", (1, token, 1)),
                                 ("grpc_close", (1, token, 5))]
    assert run.one("grpc_receive_initial_metadata", "get_header_map_value").out == b"1"
    assert run.one("grpc_receive", "get_buffer_bytes").out == b"reply"
    assert run.one("grpc_receive_trailing_metadata", "get_header_map_value").out == b"2"
    assert run.one("grpc_close", "get_status").num() == 5


def test_redis_init_and_call(make) -> None:  # type: ignore[no-untyped-def]
    query = "*1%0D%0A$4%0D%0APING%0D%0A"
    run = make(f"configure redis_init s:redis?db=1 s:user s:pw 250\n"
               f"tick redis_call s:redis s:{query}\n"
               "redis_call_response get_buffer_bytes 9 0 100\n"
               "redis_call_response get_status\n")
    assert run.one("configure", "redis_init").status == OK
    (init,) = run.redis_inits
    assert (init.cluster, init.username, init.password, init.timeout_ms) == (
        "redis?db=1", "user", "pw", 250)
    run.tick()
    token = run.one("tick", "redis_call").num()
    assert token & 3 == 3 and token > 4
    (call,) = run.pending_redis_calls()
    assert call.query == b"*1\r\n$4\r\nPING\r\n"
    run.respond_redis_call(token, b"+PONG\r\n")
    assert run.enters("redis_call_response") == [("redis_call_response", (1, token, 0, 7))]
    assert run.one("redis_call_response", "get_buffer_bytes").out == b"+PONG\r\n"
    run.tick()
    run.tick()
    token2 = run.one("tick", "redis_call").num()
    run.respond_redis_call(token2, b"", status=1)
    assert run.enters("redis_call_response")[-1] == ("redis_call_response", (1, token2, 1, 0))
    assert run.one("redis_call_response", "get_buffer_bytes").status == NOT_FOUND
    assert run.one("redis_call_response", "get_status").outs == (b"11", b"reset")


def test_redis_unknown_cluster(make) -> None:  # type: ignore[no-untyped-def]
    run = make("configure redis_init s:nope s: s: 100\nconfigure redis_call s:nope s:x\n"
               "configure redis_init s:known?db=2 s: s: 100\n", upstreams={"known"})
    assert [r.status for r in run.recs("configure")] == [BAD_ARGUMENT, BAD_ARGUMENT, OK]
