"""Spare room on the data disk, given up so deletions go through on a full disk.

Deleting anything writes to the index first: SQLite appends the change to
its WAL, which needs free blocks. When another program has filled the file
system to the last block, every ``DELETE`` was refused with 507, so the
only way to free room was to free it elsewhere. The server keeps a file of
``[storage] reserve_bytes`` (``reserve`` in the data dir, see
:mod:`blobd.layout`); a write that frees room and fails because the disk is
full removes it and runs once more. The background sweep makes the file
again once the disk has room for it twice over, above ``min_free_bytes``,
so it never takes the last room an upload could have used.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from typing import Awaitable, Callable, TypeVar

from . import files, periodic
from .errors import BlobdError
from .layout import Layout
from .store import Store

log = logging.getLogger(__name__)

T = TypeVar("T")


def ensure(layout: Layout, size: int, min_free: int) -> bool:
    """Make the reserve if it is missing and the disk has room for it twice
    over above ``min_free``; True when this call made it. A reserve of
    another size, left by an earlier ``reserve_bytes``, is given up first
    (0: none is kept), or the operator would never get that room back. A
    failure is logged, not raised: the server serves on without a reserve."""
    path = layout.reserve_path
    temp = layout.new_temp_path()
    try:
        try:
            held: int | None = path.stat().st_size
        except FileNotFoundError:
            held = None
        if held == size or (held is None and size <= 0):
            return False
        if held is not None:
            release(layout)
            log.info("removed the %d-byte reserve file %s: [storage] reserve_bytes is"
                     " now %d", held, path, size)
            if size <= 0:
                return False
        free, _ = files.free_bytes(layout.root)
        if free - 2 * size < min_free:
            return False
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            # Allocated, not sparse: a sparse file would give nothing back.
            os.posix_fallocate(fd, 0, size)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path)
    except OSError as exc:
        files.remove_quietly(temp)
        log.warning("could not make the %d-byte reserve file %s: %s", size, path, exc)
        return False
    return True


def release(layout: Layout) -> bool:
    """Give the reserve's room back to the file system; True if it was there."""
    try:
        os.unlink(layout.reserve_path)
    except FileNotFoundError:
        return False
    return True


async def freeing(store: Store, run: Callable[[], Awaitable[T]]) -> T:
    """Run a write that frees room (a deletion). Should the disk be too full
    for the index to record it, give up the reserve and run it once more."""
    try:
        return await run()
    except BlobdError as exc:
        if exc.code != "insufficient_storage":
            raise
    if await asyncio.to_thread(release, store.layout):
        log.warning("the disk is full: gave up the reserve file (%s) so a deletion"
                    " could go through; it is made again once there is room",
                    store.layout.reserve_path)
    # Run again even when the reserve was gone: another worker may have
    # given it up a moment ago for a deletion of its own.
    return await run()


async def make(store: Store) -> int:
    """Make the reserve if it is missing (and there is room); its size if
    this call made it, else 0."""
    storage = store.config.storage
    made = await asyncio.to_thread(ensure, store.layout, storage.reserve_bytes,
                                   storage.min_free_bytes)
    return storage.reserve_bytes if made else 0


async def keep(store: Store) -> None:
    """Background task (worker 0, after `make` at start-up): make the
    reserve again once there is room after a deletion gave it up, on the
    sweeper's interval."""
    await periodic.every(store.config.gc.sweep_interval_seconds,
                         functools.partial(make, store),
                         "made the %d-byte reserve file again")
