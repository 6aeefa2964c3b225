"""Keep large freed buffers in the process instead of handing them back to the kernel.

Each message of a few MB that ZeroMQ receives is a fresh ``malloc``; glibc serves
allocations above 32 MiB (often above 128 KiB) with ``mmap`` and returns them with
``munmap`` on free, so every message pays page faults for memory it touches for
the first time: about 1.8 ms per 40 MB here, more than copying it. Raising the
mmap and trim thresholds lets the next message reuse the pages of the last one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_LIMIT = 2**31 - 1  # bytes; the largest value mallopt takes as an int

_done = False


def keep_freed_memory() -> bool:
    """Tune glibc's malloc so that freed multi-MB buffers are reused. Idempotent.

    A no-op (returns False) off Linux/glibc, or when the environment sets
    ``DCASGD_MALLOC_TUNING=0``. The cost: memory a process freed stays mapped
    to it (its resident size does not shrink after a peak).
    """
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux") or os.environ.get("DCASGD_MALLOC_TUNING", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    _done = bool(mallopt(_M_MMAP_THRESHOLD, _LIMIT)) and bool(mallopt(_M_TRIM_THRESHOLD, _LIMIT))
    return _done
