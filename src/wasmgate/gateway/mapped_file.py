"""A file that every worker process maps, and the lock that guards it.

The mechanics shared by the stores that span `--workers` (shared_store.py for shared data and
queues, shared_metrics.py for plugin metrics); why a mapped file + flock is explained in
shared_store.py. A file in ``/dev/shm`` (tmpfs; another temp dir where there is none) made by
the parent with a fresh name, mapped by every worker; a store pickles as its path (spawn), and
``flock`` on the file (plus a ``threading.Lock``, since flock does not exclude threads that
share one open file) serializes every operation across processes.

The files are sparse, and a page of a sparse tmpfs file is allocated when first written: on
a full tmpfs (a container's /dev/shm is 64 MB by default) that write is a SIGBUS that kills
the worker. So the pages are reserved (``posix_fallocate``) before they are first written:
the fixed part (header and tables) when the file is made, which fails at startup naming the
directory, and the arena ahead of its top in RESERVE_STEP steps, where running out of space
is a refused operation (and one warning) like a full arena.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self


def default_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) \
        else tempfile.gettempdir()


RESERVE_STEP = 1 << 20
"""How far ahead of what is needed the arena's pages are reserved (one syscall per step)."""


class NoSpace(OSError):
    """The file's directory has no room for the pages a store needs."""


def new_file(kind: str, directory: str | None, size: int, header: bytes,
             reserve: int) -> tuple[str, int]:
    """A fresh sparse file of ``size`` bytes starting with ``header``, its first ``reserve``
    bytes (header and tables) backed by real pages: (path, open fd)."""
    directory = directory or default_dir()
    path = os.path.join(directory, f"wasmgate-{kind}-{os.getpid()}-{uuid.uuid4().hex}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
        try:
            os.posix_fallocate(fd, 0, reserve)
        except OSError as exc:
            raise NoSpace(exc.errno, f"cannot reserve {reserve} bytes for the {kind} file in "
                          f"{directory}: {exc.strerror} (a container's /dev/shm is 64 MB "
                          "unless --shm-size says more)") from None
        os.pwrite(fd, header, 0)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    return path, fd


class MappedFile:
    """Maps ``path`` (or an fd already open on it) and guards it with flock."""

    def _map(self, path: str, fd: int | None) -> None:
        self.path = path
        self._fd = fd if fd is not None else os.open(path, os.O_RDWR)
        self._size = os.fstat(self._fd).st_size
        self._mm = mmap.mmap(self._fd, self._size)
        self._tlock = threading.Lock()
        self._reserved = 0  # this process knows the pages below this offset are backed

    def reserve(self, end: int) -> bool:
        """Back the file's pages up to ``end`` (and up to RESERVE_STEP beyond) before they are
        written; False if the filesystem has no room (the caller refuses the operation)."""
        if end <= self._reserved:
            return True
        start = self._reserved
        upto = min(self._size, end + RESERVE_STEP)
        try:  # (pages another worker already backed are only looked up)
            os.posix_fallocate(self._fd, start, upto - start)
        except OSError:
            try:
                os.posix_fallocate(self._fd, start, end - start)
            except OSError:
                return False
            upto = end
        self._reserved = upto
        return True

    @classmethod
    def attach(cls, path: str | os.PathLike[str]) -> Self:
        return cls(os.fspath(path))  # type: ignore[call-arg]

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (type(self).attach, (self.path,))

    def close(self) -> None:
        if self._fd < 0:
            return
        self._mm.close()
        os.close(self._fd)
        self._fd = -1

    def unlink(self) -> None:
        """Remove the file (attached processes keep their mapping until they close)."""
        Path(self.path).unlink(missing_ok=True)

    # -- locking ----------------------------------------------------------------------------
    def _acquire(self) -> None:
        self._tlock.acquire()
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        except BaseException:
            self._tlock.release()
            raise

    def _release(self) -> None:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._tlock.release()

    @contextlib.contextmanager
    def locked(self) -> Iterator[mmap.mmap]:
        """The lock, and the mapping to read and write under it."""
        self._acquire()
        try:
            yield self._mm
        finally:
            self._release()
