"""The AI plugins of the Higress wheel against a real OpenAI-compatible upstream.

Everything runs on 127.0.0.1: a model server answering /v1/chat/completions (a JSON completion
with ``usage``, or with ``"stream": true`` an SSE stream ending in a usage chunk and
``[DONE]``) that records what it received, a usage-report collector, and the gateway started
with ``wasmgate run`` as a user would.

Streaming is shown to pass through unbuffered without any timing: the model server sends the
first event and then waits until the client has read that event through the gateway. A gateway
that buffered the stream would make the server wait in vain (``released`` stays False).

What each plugin documents (sources: alibaba/higress plugins/wasm-go/extensions/ai-statistics,
gpustack/gpustack-higress-plugin extensions/gpustack-token-usage and gpustack-ai-proxy):
- ai-statistics counts the upstream's ``usage`` into counters named
  ``route.<route>.upstream.<cluster>.model.<model>.consumer.<consumer>.metric.<name>``
  (consumer from ``x-mse-consumer``, else ``none``) for JSON and SSE responses, and extracts
  the configured ``attributes`` for its log;
- gpustack-token-usage forces ``stream_options.include_usage``, adds timing fields to the
  usage it passes on, injects ``realIPHeader`` / ``header_add`` for GPUStack clusters only and
  POSTs a usage report per request to ``endpoint``;
- gpustack-ai-proxy (type ``openai`` with ``openaiCustomUrl``) rewrites host and path, puts
  its own ``apiTokens`` in ``Authorization`` and maps the model with ``modelMapping``.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from ..conftest import missing
from ..e2e.conftest import Gateway
from .higress import HigressDownloadError, higress_plugin
from .test_higress_gateway import wasm_plugin

Start = Callable[..., Gateway]
Headers = list[tuple[str, str]]

JSON_USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
STREAM_USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
QUESTION = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module", autouse=True)
def plugins_downloaded() -> None:
    try:
        for name in ("ai-statistics", "gpustack-token-usage", "gpustack-ai-proxy"):
            higress_plugin(name)
    except HigressDownloadError as exc:
        missing(f"the gpustack-higress-plugins wheel could not be downloaded: {exc}")


# -- the servers ---------------------------------------------------------------------------------
class Seen:
    """One request as a server received it."""

    def __init__(self, method: str, path: str, headers: Headers, body: bytes) -> None:
        self.method, self.path, self.headers, self.body = method, path, headers, body

    def values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]

    def one(self, name: str) -> str | None:
        values = self.values(name)
        assert len(values) <= 1, (name, values)
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body)


def sse(event: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(event).encode() + b"\n\n"


def stream_events(model: str) -> list[bytes]:
    """What the model server streams: two content deltas, the usage chunk, [DONE]."""
    head = {"id": "chatcmpl-s1", "object": "chat.completion.chunk", "model": model}
    return [sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant",
                                                             "content": "Hel"}}]}),
            sse({**head, "choices": [{"index": 0, "delta": {"content": "lo"},
                                      "finish_reason": "stop"}]}),
            sse({**head, "choices": [], "usage": STREAM_USAGE}),
            b"data: [DONE]\n\n"]


def completion(model: str) -> bytes:
    return json.dumps({"id": "chatcmpl-j1", "object": "chat.completion", "model": model,
                       "choices": [{"index": 0, "finish_reason": "stop",
                                    "message": {"role": "assistant", "content": "Hello"}}],
                       "usage": JSON_USAGE}).encode()


class Recorder:
    """A ThreadingHTTPServer on 127.0.0.1 recording every request; `answer` writes the reply."""

    def __init__(self) -> None:
        self.requests: list[Seen] = []
        self.arrived = threading.Condition()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                seen = Seen(self.command, self.path,
                            [(k.lower(), v) for k, v in self.headers.items()], self._body())
                with server.arrived:
                    server.requests.append(seen)
                    server.arrived.notify_all()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    server.answer(self, seen)

            do_GET = do_POST

            def _body(self) -> bytes:
                if self.headers.get("transfer-encoding", "").lower() != "chunked":
                    length = int(self.headers.get("content-length") or 0)
                    return self.rfile.read(length) if length else b""
                body = b""
                while size := int(self.rfile.readline().split(b";")[0].strip(), 16):
                    body += self.rfile.read(size)
                    self.rfile.readline()
                self.rfile.readline()
                return body

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.httpd.server_address[1])
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def answer(self, handler: BaseHTTPRequestHandler, seen: Seen) -> None:
        handler.send_response(204)
        handler.send_header("content-length", "0")
        handler.end_headers()

    def wait_for(self, count: int, timeout: float = 30) -> list[Seen]:
        """The first `count` requests, once that many have arrived (a bound, not an assertion
        on timing: a report is sent asynchronously after the client has its response)."""
        with self.arrived:
            self.arrived.wait_for(lambda: len(self.requests) >= count, timeout)
            assert len(self.requests) >= count, [r.path for r in self.requests]
            return list(self.requests)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class ModelServer(Recorder):
    """OpenAI-compatible /v1/chat/completions (any path): JSON, or SSE when `stream` is true."""

    def __init__(self) -> None:
        super().__init__()
        self.first_read = threading.Event()  # the client has the first event
        self.released: list[bool] = []  # per stream: whether the client had it before the rest

    def answer(self, handler: BaseHTTPRequestHandler, seen: Seen) -> None:
        request = seen.json() if seen.body else {}
        model = request.get("model", "unknown")
        if not request.get("stream"):
            body = completion(model)
            handler.send_response(200)
            handler.send_header("content-type", "application/json")
            handler.send_header("content-length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)
            return
        handler.send_response(200)
        handler.send_header("content-type", "text/event-stream")
        handler.send_header("transfer-encoding", "chunked")
        handler.end_headers()
        first, *rest = stream_events(model)
        self._chunk(handler, first)
        # Hold the rest until the client has read the first event through the gateway.
        self.released.append(self.first_read.wait(30))
        for event in rest:
            self._chunk(handler, event)
        handler.wfile.write(b"0\r\n\r\n")
        handler.wfile.flush()

    @staticmethod
    def _chunk(handler: BaseHTTPRequestHandler, data: bytes) -> None:
        handler.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        handler.wfile.flush()


@pytest.fixture
def model() -> Iterator[ModelServer]:
    server = ModelServer()
    yield server
    server.first_read.set()
    server.stop()


@pytest.fixture
def collector() -> Iterator[Recorder]:
    server = Recorder()
    yield server
    server.stop()


# -- the client ----------------------------------------------------------------------------------
def chat(gateway: Gateway, body: dict[str, Any], path: str = "/v1/chat/completions",
         **headers: str) -> tuple[int, dict[str, str], bytes]:
    sent = {"content-type": "application/json", **{k.replace("_", "-"): v
                                                   for k, v in headers.items()}}
    return gateway.request("POST", path, body=json.dumps(body).encode(), headers=sent)


def chat_stream(gateway: Gateway, model: ModelServer, body: dict[str, Any],
                path: str = "/v1/chat/completions",
                **headers: str) -> tuple[int, dict[str, str], bytes, bytes]:
    """A streaming chat: (status, headers, the first event as read, the whole body). The model
    server sends the rest only after this client has read the first event."""
    model.first_read.clear()
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=60)
    try:
        sent = {"content-type": "application/json", **{k.replace("_", "-"): v
                                                       for k, v in headers.items()}}
        conn.request("POST", path, body=json.dumps({**body, "stream": True}).encode(),
                     headers=sent)
        response = conn.getresponse()
        received = b""
        while b"\n\n" not in received:
            data = response.read1(65536)
            if not data:
                break
            received += data
        first = received
        model.first_read.set()
        received += response.read()
        return (response.status, {k.lower(): v for k, v in response.getheaders()}, first,
                received)
    finally:
        model.first_read.set()
        conn.close()


def events(body: bytes) -> list[bytes]:
    return [e + b"\n\n" for e in body.split(b"\n\n") if e]


def prometheus(gateway: Gateway) -> dict[str, float]:
    status, text = gateway.admin_get("/stats/prometheus")
    assert status == 200
    values = {}
    for line in text.decode().splitlines():
        if line and not line.startswith("#") and "{" not in line:
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def crashes(gateway: Gateway) -> int:
    return sum(int(p["crashes"]) for p in gateway.admin_json("/plugins")["plugins"])


def gateway_doc(model: ModelServer, *, route: str = "chat", cluster: str = "llm",
                extra_clusters: str = "", extra_routes: str = "") -> str:
    return f"""apiVersion: wasmgate.io/v1alpha1
kind: Gateway
metadata: {{name: ai}}
spec:
  clusters:
  - name: "{cluster}"
    endpoints: ["127.0.0.1:{model.port}"]
{extra_clusters}  routes:
{extra_routes}  - name: "{route}"
    cluster: "{cluster}"
"""


# -- ai-statistics -------------------------------------------------------------------------------
STATISTICS = {
    "enable_path_suffixes": ["/chat/completions"],
    "attributes": [
        {"key": "consumer", "value_source": "request_header", "value": "x-mse-consumer",
         "apply_to_log": True},
        {"key": "question", "value_source": "request_body",
         "value": "messages.@reverse.0.content", "apply_to_log": True},
        {"key": "answer", "value_source": "response_streaming_body",
         "value": "choices.0.delta.content", "rule": "append", "apply_to_log": True},
        {"key": "answer", "value_source": "response_body", "value": "choices.0.message.content",
         "apply_to_log": True},
    ],
}


def metric(consumer: str, name: str, model: str = "qwen3") -> str:
    """The Prometheus name of an ai-statistics counter for route `chat`, cluster `llm`.
    (Higress's own bootstrap adds tag extractors turning the segments into labels
    ai_route/ai_cluster/ai_model/ai_consumer; Envoy without them, and wasmgate, keep them
    in the name.)"""
    return f"route_chat_upstream_llm_model_{model}_consumer_{consumer}_metric_{name}"


def test_ai_statistics_counts_the_upstreams_usage_for_json_and_sse(
        start_gateway: Start, model: ModelServer) -> None:
    gateway = start_gateway(gateway_doc(model) + wasm_plugin("ai-statistics", STATISTICS))

    # JSON: the completion is passed on byte for byte and its usage counted
    status, headers, body = chat(gateway, {"model": "qwen3", "messages": QUESTION},
                                 x_mse_consumer="alice")
    assert (status, body) == (200, completion("qwen3"))
    values = prometheus(gateway)
    assert values[metric("alice", "input_token")] == JSON_USAGE["prompt_tokens"]
    assert values[metric("alice", "output_token")] == JSON_USAGE["completion_tokens"]
    assert values[metric("alice", "total_token")] == JSON_USAGE["total_tokens"]
    assert values[metric("alice", "llm_duration_count")] == 1
    assert metric("alice", "llm_stream_duration_count") not in values  # not a stream

    # SSE: unbuffered (the client had the first event before the server sent the rest),
    # every event intact, and the final usage chunk counted on top
    status, headers, first, body = chat_stream(gateway, model,
                                               {"model": "qwen3", "messages": QUESTION},
                                               x_mse_consumer="alice")
    assert status == 200 and headers["content-type"] == "text/event-stream"
    assert model.released == [True]
    assert first == stream_events("qwen3")[0]
    assert events(body) == stream_events("qwen3")
    values = prometheus(gateway)
    tokens = {k: JSON_USAGE[k] + STREAM_USAGE[k] for k in JSON_USAGE}
    assert values[metric("alice", "input_token")] == tokens["prompt_tokens"]
    assert values[metric("alice", "output_token")] == tokens["completion_tokens"]
    assert values[metric("alice", "total_token")] == tokens["total_tokens"]
    assert values[metric("alice", "llm_duration_count")] == 2
    assert values[metric("alice", "llm_stream_duration_count")] == 1

    # no x-mse-consumer: the consumer segment is "none"; another model is its own series
    assert chat(gateway, {"model": "other", "messages": QUESTION})[0] == 200
    values = prometheus(gateway)
    assert values[metric("none", "input_token", "other")] == JSON_USAGE["prompt_tokens"]
    assert values[metric("alice", "input_token")] == tokens["prompt_tokens"]

    # a path outside enable_path_suffixes is skipped: nothing more is counted
    status, _, _ = chat(gateway, {"model": "qwen3", "messages": QUESTION},
                        path="/v1/embeddings", x_mse_consumer="alice")
    assert status == 200
    assert prometheus(gateway)[metric("alice", "input_token")] == tokens["prompt_tokens"]
    assert "skipping request for path /v1/embeddings" in gateway.logs()

    # the configured log attributes, as the plugin extracted them (its debug log)
    logs = gateway.logs()
    for source, key, value in [("request_header", "consumer", "alice"),
                               ("request_body", "question", "hi"),
                               ("response_body", "answer", "Hello"),
                               ("response_streaming_body", "answer", "Hello")]:
        assert f"[attribute] source type: {source}, key: {key}, value: {value}" in logs
    assert "skip metric record" not in logs
    assert crashes(gateway) == 0


def test_ai_statistics_ai_log_reaches_the_access_log(start_gateway: Start,
                                                    model: ModelServer) -> None:
    """What ai-statistics writes for the log (its `ai_log` filter state: the attributes with
    apply_to_log, the model, the usage) is in the access line, as Higress's access log format
    has it with %FILTER_STATE(wasm.ai_log:PLAIN)%."""
    gateway = start_gateway(gateway_doc(model) + wasm_plugin("ai-statistics", STATISTICS),
                            "--access-log-format",
                            "ai %RESPONSE_CODE% %FILTER_STATE(wasm.ai_log:PLAIN)%")
    status, _, _ = chat(gateway, {"model": "qwen3", "messages": QUESTION},
                        x_mse_consumer="alice")
    assert status == 200
    logs = gateway.wait_logged("ai 200 {")
    [line] = [line for line in logs.splitlines() if line.startswith("ai 200 ")]
    # Higress's framework escapes the quotes of the JSON it stores, for text formats that
    # embed it in a JSON-looking line ("ai_log":"%FILTER_STATE(wasm.ai_log:PLAIN)%")
    ai_log = json.loads(line.removeprefix("ai 200 ").replace('\\"', '"'))
    assert {k: ai_log.get(k) for k in ("consumer", "question", "answer", "model",
                                       "input_token", "output_token")} == {
        "consumer": "alice", "question": "hi", "answer": "Hello", "model": "qwen3",
        "input_token": JSON_USAGE["prompt_tokens"],
        "output_token": JSON_USAGE["completion_tokens"]}


# -- gpustack-token-usage ------------------------------------------------------------------------
GPUSTACK_CLUSTER = "outbound|80||model-1-2.static"  # model 1, instance 2
GPUSTACK_ROUTE = "ai-route-route-1.internal"  # model route 1
REPORT_SERVICE = "gpustack-server.svc"
THIRD_PARTY = "outbound|443||api.example.com"
TOKEN = "shared-secret"

TOKEN_USAGE = {
    "realIPHeader": "x-gpustack-real-ip",
    "header_add": {"x-gpustack-internal-token": TOKEN},
    "endpoint": {"service_name": REPORT_SERVICE, "service_port": 80,
                 "path": "/v2/usage/gateway-metrics", "timeout_ms": 5000},
}


def token_usage_gateway(start_gateway: Start, model: ModelServer, collector: Recorder,
                        *plugins: str) -> Gateway:
    doc = gateway_doc(
        model, route=GPUSTACK_ROUTE, cluster=GPUSTACK_CLUSTER,
        extra_clusters=(f'  - name: "outbound|80||{REPORT_SERVICE}"\n'
                        f'    endpoints: ["127.0.0.1:{collector.port}"]\n'
                        f'  - name: "{THIRD_PARTY}"\n'
                        f'    endpoints: ["127.0.0.1:{model.port}"]\n'),
        extra_routes=(f'  - name: third-party\n    match: {{prefix: /third-party/}}\n'
                      f'    cluster: "{THIRD_PARTY}"\n'))
    return start_gateway(doc + "".join(plugins or (wasm_plugin("gpustack-token-usage",
                                                               TOKEN_USAGE),)))


def test_token_usage_injects_trust_headers_and_reports_json_usage(
        start_gateway: Start, model: ModelServer, collector: Recorder) -> None:
    gateway = token_usage_gateway(start_gateway, model, collector)
    status, headers, body = chat(gateway, {"model": "qwen3", "messages": QUESTION},
                                 x_mse_consumer="mykey.gpustack-42",
                                 x_gpustack_real_ip="6.6.6.6",  # forged by the client
                                 x_gpustack_internal_token="forged")
    assert status == 200

    [seen] = model.requests
    assert seen.values("x-gpustack-real-ip") == ["127.0.0.1"]  # source.address, replaced
    assert seen.values("x-gpustack-internal-token") == [TOKEN]  # header_add, replaced
    assert seen.json() == {"model": "qwen3", "messages": QUESTION}  # not a stream: unchanged

    # the response: usage kept; the wheel also echoes the request id
    answer = json.loads(body)
    assert answer["usage"]["total_tokens"] == JSON_USAGE["total_tokens"]
    assert int(headers["content-length"]) == len(body)
    assert headers["x-gpustack-request-id"] == seen.one("x-request-id")

    [report] = collector.wait_for(1)
    assert (report.method, report.path) == ("POST", "/v2/usage/gateway-metrics")
    assert report.one("host") == REPORT_SERVICE
    assert report.one("x-gpustack-internal-token") == TOKEN  # header_add rides along
    sent = report.json()
    assert {k: sent[k] for k in ("model", "input_token", "output_token", "total_token",
                                 "request_count", "completed", "model_id", "model_route_id",
                                 "user_id", "access_key", "request_content_bytes")} == {
        "model": "qwen3", "input_token": 11, "output_token": 7, "total_token": 18,
        "request_count": 1, "completed": True, "model_id": 1, "model_route_id": 1,
        "user_id": 42, "access_key": "mykey", "request_content_bytes": len("hi")}
    assert sent["upstream_response_id"] == "chatcmpl-j1"
    assert sent["request_id"] == seen.one("x-request-id")
    assert sent["started_at"] <= sent["completed_at"]
    assert "skipping local-reply" not in gateway.logs()
    assert crashes(gateway) == 0


def test_token_usage_forces_include_usage_and_adds_timings_to_the_stream(
        start_gateway: Start, model: ModelServer, collector: Recorder) -> None:
    gateway = token_usage_gateway(start_gateway, model, collector)

    status, _, first, body = chat_stream(gateway, model,
                                         {"model": "qwen3", "messages": QUESTION},
                                         x_mse_consumer="gpustack-42")
    assert status == 200 and model.released == [True]  # unbuffered
    [seen] = model.requests
    assert seen.json()["stream_options"] == {"include_usage": True}  # injected
    sent = stream_events("qwen3")
    got = events(body)
    assert first == sent[0]
    assert got[:2] == sent[:2] and got[3:] == sent[3:]  # deltas and [DONE] untouched
    usage = json.loads(got[2].removeprefix(b"data: "))["usage"]
    assert {k: usage[k] for k in STREAM_USAGE} == STREAM_USAGE
    assert {"time_to_first_token_ms", "time_per_output_token_ms",
            "tokens_per_second"} <= set(usage)  # the documented timing fields

    [report] = collector.wait_for(1)
    report_body = report.json()
    assert (report_body["input_token"], report_body["output_token"],
            report_body["total_token"]) == (5, 3, 8)
    assert report_body["completed"] is True
    assert report_body["output_chunk_count"] == 2  # the two content deltas
    assert report_body["user_id"] == 42 and "access_key" not in report_body

    # a client that asked for no usage chunk gets none, but the report still has the usage
    model.requests.clear()
    status, _, _, body = chat_stream(gateway, model, {
        "model": "qwen3", "messages": QUESTION, "stream_options": {"include_usage": False}})
    assert status == 200
    assert model.requests[0].json()["stream_options"] == {"include_usage": True}
    assert events(body) == [e for e in sent if b'"usage"' not in e]
    report_body = collector.wait_for(2)[1].json()
    assert (report_body["input_token"], report_body["total_token"]) == (5, 8)
    assert crashes(gateway) == 0


def test_token_usage_leaves_third_party_upstreams_alone(
        start_gateway: Start, model: ModelServer, collector: Recorder) -> None:
    gateway = token_usage_gateway(start_gateway, model, collector)
    status, _, _ = chat(gateway, {"model": "gpt-4o", "messages": QUESTION},
                        path="/third-party/v1/chat/completions",
                        x_gpustack_internal_token="client-value")
    assert status == 200
    [seen] = model.requests
    assert seen.values("x-gpustack-real-ip") == []  # the trust headers never leak
    assert seen.values("x-gpustack-internal-token") == ["client-value"]  # left as sent
    assert f"prepareMetrics: cluster {THIRD_PARTY} not tracked" in gateway.logs()

    # the GPUStack route on the same gateway is tracked: its report is the only one
    assert chat(gateway, {"model": "qwen3", "messages": QUESTION})[0] == 200
    [report] = collector.wait_for(1)
    assert report.json()["model"] == "qwen3"


# -- gpustack-ai-proxy ---------------------------------------------------------------------------
PROVIDER_TOKEN = "sk-provider-123"
AI_PROXY = {"provider": {"type": "openai", "apiTokens": [PROVIDER_TOKEN],
                         "modelMapping": {"gpt-4o": "qwen3", "*": ""},
                         "openaiCustomUrl": "http://llm.internal/custom/v1/chat/completions"}}


def test_ai_proxy_rewrites_the_request_for_its_provider(
        start_gateway: Start, model: ModelServer) -> None:
    gateway = start_gateway(gateway_doc(model) + wasm_plugin("gpustack-ai-proxy", AI_PROXY))

    status, _, body = chat(gateway, {"model": "gpt-4o", "messages": QUESTION},
                           authorization="Bearer client-key")
    assert status == 200
    assert json.loads(body) == json.loads(completion("qwen3"))  # the upstream's answer
    [seen] = model.requests
    assert seen.path == "/custom/v1/chat/completions"  # openaiCustomUrl's path
    assert seen.one("host") == "llm.internal"  # ... and host
    assert seen.values("authorization") == [f"Bearer {PROVIDER_TOKEN}"]  # the client's is gone
    assert seen.json() == {"model": "qwen3", "messages": QUESTION}  # modelMapping gpt-4o->qwen3
    assert seen.one("x-envoy-original-path") == "/v1/chat/completions"

    # "*": "" keeps any other model name as it is
    assert chat(gateway, {"model": "llama3", "messages": QUESTION})[0] == 200
    assert model.requests[1].json()["model"] == "llama3"

    # a stream: rewritten the same way, and passed back unbuffered and intact
    status, _, first, body = chat_stream(gateway, model,
                                         {"model": "gpt-4o", "messages": QUESTION})
    assert status == 200 and model.released == [True]
    stream_request = model.requests[2]
    assert stream_request.path == "/custom/v1/chat/completions"
    assert stream_request.json()["model"] == "qwen3"
    assert stream_request.json()["stream"] is True
    assert first == stream_events("qwen3")[0]
    assert events(body) == stream_events("qwen3")
    assert crashes(gateway) == 0


# -- gpustack-generic-proxy-router ---------------------------------------------------------------
ROUTER = {"prefix": "/model/proxy/", "targetHeader": "x-higress-llm-model",
          "modelKey": "model", "addProviderHeader": "x-higress-llm-provider",
          "modelToHeader": "x-higress-llm-model-final",
          "aliasNameMapping": {"qwen-alias": "qwen2.5-7b-instruct",
                               "openai-alias": "openai/gpt-4"},
          "autoRouting": {"enable": True, "defaultModel": "qwen2.5-7b-instruct",
                          "rules": [{"pattern": "(?i)\\bcode\\b", "model": "qwen2.5-coder-7b"}]}}


@pytest.fixture
def coder() -> Iterator[ModelServer]:
    server = ModelServer()
    yield server
    server.stop()


def test_generic_proxy_router_sets_the_model_headers_the_routes_match_on(
        start_gateway: Start, model: ModelServer, coder: ModelServer) -> None:
    # As in Higress, a route matching x-higress-llm-model picks the upstream: the header the
    # plugin writes from the body makes the gateway route again (Envoy clears its route cache).
    doc = gateway_doc(
        model,
        extra_clusters=f'  - name: coder\n    endpoints: ["127.0.0.1:{coder.port}"]\n',
        extra_routes=("  - name: coder-route\n    match: {headers: "
                      "{x-higress-llm-model: qwen2.5-coder-7b}}\n    cluster: coder\n"))
    gateway = start_gateway(doc + wasm_plugin("gpustack-generic-proxy-router", ROUTER))

    # body-driven autoRouting: higress/auto + "code" -> the coder model, on the coder route
    status, _, body = chat(gateway, {"model": "higress/auto", "messages": [
        {"role": "user", "content": "write some code"}]})
    assert status == 200 and json.loads(body)["model"] == "qwen2.5-coder-7b"
    [seen] = coder.requests
    assert seen.json()["model"] == "qwen2.5-coder-7b"  # body rewritten
    assert seen.one("x-higress-llm-model") == "qwen2.5-coder-7b"
    assert model.requests == []

    # body-driven provider/model split: headers get both halves, the body the model half
    assert chat(gateway, {"model": "openai/gpt-4o", "messages": QUESTION})[0] == 200
    [seen] = model.requests
    assert seen.one("x-higress-llm-model") == "openai/gpt-4o"  # unsplit
    assert seen.one("x-higress-llm-provider") == "openai"
    assert seen.one("x-higress-llm-model-final") == "gpt-4o"
    assert seen.json() == {"model": "gpt-4o", "messages": QUESTION}

    # path-driven: the alias in the path sets the headers only; the body is not touched
    status, _, _ = chat(gateway, {"model": "foo", "messages": QUESTION},
                        path="/model/proxy/openai-alias/v1/chat/completions")
    assert status == 200
    seen = model.requests[1]
    assert seen.one("x-higress-llm-model") == "openai/gpt-4"
    assert seen.one("x-higress-llm-provider") == "openai"
    assert seen.one("x-higress-llm-model-final") == "gpt-4"
    assert seen.json() == {"model": "foo", "messages": QUESTION}
    assert len(coder.requests) == 1 and crashes(gateway) == 0
