"""The 14 plugins of gpustack-higress-plugins (13 Go, 1 Rust) through the emulator."""

from __future__ import annotations

import json

import pytest

from wasmgate.testing import Action, Emulator

from .higress import HIGRESS_PLUGIN_NAMES, higress_plugin

ROUTE = {"route_name": "route-a", "cluster_name": "outbound|80||backend.default"}

# Plugins that reject an empty configuration get the smallest documented one.
START_CONFIGS: dict[str, dict[str, object]] = {
    "transformer": {"reqRules": [{"operate": "add",
                                  "headers": [{"key": "x-added", "value": "v1"}]}]},
    "gpustack-set-header-pre-route": {"routeNameHeader": "x-route"},
    "gpustack-lb-session-affinity": {"sessionKeys": [{"header": "x-session-id"}]},
}


def emulator(name: str, config: object, **kwargs: object) -> Emulator:
    return Emulator(higress_plugin(name), plugin_config=json.dumps(config), name=name,
                    properties=dict(ROUTE), **kwargs).start()  # type: ignore[arg-type]


def header(pairs: list[tuple[bytes, bytes]], name: str) -> str | None:
    return next((v.decode() for k, v in pairs if k == name.encode()), None)


def test_there_are_fourteen() -> None:
    assert len(HIGRESS_PLUGIN_NAMES) == 14


@pytest.mark.parametrize("name", HIGRESS_PLUGIN_NAMES)
def test_every_plugin_starts_and_serves_a_request(name: str) -> None:
    plugin = emulator(name, START_CONFIGS.get(name, {}))
    assert plugin.plugin.module.abi == "0_2_100"
    stream = plugin.http_context()
    stream.request_headers({":path": "/v1/models", ":method": "GET", ":authority": "api.local",
                            ":scheme": "http", "x-request-id": "req-1"}, end_of_stream=True)
    if stream.local_response is None:
        stream.response_headers({":status": "200", "content-type": "application/json"},
                                end_of_stream=True)
    stream.complete()
    assert not plugin.failed, plugin.logs()
    assert plugin.crashes == []


def test_transformer_adds_maps_body_and_response_headers() -> None:
    config = {"reqRules": [{"operate": "add", "headers": [{"key": "x-added", "value": "v1"}]},
                           {"operate": "map", "mapSource": "body",
                            "headers": [{"fromKey": "model", "toKey": "x-model"}]}],
              "respRules": [{"operate": "add", "headers": [{"key": "x-resp", "value": "r1"}]}]}
    plugin = emulator("transformer", config)
    stream = plugin.http_context()
    action = stream.request_headers({":path": "/v1/chat", ":method": "POST",
                                     ":authority": "api.local",
                                     "content-type": "application/json"})
    assert action == Action.PAUSE  # it needs the body: true StopIteration under 0_2_100
    assert stream.request_body(b'{"model": "qwen"}', end_of_stream=True) == Action.CONTINUE
    assert header(stream.request_headers_now, "x-added") == "v1"
    assert header(stream.request_headers_now, "x-model") == "qwen"
    stream.response_headers({":status": "200"}, end_of_stream=True)
    assert header(stream.response_headers_now, "x-resp") == "r1"


def test_transformer_without_rules_rejects_its_configuration() -> None:
    with pytest.raises(Exception, match="configuration rejected") as info:
        emulator("transformer", {})
    assert "transformer rule not exist" in str(info.value)


IP_ACL = {"realIPHeader": "x-forwarded-for",
          "consumers": {"alice": {"deniedCidrs": ["10.0.0.0/8"]},
                        "*": {"allowedCidrs": ["0.0.0.0/0"]}}}


@pytest.mark.parametrize(("client", "denied"), [("10.1.2.3", True), ("192.168.1.1", False)])
def test_ip_acl_by_forwarded_for(client: str, denied: bool) -> None:
    plugin = emulator("gpustack-ip-acl", IP_ACL)
    stream = plugin.http_context()
    stream.request_headers({":path": "/v1", ":method": "GET", ":authority": "api.local",
                            "x-mse-consumer": "alice", "x-forwarded-for": client},
                           end_of_stream=True)
    if denied:
        response = stream.local_response
        assert response is not None
        assert response.status == 403
        assert response.details == "gpustack.ip.acl.rejected"
        assert json.loads(response.body) == {"message": "Client IP denied for this API key"}
    else:
        assert stream.local_response is None


def test_ip_acl_by_source_address() -> None:
    config = {"consumers": {"*": {"deniedCidrs": ["10.0.0.0/8"]}}}
    plugin = emulator("gpustack-ip-acl", config)
    denied = plugin.http_context({"source.address": "10.9.9.9:40000"})
    request = {":path": "/", ":method": "GET", ":authority": "a", "x-mse-consumer": "bob"}
    denied.request_headers(request, True)
    allowed = plugin.http_context({"source.address": "172.16.0.1:40000"})
    allowed.request_headers(request, True)
    assert denied.local_response is not None and denied.local_response.status == 403
    assert allowed.local_response is None


def test_rate_limit_local_mode_allows_n_then_429() -> None:
    config = {"rule_name": "rl", "enable_on_path_suffix": ["*"],
              "limit_combinations": [{"name": "per-consumer",
                                      "match": [{"source": "consumer", "value": "*"}],
                                      "query_limits": {"per_minute": 2}}]}
    plugin = emulator("gpustack-rate-limit", config)
    statuses = []
    for _ in range(4):
        stream = plugin.http_context()
        stream.request_headers({":path": "/v1/chat", ":method": "GET", ":authority": "a",
                                "x-mse-consumer": "alice"}, end_of_stream=True)
        response = stream.local_response
        statuses.append(response.status if response else 200)
        if response is None:
            stream.response_headers({":status": "200"}, end_of_stream=True)
        stream.complete()
    assert statuses == [200, 200, 429, 429]
    assert "using local (per-instance) rate limiting mode" in " ".join(plugin.logs())
    assert any(key.startswith(b"rl|per-consumer|consumer=alice") for key in plugin.shared_data)
    limited = [v for k, v in plugin.metrics().items() if k.endswith("result.limited")]
    assert limited == [2]


MASKING = {"deny_openai": True, "system_deny": False, "deny_words": ["secretword"],
           "replace_roles": [{"regex": "%{MOBILE}", "type": "replace", "value": "****"},
                             {"regex": "%{EMAILLOCALPART}@", "type": "replace",
                              "value": "****@"}]}


def _chat(text: str) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": text}]}).encode()


def test_ai_data_masking_masks_request_body_and_drops_content_length() -> None:
    plugin = emulator("ai-data-masking", MASKING)
    stream = plugin.http_context()
    body = _chat("call 13800138000 or mail alice@example.com")
    action = stream.request_headers({":path": "/v1/chat/completions", ":method": "POST",
                                     ":authority": "a", "content-type": "application/json",
                                     "content-length": str(len(body))})
    assert action == Action.PAUSE
    assert header(stream.request_headers_now, "content-length") is None
    assert stream.request_body(body, end_of_stream=True) == Action.CONTINUE
    masked = json.loads(stream.request_body_now)["messages"][0]["content"]
    assert masked == "call **** or mail ****@example.com"


def test_ai_data_masking_rewrites_a_response_with_a_deny_word() -> None:
    plugin = emulator("ai-data-masking", MASKING)
    stream = plugin.http_context()
    stream.request_headers({":path": "/v1/chat/completions", ":method": "POST",
                            ":authority": "a", "content-type": "application/json"})
    stream.request_body(_chat("hello"), end_of_stream=True)
    reply = json.dumps({"choices": [{"index": 0, "message": {
        "role": "assistant", "content": "the secretword is 42"}}]}).encode()
    stream.response_headers({":status": "200", "content-type": "application/json",
                             "content-length": str(len(reply))})
    assert header(stream.response_headers_now, "content-length") is None  # re-framed
    assert stream.response_body(reply, end_of_stream=True) == Action.CONTINUE
    rewritten = json.loads(stream.response_body_now)
    assert "secretword" not in stream.response_body_now.decode()
    assert rewritten["choices"][0]["message"]["role"] == "assistant"


def test_ai_data_masking_denies_a_deny_word_with_an_openai_shaped_reply() -> None:
    plugin = emulator("ai-data-masking", MASKING)
    stream = plugin.http_context()
    stream.request_headers({":path": "/v1/chat/completions", ":method": "POST",
                            ":authority": "a", "content-type": "application/json"})
    stream.request_body(_chat("tell me the secretword"), end_of_stream=True)
    response = stream.local_response
    assert response is not None
    reply = json.loads(response.body)
    assert reply["choices"][0]["message"]["role"] == "assistant"
    assert "custom deny word secretword matched" in " ".join(plugin.logs())


def test_ai_data_masking_rejects_a_bad_config() -> None:
    with pytest.raises(Exception, match="cannot parse plugin configuration JSON"):
        Emulator(higress_plugin("ai-data-masking"), plugin_config=b"{not json").start()
