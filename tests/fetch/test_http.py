"""HTTP(S) downloads against a real server on 127.0.0.1: unwrapping, retries, limits, TLS."""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path

import pytest

from wasmgate.fetch.errors import AuthError, FetchError, NotFound, NotWasm
from wasmgate.fetch.http import (
    HttpFetcher,
    HttpOptions,
    backoff_delays,
    host_is_insecure,
    parse_duration,
    parse_insecure_hosts,
    redact_url,
    unwrap,
)

from ..conftest import missing
from .helpers_http import (
    TINY_WASM,
    LocalCA,
    Reply,
    WasmServer,
    example_wasm,
    gzipped,
    make_test_ca,
    tarred,
)


@pytest.fixture
def server() -> Iterator[WasmServer]:
    with WasmServer() as s:
        yield s


class Sleeps(list[float]):
    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def fetcher(sleeps: Sleeps | None = None, **options: object) -> HttpFetcher:
    opts = HttpOptions(**options)  # type: ignore[arg-type]
    return HttpFetcher(opts, sleep=sleeps if sleeps is not None else Sleeps(), rng=lambda: 0.5)


# -- unwrapping --------------------------------------------------------------------------------


@pytest.mark.parametrize("wrap", [
    lambda w: w,
    gzipped,
    lambda w: tarred({"plugin.wasm": w}),
    lambda w: gzipped(tarred({"README": b"hello", "dir/plugin.wasm": w})),
    lambda w: tarred({"filter.wasm": w, "other.wasm": TINY_WASM}),
    lambda w: gzipped(gzipped(w)),
], ids=["plain", "gzip", "tar", "tar.gz with plugin.wasm", "tar first entry", "gzip twice"])
def test_serves_wrapped_modules(server: WasmServer, wrap: object) -> None:
    wasm = example_wasm()
    url = server.add("/m", wrap(wasm))  # type: ignore[operator]
    assert fetcher().fetch(url) == wasm


def test_non_wasm_is_rejected(server: WasmServer) -> None:
    url = server.add("/m", b"<html>hello</html>" * 20)
    with pytest.raises(NotWasm, match="is invalid"):
        fetcher().fetch(url)
    with pytest.raises(NotWasm):
        fetcher().fetch(server.add("/t", tarred({"a.txt": b"text" * 10})))


def test_corrupt_gzip_is_an_error() -> None:
    with pytest.raises(FetchError, match="corrupt gzip"):
        unwrap(b"\x1f\x8b" + b"\x08\x00" + b"junk" * 10, "u")
    with pytest.raises(FetchError, match="truncated gzip"):
        unwrap(gzipped(example_wasm())[:-40], "u")


# -- retries -----------------------------------------------------------------------------------


def test_500_then_200_retries(server: WasmServer) -> None:
    sleeps = Sleeps()
    url = server.add("/m", Reply(500), Reply(503), example_wasm())
    assert fetcher(sleeps).fetch(url) == example_wasm()
    assert server.hits["/m"] == 3
    assert sleeps == [0.5, 0.75]  # rng 0.5 = no jitter: 0.5 s, x1.5


def test_gives_up_after_max_attempts(server: WasmServer) -> None:
    sleeps = Sleeps()
    url = server.add("/m", Reply(502))
    with pytest.raises(FetchError, match=r"failed after 5 attempts: server replied 502"):
        fetcher(sleeps).fetch(url)
    assert server.hits["/m"] == 5
    assert len(sleeps) == 4


@pytest.mark.parametrize("status", [501, 505, 511, 400, 302])
def test_other_statuses_stop_at_once(server: WasmServer, status: int) -> None:
    url = server.add("/m", Reply(status), example_wasm())
    with pytest.raises(FetchError, match=f"server replied {status}"):
        fetcher().fetch(url)
    assert server.hits["/m"] == 1


def test_404_and_401_are_typed(server: WasmServer) -> None:
    with pytest.raises(NotFound, match="404"):
        fetcher().fetch(server.url("/missing"))
    assert server.hits["/missing"] == 1
    with pytest.raises(AuthError, match="401"):
        fetcher().fetch(server.add("/auth", Reply(401)))


def test_redirects_are_followed(server: WasmServer) -> None:
    server.add("/real", example_wasm())
    url = server.add("/old", Reply(301, headers={"Location": server.url("/real")}))
    assert fetcher().fetch(url) == example_wasm()


def test_redirect_loops_and_bad_encodings_stop(server: WasmServer) -> None:
    loop = server.add("/loop", Reply(302, headers={"Location": "/loop"}))
    with pytest.raises(FetchError, match="TooManyRedirects"):
        fetcher().fetch(loop)
    bad = server.add("/enc", Reply(body=b"not gzip at all", headers={"Content-Encoding": "gzip"}))
    with pytest.raises(FetchError, match="DecodingError"):
        fetcher().fetch(bad)
    assert server.hits["/enc"] == 1


def test_connection_refused_is_retried() -> None:
    with WasmServer() as gone:
        url = gone.url("/m")
    sleeps = Sleeps()
    with pytest.raises(FetchError, match="after 3 attempts: ConnectError"):
        fetcher(sleeps, max_attempts=3).fetch(url)
    assert len(sleeps) == 2


def test_slow_server_times_out_and_retries(server: WasmServer) -> None:
    url = server.add("/m", Reply(body=example_wasm(), delay=1.0), example_wasm())
    assert fetcher(timeout=0.3).fetch(url) == example_wasm()
    assert server.hits["/m"] == 2
    server.add("/slow", Reply(body=example_wasm(), delay=1.0))
    with pytest.raises(FetchError, match="after 2 attempts: timed out"):
        fetcher(timeout=0.2, max_attempts=2).fetch(server.url("/slow"))


# -- size cap ----------------------------------------------------------------------------------


def test_size_cap_from_content_length(server: WasmServer) -> None:
    url = server.add("/m", example_wasm())
    with pytest.raises(FetchError, match="larger than the 1000-byte limit"):
        fetcher(max_size=1000).fetch(url)
    assert server.hits["/m"] == 1


def test_size_cap_while_streaming(server: WasmServer) -> None:
    url = server.add("/m", Reply(body=b"\0asm" + b"\0" * 50_000, content_length=False))
    with pytest.raises(FetchError, match="larger than the 10000-byte limit"):
        fetcher(max_size=10_000).fetch(url)


def test_size_cap_applies_to_gunzipped_data(server: WasmServer) -> None:
    bomb = gzip.compress(b"\0asm\x01\0\0\0" + b"\0" * 2_000_000)
    url = server.add("/m", bomb)
    assert len(bomb) < 10_000
    with pytest.raises(FetchError, match="limit"):
        fetcher(max_size=1_000_000).fetch(url)


def test_env_options(monkeypatch: pytest.MonkeyPatch) -> None:
    opts = HttpOptions.from_env({"ISTIO_WASM_MAX_BINARY_SIZE_BYTES": "1234",
                                 "WASM_HTTP_REQUEST_TIMEOUT": "2s",
                                 "WASM_HTTP_REQUEST_MAX_RETRIES": "3",
                                 "WASM_INSECURE_REGISTRIES": "a.io, B.io:5000"})
    assert (opts.max_size, opts.timeout, opts.max_attempts) == (1234, 2.0, 3)
    assert opts.insecure_hosts == frozenset({"a.io", "b.io:5000"})
    defaults = HttpOptions.from_env({})
    assert (defaults.max_size, defaults.timeout, defaults.max_attempts) == (256 << 20, 15.0, 5)


# -- helpers -----------------------------------------------------------------------------------


def test_backoff_schedule() -> None:
    opts = HttpOptions()
    delays = backoff_delays(opts, rng=lambda: 0.5)
    assert [next(delays) for _ in range(4)] == [0.5, 0.75, 1.125, 1.6875]
    low, high = backoff_delays(opts, rng=lambda: 0.0), backoff_delays(opts, rng=lambda: 1.0)
    assert (next(low), next(high)) == (0.25, 0.75)  # +-50 %
    capped = backoff_delays(opts, rng=lambda: 1.0)
    assert max(next(capped) for _ in range(40)) == 60.0


def test_parse_duration() -> None:
    assert parse_duration("24h") == 86400
    assert parse_duration("1h30m") == 5400
    assert parse_duration("500ms") == 0.5
    assert parse_duration("90") == 90
    for bad in ("", "1d", "h", "5 m"):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_insecure_hosts_and_redaction() -> None:
    hosts = parse_insecure_hosts("reg.local:5000,other.io")
    assert host_is_insecure(hosts, "https://reg.local:5000/x.wasm")
    assert host_is_insecure(hosts, "https://other.io/x.wasm")
    assert not host_is_insecure(hosts, "https://reg.local/x.wasm")
    assert host_is_insecure(parse_insecure_hosts("*"), "https://anything/x")
    assert redact_url("https://bob:s3cret@h.io/x") == "https://bob:***@h.io/x"
    assert redact_url("https://h.io/x") == "https://h.io/x"


def test_password_never_in_errors(server: WasmServer) -> None:
    url = f"http://bob:s3cret@127.0.0.1:{server.port}/missing"
    with pytest.raises(NotFound) as info:
        fetcher().fetch(url)
    assert "s3cret" not in str(info.value)


# -- TLS ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ca(tmp_path_factory: pytest.TempPathFactory) -> LocalCA:
    ca = make_test_ca(tmp_path_factory.mktemp("ca"))
    if ca is None:
        missing("openssl is not installed")
    return ca


@pytest.fixture
def tls_server(local_ca: LocalCA) -> Iterator[WasmServer]:
    with WasmServer(tls=local_ca.server_context()) as s:
        yield s


def test_https_with_ca_bundle(tls_server: WasmServer, local_ca: LocalCA) -> None:
    url = tls_server.add("/m", example_wasm())
    assert url.startswith("https://")
    with pytest.raises(FetchError, match=r"CERTIFICATE_VERIFY_FAILED|certificate"):
        fetcher(max_attempts=1).fetch(url)
    assert fetcher().fetch(url, ca_file=str(local_ca.ca_file)) == example_wasm()


def test_https_insecure(tls_server: WasmServer) -> None:
    url = tls_server.add("/m", example_wasm())
    assert fetcher().fetch(url, insecure=True) == example_wasm()
    by_env = fetcher(insecure_hosts=parse_insecure_hosts(f"127.0.0.1:{tls_server.port}"))
    assert by_env.fetch(url) == example_wasm()


def test_bad_ca_file(tls_server: WasmServer, tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate")
    with pytest.raises(FetchError, match="cannot use CA bundle"):
        fetcher().fetch(tls_server.add("/m", example_wasm()), ca_file=str(bad))
