"""Index backups in the bucket, for ``blobd mirror restore``.

The blobs in the bucket say nothing of who holds them; the index does
(references, owners, quotas, tokens). So the mirror also keeps copies of
the index: a consistent snapshot taken with SQLite's online backup API (a
single read transaction, while the server keeps writing), switched to a
rollback journal so it is one self-contained file any ``sqlite3`` opens,
and uploaded to ``<prefix>/_index/index-<UTC stamp>.sqlite3``.

A running server takes one every ``backup_interval_seconds`` (counted from
the newest in the bucket, so restarts do not multiply them), ``blobd mirror
backup`` and ``blobd mirror sync`` take one on demand. A snapshot identical
to the newest backup is not uploaded again, so a quiet server does not push
its history out; the newest ``backups_kept`` are kept and older ones
deleted.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from .. import files, layout
from ..config import MirrorConfig
from ..storage.s3 import S3Error, S3Target
from ..store import Store
from .common import list_backups

log = logging.getLogger(__name__)
CONTENT_TYPE = "application/vnd.sqlite3"
# After a failed scheduled backup, try again this soon (or at the interval).
RETRY_SECONDS = 60.0


@dataclass(frozen=True)
class Backup:
    key: str
    size: int
    uploaded: bool  # False: identical to the newest backup, which stays


def snapshot(index_path: Path, target: Path) -> None:
    """Copy the live index into ``target`` consistently. Runs in a thread."""
    source = sqlite3.connect(index_path, timeout=30)
    try:
        copy = sqlite3.connect(target)
        try:
            source.backup(copy)
            copy.execute("PRAGMA journal_mode = DELETE")
        finally:
            copy.close()
    finally:
        source.close()


async def backup_index(store: Store, target: S3Target, config: MirrorConfig) -> Backup:
    """Snapshot the index and upload it, unless the newest backup is the same."""
    temp = store.layout.backup_temp_path()
    taken_at = time.time()
    try:
        await asyncio.to_thread(snapshot, store.layout.index_path, temp)
        digests = await asyncio.to_thread(files.hash_file, temp)
        existing = await list_backups(target, config)
        if existing:
            newest = existing[-1][1]
            head = await target.head(newest)
            if head is not None and head["sha256"] == digests.sha256:
                return Backup(newest, digests.size, uploaded=False)
        key = layout.mirror_backup_key(config.prefix, taken_at)
        await target.put_file(key, temp, digests.size, digests.sha256, CONTENT_TYPE)
    finally:
        await asyncio.to_thread(files.remove_quietly, temp)
    await prune(target, config, [*existing, (taken_at, key)])
    return Backup(key, digests.size, uploaded=True)


async def prune(target: S3Target, config: MirrorConfig,
                backups: list[tuple[float, str]]) -> int:
    """Delete all but the newest ``backups_kept`` backups."""
    old = sorted(backups)[:-config.backups_kept]
    for _, key in old:
        await target.delete(key)
    return len(old)


async def run_scheduled(store: Store, target: S3Target, config: MirrorConfig) -> None:
    """Background task: a backup every ``backup_interval_seconds``."""
    interval = config.backup_interval_seconds
    if interval <= 0:
        return
    try:
        existing = await list_backups(target, config)
        last = existing[-1][0] if existing else 0.0
    except S3Error as exc:
        log.warning("index backup: cannot list the bucket yet: %s", exc)
        last = 0.0
    while True:
        await asyncio.sleep(max(0.0, last + interval - time.time()))
        try:
            done = await backup_index(store, target, config)
        except (S3Error, OSError, sqlite3.Error) as exc:
            log.warning("index backup failed, will retry: %s", exc)
            await asyncio.sleep(min(interval, RETRY_SECONDS))
            continue
        last = time.time()
        if done.uploaded:
            log.info("index backup uploaded to %s (%d bytes)", target.url(done.key), done.size)
