"""proxy_get_property / proxy_set_property: Wasm tokens, request.* derived from headers,
legacy <-> xds.* names, filter-state round trip, root set_property -> NOT_FOUND, encodings."""

from __future__ import annotations

import struct

from .conftest import REQUEST, RESPONSE

OK, NOT_FOUND, INVALID_MEMORY = 0, 1, 6


def _get(make, paths: list[str], where: str = "request_headers", **kwargs):  # type: ignore[no-untyped-def]
    run = make("".join(f"{where} get_property s:{p}\n" for p in paths), **kwargs)
    if where == "tick":
        run.tick()
    else:
        stream = run.http_context()
        stream.request_headers(REQUEST, False)
        stream.response_headers(RESPONSE, True)
    return [(r.status, r.out) for r in run.recs(where, "get_property")]


def test_plugin_tokens_from_root_and_stream(make) -> None:  # type: ignore[no-untyped-def]
    paths = ["plugin_root_id", "plugin_name", "plugin_vm_id"]
    want = [(OK, b"conf"), (OK, b"the-plugin"), (OK, b"vm-1")]
    assert _get(make, paths, "tick", name="the-plugin", vm_id="vm-1") == want
    assert _get(make, paths, name="the-plugin", vm_id="vm-1") == want


def test_request_attributes_derived_from_headers(make) -> None:  # type: ignore[no-untyped-def]
    got = _get(make, ["request%00path", "request%00url_path", "request%00query",
                      "request%00method", "request%00host", "request%00useragent",
                      "request%00path%00", "request%00nothing"])
    assert got == [(OK, b"/x?q=1"), (OK, b"/x"), (OK, b"q=1"), (OK, b"GET"),
                   (OK, b"example.com"), (OK, b"ua"), (OK, b"/x?q=1"), (NOT_FOUND, b"")]


def test_request_headers_property_is_a_map_with_joined_values(make) -> None:  # type: ignore[no-untyped-def]
    ((status, raw),) = _get(make, ["request%00headers"])
    assert status == OK
    (count,) = struct.unpack_from("<I", raw)
    sizes = struct.unpack_from(f"<{2 * count}I", raw, 4)
    pos, pairs = 4 + 8 * count, {}
    for i in range(count):
        k, v = sizes[2 * i], sizes[2 * i + 1]
        pairs[raw[pos:pos + k]] = raw[pos + k + 1:pos + k + 1 + v]
        pos += k + v + 2
    assert pairs[b"x-a"] == b"1,2"
    assert pairs[b":method"] == b"GET"
    assert count == 5


def test_response_code_is_int64_le(make) -> None:  # type: ignore[no-untyped-def]
    run = make("response_headers get_property s:response%00code\n")
    stream = run.http_context()
    stream.request_headers(REQUEST, True)
    stream.response_headers(RESPONSE, True)
    assert run.one("response_headers", "get_property").out == struct.pack("<q", 200)


def test_int_property_is_8_byte_le(make) -> None:  # type: ignore[no-untyped-def]
    run = make("tick get_property s:upstream%00port\ntick get_property s:connection%00mtls\n")
    run.set_property("upstream.port", 8080)
    run.set_property("connection.mtls", True)
    run.tick()
    assert [r.out for r in run.recs("tick")] == [struct.pack("<Q", 8080), b"\x01"]


def test_route_name_legacy_and_xds(make) -> None:  # type: ignore[no-untyped-def]
    got = _get(make, ["route_name", "xds%00route_name"], properties={"xds.route_name": "r1"})
    assert got == [(OK, b"r1"), (OK, b"r1")]
    got = _get(make, ["route_name", "xds%00route_name"], "tick", properties={"route_name": "r2"})
    assert got == [(OK, b"r2"), (OK, b"r2")]


def test_set_property_round_trip_in_stream(make) -> None:  # type: ignore[no-untyped-def]
    run = make("request_headers set_property s:my_key s:val%00ue\n"
               "request_headers get_property s:my_key\n"
               "response_headers get_property s:my_key\n"
               "log get_property s:my_key\n"
               "log get_property s:filter_state%00wasm.my_key\n")
    stream = run.http_context()
    stream.request_headers(REQUEST, True)
    stream.response_headers(RESPONSE, True)
    stream.complete()
    assert run.one("request_headers", "set_property").status == OK
    # (the last one by Envoy's CEL name for it: filter_state["wasm.my_key"])
    assert [r.out for r in run.recs(op="get_property")] == [b"val\0ue"] * 4
    other = run.http_context()
    other.response_headers(RESPONSE, True)  # another stream: its own filter state
    assert run.recs("response_headers", "get_property")[-1].status == NOT_FOUND


def test_set_property_on_root_is_not_found(make) -> None:  # type: ignore[no-untyped-def]
    for cb in ("tick", "configure"):
        run = make(f"{cb} set_property s:k s:v\n")
        run.tick()
        assert run.one(cb, "set_property").status == NOT_FOUND


def test_property_bad_pointers(make) -> None:  # type: ignore[no-untyped-def]
    run = make("request_headers get_property bad\n"
               "request_headers get_property s:plugin_root_id !badout\n"
               "request_headers set_property s:k bad\n")
    run.http_context().request_headers(REQUEST, True)
    assert [r.status for r in run.recs("request_headers")] == [INVALID_MEMORY] * 3


def test_missing_property_is_not_found(make) -> None:  # type: ignore[no-untyped-def]
    assert _get(make, ["nothing%00here", "xds%00cluster_name"]) == [(NOT_FOUND, b"")] * 2


def test_response_code_details_for_an_upstream_response(make) -> None:  # type: ignore[no-untyped-def]
    run = make("response_headers get_property s:response%00code_details\n")
    stream = run.http_context()
    stream.request_headers({":path": "/", ":method": "GET"}, True)
    stream.response_headers({":status": "200"}, True)
    assert run.one("response_headers", "get_property").out == b"via_upstream"
