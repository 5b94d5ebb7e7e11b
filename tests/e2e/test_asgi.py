"""The ASGI middleware in front of real applications: Starlette (and FastAPI) apps driven through
httpx's ASGI transport and under a real uvicorn server on a free port."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from wasmgate.api import load_text
from wasmgate.asgi import PluginSpec, StreamReset, WasmPluginMiddleware

from ..conftest import CONFORMANCE, EXAMPLE
from .conftest import free_port


def echo_app(calls: list[str] | None = None) -> Starlette:
    """Echoes method, path, query, headers and body as JSON; /boom raises."""
    seen = calls if calls is not None else []

    async def echo(request: Request) -> Response:
        seen.append(request.url.path)
        body = await request.body()
        return JSONResponse({
            "method": request.method, "path": request.url.path, "query": request.url.query,
            "headers": [[k.decode(), v.decode()] for k, v in request.headers.raw],
            "body": body.decode("utf-8", "replace")}, headers={"x-app": "echo"})

    async def boom(request: Request) -> Response:
        seen.append(request.url.path)
        raise RuntimeError("the application broke")

    async def chunks(request: Request) -> Response:
        seen.append(request.url.path)
        count = int(request.query_params.get("n", "3"))
        fail = "fail" in request.query_params

        async def parts() -> AsyncIterator[bytes]:
            for i in range(count):
                await asyncio.sleep(0.01)
                yield f"part{i};".encode()
            if fail:
                raise RuntimeError("broke mid-response")

        return StreamingResponse(parts(), media_type="text/plain")

    return Starlette(routes=[Route("/boom", boom), Route("/chunks", chunks),
                             Route("/{path:path}", echo, methods=["GET", "POST"])])


def values(echo: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in echo["headers"] if k == name]


def conformance(*steps: str, fail: str = "FAIL_CLOSE", name: str = "conf") -> PluginSpec:
    return PluginSpec(CONFORMANCE, config="\n".join(steps), name=name, fail_strategy=fail)


EXAMPLE_SPEC = PluginSpec(EXAMPLE, config=b"hello from wasm", root_id="example")


async def request(app: Any, method: str, path: str, **kwargs: Any) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        return await client.request(method, path, **kwargs)


def served(middleware: WasmPluginMiddleware,
           body: Callable[[], Awaitable[None]]) -> None:
    """Load the plugins (the ASGI transport sends no lifespan), run `body`, close them."""
    async def main() -> None:
        await middleware.startup()
        assert middleware.ready
        try:
            await body()
        finally:
            await middleware.shutdown()

    asyncio.run(main())


# -- request and response headers ---------------------------------------------------------------


def test_request_header_mutation_reaches_the_app_and_response_headers_the_client() -> None:
    app = WasmPluginMiddleware(echo_app(), plugins=[EXAMPLE_SPEC])

    async def body() -> None:
        response = await request(app, "GET", "/hello?x=1", headers={"X-Custom": "Yes"})
        assert response.status_code == 200
        assert response.headers["x-wasm-greeting"] == "hello from wasm"
        assert response.headers["x-app"] == "echo"
        echo = response.json()
        assert values(echo, "x-wasm-example") == ["seen"]
        assert values(echo, "x-custom") == ["Yes"]
        assert len(values(echo, "x-request-id")) == 1  # added, as the gateway does
        assert values(echo, "host") == ["testserver"]
        assert (echo["path"], echo["query"]) == ("/hello", "x=1")

    served(app, body)


def test_local_response_short_circuits_the_app() -> None:
    calls: list[str] = []
    app = WasmPluginMiddleware(echo_app(calls), plugins=[EXAMPLE_SPEC])

    async def body() -> None:
        response = await request(app, "POST", "/deny/this", content=b"payload")
        assert response.status_code == 403
        assert response.content == b"denied by wasm plugin\n"
        assert response.headers["content-length"] == str(len(response.content))
        assert response.headers["x-denied-by"] == "example"
        assert calls == []
        assert (await request(app, "GET", "/allowed")).status_code == 200
        assert calls == ["/allowed"]

    served(app, body)


def test_path_method_and_query_rewrites_reach_the_app_scope() -> None:
    plugin = conformance(
        "request_headers replace_header_map_value 0 s::path s:/rewritten/a%2520b?q=2",
        "request_headers replace_header_map_value 0 s::method s:POST")
    app = WasmPluginMiddleware(echo_app(), plugins=[plugin])

    async def body() -> None:
        echo = (await request(app, "GET", "/original?q=1")).json()
        assert (echo["method"], echo["path"], echo["query"]) == ("POST", "/rewritten/a b", "q=2")

    served(app, body)


# -- bodies -------------------------------------------------------------------------------------


def test_request_body_rewrite_reaches_the_app_with_a_true_content_length() -> None:
    plugin = conformance("request_body set_buffer_bytes 0 0 0x7fffffff s:REPLACED")
    app = WasmPluginMiddleware(echo_app(), plugins=[plugin])

    async def body() -> None:
        echo = (await request(app, "POST", "/upload", content=b"hello")).json()
        assert echo["body"] == "REPLACED"
        assert values(echo, "content-length") == ["8"]

    served(app, body)


def test_streamed_request_body_reaches_the_app_whole() -> None:
    plugin = conformance("request_headers add_header_map_value 0 s:x-seen s:1")
    app = WasmPluginMiddleware(echo_app(), plugins=[plugin])

    async def chunks() -> AsyncIterator[bytes]:
        for part in (b"one,", b"two,", b"three"):
            await asyncio.sleep(0.01)
            yield part

    async def body() -> None:
        echo = (await request(app, "POST", "/stream", content=chunks())).json()
        assert echo["body"] == "one,two,three"
        assert values(echo, "x-seen") == ["1"]

    served(app, body)


def test_response_body_rewrite_reaches_the_client_with_a_true_content_length() -> None:
    plugin = conformance("response_body set_buffer_bytes 1 0 0x7fffffff s:REWRITTEN")
    app = WasmPluginMiddleware(echo_app(), plugins=[plugin])

    async def body() -> None:
        response = await request(app, "GET", "/anything")
        assert response.content == b"REWRITTEN"
        assert response.headers["content-length"] == "9"
        assert response.headers["x-app"] == "echo"

    served(app, body)


# -- failures -----------------------------------------------------------------------------------


def test_crashing_plugin_fails_closed_with_503_or_open_to_the_app() -> None:
    calls: list[str] = []
    closed = WasmPluginMiddleware(echo_app(calls), plugins=[conformance("request_headers trap")])
    opened = WasmPluginMiddleware(echo_app(calls), plugins=[
        conformance("request_headers trap", fail="FAIL_OPEN")])

    async def body() -> None:
        await opened.startup()
        try:
            response = await request(closed, "GET", "/x")
            assert response.status_code == 503
            assert calls == []
            response = await request(opened, "GET", "/y")
            assert response.status_code == 200
            assert calls == ["/y"]
        finally:
            await opened.shutdown()
        assert closed.describe()[0]["crashes"] == 1
        assert opened.describe()[0]["crashes"] == 1

    served(closed, body)


def test_app_exception_is_a_500_through_the_plugins() -> None:
    app = WasmPluginMiddleware(echo_app(), plugins=[EXAMPLE_SPEC])

    async def body() -> None:
        response = await request(app, "GET", "/boom")
        assert response.status_code == 500
        assert response.content == b"Internal Server Error"
        assert response.headers["x-wasm-greeting"] == "hello from wasm"

    served(app, body)


def test_head_keeps_the_length_of_the_body_it_does_not_send() -> None:
    app = WasmPluginMiddleware(echo_app(), plugins=[EXAMPLE_SPEC])

    async def body() -> None:
        get = await request(app, "GET", "/same", headers={"x-request-id": "fixed"})
        head = await request(app, "HEAD", "/same", headers={"x-request-id": "fixed"})
        assert head.status_code == 200
        assert head.content == b""
        # the echo of "HEAD" is one byte longer than that of "GET"; not re-framed to 0
        assert int(head.headers["content-length"]) == len(get.content) + 1
        assert head.headers["x-wasm-greeting"] == "hello from wasm"

    served(app, body)


def test_streamed_response_passes_chunk_by_chunk() -> None:
    plugin = conformance("response_headers add_header_map_value 2 s:x-resp s:1",
                         "response_body get_buffer_bytes 1 0 100")
    app = WasmPluginMiddleware(echo_app(), plugins=[plugin])

    async def body() -> None:
        response = await request(app, "GET", "/chunks?n=4")
        assert response.content == b"part0;part1;part2;part3;"
        assert response.headers["x-resp"] == "1"
        assert "content-length" not in response.headers

    served(app, body)


def test_plugin_closing_the_stream_resets_it() -> None:
    calls: list[str] = []
    app = WasmPluginMiddleware(echo_app(calls), plugins=[
        conformance("request_headers close_stream 0")])

    async def body() -> None:
        with pytest.raises(StreamReset, match="wasm_close_stream"):
            await request(app, "GET", "/x")
        assert calls == []

    served(app, body)


def test_app_failing_mid_response_resets_the_stream() -> None:
    app = WasmPluginMiddleware(echo_app(), plugins=[EXAMPLE_SPEC])

    async def body() -> None:
        with pytest.raises(StreamReset, match="asgi_app_exception"):
            await request(app, "GET", "/chunks?n=2&fail=1")

    served(app, body)


def test_plugins_stand_in_until_loaded_without_lifespan() -> None:
    calls: list[str] = []
    app = WasmPluginMiddleware(echo_app(calls), plugins=[EXAMPLE_SPEC])

    async def main() -> None:
        first = await request(app, "GET", "/early")  # loading starts now: deny-all stand-in
        assert (first.status_code, first.content) == (403, b"RBAC: access denied")
        assert calls == []
        await app.startup()
        later = await request(app, "GET", "/later")
        assert later.status_code == 200
        assert later.headers["x-wasm-greeting"] == "hello from wasm"
        await app.shutdown()

    asyncio.run(main())


def test_a_module_that_cannot_load_stands_in_per_fail_strategy(tmp_path: Path) -> None:
    bad = tmp_path / "bad.wasm"
    bad.write_bytes(b"\0asm not really")
    closed = WasmPluginMiddleware(echo_app(), plugins=[PluginSpec(bad)])
    opened = WasmPluginMiddleware(echo_app(), plugins=[PluginSpec(bad, fail_strategy="FAIL_OPEN")])

    async def body() -> None:
        await opened.startup()
        assert (await request(closed, "GET", "/")).status_code == 403
        assert (await request(opened, "GET", "/")).status_code == 200
        assert closed.describe()[0]["status"] == "failed"
        await opened.shutdown()

    served(closed, body)


# -- pausing ------------------------------------------------------------------------------------


def test_paused_request_waits_for_the_http_call(upstream: str) -> None:
    plugin = conformance(
        "request_headers http_call s:auth m::path=/check&:method=GET&:authority=auth s: null 2000",
        "request_headers return 1",
        "http_call_response set_effective_context 2",
        "http_call_response get_header_map_value 6 s::status",
        "http_call_response add_header_map_value 0 s:x-auth s:checked",
        "http_call_response continue_stream 0")
    app = WasmPluginMiddleware(echo_app(), plugins=[plugin], clusters={"auth": upstream})

    async def body() -> None:
        echo = (await request(app, "POST", "/guarded", content=b"held")).json()
        assert values(echo, "x-auth") == ["checked"]
        assert echo["body"] == "held"

    served(app, body)


# -- configuration as Istio resources -----------------------------------------------------------


def wasmplugin(name: str, *, phase: str | None = None, priority: int | None = None,
               selector: dict[str, str] | None = None) -> str:
    steps = [f"request_headers add_header_map_value 0 s:x-order s:{name}"]
    text = (f"---\napiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\n"
            f"metadata: {{name: {name}, namespace: shop}}\nspec:\n"
            f"  url: file://{CONFORMANCE}\n  pluginConfig: {json.dumps({'steps': steps})}\n")
    if phase:
        text += f"  phase: {phase}\n"
    if priority is not None:
        text += f"  priority: {priority}\n"
    if selector:
        text += f"  selector: {{matchLabels: {json.dumps(selector)}}}\n"
    return text


def test_yaml_plugins_run_in_istio_order(tmp_path: Path) -> None:
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "a.yaml").write_text(
        wasmplugin("stats-low", phase="STATS", priority=1) + wasmplugin("unspecified")
        + wasmplugin("authz", phase="AUTHZ") + wasmplugin("other-app", selector={"app": "x"}))
    (tmp_path / "plugins" / "b.yaml").write_text(
        wasmplugin("stats-high", phase="STATS", priority=10) + wasmplugin("authn", phase="AUTHN")
        + wasmplugin("mine", phase="AUTHN", selector={"app": "shop"}, priority=5))
    [extra] = load_text(wasmplugin("object", phase="STATS", priority=5)).plugins
    first = conformance("request_headers add_header_map_value 0 s:x-order s:spec", name="spec")
    app = WasmPluginMiddleware(echo_app(), plugins=[first, tmp_path / "plugins", extra],
                               labels={"app": "shop"}, namespace="shop")
    assert [slot.name for slot in app.slots] == [
        "spec", "shop.mine", "shop.authn", "shop.authz", "shop.stats-high", "shop.object",
        "shop.stats-low", "shop.unspecified"]

    async def body() -> None:
        echo = (await request(app, "GET", "/")).json()
        assert values(echo, "x-order") == ["spec", "mine", "authn", "authz", "stats-high",
                                           "object", "stats-low", "unspecified"]

    served(app, body)


# -- other scopes -------------------------------------------------------------------------------


def test_non_http_scopes_pass_through() -> None:
    seen: list[str] = []

    async def raw_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        seen.append(scope["type"])

    app = WasmPluginMiddleware(raw_app, plugins=[EXAMPLE_SPEC])

    async def main() -> None:
        async def receive() -> dict[str, Any]:
            return {"type": "websocket.connect"}

        async def send(message: dict[str, Any]) -> None:
            pass

        await app({"type": "websocket", "path": "/ws", "headers": []}, receive, send)
        assert seen == ["websocket"]
        assert app.host is None  # nothing loaded for a websocket

    asyncio.run(main())


def test_fastapi_app() -> None:
    import fastapi
    api = fastapi.FastAPI()

    @api.post("/items")
    async def create(request: Request) -> dict[str, Any]:
        return {"body": (await request.body()).decode(),
                "example": request.headers.get("x-wasm-example")}

    app = WasmPluginMiddleware(api, plugins=[
        EXAMPLE_SPEC, conformance("request_body set_buffer_bytes 0 0 0x7fffffff s:{}")])

    async def body() -> None:
        response = await request(app, "POST", "/items", content=b'{"a": 1}')
        assert response.json() == {"body": "{}", "example": "seen"}
        assert response.headers["x-wasm-greeting"] == "hello from wasm"

    served(app, body)


# -- a real server ------------------------------------------------------------------------------


def test_under_uvicorn_with_lifespan() -> None:
    calls: list[str] = []
    middleware = WasmPluginMiddleware(echo_app(calls), plugins=[
        EXAMPLE_SPEC,
        conformance("request_body set_buffer_bytes 0 0 0x7fffffff s:REPLACED",
                    "response_body set_buffer_bytes 1 0 0x7fffffff s:%7B%22rewritten%22:true%7D",
                    name="bodies")])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(middleware, host="127.0.0.1", port=port,
                                           lifespan="on", log_level="warning"))

    async def main() -> None:
        task = asyncio.create_task(server.serve())
        try:
            for _ in range(500):
                if server.started or task.done():
                    break
                await asyncio.sleep(0.02)
            assert server.started
            assert middleware.ready  # loaded at lifespan.startup
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                response = await client.post("/upload", content=b"hello")
                assert response.status_code == 200
                assert response.content == b'{"rewritten":true}'
                assert response.headers["content-length"] == "18"
                assert response.headers["x-wasm-greeting"] == "hello from wasm"
                denied = await client.get("/deny")
                assert (denied.status_code, denied.content) == (403, b"denied by wasm plugin\n")
                assert calls == ["/upload"]
        finally:
            server.should_exit = True
            await task
        assert all(slot.plugin is not None and slot.plugin.vm is None
                   for slot in middleware.slots)  # closed at lifespan.shutdown

    asyncio.run(main())


def test_under_uvicorn_an_app_without_lifespan_still_gets_loaded_plugins() -> None:
    async def bare_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"  # knows nothing of lifespan
        headers = dict(scope["headers"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": headers[b"x-wasm-example"]})

    middleware = WasmPluginMiddleware(bare_app, plugins=[EXAMPLE_SPEC])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(middleware, host="127.0.0.1", port=port,
                                           lifespan="on", log_level="warning"))

    async def main() -> None:
        task = asyncio.create_task(server.serve())
        try:
            while not server.started and not task.done():
                await asyncio.sleep(0.02)
            assert middleware.ready
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                response = await client.get("/")
            assert (response.status_code, response.content) == (200, b"seen")
            assert response.headers["content-length"] == "4"
            assert response.headers["x-wasm-greeting"] == "hello from wasm"
        finally:
            server.should_exit = True
            await task
        assert middleware.slots[0].plugin is not None
        assert middleware.slots[0].plugin.vm is None  # closed at shutdown

    asyncio.run(main())


def test_under_uvicorn_a_client_going_away_ends_the_stream() -> None:
    logged: list[str] = []
    plugin = conformance("log log 2 s:stream-logged")
    middleware = WasmPluginMiddleware(echo_app(), plugins=[plugin])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(middleware, host="127.0.0.1", port=port,
                                           lifespan="on", log_level="warning"))

    async def main() -> None:
        task = asyncio.create_task(server.serve())
        try:
            while not server.started and not task.done():
                await asyncio.sleep(0.02)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /chunks?n=100000 HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            assert b"part0;" in await reader.read(4096)
            writer.close()
            for _ in range(250):  # on_log runs once the stream ends, before shutdown
                if logged:
                    break
                await asyncio.sleep(0.02)
            assert logged
        finally:
            server.should_exit = True
            await task

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "stream-logged" in record.getMessage():
                logged.append(record.getMessage())

    wasm_log = logging.getLogger("wasmgate.wasm")
    handler, level = Capture(), wasm_log.level
    wasm_log.addHandler(handler)
    wasm_log.setLevel(logging.INFO)
    try:
        asyncio.run(main())
    finally:
        wasm_log.removeHandler(handler)
        wasm_log.setLevel(level)


def test_under_uvicorn_the_app_sees_the_rewritten_request() -> None:
    middleware = WasmPluginMiddleware(echo_app(), plugins=[
        EXAMPLE_SPEC, conformance("request_body set_buffer_bytes 0 0 0x7fffffff s:REPLACED")])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(middleware, host="127.0.0.1", port=port,
                                           lifespan="on", log_level="warning"))

    async def main() -> None:
        task = asyncio.create_task(server.serve())
        try:
            while not server.started and not task.done():
                await asyncio.sleep(0.02)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                echo = (await client.post("/upload?z=9", content=b"hello world")).json()
        finally:
            server.should_exit = True
            await task
        assert echo["body"] == "REPLACED"
        assert values(echo, "content-length") == ["8"]
        assert values(echo, "x-wasm-example") == ["seen"]
        assert echo["query"] == "z=9"

    asyncio.run(main())
