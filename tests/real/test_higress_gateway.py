"""Real Higress plugins in the gateway's chain, run with `wasmgate run`."""

from __future__ import annotations

import http.client
import http.server
import json
import threading
from collections.abc import Callable

from ..e2e.conftest import Gateway
from ..e2e.test_gateway import gateway_doc, header_values
from .higress import higress_plugin

Start = Callable[..., Gateway]


def wasm_plugin(name: str, config: dict[str, object], phase: str | None = None) -> str:
    doc = (f"---\napiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\n"
           f"metadata: {{name: {name}}}\nspec:\n  url: file://{higress_plugin(name)}\n"
           f"  pluginConfig: {json.dumps(config)}\n")
    return doc + (f"  phase: {phase}\n" if phase else "")


TRANSFORMER = {"reqRules": [{"operate": "add", "headers": [{"key": "x-added", "value": "v1"}]},
                            {"operate": "map", "mapSource": "body",
                             "headers": [{"fromKey": "model", "toKey": "x-model"}]}],
               "respRules": [{"operate": "add", "headers": [{"key": "x-resp", "value": "r1"}]}]}


def test_transformer_in_the_gateway(start_gateway: Start, upstream: str) -> None:
    gateway = start_gateway(gateway_doc(upstream) + wasm_plugin("transformer", TRANSFORMER))
    status, headers, body = gateway.request("POST", "/v1/chat", body=b'{"model": "qwen"}',
                                            headers={"content-type": "application/json"})
    assert status == 200
    echo = json.loads(body)
    assert header_values(echo, "x-added") == ["v1"]
    assert header_values(echo, "x-model") == ["qwen"]
    assert echo["body"] == '{"model": "qwen"}'
    assert headers["x-resp"] == "r1"


MASKING = {"deny_openai": True, "system_deny": False, "deny_words": ["secretword"],
           "replace_roles": [{"regex": "%{MOBILE}", "type": "replace", "value": "****"}]}


def test_ai_data_masking_rewrites_and_reframes(start_gateway: Start, upstream: str) -> None:
    gateway = start_gateway(gateway_doc(upstream) + wasm_plugin("ai-data-masking", MASKING))
    payload = json.dumps({"messages": [{"role": "user", "content": "call 13800138000"}]})
    status, _, body = gateway.request("POST", "/v1/chat/completions", body=payload.encode(),
                                      headers={"content-type": "application/json"})
    assert status == 200
    echo = json.loads(body)
    forwarded = json.loads(echo["body"])
    assert forwarded["messages"][0]["content"] == "call ****"
    lengths = header_values(echo, "content-length")
    assert lengths == [str(len(echo["body"].encode()))]  # the true length of the new body
    status, _, body = gateway.request(
        "POST", "/v1/chat/completions", headers={"content-type": "application/json"},
        body=json.dumps({"messages": [{"role": "user", "content": "the secretword"}]}).encode())
    assert status == 200
    assert json.loads(body)["choices"][0]["message"]["role"] == "assistant"


class _ModelReply(http.server.BaseHTTPRequestHandler):
    """An OpenAI-shaped answer that holds a deny word, with its content-length."""

    protocol_version = "HTTP/1.1"
    reply = json.dumps({"id": "c1", "object": "chat.completion", "choices": [{
        "index": 0, "finish_reason": "stop",
        "message": {"role": "assistant", "content": "the secretword is 42"}}]}).encode()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(self.reply)))
        self.end_headers()
        self.wfile.write(self.reply)

    def log_message(self, *args: object) -> None:
        pass


def test_ai_data_masking_rewrites_and_reframes_the_response(start_gateway: Start) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ModelReply)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        model = f"127.0.0.1:{server.server_address[1]}"
        gateway = start_gateway(gateway_doc(model) + wasm_plugin("ai-data-masking", MASKING))
        conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=10)
        payload = json.dumps({"messages": [{"role": "user", "content": "hello"}]}).encode()
        conn.request("POST", "/v1/chat/completions", body=payload,
                     headers={"content-type": "application/json"})
        response = conn.getresponse()
        body = response.read()  # http.client checks the framing: length or chunks
        assert response.status == 200
        length, chunked = response.getheader("content-length"), response.getheader(
            "transfer-encoding")
        assert (length is not None and int(length) == len(body)) or chunked == "chunked"
        assert len(body) != len(_ModelReply.reply)  # rewritten, so the old length is wrong
        assert b"secretword" not in body
        rewritten = json.loads(body)
        assert rewritten["choices"][0]["message"]["role"] == "assistant"
        # the same connection still works: the rewritten reply was framed right
        conn.request("POST", "/v1/chat/completions", body=payload,
                     headers={"content-type": "application/json"})
        again = conn.getresponse()
        assert again.status == 200 and b"secretword" not in again.read()
        conn.close()
    finally:
        server.shutdown()
        server.server_close()
