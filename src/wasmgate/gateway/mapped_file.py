"""A file that every worker process maps, and the lock that guards it.

The mechanics shared by the stores that span `--workers` (shared_store.py for shared data and
queues, shared_metrics.py for plugin metrics); why a mapped file + flock is explained in
shared_store.py. A file in ``/dev/shm`` (tmpfs; another temp dir where there is none) made by
the parent with a fresh name, mapped by every worker; a store pickles as its path (spawn), and
``flock`` on the file (plus a ``threading.Lock``, since flock does not exclude threads that
share one open file) serializes every operation across processes.
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


def new_file(kind: str, directory: str | None, size: int, header: bytes) -> tuple[str, int]:
    """A fresh sparse file of ``size`` bytes starting with ``header``: (path, open fd)."""
    directory = directory or default_dir()
    path = os.path.join(directory, f"wasmgate-{kind}-{os.getpid()}-{uuid.uuid4().hex}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
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
        self._mm = mmap.mmap(self._fd, os.fstat(self._fd).st_size)
        self._tlock = threading.Lock()

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
