"""Index backups in the bucket, for ``blobd mirror restore``.

The blobs in the bucket say nothing of who holds them; the index does
(references, owners, quotas, tokens). So the mirror also keeps copies of
the index: a consistent snapshot taken with SQLite's online backup API (a
single read transaction, while the server keeps writing), switched to a
rollback journal so it is one self-contained file any ``sqlite3`` opens,
and uploaded to ``<prefix>/_index/index-<UTC stamp>-<store id>.sqlite3``.

A running server takes one every ``backup_interval_seconds`` (counted from
the newest in the bucket, so restarts do not multiply them), ``blobd mirror
backup`` and ``blobd mirror sync`` take one on demand. A snapshot identical
to the newest backup is not uploaded again, so a quiet server does not push
its history out; the newest ``backups_kept`` of this store are kept and its
older ones deleted (another store's backups are never deleted).

Restore takes the newest backup, so a backup of the wrong index there loses
everything the right one held. The likeliest wrong index is an empty one: a
new disk under the same config, where a server started at boot, or any
mirror command, made a fresh store. So a backup is refused (see
:func:`check_lineage`) when the newest backup in the bucket is of another
store (the id in its key differs from this index's), or when this index
holds no blobs while the bucket holds blob objects and the newest backup is
not this store's own. ``force`` overrides both.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from .. import files, index, layout
from ..config import MirrorConfig
from ..errors import BlobdError
from ..storage.s3 import S3Error, S3Target
from ..store import Store
from .common import IndexBackup, any_blob_object, list_backups

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


class BackupRefused(BlobdError):
    """This index must not become the newest backup in the bucket."""

    def __init__(self, message: str) -> None:
        super().__init__("conflict", message)


async def check_lineage(store: Store, target: S3Target, config: MirrorConfig,
                        store_id: str, existing: list[IndexBackup]) -> None:
    """Raise :class:`BackupRefused` unless this index may follow ``existing``."""
    root = store.layout.root
    newest = existing[-1] if existing else None
    if newest is not None and newest.store_id not in (None, store_id):
        raise BackupRefused(
            f"not backing up {root}: the newest index backup in the bucket,"
            f" {target.url(newest.key)}, is of another store (id {newest.store_id};"
            f" this index is {store_id}). If this is a new disk for that store, rebuild"
            " it with `blobd mirror restore`; to back up this index anyway, run"
            " `blobd mirror backup --force`")
    if newest is not None and newest.store_id == store_id:
        # This store's own history: if it holds no blobs now, they were
        # deleted here (keep_deleted leaves their objects in the bucket).
        return
    if not await index.has_blobs(store.db.reader) and \
            await any_blob_object(target, config):
        raise BackupRefused(
            f"not backing up {root}: this index holds no blobs but the bucket"
            f" ({target.url(layout.mirror_blobs_prefix(config.prefix))}) holds blob"
            " objects; if this is a new disk for the store mirrored there, rebuild it"
            " with `blobd mirror restore`; to back up this index anyway, run"
            " `blobd mirror backup --force`")


async def backup_index(store: Store, target: S3Target, config: MirrorConfig, *,
                       force: bool = False) -> Backup:
    """Snapshot the index and upload it, unless the newest backup is the same.
    Raises :class:`BackupRefused` (unless ``force``) as :func:`check_lineage`."""
    store_id = await index.store_id(store.db.reader)
    existing = await list_backups(target, config)
    if not force:
        await check_lineage(store, target, config, store_id, existing)
    temp = store.layout.backup_temp_path()
    taken_at = time.time()
    try:
        await asyncio.to_thread(snapshot, store.layout.index_path, temp)
        digests = await asyncio.to_thread(files.hash_file, temp)
        if existing:
            newest = existing[-1].key
            head = await target.head(newest)
            if head is not None and head["sha256"] == digests.sha256:
                return Backup(newest, digests.size, uploaded=False)
        key = layout.mirror_backup_key(config.prefix, taken_at, store_id)
        await target.put_file(key, temp, digests.size, digests.sha256, CONTENT_TYPE)
    finally:
        await asyncio.to_thread(files.remove_quietly, temp)
    await prune(target, config, [*existing, IndexBackup(taken_at, key, store_id)], store_id)
    return Backup(key, digests.size, uploaded=True)


async def prune(target: S3Target, config: MirrorConfig, backups: list[IndexBackup],
                store_id: str) -> int:
    """Delete all but the newest ``backups_kept`` backups of this store (those
    from before store ids count as its own: they are its history)."""
    mine = sorted((b for b in backups if b.store_id in (None, store_id)),
                  key=lambda b: (b.taken_at, b.key))
    old = mine[:-config.backups_kept]
    for backup in old:
        await target.delete(backup.key)
    return len(old)


async def run_scheduled(store: Store, target: S3Target, config: MirrorConfig) -> None:
    """Background task: a backup every ``backup_interval_seconds``."""
    interval = config.backup_interval_seconds
    if interval <= 0:
        return
    try:
        existing = await list_backups(target, config)
        last = existing[-1].taken_at if existing else 0.0
    except S3Error as exc:
        log.warning("index backup: cannot list the bucket yet: %s", exc)
        last = 0.0
    while True:
        await asyncio.sleep(max(0.0, last + interval - time.time()))
        try:
            done = await backup_index(store, target, config)
        except BackupRefused as exc:
            # Checked again next interval: the bucket may change meanwhile.
            log.warning("index backup skipped: %s", exc.message)
            last = time.time()
            continue
        except (S3Error, OSError, sqlite3.Error) as exc:
            log.warning("index backup failed, will retry: %s", exc)
            await asyncio.sleep(min(interval, RETRY_SECONDS))
            continue
        last = time.time()
        if done.uploaded:
            log.info("index backup uploaded to %s (%d bytes)", target.url(done.key), done.size)


async def choose_for_restore(target: S3Target, config: MirrorConfig,
                             named: str | None = None) -> str | None:
    """The key of the backup a restore takes: ``named`` (a key, or its name
    under ``_index/``) if given, else the newest; None if there is none.

    Without a name, the bucket's backups must be of one store (with, maybe,
    some from before store ids): taking the newest of several stores would
    be a guess between two histories, so that is refused, naming them."""
    backups = await list_backups(target, config)
    if named is not None:
        key = backup_key_named(config, named)
        if key not in {backup.key for backup in backups}:
            raise BlobdError("not_found", f"no index backup {target.url(key)}")
        return key
    stores: dict[str, list[IndexBackup]] = {}
    for backup in backups:
        if backup.store_id is not None:
            stores.setdefault(backup.store_id, []).append(backup)
    if len(stores) > 1:
        listed = "; ".join(f"store {store_id}: {len(found)} backups, newest {found[-1].key}"
                           for store_id, found in sorted(stores.items(),
                                                         key=lambda s: s[1][-1].taken_at))
        raise BlobdError("conflict", f"the bucket holds index backups of {len(stores)}"
                         f" stores ({listed}); choose one with --backup KEY")
    return backups[-1].key if backups else None


def backup_key_named(config: MirrorConfig, named: str) -> str:
    """The full key of a backup given as its key or its name in ``_index/``."""
    for key in (named, layout.mirror_backup_prefix(config.prefix) + named):
        if layout.parse_backup_key(config.prefix, key) is not None:
            return key
    raise BlobdError("bad_request", f"not an index backup key: {named!r} (expected"
                     f" {layout.mirror_backup_prefix(config.prefix)}index-<stamp>...sqlite3)")
