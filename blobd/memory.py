"""Keep a server's memory flat under many concurrent uploads.

Uploads pass through buffers of up to ``ingest.WRITE_CHUNK`` bytes, made in
the event loop and freed after a writer thread is done with them. glibc
serves allocations that large from ``mmap`` at first, but raises its mmap
threshold each time such a block is freed, after which they come from the
heaps of its per-thread arenas, where freed memory mostly stays resident:
eight parallel uploads left a server some 40 MB larger for good. A fixed
threshold keeps every buffer of 128 KiB or more in its own mapping, returned
to the system the moment it is freed.

Smaller blocks (a small blob read for a GET, a request's body) still come
from the arenas, and a burst of them leaves freed pages inside the heaps
that glibc keeps; ``release_free_memory`` hands those back, every
``TRIM_INTERVAL`` seconds in each server process.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
M_ARENA_MAX = -8
MMAP_THRESHOLD = 128 * 1024
ARENA_MAX = 2
# A pass over arenas of a few tens of MB takes a millisecond or two, off
# the event loop; the pages it frees are refaulted only if a burst comes back.
TRIM_INTERVAL = 30.0


def keep_large_buffers_unpooled() -> bool:
    """Fix glibc's mmap threshold and cap its arenas; False where there is
    no glibc ``mallopt``. Call before the threads start."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
            and mallopt(M_ARENA_MAX, ARENA_MAX) == 1)
    if not done:
        log.debug("mallopt refused; memory may grow after bursts")
    return done


def release_free_memory() -> bool:
    """Return the free pages inside glibc's heaps to the system
    (``malloc_trim(0)``); False where there is no glibc ``malloc_trim``."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    trim(0)  # its result only says whether anything was released
    return True


async def trim_periodically(interval: float = TRIM_INTERVAL) -> None:
    """Release free heap memory every ``interval`` seconds until cancelled."""
    if not await asyncio.to_thread(release_free_memory):
        return
    while True:
        await asyncio.sleep(interval)
        await asyncio.to_thread(release_free_memory)
