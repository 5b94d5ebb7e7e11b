"""`wasmgate run --workers 2`: shared data (with CAS) is one store across the worker processes.

Each request opens a new connection, so the kernel (SO_REUSEPORT) spreads them over both
workers; worker 0's own request count (its admin's `/stats/worker`; /stats/prometheus sums
the workers) being < the number sent shows the other worker served some of them.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

from ..conftest import missing
from .conftest import Gateway
from .test_gateway import conformance, gateway_doc

Start = Callable[..., Gateway]
REQUESTS = 24


def get(gateway: Gateway, path: str, headers: dict[str, str] | None = None) -> int:
    """GET, retried while a worker still loads its plugin (the FAIL_CLOSE stand-in answers
    403 without running the plugin, so it changes no shared data)."""
    deadline = time.monotonic() + 30
    while True:
        status = gateway.get(path, headers=headers)[0]
        if status != 403 or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


def worker0_requests(gateway: Gateway) -> int:
    own = gateway.admin_json("/stats/worker")
    assert own["worker"] == 0, own
    return int(own["gateway"]["requests"])


def test_a_value_set_in_one_worker_is_read_in_the_other(start_gateway: Start,
                                                         upstream: str) -> None:
    steps = ["request_headers get_shared_data s:k", "request_headers set_shared_data s:k s:v 0"]
    gateway = start_gateway(gateway_doc(upstream) + conformance("shared", steps),
                            "--workers", "2")
    for i in range(REQUESTS):
        assert get(gateway, f"/r{i}") == 200
    served_by_0 = worker0_requests(gateway)
    assert 0 < served_by_0 < REQUESTS, f"worker 0 served {served_by_0} of {REQUESTS}"
    gets = re.findall(r"conf request_headers get_shared_data status=(\d+) out=(\S*) out=(\d+)",
                      gateway.logs())
    assert len(gets) == REQUESTS
    # only the very first request, whichever worker got it, misses the key ...
    assert gets[0] == ("1", "", "0")
    assert all((status, value) == ("0", "v") for status, value, _ in gets[1:])
    # ... and each request sees the CAS of the set just before it: one counter for both workers
    assert [int(cas) for _, _, cas in gets[1:]] == list(range(1, REQUESTS))


def test_cas_mismatch_across_workers(start_gateway: Start, upstream: str) -> None:
    # every request sets with cas 1: only the key's very first set (any cas is accepted for a
    # new key; it gets cas 1) and the one right after it (stored cas is 1) succeed
    steps = ["request_headers set_shared_data s:k s:v 1"]
    gateway = start_gateway(gateway_doc(upstream) + conformance("shared", steps),
                            "--workers", "2")
    for i in range(REQUESTS):
        assert get(gateway, f"/r{i}") == 200
    assert 0 < worker0_requests(gateway) < REQUESTS
    statuses = re.findall(r"conf request_headers set_shared_data status=(\d+)", gateway.logs())
    assert statuses == ["0", "0"] + ["8"] * (REQUESTS - 2)  # 8 = CAS_MISMATCH


LIMIT = 5


def local_rate_limiter(per_minute: int) -> str:
    """The Higress rate limiter in local mode (its counters in shared data), as a WasmPlugin
    document: `per_minute` requests per consumer."""
    try:
        from ..real.test_higress_gateway import wasm_plugin
        config = {"rule_name": "rl", "enable_on_path_suffix": ["*"],
                  "limit_combinations": [{"name": "per-consumer",
                                          "match": [{"source": "consumer", "value": "*"}],
                                          "query_limits": {"per_minute": per_minute}}]}
        return wasm_plugin("gpustack-rate-limit", config)
    except Exception as exc:  # the wheel comes from PyPI on first use
        missing(f"Higress plugins unavailable: {exc}")
        raise


def test_higress_rate_limit_local_mode_is_one_limit(start_gateway: Start,
                                                     upstream: str) -> None:
    plugin = local_rate_limiter(LIMIT)
    gateway = start_gateway(gateway_doc(upstream) + plugin, "--workers", "2")
    statuses = [get(gateway, f"/v1/models?i={i}", {"x-mse-consumer": "alice"})
                for i in range(REQUESTS)]
    assert 0 < worker0_requests(gateway) < REQUESTS
    # per-worker counters would let up to 2 * LIMIT through
    assert statuses == [200] * LIMIT + [429] * (REQUESTS - LIMIT)
    assert get(gateway, "/v1/models", {"x-mse-consumer": "bob"}) == 200
