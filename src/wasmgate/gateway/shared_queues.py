"""Shared queues that span the worker processes of one gateway (`--workers N`).

Envoy has one set of shared queues per process, seen by every worker thread: any VM can
resolve a queue, enqueue on it and dequeue from it (an item is dequeued once, globally), and
whoever registered the queue last is told ``on_queue_ready`` on its own thread. wasmgate's
workers are processes, so the queues live in the shared-data file (shared_store.py) under the
same lock, and the "call on the owner's thread" becomes a datagram to the owner's process.

Layout, in a reserved namespace of the shared-data table (a vm_id no plugin can have):
  ``N`` + vm_id + name  -> token (u32), written once
  ``T`` + token         -> queue record: head, tail (arena offsets of item blocks, 0 = none),
                           item count, owner worker (-1 = none), wake-ups owed to the owner
                           by other workers; updated in place
  ``next``              -> the next token (u32, never 0)
Each item is an arena block ``[next offset u64][length u32][size class u32][bytes]``: enqueue
and dequeue are O(1) and a dequeued block goes back to the arena's free lists.

Wake-ups: Envoy calls ``on_queue_ready`` once per enqueue, and plugins commonly dequeue one
item per call, so no wake-up may be lost. An enqueue in the owner's own process notifies
directly. An enqueue in another worker adds one to the record's owed count, under the lock,
and only when that count goes from 0 to 1 sends the 4-byte token as a datagram to the owner's
abstract unix socket (named after the store's file and the worker index). The owner's event
loop reads it, takes the owed count (resetting it to 0) and delivers that many
``on_queue_ready`` to the VM that registered last in that process. So at most one datagram per
queue is in flight, and the kernel's small datagram queue (``net.unix.max_dgram_qlen``, often
10) cannot drop wake-ups; should a datagram still be lost (more queues than that, all owed at
once), the owner sweeps its queues for owed wake-ups every second. If the owner has exited the
items stay for anyone to dequeue.

Crash safety: a worker killed inside an operation leaves a consistent queue, at worst losing
the item being enqueued (its block leaks): dequeue never follows the link out of the tail.

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
# head offset, tail offset, item count, owner worker, wake-ups owed to the owner
_RECORD = struct.Struct("<QQIiI")
SWEEP_SECONDS = 1.0
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
        self._sweeper: asyncio.TimerHandle | None = None
        self._warned: set[str] = set()

    def _address(self, worker: int) -> bytes:
        return b"\0wasmgate-queues-" + os.path.basename(self.store.path).encode() + \
            f"-{worker}".encode()

    # -- wake-ups ---------------------------------------------------------------------------
    def listen(self, loop: asyncio.AbstractEventLoop, notify: Notify) -> None:
        """Deliver wake-ups owed by other workers to ``notify(owner, token)`` on ``loop``."""
        self._loop, self._notify = loop, notify
        loop.add_reader(self._socket.fileno(), self._on_readable)
        self._sweeper = loop.call_later(SWEEP_SECONDS, self._sweep)

    def _on_readable(self) -> None:
        while True:
            try:
                data = self._socket.recv(64)
            except (BlockingIOError, InterruptedError):
                return
            if len(data) == _U32.size:
                self._deliver_owed(_U32.unpack(data)[0])

    def _sweep(self) -> None:
        """The safety net for a lost datagram: deliver what is owed on this worker's queues."""
        with self._owners_lock:
            tokens = list(self._owners)
        for token in tokens:
            self._deliver_owed(token)
        if self._loop is not None:
            self._sweeper = self._loop.call_later(SWEEP_SECONDS, self._sweep)

    def _deliver_owed(self, token: int) -> None:
        store = self.store
        with store.locked() as mm:
            record_at = self._record_at(token)
            if record_at is None:
                return
            head, tail, count, owner, owed = _RECORD.unpack_from(mm, record_at)
            if not owed:
                return
            _RECORD.pack_into(mm, record_at, head, tail, count, owner, 0)
        with self._owners_lock:
            local = self._owners.get(token)
        if local is not None and self._notify is not None:
            for _ in range(owed):
                self._notify(local, token)

    def _send_wake(self, worker: int, token: int) -> None:
        try:
            self._sender.sendto(_U32.pack(token), self._address(worker))
        except (ConnectionRefusedError, FileNotFoundError):
            log.debug("queue %d: owner worker %d has gone; the item waits", token, worker)
        except OSError as exc:  # its datagram queue is full: the owner's sweep delivers
            self._warn("wake", f"queue wake-up datagram to worker {worker} not sent ({exc}); "
                               "the owner's periodic sweep delivers it")

    def close(self) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._socket.fileno())
            if self._sweeper is not None:
                self._sweeper.cancel()
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
                if isinstance(token, Status):
                    self._warn("register", f"queue {name!r} not registered: the shared-data"
                                           " file is full")
                    return token
                record = _RECORD.pack(0, 0, 0, self.worker, 0)
                for key, value in ((b"T" + _U32.pack(token), record),
                                   (name_key, _U32.pack(token))):
                    status = store.put_locked(_NAMESPACE, key, value)
                    if status != Status.OK:
                        self._warn("register", f"queue {name!r} not registered: the shared-data"
                                               " file is full")
                        return status
                record_at = self._record_at(token)
            assert record_at is not None
            head, tail, count, _, owed = _RECORD.unpack_from(mm, record_at)
            # wake-ups owed to the previous owner: this worker's sweep delivers them
            _RECORD.pack_into(mm, record_at, head, tail, count, self.worker, owed)
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
            head, tail, count, owner, owed = _RECORD.unpack_from(mm, record_at)
            if tail:
                mm[tail:tail + 8] = offset.to_bytes(8, "little")
            else:
                head = offset
            remote = owner >= 0 and owner != self.worker
            if remote:
                owed += 1
            _RECORD.pack_into(mm, record_at, head, offset, count + 1, owner, owed)
        if remote:
            if owed == 1:  # nothing in flight to the owner yet
                self._send_wake(owner, token)
        elif owner == self.worker:
            with self._owners_lock:
                local = self._owners.get(token)
            if local is not None:
                notify(local, token)
        return Status.OK

    def dequeue(self, token: int) -> bytes | Status:
        store = self.store
        with store.locked() as mm:
            record_at = self._record_at(token)
            if record_at is None:
                return Status.NOT_FOUND
            head, tail, count, owner, owed = _RECORD.unpack_from(mm, record_at)
            if not head:
                return Status.EMPTY
            following, size, klass = _ITEM.unpack_from(mm, head)
            item = mm[head + _ITEM.size:head + _ITEM.size + size]
            if head == tail:  # never follow a link out of the tail (see "Crash safety")
                _RECORD.pack_into(mm, record_at, 0, 0, 0, owner, owed)
            else:
                _RECORD.pack_into(mm, record_at, following, tail, max(count - 1, 0), owner,
                                  owed)
            store.free_locked(head, klass)
            return item

    def items(self, token: int) -> list[bytes]:
        store = self.store
        out: list[bytes] = []
        with store.locked() as mm:
            record_at = self._record_at(token)
            if record_at is None:
                return out
            at, tail = _RECORD.unpack_from(mm, record_at)[:2]
            while at:
                following, size, _ = _ITEM.unpack_from(mm, at)
                out.append(mm[at + _ITEM.size:at + _ITEM.size + size])
                at = following if at != tail else 0
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

    def _next_token(self, mm: mmap.mmap) -> int | Status:
        store = self.store
        found = store.value_at_locked(_NAMESPACE, b"next")
        token = 1 if found is None else _U32.unpack_from(mm, found[0])[0]
        following = (token + 1) & 0xFFFFFFFF or 1
        if found is None:
            status = store.put_locked(_NAMESPACE, b"next", _U32.pack(following))
            if status != Status.OK:
                return status
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
