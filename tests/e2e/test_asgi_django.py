"""The ASGI middleware in front of a real Django project: `get_asgi_application()` wrapped by
`WasmPluginMiddleware`, driven through httpx's ASGI transport and under a real uvicorn server.

Django's settings are process-global. The module fixture configures a minimal base once per
process (guarded: a process that configured Django already keeps its settings) and lays this
module's own settings (ROOT_URLCONF pointing here, ALLOWED_HOSTS, MIDDLEWARE...) over them with
`override_settings` for the duration of the module only; LOGGING_CONFIG is None so Django does
not touch the logging configuration of the process. No database is used."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Iterator
from dataclasses import dataclass, field
from typing import Any

import django
import httpx
import pytest
import uvicorn
from django.conf import settings
from django.core.asgi import get_asgi_application
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.shortcuts import redirect
from django.test.utils import override_settings
from django.urls import path, re_path

from wasmgate.asgi import PluginSpec, WasmPluginMiddleware

from .conftest import free_port
from .test_asgi import EXAMPLE_SPEC, conformance, served

# -- the Django project -------------------------------------------------------------------------

HOSTS = ["testserver", "127.0.0.1", "localhost"]


@dataclass
class Seen:
    """What the views saw, reset for every test."""

    calls: list[str] = field(default_factory=list)
    gate: asyncio.Event | None = None  # /stream/ waits on it after its first part
    stream_ended: asyncio.Event | None = None  # set when /stream/'s iterator is closed
    stream_parts: int = 0

    def reset(self) -> None:
        self.calls = []
        self.gate = self.stream_ended = None
        self.stream_parts = 0


SEEN = Seen()


def _echo(request: HttpRequest, kind: str) -> JsonResponse:
    SEEN.calls.append(request.path)
    body = request.body
    response = JsonResponse({
        "view": kind, "method": request.method, "path": request.path,
        "path_info": request.path_info, "script_name": request.META.get("SCRIPT_NAME"),
        "query": request.META["QUERY_STRING"], "get": dict(request.GET.items()),
        "headers": {k.lower(): v for k, v in request.headers.items()},
        "meta_example": request.META.get("HTTP_X_WASM_EXAMPLE"),
        "content_length": request.META.get("CONTENT_LENGTH"),
        "host": request.get_host(), "body": body.decode("utf-8", "replace"),
        "body_length": len(body)})
    response["X-App"] = "django"
    response.set_cookie("session", "abc")
    return response


def echo(request: HttpRequest) -> JsonResponse:  # a sync view: Django runs it in a thread
    return _echo(request, "sync")


async def async_echo(request: HttpRequest) -> JsonResponse:
    return _echo(request, "async")


def boom(request: HttpRequest) -> HttpResponse:
    SEEN.calls.append(request.path)
    raise RuntimeError("the view broke")


def go(request: HttpRequest) -> HttpResponse:
    SEEN.calls.append(request.path)
    return redirect("/echo/target")


async def stream(request: HttpRequest) -> StreamingHttpResponse:
    SEEN.calls.append(request.path)
    count = int(request.GET.get("n", "3"))
    gate, ended = SEEN.gate, SEEN.stream_ended

    async def parts() -> AsyncIterator[bytes]:
        try:
            for i in range(count):
                SEEN.stream_parts += 1
                yield f"part{i};".encode()
                if i == 0 and gate is not None:
                    await gate.wait()
                await asyncio.sleep(0)  # let the event loop breathe between parts
        finally:
            if ended is not None:
                ended.set()

    return StreamingHttpResponse(parts(), content_type="text/plain")


urlpatterns = [
    re_path(r"^echo/", echo),
    re_path(r"^async/", async_echo),
    path("deny/me/", echo),  # the example plugin answers /deny... itself
    path("boom/", boom),
    path("go/", go),
    path("slash/", echo),  # /slash is redirected here by CommonMiddleware (APPEND_SLASH)
    path("stream/", stream),
]

# What the process gets if nobody configured Django before: nothing that points at this module.
BASE_SETTINGS: dict[str, Any] = {
    "SECRET_KEY": "wasmgate-tests", "DEBUG": False, "INSTALLED_APPS": [], "DATABASES": {},
    "LOGGING_CONFIG": None, "USE_TZ": True}
# This module's own, undone at its teardown.
MODULE_SETTINGS: dict[str, Any] = {
    "ROOT_URLCONF": __name__, "ALLOWED_HOSTS": HOSTS, "DEBUG": False, "APPEND_SLASH": True,
    "FORCE_SCRIPT_NAME": None,
    "MIDDLEWARE": ["django.middleware.common.CommonMiddleware"]}


@pytest.fixture(scope="module", autouse=True)
def django_settings() -> Iterator[None]:
    if not settings.configured:
        settings.configure(**BASE_SETTINGS)
    django.setup(set_prefix=False)
    with override_settings(**MODULE_SETTINGS):
        yield


@pytest.fixture(autouse=True)
def seen() -> Iterator[Seen]:
    SEEN.reset()
    yield SEEN
    SEEN.reset()


def django_app(*plugins: PluginSpec) -> WasmPluginMiddleware:
    return WasmPluginMiddleware(get_asgi_application(), plugins=list(plugins))


# -- plugins and drivers ------------------------------------------------------------------------

async def request(app: Any, method: str, target: str, root_path: str = "",
                  **kwargs: Any) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, root_path=root_path)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        return await client.request(method, target, **kwargs)


@contextlib.asynccontextmanager
async def uvicorn_serving(app: Any, **config: Any) -> AsyncIterator[httpx.AsyncClient]:
    """`app` under a real uvicorn server on 127.0.0.1 (lifespan on), and a client for it."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, lifespan="on",
                                           log_level="warning", **config))
    task = asyncio.create_task(server.serve())
    try:
        while not server.started and not task.done():
            await asyncio.sleep(0.02)
        assert server.started
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            yield client
    finally:
        server.should_exit = True
        await task


async def bounded(awaitable: Awaitable[Any]) -> Any:
    """A guard against hanging forever, not a timing assertion."""
    return await asyncio.wait_for(awaitable, 30)


# -- request side -------------------------------------------------------------------------------


def test_request_header_mutation_reaches_the_django_view(seen: Seen) -> None:
    app = django_app(EXAMPLE_SPEC)

    async def body() -> None:
        response = await request(app, "GET", "/echo/hello?x=1", headers={"X-Custom": "Yes"})
        assert response.status_code == 200
        assert response.headers["x-wasm-greeting"] == "hello from wasm"
        assert response.headers["x-app"] == "django"
        echo = response.json()
        assert echo["headers"]["x-wasm-example"] == "seen"  # request.headers
        assert echo["meta_example"] == "seen"  # request.META["HTTP_X_WASM_EXAMPLE"]
        assert echo["headers"]["x-custom"] == "Yes"
        assert echo["headers"]["x-request-id"]  # added, as the gateway does
        assert echo["host"] == "testserver"  # the Host header, checked against ALLOWED_HOSTS
        assert (echo["path"], echo["query"], echo["get"]) == ("/echo/hello", "x=1", {"x": "1"})
        assert seen.calls == ["/echo/hello"]

    served(app, body)


def test_local_response_short_circuits_the_django_view(seen: Seen) -> None:
    app = django_app(EXAMPLE_SPEC)

    async def body() -> None:
        response = await request(app, "POST", "/deny/me/", content=b"payload")
        assert response.status_code == 403
        assert response.content == b"denied by wasm plugin\n"
        assert response.headers["content-length"] == str(len(response.content))
        assert response.headers["x-denied-by"] == "example"
        assert "x-app" not in response.headers
        assert seen.calls == []  # /deny/me/ routes to a view: it never ran
        assert (await request(app, "GET", "/echo/allowed")).status_code == 200
        assert seen.calls == ["/echo/allowed"]

    served(app, body)


def test_path_method_and_query_rewrites_steer_django_url_resolution(seen: Seen) -> None:
    plugin = conformance(
        "request_headers replace_header_map_value 0 s::path s:/async/a%2520b?q=2",
        "request_headers replace_header_map_value 0 s::method s:PUT")
    app = django_app(plugin)

    async def body() -> None:
        echo = (await request(app, "GET", "/echo/original?q=1")).json()
        assert echo["view"] == "async"  # resolved on the rewritten path
        assert (echo["method"], echo["path"], echo["get"]) == ("PUT", "/async/a b", {"q": "2"})
        assert seen.calls == ["/async/a b"]

    served(app, body)


def test_request_body_rewrite_reaches_the_view_with_its_true_length() -> None:
    app = django_app(conformance("request_body set_buffer_bytes 0 0 0x7fffffff s:REPLACED"))

    async def body() -> None:
        echo = (await request(app, "POST", "/echo/upload", content=b"hello")).json()
        assert (echo["body"], echo["body_length"]) == ("REPLACED", 8)  # request.body
        assert echo["content_length"] == "8"  # request.META["CONTENT_LENGTH"]
        echo = (await request(app, "POST", "/async/upload", content=b"a longer body")).json()
        assert (echo["view"], echo["body"], echo["content_length"]) == ("async", "REPLACED", "8")

    served(app, body)


def test_streamed_request_body_reaches_the_view_whole() -> None:
    app = django_app(conformance("request_headers add_header_map_value 0 s:x-seen s:1"))

    async def chunks() -> AsyncIterator[bytes]:
        for part in (b"one,", b"two,", b"three"):
            await asyncio.sleep(0)
            yield part

    async def body() -> None:
        echo = (await request(app, "POST", "/echo/stream", content=chunks())).json()
        assert (echo["body"], echo["body_length"]) == ("one,two,three", 13)
        assert echo["headers"]["x-seen"] == "1"

    served(app, body)


def test_root_path_reaches_django_as_its_script_name(seen: Seen) -> None:
    app = django_app(EXAMPLE_SPEC)

    async def body() -> None:
        echo = (await request(app, "GET", "/mount/echo/x", root_path="/mount")).json()
        assert (echo["path"], echo["path_info"], echo["script_name"]) == (
            "/mount/echo/x", "/echo/x", "/mount")
        assert echo["meta_example"] == "seen"
        # APPEND_SLASH builds its Location from the script name and the path
        slash = await request(app, "GET", "/mount/slash", root_path="/mount")
        assert (slash.status_code, slash.headers["location"]) == (301, "/mount/slash/")

    served(app, body)


# -- response side ------------------------------------------------------------------------------


def test_response_header_and_body_rewrites_reach_the_client() -> None:
    plugin = conformance("response_headers add_header_map_value 2 s:x-resp s:1",
                         "response_body set_buffer_bytes 1 0 0x7fffffff s:REWRITTEN")
    app = django_app(EXAMPLE_SPEC, plugin)

    async def body() -> None:
        response = await request(app, "GET", "/echo/anything")
        assert response.status_code == 200
        assert response.content == b"REWRITTEN"
        assert response.headers["content-length"] == "9"  # re-framed, not Django's length
        assert response.headers["x-resp"] == "1"
        assert response.headers["x-wasm-greeting"] == "hello from wasm"
        assert response.headers["x-app"] == "django"  # Django's "X-App", lower-cased
        assert response.cookies["session"] == "abc"  # Django's Set-Cookie

    served(app, body)


def test_crashing_plugin_fails_closed_with_503_or_open_to_the_view(seen: Seen) -> None:
    closed = django_app(conformance("request_headers trap"))
    opened = django_app(conformance("request_headers trap", fail="FAIL_OPEN"))

    async def body() -> None:
        await opened.startup()
        try:
            response = await request(closed, "GET", "/echo/x")
            assert response.status_code == 503
            assert seen.calls == []
            response = await request(opened, "GET", "/echo/y")
            assert response.status_code == 200
            assert response.json()["path"] == "/echo/y"
            assert seen.calls == ["/echo/y"]
        finally:
            await opened.shutdown()
        assert closed.describe()[0]["crashes"] == 1
        assert opened.describe()[0]["crashes"] == 1

    served(closed, body)


# -- Django's own behaviours through the plugins ------------------------------------------------


def test_django_404_from_url_resolution_passes_the_plugins(seen: Seen) -> None:
    app = django_app(EXAMPLE_SPEC)

    async def body() -> None:
        response = await request(app, "GET", "/nowhere/")
        assert response.status_code == 404
        assert b"Not Found" in response.content
        assert response.headers["x-wasm-greeting"] == "hello from wasm"
        assert seen.calls == []

    served(app, body)


def test_django_turns_a_failing_view_into_its_own_500(seen: Seen) -> None:
    app = django_app(EXAMPLE_SPEC)

    async def body() -> None:
        response = await request(app, "GET", "/boom/")
        assert response.status_code == 500
        assert b"Server Error" in response.content  # Django's page, not the middleware's
        assert response.headers["x-wasm-greeting"] == "hello from wasm"
        assert seen.calls == ["/boom/"]

    served(app, body)


def test_redirects_pass_through(seen: Seen) -> None:
    app = django_app(EXAMPLE_SPEC)

    async def body() -> None:
        response = await request(app, "GET", "/go/")
        assert (response.status_code, response.headers["location"]) == (302, "/echo/target")
        assert response.headers["x-wasm-greeting"] == "hello from wasm"
        slash = await request(app, "GET", "/slash")  # CommonMiddleware's APPEND_SLASH
        assert (slash.status_code, slash.headers["location"]) == (301, "/slash/")
        followed = await request(app, "GET", "/go/", follow_redirects=True)
        assert followed.status_code == 200
        assert followed.json()["path"] == "/echo/target"
        assert followed.json()["meta_example"] == "seen"
        assert seen.calls == ["/go/", "/go/", "/echo/target"]

    served(app, body)


def test_streaming_response_passes_through(seen: Seen) -> None:
    plugin = conformance("response_headers add_header_map_value 2 s:x-resp s:1",
                         "response_body get_buffer_bytes 1 0 100")
    app = django_app(EXAMPLE_SPEC, plugin)

    async def body() -> None:
        response = await request(app, "GET", "/stream/?n=4")
        assert response.status_code == 200
        assert response.content == b"part0;part1;part2;part3;"
        assert response.headers["x-resp"] == "1"
        assert response.headers["x-wasm-greeting"] == "hello from wasm"
        assert "content-length" not in response.headers
        assert seen.calls == ["/stream/"]

    served(app, body)


def test_response_side_local_reply_replaces_a_streaming_view_and_ends_it(seen: Seen) -> None:
    """The view is told http.disconnect and Django cancels it itself: its iterator, waiting on
    a gate nobody opens, is closed before the exchange is over."""
    app = django_app(conformance("response_headers send_local_response 418 s:teapot s:short "
                                 "m:x-replaced=1 -1"))

    async def body() -> None:
        seen.gate = asyncio.Event()
        seen.stream_ended = asyncio.Event()
        response = await bounded(request(app, "GET", "/stream/?n=3"))
        assert (response.status_code, response.content) == (418, b"short")
        assert response.headers["x-replaced"] == "1"
        assert seen.calls == ["/stream/"]
        assert seen.stream_parts == 1
        assert seen.stream_ended.is_set()
        assert not seen.gate.is_set()

    served(app, body)


def test_paused_request_waits_for_the_http_call(upstream: str) -> None:
    plugin = conformance(
        "request_headers http_call s:auth m::path=/check&:method=GET&:authority=auth s: null 2000",
        "request_headers return 1",
        "http_call_response set_effective_context 2",
        "http_call_response add_header_map_value 0 s:x-auth s:checked",
        "http_call_response continue_stream 0")
    app = WasmPluginMiddleware(get_asgi_application(), plugins=[plugin],
                               clusters={"auth": upstream})

    async def body() -> None:
        echo = (await request(app, "POST", "/echo/guarded", content=b"held")).json()
        assert echo["headers"]["x-auth"] == "checked"
        assert (echo["body"], echo["body_length"]) == ("held", 4)

    served(app, body)

def test_head_request_sends_no_body() -> None:
    app = django_app(EXAMPLE_SPEC)

    async def body() -> None:
        head = await request(app, "HEAD", "/echo/same")
        assert head.status_code == 200
        assert head.content == b""
        assert head.headers["x-wasm-greeting"] == "hello from wasm"

    served(app, body)


# -- a real server ------------------------------------------------------------------------------


def test_under_uvicorn_django_without_lifespan_gets_loaded_plugins(seen: Seen) -> None:
    """Django's ASGI handler raises on the lifespan scope; the middleware answers it itself,
    so the plugins load at startup and close at shutdown."""
    middleware = django_app(
        EXAMPLE_SPEC,
        conformance("request_body set_buffer_bytes 0 0 0x7fffffff s:REPLACED",
                    "response_body set_buffer_bytes 1 0 0x7fffffff s:%7B%22rewritten%22:true%7D",
                    name="bodies"))
    observed: dict[str, Any] = {}

    async def main() -> None:
        async with uvicorn_serving(middleware) as client:
            observed["ready"] = middleware.ready  # loaded at lifespan.startup
            response = await client.post("/echo/upload?z=9", content=b"hello world")
            assert response.status_code == 200
            assert response.content == b'{"rewritten":true}'
            assert response.headers["content-length"] == "18"
            assert response.headers["x-wasm-greeting"] == "hello from wasm"
            assert response.headers["x-app"] == "django"
            denied = await client.get("/deny/me/")
            assert (denied.status_code, denied.content) == (403, b"denied by wasm plugin\n")
            missing = await client.get("/nowhere/")
            assert missing.status_code == 404

    asyncio.run(main())
    assert observed["ready"]
    assert seen.calls == ["/echo/upload"]
    assert all(slot.plugin is not None and slot.plugin.vm is None
               for slot in middleware.slots)  # closed at lifespan.shutdown


def test_under_uvicorn_the_view_sees_the_rewritten_request() -> None:
    middleware = django_app(
        EXAMPLE_SPEC, conformance("request_body set_buffer_bytes 0 0 0x7fffffff s:REPLACED"))

    async def main() -> dict[str, Any]:
        async with uvicorn_serving(middleware, root_path="/mount") as client:
            return dict((await client.post("/async/upload?z=9", content=b"hello world")).json())

    echo = asyncio.run(main())
    assert (echo["body"], echo["body_length"], echo["content_length"]) == ("REPLACED", 8, "8")
    assert echo["meta_example"] == "seen"
    assert echo["get"] == {"z": "9"}
    assert echo["host"].startswith("127.0.0.1:")
    # uvicorn puts root_path in front of path; Django strips it again as its script name
    assert (echo["path"], echo["path_info"], echo["script_name"]) == (
        "/mount/async/upload", "/async/upload", "/mount")


def test_under_uvicorn_a_streaming_response_passes_part_by_part(seen: Seen) -> None:
    middleware = django_app(EXAMPLE_SPEC, conformance(
        "response_headers add_header_map_value 2 s:x-resp s:1",
        "response_body get_buffer_bytes 1 0 100"))

    async def main() -> None:
        seen.gate = asyncio.Event()
        seen.stream_ended = asyncio.Event()
        async with uvicorn_serving(middleware) as client, client.stream(
                "GET", "/stream/?n=3") as response:
            assert response.headers["x-resp"] == "1"
            assert response.headers["x-wasm-greeting"] == "hello from wasm"
            assert "content-length" not in response.headers
            parts = response.aiter_raw()
            # the view waits for the gate after its first part: that part must arrive alone
            assert await bounded(anext(parts)) == b"part0;"
            assert seen.stream_parts == 1
            seen.gate.set()
            rest = b"".join([chunk async for chunk in parts])
            assert rest == b"part1;part2;"
        assert seen.stream_ended.is_set()

    asyncio.run(main())


def test_under_uvicorn_a_client_going_away_stops_the_django_view(seen: Seen) -> None:
    """Django listens for `http.disconnect` and cancels its view; the middleware must let that
    happen instead of leaving the view's task running on its own."""
    middleware = django_app(EXAMPLE_SPEC)

    async def main() -> None:
        seen.stream_ended = asyncio.Event()
        async with uvicorn_serving(middleware) as client:
            port = client.base_url.port
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /stream/?n=100000000 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            await writer.drain()
            assert b"part0;" in await bounded(reader.read(4096))
            writer.close()
            await bounded(seen.stream_ended.wait())  # the iterator was closed
            parts = seen.stream_parts
            for _ in range(20):
                await asyncio.sleep(0)
            assert seen.stream_parts == parts  # and nothing produces parts any more
            assert parts < 100000000

    asyncio.run(main())

