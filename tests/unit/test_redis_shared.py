"""RedisSharedData: cpp-host's shared-data semantics in a real redis-server, the same as the
in-process and mmap stores (one set of property tests runs against all three), across
processes, and through a Redis outage."""

from __future__ import annotations

import logging
import pickle
import random
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from wasmgate.api.gateway import parse_shared_data_url, redact_url
from wasmgate.gateway.shared_store import ProcessSharedData
from wasmgate.runtime.abi import Status
from wasmgate.runtime.shared import SharedDataStore

from ..conftest import missing
from ..e2e.conftest import free_port
from ..e2e.test_redis import REDIS_SERVER, RedisServer
from .api.helpers import load_docs
from .test_shared_store import assert_no_lost_cas_updates

try:  # the `redis` extra (in `test`)
    import redis

    from wasmgate.gateway.redis_shared import RedisSharedData
except ImportError:  # pragma: no cover - scripts/test installs it
    redis = None


@pytest.fixture(autouse=True)
def _client() -> None:
    if redis is None:
        missing("the redis client is not installed (pip install -e '.[test]')")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    if REDIS_SERVER is None:
        missing("redis-server is not installed")
    started = RedisServer(tmp_path_factory.mktemp("redis"))
    yield started
    started.stop()


def url(port: int, **options: str) -> str:
    """A URL with a prefix of its own, so that every test starts from an empty store."""
    options.setdefault("prefix", f"t{uuid.uuid4().hex[:8]}:")
    return f"redis://127.0.0.1:{port}/0?" + "&".join(f"{k}={v}" for k, v in options.items())


@pytest.fixture
def rstore(server: RedisServer) -> Iterator[Any]:
    store = RedisSharedData(url(server.port))
    yield store
    store.close()


@pytest.fixture(params=["in-process", "mmap", "redis"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SharedDataStore]:
    """Each backend, empty."""
    if request.param == "in-process":
        yield SharedDataStore()
    elif request.param == "mmap":
        store = ProcessSharedData.create(str(tmp_path), slots=256, arena_bytes=8 << 20,
                                         max_value=2 << 20)
        yield store
        store.close()
        store.unlink()
    else:
        store = RedisSharedData(url(request.getfixturevalue("server").port))
        yield store
        store.close()


# -- the same semantics on every backend --------------------------------------------------------

def test_missing_key_is_none(any_store: SharedDataStore) -> None:
    assert any_store.get("vm", b"k") is None
    assert any_store.keys("vm") == [] and any_store.snapshot("vm") == {}


def test_set_get_and_cas_rules(any_store: SharedDataStore) -> None:
    store = any_store
    assert store.set("vm", b"k", b"v1", 12345) == Status.OK  # a new key accepts any cas
    value, cas1 = store.get("vm", b"k")  # type: ignore[misc]
    assert value == b"v1" and cas1 != 0
    assert store.set("vm", b"k", b"v2", cas1 + 1) == Status.CAS_MISMATCH
    assert store.get("vm", b"k") == (b"v1", cas1)  # unchanged by the refused set
    assert store.set("vm", b"k", b"v2", cas1) == Status.OK
    value, cas2 = store.get("vm", b"k")  # type: ignore[misc]
    assert value == b"v2" and cas2 not in (0, cas1)
    assert store.set("vm", b"k", b"v3", cas1) == Status.CAS_MISMATCH  # stale cas
    assert store.set("vm", b"k", b"v3", 0) == Status.OK  # cas 0: unconditional
    assert store.get("vm", b"k")[0] == b"v3"  # type: ignore[index]


def test_one_cas_counter_across_keys_and_vm_ids(any_store: SharedDataStore) -> None:
    seen = []
    for vm_id, key in [("a", b"x"), ("b", b"x"), ("a", b"y"), ("a", b"x")]:
        assert any_store.set(vm_id, key, b"v", 0) == Status.OK
        seen.append(any_store.get(vm_id, key)[1])  # type: ignore[index]
    assert seen == sorted(seen) and len(set(seen)) == 4 and 0 not in seen


def test_namespaced_by_vm_id(any_store: SharedDataStore) -> None:
    store = any_store
    for vm_id, value in [("one", b"1"), ("two", b"2"), ("", b"3"), ("on", b"4")]:
        store.set(vm_id, b"k" if vm_id != "on" else b"ek", value, 0)
    assert store.get("one", b"k")[0] == b"1"  # type: ignore[index]
    assert store.get("two", b"k")[0] == b"2"  # type: ignore[index]
    assert store.get("", b"k")[0] == b"3"  # type: ignore[index]
    assert store.get("on", b"ek")[0] == b"4"  # type: ignore[index]
    assert store.get("on", b"e:k") is None
    assert store.snapshot("one") == {b"k": b"1"} and store.snapshot("on") == {b"ek": b"4"}


BINARY = [b"", b"\x00", bytes(range(256)), b"\r\n$-1\r\n*2\r\n", "ключ €".encode(),
          b"\xff\xfe" * 1000]


def test_binary_keys_values_and_vm_ids(any_store: SharedDataStore) -> None:
    vm_ids = ["", "vm:with:colons", "a*", "a[b]", "\\", "émoji-🙂"]
    for i, vm_id in enumerate(vm_ids):
        for j, data in enumerate(BINARY):
            assert any_store.set(vm_id, data, data + bytes([i, j]), 0) == Status.OK
    for i, vm_id in enumerate(vm_ids):
        for j, data in enumerate(BINARY):
            assert any_store.get(vm_id, data)[0] == data + bytes([i, j])  # type: ignore[index]
        # glob characters in a vm_id match only themselves
        assert any_store.snapshot(vm_id) == {d: d + bytes([i, j]) for j, d in enumerate(BINARY)}
        assert sorted(any_store.keys(vm_id)) == sorted(BINARY)


def test_a_one_mib_value(any_store: SharedDataStore) -> None:
    big = random.Random(1).randbytes(1 << 20)
    assert any_store.set("vm", b"big", big, 0) == Status.OK
    assert any_store.get("vm", b"big")[0] == big  # type: ignore[index]


def _random_ops(seed: int, n: int) -> list[tuple[str, str, bytes, bytes, int]]:
    rng = random.Random(seed)
    vm_ids, keys = ["", "vm", "vm:2", "v*"], [b"a", b"b", b"\x00\xff", b"a:b"]
    kinds = ["get", "set0", "set_current", "set_next", "set_stale", "set_random"]
    return [(rng.choice(kinds), rng.choice(vm_ids), rng.choice(keys),
             rng.randbytes(rng.randrange(0, 24)), rng.randrange(1, 1 << 32)) for _ in range(n)]


def _observe(store: SharedDataStore, ops: list[tuple[str, str, bytes, bytes, int]]
             ) -> list[object]:
    """What a plugin would see, running `ops`; the CAS each set argues with comes from this
    store's own answers (current, current + 1, the oldest seen for the key, or random)."""
    history: dict[tuple[str, bytes], list[int]] = {}
    seen: list[object] = []
    for kind, vm_id, key, value, random_cas in ops:
        found = store.get(vm_id, key)
        if kind == "get":
            seen.append(found)
            continue
        current = found[1] if found else None
        cas = {"set0": 0,
               "set_current": current if current is not None else random_cas,
               "set_next": ((current or 0) + 1) & 0xFFFFFFFF,
               "set_stale": history.get((vm_id, key), [random_cas])[0],
               "set_random": random_cas}[kind]
        status = store.set(vm_id, key, value, cas)
        after = store.get(vm_id, key)
        assert after is not None
        if status == Status.OK:
            assert after[0] == value and after[1] != 0 and after[1] != current
            history.setdefault((vm_id, key), []).append(after[1])
        else:
            assert status == Status.CAS_MISMATCH and after == found
        seen.append((kind, status, after))
    return seen


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_operations_match_the_in_process_store(any_store: SharedDataStore,
                                                      seed: int) -> None:
    ops = _random_ops(seed, 300)
    reference = SharedDataStore()
    # same answers, same CAS numbers (every store's one counter starts at 1)
    assert _observe(any_store, ops) == _observe(reference, ops)
    for vm_id in ("", "vm", "vm:2", "v*", "v"):
        assert any_store.snapshot(vm_id) == reference.snapshot(vm_id)
        assert sorted(any_store.keys(vm_id)) == sorted(reference.keys(vm_id))


# -- Redis specifics ---------------------------------------------------------------------------

def test_layout_is_readable_in_redis(rstore: Any) -> None:
    assert rstore.set("rl", b"alice", b"3", 0) == Status.OK
    raw = redis.Redis(port=rstore.where.port)
    assert raw.hgetall(rstore.prefix + b"2:rl:alice") == {b"v": b"3", b"c": b"1"}
    assert raw.get(rstore.prefix + b"cas") == b"1"
    raw.close()


def test_cas_wraps_to_one_never_zero(rstore: Any) -> None:
    raw = redis.Redis(port=rstore.where.port)
    raw.set(rstore.counter_key, 0xFFFFFFFE)
    rstore.set("vm", b"k", b"a", 0)
    assert rstore.get("vm", b"k")[1] == 0xFFFFFFFF
    rstore.set("vm", b"k", b"b", 0xFFFFFFFF)
    assert rstore.get("vm", b"k") == (b"b", 1)
    raw.close()


def test_pickles_as_its_url(rstore: Any) -> None:
    rstore.set("vm", b"k", b"v", 0)
    other = pickle.loads(pickle.dumps(rstore))
    try:
        assert other.url == rstore.url and other.get("vm", b"k") == rstore.get("vm", b"k")
        other.set("vm", b"k", b"w", 0)
        assert rstore.get("vm", b"k")[0] == b"w"  # type: ignore[index]
    finally:
        other.close()


def test_password_and_database(tmp_path: Path) -> None:
    if REDIS_SERVER is None:
        missing("redis-server is not installed")
    server = RedisServer(tmp_path, password="s3cr/et")
    try:
        store = RedisSharedData(f"redis://:s3cr%2Fet@127.0.0.1:{server.port}/2?prefix=p:")
        assert store.set("vm", b"k", b"v", 0) == Status.OK
        assert store.get("vm", b"k") == (b"v", 1)
        assert server.command("HGET", "p:2:vm:k", "v", db=2) == b"$1\r\nv\r\n"
        assert server.command("EXISTS", "p:2:vm:k") == b":0\r\n"  # not in database 0
        store.close()
    finally:
        server.stop()


def test_wrong_password_fails_calls_without_raising(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    if REDIS_SERVER is None:
        missing("redis-server is not installed")
    server = RedisServer(tmp_path, password="right")
    try:
        with caplog.at_level(logging.WARNING, "wasmgate.shared"):
            store = RedisSharedData(f"redis://:wrong@127.0.0.1:{server.port}")
            assert store.get("vm", b"k") is None
            assert store.set("vm", b"k", b"v", 0) == Status.INTERNAL_FAILURE
        assert "wrong" not in caplog.text and "[redacted]" in caplog.text
        assert store.failures >= 1
        store.close()
    finally:
        server.stop()


def _spawn_redis(port: int, workdir: Path) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [str(REDIS_SERVER), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = redis.Redis(port=port, socket_timeout=1)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            client.close()
            return process
        except redis.ConnectionError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise
            time.sleep(0.05)


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    process.wait(10)


def test_redis_down_then_back(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    if REDIS_SERVER is None:
        missing("redis-server is not installed")
    port = free_port()
    process = _spawn_redis(port, tmp_path)
    try:
        store = RedisSharedData(f"redis://127.0.0.1:{port}?timeout_ms=200", retry_seconds=0.3)
        assert store.set("vm", b"k", b"before", 0) == Status.OK
        _stop(process)
        pool = store.client.connection_pool
        attempts: list[float] = []
        connect = pool.get_connection
        pool.get_connection = lambda *a, **kw: attempts.append(time.monotonic()) or connect(
            *a, **kw)
        with caplog.at_level(logging.WARNING, "wasmgate.shared"):
            started = time.monotonic()
            assert store.get("vm", b"k") is None
            assert store.set("vm", b"k", b"during", 0) == Status.INTERNAL_FAILURE
            assert not store.available
            # while down, calls fail at once: one attempt per retry_seconds, not one per call
            for _ in range(200):
                assert store.get("vm", b"k") is None
                assert store.set("vm", b"k", b"during", 0) == Status.INTERNAL_FAILURE
            elapsed = time.monotonic() - started
            assert 1 <= len(attempts) <= 1 + elapsed / 0.3, (len(attempts), elapsed)
            assert caplog.text.count("unreachable") == 1  # rate-limited
            assert store.failures >= 402
            process = _spawn_redis(port, tmp_path)  # the same address; its data is gone
            deadline = time.monotonic() + 5
            while store.set("vm", b"k", b"after", 0) != Status.OK:
                assert time.monotonic() < deadline, "no recovery"
                time.sleep(0.05)
            assert store.available
            assert store.get("vm", b"k")[0] == b"after"  # type: ignore[index]
        assert "answers again" in caplog.text
        store.close()
    finally:
        if process.poll() is None:
            _stop(process)


def test_unreachable_at_start_is_not_an_error(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, "wasmgate.shared"):
        store = RedisSharedData(f"redis://127.0.0.1:{free_port()}")
    assert "unreachable" in caplog.text
    assert store.get("vm", b"k") is None
    assert store.set("vm", b"k", b"v", 0) == Status.INTERNAL_FAILURE
    store.close()


def test_a_hung_redis_costs_one_timeout(caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as silent:  # accepts connections (backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        with caplog.at_level(logging.WARNING, "wasmgate.shared"):
            started = time.monotonic()
            store = RedisSharedData(f"redis://127.0.0.1:{port}?timeout_ms=100",
                                    retry_seconds=10)
            for _ in range(10):
                assert store.get("vm", b"k") is None
                assert store.set("vm", b"k", b"v", 0) == Status.INTERNAL_FAILURE
            elapsed = time.monotonic() - started
        assert 0.09 < elapsed < 0.6, elapsed  # the PING timed out; the 20 calls failed at once
        assert "unreachable" in caplog.text
        store.close()


def test_no_lost_updates_from_four_processes(rstore: Any) -> None:
    assert_no_lost_cas_updates(rstore, workers=4, rounds=300)


# -- configuration ------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "reason"), [
    ("http://127.0.0.1:6379", "sharedData must be a redis:// or rediss:// URL"),
    ("127.0.0.1:6379", "sharedData must be a redis:// or rediss:// URL"),
    ("redis://", "no host"),
    ("redis://h:70000", "1..65535"),
    ("redis://:pw@h/db1", "database number"),
    ("redis://h?db=1", "unknown option 'db'"),
    ("redis://h?timeout_ms=0", "timeout_ms"),
    ("redis://h?prefix=", "prefix is empty"),
])  # fmt: skip
def test_bad_url_is_a_config_error_naming_the_field(text: str, reason: str) -> None:
    doc = {"apiVersion": "wasmgate.io/v1alpha1", "kind": "Gateway", "metadata": {"name": "g"},
           "spec": {"sharedData": text}}
    errors = [(e.path, e.reason) for e in load_docs(doc).errors]
    assert len(errors) == 1, errors
    assert errors[0][0] == "spec.sharedData" and reason in errors[0][1]
    assert "pw" not in errors[0][1]
    with pytest.raises(ValueError, match=reason.replace("?", r"\?")):
        RedisSharedData(text)


def test_url_forms() -> None:
    where = parse_shared_data_url("rediss://me:p%40ss@[::1]:7000/3?prefix=app:&timeout_ms=50")
    assert where == (True, "::1", 7000, "me", "p@ss", 3, "app:", 50)
    assert parse_shared_data_url("redis://cache") == (
        False, "cache", 6379, None, None, 0, "wasmgate:shared:", 250)
    assert redact_url("redis://me:p@ss@h:1/2?prefix=a@b") == "redis://me:[redacted]@h:1/2?prefix=a@b"
    assert redact_url("redis://h/2?prefix=a:b@c") == "redis://h/2?prefix=a:b@c"
    # raw / ? # @ in the password (an invalid URL, but it is echoed in errors)
    assert redact_url("redis://:s3cr/et@10.0.0.1:6379/0") == "redis://:[redacted]@10.0.0.1:6379/0"
    assert redact_url("redis://u:pa?ss@h:1/0") == "redis://u:[redacted]@h:1/0"
    assert redact_url("redis://u:pa#ss@h") == "redis://u:[redacted]@h"
    assert redact_url("redis://user@h:1") == "redis://user@h:1"


def test_an_invalid_url_never_echoes_its_password() -> None:
    for url in ("redis://:s3cr/et@10.0.0.1:6379/0", "redis://:s3cr?et@10.0.0.1:notaport/0",
                "redis://:s3cr#et@/0"):
        with pytest.raises(ValueError) as caught:
            parse_shared_data_url(url)
        assert "s3cr" not in str(caught.value) and "[redacted]" in str(caught.value)


def test_gateway_document_keeps_the_url() -> None:
    doc = {"apiVersion": "wasmgate.io/v1alpha1", "kind": "Gateway", "metadata": {"name": "g"},
           "spec": {"sharedData": "redis://:pw@127.0.0.1:6379/1"}}
    result = load_docs(doc)
    assert not result.errors
    gateway = result.gateways[0]
    assert gateway.spec.shared_data == "redis://:pw@127.0.0.1:6379/1"
    assert gateway.to_dict()["spec"]["sharedData"] == "redis://:pw@127.0.0.1:6379/1"
    assert "pw" not in repr(gateway.spec)

