"""Process-wide shared data (with CAS) and shared queues, as proxy-wasm-cpp-host keeps them.

Both are namespaced by vm_id and safe to use from several threads. An embedder that runs
several worker processes replaces these stores with ones that span the processes.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .abi import Status


class SharedDataStore:
    """vm_id -> key -> (value, cas). Every successful set takes a new CAS from one counter,
    a u32 that skips 0 when it wraps, as proxy-wasm-cpp-host's."""

    def __init__(self) -> None:
        self._data: dict[str, dict[bytes, tuple[bytes, int]]] = {}
        self._cas_counter = 1
        self._lock = threading.Lock()

    def get(self, vm_id: str, key: bytes) -> tuple[bytes, int] | None:
        with self._lock:
            return self._data.get(vm_id, {}).get(key)

    def set(self, vm_id: str, key: bytes, value: bytes, cas: int) -> Status:
        with self._lock:
            space = self._data.setdefault(vm_id, {})
            current = space.get(key)
            if cas and current is not None and current[1] != cas:
                return Status.CAS_MISMATCH
            space[key] = (bytes(value), self._cas_counter)
            self._cas_counter = (self._cas_counter + 1) & 0xFFFFFFFF or 1
            return Status.OK

    def keys(self, vm_id: str) -> list[bytes]:
        with self._lock:
            return list(self._data.get(vm_id, {}))

    def snapshot(self, vm_id: str = "") -> dict[bytes, bytes]:
        with self._lock:
            return {k: v for k, (v, _) in self._data.get(vm_id, {}).items()}


@dataclass
class SharedQueue:
    vm_id: str
    name: str
    token: int
    owner: object  # whoever registered last receives on_queue_ready (a Plugin)
    items: deque[bytes] = field(default_factory=deque)


class SharedQueueStore:
    """(vm_id, name) -> queue; tokens from one counter, never 0."""

    def __init__(self) -> None:
        self._by_name: dict[tuple[str, str], SharedQueue] = {}
        self._by_token: dict[int, SharedQueue] = {}
        self._tokens = itertools.count(1)
        self._lock = threading.Lock()

    def register(self, vm_id: str, name: str, owner: object) -> int | Status:
        """The queue's token (a new one if it did not exist); ``owner`` receives its
        ``on_queue_ready`` from now on. A store with finite room may return a failure Status."""
        with self._lock:
            queue = self._by_name.get((vm_id, name))
            if queue is None:
                queue = SharedQueue(vm_id, name, next(self._tokens), owner)
                self._by_name[(vm_id, name)] = queue
                self._by_token[queue.token] = queue
            queue.owner = owner
            return queue.token

    def resolve(self, vm_id: str, name: str) -> int | None:
        with self._lock:
            queue = self._by_name.get((vm_id, name))
            return queue.token if queue else None

    def enqueue(self, token: int, data: bytes,
                notify: Callable[[object, int], None]) -> Status:
        with self._lock:
            queue = self._by_token.get(token)
            if queue is None:
                return Status.NOT_FOUND
            queue.items.append(bytes(data))
            owner = queue.owner
        notify(owner, token)
        return Status.OK

    def dequeue(self, token: int) -> bytes | Status:
        with self._lock:
            queue = self._by_token.get(token)
            if queue is None:
                return Status.NOT_FOUND
            if not queue.items:
                return Status.EMPTY
            return queue.items.popleft()

    def items(self, token: int) -> list[bytes]:
        with self._lock:
            queue = self._by_token.get(token)
            return list(queue.items) if queue else []

    def token_of(self, vm_id: str, name: str) -> int | None:
        return self.resolve(vm_id, name)
