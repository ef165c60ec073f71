"""Deleting blobs whose reference count reached zero.

With ``[gc] grace_seconds = 0`` a blob goes in the same transaction that
dropped its last reference; otherwise it keeps ``zero_at`` and the sweeper
deletes it once the grace period is over, unless a new reference revived it
(``add_ref`` clears ``zero_at``). Either way the row delete and the move of
the file out of its final name happen under the write lock, so a concurrent
PUT of the same content either revives the blob before, or re-creates it
after, and is never answered for a blob that is being deleted.
"""

from __future__ import annotations

import functools
import time

from . import files, index, periodic, reserve
from .store import Store, Tx



async def release_zeroed(store: Store, tx: Tx, digests: list[str]) -> None:
    if store.config.gc.grace_seconds > 0:
        return
    for digest in digests:
        await delete_now(store, tx, digest)


async def delete_now(store: Store, tx: Tx, digest: str) -> bool:
    state = await index.delete_blob(tx.conn, digest)
    if state is None:
        return False
    mirror = store.config.mirror
    if mirror is not None or state != "off":
        # Remembered also while the mirror is switched off, for a blob that
        # was mirrored before: its object is still in the bucket, and a
        # restore must not take it for a blob stored after its backup.
        now = time.time()
        await index.remember_deleted(tx.conn, digest, now)
        if mirror is not None and not mirror.keep_deleted:
            await tx.enqueue_mirror(digest, "delete", now)
    trash = store.layout.trash_path(digest)
    final = store.layout.blob_path(digest)
    if await tx.blocking(files.move_to_trash, final, trash):
        tx.trash.append(trash)
        tx.undo.append(functools.partial(files.restore_from_trash, trash, final))
    return True


async def sweep(store: Store, now: float | None = None) -> int:
    """Delete every blob whose grace period is over; returns how many."""
    cutoff = (now if now is not None else time.time()) - store.config.gc.grace_seconds
    deleted = 0

    async def batch() -> tuple[list[str], int]:
        async with store.write() as tx:
            due = await index.blobs_due_for_deletion(tx.conn, cutoff)
            return due, sum([await delete_now(store, tx, digest) for digest in due])
    while True:
        due, count = await reserve.freeing(store, batch)
        deleted += count
        if not due:
            return deleted


async def run_sweeper(store: Store) -> None:
    """Background task: sweep on the configured interval until cancelled."""
    # A short grace period is checked more often than the sweep interval,
    # so a blob never outlives its grace by much more than the grace itself.
    gc = store.config.gc
    interval = min(gc.sweep_interval_seconds, max(gc.grace_seconds, 1.0))
    await periodic.every(interval, lambda: sweep(store),
                         "deleted %d blobs after their grace period")
