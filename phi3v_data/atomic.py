"""Atomic file writes (a file appears under its final name complete, or not at all) and the
exclusive, non-blocking lock a command takes on the folder it writes into."""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from functools import cache
from pathlib import Path
from typing import IO


@cache
def _umask() -> int:
    """The process umask (os.umask can only be read by setting it; done once, on first use)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_open(path: Path, temp_dir: Path | None = None) -> Iterator[IO[bytes]]:
    """Open a temporary file in ``temp_dir`` (default: beside ``path``); rename it onto ``path``
    when the block ends without error, delete it otherwise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp_dir = temp_dir or path.parent
    temp_dir.mkdir(parents=True, exist_ok=True)
    descriptor, temp_name = tempfile.mkstemp(dir=temp_dir, prefix=f".{path.name}.")
    try:
        os.chmod(temp_name, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual mode
        with os.fdopen(descriptor, "wb") as handle:
            yield handle
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def write_atomic(path: Path, data: bytes, temp_dir: Path | None = None) -> None:
    """Write ``data`` under a temporary name, then rename it onto ``path``."""
    with atomic_open(path, temp_dir) as handle:
        handle.write(data)


class LockHeld(OSError):
    """Another process holds the exclusive lock (``filename`` is the lock file)."""


@contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` for the block, or raise :class:`LockHeld` at once.

    Never waits: a second run into the same folder is refused, not queued. The lock file is
    created when missing and removed on release (while still held); a run that finds the file
    it locked already replaced or removed by such a release starts over, so two runs can never
    both believe they hold the lock. A run killed with SIGKILL leaves the file behind, unlocked
    (the kernel drops the lock), and the next run takes it.
    """
    import fcntl

    while True:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        descriptor = os.open(path, flags, 0o666)  # no symlink followed, no FIFO waited on
        try:
            if not stat.S_ISREG(os.fstat(descriptor).st_mode):
                raise OSError(errno.EINVAL, "is not a regular file (cannot lock it)", str(path))
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise LockHeld(
                errno.EWOULDBLOCK, "locked by another run writing into the same folder", str(path)
            ) from None
        except BaseException:
            os.close(descriptor)
            raise
        try:
            current = os.stat(path)
        except FileNotFoundError:
            current = None
        held = os.fstat(descriptor)
        if current is not None and (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
            break
        os.close(descriptor)  # released and removed by its previous holder meanwhile: retry
    try:
        yield
    finally:
        with suppress(OSError):  # read-only by now, or removed: the kernel lock is what counts
            os.unlink(path)
        os.close(descriptor)
