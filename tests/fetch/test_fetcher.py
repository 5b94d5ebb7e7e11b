"""ModuleFetcher: Istio's pull-policy rules over the cache, checksums, metrics: http and file
against a local server; OCI with the registry client replaced by a fake (call counts) and once
against the real docker-registry that tests/fetch/conftest.py starts."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from wasmgate.api.resources import WasmPlugin
from wasmgate.fetch import oci, sources
from wasmgate.fetch.cache import ModuleCache
from wasmgate.fetch.errors import (
    DigestMismatch,
    FetchError,
    NotFound,
    NotWasm,
    RegistryUnreachable,
)
from wasmgate.fetch.fetcher import FetchResult, ModuleFetcher, effective_policy
from wasmgate.fetch.http import HttpFetcher, HttpOptions

from .helpers_http import EXAMPLE, TINY_WASM, Reply, WasmServer, example_wasm

WASM = example_wasm()
SHA = hashlib.sha256(WASM).hexdigest()
TINY_SHA = hashlib.sha256(TINY_WASM).hexdigest()


@pytest.fixture
def server() -> Iterator[WasmServer]:
    with WasmServer() as s:
        yield s


@pytest.fixture
def fetcher(tmp_path: Path) -> ModuleFetcher:
    http = HttpFetcher(HttpOptions(max_attempts=2), sleep=lambda s: None)
    return ModuleFetcher(ModuleCache(tmp_path / "cache"), http=http)


def metric(fetcher: ModuleFetcher, line_start: str) -> int:
    lines = [ln for ln in fetcher.metrics.prometheus_lines() if ln.startswith(line_start)]
    assert len(lines) == 1, lines
    return int(lines[0].rsplit(" ", 1)[1])


# -- file ----------------------------------------------------------------------------------------


def test_file_urls_are_read_directly(fetcher: ModuleFetcher) -> None:
    for url in (f"file://{EXAMPLE}", str(EXAMPLE)):
        result = fetcher.fetch(url, sha256=SHA)
        assert (result.wasm, result.source, result.module_sha256) == (WASM, "file", SHA)
    with pytest.raises(DigestMismatch, match=f"has checksum {SHA}, which does not match: "
                                             f"{'0' * 64}"):
        fetcher.fetch(f"file://{EXAMPLE}", sha256="0" * 64)
    assert fetcher.cache.entries() == []
    with pytest.raises(FetchError, match="cannot read"):
        fetcher.fetch("file:///nonexistent/x.wasm")


# -- http pull policies --------------------------------------------------------------------------


def test_if_not_present_uses_the_cache(fetcher: ModuleFetcher, server: WasmServer) -> None:
    url = server.add("/m.wasm", WASM)
    first = fetcher.fetch(url, pull_policy="IfNotPresent", resource_name="ns.a", revision="1")
    assert (first.source, first.checksum, first.module_sha256) == ("remote", SHA, SHA)
    again = fetcher.fetch(url, pull_policy="IfNotPresent", resource_name="ns.a", revision="2")
    other = fetcher.fetch(url, resource_name="ns.b", revision="9")  # unspecified: IfNotPresent
    assert (again.source, other.source) == ("cache", "cache")
    assert again.wasm == WASM
    assert server.hits["/m.wasm"] == 1
    assert metric(fetcher, 'wasm_cache_lookup_count{hit="true"}') == 2
    assert metric(fetcher, 'wasm_cache_lookup_count{hit="false"}') == 1
    assert metric(fetcher, 'wasm_remote_fetch_count{result="success"}') == 1
    assert metric(fetcher, "wasm_cache_entries") == 1


def test_always_repulls_when_the_revision_changes(fetcher: ModuleFetcher,
                                                  server: WasmServer) -> None:
    url = server.add("/m.wasm", WASM)
    for revision, expected_hits, source in (("1", 1, "remote"), ("1", 1, "cache"),
                                            ("2", 2, "remote"), ("2", 2, "cache")):
        result = fetcher.fetch(url, pull_policy="Always", resource_name="ns.a",
                               revision=revision)
        assert (result.source, server.hits["/m.wasm"]) == (source, expected_hits)
    # Another resource on the same url has its own revision: its first fetch pulls.
    assert fetcher.fetch(url, pull_policy="Always", resource_name="ns.b",
                         revision="1").source == "remote"
    assert fetcher.fetch(url, pull_policy="Always", resource_name="ns.a",
                         revision="2").source == "cache"
    entry = fetcher.cache.entry(url)
    assert entry is not None and entry.revisions == {"ns.a": "2", "ns.b": "1"}


def test_always_sees_a_moved_module_and_if_not_present_does_not(fetcher: ModuleFetcher,
                                                                 server: WasmServer) -> None:
    url = server.add("/m.wasm", WASM)
    fetcher.fetch(url, pull_policy="Always", resource_name="ns.a", revision="1")
    server.add("/m.wasm", TINY_WASM)  # the file behind the url changed
    assert fetcher.fetch(url, pull_policy="IfNotPresent").wasm == WASM
    moved = fetcher.fetch(url, pull_policy="Always", resource_name="ns.a", revision="2")
    assert (moved.wasm, moved.checksum) == (TINY_WASM, TINY_SHA)
    assert fetcher.fetch(url, pull_policy="IfNotPresent").wasm == TINY_WASM
    assert metric(fetcher, "wasm_cache_entries") == 2  # the old module stays until it expires
    assert fetcher.fetch(url, sha256=SHA).source == "cache"


def test_sha256_pin_uses_the_cache_under_always(fetcher: ModuleFetcher,
                                                server: WasmServer) -> None:
    url = server.add("/m.wasm", WASM)
    fetcher.fetch(url, sha256=SHA, pull_policy="Always", resource_name="ns.a", revision="1")
    for revision in ("2", "3"):
        result = fetcher.fetch(url, sha256=SHA, pull_policy="Always", resource_name="ns.a",
                               revision=revision)
        assert result.source == "cache"
    assert server.hits["/m.wasm"] == 1
    # Content-addressed: another url pinned to the same module needs no download either.
    other = server.add("/copy.wasm", WASM)
    assert fetcher.fetch(other, sha256=SHA).source == "cache"
    assert server.hits["/copy.wasm"] == 0


def test_checksum_mismatch_names_both_digests(fetcher: ModuleFetcher, server: WasmServer) -> None:
    url = server.add("/m.wasm", WASM)
    wrong = "ab" * 32
    with pytest.raises(DigestMismatch) as info:
        fetcher.fetch(url, sha256=wrong)
    assert str(info.value) == (f"module downloaded from {url} has checksum {SHA}, which does "
                               f"not match: {wrong}")
    assert metric(fetcher, 'wasm_remote_fetch_count{result="checksum_mismatched"}') == 1
    assert fetcher.cache.entries() == []
    assert not fetcher.cache.module_path(SHA).exists()


def test_failures_and_their_metrics(fetcher: ModuleFetcher, server: WasmServer) -> None:
    with pytest.raises(NotFound):
        fetcher.fetch(server.url("/missing.wasm"))
    with pytest.raises(NotWasm):
        fetcher.fetch(server.add("/html", b"<html></html>" * 10))
    with pytest.raises(FetchError, match="after 2 attempts"):
        fetcher.fetch(server.add("/down", Reply(503)))
    assert metric(fetcher, 'wasm_remote_fetch_count{result="download_failure"}') == 2
    assert metric(fetcher, 'wasm_remote_fetch_count{result="fetch_failure"}') == 1
    assert fetcher.cache.entries() == []


def test_a_failed_repull_is_retried_not_served_stale(fetcher: ModuleFetcher,
                                                     server: WasmServer) -> None:
    url = server.add("/m.wasm", WASM)
    fetcher.fetch(url, pull_policy="Always", resource_name="ns.a", revision="1")
    server.add("/m.wasm", Reply(404))
    for _ in range(2):  # Istio would record revision 2 at the failed lookup and serve stale
        with pytest.raises(NotFound):
            fetcher.fetch(url, pull_policy="Always", resource_name="ns.a", revision="2")
    assert server.hits["/m.wasm"] == 3


def test_index_survives_a_restart(fetcher: ModuleFetcher, server: WasmServer) -> None:
    url = server.add("/m.wasm", WASM)
    fetcher.fetch(url)
    restarted = ModuleFetcher(ModuleCache(fetcher.cache.root), http=fetcher.http)
    assert restarted.fetch(url).source == "cache"
    assert server.hits["/m.wasm"] == 1


def test_a_deleted_module_is_fetched_again(fetcher: ModuleFetcher, server: WasmServer) -> None:
    url = server.add("/m.wasm", WASM)
    fetcher.fetch(url)
    fetcher.cache.module_path(SHA).unlink()
    server.add("/m.wasm", TINY_WASM)  # the remembered checksum is a hint, not a pin
    assert fetcher.fetch(url).wasm == TINY_WASM


def test_concurrent_fetches_download_once(fetcher: ModuleFetcher, server: WasmServer) -> None:
    url = server.add("/m.wasm", Reply(body=WASM, delay=0.2))
    results: list[FetchResult] = []
    threads = [threading.Thread(target=lambda: results.append(fetcher.fetch(url)))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.source for r in results) == ["cache", "cache", "cache", "remote"]
    assert server.hits["/m.wasm"] == 1


def test_credentials_stay_out_of_errors_and_the_index(fetcher: ModuleFetcher,
                                                      server: WasmServer) -> None:
    server.add("/m.wasm", WASM)
    url = f"http://bob:s3cret@127.0.0.1:{server.port}/m.wasm"
    result = fetcher.fetch(url)
    assert "s3cret" not in repr(result)
    assert "s3cret" not in fetcher.cache.index_path.read_text()
    with pytest.raises(NotFound) as info:
        fetcher.fetch(f"http://bob:s3cret@127.0.0.1:{server.port}/nope")
    assert "s3cret" not in str(info.value)


def test_metrics_text_format(fetcher: ModuleFetcher) -> None:
    assert fetcher.metrics.prometheus_lines() == [
        "# TYPE wasm_cache_entries gauge", "wasm_cache_entries 0",
        "# TYPE wasm_cache_lookup_count counter",
        'wasm_cache_lookup_count{hit="true"} 0', 'wasm_cache_lookup_count{hit="false"} 0',
        "# TYPE wasm_remote_fetch_count counter",
        'wasm_remote_fetch_count{result="success"} 0',
        'wasm_remote_fetch_count{result="download_failure"} 0',
        'wasm_remote_fetch_count{result="manifest_failure"} 0',
        'wasm_remote_fetch_count{result="checksum_mismatched"} 0',
        'wasm_remote_fetch_count{result="fetch_failure"} 0',
    ]


def test_effective_policy() -> None:
    assert effective_policy(None, "oci://r.io/f:latest") == "Always"
    assert effective_policy("UNSPECIFIED_POLICY", "oci://r.io/f:v1") == "IfNotPresent"
    assert effective_policy(None, "oci://r.io/f") == "IfNotPresent"
    assert effective_policy(None, "http://h/f:latest") == "IfNotPresent"
    assert effective_policy("Always", "http://h/f") == "Always"


def test_fetch_plugin_passes_the_resource(fetcher: ModuleFetcher, server: WasmServer) -> None:
    url = server.add("/m.wasm", WASM)
    plugin = WasmPlugin.model_validate({
        "apiVersion": "extensions.istio.io/v1alpha1", "kind": "WasmPlugin",
        "metadata": {"name": "p", "namespace": "ns", "resourceVersion": "41"},
        "spec": {"url": url, "imagePullPolicy": "Always"}})  # fmt: skip
    assert fetcher.fetch_plugin(plugin).source == "remote"
    assert fetcher.fetch_plugin(plugin).source == "cache"
    entry = fetcher.cache.entry(url)
    assert entry is not None and entry.revisions == {"ns.p": "41"}


def test_fetch_module_goes_through_the_default_fetcher(server: WasmServer, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WASMGATE_CACHE_DIR", str(tmp_path / "default"))
    monkeypatch.setattr(sources, "_DEFAULT", [])
    url = server.add("/m.wasm", WASM)
    assert sources.fetch_module(url, SHA) == WASM
    assert sources.fetch_module(url) == WASM
    assert server.hits["/m.wasm"] == 1
    assert (tmp_path / "default" / "modules" / f"{SHA}.wasm").is_file()
    assert sources.fetch_module(str(EXAMPLE)) == WASM
    with pytest.raises(FetchError, match="not supported"):
        sources.fetch_module("ftp://h/x.wasm")


# -- OCI through a fake registry client ----------------------------------------------------------

DIGEST_A, DIGEST_B = "a" * 64, "b" * 64


class FakeRegistry:
    """Stands in for oci.resolve_digest / oci.pull: one tag whose manifest can move."""

    def __init__(self) -> None:
        self.digest, self.wasm = DIGEST_A, WASM
        self.resolves: list[str] = []
        self.pulls: list[tuple[str, str | None]] = []
        self.credentials: list[Any] = []
        self.fail_resolve = False

    def resolve_digest(self, ref: str, **kw: Any) -> str:
        self.resolves.append(ref)
        self.credentials.append(kw.get("credentials"))
        if self.fail_resolve:
            raise RegistryUnreachable(f"{ref}: connection refused")
        return f"sha256:{self.digest}"

    def pull(self, ref: str, *, expected_digest: str | None = None, **kw: Any) -> oci.PulledImage:
        self.pulls.append((ref, expected_digest))
        if expected_digest and expected_digest != f"sha256:{self.digest}":
            raise DigestMismatch(f"image {ref}", expected_digest, f"sha256:{self.digest}")
        return oci.PulledImage(self.wasm, f"sha256:{self.digest}", "oci", ref)


@pytest.fixture
def fake_registry(monkeypatch: pytest.MonkeyPatch) -> FakeRegistry:
    fake = FakeRegistry()
    monkeypatch.setattr(oci, "resolve_digest", fake.resolve_digest)
    monkeypatch.setattr(oci, "pull", fake.pull)
    return fake


def test_oci_tag_resolves_the_manifest_before_layers(fetcher: ModuleFetcher,
                                                     fake_registry: FakeRegistry) -> None:
    url = "oci://r.example/org/f:v1"
    first = fetcher.fetch(url, pull_secret="/secrets/pull", resource_name="ns.a", revision="1")
    assert (first.source, first.checksum, first.module_sha256) == ("remote", DIGEST_A, SHA)
    assert fake_registry.pulls == [(url, f"sha256:{DIGEST_A}")]
    assert fake_registry.credentials == ["/secrets/pull"]
    assert fetcher.fetch(url, resource_name="ns.a", revision="2").source == "cache"
    assert len(fake_registry.resolves) == 1  # IfNotPresent trusts the remembered digest
    # Always with a new revision: the manifest is resolved again, the same digest is cached.
    again = fetcher.fetch(url, pull_policy="Always", resource_name="ns.a", revision="3")
    assert (again.source, len(fake_registry.resolves), len(fake_registry.pulls)) == ("cache", 2, 1)
    fake_registry.digest, fake_registry.wasm = DIGEST_B, TINY_WASM  # the tag moved
    moved = fetcher.fetch(url, pull_policy="Always", resource_name="ns.a", revision="4")
    assert (moved.source, moved.checksum, moved.wasm) == ("remote", DIGEST_B, TINY_WASM)
    assert metric(fetcher, 'wasm_remote_fetch_count{result="success"}') == 2


def test_oci_latest_defaults_to_always(fetcher: ModuleFetcher, fake_registry: FakeRegistry) -> None:
    url = "oci://r.example/org/f:latest"
    fetcher.fetch(url, resource_name="ns.a", revision="1")
    fetcher.fetch(url, resource_name="ns.a", revision="1")
    fetcher.fetch(url, resource_name="ns.a", revision="2")
    assert len(fake_registry.resolves) == 2 and len(fake_registry.pulls) == 1


def test_oci_digest_pins(fetcher: ModuleFetcher, fake_registry: FakeRegistry) -> None:
    url = f"oci://r.example/org/f@sha256:{DIGEST_A}"
    assert fetcher.fetch(url, pull_policy="Always").source == "remote"
    assert fake_registry.resolves == []  # the digest is known: no tag to resolve
    assert fetcher.fetch(url, pull_policy="Always", revision="new").source == "cache"
    tagged = fetcher.fetch("oci://r.example/org/f:v1", sha256=DIGEST_A, pull_policy="Always")
    assert tagged.source == "cache"  # a pin hits whatever the url
    assert len(fake_registry.pulls) == 1


def test_oci_pin_mismatch(fetcher: ModuleFetcher, fake_registry: FakeRegistry) -> None:
    url = "oci://r.example/org/f:v1"
    with pytest.raises(DigestMismatch) as info:
        fetcher.fetch(url, sha256=DIGEST_B)
    assert str(info.value) == (f"module downloaded from {url} has checksum {DIGEST_A}, which "
                               f"does not match: {DIGEST_B}")
    assert metric(fetcher, 'wasm_remote_fetch_count{result="checksum_mismatched"}') == 1


def test_oci_manifest_failure(fetcher: ModuleFetcher, fake_registry: FakeRegistry) -> None:
    fake_registry.fail_resolve = True
    with pytest.raises(FetchError, match="connection refused"):
        fetcher.fetch("oci://r.example/org/f:v1")
    assert metric(fetcher, 'wasm_remote_fetch_count{result="manifest_failure"}') == 1
    assert fake_registry.pulls == []


# -- OCI against a real registry (tests/fetch/conftest.py starts docker-registry) ----------------


def test_oci_policies_against_a_real_registry(fetcher: ModuleFetcher, registry: Any) -> None:
    from wasmgate.fetch.images import build_image, push

    ref = registry.ref("fetcher/example", "v1")
    first_digest = push(build_image(WASM, "oci"), ref)
    first = fetcher.fetch(ref, resource_name="ns.a", revision="1")
    assert (first.source, first.wasm, f"sha256:{first.checksum}") == ("remote", WASM,
                                                                     first_digest)
    assert fetcher.fetch(ref, resource_name="ns.a", revision="2").source == "cache"
    moved_digest = push(build_image(TINY_WASM, "artifact"), ref)  # the tag moves
    assert fetcher.fetch(ref, resource_name="ns.a", revision="3").wasm == WASM  # IfNotPresent
    moved = fetcher.fetch(ref, pull_policy="Always", resource_name="ns.a", revision="4")
    assert (moved.source, moved.wasm, f"sha256:{moved.checksum}") == ("remote", TINY_WASM,
                                                                     moved_digest)
    pinned = ref.rsplit(":", 1)[0] + f"@{first_digest}"
    assert fetcher.fetch(pinned, pull_policy="Always").source == "cache"
    with pytest.raises(DigestMismatch, match=f"{ref} has checksum {moved_digest[7:]}, which "
                                             f"does not match: {'0' * 64}"):
        fetcher.fetch(ref, sha256="0" * 64)
    assert metric(fetcher, 'wasm_remote_fetch_count{result="success"}') == 2
