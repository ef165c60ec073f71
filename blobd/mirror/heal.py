"""Healing: a blob whose local file is missing or damaged is fetched back
from the mirror, verified, and put in place.

What counts as damaged. ``GET`` notices, at no cost, a missing file or one
of the wrong size (:func:`blobd.http.sendblob.open_blob`), heals it and
serves the healed copy. A file of the right size with wrong bytes can only
be found by hashing it, which a GET cannot afford; ``blobd mirror heal``
hashes every local file (or the ones named) and heals those that fail.

A copy from the mirror is trusted only after its BLAKE3 (the address), its
SHA-256 and its size match the index. It is downloaded to tmp/ first, and
renamed over the final name inside a write transaction that re-checks the
blob still exists, so a heal is ordered with deletions exactly as an upload
is (see :mod:`blobd.reaper`). Concurrent heals of one blob share one
download.

A GET waits for a heal only so long (``[mirror] heal_timeout_seconds``): a
mirror that accepts connections and then never answers would otherwise hold
the request for the S3 client's own timeouts and retries, minutes. Past the
deadline the GET fails (500) while the heal goes on; a later GET finds the
file in place, or joins the heal still running.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Callable, Iterable

from .. import files, index
from ..config import MirrorConfig
from ..files import Digests
from ..index import BlobRecord
from ..storage.s3 import S3Error, S3Target
from ..store import Store
from .common import CopyMismatch, MirrorSilent, Silence, blob_key, run_pool, verify_copy

log = logging.getLogger(__name__)


class HealError(Exception):
    """The mirror could not give back a good copy (absent, unreachable, or
    not the blob). ``reason`` says which in words fit for a client: no
    endpoint or key, since the mirror's whereabouts are the server's own."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def _s3_reason(exc: S3Error) -> str:
    if exc.not_found:
        return "the mirror has no copy of it"
    if exc.retryable:
        return "the mirror cannot be reached now; a later request tries again"
    return "the mirror refused to give it back (the server's log says why)"


class Healer:
    """``deadline``: seconds a caller waits for a heal (None: until it
    ends); the server's is ``[mirror] heal_timeout_seconds``, ``blobd
    mirror heal`` has none."""

    def __init__(self, store: Store, target: S3Target, config: MirrorConfig,
                 deadline: float | None = None) -> None:
        self.store = store
        self.target = target
        self.config = config
        self.deadline = deadline
        self._running: dict[str, asyncio.Task[bool]] = {}
        self._waiting: dict[str, int] = {}  # callers waiting on each heal

    async def heal(self, blob: BlobRecord) -> bool:
        """Put a verified copy of ``blob`` in place from the mirror; False
        when the blob was deleted meanwhile. Raises :class:`HealError`,
        also when the heal outlasts the deadline (it goes on).

        A caller that goes away does not cancel the heal: others may be
        waiting on it, and a half-done one would only be started again."""
        task = self._running.get(blob.hash)
        if task is None:
            task = asyncio.ensure_future(self._heal(blob))
            self._running[blob.hash] = task
            task.add_done_callback(lambda done: self._finished(blob.hash, done))
        self._waiting[blob.hash] = self._waiting.get(blob.hash, 0) + 1
        try:
            return await asyncio.wait_for(asyncio.shield(task), self.deadline)
        except TimeoutError:
            raise HealError(f"{self.target.url(blob_key(self.config, blob.hash))}: no answer"
                            f" within {self.deadline:g}s; still healing in the background",
                            f"the mirror did not answer within {self.deadline:g}s; the"
                            " heal goes on, and a later request is served from it") from None
        finally:
            left = self._waiting.pop(blob.hash) - 1
            if left:
                self._waiting[blob.hash] = left

    async def close(self) -> None:
        """Stop heals still running (at shutdown, after requests ended)."""
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _finished(self, digest: str, task: asyncio.Task[bool]) -> None:
        self._running.pop(digest, None)
        if task.cancelled():
            return
        error = task.exception()  # retrieved here too, in case every waiter left
        if error is not None and not self._waiting.get(digest):
            # Nobody is left to report it (every GET gave up waiting).
            log.error("blob %s could not be healed: %s", digest, error)

    async def _heal(self, blob: BlobRecord) -> bool:
        store = self.store
        temp = store.layout.new_temp_path(blob.hash)
        key = blob_key(self.config, blob.hash)
        try:
            try:
                await self.target.download_to(key, temp, limit=blob.size)
                await asyncio.to_thread(verify_copy, temp, blob.hash, blob.sha256, blob.size)
            except S3Error as exc:
                absent = " (no such object)" if exc.not_found else ""
                raise HealError(f"{self.target.url(key)}{absent}: {exc}",
                                _s3_reason(exc)) from exc
            except CopyMismatch as exc:
                raise HealError(str(exc), "the copy in the mirror is not this blob") from exc
            final = store.layout.blob_path(blob.hash)
            async with store.write() as tx:
                if await index.get_blob(tx.conn, blob.hash) is None:
                    return False
                await asyncio.to_thread(files.install_verified, temp, final,
                                        store.config.storage.fsync)
            log.warning("healed blob %s from %s", blob.hash, self.target.url(key))
            return True
        finally:
            await asyncio.to_thread(files.remove_quietly, temp)


@dataclass
class Checkup:
    """What ``blobd mirror heal`` found."""
    checked: int = 0
    healed: list[str] = field(default_factory=list)
    unhealable: dict[str, str] = field(default_factory=dict)  # digest -> why
    # Why the check stopped before the end (the mirror stopped answering).
    stopped: str | None = None


def local_file_fault(store: Store, blob: BlobRecord) -> str | None:
    """Why the blob's local file is not the blob, or None if it is. Hashes
    the whole file; runs in a thread."""
    try:
        got: Digests = files.hash_file(store.layout.blob_path(blob.hash))
    except FileNotFoundError:
        return "missing"
    if got.size != blob.size:
        return f"{got.size} bytes, expected {blob.size}"
    if got.blake3 != blob.hash or got.sha256 != blob.sha256:
        return "content does not match its hash"
    return None


async def check_and_heal(store: Store, healer: Healer, blobs: Iterable[BlobRecord],
                         jobs: int, progress: Callable[[int], None]) -> Checkup:
    """Hash every blob's local file and heal the ones that fail."""
    checkup = Checkup()
    silence = Silence(jobs)

    async def check(blob: BlobRecord) -> None:
        fault = await asyncio.to_thread(local_file_fault, store, blob)
        checkup.checked += 1
        if fault is not None:
            log.warning("blob %s: local file %s", blob.hash, fault)
            try:
                if await healer.heal(blob):
                    checkup.healed.append(blob.hash)
            except HealError as exc:
                silence.saw(exc.__cause__)
                checkup.unhealable[blob.hash] = f"{fault}; {exc}"
            else:
                silence.saw(None)
        progress(blob.size)

    try:
        await run_pool(blobs, jobs, check, silence)
    except MirrorSilent as exc:
        checkup.stopped = str(exc)
        # A heal outlives its caller (see Healer.heal): stop those of the
        # checks cancelled, each removing its temporary file.
        await healer.close()
    return checkup
