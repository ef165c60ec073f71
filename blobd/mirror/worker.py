"""The mirror worker: drains the outbox (:mod:`blobd.mirror.queue`) into
the bucket, in the background of a running server.

At most ``[mirror] concurrency`` operations run at once. The worker sleeps
until the next row is due, or until a commit that queued work wakes it:
one of this process at once (:attr:`blobd.store.Store.mirror_wakeup`), one
of another process (the other workers of ``[server] workers = N``, the CLI)
within :data:`WATCH_SECONDS` (see :meth:`MirrorWorker._wait`). It never
blocks the event loop: S3Target streams files and hashes parts in threads.

Operations check the index first, so they never fail forever nor undo a
live blob: a ``put`` of a blob deleted before its upload has nothing to do;
a ``delete`` of a blob stored again since is skipped (its newer ``put``
follows). A ``put`` whose object is already there, with the same SHA-256
and size, is done without uploading (after a crash mid-queue, or a
``blobd mirror sync``).

Failures stay queued with exponential backoff, capped at
``retry_max_seconds``, so a mirror that is down for a day drains when it
returns; the first success after failures makes every waiting row due at
once. Cancelling the worker (shutdown) leaves unfinished rows queued.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from .. import index
from ..index import BlobRecord
from ..config import MirrorConfig
from ..storage.s3 import S3Error, S3Target
from ..store import Store, shielded
from . import queue
from .common import blob_key, is_upload_of, object_metadata
from .heal import local_file_fault
from .queue import Job

log = logging.getLogger(__name__)


class LocalFileDamaged(Exception):
    """A blob's own file does not hold the blob: retrying the upload cannot help."""


# Longest sleep with nothing due, before the queue is read again.
POLL_SECONDS = 5.0
# While it sleeps, how often the worker asks SQLite whether another
# connection committed (PRAGMA data_version): rows queued by another
# process start this late at worst.
WATCH_SECONDS = 0.2


class MirrorWorker:
    def __init__(self, store: Store, target: S3Target, config: MirrorConfig) -> None:
        self.store = store
        self.target = target
        self.config = config
        self._running: dict[asyncio.Task[None], Job] = {}
        self._unreachable = False  # a transient failure since the last success
        # Jobs whose latest failure was permanent, with that failure's kind:
        # such a failure is logged at ERROR once, not at every retry.
        self._refused: dict[int, str] = {}
        self._data_version: int | None = None

    async def run(self) -> None:
        """Drain the queue until cancelled."""
        try:
            await self._prepare()
        except Exception:
            log.exception("mirror worker: preparing the queue failed; carrying on")
        wakeup = self.store.mirror_wakeup
        try:
            while True:
                wakeup.clear()
                try:
                    self._data_version = await self._read_data_version()
                    await self._start_due()
                    timeout = await self._idle_time()
                except Exception:
                    log.exception("mirror worker: reading the queue failed; will retry")
                    timeout = POLL_SECONDS
                await self._wait(wakeup, timeout)
        finally:
            for task in self._running:
                task.cancel()
            await asyncio.gather(*self._running, return_exceptions=True)

    async def _prepare(self) -> None:
        """Queue blobs stored before the mirror was configured, and retry
        at once whatever was waiting when the last process stopped."""
        now = time.time()
        async with self.store.write() as tx:
            added = await queue.enqueue_unmirrored(tx.conn, now)
            await queue.retry_now(tx.conn, now)
        if added:
            log.info("mirror: queued %d blobs stored before the mirror was configured",
                     added)

    @property
    def _busy(self) -> set[str]:
        return {job.hash for job in self._running.values()}

    async def _start_due(self) -> None:
        free = self.config.concurrency - len(self._running)
        if free <= 0:
            return
        jobs = await queue.due(self.store.db.reader, time.time(), free, self._busy)
        for job in jobs:
            task = asyncio.create_task(self._run(job), name=f"mirror-{job.op}-{job.hash}")
            self._running[task] = job
            task.add_done_callback(self._running.pop)

    async def _idle_time(self) -> float:
        if len(self._running) >= self.config.concurrency:
            return POLL_SECONDS  # woken by a task finishing
        next_at = await queue.next_due_at(self.store.db.reader, self._busy)
        if next_at is None:
            return POLL_SECONDS
        return min(max(next_at - time.time(), 0.0), POLL_SECONDS)

    async def _wait(self, wakeup: asyncio.Event, timeout: float) -> None:
        """Until ``timeout``, a task ends, this process queues work, or
        another process commits to the index.

        The last is SQLite's ``PRAGMA data_version``, which changes when any
        other connection, of any process, has committed. Polled every
        WATCH_SECONDS while idle, it costs one tiny read, nothing per upload,
        needs nothing from the committing side (so no process can forget to
        poke, and a worker 0 replaced after a crash needs no address to be
        found at), and is not run at all without a mirror. Any commit wakes
        the worker, not only one that queued work; it then reads the queue
        once more, which is as cheap."""
        waiter = asyncio.ensure_future(wakeup.wait())
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                done, _ = await asyncio.wait([waiter, *self._running],
                                             timeout=max(0.0, min(left, WATCH_SECONDS)),
                                             return_when=asyncio.FIRST_COMPLETED)
                if done or left <= WATCH_SECONDS or await self._others_committed():
                    return
        finally:
            waiter.cancel()

    async def _others_committed(self) -> bool:
        """Whether the index changed since the queue was last read."""
        try:
            version = await self._read_data_version()
        except Exception:  # the next read of the queue says what is wrong
            return False
        return self._data_version is not None and version != self._data_version

    async def _read_data_version(self) -> int:
        async with self.store.db.reader.execute("PRAGMA data_version") as cur:
            (version,) = await cur.fetchone()
        return int(version)

    async def _run(self, job: Job) -> None:
        try:
            if job.op == "put":
                await self._put(job)
            else:
                await self._delete(job)
        except Exception as exc:  # every failure is recorded; the row stays queued
            await shielded(self._failed(job, exc))
        else:
            await shielded(self._succeeded(job))

    async def _put(self, job: Job) -> None:
        blob = await index.get_blob(self.store.db.reader, job.hash)
        if blob is None:
            return  # deleted before it was uploaded
        key = blob_key(self.config, job.hash)
        there = await self.target.head(key)
        if there is not None and await self._uploaded_already(blob, there):
            return
        if job.attempts:
            # A retry: the upload may have been refused for the file's own
            # bytes (a checksum mismatch). Reading the disk is cheap next to
            # sending a damaged file again, only to be refused again.
            fault = await asyncio.to_thread(local_file_fault, self.store, blob)
            if fault is not None and fault != "missing":
                raise LocalFileDamaged(
                    f"the local file of {blob.hash} is damaged ({fault}), so it is not"
                    " uploaded; `blobd fsck --verify` reports it, `blobd mirror heal`"
                    " cannot help while the mirror has no good copy")
        path = self.store.layout.blob_path(job.hash)
        try:
            await self.target.put_file(key, path, blob.size, blob.sha256, blob.content_type,
                                       metadata=object_metadata(blob.created_at))
        except FileNotFoundError:
            if await index.get_blob(self.store.db.reader, job.hash) is None:
                return  # deleted while we looked
            raise

    async def _uploaded_already(self, blob: BlobRecord, there: dict[str, Any]) -> bool:
        """Whether the object there is this blob's upload (after a crash
        mid-queue, or a ``blobd mirror sync``); see :func:`is_upload_of`."""
        deleted = await index.deleted_at(self.store.db.reader, blob.hash) is not None
        return is_upload_of(there, blob, deleted)

    async def _delete(self, job: Job) -> None:
        if self.config.keep_deleted:
            return
        if await index.get_blob(self.store.db.reader, job.hash) is not None:
            return  # stored again since; its own put is queued behind us
        await self.target.delete(blob_key(self.config, job.hash))

    async def _succeeded(self, job: Job) -> None:
        self._refused.pop(job.id, None)
        now = time.time()
        async with self.store.write() as tx:
            await queue.finish(tx.conn, job)
            if job.op == "delete" and not self.config.keep_deleted and \
                    await index.get_blob(tx.conn, job.hash) is None:
                await index.forget_deleted(tx.conn, job.hash)  # its object is gone
            retried = await queue.retry_now(tx.conn, now) if self._unreachable else 0
        if self._unreachable:
            self._unreachable = False
            log.info("mirror reachable again; retrying %d queued operations now", retried)

    async def _failed(self, job: Job, exc: Exception) -> None:
        transient = isinstance(exc, S3Error) and exc.retryable
        error = str(exc) or type(exc).__name__
        async with self.store.write() as tx:
            delay = await queue.fail(tx.conn, job, error, time.time(),
                                     self.config.retry_max_seconds, permanent=not transient)
        if transient:
            self._refused.pop(job.id, None)
            if not self._unreachable:
                log.warning("mirror unreachable, operations stay queued: %s", error)
        elif self._refused.get(job.id) != _kind(exc):
            # Its first permanent failure, whatever failed before it (the
            # mirror down, then a refusal), or another kind than the last.
            self._refused[job.id] = _kind(exc)
            log.error("mirror %s of %s failed: %s", job.op, job.hash, error)
        log.debug("mirror %s of %s: attempt %d failed, retry in %.1fs: %s",
                  job.op, job.hash, job.attempts + 1, delay, error)
        self._unreachable = self._unreachable or transient


def _kind(exc: Exception) -> str:
    """What a failure was, for telling a new one from a repeat."""
    code = exc.code if isinstance(exc, S3Error) else None
    return code or type(exc).__name__
