"""The one place for the file-system safety rules every command follows.

- A path built from data (ids, file names, URLs, archive members) is joined to its root with
  :func:`join_inside`, which refuses anything that would leave the root *before* a byte is read or
  written (absolute paths, ``..``, backslashes, NUL, and symlinks of existing parents that lead out).
- Files named by users or data are opened with :func:`open_regular`: only regular files, opened
  without blocking (a FIFO or a device where a file belongs is refused at once, never waited on).
- :func:`is_environment_error` tells a fault of the machine (disk full, read-only, I/O error,
  permission) from a fault of one record, so that no run records the first as the second.
- :func:`describe_os_error` turns any ``OSError`` into the one line a user sees.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO

#: errno values that are the machine's fault, never one record's: a run stops on them.
ENVIRONMENT_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EIO,
        errno.EROFS,
        errno.EACCES,
        errno.EPERM,
        errno.ENOMEM,
        errno.EMFILE,
        errno.ENFILE,
    }
)


class UnsafePath(ValueError):
    """A path built from data would leave its root."""


class NotRegularFile(OSError):
    """A FIFO, device, socket or directory where a regular file belongs."""


def join_inside(root: Path, relative: str, *, what: str = "path") -> Path:
    """``root / relative``, refused with :class:`UnsafePath` if it could land outside ``root``.

    Checked lexically (absolute, ``..``, ``\\``, NUL, empty parts) and then through the real file
    system: an existing symlink on the way that resolves outside ``root`` is refused too.
    """
    text = str(relative)
    if not text or "\x00" in text or "\\" in text or text.startswith("/") or os.path.isabs(text):
        raise UnsafePath(f"{what} {text!r} is not a relative POSIX path")
    parts = text.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise UnsafePath(f"{what} {text!r} has an empty, '.' or '..' component")
    real_root = os.path.realpath(root)
    resolved = os.path.realpath(os.path.join(real_root, *parts))
    if not is_inside(real_root, resolved):
        raise UnsafePath(f"{what} {text!r} resolves to {resolved}, outside {root}")
    return Path(root, *parts)


def is_inside(real_root: str | Path, resolved: str | Path) -> bool:
    """True when the resolved path ``resolved`` is ``real_root`` or below it (both realpaths)."""
    root, path = str(real_root), str(resolved)
    return path == root or path.startswith(root + os.sep)


def open_regular(path: Path | str) -> BinaryIO:
    """Open ``path`` for binary reading if it is a regular file; never blocks.

    Symlinks are followed (callers that must stay inside a root check with :func:`join_inside`
    first). Raises :class:`NotRegularFile` for a FIFO, device, socket or directory, and the usual
    ``OSError`` (with ``filename`` set) for a missing or unreadable file.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        descriptor = os.open(path, flags)
    except IsADirectoryError as error:
        raise NotRegularFile(errno.EISDIR, "is a directory, not a file", str(path)) from error
    try:
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO, device or socket"
            raise NotRegularFile(errno.EINVAL, f"is {kind}, not a regular file", str(path))
        os.set_blocking(descriptor, True)
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


def read_regular_bytes(path: Path | str, max_bytes: int | None = None) -> bytes:
    """The bytes of a regular file (at most ``max_bytes``+1 when given, so callers can tell)."""
    with open_regular(path) as handle:
        return handle.read() if max_bytes is None else handle.read(max_bytes + 1)


def read_regular_text(path: Path | str) -> str:
    """A regular file decoded as UTF-8 (``UnicodeDecodeError`` is the caller's to report)."""
    return read_regular_bytes(path).decode("utf-8")


def is_regular_file(path: Path | str) -> bool:
    """True for a regular file (after symlinks); False for anything else or nothing."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def is_environment_error(error: BaseException) -> bool:
    """True when ``error`` is the machine's fault (disk full, read-only, I/O, permission...)."""
    return isinstance(error, OSError) and error.errno in ENVIRONMENT_ERRNOS


def describe_os_error(error: OSError) -> str:
    """One line: ``PATH: what went wrong`` (both paths for a rename)."""
    reason = error.strerror or str(error) or type(error).__name__
    if error.filename is not None and error.filename2 is not None:
        return f"{error.filename} -> {error.filename2}: {reason}"
    if error.filename is not None:
        return f"{error.filename}: {reason}"
    return reason
