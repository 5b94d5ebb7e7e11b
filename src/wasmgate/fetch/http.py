"""HTTP(S) module downloads, as Istio's agent does them (spec §3.5), plus a size cap while
streaming, a custom CA bundle and credential-free error messages.

Per attempt: a 15 s timeout (each socket operation and the whole attempt). At most 5 attempts;
transport errors and 5xx other than 501/505/511 are retried after an exponential backoff (0.5 s,
x1.5, +-50 % jitter, capped at 60 s); any other non-200 stops at once. The body is then unwrapped:
gzip is gunzipped, a tar archive yields `plugin.wasm` if present else its first regular file, until
Wasm remains; anything else is a NotWasm error.

httpx rather than urllib: real per-operation timeouts (urllib has one socket timeout and no
deadline for a trickling body), streaming with typed transport errors to decide on retries,
connection reuse across retries, and an injectable transport.
"""

from __future__ import annotations

import gzip
import io
import os
import random
import re
import ssl
import tarfile
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from urllib.parse import urlsplit, urlunsplit

import httpx

from ..api.gateway import redact_secret_params
from .sources import FetchError, check_wasm, fetch_error

Progress = Callable[[int, int | None], None]
"""Called with (bytes received so far, total size if the server said it)."""

DEFAULT_MAX_SIZE = 256 * 1024 * 1024
_NOT_RETRIED_5XX = frozenset({501, 505, 511})
_GZIP_MAGIC = b"\x1f\x8b"
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds from a Go duration ("24h", "1h30m", "500ms") or a bare number of seconds."""
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    pos, total = 0, 0.0
    for match in _DURATION.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNITS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise ValueError(f"invalid duration {text!r} (examples: 90s, 15m, 24h, 1h30m)")
    return total


def parse_insecure_hosts(value: str) -> frozenset[str]:
    """`WASM_INSECURE_REGISTRIES`: comma-separated host[:port]; `*` means every host."""
    return frozenset(h.strip().lower() for h in value.split(",") if h.strip())


def host_is_insecure(hosts: frozenset[str], url: str) -> bool:
    if "*" in hosts:
        return True
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    candidates = {host, parts.netloc.rpartition("@")[2].lower()}
    return bool(candidates & hosts)


def redact_url(url: str) -> str:
    """The url without a password, or secret-looking query values, in it (for logs and
    errors)."""
    url = redact_secret_params(url)
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.netloc.rpartition('@')[2]}"
    return urlunsplit(parts._replace(netloc=netloc))


@dataclass(frozen=True)
class HttpOptions:
    timeout: float = 15.0
    """Per attempt (`WASM_HTTP_REQUEST_TIMEOUT`)."""
    max_attempts: int = 5
    """Attempts in all (`WASM_HTTP_REQUEST_MAX_RETRIES`)."""
    max_size: int = DEFAULT_MAX_SIZE
    """Largest body and largest unwrapped module (`ISTIO_WASM_MAX_BINARY_SIZE_BYTES`)."""
    initial_backoff: float = 0.5
    multiplier: float = 1.5
    jitter: float = 0.5
    max_backoff: float = 60.0
    insecure_hosts: frozenset[str] = field(default_factory=frozenset)
    """Hosts whose TLS certificate is not verified (`WASM_INSECURE_REGISTRIES`)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> HttpOptions:
        env = os.environ if env is None else env
        opts = cls(insecure_hosts=parse_insecure_hosts(env.get("WASM_INSECURE_REGISTRIES", "")))
        if value := env.get("WASM_HTTP_REQUEST_TIMEOUT"):
            opts = replace(opts, timeout=parse_duration(value))
        if value := env.get("WASM_HTTP_REQUEST_MAX_RETRIES"):
            opts = replace(opts, max_attempts=max(1, int(value)))
        if value := env.get("ISTIO_WASM_MAX_BINARY_SIZE_BYTES"):
            opts = replace(opts, max_size=int(value))
        return opts


def backoff_delays(opts: HttpOptions, rng: Callable[[], float] = random.random) -> Iterator[float]:
    """cenkalti/backoff's exponential schedule: interval +- jitter, interval *= multiplier."""
    interval = opts.initial_backoff
    while True:
        delta = opts.jitter * interval
        yield min(opts.max_backoff, interval - delta + rng() * 2 * delta)
        interval = min(opts.max_backoff, interval * opts.multiplier)


class _Retryable(Exception):
    """An attempt failed in a way worth another try."""


class HttpFetcher:
    """Downloads and unwraps modules over http(s); `sleep` and `rng` injectable for tests."""

    def __init__(self, options: HttpOptions | None = None, *,
                 sleep: Callable[[float], None] = time.sleep,
                 rng: Callable[[], float] = random.random,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.options = options or HttpOptions.from_env()
        self._sleep = sleep
        self._rng = rng
        self._transport = transport

    def fetch(self, url: str, *, insecure: bool | None = None, ca_file: str | None = None,
              progress: Progress | None = None) -> bytes:
        """The Wasm module at `url`, unwrapped; FetchError (or a subclass) otherwise."""
        body = self.download(url, insecure=insecure, ca_file=ca_file, progress=progress)
        return unwrap(body, redact_url(url), self.options.max_size)

    def download(self, url: str, *, insecure: bool | None = None, ca_file: str | None = None,
                 progress: Progress | None = None) -> bytes:
        """The raw body, with retries."""
        shown = redact_url(url)
        if insecure is None:
            insecure = host_is_insecure(self.options.insecure_hosts, url)
        delays = backoff_delays(self.options, self._rng)
        last = ""
        with self._client(insecure, ca_file, shown) as client:
            for attempt in range(1, self.options.max_attempts + 1):
                try:
                    return self._attempt(client, url, shown, progress)
                except _Retryable as exc:
                    last = str(exc)
                if attempt < self.options.max_attempts:
                    self._sleep(next(delays))
        raise FetchError(f"{shown}: download failed after {self.options.max_attempts} "
                         f"attempts: {last}")

    def _client(self, insecure: bool, ca_file: str | None, shown: str) -> httpx.Client:
        verify: ssl.SSLContext | bool = True
        if insecure:
            verify = False
        elif ca_file:
            try:
                verify = ssl.create_default_context()
                verify.load_verify_locations(cafile=ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise FetchError(f"{shown}: cannot use CA bundle {ca_file}: {exc}") from exc
        return httpx.Client(verify=verify, timeout=self.options.timeout, follow_redirects=True,
                            transport=self._transport)

    def _attempt(self, client: httpx.Client, url: str, shown: str,
                 progress: Progress | None) -> bytes:
        deadline = time.monotonic() + self.options.timeout
        try:
            with client.stream("GET", url) as response:
                _check_status(response, shown)
                return self._read_body(response, shown, deadline, progress)
        except httpx.TransportError as exc:
            raise _Retryable(_describe(exc)) from None
        except (httpx.HTTPError, httpx.InvalidURL) as exc:  # bad encoding, redirect loop, url
            raise FetchError(f"{shown}: {type(exc).__name__}: {exc}") from None

    def _read_body(self, response: httpx.Response, shown: str, deadline: float,
                   progress: Progress | None) -> bytes:
        cap = self.options.max_size
        total = _content_length(response)
        if total is not None and total > cap:
            raise _too_large(shown, total, cap)
        chunks, received = [], 0
        if progress:
            progress(0, total)
        for chunk in response.iter_bytes():
            received += len(chunk)
            if received > cap:
                raise _too_large(shown, received, cap)
            if time.monotonic() > deadline:
                raise _Retryable(f"timed out after {self.options.timeout:g}s reading the body")
            chunks.append(chunk)
            if progress:
                progress(received, total)
        return b"".join(chunks)


def _check_status(response: httpx.Response, shown: str) -> None:
    status = response.status_code
    if status == 200:
        return
    reason = f"{status} {response.reason_phrase}".strip()
    if status >= 500 and status not in _NOT_RETRIED_5XX:
        raise _Retryable(f"server replied {reason}")
    kind = {404: "NotFound", 401: "AuthError", 403: "AuthError"}.get(status, "FetchError")
    message = f"{shown}: server replied {reason}"
    raise FetchError(message) if kind == "FetchError" else fetch_error(kind, message)


def _content_length(response: httpx.Response) -> int | None:
    value = response.headers.get("content-length", "")
    return int(value) if value.isdigit() else None


def _too_large(shown: str, size: int, cap: int) -> FetchError:
    return FetchError(f"{shown}: module is larger than the {cap}-byte limit "
                      f"(ISTIO_WASM_MAX_BINARY_SIZE_BYTES): at least {size} bytes")


def _describe(exc: httpx.TransportError) -> str:
    name = type(exc).__name__
    text = str(exc)
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out ({name})"
    return f"{name}: {text}" if text else name


# -- unwrapping --------------------------------------------------------------------------------


def unwrap(data: bytes, shown: str, max_size: int = DEFAULT_MAX_SIZE) -> bytes:
    """Peel gzip and tar layers until Wasm remains (Istio's loop, with a size cap on gunzip)."""
    for _ in range(8):
        if data.startswith(b"\0asm"):
            break
        if data.startswith(_GZIP_MAGIC):
            data = _gunzip(data, shown, max_size)
        elif len(data) >= 262 and data[257:262] == b"ustar":
            data = _untar(data, shown)
        else:
            break
    check_wasm(data, shown)
    return data


def _gunzip(data: bytes, shown: str, max_size: int) -> bytes:
    # Concatenated gzip members are legal: decompress member after member, capped.
    out: list[bytes] = []
    size, rest = 0, data
    try:
        while rest.startswith(_GZIP_MAGIC):
            inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
            chunk = inflater.decompress(rest, max_size - size + 1)
            size += len(chunk)
            if size > max_size or inflater.unconsumed_tail:
                raise _too_large(shown, size, max_size)
            out.append(chunk)
            if not inflater.eof:
                raise FetchError(f"{shown}: truncated gzip data")
            rest = inflater.unused_data
    except (zlib.error, gzip.BadGzipFile) as exc:
        raise FetchError(f"{shown}: corrupt gzip data: {exc}") from None
    return b"".join(out)


def _untar(data: bytes, shown: str) -> bytes:
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
            files = [m for m in archive.getmembers() if m.isreg()]
            if not files:
                raise FetchError(f"{shown}: the tar archive holds no regular file")
            chosen = next((m for m in files if m.name.rsplit("/", 1)[-1] == "plugin.wasm"),
                          files[0])
            extracted = archive.extractfile(chosen)
            assert extracted is not None  # regular files always extract
            return extracted.read()
    except tarfile.TarError as exc:
        raise FetchError(f"{shown}: corrupt tar archive: {exc}") from None


__all__ = ["HttpFetcher", "HttpOptions", "Progress", "backoff_delays", "host_is_insecure",
           "parse_duration", "parse_insecure_hosts", "redact_url", "unwrap"]
