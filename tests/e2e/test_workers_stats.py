"""`wasmgate run --workers 2`: the admin endpoint's stats cover every worker.

Plugin-defined metrics are one set across the workers (a memory-mapped file); the gateway and
per-plugin stats are per worker and worker 0 sums them at scrape time. Each request opens a new
connection, so the kernel (SO_REUSEPORT) spreads them over both workers (/plugins shows each
worker's stream count, which proves it).
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Callable

from .conftest import Gateway
from .test_gateway import conformance, gateway_doc

Start = Callable[..., Gateway]
REQUESTS = 24
PLUGIN = "default.counting"
# ids in each VM: the first counter is 4, the first gauge 5, the first histogram 6
STEPS = ["configure define_metric 0 s:e2e_requests_total",
         "configure define_metric 1 s:e2e_last_seen",
         "configure define_metric 2 s:e2e_sample",
         "request_headers increment_metric 4 1",
         "request_headers get_metric 4",
         "request_headers record_metric 5 42",
         "request_headers record_metric 6 12"]


def scrape(gateway: Gateway) -> str:
    status, body = gateway.admin_get("/stats/prometheus")
    assert status == 200, body
    return body.decode()


def value(text: str, series: str) -> float:
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, re.MULTILINE)
    assert match, f"no {series} in:\n{text}"
    return float(match.group(1))


def workers(gateway: Gateway) -> list[dict]:  # type: ignore[type-arg]
    return gateway.admin_json("/plugins")["workers"]  # type: ignore[no-any-return]


def start(start_gateway: Start, upstream: str) -> Gateway:
    gateway = start_gateway(gateway_doc(upstream) + conformance("counting", STEPS),
                            "--workers", "2")
    # /ready (worker 0's) waits for every worker to have started and loaded its plugins
    assert [(w["state"], [p["status"] for p in w["plugins"]]) for w in workers(gateway)] \
        == [("up", ["ready"]), ("up", ["ready"])]
    return gateway


def send(gateway: Gateway, count: int) -> None:
    for i in range(count):
        assert gateway.get(f"/r{i}")[0] == 200


def test_prometheus_covers_both_workers(start_gateway: Start, upstream: str) -> None:
    gateway = start(start_gateway, upstream)
    send(gateway, REQUESTS)
    streams = [w["plugins"][0]["streams"] for w in workers(gateway)]
    assert sum(streams) == REQUESTS and all(streams), f"streams per worker: {streams}"
    text = scrape(gateway)
    # plugin-defined metrics: one set across the workers
    assert value(text, "e2e_requests_total") == REQUESTS
    assert "# TYPE e2e_requests_total counter" in text
    assert value(text, "e2e_last_seen") == 42
    assert value(text, "e2e_sample_count") == REQUESTS
    assert value(text, "e2e_sample_sum") == 12 * REQUESTS
    assert value(text, 'e2e_sample_bucket{le="10"}') == 0
    assert value(text, 'e2e_sample_bucket{le="25"}') == REQUESTS
    # proxy_get_metric read the combined counter: each request saw the count so far
    seen = re.findall(r"conf request_headers get_metric status=0 out=(\d+)", gateway.logs())
    assert sorted(int(n) for n in seen) == list(range(1, REQUESTS + 1))
    # gateway and per-plugin stats: summed over the workers
    assert value(text, "wasmgate_requests_total") == REQUESTS
    assert value(text, 'wasmgate_responses_total{code="200"}') == REQUESTS
    assert value(text, "wasmgate_request_duration_seconds_count") == REQUESTS
    assert value(text, 'wasmgate_request_duration_seconds_bucket{le="+Inf"}') == REQUESTS
    assert value(text, f'wasmgate_plugin_streams_total{{plugin="{PLUGIN}"}}') == REQUESTS
    assert value(text, f'wasmgate_plugin_callbacks_total{{plugin="{PLUGIN}"}}') >= REQUESTS
    assert value(text, f'wasmgate_plugin_ready{{plugin="{PLUGIN}"}}') == 1
    memory = [w["plugins"][0]["memory_bytes"] for w in workers(gateway)]
    assert value(text, f'wasmgate_plugin_vm_memory_bytes{{plugin="{PLUGIN}"}}') == sum(memory)
    assert value(text, 'wasmgate_worker_up{worker="0"}') == 1
    assert value(text, 'wasmgate_worker_up{worker="1"}') == 1
    assert value(text, "wasmgate_plugin_metrics_refused") == 0
    # each worker still answers for itself
    own = gateway.admin_json("/stats/worker")
    assert own["worker"] == 0 and 0 < own["gateway"]["requests"] < REQUESTS


def test_a_stopped_or_dead_worker_does_not_break_the_scrape(start_gateway: Start,
                                                             upstream: str) -> None:
    gateway = start(start_gateway, upstream)
    send(gateway, REQUESTS)
    assert value(scrape(gateway), "wasmgate_requests_total") == REQUESTS
    pid = workers(gateway)[1]["pid"]
    os.kill(pid, signal.SIGSTOP)  # slow: worker 0 waits WORKER_TIMEOUT, then goes on
    try:
        text = scrape(gateway)
        assert value(text, 'wasmgate_worker_up{worker="1"}') == 0
        # its last numbers stay in the sums: counters never go backwards
        assert value(text, "wasmgate_requests_total") == REQUESTS
        assert value(text, "e2e_requests_total") == REQUESTS
        assert workers(gateway)[1]["state"] == "not answering"
    finally:
        os.kill(pid, signal.SIGCONT)
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while workers(gateway)[1]["state"] != "exited":
        assert time.monotonic() < deadline, workers(gateway)
        time.sleep(0.05)
    assert gateway.admin_get("/ready") == (200, b"LIVE\n")  # an exited worker is left out
    send(gateway, 5)  # all served by worker 0 now
    text = scrape(gateway)
    assert value(text, 'wasmgate_worker_up{worker="1"}') == 0
    assert value(text, "wasmgate_requests_total") == REQUESTS + 5
    assert value(text, "e2e_requests_total") == REQUESTS + 5
