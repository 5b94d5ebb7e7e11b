"""Real Higress plugins in the gateway's chain, run with `wasmgate run`."""

from __future__ import annotations

import json
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
