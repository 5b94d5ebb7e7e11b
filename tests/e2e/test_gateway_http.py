"""HTTP behaviour of the gateway: bodies both ways, re-framing, keep-alive, shutdown, workers."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import threading
import time
from collections.abc import Callable

import pytest

from .conftest import Gateway
from .test_gateway import conformance, example, gateway_doc

Start = Callable[..., Gateway]


def test_large_request_and_response_bodies_stream_through(start_gateway: Start,
                                                         upstream: str) -> None:
    gateway = start_gateway(gateway_doc(upstream) + example())
    body = b"x" * (5 << 20)  # larger than the 1 MiB buffer limit: streamed, not buffered
    status, _, data = gateway.request("POST", "/upload", body=body,
                                      headers={"content-type": "application/octet-stream"})
    assert status == 200
    echo = json.loads(data)
    assert len(echo["body"]) == len(body)


def test_chunked_request_is_forwarded(start_gateway: Start, upstream: str) -> None:
    gateway = start_gateway(gateway_doc(upstream) + example())
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    conn.putrequest("POST", "/chunked")
    conn.putheader("transfer-encoding", "chunked")
    conn.endheaders()
    for part in (b"hello ", b"chunked ", b"world"):
        conn.send(b"%x\r\n%s\r\n" % (len(part), part))
    conn.send(b"0\r\n\r\n")
    response = conn.getresponse()
    assert response.status == 200
    assert json.loads(response.read())["body"] == "hello chunked world"
    conn.close()


def test_plugin_body_rewrites_both_ways(start_gateway: Start, upstream: str) -> None:
    """A plugin that rewrites bodies removes content-length (as Envoy requires); the gateway
    then frames the rewritten bodies with chunked encoding."""
    steps = ["request_headers remove_header_map_value 0 s:content-length",
             "request_body set_buffer_bytes 0 0 0x7fffffff s:REWRITTEN-BY-WASM",
             "response_headers remove_header_map_value 2 s:content-length",
             "response_body set_buffer_bytes 1 0 0x7fffffff s:short"]
    gateway = start_gateway(gateway_doc(upstream) + conformance("rewriter", steps))
    status, headers, data = gateway.request("POST", "/rewrite", body=b"original body",
                                            headers={"content-type": "text/plain"})
    assert status == 200
    assert data == b"short"
    assert headers.get("transfer-encoding") == "chunked"


def test_buffering_plugin_past_the_limit_gets_413(start_gateway: Start, upstream: str) -> None:
    config = gateway_doc(upstream).replace("  labels:", "  bodyBufferLimitBytes: 1000\n  labels:")
    gateway = start_gateway(config + conformance("buffers", ["request_body return 1"]))
    status, _, _ = gateway.request("POST", "/big", body=b"y" * 5000)
    assert status == 413


def test_keep_alive_reuses_the_connection(start_gateway: Start, upstream: str) -> None:
    gateway = start_gateway(gateway_doc(upstream) + example())
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    for i in range(20):
        conn.request("GET", f"/ka/{i}")
        response = conn.getresponse()
        assert response.status == 200
        assert json.loads(response.read())["path"] == f"/ka/{i}"
    conn.close()


def _read_responses(sock: socket.socket, count: int) -> list[bytes]:
    data, bodies = b"", []
    deadline = time.monotonic() + 10
    while len(bodies) < count and time.monotonic() < deadline:
        data += sock.recv(65536)
        while b"\r\n\r\n" in data:
            head, rest = data.split(b"\r\n\r\n", 1)
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            if len(rest) < length:
                break
            bodies.append(rest[:length])
            data = rest[length:]
    return bodies


def test_pipelined_requests_are_answered_in_order(start_gateway: Start, upstream: str) -> None:
    gateway = start_gateway(gateway_doc(upstream) + example())
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
        sock.sendall(b"".join(b"GET /p%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(3)))
        bodies = _read_responses(sock, 3)
    assert [json.loads(b)["path"] for b in bodies] == ["/p0", "/p1", "/p2"]


def test_request_id_and_forwarded_for(start_gateway: Start, upstream: str) -> None:
    gateway = start_gateway(gateway_doc(upstream) + example())
    echo = json.loads(gateway.get("/ids", headers={"x-forwarded-for": "10.0.0.9"})[2])
    headers = dict(echo["headers"])
    assert headers["x-forwarded-for"] == "10.0.0.9, 127.0.0.1"
    assert len(headers["x-request-id"]) == 36
    echo = json.loads(gateway.get("/ids", headers={"x-request-id": "mine"})[2])
    assert dict(echo["headers"])["x-request-id"] == "mine"
    # two x-forwarded-for lines are one list, the client appended to it
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    conn.putrequest("GET", "/ids")
    conn.putheader("x-forwarded-for", "10.0.0.1")
    conn.putheader("x-forwarded-for", "10.0.0.2")
    conn.endheaders()
    echo = json.loads(conn.getresponse().read())
    conn.close()
    assert [v for k, v in echo["headers"] if k == "x-forwarded-for"] == [
        "10.0.0.1, 10.0.0.2, 127.0.0.1"]


def test_graceful_shutdown_finishes_in_flight_requests(start_gateway: Start,
                                                      upstream: str) -> None:
    gateway = start_gateway(gateway_doc(upstream).replace("timeoutMs: 1000", "timeoutMs: 5000")
                            + example())
    result: list[int] = []
    slow = threading.Thread(target=lambda: result.append(gateway.get("/slow")[0]))
    slow.start()
    time.sleep(0.5)
    gateway.process.send_signal(signal.SIGTERM)
    slow.join(10)
    assert result == [200]
    assert gateway.process.wait(10) == 0
    with pytest.raises(OSError):
        gateway.get("/after")


def test_workers_share_the_port(start_gateway: Start, upstream: str) -> None:
    gateway = start_gateway(gateway_doc(upstream) + example(), "--workers", "2")
    deadline = time.monotonic() + 30  # /ready is worker 0's; wait for worker 1's plugin too
    while gateway.logs().count("plugin default.example ready") < 2:
        assert time.monotonic() < deadline, gateway.logs()
        time.sleep(0.1)
    statuses = [gateway.get(f"/w{i}")[0] for i in range(20)]
    assert statuses == [200] * 20


def test_head_requests(start_gateway: Start, upstream: str) -> None:
    gateway = start_gateway(gateway_doc(upstream) + example())
    for _ in range(3):
        status, headers, body = gateway.request("HEAD", "/head")
        assert status == 200 and body == b""
        assert int(headers["content-length"]) > 0
    assert gateway.get("/after-head")[0] == 200


def test_upstream_closing_idle_connections_is_retried(start_gateway: Start) -> None:
    """An upstream that closes every connection after one response (without saying so):
    the pooled connection is stale on the next request, which is retried, not failed."""
    import socketserver

    class OneShot(socketserver.BaseRequestHandler):
        """Answers the first request of a connection; drops the connection at the second."""

        def handle(self) -> None:
            self.request.recv(65536)
            self.request.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            self.request.recv(65536)  # the next request on this kept-alive connection
            self.request.close()

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), OneShot)
    server.daemon_threads = True  # a handler may still block in recv on a pooled connection
    server.block_on_close = False
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        gateway = start_gateway(gateway_doc(f"127.0.0.1:{server.server_address[1]}"))
        results = []
        for _ in range(5):
            results.append(gateway.get("/")[0])
        assert results == [200] * 5
        deadline = time.monotonic() + 10  # the access log's lines are flushed within 1 s
        while (logs := gateway.logs()).count('"GET / HTTP/1.1" 200 ') < 5:
            assert time.monotonic() < deadline, logs
            time.sleep(0.05)
        assert "upstream_reset" not in logs
    finally:
        server.shutdown()
        server.server_close()


def test_close_delimited_upstream_response(start_gateway: Start) -> None:
    import socketserver

    class CloseDelimited(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.recv(65536)
            self.request.sendall(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil close")

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), CloseDelimited)
    server.daemon_threads = True
    server.block_on_close = False
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        gateway = start_gateway(gateway_doc(f"127.0.0.1:{server.server_address[1]}"))
        status, _, body = gateway.get("/")
        assert (status, body) == (200, b"until close")
    finally:
        server.shutdown()
        server.server_close()


def test_without_plugins_bodies_and_framing(start_gateway: Start, upstream: str) -> None:
    """The no-plugin fast path: length-framed and chunked bodies, hop-by-hop headers dropped."""
    gateway = start_gateway(gateway_doc(upstream))
    status, _, data = gateway.request("POST", "/plain", body=b"x" * 70000,
                                      headers={"connection": "keep-alive", "te": "trailers"})
    echo = json.loads(data)
    assert status == 200 and len(echo["body"]) == 70000
    names = [k for k, _ in echo["headers"]]
    assert "te" not in names and "connection" not in names
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
    conn.putrequest("POST", "/chunked-plain")
    conn.putheader("transfer-encoding", "chunked")
    conn.endheaders()
    conn.send(b"5\r\nhello\r\n0\r\n\r\n")
    response = conn.getresponse()
    assert json.loads(response.read())["body"] == "hello"
    conn.close()
    status, _, data = gateway.get("/get-plain", headers={"connection": "x-drop, keep-alive",
                                                         "x-drop": "secret"})
    assert status == 200
    assert "x-drop" not in [k for k, _ in json.loads(data)["headers"]]
