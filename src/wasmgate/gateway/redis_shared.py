"""Plugin shared data (with CAS) in a Redis, so that several gateway replicas share it.

``spec.sharedData: redis://[[user]:password@]host[:port][/db][?prefix=P&timeout_ms=N]`` (or
``rediss://`` for TLS) in the Gateway document makes every gateway process that loads the
document, and every ``--workers`` process of it, keep plugin shared data in that Redis instead
of its own store. Shared queues are not affected (they stay in the gateway).

Semantics: exactly proxy-wasm-cpp-host's ``SharedData``, as ``SharedDataStore`` and
``ProcessSharedData``: keys are namespaced by vm_id; a get of a missing key gives None; ``cas
== 0`` sets unconditionally; a new key accepts any cas; an existing key with ``cas != stored``
gives CAS_MISMATCH; every successful set takes a new CAS from ONE counter (a u32 that skips 0 on
wrap-around) shared by every replica. The compare and the set run in one Lua script, which Redis
executes alone (its single command thread), so a CAS is atomic across replicas and each key is
linearizable. Keys are never removed (the ABI has no delete).

Layout: the value of ``key`` for ``vm_id`` is the hash ``<prefix><len(vm_id)>:<vm_id>:<key>``
with fields ``v`` (the value, bytes as given) and ``c`` (its CAS); the counter is
``<prefix>cas``. Keys and values are binary-safe. The script names two keys, so this needs one
Redis (or a primary with replicas), not Redis Cluster.

Cost, and why it is acceptable only as an option: a host call is synchronous (it runs inside a
Wasm callback on the event loop thread), so each get or set is one blocking round trip to
Redis: ~30-35 µs each on loopback with redis-py, so a CAS (get + set) costs ~75 µs, ~80x the
in-process store and ~15x the mmap one, plus two network round trips when Redis is remote
(``bench/redis_shared.py``, BENCHMARKS.md). Meanwhile the event loop serves nobody else.

When Redis is unreachable or slow: a get gives None (NOT_FOUND to the plugin) and a set
INTERNAL_FAILURE; nothing raises into the plugin. Each call blocks at most ``timeout_ms``
(connect and command, default 250 ms, no retries; resolving a host name is not covered, so
name a host the resolver answers at once, or an address); after a connection failure or timeout the
store stops trying for ``retry_seconds`` (1 s) and answers at once, so a dead Redis costs the
event loop at most one timeout per ``retry_seconds``. A warning is logged on the first failure
and then at most every ``warn_seconds`` (30 s) with the number of failed calls; the first call
that works again logs the recovery. Other errors (a wrong type under our key, a refused AUTH
answered as an error) fail only that call.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..api.gateway import SharedDataURL, parse_shared_data_url, redact_url
from ..runtime.abi import Status
from ..runtime.shared import SharedDataStore

log = logging.getLogger("wasmgate.shared")

# KEYS[1] the value's hash, KEYS[2] the CAS counter; ARGV[1] the value, ARGV[2] the cas given.
# Returns the new CAS, or 0 for a mismatch (a stored CAS is never 0).
_SET_SCRIPT = """
local cas = tonumber(ARGV[2])
if cas ~= 0 then
  local stored = redis.call('HGET', KEYS[1], 'c')
  if stored and tonumber(stored) ~= cas then
    return 0
  end
end
local new = redis.call('INCR', KEYS[2])
if new > 4294967295 then
  redis.call('SET', KEYS[2], 1)
  new = 1
end
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'c', new)
return new
"""

_GLOB_SPECIAL = frozenset(b"*?[]\\")
_DOWN_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)


def _glob_escape(raw: bytes) -> bytes:
    return b"".join(b"\\" + bytes([c]) if c in _GLOB_SPECIAL else bytes([c]) for c in raw)


class RedisSharedData(SharedDataStore):
    """A ``SharedDataStore`` in a Redis; see the module docstring. Thread-safe (a connection
    pool); pickles as its URL and options (each process connects itself)."""

    def __init__(self, url: str, *, retry_seconds: float = 1.0, warn_seconds: float = 30.0,
                 check: bool = True) -> None:
        super().__init__()
        self.url = url
        self.where: SharedDataURL = parse_shared_data_url(url)
        self.retry_seconds = retry_seconds
        self.warn_seconds = warn_seconds
        where = self.where
        timeout = where.timeout_ms / 1000
        self.client = redis.Redis(
            host=where.host, port=where.port, db=where.db, username=where.username,
            password=where.password, ssl=where.tls, socket_timeout=timeout,
            socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0),
            decode_responses=False, client_name="wasmgate-shared")
        self.prefix = where.prefix.encode("utf-8", "surrogateescape")
        self.counter_key = self.prefix + b"cas"
        self._script = self.client.register_script(_SET_SCRIPT)
        self._prefixes: dict[str, bytes] = {}
        # outage bookkeeping (races between threads only blur the counts)
        self._state = threading.Lock()
        self._down_since: float | None = None
        self._retry_at = 0.0
        self._next_warning = 0.0
        self.failures = 0
        """Calls that failed (Redis unreachable or erring), since start."""
        self._failures_unreported = 0
        if check:
            self.ping()

    # -- life cycle -------------------------------------------------------------------------
    def __reduce__(self) -> tuple[Any, ...]:
        return (_connect, (self.url, self.retry_seconds, self.warn_seconds))

    def close(self) -> None:
        self.client.close()

    def describe(self) -> str:
        where = self.where
        return (f"{redact_url(self.url).split('?', 1)[0]} (db {where.db}, prefix "
                f"{where.prefix!r}, timeout {where.timeout_ms} ms)")

    def ping(self) -> bool:
        """Whether Redis answers now; logs where shared data goes, or why it cannot."""
        try:
            self.client.ping()
        except Exception as exc:
            self._failed("PING", exc)
            return False
        self._recovered()
        log.info("plugin shared data in Redis %s", self.describe())
        return True

    @property
    def available(self) -> bool:
        """False while the store fails fast after an outage (until the next retry works)."""
        return self._down_since is None

    # -- keys -------------------------------------------------------------------------------
    def _key(self, vm_id: str, key: bytes) -> bytes:
        prefix = self._prefixes.get(vm_id)
        if prefix is None:
            raw = vm_id.encode("utf-8", "surrogateescape")
            prefix = self.prefix + b"%d:" % len(raw) + raw + b":"
            if len(self._prefixes) < 1024:
                self._prefixes[vm_id] = prefix
        return prefix + bytes(key)

    # -- the store --------------------------------------------------------------------------
    def get(self, vm_id: str, key: bytes) -> tuple[bytes, int] | None:
        if not self._may_try():
            return None
        try:
            value, cas = self.client.execute_command("HMGET", self._key(vm_id, key), "v", "c")
        except Exception as exc:
            self._failed("get", exc)
            return None
        self._recovered()
        if value is None or cas is None:
            return None
        return bytes(value), int(cas)

    def set(self, vm_id: str, key: bytes, value: bytes, cas: int) -> Status:
        if not self._may_try():
            return Status.INTERNAL_FAILURE
        try:
            new = self._script(keys=[self._key(vm_id, key), self.counter_key],
                               args=[bytes(value), int(cas)])
        except Exception as exc:
            self._failed("set", exc)
            return Status.INTERNAL_FAILURE
        self._recovered()
        return Status.OK if new else Status.CAS_MISMATCH

    def _items(self, vm_id: str) -> list[tuple[bytes, bytes]]:
        prefix = self._key(vm_id, b"")
        if not self._may_try():
            return []
        try:
            keys = list(self.client.scan_iter(match=_glob_escape(prefix) + b"*", count=1000))
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.hget(key, "v")
            values = pipe.execute()
        except Exception as exc:
            self._failed("scan", exc)
            return []
        self._recovered()
        return [(k[len(prefix):], v) for k, v in zip(keys, values, strict=True) if v is not None]

    def keys(self, vm_id: str) -> list[bytes]:
        return [k for k, _ in self._items(vm_id)]

    def snapshot(self, vm_id: str = "") -> dict[bytes, bytes]:
        return dict(self._items(vm_id))

    # -- outages ----------------------------------------------------------------------------
    def _may_try(self) -> bool:
        if self._down_since is None:
            return True
        now = time.monotonic()
        if now >= self._retry_at:
            with self._state:
                if now >= self._retry_at:  # one caller probes; the others keep failing fast
                    self._retry_at = now + self.retry_seconds
                    return True
        with self._state:
            self.failures += 1
            self._failures_unreported += 1
        return False

    def _failed(self, what: str, exc: BaseException) -> None:
        now = time.monotonic()
        down = isinstance(exc, _DOWN_ERRORS)
        with self._state:
            self.failures += 1
            self._failures_unreported += 1
            if down:
                if self._down_since is None:
                    self._down_since = now
                self._retry_at = now + self.retry_seconds
            if now < self._next_warning:
                return
            self._next_warning = now + self.warn_seconds
            failed, self._failures_unreported = self._failures_unreported, 0
        if down:
            log.warning("plugin shared data: Redis %s unreachable (%s: %s): gets find nothing "
                        "and sets fail (INTERNAL_FAILURE) until it answers; retried every "
                        "%.1f s; %d call(s) failed since the last warning",
                        self.describe(), what, _reason(exc), self.retry_seconds, failed)
        else:
            log.warning("plugin shared data: Redis %s refused %s: %s (%d call(s) failed since "
                        "the last warning)", self.describe(), what, _reason(exc), failed)

    def _recovered(self) -> None:
        if self._down_since is None:
            return
        with self._state:
            since, self._down_since = self._down_since, None
            failed, self._failures_unreported = self._failures_unreported, 0
            self._next_warning = 0.0
        if since is not None:
            log.warning("plugin shared data: Redis %s answers again after %.1f s (%d call(s) "
                        "failed since the last warning)", self.describe(),
                        time.monotonic() - since, failed)


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) < 200 else text[:200] + "..."


def _connect(url: str, retry_seconds: float, warn_seconds: float) -> RedisSharedData:
    return RedisSharedData(url, retry_seconds=retry_seconds, warn_seconds=warn_seconds,
                           check=False)
