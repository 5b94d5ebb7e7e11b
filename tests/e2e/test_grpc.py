"""proxy_grpc_call / proxy_grpc_stream through a real `wasmgate run` to a real gRPC server.

The server (grpcio, in this process) speaks raw bytes through a generic handler, so no protobuf
is involved; the conformance plugin makes the calls and logs what comes back.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc
import pytest

from wasmgate.gateway.grpc import cluster_of, outgoing_metadata

from .conftest import Gateway, free_port
from .test_gateway import conformance, gateway_doc
from .test_redis import esc, wait_for_log

Start = Callable[..., Gateway]
SERVICE = "test.Echo"


def _metadata(context: grpc.ServicerContext) -> dict[str, str | bytes]:
    return dict(context.invocation_metadata())


def _unary(request: bytes, context: grpc.ServicerContext) -> bytes:
    seen = _metadata(context)
    context.send_initial_metadata([("x-echo", str(seen.get("x-test", "")))])
    context.set_trailing_metadata([("x-trail", "done")])
    return b"echo:" + request


def _stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
    seen = _metadata(context)
    context.send_initial_metadata([("x-echo", str(seen.get("x-test", "")))])
    count = 0
    for request in requests:
        count += 1
        yield b"echo:" + request
    context.set_trailing_metadata([("x-count", str(count))])


def _slow(request: bytes, context: grpc.ServicerContext) -> bytes:
    time.sleep(1.5)
    return request


HELD_OPEN = threading.Event()
HELD_ENDED = threading.Event()


def _hold(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
    """A stream the server never ends: only the client can (by cancelling)."""
    context.add_callback(HELD_ENDED.set)
    HELD_OPEN.set()
    yield from requests


def _fail(request: bytes, context: grpc.ServicerContext) -> bytes:
    context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
    return b""  # pragma: no cover - abort raises


@pytest.fixture
def grpc_server() -> Iterator[int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    handler = grpc.method_handlers_generic_handler(SERVICE, {
        "Unary": grpc.unary_unary_rpc_method_handler(_unary),
        "Stream": grpc.stream_stream_rpc_method_handler(_stream),
        "Slow": grpc.unary_unary_rpc_method_handler(_slow),
        "Fail": grpc.unary_unary_rpc_method_handler(_fail),
        "Hold": grpc.stream_stream_rpc_method_handler(_hold),
    })
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(0)


def grpc_doc(upstream: str, port: int) -> str:
    """The test Gateway with one more cluster, `grpcsvc`, pointing at the gRPC server."""
    return gateway_doc(upstream).replace(
        "  routes:", f'  - name: grpcsvc\n    endpoints: ["127.0.0.1:{port}"]\n  routes:', 1)


RECEIVE_STEPS = ["grpc_receive get_buffer_bytes 5 0 100",
                 "grpc_receive_initial_metadata get_header_map_value 4 s:x-echo",
                 "grpc_receive_trailing_metadata get_header_map_pairs 5",
                 "grpc_close get_status"]


def test_unary_call_round_trip(start_gateway: Start, upstream: str, grpc_server: int) -> None:
    steps = [f"request_headers grpc_call s:grpcsvc s:{SERVICE} s:Unary m:x-test=hello "
             "s:ping%00bytes 2000", *RECEIVE_STEPS]
    gateway = start_gateway(grpc_doc(upstream, grpc_server) + conformance("g", steps))
    assert gateway.get("/")[0] == 200
    token = wait_for_log(gateway, r"conf request_headers grpc_call status=0 out=(\d+)")[1]
    wait_for_log(gateway, rf"enter grpc_receive \d+ {token} 15\b")
    wait_for_log(gateway, r"conf grpc_receive get_buffer_bytes status=0 out=echo:ping%00bytes")
    # Envoy's order for a unary call: the response message only, no metadata, no close
    time.sleep(0.3)
    logs = gateway.logs()
    assert "enter grpc_close" not in logs
    assert "enter grpc_receive_initial_metadata" not in logs
    assert gateway.get("/")[0] == 200  # keeps serving (and calls again)
    wait_for_log(gateway, r"out=echo:ping%00bytes[\s\S]*out=echo:ping%00bytes")


def test_stream_send_receive_close(start_gateway: Start, upstream: str,
                                   grpc_server: int) -> None:
    steps = [f"request_headers grpc_stream s:grpcsvc s:{SERVICE} s:Stream m:x-test=meta",
             "request_headers grpc_send $token s:one 0",
             "request_headers grpc_send $token s:two 0",
             "request_headers grpc_close $token", *RECEIVE_STEPS]
    gateway = start_gateway(grpc_doc(upstream, grpc_server) + conformance("g", steps))
    assert gateway.get("/")[0] == 200
    token = wait_for_log(gateway, r"conf request_headers grpc_stream status=0 out=(\d+)")[1]
    assert "conf request_headers grpc_send status=0" in gateway.logs()
    found = wait_for_log(gateway, rf"enter grpc_close \d+ {token} 0\b")
    logs = gateway.logs()[:found.end()]
    order = [m[0] for m in re.finditer(
        r"enter grpc_receive_initial_metadata|conf grpc_receive_initial_metadata "
        r"get_header_map_value status=0 out=meta|out=echo:one|out=echo:two|"
        r"enter grpc_receive_trailing_metadata|x-count%002%00|enter grpc_close", logs)]
    assert order[0] == "enter grpc_receive_initial_metadata", order
    assert order[1].endswith("out=meta"), order
    assert order[2:4] == ["out=echo:one", "out=echo:two"], order
    assert order[4] == "enter grpc_receive_trailing_metadata", order
    assert "x-count" in order[5] and order[6] == "enter grpc_close", order
    wait_for_log(gateway, r"conf grpc_close get_status status=0 out=0 out=\n")
    assert gateway.get("/")[0] == 200


def test_stream_end_stream_on_send(start_gateway: Start, upstream: str,
                                   grpc_server: int) -> None:
    # a bare host:port as the service, and end_stream on the last send instead of grpc_close
    steps = [f"request_headers grpc_stream s:127.0.0.1:{grpc_server} s:{SERVICE} s:Stream m:",
             "request_headers grpc_send $token s:last 1", *RECEIVE_STEPS]
    gateway = start_gateway(gateway_doc(upstream) + conformance("g", steps))
    assert gateway.get("/")[0] == 200
    token = wait_for_log(gateway, r"conf request_headers grpc_stream status=0 out=(\d+)")[1]
    wait_for_log(gateway, r"out=echo:last")
    wait_for_log(gateway, rf"enter grpc_close \d+ {token} 0\b")


def test_status_codes(start_gateway: Start, upstream: str, grpc_server: int) -> None:
    dead = free_port()
    calls = {
        "unimplemented": f"s:grpcsvc s:{SERVICE} s:Nope m: s:x 2000",
        "unavailable": f"s:127.0.0.1:{dead} s:{SERVICE} s:Unary m: s:x 2000",
        "deadline": f"s:grpcsvc s:{SERVICE} s:Slow m: s:x 300",
        "aborted": f"s:grpcsvc s:{SERVICE} s:Fail m: s:x 2000",
    }
    steps = [f"request_headers grpc_call {args}" for args in calls.values()]
    steps += ["request_headers grpc_call s:no-such-cluster s:x s:y m: s:x 100",
              "request_headers grpc_call s:%FF%FE s:x s:y m: s:x 100",
              "grpc_close get_status"]
    gateway = start_gateway(grpc_doc(upstream, grpc_server) + conformance("g", steps))
    assert gateway.get("/")[0] == 200
    tokens = re.findall(r"conf request_headers grpc_call status=0 out=(\d+)",
                        wait_for_log(gateway, r"(conf request_headers grpc_call status=\d+"
                                              r"[^\n]*\n[\s\S]*){6}").string)
    assert len(tokens) == 4, gateway.logs()
    # unknown clusters (a name no one knows, bytes that are not UTF-8): PARSE_FAILURE like Envoy
    assert gateway.logs().count("conf request_headers grpc_call status=4") == 2
    expected = dict(zip(calls, tokens, strict=True))
    wait_for_log(gateway, rf"enter grpc_close \d+ {expected['unimplemented']} 12\b")
    wait_for_log(gateway, rf"enter grpc_close \d+ {expected['unavailable']} 14\b")
    wait_for_log(gateway, rf"enter grpc_close \d+ {expected['deadline']} 4\b")
    wait_for_log(gateway, rf"enter grpc_close \d+ {expected['aborted']} 5\b")
    wait_for_log(gateway, r"conf grpc_close get_status status=0 out=5 out=no%20such%20thing")
    assert gateway.get("/")[0] == 200
    assert gateway.process.poll() is None


def test_cancel_stops_delivery(start_gateway: Start, upstream: str, grpc_server: int) -> None:
    steps = [f"request_headers grpc_call s:grpcsvc s:{SERVICE} s:Slow m: s:x 3000",
             "request_headers grpc_cancel $token", *RECEIVE_STEPS]
    gateway = start_gateway(grpc_doc(upstream, grpc_server) + conformance("g", steps))
    assert gateway.get("/")[0] == 200
    wait_for_log(gateway, "conf request_headers grpc_cancel status=0")
    time.sleep(2.0)  # past the server's answer
    logs = gateway.logs()
    assert "enter grpc_receive" not in logs and "enter grpc_close" not in logs
    assert gateway.get("/")[0] == 200


def test_stopping_a_plugin_cancels_its_open_streams(start_gateway: Start, upstream: str,
                                                    grpc_server: int) -> None:
    HELD_OPEN.clear()
    HELD_ENDED.clear()
    steps = [f"request_headers grpc_stream s:grpcsvc s:{SERVICE} s:Hold m:"]
    gateway = start_gateway(grpc_doc(upstream, grpc_server) + conformance("g", steps))
    assert gateway.get("/")[0] == 200
    assert HELD_OPEN.wait(10), "the stream never reached the server"
    assert not HELD_ENDED.is_set()
    # hot reload without the plugin: the old one is stopped, its stream cancelled
    config = gateway.config_path  # type: ignore[attr-defined]
    config.write_text(grpc_doc(upstream, grpc_server))
    assert HELD_ENDED.wait(20), "the plugin was replaced but its stream stayed open"
    assert gateway.get("/")[0] == 200
    assert "enter grpc_close" not in gateway.logs()  # nothing delivered to a stopped plugin


def test_service_argument_and_metadata_helpers() -> None:
    assert cluster_of(b"grpcsvc") == "grpcsvc"
    assert cluster_of(b"outbound|50051||grpc.local") == "outbound|50051||grpc.local"
    # envoy.config.core.v3.GrpcService{envoy_grpc{cluster_name: "grpcsvc", authority: "a"}}
    inner = b"\x0a\x07grpcsvc\x12\x01a"
    assert cluster_of(b"\x0a" + bytes([len(inner)]) + inner) == "grpcsvc"
    assert cluster_of(b"\x12\x02\x0a\x00") is None  # google_grpc: not supported
    assert cluster_of(b"\x0a\x09\x0a\x07grp") is None  # truncated proto
    assert cluster_of(b"\xff\xfe") is None and cluster_of(b"") is None
    assert outgoing_metadata([(b":path", b"/x"), (b"X-A", b"1"), (b"content-type", b"x"),
                              (b"k-bin", b"\x00\x01")]) == [("x-a", "1"), ("k-bin", b"\x00\x01")]
    assert esc(b"a b") == "a%20b"
