"""``blobd mirror sync``: reconcile the whole store with the bucket, rsync-style.

Both sides are listed, the bucket first: an object listed there was put
for a blob committed before the index is listed, so an object missing from
the index listing really is one the index no longer has. Then:

* a blob the bucket lacks, or holds at another size, is uploaded from its
  local file (whose SHA-256 the upload checks, so a damaged file is refused,
  never mirrored). The index is checked again after each upload, as the
  worker does: the object of a blob deleted meanwhile is deleted again (see
  :func:`_undo_upload`); a blob deleted before its file was read is skipped,
  not failed (``report.gone`` lists both);
* ``--verify``: for every blob both sides have, the SHA-256 recorded with
  the object is compared with the index's; a mismatch is uploaded again (a
  HEAD that fails is reported for that blob, and the rest go on);
* ``--verify-content`` (implies ``--verify``): every object that passed
  that check is also downloaded and hashed (see :mod:`.readback`); one
  whose bytes are not the blob's is uploaded again, like a mismatch. It
  reads the whole bucket: the mirror's egress;
* ``--delete``: objects of blobs the index no longer has are deleted, each
  after checking the index once more (never the object of a live blob).
  The index is checked again after the DELETE too: a blob stored again in
  between (whose queued put may have found the old object and skipped the
  upload) gets a new put queued, so its object comes back. Deleting is
  refused before anything is done, a dry run alike (``force`` overrides;
  see :func:`check_delete`), when the objects to delete may be another
  store's: when the index holds no blobs at all, when the newest index
  backup in the bucket is of another store, or when this store never
  backed up there;
* blobs found in the bucket, or put there, are marked ``done`` and their
  queued puts dropped, but only puts queued before the sync began (see
  :func:`blobd.mirror.queue.mark_mirrored`): a blob deleted and stored again
  while the sync ran keeps its newer put; a fresh index backup ends the run;
* unfinished multipart uploads of blob keys a crash left, begun more than
  ``abandoned_upload_hours`` ago, are aborted (see :mod:`.abandoned`).

Nothing is remembered between runs, so an interrupted sync is resumed by
running it again: what was done is found done. A mirror that stops answering
stops the run that way (see :class:`.common.Silence`). ``--dry-run`` lists the plan
and changes nothing. It is safe beside a running server.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .. import index
from ..config import MirrorConfig
from ..errors import BlobdError
from ..index import BlobRecord
from ..storage.s3 import Listed, S3Error, S3Target
from ..store import Store
from . import abandoned, backup, queue, readback
from .common import (BarFactory, MirrorSilent, Silence, blob_key, is_upload_of, list_backups,
                     list_blob_objects, no_bar, object_metadata, run_pool)

# Blobs marked done per index transaction.
MARK_BATCH = 500


@dataclass
class SyncReport:
    local: int = 0  # blobs in the index
    remote: int = 0  # blob objects in the bucket
    in_sync: int = 0
    to_upload: list[BlobRecord] = field(default_factory=list)
    to_delete: list[str] = field(default_factory=list)  # digests
    mismatched: int = 0  # --verify found the object's SHA-256 wrong
    read: int = 0  # --verify-content: objects downloaded and hashed
    read_bytes: int = 0
    damaged: dict[str, str] = field(default_factory=dict)  # digest -> what is wrong
    repaired: int = 0  # of the damaged, uploaded again
    uploaded: int = 0
    uploaded_bytes: int = 0
    deleted: int = 0
    requeued: list[str] = field(default_factory=list)  # stored again while deleted
    gone: list[str] = field(default_factory=list)  # deleted while the sync uploaded
    failed: dict[str, str] = field(default_factory=dict)  # digest -> error
    backup: str | None = None
    abandoned: list[str] = field(default_factory=list)  # keys of abandoned uploads
    aborted: int = 0  # of those, aborted
    # Why the sync stopped before the end (the mirror stopped answering).
    stopped: str | None = None


async def sync(store: Store, target: S3Target, config: MirrorConfig, *,
               delete: bool = False, dry_run: bool = False, verify: bool = False,
               verify_content: bool = False, force: bool = False, jobs: int = 4,
               bar: BarFactory = no_bar) -> SyncReport:
    verify = verify or verify_content
    since = await queue.position(store.db.reader)
    remote = await list_blob_objects(target, config)
    local = {blob.hash: blob for blob in await index.all_blobs(store.db.reader)}
    report = SyncReport(local=len(local), remote=len(remote))
    try:
        await _reconcile(store, target, config, report, remote, local, since,
                         delete=delete, dry_run=dry_run, verify=verify,
                         verify_content=verify_content, force=force, jobs=jobs, bar=bar,
                         silence=Silence(jobs))
    except MirrorSilent as exc:
        # What was done is kept (uploads done are marked); what was not is
        # found undone by the next run, as after any interruption.
        report.stopped = str(exc)
    return report


async def _reconcile(store: Store, target: S3Target, config: MirrorConfig,
                     report: SyncReport, remote: dict[str, Listed],
                     local: dict[str, BlobRecord], since: queue.Position, *,
                     delete: bool, dry_run: bool, verify: bool, verify_content: bool,
                     force: bool, jobs: int, bar: BarFactory, silence: Silence) -> None:
    if delete:
        report.to_delete = sorted(set(remote) - set(local))
        if not force:  # before anything is done, so a dry run is refused alike
            await check_delete(store, target, config, bool(local), len(report.to_delete))
    sizes = {digest: listed.size for digest, listed in remote.items()}
    present = [b for b in local.values() if sizes.get(b.hash) == b.size]
    report.to_upload = [b for b in local.values() if sizes.get(b.hash) != b.size]
    deleted = await index.deleted_blobs(store.db.reader)
    once = [b for b in present if b.hash in deleted]
    if once and not verify:
        # Content deleted once and stored again: its object may be the old
        # incarnation's (see is_upload_of), which only a HEAD tells.
        stale = await _verify(store, target, config, once, report, jobs, bar, deleted,
                              silence)
        report.to_upload += [b for b in once if b.hash in stale]
        present = _still_present(present, stale, report)
    if verify:
        wrong = await _verify(store, target, config, present, report, jobs, bar, deleted,
                              silence)
        report.mismatched = len(wrong)
        report.to_upload += [b for b in present if b.hash in wrong]
        present = _still_present(present, wrong, report)
    if verify_content:
        present = await _read_back(store, target, config, present, report, jobs, bar,
                                   silence)
    report.in_sync = len(present)
    await _abort_abandoned(target, config, report, dry_run)
    if dry_run:
        return
    await _mark(store, [b.hash for b in present], since)
    await _upload(store, target, config, report, since, jobs, bar, silence)
    await _delete(store, target, config, report, jobs, bar, silence)
    try:
        report.backup = (await backup.backup_index(store, target, config)).key
    except (S3Error, backup.BackupRefused) as exc:
        report.failed["index backup"] = str(exc)


async def _abort_abandoned(target: S3Target, config: MirrorConfig, report: SyncReport,
                           dry_run: bool) -> None:
    try:
        sweep = await abandoned.abort_abandoned(target, config, dry_run=dry_run)
    except S3Error as exc:
        report.failed["abandoned multipart uploads"] = str(exc)
        return
    report.abandoned = [upload.key for upload in sweep.found]
    report.aborted = sweep.aborted
    for key, error in sweep.failed.items():
        report.failed[f"abort of the abandoned upload of {key}"] = error


async def check_delete(store: Store, target: S3Target, config: MirrorConfig,
                       has_blobs: bool, to_delete: int) -> None:
    """Raise a ``conflict`` unless ``--delete`` may delete the ``to_delete``
    blob objects this index does not know. They may be another store's: a
    new disk under the same config, where a server made a fresh store and
    took an upload or two, knows none of the old store's blobs. So deleting
    is refused when the index holds no blobs, when the newest index backup
    in the bucket is of another store, or when this store has never backed
    up its index there (nothing says the bucket's objects were ever its).
    """
    if not to_delete:
        return
    root = store.layout.root
    if not has_blobs:
        raise BlobdError(
            "conflict", f"the index in {root} holds no blobs, so --delete would delete"
            f" all {to_delete} blob objects in the bucket; check the config's data_dir"
            " (to rebuild a lost store from the bucket, run `blobd mirror restore`), or"
            " add --force if they are to go")
    own = await index.store_id(store.db.reader)
    backups = await list_backups(target, config)
    newest = backups[-1] if backups else None
    if newest is not None and newest.store_id not in (None, own):
        raise BlobdError(
            "conflict", f"--delete refused: the newest index backup in the bucket,"
            f" {target.url(newest.key)}, is of another store (id {newest.store_id}; the"
            f" index in {root} is {own}), so the {to_delete} blob objects this index does"
            " not know are likely that store's. If this is a new disk for that store,"
            " rebuild it with `blobd mirror restore`; add --force if they are to go")
    if not any(backup.store_id == own for backup in backups):
        raise BlobdError(
            "conflict", f"--delete refused: the store in {root} (id {own}) has never"
            f" backed up its index to the bucket, so the {to_delete} blob objects there"
            " that this index does not know may be another store's. If this is a new"
            " disk for the store mirrored there, rebuild it with `blobd mirror restore`;"
            " add --force if they are to go")


def _still_present(present: list[BlobRecord], wrong: set[str],
                   report: SyncReport) -> list[BlobRecord]:
    """Of ``present``, the blobs a check left in sync: not found wrong, not
    failed, not deleted meanwhile."""
    gone = set(report.gone)
    return [b for b in present
            if b.hash not in wrong and b.hash not in report.failed and b.hash not in gone]


async def _verify(store: Store, target: S3Target, config: MirrorConfig,
                  blobs: list[BlobRecord], report: SyncReport, jobs: int, bar: BarFactory,
                  deleted: dict[str, float], silence: Silence) -> set[str]:
    """Digests whose object is not this blob's upload (its recorded SHA-256
    is not the index's, or it is an earlier incarnation's). A blob whose
    object cannot be looked at is recorded in ``report.failed``; one deleted
    meanwhile (its object with it) in ``report.gone``."""
    wrong: set[str] = set()
    progress = bar("verify", len(blobs), "blob")

    async def check(blob: BlobRecord) -> None:
        try:
            head = await target.head(blob_key(config, blob.hash))
        except S3Error as exc:
            silence.saw(exc)
            report.failed[blob.hash] = f"verify: {exc}"
        else:
            silence.saw(None)
            if head is None and await index.get_blob(store.db.reader, blob.hash) is None:
                # Not a mismatch: the server's delete job removed its object.
                report.gone.append(blob.hash)
            elif head is None or not is_upload_of(head, blob, blob.hash in deleted):
                wrong.add(blob.hash)
        progress.update(1)

    try:
        await run_pool(blobs, jobs, check, silence)
    finally:
        progress.close()
    return wrong


async def _read_back(store: Store, target: S3Target, config: MirrorConfig,
                     present: list[BlobRecord], report: SyncReport, jobs: int,
                     bar: BarFactory, silence: Silence) -> list[BlobRecord]:
    """Read back the objects of ``present``; the damaged join the uploads.
    Returns the blobs found sound."""
    found = readback.ReadBack()
    try:
        await readback.read_back(store, target, config, present, jobs, bar, silence, found)
    finally:
        _took_read_back(report, found, present)
    unsound = {*found.damaged, *found.failed, *found.gone}
    return [b for b in present if b.hash not in unsound]


def _took_read_back(report: SyncReport, found: readback.ReadBack,
                    present: list[BlobRecord]) -> None:
    report.read, report.read_bytes = found.read, found.read_bytes
    report.damaged = found.damaged
    report.failed.update(found.failed)
    report.gone += found.gone
    report.to_upload += [b for b in present if b.hash in found.damaged]


async def _mark(store: Store, digests: list[str], since: queue.Position) -> None:
    for start in range(0, len(digests), MARK_BATCH):
        async with store.write() as tx:
            await queue.mark_mirrored(tx.conn, digests[start:start + MARK_BATCH], since)


async def _upload(store: Store, target: S3Target, config: MirrorConfig,
                  report: SyncReport, since: queue.Position, jobs: int,
                  bar: BarFactory, silence: Silence) -> None:
    progress = bar("upload", sum(b.size for b in report.to_upload), "B")
    done: list[str] = []

    async def upload(blob: BlobRecord) -> None:
        try:
            if await _stored(store, blob.hash, report):
                await target.put_file(blob_key(config, blob.hash),
                                      store.layout.blob_path(blob.hash), blob.size,
                                      blob.sha256, blob.content_type,
                                      metadata=object_metadata(blob.created_at))
                silence.saw(None)
                if await _stored(store, blob.hash, report):
                    report.uploaded += 1
                    report.uploaded_bytes += blob.size
                    if blob.hash in report.damaged:
                        report.repaired += 1
                    done.append(blob.hash)
                else:
                    await _undo_upload(store, target, config, blob.hash)
        except FileNotFoundError:
            # Deleted while we looked (its file moved to the trash), or lost.
            if await _stored(store, blob.hash, report):
                damage = report.damaged.get(blob.hash)
                report.failed[blob.hash] = (
                    "the local file is missing (blobd mirror heal)" if damage is None else
                    f"damaged in the bucket ({damage}), and the local file is missing")
        except (S3Error, OSError) as exc:
            silence.saw(exc)
            report.failed[blob.hash] = _upload_failure(report, blob.hash, exc)
        progress.update(blob.size)
        if len(done) >= MARK_BATCH:
            batch, done[:] = list(done), []
            await _mark(store, batch, since)

    try:
        await run_pool(report.to_upload, jobs, upload, silence)
    finally:
        progress.close()
        await _mark(store, done, since)


def _upload_failure(report: SyncReport, digest: str, exc: Exception) -> str:
    damage = report.damaged.get(digest)
    if damage is None:
        return str(exc)
    if isinstance(exc, S3Error) and exc.code == "BadDigest":
        # Both copies are bad: say so, the operator has a blob to find elsewhere.
        return (f"damaged in the bucket ({damage}), and the local file is not the blob"
                f" either, so it was not uploaded: {exc}")
    return f"damaged in the bucket ({damage}); uploading it again failed: {exc}"


async def _stored(store: Store, digest: str, report: SyncReport) -> bool:
    """Whether the index still has the blob; if not, it is recorded as
    deleted while the sync ran (not a failure: there is nothing to mirror)."""
    if await index.get_blob(store.db.reader, digest) is not None:
        return True
    if digest not in report.gone:
        report.gone.append(digest)
    return False


async def _undo_upload(store: Store, target: S3Target, config: MirrorConfig,
                       digest: str) -> None:
    """The blob was deleted while its object was uploaded. The server's
    delete job may have run before the object existed (and forgotten the
    deletion, its object being gone), so nothing else would remove the
    object, and a restore would take it for a blob stored after its backup.
    Remember the deletion as of now and queue the object's delete, in one
    transaction, then delete it at once (the queued job finds nothing left)."""
    now = time.time()
    async with store.write() as tx:
        if await index.get_blob(tx.conn, digest) is not None:
            return  # stored again meanwhile: the object is the blob's
        await index.remember_deleted(tx.conn, digest, now)
        if not config.keep_deleted:
            await tx.enqueue_mirror(digest, "delete", now)
    if config.keep_deleted:
        return
    try:
        await target.delete(blob_key(config, digest))
    except S3Error:
        return  # the queued delete retries it
    await _queue_put_if_stored(store, digest)


async def _delete(store: Store, target: S3Target, config: MirrorConfig,
                  report: SyncReport, jobs: int, bar: BarFactory, silence: Silence) -> None:
    progress = bar("delete", len(report.to_delete), "object")

    async def remove(digest: str) -> None:
        try:
            if await index.get_blob(store.db.reader, digest) is None:
                try:
                    await target.delete(blob_key(config, digest))
                    silence.saw(None)
                    report.deleted += 1
                finally:
                    if await _queue_put_if_stored(store, digest):
                        report.requeued.append(digest)
        except S3Error as exc:
            silence.saw(exc)
            report.failed[digest] = str(exc)
        progress.update(1)

    try:
        await run_pool(report.to_delete, jobs, remove, silence)
    finally:
        progress.close()


async def _queue_put_if_stored(store: Store, digest: str) -> bool:
    """After deleting an object: if its blob was stored again since the
    index was checked, that blob's put may already have run, found the old
    object and skipped the upload. Queue another, behind everything queued
    for the blob, so the worker uploads it again. Whatever commits after
    this check queues a put that runs after the DELETE, as usual."""
    async with store.write() as tx:
        if await index.get_blob(tx.conn, digest) is None:
            return False
        await tx.enqueue_mirror(digest, "put", time.time())
        await index.set_mirror_state(tx.conn, digest, "pending")
    return True
