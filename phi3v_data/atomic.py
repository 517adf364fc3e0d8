"""Atomic file writes: a file appears under its final name complete, or not at all."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
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
