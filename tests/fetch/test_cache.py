"""The on-disk module cache: atomic files, a persistent index, several processes, expiry."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from wasmgate.fetch.cache import ModuleCache, default_cache_root
from wasmgate.fetch.fetcher import ModuleFetcher

from .helpers_http import TINY_WASM, WasmServer, example_wasm

HOUR = 3600.0


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def module(n: int) -> bytes:
    """Distinct small valid modules (a custom section carries `n`)."""
    payload = b"\x01n" + n.to_bytes(4, "little")
    return TINY_WASM + b"\x00" + bytes([len(payload)]) + payload


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def cache(tmp_path: Path, clock: Clock) -> ModuleCache:
    return ModuleCache(tmp_path / "cache", clock=clock)


def test_store_and_read_back(cache: ModuleCache) -> None:
    wasm = example_wasm()
    entry = cache.store("http://h/x.wasm", wasm, checksum=sha(wasm), resource_name="ns.p",
                        revision="7")
    assert cache.module_path(sha(wasm)) == cache.root / "modules" / f"{sha(wasm)}.wasm"
    assert cache.read_module(sha(wasm)) == wasm
    assert (entry.module_sha256, entry.size, entry.revisions) == (sha(wasm), len(wasm),
                                                                  {"ns.p": "7"})
    assert cache.module_count == 1
    assert not [p for p in cache.root.rglob("*") if p.name.endswith(".tmp")]


def test_index_survives_a_new_instance(cache: ModuleCache, clock: Clock) -> None:
    cache.store("oci://r.io/f:v1", TINY_WASM, checksum="ab" * 32, resource_name="a", revision="1")
    again = ModuleCache(cache.root, clock=clock)
    entry = again.entry("oci://r.io/f:v1")
    assert entry is not None
    assert (entry.checksum, entry.module_sha256, entry.last_used) == ("ab" * 32, sha(TINY_WASM),
                                                                      clock.now)
    raw = json.loads(again.index_path.read_text())
    assert raw["version"] == 1 and "oci://r.io/f:v1" in raw["entries"]


def test_checksum_lookup(cache: ModuleCache) -> None:
    wasm = example_wasm()
    cache.store("http://h/x", wasm, checksum=sha(wasm))
    cache.store("oci://r.io/f:v1", TINY_WASM, checksum="cd" * 32)
    assert cache.module_for_checksum(sha(wasm)) == sha(wasm)  # content-addressed
    assert cache.module_for_checksum("cd" * 32) == sha(TINY_WASM)  # manifest digest via index
    assert cache.module_for_checksum("ef" * 32) is None


def test_revisions_are_kept_per_resource(cache: ModuleCache) -> None:
    url = "oci://r.io/f:latest"
    cache.store(url, TINY_WASM, checksum="01" * 32, resource_name="a", revision="1")
    cache.store(url, TINY_WASM, checksum="01" * 32, resource_name="b", revision="5")
    cache.store(url, example_wasm(), checksum="02" * 32, resource_name="a", revision="2")
    entry = cache.entry(url)
    assert entry is not None
    assert entry.checksum == "02" * 32 and entry.module_sha256 == sha(example_wasm())
    assert entry.revisions == {"a": "2", "b": "5"}
    # The old digest's module outlives the moved tag, until it expires.
    assert cache.module_for_checksum("01" * 32) == sha(TINY_WASM)
    assert cache.module_count == 2


def test_corrupt_module_is_a_miss(cache: ModuleCache) -> None:
    cache.store("http://h/x", TINY_WASM, checksum=sha(TINY_WASM))
    path = cache.module_path(sha(TINY_WASM))
    path.write_bytes(b"\0asm\x01\0\0\x00garbage")
    assert cache.read_module(sha(TINY_WASM)) is None
    assert not path.exists()


def test_corrupt_index_starts_afresh(cache: ModuleCache, caplog: pytest.LogCaptureFixture) -> None:
    cache.store("http://h/x", TINY_WASM, checksum=sha(TINY_WASM))
    cache.index_path.write_text("{not json")
    assert cache.entries() == []
    assert "unreadable" in caplog.text
    cache.store("http://h/y", TINY_WASM, checksum=sha(TINY_WASM))
    assert [e.url for e in cache.entries()] == ["http://h/y"]


def test_failed_write_leaves_the_old_file(cache: ModuleCache,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    cache.store("http://h/x", TINY_WASM, checksum=sha(TINY_WASM))
    before = cache.index_path.read_bytes()

    def boom(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        cache.store("http://h/y", example_wasm(), checksum=sha(example_wasm()))
    monkeypatch.undo()
    assert cache.index_path.read_bytes() == before
    assert not cache.module_path(sha(example_wasm())).exists()
    assert not [p for p in cache.root.rglob("*") if p.name.endswith(".tmp")]


# -- expiry ------------------------------------------------------------------------------------


def test_purge_expires_unused_modules_and_their_compiled_code(cache: ModuleCache,
                                                              clock: Clock) -> None:
    old, fresh = example_wasm(), TINY_WASM
    cache.store("http://h/old", old, checksum=sha(old))
    compiled = cache.compiled_dir
    compiled.mkdir(parents=True)
    for name in (f"{sha(old)}-k1.cwasm", f"{sha(old)}-k1.cwasm.sha256",
                 f"{sha(fresh)}-k1.cwasm"):
        (compiled / name).write_bytes(b"x")
    os.utime(cache.module_path(sha(old)), (clock.now, clock.now))
    clock.now += 23 * HOUR
    cache.store("http://h/fresh", fresh, checksum=sha(fresh))
    assert cache.purge() == []
    clock.now += 2 * HOUR  # old: 25 h unused; fresh: 2 h
    assert cache.purge() == [sha(old)]
    assert [e.url for e in cache.entries()] == ["http://h/fresh"]
    assert not cache.module_path(sha(old)).exists()
    assert sorted(p.name for p in compiled.iterdir()) == [f"{sha(fresh)}-k1.cwasm"]
    assert cache.read_module(sha(fresh)) == fresh


def test_purge_keeps_a_young_unindexed_module(cache: ModuleCache, clock: Clock) -> None:
    # Another process wrote it and has not recorded it yet.
    cache.store_module(TINY_WASM)
    os.utime(cache.module_path(sha(TINY_WASM)), (clock.now, clock.now))
    assert cache.purge() == []
    clock.now += 25 * HOUR
    assert cache.purge() == [sha(TINY_WASM)]


def test_purge_older_than_and_everything(cache: ModuleCache, clock: Clock) -> None:
    cache.store("http://h/a", TINY_WASM, checksum=sha(TINY_WASM))
    for path in cache.modules_dir.iterdir():
        os.utime(path, (clock.now, clock.now))
    clock.now += 2 * HOUR
    assert cache.purge(older_than=3 * HOUR) == []
    assert cache.purge(older_than=HOUR) == [sha(TINY_WASM)]
    cache.store("http://h/b", example_wasm(), checksum=sha(example_wasm()))
    assert cache.purge(everything=True) == [sha(example_wasm())]
    assert cache.entries() == []


def test_maybe_purge_runs_once_per_interval_across_instances(tmp_path: Path,
                                                            clock: Clock) -> None:
    a = ModuleCache(tmp_path, clock=clock, purge_interval=HOUR, expiry=HOUR)
    b = ModuleCache(tmp_path, clock=clock, purge_interval=HOUR, expiry=HOUR)
    a.store("http://h/a", TINY_WASM, checksum=sha(TINY_WASM))
    a.purge()
    clock.now += 1.5 * HOUR
    os.utime(a.module_path(sha(TINY_WASM)), (0, 0))
    assert b.maybe_purge() == [sha(TINY_WASM)]
    a.store("http://h/b", example_wasm(), checksum=sha(example_wasm()))
    os.utime(a.module_path(sha(example_wasm())), (0, 0))
    clock.now += 1.5 * HOUR
    assert b.maybe_purge() == [sha(example_wasm())]
    assert a.maybe_purge() == []  # b just did it


def test_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WASMGATE_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.setenv("WASM_MODULE_EXPIRY", "90m")
    monkeypatch.setenv("WASM_PURGE_INTERVAL", "10m")
    cache = ModuleCache()
    assert default_cache_root() == cache.root == tmp_path / "c"
    assert (cache.expiry, cache.purge_interval) == (5400, 600)
    monkeypatch.delenv("WASMGATE_CACHE_DIR")
    assert default_cache_root() == Path.home() / ".cache" / "wasmgate"


# -- several processes -------------------------------------------------------------------------


def _store_many(root: str, tag: str, start: multiprocessing.synchronize.Event) -> None:
    cache = ModuleCache(root)
    start.wait(10)
    for i in range(40):
        wasm = module(i)  # both processes write the same modules: same names, same bytes
        cache.store(f"http://h/{tag}/{i}", wasm, checksum=sha(wasm), resource_name=tag,
                    revision=str(i))
        cache.record("http://h/shared", checksum=sha(TINY_WASM), module_sha256=sha(TINY_WASM),
                     size=len(TINY_WASM), resource_name=tag, revision=str(i))


def test_two_processes_keep_a_consistent_index(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    start = ctx.Event()
    workers = [ctx.Process(target=_store_many, args=(str(tmp_path), tag, start))
               for tag in ("w1", "w2")]
    for w in workers:
        w.start()
    start.set()
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    cache = ModuleCache(tmp_path)
    entries = {e.url: e for e in cache.entries()}
    assert len(entries) == 81  # no update lost
    assert entries["http://h/shared"].revisions == {"w1": "39", "w2": "39"}
    for i in range(40):
        assert cache.read_module(sha(module(i))) == module(i)
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def _fetch_in_process(root: str, url: str, start: multiprocessing.synchronize.Event,
                      results: multiprocessing.Queue[str]) -> None:
    start.wait(10)
    fetcher = ModuleFetcher(ModuleCache(root))
    for revision in range(5):
        got = fetcher.fetch(url, pull_policy="Always", resource_name=f"ns.p{os.getpid()}",
                            revision=str(revision))
        results.put(got.module_sha256)


@pytest.fixture
def server() -> Iterator[WasmServer]:
    with WasmServer() as s:
        yield s


def test_two_processes_fetching_the_same_url(tmp_path: Path, server: WasmServer) -> None:
    url = server.add("/m.wasm", example_wasm())
    ctx = multiprocessing.get_context("fork")
    start, results = ctx.Event(), ctx.Queue()
    workers = [ctx.Process(target=_fetch_in_process, args=(str(tmp_path), url, start, results))
               for _ in range(2)]
    for w in workers:
        w.start()
    start.set()
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    assert {results.get(timeout=5) for _ in range(10)} == {sha(example_wasm())}
    entry = ModuleCache(tmp_path).entry(url)
    assert entry is not None and entry.module_sha256 == sha(example_wasm())
    assert sorted(entry.revisions.values()) == ["4", "4"]
    assert server.hits["/m.wasm"] == 10  # Always with a new revision each time: re-pulled
