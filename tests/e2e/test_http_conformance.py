"""HTTP/1.1 conformance and request smuggling: the real gateway, raw sockets both sides.

Each test sends bytes a well-behaved client library would never send (or has a plugin, or a raw
upstream, produce what a well-behaved peer would never produce) and checks what reaches the
other side: never an ambiguous message, never a header line a plugin smuggled in with CR/LF.
The raw upstream frames what it receives with httptools (llhttp, strict), so "the upstream saw
two requests" is exactly what a strict server would see.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httptools
import pytest

from wasmgate.gateway.app import GatewayApp
from wasmgate.gateway.http1 import Framing

from .conftest import Gateway, free_port
from .test_gateway import conformance, gateway_doc

Start = Callable[..., Gateway]
TIMEOUT = 10


# -- a raw upstream ------------------------------------------------------------------------------
@dataclass
class Seen:
    """One request as a strict parser framed it on one upstream connection."""

    connection: int
    method: bytes
    url: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""


@dataclass
class _Framer:
    connection: int
    done: list[Seen]
    current: Seen | None = None
    url: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    parser: httptools.HttpRequestParser | None = None
    heads: list[Seen] = field(default_factory=list)

    def on_message_begin(self) -> None:
        self.url, self.headers, self.body = b"", [], b""

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        assert self.parser is not None
        self.heads.append(Seen(self.connection, self.parser.get_method(), self.url,
                               list(self.headers)))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        seen = self.heads[-1]
        seen.body = self.body
        self.done.append(seen)


class RawUpstream:
    """Answers each request with `respond(seen)` bytes; `early` answers as soon as a head is
    in, before any body. Records every head (`heads`) and complete request (`requests`)."""

    def __init__(self, respond: Callable[[Seen], bytes], early: bool = False) -> None:
        self.respond, self.early = respond, early
        self.requests: list[Seen] = []
        self.heads: list[Seen] = []
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(sock, self.connections),
                             daemon=True).start()

    def _serve(self, sock: socket.socket, number: int) -> None:
        framer = _Framer(number, self.requests)
        framer.heads = self.heads
        framer.parser = parser = httptools.HttpRequestParser(framer)
        answered = 0
        with sock:
            while True:
                try:
                    data = sock.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                try:
                    parser.feed_data(data)
                except httptools.HttpParserError:
                    return
                ready = [s for s in self.heads if s.connection == number] if self.early else [
                    s for s in self.requests if s.connection == number]
                for seen in ready[answered:]:
                    sock.sendall(self.respond(seen))
                    answered += 1

    def close(self) -> None:
        self.listener.close()


def ok(body: bytes = b"ok", extra: bytes = b"") -> Callable[[Seen], bytes]:
    return lambda seen: (b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n%s\r\n%s"
                         % (len(body), extra, body))


@pytest.fixture
def raw_upstream() -> Iterator[Callable[..., RawUpstream]]:
    made: list[RawUpstream] = []

    def make(respond: Callable[[Seen], bytes] | None = None, early: bool = False) -> RawUpstream:
        server = RawUpstream(respond or (lambda seen: ok(seen.url)(seen)), early)
        made.append(server)
        return server

    yield make
    for server in made:
        server.close()


# -- a raw client --------------------------------------------------------------------------------
@dataclass
class Response:
    status: int
    version: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    trailers: list[tuple[bytes, bytes]]

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)


class Client:
    """One raw connection: `send` bytes, `response()` reads exactly one response."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        self.buffer = b""

    def send(self, data: bytes) -> Client:
        self.sock.sendall(data)
        return self

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buffer += data
        return bool(data)

    def _line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            if not self._fill():
                raise EOFError(self.buffer)
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def _take(self, size: int) -> bytes:
        while len(self.buffer) < size:
            if not self._fill():
                raise EOFError(self.buffer)
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def response(self, head_request: bool = False) -> Response:
        version, status, *_ = self._line().split(b" ", 2)
        headers = []
        while line := self._line():
            name, _, value = line.partition(b":")
            headers.append((name.lower(), value.strip()))
        response = Response(int(status), version, headers, b"", [])
        length = response.header(b"content-length")
        if head_request or response.status in (204, 304) or response.status < 200:
            return response
        if response.header(b"transfer-encoding") == b"chunked":
            while size := int(self._line().split(b";")[0], 16):
                response.body += self._take(size)
                assert self._take(2) == b"\r\n"
            while line := self._line():
                name, _, value = line.partition(b":")
                response.trailers.append((name.lower(), value.strip()))
        elif length is not None:
            response.body = self._take(int(length))
        else:
            while self._fill():
                pass
            response.body, self.buffer = self.buffer, b""
        return response

    def closed(self) -> bool:
        """True once the gateway closes (anything it sent first is kept in the buffer)."""
        try:
            while self._fill():
                pass
        except ConnectionResetError:
            pass
        return True

    def rest(self) -> bytes:
        """Everything until the gateway closes."""
        self.closed()
        data, self.buffer = self.buffer, b""
        return data

    def close(self) -> None:
        self.sock.close()


def request(port: int, data: bytes, closes: bool = False) -> tuple[Response, bytes]:
    """One exchange on a fresh connection: the response and, when the gateway `closes` the
    connection after it, whatever followed it before the close."""
    client = Client(port).send(data)
    try:
        response = client.response()
        return response, client.rest() if closes else b""
    finally:
        client.close()


def wait_logged(gateway: Gateway, text: str) -> str:
    deadline = time.monotonic() + TIMEOUT
    while text not in (logs := gateway.logs()):
        assert time.monotonic() < deadline, logs[-3000:]
        time.sleep(0.05)
    return logs


def gateway_for(start: Start, upstream: str, *plugins: str) -> Gateway:
    return start(gateway_doc(upstream) + "".join(plugins))


def plugin(*steps: str) -> str:
    return conformance("edits", list(steps))


# -- headers plugins set: never serialized with CR/LF/NUL or a non-token name -------------------
@pytest.mark.parametrize(("step", "message"), [
    ("add_header_map_value 0 s:x-inj s:a%0d%0ax-smuggled:%201", b"invalid header value for: x-inj"),
    ("add_header_map_value 0 s:x-inj s:a%0ax-smuggled:%201", b"invalid header value for: x-inj"),
    ("add_header_map_value 0 s:x-inj s:a%00b", b"invalid header value for: x-inj"),
    ("add_header_map_value 0 s:x-inj%0d%0ax-smuggled s:1", b"invalid header name"),
    ("add_header_map_value 0 s:transfer-encoding%20 s:chunked", b"invalid header name"),
    ("add_header_map_value 0 s:x:y s:1", b"invalid header name: x:y"),
    ("replace_header_map_value 0 s::path s:/a%20HTTP/1.1%0d%0ax-smuggled:%201%0d%0a%0d%0aGET%20/b",
     b"invalid header value for: :path"),
    ("replace_header_map_value 0 s::path s:/a%20b", b"invalid header value for: :path"),
    ("replace_header_map_value 0 s::method s:GET%20/x", b"invalid header value for: :method"),
    ("replace_header_map_value 0 s::authority s:h%0d%0ax-smuggled:%201",
     b"invalid header value for: host"),
])
def test_malformed_request_head_from_a_plugin_is_not_forwarded(
        start_gateway: Start, raw_upstream: Callable[..., RawUpstream], step: str,
        message: bytes) -> None:
    upstream = raw_upstream()
    gateway = gateway_for(start_gateway, upstream.address, plugin(f"request_headers {step}"))
    response, _ = request(gateway.port, b"GET /x HTTP/1.1\r\nhost: h\r\n\r\n")
    assert response.status == 503  # Envoy's router, when the codec refuses a filter's headers
    assert message in response.body
    assert upstream.heads == []  # (the reply is made before anything could be written)


@pytest.mark.parametrize("step", [
    "add_header_map_value 2 s:x-inj s:a%0d%0aset-cookie:%20evil=1",
    "add_header_map_value 2 s:x-inj s:a%0d%0a%0d%0aHTTP/1.1%20200%20OK",
    "add_header_map_value 2 s:bad%20name s:1",
    "replace_header_map_value 2 s::status s:200%0d%0aset-cookie:%20evil=1",
    "replace_header_map_value 2 s::status s:100",
    "replace_header_map_value 2 s::status s:2000",
])
def test_malformed_response_head_from_a_plugin_becomes_a_502(
        start_gateway: Start, upstream: str, step: str) -> None:
    gateway = gateway_for(start_gateway, upstream, plugin(f"response_headers {step}"))
    client = Client(gateway.port).send(b"GET /x HTTP/1.1\r\nhost: h\r\n\r\n")
    response = client.response()
    assert response.status == 502
    assert response.header(b"set-cookie") is None
    assert response.header(b"connection") == b"close"
    assert client.rest() == b""  # nothing after it: no second, smuggled response
    client.close()


def test_a_local_reply_with_an_lf_inside_a_header_name_becomes_a_502(
        start_gateway: Start, upstream: str) -> None:
    """A local reply's headers are checked by the runtime's cheap test (no map was written):
    an LF inside a name must be caught by it too (a review found it was not)."""
    gateway = gateway_for(start_gateway, upstream, plugin(
        "request_headers send_local_response 200 null s:ok m:x-a%0aset-cookie=evil -1"))
    client = Client(gateway.port).send(b"GET /x HTTP/1.1\r\nhost: h\r\n\r\n")
    response = client.response()
    assert response.status == 502 and response.header(b"set-cookie") is None
    assert client.rest() == b""
    client.close()


def test_a_slow_upstream_holding_back_the_body_is_not_a_stalled_client(
        tmp_path: Path) -> None:
    """The gateway stops reading a client whose body the upstream reads slowly: that pause is
    the gateway's, and the request timeout must not take the client for stalled."""
    body = 32 << 20
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def slow_upstream() -> None:
        conn, _ = listener.accept()
        data = b""
        while b"\r\n\r\n" not in data:
            data += conn.recv(65536)
        time.sleep(2)  # not reading: the gateway's buffer fills and it pauses the client
        got = len(data.split(b"\r\n\r\n", 1)[1])
        while got < body and (chunk := conn.recv(1 << 20)):
            got += len(chunk)
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        conn.close()

    def client(port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"POST /up HTTP/1.1\r\nhost: h\r\ncontent-length: %d\r\n\r\n" % body)
            sock.sendall(b"x" * body)
            data = b""
            while b"\r\n\r\n" not in data and (chunk := sock.recv(65536)):
                data += chunk
            return data

    threading.Thread(target=slow_upstream, daemon=True).start()
    listen = free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(gateway_doc(
        f"127.0.0.1:{listener.getsockname()[1]}",
        extra=f"  listen: 127.0.0.1:{listen}\n  admin: 127.0.0.1:0\n"
              "  requestHeadersTimeoutMs: 500\n"))

    async def main() -> bytes:
        app = GatewayApp([config], drain_seconds=0.2, reload_interval=0)
        await app.start()
        try:
            return await asyncio.to_thread(client, listen)
        finally:
            await app.stop()

    try:
        assert asyncio.run(main()).startswith(b"HTTP/1.1 200")
    finally:
        listener.close()


def test_http_call_with_a_malformed_head_gets_envoys_503(
        start_gateway: Start, raw_upstream: Callable[..., RawUpstream]) -> None:
    upstream = raw_upstream()
    steps = [f"request_headers http_call s:{upstream.address} "
             "m::path=/call&:method=GET&:authority=echo&x-inj=a%0d%0ax-smuggled:%201 s: null 2000",
             "http_call_response get_buffer_bytes 4 0 200"]
    gateway = gateway_for(start_gateway, upstream.address, plugin(*steps))
    response, _ = request(gateway.port, b"GET /x HTTP/1.1\r\nhost: h\r\n\r\n")
    assert response.status == 200
    logs = wait_logged(gateway, "conf http_call_response get_buffer_bytes")
    assert "invalid%20header%20value%20for:%20x-inj" in logs
    assert [s.url for s in upstream.heads] == [b"/x"]  # the call itself never went out


def test_plugin_trailers_with_crlf_are_dropped(
        start_gateway: Start, raw_upstream: Callable[..., RawUpstream]) -> None:
    upstream = raw_upstream(lambda seen: b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
                                         b"2\r\nhi\r\n0\r\nx-up: 1\r\n\r\n")
    gateway = gateway_for(start_gateway, upstream.address, plugin(
        "response_trailers add_header_map_value 3 s:x-inj s:a%0d%0ax-smuggled:%201",
        "response_trailers add_header_map_value 3 s:x-fine s:2"))
    client = Client(gateway.port).send(b"GET /t HTTP/1.1\r\nhost: h\r\n\r\n")
    response = client.response()
    assert (response.status, response.body) == (200, b"hi")
    assert dict(response.trailers) == {b"x-up": b"1", b"x-fine": b"2"}
    client.send(b"GET /again HTTP/1.1\r\nhost: h\r\n\r\n")
    assert client.response().status == 200  # the connection is still in step
    client.close()
    # the serializer itself, for a trailer no wire trailer can carry (a NUL, a bad name)
    tail = Framing(True, None).encode(b"", True, [(b"x-a", b"1\x00"), (b"b c", b"2"),
                                                  (b"x-ok", b"3")])
    assert tail == b"0\r\nx-ok: 3\r\n\r\n"


# -- request framing -------------------------------------------------------------------------
@pytest.mark.parametrize(("head", "status"), [
    (b"content-length: 5\r\ntransfer-encoding: chunked\r\n", 400),
    (b"transfer-encoding: chunked\r\ncontent-length: 5\r\n", 400),
    (b"content-length: 5\r\ncontent-length: 6\r\n", 400),
    (b"content-length: 5\r\ncontent-length: 5\r\n", 400),
    (b"content-length: 5, 5\r\n", 400),
    (b"content-length: +5\r\n", 400),
    (b"transfer-encoding: gzip, chunked\r\n", 501),
    (b"transfer-encoding: chunked, identity\r\n", 400),
    (b"transfer-encoding: xchunked\r\n", 501),
    (b"transfer-encoding: identity\r\n", 501),
    (b"transfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n", 400),
    (b"x-folded: a\r\n b\r\n", 400),
    (b"x-no-colon\r\n", 400),
    (b"x-space : 1\r\n", 400),
    (b"x-nul: a\x00b\r\n", 400),
    (b"x-ctl: a\x01b\r\n", 400),
])
def test_ambiguous_request_framing_is_refused(
        start_gateway: Start, raw_upstream: Callable[..., RawUpstream], head: bytes,
        status: int) -> None:
    upstream = raw_upstream()
    gateway = gateway_for(start_gateway, upstream.address)
    data = b"POST /a HTTP/1.1\r\nhost: h\r\n" + head + b"\r\n5\r\nhello\r\n0\r\n\r\n"
    smuggled = b"GET /smuggled HTTP/1.1\r\nhost: h\r\n\r\n"
    response, rest = request(gateway.port, data + smuggled, closes=True)
    assert response.status == status
    assert response.header(b"connection") == b"close"
    assert rest == b""
    assert upstream.heads == []


@pytest.mark.parametrize("chunk", [b"zz\r\nhello\r\n", b"0x5\r\nhello\r\n", b"5 \r\nhello\r\n",
                                   b"fffffffffffffffffff\r\nhello\r\n", b"5;a\nb\r\nhello\r\n",
                                   b"5\nhello\n", b"5\r\nhelloXX"])
def test_invalid_chunks_are_refused(start_gateway: Start,
                                    raw_upstream: Callable[..., RawUpstream], chunk: bytes) -> None:
    upstream = raw_upstream()
    gateway = gateway_for(start_gateway, upstream.address)
    data = b"POST /c HTTP/1.1\r\nhost: h\r\ntransfer-encoding: chunked\r\n\r\n" + chunk
    response, _ = request(gateway.port, data + b"0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n")
    assert response.status == 400
    assert upstream.requests == []  # at most a head and part of a body went, then a reset
    assert all(s.url != b"/smuggled" for s in upstream.heads)


def test_chunk_extensions_are_accepted(start_gateway: Start,
                                       raw_upstream: Callable[..., RawUpstream]) -> None:
    upstream = raw_upstream()
    gateway = gateway_for(start_gateway, upstream.address)
    response, _ = request(gateway.port, b"POST /c HTTP/1.1\r\nhost: h\r\nconnection: close\r\n"
                          b"transfer-encoding: chunked\r\n\r\n5;name=value\r\nhello\r\n0\r\n\r\n")
    assert response.status == 200
    assert [s.body for s in upstream.requests] == [b"hello"]


def test_plugin_content_length_cannot_smuggle_a_request(
        start_gateway: Start, raw_upstream: Callable[..., RawUpstream]) -> None:
    """A plugin that sets content-length: 0 on a request whose body is another request: the
    body is not written past the announced length (it would be a second request)."""
    upstream = raw_upstream()
    gateway = gateway_for(start_gateway, upstream.address, plugin(
        "request_headers replace_header_map_value 0 s:content-length s:0"))
    smuggled = b"GET /smuggled HTTP/1.1\r\nhost: h\r\n\r\n"
    response, _ = request(gateway.port, b"POST /p HTTP/1.1\r\nhost: h\r\nconnection: close\r\n"
                          b"content-length: %d\r\n\r\n%s" % (len(smuggled), smuggled))
    assert response.status == 200
    assert [s.url for s in upstream.heads] == [b"/p"]


def test_plugin_short_response_length_never_lets_the_rest_through(
        start_gateway: Start, upstream: str) -> None:
    gateway = gateway_for(start_gateway, upstream, plugin(
        "response_headers replace_header_map_value 2 s:content-length s:2"))
    client = Client(gateway.port).send(b"GET /long/path HTTP/1.1\r\nhost: h\r\n\r\n")
    response = client.response()
    assert response.status == 200 and len(response.body) == 2
    assert client.rest() == b""  # the excess never reaches the client; the connection closes
    client.close()


# -- connections, versions, methods ------------------------------------------------------------
def test_http10_without_and_with_keep_alive(start_gateway: Start, upstream: str) -> None:
    gateway = gateway_for(start_gateway, upstream)
    response, rest = request(gateway.port, b"GET /old HTTP/1.0\r\n\r\n", closes=True)
    assert (response.status, response.version) == (200, b"HTTP/1.0")
    assert response.header(b"connection") == b"close" and rest == b""
    client = Client(gateway.port)
    for path in (b"/ka1", b"/ka2"):
        client.send(b"GET %s HTTP/1.0\r\nconnection: keep-alive\r\nhost: h\r\n\r\n" % path)
        response = client.response()
        assert response.header(b"connection") == b"keep-alive"
        assert json.loads(response.body)["path"] == path.decode()
    client.close()


def test_connection_close_is_honoured_and_what_follows_ignored(
        start_gateway: Start, raw_upstream: Callable[..., RawUpstream]) -> None:
    upstream = raw_upstream()
    gateway = gateway_for(start_gateway, upstream.address)
    response, rest = request(gateway.port, b"GET /a HTTP/1.1\r\nhost: h\r\nconnection: close\r\n"
                             b"\r\nGET /b HTTP/1.1\r\nhost: h\r\n\r\n", closes=True)
    assert response.status == 200 and response.body == b"/a"
    assert response.header(b"connection") == b"close"
    assert rest == b""
    assert [s.url for s in upstream.heads] == [b"/a"]


def test_expect_100_continue(start_gateway: Start, upstream: str) -> None:
    gateway = gateway_for(start_gateway, upstream)
    client = Client(gateway.port).send(b"POST /e HTTP/1.1\r\nhost: h\r\ncontent-length: 5\r\n"
                                       b"expect: 100-Continue\r\n\r\n")
    interim = client.response()
    assert interim.status == 100
    client.send(b"hello")
    response = client.response()
    echo = json.loads(response.body)
    assert (response.status, echo["body"]) == (200, "hello")
    assert all(k != "expect" for k, _ in echo["headers"])  # answered here, as Envoy does
    client.close()


def test_upstream_interim_responses_are_dropped(
        start_gateway: Start, raw_upstream: Callable[..., RawUpstream]) -> None:
    upstream = raw_upstream(lambda seen: b"HTTP/1.1 100 Continue\r\n\r\n"
                                         b"HTTP/1.1 103 Early Hints\r\nlink: </s.css>\r\n\r\n"
                                         + ok(seen.url)(seen))
    gateway = gateway_for(start_gateway, upstream.address)
    client = Client(gateway.port)
    for path in (b"/one", b"/two", b"/three"):  # each answer belongs to its request
        response = client.send(b"GET %s HTTP/1.1\r\nhost: h\r\n\r\n" % path).response()
        assert (response.status, response.body) == (200, path)
    client.close()


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\nhello",
    b"HTTP/1.1 204 No Content\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nsmuggled",
    b"HTTP/1.1 304 Not Modified\r\ncontent-length: 5\r\n\r\nhello",
])
def test_bodies_after_204_and_304_never_reach_a_later_request(
        start_gateway: Start, raw_upstream: Callable[..., RawUpstream], answer: bytes) -> None:
    upstream = raw_upstream(lambda seen: answer if seen.url == b"/nobody" else ok(seen.url)(seen))
    gateway = gateway_for(start_gateway, upstream.address)
    client = Client(gateway.port)
    first = client.send(b"GET /nobody HTTP/1.1\r\nhost: h\r\n\r\n").response()
    assert first.status in (204, 304) and first.body == b""
    if first.status == 204:
        assert first.header(b"content-length") is None  # RFC 9110 8.6
    else:
        assert first.header(b"content-length") == b"5"
    for path in (b"/next", b"/after"):
        response = client.send(b"GET %s HTTP/1.1\r\nhost: h\r\n\r\n" % path).response()
        assert (response.status, response.body) == (200, path)
    client.close()


def test_local_204_with_a_body_writes_no_body(start_gateway: Start, upstream: str) -> None:
    gateway = gateway_for(start_gateway, upstream, plugin(
        "request_headers send_local_response 204 null s:not-a-body null -1"))
    client = Client(gateway.port)
    for _ in range(2):
        response = client.send(b"GET /x HTTP/1.1\r\nhost: h\r\n\r\n").response()
        assert response.status == 204 and response.header(b"content-length") is None
    client.send(b"GET /x HTTP/1.1\r\nhost: h\r\nconnection: close\r\n\r\n")
    assert client.response().status == 204
    assert client.rest() == b""  # no stray "not-a-body" anywhere on the connection
    client.close()


def test_head_keeps_content_length_and_sends_no_body(start_gateway: Start, upstream: str) -> None:
    gateway = gateway_for(start_gateway, upstream)
    client = Client(gateway.port).send(b"HEAD /h HTTP/1.1\r\nhost: h\r\n\r\n")
    response = client.response(head_request=True)
    assert response.status == 200 and int(response.header(b"content-length") or 0) > 0
    response = client.send(b"GET /g HTTP/1.1\r\nhost: h\r\n\r\n").response()
    assert json.loads(response.body)["path"] == "/g"
    client.close()


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\nabc",
    b"HTTP/1.1 200 OK\r\nx-a: 1\r\n b\r\ncontent-length: 0\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\nconnection: upgrade\r\n\r\n",
])
def test_ambiguous_upstream_responses_are_502(
        start_gateway: Start, raw_upstream: Callable[..., RawUpstream], answer: bytes) -> None:
    upstream = raw_upstream(lambda seen: answer)
    gateway = gateway_for(start_gateway, upstream.address)
    response, _ = request(gateway.port, b"GET /x HTTP/1.1\r\nhost: h\r\n\r\n")
    assert response.status == 502


def test_an_early_upstream_answer_does_not_get_its_connection_reused(
        start_gateway: Start, raw_upstream: Callable[..., RawUpstream]) -> None:
    upstream = raw_upstream(lambda seen: ok(seen.url)(seen), early=True)
    gateway = gateway_for(start_gateway, upstream.address)
    client = Client(gateway.port).send(b"POST /early HTTP/1.1\r\nhost: h\r\n"
                                       b"content-length: 10\r\n\r\nhello")
    assert client.response().body == b"/early"  # answered before the body was all sent
    # (a POST: a GET would hide a reuse, being retried on a fresh connection)
    client.send(b"world" + b"POST /next HTTP/1.1\r\nhost: h\r\ncontent-length: 2\r\n\r\nhi")
    assert client.response().body == b"/next"
    client.close()
    next_head = next(s for s in upstream.heads if s.url == b"/next")
    assert next_head.connection != upstream.heads[0].connection  # not eaten as body


def test_absolute_form_target_becomes_path_and_authority(start_gateway: Start,
                                                        upstream: str) -> None:
    gateway = gateway_for(start_gateway, upstream)
    response, _ = request(gateway.port, b"GET http://other.example:8080/abs?q=1 HTTP/1.1\r\n"
                          b"host: ignored\r\nconnection: close\r\n\r\n")
    echo = json.loads(response.body)
    assert echo["path"] == "/abs?q=1"
    assert dict(echo["headers"])["host"] == "other.example:8080"


@pytest.mark.parametrize(("data", "status"), [
    (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host in HTTP/1.1
    (b"GET / HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n", 400),
    (b"GET example.com HTTP/1.1\r\nhost: h\r\n\r\n", 400),
    (b"GET ftp://h/x HTTP/1.1\r\nhost: h\r\n\r\n", 400),
    (b"CONNECT evil.example:443 HTTP/1.1\r\nhost: evil.example:443\r\n\r\n", 501),
    (b"GET /ws HTTP/1.1\r\nhost: h\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n", 501),
    (b"GET / HTTP/2.0\r\nhost: h\r\n\r\n", 505),
    (b"GET /\r\n\r\n", 505),  # HTTP/0.9
    (b"GET / HTTP/1.2\r\nhost: h\r\n\r\n", 400),
])
def test_requests_that_are_not_forwarded(
        start_gateway: Start, raw_upstream: Callable[..., RawUpstream], data: bytes,
        status: int) -> None:
    upstream = raw_upstream()
    gateway = gateway_for(start_gateway, upstream.address)
    response, rest = request(gateway.port, data, closes=True)
    assert (response.status, rest) == (status, b"")
    assert upstream.heads == []


def test_http10_without_host_is_served(start_gateway: Start, upstream: str) -> None:
    gateway = gateway_for(start_gateway, upstream)
    response, _ = request(gateway.port, b"GET /old HTTP/1.0\r\n\r\n")
    assert response.status == 200


def test_an_error_after_pipelined_requests_is_answered_in_order(
        start_gateway: Start, raw_upstream: Callable[..., RawUpstream]) -> None:
    upstream = raw_upstream()
    gateway = gateway_for(start_gateway, upstream.address)
    client = Client(gateway.port).send(b"GET /a HTTP/1.1\r\nhost: h\r\n\r\n"
                                       b"GET /b HTTP/1.1\r\nhost: h\r\n\r\nBROKEN\r\n\r\n")
    assert client.response().body == b"/a"
    assert client.response().body == b"/b"
    assert client.response().status == 400
    assert client.rest() == b""
    client.close()


# -- limits and timeouts -------------------------------------------------------------------------
@pytest.mark.parametrize(("extra", "status"), [
    (b"x-big: " + b"a" * (50 * 1024) + b"\r\n", 200),
    (b"x-big: " + b"a" * (70 * 1024) + b"\r\n", 431),  # Envoy: 60 KiB by default
    (b"".join(b"x-h%d: 1\r\n" % i for i in range(98)), 200),  # with host, connection: 100
    (b"".join(b"x-h%d: 1\r\n" % i for i in range(99)), 431),  # Envoy: 100 headers at most
])
def test_request_head_limits(start_gateway: Start, raw_upstream: Callable[..., RawUpstream],
                             extra: bytes, status: int) -> None:
    gateway = gateway_for(start_gateway, raw_upstream().address)
    response, _ = request(gateway.port, b"GET /big HTTP/1.1\r\nhost: h\r\n" + extra
                          + b"connection: close\r\n\r\n")
    assert response.status == status


def test_a_never_ending_head_is_bounded(start_gateway: Start, upstream: str) -> None:
    gateway = gateway_for(start_gateway, upstream)
    client = Client(gateway.port).send(b"GET / HTTP/1.1\r\nhost: h\r\n")
    with pytest.raises((OSError, EOFError)):  # refused (431, close) while sending, or reset
        for _ in range(64):
            client.send(b"x-more: " + b"a" * 8000 + b"\r\n")
        if client.response().status == 431:
            raise ConnectionResetError
    client.close()


def test_incomplete_head_times_out_and_idle_connections_close(start_gateway: Start,
                                                               upstream: str) -> None:
    gateway = start_gateway(gateway_doc(upstream, extra="  requestHeadersTimeoutMs: 300\n"
                                                        "  idleTimeoutMs: 600\n"))
    slow = Client(gateway.port).send(b"GET / HTTP/1.1\r\nhost: h\r\nx-slow")
    response = slow.response()
    assert response.status == 408 and slow.rest() == b""
    idle = Client(gateway.port)
    assert idle.send(b"GET /once HTTP/1.1\r\nhost: h\r\n\r\n").response().status == 200
    assert idle.rest() == b""  # closed once idle, with nothing written
    # a request body that stops arriving: 408 and close (the exchange and its upstream
    # connection are abandoned, not held until the client goes away)
    stalled = Client(gateway.port).send(b"POST /upload HTTP/1.1\r\nhost: h\r\n"
                                        b"content-length: 10\r\n\r\nabc")
    assert stalled.response().status == 408 and stalled.rest() == b""
    slow.close()
    idle.close()
    stalled.close()
