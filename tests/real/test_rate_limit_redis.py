"""gpustack-rate-limit in Redis mode: one limit shared by two gateway processes.

The plugin builds its cluster as ``outbound|PORT||SERVICE`` (redis_init adds
``?buffer_flush_timeout=3&max_buffer_size_before_flush=1024``; redis_call uses the bare name);
``outbound|PORT||127.0.0.1`` resolves to the test Redis with no Gateway ``spec.redis`` entry.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ..conftest import missing
from ..e2e.conftest import Gateway
from ..e2e.test_gateway import gateway_doc
from ..e2e.test_redis import REDIS_SERVER, RedisServer
from .test_higress_gateway import wasm_plugin

Start = Callable[..., Gateway]
LIMIT = 3
ALICE = {"x-mse-consumer": "alice"}
EXCEEDED = "rate limit exceeded, req="



@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if REDIS_SERVER is None:
        missing("redis-server is not installed")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


def rate_limit(port: int, per_minute: int = LIMIT) -> dict[str, object]:
    return {"rule_name": "rl", "enable_on_path_suffix": ["*"],
            "redis": {"service_name": "127.0.0.1", "service_port": port},
            "limit_combinations": [{"name": "per-consumer",
                                    "match": [{"source": "consumer", "value": "*"}],
                                    "query_limits": {"per_minute": per_minute}}]}


def two_gateways(start_gateway: Start, upstream: str, redis: RedisServer) -> list[Gateway]:
    redis.command("FLUSHALL")
    config = gateway_doc(upstream) + wasm_plugin("gpustack-rate-limit", rate_limit(redis.port))
    gateways = [start_gateway(config), start_gateway(config)]
    for gateway in gateways:  # the ABI trace shows the cluster the plugin calls
        gateway.admin_post("/logging?default.gpustack-rate-limit=trace")
    return gateways


def test_count_is_shared_by_two_gateways(start_gateway: Start, upstream: str,
                                         redis: RedisServer) -> None:
    gateways = two_gateways(start_gateway, upstream, redis)
    statuses = [gateways[i % 2].get(f"/v1/models?i={i}", headers=ALICE)[0]
                for i in range(LIMIT)]
    assert statuses == [200] * LIMIT  # LIMIT requests, spread over both processes
    assert "env.proxy_redis_call(" in gateways[0].logs()
    assert "proxy_on_redis_call_response(1, " in gateways[1].logs()
    assert EXCEEDED not in gateways[0].logs() + gateways[1].logs()
    assert redis.command("DBSIZE") != b":0\r\n"  # the counters live in Redis
    # request LIMIT+1 goes to the gateway that has itself seen fewer than LIMIT requests:
    # only the shared count can reject it
    last = gateways[LIMIT % 2]
    with contextlib.suppress(TimeoutError):  # see test_request_over_the_limit_gets_429
        last.get("/v1/models?over=1", headers=ALICE, timeout=3)
    deadline = time.monotonic() + 5
    while EXCEEDED not in last.logs() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert re.search(r"rate limit exceeded, req=\S+ key=rl\|per-consumer\|consumer=alice",
                     last.logs())


def test_request_over_the_limit_gets_429(start_gateway: Start, upstream: str,
                                         redis: RedisServer) -> None:
    gateways = two_gateways(start_gateway, upstream, redis)
    for i in range(LIMIT):
        assert gateways[i % 2].get(f"/v1/models?i={i}", headers=ALICE)[0] == 200
    status, _, body = gateways[LIMIT % 2].get("/v1/models", headers=ALICE, timeout=3)
    assert status == 429, body
    assert b"rate_limit_exceeded" in body
    assert gateways[(LIMIT + 1) % 2].get("/v1/models", headers=ALICE, timeout=3)[0] == 429
    assert gateways[0].get("/v1/models", headers={"x-mse-consumer": "bob"})[0] == 200


def test_stopped_redis_does_not_take_the_gateway_down(start_gateway: Start, upstream: str,
                                                      tmp_path: Path) -> None:
    if REDIS_SERVER is None:
        missing("redis-server is not installed")
    server = RedisServer(tmp_path)
    config = gateway_doc(upstream) + wasm_plugin("gpustack-rate-limit", rate_limit(server.port))
    gateway = start_gateway(config)
    try:
        assert gateway.get("/v1/models", headers={"x-mse-consumer": "carol"})[0] == 200
    finally:
        server.stop()
    gateway.admin_post("/logging?default.gpustack-rate-limit=trace")
    # the plugin sees (11, "reset") and fails open
    assert gateway.get("/v1/models", headers={"x-mse-consumer": "carol"}, timeout=5)[0] == 200
    assert re.search(r"proxy_on_redis_call_response\(1, \d+, 1, 0\)", gateway.logs())
    assert gateway.process.poll() is None
    assert gateway.admin_get("/ready")[0] == 200
