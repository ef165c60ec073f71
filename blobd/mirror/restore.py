"""``blobd mirror restore``: rebuild an empty server from the bucket.

1. The data directory must hold no blobs, neither in its index nor as
   files in blobs/ (a file there would be taken for the blob it is named
   after); its lock is taken, so no server runs on it meanwhile.
2. The newest index backup (:mod:`blobd.mirror.backup`), or the one named
   with ``--backup``, is downloaded, checked against its SHA-256 and by
   ``PRAGMA integrity_check``, and becomes the index: references, owners,
   quotas, tokens and the store's id come back as they were when it was
   taken. If the bucket holds backups of several stores, one must be named.
   Work that only made sense on the old disk is forgotten: the mirror queue
   and unfinished upload sessions.
3. Every blob the index names is downloaded to tmp/, verified (BLAKE3,
   SHA-256, size) and moved into place, and recorded as placed (its mirror
   state set to ``done``, every other blob's having been set to ``pending``
   when the index was installed). A blob whose object is absent was
   deleted after the backup, or never reached the mirror; one whose object
   fails verification cannot be trusted. Both are dropped from the index
   with their references, so the index matches the files, and reported.
4. Objects the backup does not know (blobs stored after it was taken) are
   restored too, verified against their key and recorded SHA-256. Nobody's
   references to them survive, so each gets one reference, named by its
   hash, held by the owner ``--orphans-owner`` (default ``_restored``),
   whatever that owner's limits (its usage counts them); an admin can
   hand them back.
   ``--skip-orphans`` leaves them in the bucket only. Objects of blobs the
   backup remembers deleting (their objects kept by ``keep_deleted``, or
   their deletion not yet done) stay deleted.

A marker file (``<data_dir>/restoring``, naming the backup) stays until
the end, so an interrupted restore is resumed by running it again: files
recorded as placed are kept; any other file already there (placed just
before the interruption, before it was recorded) is kept only if it hashes
to its blob; the rest are fetched.
A mirror that does not answer for a blob leaves the restore unfinished
(nothing dropped or adopted, the marker kept); see :class:`.common.Silence`.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import files, index
from ..config import Config, MirrorConfig
from ..errors import BlobdError
from ..index import BlobRecord
from ..storage.s3 import Listed, ObjectTooLarge, S3Error, S3Target
from ..store import Store
from .backup import backup_key_named, choose_for_restore
from .common import (CREATED_METADATA, BarFactory, CopyMismatch, MirrorSilent, Silence,
                     Unreadable, any_blob_object, blob_key, list_blob_objects, no_answer,
                     no_bar, read_refused, run_pool, verify_copy)
from .heal import local_file_fault

log = logging.getLogger(__name__)
ORPHANS_OWNER = "_restored"
FALLBACK_TYPE = "application/octet-stream"
# How far the S3 server's clock may be behind ours (see stored_again).
CLOCK_SLACK = 300.0
# Blobs recorded as placed per index transaction; after a crash, those not
# yet recorded are hashed again, not downloaded again.
RECORD_BATCH = 200


@dataclass
class RestoreReport:
    backup: str | None = None  # the index backup used; None if there was none
    restored: int = 0
    restored_bytes: int = 0
    already: int = 0  # in place from an interrupted run
    missing: list[str] = field(default_factory=list)  # named by the backup, not in the bucket
    corrupt: dict[str, str] = field(default_factory=dict)  # digest -> why
    # digest -> why: the mirror holds the object but would not serve it
    # (see read_refused); kept in the index without a file (see fetch).
    unreadable: dict[str, str] = field(default_factory=dict)
    dropped_refs: int = 0
    orphans: list[str] = field(default_factory=list)  # adopted (or skipped)
    deleted_before: list[str] = field(default_factory=list)  # see stored_again
    # digest -> error: not fetched, the mirror did not answer; the restore
    # stopped before its end (the marker stays), a later run fetches them.
    unfetched: dict[str, str] = field(default_factory=dict)
    # Why the restore stopped before the end (the mirror stopped answering).
    stopped: str | None = None

    @property
    def finished(self) -> bool:
        return self.stopped is None and not self.unfetched


async def restore(config: Config, target: S3Target, *, jobs: int = 4,
                  orphans_owner: str | None = ORPHANS_OWNER, backup: str | None = None,
                  bar: BarFactory = no_bar) -> RestoreReport:
    """``backup``: the key (or name under ``_index/``) of the backup to
    restore; by default the newest, of the one store the bucket holds."""
    mirror = config.mirror
    assert mirror is not None
    store = Store(config)
    await store.open()
    try:
        report = RestoreReport()
        report.backup, trusted = await _install_index(store, target, mirror, backup)
        remote = await list_blob_objects(target, mirror)
        blobs = await index.all_blobs(store.db.reader)
        silence = Silence(jobs)
        await _stop_if_silent(_fetch_all(store, target, mirror, blobs, remote, trusted,
                                         report, jobs, bar, silence), report)
        if not report.finished:
            # As an interrupted run: nothing dropped or adopted yet, the
            # marker kept; the next run picks up from the blobs placed.
            return report
        await _drop(store, [*report.missing, *report.corrupt], report)
        known = {b.hash for b in blobs}
        deleted = await index.deleted_blobs(store.db.reader)
        for digest in sorted(set(remote) - known):
            if await stored_again(target, mirror, digest, remote[digest],
                                  deleted.get(digest)):
                report.orphans.append(digest)
            else:
                report.deleted_before.append(digest)
        if orphans_owner is not None:
            await _stop_if_silent(_adopt(store, target, mirror, report, orphans_owner, jobs,
                                         bar, silence), report)
            if not report.finished:
                return report
        async with store.write() as tx:
            await tx.conn.execute("UPDATE blobs SET mirror_state = 'done'")
        await asyncio.to_thread(files.remove_quietly, store.layout.restore_marker_path)
        return report
    finally:
        await store.close()


async def _stop_if_silent(work: Any, report: RestoreReport) -> None:
    try:
        await work
    except MirrorSilent as exc:
        report.stopped = str(exc)


async def stored_again(target: S3Target, mirror: MirrorConfig, digest: str,
                       listed: Listed, deleted_at: float | None) -> bool:
    """Whether a blob object the backup does not know is a blob stored
    after the backup was taken, not one deleted before it (its object kept
    by ``keep_deleted``, or its deletion not yet done): the backup
    remembers those it deleted. An object stamped with its blob's creation
    (our clock, see CREATED_METADATA) was stored again if that came after
    the deletion; an unstamped one (an older blobd's) if it was written
    well after it (the S3 server's clock against ours: CLOCK_SLACK)."""
    if deleted_at is None:
        return True
    there = await target.head(blob_key(mirror, digest))
    if there is None:
        return False  # gone since the listing
    try:
        return float(there["metadata"][CREATED_METADATA]) > deleted_at
    except (KeyError, ValueError):
        return listed.modified > deleted_at + CLOCK_SLACK


async def _install_index(store: Store, target: S3Target, mirror: MirrorConfig,
                         named: str | None) -> tuple[str | None, bool]:
    """Make the chosen backup the index, or pick up an interrupted restore.
    Returns the backup's key, and whether blobs recorded as placed can be
    trusted (not so after a restore begun by a version that did not record).

    The marker is written before the index is replaced and says whether
    that is done, so a crash at any point is resumed correctly."""
    marker = store.layout.restore_marker_path
    state = await asyncio.to_thread(_read_marker, marker)
    if state is None:
        await _check_empty(store)
        key = await choose_for_restore(target, mirror, named)
        if key is None and not await any_blob_object(target, mirror):
            raise BlobdError("not_found", f"nothing to restore: {target.url(mirror.prefix)}"
                             " holds neither an index backup nor a blob; check [mirror]"
                             " bucket and prefix")
        state = {"backup": key, "installed": False, "records_placed": True}
        await asyncio.to_thread(_write_marker, marker, state)
    elif named is not None and backup_key_named(mirror, named) != state["backup"]:
        raise BlobdError("conflict", f"{store.layout.root} is half-way through restoring"
                         f" {state['backup'] or '(no backup)'}; run the restore again"
                         " without --backup to finish it")
    key = state["backup"]
    trusted = bool(state.get("records_placed"))
    if state["installed"]:
        return key, trusted
    if key is None:
        log.warning("no index backup under %s: blobs come back without references",
                    target.url(mirror.prefix))
    else:
        await _install_backup(store, target, key)
    await _forget_local_state(store)
    await asyncio.to_thread(_write_marker, marker, {**state, "installed": True})
    return key, trusted


async def _check_empty(store: Store) -> None:
    """Restore only fills an empty data directory. A file in blobs/ would
    be kept as the blob it is named after: it could be anything (a salvaged
    tree, another store's), so it is refused rather than trusted."""
    held = await index.count_blobs(store.db.reader)
    if held:
        raise BlobdError("conflict", f"{store.layout.root} already holds {held} blobs;"
                         " restore only rebuilds an empty server")
    found = await asyncio.to_thread(_any_file, store.layout.blobs_dir)
    if found is not None:
        raise BlobdError("conflict", f"{store.layout.blobs_dir} is not empty ({found});"
                         " restore only rebuilds an empty server: move blobs/ away first")


def _any_file(directory: Path) -> Path | None:
    for parent, _, names in os.walk(directory):
        if names:
            return Path(parent) / names[0]
    return None


def _read_marker(marker: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads(marker.read_text()))
    except FileNotFoundError:
        return None


def _write_marker(marker: Path, state: dict[str, Any]) -> None:
    temp = marker.with_name(marker.name + ".new")
    temp.write_text(json.dumps(state))
    os.replace(temp, marker)
    files.fsync_dir(marker.parent)


async def _install_backup(store: Store, target: S3Target, key: str) -> None:
    temp = store.layout.backup_temp_path()
    try:
        await _download_backup(target, key, temp)
        await store.db.close()
        await asyncio.to_thread(_replace_index, temp, store.layout.index_path)
        await store.db.open()  # runs the migrations if the backup is older
    finally:
        await asyncio.to_thread(files.remove_quietly, temp)


async def _download_backup(target: S3Target, key: str, temp: Path) -> None:
    head = await target.head(key)
    await target.download_to(key, temp)
    got = await asyncio.to_thread(files.hash_file, temp)
    if head is None or got.sha256 != head["sha256"]:
        raise BlobdError("internal", f"index backup {target.url(key)} does not match"
                         " its recorded SHA-256")
    verdict = await asyncio.to_thread(_integrity, temp)
    if verdict != "ok":
        raise BlobdError("internal", f"index backup {target.url(key)} is damaged: {verdict}")


def _integrity(path: Path) -> str:
    conn = sqlite3.connect(path)
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


def _replace_index(temp: Path, index_path: Path) -> None:
    """Swap in the backup while no connection is open (we hold the lock)."""
    for suffix in ("-wal", "-shm"):
        files.remove_quietly(index_path.with_name(index_path.name + suffix))
    os.replace(temp, index_path)
    files.fsync_dir(index_path.parent)


async def _forget_local_state(store: Store) -> None:
    """The queue and upload sessions described the old disk, not this one.
    No blob is in place yet: each is marked ``done`` once it is."""
    async with store.write() as tx:
        for sql in ("DELETE FROM mirror_queue", "DELETE FROM upload_chunks",
                    "DELETE FROM uploads",
                    "UPDATE owners SET reserved_bytes = 0, reserved_blobs = 0",
                    "UPDATE blobs SET mirror_state = 'pending'"):
            await tx.conn.execute(sql)


async def _fetch_all(store: Store, target: S3Target, mirror: MirrorConfig,
                     blobs: list[BlobRecord], remote: dict[str, Listed], trusted: bool,
                     report: RestoreReport, jobs: int, bar: BarFactory,
                     silence: Silence) -> None:
    progress = bar("restore", sum(b.size for b in blobs), "B")
    placed: list[str] = []

    async def fetch(blob: BlobRecord) -> None:
        final = store.layout.blob_path(blob.hash)
        if trusted and blob.mirror_state == "done" and \
                await asyncio.to_thread(_has_size, final, blob.size):
            report.already += 1  # placed, verified and recorded by an interrupted run
        elif await asyncio.to_thread(_good_in_place, store, blob):
            report.already += 1  # placed by an interrupted run, not yet recorded
            placed.append(blob.hash)
        elif blob.hash not in remote:
            report.missing.append(blob.hash)
        else:
            failure: BaseException | None = None
            try:
                await fetch_verified(store, target, mirror, blob.hash, blob.sha256, blob.size)
                report.restored += 1
                report.restored_bytes += blob.size
                placed.append(blob.hash)
            except CopyMismatch as exc:
                report.corrupt[blob.hash] = str(exc)
            except Unreadable as exc:
                # Rot the store detected, most likely, but a store failing
                # every GET for a while looks the same: dropping the blob
                # (as a wrong copy is) could drop the whole index. Kept
                # without its file, it is what a dead disk leaves: fsck
                # lists it, a GET or `mirror heal` fetches it once the
                # mirror serves it. Before, every run stopped here.
                report.unreadable[blob.hash] = f"the mirror could not read its copy: {exc}"
            except S3Error as exc:
                failure = exc
                if no_answer(exc):
                    report.unfetched[blob.hash] = str(exc)  # the next run fetches it
                elif not exc.not_found:
                    raise  # the mirror fails: stop; run again to resume
                else:
                    report.missing.append(blob.hash)
            silence.saw(failure)
        progress.update(blob.size)
        if len(placed) >= RECORD_BATCH:
            batch, placed[:] = list(placed), []
            await _record_placed(store, batch)

    try:
        await run_pool(blobs, jobs, fetch, silence)
    finally:
        progress.close()
        await _record_placed(store, placed)


async def _record_placed(store: Store, digests: list[str]) -> None:
    if not digests:
        return
    marks = ",".join("?" * len(digests))
    async with store.write() as tx:
        await tx.conn.execute(f"UPDATE blobs SET mirror_state = 'done' WHERE hash IN ({marks})",
                              tuple(digests))


def _good_in_place(store: Store, blob: BlobRecord) -> bool:
    """Whether the file in place is the blob (hashed). One that is not is
    removed: it is nobody's, and the blob may be dropped, not fetched."""
    final = store.layout.blob_path(blob.hash)
    if not final.exists():
        return False
    fault = local_file_fault(store, blob)
    if fault is None:
        return True
    log.warning("blob %s: the file in place is not the blob (%s); removed", blob.hash,
                fault)
    files.remove_quietly(final)
    return False


def _has_size(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except FileNotFoundError:
        return False


async def fetch_verified(store: Store, target: S3Target, mirror: MirrorConfig,
                         digest: str, sha256: str | None, size: int | None) -> files.Digests:
    """Download one blob object, verify it, and move it into place;
    :class:`.common.Unreadable` when the mirror holds it but will not serve
    it (see :func:`.common.read_refused`)."""
    temp = store.layout.new_temp_path(digest)
    try:
        try:
            await read_refused(functools.partial(
                target.download_to, blob_key(mirror, digest), temp, limit=size))
        except ObjectTooLarge as exc:
            raise CopyMismatch(str(exc)) from None
        got = await asyncio.to_thread(verify_copy, temp, digest, sha256, size)
        await asyncio.to_thread(files.install_verified, temp, store.layout.blob_path(digest),
                                store.config.storage.fsync)
        return got
    finally:
        await asyncio.to_thread(files.remove_quietly, temp)


async def _drop(store: Store, digests: list[str], report: RestoreReport) -> None:
    """Remove blobs that could not be restored, with every reference to them."""
    now = time.time()
    for digest in digests:
        async with store.write() as tx:
            for owner, name in await index.refs_to(tx.conn, digest):
                await index.drop_ref(tx.conn, owner, name, now)
                report.dropped_refs += 1
            await index.delete_blob(tx.conn, digest)


async def _adopt(store: Store, target: S3Target, mirror: MirrorConfig,
                 report: RestoreReport, owner: str, jobs: int, bar: BarFactory,
                 silence: Silence) -> None:
    progress = bar("orphans", len(report.orphans), "blob")

    async def adopt(digest: str) -> None:
        try:
            await adopt_orphan(store, target, mirror, digest, owner, report)
        except S3Error as exc:
            silence.saw(exc)
            if not no_answer(exc):
                raise
            report.unfetched[digest] = str(exc)  # still an orphan for the next run
        else:
            silence.saw(None)
        finally:
            progress.update(1)

    try:
        await run_pool(report.orphans, jobs, adopt, silence)
    finally:
        progress.close()


def _created_at(head: dict[str, Any]) -> float:
    """An adopted blob keeps the creation its object is stamped with, so the
    object stays this incarnation's upload (see is_upload_of); an older
    blobd's object has no stamp: now."""
    try:
        return float(head["metadata"][CREATED_METADATA])
    except (KeyError, ValueError):
        return time.time()


async def adopt_orphan(store: Store, target: S3Target, mirror: MirrorConfig, digest: str,
                       owner: str, report: RestoreReport) -> None:
    """Restore a blob the backup does not know, referenced by ``owner``."""
    head = await target.head(blob_key(mirror, digest))
    if head is None:
        return  # deleted since the listing
    try:
        got = await fetch_verified(store, target, mirror, digest, head["sha256"], head["size"])
    except CopyMismatch as exc:
        report.corrupt[digest] = str(exc)
        return
    except Unreadable as exc:
        # Not adopted: its object stays in the bucket for a later restore.
        report.corrupt[digest] = f"the mirror could not read its copy: {exc}"
        return
    blob = BlobRecord(digest, got.sha256, got.size, head["content_type"] or FALLBACK_TYPE,
                      _created_at(head), mirror_state="done")
    try:
        async with store.write() as tx:
            await index.insert_blob(tx.conn, blob)
            # No limit applies (the owner's override neither): an adopted
            # blob was stored once already, within some owner's limits.
            await index.add_ref(tx.conn, owner, digest, blob, None, time.time())
    except BaseException:
        # Placed just now, for this row alone: never a file without its row.
        await asyncio.to_thread(files.remove_quietly, store.layout.blob_path(digest))
        raise
    report.restored += 1
    report.restored_bytes += got.size
