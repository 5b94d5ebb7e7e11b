"""Shared data (with CAS) that spans the worker processes of one gateway (`--workers N`).

Envoy keeps one shared-data store per process, seen by all its worker threads; wasmgate's
workers are processes, so this store lives in one memory-mapped file that every worker maps.

Mechanism, and why
------------------
A file in ``/dev/shm`` (tmpfs; another temp dir where there is none) holds a fixed-size
open-addressing hash table and a value arena; every worker maps it, and every operation
runs under ``fcntl.flock`` on that same file (plus a ``threading.Lock``, since flock does not
exclude threads that share one open file).

* Speed: a host call is synchronous (it runs inside a Wasm callback), so the store must not
  wait on another process being scheduled. Here a get or set is a few struct reads/writes in
  our own address space plus two uncontended flock syscalls; ``bench/shared_cas.py`` measures a
  CAS round trip (get + set with cas) at a few µs, against tens of µs for SQLite in WAL mode
  with ``BEGIN IMMEDIATE`` (the alternative measured there). A store server in the parent over
  a unix socket would need two socket round trips and the parent to be scheduled per CAS.
* Correctness: the kernel releases a flock when its holder dies, so a worker killed at any
  point cannot wedge the others (a ``multiprocessing.Lock`` held by a killed worker stays held
  forever). A set is published by one 40-byte slot write after its value is in place (copy on
  write), so a worker killed inside a set leaves the old value or the new one, never a torn one;
  at worst an arena block leaks.
* Plain ``mmap`` of a path, rather than ``multiprocessing.shared_memory``: on Python < 3.13
  every process that attaches a SharedMemory registers it with its resource tracker, which
  unlinks the segment when that process exits. A path is also all a worker needs to attach,
  so the store pickles as its path (spawn context).

Semantics (proxy-wasm-cpp-host's ``SharedData``): keys are namespaced by vm_id; a get of a
missing key gives None; ``cas == 0`` sets unconditionally; a new key accepts any cas; an
existing key with ``cas != stored`` gives CAS_MISMATCH; every successful set takes a new CAS from
one counter over all workers and vm_ids, a u32 that skips 0 on wrap-around, as cpp-host's.
Keys are never removed (the ABI has no delete).

Limits (the price of a fixed-size segment): ``max_value`` bytes per value (default 1 MiB),
``max_key`` bytes per vm_id + key (default 64 KiB), ``slots`` keys in all (default 65 536; a new
key is refused once 7/8 are used) and ``arena_bytes`` for keys and values (default 256 MiB;
tmpfs pages are only used once written). Past a limit ``set`` returns BAD_ARGUMENT (value or
key too large) or INTERNAL_FAILURE (table or arena full), logs a warning once per kind, and
changes nothing; the store stays usable. Freed value blocks are reused by size class (powers
of two from 64 bytes), so a key whose value changes size does not grow the arena without bound.

Shared queues live in the same file (see shared_queues.py): their records are entries in a
reserved namespace of this table and their items are arena blocks, under the same lock.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib

from ..runtime.abi import Status
from ..runtime.shared import SharedDataStore
from .mapped_file import MappedFile, new_file

log = logging.getLogger("wasmgate.shared")

MAGIC = b"WGSHDAT1"
# magic, slots, max_value, arena_start, arena_end, arena_top, cas, used, max_key
_HEADER = struct.Struct("<8sIIQQQQII")
_FREE_LISTS = 64  # heads of the free lists, one per power-of-two size class
_FREE_AT = 64
_SLOTS_AT = _FREE_AT + 8 * _FREE_LISTS
_ARENA_TOP_AT = 8 + 4 + 4 + 8 + 8
_CAS_AT = _ARENA_TOP_AT + 8
_USED_AT = _CAS_AT + 8
# hash (0 = empty slot), key_len, key_off, val_off, val_len, val_class, cas
_SLOT = struct.Struct("<IIQQIIQ")
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_MIN_CLASS = 6  # 64-byte blocks at least
_ALIGN = 8


class ProcessSharedData(MappedFile, SharedDataStore):
    """A ``SharedDataStore`` over a memory-mapped file that several processes attach to.

    The parent calls :meth:`create` (and :meth:`unlink` when the gateway exits); workers call
    :meth:`attach` with :attr:`path`, or receive the store itself as a spawn argument (it
    pickles as its path).
    """

    def __init__(self, path: str, *, _fd: int | None = None) -> None:
        super().__init__()
        self._map(path, _fd)
        magic, slots, max_value, arena_start, arena_end, _, _, _, max_key = \
            _HEADER.unpack_from(self._mm, 0)
        if magic != MAGIC:
            raise ValueError(f"{path} is not a wasmgate shared-data file")
        self.slots = slots
        self.max_value = max_value
        self.max_key = max_key
        self._mask = slots - 1
        self._max_used = slots - slots // 8
        self._arena_end = arena_end
        self._arena_start = arena_start
        self._prefixes: dict[str, bytes] = {}
        self._warned: set[str] = set()
        self._out_of_space = False  # the last allocation failed for want of file space

    # -- life cycle -------------------------------------------------------------------------
    @classmethod
    def create(cls, directory: str | None = None, *, slots: int = 65536,
               arena_bytes: int = 256 << 20, max_value: int = 1 << 20,
               max_key: int = 64 << 10) -> ProcessSharedData:
        """A new, empty store in a fresh file (sparse: memory is used as it is written)."""
        if slots < 8 or slots & (slots - 1):
            raise ValueError("slots must be a power of two >= 8")
        if max_value < 1 or max_key < 1:
            raise ValueError("max_value and max_key must be positive")
        arena_start = _SLOTS_AT + slots * _SLOT.size
        arena_start += -arena_start % _ALIGN
        size = arena_start + arena_bytes
        header = _HEADER.pack(MAGIC, slots, max_value, arena_start, size, arena_start, 1, 0,
                              max_key)
        path, fd = new_file("shared", directory, size, header, reserve=arena_start)
        return cls(path, _fd=fd)

    # -- the table --------------------------------------------------------------------------
    def _full_key(self, vm_id: str, key: bytes) -> bytes:
        prefix = self._prefixes.get(vm_id)
        if prefix is None:
            raw = vm_id.encode("utf-8", "surrogateescape")
            prefix = _U32.pack(len(raw)) + raw
            if len(self._prefixes) < 1024:
                self._prefixes[vm_id] = prefix
        return prefix + bytes(key)

    def _find(self, full: bytes, h: int) -> tuple[int, tuple[int, ...] | None]:
        """(slot offset, slot fields or None if the key is absent: the slot is then empty)."""
        mm, mask, n = self._mm, self._mask, len(full)
        index = h & mask
        while True:
            at = _SLOTS_AT + index * _SLOT.size
            slot = _SLOT.unpack_from(mm, at)
            if slot[0] == 0:
                return at, None
            if slot[0] == h and slot[1] == n and mm[slot[2]:slot[2] + n] == full:
                return at, slot
            index = (index + 1) & mask

    @staticmethod
    def _hash(full: bytes) -> int:
        return zlib.crc32(full) or 1

    def get(self, vm_id: str, key: bytes) -> tuple[bytes, int] | None:
        full = self._full_key(vm_id, key)
        h = self._hash(full)
        self._acquire()
        try:
            _, slot = self._find(full, h)
            if slot is None:
                return None
            return self._mm[slot[3]:slot[3] + slot[4]], slot[6]
        finally:
            self._release()

    def set(self, vm_id: str, key: bytes, value: bytes, cas: int) -> Status:
        size = len(value)
        if size > self.max_value:
            self._warn("value", f"shared data value of {size} bytes refused: more than "
                                f"max_value={self.max_value}")
            return Status.BAD_ARGUMENT
        full = self._full_key(vm_id, key)
        if len(full) > self.max_key:
            self._warn("key", f"shared data key of {len(full)} bytes refused: more than "
                              f"max_key={self.max_key}")
            return Status.BAD_ARGUMENT
        h = self._hash(full)
        self._acquire()
        try:
            return self._set_locked(full, h, value, size, cas)
        finally:
            self._release()

    def _set_locked(self, full: bytes, h: int, value: bytes, size: int, cas: int) -> Status:
        mm = self._mm
        at, slot = self._find(full, h)
        if slot is not None and cas and slot[6] != cas:
            return Status.CAS_MISMATCH
        if slot is None:
            (used,) = _U32.unpack_from(mm, _USED_AT)
            if used >= self._max_used:
                self._warn("slots", f"shared data table full ({used} keys); new key refused")
                return Status.INTERNAL_FAILURE
            key_off = self._bump(len(full))
            if key_off is None:
                return self._arena_full()
        klass = max(_MIN_CLASS, (size - 1).bit_length())
        val_off = self._alloc(klass)
        if val_off is None:
            return self._arena_full()  # a key block bumped above is leaked: rare, harmless
        mm[val_off:val_off + size] = value
        new_cas = self._next_cas()
        if slot is None:
            mm[key_off:key_off + len(full)] = full
            _U32.pack_into(mm, _USED_AT, used + 1)
            # the non-zero hash, written with the rest of the slot, publishes the key
            _SLOT.pack_into(mm, at, h, len(full), key_off, val_off, size, klass, new_cas)
        else:
            _SLOT.pack_into(mm, at, h, slot[1], slot[2], val_off, size, klass, new_cas)
            self._free(slot[3], slot[5])
        return Status.OK

    def _next_cas(self) -> int:
        (current,) = _U64.unpack_from(self._mm, _CAS_AT)
        following = (current + 1) & 0xFFFFFFFF or 1
        _U64.pack_into(self._mm, _CAS_AT, following)
        return current

    # -- the arena --------------------------------------------------------------------------
    def _bump(self, size: int) -> int | None:
        self._out_of_space = False
        (top,) = _U64.unpack_from(self._mm, _ARENA_TOP_AT)
        end = top + size + (-size % _ALIGN)
        if end > self._arena_end:
            return None
        if not self.reserve(end):  # the directory is full: refuse rather than SIGBUS
            self._out_of_space = True
            return None
        _U64.pack_into(self._mm, _ARENA_TOP_AT, end)
        return top

    def _alloc(self, klass: int) -> int | None:
        head_at = _FREE_AT + 8 * klass
        (head,) = _U64.unpack_from(self._mm, head_at)
        if head:
            _U64.pack_into(self._mm, head_at, _U64.unpack_from(self._mm, head)[0])
            return head
        return self._bump(1 << klass)

    def _free(self, offset: int, klass: int) -> None:
        head_at = _FREE_AT + 8 * klass
        self._mm[offset:offset + 8] = self._mm[head_at:head_at + 8]
        _U64.pack_into(self._mm, head_at, offset)

    def _arena_full(self) -> Status:
        if self._out_of_space:
            (top,) = _U64.unpack_from(self._mm, _ARENA_TOP_AT)
            self._warn("space", f"no space left in {os.path.dirname(self.path)} for shared "
                                f"data ({top - self._arena_start} bytes used); set refused")
        else:
            self._warn("arena", f"shared data arena full ({self._arena_end - self._arena_start}"
                                " bytes); set refused")
        return Status.INTERNAL_FAILURE

    def _warn(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            log.warning("%s (logged once per worker)", message)

    # -- primitives for other structures in the same file (shared_queues.py) ---------------
    # Callers hold the lock (``with store.locked():``) around every call below.
    def value_at_locked(self, vm_id: str, key: bytes) -> tuple[int, int] | None:
        """(offset, length) of the value stored under ``key``, or None: to update in place."""
        full = self._full_key(vm_id, key)
        _, slot = self._find(full, self._hash(full))
        return None if slot is None else (slot[3], slot[4])

    def put_locked(self, vm_id: str, key: bytes, value: bytes) -> Status:
        """An unconditional set, as :meth:`set` with ``cas == 0``."""
        full = self._full_key(vm_id, key)
        if len(value) > self.max_value or len(full) > self.max_key:
            return Status.BAD_ARGUMENT
        return self._set_locked(full, self._hash(full), value, len(value), 0)

    def alloc_locked(self, size: int) -> tuple[int, int] | None:
        """A block of at least ``size`` bytes: (offset, size class), or None if the arena is
        full. Give it back with :meth:`free_locked`."""
        klass = max(_MIN_CLASS, (size - 1).bit_length())
        offset = self._alloc(klass)
        return None if offset is None else (offset, klass)

    def free_locked(self, offset: int, klass: int) -> None:
        self._free(offset, klass)

    # -- inspection -------------------------------------------------------------------------
    def _items(self, vm_id: str) -> list[tuple[bytes, bytes]]:
        prefix = self._full_key(vm_id, b"")
        out: list[tuple[bytes, bytes]] = []
        mm = self._mm
        self._acquire()
        try:
            for index in range(self.slots):
                slot = _SLOT.unpack_from(mm, _SLOTS_AT + index * _SLOT.size)
                if slot[0] == 0:
                    continue
                full = mm[slot[2]:slot[2] + slot[1]]
                if full.startswith(prefix):
                    out.append((full[len(prefix):], mm[slot[3]:slot[3] + slot[4]]))
        finally:
            self._release()
        return out

    def keys(self, vm_id: str) -> list[bytes]:
        return [k for k, _ in self._items(vm_id)]

    def snapshot(self, vm_id: str = "") -> dict[bytes, bytes]:
        return dict(self._items(vm_id))

    def stats(self) -> dict[str, int]:
        """Keys stored, arena bytes handed out, and the capacity of each."""
        _, _, _, start, end, top, _, used, _ = _HEADER.unpack_from(self._mm, 0)
        return {"keys": used, "key_capacity": self._max_used, "arena_used": top - start,
                "arena_capacity": end - start}
