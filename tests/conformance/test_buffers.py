"""proxy_get_buffer_bytes / _status / set_buffer_bytes: availability per callback, clamping,
Envoy's set semantics (replace, prepend, append, middle -> BAD_ARGUMENT), immutable buffers."""

from __future__ import annotations

import pytest

from wasmgate.testing import Action

from .conftest import HTTP_CALL, REQUEST, RESPONSE

OK, NOT_FOUND, BAD_ARGUMENT = 0, 1, 2


def _body_run(make, steps: str, body: bytes = b"hello", eos: bool = True):  # type: ignore[no-untyped-def]
    run = make(steps)
    stream = run.http_context()
    stream.request_headers(REQUEST, False)
    run.action = stream.request_body(body, eos)
    run.stream = stream
    return run


def test_request_body_readable_in_request_body(make) -> None:  # type: ignore[no-untyped-def]
    run = _body_run(make, "request_body get_buffer_bytes 0 0 100\n"
                          "request_body get_buffer_bytes 0 1 3\n"
                          "request_body get_buffer_bytes 0 3 100\n"
                          "request_body get_buffer_bytes 0 50 10\n"
                          "request_body get_buffer_status 0\n")
    got = [(r.status, r.outs) for r in run.recs("request_body")]
    assert got == [(OK, (b"hello",)), (OK, (b"ell",)), (OK, (b"lo",)), (OK, (b"",)),
                   (OK, (b"5", b"0"))]


def test_response_body_readable_in_response_body(make) -> None:  # type: ignore[no-untyped-def]
    run = make("response_body get_buffer_bytes 1 0 100\nresponse_body get_buffer_status 1\n")
    stream = run.http_context()
    stream.request_headers(REQUEST, True)
    stream.response_headers(RESPONSE, False)
    stream.response_body(b"world!", True)
    assert run.one("response_body", "get_buffer_bytes").out == b"world!"
    assert run.one("response_body", "get_buffer_status").outs == (b"6", b"0")


def test_request_body_not_available_in_request_headers(make) -> None:  # type: ignore[no-untyped-def]
    run = make("request_headers get_buffer_bytes 0 0 10\nrequest_headers get_buffer_status 0\n"
               "request_headers get_buffer_bytes 1 0 10\n")
    run.http_context().request_headers(REQUEST, False)
    assert [r.status for r in run.recs("request_headers")] == [NOT_FOUND] * 3


def test_body_buffers_not_available_in_root_callbacks(make) -> None:  # type: ignore[no-untyped-def]
    run = make("tick get_buffer_bytes 0 0 10\ntick get_buffer_bytes 1 0 10\n"
               "tick get_buffer_bytes 4 0 10\ntick get_buffer_bytes 5 0 10\n"
               "tick get_buffer_bytes 8 0 10\ntick get_buffer_bytes 9 0 10\n")
    run.tick()
    assert [r.status for r in run.recs("tick")] == [NOT_FOUND] * 6


def test_request_body_not_available_after_it_continued(make) -> None:  # type: ignore[no-untyped-def]
    run = make("response_headers get_buffer_bytes 0 0 10\n")
    stream = run.http_context()
    stream.request_headers(REQUEST, False)
    stream.request_body(b"hello", True)
    stream.response_headers(RESPONSE, True)
    assert run.one("response_headers", "get_buffer_bytes").status == NOT_FOUND


def test_plugin_configuration_only_in_configure(make) -> None:  # type: ignore[no-untyped-def]
    steps = ("configure get_buffer_bytes 7 0 9\nconfigure get_buffer_status 7\n"
             "tick get_buffer_bytes 7 0 10\nrequest_headers get_buffer_bytes 7 0 10\n")
    run = make(steps)
    run.tick()
    run.http_context().request_headers(REQUEST, True)
    assert run.one("configure", "get_buffer_bytes").outs == (steps[:9].encode(),)
    assert run.one("configure", "get_buffer_status").outs == (str(len(steps)).encode(), b"0")
    assert run.one("tick", "get_buffer_bytes").status == NOT_FOUND
    assert run.one("request_headers", "get_buffer_bytes").status == NOT_FOUND


def test_vm_configuration_in_vm_start(make) -> None:  # type: ignore[no-untyped-def]
    vm = "vm_start get_buffer_bytes 6 0 8\nvm_start get_buffer_status 6\n"
    run = make("", vm)
    assert run.one("vm_start", "get_buffer_bytes").out == vm[:8].encode()
    assert run.one("vm_start", "get_buffer_status").outs == (str(len(vm)).encode(), b"0")
    assert run.enters("vm_start") == [("vm_start", (1, len(vm)))]


def test_vm_configuration_readable_in_any_callback(make) -> None:  # type: ignore[no-untyped-def]
    """Envoy's Context::getBuffer returns the VM configuration unconditionally (only the plugin
    configuration is tied to on_configure), so a tick can read it."""
    vm = "vm_start log 2 s:x\n"
    run = make("tick get_buffer_bytes 6 0 100\n", vm)
    run.tick()
    assert run.one("tick", "get_buffer_bytes").out == vm.encode()


def test_call_data_in_foreign_function_only(make) -> None:  # type: ignore[no-untyped-def]
    run = make("foreign_function get_buffer_bytes 8 0 100\nforeign_function get_buffer_status 8\n"
               "foreign_function set_buffer_bytes 8 0 0 s:x\n")
    run.call_foreign_function(3, b"args!")
    assert run.one("foreign_function", "get_buffer_bytes").out == b"args!"
    assert run.one("foreign_function", "get_buffer_status").outs == (b"5", b"0")
    assert run.one("foreign_function", "set_buffer_bytes").status == BAD_ARGUMENT


def test_http_call_response_body_is_buffer_4(make) -> None:  # type: ignore[no-untyped-def]
    run = make(f"tick {HTTP_CALL}\nhttp_call_response get_buffer_bytes 4 0 100\n"
               "http_call_response get_buffer_bytes 4 2 2\n"
               "http_call_response set_buffer_bytes 4 0 0 s:x\n")
    run.tick()
    run.respond_http_call(run.one("tick", "http_call").num(), None, b"payload")
    got = [(r.op, r.status, r.outs) for r in run.recs("http_call_response")]
    assert got == [("get_buffer_bytes", OK, (b"payload",)), ("get_buffer_bytes", OK, (b"yl",)),
                   ("set_buffer_bytes", BAD_ARGUMENT, ())]


def test_set_buffer_bytes_on_plugin_configuration_is_bad_argument(make) -> None:  # type: ignore[no-untyped-def]
    run = make("configure set_buffer_bytes 7 0 0 s:x\n")
    assert run.one("configure", "set_buffer_bytes").status == BAD_ARGUMENT


def test_empty_body_chunk_returns_null(make) -> None:  # type: ignore[no-untyped-def]
    run = _body_run(make, "request_body get_buffer_bytes 0 0 100\n", body=b"")
    rec = run.one("request_body", "get_buffer_bytes")
    assert (rec.status, rec.out) == (OK, b"")


@pytest.mark.parametrize(("args", "status", "body"), [
    ("0 0x7fffffff s:NEW", OK, b"NEW"),            # replace
    ("0 5 s:NEW", OK, b"NEW"),                     # replace exactly len
    ("0 0 s:PRE-", OK, b"PRE-hello"),              # prepend
    ("0 2 s:HE", OK, b"HEllo"),                    # drain 2 then prepend
    ("5 0 s:-POST", OK, b"hello-POST"),            # append at len
    ("0x7fffffff 0 s:-POST", OK, b"hello-POST"),   # append (SDK form)
    ("2 1 s:X", BAD_ARGUMENT, b"hello"),           # middle
    ("0 0 bad", 6, b"hello"),                      # data out of bounds
])
def test_set_request_body(make, args: str, status: int, body: bytes) -> None:  # type: ignore[no-untyped-def]
    run = _body_run(make, f"request_body set_buffer_bytes 0 {args}\n"
                          "request_body get_buffer_bytes 0 0 100\n")
    assert run.one("request_body", "set_buffer_bytes").status == status
    assert run.one("request_body", "get_buffer_bytes").out == body
    assert run.stream.request_body_now == body
    assert run.action == Action.CONTINUE


def test_set_response_body_replace(make) -> None:  # type: ignore[no-untyped-def]
    run = make("response_body set_buffer_bytes 1 0 0x7fffffff s:replaced\n")
    stream = run.http_context()
    stream.request_headers(REQUEST, True)
    stream.response_headers(RESPONSE, False)
    stream.response_body(b"original", True)
    assert run.one("response_body", "set_buffer_bytes").status == OK
    assert stream.response_body_now == b"replaced"


def test_buffering_accumulates_and_exposes_whole_body(make) -> None:  # type: ignore[no-untyped-def]
    run = make("request_body get_buffer_bytes 0 0 100\nrequest_body return 1\n")
    stream = run.http_context()
    stream.request_headers(REQUEST, False)
    assert stream.request_body(b"abc", False) == Action.PAUSE
    assert stream.request_paused
    assert stream.request_body(b"def", True) == Action.PAUSE
    assert run.enters("request_body") == [("request_body", (stream.id, 3, 0)),
                                          ("request_body", (stream.id, 6, 1))]
    assert [r.out for r in run.recs("request_body")] == [b"abc", b"abcdef"]


def test_get_buffer_bytes_overflowing_range_is_bad_argument(make) -> None:  # type: ignore[no-untyped-def]
    run = _body_run(make, "request_body get_buffer_bytes 0 0xFFFFFFF0 0x100\n")
    assert run.one("request_body", "get_buffer_bytes").status == BAD_ARGUMENT
