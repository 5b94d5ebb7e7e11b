"""Higress redis_init / redis_call through a real `wasmgate run` and a real redis-server."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from wasmgate.api.gateway import Gateway as GatewayResource
from wasmgate.gateway.host import GatewayHost
from wasmgate.gateway.redis import RedisTarget, command, reply_end

from ..conftest import missing
from .conftest import Gateway, free_port
from .test_gateway import conformance, gateway_doc

Start = Callable[..., Gateway]
REDIS_SERVER = shutil.which("redis-server")
needs_redis = pytest.mark.skipif(REDIS_SERVER is None,
                                 reason="redis-server not installed (scripts/install-test-deps)")



class RedisServer:
    """A throwaway redis-server on 127.0.0.1 (no persistence)."""

    def __init__(self, workdir: Path, password: str | None = None) -> None:
        self.port = free_port()
        self.password = password
        args = [str(REDIS_SERVER), "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(workdir)]
        if password:
            args += ["--requirepass", password]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.command("PING")
                return
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.stop()
                    raise
                time.sleep(0.05)

    def command(self, *args: str, db: int = 0) -> bytes:
        """One command (after AUTH / SELECT as needed); the raw reply."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            setup = []
            if self.password:
                setup.append(command("AUTH", self.password))
            if db:
                setup.append(command("SELECT", str(db)))
            replies = b""
            sock.sendall(b"".join(setup) + command(*args))
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    raise OSError("redis closed the connection")
                replies += chunk
                pos = 0
                for _ in range(len(setup) + 1):
                    end = reply_end(replies, pos)
                    if end is None:
                        break
                    last, pos = replies[pos:end], end
                else:
                    return last

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if REDIS_SERVER is None:
        missing("redis-server is not installed")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


def esc(data: bytes) -> str:
    """The conformance plugin's escaping (its `s:` arguments decode it; its logs use it)."""
    safe = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._~/:-"
    return "".join(chr(b) if b in safe else f"%{b:02X}" for b in data)


def cluster(port: int, options: str = "") -> str:
    return f"outbound|{port}||localhost" + options


def redis_steps(name: str, query: bytes, user: str = "", password: str = "",
                timeout_ms: int = 500) -> list[str]:
    arg = esc(name.encode())
    return [f"configure redis_init s:{arg} s:{esc(user.encode())} s:{esc(password.encode())} "
            f"{timeout_ms}",
            f"request_headers redis_call s:{arg} s:{esc(query)}",
            "redis_call_response get_buffer_bytes 9 0 1000",
            "redis_call_response get_status"]


def wait_for_log(gateway: Gateway, pattern: str, timeout: float = 10) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while True:
        found = re.search(pattern, gateway.logs())
        if found or time.monotonic() > deadline:
            assert found, f"{pattern!r} not in logs:\n{gateway.logs()[-4000:]}"
            return found
        time.sleep(0.05)


@needs_redis
def test_redis_call_reply_reaches_the_plugin(start_gateway: Start, upstream: str,
                                             redis: RedisServer) -> None:
    redis.command("SET", "greeting", "hello redis")
    steps = redis_steps(cluster(redis.port, "?buffer_flush_timeout=3"),
                        command("GET", "greeting"))
    gateway = start_gateway(gateway_doc(upstream) + conformance("r", steps))
    assert "conf configure redis_init status=0" in gateway.logs()
    assert gateway.get("/")[0] == 200
    wait_for_log(gateway, r"enter redis_call_response \d+ \d+ 0 18\b")
    wait_for_log(gateway, "conf redis_call_response get_buffer_bytes status=0 out="
                 + re.escape(esc(b"$11\r\nhello redis\r\n")))
    wait_for_log(gateway, "conf redis_call_response get_status status=0 out=0 out=\n")


@needs_redis
def test_redis_call_array_reply_and_database_option(start_gateway: Start, upstream: str,
                                                    redis: RedisServer) -> None:
    query = command("EVAL", "redis.call('SET', KEYS[1], ARGV[1]); "
                    "return {redis.call('INCR', KEYS[2]), {KEYS[1], 'x'}, false}",
                    "2", "k3", "n3", "v3")
    steps = redis_steps(cluster(redis.port, "?database=3"), query)
    steps[1] = f"request_headers redis_call s:{esc(cluster(redis.port).encode())} s:{esc(query)}"
    gateway = start_gateway(gateway_doc(upstream) + conformance("r", steps))
    assert gateway.get("/")[0] == 200
    reply = b"*3\r\n:1\r\n*2\r\n$2\r\nk3\r\n$1\r\nx\r\n$-1\r\n"
    wait_for_log(gateway, "conf redis_call_response get_buffer_bytes status=0 out="
                 + re.escape(esc(reply)))
    assert redis.command("GET", "k3", db=3) == b"$2\r\nv3\r\n"
    assert redis.command("EXISTS", "k3") == b":0\r\n"  # not in database 0


@needs_redis
def test_redis_auth(start_gateway: Start, upstream: str, tmp_path: Path) -> None:
    server = RedisServer(tmp_path, password="s3cret")
    try:
        server.command("SET", "k", "v")
        good = redis_steps(cluster(server.port), command("GET", "k"), "default", "s3cret")
        bad = redis_steps(cluster(server.port, "?x=1"), command("GET", "k"), "", "wrong")
        gateway = start_gateway(gateway_doc(upstream) + conformance("good", good)
                                + conformance("bad", bad))
        assert gateway.get("/")[0] == 200
        wait_for_log(gateway, "get_buffer_bytes status=0 out=" + re.escape(esc(b"$1\r\nv\r\n")))
        # a refused AUTH is a failed call for that plugin only
        wait_for_log(gateway, r"enter redis_call_response \d+ \d+ 1 0\b")
        wait_for_log(gateway, "get_status status=0 out=11 out=reset")
    finally:
        server.stop()


@needs_redis
def test_stopped_redis_fails_the_call_and_gateway_keeps_serving(
        start_gateway: Start, upstream: str, tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    try:
        steps = redis_steps(cluster(server.port), command("PING"), timeout_ms=300)
        gateway = start_gateway(gateway_doc(upstream) + conformance("r", steps))
        assert gateway.get("/")[0] == 200
        wait_for_log(gateway, "get_buffer_bytes status=0 out=" + re.escape(esc(b"+PONG\r\n")))
    finally:
        server.stop()
    for _ in range(3):
        assert gateway.get("/after")[0] == 200
    wait_for_log(gateway, r"enter redis_call_response \d+ \d+ 1 0\b")
    wait_for_log(gateway, "conf redis_call_response get_status status=0 out=11 out=reset")
    assert gateway.process.poll() is None


@needs_redis
def test_hung_redis_times_out(start_gateway: Start, upstream: str) -> None:
    with socket.socket() as silent:  # accepts connections (backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        steps = redis_steps(cluster(silent.getsockname()[1]), command("PING"), timeout_ms=200)
        gateway = start_gateway(gateway_doc(upstream) + conformance("r", steps))
        started = time.monotonic()
        assert gateway.get("/")[0] == 200
        wait_for_log(gateway, "conf redis_call_response get_status status=0 out=11 out=reset")
        assert time.monotonic() - started < 5


@pytest.mark.parametrize("reply", [b"+OK\r\n", b"-ERR x\r\n", b":-5\r\n", b"$-1\r\n",
                                   b"$0\r\n\r\n", b"$4\r\na\r\nb\r\n", b"*-1\r\n",
                                   b"*2\r\n*1\r\n$1\r\n*\r\n:1\r\n", b"%1\r\n+k\r\n_\r\n"])
def test_reply_framer_finds_the_end_incrementally(reply: bytes) -> None:
    assert reply_end(reply) == len(reply)
    assert reply_end(reply + b"+next\r\n") == len(reply)
    assert all(reply_end(reply[:i]) is None for i in range(len(reply)))


def test_unknown_cluster_is_bad_argument(start_gateway: Start, upstream: str) -> None:
    steps = ["configure redis_init s:not-a-redis-cluster s: s: 100",
             "request_headers redis_call s:not-a-redis-cluster s:x"]
    gateway = start_gateway(gateway_doc(upstream) + conformance("r", steps))
    assert "conf configure redis_init status=2" in gateway.logs()
    assert gateway.get("/")[0] == 200
    wait_for_log(gateway, "conf request_headers redis_call status=2")


def test_gateway_redis_entries_supply_credentials() -> None:
    resource = GatewayResource.model_validate({
        "metadata": {"name": "g"},
        "spec": {"redis": [{"name": "cache", "address": "127.0.0.1:7000",
                            "username": "u", "password": "p"}]}})
    host = GatewayHost.__new__(GatewayHost)  # only the resolver is exercised
    host.resolve_redis = resource.resolve_redis
    assert host._redis_target("cache?database=2", "", "", 0) == (
        RedisTarget("127.0.0.1", 7000, "u", "p", 2), 1.0)
    assert host._redis_target("cache", "me", "mine", 250) == (
        RedisTarget("127.0.0.1", 7000, "me", "mine", 0), 0.25)
    assert host._redis_target("outbound|6380||redis.local", "", "", 0)[0] == RedisTarget(
        "redis.local", 6380)
