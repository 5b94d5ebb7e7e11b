"""Shared queues that span the worker processes of one gateway (`--workers N`).

Envoy has one set of shared queues per process, seen by every worker thread: any VM can
resolve a queue, enqueue on it and dequeue from it (an item is dequeued once, globally), and
whoever registered the queue last is told ``on_queue_ready`` on its own thread. wasmgate's
workers are processes, so the queues live in the shared-data file (shared_store.py) under the
same lock, and the "call on the owner's thread" becomes a datagram to the owner's process.

Layout, in a reserved namespace of the shared-data table (a vm_id no plugin can have):
  ``N`` + vm_id + name  -> token (u32), written once
  ``T`` + token         -> queue record: head, tail (arena offsets of item blocks, 0 = none),
                           item count, owner worker (-1 = none); updated in place
  ``next``              -> the next token (u32, never 0)
Each item is an arena block ``[next offset u64][length u32][size class u32][bytes]``: enqueue
and dequeue are O(1) and a dequeued block goes back to the arena's free lists.

Wake-ups: each worker binds an abstract unix datagram socket named after the store's file and
its index. Enqueue sends the 4-byte token to the owner worker's socket (non-blocking); the
owner's event loop reads it and delivers ``on_queue_ready`` to the VM that registered last in
that process. An enqueue in the owner's own process notifies directly. If the owner has exited
the items stay for anyone to dequeue; if its socket buffer is full the wake-up is dropped and
logged (the item stays; the next wake-up lets the plugin drain it).

Why not the parent as a queue broker over pipes: a host call is synchronous, and a round trip
through another process costs tens of µs and a scheduling of that process per call; here an
operation is a few struct reads/writes under the flock the shared data already uses.

Limits: an item is at most the store's ``max_value`` bytes; items share the arena with shared
data. Past either, enqueue returns INTERNAL_FAILURE and logs once (nothing is changed).
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import os
import socket
import struct
import threading
from collections.abc import Callable

from ..runtime.abi import Status
from ..runtime.shared import SharedQueueStore
from .shared_store import ProcessSharedData

log = logging.getLogger("wasmgate.shared")

_NAMESPACE = "\x00wasmgate.queues"
_U32 = struct.Struct("<I")
# head offset, tail offset, item count, owner worker
_RECORD = struct.Struct("<QQIi")
# next item offset, length, size class
_ITEM = struct.Struct("<QII")

Notify = Callable[[object, int], None]


class ProcessSharedQueues(SharedQueueStore):
    """A ``SharedQueueStore`` in a ``ProcessSharedData`` file, for worker ``worker``."""

    def __init__(self, store: ProcessSharedData, worker: int) -> None:
        super().__init__()
        self.store = store
        self.worker = worker
        self._owners: dict[int, object] = {}  # token -> the VM that registered last HERE
        self._owners_lock = threading.Lock()
        self._records: dict[int, int] = {}  # token -> offset of its record (never moves)
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.setblocking(False)
        self._socket.bind(self._address(worker))
        self._sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sender.setblocking(False)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._notify: Notify | None = None
        self._warned: set[str] = set()

    def _address(self, worker: int) -> bytes:
        return b"\0wasmgate-queues-" + os.path.basename(self.store.path).encode() + \
            f"-{worker}".encode()

    # -- wake-ups ---------------------------------------------------------------------------
    def listen(self, loop: asyncio.AbstractEventLoop, notify: Notify) -> None:
        """Deliver wake-ups sent by other workers to ``notify(owner, token)`` on ``loop``."""
        self._loop, self._notify = loop, notify
        loop.add_reader(self._socket.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        while True:
            try:
                data = self._socket.recv(64)
            except (BlockingIOError, InterruptedError):
                return
            if len(data) != _U32.size or self._notify is None:
                continue
            (token,) = _U32.unpack(data)
            with self._owners_lock:
                owner = self._owners.get(token)
            if owner is not None:
                self._notify(owner, token)

    def _wake(self, worker: int, token: int, notify: Notify) -> None:
        if worker == self.worker:
            with self._owners_lock:
                owner = self._owners.get(token)
            if owner is not None:
                notify(owner, token)
            return
        try:
            self._sender.sendto(_U32.pack(token), self._address(worker))
        except (ConnectionRefusedError, FileNotFoundError):
            log.debug("queue %d: owner worker %d has gone; the item waits", token, worker)
        except (BlockingIOError, OSError) as exc:
            self._warn("wake", f"queue wake-up to worker {worker} dropped: {exc}")

    def close(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._socket.fileno())
        self._socket.close()
        self._sender.close()

    # -- the SharedQueueStore interface ------------------------------------------------------
    def register(self, vm_id: str, name: str, owner: object) -> int | Status:
        store = self.store
        name_key = b"N" + _name_key(vm_id, name)
        with store.locked() as mm:
            found = store.value_at_locked(_NAMESPACE, name_key)
            if found is not None:
                (token,) = _U32.unpack_from(mm, found[0])
                record_at = self._record_at(token)
            else:
                token = self._next_token(mm)
                record = _RECORD.pack(0, 0, 0, self.worker)
                for key, value in ((b"T" + _U32.pack(token), record),
                                   (name_key, _U32.pack(token))):
                    status = store.put_locked(_NAMESPACE, key, value)
                    if status != Status.OK:
                        self._warn("register", f"queue {name!r} not registered: the shared-data"
                                               " file is full")
                        return status
                record_at = self._record_at(token)
            assert record_at is not None
            head, tail, count, _ = _RECORD.unpack_from(mm, record_at)
            _RECORD.pack_into(mm, record_at, head, tail, count, self.worker)
        with self._owners_lock:
            self._owners[token] = owner
        return token

    def resolve(self, vm_id: str, name: str) -> int | None:
        store = self.store
        with store.locked() as mm:
            found = store.value_at_locked(_NAMESPACE, b"N" + _name_key(vm_id, name))
            return None if found is None else _U32.unpack_from(mm, found[0])[0]

    def enqueue(self, token: int, data: bytes, notify: Notify) -> Status:
        store = self.store
        size = len(data)
        if size > store.max_value:
            self._warn("size", f"queue item of {size} bytes refused: more than "
                               f"max_value={store.max_value}")
            return Status.INTERNAL_FAILURE
        with store.locked() as mm:
            record_at = self._record_at(token)
            if record_at is None:
                return Status.NOT_FOUND
            block = store.alloc_locked(_ITEM.size + size)
            if block is None:
                self._warn("arena", "shared-data arena full; queue item refused")
                return Status.INTERNAL_FAILURE
            offset, klass = block
            _ITEM.pack_into(mm, offset, 0, size, klass)
            mm[offset + _ITEM.size:offset + _ITEM.size + size] = data
            head, tail, count, owner = _RECORD.unpack_from(mm, record_at)
            if tail:
                mm[tail:tail + 8] = offset.to_bytes(8, "little")
            else:
                head = offset
            _RECORD.pack_into(mm, record_at, head, offset, count + 1, owner)
        if owner >= 0:
            self._wake(owner, token, notify)
        return Status.OK

    def dequeue(self, token: int) -> bytes | Status:
        store = self.store
        with store.locked() as mm:
            record_at = self._record_at(token)
            if record_at is None:
                return Status.NOT_FOUND
            head, tail, count, owner = _RECORD.unpack_from(mm, record_at)
            if not head:
                return Status.EMPTY
            following, size, klass = _ITEM.unpack_from(mm, head)
            item = mm[head + _ITEM.size:head + _ITEM.size + size]
            _RECORD.pack_into(mm, record_at, following, tail if following else 0,
                              max(count - 1, 0), owner)
            store.free_locked(head, klass)
            return item

    def items(self, token: int) -> list[bytes]:
        store = self.store
        out: list[bytes] = []
        with store.locked() as mm:
            record_at = self._record_at(token)
            if record_at is None:
                return out
            at = _RECORD.unpack_from(mm, record_at)[0]
            while at:
                following, size, _ = _ITEM.unpack_from(mm, at)
                out.append(mm[at + _ITEM.size:at + _ITEM.size + size])
                at = following
        return out

    # -- helpers (lock held) -----------------------------------------------------------------
    def _record_at(self, token: int) -> int | None:
        # a record is written once and then only updated in place: its offset never changes
        record_at = self._records.get(token)
        if record_at is None:
            found = self.store.value_at_locked(_NAMESPACE, b"T" + _U32.pack(token))
            if found is None:
                return None
            record_at = self._records[token] = found[0]
        return record_at

    def _next_token(self, mm: mmap.mmap) -> int:
        store = self.store
        found = store.value_at_locked(_NAMESPACE, b"next")
        token = 1 if found is None else _U32.unpack_from(mm, found[0])[0]
        following = (token + 1) & 0xFFFFFFFF or 1
        if found is None:
            store.put_locked(_NAMESPACE, b"next", _U32.pack(following))
        else:
            _U32.pack_into(mm, found[0], following)
        return token

    def _warn(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning("%s (logged once per worker)", message)


def _name_key(vm_id: str, name: str) -> bytes:
    raw = vm_id.encode("utf-8", "surrogateescape")
    return _U32.pack(len(raw)) + raw + name.encode("utf-8", "surrogateescape")
