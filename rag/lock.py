"""Inter-process locks of a store: one writer at a time, and index files never swapped under a reader.

``write.lock`` is held (exclusively) for a whole ingest, delete or index build: a second writer waits up to
its time-out, then fails with one line naming the holder. ``swap.lock`` is held briefly: exclusively while
a writer replaces an index folder and records it, shared while a reader loads an index, so a reader never
sees a folder half swapped. Both are ``fcntl.flock`` locks on files in the store folder: the kernel drops
them when the holding process dies (kill -9 included), so a crash never leaves a store locked.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from pathlib import Path

DEFAULT_TIMEOUT = float(os.environ.get("BLOCKRAG_LOCK_TIMEOUT", "120"))


class StoreBusy(RuntimeError):
    """Another process held the store's write lock for longer than the time-out."""


class _FileLock:
    """A flock on one file, re-entrant within a process (threads of one process share it via an RLock)."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None
        self._depth = 0
        self._mode = None
        self._thread_lock = threading.RLock()

    def _holder(self) -> str:
        try:
            pid = self.path.read_text().strip()
        except OSError:
            pid = ""
        return f"process {pid}" if pid.isdigit() else "another process"

    @contextlib.contextmanager
    def hold(self, exclusive: bool = True, timeout: float | None = None, what: str = "write to"):
        timeout = DEFAULT_TIMEOUT if timeout is None else timeout
        deadline = time.monotonic() + timeout
        # threads of this process first queue on the RLock (the same thread re-enters at once) ...
        if not self._thread_lock.acquire(timeout=timeout if timeout >= 0 else -1):
            raise StoreBusy(f"cannot {what} {self.path.parent}: another thread of this process holds its lock "
                            f"(waited {timeout:.0f}s)")
        try:
            if self._depth:  # re-entry by the same thread: an exclusive hold covers a shared one
                if exclusive and self._mode != fcntl.LOCK_EX:
                    raise RuntimeError(f"{self.path}: cannot upgrade a shared lock to an exclusive one")
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            # ... then processes on the flock
            mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            delay = 0.005
            try:
                while True:
                    try:
                        fcntl.flock(fd, mode | fcntl.LOCK_NB)
                        break
                    except BlockingIOError:
                        if time.monotonic() >= deadline:
                            raise StoreBusy(f"cannot {what} {self.path.parent}: {self._holder()} holds its lock "
                                            f"(waited {timeout:.0f}s; BLOCKRAG_LOCK_TIMEOUT sets the wait)") from None
                        time.sleep(delay)
                        delay = min(delay * 2, 0.1)
            except BaseException:
                os.close(fd)
                raise
            if exclusive:  # who holds it, for the message another writer prints
                os.ftruncate(fd, 0)
                os.pwrite(fd, str(os.getpid()).encode(), 0)
            self._fd, self._depth, self._mode = fd, 1, mode
            try:
                yield
            finally:
                self._depth = 0
                self._fd = None
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
        finally:
            self._thread_lock.release()

    @property
    def held(self) -> bool:
        return self._depth > 0


_REGISTRY: dict[str, _FileLock] = {}
_REGISTRY_LOCK = threading.Lock()


def _file_lock(path: Path) -> _FileLock:
    # one object per lock file and process: two Collections of one store in one process share it (two
    # flocks of one process on one file would otherwise block each other)
    key = os.path.realpath(path)
    with _REGISTRY_LOCK:
        if key not in _REGISTRY:
            _REGISTRY[key] = _FileLock(Path(path))
        return _REGISTRY[key]


class StoreLocks:
    """The two locks of one store folder (see the module docstring)."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        self.write = _file_lock(folder / "write.lock")
        self.swap = _file_lock(folder / "swap.lock")

    def writing(self, timeout: float | None = None):
        """Exclusive write lock (ingest, delete, index build)."""
        return self.write.hold(True, timeout, "write to")

    def swapping(self):
        """Exclusive, brief: replacing index folders and recording them."""
        return self.swap.hold(True, None, "update the indexes of")

    def reading(self):
        """Shared, brief: loading index folders."""
        return self.swap.hold(False, None, "read the indexes of")
