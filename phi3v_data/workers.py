"""How many worker processes to start, and how; a pool that Ctrl-C shuts down cleanly (shared by
validate and convert)."""

from __future__ import annotations

import multiprocessing
import multiprocessing.pool
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


def start_method() -> str:
    """``fork`` (instant) in a plain process; ``spawn`` where fork is missing or unsafe: a process
    that loaded torch (the trainer) runs native thread pools that a fork would copy mid-lock."""
    if "fork" in multiprocessing.get_all_start_methods() and "torch" not in sys.modules:
        return "fork"
    return "spawn"


def available_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def ignore_interrupts() -> None:
    """Make this process ignore Ctrl-C (SIGINT): a worker leaves it to its parent, which shuts
    the pool down and reports the interruption once, so no worker prints a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextmanager
def _interrupts_ignored() -> Iterator[None]:
    """Ignore SIGINT for the block (only the main thread may change signal handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@contextmanager
def worker_pool(
    processes: int, initializer: Callable[..., None], initargs: tuple[Any, ...] = ()
) -> Iterator[multiprocessing.pool.Pool]:
    """A process pool whose workers ignore Ctrl-C, shut down cleanly whatever ends the block.

    Workers are started with SIGINT ignored (inherited through fork and exec, and set again by
    the initializer for a replacement worker), so Ctrl-C reaches the parent only, as one
    ``KeyboardInterrupt``. When the block ends normally the pool is closed and joined; when it
    ends by any exception (Ctrl-C, an aborting error) the workers are terminated and joined
    with Ctrl-C ignored meanwhile, so a second Ctrl-C cannot leave orphaned workers behind.
    """
    context = multiprocessing.get_context(start_method())

    with _interrupts_ignored():
        pool = context.Pool(processes, _call_initializer, (initializer, initargs))
    try:
        yield pool
    except BaseException:
        with _interrupts_ignored():
            pool.terminate()
            pool.join()
        raise
    pool.close()
    pool.join()


def _call_initializer(initializer: Callable[..., None], initargs: tuple[Any, ...]) -> None:
    ignore_interrupts()
    initializer(*initargs)
