"""How many worker processes to start, and how (shared by validate and convert)."""

from __future__ import annotations

import multiprocessing
import os
import sys


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
