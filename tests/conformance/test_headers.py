"""Header maps: reads, mutations (keys lower-cased) visible to the stream, availability rules
(BAD_ARGUMENT after continue / from root, NOT_FOUND for missing keys, read-only in on_log)."""

from __future__ import annotations

import struct

import pytest

from .conftest import HTTP_CALL, REQUEST, RESPONSE

OK, NOT_FOUND, BAD_ARGUMENT, INVALID_MEMORY = 0, 1, 2, 6


def serialize(pairs: list[tuple[bytes, bytes]]) -> bytes:
    sizes = b"".join(struct.pack("<II", len(k), len(v)) for k, v in pairs)
    return struct.pack("<I", len(pairs)) + sizes + b"".join(k + b"\0" + v + b"\0" for k, v in pairs)


def _request(make, steps: str, eos: bool = True):  # type: ignore[no-untyped-def]
    run = make(steps)
    run.stream = run.http_context()
    run.action = run.stream.request_headers(REQUEST, eos)
    return run


def test_reads_in_request_headers(make) -> None:  # type: ignore[no-untyped-def]
    run = _request(make, "request_headers get_header_map_value 0 s::path\n"
                         "request_headers get_header_map_value 0 s:X-A\n"
                         "request_headers get_header_map_value 0 s:missing\n"
                         "request_headers get_header_map_size 0\n"
                         "request_headers get_header_map_pairs 0\n")
    recs = run.recs("request_headers")
    assert [(r.status, r.outs[:1]) for r in recs[:3]] == [
        (OK, (b"/x?q=1",)), (OK, (b"1",)), (NOT_FOUND, (b"",))]
    pairs = [(k.encode(), v.encode()) for k, v in REQUEST]
    assert recs[3].num() == sum(len(k) + len(v) for k, v in pairs)
    assert recs[4].out == serialize(pairs)
    assert run.enters("request_headers") == [("request_headers", (run.stream.id, 6, 1))]


def test_mutations_visible_in_request_headers_now(make) -> None:  # type: ignore[no-untyped-def]
    run = _request(make, "request_headers add_header_map_value 0 s:X-New s:v1\n"
                         "request_headers add_header_map_value 0 s:x-new s:v2\n"
                         "request_headers replace_header_map_value 0 s:X-A s:only\n"
                         "request_headers replace_header_map_value 0 s:X-Fresh s:f\n"
                         "request_headers remove_header_map_value 0 s:User-Agent\n"
                         "request_headers remove_header_map_value 0 s:absent\n"
                         "request_headers get_header_map_value 0 s:x-a\n")
    assert [r.status for r in run.recs("request_headers")] == [OK] * 7
    assert run.one("request_headers", "get_header_map_value").out == b"only"
    assert run.stream.request_headers_now == [
        (b":path", b"/x?q=1"), (b":method", b"GET"), (b":authority", b"example.com"),
        (b"x-a", b"only"), (b"x-new", b"v1"), (b"x-new", b"v2"), (b"x-fresh", b"f")]
    assert run.stream.header("X-NEW") == "v1"


def test_supplied_header_names_are_lower_cased(make) -> None:  # type: ignore[no-untyped-def]
    run = make("request_headers get_header_map_value 0 s:x-a\n"
               "request_headers remove_header_map_value 0 s:user-agent\n")
    stream = run.http_context()
    stream.request_headers([(":path", "/"), ("User-Agent", "ua"), ("X-A", "1"), ("x-a", "2")])
    assert run.one("request_headers", "get_header_map_value").out == b"1"
    assert stream.request_headers_now == [(b":path", b"/"), (b"x-a", b"1"), (b"x-a", b"2")]


def test_set_header_map_pairs_replaces_and_lowercases(make) -> None:  # type: ignore[no-untyped-def]
    run = _request(make, "request_headers set_header_map_pairs 0 m:A=1&B-Two=2&empty\n")
    assert run.one("request_headers", "set_header_map_pairs").status == OK
    assert run.stream.request_headers_now == [(b"a", b"1"), (b"b-two", b"2"), (b"empty", b"")]


def test_set_header_map_pairs_bad_pointer(make) -> None:  # type: ignore[no-untyped-def]
    run = _request(make, "request_headers set_header_map_pairs 0 bad\n"
                         "request_headers get_header_map_pairs 0 !badout\n"
                         "request_headers get_header_map_size 0 !badout\n"
                         "request_headers get_header_map_value 0 s::path !badout\n")
    assert [r.status for r in run.recs("request_headers")] == [INVALID_MEMORY] * 4
    assert run.stream.request_headers_now[0] == (b":path", b"/x?q=1")


def test_response_header_mutations(make) -> None:  # type: ignore[no-untyped-def]
    run = make("response_headers add_header_map_value 2 s:X-Resp s:yes\n"
               "response_headers replace_header_map_value 2 s::status s:201\n"
               "response_headers get_header_map_value 2 s:Content-Type\n"
               "response_headers get_header_map_value 0 s::path\n")
    stream = run.http_context()
    stream.request_headers(REQUEST, True)
    stream.response_headers(RESPONSE, True)
    assert stream.response_headers_now == [(b":status", b"201"), (b"content-type", b"text/plain"),
                                           (b"x-resp", b"yes")]
    assert run.one("response_headers", "get_header_map_value").status == BAD_ARGUMENT
    assert run.recs("response_headers", "get_header_map_value")[0].out == b"text/plain"


def test_request_headers_after_they_continued(make) -> None:  # type: ignore[no-untyped-def]
    run = make("request_body get_header_map_value 0 s::path\n"
               "request_body get_header_map_pairs 0\n"
               "request_body add_header_map_value 0 s:late s:1\n"
               "request_body get_header_map_size 0\n")
    stream = run.http_context()
    stream.request_headers(REQUEST, False)
    stream.request_body(b"b", True)
    got = [(r.op, r.status, r.outs) for r in run.recs("request_body")]
    assert got == [("get_header_map_value", BAD_ARGUMENT, (b"",)),
                   ("get_header_map_pairs", OK, (b"",)),
                   ("add_header_map_value", BAD_ARGUMENT, ()),
                   ("get_header_map_size", OK, (b"0",))]
    assert (b"late", b"1") not in stream.request_headers_now


def test_headers_still_mutable_while_paused_and_readable_in_log(make) -> None:  # type: ignore[no-untyped-def]
    run = make("request_headers return 1\n"
               "log get_header_map_value 0 s::method\n"
               "log get_header_map_value 2 s::status\n"
               "log get_header_map_value 0 s:missing\n"
               "log add_header_map_value 0 s:x s:y\n"
               "log get_header_map_value 3 s:st\n")
    stream = run.http_context()
    stream.request_headers(REQUEST, True)
    assert stream.request_paused
    stream.response_headers(RESPONSE, False)
    stream.response_trailers([("st", "z")])
    stream.complete()
    got = [(r.status, r.outs) for r in run.recs("log")]
    assert got == [(OK, (b"GET",)), (OK, (b"200",)), (NOT_FOUND, (b"",)), (BAD_ARGUMENT, ()),
                   (OK, (b"z",))]


def test_trailers(make) -> None:  # type: ignore[no-untyped-def]
    run = make("request_trailers get_header_map_value 1 s:RT\n"
               "request_trailers add_header_map_value 1 s:X-T s:2\n"
               "response_trailers get_header_map_pairs 3\n"
               "response_trailers replace_header_map_value 3 s:st s:new\n")
    stream = run.http_context()
    stream.request_headers(REQUEST, False)
    stream.request_body(b"x", False)
    stream.request_trailers([("rt", "1")])
    stream.response_headers(RESPONSE, False)
    stream.response_trailers([("st", "1")])
    assert run.one("request_trailers", "get_header_map_value").out == b"1"
    assert stream.request_trailers_now == [(b"rt", b"1"), (b"x-t", b"2")]
    assert run.one("response_trailers", "get_header_map_pairs").out == serialize([(b"st", b"1")])
    assert stream.response_trailers_now == [(b"st", b"new")]
    assert run.enters("request_trailers") == [("request_trailers", (stream.id, 1))]


def test_trailers_can_be_added_from_last_body_chunk(make) -> None:  # type: ignore[no-untyped-def]
    run = make("request_body add_header_map_value 1 s:Added s:yes\n")
    stream = run.http_context()
    stream.request_headers(REQUEST, False)
    stream.request_body(b"first", False)
    assert run.recs("request_body")[0].status == BAD_ARGUMENT
    stream.request_body(b"last", True)
    assert run.one("request_body", "add_header_map_value").status == OK
    assert stream.request_trailers_now == [(b"added", b"yes")]


@pytest.mark.parametrize("op", ["get_header_map_value 0 s::path", "add_header_map_value 0 s:a s:b",
                                "replace_header_map_value 2 s:a s:b",
                                "remove_header_map_value 1 s:a", "set_header_map_pairs 3 m:a=b",
                                "get_header_map_size 0"])
def test_http_maps_from_root_are_bad_argument(make, op: str) -> None:  # type: ignore[no-untyped-def]
    run = make(f"tick {op}\n")
    run.tick()
    assert run.one("tick", op.split()[0]).status == BAD_ARGUMENT


def test_header_map_pairs_unavailable_from_root_is_empty_ok(make) -> None:  # type: ignore[no-untyped-def]
    run = make("tick get_header_map_pairs 0\n")
    run.tick()
    rec = run.one("tick", "get_header_map_pairs")
    assert (rec.status, rec.out) == (OK, b"")


def test_http_call_response_maps(make) -> None:  # type: ignore[no-untyped-def]
    run = make(f"tick {HTTP_CALL}\nhttp_call_response get_header_map_pairs 6\n"
               "http_call_response get_header_map_value 6 s::Status\n"
               "http_call_response get_header_map_value 7 s:grpc-status\n"
               "http_call_response add_header_map_value 6 s:x s:y\n"
               "tick get_header_map_value 6 s::status\n")
    run.tick()
    run.respond_http_call(run.one("tick", "http_call").num(), [(":status", "404"), ("a", "b")],
                          b"", [("grpc-status", "0")])
    recs = run.recs("http_call_response")
    assert recs[0].out == serialize([(b":status", b"404"), (b"a", b"b")])
    assert [(r.status, r.outs[:1]) for r in recs[1:3]] == [(OK, (b"404",)), (OK, (b"0",))]
    run.tick()
    assert run.one("tick", "get_header_map_value").status == BAD_ARGUMENT
