"""Token rate limiting across plugins: gpustack-rate-limit charges the tokens ai-statistics
publishes in the stream's filter state (``ai_log``), through ``wasmgate run``.

Who writes what (sources):
- gpustack-rate-limit (gpustack/gpustack-higress-plugin extensions/gpustack-rate-limit/main.go)
  checks a ``token_limits`` combination at request headers (``mode=check``, count 0; the local
  backend, backend.go ``localBackend.BatchEval``, refuses when the window's sum is ``>= quota``)
  and adds the tokens in ``onHttpStreamDone`` (``proxy_on_log``): ``readTotalTokensFromAILog``
  does ``GetProperty(["ai_log"])`` (``wrapper.AILogKey``), un-escapes it with
  ``wrapper.UnmarshalStr`` and reads ``total_token`` (``tokenusage.CtxKeyTotalToken``) with
  gjson. Nothing there: it logs ``total_token unavailable from filter state "ai_log",
  token-limits add skipped`` and charges nothing. It never parses the response itself.
- ai-statistics (alibaba/higress plugins/wasm-go/extensions/ai-statistics/main.go) runs
  ``tokenusage.GetTokenUsage`` (higress-group/wasm-go pkg/tokenusage: ``usage.total_tokens``
  -> user attribute ``total_token``) on the JSON body (``onHttpResponseBody``) or on the SSE
  chunks (at end of stream), then ``ctx.WriteUserAttributeToLogWithKey(wrapper.AILogKey)``
  (pkg/wrapper/plugin_wrapper.go): GetProperty ``ai_log``, merge, ``SetProperty(["ai_log"],
  MarshalStr(json))``. Of the 14 plugins of the wheel only ai-statistics contains ``ai_log``
  (gpustack-token-usage 0.5.1 does not write it, whatever the rate-limit README says).

So the tokens reach the limiter only if a property one plugin sets is read by another plugin
of the same stream: Envoy's per-stream filter state. Priorities as documented: ai-statistics
``200`` (Higress README), gpustack-rate-limit ``600`` (its README: it must see the response
after ai-statistics). Both phases unset (Higress's default/CUSTOM phase).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable

import pytest

from ..conftest import missing
from ..e2e.conftest import Gateway
from .higress import HigressDownloadError, higress_plugin
from .test_ai_plugins import (
    JSON_USAGE,
    QUESTION,
    STREAM_USAGE,
    ModelServer,
    chat,
    chat_stream,
    completion,
    crashes,
    gateway_doc,
    prometheus,
)

Start = Callable[..., Gateway]

JSON_TOKENS = JSON_USAGE["total_tokens"]  # 18 a completion
STREAM_TOKENS = STREAM_USAGE["total_tokens"]  # 8 a stream
# What the limiter logs in on_log: the tokens it charged, or that ai_log had none.
ACCOUNTED = re.compile(r"gpustack-rate-limit: (?:stream done, req=\S+ tokens=(\d+)"
                       r"|total_token unavailable from filter state)")
RATE_LIMIT_PRIORITY, STATISTICS_PRIORITY = 600, 200


@pytest.fixture(scope="module", autouse=True)
def plugins_downloaded() -> None:
    try:
        for name in ("ai-statistics", "gpustack-rate-limit"):
            higress_plugin(name)
    except HigressDownloadError as exc:
        missing(f"the gpustack-higress-plugins wheel could not be downloaded: {exc}")


def plugin_doc(name: str, config: dict[str, object], priority: int) -> str:
    return (f"---\napiVersion: extensions.istio.io/v1alpha1\nkind: WasmPlugin\n"
            f"metadata: {{name: {name}}}\nspec:\n  url: file://{higress_plugin(name)}\n"
            f"  priority: {priority}\n  pluginConfig: {json.dumps(config)}\n")


def token_limit(budget: int) -> dict[str, object]:
    """Local mode (no ``redis``): ``budget`` tokens an hour per consumer, tokens only."""
    return {"rule_name": "tok", "enable_on_path_suffix": ["/chat/completions"],
            "limit_combinations": [{"name": "per-consumer",
                                    "match": [{"source": "consumer", "value": "*"}],
                                    "token_limits": {"per_hour": budget}}]}


STATISTICS = {"enable_path_suffixes": ["/chat/completions"]}


def start(start_gateway: Start, model: ModelServer, budget: int, *,
          statistics: int | None = STATISTICS_PRIORITY) -> Gateway:
    """The gateway with the limiter and, at priority `statistics`, ai-statistics (None:
    without it)."""
    doc = gateway_doc(model) + plugin_doc("gpustack-rate-limit", token_limit(budget),
                                          RATE_LIMIT_PRIORITY)
    if statistics is not None:
        doc += plugin_doc("ai-statistics", STATISTICS, statistics)
    gateway = start_gateway(doc)
    status, _ = gateway.admin_post("/logging?default.gpustack-rate-limit=debug")
    assert status == 200
    return gateway


def accounted(gateway: Gateway, count: int, timeout: float = 30) -> list[int]:
    """The tokens the limiter charged in on_log for each of the first `count` streams (0: it
    found no total_token in ai_log), once `count` on_logs have run. on_log runs after the
    client has its response, so this waits (a bound, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while True:
        found = ACCOUNTED.findall(gateway.logs())
        if len(found) >= count:
            return [int(tokens or 0) for tokens in found]
        assert time.monotonic() < deadline, (
            f"{count} on_logs expected, saw {len(found)}:\n{gateway.logs()[-4000:]}")
        time.sleep(0.05)


def charged(gateway: Gateway, consumer: str) -> float:
    """gpustack_rate_limit_value_total for the token combination of `consumer` (0 if none)."""
    return sum(value for name, value in prometheus(gateway).items()
               if "gpustack_rate_limit_value_total" in name and "token_rolling" in name
               and f"consumer_{consumer}_" in name)


def ask(gateway: Gateway, consumer: str) -> tuple[int, bytes]:
    status, _, body = chat(gateway, {"model": "qwen3", "messages": QUESTION},
                           x_mse_consumer=consumer)
    return status, body


def refused(body: bytes) -> bool:
    return bool(json.loads(body)["error"]["type"] == "rate_limit_exceeded")


# -- the tokens come from ai-statistics' ai_log ----------------------------------------------
@pytest.mark.parametrize("statistics", [STATISTICS_PRIORITY, 900],
                         ids=["higress-order", "statistics-first"])
def test_token_limit_charges_the_total_token_ai_statistics_writes_to_ai_log(
        start_gateway: Start, model: ModelServer, statistics: int) -> None:
    # Two completions spend the budget exactly; the check refuses once the sum is >= quota.
    # "statistics-first" puts ai-statistics before the limiter (on_log comes after every
    # response callback either way, as in Envoy, so the order does not matter to on_log).
    gateway = start(start_gateway, model, 2 * JSON_TOKENS, statistics=statistics)

    assert ask(gateway, "alice") == (200, completion("qwen3"))
    assert accounted(gateway, 1) == [JSON_TOKENS]  # total_token from ai_log, charged
    assert ask(gateway, "alice") == (200, completion("qwen3"))  # 18 < 36: still within
    assert accounted(gateway, 2) == [JSON_TOKENS, JSON_TOKENS]
    assert charged(gateway, "alice") == 2 * JSON_TOKENS

    status, body = ask(gateway, "alice")  # 36 >= 36: spent
    assert status == 429 and refused(body), body
    assert len(model.requests) == 2  # refused at the gateway: the model never saw it
    assert re.search(r"rate limit exceeded, req=\S+ key=tok\|per-consumer\|consumer=alice\|t:",
                     gateway.logs())
    # the refused stream's on_log finds no usage (the model never answered): nothing charged
    assert accounted(gateway, 3) == [JSON_TOKENS, JSON_TOKENS, 0]

    # the budget is per consumer: bob's bucket is untouched
    assert ask(gateway, "bob") == (200, completion("qwen3"))
    assert accounted(gateway, 4) == [JSON_TOKENS, JSON_TOKENS, 0, JSON_TOKENS]
    assert charged(gateway, "bob") == JSON_TOKENS
    assert crashes(gateway) == 0


def test_token_limit_charges_the_usage_of_a_stream(start_gateway: Start,
                                                   model: ModelServer) -> None:
    # SSE: ai-statistics writes ai_log at the end of the stream, from the usage chunk
    gateway = start(start_gateway, model, 2 * STREAM_TOKENS)
    body = {"model": "qwen3", "messages": QUESTION}
    for i in range(2):
        status, _, _, _ = chat_stream(gateway, model, body, x_mse_consumer="alice")
        assert status == 200
        assert accounted(gateway, i + 1) == [STREAM_TOKENS] * (i + 1)
    assert charged(gateway, "alice") == 2 * STREAM_TOKENS
    status, _, _, answer = chat_stream(gateway, model, body, x_mse_consumer="alice")
    assert status == 429 and refused(answer), answer
    assert len(model.requests) == 2
    assert crashes(gateway) == 0


# -- control: the same limiter without ai-statistics -----------------------------------------
def test_without_ai_statistics_no_tokens_are_charged(start_gateway: Start,
                                                     model: ModelServer) -> None:
    # The upstream's usage is the same, but nothing writes ai_log: the limiter finds no
    # total_token, charges nothing and never refuses, however far past the budget.
    gateway = start(start_gateway, model, 2 * JSON_TOKENS, statistics=None)
    for i in range(5):  # 5 * 18 = 90 tokens, 2.5 times the budget
        assert ask(gateway, "alice") == (200, completion("qwen3"))
        assert accounted(gateway, i + 1) == [0] * (i + 1)  # "total_token unavailable"
    assert len(model.requests) == 5
    assert charged(gateway, "alice") == 0
    assert "rate limit exceeded" not in gateway.logs()
    assert crashes(gateway) == 0
