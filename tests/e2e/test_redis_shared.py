"""`spec.sharedData: redis://...`: two `wasmgate run` processes (gateway replicas) with the same
Gateway document share plugin shared data (with CAS) through a real redis-server."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ..conftest import missing
from .conftest import WASMGATE, Gateway, free_port
from .test_gateway import conformance, gateway_doc
from .test_redis import REDIS_SERVER, RedisServer
from .test_shared_workers import local_rate_limiter

Start = Callable[..., Gateway]
REQUESTS = 12
GET_LOG = r"conf request_headers get_shared_data status=(\d+) out=(\S*) out=(\d+)"
SET_LOG = r"conf request_headers set_shared_data status=(\d+)"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if REDIS_SERVER is None:
        missing("redis-server is not installed")
    try:
        import redis  # noqa: F401  (the `redis` extra, in `test`)
    except ImportError:
        missing("the redis client is not installed (pip install -e '.[test]')")
    started = RedisServer(tmp_path_factory.mktemp("redis"))
    yield started
    started.stop()


def shared_doc(upstream: str, port: int) -> str:
    return gateway_doc(upstream, extra=f"  sharedData: redis://127.0.0.1:{port}/0\n")


def two_gateways(start_gateway: Start, config: str, *args: str) -> list[Gateway]:
    return [start_gateway(config, *args), start_gateway(config, *args)]


def get(gateway: Gateway, path: str, headers: dict[str, str] | None = None) -> int:
    """GET, retried while the plugin still loads (its FAIL_CLOSE stand-in answers 403 without
    running the plugin, so it changes no shared data)."""
    deadline = time.monotonic() + 30
    while True:
        status = gateway.get(path, headers=headers)[0]
        if status != 403 or time.monotonic() > deadline:
            return status
        time.sleep(0.05)


def in_request_order(gateways: list[Gateway], pattern: str) -> list[object]:
    """The matches of `pattern` in each gateway's log, merged as request i went to i % 2."""
    found = [re.findall(pattern, g.logs()) for g in gateways]
    assert sum(map(len, found)) == REQUESTS, found
    return [found[i % 2][i // 2] for i in range(REQUESTS)]


def test_a_value_set_in_one_gateway_is_read_in_the_other(
        start_gateway: Start, upstream: str, server: RedisServer) -> None:
    server.command("FLUSHALL")
    steps = ["request_headers get_shared_data s:k", "request_headers set_shared_data s:k s:v 0"]
    gateways = two_gateways(start_gateway, shared_doc(upstream, server.port)
                            + conformance("shared", steps))
    for i in range(REQUESTS):
        assert get(gateways[i % 2], f"/r{i}") == 200
    gets = in_request_order(gateways, GET_LOG)
    assert gets[0] == ("1", "", "0")  # the first request, on gateway 0, finds nothing ...
    # ... every later one, on either gateway, reads the value and the CAS of the set before it
    assert gets[1:] == [("0", "v", str(i)) for i in range(1, REQUESTS)]
    assert server.command("HGET", "wasmgate:shared:0::k", "v") == b"$1\r\nv\r\n"
    counter = str(REQUESTS).encode()
    assert server.command("GET", "wasmgate:shared:cas") == b"$2\r\n" + counter + b"\r\n"


def test_cas_mismatch_across_gateways(start_gateway: Start, upstream: str,
                                      server: RedisServer) -> None:
    server.command("FLUSHALL")
    # only the key's very first set (a new key accepts any cas; it gets cas 1) and the one
    # right after it (the stored cas is 1) succeed, whichever gateway makes them
    steps = ["request_headers set_shared_data s:k s:v 1"]
    gateways = two_gateways(start_gateway, shared_doc(upstream, server.port)
                            + conformance("shared", steps))
    for i in range(REQUESTS):
        assert get(gateways[i % 2], f"/r{i}") == 200
    statuses = in_request_order(gateways, SET_LOG)
    assert statuses == ["0", "0"] + ["8"] * (REQUESTS - 2)  # 8 = CAS_MISMATCH


def test_workers_of_replicas_connect_themselves(start_gateway: Start, upstream: str,
                                                server: RedisServer) -> None:
    server.command("FLUSHALL")
    steps = ["request_headers get_shared_data s:k", "request_headers set_shared_data s:k s:v 0"]
    config = shared_doc(upstream, server.port) + conformance("shared", steps)
    gateways = two_gateways(start_gateway, config, "--workers", "2")
    for i in range(REQUESTS):
        assert get(gateways[i % 2], f"/r{i}") == 200
    cas = sorted(int(c) for g in gateways for _, _, c in re.findall(GET_LOG, g.logs()))
    assert cas == list(range(REQUESTS))  # 0: the miss; then one counter for all four workers
    assert "plugin shared data in Redis redis://127.0.0.1" in gateways[0].logs()


LIMIT = 5


def test_higress_rate_limit_local_mode_is_one_limit_across_gateways(
        start_gateway: Start, upstream: str, server: RedisServer) -> None:
    server.command("FLUSHALL")
    plugin = local_rate_limiter(LIMIT)
    gateways = two_gateways(start_gateway, shared_doc(upstream, server.port) + plugin)
    alice = {"x-mse-consumer": "alice"}
    statuses = [get(gateways[i % 2], f"/v1/models?i={i}", alice) for i in range(REQUESTS)]
    # a store per gateway would let up to 2 * LIMIT through
    assert statuses == [200] * LIMIT + [429] * (REQUESTS - LIMIT)
    assert get(gateways[1], "/v1/models", {"x-mse-consumer": "bob"}) == 200
    assert server.command("DBSIZE") != b":0\r\n"  # the counters live in Redis


def _redis_on(port: int, workdir: Path) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [str(REDIS_SERVER), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    return process


def test_redis_outage_fails_the_calls_and_the_gateway_recovers(
        start_gateway: Start, upstream: str, server: RedisServer, tmp_path: Path) -> None:
    port = free_port()
    process = _redis_on(port, tmp_path)
    try:
        steps = ["request_headers set_shared_data s:k s:v 0",
                 "request_headers get_shared_data s:k"]
        gateway = start_gateway(shared_doc(upstream, port) + conformance("shared", steps))
        assert get(gateway, "/up") == 200
        process.terminate()
        process.wait(10)
        started = time.monotonic()
        for i in range(5):
            assert gateway.get(f"/down{i}")[0] == 200
        assert time.monotonic() - started < 3
        process = _redis_on(port, tmp_path)
        deadline = time.monotonic() + 10
        while True:
            assert gateway.get("/again")[0] == 200
            if re.findall(SET_LOG, gateway.logs())[-1] == "0":
                break
            assert time.monotonic() < deadline, gateway.logs()[-3000:]
            time.sleep(0.2)
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(10)
    logs = gateway.logs()
    sets = re.findall(SET_LOG, logs)
    assert sets[0] == "0" and "10" in sets  # 10 = INTERNAL_FAILURE while Redis was down
    assert re.search(r"get_shared_data status=1 ", logs)  # NOT_FOUND while down
    assert logs.count("unreachable") == 1  # rate-limited
    assert "answers again" in logs
    assert gateway.process.poll() is None


def test_password_is_used_and_never_shown(start_gateway: Start, upstream: str,
                                          server: RedisServer, tmp_path: Path) -> None:
    secured = RedisServer(tmp_path, password="pa55word")
    try:
        steps = ["request_headers set_shared_data s:k s:v 0",
                 "request_headers get_shared_data s:k"]
        config = gateway_doc(upstream, extra=f"  sharedData: redis://:pa55word@127.0.0.1:"
                                             f"{secured.port}/4\n")
        gateway = start_gateway(config + conformance("shared", steps))
        assert get(gateway, "/") == 200
        assert re.findall(GET_LOG, gateway.logs()) == [("0", "v", "1")]
        assert secured.command("HGET", "wasmgate:shared:0::k", "v", db=4) == b"$1\r\nv\r\n"
        dumped = gateway.admin_json("/config_dump")["gateway"]["spec"]["sharedData"]
        assert dumped == f"redis://:[redacted]@127.0.0.1:{secured.port}/4"
        assert "pa55word" not in gateway.logs()
    finally:
        secured.stop()


def test_bad_shared_data_url_refuses_to_start(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("apiVersion: wasmgate.io/v1alpha1\nkind: Gateway\nmetadata: {name: g}\n"
                      "spec:\n  sharedData: http://:hunter2@127.0.0.1:6379\n")
    done = subprocess.run([str(WASMGATE), "run", "-c", str(config), "--listen",
                           f"127.0.0.1:{free_port()}", "--admin", f"127.0.0.1:{free_port()}"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "spec.sharedData" in done.stderr
    assert "redis:// or rediss://" in done.stderr
    assert "hunter2" not in done.stderr
